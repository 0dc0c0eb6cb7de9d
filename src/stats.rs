//! Counters that show which path bytes took.

use std::fmt;

use libbpf_rs::{MapCore, MapFlags, MapHandle};

use crate::abi::{fp_stats, Plain};
use crate::error::{Error, Result};

macro_rules! counters {
    ($($(#[doc = $doc:literal])+ $name:ident,)+) => {
        /// Totals over all CPUs since the accelerator was attached.
        ///
        /// A "message" is one chunk of a `sendmsg()` as the sk_msg program
        /// sees it (a large write may be several). Sockets the policy did not
        /// select never reach the sk_msg program: their traffic shows up only
        /// in `policy_skipped` (one per socket), not in `bytes_passed`.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats {
            $($(#[doc = $doc])+ pub $name: u64,)+
        }

        impl Stats {
            fn accumulate(&mut self, cpu: &fp_stats) {
                $(self.$name += cpu.$name;)+
            }

            /// Counter-wise `self - earlier` (saturating): what happened
            /// between two snapshots.
            pub fn since(&self, earlier: &Stats) -> Stats {
                Stats { $($name: self.$name.saturating_sub(earlier.$name),)+ }
            }

            /// `(name, value)` of every counter, in a stable order.
            pub fn counters(&self) -> Vec<(&'static str, u64)> {
                vec![$((stringify!($name), self.$name),)+]
            }
        }

        impl std::ops::Add for Stats {
            type Output = Stats;
            fn add(self, other: Stats) -> Stats {
                Stats { $($name: self.$name + other.$name,)+ }
            }
        }
    };
}

counters! {
    /// Messages moved straight to the peer socket.
    msgs_redirected,
    /// Bytes moved straight to the peer socket.
    bytes_redirected,
    /// Messages of accelerated sockets sent as plain TCP.
    msgs_passed,
    /// Bytes of accelerated sockets sent as plain TCP.
    bytes_passed,
    /// Messages sent plain because the peer was not in the socket map (the
    /// sending socket then stays plain, so no byte can overtake another).
    peer_missing,
    /// Sockets put into the socket map.
    sockets_inserted,
    /// Sockets the policy selected but the map refused (full): plain TCP.
    insert_failed,
    /// Established sockets in the cgroup that the policy did not select.
    policy_skipped,
    /// Selected sockets kept plain because data had already moved (TCP Fast Open).
    late_skipped,
    /// splice(2) reads from accelerated sockets refused with EINVAL.
    splice_blocked,
    /// Sockets kept plain because their owner process was caught splicing.
    splice_excluded,
    /// Egress mode: received segments forwarded to the paired socket.
    fwd_segments,
    /// Egress mode: bytes forwarded to the paired socket.
    fwd_bytes,
    /// Egress mode: segments received with no peer to forward to (left to
    /// the proxy to read).
    fwd_unpaired,
    /// Both mode: an application's messages sent straight out of the
    /// upstream socket of a forwarded pair (skipping the proxy's
    /// downstream socket).
    fwd_direct_msgs,
    /// Both mode: bytes of those messages.
    fwd_direct_bytes,
    /// Accepted sockets kept out of the map because their peer is not on
    /// the shortcut (a remote client, one outside the policy or the
    /// cgroup, one that already sent plain bytes).
    unpaired_skipped,
    /// Connecting sockets taken out of the map because their peer did not
    /// join (remote, outside the policy or the cgroup, refused): from then
    /// on they are plain TCP sockets in every respect. Nothing was ever
    /// redirected into them, so nothing is lost.
    unpaired_removed,
    /// Paired sockets that turned out to have plain bytes queued from a
    /// send() made while connecting: they send plain from then on, so
    /// nothing overtakes those bytes.
    late_plain,
    /// Connecting sockets kept plain because they were in blocking mode at
    /// `connect()` ([`BlockingSockets::KeepPlain`](crate::BlockingSockets));
    /// their accepted peers count in `unpaired_skipped`.
    blocking_skipped,
    /// Paired sockets found in blocking mode at their first send (accepted
    /// by a blocking server, or set blocking after connecting): they stay
    /// on the shortcut, where a blocking read can fail with EAGAIN while
    /// another thread writes to the socket (docs/known-limits.md).
    blocking_paired,
    /// Times a paired socket switched to plain TCP because its peer held
    /// more than
    /// [`receive_queue_limit`](crate::AcceleratorBuilder::receive_queue_limit)
    /// of unread bytes: TCP's flow control then pushes back on the sender.
    queue_limit_fallbacks,
    /// Times such a socket went back to the shortcut: its peer had drained
    /// to half the limit and read every plain byte.
    queue_limit_resumed,
    /// Sends failed (EACCES) because a socket over the limit could not send
    /// plain; not expected while the socket is open.
    queue_limit_dropped,
    /// Egress and both modes: received segments kept in the receiving
    /// socket's queue behind bytes waiting there (kept because the peer was
    /// not in the map yet), for `Forwarding::wait` to copy in order.
    fwd_queued_behind,
    /// Egress and both modes: received segments kept in the receiving
    /// socket's queue because the other socket's forwarding backlog was full (its receiver
    /// is not keeping up): TCP's window then pushes back on the sender, and
    /// `Forwarding` copies them on once the backlog has drained.
    fwd_backlog_kept,
    /// Egress and both modes: segments forwarded into a full backlog all the same,
    /// because the receiving socket's own backlog was busy sending the
    /// other direction (a segment kept then would wait unseen behind it).
    fwd_backlog_overrun,
    /// Egress and both modes: of the kept segments, those kept while the
    /// receiving socket's own forwarding backlog was busy sending the
    /// other direction: they wait there, where no read sees them, until it
    /// reaches them (both mode: an application's bytes past its queue's
    /// bound while it does not read its download). In both mode
    /// `Forwarding` then passes no FIN on, and the forwarding program
    /// forwards nothing in that direction, while that backlog holds
    /// anything (in egress mode the kept-byte count holds them back).
    fwd_kept_unseen,
    /// Egress and both modes: received segments that began before bytes
    /// the forwarding program had already taken. TCP queues a segment that
    /// partly repeats delivered bytes (a retransmission overlapping data
    /// received out of order) whole, and the kernel hands the forwarding
    /// program whole segments: the repeated part is trimmed off (or the
    /// segment dropped if it repeats only), or it would be sent twice.
    fwd_overlaps,
    /// The bytes trimmed off those segments.
    fwd_overlap_bytes,
    /// Streaming demotion: pairs a socket asked to take off the shortcut
    /// (see [`StreamingDemotion`](crate::StreamingDemotion)).
    demote_requested,
    /// Sockets of those pairs that stopped redirecting: their later
    /// messages went plain TCP.
    demote_stopped,
    /// Sockets of those pairs that left the socket map: nothing could be
    /// redirected into them any more and their queue had been read.
    demoted_sockets,
    /// Sockets more threads redirected from at once than the demotion's
    /// record holds: never demoted.
    demote_unprovable,
}

impl Stats {
    /// Sums per-CPU copies.
    fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a fp_stats>) -> Stats {
        let mut total = Stats::default();
        per_cpu.into_iter().for_each(|cpu| total.accumulate(cpu));
        total
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, value) in self.counters() {
            writeln!(f, "{name:>21}  {value}")?;
        }
        Ok(())
    }
}

/// Reads an accelerator's counters through its own handle on the stats
/// map, so it keeps working after the guard is detached: connections that
/// were accelerated go on being counted (as passed) until they close.
#[derive(Debug)]
pub struct StatsReader {
    map: MapHandle,
}

impl StatsReader {
    pub(crate) fn new<M>(map: &M) -> Result<Self>
    where
        for<'a> MapHandle: TryFrom<&'a M, Error = libbpf_rs::Error>,
    {
        let map =
            MapHandle::try_from(map).map_err(|err| Error::bpf("dup of the stats map fd", err))?;
        Ok(StatsReader { map })
    }

    /// The current totals.
    ///
    /// # Errors
    /// [`Error::Bpf`] if the map cannot be read.
    pub fn read(&self) -> Result<Stats> {
        let per_cpu = self
            .map
            .lookup_percpu(&0u32.to_ne_bytes(), MapFlags::ANY)
            .map_err(|err| Error::bpf("bpf(BPF_MAP_LOOKUP_ELEM) on stats", err))?
            .unwrap_or_default();
        let cpus: Vec<fp_stats> = per_cpu
            .iter()
            .filter_map(|b| fp_stats::from_bytes(b))
            .collect();
        Ok(Stats::sum(&cpus))
    }
}
