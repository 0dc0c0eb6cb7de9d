//! The few raw OS and libbpf calls the crate makes outside libbpf-rs's safe
//! API. The crate denies `unsafe` everywhere else except `abi` (byte views
//! of the shared structs) and `programs` (the skeleton's storage).

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

use libbpf_rs::{AsRawLibbpf, Link, Program};

use crate::abi;

/// Which socket-map hook a program goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SockmapHook {
    /// `BPF_SK_MSG_VERDICT`: every sendmsg() of a socket in the map.
    MsgVerdict,
    /// `BPF_SK_SKB_VERDICT`: every segment a socket in the map receives.
    SkbVerdict,
}

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
pub(crate) fn bytes_readable(fd: BorrowedFd<'_>) -> io::Result<usize> {
    let mut count: nix::libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through a valid pointer; `fd` is open
    // for the duration of the call (borrowed from a live socket).
    let rc = unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::FIONREAD, &mut count) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(count.max(0) as usize)
}

fn getsockopt_into<T>(fd: BorrowedFd<'_>, level: i32, name: i32, value: &mut T) -> io::Result<()> {
    let mut len = size_of::<T>() as nix::libc::socklen_t;
    // SAFETY: `value` is a valid, writable T and `len` its size; the kernel
    // writes at most `len` bytes.
    let rc = unsafe {
        nix::libc::getsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (value as *mut T).cast(),
            &mut len,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Bytes that have entered a TCP socket's send queue since it was created
/// (acknowledged plus still queued; the SYN counts as one): `tcp_info`'s
/// `tcpi_bytes_acked` plus `ioctl(SIOCOUTQ)`.
pub(crate) fn bytes_into_send_queue(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // SAFETY: an all-zero tcp_info is a valid value of this plain C struct.
    let mut info: nix::libc::tcp_info = unsafe { std::mem::zeroed() };
    getsockopt_into(fd, nix::libc::IPPROTO_TCP, nix::libc::TCP_INFO, &mut info)?;
    let mut outq: nix::libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one int through the valid pointer.
    if unsafe { nix::libc::ioctl(fd.as_raw_fd(), nix::libc::TIOCOUTQ, &mut outq) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(info.tcpi_bytes_acked + outq.max(0) as u64)
}

/// Sets SO_RCVLOWAT. As a side effect the kernel re-runs the socket's
/// data-ready callback, which makes a stream verdict program see bytes
/// queued before the socket joined the map.
pub(crate) fn set_rcvlowat(fd: BorrowedFd<'_>, bytes: i32) -> io::Result<()> {
    set_int_option(fd, nix::libc::SOL_SOCKET, nix::libc::SO_RCVLOWAT, bytes)
}

/// `setsockopt(TCP_LINGER2, -1)`: closed while its FIN waits for the
/// peer's (FIN_WAIT2), the socket is aborted instead of lingering, so a
/// peer that still sends learns at once that nobody reads.
pub(crate) fn abort_in_fin_wait2(fd: BorrowedFd<'_>) -> io::Result<()> {
    set_int_option(fd, nix::libc::IPPROTO_TCP, nix::libc::TCP_LINGER2, -1)
}

fn set_int_option(fd: BorrowedFd<'_>, level: i32, name: i32, value: i32) -> io::Result<()> {
    // SAFETY: the option takes an int, passed by a valid pointer and size.
    let rc = unsafe {
        nix::libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as nix::libc::socklen_t,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

pub(crate) fn netns_cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    const SO_NETNS_COOKIE: i32 = 71; // asm-generic (x86_64, arm64)
    let mut cookie: u64 = 0;
    getsockopt_into(fd, nix::libc::SOL_SOCKET, SO_NETNS_COOKIE, &mut cookie)?;
    Ok(cookie)
}

/// A pipe for splice(2): both ends non-blocking and close-on-exec
/// (`pipe2`), [read end, write end].
pub(crate) fn pipe() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use nix::fcntl::OFlag;
    nix::unistd::pipe2(OFlag::O_NONBLOCK | OFlag::O_CLOEXEC).map_err(io::Error::from)
}

/// Moves up to `len` bytes from `from` to `to` inside the kernel, without
/// blocking (`splice(2)` with `SPLICE_F_NONBLOCK | SPLICE_F_MOVE`; one of
/// the two must be a pipe). 0: `from` is at its end.
pub(crate) fn splice(from: BorrowedFd<'_>, to: BorrowedFd<'_>, len: usize) -> nix::Result<usize> {
    use nix::fcntl::SpliceFFlags;
    nix::fcntl::splice(
        from,
        None,
        to,
        None,
        len,
        SpliceFFlags::SPLICE_F_NONBLOCK | SpliceFFlags::SPLICE_F_MOVE,
    )
}

/// The pending error of a socket (SO_ERROR), 0 if none.
pub(crate) fn socket_error(fd: BorrowedFd<'_>) -> io::Result<i32> {
    let mut err: i32 = 0;
    getsockopt_into(fd, nix::libc::SOL_SOCKET, nix::libc::SO_ERROR, &mut err)?;
    Ok(err)
}

/// Both mode: how many segments wait in an accelerated socket's psock
/// backlog, as `fp_backlog_query` answers getsockopt(FP_SOL_FASTPATH,
/// FP_SO_BACKLOG_LEN) for sockets of the guard's cgroup (ENOPROTOOPT for
/// others, or with the program detached).
pub(crate) fn psock_backlog_len(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut len: u32 = 0;
    getsockopt_into(
        fd,
        abi::FP_SOL_FASTPATH as i32,
        abi::FP_SO_BACKLOG_LEN,
        &mut len,
    )?;
    Ok(len)
}

/// poll(2) on sockets, each for its own `events`; returns each fd's
/// revents bits (including POLLRDHUP, which nix's PollFlags cannot
/// represent on output).
pub(crate) fn poll_events<const N: usize>(
    fds: [(BorrowedFd<'_>, i16); N],
    timeout_ms: i32,
) -> io::Result<[i16; N]> {
    let mut pollfds = fds.map(|(fd, events)| nix::libc::pollfd {
        fd: fd.as_raw_fd(),
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

/// Creates `N` IPv4 TCP sockets that belong to the cgroup directory
/// `cgroup`, without moving this process there. A socket keeps the cgroup
/// of the task that created it (and an accepted socket its listener's), so
/// a forked child is moved into the cgroup, creates the sockets and passes
/// them back over a socketpair (SCM_RIGHTS). The caller's cgroup, and so
/// its resource limits and accounting, never change.
///
/// Needs write access to the cgroup's `cgroup.procs`.
pub(crate) fn tcp_sockets_created_in<const N: usize>(
    cgroup: &std::path::Path,
) -> io::Result<[std::os::fd::OwnedFd; N]> {
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::os::unix::net::UnixStream;

    let (ours, theirs) = UnixStream::pair()?;
    let (go_read, go_write) = nix::unistd::pipe()?;
    // SAFETY: the child runs only `create_and_send` (plain system calls on
    // stack buffers: no allocation, no locks, no Rust destructors) and then
    // `_exit`, which is what a fork child of a multi-threaded process may do.
    let pid = unsafe { nix::libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        let code = create_and_send::<N>(go_read.as_raw_fd(), theirs.as_raw_fd());
        // SAFETY: ends the child at once, skipping the parent's atexit
        // handlers and destructors, which are not the child's to run.
        unsafe { nix::libc::_exit(code) };
    }
    drop((theirs, go_read));
    let moved = std::fs::write(cgroup.join("cgroup.procs"), pid.to_string());
    let go: &[u8] = if moved.is_ok() { b"1" } else { b"0" };
    let received = nix::unistd::write(&go_write, go)
        .map_err(io::Error::from)
        .and_then(|_| receive_fds::<N>(ours.as_raw_fd()));
    let mut status = 0;
    // SAFETY: reaps our own child; `status` is a valid out-pointer.
    unsafe { nix::libc::waitpid(pid, &mut status, 0) };
    moved?;
    let fds = received?;
    // SAFETY: each fd was just received through SCM_RIGHTS: open, and owned
    // by nothing else in this process.
    Ok(fds.map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// The child's half: waits for the go byte, creates the sockets and sends
/// them. Returns the exit code.
fn create_and_send<const N: usize>(go: i32, to: i32) -> i32 {
    use nix::libc;
    let mut byte = 0u8;
    // SAFETY: reads one byte into a valid stack buffer.
    if unsafe { libc::read(go, (&mut byte as *mut u8).cast(), 1) } != 1 || byte != b'1' {
        return 1;
    }
    let mut fds = [0i32; N];
    for fd in &mut fds {
        // SAFETY: socket(2) with constant arguments.
        *fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if *fd < 0 {
            return 2;
        }
    }
    // Room for one SCM_RIGHTS message of up to 8 fds, aligned for cmsghdr.
    let mut control = [0u64; 8];
    let fds_len = (N * size_of::<i32>()) as u32;
    let mut data = [b'f'];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // SAFETY: an all-zero msghdr is valid; every pointer set below refers to
    // a live stack buffer of the stated length, and the control buffer holds
    // CMSG_SPACE(fds_len) bytes (checked), so the CMSG_* accessors stay in it.
    unsafe {
        let space = libc::CMSG_SPACE(fds_len) as usize;
        if N > 8 || space > size_of_val(&control) {
            return 3;
        }
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = space as _;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(fds_len) as _;
        std::ptr::copy_nonoverlapping(fds.as_ptr(), libc::CMSG_DATA(cmsg).cast::<i32>(), N);
        if libc::sendmsg(to, &msg, 0) != 1 {
            return 4;
        }
    }
    0
}

/// Receives the `N` fds `create_and_send` sends.
fn receive_fds<const N: usize>(from: i32) -> io::Result<[i32; N]> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags};
    let mut data = [0u8; 1];
    let mut iov = [io::IoSliceMut::new(&mut data)];
    let mut space = nix::cmsg_space!([i32; 8]);
    let msg = recvmsg::<()>(from, &mut iov, Some(&mut space), MsgFlags::MSG_CMSG_CLOEXEC)?;
    let mut fds = Vec::new();
    for cmsg in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(received) = cmsg {
            fds.extend(received);
        }
    }
    fds.try_into().map_err(|fds: Vec<i32>| {
        for fd in &fds {
            // SAFETY: closes fds we received and own; nothing else uses them.
            unsafe { nix::libc::close(*fd) };
        }
        io::Error::other(format!(
            "the helper process sent {} sockets, {N} expected (exit before sending?)",
            fds.len()
        ))
    })
}

#[cfg(test)]
mod tests {
    /// A cgroup that cannot be joined: the error says so, and the helper
    /// process is gone (reaped, not left as a zombie).
    #[test]
    fn sockets_in_a_missing_cgroup_fail_cleanly() {
        let err = super::tcp_sockets_created_in::<2>(std::path::Path::new(
            "/nonexistent-sockmap-fastpath-cgroup",
        ))
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::NotFound, "{err}");
        let children: String = std::fs::read_dir("/proc/self/task")
            .unwrap()
            .map(|task| {
                let children = task.unwrap().path().join("children");
                std::fs::read_to_string(children).unwrap_or_default()
            })
            .collect();
        assert_eq!(children.trim(), "", "a helper process is left");
    }
}
