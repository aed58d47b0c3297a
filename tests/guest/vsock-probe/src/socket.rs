//! AF_VSOCK stream sockets for guest-side programs (`vsock-probe`,
//! `sandbox-agent`): connect to a CID and port, or listen on a port and
//! accept connections. std has no vsock support; connections are plain
//! [`File`]s.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

/// The host's CID, as the guest sees it.
pub const HOST_CID: u32 = libc::VMADDR_CID_HOST;

/// `sizeof(struct sockaddr_vm)` (16 bytes).
const ADDR_LEN: libc::socklen_t = 16;

fn vsock_socket() -> io::Result<OwnedFd> {
    // SAFETY: socket() takes no pointers; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn address(cid: u32, port: u32) -> libc::sockaddr_vm {
    const _: () = assert!(std::mem::size_of::<libc::sockaddr_vm>() == ADDR_LEN as usize);
    // SAFETY: sockaddr_vm is plain data; all-zero is valid.
    let mut addr: libc::sockaddr_vm = unsafe { std::mem::zeroed() };
    addr.svm_family = libc::sa_family_t::try_from(libc::AF_VSOCK).unwrap_or_default();
    addr.svm_cid = cid;
    addr.svm_port = port;
    addr
}

/// Connects to `port` of `cid`.
pub fn connect(cid: u32, port: u32) -> io::Result<File> {
    let fd = vsock_socket()?;
    let addr = address(cid, port);
    // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes.
    let ret = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            ADDR_LEN,
        )
    };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(File::from(fd))
}

/// Shuts down the writing half of a vsock connection: the peer reads EOF.
pub fn shutdown_write(conn: &File) -> io::Result<()> {
    // SAFETY: shutdown on a descriptor the File owns; no memory is passed.
    if unsafe { libc::shutdown(conn.as_raw_fd(), libc::SHUT_WR) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A vsock socket listening on a port of every local CID.
#[derive(Debug)]
pub struct Listener(OwnedFd);

impl Listener {
    /// Binds to `port` and listens with a backlog of `backlog`.
    pub fn bind(port: u32, backlog: i32) -> io::Result<Listener> {
        let fd = vsock_socket()?;
        let addr = address(libc::VMADDR_CID_ANY, port);
        // SAFETY: addr is a valid sockaddr_vm of ADDR_LEN bytes.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
                ADDR_LEN,
            )
        };
        if ret != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: listen on a socket we own; no memory is passed.
        if unsafe { libc::listen(fd.as_raw_fd(), backlog) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Listener(fd))
    }

    /// Waits for the next connection (retrying when a signal interrupts).
    pub fn accept(&self) -> io::Result<File> {
        loop {
            // SAFETY: accept without an address buffer on a socket we own.
            let c = unsafe {
                libc::accept4(
                    self.0.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if c >= 0 {
                // SAFETY: c is a fresh descriptor owned by nobody else.
                return Ok(File::from(unsafe { OwnedFd::from_raw_fd(c) }));
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
