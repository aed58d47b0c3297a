//! The virtio-mmio transport (virtio 1.2, section 4.2), version 2 layout.
//!
//! [`MmioTransport`] is a [`BusDevice`] of [`MMIO_SIZE`] bytes on the MMIO
//! bus. It keeps the register state the driver sees (status, feature
//! selection, queue configuration, interrupt status) and hands the configured
//! queues to the [`VirtioDevice`] when the driver sets DRIVER_OK.
//!
//! What the VMM wires per transport:
//! - insert it on the MMIO bus at `base` with length [`MMIO_SIZE`];
//! - register each `device.queue_events()[i]` as a KVM ioeventfd at
//!   `base + NOTIFY_REG_OFFSET`, 4 bytes, datamatch `i`;
//! - register the [`VirtioInterrupt`]'s eventfd as irqfd for the device's
//!   IRQ (edge-triggered);
//! - describe the device to the guest: [`acpi_device`] in the DSDT, or
//!   `virtio_mmio.device=4K@<base>:<irq>` on the kernel command line.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use acpi_tables::aml;
use acpi_tables::{Aml, AmlSink};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddressSpace;

use super::{GuestMemory, InterruptKind, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1};
use crate::bus::BusDevice;

/// Size of the MMIO window of one virtio-mmio device.
pub const MMIO_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register (where the VMM puts ioeventfds).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Value of the MagicValue register ("virt").
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// Version of the register layout (2 = virtio 1.x, non-legacy).
pub const MMIO_VERSION: u32 = 2;
/// Value of the VendorID register ("TDVM").
pub const VENDOR_ID: u32 = u32::from_le_bytes(*b"TDVM");
/// Offset where the device configuration space starts.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// Register offsets of the virtio-mmio layout (virtio 1.2, 4.2.2).
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = super::NOTIFY_REG_OFFSET;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const SHM_SEL: u64 = 0x0ac;
    pub const SHM_LEN_LOW: u64 = 0x0b0;
    pub const SHM_LEN_HIGH: u64 = 0x0b4;
    pub const SHM_BASE_LOW: u64 = 0x0b8;
    pub const SHM_BASE_HIGH: u64 = 0x0bc;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
}

/// `VIRTIO_RING_F_EVENT_IDX`: when acked, the transport enables event
/// index suppression on the queues it hands to the device.
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

/// Status bits, as u32 (the register width).
const ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
const DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
const DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
const FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
const NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
const FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// Locks a mutex, recovering the data if a holder panicked.
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Low (`sel` 0) or high (`sel` 1) 32 bits of a 64-bit feature word.
fn feature_word(features: u64, sel: u32) -> u32 {
    match sel {
        0 => (features & 0xffff_ffff) as u32,
        1 => (features >> 32) as u32,
        _ => 0,
    }
}

/// Outcome of a write to the Status register, decided from the current
/// status and the value written (pure, for tests and reuse).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusTransition {
    /// Driver wrote 0: reset transport and device.
    Reset,
    /// Accept the new status as is.
    Set(u32),
    /// The driver sets FEATURES_OK: check the features, then set the status.
    FeaturesOk(u32),
    /// The driver sets DRIVER_OK: activate the device, then set the status.
    DriverOk(u32),
    /// Out-of-order or bit-clearing write: ignore it.
    Invalid,
}

/// Decides how to handle the driver writing `new` over `old` (virtio 1.2,
/// 3.1.1: ACKNOWLEDGE, DRIVER, FEATURES_OK, DRIVER_OK, in this order; bits
/// are only cleared by a reset; FAILED may be set at any time).
pub fn status_transition(old: u32, new: u32) -> StatusTransition {
    if new == 0 {
        return StatusTransition::Reset;
    }
    // Only the driver-owned bits can be written; NEEDS_RESET is the device's.
    let driver_bits = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK | FAILED;
    if new & !driver_bits != 0 || (old & driver_bits) & !new != 0 {
        return StatusTransition::Invalid;
    }
    let added = new & !old;
    if added == 0 {
        return StatusTransition::Set(new | (old & NEEDS_RESET));
    }
    if added & FAILED != 0 {
        // The driver gave up; record it whatever else it wrote.
        return StatusTransition::Set(old | FAILED);
    }
    let has = |bit: u32| new & bit != 0;
    let ordered = (!has(DRIVER) || has(ACKNOWLEDGE))
        && (!has(FEATURES_OK) || has(DRIVER))
        && (!has(DRIVER_OK) || has(FEATURES_OK));
    if !ordered || old & NEEDS_RESET != 0 {
        return StatusTransition::Invalid;
    }
    if added & DRIVER_OK != 0 {
        if added & FEATURES_OK != 0 {
            // Features must be accepted before the device goes live.
            return StatusTransition::Invalid;
        }
        StatusTransition::DriverOk(new)
    } else if added & FEATURES_OK != 0 {
        StatusTransition::FeaturesOk(new)
    } else {
        StatusTransition::Set(new)
    }
}

/// Whether the driver may accept `driver` features from the `device` offer:
/// a subset of the offer, including VIRTIO_F_VERSION_1 (the mmio v2 layout
/// is for non-legacy drivers only).
pub fn features_acceptable(device: u64, driver: u64) -> bool {
    driver & !device == 0 && driver & VIRTIO_F_VERSION_1 != 0
}

/// A virtio device behind the virtio-mmio register interface.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    /// One entry per device queue; `None` when the device asked for a size
    /// `virtio_queue` refuses (shown to the driver as QueueNumMax 0).
    queues: Vec<Option<Queue>>,
    device_type: u32,
    device_features: u64,
    device_features_sel: u32,
    driver_features: u64,
    driver_features_sel: u32,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("activated", &self.activated)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device`, its queues living in `mem`, interrupting
    /// through `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        let (device_type, device_features, queues) = {
            let dev = lock(&device);
            let queues = dev
                .queue_max_sizes()
                .iter()
                .map(|&max| match Queue::new(max) {
                    Ok(q) => Some(q),
                    Err(e) => {
                        log::error!("virtio-mmio: device queue size {max} refused: {e}");
                        None
                    }
                })
                .collect();
            (dev.device_type(), dev.avail_features(), queues)
        };
        Self {
            device,
            mem,
            interrupt,
            queues,
            device_type,
            device_features,
            device_features_sel: 0,
            driver_features: 0,
            driver_features_sel: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        }
    }

    /// The device behind this transport.
    pub fn device(&self) -> &Arc<Mutex<dyn VirtioDevice>> {
        &self.device
    }

    /// The interrupt of this transport.
    pub fn interrupt(&self) -> &Arc<VirtioInterrupt> {
        &self.interrupt
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Whether the device was activated (DRIVER_OK accepted).
    pub fn is_activated(&self) -> bool {
        self.activated
    }

    /// Records a device configuration change and notifies the driver: bumps
    /// ConfigGeneration and raises a configuration interrupt.
    pub fn notify_config_change(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
            log::error!("virtio-mmio: config interrupt failed: {e}");
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        let idx = usize::try_from(self.queue_sel).ok()?;
        self.queues.get(idx)?.as_ref()
    }

    /// The selected queue, if the driver may configure queues now
    /// (FEATURES_OK set, DRIVER_OK not yet).
    fn configurable_queue(&mut self) -> Option<&mut Queue> {
        if self.status & (FEATURES_OK | DRIVER_OK | FAILED | NEEDS_RESET) != FEATURES_OK {
            log::warn!(
                "virtio-mmio: queue configured in status {:#x}, ignored",
                self.status
            );
            return None;
        }
        let idx = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(idx)?.as_mut()
    }

    fn reset(&mut self) {
        lock(&self.device).reset();
        for q in self.queues.iter_mut().flatten() {
            q.reset();
        }
        self.device_features_sel = 0;
        self.driver_features = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.activated = false;
        self.interrupt.reset();
    }

    fn write_status(&mut self, value: u32) {
        match status_transition(self.status, value) {
            StatusTransition::Reset => self.reset(),
            StatusTransition::Set(s) => self.status = s,
            StatusTransition::Invalid => {
                log::warn!(
                    "virtio-mmio: invalid status write {value:#x} over {:#x}",
                    self.status
                );
            }
            StatusTransition::FeaturesOk(s) => {
                if features_acceptable(self.device_features, self.driver_features) {
                    lock(&self.device).set_acked_features(self.driver_features);
                    self.status = s;
                } else {
                    log::warn!(
                        "virtio-mmio: driver features {:#x} refused (offer {:#x})",
                        self.driver_features,
                        self.device_features
                    );
                    // FEATURES_OK stays clear: the driver sees the refusal.
                    self.status = s & !FEATURES_OK;
                }
            }
            StatusTransition::DriverOk(s) => match self.activate() {
                Ok(()) => {
                    self.status = s;
                    self.activated = true;
                }
                Err(e) => {
                    log::error!("virtio-mmio: activation failed: {e}");
                    self.status = s | NEEDS_RESET;
                    if let Err(e) = self.interrupt.trigger(InterruptKind::Config) {
                        log::error!("virtio-mmio: config interrupt failed: {e}");
                    }
                }
            },
        }
    }

    /// Validates the ready queues and hands copies of them to the device.
    fn activate(&mut self) -> Result<(), MmioError> {
        let mem = self.mem.memory();
        let mut ready = Vec::new();
        for (index, q) in self.queues.iter().enumerate() {
            let Some(q) = q.as_ref().filter(|q| q.ready()) else {
                continue;
            };
            if !q.is_valid(&*mem) {
                return Err(MmioError::InvalidQueue(index));
            }
            let mut copy =
                Queue::try_from(q.state()).map_err(|_| MmioError::InvalidQueue(index))?;
            copy.set_event_idx(self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0);
            ready.push(copy);
        }
        drop(mem);
        lock(&self.device)
            .activate(self.mem.clone(), self.interrupt.clone(), ready)
            .map_err(MmioError::Activate)
    }

    fn notify_queue(&self, index: u32) {
        let dev = lock(&self.device);
        match usize::try_from(index)
            .ok()
            .and_then(|i| dev.queue_events().get(i))
        {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    log::error!("virtio-mmio: queue {index} notification failed: {e}");
                }
            }
            None => log::debug!("virtio-mmio: notification of unknown queue {index}"),
        }
    }

    /// Value of the 32-bit register at `offset` (below the config space).
    fn read_register(&self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => feature_word(self.device_features, self.device_features_sel),
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.status,
            // No shared memory regions: their length reads as -1.
            reg::SHM_LEN_LOW | reg::SHM_LEN_HIGH | reg::SHM_BASE_LOW | reg::SHM_BASE_HIGH => {
                u32::MAX
            }
            reg::CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of write-only or unknown register {offset:#x}");
                0
            }
        }
    }

    /// Handles a 32-bit write at `offset` (below the config space).
    fn write_register(&mut self, offset: u64, value: u32) {
        let driver_may_negotiate = self.status & (DRIVER | FEATURES_OK | FAILED) == DRIVER;
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = value,
            reg::DRIVER_FEATURES if driver_may_negotiate => {
                let v = u64::from(value);
                match self.driver_features_sel {
                    0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v,
                    1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (v << 32),
                    _ if value != 0 => {
                        log::warn!("virtio-mmio: driver features word out of range, ignored");
                    }
                    _ => {}
                }
            }
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            reg::QUEUE_SEL => self.queue_sel = value,
            reg::QUEUE_NUM => {
                if let Some(q) = self.configurable_queue() {
                    let size = u16::try_from(value).unwrap_or(0);
                    if let Err(e) = q.try_set_size(size) {
                        log::warn!("virtio-mmio: queue size {value}: {e}");
                    }
                }
            }
            reg::QUEUE_READY => {
                if let Some(q) = self.configurable_queue() {
                    q.set_ready(value == 1);
                }
            }
            reg::QUEUE_NOTIFY => self.notify_queue(value),
            reg::INTERRUPT_ACK => self.interrupt.acknowledge(value),
            reg::STATUS => self.write_status(value),
            reg::QUEUE_DESC_LOW => {
                if let Some(q) = self.configurable_queue() {
                    q.set_desc_table_address(Some(value), None);
                }
            }
            reg::QUEUE_DESC_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    q.set_desc_table_address(None, Some(value));
                }
            }
            reg::QUEUE_DRIVER_LOW => {
                if let Some(q) = self.configurable_queue() {
                    q.set_avail_ring_address(Some(value), None);
                }
            }
            reg::QUEUE_DRIVER_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    q.set_avail_ring_address(None, Some(value));
                }
            }
            reg::QUEUE_DEVICE_LOW => {
                if let Some(q) = self.configurable_queue() {
                    q.set_used_ring_address(Some(value), None);
                }
            }
            reg::QUEUE_DEVICE_HIGH => {
                if let Some(q) = self.configurable_queue() {
                    q.set_used_ring_address(None, Some(value));
                }
            }
            reg::SHM_SEL => {}
            _ => log::debug!("virtio-mmio: write of read-only or unknown register {offset:#x}"),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).read_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <&mut [u8; 4]>::try_from(&mut *data) {
            Ok(word) if offset.is_multiple_of(4) => {
                *word = self.read_register(offset).to_le_bytes()
            }
            _ => {
                log::debug!(
                    "virtio-mmio: bad read of {} bytes at {offset:#x}",
                    data.len()
                );
                data.fill(0);
            }
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            lock(&self.device).write_config(offset - CONFIG_SPACE_OFFSET, data);
            return;
        }
        match <[u8; 4]>::try_from(data) {
            Ok(word) if offset.is_multiple_of(4) => {
                self.write_register(offset, u32::from_le_bytes(word))
            }
            _ => log::debug!(
                "virtio-mmio: bad write of {} bytes at {offset:#x}",
                data.len()
            ),
        }
    }
}

/// Why the transport could not activate its device.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
    /// Queue {0} is ready but its rings are not in guest memory.
    #[error("queue {0} is ready but its rings are not in guest memory")]
    InvalidQueue(usize),
    /// The device refused activation.
    #[error("device activation: {0}")]
    Activate(#[source] super::ActivateError),
}

/// DSDT description of a virtio-mmio device (ACPI `_HID` "LNRO0005").
///
/// Emits `Device(Vxxx) { _HID, _UID, _CRS }` with the 4 KiB MMIO window and
/// an edge-triggered, active-high, exclusive interrupt. `xxx` is the index in
/// hexadecimal, modulo 0x1000.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioAcpiDevice {
    /// Index of the device among the virtio-mmio devices (`_UID`).
    pub index: usize,
    /// Base guest physical address of the MMIO window.
    pub base: u64,
    /// Global system interrupt (GSI) of the device.
    pub irq: u32,
}

impl Aml for MmioAcpiDevice {
    fn to_aml_bytes(&self, sink: &mut dyn AmlSink) {
        let name = format!("V{:03X}", self.index % 0x1000);
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &self.index);
        let irq = aml::Interrupt::new(true, true, false, false, self.irq);
        let mem32;
        let mem64;
        let window: &dyn Aml = match u32::try_from(self.base) {
            Ok(base) if base.checked_add(0x1000).is_some() => {
                mem32 = aml::Memory32Fixed::new(true, base, 0x1000);
                &mem32
            }
            _ => {
                mem64 = aml::AddressSpace::new_memory(
                    aml::AddressSpaceCacheable::NotCacheable,
                    true,
                    self.base,
                    self.base.saturating_add(MMIO_SIZE - 1),
                    None,
                );
                &mem64
            }
        };
        let resources = aml::ResourceTemplate::new(vec![window, &irq]);
        let crs = aml::Name::new("_CRS".into(), &resources);
        aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]).to_aml_bytes(sink);
    }
}

/// DSDT entry for the virtio-mmio device number `index` at `base` using
/// interrupt `irq` (see [`MmioAcpiDevice`]).
pub fn acpi_device(index: usize, base: u64, irq: u32) -> MmioAcpiDevice {
    MmioAcpiDevice { index, base, irq }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::ActivateError;
    use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
    use vmm_sys_util::eventfd::EventFd;

    const FEATURE_A: u64 = 1 << 3;
    const FEATURE_HIGH: u64 = 1 << 40;

    /// What the fake device was asked to do.
    #[derive(Default)]
    struct Calls {
        acked: Option<u64>,
        activated: Vec<(u16, u64, u64, u64)>,
        resets: usize,
    }

    struct FakeDevice {
        sizes: Vec<u16>,
        evts: Vec<EventFd>,
        config: [u8; 8],
        calls: Calls,
    }

    impl FakeDevice {
        fn new(sizes: &[u16]) -> Self {
            Self {
                sizes: sizes.to_vec(),
                evts: sizes
                    .iter()
                    .map(|_| EventFd::new(libc::EFD_NONBLOCK).unwrap())
                    .collect(),
                config: *b"cfgbytes",
                calls: Calls::default(),
            }
        }
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn avail_features(&self) -> u64 {
            VIRTIO_F_VERSION_1 | FEATURE_A | FEATURE_HIGH
        }
        fn set_acked_features(&mut self, features: u64) {
            self.calls.acked = Some(features);
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(0);
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            if let Some(src) = self.config.get(start..) {
                let n = src.len().min(data.len());
                data[..n].copy_from_slice(&src[..n]);
            }
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            let start = usize::try_from(offset).unwrap_or(usize::MAX);
            if let Some(dst) = self.config.get_mut(start..) {
                let n = dst.len().min(data.len());
                dst[..n].copy_from_slice(&data[..n]);
            }
        }
        fn queue_events(&self) -> &[EventFd] {
            &self.evts
        }
        fn activate(
            &mut self,
            _mem: GuestMemory,
            _interrupt: Arc<VirtioInterrupt>,
            queues: Vec<Queue>,
        ) -> Result<(), ActivateError> {
            if queues.len() != 2 {
                return Err(ActivateError::QueueCount {
                    expected: 2,
                    got: queues.len(),
                });
            }
            self.calls.activated = queues
                .iter()
                .map(|q| (q.size(), q.desc_table(), q.avail_ring(), q.used_ring()))
                .collect();
            Ok(())
        }
        fn reset(&mut self) {
            self.calls.resets += 1;
        }
    }

    struct Setup {
        transport: MmioTransport,
        device: Arc<Mutex<FakeDevice>>,
        irq: EventFd,
    }

    fn setup() -> Setup {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let device = Arc::new(Mutex::new(FakeDevice::new(&[16, 8])));
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        let transport = MmioTransport::new(
            device.clone() as Arc<Mutex<dyn VirtioDevice>>,
            GuestMemoryAtomic::new(mem),
            interrupt,
        );
        Setup {
            transport,
            device,
            irq,
        }
    }

    fn r(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn w(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// ACKNOWLEDGE, DRIVER, features, FEATURES_OK.
    fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
        w(t, reg::STATUS, ACKNOWLEDGE);
        w(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, feature_word(features, 0));
        w(t, reg::DRIVER_FEATURES_SEL, 1);
        w(t, reg::DRIVER_FEATURES, feature_word(features, 1));
        w(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        r(t, reg::STATUS)
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        w(t, reg::QUEUE_SEL, index);
        assert_eq!(r(t, reg::QUEUE_READY), 0);
        w(t, reg::QUEUE_NUM, size);
        w(t, reg::QUEUE_DESC_LOW, feature_word(base, 0));
        w(t, reg::QUEUE_DESC_HIGH, feature_word(base, 1));
        w(t, reg::QUEUE_DRIVER_LOW, feature_word(base + 0x1000, 0));
        w(t, reg::QUEUE_DRIVER_HIGH, feature_word(base + 0x1000, 1));
        w(t, reg::QUEUE_DEVICE_LOW, feature_word(base + 0x2000, 0));
        w(t, reg::QUEUE_DEVICE_HIGH, feature_word(base + 0x2000, 1));
        w(t, reg::QUEUE_READY, 1);
        assert_eq!(r(t, reg::QUEUE_READY), 1);
    }

    #[test]
    fn identity_registers() {
        let Setup { mut transport, .. } = setup();
        let t = &mut transport;
        assert_eq!(r(t, reg::MAGIC_VALUE), 0x7472_6976);
        assert_eq!(r(t, reg::VERSION), 2);
        assert_eq!(r(t, reg::DEVICE_ID), 42);
        assert_eq!(r(t, reg::VENDOR_ID), VENDOR_ID);
        assert_eq!(r(t, reg::SHM_LEN_LOW), u32::MAX);
        assert_eq!(r(t, reg::SHM_LEN_HIGH), u32::MAX);
        assert_eq!(r(t, reg::CONFIG_GENERATION), 0);
        assert_eq!(r(t, reg::QUEUE_NOTIFY), 0);
        assert_eq!(r(t, 0x0f0), 0);
        w(t, reg::QUEUE_SEL, 1);
        assert_eq!(r(t, reg::QUEUE_NUM_MAX), 8);
        w(t, reg::QUEUE_SEL, 0);
        assert_eq!(r(t, reg::QUEUE_NUM_MAX), 16);
        w(t, reg::DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(t, reg::DEVICE_FEATURES), 1 << 3);
        w(t, reg::DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(t, reg::DEVICE_FEATURES), 1 | (1 << 8));
        w(t, reg::DEVICE_FEATURES_SEL, 2);
        assert_eq!(r(t, reg::DEVICE_FEATURES), 0);
        t.notify_config_change();
        assert_eq!(r(t, reg::CONFIG_GENERATION), 1);
        assert_eq!(r(t, reg::INTERRUPT_STATUS), 2);
    }

    #[test]
    fn feature_negotiation() {
        let Setup {
            mut transport,
            device,
            ..
        } = setup();
        let t = &mut transport;
        // Features written before DRIVER are ignored.
        w(t, reg::DRIVER_FEATURES, 0xffff_ffff);
        let s = negotiate(t, VIRTIO_F_VERSION_1 | FEATURE_A);
        assert_eq!(s, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(
            device.lock().unwrap().calls.acked,
            Some(VIRTIO_F_VERSION_1 | FEATURE_A)
        );
        // Features cannot change once accepted.
        w(t, reg::DRIVER_FEATURES_SEL, 0);
        w(t, reg::DRIVER_FEATURES, 0);
        assert_eq!(t.driver_features, VIRTIO_F_VERSION_1 | FEATURE_A);

        // A feature not offered: FEATURES_OK stays clear.
        w(t, reg::STATUS, 0);
        device.lock().unwrap().calls.acked = None;
        let s = negotiate(t, VIRTIO_F_VERSION_1 | (1 << 5));
        assert_eq!(s, ACKNOWLEDGE | DRIVER);
        assert_eq!(device.lock().unwrap().calls.acked, None);
        // Nor without VERSION_1 (legacy driver).
        w(t, reg::STATUS, 0);
        let s = negotiate(t, FEATURE_A);
        assert_eq!(s, ACKNOWLEDGE | DRIVER);
        // The driver may retry after a reset.
        w(t, reg::STATUS, 0);
        let s = negotiate(t, VIRTIO_F_VERSION_1 | FEATURE_HIGH);
        assert_eq!(s, ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(
            device.lock().unwrap().calls.acked,
            Some(VIRTIO_F_VERSION_1 | FEATURE_HIGH)
        );
        // Feature select beyond the second word is ignored.
        assert!(features_acceptable(VIRTIO_F_VERSION_1, VIRTIO_F_VERSION_1));
    }

    #[test]
    fn queue_setup_and_activation() {
        let Setup {
            mut transport,
            device,
            irq,
        } = setup();
        let t = &mut transport;
        // Queue registers before FEATURES_OK are ignored.
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_READY, 1);
        assert_eq!(r(t, reg::QUEUE_READY), 0);
        negotiate(t, VIRTIO_F_VERSION_1);
        // Invalid sizes keep the previous one.
        w(t, reg::QUEUE_NUM, 3);
        w(t, reg::QUEUE_NUM, 32);
        w(t, reg::QUEUE_NUM, 0x1_0000);
        setup_queue(t, 0, 8, 0x1_0000);
        setup_queue(t, 1, 8, 0x2_0000);
        // Misaligned ring addresses are refused by virtio_queue.
        w(t, reg::QUEUE_SEL, 1);
        w(t, reg::QUEUE_DESC_LOW, 0x2_0001);
        w(
            t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(
            r(t, reg::STATUS),
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK
        );
        assert!(t.is_activated());
        assert_eq!(
            device.lock().unwrap().calls.activated,
            vec![
                (8, 0x1_0000, 0x1_1000, 0x1_2000),
                (8, 0x2_0000, 0x2_1000, 0x2_2000)
            ]
        );
        // Queue registers are frozen while the device runs.
        w(t, reg::QUEUE_SEL, 0);
        w(t, reg::QUEUE_READY, 0);
        assert_eq!(r(t, reg::QUEUE_READY), 1);
        // Notifications reaching the bus signal the queue's eventfd.
        w(t, reg::QUEUE_NOTIFY, 1);
        assert_eq!(device.lock().unwrap().evts[1].read().unwrap(), 1);
        assert!(device.lock().unwrap().evts[0].read().is_err());
        w(t, reg::QUEUE_NOTIFY, 2);
        w(t, reg::QUEUE_NOTIFY, u32::MAX);
        // Interrupt status and acknowledgement.
        t.interrupt().trigger(InterruptKind::Queue).unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(r(t, reg::INTERRUPT_STATUS), 1);
        w(t, reg::INTERRUPT_ACK, 1);
        assert_eq!(r(t, reg::INTERRUPT_STATUS), 0);
        // Config space is the device's.
        let mut b = [0u8; 3];
        t.read(CONFIG_SPACE_OFFSET + 3, &mut b);
        assert_eq!(&b, b"byt");
        t.write(CONFIG_SPACE_OFFSET + 1, b"XY");
        let mut b = [0u8; 10];
        t.read(CONFIG_SPACE_OFFSET, &mut b);
        assert_eq!(&b, b"cXYbytes\0\0");
        t.read(MMIO_SIZE - 1, &mut b[..1]);
        assert_eq!(b[0], 0);
    }

    #[test]
    fn activation_failure_needs_reset() {
        let Setup {
            mut transport,
            device,
            irq,
        } = setup();
        let t = &mut transport;
        negotiate(t, VIRTIO_F_VERSION_1);
        // Rings outside guest memory.
        setup_queue(t, 0, 8, 0x1_0000);
        setup_queue(t, 1, 8, 0xfff_0000);
        w(
            t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(!t.is_activated());
        assert_ne!(r(t, reg::STATUS) & NEEDS_RESET, 0);
        assert_eq!(r(t, reg::INTERRUPT_STATUS), 2);
        assert_eq!(irq.read().unwrap(), 1);
        assert!(device.lock().unwrap().calls.activated.is_empty());

        // Reset, then a driver that makes only one queue ready: the device
        // refuses (wrong queue count).
        w(t, reg::STATUS, 0);
        assert_eq!(r(t, reg::STATUS), 0);
        assert_eq!(r(t, reg::INTERRUPT_STATUS), 0);
        negotiate(t, VIRTIO_F_VERSION_1);
        setup_queue(t, 0, 8, 0x1_0000);
        w(
            t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(!t.is_activated());
        assert_ne!(r(t, reg::STATUS) & NEEDS_RESET, 0);
        // Nothing but a reset helps now.
        w(
            t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(!t.is_activated());
    }

    #[test]
    fn reset_clears_everything() {
        let Setup {
            mut transport,
            device,
            ..
        } = setup();
        let t = &mut transport;
        negotiate(t, VIRTIO_F_VERSION_1);
        setup_queue(t, 0, 8, 0x1_0000);
        setup_queue(t, 1, 8, 0x2_0000);
        w(
            t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.is_activated());
        t.interrupt().trigger(InterruptKind::Queue).unwrap();
        let resets = device.lock().unwrap().calls.resets;
        w(t, reg::STATUS, 0);
        assert_eq!(device.lock().unwrap().calls.resets, resets + 1);
        assert!(!t.is_activated());
        assert_eq!(r(t, reg::STATUS), 0);
        assert_eq!(r(t, reg::INTERRUPT_STATUS), 0);
        for q in 0..2 {
            w(t, reg::QUEUE_SEL, q);
            assert_eq!(r(t, reg::QUEUE_READY), 0);
        }
        assert_eq!(t.driver_features, 0);
        // The device can be brought up again.
        negotiate(t, VIRTIO_F_VERSION_1);
        setup_queue(t, 0, 16, 0x3_0000);
        setup_queue(t, 1, 8, 0x4_0000);
        w(
            t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert!(t.is_activated());
        assert_eq!(device.lock().unwrap().calls.activated[0].0, 16);
    }

    #[test]
    fn bad_accesses_are_harmless() {
        let Setup {
            mut transport,
            device,
            ..
        } = setup();
        let t = &mut transport;
        // Wrong sizes and misaligned offsets.
        for len in [0usize, 1, 2, 3, 8] {
            let mut b = vec![0xffu8; len];
            t.read(reg::MAGIC_VALUE, &mut b);
            assert!(b.iter().all(|x| *x == 0));
            t.write(reg::STATUS, &vec![1u8; len]);
        }
        assert_eq!(r(t, reg::STATUS), 0);
        assert_eq!(r(t, 0x1), 0);
        w(t, reg::STATUS + 1, ACKNOWLEDGE);
        assert_eq!(r(t, reg::STATUS), 0);
        // Out-of-order status writes.
        w(t, reg::STATUS, DRIVER_OK);
        w(t, reg::STATUS, DRIVER);
        w(t, reg::STATUS, FEATURES_OK);
        w(t, reg::STATUS, NEEDS_RESET);
        w(t, reg::STATUS, 0x100);
        assert_eq!(r(t, reg::STATUS), 0);
        w(t, reg::STATUS, DRIVER | FEATURES_OK);
        assert_eq!(r(t, reg::STATUS), 0);
        w(t, reg::STATUS, ACKNOWLEDGE);
        w(t, reg::STATUS, ACKNOWLEDGE | DRIVER | DRIVER_OK);
        assert_eq!(r(t, reg::STATUS), ACKNOWLEDGE);
        w(t, reg::STATUS, ACKNOWLEDGE | FEATURES_OK);
        assert_eq!(r(t, reg::STATUS), ACKNOWLEDGE);
        w(t, reg::STATUS, ACKNOWLEDGE | DRIVER);
        // Clearing a bit without reset is refused.
        w(t, reg::STATUS, ACKNOWLEDGE);
        assert_eq!(r(t, reg::STATUS), ACKNOWLEDGE | DRIVER);
        // Setting FEATURES_OK and DRIVER_OK at once is refused.
        w(
            t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
        );
        assert_eq!(r(t, reg::STATUS), ACKNOWLEDGE | DRIVER);
        // Out-of-range queue selection.
        negotiate(t, VIRTIO_F_VERSION_1);
        for sel in [2, u32::MAX] {
            w(t, reg::QUEUE_SEL, sel);
            assert_eq!(r(t, reg::QUEUE_NUM_MAX), 0);
            assert_eq!(r(t, reg::QUEUE_READY), 0);
            for reg in [
                reg::QUEUE_NUM,
                reg::QUEUE_READY,
                reg::QUEUE_DESC_LOW,
                reg::QUEUE_DESC_HIGH,
                reg::QUEUE_DRIVER_LOW,
                reg::QUEUE_DRIVER_HIGH,
                reg::QUEUE_DEVICE_LOW,
                reg::QUEUE_DEVICE_HIGH,
            ] {
                w(t, reg, 1);
            }
        }
        // Writes to read-only registers and unknown offsets.
        for off in (0..CONFIG_SPACE_OFFSET).step_by(4) {
            if off != reg::STATUS && off != reg::QUEUE_SEL && off != reg::QUEUE_NOTIFY {
                w(t, off, 0xdead_beef);
            }
        }
        assert_eq!(r(t, reg::MAGIC_VALUE), MMIO_MAGIC_VALUE);
        // FAILED is accepted at any time.
        w(t, reg::STATUS, ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED);
        assert_ne!(r(t, reg::STATUS) & FAILED, 0);
        w(
            t,
            reg::STATUS,
            ACKNOWLEDGE | DRIVER | FEATURES_OK | FAILED | DRIVER_OK,
        );
        assert!(!t.is_activated());
        // Config space far away.
        let mut b = [0xffu8; 4];
        t.read(u64::MAX, &mut b);
        assert_eq!(b, [0; 4]);
        t.write(u64::MAX, &b);
        assert!(device.lock().unwrap().calls.activated.is_empty());
    }

    #[test]
    fn status_transitions() {
        use StatusTransition::*;
        assert_eq!(status_transition(0xf, 0), Reset);
        assert_eq!(status_transition(0, ACKNOWLEDGE), Set(ACKNOWLEDGE));
        assert_eq!(
            status_transition(ACKNOWLEDGE, ACKNOWLEDGE),
            Set(ACKNOWLEDGE)
        );
        assert_eq!(status_transition(0, DRIVER), Invalid);
        assert_eq!(
            status_transition(ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | FEATURES_OK),
            FeaturesOk(ACKNOWLEDGE | DRIVER | FEATURES_OK)
        );
        let all = ACKNOWLEDGE | DRIVER | FEATURES_OK;
        assert_eq!(
            status_transition(all, all | DRIVER_OK),
            DriverOk(all | DRIVER_OK)
        );
        assert_eq!(
            status_transition(all | NEEDS_RESET, all | DRIVER_OK),
            Invalid
        );
        assert_eq!(
            status_transition(all | NEEDS_RESET, all | FAILED),
            Set(all | NEEDS_RESET | FAILED)
        );
        assert_eq!(status_transition(all, ACKNOWLEDGE), Invalid);
        assert_eq!(status_transition(0, NEEDS_RESET), Invalid);
    }

    #[test]
    fn acpi_description() {
        let mut bytes = Vec::new();
        acpi_device(3, 0xd000_0000, 5).to_aml_bytes(&mut bytes);
        let find = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
        // Device(V003) with _HID "LNRO0005".
        assert_eq!(&bytes[..2], &[0x5b, 0x82]);
        assert!(find(b"V003"));
        assert!(find(b"_HID\x0dLNRO0005\0"));
        assert!(find(b"_UID"));
        // Memory32Fixed(ReadWrite, 0xd0000000, 0x1000).
        assert!(find(&[0x86, 9, 0, 1, 0, 0, 0, 0xd0, 0, 0x10, 0, 0]));
        // Extended interrupt: consumer, edge, active-high, exclusive, GSI 5.
        assert!(find(&[0x89, 6, 0, 0x3, 1, 5, 0, 0, 0]));
        // A window above 4 GiB falls back to a QWord memory descriptor.
        let mut high = Vec::new();
        acpi_device(4097, 0x1_0000_0000, 6).to_aml_bytes(&mut high);
        assert!(high.windows(4).any(|w| w == b"V001"));
        assert!(high.contains(&0x8a));
    }
}
