//! The builder: what to accelerate, and `attach()`.

use std::path::PathBuf;

use crate::attachment::Links;
use crate::blocking::BlockingSockets;
use crate::cgroup::Cgroup;
use crate::demotion::StreamingDemotion;
use crate::error::{Error, Result};
use crate::guard::FastpathGuard;
use crate::kernel_support::require_capabilities;
use crate::mode::RedirectMode;
use crate::netns;
use crate::policy::{Cidr, Policy};
use crate::programs::{LoadConfig, Programs};
use crate::splice_guard::SpliceGuard;

/// Entry point: `Accelerator::builder()`.
#[derive(Debug)]
pub struct Accelerator;

impl Accelerator {
    /// A builder with no cgroup chosen, every knob unset (match all),
    /// [`RedirectMode::Ingress`] and a capacity of
    /// [`AcceleratorBuilder::DEFAULT_CAPACITY`] sockets.
    pub fn builder() -> AcceleratorBuilder {
        AcceleratorBuilder::default()
    }
}

/// Chooses the scope, policy and mode, then [`attach`](Self::attach)es.
///
/// Setters never fail; `attach()` validates everything before it touches
/// the kernel.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until attach() is called"]
pub struct AcceleratorBuilder {
    cgroup: Option<Cgroup>,
    policy: Policy,
    mode: RedirectMode,
    capacity: u32,
    splice_guard: SpliceGuard,
    blocking: BlockingSockets,
    receive_queue_limit: u32,
    demotion: Option<StreamingDemotion>,
    namespace_groups: netns::Groups,
}

impl Default for AcceleratorBuilder {
    fn default() -> Self {
        AcceleratorBuilder {
            cgroup: None,
            policy: Policy::default(),
            mode: RedirectMode::default(),
            capacity: Self::DEFAULT_CAPACITY,
            splice_guard: SpliceGuard::default(),
            blocking: BlockingSockets::default(),
            receive_queue_limit: Self::DEFAULT_RECEIVE_QUEUE_LIMIT,
            demotion: None,
            namespace_groups: Vec::new(),
        }
    }
}

impl AcceleratorBuilder {
    /// Default socket map capacity (sockets, i.e. two per connection).
    pub const DEFAULT_CAPACITY: u32 = 65_536;

    /// Default [`receive_queue_limit`](Self::receive_queue_limit): 4 MiB,
    /// about what plain TCP on loopback let a sender queue into a receiver
    /// that does not read (3.8 MiB measured, `tests/backpressure.rs`).
    pub const DEFAULT_RECEIVE_QUEUE_LIMIT: u32 = 4 << 20;

    /// The cgroup whose sockets are in scope (required). Sockets belong to
    /// the cgroup of the process that created them, at creation time.
    pub fn cgroup(mut self, cgroup: Cgroup) -> Self {
        self.cgroup = Some(cgroup);
        self
    }

    /// Accelerate only connections whose local or remote port is one of
    /// these (adds to earlier calls). Port 0 is refused by `attach()`.
    pub fn ports(mut self, ports: impl IntoIterator<Item = u16>) -> Self {
        self.policy.ports.extend(ports);
        self
    }

    /// Accelerate only connections whose peer address is in this prefix
    /// (adds to earlier calls; IPv4 prefixes also match IPv4-mapped IPv6).
    pub fn cidr(mut self, cidr: Cidr) -> Self {
        self.policy.cidrs.push(cidr);
        self
    }

    /// Accelerate only sockets owned by a process of this name (as in
    /// `/proc/<pid>/comm`, at most 15 bytes; adds to earlier calls). See the
    /// [`policy`](crate::policy) module for who owns a socket.
    pub fn comm(mut self, comm: impl Into<String>) -> Self {
        self.policy.comms.push(comm.into());
        self
    }

    /// How bytes are redirected.
    pub fn redirect(mut self, mode: RedirectMode) -> Self {
        self.mode = mode;
        self
    }

    /// How many sockets the map holds. When it is full, new connections stay
    /// on plain TCP and `Stats::insert_failed` counts them.
    pub fn capacity(mut self, sockets: u32) -> Self {
        self.capacity = sockets;
        self
    }

    /// Declares that these network namespaces (files such as
    /// `/run/netns/NAME` or `/proc/PID/ns/net`) form one IP network with no
    /// overlapping addresses and no NAT between them, e.g. containers joined
    /// by veth or a bridge: connections between them are then accelerated
    /// too (their processes must still be in the cgroup). Each call adds one
    /// group; a namespace may be in one group only. See the
    /// [`netns`](crate::netns) module for what this promises.
    ///
    /// `attach()` enters each namespace briefly to learn its cookie, which
    /// needs CAP_SYS_ADMIN. Not used in egress mode.
    pub fn namespace_group<P: Into<PathBuf>>(
        mut self,
        namespaces: impl IntoIterator<Item = P>,
    ) -> Self {
        self.namespace_groups
            .push(namespaces.into_iter().map(Into::into).collect());
        self
    }

    /// Whether to install the splice guard (default [`SpliceGuard::On`]).
    pub fn splice_guard(mut self, guard: SpliceGuard) -> Self {
        self.splice_guard = guard;
        self
    }

    /// Whether connections from sockets that are blocking at `connect()`
    /// are accelerated (default [`BlockingSockets::KeepPlain`]: a blocking
    /// read on the shortcut can fail with EAGAIN; see [`BlockingSockets`]).
    pub fn blocking_sockets(mut self, blocking: BlockingSockets) -> Self {
        self.blocking = blocking;
        self
    }

    /// How much unread data (bytes of receive memory) an accelerated socket
    /// may hold before its local peer stops redirecting into it (default
    /// [`DEFAULT_RECEIVE_QUEUE_LIMIT`](Self::DEFAULT_RECEIVE_QUEUE_LIMIT)).
    /// Redirected bytes bypass TCP's flow control: without a bound, a
    /// receiver that stops reading lets a sender queue until the kernel's
    /// global TCP memory runs out. Past the limit (or while the kernel's
    /// TCP memory is above `tcp_mem[1]`, read at attach) the sender's
    /// messages go plain TCP, behind the redirected bytes, which its peer
    /// reads first, so it blocks, or gets EAGAIN, as on plain TCP; it
    /// returns to the shortcut once the peer holds at most half the limit
    /// and has read every plain byte.
    /// [`Stats::queue_limit_fallbacks`](crate::Stats::queue_limit_fallbacks)
    /// and `queue_limit_resumed` count the switches. `u32::MAX` means no
    /// bound. In [`RedirectMode::Both`] it does not act on redirects into a
    /// proxy's forwarded socket (whose plain bytes the proxy's forwarding
    /// sends on at once, ahead of queued ones): an application's bytes to
    /// its proxy, a local server's to an accelerated upstream socket. It
    /// does act on the proxy's downstream socket's bytes to its
    /// application, so a client that stops reading pushes back through the
    /// forwarding to the upstream server.
    ///
    /// `attach()` refuses 0 with [`Error::ZeroReceiveQueueLimit`].
    ///
    /// # Minimum kernel version
    /// 6.12.8 (redirected bytes charged to the receiver's memory) with the
    /// 6.2 kfuncs; [`probe()`](crate::probe) reports whether it acts
    /// (tested on 6.12.117 and 6.18.44; on 6.1 it does not).
    pub fn receive_queue_limit(mut self, bytes: u32) -> Self {
        self.receive_queue_limit = bytes;
        self
    }

    /// Takes paired connections that stream in small writes off the
    /// shortcut, both sockets, without losing, duplicating or reordering a
    /// byte in either direction (off by default; ingress mode only). See
    /// [`StreamingDemotion`] for when and the [`demotion`](crate::demotion)
    /// notes for how; [`Stats::demoted_sockets`](crate::Stats::demoted_sockets)
    /// counts the sockets that left.
    ///
    /// Off by default because, on kernels with the 2026 sockmap FIONREAD
    /// change (6.18.44 measured), FIONREAD on a receiver being demoted reads
    /// 0 while its peer's plain bytes wait, until the receiver sends a
    /// segment and leaves the map; plain TCP never does that. Programs that
    /// size reads with FIONREAD should leave it off.
    ///
    /// `attach()` refuses a zero field with [`Error::ZeroStreamingDemotion`].
    ///
    /// # Minimum kernel version
    /// 6.2 (kfuncs); `attach()` fails with [`Error::KernelFeature`] before.
    pub fn demote_streaming(mut self, when: StreamingDemotion) -> Self {
        self.demotion = Some(when);
        self
    }

    /// Loads the BPF programs and attaches them to the cgroup.
    ///
    /// Order: the splice guard first, then the sk_msg program on the socket
    /// map, the sock_ops program on the cgroup last, so nothing is selected
    /// before the whole path is in place. On any error everything done so far is
    /// undone: nothing stays attached.
    ///
    /// Needs CAP_BPF and CAP_NET_ADMIN (or CAP_SYS_ADMIN).
    ///
    /// # Errors
    /// Invalid input ([`Error::NoCgroup`], [`Error::InvalidPort`],
    /// [`Error::InvalidComm`], [`Error::ZeroCapacity`],
    /// [`Error::PolicyTooLarge`], [`Error::NamespaceGroup`],
    /// [`Error::ZeroStreamingDemotion`]); [`Error::StreamingDemotionMode`]
    /// (demotion outside ingress mode); [`Error::MissingCapability`];
    /// [`Error::KernelFeature`] when the kernel is older than 6.1 and
    /// refuses the programs (with `min_kernel` "6.1" and the running
    /// release; Debian 11's 5.10 in the kernel matrix), cannot attach
    /// sk_msg programs to socket maps at all, lacks what a comm policy,
    /// [`RedirectMode::Both`] or streaming demotion needs, or (with the
    /// splice guard on) an active BPF LSM
    /// ([`Error::is_splice_guard_refused`]); or [`Error::Bpf`] naming the
    /// failing call.
    ///
    /// # Minimum kernel version
    /// 6.1 (every test runs on 6.1, 6.12 and 6.18; older kernels' verifiers
    /// refuse the programs, and `attach()` says so). Sockmap BPF links are
    /// used from 6.10, the older `BPF_PROG_ATTACH` before; comm policies
    /// need 6.10 (the task in sock_ops programs) and [`RedirectMode::Both`]
    /// 6.2.
    pub fn attach(self) -> Result<FastpathGuard> {
        self.validate_demotion()?;
        if self.mode == RedirectMode::Egress {
            return self.attach_egress();
        }
        let cgroup = self.cgroup.clone().ok_or(Error::NoCgroup)?;
        self.policy.validate()?;
        self.validate_capacity()?;
        if self.receive_queue_limit == 0 {
            return Err(Error::ZeroReceiveQueueLimit {
                default: Self::DEFAULT_RECEIVE_QUEUE_LIMIT,
            });
        }
        require_capabilities("attaching sock_ops and sk_msg programs")?;
        let spaces = netns::spaces(&self.namespace_groups)?;

        let mut programs = Programs::load(LoadConfig {
            owners_required: !self.policy.comms.is_empty(),
            keep_blocking_plain: self.blocking == BlockingSockets::KeepPlain,
            receive_queue_limit: self.receive_queue_limit,
            demotion: self.demotion,
            ..LoadConfig::new(self.mode, self.capacity, self.splice_guard.enabled())
        })?;
        programs.set_policy(&self.policy)?;
        programs.set_netns_spaces(&spaces)?;
        let links = Links::attach(&programs, self.mode, Some(&cgroup), self.splice_guard)?;
        FastpathGuard::new(programs, links, Some(cgroup), self.mode)
    }

    /// Egress mode: only the stream verdict program, linked to fwd_map; no
    /// cgroup, policy or splice guard.
    fn attach_egress(self) -> Result<FastpathGuard> {
        self.validate_capacity()?;
        require_capabilities("attaching an sk_skb program")?;
        let programs = Programs::load(LoadConfig::new(self.mode, self.capacity, false))?;
        let links = Links::attach(&programs, self.mode, None, SpliceGuard::Off)?;
        FastpathGuard::new(programs, links, None, self.mode)
    }

    fn validate_demotion(&self) -> Result<()> {
        match self.demotion {
            Some(_) if self.mode != RedirectMode::Ingress => {
                Err(Error::StreamingDemotionMode { mode: self.mode })
            }
            Some(d) if d.messages_in_a_row == 0 => Err(Error::ZeroStreamingDemotion {
                field: "messages_in_a_row",
            }),
            Some(d) if d.max_message_bytes == 0 => Err(Error::ZeroStreamingDemotion {
                field: "max_message_bytes",
            }),
            _ => Ok(()),
        }
    }

    fn validate_capacity(&self) -> Result<()> {
        if self.capacity == 0 {
            return Err(Error::ZeroCapacity {
                default: Self::DEFAULT_CAPACITY,
            });
        }
        Ok(())
    }
}
