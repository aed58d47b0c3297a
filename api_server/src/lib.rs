//! REST API of tidevm.
//!
//! This crate is the thin HTTP layer of the Firecracker-style split between the API thread and
//! the VMM thread. It contains no VM logic:
//!
//! * [`ApiServer::start`] binds an HTTP/1.1 server on a Unix socket and spawns the `tidevm-api`
//!   thread. That thread parses each request into a typed [`ApiRequest`], sends it to the VMM
//!   inside an [`ApiRequestEnvelope`] (over an `std::sync::mpsc` channel), writes to an
//!   [`EventFd`](vmm_sys_util::eventfd::EventFd) so the VMM event loop wakes up, waits for the
//!   VMM's [`ApiResponse`] and writes it back to the client.
//! * [`types`] holds the request and response bodies: they are the API contract, described by
//!   `resources/openapi.yaml`.
//! * [`ch`] holds the Cloud Hypervisor API v1 subset served below `/api/v1/` (see its docs).
//! * [`client`] is a tiny blocking HTTP client over a Unix socket, for tests and scripts.
//!
//! # HTTP conventions
//!
//! * Requests reach the VMM one at a time. Request bodies are read on their own threads under
//!   a deadline (408 after [`DEFAULT_BODY_TIMEOUT`]), at most [`DEFAULT_MAX_BODY_READERS`] at
//!   once (503 beyond), so a slow client delays no other request.
//! * Chunked request bodies get 411: send `Content-Length`.
//! * Unknown path: 404. Known path, wrong method: 405 with an `Allow` header.
//! * Request bodies are JSON; malformed JSON, unknown fields, missing fields, wrong types,
//!   negative numbers and trailing data give 400. A `Content-Length` over [`MAX_BODY_SIZE`] gives
//!   413 before any of the body is read.
//! * Endpoints that take no body (all `GET`s and `PUT /vm/power-off`) reject a non-empty body
//!   (anything other than whitespace) with 400, so that a client that believes it is sending
//!   parameters learns they are not used.
//! * Query strings are not supported: a request with one gets 400.
//! * Every error body is `{"error": "<message>"}` with `Content-Type: application/json`.
//! * If the VMM does not answer within the response timeout (default
//!   [`DEFAULT_RESPONSE_TIMEOUT`]) the client gets 504; if the VMM side of the channel is gone
//!   it gets 503.

#![warn(missing_docs)]

mod body;
pub mod ch;
pub mod client;
mod server;
pub mod types;

pub use server::{
    parse_request, ApiError, ApiRequest, ApiRequestEnvelope, ApiResponse, ApiServer,
    ApiServerConfig, ApiServerHandle, Reply, DEFAULT_BODY_TIMEOUT, DEFAULT_MAX_BODY_READERS,
    DEFAULT_RESPONSE_TIMEOUT, MAX_BODY_SIZE,
};
pub use types::{
    BalloonInfo, BalloonStatistics, BalloonUpdate, DeviceCounters, ErrorBody, MemoryInfo,
    MemoryResizeRequest, VmCounters, VmInfo,
};
