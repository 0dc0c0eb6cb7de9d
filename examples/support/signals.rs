//! Ctrl-C / SIGTERM cleanup for the examples and benchmarks: the kernel
//! detaches the programs when the process dies, but a cgroup directory
//! would stay behind.

use std::path::PathBuf;

use nix::sys::signal::{SigSet, Signal};
use sockmap_fastpath::Cgroup;

/// From now on SIGINT and SIGTERM move this process back to `parent`,
/// remove the cgroup directory `child` and exit with 130. Call it before
/// starting other threads (they inherit the blocked signal mask).
pub fn remove_cgroup_on_signal(parent: Cgroup, child: PathBuf) {
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().expect("block SIGINT/SIGTERM");
    std::thread::spawn(move || {
        if let Ok(signal) = signals.wait() {
            eprintln!("{signal}: removing {}", child.display());
            let _ = parent.add_process(std::process::id());
            let _ = std::fs::remove_dir(&child);
            std::process::exit(130);
        }
    });
}
