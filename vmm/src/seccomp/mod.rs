//! Seccomp filters, one per kind of thread, so that a thread that parses
//! guest or client input can make only the system calls tidevm needs there.
//!
//! - [`ThreadKind::Vmm`]: the main thread. It runs the event loop (every
//!   virtio and Hyper-V device), answers the API, and builds each VM (also
//!   after a guest reboot and on the Cloud Hypervisor API's `vm.boot`), so
//!   its list is the longest. Installed once the API thread is started and
//!   before the first VM is built.
//! - [`ThreadKind::Vcpu`]: a vCPU thread, spawned by the main thread, so it
//!   runs under the Vmm filter too and adds its own, much shorter one
//!   (`KVM_RUN` and the device register accesses it dispatches) before its
//!   first `KVM_RUN`.
//! - [`ThreadKind::Api`]: the API server thread, started before the Vmm
//!   filter. It installs its filter before it creates the HTTP server, so
//!   tiny_http's accept and connection threads and tidevm's body reader
//!   threads inherit it.
//!
//! [`rules`] lists what each kind may call and why. A forbidden call
//! traps: [`sigsys`] prints which thread made which call and ends tidevm
//! with [`SECCOMP_EXIT_CODE`]. `--seccomp log` lets every call through and
//! has the kernel log the ones the filters would have refused (the audit
//! log, or `dmesg`: `type=1326 ... syscall=NR`), for finding what a new
//! feature needs; `--seccomp false` installs nothing.

mod names;
pub mod rules;
pub mod sigsys;

use std::collections::BTreeMap;
use std::str::FromStr;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, SeccompRule, TargetArch};

pub use sigsys::{install_sigsys_handler, SECCOMP_EXIT_CODE};

/// What `--seccomp` asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeccompMode {
    /// `true` (the default): a forbidden system call ends tidevm.
    #[default]
    Trap,
    /// `log`: everything is allowed; the kernel logs what would have been refused.
    Log,
    /// `false`: no filters.
    Off,
}

impl FromStr for SeccompMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "true" => Ok(Self::Trap),
            "log" => Ok(Self::Log),
            "false" => Ok(Self::Off),
            _ => Err("expected true, false or log".into()),
        }
    }
}

/// The kinds of tidevm threads, each with its own filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread: VM setup, event loop, devices, API answers.
    Vmm,
    /// A vCPU thread.
    Vcpu,
    /// The API server thread and the threads it starts.
    Api,
}

impl ThreadKind {
    /// The name used in messages and in the test hook (`vmm`, `vcpu`, `api`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Vmm => "vmm",
            Self::Vcpu => "vcpu",
            Self::Api => "api",
        }
    }
}

/// Why a filter could not be built or installed.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// seccompiler refused the rules (a bug in [`rules`]).
    #[error("cannot build the {kind} seccomp filter: {reason}")]
    Build {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's error.
        reason: String,
    },
    /// The kernel refused the filter (no seccomp support?).
    #[error("cannot install the {kind} seccomp filter (start with --seccomp false on a kernel without seccomp filters): {reason}")]
    Install {
        /// The thread kind.
        kind: &'static str,
        /// seccompiler's error.
        reason: String,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

fn compile(
    rules: BTreeMap<i64, Vec<SeccompRule>>,
    mismatch: SeccompAction,
    matched: SeccompAction,
    kind: ThreadKind,
) -> Result<BpfProgram, SeccompError> {
    let err = |e: &dyn std::fmt::Display| SeccompError::Build {
        kind: kind.name(),
        reason: e.to_string(),
    };
    let filter =
        SeccompFilter::new(rules, mismatch, matched, TargetArch::x86_64).map_err(|e| err(&e))?;
    BpfProgram::try_from(filter).map_err(|e| err(&e))
}

/// The filters of a thread kind in `mode`, in the order they are installed.
///
/// The first is the allow list of [`rules::allowed`]. Threads that may
/// start threads get a second one answering `clone3` with `ENOSYS`: glibc
/// then falls back to `clone`, whose flags (unlike `clone3`'s, which sit in
/// memory) a filter can check, and the allow list permits only clones
/// that make a thread, never a process.
pub fn filters(kind: ThreadKind, mode: SeccompMode) -> Result<Vec<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(Vec::new()),
        SeccompMode::Trap => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let mut programs = vec![compile(
        rules::allowed(kind).map_err(|e| SeccompError::Build {
            kind: kind.name(),
            reason: e.to_string(),
        })?,
        mismatch,
        SeccompAction::Allow,
        kind,
    )?];
    if kind != ThreadKind::Vcpu {
        let clone3 = BTreeMap::from([(libc::SYS_clone3, Vec::new())]);
        programs.push(compile(
            clone3,
            SeccompAction::Allow,
            SeccompAction::Errno(libc::ENOSYS.unsigned_abs()),
            kind,
        )?);
    }
    Ok(programs)
}

/// Installs the filters of `kind` on the calling thread (nothing with
/// [`SeccompMode::Off`]). Threads it starts afterwards inherit them.
pub fn install(kind: ThreadKind, mode: SeccompMode) -> Result<(), SeccompError> {
    for program in filters(kind, mode)? {
        seccompiler::apply_filter(&program).map_err(|e| SeccompError::Install {
            kind: kind.name(),
            reason: e.to_string(),
        })?;
    }
    log::debug!("seccomp: {} filter installed ({mode:?})", kind.name());
    test_hook::after_install(kind);
    Ok(())
}

/// A test-only way to make a thread break its filter: in debug builds
/// (the ones `cargo test` runs), `TIDEVM_TEST_SECCOMP_VIOLATION=vmm|vcpu|api`
/// makes a thread of that kind call `getppid`, which no filter allows,
/// right after it installed its filter. Release builds have no such hook.
mod test_hook {
    use super::ThreadKind;

    /// The environment variable naming the thread kind that misbehaves.
    #[cfg(debug_assertions)]
    pub(super) const VARIABLE: &str = "TIDEVM_TEST_SECCOMP_VIOLATION";

    #[cfg(debug_assertions)]
    pub(super) fn after_install(kind: ThreadKind) {
        if std::env::var(VARIABLE).is_ok_and(|v| v == kind.name()) {
            // SAFETY: getppid takes no arguments and touches no memory.
            let ppid = unsafe { libc::syscall(libc::SYS_getppid) };
            // Reached with --seccomp log or false only.
            log::warn!("seccomp test hook: getppid() = {ppid} was allowed");
        }
    }

    #[cfg(not(debug_assertions))]
    pub(super) fn after_install(_kind: ThreadKind) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mode_parses_cloud_hypervisors_spelling() {
        assert_eq!("true".parse(), Ok(SeccompMode::Trap));
        assert_eq!("false".parse(), Ok(SeccompMode::Off));
        assert_eq!("log".parse(), Ok(SeccompMode::Log));
        assert!("on".parse::<SeccompMode>().is_err());
        assert_eq!(SeccompMode::default(), SeccompMode::Trap);
    }

    #[test]
    fn every_kind_compiles_and_off_installs_nothing() {
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Api] {
            let programs = filters(kind, SeccompMode::Trap).unwrap();
            assert_eq!(programs.len(), if kind == ThreadKind::Vcpu { 1 } else { 2 });
            assert!(programs.iter().all(|p| !p.is_empty()));
            assert_eq!(
                filters(kind, SeccompMode::Log).unwrap().len(),
                programs.len()
            );
            assert!(filters(kind, SeccompMode::Off).unwrap().is_empty());
        }
    }

    #[test]
    fn the_test_hook_call_is_allowed_nowhere() {
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Api] {
            let allowed = rules::allowed(kind).unwrap();
            assert!(!allowed.contains_key(&libc::SYS_getppid), "{kind:?}");
        }
    }
}
