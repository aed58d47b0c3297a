//! Tests of message parsing and encoding against the Linux struct layouts.
#![allow(clippy::cast_possible_truncation)] // Test values cut to size.

use super::*;
use crate::hyperv::vmbus::guid::{DYNAMIC_MEMORY_CLASS_ID, DYNAMIC_MEMORY_INSTANCE_ID};

/// Builds a guest message: header with `message_type`, then `fields`
/// (offset, little-endian bytes), zero-filled to `size`.
fn guest_message(message_type: u32, size: usize, fields: &[(usize, &[u8])]) -> Vec<u8> {
    let mut bytes = vec![0u8; size];
    bytes[..4].copy_from_slice(&message_type.to_le_bytes());
    for (at, value) in fields {
        bytes[*at..*at + value.len()].copy_from_slice(value);
    }
    bytes
}

fn le32(value: u32) -> [u8; 4] {
    value.to_le_bytes()
}

#[test]
fn initiate_contact_as_linux_posts_it() {
    let bytes = guest_message(
        message_type::INITIATE_CONTACT,
        INITIATE_CONTACT_SIZE,
        &[
            (8, &le32(VERSION_WIN10)),
            (12, &le32(3)),
            (16, &0x1234_5000u64.to_le_bytes()),
            (24, &0x2000u64.to_le_bytes()),
            (32, &0x3000u64.to_le_bytes()),
        ],
    );
    assert_eq!(
        parse_guest_message(&bytes),
        Ok(ChannelMessage::InitiateContact(InitiateContact {
            version_requested: VERSION_WIN10,
            target_vcpu: 3,
            interrupt_page_or_sint: 0x1234_5000,
            monitor_page1: 0x2000,
            monitor_page2: 0x3000,
        }))
    );
}

#[test]
fn gpadl_header_of_hv_balloon() {
    // 10 pages, all PFNs in the header: 28 + 8 * 10 = 108 bytes.
    let mut fields: Vec<(usize, Vec<u8>)> = vec![
        (8, le32(1).to_vec()),
        (12, le32(0xe1e10).to_vec()),
        (16, 88u16.to_le_bytes().to_vec()),
        (18, 1u16.to_le_bytes().to_vec()),
        (20, le32(10 * 4096).to_vec()),
        (24, le32(0).to_vec()),
    ];
    for page in 0..10u64 {
        fields.push((
            28 + 8 * page as usize,
            (0x100 + page).to_le_bytes().to_vec(),
        ));
    }
    let borrowed: Vec<(usize, &[u8])> = fields.iter().map(|(a, v)| (*a, v.as_slice())).collect();
    let bytes = guest_message(message_type::GPADL_HEADER, 108, &borrowed);
    let ChannelMessage::GpadlHeader(header) = parse_guest_message(&bytes).unwrap() else {
        panic!("not a GPADL header");
    };
    assert_eq!(header.child_relid, 1);
    assert_eq!(header.gpadl_id, 0xe1e10);
    assert_eq!(header.range_buflen, 88);
    assert_eq!(header.range_count, 1);
    assert_eq!(header.range_data.len(), 88);
    assert_eq!(header.range_data[..4], le32(10 * 4096));
    assert_eq!(header.range_data[8..16], 0x100u64.to_le_bytes());
}

#[test]
fn other_guest_messages() {
    let open = guest_message(
        message_type::OPEN_CHANNEL,
        OPEN_CHANNEL_SIZE,
        &[
            (8, &le32(1)),
            (12, &le32(1)),
            (16, &le32(0xe1e10)),
            (20, &le32(0)),
            (24, &le32(5)),
        ],
    );
    assert_eq!(
        parse_guest_message(&open),
        Ok(ChannelMessage::OpenChannel(OpenChannel {
            child_relid: 1,
            open_id: 1,
            ring_gpadl_id: 0xe1e10,
            target_vp: 0,
            downstream_page_offset: 5,
        }))
    );
    let body = guest_message(
        message_type::GPADL_BODY,
        32,
        &[(8, &le32(7)), (12, &le32(9)), (16, &[0xaa; 16])],
    );
    assert_eq!(
        parse_guest_message(&body),
        Ok(ChannelMessage::GpadlBody(GpadlBody {
            message_number: 7,
            gpadl_id: 9,
            range_data: vec![0xaa; 16],
        }))
    );
    let cases: [(Vec<u8>, ChannelMessage); 5] = [
        (
            guest_message(message_type::REQUEST_OFFERS, 8, &[]),
            ChannelMessage::RequestOffers,
        ),
        (
            guest_message(message_type::CLOSE_CHANNEL, 12, &[(8, &le32(4))]),
            ChannelMessage::CloseChannel { child_relid: 4 },
        ),
        (
            guest_message(
                message_type::GPADL_TEARDOWN,
                16,
                &[(8, &le32(1)), (12, &le32(0xe1e10))],
            ),
            ChannelMessage::GpadlTeardown {
                child_relid: 1,
                gpadl_id: 0xe1e10,
            },
        ),
        (
            guest_message(message_type::RELID_RELEASED, 12, &[(8, &le32(2))]),
            ChannelMessage::RelIdReleased { child_relid: 2 },
        ),
        (
            guest_message(message_type::UNLOAD, 8, &[]),
            ChannelMessage::Unload,
        ),
    ];
    for (bytes, expected) in cases {
        assert_eq!(parse_guest_message(&bytes), Ok(expected));
    }
}

#[test]
fn unknown_and_host_types_are_reported_not_rejected() {
    for message_type in [0, 1, 4, 15, 18, 21, 22, 23, 24, 25, u32::MAX] {
        let bytes = guest_message(message_type, 8, &[]);
        assert_eq!(
            parse_guest_message(&bytes),
            Ok(ChannelMessage::Unknown { message_type })
        );
    }
}

#[test]
fn every_truncation_is_an_error_not_a_panic() {
    let full_sizes = [
        (message_type::INITIATE_CONTACT, INITIATE_CONTACT_SIZE),
        (message_type::GPADL_HEADER, GPADL_HEADER_FIXED_SIZE),
        (message_type::GPADL_BODY, GPADL_BODY_FIXED_SIZE),
        (message_type::OPEN_CHANNEL, OPEN_CHANNEL_SIZE),
        (message_type::GPADL_TEARDOWN, GPADL_TEARDOWN_SIZE),
        (message_type::CLOSE_CHANNEL, CHILD_RELID_MESSAGE_SIZE),
        (message_type::RELID_RELEASED, CHILD_RELID_MESSAGE_SIZE),
    ];
    for (message_type, size) in full_sizes {
        let bytes = guest_message(message_type, size, &[]);
        assert!(parse_guest_message(&bytes).is_ok());
        for len in 0..size {
            let result = parse_guest_message(&bytes[..len]);
            if len < MESSAGE_HEADER_SIZE {
                assert_eq!(result, Err(MessageError::TooShort(len)));
            } else {
                assert_eq!(
                    result,
                    Err(MessageError::Truncated {
                        message_type,
                        expected: size,
                        actual: len
                    })
                );
            }
        }
    }
}

#[test]
fn oversized_messages_are_rejected() {
    let bytes = guest_message(message_type::GPADL_BODY, MAX_MESSAGE_SIZE + 1, &[]);
    assert_eq!(
        parse_guest_message(&bytes),
        Err(MessageError::TooLong(MAX_MESSAGE_SIZE + 1))
    );
    // 240 bytes is the limit, not beyond it.
    let bytes = guest_message(message_type::GPADL_BODY, MAX_MESSAGE_SIZE, &[]);
    assert!(parse_guest_message(&bytes).is_ok());
}

#[test]
fn random_bytes_never_panic() {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let len = (next() % 260) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        if len >= 4 {
            // Mostly known types, so the field decoders run.
            let message_type = (next() % 26) as u32;
            bytes[..4].copy_from_slice(&message_type.to_le_bytes());
        }
        let _ = parse_guest_message(&bytes);
    }
}

#[test]
fn version_response_layout() {
    let accepted = HostMessage::VersionResponse {
        version_supported: true,
        message_connection_id: 1,
    }
    .encode();
    assert_eq!(
        accepted,
        [15, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0].to_vec()
    );
    let refused = HostMessage::VersionResponse {
        version_supported: false,
        message_connection_id: 0,
    }
    .encode();
    assert_eq!(refused.len(), VERSION_RESPONSE_SIZE);
    assert_eq!(refused[8], 0);
}

#[test]
fn offer_layout_matches_vmbus_channel_offer_channel() {
    let bytes = HostMessage::OfferChannel(ChannelOffer {
        class_id: DYNAMIC_MEMORY_CLASS_ID,
        instance_id: DYNAMIC_MEMORY_INSTANCE_ID,
        child_relid: 1,
        connection_id: 0x11,
    })
    .encode();
    assert_eq!(bytes.len(), 196);
    assert_eq!(bytes[..4], le32(message_type::OFFER_CHANNEL));
    assert_eq!(
        bytes[8..24],
        [
            0xdc, 0x74, 0x50, 0x52, 0x85, 0x89, 0xe2, 0x46, 0x80, 0x57, 0xa3, 0x07, 0xdc, 0x18,
            0xa5, 0x02
        ]
    );
    assert_eq!(bytes[24..40], DYNAMIC_MEMORY_INSTANCE_ID.to_bytes());
    assert!(
        bytes[40..184].iter().all(|&b| b == 0),
        "reserved/flags/user_def"
    );
    assert_eq!(bytes[184..188], le32(1), "child_relid");
    assert_eq!(bytes[188], 0, "monitorid");
    assert_eq!(bytes[189], 0, "monitor_allocated");
    assert_eq!(bytes[190..192], [1, 0], "is_dedicated_interrupt");
    assert_eq!(bytes[192..196], le32(0x11), "connection_id");
}

#[test]
fn reply_layouts() {
    let created = HostMessage::GpadlCreated {
        child_relid: 1,
        gpadl_id: 0xe1e10,
        status: 0,
    }
    .encode();
    let mut expected = le32(message_type::GPADL_CREATED).to_vec();
    expected.extend_from_slice(&[0; 4]);
    expected.extend_from_slice(&le32(1));
    expected.extend_from_slice(&le32(0xe1e10));
    expected.extend_from_slice(&le32(0));
    assert_eq!(created, expected);

    let open = HostMessage::OpenResult {
        child_relid: 1,
        open_id: 7,
        status: STATUS_FAILURE,
    }
    .encode();
    assert_eq!(open.len(), OPEN_RESULT_SIZE);
    assert_eq!(open[..4], le32(message_type::OPEN_CHANNEL_RESULT));
    assert_eq!(open[8..12], le32(1));
    assert_eq!(open[12..16], le32(7));
    assert_eq!(open[16..20], le32(STATUS_FAILURE));

    let torndown = HostMessage::GpadlTorndown { gpadl_id: 0xe1e11 }.encode();
    assert_eq!(torndown.len(), GPADL_TORNDOWN_SIZE);
    assert_eq!(torndown[..4], le32(message_type::GPADL_TORNDOWN));
    assert_eq!(torndown[8..12], le32(0xe1e11));

    assert_eq!(
        HostMessage::AllOffersDelivered.encode(),
        [4, 0, 0, 0, 0, 0, 0, 0].to_vec()
    );
    assert_eq!(
        HostMessage::UnloadResponse.encode(),
        [17, 0, 0, 0, 0, 0, 0, 0].to_vec()
    );
}
