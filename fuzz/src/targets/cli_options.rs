//! Target `cli_options`: the command line (`vmm::config::parse_args`), its
//! `key=value` option parser and size parser.
//!
//! Input: NUL-separated arguments. They are parsed as given, and again
//! with `--kernel /proc/self/exe` (a readable file on every Linux machine)
//! added when they name no kernel, so that the per-flag parsers are
//! reached.
//!
//! Invariants checked:
//! - no panic, no arithmetic overflow;
//! - every error has a message;
//! - an accepted configuration respects the documented limits: 1 to 254
//!   vCPUs, boot memory of at least 64 MiB, page aligned and at most
//!   1 TiB, block size a power of two of at least a page, slot size a
//!   power of two of at least the block size, hotplug size a multiple of
//!   the slot size and at most 1 TiB, a command line under 2048 bytes;
//! - `parse_size` agrees with a model (digits times the suffix's unit,
//!   overflow refused), and `OptionParser` refuses unknown and repeated
//!   keys.

use vmm::config::{parse_args, parse_size, Command, OptionParser, CMDLINE_MAX_SIZE, MAX_VCPUS};

use crate::input::Seed;

fn size_model(s: &str) -> Option<u64> {
    let s = s.trim();
    let (digits, shift) = match s.chars().last()? {
        'K' | 'k' => (&s[..s.len() - 1], 10),
        'M' | 'm' => (&s[..s.len() - 1], 20),
        'G' | 'g' => (&s[..s.len() - 1], 30),
        'T' | 't' => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    digits.parse::<u64>().ok()?.checked_mul(1 << shift)
}

fn check(args: &[String]) {
    match parse_args(args.iter().cloned()) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(Command::Help | Command::Version) => {}
        // Only --api-socket: an empty VMM waiting for vm.create.
        Ok(Command::Serve { socket, .. }) => assert!(!socket.as_os_str().is_empty()),
        Ok(Command::Run { config: c, .. }) => {
            assert!((1..=MAX_VCPUS).contains(&c.cpus.boot_vcpus));
            let m = &c.memory;
            let page = vmm::config::page_size();
            assert!(m.size >= 64 << 20 && m.size % page == 0 && m.size <= 1 << 40);
            assert!(m.block_size.is_power_of_two() && m.block_size >= page);
            assert!(m.slot_size.is_power_of_two() && m.slot_size >= m.block_size);
            assert!(m.hotplug_size % m.slot_size == 0 && m.hotplug_size <= 1 << 40);
            assert!(c.cmdline.len() < CMDLINE_MAX_SIZE);
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut args: Vec<String> = text.split('\0').map(str::to_string).collect();
    if data.is_empty() {
        args.clear();
    }
    check(&args);
    if !args.iter().any(|a| a.starts_with("--kernel")) {
        args.push("--kernel".into());
        args.push("/proc/self/exe".into());
        check(&args);
    }
    for a in &args {
        let value = a.split_once('=').map_or(a.as_str(), |(_, v)| v);
        assert_eq!(
            parse_size(value).ok(),
            size_model(value),
            "parse_size({value:?})"
        );
        const KEYS: &[&str] = &["size", "hotplug_size", "shared"];
        if let Ok(opts) = OptionParser::parse("--fuzz", KEYS, a) {
            let items: Vec<&str> = a.split(',').collect();
            assert!(items.len() <= KEYS.len(), "more items than keys in {a:?}");
            let _ = (
                opts.size("size"),
                opts.toggle("shared"),
                opts.string("hotplug_size"),
            );
        }
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let args = |list: &[&str]| Seed::new().bytes(list.join("\0").as_bytes()).finish();
    vec![
        args(&[
            "--memory",
            "size=1G,hotplug_size=4G,block_size=2M,slot_size=128M",
        ]),
        args(&["--cpus=boot=4", "--memory", "512M", "--serial", "off"]),
        args(&[
            "--balloon",
            "size=64M,deflate_on_oom=on,free_page_reporting=on,stats_period=5",
        ]),
        args(&["--memory", "size=16T"]),
        args(&[
            "--cmdline",
            "console=ttyS0",
            "--on-reboot",
            "restart",
            "--api-socket",
            "/tmp/x",
        ]),
        args(&["--memory", "size=1G,size=2G"]),
        args(&["--help"]),
    ]
}
