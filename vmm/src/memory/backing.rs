//! Host memory behind guest memory: private anonymous, shared memfd, or
//! hugetlb pages, mapped one guest region at a time.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::sync::Arc;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestRegionMmap};

/// Why host memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BackingError {
    /// memfd_create failed.
    #[error("cannot create a memfd for shared guest memory: {0}")]
    Memfd(std::io::Error),
    /// The memfd could not be sized.
    #[error("cannot size the guest memory memfd to {size} bytes: {source}")]
    MemfdSize {
        /// Requested size.
        size: u64,
        /// The error.
        source: std::io::Error,
    },
    /// Not enough free huge pages.
    #[error("hugepages=on needs {needed} MiB of free huge pages, the host has {free} MiB free (see /proc/meminfo HugePages_Free; reserve more with /proc/sys/vm/nr_hugepages)")]
    NoHugePages {
        /// MiB needed.
        needed: u64,
        /// MiB free.
        free: u64,
    },
    /// mmap failed.
    #[error("cannot map {size} bytes of guest memory: {reason}")]
    Mmap {
        /// Size of the mapping.
        size: u64,
        /// The error.
        reason: String,
    },
}

/// What kind of host memory backs a guest memory range.
#[derive(Debug)]
pub struct Backing {
    memfd: Option<Arc<File>>,
    hugepages: bool,
    prefault: bool,
    noreserve: bool,
    transparent_huge_pages: bool,
}

impl Backing {
    /// Host memory for a range of `size` bytes.
    ///
    /// `shared` puts it in a memfd mapped `MAP_SHARED`; `hugepages` uses
    /// hugetlb pages; `prefault` populates it at map time; `noreserve`
    /// reserves no swap for it (for the hotplug region, most of which is
    /// never used).
    pub fn new(
        size: u64,
        shared: bool,
        hugepages: bool,
        prefault: bool,
        noreserve: bool,
    ) -> Result<Self, BackingError> {
        if hugepages {
            check_hugepages(size)?;
        }
        let memfd = if shared {
            Some(Arc::new(create_memfd(size, hugepages)?))
        } else {
            None
        };
        Ok(Self {
            memfd,
            hugepages,
            prefault,
            noreserve: noreserve && !hugepages,
            transparent_huge_pages: false,
        })
    }

    /// Asks the host kernel for transparent huge pages behind this memory
    /// (`MADV_HUGEPAGE`), for memory that is only ever given back in whole,
    /// aligned 2 MiB blocks (the hotplug region; boot memory without a
    /// balloon). The default is `MADV_NOHUGEPAGE`: a balloon discards
    /// single 4 KiB pages, which would only split a huge page and keep its
    /// memory.
    ///
    /// With 4 KiB host pages a guest that touches a 128 MiB block (Linux
    /// zeroes each block it unplugs when `init_on_alloc` is on, the
    /// distro default) costs 32768 host page faults instead of 64, and
    /// under nested virtualization that made unplugging ten times slower
    /// than under QEMU, which uses huge pages (docs/benchmarks.md).
    pub fn with_transparent_huge_pages(mut self) -> Self {
        self.transparent_huge_pages = true;
        self
    }

    /// True when the memory is a shared memfd.
    pub fn is_shared(&self) -> bool {
        self.memfd.is_some()
    }

    /// Maps `size` bytes at `offset` inside this backing as guest memory at `guest_addr`.
    pub fn map(
        &self,
        offset: u64,
        size: u64,
        guest_addr: GuestAddress,
    ) -> Result<GuestRegionMmap, BackingError> {
        let err = |reason: String| BackingError::Mmap { size, reason };
        let len = usize::try_from(size).map_err(|_| err("size too large".into()))?;
        let mut flags = libc::MAP_NORESERVE * i32::from(self.noreserve);
        if self.prefault {
            flags |= libc::MAP_POPULATE;
        }
        let mut builder =
            MmapRegionBuilder::new(len).with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE);
        match &self.memfd {
            Some(file) => {
                flags |= libc::MAP_SHARED;
                builder = builder.with_file_offset(FileOffset::from_arc(file.clone(), offset));
            }
            None => {
                flags |= libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
                if self.hugepages {
                    flags |= libc::MAP_HUGETLB;
                }
            }
        }
        let region = builder
            .with_mmap_flags(flags)
            .with_hugetlbfs(self.hugepages)
            .build()
            .map_err(|e| err(e.to_string()))?;
        if !self.prefault && !self.hugepages {
            let advice = if self.transparent_huge_pages {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            };
            // Advice only: a kernel without THP refuses it, harmlessly.
            // SAFETY: the range is the mapping just created above.
            unsafe { libc::madvise(region.as_ptr().cast(), len, advice) };
        }
        GuestRegionMmap::new(region, guest_addr)
            .ok_or_else(|| err("guest address range overflows".into()))
    }
}

fn create_memfd(size: u64, hugepages: bool) -> Result<File, BackingError> {
    let mut flags = libc::MFD_CLOEXEC;
    if hugepages {
        flags |= libc::MFD_HUGETLB;
    }
    // SAFETY: the name is a valid NUL-terminated string; the call has no
    // other memory-safety preconditions.
    let fd = unsafe { libc::memfd_create(c"tidevm-guest-ram".as_ptr(), flags) };
    if fd < 0 {
        return Err(BackingError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| BackingError::MemfdSize { size, source })?;
    Ok(file)
}

fn check_hugepages(size: u64) -> Result<(), BackingError> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let field = |name: &str| -> u64 {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let page_kib = field("Hugepagesize:");
    let free_mib = field("HugePages_Free:") * page_kib / 1024;
    let needed_mib = size.div_ceil(1 << 20);
    if page_kib == 0 || free_mib < needed_mib {
        return Err(BackingError::NoHugePages {
            needed: needed_mib,
            free: free_mib,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryMmap};

    #[test]
    fn anonymous_and_shared_mappings_hold_data() {
        for shared in [false, true] {
            let backing = Backing::new(1 << 21, shared, false, false, true).unwrap();
            let region = backing
                .map(1 << 20, 1 << 20, GuestAddress(0x10_0000))
                .unwrap();
            let mem = GuestMemoryMmap::from_regions(vec![region]).unwrap();
            mem.write_obj(0x5au8, GuestAddress(0x10_0010)).unwrap();
            assert_eq!(mem.read_obj::<u8>(GuestAddress(0x10_0010)).unwrap(), 0x5a);
            assert_eq!(backing.is_shared(), shared);
        }
    }

    #[test]
    fn hugepages_without_reserved_pages_is_a_clear_error() {
        // The test machines reserve no huge pages; if one does, skip.
        match Backing::new(1 << 40, false, true, false, false) {
            Err(BackingError::NoHugePages { needed, .. }) => assert_eq!(needed, 1 << 20),
            other => panic!("expected NoHugePages, got {other:?}"),
        }
    }

    /// The VmFlags line of /proc/self/smaps for the mapping starting at `addr`.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        lines
            .find_map(|l| l.strip_prefix("VmFlags:"))
            .unwrap_or_else(|| panic!("no mapping at {addr:#x}"))
            .to_string()
    }

    #[test]
    fn hotplug_memory_asks_for_huge_pages_and_boot_memory_does_not() {
        let boot = Backing::new(4 << 20, false, false, false, false).unwrap();
        let hotplug = Backing::new(4 << 20, false, false, false, true)
            .unwrap()
            .with_transparent_huge_pages();
        let boot_region = boot.map(0, 4 << 20, GuestAddress(0)).unwrap();
        let hot_region = hotplug.map(0, 4 << 20, GuestAddress(1 << 32)).unwrap();
        // "hg": MADV_HUGEPAGE, "nh": MADV_NOHUGEPAGE (proc(5)). A kernel
        // built without THP shows neither.
        let thp = std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists();
        let boot_flags = vm_flags(boot_region.as_ptr() as usize);
        let hot_flags = vm_flags(hot_region.as_ptr() as usize);
        if thp {
            assert!(
                boot_flags.split_whitespace().any(|f| f == "nh"),
                "{boot_flags}"
            );
            assert!(
                hot_flags.split_whitespace().any(|f| f == "hg"),
                "{hot_flags}"
            );
        }
        assert!(
            !boot_flags.split_whitespace().any(|f| f == "hg"),
            "{boot_flags}"
        );
    }
}
