//! Target `blk_request`: `BlockRequest::parse`, the pure validation of a
//! virtio-blk descriptor chain, over descriptors and guest bytes from the
//! input (a 16-sector disk).
//!
//! Invariants checked:
//! - no panic, no arithmetic overflow;
//! - an accepted request lies inside guest memory and the disk: every data
//!   buffer is non-empty and in RAM with the direction the type needs,
//!   the status byte is writable RAM, reads and writes cover whole sectors
//!   that end at or before the capacity;
//! - a refused chain names a status address only if its last descriptor is
//!   a usable status buffer;
//! - parsing is deterministic.

use devices::virtio::block::request::{BlockRequest, RequestKind, SECTOR_SIZE};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, GuestMemory, Permissions};

use crate::devices::DISK_SECTORS;
use crate::guest::{addr, fill, memory, seed_addr, DATA_START};
use crate::input::{Bytes, Seed};

fn in_ram(mem: &vm_memory::GuestMemoryMmap, a: GuestAddress, len: u32) -> bool {
    mem.check_range(
        a,
        usize::try_from(len).unwrap_or(usize::MAX),
        Permissions::Read,
    )
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let mem = memory();
    let capacity = u64::from(b.u8() % 4) * DISK_SECTORS;
    let n = b.u8() % 16;
    let descs: Vec<Descriptor> = (0..n)
        .map(|_| Descriptor::new(addr(&mut b), b.u32(), b.u16(), b.u16()))
        .collect();
    while !b.is_empty() {
        let at = addr(&mut b);
        fill(&mem, at, b.blob());
    }
    let parsed = BlockRequest::parse(&descs, &mem, capacity);
    assert_eq!(parsed, BlockRequest::parse(&descs, &mem, capacity));
    match parsed {
        Ok(req) => {
            assert!(in_ram(&mem, req.status_addr, 1), "status outside RAM");
            for &(a, len) in &req.data {
                assert!(len > 0 && in_ram(&mem, a, len), "data buffer {a:?}+{len}");
            }
            match req.kind {
                RequestKind::In | RequestKind::Out => {
                    let len = req.data_len();
                    assert!(len > 0 && len % SECTOR_SIZE == 0, "data length {len}");
                    assert!(req.sector + len / SECTOR_SIZE <= capacity, "past the disk");
                }
                RequestKind::GetId => assert!(!req.data.is_empty()),
                RequestKind::Flush | RequestKind::Unsupported(_) => {
                    assert!(req.data.is_empty())
                }
            }
        }
        Err(e) => {
            if let Some(status) = e.status_addr {
                let last = descs.last().expect("a status address needs a descriptor");
                assert!(last.is_write_only() && in_ram(&mem, status, 1));
            }
        }
    }
}

/// Seed inputs: header, data, status as a driver lays them out.
pub fn seeds() -> Vec<Vec<u8>> {
    let one = |ty: u32, sector: u64, data: &[(u32, u16)]| {
        let mut s = Seed::new();
        s.u8(1).u8(u8::try_from(data.len() + 2).expect("count"));
        seed_addr(&mut s, DATA_START);
        s.u32(16).u16(1).u16(1);
        for (i, &(len, flags)) in data.iter().enumerate() {
            seed_addr(&mut s, DATA_START + 0x1000 * (i as u64 + 1));
            s.u32(len)
                .u16(flags | 1)
                .u16(u16::try_from(i + 2).expect("next"));
        }
        seed_addr(&mut s, DATA_START + 0x800);
        s.u32(1).u16(2).u16(0);
        let mut hdr = vec![0u8; 16];
        hdr[0..4].copy_from_slice(&ty.to_le_bytes());
        hdr[8..16].copy_from_slice(&sector.to_le_bytes());
        seed_addr(&mut s, DATA_START);
        s.blob(&hdr);
        s.finish()
    };
    vec![
        one(0, 0, &[(512, 2), (512, 2)]),
        one(1, 15, &[(512, 0)]),
        one(4, 0, &[]),
        one(8, 0, &[(20, 2)]),
        one(0, u64::MAX, &[(512, 2)]),
    ]
}
