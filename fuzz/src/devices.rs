//! The devices under test, set up the same way by every target, with the
//! checks each target runs on them: counter consistency and "the device
//! still answers a valid request".

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, OnceLock};

use devices::virtio::balloon::{Balloon, BalloonConfig};
use devices::virtio::block::Block;
use devices::virtio::mem::{BackendError, MemoryBackend, VirtioMem, VirtioMemConfig};
use devices::virtio::{GuestMemory, VirtioDevice, VirtioInterrupt};
use vm_memory::{Bytes as _, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest::{fill, ready_queue, Desc, RingLayout, Virtq, DATA_START, RING_STRIDE};

/// An interrupt whose eventfd nobody reads.
pub fn interrupt() -> Arc<VirtioInterrupt> {
    Arc::new(VirtioInterrupt::new(
        EventFd::new(EFD_NONBLOCK).expect("eventfd"),
    ))
}

/// `mem` as devices take it.
pub fn atomic(mem: &GuestMemoryMmap) -> GuestMemory {
    GuestMemoryAtomic::new(mem.clone())
}

/// Zeroes the rings of queue `q`.
pub fn clear_rings(mem: &GuestMemoryMmap, q: usize) {
    fill(mem, RingLayout::of(q).desc, &vec![0; RING_STRIDE as usize]);
}

/// Writes a one-chain queue `q` (size 8) whose chain is `descs`.
fn post_chain(mem: &GuestMemoryMmap, q: usize, descs: Vec<Desc>) {
    clear_rings(mem, q);
    Virtq {
        size_log2: 3,
        descs,
        avail: vec![0],
        ..Virtq::default()
    }
    .install(mem, q, 8);
}

// ---------------------------------------------------------------- virtio-mem

/// Start of the virtio-mem region (above guest RAM: plugging is the
/// backend's business, not guest memory's).
pub const MEM_REGION: u64 = 0x1_0000_0000;
/// virtio-mem block size.
pub const MEM_BLOCK: u64 = 2 << 20;
/// Blocks in the region.
pub const MEM_BLOCKS: u64 = 64;

/// How the fake backend answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailMode {
    /// Every call succeeds.
    None,
    /// Every call fails transiently.
    Busy,
    /// Every call fails for good.
    Failed,
}

/// The backend's own record of plugged blocks.
#[derive(Debug)]
pub struct MemModel {
    /// One flag per block.
    pub plugged: Vec<bool>,
    /// How the next calls answer.
    pub fail: FailMode,
}

/// A [`MemoryBackend`] that checks every call against its own model: the
/// device may only plug unplugged blocks and unplug plugged ones, block
/// aligned, inside the region.
#[derive(Debug, Clone)]
pub struct ModelBackend(pub Arc<Mutex<MemModel>>);

impl ModelBackend {
    fn apply(&self, offset: u64, len: u64, plug: bool) -> Result<(), BackendError> {
        let mut m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        assert!(
            len > 0 && offset.is_multiple_of(MEM_BLOCK) && len.is_multiple_of(MEM_BLOCK),
            "backend call {offset:#x}+{len:#x} is not block aligned"
        );
        assert!(
            offset
                .checked_add(len)
                .is_some_and(|end| end <= MEM_BLOCK * MEM_BLOCKS),
            "backend call {offset:#x}+{len:#x} runs past the region"
        );
        let blocks = (offset / MEM_BLOCK) as usize..((offset + len) / MEM_BLOCK) as usize;
        assert!(
            m.plugged[blocks.clone()].iter().all(|&p| p != plug),
            "device asked to {} {offset:#x}+{len:#x}, which is not all {}",
            if plug { "plug" } else { "unplug" },
            if plug { "unplugged" } else { "plugged" },
        );
        match m.fail {
            FailMode::None => {}
            FailMode::Busy => return Err(BackendError::Busy("fuzz".into())),
            FailMode::Failed => return Err(BackendError::Failed("fuzz".into())),
        }
        m.plugged[blocks].fill(plug);
        Ok(())
    }

    /// The model's plugged runs as `(offset, len)`.
    pub fn runs(&self) -> Vec<(u64, u64)> {
        let m = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for (i, _) in m.plugged.iter().enumerate().filter(|(_, p)| **p) {
            let off = i as u64 * MEM_BLOCK;
            match runs.last_mut() {
                Some((start, len)) if *start + *len == off => *len += MEM_BLOCK,
                _ => runs.push((off, MEM_BLOCK)),
            }
        }
        runs
    }

    /// Sets how the next calls answer.
    pub fn set_fail(&self, fail: FailMode) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).fail = fail;
    }
}

impl MemoryBackend for ModelBackend {
    fn plug(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.apply(offset, len, true)
    }

    fn unplug(&mut self, offset: u64, len: u64) -> Result<(), BackendError> {
        self.apply(offset, len, false)
    }
}

/// A virtio-mem device over a [`ModelBackend`].
pub fn mem_device() -> (VirtioMem, ModelBackend) {
    let backend = ModelBackend(Arc::new(Mutex::new(MemModel {
        plugged: vec![false; MEM_BLOCKS as usize],
        fail: FailMode::None,
    })));
    let config = VirtioMemConfig {
        region_addr: GuestAddress(MEM_REGION),
        region_size: MEM_BLOCK * MEM_BLOCKS,
        block_size: MEM_BLOCK,
        node_id: Some(0),
    };
    let dev = VirtioMem::new(config, Box::new(backend.clone())).expect("virtio-mem");
    (dev, backend)
}

/// Counters and block state agree with each other and with the backend.
pub fn check_mem(dev: &VirtioMem, backend: &ModelBackend) {
    assert_eq!(
        dev.plugged_ranges(),
        backend.runs(),
        "device and backend disagree on what is plugged"
    );
    let m = dev.metrics();
    assert_eq!(
        m.bytes_plugged.checked_sub(m.bytes_unplugged),
        Some(dev.plugged_size()),
        "bytes plugged - bytes unplugged != plugged size ({m:?})"
    );
    assert!(dev.plugged_size() <= MEM_BLOCK * MEM_BLOCKS);
    assert!(dev.requested_size() <= MEM_BLOCK * MEM_BLOCKS);
}

/// Writes a STATE request for the first block on fresh rings of queue 0
/// (size 8).
pub fn mem_probe_post(mem: &GuestMemoryMmap) {
    let mut req = [0u8; 24];
    req[0..2].copy_from_slice(&3u16.to_le_bytes()); // STATE
    req[8..16].copy_from_slice(&MEM_REGION.to_le_bytes());
    req[16..18].copy_from_slice(&1u16.to_le_bytes());
    fill(mem, DATA_START, &req);
    fill(mem, DATA_START + 0x100, &[0xff; 10]);
    post_chain(
        mem,
        0,
        vec![
            Desc::new(DATA_START, 24, false, Some(1)),
            Desc::new(DATA_START + 0x100, 10, true, None),
        ],
    );
}

/// Checks the answer to [`mem_probe_post`]'s request: ACK with the first
/// block's state.
pub fn mem_probe_check(dev: &VirtioMem, backend: &ModelBackend, mem: &GuestMemoryMmap) {
    let l = RingLayout::of(0);
    assert_eq!(
        l.used_idx(mem),
        1,
        "virtio-mem did not answer a valid STATE"
    );
    assert_eq!(l.used_elem(mem, 8, 0), (0, 10));
    let mut resp = [0u8; 10];
    mem.read_slice(&mut resp, GuestAddress(DATA_START + 0x100))
        .expect("response");
    let plugged = backend.runs().first().is_some_and(|(off, _)| *off == 0);
    let state = if plugged { 0 } else { 1 };
    assert_eq!(resp, [0, 0, 0, 0, 0, 0, 0, 0, state, 0], "STATE answer");
    check_mem(dev, backend);
}

/// Resets the device, activates it on fresh rings and checks that it
/// answers a valid STATE request ([`mem_probe_post`]).
pub fn mem_answers(dev: &mut VirtioMem, backend: &ModelBackend, mem: &GuestMemoryMmap) {
    mem_probe_post(mem);
    dev.reset();
    dev.set_acked_features(dev.avail_features());
    dev.activate(
        atomic(mem),
        interrupt(),
        vec![ready_queue(0, 128, 8, false)],
    )
    .expect("virtio-mem activation");
    dev.process_queue();
    mem_probe_check(dev, backend, mem);
}

// ------------------------------------------------------------------- balloon

/// A balloon with every queue (statistics every `stats_period_s`, free page
/// reporting).
pub fn balloon_device(target_size: u64, stats_period_s: u64) -> Balloon {
    Balloon::new(BalloonConfig {
        target_size,
        deflate_on_oom: true,
        free_page_reporting: true,
        stats_period_s,
    })
    .expect("balloon")
}

/// Counters agree with the inflated set (`since_reset`: no reset since
/// creation, so they must match exactly); discards never fail on ranges
/// the device planned itself.
pub fn check_balloon(b: &Balloon, since_reset: bool) {
    let m = b.metrics();
    let net = m
        .inflated_pages
        .checked_sub(m.deflated_pages)
        .expect("more pages deflated than inflated");
    if since_reset {
        assert_eq!(b.inflated_size(), net * 4096, "inflated size vs counters");
    } else {
        assert!(b.inflated_size() <= net * 4096, "inflated size vs counters");
    }
    assert_eq!(m.discard_errors, 0, "a planned discard failed: {m:?}");
    assert!(m.discard_calls >= m.discard_errors);
    if since_reset && m.stats_updates > 0 && b.is_activated() {
        assert!(b.latest_stats().is_some());
    }
}

/// Page that [`balloon_answers`] inflates (in the second RAM region).
pub const BALLOON_PROBE_PFN: u32 = 0x14;

/// Writes an inflate request for [`BALLOON_PROBE_PFN`] on fresh rings of
/// queue 0 (size 8); queue 1 gets empty rings. The page is filled first.
pub fn balloon_probe_post(mem: &GuestMemoryMmap) {
    let page = u64::from(BALLOON_PROBE_PFN) << 12;
    fill(mem, page, &[0xaa; 4096]);
    fill(mem, DATA_START, &BALLOON_PROBE_PFN.to_le_bytes());
    post_chain(mem, 0, vec![Desc::new(DATA_START, 4, false, None)]);
    clear_rings(mem, 1);
}

/// Checks the inflate of [`balloon_probe_post`]: returned, counted, and
/// the page discarded (it reads back as zeros).
pub fn balloon_probe_check(b: &Balloon, mem: &GuestMemoryMmap) {
    assert_eq!(RingLayout::of(0).used_idx(mem), 1, "inflate not answered");
    assert_eq!(b.inflated_size(), 4096, "the probe page was not inflated");
    let mut back = [0xffu8; 4096];
    let page = u64::from(BALLOON_PROBE_PFN) << 12;
    mem.read_slice(&mut back, GuestAddress(page)).expect("page");
    assert!(back.iter().all(|&x| x == 0), "inflated page not discarded");
    check_balloon(b, false);
}

/// Resets the balloon, activates it with inflate and deflate queues on
/// fresh rings and checks that it takes a valid inflate request.
pub fn balloon_answers(b: &mut Balloon, mem: &GuestMemoryMmap) {
    balloon_probe_post(mem);
    b.reset();
    b.set_acked_features(devices::virtio::VIRTIO_F_VERSION_1);
    let queues = vec![ready_queue(0, 256, 8, false), ready_queue(1, 256, 8, false)];
    b.activate(atomic(mem), interrupt(), queues)
        .expect("balloon activation");
    b.process_queue(0);
    balloon_probe_check(b, mem);
}

// --------------------------------------------------------------- virtio-blk

/// Disk size in sectors.
pub const DISK_SECTORS: u64 = 16;

fn disk_file() -> &'static File {
    static DISK: OnceLock<File> = OnceLock::new();
    DISK.get_or_init(|| {
        // SAFETY: memfd_create takes a NUL-terminated name and flags; the
        // returned descriptor is checked and owned by the File.
        let fd = unsafe { libc::memfd_create(c"tidevm-fuzz-disk".as_ptr(), 0) };
        assert!(fd >= 0, "memfd_create failed");
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        unsafe { File::from_raw_fd(fd) }
    })
}

/// The disk's initial contents.
pub fn disk_pattern() -> Vec<u8> {
    (0..DISK_SECTORS * 512).map(|i| (i * 7 + 3) as u8).collect()
}

/// A block device over a fresh copy of the disk pattern (in a memfd).
pub fn block_device(read_only: bool) -> Block {
    let file = disk_file();
    file.set_len(0).expect("truncate");
    file.write_all_at(&disk_pattern(), 0).expect("disk pattern");
    let path = format!("/proc/self/fd/{}", file.as_raw_fd());
    Block::new(path.as_ref(), read_only).expect("block device")
}

/// The disk's current contents.
pub fn disk_contents() -> Vec<u8> {
    let file = disk_file();
    let len = file.metadata().expect("disk metadata").len();
    let mut out = vec![0u8; usize::try_from(len).unwrap_or(0)];
    file.read_exact_at(&mut out, 0).expect("disk read");
    out
}

/// Counters are consistent; the disk did not change size. `processed` is
/// the number of chains `process_queue` reported.
pub fn check_block(b: &Block, processed: u64) {
    let m = b.metrics_snapshot();
    assert_eq!(m.requests, processed, "requests counter");
    assert!(m.invalid_requests <= m.failures, "{m:?}");
    assert!(m.reads + m.writes + m.flushes <= m.requests, "{m:?}");
    assert_eq!(m.read_bytes % 512, 0, "{m:?}");
    assert_eq!(m.write_bytes % 512, 0, "{m:?}");
    assert_eq!(
        disk_contents().len() as u64,
        DISK_SECTORS * 512,
        "the disk changed size"
    );
}

/// Writes a read of sector 0 (512 bytes) on fresh rings of queue 0.
pub fn block_probe_post(mem: &GuestMemoryMmap) {
    let hdr = [0u8; 16]; // VIRTIO_BLK_T_IN, sector 0
    fill(mem, DATA_START, &hdr);
    fill(mem, DATA_START + 0x2000, &[0xff]);
    post_chain(
        mem,
        0,
        vec![
            Desc::new(DATA_START, 16, false, Some(1)),
            Desc::new(DATA_START + 0x1000, 512, true, Some(2)),
            Desc::new(DATA_START + 0x2000, 1, true, None),
        ],
    );
}

/// Checks the answer to [`block_probe_post`]: OK, with the disk's bytes.
pub fn block_probe_check(mem: &GuestMemoryMmap) {
    assert_eq!(RingLayout::of(0).used_elem(mem, 8, 0), (0, 513));
    let status: u8 = mem
        .read_obj(GuestAddress(DATA_START + 0x2000))
        .expect("status");
    assert_eq!(status, 0, "valid read not answered OK");
    let mut data = vec![0u8; 512];
    mem.read_slice(&mut data, GuestAddress(DATA_START + 0x1000))
        .expect("data");
    assert_eq!(data, disk_contents()[..512], "read returned other bytes");
}

/// Resets the block device, activates it on fresh rings and checks that
/// it answers a valid read of sector 0.
pub fn block_answers(b: &mut Block, mem: &GuestMemoryMmap) {
    block_probe_post(mem);
    b.reset();
    b.set_acked_features(b.avail_features());
    b.activate(
        atomic(mem),
        interrupt(),
        vec![ready_queue(0, 256, 8, false)],
    )
    .expect("block activation");
    assert_eq!(b.process_queue(), 1, "virtio-blk did not take a valid read");
    block_probe_check(mem);
}
