//! The [`Block`] device model: features, configuration space, activation and
//! request execution against the backing file.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::metrics::{BlockMetrics, BlockMetricsSnapshot};
use super::request::{BlockRequest, RequestKind, SECTOR_SHIFT, SECTOR_SIZE};
use crate::virtio::{
    ActivateError, GuestMemory, InterruptKind, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// Size of the block device's only queue.
pub const BLOCK_QUEUE_SIZE: u16 = 256;
/// Largest chunk copied between the file and guest memory at once (bounds the
/// host allocation whatever length the guest asks for).
const IO_CHUNK: usize = 64 * 1024;
/// Length of the GET_ID answer.
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Size of the configuration space we expose: capacity, size_max, seg_max.
const CONFIG_LEN: usize = 16;

/// Errors creating a block device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The backing file cannot be opened.
    #[error("cannot open disk image {path:?}{}: {source}", if *.read_only { " read-only" } else { " read-write" })]
    Open {
        /// The image path.
        path: PathBuf,
        /// Whether it was opened read-only.
        read_only: bool,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The size or metadata of the backing file cannot be read.
    #[error("cannot read the size of disk image {path:?}: {source}")]
    Size {
        /// The image path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// The path is a directory.
    #[error("disk image {0:?} is a directory")]
    NotADisk(PathBuf),
    /// The queue eventfd cannot be created.
    #[error("cannot create the queue eventfd: {0}")]
    EventFd(#[source] io::Error),
}

/// State that exists only while the driver has the device running.
struct Active {
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    queue: Queue,
}

/// A virtio-blk device backed by a raw image file (or host block device).
pub struct Block {
    path: PathBuf,
    file: File,
    read_only: bool,
    capacity: u64,
    avail_features: u64,
    acked_features: u64,
    config: [u8; CONFIG_LEN],
    id: [u8; ID_BYTES],
    queue_sizes: [u16; 1],
    queue_evts: [EventFd; 1],
    active: Option<Active>,
    metrics: Arc<BlockMetrics>,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("path", &self.path)
            .field("read_only", &self.read_only)
            .field("capacity", &self.capacity)
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

/// Result of executing one request: status byte and bytes written to the
/// guest's buffers (without the status byte).
struct Outcome {
    status: u32,
    written: u32,
}

impl Outcome {
    fn status(status: u32) -> Self {
        Self { status, written: 0 }
    }
}

impl Block {
    /// Opens `path` as the disk (read-write unless `read_only`). The capacity
    /// is the file size in 512-byte sectors, rounded down.
    pub fn new(path: &Path, read_only: bool) -> Result<Block, BlockError> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_owned(),
                read_only,
                source,
            })?;
        let size_err = |source| BlockError::Size {
            path: path.to_owned(),
            source,
        };
        // Seeking to the end also sizes host block devices (whose metadata
        // length is 0).
        let size = file.seek(SeekFrom::End(0)).map_err(size_err)?;
        let meta = file.metadata().map_err(size_err)?;
        if meta.is_dir() {
            return Err(BlockError::NotADisk(path.to_owned()));
        }
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "disk image {path:?}: size {size} is not a multiple of {SECTOR_SIZE}, \
                 the tail is not visible to the guest"
            );
        }
        let capacity = size >> SECTOR_SHIFT;

        let mut avail_features =
            VIRTIO_F_VERSION_1 | (1u64 << VIRTIO_BLK_F_FLUSH) | (1u64 << VIRTIO_BLK_F_SEG_MAX);
        if read_only {
            avail_features |= 1u64 << VIRTIO_BLK_F_RO;
        }

        let mut config = [0u8; CONFIG_LEN];
        config[0..8].copy_from_slice(&capacity.to_le_bytes());
        // size_max (bytes 8..12) stays 0: not offered. seg_max: the chain
        // also carries the header and the status descriptors.
        let seg_max = u32::from(BLOCK_QUEUE_SIZE) - 2;
        config[12..16].copy_from_slice(&seg_max.to_le_bytes());

        // A serial stable for a given file: its device and inode numbers.
        let mut id = [0u8; ID_BYTES];
        let serial = format!("{:x}-{:x}", meta.dev(), meta.ino());
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);

        Ok(Block {
            path: path.to_owned(),
            file,
            read_only,
            capacity,
            avail_features,
            acked_features: 0,
            config,
            id,
            queue_sizes: [BLOCK_QUEUE_SIZE],
            queue_evts: [EventFd::new(libc::EFD_NONBLOCK).map_err(BlockError::EventFd)?],
            active: None,
            metrics: Arc::new(BlockMetrics::default()),
        })
    }

    /// Replaces the GET_ID answer (truncated to 20 bytes, zero-padded).
    pub fn set_serial(&mut self, serial: &str) {
        self.id = [0; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        self.id[..n].copy_from_slice(&serial.as_bytes()[..n]);
    }

    /// The disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the guest may only read.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The backing file path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The features the driver accepted.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Whether the driver activated the device.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// The live counters (shareable with the VMM).
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// A snapshot of the counters.
    pub fn metrics_snapshot(&self) -> BlockMetricsSnapshot {
        self.metrics.snapshot()
    }

    /// Processes every available request, returns the used buffers and
    /// raises the queue interrupt if the driver wants it. Returns the number
    /// of chains processed. Does nothing before activation.
    pub fn process_queue(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let guard = active.mem.memory();
        let mem: &GuestMemoryMmap = &guard;
        let mut processed = 0;
        loop {
            if let Err(e) = active.queue.disable_notification(mem) {
                log::error!("virtio-blk: queue error: {e}");
                break;
            }
            while let Some(chain) = active.queue.pop_descriptor_chain(mem) {
                processed += 1;
                BlockMetrics::inc(&self.metrics.requests, 1);
                let head = chain.head_index();
                let used_len = match BlockRequest::parse_chain(chain, self.capacity) {
                    Ok(req) => {
                        let outcome = execute(
                            &self.file,
                            self.read_only,
                            &self.id,
                            &self.metrics,
                            mem,
                            &req,
                        );
                        write_status(mem, req.status_addr, outcome.status, &self.metrics)
                            .map_or(0, |_| outcome.written.saturating_add(1))
                    }
                    Err(e) => {
                        log::debug!("virtio-blk: {e}");
                        BlockMetrics::inc(&self.metrics.invalid_requests, 1);
                        BlockMetrics::inc(&self.metrics.failures, 1);
                        match e.status_addr {
                            Some(addr) => {
                                write_status(mem, addr, VIRTIO_BLK_S_IOERR, &self.metrics)
                                    .map_or(0, |_| 1)
                            }
                            None => 0,
                        }
                    }
                };
                if let Err(e) = active.queue.add_used(mem, head, used_len) {
                    log::error!("virtio-blk: cannot return descriptor {head}: {e}");
                }
            }
            match active.queue.enable_notification(mem) {
                // More requests arrived while notifications were off. Not
                // when the driver's available index is more than a queue
                // ahead: `pop_descriptor_chain` refuses that ring, so going
                // round again would spin forever on the event loop.
                Ok(true) if crate::virtio::avail_index_valid(&active.queue, mem) => continue,
                Ok(true) => {
                    log::error!(
                        "virtio-blk: the driver's available index is more than the queue \
                         size ahead; the queue is stalled until the driver resets it"
                    );
                    break;
                }
                Ok(false) => break,
                Err(e) => {
                    log::error!("virtio-blk: queue error: {e}");
                    break;
                }
            }
        }
        match active.queue.needs_notification(mem) {
            Ok(true) => {
                if let Err(e) = active.interrupt.trigger(InterruptKind::Queue) {
                    log::error!("virtio-blk: interrupt failed: {e}");
                }
            }
            Ok(false) => {}
            Err(e) => log::error!("virtio-blk: queue error: {e}"),
        }
        processed
    }
}

/// Writes the status byte; counts a failure when it cannot be written.
fn write_status(
    mem: &GuestMemoryMmap,
    addr: GuestAddress,
    status: u32,
    metrics: &BlockMetrics,
) -> Result<(), ()> {
    let byte = u8::try_from(status).unwrap_or(u8::MAX);
    mem.write_obj(byte, addr).map_err(|e| {
        log::error!(
            "virtio-blk: cannot write status at {:#x}: {e}",
            addr.raw_value()
        );
        BlockMetrics::inc(&metrics.failures, 1);
    })
}

/// Executes a validated request against `file`.
fn execute(
    file: &File,
    read_only: bool,
    id: &[u8; ID_BYTES],
    metrics: &BlockMetrics,
    mem: &GuestMemoryMmap,
    req: &BlockRequest,
) -> Outcome {
    let result = match req.kind {
        RequestKind::In => transfer(file, mem, req, true).map(|n| {
            BlockMetrics::inc(&metrics.reads, 1);
            BlockMetrics::inc(&metrics.read_bytes, n);
            // Parsing bounds each buffer to u32; the sum of a chain's
            // lengths cannot exceed u32 (virtio_queue stops the chain).
            u32::try_from(n).unwrap_or(u32::MAX)
        }),
        RequestKind::Out if read_only => {
            log::debug!("virtio-blk: write to a read-only disk");
            Err(Outcome::status(VIRTIO_BLK_S_IOERR))
        }
        RequestKind::Out => transfer(file, mem, req, false).map(|n| {
            BlockMetrics::inc(&metrics.writes, 1);
            BlockMetrics::inc(&metrics.write_bytes, n);
            0
        }),
        RequestKind::Flush => match file.sync_data() {
            Ok(()) => {
                BlockMetrics::inc(&metrics.flushes, 1);
                Ok(0)
            }
            Err(e) => {
                log::error!("virtio-blk: flush failed: {e}");
                Err(Outcome::status(VIRTIO_BLK_S_IOERR))
            }
        },
        RequestKind::GetId => write_id(mem, req, id),
        RequestKind::Unsupported(t) => {
            log::debug!("virtio-blk: unsupported request type {t}");
            Err(Outcome::status(VIRTIO_BLK_S_UNSUPP))
        }
    };
    match result {
        Ok(written) => Outcome {
            status: VIRTIO_BLK_S_OK,
            written,
        },
        Err(outcome) => {
            BlockMetrics::inc(&metrics.failures, 1);
            outcome
        }
    }
}

/// Copies between the file (from the request's sector) and the data
/// buffers; `to_guest` for reads. Returns the bytes moved.
fn transfer(
    file: &File,
    mem: &GuestMemoryMmap,
    req: &BlockRequest,
    to_guest: bool,
) -> Result<u64, Outcome> {
    let ioerr = |e: &dyn std::fmt::Display| {
        log::error!(
            "virtio-blk: {} at sector {} failed: {e}",
            if to_guest { "read" } else { "write" },
            req.sector
        );
        Outcome::status(VIRTIO_BLK_S_IOERR)
    };
    // Parsing checked sector + length against the capacity.
    let mut offset = req.sector << SECTOR_SHIFT;
    let mut buf = Vec::new();
    for &(addr, len) in &req.data {
        let mut done: u32 = 0;
        while done < len {
            let chunk = usize::try_from(len - done).map_or(IO_CHUNK, |r| r.min(IO_CHUNK));
            buf.resize(chunk, 0);
            let gaddr = addr
                .checked_add(u64::from(done))
                .ok_or_else(|| ioerr(&"address overflow"))?;
            if to_guest {
                file.read_exact_at(&mut buf, offset)
                    .map_err(|e| ioerr(&e))?;
                mem.write_slice(&buf, gaddr).map_err(|e| ioerr(&e))?;
            } else {
                mem.read_slice(&mut buf, gaddr).map_err(|e| ioerr(&e))?;
                file.write_all_at(&buf, offset).map_err(|e| ioerr(&e))?;
            }
            // chunk <= IO_CHUNK, which fits in u32.
            let step = u32::try_from(chunk).unwrap_or(u32::MAX);
            done = done.saturating_add(step);
            offset = offset.saturating_add(u64::from(step));
        }
    }
    Ok(offset - (req.sector << SECTOR_SHIFT))
}

/// Writes the serial into the GET_ID buffers. Returns the bytes written.
fn write_id(
    mem: &GuestMemoryMmap,
    req: &BlockRequest,
    id: &[u8; ID_BYTES],
) -> Result<u32, Outcome> {
    let mut rest: &[u8] = id;
    let mut written: u32 = 0;
    for &(addr, len) in &req.data {
        if rest.is_empty() {
            break;
        }
        let n = usize::try_from(len).map_or(rest.len(), |l| l.min(rest.len()));
        let (now, later) = rest.split_at(n);
        mem.write_slice(now, addr).map_err(|e| {
            log::error!("virtio-blk: GET_ID write failed: {e}");
            Outcome::status(VIRTIO_BLK_S_IOERR)
        })?;
        written = written.saturating_add(u32::try_from(n).unwrap_or(u32::MAX));
        rest = later;
    }
    Ok(written)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        crate::virtio::read_config_space(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-blk: ignored config write at {offset:#x}");
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    fn activate(
        &mut self,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let [queue] = crate::virtio::exact_queues(queues)?;
        self.active = Some(Active {
            mem,
            interrupt,
            queue,
        });
        // Process whatever the driver queued before the event loop saw the
        // device active.
        if let Err(e) = self.queue_evts[0].write(1) {
            log::warn!("virtio-blk: cannot kick the queue: {e}");
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }
}

impl Block {
    /// The queue eventfds (same as [`VirtioDevice::queue_events`]).
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::request::tests::{desc, memory, write_header, DATA, HDR, STATUS, W};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use virtio_queue::desc::split::Descriptor;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::GuestMemoryAtomic;

    /// A file in the temp dir, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        /// A disk of `sectors` sectors; byte i holds i % 251.
        fn disk(sectors: u64) -> Self {
            static N: AtomicUsize = AtomicUsize::new(0);
            let path = std::env::temp_dir().join(format!(
                "tidevm-blk-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::SeqCst)
            ));
            let len = usize::try_from(sectors * SECTOR_SIZE).unwrap();
            let content: Vec<u8> = (0..len).map(|i| u8::try_from(i % 251).unwrap()).collect();
            std::fs::write(&path, content).unwrap();
            Self(path)
        }

        fn content(&self) -> Vec<u8> {
            std::fs::read(&self.0).unwrap()
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    /// Places one request chain at descriptor index `head` and makes it
    /// available.
    fn add_request(q: &MockSplitQueue<GuestMemoryMmap>, descs: &[RawDescriptor], head: u16) {
        let n = descs.len();
        let chained: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let d = Descriptor::from(*d);
                let (flags, next) = if i + 1 < n {
                    (d.flags() | 1, head + u16::try_from(i).unwrap() + 1)
                } else {
                    (d.flags() & !1, 0)
                };
                RawDescriptor::from(Descriptor::new(d.addr().0, d.len(), flags, next))
            })
            .collect();
        q.add_desc_chains(&chained, head).unwrap();
    }

    fn activate(
        block: &mut Block,
        mem: &GuestMemoryMmap,
        q: &MockSplitQueue<GuestMemoryMmap>,
    ) -> EventFd {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        let queue: Queue = q.create_queue().unwrap();
        block
            .activate(GuestMemoryAtomic::new(mem.clone()), interrupt, vec![queue])
            .unwrap();
        // Activation kicks the queue eventfd once.
        assert_eq!(block.queue_evts()[0].read().unwrap(), 1);
        irq
    }

    /// (descriptor id, length) of used ring entry `i`.
    fn used(q: &MockSplitQueue<GuestMemoryMmap>, i: usize) -> (u32, u32) {
        let e = q.used().ring().ref_at(i).unwrap().load();
        (e.id(), e.len())
    }

    fn status(mem: &GuestMemoryMmap) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    #[test]
    fn creation_errors_and_config() {
        let missing = Path::new("/nonexistent/tidevm/disk.img");
        let err = Block::new(missing, true).unwrap_err();
        assert!(matches!(err, BlockError::Open { .. }));
        assert!(err.to_string().contains("/nonexistent/tidevm/disk.img"));
        let err = Block::new(&std::env::temp_dir(), true).unwrap_err();
        assert!(matches!(err, BlockError::NotADisk(_)), "{err}");

        let file = TempFile::disk(8);
        // An odd tail is not visible.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&file.0)
            .unwrap()
            .write_all_at(&[1, 2, 3], 4096)
            .unwrap();
        let block = Block::new(&file.0, false).unwrap();
        assert_eq!(block.capacity(), 8);
        assert_eq!(block.device_type(), 2);
        assert_eq!(block.queue_max_sizes(), &[256]);
        assert_eq!(block.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(block.avail_features() & (1 << VIRTIO_BLK_F_FLUSH), 0);
        assert_ne!(block.avail_features() & VIRTIO_F_VERSION_1, 0);
        let mut cap = [0u8; 8];
        block.read_config(0, &mut cap);
        assert_eq!(u64::from_le_bytes(cap), 8);
        let mut seg = [0u8; 4];
        block.read_config(12, &mut seg);
        assert_eq!(u32::from_le_bytes(seg), 254);
        let mut far = [0xffu8; 4];
        block.read_config(14, &mut far);
        assert_eq!(far, [0, 0, 0, 0]);
        block.read_config(u64::MAX, &mut far);
        assert_eq!(far, [0; 4]);
        let ro = Block::new(&file.0, true).unwrap();
        assert_ne!(ro.avail_features() & (1 << VIRTIO_BLK_F_RO), 0);
    }

    #[test]
    fn read_write_flush_getid() {
        let file = TempFile::disk(16);
        let mut block = Block::new(&file.0, false).unwrap();
        block.set_serial("tidevm-serial");
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        let irq = activate(&mut block, &mem, &q);

        // Read sectors 1..3 into two buffers.
        write_header(&mem, VIRTIO_BLK_T_IN, 1);
        add_request(
            &q,
            &[
                desc(HDR, 16, 0),
                desc(DATA, 512, W),
                desc(DATA + 0x1000, 512, W),
                desc(STATUS, 1, W),
            ],
            0,
        );
        assert_eq!(block.process_queue(), 1);
        assert_eq!(status(&mem), 0);
        assert_eq!(used(&q, 0), (0, 1025));
        assert_eq!(irq.read().unwrap(), 1);
        let disk = file.content();
        let mut buf = vec![0u8; 512];
        mem.read_slice(&mut buf, GuestAddress(DATA)).unwrap();
        assert_eq!(buf, disk[512..1024]);
        mem.read_slice(&mut buf, GuestAddress(DATA + 0x1000))
            .unwrap();
        assert_eq!(buf, disk[1024..1536]);

        // Write sector 3 and flush.
        mem.write_slice(&[0xab; 1024], GuestAddress(DATA)).unwrap();
        write_header(&mem, VIRTIO_BLK_T_OUT, 3);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        add_request(
            &q,
            &[desc(HDR, 16, 0), desc(DATA, 1024, 0), desc(STATUS, 1, W)],
            4,
        );
        assert_eq!(block.process_queue(), 1);
        assert_eq!(status(&mem), 0);
        assert_eq!(used(&q, 1), (4, 1));
        let after = file.content();
        assert_eq!(after[1536..2560], [0xab; 1024]);
        assert_eq!(after[..1536], disk[..1536]);
        assert_eq!(after[2560..], disk[2560..]);

        write_header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        add_request(&q, &[desc(HDR, 16, 0), desc(STATUS, 1, W)], 8);
        assert_eq!(block.process_queue(), 1);
        assert_eq!(status(&mem), 0);

        write_header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        add_request(
            &q,
            &[desc(HDR, 16, 0), desc(DATA, 20, W), desc(STATUS, 1, W)],
            10,
        );
        assert_eq!(block.process_queue(), 1);
        assert_eq!(used(&q, 3), (10, 21));
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"tidevm-serial\0\0\0\0\0\0\0");

        let m = block.metrics_snapshot();
        assert_eq!(m.requests, 4);
        assert_eq!((m.reads, m.read_bytes), (1, 1024));
        assert_eq!((m.writes, m.write_bytes), (1, 1024));
        assert_eq!(m.flushes, 1);
        assert_eq!(m.failures, 0);
    }

    #[test]
    fn read_only_refuses_writes() {
        let file = TempFile::disk(4);
        let before = file.content();
        let mut block = Block::new(&file.0, true).unwrap();
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        activate(&mut block, &mem, &q);
        write_header(&mem, VIRTIO_BLK_T_OUT, 0);
        add_request(
            &q,
            &[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)],
            0,
        );
        assert_eq!(block.process_queue(), 1);
        assert_eq!(u32::from(status(&mem)), VIRTIO_BLK_S_IOERR);
        assert_eq!(file.content(), before);
        // Reads still work.
        write_header(&mem, VIRTIO_BLK_T_IN, 3);
        add_request(
            &q,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
            4,
        );
        assert_eq!(block.process_queue(), 1);
        assert_eq!(status(&mem), 0);
        let m = block.metrics_snapshot();
        assert_eq!((m.writes, m.reads, m.failures), (0, 1, 1));
    }

    #[test]
    fn bad_requests_get_errors() {
        let file = TempFile::disk(4);
        let before = file.content();
        let mut block = Block::new(&file.0, false).unwrap();
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        activate(&mut block, &mem, &q);

        // Past the end of the disk.
        write_header(&mem, VIRTIO_BLK_T_OUT, 3);
        add_request(
            &q,
            &[desc(HDR, 16, 0), desc(DATA, 1024, 0), desc(STATUS, 1, W)],
            0,
        );
        // Unsupported type (DISCARD).
        add_request(
            &q,
            &[
                desc(HDR + 0x100, 16, 0),
                desc(DATA, 16, 0),
                desc(STATUS + 0x10, 1, W),
            ],
            3,
        );
        mem.write_obj(11u32, GuestAddress(HDR + 0x100)).unwrap();
        // No usable status descriptor: returned with length 0.
        add_request(&q, &[desc(HDR, 16, 0), desc(STATUS + 0x20, 1, 0)], 6);
        // A lone descriptor.
        add_request(&q, &[desc(HDR, 16, 0)], 8);
        assert_eq!(block.process_queue(), 4);
        assert_eq!(u32::from(status(&mem)), VIRTIO_BLK_S_IOERR);
        let unsupp: u8 = mem.read_obj(GuestAddress(STATUS + 0x10)).unwrap();
        assert_eq!(u32::from(unsupp), VIRTIO_BLK_S_UNSUPP);
        assert_eq!(used(&q, 0), (0, 1));
        assert_eq!(used(&q, 1), (3, 1));
        assert_eq!(used(&q, 2), (6, 0));
        assert_eq!(used(&q, 3), (8, 0));
        assert_eq!(file.content(), before);
        let m = block.metrics_snapshot();
        assert_eq!((m.requests, m.failures, m.invalid_requests), (4, 4, 3));
    }

    /// Regression (found by the `blk_queue` fuzz target): an available
    /// index more than a queue ahead made `process_queue` spin forever,
    /// since the queue refuses to pop from such a ring while
    /// `enable_notification` keeps reporting pending requests.
    #[test]
    fn avail_index_beyond_the_queue_size_does_not_hang() {
        let file = TempFile::disk(4);
        let mut block = Block::new(&file.0, false).unwrap();
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        activate(&mut block, &mem, &q);
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        add_request(
            &q,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
            0,
        );
        q.avail().idx().store(u16::to_le(200));
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let n = block.process_queue();
            let _ = tx.send((n, block));
        });
        let (n, mut block) = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("process_queue did not return");
        assert_eq!(n, 0);
        // The driver repairs the ring: the request is served.
        q.avail().idx().store(u16::to_le(1));
        assert_eq!(block.process_queue(), 1);
        assert_eq!(status(&mem), 0);
    }

    #[test]
    fn activation_and_reset() {
        let file = TempFile::disk(4);
        let mut block = Block::new(&file.0, false).unwrap();
        assert_eq!(block.process_queue(), 0);
        let mem = memory();
        let irq = Arc::new(VirtioInterrupt::new(
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ));
        let err = block
            .activate(GuestMemoryAtomic::new(mem.clone()), irq.clone(), vec![])
            .unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 1,
                got: 0
            }
        ));
        let q = MockSplitQueue::new(&mem, 16);
        activate(&mut block, &mem, &q);
        block.set_acked_features(u64::MAX);
        assert_eq!(block.acked_features(), block.avail_features());
        assert!(block.is_activated());
        block.reset();
        assert!(!block.is_activated());
        assert_eq!(block.acked_features(), 0);
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        add_request(
            &q,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
            0,
        );
        assert_eq!(block.process_queue(), 0);
    }

    #[test]
    fn event_loop_processes_notifications() {
        use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
        let file = TempFile::disk(4);
        let block = Arc::new(Mutex::new(Block::new(&file.0, false).unwrap()));
        let mut em = EventManager::<Arc<Mutex<dyn MutEventSubscriber + Send>>>::new().unwrap();
        em.add_subscriber(block.clone());
        let mem = memory();
        let q = MockSplitQueue::new(&mem, 16);
        // Notifications before activation are drained and ignored.
        block.lock().unwrap().queue_evts()[0].write(1).unwrap();
        assert_eq!(em.run_with_timeout(50).unwrap(), 1);

        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let queue: Queue = q.create_queue().unwrap();
        block
            .lock()
            .unwrap()
            .activate(
                GuestMemoryAtomic::new(mem.clone()),
                Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap())),
                vec![queue],
            )
            .unwrap();
        write_header(&mem, VIRTIO_BLK_T_IN, 0);
        add_request(
            &q,
            &[desc(HDR, 16, 0), desc(DATA, 512, W), desc(STATUS, 1, W)],
            0,
        );
        // The activation kick (or a guest notification) runs the queue.
        block.lock().unwrap().queue_evts()[0].write(1).unwrap();
        assert_eq!(em.run_with_timeout(50).unwrap(), 1);
        assert_eq!(used(&q, 0), (0, 513));
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(block.lock().unwrap().metrics().snapshot().reads, 1);
    }
}
