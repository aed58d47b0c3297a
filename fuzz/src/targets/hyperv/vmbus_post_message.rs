//! Target `vmbus_post_message`: `arch::hyperv::parse_post_message`, the
//! check of the 256-byte `HvPostMessage` input block the VMM reads from
//! guest memory (then its payload goes through `parse_guest_message`, as
//! the VMBus host does).
//!
//! Invariants checked:
//! - no panic;
//! - an accepted block has a message type that is non-zero without bit 31,
//!   and its payload is exactly `payload_size` (at most 240) bytes taken
//!   from offset 16;
//! - a refused block is refused as malformed input, for one of those
//!   reasons.

use arch::hyperv::{parse_post_message, HvStatus, MESSAGE_PAYLOAD_MAX, POST_MESSAGE_INPUT_SIZE};
use devices::hyperv::vmbus::message::parse_guest_message;

use super::initiate_contact;

fn u32_at(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"))
}

/// Runs one input (the first 256 bytes, zero-padded: the VMM always reads
/// a whole block).
pub fn run(data: &[u8]) {
    let mut block = [0u8; POST_MESSAGE_INPUT_SIZE];
    let n = data.len().min(block.len());
    block[..n].copy_from_slice(&data[..n]);
    let message_type = u32_at(&block, 8);
    let size = u32_at(&block, 12) as usize;
    match parse_post_message(&block) {
        Ok(m) => {
            assert_eq!(m.connection_id, u32_at(&block, 0) & 0x00ff_ffff);
            assert_eq!(m.message.message_type(), message_type);
            assert!(message_type != 0 && message_type & (1 << 31) == 0);
            assert!(size <= MESSAGE_PAYLOAD_MAX);
            assert_eq!(m.message.payload(), &block[16..16 + size]);
            let _ = parse_guest_message(m.message.payload());
        }
        Err(status) => {
            assert_eq!(status, HvStatus::InvalidHypercallInput);
            assert!(
                size > MESSAGE_PAYLOAD_MAX || message_type == 0 || message_type & (1 << 31) != 0
            );
        }
    }
}

fn block(connection_id: u32, message_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; POST_MESSAGE_INPUT_SIZE];
    b[0..4].copy_from_slice(&connection_id.to_le_bytes());
    b[8..12].copy_from_slice(&message_type.to_le_bytes());
    b[12..16].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    b[16..16 + payload.len()].copy_from_slice(payload);
    b
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    vec![
        block(1, 1, &initiate_contact(0x0004_0000)),
        block(4, 1, &initiate_contact(0x0005_0003)),
        block(1, 2, &initiate_contact(0x0004_0000)),
    ]
}
