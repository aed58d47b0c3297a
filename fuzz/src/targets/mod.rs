//! One module per fuzz target. Each has `run(data)`, which states and
//! checks the target's invariants, and `seeds()`, the inputs of its seed
//! corpus.

pub mod api_http;
pub mod api_request;
pub mod balloon_pfns;
pub mod balloon_queue;
pub mod balloon_stats;
pub mod blk_queue;
pub mod blk_request;
pub mod ch_api_body;
pub mod cli_options;
pub mod virtio_mem_queue;
pub mod virtio_mem_request;
pub mod virtio_mmio;
pub mod vsock_packets;

pub mod hyperv;
