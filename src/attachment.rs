//! The program attachments a guard undoes: BPF links, and, on kernels
//! without sockmap links (before 6.10), sk_msg and sk_skb programs attached
//! to a socket map the older way.
//!
//! Both kinds detach the same way for sockets already in the map: each
//! socket keeps its own reference to the programs it was given, so
//! detaching only stops new sockets from getting them. Both also go when
//! the process exits without detaching: links close with their fds, and a
//! socket map drops its attached programs when its last user fd closes.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use libbpf_rs::{Link, Program};

use crate::error::{Error, Result};
use crate::sys;

/// Which socket-map hook a program goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SockmapHook {
    /// `BPF_SK_MSG_VERDICT`: every sendmsg() of a socket in the map.
    MsgVerdict,
    /// `BPF_SK_SKB_VERDICT`: every segment a socket in the map receives.
    SkbVerdict,
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
