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
//! * [`client`] is a tiny blocking HTTP client over a Unix socket, for tests and scripts.
//!
//! # HTTP conventions
//!
//! * Requests are served one at a time, in arrival order.
//! * Unknown path: 404. Known path, wrong method: 405 with an `Allow` header.
//! * Request bodies are JSON; malformed JSON, unknown fields, missing fields, wrong types,
//!   negative numbers and trailing data give 400. Bodies larger than [`MAX_BODY_SIZE`] give 413.
//! * Endpoints that take no body (all `GET`s and `PUT /vm/power-off`) reject a non-empty body
//!   (anything other than whitespace) with 400, so that a client that believes it is sending
//!   parameters learns they are not used.
//! * Query strings are not supported: a request with one gets 400.
//! * Every error body is `{"error": "<message>"}` with `Content-Type: application/json`.
//! * If the VMM does not answer within the response timeout (default
//!   [`DEFAULT_RESPONSE_TIMEOUT`]) the client gets 504; if the VMM side of the channel is gone
//!   it gets 503.

#![warn(missing_docs)]

pub mod client;
mod server;
pub mod types;

pub use server::{
    ApiError, ApiRequest, ApiRequestEnvelope, ApiResponse, ApiServer, ApiServerHandle,
    DEFAULT_RESPONSE_TIMEOUT, MAX_BODY_SIZE,
};
pub use types::{
    BalloonInfo, BalloonStatistics, BalloonUpdate, ErrorBody, MemoryInfo, MemoryResizeRequest,
    VmInfo,
};
