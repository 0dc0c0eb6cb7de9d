//! The user-space relay a [`Forwarder`](super::Forwarder) starts a pair on
//! with [`ForwardPath::Adaptive`]: splice(2) through a pipe, so no byte is
//! copied through user memory, and the count of request/response turns
//! that decides when the pair is handed to the kernel.
//!
//! Why both: the kernel's forwarding wins on request/response (no wake-up
//! of the proxy per message) and loses on bulk (its backlog worker sends
//! one segment at a time), where a splice relay between the proxy's own
//! plain sockets is the fastest user-space path. Handing a relayed pair to
//! the kernel is safe at any moment its pipes are empty (the hand-over
//! protocol covers bytes queued on the sockets); the way back is not
//! (bytes in the kernel's queues would be lost), so a pair moves once.

use std::os::fd::{AsFd, OwnedFd};

use nix::errno::Errno;

use super::pump::Copy;
use super::Forwarding;
use crate::sys;

/// How a [`Forwarder`](super::Forwarder) serves each pair it is handed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum ForwardPath {
    /// The kernel forwards the pair from the start (the default).
    #[default]
    Kernel,
    /// The forwarder relays the pair itself with splice(2) (no copy
    /// through user memory: the fastest user-space path for bulk) and hands
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
        /// 0.6-0.9x with 4 to 1,000 (docs/proxy-modes.md).
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

/// The longest run of bytes one splice moves (a pipe's default capacity).
const SPLICE_CHUNK: usize = 64 << 10;

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
pub(super) struct InPipe {
    pipe: Pipe,
    bytes: usize,
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
    /// The relay's copy from side `from` to the other: first what waits in
    /// its pipe, then socket -> pipe -> socket until the socket is empty
    /// (or at its end) or the other side is full. Bytes in the pipe are
    /// counted as copied once they reached the other socket.
    pub(super) fn splice_queued(&mut self, from: usize, pipes: &mut PipePool) -> Copy {
        let to = 1 - from;
        loop {
            let mut in_pipe = match self.sides[from].in_pipe.take() {
                Some(in_pipe) => in_pipe,
                None => {
                    let Ok(pipe) = pipes.take() else {
                        // No pipe (out of file descriptors): try again on
                        // the next event; the bytes stay on the socket.
                        return Copy::Done;
                    };
                    let source = self.sides[from].stream.as_fd();
                    match sys::splice(source, pipe.write.as_fd(), SPLICE_CHUNK) {
                        Ok(0) | Err(Errno::EAGAIN) => {
                            pipes.give_back(pipe);
                            return Copy::Done;
                        }
                        Ok(bytes) => InPipe { pipe, bytes },
                        Err(Errno::EINTR) => {
                            pipes.give_back(pipe);
                            continue;
                        }
                        Err(_) => return Copy::Failed,
                    }
                }
            };
            let target = self.sides[to].stream.as_fd();
            match sys::splice(in_pipe.pipe.read.as_fd(), target, in_pipe.bytes) {
                Ok(moved) => {
                    in_pipe.bytes -= moved;
                    self.sides[from].copied += moved as u64;
                    self.sides[from].relayed += moved as u64;
                }
                Err(Errno::EAGAIN) => {
                    self.sides[from].in_pipe = Some(in_pipe);
                    return Copy::Full;
                }
                Err(Errno::EINTR) => {}
                // The other side failed: poll() reports it.
                Err(_) => {
                    self.sides[from].in_pipe = Some(in_pipe);
                    return Copy::Done;
                }
            }
            if in_pipe.bytes == 0 {
                pipes.give_back(in_pipe.pipe);
            } else {
                self.sides[from].in_pipe = Some(in_pipe);
            }
        }
    }
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
