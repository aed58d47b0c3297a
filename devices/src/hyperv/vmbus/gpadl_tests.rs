//! Tests of GPADL assembly, with the message splits Linux uses and hostile ones.
#![allow(clippy::cast_possible_truncation)] // Test values cut to size.

use super::*;

/// The range data stream: per range `byte_count`, `byte_offset`, PFNs.
fn range_data(ranges: &[(u32, u32, &[u64])]) -> Vec<u8> {
    let mut data = Vec::new();
    for (byte_count, byte_offset, pfns) in ranges {
        data.extend_from_slice(&byte_count.to_le_bytes());
        data.extend_from_slice(&byte_offset.to_le_bytes());
        for pfn in *pfns {
            data.extend_from_slice(&pfn.to_le_bytes());
        }
    }
    data
}

fn header(gpadl_id: u32, range_buflen: usize, range_count: u16, data: &[u8]) -> GpadlHeader {
    GpadlHeader {
        child_relid: 1,
        gpadl_id,
        range_buflen: u16::try_from(range_buflen).unwrap(),
        range_count,
        range_data: data.to_vec(),
    }
}

fn body(gpadl_id: u32, data: &[u8]) -> GpadlBody {
    GpadlBody {
        message_number: 0,
        gpadl_id,
        range_data: data.to_vec(),
    }
}

fn pfns(first: u64, count: u64) -> Vec<u64> {
    (first..first + count).collect()
}

/// Splits `data` the way Linux does: 8 + 26 * 8 bytes in the header, then
/// bodies of up to 28 PFNs.
fn linux_split(data: &[u8]) -> (Vec<u8>, Vec<Vec<u8>>) {
    let head = data.len().min(8 + 26 * 8);
    let bodies = data[head..].chunks(28 * 8).map(<[u8]>::to_vec).collect();
    (data[..head].to_vec(), bodies)
}

#[test]
fn hv_balloon_ring_fits_in_the_header() {
    let pages = pfns(0x100, 10);
    let data = range_data(&[(10 * 4096, 0, &pages)]);
    let mut table = GpadlTable::new();
    assert_eq!(
        table.on_header(&header(0xe1e10, data.len(), 1, &data)),
        Ok(GpadlProgress::Complete {
            child_relid: 1,
            gpadl_id: 0xe1e10
        })
    );
    let gpadl = table.get(0xe1e10).unwrap();
    assert_eq!(gpadl.child_relid, 1);
    assert_eq!(gpadl.page_aligned_pfns(), Some(pages.as_slice()));
    assert_eq!(table.len(), 1);
}

#[test]
fn large_gpadl_assembled_from_header_and_bodies() {
    let pages = pfns(0x2000, 60);
    let data = range_data(&[(60 * 4096, 0, &pages)]);
    let (head, bodies) = linux_split(&data);
    assert_eq!(bodies.len(), 2);
    let mut table = GpadlTable::new();
    assert_eq!(
        table.on_header(&header(7, data.len(), 1, &head)),
        Ok(GpadlProgress::Incomplete)
    );
    assert!(table.get(7).is_none(), "incomplete GPADLs are not usable");
    assert_eq!(
        table.on_body(&body(7, &bodies[0])),
        Ok(GpadlProgress::Incomplete)
    );
    assert_eq!(
        table.on_body(&body(7, &bodies[1])),
        Ok(GpadlProgress::Complete {
            child_relid: 1,
            gpadl_id: 7
        })
    );
    assert_eq!(
        table.get(7).unwrap().page_aligned_pfns(),
        Some(pages.as_slice())
    );
    // A body after completion is not taken, and the GPADL stays.
    let failure = table.on_body(&body(7, &[0; 8])).unwrap_err();
    assert_eq!(failure.error, GpadlError::UnknownId);
    assert_eq!(failure.reply_relid, None);
    assert!(table.get(7).is_some());
}

#[test]
fn multiple_ranges_and_unaligned_ranges() {
    let data = range_data(&[(100, 4000, &[5, 6]), (4096, 0, &[9])]);
    let mut table = GpadlTable::new();
    assert!(matches!(
        table.on_header(&header(1, data.len(), 2, &data)),
        Ok(GpadlProgress::Complete { .. })
    ));
    let gpadl = table.get(1).unwrap();
    assert_eq!(gpadl.ranges.len(), 2);
    assert_eq!(gpadl.ranges[0].pfns, vec![5, 6]);
    assert_eq!(gpadl.ranges[0].byte_offset, 4000);
    assert_eq!(gpadl.ranges[1].pfns, vec![9]);
    assert_eq!(gpadl.page_aligned_pfns(), None, "two ranges");

    for (byte_count, byte_offset, pages) in [(4096 + 1, 0, 2), (4096, 8, 2), (100, 0, 1)] {
        let data = range_data(&[(byte_count, byte_offset, &pfns(0, pages))]);
        let mut table = GpadlTable::new();
        table.on_header(&header(1, data.len(), 1, &data)).unwrap();
        assert_eq!(table.get(1).unwrap().page_aligned_pfns(), None);
    }
}

#[test]
fn duplicate_handles_and_the_limit() {
    let data = range_data(&[(4096, 0, &[1])]);
    let mut table = GpadlTable::new();
    table.on_header(&header(1, data.len(), 1, &data)).unwrap();
    let failure = table
        .on_header(&header(1, data.len(), 1, &data))
        .unwrap_err();
    assert_eq!(failure.error, GpadlError::DuplicateId);
    assert_eq!(failure.reply_relid, Some(1));
    assert!(table.get(1).is_some(), "the first GPADL survives");

    for id in 2..=MAX_GPADLS as u32 {
        table.on_header(&header(id, data.len(), 1, &data)).unwrap();
    }
    let failure = table
        .on_header(&header(1000, data.len(), 1, &data))
        .unwrap_err();
    assert_eq!(failure.error, GpadlError::TooMany);
    assert_eq!(failure.gpadl_id, 1000);
    assert!(table.remove(3));
    assert!(!table.remove(3));
    assert!(table.on_header(&header(1000, data.len(), 1, &data)).is_ok());
    table.clear();
    assert!(table.is_empty());
}

#[test]
fn malformed_headers() {
    let data = range_data(&[(4096, 0, &[1])]);
    let cases: Vec<(GpadlHeader, GpadlError)> = vec![
        (header(1, 0, 1, &[]), GpadlError::BadRangeBufferLength(0)),
        (
            header(1, 12, 1, &data[..8]),
            GpadlError::BadRangeBufferLength(12),
        ),
        (header(1, 16, 0, &data), GpadlError::NoRanges),
        (
            header(1, 24, 1, &data[..12]),
            GpadlError::MisalignedData(12),
        ),
        (
            header(1, 8, 1, &data),
            GpadlError::Overflow { range_buflen: 8 },
        ),
        (
            header(1, 16, 1, &range_data(&[(0, 0, &[1])])),
            GpadlError::BadRange {
                index: 0,
                byte_offset: 0,
                byte_count: 0,
            },
        ),
        (
            header(1, 16, 1, &range_data(&[(1, 4096, &[1])])),
            GpadlError::BadRange {
                index: 0,
                byte_offset: 4096,
                byte_count: 1,
            },
        ),
        // Claims two pages, carries one PFN.
        (
            header(1, 16, 1, &range_data(&[(8192, 0, &[1])])),
            GpadlError::LengthMismatch,
        ),
        // Claims one page, carries two PFNs.
        (
            header(1, 24, 1, &range_data(&[(4096, 0, &[1, 2])])),
            GpadlError::LengthMismatch,
        ),
        // Claims two ranges, carries one.
        (header(1, 16, 2, &data), GpadlError::LengthMismatch),
        // A 4 GiB range described in 16 bytes: refused, nothing allocated.
        (
            header(1, 16, 1, &range_data(&[(u32::MAX, 4095, &[1])])),
            GpadlError::LengthMismatch,
        ),
        (
            header(1, 16, 1, &range_data(&[(4096, 0, &[MAX_GUEST_PFN + 1])])),
            GpadlError::BadPfn(MAX_GUEST_PFN + 1),
        ),
    ];
    for (message, error) in cases {
        let mut table = GpadlTable::new();
        let failure = table.on_header(&message).unwrap_err();
        assert_eq!(failure.error, error, "{message:?}");
        assert_eq!(failure.reply_relid, Some(1));
        assert!(table.is_empty(), "a refused GPADL is not kept");
    }
}

#[test]
fn malformed_bodies_fail_the_gpadl() {
    let pages = pfns(0, 30);
    let data = range_data(&[(30 * 4096, 0, &pages)]);
    let (head, bodies) = linux_split(&data);
    let cases: Vec<(Vec<u8>, GpadlError)> = vec![
        (vec![0; 12], GpadlError::MisalignedData(12)),
        (
            [bodies[0].clone(), vec![0; 8]].concat(),
            GpadlError::Overflow {
                range_buflen: u16::try_from(data.len()).unwrap(),
            },
        ),
    ];
    for (bad_body, error) in cases {
        let mut table = GpadlTable::new();
        table.on_header(&header(5, data.len(), 1, &head)).unwrap();
        let failure = table.on_body(&body(5, &bad_body)).unwrap_err();
        assert_eq!(failure.error, error);
        assert_eq!(failure.reply_relid, Some(1));
        assert!(table.is_empty(), "the GPADL is forgotten");
    }
    let mut table = GpadlTable::new();
    let failure = table.on_body(&body(5, &bodies[0])).unwrap_err();
    assert_eq!(failure.error, GpadlError::UnknownId);
    assert_eq!(failure.reply_relid, None);

    // Empty bodies change nothing; the GPADL still completes.
    table.on_header(&header(5, data.len(), 1, &head)).unwrap();
    assert_eq!(table.on_body(&body(5, &[])), Ok(GpadlProgress::Incomplete));
    assert!(matches!(
        table.on_body(&body(5, &bodies[0])),
        Ok(GpadlProgress::Complete { .. })
    ));
}

#[test]
fn largest_description_is_bounded() {
    // range_buflen is a u16: the most PFNs one GPADL can describe.
    let max_pages = (usize::from(u16::MAX) / 8 - 1) as u64;
    let pages = pfns(0, max_pages);
    let data = range_data(&[(u32::try_from(max_pages * 4096).unwrap(), 0, &pages)]);
    let (head, bodies) = linux_split(&data);
    let mut table = GpadlTable::new();
    table.on_header(&header(9, data.len(), 1, &head)).unwrap();
    let mut last = GpadlProgress::Incomplete;
    for chunk in &bodies {
        last = table.on_body(&body(9, chunk)).unwrap();
    }
    assert!(matches!(last, GpadlProgress::Complete { .. }));
    assert_eq!(table.get(9).unwrap().ranges[0].pfns.len() as u64, max_pages);
}
