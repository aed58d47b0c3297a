//! x86_64 architecture support for tidevm: guest memory layout, kernel and
//! initrd loading, zero page and e820, vCPU registers, CPUID, MSRs, local
//! APIC, ACPI tables and the Hyper-V enlightenments (CPUID, SynIC pages,
//! hypercall decoding).
//!
//! Boot flow for the VMM:
//! 1. create guest memory from [`boot_ram_regions`];
//! 2. [`kernel::load_kernel`], optionally [`kernel::load_initrd`];
//! 3. [`acpi::create_acpi_tables`] with the devices' AML;
//! 4. [`boot_params::configure_boot`];
//! 5. for each vCPU, [`configure_vcpu`] (needs the in-kernel irqchip).

#[cfg(not(target_arch = "x86_64"))]
compile_error!("the arch crate supports x86_64 only");

pub mod acpi;
pub mod boot_params;
pub mod cpuid;
pub mod hyperv;
pub mod kernel;
pub mod lapic;
pub mod layout;
pub mod msr;
pub mod regs;

use kvm_bindings::CpuId;
use kvm_ioctls::VcpuFd;
use vm_memory::{GuestAddress, GuestMemoryMmap};

pub use acpi::create_acpi_tables;
pub use boot_params::configure_boot;
pub use cpuid::{setup_cpuid, CpuidOptions, HypervisorLeaves};
pub use kernel::{load_initrd, load_kernel, InitrdRegion, KernelImage};
pub use lapic::set_lint;
pub use layout::{boot_ram_regions, ram_end};
pub use msr::setup_msrs;
pub use regs::{setup_fpu, setup_regs, setup_sregs};

/// Errors of vCPU configuration (one variant per step).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// CPUID setup failed.
    #[error("vCPU CPUID setup failed: {0}")]
    Cpuid(#[from] cpuid::CpuidError),
    /// MSR setup failed.
    #[error("vCPU MSR setup failed: {0}")]
    Msr(#[from] msr::MsrError),
    /// Register setup failed.
    #[error("vCPU register setup failed: {0}")]
    Regs(#[from] regs::RegsError),
    /// Local APIC setup failed.
    #[error("vCPU local APIC setup failed: {0}")]
    Lapic(#[from] lapic::LapicError),
}

/// Result type of [`configure_vcpu`].
pub type Result<T> = std::result::Result<T, Error>;

/// Configures vCPU `cpu_id` of `num_cpus` for a 64-bit Linux boot at
/// `entry`: CPUID (normalised with `cpuid_opts`), MSRs, general and special
/// registers (writing GDT/page tables to `mem`), FPU and LINT0/LINT1.
///
/// Every vCPU gets the boot register state; with the in-kernel irqchip the
/// APs still wait for INIT/SIPI. Requires the in-kernel irqchip.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    supported_cpuid: &CpuId,
    cpu_id: u8,
    num_cpus: u8,
    entry: GuestAddress,
    cpuid_opts: &CpuidOptions,
) -> Result<()> {
    setup_cpuid(supported_cpuid, vcpu, cpu_id, num_cpus, cpuid_opts)?;
    setup_msrs(vcpu)?;
    setup_regs(vcpu, entry)?;
    setup_sregs(mem, vcpu)?;
    setup_fpu(vcpu)?;
    set_lint(vcpu)?;
    Ok(())
}

#[cfg(test)]
mod kvm_tests {
    use super::*;
    use kvm_bindings::{kvm_msr_entry, Msrs, KVM_MAX_CPUID_ENTRIES};
    use kvm_ioctls::Kvm;

    fn kvm() -> Option<Kvm> {
        if !std::path::Path::new("/dev/kvm").exists() {
            eprintln!("/dev/kvm absent: skipping");
            return None;
        }
        Some(Kvm::new().expect("/dev/kvm exists but cannot be opened"))
    }

    #[test]
    fn configure_vcpu_on_kvm() {
        let Some(kvm) = kvm() else { return };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&boot_ram_regions(64 << 20)).unwrap();
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        let entry = GuestAddress(0x100_0000);
        let num_cpus = 2;
        for id in 0..num_cpus {
            let vcpu = vm.create_vcpu(u64::from(id)).unwrap();
            configure_vcpu(
                &vcpu,
                &mem,
                &supported,
                id,
                num_cpus,
                entry,
                &CpuidOptions::default(),
            )
            .unwrap();

            let regs = vcpu.get_regs().unwrap();
            assert_eq!(regs.rip, 0x100_0000);
            assert_eq!(regs.rsp, layout::BOOT_STACK_POINTER);
            assert_eq!(regs.rsi, layout::ZERO_PAGE_START);
            assert_eq!(regs.rflags, 2);

            let sregs = vcpu.get_sregs().unwrap();
            assert_eq!(sregs.cr3, layout::PML4_START);
            assert_ne!(sregs.cr0 & regs::X86_CR0_PG, 0);
            assert_ne!(sregs.cr4 & regs::X86_CR4_PAE, 0);
            assert_ne!(sregs.efer & regs::EFER_LMA, 0);
            assert_eq!(sregs.cs.selector, regs::BOOT_CS_SELECTOR);
            assert_eq!(sregs.cs.l, 1);
            assert_eq!(sregs.gdt.base, layout::GDT_START);

            let mut msrs = Msrs::from_entries(&[kvm_msr_entry {
                index: msr::MSR_MTRR_DEF_TYPE,
                ..Default::default()
            }])
            .unwrap();
            assert_eq!(vcpu.get_msrs(&mut msrs).unwrap(), 1);
            assert_eq!(msrs.as_slice()[0].data, msr::MTRR_DEF_TYPE_ENABLED_WB);

            let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
            let leaf1 = cpuid.as_slice().iter().find(|e| e.function == 1).unwrap();
            assert_eq!(leaf1.ebx >> 24, u32::from(id));
            assert_ne!(leaf1.ecx & (1 << 31), 0);
            let kvm_sig = cpuid
                .as_slice()
                .iter()
                .find(|e| e.function == cpuid::HYPERVISOR_LEAF_BASE);
            if let Some(sig) = kvm_sig {
                let mut s = Vec::new();
                for r in [sig.ebx, sig.ecx, sig.edx] {
                    s.extend_from_slice(&r.to_le_bytes());
                }
                assert_eq!(&s, b"KVMKVMKVM\0\0\0");
            }

            // KVM_GET_FPU on this host's kvm does not report MXCSR; the
            // legacy XSAVE area does (FCW in bytes 0..2, MXCSR in 24..28).
            let fpu = vcpu.get_fpu().unwrap();
            assert_eq!(fpu.fcw, 0x37f);
            let xsave = vcpu.get_xsave().unwrap();
            assert_eq!(xsave.region[0] & 0xffff, 0x37f);
            assert_eq!(xsave.region[6], 0x1f80);

            let lapic = vcpu.get_lapic().unwrap();
            let lint0 = lapic::get_klapic_reg(&lapic, lapic::APIC_LVT_LINT0);
            let lint1 = lapic::get_klapic_reg(&lapic, lapic::APIC_LVT_LINT1);
            assert_eq!((lint0 >> 8) & 7, lapic::APIC_MODE_EXTINT);
            assert_eq!((lint1 >> 8) & 7, lapic::APIC_MODE_NMI);
        }
    }

    #[test]
    fn hyperv_leaves_on_kvm() {
        let Some(kvm) = kvm() else { return };
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let mem = GuestMemoryMmap::from_ranges(&boot_ram_regions(64 << 20)).unwrap();
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
        // Masked by KVM where it can say (not on every /dev/kvm).
        let features = match hyperv::supported_features(&kvm) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("no Hyper-V on this KVM ({e}): unmasked leaves");
                hyperv::HypervFeatures::default()
            }
        };
        let opts = CpuidOptions {
            hypervisor: HypervisorLeaves::HyperV(features),
            ..Default::default()
        };
        let vcpu = vm.create_vcpu(0).unwrap();
        configure_vcpu(
            &vcpu,
            &mem,
            &supported,
            0,
            1,
            GuestAddress(0x100_0000),
            &opts,
        )
        .unwrap();
        let cpuid = vcpu.get_cpuid2(KVM_MAX_CPUID_ENTRIES).unwrap();
        let sig = cpuid
            .as_slice()
            .iter()
            .find(|e| e.function == cpuid::HYPERVISOR_LEAF_BASE)
            .unwrap();
        assert_eq!(sig.ebx, hyperv::VENDOR_SIGNATURE[0]);
        let hv = cpuid
            .as_slice()
            .iter()
            .filter(|e| (0x4000_0000..=0x4000_ffff).contains(&e.function))
            .count();
        assert_eq!(hv, 6, "only the Hyper-V leaves");
    }
}
