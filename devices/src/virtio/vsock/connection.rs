//! One vsock stream connection between a guest socket and a host stream:
//! the state machine of virtio 1.2, 5.10.6.6, with credit-based flow
//! control both ways.
//!
//! The connection never blocks and never buffers without bound:
//! - guest → host: payloads the host stream does not take at once wait in
//!   a buffer no larger than the credit the device advertised
//!   ([`BUF_ALLOC`]); the guest may not send more than that before the
//!   device's `fwd_cnt` moves on, and a guest that does is reset. `fwd_cnt`
//!   only counts bytes the host stream accepted, so a host that stops
//!   reading stops the guest.
//! - host → guest: bytes are read from the host stream only when the guest
//!   has credit for them and there is an RX buffer to put them in; one read
//!   takes up to [`HOST_READ_CHUNK`] bytes (never more than the credit), which
//!   then fill the guest's small RX buffers one after the other.
//!
//! Nothing here knows about epoll or virtqueues: the muxer tells the
//! connection what the host stream is ready for and asks it for the next
//! packet for the guest; tests drive it with socket pairs.

use std::collections::VecDeque;
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::packet::{ConnKey, Credit, Op, PacketHeader, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The receive buffer the device advertises for each connection: the most
/// guest data it holds for a host stream that is not reading.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Most bytes read from the host stream at once, and so most bytes held for
/// the guest per connection: Linux gives 4 KiB RX buffers, so one read
/// fills up to 16 of them instead of costing a system call each.
pub const HOST_READ_CHUNK: usize = 64 * 1024;
/// How long a host-initiated connection waits for the guest to accept.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// The host end of a connection.
pub trait HostStream: Read + Write {
    /// Signals end of data to the host (the guest will send no more).
    fn shutdown_write(&mut self) -> io::Result<()>;
}

impl HostStream for UnixStream {
    fn shutdown_write(&mut self) -> io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// Where the connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// The host asked (`CONNECT`): a REQUEST goes (or went) to the guest,
    /// whose RESPONSE is awaited until the deadline.
    HostInit {
        /// Whether the REQUEST was handed to the guest.
        request_sent: bool,
    },
    /// The guest asked and the host stream is connected: a RESPONSE is due.
    GuestInit,
    /// Data flows.
    Established,
    /// A reset is due to the guest; then the connection is gone.
    Resetting,
    /// Gone: the muxer drops it and closes the host stream.
    Closed,
}

/// Control packets waiting for an RX buffer.
#[derive(Debug, Default, Clone, Copy)]
struct Pending {
    credit_update: bool,
    credit_request: bool,
    /// SHUTDOWN flags to send (the host stream ended).
    shutdown: u32,
}

/// A vsock stream connection.
#[derive(Debug)]
pub struct Connection<S> {
    key: ConnKey,
    stream: S,
    state: State,
    deadline: Option<Instant>,
    pending: Pending,
    // Guest → host.
    to_host: VecDeque<u8>,
    /// Leading bytes of `to_host` that are the device's own `OK` line,
    /// not guest data (they do not count in `fwd_cnt`).
    to_host_own: usize,
    recv_cnt: u32,
    fwd_cnt: u32,
    fwd_cnt_sent: u32,
    guest_shutdown: u32,
    host_write_closed: bool,
    // Host → guest.
    peer: Credit,
    sent_cnt: u32,
    credit_requested: bool,
    host_readable: bool,
    host_eof: bool,
    /// Host bytes read but not yet sent to the guest: `staging[staged]`.
    /// Allocated on the first read; never more than the guest's credit at
    /// the time of the read.
    staging: Vec<u8>,
    staged: std::ops::Range<usize>,
    shutdown_sent: u32,
    bytes_to_guest: u64,
    bytes_to_host: u64,
}

impl<S: HostStream> Connection<S> {
    fn new(key: ConnKey, stream: S, state: State) -> Self {
        Self {
            key,
            stream,
            state,
            deadline: None,
            pending: Pending::default(),
            to_host: VecDeque::new(),
            to_host_own: 0,
            recv_cnt: 0,
            fwd_cnt: 0,
            fwd_cnt_sent: 0,
            guest_shutdown: 0,
            host_write_closed: false,
            peer: Credit::default(),
            sent_cnt: 0,
            credit_requested: false,
            host_readable: false,
            host_eof: false,
            staging: Vec::new(),
            staged: 0..0,
            shutdown_sent: 0,
            bytes_to_guest: 0,
            bytes_to_host: 0,
        }
    }

    /// A connection the host asked for: a REQUEST goes to the guest, which
    /// must answer before `now + CONNECT_TIMEOUT`.
    pub fn host_initiated(key: ConnKey, stream: S, now: Instant) -> Self {
        let mut c = Self::new(
            key,
            stream,
            State::HostInit {
                request_sent: false,
            },
        );
        c.deadline = Some(now + CONNECT_TIMEOUT);
        c
    }

    /// A connection the guest asked for with `request` (whose credit it
    /// carries), already connected to the host listener.
    pub fn guest_initiated(request: &PacketHeader, stream: S) -> Self {
        let mut c = Self::new(request.guest_key(), stream, State::GuestInit);
        c.peer = Credit {
            buf_alloc: request.buf_alloc,
            fwd_cnt: request.fwd_cnt,
        };
        c
    }

    /// The ports of the connection.
    pub fn key(&self) -> ConnKey {
        self.key
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// The host stream.
    pub fn stream(&self) -> &S {
        &self.stream
    }

    /// When a pending connection attempt gives up.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Payload bytes moved (to the guest, to the host).
    pub fn bytes_moved(&self) -> (u64, u64) {
        (self.bytes_to_guest, self.bytes_to_host)
    }

    /// Host data read for the guest and not sent yet.
    pub fn staged(&self) -> usize {
        self.staged.len()
    }

    /// Guest data waiting for the host stream.
    pub fn buffered(&self) -> usize {
        self.to_host.len() - self.to_host_own
    }

    /// Whether the muxer can drop it (nothing more to send to the guest).
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Tears the connection down: a RST goes to the guest, the host stream
    /// is closed when the muxer drops the connection.
    pub fn reset(&mut self) {
        self.state = match self.state {
            // The guest never heard of it: nothing to tell.
            State::Closed
            | State::HostInit {
                request_sent: false,
            } => State::Closed,
            _ => State::Resetting,
        };
        self.to_host.clear();
        self.to_host_own = 0;
        self.staged = 0..0;
        self.deadline = None;
    }

    /// Gives up a host-initiated connection the guest did not answer in time.
    pub fn check_deadline(&mut self, now: Instant) {
        if self.deadline.is_some_and(|d| now >= d) {
            log::debug!("vsock: connection {:?} timed out", self.key);
            self.reset();
        }
    }

    /// Whether the host stream should be watched for reading and writing.
    pub fn interest(&self) -> (bool, bool) {
        let live = matches!(self.state, State::Established);
        let want_in = live && !self.host_readable && !self.host_eof;
        let want_out = matches!(self.state, State::Established | State::HostInit { .. })
            && !self.to_host.is_empty();
        (want_in, want_out)
    }

    /// The host stream has data (or hung up): read it when credit allows.
    pub fn host_readable(&mut self) {
        self.host_readable = true;
    }

    /// The host stream can take more: flush what the guest sent.
    pub fn host_writable(&mut self) {
        self.flush_to_host();
    }

    /// Credit the guest has for sending to the host, in the guest's view.
    fn credit(&mut self) -> Credit {
        self.fwd_cnt_sent = self.fwd_cnt;
        Credit {
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    /// Bytes the device may still send to the guest.
    pub fn peer_free(&self) -> u32 {
        let in_flight = self.sent_cnt.wrapping_sub(self.peer.fwd_cnt);
        self.peer.buf_alloc.saturating_sub(in_flight)
    }

    /// Handles a packet from the guest for this connection; `payload` is
    /// the packet's data (only RW carries any).
    pub fn guest_packet(&mut self, header: &PacketHeader, op: Op, payload: &[u8]) {
        if matches!(self.state, State::Resetting | State::Closed) {
            if op == Op::Rst {
                self.state = State::Closed;
            }
            return;
        }
        let before = self.peer_free();
        self.peer = Credit {
            buf_alloc: header.buf_alloc,
            fwd_cnt: header.fwd_cnt,
        };
        if self.peer_free() != before {
            self.credit_requested = false;
        }
        match (op, self.state) {
            (Op::Rst, _) => {
                self.state = State::Closed;
                self.to_host.clear();
            }
            (Op::Response, State::HostInit { request_sent: true }) => {
                self.state = State::Established;
                self.deadline = None;
                let line = format!("OK {}\n", self.key.host_port);
                self.to_host.extend(line.as_bytes());
                self.to_host_own = line.len();
                self.flush_to_host();
            }
            (Op::Rw, State::Established) => self.guest_data(payload),
            (Op::CreditUpdate, State::Established) => {}
            (Op::CreditRequest, State::Established) => self.pending.credit_update = true,
            (Op::Shutdown, State::Established) => {
                self.guest_shutdown |= header.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                self.flush_to_host();
            }
            (op, state) => {
                log::debug!("vsock: {op:?} in state {state:?} on {:?}: reset", self.key);
                self.reset();
            }
        }
    }

    fn guest_data(&mut self, payload: &[u8]) {
        if self.guest_shutdown & SHUTDOWN_SEND != 0 {
            log::debug!("vsock: data after shutdown on {:?}: reset", self.key);
            self.reset();
            return;
        }
        let Ok(len) = u32::try_from(payload.len()) else {
            self.reset();
            return;
        };
        // The guest may have at most BUF_ALLOC bytes in flight.
        let in_flight = self.recv_cnt.wrapping_add(len).wrapping_sub(self.fwd_cnt);
        if in_flight > BUF_ALLOC {
            log::warn!(
                "vsock: guest overran its credit on {:?} ({in_flight} bytes): reset",
                self.key
            );
            self.reset();
            return;
        }
        self.recv_cnt = self.recv_cnt.wrapping_add(len);
        self.to_host.extend(payload);
        self.flush_to_host();
    }

    /// Writes buffered guest data to the host stream, as much as it takes.
    fn flush_to_host(&mut self) {
        while !self.to_host.is_empty() {
            let (front, _) = self.to_host.as_slices();
            match self.stream.write(front) {
                Ok(0) => {
                    self.reset();
                    return;
                }
                Ok(n) => {
                    self.to_host.drain(..n);
                    let own = n.min(self.to_host_own);
                    self.to_host_own -= own;
                    let data = n - own;
                    self.bytes_to_host += data as u64;
                    // At most BUF_ALLOC + a line is buffered: fits u32.
                    self.fwd_cnt = self
                        .fwd_cnt
                        .wrapping_add(u32::try_from(data).unwrap_or(u32::MAX));
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("vsock: host stream of {:?} failed: {e}: reset", self.key);
                    self.reset();
                    return;
                }
            }
        }
        // Tell the guest about freed space once it has used half its view
        // of the credit (it does not ask on its own).
        let unannounced = self.fwd_cnt.wrapping_sub(self.fwd_cnt_sent);
        let guest_view_used = self.recv_cnt.wrapping_sub(self.fwd_cnt_sent);
        if unannounced > 0 && guest_view_used >= BUF_ALLOC / 2 {
            self.pending.credit_update = true;
        }
        if self.to_host.is_empty() && self.state == State::Established {
            if self.guest_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND
                || (self.guest_shutdown & SHUTDOWN_SEND != 0 && self.host_eof)
            {
                // Both directions are finished: reset closes it for good.
                self.reset();
            } else if self.guest_shutdown & SHUTDOWN_SEND != 0 && !self.host_write_closed {
                self.host_write_closed = true;
                if let Err(e) = self.stream.shutdown_write() {
                    log::debug!("vsock: shutdown of {:?} failed: {e}", self.key);
                }
            }
        }
    }

    /// Whether [`Connection::next_packet`] may have something for the guest.
    pub fn has_rx_work(&self) -> bool {
        match self.state {
            State::Resetting | State::GuestInit => true,
            State::HostInit { request_sent } => !request_sent,
            State::Closed => false,
            State::Established => {
                self.pending.credit_update
                    || self.pending.credit_request
                    || self.pending.shutdown & !self.shutdown_sent != 0
                    || self.can_send_data()
                    || self.can_read_host()
                    || (self.wants_to_send() && self.peer_free() == 0 && !self.credit_requested)
            }
        }
    }

    /// Whether host data waits for the guest and the guest has no credit.
    pub fn waits_for_credit(&self) -> bool {
        self.state == State::Established && self.wants_to_send() && self.peer_free() == 0
    }

    /// Whether host data is waiting (read, or readable) for the guest.
    fn wants_to_send(&self) -> bool {
        self.guest_shutdown & SHUTDOWN_RCV == 0
            && (!self.staged.is_empty() || (self.host_readable && !self.host_eof))
    }

    fn can_send_data(&self) -> bool {
        !self.staged.is_empty() && self.guest_shutdown & SHUTDOWN_RCV == 0 && self.peer_free() > 0
    }

    fn can_read_host(&self) -> bool {
        self.staged.is_empty()
            && self.host_readable
            && !self.host_eof
            && self.guest_shutdown & SHUTDOWN_RCV == 0
            && self.peer_free() > 0
    }

    /// Reads up to [`HOST_READ_CHUNK`] bytes (no more than the guest's
    /// credit) from the host stream into the staging buffer.
    fn read_host(&mut self) {
        let want = HOST_READ_CHUNK.min(usize::try_from(self.peer_free()).unwrap_or(usize::MAX));
        if self.staging.len() < HOST_READ_CHUNK {
            self.staging.resize(HOST_READ_CHUNK, 0);
        }
        loop {
            match self.stream.read(&mut self.staging[..want]) {
                Ok(0) => {
                    self.host_eof = true;
                    self.pending.shutdown |= SHUTDOWN_SEND;
                    return;
                }
                Ok(n) => {
                    self.staged = 0..n;
                    return;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    self.host_readable = false;
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::debug!("vsock: host stream of {:?} failed: {e}: reset", self.key);
                    self.reset();
                    return;
                }
            }
        }
    }

    /// The next packet for the guest, with up to `buf.len()` bytes of host
    /// data read into `buf`: `(header, payload length)`. `None` when there
    /// is nothing to send now.
    pub fn next_packet(&mut self, guest_cid: u64, buf: &mut [u8]) -> Option<(PacketHeader, usize)> {
        let key = self.key;
        match self.state {
            State::Closed => return None,
            State::Resetting => {
                self.state = State::Closed;
                let h = PacketHeader::to_guest(guest_cid, key, Op::Rst, Credit::default());
                return Some((h, 0));
            }
            State::HostInit {
                request_sent: false,
            } => {
                self.state = State::HostInit { request_sent: true };
                let credit = self.credit();
                return Some((
                    PacketHeader::to_guest(guest_cid, key, Op::Request, credit),
                    0,
                ));
            }
            State::HostInit { request_sent: true } => return None,
            State::GuestInit => {
                self.state = State::Established;
                let credit = self.credit();
                return Some((
                    PacketHeader::to_guest(guest_cid, key, Op::Response, credit),
                    0,
                ));
            }
            State::Established => {}
        }
        let pending_shutdown = self.pending.shutdown & !self.shutdown_sent;
        if pending_shutdown != 0 {
            self.shutdown_sent |= pending_shutdown;
            let credit = self.credit();
            let mut h = PacketHeader::to_guest(guest_cid, key, Op::Shutdown, credit);
            h.flags = pending_shutdown;
            if self.guest_shutdown & SHUTDOWN_SEND != 0 && self.to_host.is_empty() {
                // Neither side sends any more: the reset closes it.
                self.reset();
            }
            return Some((h, 0));
        }
        if self.pending.credit_request {
            self.pending.credit_request = false;
            let credit = self.credit();
            return Some((
                PacketHeader::to_guest(guest_cid, key, Op::CreditRequest, credit),
                0,
            ));
        }
        if self.guest_shutdown & SHUTDOWN_RCV != 0 {
            // The guest takes no more data: what was read for it goes.
            self.staged = 0..0;
        }
        if self.can_read_host() && !buf.is_empty() {
            self.read_host();
            if self.state != State::Established {
                return self.next_packet(guest_cid, buf);
            }
        }
        if self.can_send_data() && !buf.is_empty() {
            let n = buf
                .len()
                .min(self.staged.len())
                .min(usize::try_from(self.peer_free()).unwrap_or(usize::MAX));
            let start = self.staged.start;
            buf[..n].copy_from_slice(&self.staging[start..start + n]);
            self.staged.start += n;
            self.pending.credit_update = false;
            // n <= peer_free, a u32.
            let len = u32::try_from(n).unwrap_or(u32::MAX);
            self.sent_cnt = self.sent_cnt.wrapping_add(len);
            self.bytes_to_guest += n as u64;
            let credit = self.credit();
            let mut h = PacketHeader::to_guest(guest_cid, key, Op::Rw, credit);
            h.len = len;
            return Some((h, n));
        }
        if self.pending.shutdown & !self.shutdown_sent != 0 {
            // The host stream ended just now.
            return self.next_packet(guest_cid, buf);
        }
        if self.wants_to_send() && self.peer_free() == 0 && !self.credit_requested {
            self.credit_requested = true;
            self.pending.credit_request = true;
        }
        if self.pending.credit_update {
            self.pending.credit_update = false;
            let credit = self.credit();
            return Some((
                PacketHeader::to_guest(guest_cid, key, Op::CreditUpdate, credit),
                0,
            ));
        }
        if self.pending.credit_request {
            return self.next_packet(guest_cid, buf);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::super::packet::{HOST_CID, TYPE_STREAM};
    use super::*;

    const CID: u64 = 3;

    fn key() -> ConnKey {
        ConnKey {
            host_port: 1 << 30,
            guest_port: 5000,
        }
    }

    fn guest(op: Op, len: usize, buf_alloc: u32, fwd_cnt: u32) -> PacketHeader {
        PacketHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port: key().guest_port,
            dst_port: key().host_port,
            len: u32::try_from(len).unwrap(),
            type_: TYPE_STREAM,
            op: op.to_wire(),
            flags: 0,
            buf_alloc,
            fwd_cnt,
        }
    }

    fn send(c: &mut Connection<UnixStream>, op: Op, payload: &[u8], fwd_cnt: u32) {
        c.guest_packet(&guest(op, payload.len(), 65536, fwd_cnt), op, payload);
    }

    fn next(c: &mut Connection<UnixStream>, cap: usize) -> Option<(PacketHeader, Vec<u8>)> {
        let mut buf = vec![0u8; cap];
        c.next_packet(CID, &mut buf)
            .map(|(h, n)| (h, buf[..n].to_vec()))
    }

    fn op_of(h: &PacketHeader) -> Op {
        Op::from_wire(h.op).unwrap()
    }

    /// A host-initiated connection, established; returns it and the host's
    /// end of the stream (after reading the OK line).
    fn established() -> (Connection<UnixStream>, UnixStream) {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut c = Connection::host_initiated(key(), ours, Instant::now());
        let (req, _) = next(&mut c, 100).unwrap();
        assert_eq!(op_of(&req), Op::Request);
        assert_eq!((req.src_cid, req.dst_cid), (HOST_CID, CID));
        assert_eq!((req.src_port, req.dst_port), (1 << 30, 5000));
        assert_eq!(req.buf_alloc, BUF_ALLOC);
        assert!(next(&mut c, 100).is_none());
        send(&mut c, Op::Response, &[], 0);
        assert_eq!(c.state(), State::Established);
        let mut line = [0u8; 14];
        theirs.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        (c, theirs)
    }

    #[test]
    fn host_initiated_handshake_then_data_both_ways() {
        let (mut c, mut host) = established();
        // Guest → host.
        send(&mut c, Op::Rw, b"ping", 0);
        let mut got = [0u8; 4];
        host.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"ping");
        assert_eq!(c.bytes_moved(), (0, 4));
        // Host → guest, once the stream is known readable.
        host.write_all(b"pong!").unwrap();
        assert!(!c.has_rx_work());
        assert_eq!(c.interest(), (true, false));
        c.host_readable();
        assert!(c.has_rx_work());
        let (h, data) = next(&mut c, 3).unwrap();
        assert_eq!(
            (op_of(&h), h.len, data.as_slice()),
            (Op::Rw, 3, &b"pon"[..])
        );
        assert_eq!(h.fwd_cnt, 4, "every packet carries the device's credit");
        let (_, data) = next(&mut c, 100).unwrap();
        assert_eq!(data, b"g!");
        // Drained: the stream is watched again.
        assert!(next(&mut c, 100).is_none());
        assert_eq!(c.interest(), (true, false));
    }

    #[test]
    fn guest_credit_limits_what_is_read_from_the_host() {
        let (mut c, mut host) = established();
        // The guest offered 65536 bytes of buffer and consumed nothing.
        host.write_all(&[7u8; 70000]).unwrap();
        c.host_readable();
        let mut total = 0;
        while let Some((h, data)) = next(&mut c, 4096) {
            if op_of(&h) == Op::Rw {
                total += data.len();
            } else {
                assert_eq!(op_of(&h), Op::CreditRequest, "asks once it runs out");
                break;
            }
        }
        assert_eq!(total, 65536);
        assert_eq!(c.peer_free(), 0);
        assert!(next(&mut c, 4096).is_none(), "asks only once");
        // The guest consumed 10000 bytes: 10000 more may go.
        send(&mut c, Op::CreditUpdate, &[], 10000);
        let mut more = 0;
        while let Some((_, data)) = next(&mut c, 4096) {
            more += data.len();
        }
        assert_eq!(more, 70000 - 65536, "all the host had left");
    }

    #[test]
    fn a_host_that_stops_reading_stops_the_guest() {
        let (mut c, _host) = established();
        let chunk = vec![1u8; 4096];
        // The guest sends while its most optimistic view of the credit
        // allows; the host reads nothing.
        let mut sent = 0u32;
        while sent + 4096 - c.fwd_cnt <= BUF_ALLOC {
            send(&mut c, Op::Rw, &chunk, 0);
            sent += 4096;
        }
        assert_eq!(c.state(), State::Established);
        assert!(c.buffered() > 0 && c.buffered() <= BUF_ALLOC as usize);
        assert!(c.interest().1, "waits for the host to read");
        // More than the credit the guest had: reset.
        let over = vec![0u8; (BUF_ALLOC - (sent - c.fwd_cnt) + 1) as usize];
        send(&mut c, Op::Rw, &over, 0);
        assert_eq!(c.state(), State::Resetting);
        let (h, _) = next(&mut c, 10).unwrap();
        assert_eq!(op_of(&h), Op::Rst);
        assert!(c.is_closed());
    }

    #[test]
    fn freed_space_is_announced_to_the_guest() {
        let (mut c, mut host) = established();
        let chunk = vec![2u8; 4096];
        // The host reads everything: after half the buffer a credit update
        // is due even though no data flows back.
        let mut updates = 0;
        let mut sink = vec![0u8; 4096];
        for _ in 0..64 {
            send(&mut c, Op::Rw, &chunk, 0);
            host.read_exact(&mut sink).unwrap();
            if let Some((h, _)) = next(&mut c, 100) {
                assert_eq!(op_of(&h), Op::CreditUpdate);
                assert_eq!(h.buf_alloc, BUF_ALLOC);
                updates += 1;
            }
        }
        assert_eq!(updates, 2, "one update per half buffer");
        // A credit request is answered.
        send(&mut c, Op::CreditRequest, &[], 0);
        let (h, _) = next(&mut c, 100).unwrap();
        assert_eq!((op_of(&h), h.fwd_cnt), (Op::CreditUpdate, 64 * 4096));
    }

    #[test]
    fn shutdowns_and_resets() {
        // Guest half-closes: the host sees EOF after the data.
        let (mut c, mut host) = established();
        send(&mut c, Op::Rw, b"last", 0);
        let mut h = guest(Op::Shutdown, 0, 65536, 0);
        h.flags = SHUTDOWN_SEND;
        c.guest_packet(&h, Op::Shutdown, &[]);
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).unwrap();
        assert_eq!(rest, b"last");
        // The host still sends, then closes: SHUTDOWN(SEND), then a reset
        // (both sides are done).
        host.write_all(b"bye").unwrap();
        drop(host);
        c.host_readable();
        let (p, data) = next(&mut c, 100).unwrap();
        assert_eq!((op_of(&p), data.as_slice()), (Op::Rw, &b"bye"[..]));
        let (p, _) = next(&mut c, 100).unwrap();
        assert_eq!((op_of(&p), p.flags), (Op::Shutdown, SHUTDOWN_SEND));
        let (p, _) = next(&mut c, 100).unwrap();
        assert_eq!(op_of(&p), Op::Rst);
        assert!(c.is_closed());

        // Host closes first: the guest gets SHUTDOWN(SEND); its full
        // shutdown is answered with a reset.
        let (mut c, host) = established();
        drop(host);
        c.host_readable();
        let (p, _) = next(&mut c, 100).unwrap();
        assert_eq!((op_of(&p), p.flags), (Op::Shutdown, SHUTDOWN_SEND));
        assert!(next(&mut c, 100).is_none());
        let mut h = guest(Op::Shutdown, 0, 65536, 0);
        h.flags = SHUTDOWN_SEND | SHUTDOWN_RCV;
        c.guest_packet(&h, Op::Shutdown, &[]);
        assert_eq!(op_of(&next(&mut c, 100).unwrap().0), Op::Rst);

        // A guest reset closes without an answer.
        let (mut c, _host) = established();
        send(&mut c, Op::Rst, &[], 0);
        assert!(c.is_closed());
        assert!(next(&mut c, 100).is_none());
    }

    #[test]
    fn out_of_place_packets_reset_and_deadlines_expire() {
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let now = Instant::now();
        let mut c = Connection::host_initiated(key(), ours, now);
        // A response before the request was even sent: closed, and no
        // reset for a connection the guest never heard of.
        send(&mut c, Op::Response, &[], 0);
        assert!(c.is_closed());
        assert!(next(&mut c, 10).is_none());

        let (ours, _theirs) = UnixStream::pair().unwrap();
        let mut c = Connection::host_initiated(key(), ours, now);
        next(&mut c, 10).unwrap();
        c.check_deadline(now + Duration::from_millis(100));
        assert!(next(&mut c, 10).is_none());
        c.check_deadline(now + CONNECT_TIMEOUT);
        assert_eq!(op_of(&next(&mut c, 10).unwrap().0), Op::Rst);

        // Data before the connection is up, and a second request.
        let (ours, _theirs) = UnixStream::pair().unwrap();
        let mut c = Connection::host_initiated(key(), ours, now);
        next(&mut c, 10).unwrap();
        send(&mut c, Op::Rw, b"early", 0);
        assert_eq!(c.state(), State::Resetting);
        let (mut c, _host) = established();
        send(&mut c, Op::Request, &[], 0);
        assert_eq!(c.state(), State::Resetting);
    }

    #[test]
    fn guest_initiated_answers_with_a_response() {
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        let req = guest(Op::Request, 0, 4096, 0);
        let mut c = Connection::guest_initiated(&req, ours);
        assert!(c.has_rx_work());
        let (h, _) = next(&mut c, 10).unwrap();
        assert_eq!(op_of(&h), Op::Response);
        assert_eq!((h.src_port, h.dst_port), (1 << 30, 5000));
        assert_eq!(c.state(), State::Established);
        // The guest's credit from its request applies.
        theirs.write_all(&[9u8; 5000]).unwrap();
        c.host_readable();
        let mut total = 0;
        while let Some((h, d)) = next(&mut c, 10_000) {
            if op_of(&h) == Op::Rw {
                total += d.len();
            }
        }
        assert_eq!(total, 4096);
    }

    #[test]
    fn hostile_credit_values_do_not_overflow() {
        let (mut c, mut host) = established();
        // fwd_cnt ahead of what was sent: no credit rather than a wrap.
        c.guest_packet(
            &guest(Op::CreditUpdate, 0, 100, 12345),
            Op::CreditUpdate,
            &[],
        );
        assert_eq!(c.peer_free(), 0);
        c.guest_packet(
            &guest(Op::CreditUpdate, 0, u32::MAX, 0),
            Op::CreditUpdate,
            &[],
        );
        assert_eq!(c.peer_free(), u32::MAX);
        host.write_all(b"x").unwrap();
        c.host_readable();
        let (_, d) = next(&mut c, 0).map_or((PacketHeader::default(), vec![]), |x| x);
        assert!(d.is_empty(), "a zero-sized buffer reads nothing");
    }

    /// A host stream that hands out `data` and records each read's size.
    struct CountingStream {
        data: Vec<u8>,
        reads: Vec<usize>,
    }

    impl Read for CountingStream {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.reads.push(buf.len());
            if self.data.is_empty() {
                return Err(ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data.drain(..n);
            Ok(n)
        }
    }

    impl Write for CountingStream {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            Ok(buf.len())
        }

        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl HostStream for CountingStream {
        fn shutdown_write(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn counting(data: Vec<u8>, guest_buf_alloc: u32) -> Connection<CountingStream> {
        let req = guest(Op::Request, 0, guest_buf_alloc, 0);
        let stream = CountingStream {
            data,
            reads: Vec::new(),
        };
        let mut c = Connection::guest_initiated(&req, stream);
        let mut buf = [0u8; 0];
        let (h, _) = c.next_packet(CID, &mut buf).unwrap();
        assert_eq!(op_of(&h), Op::Response);
        c
    }

    #[test]
    fn one_host_read_fills_many_small_rx_buffers() {
        // 40000 bytes for 4 KiB RX buffers: one read, ten packets.
        let data: Vec<u8> = (0..40_000u32).map(|i| (i % 251) as u8).collect();
        let mut c = counting(data.clone(), 1 << 20);
        c.host_readable();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 4096];
        while let Some((h, n)) = c.next_packet(CID, &mut buf) {
            assert_eq!((op_of(&h), h.len as usize), (Op::Rw, n));
            got.extend_from_slice(&buf[..n]);
            if got.len() == data.len() {
                break;
            }
        }
        assert_eq!(got, data);
        assert_eq!(c.stream().reads, [HOST_READ_CHUNK]);
        assert_eq!(c.bytes_moved().0, 40_000);
        // Drained: the next read finds nothing and the stream is watched.
        assert!(c.next_packet(CID, &mut buf).is_none());
        assert_eq!(c.interest(), (true, false));
    }

    #[test]
    fn host_reads_never_exceed_the_guest_credit() {
        // The guest has room for 6000 bytes: that is all that is read, and
        // what is held waits for credit, never for more host data.
        let mut c = counting(vec![5u8; 20_000], 6000);
        c.host_readable();
        let mut buf = vec![0u8; 4096];
        let mut sent = 0;
        loop {
            let (h, n) = c.next_packet(CID, &mut buf).unwrap();
            if op_of(&h) != Op::Rw {
                assert_eq!(op_of(&h), Op::CreditRequest);
                break;
            }
            sent += n;
        }
        assert_eq!((sent, c.staged()), (6000, 0));
        assert_eq!(c.stream().reads, [6000]);
        // The guest consumed 5000 bytes: the next read takes 5000.
        c.guest_packet(
            &guest(Op::CreditUpdate, 0, 6000, 5000),
            Op::CreditUpdate,
            &[],
        );
        assert!(c.has_rx_work());
        let (_, n) = c.next_packet(CID, &mut buf).unwrap();
        assert_eq!((n, c.staged()), (4096, 904));
        assert_eq!(c.stream().reads, [6000, 5000]);
        // The guest shrinks its buffer: the staged bytes wait, nothing more
        // is read, and credit is asked for once.
        c.guest_packet(&guest(Op::CreditUpdate, 0, 0, 5000), Op::CreditUpdate, &[]);
        let (h, _) = c.next_packet(CID, &mut buf).unwrap();
        assert_eq!(op_of(&h), Op::CreditRequest);
        assert!(c.next_packet(CID, &mut buf).is_none());
        assert_eq!((c.staged(), c.stream().reads.len()), (904, 2));
        // A guest that stops receiving drops them.
        let mut h = guest(Op::Shutdown, 0, 0, 5000);
        h.flags = SHUTDOWN_RCV;
        c.guest_packet(&h, Op::Shutdown, &[]);
        assert!(c.next_packet(CID, &mut buf).is_none());
        assert_eq!(c.staged(), 0);
    }
}
