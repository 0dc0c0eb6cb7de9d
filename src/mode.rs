//! Where redirected bytes go: the one choice every other part depends on.

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
    /// each pair over with [`FastpathGuard::forward`](crate::FastpathGuard::forward); no cgroup is needed
    /// and the policy knobs and splice guard do not apply.
    Egress,
    /// Both at once, for a proxy that runs in the cgroup beside its
    /// applications (a sidecar): local pairs are accelerated as in
    /// [`Ingress`](Self::Ingress), and pairs handed to
    /// [`FastpathGuard::forward`](crate::FastpathGuard::forward) are forwarded as in
    /// [`Egress`](Self::Egress). When the downstream socket of a forwarded
    /// pair is itself accelerated (its client is a local application), the
    /// application's bytes skip the proxy's downstream socket and leave
    /// straight through the upstream socket whenever nothing waits on the
    /// downstream socket and the upstream socket has room; the rest is
    /// copied by [`Forwarding::wait`](crate::Forwarding::wait), in order.
    /// The upstream's bytes go straight into the application's queue.
    /// Needs a cgroup, on which it also attaches a `cgroup/getsockopt`
    /// program (`fp_backlog_query`) that tells `Forwarding` when the
    /// kernel has delivered the bytes it forwarded to an accelerated socket
    /// (so bytes it writes itself, or a FIN, never overtake them); every
    /// other `getsockopt()` of the cgroup's sockets passes through it
    /// unchanged. It stays attached while a `Forwarder` or `Forwarding` of
    /// the guard remains.
    ///
    /// # Minimum kernel version
    /// 6.2: the `bpf_cast_to_kern_ctx` and `bpf_rdonly_cast` kfuncs and
    /// kernel BTF, for the program reads the socket-map internals that tell
    /// whether bytes still wait on the downstream socket (tested on 6.12
    /// and 6.18; 6.1 refuses it with [`Error::KernelFeature`](crate::Error::KernelFeature)). It reads
    /// the queue's list, present since sockmap began, not the byte count
    /// (`msg_tot_len`) only kernels with the 2026 sockmap FIONREAD change
    /// have; no kernel between 6.2 and 6.11 has been run.
    Both,
}
