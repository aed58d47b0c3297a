//! The Cloud Hypervisor REST API (v1) subset tidevm serves under `/api/v1/`.
//!
//! These are tidevm's own types for the part of Cloud Hypervisor's `VmConfig`
//! and requests that tidevm understands. Fields tidevm has no use for are
//! kept in each struct's `other` map so that the VMM can accept them at their
//! defaults and refuse them otherwise, naming the field. No VM logic here:
//! the mapping to tidevm's configuration lives in the `vmm` crate.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::server::{parse_body, Reply};

/// Fields of a Cloud Hypervisor object that tidevm does not model, by name.
pub type OtherFields = BTreeMap<String, Value>;

/// Reads an optional field that may be left out but not be `null`: each has
/// a type in the spec, and `null` is none of them (serde alone would take
/// `null` as absent, accepting a request the spec calls invalid).
fn present<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(deserializer).map(Some)
}

/// A Cloud Hypervisor `VmConfig` (the body of `vm.create`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChVmConfig {
    /// vCPUs.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub cpus: Option<ChCpusConfig>,
    /// Guest memory.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory: Option<ChMemoryConfig>,
    /// What to boot.
    pub payload: ChPayloadConfig,
    /// Block devices.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub disks: Option<Vec<ChDiskConfig>>,
    /// Entropy device.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub rng: Option<ChRngConfig>,
    /// Balloon device.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub balloon: Option<ChBalloonConfig>,
    /// vsock device.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub vsock: Option<ChVsockConfig>,
    /// Legacy serial port.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub serial: Option<ChConsoleConfig>,
    /// virtio-console.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub console: Option<ChConsoleConfig>,
    /// Every other field (net, fs, pmem, devices, numa, ...).
    #[serde(flatten)]
    pub other: OtherFields,
}

/// `PayloadConfig`: the kernel, its command line and initramfs.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChPayloadConfig {
    /// Kernel image path.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub kernel: Option<String>,
    /// Kernel command line.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub cmdline: Option<String>,
    /// Initramfs path.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub initramfs: Option<String>,
    /// Other fields (firmware, igvm, host_data).
    #[serde(flatten)]
    pub other: OtherFields,
}

/// `CpusConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChCpusConfig {
    /// vCPUs at boot.
    pub boot_vcpus: u64,
    /// Most vCPUs (tidevm has no vCPU hotplug: must equal `boot_vcpus`).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_vcpus: Option<u64>,
    /// CPU topology.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub topology: Option<ChCpuTopology>,
    /// Other fields (kvm_hyperv, affinity, features, ...).
    #[serde(flatten)]
    pub other: OtherFields,
}

/// `CpuTopology`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChCpuTopology {
    /// Threads per core.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub threads_per_core: Option<u64>,
    /// Cores per die.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub cores_per_die: Option<u64>,
    /// Dies per package.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub dies_per_package: Option<u64>,
    /// Packages (sockets).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub packages: Option<u64>,
}

/// `MemoryConfig`. Sizes in bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChMemoryConfig {
    /// Boot memory.
    pub size: u64,
    /// Hotpluggable memory.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub hotplug_size: Option<u64>,
    /// Memory plugged at boot.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub hotplugged_size: Option<u64>,
    /// `"Acpi"` (Cloud Hypervisor's default) or `"VirtioMem"`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub hotplug_method: Option<String>,
    /// Shared (memfd) backing.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub shared: Option<bool>,
    /// hugetlb backing.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub hugepages: Option<bool>,
    /// Populate memory at start.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub prefault: Option<bool>,
    /// Other fields (mergeable, thp, zones, ...).
    #[serde(flatten)]
    pub other: OtherFields,
}

/// `DiskConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChDiskConfig {
    /// Backing file.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub path: Option<String>,
    /// Read-only disk.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub readonly: Option<bool>,
    /// Other fields (direct, vhost_user, rate limits, ...).
    #[serde(flatten)]
    pub other: OtherFields,
}

/// `RngConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChRngConfig {
    /// Host file random bytes come from.
    pub src: String,
    /// Other fields.
    #[serde(flatten)]
    pub other: OtherFields,
}

/// `BalloonConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChBalloonConfig {
    /// Initial balloon size, in bytes.
    pub size: u64,
    /// Deflate under guest memory pressure.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub deflate_on_oom: Option<bool>,
    /// Free page reporting.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub free_page_reporting: Option<bool>,
    /// Other fields.
    #[serde(flatten)]
    pub other: OtherFields,
}

/// `VsockConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChVsockConfig {
    /// The guest's CID.
    pub cid: u64,
    /// The hybrid vsock Unix socket.
    pub socket: String,
    /// Other fields.
    #[serde(flatten)]
    pub other: OtherFields,
}

/// `SerialConfig` / `ConsoleConfig`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChConsoleConfig {
    /// `Off`, `Pty`, `Tty`, `File`, `Socket` or `Null`.
    pub mode: String,
    /// Output file, with mode `File`.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub file: Option<String>,
    /// Other fields.
    #[serde(flatten)]
    pub other: OtherFields,
}

/// `VmResize` (the body of `vm.resize`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChVmResize {
    /// vCPUs wanted.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub desired_vcpus: Option<u64>,
    /// Guest memory wanted, in bytes.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub desired_ram: Option<u64>,
    /// Balloon size wanted, in bytes.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub desired_balloon: Option<u64>,
}

/// `VmmPingResponse` (the answer to `vmm.ping`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChVmmPingResponse {
    /// The build's version string.
    pub build_version: String,
    /// The VMM's version.
    pub version: String,
    /// The VMM's process id.
    pub pid: i64,
    /// Optional features compiled in.
    pub features: Vec<String>,
}

/// `VmInfo` (the answer to `vm.info`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChVmInfo {
    /// The configuration given to `vm.create`.
    pub config: Value,
    /// `Created`, `Running` or `Shutdown`.
    pub state: String,
    /// Guest memory now, in bytes: boot + plugged - ballooned.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_actual_size: Option<u64>,
}

/// A Cloud Hypervisor API request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChRequest {
    /// `GET /api/v1/vmm.ping`.
    VmmPing,
    /// `PUT /api/v1/vmm.shutdown`.
    VmmShutdown,
    /// `PUT /api/v1/vm.create`.
    VmCreate(Box<ChVmConfig>),
    /// `PUT /api/v1/vm.boot`.
    VmBoot,
    /// `GET /api/v1/vm.info`.
    VmInfo,
    /// `GET /api/v1/vm.counters`.
    VmCounters,
    /// `PUT /api/v1/vm.resize`.
    VmResize(ChVmResize),
    /// `PUT /api/v1/vm.shutdown`.
    VmShutdown,
    /// `PUT /api/v1/vm.reboot`.
    VmReboot,
    /// `PUT /api/v1/vm.power-button`.
    VmPowerButton,
    /// `PUT /api/v1/vm.delete`.
    VmDelete,
    /// `PUT /api/v1/vm.add-vsock`.
    VmAddVsock(ChVsockConfig),
}

/// The Cloud Hypervisor endpoints tidevm serves: path below `/api/v1/` and method.
const CH_ROUTES: &[(&str, &str)] = &[
    ("vmm.ping", "GET"),
    ("vmm.shutdown", "PUT"),
    ("vm.create", "PUT"),
    ("vm.boot", "PUT"),
    ("vm.info", "GET"),
    ("vm.counters", "GET"),
    ("vm.resize", "PUT"),
    ("vm.shutdown", "PUT"),
    ("vm.reboot", "PUT"),
    ("vm.power-button", "PUT"),
    ("vm.delete", "PUT"),
    ("vm.add-vsock", "PUT"),
];

/// Prefix of every Cloud Hypervisor endpoint.
pub const CH_PREFIX: &str = "/api/v1/";

impl ChRequest {
    /// The HTTP method and path of this request, for logs.
    pub fn route(&self) -> (&'static str, &'static str) {
        match self {
            ChRequest::VmmPing => ("GET", "/api/v1/vmm.ping"),
            ChRequest::VmmShutdown => ("PUT", "/api/v1/vmm.shutdown"),
            ChRequest::VmCreate(_) => ("PUT", "/api/v1/vm.create"),
            ChRequest::VmBoot => ("PUT", "/api/v1/vm.boot"),
            ChRequest::VmInfo => ("GET", "/api/v1/vm.info"),
            ChRequest::VmCounters => ("GET", "/api/v1/vm.counters"),
            ChRequest::VmResize(_) => ("PUT", "/api/v1/vm.resize"),
            ChRequest::VmShutdown => ("PUT", "/api/v1/vm.shutdown"),
            ChRequest::VmReboot => ("PUT", "/api/v1/vm.reboot"),
            ChRequest::VmPowerButton => ("PUT", "/api/v1/vm.power-button"),
            ChRequest::VmDelete => ("PUT", "/api/v1/vm.delete"),
            ChRequest::VmAddVsock(_) => ("PUT", "/api/v1/vm.add-vsock"),
        }
    }
}

/// Parses a request below [`CH_PREFIX`] (`endpoint` is the rest of the path).
/// Bodies of endpoints that take none are ignored, as Cloud Hypervisor does.
pub(crate) fn parse_ch_request(
    method: &str,
    endpoint: &str,
    body: &[u8],
) -> Result<ChRequest, Reply> {
    let path = format!("{CH_PREFIX}{endpoint}");
    let Some((_, allow)) = CH_ROUTES.iter().find(|(e, _)| *e == endpoint) else {
        return Err(Reply::error(404, format!("no such endpoint: {path}")));
    };
    if method != *allow {
        let mut reply = Reply::error(
            405,
            format!("method {method} not allowed on {path} (allowed: {allow})"),
        );
        reply.allow = Some(allow);
        return Err(reply);
    }
    Ok(match endpoint {
        "vmm.ping" => ChRequest::VmmPing,
        "vmm.shutdown" => ChRequest::VmmShutdown,
        "vm.create" => ChRequest::VmCreate(Box::new(parse_body(method, &path, body)?)),
        "vm.boot" => ChRequest::VmBoot,
        "vm.info" => ChRequest::VmInfo,
        "vm.counters" => ChRequest::VmCounters,
        "vm.resize" => ChRequest::VmResize(parse_body(method, &path, body)?),
        "vm.shutdown" => ChRequest::VmShutdown,
        "vm.reboot" => ChRequest::VmReboot,
        "vm.power-button" => ChRequest::VmPowerButton,
        "vm.add-vsock" => ChRequest::VmAddVsock(parse_body(method, &path, body)?),
        _ => ChRequest::VmDelete,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(method: &str, endpoint: &str, body: &str) -> Result<ChRequest, Reply> {
        parse_ch_request(method, endpoint, body.as_bytes())
    }

    #[test]
    fn routes() {
        assert_eq!(parse("GET", "vmm.ping", "").unwrap(), ChRequest::VmmPing);
        assert_eq!(parse("PUT", "vm.boot", "").unwrap(), ChRequest::VmBoot);
        assert_eq!(parse("PUT", "vm.delete", "").unwrap(), ChRequest::VmDelete);
        assert_eq!(
            parse("GET", "vm.counters", "").unwrap(),
            ChRequest::VmCounters
        );
        assert_eq!(
            parse("PUT", "vm.resize", r#"{"desired_ram": 1073741824}"#).unwrap(),
            ChRequest::VmResize(ChVmResize {
                desired_ram: Some(1 << 30),
                ..Default::default()
            })
        );
        let create = parse(
            "PUT",
            "vm.create",
            r#"{"payload": {"kernel": "/k"}, "cpus": {"boot_vcpus": 2, "max_vcpus": 2},
                "memory": {"size": 536870912}, "net": [{"tap": "t0"}]}"#,
        )
        .unwrap();
        let ChRequest::VmCreate(config) = create else {
            panic!("{create:?}");
        };
        assert_eq!(config.payload.kernel.as_deref(), Some("/k"));
        assert_eq!(config.cpus.as_ref().unwrap().max_vcpus, Some(2));
        assert_eq!(config.memory.as_ref().unwrap().size, 512 << 20);
        assert!(config.other.contains_key("net"));
        for (endpoint, method) in CH_ROUTES {
            let body = match *endpoint {
                "vm.create" => r#"{"payload": {}}"#,
                "vm.resize" => "{}",
                "vm.add-vsock" => r#"{"cid": 3, "socket": "/s"}"#,
                _ => "",
            };
            let request = parse(method, endpoint, body).unwrap();
            assert_eq!(request.route(), (*method, &*format!("/api/v1/{endpoint}")));
        }
    }

    #[test]
    fn errors() {
        assert_eq!(parse("PUT", "vm.nope", "").unwrap_err().status, 404);
        let r = parse("PUT", "vmm.ping", "").unwrap_err();
        assert_eq!((r.status, r.allow), (405, Some("GET")));
        let r = parse("PUT", "vm.counters", "").unwrap_err();
        assert_eq!((r.status, r.allow), (405, Some("GET")));
        assert_eq!(parse("PUT", "vm.create", "").unwrap_err().status, 400);
        assert_eq!(parse("PUT", "vm.create", "{").unwrap_err().status, 400);
        let r = parse("PUT", "vm.create", r#"{"cpus": {"boot_vcpus": 1}}"#).unwrap_err();
        assert!(r.body.unwrap().contains("missing field `payload`"));
        let r = parse("PUT", "vm.resize", r#"{"desired_ram": -1}"#).unwrap_err();
        assert_eq!(r.status, 400);
        let r = parse("PUT", "vm.resize", r#"{"desired_cpus": 1}"#).unwrap_err();
        assert!(r.body.unwrap().contains("unknown field"));
        // A field may be left out, but not be null.
        let r = parse(
            "PUT",
            "vm.resize",
            r#"{"desired_ram": null, "desired_vcpus": 1}"#,
        )
        .unwrap_err();
        assert_eq!(r.status, 400);
        assert!(r.body.unwrap().contains("invalid type: null"));
        for body in [
            r#"{"payload": {"kernel": null}}"#,
            r#"{"payload": {}, "cpus": null}"#,
            r#"{"payload": {}, "memory": {"size": 536870912, "hotplug_size": null}}"#,
            r#"{"payload": {}, "disks": [{"path": "/d", "readonly": null}]}"#,
        ] {
            let r = parse("PUT", "vm.create", body).unwrap_err();
            assert_eq!(r.status, 400, "{body}");
            assert!(r.body.unwrap().contains("invalid type: null"), "{body}");
        }
        // Null stays accepted for fields tidevm does not model (as empty).
        assert!(parse("PUT", "vm.create", r#"{"payload": {}, "net": null}"#).is_ok());
    }
}
