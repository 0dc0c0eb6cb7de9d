//! Process limits a test or example with many connections needs.

use nix::sys::resource::{getrlimit, setrlimit, Resource};

/// Raises this process's limit of open files to `wanted`, capped by the
/// kernel's `fs.nr_open`, never lowering it; returns the new soft limit.
/// Raising the hard limit needs CAP_SYS_RESOURCE: without it the soft limit
/// goes up to the hard one. Guests and containers often start at 1024 or
/// 4096, which 1000 proxied connections (four sockets each) exceed.
pub fn raise_open_files(wanted: u64) -> std::io::Result<u64> {
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or(hard);
    let wanted = wanted.min(nr_open.max(hard));
    if wanted <= soft {
        return Ok(soft);
    }
    if wanted > hard && setrlimit(Resource::RLIMIT_NOFILE, wanted, wanted).is_ok() {
        return Ok(wanted);
    }
    let new = wanted.min(hard);
    setrlimit(Resource::RLIMIT_NOFILE, new, hard)?;
    Ok(new)
}
