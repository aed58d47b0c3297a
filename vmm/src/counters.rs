//! Counters of what the guest did, per device: `GET /vm/counters` and
//! Cloud Hypervisor's `vm.counters`. The devices keep them; this module
//! only names them. Device names follow Cloud Hypervisor's style
//! (`disk0`, `disk1`, ..., `vsock`, `rng`, `virtio-mem`, `balloon`,
//! `hv-balloon`); counter names are the devices' own field names.

use std::sync::{Arc, Mutex};

use api_server::types::{DeviceCounters, VmCounters};
use devices::hyperv::device::DynamicMemoryReport;
use devices::virtio::balloon::BalloonMetrics;
use devices::virtio::block::{BlockMetrics, BlockMetricsSnapshot};
use devices::virtio::mem::MemMetrics;
use devices::virtio::rng::{Rng, RngMetrics};
use devices::virtio::vsock::{Vsock, VsockMetrics};
use devices::virtio::VirtioInterrupt;

use crate::resize::MemoryDevices;

/// The devices besides the memory devices whose counters the API reports.
#[derive(Default)]
pub struct CountedDevices {
    /// Each virtio-blk device's counters, in command-line order (`disk0`, ...).
    pub disks: Vec<Arc<BlockMetrics>>,
    /// The vsock device.
    pub vsock: Option<Arc<Mutex<Vsock>>>,
    /// The entropy device.
    pub rng: Option<Arc<Mutex<Rng>>>,
    /// Every virtio device's interrupt.
    pub virtio_interrupts: Vec<Arc<VirtioInterrupt>>,
}

/// A [`DeviceCounters`] map of the named fields of `$m`, keyed by field name.
macro_rules! named {
    ($m:expr; $($field:ident),+ $(,)?) => {{
        let m = $m;
        DeviceCounters::from([$((stringify!($field).to_string(), m.$field)),+])
    }};
}

/// virtio-mem: requests by type and by answer, bytes plugged and unplugged,
/// malformed requests.
pub fn virtio_mem_counters(m: &MemMetrics) -> DeviceCounters {
    named!(m; plug_requests, unplug_requests, unplug_all_requests, state_requests,
        nacks, busy, errors, backend_failures, bytes_plugged, bytes_unplugged,
        malformed_requests)
}

/// virtio-balloon: pages inflated and deflated, discards, bytes reported
/// free, PFNs refused (outside RAM, repeated, unknown), malformed requests.
pub fn balloon_counters(m: &BalloonMetrics) -> DeviceCounters {
    named!(m; inflated_pages, deflated_pages, discard_calls, discard_errors,
        out_of_range_pfns, repeated_pfns, unknown_deflate_pfns, reported_bytes,
        malformed_requests, stats_updates)
}

/// virtio-blk: requests by type, bytes read and written, failures.
pub fn block_counters(m: &BlockMetricsSnapshot) -> DeviceCounters {
    named!(m; requests, reads, writes, flushes, read_bytes, write_bytes, failures,
        invalid_requests)
}

/// vsock: connections, refusals, resets, malformed packets, bytes moved,
/// packets, driver notifications and interrupts; and what waits now
/// (open connections, those out of guest credit or with packets queued,
/// RX buffers offered and TX chains queued by the driver, not yet used).
pub fn vsock_counters(m: &VsockMetrics) -> DeviceCounters {
    named!(m; host_connects, guest_connects, refused, closed, lone_resets,
        dropped_resets, malformed_packets, bytes_to_guest, bytes_to_host, rx_packets,
        tx_packets, queue_notifications, interrupts, open_connections,
        connections_waiting_for_credit, connections_with_rx_work, rx_buffers_offered,
        tx_chains_queued, interrupt_unacknowledged)
}

/// virtio-rng: requests, bytes, failures.
pub fn rng_counters(m: &RngMetrics) -> DeviceCounters {
    named!(m; requests, bytes, failures)
}

/// The Hyper-V Dynamic Memory device: the DM protocol's counters, the
/// device's own, and VMBus channel management's (prefixed `vmbus_`).
pub fn hv_balloon_counters(r: &DynamicMemoryReport) -> DeviceCounters {
    let mut c = named!(&r.dm.counters; malformed_messages, unexpected_messages,
        versions_refused, implicit_resets, status_reports, balloon_requests,
        ballooned_pages, rejected_outside_ram, rejected_already_ballooned,
        rejected_exceeds_request, rejected_unsolicited, unballoon_messages,
        unballooned_pages, hot_add_requests, hot_added_pages, hot_add_failures,
        hot_add_anomalies, encode_errors);
    c.extend(
        named!(&r.metrics; messages_received, guest_signals, packets_received,
        foreign_packets, bad_dm_messages, packets_sent, messages_dropped, ring_errors,
        discard_calls, discard_errors, discarded_bytes, hot_add_maps,
        hot_add_map_failures, hot_add_releases),
    );
    let v = &r.vmbus;
    c.extend([
        ("vmbus_messages".to_string(), v.messages),
        ("vmbus_malformed".to_string(), v.malformed),
        ("vmbus_ignored".to_string(), v.ignored),
        ("vmbus_refused".to_string(), v.refused),
    ]);
    c
}

/// Every configured device's counters, by device name.
pub fn collect(memory: &MemoryDevices, counted: &CountedDevices) -> VmCounters {
    let mut all = VmCounters::new();
    for (i, disk) in counted.disks.iter().enumerate() {
        all.insert(format!("disk{i}"), block_counters(&disk.snapshot()));
    }
    if let Some(vsock) = &counted.vsock {
        let m = vsock.lock().expect("vsock").metrics();
        all.insert("vsock".to_string(), vsock_counters(&m));
    }
    if let Some(rng) = &counted.rng {
        let m = rng.lock().expect("rng").metrics();
        all.insert("rng".to_string(), rng_counters(&m));
    }
    if let Some(mem) = &memory.virtio_mem {
        let m = mem.lock().expect("virtio-mem").metrics();
        all.insert("virtio-mem".to_string(), virtio_mem_counters(&m));
    }
    if let Some(balloon) = &memory.balloon {
        let m = balloon.lock().expect("balloon").metrics();
        all.insert("balloon".to_string(), balloon_counters(&m));
    }
    if let Some(dm) = &memory.hv_balloon {
        let r = dm.lock().expect("hv-balloon").report();
        all.insert("hv-balloon".to_string(), hv_balloon_counters(&r));
    }
    if !counted.virtio_interrupts.is_empty() {
        let reraised = counted.virtio_interrupts.iter().map(|i| i.reraised()).sum();
        all.insert(
            "virtio-mmio".to_string(),
            DeviceCounters::from([("interrupts_reraised".to_string(), reraised)]),
        );
    }
    all
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use devices::virtio::balloon::{Balloon, BalloonConfig};
    use devices::virtio::block::Block;

    use super::*;

    #[test]
    fn counters_carry_the_devices_values_under_their_names() {
        let m = MemMetrics {
            plug_requests: 3,
            bytes_plugged: 1 << 30,
            bytes_unplugged: 1 << 29,
            malformed_requests: 2,
            ..Default::default()
        };
        let c = virtio_mem_counters(&m);
        assert_eq!(c["plug_requests"], 3);
        assert_eq!(c["bytes_plugged"], 1 << 30);
        assert_eq!(c["bytes_unplugged"], 1 << 29);
        assert_eq!(c["malformed_requests"], 2);
        assert_eq!(c.len(), 11);
        let b = balloon_counters(&BalloonMetrics {
            inflated_pages: 7,
            out_of_range_pfns: 1,
            ..Default::default()
        });
        assert_eq!((b["inflated_pages"], b["out_of_range_pfns"]), (7, 1));
        let v = vsock_counters(&VsockMetrics {
            malformed_packets: 4,
            ..Default::default()
        });
        assert_eq!(v["malformed_packets"], 4);
    }

    #[test]
    fn collect_names_each_configured_device() {
        let dir = std::env::temp_dir().join(format!("tidevm-counters-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("disk.img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let disks: Vec<_> = (0..2)
            .map(|_| Block::new(&path, false).unwrap().metrics())
            .collect();
        disks[1].write_bytes.fetch_add(512, Ordering::Relaxed);
        let balloon = Balloon::new(BalloonConfig {
            target_size: 0,
            deflate_on_oom: false,
            free_page_reporting: false,
            stats_period_s: 0,
        })
        .unwrap();
        let memory = MemoryDevices {
            balloon: Some(Arc::new(Mutex::new(balloon))),
            ..Default::default()
        };
        let counted = CountedDevices {
            disks,
            ..Default::default()
        };
        let all = collect(&memory, &counted);
        assert_eq!(
            all.keys().map(String::as_str).collect::<Vec<_>>(),
            ["balloon", "disk0", "disk1"]
        );
        assert_eq!(all["disk0"]["write_bytes"], 0);
        assert_eq!(all["disk1"]["write_bytes"], 512);
        assert_eq!(all["balloon"]["inflated_pages"], 0);
        let json = serde_json::to_value(&all).unwrap();
        assert_eq!(json["disk1"]["write_bytes"], 512);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
