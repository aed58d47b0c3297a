//! Local APIC LINT0/LINT1 setup through `KVM_GET_LAPIC`/`KVM_SET_LAPIC`.

use kvm_bindings::kvm_lapic_state;
use kvm_ioctls::VcpuFd;

/// Offset of the LVT LINT0 register in the local APIC register page.
pub const APIC_LVT_LINT0: usize = 0x350;
/// Offset of the LVT LINT1 register in the local APIC register page.
pub const APIC_LVT_LINT1: usize = 0x360;
/// LVT delivery mode: external interrupt (8259 PIC).
pub const APIC_MODE_EXTINT: u32 = 0x7;
/// LVT delivery mode: NMI.
pub const APIC_MODE_NMI: u32 = 0x4;
/// Mask of the delivery mode field (bits 8..=10).
const DELIVERY_MODE_MASK: u32 = 0x700;

/// Errors of local APIC setup.
#[derive(Debug, thiserror::Error)]
pub enum LapicError {
    /// KVM_GET_LAPIC failed (no in-kernel irqchip?).
    #[error(
        "cannot read the local APIC state (KVM_GET_LAPIC; is the in-kernel irqchip created?): {0}"
    )]
    GetLapic(#[source] kvm_ioctls::Error),
    /// KVM_SET_LAPIC failed.
    #[error("cannot set the local APIC state (KVM_SET_LAPIC): {0}")]
    SetLapic(#[source] kvm_ioctls::Error),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, LapicError>;

/// Reads the 32-bit APIC register at `offset`.
pub fn get_klapic_reg(klapic: &kvm_lapic_state, offset: usize) -> u32 {
    let mut b = [0u8; 4];
    for (dst, src) in b.iter_mut().zip(&klapic.regs[offset..offset + 4]) {
        *dst = src.to_ne_bytes()[0];
    }
    u32::from_le_bytes(b)
}

/// Writes the 32-bit APIC register at `offset`.
pub fn set_klapic_reg(klapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (dst, src) in klapic.regs[offset..offset + 4]
        .iter_mut()
        .zip(value.to_le_bytes())
    {
        *dst = std::os::raw::c_char::from_ne_bytes([src]);
    }
}

/// Replaces the delivery mode (bits 8..=10) of an LVT register value.
pub fn with_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !DELIVERY_MODE_MASK) | ((mode << 8) & DELIVERY_MODE_MASK)
}

/// Programs LINT0 as ExtINT (the PIC) and LINT1 as NMI.
pub fn set_lint(vcpu: &VcpuFd) -> Result<()> {
    let mut klapic = vcpu.get_lapic().map_err(LapicError::GetLapic)?;
    let lint0 = get_klapic_reg(&klapic, APIC_LVT_LINT0);
    set_klapic_reg(
        &mut klapic,
        APIC_LVT_LINT0,
        with_delivery_mode(lint0, APIC_MODE_EXTINT),
    );
    let lint1 = get_klapic_reg(&klapic, APIC_LVT_LINT1);
    set_klapic_reg(
        &mut klapic,
        APIC_LVT_LINT1,
        with_delivery_mode(lint1, APIC_MODE_NMI),
    );
    vcpu.set_lapic(&klapic).map_err(LapicError::SetLapic)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lapic_register_round_trip() {
        let mut k = kvm_lapic_state::default();
        set_klapic_reg(&mut k, APIC_LVT_LINT0, 0x0001_0000);
        let v = with_delivery_mode(get_klapic_reg(&k, APIC_LVT_LINT0), APIC_MODE_EXTINT);
        assert_eq!(v, 0x0001_0700);
        set_klapic_reg(&mut k, APIC_LVT_LINT0, v);
        assert_eq!(get_klapic_reg(&k, APIC_LVT_LINT0), 0x0001_0700);
        assert_eq!(with_delivery_mode(0xffff_ffff, APIC_MODE_NMI), 0xffff_fcff);
        assert_eq!(get_klapic_reg(&k, APIC_LVT_LINT1), 0);
    }
}
