//! `vsock-probe`: the guest side of tidevm's vsock end-to-end tests
//! (busybox has no vsock tool). Built statically by `tools/test` and put in
//! the test initramfs.
//!
//! ```text
//! vsock-probe listen PORT         echo every connection back, one thread each;
//!                                 prints LISTENING=PORT once bound
//! vsock-probe send CID PORT N     connect, send N pattern bytes, shut down writing,
//!                                 print SENT=N SUM=<fnv> REPLY=<what came back>
//! vsock-probe connect CID PORT    connect and close; prints CONNECTED=1 or
//!                                 CONNECT_ERR=<errno> with the time it took
//! vsock-probe sink PORT           read every connection to its end, one thread
//!                                 each, and answer `RECEIVED=<bytes>\n`;
//!                                 prints LISTENING=PORT once bound
//! vsock-probe source CID PORT N   connect, send N bytes as fast as possible
//!                                 (no pattern), close; prints SOURCED=N MS=<ms>
//! ```
//!
//! `sink` and `source` are for throughput (tools/bench-vsock): no checksum,
//! one 256 KiB buffer written or read over and over.
//!
//! The pattern and checksum come from the library half of this crate,
//! which the host side of the tests uses too.

use std::fs::File;
use std::io::{self, Read, Write};
use std::time::Instant;

use vsock_probe::socket::{connect, shutdown_write, Listener};
use vsock_probe::write_pattern;

/// Listens on `port` (prints `LISTENING=PORT` once bound) and hands each
/// connection to `handle` on a thread of its own.
fn serve(port: u32, handle: fn(File)) -> io::Result<()> {
    let listener = Listener::bind(port, 128)?;
    println!("LISTENING={port}");
    io::stdout().flush()?;
    loop {
        let conn = listener.accept()?;
        std::thread::spawn(move || handle(conn));
    }
}

fn echo(mut conn: File) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = shutdown_write(&conn);
}

/// Size of the buffer `sink` and `source` read and write with.
const BULK_BUF: usize = 256 * 1024;

fn sink(mut conn: File) {
    let mut buf = vec![0u8; BULK_BUF];
    let mut total = 0u64;
    loop {
        match conn.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
    let _ = conn.write_all(format!("RECEIVED={total}\n").as_bytes());
    let _ = shutdown_write(&conn);
}

fn source(cid: u32, port: u32, total: u64) -> io::Result<()> {
    let start = Instant::now();
    let mut conn = connect(cid, port)?;
    let buf = vec![0xa5u8; BULK_BUF];
    let mut sent = 0u64;
    while sent < total {
        let n = usize::try_from(total - sent).map_or(buf.len(), |left| left.min(buf.len()));
        conn.write_all(&buf[..n])?;
        sent += n as u64;
    }
    shutdown_write(&conn)?;
    // Wait for the host to close: all data was taken.
    let mut rest = Vec::new();
    conn.read_to_end(&mut rest)?;
    println!("SOURCED={sent} MS={}", start.elapsed().as_millis());
    Ok(())
}

fn send(cid: u32, port: u32, total: u64) -> io::Result<()> {
    let mut conn = connect(cid, port)?;
    let sum = write_pattern(&mut conn, total)?;
    shutdown_write(&conn)?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    println!("SENT={total} SUM={sum:016x} REPLY={}", reply.trim());
    Ok(())
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize) -> T {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| usage())
}

fn usage() -> ! {
    eprintln!(
        "usage: vsock-probe listen PORT | send CID PORT BYTES | connect CID PORT \
         | sink PORT | source CID PORT BYTES"
    );
    std::process::exit(2)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let result = match args.get(1).map(String::as_str) {
        Some("listen") => serve(arg(&args, 2), echo),
        Some("send") => send(arg(&args, 2), arg(&args, 3), arg(&args, 4)),
        Some("sink") => serve(arg(&args, 2), sink),
        Some("source") => source(arg(&args, 2), arg(&args, 3), arg(&args, 4)),
        Some("connect") => {
            let start = Instant::now();
            let r = connect(arg(&args, 2), arg(&args, 3));
            let ms = start.elapsed().as_millis();
            match r {
                Ok(_) => println!("CONNECTED=1 MS={ms}"),
                Err(e) => println!("CONNECT_ERR={} MS={ms}", e.raw_os_error().unwrap_or(0)),
            }
            Ok(())
        }
        _ => usage(),
    };
    if let Err(e) = result {
        println!("PROBE_ERROR={e}");
        std::process::exit(1);
    }
}
