//! The Cloud Hypervisor API (v1): tidevm started with only `--api-socket`,
//! the VM created and booted over the API, resized with `vm.resize`, shut
//! down with `vm.shutdown` and tidevm ended with `vmm.shutdown`.

use std::time::Duration;

use e2e::*;
use serde_json::Value;

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

fn json(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

#[test]
fn create_boot_resize_shutdown_over_the_ch_api() {
    require_e2e();
    let work = work_dir("ch-api");
    let initrd = initramfs(&work, INTERACTIVE);
    let mut vm = Vm::start(&[], Some(work.join("api.sock")));
    vm.wait_api(Duration::from_secs(30));

    let (status, body) = vm.api("GET", "/api/v1/vmm.ping", None);
    assert_eq!(status, 200, "{body}");
    assert!(json(&body)["version"].is_string(), "{body}");
    let (status, body) = vm.api("GET", "/api/v1/vm.info", None);
    assert_eq!(status, 404, "{body}");

    let config = serde_json::json!({
        "payload": {
            "kernel": asset("vmlinux"),
            "initramfs": initrd,
            "cmdline": TEST_CMDLINE,
        },
        "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
        "memory": {
            "size": 512 * MIB,
            "hotplug_size": 2 * GIB,
            "hotplug_method": "VirtioMem",
        },
        "serial": {"mode": "Tty"},
        "console": {"mode": "Off"},
    });
    // A field tidevm lacks is refused, naming it, and nothing is created.
    let mut with_net = config.clone();
    with_net["net"] = serde_json::json!([{"tap": "tap0"}]);
    let (status, body) = vm.api("PUT", "/api/v1/vm.create", Some(&with_net.to_string()));
    assert_eq!(status, 400, "{body}");
    assert!(
        json(&body)["error"].as_str().unwrap().starts_with("net"),
        "{body}"
    );
    let (status, body) = vm.api("PUT", "/api/v1/vm.create", Some("{not json"));
    assert_eq!(status, 400, "{body}");
    assert_eq!(vm.api("GET", "/api/v1/vm.info", None).0, 404);

    let (status, body) = vm.api("PUT", "/api/v1/vm.create", Some(&config.to_string()));
    assert_eq!(status, 204, "{body}");
    let info = json(&vm.api("GET", "/api/v1/vm.info", None).1);
    assert_eq!(info["state"], "Created");
    assert_eq!(info["config"]["cpus"]["boot_vcpus"], 2);

    let (status, body) = vm.api("PUT", "/api/v1/vm.boot", None);
    assert_eq!(status, 204, "{body}");
    vm.wait_for("READY=1", BOOT_TIMEOUT);
    let boot_kib = ask_u64(&mut vm, "mem", "MEMTOTAL_KB");

    let info = json(&vm.api("GET", "/api/v1/vm.info", None).1);
    assert_eq!(info["state"], "Running");
    assert_eq!(info["memory_actual_size"], 512 * MIB);

    // vCPUs cannot change; a refused resize changes nothing.
    let (status, body) = vm.api("PUT", "/api/v1/vm.resize", Some(r#"{"desired_vcpus": 4}"#));
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("desired_vcpus"), "{body}");
    let (status, body) = vm.api(
        "PUT",
        "/api/v1/vm.resize",
        Some(&format!(r#"{{"desired_ram": {}}}"#, 512 * MIB + 1)),
    );
    assert!((400..500).contains(&status), "{status} {body}");
    assert_eq!(
        vm.api_json("GET", "/vm/memory")["requested_size"],
        512 * MIB
    );

    let (status, body) = vm.api(
        "PUT",
        "/api/v1/vm.resize",
        Some(&format!(r#"{{"desired_ram": {GIB}, "desired_vcpus": 2}}"#)),
    );
    assert_eq!(status, 204, "{body}");
    let grown = wait_memtotal(&mut vm, "MemTotal to grow by 512 MiB", |kib| {
        kib >= boot_kib + 512 * 1024 - 32 * 1024
    });
    assert!(grown <= boot_kib + 512 * 1024, "{boot_kib} -> {grown}");
    let actual = poll("memory_actual_size to reach 1 GiB", CONVERGE, || {
        let info = json(&vm.api("GET", "/api/v1/vm.info", None).1);
        (info["memory_actual_size"] == GIB).then_some(info)
    });
    assert_eq!(actual["state"], "Running");

    // vm.reboot builds the VM again: boot memory only, the same socket.
    let (status, body) = vm.api("PUT", "/api/v1/vm.power-button", None);
    assert_eq!(status, 409, "{body}");
    let from = vm.line_count();
    let (status, body) = vm.api("PUT", "/api/v1/vm.reboot", None);
    assert_eq!(status, 204, "{body}");
    vm.wait_for_from(from, "READY=1", BOOT_TIMEOUT);
    assert_eq!(ask_u64(&mut vm, "mem", "MEMTOTAL_KB"), boot_kib);
    let info = json(&vm.api("GET", "/api/v1/vm.info", None).1);
    assert_eq!(info["memory_actual_size"], 512 * MIB, "{info}");

    let (status, body) = vm.api("PUT", "/api/v1/vm.shutdown", None);
    assert_eq!(status, 204, "{body}");
    let info = poll("vm.info to say Shutdown", Duration::from_secs(30), || {
        let info = json(&vm.api("GET", "/api/v1/vm.info", None).1);
        (info["state"] == "Shutdown").then_some(info)
    });
    assert_eq!(info["config"]["memory"]["size"], 512 * MIB);
    let (status, body) = vm.api("PUT", "/api/v1/vm.resize", Some(r#"{"desired_ram": 0}"#));
    assert_eq!(status, 409, "{body}");
    let (status, body) = vm.api("PUT", "/api/v1/vm.delete", None);
    assert_eq!(status, 204, "{body}");
    assert_eq!(vm.api("GET", "/api/v1/vm.info", None).0, 404);

    let (status, body) = vm.api("PUT", "/api/v1/vmm.shutdown", None);
    assert_eq!(status, 204, "{body}");
    let exit = vm.wait_exit(Duration::from_secs(30));
    assert!(exit.success(), "tidevm exited with {exit:?}");
}
