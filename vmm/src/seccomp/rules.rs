//! What each kind of thread may call, in groups, each with the reason it
//! is there. A call missing here traps (see [`super::sigsys`]); run with
//! `--seccomp log` to find what a new feature needs.
//!
//! Every thread shares the [`runtime`] group (memory, locks, thread exit,
//! logging). Where an argument says what a call does, it is checked:
//! `ioctl` only with the request numbers tidevm issues, `clone` only for
//! threads, `socket` only for Unix sockets, `fcntl`, `madvise`, `prctl`,
//! `fallocate` and `setsockopt` only with the operations tidevm uses, and
//! `mmap`/`mprotect` never with `PROT_EXEC`.

use std::collections::BTreeMap;

use kvm_bindings::{
    kvm_cpuid2, kvm_enable_cap, kvm_fpu, kvm_ioeventfd, kvm_irq_routing, kvm_irqfd,
    kvm_lapic_state, kvm_msr_list, kvm_msrs, kvm_pit_config, kvm_regs, kvm_sregs,
    kvm_userspace_memory_region, KVMIO,
};
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

use super::ThreadKind;

/// The KVM ioctl request numbers tidevm issues (the kernel's
/// `include/uapi/linux/kvm.h` definitions, built with the same macros
/// kvm-ioctls uses).
mod kvm {
    use super::*;

    ioctl_io_nr!(KVM_GET_API_VERSION, KVMIO, 0x00);
    ioctl_io_nr!(KVM_CREATE_VM, KVMIO, 0x01);
    ioctl_iowr_nr!(KVM_GET_MSR_INDEX_LIST, KVMIO, 0x02, kvm_msr_list);
    ioctl_io_nr!(KVM_CHECK_EXTENSION, KVMIO, 0x03);
    ioctl_io_nr!(KVM_GET_VCPU_MMAP_SIZE, KVMIO, 0x04);
    ioctl_iowr_nr!(KVM_GET_SUPPORTED_CPUID, KVMIO, 0x05, kvm_cpuid2);
    ioctl_iowr_nr!(KVM_GET_SUPPORTED_HV_CPUID, KVMIO, 0xc1, kvm_cpuid2);
    ioctl_io_nr!(KVM_CREATE_VCPU, KVMIO, 0x41);
    ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
    ioctl_io_nr!(KVM_SET_TSS_ADDR, KVMIO, 0x47);
    ioctl_iow_nr!(KVM_SET_IDENTITY_MAP_ADDR, KVMIO, 0x48, u64);
    ioctl_io_nr!(KVM_CREATE_IRQCHIP, KVMIO, 0x60);
    ioctl_iow_nr!(KVM_SET_GSI_ROUTING, KVMIO, 0x6a, kvm_irq_routing);
    ioctl_iow_nr!(KVM_IRQFD, KVMIO, 0x76, kvm_irqfd);
    ioctl_iow_nr!(KVM_CREATE_PIT2, KVMIO, 0x77, kvm_pit_config);
    ioctl_iow_nr!(KVM_IOEVENTFD, KVMIO, 0x79, kvm_ioeventfd);
    ioctl_io_nr!(KVM_RUN, KVMIO, 0x80);
    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_iow_nr!(KVM_SET_REGS, KVMIO, 0x82, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iow_nr!(KVM_SET_SREGS, KVMIO, 0x84, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_iow_nr!(KVM_SET_MSRS, KVMIO, 0x89, kvm_msrs);
    ioctl_iow_nr!(KVM_SET_FPU, KVMIO, 0x8d, kvm_fpu);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_LAPIC, KVMIO, 0x8f, kvm_lapic_state);
    ioctl_iow_nr!(KVM_SET_CPUID2, KVMIO, 0x90, kvm_cpuid2);
    ioctl_iow_nr!(KVM_ENABLE_CAP, KVMIO, 0xa3, kvm_enable_cap);
}

/// An allow list: system call number → conditions (none: always allowed).
pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// A rule could not be built (a bug here).
#[derive(Debug, thiserror::Error)]
#[error("invalid seccomp rule for system call {nr}: {reason}")]
pub struct RuleError {
    nr: i64,
    reason: String,
}

/// Builds an allow list group by group.
#[derive(Default)]
struct Allow {
    rules: Rules,
    error: Option<RuleError>,
}

impl Allow {
    /// Allows `nrs` whatever their arguments.
    fn always(&mut self, nrs: &[i64]) -> &mut Self {
        for nr in nrs {
            self.rules.insert(*nr, Vec::new());
        }
        self
    }

    /// Allows `nr` when one of `alternatives` holds; each alternative is a
    /// list of (argument index, mask, value) that must all hold: the
    /// argument's 32 low bits, masked, equal the value.
    fn when(&mut self, nr: i64, alternatives: &[&[(u8, u64, u64)]]) -> &mut Self {
        let mut built = Vec::new();
        for conditions in alternatives {
            let conditions: Result<Vec<_>, _> = conditions
                .iter()
                .map(|&(arg, mask, value)| {
                    SeccompCondition::new(
                        arg,
                        SeccompCmpArgLen::Dword,
                        SeccompCmpOp::MaskedEq(mask),
                        value,
                    )
                })
                .collect();
            match conditions.and_then(SeccompRule::new) {
                Ok(rule) => built.push(rule),
                Err(e) => {
                    self.error.get_or_insert(RuleError {
                        nr,
                        reason: e.to_string(),
                    });
                }
            }
        }
        match self.rules.get_mut(&nr) {
            // Already allowed whatever the arguments.
            Some(existing) if existing.is_empty() => {}
            Some(existing) => existing.extend(built),
            None => {
                self.rules.insert(nr, built);
            }
        }
        self
    }

    /// Allows `nr` when argument `arg` (32 bits) is one of `values`.
    fn when_arg_in(&mut self, nr: i64, arg: u8, values: &[u64]) -> &mut Self {
        let alternatives: Vec<[(u8, u64, u64); 1]> = values
            .iter()
            .map(|&v| [(arg, u64::from(u32::MAX), v)])
            .collect();
        let refs: Vec<&[(u8, u64, u64)]> = alternatives.iter().map(|a| a.as_slice()).collect();
        self.when(nr, &refs)
    }

    /// Allows `nr` when the bits `mask` of argument `arg` are all clear.
    fn when_clear(&mut self, nr: i64, arg: u8, mask: u64) -> &mut Self {
        self.when(nr, &[&[(arg, mask, 0)]])
    }

    /// Allows `nr` when the bits `mask` of argument `arg` are all set.
    fn when_set(&mut self, nr: i64, arg: u8, mask: u64) -> &mut Self {
        self.when(nr, &[&[(arg, mask, mask)]])
    }

    /// Allows `ioctl` with these request numbers.
    fn ioctls(&mut self, requests: &[u64]) -> &mut Self {
        self.when_arg_in(libc::SYS_ioctl, 1, requests)
    }

    fn finish(self) -> Result<Rules, RuleError> {
        match self.error {
            Some(e) => Err(e),
            None => Ok(self.rules),
        }
    }
}

fn c(v: libc::c_int) -> u64 {
    u64::from(v.unsigned_abs())
}

/// Every thread: the Rust runtime and glibc underneath it.
///
/// - memory: `brk`, `mmap`, `mremap`, `munmap`, `mprotect` (no `PROT_EXEC`:
///   tidevm never makes code at run time) and `madvise` to give freed
///   memory back (`MADV_DONTNEED`, also what glibc does with the stacks of
///   ended threads);
/// - locks, channels and sleeping: `futex`, `sched_yield`, `nanosleep`,
///   `clock_nanosleep`, `clock_gettime` (when the vDSO cannot answer);
/// - a thread's own start and end (glibc registers its robust-futex list
///   and restartable sequences, std its alternate signal stack and name):
///   `set_robust_list`, `rseq`, `sigaltstack`, `rt_sigprocmask`,
///   `sched_getaffinity`, `gettid`, `prctl(PR_SET_NAME)`, `exit`;
///   `prctl(PR_GET_NAME)` is how the SIGSYS handler names the thread;
/// - `exit_group`, `rt_sigreturn` (returning from the vCPU kick handler);
/// - `write` and `writev` (the log on stderr, eventfd signals, the
///   console), `read` (eventfds), `close`, and `fcntl(F_GETFD)`, with
///   which std checks a descriptor it closes (in debug builds);
/// - `openat` read-only and `read`: glibc reads the number of CPUs from
///   `/sys/devices/system/cpu/online` when a thread first allocates;
/// - `getrandom`: the hash seeds of std's `HashMap`.
fn runtime(a: &mut Allow) {
    a.always(&[
        libc::SYS_brk,
        libc::SYS_mremap,
        libc::SYS_munmap,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_set_robust_list,
        libc::SYS_rseq,
        libc::SYS_sigaltstack,
        libc::SYS_rt_sigprocmask,
        libc::SYS_sched_getaffinity,
        libc::SYS_gettid,
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_rt_sigreturn,
        libc::SYS_write,
        libc::SYS_writev,
        libc::SYS_read,
        libc::SYS_close,
        libc::SYS_getrandom,
    ])
    .when_clear(libc::SYS_mmap, 2, c(libc::PROT_EXEC))
    .when_clear(libc::SYS_mprotect, 2, c(libc::PROT_EXEC))
    .when_arg_in(libc::SYS_madvise, 2, &[c(libc::MADV_DONTNEED)])
    .when_arg_in(libc::SYS_fcntl, 1, &[c(libc::F_GETFD)])
    .when_arg_in(
        libc::SYS_prctl,
        0,
        &[c(libc::PR_SET_NAME), c(libc::PR_GET_NAME)],
    )
    .when_clear(
        libc::SYS_openat,
        2,
        c(libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC | libc::O_APPEND),
    );
}

/// glibc's own real-time signals: `SIGCANCEL` and `SIGSETXID`, the two
/// below `SIGRTMIN` (which glibc keeps for itself).
fn glibc_signals() -> [u64; 2] {
    let rtmin = c(libc::SIGRTMIN());
    [rtmin - 2, rtmin - 1]
}

/// Threads that start threads: `clone` only with `CLONE_THREAD` (a thread
/// in this process, never a new process); `clone3` is answered `ENOSYS`
/// by a second filter ([`super::filters`]), so glibc uses `clone`. The
/// first `pthread_create` of the process installs glibc's handler of its
/// internal `SIGSETXID` signal (`rt_sigaction` of [`glibc_signals`] only):
/// without `--api-socket` that is the first vCPU, after the filter.
fn spawn_threads(a: &mut Allow) {
    a.when_set(libc::SYS_clone, 0, c(libc::CLONE_THREAD))
        .always(&[libc::SYS_clone3])
        .when_arg_in(libc::SYS_rt_sigaction, 0, &glibc_signals());
}

/// Threads that install filters after their first one: the second filter
/// of [`super::filters`], and the vCPU filter on top of the Vmm one
/// (`prctl(PR_SET_NO_NEW_PRIVS)`, then `seccomp(SECCOMP_SET_MODE_FILTER)`).
/// A new filter can only forbid more.
fn install_filters(a: &mut Allow) {
    a.when_arg_in(libc::SYS_prctl, 0, &[c(libc::PR_SET_NO_NEW_PRIVS)])
        .when_arg_in(
            libc::SYS_seccomp,
            0,
            &[u64::from(libc::SECCOMP_SET_MODE_FILTER)],
        );
}

/// File descriptor bookkeeping: `fcntl` to duplicate (`try_clone`), read
/// and set the flags of (nonblocking sockets, timerfds) and check
/// descriptors.
fn descriptors(a: &mut Allow) {
    a.when_arg_in(
        libc::SYS_fcntl,
        1,
        &[
            c(libc::F_DUPFD_CLOEXEC),
            c(libc::F_GETFD),
            c(libc::F_SETFD),
            c(libc::F_GETFL),
            c(libc::F_SETFL),
        ],
    );
}

/// The main thread.
///
/// Besides the runtime it builds VMs (at start, after a guest reboot with
/// `--on-reboot restart`, on `vm.boot` and `vm.reboot` of the API), so it
/// opens the kernel, initrd, disks, `/dev/kvm`, the entropy source and the
/// console file, maps guest memory, creates the VM with the KVM ioctls in
/// [`vmm_kvm_ioctls`] and starts the vCPU threads, which install their own
/// filter on top of this one ([`install_filters`]).
/// Its event loop runs every device:
///
/// - event loop: `epoll_*`, eventfds, timerfds (vsock retries, Hyper-V
///   message retries);
/// - virtio-blk: `pread64`/`pwrite64` (and the vectored forms), `fsync`,
///   `fdatasync`, `lseek` for the size;
/// - virtio-mem and Hyper-V DM hot add: `mmap`/`munmap` of hotplug slots and
///   `KVM_SET_USER_MEMORY_REGION`; with `shared=on` the memory is a memfd
///   (`memfd_create`, `ftruncate`);
/// - unplug, balloon inflation and free page reporting:
///   `madvise(MADV_DONTNEED)` and, for a memfd, `fallocate(PUNCH_HOLE)`;
///   `MADV_HUGEPAGE`/`MADV_NOHUGEPAGE` when memory is mapped;
/// - virtio-vsock: Unix sockets (`socket(AF_UNIX)`, `bind`, `listen`,
///   `accept4`, `connect`, nonblocking `sendto`/`recvfrom`, `shutdown`,
///   `ioctl(FIONBIO)`), `unlink` of its socket files;
/// - virtio-rng: `read` of the source;
/// - the console: `ioctl(TCGETS)` (is stdin a terminal?), `fstat`;
/// - stopping: `tgkill` kicks vCPU threads out of `KVM_RUN`; the API
///   server's stop connects to its socket and unlinks it.
fn vmm(a: &mut Allow) {
    runtime(a);
    spawn_threads(a);
    install_filters(a);
    descriptors(a);
    a.always(&[
        libc::SYS_openat,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_readv,
        libc::SYS_lseek,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_memfd_create,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_eventfd2,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_shutdown,
        libc::SYS_getsockopt,
        libc::SYS_getsockname,
        libc::SYS_getpid,
    ])
    .when_arg_in(libc::SYS_socket, 0, &[c(libc::AF_UNIX)])
    .when_arg_in(
        libc::SYS_madvise,
        2,
        &[c(libc::MADV_HUGEPAGE), c(libc::MADV_NOHUGEPAGE)],
    )
    .when_arg_in(
        libc::SYS_fallocate,
        1,
        &[c(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)],
    )
    .when_arg_in(libc::SYS_tgkill, 2, &[c(crate::vcpu::kick_signal())])
    .ioctls(&vmm_kvm_ioctls())
    .ioctls(&[libc::FIONBIO, libc::TCGETS]);
}

/// The KVM ioctls of building a VM: on `/dev/kvm` (version, capabilities,
/// supported CPUID and Hyper-V CPUID, MSR list), on the VM (memory slots,
/// TSS and identity map, irqchip, PIT, irqfds, ioeventfds, GSI routes for
/// the Hyper-V SynIC, vCPUs) and on each vCPU before it runs (CPUID, MSRs,
/// registers, FPU, local APIC, the SynIC capability). `KVM_RUN` is here
/// too: vCPU threads are started by the main thread and so run under its
/// filter as well as their own.
pub fn vmm_kvm_ioctls() -> Vec<u64> {
    use kvm::*;
    vec![
        KVM_RUN(),
        KVM_GET_API_VERSION(),
        KVM_CREATE_VM(),
        KVM_GET_MSR_INDEX_LIST(),
        KVM_CHECK_EXTENSION(),
        KVM_GET_VCPU_MMAP_SIZE(),
        KVM_GET_SUPPORTED_CPUID(),
        KVM_GET_SUPPORTED_HV_CPUID(),
        KVM_CREATE_VCPU(),
        KVM_SET_USER_MEMORY_REGION(),
        KVM_SET_TSS_ADDR(),
        KVM_SET_IDENTITY_MAP_ADDR(),
        KVM_CREATE_IRQCHIP(),
        KVM_SET_GSI_ROUTING(),
        KVM_IRQFD(),
        KVM_CREATE_PIT2(),
        KVM_IOEVENTFD(),
        KVM_GET_REGS(),
        KVM_SET_REGS(),
        KVM_GET_SREGS(),
        KVM_SET_SREGS(),
        KVM_GET_MSRS(),
        KVM_SET_MSRS(),
        KVM_SET_FPU(),
        KVM_GET_LAPIC(),
        KVM_SET_LAPIC(),
        KVM_SET_CPUID2(),
        KVM_ENABLE_CAP(),
    ]
}

/// A vCPU thread: the runtime and `ioctl` with `KVM_RUN`, plus
/// `KVM_GET_REGS`/`KVM_GET_SREGS` for the log of a triple fault.
///
/// The port and MMIO exits it dispatches reach device registers, which
/// signal eventfds (`write`) and write the console. A driver writing a
/// virtio status register activates or resets its device on this thread:
/// the balloon arms or disarms its statistics timer (`timerfd_settime`)
/// and processes the pages queued so far (`madvise`, and
/// `fallocate(PUNCH_HOLE)` for shared memory); vsock drops its connections
/// (`epoll_ctl`, `close`). Hyper-V exits are answered through the
/// `kvm_run` page and the SynIC's eventfds. No `clone`, no sockets, no
/// file creation, no memory slots.
fn vcpu(a: &mut Allow) {
    runtime(a);
    use kvm::*;
    a.always(&[libc::SYS_epoll_ctl, libc::SYS_timerfd_settime])
        .when_arg_in(
            libc::SYS_fallocate,
            1,
            &[c(libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE)],
        )
        .ioctls(&[KVM_RUN(), KVM_GET_REGS(), KVM_GET_SREGS()]);
}

/// The API threads: the server thread, tiny_http's accept thread and its
/// per-connection threads, and the body reader threads. They look up the
/// bound socket's address (`getsockname`, once), accept
/// connections on the already bound socket (`accept4`), read requests
/// (`recvfrom`, `read`) with a read timeout (`setsockopt(SO_RCVTIMEO)`),
/// write answers (`sendto`, `write`), close connections (`shutdown`), hand
/// requests to the main thread (a channel and an eventfd `write`) and
/// start threads.
fn api(a: &mut Allow) {
    runtime(a);
    spawn_threads(a);
    install_filters(a);
    descriptors(a);
    a.always(&[
        libc::SYS_getsockname,
        libc::SYS_accept4,
        libc::SYS_recvfrom,
        libc::SYS_sendto,
        libc::SYS_shutdown,
    ])
    .when(
        libc::SYS_setsockopt,
        &[
            &[
                (1, u64::from(u32::MAX), c(libc::SOL_SOCKET)),
                (2, u64::from(u32::MAX), c(libc::SO_RCVTIMEO)),
            ],
            &[
                (1, u64::from(u32::MAX), c(libc::SOL_SOCKET)),
                (2, u64::from(u32::MAX), c(libc::SO_SNDTIMEO)),
            ],
        ],
    );
}

/// The allow list of `kind`.
pub fn allowed(kind: ThreadKind) -> Result<Rules, RuleError> {
    let mut a = Allow::default();
    match kind {
        ThreadKind::Vmm => vmm(&mut a),
        ThreadKind::Vcpu => vcpu(&mut a),
        ThreadKind::Api => api(&mut a),
    }
    a.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // Values from linux/kvm.h as strace decodes them.
        assert_eq!(kvm::KVM_CREATE_VM(), 0xae01);
        assert_eq!(kvm::KVM_RUN(), 0xae80);
        assert_eq!(kvm::KVM_SET_USER_MEMORY_REGION(), 0x4020_ae46);
        assert_eq!(kvm::KVM_IRQFD(), 0x4020_ae76);
        assert_eq!(kvm::KVM_IOEVENTFD(), 0x4040_ae79);
        assert_eq!(kvm::KVM_SET_GSI_ROUTING(), 0x4008_ae6a);
        assert_eq!(kvm::KVM_GET_SUPPORTED_CPUID(), 0xc008_ae05);
        assert_eq!(kvm::KVM_ENABLE_CAP(), 0x4068_aea3);
        assert_eq!(kvm::KVM_SET_IDENTITY_MAP_ADDR(), 0x4008_ae48);
    }

    fn has(kind: ThreadKind, nr: i64) -> bool {
        allowed(kind).unwrap().contains_key(&nr)
    }

    #[test]
    fn only_the_main_thread_builds_vms_and_only_it_and_the_api_start_threads() {
        assert!(has(ThreadKind::Vmm, libc::SYS_memfd_create));
        assert!(!has(ThreadKind::Vcpu, libc::SYS_memfd_create));
        assert!(!has(ThreadKind::Api, libc::SYS_memfd_create));
        for kind in [ThreadKind::Vmm, ThreadKind::Api] {
            assert!(has(kind, libc::SYS_clone), "{kind:?}");
        }
        assert!(!has(ThreadKind::Vcpu, libc::SYS_clone));
        assert!(!has(ThreadKind::Vcpu, libc::SYS_socket));
        assert!(!has(ThreadKind::Api, libc::SYS_ioctl));
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Api] {
            for nr in [libc::SYS_execve, libc::SYS_fork, libc::SYS_ptrace] {
                assert!(!has(kind, nr), "{kind:?} allows {nr}");
            }
        }
    }

    #[test]
    fn the_vmm_list_allows_every_call_of_the_vcpu_list() {
        // vCPU threads run under both filters.
        let vmm = allowed(ThreadKind::Vmm).unwrap();
        for nr in allowed(ThreadKind::Vcpu).unwrap().keys() {
            assert!(vmm.contains_key(nr), "system call {nr}");
        }
        let vmm_ioctls = vmm_kvm_ioctls();
        for request in [kvm::KVM_RUN(), kvm::KVM_GET_REGS(), kvm::KVM_GET_SREGS()] {
            assert!(vmm_ioctls.contains(&request), "{request:#x}");
        }
    }

    #[test]
    fn conditional_and_unconditional_rules_merge_to_unconditional() {
        let mut a = Allow::default();
        a.when_arg_in(libc::SYS_openat, 2, &[0])
            .always(&[libc::SYS_openat]);
        a.when_arg_in(libc::SYS_openat, 2, &[1]);
        assert!(a.finish().unwrap()[&libc::SYS_openat].is_empty());
    }
}
