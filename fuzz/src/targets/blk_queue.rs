//! Target `blk_queue`: virtio-blk requests as the device parses and
//! executes them from descriptor chains (over a 16-sector in-memory disk).
//!
//! Input: read-only flag, one [`Virtq`], then up to three more rounds of
//! guest writes, each followed by queue processing.
//!
//! Invariants checked:
//! - no panic, no arithmetic overflow;
//! - no out-of-bounds guest access: the device changes guest memory only
//!   in its used ring and in buffers marked device-writable;
//! - the disk never changes size; a read-only disk never changes;
//! - every used element has a known head and a length of at most the
//!   writable bytes of the queue plus the status byte;
//! - counters: requests == chains processed, invalid requests counted as
//!   failures, byte counters in whole sectors;
//! - afterwards the device, reset and re-activated, answers a valid read
//!   with the disk's bytes.

use devices::virtio::block::BLOCK_QUEUE_SIZE;
use devices::virtio::VirtioDevice;

use crate::devices::{
    atomic, block_answers, block_device, check_block, disk_contents, disk_pattern, interrupt,
};
use crate::guest::{fill, memory, Desc, RingLayout, Snapshot, Virtq, WriteScope, DATA_START};
use crate::input::{Bytes, Seed};

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let mem = memory();
    let read_only = b.bool();
    let mut blk = block_device(read_only);
    let vq = Virtq::decode(&mut b);
    let size = vq.size(BLOCK_QUEUE_SIZE);
    vq.install(&mem, 0, size);
    blk.set_acked_features(blk.avail_features());
    blk.activate(
        atomic(&mem),
        interrupt(),
        vec![vq.queue(0, BLOCK_QUEUE_SIZE, size)],
    )
    .expect("activation");
    let layout = RingLayout::of(0);
    let mut processed = 0u64;
    for _ in 0..4 {
        let before = Snapshot::take(&mem);
        let scope = WriteScope::of(&before, &[(0, size)]);
        let used = layout.used_idx(&mem);
        processed += blk.process_queue() as u64;
        let after = Snapshot::take(&mem);
        scope.check(&before, &after, "virtio-blk");
        check_block(&blk, processed);
        if !scope.self_modifying {
            for i in used..layout.used_idx(&mem) {
                let (id, len) = layout.used_elem(&mem, size, i);
                assert!(id < u32::from(size), "used id {id} >= queue size {size}");
                // A chain is at most `size` descriptors of u32 lengths.
                assert!(u64::from(len) <= u64::from(size) * u64::from(u32::MAX) + 1);
            }
        }
        if read_only {
            assert!(
                disk_contents() == disk_pattern(),
                "a read-only disk changed"
            );
        }
        if b.is_empty() {
            break;
        }
        let at = crate::guest::addr(&mut b);
        fill(&mem, at, b.blob());
    }
    block_answers(&mut blk, &mem);
}

fn header(ty: u32, sector: u64) -> Vec<u8> {
    let mut h = vec![0u8; 16];
    h[0..4].copy_from_slice(&ty.to_le_bytes());
    h[8..16].copy_from_slice(&sector.to_le_bytes());
    h
}

/// A queue of size 8 holding one request: header, data buffers
/// (`(len, device-writable)`), status byte.
fn request(ty: u32, sector: u64, data: &[(u32, bool)], payload: &[u8]) -> Virtq {
    let mut q = Virtq {
        size_log2: 3,
        ..Virtq::default()
    };
    q.descs.push(Desc::new(DATA_START, 16, false, Some(1)));
    q.fills.push((DATA_START, header(ty, sector)));
    for (i, &(len, w)) in data.iter().enumerate() {
        let at = DATA_START + 0x1000 * (i as u64 + 1);
        let next = u16::try_from(i + 2).expect("next");
        q.descs.push(Desc::new(at, len, w, Some(next)));
        if !w {
            q.fills.push((at, payload.to_vec()));
        }
    }
    q.descs.push(Desc::new(DATA_START + 0x800, 1, true, None));
    q.avail.push(0);
    q
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let enc = |ro: bool, q: Virtq| {
        let mut s = Seed::new();
        s.u8(u8::from(ro));
        q.encode(&mut s);
        s.finish()
    };
    vec![
        enc(false, request(0, 2, &[(512, true), (1024, true)], &[])),
        enc(false, request(1, 15, &[(512, false)], &[0x5a; 512])),
        enc(true, request(1, 0, &[(512, false)], &[0x5a; 512])),
        enc(false, request(4, 0, &[], &[])),
        enc(false, request(8, 0, &[(20, true)], &[])),
        enc(false, request(0, 16, &[(512, true)], &[])),
    ]
}
