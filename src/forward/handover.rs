//! The hand-over: a pair enters the forwarding maps (both directions,
//! then both sockets, then, in both mode, the pair) and leaves them again.

use std::net::TcpStream;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use super::relay::KernelSlots;
use super::{io_err, Forwarding, Side, DOWN, UP};
use crate::abi::{
    fp_fwd_dir, fp_proxy_pair, fp_sock_key, fp_sock_state, Plain, FP_PAIRED, FP_WAITING,
};
use crate::error::{Error, Result};
use crate::sys;

/// The maps a forwarded pair lives in, duplicated from the loaded object
/// (`Programs::forward_maps`).
pub(crate) struct ForwardMaps {
    /// `fwd_map`: the socket map the forwarding verdict program runs on.
    pub fwd_map: MapHandle,
    /// `fwd_dirs`: each socket's peer and the bytes forwarded from it.
    pub dirs: MapHandle,
    /// `fwd_copied`: the bytes `Forwarding` copied out of each socket's
    /// own queue, for the forwarding program to compare with what it kept.
    pub copied: MapHandle,
    /// Both mode only.
    pub direct: Option<DirectMaps>,
}

/// Both mode: the maps where the BPF side keeps what `Forwarding` needs.
pub(crate) struct DirectMaps {
    /// `proxy_pairs`: forwarded pairs by the downstream socket's key.
    pub pairs: MapHandle,
    /// `sock_state`: per-socket counts of bytes sent around TCP.
    pub sock_state: MapHandle,
    /// `netns_spaces`: what keys use in place of a namespace's cookie.
    pub netns_spaces: MapHandle,
    /// A share of the fp_backlog_query link (`sys::psock_backlog_len`
    /// answers while it is attached).
    pub backlog_query: Option<Arc<OwnedFd>>,
}

/// What `start` does when the kernel will not take a socket because it is
/// no longer established (its peer sent its FIN before the hand-over: the
/// kernel's socket maps take established sockets only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum NotEstablished {
    /// Fail, as `FastpathGuard::forward` does.
    Refuse,
    /// Serve the pair by copying in user space (a `Forwarder`).
    Copy,
}

impl Forwarding {
    /// Puts the pair into the forwarding map. Takes its own copies of the
    /// proxy's sockets (the guard's `forward()` and a `Forwarder` both dup
    /// them first: the guard leaves the proxy its streams, the forwarder
    /// can give them back untouched if the kernel refuses).
    pub(crate) fn start(
        maps: Arc<ForwardMaps>,
        down: TcpStream,
        up: TcpStream,
        not_established: NotEstablished,
    ) -> Result<Self> {
        let mut forwarding = Self::prepare(maps, down, up)?;
        match forwarding.insert() {
            Ok(()) => forwarding.in_kernel = true,
            // EOPNOTSUPP: the socket is not established. Nothing is
            // forwarded by the kernel (a socket that did go into
            // fwd_map has no direction entry, so the verdict keeps its bytes
            // where the pump reads them): copy every byte.
            Err(Error::Bpf { source, .. })
                if not_established == NotEstablished::Copy
                    && source.kind() == std::io::ErrorKind::Unsupported => {}
            Err(err) => return Err(err),
        }
        forwarding.show_queued_bytes()?;
        Ok(forwarding)
    }

    /// A pair a `Forwarder` relays itself until its traffic shows
    /// request/response turns (`ForwardPath::Adaptive`), then hands to
    /// the kernel ([`promote_if_turning`](Self::promote_if_turning)).
    pub(crate) fn start_relay(
        maps: Arc<ForwardMaps>,
        down: TcpStream,
        up: TcpStream,
        turns: u32,
        max_turn_bytes: u64,
    ) -> Result<Self> {
        let mut forwarding = Self::prepare(maps, down, up)?;
        // splice(2) into a socket blocks unless the socket's file is
        // non-blocking (SPLICE_F_NONBLOCK covers only the pipe). The
        // forwarder owns the streams from now on.
        for side in &forwarding.sides {
            side.stream
                .set_nonblocking(true)
                .map_err(io_err("fcntl(F_SETFL, O_NONBLOCK)", "forwarded socket"))?;
        }
        forwarding.relay = true;
        forwarding.promote_after = Some((turns, max_turn_bytes));
        Ok(forwarding)
    }

    /// The pair, not in the maps yet (`in_kernel` false): each side's
    /// cookie and what it had sent, both mode's key, and the socket option
    /// a forwarded socket needs whoever moves its bytes.
    fn prepare(maps: Arc<ForwardMaps>, down: TcpStream, up: TcpStream) -> Result<Self> {
        let side = |stream: TcpStream, what: &'static str| -> Result<Side> {
            let cookie = socket2::SockRef::from(&stream)
                .cookie()
                .map_err(io_err("getsockopt(SO_COOKIE)", what))?;
            // Bytes kept in a socket's own queue (while the other side's
            // backlog is full) hold its receive window shut. Should the
            // proxy die, TCP would not count them as unread at close, so it
            // would end the connection with a FIN instead of a reset, and
            // its FIN_WAIT2 remnant would keep the window shut: a peer
            // blocked on it would wait a minute (measured: 100 s) to learn.
            sys::abort_in_fin_wait2(stream.as_fd())
                .map_err(io_err("setsockopt(TCP_LINGER2)", what))?;
            Ok(Side {
                stream,
                cookie,
                sent_before: 0,
                fin_passed: false,
                draining: false,
                blocked: false,
                held: false,
                copied: 0,
                copied_before_kernel: 0,
                relayed: 0,
                unsent: None,
                streaming: false,
            })
        };
        let (down, up) = (
            side(down, "downstream socket")?,
            side(up, "upstream socket")?,
        );
        let direct_key = match &maps.direct {
            Some(direct) => Some(socket_key(&down.stream, &direct.netns_spaces)?),
            None => None,
        };
        let mut forwarding = Forwarding {
            sides: [down, up],
            maps,
            direct_key,
            in_kernel: false,
            relay: false,
            promote_after: None,
            turns: Default::default(),
            idle_retries: 0,
        };
        for i in [DOWN, UP] {
            forwarding.sides[i].sent_before = forwarding.sent(i)?;
        }
        Ok(forwarding)
    }

    /// Bytes queued before the hand-over: make the verdict see them.
    fn show_queued_bytes(&self) -> Result<()> {
        for side in &self.sides {
            sys::set_rcvlowat(side.stream.as_fd(), 1)
                .map_err(io_err("setsockopt(SO_RCVLOWAT)", "forwarded socket"))?;
        }
        Ok(())
    }

    /// A relayed pair whose traffic has shown enough request/response
    /// turns goes to the kernel (if it has room for one more pair: see
    /// `ForwardPath::Adaptive`), at a moment nothing waits in its pipes
    /// and neither side has half-closed (bytes queued on the sockets are
    /// forwarded by the hand-over, as for any pair). If the kernel will not
    /// take it (a full map; a socket no longer established), the pump
    /// copies it from then on as it copies any pair the kernel refused
    /// (not with the relay's splice: a socket that did go into the map has
    /// its bytes taken where splice does not look).
    /// The pair takes one of `slots` (none: no cap) for the kernel, and
    /// gives it back if the kernel does not take the pair.
    pub(super) fn promote_if_turning(&mut self, slots: Option<&KernelSlots>) -> Result<()> {
        let Some((turns, _)) = self.promote_after else {
            return Ok(());
        };
        let settled = self
            .sides
            .iter()
            .all(|s| s.unsent.is_none() && !s.fin_passed && !s.draining && !s.blocked && !s.held);
        if self.turns.count() < turns || !settled || !slots.is_none_or(KernelSlots::try_take) {
            return Ok(());
        }
        self.promote_after = None;
        self.relay = false;
        if self.insert().is_err() {
            slots.inspect(|slots| slots.give_back());
            return Ok(());
        }
        self.in_kernel = true;
        for side in &mut self.sides {
            side.copied_before_kernel = side.copied;
        }
        self.show_queued_bytes()
    }

    /// Inserts both directions, then both sockets. On failure it removes
    /// only the direction entries it added (the sockets may belong to a pair
    /// already forwarded); a socket already added to `fwd_map` stays there,
    /// unpaired, so its bytes remain readable by the proxy (deleting a map
    /// entry would drop bytes queued on it).
    fn insert(&self) -> Result<()> {
        let (fwd_map, dirs) = (&self.maps.fwd_map, &self.maps.dirs);
        const REFUSED: &str =
            "bpf(BPF_MAP_UPDATE_ELEM) on fwd_dirs/fwd_map (socket already forwarded, or map full)";
        let mut added = Vec::new();
        let result = (|| {
            for (from, to) in [
                (&self.sides[DOWN], &self.sides[UP]),
                (&self.sides[UP], &self.sides[DOWN]),
            ] {
                let mut dir = fp_fwd_dir {
                    peer_cookie: to.cookie,
                    on_shortcut: self.on_shortcut(from).into(),
                    ..Default::default()
                };
                let key = from.cookie.to_ne_bytes();
                dirs.update(&key, dir.as_bytes(), MapFlags::NO_EXIST)
                    .map_err(|e| Error::bpf(REFUSED, e))?;
                added.push(key);
                // Refused between the look and the entry: fp_sock_ops found
                // no entry to clear. (Nothing else writes the entry before
                // the sockets are in fwd_map.)
                if dir.on_shortcut == 1 && !self.on_shortcut(from) {
                    dir.on_shortcut = 0;
                    dirs.update(&key, dir.as_bytes(), MapFlags::EXIST)
                        .map_err(|e| Error::bpf(REFUSED, e))?;
                }
                self.maps
                    .copied
                    .update(&key, &0u64.to_ne_bytes(), MapFlags::ANY)
                    .map_err(|e| Error::bpf("bpf(BPF_MAP_UPDATE_ELEM) on fwd_copied", e))?;
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
            if let (Some(direct), Some(key)) = (&self.maps.direct, &self.direct_key) {
                let pair = fp_proxy_pair {
                    down_cookie: self.sides[DOWN].cookie,
                    up_cookie: self.sides[UP].cookie,
                };
                direct
                    .pairs
                    .update(key.as_bytes(), pair.as_bytes(), MapFlags::NO_EXIST)
                    .map_err(|e| {
                        Error::bpf("bpf(BPF_MAP_UPDATE_ELEM) on proxy_pairs (map full)", e)
                    })?;
            }
            Ok(())
        })();
        if result.is_err() {
            for key in added {
                let _ = dirs.delete(&key);
                let _ = self.maps.copied.delete(&key);
            }
        }
        result
    }

    /// Both mode: whether `side`'s socket is paired, or waiting to pair,
    /// with a local peer of its own (`fp_fwd_dir.on_shortcut`).
    fn on_shortcut(&self, side: &Side) -> bool {
        self.socket_state(side)
            .is_some_and(|st| st.flags & (FP_PAIRED | FP_WAITING) != 0)
    }

    /// Both mode: the BPF side's state of `side`'s socket (`None` in egress
    /// mode, or when the socket was never selected).
    pub(super) fn socket_state(&self, side: &Side) -> Option<fp_sock_state> {
        let direct = self.maps.direct.as_ref()?;
        // The key of a socket-storage map is the socket's fd, an int.
        let fd: i32 = side.stream.as_raw_fd();
        direct
            .sock_state
            .lookup(&fd.to_ne_bytes(), MapFlags::ANY)
            .ok()
            .flatten()
            .and_then(|v| fp_sock_state::from_bytes(&v))
    }

    pub(super) fn remove_dirs(&self) {
        if let (Some(direct), Some(key)) = (&self.maps.direct, &self.direct_key) {
            let _ = direct.pairs.delete(key.as_bytes());
        }
        for side in &self.sides {
            let key = side.cookie.to_ne_bytes();
            let _ = self.maps.dirs.delete(&key);
            let _ = self.maps.copied.delete(&key);
        }
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
