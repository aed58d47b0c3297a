//! Request and response bodies of the REST API.
//!
//! These types are the API contract (see `resources/openapi.yaml`). They derive both
//! `Serialize` and `Deserialize` so that the VMM, tests and clients share them. Request bodies
//! reject unknown fields; response bodies accept them, so that older clients keep working when
//! fields are added.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Body of `PUT /vm/memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryResizeRequest {
    /// Total guest memory wanted, in bytes: boot memory + hotplugged memory - ballooned memory.
    pub requested_size: u64,
}

/// Body of `PUT /vm/balloon`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// New balloon target size, in bytes (memory taken away from the guest).
    pub size: u64,
}

/// Body of the response to `GET /vm/info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmInfo {
    /// VM state, e.g. `"Running"`, `"Paused"`, `"ShuttingDown"`.
    pub state: String,
    /// VM configuration, as supplied by the VMM.
    pub config: serde_json::Value,
    /// Time since the VM started, in milliseconds.
    pub uptime_ms: u64,
}

/// Body of the response to `GET /vm/memory`. All sizes are in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Memory the guest booted with.
    pub boot_size: u64,
    /// Size of the hotplug region (maximum memory that can be hotplugged); 0 without one.
    pub hotplug_size: u64,
    /// Last requested total guest memory (boot + hotplugged - ballooned).
    pub requested_size: u64,
    /// Memory currently plugged into the hotplug region.
    pub plugged_size: u64,
    /// Hotplug granularity; `requested_size` must be a multiple of it.
    pub block_size: u64,
    /// Size of one KVM memory slot of the hotplug region.
    pub slot_size: u64,
    /// Number of KVM memory slots currently in use.
    pub memslots_in_use: u32,
    /// Longest single KVM memslot update so far, in microseconds: the
    /// longest a resize can have stalled guest memory accesses.
    pub longest_memslot_update_us: u64,
    /// Hotplug mechanism: `"virtio-mem"`, `"hv-balloon"` or `"none"`.
    pub hotplug_method: String,
    /// Balloon target size, if a balloon is configured.
    pub balloon_target_size: Option<u64>,
    /// Balloon size reported by the guest, if a balloon is configured.
    pub balloon_actual_size: Option<u64>,
    /// The Hyper-V Dynamic Memory device, with `hotplug_method` `"hv-balloon"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hv_balloon: Option<HvBalloonInfo>,
}

/// The Hyper-V Dynamic Memory device in `GET /vm/memory`. Sizes in bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HvBalloonInfo {
    /// Whether the guest's hv_vmbus is connected.
    pub vmbus_connected: bool,
    /// Whether the DM channel is open (hv_balloon bound).
    pub channel_open: bool,
    /// Handshake state: `"awaiting-version"`, `"awaiting-capabilities"` or `"ready"`.
    pub state: String,
    /// The agreed DM protocol version (`"2.0"`), once agreed.
    pub protocol_version: Option<String>,
    /// The guest's hot-add block, once it reported its capabilities.
    pub hot_add_alignment: Option<u64>,
    /// Target guest size, once set.
    pub target_size: Option<u64>,
    /// Guest memory now: boot + hot-added - ballooned - orphaned.
    pub guest_size: u64,
    /// Memory hot-added into the hotplug region.
    pub hot_added_size: u64,
    /// Memory the guest ballooned (and the host discarded).
    pub ballooned_size: u64,
    /// Memory an earlier driver instance ballooned and never gave back.
    pub orphaned_size: u64,
    /// Whether an operation is outstanding with the guest.
    pub busy: bool,
    /// `"enabled"`, `"paused"` or `"stopped"`.
    pub hot_add: String,
    /// The guest's last status report, if any (Linux sends the first ~45 s
    /// after the driver binds).
    pub last_status: Option<HvStatusReport>,
    /// Reported balloon pages that were refused, by reason (4 KiB pages).
    pub rejected_pages: HvRejectedPages,
    /// Guest messages (VMBus and DM) that were malformed or out of place.
    pub bad_guest_messages: u64,
    /// Times the guest broke a ring of the channel.
    pub ring_errors: u64,
}

/// The guest's last DM status report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HvStatusReport {
    /// Memory the guest has committed, in bytes.
    pub committed: u64,
    /// Memory available in the guest, in bytes.
    pub available: u64,
    /// Milliseconds since the report arrived.
    pub age_ms: u64,
}

/// Balloon pages the guest reported that were not accepted, in 4 KiB pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HvRejectedPages {
    /// Not guest RAM (MMIO holes, beyond RAM, memory not hot-added).
    pub outside_ram: u64,
    /// Already ballooned.
    pub already_ballooned: u64,
    /// More than the request asked for.
    pub exceeds_request: u64,
    /// No request was outstanding.
    pub unsolicited: u64,
}

/// Body of the response to `GET /vm/balloon`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonInfo {
    /// Balloon target size, in bytes.
    pub target_size: u64,
    /// Balloon size reported by the guest, in bytes.
    pub actual_size: u64,
    /// Whether the guest may deflate the balloon when it runs out of memory.
    pub deflate_on_oom: bool,
    /// Whether free page reporting is enabled.
    pub free_page_reporting: bool,
    /// Statistics polling interval in seconds; 0 when statistics are disabled.
    pub stats_period_s: u64,
    /// virtio feature bits negotiated with the guest driver.
    pub features_negotiated: u64,
}

/// Body of the response to `GET /vm/balloon/statistics`.
///
/// Every field is `null` when the guest has not reported it. Memory amounts are in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStatistics {
    /// Milliseconds since VM start at which the guest last reported statistics.
    #[serde(default)]
    pub last_update_ms: Option<u64>,
    /// Amount of memory swapped in.
    #[serde(default)]
    pub swap_in: Option<u64>,
    /// Amount of memory swapped out.
    #[serde(default)]
    pub swap_out: Option<u64>,
    /// Number of major page faults.
    #[serde(default)]
    pub major_faults: Option<u64>,
    /// Number of minor page faults.
    #[serde(default)]
    pub minor_faults: Option<u64>,
    /// Memory not used at all by the guest.
    #[serde(default)]
    pub free_memory: Option<u64>,
    /// Total memory available to the guest.
    #[serde(default)]
    pub total_memory: Option<u64>,
    /// Estimate of memory available for starting new applications.
    #[serde(default)]
    pub available_memory: Option<u64>,
    /// Memory that can be reclaimed quickly (disk caches).
    #[serde(default)]
    pub disk_caches: Option<u64>,
    /// Number of successful hugetlb page allocations.
    #[serde(default)]
    pub hugetlb_allocations: Option<u64>,
    /// Number of failed hugetlb page allocations.
    #[serde(default)]
    pub hugetlb_failures: Option<u64>,
}

/// One device's counters in `GET /vm/counters`: counter name → value.
pub type DeviceCounters = BTreeMap<String, u64>;

/// Body of the response to `GET /vm/counters` (and Cloud Hypervisor's
/// `GET /api/v1/vm.counters`): device name (`disk0`, `vsock`, `rng`,
/// `virtio-mem`, `balloon`, `hv-balloon`) → its counters, each counting
/// since the device was created. Only configured devices appear.
pub type VmCounters = BTreeMap<String, DeviceCounters>;

/// Body of every error response: `{"error": "<message>"}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Human-readable description of what went wrong.
    pub error: String,
}
