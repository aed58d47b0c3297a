//! Guest physical memory map of an x86_64 tidevm guest.
//!
//! ```text
//! 0x0000_0000  real-mode IVT / BDA (RAM)
//! 0x0000_0500  GDT (6 slots, 48 bytes)
//! 0x0000_0530  IDT (empty)
//! 0x0000_7000  zero page (struct boot_params)
//! 0x0000_8ff0  initial boot stack pointer (grows down)
//! 0x0000_9000  PML4, then PDPT (0xa000) and 4 PDs (0xb000..0xf000)
//! 0x0002_0000  kernel command line (64 KiB max)
//! 0x0009_fc00  EBDA (reserved in e820 up to 1 MiB)
//! 0x000e_0000  RSDP, then the other ACPI tables, up to 0x10_0000
//! 0x0010_0000  HIMEM_START: kernel, then RAM up to 3 GiB
//! 0xc000_0000  MMIO gap (no RAM) up to 4 GiB
//! 0xd000_0000    virtio-mmio devices, 4 KiB each
//! 0xfec0_0000    IOAPIC
//! 0xfee0_0000    local APIC
//! 0x1_0000_0000 RAM above 4 GiB (the rest of the boot RAM)
//! ```

use vm_memory::GuestAddress;

/// Start of the GDT written by [`crate::regs::setup_sregs`].
///
/// Six 8-byte slots: null, unused, 64-bit code (selector 0x10 = the boot
/// protocol's `__BOOT_CS`), data (0x18 = `__BOOT_DS`) and a 16-byte TSS
/// descriptor (0x20).
pub const GDT_START: u64 = 0x500;
/// Number of 8-byte slots in the boot GDT.
pub const GDT_SLOTS: usize = 6;
/// Start of the (empty) boot IDT, right after the GDT.
pub const IDT_START: u64 = 0x530;
/// Zero page: the `struct boot_params` handed to the kernel in `%rsi`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer (`%rsp`/`%rbp`) of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level-4 page map of the identity-mapped boot page tables.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table (one, covering 512 GiB).
pub const PDPTE_START: u64 = 0xa000;
/// First of the page directories (one per GiB, 2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Number of page directories: the boot page tables map the first 4 GiB.
pub const PDE_COUNT: u64 = 4;
/// Guest address of the kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Maximum size of the kernel command line, including its NUL terminator.
pub const CMDLINE_MAX_SIZE: usize = 0x10000;
/// Start of the extended BIOS data area; from here to 1 MiB is reserved.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of the ACPI table area; the RSDP is placed here.
pub const ACPI_START: u64 = 0xe0000;
/// Guest address of the RSDP.
pub const RSDP_START: u64 = ACPI_START;
/// End (exclusive) of the ACPI table area.
pub const ACPI_END: u64 = HIMEM_START;
/// Start of high memory (1 MiB): the kernel is loaded from here.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO gap (3 GiB): no RAM from here to 4 GiB.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO gap (4 GiB).
pub const MMIO_GAP_END: u64 = 1 << 32;
/// Size of the 32-bit MMIO gap.
pub const MMIO_GAP_SIZE: u64 = MMIO_GAP_END - MMIO_GAP_START;
/// Start of the 32-bit device MMIO window (virtio-mmio devices).
pub const DEVICE_MMIO_START: u64 = 0xd000_0000;
/// Size of the MMIO window of one virtio-mmio device.
pub const DEVICE_MMIO_SIZE: u64 = 0x1000;
/// End (exclusive) of the 32-bit device MMIO window.
pub const DEVICE_MMIO_END: u64 = IOAPIC_START;
/// IOAPIC MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_START: u64 = 0xfee0_0000;
/// Start of RAM above 4 GiB.
pub const RAM_64BIT_START: u64 = 1 << 32;

/// First of the four ACPI power-management I/O ports.
pub const ACPI_PM_PORT: u16 = 0x600;
/// Number of I/O ports of the ACPI power-management device.
pub const ACPI_PM_PORT_COUNT: u16 = 4;
/// ACPI sleep control register (FADT `SLEEP_CONTROL_REG`), 8 bits.
///
/// The guest writes `(SLP_TYP << 2) | SLP_EN` here; `SLP_TYP` =
/// [`ACPI_SLEEP_TYPE_S5`] with [`ACPI_SLEEP_ENABLE`] set means power off.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = ACPI_PM_PORT;
/// ACPI sleep status register (FADT `SLEEP_STATUS_REG`), 8 bits.
pub const ACPI_SLEEP_STATUS_PORT: u16 = ACPI_PM_PORT + 1;
/// ACPI reset register (FADT `RESET_REG`), 8 bits.
pub const ACPI_RESET_PORT: u16 = ACPI_PM_PORT + 2;
/// Value the guest writes to [`ACPI_RESET_PORT`] to reset (reboot) the VM.
pub const ACPI_RESET_VALUE: u8 = 0x1;
/// `SLP_TYP` value of the `\_S5_` (soft off) state in the DSDT.
pub const ACPI_SLEEP_TYPE_S5: u8 = 5;
/// Shift of `SLP_TYP` in the sleep control register.
pub const ACPI_SLEEP_TYPE_SHIFT: u8 = 2;
/// Mask of `SLP_TYP` in the sleep control register (after shifting).
pub const ACPI_SLEEP_TYPE_MASK: u8 = 0x1c;
/// `SLP_EN` bit of the sleep control register.
pub const ACPI_SLEEP_ENABLE: u8 = 1 << 5;

/// Number of IOAPIC pins (GSIs 0..=23).
pub const IOAPIC_NUM_PINS: u32 = 24;
/// IRQ (GSI) of the 8250 serial console (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// First IRQ (GSI) handed out to devices.
pub const DEVICE_IRQ_BASE: u32 = 5;
/// Last IRQ (GSI, inclusive) handed out to devices.
pub const DEVICE_IRQ_LAST: u32 = IOAPIC_NUM_PINS - 1;

/// Converts a `u64` to `usize`; lossless because this crate is x86_64 only.
#[allow(clippy::cast_possible_truncation)] // usize is 64 bits on x86_64.
pub(crate) const fn to_usize(v: u64) -> usize {
    v as usize
}

/// Converts a `usize` to `u64`; lossless on x86_64.
pub(crate) const fn to_u64(v: usize) -> u64 {
    v as u64
}

/// Boot RAM regions for `size` bytes of guest RAM, split around the MMIO gap.
///
/// RAM below [`MMIO_GAP_START`] starts at 0; whatever does not fit there
/// continues at [`RAM_64BIT_START`]. Hotplugged memory is not included.
pub fn boot_ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), to_usize(size))]
    } else {
        vec![
            (GuestAddress(0), to_usize(MMIO_GAP_START)),
            (
                GuestAddress(RAM_64BIT_START),
                to_usize(size - MMIO_GAP_START),
            ),
        ]
    }
}

/// End (exclusive) of the highest boot RAM region for `size` bytes of RAM.
pub fn ram_end(size: u64) -> u64 {
    if size <= MMIO_GAP_START {
        size
    } else {
        RAM_64BIT_START + (size - MMIO_GAP_START)
    }
}

/// MMIO base address of the virtio-mmio device number `index`, if it fits
/// in the 32-bit device window.
pub fn device_mmio_addr(index: u32) -> Option<GuestAddress> {
    let addr = DEVICE_MMIO_START.checked_add(u64::from(index) * DEVICE_MMIO_SIZE)?;
    (addr + DEVICE_MMIO_SIZE <= DEVICE_MMIO_END).then_some(GuestAddress(addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn ram_below_gap_is_one_region() {
        let r = boot_ram_regions(512 * MIB);
        assert_eq!(r, vec![(GuestAddress(0), to_usize(512 * MIB))]);
        assert_eq!(ram_end(512 * MIB), 512 * MIB);
    }

    #[test]
    fn ram_exactly_gap_start_is_one_region() {
        let r = boot_ram_regions(3 * GIB);
        assert_eq!(r, vec![(GuestAddress(0), to_usize(3 * GIB))]);
        assert_eq!(ram_end(3 * GIB), 3 * GIB);
    }

    #[test]
    fn ram_above_gap_is_split() {
        let r = boot_ram_regions(6 * GIB);
        assert_eq!(
            r,
            vec![
                (GuestAddress(0), to_usize(3 * GIB)),
                (GuestAddress(4 * GIB), to_usize(3 * GIB)),
            ]
        );
        assert_eq!(ram_end(6 * GIB), 7 * GIB);
        let total: usize = r.iter().map(|(_, s)| s).sum();
        assert_eq!(to_u64(total), 6 * GIB);
    }

    #[test]
    fn layout_is_consistent() {
        const {
            assert!(GDT_START + (GDT_SLOTS as u64) * 8 <= IDT_START);
            assert!(IDT_START + 8 <= ZERO_PAGE_START);
            assert!(ZERO_PAGE_START + 0x1000 <= BOOT_STACK_POINTER);
            assert!(BOOT_STACK_POINTER < PML4_START);
            assert!(PDE_START + PDE_COUNT * 0x1000 <= CMDLINE_START);
            assert!(CMDLINE_START + (CMDLINE_MAX_SIZE as u64) <= EBDA_START);
            assert!(DEVICE_MMIO_START >= MMIO_GAP_START);
            assert!(DEVICE_IRQ_BASE > SERIAL_IRQ);
        }
        assert_eq!(device_mmio_addr(0), Some(GuestAddress(DEVICE_MMIO_START)));
        assert_eq!(device_mmio_addr(1), Some(GuestAddress(0xd000_1000)));
        assert!(device_mmio_addr(u32::MAX).is_none());
    }
}
