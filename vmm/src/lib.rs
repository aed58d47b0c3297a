//! tidevm's VMM: builds a VM from a [`config::VmConfig`], runs it on one
//! event loop plus one thread per vCPU, and reports how it ended.
//!
//! The path of a resize: `api_server` parses the request → [`api`] checks
//! it and plans it with [`resize`] → the virtio-mem device asks the guest →
//! the guest's requests reach the device, which maps and unmaps slots of
//! [`memory::hotplug`] → `GET /vm/memory` reports.

pub mod api;
pub mod ch_api;
pub mod ch_config;
pub mod config;
pub mod counters;
pub mod device_manager;
pub mod hyperv;
pub mod logger;
pub mod memory;
pub mod resize;
pub mod seccomp;
pub mod vcpu;
pub mod vmm;

use std::fs::File;
use std::path::Path;
use std::sync::mpsc::channel;
use std::sync::{Arc, Mutex};

use api_server::{ApiRequestEnvelope, ApiResponse, ApiServer, ApiServerConfig, ApiServerHandle};
use event_manager::{EventManager, SubscriberOps};
use kvm_bindings::{kvm_pit_config, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::Kvm;
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddressSpace;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use ch_api::{IdleOutcome, IdleVmm};
use config::VmConfig;
use device_manager::{DeviceManager, Subscriber};
use devices::hyperv::device::{DynamicMemoryConfig, DynamicMemoryDevice, GuestMessageQueue};
use devices::hyperv::vmbus::guid::{DYNAMIC_MEMORY_CLASS_ID, DYNAMIC_MEMORY_INSTANCE_ID};
use devices::hyperv::vmbus::message::ChannelOffer;
use devices::virtio::balloon::{Balloon, BalloonConfig};
use devices::virtio::mem::{VirtioMem, VirtioMemConfig};
use memory::hotplug::HotplugBackend;
use memory::MemoryManager;
use resize::MemoryDevices;
use seccomp::{SeccompMode, ThreadKind};
use vcpu::{Vcpu, VcpuThread};
pub use vmm::ExitReason;
use vmm::{ApiChannel, SharedApiChannel, Vmm, VmmAction};

/// Why a VM could not be built or run.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// /dev/kvm is missing or refused a VM-wide call.
    #[error("KVM: {0}")]
    Kvm(String),
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(#[from] memory::MemoryError),
    /// A device could not be set up.
    #[error("devices: {0}")]
    Device(#[from] device_manager::DeviceError),
    /// The kernel, initrd or boot tables could not be loaded.
    #[error("boot: {0}")]
    Boot(String),
    /// The API socket could not be served.
    #[error("API socket: {0}")]
    Api(#[from] api_server::ApiError),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// A thread or eventfd could not be created.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A seccomp filter could not be installed.
    #[error("seccomp: {0}")]
    Seccomp(#[from] seccomp::SeccompError),
}

/// Where KVM keeps the three pages of its real-mode TSS (below the IOAPIC,
/// inside the MMIO gap, so never guest RAM).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Where KVM keeps its identity-map page table, just below the TSS.
const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> VmmError {
    move |e| VmmError::Kvm(format!("{what}: {e}"))
}

/// Runs the VM described by `config` until it stops, and returns why. A
/// guest reboot with `--on-reboot restart` starts a fresh VM instead; the
/// API socket is served throughout. All threads are joined on return.
///
/// With `seccomp` other than [`SeccompMode::Off`] every thread runs under
/// its filter ([`seccomp`]): the API thread from its start, this thread
/// from before the first VM is built, each vCPU thread from before its
/// first `KVM_RUN`.
pub fn run(config: VmConfig, seccomp: SeccompMode) -> Result<ExitReason, VmmError> {
    let socket = config.api_socket.clone();
    let (api_handle, api_channel) = start_threads(socket.as_deref(), seccomp)?;
    let idle = IdleVmm {
        vm: Some((config, serde_json::Value::Null)),
        shut_down: false,
    };
    let result = serve(idle, true, api_channel, socket.as_deref(), seccomp);
    if let Some(handle) = api_handle {
        handle.stop();
    }
    result
}

/// Starts without a VM and serves the API on `api_socket`: a VM is created
/// and booted with the Cloud Hypervisor API (`vm.create`, `vm.boot`), and
/// `vmm.shutdown` (or the guest powering off) ends the run.
pub fn run_api_only(api_socket: &Path, seccomp: SeccompMode) -> Result<ExitReason, VmmError> {
    let (api_handle, api_channel) = start_threads(Some(api_socket), seccomp)?;
    let result = serve(
        IdleVmm::default(),
        false,
        api_channel,
        Some(api_socket),
        seccomp,
    );
    if let Some(handle) = api_handle {
        handle.stop();
    }
    result
}

/// The VMM loop: runs the created VM when asked (at once with `boot_now`),
/// and between VMs answers API requests on this thread.
fn serve(
    mut idle: IdleVmm,
    mut boot_now: bool,
    api: Option<SharedApiChannel>,
    api_socket: Option<&Path>,
    seccomp: SeccompMode,
) -> Result<ExitReason, VmmError> {
    let mut boot_reply: Option<ApiRequestEnvelope> = None;
    loop {
        if boot_now {
            boot_now = false;
            let Some((config, echo)) = idle.vm.clone() else {
                return Err(VmmError::Boot("no VM to boot".into()));
            };
            let ch_config = (!echo.is_null()).then_some(echo);
            match run_vm(&config, api.clone(), ch_config, &mut boot_reply, seccomp) {
                Err(e) => match boot_reply.take() {
                    // The VM could not be built: the client hears why and
                    // tidevm keeps waiting.
                    Some(reply) => {
                        log::error!("vm.boot failed: {e}");
                        reply.respond(ApiResponse::error(500, format!("cannot boot the VM: {e}")));
                    }
                    None => return Err(e),
                },
                Ok((reason, action)) => match action {
                    Some(VmmAction::ShutdownVmm) => return Ok(ExitReason::PowerOff),
                    Some(VmmAction::Reboot) => boot_now = true,
                    Some(VmmAction::ShutdownVm) => idle.shut_down = true,
                    Some(VmmAction::Delete) => idle.vm = None,
                    None if reason == ExitReason::Reset
                        && config.on_reboot == config::RebootAction::Restart =>
                    {
                        log::info!("guest rebooted: starting it again");
                        boot_now = true;
                    }
                    None => return Ok(reason),
                },
            }
            continue;
        }
        let Some(api) = &api else {
            return Ok(ExitReason::PowerOff);
        };
        let Ok(envelope) = api.lock().expect("api channel").requests.recv() else {
            return Ok(ExitReason::PowerOff);
        };
        let (method, path) = envelope.request.route();
        let (response, outcome) = idle.handle(&envelope.request, api_socket);
        if let Some(response) = response {
            log::info!("API {method} {path} -> {}", response.status());
            envelope.respond(response);
        } else {
            boot_reply = Some(envelope);
        }
        match outcome {
            IdleOutcome::Wait => {}
            IdleOutcome::Boot => boot_now = true,
            IdleOutcome::Exit => return Ok(ExitReason::PowerOff),
        }
    }
}

/// Builds one VM, runs it until it stops, and tears it down.
///
/// `boot_reply`, a pending `vm.boot`, is answered once the vCPUs run; on an
/// error before that it is left for the caller to answer. Returns how the
/// VM stopped and what the API asked to happen next.
fn run_vm(
    config: &VmConfig,
    api_channel: Option<SharedApiChannel>,
    ch_config: Option<serde_json::Value>,
    boot_reply: &mut Option<ApiRequestEnvelope>,
    seccomp: SeccompMode,
) -> Result<(ExitReason, Option<VmmAction>), VmmError> {
    let kvm = Kvm::new().map_err(kvm_err("cannot open /dev/kvm"))?;
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("cannot create a VM"))?);
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS)
        .map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_err("KVM_CREATE_PIT2"))?;

    let balloon = config.balloon.is_some()
        || config.memory.hotplug_method == config::HotplugMethod::HvBalloon;
    let memory = MemoryManager::new(vm.clone(), &config.memory, balloon)?;
    let guest_memory = memory.guest_memory().clone();
    let mut em =
        EventManager::<Subscriber>::new().map_err(|e| VmmError::EventLoop(e.to_string()))?;
    let mut dm = DeviceManager::new(&vm, &mut em, config)?;
    let mut counted = counters::CountedDevices::default();
    for disk in &config.disks {
        let block = devices::virtio::block::Block::new(&disk.path, disk.readonly).map_err(|e| {
            device_manager::DeviceError::Disk {
                path: disk.path.display().to_string(),
                reason: e.to_string(),
            }
        })?;
        counted.disks.push(block.metrics());
        dm.add_virtio(&vm, &mut em, &guest_memory, Arc::new(Mutex::new(block)))?;
    }
    let hv_balloon = config.memory.hotplug_method == config::HotplugMethod::HvBalloon;
    if hv_balloon {
        dm.add_acpi_device(Box::new(arch::hyperv::VmbusAcpiDevice));
    }
    if let Some(v) = &config.vsock {
        let vsock = devices::virtio::vsock::Vsock::new(v.cid, &v.socket)
            .map_err(|e| device_manager::DeviceError::Vsock(e.to_string()))?;
        log::info!(
            "vsock: guest CID {}, host socket {}",
            v.cid,
            v.socket.display()
        );
        let vsock = Arc::new(Mutex::new(vsock));
        counted.vsock = Some(vsock.clone());
        dm.add_virtio(&vm, &mut em, &guest_memory, vsock)?;
    }
    if let Some(r) = &config.rng {
        let rng = devices::virtio::rng::Rng::new(&r.src)
            .map_err(|e| device_manager::DeviceError::Rng(e.to_string()))?;
        let rng = Arc::new(Mutex::new(rng));
        counted.rng = Some(rng.clone());
        dm.add_virtio(&vm, &mut em, &guest_memory, rng)?;
    }
    let mut memory_devices = create_memory_devices(config, &memory)?;
    if let Some(mem) = &memory_devices.virtio_mem {
        dm.add_virtio(&vm, &mut em, &guest_memory, mem.clone())?;
    }
    if let Some(balloon) = &memory_devices.balloon {
        dm.add_virtio(&vm, &mut em, &guest_memory, balloon.clone())?;
    }

    let boot_memory = guest_memory.memory();
    let boot_err = |e: &dyn std::fmt::Display| VmmError::Boot(e.to_string());
    let rsdp =
        arch::acpi::create_acpi_tables(&boot_memory, config.cpus.boot_vcpus, &dm.acpi_devices())
            .map_err(|e| boot_err(&e))?;
    let mut kernel_file = File::open(&config.kernel)
        .map_err(|e| VmmError::Boot(format!("{}: {e}", config.kernel.display())))?;
    let kernel =
        arch::kernel::load_kernel(&boot_memory, &mut kernel_file).map_err(|e| boot_err(&e))?;
    let initrd = match &config.initrd {
        Some(path) => {
            let mut file =
                File::open(path).map_err(|e| VmmError::Boot(format!("{}: {e}", path.display())))?;
            Some(
                arch::kernel::load_initrd(&boot_memory, &mut file, &kernel)
                    .map_err(|e| boot_err(&e))?,
            )
        }
        None => None,
    };
    let cmdline = build_cmdline(config).map_err(|e| boot_err(&e))?;
    arch::boot_params::configure_boot(
        &boot_memory,
        &kernel,
        &cmdline,
        initrd,
        rsdp,
        config.memory.size,
    )
    .map_err(|e| boot_err(&e))?;

    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut cpuid_options = arch::CpuidOptions {
        tsc_deadline: kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer),
        ..Default::default()
    };
    let ncpus = config.cpus.boot_vcpus;
    let hyperv = if hv_balloon {
        if !kvm.check_extension(kvm_ioctls::Cap::HypervSynic2) {
            return Err(VmmError::Kvm(
                "hotplug_method=hv-balloon needs KVM's Hyper-V SynIC (KVM_CAP_HYPERV_SYNIC2)"
                    .into(),
            ));
        }
        let features =
            arch::hyperv::supported_features(&kvm).map_err(|e| VmmError::Kvm(e.to_string()))?;
        cpuid_options.hypervisor = arch::HypervisorLeaves::HyperV(features);
        let synic = Arc::new(
            hyperv::Synic::new(guest_memory.clone(), ncpus)
                .map_err(|e| VmmError::Kvm(e.to_string()))?,
        );
        let device = create_dynamic_memory(config, &memory, &synic)?;
        let host = Arc::new(Mutex::new(hyperv::VmbusHost::new(
            device.lock().expect("hv-balloon").queue().clone(),
            DM_OFFER.connection_id,
        )));
        em.add_subscriber(device.clone());
        memory_devices.hv_balloon = Some(device);
        let exits = Arc::new(hyperv::HypervExits::new(synic.clone(), host));
        Some((synic, exits))
    } else {
        None
    };
    let pio = Arc::new(dm.pio.clone());
    let mmio = Arc::new(dm.mmio.clone());
    let mut vcpus = Vec::new();
    for id in 0..ncpus {
        let fd = vm
            .create_vcpu(u64::from(id))
            .map_err(kvm_err("KVM_CREATE_VCPU"))?;
        if hyperv.is_some() {
            hyperv::enable_synic(&fd).map_err(|e| VmmError::Kvm(format!("vCPU {id}: {e}")))?;
        }
        arch::configure_vcpu(
            &fd,
            &boot_memory,
            &supported_cpuid,
            id,
            ncpus,
            kernel.entry,
            &cpuid_options,
        )
        .map_err(|e| boot_err(&e))?;
        let vcpu = Vcpu::new(id, fd, pio.clone(), mmio.clone());
        vcpus.push(match &hyperv {
            Some((_, exits)) => vcpu.with_hyperv(exits.clone()),
            None => vcpu,
        });
    }
    if let Some((synic, _)) = &hyperv {
        dm.wire_synic(&vm, &mut em, synic)?;
    }
    drop(boot_memory);

    let (vcpu_tx, vcpu_rx) = channel();
    let vcpu_wake = EventFd::new(EFD_NONBLOCK)?;
    let interrupts = dm.virtio_interrupts();
    counted.virtio_interrupts = interrupts.clone();
    let vmm = Arc::new(Mutex::new(Vmm::new(
        config.clone(),
        memory,
        memory_devices,
        vcpu_rx,
        vcpu_wake.try_clone()?,
        dm.platform,
        api_channel,
    )));
    {
        let mut vmm = vmm.lock().expect("vmm");
        vmm.set_ch_config(ch_config);
        vmm.set_counted_devices(counted);
    }
    em.add_subscriber(vmm.clone());
    let mut threads = Vec::new();
    for vcpu in vcpus {
        threads.push(VcpuThread::spawn(
            vcpu,
            vcpu_tx.clone(),
            vcpu_wake.try_clone()?,
            seccomp,
        )?);
    }
    log::info!("guest started with {ncpus} vCPUs");
    if let Some(reply) = boot_reply.take() {
        log::info!("API PUT /api/v1/vm.boot -> 204");
        reply.respond(ApiResponse::no_content());
    }

    let reason = loop {
        em.run_with_timeout(500)
            .map_err(|e| VmmError::EventLoop(e.to_string()))?;
        let mut running = vmm.lock().expect("vmm");
        if let Some(reason) = running.exit_reason() {
            break reason.clone();
        }
        running.advance_resize();
        drop(running);
        reraise_unacknowledged_interrupts(&interrupts);
    };
    for thread in &mut threads {
        thread.stop_and_join();
    }
    let action = vmm.lock().expect("vmm").action();
    Ok((reason, action))
}

/// How long a virtio interrupt may wait for the driver's acknowledgement
/// before it is raised again (the event loop looks at least every 500 ms).
const INTERRUPT_ACK_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Raises each virtio interrupt the guest left unacknowledged for
/// [`INTERRUPT_ACK_GRACE`] again: an edge it never saw would otherwise hang
/// the device and the driver, each waiting for the other (a stall in the
/// nested harness: the sandbox's vsock stream stopped with the interrupt
/// status set and 174 RX buffers unused; docs/benchmarks.md).
fn reraise_unacknowledged_interrupts(interrupts: &[Arc<devices::virtio::VirtioInterrupt>]) {
    let now = std::time::Instant::now();
    for (index, interrupt) in interrupts.iter().enumerate() {
        if interrupt.reraise_if_unacknowledged(now, INTERRUPT_ACK_GRACE) {
            let times = interrupt.reraised();
            if times.is_power_of_two() {
                log::warn!(
                    "virtio device {index}: the guest left its interrupt unacknowledged \
                     for {INTERRUPT_ACK_GRACE:?}; raised it again ({times} times so far)"
                );
            }
        }
    }
}

/// Creates the virtio-mem device (over the hotplug region, unless the
/// region is for hv-balloon) and the balloon the configuration asks for.
fn create_memory_devices(
    config: &VmConfig,
    memory: &MemoryManager,
) -> Result<MemoryDevices, VmmError> {
    let mut devices = MemoryDevices::default();
    let virtio_mem = config.memory.hotplug_method == config::HotplugMethod::VirtioMem;
    if let Some(region) = memory.hotplug_region().filter(|_| virtio_mem) {
        let (base, size) = {
            let r = region.lock().expect("hotplug region");
            (r.base(), r.size())
        };
        let mem_config = VirtioMemConfig {
            region_addr: base,
            region_size: size,
            block_size: config.memory.block_size,
            // The one proximity domain of the SRAT.
            node_id: Some(arch::acpi::PROXIMITY_DOMAIN),
        };
        let device = VirtioMem::new(mem_config, Box::new(HotplugBackend(region.clone())))
            .map_err(|e| VmmError::Memory(memory::MemoryError::Layout(e.to_string())))?;
        devices.virtio_mem = Some(Arc::new(Mutex::new(device)));
    }
    if let Some(b) = &config.balloon {
        let balloon = Balloon::new(BalloonConfig {
            target_size: b.size,
            deflate_on_oom: b.deflate_on_oom,
            free_page_reporting: b.free_page_reporting,
            stats_period_s: b.stats_period_s,
        })
        .map_err(|e| VmmError::Device(device_manager::DeviceError::Balloon(e.to_string())))?;
        devices.balloon = Some(Arc::new(Mutex::new(balloon)));
    }
    Ok(devices)
}

/// The one channel tidevm offers: Dynamic Memory, relid 1, signalled on
/// connection id 17 (QEMU's choice: 16 + relid).
const DM_OFFER: ChannelOffer = ChannelOffer {
    class_id: DYNAMIC_MEMORY_CLASS_ID,
    instance_id: DYNAMIC_MEMORY_INSTANCE_ID,
    child_relid: 1,
    connection_id: 17,
};

/// Creates the Hyper-V Dynamic Memory device over the hotplug region (the
/// same one virtio-mem would use), answering through `synic`.
fn create_dynamic_memory(
    config: &VmConfig,
    memory: &MemoryManager,
    synic: &Arc<hyperv::Synic>,
) -> Result<Arc<Mutex<DynamicMemoryDevice>>, VmmError> {
    let layout_err = |e: &dyn std::fmt::Display| {
        VmmError::Memory(memory::MemoryError::Layout(format!("hv-balloon: {e}")))
    };
    let region = memory
        .hotplug_region()
        .ok_or_else(|| layout_err(&"hotplug_method=hv-balloon needs hotplug_size"))?;
    let (base, size) = {
        let r = region.lock().expect("hotplug region");
        (r.base().0, r.size())
    };
    let boot_ram = arch::boot_ram_regions(config.memory.size)
        .into_iter()
        .map(|(addr, len)| (addr.0, len as u64))
        .collect();
    let device_config = DynamicMemoryConfig {
        offer: DM_OFFER,
        vcpu_count: u32::from(config.cpus.boot_vcpus),
        boot_ram,
        hotplug_base: base,
        hotplug_size: size,
    };
    let queue = Arc::new(GuestMessageQueue::new()?);
    let device = DynamicMemoryDevice::new(
        device_config,
        memory.guest_memory().clone(),
        Box::new(hyperv::SynicVmbusPort(synic.clone())),
        queue,
        Box::new(HotplugBackend(region.clone())),
    )
    .map_err(|e| layout_err(&e))?;
    Ok(Arc::new(Mutex::new(device)))
}

fn build_cmdline(config: &VmConfig) -> Result<Cmdline, linux_loader::cmdline::Error> {
    let mut cmdline = Cmdline::new(config::CMDLINE_MAX_SIZE)?;
    cmdline.insert_str(&config.cmdline)?;
    if config.memory.hotplug_size > 0 && !config.cmdline.contains("memhp_default_state=") {
        // Plugged memory is useless offline. virtio-mem unplugs, and only
        // movable memory can be unplugged again. Hyper-V DM never unplugs:
        // it takes memory back by ballooning, and hv_balloon's allocations
        // cannot come from ZONE_MOVABLE, so hot-added memory goes to a
        // kernel zone where the balloon can reach it.
        cmdline.insert_str(match config.memory.hotplug_method {
            config::HotplugMethod::VirtioMem => "memhp_default_state=online_movable",
            config::HotplugMethod::HvBalloon => "memhp_default_state=online",
        })?;
    }
    Ok(cmdline)
}

/// Prepares this process for the VMM loop: signal handlers, the API
/// server (under the Api filter), then the Vmm filter on this thread.
fn start_threads(
    socket: Option<&Path>,
    seccomp: SeccompMode,
) -> Result<(Option<ApiServerHandle>, Option<SharedApiChannel>), VmmError> {
    if seccomp != SeccompMode::Off {
        seccomp::install_sigsys_handler()?;
    }
    vcpu::install_kick_handler()?;
    let api = start_api(socket, seccomp)?;
    seccomp::install(ThreadKind::Vmm, seccomp)?;
    Ok(api)
}

fn start_api(
    socket: Option<&Path>,
    seccomp: SeccompMode,
) -> Result<(Option<ApiServerHandle>, Option<SharedApiChannel>), VmmError> {
    let Some(path) = socket else {
        return Ok((None, None));
    };
    let (tx, rx) = channel();
    let kick = EventFd::new(EFD_NONBLOCK)?;
    let handle = ApiServer::start_with_init(
        path,
        tx,
        kick.try_clone()?,
        ApiServerConfig::default(),
        move || seccomp::install(ThreadKind::Api, seccomp).map_err(|e| e.to_string()),
    )?;
    log::info!("API listening on {}", path.display());
    Ok((
        Some(handle),
        Some(Arc::new(Mutex::new(ApiChannel { requests: rx, kick }))),
    ))
}
