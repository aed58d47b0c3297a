//! Clients that are slow, silent, malformed or too many: none of them may hold up a
//! well-formed request or the VMM, and each gets the documented answer (408, 413, 503).
//!
//! These tests assert liveness and ordering (a good request is answered while a slow one is
//! still pending), never timings: the only clocks involved are the server's own deadlines,
//! and the helper that waits for a condition has only a generous guard against hanging.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Barrier};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api_server::{ApiRequest, ApiServerConfig, MemoryInfo, MAX_BODY_SIZE};

mod common;
use common::{error_message, fake_vmm_answer, memory_info, Fixture};

/// A body longer than what tiny_http buffers on its own connection threads (1 KiB).
const LONG_BODY: usize = 2000;

/// Waits until `condition` holds. The guard only keeps a broken server from hanging the test
/// suite; it is not a performance bound.
fn wait_until(what: &str, mut condition: impl FnMut() -> bool) {
    let guard = Instant::now() + Duration::from_secs(60);
    while !condition() {
        assert!(Instant::now() < guard, "still waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn config(body_timeout: Duration, max_body_readers: usize) -> ApiServerConfig {
    ApiServerConfig {
        body_timeout,
        max_body_readers,
        response_timeout: Duration::from_secs(10),
    }
}

fn fixture(tag: &str, config: ApiServerConfig) -> Fixture {
    Fixture::with_config(tag, config, |envelope| {
        let response = fake_vmm_answer(&envelope.request);
        envelope.respond(response);
    })
}

/// Connects and sends `bytes`, leaving the connection open.
fn send_raw(path: &Path, bytes: &[u8]) -> UnixStream {
    let mut stream = UnixStream::connect(path).unwrap();
    stream.write_all(bytes).unwrap();
    stream
}

fn put_head(length: usize) -> Vec<u8> {
    format!("PUT /vm/memory HTTP/1.1\r\nContent-Length: {length}\r\n\r\n").into_bytes()
}

/// Reads one response (head and Content-Length body) and returns (status, body).
fn read_response(stream: &mut UnixStream) -> (u16, String) {
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        assert_eq!(
            stream.read(&mut byte).unwrap(),
            1,
            "connection closed: {raw:?}"
        );
        raw.push(byte[0]);
    }
    let head = String::from_utf8(raw).unwrap();
    let status: u16 = head[9..12].parse().unwrap();
    let length = head
        .lines()
        .filter_map(|line| line.split_once(':'))
        .find(|(name, _)| name.eq_ignore_ascii_case("content-length"))
        .map_or(0, |(_, value)| value.trim().parse::<usize>().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    (status, String::from_utf8(body).unwrap())
}

/// Asserts that the server has sent nothing on `stream` yet, and the connection is open.
fn assert_pending(stream: &UnixStream, what: &str) {
    stream.set_nonblocking(true).unwrap();
    let mut byte = [0u8; 1];
    match (&*stream).read(&mut byte) {
        Err(e) if e.kind() == ErrorKind::WouldBlock => {}
        other => panic!("{what}: expected no answer yet, got {other:?}"),
    }
    stream.set_nonblocking(false).unwrap();
}

fn get_memory_ok(f: &Fixture) {
    let (status, body) = f.call("GET", "/vm/memory", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<MemoryInfo>(&body).unwrap(),
        memory_info()
    );
}

/// A thread that sends a space every `pause` on `stream` until `stop` is set or the server
/// answers (or closes).
fn trickle(stream: &UnixStream, pause: Duration, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    let mut stream = stream.try_clone().unwrap();
    std::thread::spawn(move || {
        while !stop.load(Ordering::SeqCst) {
            if stream.write_all(b" ").is_err() {
                return;
            }
            std::thread::sleep(pause);
        }
    })
}

#[test]
fn silent_and_trickling_clients_do_not_delay_others() {
    // A deadline far away: the slow clients stay pending for the whole test.
    let f = fixture("slow", config(Duration::from_secs(600), 4));
    let server = f.server.as_ref().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let silent = UnixStream::connect(&f.path).unwrap();
    let half_head = send_raw(&f.path, b"GET /vm/memory HTTP/1.1\r\nHost: x");
    let body_stream = send_raw(&f.path, &put_head(LONG_BODY));
    let trickler = trickle(&body_stream, Duration::from_millis(100), Arc::clone(&stop));
    wait_until("the trickled body to reach a reader", || {
        server.body_readers() == 1
    });

    // Well-formed requests are answered while the slow ones are still pending.
    for _ in 0..5 {
        get_memory_ok(&f);
    }
    let (status, _) = f.call("PUT", "/vm/balloon", Some(r#"{"size": 0}"#));
    assert_eq!(status, 204);
    assert_pending(&silent, "silent client");
    assert_pending(&half_head, "half a head");
    assert_pending(&body_stream, "trickled body");
    let mut expected = vec![ApiRequest::GetMemory; 5];
    expected.push(ApiRequest::PutBalloon(api_server::BalloonUpdate {
        size: 0,
    }));
    assert_eq!(*f.seen.lock().unwrap(), expected);

    stop.store(true, Ordering::SeqCst);
    trickler.join().unwrap();
    drop((silent, half_head, body_stream));
    wait_until("the reader to end", || server.body_readers() == 0);
}

#[test]
fn oversized_body_gets_413_without_being_read() {
    let f = fixture("413", config(Duration::from_secs(600), 4));
    let server = f.server.as_ref().unwrap();
    let too_big = MAX_BODY_SIZE + 1;

    // Refused on the announced length alone: no body byte is ever sent.
    let mut stream = send_raw(&f.path, &put_head(too_big));
    let (status, body) = read_response(&mut stream);
    assert_eq!(status, 413);
    let message = error_message(&body);
    assert!(message.contains("too large"), "{message}");
    assert!(
        message.contains(&format!("limit {MAX_BODY_SIZE} bytes")),
        "{message}"
    );

    // A client that waits for 100 Continue gets 413 instead.
    let mut waiting = send_raw(
        &f.path,
        format!(
            "PUT /vm/balloon HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {too_big}\r\n\r\n"
        )
        .as_bytes(),
    );
    assert_eq!(read_response(&mut waiting).0, 413);

    // A body that is sent anyway gets 413 too, and the server still serves.
    let big = format!(r#"{{"requested_size": 1{}}}"#, " ".repeat(MAX_BODY_SIZE));
    let (status, _) = f.call("PUT", "/vm/memory", Some(&big));
    assert_eq!(status, 413);
    get_memory_ok(&f);
    assert_eq!(*f.seen.lock().unwrap(), vec![ApiRequest::GetMemory]);

    // tiny_http drains the unread bodies on reader threads until the clients close.
    drop((stream, waiting));
    wait_until("the drains to end", || server.body_readers() == 0);
}

#[test]
fn an_absurd_content_length_is_refused_and_the_server_lives_on() {
    // tiny_http 0.12 drained an unread body into one buffer of the announced
    // size: this request aborted the process (third_party/tiny_http).
    let f = fixture("huge-length", config(Duration::from_secs(600), 4));
    for length in ["999999999999999", "18446744073709551615"] {
        let head = format!("PUT /vm/memory HTTP/1.1\r\nContent-Length: {length}\r\n\r\n{{");
        let mut stream = send_raw(&f.path, head.as_bytes());
        assert_eq!(read_response(&mut stream).0, 413, "Content-Length {length}");
        drop(stream);
    }
    let server = f.server.as_ref().unwrap();
    wait_until("the drains to end", || server.body_readers() == 0);
    get_memory_ok(&f);
    assert_eq!(*f.seen.lock().unwrap(), vec![ApiRequest::GetMemory]);
}

#[test]
fn unfinished_body_gets_408_after_the_deadline() {
    let f = fixture("408", config(Duration::from_millis(300), 4));
    let server = f.server.as_ref().unwrap();
    let stop = Arc::new(AtomicBool::new(false));

    // A body trickled too slowly to finish before the deadline.
    let mut stream = send_raw(&f.path, &put_head(LONG_BODY));
    let trickler = trickle(&stream, Duration::from_millis(20), Arc::clone(&stop));
    let (status, body) = read_response(&mut stream);
    assert_eq!(status, 408);
    let message = error_message(&body);
    assert!(message.contains("within 300 ms"), "{message}");
    stop.store(true, Ordering::SeqCst);
    trickler.join().unwrap();
    drop(stream);

    // A body cut short by a half-close.
    let mut stream = send_raw(
        &f.path,
        b"PUT /vm/balloon HTTP/1.1\r\nContent-Length: 3000\r\n\r\n{",
    );
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let (status, body) = read_response(&mut stream);
    assert_eq!(status, 400);
    assert!(error_message(&body).contains("ended after 1 of 3000 bytes"));

    // None of them reached the VMM, and the server still serves.
    get_memory_ok(&f);
    assert_eq!(*f.seen.lock().unwrap(), vec![ApiRequest::GetMemory]);
    wait_until("the readers to end", || server.body_readers() == 0);
}

#[test]
fn stuck_readers_stay_bounded() {
    const MAX: usize = 2;
    let f = fixture("bounded", config(Duration::from_millis(200), MAX));
    let server = f.server.as_ref().unwrap();

    // Clients that send part of a body, then neither send nor close: each holds a reader
    // until it goes away or tiny_http::READ_IDLE_TIMEOUT (10 s) ends its read.
    let stuck: Vec<UnixStream> = (0..MAX)
        .map(|_| {
            let mut head = put_head(LONG_BODY);
            head.push(b'{');
            send_raw(&f.path, &head)
        })
        .collect();
    wait_until("the stuck readers", || server.body_readers() == MAX);

    // Beyond the cap: 503 with an error body, nothing reaches the VMM, no new reader.
    for _ in 0..3 {
        let (status, body) = f.call("PUT", "/vm/balloon", Some(r#"{"size": 0}"#));
        assert_eq!(status, 503);
        assert!(error_message(&body).contains("limit 2"), "{body}");
        assert_eq!(server.body_readers(), MAX);
    }
    // Requests without a body are served as usual.
    get_memory_ok(&f);
    for stream in &stuck {
        assert_pending(stream, "stuck body");
    }
    assert_eq!(*f.seen.lock().unwrap(), vec![ApiRequest::GetMemory]);

    // Once the stuck clients are gone, bodies are read again.
    drop(stuck);
    wait_until("the readers to end", || server.body_readers() == 0);
    let (status, _) = f.call("PUT", "/vm/balloon", Some(r#"{"size": 0}"#));
    assert_eq!(status, 204);
}

/// What one misbehaving client does, over and over.
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    /// Connects and sends nothing.
    Silent,
    /// Sends a head, then a long body a byte at a time, too slowly to meet the deadline.
    TrickledBody,
    /// Sends half a head and stops sending.
    HalfHead,
    /// Sends a garbage request line.
    Garbage,
    /// Announces a body over the limit and sends none of it.
    Oversized,
    /// Sends invalid JSON.
    BadJson,
    /// Sends part of a long body and stops sending.
    StalledBody,
    /// Stops sending halfway through the body and half-closes.
    HalfBody,
}

fn misbehave(path: &Path, kind: Misbehaviour, done: &AtomicBool) {
    while !done.load(Ordering::SeqCst) {
        let Ok(mut stream) = UnixStream::connect(path) else {
            continue;
        };
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let sent = match kind {
            Misbehaviour::Silent => Ok(()),
            Misbehaviour::TrickledBody => {
                let _ = stream.write_all(&put_head(LONG_BODY));
                for _ in 0..100 {
                    if done.load(Ordering::SeqCst) || stream.write_all(b" ").is_err() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                Ok(())
            }
            Misbehaviour::HalfHead => stream.write_all(b"GET /vm/mem"),
            Misbehaviour::Garbage => stream.write_all(b"\x00\x01garbage\r\n\r\n"),
            Misbehaviour::Oversized => stream.write_all(&put_head(100_000_000)),
            Misbehaviour::BadJson => {
                stream.write_all(b"PUT /vm/memory HTTP/1.1\r\nContent-Length: 5\r\n\r\n{\"a\":")
            }
            Misbehaviour::StalledBody => stream.write_all(&put_head(LONG_BODY)),
            Misbehaviour::HalfBody => stream
                .write_all(b"PUT /vm/balloon HTTP/1.1\r\nContent-Length: 50\r\n\r\n{")
                .and_then(|()| stream.shutdown(std::net::Shutdown::Write)),
        };
        if sent.is_err() {
            continue;
        }
        // Reads whatever comes until the server closes or the test ends.
        let mut buf = [0u8; 1024];
        while !done.load(Ordering::SeqCst) {
            match stream.read(&mut buf) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break,
            }
        }
    }
}

#[test]
fn many_clients_while_others_misbehave() {
    const CLIENTS: usize = 64;
    const REQUESTS_PER_CLIENT: usize = 10;
    const MAX_READERS: usize = 4;
    let f = fixture("many", config(Duration::from_millis(300), MAX_READERS));
    let server = f.server.as_ref().unwrap();
    let done = Arc::new(AtomicBool::new(false));

    let misbehaving: Vec<JoinHandle<()>> = [
        Misbehaviour::Silent,
        Misbehaviour::TrickledBody,
        Misbehaviour::HalfHead,
        Misbehaviour::Garbage,
        Misbehaviour::Oversized,
        Misbehaviour::BadJson,
        Misbehaviour::StalledBody,
        Misbehaviour::HalfBody,
    ]
    .into_iter()
    .map(|kind| {
        let path = f.path.clone();
        let done = Arc::clone(&done);
        std::thread::spawn(move || misbehave(&path, kind, &done))
    })
    .collect();

    let start = Arc::new(Barrier::new(CLIENTS));
    let answered = Arc::new(AtomicUsize::new(0));
    let clients: Vec<JoinHandle<()>> = (0..CLIENTS)
        .map(|_| {
            let path = f.path.clone();
            let start = Arc::clone(&start);
            let answered = Arc::clone(&answered);
            std::thread::spawn(move || {
                start.wait();
                for _ in 0..REQUESTS_PER_CLIENT {
                    let (status, body) =
                        api_server::client::request(&path, "GET", "/vm/memory", None).unwrap();
                    assert_eq!(status, 200, "{body}");
                    assert_eq!(
                        serde_json::from_str::<MemoryInfo>(&body).unwrap(),
                        memory_info()
                    );
                    answered.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();

    let mut most_readers = 0;
    while !clients.iter().all(JoinHandle::is_finished) {
        most_readers = most_readers.max(server.body_readers());
        std::thread::sleep(Duration::from_millis(1));
    }
    for client in clients {
        client.join().unwrap();
    }
    done.store(true, Ordering::SeqCst);
    for thread in misbehaving {
        thread.join().unwrap();
    }

    assert_eq!(
        answered.load(Ordering::SeqCst),
        CLIENTS * REQUESTS_PER_CLIENT
    );
    assert!(most_readers <= MAX_READERS, "{most_readers} readers");
    // Only the well-formed requests reached the VMM.
    assert_eq!(
        *f.seen.lock().unwrap(),
        vec![ApiRequest::GetMemory; CLIENTS * REQUESTS_PER_CLIENT]
    );
    wait_until("every reader to end", || server.body_readers() == 0);
}

/// Reads until the server closes `stream` (a close with part of the request unread resets
/// the connection after the answer); returns what it sent.
fn read_to_close(stream: &mut UnixStream) -> String {
    let mut answer = Vec::new();
    let mut chunk = [0u8; 4096];
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .unwrap();
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == ErrorKind::ConnectionReset => break,
            Err(e) => panic!("the server neither answered nor closed: {e} (got {answer:?})"),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

/// The status line of a raw answer, or "" when there was none.
fn status_line(answer: &str) -> &str {
    answer.lines().next().unwrap_or("")
}

#[test]
fn stalled_heads_and_bodies_are_cut_off() {
    // The body deadline is far away: what ends the stalled body is tiny_http's read timeout.
    let f = fixture("cutoff", config(Duration::from_secs(600), 4));
    let server = f.server.as_ref().unwrap();
    let stop = Arc::new(AtomicBool::new(false));

    let silent = UnixStream::connect(&f.path).unwrap();
    let half_head = send_raw(&f.path, b"GET /vm/memory HTTP/1.1\r\nHost: x");
    let trickled_head = send_raw(&f.path, b"GET /vm/memory HTTP/1.1\r\n");
    let head_trickler = trickle(
        &trickled_head,
        Duration::from_millis(200),
        Arc::clone(&stop),
    );
    let mut stalled_body = put_head(LONG_BODY);
    stalled_body.push(b'{');
    let stalled_body = send_raw(&f.path, &stalled_body);
    wait_until("the stalled body to reach a reader", || {
        server.body_readers() == 1
    });
    let mut huge_head = b"GET /vm/memory HTTP/1.1\r\n".to_vec();
    huge_head.extend(std::iter::repeat_n(b"X-Padding: 0123456789abcdef\r\n", 1000).flatten());
    let huge_head = send_raw(&f.path, &huge_head);
    let http2 = send_raw(&f.path, b"GET /vm/memory HTTP/2.0\r\n\r\n");

    // Each is answered (or, silent, closed) on its own; the others wait their turn in threads.
    let waiters: Vec<(&str, JoinHandle<String>)> = [
        ("silent", silent),
        ("half head", half_head),
        ("trickled head", trickled_head),
        ("stalled body", stalled_body),
        ("huge head", huge_head),
        ("HTTP/2.0", http2),
    ]
    .into_iter()
    .map(|(what, mut stream)| (what, std::thread::spawn(move || read_to_close(&mut stream))))
    .collect();
    // Meanwhile well-formed requests are served.
    get_memory_ok(&f);

    let answers: Vec<(&str, String)> = waiters
        .into_iter()
        .map(|(what, waiter)| (what, waiter.join().unwrap()))
        .collect();
    stop.store(true, Ordering::SeqCst);
    head_trickler.join().unwrap();
    for (what, answer) in &answers {
        let expected = match *what {
            "silent" => "",
            "half head" | "trickled head" => "HTTP/1.1 408",
            "stalled body" => "HTTP/1.1 408",
            "huge head" => "HTTP/1.1 431",
            _ => "HTTP/1.1 505",
        };
        let ok = if expected.is_empty() {
            answer.is_empty()
        } else {
            status_line(answer).starts_with(expected)
        };
        assert!(ok, "{what}: expected {expected:?}, got {answer:?}");
        if !expected.is_empty() {
            // Like every error of the API: a JSON body saying what was wrong.
            let body = answer.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            let json: serde_json::Value = serde_json::from_str(body)
                .unwrap_or_else(|e| panic!("{what}: body {body:?} is not JSON: {e}"));
            assert!(json["error"].is_string(), "{what}: {body}");
        }
    }
    let stalled = &answers[3].1;
    assert!(
        stalled.contains("nothing arrived for"),
        "stalled body: {stalled}"
    );
    // The stalled body's reader is free again, nothing reached the VMM but the GET.
    wait_until("the reader to end", || server.body_readers() == 0);
    assert_eq!(*f.seen.lock().unwrap(), vec![ApiRequest::GetMemory]);
    get_memory_ok(&f);
}
