//! virtio-balloon: inflate/deflate, statistics, free page reporting.
//!
//! The device (virtio id 5) lets the VMM ask the guest to give memory back
//! ([`Balloon::set_target_size`]). The guest answers by inflating the
//! balloon: it sends the 4 KiB page frame numbers it gave up, and the device
//! discards them (`madvise(MADV_DONTNEED)`, plus a hole punch for file-backed
//! memory) through [`crate::discard::discard_range`]. With free page
//! reporting the guest also reports ranges of free memory, which are
//! discarded the same way. With the statistics queue the guest reports its
//! memory statistics every `stats_period_s` seconds.
//!
//! Queues, in order: inflateq, deflateq, then statsq if
//! `VIRTIO_BALLOON_F_STATS_VQ` was negotiated, then reporting_vq if
//! `VIRTIO_BALLOON_F_FREE_PAGE_REPORTING` was negotiated. Queues of features
//! that are not negotiated do not take an index (Linux numbers the queues it
//! creates consecutively), so reporting_vq is queue 2 when the stats queue is
//! absent.

mod device;
mod event_handler;
pub mod page_set;
pub mod request;
pub mod stats;

pub use device::{Balloon, BalloonMetrics, QueueRole};
pub use stats::BalloonStats;

/// The virtio device id of the memory balloon.
pub const VIRTIO_ID_BALLOON: u32 = 5;

/// Feature: the driver must tell the host before reusing deflated pages
/// (not offered: deflated pages need no host action here).
pub const VIRTIO_BALLOON_F_MUST_TELL_HOST: u64 = 1 << 0;
/// Feature: the statistics queue is present.
pub const VIRTIO_BALLOON_F_STATS_VQ: u64 = 1 << 1;
/// Feature: the guest deflates the balloon when it runs out of memory.
pub const VIRTIO_BALLOON_F_DEFLATE_ON_OOM: u64 = 1 << 2;
/// Feature: free page hinting (not offered).
pub const VIRTIO_BALLOON_F_FREE_PAGE_HINT: u64 = 1 << 3;
/// Feature: page poisoning (not offered).
pub const VIRTIO_BALLOON_F_PAGE_POISON: u64 = 1 << 4;
/// Feature: free page reporting queue is present.
pub const VIRTIO_BALLOON_F_FREE_PAGE_REPORTING: u64 = 1 << 5;

/// Size of each queue offered by the device.
pub const BALLOON_QUEUE_SIZE: u16 = 256;
/// Size of the configuration space (`num_pages`, `actual`,
/// `free_page_hint_cmd_id`, `poison_val`; all le32).
pub const BALLOON_CONFIG_SPACE_SIZE: usize = 16;

/// How the balloon is set up by the VMM.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BalloonConfig {
    /// Target balloon size in bytes (a multiple of 4 KiB).
    pub target_size: u64,
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Offer `VIRTIO_BALLOON_F_FREE_PAGE_REPORTING`.
    pub free_page_reporting: bool,
    /// Statistics period in seconds; 0 disables (and does not offer) the
    /// statistics queue.
    pub stats_period_s: u64,
}

/// Errors of the balloon device's VMM-facing API.
#[derive(Debug, thiserror::Error)]
pub enum BalloonError {
    /// The target size is not a multiple of 4 KiB.
    #[error("balloon target size {0:#x} is not a multiple of 4 KiB")]
    UnalignedTarget(u64),
    /// The target size, in 4 KiB pages, does not fit the 32-bit `num_pages`.
    #[error("balloon target size {0:#x} is too large (num_pages is 32-bit)")]
    TargetTooLarge(u64),
    /// Creating a queue eventfd failed.
    #[error("failed to create a balloon queue eventfd: {0}")]
    EventFd(std::io::Error),
    /// Creating or arming the statistics timer failed.
    #[error("balloon statistics timer failed: {0}")]
    Timer(std::io::Error),
    /// Statistics were not enabled when the device was created.
    #[error("the balloon statistics queue is not enabled")]
    StatsDisabled,
    /// Raising an interrupt failed.
    #[error("failed to raise the balloon interrupt: {0}")]
    Interrupt(std::io::Error),
}
