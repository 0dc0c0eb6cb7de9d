//! The pump `Forwarding::wait` runs: copies bytes left in a socket's own
//! queue, passes half-closes on once every byte before them has entered
//! the other send queue, and resets on as resets.

use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use libbpf_rs::{MapCore, MapFlags};
use nix::poll::PollFlags;

use super::relay::{KernelSlots, PipePool};
use super::{io_err, ForwardEnd, Forwarding, DOWN, RESET_BY, UP};
use crate::abi::{fp_fwd_dir, fp_sock_state};
use crate::error::{Error, Result};
use crate::sys;

/// The peer has shut down its sending side (nix has no constant for it).
pub(super) const RDHUP: PollFlags = PollFlags::from_bits_retain(nix::libc::POLLRDHUP);

/// How soon a pair that waits for the kernel is looked at again, at first.
const DRAIN_RETRY_MS: u32 = 1;

/// Retries at [`DRAIN_RETRY_MS`] that may find nothing moved before the
/// interval doubles: a backlog that is draining has usually drained by
/// then, so a flow on the copy path keeps its pace.
const FAST_RETRIES: u32 = 8;

/// The longest interval between retries: what a pair whose receiver has
/// stopped reading costs (a map lookup and a getsockopt per retry: at 1 ms,
/// 100 stalled pairs took a fifth of a core) and how late it notices that
/// the receiver has resumed.
const MAX_RETRY_MS: u32 = 32;

/// What a thread that steps pairs lends each step: the buffer bytes are
/// copied through and the pipes the relay splices through.
pub(super) struct Scratch {
    pub(super) buf: Vec<u8>,
    pub(super) pipes: PipePool,
}

impl Scratch {
    pub(super) fn new() -> Self {
        Scratch {
            buf: vec![0u8; super::relay::RELAY_CHUNK],
            pipes: PipePool::default(),
        }
    }

    /// Nothing is served any more: close the relay's free pipes.
    pub(super) fn idle(&mut self) {
        self.pipes.close_free();
    }
}

impl Forwarding {
    /// What to wait for on each side: bytes to copy and its FIN, until the
    /// FIN has arrived (a socket at EOF stays readable: after that only the
    /// drain retry looks at it), and room while the other side is blocked.
    pub(super) fn interest(&self) -> [PollFlags; 2] {
        [DOWN, UP].map(|i| {
            let side = &self.sides[i];
            let mut events = PollFlags::empty();
            if !side.fin_passed && !side.draining {
                events |= RDHUP;
                if !side.blocked && !side.held {
                    events |= PollFlags::POLLIN;
                }
            }
            if self.sides[1 - i].blocked {
                events |= PollFlags::POLLOUT;
            }
            events
        })
    }

    /// Whether the pair waits for the kernel to move bytes (before a
    /// half-close, or before kept bytes may be copied), with no event to
    /// say when: then how soon [`step`](Self::step) must run again, events
    /// or not. 1 ms while steps keep finding progress, doubling up to
    /// [`MAX_RETRY_MS`] after [`FAST_RETRIES`] in a row found none.
    pub(super) fn retry_in(&self) -> Option<Duration> {
        self.sides
            .iter()
            .any(|s| s.draining || s.held)
            .then(|| retry_delay(self.idle_retries))
    }

    /// What moved so far: bytes copied and half-closes passed on.
    fn progress(&self) -> (u64, u64, bool, bool) {
        let [down, up] = &self.sides;
        (down.copied, up.copied, down.fin_passed, up.fin_passed)
    }

    /// Acts on what poll reported for [downstream, upstream] (nothing, on
    /// a drain retry): copies bytes left in a socket's own queue (both mode:
    /// redirected there around the forwarding program; every mode: kept
    /// there while the pair was being inserted) to the other socket, passes
    /// resets and half-closes on. `Some(end)` once the pair has ended.
    /// A relayed pair may go to the kernel if it gets one of `slots` (none:
    /// no cap).
    pub(super) fn step(
        &mut self,
        revents: [PollFlags; 2],
        scratch: &mut Scratch,
        slots: Option<&KernelSlots>,
    ) -> Result<Option<ForwardEnd>> {
        let before = self.progress();
        let end = self.step_sides(revents, scratch);
        self.idle_retries = if self.progress() == before {
            self.idle_retries.saturating_add(1)
        } else {
            0
        };
        if let Ok(None) = end {
            self.promote_if_turning(slots)?;
        }
        end
    }

    fn step_sides(
        &mut self,
        revents: [PollFlags; 2],
        scratch: &mut Scratch,
    ) -> Result<Option<ForwardEnd>> {
        for from in [DOWN, UP] {
            let side = &self.sides[from];
            let readable = revents[from].contains(PollFlags::POLLIN)
                || ((side.draining || side.held) && !side.blocked);
            if readable || revents[1 - from].contains(PollFlags::POLLOUT) {
                let copied_before = self.sides[from].copied;
                let outcome = if self.relay {
                    Ok(self.relay_queued(from, scratch))
                } else {
                    self.copy_queued(from, &mut scratch.buf)
                };
                let copied = self.sides[from].copied - copied_before;
                if self.in_kernel && copied != 0 {
                    self.record_copied(from)?;
                }
                if let Some((_, max_turn_bytes)) = self.promote_after {
                    self.turns.moved(from, copied, max_turn_bytes);
                }
                let side = &mut self.sides[from];
                (side.blocked, side.held) = (false, false);
                match outcome? {
                    Copy::Done => {}
                    Copy::Full => side.blocked = true,
                    Copy::Held => side.held = true,
                    Copy::Failed => return Ok(Some(self.reset_by(from))),
                    Copy::WriteFailed => return Ok(Some(self.reset_by(1 - from))),
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
                return Ok(Some(self.reset_by(from)));
            }
        }
        for from in [DOWN, UP] {
            let side = &self.sides[from];
            let fin_seen = side.draining || revents[from].intersects(RDHUP | PollFlags::POLLHUP);
            if fin_seen && !side.fin_passed {
                self.sides[from].draining = !self.try_pass_fin(from)?;
            }
        }
        Ok(self
            .sides
            .iter()
            .all(|s| s.fin_passed)
            .then_some(ForwardEnd::Closed))
    }

    /// `wait()`'s loop: poll this pair's two sockets, then [`step`](Self::step).
    pub(super) fn run_until_end(&mut self) -> Result<ForwardEnd> {
        let mut scratch = Scratch::new();
        loop {
            let interest = self.interest();
            let fds = self.sides.each_ref().map(|s| s.stream.as_fd());
            let timeout = self.retry_in().map_or(-1, |retry| retry.as_millis() as i32);
            let revents = sys::poll_events(
                [
                    (fds[DOWN], interest[DOWN].bits()),
                    (fds[UP], interest[UP].bits()),
                ],
                timeout,
            )
            .map_err(io_err("poll", "forwarded sockets"))?
            .map(PollFlags::from_bits_retain);
            if let Some(end) = self.step(revents, &mut scratch, None)? {
                return Ok(end);
            }
        }
    }

    /// Shuts down the other side's sending half once every byte received on
    /// `from` before its FIN has entered the other side's send queue.
    fn try_pass_fin(&mut self, from: usize) -> Result<bool> {
        // Kept segments that wait unseen in this side's own backlog (see
        // kept_bytes_wait in the BPF source): in both mode the copy also
        // takes an application's queued bytes, so the kept count alone
        // cannot tell. Asked before the peek: the backlog puts a segment
        // into the queue before it lets go of it.
        if self.forwarded_from(&self.sides[from]).unseen > 0
            && self.socket_state(&self.sides[from]).is_some()
            && self.backlog_busy(from)?
        {
            return Ok(false);
        }
        // Copied by the loop first (POLLIN), and out of the relay's pipe.
        if self.sides[from].unsent.is_some()
            || has_unread_bytes(self.sides[from].stream.as_raw_fd())
                .map_err(io_err("recv(MSG_PEEK)", "forwarded socket"))?
        {
            return Ok(false);
        }
        // Bytes the program kept may not show in the queue yet (see
        // kept_bytes_wait in the BPF source).
        let dir = self.forwarded_from(&self.sides[from]);
        if dir.kept > self.sides[from].copied_in_kernel() || self.in_flight(from, &dir)? {
            return Ok(false);
        }
        let to = 1 - from;
        let _ = self.sides[to].stream.shutdown(Shutdown::Write);
        self.sides[from].fin_passed = true;
        Ok(true)
    }

    /// Whether bytes the forwarding program forwarded from side `from` may
    /// still wait in the other side's psock backlog (which sends them
    /// later) rather than in its send queue. Bytes the pump copied and an
    /// application's bytes sent straight out of the other side entered its
    /// send queue before their send() returned: with nothing forwarded,
    /// nothing is in flight. The direct count is what the program let
    /// through; were part of it refused (docs/known-limits.md), counting it
    /// would wait forever.
    fn forwarded_in_flight(&self, from: usize) -> Result<bool> {
        self.in_flight(from, &self.forwarded_from(&self.sides[from]))
    }

    /// [`forwarded_in_flight`](Self::forwarded_in_flight) with the
    /// direction's counts already read.
    fn in_flight(&self, from: usize, dir: &fp_fwd_dir) -> Result<bool> {
        if dir.bytes == 0 {
            return Ok(false);
        }
        let to = 1 - from;
        let target = self.sides[to].sent_before + dir.total() + self.sides[from].copied;
        let state = self.socket_state(&self.sides[to]);
        Ok(self.sent_with(to, state.as_ref())? < target
            || (state.is_some() && self.backlog_busy(to)?))
    }

    /// Both mode: whether side `i`'s psock backlog still holds a segment.
    /// Asked after [`sent`](Self::sent) has counted every forwarded byte:
    /// its sk_msg program counts a message it redirects to a local peer
    /// at the verdict, and the kernel queues it there after letting the
    /// socket lock go, so bytes the pump wrote (or its FIN) could overtake
    /// the backlog's last ones; the backlog lets go of a segment only once
    /// all of it was sent (measured before this check: 2 of about 1,040
    /// looped runs of
    /// `tests/both.rs::an_upstream_refused_mid_transfer_keeps_every_byte`
    /// delivered about 30 KB of forwarded bytes after kept ones).
    /// Asked only of accelerated sides (with socket state): what the
    /// others send counts once it is in their TCP send queue.
    fn backlog_busy(&self, i: usize) -> Result<bool> {
        sys::psock_backlog_len(self.sides[i].stream.as_fd())
            .map(|queued| queued > 0)
            .map_err(io_err(
                "getsockopt(FP_SOL_FASTPATH, FP_SO_BACKLOG_LEN)",
                "forwarded socket",
            ))
    }

    /// Tells the forwarding program how much the pump has copied out of
    /// side `from`'s queue: it keeps later segments behind until that
    /// reaches what it kept there.
    fn record_copied(&self, from: usize) -> Result<()> {
        let side = &self.sides[from];
        self.maps
            .copied
            .update(
                &side.cookie.to_ne_bytes(),
                &side.copied_in_kernel().to_ne_bytes(),
                MapFlags::EXIST,
            )
            .map_err(|e| Error::bpf("bpf(BPF_MAP_UPDATE_ELEM) on fwd_copied", e))
    }

    /// Bytes side `i` has sent: what entered its TCP send queue since it was
    /// created (acknowledged plus queued; the SYN counts as one), plus, in
    /// both mode, what its sk_msg program sent around TCP (a downstream
    /// socket's bytes go straight into a local application's queue).
    pub(super) fn sent(&self, i: usize) -> Result<u64> {
        self.sent_with(i, self.socket_state(&self.sides[i]).as_ref())
    }

    /// [`sent`](Self::sent) with side `i`'s socket state already read (no
    /// socket-storage entry: the socket is not accelerated).
    fn sent_with(&self, i: usize, state: Option<&fp_sock_state>) -> Result<u64> {
        let queued = sys::bytes_into_send_queue(self.sides[i].stream.as_fd())
            .map_err(io_err("getsockopt(TCP_INFO)", "forwarded socket"))?;
        Ok(queued + state.map_or(0, |st| st.bytes_redirected))
    }

    /// Side `from` failed: both sides get SO_LINGER 0, so closing them
    /// resets both connections. The failed side too: its error may be
    /// local (the kernel could not queue forwarded bytes for it: ENOMEM,
    /// EPIPE from the forwarding backlog) with its peer still connected,
    /// and a plain close would then end that peer's stream with a FIN, as
    /// if every byte had arrived (measured: the scale benchmark's both-mode
    /// downloads at 100 pairs ended 55 of 100 clients' streams early with a
    /// clean EOF).
    fn reset_by(&self, from: usize) -> ForwardEnd {
        for side in &self.sides {
            let _ = socket2::SockRef::from(&side.stream).set_linger(Some(Duration::ZERO));
        }
        RESET_BY[from]
    }

    /// Copies the bytes queued on side `from` to the other side
    /// without blocking, consuming each chunk only after it was written (the
    /// BPF side sends straight upstream only while this queue is empty).
    /// When the kernel forwards, each chunk waits ([`Copy::Held`]) until the bytes the
    /// program forwarded from `from` before it have left the other side's
    /// backlog: checked after the peek, since only once kept bytes are in
    /// the queue does the program stop forwarding (a check before could
    /// pass, and the program then forward more and keep the next segment).
    /// A read error means side `from` failed, a write error the other.
    fn copy_queued(&mut self, from: usize, buf: &mut [u8]) -> Result<Copy> {
        use nix::errno::Errno;
        use nix::sys::socket::{recv, send, MsgFlags};
        let fd = self.sides[from].stream.as_raw_fd();
        let to = self.sides[1 - from].stream.as_raw_fd();
        let ordered_after_backlog = self.in_kernel;
        // Still waiting since the last step: no need to peek (a 64 KiB copy
        // per retry) to learn that.
        if ordered_after_backlog && self.sides[from].held && self.forwarded_in_flight(from)? {
            return Ok(Copy::Held);
        }
        loop {
            let n = match recv(fd, buf, MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT) {
                Ok(n) => n,
                Err(Errno::EAGAIN) => 0,
                Err(_) => return Ok(Copy::Failed),
            };
            if n == 0 {
                return Ok(Copy::Done);
            }
            if ordered_after_backlog && self.forwarded_in_flight(from)? {
                return Ok(Copy::Held);
            }
            let written = match send(
                to,
                &buf[..n],
                MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(written) => written,
                Err(Errno::EAGAIN) => return Ok(Copy::Full),
                Err(Errno::EINTR) => continue,
                Err(_) => return Ok(Copy::WriteFailed),
            };
            let mut consumed = 0;
            while consumed < written {
                match recv(fd, &mut buf[..written - consumed], MsgFlags::MSG_DONTWAIT) {
                    Ok(n) => consumed += n,
                    Err(_) => return Ok(Copy::Failed),
                }
            }
            self.sides[from].copied += written as u64;
        }
    }
}

/// What [`Forwarding::copy_queued`] (or the relay) stopped at.
pub(super) enum Copy {
    /// Nothing left to copy.
    Done,
    /// The other side had no room: wait for POLLOUT there.
    Full,
    /// Kept bytes wait for the other side's backlog: retry on the timer.
    Held,
    /// Reading side `from` failed.
    Failed,
    /// Writing to the other side failed (its peer reset it). Not left for
    /// poll() to report: the failed send cleared the socket's error, and
    /// bytes taken for it could never leave, so the pair would wait for
    /// them forever.
    WriteFailed,
}

/// How long a waiting pair rests before its next step, after
/// `idle_retries` steps in a row that found nothing moved.
fn retry_delay(idle_retries: u32) -> Duration {
    let doublings = idle_retries
        .saturating_sub(FAST_RETRIES)
        .min(MAX_RETRY_MS.ilog2());
    Duration::from_millis(u64::from((DRAIN_RETRY_MS << doublings).min(MAX_RETRY_MS)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_stay_fast_while_bytes_move_and_back_off_to_a_cap_when_stalled() {
        let ms = |idle| retry_delay(idle).as_millis();
        assert_eq!(ms(0), 1);
        assert_eq!(ms(FAST_RETRIES), 1);
        assert_eq!(ms(FAST_RETRIES + 1), 2);
        assert_eq!(ms(FAST_RETRIES + 2), 4);
        assert_eq!(ms(FAST_RETRIES + 5), u128::from(MAX_RETRY_MS));
        assert_eq!(ms(u32::MAX), u128::from(MAX_RETRY_MS));
    }
}
