//! Loading the guest kernel (ELF `vmlinux` or bzImage) and the initrd.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::layout::{to_u64, to_usize, HIMEM_START, MMIO_GAP_START};

/// `HdrS`: magic of the Linux x86 boot protocol setup header.
pub const BOOT_HDR_MAGIC: u32 = 0x5372_6448;
/// Offset of the 64-bit entry point from the protected-mode load address of
/// a bzImage (boot protocol 2.12+ with `XLF_KERNEL_64`).
pub const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// `initrd_addr_max` implied by boot protocols older than 2.03.
const LEGACY_INITRD_ADDR_MAX: u64 = 0x37ff_ffff;
/// Offset of the setup header's `header` field ("HdrS") in a bzImage.
const BZIMAGE_HDR_MAGIC_OFFSET: u64 = 0x202;
const PAGE_SIZE: u64 = 0x1000;

/// Errors of kernel and initrd loading.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel file could not be read.
    #[error("cannot read the kernel image: {0}")]
    ReadKernel(#[source] std::io::Error),
    /// Neither ELF nor bzImage.
    #[error("the kernel image is neither an ELF vmlinux (no \\x7fELF magic) nor a bzImage (no 'HdrS' boot header at 0x202)")]
    UnknownFormat,
    /// linux-loader rejected the ELF vmlinux.
    #[error("cannot load the ELF kernel (it must be a 64-bit x86 vmlinux with a physical entry point at or above 1 MiB): {0}")]
    LoadElf(#[source] linux_loader::loader::Error),
    /// linux-loader rejected the bzImage.
    #[error("cannot load the bzImage kernel: {0}")]
    LoadBzImage(#[source] linux_loader::loader::Error),
    /// The bzImage has no 64-bit entry point.
    #[error("the bzImage does not support the 64-bit boot protocol (boot protocol {version:#06x}, xloadflags {xloadflags:#x}; need 2.12+ with XLF_KERNEL_64)")]
    BzImageNot64Bit {
        /// Boot protocol version of the image.
        version: u16,
        /// Its `xloadflags`.
        xloadflags: u16,
    },
    /// The initrd file could not be read.
    #[error("cannot read the initrd: {0}")]
    ReadInitrd(#[source] std::io::Error),
    /// The initrd file is empty.
    #[error("the initrd file is empty")]
    EmptyInitrd,
    /// Guest memory has no RAM at address 0.
    #[error("guest memory has no RAM region at address 0")]
    NoLowRam,
    /// The initrd does not fit between the kernel and the top of low RAM.
    #[error("the initrd ({size} bytes) does not fit in low guest RAM: only {available} bytes are free between the kernel end {kernel_end:#x} and the initrd limit {limit:#x}; give the VM more memory or use a smaller initrd")]
    InitrdTooLarge {
        /// Initrd size in bytes.
        size: u64,
        /// Free bytes available for it.
        available: u64,
        /// End of the kernel image (page aligned).
        kernel_end: u64,
        /// Highest address (exclusive) the initrd may reach.
        limit: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("cannot copy the initrd into guest memory at {addr:#x}: {source}")]
    CopyInitrd {
        /// Guest address of the copy.
        addr: u64,
        /// Underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, KernelError>;

/// A kernel loaded into guest memory.
#[derive(Clone, Copy, Debug)]
pub struct KernelImage {
    /// 64-bit entry point (`%rip` of the boot vCPU).
    pub entry: GuestAddress,
    /// The bzImage setup header (None for an ELF vmlinux).
    pub setup_header: Option<setup_header>,
    /// End (exclusive) of the memory the kernel occupies: for a bzImage this
    /// includes the space its decompressor needs (`pref_address + init_size`).
    pub end: GuestAddress,
}

/// Where the initrd was placed in guest memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdRegion {
    /// Guest address of the initrd (page aligned).
    pub addr: GuestAddress,
    /// Size in bytes.
    pub size: usize,
}

#[derive(Debug, PartialEq, Eq)]
enum Format {
    Elf,
    BzImage,
}

fn detect_format(kernel: &mut File) -> Result<Format> {
    let mut magic = [0u8; 4];
    kernel.rewind().map_err(KernelError::ReadKernel)?;
    kernel
        .read_exact(&mut magic)
        .map_err(KernelError::ReadKernel)?;
    if magic == *b"\x7fELF" {
        return Ok(Format::Elf);
    }
    let mut hdr = [0u8; 4];
    kernel
        .seek(SeekFrom::Start(BZIMAGE_HDR_MAGIC_OFFSET))
        .map_err(KernelError::ReadKernel)?;
    match kernel.read_exact(&mut hdr) {
        Ok(()) if u32::from_le_bytes(hdr) == BOOT_HDR_MAGIC => Ok(Format::BzImage),
        Ok(()) => Err(KernelError::UnknownFormat),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(KernelError::UnknownFormat),
        Err(e) => Err(KernelError::ReadKernel(e)),
    }
}

/// Checks that `kernel` starts like an ELF `vmlinux` or a bzImage (the
/// checks [`load_kernel`] starts with), without loading it: lets a VM's
/// configuration be refused before anything is built.
pub fn check_kernel_format(kernel: &mut File) -> Result<()> {
    detect_format(kernel).map(|_| ())
}

/// Loads an ELF `vmlinux` or a bzImage into guest memory.
///
/// ELF: segments go to their physical addresses, the entry is `e_entry`.
/// bzImage: the protected-mode kernel goes to [`HIMEM_START`], the entry is
/// its 64-bit entry point (load address + 0x200), and its setup header is
/// kept for the zero page.
pub fn load_kernel(mem: &GuestMemoryMmap, kernel: &mut File) -> Result<KernelImage> {
    let himem = GuestAddress(HIMEM_START);
    match detect_format(kernel)? {
        Format::Elf => {
            let res = Elf::load(mem, None, kernel, Some(himem)).map_err(KernelError::LoadElf)?;
            Ok(KernelImage {
                entry: res.kernel_load,
                setup_header: None,
                end: GuestAddress(res.kernel_end),
            })
        }
        Format::BzImage => {
            let res = BzImage::load(mem, Some(himem), kernel, Some(himem))
                .map_err(KernelError::LoadBzImage)?;
            let hdr = res.setup_header.ok_or(KernelError::UnknownFormat)?;
            if hdr.version < 0x020c || hdr.xloadflags & linux_loader::bootparam::XLF_KERNEL_64 == 0
            {
                return Err(KernelError::BzImageNot64Bit {
                    version: hdr.version,
                    xloadflags: hdr.xloadflags,
                });
            }
            // The decompressor needs init_size bytes from where it runs:
            // the load address aligned up, or pref_address when that is higher.
            let run_at = hdr.pref_address.max(res.kernel_load.raw_value());
            let end = res
                .kernel_end
                .max(run_at.saturating_add(u64::from(hdr.init_size)));
            Ok(KernelImage {
                entry: res.kernel_load.unchecked_add(BZIMAGE_64BIT_ENTRY_OFFSET),
                setup_header: Some(hdr),
                end: GuestAddress(end),
            })
        }
    }
}

/// Highest address (exclusive) the initrd may reach for this kernel, given
/// `low_ram_end`, the end of the RAM region at address 0.
pub fn initrd_limit(low_ram_end: u64, kernel: &KernelImage) -> u64 {
    let mut limit = low_ram_end.min(MMIO_GAP_START);
    if let Some(hdr) = &kernel.setup_header {
        let max = if hdr.version >= 0x0203 && hdr.initrd_addr_max != 0 {
            u64::from(hdr.initrd_addr_max)
        } else {
            LEGACY_INITRD_ADDR_MAX
        };
        limit = limit.min(max + 1);
    }
    limit
}

/// Computes the initrd placement: page aligned, as high as possible below
/// `limit`, and not below the (page-aligned) kernel end.
pub fn initrd_placement(size: u64, limit: u64, kernel_end: u64) -> Result<GuestAddress> {
    let kernel_end = kernel_end.next_multiple_of(PAGE_SIZE);
    let too_large = || KernelError::InitrdTooLarge {
        size,
        available: limit.saturating_sub(kernel_end),
        kernel_end,
        limit,
    };
    let start = limit.checked_sub(size).ok_or_else(too_large)? & !(PAGE_SIZE - 1);
    if start < kernel_end {
        return Err(too_large());
    }
    Ok(GuestAddress(start))
}

/// Copies the initrd into guest memory, page aligned, as high as possible
/// in low RAM (below the MMIO gap and, for a bzImage, below its
/// `initrd_addr_max`), above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    initrd: &mut File,
    kernel: &KernelImage,
) -> Result<InitrdRegion> {
    let size = initrd
        .seek(SeekFrom::End(0))
        .map_err(KernelError::ReadInitrd)?;
    if size == 0 {
        return Err(KernelError::EmptyInitrd);
    }
    initrd.rewind().map_err(KernelError::ReadInitrd)?;
    let low_ram_end = mem
        .find_region(GuestAddress(0))
        .map(|r| r.len())
        .ok_or(KernelError::NoLowRam)?;
    let limit = initrd_limit(low_ram_end, kernel);
    let addr = initrd_placement(size, limit, kernel.end.raw_value())?;
    let len = to_usize(size);
    mem.read_exact_volatile_from(addr, initrd, len)
        .map_err(|source| KernelError::CopyInitrd {
            addr: addr.raw_value(),
            source,
        })?;
    debug_assert_eq!(to_u64(len), size);
    Ok(InitrdRegion { addr, size: len })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use vmm_sys_util::tempfile::TempFile;

    const MIB: u64 = 1 << 20;

    fn mem(size: u64) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&crate::layout::boot_ram_regions(size)).unwrap()
    }

    fn elf_kernel(end: u64) -> KernelImage {
        KernelImage {
            entry: GuestAddress(16 * MIB),
            setup_header: None,
            end: GuestAddress(end),
        }
    }

    #[test]
    fn initrd_goes_to_top_of_low_ram() {
        let k = elf_kernel(20 * MIB);
        let limit = initrd_limit(256 * MIB, &k);
        assert_eq!(limit, 256 * MIB);
        // 10 MiB + 1 byte: page aligned down.
        let a = initrd_placement(10 * MIB + 1, limit, k.end.0).unwrap();
        assert_eq!(a.0, 256 * MIB - 10 * MIB - PAGE_SIZE);
        assert_eq!(a.0 % PAGE_SIZE, 0);
    }

    #[test]
    fn initrd_stays_below_mmio_gap() {
        let k = elf_kernel(20 * MIB);
        assert_eq!(initrd_limit(3 << 30, &k), MMIO_GAP_START);
        assert_eq!(initrd_limit(8 << 30, &k), MMIO_GAP_START);
    }

    #[test]
    fn initrd_respects_initrd_addr_max() {
        let mut hdr = setup_header {
            version: 0x020f,
            initrd_addr_max: 0x7fff_ffff,
            ..Default::default()
        };
        let mut k = elf_kernel(20 * MIB);
        k.setup_header = Some(hdr);
        assert_eq!(initrd_limit(3 << 30, &k), 0x8000_0000);
        assert_eq!(initrd_limit(512 * MIB, &k), 512 * MIB);
        hdr.version = 0x0202;
        k.setup_header = Some(hdr);
        assert_eq!(initrd_limit(3 << 30, &k), 0x3800_0000);
    }

    #[test]
    fn initrd_too_large_is_an_error() {
        let k = elf_kernel(20 * MIB);
        let err = initrd_placement(300 * MIB, 256 * MIB, k.end.0).unwrap_err();
        assert!(matches!(err, KernelError::InitrdTooLarge { .. }), "{err}");
        // Would overlap the kernel.
        let err = initrd_placement(240 * MIB, 256 * MIB, k.end.0).unwrap_err();
        assert!(err.to_string().contains("does not fit"), "{err}");
        // Exactly fits.
        let a = initrd_placement(236 * MIB, 256 * MIB, k.end.0).unwrap();
        assert_eq!(a.0, 20 * MIB);
    }

    #[test]
    fn load_initrd_copies_into_memory() {
        let m = mem(64 * MIB);
        let tmp = TempFile::new().unwrap();
        let mut f = tmp.into_file();
        let data: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).unwrap();
        let k = elf_kernel(2 * MIB);
        let r = load_initrd(&m, &mut f, &k).unwrap();
        assert_eq!(r.size, data.len());
        assert_eq!(r.addr.0, 64 * MIB - 3 * PAGE_SIZE);
        let mut back = vec![0u8; data.len()];
        m.read_slice(&mut back, r.addr).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn empty_initrd_is_rejected() {
        let m = mem(64 * MIB);
        let mut f = TempFile::new().unwrap().into_file();
        let err = load_initrd(&m, &mut f, &elf_kernel(2 * MIB)).unwrap_err();
        assert!(matches!(err, KernelError::EmptyInitrd));
    }

    #[test]
    fn garbage_kernel_is_rejected() {
        let m = mem(64 * MIB);
        let mut f = TempFile::new().unwrap().into_file();
        f.write_all(&[0x55u8; 4096]).unwrap();
        let err = load_kernel(&m, &mut f).unwrap_err();
        assert!(matches!(err, KernelError::UnknownFormat), "{err}");
        let mut short = TempFile::new().unwrap().into_file();
        short.write_all(b"abcdefgh").unwrap();
        let err = load_kernel(&m, &mut short).unwrap_err();
        assert!(matches!(err, KernelError::UnknownFormat), "{err}");
    }

    /// A minimal 64-bit ELF with one PT_LOAD segment at 2 MiB.
    fn tiny_elf() -> Vec<u8> {
        let mut v = vec![0u8; 0x78 + 16];
        v[..4].copy_from_slice(b"\x7fELF");
        v[4] = 2; // 64-bit
        v[5] = 1; // little endian
        v[6] = 1; // version
        v[0x10..0x12].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        v[0x12..0x14].copy_from_slice(&62u16.to_le_bytes()); // x86_64
        v[0x14..0x18].copy_from_slice(&1u32.to_le_bytes());
        v[0x18..0x20].copy_from_slice(&(2 * MIB + 0x10).to_le_bytes()); // e_entry
        v[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes()); // e_phoff
        v[0x34..0x36].copy_from_slice(&64u16.to_le_bytes()); // e_ehsize
        v[0x36..0x38].copy_from_slice(&56u16.to_le_bytes()); // e_phentsize
        v[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes()); // e_phnum
        let ph = 0x40;
        v[ph..ph + 4].copy_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        v[ph + 8..ph + 16].copy_from_slice(&0x78u64.to_le_bytes()); // p_offset
        v[ph + 16..ph + 24].copy_from_slice(&(2 * MIB).to_le_bytes()); // p_vaddr
        v[ph + 24..ph + 32].copy_from_slice(&(2 * MIB).to_le_bytes()); // p_paddr
        v[ph + 32..ph + 40].copy_from_slice(&16u64.to_le_bytes()); // p_filesz
        v[ph + 40..ph + 48].copy_from_slice(&0x2000u64.to_le_bytes()); // p_memsz
        v[ph + 48..ph + 56].copy_from_slice(&0x1000u64.to_le_bytes()); // p_align
        v[0x78..].copy_from_slice(&[0xf4; 16]); // hlt
        v
    }

    #[test]
    fn loads_elf_kernel() {
        let m = mem(64 * MIB);
        let mut f = TempFile::new().unwrap().into_file();
        f.write_all(&tiny_elf()).unwrap();
        let k = load_kernel(&m, &mut f).unwrap();
        assert_eq!(k.entry, GuestAddress(2 * MIB + 0x10));
        assert!(k.setup_header.is_none());
        assert_eq!(k.end, GuestAddress(2 * MIB + 0x2000));
        assert_eq!(m.read_obj::<u8>(GuestAddress(2 * MIB)).unwrap(), 0xf4);
    }

    /// A minimal fake bzImage: 1 setup sector + a 4 KiB protected-mode part.
    fn tiny_bzimage(xloadflags: u16) -> Vec<u8> {
        let mut v = vec![0u8; 1024 + 4096];
        v[0x1f1] = 1; // setup_sects
        v[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        v[0x202..0x206].copy_from_slice(&BOOT_HDR_MAGIC.to_le_bytes());
        v[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // version
        v[0x211] = 1; // loadflags: LOADED_HIGH
        v[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        v[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        v[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        v[0x238..0x23c].copy_from_slice(&2048u32.to_le_bytes()); // cmdline_size
        v[0x258..0x260].copy_from_slice(&0x100_0000u64.to_le_bytes()); // pref_address
        v[0x260..0x264].copy_from_slice(&0x80_0000u32.to_le_bytes()); // init_size
        v[1024] = 0xaa;
        v
    }

    #[test]
    fn loads_bzimage_kernel() {
        let m = mem(64 * MIB);
        let mut f = TempFile::new().unwrap().into_file();
        f.write_all(&tiny_bzimage(linux_loader::bootparam::XLF_KERNEL_64))
            .unwrap();
        let k = load_kernel(&m, &mut f).unwrap();
        assert_eq!(k.entry, GuestAddress(HIMEM_START + 0x200));
        let hdr = k.setup_header.unwrap();
        assert_eq!({ hdr.version }, 0x020f);
        assert_eq!(k.end, GuestAddress(0x100_0000 + 0x80_0000));
        assert_eq!(m.read_obj::<u8>(GuestAddress(HIMEM_START)).unwrap(), 0xaa);
    }

    #[test]
    fn rejects_32bit_only_bzimage() {
        let m = mem(64 * MIB);
        let mut f = TempFile::new().unwrap().into_file();
        f.write_all(&tiny_bzimage(0)).unwrap();
        let err = load_kernel(&m, &mut f).unwrap_err();
        assert!(matches!(err, KernelError::BzImageNot64Bit { .. }), "{err}");
    }
}
