//! The few raw OS and libbpf calls the crate makes outside libbpf-rs's safe
//! API. Everything `unsafe` lives here.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use libbpf_rs::{AsRawLibbpf, Link, Program};

use crate::attachment::SockmapHook;

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

/// Whether a bpf() error says the kernel lacks the feature (EINVAL,
/// EOPNOTSUPP, or the kernel-internal ENOTSUPP that leaks out of bpf()).
pub(crate) fn is_unsupported(err: &io::Error) -> bool {
    const ENOTSUPP: i32 = 524;
    matches!(err.raw_os_error(), Some(code)
        if code == nix::libc::EINVAL || code == nix::libc::EOPNOTSUPP || code == ENOTSUPP)
}

fn sockmap_attach_type(hook: SockmapHook) -> libbpf_sys::bpf_attach_type {
    match hook {
        SockmapHook::MsgVerdict => libbpf_sys::BPF_SK_MSG_VERDICT,
        SockmapHook::SkbVerdict => libbpf_sys::BPF_SK_SKB_VERDICT,
    }
}

/// `bpf(BPF_PROG_ATTACH)` of a program to a socket map (no link; kernels
/// before 6.10). Needs CAP_NET_ADMIN.
pub(crate) fn sockmap_prog_attach(
    prog: BorrowedFd<'_>,
    map: BorrowedFd<'_>,
    hook: SockmapHook,
) -> io::Result<()> {
    // SAFETY: plain integer arguments; both fds are open for the call.
    let rc = unsafe {
        libbpf_sys::bpf_prog_attach(
            prog.as_raw_fd(),
            map.as_raw_fd(),
            sockmap_attach_type(hook),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::from_raw_os_error(-rc));
    }
    Ok(())
}

/// `bpf(BPF_PROG_DETACH)` of a program attached by [`sockmap_prog_attach`].
pub(crate) fn sockmap_prog_detach(
    prog: BorrowedFd<'_>,
    map: BorrowedFd<'_>,
    hook: SockmapHook,
) -> io::Result<()> {
    // SAFETY: plain integer arguments; both fds are open for the call.
    libbpf_result(unsafe {
        libbpf_sys::bpf_prog_detach2(prog.as_raw_fd(), map.as_raw_fd(), sockmap_attach_type(hook))
    })
}

/// libbpf's convention: a negative errno on failure.
fn libbpf_result(rc: i32) -> io::Result<()> {
    if rc < 0 {
        return Err(io::Error::from_raw_os_error(-rc));
    }
    Ok(())
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

fn getsockopt_into<T>(
    fd: std::os::fd::RawFd,
    level: i32,
    name: i32,
    value: &mut T,
) -> io::Result<()> {
    let mut len = size_of::<T>() as nix::libc::socklen_t;
    // SAFETY: `value` is a valid, writable T and `len` its size; the kernel
    // writes at most `len` bytes.
    let rc = unsafe { nix::libc::getsockopt(fd, level, name, (value as *mut T).cast(), &mut len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes that have entered a TCP socket's send queue since it was created
/// (acknowledged plus still queued; the SYN counts as one): `tcp_info`'s
/// `tcpi_bytes_acked` plus `ioctl(SIOCOUTQ)`.
pub(crate) fn bytes_into_send_queue(fd: std::os::fd::RawFd) -> io::Result<u64> {
    // SAFETY: an all-zero tcp_info is a valid value of this plain C struct.
    let mut info: nix::libc::tcp_info = unsafe { std::mem::zeroed() };
    getsockopt_into(fd, nix::libc::IPPROTO_TCP, nix::libc::TCP_INFO, &mut info)?;
    let mut outq: nix::libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the valid pointer.
    if unsafe { nix::libc::ioctl(fd, nix::libc::TIOCOUTQ, &mut outq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked + outq.max(0) as u64)
}

/// Sets SO_RCVLOWAT. As a side effect the kernel re-runs the socket's
/// data-ready callback, which makes a stream verdict program see bytes
/// queued before the socket joined the map.
pub(crate) fn set_rcvlowat(fd: std::os::fd::RawFd, bytes: i32) -> io::Result<()> {
    // SAFETY: SO_RCVLOWAT takes an int, passed by a valid pointer and size.
    let rc = unsafe {
        nix::libc::setsockopt(
            fd,
            nix::libc::SOL_SOCKET,
            nix::libc::SO_RCVLOWAT,
            (&bytes as *const i32).cast(),
            size_of::<i32>() as nix::libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The cookie of the network namespace a socket lives in
/// (`SO_NETNS_COOKIE`, Linux 5.14), as BPF's `bpf_get_netns_cookie` sees it.
pub(crate) fn netns_cookie(fd: std::os::fd::RawFd) -> io::Result<u64> {
    const SO_NETNS_COOKIE: i32 = 71; // asm-generic (x86_64, arm64)
    let mut cookie: u64 = 0;
    getsockopt_into(fd, nix::libc::SOL_SOCKET, SO_NETNS_COOKIE, &mut cookie)?;
    Ok(cookie)
}

/// The pending error of a socket (SO_ERROR), 0 if none.
pub(crate) fn socket_error(fd: std::os::fd::RawFd) -> io::Result<i32> {
    let mut err: i32 = 0;
    getsockopt_into(fd, nix::libc::SOL_SOCKET, nix::libc::SO_ERROR, &mut err)?;
    Ok(err)
}

/// poll(2) on sockets, each for its own `events`; returns each fd's
/// revents bits (including POLLRDHUP, which nix's PollFlags cannot
/// represent on output).
pub(crate) fn poll_events<const N: usize>(
    fds: [(std::os::fd::RawFd, i16); N],
    timeout_ms: i32,
) -> io::Result<[i16; N]> {
    let mut pollfds = fds.map(|(fd, events)| nix::libc::pollfd {
        fd,
        events,
        revents: 0,
    });
    // SAFETY: `pollfds` is a valid array of N pollfd structs for the call.
    let rc = unsafe { nix::libc::poll(pollfds.as_mut_ptr(), N as nix::libc::nfds_t, timeout_ms) };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
    Ok(pollfds.map(|p| p.revents))
}
