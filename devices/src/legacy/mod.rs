//! Legacy PC devices: 16550 UART, i8042 reset, ACPI power management,
//! pvpanic.
//!
//! All of them sit on the port I/O bus. Their side effects on the host
//! (interrupt, reset, power off) leave through eventfds the VMM owns: an irqfd
//! for the UART, exit eventfds for the others.

pub mod acpi_pm;
pub mod i8042;
pub mod pvpanic;
pub mod serial;

use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

pub use acpi_pm::AcpiPmDevice;
pub use i8042::I8042;
pub use pvpanic::PvPanic;
pub use serial::{SerialDevice, SerialInput};

/// A [`vm_superio::Trigger`] that signals an eventfd (an irqfd or an exit
/// event the VMM waits on).
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// A trigger writing 1 to `evt` each time it fires.
    pub fn new(evt: EventFd) -> Self {
        Self(evt)
    }

    /// A second trigger signalling the same eventfd.
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }

    /// The eventfd behind this trigger.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Maps a bus offset to a register index below `len`, for 1-byte accesses.
fn byte_register(offset: u64, access_len: usize, len: u8) -> Option<u8> {
    if access_len != 1 {
        return None;
    }
    u8::try_from(offset).ok().filter(|o| *o < len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_signals_eventfd() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let trigger = EventFdTrigger::new(evt.try_clone().unwrap());
        trigger.trigger().unwrap();
        trigger.try_clone().unwrap().trigger().unwrap();
        assert_eq!(evt.read().unwrap(), 2);
    }

    #[test]
    fn byte_register_filters_bad_accesses() {
        assert_eq!(byte_register(3, 1, 8), Some(3));
        assert_eq!(byte_register(8, 1, 8), None);
        assert_eq!(byte_register(0, 2, 8), None);
        assert_eq!(byte_register(u64::MAX, 1, 8), None);
    }
}
