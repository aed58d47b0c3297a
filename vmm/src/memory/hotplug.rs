//! The hotplug region: guest-physical space above boot memory, cut into
//! resizable KVM memslots that exist only while they hold plugged memory.
//!
//! A slot is mapped (host mmap + KVM memslot + device-visible guest memory)
//! when its first byte is plugged, and unmapped, its host memory returned,
//! when its last byte is unplugged. Unplugs that leave a slot partly in use
//! discard just the unplugged range.

use std::sync::{Arc, Mutex};

use devices::discard::discard_range;
use devices::virtio::mem::{BackendError, MemoryBackend};
use kvm_ioctls::VmFd;
use vm_memory::{
    Address, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap, GuestRegionMmap,
};

use super::backing::Backing;
use super::slots::{SlotError, SlotMap};

/// Why a hotplug region operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HotplugError {
    /// The range lies outside the region or is not slot-aligned where it must be.
    #[error("range {offset:#x}+{len:#x} is outside the hotplug region of {size:#x} bytes")]
    OutOfRange {
        /// Offset in the region.
        offset: u64,
        /// Length.
        len: u64,
        /// Region size.
        size: u64,
    },
    /// Plugging more than a slot holds, or unplugging more than it has.
    #[error("slot {0} accounting would go out of bounds")]
    Accounting(usize),
    /// Host memory could not be mapped.
    #[error(transparent)]
    Backing(#[from] super::backing::BackingError),
    /// KVM refused the slot.
    #[error(transparent)]
    Slot(#[from] SlotError),
    /// The device-visible memory map could not be updated.
    #[error("cannot update the guest memory map: {0}")]
    GuestMemory(String),
    /// Discarding host memory failed.
    #[error(transparent)]
    Discard(#[from] devices::discard::DiscardError),
}

#[derive(Debug, Default)]
struct Slot {
    plugged: u64,
    mapping: Option<(u32, Arc<GuestRegionMmap>)>,
}

/// The hotplug region and its slots.
///
/// Shared (`Arc<Mutex<_>>`) by the virtio-mem device, which plugs and
/// unplugs through [`HotplugBackend`], and the memory manager, which reports.
pub struct HotplugRegion {
    base: GuestAddress,
    size: u64,
    slot_size: u64,
    backing: Backing,
    vm: Arc<VmFd>,
    memory: GuestMemoryAtomic<GuestMemoryMmap>,
    slot_ids: Arc<Mutex<SlotMap>>,
    slots: Vec<Slot>,
}

impl std::fmt::Debug for HotplugRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotplugRegion")
            .field("base", &self.base)
            .field("size", &self.size)
            .field("slot_size", &self.slot_size)
            .field("mapped_slots", &self.mapped_slots())
            .finish()
    }
}

impl HotplugRegion {
    /// A region of `size` bytes at `base`, all unplugged.
    pub fn new(
        base: GuestAddress,
        size: u64,
        slot_size: u64,
        backing: Backing,
        vm: Arc<VmFd>,
        memory: GuestMemoryAtomic<GuestMemoryMmap>,
        slot_ids: Arc<Mutex<SlotMap>>,
    ) -> Self {
        let count = usize::try_from(size / slot_size).expect("slot count fits usize");
        Self {
            base,
            size,
            slot_size,
            backing,
            vm,
            memory,
            slot_ids,
            slots: (0..count).map(|_| Slot::default()).collect(),
        }
    }

    /// Guest physical start of the region.
    pub fn base(&self) -> GuestAddress {
        self.base
    }

    /// Size of the region.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Slots now mapped into KVM.
    pub fn mapped_slots(&self) -> u32 {
        let n = self.slots.iter().filter(|s| s.mapping.is_some()).count();
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    /// Bytes plugged over all slots.
    pub fn plugged(&self) -> u64 {
        self.slots.iter().map(|s| s.plugged).sum()
    }

    /// Splits `[offset, offset+len)` into `(slot index, offset, len)` pieces.
    fn pieces(&self, offset: u64, len: u64) -> Result<Vec<(usize, u64, u64)>, HotplugError> {
        let end = offset
            .checked_add(len)
            .filter(|end| *end <= self.size && len > 0)
            .ok_or(HotplugError::OutOfRange {
                offset,
                len,
                size: self.size,
            })?;
        let mut out = Vec::new();
        let mut at = offset;
        while at < end {
            let slot_end = (at / self.slot_size + 1) * self.slot_size;
            let piece_end = slot_end.min(end);
            let index = usize::try_from(at / self.slot_size).expect("index fits usize");
            out.push((index, at, piece_end - at));
            at = piece_end;
        }
        Ok(out)
    }

    /// Makes the range usable: maps the slots it touches that are unmapped.
    /// On failure nothing stays plugged.
    pub fn plug(&mut self, offset: u64, len: u64) -> Result<(), HotplugError> {
        let pieces = self.pieces(offset, len)?;
        for &(index, _, piece_len) in &pieces {
            if self.slots[index].plugged + piece_len > self.slot_size {
                return Err(HotplugError::Accounting(index));
            }
        }
        for (done, &(index, _, piece_len)) in pieces.iter().enumerate() {
            if self.slots[index].mapping.is_none() {
                if let Err(e) = self.map_slot(index) {
                    for &(index, piece_offset, piece_len) in &pieces[..done] {
                        self.slots[index].plugged -= piece_len;
                        if let Err(undo) = self.release(index, piece_offset, piece_len) {
                            log::error!("hotplug: undoing a failed plug: {undo}");
                        }
                    }
                    return Err(e);
                }
            }
            self.slots[index].plugged += piece_len;
        }
        Ok(())
    }

    /// Returns the range to the host; slots left empty are unmapped.
    pub fn unplug(&mut self, offset: u64, len: u64) -> Result<(), HotplugError> {
        let pieces = self.pieces(offset, len)?;
        for &(index, _, piece_len) in &pieces {
            if self.slots[index].plugged < piece_len {
                return Err(HotplugError::Accounting(index));
            }
        }
        for (index, piece_offset, piece_len) in pieces {
            self.slots[index].plugged -= piece_len;
            self.release(index, piece_offset, piece_len)?;
        }
        Ok(())
    }

    /// Gives back the host memory of a piece just taken out of slot `index`:
    /// the whole slot when it is now empty, else just the piece.
    fn release(
        &mut self,
        index: usize,
        piece_offset: u64,
        piece_len: u64,
    ) -> Result<(), HotplugError> {
        if self.slots[index].plugged == 0 {
            self.unmap_slot(index)
        } else {
            let memory = self.memory.memory();
            Ok(discard_range(
                &memory,
                self.base.unchecked_add(piece_offset),
                piece_len,
            )?)
        }
    }

    fn slot_addr(&self, index: usize) -> (u64, GuestAddress) {
        let offset = self.slot_size * index as u64;
        (offset, self.base.unchecked_add(offset))
    }

    fn map_slot(&mut self, index: usize) -> Result<(), HotplugError> {
        let (offset, addr) = self.slot_addr(index);
        let region = Arc::new(self.backing.map(offset, self.slot_size, addr)?);
        let id = self
            .slot_ids
            .lock()
            .expect("slot map")
            .map(&self.vm, &region)?;
        let guard = self.memory.lock().expect("guest memory lock");
        let updated = self.memory.memory().insert_region(region.clone());
        match updated {
            Ok(map) => guard.replace(map),
            Err(e) => {
                drop(guard);
                let _ = self
                    .slot_ids
                    .lock()
                    .expect("slot map")
                    .unmap(&self.vm, id, &region);
                return Err(HotplugError::GuestMemory(e.to_string()));
            }
        }
        self.slots[index].mapping = Some((id, region));
        Ok(())
    }

    fn unmap_slot(&mut self, index: usize) -> Result<(), HotplugError> {
        let Some((id, region)) = self.slots[index].mapping.take() else {
            return Ok(());
        };
        self.slot_ids
            .lock()
            .expect("slot map")
            .unmap(&self.vm, id, &region)?;
        let (_, addr) = self.slot_addr(index);
        {
            let guard = self.memory.lock().expect("guest memory lock");
            let (map, _) = self
                .memory
                .memory()
                .remove_region(addr, self.slot_size)
                .map_err(|e| HotplugError::GuestMemory(e.to_string()))?;
            guard.replace(map);
        }
        // Whoever still holds a memory snapshot keeps the mapping alive; the
        // host memory itself goes now.
        let single = GuestMemoryMmap::from_arc_regions(vec![region])
            .map_err(|e| HotplugError::GuestMemory(e.to_string()))?;
        discard_range(&single, addr, self.slot_size)?;
        Ok(())
    }
}

/// The virtio-mem device's view of the hotplug region.
pub struct HotplugBackend(pub Arc<Mutex<HotplugRegion>>);

impl MemoryBackend for HotplugBackend {
    fn plug(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        let mut region = self.0.lock().expect("hotplug region");
        region
            .plug(offset, len)
            .map_err(|e| BackendError::Failed(Box::new(e)))
    }

    fn unplug(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        let mut region = self.0.lock().expect("hotplug region");
        region
            .unplug(offset, len)
            .map_err(|e| BackendError::Failed(Box::new(e)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    fn region(slot_size: u64, slots: u64) -> (HotplugRegion, GuestMemoryAtomic<GuestMemoryMmap>) {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = Arc::new(kvm.create_vm().unwrap());
        let boot = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let memory = GuestMemoryAtomic::new(boot);
        let size = slot_size * slots;
        let backing = Backing::new(size, false, false, false, true).unwrap();
        let r = HotplugRegion::new(
            GuestAddress(1 << 32),
            size,
            slot_size,
            backing,
            vm,
            memory.clone(),
            Arc::new(Mutex::new(SlotMap::new())),
        );
        (r, memory)
    }

    #[test]
    fn slots_map_on_first_plug_and_unmap_on_last_unplug() {
        let mb = 1u64 << 20;
        let (mut r, memory) = region(4 * mb, 4);
        assert_eq!(r.mapped_slots(), 0);
        // Two blocks across the boundary of slots 0 and 1.
        r.plug(3 * mb, 2 * mb).unwrap();
        assert_eq!(r.mapped_slots(), 2);
        assert_eq!(r.plugged(), 2 * mb);
        assert_eq!(memory.memory().num_regions(), 3);
        let addr = GuestAddress((1 << 32) + 3 * mb);
        memory.memory().write_obj(7u8, addr).unwrap();
        r.unplug(3 * mb, mb).unwrap();
        assert_eq!(r.mapped_slots(), 1);
        assert!(
            memory.memory().read_obj::<u8>(addr).is_err(),
            "unplugged slot must be gone"
        );
        r.plug(8 * mb, 4 * mb).unwrap();
        assert_eq!(r.mapped_slots(), 2);
        r.unplug(4 * mb, mb).unwrap();
        r.unplug(8 * mb, 4 * mb).unwrap();
        assert_eq!(r.mapped_slots(), 0);
        assert_eq!(r.plugged(), 0);
        assert_eq!(memory.memory().num_regions(), 1);
    }

    #[test]
    fn bad_ranges_change_nothing() {
        let mb = 1u64 << 20;
        let (mut r, _) = region(2 * mb, 2);
        assert!(r.plug(3 * mb, 2 * mb).is_err());
        assert!(r.plug(u64::MAX, 2).is_err());
        assert!(r.unplug(0, mb).is_err());
        r.plug(0, 2 * mb).unwrap();
        assert!(r.plug(mb, mb).is_err(), "slot 0 is full");
        assert_eq!(r.plugged(), 2 * mb);
        assert_eq!(r.mapped_slots(), 1);
    }
}
