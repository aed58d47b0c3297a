//! Target `vmbus_ring`: the host's reader of the guest → host ring
//! (`vmbus::ring::IncomingRing`) over a ring the guest wrote, in a
//! `ring_memory::BufferRingMemory`; the guest may rewrite the ring between
//! reads. Then the host's writer and reader on the same memory.
//!
//! Invariants checked:
//! - no panic, no arithmetic overflow, no allocation beyond the ring;
//! - the reader writes nothing but the read index (and the interrupt mask
//!   when asked), and publishes only 8-aligned indices inside the data
//!   area; it never reports more bytes available than the data area holds;
//! - a packet has a known type, only the "completion requested" flag, and
//!   a payload of whole 8-byte units;
//! - afterwards, with both indices reset as the guest does at open, a
//!   packet written by `OutgoingRing` reads back identically.

use devices::hyperv::vmbus::ring::{
    IncomingRing, OutgoingRing, PacketType, WriteOutcome, PACKET_FLAG_COMPLETION_REQUESTED,
};
use devices::hyperv::vmbus::ring_memory::{BufferRingMemory, RingMemory};

use crate::input::{Bytes, Seed};

const READ_INDEX: usize = 4;
const INTERRUPT_MASK: usize = 8;

/// Panics if the reader changed bytes other than `allowed` fields.
fn check_writes(before: &[u8], after: &[u8], allowed: &[usize]) {
    const CHUNK: usize = 256;
    if before == after {
        return;
    }
    for (c, (bc, ac)) in before.chunks(CHUNK).zip(after.chunks(CHUNK)).enumerate() {
        if bc == ac {
            continue;
        }
        for (j, (x, y)) in bc.iter().zip(ac).enumerate() {
            let i = c * CHUNK + j;
            assert!(
                x == y || allowed.iter().any(|&f| (f..f + 4).contains(&i)),
                "ring reader wrote byte {i:#x}"
            );
        }
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let pages = 2 + usize::from(b.u8() % 3);
    let len = pages * 4096 + usize::from(b.u8() % 2) * 8; // sometimes not whole pages
    let mut bytes = vec![0u8; len];
    bytes[0..4].copy_from_slice(&b.u32().to_le_bytes()); // write index
    bytes[4..8].copy_from_slice(&b.u32().to_le_bytes()); // read index
    bytes[12..16].copy_from_slice(&b.u32().to_le_bytes()); // pending_send_sz
    let head = b.blob();
    let n = head.len().min(len - 4096);
    bytes[4096..4096 + n].copy_from_slice(&head[..n]);
    let memory = BufferRingMemory::from_bytes(bytes);
    let Ok(mut ring) = IncomingRing::open(&memory) else {
        return;
    };
    let data_size = ring.data_size();
    for _ in 0..64 {
        if b.is_empty() {
            break;
        }
        let before = memory.to_bytes();
        match b.u8() % 4 {
            0 => {
                if let Ok(Some(p)) = ring.read_packet(&memory) {
                    assert!(PacketType::try_from(p.packet_type as u16).is_ok());
                    assert_eq!(p.flags & !PACKET_FLAG_COMPLETION_REQUESTED, 0);
                    assert_eq!(p.payload.len() % 8, 0);
                    assert!(p.payload.len() < data_size as usize);
                }
                check_writes(&before, &memory.to_bytes(), &[]);
            }
            1 => {
                let _ = ring.commit_read(&memory);
                let after = memory.to_bytes();
                check_writes(&before, &after, &[READ_INDEX]);
                // What the guest scribbled there is its business; what the
                // host publishes must be a valid index.
                if before[READ_INDEX..READ_INDEX + 4] != after[READ_INDEX..READ_INDEX + 4] {
                    let ri = memory.read_u32(READ_INDEX as u64).expect("read index");
                    assert!(
                        ri.is_multiple_of(8) && ri < data_size,
                        "published read index {ri:#x}"
                    );
                }
            }
            2 => {
                let _ = ring.set_interrupt_mask(&memory, b.bool());
                check_writes(&before, &memory.to_bytes(), &[INTERRUPT_MASK]);
            }
            _ => {
                // The guest writes: an index, or bytes of the data area.
                let at = u64::from(b.u16()) % (len as u64);
                let _ = memory.write_at(at, b.blob());
            }
        }
        if let Ok(available) = ring.bytes_available(&memory) {
            assert!(available < data_size);
        }
    }
    // A fresh session on the same memory: both indices 0.
    memory.write_u32(0, 0).expect("write index");
    memory.write_u32(READ_INDEX as u64, 0).expect("read index");
    let payload = b"tidevm ring probe";
    let mut writer = OutgoingRing::open(&memory).expect("writer");
    let outcome = writer
        .write_packet(
            &memory,
            PacketType::DataInband,
            PACKET_FLAG_COMPLETION_REQUESTED,
            7,
            payload,
        )
        .expect("write");
    assert!(matches!(outcome, WriteOutcome::Written { .. }));
    let mut reader = IncomingRing::open(&memory).expect("reader");
    let p = reader
        .read_packet(&memory)
        .expect("read")
        .expect("a packet");
    assert_eq!(p.packet_type, PacketType::DataInband);
    assert_eq!(
        (p.flags, p.transaction_id),
        (PACKET_FLAG_COMPLETION_REQUESTED, 7)
    );
    assert_eq!(&p.payload[..payload.len()], payload);
    assert!(p.payload[payload.len()..].iter().all(|&x| x == 0));
}

/// One packet: descriptor (`type`, `offset8` 2, `len8`, `flags`, id),
/// payload padded to 8, trailer.
fn packet(ty: u16, flags: u16, payload: &[u8]) -> Vec<u8> {
    let padded = payload.len().div_ceil(8) * 8;
    let len8 = ((16 + padded) / 8) as u16;
    let mut p = Vec::new();
    for v in [ty, 2, len8, flags] {
        p.extend_from_slice(&v.to_le_bytes());
    }
    p.extend_from_slice(&42u64.to_le_bytes());
    p.extend_from_slice(payload);
    p.resize(16 + padded, 0);
    p.extend_from_slice(&0u64.to_le_bytes());
    p
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut pk = packet(6, 1, b"VERSION_REQUEST!");
    pk.extend_from_slice(&packet(6, 0, &[1; 40]));
    let mut s = Seed::new();
    s.u8(0).u8(0).u32(pk.len() as u32).u32(0).u32(0).blob(&pk);
    s.u8(0).u8(0).u8(0).u8(1).u8(2).u8(1);
    out.push(s.finish());
    // The guest moves the write index under the reader.
    let mut s = Seed::new();
    let pk = packet(11, 0, &[9; 8]);
    s.u8(1).u8(0).u32(pk.len() as u32).u32(0).u32(64).blob(&pk);
    s.u8(3).u16(0).blob(&8u32.to_le_bytes()).u8(0).u8(1);
    out.push(s.finish());
    out
}
