//! Socket options and queries the tests compare between plain and
//! accelerated sockets. They panic on failure: a failing call is a broken
//! test, not a result.

use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::socket::{setsockopt, sockopt};

nix::ioctl_read_bad!(fionread_ioctl, nix::libc::FIONREAD, nix::libc::c_int);

/// Bytes the kernel says are waiting to be read (`ioctl(FIONREAD)`).
pub fn fionread(s: &TcpStream) -> i32 {
    let mut n: nix::libc::c_int = 0;
    // SAFETY: FIONREAD writes one int through the valid pointer; the fd is
    // open for the call.
    unsafe { fionread_ioctl(s.as_raw_fd(), &mut n) }.expect("ioctl(FIONREAD)");
    n
}

/// setsockopt() of an int option nix has no typed wrapper for.
pub fn set_int_option(s: &impl AsRawFd, level: i32, name: i32, value: i32) {
    // SAFETY: the option takes an int, passed by a valid pointer and size.
    let rc = unsafe {
        nix::libc::setsockopt(
            s.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            size_of::<i32>() as nix::libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt({level}, {name})");
}

/// SO_RCVLOWAT: the least a read (and poll's POLLIN) waits for.
pub fn set_rcvlowat(s: &TcpStream, bytes: i32) {
    set_int_option(s, nix::libc::SOL_SOCKET, nix::libc::SO_RCVLOWAT, bytes);
}

/// SO_LINGER with a zero timeout: closing the socket sends a reset.
pub fn set_linger_zero(s: &TcpStream) {
    let linger = nix::libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    setsockopt(s, sockopt::Linger, &linger).expect("SO_LINGER");
}

/// Whether `s` becomes readable within `ms` milliseconds (poll).
pub fn readable_within(s: &impl AsFd, ms: u16) -> bool {
    let mut fds = [PollFd::new(s.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::from(ms)).expect("poll") == 1
}

/// The socket's TCP state (`TCP_INFO`'s `tcpi_state`, e.g. 8 = CLOSE_WAIT:
/// the peer's FIN has arrived).
pub fn tcp_state(s: &TcpStream) -> u8 {
    let mut info = std::mem::MaybeUninit::<nix::libc::tcp_info>::zeroed();
    let mut len = size_of::<nix::libc::tcp_info>() as nix::libc::socklen_t;
    // SAFETY: TCP_INFO writes at most `len` bytes into `info`, which is
    // that large; the fd is open for the call.
    let rc = unsafe {
        nix::libc::getsockopt(
            s.as_raw_fd(),
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    assert_eq!(rc, 0, "getsockopt(TCP_INFO)");
    // SAFETY: zero-initialised, then (partly) written by the kernel.
    unsafe { info.assume_init() }.tcpi_state
}
