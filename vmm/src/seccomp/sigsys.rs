//! The SIGSYS handler: a forbidden system call (`SECCOMP_RET_TRAP`) ends
//! tidevm with one line naming the thread and the call, e.g.
//!
//! ```text
//! tidevm: seccomp: thread 'tidevm-vcpu0' made a forbidden system call 110 (getppid)
//! ```
//!
//! The handler runs in whatever thread broke its filter, possibly inside
//! the allocator or holding a lock, so it only uses async-signal-safe
//! calls: `prctl(PR_GET_NAME)`, `write` and `_exit`, which every filter
//! allows; it formats into a buffer on its stack.

use super::names::SYSCALL_NAMES;

/// tidevm's exit status after a forbidden system call: 128 + SIGSYS, what
/// a shell shows for a process killed by SIGSYS (tidevm's own statuses are
/// 0, 1 and 2).
pub const SECCOMP_EXIT_CODE: i32 = 128 + libc::SIGSYS;

/// `si_code` of a SIGSYS raised by seccomp.
const SYS_SECCOMP: i32 = 1;

/// The head of `siginfo_t` as the kernel fills it for SIGSYS on x86_64
/// (`_sigsys` of `union __sifields`; the libc crate does not expose it).
#[repr(C)]
struct SigsysInfo {
    signo: i32,
    errno: i32,
    code: i32,
    _pad: i32,
    call_addr: *mut libc::c_void,
    syscall: i32,
    arch: u32,
}

/// A message built without allocating.
struct Message {
    buf: [u8; 256],
    len: usize,
}

impl Message {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, n: i64) {
        if n < 0 {
            self.push(b"-");
        }
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut v = n.unsigned_abs();
        loop {
            i -= 1;
            // `v % 10` is below 10.
            digits[i] = b'0' + (v % 10) as u8;
            v /= 10;
            if v == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The message for a SIGSYS with `code`, for system call `nr`, in thread `thread`.
fn message(thread: &[u8], code: i32, nr: i32) -> Message {
    let mut m = Message {
        buf: [0; 256],
        len: 0,
    };
    m.push(b"tidevm: seccomp: thread '");
    m.push(thread);
    if code == SYS_SECCOMP {
        m.push(b"' made a forbidden system call ");
        m.push_number(i64::from(nr));
        let name = usize::try_from(nr)
            .ok()
            .and_then(|i| SYSCALL_NAMES.get(i))
            .copied()
            .filter(|n| !n.is_empty())
            .unwrap_or("unknown");
        m.push(b" (");
        m.push(name.as_bytes());
        m.push(b")\n");
    } else {
        m.push(b"' received SIGSYS with code ");
        m.push_number(i64::from(code));
        m.push(b"\n");
    }
    m
}

extern "C" fn on_sigsys(_signo: libc::c_int, info: *mut libc::siginfo_t, _ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for a SA_SIGINFO handler;
    // SigsysInfo describes its first bytes for SIGSYS.
    let (code, nr) = unsafe {
        let info = &*info.cast::<SigsysInfo>();
        (info.code, info.syscall)
    };
    let mut name = [0u8; 17];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into the
    // buffer, which has room for 17.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    let len = name.iter().position(|&b| b == 0).unwrap_or(16);
    let m = message(&name[..len], code, nr);
    // SAFETY: write and _exit are async-signal-safe; the buffer is valid
    // for `m.len` bytes.
    unsafe {
        libc::write(libc::STDERR_FILENO, m.buf.as_ptr().cast(), m.len);
        libc::_exit(SECCOMP_EXIT_CODE);
    }
}

/// Installs the SIGSYS handler for the whole process (before any filter).
pub fn install_sigsys_handler() -> Result<(), super::SeccompError> {
    // SAFETY: the sigaction struct is zeroed then filled with a handler of
    // the SA_SIGINFO signature; the old action is not needed.
    let ret = unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            on_sigsys;
        action.sa_sigaction = handler as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut())
    };
    if ret != 0 {
        return Err(super::SeccompError::Handler(std::io::Error::last_os_error()));
    }
    // SAFETY: the set is initialized by sigemptyset before use; only the
    // calling thread's mask changes (threads started later inherit it).
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGSYS);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Message) -> &str {
        std::str::from_utf8(&m.buf[..m.len]).unwrap()
    }

    #[test]
    fn the_message_names_thread_number_and_call() {
        assert_eq!(
            text(&message(b"tidevm-vcpu0", SYS_SECCOMP, 110)),
            "tidevm: seccomp: thread 'tidevm-vcpu0' made a forbidden system call 110 (getppid)\n"
        );
        assert_eq!(
            text(&message(b"tidevm", SYS_SECCOMP, 435)),
            "tidevm: seccomp: thread 'tidevm' made a forbidden system call 435 (clone3)\n"
        );
        assert_eq!(
            text(&message(b"x", SYS_SECCOMP, 9999)),
            "tidevm: seccomp: thread 'x' made a forbidden system call 9999 (unknown)\n"
        );
        assert_eq!(
            text(&message(b"x", 0, -1)),
            "tidevm: seccomp: thread 'x' received SIGSYS with code 0\n"
        );
    }

    #[test]
    fn names_match_libc_numbers() {
        for (nr, name) in [
            (libc::SYS_read, "read"),
            (libc::SYS_ioctl, "ioctl"),
            (libc::SYS_getppid, "getppid"),
            (libc::SYS_clone3, "clone3"),
        ] {
            assert_eq!(SYSCALL_NAMES[usize::try_from(nr).unwrap()], name);
        }
    }

    #[test]
    fn a_long_thread_name_cannot_overflow_the_buffer() {
        let m = message(&[b'a'; 400], SYS_SECCOMP, 1);
        assert_eq!(m.len, m.buf.len());
    }
}
