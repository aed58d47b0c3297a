//! Model-specific registers a booting Linux guest expects.

use kvm_bindings::{kvm_msr_entry, Msrs};
use kvm_ioctls::VcpuFd;

/// IA32_TIME_STAMP_COUNTER.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_SYSENTER_CS.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// STAR (SYSCALL target segments).
pub const MSR_STAR: u32 = 0xc000_0081;
/// LSTAR (64-bit SYSCALL target).
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// CSTAR (compat-mode SYSCALL target).
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// SFMASK (SYSCALL RFLAGS mask).
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// KERNEL_GS_BASE (SWAPGS).
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// IA32_MISC_ENABLE: fast string operations enabled.
pub const MISC_ENABLE_FAST_STRING: u64 = 1;
/// IA32_MTRR_DEF_TYPE: MTRRs enabled (E, bit 11) with default type write-back (6).
pub const MTRR_DEF_TYPE_ENABLED_WB: u64 = (1 << 11) | 6;

/// Errors of MSR setup.
#[derive(Debug, thiserror::Error)]
pub enum MsrError {
    /// Building the KVM MSR list failed.
    #[error("cannot build the KVM MSR list: {0:?}")]
    Build(vmm_sys_util::fam::Error),
    /// KVM_SET_MSRS failed.
    #[error("cannot set the boot MSRs (KVM_SET_MSRS): {0}")]
    Set(#[source] kvm_ioctls::Error),
    /// KVM accepted only some of the MSRs.
    #[error(
        "KVM accepted only {accepted} of {total} boot MSRs; MSR {first_rejected:#x} was rejected"
    )]
    Partial {
        /// MSRs KVM set.
        accepted: usize,
        /// MSRs requested.
        total: usize,
        /// Index of the first MSR KVM rejected.
        first_rejected: u32,
    },
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, MsrError>;

fn entry(index: u32, data: u64) -> kvm_msr_entry {
    kvm_msr_entry {
        index,
        data,
        ..Default::default()
    }
}

/// The boot MSR values: SYSENTER/SYSCALL MSRs and TSC zeroed, fast strings
/// on, MTRRs enabled with write-back default.
pub fn boot_msr_entries() -> Vec<kvm_msr_entry> {
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_DEF_TYPE_ENABLED_WB),
    ]
}

/// Sets the boot MSRs and checks that KVM accepted all of them.
pub fn setup_msrs(vcpu: &VcpuFd) -> Result<()> {
    let entries = boot_msr_entries();
    let msrs = Msrs::from_entries(&entries).map_err(MsrError::Build)?;
    let accepted = vcpu.set_msrs(&msrs).map_err(MsrError::Set)?;
    if accepted != entries.len() {
        return Err(MsrError::Partial {
            accepted,
            total: entries.len(),
            first_rejected: entries.get(accepted).map_or(0, |e| e.index),
        });
    }
    Ok(())
}
