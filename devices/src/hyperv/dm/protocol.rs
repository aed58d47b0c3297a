//! The host side of the Dynamic Memory protocol, as a state machine.
//!
//! [`DmProtocol`] takes the guest's messages as bytes
//! ([`DmProtocol::handle_guest_message`]) and the VMM's wishes
//! ([`DmProtocol::set_target`]) and answers with a [`DmOutput`]: actions the
//! VMM performs first (discard pages, map or release hot-add memory), then
//! host messages to send in order. It owns no memory, thread or file.
//!
//! Bring-up: VERSION_REQUEST (2.0, 1.0 and 0.3 are accepted; anything else
//! is refused so the guest falls back), CAPABILITIES_REPORT (always
//! accepted; balloon, hot_add and the hot-add alignment are recorded), then
//! the machine is ready at once: no post-capabilities delay and no wait for
//! a status report.
//!
//! One operation is outstanding at a time, chosen from the target guest size
//! (`boot RAM + hot-added − ballooned − orphaned`):
//! - above target: BALLOON_REQUEST for the difference (in chunks); the
//!   guest's BALLOON_RESPONSEs are checked page by page against guest RAM
//!   and earlier reports; accepted pages come back as
//!   [`DmAction::DiscardRanges`]. A guest that gives less than asked (its
//!   balloon floor) is not asked again until the next `set_target`.
//! - below target: first UNBALLOON_REQUESTs returning pages the guest gave
//!   (never anything else), then hot-add of whole aligned blocks of the
//!   hotplug window: [`DmAction::MapForHotAdd`] first, and the request is
//!   sent only when the VMM calls [`DmProtocol::hot_add_mapped`].

use std::time::Instant;

use super::codec::{parse_guest_message, split_unballoon};
use super::message::{
    DmVersion, GuestCapabilities, GuestDmMessage, HostDmMessage, MAX_RANGES_PER_MESSAGE,
    MAX_RANGE_PAGES, PFN_LIMIT,
};
use super::ranges::{PageRange, RangeSet};

mod types;

pub use types::{
    ConfigError, DmAction, DmConfig, DmCounters, DmOutput, DmReport, DmReset, HotAddState, Phase,
    ProtocolError, RejectReason, StatusSample, DEFAULT_BALLOON_CHUNK_PAGES,
    DEFAULT_HOT_ADD_CHUNK_PAGES, DM_PAGE_SIZE, UNBALLOON_MESSAGES_PER_TRANSACTION,
};

/// The operation outstanding with the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Operation {
    Idle,
    Ballooning { requested: u64, received: u64 },
    Unballooning,
    HotAddMapping(PageRange),
    HotAdding(PageRange),
}

/// The host's Dynamic Memory state machine.
#[derive(Debug)]
pub struct DmProtocol {
    config: DmConfig,
    boot_ram: RangeSet,
    phase: Phase,
    version: Option<DmVersion>,
    caps: Option<GuestCapabilities>,
    last_status: Option<StatusSample>,
    target_pages: Option<u64>,
    op: Operation,
    balloon_stalled: bool,
    ballooned: RangeSet,
    orphaned: RangeSet,
    hot_added: RangeSet,
    hot_add_next: Option<u64>,
    hot_add: HotAddState,
    next_trans_id: u32,
    counters: DmCounters,
}

fn align_up(v: u64, align: u64) -> Option<u64> {
    v.checked_next_multiple_of(align)
}

fn align_down(v: u64, align: u64) -> u64 {
    v - v % align.max(1)
}

impl DmProtocol {
    /// A protocol waiting for the guest's VERSION_REQUEST.
    pub fn new(config: DmConfig) -> Result<Self, ConfigError> {
        let boot_ram: RangeSet = config.boot_ram.iter().copied().collect();
        if boot_ram.is_empty() {
            return Err(ConfigError::NoBootRam);
        }
        if let Some(w) = config.hotplug_window {
            if w.is_empty() || w.start.checked_add(w.count).is_none_or(|e| e > PFN_LIMIT) {
                return Err(ConfigError::BadWindow(w));
            }
            if boot_ram.overlaps(w) {
                return Err(ConfigError::WindowOverlapsRam(w));
            }
        }
        if config.max_balloon_request_pages == 0 || config.max_hot_add_request_pages == 0 {
            return Err(ConfigError::ZeroChunk);
        }
        Ok(Self {
            config,
            boot_ram,
            phase: Phase::AwaitingVersion,
            version: None,
            caps: None,
            last_status: None,
            target_pages: None,
            op: Operation::Idle,
            balloon_stalled: false,
            ballooned: RangeSet::new(),
            orphaned: RangeSet::new(),
            hot_added: RangeSet::new(),
            hot_add_next: None,
            hot_add: HotAddState::Enabled,
            next_trans_id: 0,
            counters: DmCounters::default(),
        })
    }

    /// Guest memory now, in pages.
    pub fn guest_pages(&self) -> u64 {
        (self.boot_ram.total_pages() + self.hot_added.total_pages())
            .saturating_sub(self.ballooned.total_pages() + self.orphaned.total_pages())
    }

    /// Pages the current driver ballooned, merged.
    pub fn ballooned_ranges(&self) -> impl Iterator<Item = PageRange> + '_ {
        self.ballooned.iter()
    }

    /// Ranges of the hotplug window the guest hot-added.
    pub fn hot_added_ranges(&self) -> impl Iterator<Item = PageRange> + '_ {
        self.hot_added.iter()
    }

    /// A snapshot of the state and counters.
    pub fn report(&self) -> DmReport {
        DmReport {
            phase: self.phase,
            version: self.version,
            capabilities: self.caps,
            target_bytes: self.target_pages.map(|p| p * DM_PAGE_SIZE),
            guest_bytes: self.guest_pages() * DM_PAGE_SIZE,
            ballooned_bytes: self.ballooned.total_pages() * DM_PAGE_SIZE,
            orphaned_bytes: self.orphaned.total_pages() * DM_PAGE_SIZE,
            hot_added_bytes: self.hot_added.total_pages() * DM_PAGE_SIZE,
            hot_add: self.hot_add,
            busy: self.op != Operation::Idle,
            last_status: self.last_status,
            counters: self.counters,
        }
    }

    /// Sets the target guest size (rounded down to whole pages) and starts
    /// working towards it if nothing is outstanding. Also lifts the stops
    /// of the previous target: a guest that gave less than asked is asked
    /// again, and a paused hot-add is retried.
    pub fn set_target(&mut self, target_bytes: u64) -> DmOutput {
        self.target_pages = Some(target_bytes / DM_PAGE_SIZE);
        self.balloon_stalled = false;
        if self.hot_add == HotAddState::Paused {
            self.hot_add = HotAddState::Enabled;
        }
        let mut out = DmOutput::default();
        self.plan(&mut out);
        out
    }

    /// Handles one message from the guest; `now` stamps status reports.
    pub fn handle_guest_message(
        &mut self,
        bytes: &[u8],
        now: Instant,
    ) -> Result<DmOutput, ProtocolError> {
        let header = super::codec::parse_header(bytes);
        let msg = match parse_guest_message(bytes) {
            Ok(msg) => msg,
            Err(e) => {
                self.counters.malformed_messages += 1;
                return Err(e.into());
            }
        };
        let trans_id = header.map(|h| h.trans_id).unwrap_or(0);
        let mut out = DmOutput::default();
        let result = match msg {
            GuestDmMessage::VersionRequest { version, .. } => {
                self.on_version(version, trans_id, &mut out);
                Ok(())
            }
            GuestDmMessage::CapabilitiesReport { caps, .. } => {
                self.on_capabilities(caps, trans_id, &mut out)
            }
            GuestDmMessage::StatusReport(report) => {
                self.counters.status_reports += 1;
                self.last_status = Some(StatusSample { report, at: now });
                Ok(())
            }
            GuestDmMessage::BalloonResponse { more_pages, ranges } => {
                self.on_balloon_response(more_pages, &ranges, &mut out)
            }
            GuestDmMessage::UnballoonResponse => self.on_unballoon_response(&mut out),
            GuestDmMessage::HotAddResponse { page_count, result } => {
                self.on_hot_add_response(page_count, result, &mut out)
            }
        };
        match result {
            Ok(()) => Ok(out),
            Err(e) => {
                self.counters.unexpected_messages += 1;
                Err(e)
            }
        }
    }

    /// The VMM made `range` (from [`DmAction::MapForHotAdd`]) present: the
    /// hot-add request is sent now, unless the target no longer needs it
    /// (then the range is released).
    pub fn hot_add_mapped(&mut self, range: PageRange) -> Result<DmOutput, ProtocolError> {
        if self.op != Operation::HotAddMapping(range) {
            return Err(ProtocolError::NoHotAddPending(range));
        }
        let mut out = DmOutput::default();
        let still_needed = self
            .target_pages
            .is_some_and(|t| t >= self.guest_pages() + range.count);
        if still_needed {
            self.send(
                &mut out,
                HostDmMessage::HotAddRequest {
                    range,
                    region: Some(range),
                },
            );
            self.counters.hot_add_requests += 1;
            self.op = Operation::HotAdding(range);
        } else {
            out.actions.push(release(range));
            self.op = Operation::Idle;
            self.plan(&mut out);
        }
        Ok(out)
    }

    /// The VMM could not make `range` present: hot-add pauses until the
    /// next `set_target`.
    pub fn hot_add_map_failed(&mut self, range: PageRange) -> Result<DmOutput, ProtocolError> {
        if self.op != Operation::HotAddMapping(range) {
            return Err(ProtocolError::NoHotAddPending(range));
        }
        self.counters.hot_add_failures += 1;
        self.hot_add = HotAddState::Paused;
        self.op = Operation::Idle;
        let mut out = DmOutput::default();
        self.plan(&mut out);
        Ok(out)
    }

    /// Forgets the session (channel reopened, or guest restarted). Returns
    /// a release of a hot-add range that was mapped but never requested.
    pub fn reset(&mut self, kind: DmReset) -> DmOutput {
        let mut out = DmOutput::default();
        match self.op {
            Operation::HotAddMapping(range) if kind == DmReset::ChannelReopened => {
                out.actions.push(release(range));
            }
            // The guest may have added it before the channel closed: keep
            // it mapped and count it as added.
            Operation::HotAdding(range) if kind == DmReset::ChannelReopened => {
                self.hot_added.insert(range);
                self.hot_add_next = Some(range.end());
            }
            _ => {}
        }
        self.phase = Phase::AwaitingVersion;
        self.version = None;
        self.caps = None;
        self.op = Operation::Idle;
        self.balloon_stalled = false;
        self.hot_add = HotAddState::Enabled;
        match kind {
            DmReset::ChannelReopened => {
                for r in self.ballooned.iter() {
                    self.orphaned.insert(r);
                }
                self.ballooned.clear();
            }
            DmReset::GuestRestarted => {
                self.ballooned.clear();
                self.orphaned.clear();
                self.hot_added.clear();
                self.hot_add_next = None;
                self.target_pages = None;
                self.last_status = None;
            }
        }
        out
    }

    /// Counts reported pages that were neither tracked nor discarded.
    fn reject(&mut self, reason: RejectReason, pages: u64) {
        let counter = match reason {
            RejectReason::OutsideRam => &mut self.counters.rejected_outside_ram,
            RejectReason::AlreadyBallooned => &mut self.counters.rejected_already_ballooned,
            RejectReason::ExceedsRequest => &mut self.counters.rejected_exceeds_request,
            RejectReason::Unsolicited => &mut self.counters.rejected_unsolicited,
        };
        *counter += pages;
        if pages > 0 {
            log::debug!("hv_balloon: rejected {pages} reported pages: {reason:?}");
        }
    }

    fn send(&mut self, out: &mut DmOutput, msg: HostDmMessage) {
        self.send_with_id(out, msg, None);
    }

    /// Sends `msg` with `trans_id` (a reply echoes the guest's id) or the
    /// host's next id.
    fn send_with_id(&mut self, out: &mut DmOutput, msg: HostDmMessage, trans_id: Option<u32>) {
        let id = trans_id.unwrap_or_else(|| {
            self.next_trans_id = self.next_trans_id.wrapping_add(1);
            self.next_trans_id
        });
        match msg.encode(id) {
            Ok(bytes) => out.messages.push(bytes),
            Err(e) => {
                self.counters.encode_errors += 1;
                log::error!("hv_balloon: cannot encode {msg:?}: {e}");
            }
        }
    }

    fn on_version(&mut self, version: DmVersion, trans_id: u32, out: &mut DmOutput) {
        if self.phase != Phase::AwaitingVersion {
            // A new driver instance starts over without a channel reset.
            self.counters.implicit_resets += 1;
            out.actions
                .extend(self.reset(DmReset::ChannelReopened).actions);
        }
        let accepted = [DmVersion::V2_0, DmVersion::V1_0, DmVersion::V0_3].contains(&version);
        if accepted {
            self.version = Some(version);
            self.phase = Phase::AwaitingCapabilities;
        } else {
            self.counters.versions_refused += 1;
        }
        self.send_with_id(
            out,
            HostDmMessage::VersionResponse { accepted },
            Some(trans_id),
        );
    }

    fn on_capabilities(
        &mut self,
        caps: GuestCapabilities,
        trans_id: u32,
        out: &mut DmOutput,
    ) -> Result<(), ProtocolError> {
        if self.phase != Phase::AwaitingCapabilities {
            return Err(ProtocolError::UnexpectedInPhase {
                message: "CAPABILITIES_REPORT",
                phase: self.phase,
            });
        }
        self.caps = Some(caps);
        self.phase = Phase::Ready;
        if let Some(w) = self.config.hotplug_window {
            let from = self.hot_add_next.unwrap_or(w.start).max(w.start);
            self.hot_add_next = align_up(from, caps.hot_add_alignment_pages());
        }
        self.send_with_id(
            out,
            HostDmMessage::CapabilitiesResponse { accepted: true },
            Some(trans_id),
        );
        let info_allowed = self.version.is_some_and(|v| v >= DmVersion::V1_0);
        if let (true, true, Some(w)) = (
            self.config.announce_max_memory,
            info_allowed,
            self.config.hotplug_window,
        ) {
            let max_page_count = self.boot_ram.total_pages() + w.count;
            self.send(out, HostDmMessage::InfoMaxPageCount { max_page_count });
        }
        self.plan(out);
        Ok(())
    }

    fn on_balloon_response(
        &mut self,
        more_pages: bool,
        ranges: &[PageRange],
        out: &mut DmOutput,
    ) -> Result<(), ProtocolError> {
        let Operation::Ballooning {
            requested,
            mut received,
        } = self.op
        else {
            let pages: u64 = ranges.iter().map(|r| r.count).sum();
            self.reject(RejectReason::Unsolicited, pages);
            return Err(ProtocolError::Unsolicited("BALLOON_RESPONSE"));
        };
        let mut discard = RangeSet::new();
        for &range in ranges {
            let in_ram: Vec<PageRange> = self
                .boot_ram
                .intersection(range)
                .into_iter()
                .chain(self.hot_added.intersection(range))
                .collect();
            let ram_pages: u64 = in_ram.iter().map(|r| r.count).sum();
            self.reject(RejectReason::OutsideRam, range.count - ram_pages);
            for part in in_ram {
                let fresh_parts: Vec<PageRange> = self
                    .ballooned
                    .difference(part)
                    .into_iter()
                    .flat_map(|p| self.orphaned.difference(p))
                    .collect();
                let fresh_pages: u64 = fresh_parts.iter().map(|r| r.count).sum();
                self.reject(RejectReason::AlreadyBallooned, part.count - fresh_pages);
                for fresh in fresh_parts {
                    let take = fresh.count.min(requested - received);
                    self.reject(RejectReason::ExceedsRequest, fresh.count - take);
                    if take > 0 {
                        let accepted = PageRange::new(fresh.start, take);
                        self.ballooned.insert(accepted);
                        discard.insert(accepted);
                        received += take;
                    }
                }
            }
        }
        self.counters.ballooned_pages += discard.total_pages();
        if !discard.is_empty() {
            out.actions
                .push(DmAction::DiscardRanges(discard.iter().collect()));
        }
        if more_pages {
            self.op = Operation::Ballooning {
                requested,
                received,
            };
        } else {
            self.op = Operation::Idle;
            self.balloon_stalled = received < requested;
            self.plan(out);
        }
        Ok(())
    }

    fn on_unballoon_response(&mut self, out: &mut DmOutput) -> Result<(), ProtocolError> {
        if self.op != Operation::Unballooning {
            return Err(ProtocolError::Unsolicited("UNBALLOON_RESPONSE"));
        }
        self.op = Operation::Idle;
        self.plan(out);
        Ok(())
    }

    fn on_hot_add_response(
        &mut self,
        page_count: u32,
        result: u32,
        out: &mut DmOutput,
    ) -> Result<(), ProtocolError> {
        let Operation::HotAdding(range) = self.op else {
            return Err(ProtocolError::Unsolicited("MEM_HOT_ADD_RESPONSE"));
        };
        let align = self.caps.map_or(1, |c| c.hot_add_alignment_pages());
        let reported = u64::from(page_count);
        if reported > range.count || reported % align != 0 {
            self.counters.hot_add_anomalies += 1;
        }
        // Keep whole blocks: the guest adds memory block by block.
        let added = align_up(reported, align)
            .unwrap_or(range.count)
            .min(range.count);
        if added > 0 {
            self.hot_added.insert(PageRange::new(range.start, added));
            self.counters.hot_added_pages += added;
        }
        self.hot_add_next = Some(range.start + added);
        if added < range.count {
            self.counters.hot_add_failures += 1;
            out.actions.push(release(PageRange::new(
                range.start + added,
                range.count - added,
            )));
            // Linux: fewer pages than asked means a physical limit was hit;
            // result 1 with none means hot-add is off for good; result 0
            // with none is transient.
            self.hot_add = if added > 0 || result != 0 {
                HotAddState::Stopped
            } else {
                HotAddState::Paused
            };
        }
        self.op = Operation::Idle;
        self.plan(out);
        Ok(())
    }

    /// Starts the next operation towards the target, if any.
    fn plan(&mut self, out: &mut DmOutput) {
        let (Phase::Ready, Operation::Idle, Some(target), Some(caps)) =
            (self.phase, self.op, self.target_pages, self.caps)
        else {
            return;
        };
        let current = self.guest_pages();
        if target < current {
            if !caps.balloon || self.balloon_stalled {
                return;
            }
            let pages = (current - target).min(u64::from(self.config.max_balloon_request_pages));
            let Ok(num_pages) = u32::try_from(pages) else {
                return;
            };
            self.send(out, HostDmMessage::BalloonRequest { num_pages });
            self.counters.balloon_requests += 1;
            self.op = Operation::Ballooning {
                requested: pages,
                received: 0,
            };
        } else if target > current {
            let deficit = target - current;
            if !self.ballooned.is_empty() {
                self.unballoon(deficit, out);
            } else if let Some(range) = self.next_hot_add(deficit, caps) {
                out.actions.push(DmAction::MapForHotAdd {
                    pfn: range.start,
                    count: range.count,
                });
                self.op = Operation::HotAddMapping(range);
            }
        }
    }

    /// Returns up to `pages` ballooned pages, in at most
    /// [`UNBALLOON_MESSAGES_PER_TRANSACTION`] messages.
    fn unballoon(&mut self, pages: u64, out: &mut DmOutput) {
        let max_ranges = UNBALLOON_MESSAGES_PER_TRANSACTION * MAX_RANGES_PER_MESSAGE;
        let mut picked = Vec::new();
        let mut left = pages;
        let mut pieces = 0;
        for r in self.ballooned.iter() {
            if left == 0 || pieces == max_ranges {
                break;
            }
            // Each wire range holds at most MAX_RANGE_PAGES.
            let room = u64::try_from(max_ranges - pieces).unwrap_or(u64::MAX);
            let count = r.count.min(left).min(room.saturating_mul(MAX_RANGE_PAGES));
            let range = PageRange::new(r.start, count);
            pieces += usize::try_from(count.div_ceil(MAX_RANGE_PAGES)).unwrap_or(max_ranges);
            left -= count;
            picked.push(range);
        }
        let returned: u64 = picked.iter().map(|r| r.count).sum();
        for &r in &picked {
            self.ballooned.remove(r);
        }
        let messages = split_unballoon(&picked);
        self.counters.unballoon_messages += u64::try_from(messages.len()).unwrap_or(u64::MAX);
        self.counters.unballooned_pages += returned;
        for msg in messages {
            self.send(out, msg);
        }
        self.op = Operation::Unballooning;
    }

    /// The next whole-block range of the window to hot-add for `deficit`.
    fn next_hot_add(&self, deficit: u64, caps: GuestCapabilities) -> Option<PageRange> {
        let window = self.config.hotplug_window?;
        if !caps.hot_add || self.hot_add != HotAddState::Enabled {
            return None;
        }
        let start = self.hot_add_next?;
        let align = caps.hot_add_alignment_pages();
        let chunk = if align >= self.config.max_hot_add_request_pages {
            align
        } else {
            align_down(self.config.max_hot_add_request_pages, align)
        };
        let room = window.end().saturating_sub(start);
        let count = align_down(deficit.min(room).min(chunk).min(MAX_RANGE_PAGES), align);
        (count > 0).then_some(PageRange::new(start, count))
    }
}

fn release(range: PageRange) -> DmAction {
    DmAction::ReleaseHotAdd {
        pfn: range.start,
        count: range.count,
    }
}

#[cfg(test)]
mod tests;
