//! Egress mode: the kernel forwards between a proxy's two connections.
//!
//! # Hand-over protocol
//! 1. Accept the downstream connection and connect upstream.
//! 2. Look at what you need with `MSG_PEEK` (it stays queued and is
//!    forwarded), or read it and write it, or whatever replaces it, to the
//!    other side yourself, all **before** calling
//!    [`FastpathGuard::forward`](crate::FastpathGuard::forward).
//! 3. After `forward()`, do not read or write either socket: the kernel
//!    moves the bytes. Call [`Forwarding::wait`] (blocking; from async code
//!    use `spawn_blocking`) to pass half-closes and resets on and learn when
//!    the pair has ended, then drop your streams.
//!
//! Bytes already queued on a socket when it is handed over are forwarded
//! too. A FIN is passed on only after every byte received before it has
//! entered the other socket's send queue, so nothing is cut off.

use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use libbpf_rs::{MapCore, MapFlags, MapHandle};
use nix::poll::PollFlags;

use crate::abi::{fp_fwd_dir, Plain};
use crate::error::{Error, Result};
use crate::sys;

/// The peer has shut down its sending side (nix has no constant for it).
const RDHUP: PollFlags = PollFlags::from_bits_retain(nix::libc::POLLRDHUP);

/// How a forwarded pair ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ForwardEnd {
    /// Both sides half-closed; every byte was passed on.
    Closed,
    /// The downstream side was reset (or failed); the upstream side has
    /// SO_LINGER 0 set, so dropping it resets it too.
    DownstreamReset,
    /// The upstream side was reset (or failed); likewise for downstream.
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
    /// How it ended.
    pub end: ForwardEnd,
}

/// A socket of a forwarded pair.
struct Side {
    stream: TcpStream,
    cookie: u64,
    /// Bytes in its send queue's history when it was handed over.
    sent_before: u64,
    /// Its FIN has been passed on to the other side.
    fin_passed: bool,
}

/// A pair the kernel forwards; see the [module docs](self) for the protocol.
/// Call [`wait`](Self::wait): dropping it unwaited leaves forwarding running
/// until the sockets close, but nothing then passes half-closes on, and its
/// entries stay in the `fwd_dirs` map until the guard's maps are freed.
#[must_use = "call wait() to pass half-closes on and learn when the pair ends"]
pub struct Forwarding {
    /// [downstream, upstream]
    sides: [Side; 2],
    dirs: MapHandle,
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

impl Forwarding {
    /// Puts the pair into the forwarding map; called by the guard.
    pub(crate) fn start<M: MapCore>(
        fwd_map: &M,
        dirs: MapHandle,
        down: &impl AsFd,
        up: &impl AsFd,
    ) -> Result<Self> {
        let side = |socket: BorrowedFd<'_>, what: &'static str| -> Result<Side> {
            let stream = TcpStream::from(socket.try_clone_to_owned().map_err(io_err("dup", what))?);
            let cookie = socket2::SockRef::from(&stream)
                .cookie()
                .map_err(io_err("getsockopt(SO_COOKIE)", what))?;
            let sent_before = sys::bytes_into_send_queue(stream.as_raw_fd())
                .map_err(io_err("getsockopt(TCP_INFO)", what))?;
            Ok(Side {
                stream,
                cookie,
                sent_before,
                fin_passed: false,
            })
        };
        let (down, up) = (
            side(down.as_fd(), "downstream socket")?,
            side(up.as_fd(), "upstream socket")?,
        );
        let forwarding = Forwarding {
            sides: [down, up],
            dirs,
        };
        forwarding.insert(fwd_map)?;
        // Bytes queued before the hand-over: make the verdict see them.
        for side in &forwarding.sides {
            sys::set_rcvlowat(side.stream.as_raw_fd(), 1)
                .map_err(io_err("setsockopt(SO_RCVLOWAT)", "forwarded socket"))?;
        }
        Ok(forwarding)
    }

    /// Inserts both directions, then both sockets. On failure it removes
    /// only the direction entries it added (the sockets may belong to a pair
    /// already forwarded); a socket already added to `fwd_map` stays there,
    /// unpaired, so its bytes remain readable by the proxy (deleting a map
    /// entry would drop bytes queued on it).
    fn insert<M: MapCore>(&self, fwd_map: &M) -> Result<()> {
        const REFUSED: &str =
            "bpf(BPF_MAP_UPDATE_ELEM) on fwd_dirs/fwd_map (socket already forwarded, or map full)";
        let mut added = Vec::new();
        let result = (|| {
            for (from, to) in [
                (&self.sides[DOWN], &self.sides[UP]),
                (&self.sides[UP], &self.sides[DOWN]),
            ] {
                let dir = fp_fwd_dir {
                    peer_cookie: to.cookie,
                    bytes: 0,
                };
                let key = from.cookie.to_ne_bytes();
                self.dirs
                    .update(&key, dir.as_bytes(), MapFlags::NO_EXIST)
                    .map_err(|e| Error::bpf(REFUSED, e))?;
                added.push(key);
            }
            for side in &self.sides {
                let fd = side.stream.as_raw_fd() as u64;
                fwd_map
                    .update(
                        &side.cookie.to_ne_bytes(),
                        &fd.to_ne_bytes(),
                        MapFlags::NO_EXIST,
                    )
                    .map_err(|e| Error::bpf(REFUSED, e))?;
            }
            Ok(())
        })();
        if result.is_err() {
            for key in added {
                let _ = self.dirs.delete(&key);
            }
        }
        result
    }

    fn remove_dirs(&self) {
        for side in &self.sides {
            let _ = self.dirs.delete(&side.cookie.to_ne_bytes());
        }
    }

    /// Bytes forwarded so far out of the socket with this cookie's peer.
    fn forwarded_from(&self, side: &Side) -> u64 {
        self.dirs
            .lookup(&side.cookie.to_ne_bytes(), MapFlags::ANY)
            .ok()
            .flatten()
            .and_then(|v| fp_fwd_dir::from_bytes(&v))
            .map_or(0, |d| d.bytes)
    }

    /// Blocks until the pair has ended, passing each half-close on once the
    /// bytes before it have reached the other side's send queue, and a reset
    /// on as a reset (SO_LINGER 0 on the other side: drop your streams).
    ///
    /// # Errors
    /// An I/O error from poll or getsockopt.
    pub fn wait(mut self) -> Result<ForwardStats> {
        let end = self.run_until_end();
        let stats = ForwardStats {
            downstream_to_upstream: self.forwarded_from(&self.sides[DOWN]),
            upstream_to_downstream: self.forwarded_from(&self.sides[UP]),
            end: end?,
        };
        self.remove_dirs();
        Ok(stats)
    }

    fn run_until_end(&mut self) -> Result<ForwardEnd> {
        loop {
            if self.sides.iter().all(|s| s.fin_passed) {
                return Ok(ForwardEnd::Closed);
            }
            let fds = self.sides.each_ref().map(|s| s.stream.as_raw_fd());
            let revents = sys::poll_events(fds, RDHUP.bits(), 100)
                .map_err(io_err("poll", "forwarded sockets"))?
                .map(PollFlags::from_bits_retain);
            for (from, events) in revents.iter().enumerate() {
                // SO_ERROR clears the error: read it once, on POLLERR/POLLHUP.
                if events.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)
                    && sys::socket_error(fds[from])
                        .map_err(io_err("getsockopt(SO_ERROR)", "forwarded socket"))?
                        != 0
                {
                    let other = &self.sides[1 - from].stream;
                    let _ = socket2::SockRef::from(other).set_linger(Some(Duration::ZERO));
                    return Ok(RESET_BY[from]);
                }
            }
            let mut draining = false;
            for (from, events) in revents.iter().enumerate() {
                if events.intersects(RDHUP | PollFlags::POLLHUP) && !self.sides[from].fin_passed {
                    draining |= !self.try_pass_fin(from)?;
                }
            }
            if draining || revents.iter().any(|r| r.contains(RDHUP)) {
                // RDHUP stays set: do not spin while the kernel drains.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    /// Shuts down the other side's sending half once every byte received on
    /// `from` before its FIN has entered the other side's send queue.
    fn try_pass_fin(&mut self, from: usize) -> Result<bool> {
        let to = &self.sides[1 - from];
        let target = to.sent_before + self.forwarded_from(&self.sides[from]);
        let reached = sys::bytes_into_send_queue(to.stream.as_raw_fd())
            .map_err(io_err("getsockopt(TCP_INFO)", "forwarded socket"))?;
        if reached < target {
            return Ok(false);
        }
        let _ = to.stream.shutdown(Shutdown::Write);
        self.sides[from].fin_passed = true;
        Ok(true)
    }
}
