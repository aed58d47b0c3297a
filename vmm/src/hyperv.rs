//! The Hyper-V side of a VM started with `hotplug_method=hv-balloon`: the
//! SynIC of every VP as the guest programs it, the `KVM_EXIT_HYPERV` exits
//! (SynIC MSR writes and the HvPostMessage / HvSignalEvent hypercalls),
//! and delivery of messages and event flags to the guest.
//!
//! ```text
//!  guest HvPostMessage ─▶ vCPU exit ─▶ HypervExits (validate) ─▶ HypervHost::post_message
//!  HypervHost ─▶ Synic::post_message ─▶ SIMP slot of the target VP ─▶ SINT irqfd ─▶ guest
//!  guest EOM / EOI ─▶ resamplefd ─▶ SynicEvents (event loop) ─▶ Synic::flush (next message)
//! ```
//!
//! The VMBus host is [`VmbusHost`] (vCPU side: queue and kick) plus
//! `devices::hyperv::device::DynamicMemoryDevice` (event-loop side), which
//! answers through [`SynicVmbusPort`].

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arch::hyperv::{
    check_input_gpa, parse_post_message, parse_signal_event, write_message, HvStatus,
    HypercallControl, PostMessage, SlotWrite, SynicMessage, SynicPage, SynicRegs,
    HVCALL_POST_MESSAGE, HVCALL_SIGNAL_EVENT, MESSAGE_TYPE_VMBUS, POST_MESSAGE_INPUT_SIZE,
    VMBUS_SINT,
};
use devices::hyperv::device::{GuestMessageQueue, SynicPort, SynicPortError};
use devices::virtio::GuestMemory;
use event_manager::{EventOps, Events, MutEventSubscriber};
use kvm_bindings::{
    kvm_enable_cap, kvm_hyperv_exit, kvm_run, KVM_CAP_HYPERV_SYNIC2, KVM_EXIT_HYPERV_HCALL,
    KVM_EXIT_HYPERV_SYNIC,
};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestAddressSpace, GuestMemoryBackend};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

/// First GSI of the SINT routes (after the IOAPIC's 24 pins); VP `n`'s
/// VMBus SINT is GSI `SINT_GSI_BASE + n`.
pub const SINT_GSI_BASE: u32 = arch::layout::IOAPIC_NUM_PINS;
/// Most messages waiting for one VP's message slot.
const OUTBOX_LIMIT: usize = 64;
/// Retry period while a message waits, in case an EOM notification is lost.
const RETRY_PERIOD: Duration = Duration::from_millis(100);

/// Why a Hyper-V operation failed.
#[derive(Debug, thiserror::Error)]
pub enum HypervError {
    /// KVM refused a Hyper-V setting.
    #[error("KVM: {0}")]
    Kvm(String),
    /// An eventfd or timerfd could not be created.
    #[error("cannot create an eventfd or timerfd: {0}")]
    Fd(#[source] std::io::Error),
    /// No VP has this index.
    #[error("no VP with index {0}")]
    NoSuchVp(u32),
    /// The guest has not enabled this SynIC page on the VP.
    #[error("VP {vp}: the guest has not enabled its SynIC {page} page")]
    NotEnabled {
        /// VP index.
        vp: u32,
        /// "message" or "event flags".
        page: &'static str,
    },
    /// The guest put a SynIC page where there is no RAM.
    #[error("VP {vp}: SynIC page {gpa:#x} is not guest RAM")]
    BadPage {
        /// VP index.
        vp: u32,
        /// Page address.
        gpa: u64,
    },
    /// Too many messages wait for the VP's message slot.
    #[error("VP {0}: {OUTBOX_LIMIT} messages already wait for the guest")]
    QueueFull(u32),
}

/// Result type of this module.
pub type Result<T> = std::result::Result<T, HypervError>;

/// What the guest posts to the host, as a VMBus host receives it.
///
/// Both methods run on the vCPU thread that made the hypercall, with the
/// vCPU stopped until they return: queue work and return quickly. The
/// status goes back to the guest as the hypercall result; the guest
/// retries on [`HvStatus::InsufficientBuffers`] and gives up (or, for a
/// version ≥ 5.0 INITIATE_CONTACT, moves on) on
/// [`HvStatus::InvalidConnectionId`].
pub trait HypervHost: Send {
    /// HvPostMessage from VP `vp`: `msg` is validated (24-bit connection
    /// id, non-zero message type, payload ≤ 240 bytes) and copied out of
    /// guest memory.
    fn post_message(&mut self, vp: u32, msg: &PostMessage) -> HvStatus;
    /// HvSignalEvent from VP `vp` on `connection_id` (24 bits).
    fn signal_event(&mut self, vp: u32, connection_id: u32) -> HvStatus;
}

/// One VP's SynIC as the host sees it.
struct VpSynic {
    regs: Mutex<SynicRegs>,
    /// Messages for the VMBus SINT, oldest first; the front one goes into
    /// the message slot as soon as it is free.
    outbox: Mutex<VecDeque<SynicMessage>>,
    /// irqfd of the VP's VMBus SINT route.
    sint: EventFd,
    /// Resample fd of that irqfd: KVM signals it on EOM and on the EOI of
    /// the SINT vector.
    ack: EventFd,
}

/// The SynICs of all VPs (VP index = vCPU index) and the delivery of
/// messages and event flags on the VMBus SINT (2). Shared (`Arc`) between
/// the vCPU threads, the event loop and the VMBus host.
pub struct Synic {
    mem: GuestMemory,
    vps: Vec<VpSynic>,
    /// Tells the event loop that a message waits (arms the retry timer).
    waiting: EventFd,
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Synic {
    /// SynIC state for `vps` VPs over guest memory `mem`. Interrupts reach
    /// the guest once [`crate::device_manager::DeviceManager::wire_synic`]
    /// has routed the SINTs.
    pub fn new(mem: GuestMemory, vps: u8) -> Result<Self> {
        let evt = || EventFd::new(EFD_NONBLOCK).map_err(HypervError::Fd);
        let vps = (0..vps)
            .map(|_| {
                Ok(VpSynic {
                    regs: Mutex::new(SynicRegs::default()),
                    outbox: Mutex::new(VecDeque::new()),
                    sint: evt()?,
                    ack: evt()?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Self {
            mem,
            vps,
            waiting: evt()?,
        })
    }

    /// Number of VPs.
    pub fn vp_count(&self) -> u32 {
        u32::try_from(self.vps.len()).unwrap_or(u32::MAX)
    }

    /// Guest memory, for reading and writing rings and GPADL pages.
    pub fn guest_memory(&self) -> &GuestMemory {
        &self.mem
    }

    fn vp(&self, vp: u32) -> Result<&VpSynic> {
        usize::try_from(vp)
            .ok()
            .and_then(|i| self.vps.get(i))
            .ok_or(HypervError::NoSuchVp(vp))
    }

    /// The SynIC registers VP `vp` last wrote.
    pub fn regs(&self, vp: u32) -> Result<SynicRegs> {
        Ok(*lock(&self.vp(vp)?.regs))
    }

    /// The (irqfd, resamplefd) pair of each VP's VMBus SINT, by VP index.
    pub fn sint_fds(&self) -> impl Iterator<Item = (u32, &EventFd, &EventFd)> {
        (0u32..).zip(&self.vps).map(|(i, v)| (i, &v.sint, &v.ack))
    }

    /// Queues `msg` for the VMBus SINT of VP `vp` and delivers what the
    /// slot takes now. Messages to one VP arrive in order, one at a time:
    /// the next goes in when the guest has freed the slot. Messages queued
    /// before the guest enables its SynIC wait for it.
    pub fn post_message(&self, vp: u32, msg: SynicMessage) -> Result<()> {
        let v = self.vp(vp)?;
        {
            let mut outbox = lock(&v.outbox);
            if outbox.len() >= OUTBOX_LIMIT {
                return Err(HypervError::QueueFull(vp));
            }
            outbox.push_back(msg);
        }
        self.flush(vp)
    }

    /// Drops every message not yet delivered (a VMBus reset).
    pub fn clear_messages(&self) {
        for v in &self.vps {
            lock(&v.outbox).clear();
        }
    }

    /// Sets event flag `flag` (a channel's relid) on the VMBus SINT of VP
    /// `vp` and interrupts the VP if the flag was clear.
    pub fn signal_event(&self, vp: u32, flag: u32) -> Result<()> {
        let v = self.vp(vp)?;
        let page = lock(&v.regs)
            .event_flags_page()
            .ok_or(HypervError::NotEnabled {
                vp,
                page: "event flags",
            })?;
        let newly_set = self.with_page(vp, page, |p| {
            arch::hyperv::set_event_flag(p, VMBUS_SINT, flag)
        })?;
        if newly_set {
            let _ = v.sint.write(1);
        }
        Ok(())
    }

    /// Runs `f` on the SynIC page at `gpa`, accessed atomically in place.
    fn with_page<R>(&self, vp: u32, gpa: u64, f: impl FnOnce(&SynicPage) -> R) -> Result<R> {
        let bad = HypervError::BadPage { vp, gpa };
        let mem = self.mem.memory();
        let len = std::mem::size_of::<SynicPage>();
        let slice = mem.get_slice(GuestAddress(gpa), len).map_err(|_| bad)?;
        let guard = slice.ptr_guard_mut();
        let ptr = guard.as_ptr();
        if ptr.align_offset(std::mem::align_of::<SynicPage>()) != 0 {
            return Err(HypervError::BadPage { vp, gpa });
        }
        // SAFETY: `ptr` points at 4096 bytes of mmapped guest RAM (checked
        // by get_slice), 8-byte aligned (checked above), that stay mapped
        // while `mem` (a snapshot of the guest memory map) lives. The page
        // is shared with the guest, so it is only accessed through atomics.
        let page = unsafe { &*ptr.cast::<SynicPage>() };
        Ok(f(page))
    }

    /// Delivers VP `vp`'s queued messages while its message slot is free.
    pub fn flush(&self, vp: u32) -> Result<()> {
        let v = self.vp(vp)?;
        let mut outbox = lock(&v.outbox);
        while let Some(msg) = outbox.front() {
            let Some(page) = lock(&v.regs).message_page() else {
                return Ok(()); // Delivered once the guest enables its SynIC.
            };
            match self.with_page(vp, page, |p| write_message(p, VMBUS_SINT, msg)) {
                Ok(SlotWrite::Written) => {
                    outbox.pop_front();
                    let _ = v.sint.write(1);
                }
                Ok(SlotWrite::Busy) => {
                    let _ = self.waiting.write(1);
                    return Ok(());
                }
                Err(e) => {
                    log::warn!("{e}: dropping {} undelivered messages", outbox.len());
                    outbox.clear();
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    /// Delivers what can be delivered on every VP; true if messages still wait.
    fn flush_all(&self) -> bool {
        let mut waiting = false;
        for vp in 0..self.vp_count() {
            let _ = self.flush(vp);
            waiting |= self.vp(vp).is_ok_and(|v| !lock(&v.outbox).is_empty());
        }
        waiting
    }

    /// Records a guest write of SCONTROL, SIMP or SIEFP on VP `vp` and
    /// delivers messages that waited for the page.
    fn update_regs(&self, vp: u32, regs: SynicRegs) -> Result<()> {
        let v = self.vp(vp)?;
        let old = std::mem::replace(&mut *lock(&v.regs), regs);
        if old != regs {
            log::debug!(
                "VP {vp}: SynIC scontrol={:#x} simp={:#x} siefp={:#x}",
                regs.scontrol,
                regs.simp,
                regs.siefp
            );
        }
        self.flush(vp)
    }
}

/// Turns on the in-kernel SynIC of a vCPU (`KVM_CAP_HYPERV_SYNIC2`: KVM
/// leaves the guest's SynIC pages alone when it enables them). Needs the
/// in-kernel irqchip; must precede the GSI routes to the vCPU's SINTs.
pub fn enable_synic(vcpu: &VcpuFd) -> Result<()> {
    let cap = kvm_enable_cap {
        cap: KVM_CAP_HYPERV_SYNIC2,
        ..Default::default()
    };
    vcpu.enable_cap(&cap).map_err(|e| {
        HypervError::Kvm(format!(
            "cannot enable the SynIC (KVM_CAP_HYPERV_SYNIC2): {e}"
        ))
    })
}

/// Handles `KVM_EXIT_HYPERV` for the vCPU threads.
pub struct HypervExits {
    synic: Arc<Synic>,
    host: Arc<Mutex<dyn HypervHost>>,
}

impl HypervExits {
    /// Exits recorded in `synic` and handed to `host`.
    pub fn new(synic: Arc<Synic>, host: Arc<Mutex<dyn HypervHost>>) -> Self {
        Self { synic, host }
    }

    /// Handles the Hyper-V exit in `run` of the vCPU with VP index `vp`;
    /// for a hypercall it writes the result KVM returns to the guest.
    pub fn handle_exit(&self, vp: u32, run: &mut kvm_run) {
        // SAFETY: the caller saw exit reason KVM_EXIT_HYPERV, for which
        // KVM fills the `hyperv` member; it is plain data, copied out.
        let mut exit: kvm_hyperv_exit = unsafe { run.__bindgen_anon_1.hyperv };
        match exit.type_ {
            KVM_EXIT_HYPERV_SYNIC => {
                // SAFETY: type SYNIC means KVM filled the `synic` member.
                let s = unsafe { exit.u.synic };
                let regs = SynicRegs {
                    scontrol: s.control,
                    simp: s.msg_page,
                    siefp: s.evt_page,
                };
                if let Err(e) = self.synic.update_regs(vp, regs) {
                    log::warn!("SynIC update of VP {vp}: {e}");
                }
            }
            KVM_EXIT_HYPERV_HCALL => {
                // SAFETY: type HCALL means KVM filled the `hcall` member.
                let mut h = unsafe { exit.u.hcall };
                h.result = self.hypercall(vp, h.input, h.params[0]).result();
                exit.u.hcall = h;
                run.__bindgen_anon_1.hyperv = exit;
            }
            other => log::warn!("VP {vp}: unhandled Hyper-V exit type {other}"),
        }
    }

    fn hypercall(&self, vp: u32, rcx: u64, param: u64) -> HvStatus {
        let control = HypercallControl::decode(rcx);
        let status = match control.code {
            HVCALL_POST_MESSAGE => self.post_message(vp, control, param),
            HVCALL_SIGNAL_EVENT => self.signal_event(vp, control, param),
            _ => Err(HvStatus::InvalidHypercallCode),
        };
        let status = status.unwrap_or_else(|s| s);
        if status != HvStatus::Success {
            log::debug!("VP {vp}: hypercall {:#x} -> {status:?}", control.code);
        }
        status
    }

    fn read_input<const N: usize>(&self, gpa: u64) -> std::result::Result<[u8; N], HvStatus> {
        check_input_gpa(gpa, N as u64)?;
        let mut buf = [0u8; N];
        self.synic
            .mem
            .memory()
            .read_slice(&mut buf, GuestAddress(gpa))
            .map_err(|_| HvStatus::InsufficientMemory)?;
        Ok(buf)
    }

    fn post_message(
        &self,
        vp: u32,
        control: HypercallControl,
        gpa: u64,
    ) -> std::result::Result<HvStatus, HvStatus> {
        if control.fast {
            return Err(HvStatus::InvalidHypercallCode);
        }
        if !control.is_simple() {
            return Err(HvStatus::InvalidHypercallInput);
        }
        let input = self.read_input::<POST_MESSAGE_INPUT_SIZE>(gpa)?;
        let msg = parse_post_message(&input)?;
        Ok(lock(&self.host).post_message(vp, &msg))
    }

    fn signal_event(
        &self,
        vp: u32,
        control: HypercallControl,
        param: u64,
    ) -> std::result::Result<HvStatus, HvStatus> {
        if !control.is_simple() {
            return Err(HvStatus::InvalidHypercallInput);
        }
        let param = if control.fast {
            param
        } else {
            u64::from_le_bytes(self.read_input::<8>(param)?)
        };
        let event = parse_signal_event(param)?;
        Ok(lock(&self.host).signal_event(vp, event.connection_id))
    }
}

const TOKEN_WAITING: u32 = u32::MAX;
const TOKEN_RETRY: u32 = u32::MAX - 1;

/// Event-loop side of message delivery: retries a VP's waiting messages
/// when KVM reports an EOM/EOI on its SINT, and every 100 ms while any
/// message waits (should a notification be missed).
pub struct SynicEvents {
    synic: Arc<Synic>,
    retry: TimerFd,
}

impl SynicEvents {
    /// The subscriber for `synic`.
    pub fn new(synic: Arc<Synic>) -> Result<Self> {
        let retry = TimerFd::new().map_err(|e| HypervError::Fd(e.into()))?;
        Ok(Self { synic, retry })
    }

    fn retry_later(&mut self, waiting: bool) {
        let result = if waiting {
            self.retry.reset(RETRY_PERIOD, None)
        } else {
            self.retry.clear()
        };
        if let Err(e) = result {
            log::warn!("SynIC retry timer: {e}");
        }
    }
}

impl MutEventSubscriber for SynicEvents {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TOKEN_WAITING => {
                let _ = self.synic.waiting.read();
                self.retry_later(true);
            }
            TOKEN_RETRY => {
                // Armed by this thread only, and readable: wait() returns at once.
                let _ = self.retry.wait();
                let waiting = self.synic.flush_all();
                self.retry_later(waiting);
            }
            vp => {
                if let Ok(v) = self.synic.vp(vp) {
                    let _ = v.ack.read();
                }
                let _ = self.synic.flush(vp);
            }
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: &dyn std::os::fd::AsRawFd, token: u32| {
            if let Err(e) = ops.add(Events::with_data_raw(fd.as_raw_fd(), token, EventSet::IN)) {
                log::error!("cannot watch SynIC event {token}: {e}");
            }
        };
        for (vp, _, ack) in self.synic.sint_fds() {
            add(ack, vp);
        }
        add(&self.synic.waiting, TOKEN_WAITING);
        add(&self.retry, TOKEN_RETRY);
    }
}

// ---------------------------------------------------------------------------
// The VMBus host: the vCPU side of the Dynamic Memory device
// ---------------------------------------------------------------------------

/// Connection id of VMBus channel-management messages (versions ≤ 4.x).
pub const VMBUS_MESSAGE_CONNECTION_ID: u32 = devices::hyperv::vmbus::message::MESSAGE_CONNECTION_ID;

/// The vCPU side of the VMBus host: posted channel-management messages go
/// into the Dynamic Memory device's bounded queue, signals on the channel's
/// connection id wake it; the device does the work on the event loop.
pub struct VmbusHost {
    queue: Arc<GuestMessageQueue>,
    channel_connection_id: u32,
}

impl VmbusHost {
    /// A host feeding `queue`, whose one channel the guest signals on
    /// `channel_connection_id`.
    pub fn new(queue: Arc<GuestMessageQueue>, channel_connection_id: u32) -> Self {
        Self {
            queue,
            channel_connection_id,
        }
    }
}

impl HypervHost for VmbusHost {
    fn post_message(&mut self, vp: u32, msg: &PostMessage) -> HvStatus {
        if msg.connection_id != VMBUS_MESSAGE_CONNECTION_ID {
            // Includes INITIATE_CONTACT for versions ≥ 5.0 (connection 4):
            // Linux then tries the next lower version at once.
            log::debug!(
                "VMBus: message on connection {} from VP {vp} refused",
                msg.connection_id
            );
            return HvStatus::InvalidConnectionId;
        }
        if msg.message.message_type() != MESSAGE_TYPE_VMBUS {
            return HvStatus::InvalidHypercallInput;
        }
        if self.queue.post(vp, msg.message.payload()) {
            HvStatus::Success
        } else {
            HvStatus::InsufficientBuffers
        }
    }

    fn signal_event(&mut self, _vp: u32, connection_id: u32) -> HvStatus {
        if connection_id == self.channel_connection_id {
            self.queue.signal();
            HvStatus::Success
        } else {
            HvStatus::InvalidConnectionId
        }
    }
}

/// The Dynamic Memory device's way to the guest's SynIC.
pub struct SynicVmbusPort(pub Arc<Synic>);

impl SynicPort for SynicVmbusPort {
    fn post_message(&self, vp: u32, payload: &[u8]) -> std::result::Result<(), SynicPortError> {
        let msg = SynicMessage::new(MESSAGE_TYPE_VMBUS, payload).ok_or_else(|| {
            SynicPortError::Failed(format!(
                "a {}-byte message does not fit a slot",
                payload.len()
            ))
        })?;
        self.0.post_message(vp, msg).map_err(|e| match e {
            HypervError::QueueFull(vp) => SynicPortError::QueueFull(vp),
            e => SynicPortError::Failed(e.to_string()),
        })
    }

    fn signal_event(&self, vp: u32, relid: u32) -> std::result::Result<(), SynicPortError> {
        self.0
            .signal_event(vp, relid)
            .map_err(|e| SynicPortError::Failed(e.to_string()))
    }

    fn clear_messages(&self) {
        self.0.clear_messages();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arch::hyperv::SynicRegs;
    use std::sync::atomic::Ordering;
    use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

    const SIMP: u64 = 0x10_0000;
    const SIEFP: u64 = 0x10_1000;

    fn synic(vps: u8) -> Arc<Synic> {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        Arc::new(Synic::new(GuestMemoryAtomic::new(mem), vps).unwrap())
    }

    fn enable(s: &Synic, vp: u32) {
        s.update_regs(
            vp,
            SynicRegs {
                scontrol: 1,
                simp: SIMP | 1,
                siefp: SIEFP | 1,
            },
        )
        .unwrap();
    }

    fn slot(s: &Synic) -> [u8; 256] {
        let mut b = [0u8; 256];
        s.mem
            .memory()
            .read_slice(&mut b, GuestAddress(SIMP + 512))
            .unwrap();
        b
    }

    fn free_slot(s: &Synic) {
        s.mem
            .memory()
            .store(0u32, GuestAddress(SIMP + 512), Ordering::SeqCst)
            .unwrap();
    }

    fn post(conn: u32, payload: &[u8]) -> PostMessage {
        PostMessage {
            connection_id: conn,
            message: SynicMessage::new(1, payload).unwrap(),
        }
    }

    fn initiate_contact(version: u32, target: u32) -> Vec<u8> {
        let mut p = vec![0u8; 40];
        p[0..4].copy_from_slice(&14u32.to_le_bytes());
        p[8..12].copy_from_slice(&version.to_le_bytes());
        p[12..16].copy_from_slice(&target.to_le_bytes());
        p
    }

    #[test]
    fn messages_wait_for_the_synic_and_a_free_slot() {
        let s = synic(1);
        s.post_message(0, SynicMessage::new(1, &[1; 8]).unwrap())
            .unwrap();
        s.post_message(0, SynicMessage::new(1, &[2; 8]).unwrap())
            .unwrap();
        assert_eq!(slot(&s)[0], 0, "SynIC off: nothing written");
        enable(&s, 0);
        let b = slot(&s);
        assert_eq!((b[0], b[4], b[16]), (1, 8, 1), "first message delivered");
        assert_eq!(b[5] & 1, 1, "second waits with msg_pending");
        assert_eq!(s.vps[0].sint.read().unwrap(), 1, "SINT asserted once");
        free_slot(&s);
        s.flush(0).unwrap();
        assert_eq!(slot(&s)[16], 2);
        assert!(!s.flush_all(), "nothing waits any more");
    }

    #[test]
    fn event_flags_interrupt_once() {
        let s = synic(2);
        assert!(matches!(
            s.signal_event(1, 5),
            Err(HypervError::NotEnabled { .. })
        ));
        enable(&s, 1);
        s.signal_event(1, 5).unwrap();
        s.signal_event(1, 5).unwrap();
        assert_eq!(s.vps[1].sint.read().unwrap(), 1);
        let mut b = [0u8; 1];
        s.mem
            .memory()
            .read_slice(&mut b, GuestAddress(SIEFP + 512))
            .unwrap();
        assert_eq!(b[0], 1 << 5);
        assert!(matches!(
            s.signal_event(2, 5),
            Err(HypervError::NoSuchVp(2))
        ));
    }

    #[test]
    fn synic_page_outside_ram_is_refused() {
        let s = synic(1);
        s.post_message(0, SynicMessage::new(1, &[1]).unwrap())
            .unwrap();
        let regs = SynicRegs {
            scontrol: 1,
            simp: (1 << 40) | 1,
            siefp: 0,
        };
        assert!(matches!(
            s.update_regs(0, regs),
            Err(HypervError::BadPage { .. })
        ));
        assert!(!s.flush_all(), "undeliverable messages are dropped");
    }

    #[test]
    fn hypercalls_are_validated() {
        let s = synic(1);
        enable(&s, 0);
        let queue = Arc::new(GuestMessageQueue::new().unwrap());
        let host: Arc<Mutex<dyn HypervHost>> =
            Arc::new(Mutex::new(VmbusHost::new(queue.clone(), 17)));
        let exits = HypervExits::new(s.clone(), host);
        let input = 0x20_0000;
        let mut block = [0u8; POST_MESSAGE_INPUT_SIZE];
        block[0] = 1; // connection 1
        block[8] = 1; // message type
        block[12] = 40;
        block[16..56].copy_from_slice(&initiate_contact(0x0004_0000, 0));
        s.mem
            .memory()
            .write_slice(&block, GuestAddress(input))
            .unwrap();
        let call = |rcx: u64, param: u64| exits.hypercall(0, rcx, param);
        assert_eq!(call(0x5c, input), HvStatus::Success);
        assert_eq!(call(0x1005c, input), HvStatus::InvalidHypercallCode, "fast");
        assert_eq!(call(0x5c, input + 4), HvStatus::InvalidAlignment);
        assert_eq!(call(0x5c, 1 << 40), HvStatus::InsufficientMemory);
        assert_eq!(
            call(0x1_0000_005c, input),
            HvStatus::InvalidHypercallInput,
            "rep"
        );
        assert_eq!(call(0x1005d, 0x12), HvStatus::InvalidConnectionId);
        assert_eq!(call(0x1005d, 17), HvStatus::Success, "the channel");
        assert_eq!(call(0x1005d, 1 << 33), HvStatus::InvalidPortId);
        assert_eq!(call(0x8001, 0), HvStatus::InvalidHypercallCode);
        assert_eq!(queue.kick_fd().read().unwrap(), 2, "one post, one signal");
    }

    #[test]
    fn vmbus_host_queues_what_the_guest_posts() {
        let queue = Arc::new(GuestMessageQueue::new().unwrap());
        let mut host = VmbusHost::new(queue.clone(), 17);
        assert_eq!(
            host.post_message(0, &post(4, &initiate_contact(0x0005_0003, 1))),
            HvStatus::InvalidConnectionId,
            "5.x on connection 4: the guest moves on"
        );
        let wrong_type = PostMessage {
            connection_id: 1,
            message: SynicMessage::new(2, &[3, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
        };
        assert_eq!(
            host.post_message(0, &wrong_type),
            HvStatus::InvalidHypercallInput
        );
        for _ in 0..devices::hyperv::device::GUEST_MESSAGE_QUEUE_LIMIT {
            assert_eq!(
                host.post_message(1, &post(1, &[3, 0, 0, 0, 0, 0, 0, 0])),
                HvStatus::Success
            );
        }
        assert_eq!(
            host.post_message(1, &post(1, &[3, 0, 0, 0, 0, 0, 0, 0])),
            HvStatus::InsufficientBuffers,
            "full queue: the guest retries"
        );
        assert_eq!(host.signal_event(0, 18), HvStatus::InvalidConnectionId);
    }
}
