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

/// Lets a child process receive SIGINT and SIGTERM again: a blocked mask is
/// inherited across fork and exec, so without this a server started by us
/// could not be stopped with `kill`.
pub fn unblock_in_child(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls
    // sigprocmask (through thread_unblock), which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            let mut signals = SigSet::empty();
            signals.add(Signal::SIGINT);
            signals.add(Signal::SIGTERM);
            signals.thread_unblock().map_err(std::io::Error::from)
        });
    }
}
