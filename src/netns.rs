//! Network namespaces that share one address space.
//!
//! Socket keys include the network namespace (its cookie), so sockets in
//! different namespaces never pair: identical 4-tuples in two namespaces
//! are different connections. Containers joined by veth or a bridge are one
//! IP network, though: when their addresses do not overlap and no NAT sits
//! between them, a 4-tuple names one connection across all of them. A
//! namespace group (`AcceleratorBuilder::namespace_group`) says so, and the
//! programs then key the group's sockets by a shared id instead of each
//! namespace's cookie, so a client in one namespace pairs with its server in
//! another.
//!
//! A group is a promise the library cannot check: if two namespaces in one
//! group use the same address for different hosts, their connections could
//! meet. Connections crossing NAT (e.g. published container ports) have
//! different 4-tuples at each end and simply stay plain.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::sys;

// Most namespaces in all groups together (the `netns_spaces` map's size).
use crate::abi::FP_MAX_GROUPED_NAMESPACES as MAX_GROUPED_NAMESPACES;

/// The namespaces of each group, as given to the builder.
pub(crate) type Groups = Vec<Vec<PathBuf>>;

/// Resolves every group member to its netns cookie and returns
/// `(cookie, space id)` pairs; a group's id is its first member's cookie.
///
/// Needs CAP_SYS_ADMIN (setns into each namespace).
pub(crate) fn spaces(groups: &Groups) -> Result<Vec<(u64, u64)>> {
    let total: usize = groups.iter().map(Vec::len).sum();
    if total > MAX_GROUPED_NAMESPACES {
        return Err(Error::PolicyTooLarge {
            what: "namespaces in namespace groups",
            given: total,
            max: MAX_GROUPED_NAMESPACES,
        });
    }
    let mut pairs: Vec<(u64, u64)> = Vec::with_capacity(total);
    for group in groups {
        if group.len() < 2 {
            return Err(Error::NamespaceGroup {
                path: group.first().cloned().unwrap_or_default(),
                reason: "a namespace group needs at least two namespaces".into(),
            });
        }
        let mut space = None;
        for path in group {
            let cookie = cookie_of(path)?;
            if pairs.iter().any(|&(c, _)| c == cookie) {
                return Err(Error::NamespaceGroup {
                    path: path.clone(),
                    reason: "this namespace is already in a group (each may be in one)".into(),
                });
            }
            pairs.push((cookie, *space.get_or_insert(cookie)));
        }
    }
    Ok(pairs)
}

/// The cookie of the network namespace at `path` (e.g. `/run/netns/NAME`
/// or `/proc/PID/ns/net`): a short-lived thread enters it and asks a socket.
fn cookie_of(path: &Path) -> Result<u64> {
    let file = File::open(path).map_err(|err| Error::io("open", path, err))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET).map_err(
                    |errno| Error::NamespaceGroup {
                        path: path.to_owned(),
                        reason: format!(
                            "setns(CLONE_NEWNET) failed ({errno}): not a network namespace \
                             file, or CAP_SYS_ADMIN is missing"
                        ),
                    },
                )?;
                let socket =
                    socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None)
                        .map_err(|err| Error::io("socket", path, err))?;
                sys::netns_cookie(socket.as_fd())
                    .map_err(|err| Error::io("getsockopt(SO_NETNS_COOKIE) in", path, err))
            })
            .join()
            .unwrap_or_else(|_| {
                Err(Error::NamespaceGroup {
                    path: path.to_owned(),
                    reason: "the thread entering it panicked".into(),
                })
            })
    })
}
