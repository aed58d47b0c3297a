//! Virtio devices and the transport they sit behind.
//!
//! A device implements [`VirtioDevice`] (features, config space, activation)
//! and `event_manager::MutEventSubscriber` (queue processing on the VMM event
//! loop). The transport (`mmio`) owns the register interface the driver sees
//! and hands the configured queues to the device when the driver sets
//! DRIVER_OK. Queue notifications reach the device as KVM ioeventfds
//! ([`VirtioDevice::queue_events`]), interrupts leave it through
//! [`VirtioInterrupt`] (an irqfd).

pub mod balloon;
pub mod block;
pub mod mem;
pub mod mmio;
pub mod rng;
pub mod vsock;

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub use virtio_queue::Queue;

/// Guest memory as devices see it: swapped atomically when memory is plugged.
pub type GuestMemory = GuestMemoryAtomic<GuestMemoryMmap>;

/// `VIRTIO_F_VERSION_1`: the only device model tidevm offers.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Interrupt status bit: a used buffer was added to a queue.
pub const INTERRUPT_STATUS_USED_RING: u32 = 0x1;
/// Interrupt status bit: the device configuration changed.
pub const INTERRUPT_STATUS_CONFIG_CHANGED: u32 = 0x2;

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver configured {got} queues; the device needs {expected}.
    #[error("the driver configured {got} queues; the device needs {expected}")]
    QueueCount {
        /// Queues the device needs.
        expected: usize,
        /// Queues the driver made ready.
        got: usize,
    },
    /// The device cannot work with the acked features.
    #[error("unsupported feature set {0:#x}")]
    Features(u64),
}

/// The queues handed to [`VirtioDevice::activate`] as exactly `N`, or the
/// [`ActivateError::QueueCount`] saying how many the driver made ready.
pub fn exact_queues<const N: usize>(queues: Vec<Queue>) -> Result<[Queue; N], ActivateError> {
    let got = queues.len();
    <[Queue; N]>::try_from(queues).map_err(|_| ActivateError::QueueCount { expected: N, got })
}

/// Whether the driver's available index is at most one queue ahead of the
/// device (a larger gap is a broken ring that `virtio_queue` does not pop):
/// a device going round again after `enable_notification` said "more"
/// would spin for ever on such a ring.
pub fn avail_index_valid(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    use virtio_queue::QueueT;
    avail_ahead(queue, mem).is_some_and(|ahead| ahead <= queue.size())
}

/// How far the driver's available index is ahead of the device: the
/// chains it queued that the device has not taken (`None` when the ring
/// cannot be read).
pub fn avail_ahead(queue: &Queue, mem: &GuestMemoryMmap) -> Option<u16> {
    use virtio_queue::QueueT;
    queue
        .avail_idx(mem, Ordering::Acquire)
        .ok()
        .map(|idx| (idx - std::num::Wrapping(queue.next_avail())).0)
}

/// What a virtio interrupt is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptKind {
    /// Used buffers were returned on a queue.
    Queue,
    /// The configuration space changed.
    Config,
}

/// The interrupt line of one virtio device: an ISR status word plus an
/// irqfd that KVM turns into a guest interrupt.
///
/// The irqfd is an edge: a driver that never sees one never acknowledges
/// the status, and with `VIRTIO_RING_F_EVENT_IDX` the device raises no
/// other for the same work, so both sides wait for ever.
/// [`VirtioInterrupt::reraise_if_unacknowledged`] raises a status left
/// unacknowledged again (a level-triggered line would stay asserted).
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq: EventFd,
    acknowledgements: AtomicU64,
    reraised: AtomicU64,
    watch: Mutex<UnacknowledgedWatch>,
}

/// What [`VirtioInterrupt::reraise_if_unacknowledged`] saw last time.
#[derive(Debug, Default)]
struct UnacknowledgedWatch {
    acknowledgements: u64,
    pending_since: Option<Instant>,
}

impl VirtioInterrupt {
    /// An interrupt signalled through `irq` (registered as a KVM irqfd).
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
            acknowledgements: AtomicU64::new(0),
            reraised: AtomicU64::new(0),
            watch: Mutex::default(),
        }
    }

    /// Raises the interrupt again when its status bits have waited for the
    /// driver, with no acknowledgement, for `grace` or more since `now` was
    /// first seen so; returns whether it did. Called periodically by the
    /// VMM's event loop. A needless extra interrupt is harmless: the driver
    /// reads a non-zero status and handles it.
    pub fn reraise_if_unacknowledged(&self, now: Instant, grace: Duration) -> bool {
        let mut watch = self.watch.lock().expect("interrupt watch");
        let acks = self.acknowledgements.load(Ordering::SeqCst);
        if self.status.load(Ordering::SeqCst) == 0 {
            watch.pending_since = None;
            return false;
        }
        match watch.pending_since {
            Some(since) if watch.acknowledgements == acks => {
                if now.saturating_duration_since(since) < grace {
                    return false;
                }
                watch.pending_since = Some(now);
                if self.irq.write(1).is_err() {
                    return false;
                }
                self.reraised.fetch_add(1, Ordering::SeqCst);
                true
            }
            _ => {
                watch.acknowledgements = acks;
                watch.pending_since = Some(now);
                false
            }
        }
    }

    /// How many times [`VirtioInterrupt::reraise_if_unacknowledged`]
    /// raised the interrupt again.
    pub fn reraised(&self) -> u64 {
        self.reraised.load(Ordering::SeqCst)
    }

    /// Sets the status bit for `kind` and raises the interrupt.
    pub fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        let bit = match kind {
            InterruptKind::Queue => INTERRUPT_STATUS_USED_RING,
            InterruptKind::Config => INTERRUPT_STATUS_CONFIG_CHANGED,
        };
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.irq.write(1)
    }

    /// The current ISR status bits.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// Clears the bits the driver acknowledged.
    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
        self.acknowledgements.fetch_add(1, Ordering::SeqCst);
    }

    /// Clears all bits (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The irqfd behind this interrupt.
    pub fn irq_fd(&self) -> &EventFd {
        &self.irq
    }
}

/// Reads `data.len()` bytes of a device's configuration space `space`
/// starting at `offset`; bytes past its end (or an absurd offset) read 0.
pub fn read_config_space(space: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Some(src) = usize::try_from(offset)
        .ok()
        .and_then(|start| space.get(start..))
    else {
        return;
    };
    let n = src.len().min(data.len());
    data[..n].copy_from_slice(&src[..n]);
}

/// A virtio device model, independent of the transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (2 = block, 5 = balloon, 24 = memory, ...).
    fn device_type(&self) -> u32;

    /// Maximum size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Feature bits the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn avail_features(&self) -> u64;

    /// Records the features the driver accepted (a subset of the offer).
    fn set_acked_features(&mut self, features: u64);

    /// Reads device configuration space at `offset`; out-of-range bytes read 0
    /// (see [`read_config_space`]).
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device configuration space; devices ignore what is read-only.
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// One eventfd per queue, signalled (by KVM ioeventfd) when the driver
    /// notifies that queue. Created with the device, valid for its life.
    fn queue_events(&self) -> &[EventFd];

    /// Starts the device with the queues the driver configured.
    ///
    /// The mmio transport passes the queues the driver made ready, in
    /// queue-index order, each checked with `QueueT::is_valid` and with event
    /// index suppression enabled if `VIRTIO_RING_F_EVENT_IDX` was acked.
    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: std::sync::Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;

    /// Stops the device and drops its queues (driver wrote status 0).
    fn reset(&mut self);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_space_reads_are_bounded() {
        let space = [1u8, 2, 3, 4];
        let mut out = [0xffu8; 3];
        read_config_space(&space, 2, &mut out);
        assert_eq!(out, [3, 4, 0]);
        read_config_space(&space, 4, &mut out);
        assert_eq!(out, [0, 0, 0]);
        read_config_space(&space, u64::MAX, &mut out);
        assert_eq!(out, [0, 0, 0]);
        read_config_space(&space, 0, &mut out);
        assert_eq!(out, [1, 2, 3]);
    }

    #[test]
    fn an_unacknowledged_interrupt_is_raised_again_after_the_grace() {
        let irq = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let int = VirtioInterrupt::new(irq.try_clone().unwrap());
        let grace = Duration::from_secs(1);
        let t0 = Instant::now();
        // Nothing pending: nothing to do.
        assert!(!int.reraise_if_unacknowledged(t0, grace));
        int.trigger(InterruptKind::Queue).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        // Seen pending; within the grace it is left alone.
        assert!(!int.reraise_if_unacknowledged(t0, grace));
        assert!(!int.reraise_if_unacknowledged(t0 + grace / 2, grace));
        assert!(irq.read().is_err(), "no extra edge yet");
        // Still unacknowledged after the grace: raised again, once.
        assert!(int.reraise_if_unacknowledged(t0 + grace, grace));
        assert_eq!(irq.read().unwrap(), 1);
        assert!(!int.reraise_if_unacknowledged(t0 + grace, grace));
        assert_eq!(int.reraised(), 1);
        // The driver acknowledges and a new interrupt comes: its grace
        // starts when it is first seen.
        int.acknowledge(INTERRUPT_STATUS_USED_RING);
        int.trigger(InterruptKind::Queue).unwrap();
        assert!(!int.reraise_if_unacknowledged(t0 + grace * 3, grace));
        assert!(!int.reraise_if_unacknowledged(t0 + grace * 3 + grace / 2, grace));
        assert!(int.reraise_if_unacknowledged(t0 + grace * 4, grace));
        // Acknowledged: nothing more.
        int.acknowledge(INTERRUPT_STATUS_USED_RING);
        assert!(!int.reraise_if_unacknowledged(t0 + grace * 10, grace));
        assert_eq!(int.reraised(), 2);
    }
}
