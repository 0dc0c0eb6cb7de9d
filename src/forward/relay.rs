//! The user-space relay a [`Forwarder`](super::Forwarder) starts a pair on
//! with [`ForwardPath::Adaptive`] (long runs spliced through a pipe, so
//! no byte is copied through user memory; short reads copied, which costs
//! less for a few KiB), and the count of request/response turns that
//! decides when the pair is handed to the kernel.
//!
//! Why both: the kernel's forwarding wins on request/response (no wake-up
//! of the proxy per message) and loses on bulk (its backlog worker sends
//! one segment at a time), where a relay between the proxy's own plain
//! sockets is the fastest path. Handing a relayed pair to
//! the kernel is safe at any moment its pipes are empty (the hand-over
//! protocol covers bytes queued on the sockets); the way back is not
//! (bytes in the kernel's queues would be lost), so a pair moves once.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};

use nix::errno::Errno;
use nix::sys::socket::{recv, send, MsgFlags};

use super::pump::{Copy, Scratch};
use super::Forwarding;
use crate::sys;

/// How a [`Forwarder`](super::Forwarder) serves each pair it is handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForwardPath {
    /// The kernel forwards the pair from the start (the default).
    #[default]
    Kernel,
    /// The forwarder relays the pair itself (long runs with splice(2), no
    /// copy through user memory: the fastest path for bulk; short reads
    /// copied) and hands
    /// it to the kernel once it has seen `turns` changes of direction in a
    /// row, each after at most `max_turn_bytes` one way (request/response
    /// traffic, where the kernel path wins while few pairs are busy), if
    /// fewer than `max_in_kernel` of its pairs are in the kernel. A burst
    /// larger than `max_turn_bytes` starts the count again. A pair handed
    /// over stays with the kernel. Egress mode only; in both mode a pair
    /// starts in the kernel as with [`Kernel`](Self::Kernel) (its
    /// downstream socket may be in the socket map, where splice reads
    /// nothing).
    Adaptive {
        /// Changes of direction before the hand-over.
        turns: u32,
        /// The most bytes one way that still count as one turn.
        max_turn_bytes: u64,
        /// The most pairs in the kernel at once (`None`: one per CPU this
        /// process may run on). The kernel forwards each message as work
        /// of its own, the relay serves every ready pair per wake-up of one
        /// thread: on a 2-CPU machine request/response through the kernel
        /// was 1.8-2.3x the splice relay's rate with 1 or 2 pairs busy and
        /// 0.6-0.9x with 4 to 1,000 (docs/proxy-modes.md). The pairs in the
        /// kernel take CPU from the relayed ones: with 100 busy pairs, two
        /// in the kernel raised the forwarder's round trips to 1.11-1.19x
        /// the splice relay's, and their p99 to 1.53-1.85x of its (none in
        /// the kernel: 0.98-1.01x, p99 0.94-1.52x; docs/benchmarks.md).
        /// `Some(0)` keeps every pair on the relay.
        max_in_kernel: Option<usize>,
    },
}

impl ForwardPath {
    /// [`Adaptive`](Self::Adaptive) with the defaults: 8 turns (four
    /// request/response round trips) of at most 16 KiB each, at most one
    /// pair in the kernel per CPU.
    pub const ADAPTIVE: ForwardPath = ForwardPath::Adaptive {
        turns: 8,
        max_turn_bytes: 16 << 10,
        max_in_kernel: None,
    };
}

/// [`ForwardPath::Adaptive`]'s `max_in_kernel` with `None` resolved.
pub(super) fn kernel_pair_limit(max_in_kernel: Option<usize>) -> usize {
    max_in_kernel.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// How many of a forwarder's pairs the kernel forwards now, and how many
/// relayed pairs may join them (`max_in_kernel`): one count for all the
/// forwarder's threads, so the cap holds whichever thread serves a pair.
#[derive(Debug)]
pub(super) struct KernelSlots {
    taken: AtomicUsize,
    max: AtomicUsize,
}

impl KernelSlots {
    pub(super) fn new() -> Self {
        KernelSlots {
            taken: AtomicUsize::new(0),
            max: AtomicUsize::new(usize::MAX),
        }
    }

    pub(super) fn set_max(&self, max: usize) {
        self.max.store(max, Ordering::Relaxed);
    }

    /// Takes a slot for a relayed pair if fewer than `max` are taken.
    pub(super) fn try_take(&self) -> bool {
        let max = self.max.load(Ordering::Relaxed);
        self.taken
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Counts a pair that starts in the kernel (no cap applies to those).
    pub(super) fn take(&self) {
        self.taken.fetch_add(1, Ordering::AcqRel);
    }

    pub(super) fn give_back(&self) {
        self.taken.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The most one read takes off a socket: a pipe's default capacity, and
/// the size of the buffer short reads are copied through.
pub(super) const RELAY_CHUNK: usize = 64 << 10;

/// A read at least this long means the socket streams: its next bytes are
/// spliced rather than copied.
const STREAMING_READ: usize = 32 << 10;

/// Empty pipes kept for the next pair that needs one; more are closed.
const FREE_PIPES_KEPT: usize = 64;

/// A pipe bytes pass through between two sockets.
pub(super) struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

/// Pipes shared by the pairs one thread serves: a pair holds one only
/// while bytes it took from one socket wait for room on the other, so a
/// proxy with thousands of pairs needs pipes for the busy ones only.
#[derive(Default)]
pub(super) struct PipePool {
    free: Vec<Pipe>,
}

impl PipePool {
    fn take(&mut self) -> std::io::Result<Pipe> {
        match self.free.pop() {
            Some(pipe) => Ok(pipe),
            None => sys::pipe().map(|(read, write)| Pipe { read, write }),
        }
    }

    fn give_back(&mut self, pipe: Pipe) {
        if self.free.len() < FREE_PIPES_KEPT {
            self.free.push(pipe);
        }
    }

    /// Closes the free pipes (a forwarder with no pairs left keeps no file
    /// open for them).
    pub(super) fn close_free(&mut self) {
        self.free.clear();
    }
}

/// Bytes one side's relay took off its socket that have not reached the
/// other socket yet.
pub(super) enum Unsent {
    /// Spliced into a pipe.
    InPipe { pipe: Pipe, bytes: usize },
    /// Read into user memory, and the first `sent` of them sent.
    Copied { bytes: Vec<u8>, sent: usize },
}
/// Counts request/response turns: changes of direction after short runs.
#[derive(Debug, Default)]
pub(super) struct Turns {
    /// The direction bytes moved in last, and how many in this run.
    last: Option<usize>,
    run: u64,
    /// Changes of direction in a row after runs no longer than the limit.
    turns: u32,
}

impl Turns {
    /// `bytes` moved from side `from`; `max_turn_bytes` is the longest run
    /// that still counts as a turn.
    pub(super) fn moved(&mut self, from: usize, bytes: u64, max_turn_bytes: u64) {
        if bytes == 0 {
            return;
        }
        if self.last == Some(from) {
            self.run += bytes;
        } else {
            if self.last.is_some() && self.run <= max_turn_bytes {
                self.turns += 1;
            }
            (self.last, self.run) = (Some(from), bytes);
        }
        if self.run > max_turn_bytes {
            self.turns = 0;
        }
    }

    pub(super) fn count(&self) -> u32 {
        self.turns
    }
}

impl Forwarding {
    /// The relay's copy from side `from` to the other: first what waits
    /// unsent, then from the socket until it is empty (or at its end) or
    /// the other side is full. A socket whose last read took a long run
    /// is spliced through a pipe (no copy through user memory); short
    /// reads (requests, responses) are copied, which costs less than
    /// splice's page handling for a few KiB. Bytes count as copied once
    /// they reached the other socket.
    pub(super) fn relay_queued(&mut self, from: usize, scratch: &mut Scratch) -> Copy {
        let (mut emptied, mut first) = (false, true);
        loop {
            if let Some(unsent) = self.sides[from].unsent.take() {
                if let Some(stop) = self.send_unsent(from, unsent, &mut scratch.pipes) {
                    return stop;
                }
            }
            // A read shorter than the most one read takes most likely
            // emptied the socket: rather than a read that finds nothing (a
            // third syscall per request), leave the rest to the next event
            // (poll and the forwarder's epoll are level-triggered).
            if emptied {
                return Copy::Done;
            }
            let read = if self.sides[from].streaming {
                self.splice_in(from, &mut scratch.pipes)
            } else {
                self.copy_through(from, &mut scratch.buf)
            };
            match read {
                Ok(0) => return Copy::Done,
                Ok(bytes) => {
                    // The last read of a run is short too: only a short
                    // first read says the socket held a message, not a run.
                    let side = &mut self.sides[from];
                    side.streaming = bytes >= STREAMING_READ || (side.streaming && !first);
                    emptied = bytes < RELAY_CHUNK;
                    first = false;
                }
                Err(stop) => return stop,
            }
        }
    }

    /// Splices what side `from`'s socket holds into a pipe, left unsent.
    /// `Ok(0)`: nothing to read (or no pipe: out of file descriptors, the
    /// bytes stay on the socket until the next event).
    fn splice_in(&mut self, from: usize, pipes: &mut PipePool) -> Result<usize, Copy> {
        let Ok(pipe) = pipes.take() else {
            return Ok(0);
        };
        loop {
            match sys::splice(
                self.sides[from].stream.as_fd(),
                pipe.write.as_fd(),
                RELAY_CHUNK,
            ) {
                Ok(0) | Err(Errno::EAGAIN) => break,
                Ok(bytes) => {
                    self.sides[from].unsent = Some(Unsent::InPipe { pipe, bytes });
                    return Ok(bytes);
                }
                Err(Errno::EINTR) => {}
                Err(_) => return Err(Copy::Failed),
            }
        }
        pipes.give_back(pipe);
        Ok(0)
    }

    /// Reads what side `from`'s socket holds and sends it on at once; what
    /// the other side has no room for is left unsent. `Ok(0)`: nothing to
    /// read.
    fn copy_through(&mut self, from: usize, buf: &mut [u8]) -> Result<usize, Copy> {
        let read = loop {
            match recv(
                self.sides[from].stream.as_raw_fd(),
                buf,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(read) => break read,
                Err(Errno::EAGAIN) => return Ok(0),
                Err(Errno::EINTR) => {}
                Err(_) => return Err(Copy::Failed),
            }
        };
        // An error here (EAGAIN, EINTR, or the other side failed) leaves
        // every byte unsent: send_unsent deals with it.
        let sent = send_now(self.sides[1 - from].stream.as_raw_fd(), &buf[..read]).unwrap_or(0);
        self.count_relayed(from, sent);
        if sent < read {
            self.sides[from].unsent = Some(Unsent::Copied {
                bytes: buf[sent..read].to_vec(),
                sent: 0,
            });
        }
        Ok(read)
    }

    /// Sends what waits unsent from side `from`. `None` once all of it is
    /// sent; else why it stopped, with the rest kept.
    fn send_unsent(
        &mut self,
        from: usize,
        mut unsent: Unsent,
        pipes: &mut PipePool,
    ) -> Option<Copy> {
        loop {
            let target = self.sides[1 - from].stream.as_fd();
            let left = match &mut unsent {
                Unsent::InPipe { pipe, bytes } => sys::splice(pipe.read.as_fd(), target, *bytes)
                    .map(|moved| {
                        *bytes -= moved;
                        (moved, *bytes)
                    }),
                Unsent::Copied { bytes, sent } => send_now(target.as_raw_fd(), &bytes[*sent..])
                    .map(|moved| {
                        *sent += moved;
                        (moved, bytes.len() - *sent)
                    }),
            };
            match left {
                Ok((moved, left)) => {
                    self.count_relayed(from, moved);
                    if left == 0 {
                        if let Unsent::InPipe { pipe, .. } = unsent {
                            pipes.give_back(pipe);
                        }
                        return None;
                    }
                }
                Err(Errno::EINTR) => {}
                Err(Errno::EAGAIN) => {
                    self.sides[from].unsent = Some(unsent);
                    return Some(Copy::Full);
                }
                Err(_) => return Some(Copy::WriteFailed),
            }
        }
    }

    fn count_relayed(&mut self, from: usize, bytes: usize) {
        self.sides[from].copied += bytes as u64;
        self.sides[from].relayed += bytes as u64;
    }
}

/// One non-blocking send(2) without SIGPIPE.
fn send_now(fd: RawFd, bytes: &[u8]) -> nix::Result<usize> {
    send(fd, bytes, MsgFlags::MSG_NOSIGNAL | MsgFlags::MSG_DONTWAIT)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_runs_each_way_count_as_turns_and_a_long_run_starts_again() {
        let mut turns = Turns::default();
        for _ in 0..4 {
            turns.moved(0, 100, 1000);
            turns.moved(1, 900, 1000);
        }
        assert_eq!(turns.count(), 7, "the first run is not a turn yet");
        turns.moved(1, 200, 1000);
        assert_eq!(turns.count(), 0, "1100 bytes one way: bulk");
        turns.moved(0, 1, 1000);
        assert_eq!(turns.count(), 0, "the long run does not end in a turn");
        turns.moved(1, 1, 1000);
        turns.moved(1, 0, 1000);
        assert_eq!(turns.count(), 1);
    }
}
