//! The [`Vsock`] device model: configuration space (the guest CID), the
//! three queues, and the moves between them and the [`Muxer`].
//!
//! - TX (queue 1): every chain is read (at most a header and
//!   [`MAX_PAYLOAD`] bytes), checked by [`parse_tx_packet`], handed to the
//!   muxer and returned at once with length 0.
//! - RX (queue 0): while the muxer has packets for the guest, each takes
//!   one chain; a chain too small for a header is returned empty.
//! - Event (queue 2): buffers are held for a transport reset
//!   ([`Vsock::transport_reset`]).

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::muxer::{Muxer, VsockMetrics};
use super::packet::{
    parse_tx_packet, PacketError, EVENT_SIZE, EVENT_TRANSPORT_RESET, HEADER_SIZE, MAX_PAYLOAD,
};
use super::{VsockError, QUEUE_SIZE, VIRTIO_ID_VSOCK};
use crate::virtio::mmio::VIRTIO_RING_F_EVENT_IDX;
use crate::virtio::{
    avail_ahead, avail_index_valid, read_config_space, ActivateError, GuestMemory, InterruptKind,
    VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// Queue indexes.
pub const RX_QUEUE: usize = 0;
/// The driver's packets.
pub const TX_QUEUE: usize = 1;
/// Device events.
pub const EVENT_QUEUE: usize = 2;

/// Lowest CID a guest may have (0-2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;

struct Active {
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    queues: Vec<Queue>,
}

/// A virtio-vsock device with the hybrid Unix-socket backend.
pub struct Vsock {
    cid: u64,
    acked_features: u64,
    queue_sizes: [u16; 3],
    queue_evts: [EventFd; 3],
    muxer: Muxer,
    active: Option<Active>,
    rx_buf: Vec<u8>,
    tx_buf: Vec<u8>,
    /// The queue counters of [`VsockMetrics`] (the muxer keeps the rest).
    queue_metrics: VsockMetrics,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("cid", &self.cid)
            .field("muxer", &self.muxer)
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device giving the guest `cid`, listening for host clients on
    /// `socket` (guest connections to host port P go to `socket_P`).
    pub fn new(cid: u64, socket: &Path) -> Result<Self, VsockError> {
        if cid < MIN_GUEST_CID || cid >= u64::from(u32::MAX) {
            return Err(VsockError::InvalidCid(cid));
        }
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(VsockError::EventFd);
        Ok(Self {
            cid,
            acked_features: 0,
            queue_sizes: [QUEUE_SIZE; 3],
            queue_evts: [evt()?, evt()?, evt()?],
            muxer: Muxer::new(cid, socket)?,
            active: None,
            rx_buf: vec![0; MAX_PAYLOAD],
            tx_buf: vec![0; HEADER_SIZE + MAX_PAYLOAD + 1],
            queue_metrics: VsockMetrics::default(),
        })
    }

    /// The guest's CID.
    pub fn cid(&self) -> u64 {
        self.cid
    }

    /// Whether the driver activated the device.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// The device's counters.
    pub fn metrics(&self) -> VsockMetrics {
        let q = &self.queue_metrics;
        let waiting = |index: usize| {
            self.active.as_ref().map_or(0, |a| {
                avail_ahead(&a.queues[index], &a.mem.memory()).map_or(0, u64::from)
            })
        };
        VsockMetrics {
            rx_packets: q.rx_packets,
            tx_packets: q.tx_packets,
            queue_notifications: q.queue_notifications,
            interrupts: q.interrupts,
            rx_buffers_offered: waiting(RX_QUEUE),
            tx_chains_queued: waiting(TX_QUEUE),
            interrupt_unacknowledged: self
                .active
                .as_ref()
                .map_or(0, |a| u64::from(a.interrupt.status() != 0)),
            ..self.muxer.metrics()
        }
    }

    /// The muxer's epoll fd (host-side events).
    pub(super) fn muxer_fd(&self) -> std::os::fd::RawFd {
        self.muxer.epoll_fd()
    }

    /// Handles whatever the host sockets are ready for, then feeds the
    /// guest.
    pub fn process_host_events(&mut self) {
        self.muxer.process_host_events();
        self.process_rx();
    }

    /// Handles a notification of queue `index`.
    pub(super) fn queue_event(&mut self, index: usize) {
        if let Some(evt) = self.queue_evts.get(index) {
            // Non-blocking: an error only means it was not signalled.
            let _ = evt.read();
        }
        if index == TX_QUEUE || index == RX_QUEUE {
            self.queue_metrics.queue_notifications += 1;
        }
        match index {
            TX_QUEUE => {
                self.process_tx();
                self.process_rx();
            }
            RX_QUEUE => {
                self.process_rx();
            }
            // Event buffers are kept until there is an event.
            _ => {}
        }
    }

    /// Takes every packet the driver queued on TX.
    ///
    /// The driver's notifications are off while the queue is drained and
    /// back on (with `VIRTIO_RING_F_EVENT_IDX`: for the next new packet)
    /// once it is empty, so a driver queueing packets while the device works
    /// does not exit to the VMM for each.
    pub fn process_tx(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let guard = active.mem.memory();
        let mem: &GuestMemoryMmap = &guard;
        let queue = &mut active.queues[TX_QUEUE];
        let mut processed = 0;
        loop {
            if let Err(e) = queue.disable_notification(mem) {
                log::error!("vsock: TX queue error: {e}");
                break;
            }
            while let Some(chain) = queue.pop_descriptor_chain(mem) {
                processed += 1;
                let head = chain.head_index();
                match chain.reader(mem) {
                    Ok(mut reader) => {
                        let n = reader.available_bytes().min(self.tx_buf.len());
                        match reader.read_exact(&mut self.tx_buf[..n]) {
                            Ok(()) => {
                                handle_tx_bytes(&mut self.muxer, &self.tx_buf[..n], self.cid);
                            }
                            Err(e) => {
                                log::debug!("vsock: unreadable TX buffer: {e}");
                                self.muxer.count_malformed();
                            }
                        }
                    }
                    Err(e) => {
                        log::debug!("vsock: bad TX chain: {e}");
                        self.muxer.count_malformed();
                    }
                }
                if let Err(e) = queue.add_used(mem, head, 0) {
                    log::error!("vsock: cannot return TX descriptor {head}: {e}");
                }
            }
            if !rearm(queue, mem, "TX") {
                break;
            }
        }
        self.queue_metrics.tx_packets += processed as u64;
        if processed > 0 && notify(queue, mem, &active.interrupt) {
            self.queue_metrics.interrupts += 1;
        }
        processed
    }

    /// Fills RX buffers while the muxer has packets for the guest.
    ///
    /// The driver is asked to notify the RX queue only when the device ran
    /// out of buffers with packets waiting: then its next buffers (a
    /// refill) bring the device back at once, and a driver refilling while
    /// buffers are left does not exit to the VMM for nothing.
    pub fn process_rx(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        if !self.muxer.has_rx_work() {
            return 0;
        }
        let guard = active.mem.memory();
        let mem: &GuestMemoryMmap = &guard;
        let queue = &mut active.queues[RX_QUEUE];
        let mut used = 0;
        if let Err(e) = queue.disable_notification(mem) {
            log::error!("vsock: RX queue error: {e}");
        }
        loop {
            let mut starved = false;
            while self.muxer.has_rx_work() {
                let Some(chain) = queue.pop_descriptor_chain(mem) else {
                    starved = true;
                    break;
                };
                let head = chain.head_index();
                let mut writer = match chain.writer(mem) {
                    Ok(w) if w.available_bytes() >= HEADER_SIZE => w,
                    Ok(_) | Err(_) => {
                        log::debug!("vsock: RX chain {head} cannot hold a header");
                        self.muxer.count_malformed();
                        if let Err(e) = queue.add_used(mem, head, 0) {
                            log::error!("vsock: cannot return RX descriptor {head}: {e}");
                        }
                        used += 1;
                        continue;
                    }
                };
                let room = (writer.available_bytes() - HEADER_SIZE).min(self.rx_buf.len());
                let Some((header, n)) = self.muxer.next_rx_packet(&mut self.rx_buf[..room]) else {
                    queue.go_to_previous_position();
                    break;
                };
                let len = match writer
                    .write_all(&header.to_bytes())
                    .and_then(|()| writer.write_all(&self.rx_buf[..n]))
                {
                    // n <= MAX_PAYLOAD: the total fits u32.
                    Ok(()) => u32::try_from(HEADER_SIZE + n).unwrap_or(0),
                    Err(e) => {
                        log::error!("vsock: cannot write an RX packet: {e}");
                        0
                    }
                };
                if let Err(e) = queue.add_used(mem, head, len) {
                    log::error!("vsock: cannot return RX descriptor {head}: {e}");
                }
                used += 1;
            }
            // Out of buffers with packets waiting: have the driver notify
            // its next buffers, and look again for ones it added just now.
            if !starved || !rearm(queue, mem, "RX") {
                break;
            }
        }
        self.queue_metrics.rx_packets += used as u64;
        if used > 0 && notify(queue, mem, &active.interrupt) {
            self.queue_metrics.interrupts += 1;
        }
        used
    }

    /// Drops every connection and tells the driver so with a
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` event (virtio 1.2, 5.10.6.9):
    /// its sockets reset and it reads the guest CID again. Returns whether
    /// the event reached the driver (it needs an event buffer).
    ///
    /// The spec ties this to migration; tidevm has none yet, so nothing
    /// calls it in normal operation.
    pub fn transport_reset(&mut self) -> bool {
        self.muxer.reset();
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let guard = active.mem.memory();
        let mem: &GuestMemoryMmap = &guard;
        let queue = &mut active.queues[EVENT_QUEUE];
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            log::warn!("vsock: no event buffer for a transport reset");
            return false;
        };
        let head = chain.head_index();
        let written = chain
            .writer(mem)
            .map_err(|e| e.to_string())
            .and_then(|mut w| {
                w.write_all(&EVENT_TRANSPORT_RESET.to_le_bytes())
                    .map_err(|e| e.to_string())
            });
        let len = match written {
            Ok(()) => u32::try_from(EVENT_SIZE).unwrap_or(0),
            Err(e) => {
                log::error!("vsock: cannot write the transport reset event: {e}");
                0
            }
        };
        if let Err(e) = queue.add_used(mem, head, len) {
            log::error!("vsock: cannot return event descriptor {head}: {e}");
        }
        notify(queue, mem, &active.interrupt);
        len != 0
    }
}

/// Checks one TX packet and hands it to the muxer.
fn handle_tx_bytes(muxer: &mut Muxer, bytes: &[u8], cid: u64) {
    match parse_tx_packet(bytes, cid) {
        Ok(packet) => {
            let len = usize::try_from(packet.header.len).unwrap_or(0);
            let payload = &bytes[HEADER_SIZE..HEADER_SIZE + len];
            muxer.guest_packet(&packet, payload);
        }
        Err(e) => {
            log::debug!("vsock: bad TX packet: {e}");
            muxer.count_malformed();
            if let (PacketError::Truncated { .. } | PacketError::PayloadTooLong(_), Some(h)) =
                (e, bytes.get(..HEADER_SIZE))
            {
                // The header is the guest's own: its connection cannot go on.
                if let Ok(h) = <&[u8; HEADER_SIZE]>::try_from(h) {
                    muxer.refuse(&super::packet::PacketHeader::from_bytes(h));
                }
            }
        }
    }
}

/// Turns the driver's notifications of `queue` back on; whether buffers
/// came in meanwhile (then the caller goes round again). A ring whose
/// available index is more than a queue ahead is left stalled rather than
/// spun on.
fn rearm(queue: &mut Queue, mem: &GuestMemoryMmap, name: &str) -> bool {
    match queue.enable_notification(mem) {
        Ok(true) if avail_index_valid(queue, mem) => true,
        Ok(true) => {
            log::error!(
                "vsock: the driver's {name} available index is more than the queue size \
                 ahead; the queue is stalled until the driver resets the device"
            );
            false
        }
        Ok(false) => false,
        Err(e) => {
            log::error!("vsock: {name} queue error: {e}");
            false
        }
    }
}

/// Raises the queue interrupt if the driver wants one; whether it did.
fn notify(queue: &mut Queue, mem: &GuestMemoryMmap, interrupt: &VirtioInterrupt) -> bool {
    match queue.needs_notification(mem) {
        Ok(true) => match interrupt.trigger(InterruptKind::Queue) {
            Ok(()) => true,
            Err(e) => {
                log::error!("vsock: raising the queue interrupt failed: {e}");
                false
            }
        },
        Ok(false) => false,
        Err(e) => {
            log::error!("vsock: checking for notification failed: {e:?}");
            false
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        // No vsock feature bit: stream sockets only. Event index
        // suppression keeps notifications and interrupts to what each side
        // needs (see `process_tx`, `process_rx`).
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_space(&self.cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("vsock: write to read-only config at {offset:#x} ignored");
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let queues = Vec::from(crate::virtio::exact_queues::<3>(queues)?);
        self.active = Some(Active {
            mem,
            interrupt,
            queues,
        });
        // Whatever the driver queued before, and host clients that connected
        // before the guest was up.
        for evt in &self.queue_evts[..2] {
            if let Err(e) = evt.write(1) {
                log::error!("vsock: cannot kick a queue: {e}");
            }
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.muxer.reset();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;
    use std::os::unix::net::UnixStream;
    use std::path::PathBuf;

    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryAtomic};

    use super::super::packet::{Op, PacketHeader, HOST_CID, TYPE_STREAM};
    use super::*;

    const W: u16 = 2; // VRING_DESC_F_WRITE

    struct Rig {
        dev: Vsock,
        mem: GuestMemoryMmap,
        path: PathBuf,
        irq: EventFd,
    }

    impl Drop for Rig {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()
    }

    /// RX, TX and event queues of 16 entries, apart in `mem`.
    fn three_queues(
        mem: &GuestMemoryMmap,
    ) -> (
        MockSplitQueue<'_, GuestMemoryMmap>,
        MockSplitQueue<'_, GuestMemoryMmap>,
        MockSplitQueue<'_, GuestMemoryMmap>,
    ) {
        (
            MockSplitQueue::new(mem, 16),
            MockSplitQueue::create(mem, GuestAddress(0x10_0000), 16),
            MockSplitQueue::create(mem, GuestAddress(0x20_0000), 16),
        )
    }

    fn rig(
        name: &str,
        mem: &GuestMemoryMmap,
        queues: [&MockSplitQueue<GuestMemoryMmap>; 3],
        event_idx: bool,
    ) -> Rig {
        let path = std::env::temp_dir().join(format!("tidevm-vsdev-{}-{name}", std::process::id()));
        let mut dev = Vsock::new(3, &path).unwrap();
        let mem = mem.clone();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        let qs = queues
            .iter()
            .map(|q| {
                let mut q: Queue = q.create_queue().unwrap();
                q.set_event_idx(event_idx);
                q
            })
            .collect();
        dev.activate(GuestMemoryAtomic::new(mem.clone()), interrupt, qs)
            .unwrap();
        Rig {
            dev,
            mem,
            path,
            irq,
        }
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
    }

    fn chain(q: &MockSplitQueue<GuestMemoryMmap>, descs: &[RawDescriptor], head: u16) {
        let n = descs.len();
        let chained: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = Descriptor::from(*d);
                let (flags, next) = if i + 1 < n {
                    (d.flags() | 1, head + u16::try_from(i).unwrap() + 1)
                } else {
                    (d.flags(), 0)
                };
                RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), flags, next))
            })
            .collect();
        q.add_desc_chains(&chained, head).unwrap();
    }

    fn used(q: &MockSplitQueue<GuestMemoryMmap>, i: usize) -> (u32, u32) {
        let e = q.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    fn guest_header(op: Op, dst_port: u32, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 777,
            dst_port,
            len,
            type_: TYPE_STREAM,
            op: op.to_wire(),
            flags: 0,
            buf_alloc: 65536,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn config_features_and_activation() {
        let path = std::env::temp_dir().join(format!("tidevm-vsdev-{}-cfg", std::process::id()));
        assert!(matches!(
            Vsock::new(2, &path),
            Err(VsockError::InvalidCid(2))
        ));
        assert!(matches!(
            Vsock::new(u64::from(u32::MAX), &path),
            Err(VsockError::InvalidCid(_))
        ));
        let mut dev = Vsock::new(42, &path).unwrap();
        assert_eq!(dev.device_type(), 19);
        assert_eq!(dev.queue_max_sizes().len(), 3);
        assert_eq!(
            dev.avail_features(),
            VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
        );
        let mut cid = [0u8; 8];
        dev.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 42);
        let mut hi = [0xffu8; 4];
        dev.read_config(4, &mut hi);
        assert_eq!(hi, [0; 4]);
        dev.write_config(0, &[1, 2, 3]);
        dev.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 42);
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let err = dev
            .activate(GuestMemoryAtomic::new(memory()), irq, vec![])
            .unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 3,
                got: 0
            }
        ));
        assert_eq!(dev.process_tx(), 0);
        assert_eq!(dev.process_rx(), 0);
        drop(dev);
        assert!(!path.exists(), "the socket file goes with the device");
    }

    #[test]
    fn refused_request_gets_a_reset_in_a_split_rx_buffer() {
        let mem = memory();
        let (rxq, txq, evq) = three_queues(&mem);
        let mut r = rig("refused", &mem, [&rxq, &txq, &evq], false);
        // A request for host port 9 (nobody listens), header split in two.
        let h = guest_header(Op::Request, 9, 0).to_bytes();
        r.mem
            .write_slice(&h[..10], GuestAddress(0x30_0000))
            .unwrap();
        r.mem
            .write_slice(&h[10..], GuestAddress(0x30_1000))
            .unwrap();
        chain(&txq, &[desc(0x30_0000, 10, 0), desc(0x30_1000, 34, 0)], 0);
        // RX buffer: 20 + 4096 bytes over two descriptors.
        chain(&rxq, &[desc(0x31_0000, 20, W), desc(0x31_1000, 4096, W)], 0);
        r.dev.queue_event(TX_QUEUE);
        assert_eq!(used(&txq, 0), (0, 0));
        assert_eq!(used(&rxq, 0), (0, 44));
        let mut out = [0u8; 44];
        r.mem
            .read_slice(&mut out[..20], GuestAddress(0x31_0000))
            .unwrap();
        r.mem
            .read_slice(&mut out[20..], GuestAddress(0x31_1000))
            .unwrap();
        let rst = PacketHeader::from_bytes(&out);
        assert_eq!(Op::from_wire(rst.op), Some(Op::Rst));
        assert_eq!((rst.src_port, rst.dst_port, rst.dst_cid), (9, 777, 3));
        assert!(r.irq.read().unwrap() >= 1);
    }

    #[test]
    fn hostile_chains_are_returned_and_answered() {
        let mem = memory();
        let (rxq, txq, evq) = three_queues(&mem);
        let mut r = rig("hostile", &mem, [&rxq, &txq, &evq], false);
        // Outside guest memory; a short header; a length beyond the chain;
        // a huge descriptor; a write-only TX descriptor.
        chain(&txq, &[desc(0x1_0000_0000, 44, 0)], 0);
        chain(&txq, &[desc(0x30_0000, 20, 0)], 1);
        let h = guest_header(Op::Rw, 5, 1000);
        r.mem
            .write_slice(&h.to_bytes(), GuestAddress(0x30_1000))
            .unwrap();
        chain(&txq, &[desc(0x30_1000, 100, 0)], 2);
        chain(&txq, &[desc(0x30_1000, u32::MAX, 0)], 3);
        chain(&txq, &[desc(0x30_1000, 44, W)], 4);
        // RX buffers: too small for a header, then a good one.
        chain(&rxq, &[desc(0x31_0000, 10, W)], 0);
        chain(&rxq, &[desc(0x31_1000, 4096, W)], 1);
        chain(&rxq, &[desc(0x31_2000, 4096, W)], 2);
        r.dev.queue_event(TX_QUEUE);
        for i in 0..5 {
            assert_eq!(used(&txq, i).1, 0);
        }
        // The 10-byte RX buffer came back empty; the truncated RW got a
        // reset.
        assert_eq!(used(&rxq, 0), (0, 0));
        assert_eq!(used(&rxq, 1), (1, 44));
        assert!(r.dev.metrics().malformed_packets >= 4);
    }

    /// The `avail_event` the device published in a queue's used ring: the
    /// driver notifies when its available index passes it.
    fn avail_event(mem: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>, size: u64) -> u16 {
        mem.read_obj(q.used_addr().unchecked_add(4 + 8 * size))
            .unwrap()
    }

    #[test]
    fn waiting_data_goes_out_when_the_driver_adds_rx_buffers() {
        let mem = memory();
        let (rxq, txq, evq) = three_queues(&mem);
        let mut r = rig("refill", &mem, [&rxq, &txq, &evq], true);
        let mut client = UnixStream::connect(&r.path).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        // One RX buffer the size Linux gives (a header and 4 KiB): the
        // request takes it.
        const RX_LEN: u32 = 44 + 4096;
        chain(&rxq, &[desc(0x31_0000, RX_LEN, W)], 0);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while r.dev.metrics().host_connects == 0 {
            assert!(std::time::Instant::now() < deadline);
            r.dev.process_host_events();
        }
        assert_eq!(used(&rxq, 0), (0, 44));
        let mut hdr = [0u8; 44];
        r.mem.read_slice(&mut hdr, GuestAddress(0x31_0000)).unwrap();
        let host_port = PacketHeader::from_bytes(&hdr).src_port;
        let mut resp = guest_header(Op::Response, host_port, 0);
        resp.src_port = 1024;
        r.mem
            .write_slice(&resp.to_bytes(), GuestAddress(0x30_0000))
            .unwrap();
        chain(&txq, &[desc(0x30_0000, 44, 0)], 0);
        r.dev.queue_event(TX_QUEUE);
        // TX was drained: the driver's next packet is to be notified.
        assert_eq!(avail_event(&r.mem, &txq, 16), 1);
        let mut line = [0u8; 14];
        client.read_exact(&mut line).unwrap();
        // The host sends 10000 bytes while the guest has no RX buffer.
        client.write_all(&[0x5a; 10_000]).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while !r.dev.muxer.has_rx_work() {
            assert!(std::time::Instant::now() < deadline);
            r.dev.process_host_events();
        }
        r.dev.process_host_events();
        assert_eq!(rxq.used().idx().load(), 1, "no buffer to put them in");
        // The device asked to hear of the driver's next RX buffer ...
        assert_eq!(avail_event(&r.mem, &rxq, 16), 1);
        // What waits shows in the counters (a hang report reads them).
        let m = r.dev.metrics();
        assert_eq!(
            (
                m.open_connections,
                m.connections_with_rx_work,
                m.rx_buffers_offered
            ),
            (1, 1, 0)
        );
        assert_eq!(m.connections_waiting_for_credit, 0);
        // ... and its notification delivers everything. (Whether the guest
        // gets an interrupt is its `used_event`, which `MockSplitQueue`
        // lays its used ring over: not checked here.)
        for i in 1..4u16 {
            chain(
                &rxq,
                &[desc(0x31_0000 + u64::from(i) * 0x2000, RX_LEN, W)],
                i,
            );
        }
        assert_eq!(r.dev.metrics().rx_buffers_offered, 3);
        r.dev.queue_event(RX_QUEUE);
        assert_eq!(rxq.used().idx().load(), 4);
        assert_eq!(used(&rxq, 1), (1, RX_LEN));
        assert_eq!(used(&rxq, 2), (2, RX_LEN));
        assert_eq!(used(&rxq, 3), (3, 44 + 10_000 - 2 * 4096));
        let m = r.dev.metrics();
        assert_eq!((m.rx_packets, m.tx_packets), (4, 1));
        assert_eq!(m.queue_notifications, 2, "one TX, one RX");
        assert_eq!(m.bytes_to_guest, 10_000);
        // All buffers used; the connection stays queued until a read of
        // the host stream finds it empty.
        assert_eq!((m.rx_buffers_offered, m.connections_with_rx_work), (0, 1));
    }

    #[test]
    fn host_connection_through_the_queues() {
        let mem = memory();
        let (rxq, txq, evq) = three_queues(&mem);
        let mut r = rig("conn", &mem, [&rxq, &txq, &evq], false);
        let mut client = UnixStream::connect(&r.path).unwrap();
        client.write_all(b"CONNECT 1024\n").unwrap();
        for i in 0..4u16 {
            chain(&rxq, &[desc(0x31_0000 + u64::from(i) * 0x2000, 4096, W)], i);
        }
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(1);
        while r.dev.metrics().host_connects == 0 {
            assert!(std::time::Instant::now() < deadline);
            r.dev.process_host_events();
        }
        assert_eq!(used(&rxq, 0), (0, 44));
        let mut hdr = [0u8; 44];
        r.mem.read_slice(&mut hdr, GuestAddress(0x31_0000)).unwrap();
        let req = PacketHeader::from_bytes(&hdr);
        assert_eq!(
            (Op::from_wire(req.op), req.dst_port),
            (Some(Op::Request), 1024)
        );
        // The guest accepts and sends 5 bytes.
        let mut resp = guest_header(Op::Response, req.src_port, 0);
        resp.src_port = 1024;
        r.mem
            .write_slice(&resp.to_bytes(), GuestAddress(0x30_0000))
            .unwrap();
        let mut rw = guest_header(Op::Rw, req.src_port, 5);
        rw.src_port = 1024;
        r.mem
            .write_slice(&rw.to_bytes(), GuestAddress(0x30_1000))
            .unwrap();
        r.mem
            .write_slice(b"hello", GuestAddress(0x30_2000))
            .unwrap();
        chain(&txq, &[desc(0x30_0000, 44, 0)], 0);
        chain(&txq, &[desc(0x30_1000, 44, 0), desc(0x30_2000, 5, 0)], 1);
        r.dev.queue_event(TX_QUEUE);
        let mut got = [0u8; 17];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"OK 1073741824\nhel");
        let mut lo = [0u8; 2];
        client.read_exact(&mut lo).unwrap();
        assert_eq!(&lo, b"lo");
        // Transport reset: the client is closed and the event delivered.
        chain(&evq, &[desc(0x32_0000, 4, W)], 0);
        assert!(r.dev.transport_reset());
        assert_eq!(used(&evq, 0), (0, 4));
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert!(!r.dev.transport_reset(), "no event buffer left");
        r.dev.reset();
        assert!(!r.dev.is_activated());
    }
}
