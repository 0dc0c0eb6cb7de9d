//! Counters that show which path bytes took.

use std::fmt;

use crate::abi::fp_stats;

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
            fn add(&mut self, cpu: &fp_stats) {
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
}

impl Stats {
    /// Sums per-CPU copies.
    pub(crate) fn sum<'a>(per_cpu: impl IntoIterator<Item = &'a fp_stats>) -> Stats {
        let mut total = Stats::default();
        per_cpu.into_iter().for_each(|cpu| total.add(cpu));
        total
    }
}

impl fmt::Display for Stats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (name, value) in self.counters() {
            writeln!(f, "{name:>18}  {value}")?;
        }
        Ok(())
    }
}
