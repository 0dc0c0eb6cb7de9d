//! The splice guard: an LSM program that makes splice(2)/sendfile(2) reads
//! from accelerated sockets fail with EINVAL.
//!
//! The kernel's splice path reads only a socket's TCP queue, not the queue
//! redirected bytes land in: a blocking splice waits for the peer's close
//! and returns 0 (false EOF), a non-blocking one returns EAGAIN forever.
//! EINVAL is what programs already take as "splice unsupported here, fall
//! back to read/write" (Go's internal/poll does), and the refused call
//! consumes nothing. The process is remembered and its later connections
//! stay on plain TCP, where splice works at full speed.

use std::time::Duration;

use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, ProgramMut};
use nix::unistd::{sysconf, SysconfVar};

use crate::abi::{fp_splice_exclusion, Plain};
use crate::error::{libbpf_to_io, Result};
use crate::kernel_support::splice_guard_unsupported;

/// Whether to install the splice guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SpliceGuard {
    /// Refuse splice reads of accelerated sockets with EINVAL and keep the
    /// caught process on plain TCP. Needs the BPF LSM.
    #[default]
    On,
    /// No guard. **Unsafe for programs that splice from TCP sockets** (Go
    /// 1.22 and later `io.Copy` between TCP connections, many C proxies):
    /// they see truncated streams or hang. Only for kernels without the BPF LSM,
    /// with workloads known not to splice.
    Off,
}

impl SpliceGuard {
    /// How many caught processes the guard remembers (an LRU map): past
    /// that it forgets the one least recently caught or checked, whose later
    /// connections may then be accelerated and caught again.
    pub const MAX_EXCLUDED_PROCESSES: usize = crate::abi::FP_MAX_SPLICE_EXCLUDED;

    pub(crate) fn enabled(self) -> bool {
        self == SpliceGuard::On
    }
}

/// Attaches `fp_splice_guard` to the `file_permission` LSM hook.
pub(crate) fn attach(prog: &ProgramMut<'_>) -> Result<Link> {
    prog.attach_lsm()
        .map_err(|err| splice_guard_unsupported(libbpf_to_io(&err)))
}

/// Process ids caught splicing from an accelerated socket that are still
/// running. An entry whose pid now belongs to a later process (the start
/// time differs) is left out: that process is not excluded.
pub(crate) fn excluded_processes<M: MapCore>(map: &M) -> Vec<u32> {
    let Some(tick) = nanos_per_clock_tick() else {
        return Vec::new();
    };
    let mut pids: Vec<u32> = map
        .keys()
        .filter_map(|key| {
            let pid = u32::from_ne_bytes(key.get(..4)?.try_into().ok()?);
            let value = map.lookup(&key, MapFlags::ANY).ok()??;
            let caught = fp_splice_exclusion::from_bytes(&value)?;
            (process_start_ticks(pid)? == caught.owner_started / tick).then_some(pid)
        })
        .collect();
    pids.sort_unstable();
    pids
}

/// A running process's start time in clock ticks since boot (field 22 of
/// `/proc/PID/stat`, the kernel's `start_boottime` in `USER_HZ` units).
fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces: count after its ')'.
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

/// How many nanoseconds one `/proc` clock tick is (10 ms at `USER_HZ` 100).
fn nanos_per_clock_tick() -> Option<u64> {
    let ticks = sysconf(SysconfVar::CLK_TCK).ok()??;
    1_000_000_000u64.checked_div(u64::try_from(ticks).ok()?)
}

/// Keeps the guard attached until no accelerated socket is left: a socket
/// that was accelerated may still hold redirected bytes after detach, and
/// splicing it would then misread. A background thread polls the map and
/// drops the link when it is empty (or when this process exits).
pub(crate) fn linger(link: Link, sock_map: MapHandle) {
    if sock_map.keys().next().is_none() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("fastpath-splice".into())
        .spawn(move || {
            while sock_map.keys().next().is_some() {
                std::thread::sleep(Duration::from_millis(100));
            }
            drop(link);
        });
    // Without a thread the link is dropped here: the guard ends now.
    drop(spawned);
}
