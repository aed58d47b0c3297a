//! What the integration tests share: a real server on a temporary Unix socket, and a fake
//! VMM thread behind it.

// Each test binary uses part of this module.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{self, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use api_server::client::request;
use api_server::{
    ApiRequest, ApiRequestEnvelope, ApiResponse, ApiServer, ApiServerConfig, ApiServerHandle,
    BalloonInfo, DeviceCounters, ErrorBody, MemoryInfo, MemoryResizeRequest, VmCounters, VmInfo,
};
use vmm_sys_util::eventfd::EventFd;

pub const BLOCK: u64 = 2 << 20;

pub fn socket_path(tag: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let n = N.fetch_add(1, Ordering::SeqCst);
    std::env::temp_dir().join(format!("tidevm-api-{}-{tag}-{n}.sock", std::process::id()))
}

pub fn memory_info() -> MemoryInfo {
    MemoryInfo {
        boot_size: 512 << 20,
        hotplug_size: 1 << 30,
        requested_size: 512 << 20,
        plugged_size: 0,
        block_size: BLOCK,
        slot_size: 128 << 20,
        memslots_in_use: 1,
        longest_memslot_update_us: 12,
        hotplug_method: "virtio-mem".to_string(),
        balloon_target_size: Some(0),
        balloon_actual_size: None,
        hv_balloon: None,
    }
}

pub fn balloon_info() -> BalloonInfo {
    BalloonInfo {
        target_size: 64 << 20,
        actual_size: 32 << 20,
        deflate_on_oom: true,
        free_page_reporting: false,
        stats_period_s: 0,
        features_negotiated: 0x1_0000_0004,
    }
}

/// A VMM stand-in that answers like a real one would, recording what it received.
pub fn fake_vmm_answer(request: &ApiRequest) -> ApiResponse {
    match request {
        ApiRequest::GetVmInfo => ApiResponse::ok(&VmInfo {
            state: "Running".to_string(),
            config: serde_json::json!({"vcpus": 2}),
            uptime_ms: 1234,
        }),
        ApiRequest::PowerOff => ApiResponse::no_content(),
        ApiRequest::GetMemory => ApiResponse::ok(&memory_info()),
        ApiRequest::PutMemory(MemoryResizeRequest { requested_size }) => {
            if requested_size % BLOCK != 0 {
                ApiResponse::error(
                    400,
                    format!("requested_size {requested_size} is not a multiple of {BLOCK}"),
                )
            } else {
                ApiResponse::no_content()
            }
        }
        ApiRequest::GetBalloon => ApiResponse::ok(&balloon_info()),
        ApiRequest::PutBalloon(_) => ApiResponse::no_content(),
        ApiRequest::Ch(_) => ApiResponse::no_content(),
        ApiRequest::GetBalloonStatistics => {
            ApiResponse::error(409, "balloon statistics are disabled")
        }
        ApiRequest::GetCounters => ApiResponse::ok(&counters()),
    }
}

/// What the fake VMM answers to `GET /vm/counters`.
pub fn counters() -> VmCounters {
    VmCounters::from([(
        "disk0".to_string(),
        DeviceCounters::from([("write_bytes".to_string(), 4096)]),
    )])
}

/// A server on a temporary socket and a fake VMM thread behind it.
pub struct Fixture {
    /// The server, until a test stops it.
    pub server: Option<ApiServerHandle>,
    vmm: Option<JoinHandle<()>>,
    wake: EventFd,
    /// Every request that reached the VMM, in order.
    pub seen: Arc<Mutex<Vec<ApiRequest>>>,
    /// The API socket.
    pub path: PathBuf,
}

impl Fixture {
    /// Starts a server and a fake VMM thread. `answer` decides what the VMM does with each
    /// envelope.
    pub fn start(tag: &str, answer: impl Fn(ApiRequestEnvelope) + Send + 'static) -> Fixture {
        let config = ApiServerConfig {
            response_timeout: Duration::from_secs(2),
            ..ApiServerConfig::default()
        };
        Fixture::with_config(tag, config, answer)
    }

    /// Like [`Fixture::start`], with the given server configuration.
    pub fn with_config(
        tag: &str,
        config: ApiServerConfig,
        answer: impl Fn(ApiRequestEnvelope) + Send + 'static,
    ) -> Fixture {
        let path = socket_path(tag);
        let (tx, rx) = mpsc::channel::<ApiRequestEnvelope>();
        let kick = EventFd::new(0).unwrap();
        let wake = kick.try_clone().unwrap();
        let vmm_kick = kick.try_clone().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let vmm_seen = Arc::clone(&seen);
        let vmm = std::thread::spawn(move || loop {
            // Like the real event loop: wait for the kick, then drain the channel.
            vmm_kick.read().unwrap();
            loop {
                match rx.try_recv() {
                    Ok(envelope) => {
                        vmm_seen.lock().unwrap().push(envelope.request.clone());
                        answer(envelope);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => return,
                }
            }
        });
        let server = ApiServer::start_with_config(&path, tx, kick, config).unwrap();
        Fixture {
            server: Some(server),
            vmm: Some(vmm),
            wake,
            seen,
            path,
        }
    }

    /// A server with a VMM that answers like [`fake_vmm_answer`].
    pub fn standard(tag: &str) -> Fixture {
        Fixture::start(tag, |envelope| {
            let response = fake_vmm_answer(&envelope.request);
            envelope.respond(response);
        })
    }

    /// Sends one request on a new connection; panics if the exchange fails.
    pub fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        request(&self.path, method, path, body).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
        assert!(!self.path.exists(), "socket not removed on stop");
        // The server's sender is gone: wake the fake VMM so it sees the disconnection.
        self.wake.write(1).unwrap();
        if let Some(vmm) = self.vmm.take() {
            vmm.join().unwrap();
        }
    }
}

pub fn error_message(body: &str) -> String {
    serde_json::from_str::<ErrorBody>(body)
        .unwrap_or_else(|e| panic!("not an error body ({e}): {body}"))
        .error
}
