//! Giving guest memory back to the host.
//!
//! Used by every path that frees guest pages: virtio-mem unplug, balloon
//! inflation and free page reporting. Private anonymous memory is dropped
//! with `madvise(MADV_DONTNEED)`; memory backed by a file or memfd (shared)
//! gets its pages punched out of the file as well, since `MADV_DONTNEED`
//! alone keeps them in the page cache.

use std::os::fd::AsRawFd;

use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

/// Why a range could not be discarded.
#[derive(Debug, thiserror::Error)]
pub enum DiscardError {
    /// The range {0:#x}+{1:#x} is not inside one guest memory region.
    #[error("range {0:#x}+{1:#x} is not inside one guest memory region")]
    OutOfRange(u64, u64),
    /// madvise(MADV_DONTNEED) failed.
    #[error("madvise(MADV_DONTNEED) failed: {0}")]
    Madvise(std::io::Error),
    /// fallocate(PUNCH_HOLE) failed.
    #[error("fallocate(PUNCH_HOLE) failed: {0}")]
    PunchHole(std::io::Error),
}

/// Releases the host memory behind `[addr, addr + len)` of guest memory.
///
/// The range must lie inside one region (callers merge and split ranges
/// per region). Its contents read as zero afterwards.
pub fn discard_range(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    len: u64,
) -> Result<(), DiscardError> {
    let out_of_range = || DiscardError::OutOfRange(addr.raw_value(), len);
    let region = mem.find_region(addr).ok_or_else(out_of_range)?;
    let offset = addr.unchecked_offset_from(region.start_addr());
    if offset.checked_add(len).is_none_or(|end| end > region.len()) || len == 0 {
        return Err(out_of_range());
    }
    let host = region
        .get_host_address(vm_memory::MemoryRegionAddress(offset))
        .map_err(|_| out_of_range())?;
    let len_usize = usize::try_from(len).map_err(|_| out_of_range())?;
    // SAFETY: `host..host+len` lies inside the mapping of `region` (checked
    // above); MADV_DONTNEED only drops page contents, the mapping stays valid.
    let ret = unsafe { libc::madvise(host.cast(), len_usize, libc::MADV_DONTNEED) };
    if ret != 0 {
        return Err(DiscardError::Madvise(std::io::Error::last_os_error()));
    }
    if let Some(file_offset) = region.file_offset() {
        let start = file_offset
            .start()
            .checked_add(offset)
            .ok_or_else(out_of_range)?;
        let (start, len) = (
            i64::try_from(start).map_err(|_| out_of_range())?,
            i64::try_from(len).map_err(|_| out_of_range())?,
        );
        // SAFETY: plain syscall on a file descriptor we own through the
        // region; no memory is passed.
        let ret = unsafe {
            libc::fallocate(
                file_offset.file().as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                start,
                len,
            )
        };
        if ret != 0 {
            return Err(DiscardError::PunchHole(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn discarded_memory_reads_zero_and_bad_ranges_fail() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x4000)]).unwrap();
        mem.write_obj(0xabu8, GuestAddress(0x1000)).unwrap();
        discard_range(&mem, GuestAddress(0x1000), 0x1000).unwrap();
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 0);
        assert!(discard_range(&mem, GuestAddress(0x3000), 0x2000).is_err());
        assert!(discard_range(&mem, GuestAddress(0x8000), 0x1000).is_err());
        assert!(discard_range(&mem, GuestAddress(0), 0).is_err());
    }
}
