//! API requests, answered on the event loop: validate, plan, act, report.

use api_server::types::{
    BalloonInfo, BalloonStatistics, HvBalloonInfo, HvRejectedPages, HvStatusReport, MemoryInfo,
    VmInfo,
};
use api_server::{ApiRequest, ApiResponse};
use devices::hyperv::device::DynamicMemoryReport;
use devices::hyperv::dm::protocol::DM_PAGE_SIZE;
use devices::hyperv::dm::{HotAddState, Phase};

use crate::resize::{
    plan_dm_resize, plan_resize, BalloonStep, DmLimits, MemoryLimits, DEFAULT_HOT_ADD_BLOCK,
};
use crate::vmm::{ExitReason, Vmm};

impl Vmm {
    /// Answers one API request.
    pub(crate) fn handle_request(&mut self, request: &ApiRequest) -> ApiResponse {
        match request {
            ApiRequest::GetVmInfo => self.vm_info(),
            ApiRequest::PowerOff => {
                self.request_exit(ExitReason::PowerOff);
                ApiResponse::no_content()
            }
            ApiRequest::GetMemory => ApiResponse::ok(&self.memory_info()),
            ApiRequest::PutMemory(req) => self.resize_memory(req.requested_size),
            ApiRequest::GetBalloon => self.balloon_info(),
            ApiRequest::PutBalloon(update) => self.set_balloon(update.size),
            ApiRequest::GetBalloonStatistics => self.balloon_statistics(),
            ApiRequest::GetCounters => ApiResponse::ok(&self.counters()),
            ApiRequest::Ch(request) => self.handle_ch_request(request),
        }
    }

    fn vm_info(&self) -> ApiResponse {
        let uptime_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX);
        ApiResponse::ok(&VmInfo {
            state: "Running".to_string(),
            config: serde_json::to_value(&self.config).unwrap_or_default(),
            uptime_ms,
        })
    }

    fn limits(&self) -> MemoryLimits {
        let cfg = self.memory.config();
        MemoryLimits {
            boot_size: cfg.size,
            hotplug_size: if self.memory_devices.virtio_mem.is_some() {
                cfg.hotplug_size
            } else {
                0
            },
            block_size: cfg.block_size,
            balloon: self.memory_devices.balloon.is_some(),
        }
    }

    /// Where guest memory stands.
    pub(crate) fn memory_info(&self) -> MemoryInfo {
        if let Some(device) = &self.memory_devices.hv_balloon {
            let report = device.lock().expect("hv-balloon").report();
            return self.dm_memory_info(&report);
        }
        let cfg = self.memory.config();
        let (hotplug_requested, plugged) = self
            .memory_devices
            .virtio_mem
            .as_ref()
            .map(|m| {
                let m = m.lock().expect("virtio-mem");
                (m.requested_size(), m.plugged_size())
            })
            .unwrap_or((0, 0));
        let (balloon_target, balloon_actual) = match &self.memory_devices.balloon {
            Some(b) => {
                let b = b.lock().expect("balloon");
                (Some(b.target_size()), Some(b.actual_size()))
            }
            None => (None, None),
        };
        MemoryInfo {
            boot_size: cfg.size,
            hotplug_size: cfg.hotplug_size,
            // A balloon target still waiting for virtio-mem to unplug is
            // part of what was requested.
            requested_size: cfg.size + hotplug_requested
                - self.pending_balloon.or(balloon_target).unwrap_or(0),
            plugged_size: plugged,
            block_size: cfg.block_size,
            slot_size: cfg.slot_size,
            memslots_in_use: self.memory.hotplug_slots_in_use(),
            longest_memslot_update_us: u64::try_from(self.memory.longest_slot_ioctl().as_micros())
                .unwrap_or(u64::MAX),
            hotplug_method: if self.memory_devices.virtio_mem.is_some() {
                "virtio-mem".to_string()
            } else {
                "none".to_string()
            },
            balloon_target_size: balloon_target,
            balloon_actual_size: balloon_actual,
            hv_balloon: None,
        }
    }

    /// `GET /vm/memory` with the Dynamic Memory device.
    fn dm_memory_info(&self, r: &DynamicMemoryReport) -> MemoryInfo {
        let cfg = self.memory.config();
        let dm = &r.dm;
        let c = &dm.counters;
        let plugged = self
            .memory
            .hotplug_region()
            .map_or(0, |h| h.lock().expect("hotplug region").plugged());
        let info = HvBalloonInfo {
            vmbus_connected: r.connected,
            channel_open: r.channel_open,
            state: match dm.phase {
                Phase::AwaitingVersion => "awaiting-version",
                Phase::AwaitingCapabilities => "awaiting-capabilities",
                Phase::Ready => "ready",
            }
            .to_string(),
            protocol_version: dm.version.map(|v| format!("{}.{}", v.major(), v.minor())),
            hot_add_alignment: dm
                .capabilities
                .map(|c| c.hot_add_alignment_pages() * DM_PAGE_SIZE),
            target_size: dm.target_bytes,
            guest_size: dm.guest_bytes,
            hot_added_size: dm.hot_added_bytes,
            ballooned_size: dm.ballooned_bytes,
            orphaned_size: dm.orphaned_bytes,
            busy: dm.busy,
            hot_add: match dm.hot_add {
                HotAddState::Enabled => "enabled",
                HotAddState::Paused => "paused",
                HotAddState::Stopped => "stopped",
            }
            .to_string(),
            last_status: dm.last_status.map(|s| HvStatusReport {
                committed: s.report.num_committed.saturating_mul(DM_PAGE_SIZE),
                available: s.report.num_avail.saturating_mul(DM_PAGE_SIZE),
                age_ms: u64::try_from(s.at.elapsed().as_millis()).unwrap_or(u64::MAX),
            }),
            rejected_pages: HvRejectedPages {
                outside_ram: c.rejected_outside_ram,
                already_ballooned: c.rejected_already_ballooned,
                exceeds_request: c.rejected_exceeds_request,
                unsolicited: c.rejected_unsolicited,
            },
            bad_guest_messages: r.vmbus.malformed
                + r.metrics.bad_dm_messages
                + r.metrics.foreign_packets,
            ring_errors: r.metrics.ring_errors,
        };
        MemoryInfo {
            boot_size: cfg.size,
            hotplug_size: cfg.hotplug_size,
            requested_size: dm.target_bytes.unwrap_or(cfg.size),
            plugged_size: plugged,
            block_size: info.hot_add_alignment.unwrap_or(DEFAULT_HOT_ADD_BLOCK),
            slot_size: cfg.slot_size,
            memslots_in_use: self.memory.hotplug_slots_in_use(),
            longest_memslot_update_us: u64::try_from(self.memory.longest_slot_ioctl().as_micros())
                .unwrap_or(u64::MAX),
            hotplug_method: "hv-balloon".to_string(),
            balloon_target_size: None,
            balloon_actual_size: None,
            hv_balloon: Some(info),
        }
    }

    /// Resizes through the Dynamic Memory device: validate, then set its
    /// target; the guest converges on its own.
    fn resize_dm(&mut self, requested: u64) -> Option<ApiResponse> {
        let device = self.memory_devices.hv_balloon.as_ref()?;
        let mut device = device.lock().expect("hv-balloon");
        let cfg = self.memory.config();
        let limits = DmLimits {
            boot_size: cfg.size,
            hotplug_size: cfg.hotplug_size,
            hot_add_block: device
                .report()
                .dm
                .capabilities
                .map_or(DEFAULT_HOT_ADD_BLOCK, |c| {
                    c.hot_add_alignment_pages() * DM_PAGE_SIZE
                }),
        };
        Some(match plan_dm_resize(requested, &limits) {
            Ok(target) => {
                device.set_target(target);
                ApiResponse::no_content()
            }
            Err(e) => ApiResponse::error(e.status(), e.to_string()),
        })
    }

    pub(crate) fn resize_memory(&mut self, requested: u64) -> ApiResponse {
        if let Some(response) = self.resize_dm(requested) {
            return response;
        }
        let plugged = self
            .memory_devices
            .virtio_mem
            .as_ref()
            .map_or(0, |m| m.lock().expect("virtio-mem").plugged_size());
        let plan = match plan_resize(requested, &self.limits(), plugged) {
            Ok(plan) => plan,
            Err(e) => return ApiResponse::error(e.status(), e.to_string()),
        };
        // A new plan replaces a step the last one left waiting.
        self.pending_balloon = None;
        // Order: the balloon deflates before virtio-mem plugs (a growing
        // guest first gets its boot memory back); a balloon that must wait
        // for virtio-mem's unplug is set by `advance_resize`.
        if let (Some(balloon), Some(target)) = (&self.memory_devices.balloon, plan.balloon_target) {
            match plan.balloon_step {
                BalloonStep::Now => {
                    if let Err(e) = balloon.lock().expect("balloon").set_target_size(target) {
                        return ApiResponse::error(500, format!("balloon: {e}"));
                    }
                }
                BalloonStep::AfterUnplug => {
                    log::info!(
                        "resize: balloon target {target} waits for virtio-mem to unplug {plugged} bytes"
                    );
                    self.pending_balloon = Some(target);
                }
            }
        }
        if let Some(mem) = &self.memory_devices.virtio_mem {
            if let Err(e) = mem
                .lock()
                .expect("virtio-mem")
                .set_requested_size(plan.hotplug_requested)
            {
                return ApiResponse::error(500, format!("virtio-mem: {e}"));
            }
        }
        ApiResponse::no_content()
    }

    /// Takes the next step of a resize in progress: sets a waiting balloon
    /// target once virtio-mem has unplugged down to its requested size.
    /// Called by the event loop after each round of events.
    pub(crate) fn advance_resize(&mut self) {
        let Some(target) = self.pending_balloon else {
            return;
        };
        let (Some(mem), Some(balloon)) = (
            &self.memory_devices.virtio_mem,
            &self.memory_devices.balloon,
        ) else {
            self.pending_balloon = None;
            return;
        };
        let unplugged = {
            let m = mem.lock().expect("virtio-mem");
            m.plugged_size() <= m.requested_size()
        };
        if !unplugged {
            return;
        }
        self.pending_balloon = None;
        log::info!("resize: virtio-mem has unplugged; balloon target {target}");
        if let Err(e) = balloon.lock().expect("balloon").set_target_size(target) {
            log::error!("resize: balloon target {target}: {e}");
        }
    }

    fn no_balloon() -> ApiResponse {
        ApiResponse::error(
            409,
            "no balloon device is configured (start the VM with --balloon)",
        )
    }

    fn balloon_info(&self) -> ApiResponse {
        let Some(balloon) = &self.memory_devices.balloon else {
            return Self::no_balloon();
        };
        let b = balloon.lock().expect("balloon");
        let cfg = b.config();
        ApiResponse::ok(&BalloonInfo {
            target_size: b.target_size(),
            actual_size: b.actual_size(),
            deflate_on_oom: cfg.deflate_on_oom,
            free_page_reporting: cfg.free_page_reporting,
            stats_period_s: cfg.stats_period_s,
            features_negotiated: b.features_negotiated(),
        })
    }

    pub(crate) fn set_balloon(&mut self, size: u64) -> ApiResponse {
        let Some(balloon) = &self.memory_devices.balloon else {
            return Self::no_balloon();
        };
        let boot = self.memory.boot_size();
        if size > boot {
            return ApiResponse::error(
                400,
                format!("balloon size {size} is above the boot memory size {boot}"),
            );
        }
        // An explicit balloon size replaces a waiting step of a resize.
        self.pending_balloon = None;
        match balloon.lock().expect("balloon").set_target_size(size) {
            Ok(()) => ApiResponse::no_content(),
            Err(e) => ApiResponse::error(400, e.to_string()),
        }
    }

    fn balloon_statistics(&self) -> ApiResponse {
        let Some(balloon) = &self.memory_devices.balloon else {
            return Self::no_balloon();
        };
        let b = balloon.lock().expect("balloon");
        if b.config().stats_period_s == 0 {
            return ApiResponse::error(
                409,
                "balloon statistics are off (start with --balloon stats_period=SECONDS)",
            );
        }
        let Some(s) = b.latest_stats() else {
            return ApiResponse::error(409, "the guest has not sent balloon statistics yet");
        };
        ApiResponse::ok(&BalloonStatistics {
            last_update_ms: Some(s.update_time_ms),
            swap_in: s.swap_in,
            swap_out: s.swap_out,
            major_faults: s.major_faults,
            minor_faults: s.minor_faults,
            free_memory: s.free_memory,
            total_memory: s.total_memory,
            available_memory: s.available_memory,
            disk_caches: s.disk_caches,
            hugetlb_allocations: s.hugetlb_allocations,
            hugetlb_failures: s.hugetlb_failures,
        })
    }
}
