//! The few raw OS and libbpf calls the crate makes outside libbpf-rs's safe
//! API. Everything `unsafe` lives here.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use libbpf_rs::{AsRawLibbpf, Link, Program};

/// Linux capability numbers (include/uapi/linux/capability.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Capability {
    NetAdmin = 12,
    SysAdmin = 21,
    Bpf = 39,
}

/// The effective capability set of this process, from /proc/self/status.
pub(crate) fn effective_capabilities() -> io::Result<u64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .ok_or_else(|| io::Error::other("no CapEff line in /proc/self/status"))
}

pub(crate) fn has_capability(caps: u64, cap: Capability) -> bool {
    caps & (1u64 << cap as u32) != 0
}

/// Attaches an sk_msg program to a socket map through a BPF link
/// (`BPF_LINK_TYPE_SOCKMAP`, Linux 6.10), so that dropping the link detaches
/// it. libbpf-rs 0.27's `attach_sockmap` uses the legacy, link-less attach.
pub(crate) fn attach_sockmap_link(prog: &Program<'_>, map: BorrowedFd<'_>) -> io::Result<Link> {
    // SAFETY: `prog` is a loaded libbpf program that outlives this call, and
    // `map` is an open fd for the duration of the call.
    let raw = unsafe {
        libbpf_sys::bpf_program__attach_sockmap(prog.as_libbpf_object().as_ptr(), map.as_raw_fd())
    };
    match NonNull::new(raw) {
        // SAFETY: libbpf returned a valid, newly created link that nothing
        // else owns; `Link` destroys it (detaching the program) on drop.
        Some(ptr) => Ok(unsafe { Link::from_ptr(ptr) }),
        None => Err(io::Error::last_os_error()),
    }
}

/// Borrowed fd of a libbpf-rs map (helper to keep call sites short).
pub(crate) fn map_fd<M: AsFd>(map: &M) -> BorrowedFd<'_> {
    map.as_fd()
}

/// Bytes waiting to be read on a socket (`ioctl(FIONREAD)`).
pub(crate) fn bytes_readable(fd: std::os::fd::RawFd) -> io::Result<usize> {
    let mut count: nix::libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through a valid pointer; `fd` is open
    // for the duration of the call (borrowed from a live socket).
    let rc = unsafe { nix::libc::ioctl(fd, nix::libc::FIONREAD, &mut count) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(count.max(0) as usize)
}
