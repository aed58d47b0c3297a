//! The device end to end, with a guest played by the test: VMBus messages
//! posted as Linux posts them, DM packets on rings in guest memory.

use std::sync::Mutex;

use vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryMmap};

use super::*;
use crate::hyperv::dm::{DmVersion, GuestDmMessage, HostDmMessage};
use crate::hyperv::vmbus::guid::{DYNAMIC_MEMORY_CLASS_ID, DYNAMIC_MEMORY_INSTANCE_ID};
use crate::hyperv::vmbus::ring::RingPacket;
use crate::hyperv::vmbus::ring_memory::GuestPagesRingMemory;
use crate::virtio::mem::BackendError;

const MIB: u64 = 1 << 20;
const RAM: u64 = 64 * MIB;
const HOTPLUG_BASE: u64 = 1 << 30;
const HOTPLUG_SIZE: u64 = 512 * MIB;
const RELID: u32 = 1;
const CONNECTION_ID: u32 = 17;
const GPADL: u32 = 0xe1e10;
/// The rings: guest→host at PFNs 0x100..0x105, host→guest at 0x105..0x10a.
const RING_PFNS: [u64; 10] = [
    0x100, 0x101, 0x102, 0x103, 0x104, 0x105, 0x106, 0x107, 0x108, 0x109,
];

#[derive(Default)]
struct Seen {
    posted: Vec<(u32, Vec<u8>)>,
    signals: Vec<(u32, u32)>,
    cleared: u32,
    plugged: Vec<(u64, u64)>,
    unplugged: Vec<(u64, u64)>,
}

struct FakeSynic(Arc<Mutex<Seen>>);

impl SynicPort for FakeSynic {
    fn post_message(&self, vp: u32, payload: &[u8]) -> Result<(), SynicPortError> {
        self.0.lock().unwrap().posted.push((vp, payload.to_vec()));
        Ok(())
    }
    fn signal_event(&self, vp: u32, relid: u32) -> Result<(), SynicPortError> {
        self.0.lock().unwrap().signals.push((vp, relid));
        Ok(())
    }
    fn clear_messages(&self) {
        self.0.lock().unwrap().cleared += 1;
    }
}

struct FakeBackend(Arc<Mutex<Seen>>);

impl MemoryBackend for FakeBackend {
    fn plug(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.0.lock().unwrap().plugged.push((offset, len));
        Ok(())
    }
    fn unplug(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.0.lock().unwrap().unplugged.push((offset, len));
        Ok(())
    }
}

/// The device and the guest side of its rings.
struct Guest {
    device: DynamicMemoryDevice,
    memory: GuestMemory,
    seen: Arc<Mutex<Seen>>,
    to_host: Option<OutgoingRing>,
    from_host: Option<IncomingRing>,
    trans_id: u32,
}

fn message(msgtype: u32, body: &[u8]) -> Vec<u8> {
    let mut m = msgtype.to_le_bytes().to_vec();
    m.extend_from_slice(&[0; 4]);
    m.extend_from_slice(body);
    m
}

fn u32s(values: &[u32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

impl Guest {
    fn new() -> Self {
        let ram = usize::try_from(RAM).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), ram)]).unwrap();
        let memory = GuestMemoryAtomic::new(mem);
        let seen = Arc::new(Mutex::new(Seen::default()));
        let config = DynamicMemoryConfig {
            offer: ChannelOffer {
                class_id: DYNAMIC_MEMORY_CLASS_ID,
                instance_id: DYNAMIC_MEMORY_INSTANCE_ID,
                child_relid: RELID,
                connection_id: CONNECTION_ID,
            },
            vcpu_count: 2,
            boot_ram: vec![(0, RAM)],
            hotplug_base: HOTPLUG_BASE,
            hotplug_size: HOTPLUG_SIZE,
        };
        let device = DynamicMemoryDevice::new(
            config,
            memory.clone(),
            Box::new(FakeSynic(seen.clone())),
            Arc::new(GuestMessageQueue::new().unwrap()),
            Box::new(FakeBackend(seen.clone())),
        )
        .unwrap();
        Self {
            device,
            memory,
            seen,
            to_host: None,
            from_host: None,
            trans_id: 0,
        }
    }

    /// Posts a channel-management message and returns what the host posted.
    fn post(&mut self, payload: &[u8]) -> Vec<Vec<u8>> {
        assert!(self.device.queue().post(1, payload));
        self.device.handle_wakeup();
        let mut seen = self.seen.lock().unwrap();
        seen.posted.drain(..).map(|(_, m)| m).collect()
    }

    /// Linux 6.12 up to an open channel.
    fn connect_and_open(&mut self) {
        let replies = self.post(&message(14, &u32s(&[0x0004_0000, 0, 0, 0, 0, 0, 0, 0])));
        assert_eq!(replies.len(), 1);
        assert_eq!((replies[0][0], replies[0][8]), (15, 1), "4.0 accepted");
        let replies = self.post(&message(3, &[]));
        let types: Vec<u8> = replies.iter().map(|m| m[0]).collect();
        assert_eq!(types, [1, 4], "OFFER then ALLOFFERS_DELIVERED");
        // GPADL_HEADER: relid, gpadl, range_buflen, rangecount, byte_count, byte_offset, pfns.
        let mut body = u32s(&[RELID, GPADL]);
        body.extend_from_slice(&(8 + 8 * 10u16).to_le_bytes());
        body.extend_from_slice(&1u16.to_le_bytes());
        body.extend_from_slice(&u32s(&[10 * 4096, 0]));
        for pfn in RING_PFNS {
            body.extend_from_slice(&pfn.to_le_bytes());
        }
        let replies = self.post(&message(8, &body));
        assert_eq!(replies, [message(10, &u32s(&[RELID, GPADL, 0]))]);
        // Linux zeroes the control pages and sets feature_bits before opening.
        for pfn in [RING_PFNS[0], RING_PFNS[5]] {
            self.memory
                .memory()
                .write_obj(1u32, GuestAddress(pfn * 4096 + 64))
                .unwrap();
        }
        let mut body = u32s(&[RELID, RELID, GPADL, 0, 5]);
        body.resize(140, 0);
        let replies = self.post(&message(5, &body));
        assert_eq!(replies, [message(6, &u32s(&[RELID, RELID, 0]))]);
        assert!(self.device.report().channel_open);
        let mem = self.memory.memory();
        self.to_host =
            Some(OutgoingRing::open(&GuestPagesRingMemory::new(&*mem, &RING_PFNS[..5])).unwrap());
        self.from_host =
            Some(IncomingRing::open(&GuestPagesRingMemory::new(&*mem, &RING_PFNS[5..])).unwrap());
    }

    /// Writes raw bytes as one in-band packet and signals the host.
    fn send_bytes(&mut self, bytes: &[u8]) {
        let mem = self.memory.memory();
        let ring = GuestPagesRingMemory::new(&*mem, &RING_PFNS[..5]);
        let outcome = self
            .to_host
            .as_mut()
            .unwrap()
            .write_packet(&ring, PacketType::DataInband, 0, 0, bytes)
            .unwrap();
        assert!(matches!(outcome, WriteOutcome::Written { .. }));
        drop(mem);
        self.device.queue().signal();
        self.device.handle_wakeup();
    }

    fn send(&mut self, msg: GuestDmMessage) {
        self.trans_id += 1;
        let bytes = msg.encode(self.trans_id).unwrap();
        self.send_bytes(&bytes);
    }

    /// Every DM message the host wrote since the last call.
    fn receive(&mut self) -> Vec<HostDmMessage> {
        let mem = self.memory.memory();
        let ring = GuestPagesRingMemory::new(&*mem, &RING_PFNS[5..]);
        let reader = self.from_host.as_mut().unwrap();
        let mut out = Vec::new();
        while let Some(RingPacket { payload, .. }) = reader.read_packet(&ring).unwrap() {
            out.push(crate::hyperv::dm::parse_host_message(&payload).unwrap());
        }
        reader.commit_read(&ring).unwrap();
        out
    }

    fn bring_up(&mut self) {
        self.connect_and_open();
        self.send(GuestDmMessage::VersionRequest {
            version: DmVersion::V2_0,
            is_last_attempt: false,
        });
        assert_eq!(
            self.receive(),
            [HostDmMessage::VersionResponse { accepted: true }]
        );
        assert_eq!(self.seen.lock().unwrap().signals, [(0, RELID)]);
        self.send(GuestDmMessage::CapabilitiesReport {
            caps: crate::hyperv::dm::GuestCapabilities::from_bits(0x1f),
            min_page_count: 0,
            max_page_number: u64::MAX,
        });
        assert_eq!(
            self.receive(),
            [HostDmMessage::CapabilitiesResponse { accepted: true }]
        );
    }
}

#[test]
fn balloon_discards_and_unballoon_and_hot_add_follow() {
    let mut g = Guest::new();
    g.bring_up();
    assert_eq!(g.device.report().dm.version, Some(DmVersion::V2_0));

    // Balloon 2 MiB: the guest gives pages 0x1000..0x1200, which read as
    // zero afterwards.
    let page = GuestAddress(0x1000 * 4096);
    g.memory.memory().write_obj(0xabu8, page).unwrap();
    g.device.set_target(RAM - 2 * MIB);
    assert_eq!(
        g.receive(),
        [HostDmMessage::BalloonRequest { num_pages: 512 }]
    );
    g.send(GuestDmMessage::BalloonResponse {
        more_pages: false,
        ranges: vec![PageRange::new(0x1000, 512)],
    });
    let r = g.device.report();
    assert_eq!(r.dm.ballooned_bytes, 2 * MIB);
    assert_eq!(r.metrics.discarded_bytes, 2 * MIB);
    assert_eq!(r.metrics.discard_calls, 1, "one merged range, one discard");
    assert_eq!(g.memory.memory().read_obj::<u8>(page).unwrap(), 0);

    // Grow by 128 MiB: unballoon first, then map and hot-add a block.
    g.device.set_target(RAM + 128 * MIB);
    let msgs = g.receive();
    assert!(
        matches!(msgs.as_slice(), [HostDmMessage::UnballoonRequest { .. }]),
        "{msgs:?}"
    );
    g.send(GuestDmMessage::UnballoonResponse);
    assert_eq!(g.seen.lock().unwrap().plugged, [(0, 128 * MIB)]);
    let block = PageRange::new(HOTPLUG_BASE / 4096, 128 * MIB / 4096);
    assert_eq!(
        g.receive(),
        [HostDmMessage::HotAddRequest {
            range: block,
            region: Some(block)
        }]
    );
    g.send(GuestDmMessage::HotAddResponse {
        page_count: 32768,
        result: 1,
    });
    let r = g.device.report();
    assert_eq!(r.dm.hot_added_bytes, 128 * MIB);
    assert!(!r.dm.busy);
    assert_eq!(r.metrics.bad_dm_messages, 0);
}

#[test]
fn hostile_guests_are_counted_not_obeyed() {
    let mut g = Guest::new();
    g.bring_up();
    // Garbage on the ring: counted, and the channel keeps serving.
    g.send_bytes(&[0xff; 24]);
    g.send_bytes(&[1, 0]);
    assert_eq!(g.device.report().metrics.bad_dm_messages, 2);
    // Ballooned pages outside RAM and more than asked are not discarded.
    g.device.set_target(RAM - 4096);
    assert_eq!(
        g.receive(),
        [HostDmMessage::BalloonRequest { num_pages: 1 }]
    );
    g.send(GuestDmMessage::BalloonResponse {
        more_pages: false,
        ranges: vec![PageRange::new(0x8_0000, 4), PageRange::new(0x2000, 3)],
    });
    let r = g.device.report();
    assert_eq!(r.dm.ballooned_bytes, 4096);
    assert_eq!(r.metrics.discarded_bytes, 4096);
    assert_eq!(r.dm.counters.rejected_outside_ram, 4);
    assert_eq!(r.dm.counters.rejected_exceeds_request, 2);

    // A ring index the guest corrupted ends the channel's use, not the VMM.
    let control = GuestAddress(RING_PFNS[0] * 4096);
    g.memory.memory().write_obj(3u32, control).unwrap();
    g.device.queue().signal();
    g.device.handle_wakeup();
    let r = g.device.report();
    assert_eq!(r.metrics.ring_errors, 1);
    assert!(!r.channel_open);
    g.device.set_target(RAM);
    // VMBus still answers: close, and a new connection.
    let replies = g.post(&message(7, &u32s(&[RELID])));
    assert!(replies.is_empty(), "CLOSECHANNEL has no answer");
    let replies = g.post(&message(14, &u32s(&[0x0004_0000, 0, 0, 0, 0, 0, 0, 0])));
    assert_eq!((replies[0][0], replies[0][8]), (15, 1));
    assert!(g.seen.lock().unwrap().cleared >= 1);
    // Malformed VMBus messages are dropped and counted.
    assert!(g.post(&[14, 0]).is_empty());
    assert_eq!(g.device.report().vmbus.malformed, 1);
}

#[test]
fn the_queue_is_bounded_and_announces_work() {
    let q = GuestMessageQueue::new().unwrap();
    for _ in 0..GUEST_MESSAGE_QUEUE_LIMIT {
        assert!(q.post(0, &[3, 0, 0, 0, 0, 0, 0, 0]));
    }
    assert!(!q.post(0, &[3, 0, 0, 0, 0, 0, 0, 0]), "full");
    q.signal();
    let (messages, signalled) = q.take();
    assert_eq!(messages.len(), GUEST_MESSAGE_QUEUE_LIMIT);
    assert!(signalled);
    assert_eq!(
        q.kick_fd().read().unwrap(),
        GUEST_MESSAGE_QUEUE_LIMIT as u64 + 1
    );
    assert!(q.post(0, &[3, 0, 0, 0, 0, 0, 0, 0]), "room again");
}
