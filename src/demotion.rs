//! Streaming demotion: taking a pair that streams in small writes off the
//! shortcut, safely, while both directions may be sending.
//!
//! Every message of a socket in a socket map goes through the kernel's
//! sockmap send and receive path, which costs more per message than plain
//! TCP (no coalescing of small writes); request/response traffic gains far
//! more than it pays, small-write streaming loses. Policy cannot tell them
//! apart in advance, so the sk_msg program watches: a socket whose
//! redirects found its peer's queue still holding earlier messages
//! ([`StreamingDemotion::messages_in_a_row`] times in a row, each of at most
//! [`StreamingDemotion::max_message_bytes`]) asks for its pair's demotion.
//!
//! The order that loses, duplicates and reorders nothing:
//! 1. Each socket stops redirecting: the requester at once, its peer at the
//!    first segment it receives (the requester's plain bytes). Later
//!    messages go plain TCP, behind the redirected ones, which the peer
//!    reads first.
//! 2. A socket leaves the map (its psock, and the kernel's sockmap path,
//!    with it) only when its peer has stopped, every redirect its peer made
//!    has landed, and its own BPF queue has been read: deleting the entry
//!    earlier would drop queued bytes. A redirect lands after the sender's
//!    socket lock is let go, inside the sending thread's system call; the
//!    program records, per sending thread, the registers that thread
//!    entered the kernel with, and counts the redirect as landed once the
//!    thread runs another verdict on the socket or has entered the kernel
//!    anew (x86_64; elsewhere only the first).
//!
//! Between a receiver's reading the last of its BPF queue and its leaving
//! the map (at its next segment: nothing runs when it reads), its peer's
//! plain bytes wait in a map member, where kernels with the sockmap FIONREAD
//! change count only the BPF queue: FIONREAD reads 0 with bytes waiting.
//! That is why demotion is off by default.
//!
//! A socket more threads redirect from at once than the record holds (two)
//! is never demoted ([`Stats::demote_unprovable`](crate::Stats::demote_unprovable)).
//! A peer that receives nothing after the request stays in the map (it
//! leaves at the next segment it receives).

/// When a paired connection that streams small writes leaves the shortcut
/// ([`AcceleratorBuilder::demote_streaming`](crate::AcceleratorBuilder::demote_streaming)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamingDemotion {
    /// Redirects in a row that found the peer's queue still holding earlier
    /// messages (at least 1).
    pub messages_in_a_row: u32,
    /// The largest message that counts as small (at least 1 byte).
    pub max_message_bytes: u32,
}

impl Default for StreamingDemotion {
    /// 64 messages of at most 16 KiB.
    fn default() -> Self {
        StreamingDemotion {
            messages_in_a_row: 64,
            max_message_bytes: 16 << 10,
        }
    }
}
