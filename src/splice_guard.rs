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
//!
//! A splice(2) or sendfile(2) call is recognised by its syscall number, on
//! x86_64 and arm64, including 32-bit programs (IA32 emulation, AArch32),
//! which number them differently; an io_uring `IORING_OP_SPLICE` has none
//! (an io_uring worker runs it), so there the guard looks for a splice read
//! function on the kernel stack, whose addresses it takes from
//! `/proc/kallsyms` at load.

use std::io::BufRead;
use std::time::Duration;

use libbpf_rs::{Link, MapCore, MapFlags, MapHandle, ProgramMut};
use nix::unistd::{sysconf, SysconfVar};

use crate::abi::{fp_sock_key, fp_splice_exclusion, Plain};
use crate::error::{libbpf_to_io, Result};
use crate::kernel_support::splice_guard_unsupported;

/// Whether to install the splice guard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum SpliceGuard {
    /// Refuse splice reads of accelerated sockets (splice(2), sendfile(2),
    /// io_uring's `IORING_OP_SPLICE`) with EINVAL and keep the caught
    /// process on plain TCP. Needs the BPF LSM (Debian's arm64 6.1 refuses
    /// to attach LSM programs; its 6.12 takes them); recognising io_uring
    /// splices needs kernel addresses in `/proc/kallsyms` (root, and
    /// `kernel.kptr_restrict` below 2).
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

/// Kernel functions a splice read calls the `file_permission` hook from, or
/// passes through on its way there, across the kernels supported: from 6.7
/// `do_splice` calls it itself (splice(2) and io_uring's splice both come
/// through it); before, `vfs_splice_read` (6.5, 6.6) or `do_splice_to`
/// below `splice_file_to_pipe` did. sendfile(2)'s path is listed too,
/// although its syscall number already gives it away.
const SPLICE_READ_FUNCTIONS: [&str; 7] = [
    "do_splice",
    "splice_file_to_pipe",
    "vfs_splice_read",
    "do_splice_read",
    "do_splice_to",
    "splice_direct_to_actor",
    "do_splice_direct",
];

/// Fills `text` (`fp_splice_guard`'s `splice_read_text`: start and end
/// address pairs) with the running kernel's [`SPLICE_READ_FUNCTIONS`]. Where
/// `/proc/kallsyms` hides addresses (`kernel.kptr_restrict`, lockdown) it
/// stays zero and io_uring splices go unrecognised: logged as a warning.
pub(crate) fn write_splice_read_text(text: &mut [u64]) {
    let ranges = splice_read_functions();
    if ranges.is_empty() {
        log::warn!(
            "splice guard: /proc/kallsyms shows no kernel addresses, so io_uring splice \
             reads of accelerated sockets are not recognised (splice(2) and sendfile(2) are)"
        );
    }
    for (slot, (start, end)) in text.chunks_exact_mut(2).zip(ranges) {
        slot.copy_from_slice(&[start, end]);
    }
}

/// The running kernel's [`SPLICE_READ_FUNCTIONS`] as `[start, end)`
/// addresses; empty where `/proc/kallsyms` hides them.
pub(crate) fn splice_read_functions() -> Vec<(u64, u64)> {
    std::fs::File::open("/proc/kallsyms")
        .map(|file| text_ranges(std::io::BufReader::new(file), &SPLICE_READ_FUNCTIONS))
        .unwrap_or_default()
}

/// The `[start, end)` addresses of the text symbols named `wanted`, from a
/// listing in `/proc/kallsyms` format, sorted by address: a function ends
/// where the next higher symbol starts. Zero addresses (hidden) give none.
fn text_ranges(listing: impl BufRead, wanted: &[&str]) -> Vec<(u64, u64)> {
    let mut ranges = Vec::new();
    let mut open: Option<u64> = None;
    for line in listing.lines().map_while(std::result::Result::ok) {
        let mut fields = line.split_whitespace();
        let (Some(address), Some(kind), Some(name)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        // A module's symbol (a fourth field, "[module]"): not the core text.
        let in_module = fields.next().is_some();
        let Ok(address) = u64::from_str_radix(address, 16) else {
            continue;
        };
        if let Some(start) = open.filter(|&start| address > start) {
            ranges.push((start, address));
            open = None;
        }
        let is_text = kind.eq_ignore_ascii_case("t");
        if open.is_none() && address != 0 && is_text && !in_module && wanted.contains(&name) {
            open = Some(address);
        }
    }
    ranges
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

/// Local addresses of the services whose accepted sockets were caught
/// being spliced, sorted (the namespace they are in is not shown).
pub(crate) fn excluded_services<M: MapCore>(map: &M) -> Vec<std::net::SocketAddr> {
    let mut services: Vec<_> = map
        .keys()
        .filter_map(|key| Some(fp_sock_key::from_bytes(&key)?.local_addr()))
        .collect();
    services.sort_unstable();
    services.dedup();
    services
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_function_ends_where_the_next_symbol_starts() {
        let listing = "\
ffffffff81000000 T _stext
ffffffff8172c150 t do_splice_read
ffffffff8172c150 t do_splice_read.alias
ffffffff8172c220 T vfs_splice_read
ffffffff8172c2a0 T splice_direct_to_actor
ffffffff8172c400 d some_data
ffffffff8172e430 T other
0000000000000000 T splice_file_to_pipe
ffffffffc0000000 t vfs_splice_read\t[some_module]
ffffffffc0000100 t module_end\t[some_module]
";
        assert_eq!(
            text_ranges(listing.as_bytes(), &SPLICE_READ_FUNCTIONS),
            vec![
                (0xffffffff8172c150, 0xffffffff8172c220),
                (0xffffffff8172c220, 0xffffffff8172c2a0),
                (0xffffffff8172c2a0, 0xffffffff8172c400),
            ]
        );
    }

    #[test]
    fn hidden_addresses_give_no_ranges() {
        let listing = "0000000000000000 T vfs_splice_read\n0000000000000000 T other\n";
        assert!(text_ranges(listing.as_bytes(), &SPLICE_READ_FUNCTIONS).is_empty());
    }

    #[test]
    fn every_function_has_a_slot_in_the_program() {
        use crate::skel::types::rodata;
        fn pairs<const N: usize>(_: fn(&rodata) -> &[u64; N]) -> usize {
            N / 2
        }
        assert!(SPLICE_READ_FUNCTIONS.len() <= pairs(|r| &r.splice_read_text));
    }
}
