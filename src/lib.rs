//! A kernel shortcut for TCP between processes on the same Linux host,
//! built on eBPF sockmap, that is safe to leave switched on.
//!
//! ```no_run
//! use sockmap_fastpath::{Accelerator, Cgroup, RedirectMode};
//!
//! # fn main() -> Result<(), sockmap_fastpath::Error> {
//! let guard = Accelerator::builder()
//!     .cgroup(Cgroup::path("/sys/fs/cgroup/unified/my-service")?)
//!     .ports([6379, 8080])
//!     .cidr("127.0.0.0/8".parse()?)
//!     .comm("redis-server")
//!     .redirect(RedirectMode::Ingress)
//!     .attach()?;
//! println!("{}", guard.stats()?);
//! guard.detach()?; // or drop it: detaching loses no byte
//! # Ok(())
//! # }
//! ```
//!
//! - [`RedirectMode::Ingress`] (the default): sockets of the chosen cgroup
//!   that the policy selects are paired with their local peer; each
//!   `sendmsg()` goes straight into the peer's receive queue.
//! - [`RedirectMode::Egress`]: a proxy hands pairs of its own connections to
//!   a [`Forwarder`] (one thread for any number of pairs) or to
//!   [`FastpathGuard::forward`]; the kernel forwards between them (see the
//!   [`forward`] module for the hand-over protocol).
//! - [`RedirectMode::Both`]: both at once, for a sidecar proxy in the same
//!   cgroup as its applications: an application's bytes to a forwarded
//!   downstream socket leave straight through the upstream socket, and the
//!   upstream's bytes go straight into the application's receive queue.
//! - [`BlockingSockets`]: connections whose connecting socket is blocking at
//!   `connect()` stay on plain TCP by default, since a blocking read on the
//!   shortcut can fail with EAGAIN; event loops are accelerated.
//! - [`AcceleratorBuilder::receive_queue_limit`]: a receiver more than the
//!   limit behind (4 MiB by default), or a kernel short of TCP memory, makes
//!   its peer send plain TCP until it has caught up, so TCP's flow control
//!   pushes back as without the shortcut (ingress mode, 6.12.8 and newer).
//! - [`AcceleratorBuilder::demote_streaming`]: pairs that stream small
//!   writes (slower on the shortcut than on plain TCP) leave it
//!   mid-transfer without losing a byte (off by default; 6.2 and newer).
//! - [`probe`] tells what the running kernel can do, by trying it.
//!
//! The long form is in [`guide`]: [which connections are
//! accelerated](guide::selection), [the guarantees](guide::guarantees) and
//! how they are tested, [the proxy modes](guide::proxy_modes) and [the known
//! limits](guide::known_limits); measured numbers are in the README.

#![warn(missing_docs)]
// `unsafe` only where allowed by name below: raw OS and libbpf calls
// (sys), byte views of the shared structs (abi), the skeleton's storage
// (programs) and the generated skeleton.
#![deny(unsafe_code)]

#[allow(unsafe_code)]
mod abi;
mod accelerator;
mod attachment;
mod blocking;
mod cgroup;
pub mod demotion;
mod error;
pub mod forward;
mod guard;
pub mod guide;
mod kernel_support;
mod logging;
mod mode;
pub mod netns;
pub mod policy;
mod probe;
#[allow(unsafe_code)]
mod programs;
mod splice_guard;
mod stats;
#[allow(unsafe_code)]
mod sys;

#[allow(
    clippy::all,
    missing_docs,
    unsafe_code,
    unsafe_op_in_unsafe_fn,
    unused_imports
)]
mod skel {
    include!(concat!(env!("OUT_DIR"), "/fastpath.skel.rs"));
}

pub use accelerator::{Accelerator, AcceleratorBuilder};
pub use blocking::BlockingSockets;
pub use cgroup::{cgroup2_mount, Cgroup, ChildCgroup};
pub use demotion::StreamingDemotion;
pub use error::{Error, ErrorKind, Result};
pub use forward::{
    ForwardEnd, ForwardPath, ForwardStats, ForwardedPair, Forwarder, Forwarding, Refused,
};
pub use guard::FastpathGuard;
pub use mode::RedirectMode;
pub use policy::Cidr;
pub use probe::{probe, Finding, ProbeReport};
pub use splice_guard::SpliceGuard;
pub use stats::{Stats, StatsReader};

#[cfg(test)]
mod tests {
    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn handles_can_move_between_threads() {
        assert_send_sync::<crate::FastpathGuard>();
        assert_send_sync::<crate::StatsReader>();
        assert_send_sync::<crate::ChildCgroup>();
        assert_send_sync::<crate::Error>();
    }
}
