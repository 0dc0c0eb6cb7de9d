//! Process limits a test or example with many connections needs, and the
//! kernel's TCP memory they use.

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

/// The kernel's TCP memory in use, in pages (`/proc/net/sockstat`, the
/// `mem` field of the `TCP:` line), or `None` if it cannot be read.
pub fn tcp_memory_pages() -> Option<u64> {
    let sockstat = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = sockstat.lines().find(|l| l.starts_with("TCP:"))?;
    let mut words = line.split_whitespace();
    words.find(|w| *w == "mem")?;
    words.next()?.parse().ok()
}

/// The TCP memory use (pages) from which the kernel is under memory
/// pressure (`net.ipv4.tcp_mem`, its second value), or `None`.
pub fn tcp_memory_pressure_pages() -> Option<u64> {
    sysctl_value("tcp_mem", 1)
}

/// The most a TCP socket's receive buffer grows to by autotuning
/// (`net.ipv4.tcp_rmem`, its third value, bytes), or `None`.
pub fn tcp_receive_buffer_max() -> Option<u64> {
    sysctl_value("tcp_rmem", 2)
}

/// Likewise for the send buffer (`net.ipv4.tcp_wmem`).
pub fn tcp_send_buffer_max() -> Option<u64> {
    sysctl_value("tcp_wmem", 2)
}

/// Value `index` of `/proc/sys/net/ipv4/NAME`.
fn sysctl_value(name: &str, index: usize) -> Option<u64> {
    let values = std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}")).ok()?;
    values.split_whitespace().nth(index)?.parse().ok()
}

/// Lowers this process's soft limit of open files so that the next file
/// it opens fails with EMFILE, for testing what a call does when it cannot
/// get a descriptor; the old limit comes back on drop (also on a panic).
/// Every thread of the process is affected while it lives.
pub struct NoMoreFiles {
    soft: u64,
    hard: u64,
}

impl NoMoreFiles {
    pub fn start() -> std::io::Result<Self> {
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
        // The lowest free descriptor: a new file would get it.
        let lowest_free = {
            let probe = std::fs::File::open("/dev/null")?;
            std::os::fd::AsRawFd::as_raw_fd(&probe) as u64
        };
        setrlimit(Resource::RLIMIT_NOFILE, lowest_free, hard)?;
        Ok(NoMoreFiles { soft, hard })
    }
}

impl Drop for NoMoreFiles {
    fn drop(&mut self) {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, self.soft, self.hard);
    }
}
