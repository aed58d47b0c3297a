//! Command-line configuration: one `key=value,key=value` option parser shared
//! by every flag, and the typed configuration it produces.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::seccomp::SeccompMode;

/// A command-line or option error; its message names what to change.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// An unknown flag.
    #[error("unknown argument '{0}' (see --help)")]
    UnknownFlag(String),
    /// A flag given without its value.
    #[error("{0} needs a value")]
    MissingValue(String),
    /// A flag that must be given was not.
    #[error("{0} is required")]
    Required(&'static str),
    /// A flag given twice that can only be given once.
    #[error("{0} may be given only once")]
    Repeated(String),
    /// An option key the flag does not know.
    #[error("{flag}: unknown option '{key}' (known: {known})")]
    UnknownKey {
        /// The flag.
        flag: &'static str,
        /// The unknown key.
        key: String,
        /// The keys the flag accepts.
        known: String,
    },
    /// An option value that does not parse.
    #[error("{flag}: invalid value '{value}' for '{key}': {reason}")]
    InvalidValue {
        /// The flag.
        flag: &'static str,
        /// The option key.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A file named on the command line cannot be used.
    #[error("{flag}: cannot open '{path}': {reason}")]
    File {
        /// The flag.
        flag: &'static str,
        /// The path given.
        path: String,
        /// Why it cannot be opened.
        reason: String,
    },
    /// Options that contradict each other.
    #[error("{0}")]
    Conflict(String),
}

type Result<T> = std::result::Result<T, ConfigError>;

/// Parses `key=value,key=value` options of one flag.
///
/// A value without `key=` is taken as the flag's default key, so
/// `--memory 512M` means `--memory size=512M`.
pub struct OptionParser {
    flag: &'static str,
    known: &'static [&'static str],
    values: BTreeMap<&'static str, String>,
}

impl OptionParser {
    /// Parses `input` for `flag`, accepting only `known` keys; the first
    /// known key is the default key for a bare value.
    pub fn parse(flag: &'static str, known: &'static [&'static str], input: &str) -> Result<Self> {
        let mut values = BTreeMap::new();
        for (i, item) in input.split(',').enumerate() {
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None if i == 0 => (known[0], item.trim()),
                None => (item.trim(), ""),
            };
            let known_key =
                known
                    .iter()
                    .find(|k| **k == key)
                    .ok_or_else(|| ConfigError::UnknownKey {
                        flag,
                        key: key.to_string(),
                        known: known.join(", "),
                    })?;
            if values.insert(*known_key, value.to_string()).is_some() {
                return Err(ConfigError::Repeated(format!("{flag} {key}")));
            }
        }
        Ok(Self {
            flag,
            known,
            values,
        })
    }

    fn invalid(&self, key: &str, value: &str, reason: impl Into<String>) -> ConfigError {
        ConfigError::InvalidValue {
            flag: self.flag,
            key: key.to_string(),
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    fn raw(&self, key: &str) -> Option<&str> {
        debug_assert!(self.known.contains(&key), "option {key} not declared");
        self.values.get(key).map(String::as_str)
    }

    /// The string value of `key`, if given.
    pub fn string(&self, key: &str) -> Option<String> {
        self.raw(key).map(str::to_string)
    }

    /// A byte size (`4096`, `512M`, `2G`, `64K`), if given.
    pub fn size(&self, key: &str) -> Result<Option<u64>> {
        self.raw(key)
            .map(|v| parse_size(v).map_err(|reason| self.invalid(key, v, reason)))
            .transpose()
    }

    /// An unsigned integer, if given.
    pub fn number(&self, key: &str) -> Result<Option<u64>> {
        self.raw(key)
            .map(|v| {
                v.parse::<u64>()
                    .map_err(|_| self.invalid(key, v, "expected a non-negative integer"))
            })
            .transpose()
    }

    /// An `on`/`off` switch, `false` when absent.
    pub fn toggle(&self, key: &str) -> Result<bool> {
        match self.raw(key) {
            None | Some("off") | Some("false") => Ok(false),
            Some("on") | Some("true") | Some("") => Ok(true),
            Some(v) => Err(self.invalid(key, v, "expected on or off")),
        }
    }
}

/// Parses a byte size: plain bytes or a K/M/G/T suffix (binary units).
pub fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 10),
        Some((i, 'M' | 'm')) => (&s[..i], 20),
        Some((i, 'G' | 'g')) => (&s[..i], 30),
        Some((i, 'T' | 't')) => (&s[..i], 40),
        _ => (s, 0),
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| "expected a size such as 4096, 512M or 2G".to_string())?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| "size too large".to_string())
}

/// vCPU configuration (`--cpus boot=N`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CpusConfig {
    /// vCPUs started at boot.
    pub boot_vcpus: u8,
}

/// How hotpluggable memory reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HotplugMethod {
    /// A virtio-mem device.
    VirtioMem,
    /// A Hyper-V Dynamic Memory device on a VMBus: the guest sees Hyper-V
    /// (and not KVM) and needs the hv_vmbus and hv_balloon drivers.
    HvBalloon,
}

/// Guest memory configuration (`--memory`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryConfig {
    /// Boot memory in bytes.
    pub size: u64,
    /// Size of the hotpluggable region (0 = none).
    pub hotplug_size: u64,
    /// How the hotpluggable region is offered.
    pub hotplug_method: HotplugMethod,
    /// The block size the guest plugs (virtio-mem).
    pub block_size: u64,
    /// The KVM memslot granularity of the hotplug region.
    pub slot_size: u64,
    /// Back guest memory with a memfd mapped shared.
    pub shared: bool,
    /// Back guest memory with hugetlb pages.
    pub hugepages: bool,
    /// Populate boot memory at start.
    pub prefault: bool,
}

/// A virtio-blk disk (`--disk`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiskConfig {
    /// Backing file.
    pub path: PathBuf,
    /// Refuse guest writes.
    pub readonly: bool,
}

/// Where the serial console goes (`--serial`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SerialConfig {
    /// tidevm's stdout (and stdin for input).
    Tty,
    /// A file.
    File(PathBuf),
    /// Nowhere.
    Off,
}

/// A virtio-balloon device (`--balloon`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BalloonConfig {
    /// Initial target size in bytes.
    pub size: u64,
    /// Let the guest deflate when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Free page reporting.
    pub free_page_reporting: bool,
    /// Statistics interval in seconds (0 = off).
    pub stats_period_s: u64,
}

/// A virtio-vsock device with the hybrid Unix-socket backend (`--vsock`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u64,
    /// The Unix socket host clients connect to; guest connections to host
    /// port P go to `<socket>_P`.
    pub socket: PathBuf,
}

/// A virtio-rng device (`--rng`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RngConfig {
    /// The host file random bytes are read from.
    pub src: PathBuf,
}

/// The whole VM configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmConfig {
    /// Guest kernel: ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Initial ramdisk.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// vCPUs.
    pub cpus: CpusConfig,
    /// Memory.
    pub memory: MemoryConfig,
    /// Disks.
    pub disks: Vec<DiskConfig>,
    /// Serial console.
    pub serial: SerialConfig,
    /// Balloon device.
    pub balloon: Option<BalloonConfig>,
    /// vsock device.
    pub vsock: Option<VsockConfig>,
    /// Entropy device.
    pub rng: Option<RngConfig>,
    /// API socket path.
    pub api_socket: Option<PathBuf>,
    /// What a guest reboot does.
    pub on_reboot: RebootAction,
}

/// What tidevm does when the guest reboots (`--on-reboot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RebootAction {
    /// Exit with status 0 (the default).
    Exit,
    /// Start the guest again in a fresh VM: boot memory only, nothing
    /// plugged, balloon deflated; the API socket stays.
    Restart,
}

/// Default kernel command line: serial console, reset through the i8042.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

const MIB: u64 = 1 << 20;
/// Largest kernel command line, with its NUL (x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Most vCPUs: the IOAPIC takes the APIC id after the last vCPU.
pub const MAX_VCPUS: u8 = 254;
/// Largest boot memory.
pub const MAX_BOOT_MEMORY: u64 = 1 << 40;
/// Largest hotplug region.
pub const MAX_HOTPLUG_MEMORY: u64 = 1 << 40;

/// What `main` should do.
#[derive(Debug)]
pub enum Command {
    /// Print help and exit 0.
    Help,
    /// Print the version and exit 0.
    Version,
    /// Boot a VM.
    Run {
        /// The VM.
        config: Box<VmConfig>,
        /// The seccomp filters (`--seccomp`).
        seccomp: SeccompMode,
    },
    /// Start without a VM and serve the API on this socket (`--api-socket`
    /// alone, or with `--seccomp`): the VM comes from the Cloud Hypervisor
    /// API's `vm.create`.
    Serve {
        /// The API socket.
        socket: PathBuf,
        /// The seccomp filters (`--seccomp`).
        seccomp: SeccompMode,
    },
}

/// The `--help` text.
pub const USAGE: &str = "\
usage: tidevm --api-socket PATH [--seccomp ...]   (no VM: create and boot one over the API)
       tidevm --kernel PATH [--initrd PATH] [--cmdline \"ARGS\"]
              [--cpus boot=N] [--memory size=SIZE[,hotplug_size=SIZE][,...]]
              [--disk path=FILE[,readonly=on]]... [--serial tty|file=PATH|off]
              [--balloon size=SIZE[,deflate_on_oom=on][,free_page_reporting=on][,stats_period=S]]
              [--vsock cid=N,socket=PATH] [--rng src=PATH]
              [--api-socket PATH] [--on-reboot exit|restart] [--seccomp true|false|log]

  --kernel PATH      guest kernel: ELF vmlinux or bzImage
  --initrd PATH      initial ramdisk
  --cmdline ARGS     kernel command line (default: \"console=ttyS0 reboot=k panic=1\")
  --cpus boot=N      vCPUs (default 1); `--cpus 2` works too
  --memory ...       size=SIZE boot memory (default 512M); hotplug_size=SIZE hotplug region;
                     hotplug_method=virtio-mem (default) or hv-balloon (Hyper-V Dynamic
                     Memory: the guest sees Hyper-V); block_size=SIZE (default 2M);
                     slot_size=SIZE KVM memslot size (default 128M); shared=on (memfd);
                     hugepages=on; prefault=on. SIZE: bytes or K/M/G suffix
  --disk ...         path=FILE[,readonly=on] a virtio-blk disk; repeatable
  --serial ...       tty (default), file=PATH or off
  --balloon ...      size=SIZE initial balloon; deflate_on_oom=on; free_page_reporting=on;
                     stats_period=SECONDS
  --vsock ...        cid=N,socket=PATH a virtio-vsock device: the guest's CID (3 or more);
                     host clients connect to PATH and send \"CONNECT <port>\\n\"; guest
                     connections to host port P reach a listener at PATH_P
  --rng ...          src=PATH a virtio-rng device fed from PATH (default /dev/urandom)
  --api-socket PATH  serve the REST API on this Unix socket (tidevm's own and the
                     Cloud Hypervisor API v1 under /api/v1/); alone, start with no VM
  --on-reboot ACTION exit (default: a guest reboot ends tidevm with status 0) or
                     restart (boot the guest again in a fresh VM)
  --seccomp MODE     true (default): each thread may make only the system calls it
                     needs, and any other ends tidevm (exit status 159) naming the thread
                     and the call; log: allow all, the kernel logs what would be refused;
                     false: no filters
  --help, --version
";

/// Parses the arguments after the program name.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Command> {
    let mut args = args.into_iter();
    let mut single: BTreeMap<&'static str, String> = BTreeMap::new();
    let mut disks = Vec::new();
    const SINGLE: &[&str] = &[
        "--kernel",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--memory",
        "--serial",
        "--balloon",
        "--vsock",
        "--rng",
        "--api-socket",
        "--on-reboot",
        "--seccomp",
    ];
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        match flag.as_str() {
            "--help" | "-h" => return Ok(Command::Help),
            "--version" | "-V" => return Ok(Command::Version),
            _ => {}
        }
        let known = SINGLE
            .iter()
            .chain(std::iter::once(&"--disk"))
            .find(|f| **f == flag)
            .ok_or_else(|| ConfigError::UnknownFlag(arg.clone()))?;
        let value = match inline {
            Some(v) => v,
            None => args
                .next()
                .ok_or_else(|| ConfigError::MissingValue(flag.clone()))?,
        };
        if *known == "--disk" {
            disks.push(value);
        } else if single.insert(known, value).is_some() {
            return Err(ConfigError::Repeated(flag));
        }
    }
    if single.get("--api-socket").is_some_and(|s| s.is_empty()) {
        return Err(ConfigError::MissingValue("--api-socket".into()));
    }
    let seccomp = match single.remove("--seccomp") {
        None => SeccompMode::default(),
        Some(mode) => mode.parse().map_err(|reason| ConfigError::InvalidValue {
            flag: "--seccomp",
            key: "mode".into(),
            value: mode.clone(),
            reason,
        })?,
    };
    let Some(kernel) = single.remove("--kernel") else {
        return match single.remove("--api-socket") {
            Some(socket) if single.is_empty() && disks.is_empty() => Ok(Command::Serve {
                socket: PathBuf::from(socket),
                seccomp,
            }),
            _ => Err(ConfigError::Required("--kernel")),
        };
    };
    let config = VmConfig {
        kernel: readable_file("--kernel", &kernel)?,
        initrd: single
            .remove("--initrd")
            .map(|p| readable_file("--initrd", &p))
            .transpose()?,
        cmdline: single
            .remove("--cmdline")
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_string()),
        cpus: parse_cpus(single.remove("--cpus").as_deref().unwrap_or("boot=1"))?,
        memory: parse_memory(single.remove("--memory").as_deref().unwrap_or("size=512M"))?,
        disks: disks.iter().map(|d| parse_disk(d)).collect::<Result<_>>()?,
        serial: parse_serial(single.remove("--serial").as_deref().unwrap_or("tty"))?,
        balloon: single
            .remove("--balloon")
            .map(|b| parse_balloon(&b))
            .transpose()?,
        vsock: single
            .remove("--vsock")
            .map(|v| parse_vsock(&v))
            .transpose()?,
        rng: single.remove("--rng").map(|r| parse_rng(&r)).transpose()?,
        api_socket: single.remove("--api-socket").map(PathBuf::from),
        on_reboot: match single.remove("--on-reboot").as_deref() {
            None | Some("exit") => RebootAction::Exit,
            Some("restart") => RebootAction::Restart,
            Some(other) => {
                return Err(ConfigError::InvalidValue {
                    flag: "--on-reboot",
                    key: "action".into(),
                    value: other.into(),
                    reason: "expected exit or restart".into(),
                })
            }
        },
    };
    if config.cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(ConfigError::Conflict(format!(
            "--cmdline is {} bytes; the limit is {}",
            config.cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    Ok(Command::Run {
        config: Box::new(config),
        seccomp,
    })
}

pub(crate) fn readable_file(flag: &'static str, path: &str) -> Result<PathBuf> {
    let err = |reason: String| ConfigError::File {
        flag,
        path: path.to_string(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    Ok(PathBuf::from(path))
}

fn parse_cpus(input: &str) -> Result<CpusConfig> {
    let opts = OptionParser::parse("--cpus", &["boot"], input)?;
    let boot = opts.number("boot")?.unwrap_or(1);
    let max = u64::from(MAX_VCPUS);
    if boot == 0 || boot > max {
        return Err(opts.invalid("boot", &boot.to_string(), format!("must be 1 to {max}")));
    }
    Ok(CpusConfig {
        boot_vcpus: u8::try_from(boot).expect("checked above"),
    })
}

pub(crate) fn parse_memory(input: &str) -> Result<MemoryConfig> {
    const KEYS: &[&str] = &[
        "size",
        "hotplug_size",
        "hotplug_method",
        "block_size",
        "slot_size",
        "shared",
        "hugepages",
        "prefault",
    ];
    let opts = OptionParser::parse("--memory", KEYS, input)?;
    let config = MemoryConfig {
        size: opts.size("size")?.unwrap_or(512 * MIB),
        hotplug_size: opts.size("hotplug_size")?.unwrap_or(0),
        hotplug_method: match opts.string("hotplug_method").as_deref() {
            None | Some("virtio-mem") => HotplugMethod::VirtioMem,
            Some("hv-balloon") => HotplugMethod::HvBalloon,
            Some(v) => {
                return Err(opts.invalid("hotplug_method", v, "expected virtio-mem or hv-balloon"))
            }
        },
        block_size: opts.size("block_size")?.unwrap_or(2 * MIB),
        slot_size: opts.size("slot_size")?.unwrap_or(128 * MIB),
        shared: opts.toggle("shared")?,
        hugepages: opts.toggle("hugepages")?,
        prefault: opts.toggle("prefault")?,
    };
    let page = page_size();
    let size_str = |v: u64| v.to_string();
    if config.size < 64 * MIB || !config.size.is_multiple_of(page) {
        return Err(opts.invalid(
            "size",
            &size_str(config.size),
            format!("must be at least 64M and a multiple of the page size ({page})"),
        ));
    }
    if config.size > MAX_BOOT_MEMORY {
        return Err(opts.invalid(
            "size",
            &size_str(config.size),
            format!("must be at most {}", MAX_BOOT_MEMORY),
        ));
    }
    if !config.block_size.is_power_of_two() || config.block_size < page {
        return Err(opts.invalid(
            "block_size",
            &size_str(config.block_size),
            format!("must be a power of two and at least the page size ({page})"),
        ));
    }
    if !config.slot_size.is_power_of_two() || config.slot_size < config.block_size {
        return Err(opts.invalid(
            "slot_size",
            &size_str(config.slot_size),
            "must be a power of two and at least block_size",
        ));
    }
    if !config.hotplug_size.is_multiple_of(config.slot_size) {
        return Err(opts.invalid(
            "hotplug_size",
            &size_str(config.hotplug_size),
            format!("must be a multiple of slot_size ({})", config.slot_size),
        ));
    }
    if config.hotplug_method == HotplugMethod::HvBalloon && config.hotplug_size == 0 {
        return Err(opts.invalid(
            "hotplug_method",
            "hv-balloon",
            "needs a hotplug region: add hotplug_size=SIZE",
        ));
    }
    if config.hotplug_size > MAX_HOTPLUG_MEMORY {
        return Err(opts.invalid(
            "hotplug_size",
            &size_str(config.hotplug_size),
            format!("must be at most {}", MAX_HOTPLUG_MEMORY),
        ));
    }
    Ok(config)
}

fn parse_disk(input: &str) -> Result<DiskConfig> {
    let opts = OptionParser::parse("--disk", &["path", "readonly"], input)?;
    let path = opts
        .string("path")
        .ok_or(ConfigError::MissingValue("--disk path".into()))?;
    Ok(DiskConfig {
        path: readable_file("--disk", &path)?,
        readonly: opts.toggle("readonly")?,
    })
}

fn parse_serial(input: &str) -> Result<SerialConfig> {
    let opts = OptionParser::parse("--serial", &["mode", "file"], input)?;
    match (opts.string("mode").as_deref(), opts.string("file")) {
        (None, Some(path)) if !path.is_empty() => Ok(SerialConfig::File(path.into())),
        (Some("tty"), None) => Ok(SerialConfig::Tty),
        (Some("off"), None) => Ok(SerialConfig::Off),
        (Some(v), _) => Err(opts.invalid("mode", v, "expected tty, off or file=PATH")),
        (None, _) => Err(opts.invalid("file", "", "expected file=PATH")),
    }
}

fn parse_balloon(input: &str) -> Result<BalloonConfig> {
    const KEYS: &[&str] = &[
        "size",
        "deflate_on_oom",
        "free_page_reporting",
        "stats_period",
    ];
    let opts = OptionParser::parse("--balloon", KEYS, input)?;
    Ok(BalloonConfig {
        size: opts.size("size")?.unwrap_or(0),
        deflate_on_oom: opts.toggle("deflate_on_oom")?,
        free_page_reporting: opts.toggle("free_page_reporting")?,
        stats_period_s: opts.number("stats_period")?.unwrap_or(0),
    })
}

fn parse_vsock(input: &str) -> Result<VsockConfig> {
    let opts = OptionParser::parse("--vsock", &["cid", "socket"], input)?;
    let cid = opts
        .number("cid")?
        .ok_or(ConfigError::MissingValue("--vsock cid".into()))?;
    if !(3..u64::from(u32::MAX)).contains(&cid) {
        return Err(opts.invalid(
            "cid",
            &cid.to_string(),
            "must be 3 or more (0-2 are reserved) and below 4294967295",
        ));
    }
    let socket = opts
        .string("socket")
        .filter(|s| !s.is_empty())
        .ok_or(ConfigError::MissingValue("--vsock socket".into()))?;
    Ok(VsockConfig {
        cid,
        socket: PathBuf::from(socket),
    })
}

fn parse_rng(input: &str) -> Result<RngConfig> {
    let opts = OptionParser::parse("--rng", &["src"], input)?;
    let src = opts
        .string("src")
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "/dev/urandom".to_string());
    let src = entropy_source("--rng", &src)?;
    Ok(RngConfig { src })
}

/// Checks that `path` can feed a virtio-rng device: a regular file or a
/// character device, opened without blocking (a FIFO would hang tidevm).
pub(crate) fn entropy_source(flag: &'static str, path: &str) -> Result<PathBuf> {
    use devices::virtio::rng::{open_source, RngError};
    let reason = match open_source(std::path::Path::new(path)) {
        Ok(_) => return Ok(PathBuf::from(path)),
        Err(RngError::Open { source, .. }) => source.to_string(),
        Err(RngError::NotFileOrCharDevice(_)) => {
            "not a regular file or a character device".to_string()
        }
        Err(e) => e.to_string(),
    };
    Err(ConfigError::File {
        flag,
        path: path.to_string(),
        reason,
    })
}

/// The host page size.
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(size).unwrap_or(4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    fn run(s: &[&str]) -> Result<VmConfig> {
        match parse_args(args(s))? {
            Command::Run { config, .. } => Ok(*config),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert!(parse_size("12X").is_err());
        assert!(parse_size("").is_err());
        assert!(parse_size("-1M").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn full_command_line() {
        let kernel = std::env::current_exe().unwrap();
        let k = kernel.to_str().unwrap();
        let c = run(&[
            "--kernel",
            k,
            "--cpus",
            "2",
            "--memory",
            "512M,hotplug_size=4G,block_size=4M,shared=on",
            "--disk",
            &format!("path={k},readonly=on"),
            "--disk",
            &format!("path={k}"),
            "--serial=off",
            "--cmdline",
            "console=ttyS0 quiet",
            "--balloon",
            "size=0,deflate_on_oom=on,stats_period=2",
            "--on-reboot",
            "restart",
            "--vsock",
            "cid=3,socket=/run/v.sock",
            "--rng",
            "src=/dev/urandom",
        ])
        .unwrap();
        assert_eq!(
            c.vsock,
            Some(VsockConfig {
                cid: 3,
                socket: "/run/v.sock".into()
            })
        );
        assert_eq!(c.rng.unwrap().src, PathBuf::from("/dev/urandom"));
        assert_eq!(c.cpus.boot_vcpus, 2);
        assert_eq!(c.memory.size, 512 << 20);
        assert_eq!(c.memory.hotplug_size, 4 << 30);
        assert_eq!(c.memory.block_size, 4 << 20);
        assert_eq!(c.memory.slot_size, 128 << 20);
        assert!(c.memory.shared && !c.memory.hugepages);
        assert_eq!(c.disks.len(), 2);
        assert!(c.disks[0].readonly && !c.disks[1].readonly);
        assert_eq!(c.serial, SerialConfig::Off);
        assert_eq!(c.cmdline, "console=ttyS0 quiet");
        let b = c.balloon.unwrap();
        assert!(b.deflate_on_oom && !b.free_page_reporting);
        assert_eq!(b.stats_period_s, 2);
        assert_eq!(c.on_reboot, RebootAction::Restart);
    }

    #[test]
    fn errors_name_the_problem() {
        let exe = std::env::current_exe().unwrap();
        let k = exe.to_str().unwrap();
        let err = |a: &[&str]| run(a).unwrap_err().to_string();
        assert_eq!(err(&[]), "--kernel is required");
        assert!(matches!(
            parse_args(args(&["--api-socket", "/run/a.sock"])),
            Ok(Command::Serve { socket, seccomp: SeccompMode::Trap })
                if socket == std::path::Path::new("/run/a.sock")
        ));
        assert!(matches!(
            parse_args(args(&["--api-socket", "/run/a.sock", "--seccomp", "log"])),
            Ok(Command::Serve {
                seccomp: SeccompMode::Log,
                ..
            })
        ));
        assert!(matches!(
            parse_args(args(&["--kernel", k, "--seccomp=false"])),
            Ok(Command::Run {
                seccomp: SeccompMode::Off,
                ..
            })
        ));
        assert!(err(&["--kernel", k, "--seccomp", "maybe"])
            .contains("invalid value 'maybe' for 'mode': expected true, false or log"));
        assert_eq!(
            err(&["--api-socket", "/run/a.sock", "--cpus", "2"]),
            "--kernel is required"
        );
        assert_eq!(err(&["--api-socket", ""]), "--api-socket needs a value");
        assert_eq!(
            err(&["--kernel", k, "--api-socket", ""]),
            "--api-socket needs a value"
        );
        assert!(err(&["--kernel", "/nonexistent"]).contains("cannot open '/nonexistent'"));
        assert!(
            err(&["--kernel", k, "--memory", "lots"]).contains("invalid value 'lots' for 'size'")
        );
        assert!(err(&["--kernel", k, "--memory", "512M,colour=red"])
            .contains("unknown option 'colour'"));
        assert!(err(&["--kernel", k, "--cpus", "0"]).contains("must be 1 to"));
        assert!(err(&["--kernel", k, "--frobnicate"]).contains("unknown argument '--frobnicate'"));
        assert!(err(&["--kernel", k, "--kernel", k]).contains("only once"));
        assert!(err(&["--kernel"]).contains("needs a value"));
        assert!(err(&["--kernel", k, "--memory", "512M,block_size=3M"]).contains("power of two"));
        assert!(err(&["--kernel", k, "--memory", "512M,hotplug_size=100M"])
            .contains("multiple of slot_size"));
        assert!(
            err(&["--kernel", k, "--serial", "pipe"]).contains("expected tty, off or file=PATH")
        );
        assert!(
            err(&["--kernel", k, "--disk", "readonly=on"]).contains("--disk path needs a value")
        );
        assert!(err(&["--kernel", k, "--on-reboot", "dance"]).contains("expected exit or restart"));
        assert!(err(&["--kernel", k, "--vsock", "cid=2,socket=/x"]).contains("must be 3 or more"));
        assert!(err(&["--kernel", k, "--vsock", "cid=3"]).contains("--vsock socket needs a value"));
        assert!(err(&["--kernel", k, "--vsock", "socket=/x"]).contains("--vsock cid needs a value"));
        assert!(err(&["--kernel", k, "--rng", "src=/nonexistent"]).contains("cannot open"));
        assert_eq!(
            err(&["--kernel", k, "--rng", "src=/"]),
            "--rng: cannot open '/': not a regular file or a character device"
        );
        assert!(err(&["--kernel", k, "--rng", "seed=1"]).contains("unknown option 'seed'"));
    }

    #[test]
    fn hotplug_method() {
        let method = |m: &str| parse_memory(m).map(|c| c.hotplug_method);
        assert_eq!(method("512M,hotplug_size=4G"), Ok(HotplugMethod::VirtioMem));
        assert_eq!(
            method("512M,hotplug_size=4G,hotplug_method=virtio-mem"),
            Ok(HotplugMethod::VirtioMem)
        );
        assert_eq!(
            method("size=512M,hotplug_size=4G,hotplug_method=hv-balloon"),
            Ok(HotplugMethod::HvBalloon)
        );
        assert_eq!(method("512M"), Ok(HotplugMethod::VirtioMem));
        let err = |m: &str| parse_memory(m).unwrap_err().to_string();
        assert_eq!(
            err("512M,hotplug_method=hv-balloon"),
            "--memory: invalid value 'hv-balloon' for 'hotplug_method': \
             needs a hotplug region: add hotplug_size=SIZE"
        );
        assert_eq!(
            err("512M,hotplug_size=4G,hotplug_method=dimm"),
            "--memory: invalid value 'dimm' for 'hotplug_method': expected virtio-mem or hv-balloon"
        );
        assert_eq!(
            serde_json::to_string(&HotplugMethod::HvBalloon).unwrap(),
            "\"hv-balloon\""
        );
    }
}
