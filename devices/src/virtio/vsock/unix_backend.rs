//! The host side of vsock: Unix sockets in the "hybrid vsock" convention
//! of Firecracker and Cloud Hypervisor.
//!
//! - Host to guest: a host process connects to the device's socket `PATH`
//!   and writes `CONNECT <port>\n`; once the guest accepts, the device
//!   answers `OK <host_port>\n` and the stream is the connection. A refused
//!   or unanswered request closes the stream.
//! - Guest to host: a guest connecting to host port `P` reaches a listener
//!   at `PATH_P`; no listener there (or one whose backlog is full) means a
//!   reset for the guest.

use std::io::{self, ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Longest `CONNECT` line accepted, newline included.
pub const MAX_CONNECT_LINE: usize = 64;
/// How long a host client may take to send its `CONNECT` line.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Errors setting up the host socket.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The path exists and is not a socket (it is not removed).
    #[error("vsock socket path {0:?} exists and is not a socket")]
    NotASocket(PathBuf),
    /// Binding the listener failed.
    #[error("cannot listen on vsock socket {path:?}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The listener host clients connect to; its socket file is removed when it
/// is dropped.
#[derive(Debug)]
pub struct HostListener {
    path: PathBuf,
    listener: UnixListener,
}

impl HostListener {
    /// Listens on `path`, replacing a stale socket left there.
    pub fn bind(path: &Path) -> Result<Self, BackendError> {
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            if !meta.file_type().is_socket() {
                return Err(BackendError::NotASocket(path.to_owned()));
            }
            let _ = std::fs::remove_file(path);
        }
        let bind_err = |source| BackendError::Bind {
            path: path.to_owned(),
            source,
        };
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        listener.set_nonblocking(true).map_err(bind_err)?;
        Ok(Self {
            path: path.to_owned(),
            listener,
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A pending host client, if any (non-blocking).
    pub fn accept(&self) -> io::Result<Option<UnixStream>> {
        match self.listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(true)?;
                Ok(Some(stream))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Where a guest connection to host port `port` goes: `PATH_<port>`.
    pub fn port_path(&self, port: u32) -> PathBuf {
        let mut p = self.path.clone().into_os_string();
        p.push(format!("_{port}"));
        PathBuf::from(p)
    }
}

impl AsRawFd for HostListener {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for HostListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Why a `CONNECT` line is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectLineError {
    /// Not `CONNECT <port>`.
    #[error("expected 'CONNECT <port>'")]
    Malformed,
    /// The port is not a 32-bit number.
    #[error("invalid port")]
    BadPort,
}

/// Parses a `CONNECT <port>` line (without its newline; a trailing `\r` and
/// surrounding blanks are tolerated).
pub fn parse_connect_line(line: &[u8]) -> Result<u32, ConnectLineError> {
    let text = std::str::from_utf8(line).map_err(|_| ConnectLineError::Malformed)?;
    let rest = text
        .trim()
        .strip_prefix("CONNECT ")
        .ok_or(ConnectLineError::Malformed)?;
    rest.trim()
        .parse::<u32>()
        .map_err(|_| ConnectLineError::BadPort)
}

/// Where a host client's handshake stands after reading what it sent.
#[derive(Debug, PartialEq, Eq)]
pub enum HandshakeStep {
    /// The line is not complete yet.
    Pending,
    /// The client asked for this guest port.
    Connect(u32),
    /// The client sent garbage or hung up: close it.
    Failed,
}

/// A host client that has not finished its `CONNECT` line.
#[derive(Debug)]
pub struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

impl Handshake {
    /// A freshly accepted client.
    pub fn new(stream: UnixStream, now: Instant) -> Self {
        Self {
            stream,
            line: Vec::new(),
            deadline: now + HANDSHAKE_TIMEOUT,
        }
    }

    /// When the client is given up.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The client's stream.
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The stream, once the handshake is over.
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Reads what the client sent, a byte at a time so that data after the
    /// line stays in the stream for the guest.
    pub fn advance(&mut self) -> HandshakeStep {
        let mut byte = [0u8; 1];
        loop {
            match self.stream.read(&mut byte) {
                Ok(0) => return HandshakeStep::Failed,
                Ok(_) if byte[0] == b'\n' => {
                    return match parse_connect_line(&self.line) {
                        Ok(port) => HandshakeStep::Connect(port),
                        Err(e) => {
                            log::debug!("vsock: host client sent a bad line: {e}");
                            HandshakeStep::Failed
                        }
                    };
                }
                Ok(_) => {
                    self.line.push(byte[0]);
                    if self.line.len() >= MAX_CONNECT_LINE {
                        return HandshakeStep::Failed;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return HandshakeStep::Pending,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return HandshakeStep::Failed,
            }
        }
    }
}

/// Connects to the Unix socket at `path` without blocking: a listener
/// whose backlog is full refuses (`WouldBlock`) instead of stalling the
/// event loop. The stream is non-blocking.
pub fn connect_nonblocking(path: &Path) -> io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or_default();
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh socket we own and nothing else refers to.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>())
        .map_err(|_| io::Error::from(ErrorKind::InvalidInput))?;
    // SAFETY: addr is a valid sockaddr_un of `len` bytes for the call.
    let ret = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    };
    if ret != 0 {
        // EAGAIN: the listener's backlog is full. Unix sockets never
        // return EINPROGRESS.
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("tidevm-vsock-{}-{name}", std::process::id()))
    }

    #[test]
    fn connect_lines() {
        assert_eq!(parse_connect_line(b"CONNECT 1024"), Ok(1024));
        assert_eq!(parse_connect_line(b"CONNECT 4294967295\r"), Ok(u32::MAX));
        assert_eq!(parse_connect_line(b" CONNECT  52 "), Ok(52));
        assert_eq!(
            parse_connect_line(b"CONNECT 4294967296"),
            Err(ConnectLineError::BadPort)
        );
        assert_eq!(
            parse_connect_line(b"CONNECT -1"),
            Err(ConnectLineError::BadPort)
        );
        assert_eq!(
            parse_connect_line(b"CONNECT"),
            Err(ConnectLineError::Malformed)
        );
        assert_eq!(
            parse_connect_line(b"connect 5"),
            Err(ConnectLineError::Malformed)
        );
        assert_eq!(parse_connect_line(b""), Err(ConnectLineError::Malformed));
        assert_eq!(
            parse_connect_line(&[0xff, 0xfe]),
            Err(ConnectLineError::Malformed)
        );
    }

    #[test]
    fn handshakes_leave_the_data_after_the_line() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut h = Handshake::new(ours, Instant::now());
        assert_eq!(h.advance(), HandshakeStep::Pending);
        theirs.write_all(b"CONNECT 12").unwrap();
        assert_eq!(h.advance(), HandshakeStep::Pending);
        theirs.write_all(b"34\nhello").unwrap();
        assert_eq!(h.advance(), HandshakeStep::Connect(1234));
        let mut s = h.into_stream();
        let mut rest = [0u8; 5];
        s.read_exact(&mut rest).unwrap();
        assert_eq!(&rest, b"hello");

        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut h = Handshake::new(ours, Instant::now());
        theirs.write_all(&[b'A'; MAX_CONNECT_LINE]).unwrap();
        assert_eq!(h.advance(), HandshakeStep::Failed, "overlong line");

        let (ours, theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut h = Handshake::new(ours, Instant::now());
        drop(theirs);
        assert_eq!(h.advance(), HandshakeStep::Failed, "hang-up");
    }

    #[test]
    fn listener_paths_and_connect() {
        let path = temp_path("listener");
        std::fs::write(&path, b"not a socket").unwrap();
        assert!(matches!(
            HostListener::bind(&path),
            Err(BackendError::NotASocket(_))
        ));
        std::fs::remove_file(&path).unwrap();
        let l = HostListener::bind(&path).unwrap();
        assert_eq!(
            l.port_path(1024),
            PathBuf::from(format!("{}_1024", path.display()))
        );
        assert!(l.accept().unwrap().is_none());
        let _client = connect_nonblocking(&path).unwrap();
        assert!(l.accept().unwrap().is_some());
        // A stale socket file is replaced; dropping removes it.
        drop(l);
        assert!(!path.exists());
        let stale = UnixListener::bind(&path).unwrap();
        drop(stale);
        let l = HostListener::bind(&path).unwrap();
        drop(l);
        assert!(!path.exists());
        // Nobody listening: refused at once.
        let err = connect_nonblocking(&temp_path("nobody")).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::NotFound);
        let long = PathBuf::from("/".repeat(200));
        assert!(connect_nonblocking(&long).is_err());
    }
}
