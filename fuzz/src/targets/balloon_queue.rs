//! Target `balloon_queue`: the balloon's inflate, deflate, statistics and
//! free page reporting queues as the device walks them.
//!
//! Input: target size, statistics on/off, the features the driver acks,
//! one [`Virtq`] per queue those features use, then up to eight operations
//! (process a queue, new target, return the statistics buffer, driver
//! writes `actual`, guest writes).
//!
//! Invariants checked:
//! - no panic, no arithmetic overflow;
//! - no out-of-bounds guest access, and the balloon writes nothing into
//!   guest buffers: outside its used rings every guest byte it changed is
//!   now zero (a discarded page);
//! - every used element the device writes has length 0;
//! - counters: inflated size == (inflated - deflated pages) * 4 KiB, no
//!   discard of a planned range fails, statistics are kept once counted;
//! - afterwards the balloon, reset and re-activated, takes a valid inflate
//!   request and discards the page.

use devices::virtio::balloon::{QueueRole, BALLOON_QUEUE_SIZE};
use devices::virtio::VirtioDevice;
use devices::virtio::VIRTIO_F_VERSION_1;

use crate::devices::{atomic, balloon_answers, balloon_device, check_balloon, interrupt};
use crate::guest::{fill, memory, Desc, RingLayout, Snapshot, Virtq, DATA_START};
use crate::input::{Bytes, Seed};

/// Checks the changes between two snapshots: used rings, or zeroed pages.
fn check_changes(before: &Snapshot, after: &Snapshot, queues: &[(usize, u16)]) {
    let used: Vec<_> = queues
        .iter()
        .map(|&(q, size)| RingLayout::of(q).used_range(size))
        .collect();
    for (r, bytes) in before.changes(after) {
        for (a, byte) in (r.start..r.end).zip(bytes) {
            let Some(u) = used.iter().find(|u| u.contains(&a)) else {
                assert_eq!(
                    byte, 0,
                    "balloon wrote {byte:#x} at {a:#x}, outside its used rings"
                );
                continue;
            };
            // Used elements (id, len) start at offset 4; every len is 0.
            let off = a - u.start;
            let in_len = off >= 4 && off < u.end - u.start - 2 && (off - 4) % 8 >= 4;
            assert!(
                !in_len || byte == 0,
                "balloon used length byte {byte:#x} at {a:#x}"
            );
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let mem = memory();
    let target = u64::from(b.u16()) << 12;
    let stats = b.bool();
    let mut balloon = balloon_device(target, u64::from(stats));
    let features = (b.u64() & balloon.avail_features()) | VIRTIO_F_VERSION_1;
    balloon.set_acked_features(features);
    let roles = QueueRole::for_features(balloon.features_negotiated());
    let mut queues = Vec::new();
    let mut vqs = Vec::new();
    for q in 0..roles.len() {
        let vq = Virtq::decode(&mut b);
        let size = vq.size(BALLOON_QUEUE_SIZE);
        vq.install(&mem, q, size);
        vqs.push(vq.queue(q, BALLOON_QUEUE_SIZE, size));
        queues.push((q, size));
    }
    // Activation processes what the driver queued before DRIVER_OK.
    let before = Snapshot::take(&mem);
    balloon
        .activate(atomic(&mem), interrupt(), vqs)
        .expect("activation");
    check_changes(&before, &Snapshot::take(&mem), &queues);
    check_balloon(&balloon, true);
    for _ in 0..8 {
        if b.is_empty() {
            break;
        }
        let before = Snapshot::take(&mem);
        match b.u8() % 5 {
            0 => balloon.process_queue(usize::from(b.u8() % 4)),
            1 => {
                let _ = balloon.set_target_size(b.u64());
            }
            2 => balloon.request_stats(),
            3 => balloon.write_config(u64::from(b.u8() % 20), b.take(8)),
            _ => {
                let at = crate::guest::addr(&mut b);
                fill(&mem, at, b.blob());
                continue;
            }
        }
        check_changes(&before, &Snapshot::take(&mem), &queues);
        check_balloon(&balloon, true);
    }
    balloon_answers(&mut balloon, &mem);
}

/// A queue of size 8 with one chain per buffer (device-readable, or
/// device-writable for free page reports).
fn buffers(bufs: &[Vec<u8>], writable: bool) -> Virtq {
    let mut q = Virtq {
        size_log2: 3,
        ..Virtq::default()
    };
    for (i, buf) in bufs.iter().enumerate() {
        let at = DATA_START + 0x400 * i as u64;
        let len = u32::try_from(buf.len())
            .expect("len")
            .max(0x1000 * u32::from(writable));
        q.descs.push(Desc::new(at, len, writable, None));
        q.avail.push(u16::try_from(i).expect("head"));
        if !writable {
            q.fills.push((at, buf.clone()));
        }
    }
    q
}

fn pfns(list: &[u32]) -> Vec<u8> {
    list.iter().flat_map(|p| p.to_le_bytes()).collect()
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let reporting = 1u64 << 5;
    let stats_vq = 1u64 << 1;
    let mut out = Vec::new();
    // Inflate a run crossing the first region boundary, deflate part of it.
    let mut s = Seed::new();
    s.u16(16).u8(0).u64(0);
    buffers(&[pfns(&[0xe, 0xf, 0x10, 0x11, 0x30, 0x41])], false).encode(&mut s);
    buffers(&[pfns(&[0xf, 0x10, 0x99])], false).encode(&mut s);
    out.push(s.finish());
    // Statistics and free page reporting.
    let mut s = Seed::new();
    s.u16(0).u8(1).u64(stats_vq | reporting);
    Virtq::default().encode(&mut s);
    Virtq::default().encode(&mut s);
    let mut st = Vec::new();
    for (tag, val) in [(4u16, 1u64 << 30), (5, 2 << 30), (6, 3 << 20)] {
        st.extend_from_slice(&tag.to_le_bytes());
        st.extend_from_slice(&val.to_le_bytes());
    }
    buffers(&[st.clone(), st], false).encode(&mut s);
    buffers(&[vec![0; 8]], true).encode(&mut s);
    s.u8(2).u8(0).u8(3); // request_stats, process the stats queue
    out.push(s.finish());
    // A malformed inflate (trailing bytes, a writable descriptor) and a
    // guest that posts more after activation.
    let mut s = Seed::new();
    s.u16(1).u8(0).u64(0);
    let mut q = buffers(&[vec![0x20, 0, 0, 0, 0x21, 0]], false);
    q.descs.push(Desc::new(DATA_START + 0x800, 4, true, None));
    q.avail.push(1);
    q.encode(&mut s);
    Virtq::default().encode(&mut s);
    s.u8(3).u8(4).bytes(&[1, 0, 0, 0, 0, 0, 0, 0]); // actual = 1 page
    out.push(s.finish());
    out
}
