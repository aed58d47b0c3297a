//! VMBus ring buffers (Linux `include/linux/hyperv.h: struct hv_ring_buffer`,
//! `drivers/hv/ring_buffer.c`).
//!
//! An open channel has two rings in its GPADL: pages `[0, K)` carry guest →
//! host packets ([`IncomingRing`], the host reads), pages `[K, N)` host →
//! guest packets ([`OutgoingRing`], the host writes). Each ring is a control
//! page then `pages - 1` data pages:
//!
//! | offset | field | written by |
//! |---|---|---|
//! | 0 | `u32 write_index` | producer |
//! | 4 | `u32 read_index` | consumer |
//! | 8 | `u32 interrupt_mask` | consumer: "don't signal me" |
//! | 12 | `u32 pending_send_sz` | producer: "signal me when this many bytes are free" |
//! | 64 | `u32 feature_bits` (bit 0: pending_send_sz supported) | |
//!
//! Indices are byte offsets into the data area. A packet is a 16-byte
//! descriptor (`u16 type`, `u16 offset8`, `u16 len8`, `u16 flags`,
//! `u64 trans_id`; offsets and lengths in 8-byte units, `len8` counting the
//! descriptor), the payload from `offset8 * 8`, zero padding to `len8 * 8`,
//! then an 8-byte trailer (`write_index << 32` of the packet's start). Packets
//! wrap around the end of the data area. Equal indices mean empty; a writer
//! leaves at least one byte free.
//!
//! Every index and descriptor comes from guest memory and is checked before
//! use; the rings keep their own copy of the index they own. Errors mean the
//! guest broke the ring: the caller should stop using the channel.
//!
//! ```
//! use devices::hyperv::vmbus::ring::{IncomingRing, OutgoingRing, PacketType, WriteOutcome};
//! use devices::hyperv::vmbus::ring_memory::BufferRingMemory;
//!
//! // A 5-page ring (16 KiB of data), written by one side and read by the other.
//! let memory = BufferRingMemory::new(5);
//! let mut writer = OutgoingRing::open(&memory)?;
//! let outcome = writer.write_packet(&memory, PacketType::DataInband, 0, 1, b"hello")?;
//! assert_eq!(outcome, WriteOutcome::Written { signal_guest: true });
//! let mut reader = IncomingRing::open(&memory)?;
//! let packet = reader.read_packet(&memory)?.expect("one packet");
//! assert_eq!(&packet.payload[..5], b"hello");
//! assert!(reader.read_packet(&memory)?.is_none());
//! reader.commit_read(&memory)?;
//! # Ok::<(), devices::hyperv::vmbus::ring::RingError>(())
//! ```

use std::fmt;
use std::sync::atomic::{fence, Ordering};

use super::ring_memory::{RingMemory, RingMemoryError};
use super::HV_PAGE_SIZE;

const WRITE_INDEX: u64 = 0;
const READ_INDEX: u64 = 4;
const INTERRUPT_MASK: u64 = 8;
const PENDING_SEND_SIZE: u64 = 12;
const FEATURE_BITS: u64 = 64;
const DATA_START: u64 = HV_PAGE_SIZE;

/// `feature_bits` bit 0: the ring's producer sets `pending_send_sz` when it
/// finds the ring full, and its consumer signals when enough is free.
pub const FEATURE_PENDING_SEND_SIZE: u32 = 1;
/// Size of a packet descriptor.
pub const PACKET_DESCRIPTOR_SIZE: u32 = 16;
/// Size of the trailer after each packet.
pub const PACKET_TRAILER_SIZE: u32 = 8;
/// Descriptor flag: the sender wants a completion packet.
pub const PACKET_FLAG_COMPLETION_REQUESTED: u16 = 1;
/// Largest data area accepted (1 GiB), so index arithmetic stays in `u32`.
pub const MAX_RING_DATA_SIZE: u32 = 1 << 30;

/// Packet types (`enum vmbus_packet_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u16)]
pub enum PacketType {
    /// `VM_PKT_SYNCH`.
    Synch = 1,
    /// `VM_PKT_ADD_XFER_PAGESET`.
    AddTransferPageSet = 2,
    /// `VM_PKT_RM_XFER_PAGESET`.
    RemoveTransferPageSet = 3,
    /// `VM_PKT_ESTABLISH_GPADL`.
    EstablishGpadl = 4,
    /// `VM_PKT_TEARDOWN_GPADL`.
    TeardownGpadl = 5,
    /// `VM_PKT_DATA_INBAND`: the payload is in the packet (all DM traffic).
    DataInband = 6,
    /// `VM_PKT_DATA_USING_XFER_PAGES`.
    DataUsingTransferPages = 7,
    /// `VM_PKT_DATA_USING_GPADL`.
    DataUsingGpadl = 8,
    /// `VM_PKT_DATA_USING_GPA_DIRECT`.
    DataUsingGpaDirect = 9,
    /// `VM_PKT_CANCEL_REQUEST`.
    CancelRequest = 10,
    /// `VM_PKT_COMP`: a completion.
    Completion = 11,
    /// `VM_PKT_DATA_USING_ADDITIONAL_PKT`.
    DataUsingAdditionalPacket = 12,
    /// `VM_PKT_ADDITIONAL_DATA`.
    AdditionalData = 13,
}

impl TryFrom<u16> for PacketType {
    type Error = RingError;

    fn try_from(value: u16) -> Result<Self, RingError> {
        Ok(match value {
            1 => Self::Synch,
            2 => Self::AddTransferPageSet,
            3 => Self::RemoveTransferPageSet,
            4 => Self::EstablishGpadl,
            5 => Self::TeardownGpadl,
            6 => Self::DataInband,
            7 => Self::DataUsingTransferPages,
            8 => Self::DataUsingGpadl,
            9 => Self::DataUsingGpaDirect,
            10 => Self::CancelRequest,
            11 => Self::Completion,
            12 => Self::DataUsingAdditionalPacket,
            13 => Self::AdditionalData,
            _ => return Err(RingError::UnknownPacketType(value)),
        })
    }
}

/// Which ring index a [`RingError::BadIndex`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RingIndex {
    /// `write_index`.
    Write,
    /// `read_index`.
    Read,
}

impl fmt::Display for RingIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Write => "write",
            Self::Read => "read",
        })
    }
}

/// A ring the guest broke, or memory the ring cannot reach.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// Ring memory could not be accessed.
    #[error(transparent)]
    Memory(#[from] RingMemoryError),
    /// The ring is not a control page plus at least one data page.
    #[error("a ring of {0} bytes is not a control page plus 1 to 262144 data pages")]
    BadRingSize(u64),
    /// An index outside the data area or not 8-aligned.
    #[error(
        "{index} index {value:#x} is not an 8-aligned offset below the data size {data_size:#x}"
    )]
    BadIndex {
        /// Which index.
        index: RingIndex,
        /// Its value.
        value: u32,
        /// Size of the data area.
        data_size: u32,
    },
    /// Fewer bytes published than the smallest packet.
    #[error("{0} bytes published: too few for a packet")]
    Truncated(u32),
    /// A descriptor whose lengths do not fit.
    #[error(
        "descriptor offset8 {offset8} len8 {len8} does not fit the {available} bytes published"
    )]
    BadDescriptor {
        /// Payload offset in 8-byte units.
        offset8: u16,
        /// Packet length in 8-byte units.
        len8: u16,
        /// Bytes published in the ring.
        available: u32,
    },
    /// A packet type no VMBus version defines.
    #[error("unknown packet type {0}")]
    UnknownPacketType(u16),
    /// Descriptor flags other than "completion requested".
    #[error("unknown packet flags {0:#x}")]
    UnknownFlags(u16),
    /// A host packet that could never fit the ring.
    #[error("a {size}-byte packet can never fit a ring of {data_size} data bytes")]
    PacketTooLarge {
        /// Packet size with descriptor, padding and trailer.
        size: u64,
        /// Size of the data area.
        data_size: u32,
    },
}

/// A packet read from the guest → host ring.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RingPacket {
    /// Its type.
    pub packet_type: PacketType,
    /// Its flags ([`PACKET_FLAG_COMPLETION_REQUESTED`] or 0).
    pub flags: u16,
    /// The guest's transaction id.
    pub transaction_id: u64,
    /// Bytes from `offset8 * 8` to `len8 * 8` (padding included). Bytes
    /// between the descriptor and `offset8 * 8` (headers of non-inband
    /// packets) are not kept.
    pub payload: Vec<u8>,
}

/// Size of the data area of a ring in `memory`.
fn data_size_of<M: RingMemory + ?Sized>(memory: &M) -> Result<u32, RingError> {
    let ring_size = memory.ring_size();
    let data_size = ring_size
        .checked_sub(DATA_START)
        .filter(|&size| size > 0 && ring_size.is_multiple_of(HV_PAGE_SIZE))
        .and_then(|size| u32::try_from(size).ok())
        .filter(|&size| size <= MAX_RING_DATA_SIZE);
    data_size.ok_or(RingError::BadRingSize(ring_size))
}

fn check_index(index: RingIndex, value: u32, data_size: u32) -> Result<u32, RingError> {
    if value >= data_size || !value.is_multiple_of(8) {
        return Err(RingError::BadIndex {
            index,
            value,
            data_size,
        });
    }
    Ok(value)
}

/// Bytes from `from` to `to` going forward around a data area of `size`.
fn distance(from: u32, to: u32, size: u32) -> u32 {
    if to >= from {
        to - from
    } else {
        size - from + to
    }
}

/// `(position + len) % size` for `position < size`, `len <= size`.
fn advance(position: u32, len: u32, size: u32) -> u32 {
    let end = u64::from(position) + u64::from(len);
    u32::try_from(end % u64::from(size)).unwrap_or(0)
}

/// Reads `buf.len()` (at most `size`) data bytes from `start`, wrapping.
fn read_data<M: RingMemory + ?Sized>(
    memory: &M,
    size: u32,
    start: u32,
    buf: &mut [u8],
) -> Result<(), RingError> {
    let until_end = usize::try_from(size - start).unwrap_or(usize::MAX);
    let (first, second) = buf.split_at_mut(until_end.min(buf.len()));
    memory.read_at(DATA_START + u64::from(start), first)?;
    memory.read_at(DATA_START, second)?;
    Ok(())
}

/// Writes `data` (at most `size` bytes) to the data area from `start`,
/// wrapping.
fn write_data<M: RingMemory + ?Sized>(
    memory: &M,
    size: u32,
    start: u32,
    data: &[u8],
) -> Result<(), RingError> {
    let until_end = usize::try_from(size - start).unwrap_or(usize::MAX);
    let (first, second) = data.split_at(until_end.min(data.len()));
    memory.write_at(DATA_START + u64::from(start), first)?;
    memory.write_at(DATA_START, second)?;
    Ok(())
}

/// The guest → host ring: the guest writes packets, the host reads them.
///
/// Linux signals the host only when this ring goes from empty to non-empty
/// (and `interrupt_mask` is 0), so after a signal the host must read until
/// [`IncomingRing::read_packet`] returns `None`, or it will never hear from
/// the guest again.
#[derive(Debug)]
pub struct IncomingRing {
    data_size: u32,
    /// Where the next packet starts (host's copy, ahead of the published one).
    read_index: u32,
    /// The read index last written to the control page.
    published_read_index: u32,
}

impl IncomingRing {
    /// Takes over the ring in `memory` (Linux zeroes both indices at open).
    pub fn open<M: RingMemory + ?Sized>(memory: &M) -> Result<Self, RingError> {
        let data_size = data_size_of(memory)?;
        let read_index = check_index(RingIndex::Read, memory.read_u32(READ_INDEX)?, data_size)?;
        check_index(RingIndex::Write, memory.read_u32(WRITE_INDEX)?, data_size)?;
        Ok(Self {
            data_size,
            read_index,
            published_read_index: read_index,
        })
    }

    /// Size of the data area in bytes.
    pub fn data_size(&self) -> u32 {
        self.data_size
    }

    /// Bytes the guest has published and the host not read yet.
    pub fn bytes_available<M: RingMemory + ?Sized>(&self, memory: &M) -> Result<u32, RingError> {
        let write_index = memory.read_u32(WRITE_INDEX)?;
        let write_index = check_index(RingIndex::Write, write_index, self.data_size)?;
        Ok(distance(self.read_index, write_index, self.data_size))
    }

    /// Copies the next packet out of the ring, or `None` if it is empty.
    /// The space is handed back to the guest by [`IncomingRing::commit_read`].
    /// On error nothing is consumed.
    pub fn read_packet<M: RingMemory + ?Sized>(
        &mut self,
        memory: &M,
    ) -> Result<Option<RingPacket>, RingError> {
        let available = self.bytes_available(memory)?;
        if available == 0 {
            return Ok(None);
        }
        // The index was read before the data: don't let the data reads move up.
        fence(Ordering::Acquire);
        if available < PACKET_DESCRIPTOR_SIZE + PACKET_TRAILER_SIZE {
            return Err(RingError::Truncated(available));
        }
        // The descriptor is copied once; the guest may change the ring under us.
        let mut descriptor = [0u8; 16];
        read_data(memory, self.data_size, self.read_index, &mut descriptor)?;
        let [t0, t1, o0, o1, l0, l1, f0, f1, id @ ..] = descriptor;
        let offset8 = u16::from_le_bytes([o0, o1]);
        let len8 = u16::from_le_bytes([l0, l1]);
        let packet_len = u32::from(len8) * 8;
        let data_offset = u32::from(offset8) * 8;
        if data_offset < PACKET_DESCRIPTOR_SIZE
            || data_offset > packet_len
            || packet_len + PACKET_TRAILER_SIZE > available
        {
            return Err(RingError::BadDescriptor {
                offset8,
                len8,
                available,
            });
        }
        let packet_type = PacketType::try_from(u16::from_le_bytes([t0, t1]))?;
        let flags = u16::from_le_bytes([f0, f1]);
        if flags & !PACKET_FLAG_COMPLETION_REQUESTED != 0 {
            return Err(RingError::UnknownFlags(flags));
        }
        let payload_len = usize::try_from(packet_len - data_offset).unwrap_or(0);
        let mut payload = vec![0u8; payload_len];
        let payload_start = advance(self.read_index, data_offset, self.data_size);
        read_data(memory, self.data_size, payload_start, &mut payload)?;
        self.read_index = advance(
            self.read_index,
            packet_len + PACKET_TRAILER_SIZE,
            self.data_size,
        );
        Ok(Some(RingPacket {
            packet_type,
            flags,
            transaction_id: u64::from_le_bytes(id),
            payload,
        }))
    }

    /// Publishes the read index (frees what was read) and tells whether the
    /// guest must be signalled: it asked, with `pending_send_sz`, to hear
    /// when that many bytes are free, and this read made it so.
    pub fn commit_read<M: RingMemory + ?Sized>(&mut self, memory: &M) -> Result<bool, RingError> {
        if self.read_index == self.published_read_index {
            return Ok(false);
        }
        // All packet reads are done before the guest may reuse the space.
        fence(Ordering::SeqCst);
        memory.write_u32(READ_INDEX, self.read_index)?;
        let bytes_read = distance(self.published_read_index, self.read_index, self.data_size);
        self.published_read_index = self.read_index;
        // Publish the index before reading pending_send_sz (the guest sets
        // pending_send_sz, then re-reads the read index).
        fence(Ordering::SeqCst);
        let pending_send_size = memory.read_u32(PENDING_SEND_SIZE)?;
        if pending_send_size == 0 {
            return Ok(false);
        }
        let free_now = self.data_size - self.bytes_available(memory)?;
        let free_before = free_now.saturating_sub(bytes_read);
        Ok(free_before <= pending_send_size && free_now > pending_send_size)
    }

    /// Sets the consumer's `interrupt_mask`: while set, the guest does not
    /// signal new packets. After clearing it, check the ring again.
    pub fn set_interrupt_mask<M: RingMemory + ?Sized>(
        &self,
        memory: &M,
        masked: bool,
    ) -> Result<(), RingError> {
        memory.write_u32(INTERRUPT_MASK, u32::from(masked))?;
        fence(Ordering::SeqCst);
        Ok(())
    }
}

/// Result of [`OutgoingRing::write_packet`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOutcome {
    /// The packet is in the ring and published.
    Written {
        /// The guest must be signalled: the ring was empty before this packet
        /// and the guest's `interrupt_mask` is clear.
        signal_guest: bool,
    },
    /// No room: `pending_send_sz` now asks the guest to signal when
    /// `bytes_needed` bytes are free; write again then.
    Full {
        /// Bytes the packet needs, trailer included.
        bytes_needed: u32,
    },
}

/// The host → guest ring: the host writes packets, the guest reads them.
#[derive(Debug)]
pub struct OutgoingRing {
    data_size: u32,
    /// Where the next packet goes (the host's copy; the guest cannot move it).
    write_index: u32,
    /// Whether the host left a request in `pending_send_sz`.
    pending_send_size_set: bool,
}

impl OutgoingRing {
    /// Takes over the ring in `memory` and sets its feature bit: the host
    /// uses `pending_send_sz` when the ring is full.
    pub fn open<M: RingMemory + ?Sized>(memory: &M) -> Result<Self, RingError> {
        let data_size = data_size_of(memory)?;
        let write_index = check_index(RingIndex::Write, memory.read_u32(WRITE_INDEX)?, data_size)?;
        check_index(RingIndex::Read, memory.read_u32(READ_INDEX)?, data_size)?;
        let features = memory.read_u32(FEATURE_BITS)?;
        memory.write_u32(FEATURE_BITS, features | FEATURE_PENDING_SEND_SIZE)?;
        Ok(Self {
            data_size,
            write_index,
            pending_send_size_set: false,
        })
    }

    /// Size of the data area in bytes.
    pub fn data_size(&self) -> u32 {
        self.data_size
    }

    /// Bytes a packet with `payload_len` payload bytes takes in the ring:
    /// descriptor, payload padded to 8, trailer. `None` if `len8` cannot
    /// express it.
    pub fn packet_size(payload_len: usize) -> Option<u32> {
        let padded = u32::try_from(payload_len)
            .ok()?
            .checked_next_multiple_of(8)?;
        let packet_len = padded.checked_add(PACKET_DESCRIPTOR_SIZE)?;
        if packet_len / 8 > u32::from(u16::MAX) {
            return None;
        }
        packet_len.checked_add(PACKET_TRAILER_SIZE)
    }

    /// Free bytes as the guest's read index says.
    pub fn bytes_free<M: RingMemory + ?Sized>(&self, memory: &M) -> Result<u32, RingError> {
        let read_index = memory.read_u32(READ_INDEX)?;
        let read_index = check_index(RingIndex::Read, read_index, self.data_size)?;
        Ok(self.data_size - distance(read_index, self.write_index, self.data_size))
    }

    /// Writes one packet with payload offset 16 (`offset8` = 2) and
    /// publishes it.
    pub fn write_packet<M: RingMemory + ?Sized>(
        &mut self,
        memory: &M,
        packet_type: PacketType,
        flags: u16,
        transaction_id: u64,
        payload: &[u8],
    ) -> Result<WriteOutcome, RingError> {
        let too_large = RingError::PacketTooLarge {
            size: (payload.len() as u64).saturating_add(24),
            data_size: self.data_size,
        };
        let total = Self::packet_size(payload.len()).ok_or(too_large)?;
        // A writer must leave one byte free, so `total` must be < data size.
        if total >= self.data_size {
            return Err(too_large);
        }
        if self.bytes_free(memory)? <= total {
            memory.write_u32(PENDING_SEND_SIZE, total)?;
            self.pending_send_size_set = true;
            // The guest may have read everything before seeing the request.
            fence(Ordering::SeqCst);
            if self.bytes_free(memory)? <= total {
                return Ok(WriteOutcome::Full {
                    bytes_needed: total,
                });
            }
        }
        if self.pending_send_size_set {
            memory.write_u32(PENDING_SEND_SIZE, 0)?;
            self.pending_send_size_set = false;
        }

        let packet_len = total - PACKET_TRAILER_SIZE;
        let len8 = u16::try_from(packet_len / 8).map_err(|_| too_large)?;
        let old_write_index = self.write_index;
        let mut bytes = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
        bytes.extend_from_slice(&(packet_type as u16).to_le_bytes());
        bytes.extend_from_slice(&2u16.to_le_bytes());
        bytes.extend_from_slice(&len8.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&transaction_id.to_le_bytes());
        bytes.extend_from_slice(payload);
        bytes.resize(usize::try_from(packet_len).unwrap_or(0), 0);
        bytes.extend_from_slice(&(u64::from(old_write_index) << 32).to_le_bytes());
        write_data(memory, self.data_size, old_write_index, &bytes)?;

        // The packet is in memory before the index that publishes it.
        fence(Ordering::SeqCst);
        let new_write_index = advance(old_write_index, total, self.data_size);
        memory.write_u32(WRITE_INDEX, new_write_index)?;
        self.write_index = new_write_index;
        // Publish before deciding to signal (pairs with the guest's
        // clear-mask-then-recheck).
        fence(Ordering::SeqCst);
        if memory.read_u32(INTERRUPT_MASK)? != 0 {
            return Ok(WriteOutcome::Written {
                signal_guest: false,
            });
        }
        let read_index = memory.read_u32(READ_INDEX)?;
        Ok(WriteOutcome::Written {
            signal_guest: read_index == old_write_index,
        })
    }
}

#[cfg(test)]
#[path = "ring_tests.rs"]
mod tests;
