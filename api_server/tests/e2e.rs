//! End-to-end tests: a real server on a temporary Unix socket, a fake VMM thread, and the
//! crate's client.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use api_server::client::{request, request_full};
use api_server::{
    ApiRequest, ApiRequestEnvelope, ApiResponse, ApiServer, ApiServerHandle, BalloonInfo,
    BalloonStatistics, BalloonUpdate, ErrorBody, MemoryInfo, MemoryResizeRequest, VmInfo,
};
use vmm_sys_util::eventfd::EventFd;

const BLOCK: u64 = 2 << 20;

fn socket_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("tidevm-api-{}-{tag}-{n}.sock", std::process::id()))
}

fn memory_info() -> MemoryInfo {
    MemoryInfo {
        boot_size: 512 << 20,
        hotplug_size: 1 << 30,
        requested_size: 512 << 20,
        plugged_size: 0,
        block_size: BLOCK,
        slot_size: 128 << 20,
        memslots_in_use: 1,
        longest_memslot_update_us: 12,
        hotplug_method: "virtio-mem".to_string(),
        balloon_target_size: Some(0),
        balloon_actual_size: None,
        hv_balloon: None,
    }
}

fn balloon_info() -> BalloonInfo {
    BalloonInfo {
        target_size: 64 << 20,
        actual_size: 32 << 20,
        deflate_on_oom: true,
        free_page_reporting: false,
        stats_period_s: 0,
        features_negotiated: 0x1_0000_0004,
    }
}

/// A VMM stand-in that answers like a real one would, recording what it received.
fn fake_vmm_answer(request: &ApiRequest) -> ApiResponse {
    match request {
        ApiRequest::GetVmInfo => ApiResponse::ok(&VmInfo {
            state: "Running".to_string(),
            config: serde_json::json!({"vcpus": 2}),
            uptime_ms: 1234,
        }),
        ApiRequest::PowerOff => ApiResponse::no_content(),
        ApiRequest::GetMemory => ApiResponse::ok(&memory_info()),
        ApiRequest::PutMemory(MemoryResizeRequest { requested_size }) => {
            if requested_size % BLOCK != 0 {
                ApiResponse::error(
                    400,
                    format!("requested_size {requested_size} is not a multiple of {BLOCK}"),
                )
            } else {
                ApiResponse::no_content()
            }
        }
        ApiRequest::GetBalloon => ApiResponse::ok(&balloon_info()),
        ApiRequest::PutBalloon(_) => ApiResponse::no_content(),
        ApiRequest::GetBalloonStatistics => {
            ApiResponse::error(409, "balloon statistics are disabled")
        }
        ApiRequest::Ch(_) => ApiResponse::no_content(),
    }
}

struct Fixture {
    server: Option<ApiServerHandle>,
    vmm: Option<JoinHandle<()>>,
    wake: EventFd,
    seen: Arc<Mutex<Vec<ApiRequest>>>,
    path: PathBuf,
}

impl Fixture {
    /// Starts a server and a fake VMM thread. `answer` decides what the VMM does with each
    /// envelope.
    fn start(tag: &str, answer: impl Fn(ApiRequestEnvelope) + Send + 'static) -> Fixture {
        let path = socket_path(tag);
        let (tx, rx) = mpsc::channel::<ApiRequestEnvelope>();
        let kick = EventFd::new(0).unwrap();
        let wake = kick.try_clone().unwrap();
        let vmm_kick = kick.try_clone().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let vmm_seen = Arc::clone(&seen);
        let vmm = std::thread::spawn(move || loop {
            // Like the real event loop: wait for the kick, then drain the channel.
            vmm_kick.read().unwrap();
            loop {
                match rx.try_recv() {
                    Ok(envelope) => {
                        vmm_seen.lock().unwrap().push(envelope.request.clone());
                        answer(envelope);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
        });
        let server =
            ApiServer::start_with_timeout(&path, tx, kick, Duration::from_secs(2)).unwrap();
        Fixture {
            server: Some(server),
            vmm: Some(vmm),
            wake,
            seen,
            path,
        }
    }

    fn standard(tag: &str) -> Fixture {
        Fixture::start(tag, |envelope| {
            let response = fake_vmm_answer(&envelope.request);
            envelope.respond(response);
        })
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        request(&self.path, method, path, body).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
        assert!(!self.path.exists(), "socket not removed on stop");
        // The server's sender is gone: wake the fake VMM so it sees the disconnection.
        self.wake.write(1).unwrap();
        if let Some(vmm) = self.vmm.take() {
            vmm.join().unwrap();
        }
    }
}

fn error_message(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("not an error body ({e}): {body}"))
        .error
}

#[test]
fn every_route() {
    let f = Fixture::standard("routes");

    let (status, body) = f.call("GET", "/vm/info", None);
    assert_eq!(status, 200, "{body}");
    let info: VmInfo = serde_json::from_str(&body).unwrap();
    assert_eq!(info.state, "Running");
    assert_eq!(info.config["vcpus"], 2);
    assert_eq!(info.uptime_ms, 1234);

    let (status, body) = f.call("GET", "/vm/memory", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<MemoryInfo>(&body).unwrap(),
        memory_info()
    );
    let raw: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(raw["balloon_actual_size"].is_null());

    let (status, body) = f.call(
        "PUT",
        "/vm/memory",
        Some(r#"{"requested_size": 1073741824}"#),
    );
    assert_eq!((status, body.as_str()), (204, ""));

    // VMM-side validation errors pass through.
    let (status, body) = f.call("PUT", "/vm/memory", Some(r#"{"requested_size": 1000}"#));
    assert_eq!(status, 400);
    assert!(error_message(&body).contains("not a multiple"), "{body}");

    let (status, body) = f.call("GET", "/vm/balloon", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<BalloonInfo>(&body).unwrap(),
        balloon_info()
    );

    let (status, body) = f.call("PUT", "/vm/balloon", Some(r#"{"size": 67108864}"#));
    assert_eq!((status, body.as_str()), (204, ""));

    let (status, body) = f.call("GET", "/vm/balloon/statistics", None);
    assert_eq!(status, 409);
    assert_eq!(error_message(&body), "balloon statistics are disabled");

    let (status, body) = f.call("PUT", "/vm/power-off", None);
    assert_eq!((status, body.as_str()), (204, ""));
    // An empty body is the same as none.
    let (status, _) = f.call("PUT", "/vm/power-off", Some(""));
    assert_eq!(status, 204);

    assert_eq!(
        *f.seen.lock().unwrap(),
        vec![
            ApiRequest::GetVmInfo,
            ApiRequest::GetMemory,
            ApiRequest::PutMemory(MemoryResizeRequest {
                requested_size: 1 << 30
            }),
            ApiRequest::PutMemory(MemoryResizeRequest {
                requested_size: 1000
            }),
            ApiRequest::GetBalloon,
            ApiRequest::PutBalloon(BalloonUpdate { size: 64 << 20 }),
            ApiRequest::GetBalloonStatistics,
            ApiRequest::PowerOff,
            ApiRequest::PowerOff,
        ]
    );
}

#[test]
fn statistics_body() {
    let f = Fixture::start("stats", |envelope| {
        envelope.respond(ApiResponse::ok(&BalloonStatistics {
            last_update_ms: Some(10),
            free_memory: Some(4096),
            ..Default::default()
        }))
    });
    let (status, body) = f.call("GET", "/vm/balloon/statistics", None);
    assert_eq!(status, 200, "{body}");
    let stats: BalloonStatistics = serde_json::from_str(&body).unwrap();
    assert_eq!(stats.free_memory, Some(4096));
    assert_eq!(stats.swap_in, None);
}

#[test]
fn http_errors() {
    let f = Fixture::standard("errors");

    // Unknown paths.
    for path in ["/", "/vm", "/vm/info/", "/vm/memory/x", "/vm/INFO"] {
        let (status, body) = f.call("GET", path, None);
        assert_eq!(status, 404, "{path}");
        assert!(error_message(&body).contains("no such endpoint"), "{body}");
    }

    // Wrong methods, with Allow.
    for (method, path, allow) in [
        ("POST", "/vm/memory", "GET, PUT"),
        ("DELETE", "/vm/balloon", "GET, PUT"),
        ("PUT", "/vm/info", "GET"),
        ("GET", "/vm/power-off", "PUT"),
        ("PATCH", "/vm/balloon/statistics", "GET"),
    ] {
        let r = request_full(&f.path, method, path, None).unwrap();
        assert_eq!(r.status, 405, "{method} {path}");
        assert_eq!(r.header("Allow"), Some(allow), "{method} {path}");
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        assert!(error_message(&r.body).contains("not allowed"), "{}", r.body);
    }

    // Bad bodies: (path, body, expected fragment of serde's message).
    for (path, body, fragment) in [
        ("/vm/memory", "{", "EOF while parsing"),
        ("/vm/memory", "not json", "expected"),
        (
            "/vm/memory",
            r#"{"requested_size": 1, "extra": 2}"#,
            "unknown field `extra`",
        ),
        ("/vm/memory", r#"{"size": 1}"#, "unknown field `size`"),
        ("/vm/memory", "{}", "missing field `requested_size`"),
        (
            "/vm/memory",
            r#"{"requested_size": "1G"}"#,
            "invalid type: string \"1G\"",
        ),
        (
            "/vm/memory",
            r#"{"requested_size": -4096}"#,
            "invalid value: integer `-4096`",
        ),
        (
            "/vm/memory",
            r#"{"requested_size": 1}{}"#,
            "trailing characters",
        ),
        ("/vm/memory", "", "requires a JSON request body"),
        ("/vm/balloon", r#"{"size": null}"#, "invalid type: null"),
        (
            "/vm/balloon",
            r#"[1]"#,
            "expected a JSON object, found an array",
        ),
        (
            "/vm/balloon",
            r#"1"#,
            "invalid type: integer `1`, expected struct",
        ),
        (
            "/vm/balloon",
            r#"{"size": 1.0}"#,
            "invalid type: floating point",
        ),
    ] {
        let r = request_full(&f.path, "PUT", path, Some(body)).unwrap();
        assert_eq!(r.status, 400, "{path} {body}");
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        let message = error_message(&r.body);
        assert!(message.contains(fragment), "{path} {body}: {message}");
        assert!(message.contains(&format!("PUT {path}")), "{message}");
    }

    // Bodies where none is expected, and query strings.
    let (status, body) = f.call("GET", "/vm/info", Some("{}"));
    assert_eq!(status, 400);
    assert!(error_message(&body).contains("takes no request body"));
    let (status, _) = f.call("PUT", "/vm/power-off", Some(r#"{"force": true}"#));
    assert_eq!(status, 400);
    let (status, body) = f.call("GET", "/vm/memory?verbose=1", None);
    assert_eq!(status, 400);
    assert!(error_message(&body).contains("query strings"));

    // Too large.
    let big = format!(r#"{{"requested_size": 1{}}}"#, " ".repeat(70 * 1024));
    let (status, body) = f.call("PUT", "/vm/memory", Some(&big));
    assert_eq!(status, 413);
    assert!(error_message(&body).contains("too large"));

    // None of these reached the VMM.
    assert!(f.seen.lock().unwrap().is_empty());

    // And the server still works.
    assert_eq!(f.call("GET", "/vm/info", None).0, 200);
}

#[test]
fn vmm_timeout_and_dropped_request() {
    // A VMM that never answers GET /vm/info and drops everything else unanswered.
    let parked = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&parked);
    let f = Fixture::start("timeout", move |envelope| {
        if envelope.request == ApiRequest::GetVmInfo {
            keep.lock().unwrap().push(envelope);
        }
    });
    let (status, body) = f.call("GET", "/vm/info", None);
    assert_eq!(status, 504);
    assert!(error_message(&body).contains("did not answer"), "{body}");
    // A late answer is dropped without harm.
    parked
        .lock()
        .unwrap()
        .pop()
        .unwrap()
        .respond(ApiResponse::no_content());

    let (status, body) = f.call("GET", "/vm/memory", None);
    assert_eq!(status, 500);
    assert!(error_message(&body).contains("without answering"), "{body}");
}

#[test]
fn vmm_gone() {
    let path = socket_path("gone");
    let (tx, rx) = mpsc::channel();
    drop(rx);
    let server = ApiServer::start(&path, tx, EventFd::new(0).unwrap()).unwrap();
    let (status, body) = request(&path, "GET", "/vm/info", None).unwrap();
    assert_eq!(status, 503);
    assert!(error_message(&body).contains("not accepting"), "{body}");
    server.stop();
    assert!(!path.exists());
}

fn start_idle(path: &Path) -> Result<ApiServerHandle, api_server::ApiError> {
    let (tx, _rx) = mpsc::channel();
    ApiServer::start(path, tx, EventFd::new(0).unwrap())
}

#[test]
fn socket_lifecycle() {
    let path = socket_path("lifecycle");

    // A stale socket (bound, nobody listening) is replaced.
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    assert!(path.exists());
    let server = start_idle(&path).unwrap();
    assert_eq!(server.socket_path(), path);

    // A live one is not.
    let err = start_idle(&path).unwrap_err();
    assert!(matches!(err, api_server::ApiError::SocketInUse(_)), "{err}");

    // Dropping the handle stops the server and removes the socket.
    drop(server);
    assert!(!path.exists());
    assert!(request(&path, "GET", "/vm/info", None).is_err());

    // A regular file is left alone.
    std::fs::write(&path, b"precious").unwrap();
    let err = start_idle(&path).unwrap_err();
    assert!(matches!(err, api_server::ApiError::NotASocket(_)), "{err}");
    assert_eq!(std::fs::read(&path).unwrap(), b"precious");
    std::fs::remove_file(&path).unwrap();
}

#[test]
fn stop_while_waiting_for_vmm() {
    let parked = Arc::new(Mutex::new(Vec::new()));
    let keep = Arc::clone(&parked);
    let mut f = Fixture::start("stopwait", move |envelope| {
        keep.lock().unwrap().push(envelope)
    });
    let path = f.path.clone();
    let client = std::thread::spawn(move || request(&path, "GET", "/vm/info", None).unwrap());
    // Wait until the VMM holds the request, then stop.
    while parked.lock().unwrap().is_empty() {
        std::thread::sleep(Duration::from_millis(5));
    }
    let started = std::time::Instant::now();
    f.server.take().unwrap().stop();
    assert!(started.elapsed() < Duration::from_secs(1));
    let (status, body) = client.join().unwrap();
    assert_eq!(status, 503);
    assert!(error_message(&body).contains("shutting down"), "{body}");
}
