//! Guest memory and split virtqueues built from fuzz bytes.
//!
//! Guest RAM is three small regions: two adjacent ones and one after a
//! hole, so that region boundaries and addresses outside RAM are both
//! within reach. Queue `q` keeps its descriptor table, available ring and
//! used ring at fixed addresses ([`RingLayout::of`]); everything in them
//! (descriptors, ring entries, indices, flags) and any other guest byte
//! comes from the input, as a hostile driver would write it.
//!
//! [`Snapshot`] and [`WriteScope`] check the "no out-of-bounds guest
//! access" invariant: after a device processed a queue, every guest byte it
//! changed must lie in its used ring or in a buffer the driver marked
//! device-writable.

use std::ops::Range;

use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::input::{Bytes, Seed};

/// Guest RAM: `(start, size)` of each region.
pub const REGIONS: [(u64, u64); 3] = [(0, 0x1_0000), (0x1_0000, 0x1_0000), (0x4_0000, 0x8000)];
/// Addresses below this are "near" (RAM, the hole, and just past RAM).
pub const ADDR_SPAN: u64 = 0x5_0000;
/// Room for the rings of one queue.
pub const RING_STRIDE: u64 = 0x3000;
/// Most queues a target sets up (the balloon's four).
pub const MAX_QUEUES: u64 = 4;
/// First guest byte after the rings of every queue: where seeds put data.
pub const DATA_START: u64 = RING_STRIDE * MAX_QUEUES;

const DESC_SIZE: u64 = 16;

/// Fresh guest memory (zeroed).
pub fn memory() -> GuestMemoryMmap {
    let ranges: Vec<(GuestAddress, usize)> = REGIONS
        .iter()
        .map(|&(start, len)| (GuestAddress(start), usize::try_from(len).unwrap_or(0)))
        .collect();
    GuestMemoryMmap::from_ranges(&ranges).expect("guest memory")
}

/// Reads a guest address: usually one near guest RAM, sometimes any `u64`.
pub fn addr(b: &mut Bytes) -> u64 {
    if b.u8() & 1 == 0 {
        u64::from(b.u32()) % ADDR_SPAN
    } else {
        b.u64()
    }
}

/// Writes `a` (below [`ADDR_SPAN`]) as [`addr`] reads it.
pub fn seed_addr(s: &mut Seed, a: u64) {
    s.u8(0).u32(u32::try_from(a).expect("near address"));
}

/// Writes `data` at `addr`, clipped to guest RAM (a guest writes only RAM).
pub fn fill(mem: &GuestMemoryMmap, addr: u64, data: &[u8]) {
    let end = addr.saturating_add(data.len() as u64);
    for &(start, len) in &REGIONS {
        let (s, e) = (addr.max(start), end.min(start + len));
        if s < e {
            let part = &data[(s - addr) as usize..(e - addr) as usize];
            mem.write_slice(part, GuestAddress(s)).expect("inside RAM");
        }
    }
}

/// Where the rings of one queue live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingLayout {
    /// Descriptor table.
    pub desc: u64,
    /// Available (driver) ring.
    pub avail: u64,
    /// Used (device) ring.
    pub used: u64,
}

impl RingLayout {
    /// The rings of queue `q`.
    pub fn of(q: usize) -> Self {
        let base = q as u64 * RING_STRIDE;
        Self {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        }
    }

    /// Bytes of the used ring of a queue of `size` (with `avail_event`).
    pub fn used_range(&self, size: u16) -> Range<u64> {
        self.used..self.used + 6 + 8 * u64::from(size)
    }

    /// The used ring's `idx`.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap_or(0)
    }

    /// Used element `i` (`id`, `len`).
    pub fn used_elem(&self, mem: &GuestMemoryMmap, size: u16, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % size.max(1));
        let id = mem.read_obj(GuestAddress(at)).unwrap_or(0);
        let len = mem.read_obj(GuestAddress(at + 4)).unwrap_or(0);
        (id, len)
    }
}

/// One raw descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `VRING_DESC_F_*` bits, any value.
    pub flags: u16,
    /// Next descriptor index.
    pub next: u16,
}

impl Desc {
    /// A descriptor for `len` bytes at `addr`, device-writable if `write`,
    /// chained to `next` if given.
    pub fn new(addr: u64, len: u32, write: bool, next: Option<u16>) -> Self {
        let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
        if next.is_some() {
            flags |= virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16;
        }
        Self {
            addr,
            len,
            flags,
            next: next.unwrap_or(0),
        }
    }
}

/// A queue as a driver left it in guest memory.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Virtq {
    /// log2 of the queue size, before clamping to the device maximum.
    pub size_log2: u8,
    /// Negotiate `VIRTIO_RING_F_EVENT_IDX`.
    pub event_idx: bool,
    /// Descriptor table entries, from index 0.
    pub descs: Vec<Desc>,
    /// Available ring entries (heads).
    pub avail: Vec<u16>,
    /// `avail->idx`; `None` means the number of entries.
    pub avail_idx: Option<u16>,
    /// `avail->flags` (e.g. NO_INTERRUPT).
    pub avail_flags: u16,
    /// Guest bytes written after the rings (payloads; may overwrite rings).
    pub fills: Vec<(u64, Vec<u8>)>,
}

impl Virtq {
    /// Decodes a queue description.
    pub fn decode(b: &mut Bytes) -> Self {
        let size_log2 = b.u8();
        let flags = b.u8();
        let ndesc = b.u8();
        let descs = (0..ndesc)
            .map(|_| Desc {
                addr: addr(b),
                len: b.u32(),
                flags: b.u16(),
                next: b.u16(),
            })
            .collect();
        let navail = b.u8();
        let avail = (0..navail).map(|_| b.u16()).collect();
        let avail_idx = (flags & 2 != 0).then(|| b.u16());
        let avail_flags = if flags & 4 != 0 { b.u16() } else { 0 };
        let nfills = b.u8() % 8;
        let fills = (0..nfills).map(|_| (addr(b), b.blob().to_vec())).collect();
        Self {
            size_log2,
            event_idx: flags & 1 != 0,
            descs,
            avail,
            avail_idx,
            avail_flags,
            fills,
        }
    }

    /// Encodes `self` as [`Virtq::decode`] reads it (addresses near RAM).
    pub fn encode(&self, s: &mut Seed) {
        let flags = u8::from(self.event_idx)
            | if self.avail_idx.is_some() { 2 } else { 0 }
            | if self.avail_flags != 0 { 4 } else { 0 };
        s.u8(self.size_log2)
            .u8(flags)
            .u8(u8::try_from(self.descs.len()).expect("descs"));
        for d in &self.descs {
            seed_addr(s, d.addr);
            s.u32(d.len).u16(d.flags).u16(d.next);
        }
        s.u8(u8::try_from(self.avail.len()).expect("avail"));
        for &head in &self.avail {
            s.u16(head);
        }
        if let Some(idx) = self.avail_idx {
            s.u16(idx);
        }
        if self.avail_flags != 0 {
            s.u16(self.avail_flags);
        }
        s.u8(u8::try_from(self.fills.len()).expect("fills"));
        for (a, data) in &self.fills {
            seed_addr(s, *a);
            s.blob(data);
        }
    }

    /// The queue size for a device queue of at most `max` entries.
    pub fn size(&self, max: u16) -> u16 {
        let max_log2 = 15 - max.leading_zeros() as u8;
        1 << (self.size_log2 % (max_log2 + 1))
    }

    /// Writes the rings of queue `q` (of `size` entries) and the fills.
    pub fn install(&self, mem: &GuestMemoryMmap, q: usize, size: u16) {
        let l = RingLayout::of(q);
        for (i, d) in self.descs.iter().take(usize::from(size)).enumerate() {
            let at = l.desc + DESC_SIZE * i as u64;
            let mut raw = [0u8; 16];
            raw[0..8].copy_from_slice(&d.addr.to_le_bytes());
            raw[8..12].copy_from_slice(&d.len.to_le_bytes());
            raw[12..14].copy_from_slice(&d.flags.to_le_bytes());
            raw[14..16].copy_from_slice(&d.next.to_le_bytes());
            fill(mem, at, &raw);
        }
        let idx = self
            .avail_idx
            .unwrap_or(u16::try_from(self.avail.len()).unwrap_or(u16::MAX));
        fill(mem, l.avail, &self.avail_flags.to_le_bytes());
        fill(mem, l.avail + 2, &idx.to_le_bytes());
        for (i, head) in self.avail.iter().take(usize::from(size)).enumerate() {
            fill(mem, l.avail + 4 + 2 * i as u64, &head.to_le_bytes());
        }
        for (a, data) in &self.fills {
            fill(mem, *a, data);
        }
    }

    /// A ready queue of `size` entries at the rings of queue `q`.
    pub fn queue(&self, q: usize, max: u16, size: u16) -> Queue {
        ready_queue(q, max, size, self.event_idx)
    }
}

/// A ready queue of `size` entries (device maximum `max`) over the rings
/// of queue `q`, as the transport hands it to a device.
pub fn ready_queue(q: usize, max: u16, size: u16, event_idx: bool) -> Queue {
    let l = RingLayout::of(q);
    let mut queue = Queue::new(max).expect("queue");
    queue.try_set_size(size).expect("queue size");
    queue
        .try_set_desc_table_address(GuestAddress(l.desc))
        .expect("desc table");
    queue
        .try_set_avail_ring_address(GuestAddress(l.avail))
        .expect("avail ring");
    queue
        .try_set_used_ring_address(GuestAddress(l.used))
        .expect("used ring");
    queue.set_event_idx(event_idx);
    queue.set_ready(true);
    queue
}

/// A copy of guest RAM.
#[derive(Debug, Clone)]
pub struct Snapshot {
    regions: Vec<(u64, Vec<u8>)>,
}

impl Snapshot {
    /// Copies every region.
    pub fn take(mem: &GuestMemoryMmap) -> Self {
        let regions = mem
            .iter()
            .map(|r| {
                let start = r.start_addr().0;
                let mut bytes = vec![0u8; usize::try_from(r.len()).unwrap_or(0)];
                mem.read_slice(&mut bytes, GuestAddress(start))
                    .expect("region read");
                (start, bytes)
            })
            .collect();
        Self { regions }
    }

    /// The byte at `addr`, if it is RAM.
    pub fn byte(&self, addr: u64) -> Option<u8> {
        self.regions.iter().find_map(|(start, bytes)| {
            let off = usize::try_from(addr.checked_sub(*start)?).ok()?;
            bytes.get(off).copied()
        })
    }

    /// Entry `i` of the available ring of queue `q` (size `size`).
    pub fn avail_entry(&self, q: usize, size: u16, i: u16) -> u16 {
        let at = RingLayout::of(q).avail + 4 + 2 * u64::from(i % size.max(1));
        self.read_u64(at, 2).map_or(0, |v| v as u16)
    }

    /// `len` bytes at `addr`, if they lie in one region.
    fn slice(&self, addr: u64, len: usize) -> Option<&[u8]> {
        self.regions.iter().find_map(|(start, bytes)| {
            let off = usize::try_from(addr.checked_sub(*start)?).ok()?;
            bytes.get(off..off.checked_add(len)?)
        })
    }

    fn read_u64(&self, addr: u64, len: u64) -> Option<u64> {
        let mut v = [0u8; 8];
        let len = usize::try_from(len).ok()?;
        v.get_mut(..len)?.copy_from_slice(self.slice(addr, len)?);
        Some(u64::from_le_bytes(v))
    }

    fn desc(&self, at: u64) -> Option<Desc> {
        let raw = self.slice(at, 16)?;
        let le = |r: std::ops::Range<usize>| {
            let mut v = [0u8; 8];
            v[..r.len()].copy_from_slice(&raw[r]);
            u64::from_le_bytes(v)
        };
        Some(Desc {
            addr: le(0..8),
            len: le(8..12) as u32,
            flags: le(12..14) as u16,
            next: le(14..16) as u16,
        })
    }

    /// Addresses whose byte differs in `after`, with the new value, merged
    /// into ranges.
    pub fn changes(&self, after: &Snapshot) -> Vec<(Range<u64>, Vec<u8>)> {
        const CHUNK: usize = 256;
        let mut out: Vec<(Range<u64>, Vec<u8>)> = Vec::new();
        for ((start, old), (_, new)) in self.regions.iter().zip(&after.regions) {
            if old == new {
                continue;
            }
            for (c, (oc, nc)) in old.chunks(CHUNK).zip(new.chunks(CHUNK)).enumerate() {
                if oc == nc {
                    continue;
                }
                for (i, (o, n)) in oc.iter().zip(nc).enumerate() {
                    if o == n {
                        continue;
                    }
                    let a = start + (c * CHUNK + i) as u64;
                    match out.last_mut() {
                        Some((r, bytes)) if r.end == a => {
                            r.end += 1;
                            bytes.push(*n);
                        }
                        _ => out.push((a..a + 1, vec![*n])),
                    }
                }
            }
        }
        out
    }
}

fn overlaps(a: &Range<u64>, b: &Range<u64>) -> bool {
    a.start < b.end && b.start < a.end
}

/// Where a device may write while processing queues: their used rings and
/// every buffer a descriptor (direct or indirect) marks device-writable.
#[derive(Debug, Clone, Default)]
pub struct WriteScope {
    allowed: Vec<Range<u64>>,
    /// A writable buffer overlaps the rings or an indirect table: the
    /// device may legitimately rewrite descriptors as it goes, so the scope
    /// cannot be computed up front and is not checked.
    pub self_modifying: bool,
}

impl WriteScope {
    /// The scope of queues `(q, size)` in the memory `snap`.
    pub fn of(snap: &Snapshot, queues: &[(usize, u16)]) -> Self {
        let mut metadata = Vec::new();
        let mut scope = WriteScope::default();
        for &(q, size) in queues {
            let l = RingLayout::of(q);
            let n = u64::from(size);
            metadata.push(l.desc..l.desc + DESC_SIZE * n);
            metadata.push(l.avail..l.avail + 6 + 2 * n);
            metadata.push(l.used_range(size));
            scope.allowed.push(l.used_range(size));
            for i in 0..n {
                let Some(d) = snap.desc(l.desc + DESC_SIZE * i) else {
                    continue;
                };
                scope.add(&d);
                if u32::from(d.flags) & VRING_DESC_F_INDIRECT != 0 {
                    let entries = u64::from(d.len) / DESC_SIZE;
                    metadata.push(d.addr..d.addr.saturating_add(u64::from(d.len)));
                    for j in 0..entries.min(u64::from(u16::MAX) + 1) {
                        let Some(e) = d.addr.checked_add(DESC_SIZE * j).and_then(|a| snap.desc(a))
                        else {
                            break;
                        };
                        scope.add(&e);
                    }
                }
            }
        }
        scope.self_modifying = scope
            .allowed
            .iter()
            .skip(queues.len())
            .any(|w| metadata.iter().any(|m| overlaps(w, m)));
        scope
    }

    fn add(&mut self, d: &Desc) {
        if u32::from(d.flags) & VRING_DESC_F_WRITE != 0 && d.len > 0 {
            let end = d.addr.saturating_add(u64::from(d.len));
            self.allowed.push(d.addr..end);
        }
    }

    /// Whether `r` lies inside the allowed ranges.
    pub fn allows(&self, r: &Range<u64>) -> bool {
        (r.start..r.end).all(|a| self.allowed.iter().any(|w| w.contains(&a)))
    }

    /// Panics if a change between `before` and `after` is out of scope.
    pub fn check(&self, before: &Snapshot, after: &Snapshot, who: &str) {
        if self.self_modifying {
            return;
        }
        for (r, _) in before.changes(after) {
            assert!(
                self.allows(&r),
                "{who} wrote guest memory {:#x}..{:#x} outside its used ring and device-writable buffers",
                r.start,
                r.end
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn virtq_round_trip() {
        let q = Virtq {
            size_log2: 3,
            event_idx: true,
            descs: vec![Desc::new(DATA_START, 24, false, Some(1))],
            avail: vec![0, 1],
            avail_idx: Some(7),
            avail_flags: 1,
            fills: vec![(DATA_START, vec![1, 2, 3])],
        };
        let mut s = Seed::new();
        q.encode(&mut s);
        let bytes = s.finish();
        assert_eq!(Virtq::decode(&mut Bytes::new(&bytes)), q);
        assert_eq!(q.size(128), 8);
        assert_eq!(q.size(1), 1);
    }

    #[test]
    fn write_scope_finds_writable_buffers() {
        let mem = memory();
        let q = Virtq {
            size_log2: 1,
            descs: vec![
                Desc::new(DATA_START, 24, false, Some(1)),
                Desc::new(DATA_START + 0x100, 10, true, None),
            ],
            avail: vec![0],
            ..Virtq::default()
        };
        q.install(&mem, 0, 2);
        let snap = Snapshot::take(&mem);
        let scope = WriteScope::of(&snap, &[(0, 2)]);
        assert!(!scope.self_modifying);
        assert!(scope.allows(&(DATA_START + 0x100..DATA_START + 0x10a)));
        assert!(!scope.allows(&(DATA_START..DATA_START + 1)));
        assert!(scope.allows(&RingLayout::of(0).used_range(2)));
    }
}
