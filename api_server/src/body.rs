//! Request bodies, read off the serving thread: each on a reader thread, under a deadline, with
//! the number of reader threads capped.
//!
//! tiny_http parses request heads on its own per-connection threads, and buffers bodies of up
//! to 1 KiB there too; a longer body is read by whoever reads the [`Request`], and when a
//! request is dropped with part of its body unread, tiny_http reads and discards the rest in
//! the drop. Either can block for as long as the client likes, so the serving thread never
//! does them: a reader thread reads the body, has the request parsed and dispatched to the VMM,
//! writes the answer and drops the request. The serving thread only counts readers, and
//! refuses a body when [`ApiServerConfig::max_body_readers`](crate::ApiServerConfig) of them
//! are busy.

use std::io::{self, ErrorKind, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{debug, warn};
use tiny_http::Request;

use crate::server::{parse_request, respond, Dispatcher, Reply};

/// Name of the body reader threads.
const READER_THREAD_NAME: &str = "tidevm-api-body";

/// Name of the thread that answers refused requests when every reader is busy.
const REFUSAL_THREAD_NAME: &str = "tidevm-api-refuse";

/// The body readers of one server.
pub(crate) struct BodyReaders {
    /// Reader threads alive now (reading, waiting for the VMM, or draining a refused body).
    active: Arc<AtomicUsize>,
    max: usize,
    timeout: Duration,
    /// Refused requests when no reader is free, answered one after the other.
    refusals: Sender<(Request, Reply)>,
}

/// One reader thread's place in [`BodyReaders::active`], given back when the thread ends.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl BodyReaders {
    /// Readers for bodies that must arrive within `timeout`, at most `max` at a time.
    pub(crate) fn new(max: usize, timeout: Duration) -> io::Result<Self> {
        let (refusals, refused) = mpsc::channel::<(Request, Reply)>();
        // Detached: it may be blocked on a client that neither sends nor closes; it ends when
        // the serving thread is gone and the queue is empty.
        std::thread::Builder::new()
            .name(REFUSAL_THREAD_NAME.to_string())
            .spawn(move || {
                for (request, reply) in refused {
                    respond(request, reply);
                }
            })?;
        Ok(BodyReaders {
            active: Arc::new(AtomicUsize::new(0)),
            max,
            timeout,
            refusals,
        })
    }

    /// The number of reader threads alive, shared with [`crate::ApiServerHandle`].
    pub(crate) fn active(&self) -> Arc<AtomicUsize> {
        Arc::clone(&self.active)
    }

    fn acquire(&self) -> Option<Slot> {
        self.active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .ok()?;
        Some(Slot(Arc::clone(&self.active)))
    }

    /// Reads the body of `request` (announced as `length` bytes, at most
    /// [`crate::MAX_BODY_SIZE`]) on a reader thread, which then has the request served. Gives
    /// the request back when every reader is busy.
    pub(crate) fn spawn(
        &self,
        request: Request,
        length: usize,
        dispatcher: Arc<Dispatcher>,
    ) -> Option<Request> {
        let Some(slot) = self.acquire() else {
            return Some(request);
        };
        let deadline = Instant::now() + self.timeout;
        let timeout = self.timeout;
        self.run(request, slot, move |request| {
            serve(request, length, deadline, timeout, &dispatcher)
        })
    }

    /// Answers `request` with `reply` without reading its body, on a reader thread if one is
    /// free, else on the refusal thread (after the refusals before it).
    pub(crate) fn refuse(&self, request: Request, reply: Reply) {
        let request = match self.acquire() {
            Some(slot) => {
                let on_thread = reply.clone();
                match self.run(request, slot, move |request| respond(request, on_thread)) {
                    None => return,
                    Some(request) => request,
                }
            }
            None => request,
        };
        if self.refusals.send((request, reply)).is_err() {
            warn!("API server: the refusal thread is gone");
        }
    }

    /// The answer to a body that finds every reader busy.
    pub(crate) fn busy_reply(&self) -> Reply {
        Reply::error(
            503,
            format!(
                "too many requests with a body in progress (limit {}); retry later",
                self.max
            ),
        )
    }

    /// Runs `serve` on a new reader thread holding `slot`. Gives `request` back if the thread
    /// cannot be spawned.
    fn run(
        &self,
        request: Request,
        slot: Slot,
        serve: impl FnOnce(Request) + Send + 'static,
    ) -> Option<Request> {
        let cell = Arc::new(Mutex::new(Some(request)));
        let thread_cell = Arc::clone(&cell);
        let spawned = std::thread::Builder::new()
            .name(READER_THREAD_NAME.to_string())
            .spawn(move || {
                let _slot = slot;
                let request = thread_cell.lock().ok().and_then(|mut r| r.take());
                drop(thread_cell);
                if let Some(request) = request {
                    serve(request);
                }
            });
        match spawned {
            Ok(_) => None,
            Err(e) => {
                warn!("API server: cannot spawn a body reader: {e}");
                cell.lock().ok().and_then(|mut r| r.take())
            }
        }
    }
}

/// A reader thread: reads the body, parses and dispatches the request, writes the answer.
fn serve(
    mut request: Request,
    length: usize,
    deadline: Instant,
    timeout: Duration,
    dispatcher: &Dispatcher,
) {
    let method = request.method().as_str().to_string();
    let url = request.url().to_string();
    let reply = match read_body(request.as_reader(), length, deadline, timeout) {
        Err(reply) => reply,
        Ok(body) => match parse_request(&method, &url, &body) {
            Err(reply) => reply,
            Ok(api_request) => dispatcher.dispatch(api_request),
        },
    };
    debug!("API {method} {url} -> {}", reply.status);
    // Writes the answer first; if the body is unfinished (408), tiny_http then drains the
    // rest, which holds this thread until the client sends it or closes.
    respond(request, reply);
}

/// Reads exactly `length` bytes from `reader`, or returns the error reply: 408 when the body
/// is still unfinished after `deadline` (checked each time bytes arrive), 400 when the client
/// ends it early.
pub(crate) fn read_body(
    reader: &mut dyn Read,
    length: usize,
    deadline: Instant,
    timeout: Duration,
) -> Result<Vec<u8>, Reply> {
    let mut body = vec![0u8; length];
    let mut filled = 0;
    while filled < length {
        if Instant::now() >= deadline {
            return Err(Reply::error(
                408,
                format!(
                    "request body not received within {} ms ({filled} of {length} bytes)",
                    timeout.as_millis()
                ),
            ));
        }
        match reader.read(&mut body[filled..]) {
            Ok(0) => {
                return Err(Reply::error(
                    400,
                    format!("request body ended after {filled} of {length} bytes"),
                ))
            }
            Ok(n) => filled += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            // The socket's read timeout (tiny_http::READ_IDLE_TIMEOUT) ended a silent wait.
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(Reply::error(
                    408,
                    format!(
                        "request body not received: nothing arrived for {} s ({filled} of {length} bytes)",
                        tiny_http::READ_IDLE_TIMEOUT.as_secs()
                    ),
                ))
            }
            Err(e) => return Err(Reply::error(400, format!("cannot read request body: {e}"))),
        }
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Yields its chunks one read at a time, sleeping `pause` before each.
    struct Trickle {
        chunks: Vec<&'static [u8]>,
        pause: Duration,
    }

    impl Read for Trickle {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            std::thread::sleep(self.pause);
            if self.chunks.is_empty() {
                return Ok(0);
            }
            let chunk = self.chunks.remove(0);
            buf[..chunk.len()].copy_from_slice(chunk);
            Ok(chunk.len())
        }
    }

    #[test]
    fn read_body_outcomes() {
        let far = Instant::now() + Duration::from_secs(600);
        let t = Duration::from_secs(600);
        let mut r = Trickle {
            chunks: vec![b"ab", b"c"],
            pause: Duration::ZERO,
        };
        assert_eq!(read_body(&mut r, 3, far, t).unwrap(), b"abc");

        let mut r = Trickle {
            chunks: vec![b"ab"],
            pause: Duration::ZERO,
        };
        let e = read_body(&mut r, 3, far, t).unwrap_err();
        assert_eq!(e.status, 400);
        assert!(e.body.unwrap().contains("ended after 2 of 3 bytes"));

        // The deadline passes while bytes are still coming.
        let mut r = Trickle {
            chunks: vec![b"a", b"b", b"c"],
            pause: Duration::from_millis(20),
        };
        let soon = Instant::now() + Duration::from_millis(30);
        let e = read_body(&mut r, 3, soon, Duration::from_millis(30)).unwrap_err();
        assert_eq!(e.status, 408);
        assert!(e.body.unwrap().contains("within 30 ms"));
    }
}
