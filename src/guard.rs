//! The attached accelerator: live policy, counters, and detaching.

use std::net::TcpStream;
use std::os::fd::AsFd;
use std::sync::Arc;

use crate::attachment::Links;
use crate::cgroup::Cgroup;
use crate::error::{Error, Result};
use crate::forward::{ForwardMaps, Forwarder, Forwarding, NotEstablished};
use crate::mode::RedirectMode;
use crate::policy::{validate_cidrs, validate_comms, validate_ports, Cidr};
use crate::programs::Programs;
use crate::splice_guard;
use crate::stats::{Stats, StatsReader};

/// An attached accelerator. Dropping it detaches (ignoring errors);
/// [`detach`](Self::detach) reports them.
///
/// Detaching loses no byte: it first switches the programs to "pause" (no
/// new socket is selected, no new message redirected), then removes the
/// programs from the cgroup and the socket map. It never deletes map
/// entries, which would drop bytes already redirected but not yet read.
/// Those bytes are still delivered, in order, before any later plain-TCP
/// bytes; sockets leave the map, and the kernel frees the map and the
/// programs, as the connections close.
#[must_use = "dropping the guard detaches the accelerator at once"]
pub struct FastpathGuard {
    // Field order is drop order: links before the programs they reference.
    links: Links,
    stats: StatsReader,
    programs: Programs,
    cgroup: Option<Cgroup>,
    mode: RedirectMode,
}

impl std::fmt::Debug for FastpathGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FastpathGuard")
            .field("cgroup", &self.cgroup)
            .field("mode", &self.mode)
            .field("attached", &self.links.is_attached())
            .finish()
    }
}

impl FastpathGuard {
    pub(crate) fn new(
        programs: Programs,
        links: Links,
        cgroup: Option<Cgroup>,
        mode: RedirectMode,
    ) -> Result<Self> {
        Ok(FastpathGuard {
            links,
            stats: programs.stats_reader()?,
            programs,
            cgroup,
            mode,
        })
    }

    /// The cgroup it is attached to (none in egress mode).
    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.cgroup.as_ref()
    }

    /// Egress and both modes: hands a proxy's pair of connections to the kernel, which
    /// from now on forwards bytes arriving on either socket out through the
    /// other. Takes any TCP stream by reference (std, tokio, socket2...);
    /// keep your streams; follow the hand-over protocol in the
    /// [`forward`](crate::forward) module docs, then call
    /// [`Forwarding::wait`].
    ///
    /// # Errors
    /// [`Error::NotEgressMode`] in ingress mode; [`Error::Bpf`] if a socket
    /// is already forwarded or the map is full (nothing is forwarded then,
    /// and the sockets can still be copied in user space); I/O errors from
    /// dup or getsockopt.
    pub fn forward(&self, downstream: &impl AsFd, upstream: &impl AsFd) -> Result<Forwarding> {
        let maps = self.forward_maps()?;
        let dup = |socket: &dyn AsFd, what: &'static str| {
            socket
                .as_fd()
                .try_clone_to_owned()
                .map(TcpStream::from)
                .map_err(|err| Error::io("dup", what, err))
        };
        Forwarding::start(
            Arc::new(maps),
            dup(downstream, "downstream socket")?,
            dup(upstream, "upstream socket")?,
            NotEstablished::Refuse,
        )
    }

    /// Egress and both modes: a [`Forwarder`], which serves any number of
    /// pairs from one thread and owns their streams (for proxies with many
    /// connections; [`forward`](Self::forward) plus [`Forwarding::wait`]
    /// needs a thread per pair). It keeps its own handles to the maps, so it
    /// may outlive the guard; pairs it serves stay forwarded after the guard
    /// detaches, as with `forward()`.
    ///
    /// # Errors
    /// [`Error::NotEgressMode`] in ingress mode; [`Error::Bpf`] if a map fd
    /// cannot be duplicated; [`Error::Io`] if epoll, the eventfd or the
    /// thread cannot be made.
    pub fn forwarder(&self) -> Result<Forwarder> {
        Forwarder::new(self.forward_maps()?)
    }

    fn forward_maps(&self) -> Result<ForwardMaps> {
        if self.mode == RedirectMode::Ingress {
            return Err(Error::NotEgressMode);
        }
        let mut maps = self
            .programs
            .forward_maps(self.mode == RedirectMode::Both)?;
        if let Some(direct) = maps.direct.as_mut() {
            direct.backlog_query = self.links.backlog_query();
        }
        Ok(maps)
    }

    /// The redirect mode.
    pub fn mode(&self) -> RedirectMode {
        self.mode
    }

    /// Counters summed over all CPUs.
    ///
    /// # Errors
    /// [`Error::Bpf`] if the stats map cannot be read.
    pub fn stats(&self) -> Result<Stats> {
        self.stats.read()
    }

    /// A reader of this accelerator's counters that outlives the guard.
    ///
    /// # Errors
    /// [`Error::Bpf`] if the map fd cannot be duplicated.
    pub fn stats_reader(&self) -> Result<StatsReader> {
        self.programs.stats_reader()
    }

    /// Whether the programs on socket maps are attached with BPF links
    /// (Linux 6.10), rather than the older way.
    pub(crate) fn uses_sockmap_links(&self) -> bool {
        self.links.use_sockmap_links()
    }

    /// How many sockets are in the socket map now (two per accelerated
    /// connection; they leave as connections close).
    pub fn socket_count(&self) -> usize {
        self.programs.socket_count()
    }

    /// Process ids the splice guard caught splicing from an accelerated
    /// socket that are still running; their connections made since stay on
    /// plain TCP. A process that reuses a caught process's pid is neither
    /// listed nor excluded (the programs compare start times). At most
    /// [`SpliceGuard::MAX_EXCLUDED_PROCESSES`](crate::SpliceGuard::MAX_EXCLUDED_PROCESSES).
    pub fn splice_excluded_processes(&self) -> Vec<u32> {
        splice_guard::excluded_processes(&self.programs.skel().maps.splice_excluded)
    }

    /// Local addresses of services whose accepted sockets the splice guard
    /// caught being spliced; their connections made since stay on plain
    /// TCP, whichever process accepts them (the process that splices is
    /// often not the one that listened: pre-fork workers, socket
    /// activation). At most
    /// [`SpliceGuard::MAX_EXCLUDED_PROCESSES`](crate::SpliceGuard::MAX_EXCLUDED_PROCESSES)
    /// services are remembered, as for processes.
    pub fn splice_excluded_services(&self) -> Vec<std::net::SocketAddr> {
        splice_guard::excluded_services(&self.programs.skel().maps.splice_excluded_services)
    }

    /// Replaces the port set for connections established from now on;
    /// empty matches every port.
    ///
    /// # Errors
    /// [`Error::InvalidPort`] for port 0 (nothing is changed), or
    /// [`Error::Bpf`] if a map update fails.
    pub fn set_ports(&mut self, ports: impl IntoIterator<Item = u16>) -> Result<()> {
        let ports: Vec<u16> = ports.into_iter().collect();
        validate_ports(&ports)?;
        self.programs.set_ports(&ports)
    }

    /// Replaces the CIDR set for connections established from now on;
    /// empty matches every address.
    ///
    /// # Errors
    /// [`Error::PolicyTooLarge`], or [`Error::Bpf`] if a map update fails.
    pub fn set_cidrs(&mut self, cidrs: impl IntoIterator<Item = Cidr>) -> Result<()> {
        let cidrs: Vec<Cidr> = cidrs.into_iter().collect();
        validate_cidrs(&cidrs)?;
        self.programs.set_cidrs(&cidrs)
    }

    /// Replaces the process-name set for connections established from now
    /// on; empty matches every process.
    ///
    /// # Errors
    /// [`Error::InvalidComm`] (nothing is changed), [`Error::PolicyTooLarge`],
    /// or [`Error::Bpf`] if a map update fails.
    pub fn set_comms<S: Into<String>>(&mut self, comms: impl IntoIterator<Item = S>) -> Result<()> {
        let comms: Vec<String> = comms.into_iter().map(Into::into).collect();
        validate_comms(&comms)?;
        self.programs.set_comms(&comms)
    }

    /// Detaches now and returns the final counters. The splice guard stays
    /// until the last accelerated socket has closed (see [`SpliceGuard`](crate::SpliceGuard)).
    ///
    /// # Errors
    /// [`Error::Bpf`] naming the first link that failed to detach; the
    /// others are detached regardless.
    pub fn detach(mut self) -> Result<Stats> {
        let result = self.detach_links();
        let stats = self.stats.read();
        result.and(stats)
    }

    fn detach_links(&mut self) -> Result<()> {
        self.programs.pause();
        self.links.detach(&self.programs)
    }
}

impl Drop for FastpathGuard {
    fn drop(&mut self) {
        let _ = self.detach_links();
    }
}
