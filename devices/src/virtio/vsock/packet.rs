//! vsock packets: the 44-byte `virtio_vsock_hdr` and what the device makes
//! of the bytes the driver puts on the TX queue (virtio 1.2, 5.10.6).
//!
//! Everything here is a pure function over guest-supplied bytes: the header
//! fields (CIDs, ports, length, type, op, flags, credit) are untrusted, and
//! [`parse_tx_packet`] checks them before anything acts on them.

/// Size of `struct virtio_vsock_hdr`.
pub const HEADER_SIZE: usize = 44;
/// The largest payload the device accepts in one TX packet or puts in one
/// RX packet (the Linux driver's `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// The host's CID (`VMADDR_CID_HOST`).
pub const HOST_CID: u64 = 2;

/// `VIRTIO_VSOCK_TYPE_STREAM`, the only socket type the device offers.
pub const TYPE_STREAM: u16 = 1;

/// Shutdown flag: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`: the event-queue event telling the
/// driver that every connection is gone.
pub const EVENT_TRANSPORT_RESET: u32 = 0;
/// Size of `struct virtio_vsock_event`.
pub const EVENT_SIZE: usize = 4;

/// The operation of a packet (`op` field).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// Connection request.
    Request,
    /// Connection accepted.
    Response,
    /// Connection reset (refused, or torn down).
    Rst,
    /// The sender stops receiving and/or sending (see the flags).
    Shutdown,
    /// Stream data.
    Rw,
    /// The sender's credit (buf_alloc, fwd_cnt) changed.
    CreditUpdate,
    /// The sender asks for a credit update.
    CreditRequest,
}

impl Op {
    /// The op for a wire value, `None` for values the spec does not define.
    pub fn from_wire(value: u16) -> Option<Op> {
        Some(match value {
            1 => Op::Request,
            2 => Op::Response,
            3 => Op::Rst,
            4 => Op::Shutdown,
            5 => Op::Rw,
            6 => Op::CreditUpdate,
            7 => Op::CreditRequest,
            _ => return None,
        })
    }

    /// The wire value of the op.
    pub fn to_wire(self) -> u16 {
        match self {
            Op::Request => 1,
            Op::Response => 2,
            Op::Rst => 3,
            Op::Shutdown => 4,
            Op::Rw => 5,
            Op::CreditUpdate => 6,
            Op::CreditRequest => 7,
        }
    }
}

/// A `virtio_vsock_hdr`, field by field (all little-endian on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PacketHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length in bytes.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation (raw; see [`Op::from_wire`]).
    pub op: u16,
    /// Op-specific flags (shutdown flags).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, wrapping.
    pub fwd_cnt: u32,
}

fn le_u16(b: &[u8; HEADER_SIZE], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le_u32(b: &[u8; HEADER_SIZE], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8; HEADER_SIZE], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

impl PacketHeader {
    /// Decodes a header (every bit pattern decodes; nothing is checked).
    pub fn from_bytes(b: &[u8; HEADER_SIZE]) -> PacketHeader {
        PacketHeader {
            src_cid: le_u64(b, 0),
            dst_cid: le_u64(b, 8),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: le_u16(b, 28),
            op: le_u16(b, 30),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        }
    }

    /// Encodes the header.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// The header of a packet the device sends to the guest at `guest_cid`
    /// (source: the host).
    pub fn to_guest(guest_cid: u64, key: ConnKey, op: Op, credit: Credit) -> PacketHeader {
        PacketHeader {
            src_cid: HOST_CID,
            dst_cid: guest_cid,
            src_port: key.host_port,
            dst_port: key.guest_port,
            len: 0,
            type_: TYPE_STREAM,
            op: op.to_wire(),
            flags: 0,
            buf_alloc: credit.buf_alloc,
            fwd_cnt: credit.fwd_cnt,
        }
    }

    /// The connection this packet (sent by the guest) belongs to.
    pub fn guest_key(&self) -> ConnKey {
        ConnKey {
            host_port: self.dst_port,
            guest_port: self.src_port,
        }
    }
}

/// The two ports naming a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ConnKey {
    /// The port on the host side (the guest's destination port).
    pub host_port: u32,
    /// The port on the guest side (the guest's source port).
    pub guest_port: u32,
}

/// The credit a sender advertises in every packet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Credit {
    /// Receive buffer size.
    pub buf_alloc: u32,
    /// Bytes consumed so far, wrapping.
    pub fwd_cnt: u32,
}

/// Why a TX packet is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer bytes than a header.
    #[error("packet of {0} bytes is shorter than the {HEADER_SIZE}-byte header")]
    TooShort(usize),
    /// The header's length is over [`MAX_PAYLOAD`].
    #[error("payload length {0} exceeds the maximum of {MAX_PAYLOAD}")]
    PayloadTooLong(u32),
    /// The chain holds fewer payload bytes than the header claims.
    #[error("header claims {claimed} payload bytes, the buffer holds {present}")]
    Truncated {
        /// The header's `len`.
        claimed: u32,
        /// Bytes present after the header.
        present: usize,
    },
    /// The source CID is not the guest's.
    #[error("source CID {0} is not the guest's")]
    WrongSourceCid(u64),
    /// The destination CID is not the host.
    #[error("destination CID {0} is not the host (2)")]
    WrongDestinationCid(u64),
}

/// What a well-formed TX packet asks for; `Unsupported` packets are
/// answered with a reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxKind {
    /// A stream packet with a known op.
    Stream(Op),
    /// A socket type other than stream, or an op the spec does not define.
    Unsupported,
}

/// A TX packet whose header passed the checks; the payload is `len` bytes
/// (only `Rw` packets carry one that matters).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TxPacket {
    /// The header as sent.
    pub header: PacketHeader,
    /// What it asks for.
    pub kind: TxKind,
}

/// Checks a TX packet: `bytes` is the device-readable content of a chain
/// (possibly cut short by the device at `HEADER_SIZE + MAX_PAYLOAD + 1`),
/// the guest's CID is `guest_cid`. The payload is
/// `bytes[HEADER_SIZE..HEADER_SIZE + len]`.
pub fn parse_tx_packet(bytes: &[u8], guest_cid: u64) -> Result<TxPacket, PacketError> {
    let head: &[u8; HEADER_SIZE] = bytes
        .get(..HEADER_SIZE)
        .and_then(|h| h.try_into().ok())
        .ok_or(PacketError::TooShort(bytes.len()))?;
    let header = PacketHeader::from_bytes(head);
    if header.src_cid != guest_cid {
        return Err(PacketError::WrongSourceCid(header.src_cid));
    }
    if header.dst_cid != HOST_CID {
        return Err(PacketError::WrongDestinationCid(header.dst_cid));
    }
    let len = usize::try_from(header.len).unwrap_or(usize::MAX);
    if len > MAX_PAYLOAD {
        return Err(PacketError::PayloadTooLong(header.len));
    }
    let present = bytes.len() - HEADER_SIZE;
    if present < len {
        return Err(PacketError::Truncated {
            claimed: header.len,
            present,
        });
    }
    let kind = match (header.type_, Op::from_wire(header.op)) {
        (TYPE_STREAM, Some(op)) => TxKind::Stream(op),
        _ => TxKind::Unsupported,
    };
    Ok(TxPacket { header, kind })
}

/// The reply to a packet that cannot be honoured: a reset with the ports
/// swapped (never sent in answer to a reset, which would loop).
pub fn reset_for(header: &PacketHeader, guest_cid: u64) -> Option<PacketHeader> {
    if header.op == Op::Rst.to_wire() {
        return None;
    }
    Some(PacketHeader::to_guest(
        guest_cid,
        header.guest_key(),
        Op::Rst,
        Credit::default(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guest_header(op: Op, len: u32) -> PacketHeader {
        PacketHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 5000,
            len,
            type_: TYPE_STREAM,
            op: op.to_wire(),
            flags: 0,
            buf_alloc: 262_144,
            fwd_cnt: 7,
        }
    }

    fn packet(h: &PacketHeader, payload: &[u8]) -> Vec<u8> {
        let mut v = h.to_bytes().to_vec();
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn header_round_trips_and_layout_is_the_spec_one() {
        let h = PacketHeader {
            src_cid: 0x0102_0304_0506_0708,
            dst_cid: 2,
            src_port: 0xaabb_ccdd,
            dst_port: 9,
            len: 100,
            type_: 1,
            op: 5,
            flags: 3,
            buf_alloc: 4096,
            fwd_cnt: u32::MAX,
        };
        let b = h.to_bytes();
        assert_eq!(PacketHeader::from_bytes(&b), h);
        assert_eq!(b[0], 0x08);
        assert_eq!(b[8], 2);
        assert_eq!(&b[16..20], &[0xdd, 0xcc, 0xbb, 0xaa]);
        assert_eq!(b[24], 100);
        assert_eq!(b[28], 1);
        assert_eq!(b[30], 5);
        assert_eq!(b[32], 3);
        assert_eq!(&b[36..40], &4096u32.to_le_bytes());
        assert_eq!(&b[40..44], &[0xff; 4]);
    }

    #[test]
    fn ops_round_trip() {
        for v in 1..=7 {
            assert_eq!(Op::from_wire(v).unwrap().to_wire(), v);
        }
        assert_eq!(Op::from_wire(0), None);
        assert_eq!(Op::from_wire(8), None);
        assert_eq!(Op::from_wire(u16::MAX), None);
    }

    #[test]
    fn well_formed_packets_parse() {
        let h = guest_header(Op::Rw, 5);
        let p = parse_tx_packet(&packet(&h, b"hello"), 3).unwrap();
        assert_eq!(p.kind, TxKind::Stream(Op::Rw));
        assert_eq!(p.header, h);
        assert_eq!(p.header.guest_key().host_port, 5000);
        assert_eq!(p.header.guest_key().guest_port, 1234);
        // Extra bytes after the payload are ignored.
        let p = parse_tx_packet(&packet(&h, b"hello, world"), 3).unwrap();
        assert_eq!(p.header.len, 5);
        let req = guest_header(Op::Request, 0);
        assert_eq!(
            parse_tx_packet(&packet(&req, &[]), 3).unwrap().kind,
            TxKind::Stream(Op::Request)
        );
    }

    #[test]
    fn hostile_packets_are_refused() {
        assert_eq!(parse_tx_packet(&[], 3), Err(PacketError::TooShort(0)));
        assert_eq!(
            parse_tx_packet(&[0u8; 43], 3),
            Err(PacketError::TooShort(43))
        );
        let mut h = guest_header(Op::Rw, 10);
        assert_eq!(
            parse_tx_packet(&packet(&h, b"short"), 3),
            Err(PacketError::Truncated {
                claimed: 10,
                present: 5
            })
        );
        h.len = u32::MAX;
        assert_eq!(
            parse_tx_packet(&packet(&h, &[]), 3),
            Err(PacketError::PayloadTooLong(u32::MAX))
        );
        h.len = u32::try_from(MAX_PAYLOAD).unwrap() + 1;
        assert!(matches!(
            parse_tx_packet(&packet(&h, &[]), 3),
            Err(PacketError::PayloadTooLong(_))
        ));
        let mut h = guest_header(Op::Rw, 0);
        h.src_cid = 4;
        assert_eq!(
            parse_tx_packet(&packet(&h, &[]), 3),
            Err(PacketError::WrongSourceCid(4))
        );
        h.src_cid = 3;
        h.dst_cid = u64::MAX;
        assert_eq!(
            parse_tx_packet(&packet(&h, &[]), 3),
            Err(PacketError::WrongDestinationCid(u64::MAX))
        );
        // Unknown ops and types are not errors: they get a reset.
        let mut h = guest_header(Op::Rw, 0);
        h.op = 99;
        assert_eq!(
            parse_tx_packet(&packet(&h, &[]), 3).unwrap().kind,
            TxKind::Unsupported
        );
        h.op = Op::Request.to_wire();
        h.type_ = 2;
        assert_eq!(
            parse_tx_packet(&packet(&h, &[]), 3).unwrap().kind,
            TxKind::Unsupported
        );
    }

    #[test]
    fn every_short_prefix_and_random_bytes_never_panic() {
        let h = guest_header(Op::Rw, 16);
        let full = packet(&h, &[0xab; 16]);
        for n in 0..full.len() {
            assert!(parse_tx_packet(&full[..n], 3).is_err(), "prefix {n}");
        }
        // A cheap deterministic generator: no header field is trusted.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..2000 {
            let mut buf = vec![0u8; usize::try_from(x % 200).unwrap()];
            for b in buf.iter_mut() {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *b = x.to_le_bytes()[0];
            }
            let _ = parse_tx_packet(&buf, x % 5);
        }
    }

    #[test]
    fn resets_swap_ports_and_never_answer_a_reset() {
        let h = guest_header(Op::Request, 0);
        let r = reset_for(&h, 3).unwrap();
        assert_eq!((r.src_cid, r.dst_cid), (HOST_CID, 3));
        assert_eq!((r.src_port, r.dst_port), (5000, 1234));
        assert_eq!(Op::from_wire(r.op), Some(Op::Rst));
        assert_eq!(r.len, 0);
        assert_eq!(reset_for(&guest_header(Op::Rst, 0), 3), None);
    }
}
