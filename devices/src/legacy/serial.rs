//! The 16550 UART (COM1) on top of `vm_superio::Serial`.
//!
//! [`SerialDevice`] answers port I/O at 0x3f8..0x400 (8 ports, 1-byte
//! accesses) and raises its interrupt through an eventfd the VMM registers as
//! irqfd for IRQ 4. [`SerialInput`] is an optional event-loop subscriber that
//! feeds host input (stdin) into the receive FIFO without ever blocking: when
//! the FIFO is full, input stays in a bounded buffer and the subscriber stops
//! reading the host fd until the guest drains the FIFO.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vm_superio::serial::{Error as SuperioError, SerialEvents};
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use super::{byte_register, EventFdTrigger};
use crate::bus::BusDevice;

/// Base I/O port of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of ports of a 16550 UART.
pub const SERIAL_LEN: u64 = 8;
/// IRQ line of COM1.
pub const COM1_IRQ: u32 = 4;

/// Bytes of host input held while the guest's receive FIFO is full.
const MAX_PENDING_INPUT: usize = 4096;

/// Errors of the serial device.
#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    /// Creating or cloning an eventfd failed.
    #[error("serial eventfd: {0}")]
    EventFd(#[source] io::Error),
    /// Duplicating the host input fd failed.
    #[error("cannot duplicate the serial input fd: {0}")]
    InputFd(#[source] io::Error),
}

/// Serial callbacks: signals an eventfd when the guest empties the receive
/// FIFO so that [`SerialInput`] can refill it.
#[derive(Debug)]
pub struct SerialEventFds {
    in_buffer_empty: EventFd,
}

impl SerialEvents for SerialEventFds {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {}
    fn in_buffer_empty(&self) {
        if let Err(e) = self.in_buffer_empty.write(1) {
            log::warn!("serial: cannot signal empty input buffer: {e}");
        }
    }
}

/// The emulated UART type.
type Uart = Serial<EventFdTrigger, SerialEventFds, Box<dyn Write + Send>>;

/// A 16550 UART on the port I/O bus.
pub struct SerialDevice {
    uart: Uart,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART raising `interrupt` (an irqfd) and writing guest output to `out`.
    pub fn new(interrupt: EventFd, out: Box<dyn Write + Send>) -> Result<Self, SerialError> {
        let events = SerialEventFds {
            in_buffer_empty: EventFd::new(libc::EFD_NONBLOCK).map_err(SerialError::EventFd)?,
        };
        Ok(Self {
            uart: Serial::with_events(EventFdTrigger::new(interrupt), events, out),
        })
    }

    /// Queues host input for the guest; returns how many bytes fit in the
    /// receive FIFO (0 when it is full).
    pub fn enqueue_input(&mut self, input: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(SuperioError::FullFifo) => 0,
            Err(e) => {
                // The bytes are in the FIFO; only the interrupt failed.
                log::error!("serial: enqueue input: {e}");
                input.len().min(self.uart.fifo_capacity())
            }
        }
    }

    /// Free space in the receive FIFO.
    pub fn fifo_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// The eventfd signalled when the guest empties the receive FIFO.
    pub fn in_buffer_empty_event(&self) -> &EventFd {
        &self.uart.events().in_buffer_empty
    }
}

/// DSDT description of the COM1 UART (`PNP0501`): its ports and its
/// edge-triggered IRQ. A hardware-reduced ACPI guest maps no ISA IRQ by
/// itself, so without this entry the UART's interrupt never reaches it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SerialAcpiDevice;

impl acpi_tables::Aml for SerialAcpiDevice {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        use acpi_tables::aml;
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
        let uid = aml::Name::new("_UID".into(), &aml::Zero {});
        let base = u16::try_from(COM1_BASE).unwrap_or(0x3f8);
        let len = u8::try_from(SERIAL_LEN).unwrap_or(8);
        let io = aml::IO::new(base, base, 1, len);
        let irq = aml::Interrupt::new(true, true, false, false, COM1_IRQ);
        let resources = aml::ResourceTemplate::new(vec![&io, &irq]);
        let crs = aml::Name::new("_CRS".into(), &resources);
        aml::Device::new("COM1".into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Some(reg), Some(b)) = (byte_register(offset, data.len(), 8), data.first_mut()) {
            *b = self.uart.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(reg), Some(&b)) = (byte_register(offset, data.len(), 8), data.first()) {
            if let Err(e) = self.uart.write(reg, b) {
                log::debug!("serial: write at offset {reg}: {e}");
            }
        }
    }
}

/// Event-loop subscriber feeding a host fd (usually stdin) into a
/// [`SerialDevice`].
///
/// Register it with the event manager; `init` adds the input fd and the
/// FIFO-empty eventfd. Input the FIFO cannot take is kept (up to 4 KiB) and
/// the input fd is removed from the loop until the guest reads the FIFO
/// empty. At end of input the fd is removed for good.
pub struct SerialInput {
    serial: Arc<Mutex<SerialDevice>>,
    input: File,
    buffer_empty: EventFd,
    pending: VecDeque<u8>,
    input_registered: bool,
    input_closed: bool,
}

impl std::fmt::Debug for SerialInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialInput")
            .field("pending", &self.pending.len())
            .field("input_registered", &self.input_registered)
            .field("input_closed", &self.input_closed)
            .finish_non_exhaustive()
    }
}

impl SerialInput {
    /// Feeds bytes read from `input` into `serial`.
    pub fn new(serial: Arc<Mutex<SerialDevice>>, input: File) -> Result<Self, SerialError> {
        let buffer_empty = lock(&serial)
            .in_buffer_empty_event()
            .try_clone()
            .map_err(SerialError::EventFd)?;
        Ok(Self {
            serial,
            input,
            buffer_empty,
            pending: VecDeque::new(),
            input_registered: false,
            input_closed: false,
        })
    }

    /// Feeds the host's stdin (a duplicate of fd 0) into `serial`.
    ///
    /// Putting the terminal in raw mode is left to the VMM.
    pub fn stdin(serial: Arc<Mutex<SerialDevice>>) -> Result<Self, SerialError> {
        let fd = io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(SerialError::InputFd)?;
        Self::new(serial, File::from(fd))
    }

    /// Moves as much pending input as fits into the receive FIFO.
    fn flush_pending(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        let mut serial = lock(&self.serial);
        while !self.pending.is_empty() {
            let (front, _) = self.pending.as_slices();
            let n = serial.enqueue_input(front);
            if n == 0 {
                break;
            }
            self.pending.drain(..n);
        }
    }

    /// Reads what the input fd has, within the pending-buffer limit.
    fn read_input(&mut self, ops: &mut EventOps) {
        let room = MAX_PENDING_INPUT.saturating_sub(self.pending.len());
        if room == 0 {
            // Backpressure: wait for the guest to drain the FIFO.
            self.unregister_input(ops);
            return;
        }
        let mut buf = [0u8; 512];
        let want = room.min(buf.len());
        match self.input.read(&mut buf[..want]) {
            Ok(0) => {
                self.input_closed = true;
                self.unregister_input(ops);
            }
            Ok(n) => {
                self.pending.extend(&buf[..n]);
                self.flush_pending();
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::warn!("serial: reading input failed, closing it: {e}");
                self.input_closed = true;
                self.unregister_input(ops);
            }
        }
    }

    fn register_input(&mut self, ops: &mut EventOps) {
        if self.input_registered || self.input_closed {
            return;
        }
        match ops.add(Events::new(&self.input, EventSet::IN)) {
            Ok(()) => self.input_registered = true,
            Err(e) => log::error!("serial: cannot watch input fd: {e}"),
        }
    }

    fn unregister_input(&mut self, ops: &mut EventOps) {
        if !self.input_registered {
            return;
        }
        if let Err(e) = ops.remove(Events::empty(&self.input)) {
            log::error!("serial: cannot unwatch input fd: {e}");
        }
        self.input_registered = false;
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.buffer_empty, EventSet::IN)) {
            log::error!("serial: cannot watch the FIFO-empty eventfd: {e}");
        }
        self.register_input(ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        let fd = events.fd();
        if fd == self.buffer_empty.as_raw_fd() {
            // Non-blocking eventfd: an error only means it was not signalled.
            let _ = self.buffer_empty.read();
            self.flush_pending();
            if self.pending.len() < MAX_PENDING_INPUT {
                self.register_input(ops);
            }
        } else if fd == self.input.as_raw_fd() {
            let set = events.event_set();
            if set.contains(EventSet::IN) {
                self.read_input(ops);
            } else if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
                self.input_closed = true;
                self.unregister_input(ops);
            }
        }
    }
}

/// Locks a mutex, recovering the data if a holder panicked.
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    /// A writer the test can inspect.
    #[derive(Clone, Default)]
    struct SharedBuf(Arc<StdMutex<Vec<u8>>>);
    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn output_and_interrupt() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = SharedBuf::default();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone())).unwrap();
        // Enable the THR-empty interrupt.
        dev.write(IER, &[0x2]);
        assert_eq!(irq.read().unwrap(), 1);
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        // Bad accesses are ignored.
        dev.write(0, b"xy");
        dev.write(8, b"x");
        dev.write(u64::MAX, b"x");
        dev.write(0, &[]);
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        let mut wide = [0xffu8; 4];
        dev.read(LSR, &mut wide);
        assert_eq!(wide, [0; 4]);
        let mut empty: [u8; 0] = [];
        dev.read(0, &mut empty);
    }

    #[test]
    fn input_reaches_the_guest() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = SerialDevice::new(irq, Box::new(io::sink())).unwrap();
        let cap = dev.fifo_capacity();
        let big = vec![b'a'; cap + 10];
        assert_eq!(dev.enqueue_input(&big), cap);
        assert_eq!(dev.enqueue_input(b"b"), 0);
        let mut b = [0u8];
        for _ in 0..cap {
            dev.read(0, &mut b);
            assert_eq!(b[0], b'a');
        }
        // Reading the FIFO empty signals the refill eventfd.
        assert_eq!(dev.in_buffer_empty_event().read().unwrap(), 1);
        dev.read(LSR, &mut b);
        assert_eq!(b[0] & 1, 0);
    }

    #[test]
    fn serial_input_buffers_when_fifo_full() {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = Arc::new(Mutex::new(
            SerialDevice::new(irq, Box::new(io::sink())).unwrap(),
        ));
        let (rx, mut tx) = std::io::pipe().unwrap();
        let input =
            SerialInput::new(dev.clone(), File::from(std::os::fd::OwnedFd::from(rx))).unwrap();
        let input = Arc::new(Mutex::new(input));
        let mut em =
            event_manager::EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new()
                .unwrap();
        use event_manager::SubscriberOps;
        em.add_subscriber(input.clone());

        let cap = lock(&dev).fifo_capacity();
        let data: Vec<u8> = (0..cap + 100)
            .map(|i| u8::try_from(i % 251).unwrap())
            .collect();
        tx.write_all(&data).unwrap();
        while lock(&input).pending.len() < 100 {
            em.run_with_timeout(100).unwrap();
        }
        assert_eq!(lock(&dev).fifo_capacity(), 0);
        // Guest drains the FIFO; the loop refills it from the pending bytes.
        let mut got = Vec::new();
        let mut b = [0u8];
        for _ in 0..20 {
            {
                let mut dev = lock(&dev);
                while dev.fifo_capacity() < cap {
                    dev.read(0, &mut b);
                    got.push(b[0]);
                }
            }
            if got.len() == data.len() {
                break;
            }
            em.run_with_timeout(100).unwrap();
        }
        assert_eq!(got, data);
        assert!(lock(&input).pending.is_empty());
        // End of input unregisters the fd.
        drop(tx);
        em.run_with_timeout(100).unwrap();
        assert!(lock(&input).input_closed);
    }
}
