//! vCPU threads: run KVM_RUN, dispatch port I/O and MMIO exits to the
//! buses, and report why a vCPU stopped.

use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use devices::Bus;
use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::hyperv::HypervExits;
use crate::seccomp::{SeccompMode, ThreadKind};

/// Why a vCPU stopped running guest code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VcpuStop {
    /// The guest asked for a reset (KVM reset event).
    Reset,
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN); handled as a reset.
    TripleFault,
    /// The guest powered off.
    PowerOff,
    /// The guest crashed (KVM crash event).
    Crash,
    /// The vCPU executed HLT with nothing to wake it (no in-kernel irqchip).
    Halted,
    /// KVM could not run the vCPU.
    Error(String),
    /// The VMM asked the vCPU to stop.
    Stopped,
}

/// A stop report from one vCPU.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VcpuEvent {
    /// vCPU index.
    pub id: u8,
    /// Why it stopped.
    pub stop: VcpuStop,
}

/// The signal used to kick vCPU threads out of KVM_RUN.
pub(crate) fn kick_signal() -> i32 {
    SIGRTMIN()
}

/// Installs the no-op handler for the kick signal (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    extern "C" fn noop(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    register_signal_handler(kick_signal(), noop)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// Runs one vCPU until it stops; returns why.
pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    hyperv: Option<Arc<HypervExits>>,
}

impl Vcpu {
    /// A vCPU dispatching to the given buses.
    pub fn new(id: u8, fd: VcpuFd, pio: Arc<Bus>, mmio: Arc<Bus>) -> Self {
        Self {
            id,
            fd,
            pio,
            mmio,
            hyperv: None,
        }
    }

    /// Handles the vCPU's Hyper-V exits (SynIC, hypercalls) with `exits`.
    pub fn with_hyperv(mut self, exits: Arc<HypervExits>) -> Self {
        self.hyperv = Some(exits);
        self
    }

    /// The KVM vCPU.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Runs guest code until the vCPU stops or `stop` is set.
    pub fn run(&mut self, stop: &AtomicBool) -> VcpuStop {
        loop {
            if stop.load(Ordering::Acquire) {
                return VcpuStop::Stopped;
            }
            match self.run_once() {
                Ok(None) => {}
                Ok(Some(stop)) => return stop,
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Err(e) => return VcpuStop::Error(format!("vCPU {}: KVM_RUN failed: {e}", self.id)),
            }
        }
    }

    /// A one-line summary of the vCPU's registers, for the log of a
    /// guest crash (what the guest was doing when it triple-faulted).
    /// On AMD hosts KVM has already reset the vCPU when it reports the
    /// shutdown, so there the registers show the reset state.
    fn fault_state(&self) -> String {
        let (Ok(r), Ok(s)) = (self.fd.get_regs(), self.fd.get_sregs()) else {
            return "registers unreadable".into();
        };
        format!(
            "rip={:#x} rsp={:#x} rflags={:#x} cr0={:#x} cr2={:#x} cr3={:#x} cr4={:#x} \
             efer={:#x} cs={:#x} idt={:#x}+{:#x} gdt={:#x} tr={:#x}",
            r.rip,
            r.rsp,
            r.rflags,
            s.cr0,
            s.cr2,
            s.cr3,
            s.cr4,
            s.efer,
            s.cs.selector,
            s.idt.base,
            s.idt.limit,
            s.gdt.base,
            s.tr.base
        )
    }

    fn run_once(&mut self) -> Result<Option<VcpuStop>, kvm_ioctls::Error> {
        let id = self.id;
        match self.fd.run()? {
            VcpuExit::IoIn(port, data) => {
                if !self.pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            VcpuExit::IoOut(port, data) => {
                self.pio.write(u64::from(port), data);
            }
            VcpuExit::MmioRead(addr, data) => {
                if !self.mmio.read(addr, data) {
                    log::debug!("vCPU {id}: read of unassigned MMIO {addr:#x}");
                    data.fill(0);
                }
            }
            VcpuExit::MmioWrite(addr, data) => {
                if !self.mmio.write(addr, data) {
                    log::debug!("vCPU {id}: write to unassigned MMIO {addr:#x}");
                }
            }
            VcpuExit::Hlt => return Ok(Some(VcpuStop::Halted)),
            VcpuExit::Shutdown => {
                log::warn!("vCPU {id}: triple fault, state at the fault: {}", self.fault_state());
                return Ok(Some(VcpuStop::TripleFault));
            }
            VcpuExit::SystemEvent(kind, _) => {
                return Ok(Some(match kind {
                    KVM_SYSTEM_EVENT_SHUTDOWN => VcpuStop::PowerOff,
                    KVM_SYSTEM_EVENT_RESET => VcpuStop::Reset,
                    KVM_SYSTEM_EVENT_CRASH => VcpuStop::Crash,
                    other => VcpuStop::Error(format!("vCPU {id}: unknown KVM system event {other}")),
                }))
            }
            VcpuExit::FailEntry(reason, cpu) => {
                return Ok(Some(VcpuStop::Error(format!(
                    "vCPU {id}: KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
                ))))
            }
            VcpuExit::InternalError => {
                return Ok(Some(VcpuStop::Error(format!(
                    "vCPU {id}: KVM internal error (emulation failure); this /dev/kvm may not run this guest"
                ))))
            }
            VcpuExit::Intr => {}
            VcpuExit::Hyperv => match &self.hyperv {
                // The VP index is the vCPU index (KVM's default).
                Some(hv) => hv.handle_exit(u32::from(id), self.fd.get_kvm_run()),
                None => {
                    return Ok(Some(VcpuStop::Error(format!(
                        "vCPU {id}: Hyper-V exit without Hyper-V enabled"
                    ))))
                }
            },
            other => {
                return Ok(Some(VcpuStop::Error(format!(
                    "vCPU {id}: unexpected KVM exit {other:?}"
                ))))
            }
        }
        Ok(None)
    }
}

/// A running vCPU thread.
pub struct VcpuThread {
    handle: Option<JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl VcpuThread {
    /// Starts `vcpu` on its own thread; its stop is sent on `events` and
    /// signalled on `wake`. The thread installs the vCPU seccomp filter
    /// (`seccomp`) before it runs guest code.
    pub fn spawn(
        mut vcpu: Vcpu,
        events: Sender<VcpuEvent>,
        wake: EventFd,
        seccomp: SeccompMode,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let thread_stop = stop.clone();
        let id = vcpu.id;
        let handle = std::thread::Builder::new()
            .name(format!("tidevm-vcpu{id}"))
            .spawn(move || {
                let stop = match crate::seccomp::install(ThreadKind::Vcpu, seccomp) {
                    Ok(()) => vcpu.run(&thread_stop),
                    Err(e) => VcpuStop::Error(format!("vCPU {id}: {e}")),
                };
                if stop != VcpuStop::Stopped {
                    let _ = events.send(VcpuEvent { id, stop });
                    let _ = wake.write(1);
                }
            })?;
        Ok(Self {
            handle: Some(handle),
            stop,
        })
    }

    /// Asks the thread to stop, kicks it out of KVM_RUN and waits for it.
    pub fn stop_and_join(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        self.stop.store(true, Ordering::Release);
        // A kick that lands just before KVM_RUN is lost, so keep kicking
        // until the thread is gone.
        while !handle.is_finished() {
            // SAFETY: the pthread id belongs to a thread that has not been
            // joined yet, so it is still valid; the signal has a handler.
            unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = handle.join();
    }
}

impl Drop for VcpuThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

#[cfg(test)]
mod tests {
    //! Tiny real-mode guests on the local /dev/kvm: port I/O, MMIO, HLT.
    use super::*;
    use devices::BusDevice;
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::Kvm;
    use std::sync::Mutex;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap, GuestMemoryRegion};

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(0x40 + u8::try_from(offset).unwrap_or(0));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    /// A VM with 64 KiB of RAM holding `code` at 0x1000 and one vCPU in
    /// real mode about to run it. The VM and memory must outlive the vCPU.
    fn real_mode_vcpu(code: &[u8]) -> (kvm_ioctls::VmFd, GuestMemoryMmap, VcpuFd) {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        mem.write_slice(code, GuestAddress(0x1000)).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        // SAFETY: the caller keeps `mem` alive as long as the VM.
        unsafe {
            vm.set_user_memory_region(kvm_userspace_memory_region {
                slot: 0,
                flags: 0,
                guest_phys_addr: 0,
                memory_size: region.len(),
                userspace_addr: region.as_ptr() as u64,
            })
            .unwrap()
        };
        let fd = vm.create_vcpu(0).unwrap();
        let mut sregs = fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        fd.set_sregs(&sregs).unwrap();
        let mut regs = fd.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        fd.set_regs(&regs).unwrap();
        (vm, mem, fd)
    }

    /// Runs `code` in real mode to its stop.
    fn run_real_mode(code: &[u8], pio: Bus, mmio: Bus) -> VcpuStop {
        let (_vm, _mem, fd) = real_mode_vcpu(code);
        let mut vcpu = Vcpu::new(0, fd, Arc::new(pio), Arc::new(mmio));
        vcpu.run(&AtomicBool::new(false))
    }

    use vm_memory::GuestMemoryBackend;

    #[test]
    fn port_io_mmio_and_hlt_reach_the_right_devices() {
        // Guest RAM is 0..64 KiB; DS is based at 0x10000, so data accesses
        // land above RAM, on the MMIO bus.
        let code = [
            0xb8, 0x00, 0x10, // mov ax, 0x1000
            0x8e, 0xd8, // mov ds, ax          (DS base 0x10000)
            0xba, 0xf8, 0x03, // mov dx, 0x3f8
            0xb0, b'A', // mov al, 'A'
            0xee, // out dx, al          -> port write 'A'
            0xec, // in al, dx           -> port read 0x40
            0xa2, 0x00, 0x80, // mov [0x8000], al  -> MMIO write 0x40 at 0x18000
            0xa0, 0x04, 0x80, // mov al, [0x8004]  -> MMIO read 0x44
            0xee, // out dx, al          -> port write 0x44
            0xe6, 0x80, // out 0x80, al   (no device: ignored)
            0xf4, // hlt
        ];
        let port_dev = Arc::new(Mutex::new(Recorder::default()));
        let mmio_dev = Arc::new(Mutex::new(Recorder::default()));
        let mut pio = Bus::new();
        pio.insert(port_dev.clone(), 0x3f8, 8).unwrap();
        let mut mmio = Bus::new();
        mmio.insert(mmio_dev.clone(), 0x18000, 0x10).unwrap();
        let stop = run_real_mode(&code, pio, mmio);
        assert_eq!(stop, VcpuStop::Halted);
        assert_eq!(
            port_dev.lock().unwrap().writes,
            vec![(0, vec![b'A']), (0, vec![0x44])]
        );
        assert_eq!(mmio_dev.lock().unwrap().writes, vec![(0, vec![0x40])]);
    }

    #[test]
    fn stop_flag_ends_a_spinning_vcpu() {
        install_kick_handler().unwrap();
        // jmp $ (spin forever)
        let (_vm, _mem, fd) = real_mode_vcpu(&[0xeb, 0xfe]);
        let (tx, rx) = std::sync::mpsc::channel();
        let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let vcpu = Vcpu::new(0, fd, Arc::new(Bus::new()), Arc::new(Bus::new()));
        let mut thread =
            VcpuThread::spawn(vcpu, tx, wake.try_clone().unwrap(), SeccompMode::Off).unwrap();
        std::thread::sleep(Duration::from_millis(50));
        thread.stop_and_join();
        assert!(
            rx.try_recv().is_err(),
            "a requested stop is not reported as an event"
        );
    }
}
