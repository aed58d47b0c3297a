//! A sandbox end to end: tidevm started with only `--api-socket`, a VM
//! created over the Cloud Hypervisor API with virtio-mem, a balloon and
//! vsock, booted into `initramfs-sandbox.cpio.gz`, whose `sandbox-agent`
//! answers on vsock port 1024. The agent reports the guest's memory while
//! `vm.resize` grows it to 1.5 GiB and shrinks it to 384 MiB; bytes flow
//! both ways intact; 64 connections are served at once; the guest connects
//! to a host listener; `vm.shutdown` and `vmm.shutdown` end it.
//!
//! Measured and printed (not asserted): process start to the agent's first
//! answer, idle RSS, vsock throughput each way, resize convergence.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use e2e::*;
use serde_json::Value;
use vsock_probe::pattern_sum;

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const BOOT_SIZE: u64 = 512 * MIB;
/// Bytes streamed each way.
const STREAM: u64 = 256 * MIB;
/// Connections held open at once.
const CONNECTIONS: u64 = 64;

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn put(vm: &Vm, path: &str, body: Option<&str>) {
    let (status, text) = vm.api("PUT", path, body);
    assert_eq!(status, 204, "PUT {path} {body:?}: {text}");
}

/// `vm.resize desired_ram`, then waits until the agent reports a MemTotal
/// (KiB) that satisfies `ok` and `vm.info` the new actual size; returns
/// that MemTotal and how long it all took.
fn resize(vm: &Vm, agent: &Agent, bytes: u64, ok: impl Fn(u64) -> bool) -> (u64, Duration) {
    let started = Instant::now();
    put(
        vm,
        "/api/v1/vm.resize",
        Some(&format!(r#"{{"desired_ram": {bytes}}}"#)),
    );
    let kib = poll(
        &format!("the agent to see MemTotal for {} MiB", bytes / MIB),
        CONVERGE,
        || {
            let kib = agent.memtotal_kib();
            ok(kib).then_some(kib)
        },
    );
    poll(
        &format!("vm.info memory_actual_size to reach {bytes}"),
        CONVERGE,
        || {
            (json(&vm.api("GET", "/api/v1/vm.info", None).1)["memory_actual_size"] == bytes)
                .then_some(())
        },
    );
    (kib, started.elapsed())
}

#[test]
fn sandbox_boots_answers_on_vsock_resizes_and_shuts_down() {
    require_e2e();
    let work = work_dir("sandbox");
    let socket = work.join("vsock.sock");
    let mut vm = Vm::start(&[], Some(work.join("api.sock")));
    vm.wait_api(Duration::from_secs(30));

    let config = serde_json::json!({
        "payload": {
            "kernel": asset("vmlinux"),
            "initramfs": asset("initramfs-sandbox.cpio.gz"),
            "cmdline": TEST_CMDLINE,
        },
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {
            "size": BOOT_SIZE,
            "hotplug_size": 4 * GIB,
            "hotplug_method": "VirtioMem",
        },
        "balloon": {"size": 0},
        "vsock": {"cid": 3, "socket": socket},
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    });
    put(&vm, "/api/v1/vm.create", Some(&config.to_string()));
    put(&vm, "/api/v1/vm.boot", None);

    // The sandbox is up when its agent answers on vsock.
    let agent = Agent {
        socket: socket.clone(),
    };
    let deadline = Instant::now() + BOOT_TIMEOUT;
    while let Err(e) = agent.ping() {
        assert!(Instant::now() < deadline, "the agent never answered: {e}");
        std::thread::sleep(Duration::from_millis(50));
    }
    let boot = vm.started.elapsed();
    report(
        &work,
        &format!(
            "sandbox: process start to the agent answering on vsock: {:.2} s",
            boot.as_secs_f64()
        ),
    );
    let boot_kib = agent.memtotal_kib();
    assert!(
        boot_kib > 400 * 1024 && boot_kib <= 512 * 1024,
        "MemTotal {boot_kib} KiB"
    );
    let info = json(&vm.api("GET", "/api/v1/vm.info", None).1);
    assert_eq!(info["state"], "Running");
    assert_eq!(info["memory_actual_size"], BOOT_SIZE);
    report(
        &work,
        &format!(
            "sandbox: idle tidevm RSS after boot: {} MiB",
            vm.rss() / MIB
        ),
    );

    // Grow to 1.5 GiB: 1 GiB plugged through virtio-mem.
    let (grown, took) = resize(&vm, &agent, BOOT_SIZE + GIB, |kib| {
        kib >= boot_kib + 1024 * 1024 - 32 * 1024
    });
    assert!(grown <= boot_kib + 1024 * 1024, "{boot_kib} -> {grown}");
    report(
        &work,
        &format!(
            "sandbox: vm.resize to 1.5 GiB converged in {:.1} s (MemTotal {} MiB)",
            took.as_secs_f64(),
            grown / 1024
        ),
    );

    // Down to 384 MiB in one request: virtio-mem unplugs its 1 GiB, then
    // the balloon takes 128 MiB of boot memory.
    let (shrunk, took) = resize(&vm, &agent, 384 * MIB, |kib| kib <= boot_kib - 128 * 1024);
    assert_eq!(shrunk, boot_kib - 128 * 1024, "MemTotal: boot less 128 MiB");
    let mem = vm.api_json("GET", "/vm/memory");
    assert_eq!(mem["plugged_size"], 0, "{mem}");
    assert_eq!(mem["balloon_actual_size"], 128 * MIB, "{mem}");
    assert_eq!(mem["requested_size"], 384 * MIB, "{mem}");
    report(
        &work,
        &format!(
            "sandbox: vm.resize 1.5 GiB -> 384 MiB converged in {:.1} s (MemTotal {} MiB); tidevm RSS {} MiB",
            took.as_secs_f64(),
            shrunk / 1024,
            vm.rss() / MIB
        ),
    );

    // 256 MiB each way, checksummed on both ends.
    let started = Instant::now();
    let (answer, sent_sum) = agent
        .sink(STREAM)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.hang_report()));
    let took = started.elapsed();
    assert_eq!(
        answer,
        format!("BYTES={STREAM} SUM={sent_sum:016x}"),
        "the guest got exactly what the host sent"
    );
    report(
        &work,
        &format!(
            "sandbox: vsock host to guest: {} MiB in {:.2} s ({:.1} MiB/s)",
            STREAM / MIB,
            took.as_secs_f64(),
            mib_per_s(STREAM, took)
        ),
    );
    let started = Instant::now();
    let (got, sum) = agent
        .source(STREAM)
        .unwrap_or_else(|e| panic!("{e}\n{}", vm.hang_report()));
    let took = started.elapsed();
    assert_eq!(got, STREAM, "the whole stream arrived");
    assert_eq!(sum, pattern_sum(STREAM), "the host got the guest's pattern");
    report(
        &work,
        &format!(
            "sandbox: vsock guest to host: {} MiB in {:.2} s ({:.1} MiB/s)",
            STREAM / MIB,
            took.as_secs_f64(),
            mib_per_s(STREAM, took)
        ),
    );

    // 64 connections open at the same time (opened one after another),
    // each with a different number of bytes in flight; the agent holds a
    // thread for each; then each gets its own answer.
    let started = Instant::now();
    let mut open: Vec<(UnixStream, u64, u64)> = (0..CONNECTIONS)
        .map(|i| {
            let len = 4096 * (i + 1);
            let mut s = agent
                .request("SINK")
                .unwrap_or_else(|e| panic!("connection {i} of {CONNECTIONS}: {e}"));
            let sum = send_pattern(&mut s, len);
            (s, len, sum)
        })
        .collect();
    let threads = agent.run("ls /proc/$(pidof sandbox-agent)/task | wc -l");
    let threads: u64 = threads.trim().parse().expect("thread count");
    assert!(
        threads > CONNECTIONS,
        "the agent serves {CONNECTIONS} connections at once: {threads} threads"
    );
    for (i, (s, len, sum)) in open.iter_mut().enumerate() {
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer)
            .unwrap_or_else(|e| panic!("connection {i}: {e}"));
        assert_eq!(
            answer.trim(),
            format!("BYTES={len} SUM={sum:016x}"),
            "connection {i}"
        );
    }
    report(
        &work,
        &format!(
            "sandbox: {CONNECTIONS} connections open at once, all answered, in {:.2} s",
            started.elapsed().as_secs_f64()
        ),
    );

    // The guest connects to a host listener at <socket>_5000.
    let listener = UnixListener::bind(format!("{}_5000", socket.display())).unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let (total, sum) = read_summing(&mut s, "host listener");
        s.write_all(format!("HOST-GOT={total},{sum:016x}\n").as_bytes())
            .unwrap();
        total
    });
    let len = 16 * MIB;
    let mut s = agent
        .request(&format!("CONNECT-HOST 5000 {len}"))
        .expect("CONNECT-HOST");
    let mut answer = String::new();
    s.read_to_string(&mut answer).expect("CONNECT-HOST answer");
    let sum = pattern_sum(len);
    assert_eq!(
        answer.trim(),
        format!("SENT={len} SUM={sum:016x} REPLY=HOST-GOT={len},{sum:016x}"),
        "the host listener got what the guest sent, and the guest its reply"
    );
    assert_eq!(server.join().expect("host listener"), len);

    // A command's output streams back.
    assert_eq!(
        agent.run("echo hello from the sandbox"),
        "hello from the sandbox\n"
    );

    put(&vm, "/api/v1/vm.shutdown", None);
    poll("vm.info to say Shutdown", Duration::from_secs(30), || {
        (json(&vm.api("GET", "/api/v1/vm.info", None).1)["state"] == "Shutdown").then_some(())
    });
    put(&vm, "/api/v1/vmm.shutdown", None);
    let exit = vm.wait_exit(Duration::from_secs(30));
    assert!(exit.success(), "tidevm exited with {exit:?}");
    assert!(!vm.stderr().contains("panicked"), "{}", vm.stderr());
}
