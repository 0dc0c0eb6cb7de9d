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
//!    moves the bytes. Call [`Forwarding::wait`] (blocking; from async code
//!    use `spawn_blocking`) to pass half-closes and resets on and learn when
//!    the pair has ended, then drop your streams.
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

use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::time::Duration;

use libbpf_rs::{MapCore, MapFlags, MapHandle};
use nix::poll::PollFlags;

use crate::abi::{fp_fwd_dir, fp_proxy_pair, fp_sock_key, fp_sock_state, Plain};
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
    /// Both mode: of `downstream_to_upstream`, the bytes `wait()` copied in
    /// user space because they were queued on the downstream socket (sent
    /// before the hand-over, or while the upstream socket had no room).
    pub copied_at_hand_over: u64,
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
    /// Bytes `wait()` copied from its receive queue to the other side.
    copied: u64,
}

/// A pair the kernel forwards; see the [module docs](self) for the protocol.
/// Call [`wait`](Self::wait): dropping it unwaited leaves forwarding running
/// until the sockets close, but nothing then passes half-closes on, and its
/// entries stay in the `fwd_dirs` (and, in both mode, `proxy_pairs`) maps
/// until the guard's maps are freed. In both mode `wait()` is also what
/// copies bytes queued on the sockets: unwaited, they stay queued.
#[must_use = "call wait() to pass half-closes on and learn when the pair ends"]
pub struct Forwarding {
    /// [downstream, upstream]
    sides: [Side; 2],
    dirs: MapHandle,
    /// Both mode only.
    direct: Option<Direct>,
}

/// Both mode: the maps where the BPF side keeps what `Forwarding` needs.
pub(crate) struct DirectMaps {
    /// `proxy_pairs`: forwarded pairs by the downstream socket's key.
    pub pairs: MapHandle,
    /// `sock_state`: per-socket counts of bytes sent around TCP.
    pub sock_state: MapHandle,
    /// `netns_spaces`: what keys use in place of a namespace's cookie.
    pub netns_spaces: MapHandle,
}

/// Both mode: this pair's entry in `proxy_pairs`.
struct Direct {
    maps: DirectMaps,
    /// The downstream socket's key.
    key: fp_sock_key,
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
        direct: Option<DirectMaps>,
        down: &impl AsFd,
        up: &impl AsFd,
    ) -> Result<Self> {
        let side = |socket: BorrowedFd<'_>, what: &'static str| -> Result<Side> {
            let stream = TcpStream::from(socket.try_clone_to_owned().map_err(io_err("dup", what))?);
            let cookie = socket2::SockRef::from(&stream)
                .cookie()
                .map_err(io_err("getsockopt(SO_COOKIE)", what))?;
            Ok(Side {
                stream,
                cookie,
                sent_before: 0,
                fin_passed: false,
                copied: 0,
            })
        };
        let (down, up) = (
            side(down.as_fd(), "downstream socket")?,
            side(up.as_fd(), "upstream socket")?,
        );
        let direct = match direct {
            Some(maps) => Some(Direct {
                key: socket_key(&down.stream, &maps.netns_spaces)?,
                maps,
            }),
            None => None,
        };
        let mut forwarding = Forwarding {
            sides: [down, up],
            dirs,
            direct,
        };
        for i in [DOWN, UP] {
            forwarding.sides[i].sent_before = forwarding.sent(i)?;
        }
        forwarding.insert(fwd_map)?;
        // Bytes queued before the hand-over: make the verdict see them.
        for side in &forwarding.sides {
            sys::set_rcvlowat(side.stream.as_fd(), 1)
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
            // Last: the application's socket may switch to the upstream
            // socket as soon as this entry exists.
            if let Some(direct) = &self.direct {
                let pair = fp_proxy_pair {
                    down_cookie: self.sides[DOWN].cookie,
                    up_cookie: self.sides[UP].cookie,
                };
                direct
                    .maps
                    .pairs
                    .update(direct.key.as_bytes(), pair.as_bytes(), MapFlags::NO_EXIST)
                    .map_err(|e| {
                        Error::bpf("bpf(BPF_MAP_UPDATE_ELEM) on proxy_pairs (map full)", e)
                    })?;
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
        if let Some(direct) = &self.direct {
            let _ = direct.maps.pairs.delete(direct.key.as_bytes());
        }
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
        let [down, up] = &self.sides;
        let stats = ForwardStats {
            downstream_to_upstream: self.forwarded_from(down) + down.copied,
            upstream_to_downstream: self.forwarded_from(up) + up.copied,
            copied_at_hand_over: down.copied,
            end: end?,
        };
        self.remove_dirs();
        Ok(stats)
    }

    fn run_until_end(&mut self) -> Result<ForwardEnd> {
        // Bytes waiting in either socket's own queue (both mode: redirected
        // there around the forwarding program; every mode: kept there by
        // the forwarding program while the pair was being inserted) are
        // copied to the other socket; while the other socket is full, wait
        // for room there instead.
        let mut blocked = [false; 2];
        let mut buf = vec![0u8; 64 << 10];
        loop {
            if self.sides.iter().all(|s| s.fin_passed) {
                return Ok(ForwardEnd::Closed);
            }
            let fds = self.sides.each_ref().map(|s| s.stream.as_fd());
            let events = [DOWN, UP].map(|i| {
                let mut events = RDHUP;
                if !blocked[i] {
                    events |= PollFlags::POLLIN;
                }
                if blocked[1 - i] {
                    events |= PollFlags::POLLOUT;
                }
                (fds[i], events.bits())
            });
            let revents = sys::poll_events(events, 100)
                .map_err(io_err("poll", "forwarded sockets"))?
                .map(PollFlags::from_bits_retain);
            for from in [DOWN, UP] {
                if revents[from].contains(PollFlags::POLLIN)
                    || revents[1 - from].contains(PollFlags::POLLOUT)
                {
                    match self.copy_queued(from, &mut buf) {
                        Ok(full) => blocked[from] = full,
                        Err(_) => return Ok(self.reset_by(from)),
                    }
                }
            }
            for (from, events) in revents.iter().enumerate() {
                // SO_ERROR clears the error: read it once, on POLLERR/POLLHUP.
                if events.intersects(PollFlags::POLLERR | PollFlags::POLLHUP)
                    && sys::socket_error(self.sides[from].stream.as_fd())
                        .map_err(io_err("getsockopt(SO_ERROR)", "forwarded socket"))?
                        != 0
                {
                    return Ok(self.reset_by(from));
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
        // Copied by the loop first (POLLIN).
        if has_unread_bytes(self.sides[from].stream.as_raw_fd())
            .map_err(io_err("recv(MSG_PEEK)", "forwarded socket"))?
        {
            return Ok(false);
        }
        let to = 1 - from;
        let target = self.sides[to].sent_before
            + self.forwarded_from(&self.sides[from])
            + self.sides[from].copied;
        if self.sent(to)? < target {
            return Ok(false);
        }
        let _ = self.sides[to].stream.shutdown(Shutdown::Write);
        self.sides[from].fin_passed = true;
        Ok(true)
    }

    /// Bytes side `i` has sent: what entered its TCP send queue since it was
    /// created (acknowledged plus queued; the SYN counts as one), plus, in
    /// both mode, what its sk_msg program sent around TCP (a downstream
    /// socket's bytes go straight into a local application's queue).
    fn sent(&self, i: usize) -> Result<u64> {
        let fd = self.sides[i].stream.as_raw_fd();
        let queued = sys::bytes_into_send_queue(self.sides[i].stream.as_fd())
            .map_err(io_err("getsockopt(TCP_INFO)", "forwarded socket"))?;
        // No socket-storage entry: the socket is not accelerated.
        let around = match &self.direct {
            Some(direct) => direct
                .maps
                .sock_state
                .lookup(&fd.to_ne_bytes(), MapFlags::ANY)
                .ok()
                .flatten()
                .and_then(|v| fp_sock_state::from_bytes(&v))
                .map_or(0, |st| st.bytes_redirected),
            None => 0,
        };
        Ok(queued + around)
    }

    /// Side `from` failed: the other side gets SO_LINGER 0, so dropping it
    /// resets it too.
    fn reset_by(&self, from: usize) -> ForwardEnd {
        let other = &self.sides[1 - from].stream;
        let _ = socket2::SockRef::from(other).set_linger(Some(Duration::ZERO));
        RESET_BY[from]
    }

    /// Copies the bytes queued on side `from` to the other side
    /// without blocking, consuming each chunk only after it was written (the
    /// BPF side sends straight upstream only while this queue is empty).
    /// Returns whether bytes are left because the other side had no room.
    /// An error reading means side `from` failed; on a write error it
    /// stops, and poll() then reports the other side's failure.
    fn copy_queued(&mut self, from: usize, buf: &mut [u8]) -> nix::Result<bool> {
        use nix::errno::Errno;
        use nix::sys::socket::{recv, send, MsgFlags};
        let fd = self.sides[from].stream.as_raw_fd();
        let to = self.sides[1 - from].stream.as_raw_fd();
        loop {
            let n = match recv(fd, buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
                Err(Errno::EAGAIN) => 0,
                other => other?,
            };
            if n == 0 {
                return Ok(false);
            }
            let written = match send(
                to,
                &buf[..n],
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(written) => written,
                Err(Errno::EAGAIN) => return Ok(true),
                Err(Errno::EINTR) => continue,
                Err(_) => return Ok(false),
            };
            let mut consumed = 0;
            while consumed < written {
                consumed += recv(fd, &mut buf[..written - consumed], MsgFlags::MSG_DONTWAIT)?;
            }
            self.sides[from].copied += written as u64;
        }
    }
}

/// Whether bytes wait to be read on `fd`. A peek rather than FIONREAD:
/// FIONREAD counts the bytes in a map member's BPF queue only on kernels with
/// the 2026 sockmap FIONREAD change (it reads 0 for them on 6.1, for one).
fn has_unread_bytes(fd: std::os::fd::RawFd) -> std::io::Result<bool> {
    use nix::sys::socket::{recv, MsgFlags};
    match recv(fd, &mut [0u8], MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
        Ok(n) => Ok(n > 0),
        Err(nix::errno::Errno::EAGAIN) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

/// The key the BPF side gives a socket.
fn socket_key(stream: &TcpStream, netns_spaces: &MapHandle) -> Result<fp_sock_key> {
    let what = "forwarded socket";
    let local = stream.local_addr().map_err(io_err("getsockname", what))?;
    let remote = stream.peer_addr().map_err(io_err("getpeername", what))?;
    let cookie =
        sys::netns_cookie(stream.as_fd()).map_err(io_err("getsockopt(SO_NETNS_COOKIE)", what))?;
    // As the BPF side does: a grouped namespace's shared id, else the cookie.
    let space = netns_spaces
        .lookup(&cookie.to_ne_bytes(), MapFlags::ANY)
        .ok()
        .flatten()
        .and_then(|v| v.try_into().ok().map(u64::from_ne_bytes))
        .unwrap_or(cookie);
    Ok(fp_sock_key::of_socket(local, remote, space))
}
