//! Target `dm_message`: Dynamic Memory message decoding
//! (`dm::parse_guest_message`, and `dm::parse_host_message` used by guest
//! models), with the encoders as the reference.
//!
//! Invariants checked:
//! - no panic, allocation bounded by the input;
//! - a decoded message re-encodes (with its transaction id) to bytes that
//!   decode to the same message, for both directions;
//! - a decoded header's size is at least 8 and at most the input length;
//! - wire ranges round-trip through `decode_range` / `encode_range`.

use devices::hyperv::dm::message::{decode_range, encode_range};
use devices::hyperv::dm::{
    parse_guest_message, parse_header, parse_host_message, DmVersion, GuestCapabilities,
    GuestDmMessage, PageRange,
};

use crate::input::Seed;

/// Runs one input.
pub fn run(data: &[u8]) {
    let header = parse_header(data);
    if let Ok(msg) = parse_guest_message(data) {
        let h = header.clone().expect("a message has a header");
        assert!(usize::from(h.size) >= 8 && usize::from(h.size) <= data.len());
        if let Ok(bytes) = msg.encode(h.trans_id) {
            assert_eq!(
                parse_guest_message(&bytes).as_ref(),
                Ok(&msg),
                "guest round trip"
            );
        }
    }
    if let Ok(msg) = parse_host_message(data) {
        let h = header.expect("a message has a header");
        if let Ok(bytes) = msg.encode(h.trans_id) {
            assert_eq!(
                parse_host_message(&bytes).as_ref(),
                Ok(&msg),
                "host round trip"
            );
        }
    }
    for chunk in data.chunks_exact(8) {
        let raw = u64::from_le_bytes(chunk.try_into().expect("8 bytes"));
        let r = decode_range(raw);
        assert_eq!(encode_range(r), Ok(raw), "range {r:?}");
    }
}

/// Seed inputs: each guest message as Linux's hv_balloon sends it.
pub fn seeds() -> Vec<Vec<u8>> {
    let msgs = [
        GuestDmMessage::VersionRequest {
            version: DmVersion::V2_0,
            is_last_attempt: false,
        },
        GuestDmMessage::CapabilitiesReport {
            caps: GuestCapabilities {
                balloon: true,
                hot_add: true,
                hot_add_alignment: 7,
            },
            min_page_count: 0,
            max_page_number: u64::MAX,
        },
        GuestDmMessage::BalloonResponse {
            more_pages: true,
            ranges: vec![PageRange::new(0x1000, 512), PageRange::new(0x4_0000, 1)],
        },
        GuestDmMessage::UnballoonResponse,
        GuestDmMessage::HotAddResponse {
            page_count: 32768,
            result: 1,
        },
    ];
    let mut out: Vec<Vec<u8>> = msgs
        .iter()
        .map(|m| m.encode(5).expect("encodable seed"))
        .collect();
    out.push(Seed::new().u16(5).u16(48).u32(1).bytes(&[7; 40]).finish());
    out
}
