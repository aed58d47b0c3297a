//! End-to-end test support: guest assets, a running `tidevm` with its
//! serial console and API, and what the host sees of it (RSS).
//!
//! The tests need a `/dev/kvm` that boots Linux. `tools/test` runs them
//! inside the nested harness when the local one cannot, and sets
//! `TIDEVM_E2E=1`; run directly, they stop with a message saying so.

use std::io::{BufRead, BufReader, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub use api_server::client;
use vsock_probe::{write_pattern, Fnv};

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("repo root")
        .to_path_buf()
}

/// Fails the test unless it runs under `tools/test`.
pub fn require_e2e() {
    assert!(
        std::env::var_os("TIDEVM_E2E").is_some(),
        "end-to-end tests boot real guests and need a /dev/kvm that can: run them with tools/test"
    );
}

/// The tidevm binary under test.
pub fn tidevm_bin() -> PathBuf {
    std::env::var_os("TIDEVM_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/release/tidevm"))
}

/// The static guest-side vsock tool (`tests/guest/vsock-probe`), built by
/// `tools/test`.
pub fn vsock_probe() -> PathBuf {
    let path = std::env::var_os("TIDEVM_VSOCK_PROBE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/x86_64-unknown-linux-gnu/release/vsock-probe"));
    assert!(
        path.exists(),
        "{} is missing: tools/test builds it statically",
        path.display()
    );
    path
}

/// Guest assets built by `tools/guest-assets`.
pub fn asset(name: &str) -> PathBuf {
    let path = repo_root().join("build/assets").join(name);
    assert!(
        path.exists(),
        "{} is missing: run tools/guest-assets",
        path.display()
    );
    path
}

/// A writable directory for this test's files (sockets, disk copies).
pub fn work_dir(test: &str) -> PathBuf {
    let base = std::env::var_os("TIDEVM_E2E_WORK")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("build/e2e-work"));
    let dir = base.join(test);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create work dir");
    dir
}

/// Builds an initramfs that runs `scenario` (a shell script) as the
/// guest's workload, then reboots. Cached by content.
pub fn initramfs(work: &Path, scenario: &str) -> PathBuf {
    initramfs_with(work, scenario, &[])
}

/// [`initramfs`] with extra host files: `(source, absolute guest path)`.
pub fn initramfs_with(work: &Path, scenario: &str, extra: &[(&Path, &str)]) -> PathBuf {
    let script = work.join("scenario.sh");
    std::fs::write(&script, scenario).expect("write scenario");
    let out = work.join("initramfs.cpio.gz");
    let mut cmd = Command::new(repo_root().join("tools/guest-assets"));
    cmd.args(["initramfs", "--scenario"])
        .arg(&script)
        .arg("--out")
        .arg(&out);
    for (src, dest) in extra {
        cmd.arg("--add").arg(format!("{}:{dest}", src.display()));
    }
    let status = cmd.status().expect("run tools/guest-assets");
    assert!(status.success(), "tools/guest-assets initramfs failed");
    out
}

/// A running tidevm whose serial console is read line by line.
pub struct Vm {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Arc<(Mutex<Vec<String>>, Condvar)>,
    stderr: Arc<Mutex<Vec<String>>>,
    /// API socket, when one was asked for.
    pub api_socket: Option<PathBuf>,
    /// When tidevm was started.
    pub started: Instant,
}

/// Default kernel command line for test guests.
pub const TEST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 quiet loglevel=4";

impl Vm {
    /// Starts `tidevm` with `args` (serial console on its stdout).
    pub fn start(args: &[String], api_socket: Option<PathBuf>) -> Vm {
        let mut cmd = Command::new(tidevm_bin());
        cmd.args(args)
            .env("TIDEVM_LOG", "info")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(sock) = &api_socket {
            cmd.arg("--api-socket").arg(sock);
        }
        let mut child = cmd.spawn().expect("start tidevm");
        let lines: Arc<(Mutex<Vec<String>>, Condvar)> = Arc::default();
        let stdout = child.stdout.take().expect("stdout");
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line)
                    .trim_end_matches('\r')
                    .to_string();
                eprintln!("guest| {line}");
                let (lock, cv) = &*sink;
                lock.lock().unwrap().push(line);
                cv.notify_all();
            }
        });
        let stderr_lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let stderr = child.stderr.take().expect("stderr");
        let sink = stderr_lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("tidevm| {line}");
                sink.lock().unwrap().push(line);
            }
        });
        let stdin = child.stdin.take();
        Vm {
            child,
            stdin,
            lines,
            stderr: stderr_lines,
            api_socket,
            started: Instant::now(),
        }
    }

    /// Waits for a console line containing `needle`; returns the line.
    /// Lines before `from` (an index into the console) are skipped.
    pub fn wait_for_from(&self, from: usize, needle: &str, timeout: Duration) -> (usize, String) {
        let deadline = Instant::now() + timeout;
        let (lock, cv) = &*self.lines;
        let mut lines = lock.lock().unwrap();
        loop {
            if let Some((i, l)) = lines
                .iter()
                .enumerate()
                .skip(from)
                .find(|(_, l)| l.contains(needle))
            {
                return (i, l.clone());
            }
            let now = Instant::now();
            if now >= deadline {
                drop(lines);
                panic!(
                    "timed out after {timeout:?} waiting for console line '{needle}'; stderr:\n{}\n{}",
                    self.stderr(),
                    self.hang_report()
                );
            }
            lines = cv.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// Waits for a console line containing `needle`.
    pub fn wait_for(&self, needle: &str, timeout: Duration) -> String {
        self.wait_for_from(0, needle, timeout).1
    }

    /// Number of console lines so far.
    pub fn line_count(&self) -> usize {
        self.lines.0.lock().unwrap().len()
    }

    /// The value of the first `KEY=VALUE` console line after `from`.
    pub fn value_from(&self, from: usize, key: &str, timeout: Duration) -> (usize, String) {
        let prefix = format!("{key}=");
        let (i, line) = self.wait_for_from(from, &prefix, timeout);
        let value = line
            .split_once(&prefix)
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default();
        (i, value)
    }

    /// Sends a line to the guest's serial console.
    pub fn send(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin open");
        stdin.write_all(line.as_bytes()).unwrap();
        stdin.write_all(b"\n").unwrap();
        stdin.flush().unwrap();
    }

    /// Sends a command to the guest and returns the `KEY=VALUE` answer.
    pub fn ask(&mut self, command: &str, key: &str, timeout: Duration) -> String {
        let from = self.line_count();
        self.send(command);
        self.value_from(from, key, timeout).1
    }

    /// What tidevm is doing, for a test that timed out waiting on the
    /// guest: each thread's name, scheduler state, kernel wait channel and
    /// current system call (from /proc), and the device counters when the
    /// API answers. Tells a guest that is slow from a VMM that is stuck.
    pub fn hang_report(&self) -> String {
        let pid = self.child.id();
        let mut out = format!("tidevm (pid {pid}) threads: name state wchan syscall\n");
        let tasks = std::fs::read_dir(format!("/proc/{pid}/task"))
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .collect::<Vec<_>>()
            })
            .unwrap_or_default();
        for task in tasks {
            let read = |f: &str| {
                std::fs::read_to_string(task.join(f))
                    .unwrap_or_default()
                    .trim()
                    .to_string()
            };
            let stat = read("stat");
            // The state follows the parenthesised name, which may hold spaces.
            let state = stat
                .rsplit_once(") ")
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .unwrap_or("?")
                .to_string();
            let syscall = read("syscall");
            let nr = syscall.split_whitespace().next().unwrap_or("?");
            out += &format!("  {} {state} {} {nr}\n", read("comm"), read("wchan"));
        }
        if let Some(sock) = &self.api_socket {
            match client::request(sock, "GET", "/vm/counters", None) {
                Ok((status, body)) => out += &format!("GET /vm/counters -> {status}: {body}\n"),
                Err(e) => out += &format!("GET /vm/counters failed: {e}\n"),
            }
        }
        out
    }

    /// Everything tidevm wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    /// Waits for tidevm to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait tidevm") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "tidevm did not exit within {timeout:?}; stderr:\n{}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Kills tidevm with SIGKILL (no chance to clean up) and reaps it.
    pub fn kill(&mut self) -> ExitStatus {
        self.child.kill().expect("SIGKILL tidevm");
        self.child.wait().expect("reap tidevm")
    }

    /// tidevm's resident set size in bytes.
    pub fn rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("read status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .expect("VmRSS")
            * 1024
    }

    /// An API call: `(status, body)`.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let sock = self
            .api_socket
            .as_ref()
            .expect("VM started without an API socket");
        client::request(sock, method, path, body).expect("API request")
    }

    /// An API call expected to succeed with a JSON body.
    pub fn api_json(&self, method: &str, path: &str) -> serde_json::Value {
        let (status, body) = self.api(method, path, None);
        assert_eq!(status, 200, "{method} {path}: {body}");
        serde_json::from_str(&body).expect("JSON body")
    }

    /// Waits for the API socket to accept requests.
    pub fn wait_api(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let sock = self.api_socket.as_ref().expect("no API socket");
        while client::request(sock, "GET", "/vm/info", None).is_err() {
            assert!(
                Instant::now() < deadline,
                "API socket never answered; stderr:\n{}",
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            record_unrequested_guest_reset(&self.stderr());
        }
    }
}

/// How many times tidevm must have raised one interrupt again, the guest
/// acknowledging none of them, before a failing test counts the guest as
/// stopped (16: tidevm re-raises once a second and logs the 16th time).
const IGNORED_INTERRUPTS: u64 = 16;

/// From tidevm's "raised it again (N times so far)" log line: N, else 0.
fn ignored_interrupts(line: &str) -> u64 {
    line.split_once("raised it again (")
        .and_then(|(_, rest)| rest.split_once(" times so far)"))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or(0)
}

/// The line tidevm logs when a vCPU reports KVM_EXIT_SHUTDOWN.
const GUEST_TRIPLE_FAULT: &str = "guest triple fault";

/// Where a failing test's guest resets are recorded for `tools/test`:
/// one file per test, named after the test, holding tidevm's log lines of
/// the resets.
pub const GUEST_RESETS_DIR: &str = "guest-resets";

/// Called when a test fails with a VM still held: if tidevm saw the guest
/// triple-fault (KVM_EXIT_SHUTDOWN, a reset the test did not ask for), or
/// the guest leave one interrupt unacknowledged through 16 re-raises (a
/// guest that stopped taking interrupts: its vsock stream stalls with the
/// device waiting on it), writes the evidence to
/// `$TIDEVM_E2E_WORK/guest-resets/<test>`.
///
/// In the nested harness, KVM under QEMU's TCG-emulated SVM resets guests
/// now and then while their memory is discarded, under tidevm and QEMU
/// alike (docs/benchmarks.md, "Issue 10"); `tools/test` reruns such a
/// test once, says so in its log, and fails it if it fails again.
fn record_unrequested_guest_reset(stderr: &str) {
    let resets: Vec<&str> = stderr
        .lines()
        .filter(|l| {
            l.contains(GUEST_TRIPLE_FAULT)
                || l.contains("triple fault, state")
                || ignored_interrupts(l) >= IGNORED_INTERRUPTS
        })
        .collect();
    let (Some(base), Some(test)) = (
        std::env::var_os("TIDEVM_E2E_WORK"),
        std::thread::current().name().map(str::to_owned),
    ) else {
        return;
    };
    if resets.is_empty() || test == "main" {
        return;
    }
    let dir = PathBuf::from(base).join(GUEST_RESETS_DIR);
    if std::fs::create_dir_all(&dir).is_ok() {
        let _ = std::fs::write(dir.join(test), resets.join("\n") + "\n");
    }
}

/// Polls `f` until it returns `Some`, or panics with `what` after `timeout`.
pub fn poll<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?}: {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// tidevm arguments booting the guest `kernel` asset with `initrd` and the
/// test command line, followed by `extra`.
pub fn guest_args(kernel: &str, initrd: &Path, extra: &[&str]) -> Vec<String> {
    let mut list = args(&["--kernel", asset(kernel).to_str().unwrap(), "--initrd"]);
    list.push(initrd.display().to_string());
    list.extend(args(&["--cmdline", TEST_CMDLINE]));
    list.extend(args(extra));
    list
}

/// Turns `&str`s into the `Vec<String>` `Vm::start` takes.
pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// MiB.
pub const MIB: u64 = 1 << 20;
/// GiB.
pub const GIB: u64 = 1 << 30;

/// A guest that answers commands on its console, one per line:
/// `mem` → `MEMTOTAL_KB=`; `fill NAME N` → writes (touches) an N MiB tmpfs
/// file (`FILLED=` its size); `drop NAME` → deletes it (`DROPPED=`);
/// `blocks` → online memory blocks (`ONLINE_BLOCKS=`); `vmemfeatures` →
/// the virtio-mem device's negotiated feature bits, bit 0 first
/// (`VIRTIO_MEM_FEATURES=`); `dmesg REGEX` → kernel log lines matching
/// (`DMESG_COUNT=`); `node0blocks` → online memory blocks of NUMA node 0
/// (`NODE0_BLOCKS=`); `busy` → starts a loop that prints `M=<MemTotal>`
/// every 0.2 s, keeping the console and the scheduler busy (`BUSY=` its
/// pid); `rfill NAME N` → an N MiB tmpfs file of random bytes
/// (`RFILLED=` its md5); `sum NAME` → a file's md5 (`SUM=`); `hvstat KEY`
/// → a field of hv_balloon's debugfs file, e.g. `pages_ballooned`
/// (`HVSTAT=`); `hvreload` → reloads hv_balloon, or, the module being
/// permanent, unbinds and rebinds its device (`HVRELOAD=` how); `reboot`.
/// It prints `READY=1` when it starts listening.
pub const INTERACTIVE: &str = r#"
stty -echo 2>/dev/null
mkdir -p /dev/shm
mount -t tmpfs -o size=16G tmpfs /dev/shm
kv READY 1
while read -r cmd a b; do
  case "$cmd" in
    mem) kv MEMTOTAL_KB "$(awk '/^MemTotal/ {print $2}' /proc/meminfo)" ;;
    fill) dd if=/dev/zero of="/dev/shm/$a" bs=1M count="$b" 2>/dev/null; kv FILLED "$(du -m "/dev/shm/$a" | cut -f1)" ;;
    drop) rm -f "/dev/shm/$a"; kv DROPPED "$a" ;;
    blocks) kv ONLINE_BLOCKS "$(cat /sys/devices/system/memory/memory*/state | grep -c online)" ;;
    vmemfeatures) for d in /sys/bus/virtio/devices/*; do
        [ "$(cat "$d/device")" = 0x0018 ] && kv VIRTIO_MEM_FEATURES "$(cat "$d/features")"
      done ;;
    dmesg) kv DMESG_COUNT "$(dmesg | grep -c -- "$a")" ;;
    node0blocks) kv NODE0_BLOCKS "$(cat /sys/devices/system/node/node0/memory*/state | grep -c online)" ;;
    busy) ( while :; do kv M "$(awk '/^MemTotal/ {print $2}' /proc/meminfo)"; sleep 0.2; done ) &
          kv BUSY $! ;;
    rfill) dd if=/dev/urandom of="/dev/shm/$a" bs=1M count="$b" 2>/dev/null
           kv RFILLED "$(md5sum < "/dev/shm/$a" | cut -d' ' -f1)" ;;
    sum) kv SUM "$(md5sum < "/dev/shm/$a" | cut -d' ' -f1)" ;;
    hvstat) grep -q " /sys/kernel/debug " /proc/mounts || mount -t debugfs none /sys/kernel/debug
            kv HVSTAT "$(awk -F: -v k="$a" '$1 ~ "^"k" *$" {gsub(/ /, "", $2); print $2}' /sys/kernel/debug/hv-balloon)" ;;
    hvreload) if rmmod hv_balloon 2>/dev/null; then insmod /lib/modules/hv_balloon.ko; kv HVRELOAD rmmod
              else drv=/sys/bus/vmbus/drivers/hv_balloon
                for d in "$drv"/*-*; do n=${d##*/}; echo "$n" > "$drv/unbind"; echo "$n" > "$drv/bind"; done
                kv HVRELOAD rebind; fi ;;
    reboot) reboot -f ;;
  esac
done
"#;

/// How long the memory tests wait for a guest to converge on a new size.
pub const CONVERGE: Duration = Duration::from_secs(180);

/// Boots the [`INTERACTIVE`] guest (2 vCPUs, `--memory MEMORY`, then
/// `extra`) with an API socket in the test's work directory, and waits
/// for the API.
pub fn start_interactive(test: &str, memory: &str, extra: &[&str]) -> Vm {
    require_e2e();
    let work = work_dir(test);
    let initrd = initramfs(&work, INTERACTIVE);
    let mut list = guest_args("vmlinux", &initrd, &["--cpus", "2", "--memory", memory]);
    list.extend(args(extra));
    let vm = Vm::start(&list, Some(work.join("api.sock")));
    vm.wait_api(Duration::from_secs(30));
    vm
}

/// Waits until the [`INTERACTIVE`] guest's MemTotal satisfies `ok`;
/// returns it.
pub fn wait_memtotal(vm: &mut Vm, what: &str, ok: impl Fn(u64) -> bool) -> u64 {
    poll(what, CONVERGE, || {
        let kib = ask_u64(vm, "mem", "MEMTOTAL_KB");
        ok(kib).then_some(kib)
    })
}

/// Has the [`INTERACTIVE`] guest write `mib` MiB of a tmpfs file `name`
/// (pages it has likely never touched); returns the size it reports.
///
/// Touching memory for the first time is the slowest thing a guest does in
/// the nested harness (each page faults through two levels of emulated
/// nested paging: 2 to 5 MiB/s has been seen), so the hang guard grows
/// with the size instead of being one fixed timeout.
pub fn fill(vm: &mut Vm, name: &str, mib: u64) -> u64 {
    let guard = Duration::from_secs(120 + mib);
    let v = vm.ask(&format!("fill {name} {mib}"), "FILLED", guard);
    v.parse()
        .unwrap_or_else(|_| panic!("FILLED={v} is not a number"))
}

/// Reads a `KEY=number` answer to `command`.
pub fn ask_u64(vm: &mut Vm, command: &str, key: &str) -> u64 {
    let v = vm.ask(command, key, Duration::from_secs(120));
    v.parse()
        .unwrap_or_else(|_| panic!("{key}={v} is not a number"))
}

/// How long a vsock stream may go without a byte before a test gives up.
pub const STREAM_STALL: Duration = Duration::from_secs(120);

/// Connects to guest `port` through tidevm's hybrid vsock socket: the
/// stream after `OK <host_port>\n` and the host port. `Err` holds what the
/// device sent before closing: empty for a refusal (nobody listens on
/// `port`); or, in words, why there was no answer at all (no socket yet,
/// no answer within 30 s). Reads on the stream time out after
/// [`STREAM_STALL`].
pub fn vsock_connect(socket: &Path, port: u32) -> Result<(UnixStream, u32), String> {
    let mut s = UnixStream::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("cannot send CONNECT {port}: {e}"))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match s.read(&mut byte) {
            Ok(0) => return Err(String::from_utf8_lossy(&line).into_owned()),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) => line.push(byte[0]),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("no answer to CONNECT {port}: {e}")),
        }
    }
    let line = String::from_utf8(line).expect("ASCII answer");
    let host_port = line
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("unexpected answer {line:?}"));
    // A stalled stream fails the test rather than hanging it, both ways.
    s.set_read_timeout(Some(STREAM_STALL)).unwrap();
    s.set_write_timeout(Some(STREAM_STALL)).unwrap();
    Ok((s, host_port))
}

/// The vsock port `sandbox-agent` listens on.
pub const AGENT_PORT: u32 = 1024;

/// The sandbox guest's agent (`tests/guest/sandbox-agent`, in
/// `initramfs-sandbox.cpio.gz`), reached through tidevm's hybrid vsock
/// socket: one connection per request.
pub struct Agent {
    /// The hybrid vsock socket (`--vsock ...,socket=PATH`).
    pub socket: PathBuf,
}

impl Agent {
    /// Opens a connection to the agent and sends one command line.
    pub fn request(&self, line: &str) -> Result<UnixStream, String> {
        let (mut s, _) = vsock_connect(&self.socket, AGENT_PORT)?;
        s.write_all(format!("{line}\n").as_bytes())
            .map_err(|e| format!("cannot send {line:?}: {e}"))?;
        Ok(s)
    }

    /// `PING`: whether the agent answered `PONG`.
    pub fn ping(&self) -> Result<(), String> {
        let mut s = self.request("PING")?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .map_err(|e| format!("PING: {e}"))?;
        if answer == "PONG\n" {
            Ok(())
        } else {
            Err(format!("PING answered {answer:?}"))
        }
    }

    /// `RUN command`: everything the command printed.
    pub fn run(&self, command: &str) -> String {
        let mut s = self
            .request(&format!("RUN {command}"))
            .unwrap_or_else(|e| panic!("RUN {command}: {e}"));
        let mut out = String::new();
        s.read_to_string(&mut out)
            .unwrap_or_else(|e| panic!("RUN {command}: {e}"));
        out
    }

    /// The guest's MemTotal in KiB, as the agent reads it.
    pub fn memtotal_kib(&self) -> u64 {
        let out = self.run("grep MemTotal /proc/meminfo");
        out.split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("MemTotal line {out:?}"))
    }

    /// `SINK`: sends `len` pattern bytes and returns the agent's answer
    /// (`BYTES=<n> SUM=<fnv>`) and the checksum of what was sent; `Err`
    /// says where the stream stopped.
    pub fn sink(&self, len: u64) -> Result<(String, u64), String> {
        let mut s = self.request("SINK")?;
        let sum = write_pattern(&mut s, len).map_err(|e| format!("SINK: sending failed: {e}"))?;
        s.shutdown(std::net::Shutdown::Write)
            .map_err(|e| format!("SINK: shutdown failed: {e}"))?;
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .map_err(|e| format!("SINK: no answer: {e}"))?;
        Ok((answer.trim().to_string(), sum))
    }

    /// `SOURCE len`: the number of bytes received and their checksum;
    /// `Err` says where the stream stopped.
    pub fn source(&self, len: u64) -> Result<(u64, u64), String> {
        let mut s = self.request(&format!("SOURCE {len}"))?;
        try_read_summing(&mut s)
            .map_err(|(got, e)| format!("SOURCE: read failed after {got} bytes: {e}"))
    }
}

/// Reads `from` to its end: the number of bytes and their checksum, or
/// the bytes read before an error and the error.
pub fn try_read_summing(from: &mut impl Read) -> Result<(u64, u64), (u64, std::io::Error)> {
    let mut sum = Fnv::default();
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok((got, sum.value())),
            Ok(n) => {
                sum.update(&buf[..n]);
                got += n as u64;
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err((got, e)),
        }
    }
}

/// Reads `from` to its end: the number of bytes and their checksum.
/// Panics, naming `what`, on a read error.
pub fn read_summing(from: &mut impl Read, what: &str) -> (u64, u64) {
    try_read_summing(from)
        .unwrap_or_else(|(got, e)| panic!("{what}: read failed after {got} bytes: {e}"))
}

/// Writes `len` pattern bytes; returns their checksum.
pub fn send_pattern(to: &mut impl Write, len: u64) -> u64 {
    write_pattern(to, len).expect("send pattern bytes")
}

/// Prints a measurement and appends it to `report.txt` in `work` (the
/// output of passing tests is not shown; the file stays).
pub fn report(work: &Path, line: &str) {
    eprintln!("{line}");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(work.join("report.txt"))
        .expect("open report.txt");
    writeln!(f, "{line}").expect("write report.txt");
}

/// MiB per second.
pub fn mib_per_s(bytes: u64, t: Duration) -> f64 {
    bytes as f64 / MIB as f64 / t.as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn re_raise_counts_are_read_from_tidevm_log_lines() {
        let line = "[tidevm  203.4] WARN vmm: virtio device 0: the guest left its interrupt \
                    unacknowledged for 1s; raised it again (64 times so far)";
        assert_eq!(ignored_interrupts(line), 64);
        assert_eq!(ignored_interrupts("raised it again (x times so far)"), 0);
        assert_eq!(ignored_interrupts("INFO vmm: guest started"), 0);
    }
}
