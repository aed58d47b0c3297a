//! virtio-vsock with the hybrid Unix-socket backend and virtio-rng, against
//! the Linux `vmw_vsock_virtio_transport` and `virtio_rng` drivers. The
//! guest side is `tests/guest/vsock-probe`.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use e2e::*;
use vsock_probe::{pattern, Fnv};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const ANSWER: Duration = Duration::from_secs(120);
/// The port the guest's echo server listens on.
const ECHO_PORT: u32 = 1024;

/// A guest with `vsock-probe listen 1024` (echo) running, answering on its
/// console: `send PORT N` → `G2H=` what `vsock-probe send 2 PORT N`
/// printed; `connect PORT` → `CONN=`; `rng` → `RNG_CURRENT=` and
/// `RNG_BYTES=` (bytes read from /dev/hwrng); `reboot`.
const SCENARIO: &str = r#"
stty -echo 2>/dev/null
vsock-probe listen 1024 >/tmp/listen.log 2>&1 &
for i in $(seq 100); do grep -q LISTENING /tmp/listen.log && break; sleep 0.1; done
kv LISTEN "$(cat /tmp/listen.log)"
kv READY 1
while read -r cmd a b; do
  case "$cmd" in
    send) kv G2H "$(vsock-probe send 2 "$a" "$b" 2>&1)" ;;
    connect) kv CONN "$(vsock-probe connect 2 "$a" 2>&1)" ;;
    rng) kv RNG_CURRENT "$(cat /sys/class/misc/hw_random/rng_current)"
         kv RNG_BYTES "$(head -c 256 /dev/hwrng | wc -c)" ;;
    reboot) reboot -f ;;
  esac
done
"#;

struct Sandbox {
    vm: Vm,
    socket: PathBuf,
    work: PathBuf,
}

impl Sandbox {
    /// Prints a measurement and keeps it in `report.txt` of the test's work
    /// directory.
    fn report(&self, line: &str) {
        report(&self.work, line);
    }
}

fn boot(test: &str) -> Sandbox {
    require_e2e();
    let work = work_dir(test);
    let probe = vsock_probe();
    let initrd = initramfs_with(&work, SCENARIO, &[(&probe, "/bin/vsock-probe")]);
    let socket = work.join("vsock.sock");
    let vsock = format!("cid=3,socket={}", socket.display());
    let list = guest_args(
        "vmlinux",
        &initrd,
        &[
            "--cpus",
            "2",
            "--memory",
            "512M",
            "--vsock",
            &vsock,
            "--rng",
            "src=/dev/urandom",
        ],
    );
    let vm = Vm::start(&list, None);
    vm.wait_for("READY=1", BOOT_TIMEOUT);
    let listen = vm.wait_for("LISTEN=", Duration::from_secs(1));
    assert!(
        listen.contains("LISTENING=1024"),
        "guest echo server: {listen}"
    );
    Sandbox { vm, socket, work }
}

/// Sends `len` pattern bytes starting at pattern offset `offset` on a
/// connection to the echo server, half-closes, and checks that exactly the
/// same bytes come back. Returns the time it took.
fn echo_roundtrip(socket: &Path, offset: u64, len: u64) -> Duration {
    let (s, host_port) = vsock_connect(socket, ECHO_PORT).expect("echo server accepts");
    assert!(host_port >= 1 << 30, "host port {host_port}");
    let started = Instant::now();
    let mut writer = s.try_clone().unwrap();
    let sender = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < len {
            let n = (len - sent).min(buf.len() as u64);
            let chunk = &mut buf[..usize::try_from(n).unwrap()];
            for (i, b) in chunk.iter_mut().enumerate() {
                *b = pattern(offset + sent + i as u64);
            }
            writer.write_all(chunk).unwrap();
            sent += n;
        }
        writer.shutdown(std::net::Shutdown::Write).unwrap();
    });
    let mut reader = s;
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0u64;
    let mut sent_sum = Fnv::default();
    let mut echo_sum = Fnv::default();
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => panic!("echo read failed after {got} bytes: {e}"),
        };
        for (i, b) in buf[..n].iter().enumerate() {
            let expected = pattern(offset + got + i as u64);
            assert_eq!(*b, expected, "byte {} of the echo differs", got + i as u64);
            sent_sum.update(&[expected]);
        }
        echo_sum.update(&buf[..n]);
        got += n as u64;
    }
    sender.join().unwrap();
    assert_eq!(got, len, "the whole stream came back");
    assert_eq!(echo_sum.value(), sent_sum.value());
    started.elapsed()
}

#[test]
fn vsock_host_connects_to_the_guest_refused_and_concurrent() {
    let mut sb = boot("vsock-host-to-guest");

    // 8 MiB each way through one connection, checked byte by byte.
    let len = 8 * MIB;
    let t = echo_roundtrip(&sb.socket, 0, len);
    sb.report(&format!(
        "vsock echo: {} MiB each way in {:.2} s ({:.1} MiB/s each way)",
        len / MIB,
        t.as_secs_f64(),
        mib_per_s(len, t)
    ));

    // Nobody listens on port 9999: the host stream closes without an OK.
    let started = Instant::now();
    let refused = vsock_connect(&sb.socket, 9999);
    let took = started.elapsed();
    assert_eq!(refused.err().as_deref(), Some(""), "refused with no answer");
    assert!(took < Duration::from_secs(3), "refusal took {took:?}");
    sb.report(&format!("vsock refusal answered in {took:?}"));
    // A malformed line is closed too.
    let mut bad = UnixStream::connect(&sb.socket).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    bad.write_all(b"HELLO 1\n").unwrap();
    let mut rest = Vec::new();
    bad.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());

    // 20 connections at once, 512 KiB each way each.
    let socket = sb.socket.clone();
    let started = Instant::now();
    let threads: Vec<_> = (0..20u64)
        .map(|i| {
            let socket = socket.clone();
            std::thread::spawn(move || echo_roundtrip(&socket, i * 7919, 512 * 1024))
        })
        .collect();
    for t in threads {
        t.join().expect("a concurrent connection failed");
    }
    sb.report(&format!(
        "vsock: 20 concurrent echo connections of 512 KiB in {:.2} s",
        started.elapsed().as_secs_f64()
    ));

    // The device still works after all that.
    echo_roundtrip(&sb.socket, 99, 4096);
    sb.vm.send("reboot");
    assert_eq!(sb.vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
    assert!(!sb.vm.stderr().contains("panicked"), "{}", sb.vm.stderr());
}

#[test]
fn vsock_guest_connects_to_a_host_listener_and_rng() {
    let mut sb = boot("vsock-guest-to-host");

    // A host listener at <socket>_5000 that answers each connection with
    // the checksum of what it got; on the first it starts reading only
    // after a second (the guest must wait, not lose data).
    let listener = UnixListener::bind(format!("{}_5000", sb.socket.display())).unwrap();
    let server = std::thread::spawn(move || {
        let mut totals = Vec::new();
        for stall in [true, false] {
            let (mut s, _) = listener.accept().unwrap();
            if stall {
                std::thread::sleep(Duration::from_secs(1));
            }
            let (total, sum) = read_summing(&mut s, "host listener");
            s.write_all(format!("SUM={sum:016x},BYTES={total}\n").as_bytes())
                .unwrap();
            totals.push(total);
        }
        totals
    });
    let len = 16 * MIB;
    for stall in [true, false] {
        let started = Instant::now();
        let answer = sb.vm.ask(&format!("send 5000 {len}"), "G2H", ANSWER);
        let took = started.elapsed();
        let field = |key: &str| {
            answer
                .split_whitespace()
                .find_map(|w| w.strip_prefix(key))
                .unwrap_or_else(|| panic!("no {key} in {answer:?}"))
                .to_string()
        };
        assert_eq!(field("SENT="), len.to_string());
        let sum = field("SUM=");
        assert_eq!(
            field("REPLY="),
            format!("SUM={sum},BYTES={len}"),
            "the host got exactly what the guest sent"
        );
        sb.report(&format!(
            "vsock guest to host: {} MiB in {:.2} s{} ({:.1} MiB/s, console round trip included)",
            len / MIB,
            took.as_secs_f64(),
            if stall {
                " with the host stalling 1 s"
            } else {
                ""
            },
            mib_per_s(len, took)
        ));
    }
    assert_eq!(server.join().expect("host listener"), [len, len]);

    // Nobody at <socket>_5999: the guest's connect fails at once
    // (ECONNRESET = 104).
    let conn = sb.vm.ask("connect 5999", "CONN", ANSWER);
    assert!(conn.starts_with("CONNECT_ERR=104"), "{conn}");
    let ms: u64 = conn
        .split_once("MS=")
        .and_then(|(_, ms)| ms.trim().parse().ok())
        .unwrap_or(u64::MAX);
    assert!(ms < 2000, "refusal took {ms} ms");
    sb.report(&format!(
        "vsock guest connect to a missing listener refused in {ms} ms"
    ));

    // virtio-rng is the guest's hardware RNG.
    let current = sb.vm.ask("rng", "RNG_CURRENT", ANSWER);
    assert!(current.starts_with("virtio_rng"), "rng_current={current}");
    let bytes = sb.vm.wait_for("RNG_BYTES=", ANSWER);
    assert!(bytes.ends_with("RNG_BYTES=256"), "{bytes}");

    sb.vm.send("reboot");
    assert_eq!(sb.vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
    assert!(!sb.vm.stderr().contains("panicked"), "{}", sb.vm.stderr());
}
