//! virtio-vsock (virtio 1.2, 5.10) with the hybrid Unix-socket backend of
//! Firecracker and Cloud Hypervisor.
//!
//! The guest (at its CID) talks `AF_VSOCK` stream sockets to the host (CID
//! 2). Host processes reach it through one Unix socket: connect, write
//! `CONNECT <port>\n`, read `OK <host_port>\n`, then the stream is the
//! connection. A guest connecting to host port P reaches the Unix listener
//! at `<socket>_P`.
//!
//! - [`packet`]: the packet header and the checks of guest packets (pure);
//! - [`connection`]: one connection's state machine and flow control;
//! - [`muxer`]: all connections, their host sockets and RX order;
//! - [`unix_backend`]: the listener, the `CONNECT` handshake, connecting
//!   to `<socket>_P` without blocking;
//! - [`device`]: [`Vsock`], queues and configuration space;
//! - `event_handler`: the wiring to the VMM event loop.

pub mod connection;
pub mod device;
mod event_handler;
pub mod muxer;
pub mod packet;
pub mod unix_backend;

pub use device::Vsock;
pub use muxer::VsockMetrics;

/// The virtio device id of a socket device.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// Size of each of the three queues (rx, tx, event).
pub const QUEUE_SIZE: u16 = 256;

/// Errors creating a vsock device.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// The CID is reserved or too large.
    #[error("guest CID {0} is invalid: use 3 or more, below 2^32 - 1")]
    InvalidCid(u64),
    /// The host socket cannot be set up.
    #[error(transparent)]
    Backend(#[from] unix_backend::BackendError),
    /// An eventfd cannot be created.
    #[error("cannot create a vsock queue eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// The muxer's epoll set or timer cannot be created.
    #[error("cannot set up the vsock event set: {0}")]
    Epoll(#[source] std::io::Error),
}
