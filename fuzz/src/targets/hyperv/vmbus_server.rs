//! Target `vmbus_server`: sequences of posted payloads through
//! `vmbus::server::VmbusServer::handle_payload`, with the VMM's side
//! played as the server asks (open completions, resets).
//!
//! Invariants checked:
//! - no panic, no arithmetic overflow;
//! - every payload counts as one message, a malformed one as malformed;
//! - every host message goes to an existing VP and encodes to at most 240
//!   bytes; an OpenChannel action leaves the channel Opening, with two
//!   rings of at least two pages each on one connected server; an open
//!   channel implies a connection;
//! - afterwards a guest that starts over (INITIATE_CONTACT 4.0, then
//!   REQUEST_OFFERS) is accepted and gets the offer.

use devices::hyperv::vmbus::guid::{DYNAMIC_MEMORY_CLASS_ID, DYNAMIC_MEMORY_INSTANCE_ID};
use devices::hyperv::vmbus::message::{
    message_type as t, parse_guest_message, ChannelOffer, HostMessage, MAX_MESSAGE_SIZE,
};
use devices::hyperv::vmbus::server::{ChannelState, ServerAction, ServerOutput, VmbusServer};

use super::{gpadl_header, initiate_contact, ops, vmbus_msg};
use crate::input::Bytes;

const RELID: u32 = 1;
const VCPUS: u32 = 2;

fn check_output(server: &VmbusServer, out: &ServerOutput) -> bool {
    let mut opening = false;
    for m in &out.messages {
        assert!(m.target_vp < VCPUS, "message to VP {}", m.target_vp);
        assert!(m.message.encode().len() <= MAX_MESSAGE_SIZE);
    }
    for a in &out.actions {
        if let ServerAction::OpenChannel(req) = a {
            assert!(req.guest_to_host_pfns.len() >= 2 && req.host_to_guest_pfns.len() >= 2);
            assert!(req.target_vp < VCPUS);
            assert!(matches!(
                server.channel_state(),
                ChannelState::Opening { .. }
            ));
            opening = true;
        }
    }
    if server.channel_state() != ChannelState::Closed {
        assert!(server.is_connected(), "channel open without a connection");
    }
    opening
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let offer = ChannelOffer {
        class_id: DYNAMIC_MEMORY_CLASS_ID,
        instance_id: DYNAMIC_MEMORY_INSTANCE_ID,
        child_relid: RELID,
        connection_id: 0x11,
    };
    let mut server = VmbusServer::new(offer, VCPUS).expect("server");
    let mut b = Bytes::new(data);
    while !b.is_empty() {
        let op = b.u8();
        let payload = b.blob();
        if op % 8 == 7 {
            let out = server.reset();
            assert!(out.messages.is_empty());
            assert!(!server.is_connected());
            continue;
        }
        let before = server.stats();
        let out = server.handle_payload(payload);
        let after = server.stats();
        assert_eq!(after.messages, before.messages + 1);
        let malformed = parse_guest_message(payload).is_err();
        assert_eq!(after.malformed, before.malformed + u64::from(malformed));
        if check_output(&server, &out) {
            // The VMM maps the rings (or fails to) before the next message.
            let done = server.complete_open(op & 0x80 == 0);
            assert_eq!(done.messages.len(), 1);
            check_output(&server, &done);
        }
    }
    let out = server.handle_payload(&initiate_contact(0x0004_0000));
    assert!(server.is_connected(), "INITIATE_CONTACT 4.0 refused");
    assert!(out.messages.iter().any(|m| matches!(
        m.message,
        HostMessage::VersionResponse {
            version_supported: true,
            ..
        }
    )));
    let out = server.handle_payload(&vmbus_msg(t::REQUEST_OFFERS, &[], 8));
    assert!(out
        .messages
        .iter()
        .any(|m| matches!(m.message, HostMessage::OfferChannel(_))));
    assert!(matches!(
        out.messages.last().map(|m| m.message),
        Some(HostMessage::AllOffersDelivered)
    ));
}

/// Seed inputs: Linux's bring-up (version, offers, ring GPADL, open,
/// close, teardown, unload) and some out-of-order variants.
pub fn seeds() -> Vec<Vec<u8>> {
    let linux = vec![
        (0, initiate_contact(0x0005_0003)),
        (0, initiate_contact(0x0004_0001)),
        (0, initiate_contact(0x0004_0000)),
        (0, vmbus_msg(t::REQUEST_OFFERS, &[], 8)),
        (0, gpadl_header(RELID, 0xe1e10, 10)),
        (
            0,
            vmbus_msg(t::OPEN_CHANNEL, &[RELID, RELID, 0xe1e10, 0, 5], 148),
        ),
        (0, vmbus_msg(t::CLOSE_CHANNEL, &[RELID], 12)),
        (0, vmbus_msg(t::GPADL_TEARDOWN, &[RELID, 0xe1e10], 16)),
        (0, vmbus_msg(t::UNLOAD, &[], 8)),
    ];
    let failed_open = vec![
        (0, initiate_contact(0x0004_0000)),
        (0, vmbus_msg(t::REQUEST_OFFERS, &[], 8)),
        (0, gpadl_header(RELID, 7, 4)),
        (
            0x80,
            vmbus_msg(t::OPEN_CHANNEL, &[RELID, RELID, 7, 1, 2], 148),
        ),
        (7, Vec::new()),
    ];
    let unordered = vec![
        (0, gpadl_header(RELID, 7, 4)),
        (0, vmbus_msg(t::OPEN_CHANNEL, &[RELID, RELID, 7, 0, 2], 148)),
        (0, initiate_contact(0x0004_0000)),
        (0, gpadl_header(RELID, 7, 4)),
        (0, vmbus_msg(t::OPEN_CHANNEL, &[RELID, RELID, 7, 0, 1], 148)),
    ];
    vec![ops(&linux), ops(&failed_open), ops(&unordered)]
}
