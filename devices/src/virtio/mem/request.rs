//! Guest requests of the virtio-mem queue and the device's responses.
//!
//! A request chain carries a 24-byte `virtio_mem_req` in its device-readable
//! part and room for a 10-byte `virtio_mem_resp` in its device-writable part.
//! Framing is not assumed: both may be split over several descriptors.
//!
//! Everything the driver supplies is untrusted. [`parse_request`] and
//! [`MemResponse::to_bytes`] are pure functions over byte slices (fuzzing
//! entry points); [`parse_chain`] adds the descriptor handling.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::GuestMemoryMmap;

/// `VIRTIO_MEM_REQ_PLUG`: plug consecutive blocks.
pub const VIRTIO_MEM_REQ_PLUG: u16 = 0;
/// `VIRTIO_MEM_REQ_UNPLUG`: unplug consecutive blocks.
pub const VIRTIO_MEM_REQ_UNPLUG: u16 = 1;
/// `VIRTIO_MEM_REQ_UNPLUG_ALL`: unplug every block.
pub const VIRTIO_MEM_REQ_UNPLUG_ALL: u16 = 2;
/// `VIRTIO_MEM_REQ_STATE`: query the state of consecutive blocks.
pub const VIRTIO_MEM_REQ_STATE: u16 = 3;

/// Size of `struct virtio_mem_req`.
pub const REQUEST_SIZE: usize = 24;
/// Size of `struct virtio_mem_resp`.
pub const RESPONSE_SIZE: usize = 10;

/// A request of the driver, decoded but not yet validated against the
/// device geometry (addresses and counts are whatever the driver sent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemRequest {
    /// Plug `nb_blocks` blocks starting at guest physical address `addr`.
    Plug {
        /// Guest physical address of the first block.
        addr: u64,
        /// Number of consecutive blocks.
        nb_blocks: u16,
    },
    /// Unplug `nb_blocks` blocks starting at guest physical address `addr`.
    Unplug {
        /// Guest physical address of the first block.
        addr: u64,
        /// Number of consecutive blocks.
        nb_blocks: u16,
    },
    /// Unplug every plugged block of the device.
    UnplugAll,
    /// Report whether `nb_blocks` blocks at `addr` are plugged.
    State {
        /// Guest physical address of the first block.
        addr: u64,
        /// Number of consecutive blocks.
        nb_blocks: u16,
    },
}

/// Why the request bytes of a chain could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The device-readable part holds fewer than 24 bytes.
    #[error("request is {0} bytes long, expected {REQUEST_SIZE}")]
    TooShort(usize),
    /// The request type is none the device knows.
    #[error("unknown request type {0}")]
    UnknownType(u16),
}

fn le16(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// Decodes a `virtio_mem_req`. Only the first 24 bytes are looked at;
/// padding is ignored as the spec requires.
pub fn parse_request(bytes: &[u8]) -> Result<MemRequest, RequestError> {
    let bytes = bytes
        .get(..REQUEST_SIZE)
        .ok_or(RequestError::TooShort(bytes.len()))?;
    let req_type = le16(bytes, 0);
    let mut addr = [0u8; 8];
    addr.copy_from_slice(&bytes[8..16]);
    let addr = u64::from_le_bytes(addr);
    let nb_blocks = le16(bytes, 16);
    match req_type {
        VIRTIO_MEM_REQ_PLUG => Ok(MemRequest::Plug { addr, nb_blocks }),
        VIRTIO_MEM_REQ_UNPLUG => Ok(MemRequest::Unplug { addr, nb_blocks }),
        VIRTIO_MEM_REQ_UNPLUG_ALL => Ok(MemRequest::UnplugAll),
        VIRTIO_MEM_REQ_STATE => Ok(MemRequest::State { addr, nb_blocks }),
        other => Err(RequestError::UnknownType(other)),
    }
}

/// The response type of a `virtio_mem_resp`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum ResponseType {
    /// `VIRTIO_MEM_RESP_ACK`: request processed.
    Ack = 0,
    /// `VIRTIO_MEM_RESP_NACK`: request denied (plugging beyond requested_size).
    Nack = 1,
    /// `VIRTIO_MEM_RESP_BUSY`: cannot be processed now, retry later.
    Busy = 2,
    /// `VIRTIO_MEM_RESP_ERROR`: invalid request.
    Error = 3,
}

/// The state reported by a STATE request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum BlockState {
    /// `VIRTIO_MEM_STATE_PLUGGED`: every block is plugged.
    Plugged = 0,
    /// `VIRTIO_MEM_STATE_UNPLUGGED`: every block is unplugged.
    Unplugged = 1,
    /// `VIRTIO_MEM_STATE_MIXED`: some blocks are plugged, some not.
    Mixed = 2,
}

/// A response to one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemResponse {
    /// The response type.
    pub resp_type: ResponseType,
    /// The block state; only for an acknowledged STATE request.
    pub state: Option<BlockState>,
}

impl MemResponse {
    /// A response without request-specific data.
    pub const fn new(resp_type: ResponseType) -> Self {
        Self {
            resp_type,
            state: None,
        }
    }

    /// The acknowledged answer to a STATE request.
    pub const fn state(state: BlockState) -> Self {
        Self {
            resp_type: ResponseType::Ack,
            state: Some(state),
        }
    }

    /// The `virtio_mem_resp` bytes (little endian, padding zero).
    pub fn to_bytes(&self) -> [u8; RESPONSE_SIZE] {
        let mut out = [0u8; RESPONSE_SIZE];
        out[0..2].copy_from_slice(&(self.resp_type as u16).to_le_bytes());
        if let Some(state) = self.state {
            out[8..10].copy_from_slice(&(state as u16).to_le_bytes());
        }
        out
    }
}

/// Why a chain cannot be answered at all (it is returned with 0 bytes used).
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// A descriptor points outside guest memory or the lengths overflow.
    #[error("invalid descriptors: {0}")]
    Descriptors(virtio_queue::Error),
    /// The device-writable part cannot hold a response.
    #[error("response buffer is {0} bytes, expected at least {RESPONSE_SIZE}")]
    ResponseTooSmall(usize),
}

/// A chain whose response buffer is usable.
pub struct ParsedChain<'a> {
    /// The decoded request, or why it could not be decoded (answer ERROR).
    pub request: Result<MemRequest, RequestError>,
    /// The device-writable part of the chain, at least 10 bytes long.
    pub response: Writer<'a>,
}

/// Splits a request chain into its decoded request and response buffer.
///
/// Fails only when no response can be written; a chain with a short or
/// unknown request but a usable response buffer is returned with the
/// request error, so that the device can answer ERROR.
pub fn parse_chain<'a, M>(
    mem: &'a GuestMemoryMmap,
    chain: DescriptorChain<M>,
) -> Result<ParsedChain<'a>, ChainError>
where
    M: Clone + std::ops::Deref<Target = GuestMemoryMmap>,
{
    let response = Writer::new(mem, chain.clone()).map_err(ChainError::Descriptors)?;
    if response.available_bytes() < RESPONSE_SIZE {
        return Err(ChainError::ResponseTooSmall(response.available_bytes()));
    }
    let request = match Reader::new(mem, chain) {
        Ok(mut reader) => {
            let mut buf = [0u8; REQUEST_SIZE];
            let len = reader.available_bytes().min(REQUEST_SIZE);
            match reader.read_exact(&mut buf[..len]) {
                Ok(()) => parse_request(&buf[..len]),
                Err(_) => Err(RequestError::TooShort(0)),
            }
        }
        // Readable descriptors outside guest memory: nothing to read, but
        // the response buffer is fine.
        Err(_) => Err(RequestError::TooShort(0)),
    };
    Ok(ParsedChain { request, response })
}

/// Writes `resp` into the response buffer; returns the used length.
pub fn write_response(writer: &mut Writer<'_>, resp: &MemResponse) -> std::io::Result<u32> {
    writer.write_all(&resp.to_bytes())?;
    // RESPONSE_SIZE is a small constant.
    Ok(u32::try_from(RESPONSE_SIZE).unwrap_or(u32::MAX))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    /// Encodes a request the way a driver would (padding filled with junk
    /// to check it is ignored).
    pub(crate) fn req_bytes(req_type: u16, addr: u64, nb_blocks: u16) -> [u8; REQUEST_SIZE] {
        let mut b = [0xa5u8; REQUEST_SIZE];
        b[0..2].copy_from_slice(&req_type.to_le_bytes());
        b[8..16].copy_from_slice(&addr.to_le_bytes());
        b[16..18].copy_from_slice(&nb_blocks.to_le_bytes());
        b
    }

    pub(crate) fn desc(addr: u64, len: u32, writable: bool) -> RawDescriptor {
        let flags = if writable {
            u16::try_from(VRING_DESC_F_WRITE).unwrap()
        } else {
            0
        };
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
    }

    #[test]
    fn parses_every_request_type_and_ignores_padding() {
        let b = req_bytes(VIRTIO_MEM_REQ_PLUG, 0x1_0020_0000, 7);
        assert_eq!(
            parse_request(&b),
            Ok(MemRequest::Plug {
                addr: 0x1_0020_0000,
                nb_blocks: 7
            })
        );
        let b = req_bytes(VIRTIO_MEM_REQ_UNPLUG, 0x4000, 1);
        assert_eq!(
            parse_request(&b),
            Ok(MemRequest::Unplug {
                addr: 0x4000,
                nb_blocks: 1
            })
        );
        let b = req_bytes(VIRTIO_MEM_REQ_UNPLUG_ALL, u64::MAX, u16::MAX);
        assert_eq!(parse_request(&b), Ok(MemRequest::UnplugAll));
        let b = req_bytes(VIRTIO_MEM_REQ_STATE, 0, 0);
        assert_eq!(
            parse_request(&b),
            Ok(MemRequest::State {
                addr: 0,
                nb_blocks: 0
            })
        );
        let b = req_bytes(4, 0, 0);
        assert_eq!(parse_request(&b), Err(RequestError::UnknownType(4)));
        // Longer buffers are fine, shorter are not.
        let mut long = [0u8; 64];
        long[..REQUEST_SIZE].copy_from_slice(&req_bytes(VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0));
        assert_eq!(parse_request(&long), Ok(MemRequest::UnplugAll));
        assert_eq!(parse_request(&b[..23]), Err(RequestError::TooShort(23)));
        assert_eq!(parse_request(&[]), Err(RequestError::TooShort(0)));
    }

    #[test]
    fn response_layout() {
        assert_eq!(
            MemResponse::new(ResponseType::Error).to_bytes(),
            [3, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
        assert_eq!(
            MemResponse::state(BlockState::Mixed).to_bytes(),
            [0, 0, 0, 0, 0, 0, 0, 0, 2, 0]
        );
        assert_eq!(
            MemResponse::new(ResponseType::Nack).to_bytes(),
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    #[test]
    fn chain_with_split_request_and_response() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);
        let b = req_bytes(VIRTIO_MEM_REQ_STATE, 0x8000, 3);
        m.write_slice(&b[..10], GuestAddress(0x10_0000)).unwrap();
        m.write_slice(&b[10..], GuestAddress(0x11_0000)).unwrap();
        let chain = vq
            .build_desc_chain(&[
                desc(0x10_0000, 10, false),
                desc(0x11_0000, 14, false),
                desc(0x12_0000, 4, true),
                desc(0x13_0000, 6, true),
            ])
            .unwrap();
        let mut parsed = parse_chain(&m, chain).unwrap();
        assert_eq!(
            parsed.request,
            Ok(MemRequest::State {
                addr: 0x8000,
                nb_blocks: 3
            })
        );
        let used = write_response(
            &mut parsed.response,
            &MemResponse::state(BlockState::Unplugged),
        )
        .unwrap();
        assert_eq!(used, 10);
        let mut out = [0u8; 10];
        m.read_slice(&mut out[..4], GuestAddress(0x12_0000))
            .unwrap();
        m.read_slice(&mut out[4..], GuestAddress(0x13_0000))
            .unwrap();
        assert_eq!(out, [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    }

    #[test]
    fn malformed_chains() {
        let m = mem();
        let vq = MockSplitQueue::new(&m, 16);

        // Short request, usable response: answerable with ERROR.
        let chain = vq
            .build_desc_chain(&[desc(0x10_0000, 16, false), desc(0x11_0000, 10, true)])
            .unwrap();
        let parsed = parse_chain(&m, chain).unwrap();
        assert_eq!(parsed.request, Err(RequestError::TooShort(16)));

        // Request outside guest memory, usable response: ERROR too.
        let chain = vq
            .build_desc_chain(&[desc(0x4000_0000, 24, false), desc(0x11_0000, 10, true)])
            .unwrap();
        let parsed = parse_chain(&m, chain).unwrap();
        assert!(parsed.request.is_err());

        // Response too small.
        let chain = vq
            .build_desc_chain(&[desc(0x10_0000, 24, false), desc(0x11_0000, 9, true)])
            .unwrap();
        assert!(matches!(
            parse_chain(&m, chain),
            Err(ChainError::ResponseTooSmall(9))
        ));

        // No writable descriptor at all.
        let chain = vq.build_desc_chain(&[desc(0x10_0000, 24, false)]).unwrap();
        assert!(matches!(
            parse_chain(&m, chain),
            Err(ChainError::ResponseTooSmall(0))
        ));

        // Response outside guest memory, or straddling its end.
        let chain = vq
            .build_desc_chain(&[desc(0x10_0000, 24, false), desc(0x4000_0000, 10, true)])
            .unwrap();
        assert!(matches!(
            parse_chain(&m, chain),
            Err(ChainError::Descriptors(_))
        ));
        let chain = vq
            .build_desc_chain(&[desc(0x10_0000, 24, false), desc(0x1f_fffc, 10, true)])
            .unwrap();
        assert!(matches!(
            parse_chain(&m, chain),
            Err(ChainError::Descriptors(_))
        ));

        // Huge lengths.
        let chain = vq
            .build_desc_chain(&[
                desc(0x10_0000, u32::MAX, false),
                desc(0x11_0000, u32::MAX, true),
            ])
            .unwrap();
        assert!(parse_chain(&m, chain).is_err());
    }
}
