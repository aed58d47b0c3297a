//! The seccomp filters on the local /dev/kvm with a tiny 64-bit guest (a
//! few bytes of code in an ELF "kernel"): a forbidden system call from
//! each kind of thread ends tidevm naming it, and a run with the filters on
//! that builds every device, drives the API (tidevm's own and the Cloud
//! Hypervisor API, from an empty start to `vmm.shutdown`) and reboots the
//! VM ends cleanly.
//!
//! `cargo test` builds tidevm with debug assertions, which is what enables
//! the test hook `TIDEVM_TEST_SECCOMP_VIOLATION` (see `vmm::seccomp`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use api_server::client::request;

/// tidevm's exit status after a forbidden system call.
const SECCOMP_EXIT: i32 = 159;

const MIB: u64 = 1 << 20;

/// Guest code: write "OK\n" to COM1, then either power off through the
/// ACPI sleep control port (S5) or halt for good (the API ends the run).
fn guest_code(power_off: bool) -> Vec<u8> {
    let mut code = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    for b in b"OK\n" {
        code.extend([0xb0, *b, 0xee]); // mov al, b; out dx, al
    }
    if power_off {
        code.extend([0x66, 0xba, 0x00, 0x06]); // mov dx, 0x600
        code.extend([0xb0, 0x34, 0xee]); // mov al, SLP_EN | S5 << 2; out dx, al
    }
    code.extend([0xf4, 0xeb, 0xfd]); // hlt; jmp hlt
    code
}

/// A minimal ELF64 executable: one PT_LOAD segment at 1 MiB whose entry
/// point is `code`, which tidevm runs in 64-bit mode.
fn tiny_kernel(code: &[u8]) -> Vec<u8> {
    const BASE: u64 = 0x10_0000;
    const EHSIZE: u16 = 64;
    const PHSIZE: u16 = 56;
    let offset = u64::from(EHSIZE + PHSIZE);
    let size = offset + code.len() as u64;
    let mut elf = Vec::new();
    elf.extend(b"\x7fELF");
    elf.extend([2, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0]); // 64-bit, LE, v1
    elf.extend(2u16.to_le_bytes()); // ET_EXEC
    elf.extend(0x3eu16.to_le_bytes()); // x86_64
    elf.extend(1u32.to_le_bytes());
    elf.extend((BASE + offset).to_le_bytes()); // entry
    elf.extend(u64::from(EHSIZE).to_le_bytes()); // phoff
    elf.extend(0u64.to_le_bytes()); // shoff
    elf.extend(0u32.to_le_bytes()); // flags
    for v in [EHSIZE, PHSIZE, 1, 64, 0, 0] {
        elf.extend(v.to_le_bytes());
    }
    elf.extend(1u32.to_le_bytes()); // PT_LOAD
    elf.extend(5u32.to_le_bytes()); // R+X
    for v in [0, BASE, BASE, size, size, 0x1000] {
        elf.extend(v.to_le_bytes());
    }
    elf.extend(code);
    elf
}

/// A fresh directory with the two tiny kernels and a 1 MiB disk.
struct Work {
    dir: PathBuf,
}

impl Work {
    fn new(name: &str) -> Self {
        let dir =
            std::env::temp_dir().join(format!("tidevm-seccomp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("poweroff.elf"), tiny_kernel(&guest_code(true))).unwrap();
        std::fs::write(dir.join("halt.elf"), tiny_kernel(&guest_code(false))).unwrap();
        std::fs::write(dir.join("disk.img"), vec![0u8; 1 << 20]).unwrap();
        Self { dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.join(name).to_str().unwrap().to_string()
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn kvm_available() -> bool {
    if Path::new("/dev/kvm").exists() {
        return true;
    }
    eprintln!("/dev/kvm absent: skipping");
    false
}

fn tidevm(args: &[String], violation: Option<&str>) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tidevm"));
    cmd.args(args)
        .env_remove("RUST_BACKTRACE")
        .env_remove("TIDEVM_TEST_SECCOMP_VIOLATION")
        .stdin(Stdio::null());
    if let Some(kind) = violation {
        cmd.env("TIDEVM_TEST_SECCOMP_VIOLATION", kind);
    }
    cmd
}

/// Runs tidevm to its end, for at most a minute.
fn run(mut cmd: Command) -> Output {
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait(child, Duration::from_secs(60))
}

fn wait(mut child: Child, limit: Duration) -> Output {
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "tidevm did not end within {limit:?}; stderr: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A VM with a console file and an API socket, whose guest powers off.
fn poweroff_args(work: &Work, seccomp: &str) -> Vec<String> {
    [
        "--kernel",
        &work.path("poweroff.elf"),
        "--memory",
        "size=64M",
        "--serial",
        &format!("file={}", work.path("console.txt")),
        "--api-socket",
        &work.path("api.sock"),
        "--seccomp",
        seccomp,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

#[test]
fn a_forbidden_call_from_each_kind_of_thread_ends_tidevm_naming_thread_and_call() {
    if !kvm_available() {
        return;
    }
    let work = Work::new("violation");
    for (kind, thread) in [
        ("vmm", "tidevm"),
        ("vcpu", "tidevm-vcpu0"),
        ("api", "tidevm-api"),
    ] {
        let out = run(tidevm(&poweroff_args(&work, "true"), Some(kind)));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(SECCOMP_EXIT), "{kind}: {err}");
        let expected = format!(
            "tidevm: seccomp: thread '{thread}' made a forbidden system call 110 (getppid)\n"
        );
        assert!(
            err.contains(&expected),
            "{kind}: '{err}' lacks '{expected}'"
        );
        // The vCPU thread is stopped before the guest runs a single instruction.
        if kind == "vcpu" {
            assert_eq!(std::fs::read(work.dir.join("console.txt")).unwrap(), b"");
        }
    }
}

#[test]
fn without_filters_or_in_log_mode_the_same_call_goes_through() {
    if !kvm_available() {
        return;
    }
    let work = Work::new("permissive");
    for mode in ["false", "log"] {
        for kind in ["vmm", "vcpu", "api"] {
            let out = run(tidevm(&poweroff_args(&work, mode), Some(kind)));
            let err = stderr(&out);
            assert_eq!(out.status.code(), Some(0), "{mode} {kind}: {err}");
            assert!(!err.contains("seccomp: thread"), "{mode} {kind}: {err}");
            assert_eq!(
                std::fs::read(work.dir.join("console.txt")).unwrap(),
                b"OK\n",
                "{mode} {kind}"
            );
        }
    }
}

#[test]
fn with_filters_a_vm_without_api_socket_runs_to_its_power_off() {
    // The first thread tidevm starts is then a vCPU, after the main
    // thread's filter: glibc's first pthread_create runs under it.
    if !kvm_available() {
        return;
    }
    let work = Work::new("no-api");
    let args: Vec<String> = [
        "--kernel",
        &work.path("poweroff.elf"),
        "--memory",
        "size=64M,hotplug_size=128M",
        "--cpus",
        "2",
        "--disk",
        &format!("path={}", work.path("disk.img")),
        "--rng",
        "src=/dev/urandom",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let out = run(tidevm(&args, None));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert_eq!(out.stdout, b"OK\n", "{err}");
}

fn api(socket: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, serde_json::Value) {
    let (status, text) =
        request(socket, method, path, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"));
    let json = if text.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: {e}: {text}"))
    };
    (status, json)
}

fn wait_for_socket(socket: &Path, child: &mut Child) {
    let up = wait_until(|| {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("tidevm ended at start: {status}");
        }
        request(socket, "GET", "/api/v1/vmm.ping", None).is_ok()
    });
    assert!(up, "no API socket");
}

/// Waits until `GET /vm/info` (or `vm.info`) reports `state`.
fn wait_for_state(socket: &Path, path: &str, state: &str) {
    let mut last = String::new();
    let reached = wait_until(|| {
        let (status, info) = api(socket, "GET", path, None);
        last = format!("{status} {info}");
        status == 200 && info["state"] == state
    });
    assert!(reached, "{path}: still {last}");
}

/// Polls `done` every 20 ms for up to 30 s; whether it came true.
fn wait_until(mut done: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while !done() {
        if start.elapsed() >= Duration::from_secs(30) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

#[test]
fn with_filters_on_every_device_the_api_and_a_reboot_work() {
    if !kvm_available() {
        return;
    }
    let work = Work::new("api");
    let socket = work.dir.join("api.sock");
    let mut child = tidevm(
        &[
            "--api-socket".to_string(),
            socket.to_str().unwrap().to_string(),
        ],
        None,
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    wait_for_socket(&socket, &mut child);

    let config = serde_json::json!({
        "payload": {"kernel": work.path("halt.elf"), "cmdline": "console=ttyS0"},
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {"size": 64 * MIB, "hotplug_size": 1024 * MIB, "hotplug_method": "VirtioMem",
                   "shared": true},
        "disks": [{"path": work.path("disk.img")}],
        "balloon": {"size": 0, "free_page_reporting": true},
        "vsock": {"cid": 3, "socket": work.path("vsock.sock")},
        "rng": {"src": "/dev/urandom"},
        "serial": {"mode": "File", "file": work.path("console.txt")},
        "console": {"mode": "Off"},
    });
    let (status, body) = api(
        &socket,
        "PUT",
        "/api/v1/vm.create",
        Some(&config.to_string()),
    );
    assert_eq!(status, 204, "{body}");
    let (status, body) = api(&socket, "PUT", "/api/v1/vm.boot", None);
    assert_eq!(status, 204, "{body}");
    wait_for_state(&socket, "/api/v1/vm.info", "Running");

    let (status, memory) = api(&socket, "GET", "/vm/memory", None);
    assert_eq!(status, 200, "{memory}");
    assert_eq!(memory["boot_size"], 64 * MIB);
    let resize = format!(r#"{{"requested_size": {}}}"#, 64 * MIB + 256 * MIB);
    let (status, body) = api(&socket, "PUT", "/vm/memory", Some(&resize));
    assert_eq!(status, 204, "{body}");
    let (_, memory) = api(&socket, "GET", "/vm/memory", None);
    assert_eq!(memory["requested_size"], 64 * MIB + 256 * MIB);
    let (status, body) = api(&socket, "PUT", "/vm/balloon", Some(r#"{"size": 4194304}"#));
    assert_eq!(status, 204, "{body}");
    let (status, counters) = api(&socket, "GET", "/vm/counters", None);
    assert_eq!(status, 200, "{counters}");
    for device in ["virtio-mem", "balloon", "disk0", "vsock", "rng"] {
        assert!(counters.get(device).is_some(), "{device} in {counters}");
    }
    let (status, counters) = api(&socket, "GET", "/api/v1/vm.counters", None);
    assert_eq!(status, 200, "{counters}");

    // A reboot builds a fresh VM on the filtered main thread, and its
    // guest runs (the console file is truncated per boot: wait for the
    // new guest's line before shutting it down).
    let (status, body) = api(&socket, "PUT", "/api/v1/vm.reboot", None);
    assert_eq!(status, 204, "{body}");
    wait_for_state(&socket, "/api/v1/vm.info", "Running");
    let console = work.dir.join("console.txt");
    assert!(
        wait_until(|| std::fs::read(&console).unwrap_or_default() == b"OK\n"),
        "the rebooted guest never wrote its console line"
    );
    let (status, body) = api(&socket, "PUT", "/api/v1/vm.shutdown", None);
    assert_eq!(status, 204, "{body}");
    wait_for_state(&socket, "/api/v1/vm.info", "Shutdown");
    let (status, body) = api(&socket, "PUT", "/api/v1/vmm.shutdown", None);
    assert_eq!(status, 204, "{body}");

    let out = wait(child, Duration::from_secs(30));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(!err.contains("seccomp"), "{err}");
    // Shutting down left the rebooted guest's console as it was.
    assert_eq!(std::fs::read(&console).unwrap(), b"OK\n");
}
