//! Target `vmbus_message`: `vmbus::message::parse_guest_message`, the
//! decoding of channel-management messages the guest posts.
//!
//! Invariants checked:
//! - no panic;
//! - too short (< 8) and too long (> 240) are refused as such; a decoded
//!   message has the type of its header and at least that type's size;
//!   GPADL messages carry exactly the bytes after their fixed part;
//! - decoding is deterministic; every host message encodes to at most 240
//!   bytes.

use devices::hyperv::vmbus::message::{
    message_type as t, parse_guest_message, ChannelMessage, HostMessage, MessageError,
    GPADL_BODY_FIXED_SIZE, GPADL_HEADER_FIXED_SIZE, MAX_MESSAGE_SIZE, MESSAGE_HEADER_SIZE,
};

use super::{gpadl_header, initiate_contact, vmbus_msg};

/// Runs one input.
pub fn run(data: &[u8]) {
    let parsed = parse_guest_message(data);
    assert_eq!(parsed, parse_guest_message(data));
    if data.len() < MESSAGE_HEADER_SIZE {
        assert_eq!(parsed, Err(MessageError::TooShort(data.len())));
        return;
    }
    if data.len() > MAX_MESSAGE_SIZE {
        assert_eq!(parsed, Err(MessageError::TooLong(data.len())));
        return;
    }
    let ty = u32::from_le_bytes(data[..4].try_into().expect("4 bytes"));
    let Ok(msg) = parsed else {
        return;
    };
    let expected_type = match &msg {
        ChannelMessage::InitiateContact(_) => t::INITIATE_CONTACT,
        ChannelMessage::RequestOffers => t::REQUEST_OFFERS,
        ChannelMessage::GpadlHeader(h) => {
            assert_eq!(h.range_data, data[GPADL_HEADER_FIXED_SIZE..]);
            t::GPADL_HEADER
        }
        ChannelMessage::GpadlBody(b) => {
            assert_eq!(b.range_data, data[GPADL_BODY_FIXED_SIZE..]);
            t::GPADL_BODY
        }
        ChannelMessage::OpenChannel(_) => t::OPEN_CHANNEL,
        ChannelMessage::CloseChannel { .. } => t::CLOSE_CHANNEL,
        ChannelMessage::GpadlTeardown { .. } => t::GPADL_TEARDOWN,
        ChannelMessage::RelIdReleased { .. } => t::RELID_RELEASED,
        ChannelMessage::Unload => t::UNLOAD,
        ChannelMessage::Unknown { message_type } => *message_type,
    };
    assert_eq!(ty, expected_type, "{msg:?}");
    for host in [
        HostMessage::GpadlCreated {
            child_relid: ty,
            gpadl_id: ty,
            status: 0,
        },
        HostMessage::GpadlTorndown { gpadl_id: ty },
        HostMessage::UnloadResponse,
    ] {
        assert!(host.encode().len() <= MAX_MESSAGE_SIZE);
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    vec![
        initiate_contact(0x0004_0000),
        vmbus_msg(t::REQUEST_OFFERS, &[], 8),
        gpadl_header(1, 0xe1e10, 10),
        vmbus_msg(t::GPADL_BODY, &[0, 0xe1e10, 0x200, 0], 32),
        vmbus_msg(t::OPEN_CHANNEL, &[1, 1, 0xe1e10, 0, 5], 148),
        vmbus_msg(t::GPADL_TEARDOWN, &[1, 0xe1e10], 16),
        vmbus_msg(t::UNLOAD, &[], 8),
        vmbus_msg(t::OPEN_CHANNEL, &[1], 20),
    ]
}
