//! `sandbox-agent`: the guest side of a tidevm sandbox. It listens on a
//! vsock port (1024 unless given) and serves every connection on its own
//! thread. A connection starts with one command line; the answer follows
//! on the same connection:
//!
//! ```text
//! PING                        PONG
//! RUN <shell command>         the command's stdout and stderr, streamed as
//!                             they come; the connection closes when it exits
//! SINK                        reads to EOF, then answers BYTES=<n> SUM=<fnv>
//! SOURCE <n>                  sends n pattern bytes, then closes
//! CONNECT-HOST <port> <n>     connects to the host's <port>, sends n pattern
//!                             bytes, shuts down writing, reads the reply and
//!                             answers SENT=<n> SUM=<fnv> REPLY=<reply>
//! ```
//!
//! Errors are answered as `ERROR <what>`. The pattern and the FNV-1a
//! checksum (16 hex digits) come from the `vsock-probe` library, which the
//! host side uses too. Built statically by `tools/guest-assets` and started
//! by the init of `initramfs-sandbox.cpio.gz`.

use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};

use vsock_probe::socket::{connect, shutdown_write, Listener, HOST_CID};
use vsock_probe::{write_pattern, Fnv};

/// The port the agent listens on unless told otherwise.
const DEFAULT_PORT: u32 = 1024;
/// The longest command line accepted.
const MAX_LINE: u64 = 4096;
/// How much is read or written at a time.
const CHUNK: usize = 64 * 1024;

/// One parsed command line.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    Ping,
    Run(String),
    Sink,
    Source(u64),
    ConnectHost { port: u32, bytes: u64 },
}

/// Parses a command line (without its newline).
fn parse(line: &str) -> Result<Request, String> {
    let (word, rest) = line.split_once(' ').unwrap_or((line, ""));
    let number = |s: &str, what: &str| {
        s.trim()
            .parse::<u64>()
            .map_err(|_| format!("{word} wants {what}, got {s:?}"))
    };
    match word {
        "PING" => Ok(Request::Ping),
        "RUN" if !rest.trim().is_empty() => Ok(Request::Run(rest.to_string())),
        "RUN" => Err("RUN wants a shell command".into()),
        "SINK" => Ok(Request::Sink),
        "SOURCE" => Ok(Request::Source(number(rest, "a byte count")?)),
        "CONNECT-HOST" => {
            let (port, bytes) = rest
                .trim()
                .split_once(' ')
                .ok_or_else(|| "CONNECT-HOST wants a port and a byte count".to_string())?;
            let port = u32::try_from(number(port, "a port")?)
                .map_err(|_| format!("port {port} is out of range"))?;
            Ok(Request::ConnectHost {
                port,
                bytes: number(bytes, "a byte count")?,
            })
        }
        _ => Err(format!("unknown command {word:?}")),
    }
}

/// Serves one connection: reads its command line and answers it.
fn serve(conn: File) -> io::Result<()> {
    let mut reader = BufReader::with_capacity(CHUNK, conn);
    let mut line = Vec::new();
    (&mut reader).take(MAX_LINE).read_until(b'\n', &mut line)?;
    let line = String::from_utf8_lossy(&line);
    let request = match line.strip_suffix('\n') {
        Some(line) => parse(line.trim_end_matches('\r')),
        None => Err("no command line (one line ending in \\n)".into()),
    };
    let mut out = reader.get_ref();
    match request {
        Err(e) => writeln!(out, "ERROR {e}")?,
        Ok(Request::Ping) => writeln!(out, "PONG")?,
        Ok(Request::Run(command)) => run(&command, out)?,
        Ok(Request::Sink) => {
            let (bytes, sum) = sink(&mut reader)?;
            writeln!(reader.get_ref(), "BYTES={bytes} SUM={sum:016x}")?;
        }
        Ok(Request::Source(bytes)) => {
            source(out, bytes)?;
        }
        Ok(Request::ConnectHost { port, bytes }) => match connect(HOST_CID, port) {
            Err(e) => writeln!(out, "ERROR connect to host port {port}: {e}")?,
            Ok(mut host) => {
                let sum = source(&host, bytes)?;
                shutdown_write(&host)?;
                let mut reply = String::new();
                host.read_to_string(&mut reply)?;
                writeln!(out, "SENT={bytes} SUM={sum:016x} REPLY={}", reply.trim())?;
            }
        },
    }
    shutdown_write(reader.get_ref())
}

/// Reads to EOF; returns the byte count and checksum.
fn sink(from: &mut impl Read) -> io::Result<(u64, u64)> {
    let mut sum = Fnv::default();
    let mut total = 0u64;
    let mut buf = vec![0u8; CHUNK];
    loop {
        match from.read(&mut buf) {
            Ok(0) => return Ok((total, sum.value())),
            Ok(n) => {
                sum.update(&buf[..n]);
                total += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Writes `bytes` pattern bytes; returns their checksum.
fn source(mut to: &File, bytes: u64) -> io::Result<u64> {
    write_pattern(&mut to, bytes)
}

/// A pipe: (read end, write end), both close-on-exec.
fn pipe() -> io::Result<(File, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are fresh and owned by nobody else.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    Ok((File::from(read), write))
}

/// Runs `command` with `/bin/sh -c`, streaming its stdout and stderr (one
/// pipe for both, so their order is kept) to `out` as they come.
fn run(command: &str, mut out: &File) -> io::Result<()> {
    let (mut output, write_end) = pipe()?;
    let mut child = {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            .arg(command)
            .stdin(Stdio::null())
            .stdout(Stdio::from(write_end.try_clone()?))
            .stderr(Stdio::from(write_end));
        match cmd.spawn() {
            Ok(child) => child,
            Err(e) => return writeln!(out, "ERROR cannot start /bin/sh: {e}"),
        }
        // `cmd` and with it our copies of the write end are dropped here:
        // the read end sees EOF once the command's own copies close.
    };
    let mut buf = vec![0u8; CHUNK];
    let copied = loop {
        match output.read(&mut buf) {
            Ok(0) => break Ok(()),
            Ok(n) => {
                if let Err(e) = out.write_all(&buf[..n]) {
                    break Err(e);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => break Err(e),
        }
    };
    if copied.is_err() {
        // The host went away: the command's output has nowhere to go.
        let _ = child.kill();
    }
    child.wait()?;
    copied
}

fn main() {
    let port = match std::env::args().nth(1).map(|p| p.parse::<u32>()) {
        None => DEFAULT_PORT,
        Some(Ok(port)) => port,
        Some(Err(_)) => {
            eprintln!("usage: sandbox-agent [PORT]");
            std::process::exit(2);
        }
    };
    let listener = match Listener::bind(port, 128) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("sandbox-agent: cannot listen on vsock port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("SANDBOX-AGENT-LISTENING={port}");
    let _ = io::stdout().flush();
    loop {
        match listener.accept() {
            Ok(conn) => {
                std::thread::spawn(move || {
                    if let Err(e) = serve(conn) {
                        eprintln!("sandbox-agent: connection: {e}");
                    }
                });
            }
            Err(e) => {
                eprintln!("sandbox-agent: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_each_command_and_refuses_the_rest() {
        assert_eq!(parse("PING"), Ok(Request::Ping));
        assert_eq!(
            parse("RUN grep MemTotal /proc/meminfo"),
            Ok(Request::Run("grep MemTotal /proc/meminfo".into()))
        );
        assert_eq!(parse("SINK"), Ok(Request::Sink));
        assert_eq!(parse("SOURCE 4096"), Ok(Request::Source(4096)));
        assert_eq!(
            parse("CONNECT-HOST 5000 10"),
            Ok(Request::ConnectHost {
                port: 5000,
                bytes: 10
            })
        );
        assert!(parse("RUN ").is_err());
        assert!(parse("SOURCE lots").is_err());
        assert!(parse("CONNECT-HOST 5000").is_err());
        assert!(parse("CONNECT-HOST 99999999999 1").is_err());
        assert!(parse("HELLO").is_err());
    }

    #[test]
    fn run_streams_stdout_and_stderr_in_order() {
        let (mut read, write) = pipe().unwrap();
        let write = File::from(write);
        run("echo one; echo two >&2; printf three", &write).unwrap();
        drop(write);
        let mut got = String::new();
        read.read_to_string(&mut got).unwrap();
        assert_eq!(got, "one\ntwo\nthree");
    }

    #[test]
    fn sink_counts_and_sums_what_source_sent() {
        let (mut read, write) = pipe().unwrap();
        let write = File::from(write);
        let reader = std::thread::spawn(move || sink(&mut read).unwrap());
        let sum = source(&write, 200_000).unwrap();
        drop(write);
        assert_eq!(reader.join().unwrap(), (200_000, sum));
        assert_eq!(sum, vsock_probe::pattern_sum(200_000));
    }
}
