//! ACPI tables (RSDP, XSDT, FADT, DSDT, MADT, SRAT) for a hardware-reduced
//! ACPI platform, written into guest memory below 1 MiB.
//!
//! Design decisions:
//! - FADT `HW_REDUCED_ACPI`: no PM1/GPE blocks, no SCI, no FACS. Power off
//!   goes through the sleep control register (`\_S5_` with `SLP_TYP` = 5),
//!   reboot through the reset register. Linux then treats the platform as
//!   having no legacy PIC/PIT timer (it uses the IOAPIC and LAPIC timer).
//! - `IAPC_BOOT_ARCH`: only `VGA_NOT_PRESENT`. `MSI_NOT_SUPPORTED` stays
//!   clear (virtio-mmio does not use MSI, and a later PCI transport could);
//!   `8042` stays clear: only the i8042 reset line may be emulated, not a
//!   full keyboard controller, so the guest must not probe one.
//! - MADT `PCAT_COMPAT` is clear: with hardware-reduced ACPI Linux never
//!   uses the dual 8259s and maps no ISA IRQ by default, so every legacy
//!   device that interrupts (the COM1 UART) is described in the DSDT with
//!   its IRQ; ACPI then routes it through the IOAPIC.
//! - `IAPC_BOOT_ARCH` `CMOS_RTC_NOT_PRESENT`: there is no RTC; without it
//!   the guest's rtc_cmos driver spends seconds probing ports 0x70/0x71.
//! - No interrupt source overrides: ISA IRQs map 1:1 to GSIs (KVM's
//!   default in-kernel routing), e.g. the serial port on GSI 4.
//! - One NUMA proximity domain (0) in the SRAT holding every vCPU and boot
//!   RAM; virtio-mem reports the same domain as its `node_id`
//!   (`VIRTIO_MEM_F_ACPI_PXM`). The hotplug region is deliberately not
//!   listed: a hot-pluggable range above 4 GiB makes Linux reserve a 64 MiB
//!   swiotlb bounce buffer at boot, which virtio devices (64-bit DMA) never
//!   use, and virtio-mem needs no SRAT entry to add memory.

use acpi_tables::aml::{Name, Package, Path, Scope};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::srat::MemoryAffinity;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::{
    to_u64, ACPI_END, ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT,
    ACPI_SLEEP_STATUS_PORT, ACPI_SLEEP_TYPE_S5, IOAPIC_START, LAPIC_START, RSDP_START,
};

/// OEM id in all tables.
pub const OEM_ID: [u8; 6] = *b"TIDEVM";
/// OEM revision in all tables.
pub const OEM_REVISION: u32 = 1;
/// FADT `IAPC_BOOT_ARCH`: VGA not present.
pub const IAPC_BOOT_ARCH_VGA_NOT_PRESENT: u16 = 1 << 2;
/// FADT `IAPC_BOOT_ARCH`: no CMOS RTC.
pub const IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT: u16 = 1 << 5;
/// Alignment of each table in guest memory.
const TABLE_ALIGN: u64 = 16;
/// DSDT revision (2+ means 64-bit AML integers).
const DSDT_REVISION: u8 = 6;
/// Length of the standard ACPI table header.
const SDT_HEADER_LEN: u32 = 36;
/// SRAT revision (ACPI 6.x).
const SRAT_REVISION: u8 = 3;
/// The one NUMA proximity domain (16 bits: virtio-mem's `node_id` width).
pub const PROXIMITY_DOMAIN: u16 = 0;

/// Errors of ACPI table creation.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// A VM needs at least one vCPU.
    #[error("cannot build a MADT for 0 vCPUs")]
    NoCpus,
    /// The tables do not fit below 1 MiB.
    #[error("the ACPI tables ({size} bytes from {start:#x}) do not fit below {end:#x}; the DSDT is too large")]
    TooLarge {
        /// First byte of the overflowing table.
        start: u64,
        /// Its size.
        size: usize,
        /// End of the ACPI area.
        end: u64,
    },
    /// Writing a table to guest memory failed.
    #[error("cannot write ACPI table {table} to guest memory at {addr:#x}: {source}")]
    Write {
        /// Table signature.
        table: &'static str,
        /// Guest address.
        addr: u64,
        /// Underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, AcpiError>;

fn table_id(sig: &[u8; 4]) -> [u8; 8] {
    let mut id = *b"TIDE    ";
    id[4..].copy_from_slice(sig);
    id
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

/// Serializes an AML object or table.
fn to_bytes(aml: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    aml.to_aml_bytes(&mut v);
    v
}

/// Sequential writer of tables into the ACPI area.
struct TableWriter<'a> {
    mem: &'a GuestMemoryMmap,
    next: u64,
}

impl TableWriter<'_> {
    fn write(&mut self, table: &'static str, bytes: &[u8]) -> Result<GuestAddress> {
        let addr = self.next.next_multiple_of(TABLE_ALIGN);
        let end = addr + to_u64(bytes.len());
        if end > ACPI_END {
            return Err(AcpiError::TooLarge {
                start: addr,
                size: bytes.len(),
                end: ACPI_END,
            });
        }
        self.mem
            .write_slice(bytes, GuestAddress(addr))
            .map_err(|source| AcpiError::Write {
                table,
                addr,
                source,
            })?;
        self.next = end;
        Ok(GuestAddress(addr))
    }
}

/// Builds the DSDT: `\_SB_` holding `devices`, and `\_S5_`.
pub fn build_dsdt(devices: &[&dyn Aml]) -> Vec<u8> {
    let mut dsdt = Sdt::new(
        *b"DSDT",
        SDT_HEADER_LEN,
        DSDT_REVISION,
        OEM_ID,
        table_id(b"DSDT"),
        OEM_REVISION,
    );
    let sb = Scope::new(Path::new("\\_SB_"), devices.to_vec());
    let s5 = Name::new(Path::new("_S5_"), &Package::new(vec![&ACPI_SLEEP_TYPE_S5]));
    let mut body = to_bytes(&sb);
    s5.to_aml_bytes(&mut body);
    dsdt.append_slice(&body);
    to_bytes(&dsdt)
}

/// Builds the FADT pointing at the DSDT at `dsdt`.
pub fn build_fadt(dsdt: GuestAddress) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, table_id(b"FACP"), OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .dsdt_64(dsdt.0);
    fadt.iapc_boot_arch =
        (IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT).into();
    fadt.reset_reg = io_gas(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.sleep_control_reg = io_gas(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_gas(ACPI_SLEEP_STATUS_PORT);
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(*b"TIDEVM\0\0").into();
    to_bytes(&fadt.finalize())
}

/// Builds the MADT: one enabled local APIC per vCPU (APIC id = vCPU index)
/// and one IOAPIC (id `num_cpus`, GSI base 0).
pub fn build_madt(num_cpus: u8) -> Result<Vec<u8>> {
    if num_cpus == 0 {
        return Err(AcpiError::NoCpus);
    }
    // Both addresses are 32-bit constants below 4 GiB.
    let lapic = u32::try_from(LAPIC_START).unwrap_or_default();
    let ioapic = u32::try_from(IOAPIC_START).unwrap_or_default();
    let mut madt = MADT::new(
        OEM_ID,
        table_id(b"APIC"),
        OEM_REVISION,
        LocalInterruptController::Address(lapic),
    );
    for cpu in 0..num_cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(num_cpus, ioapic, 0));
    Ok(to_bytes(&madt))
}

/// SRAT "Processor Local APIC Affinity" structure (type 0, 16 bytes); the
/// acpi_tables crate has none for x86.
fn lapic_affinity(apic_id: u8, domain: u32) -> [u8; 16] {
    let d = domain.to_le_bytes();
    let mut s = [0u8; 16];
    s[0] = 0; // type
    s[1] = 16; // length
    s[2] = d[0]; // proximity domain bits 7:0
    s[3] = apic_id;
    s[4] = 1; // flags: enabled
    s[9..12].copy_from_slice(&d[1..4]); // proximity domain bits 31:8
    s
}

/// Builds the SRAT: vCPUs `0..num_cpus` and the RAM ranges `ram` (base,
/// size), all in [`PROXIMITY_DOMAIN`].
pub fn build_srat(num_cpus: u8, ram: &[(GuestAddress, u64)]) -> Vec<u8> {
    let mut srat = Sdt::new(
        *b"SRAT",
        SDT_HEADER_LEN,
        SRAT_REVISION,
        OEM_ID,
        table_id(b"SRAT"),
        OEM_REVISION,
    );
    let mut body = Vec::new();
    body.extend_from_slice(&1u32.to_le_bytes()); // reserved, must be 1
    body.extend_from_slice(&[0u8; 8]); // reserved
    let domain = u32::from(PROXIMITY_DOMAIN);
    for cpu in 0..num_cpus {
        body.extend_from_slice(&lapic_affinity(cpu, domain));
    }
    for &(base, size) in ram {
        MemoryAffinity::new(domain, base.0, size)
            .enabled()
            .to_aml_bytes(&mut body);
    }
    srat.append_slice(&body);
    srat.as_slice().to_vec()
}

/// Writes RSDP (at [`RSDP_START`]), XSDT, FADT, DSDT, MADT and SRAT into
/// guest memory and returns the RSDP address.
///
/// `mem` is boot RAM (every region goes into the SRAT). `devices` are
/// complete AML `Device` objects; they are placed in the DSDT's `\_SB_`
/// scope in order.
pub fn create_acpi_tables(
    mem: &GuestMemoryMmap,
    num_cpus: u8,
    devices: &[&dyn Aml],
) -> Result<GuestAddress> {
    let mut w = TableWriter {
        mem,
        next: RSDP_START + to_u64(Rsdp::len()),
    };
    let dsdt = w.write("DSDT", &build_dsdt(devices))?;
    let fadt = w.write("FACP", &build_fadt(dsdt))?;
    let madt = w.write("APIC", &build_madt(num_cpus)?)?;
    let ram: Vec<_> = mem.iter().map(|r| (r.start_addr(), r.len())).collect();
    let srat = w.write("SRAT", &build_srat(num_cpus, &ram))?;
    let mut xsdt = XSDT::new(OEM_ID, table_id(b"XSDT"), OEM_REVISION);
    xsdt.add_entry(fadt.0);
    xsdt.add_entry(madt.0);
    xsdt.add_entry(srat.0);
    let xsdt = w.write("XSDT", &to_bytes(&xsdt))?;

    let rsdp = Rsdp::new(OEM_ID, xsdt.0);
    mem.write_slice(&to_bytes(&rsdp), GuestAddress(RSDP_START))
        .map_err(|source| AcpiError::Write {
            table: "RSDP",
            addr: RSDP_START,
            source,
        })?;
    Ok(GuestAddress(RSDP_START))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{boot_ram_regions, ACPI_PM_PORT};
    use acpi_tables::aml::{Device, EISAName, Interrupt, Memory32Fixed, ResourceTemplate};

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Reads a whole SDT at `addr`, checking its checksum and signature.
    fn read_table(mem: &GuestMemoryMmap, addr: u64, sig: &[u8; 4]) -> Vec<u8> {
        let mut hdr = [0u8; 36];
        mem.read_slice(&mut hdr, GuestAddress(addr)).unwrap();
        assert_eq!(&hdr[..4], sig, "signature at {addr:#x}");
        let len = u32_at(&hdr, 4) as usize;
        let mut t = vec![0u8; len];
        mem.read_slice(&mut t, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&t), 0, "checksum of {}", String::from_utf8_lossy(sig));
        assert!(addr + len as u64 <= ACPI_END);
        t
    }

    #[test]
    fn tables_are_valid() {
        let mem = GuestMemoryMmap::from_ranges(&boot_ram_regions(64 << 20)).unwrap();
        let mmio = Memory32Fixed::new(true, 0xd000_0000, 0x1000);
        let irq = Interrupt::new(true, true, false, false, 5);
        let crs = ResourceTemplate::new(vec![&mmio, &irq]);
        let hid = Name::new(Path::new("_HID"), &"LNRO0005");
        let uid = Name::new(Path::new("_UID"), &0u8);
        let crs = Name::new(Path::new("_CRS"), &crs);
        let dev = Device::new(Path::new("V000"), vec![&hid, &uid, &crs]);
        let com_hid = Name::new(Path::new("_HID"), &EISAName::new("PNP0501"));
        let dev2 = Device::new(Path::new("COM1"), vec![&com_hid]);
        let rsdp_addr = create_acpi_tables(&mem, 4, &[&dev, &dev2]).unwrap();
        assert_eq!(rsdp_addr, GuestAddress(0xe0000));

        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, rsdp_addr).unwrap();
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2, "revision");
        assert_eq!(u32_at(&rsdp, 20), 36);
        let xsdt_addr = u64_at(&rsdp, 24);

        let xsdt = read_table(&mem, xsdt_addr, b"XSDT");
        assert_eq!(xsdt.len(), 36 + 3 * 8);
        let fadt_addr = u64_at(&xsdt, 36);
        let madt_addr = u64_at(&xsdt, 44);
        let srat_addr = u64_at(&xsdt, 52);

        let fadt = read_table(&mem, fadt_addr, b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6, "FADT major revision");
        let flags = u32_at(&fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        assert_eq!(
            u16::from_le_bytes([fadt[109], fadt[110]]),
            IAPC_BOOT_ARCH_VGA_NOT_PRESENT | IAPC_BOOT_ARCH_CMOS_RTC_NOT_PRESENT
        );
        // RESET_REG GAS at 116, RESET_VALUE at 128.
        assert_eq!(&fadt[116..120], &[1, 8, 0, 1]);
        assert_eq!(u64_at(&fadt, 120), u64::from(ACPI_PM_PORT + 2));
        assert_eq!(fadt[128], ACPI_RESET_VALUE);
        // SLEEP_CONTROL_REG at 244, SLEEP_STATUS_REG at 256.
        assert_eq!(fadt[244], 1);
        assert_eq!(u64_at(&fadt, 248), u64::from(ACPI_PM_PORT));
        assert_eq!(fadt[256], 1);
        assert_eq!(u64_at(&fadt, 260), u64::from(ACPI_PM_PORT + 1));
        // X_DSDT at 140 (32-bit DSDT pointer unused).
        assert_eq!(u32_at(&fadt, 40), 0);
        let dsdt_addr = u64_at(&fadt, 140);

        let dsdt = read_table(&mem, dsdt_addr, b"DSDT");
        let body = &dsdt[36..];
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        assert!(has(b"_SB_"));
        assert!(has(b"V000"));
        assert!(has(b"COM1"));
        assert!(has(b"_S5_"));
        assert!(has(b"LNRO0005"));

        let madt = read_table(&mem, madt_addr, b"APIC");
        assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
        assert_eq!(u32_at(&madt, 40), 0, "MADT flags (PCAT_COMPAT clear)");
        let mut off = 44;
        let (mut lapics, mut ioapics) = (0, 0);
        while off < madt.len() {
            let (ty, len) = (madt[off], madt[off + 1] as usize);
            match ty {
                0 => {
                    assert_eq!(madt[off + 2], lapics, "processor uid");
                    assert_eq!(madt[off + 3], lapics, "apic id");
                    assert_eq!(u32_at(&madt, off + 4), 1, "enabled");
                    lapics += 1;
                }
                1 => {
                    assert_eq!(madt[off + 2], 4, "IOAPIC id = num_cpus");
                    assert_eq!(u32_at(&madt, off + 4), 0xfec0_0000);
                    assert_eq!(u32_at(&madt, off + 8), 0, "GSI base");
                    ioapics += 1;
                }
                t => panic!("unexpected MADT entry type {t}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!((lapics, ioapics), (4, 1));

        // SRAT: reserved 1 at 36, then 4 LAPIC affinities, then one memory
        // affinity per boot RAM region.
        let srat = read_table(&mem, srat_addr, b"SRAT");
        assert_eq!(srat[8], SRAT_REVISION);
        assert_eq!(u32_at(&srat, 36), 1);
        let mut off = 48;
        let (mut cpus, mut ranges) = (0u8, Vec::new());
        while off < srat.len() {
            let (ty, len) = (srat[off], srat[off + 1] as usize);
            match ty {
                0 => {
                    assert_eq!(len, 16);
                    assert_eq!(srat[off + 2], 0, "proximity domain");
                    assert_eq!(srat[off + 3], cpus, "apic id");
                    assert_eq!(u32_at(&srat, off + 4), 1, "enabled");
                    cpus += 1;
                }
                1 => {
                    assert_eq!(len, 40);
                    assert_eq!(u32_at(&srat, off + 2), 0, "proximity domain");
                    let base = u64_at(&srat, off + 8);
                    let size = u64_at(&srat, off + 16);
                    ranges.push((base, size, u32_at(&srat, off + 28)));
                }
                t => panic!("unexpected SRAT entry type {t}"),
            }
            off += len;
        }
        assert_eq!(off, srat.len());
        assert_eq!(cpus, 4);
        let want: Vec<_> = boot_ram_regions(64 << 20)
            .into_iter()
            .map(|(a, l)| (a.0, l as u64, 1))
            .collect();
        assert_eq!(ranges, want, "(base, size, flags: 1 = enabled)");

        // Every table lies in [0xe0000, 0x100000) and none overlaps another.
        let mut spans = [
            (0xe0000u64, 36u64),
            (xsdt_addr, xsdt.len() as u64),
            (fadt_addr, fadt.len() as u64),
            (dsdt_addr, dsdt.len() as u64),
            (madt_addr, madt.len() as u64),
            (srat_addr, srat.len() as u64),
        ];
        spans.sort();
        for w in spans.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
    }

    #[test]
    fn zero_cpus_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&boot_ram_regions(64 << 20)).unwrap();
        assert!(matches!(
            create_acpi_tables(&mem, 0, &[]),
            Err(AcpiError::NoCpus)
        ));
    }

    #[test]
    fn oversized_dsdt_is_an_error() {
        let mem = GuestMemoryMmap::from_ranges(&boot_ram_regions(64 << 20)).unwrap();
        let big = vec![0u8; 200 * 1024];
        let blob = Name::new(Path::new("BLOB"), &acpi_tables::aml::BufferData::new(big));
        let err = create_acpi_tables(&mem, 1, &[&blob]).unwrap_err();
        assert!(matches!(err, AcpiError::TooLarge { .. }), "{err}");
    }
}

/// Debug aid: `ACPI_DUMP_DIR=/some/dir cargo test -p arch dump_tables -- --ignored`
/// writes DSDT/FACP/APIC blobs there for `iasl -d`.
#[cfg(test)]
mod dump {
    #[test]
    #[ignore = "writes ACPI blobs to $ACPI_DUMP_DIR for iasl"]
    fn dump_tables() {
        use super::*;
        let dir = std::env::var("ACPI_DUMP_DIR").unwrap();
        let hid = Name::new(Path::new("_HID"), &"LNRO0005");
        let dev = acpi_tables::aml::Device::new(Path::new("V000"), vec![&hid]);
        std::fs::write(format!("{dir}/dsdt.dat"), build_dsdt(&[&dev])).unwrap();
        std::fs::write(format!("{dir}/facp.dat"), build_fadt(GuestAddress(0xe0040))).unwrap();
        std::fs::write(format!("{dir}/apic.dat"), build_madt(2).unwrap()).unwrap();
    }
}
