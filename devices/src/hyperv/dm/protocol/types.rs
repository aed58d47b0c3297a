//! What the VMM gives [`super::DmProtocol`] and gets back: configuration,
//! outputs and actions, errors, counters and reports.

use std::time::Instant;

use super::super::message::{DmError, DmVersion, GuestCapabilities, StatusReport};
use super::super::ranges::PageRange;

/// Size of a DM page.
pub const DM_PAGE_SIZE: u64 = 4096;
/// Default largest BALLOON_REQUEST (1 GiB of pages).
pub const DEFAULT_BALLOON_CHUNK_PAGES: u32 = 1 << 18;
/// Default largest hot-add request (2 GiB of pages, as QEMU), unless one
/// alignment block is larger.
pub const DEFAULT_HOT_ADD_CHUNK_PAGES: u64 = 1 << 19;
/// Most UNBALLOON_REQUEST messages in one transaction, so that a
/// transaction (≤ 3 × 4120 ring bytes) fits the 16 KiB host→guest ring.
pub const UNBALLOON_MESSAGES_PER_TRANSACTION: usize = 3;

/// What the VMM tells the protocol about the guest's memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmConfig {
    /// Guest RAM present at boot (excluding MMIO holes), in pages.
    pub boot_ram: Vec<PageRange>,
    /// The hotplug window hot-add may fill, in pages; `None` disables
    /// hot-add.
    pub hotplug_window: Option<PageRange>,
    /// Largest BALLOON_REQUEST.
    pub max_balloon_request_pages: u32,
    /// Largest hot-add request (rounded down to the guest's alignment, or
    /// one alignment block if that is larger).
    pub max_hot_add_request_pages: u64,
    /// Send INFO_MESSAGE (maximum memory = boot RAM + window) after the
    /// capabilities exchange, for protocol 1.0 and later.
    pub announce_max_memory: bool,
}

impl DmConfig {
    /// A configuration with default chunk sizes.
    pub fn new(boot_ram: Vec<PageRange>, hotplug_window: Option<PageRange>) -> Self {
        Self {
            boot_ram,
            hotplug_window,
            max_balloon_request_pages: DEFAULT_BALLOON_CHUNK_PAGES,
            max_hot_add_request_pages: DEFAULT_HOT_ADD_CHUNK_PAGES,
            announce_max_memory: false,
        }
    }
}

/// A configuration the protocol cannot work with.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// No boot RAM.
    #[error("the DM configuration has no boot RAM")]
    NoBootRam,
    /// The hotplug window overlaps boot RAM.
    #[error("hotplug window {0:?} overlaps boot RAM")]
    WindowOverlapsRam(PageRange),
    /// The hotplug window is empty or ends beyond the 40-bit PFN limit.
    #[error("hotplug window {0:?} is empty or ends beyond PFN 2^40")]
    BadWindow(PageRange),
    /// A chunk size is zero.
    #[error("DM request chunk sizes must not be zero")]
    ZeroChunk,
}

/// Where the handshake is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for an acceptable VERSION_REQUEST.
    AwaitingVersion,
    /// Version agreed, waiting for CAPABILITIES_REPORT.
    AwaitingCapabilities,
    /// Handshake done: requests may be sent.
    Ready,
}

/// Whether hot-add requests may be sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HotAddState {
    /// Hot-add is tried when the target needs it.
    Enabled,
    /// The last attempt failed transiently (result 0, or the VMM could not
    /// map); retried after the next `set_target`.
    Paused,
    /// The guest refused for good (result 1 with 0 pages: `hot_add=0`, S4,
    /// or an earlier -EEXIST) or accepted less than asked; stays off until
    /// a reset.
    Stopped,
}

/// Why pages a guest reported as ballooned were not accepted (they are not
/// discarded and not tracked).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Not guest RAM: MMIO holes, beyond RAM, or hotplug window memory not
    /// hot-added.
    OutsideRam,
    /// Already ballooned (or orphaned by an earlier driver instance).
    AlreadyBallooned,
    /// Beyond the pages the outstanding request asked for.
    ExceedsRequest,
    /// No balloon request was outstanding.
    Unsolicited,
}

/// What the VMM must do, before sending the messages of the same output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DmAction {
    /// The guest gave these pages up: discard them now (merged ranges).
    DiscardRanges(Vec<PageRange>),
    /// Make these pages of the hotplug window present (memslot) and call
    /// [`super::DmProtocol::hot_add_mapped`], or
    /// [`super::DmProtocol::hot_add_map_failed`].
    MapForHotAdd {
        /// First page.
        pfn: u64,
        /// Number of pages.
        count: u64,
    },
    /// These mapped hotplug pages were not added by the guest: they may be
    /// unmapped.
    ReleaseHotAdd {
        /// First page.
        pfn: u64,
        /// Number of pages.
        count: u64,
    },
}

/// The result of one protocol step.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DmOutput {
    /// Perform these first, in order.
    pub actions: Vec<DmAction>,
    /// Then send these host messages, in order (each ≤ 4096 bytes; queue
    /// them if the ring is full).
    pub messages: Vec<Vec<u8>>,
}

/// Why a guest message or VMM call was not acted on. The state machine is
/// unchanged and keeps serving.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    /// The bytes are not a valid guest DM message.
    #[error("malformed DM message: {0}")]
    Malformed(#[from] DmError),
    /// A valid message at the wrong point of the handshake.
    #[error("{message} received while {phase:?}")]
    UnexpectedInPhase {
        /// The message.
        message: &'static str,
        /// The phase it arrived in.
        phase: Phase,
    },
    /// A response no request is waiting for.
    #[error("{0} received with no matching request outstanding")]
    Unsolicited(&'static str),
    /// `hot_add_mapped` / `hot_add_map_failed` without a pending mapping,
    /// or for another range.
    #[error("no hot-add mapping of {0:?} is pending")]
    NoHotAddPending(PageRange),
}

/// Counters since creation (not cleared by [`super::DmProtocol::reset`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DmCounters {
    /// Guest messages that did not parse.
    pub malformed_messages: u64,
    /// Valid guest messages out of phase or unsolicited.
    pub unexpected_messages: u64,
    /// VERSION_REQUESTs refused.
    pub versions_refused: u64,
    /// VERSION_REQUESTs that restarted a running protocol (driver reload
    /// without a channel reset).
    pub implicit_resets: u64,
    /// STATUS_REPORTs received.
    pub status_reports: u64,
    /// BALLOON_REQUESTs sent.
    pub balloon_requests: u64,
    /// Pages accepted from BALLOON_RESPONSEs.
    pub ballooned_pages: u64,
    /// Reported pages rejected as [`RejectReason::OutsideRam`].
    pub rejected_outside_ram: u64,
    /// Reported pages rejected as [`RejectReason::AlreadyBallooned`].
    pub rejected_already_ballooned: u64,
    /// Reported pages rejected as [`RejectReason::ExceedsRequest`].
    pub rejected_exceeds_request: u64,
    /// Reported pages rejected as [`RejectReason::Unsolicited`].
    pub rejected_unsolicited: u64,
    /// UNBALLOON_REQUEST messages sent.
    pub unballoon_messages: u64,
    /// Pages returned by unballooning.
    pub unballooned_pages: u64,
    /// Hot-add requests sent.
    pub hot_add_requests: u64,
    /// Pages the guest hot-added.
    pub hot_added_pages: u64,
    /// Hot-add requests that failed wholly or partly (including mapping
    /// failures).
    pub hot_add_failures: u64,
    /// Hot-add responses with more pages than asked or a count that is not
    /// a whole number of blocks.
    pub hot_add_anomalies: u64,
    /// Host messages that could not be encoded (a bug; nothing is sent).
    pub encode_errors: u64,
}

/// The last status report and when it arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusSample {
    /// The report.
    pub report: StatusReport,
    /// When the caller received it.
    pub at: Instant,
}

/// A snapshot for API answers and logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmReport {
    /// Handshake phase.
    pub phase: Phase,
    /// Agreed protocol version.
    pub version: Option<DmVersion>,
    /// The guest's capabilities.
    pub capabilities: Option<GuestCapabilities>,
    /// The target guest size, if set.
    pub target_bytes: Option<u64>,
    /// Guest memory now: boot RAM + hot-added − ballooned − orphaned.
    pub guest_bytes: u64,
    /// Memory the current driver ballooned (and the host discarded).
    pub ballooned_bytes: u64,
    /// Memory an earlier driver instance ballooned: discarded, never
    /// returned.
    pub orphaned_bytes: u64,
    /// Memory hot-added into the hotplug window.
    pub hot_added_bytes: u64,
    /// Whether hot-add may be tried.
    pub hot_add: HotAddState,
    /// Whether an operation is outstanding.
    pub busy: bool,
    /// The last status report.
    pub last_status: Option<StatusSample>,
    /// Counters.
    pub counters: DmCounters,
}

/// What a reset means for guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmReset {
    /// The channel was closed and reopened (hv_balloon reloaded) in the same
    /// guest kernel: ballooned pages become orphaned (the new driver does
    /// not own them), hot-added memory stays.
    ChannelReopened,
    /// The guest kernel restarted (reboot): nothing is ballooned or
    /// hot-added any more, and the target is cleared. The VMM unmaps the
    /// whole hotplug window itself.
    GuestRestarted,
}
