//! How ring buffers reach guest memory.
//!
//! A ring is a run of 4 KiB pages of a GPADL: a control page, then the data
//! pages. The pages need not be contiguous in guest physical memory, so the
//! rings address them by byte offset within the ring through
//! [`RingMemory`]. [`GuestPagesRingMemory`] implements it over `vm-memory`
//! and a PFN list; [`BufferRingMemory`] over a `Vec`, for tests and fuzzing.

use std::cell::RefCell;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::HV_PAGE_SIZE;

/// A failed access to ring memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RingMemoryError {
    /// The access runs past the end of the ring's pages.
    #[error("ring access at {offset:#x}+{len} is outside the ring's {ring_size} bytes")]
    OutOfBounds {
        /// Offset of the access.
        offset: u64,
        /// Length of the access.
        len: usize,
        /// Size of the ring (control page included).
        ring_size: u64,
    },
    /// A 4-byte control field access that is not 4-byte aligned.
    #[error("ring control field offset {0:#x} is not 4-byte aligned")]
    Misaligned(u64),
    /// Guest memory refused the access (a PFN that is not guest RAM).
    #[error("guest memory access at {gpa:#x} failed")]
    GuestMemory {
        /// Guest physical address of the failed access.
        gpa: u64,
    },
}

/// Byte access to one ring's pages (control page at offset 0, data from
/// offset 4096). Shared memory: writes take `&self`.
pub trait RingMemory {
    /// Size of the ring in bytes, control page included.
    fn ring_size(&self) -> u64;

    /// Copies `buf.len()` bytes at `offset` into `buf`.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), RingMemoryError>;

    /// Copies `data` to `offset`.
    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), RingMemoryError>;

    /// Reads a 4-byte control field (an index, the mask, pending_send_sz).
    /// Implementations over shared memory should make this one atomic load.
    fn read_u32(&self, offset: u64) -> Result<u32, RingMemoryError> {
        let mut bytes = [0u8; 4];
        self.read_at(offset, &mut bytes)?;
        Ok(u32::from_le_bytes(bytes))
    }

    /// Writes a 4-byte control field; one atomic store over shared memory.
    fn write_u32(&self, offset: u64, value: u32) -> Result<(), RingMemoryError> {
        self.write_at(offset, &value.to_le_bytes())
    }
}

/// Checks that `offset..offset + len` lies in a ring of `ring_size` bytes.
fn check_bounds(offset: u64, len: usize, ring_size: u64) -> Result<(), RingMemoryError> {
    let out_of_bounds = RingMemoryError::OutOfBounds {
        offset,
        len,
        ring_size,
    };
    let end = u64::try_from(len)
        .ok()
        .and_then(|len| offset.checked_add(len))
        .ok_or(out_of_bounds)?;
    if end > ring_size {
        return Err(out_of_bounds);
    }
    Ok(())
}

/// A ring in a `Vec`: for unit tests and fuzz targets.
#[derive(Debug)]
pub struct BufferRingMemory {
    bytes: RefCell<Vec<u8>>,
}

impl BufferRingMemory {
    /// A zeroed ring of `pages` 4 KiB pages.
    pub fn new(pages: usize) -> Self {
        Self::from_bytes(vec![0; pages.saturating_mul(4096)])
    }

    /// A ring holding `bytes` (any length; rings check their geometry).
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            bytes: RefCell::new(bytes),
        }
    }

    /// A copy of the ring's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.bytes.borrow().clone()
    }
}

impl RingMemory for BufferRingMemory {
    fn ring_size(&self) -> u64 {
        self.bytes.borrow().len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), RingMemoryError> {
        check_bounds(offset, buf.len(), self.ring_size())?;
        let bytes = self.bytes.borrow();
        let source = usize::try_from(offset)
            .ok()
            .and_then(|start| bytes.get(start..start.checked_add(buf.len())?));
        let source = source.ok_or(RingMemoryError::OutOfBounds {
            offset,
            len: buf.len(),
            ring_size: bytes.len() as u64,
        })?;
        buf.copy_from_slice(source);
        Ok(())
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), RingMemoryError> {
        let ring_size = self.ring_size();
        check_bounds(offset, data.len(), ring_size)?;
        let mut bytes = self.bytes.borrow_mut();
        let target = usize::try_from(offset)
            .ok()
            .and_then(|start| bytes.get_mut(start..start.checked_add(data.len())?));
        let target = target.ok_or(RingMemoryError::OutOfBounds {
            offset,
            len: data.len(),
            ring_size,
        })?;
        target.copy_from_slice(data);
        Ok(())
    }
}

/// A ring in guest memory: the pages `pfns` (from the channel's GPADL), in
/// ring order. Borrow it for one pass over the ring, from a snapshot of
/// guest memory.
#[derive(Debug)]
pub struct GuestPagesRingMemory<'a, M: GuestMemory + ?Sized> {
    memory: &'a M,
    pfns: &'a [u64],
}

impl<'a, M: GuestMemory + ?Sized> GuestPagesRingMemory<'a, M> {
    /// The ring made of `pfns` in `memory`.
    pub fn new(memory: &'a M, pfns: &'a [u64]) -> Self {
        Self { memory, pfns }
    }

    /// Calls `access(gpa, range)` for each page-bounded piece of
    /// `offset..offset + len`, `range` indexing the caller's buffer.
    fn for_each_piece(
        &self,
        offset: u64,
        len: usize,
        mut access: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), RingMemoryError>,
    ) -> Result<(), RingMemoryError> {
        check_bounds(offset, len, self.ring_size())?;
        let mut done = 0usize;
        while done < len {
            let position = offset + done as u64;
            let in_page = position % HV_PAGE_SIZE;
            let page_room = usize::try_from(HV_PAGE_SIZE - in_page).unwrap_or(usize::MAX);
            let piece = page_room.min(len - done);
            let page = usize::try_from(position / HV_PAGE_SIZE).ok();
            let pfn = page.and_then(|page| self.pfns.get(page)).copied().ok_or(
                RingMemoryError::OutOfBounds {
                    offset,
                    len,
                    ring_size: self.ring_size(),
                },
            )?;
            let gpa = pfn
                .checked_mul(HV_PAGE_SIZE)
                .and_then(|base| base.checked_add(in_page))
                .ok_or(RingMemoryError::GuestMemory { gpa: u64::MAX })?;
            access(GuestAddress(gpa), done..done + piece)?;
            done += piece;
        }
        Ok(())
    }

    /// Guest address of a 4-aligned control field.
    fn field_address(&self, offset: u64) -> Result<GuestAddress, RingMemoryError> {
        if !offset.is_multiple_of(4) {
            return Err(RingMemoryError::Misaligned(offset));
        }
        let mut address = None;
        self.for_each_piece(offset, 4, |gpa, _| {
            address = Some(gpa);
            Ok(())
        })?;
        address.ok_or(RingMemoryError::Misaligned(offset))
    }
}

impl<M: GuestMemory + ?Sized> RingMemory for GuestPagesRingMemory<'_, M> {
    fn ring_size(&self) -> u64 {
        (self.pfns.len() as u64).saturating_mul(HV_PAGE_SIZE)
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), RingMemoryError> {
        let len = buf.len();
        self.for_each_piece(offset, len, |gpa, range| {
            let piece = buf
                .get_mut(range)
                .ok_or(RingMemoryError::GuestMemory { gpa: gpa.0 })?;
            self.memory
                .read_slice(piece, gpa)
                .map_err(|_| RingMemoryError::GuestMemory { gpa: gpa.0 })
        })
    }

    fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), RingMemoryError> {
        self.for_each_piece(offset, data.len(), |gpa, range| {
            let piece = data
                .get(range)
                .ok_or(RingMemoryError::GuestMemory { gpa: gpa.0 })?;
            self.memory
                .write_slice(piece, gpa)
                .map_err(|_| RingMemoryError::GuestMemory { gpa: gpa.0 })
        })
    }

    fn read_u32(&self, offset: u64) -> Result<u32, RingMemoryError> {
        let gpa = self.field_address(offset)?;
        self.memory
            .load(gpa, Ordering::Acquire)
            .map_err(|_| RingMemoryError::GuestMemory { gpa: gpa.0 })
    }

    fn write_u32(&self, offset: u64, value: u32) -> Result<(), RingMemoryError> {
        let gpa = self.field_address(offset)?;
        self.memory
            .store(value, gpa, Ordering::Release)
            .map_err(|_| RingMemoryError::GuestMemory { gpa: gpa.0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestMemoryMmap;

    fn guest_memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    #[test]
    fn buffer_memory_bounds() {
        let ring = BufferRingMemory::new(2);
        assert_eq!(ring.ring_size(), 8192);
        ring.write_at(8188, &[1, 2, 3, 4]).unwrap();
        assert_eq!(ring.read_u32(8188).unwrap(), 0x0403_0201);
        let mut buf = [0u8; 8];
        assert!(matches!(
            ring.read_at(8188, &mut buf),
            Err(RingMemoryError::OutOfBounds { .. })
        ));
        assert!(ring.write_at(u64::MAX, &[0]).is_err());
        assert!(ring.read_at(u64::MAX - 1, &mut buf).is_err());
        // Zero-length accesses at the end are fine.
        ring.read_at(8192, &mut []).unwrap();
    }

    #[test]
    fn guest_pages_are_stitched_in_pfn_order() {
        let memory = guest_memory();
        // Ring page 0 is guest page 7, page 1 is guest page 3.
        let pfns = [7u64, 3];
        let ring = GuestPagesRingMemory::new(&memory, &pfns);
        assert_eq!(ring.ring_size(), 8192);
        let data: Vec<u8> = (0..16).collect();
        ring.write_at(4088, &data).unwrap();
        let mut first = [0u8; 8];
        memory
            .read_slice(&mut first, GuestAddress(7 * 4096 + 4088))
            .unwrap();
        assert_eq!(first, [0, 1, 2, 3, 4, 5, 6, 7]);
        let mut second = [0u8; 8];
        memory
            .read_slice(&mut second, GuestAddress(3 * 4096))
            .unwrap();
        assert_eq!(second, [8, 9, 10, 11, 12, 13, 14, 15]);
        let mut back = [0u8; 16];
        ring.read_at(4088, &mut back).unwrap();
        assert_eq!(back.to_vec(), data);

        ring.write_u32(4, 0xdead_beef).unwrap();
        assert_eq!(ring.read_u32(4).unwrap(), 0xdead_beef);
        assert_eq!(
            memory.read_obj::<u32>(GuestAddress(7 * 4096 + 4)).unwrap(),
            0xdead_beef
        );
        assert_eq!(ring.read_u32(2), Err(RingMemoryError::Misaligned(2)));
        assert!(matches!(
            ring.read_u32(8192),
            Err(RingMemoryError::OutOfBounds { .. })
        ));
    }

    #[test]
    fn pfns_outside_guest_memory_fail_cleanly() {
        let memory = guest_memory();
        for pfn in [0x100u64, 0x10_0000, u64::MAX / 4096, u64::MAX] {
            let pfns = [pfn];
            let ring = GuestPagesRingMemory::new(&memory, &pfns);
            let mut buf = [0u8; 4];
            assert!(ring.read_at(0, &mut buf).is_err());
            assert!(ring.write_at(0, &buf).is_err());
            assert!(ring.read_u32(0).is_err());
            assert!(ring.write_u32(0, 1).is_err());
        }
    }
}
