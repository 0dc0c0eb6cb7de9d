//! The program attachments a guard undoes ([`Links`], by role): BPF links,
//! and, on kernels without sockmap links (before 6.10), sk_msg and sk_skb
//! programs attached to a socket map the older way.
//!
//! Both kinds detach the same way for sockets already in the map: each
//! socket keeps its own reference to the programs it was given, so
//! detaching only stops new sockets from getting them. Both also go when
//! the process exits without detaching: links close with their fds, and a
//! socket map drops its attached programs when its last user fd closes.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;

use std::fs::File;
use std::os::fd::AsRawFd;

use libbpf_rs::{Link, MapHandle, Program};

use crate::cgroup::Cgroup;
use crate::error::{libbpf_to_io, Error, Result};
use crate::kernel_support::{classify_attach_error, AttachStep};
use crate::mode::RedirectMode;
use crate::programs::Programs;
use crate::splice_guard::{self, SpliceGuard};
use crate::sys::{self, SockmapHook};

/// Everything `attach()` attached, by role. Field order is drop order, and
/// [`detach`](Self::detach) keeps it: the cgroup's sock_ops program first,
/// so nothing new is selected while the rest goes, then the verdict
/// programs; the splice guard last, lingering while accelerated sockets
/// remain.
#[derive(Default)]
pub(crate) struct Links {
    /// fp_sock_ops on the cgroup (ingress and both modes).
    sock_ops: Option<Attachment>,
    /// fp_sk_msg or fp_sk_msg_both on sock_map (ingress and both modes).
    msg_verdict: Option<Attachment>,
    /// fp_fwd_verdict on fwd_map (egress and both modes).
    fwd_verdict: Option<Attachment>,
    /// Both mode: fp_backlog_query on the cgroup, held as its link's fd,
    /// which each forwarder of the guard shares: the link stays attached
    /// until the last of them is gone, since pairs stay forwarded after
    /// the guard detaches and their pumps keep asking.
    backlog_query: Option<Arc<OwnedFd>>,
    /// fp_splice_guard on the file_permission LSM hook.
    splice_guard: Option<Link>,
}

impl Links {
    /// Attaches what `mode` needs, the splice guard first and the cgroup's
    /// sock_ops program last, so nothing is selected before the whole path
    /// is in place. `cgroup` is `None` in egress mode only. On error, what
    /// was attached is detached again (dropped).
    ///
    /// # Errors
    /// [`Error::KernelFeature`] for an attach type the kernel does not know
    /// (or the splice guard refused), else [`Error::Bpf`] naming the call;
    /// [`Error::Io`] if the cgroup directory cannot be opened.
    pub fn attach(
        programs: &Programs,
        mode: RedirectMode,
        cgroup: Option<&Cgroup>,
        guard: SpliceGuard,
    ) -> Result<Self> {
        let skel = programs.skel();
        let mut links = Links::default();
        if guard.enabled() {
            links.splice_guard = Some(splice_guard::attach(&skel.progs.fp_splice_guard)?);
        }
        if mode != RedirectMode::Ingress {
            links.fwd_verdict = Some(Attachment::to_sockmap_classified(
                &skel.progs.fp_fwd_verdict,
                skel.maps.fwd_map.as_fd(),
                SockmapHook::SkbVerdict,
                "detaching fp_fwd_verdict from fwd_map",
            )?);
        }
        let Some(cgroup) = cgroup else {
            return Ok(links);
        };
        let (msg_prog, msg_call) = match mode {
            RedirectMode::Both => (
                &skel.progs.fp_sk_msg_both,
                "detaching fp_sk_msg_both from sock_map",
            ),
            _ => (&skel.progs.fp_sk_msg, "detaching fp_sk_msg from sock_map"),
        };
        links.msg_verdict = Some(Attachment::to_sockmap_classified(
            msg_prog,
            skel.maps.sock_map.as_fd(),
            SockmapHook::MsgVerdict,
            msg_call,
        )?);
        let cgroup_dir =
            File::open(cgroup.as_path()).map_err(|err| Error::io("open", cgroup.as_path(), err))?;
        if mode == RedirectMode::Both {
            let query = skel
                .progs
                .fp_backlog_query
                .attach_cgroup(cgroup_dir.as_raw_fd())
                .map_err(|err| classify_attach_error(AttachStep::CgroupLink, libbpf_to_io(&err)))?;
            // Closing every fd of a cgroup link detaches it; dropping the
            // libbpf link closes only its own.
            let fd = query
                .as_fd()
                .try_clone_to_owned()
                .map_err(|err| Error::io("dup", "the fp_backlog_query link", err))?;
            links.backlog_query = Some(Arc::new(fd));
        }
        let ops_link = skel
            .progs
            .fp_sock_ops
            .attach_cgroup(cgroup_dir.as_raw_fd())
            .map_err(|err| classify_attach_error(AttachStep::CgroupLink, libbpf_to_io(&err)))?;
        links.sock_ops = Some(Attachment::link(
            ops_link,
            "bpf(BPF_LINK_DETACH) of fp_sock_ops from the cgroup",
        ));
        Ok(links)
    }

    /// Whether anything is still attached.
    pub fn is_attached(&self) -> bool {
        self.sock_ops.is_some()
            || self.msg_verdict.is_some()
            || self.fwd_verdict.is_some()
            || self.backlog_query.is_some()
            || self.splice_guard.is_some()
    }

    /// Both mode: a share of the fp_backlog_query link, which keeps it
    /// attached (see the field).
    pub fn backlog_query(&self) -> Option<Arc<OwnedFd>> {
        self.backlog_query.clone()
    }

    /// Whether the programs on socket maps are attached with BPF links
    /// (Linux 6.10), rather than the older way.
    pub fn use_sockmap_links(&self) -> bool {
        [&self.msg_verdict, &self.fwd_verdict]
            .into_iter()
            .flatten()
            .all(|a| a.kind() != Some(SockmapAttachKind::MapProgram))
    }

    /// Detaches everything, in field order; the splice guard lingers until
    /// `programs`' socket map is empty (see [`splice_guard::linger`]).
    ///
    /// # Errors
    /// The first failure; the other attachments are detached regardless.
    pub fn detach(&mut self, programs: &Programs) -> Result<()> {
        let mut first_error = None;
        let attachments = [
            self.sock_ops.take(),
            self.msg_verdict.take(),
            self.fwd_verdict.take(),
        ];
        for mut attachment in attachments.into_iter().flatten() {
            if let Err(err) = attachment.detach() {
                first_error.get_or_insert(err);
            }
        }
        self.backlog_query = None;
        if let Some(link) = self.splice_guard.take() {
            match MapHandle::try_from(&programs.skel().maps.sock_map) {
                Ok(sock_map) => splice_guard::linger(link, sock_map),
                Err(err) => {
                    first_error.get_or_insert(Error::bpf("dup of the sock_map fd", err));
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// How a program was attached to a socket map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SockmapAttachKind {
    /// A BPF link (`BPF_LINK_TYPE_SOCKMAP`, Linux 6.10).
    Link,
    /// `BPF_PROG_ATTACH` to the map (every kernel with sockmap).
    MapProgram,
}

/// One attachment; [`detach`](Self::detach) undoes it, and so does Drop
/// (ignoring errors).
pub(crate) struct Attachment {
    state: Option<Attached>,
    /// The call that undoes it, for error messages.
    detach_call: &'static str,
}

enum Attached {
    Link(Link),
    MapProgram {
        prog: OwnedFd,
        map: OwnedFd,
        hook: SockmapHook,
    },
}

impl Attachment {
    pub fn link(link: Link, detach_call: &'static str) -> Self {
        Attachment {
            state: Some(Attached::Link(link)),
            detach_call,
        }
    }

    /// Attaches `prog` to the socket map `map` at `hook`: with a BPF link
    /// where the kernel has them, else the older way.
    ///
    /// # Errors
    /// The link's error when the kernel refused both ways.
    pub fn to_sockmap(
        prog: &Program<'_>,
        map: BorrowedFd<'_>,
        hook: SockmapHook,
        detach_call: &'static str,
    ) -> std::result::Result<Self, std::io::Error> {
        let link_error = match sys::attach_sockmap_link(prog, map) {
            Ok(link) => return Ok(Self::link(link, detach_call)),
            Err(err) => err,
        };
        if !sys::is_unsupported(&link_error) {
            return Err(link_error);
        }
        // Own copies of both fds: the detach needs them after the skeleton
        // may be gone.
        let prog = prog.as_fd().try_clone_to_owned()?;
        let map = map.try_clone_to_owned()?;
        sys::sockmap_prog_attach(prog.as_fd(), map.as_fd(), hook).map_err(|_| link_error)?;
        Ok(Attachment {
            state: Some(Attached::MapProgram { prog, map, hook }),
            detach_call,
        })
    }

    /// [`to_sockmap`](Self::to_sockmap), its error classified.
    fn to_sockmap_classified(
        prog: &Program<'_>,
        map: BorrowedFd<'_>,
        hook: SockmapHook,
        detach_call: &'static str,
    ) -> Result<Self> {
        Self::to_sockmap(prog, map, hook, detach_call)
            .map_err(|source| classify_attach_error(AttachStep::SockmapLink, source))
    }

    pub fn kind(&self) -> Option<SockmapAttachKind> {
        match self.state.as_ref()? {
            Attached::Link(_) => Some(SockmapAttachKind::Link),
            Attached::MapProgram { .. } => Some(SockmapAttachKind::MapProgram),
        }
    }

    /// Undoes the attachment (once; later calls do nothing).
    ///
    /// # Errors
    /// [`Error::Bpf`] naming the detach call.
    pub fn detach(&mut self) -> Result<()> {
        let result = match self.state.take() {
            None => return Ok(()),
            Some(Attached::Link(link)) => link
                .detach()
                .map_err(|err| Error::bpf(self.detach_call, err)),
            Some(Attached::MapProgram { prog, map, hook }) => {
                sys::sockmap_prog_detach(prog.as_fd(), map.as_fd(), hook).map_err(|source| {
                    Error::Bpf {
                        call: self.detach_call,
                        source,
                    }
                })
            }
        };
        result
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}
