//! End-to-end tests: a real server on a temporary Unix socket, a fake VMM thread, and the
//! crate's client.

use std::path::Path;
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use api_server::client::{request, request_full};
use api_server::{
    ApiRequest, ApiResponse, ApiServer, ApiServerHandle, BalloonInfo, BalloonStatistics,
    BalloonUpdate, MemoryInfo, MemoryResizeRequest, VmCounters, VmInfo,
};
use vmm_sys_util::eventfd::EventFd;

mod common;
use common::{balloon_info, counters, error_message, memory_info, socket_path, Fixture};

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

    let (status, body) = f.call("GET", "/vm/counters", None);
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<VmCounters>(&body).unwrap(),
        counters()
    );

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
            ApiRequest::GetCounters,
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
