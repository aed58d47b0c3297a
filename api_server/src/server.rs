//! The HTTP server thread and the messages it exchanges with the VMM.

use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use log::{debug, error, info, warn};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tiny_http::{Header, Request, Response, Server};
use vmm_sys_util::eventfd::EventFd;

use crate::body::BodyReaders;
use crate::ch::{parse_ch_request, ChRequest, CH_PREFIX};
use crate::types::{BalloonUpdate, ErrorBody, MemoryResizeRequest};

/// Largest accepted request body, in bytes. A request announcing a longer `Content-Length`
/// gets 413 before any of its body is read.
pub const MAX_BODY_SIZE: usize = 64 * 1024;

/// How long a client has, from the moment its request head has been parsed, to send the whole
/// body before it gets 408 ([`ApiServerConfig::body_timeout`]).
pub const DEFAULT_BODY_TIMEOUT: Duration = Duration::from_secs(5);

/// How many requests with a body may be in progress at once, counting those whose body is
/// still arriving and refused ones whose unread body tiny_http is draining
/// ([`ApiServerConfig::max_body_readers`]). Beyond it a request with a body gets 503.
pub const DEFAULT_MAX_BODY_READERS: usize = 8;

/// Settings of the API server; [`ApiServerConfig::default`] is what [`ApiServer::start`] uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiServerConfig {
    /// How long to wait for the VMM to answer a request before replying 504.
    pub response_timeout: Duration,
    /// How long a request body may take to arrive before the client gets 408.
    pub body_timeout: Duration,
    /// How many requests with a body may be in progress at once (each on its own thread).
    pub max_body_readers: usize,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        ApiServerConfig {
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            body_timeout: DEFAULT_BODY_TIMEOUT,
            max_body_readers: DEFAULT_MAX_BODY_READERS,
        }
    }
}

/// How long [`ApiServer::start`] waits for the VMM to answer a request before replying 504.
pub const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);

/// Name of the API server thread.
const THREAD_NAME: &str = "tidevm-api";

/// How often the server thread checks for shutdown while it waits for the VMM.
const SHUTDOWN_POLL: Duration = Duration::from_millis(100);

/// A parsed API request, sent to the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /vm/info`.
    GetVmInfo,
    /// `PUT /vm/power-off`.
    PowerOff,
    /// `GET /vm/memory`.
    GetMemory,
    /// `PUT /vm/memory`.
    PutMemory(MemoryResizeRequest),
    /// `GET /vm/balloon`.
    GetBalloon,
    /// `PUT /vm/balloon`.
    PutBalloon(BalloonUpdate),
    /// `GET /vm/balloon/statistics`.
    GetBalloonStatistics,
    /// `GET /vm/counters`.
    GetCounters,
    /// A Cloud Hypervisor API request (below `/api/v1/`).
    Ch(ChRequest),
}

impl ApiRequest {
    /// The HTTP method and path of this request, e.g. `("PUT", "/vm/memory")`, for logs.
    pub fn route(&self) -> (&'static str, &'static str) {
        match self {
            ApiRequest::GetVmInfo => ("GET", "/vm/info"),
            ApiRequest::PowerOff => ("PUT", "/vm/power-off"),
            ApiRequest::GetMemory => ("GET", "/vm/memory"),
            ApiRequest::PutMemory(_) => ("PUT", "/vm/memory"),
            ApiRequest::GetBalloon => ("GET", "/vm/balloon"),
            ApiRequest::PutBalloon(_) => ("PUT", "/vm/balloon"),
            ApiRequest::GetBalloonStatistics => ("GET", "/vm/balloon/statistics"),
            ApiRequest::GetCounters => ("GET", "/vm/counters"),
            ApiRequest::Ch(request) => request.route(),
        }
    }
}

/// The VMM's answer to an [`ApiRequest`].
#[derive(Clone, Debug, PartialEq)]
pub enum ApiResponse {
    /// 204 No Content.
    NoContent,
    /// A JSON body with the given status (normally 200).
    Json(u16, serde_json::Value),
    /// An error: sent as `{"error": message}` with the given status.
    Error {
        /// HTTP status code, e.g. 400, 409, 500.
        status: u16,
        /// Human-readable description of the error.
        message: String,
    },
}

impl ApiResponse {
    /// 200 with `body` serialized as JSON (500 if serialization fails).
    pub fn ok<T: Serialize + ?Sized>(body: &T) -> Self {
        match serde_json::to_value(body) {
            Ok(value) => ApiResponse::Json(200, value),
            Err(e) => ApiResponse::error(500, format!("failed to serialize response: {e}")),
        }
    }

    /// 204 No Content.
    pub fn no_content() -> Self {
        ApiResponse::NoContent
    }

    /// An error response with `status` and body `{"error": message}`.
    pub fn error(status: u16, message: impl Into<String>) -> Self {
        ApiResponse::Error {
            status,
            message: message.into(),
        }
    }

    /// The HTTP status code of this response.
    pub fn status(&self) -> u16 {
        match self {
            ApiResponse::NoContent => 204,
            ApiResponse::Json(status, _) => *status,
            ApiResponse::Error { status, .. } => *status,
        }
    }
}

/// An [`ApiRequest`] together with the one-shot channel on which the VMM sends the response.
#[derive(Debug)]
pub struct ApiRequestEnvelope {
    /// The request.
    pub request: ApiRequest,
    /// Where to send the response. Exactly one response is expected.
    pub response_tx: Sender<ApiResponse>,
}

impl ApiRequestEnvelope {
    /// Creates an envelope for `request` and the receiver of its response channel.
    pub fn new(request: ApiRequest) -> (Self, Receiver<ApiResponse>) {
        let (response_tx, response_rx) = mpsc::channel();
        (
            ApiRequestEnvelope {
                request,
                response_tx,
            },
            response_rx,
        )
    }

    /// Sends `response` back to the API thread.
    ///
    /// Never fails: if the API thread stopped waiting (it timed out with 504, or is shutting
    /// down) the response is dropped and a warning is logged.
    pub fn respond(self, response: ApiResponse) {
        if self.response_tx.send(response).is_err() {
            let (method, path) = self.request.route();
            warn!("API client of {method} {path} is gone; response dropped");
        }
    }
}

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket path exists and is not a Unix socket; it is left alone.
    #[error("API socket path {0} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Another process is serving on the socket path.
    #[error("API socket {0} is in use by another process")]
    SocketInUse(PathBuf),
    /// The socket path could not be inspected or the stale socket removed.
    #[error("cannot remove stale API socket {path}: {source}")]
    RemoveStale {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// Binding the socket failed.
    #[error("cannot bind API socket {path}: {message}")]
    Bind {
        /// Socket path.
        path: PathBuf,
        /// Error reported by the HTTP server.
        message: String,
    },
    /// Setting the permissions of the socket failed.
    #[error("cannot set permissions of API socket {path}: {source}")]
    Permissions {
        /// Socket path.
        path: PathBuf,
        /// Underlying error.
        source: io::Error,
    },
    /// Spawning the server thread failed.
    #[error("cannot spawn the API server thread: {0}")]
    SpawnThread(io::Error),
    /// The server thread's setup (see [`ApiServer::start_with_init`]) failed.
    #[error("cannot set up the API server thread: {0}")]
    ThreadInit(String),
}

/// The API server: see [`ApiServer::start`].
#[derive(Debug)]
pub struct ApiServer;

impl ApiServer {
    /// Starts the API server on the Unix socket `socket_path`, with the default response
    /// timeout ([`DEFAULT_RESPONSE_TIMEOUT`]).
    ///
    /// A stale socket file at `socket_path` is removed first (but not a live one: if another
    /// process accepts connections on it, this fails with [`ApiError::SocketInUse`]; and not a
    /// file that is not a socket). The socket is made accessible to its owner only (mode 0600).
    ///
    /// The server thread, named `tidevm-api`, parses each request into an [`ApiRequest`],
    /// sends an [`ApiRequestEnvelope`] on `to_vmm`, writes 1 to `kick` so the VMM event loop
    /// wakes up (the VMM should then drain `to_vmm` with `try_recv`), and waits for the
    /// [`ApiResponse`]. It never reads a request body: a body announced over [`MAX_BODY_SIZE`]
    /// gets 413 unread, and any other is read by a `tidevm-api-body` thread (at most
    /// [`DEFAULT_MAX_BODY_READERS`] at once, else 503) that answers 408 when the body is not
    /// complete within [`DEFAULT_BODY_TIMEOUT`] and otherwise dispatches the request the same
    /// way. The VMM still receives the requests one at a time, on `to_vmm`.
    pub fn start(
        socket_path: &Path,
        to_vmm: Sender<ApiRequestEnvelope>,
        kick: EventFd,
    ) -> Result<ApiServerHandle, ApiError> {
        Self::start_with_timeout(socket_path, to_vmm, kick, DEFAULT_RESPONSE_TIMEOUT)
    }

    /// Like [`ApiServer::start`], but replies 504 when the VMM has not answered a request
    /// within `response_timeout`.
    pub fn start_with_timeout(
        socket_path: &Path,
        to_vmm: Sender<ApiRequestEnvelope>,
        kick: EventFd,
        response_timeout: Duration,
    ) -> Result<ApiServerHandle, ApiError> {
        let config = ApiServerConfig {
            response_timeout,
            ..ApiServerConfig::default()
        };
        Self::start_with_config(socket_path, to_vmm, kick, config)
    }

    /// Like [`ApiServer::start`], with the given settings.
    pub fn start_with_config(
        socket_path: &Path,
        to_vmm: Sender<ApiRequestEnvelope>,
        kick: EventFd,
        config: ApiServerConfig,
    ) -> Result<ApiServerHandle, ApiError> {
        Self::start_with_init(socket_path, to_vmm, kick, config, || Ok(()))
    }

    /// Like [`ApiServer::start_with_config`], running `init` first thing on the server thread.
    ///
    /// The socket is bound on the calling thread; `init` then runs on the new server thread
    /// before the HTTP server exists, so every API thread (tiny_http's accept and connection
    /// threads, the body readers) starts after it and inherits what it sets up, e.g. a seccomp
    /// filter. If `init` fails, the start fails with [`ApiError::ThreadInit`] and the socket
    /// file is removed.
    pub fn start_with_init<F>(
        socket_path: &Path,
        to_vmm: Sender<ApiRequestEnvelope>,
        kick: EventFd,
        config: ApiServerConfig,
        init: F,
    ) -> Result<ApiServerHandle, ApiError>
    where
        F: FnOnce() -> Result<(), String> + Send + 'static,
    {
        remove_stale_socket(socket_path)?;
        let listener = UnixListener::bind(socket_path).map_err(|e| ApiError::Bind {
            path: socket_path.to_path_buf(),
            message: e.to_string(),
        })?;
        let remove_socket = || {
            let _ = fs::remove_file(socket_path);
        };
        if let Err(source) = fs::set_permissions(socket_path, fs::Permissions::from_mode(0o600)) {
            remove_socket();
            return Err(ApiError::Permissions {
                path: socket_path.to_path_buf(),
                source,
            });
        }
        let shutdown = Arc::new(AtomicBool::new(false));
        let dispatcher = Arc::new(Dispatcher {
            to_vmm: Mutex::new(Some(to_vmm)),
            kick,
            shutdown: Arc::clone(&shutdown),
            response_timeout: config.response_timeout,
        });
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let thread_dispatcher = Arc::clone(&dispatcher);
        let thread_shutdown = Arc::clone(&shutdown);
        let bind_path = socket_path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.to_string())
            .spawn(move || {
                let started = init().map_err(ApiError::ThreadInit).and_then(|()| {
                    let server =
                        Server::from_listener(listener, None).map_err(|e| ApiError::Bind {
                            path: bind_path,
                            message: e.to_string(),
                        })?;
                    let readers = BodyReaders::new(config.max_body_readers, config.body_timeout)
                        .map_err(ApiError::SpawnThread)?;
                    Ok((Arc::new(server), readers))
                });
                let (server, readers) = match started {
                    Ok(started) => started,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                if ready_tx
                    .send(Ok((Arc::clone(&server), readers.active())))
                    .is_err()
                {
                    return;
                }
                Worker {
                    server,
                    dispatcher: thread_dispatcher,
                    readers,
                    shutdown: thread_shutdown,
                }
                .run();
            })
            .map_err(|e| {
                remove_socket();
                ApiError::SpawnThread(e)
            })?;
        let (server, body_readers) = match ready_rx.recv() {
            Ok(Ok(ready)) => ready,
            Ok(Err(e)) => {
                let _ = thread.join();
                remove_socket();
                return Err(e);
            }
            Err(_) => {
                let _ = thread.join();
                remove_socket();
                return Err(ApiError::ThreadInit(
                    "the API server thread ended while starting".into(),
                ));
            }
        };
        info!("API server listening on {}", socket_path.display());
        Ok(ApiServerHandle {
            server: Some(server),
            thread: Some(thread),
            shutdown,
            dispatcher,
            body_readers,
            socket_path: socket_path.to_path_buf(),
        })
    }
}

/// Handle to a running API server. Stopping it (with [`ApiServerHandle::stop`] or by dropping
/// it) ends the server thread and removes the socket file.
pub struct ApiServerHandle {
    server: Option<Arc<Server>>,
    thread: Option<JoinHandle<()>>,
    shutdown: Arc<AtomicBool>,
    dispatcher: Arc<Dispatcher>,
    body_readers: Arc<AtomicUsize>,
    socket_path: PathBuf,
}

impl std::fmt::Debug for ApiServerHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiServerHandle")
            .field("socket_path", &self.socket_path)
            .field("running", &self.server.is_some())
            .finish()
    }
}

impl ApiServerHandle {
    /// Path of the API socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// The number of body reader threads alive: requests whose body is being read or whose
    /// answer is being written, and refused requests whose unread body tiny_http is draining.
    /// Never more than [`ApiServerConfig::max_body_readers`].
    pub fn body_readers(&self) -> usize {
        self.body_readers.load(Ordering::SeqCst)
    }

    /// Stops the server thread, waits for it to exit, and removes the socket file.
    ///
    /// A request waiting for the VMM gets 503. Takes at most about 100 ms after the request
    /// being served, if any, has been read.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        let Some(server) = self.server.take() else {
            return;
        };
        self.shutdown.store(true, Ordering::SeqCst);
        // Body readers blocked on a client outlive the server; they must not keep the VMM
        // channel open.
        self.dispatcher.close();
        server.unblock();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                error!("API server thread panicked");
            }
        }
        // Dropping the last reference to the server stops its accept thread (which connects
        // to the socket to wake up, so the file must still exist) and removes the socket.
        drop(server);
        match fs::remove_file(&self.socket_path) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => warn!(
                "cannot remove API socket {}: {e}",
                self.socket_path.display()
            ),
        }
        info!("API server stopped");
    }
}

impl Drop for ApiServerHandle {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), ApiError> {
    let remove_err = |source| ApiError::RemoveStale {
        path: path.to_path_buf(),
        source,
    };
    let metadata = match fs::symlink_metadata(path) {
        Ok(metadata) => metadata,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(remove_err(e)),
    };
    if !metadata.file_type().is_socket() {
        return Err(ApiError::NotASocket(path.to_path_buf()));
    }
    if UnixStream::connect(path).is_ok() {
        return Err(ApiError::SocketInUse(path.to_path_buf()));
    }
    debug!("removing stale API socket {}", path.display());
    fs::remove_file(path).map_err(remove_err)
}

/// What the server thread writes back to the client.
#[derive(Clone, Debug, PartialEq)]
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// JSON body; `None` for an empty body.
    pub body: Option<String>,
    /// Value of the `Allow` header, for 405.
    pub allow: Option<&'static str>,
}

impl Reply {
    pub(crate) fn error(status: u16, message: impl Into<String>) -> Self {
        let body = ErrorBody {
            error: message.into(),
        };
        Reply {
            status,
            body: Some(serde_json::to_string(&body).unwrap_or_else(|_| {
                // Serializing a struct with one String field cannot fail.
                r#"{"error":"internal error"}"#.to_string()
            })),
            allow: None,
        }
    }

    fn from_response(response: ApiResponse) -> Self {
        let status = response.status();
        if !(100..=599).contains(&status) {
            return Reply::error(500, format!("VMM answered with invalid status {status}"));
        }
        match response {
            ApiResponse::NoContent => Reply {
                status,
                body: None,
                allow: None,
            },
            ApiResponse::Json(_, value) => Reply {
                status,
                body: Some(value.to_string()),
                allow: None,
            },
            ApiResponse::Error { message, .. } => Reply::error(status, message),
        }
    }
}

struct Route {
    path: &'static str,
    allow: &'static str,
}

const ROUTES: &[Route] = &[
    Route {
        path: "/vm/info",
        allow: "GET",
    },
    Route {
        path: "/vm/power-off",
        allow: "PUT",
    },
    Route {
        path: "/vm/memory",
        allow: "GET, PUT",
    },
    Route {
        path: "/vm/balloon",
        allow: "GET, PUT",
    },
    Route {
        path: "/vm/balloon/statistics",
        allow: "GET",
    },
    Route {
        path: "/vm/counters",
        allow: "GET",
    },
];

/// Parses an HTTP request (already read, body at most [`MAX_BODY_SIZE`]) into an
/// [`ApiRequest`], or the error reply to send.
///
/// Pure: the server thread calls it for every request, and fuzz targets call it directly.
pub fn parse_request(method: &str, url: &str, body: &[u8]) -> Result<ApiRequest, Reply> {
    let (path, query) = match url.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (url, None),
    };
    if let Some(endpoint) = path.strip_prefix(CH_PREFIX) {
        return parse_ch_request(method, endpoint, body).map(ApiRequest::Ch);
    }
    let Some(route) = ROUTES.iter().find(|r| r.path == path) else {
        return Err(Reply::error(404, format!("no such endpoint: {path}")));
    };
    let request = match (method, path) {
        ("GET", "/vm/info") => ApiRequest::GetVmInfo,
        ("PUT", "/vm/power-off") => ApiRequest::PowerOff,
        ("GET", "/vm/memory") => ApiRequest::GetMemory,
        ("PUT", "/vm/memory") => ApiRequest::PutMemory(parse_body(method, path, body)?),
        ("GET", "/vm/balloon") => ApiRequest::GetBalloon,
        ("PUT", "/vm/balloon") => ApiRequest::PutBalloon(parse_body(method, path, body)?),
        ("GET", "/vm/balloon/statistics") => ApiRequest::GetBalloonStatistics,
        ("GET", "/vm/counters") => ApiRequest::GetCounters,
        _ => {
            let mut reply = Reply::error(
                405,
                format!(
                    "method {method} not allowed on {path} (allowed: {})",
                    route.allow
                ),
            );
            reply.allow = Some(route.allow);
            return Err(reply);
        }
    };
    if query.is_some() {
        return Err(Reply::error(
            400,
            format!("{method} {path}: query strings are not supported"),
        ));
    }
    if !matches!(
        request,
        ApiRequest::PutMemory(_) | ApiRequest::PutBalloon(_)
    ) && !body.iter().all(u8::is_ascii_whitespace)
    {
        return Err(Reply::error(
            400,
            format!("{method} {path} takes no request body"),
        ));
    }
    Ok(request)
}

pub(crate) fn parse_body<T: DeserializeOwned>(
    method: &str,
    path: &str,
    body: &[u8],
) -> Result<T, Reply> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(Reply::error(
            400,
            format!("{method} {path} requires a JSON request body"),
        ));
    }
    // serde also accepts a struct written as a JSON array (`[1]`); the API only takes objects.
    if body.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'[') {
        return Err(Reply::error(
            400,
            format!("invalid JSON request body for {method} {path}: expected a JSON object, found an array"),
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        Reply::error(
            400,
            format!("invalid JSON request body for {method} {path}: {e}"),
        )
    })
}

/// Sends parsed requests to the VMM and waits for its answers. Shared by the serving thread
/// and the body readers; [`ApiServerHandle::stop`] takes the sender away, so that a reader
/// still blocked on a client keeps no VMM channel open.
pub(crate) struct Dispatcher {
    to_vmm: Mutex<Option<Sender<ApiRequestEnvelope>>>,
    kick: EventFd,
    shutdown: Arc<AtomicBool>,
    response_timeout: Duration,
}

impl Dispatcher {
    /// Sends `request` to the VMM and waits for its answer (504 after the response timeout,
    /// 503 when shutting down or when the VMM is gone).
    pub(crate) fn dispatch(&self, request: ApiRequest) -> Reply {
        let (envelope, response_rx) = ApiRequestEnvelope::new(request);
        let sent = match self.to_vmm.lock() {
            Ok(to_vmm) => to_vmm.as_ref().is_some_and(|tx| tx.send(envelope).is_ok()),
            Err(_) => false,
        };
        if !sent {
            return Reply::error(503, "the VMM is not accepting requests");
        }
        if let Err(e) = self.kick.write(1) {
            error!("API server: cannot wake up the VMM: {e}");
        }
        let deadline = Instant::now() + self.response_timeout;
        loop {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match response_rx.recv_timeout(remaining.min(SHUTDOWN_POLL)) {
                Ok(response) => return Reply::from_response(response),
                Err(RecvTimeoutError::Disconnected) => {
                    return Reply::error(500, "the VMM dropped the request without answering")
                }
                Err(RecvTimeoutError::Timeout) => {
                    if self.shutdown.load(Ordering::SeqCst) {
                        return Reply::error(503, "API server is shutting down");
                    }
                    if Instant::now() >= deadline {
                        return Reply::error(
                            504,
                            format!(
                                "the VMM did not answer within {} ms",
                                self.response_timeout.as_millis()
                            ),
                        );
                    }
                }
            }
        }
    }

    /// Drops the VMM sender: later dispatches get 503.
    fn close(&self) {
        if let Ok(mut to_vmm) = self.to_vmm.lock() {
            to_vmm.take();
        }
    }
}

struct Worker {
    server: Arc<Server>,
    dispatcher: Arc<Dispatcher>,
    readers: BodyReaders,
    shutdown: Arc<AtomicBool>,
}

impl Worker {
    fn run(self) {
        while !self.shutdown.load(Ordering::SeqCst) {
            match self.server.recv_timeout(SHUTDOWN_POLL) {
                Ok(Some(request)) => self.handle(request),
                Ok(None) => {}
                Err(e) => {
                    warn!("API server: error receiving a request: {e}");
                    // Do not spin if the error repeats.
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
        // Requests already parsed but not served yet.
        while let Ok(Some(request)) = self.server.try_recv() {
            self.refuse(request, Reply::error(503, "API server is shutting down"));
        }
        debug!("API server thread exiting");
    }

    /// Serves a request without a body here; hands a request with one to a body reader.
    fn handle(&self, request: Request) {
        let method = request.method().as_str().to_string();
        let url = request.url().to_string();
        let chunked = request
            .headers()
            .iter()
            .any(|h| h.field.equiv("Transfer-Encoding"));
        let reply = if chunked {
            // tiny_http hands a chunked body to whoever reads it, without a length to check
            // first; the API's clients all send Content-Length.
            Reply::error(
                411,
                "chunked request bodies are not supported: send Content-Length",
            )
        } else {
            match request.body_length() {
                None | Some(0) => match parse_request(&method, &url, &[]) {
                    Err(reply) => reply,
                    Ok(api_request) => self.dispatcher.dispatch(api_request),
                },
                Some(length) if length > MAX_BODY_SIZE => {
                    // Refused on the announced length; tiny_http drains what the client sends
                    // anyway when the request is dropped, which a reader does.
                    let reply = Reply::error(
                        413,
                        format!(
                            "request body of {length} bytes is too large (limit {MAX_BODY_SIZE} bytes)"
                        ),
                    );
                    debug!("API {method} {url} -> 413");
                    self.refuse(request, reply);
                    return;
                }
                Some(length) => {
                    match self
                        .readers
                        .spawn(request, length, Arc::clone(&self.dispatcher))
                    {
                        None => {}
                        Some(request) => self.refuse(request, self.readers.busy_reply()),
                    }
                    return;
                }
            }
        };
        debug!("API {method} {url} -> {}", reply.status);
        respond(request, reply);
    }

    /// Answers `request` with `reply` off this thread: dropping a request whose body was not
    /// read makes tiny_http read (and discard) the rest of the body, which may never come.
    fn refuse(&self, request: Request, reply: Reply) {
        self.readers.refuse(request, reply);
    }
}

pub(crate) fn respond(request: Request, reply: Reply) {
    let status = reply.status;
    let result = match reply.body {
        None => request.respond(Response::empty(status)),
        Some(body) => {
            let mut response = Response::from_string(body)
                .with_status_code(status)
                .with_header(header("Content-Type", "application/json"));
            if let Some(allow) = reply.allow {
                response.add_header(header("Allow", allow));
            }
            request.respond(response)
        }
    };
    if let Err(e) = result {
        warn!("API server: cannot write the response: {e}");
    }
}

fn header(name: &str, value: &str) -> Header {
    // Only called with constant, valid ASCII names and values.
    Header::from_bytes(name.as_bytes(), value.as_bytes()).expect("valid ASCII header")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(method: &str, url: &str, body: &str) -> Reply {
        parse_request(method, url, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn routes() {
        let ok = |m: &str, u: &str, b: &str| parse_request(m, u, b.as_bytes()).unwrap();
        assert_eq!(ok("GET", "/vm/info", ""), ApiRequest::GetVmInfo);
        assert_eq!(ok("PUT", "/vm/power-off", ""), ApiRequest::PowerOff);
        assert_eq!(ok("GET", "/vm/memory", " \r\n"), ApiRequest::GetMemory);
        assert_eq!(
            ok("PUT", "/vm/memory", r#"{"requested_size": 1073741824}"#),
            ApiRequest::PutMemory(MemoryResizeRequest {
                requested_size: 1 << 30
            })
        );
        assert_eq!(ok("GET", "/vm/balloon", ""), ApiRequest::GetBalloon);
        assert_eq!(
            ok("PUT", "/vm/balloon", r#"{"size":0}"#),
            ApiRequest::PutBalloon(BalloonUpdate { size: 0 })
        );
        assert_eq!(
            ok("GET", "/vm/balloon/statistics", ""),
            ApiRequest::GetBalloonStatistics
        );
        assert_eq!(ok("GET", "/vm/counters", ""), ApiRequest::GetCounters);
        assert_eq!(ApiRequest::GetCounters.route(), ("GET", "/vm/counters"));
    }

    #[test]
    fn errors() {
        assert_eq!(err("GET", "/vm/nope", "").status, 404);
        assert_eq!(err("GET", "/vm/info/", "").status, 404);
        assert_eq!(err("GET", "/", "").status, 404);
        let r = err("POST", "/vm/memory", "");
        assert_eq!((r.status, r.allow), (405, Some("GET, PUT")));
        let r = err("GET", "/vm/power-off", "");
        assert_eq!((r.status, r.allow), (405, Some("PUT")));
        assert_eq!(err("GET", "/vm/info?x=1", "").status, 400);
        assert_eq!(err("GET", "/vm/info", "{}").status, 400);
        assert_eq!(err("PUT", "/vm/power-off", "{}").status, 400);
        let r = err("PUT", "/vm/counters", "");
        assert_eq!((r.status, r.allow), (405, Some("GET")));
        assert_eq!(err("GET", "/vm/counters", "{}").status, 400);
        assert_eq!(err("GET", "/vm/counters?device=disk0", "").status, 400);
        assert_eq!(err("GET", "/vm/counters/disk0", "").status, 404);

        let msg = |r: Reply| r.body.unwrap();
        let m = msg(err("PUT", "/vm/memory", ""));
        assert!(m.contains("requires a JSON request body"), "{m}");
        let m = msg(err("PUT", "/vm/memory", r#"{"requested_size": -1}"#));
        assert!(m.contains("invalid value: integer `-1`"), "{m}");
        let m = msg(err("PUT", "/vm/memory", r#"{"requested_size": 1.5}"#));
        assert!(m.contains("floating point"), "{m}");
        let m = msg(err("PUT", "/vm/memory", r#"{"requested_size": 1, "x": 2}"#));
        assert!(m.contains("unknown field `x`"), "{m}");
        let m = msg(err("PUT", "/vm/memory", r#"{}"#));
        assert!(m.contains("missing field `requested_size`"), "{m}");
        let m = msg(err("PUT", "/vm/memory", r#"{"requested_size": 1} x"#));
        assert!(m.contains("trailing characters"), "{m}");
        let m = msg(err("PUT", "/vm/balloon", r#"{"size": "1"}"#));
        assert!(m.contains("invalid type: string"), "{m}");
        let m = msg(err(
            "PUT",
            "/vm/balloon",
            r#"{"size": 18446744073709551616}"#,
        ));
        assert!(m.contains("PUT /vm/balloon"), "{m}");
    }

    #[test]
    fn response_helpers() {
        assert_eq!(ApiResponse::no_content().status(), 204);
        assert_eq!(
            ApiResponse::ok(&serde_json::json!({"a": 1})),
            ApiResponse::Json(200, serde_json::json!({"a": 1}))
        );
        let r = Reply::from_response(ApiResponse::error(409, "no balloon"));
        assert_eq!(r.status, 409);
        assert_eq!(r.body.unwrap(), r#"{"error":"no balloon"}"#);
        assert_eq!(
            Reply::from_response(ApiResponse::error(42, "x")).status,
            500
        );
    }
}
