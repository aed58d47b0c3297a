//! Target `ch_api_body`: the JSON bodies of the Cloud Hypervisor API
//! (`vm.create`, `vm.resize`, `vm.add-vsock`) as the API thread parses them
//! (`api_server::parse_request`), and a `vm.create` config as the VMM maps
//! it onto tidevm's (`vmm::ch_config::ch_config_to_vm_config`, which also
//! checks that the files it names are readable regular files).
//!
//! Input: one selector byte (the endpoint), then the body.
//!
//! Invariants checked:
//! - no panic;
//! - a refused body is a 400 with a JSON `{"error": "..."}` body;
//! - an accepted body re-encodes to JSON that parses back to the same request;
//! - a config `ch_config_to_vm_config` accepts has 1 to `MAX_VCPUS` vCPUs,
//!   page-aligned boot memory of at least 64 MiB, a hotplug region cut in
//!   whole slots, and a command line under the limit; a refusal says why;
//!   what `vm_config_to_ch` reports for it (what `vm.info` shows) is accepted
//!   again with the same vCPUs and memory.

use api_server::ch::{ChRequest, ChVmConfig};
use api_server::{parse_request, ApiRequest, ErrorBody};
use vmm::ch_config::{ch_config_to_vm_config, vm_config_to_ch};
use vmm::config::{VmConfig, CMDLINE_MAX_SIZE, MAX_VCPUS};

use crate::input::Seed;

const ENDPOINTS: [&str; 3] = ["vm.create", "vm.resize", "vm.add-vsock"];

fn check_vm_config(c: &VmConfig) {
    assert!((1..=MAX_VCPUS).contains(&c.cpus.boot_vcpus));
    let m = &c.memory;
    let page = vmm::config::page_size();
    assert!(m.size >= 64 << 20 && m.size.is_multiple_of(page), "{m:?}");
    assert!(
        m.slot_size > 0 && m.hotplug_size.is_multiple_of(m.slot_size),
        "{m:?}"
    );
    assert!(c.cmdline.len() < CMDLINE_MAX_SIZE);
}

fn check_create(ch: &ChVmConfig) {
    match ch_config_to_vm_config(ch) {
        Ok(c) => {
            check_vm_config(&c);
            let reported = vm_config_to_ch(&c);
            let json = serde_json::to_vec(&reported).expect("encode vm.info's config");
            let again: ChVmConfig = serde_json::from_slice(&json).expect("decode it");
            let back = ch_config_to_vm_config(&again)
                .unwrap_or_else(|e| panic!("vm.info's config refused: {e}: {reported:?}"));
            assert_eq!(back.cpus, c.cpus);
            assert_eq!(back.memory, c.memory);
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let endpoint = ENDPOINTS[usize::from(selector) % ENDPOINTS.len()];
    let path = format!("/api/v1/{endpoint}");
    match parse_request("PUT", &path, body) {
        Ok(ApiRequest::Ch(req)) => {
            let again = match &req {
                ChRequest::VmCreate(c) => {
                    check_create(c);
                    serde_json::to_vec(c.as_ref()).expect("encode")
                }
                ChRequest::VmResize(r) => serde_json::to_vec(r).expect("encode"),
                ChRequest::VmAddVsock(v) => serde_json::to_vec(v).expect("encode"),
                other => panic!("{path} parsed as {other:?}"),
            };
            assert_eq!(
                parse_request("PUT", &path, &again),
                Ok(ApiRequest::Ch(req)),
                "re-encoded body"
            );
        }
        Ok(other) => panic!("{path} parsed as {other:?}"),
        Err(reply) => {
            assert_eq!(reply.status, 400, "{reply:?}");
            let text = reply.body.as_deref().expect("an error has a body");
            let body: ErrorBody = serde_json::from_str(text).expect("the error body is JSON");
            assert!(!body.error.is_empty());
        }
    }
}

/// Seed inputs.
pub fn seeds() -> Vec<Vec<u8>> {
    let body = |sel: u8, json: &str| Seed::new().u8(sel).bytes(json.as_bytes()).finish();
    // The running fuzzer is an ELF file, so it passes for a kernel.
    vec![
        body(
            0,
            r#"{"payload": {"kernel": "/proc/self/exe", "cmdline": "console=ttyS0"},
                "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
                "memory": {"size": 536870912, "hotplug_size": 4294967296,
                           "hotplug_method": "VirtioMem"},
                "balloon": {"size": 0, "deflate_on_oom": true, "free_page_reporting": true},
                "rng": {"src": "/dev/urandom"}, "serial": {"mode": "Tty"},
                "console": {"mode": "Off"}}"#,
        ),
        body(
            0,
            r#"{"payload": {"kernel": "/proc/self/exe"}, "memory": {"size": 1073741824,
                "hotplug_size": 1073741824, "hotplug_method": "HvBalloon"},
                "net": [{"tap": "t0"}]}"#,
        ),
        body(1, r#"{"desired_ram": 1610612736, "desired_balloon": 0}"#),
        body(2, r#"{"cid": 3, "socket": "/tmp/vsock.sock"}"#),
        body(0, r#"{"payload": {}, "cpus": {"boot_vcpus": 0}}"#),
    ]
}
