//! virtio-balloon against the real Linux virtio_balloon driver: inflate and
//! deflate, statistics, free page reporting, and the one memory knob that
//! reaches below boot size.

use std::time::Duration;

use e2e::*;
use serde_json::Value;

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
const BOOT_MIB: u64 = 768;

fn start(test: &str, memory: &str, balloon: &str) -> Vm {
    let vm = start_interactive(test, memory, &["--balloon", balloon]);
    vm.wait_for("READY=1", BOOT_TIMEOUT);
    vm
}

fn balloon(vm: &Vm) -> Value {
    vm.api_json("GET", "/vm/balloon")
}

fn put(vm: &Vm, path: &str, body: String) {
    let (status, text) = vm.api("PUT", path, Some(&body));
    assert_eq!(status, 204, "PUT {path} {body}: {text}");
}

fn wait_actual(vm: &Vm, bytes: u64) {
    poll(
        &format!("balloon actual size to reach {bytes}"),
        CONVERGE,
        || (balloon(vm)["actual_size"] == bytes).then_some(()),
    );
}

fn power_off(mut vm: Vm) {
    put(&vm, "/vm/power-off", String::new());
    assert_eq!(vm.wait_exit(Duration::from_secs(60)).code(), Some(0));
}

#[test]
fn inflating_takes_memory_from_the_guest_and_gives_it_to_the_host() {
    let mut vm = start("balloon-inflate", &format!("{BOOT_MIB}M"), "size=0");
    let info = balloon(&vm);
    assert_eq!(info["target_size"], 0);
    assert_eq!(info["deflate_on_oom"], false);
    let total_kib = ask_u64(&mut vm, "mem", "MEMTOTAL_KB");

    // The guest dirties most of its memory, then frees it: the host keeps
    // those pages resident until something gives them back.
    assert_eq!(fill(&mut vm, "dirt", 550), 550);
    vm.ask("drop dirt", "DROPPED", CONVERGE);
    let rss_dirty = vm.rss();

    put(&vm, "/vm/balloon", format!(r#"{{"size": {}}}"#, 256 * MIB));
    wait_actual(&vm, 256 * MIB);
    let inflated_kib = ask_u64(&mut vm, "mem", "MEMTOTAL_KB");
    assert_eq!(
        total_kib - inflated_kib,
        256 * 1024,
        "MemTotal falls by exactly 256 MiB"
    );
    let rss_inflated = vm.rss();
    eprintln!(
        "RSS dirty {} MiB, inflated {} MiB",
        rss_dirty / MIB,
        rss_inflated / MIB
    );
    assert!(
        rss_inflated + 200 * MIB <= rss_dirty,
        "inflated pages are discarded on the host: RSS {} -> {} MiB",
        rss_dirty / MIB,
        rss_inflated / MIB
    );
    let mem = vm.api_json("GET", "/vm/memory");
    assert_eq!(mem["balloon_target_size"], 256 * MIB);
    assert_eq!(mem["balloon_actual_size"], 256 * MIB);
    assert_eq!(mem["requested_size"], BOOT_MIB * MIB - 256 * MIB);

    put(&vm, "/vm/balloon", r#"{"size": 0}"#.to_string());
    wait_actual(&vm, 0);
    assert_eq!(
        ask_u64(&mut vm, "mem", "MEMTOTAL_KB"),
        total_kib,
        "deflating gives MemTotal back"
    );
    // The returned pages work.
    assert_eq!(fill(&mut vm, "again", 300), 300);

    // Bad balloon requests change nothing.
    let before = balloon(&vm);
    for (body, status) in [
        (r#"{"size": 4097}"#.to_string(), 400),
        (format!(r#"{{"size": {}}}"#, 2 * BOOT_MIB * MIB), 400),
        (r#"{"amount": 1}"#.to_string(), 400),
        ("[]".to_string(), 400),
    ] {
        let (got, text) = vm.api("PUT", "/vm/balloon", Some(&body));
        assert_eq!(got, status, "{body}: {text}");
        assert!(serde_json::from_str::<Value>(&text).unwrap()["error"].is_string());
        assert_eq!(balloon(&vm), before, "{body} changed nothing");
    }
    let (status, _) = vm.api("GET", "/vm/balloon/statistics", None);
    assert_eq!(status, 409, "statistics are off");
    power_off(vm);
}

#[test]
fn statistics_arrive_and_follow_guest_allocations() {
    let mut vm = start(
        "balloon-stats",
        &format!("{BOOT_MIB}M"),
        "size=0,stats_period=1",
    );
    let stats = poll("first statistics", CONVERGE, || {
        let (status, body) = vm.api("GET", "/vm/balloon/statistics", None);
        (status == 200).then(|| serde_json::from_str::<Value>(&body).unwrap())
    });
    let total = stats["total_memory"].as_u64().expect("total_memory");
    let free_before = stats["free_memory"].as_u64().expect("free_memory");
    assert!(
        total > 600 * MIB && total <= BOOT_MIB * MIB,
        "total_memory {total}"
    );
    let first_update = stats["last_update_ms"].as_u64().unwrap();

    assert_eq!(fill(&mut vm, "stats", 300), 300);
    let after = poll(
        "statistics to show 300 MiB less free memory",
        CONVERGE,
        || {
            let s = vm.api_json("GET", "/vm/balloon/statistics");
            let free = s["free_memory"].as_u64()?;
            (free + 250 * MIB <= free_before).then_some(s)
        },
    );
    assert!(
        after["last_update_ms"].as_u64().unwrap() > first_update,
        "the update time moves"
    );
    for key in [
        "swap_in",
        "major_faults",
        "minor_faults",
        "available_memory",
        "disk_caches",
    ] {
        assert!(after[key].is_u64(), "{key} reported: {after}");
    }
    power_off(vm);
}

#[test]
fn free_page_reporting_returns_freed_memory_without_an_api_call() {
    let mut vm = start(
        "balloon-reporting",
        &format!("{BOOT_MIB}M"),
        "size=0,free_page_reporting=on",
    );
    assert_eq!(fill(&mut vm, "big", 500), 500);
    // Let any reporting of boot-time free memory settle first.
    std::thread::sleep(Duration::from_secs(5));
    let rss_full = vm.rss();
    vm.ask("drop big", "DROPPED", CONVERGE);
    let rss_low = poll(
        "RSS to fall after the guest freed 500 MiB",
        CONVERGE,
        || {
            let rss = vm.rss();
            (rss + 300 * MIB <= rss_full).then_some(rss)
        },
    );
    eprintln!("RSS {} MiB -> {} MiB", rss_full / MIB, rss_low / MIB);
    // The reported pages come back when the guest uses them again.
    assert_eq!(fill(&mut vm, "again", 400), 400);
    power_off(vm);
}

#[test]
fn one_memory_knob_shrinks_below_boot_and_grows_above_it() {
    let mut vm = start(
        "balloon-one-knob",
        &format!("size={BOOT_MIB}M,hotplug_size=2G"),
        "size=0",
    );
    let boot = BOOT_MIB * MIB;
    let total_kib = ask_u64(&mut vm, "mem", "MEMTOTAL_KB");

    // Below boot size: the balloon inflates.
    put(
        &vm,
        "/vm/memory",
        format!(r#"{{"requested_size": {}}}"#, boot - 256 * MIB),
    );
    wait_actual(&vm, 256 * MIB);
    let m = vm.api_json("GET", "/vm/memory");
    assert_eq!(m["requested_size"], boot - 256 * MIB);
    assert_eq!(m["plugged_size"], 0);
    assert_eq!(
        ask_u64(&mut vm, "mem", "MEMTOTAL_KB"),
        total_kib - 256 * 1024
    );

    // Above boot size: the balloon deflates and virtio-mem plugs.
    put(
        &vm,
        "/vm/memory",
        format!(r#"{{"requested_size": {}}}"#, boot + 512 * MIB),
    );
    wait_actual(&vm, 0);
    let m = poll("512 MiB plugged", CONVERGE, || {
        let m = vm.api_json("GET", "/vm/memory");
        (m["plugged_size"] == 512 * MIB).then_some(m)
    });
    assert_eq!(m["balloon_target_size"], 0);
    assert_eq!(m["requested_size"], boot + 512 * MIB);
    poll("MemTotal at boot + 512 MiB", CONVERGE, || {
        let kib = ask_u64(&mut vm, "mem", "MEMTOTAL_KB");
        (kib + 32 * 1024 >= total_kib + 512 * 1024).then_some(())
    });

    // Back to boot size: virtio-mem unplugs, the balloon stays empty.
    put(
        &vm,
        "/vm/memory",
        format!(r#"{{"requested_size": {boot}}}"#),
    );
    poll("plugged memory to go", CONVERGE, || {
        (vm.api_json("GET", "/vm/memory")["plugged_size"] == 0).then_some(())
    });
    assert_eq!(balloon(&vm)["actual_size"], 0);
    assert_eq!(ask_u64(&mut vm, "mem", "MEMTOTAL_KB"), total_kib);

    // A request far below what the guest can give answers at once; GET
    // shows how far the guest got.
    put(
        &vm,
        "/vm/memory",
        format!(r#"{{"requested_size": {}}}"#, 32 * MIB),
    );
    std::thread::sleep(Duration::from_secs(20));
    let m = vm.api_json("GET", "/vm/memory");
    let actual = m["balloon_actual_size"].as_u64().unwrap();
    assert_eq!(m["balloon_target_size"], boot - 32 * MIB);
    assert!(
        actual > 0 && actual < boot - 32 * MIB,
        "the guest gave some but not all: {actual}"
    );
    // And it recovers when asked for its memory back.
    put(
        &vm,
        "/vm/memory",
        format!(r#"{{"requested_size": {boot}}}"#),
    );
    wait_actual(&vm, 0);
    assert_eq!(ask_u64(&mut vm, "mem", "MEMTOTAL_KB"), total_kib);
    power_off(vm);
}
