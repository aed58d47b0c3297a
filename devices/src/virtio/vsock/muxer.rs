//! The vsock muxer: every connection of the device, the host sockets behind
//! them, and the order in which they get RX buffers.
//!
//! The muxer owns an epoll set (registered as one fd on the VMM event loop)
//! holding the host listener, host clients still sending their `CONNECT`
//! line, the connections' host streams and a timer for deadlines. A host
//! stream is only in the set while the connection wants to read or write
//! it, so a connection waiting for guest credit or RX buffers costs no
//! wake-ups.
//!
//! Every guest packet is answered: packets for unknown connections, for
//! unsupported socket types or ops, and connection requests nobody listens
//! for get a reset. The resets waiting for RX buffers are capped
//! ([`MAX_PENDING_RESETS`]); so are connections ([`MAX_CONNECTIONS`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::connection::{Connection, State};
use super::packet::{reset_for, ConnKey, Op, PacketHeader, TxKind, TxPacket};
use super::unix_backend::{connect_nonblocking, Handshake, HandshakeStep, HostListener};
use super::VsockError;

/// Most connections (and host clients in their handshake) at once.
pub const MAX_CONNECTIONS: usize = 1024;
/// Most resets for unknown connections waiting for an RX buffer; a guest
/// that floods the TX queue while giving no RX buffers loses the excess.
pub const MAX_PENDING_RESETS: usize = 1024;
/// First host port handed to host-initiated connections.
pub const FIRST_HOST_PORT: u32 = 1 << 30;
/// How often deadlines are checked while any is pending.
const TIMER_PERIOD: Duration = Duration::from_millis(250);

/// Counters of the vsock device (never reset).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct VsockMetrics {
    /// Host clients that asked for a guest port.
    pub host_connects: u64,
    /// Guest connection requests that reached a host listener.
    pub guest_connects: u64,
    /// Guest requests without a host listener, and host clients refused
    /// (bad line, too many connections).
    pub refused: u64,
    /// Connections that ended.
    pub closed: u64,
    /// Resets sent for packets of unknown connections.
    pub lone_resets: u64,
    /// Resets dropped because too many were waiting.
    pub dropped_resets: u64,
    /// TX chains that were not valid packets.
    pub malformed_packets: u64,
    /// Payload bytes of closed connections, host to guest.
    pub bytes_to_guest: u64,
    /// Payload bytes of closed connections, guest to host.
    pub bytes_to_host: u64,
    /// Packets put in RX buffers (to the guest).
    pub rx_packets: u64,
    /// TX chains taken from the driver (from the guest).
    pub tx_packets: u64,
    /// Driver notifications of the RX and TX queues.
    pub queue_notifications: u64,
    /// Queue interrupts raised (the driver asked for them).
    pub interrupts: u64,
    /// Now: open connections.
    pub open_connections: u64,
    /// Now: open connections with host data for the guest and no guest
    /// credit left (they wait for the driver's credit update).
    pub connections_waiting_for_credit: u64,
    /// Now: open connections with packets, or host data not yet read, for
    /// the guest.
    pub connections_with_rx_work: u64,
    /// Now: RX buffers the driver offered that the device has not used.
    pub rx_buffers_offered: u64,
    /// Now: TX chains the driver queued that the device has not taken.
    pub tx_chains_queued: u64,
    /// Now: 1 while the device's interrupt status holds bits the driver
    /// has not acknowledged (an interrupt raised and not yet handled).
    pub interrupt_unacknowledged: u64,
}

struct Entry {
    conn: Connection<UnixStream>,
    /// The events the host stream is registered for, if it is.
    registered: Option<EventSet>,
}

/// All connections of one vsock device and their host sockets.
pub struct Muxer {
    guest_cid: u64,
    listener: HostListener,
    epoll: Epoll,
    timer: TimerFd,
    timer_armed: bool,
    conns: HashMap<ConnKey, Entry>,
    by_fd: HashMap<RawFd, ConnKey>,
    handshakes: HashMap<RawFd, Handshake>,
    rx_queue: VecDeque<ConnKey>,
    queued: HashSet<ConnKey>,
    lone_resets: VecDeque<PacketHeader>,
    next_host_port: u32,
    metrics: VsockMetrics,
}

impl std::fmt::Debug for Muxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Muxer")
            .field("guest_cid", &self.guest_cid)
            .field("path", &self.listener.path())
            .field("connections", &self.conns.len())
            .field("handshakes", &self.handshakes.len())
            .finish_non_exhaustive()
    }
}

fn epoll_err(e: std::io::Error) -> VsockError {
    VsockError::Epoll(e)
}

impl Muxer {
    /// Listens on `path` for host clients of the guest at `guest_cid`.
    pub fn new(guest_cid: u64, path: &Path) -> Result<Self, VsockError> {
        let listener = HostListener::bind(path)?;
        let epoll = Epoll::new().map_err(epoll_err)?;
        let timer = TimerFd::new().map_err(|e| VsockError::Epoll(e.into()))?;
        set_nonblocking(timer.as_raw_fd()).map_err(epoll_err)?;
        for fd in [listener.as_raw_fd(), timer.as_raw_fd()] {
            epoll
                .ctl(ControlOperation::Add, fd, event(fd, EventSet::IN))
                .map_err(epoll_err)?;
        }
        Ok(Self {
            guest_cid,
            listener,
            epoll,
            timer,
            timer_armed: false,
            conns: HashMap::new(),
            by_fd: HashMap::new(),
            handshakes: HashMap::new(),
            rx_queue: VecDeque::new(),
            queued: HashSet::new(),
            lone_resets: VecDeque::new(),
            next_host_port: FIRST_HOST_PORT,
            metrics: VsockMetrics::default(),
        })
    }

    /// The epoll fd to watch for host-side events.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Connections open now.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The counters, with the bytes of open connections included.
    pub fn metrics(&self) -> VsockMetrics {
        let mut m = self.metrics;
        for e in self.conns.values() {
            let (to_guest, to_host) = e.conn.bytes_moved();
            m.bytes_to_guest += to_guest;
            m.bytes_to_host += to_host;
            m.open_connections += 1;
            m.connections_waiting_for_credit += u64::from(e.conn.waits_for_credit());
            m.connections_with_rx_work += u64::from(e.conn.has_rx_work());
        }
        m
    }

    /// Counts a TX chain that was not a packet.
    pub fn count_malformed(&mut self) {
        self.metrics.malformed_packets += 1;
    }

    /// Drops every connection (their host streams close) and pending
    /// packet: the driver reset the device, or a transport reset.
    pub fn reset(&mut self) {
        let keys: Vec<ConnKey> = self.conns.keys().copied().collect();
        for key in keys {
            self.remove(key);
        }
        let fds: Vec<RawFd> = self.handshakes.keys().copied().collect();
        for fd in fds {
            self.drop_handshake(fd);
        }
        self.rx_queue.clear();
        self.queued.clear();
        self.lone_resets.clear();
    }

    /// Handles a well-formed packet from the guest; `payload` holds its
    /// data (the `len` bytes after the header).
    pub fn guest_packet(&mut self, packet: &TxPacket, payload: &[u8]) {
        let header = packet.header;
        let key = header.guest_key();
        let TxKind::Stream(op) = packet.kind else {
            self.send_reset(&header);
            return;
        };
        if let Some(entry) = self.conns.get_mut(&key) {
            entry.conn.guest_packet(&header, op, payload);
            self.sync(key);
            return;
        }
        match op {
            Op::Request => self.guest_connect(&header),
            Op::Rst => {}
            _ => self.send_reset(&header),
        }
    }

    /// Refuses a packet the device could not read whole: its connection,
    /// if any, is reset.
    pub fn refuse(&mut self, header: &PacketHeader) {
        let key = header.guest_key();
        if let Some(entry) = self.conns.get_mut(&key) {
            entry.conn.reset();
            self.sync(key);
        } else {
            self.send_reset(header);
        }
    }

    fn send_reset(&mut self, header: &PacketHeader) {
        let Some(rst) = reset_for(header, self.guest_cid) else {
            return;
        };
        self.metrics.lone_resets += 1;
        self.push_reset(rst);
    }

    fn push_reset(&mut self, rst: PacketHeader) {
        if self.lone_resets.len() >= MAX_PENDING_RESETS {
            self.metrics.dropped_resets += 1;
            return;
        }
        self.lone_resets.push_back(rst);
    }

    fn guest_connect(&mut self, request: &PacketHeader) {
        let key = request.guest_key();
        let path = self.listener.port_path(key.host_port);
        if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
            log::warn!(
                "vsock: too many connections, refusing guest port {}",
                key.guest_port
            );
            self.metrics.refused += 1;
            self.send_reset(request);
            return;
        }
        match connect_nonblocking(&path) {
            Ok(stream) => {
                self.metrics.guest_connects += 1;
                let conn = Connection::guest_initiated(request, stream);
                self.insert(conn, None);
            }
            Err(e) => {
                log::debug!("vsock: guest connection to {}: {e}", path.display());
                self.metrics.refused += 1;
                self.send_reset(request);
            }
        }
    }

    fn insert(&mut self, conn: Connection<UnixStream>, registered: Option<EventSet>) {
        let key = conn.key();
        self.by_fd.insert(conn.stream().as_raw_fd(), key);
        self.conns.insert(key, Entry { conn, registered });
        self.sync(key);
    }

    /// Brings the epoll registration, the RX queue and the timer in line
    /// with what the connection wants; drops it when it is closed.
    fn sync(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.get_mut(&key) else {
            return;
        };
        if entry.conn.state() == State::Resetting {
            // Close the host stream now; the reset waits for an RX buffer
            // on its own, so a guest that gives none cannot keep a host
            // client hanging.
            let mut buf = [0u8; 0];
            if let Some((rst, _)) = entry.conn.next_packet(self.guest_cid, &mut buf) {
                self.push_reset(rst);
            }
            self.remove(key);
            return;
        }
        if entry.conn.is_closed() {
            self.remove(key);
            return;
        }
        let fd = entry.conn.stream().as_raw_fd();
        let (want_in, want_out) = entry.conn.interest();
        let mut wanted = EventSet::empty();
        if want_in {
            wanted |= EventSet::IN;
        }
        if want_out {
            wanted |= EventSet::OUT;
        }
        let result = match (entry.registered, wanted.is_empty()) {
            (None, true) => Ok(()),
            (Some(_), true) => self
                .epoll
                .ctl(ControlOperation::Delete, fd, event(fd, wanted)),
            (None, false) => self.epoll.ctl(ControlOperation::Add, fd, event(fd, wanted)),
            (Some(old), false) if old == wanted => Ok(()),
            (Some(_), false) => self
                .epoll
                .ctl(ControlOperation::Modify, fd, event(fd, wanted)),
        };
        match result {
            Ok(()) => entry.registered = (!wanted.is_empty()).then_some(wanted),
            Err(e) => {
                log::error!("vsock: cannot watch the host stream of {key:?}: {e}");
                entry.conn.reset();
            }
        }
        if entry.conn.has_rx_work() && self.queued.insert(key) {
            self.rx_queue.push_back(key);
        }
        if entry.conn.deadline().is_some() {
            self.arm_timer();
        }
    }

    fn remove(&mut self, key: ConnKey) {
        let Some(entry) = self.conns.remove(&key) else {
            return;
        };
        let fd = entry.conn.stream().as_raw_fd();
        if entry.registered.is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, event(fd, EventSet::empty()));
        }
        self.by_fd.remove(&fd);
        if self.queued.remove(&key) {
            self.rx_queue.retain(|k| *k != key);
        }
        let (to_guest, to_host) = entry.conn.bytes_moved();
        self.metrics.bytes_to_guest += to_guest;
        self.metrics.bytes_to_host += to_host;
        self.metrics.closed += 1;
        // Dropping the entry closes the host stream.
    }

    fn drop_handshake(&mut self, fd: RawFd) {
        if self.handshakes.remove(&fd).is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, event(fd, EventSet::empty()));
        }
    }

    /// Whether packets are waiting for RX buffers.
    pub fn has_rx_work(&self) -> bool {
        !self.lone_resets.is_empty() || !self.rx_queue.is_empty()
    }

    /// The next packet for the guest, with up to `buf.len()` bytes of data
    /// read into `buf` (connections take turns).
    pub fn next_rx_packet(&mut self, buf: &mut [u8]) -> Option<(PacketHeader, usize)> {
        if let Some(rst) = self.lone_resets.pop_front() {
            return Some((rst, 0));
        }
        // Each queued connection gets one chance per call.
        for _ in 0..self.rx_queue.len() {
            let key = self.rx_queue.pop_front()?;
            self.queued.remove(&key);
            let Some(entry) = self.conns.get_mut(&key) else {
                continue;
            };
            let packet = entry.conn.next_packet(self.guest_cid, buf);
            self.sync(key);
            if packet.is_some() {
                return packet;
            }
        }
        None
    }

    /// Handles whatever the host side is ready for: new clients, their
    /// `CONNECT` lines, readable and writable streams, deadlines.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        // Bounded: a flood of host events cannot starve the guest's queues.
        for _ in 0..16 {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("vsock: epoll_wait failed: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let Ok(fd) = RawFd::try_from(ev.data()) else {
                    continue;
                };
                self.host_event(fd, ev.event_set());
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn host_event(&mut self, fd: RawFd, set: EventSet) {
        if fd == self.listener.as_raw_fd() {
            self.accept_clients();
        } else if fd == self.timer.as_raw_fd() {
            // Non-blocking: an error only means the timer did not expire.
            let _ = self.timer.wait();
            self.check_deadlines(Instant::now());
        } else if let Some(h) = self.handshakes.get_mut(&fd) {
            match h.advance() {
                HandshakeStep::Pending => {}
                HandshakeStep::Failed => {
                    self.metrics.refused += 1;
                    self.drop_handshake(fd);
                }
                HandshakeStep::Connect(port) => self.host_connect(fd, port),
            }
        } else if let Some(&key) = self.by_fd.get(&fd) {
            if let Some(entry) = self.conns.get_mut(&key) {
                let broken = set.intersects(EventSet::HANG_UP | EventSet::ERROR);
                if set.contains(EventSet::IN) || broken {
                    entry.conn.host_readable();
                }
                if set.contains(EventSet::OUT) || broken {
                    entry.conn.host_writable();
                }
            }
            self.sync(key);
        }
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok(Some(stream)) => {
                    if self.conns.len() + self.handshakes.len() >= MAX_CONNECTIONS {
                        log::warn!("vsock: too many connections, closing a host client");
                        self.metrics.refused += 1;
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if let Err(e) =
                        self.epoll
                            .ctl(ControlOperation::Add, fd, event(fd, EventSet::IN))
                    {
                        log::error!("vsock: cannot watch a host client: {e}");
                        continue;
                    }
                    self.handshakes
                        .insert(fd, Handshake::new(stream, Instant::now()));
                    self.arm_timer();
                }
                Ok(None) => return,
                Err(e) => {
                    log::warn!("vsock: accepting a host client failed: {e}");
                    return;
                }
            }
        }
    }

    /// A host client finished its line: ask the guest for `guest_port`.
    fn host_connect(&mut self, fd: RawFd, guest_port: u32) {
        let Some(handshake) = self.handshakes.remove(&fd) else {
            return;
        };
        self.metrics.host_connects += 1;
        let key = loop {
            let host_port = self.next_host_port;
            self.next_host_port = host_port.checked_add(1).unwrap_or(FIRST_HOST_PORT);
            let key = ConnKey {
                host_port,
                guest_port,
            };
            if !self.conns.contains_key(&key) {
                break key;
            }
        };
        let conn = Connection::host_initiated(key, handshake.into_stream(), Instant::now());
        // Still registered for reading from the handshake.
        self.insert(conn, Some(EventSet::IN));
    }

    fn check_deadlines(&mut self, now: Instant) {
        let expired: Vec<RawFd> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline() <= now)
            .map(|(fd, _)| *fd)
            .collect();
        for fd in expired {
            log::debug!("vsock: host client sent no CONNECT line in time");
            self.metrics.refused += 1;
            self.drop_handshake(fd);
        }
        let waiting: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, e)| e.conn.deadline().is_some())
            .map(|(k, _)| *k)
            .collect();
        for key in waiting {
            if let Some(entry) = self.conns.get_mut(&key) {
                entry.conn.check_deadline(now);
            }
            self.sync(key);
        }
        let any =
            !self.handshakes.is_empty() || self.conns.values().any(|e| e.conn.deadline().is_some());
        if !any && self.timer_armed {
            self.timer_armed = false;
            if let Err(e) = self.timer.clear() {
                log::error!("vsock: cannot stop the timer: {e}");
            }
        }
    }

    fn arm_timer(&mut self) {
        if self.timer_armed {
            return;
        }
        match self.timer.reset(TIMER_PERIOD, Some(TIMER_PERIOD)) {
            Ok(()) => self.timer_armed = true,
            Err(e) => log::error!("vsock: cannot start the timer: {e}"),
        }
    }
}

fn event(fd: RawFd, set: EventSet) -> EpollEvent {
    EpollEvent::new(set, u64::try_from(fd).unwrap_or(u64::MAX))
}

/// Puts `fd` in non-blocking mode.
fn set_nonblocking(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: F_GETFL on a descriptor we own; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: F_SETFL on a descriptor we own; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    use super::super::connection::BUF_ALLOC;
    use super::super::packet::{parse_tx_packet, HOST_CID, TYPE_STREAM};
    use super::*;

    const CID: u64 = 3;

    struct TempSock(PathBuf);

    impl TempSock {
        fn new(name: &str) -> Self {
            Self(std::env::temp_dir().join(format!("tidevm-mux-{}-{name}", std::process::id())))
        }
    }

    impl Drop for TempSock {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn guest_pkt(op: Op, src_port: u32, dst_port: u32, payload: &[u8]) -> (TxPacket, Vec<u8>) {
        let h = PacketHeader {
            src_cid: CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: u32::try_from(payload.len()).unwrap(),
            type_: TYPE_STREAM,
            op: op.to_wire(),
            flags: 0,
            buf_alloc: 1 << 20,
            fwd_cnt: 0,
        };
        let mut bytes = h.to_bytes().to_vec();
        bytes.extend_from_slice(payload);
        (parse_tx_packet(&bytes, CID).unwrap(), payload.to_vec())
    }

    fn send(m: &mut Muxer, op: Op, src: u32, dst: u32, payload: &[u8]) {
        let (p, data) = guest_pkt(op, src, dst, payload);
        m.guest_packet(&p, &data);
    }

    /// Drains the muxer's packets for the guest.
    fn drain(m: &mut Muxer) -> Vec<(PacketHeader, Vec<u8>)> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; 4096];
        while m.has_rx_work() {
            match m.next_rx_packet(&mut buf) {
                Some((h, n)) => out.push((h, buf[..n].to_vec())),
                None => break,
            }
        }
        out
    }

    fn ops(pkts: &[(PacketHeader, Vec<u8>)]) -> Vec<Op> {
        pkts.iter()
            .map(|(h, _)| Op::from_wire(h.op).unwrap())
            .collect()
    }

    /// Runs host events until `cond` holds (or fails after a second).
    fn pump(m: &mut Muxer, mut cond: impl FnMut(&mut Muxer) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(1);
        while !cond(m) {
            assert!(Instant::now() < deadline, "condition not reached");
            m.process_host_events();
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    #[test]
    fn host_client_connects_exchanges_data_and_closes() {
        let sock = TempSock::new("host");
        let mut m = Muxer::new(CID, &sock.0).unwrap();
        let mut client = UnixStream::connect(&sock.0).unwrap();
        client.write_all(b"CONNECT 52\n").unwrap();
        let mut pkts = Vec::new();
        pump(&mut m, |m| {
            pkts.extend(drain(m));
            !pkts.is_empty()
        });
        let (req, _) = &pkts[0];
        assert_eq!(Op::from_wire(req.op), Some(Op::Request));
        assert_eq!(
            (req.dst_cid, req.dst_port, req.src_port),
            (CID, 52, FIRST_HOST_PORT)
        );
        send(&mut m, Op::Response, 52, FIRST_HOST_PORT, &[]);
        let mut line = [0u8; 14];
        client.read_exact(&mut line).unwrap();
        assert_eq!(&line, b"OK 1073741824\n");
        send(&mut m, Op::Rw, 52, FIRST_HOST_PORT, b"from guest");
        let mut got = [0u8; 10];
        client.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"from guest");
        client.write_all(b"from host").unwrap();
        let mut data = Vec::new();
        pump(&mut m, |m| {
            data.extend(drain(m).into_iter().flat_map(|(_, d)| d));
            data.len() == 9
        });
        assert_eq!(data, b"from host");
        // The host hangs up: SHUTDOWN to the guest, whose full shutdown gets
        // the final reset.
        drop(client);
        let mut pkts = Vec::new();
        pump(&mut m, |m| {
            pkts.extend(drain(m));
            !pkts.is_empty()
        });
        assert_eq!(ops(&pkts), [Op::Shutdown]);
        let (mut p, d) = guest_pkt(Op::Shutdown, 52, FIRST_HOST_PORT, &[]);
        p.header.flags = 3;
        m.guest_packet(&p, &d);
        assert_eq!(ops(&drain(&mut m)), [Op::Rst]);
        assert_eq!(m.connection_count(), 0);
        let metrics = m.metrics();
        assert_eq!((metrics.host_connects, metrics.closed), (1, 1));
        assert_eq!((metrics.bytes_to_guest, metrics.bytes_to_host), (9, 10));
    }

    #[test]
    fn refused_and_unknown_are_answered() {
        let sock = TempSock::new("refused");
        let mut m = Muxer::new(CID, &sock.0).unwrap();
        // Nobody listens at PATH_80.
        send(&mut m, Op::Request, 40000, 80, &[]);
        // Data for a connection that does not exist.
        send(&mut m, Op::Rw, 40001, 81, b"?");
        // A reset for one that does not exist: no answer.
        send(&mut m, Op::Rst, 40002, 82, &[]);
        // An unknown op.
        let (mut p, d) = guest_pkt(Op::Rw, 40003, 83, &[]);
        p.kind = TxKind::Unsupported;
        m.guest_packet(&p, &d);
        let pkts = drain(&mut m);
        assert_eq!(ops(&pkts), [Op::Rst, Op::Rst, Op::Rst]);
        assert_eq!((pkts[0].0.src_port, pkts[0].0.dst_port), (80, 40000));
        assert_eq!(m.metrics().refused, 1);

        // The guest refuses a host client: the client is closed.
        let mut client = UnixStream::connect(&sock.0).unwrap();
        client.write_all(b"CONNECT 9\n").unwrap();
        pump(&mut m, |m| m.has_rx_work());
        let pkts = drain(&mut m);
        let port = pkts[0].0.src_port;
        send(&mut m, Op::Rst, 9, port, &[]);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty(), "closed without an OK");

        // A client with a bad line is closed too.
        let mut bad = UnixStream::connect(&sock.0).unwrap();
        bad.write_all(b"HELLO\n").unwrap();
        pump(&mut m, |m| m.metrics().refused == 2);
        let mut rest = Vec::new();
        bad.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn unanswered_requests_time_out() {
        let sock = TempSock::new("timeout");
        let mut m = Muxer::new(CID, &sock.0).unwrap();
        let mut client = UnixStream::connect(&sock.0).unwrap();
        client.write_all(b"CONNECT 7\n").unwrap();
        pump(&mut m, |m| m.has_rx_work());
        assert_eq!(ops(&drain(&mut m)), [Op::Request]);
        // A silent client and a silent guest: both are given up.
        let _silent = UnixStream::connect(&sock.0).unwrap();
        let started = Instant::now();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(4);
        while !m.has_rx_work() || !m.handshakes.is_empty() {
            assert!(Instant::now() < deadline);
            m.process_host_events();
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(started.elapsed() >= Duration::from_millis(1500));
        assert_eq!(ops(&drain(&mut m)), [Op::Rst]);
        assert_eq!(m.connection_count(), 0);
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn a_guest_without_rx_buffers_cannot_hang_host_clients() {
        let sock = TempSock::new("norx");
        let mut m = Muxer::new(CID, &sock.0).unwrap();
        let mut client = UnixStream::connect(&sock.0).unwrap();
        client.write_all(b"CONNECT 7\n").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        // The request never reaches the guest (no RX buffers are drained).
        let deadline = Instant::now() + Duration::from_secs(4);
        while m.metrics().host_connects == 0 || m.connection_count() > 0 {
            assert!(Instant::now() < deadline, "the client was not given up");
            m.process_host_events();
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut rest = Vec::new();
        client.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        // The guest never heard of it: no reset for it.
        assert!(!m.has_rx_work());
    }

    #[test]
    fn guest_connects_to_a_host_listener() {
        let sock = TempSock::new("guest");
        let mut m = Muxer::new(CID, &sock.0).unwrap();
        let port_path = TempSock(PathBuf::from(format!("{}_1234", sock.0.display())));
        let listener = UnixListener::bind(&port_path.0).unwrap();
        send(&mut m, Op::Request, 50000, 1234, &[]);
        let (mut server, _) = listener.accept().unwrap();
        let pkts = drain(&mut m);
        assert_eq!(ops(&pkts), [Op::Response]);
        assert_eq!(pkts[0].0.buf_alloc, BUF_ALLOC);
        send(&mut m, Op::Rw, 50000, 1234, b"hi host");
        let mut got = [0u8; 7];
        server.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi host");
        // The guest resets: the host sees the stream end.
        send(&mut m, Op::Rst, 50000, 1234, &[]);
        let mut rest = Vec::new();
        server.read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
        assert_eq!(m.connection_count(), 0);
        assert_eq!(m.metrics().guest_connects, 1);
    }

    #[test]
    fn credit_goes_back_to_the_guest_as_soon_as_the_host_reads() {
        let sock = TempSock::new("credit");
        let mut m = Muxer::new(CID, &sock.0).unwrap();
        let port_path = TempSock(PathBuf::from(format!("{}_4321", sock.0.display())));
        let listener = UnixListener::bind(&port_path.0).unwrap();
        send(&mut m, Op::Request, 50000, 4321, &[]);
        let (mut server, _) = listener.accept().unwrap();
        assert_eq!(ops(&drain(&mut m)), [Op::Response]);
        // The guest uses all the credit it was given, and what it is told
        // it got back; the host reads none of it yet, so part of it waits
        // in the device and the guest is out of credit.
        let chunk = vec![3u8; 4096];
        let mut sent = 0u32;
        let mut announced = 0u32;
        loop {
            while sent - announced < BUF_ALLOC {
                send(&mut m, Op::Rw, 50000, 4321, &chunk);
                sent += 4096;
            }
            let updates: Vec<u32> = drain(&mut m)
                .iter()
                .filter(|(h, _)| Op::from_wire(h.op) == Some(Op::CreditUpdate))
                .map(|(h, _)| h.fwd_cnt)
                .collect();
            match updates.last() {
                Some(&fwd_cnt) => announced = fwd_cnt,
                None => break,
            }
        }
        assert!(!m.timer_armed, "no deadline pending: no timer");
        // The host reads everything: the stream turning writable is what
        // gives the guest its credit back, with no timer running.
        let sent = sent as usize;
        let reader = std::thread::spawn(move || {
            let mut buf = vec![0u8; sent];
            server.read_exact(&mut buf).unwrap();
            server
        });
        let mut updates = Vec::new();
        pump(&mut m, |m| {
            updates.extend(
                drain(m)
                    .into_iter()
                    .filter(|(h, _)| Op::from_wire(h.op) == Some(Op::CreditUpdate))
                    .map(|(h, _)| h.fwd_cnt),
            );
            // At least half the buffer is the guest's again.
            updates
                .last()
                .is_some_and(|&fwd| sent - fwd as usize <= BUF_ALLOC as usize / 2)
        });
        assert!(!m.timer_armed);
        // The rest still goes to the host.
        pump(&mut m, |_| reader.is_finished());
        let _server = reader.join().unwrap();
    }

    #[test]
    fn many_connections_take_turns_and_reset_clears_all() {
        let sock = TempSock::new("many");
        let mut m = Muxer::new(CID, &sock.0).unwrap();
        let mut clients = Vec::new();
        for port in 0..20u32 {
            let mut c = UnixStream::connect(&sock.0).unwrap();
            c.write_all(format!("CONNECT {}\n", 100 + port).as_bytes())
                .unwrap();
            clients.push(c);
        }
        let mut reqs = Vec::new();
        pump(&mut m, |m| {
            reqs.extend(drain(m));
            reqs.len() == 20
        });
        for (h, _) in &reqs {
            send(&mut m, Op::Response, h.dst_port, h.src_port, &[]);
        }
        for c in &mut clients {
            let mut line = [0u8; 14];
            c.read_exact(&mut line).unwrap();
            c.write_all(&[0xaa; 10_000]).unwrap();
        }
        // Every connection gets a turn before any gets a second one.
        let mut first = Vec::new();
        pump(&mut m, |m| {
            first.extend(drain(m).into_iter().map(|(h, _)| h.src_port));
            first.len() >= 40
        });
        let distinct: HashSet<u32> = first[..20].iter().copied().collect();
        assert_eq!(distinct.len(), 20);
        m.reset();
        assert_eq!(m.connection_count(), 0);
        for c in &mut clients {
            c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).unwrap();
        }
    }

    #[test]
    fn pending_resets_are_capped() {
        let sock = TempSock::new("cap");
        let mut m = Muxer::new(CID, &sock.0).unwrap();
        for port in 0..(u32::try_from(MAX_PENDING_RESETS).unwrap() + 10) {
            send(&mut m, Op::Rw, port, 1, b"x");
        }
        assert_eq!(m.metrics().dropped_resets, 10);
        assert_eq!(drain(&mut m).len(), MAX_PENDING_RESETS);
    }
}
