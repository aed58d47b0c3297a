//! The Hyper-V Dynamic Memory device: one VMBus channel served on the VMM
//! event loop, with the Dynamic Memory protocol on its rings.
//!
//! ```text
//!  vCPU: HvPostMessage ─▶ GuestMessageQueue (bounded) ─kick─▶ VmbusServer ─▶ SynicPort::post_message
//!  vCPU: HvSignalEvent ─▶ GuestMessageQueue::signal   ─kick─▶ guest→host ring ─▶ DmProtocol
//!  API:  set_target ─▶ DmProtocol ─▶ actions (discard, plug/unplug through MemoryBackend)
//!                                 └▶ messages ─▶ host→guest ring ─▶ SynicPort::signal_event
//! ```
//!
//! [`DynamicMemoryDevice`] owns the channel-management state machine
//! ([`VmbusServer`]), the DM state machine ([`DmProtocol`]), the rings of
//! the open channel and the DM messages waiting for room in the host→guest
//! ring. It reaches the guest's SynIC through [`SynicPort`] (implemented by
//! the VMM), guest memory through [`GuestMemory`], and the hotplug region
//! through the same [`MemoryBackend`] virtio-mem uses.
//!
//! Nothing the guest writes can stop the VMM: malformed messages are counted
//! and logged, a ring the guest broke ends the use of the channel (until the
//! guest closes or resets it), never the process.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use log::{debug, error, info, warn};
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::dm::protocol::DM_PAGE_SIZE;
use super::dm::{
    ConfigError, DmAction, DmConfig, DmOutput, DmProtocol, DmReport, DmReset, PageRange,
};
use super::vmbus::message::ChannelOffer;
use super::vmbus::ring::{IncomingRing, OutgoingRing, PacketType, RingError, WriteOutcome};
use super::vmbus::ring_memory::GuestPagesRingMemory;
use super::vmbus::server::{
    OpenRequest, ServerAction, ServerConfigError, ServerOutput, ServerStats, VmbusServer,
};
use crate::discard::discard_range;
use crate::virtio::balloon::request::split_at_regions;
use crate::virtio::mem::MemoryBackend;
use crate::virtio::GuestMemory;

/// Most guest messages waiting for the event loop; beyond, HvPostMessage
/// answers "insufficient buffers" and the guest retries.
pub const GUEST_MESSAGE_QUEUE_LIMIT: usize = 64;
/// Most DM messages waiting for room in the host→guest ring. The protocol
/// has one operation outstanding at a time, so a handful is the norm.
pub const OUTGOING_LIMIT: usize = 256;
/// Most guest→host packets handled per wakeup before yielding the loop.
const PACKETS_PER_WAKEUP: usize = 256;

/// Why the device could not be built.
#[derive(Debug, thiserror::Error)]
pub enum DynamicMemoryError {
    /// The channel offer or vCPU count is unusable.
    #[error("VMBus channel: {0}")]
    Server(#[from] ServerConfigError),
    /// The memory layout is unusable for the DM protocol.
    #[error("Dynamic Memory: {0}")]
    Protocol(#[from] ConfigError),
    /// The eventfd could not be created.
    #[error("cannot create the device's eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// A SynIC operation that did not happen.
#[derive(Debug, thiserror::Error)]
pub enum SynicPortError {
    /// Too many messages already wait for the VP's message slot.
    #[error("the message queue of VP {0} is full")]
    QueueFull(u32),
    /// Anything else (no such VP, page not enabled, page not RAM).
    #[error("{0}")]
    Failed(String),
}

/// The guest's SynIC as the device uses it (implemented by the VMM).
pub trait SynicPort: Send {
    /// Queues a VMBus message (`payload` ≤ 240 bytes) for the message slot
    /// of SINT 2 on VP `vp`; messages to one VP arrive in order.
    fn post_message(&self, vp: u32, payload: &[u8]) -> Result<(), SynicPortError>;
    /// Sets event flag `relid` on SINT 2 of VP `vp` and interrupts it.
    fn signal_event(&self, vp: u32, relid: u32) -> Result<(), SynicPortError>;
    /// Drops every message not yet delivered (VMBus connection reset).
    fn clear_messages(&self);
}

/// A message the guest posted with HvPostMessage on the VMBus connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostedMessage {
    /// VP that posted it.
    pub vp: u32,
    /// The VMBus channel message (≤ 240 bytes).
    pub payload: Vec<u8>,
}

#[derive(Debug, Default)]
struct QueueState {
    messages: VecDeque<PostedMessage>,
    signalled: bool,
}

/// What the vCPU threads hand the device: posted messages (bounded) and
/// channel signals, each announced on an eventfd the event loop watches.
/// Both calls are quick and never block on the device.
#[derive(Debug)]
pub struct GuestMessageQueue {
    state: Mutex<QueueState>,
    kick: EventFd,
}

impl GuestMessageQueue {
    /// An empty queue.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            state: Mutex::new(QueueState::default()),
            kick: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Queues a posted message; false (nothing queued) when
    /// [`GUEST_MESSAGE_QUEUE_LIMIT`] messages already wait.
    pub fn post(&self, vp: u32, payload: &[u8]) -> bool {
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            if state.messages.len() >= GUEST_MESSAGE_QUEUE_LIMIT {
                return false;
            }
            state.messages.push_back(PostedMessage {
                vp,
                payload: payload.to_vec(),
            });
        }
        let _ = self.kick.write(1);
        true
    }

    /// Records that the guest signalled the channel (its connection id).
    pub fn signal(&self) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .signalled = true;
        let _ = self.kick.write(1);
    }

    /// The eventfd written on every post and signal.
    pub fn kick_fd(&self) -> &EventFd {
        &self.kick
    }

    fn take(&self) -> (VecDeque<PostedMessage>, bool) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let signalled = std::mem::take(&mut state.signalled);
        (std::mem::take(&mut state.messages), signalled)
    }
}

/// Where the device sits in guest memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DynamicMemoryConfig {
    /// The channel offered to the guest.
    pub offer: ChannelOffer,
    /// vCPUs (VP index = vCPU index).
    pub vcpu_count: u32,
    /// Boot RAM as `(guest address, length)` ranges.
    pub boot_ram: Vec<(u64, u64)>,
    /// Guest address of the hotplug region (offset 0 of the backend).
    pub hotplug_base: u64,
    /// Size of the hotplug region.
    pub hotplug_size: u64,
}

/// Counters of what the device did, for tests and `GET /vm/memory`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DynamicMemoryMetrics {
    /// Channel-management messages the guest posted.
    pub messages_received: u64,
    /// Wakeups with a channel signal (HvSignalEvent) from the guest.
    pub guest_signals: u64,
    /// Guest→host packets read from the ring.
    pub packets_received: u64,
    /// Guest→host packets that were not in-band data (ignored).
    pub foreign_packets: u64,
    /// DM messages that did not parse or arrived out of place.
    pub bad_dm_messages: u64,
    /// DM messages written to the host→guest ring.
    pub packets_sent: u64,
    /// Host messages dropped (SynIC queue full, outgoing queue full, or a
    /// packet the ring can never hold).
    pub messages_dropped: u64,
    /// Times the guest broke a ring (the channel is then left unused).
    pub ring_errors: u64,
    /// `discard_range` calls for ballooned pages.
    pub discard_calls: u64,
    /// Of those, the ones that failed.
    pub discard_errors: u64,
    /// Bytes discarded for ballooned pages.
    pub discarded_bytes: u64,
    /// Hot-add ranges mapped into the hotplug region.
    pub hot_add_maps: u64,
    /// Hot-add ranges the hotplug region could not map.
    pub hot_add_map_failures: u64,
    /// Hot-add ranges released (unmapped) again.
    pub hot_add_releases: u64,
}

/// A snapshot of the device for the API.
#[derive(Debug, Clone)]
pub struct DynamicMemoryReport {
    /// The DM protocol's state and counters.
    pub dm: DmReport,
    /// Channel-management counters.
    pub vmbus: ServerStats,
    /// Whether the guest is connected to VMBus.
    pub connected: bool,
    /// Whether the channel's rings are in use.
    pub channel_open: bool,
    /// The device's own counters.
    pub metrics: DynamicMemoryMetrics,
}

/// The rings of the open channel.
struct OpenRings {
    relid: u32,
    target_vp: u32,
    incoming_pfns: Vec<u64>,
    outgoing_pfns: Vec<u64>,
    incoming: IncomingRing,
    outgoing: OutgoingRing,
}

/// One read step on the guest→host ring.
enum ReadStep {
    Packet(super::vmbus::ring::RingPacket),
    Empty,
}

/// The Dynamic Memory device (see the module documentation).
pub struct DynamicMemoryDevice {
    server: VmbusServer,
    dm: DmProtocol,
    memory: GuestMemory,
    synic: Box<dyn SynicPort>,
    queue: Arc<GuestMessageQueue>,
    backend: Box<dyn MemoryBackend>,
    hotplug_base: u64,
    hotplug_size: u64,
    rings: Option<OpenRings>,
    outgoing: VecDeque<Vec<u8>>,
    metrics: DynamicMemoryMetrics,
}

impl std::fmt::Debug for DynamicMemoryDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamicMemoryDevice")
            .field("server", &self.server)
            .field("dm", &self.dm)
            .field("channel_open", &self.rings.is_some())
            .field("outgoing", &self.outgoing.len())
            .field("metrics", &self.metrics)
            .finish()
    }
}

fn page_range(addr: u64, len: u64) -> PageRange {
    PageRange::new(addr / DM_PAGE_SIZE, len / DM_PAGE_SIZE)
}

impl DynamicMemoryDevice {
    /// A device offering `config.offer`, answering through `synic`, fed by
    /// `queue`, hot-adding through `backend` (offsets relative to
    /// `config.hotplug_base`).
    pub fn new(
        config: DynamicMemoryConfig,
        memory: GuestMemory,
        synic: Box<dyn SynicPort>,
        queue: Arc<GuestMessageQueue>,
        backend: Box<dyn MemoryBackend>,
    ) -> Result<Self, DynamicMemoryError> {
        let server = VmbusServer::new(config.offer, config.vcpu_count)?;
        let boot_ram = config
            .boot_ram
            .iter()
            .map(|&(addr, len)| page_range(addr, len))
            .collect();
        let window =
            (config.hotplug_size > 0).then(|| page_range(config.hotplug_base, config.hotplug_size));
        let dm = DmProtocol::new(DmConfig::new(boot_ram, window))?;
        Ok(Self {
            server,
            dm,
            memory,
            synic,
            queue,
            backend,
            hotplug_base: config.hotplug_base,
            hotplug_size: config.hotplug_size,
            rings: None,
            outgoing: VecDeque::new(),
            metrics: DynamicMemoryMetrics::default(),
        })
    }

    /// The queue the vCPU side feeds.
    pub fn queue(&self) -> &Arc<GuestMessageQueue> {
        &self.queue
    }

    /// A snapshot for the API.
    pub fn report(&self) -> DynamicMemoryReport {
        DynamicMemoryReport {
            dm: self.dm.report(),
            vmbus: self.server.stats(),
            connected: self.server.is_connected(),
            channel_open: self.rings.is_some(),
            metrics: self.metrics,
        }
    }

    /// Sets the guest size to work towards (boot RAM + hot-added −
    /// ballooned), in bytes; the guest converges on its own.
    pub fn set_target(&mut self, bytes: u64) {
        let out = self.dm.set_target(bytes);
        self.apply_dm(out);
        self.flush_outgoing();
    }

    /// Handles everything the guest posted or signalled since the last
    /// call: channel-management messages first, then the rings.
    pub fn handle_wakeup(&mut self) {
        let _ = self.queue.kick.read();
        let (messages, signalled) = self.queue.take();
        self.metrics.guest_signals += u64::from(signalled);
        for message in messages {
            if self.metrics.messages_received == 0 {
                info!(
                    "hv-balloon: first VMBus message from the guest (VP {})",
                    message.vp
                );
            }
            self.metrics.messages_received += 1;
            let out = self.server.handle_payload(&message.payload);
            self.apply_server(out);
        }
        // Every wakeup looks at both rings, signalled or not.
        self.drain_incoming();
        self.flush_outgoing();
    }

    // -- channel management -------------------------------------------------

    fn apply_server(&mut self, out: ServerOutput) {
        let mut follow_ups = Vec::new();
        for action in out.actions {
            match action {
                ServerAction::ConnectionReset => {
                    self.synic.clear_messages();
                    self.close_rings("VMBus connection reset");
                }
                ServerAction::OpenChannel(request) => {
                    let opened = self.open_rings(request);
                    follow_ups.push(self.server.complete_open(opened));
                }
                ServerAction::CloseChannel { .. } => self.close_rings("channel closed"),
            }
        }
        for message in out.messages {
            let payload = message.message.encode();
            if let Err(e) = self.synic.post_message(message.target_vp, &payload) {
                self.metrics.messages_dropped += 1;
                warn!(
                    "hv-balloon: VMBus message {:?} dropped: {e}",
                    message.message
                );
            }
        }
        for out in follow_ups {
            self.apply_server(out);
        }
    }

    fn open_rings(&mut self, request: OpenRequest) -> bool {
        let memory = self.memory.memory();
        let incoming = {
            let ring = GuestPagesRingMemory::new(&*memory, &request.guest_to_host_pfns);
            IncomingRing::open(&ring)
        };
        let outgoing = {
            let ring = GuestPagesRingMemory::new(&*memory, &request.host_to_guest_pfns);
            OutgoingRing::open(&ring)
        };
        match (incoming, outgoing) {
            (Ok(incoming), Ok(outgoing)) => {
                info!(
                    "hv-balloon: channel {} open: rings of {} + {} data bytes, VP {}",
                    request.child_relid,
                    incoming.data_size(),
                    outgoing.data_size(),
                    request.target_vp
                );
                self.rings = Some(OpenRings {
                    relid: request.child_relid,
                    target_vp: request.target_vp,
                    incoming_pfns: request.guest_to_host_pfns,
                    outgoing_pfns: request.host_to_guest_pfns,
                    incoming,
                    outgoing,
                });
                self.outgoing.clear();
                true
            }
            (Err(e), _) | (_, Err(e)) => {
                warn!("hv-balloon: cannot open the channel's rings: {e}");
                false
            }
        }
    }

    /// Stops using the rings and starts a new DM session: the next driver
    /// starts with a version request.
    fn close_rings(&mut self, why: &str) {
        if self.rings.take().is_some() {
            info!("hv-balloon: {why}");
        }
        self.outgoing.clear();
        let out = self.dm.reset(DmReset::ChannelReopened);
        self.apply_dm(out);
    }

    fn ring_broken(&mut self, what: &str, e: RingError) {
        self.metrics.ring_errors += 1;
        error!("hv-balloon: the guest broke the {what} ring ({e}); the channel is no longer served until the guest reopens it");
        self.rings = None;
        self.outgoing.clear();
    }

    // -- rings ----------------------------------------------------------------

    /// Reads the next packet (committing it at once), or finds the ring empty.
    fn read_step(&mut self) -> Result<ReadStep, RingError> {
        let Some(rings) = self.rings.as_mut() else {
            return Ok(ReadStep::Empty);
        };
        let memory = self.memory.memory();
        let ring = GuestPagesRingMemory::new(&*memory, &rings.incoming_pfns);
        let packet = rings.incoming.read_packet(&ring)?;
        let signal = rings.incoming.commit_read(&ring)?;
        if signal {
            if let Err(e) = self.synic.signal_event(rings.target_vp, rings.relid) {
                debug!("hv-balloon: cannot signal the guest: {e}");
            }
        }
        Ok(packet.map_or(ReadStep::Empty, ReadStep::Packet))
    }

    /// Handles the guest's packets until its ring is empty (Linux signals
    /// only when the ring goes from empty to non-empty).
    fn drain_incoming(&mut self) {
        for _ in 0..PACKETS_PER_WAKEUP {
            let packet = match self.read_step() {
                Ok(ReadStep::Packet(packet)) => packet,
                Ok(ReadStep::Empty) => return,
                Err(e) => return self.ring_broken("guest→host", e),
            };
            self.metrics.packets_received += 1;
            if packet.packet_type != PacketType::DataInband {
                self.metrics.foreign_packets += 1;
                debug!("hv-balloon: {:?} packet ignored", packet.packet_type);
                continue;
            }
            match self
                .dm
                .handle_guest_message(&packet.payload, Instant::now())
            {
                Ok(out) => self.apply_dm(out),
                Err(e) => {
                    self.metrics.bad_dm_messages += 1;
                    warn!("hv-balloon: guest message not acted on: {e}");
                }
            }
        }
        // More is waiting: come back after the loop's other work.
        let _ = self.queue.kick.write(1);
    }

    fn flush_outgoing(&mut self) {
        let mut signal = false;
        while let Some(payload) = self.outgoing.front() {
            let Some(rings) = self.rings.as_mut() else {
                self.outgoing.clear();
                return;
            };
            let memory = self.memory.memory();
            let ring = GuestPagesRingMemory::new(&*memory, &rings.outgoing_pfns);
            match rings
                .outgoing
                .write_packet(&ring, PacketType::DataInband, 0, 0, payload)
            {
                Ok(WriteOutcome::Written { signal_guest }) => {
                    signal |= signal_guest;
                    self.metrics.packets_sent += 1;
                    self.outgoing.pop_front();
                }
                // The guest signals when it has read enough.
                Ok(WriteOutcome::Full { .. }) => break,
                Err(e @ RingError::PacketTooLarge { .. }) => {
                    self.metrics.messages_dropped += 1;
                    error!("hv-balloon: DM message dropped: {e}");
                    self.outgoing.pop_front();
                }
                Err(e) => {
                    drop(memory);
                    return self.ring_broken("host→guest", e);
                }
            }
        }
        if let (true, Some(rings)) = (signal, &self.rings) {
            if let Err(e) = self.synic.signal_event(rings.target_vp, rings.relid) {
                debug!("hv-balloon: cannot signal the guest: {e}");
            }
        }
    }

    // -- DM actions -----------------------------------------------------------

    /// Performs the actions of `out`, queues its messages, then applies what
    /// the actions produced (a hot-add request once its memory is mapped).
    fn apply_dm(&mut self, out: DmOutput) {
        let mut follow_ups = Vec::new();
        for action in out.actions {
            match action {
                DmAction::DiscardRanges(ranges) => self.discard(&ranges),
                DmAction::MapForHotAdd { pfn, count } => {
                    let range = PageRange::new(pfn, count);
                    let next = if self.plug(range) {
                        self.dm.hot_add_mapped(range)
                    } else {
                        self.dm.hot_add_map_failed(range)
                    };
                    match next {
                        Ok(out) => follow_ups.push(out),
                        Err(e) => error!("hv-balloon: {e}"),
                    }
                }
                DmAction::ReleaseHotAdd { pfn, count } => self.unplug(PageRange::new(pfn, count)),
            }
        }
        if self.rings.is_some() {
            for message in out.messages {
                if self.outgoing.len() >= OUTGOING_LIMIT {
                    self.metrics.messages_dropped += 1;
                    error!("hv-balloon: {OUTGOING_LIMIT} DM messages wait already; one dropped");
                    continue;
                }
                self.outgoing.push_back(message);
            }
        }
        for out in follow_ups {
            self.apply_dm(out);
        }
    }

    /// The hotplug-region offset and length of `range`, if it lies inside.
    fn region_offset(&self, range: PageRange) -> Option<(u64, u64)> {
        let addr = range.start.checked_mul(DM_PAGE_SIZE)?;
        let len = range.count.checked_mul(DM_PAGE_SIZE)?;
        let offset = addr.checked_sub(self.hotplug_base)?;
        (offset.checked_add(len)? <= self.hotplug_size && len > 0).then_some((offset, len))
    }

    fn plug(&mut self, range: PageRange) -> bool {
        let Some((offset, len)) = self.region_offset(range) else {
            self.metrics.hot_add_map_failures += 1;
            error!("hv-balloon: hot-add range {range:?} is outside the hotplug region");
            return false;
        };
        match self.backend.plug(offset, len) {
            Ok(()) => {
                self.metrics.hot_add_maps += 1;
                debug!(
                    "hv-balloon: mapped {len:#x} bytes at region offset {offset:#x} for hot-add"
                );
                true
            }
            Err(e) => {
                self.metrics.hot_add_map_failures += 1;
                warn!("hv-balloon: cannot map {len:#x} bytes for hot-add: {e}");
                false
            }
        }
    }

    fn unplug(&mut self, range: PageRange) {
        let Some((offset, len)) = self.region_offset(range) else {
            error!("hv-balloon: released range {range:?} is outside the hotplug region");
            return;
        };
        self.metrics.hot_add_releases += 1;
        if let Err(e) = self.backend.unplug(offset, len) {
            warn!("hv-balloon: cannot unmap {len:#x} bytes of the hotplug region: {e}");
        }
    }

    /// Gives the host the memory behind ballooned pages: one discard per
    /// merged range and guest memory region.
    fn discard(&mut self, ranges: &[PageRange]) {
        let memory = self.memory.memory();
        for range in ranges {
            let (Some(addr), Some(len)) = (
                range.start.checked_mul(DM_PAGE_SIZE),
                range.count.checked_mul(DM_PAGE_SIZE),
            ) else {
                continue;
            };
            for (part, part_len) in split_at_regions(&*memory, GuestAddress(addr), len) {
                self.metrics.discard_calls += 1;
                match discard_range(&memory, part, part_len) {
                    Ok(()) => self.metrics.discarded_bytes += part_len,
                    Err(e) => {
                        self.metrics.discard_errors += 1;
                        warn!("hv-balloon: discarding ballooned pages failed: {e}");
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[path = "device_tests.rs"]
mod tests;
