//! Target `api_http`: raw bytes sent to the real API server (tiny_http on
//! a Unix socket, then `read_body` and `parse_request`), one connection
//! per input, with a stand-in VMM thread that answers every request.
//!
//! Invariants checked:
//! - no panic in the server (its thread would die and the next check
//!   would time out);
//! - every connection is answered or closed within 5 s, and an answer is
//!   an HTTP status line whose status is not 5xx (505 for an unsupported
//!   HTTP version excepted). Requests in HTTP/2.0 or 3.0 are included:
//!   upstream tiny_http 0.12 never answered them (found by this target;
//!   fixed in `third_party/tiny_http`, PATCHED.md item 3);
//! - afterwards a well-formed `GET /vm/memory` on a new connection is
//!   answered 200.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use api_server::{ApiRequest, ApiResponse, ApiServer, ApiServerHandle};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::input::Seed;

const DEADLINE: Duration = Duration::from_secs(5);

fn socket() -> &'static PathBuf {
    // The handle stays reachable (a leaked one would be a LeakSanitizer
    // report); the server lives as long as the process.
    static SERVER: OnceLock<(PathBuf, Mutex<ApiServerHandle>)> = OnceLock::new();
    &SERVER
        .get_or_init(|| {
            // libFuzzer's main does not run Rust's runtime setup, which
            // ignores SIGPIPE: a client write to a closed socket must fail,
            // not kill the process.
            // SAFETY: setting a signal disposition to SIG_IGN has no memory
            // safety requirements.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
            let dir = std::env::temp_dir().join(format!("tidevm-fuzz-api-{}", std::process::id()));
            std::fs::create_dir_all(&dir).expect("socket dir");
            let path = dir.join("api.sock");
            let (tx, rx) = mpsc::channel();
            let kick = EventFd::new(EFD_NONBLOCK).expect("eventfd");
            let handle = ApiServer::start(&path, tx, kick).expect("API server");
            std::thread::spawn(move || {
                for envelope in rx {
                    let response = match envelope.request {
                        ApiRequest::PowerOff
                        | ApiRequest::PutMemory(_)
                        | ApiRequest::PutBalloon(_) => ApiResponse::no_content(),
                        _ => ApiResponse::ok(&serde_json::json!({ "ok": true })),
                    };
                    envelope.respond(response);
                }
            });
            (path, Mutex::new(handle))
        })
        .0
}

/// Sends `bytes` on a new connection, half-closes it and returns what the
/// server sent before closing.
fn exchange(bytes: &[u8]) -> Vec<u8> {
    let mut stream = UnixStream::connect(socket()).expect("connect");
    stream.set_read_timeout(Some(DEADLINE)).expect("timeout");
    stream.set_write_timeout(Some(DEADLINE)).expect("timeout");
    // The server may answer and close before reading everything.
    let _ = stream.write_all(bytes);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut answer = Vec::new();
    match stream.read_to_end(&mut answer) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!(
            "no end of answer within {DEADLINE:?} ({e}); got {:?}",
            String::from_utf8_lossy(&answer)
        ),
    }
    answer
}

fn status(answer: &[u8]) -> Option<u16> {
    let line = answer.split(|&b| b == b'\n').next()?;
    let text = std::str::from_utf8(line).ok()?;
    let mut parts = text.split(' ');
    let version = parts.next()?;
    // tiny_http answers in the request's version (even "HTTP/0.9").
    assert!(version.starts_with("HTTP/"), "bad status line {text:?}");
    parts.next()?.parse().ok()
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let answer = exchange(data);
    if !answer.is_empty() {
        let code = status(&answer).expect("status line");
        assert!(code < 500 || code == 505, "server error {code}");
    }
    let probe = exchange(b"GET /vm/memory HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(status(&probe), Some(200), "valid request after the input");
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let raw = |s: &str| Seed::new().bytes(s.as_bytes()).finish();
    vec![
        raw("GET /vm/memory HTTP/1.1\r\nHost: x\r\n\r\n"),
        raw("PUT /vm/memory HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 26\r\n\r\n{\"requested_size\":1048576}"),
        raw("PUT /vm/balloon HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"siz\r\n8\r\ne\":4096}\r\n0\r\n\r\n"),
        raw("PUT /vm/balloon HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"size\""),
        raw("GET /vm/info HTTP/1.1\r\nExpect: 100-continue\r\n\r\nGET /vm/balloon HTTP/1.1\r\n\r\n"),
        raw("GARBAGE\r\n\r\n"),
        raw("GET /vm/memory HTTP/2.0\r\nHost: x\r\n\r\n"),
    ]
}
