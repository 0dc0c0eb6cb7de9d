//! Egress and both modes: the kernel forwards between a proxy's two
//! connections.
//!
//! # Hand-over protocol
//! 1. Accept the downstream connection and connect upstream.
//! 2. Look at what you need with `MSG_PEEK` (it stays queued and is
//!    forwarded), or read it and write it, or whatever replaces it, to the
//!    other side yourself, all **before** calling
//!    [`FastpathGuard::forward`](crate::FastpathGuard::forward).
//! 3. After `forward()`, do not read or write either socket: the kernel
//!    moves the bytes. Call [`Forwarding::wait`] (blocking) to pass
//!    half-closes and resets on and learn when the pair has ended, then
//!    drop your streams. A [`Forwarder`] does the same for any number of
//!    pairs from one thread and takes the streams
//!    ([`Forwarder::forward`]; [`ForwardedPair`] is waited on or awaited).
//!
//! Bytes already queued on a socket when it is handed over are forwarded
//! too. A segment that arrives while `forward()` has put one socket into
//! the map and not yet the other stays in the receiving socket's queue,
//! later ones queue behind it (from Linux 6.2; `Stats::fwd_queued_behind`),
//! and `wait()` copies them to the other socket, consuming each chunk only
//! after it was written. A FIN is passed on only after every byte received
//! before it has entered the other socket's send queue, so nothing is cut
//! off.
//!
//! # Back-pressure (Linux 6.2)
//! When the other socket's forwarding backlog holds 64 segments (its
//! receiver is slower), the program keeps what arrives on the receiving
//! socket, so TCP's window closes on the sender; `wait()` copies those
//! bytes once the backlog has sent what came before them
//! (`Stats::fwd_backlog_kept`, [`ForwardStats::copied`]). In both mode
//! the same holds for bytes from upstream; an application's bytes queued
//! on the downstream socket while the upstream has no room are not
//! bounded (docs/known-limits.md).
//!
//! # Adaptive path
//! [`Forwarder::with_path`]`(`[`ForwardPath::ADAPTIVE`]`)`: the forwarder
//! relays each pair itself first (long runs spliced, short reads copied)
//! and hands it to the kernel once its traffic shows request/response
//! turns, at most one pair per CPU at a time; bulk pairs stay on the
//! relay, where they move fastest. [`ForwardStats::relayed`] counts what
//! the relay moved. Egress mode only (docs/proxy-modes.md).
//!
//! # Both mode
//! In [`RedirectMode::Both`](crate::RedirectMode::Both) the downstream
//! socket may be accelerated itself (its client is a local application in
//! the cgroup). Then the application's bytes were redirected into the
//! downstream socket's queue, where no forwarding program sees them.
//! `wait()` copies such bytes to the upstream socket. Each later message of
//! the application leaves straight through the upstream socket if nothing
//! waits in the downstream queue and the upstream socket has room (so the
//! application never waits on the proxy's socket); otherwise it joins the
//! queue. Bytes are consumed from the downstream socket only after they
//! were written upstream, so no byte overtakes another.
//! Bytes from upstream travel as in egress mode, through the downstream
//! socket's send path. If the upstream socket is accelerated too (its
//! server is local and selected), the server's bytes land in its queue and
//! `wait()` copies them to the downstream socket likewise; such a pair
//! never sends straight upstream.

mod forwarder;
mod handover;
mod pump;
mod relay;

use std::net::TcpStream;
use std::sync::Arc;

use libbpf_rs::{MapCore, MapFlags};

use crate::abi::{fp_fwd_dir, fp_sock_key, Plain};
use crate::error::{Error, Result};

pub use forwarder::{ForwardedPair, Forwarder, Refused};
pub use relay::ForwardPath;

pub(crate) use handover::{DirectMaps, ForwardMaps, NotEstablished};

/// How a forwarded pair ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForwardEnd {
    /// Both sides half-closed; every byte was passed on.
    Closed,
    /// The downstream side was reset (or failed); both sides have
    /// SO_LINGER 0 set, so dropping them resets both connections (a peer
    /// never sees a clean end of a stream that was cut short).
    DownstreamReset,
    /// The upstream side was reset (or failed); likewise.
    UpstreamReset,
}

/// What a forwarded pair moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ForwardStats {
    /// Bytes forwarded from downstream to upstream.
    pub downstream_to_upstream: u64,
    /// Bytes forwarded from upstream to downstream.
    pub upstream_to_downstream: u64,
    /// Of `downstream_to_upstream`, the bytes `wait()` copied in user
    /// space because they were queued on the downstream socket (both mode:
    /// sent before the hand-over, or while the upstream socket had no room;
    /// every mode: kept there while `forward()` inserted the pair, or
    /// while the upstream socket's forwarding backlog was full).
    pub copied_at_hand_over: u64,
    /// Of both directions, the bytes `wait()` copied in user space rather
    /// than the kernel forwarding them: the downstream ones above and,
    /// likewise, upstream ones, and those in `relayed` (all of them when
    /// `in_kernel` is false).
    pub copied: u64,
    /// Of `copied`, the bytes a [`Forwarder`] relayed itself
    /// ([`ForwardPath::Adaptive`]) before it handed the pair to the kernel,
    /// or all of them if it never did.
    pub relayed: u64,
    /// Whether the kernel forwarded the pair (from the start, or after the
    /// relay of [`ForwardPath::Adaptive`]). `false`: a [`Forwarder`] was
    /// handed a socket the kernel no longer takes (its peer had sent its
    /// FIN before the hand-over) and copied the pair in user space, or it
    /// relayed the pair to its end.
    pub in_kernel: bool,
    /// How it ended.
    pub end: ForwardEnd,
}

/// A socket of a forwarded pair.
struct Side {
    stream: TcpStream,
    cookie: u64,
    /// Bytes it had sent when it was handed over (see `Forwarding::sent`).
    sent_before: u64,
    /// Its FIN has been passed on to the other side.
    fin_passed: bool,
    /// Its FIN has arrived, but bytes before it have not all reached the
    /// other side's send queue yet: retried on a short timer, since no
    /// event says when the kernel has moved them.
    draining: bool,
    /// Bytes are left in its receive queue because the other side had no
    /// room: wait for room there.
    blocked: bool,
    /// Bytes the forwarding program kept in its receive queue
    /// (the other side's backlog was full) wait until the backlog has sent
    /// what was forwarded before them: retried on the drain timer, since
    /// no event says when (the other side's POLLOUT can be set while its
    /// backlog still waits for more room).
    held: bool,
    /// Bytes `wait()` copied from its receive queue to the other side.
    copied: u64,
    /// Of `copied`, those copied before the kernel took the pair (a
    /// relayed pair handed over later): the forwarding program counts what
    /// it kept from the hand-over on.
    copied_before_kernel: u64,
    /// Of `copied`, those the relay moved.
    relayed: u64,
    /// Relay: bytes taken off this socket that wait for room on the other
    /// side.
    unsent: Option<relay::Unsent>,
    /// Relay: the last read from this socket took a long run, so the next
    /// is spliced rather than copied.
    streaming: bool,
}

/// A pair the kernel forwards; see the [module docs](self) for the protocol.
/// Call [`wait`](Self::wait): dropping it unwaited leaves forwarding running
/// until the sockets close, but nothing then passes half-closes on, and its
/// entries stay in the `fwd_dirs` (and, in both mode, `proxy_pairs`) maps
/// until the guard's maps are freed. `wait()` is also what copies bytes
/// queued on the sockets (both mode: an application's bytes; every mode:
/// bytes kept while the other side's forwarding backlog was full):
/// unwaited, they stay queued and the pair stalls.
#[must_use = "call wait() to pass half-closes on and learn when the pair ends"]
pub struct Forwarding {
    /// [downstream, upstream]
    sides: [Side; 2],
    maps: Arc<ForwardMaps>,
    /// Both mode: the downstream socket's key in `proxy_pairs`.
    direct_key: Option<fp_sock_key>,
    /// The kernel forwards the pair; else the pump copies every byte.
    in_kernel: bool,
    /// Not in the kernel: the pump relays (`relay_queued`: splice(2) for
    /// long runs, which is safe since the sockets were never in a socket
    /// map, where splice would miss the bytes).
    relay: bool,
    /// [`ForwardPath::Adaptive`]'s limits while the pair is relayed:
    /// (turns, max_turn_bytes).
    promote_after: Option<(u32, u64)>,
    turns: relay::Turns,
    /// Steps in a row that waited for the kernel and found nothing moved
    /// (see [`Forwarding::retry_in`]).
    idle_retries: u32,
}

const DOWN: usize = 0;
const UP: usize = 1;
/// How the pair ends when side `i` fails.
const RESET_BY: [ForwardEnd; 2] = [ForwardEnd::DownstreamReset, ForwardEnd::UpstreamReset];

impl std::fmt::Debug for Forwarding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwarding")
            .field("downstream", &self.sides[DOWN].stream)
            .field("upstream", &self.sides[UP].stream)
            .finish()
    }
}

fn io_err(call: &'static str, what: &'static str) -> impl Fn(std::io::Error) -> Error {
    move |source| Error::io(call, what, source)
}

impl Side {
    /// Bytes copied since the kernel took the pair: what the forwarding
    /// program compares with what it kept (it counts from the hand-over).
    fn copied_in_kernel(&self) -> u64 {
        self.copied - self.copied_before_kernel
    }
}

impl Forwarding {
    /// What the programs sent on so far of the bytes `side` received, or
    /// an application sent to it (zero if the pair's entry is gone).
    fn forwarded_from(&self, side: &Side) -> fp_fwd_dir {
        self.maps
            .dirs
            .lookup(&side.cookie.to_ne_bytes(), MapFlags::ANY)
            .ok()
            .flatten()
            .and_then(|v| fp_fwd_dir::from_bytes(&v))
            .unwrap_or_default()
    }

    /// Blocks until the pair has ended, passing each half-close on once the
    /// bytes before it have reached the other side's send queue, and a reset
    /// on as a reset (SO_LINGER 0 on the other side: drop your streams).
    ///
    /// # Errors
    /// An I/O error from poll or getsockopt.
    pub fn wait(mut self) -> Result<ForwardStats> {
        let end = self.run_until_end();
        self.finish(end)
    }

    /// The two sockets, [downstream, upstream].
    fn fds(&self) -> [std::os::fd::BorrowedFd<'_>; 2] {
        use std::os::fd::AsFd;
        self.sides.each_ref().map(|s| s.stream.as_fd())
    }

    /// What the pair moved, once it has ended (or failed); takes it out of
    /// the maps.
    fn finish(&mut self, end: Result<ForwardEnd>) -> Result<ForwardStats> {
        let [down, up] = &self.sides;
        let stats = ForwardStats {
            downstream_to_upstream: self.forwarded_from(down).total() + down.copied,
            upstream_to_downstream: self.forwarded_from(up).total() + up.copied,
            copied_at_hand_over: if self.in_kernel {
                down.copied - down.copied_before_kernel
            } else {
                0
            },
            copied: down.copied + up.copied,
            relayed: down.relayed + up.relayed,
            in_kernel: self.in_kernel,
            end: end?,
        };
        self.remove_dirs();
        Ok(stats)
    }
}
