//! KVM memory slots: id allocation and (un)registration of guest regions.

use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{Address, GuestMemoryRegion, GuestRegionMmap};

/// A KVM memslot ioctl failed.
#[derive(Debug, thiserror::Error)]
#[error("KVM_SET_USER_MEMORY_REGION for slot {slot} at {addr:#x}+{size:#x} failed: {source}")]
pub struct SlotError {
    /// Slot id.
    pub slot: u32,
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// The error.
    pub source: kvm_ioctls::Error,
}

/// Hands out KVM memslot ids and maps regions into KVM.
#[derive(Debug, Default)]
pub struct SlotMap {
    next: u32,
    free: Vec<u32>,
    in_use: u32,
    /// Longest single KVM_SET_USER_MEMORY_REGION call seen.
    pub longest_ioctl: Duration,
}

impl SlotMap {
    /// An allocator whose ids start at 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Slots currently registered with KVM.
    pub fn in_use(&self) -> u32 {
        self.in_use
    }

    /// Registers `region` with KVM under a new slot id and returns the id.
    pub fn map(&mut self, vm: &VmFd, region: &GuestRegionMmap) -> Result<u32, SlotError> {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.next += 1;
            self.next - 1
        });
        let res = self.set(vm, slot, region, true);
        match res {
            Ok(()) => {
                self.in_use += 1;
                Ok(slot)
            }
            Err(e) => {
                self.free.push(slot);
                Err(e)
            }
        }
    }

    /// Removes slot `slot` (holding `region`) from KVM; the id is reused.
    pub fn unmap(
        &mut self,
        vm: &VmFd,
        slot: u32,
        region: &GuestRegionMmap,
    ) -> Result<(), SlotError> {
        self.set(vm, slot, region, false)?;
        self.in_use -= 1;
        self.free.push(slot);
        Ok(())
    }

    fn set(
        &mut self,
        vm: &VmFd,
        slot: u32,
        region: &GuestRegionMmap,
        present: bool,
    ) -> Result<(), SlotError> {
        let addr = region.start_addr().raw_value();
        let size = region.len();
        let mem_region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: addr,
            memory_size: if present { size } else { 0 },
            userspace_addr: region.as_ptr() as u64,
        };
        let start = Instant::now();
        // SAFETY: `region` is a live mapping of `size` bytes that outlives
        // the slot: callers unmap the slot before dropping the region, and
        // a removal (size 0) touches no memory.
        unsafe { vm.set_user_memory_region(mem_region) }.map_err(|source| SlotError {
            slot,
            addr,
            size,
            source,
        })?;
        self.longest_ioctl = self.longest_ioctl.max(start.elapsed());
        Ok(())
    }
}
