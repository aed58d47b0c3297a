//! Target `virtio_mmio`: the virtio-mmio register interface and queue
//! setup, driving a real device (virtio-mem, balloon or block, chosen by
//! the first byte) through register reads and writes of any offset and
//! width, config space accesses, guest memory writes and queue processing.
//!
//! Invariants checked:
//! - no panic, no arithmetic overflow;
//! - MagicValue, Version, DeviceID and VendorID always read their
//!   constants; InterruptStatus holds only the two defined bits;
//!   QueueNumMax is the device's for its queues and 0 for the others;
//! - the transport is activated exactly when the device is, and then
//!   Status has DRIVER_OK;
//! - the device's counters stay consistent (see `crate::devices`);
//! - afterwards a driver that resets the device through Status and sets it
//!   up again on fresh rings gets a valid request answered.

use std::sync::{Arc, Mutex, MutexGuard};

use devices::bus::BusDevice;
use devices::virtio::balloon::Balloon;
use devices::virtio::block::Block;
use devices::virtio::mem::VirtioMem;
use devices::virtio::mmio::{MmioTransport, MMIO_MAGIC_VALUE, MMIO_VERSION, VENDOR_ID};
use devices::virtio::{VirtioDevice, VIRTIO_F_VERSION_1};
use vm_memory::GuestMemoryMmap;

use crate::devices::{
    atomic, balloon_device, balloon_probe_check, balloon_probe_post, block_device,
    block_probe_check, block_probe_post, check_balloon, check_block, check_mem, interrupt,
    mem_device, mem_probe_check, mem_probe_post, ModelBackend,
};
use crate::guest::{fill, memory, RingLayout};
use crate::input::{Bytes, Seed};

const DEVICE_ID: u64 = 0x08;
const DEVICE_FEATURES: u64 = 0x10;
const DEVICE_FEATURES_SEL: u64 = 0x14;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM_MAX: u64 = 0x34;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const INTERRUPT_STATUS: u64 = 0x60;
const STATUS: u64 = 0x70;
const QUEUE_DESC_LOW: u64 = 0x80;
const DRIVER_OK: u32 = 4;

enum Dev {
    Mem(Arc<Mutex<VirtioMem>>, ModelBackend),
    Balloon(Arc<Mutex<Balloon>>),
    Block(Arc<Mutex<Block>>, u64),
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Dev {
    fn dyn_device(&self) -> Arc<Mutex<dyn VirtioDevice>> {
        match self {
            Dev::Mem(d, _) => d.clone(),
            Dev::Balloon(d) => d.clone(),
            Dev::Block(d, _) => d.clone(),
        }
    }

    fn activated(&self) -> bool {
        match self {
            Dev::Mem(d, _) => lock(d).is_activated(),
            Dev::Balloon(d) => lock(d).is_activated(),
            Dev::Block(d, _) => lock(d).is_activated(),
        }
    }

    fn process(&mut self, queue: usize) {
        match self {
            Dev::Mem(d, _) => lock(d).process_queue(),
            Dev::Balloon(d) => lock(d).process_queue(queue),
            Dev::Block(d, n) => *n += lock(d).process_queue() as u64,
        }
    }

    fn check(&self) {
        match self {
            Dev::Mem(d, backend) => check_mem(&lock(d), backend),
            Dev::Balloon(d) => check_balloon(&lock(d), false),
            Dev::Block(d, n) => check_block(&lock(d), *n),
        }
    }
}

fn write32(t: &mut MmioTransport, offset: u64, value: u32) {
    t.write(offset, &value.to_le_bytes());
}

fn read32(t: &mut MmioTransport, offset: u64) -> u32 {
    let mut word = [0u8; 4];
    t.read(offset, &mut word);
    u32::from_le_bytes(word)
}

/// What a Linux driver does at probe: reset, ACKNOWLEDGE, DRIVER, features
/// (the offer masked by `mask`, plus VERSION_1), FEATURES_OK, every queue
/// at the fixed ring layout with `size`, DRIVER_OK.
fn driver_init(t: &mut MmioTransport, mask: u64, size: u32, queues: u32) {
    for status in [0, 1, 3] {
        write32(t, STATUS, status);
    }
    let mut offer = 0u64;
    for sel in [1u32, 0] {
        write32(t, DEVICE_FEATURES_SEL, sel);
        offer = offer << 32 | u64::from(read32(t, DEVICE_FEATURES));
    }
    let features = offer & (mask | VIRTIO_F_VERSION_1);
    for sel in [0u32, 1] {
        write32(t, DRIVER_FEATURES_SEL, sel);
        write32(t, DRIVER_FEATURES, (features >> (32 * sel)) as u32);
    }
    write32(t, STATUS, 11);
    for q in 0..queues {
        let l = RingLayout::of(q as usize);
        write32(t, QUEUE_SEL, q);
        write32(t, QUEUE_NUM, size);
        for (i, a) in [l.desc, l.avail, l.used].into_iter().enumerate() {
            write32(t, QUEUE_DESC_LOW + 0x10 * i as u64, a as u32);
            write32(t, QUEUE_DESC_LOW + 0x10 * i as u64 + 4, (a >> 32) as u32);
        }
        write32(t, QUEUE_READY, 1);
    }
    write32(t, STATUS, 15);
}

fn check_transport(t: &mut MmioTransport, dev: &Dev, device_type: u32) {
    let mut word = [0u8; 4];
    for (offset, want) in [
        (0x0, MMIO_MAGIC_VALUE),
        (0x4, MMIO_VERSION),
        (DEVICE_ID, device_type),
        (0xc, VENDOR_ID),
    ] {
        t.read(offset, &mut word);
        assert_eq!(u32::from_le_bytes(word), want, "register {offset:#x}");
    }
    assert_eq!(read32(t, INTERRUPT_STATUS) & !3, 0, "interrupt status bits");
    assert_eq!(
        t.is_activated(),
        dev.activated(),
        "transport vs device activation"
    );
    if t.is_activated() {
        assert_ne!(t.status() & DRIVER_OK, 0, "activated without DRIVER_OK");
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let mut b = Bytes::new(data);
    let mem: GuestMemoryMmap = memory();
    let mut dev = match b.u8() % 3 {
        0 => {
            let (d, backend) = mem_device();
            Dev::Mem(Arc::new(Mutex::new(d)), backend)
        }
        1 => Dev::Balloon(Arc::new(Mutex::new(balloon_device(1 << 20, 1)))),
        _ => Dev::Block(Arc::new(Mutex::new(block_device(false))), 0),
    };
    let device = dev.dyn_device();
    let (device_type, max_sizes) = {
        let d = lock(&device);
        (d.device_type(), d.queue_max_sizes().to_vec())
    };
    let queues = u32::try_from(max_sizes.len()).expect("queue count");
    let mut t = MmioTransport::new(device, atomic(&mem), interrupt());
    let mut steps = 0;
    while !b.is_empty() && steps < 256 {
        steps += 1;
        match b.u8() % 8 {
            0 => {
                let offset = u64::from(b.u8() % 64) * 4;
                write32(&mut t, offset, b.u32());
            }
            1 => {
                let q = b.u8();
                write32(&mut t, QUEUE_SEL, u32::from(q));
                let max = read32(&mut t, QUEUE_NUM_MAX);
                let want = max_sizes.get(usize::from(q)).copied().unwrap_or(0);
                assert_eq!(max, u32::from(want), "QueueNumMax of queue {q}");
            }
            2 => {
                let offset = 0x100 + u64::from(b.u8());
                let len = usize::from(b.u8() % 9);
                t.write(offset, b.take(len));
            }
            3 => {
                let offset = 0x100 + u64::from(b.u8());
                let mut buf = vec![0u8; usize::from(b.u8() % 9)];
                t.read(offset, &mut buf);
            }
            4 => {
                let offset = u64::from(b.u16()) % 0x1000;
                let len = usize::from(b.u8() % 9);
                if b.bool() {
                    t.write(offset, b.take(len));
                } else {
                    let mut buf = vec![0u8; len];
                    t.read(offset, &mut buf);
                }
            }
            5 => {
                let at = crate::guest::addr(&mut b);
                fill(&mem, at, b.blob());
            }
            6 => {
                let q = usize::from(b.u8() % 4);
                dev.process(q);
            }
            _ => {
                let mask = b.u64();
                let size = 1u32 << (b.u8() % 10);
                driver_init(&mut t, mask, size, queues);
            }
        }
        check_transport(&mut t, &dev, device_type);
        dev.check();
    }
    // A driver that starts over gets a valid request answered.
    match &mut dev {
        Dev::Mem(d, backend) => {
            backend.set_fail(crate::devices::FailMode::None);
            mem_probe_post(&mem);
            driver_init(&mut t, u64::MAX, 8, queues);
            assert!(
                t.is_activated(),
                "virtio-mem not activated by a valid setup"
            );
            lock(d).process_queue();
            mem_probe_check(&lock(d), backend, &mem);
        }
        Dev::Balloon(d) => {
            balloon_probe_post(&mem);
            for q in 2..4 {
                crate::devices::clear_rings(&mem, q);
            }
            driver_init(&mut t, 0, 8, queues);
            assert!(t.is_activated(), "balloon not activated by a valid setup");
            lock(d).process_queue(0);
            balloon_probe_check(&lock(d), &mem);
        }
        Dev::Block(d, _) => {
            block_probe_post(&mem);
            driver_init(&mut t, u64::MAX, 8, queues);
            assert!(
                t.is_activated(),
                "virtio-blk not activated by a valid setup"
            );
            assert_eq!(lock(d).process_queue(), 1);
            block_probe_check(&mem);
        }
    }
}

/// Seed inputs: a standard probe of each device, then a request.
pub fn seeds() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for device in 0..3u8 {
        let mut s = Seed::new();
        s.u8(device);
        s.u8(7).u64(u64::MAX).u8(3); // driver_init, queue size 8
        s.u8(1).u8(0); // QueueNumMax of queue 0
        s.u8(3).u8(0).u8(8); // config read
        s.u8(6).u8(0); // process queue 0
        s.u8(0).u8(0x70 / 4).u32(0); // reset
        out.push(s.finish());
    }
    // A driver that configures queues out of order and sets bad features.
    let mut s = Seed::new();
    s.u8(0);
    for (reg, val) in [
        (0x70u64, 1u32),
        (0x70, 3),
        (0x38, 8),
        (0x24, 1),
        (0x20, 0),
        (0x70, 11),
    ] {
        s.u8(0).u8((reg / 4) as u8).u32(val);
    }
    out.push(s.finish());
    out
}
