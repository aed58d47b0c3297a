//! vCPU registers for the Linux 64-bit boot protocol: general registers,
//! GDT and segments, identity page tables, long mode, FPU.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    BOOT_STACK_POINTER, GDT_SLOTS, GDT_START, IDT_START, PDE_COUNT, PDE_START, PDPTE_START,
    PML4_START, ZERO_PAGE_START,
};

/// CR0: protection enable.
pub const X86_CR0_PE: u64 = 1 << 0;
/// CR0: extension type (always 1 on modern CPUs).
pub const X86_CR0_ET: u64 = 1 << 4;
/// CR0: paging.
pub const X86_CR0_PG: u64 = 1 << 31;
/// CR4: physical address extension.
pub const X86_CR4_PAE: u64 = 1 << 5;
/// EFER: long mode enable.
pub const EFER_LME: u64 = 1 << 8;
/// EFER: long mode active.
pub const EFER_LMA: u64 = 1 << 10;

/// Selector of the 64-bit code segment (`__BOOT_CS` of the boot protocol).
pub const BOOT_CS_SELECTOR: u16 = 0x10;
/// Selector of the flat data segment (`__BOOT_DS` of the boot protocol).
pub const BOOT_DS_SELECTOR: u16 = 0x18;
/// Selector of the TSS.
pub const BOOT_TSS_SELECTOR: u16 = 0x20;

/// Page table entry bits: present | writable.
const PTE_PRESENT_RW: u64 = 0x3;
/// Page directory entry bit: 2 MiB page.
const PDE_PAGE_SIZE: u64 = 1 << 7;
/// Size of a 2 MiB page.
const PAGE_2M: u64 = 1 << 21;
/// Limit of a 64-bit TSS (104 bytes).
const TSS_LIMIT: u32 = 0x67;

/// Errors of register setup.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// KVM_SET_REGS failed.
    #[error("cannot set the vCPU general registers (KVM_SET_REGS): {0}")]
    SetRegs(#[source] kvm_ioctls::Error),
    /// KVM_GET_SREGS failed.
    #[error("cannot read the vCPU special registers (KVM_GET_SREGS): {0}")]
    GetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_SREGS failed.
    #[error("cannot set the vCPU special registers (KVM_SET_SREGS): {0}")]
    SetSregs(#[source] kvm_ioctls::Error),
    /// KVM_SET_FPU failed.
    #[error("cannot set the vCPU FPU state (KVM_SET_FPU): {0}")]
    SetFpu(#[source] kvm_ioctls::Error),
    /// Writing the GDT or IDT to guest memory failed.
    #[error("cannot write the boot GDT/IDT to guest memory at {addr:#x}: {source}")]
    WriteGdt {
        /// Guest address.
        addr: u64,
        /// Underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// Writing the page tables to guest memory failed.
    #[error("cannot write the boot page tables to guest memory at {addr:#x}: {source}")]
    WritePageTables {
        /// Guest address.
        addr: u64,
        /// Underlying error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, RegsError>;

/// Builds a segment descriptor from `flags` (access byte in bits 0..8,
/// flags nibble in bits 12..16), `base` and 20-bit `limit`.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let flags = flags as u64;
    let base = base as u64;
    let limit = limit as u64;
    (limit & 0xffff)
        | ((base & 0x00ff_ffff) << 16)
        | ((flags & 0x00ff) << 40)
        | (((limit >> 16) & 0xf) << 48)
        | (((flags >> 12) & 0xf) << 52)
        | (((base >> 24) & 0xff) << 56)
}

/// The boot GDT: null, unused, 64-bit code (0x10), data (0x18), and a
/// 16-byte TSS descriptor (0x20, upper half zero).
pub fn boot_gdt() -> [u64; GDT_SLOTS] {
    [
        0,
        0,
        // Code: G, L; present, DPL 0, code, execute/read, accessed.
        gdt_entry(0xa09b, 0, 0xfffff),
        // Data: G, D/B; present, DPL 0, data, read/write, accessed.
        gdt_entry(0xc093, 0, 0xfffff),
        // TSS: present, 64-bit busy TSS; byte granular.
        gdt_entry(0x008b, 0, TSS_LIMIT),
        0,
    ]
}

/// Extracts `width` bits at `shift` of `v`.
#[allow(clippy::cast_possible_truncation)] // Masked to at most 8 bits.
fn bits8(v: u64, shift: u32, width: u32) -> u8 {
    ((v >> shift) & ((1 << width) - 1)) as u8
}

/// Decodes a GDT descriptor into the KVM segment register it loads.
pub fn kvm_segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | (((entry >> 56) & 0xff) << 24);
    let raw_limit = u32::from(bits8(entry, 0, 8))
        | (u32::from(bits8(entry, 8, 8)) << 8)
        | (u32::from(bits8(entry, 48, 4)) << 16);
    let g = bits8(entry, 55, 1);
    let present = bits8(entry, 47, 1);
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector,
        type_: bits8(entry, 40, 4),
        present,
        dpl: bits8(entry, 45, 2),
        db: bits8(entry, 54, 1),
        s: bits8(entry, 44, 1),
        l: bits8(entry, 53, 1),
        g,
        avl: bits8(entry, 52, 1),
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

/// Writes the boot GDT and an empty IDT to guest memory.
pub fn write_gdt_idt(mem: &GuestMemoryMmap) -> Result<()> {
    let bytes: Vec<u8> = boot_gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
    mem.write_slice(&bytes, GuestAddress(GDT_START))
        .map_err(|source| RegsError::WriteGdt {
            addr: GDT_START,
            source,
        })?;
    mem.write_obj(0u64, GuestAddress(IDT_START))
        .map_err(|source| RegsError::WriteGdt {
            addr: IDT_START,
            source,
        })
}

/// Writes identity-mapped page tables for the first 4 GiB (2 MiB pages):
/// one PML4 entry, four PDPT entries, 4 x 512 PD entries.
pub fn write_page_tables(mem: &GuestMemoryMmap) -> Result<()> {
    let err = |addr| move |source| RegsError::WritePageTables { addr, source };
    mem.write_obj(PDPTE_START | PTE_PRESENT_RW, GuestAddress(PML4_START))
        .map_err(err(PML4_START))?;
    for i in 0..PDE_COUNT {
        let pd = PDE_START + i * 0x1000;
        mem.write_obj(pd | PTE_PRESENT_RW, GuestAddress(PDPTE_START + i * 8))
            .map_err(err(PDPTE_START))?;
        let table: Vec<u8> = (0..512u64)
            .flat_map(|j| {
                (((i * 512 + j) * PAGE_2M) | PDE_PAGE_SIZE | PTE_PRESENT_RW).to_le_bytes()
            })
            .collect();
        mem.write_slice(&table, GuestAddress(pd)).map_err(err(pd))?;
    }
    Ok(())
}

/// Sets the general registers for the 64-bit entry: `rip` = `entry`,
/// `rsp`/`rbp` = boot stack, `rsi` = zero page, `rflags` = 2 (reserved bit).
pub fn setup_regs(vcpu: &VcpuFd, entry: GuestAddress) -> Result<()> {
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.0,
        rsp: BOOT_STACK_POINTER,
        rbp: BOOT_STACK_POINTER,
        rsi: ZERO_PAGE_START,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(RegsError::SetRegs)
}

/// Applies the boot GDT, segments, page tables and long mode to `sregs`.
pub fn configure_sregs(sregs: &mut kvm_sregs) {
    let gdt = boot_gdt();
    sregs.gdt.base = GDT_START;
    sregs.gdt.limit = u16::try_from(GDT_SLOTS * 8 - 1).unwrap_or(u16::MAX);
    sregs.idt.base = IDT_START;
    sregs.idt.limit = 7;

    let data = kvm_segment_from_gdt(gdt[usize::from(BOOT_DS_SELECTOR / 8)], BOOT_DS_SELECTOR);
    sregs.cs = kvm_segment_from_gdt(gdt[usize::from(BOOT_CS_SELECTOR / 8)], BOOT_CS_SELECTOR);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = kvm_segment_from_gdt(gdt[usize::from(BOOT_TSS_SELECTOR / 8)], BOOT_TSS_SELECTOR);

    sregs.cr3 = PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// Writes the GDT, IDT and page tables to guest memory and puts the vCPU in
/// 64-bit long mode with flat segments (CS 0x10, DS/ES/FS/GS/SS 0x18).
pub fn setup_sregs(mem: &GuestMemoryMmap, vcpu: &VcpuFd) -> Result<()> {
    write_gdt_idt(mem)?;
    write_page_tables(mem)?;
    let mut sregs = vcpu.get_sregs().map_err(RegsError::GetSregs)?;
    configure_sregs(&mut sregs);
    vcpu.set_sregs(&sregs).map_err(RegsError::SetSregs)
}

/// Initializes the FPU: control word 0x37f, MXCSR 0x1f80.
pub fn setup_fpu(vcpu: &VcpuFd) -> Result<()> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(RegsError::SetFpu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::boot_ram_regions;

    #[test]
    fn gdt_entries_are_flat_long_mode() {
        let gdt = boot_gdt();
        assert_eq!(gdt[0], 0);
        assert_eq!(gdt[2], 0x00af_9b00_0000_ffff);
        assert_eq!(gdt[3], 0x00cf_9300_0000_ffff);
        assert_eq!(gdt[4], 0x0000_8b00_0000_0067);

        let cs = kvm_segment_from_gdt(gdt[2], BOOT_CS_SELECTOR);
        assert_eq!(
            (cs.base, cs.limit, cs.type_, cs.l, cs.db, cs.g, cs.s, cs.present),
            (0, 0xffff_ffff, 0xb, 1, 0, 1, 1, 1)
        );
        let ds = kvm_segment_from_gdt(gdt[3], BOOT_DS_SELECTOR);
        assert_eq!(
            (ds.limit, ds.type_, ds.l, ds.db, ds.s, ds.unusable),
            (0xffff_ffff, 0x3, 0, 1, 1, 0)
        );
        let tr = kvm_segment_from_gdt(gdt[4], BOOT_TSS_SELECTOR);
        assert_eq!(
            (tr.limit, tr.type_, tr.s, tr.g, tr.present),
            (0x67, 0xb, 0, 0, 1)
        );
    }

    #[test]
    fn gdt_is_written_to_memory() {
        let mem = GuestMemoryMmap::from_ranges(&boot_ram_regions(16 << 20)).unwrap();
        write_gdt_idt(&mem).unwrap();
        for (i, e) in boot_gdt().iter().enumerate() {
            let v: u64 = mem
                .read_obj(GuestAddress(GDT_START + 8 * i as u64))
                .unwrap();
            assert_eq!(v, *e);
        }
        let idt: u64 = mem.read_obj(GuestAddress(IDT_START)).unwrap();
        assert_eq!(idt, 0);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let mem = GuestMemoryMmap::from_ranges(&boot_ram_regions(16 << 20)).unwrap();
        write_page_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_START)).unwrap();
        assert_eq!(pml4, 0xa003);
        let pml4_1: u64 = mem.read_obj(GuestAddress(PML4_START + 8)).unwrap();
        assert_eq!(pml4_1, 0);
        for i in 0..4u64 {
            let pdpte: u64 = mem.read_obj(GuestAddress(PDPTE_START + 8 * i)).unwrap();
            assert_eq!(pdpte, (0xb000 + i * 0x1000) | 3);
        }
        let pdpte4: u64 = mem.read_obj(GuestAddress(PDPTE_START + 32)).unwrap();
        assert_eq!(pdpte4, 0);
        let first: u64 = mem.read_obj(GuestAddress(PDE_START)).unwrap();
        assert_eq!(first, 0x83);
        let second: u64 = mem.read_obj(GuestAddress(PDE_START + 8)).unwrap();
        assert_eq!(second, 0x20_0000 | 0x83);
        // Last entry of the last PD maps 4 GiB - 2 MiB.
        let last: u64 = mem
            .read_obj(GuestAddress(PDE_START + 4 * 0x1000 - 8))
            .unwrap();
        assert_eq!(last, ((4u64 << 30) - (2 << 20)) | 0x83);
    }

    #[test]
    fn sregs_are_long_mode() {
        let mut s = kvm_sregs::default();
        configure_sregs(&mut s);
        assert_eq!(s.cr0 & (X86_CR0_PE | X86_CR0_PG), X86_CR0_PE | X86_CR0_PG);
        assert_ne!(s.cr4 & X86_CR4_PAE, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(s.cr3, PML4_START);
        assert_eq!(s.cs.selector, 0x10);
        assert_eq!(s.ss.selector, 0x18);
        assert_eq!(s.gdt.limit, 47);
    }
}
