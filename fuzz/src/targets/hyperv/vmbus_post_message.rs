//! Target `vmbus_post_message`: `vmbus::hypercall::parse_post_message`, the
//! check of the `HvPostMessage` input block (then its payload goes through
//! `parse_guest_message`, as the VMM does).
//!
//! Invariants checked:
//! - no panic;
//! - an accepted block is for connection 1, of VMBus message type, and
//!   its payload is `payload_size` (8 to 240) bytes taken from offset 16;
//! - a block refused for its connection id is otherwise well formed.

use devices::hyperv::vmbus::hypercall::{parse_post_message, HvStatus};
use devices::hyperv::vmbus::message::{
    parse_guest_message, HV_MESSAGE_TYPE_VMBUS, MAX_MESSAGE_SIZE, MESSAGE_CONNECTION_ID,
    MESSAGE_HEADER_SIZE,
};

use super::initiate_contact;

fn u32_at(data: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(data[at..at + 4].try_into().expect("4 bytes"))
}

/// Runs one input.
pub fn run(data: &[u8]) {
    match parse_post_message(data) {
        Ok(input) => {
            assert_eq!(input.connection_id, MESSAGE_CONNECTION_ID);
            assert_eq!(u32_at(data, 8), HV_MESSAGE_TYPE_VMBUS);
            let size = u32_at(data, 12) as usize;
            assert!((MESSAGE_HEADER_SIZE..=MAX_MESSAGE_SIZE).contains(&size));
            assert_eq!(input.payload, &data[16..16 + size]);
            let _ = parse_guest_message(input.payload);
        }
        Err(HvStatus::InvalidConnectionId) => {
            let size = u32_at(data, 12) as usize;
            assert!(data.len() >= 16 + size && size >= MESSAGE_HEADER_SIZE);
            assert_ne!(u32_at(data, 0) & 0x00ff_ffff, MESSAGE_CONNECTION_ID);
        }
        Err(status) => assert_eq!(status, HvStatus::InvalidHypercallInput),
    }
}

fn block(connection_id: u32, message_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = vec![0u8; 256];
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
