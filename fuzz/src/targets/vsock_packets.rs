//! Target `vsock_packets`: what a guest puts on the vsock TX queue, checked
//! by `parse_tx_packet` and handed to the muxer the way the device does,
//! against a real hybrid Unix-socket backend (a listener for one host
//! port, none for the others).
//!
//! Input: first the whole input goes through `parse_tx_packet`; then it is
//! read as a sequence of operations: a guest packet (CIDs, ports, op, type,
//! flags, credit, claimed length and payload all from the input, the CIDs
//! and ports mostly from small sets so that connections really form),
//! host events (the listener accepts, host streams write or close), and
//! draining the RX side into a buffer of input-chosen size.
//!
//! Invariants checked:
//! - no panic, no arithmetic overflow (debug assertions are on);
//! - `parse_tx_packet` accepts exactly a header with the guest's source
//!   CID, the host's destination CID, a length of at most `MAX_PAYLOAD`
//!   that the bytes hold; `Unsupported` exactly for a non-stream type or an
//!   unknown op; headers survive encoding;
//! - a reset is never answered with a reset;
//! - every packet for the guest comes from the host CID to the guest's, is
//!   a stream packet with a known op, carries data only as `RW`, and never
//!   more than the buffer it was given;
//! - the muxer holds at most one connection per guest REQUEST;
//! - afterwards, reset, the muxer is empty, and a valid REQUEST to the
//!   listened port is answered with a RESPONSE for the same two ports.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use devices::virtio::vsock::muxer::Muxer;
use devices::virtio::vsock::packet::{
    parse_tx_packet, reset_for, Op, PacketError, PacketHeader, TxKind, HEADER_SIZE, HOST_CID,
    MAX_PAYLOAD, TYPE_STREAM,
};

use crate::input::{Bytes, Seed};

/// The guest's CID.
const GUEST_CID: u64 = 3;
/// The host port with a listener (`<socket>_1024`).
const LISTENED_PORT: u32 = 1024;
/// A host port nobody listens on.
const UNLISTENED_PORT: u32 = 1025;
/// Operations in one input, at most (each may touch sockets).
const MAX_OPS: usize = 64;

fn check_parse(bytes: &[u8]) {
    let parsed = parse_tx_packet(bytes, GUEST_CID);
    let Some(head) = bytes.get(..HEADER_SIZE) else {
        assert_eq!(parsed, Err(PacketError::TooShort(bytes.len())));
        return;
    };
    let h = PacketHeader::from_bytes(head.try_into().expect("a header"));
    assert_eq!(PacketHeader::from_bytes(&h.to_bytes()), h);
    assert_eq!(
        reset_for(&h, GUEST_CID).is_none(),
        h.op == Op::Rst.to_wire()
    );
    let len = usize::try_from(h.len).unwrap_or(usize::MAX);
    let expected = if h.src_cid != GUEST_CID {
        Err(PacketError::WrongSourceCid(h.src_cid))
    } else if h.dst_cid != HOST_CID {
        Err(PacketError::WrongDestinationCid(h.dst_cid))
    } else if len > MAX_PAYLOAD {
        Err(PacketError::PayloadTooLong(h.len))
    } else if bytes.len() - HEADER_SIZE < len {
        Err(PacketError::Truncated {
            claimed: h.len,
            present: bytes.len() - HEADER_SIZE,
        })
    } else {
        Ok(match (h.type_, Op::from_wire(h.op)) {
            (TYPE_STREAM, Some(op)) => TxKind::Stream(op),
            _ => TxKind::Unsupported,
        })
    };
    assert_eq!(parsed.map(|p| p.kind), expected);
}

/// What the device does with one TX chain's bytes.
fn guest_sends(muxer: &mut Muxer, bytes: &[u8]) {
    check_parse(bytes);
    match parse_tx_packet(bytes, GUEST_CID) {
        Ok(packet) => {
            let len = usize::try_from(packet.header.len).expect("checked length");
            muxer.guest_packet(&packet, &bytes[HEADER_SIZE..HEADER_SIZE + len]);
        }
        Err(e) => {
            muxer.count_malformed();
            if matches!(
                e,
                PacketError::Truncated { .. } | PacketError::PayloadTooLong(_)
            ) {
                let head = bytes[..HEADER_SIZE].try_into().expect("a header");
                muxer.refuse(&PacketHeader::from_bytes(head));
            }
        }
    }
}

/// Takes every packet the muxer has for the guest, checking each.
fn drain(muxer: &mut Muxer, buf_len: usize) -> Vec<PacketHeader> {
    let mut buf = vec![0u8; buf_len];
    let mut out = Vec::new();
    // Bounded: connections take turns and each packet consumes something.
    for _ in 0..256 {
        let Some((h, n)) = muxer.next_rx_packet(&mut buf) else {
            break;
        };
        assert_eq!(h.src_cid, HOST_CID, "{h:?}");
        assert_eq!(h.dst_cid, GUEST_CID, "{h:?}");
        assert_eq!(h.type_, TYPE_STREAM, "{h:?}");
        let op = Op::from_wire(h.op).unwrap_or_else(|| panic!("unknown op in {h:?}"));
        assert!(n <= buf.len(), "{n} bytes in a {}-byte buffer", buf.len());
        assert_eq!(usize::try_from(h.len).ok(), Some(n), "{h:?}");
        assert!(n == 0 || op == Op::Rw, "data in {op:?}");
        out.push(h);
    }
    out
}

/// A unique socket path for this run.
fn socket_path() -> PathBuf {
    static RUN: AtomicU64 = AtomicU64::new(0);
    let n = RUN.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("tidevm-fuzz-vsock-{}-{n}.sock", std::process::id()))
}

fn listened_path(base: &std::path::Path) -> PathBuf {
    PathBuf::from(format!("{}_{LISTENED_PORT}", base.display()))
}

/// A guest packet built from the input.
fn packet_from(b: &mut Bytes) -> Vec<u8> {
    let sel = b.u8();
    let src_cid = if sel & 0x3 == 0 { b.u64() } else { GUEST_CID };
    let dst_cid = if sel & 0xc == 0 { b.u64() } else { HOST_CID };
    let dst_port = match (sel >> 4) & 0x3 {
        0 | 1 => LISTENED_PORT,
        2 => UNLISTENED_PORT,
        _ => b.u32(),
    };
    let src_port = 40_000 + u32::from(b.u8() % 4);
    let op = match b.u8() {
        v @ 0..=250 => u16::from(v % 9),
        _ => b.u16(),
    };
    let type_ = if sel & 0x40 == 0 {
        TYPE_STREAM
    } else {
        b.u16()
    };
    let flags = u32::from(b.u8() % 4);
    let buf_alloc = b.u32();
    let fwd_cnt = b.u32();
    let payload = b.blob();
    let len = if sel & 0x80 == 0 {
        u32::try_from(payload.len()).expect("a u16 length")
    } else {
        b.u32()
    };
    let header = PacketHeader {
        src_cid,
        dst_cid,
        src_port,
        dst_port,
        len,
        type_,
        op,
        flags,
        buf_alloc,
        fwd_cnt,
    };
    let mut bytes = header.to_bytes().to_vec();
    bytes.extend_from_slice(payload);
    bytes
}

/// Runs one input.
pub fn run(data: &[u8]) {
    check_parse(data);
    let path = socket_path();
    let listened = listened_path(&path);
    let _ = std::fs::remove_file(&listened);
    let listener = UnixListener::bind(&listened).expect("bind the host listener");
    listener
        .set_nonblocking(true)
        .expect("nonblocking listener");
    let mut muxer = Muxer::new(GUEST_CID, &path).expect("the muxer");
    let mut host_streams: Vec<UnixStream> = Vec::new();
    let mut requests = 0usize;

    let mut b = Bytes::new(data);
    for _ in 0..MAX_OPS {
        if b.is_empty() {
            break;
        }
        match b.u8() % 4 {
            0 | 1 => {
                let bytes = packet_from(&mut b);
                let header = PacketHeader::from_bytes(bytes[..HEADER_SIZE].try_into().expect("h"));
                if header.op == Op::Request.to_wire() {
                    requests += 1;
                }
                guest_sends(&mut muxer, &bytes);
                assert!(muxer.connection_count() <= requests);
            }
            2 => {
                while let Ok((s, _)) = listener.accept() {
                    host_streams.push(s);
                }
                let what = b.u8();
                if let Some(s) = host_streams.get_mut(usize::from(what >> 2)) {
                    match what & 3 {
                        0 => {
                            let _ = s.write(&[what; 100]);
                        }
                        1 => {
                            let _ = s.shutdown(std::net::Shutdown::Both);
                        }
                        _ => {}
                    }
                }
                muxer.process_host_events();
            }
            _ => {
                let buf_len = usize::from(b.u16()) % (MAX_PAYLOAD + 1);
                drain(&mut muxer, buf_len);
            }
        }
    }

    // Still answering: reset, then a valid REQUEST gets a RESPONSE.
    muxer.reset();
    assert_eq!(muxer.connection_count(), 0);
    assert!(!muxer.has_rx_work());
    let request = PacketHeader {
        src_cid: GUEST_CID,
        dst_cid: HOST_CID,
        src_port: 50_000,
        dst_port: LISTENED_PORT,
        len: 0,
        type_: TYPE_STREAM,
        op: Op::Request.to_wire(),
        flags: 0,
        buf_alloc: 1 << 16,
        fwd_cnt: 0,
    };
    guest_sends(&mut muxer, &request.to_bytes());
    let answers = drain(&mut muxer, 4096);
    assert!(
        answers.iter().any(|h| h.op == Op::Response.to_wire()
            && h.dst_port == 50_000
            && h.src_port == LISTENED_PORT),
        "no RESPONSE to a valid REQUEST: {answers:?}"
    );
    drop(muxer);
    drop(host_streams);
    let _ = std::fs::remove_file(&listened);
    let _ = std::fs::remove_file(&path);
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    // A packet op (0), then `packet_from`'s fields with the right CIDs, the
    // listened port, stream type and a matching length.
    let packet = |s: &mut Seed, port_sel: u8, op: u8, payload: &[u8]| {
        s.u8(0)
            .u8(0x05 | (port_sel << 4))
            .u8(0)
            .u8(op)
            .u8(0)
            .u32(1 << 16)
            .u32(0)
            .blob(payload);
    };
    let host_events = |s: &mut Seed| {
        s.u8(2).u8(0);
    };
    let drain = |s: &mut Seed| {
        s.u8(3).u16(4096);
    };
    let mut connect_and_talk = Seed::new();
    packet(&mut connect_and_talk, 0, 1, b""); // REQUEST
    host_events(&mut connect_and_talk);
    drain(&mut connect_and_talk);
    packet(&mut connect_and_talk, 0, 5, b"hello host"); // RW
    host_events(&mut connect_and_talk);
    drain(&mut connect_and_talk);
    packet(&mut connect_and_talk, 0, 4, b""); // SHUTDOWN
    packet(&mut connect_and_talk, 0, 3, b""); // RST
    drain(&mut connect_and_talk);

    let mut refused = Seed::new();
    packet(&mut refused, 2, 1, b""); // REQUEST to a port nobody listens on
    host_events(&mut refused);
    drain(&mut refused);
    packet(&mut refused, 2, 3, b""); // RST: never answered

    let mut credit = Seed::new();
    packet(&mut credit, 0, 1, b"");
    host_events(&mut credit);
    packet(&mut credit, 0, 7, b""); // CREDIT_REQUEST
    packet(&mut credit, 0, 6, b""); // CREDIT_UPDATE
    drain(&mut credit);

    let mut truncated = Seed::new();
    truncated
        .u8(0)
        .u8(0x85)
        .u8(0)
        .u8(5)
        .u8(0)
        .u32(0)
        .u32(0)
        .blob(b"xy")
        .u32(500);
    vec![
        connect_and_talk.finish(),
        refused.finish(),
        credit.finish(),
        truncated.finish(),
    ]
}
