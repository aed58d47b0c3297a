//! The [`Rng`] device model: every request chain gets random bytes in its
//! device-writable buffers, up to [`MAX_REQUEST_BYTES`].

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{MAX_REQUEST_BYTES, QUEUE_SIZE, VIRTIO_ID_RNG};
use crate::virtio::{
    ActivateError, GuestMemory, InterruptKind, VirtioDevice, VirtioInterrupt, VIRTIO_F_VERSION_1,
};

/// Errors creating an entropy device.
#[derive(Debug, thiserror::Error)]
pub enum RngError {
    /// The source cannot be opened for reading.
    #[error("cannot open the entropy source {path:?}: {source}")]
    Open {
        /// The source path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The source is neither a regular file nor a character device (a FIFO,
    /// a socket or a directory): reading it could block the VMM for good.
    #[error("the entropy source {0:?} is not a regular file or a character device")]
    NotFileOrCharDevice(PathBuf),
    /// The queue eventfd cannot be created.
    #[error("cannot create the virtio-rng queue eventfd: {0}")]
    EventFd(#[source] std::io::Error),
}

/// Opens an entropy source for reading: a regular file or a character device
/// such as `/dev/urandom`, anything else is refused. The open never blocks:
/// a FIFO without a writer would hold `open(2)`, and with it the VMM thread,
/// until one came.
pub fn open_source(path: &Path) -> Result<File, RngError> {
    let open_err = |source| RngError::Open {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(open_err)?;
    let kind = file.metadata().map_err(open_err)?.file_type();
    if !(kind.is_file() || kind.is_char_device()) {
        return Err(RngError::NotFileOrCharDevice(path.to_owned()));
    }
    // Reads behave as with a plain open: a source like /dev/random may wait.
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on a descriptor `file` owns; no pointers.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: F_SETFL on a descriptor `file` owns, with an integer argument.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(open_err(std::io::Error::last_os_error()));
    }
    Ok(file)
}

/// Counters of the entropy device.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RngMetrics {
    /// Requests answered.
    pub requests: u64,
    /// Random bytes given to the guest.
    pub bytes: u64,
    /// Requests that got nothing (bad buffers, source errors).
    pub failures: u64,
}

struct Active {
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    queue: Queue,
}

/// A virtio-rng device reading a host file.
pub struct Rng {
    path: PathBuf,
    source: File,
    queue_sizes: [u16; 1],
    queue_evts: [EventFd; 1],
    active: Option<Active>,
    buf: Vec<u8>,
    metrics: RngMetrics,
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("path", &self.path)
            .field("activated", &self.active.is_some())
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

impl Rng {
    /// A device giving the guest bytes read from `source`.
    pub fn new(source: &Path) -> Result<Self, RngError> {
        let file = open_source(source)?;
        Ok(Self {
            path: source.to_owned(),
            source: file,
            queue_sizes: [QUEUE_SIZE],
            queue_evts: [EventFd::new(EFD_NONBLOCK).map_err(RngError::EventFd)?],
            active: None,
            buf: vec![0; MAX_REQUEST_BYTES],
            metrics: RngMetrics::default(),
        })
    }

    /// The source path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device's counters.
    pub fn metrics(&self) -> RngMetrics {
        self.metrics
    }

    /// Answers every queued request; returns how many.
    pub fn process_queue(&mut self) -> usize {
        let Some(active) = self.active.as_mut() else {
            return 0;
        };
        let guard = active.mem.memory();
        let mem: &GuestMemoryMmap = &guard;
        let mut done = 0;
        while let Some(chain) = active.queue.pop_descriptor_chain(mem) {
            done += 1;
            self.metrics.requests += 1;
            let head = chain.head_index();
            let len = match chain.writer(mem) {
                Ok(mut writer) => {
                    let want = writer.available_bytes().min(self.buf.len());
                    match self.source.read(&mut self.buf[..want]) {
                        Ok(n) => match writer.write_all(&self.buf[..n]) {
                            Ok(()) => n,
                            Err(e) => {
                                log::debug!("virtio-rng: cannot fill a buffer: {e}");
                                0
                            }
                        },
                        Err(e) => {
                            log::error!("virtio-rng: reading {:?} failed: {e}", self.path);
                            0
                        }
                    }
                }
                Err(e) => {
                    log::debug!("virtio-rng: bad request chain: {e}");
                    0
                }
            };
            if len == 0 {
                self.metrics.failures += 1;
            }
            self.metrics.bytes += len as u64;
            // len <= MAX_REQUEST_BYTES.
            let used = u32::try_from(len).unwrap_or(0);
            if let Err(e) = active.queue.add_used(mem, head, used) {
                log::error!("virtio-rng: cannot return descriptor {head}: {e}");
            }
        }
        if done > 0 {
            match active.queue.needs_notification(mem) {
                Ok(true) => {
                    if let Err(e) = active.interrupt.trigger(InterruptKind::Queue) {
                        log::error!("virtio-rng: interrupt failed: {e}");
                    }
                }
                Ok(false) => {}
                Err(e) => log::error!("virtio-rng: queue error: {e}"),
            }
        }
        done
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn set_acked_features(&mut self, _features: u64) {}

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        // No configuration space.
        data.fill(0);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("virtio-rng: config write at {offset:#x} ignored");
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
        if let Err(e) = self.queue_evts[0].write(1) {
            log::error!("virtio-rng: cannot kick the queue: {e}");
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
mod tests {
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic};

    use super::*;

    const W: u16 = 2;

    #[test]
    fn a_fifo_source_is_refused_without_blocking() {
        let dir = std::env::temp_dir().join(format!("tidevm-rng-fifo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let fifo = dir.join("fifo");
        let c_path = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) }, 0);
        // No writer: a blocking open would never return.
        let result = open_source(&fifo);
        let _ = std::fs::remove_dir_all(&dir);
        let err = result.unwrap_err();
        assert!(matches!(err, RngError::NotFileOrCharDevice(_)), "{err}");
        assert!(err
            .to_string()
            .contains("not a regular file or a character device"));
        let file = dir.join("gone");
        assert!(matches!(open_source(&file), Err(RngError::Open { .. })));
    }

    #[test]
    fn fills_writable_buffers_and_survives_bad_ones() {
        assert!(matches!(
            Rng::new(Path::new("/nonexistent/rng")),
            Err(RngError::Open { .. })
        ));
        let mut rng = Rng::new(Path::new("/dev/urandom")).unwrap();
        assert_eq!(rng.device_type(), 4);
        assert!(matches!(
            Rng::new(Path::new("/")),
            Err(RngError::NotFileOrCharDevice(_))
        ));
        assert_eq!(rng.process_queue(), 0);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let q = MockSplitQueue::new(&mem, 16);
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let interrupt = Arc::new(VirtioInterrupt::new(irq.try_clone().unwrap()));
        let err = rng
            .activate(
                GuestMemoryAtomic::new(mem.clone()),
                interrupt.clone(),
                vec![],
            )
            .unwrap_err();
        assert!(matches!(
            err,
            ActivateError::QueueCount {
                expected: 1,
                got: 0
            }
        ));
        rng.activate(
            GuestMemoryAtomic::new(mem.clone()),
            interrupt,
            vec![q.create_queue().unwrap()],
        )
        .unwrap();
        let descs = [
            RawDescriptor::from(Descriptor::new(0x8_0000, 64, W, 0)),
            // Huge and outside memory; a read-only one.
            RawDescriptor::from(Descriptor::new(0xffff_0000, u32::MAX, W, 0)),
            RawDescriptor::from(Descriptor::new(0x9_0000, 64, 0, 0)),
            // Larger than one request's worth.
            RawDescriptor::from(Descriptor::new(0xa_0000, 0x4_0000, W, 0)),
        ];
        q.add_desc_chains(&descs, 0).unwrap();
        assert_eq!(rng.process_queue(), 4);
        let len = |i: usize| q.used().ring().ref_at(i).unwrap().load().len();
        assert_eq!(len(0), 64);
        assert_eq!(len(1), 0);
        assert_eq!(len(2), 0);
        assert_eq!(len(3), u32::try_from(MAX_REQUEST_BYTES).unwrap());
        let mut bytes = [0u8; 64];
        mem.read_slice(&mut bytes, GuestAddress(0x8_0000)).unwrap();
        assert!(bytes.iter().any(|&b| b != 0));
        assert_eq!(irq.read().unwrap(), 1);
        let m = rng.metrics();
        assert_eq!((m.requests, m.failures), (4, 2));
        assert_eq!(m.bytes, 64 + MAX_REQUEST_BYTES as u64);
    }
}
