//! The virtio-mem device model: geometry, config space, block state and
//! request handling.

use std::ops::Range;
use std::sync::Arc;

use log::{debug, error, warn};
use virtio_queue::QueueT;
use vm_memory::{GuestAddress, GuestAddressSpace};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::bitmap::BlockBitmap;
use super::request::{self, BlockState, MemRequest, MemResponse, ResponseType};
use super::{MIN_BLOCK_SIZE, QUEUE_SIZE, VIRTIO_ID_MEM};
use crate::virtio::{
    ActivateError, GuestMemory, InterruptKind, Queue, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};

/// `VIRTIO_MEM_F_ACPI_PXM`: `node_id` is valid and is an ACPI proximity domain.
pub const VIRTIO_MEM_F_ACPI_PXM: u64 = 1 << 0;
/// `VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE`: the driver must not touch unplugged memory.
pub const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;

/// Size of `struct virtio_mem_config`.
pub const VIRTIO_MEM_CONFIG_SIZE: usize = 56;

/// Most blocks one device tracks (a 128 MiB bitmap): 4 TiB of 4 KiB
/// blocks, 2 PiB of 2 MiB blocks.
pub const MAX_BLOCKS: u64 = 1 << 30;

const QUEUE_SIZES: &[u16] = &[QUEUE_SIZE];

/// Why the host side could not change the state of a range.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// A transient condition (e.g. host memory pressure): the driver is
    /// answered BUSY and retries later.
    #[error("memory backend busy: {0}")]
    Busy(String),
    /// A permanent failure: the driver is answered ERROR (the Linux driver
    /// then stops using the device).
    #[error("memory backend failed: {0}")]
    Failed(Box<dyn std::error::Error + Send + Sync>),
}

/// Host side of a virtio-mem region, implemented by the VMM's memory manager.
///
/// Called with the device lock held, from the VMM event loop (requests) or
/// from whoever calls [`VirtioMem::unplug_all_on_reset`]: implementations
/// must not lock the device. Ranges are block aligned, non-empty and merged
/// (one call per contiguous run).
pub trait MemoryBackend: Send {
    /// Makes `[offset, offset+len)` of the region (offsets relative to region_addr) usable by the guest: backed and mapped.
    ///
    /// On error the range must be left unplugged (undo any partial work):
    /// the device keeps it unplugged.
    fn plug(&mut self, offset: u64, len: u64) -> Result<(), BackendError>;
    /// Discards the host memory behind the range and makes it inaccessible to the guest.
    ///
    /// On error the device keeps the range plugged.
    fn unplug(&mut self, offset: u64, len: u64) -> Result<(), BackendError>;
}

/// Errors of the VMM-facing API of [`VirtioMem`].
#[derive(Debug, thiserror::Error)]
pub enum MemError {
    /// The block size is not a power of two of at least 4 KiB.
    #[error("block size {0:#x} is not a power of two of at least 4 KiB")]
    BlockSize(u64),
    /// The region start is not block aligned.
    #[error("region address {addr:#x} is not a multiple of the block size {block_size:#x}")]
    RegionAddrUnaligned {
        /// Region start.
        addr: u64,
        /// Block size.
        block_size: u64,
    },
    /// The region size is not a multiple of the block size.
    #[error("region size {size:#x} is not a multiple of the block size {block_size:#x}")]
    RegionSizeUnaligned {
        /// Region size.
        size: u64,
        /// Block size.
        block_size: u64,
    },
    /// The region size is 0.
    #[error("region size must not be 0")]
    EmptyRegion,
    /// The region runs past the end of the address space.
    #[error("region {addr:#x}+{size:#x} runs past the end of the address space")]
    RegionOverflow {
        /// Region start.
        addr: u64,
        /// Region size.
        size: u64,
    },
    /// The region has too many blocks to track.
    #[error("region has {0} blocks, more than the {MAX_BLOCKS} a device tracks; use a larger block size")]
    TooManyBlocks(u64),
    /// A requested size that is not a multiple of the block size.
    #[error("requested size {size:#x} is not a multiple of the block size {block_size:#x}")]
    RequestedSizeUnaligned {
        /// The rejected size.
        size: u64,
        /// Block size.
        block_size: u64,
    },
    /// A requested size larger than the region.
    #[error("requested size {size:#x} exceeds the region size {region_size:#x}")]
    RequestedSizeTooLarge {
        /// The rejected size.
        size: u64,
        /// Region size.
        region_size: u64,
    },
    /// The queue eventfd could not be created.
    #[error("cannot create the queue eventfd: {0}")]
    EventFd(std::io::Error),
    /// The backend failed to unplug some runs; those stay plugged.
    #[error("unplugging {failed_bytes:#x} bytes failed, first error: {first}")]
    Backend {
        /// Bytes left plugged.
        failed_bytes: u64,
        /// The first backend error.
        first: BackendError,
    },
}

/// Static description of a virtio-mem device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioMemConfig {
    /// Guest physical start of the region (block aligned).
    pub region_addr: GuestAddress,
    /// Size of the region in bytes (a non-zero multiple of `block_size`).
    pub region_size: u64,
    /// Plug granularity: a power of two of at least 4 KiB.
    pub block_size: u64,
    /// ACPI proximity domain of the memory; offers `VIRTIO_MEM_F_ACPI_PXM`.
    pub node_id: Option<u16>,
}

/// Counters of a device, since its creation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MemMetrics {
    /// PLUG requests received.
    pub plug_requests: u64,
    /// UNPLUG requests received.
    pub unplug_requests: u64,
    /// UNPLUG_ALL requests received.
    pub unplug_all_requests: u64,
    /// STATE requests received.
    pub state_requests: u64,
    /// Requests answered NACK.
    pub nacks: u64,
    /// Requests answered BUSY.
    pub busy: u64,
    /// Requests answered ERROR (invalid, unknown type, backend failure).
    pub errors: u64,
    /// Backend calls that failed.
    pub backend_failures: u64,
    /// Bytes plugged through the backend.
    pub bytes_plugged: u64,
    /// Bytes unplugged through the backend (requests and resets).
    pub bytes_unplugged: u64,
    /// Chains that could not be decoded (answered ERROR, or returned
    /// with nothing written when there was no usable response buffer).
    pub malformed_requests: u64,
}

/// What the device holds once the driver set DRIVER_OK.
struct ActiveState {
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    queue: Queue,
}

/// A virtio-mem device.
pub struct VirtioMem {
    config: VirtioMemConfig,
    usable_region_size: u64,
    requested_size: u64,
    blocks: BlockBitmap,
    backend: Box<dyn MemoryBackend>,
    avail_features: u64,
    acked_features: u64,
    queue_events: [EventFd; 1],
    active: Option<ActiveState>,
    metrics: MemMetrics,
}

impl std::fmt::Debug for VirtioMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioMem")
            .field("config", &self.config)
            .field("requested_size", &self.requested_size)
            .field("plugged_size", &self.plugged_size())
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl VirtioMem {
    /// A device managing `config.region_*`, every block unplugged and a
    /// requested size of 0.
    pub fn new(
        config: VirtioMemConfig,
        backend: Box<dyn MemoryBackend>,
    ) -> Result<VirtioMem, MemError> {
        let VirtioMemConfig {
            region_addr,
            region_size,
            block_size,
            node_id,
        } = config;
        let addr = region_addr.0;
        if !block_size.is_power_of_two() || block_size < MIN_BLOCK_SIZE {
            return Err(MemError::BlockSize(block_size));
        }
        if region_size == 0 {
            return Err(MemError::EmptyRegion);
        }
        if !addr.is_multiple_of(block_size) {
            return Err(MemError::RegionAddrUnaligned { addr, block_size });
        }
        if !region_size.is_multiple_of(block_size) {
            return Err(MemError::RegionSizeUnaligned {
                size: region_size,
                block_size,
            });
        }
        // The last byte must be addressable: addr + size may equal 2^64.
        if addr.checked_add(region_size - 1).is_none() {
            return Err(MemError::RegionOverflow {
                addr,
                size: region_size,
            });
        }
        let nblocks = region_size / block_size;
        let nblocks_usize = usize::try_from(nblocks)
            .ok()
            .filter(|_| nblocks <= MAX_BLOCKS)
            .ok_or(MemError::TooManyBlocks(nblocks))?;
        let queue_event = EventFd::new(EFD_NONBLOCK).map_err(MemError::EventFd)?;
        let mut avail_features = VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE;
        if node_id.is_some() {
            avail_features |= VIRTIO_MEM_F_ACPI_PXM;
        }
        Ok(VirtioMem {
            config,
            // The whole region is usable from the start; it never changes,
            // so no config notification is ever owed for it.
            usable_region_size: region_size,
            requested_size: 0,
            blocks: BlockBitmap::new(nblocks_usize),
            backend,
            avail_features,
            acked_features: 0,
            queue_events: [queue_event],
            active: None,
            metrics: MemMetrics::default(),
        })
    }

    /// Asks the driver to plug (or unplug down to) `size` bytes.
    ///
    /// `size` must be a multiple of the block size and at most the region
    /// size. The driver is notified by a config-change interrupt when the
    /// device is active; otherwise it reads the value when it probes.
    /// Shrinking does not unplug anything by itself: the guest chooses
    /// which blocks to give back, and may not manage to give all back.
    pub fn set_requested_size(&mut self, size: u64) -> Result<(), MemError> {
        let block_size = self.config.block_size;
        if !size.is_multiple_of(block_size) {
            return Err(MemError::RequestedSizeUnaligned { size, block_size });
        }
        if size > self.usable_region_size {
            return Err(MemError::RequestedSizeTooLarge {
                size,
                region_size: self.config.region_size,
            });
        }
        if size == self.requested_size {
            return Ok(());
        }
        self.requested_size = size;
        if let Some(active) = &self.active {
            if let Err(e) = active.interrupt.trigger(InterruptKind::Config) {
                error!("virtio-mem: config change interrupt failed: {e}");
            }
        }
        Ok(())
    }

    /// The size the driver is asked to plug.
    pub fn requested_size(&self) -> u64 {
        self.requested_size
    }

    /// The size currently plugged.
    pub fn plugged_size(&self) -> u64 {
        self.block_bytes(self.blocks.count_ones())
    }

    /// The block size.
    pub fn block_size(&self) -> u64 {
        self.config.block_size
    }

    /// The region: guest physical start and size.
    pub fn region(&self) -> (GuestAddress, u64) {
        (self.config.region_addr, self.config.region_size)
    }

    /// The part of the region the driver may plug (from its start); always
    /// the whole region in this implementation.
    pub fn usable_region_size(&self) -> u64 {
        self.usable_region_size
    }

    /// The plugged ranges as `(offset, len)` relative to the region start,
    /// merged and in increasing order.
    pub fn plugged_ranges(&self) -> Vec<(u64, u64)> {
        self.blocks
            .set_runs()
            .map(|run| self.run_offset_len(&run))
            .collect()
    }

    /// Whether the driver activated the device (and has not reset it).
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// A snapshot of the device counters.
    pub fn metrics(&self) -> MemMetrics {
        self.metrics
    }

    /// Unplugs every plugged block through the backend (one call per
    /// contiguous run); for the VMM's *system* reset path (guest reboot).
    ///
    /// Not called by [`VirtioDevice::reset`]: a device reset also happens
    /// when the guest unloads the driver with plugged memory still in use
    /// as RAM, and the spec forbids changing block state then. Runs the
    /// backend fails to unplug stay plugged and are reported.
    pub fn unplug_all_on_reset(&mut self) -> Result<(), MemError> {
        self.unplug_all()
            .map_err(|(failed_bytes, first)| MemError::Backend {
                failed_bytes,
                first,
            })
    }

    /// `blocks * block_size`; cannot overflow since blocks <= region blocks.
    fn block_bytes(&self, blocks: usize) -> u64 {
        u64::try_from(blocks)
            .unwrap_or(u64::MAX)
            .saturating_mul(self.config.block_size)
    }

    fn run_offset_len(&self, run: &Range<usize>) -> (u64, u64) {
        (self.block_bytes(run.start), self.block_bytes(run.len()))
    }

    /// Unplugs every run; on failure returns the bytes left plugged and the
    /// first error.
    fn unplug_all(&mut self) -> Result<(), (u64, BackendError)> {
        let runs: Vec<Range<usize>> = self.blocks.set_runs().collect();
        let mut failure: Option<(u64, BackendError)> = None;
        for run in runs {
            let (offset, len) = self.run_offset_len(&run);
            match self.backend.unplug(offset, len) {
                Ok(()) => {
                    self.blocks.set_range(run, false);
                    self.metrics.bytes_unplugged += len;
                }
                Err(e) => {
                    self.metrics.backend_failures += 1;
                    warn!("virtio-mem: unplugging {offset:#x}+{len:#x} failed: {e}");
                    failure = match failure {
                        None => Some((len, e)),
                        Some((bytes, first)) => Some((bytes + len, first)),
                    };
                }
            }
        }
        failure.map_or(Ok(()), Err)
    }

    /// The blocks `[addr, addr + nb_blocks * block_size)` covers, if the
    /// request is valid: aligned, non-empty, no overflow, inside the usable
    /// region.
    fn block_range(&self, addr: u64, nb_blocks: u16) -> Option<Range<usize>> {
        let block_size = self.config.block_size;
        let start = self.config.region_addr.0;
        if nb_blocks == 0 || !addr.is_multiple_of(block_size) {
            return None;
        }
        let offset = addr.checked_sub(start)?;
        let len = u64::from(nb_blocks).checked_mul(block_size)?;
        let end = offset.checked_add(len)?;
        if end > self.usable_region_size {
            return None;
        }
        let first = usize::try_from(offset / block_size).ok()?;
        let count = usize::from(nb_blocks);
        Some(first..first.checked_add(count)?)
    }

    /// Applies one request to the device state and returns the answer.
    ///
    /// This is the whole request semantics, independent of queues.
    pub fn handle_request(&mut self, req: MemRequest) -> MemResponse {
        let resp = match req {
            MemRequest::Plug { addr, nb_blocks } => {
                self.metrics.plug_requests += 1;
                self.plug(addr, nb_blocks)
            }
            MemRequest::Unplug { addr, nb_blocks } => {
                self.metrics.unplug_requests += 1;
                self.unplug(addr, nb_blocks)
            }
            MemRequest::UnplugAll => {
                self.metrics.unplug_all_requests += 1;
                match self.unplug_all() {
                    Ok(()) => MemResponse::new(ResponseType::Ack),
                    // ERROR is not an answer to UNPLUG_ALL; the driver retries BUSY.
                    Err(_) => MemResponse::new(ResponseType::Busy),
                }
            }
            MemRequest::State { addr, nb_blocks } => {
                self.metrics.state_requests += 1;
                self.state(addr, nb_blocks)
            }
        };
        match resp.resp_type {
            ResponseType::Ack => {}
            ResponseType::Nack => self.metrics.nacks += 1,
            ResponseType::Busy => self.metrics.busy += 1,
            ResponseType::Error => self.metrics.errors += 1,
        }
        debug!("virtio-mem: {req:?} -> {resp:?}");
        resp
    }

    fn backend_failure(&mut self, op: &str, offset: u64, len: u64, e: BackendError) -> MemResponse {
        self.metrics.backend_failures += 1;
        warn!("virtio-mem: {op} of {offset:#x}+{len:#x} failed: {e}");
        match e {
            BackendError::Busy(_) => MemResponse::new(ResponseType::Busy),
            BackendError::Failed(_) => MemResponse::new(ResponseType::Error),
        }
    }

    fn plug(&mut self, addr: u64, nb_blocks: u16) -> MemResponse {
        let Some(range) = self.block_range(addr, nb_blocks) else {
            return MemResponse::new(ResponseType::Error);
        };
        if self.blocks.count_ones_in(range.clone()) != 0 {
            return MemResponse::new(ResponseType::Error);
        }
        let (offset, len) = self.run_offset_len(&range);
        if self.plugged_size().saturating_add(len) > self.requested_size {
            return MemResponse::new(ResponseType::Nack);
        }
        match self.backend.plug(offset, len) {
            Ok(()) => {
                self.blocks.set_range(range, true);
                self.metrics.bytes_plugged += len;
                MemResponse::new(ResponseType::Ack)
            }
            Err(e) => self.backend_failure("plug", offset, len, e),
        }
    }

    fn unplug(&mut self, addr: u64, nb_blocks: u16) -> MemResponse {
        let Some(range) = self.block_range(addr, nb_blocks) else {
            return MemResponse::new(ResponseType::Error);
        };
        if self.blocks.count_ones_in(range.clone()) != range.len() {
            return MemResponse::new(ResponseType::Error);
        }
        let (offset, len) = self.run_offset_len(&range);
        match self.backend.unplug(offset, len) {
            Ok(()) => {
                self.blocks.set_range(range, false);
                self.metrics.bytes_unplugged += len;
                MemResponse::new(ResponseType::Ack)
            }
            Err(e) => self.backend_failure("unplug", offset, len, e),
        }
    }

    fn state(&self, addr: u64, nb_blocks: u16) -> MemResponse {
        let Some(range) = self.block_range(addr, nb_blocks) else {
            return MemResponse::new(ResponseType::Error);
        };
        let plugged = self.blocks.count_ones_in(range.clone());
        MemResponse::state(if plugged == range.len() {
            BlockState::Plugged
        } else if plugged == 0 {
            BlockState::Unplugged
        } else {
            BlockState::Mixed
        })
    }

    /// The config space bytes (`struct virtio_mem_config`, little endian).
    fn config_bytes(&self) -> [u8; VIRTIO_MEM_CONFIG_SIZE] {
        let mut c = [0u8; VIRTIO_MEM_CONFIG_SIZE];
        c[0..8].copy_from_slice(&self.config.block_size.to_le_bytes());
        c[8..10].copy_from_slice(&self.config.node_id.unwrap_or(0).to_le_bytes());
        c[16..24].copy_from_slice(&self.config.region_addr.0.to_le_bytes());
        c[24..32].copy_from_slice(&self.config.region_size.to_le_bytes());
        c[32..40].copy_from_slice(&self.usable_region_size.to_le_bytes());
        c[40..48].copy_from_slice(&self.plugged_size().to_le_bytes());
        c[48..56].copy_from_slice(&self.requested_size.to_le_bytes());
        c
    }

    /// Answers every available request chain; raises the queue interrupt
    /// if anything was returned. No-op before activation.
    ///
    /// The event loop calls it on a queue notification; it is public so
    /// that fuzz targets can drive the queue without an event loop.
    pub fn process_queue(&mut self) {
        // Taken out so that requests can borrow the rest of the device.
        let Some(mut active) = self.active.take() else {
            return;
        };
        let mem = active.mem.memory();
        let mut used_any = false;
        while let Some(chain) = active.queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            let used_len = match request::parse_chain(&mem, chain) {
                Ok(mut parsed) => {
                    let resp = match parsed.request {
                        Ok(req) => self.handle_request(req),
                        Err(e) => {
                            // A well-framed request of an unknown type is
                            // an error, not a malformed chain.
                            if matches!(e, request::RequestError::TooShort(_)) {
                                self.metrics.malformed_requests += 1;
                            }
                            self.metrics.errors += 1;
                            warn!("virtio-mem: bad request: {e}");
                            MemResponse::new(ResponseType::Error)
                        }
                    };
                    request::write_response(&mut parsed.response, &resp).unwrap_or_else(|e| {
                        error!("virtio-mem: cannot write a response: {e}");
                        0
                    })
                }
                Err(e) => {
                    self.metrics.malformed_requests += 1;
                    warn!("virtio-mem: unanswerable request chain: {e}");
                    0
                }
            };
            if let Err(e) = active.queue.add_used(&*mem, head, used_len) {
                error!("virtio-mem: cannot return a used buffer: {e:?}");
                break;
            }
            used_any = true;
        }
        if used_any {
            // Without EVENT_IDX this is always true; an error means the
            // rings are broken and an extra interrupt is harmless.
            if active.queue.needs_notification(&*mem).unwrap_or(true) {
                if let Err(e) = active.interrupt.trigger(InterruptKind::Queue) {
                    error!("virtio-mem: queue interrupt failed: {e}");
                }
            }
        }
        drop(mem);
        self.active = Some(active);
    }
}

impl VirtioDevice for VirtioMem {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_MEM
    }

    fn queue_max_sizes(&self) -> &[u16] {
        QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Every field is read-only for the driver.
        warn!(
            "virtio-mem: driver wrote {} bytes of read-only config at {offset:#x}",
            data.len()
        );
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let [queue] = crate::virtio::exact_queues(queues)?;
        // Unplugged blocks have no memory behind them: a driver that does
        // not promise to leave them alone (Linux before 5.16) would fault.
        let required = VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE;
        if self.acked_features & required != required {
            return Err(ActivateError::Features(self.acked_features));
        }
        self.active = Some(ActiveState {
            mem,
            interrupt,
            queue,
        });
        // Requests queued before activation had their notification dropped
        // (see the event handler): make the event loop look at the queue.
        if let Err(e) = self.queue_events[0].write(1) {
            error!("virtio-mem: cannot kick the queue after activation: {e}");
        }
        Ok(())
    }

    fn reset(&mut self) {
        // Block state survives a device reset (spec: "MUST NOT change the
        // state of memory blocks during device reset"); the driver finds
        // plugged_size > 0 at probe and sends UNPLUG_ALL or STATE requests.
        self.active = None;
        self.acked_features = 0;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use vm_memory::{Bytes, GuestMemoryAtomic, GuestMemoryMmap};

    use super::*;
    use crate::virtio::mem::request::tests::{desc, req_bytes};
    use crate::virtio::mem::request::{
        VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_STATE, VIRTIO_MEM_REQ_UNPLUG,
    };
    use virtio_queue::mock::MockSplitQueue;

    const BS: u64 = 2 << 20;
    const BASE: u64 = 0x1_0000_0000;
    const NBLOCKS: u64 = 32;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Call {
        Plug(u64, u64),
        Unplug(u64, u64),
    }

    #[derive(Debug, Clone, Copy)]
    enum Fail {
        Busy,
        Failed,
    }

    #[derive(Default)]
    struct Shared {
        calls: Vec<Call>,
        /// Fail calls whose offset is this one (any offset if None).
        fail: Option<(Fail, Option<u64>)>,
    }

    #[derive(Clone, Default)]
    struct FakeBackend(Arc<Mutex<Shared>>);

    impl FakeBackend {
        fn calls(&self) -> Vec<Call> {
            std::mem::take(&mut self.0.lock().unwrap().calls)
        }
        fn fail(&self, fail: Option<(Fail, Option<u64>)>) {
            self.0.lock().unwrap().fail = fail;
        }
        fn call(&self, call: Call, offset: u64) -> Result<(), BackendError> {
            let mut s = self.0.lock().unwrap();
            s.calls.push(call);
            match s.fail {
                Some((kind, at)) if at.is_none_or(|at| at == offset) => Err(match kind {
                    Fail::Busy => BackendError::Busy("host busy".into()),
                    Fail::Failed => BackendError::Failed("mmap failed".into()),
                }),
                _ => Ok(()),
            }
        }
    }

    impl MemoryBackend for FakeBackend {
        fn plug(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
            self.call(Call::Plug(offset, len), offset)
        }
        fn unplug(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
            self.call(Call::Unplug(offset, len), offset)
        }
    }

    fn config() -> VirtioMemConfig {
        VirtioMemConfig {
            region_addr: GuestAddress(BASE),
            region_size: NBLOCKS * BS,
            block_size: BS,
            node_id: None,
        }
    }

    fn device() -> (VirtioMem, FakeBackend) {
        let backend = FakeBackend::default();
        let dev = VirtioMem::new(config(), Box::new(backend.clone())).unwrap();
        (dev, backend)
    }

    fn plug(b: u64, n: u16) -> MemRequest {
        MemRequest::Plug {
            addr: BASE + b * BS,
            nb_blocks: n,
        }
    }
    fn unplug(b: u64, n: u16) -> MemRequest {
        MemRequest::Unplug {
            addr: BASE + b * BS,
            nb_blocks: n,
        }
    }
    fn state(b: u64, n: u16) -> MemRequest {
        MemRequest::State {
            addr: BASE + b * BS,
            nb_blocks: n,
        }
    }
    const ACK: MemResponse = MemResponse::new(ResponseType::Ack);
    const NACK: MemResponse = MemResponse::new(ResponseType::Nack);
    const BUSY: MemResponse = MemResponse::new(ResponseType::Busy);
    const ERROR: MemResponse = MemResponse::new(ResponseType::Error);

    fn cfg_u64(dev: &VirtioMem, offset: u64) -> u64 {
        let mut b = [0u8; 8];
        dev.read_config(offset, &mut b);
        u64::from_le_bytes(b)
    }

    #[test]
    fn new_validates_the_geometry() {
        let new = |f: &dyn Fn(&mut VirtioMemConfig)| {
            let mut c = config();
            f(&mut c);
            VirtioMem::new(c, Box::new(FakeBackend::default()))
        };
        for bs in [0, 1, 2048, 3 << 12, 6 << 20] {
            let err = new(&|c| c.block_size = bs).unwrap_err();
            assert!(matches!(err, MemError::BlockSize(b) if b == bs), "{err}");
            assert!(err.to_string().contains("power of two"));
        }
        let err = new(&|c| c.region_addr = GuestAddress(BASE + 4096)).unwrap_err();
        assert!(matches!(err, MemError::RegionAddrUnaligned { .. }));
        assert!(
            err.to_string().contains("region address 0x100001000"),
            "{err}"
        );
        let err = new(&|c| c.region_size = BS * 3 + 4096).unwrap_err();
        assert!(matches!(err, MemError::RegionSizeUnaligned { .. }), "{err}");
        let err = new(&|c| c.region_size = 0).unwrap_err();
        assert!(matches!(err, MemError::EmptyRegion), "{err}");
        let err = new(&|c| c.region_addr = GuestAddress(u64::MAX - BS + 1)).unwrap_err();
        assert!(matches!(err, MemError::RegionOverflow { .. }), "{err}");
        let err = new(&|c| {
            c.block_size = 4096;
            c.region_size = (MAX_BLOCKS + 1) * 4096;
        })
        .unwrap_err();
        assert!(matches!(err, MemError::TooManyBlocks(_)), "{err}");
        // A region ending exactly at the top of the address space is fine.
        let dev = new(&|c| {
            c.region_addr = GuestAddress(u64::MAX - 2 * BS + 1);
            c.region_size = 2 * BS;
        })
        .unwrap();
        assert_eq!(dev.plugged_size(), 0);
        // Smallest block size.
        new(&|c| c.block_size = 4096).unwrap();
    }

    #[test]
    fn features() {
        let (mut dev, _) = device();
        assert_eq!(dev.device_type(), 24);
        assert_eq!(dev.queue_max_sizes(), &[128]);
        assert_eq!(
            dev.avail_features(),
            VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
        );
        dev.set_acked_features(u64::MAX);
        assert_eq!(dev.acked_features, dev.avail_features());
        let mut c = config();
        c.node_id = Some(3);
        let dev = VirtioMem::new(c, Box::new(FakeBackend::default())).unwrap();
        assert_eq!(
            dev.avail_features(),
            VIRTIO_F_VERSION_1 | VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE | VIRTIO_MEM_F_ACPI_PXM
        );
    }

    #[test]
    fn config_space_layout_and_read_only() {
        let mut c = config();
        c.node_id = Some(0x0102);
        let mut dev = VirtioMem::new(c, Box::new(FakeBackend::default())).unwrap();
        dev.set_requested_size(4 * BS).unwrap();
        assert_eq!(dev.handle_request(plug(1, 3)), ACK);

        let mut all = [0xffu8; VIRTIO_MEM_CONFIG_SIZE];
        dev.read_config(0, &mut all);
        assert_eq!(cfg_u64(&dev, 0), BS);
        assert_eq!(&all[8..10], &[0x02, 0x01]);
        assert_eq!(&all[10..16], &[0; 6]);
        assert_eq!(cfg_u64(&dev, 16), BASE);
        assert_eq!(cfg_u64(&dev, 24), NBLOCKS * BS);
        assert_eq!(cfg_u64(&dev, 32), NBLOCKS * BS);
        assert_eq!(cfg_u64(&dev, 40), 3 * BS);
        assert_eq!(cfg_u64(&dev, 48), 4 * BS);

        // Narrow and unaligned reads, reads past the end.
        let mut b4 = [0u8; 4];
        dev.read_config(20, &mut b4);
        assert_eq!(u64::from(u32::from_le_bytes(b4)), BASE >> 32);
        let mut b = [0xffu8; 8];
        dev.read_config(52, &mut b);
        assert_eq!(b, [0, 0, 0, 0, 0, 0, 0, 0]);
        dev.read_config(u64::MAX, &mut b);
        assert_eq!(b, [0; 8]);
        let mut big = [0xffu8; 100];
        dev.read_config(0, &mut big);
        assert_eq!(&big[..VIRTIO_MEM_CONFIG_SIZE], &all[..]);
        assert!(big[VIRTIO_MEM_CONFIG_SIZE..].iter().all(|b| *b == 0));

        // Writes change nothing.
        for offset in [0u64, 8, 16, 24, 32, 40, 48, 55, 1000] {
            dev.write_config(offset, &[0xab; 8]);
        }
        let mut after = [0u8; VIRTIO_MEM_CONFIG_SIZE];
        dev.read_config(0, &mut after);
        assert_eq!(after, all);
        assert_eq!(dev.requested_size(), 4 * BS);
    }

    #[test]
    fn node_id_reads_zero_without_pxm() {
        let (dev, _) = device();
        let mut b = [0xffu8; 8];
        dev.read_config(8, &mut b);
        assert_eq!(b, [0; 8]);
    }

    #[test]
    fn plug_unplug_state_with_merged_backend_calls() {
        let (mut dev, be) = device();
        dev.set_requested_size(16 * BS).unwrap();

        assert_eq!(dev.handle_request(plug(0, 2)), ACK);
        assert_eq!(dev.handle_request(plug(2, 2)), ACK);
        assert_eq!(dev.handle_request(plug(10, 1)), ACK);
        assert_eq!(
            be.calls(),
            vec![
                Call::Plug(0, 2 * BS),
                Call::Plug(2 * BS, 2 * BS),
                Call::Plug(10 * BS, BS)
            ]
        );
        assert_eq!(dev.plugged_size(), 5 * BS);
        assert_eq!(cfg_u64(&dev, 40), 5 * BS);
        assert_eq!(dev.plugged_ranges(), vec![(0, 4 * BS), (10 * BS, BS)]);

        assert_eq!(
            dev.handle_request(state(0, 4)),
            MemResponse::state(BlockState::Plugged)
        );
        assert_eq!(
            dev.handle_request(state(3, 2)),
            MemResponse::state(BlockState::Mixed)
        );
        assert_eq!(
            dev.handle_request(state(4, 6)),
            MemResponse::state(BlockState::Unplugged)
        );
        assert_eq!(
            dev.handle_request(state(0, 32)),
            MemResponse::state(BlockState::Mixed)
        );

        assert_eq!(dev.handle_request(unplug(1, 2)), ACK);
        assert_eq!(be.calls(), vec![Call::Unplug(BS, 2 * BS)]);
        assert_eq!(
            dev.plugged_ranges(),
            vec![(0, BS), (3 * BS, BS), (10 * BS, BS)]
        );
        assert_eq!(dev.plugged_size(), 3 * BS);

        // UNPLUG_ALL: one call per run.
        assert_eq!(dev.handle_request(plug(4, 6)), ACK);
        be.calls();
        assert_eq!(dev.handle_request(MemRequest::UnplugAll), ACK);
        assert_eq!(
            be.calls(),
            vec![Call::Unplug(0, BS), Call::Unplug(3 * BS, 8 * BS)]
        );
        assert_eq!(dev.plugged_size(), 0);
        assert_eq!(
            dev.handle_request(state(0, 32)),
            MemResponse::state(BlockState::Unplugged)
        );
        // Nothing plugged: UNPLUG_ALL is acked without backend calls.
        assert_eq!(dev.handle_request(MemRequest::UnplugAll), ACK);
        assert!(be.calls().is_empty());

        // The last block of the region.
        dev.set_requested_size(NBLOCKS * BS).unwrap();
        assert_eq!(dev.handle_request(plug(NBLOCKS - 1, 1)), ACK);
        assert_eq!(dev.handle_request(plug(0, 31)), ACK);
        assert_eq!(dev.plugged_ranges(), vec![(0, NBLOCKS * BS)]);

        let m = dev.metrics();
        assert_eq!(m.plug_requests, 6);
        assert_eq!(m.unplug_requests, 1);
        assert_eq!(m.unplug_all_requests, 2);
        assert_eq!(m.state_requests, 5);
        assert_eq!(m.bytes_plugged, (5 + 6 + 32) * BS);
        assert_eq!(m.bytes_unplugged, 11 * BS);
        assert_eq!(
            (m.nacks, m.errors, m.busy, m.malformed_requests),
            (0, 0, 0, 0)
        );
    }

    #[test]
    fn nack_beyond_requested_size() {
        let (mut dev, be) = device();
        assert_eq!(dev.handle_request(plug(0, 1)), NACK);
        dev.set_requested_size(3 * BS).unwrap();
        assert_eq!(dev.handle_request(plug(0, 4)), NACK);
        assert_eq!(dev.handle_request(plug(0, 2)), ACK);
        assert_eq!(dev.handle_request(plug(5, 2)), NACK);
        assert_eq!(dev.handle_request(plug(5, 1)), ACK);
        assert_eq!(dev.handle_request(plug(7, 1)), NACK);
        // Shrinking: plugging is refused, unplugging works.
        dev.set_requested_size(BS).unwrap();
        assert_eq!(dev.handle_request(unplug(5, 1)), ACK);
        assert_eq!(dev.handle_request(plug(5, 1)), NACK);
        assert_eq!(
            be.calls(),
            vec![
                Call::Plug(0, 2 * BS),
                Call::Plug(5 * BS, BS),
                Call::Unplug(5 * BS, BS)
            ]
        );
        assert_eq!(dev.metrics().nacks, 5);
        assert_eq!(dev.metrics().errors, 0);
    }

    #[test]
    fn invalid_requests_are_errors() {
        let (mut dev, be) = device();
        dev.set_requested_size(NBLOCKS * BS).unwrap();
        assert_eq!(dev.handle_request(plug(4, 4)), ACK);
        be.calls();

        let raw = |addr: u64, n: u16| {
            [
                MemRequest::Plug { addr, nb_blocks: n },
                MemRequest::Unplug { addr, nb_blocks: n },
                MemRequest::State { addr, nb_blocks: n },
            ]
        };
        let cases = [
            ("misaligned", BASE + 4 * BS + 4096, 1),
            ("misaligned by one", BASE + 1, 1),
            ("zero blocks", BASE + 4 * BS, 0),
            ("below the region", BASE - BS, 1),
            ("straddling the start", BASE - BS, 2),
            ("at address 0", 0, 1),
            ("past the end", BASE + NBLOCKS * BS, 1),
            ("straddling the end", BASE + (NBLOCKS - 1) * BS, 2),
            ("many blocks", BASE, u16::MAX),
            ("address overflow", u64::MAX - BS + 1, 2),
            ("top block", u64::MAX - BS + 1, 1),
        ];
        let mut expected_errors = 0;
        for (what, addr, n) in cases {
            for req in raw(addr, n) {
                assert_eq!(dev.handle_request(req), ERROR, "{what}: {req:?}");
                expected_errors += 1;
            }
        }
        // Already in the target state, fully or partly.
        for req in [plug(4, 1), plug(3, 2), plug(7, 2), plug(0, 32)] {
            assert_eq!(dev.handle_request(req), ERROR, "{req:?}");
            expected_errors += 1;
        }
        for req in [unplug(0, 1), unplug(3, 2), unplug(7, 2), unplug(0, 32)] {
            assert_eq!(dev.handle_request(req), ERROR, "{req:?}");
            expected_errors += 1;
        }
        assert!(be.calls().is_empty(), "no backend call for a bad request");
        assert_eq!(dev.plugged_ranges(), vec![(4 * BS, 4 * BS)]);
        assert_eq!(dev.metrics().errors, expected_errors);
    }

    #[test]
    fn overflowing_block_count_with_huge_blocks() {
        // nb_blocks * block_size overflows u64.
        let c = VirtioMemConfig {
            region_addr: GuestAddress(0),
            region_size: 1 << 62,
            block_size: 1 << 62,
            node_id: None,
        };
        let mut dev = VirtioMem::new(c, Box::new(FakeBackend::default())).unwrap();
        dev.set_requested_size(1 << 62).unwrap();
        let req = MemRequest::Plug {
            addr: 0,
            nb_blocks: 8,
        };
        assert_eq!(dev.handle_request(req), ERROR);
        let req = MemRequest::Plug {
            addr: 0,
            nb_blocks: 1,
        };
        assert_eq!(dev.handle_request(req), ACK);
    }

    #[test]
    fn backend_failures() {
        let (mut dev, be) = device();
        dev.set_requested_size(8 * BS).unwrap();

        be.fail(Some((Fail::Failed, None)));
        assert_eq!(dev.handle_request(plug(0, 2)), ERROR);
        be.fail(Some((Fail::Busy, None)));
        assert_eq!(dev.handle_request(plug(0, 2)), BUSY);
        assert_eq!(dev.plugged_size(), 0);
        assert_eq!(
            dev.handle_request(state(0, 2)),
            MemResponse::state(BlockState::Unplugged)
        );

        be.fail(None);
        assert_eq!(dev.handle_request(plug(0, 2)), ACK);
        assert_eq!(dev.handle_request(plug(4, 2)), ACK);
        be.fail(Some((Fail::Failed, None)));
        assert_eq!(dev.handle_request(unplug(0, 1)), ERROR);
        be.fail(Some((Fail::Busy, None)));
        assert_eq!(dev.handle_request(unplug(0, 1)), BUSY);
        assert_eq!(dev.plugged_size(), 4 * BS);

        // UNPLUG_ALL with one failing run: the other run goes, answer BUSY.
        be.calls();
        be.fail(Some((Fail::Failed, Some(4 * BS))));
        assert_eq!(dev.handle_request(MemRequest::UnplugAll), BUSY);
        assert_eq!(
            be.calls(),
            vec![Call::Unplug(0, 2 * BS), Call::Unplug(4 * BS, 2 * BS)]
        );
        assert_eq!(dev.plugged_ranges(), vec![(4 * BS, 2 * BS)]);
        be.fail(None);
        assert_eq!(dev.handle_request(MemRequest::UnplugAll), ACK);
        assert_eq!(dev.plugged_size(), 0);

        let m = dev.metrics();
        assert_eq!(m.backend_failures, 5);
        assert_eq!((m.errors, m.busy), (2, 3));
        assert_eq!(m.bytes_plugged, 4 * BS);
        assert_eq!(m.bytes_unplugged, 4 * BS);
    }

    #[test]
    fn requested_size_validation_and_notification() {
        let (mut dev, _) = device();
        let err = dev.set_requested_size(BS + 4096).unwrap_err();
        assert!(matches!(err, MemError::RequestedSizeUnaligned { .. }));
        assert!(
            err.to_string().contains("not a multiple of the block size"),
            "{err}"
        );
        let err = dev.set_requested_size((NBLOCKS + 1) * BS).unwrap_err();
        assert!(matches!(err, MemError::RequestedSizeTooLarge { .. }));
        assert!(err.to_string().contains("exceeds the region size"), "{err}");
        assert_eq!(dev.requested_size(), 0);
        dev.set_requested_size(NBLOCKS * BS).unwrap();
        dev.set_requested_size(0).unwrap();

        // Once active, a change raises a config interrupt; no change, none.
        let m = guest_mem();
        let vq = MockSplitQueue::new(&m, 16);
        let irq = activate(&mut dev, &m, &vq);
        dev.set_requested_size(0).unwrap();
        assert_eq!(irq.status(), 0);
        dev.set_requested_size(2 * BS).unwrap();
        assert_eq!(irq.status(), crate::virtio::INTERRUPT_STATUS_CONFIG_CHANGED);
        assert_eq!(irq.irq_fd().read().unwrap(), 1);
        assert_eq!(cfg_u64(&dev, 48), 2 * BS);
    }

    #[test]
    fn device_reset_keeps_blocks_and_system_reset_unplugs_all() {
        let (mut dev, be) = device();
        let m = guest_mem();
        let vq = MockSplitQueue::new(&m, 16);
        activate(&mut dev, &m, &vq);
        dev.set_requested_size(8 * BS).unwrap();
        for req in [plug(0, 1), plug(1, 1), plug(2, 1), plug(6, 2)] {
            assert_eq!(dev.handle_request(req), ACK);
        }
        be.calls();

        dev.reset();
        assert!(!dev.is_activated());
        assert_eq!(dev.plugged_size(), 5 * BS);
        assert!(be.calls().is_empty());

        be.fail(Some((Fail::Busy, Some(6 * BS))));
        let err = dev.unplug_all_on_reset().unwrap_err();
        assert!(matches!(err, MemError::Backend { failed_bytes, .. } if failed_bytes == 2 * BS));
        assert_eq!(dev.plugged_ranges(), vec![(6 * BS, 2 * BS)]);
        be.fail(None);
        be.calls();
        dev.unplug_all_on_reset().unwrap();
        assert_eq!(be.calls(), vec![Call::Unplug(6 * BS, 2 * BS)]);
        assert_eq!(dev.plugged_size(), 0);
        assert_eq!(cfg_u64(&dev, 40), 0);
        // The requested size stays: the new guest will plug it again.
        assert_eq!(dev.requested_size(), 8 * BS);

        let (mut dev, be) = device();
        dev.set_requested_size(8 * BS).unwrap();
        for req in [plug(0, 3), plug(3, 1), plug(6, 2)] {
            assert_eq!(dev.handle_request(req), ACK);
        }
        be.calls();
        dev.unplug_all_on_reset().unwrap();
        assert_eq!(
            be.calls(),
            vec![Call::Unplug(0, 4 * BS), Call::Unplug(6 * BS, 2 * BS)]
        );
        assert_eq!(dev.plugged_size(), 0);
    }

    // ---- queue level ----

    const REQ: u64 = 0x10_0000;
    const RESP: u64 = 0x11_0000;

    fn guest_mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    fn activate(
        dev: &mut VirtioMem,
        m: &GuestMemoryMmap,
        vq: &MockSplitQueue<GuestMemoryMmap>,
    ) -> Arc<VirtioInterrupt> {
        dev.set_acked_features(dev.avail_features());
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        dev.activate(
            GuestMemoryAtomic::new(m.clone()),
            irq.clone(),
            vec![vq.create_queue::<Queue>().unwrap()],
        )
        .unwrap();
        assert!(dev.is_activated());
        irq
    }

    fn used(vq: &MockSplitQueue<GuestMemoryMmap>, i: usize) -> (u32, u32) {
        let e = vq.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    fn resp_bytes(m: &GuestMemoryMmap) -> [u8; 10] {
        let mut b = [0u8; 10];
        m.read_slice(&mut b, GuestAddress(RESP)).unwrap();
        b
    }

    #[test]
    fn activate_checks_queues_and_features() {
        let (mut dev, _) = device();
        let m = guest_mem();
        let vq = MockSplitQueue::new(&m, 16);
        let irq = Arc::new(VirtioInterrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        let mem = GuestMemoryAtomic::new(m.clone());
        dev.set_acked_features(dev.avail_features());
        let err = dev.activate(mem.clone(), irq.clone(), vec![]).unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 1,
                got: 0
            }
        ));
        dev.set_acked_features(VIRTIO_F_VERSION_1);
        let q = vq.create_queue::<Queue>().unwrap();
        let err = dev.activate(mem.clone(), irq.clone(), vec![q]).unwrap_err();
        assert!(matches!(err, ActivateError::Features(f) if f == VIRTIO_F_VERSION_1));
        assert!(!dev.is_activated());
        activate(&mut dev, &m, &vq);
        // Activation kicks the queue eventfd once.
        assert_eq!(dev.queue_events()[0].read().unwrap(), 1);
    }

    #[test]
    fn queue_plug_and_malformed_chains() {
        let (mut dev, be) = device();
        dev.set_requested_size(4 * BS).unwrap();
        let m = guest_mem();
        let vq = MockSplitQueue::new(&m, 16);
        let irq = activate(&mut dev, &m, &vq);

        // A PLUG request, the way Linux sends it.
        m.write_slice(
            &req_bytes(VIRTIO_MEM_REQ_PLUG, BASE + 2 * BS, 2),
            GuestAddress(REQ),
        )
        .unwrap();
        m.write_slice(&[0xee; 10], GuestAddress(RESP)).unwrap();
        vq.build_desc_chain(&[desc(REQ, 24, false), desc(RESP, 10, true)])
            .unwrap();
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(used(&vq, 0), (0, 10));
        assert_eq!(resp_bytes(&m), [0; 10]);
        assert_eq!(be.calls(), vec![Call::Plug(2 * BS, 2 * BS)]);
        assert_eq!(dev.plugged_size(), 2 * BS);
        assert_eq!(irq.status(), crate::virtio::INTERRUPT_STATUS_USED_RING);

        // STATE over a mixed range.
        m.write_slice(
            &req_bytes(VIRTIO_MEM_REQ_STATE, BASE + BS, 2),
            GuestAddress(REQ),
        )
        .unwrap();
        vq.build_desc_chain(&[desc(REQ, 24, false), desc(RESP, 10, true)])
            .unwrap();
        dev.process_queue();
        assert_eq!(used(&vq, 1), (0, 10));
        assert_eq!(resp_bytes(&m), [0, 0, 0, 0, 0, 0, 0, 0, 2, 0]);

        // Response buffer too small: nothing written, used length 0.
        m.write_slice(
            &req_bytes(VIRTIO_MEM_REQ_UNPLUG, BASE + 2 * BS, 2),
            GuestAddress(REQ),
        )
        .unwrap();
        m.write_slice(&[0xee; 10], GuestAddress(RESP)).unwrap();
        vq.build_desc_chain(&[desc(REQ, 24, false), desc(RESP, 8, true)])
            .unwrap();
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 3);
        assert_eq!(used(&vq, 2), (0, 0));
        assert_eq!(resp_bytes(&m), [0xee; 10]);
        assert_eq!(dev.plugged_size(), 2 * BS, "the request was not executed");

        // Response outside guest memory: used length 0.
        vq.build_desc_chain(&[desc(REQ, 24, false), desc(0x4000_0000, 10, true)])
            .unwrap();
        dev.process_queue();
        assert_eq!(used(&vq, 3), (0, 0));

        // Short request with a usable response: ERROR.
        vq.build_desc_chain(&[desc(REQ, 20, false), desc(RESP, 10, true)])
            .unwrap();
        dev.process_queue();
        assert_eq!(used(&vq, 4), (0, 10));
        assert_eq!(resp_bytes(&m), [3, 0, 0, 0, 0, 0, 0, 0, 0, 0]);

        // Unknown request type: ERROR.
        m.write_slice(&req_bytes(0x77, BASE, 1), GuestAddress(REQ))
            .unwrap();
        vq.build_desc_chain(&[desc(REQ, 24, false), desc(RESP, 10, true)])
            .unwrap();
        dev.process_queue();
        assert_eq!(used(&vq, 5), (0, 10));
        assert_eq!(resp_bytes(&m), [3, 0, 0, 0, 0, 0, 0, 0, 0, 0]);

        assert!(be.calls().is_empty());
        let metrics = dev.metrics();
        assert_eq!(metrics.malformed_requests, 3);
        assert_eq!(metrics.errors, 2);
        assert_eq!(metrics.plug_requests, 1);
        assert_eq!(metrics.state_requests, 1);
        assert_eq!(metrics.unplug_requests, 0);

        // After a device reset the queue is gone; processing is a no-op.
        dev.reset();
        vq.build_desc_chain(&[desc(REQ, 24, false), desc(RESP, 10, true)])
            .unwrap();
        dev.process_queue();
        assert_eq!(vq.used().idx().load(), 6);
    }

    #[test]
    fn event_loop_processes_the_queue() {
        use event_manager::{EventManager, SubscriberOps};

        let (dev, be) = device();
        let dev = Arc::new(Mutex::new(dev));
        let mut manager = EventManager::<Arc<Mutex<VirtioMem>>>::new().unwrap();
        manager.add_subscriber(dev.clone());

        let m = guest_mem();
        let vq = MockSplitQueue::new(&m, 16);
        m.write_slice(&req_bytes(VIRTIO_MEM_REQ_PLUG, BASE, 1), GuestAddress(REQ))
            .unwrap();
        vq.build_desc_chain(&[desc(REQ, 24, false), desc(RESP, 10, true)])
            .unwrap();

        // A notification before activation is dropped...
        dev.lock().unwrap().queue_events()[0].write(1).unwrap();
        assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
        assert_eq!(vq.used().idx().load(), 0);

        // ...and activation makes the loop look at the queue again.
        {
            let mut d = dev.lock().unwrap();
            d.set_requested_size(BS).unwrap();
            activate(&mut d, &m, &vq);
        }
        assert_eq!(manager.run_with_timeout(100).unwrap(), 1);
        assert_eq!(vq.used().idx().load(), 1);
        assert_eq!(used(&vq, 0), (0, 10));
        assert_eq!(be.calls(), vec![Call::Plug(0, BS)]);
        assert_eq!(dev.lock().unwrap().plugged_size(), BS);
    }
}
