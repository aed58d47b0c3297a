//! Hardware-reduced ACPI power management registers.
//!
//! Four I/O ports at [`ACPI_PM_BASE`]:
//! - offset 0: sleep control register (FADT `SLEEP_CONTROL_REG`). Writing
//!   SLP_EN (bit 5) with SLP_TYP (bits 4:2) == [`S5_SLEEP_TYPE`] powers off.
//!   The DSDT must declare `Name(_S5_, Package() { 5, 0 })` to match.
//! - offset 1: sleep status register (FADT `SLEEP_STATUS_REG`), reads 0.
//! - offset 2: reset register (FADT `RESET_REG`, `RESET_VALUE` =
//!   [`RESET_VALUE`]).
//! - offset 3: reserved.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// Base I/O port of the ACPI PM registers.
pub const ACPI_PM_BASE: u64 = 0x600;
/// Number of ports the device occupies.
pub const ACPI_PM_LEN: u64 = 4;
/// Offset of the sleep control register.
pub const SLEEP_CONTROL_OFFSET: u64 = 0;
/// Offset of the sleep status register.
pub const SLEEP_STATUS_OFFSET: u64 = 1;
/// Offset of the reset register.
pub const RESET_OFFSET: u64 = 2;
/// Value the guest writes to the reset register to reset the machine.
pub const RESET_VALUE: u8 = 1;
/// SLP_TYP value of the S5 (soft off) state.
pub const S5_SLEEP_TYPE: u8 = 5;

const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0x7;

/// What a guest write to the PM registers asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmAction {
    /// Nothing to do.
    None,
    /// Power the machine off.
    PowerOff,
    /// Reset the machine.
    Reset,
}

/// Decodes a guest write of `value` at `offset` (pure, for tests).
pub fn decode_write(offset: u64, value: u8) -> PmAction {
    match offset {
        SLEEP_CONTROL_OFFSET
            if value & SLP_EN != 0 && (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK == S5_SLEEP_TYPE =>
        {
            PmAction::PowerOff
        }
        RESET_OFFSET if value == RESET_VALUE => PmAction::Reset,
        _ => PmAction::None,
    }
}

/// The ACPI PM register block.
#[derive(Debug)]
pub struct AcpiPmDevice {
    poweroff_evt: EventFd,
    reset_evt: EventFd,
}

impl AcpiPmDevice {
    /// A device signalling `poweroff_evt` on S5 entry and `reset_evt` on reset.
    pub fn new(poweroff_evt: EventFd, reset_evt: EventFd) -> Self {
        Self {
            poweroff_evt,
            reset_evt,
        }
    }
}

impl BusDevice for AcpiPmDevice {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Sleep control and status read 0 (WAK_STS clear), reset reads 0.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // The registers are one byte wide; a wider access only counts its
        // first byte.
        let Some(&value) = data.first() else {
            return;
        };
        let res = match decode_write(offset, value) {
            PmAction::None => Ok(()),
            PmAction::PowerOff => self.poweroff_evt.write(1),
            PmAction::Reset => self.reset_evt.write(1),
        };
        if let Err(e) = res {
            log::error!("acpi pm: failed to signal the VMM: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_writes() {
        assert_eq!(decode_write(0, SLP_EN | (5 << 2)), PmAction::PowerOff);
        assert_eq!(decode_write(0, 0xf7), PmAction::PowerOff);
        assert_eq!(decode_write(0, 5 << 2), PmAction::None);
        assert_eq!(decode_write(0, SLP_EN | (3 << 2)), PmAction::None);
        assert_eq!(decode_write(1, SLP_EN | (5 << 2)), PmAction::None);
        assert_eq!(decode_write(2, 1), PmAction::Reset);
        assert_eq!(decode_write(2, 2), PmAction::None);
        assert_eq!(decode_write(3, 1), PmAction::None);
        assert_eq!(decode_write(u64::MAX, 1), PmAction::None);
    }

    #[test]
    fn signals_eventfds() {
        let off = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let rst = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = AcpiPmDevice::new(off.try_clone().unwrap(), rst.try_clone().unwrap());
        let mut b = [0xff; 4];
        dev.read(1, &mut b);
        assert_eq!(b, [0; 4]);
        dev.write(0, &[]);
        dev.write(0, &[SLP_EN | (1 << 2)]);
        assert!(off.read().is_err());
        dev.write(0, &[SLP_EN | (5 << 2)]);
        assert_eq!(off.read().unwrap(), 1);
        assert!(rst.read().is_err());
        dev.write(2, &[1, 0, 0, 0]);
        assert_eq!(rst.read().unwrap(), 1);
        assert!(off.read().is_err());
    }
}
