//! virtio-mem: a device-owned memory region the guest plugs in blocks.
//!
//! The device (virtio 1.2 "Memory Device", id 24) manages one region of guest
//! physical address space, cut into `block_size` blocks that are either
//! plugged (usable RAM) or unplugged (no host memory behind, inaccessible).
//! The VMM asks for a size through [`VirtioMem::set_requested_size`]; the
//! guest driver then sends PLUG / UNPLUG requests for blocks of its choice
//! and the device applies them through a [`MemoryBackend`] (the VMM's memory
//! manager).
//!
//! - [`request`]: parsing of request descriptor chains (pure parts fuzzable).
//! - [`bitmap`]: the plugged-block bitmap and its contiguous runs.
//! - [`device`]: [`VirtioMem`], the [`crate::virtio::VirtioDevice`] model.
//! - `event_handler`: queue processing on the VMM event loop.

pub mod bitmap;
pub mod device;
mod event_handler;
pub mod request;

pub use device::{
    BackendError, MemError, MemMetrics, MemoryBackend, VirtioMem, VirtioMemConfig,
    VIRTIO_MEM_CONFIG_SIZE, VIRTIO_MEM_F_ACPI_PXM, VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE,
};
pub use request::{BlockState, MemRequest, MemResponse, ResponseType};

/// The virtio device id of a memory device.
pub const VIRTIO_ID_MEM: u32 = 24;

/// Size of the only queue (guest-request) the device offers.
pub const QUEUE_SIZE: u16 = 128;

/// Smallest block size the device accepts (one 4 KiB page).
pub const MIN_BLOCK_SIZE: u64 = 4096;
