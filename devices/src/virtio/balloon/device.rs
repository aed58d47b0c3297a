//! The balloon device model: feature negotiation, config space, queue
//! processing and the VMM-facing API.

use std::fmt;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{debug, error, warn};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::page_set::PageSet;
use super::request::{
    apply_deflate, parse_pfns, plan_inflate, plan_report, BALLOON_PAGE_SHIFT, BALLOON_PAGE_SIZE,
};
use super::stats::{parse_stats, BalloonStats};
use super::{
    BalloonConfig, BalloonError, BALLOON_CONFIG_SPACE_SIZE, BALLOON_QUEUE_SIZE,
    VIRTIO_BALLOON_F_DEFLATE_ON_OOM, VIRTIO_BALLOON_F_FREE_PAGE_REPORTING,
    VIRTIO_BALLOON_F_STATS_VQ, VIRTIO_ID_BALLOON,
};
use crate::discard::discard_range;
use crate::virtio::{
    ActivateError, GuestMemory, InterruptKind, Queue, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};

/// Largest inflate/deflate buffer the device reads (64Ki PFNs = 256 MiB of
/// guest memory; Linux sends at most 256 PFNs per request). Longer chains
/// are truncated and counted as malformed.
const MAX_PFN_REQUEST_BYTES: usize = 256 * 1024;
/// Largest statistics buffer the device reads.
const MAX_STATS_BYTES: usize = 4096;

/// What a queue is used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueRole {
    /// Pages given to the balloon (inflateq).
    Inflate,
    /// Pages taken back from the balloon (deflateq).
    Deflate,
    /// Guest memory statistics (statsq).
    Stats,
    /// Free page reporting (reporting_vq).
    Reporting,
}

impl QueueRole {
    /// The queues a driver that negotiated `features` uses, by queue index.
    ///
    /// Queues of features that were not negotiated take no index.
    pub fn for_features(features: u64) -> Vec<QueueRole> {
        let mut roles = vec![QueueRole::Inflate, QueueRole::Deflate];
        if features & VIRTIO_BALLOON_F_STATS_VQ != 0 {
            roles.push(QueueRole::Stats);
        }
        if features & VIRTIO_BALLOON_F_FREE_PAGE_REPORTING != 0 {
            roles.push(QueueRole::Reporting);
        }
        roles
    }
}

/// Counters of what the device did since it was created (not cleared on
/// reset).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BalloonMetrics {
    /// Pages added to the balloon by inflate requests.
    pub inflated_pages: u64,
    /// Pages removed from the balloon by deflate requests.
    pub deflated_pages: u64,
    /// `discard_range` calls (inflation and free page reporting).
    pub discard_calls: u64,
    /// `discard_range` calls that failed.
    pub discard_errors: u64,
    /// Inflate PFNs ignored because their page is not in guest RAM.
    pub out_of_range_pfns: u64,
    /// Inflate PFNs ignored because the page was already in the balloon.
    pub repeated_pfns: u64,
    /// Deflate PFNs that were not in the balloon.
    pub unknown_deflate_pfns: u64,
    /// Bytes discarded because the guest reported them free.
    pub reported_bytes: u64,
    /// Requests with a malformed buffer: length not a multiple of the entry
    /// size, wrong descriptor direction, unreadable or oversized buffers,
    /// reported ranges outside RAM or not page aligned.
    pub malformed_requests: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
}

/// State that exists while the driver is running the device.
struct Active {
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    roles: Vec<QueueRole>,
    queues: Vec<Queue>,
    /// The statistics buffer held until the next statistics period.
    stats_head: Option<u16>,
}

/// The virtio-balloon device.
pub struct Balloon {
    avail_features: u64,
    acked_features: u64,
    queue_sizes: Vec<u16>,
    queue_evts: Vec<EventFd>,
    stats_timer: Option<TimerFd>,
    config: BalloonConfig,
    num_pages: u32,
    actual_pages: u32,
    active: Option<Active>,
    inflated: PageSet,
    latest_stats: Option<BalloonStats>,
    metrics: BalloonMetrics,
}

impl fmt::Debug for Balloon {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Balloon")
            .field("avail_features", &self.avail_features)
            .field("acked_features", &self.acked_features)
            .field("config", &self.config)
            .field("num_pages", &self.num_pages)
            .field("actual_pages", &self.actual_pages)
            .field("active", &self.active.is_some())
            .field("inflated_pages", &self.inflated.len())
            .field("metrics", &self.metrics)
            .finish()
    }
}

/// `bytes` as a `num_pages` value.
fn target_pages(bytes: u64) -> Result<u32, BalloonError> {
    if !bytes.is_multiple_of(BALLOON_PAGE_SIZE) {
        return Err(BalloonError::UnalignedTarget(bytes));
    }
    u32::try_from(bytes >> BALLOON_PAGE_SHIFT).map_err(|_| BalloonError::TargetTooLarge(bytes))
}

/// Milliseconds since the Unix epoch.
fn unix_time_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Arms `timer` to fire every `secs` seconds, or disarms it for 0.
fn arm_timer(timer: &mut TimerFd, secs: u64) -> std::io::Result<()> {
    let period = Duration::from_secs(secs);
    let result = if secs == 0 {
        timer.clear()
    } else {
        timer.reset(period, Some(period))
    };
    result.map_err(std::io::Error::from)
}

/// Puts `fd` in non-blocking mode, so that reading an expired timer never
/// stalls the event loop (e.g. after the timer was re-armed in between).
fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on a descriptor we own; no memory is passed.
    let ret = unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) };
    if ret < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reads the device-readable part of `chain`, at most `cap` bytes.
///
/// Returns the bytes and whether the chain was malformed (device-writable
/// descriptors, unreadable memory, more than `cap` bytes).
fn read_chain(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    cap: usize,
) -> (Vec<u8>, bool) {
    let mut buf = Vec::new();
    let mut malformed = false;
    for desc in chain {
        if desc.is_write_only() {
            malformed = true;
            continue;
        }
        let len = usize::try_from(desc.len()).unwrap_or(usize::MAX);
        let take = len.min(cap - buf.len());
        if take < len {
            malformed = true;
        }
        if take == 0 {
            continue;
        }
        let start = buf.len();
        buf.resize(start + take, 0);
        if let Err(e) = mem.read_slice(&mut buf[start..], desc.addr()) {
            debug!(
                "balloon: unreadable buffer at {:#x}: {e}",
                desc.addr().raw_value()
            );
            buf.truncate(start);
            malformed = true;
        }
    }
    (buf, malformed)
}

/// Discards each range with one call; returns the bytes discarded.
fn discard_all(
    mem: &GuestMemoryMmap,
    ranges: &[(GuestAddress, u64)],
    metrics: &mut BalloonMetrics,
) -> u64 {
    let mut done = 0;
    for &(addr, len) in ranges {
        metrics.discard_calls += 1;
        match discard_range(mem, addr, len) {
            Ok(()) => done += len,
            Err(e) => {
                metrics.discard_errors += 1;
                warn!(
                    "balloon: discarding {:#x}+{len:#x} failed: {e}",
                    addr.raw_value()
                );
            }
        }
    }
    done
}

impl Balloon {
    /// Creates the device with its queue eventfds (and statistics timer).
    pub fn new(config: BalloonConfig) -> Result<Balloon, BalloonError> {
        let num_pages = target_pages(config.target_size)?;
        let mut avail_features = VIRTIO_F_VERSION_1;
        let mut queues = 2;
        let stats_timer = if config.stats_period_s > 0 {
            avail_features |= VIRTIO_BALLOON_F_STATS_VQ;
            queues += 1;
            let timer = TimerFd::new().map_err(|e| BalloonError::Timer(e.into()))?;
            set_nonblocking(timer.as_raw_fd()).map_err(BalloonError::Timer)?;
            Some(timer)
        } else {
            None
        };
        if config.deflate_on_oom {
            avail_features |= VIRTIO_BALLOON_F_DEFLATE_ON_OOM;
        }
        if config.free_page_reporting {
            avail_features |= VIRTIO_BALLOON_F_FREE_PAGE_REPORTING;
            queues += 1;
        }
        let queue_evts = (0..queues)
            .map(|_| EventFd::new(EFD_NONBLOCK))
            .collect::<Result<Vec<_>, _>>()
            .map_err(BalloonError::EventFd)?;
        Ok(Balloon {
            avail_features,
            acked_features: 0,
            queue_sizes: vec![BALLOON_QUEUE_SIZE; queues],
            queue_evts,
            stats_timer,
            config,
            num_pages,
            actual_pages: 0,
            active: None,
            inflated: PageSet::default(),
            latest_stats: None,
            metrics: BalloonMetrics::default(),
        })
    }

    /// Sets the balloon target (bytes, a multiple of 4 KiB, at most
    /// `u32::MAX` pages) and, if the driver is running, raises a
    /// configuration-change interrupt so the guest inflates or deflates.
    ///
    /// The value is not checked against the guest memory size: a guest asked
    /// for more than it can give inflates as far as it can.
    pub fn set_target_size(&mut self, bytes: u64) -> Result<(), BalloonError> {
        self.num_pages = target_pages(bytes)?;
        self.config.target_size = bytes;
        if let Some(active) = &self.active {
            active
                .interrupt
                .trigger(InterruptKind::Config)
                .map_err(BalloonError::Interrupt)?;
        }
        Ok(())
    }

    /// The target balloon size in bytes.
    pub fn target_size(&self) -> u64 {
        u64::from(self.num_pages) << BALLOON_PAGE_SHIFT
    }

    /// The balloon size the driver reports (`actual`), in bytes.
    pub fn actual_size(&self) -> u64 {
        u64::from(self.actual_pages) << BALLOON_PAGE_SHIFT
    }

    /// Bytes of guest memory the device currently holds as inflated
    /// (tracked from the PFNs; independent of what the driver reports).
    pub fn inflated_size(&self) -> u64 {
        self.inflated.len() << BALLOON_PAGE_SHIFT
    }

    /// The feature bits the driver accepted (0 before negotiation and after
    /// a reset).
    pub fn features_negotiated(&self) -> u64 {
        self.acked_features
    }

    /// The configuration, with the current target and statistics period.
    pub fn config(&self) -> BalloonConfig {
        self.config
    }

    /// Changes the statistics period; 0 stops returning the statistics
    /// buffer. Only possible if statistics were enabled at creation.
    pub fn set_stats_period(&mut self, secs: u64) -> Result<(), BalloonError> {
        let Some(timer) = self.stats_timer.as_mut() else {
            return Err(BalloonError::StatsDisabled);
        };
        self.config.stats_period_s = secs;
        let running = self
            .active
            .as_ref()
            .is_some_and(|a| a.roles.contains(&QueueRole::Stats));
        if running {
            arm_timer(timer, secs).map_err(BalloonError::Timer)?;
        }
        Ok(())
    }

    /// The last statistics the guest reported, if any since the last reset.
    pub fn latest_stats(&self) -> Option<BalloonStats> {
        self.latest_stats
    }

    /// Counters of the device's work.
    pub fn metrics(&self) -> BalloonMetrics {
        self.metrics
    }

    /// Whether the driver has activated the device.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// The statistics timer, registered with the event loop (None when
    /// statistics are disabled).
    pub(super) fn stats_timer_fd(&self) -> Option<RawFd> {
        self.stats_timer.as_ref().map(AsRawFd::as_raw_fd)
    }

    /// Handles a notification on queue `index`: consumes the eventfd and
    /// processes the queue.
    pub(super) fn handle_queue_event(&mut self, index: usize) {
        let Some(evt) = self.queue_evts.get(index) else {
            warn!("balloon: event for unknown queue {index}");
            return;
        };
        if let Err(e) = evt.read() {
            if e.kind() != std::io::ErrorKind::WouldBlock {
                error!("balloon: reading queue {index} eventfd failed: {e}");
            }
        }
        self.process_queue(index);
    }

    /// Handles expiry of the statistics timer: hands the held statistics
    /// buffer back to the driver so that it refills it.
    pub(super) fn handle_stats_timer(&mut self) {
        if let Some(timer) = self.stats_timer.as_mut() {
            if let Err(e) = timer.wait() {
                if e.errno() != libc::EAGAIN {
                    error!("balloon: reading the statistics timer failed: {e}");
                }
            }
        }
        self.request_stats();
    }

    /// Returns the held statistics buffer to the driver now (it refills it
    /// with fresh values); does nothing if no buffer is held.
    pub fn request_stats(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(index) = active.roles.iter().position(|r| *r == QueueRole::Stats) else {
            return;
        };
        let Some(head) = active.stats_head.take() else {
            return;
        };
        let guard = active.mem.memory();
        let mem: &GuestMemoryMmap = &guard;
        let queue = &mut active.queues[index];
        if let Err(e) = queue.add_used(mem, head, 0) {
            error!("balloon: returning the statistics buffer failed: {e:?}");
            return;
        }
        Self::notify(queue, mem, &active.interrupt);
    }

    /// Raises the queue interrupt if the driver wants one.
    fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &VirtioInterrupt) {
        match queue.needs_notification(mem) {
            Ok(true) => {
                if let Err(e) = interrupt.trigger(InterruptKind::Queue) {
                    error!("balloon: raising the queue interrupt failed: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => error!("balloon: checking for notification failed: {e:?}"),
        }
    }

    /// Processes every available buffer of queue `index` (no-op before
    /// activation or for a queue the negotiated features do not use).
    ///
    /// The event loop calls it on a queue notification; it is public so
    /// that fuzz targets can drive the queues without an event loop.
    pub fn process_queue(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(&role) = active.roles.get(index) else {
            debug!("balloon: notification on unused queue {index}");
            return;
        };
        let guard = active.mem.memory();
        let mem: &GuestMemoryMmap = &guard;
        let queue = &mut active.queues[index];
        let mut returned = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let to_return = match role {
                QueueRole::Inflate | QueueRole::Deflate => {
                    let (bytes, bad_chain) = read_chain(mem, chain, MAX_PFN_REQUEST_BYTES);
                    let list = parse_pfns(&bytes);
                    if bad_chain || list.malformed {
                        self.metrics.malformed_requests += 1;
                    }
                    if role == QueueRole::Inflate {
                        let (ranges, outcome) = plan_inflate(mem, &mut self.inflated, &list.pfns);
                        self.metrics.inflated_pages += outcome.accepted;
                        self.metrics.out_of_range_pfns += outcome.out_of_range;
                        self.metrics.repeated_pfns += outcome.repeated;
                        discard_all(mem, &ranges, &mut self.metrics);
                    } else {
                        let outcome = apply_deflate(&mut self.inflated, &list.pfns);
                        self.metrics.deflated_pages += outcome.released;
                        self.metrics.unknown_deflate_pfns += outcome.unknown;
                    }
                    Some(head)
                }
                QueueRole::Stats => {
                    let (bytes, bad_chain) = read_chain(mem, chain, MAX_STATS_BYTES);
                    let parsed = parse_stats(&bytes, unix_time_ms());
                    if bad_chain || parsed.malformed {
                        self.metrics.malformed_requests += 1;
                    }
                    self.latest_stats = Some(parsed.stats);
                    self.metrics.stats_updates += 1;
                    // Keep this buffer until the next period; a driver that
                    // posts another one gets the older one back.
                    active.stats_head.replace(head)
                }
                QueueRole::Reporting => {
                    let mut buffers = Vec::new();
                    let mut bad_chain = false;
                    for desc in chain {
                        if desc.is_write_only() {
                            buffers.push((desc.addr().raw_value(), u64::from(desc.len())));
                        } else {
                            bad_chain = true;
                        }
                    }
                    let plan = plan_report(mem, &buffers);
                    if bad_chain || plan.ignored_bytes > 0 {
                        self.metrics.malformed_requests += 1;
                    }
                    self.metrics.reported_bytes +=
                        discard_all(mem, &plan.ranges, &mut self.metrics);
                    Some(head)
                }
            };
            if let Some(head) = to_return {
                // The device writes nothing into any balloon buffer.
                if let Err(e) = queue.add_used(mem, head, 0) {
                    error!("balloon: add_used on queue {index} failed: {e:?}");
                    break;
                }
                returned = true;
            }
        }
        if returned {
            Self::notify(queue, mem, &active.interrupt);
        }
    }

    /// The configuration space as the driver sees it.
    fn config_space(&self) -> [u8; BALLOON_CONFIG_SPACE_SIZE] {
        let mut space = [0u8; BALLOON_CONFIG_SPACE_SIZE];
        space[0..4].copy_from_slice(&self.num_pages.to_le_bytes());
        space[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        space
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config_space(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut actual = self.actual_pages.to_le_bytes();
        let start = usize::try_from(offset).ok();
        let mut ignored = false;
        for (i, &byte) in data.iter().enumerate() {
            match start.and_then(|s| s.checked_add(i)) {
                Some(pos @ 4..=7) => actual[pos - 4] = byte,
                _ => ignored = true,
            }
        }
        self.actual_pages = u32::from_le_bytes(actual);
        if ignored {
            debug!(
                "balloon: ignored write to read-only config bytes at {offset:#x}+{}",
                data.len()
            );
        }
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
        mut queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            return Err(ActivateError::Features(self.acked_features));
        }
        let roles = QueueRole::for_features(self.acked_features);
        if queues.len() < roles.len() {
            return Err(ActivateError::QueueCount {
                expected: roles.len(),
                got: queues.len(),
            });
        }
        // Queues past the ones the negotiated features use stay unused.
        queues.truncate(roles.len());
        let stats = roles.contains(&QueueRole::Stats);
        self.active = Some(Active {
            mem,
            interrupt,
            roles,
            queues,
            stats_head: None,
        });
        if stats {
            if let Some(timer) = self.stats_timer.as_mut() {
                if let Err(e) = arm_timer(timer, self.config.stats_period_s) {
                    error!("balloon: arming the statistics timer failed: {e}");
                }
            }
        }
        // The driver may have queued buffers before DRIVER_OK (Linux primes
        // the statistics queue during probe).
        for index in 0..self.queue_evts.len() {
            self.process_queue(index);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.inflated.clear();
        self.actual_pages = 0;
        self.latest_stats = None;
        if let Some(timer) = self.stats_timer.as_mut() {
            if let Err(e) = timer.clear() {
                warn!("balloon: disarming the statistics timer failed: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::balloon::stats::{
        encode_stats, VIRTIO_BALLOON_S_MEMFREE, VIRTIO_BALLOON_S_MEMTOT,
    };
    use crate::virtio::INTERRUPT_STATUS_CONFIG_CHANGED;
    use crate::virtio::INTERRUPT_STATUS_USED_RING;
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{GuestMemoryAtomic, GuestMemoryBackend};

    const MIB: u64 = 1 << 20;
    /// Ring memory: one mock queue every 0x1000 bytes from 0.
    const RING_STRIDE: u64 = 0x1000;
    /// Request buffers live here.
    const BUF_BASE: u64 = 0x10000;

    fn config(stats: u64, reporting: bool) -> BalloonConfig {
        BalloonConfig {
            target_size: 0,
            deflate_on_oom: false,
            free_page_reporting: reporting,
            stats_period_s: stats,
        }
    }

    fn test_memory() -> GuestMemoryMmap {
        // Two adjacent regions (0..4 MiB, 4..8 MiB) and one hole.
        let mib = 1usize << 20;
        GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 4 * mib),
            (GuestAddress(4 * MIB), 4 * mib),
            (GuestAddress(16 * MIB), mib),
        ])
        .unwrap()
    }

    /// Adds one chain of `(addr, len, flags)` descriptors at table index
    /// `offset`, linking them with NEXT.
    fn add_chain(vq: &MockSplitQueue<GuestMemoryMmap>, offset: u16, descs: &[(u64, u32, u16)]) {
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let i = u16::try_from(i).unwrap();
                let last = usize::from(i) + 1 == descs.len();
                let flags = if last {
                    flags
                } else {
                    flags | u16::try_from(VRING_DESC_F_NEXT).unwrap()
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, offset + i + 1))
            })
            .collect();
        vq.add_desc_chains(&raw, offset).unwrap();
    }

    fn pfn_bytes(pfns: &[u32]) -> Vec<u8> {
        pfns.iter().flat_map(|p| p.to_le_bytes()).collect()
    }

    struct Harness<'a> {
        mem: &'a GuestMemoryMmap,
        vqs: Vec<MockSplitQueue<'a, GuestMemoryMmap>>,
        balloon: Balloon,
        interrupt: Arc<VirtioInterrupt>,
    }

    impl<'a> Harness<'a> {
        /// A device with `cfg`, negotiated with `acked` (plus VERSION_1),
        /// activated with one mock queue per offered queue.
        fn new(mem: &'a GuestMemoryMmap, cfg: BalloonConfig, acked: u64) -> Self {
            let mut balloon = Balloon::new(cfg).unwrap();
            balloon.set_acked_features(acked | VIRTIO_F_VERSION_1);
            let vqs: Vec<_> = (0..balloon.queue_max_sizes().len() as u64)
                .map(|i| MockSplitQueue::create(mem, GuestAddress(i * RING_STRIDE), 16))
                .collect();
            let interrupt = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
            Harness {
                mem,
                vqs,
                balloon,
                interrupt,
            }
        }

        fn activate(&mut self) {
            let queues = self
                .vqs
                .iter()
                .map(|vq| vq.create_queue().unwrap())
                .collect();
            self.balloon
                .activate(
                    GuestMemoryAtomic::new(self.mem.clone()),
                    self.interrupt.clone(),
                    queues,
                )
                .unwrap();
        }

        fn used(&self, q: usize) -> Vec<(u32, u32)> {
            let used = self.vqs[q].used();
            (0..used.idx().load())
                .map(|i| {
                    let e = used.ring().ref_at(usize::from(i)).unwrap().load();
                    (e.id(), e.len())
                })
                .collect()
        }

        /// Whether an interrupt was raised since the last call.
        fn took_irq(&self) -> bool {
            self.interrupt.irq_fd().read().is_ok()
        }
    }

    #[test]
    fn features_and_queues_follow_config() {
        let b = Balloon::new(config(0, false)).unwrap();
        assert_eq!(b.device_type(), 5);
        assert_eq!(b.avail_features(), VIRTIO_F_VERSION_1);
        assert_eq!(b.queue_max_sizes(), &[256, 256]);
        assert_eq!(b.queue_events().len(), 2);
        assert!(b.stats_timer_fd().is_none());

        let b = Balloon::new(BalloonConfig {
            target_size: 0,
            deflate_on_oom: true,
            free_page_reporting: true,
            stats_period_s: 5,
        })
        .unwrap();
        assert_eq!(
            b.avail_features(),
            VIRTIO_F_VERSION_1
                | VIRTIO_BALLOON_F_STATS_VQ
                | VIRTIO_BALLOON_F_DEFLATE_ON_OOM
                | VIRTIO_BALLOON_F_FREE_PAGE_REPORTING
        );
        assert_eq!(b.queue_max_sizes().len(), 4);
        assert_eq!(b.queue_events().len(), 4);
        assert!(b.stats_timer_fd().is_some());
    }

    #[test]
    fn queue_roles_skip_absent_queues() {
        use QueueRole::*;
        assert_eq!(QueueRole::for_features(0), vec![Inflate, Deflate]);
        assert_eq!(
            QueueRole::for_features(VIRTIO_BALLOON_F_STATS_VQ),
            vec![Inflate, Deflate, Stats]
        );
        assert_eq!(
            QueueRole::for_features(VIRTIO_BALLOON_F_FREE_PAGE_REPORTING),
            vec![Inflate, Deflate, Reporting]
        );
        assert_eq!(
            QueueRole::for_features(
                VIRTIO_BALLOON_F_STATS_VQ | VIRTIO_BALLOON_F_FREE_PAGE_REPORTING
            ),
            vec![Inflate, Deflate, Stats, Reporting]
        );
    }

    #[test]
    fn acked_features_are_limited_to_the_offer() {
        let mut b = Balloon::new(config(0, true)).unwrap();
        b.set_acked_features(u64::MAX);
        assert_eq!(
            b.features_negotiated(),
            VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_FREE_PAGE_REPORTING
        );
    }

    #[test]
    fn config_space_read_write() {
        let mut b = Balloon::new(BalloonConfig {
            target_size: 0x1234 * BALLOON_PAGE_SIZE,
            ..config(0, false)
        })
        .unwrap();
        let mut data = [0xffu8; 16];
        b.read_config(0, &mut data);
        assert_eq!(data, [0x34, 0x12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);

        // The driver writes actual.
        b.write_config(4, &100u32.to_le_bytes());
        assert_eq!(b.actual_size(), 100 * BALLOON_PAGE_SIZE);
        let mut word = [0u8; 4];
        b.read_config(4, &mut word);
        assert_eq!(u32::from_le_bytes(word), 100);

        // num_pages, cmd id and poison value are read-only.
        b.write_config(0, &[9, 9, 9, 9]);
        b.write_config(8, &[9; 8]);
        let mut data = [0u8; 16];
        b.read_config(0, &mut data);
        assert_eq!(&data[0..4], &0x1234u32.to_le_bytes());
        assert_eq!(&data[8..16], &[0; 8]);

        // A write straddling num_pages and actual only changes actual.
        b.write_config(2, &[7, 7, 1, 0]);
        assert_eq!(b.target_size(), 0x1234 * BALLOON_PAGE_SIZE);
        assert_eq!(b.actual_size(), BALLOON_PAGE_SIZE);

        // Reads past the end (and huge offsets) read zero.
        let mut tail = [0xffu8; 4];
        b.read_config(14, &mut tail);
        assert_eq!(tail, [0; 4]);
        b.read_config(u64::MAX, &mut tail);
        assert_eq!(tail, [0; 4]);
        b.write_config(u64::MAX, &[1]);
    }

    #[test]
    fn target_size_validation() {
        assert!(matches!(
            Balloon::new(BalloonConfig {
                target_size: 4095,
                ..config(0, false)
            }),
            Err(BalloonError::UnalignedTarget(4095))
        ));
        let mut b = Balloon::new(config(0, false)).unwrap();
        assert!(matches!(
            b.set_target_size(4097),
            Err(BalloonError::UnalignedTarget(4097))
        ));
        let too_big = (u64::from(u32::MAX) + 1) * BALLOON_PAGE_SIZE;
        assert!(matches!(
            b.set_target_size(too_big),
            Err(BalloonError::TargetTooLarge(_))
        ));
        let max = u64::from(u32::MAX) * BALLOON_PAGE_SIZE;
        b.set_target_size(max).unwrap();
        assert_eq!(b.target_size(), max);
        b.set_target_size(512 * MIB).unwrap();
        assert_eq!(b.target_size(), 512 * MIB);
        assert_eq!(b.config().target_size, 512 * MIB);
        let mut word = [0u8; 4];
        b.read_config(0, &mut word);
        assert_eq!(u32::from_le_bytes(word), 512 * 256);
    }

    #[test]
    fn set_target_size_raises_config_interrupt_when_active() {
        let mem = test_memory();
        let mut h = Harness::new(&mem, config(0, false), 0);
        h.balloon.set_target_size(MIB).unwrap();
        assert!(!h.took_irq());
        h.activate();
        h.balloon.set_target_size(2 * MIB).unwrap();
        assert!(h.took_irq());
        assert_ne!(h.interrupt.status() & INTERRUPT_STATUS_CONFIG_CHANGED, 0);
    }

    #[test]
    fn activate_checks_features_and_queue_count() {
        let mem = test_memory();
        let mut b = Balloon::new(config(1, true)).unwrap();
        let vqs: Vec<_> = (0..4u64)
            .map(|i| MockSplitQueue::create(&mem, GuestAddress(i * RING_STRIDE), 16))
            .collect();
        let queues = |n: usize| -> Vec<Queue> {
            vqs[..n]
                .iter()
                .map(|vq| vq.create_queue().unwrap())
                .collect()
        };
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let gm = GuestMemoryAtomic::new(mem.clone());

        b.set_acked_features(0);
        assert!(matches!(
            b.activate(gm.clone(), irq.clone(), queues(4)),
            Err(ActivateError::Features(0))
        ));
        b.set_acked_features(VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_STATS_VQ);
        assert!(matches!(
            b.activate(gm.clone(), irq.clone(), queues(2)),
            Err(ActivateError::QueueCount {
                expected: 3,
                got: 2
            })
        ));
        b.activate(gm, irq, queues(3)).unwrap();
        assert!(b.is_activated());
    }

    #[test]
    fn inflate_discards_runs_and_deflate_releases() {
        let mem = test_memory();
        let mut h = Harness::new(&mem, config(0, false), 0);
        // Fill the pages around the balloon with a pattern.
        let page = |pfn: u64| GuestAddress(pfn * BALLOON_PAGE_SIZE);
        for pfn in 0x3fe..0x403u64 {
            mem.write_slice(&[0xaa; 4096], page(pfn)).unwrap();
        }
        // 0x3ff..=0x401 crosses the 4 MiB region boundary, 0x3ff is repeated,
        // 0x1000 (16 MiB) is in the third region, 0x900 is in the hole.
        let pfns = [0x400, 0x3ff, 0x401, 0x3ff, 0x900, 0x1000];
        mem.write_slice(&pfn_bytes(&pfns), GuestAddress(BUF_BASE))
            .unwrap();
        add_chain(&h.vqs[0], 0, &[(BUF_BASE, 24, 0)]);
        h.activate();

        assert_eq!(h.used(0), vec![(0, 0)]);
        assert!(h.took_irq());
        assert_ne!(h.interrupt.status() & INTERRUPT_STATUS_USED_RING, 0);
        let m = h.balloon.metrics();
        assert_eq!(m.inflated_pages, 4);
        assert_eq!(m.repeated_pfns, 1);
        assert_eq!(m.out_of_range_pfns, 1);
        // One call per region part of the merged run 0x3ff..=0x401, one for 0x1000.
        assert_eq!(m.discard_calls, 3);
        assert_eq!(m.discard_errors, 0);
        assert_eq!(m.malformed_requests, 0);
        assert_eq!(h.balloon.inflated_size(), 4 * BALLOON_PAGE_SIZE);

        let mut buf = [0u8; 4096];
        for pfn in [0x3ff, 0x400, 0x401] {
            mem.read_slice(&mut buf, page(pfn)).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "page {pfn:#x} not discarded");
        }
        for pfn in [0x3fe, 0x402] {
            mem.read_slice(&mut buf, page(pfn)).unwrap();
            assert!(buf.iter().all(|&b| b == 0xaa), "page {pfn:#x} clobbered");
        }

        // Deflate two known pages and one unknown one.
        mem.write_slice(
            &pfn_bytes(&[0x400, 0x1000, 0x5]),
            GuestAddress(BUF_BASE + 0x1000),
        )
        .unwrap();
        add_chain(&h.vqs[1], 0, &[(BUF_BASE + 0x1000, 12, 0)]);
        h.balloon.handle_queue_event(1);
        assert_eq!(h.used(1), vec![(0, 0)]);
        let m = h.balloon.metrics();
        assert_eq!(m.deflated_pages, 2);
        assert_eq!(m.unknown_deflate_pfns, 1);
        assert_eq!(h.balloon.inflated_size(), 2 * BALLOON_PAGE_SIZE);

        // The deflated page can be inflated (and discarded) again.
        mem.write_slice(&pfn_bytes(&[0x400]), GuestAddress(BUF_BASE))
            .unwrap();
        add_chain(&h.vqs[0], 1, &[(BUF_BASE, 4, 0)]);
        h.balloon.handle_queue_event(0);
        assert_eq!(h.used(0), vec![(0, 0), (1, 0)]);
        assert_eq!(h.balloon.metrics().inflated_pages, 5);
        assert_eq!(h.balloon.metrics().discard_calls, 4);
    }

    #[test]
    fn malformed_inflate_uses_whole_pfns() {
        let mem = test_memory();
        let mut h = Harness::new(&mem, config(0, false), 0);
        h.activate();
        // 10 bytes: two whole PFNs and a 2-byte tail, split over two
        // descriptors, followed by a device-writable descriptor.
        let mut bytes = pfn_bytes(&[0x500, 0x501]);
        bytes.extend_from_slice(&[1, 2]);
        mem.write_slice(&bytes, GuestAddress(BUF_BASE)).unwrap();
        let write = u16::try_from(VRING_DESC_F_WRITE).unwrap();
        add_chain(
            &h.vqs[0],
            0,
            &[
                (BUF_BASE, 6, 0),
                (BUF_BASE + 6, 4, 0),
                (BUF_BASE + 0x100, 4, write),
            ],
        );
        h.balloon.handle_queue_event(0);
        assert_eq!(h.used(0), vec![(0, 0)]);
        let m = h.balloon.metrics();
        assert_eq!(m.malformed_requests, 1);
        assert_eq!(m.inflated_pages, 2);
        assert_eq!(m.discard_calls, 1);

        // A descriptor pointing outside guest memory is skipped.
        add_chain(&h.vqs[0], 3, &[(0x2000_0000, 4, 0)]);
        h.balloon.handle_queue_event(0);
        assert_eq!(h.used(0), vec![(0, 0), (3, 0)]);
        let m = h.balloon.metrics();
        assert_eq!(m.malformed_requests, 2);
        assert_eq!(m.inflated_pages, 2);
    }

    #[test]
    fn stats_buffer_is_held_until_the_period_ends() {
        let mem = test_memory();
        let mut h = Harness::new(&mem, config(1, false), VIRTIO_BALLOON_F_STATS_VQ);
        let stats = encode_stats(&[
            (VIRTIO_BALLOON_S_MEMFREE, 100 * MIB),
            (VIRTIO_BALLOON_S_MEMTOT, 8 * MIB),
            (99, 1),
        ]);
        let len = u32::try_from(stats.len()).unwrap();
        mem.write_slice(&stats, GuestAddress(BUF_BASE)).unwrap();
        // Primed before DRIVER_OK, as Linux does.
        add_chain(&h.vqs[2], 0, &[(BUF_BASE, len, 0)]);
        let before = unix_time_ms();
        h.activate();

        let s = h.balloon.latest_stats().unwrap();
        assert_eq!(s.free_memory, Some(100 * MIB));
        assert_eq!(s.total_memory, Some(8 * MIB));
        assert_eq!(s.swap_in, None);
        assert!(s.update_time_ms >= before);
        assert_eq!(h.balloon.metrics().stats_updates, 1);
        // Held, not returned.
        assert!(h.used(2).is_empty());
        assert!(!h.took_irq());

        // The period ends: the buffer goes back to the driver.
        h.balloon.request_stats();
        assert_eq!(h.used(2), vec![(0, 0)]);
        assert!(h.took_irq());
        // Nothing held: another tick does nothing.
        h.balloon.request_stats();
        assert_eq!(h.used(2).len(), 1);

        // The timer was armed for 1 s; it fires and is handled.
        std::thread::sleep(Duration::from_millis(1100));
        h.balloon.handle_stats_timer();
        // No expiry pending: handling the timer again must not block.
        h.balloon.handle_stats_timer();

        // Reset drops statistics and disarms the timer.
        h.balloon.reset();
        assert!(h.balloon.latest_stats().is_none());
        h.balloon.handle_stats_timer();
    }

    #[test]
    fn reporting_queue_index_depends_on_negotiated_stats() {
        let mem = test_memory();
        // Stats offered but not accepted: reporting_vq is queue 2.
        let mut h = Harness::new(&mem, config(1, true), VIRTIO_BALLOON_F_FREE_PAGE_REPORTING);
        h.activate();
        mem.write_slice(&[0x55; 0x4000], GuestAddress(2 * MIB))
            .unwrap();
        let write = u16::try_from(VRING_DESC_F_WRITE).unwrap();
        add_chain(
            &h.vqs[2],
            0,
            &[
                (2 * MIB, 0x2000, write),
                (2 * MIB + 0x2000, 0x2000, write),
                (64 * MIB, 0x1000, write),
            ],
        );
        h.balloon.handle_queue_event(2);
        assert_eq!(h.used(2), vec![(0, 0)]);
        assert!(h.took_irq());
        let m = h.balloon.metrics();
        assert_eq!(m.reported_bytes, 0x4000);
        assert_eq!(m.discard_calls, 1);
        assert_eq!(m.malformed_requests, 1);
        let mut buf = [0xffu8; 0x4000];
        mem.read_slice(&mut buf, GuestAddress(2 * MIB)).unwrap();
        assert!(buf.iter().all(|&b| b == 0));

        // Queue 3 is unused by this driver.
        add_chain(&h.vqs[3], 0, &[(2 * MIB, 0x1000, write)]);
        h.balloon.handle_queue_event(3);
        assert!(h.used(3).is_empty());
        assert_eq!(h.balloon.metrics().reported_bytes, 0x4000);
    }

    #[test]
    fn reset_clears_driver_state_but_keeps_target() {
        let mem = test_memory();
        let mut h = Harness::new(
            &mem,
            BalloonConfig {
                target_size: 8 * MIB,
                ..config(0, false)
            },
            0,
        );
        mem.write_slice(&pfn_bytes(&[0x10, 0x11]), GuestAddress(BUF_BASE))
            .unwrap();
        add_chain(&h.vqs[0], 0, &[(BUF_BASE, 8, 0)]);
        h.activate();
        h.balloon.write_config(4, &2u32.to_le_bytes());
        assert_eq!(h.balloon.inflated_size(), 2 * BALLOON_PAGE_SIZE);

        h.balloon.reset();
        assert!(!h.balloon.is_activated());
        assert_eq!(h.balloon.actual_size(), 0);
        assert_eq!(h.balloon.inflated_size(), 0);
        assert_eq!(h.balloon.features_negotiated(), 0);
        assert_eq!(h.balloon.target_size(), 8 * MIB);
        // Metrics survive a reset.
        assert_eq!(h.balloon.metrics().inflated_pages, 2);
        // Events on a reset device are drained and ignored.
        h.balloon.queue_events()[0].write(1).unwrap();
        h.balloon.handle_queue_event(0);
        assert!(h.balloon.queue_events()[0].read().is_err());
        // GuestMemoryBackend is in scope for region checks in other tests.
        assert_eq!(mem.num_regions(), 3);
    }

    #[test]
    fn stats_period_changes() {
        let mut b = Balloon::new(config(0, false)).unwrap();
        assert!(matches!(
            b.set_stats_period(5),
            Err(BalloonError::StatsDisabled)
        ));
        let mut b = Balloon::new(config(5, false)).unwrap();
        b.set_stats_period(10).unwrap();
        assert_eq!(b.config().stats_period_s, 10);
        b.set_stats_period(0).unwrap();
        assert_eq!(b.config().stats_period_s, 0);
    }
}
