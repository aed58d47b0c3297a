//! The Cloud Hypervisor API (v1) on tidevm: answers for a running VM
//! ([`Vmm::handle_ch_request`], on the event loop) and for a VMM without
//! one ([`IdleVmm`], on the main thread between VMs).

use api_server::ch::{ChRequest, ChVmInfo, ChVmResize, ChVmmPingResponse, ChVsockConfig};
use api_server::{ApiRequest, ApiResponse};
use serde_json::Value;

use crate::ch_config::{ch_config_to_vm_config, map_vsock, vm_config_to_ch};
use crate::config::VmConfig;
use crate::vmm::{ExitReason, Vmm, VmmAction};

/// The answer to `vmm.ping`.
pub fn ping() -> ApiResponse {
    ApiResponse::ok(&ChVmmPingResponse {
        build_version: format!("tidevm {}", env!("CARGO_PKG_VERSION")),
        version: env!("CARGO_PKG_VERSION").to_string(),
        pid: i64::from(std::process::id()),
        features: Vec::new(),
    })
}

/// A VM from the command line as a Cloud Hypervisor `VmConfig`, for `vm.info`.
fn ch_value(config: &VmConfig) -> Value {
    serde_json::to_value(vm_config_to_ch(config)).unwrap_or_default()
}

fn not_created() -> ApiResponse {
    ApiResponse::error(404, "no VM is created (PUT /api/v1/vm.create first)")
}

impl Vmm {
    /// Answers a Cloud Hypervisor API request while the VM runs.
    pub(crate) fn handle_ch_request(&mut self, request: &ChRequest) -> ApiResponse {
        let stop = |vmm: &mut Vmm, action, reason| {
            vmm.action = Some(action);
            vmm.request_exit(reason);
            ApiResponse::no_content()
        };
        match request {
            ChRequest::VmmPing => ping(),
            ChRequest::VmmShutdown => stop(self, VmmAction::ShutdownVmm, ExitReason::PowerOff),
            ChRequest::VmCreate(_) => {
                ApiResponse::error(409, "a VM is already created and running")
            }
            ChRequest::VmBoot => ApiResponse::error(409, "the VM is already running"),
            ChRequest::VmInfo => self.ch_vm_info(),
            ChRequest::VmCounters => ApiResponse::ok(&self.counters()),
            ChRequest::VmResize(resize) => self.ch_resize(resize),
            ChRequest::VmShutdown => stop(self, VmmAction::ShutdownVm, ExitReason::PowerOff),
            ChRequest::VmReboot => stop(self, VmmAction::Reboot, ExitReason::Reset),
            ChRequest::VmPowerButton => ApiResponse::error(
                409,
                "tidevm's guest platform has no ACPI power button; use vm.shutdown",
            ),
            ChRequest::VmDelete => stop(self, VmmAction::Delete, ExitReason::PowerOff),
            ChRequest::VmAddVsock(_) => ApiResponse::error(
                409,
                "tidevm cannot hotplug devices: add the vsock device before vm.boot",
            ),
        }
    }

    /// Guest memory now: boot + plugged - ballooned (as the guest reports it).
    fn memory_actual_size(&self) -> u64 {
        let m = self.memory_info();
        let plugged = m
            .hv_balloon
            .as_ref()
            .map_or(m.plugged_size, |h| h.hot_added_size);
        let ballooned = m
            .hv_balloon
            .as_ref()
            .map_or(m.balloon_actual_size.unwrap_or(0), |h| h.ballooned_size);
        (m.boot_size + plugged).saturating_sub(ballooned)
    }

    fn ch_vm_info(&self) -> ApiResponse {
        let config = self
            .ch_config
            .clone()
            .unwrap_or_else(|| ch_value(&self.config));
        ApiResponse::ok(&ChVmInfo {
            config,
            state: "Running".to_string(),
            memory_actual_size: Some(self.memory_actual_size()),
        })
    }

    /// `vm.resize`: `desired_ram` through the same plan as `PUT /vm/memory`,
    /// `desired_balloon` as `PUT /vm/balloon`; vCPUs cannot change.
    fn ch_resize(&mut self, resize: &ChVmResize) -> ApiResponse {
        let vcpus = u64::from(self.config.cpus.boot_vcpus);
        if let Some(desired) = resize.desired_vcpus.filter(|d| *d != vcpus) {
            return ApiResponse::error(
                400,
                format!("desired_vcpus: tidevm has no vCPU hotplug; the VM has {vcpus} vCPUs, not {desired}"),
            );
        }
        if resize.desired_ram.is_none() && resize.desired_balloon.is_none() {
            if resize.desired_vcpus.is_some() {
                return ApiResponse::no_content();
            }
            return ApiResponse::error(
                400,
                "vm.resize needs desired_ram, desired_balloon or desired_vcpus",
            );
        }
        if let Some(ram) = resize.desired_ram {
            let response = self.resize_memory(ram);
            if response.status() != 204 {
                return response;
            }
        }
        if let Some(balloon) = resize.desired_balloon {
            return self.set_balloon(balloon);
        }
        ApiResponse::no_content()
    }
}

/// Where the VM of a VMM without a running one stands.
#[derive(Debug, Default)]
pub struct IdleVmm {
    /// The created VM: tidevm's configuration and the Cloud Hypervisor
    /// `VmConfig` it came from (`Value::Null` for a VM from the command line).
    pub vm: Option<(VmConfig, Value)>,
    /// Whether the VM ran and was shut down (`Shutdown`) or never ran (`Created`).
    pub shut_down: bool,
}

/// What the main thread does after an idle VMM answered a request.
#[derive(Debug, PartialEq, Eq)]
pub enum IdleOutcome {
    /// Keep waiting.
    Wait,
    /// Boot the created VM (answer the request once it runs).
    Boot,
    /// Exit tidevm.
    Exit,
}

impl IdleVmm {
    /// `vm.add-vsock` before boot: adds the device to the created VM (cold).
    fn add_vsock(&mut self, vsock: &ChVsockConfig) -> ApiResponse {
        let Some((config, echo)) = self.vm.as_mut() else {
            return not_created();
        };
        if config.vsock.is_some() {
            return ApiResponse::error(409, "the VM already has a vsock device");
        }
        match map_vsock(vsock) {
            Ok(mapped) => {
                config.vsock = Some(mapped);
                if let Some(object) = echo.as_object_mut() {
                    object.insert(
                        "vsock".into(),
                        serde_json::to_value(vsock).unwrap_or_default(),
                    );
                }
                ApiResponse::no_content()
            }
            Err(e) => ApiResponse::error(e.status(), e.to_string()),
        }
    }

    /// Answers `request` while no VM runs. `api_socket` goes into created
    /// configurations. Returns the response (none for [`IdleOutcome::Boot`]:
    /// it is sent once the VM runs) and what to do next.
    pub fn handle(
        &mut self,
        request: &ApiRequest,
        api_socket: Option<&std::path::Path>,
    ) -> (Option<ApiResponse>, IdleOutcome) {
        let wait = |r| (Some(r), IdleOutcome::Wait);
        let ApiRequest::Ch(request) = request else {
            return wait(ApiResponse::error(
                409,
                "no VM is running (create and boot one with PUT /api/v1/vm.create and vm.boot)",
            ));
        };
        match request {
            ChRequest::VmmPing => wait(ping()),
            ChRequest::VmmShutdown => (Some(ApiResponse::no_content()), IdleOutcome::Exit),
            ChRequest::VmCreate(ch) => {
                if self.vm.is_some() {
                    return wait(ApiResponse::error(
                        409,
                        "a VM is already created (PUT /api/v1/vm.delete first)",
                    ));
                }
                match ch_config_to_vm_config(ch) {
                    Ok(mut config) => {
                        config.api_socket = api_socket.map(Into::into);
                        let echo = serde_json::to_value(ch).unwrap_or_default();
                        self.vm = Some((config, echo));
                        self.shut_down = false;
                        wait(ApiResponse::no_content())
                    }
                    Err(e) => wait(ApiResponse::error(e.status(), e.to_string())),
                }
            }
            ChRequest::VmBoot if self.vm.is_some() => (None, IdleOutcome::Boot),
            ChRequest::VmDelete => {
                self.vm = None;
                self.shut_down = false;
                wait(ApiResponse::no_content())
            }
            _ if self.vm.is_none() => wait(not_created()),
            ChRequest::VmInfo => {
                let (config, echo) = self.vm.as_ref().expect("checked above");
                let config = if echo.is_null() {
                    ch_value(config)
                } else {
                    echo.clone()
                };
                wait(ApiResponse::ok(&ChVmInfo {
                    config,
                    state: if self.shut_down {
                        "Shutdown"
                    } else {
                        "Created"
                    }
                    .to_string(),
                    memory_actual_size: None,
                }))
            }
            ChRequest::VmCounters => wait(ApiResponse::ok(&serde_json::json!({}))),
            ChRequest::VmAddVsock(vsock) => wait(self.add_vsock(vsock)),
            ChRequest::VmResize(_) => wait(ApiResponse::error(
                409,
                "the VM is not running: resize it after vm.boot",
            )),
            // vm.shutdown, vm.reboot and vm.power-button: a state conflict,
            // not a method the endpoint lacks (405 promises an Allow header).
            request => {
                let (_, path) = request.route();
                let state = if self.shut_down {
                    "Shutdown"
                } else {
                    "Created"
                };
                wait(ApiResponse::error(
                    409,
                    format!("{path}: the VM is not running (state {state}; boot it with PUT /api/v1/vm.boot)"),
                ))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use api_server::ch::{ChPayloadConfig, ChVmConfig};

    fn ch(request: ChRequest) -> ApiRequest {
        ApiRequest::Ch(request)
    }

    #[test]
    fn idle_lifecycle() {
        let mut idle = IdleVmm::default();
        let status = |(r, _): (Option<ApiResponse>, IdleOutcome)| r.map(|r| r.status());
        assert_eq!(
            status(idle.handle(&ch(ChRequest::VmmPing), None)),
            Some(200)
        );
        assert_eq!(status(idle.handle(&ch(ChRequest::VmInfo), None)), Some(404));
        assert_eq!(status(idle.handle(&ch(ChRequest::VmBoot), None)), Some(404));
        assert_eq!(status(idle.handle(&ApiRequest::GetMemory, None)), Some(409));
        let config = ChVmConfig {
            payload: ChPayloadConfig {
                kernel: Some(std::env::current_exe().unwrap().display().to_string()),
                ..Default::default()
            },
            ..Default::default()
        };
        let mut bad = config.clone();
        bad.other
            .insert("net".into(), serde_json::json!([{"tap": "t"}]));
        let (r, _) = idle.handle(&ch(ChRequest::VmCreate(Box::new(bad))), None);
        let r = r.unwrap();
        assert_eq!(r.status(), 400);
        assert!(matches!(r, ApiResponse::Error { ref message, .. } if message.starts_with("net:")));
        assert!(idle.vm.is_none());
        let create = ch(ChRequest::VmCreate(Box::new(config)));
        let sock = std::path::Path::new("/run/api.sock");
        assert_eq!(status(idle.handle(&create, Some(sock))), Some(204));
        assert_eq!(
            idle.vm.as_ref().unwrap().0.api_socket.as_deref(),
            Some(sock)
        );
        assert_eq!(status(idle.handle(&create, None)), Some(409));
        let (r, _) = idle.handle(&ch(ChRequest::VmInfo), None);
        let ApiResponse::Json(200, info) = r.unwrap() else {
            panic!()
        };
        assert_eq!(info["state"], "Created");
        assert!(info["config"]["payload"]["kernel"].is_string());
        for request in [
            ChRequest::VmShutdown,
            ChRequest::VmReboot,
            ChRequest::VmPowerButton,
        ] {
            let (r, outcome) = idle.handle(&ch(request.clone()), None);
            let Some(ApiResponse::Error { status, message }) = r else {
                panic!("{request:?}: {r:?}")
            };
            assert_eq!((status, outcome), (409, IdleOutcome::Wait), "{request:?}");
            assert!(message.contains("not running (state Created"), "{message}");
            assert!(message.starts_with(request.route().1), "{message}");
        }
        assert_eq!(
            status(idle.handle(&ch(ChRequest::VmResize(ChVmResize::default())), None)),
            Some(409)
        );
        assert_eq!(
            idle.handle(&ch(ChRequest::VmBoot), None),
            (None, IdleOutcome::Boot)
        );
        assert_eq!(
            status(idle.handle(&ch(ChRequest::VmDelete), None)),
            Some(204)
        );
        assert!(idle.vm.is_none());
        assert_eq!(
            idle.handle(&ch(ChRequest::VmmShutdown), None).1,
            IdleOutcome::Exit
        );
    }
}
