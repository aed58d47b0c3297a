//! The `HvPostMessage` hypercall input, as far as VMBus needs it.
//!
//! Linux posts channel-management messages with a slow `HvPostMessage`
//! (call code 0x5c) from a page-aligned input block. KVM leaves the call to
//! userspace; the VMM reads the 256-byte block at the input GPA, checks it
//! with [`parse_post_message`], queues the payload for
//! [`super::server::VmbusServer::handle_payload`] and returns the status in
//! RAX without waiting for the message to be handled.

use super::message::{
    read_u32, CONNECTION_ID_MASK, HV_MESSAGE_TYPE_VMBUS, MAX_MESSAGE_SIZE, MESSAGE_CONNECTION_ID,
    MESSAGE_HEADER_SIZE,
};

/// `HvPostMessage` call code.
pub const HVCALL_POST_MESSAGE: u16 = 0x005c;
/// `HvSignalEvent` call code.
pub const HVCALL_SIGNAL_EVENT: u16 = 0x005d;

/// Status codes of Hyper-V hypercalls (bits 0-15 of RAX on return).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum HvStatus {
    /// Accepted.
    Success = 0,
    /// Unknown call code.
    InvalidHypercallCode = 2,
    /// Malformed input.
    InvalidHypercallInput = 3,
    /// Misaligned input.
    InvalidAlignment = 4,
    /// Input block not readable.
    InsufficientMemory = 11,
    /// Nobody listens on this connection id. For INITIATE_CONTACT Linux gives
    /// up on that version at once; for other messages it retries.
    InvalidConnectionId = 18,
    /// The host's message queue is full; the guest retries.
    InsufficientBuffers = 19,
}

impl HvStatus {
    /// The 16-bit status code.
    pub fn code(self) -> u16 {
        self as u16
    }
}

/// Size of the `HvPostMessage` input block.
pub const POST_MESSAGE_INPUT_SIZE: usize = 256;

/// The decoded input block of an `HvPostMessage` hypercall.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostMessageInput<'a> {
    /// Connection id, low 24 bits.
    pub connection_id: u32,
    /// The VMBus message, `payload_size` bytes long.
    pub payload: &'a [u8],
}

/// Checks the input block of `HvPostMessage` (`u32 connection_id`,
/// `u32 reserved`, `u32 message_type`, `u32 payload_size`, 240 payload
/// bytes) and returns the payload to queue, or the hypercall status to
/// fail with. Only connection id 1 is served: a post to any other id, like
/// the VMBus 5.x INITIATE_CONTACT on id 4, fails with
/// [`HvStatus::InvalidConnectionId`], which Linux takes as "try an older
/// version". A full message queue ([`HvStatus::InsufficientBuffers`]) is
/// the caller's to report.
pub fn parse_post_message(input: &[u8]) -> Result<PostMessageInput<'_>, HvStatus> {
    let bad_input = HvStatus::InvalidHypercallInput;
    let connection_id = read_u32(input, 0).ok_or(bad_input)? & CONNECTION_ID_MASK;
    let message_type = read_u32(input, 8).ok_or(bad_input)?;
    let payload_size =
        usize::try_from(read_u32(input, 12).ok_or(bad_input)?).map_err(|_| bad_input)?;
    if !(MESSAGE_HEADER_SIZE..=MAX_MESSAGE_SIZE).contains(&payload_size) {
        return Err(bad_input);
    }
    let payload = input.get(16..16 + payload_size).ok_or(bad_input)?;
    if connection_id != MESSAGE_CONNECTION_ID {
        return Err(HvStatus::InvalidConnectionId);
    }
    if message_type != HV_MESSAGE_TYPE_VMBUS {
        return Err(bad_input);
    }
    Ok(PostMessageInput {
        connection_id,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hyperv::vmbus::message::message_type;

    fn le32(value: u32) -> [u8; 4] {
        value.to_le_bytes()
    }

    fn post_input(connection_id: u32, message_type: u32, payload_size: u32) -> Vec<u8> {
        let mut input = vec![0u8; POST_MESSAGE_INPUT_SIZE];
        input[..4].copy_from_slice(&le32(connection_id));
        input[8..12].copy_from_slice(&le32(message_type));
        input[12..16].copy_from_slice(&le32(payload_size));
        input[16..20].copy_from_slice(&le32(message_type::INITIATE_CONTACT));
        input
    }

    #[test]
    fn random_input_never_panics() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..300usize {
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    state ^= state << 13;
                    state ^= state >> 7;
                    state ^= state << 17;
                    state.to_le_bytes()[0]
                })
                .collect();
            let _ = parse_post_message(&bytes);
        }
    }

    #[test]
    fn post_message_input_checks() {
        let input = post_input(1, 1, 40);
        let parsed = parse_post_message(&input).unwrap();
        assert_eq!(parsed.connection_id, 1);
        assert_eq!(parsed.payload.len(), 40);
        assert_eq!(parsed.payload[..4], le32(message_type::INITIATE_CONTACT));
        // Bits above 24 are not part of the id.
        assert!(parse_post_message(&post_input(0x0500_0001, 1, 40)).is_ok());

        // Linux's VMBus 5.x INITIATE_CONTACT on connection id 4.
        assert_eq!(
            parse_post_message(&post_input(4, 1, 40)),
            Err(HvStatus::InvalidConnectionId)
        );
        assert_eq!(HvStatus::InvalidConnectionId.code(), 18);
        assert_eq!(
            parse_post_message(&post_input(1, 2, 40)),
            Err(HvStatus::InvalidHypercallInput)
        );
        for size in [0, 7, 241, u32::MAX] {
            assert_eq!(
                parse_post_message(&post_input(1, 1, size)),
                Err(HvStatus::InvalidHypercallInput)
            );
        }
        assert_eq!(
            parse_post_message(&input[..15]),
            Err(HvStatus::InvalidHypercallInput)
        );
        // A payload_size that runs past a short input block.
        assert_eq!(
            parse_post_message(&input[..50]),
            Err(HvStatus::InvalidHypercallInput)
        );
    }
}
