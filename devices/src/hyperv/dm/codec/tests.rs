use super::*;

fn r(start: u64, count: u64) -> PageRange {
    PageRange::new(start, count)
}

/// A message as Linux lays it out: header then little-endian words.
fn linux(msg_type: u16, trans_id: u32, body: &[u64]) -> Vec<u8> {
    let size = u16::try_from(8 + body.len() * 8).unwrap();
    let mut b = Vec::new();
    b.extend_from_slice(&msg_type.to_le_bytes());
    b.extend_from_slice(&size.to_le_bytes());
    b.extend_from_slice(&trans_id.to_le_bytes());
    for w in body {
        b.extend_from_slice(&w.to_le_bytes());
    }
    b
}

#[test]
fn parses_what_linux_sends_during_bring_up() {
    // VERSION_REQUEST 2.0, is_last_attempt = 0; then 0.3 as last attempt.
    let v = linux(DM_VERSION_REQUEST, 1, &[0x0002_0000]);
    assert_eq!(
        parse_guest_message(&v),
        Ok(GuestDmMessage::VersionRequest {
            version: DmVersion::V2_0,
            is_last_attempt: false
        })
    );
    let v = linux(DM_VERSION_REQUEST, 3, &[3 | 1 << 32]);
    assert_eq!(
        parse_guest_message(&v),
        Ok(GuestDmMessage::VersionRequest {
            version: DmVersion::V0_3,
            is_last_attempt: true
        })
    );
    assert_eq!(DmVersion::V2_0.to_string(), "2.0");
    assert_eq!(DmVersion::V0_3.to_string(), "0.3");

    // CAPABILITIES_REPORT: caps word 0x1f = balloon, hot_add, alignment 7.
    let c = linux(DM_CAPABILITIES_REPORT, 2, &[0x1f, 0, u64::MAX]);
    let GuestDmMessage::CapabilitiesReport {
        caps,
        min_page_count,
        max_page_number,
    } = parse_guest_message(&c).unwrap()
    else {
        panic!("not a capabilities report");
    };
    assert!(caps.balloon && caps.hot_add);
    assert_eq!(caps.hot_add_alignment, 7);
    assert_eq!(caps.hot_add_alignment_pages(), 32768); // 128 MiB
    assert_eq!(caps.to_bits(), 0x1f);
    assert_eq!((min_page_count, max_page_number), (0, u64::MAX));
    // Reserved bits are ignored; alignment 15 is 32 GiB.
    let caps = GuestCapabilities::from_bits(!0);
    assert_eq!(caps.hot_add_alignment_pages(), 256 << 15);

    // STATUS_REPORT: 48 bytes, two u32 at the end.
    let s = linux(DM_STATUS_REPORT, 9, &[1000, 2000, 3, 4, 5 | 6 << 32]);
    assert_eq!(
        parse_guest_message(&s),
        Ok(GuestDmMessage::StatusReport(StatusReport {
            num_avail: 1000,
            num_committed: 2000,
            page_file_size: 3,
            zero_free: 4,
            page_file_writes: 5,
            io_diff: 6,
        }))
    );
}

#[test]
fn balloon_response_bitfields() {
    // more_pages is bit 0 and range_count bits 1-31 of the word at 12.
    let ranges = [0x200 | 512 << 40, 0x1_0000_0001 | 1 << 40];
    let word: u64 = (1 | 2 << 1) << 32;
    let m = linux(DM_BALLOON_RESPONSE, 7, &[word, ranges[0], ranges[1]]);
    assert_eq!(
        parse_guest_message(&m),
        Ok(GuestDmMessage::BalloonResponse {
            more_pages: true,
            ranges: vec![r(0x200, 512), r(0x1_0000_0001, 1)],
        })
    );
    // The last response may carry no range.
    let m = linux(DM_BALLOON_RESPONSE, 8, &[0]);
    assert_eq!(
        parse_guest_message(&m),
        Ok(GuestDmMessage::BalloonResponse {
            more_pages: false,
            ranges: vec![],
        })
    );
    // UNBALLOON_RESPONSE is a bare header; HOT_ADD_RESPONSE two u32.
    let m = linux(DM_UNBALLOON_RESPONSE, 1, &[]);
    assert_eq!(
        parse_guest_message(&m),
        Ok(GuestDmMessage::UnballoonResponse)
    );
    let m = linux(DM_MEM_HOT_ADD_RESPONSE, 1, &[262144 | 1 << 32]);
    assert_eq!(
        parse_guest_message(&m),
        Ok(GuestDmMessage::HotAddResponse {
            page_count: 262144,
            result: 1
        })
    );
}

#[test]
fn host_messages_have_linux_layouts() {
    let v = HostDmMessage::VersionResponse { accepted: true }.encode(5);
    assert_eq!(v.unwrap(), linux(DM_VERSION_RESPONSE, 5, &[1]));
    let v = HostDmMessage::VersionResponse { accepted: false }.encode(5);
    assert_eq!(v.unwrap(), linux(DM_VERSION_RESPONSE, 5, &[0]));
    let c = HostDmMessage::CapabilitiesResponse { accepted: true }.encode(6);
    assert_eq!(c.unwrap(), linux(DM_CAPABILITIES_RESPONSE, 6, &[1]));
    let b = HostDmMessage::BalloonRequest { num_pages: 262144 }.encode(7);
    assert_eq!(b.unwrap(), linux(DM_BALLOON_REQUEST, 7, &[262144]));
    // UNBALLOON_REQUEST: more_pages bit 0 at 8, a full u32 count at 12.
    let u = HostDmMessage::UnballoonRequest {
        more_pages: true,
        ranges: vec![r(0x1234, 512), r(0xff_ffff_ffff, 0xff_ffff)],
    }
    .encode(8);
    let expected = linux(
        DM_UNBALLOON_REQUEST,
        8,
        &[1 | 2 << 32, 0x1234 | 512 << 40, u64::MAX],
    );
    assert_eq!(u.unwrap(), expected);
    // Hot-add: 16 bytes without a region, 24 with one.
    let range = r(0x10_0000, 0x4_0000);
    let h = HostDmMessage::HotAddRequest {
        range,
        region: None,
    }
    .encode(9)
    .unwrap();
    assert_eq!(
        h,
        linux(DM_MEM_HOT_ADD_REQUEST, 9, &[0x10_0000 | 0x4_0000 << 40])
    );
    let h = HostDmMessage::HotAddRequest {
        range,
        region: Some(range),
    }
    .encode(9)
    .unwrap();
    assert_eq!(h.len(), 24);
    assert_eq!(
        h,
        linux(
            DM_MEM_HOT_ADD_REQUEST,
            9,
            &[0x10_0000 | 0x4_0000 << 40, 0x10_0000 | 0x4_0000 << 40]
        )
    );
    // INFO: reserved, info_size 16, {type 0, data_size 8, u64}.
    let i = HostDmMessage::InfoMaxPageCount {
        max_page_count: 0x12_3456,
    }
    .encode(10)
    .unwrap();
    assert_eq!(
        i,
        linux(DM_INFO_MESSAGE, 10, &[16 << 32, 8 << 32, 0x12_3456])
    );
}

#[test]
fn range_wire_format() {
    let raw = encode_range(r(0x12_3456_789a, 0xab_cdef)).unwrap();
    assert_eq!(raw, 0xabcd_ef12_3456_789a);
    assert_eq!(decode_range(raw), r(0x12_3456_789a, 0xab_cdef));
    assert_eq!(
        encode_range(r(PFN_LIMIT, 1)),
        Err(DmError::RangeNotEncodable {
            start: PFN_LIMIT,
            count: 1
        })
    );
    assert!(encode_range(r(0, MAX_RANGE_PAGES + 1)).is_err());
    let err = HostDmMessage::HotAddRequest {
        range: r(0, 1 << 24),
        region: None,
    }
    .encode(1);
    assert!(matches!(err, Err(DmError::RangeNotEncodable { .. })));
}

#[test]
fn hostile_sizes_and_types() {
    let good = [
        linux(DM_VERSION_REQUEST, 1, &[0x0002_0000]),
        linux(DM_CAPABILITIES_REPORT, 1, &[0x1f, 0, 0]),
        linux(DM_STATUS_REPORT, 1, &[1, 2, 3, 4, 5]),
        linux(DM_BALLOON_RESPONSE, 1, &[2 << 33, 1 << 40, 2 | 1 << 40]),
        linux(DM_MEM_HOT_ADD_RESPONSE, 1, &[1]),
    ];
    for msg in &good {
        assert!(parse_guest_message(msg).is_ok());
        // Every truncation is an error, whatever the header says.
        for len in 0..msg.len() {
            assert!(parse_guest_message(&msg[..len]).is_err(), "{msg:?} {len}");
            let mut shrunk = msg[..len].to_vec();
            if len >= 4 {
                let size = u16::try_from(len).unwrap();
                shrunk[2..4].copy_from_slice(&size.to_le_bytes());
                assert!(parse_guest_message(&shrunk).is_err(), "{msg:?} {len}");
            }
        }
        // Trailing padding after the declared size is ignored.
        let mut padded = msg.clone();
        padded.extend_from_slice(&[0xff; 13]);
        assert_eq!(parse_guest_message(&padded), parse_guest_message(msg));
    }
    assert_eq!(
        parse_guest_message(&[1, 0, 16]),
        Err(DmError::TooShortForHeader(3))
    );
    // Declared size beyond the bytes, or below the header.
    let mut m = linux(DM_VERSION_REQUEST, 1, &[0]);
    m[2] = 24;
    assert_eq!(
        parse_guest_message(&m),
        Err(DmError::BadSize {
            declared: 24,
            available: 16
        })
    );
    m[2] = 4;
    assert!(matches!(
        parse_guest_message(&m),
        Err(DmError::BadSize { declared: 4, .. })
    ));
    // A range count larger than the bytes: from one too many to the max.
    for count in [3u64, 4, 511, (1 << 31) - 1] {
        let m = linux(DM_BALLOON_RESPONSE, 1, &[count << 33, 1 << 40, 1 << 40]);
        assert_eq!(
            parse_guest_message(&m),
            Err(DmError::RangeCountTooLarge {
                count: u32::try_from(count).unwrap(),
                size: 32,
                fits: 2
            })
        );
    }
    // Host-only and unknown types.
    for t in [0, 2, 4, 6, 8, 10, 12] {
        let m = linux(t, 1, &[0, 0, 0]);
        assert_eq!(parse_guest_message(&m), Err(DmError::WrongDirection(t)));
    }
    for t in [13, 14, 0xffff] {
        let m = linux(t, 1, &[]);
        assert_eq!(parse_guest_message(&m), Err(DmError::UnknownType(t)));
    }
}

#[test]
fn arbitrary_bytes_never_panic() {
    let mut seed: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for _ in 0..20_000 {
        let len = usize::try_from(next() % 80).unwrap();
        let mut bytes: Vec<u8> = (0..len).map(|_| next().to_le_bytes()[0]).collect();
        if len >= 4 && next() % 2 == 0 {
            // Plausible headers reach the body parsers more often.
            bytes[0] = u8::try_from(next() % 14).unwrap();
            bytes[1] = 0;
            let size = u16::try_from(next() % 96).unwrap();
            bytes[2..4].copy_from_slice(&size.to_le_bytes());
        }
        let _ = parse_guest_message(&bytes);
        let _ = parse_host_message(&bytes);
    }
}

#[test]
fn split_unballoon_respects_the_limits() {
    assert!(split_unballoon(&[]).is_empty());
    assert!(split_unballoon(&[r(5, 0)]).is_empty());
    // A range longer than 2^24 - 1 pages is cut.
    let msgs = split_unballoon(&[r(0x100000, 2 * MAX_RANGE_PAGES + 2)]);
    assert_eq!(
        msgs,
        [HostDmMessage::UnballoonRequest {
            more_pages: false,
            ranges: vec![
                r(0x100000, MAX_RANGE_PAGES),
                r(0x100000 + MAX_RANGE_PAGES, MAX_RANGE_PAGES),
                r(0x100000 + 2 * MAX_RANGE_PAGES, 2),
            ],
        }]
    );
    // 1100 ranges: 510 + 510 + 80, more_pages on all but the last.
    let ranges: Vec<PageRange> = (0..1100).map(|i| r(i * 2, 1)).collect();
    let msgs = split_unballoon(&ranges);
    assert_eq!(msgs.len(), 3);
    let mut seen = Vec::new();
    for (i, msg) in msgs.iter().enumerate() {
        let bytes = msg.encode(1).unwrap();
        assert!(bytes.len() <= MAX_HOST_MESSAGE_SIZE);
        let HostDmMessage::UnballoonRequest { more_pages, ranges } = msg else {
            panic!("not an unballoon request");
        };
        assert_eq!(*more_pages, i < 2);
        if i < 2 {
            assert_eq!(ranges.len(), MAX_RANGES_PER_MESSAGE);
            assert_eq!(bytes.len(), MAX_HOST_MESSAGE_SIZE);
        }
        seen.extend_from_slice(ranges);
    }
    assert_eq!(seen, ranges);
    // One range more than fits is refused by the encoder.
    let too_many = HostDmMessage::UnballoonRequest {
        more_pages: false,
        ranges: (0..=510).map(|i| r(i, 1)).collect(),
    };
    assert_eq!(
        too_many.encode(1),
        Err(DmError::MessageTooLarge {
            size: 4104,
            limit: MAX_HOST_MESSAGE_SIZE
        })
    );
}

#[test]
fn round_trips() {
    let host = [
        HostDmMessage::VersionResponse { accepted: true },
        HostDmMessage::CapabilitiesResponse { accepted: false },
        HostDmMessage::BalloonRequest {
            num_pages: u32::MAX,
        },
        HostDmMessage::UnballoonRequest {
            more_pages: true,
            ranges: vec![r(1, 2), r(3, 4)],
        },
        HostDmMessage::HotAddRequest {
            range: r(1 << 20, 1 << 15),
            region: None,
        },
        HostDmMessage::HotAddRequest {
            range: r(1 << 20, 1 << 15),
            region: Some(r(1 << 20, 1 << 16)),
        },
        HostDmMessage::InfoMaxPageCount { max_page_count: 77 },
    ];
    for msg in host {
        let bytes = msg.encode(42).unwrap();
        assert_eq!(parse_header(&bytes).unwrap().trans_id, 42);
        assert_eq!(parse_host_message(&bytes), Ok(msg));
        assert!(parse_guest_message(&bytes).is_err());
    }
    let guest = [
        GuestDmMessage::VersionRequest {
            version: DmVersion::V1_0,
            is_last_attempt: false,
        },
        GuestDmMessage::CapabilitiesReport {
            caps: GuestCapabilities::from_bits(0x1f),
            min_page_count: 0,
            max_page_number: u64::MAX,
        },
        GuestDmMessage::StatusReport(StatusReport::default()),
        GuestDmMessage::BalloonResponse {
            more_pages: true,
            ranges: vec![r(512, 512); 510],
        },
        GuestDmMessage::UnballoonResponse,
        GuestDmMessage::HotAddResponse {
            page_count: 5,
            result: 0,
        },
    ];
    for msg in guest {
        let bytes = msg.encode(7).unwrap();
        assert_eq!(parse_guest_message(&bytes), Ok(msg));
        assert!(parse_host_message(&bytes).is_err());
    }
}
