//! Sockets in blocking mode, which the kernel's socket-map receive path
//! cannot serve safely.
//!
//! A socket in a socket map is read through `tcp_bpf_recvmsg`, which
//! returns EAGAIN to a *blocking* `read()` whenever the socket's wait queue
//! is woken with nothing to read, as happens when another thread writes to
//! the same socket at the same time. Plain TCP waits again instead.
//! Thread-per-direction programs with blocking sockets (Python threads,
//! many C daemons) treat that EAGAIN as fatal; event loops use
//! non-blocking sockets and are unaffected. So by default a connection
//! whose connecting socket is blocking when it calls `connect()` stays on
//! plain TCP, and so does its accepted peer.
//!
//! What this cannot see: an accepted socket has no file until `accept()`,
//! after the pairing is decided, and a socket may be switched to blocking
//! after a non-blocking `connect()` (hiredis does). Such paired sockets are
//! counted in [`Stats::blocking_paired`](crate::Stats::blocking_paired) at
//! their first send; they stay on the shortcut (leaving the map would lose
//! what is queued for them).

/// Whether connections from sockets that are blocking at `connect()` are
/// accelerated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum BlockingSockets {
    /// Keep them on plain TCP, counted in
    /// [`Stats::blocking_skipped`](crate::Stats::blocking_skipped).
    #[default]
    KeepPlain,
    /// Accelerate them too. **A blocking read may then fail with EAGAIN**
    /// while another thread uses the same socket: only for programs known
    /// to read and write each blocking socket from one thread, or to retry
    /// EAGAIN.
    Accelerate,
}
