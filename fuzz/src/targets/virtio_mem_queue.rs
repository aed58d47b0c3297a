//! Target `virtio_mem_queue`: the virtio-mem request queue as the device
//! walks it, over descriptor chains a hostile driver wrote.
//!
//! Input: the requested size, one queue ([`Virtq`]: size, descriptors,
//! available ring, guest bytes), then up to three more rounds of guest
//! writes, resizes or backend failure modes, each followed by queue
//! processing.
//!
//! Invariants checked:
//! - no panic, no arithmetic overflow;
//! - no out-of-bounds guest access: the device changes guest memory only
//!   in its used ring and in buffers marked device-writable;
//! - every used element has a known head and a length of 0 (unanswerable
//!   chain) or 10 (a response);
//! - counters: the chains taken in a round (answered, plus one the device
//!   could not return when a head is out of range) are between the
//!   requests counted by type plus malformed chains, and that plus errors;
//!   the
//!   backend model and the device agree on the plugged blocks;
//! - afterwards the device, reset and re-activated on fresh rings, answers
//!   a valid STATE request.

use devices::virtio::mem::{MemMetrics, QUEUE_SIZE};
use devices::virtio::VirtioDevice;

use crate::devices::{
    atomic, check_mem, interrupt, mem_answers, mem_device, FailMode, MEM_BLOCK, MEM_BLOCKS,
    MEM_REGION,
};
use crate::guest::{fill, memory, Desc, RingLayout, Snapshot, Virtq, WriteScope, DATA_START};
use crate::input::{Bytes, Seed};

fn typed(m: &MemMetrics) -> u64 {
    m.plug_requests + m.unplug_requests + m.unplug_all_requests + m.state_requests
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let mem = memory();
    let (mut dev, backend) = mem_device();
    let requested = u64::from(b.u8()) % (MEM_BLOCKS + 1) * MEM_BLOCK;
    dev.set_requested_size(requested).expect("requested size");
    let vq = Virtq::decode(&mut b);
    let size = vq.size(QUEUE_SIZE);
    vq.install(&mem, 0, size);
    dev.set_acked_features(dev.avail_features());
    dev.activate(
        atomic(&mem),
        interrupt(),
        vec![vq.queue(0, QUEUE_SIZE, size)],
    )
    .expect("activation");
    let layout = RingLayout::of(0);
    let mut used = 0u16;
    for _ in 0..4 {
        let before = Snapshot::take(&mem);
        let scope = WriteScope::of(&before, &[(0, size)]);
        let m0 = dev.metrics();
        // The guest may have scribbled over the used ring between rounds.
        let used_intact = layout.used_idx(&mem) == used;
        dev.process_queue();
        let after = Snapshot::take(&mem);
        scope.check(&before, &after, "virtio-mem");
        check_mem(&dev, &backend);
        if !scope.self_modifying && used_intact {
            let m1 = dev.metrics();
            let new_used = layout.used_idx(&mem);
            let answered = u64::from(new_used.wrapping_sub(used));
            let lower = typed(&m1) - typed(&m0) + m1.malformed_requests - m0.malformed_requests;
            let upper = lower + m1.errors - m0.errors;
            // A chain whose head is not a descriptor index cannot be
            // returned: the device counts it and stops for this round.
            let bad_head = (0..size).any(|i| before.avail_entry(0, size, i) >= size);
            let popped = answered..=answered + u64::from(bad_head);
            assert!(
                popped.clone().any(|n| (lower..=upper).contains(&n)),
                "{popped:?} chains taken, counters say {lower}..={upper}"
            );
            for i in used..new_used {
                let (id, len) = layout.used_elem(&mem, size, i);
                assert!(id < u32::from(size), "used id {id} >= queue size {size}");
                assert!(len == 0 || len == 10, "used len {len}");
            }
        }
        used = layout.used_idx(&mem);
        if b.is_empty() {
            break;
        }
        match b.u8() % 3 {
            0 => {
                let at = crate::guest::addr(&mut b);
                fill(&mem, at, b.blob());
            }
            1 => {
                let size = u64::from(b.u8()) % (MEM_BLOCKS + 1) * MEM_BLOCK;
                dev.set_requested_size(size).expect("requested size");
            }
            _ => backend.set_fail(match b.u8() % 3 {
                0 => FailMode::None,
                1 => FailMode::Busy,
                _ => FailMode::Failed,
            }),
        }
    }
    backend.set_fail(FailMode::None);
    mem_answers(&mut dev, &backend, &mem);
}

fn request(ty: u16, block: u64, nb_blocks: u16) -> Vec<u8> {
    let mut raw = vec![0u8; 24];
    raw[0..2].copy_from_slice(&ty.to_le_bytes());
    raw[8..16].copy_from_slice(&(MEM_REGION + block * MEM_BLOCK).to_le_bytes());
    raw[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
    raw
}

/// A queue of size 8 whose chains are `(request, response buffer)` pairs.
fn requests(reqs: &[Vec<u8>]) -> Virtq {
    let mut q = Virtq {
        size_log2: 3,
        ..Virtq::default()
    };
    for (i, req) in reqs.iter().enumerate() {
        let at = DATA_START + 0x40 * i as u64;
        let head = u16::try_from(2 * i).expect("head");
        q.descs.push(Desc::new(at, 24, false, Some(head + 1)));
        q.descs.push(Desc::new(at + 0x20, 10, true, None));
        q.avail.push(head);
        q.fills.push((at, req.clone()));
    }
    q
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut s = Seed::new();
    s.u8(8);
    requests(&[request(0, 0, 4), request(3, 0, 8), request(1, 2, 2)]).encode(&mut s);
    out.push(s.finish());
    let mut s = Seed::new();
    s.u8(2);
    requests(&[request(0, 0, 4), request(2, 0, 0)]).encode(&mut s);
    s.u8(2).u8(2); // the backend fails for good
    out.push(s.finish());
    // One request split over three descriptors, response over two.
    let mut s = Seed::new();
    s.u8(4);
    let req = request(0, 1, 1);
    Virtq {
        size_log2: 2,
        descs: vec![
            Desc::new(DATA_START, 10, false, Some(1)),
            Desc::new(DATA_START + 0x100, 14, false, Some(2)),
            Desc::new(DATA_START + 0x200, 4, true, Some(3)),
            Desc::new(DATA_START + 0x300, 6, true, None),
        ],
        avail: vec![0],
        fills: vec![
            (DATA_START, req[..10].to_vec()),
            (DATA_START + 0x100, req[10..].to_vec()),
        ],
        ..Virtq::default()
    }
    .encode(&mut s);
    out.push(s.finish());
    out
}
