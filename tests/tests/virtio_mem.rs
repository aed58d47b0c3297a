//! virtio-mem with resizable memslots, driven through the REST API, against
//! the real Linux virtio_mem driver.

use std::time::Duration;

use e2e::*;
use serde_json::Value;

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const BOOT_MIB: u64 = 512;

/// Boots the interactive guest with 512 MiB + a 4 GiB hotplug region;
/// `memory_opts` are appended to `--memory`.
fn start(test: &str, memory_opts: &str, extra: &[&str]) -> Vm {
    start_interactive(
        test,
        &format!("size={BOOT_MIB}M,hotplug_size=4G{memory_opts}"),
        extra,
    )
}

fn memory(vm: &Vm) -> Value {
    vm.api_json("GET", "/vm/memory")
}

/// virtio-mem's counter `name` from `GET /vm/counters`, checked against
/// Cloud Hypervisor's `GET /api/v1/vm.counters` (the same data).
fn mem_counter(vm: &Vm, name: &str) -> u64 {
    let ours = vm.api_json("GET", "/vm/counters")["virtio-mem"][name].clone();
    let ch = vm.api_json("GET", "/api/v1/vm.counters")["virtio-mem"][name].clone();
    assert_eq!(ours, ch, "{name}: /vm/counters and vm.counters agree");
    ours.as_u64()
        .unwrap_or_else(|| panic!("virtio-mem counter {name}: {ours}"))
}

fn put_size(vm: &Vm, bytes: u64) -> (u16, String) {
    vm.api(
        "PUT",
        "/vm/memory",
        Some(&format!(r#"{{"requested_size": {bytes}}}"#)),
    )
}

#[test]
fn plug_one_gib_then_unplug_it_back_to_boot_size() {
    let mut vm = start("virtio-mem-resize", "", &[]);
    vm.wait_for("READY=1", BOOT_TIMEOUT);
    let before = memory(&vm);
    assert_eq!(before["boot_size"], BOOT_MIB * MIB);
    assert_eq!(before["hotplug_size"], 4 * GIB);
    assert_eq!(before["plugged_size"], 0);
    assert_eq!(before["memslots_in_use"], 0);
    assert_eq!(before["hotplug_method"], "virtio-mem");
    let slot_size = before["slot_size"].as_u64().unwrap();

    // Touch boot memory once, so that migrating pages into it later costs
    // the host nothing and RSS shows only what unplugging gives back.
    let boot_kib = ask_u64(&mut vm, "mem", "MEMTOTAL_KB");
    assert_eq!(fill(&mut vm, "warm", 200), 200);
    vm.ask("drop warm", "DROPPED", CONVERGE);

    // Grow by 1 GiB.
    let (status, body) = put_size(&vm, (BOOT_MIB * MIB) + GIB);
    assert_eq!(status, 204, "{body}");
    let grown_kib = wait_memtotal(&mut vm, "MemTotal to rise by 1 GiB", |k| {
        k >= boot_kib + GIB / 1024 - 32 * 1024
    });
    assert!(
        grown_kib <= boot_kib + GIB / 1024,
        "MemTotal rose by more than 1 GiB: {boot_kib} -> {grown_kib}"
    );
    let grown = poll("plugged_size to reach 1 GiB", CONVERGE, || {
        let m = memory(&vm);
        (m["plugged_size"] == GIB).then_some(m)
    });
    assert_eq!(grown["requested_size"], BOOT_MIB * MIB + GIB);
    // The counters saw exactly what the guest did.
    assert_eq!(mem_counter(&vm, "bytes_plugged"), GIB);
    assert_eq!(mem_counter(&vm, "bytes_unplugged"), 0);
    assert!(mem_counter(&vm, "plug_requests") >= 1);
    assert_eq!(mem_counter(&vm, "malformed_requests"), 0);
    // The driver took the NUMA node from ACPI (VIRTIO_MEM_F_ACPI_PXM, bit 0)
    // and agreed that unplugged memory is inaccessible (bit 1); the kernel
    // read the node from the SRAT, and the plugged memory sits in it.
    let features = vm.ask("vmemfeatures", "VIRTIO_MEM_FEATURES", CONVERGE);
    assert!(features.starts_with("11"), "virtio-mem features {features}");
    assert!(ask_u64(&mut vm, "dmesg SRAT:.Node.0.PXM.0", "DMESG_COUNT") >= 1);
    assert_eq!(
        ask_u64(&mut vm, "node0blocks", "NODE0_BLOCKS"),
        ask_u64(&mut vm, "blocks", "ONLINE_BLOCKS"),
        "every online memory block belongs to node 0"
    );
    assert_eq!(
        grown["memslots_in_use"],
        GIB / slot_size,
        "1 GiB plugged in whole slots"
    );

    // The guest uses it: 256 MiB kept, 512 MiB touched and freed again.
    let rss_plugged = vm.rss();
    assert_eq!(fill(&mut vm, "keep", 256), 256);
    assert_eq!(fill(&mut vm, "scratch", 512), 512);
    vm.ask("drop scratch", "DROPPED", CONVERGE);
    let rss_used = vm.rss();
    assert!(
        rss_used >= rss_plugged + 512 * MIB,
        "touching memory raises tidevm's RSS: {rss_plugged} -> {rss_used}"
    );

    // Back to boot size: the guest migrates what it holds and unplugs all.
    let (status, body) = put_size(&vm, BOOT_MIB * MIB);
    assert_eq!(status, 204, "{body}");
    let shrunk = poll("plugged_size to fall to 0", CONVERGE, || {
        let m = memory(&vm);
        (m["plugged_size"] == 0).then_some(m)
    });
    assert_eq!(
        shrunk["memslots_in_use"], 0,
        "no hotplug memslot stays mapped"
    );
    assert_eq!(shrunk["requested_size"], BOOT_MIB * MIB);
    assert_eq!(mem_counter(&vm, "bytes_plugged"), GIB);
    assert_eq!(mem_counter(&vm, "bytes_unplugged"), GIB);
    assert!(mem_counter(&vm, "unplug_requests") + mem_counter(&vm, "unplug_all_requests") >= 1);
    let shrunk_kib = wait_memtotal(&mut vm, "MemTotal to fall back", |k| k <= boot_kib);
    assert_eq!(shrunk_kib, boot_kib, "MemTotal back to its boot value");
    let rss_after = vm.rss();
    eprintln!(
        "RSS: plugged {} MiB, used {} MiB, after unplug {} MiB",
        rss_plugged / MIB,
        rss_used / MIB,
        rss_after / MIB
    );
    assert!(
        rss_after + 512 * MIB <= rss_used,
        "unplugging gives the host its memory back: RSS {} MiB -> {} MiB",
        rss_used / MIB,
        rss_after / MIB
    );
    // The guest still has its data.
    assert_eq!(fill(&mut vm, "check", 1), 1);

    let (status, _) = vm.api("PUT", "/vm/power-off", None);
    assert_eq!(status, 204);
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn bad_memory_requests_are_refused_and_change_nothing() {
    let mut vm = start("virtio-mem-bad-requests", "", &[]);
    vm.wait_for("READY=1", BOOT_TIMEOUT);
    let boot = BOOT_MIB * MIB;
    let before = memory(&vm);
    let cases: &[(&str, &str, Option<&str>, u16, &str)] = &[
        ("PUT", "/vm/memory", Some("{"), 400, "invalid JSON"),
        (
            "PUT",
            "/vm/memory",
            Some(r#"{"requested_size": 1, "x": 2}"#),
            400,
            "unknown field",
        ),
        (
            "PUT",
            "/vm/memory",
            Some(r#"{"requested_size": "1G"}"#),
            400,
            "invalid type",
        ),
        (
            "PUT",
            "/vm/memory",
            Some(r#"{"requested_size": -1}"#),
            400,
            "invalid",
        ),
        (
            "PUT",
            "/vm/memory",
            Some(&format!(r#"{{"requested_size": {}}}"#, boot + MIB)),
            400,
            "multiple of block_size",
        ),
        (
            "PUT",
            "/vm/memory",
            Some(&format!(r#"{{"requested_size": {}}}"#, boot / 2)),
            400,
            "below the boot memory size",
        ),
        (
            "PUT",
            "/vm/memory",
            Some(&format!(r#"{{"requested_size": {}}}"#, boot + 8 * GIB)),
            400,
            "above the maximum",
        ),
        ("GET", "/vm/memories", None, 404, ""),
        ("DELETE", "/vm/memory", None, 405, ""),
        ("GET", "/vm/balloon", None, 409, "no balloon"),
    ];
    for (method, path, body, status, message) in cases {
        let owned_body = body.map(str::to_string);
        let (got, text) = vm.api(method, path, owned_body.as_deref());
        assert_eq!(got, *status, "{method} {path} {body:?}: {text}");
        let json: Value =
            serde_json::from_str(&text).unwrap_or_else(|_| panic!("JSON error body: {text}"));
        let error = json["error"].as_str().expect("error field");
        assert!(
            error.contains(message),
            "{method} {path}: '{error}' lacks '{message}'"
        );
        assert_eq!(memory(&vm), before, "{method} {path} changed nothing");
    }
    // A guest that has not even booted yet still answers, and powers off.
    let info = vm.api_json("GET", "/vm/info");
    assert_eq!(info["state"], "Running");
    assert_eq!(info["config"]["memory"]["hotplug_size"], 4 * GIB);
    let (status, _) = vm.api("PUT", "/vm/power-off", None);
    assert_eq!(status, 204);
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn memory_resize_without_a_hotplug_region_is_a_conflict() {
    require_e2e();
    let work = work_dir("virtio-mem-none");
    let vm = Vm::start(
        &args(&[
            "--kernel",
            asset("vmlinux").to_str().unwrap(),
            "--memory",
            "512M",
            "--cmdline",
            "console=ttyS0 panic=0 quiet",
            "--serial",
            "off",
        ]),
        Some(work.join("api.sock")),
    );
    vm.wait_api(Duration::from_secs(30));
    let (status, body) = put_size(&vm, GIB);
    assert_eq!(status, 409, "{body}");
    assert!(body.contains("no resizable memory"), "{body}");
    let m = memory(&vm);
    assert_eq!(m["hotplug_method"], "none");
    assert_eq!(m["requested_size"], 512 * MIB);
    vm.api("PUT", "/vm/power-off", None);
}

#[test]
fn a_rebooted_guest_comes_back_with_nothing_plugged() {
    // Shared (memfd) backing: slots are file mappings, unplug punches holes.
    let mut vm = start(
        "virtio-mem-reboot",
        ",shared=on",
        &["--on-reboot", "restart"],
    );
    let (first, _) = vm.wait_for_from(0, "READY=1", BOOT_TIMEOUT);
    let boot_kib = ask_u64(&mut vm, "mem", "MEMTOTAL_KB");
    let (status, body) = put_size(&vm, BOOT_MIB * MIB + 512 * MIB);
    assert_eq!(status, 204, "{body}");
    wait_memtotal(&mut vm, "MemTotal to rise by 512 MiB", |k| {
        k >= boot_kib + 512 * 1024 - 32 * 1024
    });
    assert_eq!(memory(&vm)["plugged_size"], 512 * MIB);

    vm.send("reboot");
    vm.wait_for_from(first + 1, "READY=1", BOOT_TIMEOUT);
    let m = memory(&vm);
    assert_eq!(m["plugged_size"], 0);
    assert_eq!(m["memslots_in_use"], 0);
    assert_eq!(m["requested_size"], BOOT_MIB * MIB);
    assert_eq!(
        ask_u64(&mut vm, "mem", "MEMTOTAL_KB"),
        boot_kib,
        "the guest starts at boot size again"
    );
    // And it can grow again after the reboot.
    let (status, _) = put_size(&vm, BOOT_MIB * MIB + 256 * MIB);
    assert_eq!(status, 204);
    wait_memtotal(&mut vm, "MemTotal to rise by 256 MiB after reboot", |k| {
        k >= boot_kib + 256 * 1024 - 32 * 1024
    });

    let (status, _) = vm.api("PUT", "/vm/power-off", None);
    assert_eq!(status, 204);
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn five_grow_shrink_cycles_with_a_console_busy_guest_keep_its_data() {
    let mut vm = start("virtio-mem-cycles", "", &[]);
    vm.wait_for("READY=1", BOOT_TIMEOUT);
    let boot = BOOT_MIB * MIB;
    let boot_kib = ask_u64(&mut vm, "mem", "MEMTOTAL_KB");
    // 256 MiB of random data the guest holds throughout: every unplug has
    // to migrate whatever of it sits in plugged memory.
    let sum = vm.ask("rfill held 256", "RFILLED", CONVERGE);
    // A guest printing on its console all the time (each byte a VM exit,
    // a fork every 0.2 s) is the load under which unplugging used to stall
    // and reset guests.
    vm.ask("busy", "BUSY", CONVERGE);
    for cycle in 1..=5 {
        let (status, body) = put_size(&vm, boot + GIB);
        assert_eq!(status, 204, "{body}");
        let grown = wait_memtotal(&mut vm, &format!("cycle {cycle}: MemTotal +1 GiB"), |k| {
            k >= boot_kib + GIB / 1024
        });
        assert_eq!(
            grown,
            boot_kib + GIB / 1024,
            "cycle {cycle}: exactly +1 GiB"
        );
        assert_eq!(memory(&vm)["plugged_size"], GIB, "cycle {cycle}");

        let (status, body) = put_size(&vm, boot);
        assert_eq!(status, 204, "{body}");
        let m = poll(
            &format!("cycle {cycle}: plugged_size to fall to 0"),
            CONVERGE,
            || {
                let m = memory(&vm);
                (m["plugged_size"] == 0).then_some(m)
            },
        );
        assert_eq!(m["memslots_in_use"], 0, "cycle {cycle}");
        let shrunk = wait_memtotal(&mut vm, &format!("cycle {cycle}: MemTotal back"), |k| {
            k <= boot_kib
        });
        assert_eq!(shrunk, boot_kib, "cycle {cycle}: back to boot size");
        eprintln!(
            "cycle {cycle}: {:.1} s since start, longest memslot update {} us",
            vm.started.elapsed().as_secs_f64(),
            m["longest_memslot_update_us"]
        );
    }
    assert_eq!(vm.ask("sum held", "SUM", CONVERGE), sum, "held data intact");
    assert!(
        !vm.stderr().contains("triple fault"),
        "the guest never reset:\n{}",
        vm.stderr()
    );
    let (status, _) = vm.api("PUT", "/vm/power-off", None);
    assert_eq!(status, 204);
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
}
