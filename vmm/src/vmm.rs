//! The running VM: what the event loop owns besides devices. It reacts to
//! vCPU stops, guest reset/power-off requests and API requests.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api_server::ApiRequestEnvelope;
use event_manager::{EventOps, Events, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::config::VmConfig;
use crate::counters::{self, CountedDevices};
use crate::device_manager::PlatformEvents;
use crate::memory::MemoryManager;
use crate::resize::MemoryDevices;
use crate::vcpu::{VcpuEvent, VcpuStop};

/// How a VM run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest powered off (ACPI S5 or KVM shutdown event), or the API asked.
    PowerOff,
    /// The guest rebooted (i8042 reset, ACPI reset, triple fault).
    Reset,
    /// The guest reported a crash.
    Crashed(String),
    /// The VMM could not keep the guest running.
    Error(String),
}

const TOKEN_VCPU: u32 = 1;
const TOKEN_RESET: u32 = 2;
const TOKEN_POWEROFF: u32 = 3;
const TOKEN_API: u32 = 4;
const TOKEN_PANIC: u32 = 5;

/// The API's request channel and the eventfd that announces requests.
pub struct ApiChannel {
    /// Requests from the API thread.
    pub requests: Receiver<ApiRequestEnvelope>,
    /// Signalled once per request sent.
    pub kick: EventFd,
}

/// The API channel, shared by the VMs of one run (a reboot keeps it).
pub type SharedApiChannel = Arc<Mutex<ApiChannel>>;

/// What the API asked to happen once the running VM has stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmmAction {
    /// `vm.shutdown`: the VM stays defined (state `Shutdown`); tidevm waits.
    ShutdownVm,
    /// `vm.reboot`: build the VM again.
    Reboot,
    /// `vm.delete`: forget the VM; tidevm waits for a new one.
    Delete,
    /// `vmm.shutdown`: exit tidevm.
    ShutdownVmm,
}

/// The VM as the event loop sees it.
pub struct Vmm {
    pub(crate) config: VmConfig,
    pub(crate) memory: MemoryManager,
    pub(crate) memory_devices: MemoryDevices,
    vcpu_events: Receiver<VcpuEvent>,
    vcpu_wake: EventFd,
    platform: PlatformEvents,
    api: Option<SharedApiChannel>,
    pub(crate) started: Instant,
    exit: Option<ExitReason>,
    /// What the API asked for after the VM stops.
    pub(crate) action: Option<VmmAction>,
    /// The Cloud Hypervisor `VmConfig` the VM was created from, if it was.
    pub(crate) ch_config: Option<serde_json::Value>,
    /// Devices besides the memory devices whose counters the API reports.
    counted: CountedDevices,
    /// A balloon target waiting for virtio-mem to finish unplugging
    /// ([`crate::resize::BalloonStep::AfterUnplug`]).
    pub(crate) pending_balloon: Option<u64>,
}

impl Vmm {
    /// Assembles the event-loop side of a VM.
    pub fn new(
        config: VmConfig,
        memory: MemoryManager,
        memory_devices: MemoryDevices,
        vcpu_events: Receiver<VcpuEvent>,
        vcpu_wake: EventFd,
        platform: PlatformEvents,
        api: Option<SharedApiChannel>,
    ) -> Self {
        Self {
            config,
            memory,
            memory_devices,
            vcpu_events,
            vcpu_wake,
            platform,
            api,
            started: Instant::now(),
            exit: None,
            action: None,
            ch_config: None,
            counted: CountedDevices::default(),
            pending_balloon: None,
        }
    }

    /// Hands over the devices whose counters `GET /vm/counters` reports
    /// besides the memory devices.
    pub fn set_counted_devices(&mut self, counted: CountedDevices) {
        self.counted = counted;
    }

    /// Every device's counters, by device name.
    pub(crate) fn counters(&self) -> api_server::VmCounters {
        counters::collect(&self.memory_devices, &self.counted)
    }

    /// Records the Cloud Hypervisor `VmConfig` the VM was created from, for `vm.info`.
    pub fn set_ch_config(&mut self, config: Option<serde_json::Value>) {
        self.ch_config = config;
    }

    /// What the API asked to happen after the VM stops, if anything.
    pub fn action(&self) -> Option<VmmAction> {
        self.action
    }

    /// Why the VM stopped, once it has.
    pub fn exit_reason(&self) -> Option<&ExitReason> {
        self.exit.as_ref()
    }

    /// Ends the run with `reason` unless it already ended.
    pub(crate) fn request_exit(&mut self, reason: ExitReason) {
        if self.exit.is_none() {
            log::info!("VM stopping: {reason:?}");
            self.exit = Some(reason);
        }
    }

    /// The guest stopped itself with `reason`, unless it reported a panic
    /// first: a panicking kernel reboots right after telling pvpanic, and
    /// both events can arrive in the same wakeup.
    fn guest_stopped(&mut self, reason: ExitReason) {
        if self.platform.panic.read().is_ok() {
            self.request_exit(ExitReason::Crashed(
                "the guest kernel panicked (pvpanic)".into(),
            ));
        } else {
            self.request_exit(reason);
        }
    }

    fn handle_vcpu_events(&mut self) {
        let _ = self.vcpu_wake.read();
        while let Ok(VcpuEvent { id, stop }) = self.vcpu_events.try_recv() {
            let reason = match stop {
                VcpuStop::Reset => ExitReason::Reset,
                VcpuStop::TripleFault => {
                    log::warn!("vCPU {id}: guest triple fault; resetting like a reboot");
                    ExitReason::Reset
                }
                VcpuStop::PowerOff => ExitReason::PowerOff,
                VcpuStop::Crash => ExitReason::Crashed(format!("vCPU {id} reported a guest crash")),
                VcpuStop::Halted => {
                    ExitReason::Error(format!("vCPU {id} halted and cannot be woken"))
                }
                VcpuStop::Error(e) => ExitReason::Error(e),
                VcpuStop::Stopped => continue,
            };
            self.request_exit(reason);
        }
    }

    fn handle_api(&mut self) {
        let Some(api) = self.api.clone() else { return };
        let api = api.lock().expect("api channel");
        let _ = api.kick.read();
        while let Ok(envelope) = api.requests.try_recv() {
            let (method, path) = envelope.request.route();
            let response = self.handle_request(&envelope.request);
            log::info!("API {method} {path} -> {}", response.status());
            envelope.respond(response);
        }
    }
}

impl MutEventSubscriber for Vmm {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        match events.data() {
            TOKEN_VCPU => self.handle_vcpu_events(),
            TOKEN_RESET => {
                let _ = self.platform.reset.read();
                self.guest_stopped(ExitReason::Reset);
            }
            TOKEN_POWEROFF => {
                let _ = self.platform.poweroff.read();
                self.guest_stopped(ExitReason::PowerOff);
            }
            TOKEN_PANIC => {
                let _ = self.platform.panic.read();
                self.request_exit(ExitReason::Crashed(
                    "the guest kernel panicked (pvpanic)".into(),
                ));
            }
            TOKEN_API => self.handle_api(),
            other => log::warn!("unexpected VMM event token {other}"),
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let mut add = |fd: &EventFd, token| {
            if let Err(e) = ops.add(Events::with_data(fd, token, EventSet::IN)) {
                log::error!("cannot watch VMM event {token}: {e}");
            }
        };
        add(&self.vcpu_wake, TOKEN_VCPU);
        add(&self.platform.reset, TOKEN_RESET);
        add(&self.platform.poweroff, TOKEN_POWEROFF);
        add(&self.platform.panic, TOKEN_PANIC);
        if let Some(api) = &self.api {
            add(&api.lock().expect("api channel").kick, TOKEN_API);
        }
    }
}
