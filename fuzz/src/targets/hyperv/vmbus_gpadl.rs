//! Target `vmbus_gpadl`: GPADL assembly from GPADL_HEADER and GPADL_BODY
//! messages (`vmbus::gpadl::GpadlTable`), with teardowns and resets.
//!
//! Invariants checked:
//! - no panic, no arithmetic overflow, no allocation beyond the announced
//!   (u16) buffer length;
//! - at most `MAX_GPADLS` GPADLs exist, and the table holds exactly the
//!   handles a model of the rules says (refused headers add nothing, a
//!   refused body drops its GPADL, an unknown body changes nothing);
//! - a complete GPADL has `range_count` ranges, each non-empty, starting
//!   in its first page, with one PFN (below 2^40) per page it spans, and
//!   its descriptors and PFNs fill `range_buflen` exactly; an incomplete
//!   one is not visible through `get`;
//! - only a body for an unknown handle is refused without a reply relid.

use std::collections::BTreeSet;

use devices::hyperv::vmbus::gpadl::{
    GpadlError, GpadlProgress, GpadlTable, MAX_GPADLS, MAX_GUEST_PFN,
};
use devices::hyperv::vmbus::message::{GpadlBody, GpadlHeader};

use crate::input::{Bytes, Seed};

fn check_complete(table: &GpadlTable, id: u32, range_count: u16, buflen: u16) {
    let g = table.get(id).expect("complete GPADL visible");
    assert_eq!(g.ranges.len(), usize::from(range_count));
    let mut bytes = 0u64;
    for r in &g.ranges {
        assert!(r.byte_count > 0 && r.byte_offset < 4096, "{r:?}");
        let pages = (u64::from(r.byte_offset) + u64::from(r.byte_count)).div_ceil(4096);
        assert_eq!(r.pfns.len() as u64, pages);
        assert!(r.pfns.iter().all(|&p| p <= MAX_GUEST_PFN));
        bytes += 8 + 8 * pages;
    }
    assert_eq!(bytes, u64::from(buflen), "ranges do not fill range_buflen");
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let mut table = GpadlTable::new();
    let mut present: BTreeSet<u32> = BTreeSet::new();
    let mut headers: std::collections::BTreeMap<u32, (u16, u16)> = Default::default();
    while !b.is_empty() {
        match b.u8() % 4 {
            0 => {
                let header = GpadlHeader {
                    child_relid: u32::from(b.u8()),
                    gpadl_id: u32::from(b.u8() % 32),
                    range_buflen: b.u16(),
                    range_count: b.u16(),
                    range_data: b.blob().to_vec(),
                };
                let id = header.gpadl_id;
                let had = present.contains(&id);
                match table.on_header(&header) {
                    Ok(progress) => {
                        assert!(!had && present.len() < MAX_GPADLS);
                        present.insert(id);
                        headers.insert(id, (header.range_count, header.range_buflen));
                        if let GpadlProgress::Complete {
                            gpadl_id,
                            child_relid,
                        } = progress
                        {
                            assert_eq!((gpadl_id, child_relid), (id, header.child_relid));
                            check_complete(&table, id, header.range_count, header.range_buflen);
                        } else {
                            assert!(table.get(id).is_none());
                        }
                    }
                    Err(f) => {
                        assert_eq!(f.reply_relid, Some(header.child_relid));
                        assert_eq!(f.error == GpadlError::DuplicateId, had);
                    }
                }
            }
            1 => {
                let body = GpadlBody {
                    message_number: 0,
                    gpadl_id: u32::from(b.u8() % 32),
                    range_data: b.blob().to_vec(),
                };
                let id = body.gpadl_id;
                let was_pending = present.contains(&id) && table.get(id).is_none();
                match table.on_body(&body) {
                    Ok(progress) => {
                        assert!(was_pending, "body accepted for a GPADL not being assembled");
                        if let GpadlProgress::Complete { gpadl_id, .. } = progress {
                            assert_eq!(gpadl_id, id);
                            let (count, buflen) = headers[&id];
                            check_complete(&table, id, count, buflen);
                        }
                    }
                    Err(f) if f.error == GpadlError::UnknownId => {
                        assert!(!was_pending && f.reply_relid.is_none());
                    }
                    Err(f) => {
                        assert!(was_pending && f.reply_relid.is_some());
                        present.remove(&id);
                    }
                }
            }
            2 => {
                let id = u32::from(b.u8() % 32);
                assert_eq!(table.remove(id), present.remove(&id));
            }
            _ => {
                table.clear();
                present.clear();
            }
        }
        assert_eq!(table.len(), present.len(), "table vs model");
        assert!(table.len() <= MAX_GPADLS);
    }
}

/// Seed inputs: a 10-page ring GPADL in one header; a 40-page one split
/// over a header and a body; a two-range GPADL; a teardown.
pub fn seeds() -> Vec<Vec<u8>> {
    let range = |pages: u32, first: u64| {
        let mut d = (pages * 4096).to_le_bytes().to_vec();
        d.extend_from_slice(&0u32.to_le_bytes());
        for p in first..first + u64::from(pages) {
            d.extend_from_slice(&p.to_le_bytes());
        }
        d
    };
    let mut one = Seed::new();
    let r = range(10, 0x100);
    one.u8(0).u8(1).u8(7).u16(r.len() as u16).u16(1).blob(&r);
    one.u8(2).u8(7);
    let mut split = Seed::new();
    let r = range(40, 0x200);
    split
        .u8(0)
        .u8(1)
        .u8(3)
        .u16(r.len() as u16)
        .u16(1)
        .blob(&r[..216]);
    split.u8(1).u8(3).blob(&r[216..]);
    let mut two = Seed::new();
    let mut r = range(1, 0x10);
    r.extend_from_slice(&range(2, 0x20));
    two.u8(0).u8(1).u8(9).u16(r.len() as u16).u16(2).blob(&r);
    vec![one.finish(), split.finish(), two.finish()]
}
