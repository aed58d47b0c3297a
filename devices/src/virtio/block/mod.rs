//! The virtio block device (virtio 1.2, section 5.2), backed by a host file.
//!
//! - [`request`]: pure parsing and validation of descriptor chains;
//! - [`device`]: the [`Block`] device model and request execution;
//! - [`event_handler`]: queue processing on the VMM event loop;
//! - [`metrics`]: request counters.

pub mod device;
pub mod event_handler;
pub mod metrics;
pub mod request;

pub use device::{Block, BlockError, BLOCK_QUEUE_SIZE};
pub use metrics::{BlockMetrics, BlockMetricsSnapshot};
pub use request::{BlockRequest, InvalidRequest, RequestError, RequestKind};
