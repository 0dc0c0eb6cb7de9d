//! The builder: what to accelerate, and `attach()`.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;

use crate::attachment::{Attachment, SockmapHook};
use crate::blocking::BlockingSockets;
use crate::cgroup::Cgroup;
use crate::error::{Error, Result};
use crate::guard::FastpathGuard;
use crate::netns;
use crate::policy::{Cidr, Policy};
use crate::programs::{LoadConfig, Programs};
use crate::splice_guard::{self, SpliceGuard};
use crate::sys::{self, Capability};

/// Where redirected bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum RedirectMode {
    /// Bytes a socket sends go straight into the receive queue of its local
    /// peer socket (the other end of the same loopback connection), skipping
    /// the TCP/IP stack. For any two local processes talking TCP. Selects
    /// sockets in the builder's cgroup by its policy.
    #[default]
    Ingress,
    /// For proxies: bytes arriving on one of a pair of the proxy's own
    /// sockets leave through the other's send path (the peer may be on
    /// another host). Nothing is selected automatically: the proxy hands
    /// each pair over with [`FastpathGuard::forward`]; no cgroup is needed
    /// and the policy knobs and splice guard do not apply.
    Egress,
    /// Both at once, for a proxy that runs in the cgroup beside its
    /// applications (a sidecar): local pairs are accelerated as in
    /// [`Ingress`](Self::Ingress), and pairs handed to
    /// [`FastpathGuard::forward`] are forwarded as in
    /// [`Egress`](Self::Egress). When the downstream socket of a forwarded
    /// pair is itself accelerated (its client is a local application), the
    /// application's bytes skip the proxy's downstream socket and leave
    /// straight through the upstream socket whenever nothing waits on the
    /// downstream socket and the upstream socket has room; the rest is
    /// copied by [`Forwarding::wait`](crate::Forwarding::wait), in order.
    /// The upstream's bytes go straight into the application's queue.
    /// Needs a cgroup.
    ///
    /// # Minimum kernel version
    /// 6.2: the `bpf_cast_to_kern_ctx` and `bpf_rdonly_cast` kfuncs and
    /// kernel BTF, for the program reads the socket-map internals that tell
    /// whether bytes still wait on the downstream socket (tested on 6.12
    /// and 6.18; 6.1 refuses it with [`Error::KernelFeature`]). It reads
    /// the queue's list, present since sockmap began, not the byte count
    /// (`msg_tot_len`) only kernels with the 2026 sockmap FIONREAD change
    /// have; no kernel between 6.2 and 6.11 has been run.
    Both,
}

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
    /// bound. Ingress mode only: in [`RedirectMode::Both`] the limit does
    /// not act (a proxy forwards plain bytes at once, ahead of queued ones).
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
    /// [`Error::PolicyTooLarge`], [`Error::NamespaceGroup`]); [`Error::MissingCapability`];
    /// [`Error::KernelFeature`] when the kernel cannot attach sk_msg programs
    /// to socket maps at all, lacks what a comm policy or
    /// [`RedirectMode::Both`] needs, or (with the splice guard on) an active
    /// BPF LSM ([`Error::is_splice_guard_refused`]); or [`Error::Bpf`]
    /// naming the failing call.
    ///
    /// # Minimum kernel version
    /// 6.1 (every test runs on 6.1, 6.12 and 6.18). Sockmap BPF links are
    /// used from 6.10, the older `BPF_PROG_ATTACH` before; comm policies
    /// need 6.10 (the task in sock_ops programs) and [`RedirectMode::Both`]
    /// 6.2.
    pub fn attach(self) -> Result<FastpathGuard> {
        if self.mode == RedirectMode::Egress {
            return self.attach_egress();
        }
        let cgroup = self.cgroup.clone().ok_or(Error::NoCgroup)?;
        self.policy.validate()?;
        if self.capacity == 0 {
            return Err(Error::ZeroCapacity {
                default: Self::DEFAULT_CAPACITY,
            });
        }
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
            ..LoadConfig::new(self.mode, self.capacity, self.splice_guard.enabled())
        })?;
        programs.set_policy(&self.policy)?;
        programs.set_netns_spaces(&spaces)?;

        let skel = programs.skel();
        let guard_link = match self.splice_guard {
            SpliceGuard::On => Some(splice_guard::attach(&skel.progs.fp_splice_guard)?),
            SpliceGuard::Off => None,
        };
        let mut links = Vec::new();
        if self.mode == RedirectMode::Both {
            links.push(attach_verdict(&programs)?);
        }
        let (msg_prog, msg_call) = match self.mode {
            RedirectMode::Both => (
                &skel.progs.fp_sk_msg_both,
                "detaching fp_sk_msg_both from sock_map",
            ),
            _ => (&skel.progs.fp_sk_msg, "detaching fp_sk_msg from sock_map"),
        };
        links.push(
            Attachment::to_sockmap(
                msg_prog,
                skel.maps.sock_map.as_fd(),
                SockmapHook::MsgVerdict,
                msg_call,
            )
            .map_err(|source| classify_attach_error(AttachStep::SockmapLink, source))?,
        );
        let cgroup_dir =
            File::open(cgroup.as_path()).map_err(|err| Error::io("open", cgroup.as_path(), err))?;
        let ops_link = skel
            .progs
            .fp_sock_ops
            .attach_cgroup(cgroup_dir.as_raw_fd())
            .map_err(|err| {
                classify_attach_error(AttachStep::CgroupLink, crate::error::libbpf_to_io(&err))
            })?;
        // Detached first: nothing new is selected while the rest goes.
        links.insert(
            0,
            Attachment::link(
                ops_link,
                "bpf(BPF_LINK_DETACH) of fp_sock_ops from the cgroup",
            ),
        );
        FastpathGuard::new(programs, links, guard_link, Some(cgroup), self.mode)
    }

    /// Egress mode: only the stream verdict program, linked to fwd_map.
    fn attach_egress(self) -> Result<FastpathGuard> {
        if self.capacity == 0 {
            return Err(Error::ZeroCapacity {
                default: Self::DEFAULT_CAPACITY,
            });
        }
        require_capabilities("attaching an sk_skb program")?;
        let programs = Programs::load(LoadConfig::new(self.mode, self.capacity, false))?;
        let links = vec![attach_verdict(&programs)?];
        FastpathGuard::new(programs, links, None, self.cgroup, self.mode)
    }
}

/// Attaches the forwarding verdict program to fwd_map.
fn attach_verdict(programs: &Programs) -> Result<Attachment> {
    let skel = programs.skel();
    Attachment::to_sockmap(
        &skel.progs.fp_fwd_verdict,
        skel.maps.fwd_map.as_fd(),
        SockmapHook::SkbVerdict,
        "detaching fp_fwd_verdict from fwd_map",
    )
    .map_err(|source| classify_attach_error(AttachStep::SockmapLink, source))
}

/// Fails early, with a clear message, when capabilities are missing.
pub(crate) fn require_capabilities(operation: &'static str) -> Result<()> {
    let caps =
        sys::effective_capabilities().map_err(|err| Error::io("read", "/proc/self/status", err))?;
    let has =
        |cap| sys::has_capability(caps, cap) || sys::has_capability(caps, Capability::SysAdmin);
    if !has(Capability::Bpf) && !has(Capability::NetAdmin) {
        return Err(Error::MissingCapability {
            operation,
            capability: "CAP_BPF and CAP_NET_ADMIN",
        });
    }
    if !has(Capability::Bpf) {
        return Err(Error::MissingCapability {
            operation,
            capability: "CAP_BPF",
        });
    }
    if !has(Capability::NetAdmin) {
        return Err(Error::MissingCapability {
            operation,
            capability: "CAP_NET_ADMIN",
        });
    }
    Ok(())
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum AttachStep {
    SockmapLink,
    CgroupLink,
}

/// Names the missing kernel feature when an attach fails because the
/// kernel does not know the attach type, otherwise reports the call.
pub(crate) fn classify_attach_error(step: AttachStep, source: std::io::Error) -> Error {
    match (step, sys::is_unsupported(&source)) {
        (AttachStep::SockmapLink, true) => Error::KernelFeature {
            feature: "sk_msg/sk_skb programs on socket maps (neither a BPF link nor \
                      BPF_PROG_ATTACH was accepted)",
            min_kernel: "4.17",
            source,
        },
        (AttachStep::CgroupLink, true) => Error::KernelFeature {
            feature: "cgroup BPF links for sock_ops programs",
            min_kernel: "5.7",
            source,
        },
        (AttachStep::SockmapLink, false) => Error::Bpf {
            call: "attaching a program to a socket map (BPF_LINK_CREATE, then BPF_PROG_ATTACH)",
            source,
        },
        (AttachStep::CgroupLink, false) => Error::Bpf {
            call: "bpf(BPF_LINK_CREATE) attaching fp_sock_ops to the cgroup",
            source,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_attach_types_name_the_feature_and_kernel() {
        let err = classify_attach_error(
            AttachStep::SockmapLink,
            std::io::Error::from_raw_os_error(nix::libc::EINVAL),
        );
        let text = err.to_string();
        assert!(
            text.contains("BPF_PROG_ATTACH") && text.contains("4.17"),
            "{text}"
        );
        let err = classify_attach_error(
            AttachStep::CgroupLink,
            std::io::Error::from_raw_os_error(nix::libc::EBADF),
        );
        assert!(matches!(err, Error::Bpf { .. }), "{err}");
    }
}
