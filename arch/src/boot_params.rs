//! The Linux zero page (`struct boot_params`), kernel command line and e820.

use linux_loader::bootparam::{boot_e820_entry, boot_params, E820_MAX_ENTRIES_ZEROPAGE};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::load_cmdline;
use vm_memory::{Address, GuestAddress, GuestMemoryMmap};

use crate::kernel::{InitrdRegion, KernelImage, BOOT_HDR_MAGIC};
use crate::layout::{
    boot_ram_regions, to_u64, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START,
    ZERO_PAGE_START,
};

/// e820 type of usable RAM.
pub const E820_RAM: u32 = 1;
/// e820 type of reserved memory.
pub const E820_RESERVED: u32 = 2;
/// `boot_flag` magic of the setup header.
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `type_of_loader` for a loader without an assigned id.
const LOADER_TYPE_UNDEFINED: u8 = 0xff;
/// Kernel alignment advertised for ELF kernels (no setup header of their own).
const ELF_KERNEL_ALIGNMENT: u32 = 0x0100_0000;

/// Errors of zero page and command line setup.
#[derive(Debug, thiserror::Error)]
pub enum BootParamsError {
    /// Not enough boot RAM for a kernel.
    #[error("boot RAM of {0} bytes is too small: at least more than 1 MiB is needed")]
    RamTooSmall(u64),
    /// The command line is not a valid C string.
    #[error("the kernel command line is invalid (it contains a NUL byte?): {0}")]
    InvalidCmdline(#[source] linux_loader::cmdline::Error),
    /// The command line is longer than our buffer.
    #[error("the kernel command line is {len} bytes; at most {max} fit in the command line area")]
    CmdlineTooLong {
        /// Length (without NUL).
        len: usize,
        /// Limit (without NUL).
        max: usize,
    },
    /// The command line is longer than the bzImage accepts.
    #[error("the kernel command line is {len} bytes but this kernel accepts at most {max} (setup_header.cmdline_size)")]
    CmdlineTooLongForKernel {
        /// Length (without NUL).
        len: usize,
        /// Kernel limit.
        max: u32,
    },
    /// Writing the command line failed.
    #[error("cannot write the kernel command line to guest memory: {0}")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// The initrd lies above 4 GiB, which the 32-bit ramdisk fields cannot express.
    #[error("the initrd at {addr:#x} (+{size:#x}) is not below 4 GiB")]
    InitrdAbove4G {
        /// Initrd address.
        addr: u64,
        /// Initrd size.
        size: usize,
    },
    /// Too many e820 entries.
    #[error("the e820 map has {0} entries, more than the zero page holds")]
    TooManyE820Entries(usize),
    /// Writing the zero page failed.
    #[error("cannot write the zero page (boot_params) to guest memory: {0}")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, BootParamsError>;

/// One e820 memory map entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// Start address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// [`E820_RAM`] or [`E820_RESERVED`].
    pub kind: u32,
}

/// The e820 map for `boot_ram_size` bytes of boot RAM (hotplug memory is
/// deliberately not part of it).
///
/// `[0, EBDA)` RAM, `[EBDA, 1 MiB)` reserved (EBDA, BIOS area, ACPI tables),
/// `[1 MiB, end of the low region)` RAM, and the region above 4 GiB if any.
pub fn e820_map(boot_ram_size: u64) -> Result<Vec<E820Entry>> {
    if boot_ram_size <= HIMEM_START {
        return Err(BootParamsError::RamTooSmall(boot_ram_size));
    }
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820_RAM,
        },
        E820Entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            kind: E820_RESERVED,
        },
    ];
    for (start, len) in boot_ram_regions(boot_ram_size) {
        let (mut addr, mut size) = (start.raw_value(), to_u64(len));
        if addr == 0 {
            addr = HIMEM_START;
            size -= HIMEM_START;
        }
        map.push(E820Entry {
            addr,
            size,
            kind: E820_RAM,
        });
    }
    Ok(map)
}

/// Builds the zero page contents (without writing anything to memory).
pub fn build_boot_params(
    kernel: &KernelImage,
    cmdline_len: usize,
    initrd: Option<InitrdRegion>,
    rsdp: GuestAddress,
    boot_ram_size: u64,
) -> Result<boot_params> {
    let mut params = boot_params::default();
    match kernel.setup_header {
        Some(hdr) => params.hdr = hdr,
        None => params.hdr.kernel_alignment = ELF_KERNEL_ALIGNMENT,
    }
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = BOOT_HDR_MAGIC;
    params.hdr.type_of_loader = LOADER_TYPE_UNDEFINED;
    params.hdr.loadflags |= linux_loader::bootparam::LOADED_HIGH;
    // Both are below 64 KiB + 128 KiB: the casts cannot fail.
    params.hdr.cmd_line_ptr = u32::try_from(CMDLINE_START).unwrap_or_default();
    params.hdr.cmdline_size = u32::try_from(cmdline_len).unwrap_or_default();
    if let Some(rd) = initrd {
        let too_high = || BootParamsError::InitrdAbove4G {
            addr: rd.addr.raw_value(),
            size: rd.size,
        };
        params.hdr.ramdisk_image = u32::try_from(rd.addr.raw_value()).map_err(|_| too_high())?;
        params.hdr.ramdisk_size = u32::try_from(rd.size).map_err(|_| too_high())?;
    }
    params.acpi_rsdp_addr = rsdp.raw_value();

    let map = e820_map(boot_ram_size)?;
    if map.len() > E820_MAX_ENTRIES_ZEROPAGE {
        return Err(BootParamsError::TooManyE820Entries(map.len()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(&map) {
        *slot = boot_e820_entry {
            addr: e.addr,
            size: e.size,
            r#type: e.kind,
        };
    }
    params.e820_entries =
        u8::try_from(map.len()).map_err(|_| BootParamsError::TooManyE820Entries(map.len()))?;
    Ok(params)
}

/// Writes the kernel command line to [`CMDLINE_START`] and the zero page to
/// [`ZERO_PAGE_START`].
///
/// `boot_ram_size` is the boot RAM size given to
/// [`boot_ram_regions`](crate::layout::boot_ram_regions): the e820 map is
/// computed from it alone, so hotplug memory in `mem` is not reported.
pub fn configure_boot(
    mem: &GuestMemoryMmap,
    kernel: &KernelImage,
    cmdline: &Cmdline,
    initrd: Option<InitrdRegion>,
    rsdp: GuestAddress,
    boot_ram_size: u64,
) -> Result<()> {
    let cstr = cmdline
        .as_cstring()
        .map_err(BootParamsError::InvalidCmdline)?;
    let len = cstr.as_bytes().len();
    if len + 1 > CMDLINE_MAX_SIZE {
        return Err(BootParamsError::CmdlineTooLong {
            len,
            max: CMDLINE_MAX_SIZE - 1,
        });
    }
    if let Some(hdr) = &kernel.setup_header {
        let max = hdr.cmdline_size;
        if hdr.version >= 0x0206 && to_u64(len) > u64::from(max) {
            return Err(BootParamsError::CmdlineTooLongForKernel { len, max });
        }
    }
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(BootParamsError::WriteCmdline)?;

    let params = build_boot_params(kernel, len, initrd, rsdp, boot_ram_size)?;
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(BootParamsError::WriteBootParams)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{MMIO_GAP_START, RAM_64BIT_START, RSDP_START};
    use linux_loader::bootparam::setup_header;
    use vm_memory::Bytes;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    fn elf_kernel() -> KernelImage {
        KernelImage {
            entry: GuestAddress(16 * MIB),
            setup_header: None,
            end: GuestAddress(32 * MIB),
        }
    }

    #[test]
    fn e820_below_gap() {
        let m = e820_map(512 * MIB).unwrap();
        assert_eq!(
            m,
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820_RAM
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x100000 - 0x9fc00,
                    kind: E820_RESERVED
                },
                E820Entry {
                    addr: 0x100000,
                    size: 512 * MIB - 0x100000,
                    kind: E820_RAM
                },
            ]
        );
    }

    #[test]
    fn e820_above_gap() {
        let m = e820_map(5 * GIB).unwrap();
        assert_eq!(m.len(), 4);
        assert_eq!(
            m[2],
            E820Entry {
                addr: HIMEM_START,
                size: MMIO_GAP_START - HIMEM_START,
                kind: E820_RAM
            }
        );
        assert_eq!(
            m[3],
            E820Entry {
                addr: RAM_64BIT_START,
                size: 2 * GIB,
                kind: E820_RAM
            }
        );
        // No entry overlaps the MMIO gap.
        assert!(m
            .iter()
            .all(|e| e.addr + e.size <= MMIO_GAP_START || e.addr >= RAM_64BIT_START));
    }

    #[test]
    fn e820_rejects_tiny_ram() {
        assert!(matches!(
            e820_map(MIB),
            Err(BootParamsError::RamTooSmall(_))
        ));
    }

    #[test]
    fn zero_page_and_cmdline_are_written() {
        let mem = GuestMemoryMmap::from_ranges(&boot_ram_regions(128 * MIB)).unwrap();
        let mut cmdline = Cmdline::new(4096).unwrap();
        cmdline
            .insert_str("console=ttyS0 reboot=k panic=1")
            .unwrap();
        let initrd = InitrdRegion {
            addr: GuestAddress(100 * MIB),
            size: 12345,
        };
        configure_boot(
            &mem,
            &elf_kernel(),
            &cmdline,
            Some(initrd),
            GuestAddress(RSDP_START),
            128 * MIB,
        )
        .unwrap();

        let expected = b"console=ttyS0 reboot=k panic=1\0";
        let mut buf = vec![0u8; expected.len()];
        mem.read_slice(&mut buf, GuestAddress(CMDLINE_START))
            .unwrap();
        assert_eq!(&buf[..], &expected[..]);

        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_START)).unwrap();
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        assert_eq!({ p.hdr.header }, 0x5372_6448);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!({ p.hdr.cmd_line_ptr }, 0x20000);
        assert_eq!({ p.hdr.cmdline_size }, 30);
        assert_eq!({ p.hdr.ramdisk_image }, 100 * 0x10_0000);
        assert_eq!({ p.hdr.ramdisk_size }, 12345);
        assert_eq!({ p.acpi_rsdp_addr }, 0xe0000);
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table[2];
        assert_eq!(
            ({ e.addr }, { e.size }, { e.r#type }),
            (HIMEM_START, 127 * MIB, E820_RAM)
        );
    }

    #[test]
    fn bzimage_header_is_copied_and_fixed() {
        let hdr = setup_header {
            version: 0x020f,
            cmdline_size: 16,
            code32_start: 0x10_0000,
            init_size: 0x1234,
            type_of_loader: 0,
            ..Default::default()
        };
        let k = KernelImage {
            setup_header: Some(hdr),
            ..elf_kernel()
        };
        let p = build_boot_params(&k, 10, None, GuestAddress(RSDP_START), 64 * MIB).unwrap();
        assert_eq!({ p.hdr.init_size }, 0x1234);
        assert_eq!({ p.hdr.code32_start }, 0x10_0000);
        assert_eq!(p.hdr.type_of_loader, 0xff);
        assert_eq!({ p.hdr.ramdisk_image }, 0);

        let mem = GuestMemoryMmap::from_ranges(&boot_ram_regions(64 * MIB)).unwrap();
        let mut cmdline = Cmdline::new(4096).unwrap();
        cmdline.insert_str("this command line is too long").unwrap();
        let err = configure_boot(&mem, &k, &cmdline, None, GuestAddress(RSDP_START), 64 * MIB)
            .unwrap_err();
        assert!(
            matches!(err, BootParamsError::CmdlineTooLongForKernel { .. }),
            "{err}"
        );
    }

    #[test]
    fn cmdline_longer_than_area_is_rejected() {
        let mem = GuestMemoryMmap::from_ranges(&boot_ram_regions(64 * MIB)).unwrap();
        let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE + 10).unwrap();
        cmdline.insert_str("x".repeat(CMDLINE_MAX_SIZE)).unwrap();
        let err = configure_boot(
            &mem,
            &elf_kernel(),
            &cmdline,
            None,
            GuestAddress(RSDP_START),
            64 * MIB,
        )
        .unwrap_err();
        assert!(
            matches!(err, BootParamsError::CmdlineTooLong { .. }),
            "{err}"
        );
    }
}
