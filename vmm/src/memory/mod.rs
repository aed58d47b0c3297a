//! The memory manager: boot memory, the hotplug region and its KVM slots.
//!
//! - [`backing`]: host memory (anonymous, memfd, hugetlb) for a guest range.
//! - [`slots`]: KVM memslot ids and registration.
//! - [`hotplug`]: the resizable-slot hotplug region virtio-mem plugs into.

pub mod backing;
pub mod hotplug;
pub mod slots;

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use crate::config::{HotplugMethod, MemoryConfig};
use backing::{Backing, BackingError};
use hotplug::HotplugRegion;
use slots::{SlotError, SlotMap};

/// Why guest memory could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Host memory could not be allocated.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// KVM refused a memslot.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// The regions do not form a valid guest memory map.
    #[error("invalid guest memory layout: {0}")]
    Layout(String),
}

/// Alignment of the hotplug region's base: 1 GiB keeps it aligned for any
/// Linux memory block size and any virtio-mem block size up to 1 GiB.
const HOTPLUG_ALIGN: u64 = 1 << 30;

/// Owns guest memory: boot RAM (fixed) and the hotplug region (resizable).
pub struct MemoryManager {
    vm: Arc<VmFd>,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    slot_ids: Arc<Mutex<SlotMap>>,
    boot_size: u64,
    hotplug: Option<Arc<Mutex<HotplugRegion>>>,
    config: MemoryConfig,
}

impl MemoryManager {
    /// Allocates boot memory, registers it with KVM and reserves the
    /// hotplug region (mapped nowhere until plugged).
    ///
    /// `balloon` says that a balloon will give back single 4 KiB pages of
    /// boot memory: boot memory then stays on 4 KiB host pages, since a
    /// discarded page inside a transparent huge page frees nothing until
    /// the host splits it. Otherwise boot memory, like the hotplug region,
    /// asks for huge pages.
    pub fn new(vm: Arc<VmFd>, config: &MemoryConfig, balloon: bool) -> Result<Self, MemoryError> {
        let regions = arch::boot_ram_regions(config.size);
        let mut boot_backing = Backing::new(
            config.size,
            config.shared,
            config.hugepages,
            config.prefault,
            false,
        )?;
        if !balloon {
            boot_backing = boot_backing.with_transparent_huge_pages();
        }
        let mut slot_ids = SlotMap::new();
        let mut mapped = Vec::new();
        let mut offset = 0;
        for (addr, len) in regions {
            let len = len as u64;
            let region = boot_backing.map(offset, len, addr)?;
            slot_ids.map(&vm, &region)?;
            mapped.push(region);
            offset += len;
        }
        // Only hotplug slot updates happen while the guest runs: time those.
        slot_ids.longest_ioctl = std::time::Duration::ZERO;
        let memory = GuestMemoryMmap::from_regions(mapped)
            .map_err(|e| MemoryError::Layout(e.to_string()))?;
        let memory = GuestMemoryAtomic::new(memory);
        let slot_ids = Arc::new(Mutex::new(slot_ids));
        let hotplug = if config.hotplug_size > 0 {
            let base = arch::ram_end(config.size)
                .max(arch::layout::RAM_64BIT_START)
                .next_multiple_of(HOTPLUG_ALIGN.max(config.slot_size));
            let mut backing = Backing::new(
                config.hotplug_size,
                config.shared,
                config.hugepages,
                false,
                true,
            )?;
            // virtio-mem gives back whole, aligned blocks of 2 MiB or more:
            // huge pages. Hyper-V DM balloons single pages from hot-added
            // memory too, so that stays on 4 KiB pages like balloon boot
            // memory.
            if config.hotplug_method == HotplugMethod::VirtioMem {
                backing = backing.with_transparent_huge_pages();
            }
            Some(Arc::new(Mutex::new(HotplugRegion::new(
                GuestAddress(base),
                config.hotplug_size,
                config.slot_size,
                backing,
                vm.clone(),
                memory.clone(),
                slot_ids.clone(),
            ))))
        } else {
            None
        };
        Ok(Self {
            vm,
            memory,
            slot_ids,
            boot_size: config.size,
            hotplug,
            config: config.clone(),
        })
    }

    /// Guest memory as devices see it (includes plugged hotplug slots).
    pub fn guest_memory(&self) -> &GuestMemoryAtomic<GuestMemoryMmap> {
        &self.memory
    }

    /// The VM these slots belong to.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }

    /// Boot memory size.
    pub fn boot_size(&self) -> u64 {
        self.boot_size
    }

    /// The memory configuration.
    pub fn config(&self) -> &MemoryConfig {
        &self.config
    }

    /// The hotplug region, when configured.
    pub fn hotplug_region(&self) -> Option<&Arc<Mutex<HotplugRegion>>> {
        self.hotplug.as_ref()
    }

    /// KVM memslots in use for hotplugged memory.
    pub fn hotplug_slots_in_use(&self) -> u32 {
        self.hotplug
            .as_ref()
            .map_or(0, |h| h.lock().expect("hotplug region").mapped_slots())
    }

    /// Longest KVM memslot ioctl seen (the guest-visible pause of a resize).
    pub fn longest_slot_ioctl(&self) -> std::time::Duration {
        self.slot_ids.lock().expect("slot map").longest_ioctl
    }
}
