//! virtio-rng, the entropy device (virtio 1.2, 5.4): the guest queues
//! device-writable buffers and the device fills them from a host source
//! (`/dev/urandom` by default).
//!
//! - [`device`]: [`Rng`], the queue and the source;
//! - `event_handler`: the wiring to the VMM event loop.

pub mod device;
mod event_handler;

pub use device::{open_source, Rng, RngError, RngMetrics};

/// The virtio device id of an entropy source.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Size of the only queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes given for one request, whatever the buffer size.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
