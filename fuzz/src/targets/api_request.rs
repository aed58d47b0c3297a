//! Target `api_request`: routing and JSON body parsing of API requests
//! (`api_server::parse_request`, what the API thread runs on every request
//! once tiny_http has read it).
//!
//! Input: a method (one of the usual ones, or any bytes), a URL and a body.
//!
//! Invariants checked:
//! - no panic;
//! - a request is accepted only on a known route with a method it allows;
//!   refusals are 400, 404 or 405 (405 with an `Allow` header) with a JSON
//!   body `{"error": "..."}`;
//! - an accepted PUT carries exactly what serde reads from the body as the
//!   request type, and re-encoding it parses back to the same value;
//! - parsing is deterministic.

use api_server::{parse_request, ApiRequest, BalloonUpdate, ErrorBody, MemoryResizeRequest};

use crate::input::{Bytes, Seed};

const METHODS: [&str; 6] = ["GET", "PUT", "POST", "DELETE", "PATCH", "HEAD"];
const PATHS: [&str; 6] = [
    "/vm/info",
    "/vm/power-off",
    "/vm/memory",
    "/vm/balloon",
    "/vm/balloon/statistics",
    "/vm/counters",
];

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let selector = b.u8();
    let method = match METHODS.get(usize::from(selector % 8)) {
        Some(m) => (*m).to_string(),
        None => String::from_utf8_lossy(b.blob()).into_owned(),
    };
    let url = String::from_utf8_lossy(b.blob()).into_owned();
    let body = b.rest();
    let result = parse_request(&method, &url, body);
    assert_eq!(
        result,
        parse_request(&method, &url, body),
        "not deterministic"
    );
    match result {
        Ok(req) => {
            let (m, path) = req.route();
            assert_eq!((m, path), (method.as_str(), url.as_str()), "{req:?}");
            match req {
                ApiRequest::PutMemory(r) => {
                    let direct: MemoryResizeRequest =
                        serde_json::from_slice(body).expect("accepted body must parse");
                    assert_eq!(direct, r);
                    let again = serde_json::to_vec(&r).expect("encode");
                    assert_eq!(
                        serde_json::from_slice::<MemoryResizeRequest>(&again).ok(),
                        Some(r)
                    );
                }
                ApiRequest::PutBalloon(r) => {
                    let direct: BalloonUpdate =
                        serde_json::from_slice(body).expect("accepted body must parse");
                    assert_eq!(direct, r);
                    let again = serde_json::to_vec(&r).expect("encode");
                    assert_eq!(
                        serde_json::from_slice::<BalloonUpdate>(&again).ok(),
                        Some(r)
                    );
                }
                _ => assert!(body.iter().all(u8::is_ascii_whitespace), "body ignored"),
            }
        }
        Err(reply) => {
            assert!(
                matches!(reply.status, 400 | 404 | 405),
                "status {}",
                reply.status
            );
            assert_eq!(reply.allow.is_some(), reply.status == 405);
            let path = url.split_once('?').map_or(url.as_str(), |(p, _)| p);
            assert_eq!(
                reply.status == 404,
                !PATHS.contains(&path),
                "404 iff unknown path"
            );
            let body = reply.body.expect("error body");
            let err: ErrorBody = serde_json::from_str(&body).expect("error body is JSON");
            assert!(!err.error.is_empty());
        }
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let req = |method: u8, url: &str, body: &str| {
        let mut s = Seed::new();
        s.u8(method).blob(url.as_bytes()).bytes(body.as_bytes());
        s.finish()
    };
    vec![
        req(0, "/vm/memory", ""),
        req(1, "/vm/memory", r#"{"requested_size": 1073741824}"#),
        req(1, "/vm/balloon", r#" {"size":0} "#),
        req(1, "/vm/balloon", r#"{"size":-1}"#),
        req(1, "/vm/memory", r#"{"requested_size":1,"x":2}"#),
        req(1, "/vm/memory", "[1]"),
        req(2, "/vm/info", ""),
        req(0, "/vm/info?x=1", ""),
        req(1, "/vm/power-off", "{}"),
        req(0, "/nope", ""),
        req(0, "/vm/counters", ""),
    ]
}
