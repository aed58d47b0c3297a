//! The device manager: creates devices, places them on the buses, wires
//! their interrupts (irqfd) and queue notifications (ioeventfd), hands
//! them to the event loop and collects their ACPI descriptions.

use std::fs::File;
use std::io::Write;
use std::sync::{Arc, Mutex};

use acpi_tables::Aml;
use devices::legacy::acpi_pm::{AcpiPmDevice, ACPI_PM_BASE, ACPI_PM_LEN};
use devices::legacy::i8042::{I8042, I8042_BASE, I8042_LEN};
use devices::legacy::pvpanic::{PvPanic, PvPanicAcpiDevice, PVPANIC_LEN, PVPANIC_PORT};
use devices::legacy::serial::{
    SerialAcpiDevice, SerialDevice, SerialInput, COM1_BASE, COM1_IRQ, SERIAL_LEN,
};
use devices::virtio::mmio::{self, MmioTransport, MMIO_SIZE, NOTIFY_REG_OFFSET};
use devices::virtio::{GuestMemory, VirtioDevice, VirtioInterrupt};
use devices::Bus;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::KvmIrqRouting;
use kvm_ioctls::{IoEventAddress, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::{SerialConfig, VmConfig};
use crate::hyperv::{Synic, SynicEvents, SINT_GSI_BASE};

/// The event loop's subscriber type.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Why devices could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// An eventfd could not be created.
    #[error("cannot create an eventfd: {0}")]
    EventFd(std::io::Error),
    /// KVM refused an irqfd or ioeventfd.
    #[error("cannot wire {what} into KVM: {source}")]
    Kvm {
        /// What was being wired.
        what: String,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// Two devices claim the same addresses.
    #[error(transparent)]
    Bus(#[from] devices::BusError),
    /// The serial console could not be set up.
    #[error("serial console: {0}")]
    Serial(String),
    /// A disk could not be opened.
    #[error("disk {path}: {reason}")]
    Disk {
        /// The disk path.
        path: String,
        /// Why.
        reason: String,
    },
    /// The vsock device could not be created.
    #[error("vsock: {0}")]
    Vsock(String),
    /// The entropy device could not be created.
    #[error("rng: {0}")]
    Rng(String),
    /// The balloon configuration was refused.
    #[error("balloon: {0}")]
    Balloon(String),
    /// No interrupt line or MMIO window is left for another device.
    #[error("too many devices: no free interrupt line left")]
    OutOfIrqs,
    /// The Hyper-V SynIC could not be wired.
    #[error("Hyper-V SynIC: {0}")]
    Synic(String),
}

/// Events the guest raises through legacy devices.
pub struct PlatformEvents {
    /// Signalled by the i8042 (`reboot=k`) or the ACPI reset register.
    pub reset: EventFd,
    /// Signalled by the ACPI sleep control register (S5).
    pub poweroff: EventFd,
    /// Signalled by the pvpanic port when the guest kernel panics.
    pub panic: EventFd,
}

/// All devices of one VM.
pub struct DeviceManager {
    /// Port I/O bus.
    pub pio: Bus,
    /// MMIO bus.
    pub mmio: Bus,
    /// Guest-visible platform events.
    pub platform: PlatformEvents,
    acpi_devices: Vec<Box<dyn Aml>>,
    virtio_transports: Vec<Arc<Mutex<MmioTransport>>>,
    virtio_interrupts: Vec<Arc<VirtioInterrupt>>,
    next_irq: u32,
    next_mmio: u64,
}

impl DeviceManager {
    /// Creates the legacy devices: COM1, i8042 reset, ACPI power
    /// management, pvpanic.
    pub fn new(
        vm: &VmFd,
        em: &mut EventManager<Subscriber>,
        config: &VmConfig,
    ) -> Result<Self, DeviceError> {
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd);
        let clone = |e: &EventFd| e.try_clone().map_err(DeviceError::EventFd);
        let platform = PlatformEvents {
            reset: evt()?,
            poweroff: evt()?,
            panic: evt()?,
        };
        let mut dm = Self {
            pio: Bus::new(),
            mmio: Bus::new(),
            acpi_devices: Vec::new(),
            virtio_transports: Vec::new(),
            virtio_interrupts: Vec::new(),
            next_irq: arch::layout::DEVICE_IRQ_BASE,
            next_mmio: arch::layout::DEVICE_MMIO_START,
            platform: PlatformEvents {
                reset: clone(&platform.reset)?,
                poweroff: clone(&platform.poweroff)?,
                panic: clone(&platform.panic)?,
            },
        };

        let serial_out: Option<Box<dyn Write + Send>> = match &config.serial {
            SerialConfig::Tty => Some(Box::new(std::io::stdout())),
            SerialConfig::File(path) => {
                Some(Box::new(File::create(path).map_err(|e| {
                    DeviceError::Serial(format!("{}: {e}", path.display()))
                })?))
            }
            SerialConfig::Off => None,
        };
        if let Some(out) = serial_out {
            let irq = evt()?;
            register_irqfd(vm, &irq, COM1_IRQ, "the serial interrupt")?;
            let serial = Arc::new(Mutex::new(
                SerialDevice::new(irq, out).map_err(|e| DeviceError::Serial(e.to_string()))?,
            ));
            dm.pio.insert(serial.clone(), COM1_BASE, SERIAL_LEN)?;
            dm.acpi_devices.push(Box::new(SerialAcpiDevice));
            if config.serial == SerialConfig::Tty && stdin_is_readable() {
                match SerialInput::stdin(serial) {
                    Ok(input) => {
                        em.add_subscriber(Arc::new(Mutex::new(input)));
                    }
                    Err(e) => log::warn!("serial input disabled: {e}"),
                }
            }
        }
        dm.pio.insert(
            Arc::new(Mutex::new(I8042::new(clone(&platform.reset)?))),
            I8042_BASE,
            I8042_LEN,
        )?;
        dm.pio.insert(
            Arc::new(Mutex::new(AcpiPmDevice::new(
                platform.poweroff,
                platform.reset,
            ))),
            ACPI_PM_BASE,
            ACPI_PM_LEN,
        )?;
        dm.pio.insert(
            Arc::new(Mutex::new(PvPanic::new(platform.panic))),
            PVPANIC_PORT,
            PVPANIC_LEN,
        )?;
        dm.acpi_devices.push(Box::new(PvPanicAcpiDevice));
        Ok(dm)
    }

    /// The interrupt of each virtio device added so far, for the event
    /// loop's check of interrupts the guest never acknowledged.
    pub fn virtio_interrupts(&self) -> Vec<Arc<VirtioInterrupt>> {
        self.virtio_interrupts.clone()
    }

    /// Adds a virtio device behind a virtio-mmio transport: an MMIO window,
    /// an interrupt line (irqfd), one ioeventfd per queue, an ACPI entry,
    /// and the device itself on the event loop.
    pub fn add_virtio<D>(
        &mut self,
        vm: &VmFd,
        em: &mut EventManager<Subscriber>,
        mem: &GuestMemory,
        device: Arc<Mutex<D>>,
    ) -> Result<(), DeviceError>
    where
        D: VirtioDevice + MutEventSubscriber + 'static,
    {
        if self.next_irq > arch::layout::DEVICE_IRQ_LAST {
            return Err(DeviceError::OutOfIrqs);
        }
        let (irq, base) = (self.next_irq, self.next_mmio);
        let index = self.virtio_transports.len();
        let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(DeviceError::EventFd)?;
        let name = {
            let dev = device.lock().expect("device lock");
            for (queue, evt) in dev.queue_events().iter().enumerate() {
                let what = format!("queue {queue} notification of virtio device {index}");
                let datamatch = u32::try_from(queue).expect("queue index fits u32");
                vm.register_ioevent(
                    evt,
                    &IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET),
                    datamatch,
                )
                .map_err(|source| DeviceError::Kvm { what, source })?;
            }
            format!("virtio device {index} (type {})", dev.device_type())
        };
        register_irqfd(vm, &irq_evt, irq, &format!("the interrupt of {name}"))?;
        let interrupt = Arc::new(VirtioInterrupt::new(irq_evt));
        self.virtio_interrupts.push(interrupt.clone());
        let as_virtio: Arc<Mutex<dyn VirtioDevice>> = device.clone();
        let transport = Arc::new(Mutex::new(MmioTransport::new(
            as_virtio,
            mem.clone(),
            interrupt,
        )));
        self.mmio.insert(transport.clone(), base, MMIO_SIZE)?;
        self.acpi_devices
            .push(Box::new(mmio::acpi_device(index, base, irq)));
        self.virtio_transports.push(transport);
        em.add_subscriber(device);
        log::info!("{name} at {base:#x}, IRQ {irq}");
        self.next_irq += 1;
        self.next_mmio += MMIO_SIZE;
        Ok(())
    }

    /// Adds a device that exists only as an ACPI description (the VMBus).
    pub fn add_acpi_device(&mut self, device: Box<dyn Aml>) {
        self.acpi_devices.push(device);
    }

    /// Routes each VP's VMBus SINT to a GSI of its own (from
    /// [`SINT_GSI_BASE`], beside the irqchip's default routes, which
    /// `KVM_SET_GSI_ROUTING` would otherwise drop), attaches the SynIC's
    /// irqfds with their EOM resample fds, and puts its delivery retries
    /// on the event loop. Call it after the SynIC of every vCPU is on:
    /// KVM binds a SINT route to a vCPU's SynIC when the routes are set.
    pub fn wire_synic(
        &mut self,
        vm: &VmFd,
        em: &mut EventManager<Subscriber>,
        synic: &Arc<Synic>,
    ) -> Result<(), DeviceError> {
        let mut routes = arch::hyperv::default_irqchip_routes();
        for (vp, _, _) in synic.sint_fds() {
            routes.push(arch::hyperv::sint_route(
                SINT_GSI_BASE + vp,
                vp,
                arch::hyperv::VMBUS_SINT,
            ));
        }
        let table = KvmIrqRouting::from_entries(&routes)
            .map_err(|e| DeviceError::Synic(format!("GSI routing table: {e:?}")))?;
        vm.set_gsi_routing(&table)
            .map_err(|source| DeviceError::Kvm {
                what: "the SynIC interrupt routes".into(),
                source,
            })?;
        for (vp, sint, ack) in synic.sint_fds() {
            vm.register_irqfd_with_resample(sint, ack, SINT_GSI_BASE + vp)
                .map_err(|source| DeviceError::Kvm {
                    what: format!("the VMBus SINT of VP {vp}"),
                    source,
                })?;
        }
        let events =
            SynicEvents::new(synic.clone()).map_err(|e| DeviceError::Synic(e.to_string()))?;
        em.add_subscriber(Arc::new(Mutex::new(events)));
        Ok(())
    }

    /// The ACPI descriptions of all devices, for the DSDT.
    pub fn acpi_devices(&self) -> Vec<&dyn Aml> {
        self.acpi_devices
            .iter()
            .map(|d| d.as_ref() as &dyn Aml)
            .collect()
    }
}

fn register_irqfd(vm: &VmFd, evt: &EventFd, gsi: u32, what: &str) -> Result<(), DeviceError> {
    vm.register_irqfd(evt, gsi)
        .map_err(|source| DeviceError::Kvm {
            what: what.to_string(),
            source,
        })
}

/// Whether stdin is something to read guest console input from: a
/// terminal, a pipe or a socket (not /dev/null or a regular file).
fn stdin_is_readable() -> bool {
    // SAFETY: fstat writes only into the zeroed struct we pass.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(libc::STDIN_FILENO, &mut st) != 0 {
            return false;
        }
        let kind = st.st_mode & libc::S_IFMT;
        libc::isatty(libc::STDIN_FILENO) == 1 || kind == libc::S_IFIFO || kind == libc::S_IFSOCK
    }
}
