//! The pvpanic device: the guest kernel reports a panic through one I/O
//! port, so the VMM can exit with an error instead of seeing a reboot.
//!
//! Linux binds its `pvpanic-mmio` driver to the ACPI id `QEMU0001` (the
//! DSDT entry is [`PvPanicAcpiDevice`]); reading the port tells it which
//! events the device supports, writing bit 0 reports a panic.

use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// I/O port of the device (the conventional one).
pub const PVPANIC_PORT: u64 = 0x505;
/// Ports the device covers.
pub const PVPANIC_LEN: u64 = 1;
/// Event bit: the guest kernel panicked.
pub const PVPANIC_PANICKED: u8 = 1 << 0;
/// Event bit: a crash kernel was loaded (reported only, no action).
pub const PVPANIC_CRASH_LOADED: u8 = 1 << 1;

/// The pvpanic port, signalling an eventfd on a guest panic.
#[derive(Debug)]
pub struct PvPanic {
    panicked: EventFd,
}

impl PvPanic {
    /// A device signalling `panicked` when the guest reports a panic.
    pub fn new(panicked: EventFd) -> Self {
        Self { panicked }
    }
}

impl BusDevice for PvPanic {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (0, Some(b)) = (offset, data.first_mut()) {
            *b = PVPANIC_PANICKED | PVPANIC_CRASH_LOADED;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first().is_some_and(|b| b & PVPANIC_PANICKED != 0) {
            if let Err(e) = self.panicked.write(1) {
                log::error!("pvpanic: cannot signal the panic: {e}");
            }
        }
    }
}

/// DSDT description of the pvpanic port (`QEMU0001`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PvPanicAcpiDevice;

impl acpi_tables::Aml for PvPanicAcpiDevice {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        use acpi_tables::aml;
        let port = u16::try_from(PVPANIC_PORT).unwrap_or(0x505);
        let hid = aml::Name::new("_HID".into(), &"QEMU0001");
        let uid = aml::Name::new("_UID".into(), &aml::Zero {});
        let io = aml::IO::new(port, port, 1, 1);
        let resources = aml::ResourceTemplate::new(vec![&io]);
        let crs = aml::Name::new("_CRS".into(), &resources);
        aml::Device::new("PEVT".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panic_bit_signals_and_other_writes_do_not() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = PvPanic::new(evt.try_clone().unwrap());
        let mut b = [0u8; 1];
        dev.read(0, &mut b);
        assert_eq!(b[0], PVPANIC_PANICKED | PVPANIC_CRASH_LOADED);
        dev.write(0, &[PVPANIC_CRASH_LOADED]);
        dev.write(1, &[PVPANIC_PANICKED]);
        dev.write(0, &[]);
        assert!(evt.read().is_err(), "no panic reported yet");
        dev.write(0, &[PVPANIC_PANICKED]);
        assert_eq!(evt.read().unwrap(), 1);
    }

    #[test]
    fn acpi_entry_names_the_device() {
        let mut bytes = Vec::new();
        acpi_tables::Aml::to_aml_bytes(&PvPanicAcpiDevice, &mut bytes);
        let text = String::from_utf8_lossy(&bytes);
        assert!(text.contains("QEMU0001") && text.contains("PEVT"));
    }
}
