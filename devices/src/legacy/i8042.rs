//! The i8042 keyboard controller, reduced to the CPU reset line.
//!
//! The guest kernel reboots with `reboot=k` by writing 0xfe to port 0x64;
//! that signals the reset eventfd. Insert at port 0x60 with length 5 (offset 0
//! is the data port 0x60, offset 4 the command port 0x64).

use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use super::{byte_register, EventFdTrigger};
use crate::bus::BusDevice;

/// Base I/O port of the i8042 controller.
pub const I8042_BASE: u64 = 0x60;
/// Length of the port range starting at [`I8042_BASE`].
pub const I8042_LEN: u64 = 5;

/// The i8042 controller on the port I/O bus.
#[derive(Debug)]
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl I8042 {
    /// A controller signalling `reset_evt` when the guest resets the CPU.
    pub fn new(reset_evt: EventFd) -> Self {
        Self {
            inner: I8042Device::new(EventFdTrigger::new(reset_evt)),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(reg), Some(b)) = (byte_register(offset, data.len(), 5), data.first_mut()) {
            *b = self.inner.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(reg), Some(&b)) = (byte_register(offset, data.len(), 5), data.first()) {
            if let Err(e) = self.inner.write(reg, b) {
                log::error!("i8042: failed to signal reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_eventfd() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        // Other writes and reads do nothing.
        dev.write(0, &[0xfe]);
        dev.write(4, &[0xaa]);
        dev.write(4, &[0xfe, 0]);
        dev.write(9, &[0xfe]);
        let mut b = [0xffu8; 2];
        dev.read(4, &mut b[..1]);
        assert_eq!(b[0], 0);
        dev.read(4, &mut b);
        assert_eq!(b, [0, 0]);
        assert!(evt.read().is_err());
        dev.write(4, &[0xfe]);
        assert_eq!(evt.read().unwrap(), 1);
    }
}
