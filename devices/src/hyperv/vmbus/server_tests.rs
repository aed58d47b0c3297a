//! Server tests: the sequence Linux 6.12 drives, and every way to get it wrong.
#![allow(clippy::cast_possible_truncation)] // Test PRNG output cut to size.

use super::*;
use crate::hyperv::vmbus::guid::{DYNAMIC_MEMORY_CLASS_ID, DYNAMIC_MEMORY_INSTANCE_ID};
use crate::hyperv::vmbus::message::{
    message_type, GpadlBody, GpadlHeader, MAX_MESSAGE_SIZE, VERSION_WIN10_V4_1, VERSION_WIN10_V5_3,
    VERSION_WIN8_1,
};

const RELID: u32 = 1;
const CONNECTION_ID: u32 = 0x11;
const VCPUS: u32 = 2;
const GPADL: u32 = 0xe1e10;

fn offer() -> ChannelOffer {
    ChannelOffer {
        class_id: DYNAMIC_MEMORY_CLASS_ID,
        instance_id: DYNAMIC_MEMORY_INSTANCE_ID,
        child_relid: RELID,
        connection_id: CONNECTION_ID,
    }
}

fn server() -> VmbusServer {
    VmbusServer::new(offer(), VCPUS).unwrap()
}

fn contact(version: u32, target_vcpu: u32) -> ChannelMessage {
    ChannelMessage::InitiateContact(InitiateContact {
        version_requested: version,
        target_vcpu,
        interrupt_page_or_sint: 0,
        monitor_page1: 0,
        monitor_page2: 0,
    })
}

/// GPADL_HEADER for `pages` pages starting at PFN 0x100, all in the header.
fn gpadl_header(relid: u32, gpadl_id: u32, pages: u64) -> ChannelMessage {
    let mut range_data = u32::try_from(pages * 4096).unwrap().to_le_bytes().to_vec();
    range_data.extend_from_slice(&0u32.to_le_bytes());
    for pfn in 0x100..0x100 + pages {
        range_data.extend_from_slice(&pfn.to_le_bytes());
    }
    ChannelMessage::GpadlHeader(GpadlHeader {
        child_relid: relid,
        gpadl_id,
        range_buflen: u16::try_from(range_data.len()).unwrap(),
        range_count: 1,
        range_data,
    })
}

fn open(gpadl_id: u32, downstream_page_offset: u32, target_vp: u32) -> ChannelMessage {
    ChannelMessage::OpenChannel(OpenChannel {
        child_relid: RELID,
        open_id: RELID,
        ring_gpadl_id: gpadl_id,
        target_vp,
        downstream_page_offset,
    })
}

fn only_message(out: &ServerOutput) -> HostMessage {
    assert_eq!(out.messages.len(), 1, "{out:?}");
    out.messages[0].message
}

fn created(gpadl_id: u32, status: u32) -> HostMessage {
    HostMessage::GpadlCreated {
        child_relid: RELID,
        gpadl_id,
        status,
    }
}

fn open_result(status: u32) -> HostMessage {
    HostMessage::OpenResult {
        child_relid: RELID,
        open_id: RELID,
        status,
    }
}

/// Drives a server to "channel offered", as Linux does at module load.
fn offered_server() -> VmbusServer {
    let mut server = server();
    server.handle_message(&contact(VERSION_WIN10, 0));
    server.handle_message(&ChannelMessage::RequestOffers);
    server
}

/// Drives a server to "channel open" on a 10-page GPADL split 5/5.
fn open_server() -> VmbusServer {
    let mut server = offered_server();
    server.handle_message(&gpadl_header(RELID, GPADL, 10));
    server.handle_message(&open(GPADL, 5, 0));
    server.complete_open(true);
    assert_eq!(
        server.channel_state(),
        ChannelState::Open { gpadl_id: GPADL }
    );
    server
}

#[test]
fn linux_6_12_bring_up_and_rmmod_modprobe() {
    let mut server = server();
    // 5.3 … 5.0 never get here: connection id 4 fails the hypercall.
    let out = server.handle_message(&contact(VERSION_WIN10_V4_1, 1));
    assert_eq!(
        out.messages,
        vec![OutgoingMessage {
            target_vp: 1,
            message: HostMessage::VersionResponse {
                version_supported: false,
                message_connection_id: 1
            }
        }]
    );
    assert!(out.actions.is_empty());
    assert!(!server.is_connected());

    let out = server.handle_message(&contact(VERSION_WIN10, 1));
    assert_eq!(
        only_message(&out),
        HostMessage::VersionResponse {
            version_supported: true,
            message_connection_id: 1
        }
    );
    assert_eq!(server.message_target_vp(), Some(1));

    let out = server.handle_message(&ChannelMessage::RequestOffers);
    let messages: Vec<HostMessage> = out.messages.iter().map(|m| m.message).collect();
    assert_eq!(
        messages,
        vec![
            HostMessage::OfferChannel(offer()),
            HostMessage::AllOffersDelivered
        ]
    );
    assert!(out.messages.iter().all(|m| m.target_vp == 1));

    for round in 0..2 {
        let gpadl_id = GPADL + round;
        let out = server.handle_message(&gpadl_header(RELID, gpadl_id, 10));
        assert_eq!(only_message(&out), created(gpadl_id, 0));

        let out = server.handle_message(&open(gpadl_id, 5, 0));
        assert!(out.messages.is_empty(), "answered by complete_open");
        let [ServerAction::OpenChannel(request)] = out.actions.as_slice() else {
            panic!("{out:?}");
        };
        assert_eq!(request.child_relid, RELID);
        assert_eq!(request.connection_id, CONNECTION_ID);
        assert_eq!(request.target_vp, 0);
        assert_eq!(request.gpadl_id, gpadl_id);
        assert_eq!(
            request.guest_to_host_pfns,
            (0x100..0x105).collect::<Vec<u64>>()
        );
        assert_eq!(
            request.host_to_guest_pfns,
            (0x105..0x10a).collect::<Vec<u64>>()
        );

        let out = server.complete_open(true);
        assert_eq!(out.messages[0].target_vp, 1);
        assert_eq!(only_message(&out), open_result(0));

        // rmmod hv_balloon: CLOSECHANNEL (no answer), then GPADL_TEARDOWN.
        let out = server.handle_message(&ChannelMessage::CloseChannel { child_relid: RELID });
        assert_eq!(
            out.actions,
            vec![ServerAction::CloseChannel { child_relid: RELID }]
        );
        assert!(out.messages.is_empty());
        let out = server.handle_message(&ChannelMessage::GpadlTeardown {
            child_relid: RELID,
            gpadl_id,
        });
        assert_eq!(only_message(&out), HostMessage::GpadlTorndown { gpadl_id });
        assert!(out.actions.is_empty());
    }
    assert_eq!(server.stats().refused, 0);
    assert_eq!(server.stats().malformed, 0);
}

#[test]
fn only_version_4_0_with_an_existing_vp_is_accepted() {
    for (version, target, accepted) in [
        (VERSION_WIN10_V5_3, 0, false),
        (VERSION_WIN10_V4_1, 0, false),
        (VERSION_WIN8_1, 0, false),
        (0, 0, false),
        (u32::MAX, 0, false),
        (VERSION_WIN10, VCPUS, false),
        (VERSION_WIN10, u32::MAX, false),
        (VERSION_WIN10, VCPUS - 1, true),
    ] {
        let mut server = server();
        let out = server.handle_message(&contact(version, target));
        let expected_vp = if target < VCPUS { target } else { 0 };
        assert_eq!(out.messages[0].target_vp, expected_vp);
        assert_eq!(
            only_message(&out),
            HostMessage::VersionResponse {
                version_supported: accepted,
                message_connection_id: 1
            },
            "{version:#x} {target}"
        );
        assert_eq!(server.is_connected(), accepted);
    }
}

#[test]
fn nothing_before_contact() {
    let mut server = server();
    for message in [
        ChannelMessage::RequestOffers,
        gpadl_header(RELID, GPADL, 10),
        open(GPADL, 5, 0),
        ChannelMessage::CloseChannel { child_relid: RELID },
        ChannelMessage::GpadlTeardown {
            child_relid: RELID,
            gpadl_id: GPADL,
        },
    ] {
        assert_eq!(server.handle_message(&message), ServerOutput::default());
    }
    assert_eq!(server.stats().ignored, 5);
    assert_eq!(server.stats().messages, 5);
}

#[test]
fn offers_are_sent_once_per_connection() {
    let mut server = offered_server();
    let out = server.handle_message(&ChannelMessage::RequestOffers);
    assert_eq!(only_message(&out), HostMessage::AllOffersDelivered);
    server.handle_message(&contact(VERSION_WIN10, 0));
    let out = server.handle_message(&ChannelMessage::RequestOffers);
    assert_eq!(
        out.messages.len(),
        2,
        "a new connection gets the offer again"
    );
}

#[test]
fn refused_gpadls_are_answered() {
    // Before the offer, for another relid, duplicate, malformed.
    let mut server = server();
    server.handle_message(&contact(VERSION_WIN10, 0));
    let out = server.handle_message(&gpadl_header(RELID, GPADL, 10));
    assert_eq!(only_message(&out), created(GPADL, STATUS_FAILURE));

    let mut server = offered_server();
    let out = server.handle_message(&gpadl_header(7, GPADL, 10));
    assert_eq!(
        only_message(&out),
        HostMessage::GpadlCreated {
            child_relid: 7,
            gpadl_id: GPADL,
            status: STATUS_FAILURE
        }
    );
    server.handle_message(&gpadl_header(RELID, GPADL, 10));
    let out = server.handle_message(&gpadl_header(RELID, GPADL, 10));
    assert_eq!(only_message(&out), created(GPADL, STATUS_FAILURE));
    let ChannelMessage::GpadlHeader(mut bad) = gpadl_header(RELID, GPADL + 1, 10) else {
        unreachable!()
    };
    bad.range_count = 0;
    let out = server.handle_message(&ChannelMessage::GpadlHeader(bad));
    assert_eq!(only_message(&out), created(GPADL + 1, STATUS_FAILURE));
    assert_eq!(server.stats().refused, 3);
}

#[test]
fn gpadl_bodies() {
    let mut server = offered_server();
    let ChannelMessage::GpadlHeader(mut header) = gpadl_header(RELID, GPADL, 30) else {
        unreachable!()
    };
    let rest = header.range_data.split_off(8 + 26 * 8);
    assert!(server
        .handle_message(&ChannelMessage::GpadlHeader(header))
        .messages
        .is_empty());
    // A body for another handle: nobody waits on it, dropped.
    let stray = ChannelMessage::GpadlBody(GpadlBody {
        message_number: 0,
        gpadl_id: 99,
        range_data: rest.clone(),
    });
    assert_eq!(server.handle_message(&stray), ServerOutput::default());
    assert_eq!(server.stats().ignored, 1);
    let body = ChannelMessage::GpadlBody(GpadlBody {
        message_number: 0,
        gpadl_id: GPADL,
        range_data: rest,
    });
    assert_eq!(
        only_message(&server.handle_message(&body)),
        created(GPADL, 0)
    );
    // Overflowing body of a pending GPADL: the guest waits, it gets a failure.
    let ChannelMessage::GpadlHeader(mut header) = gpadl_header(RELID, GPADL + 1, 30) else {
        unreachable!()
    };
    let mut rest = header.range_data.split_off(8 + 26 * 8);
    rest.extend_from_slice(&[0; 8]);
    server.handle_message(&ChannelMessage::GpadlHeader(header));
    let body = ChannelMessage::GpadlBody(GpadlBody {
        message_number: 0,
        gpadl_id: GPADL + 1,
        range_data: rest,
    });
    assert_eq!(
        only_message(&server.handle_message(&body)),
        created(GPADL + 1, STATUS_FAILURE)
    );
}

#[test]
fn refused_opens_are_answered() {
    let cases: Vec<(ChannelMessage, &str)> = vec![
        (
            ChannelMessage::OpenChannel(OpenChannel {
                child_relid: 2,
                open_id: 2,
                ring_gpadl_id: GPADL,
                target_vp: 0,
                downstream_page_offset: 5,
            }),
            "unknown relid",
        ),
        (open(GPADL + 5, 5, 0), "unknown GPADL"),
        (open(GPADL + 1, 2, 0), "incomplete GPADL"),
        (open(GPADL + 2, 2, 0), "GPADL of another relid"),
        (open(GPADL + 3, 2, 0), "unaligned GPADL"),
        (open(GPADL, 0, 0), "offset 0"),
        (open(GPADL, 1, 0), "guest → host ring without data page"),
        (open(GPADL, 9, 0), "host → guest ring without data page"),
        (open(GPADL, 10, 0), "no host → guest ring"),
        (open(GPADL, u32::MAX, 0), "offset beyond the GPADL"),
        (open(GPADL, 5, VCPUS), "target VP"),
        (open(GPADL, 5, u32::MAX), "target VP"),
    ];
    for (message, why) in cases {
        let mut server = offered_server();
        server.handle_message(&gpadl_header(RELID, GPADL, 10));
        // Incomplete: the header announces more than it carries.
        let ChannelMessage::GpadlHeader(mut incomplete) = gpadl_header(RELID, GPADL + 1, 40) else {
            unreachable!()
        };
        incomplete.range_data.truncate(8 + 8 * 26);
        server.handle_message(&ChannelMessage::GpadlHeader(incomplete));
        // A complete GPADL of another channel cannot be had: its header is
        // refused. Forge one through the table to check the open's own test.
        let ChannelMessage::GpadlHeader(mut foreign) = gpadl_header(RELID, GPADL + 2, 10) else {
            unreachable!()
        };
        foreign.child_relid = 9;
        server.gpadls.on_header(&foreign).unwrap();
        let ChannelMessage::GpadlHeader(mut unaligned) = gpadl_header(RELID, GPADL + 3, 10) else {
            unreachable!()
        };
        // byte_offset 8, still 10 pages.
        unaligned.range_data[..4].copy_from_slice(&(10 * 4096 - 8u32).to_le_bytes());
        unaligned.range_data[4] = 8;
        server.handle_message(&ChannelMessage::GpadlHeader(unaligned));

        let out = server.handle_message(&message);
        let ChannelMessage::OpenChannel(request) = message else {
            unreachable!()
        };
        assert!(out.actions.is_empty(), "{why}");
        assert_eq!(
            only_message(&out),
            HostMessage::OpenResult {
                child_relid: request.child_relid,
                open_id: request.open_id,
                status: STATUS_FAILURE
            },
            "{why}"
        );
        assert_eq!(server.channel_state(), ChannelState::Closed, "{why}");
    }
}

#[test]
fn second_open_and_failed_ring_setup() {
    let mut server = open_server();
    let out = server.handle_message(&open(GPADL, 5, 0));
    assert_eq!(only_message(&out), open_result(STATUS_FAILURE));
    assert_eq!(
        server.channel_state(),
        ChannelState::Open { gpadl_id: GPADL }
    );

    let mut server = offered_server();
    server.handle_message(&gpadl_header(RELID, GPADL, 10));
    server.handle_message(&open(GPADL, 5, 0));
    assert_eq!(
        server.channel_state(),
        ChannelState::Opening {
            open_id: RELID,
            gpadl_id: GPADL
        }
    );
    let out = server.complete_open(false);
    assert_eq!(only_message(&out), open_result(STATUS_FAILURE));
    assert_eq!(server.channel_state(), ChannelState::Closed);
    // Stray completions are ignored; the guest may try again.
    assert_eq!(server.complete_open(true), ServerOutput::default());
    assert!(!server.handle_message(&open(GPADL, 5, 0)).actions.is_empty());
}

#[test]
fn close_and_teardown_edge_cases() {
    let mut server = open_server();
    // Close of another relid: ignored, channel stays open.
    let out = server.handle_message(&ChannelMessage::CloseChannel { child_relid: 2 });
    assert_eq!(out, ServerOutput::default());
    // Teardown of an unknown GPADL: answered anyway.
    let out = server.handle_message(&ChannelMessage::GpadlTeardown {
        child_relid: RELID,
        gpadl_id: 5,
    });
    assert_eq!(
        only_message(&out),
        HostMessage::GpadlTorndown { gpadl_id: 5 }
    );
    assert!(out.actions.is_empty());
    // Teardown of the open channel's rings: the channel goes.
    let out = server.handle_message(&ChannelMessage::GpadlTeardown {
        child_relid: RELID,
        gpadl_id: GPADL,
    });
    assert_eq!(
        out.actions,
        vec![ServerAction::CloseChannel { child_relid: RELID }]
    );
    assert_eq!(
        only_message(&out),
        HostMessage::GpadlTorndown { gpadl_id: GPADL }
    );
    assert_eq!(server.channel_state(), ChannelState::Closed);
    // A second close finds nothing open.
    let out = server.handle_message(&ChannelMessage::CloseChannel { child_relid: RELID });
    assert_eq!(out, ServerOutput::default());
}

#[test]
fn unload_contact_and_reset_start_over() {
    // UNLOAD: close, reset, answer (actions before the message).
    let mut server = open_server();
    let out = server.handle_message(&ChannelMessage::Unload);
    assert_eq!(
        out.actions,
        vec![
            ServerAction::CloseChannel { child_relid: RELID },
            ServerAction::ConnectionReset
        ]
    );
    assert_eq!(only_message(&out), HostMessage::UnloadResponse);
    assert!(!server.is_connected());
    // The old GPADL is gone after reconnecting.
    server.handle_message(&contact(VERSION_WIN10, 0));
    server.handle_message(&ChannelMessage::RequestOffers);
    let out = server.handle_message(&open(GPADL, 5, 0));
    assert_eq!(only_message(&out), open_result(STATUS_FAILURE));

    // INITIATE_CONTACT while open (kdump kernel, re-loaded hv_vmbus).
    let mut server = open_server();
    let out = server.handle_message(&contact(VERSION_WIN10, 1));
    assert_eq!(
        out.actions,
        vec![
            ServerAction::CloseChannel { child_relid: RELID },
            ServerAction::ConnectionReset
        ]
    );
    assert_eq!(out.messages[0].target_vp, 1);
    assert!(server.is_connected());

    // A refused version also drops the old connection.
    let mut server = open_server();
    let out = server.handle_message(&contact(VERSION_WIN10_V4_1, 0));
    assert_eq!(out.actions.len(), 2);
    assert!(!server.is_connected());

    // VM reset: no messages, everything closed.
    let mut server = open_server();
    let out = server.reset();
    assert!(out.messages.is_empty());
    assert_eq!(
        out.actions,
        vec![
            ServerAction::CloseChannel { child_relid: RELID },
            ServerAction::ConnectionReset
        ]
    );
    assert!(!server.is_connected());
    assert_eq!(server.reset(), ServerOutput::default(), "idempotent");
    // UNLOAD while disconnected is still answered.
    let out = server.handle_message(&ChannelMessage::Unload);
    assert_eq!(only_message(&out), HostMessage::UnloadResponse);
    assert!(out.actions.is_empty());
}

#[test]
fn malformed_and_unknown_messages_are_counted() {
    let mut server = offered_server();
    let before = server.stats();
    assert_eq!(server.handle_payload(&[1, 2, 3]), ServerOutput::default());
    assert_eq!(
        server.handle_payload(&message_type::OPEN_CHANNEL.to_le_bytes().repeat(3)),
        ServerOutput::default()
    );
    let mut relid_released = message_type::RELID_RELEASED.to_le_bytes().to_vec();
    relid_released.resize(12, 0);
    assert_eq!(
        server.handle_payload(&relid_released),
        ServerOutput::default()
    );
    let mut modify = message_type::MODIFY_CHANNEL.to_le_bytes().to_vec();
    modify.resize(16, 0);
    assert_eq!(server.handle_payload(&modify), ServerOutput::default());
    let after = server.stats();
    assert_eq!(after.malformed - before.malformed, 2);
    assert_eq!(after.ignored - before.ignored, 2);
    assert_eq!(after.messages - before.messages, 4);
    // And the server still works.
    let out = server.handle_message(&gpadl_header(RELID, GPADL, 10));
    assert_eq!(only_message(&out), created(GPADL, 0));
}

#[test]
fn random_message_streams_never_panic_and_replies_fit() {
    let mut state = 0x0bad_5eed_1234_5678u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut server = server();
    for round in 0..30_000 {
        let len = (next() % 64 + 8) as usize;
        let mut bytes: Vec<u8> = (0..len.min(MAX_MESSAGE_SIZE))
            .map(|_| next() as u8)
            .collect();
        // Mostly known types with small ids, so the state machine moves.
        bytes[..4].copy_from_slice(&((next() % 18) as u32).to_le_bytes());
        for at in (8..bytes.len().min(28).saturating_sub(3)).step_by(4) {
            if next() % 2 == 0 {
                let small = [0u32, 1, 5, GPADL, VERSION_WIN10][(next() % 5) as usize];
                bytes[at..at + 4].copy_from_slice(&small.to_le_bytes());
            }
        }
        let mut out = server.handle_payload(&bytes);
        if out
            .actions
            .iter()
            .any(|action| matches!(action, ServerAction::OpenChannel(_)))
        {
            out = server.complete_open(round % 2 == 0);
        }
        for message in out.messages {
            assert!(message.message.encode().len() <= MAX_MESSAGE_SIZE);
            assert!(message.target_vp < VCPUS);
        }
    }
    assert!(server.stats().messages >= 30_000);
}

#[test]
fn configuration_is_checked() {
    let with = |child_relid, connection_id| ChannelOffer {
        child_relid,
        connection_id,
        ..offer()
    };
    assert_eq!(
        VmbusServer::new(with(0, 0x11), 1).unwrap_err(),
        ServerConfigError::BadRelid(0)
    );
    assert_eq!(
        VmbusServer::new(with(2048, 0x11), 1).unwrap_err(),
        ServerConfigError::BadRelid(2048)
    );
    for connection_id in [0, 1, 4, 0x0100_0000] {
        assert_eq!(
            VmbusServer::new(with(1, connection_id), 1).unwrap_err(),
            ServerConfigError::BadConnectionId(connection_id)
        );
    }
    assert_eq!(
        VmbusServer::new(offer(), 0).unwrap_err(),
        ServerConfigError::NoVcpus
    );
    let server = VmbusServer::new(with(2047, 0xff_ffff), 1).unwrap();
    assert_eq!(server.offer().child_relid, 2047);
}
