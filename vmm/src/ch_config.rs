//! Maps a Cloud Hypervisor `VmConfig` (from `PUT /api/v1/vm.create`) onto
//! tidevm's [`VmConfig`]: what tidevm supports is mapped, fields at their
//! defaults are accepted, and anything asking for what tidevm lacks is
//! refused with an error naming the field.

use std::path::PathBuf;

use api_server::ch::{
    ChBalloonConfig, ChConsoleConfig, ChCpusConfig, ChDiskConfig, ChMemoryConfig, ChPayloadConfig,
    ChRngConfig, ChVmConfig, ChVsockConfig, OtherFields,
};
use serde_json::Value;

use crate::config::{
    self, BalloonConfig, CpusConfig, DiskConfig, MemoryConfig, RebootAction, RngConfig,
    SerialConfig, VmConfig, VsockConfig, CMDLINE_MAX_SIZE, DEFAULT_CMDLINE, MAX_VCPUS,
};

/// Why a Cloud Hypervisor `VmConfig` cannot become a tidevm VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChConfigError {
    /// The field asks for something tidevm does not have.
    #[error("{field}: not supported by tidevm: {reason}")]
    Unsupported {
        /// The field, e.g. `net` or `memory.hotplug_method`.
        field: String,
        /// What tidevm lacks, or what to ask instead.
        reason: String,
    },
    /// The field's value is invalid.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, e.g. `payload.kernel`.
        field: String,
        /// What is wrong with it.
        reason: String,
    },
}

impl ChConfigError {
    /// The HTTP status the API answers with.
    pub fn status(&self) -> u16 {
        400
    }
}

type Result<T> = std::result::Result<T, ChConfigError>;

fn unsupported(field: impl Into<String>, reason: impl Into<String>) -> ChConfigError {
    ChConfigError::Unsupported {
        field: field.into(),
        reason: reason.into(),
    }
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ChConfigError {
    ChConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// Any value is accepted for this field (it has no meaning for tidevm's
/// virtio-mmio devices, e.g. an `id` or a PCI slot).
const ANY: &str = "*";

/// Checks fields tidevm does not model: a field listed in `defaults` must
/// be null or equal its default there (JSON text, or [`ANY`]); any other
/// must be empty (null, false, 0-length string, array or object).
fn check_other(prefix: &str, other: &OtherFields, defaults: &[(&str, &str)]) -> Result<()> {
    for (key, value) in other {
        let empty = match value {
            Value::Null | Value::Bool(false) => true,
            Value::String(s) => s.is_empty(),
            Value::Array(a) => a.is_empty(),
            Value::Object(o) => o.is_empty(),
            _ => false,
        };
        let accepted = match defaults.iter().find(|(k, _)| k == key) {
            Some((_, d)) => {
                *d == ANY
                    || value.is_null()
                    || serde_json::from_str::<Value>(d).ok().as_ref() == Some(value)
            }
            None => empty,
        };
        if !accepted {
            return Err(unsupported(
                format!("{prefix}{key}"),
                format!("tidevm cannot provide {value}"),
            ));
        }
    }
    Ok(())
}

/// Fields of a virtio device that only place it on PCI.
const DEVICE_DEFAULTS: &[(&str, &str)] =
    &[("id", ANY), ("pci_segment", "0"), ("pci_device_id", ANY)];

/// Maps a Cloud Hypervisor `VmConfig` onto tidevm's configuration. The
/// result has no API socket and restarts the guest when it reboots, as
/// Cloud Hypervisor does. Files named are checked to be readable.
pub fn ch_config_to_vm_config(ch: &ChVmConfig) -> Result<VmConfig> {
    check_other("", &ch.other, &[("pvpanic", ANY)])?;
    check_other("payload.", &ch.payload.other, &[])?;
    let kernel = ch.payload.kernel.as_deref().ok_or_else(|| {
        invalid(
            "payload.kernel",
            "required: tidevm boots a kernel directly, not firmware",
        )
    })?;
    let file = |field: &str, path: &str| {
        config::readable_file("payload", path).map_err(|e| invalid(field, e.to_string()))
    };
    let cmdline = ch
        .payload
        .cmdline
        .clone()
        .unwrap_or_else(|| DEFAULT_CMDLINE.to_string());
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(invalid(
            "payload.cmdline",
            format!(
                "{} bytes; the limit is {}",
                cmdline.len(),
                CMDLINE_MAX_SIZE - 1
            ),
        ));
    }
    let kernel = file("payload.kernel", kernel)?;
    std::fs::File::open(&kernel)
        .map_err(|e| e.to_string())
        .and_then(|mut f| arch::kernel::check_kernel_format(&mut f).map_err(|e| e.to_string()))
        .map_err(|e| invalid("payload.kernel", e))?;
    Ok(VmConfig {
        kernel,
        initrd: ch
            .payload
            .initramfs
            .as_deref()
            .map(|p| file("payload.initramfs", p))
            .transpose()?,
        cmdline,
        cpus: map_cpus(ch.cpus.as_ref())?,
        memory: map_memory(ch.memory.as_ref())?,
        disks: map_disks(ch)?,
        serial: map_serial(ch.serial.as_ref(), ch.console.as_ref())?,
        balloon: ch
            .balloon
            .as_ref()
            .map(|b| {
                check_other("balloon.", &b.other, DEVICE_DEFAULTS)?;
                Ok(BalloonConfig {
                    size: b.size,
                    deflate_on_oom: b.deflate_on_oom.unwrap_or(false),
                    free_page_reporting: b.free_page_reporting.unwrap_or(false),
                    stats_period_s: 0,
                })
            })
            .transpose()?,
        vsock: ch.vsock.as_ref().map(map_vsock).transpose()?,
        rng: ch
            .rng
            .as_ref()
            .map(|r| {
                check_other("rng.", &r.other, DEVICE_DEFAULTS)?;
                let src = if r.src.is_empty() {
                    "/dev/urandom"
                } else {
                    &r.src
                };
                let src = config::entropy_source("rng", src)
                    .map_err(|e| invalid("rng.src", e.to_string()))?;
                Ok(RngConfig { src })
            })
            .transpose()?,
        api_socket: None,
        on_reboot: RebootAction::Restart,
    })
}

/// Maps a Cloud Hypervisor `VsockConfig` (of `vm.create` or `vm.add-vsock`).
pub fn map_vsock(v: &ChVsockConfig) -> Result<VsockConfig> {
    check_other("vsock.", &v.other, DEVICE_DEFAULTS)?;
    if !(3..u64::from(u32::MAX)).contains(&v.cid) {
        return Err(invalid(
            "vsock.cid",
            "must be 3 or more (0-2 are reserved) and below 4294967295",
        ));
    }
    if v.socket.is_empty() {
        return Err(invalid("vsock.socket", "must be a path"));
    }
    // tidevm listens there at vm.boot: a missing directory is the request's
    // fault, better said now than as a failed boot.
    let socket = std::path::Path::new(&v.socket);
    if let Some(dir) = socket.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.is_dir() {
            return Err(invalid(
                "vsock.socket",
                format!("{} is not a directory", dir.display()),
            ));
        }
    }
    Ok(VsockConfig {
        cid: v.cid,
        socket: PathBuf::from(&v.socket),
    })
}

fn map_cpus(cpus: Option<&ChCpusConfig>) -> Result<CpusConfig> {
    let Some(cpus) = cpus else {
        return Ok(CpusConfig { boot_vcpus: 1 });
    };
    check_other(
        "cpus.",
        &cpus.other,
        &[
            ("nested", ANY),
            ("max_phys_bits", ANY),
            ("core_scheduling", ANY),
        ],
    )?;
    let boot = u8::try_from(cpus.boot_vcpus)
        .ok()
        .filter(|n| (1..=MAX_VCPUS).contains(n))
        .ok_or_else(|| invalid("cpus.boot_vcpus", format!("must be 1 to {MAX_VCPUS}")))?;
    if let Some(max) = cpus.max_vcpus.filter(|m| *m != cpus.boot_vcpus) {
        return Err(unsupported(
            "cpus.max_vcpus",
            format!("no vCPU hotplug: max_vcpus ({max}) must equal boot_vcpus ({boot})"),
        ));
    }
    if let Some(t) = &cpus.topology {
        let one = |v: Option<u64>| v.unwrap_or(1) == 1;
        let cores = t.cores_per_die.unwrap_or(u64::from(boot));
        if !one(t.threads_per_core)
            || !one(t.dies_per_package)
            || !one(t.packages)
            || cores != u64::from(boot)
        {
            return Err(unsupported(
                "cpus.topology",
                format!("tidevm builds one package of {boot} single-threaded cores"),
            ));
        }
    }
    Ok(CpusConfig { boot_vcpus: boot })
}

fn map_memory(memory: Option<&ChMemoryConfig>) -> Result<MemoryConfig> {
    let Some(m) = memory else {
        return config::parse_memory("size=512M").map_err(|e| invalid("memory", e.to_string()));
    };
    check_other("memory.", &m.other, &[("thp", "true")])?;
    let hotplug_size = m.hotplug_size.unwrap_or(0);
    let method = match m.hotplug_method.as_deref() {
        Some("HvBalloon") => "hv-balloon",
        Some("VirtioMem") => "virtio-mem",
        _ if hotplug_size == 0 => "virtio-mem",
        other => {
            return Err(unsupported(
                "memory.hotplug_method",
                format!(
                    "{} hotplug; \"VirtioMem\" and \"HvBalloon\" (tidevm's) are",
                    other.unwrap_or("Acpi (the default)")
                ),
            ))
        }
    };
    if m.hotplugged_size.unwrap_or(0) != 0 {
        return Err(unsupported(
            "memory.hotplugged_size",
            "memory plugged at boot; resize with vm.resize after boot",
        ));
    }
    let on = |b: Option<bool>| if b.unwrap_or(false) { "on" } else { "off" };
    let options = format!(
        "size={},hotplug_size={hotplug_size},hotplug_method={method},shared={},hugepages={},prefault={}",
        m.size,
        on(m.shared),
        on(m.hugepages),
        on(m.prefault)
    );
    config::parse_memory(&options).map_err(|e| invalid("memory", e.to_string()))
}

fn map_disks(ch: &ChVmConfig) -> Result<Vec<DiskConfig>> {
    const DISK_DEFAULTS: &[(&str, &str)] = &[
        ("id", ANY),
        ("pci_segment", "0"),
        ("pci_device_id", ANY),
        ("num_queues", "1"),
        ("queue_size", ANY),
        ("sparse", "true"),
        ("image_type", "\"Raw\""),
        ("lock_granularity", ANY),
    ];
    let disks = ch.disks.as_deref().unwrap_or_default();
    disks
        .iter()
        .enumerate()
        .map(|(i, d)| {
            check_other(&format!("disks[{i}]."), &d.other, DISK_DEFAULTS)?;
            let field = format!("disks[{i}].path");
            let path = d
                .path
                .as_deref()
                .ok_or_else(|| invalid(&field, "required"))?;
            Ok(DiskConfig {
                path: config::readable_file("--disk", path)
                    .map_err(|e| invalid(&field, e.to_string()))?,
                readonly: d.readonly.unwrap_or(false),
            })
        })
        .collect()
}

fn map_serial(
    serial: Option<&ChConsoleConfig>,
    console: Option<&ChConsoleConfig>,
) -> Result<SerialConfig> {
    const CONSOLE_DEFAULTS: &[(&str, &str)] =
        &[("id", ANY), ("pci_segment", "0"), ("pci_device_id", ANY)];
    if let Some(c) = console {
        check_other("console.", &c.other, CONSOLE_DEFAULTS)?;
        if !matches!(c.mode.as_str(), "Off" | "Null") {
            return Err(unsupported(
                "console.mode",
                format!("{:?}: tidevm has no virtio-console; use serial", c.mode),
            ));
        }
    }
    let Some(s) = serial else {
        return Ok(SerialConfig::Off);
    };
    check_other("serial.", &s.other, &[])?;
    match (s.mode.as_str(), s.file.as_deref()) {
        ("Tty", _) => Ok(SerialConfig::Tty),
        ("Off" | "Null", _) => Ok(SerialConfig::Off),
        ("File", Some(path)) if !path.is_empty() => Ok(SerialConfig::File(path.into())),
        ("File", _) => Err(invalid("serial.file", "required with mode File")),
        (mode, _) => Err(unsupported(
            "serial.mode",
            format!("{mode:?}: tidevm's serial goes to Tty, File, Off or Null"),
        )),
    }
}

/// The Cloud Hypervisor `VmConfig` of a VM defined on tidevm's command line,
/// for `vm.info`: [`ch_config_to_vm_config`] maps it back to the same VM, but
/// for what Cloud Hypervisor has no field for (the hotplug block and memslot
/// sizes and the balloon statistics period, which `GET /vm/info` reports) and
/// `--on-reboot` (a Cloud Hypervisor VM restarts).
pub fn vm_config_to_ch(c: &VmConfig) -> ChVmConfig {
    let path = |p: &std::path::Path| p.display().to_string();
    let m = &c.memory;
    let hotplug = m.hotplug_size > 0;
    let (mode, file) = match &c.serial {
        SerialConfig::Tty => ("Tty", None),
        SerialConfig::File(p) => ("File", Some(path(p))),
        SerialConfig::Off => ("Off", None),
    };
    ChVmConfig {
        payload: ChPayloadConfig {
            kernel: Some(path(&c.kernel)),
            cmdline: Some(c.cmdline.clone()),
            initramfs: c.initrd.as_deref().map(path),
            other: OtherFields::new(),
        },
        cpus: Some(ChCpusConfig {
            boot_vcpus: u64::from(c.cpus.boot_vcpus),
            max_vcpus: Some(u64::from(c.cpus.boot_vcpus)),
            topology: None,
            other: OtherFields::new(),
        }),
        memory: Some(ChMemoryConfig {
            size: m.size,
            hotplug_size: hotplug.then_some(m.hotplug_size),
            hotplugged_size: None,
            hotplug_method: hotplug.then(|| {
                match m.hotplug_method {
                    config::HotplugMethod::VirtioMem => "VirtioMem",
                    config::HotplugMethod::HvBalloon => "HvBalloon",
                }
                .to_string()
            }),
            shared: Some(m.shared),
            hugepages: Some(m.hugepages),
            prefault: Some(m.prefault),
            other: OtherFields::new(),
        }),
        disks: (!c.disks.is_empty()).then(|| {
            c.disks
                .iter()
                .map(|d| ChDiskConfig {
                    path: Some(path(&d.path)),
                    readonly: Some(d.readonly),
                    other: OtherFields::new(),
                })
                .collect()
        }),
        rng: c.rng.as_ref().map(|r| ChRngConfig {
            src: path(&r.src),
            other: OtherFields::new(),
        }),
        balloon: c.balloon.as_ref().map(|b| ChBalloonConfig {
            size: b.size,
            deflate_on_oom: Some(b.deflate_on_oom),
            free_page_reporting: Some(b.free_page_reporting),
            other: OtherFields::new(),
        }),
        vsock: c.vsock.as_ref().map(|v| ChVsockConfig {
            cid: v.cid,
            socket: path(&v.socket),
            other: OtherFields::new(),
        }),
        serial: Some(ChConsoleConfig {
            mode: mode.to_string(),
            file,
            other: OtherFields::new(),
        }),
        console: Some(ChConsoleConfig {
            mode: "Off".to_string(),
            file: None,
            other: OtherFields::new(),
        }),
        other: OtherFields::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HotplugMethod;
    use serde_json::json as j;

    fn exe() -> String {
        std::env::current_exe().unwrap().display().to_string()
    }

    fn ch(json: Value) -> ChVmConfig {
        serde_json::from_value(json).unwrap()
    }

    fn base() -> Value {
        serde_json::json!({"payload": {"kernel": exe()}})
    }

    fn with(patch: Value) -> Result<VmConfig> {
        let mut v = base();
        for (k, val) in patch.as_object().unwrap() {
            v[k] = val.clone();
        }
        ch_config_to_vm_config(&ch(v))
    }

    fn refused_field(patch: Value) -> String {
        match with(patch).unwrap_err() {
            ChConfigError::Unsupported { field, .. } | ChConfigError::Invalid { field, .. } => {
                field
            }
        }
    }

    #[test]
    fn full_config_maps() {
        let k = exe();
        let c = ch_config_to_vm_config(&ch(serde_json::json!({
            "payload": {"kernel": k, "initramfs": k, "cmdline": "console=ttyS0"},
            "cpus": {"boot_vcpus": 2, "max_vcpus": 2, "nested": true,
                     "topology": {"threads_per_core": 1, "cores_per_die": 2, "dies_per_package": 1, "packages": 1}},
            "memory": {"size": 536870912u64, "hotplug_size": 2147483648u64, "hotplug_method": "VirtioMem",
                       "shared": true, "thp": true, "mergeable": false},
            "disks": [{"path": k, "readonly": true, "id": "d0", "num_queues": 1}],
            "balloon": {"size": 0, "deflate_on_oom": true, "free_page_reporting": true},
            "vsock": {"cid": 3, "socket": "/run/v.sock", "id": "vsock0"},
            "rng": {"src": "/dev/urandom", "iommu": false},
            "serial": {"mode": "Tty"},
            "console": {"mode": "Off"},
            "net": [], "iommu": false, "pvpanic": true
        })))
        .unwrap();
        assert_eq!(c.kernel, PathBuf::from(&k));
        assert_eq!(c.initrd, Some(PathBuf::from(&k)));
        assert_eq!(c.cmdline, "console=ttyS0");
        assert_eq!(c.cpus.boot_vcpus, 2);
        assert_eq!(c.memory.size, 512 << 20);
        assert_eq!(c.memory.hotplug_size, 2 << 30);
        assert_eq!(c.memory.hotplug_method, HotplugMethod::VirtioMem);
        assert!(c.memory.shared && !c.memory.hugepages);
        assert_eq!(
            c.disks,
            vec![DiskConfig {
                path: k.into(),
                readonly: true
            }]
        );
        let b = c.balloon.unwrap();
        assert!(b.deflate_on_oom && b.free_page_reporting && b.size == 0);
        assert_eq!(c.vsock.unwrap().cid, 3);
        assert_eq!(c.rng.unwrap().src, PathBuf::from("/dev/urandom"));
        assert_eq!(c.serial, SerialConfig::Tty);
        assert_eq!(c.on_reboot, RebootAction::Restart);
    }

    #[test]
    fn defaults() {
        let c = with(serde_json::json!({})).unwrap();
        assert_eq!(c.cpus.boot_vcpus, 1);
        assert_eq!(c.memory.size, 512 << 20);
        assert_eq!(c.memory.hotplug_size, 0);
        assert_eq!(c.cmdline, DEFAULT_CMDLINE);
        assert_eq!(c.serial, SerialConfig::Off);
        assert!(c.disks.is_empty() && c.balloon.is_none() && c.vsock.is_none());
        // Acpi is fine when there is nothing to hotplug.
        let c =
            with(serde_json::json!({"memory": {"size": 1073741824u64, "hotplug_method": "Acpi"}}));
        assert_eq!(c.unwrap().memory.size, 1 << 30);
    }

    #[test]
    fn a_command_line_vm_maps_to_a_ch_config_and_back() {
        let k = exe();
        let dir = std::env::temp_dir();
        let args = [
            "--kernel",
            &k,
            "--initrd",
            &k,
            "--cmdline",
            "console=ttyS0 quiet",
            "--cpus",
            "boot=2",
            "--memory",
            "size=256M,hotplug_size=1G,hotplug_method=hv-balloon,shared=on",
            "--disk",
            &format!("path={k},readonly=on"),
            "--disk",
            &format!("path={k}"),
            "--serial",
            &format!("file={}", dir.join("serial.log").display()),
            "--balloon",
            "size=64M,free_page_reporting=on",
            "--vsock",
            "cid=7,socket=/run/v.sock",
            "--rng",
            "src=/dev/urandom",
            "--on-reboot",
            "restart",
        ];
        let crate::config::Command::Run { config: cli, .. } =
            crate::config::parse_args(args.iter().map(|a| a.to_string())).unwrap()
        else {
            panic!("not a VM")
        };
        let value = serde_json::to_value(vm_config_to_ch(&cli)).unwrap();
        assert_eq!(value["payload"]["kernel"], j!(k));
        assert_eq!(value["cpus"], j!({"boot_vcpus": 2, "max_vcpus": 2}));
        assert_eq!(value["memory"]["hotplug_method"], "HvBalloon");
        assert_eq!(value["disks"][0], j!({"path": k, "readonly": true}));
        assert_eq!(value["serial"]["mode"], "File");
        assert_eq!(value["console"], j!({"mode": "Off"}));
        // What vm.info reports, given to vm.create, is the same VM.
        let mut back = ch_config_to_vm_config(&ch(value)).unwrap();
        back.balloon.as_mut().unwrap().stats_period_s = 0;
        let mut expected = *cli;
        expected.balloon.as_mut().unwrap().stats_period_s = 0;
        expected.api_socket = None;
        assert_eq!(back, expected);

        // Without a hotplug region, no method; serial off.
        let crate::config::Command::Run { config: cli, .. } =
            crate::config::parse_args(["--kernel", &k, "--serial", "off"].map(String::from))
                .unwrap()
        else {
            panic!("not a VM")
        };
        let value = serde_json::to_value(vm_config_to_ch(&cli)).unwrap();
        assert_eq!(
            value["memory"],
            j!({"size": 536870912u64, "shared": false, "hugepages": false, "prefault": false})
        );
        assert_eq!(value["serial"], j!({"mode": "Off"}));
        assert!(value.get("disks").is_none() && value.get("balloon").is_none());
        assert_eq!(
            ch_config_to_vm_config(&ch(value)).unwrap().memory,
            cli.memory
        );
    }

    #[test]
    fn hv_balloon_is_a_hotplug_method() {
        let c = with(j!({"memory": {"size": 536870912u64, "hotplug_size": 1073741824u64, "hotplug_method": "HvBalloon"}}))
            .unwrap();
        assert_eq!(c.memory.hotplug_method, HotplugMethod::HvBalloon);
        assert_eq!(c.memory.hotplug_size, 1 << 30);
        // The Dynamic Memory device needs a region to hot-add into.
        assert_eq!(
            refused_field(j!({"memory": {"size": 536870912u64, "hotplug_method": "HvBalloon"}})),
            "memory"
        );
    }

    #[test]
    fn an_rng_source_that_could_block_is_refused() {
        let dir = std::env::temp_dir().join(format!("tidevm-ch-rng-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // Answered at once (a blocking open would wait for a writer for good).
        let e = with(j!({"rng": {"src": fifo.to_str().unwrap()}}));
        let dir_err = with(j!({"rng": {"src": dir.to_str().unwrap()}}));
        let _ = std::fs::remove_dir_all(&dir);
        let e = e.unwrap_err();
        assert!(
            matches!(&e, ChConfigError::Invalid { field, .. } if field == "rng.src"),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("not a regular file or a character device"),
            "{e}"
        );
        assert!(matches!(dir_err, Err(ChConfigError::Invalid { field, .. }) if field == "rng.src"));
    }

    #[test]
    fn refusals_name_the_field() {
        assert_eq!(refused_field(j!({"net": [{"tap": "tap0"}]})), "net");
        assert_eq!(
            refused_field(j!({"fs": [{"tag": "t", "socket": "/s"}]})),
            "fs"
        );
        assert_eq!(refused_field(j!({"pmem": [{"file": "/f"}]})), "pmem");
        assert_eq!(
            refused_field(j!({"devices": [{"path": "/sys/x"}]})),
            "devices"
        );
        assert_eq!(refused_field(j!({"numa": [{"guest_numa_id": 0}]})), "numa");
        assert_eq!(refused_field(j!({"iommu": true})), "iommu");
        assert_eq!(
            refused_field(j!({"payload": {"firmware": "/fw"}})),
            "payload.firmware"
        );
        assert_eq!(refused_field(j!({"payload": {}})), "payload.kernel");
        assert_eq!(
            refused_field(j!({"payload": {"kernel": exe(), "firmware": "/fw"}})),
            "payload.firmware"
        );
        assert_eq!(
            refused_field(j!({"payload": {"kernel": "/nonexistent"}})),
            "payload.kernel"
        );
        assert_eq!(
            refused_field(j!({"cpus": {"boot_vcpus": 2, "max_vcpus": 4}})),
            "cpus.max_vcpus"
        );
        assert_eq!(
            refused_field(j!({"cpus": {"boot_vcpus": 0}})),
            "cpus.boot_vcpus"
        );
        assert_eq!(
            refused_field(j!({"cpus": {"boot_vcpus": 300}})),
            "cpus.boot_vcpus"
        );
        assert_eq!(
            refused_field(
                j!({"cpus": {"boot_vcpus": 2, "topology": {"threads_per_core": 2, "cores_per_die": 1}}})
            ),
            "cpus.topology"
        );
        assert_eq!(
            refused_field(j!({"cpus": {"boot_vcpus": 2, "kvm_hyperv": true}})),
            "cpus.kvm_hyperv"
        );
        assert_eq!(
            refused_field(j!({"memory": {"size": 536870912u64, "hotplug_size": 1073741824u64}})),
            "memory.hotplug_method"
        );
        assert_eq!(
            refused_field(
                j!({"memory": {"size": 536870912u64, "hotplug_size": 1073741824u64, "hotplug_method": "Acpi"}})
            ),
            "memory.hotplug_method"
        );
        assert_eq!(
            refused_field(
                j!({"memory": {"size": 536870912u64, "zones": [{"id": "z", "size": 1}]}})
            ),
            "memory.zones"
        );
        assert_eq!(
            refused_field(j!({"memory": {"size": 536870912u64, "thp": false}})),
            "memory.thp"
        );
        assert_eq!(refused_field(j!({"memory": {"size": 1000}})), "memory");
        assert_eq!(
            refused_field(j!({"disks": [{"readonly": true}]})),
            "disks[0].path"
        );
        assert_eq!(
            refused_field(j!({"disks": [{"path": exe(), "vhost_user": true}]})),
            "disks[0].vhost_user"
        );
        assert_eq!(
            refused_field(j!({"vsock": {"cid": 2, "socket": "/s"}})),
            "vsock.cid"
        );
        let e = with(j!({"vsock": {"cid": 3, "socket": "/nonexistent/dir/v.sock"}})).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vsock.socket: /nonexistent/dir is not a directory"
        );
        // A relative socket is in tidevm's working directory.
        assert!(with(j!({"vsock": {"cid": 3, "socket": "v.sock"}})).is_ok());
        // A readable file that is no kernel is refused at vm.create, not at vm.boot.
        let junk = std::env::temp_dir().join(format!("tidevm-ch-junk-{}", std::process::id()));
        std::fs::write(&junk, b"not a kernel, not even close").unwrap();
        let e = with(j!({"payload": {"kernel": junk.to_str().unwrap()}}));
        let _ = std::fs::remove_file(&junk);
        let e = e.unwrap_err().to_string();
        assert!(
            e.starts_with("payload.kernel: the kernel image is neither an ELF"),
            "{e}"
        );
        assert_eq!(
            refused_field(j!({"rng": {"src": "/nonexistent"}})),
            "rng.src"
        );
        assert_eq!(
            refused_field(j!({"serial": {"mode": "Pty"}})),
            "serial.mode"
        );
        assert_eq!(
            refused_field(j!({"serial": {"mode": "File"}})),
            "serial.file"
        );
        assert_eq!(
            refused_field(j!({"console": {"mode": "Tty"}})),
            "console.mode"
        );
        let e = with(j!({"net": [{"tap": "tap0"}]})).unwrap_err();
        assert!(
            e.to_string().starts_with("net: not supported by tidevm"),
            "{e}"
        );
        assert_eq!(e.status(), 400);
    }
}
