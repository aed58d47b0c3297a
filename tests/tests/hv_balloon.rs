//! Hyper-V Dynamic Memory over tidevm's VMBus host, driven through the REST
//! API, against the real Linux hv_vmbus and hv_balloon drivers.

use std::time::Duration;

use e2e::*;
use serde_json::Value;

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// Boot memory: the guest keeps a balloon floor of 104 MiB + 1/8 of its
/// memory, so 1 GiB leaves room to balloon 512 MiB.
const BOOT_MIB: u64 = 1024;
const PAGES_512M: u64 = 512 * MIB / 4096;

/// Boots the interactive guest with 1 GiB + a 4 GiB hotplug region served
/// by the Dynamic Memory device.
fn start(test: &str, extra: &[&str]) -> Vm {
    start_interactive(
        test,
        &format!("size={BOOT_MIB}M,hotplug_size=4G,hotplug_method=hv-balloon"),
        extra,
    )
}

fn memory(vm: &Vm) -> Value {
    vm.api_json("GET", "/vm/memory")
}

fn put_size(vm: &Vm, bytes: u64) {
    let (status, body) = vm.api(
        "PUT",
        "/vm/memory",
        Some(&format!(r#"{{"requested_size": {bytes}}}"#)),
    );
    assert_eq!(status, 204, "PUT /vm/memory {bytes}: {body}");
}

/// Waits until `GET /vm/memory`'s `hv_balloon` object satisfies `ok`.
fn wait_dm(vm: &Vm, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    poll(what, CONVERGE, || {
        let m = memory(vm);
        ok(&m["hv_balloon"]).then_some(m)
    })
}

/// Waits for the driver to finish its handshake `times` times in all.
fn wait_bound(vm: &mut Vm, times: u64) {
    poll("hv_balloon to bind", CONVERGE, || {
        let n = ask_u64(
            vm,
            "dmesg hv_balloon:.Using.Dynamic.Memory.protocol.version.2.0",
            "DMESG_COUNT",
        );
        (n >= times).then_some(())
    });
    wait_dm(vm, "the DM handshake to complete", |d| {
        d["state"] == "ready" && d["channel_open"] == true
    });
}

fn hvstat(vm: &mut Vm, key: &str) -> u64 {
    ask_u64(vm, &format!("hvstat {key}"), "HVSTAT")
}

#[test]
fn balloon_unballoon_hot_add_and_reload_against_hv_balloon() {
    let mut vm = start("hv-balloon", &[]);
    vm.wait_for("READY=1", BOOT_TIMEOUT);
    let boot = BOOT_MIB * MIB;

    // The platform and the driver.
    wait_bound(&mut vm, 1);
    assert_eq!(
        ask_u64(&mut vm, "dmesg hv_vmbus:.Vmbus.version", "DMESG_COUNT"),
        1
    );
    assert_eq!(
        ask_u64(
            &mut vm,
            "dmesg Hypervisor.detected:.Microsoft.Hyper-V",
            "DMESG_COUNT"
        ),
        1
    );
    let m = memory(&vm);
    assert_eq!(m["hotplug_method"], "hv-balloon");
    assert_eq!(m["requested_size"], boot);
    assert_eq!(m["memslots_in_use"], 0);
    let dm = &m["hv_balloon"];
    assert_eq!(dm["protocol_version"], "2.0");
    assert_eq!(dm["vmbus_connected"], true);
    assert_eq!(dm["hot_add_alignment"], 128 * MIB);
    assert_eq!(dm["guest_size"], boot);
    assert_eq!(dm["bad_guest_messages"], 0);

    // Touch the guest's free memory, so that RSS shows what ballooning
    // gives back.
    let boot_kib = ask_u64(&mut vm, "mem", "MEMTOTAL_KB");
    assert_eq!(fill(&mut vm, "warm", 700), 700);
    vm.ask("drop warm", "DROPPED", CONVERGE);
    let rss_full = vm.rss();

    // Balloon 512 MiB.
    put_size(&vm, boot - 512 * MIB);
    let ballooned_kib = wait_memtotal(&mut vm, "MemTotal to fall by 512 MiB", |k| {
        k <= boot_kib - 512 * 1024
    });
    assert_eq!(ballooned_kib, boot_kib - 512 * 1024, "exactly 512 MiB");
    let m = wait_dm(&vm, "ballooned_size to reach 512 MiB", |d| {
        d["ballooned_size"] == 512 * MIB && d["busy"] == false
    });
    assert_eq!(m["hv_balloon"]["guest_size"], boot - 512 * MIB);
    assert_eq!(
        hvstat(&mut vm, "pages_ballooned"),
        PAGES_512M,
        "debugfs agrees"
    );
    let rss_ballooned = vm.rss();
    eprintln!(
        "RSS: touched {} MiB, ballooned {} MiB (MemTotal {boot_kib} -> {ballooned_kib} KiB)",
        rss_full / MIB,
        rss_ballooned / MIB
    );
    assert!(
        rss_full.saturating_sub(rss_ballooned) >= 512 * MIB * 9 / 10,
        "ballooning 512 MiB gives the host >= 90 % of it back: RSS {} -> {} MiB",
        rss_full / MIB,
        rss_ballooned / MIB
    );

    // Unballoon.
    put_size(&vm, boot);
    let back = wait_memtotal(&mut vm, "MemTotal to come back", |k| k >= boot_kib);
    assert_eq!(back, boot_kib);
    wait_dm(&vm, "ballooned_size to fall to 0", |d| {
        d["ballooned_size"] == 0 && d["busy"] == false
    });
    assert_eq!(hvstat(&mut vm, "pages_ballooned"), 0);

    // Hot-add 1 GiB.
    let blocks = ask_u64(&mut vm, "blocks", "ONLINE_BLOCKS");
    put_size(&vm, boot + GIB);
    let grown = wait_memtotal(&mut vm, "MemTotal to rise by 1 GiB", |k| {
        k >= boot_kib + GIB / 1024
    });
    assert_eq!(grown, boot_kib + GIB / 1024, "exactly +1 GiB");
    assert_eq!(
        ask_u64(&mut vm, "blocks", "ONLINE_BLOCKS"),
        blocks + 8,
        "eight new 128 MiB blocks, online"
    );
    let m = wait_dm(&vm, "hot_added_size to reach 1 GiB", |d| {
        d["hot_added_size"] == GIB && d["busy"] == false
    });
    assert_eq!(m["plugged_size"], GIB);
    assert_eq!(m["memslots_in_use"], GIB / m["slot_size"].as_u64().unwrap());
    assert_eq!(hvstat(&mut vm, "pages_added"), GIB / 4096, "debugfs agrees");
    assert_eq!(hvstat(&mut vm, "pages_onlined"), GIB / 4096);

    // The driver goes away and comes back: a new channel, same memory.
    let how = vm.ask("hvreload", "HVRELOAD", CONVERGE);
    eprintln!("hv_balloon reloaded by {how}");
    wait_bound(&mut vm, 2);
    let m = memory(&vm);
    assert_eq!(m["hv_balloon"]["hot_added_size"], GIB);
    assert_eq!(m["hv_balloon"]["guest_size"], boot + GIB);

    // Shrinking after a hot-add balloons from anywhere (hot-added memory
    // is in a kernel zone, where hv_balloon allocates), and RSS falls.
    assert_eq!(fill(&mut vm, "warm", 1000), 1000);
    vm.ask("drop warm", "DROPPED", CONVERGE);
    let rss_full = vm.rss();
    put_size(&vm, boot + GIB - 512 * MIB);
    wait_memtotal(&mut vm, "MemTotal to fall by 512 MiB after hot-add", |k| {
        k <= boot_kib + GIB / 1024 - 512 * 1024
    });
    wait_dm(&vm, "ballooned_size to reach 512 MiB again", |d| {
        d["ballooned_size"] == 512 * MIB && d["busy"] == false
    });
    let rss_ballooned = vm.rss();
    eprintln!(
        "RSS after hot-add: touched {} MiB, ballooned {} MiB",
        rss_full / MIB,
        rss_ballooned / MIB
    );
    assert!(
        rss_full.saturating_sub(rss_ballooned) >= 512 * MIB * 9 / 10,
        "RSS {} -> {} MiB",
        rss_full / MIB,
        rss_ballooned / MIB
    );
    assert_eq!(memory(&vm)["hv_balloon"]["bad_guest_messages"], 0);
    assert_eq!(memory(&vm)["hv_balloon"]["ring_errors"], 0);

    let (status, _) = vm.api("PUT", "/vm/power-off", None);
    assert_eq!(status, 204);
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn a_rebooted_hv_balloon_guest_comes_back_at_boot_size() {
    let mut vm = start("hv-balloon-reboot", &["--on-reboot", "restart"]);
    let (first, _) = vm.wait_for_from(0, "READY=1", BOOT_TIMEOUT);
    let boot = BOOT_MIB * MIB;
    wait_bound(&mut vm, 1);
    let boot_kib = ask_u64(&mut vm, "mem", "MEMTOTAL_KB");
    put_size(&vm, boot + 512 * MIB);
    wait_memtotal(&mut vm, "MemTotal to rise by 512 MiB", |k| {
        k >= boot_kib + 512 * 1024
    });
    assert_eq!(memory(&vm)["memslots_in_use"], 4);
    // Balloon 256 MiB too, so that the reboot has both to forget.
    put_size(&vm, boot + 256 * MIB);
    wait_dm(&vm, "ballooned_size to reach 256 MiB", |d| {
        d["ballooned_size"] == 256 * MIB && d["busy"] == false
    });

    vm.send("reboot");
    vm.wait_for_from(first + 1, "READY=1", BOOT_TIMEOUT);
    let m = memory(&vm);
    assert_eq!(m["plugged_size"], 0);
    assert_eq!(m["memslots_in_use"], 0);
    assert_eq!(m["requested_size"], boot);
    assert_eq!(m["hv_balloon"]["hot_added_size"], 0);
    assert_eq!(m["hv_balloon"]["ballooned_size"], 0);
    assert_eq!(
        ask_u64(&mut vm, "mem", "MEMTOTAL_KB"),
        boot_kib,
        "the guest starts at boot size again"
    );
    // The new driver binds, and the guest grows again.
    wait_bound(&mut vm, 1);
    put_size(&vm, boot + 256 * MIB);
    wait_memtotal(&mut vm, "MemTotal to rise by 256 MiB after reboot", |k| {
        k >= boot_kib + 256 * 1024
    });

    let (status, _) = vm.api("PUT", "/vm/power-off", None);
    assert_eq!(status, 204);
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
}
