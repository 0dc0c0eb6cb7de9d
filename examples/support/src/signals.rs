//! Ctrl-C / SIGTERM cleanup for the examples and benchmarks: the kernel
//! detaches the programs when the process dies, but a cgroup directory
//! would stay behind.

use std::path::PathBuf;

use nix::sys::signal::{SigSet, Signal};
use sockmap_fastpath::Cgroup;

/// Cgroup directories the signal thread removes, innermost last.
static TO_REMOVE: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// From now on SIGINT and SIGTERM move this process back to `parent`,
/// remove the cgroup directory `child` (and any added with
/// [`also_remove_on_signal`]) and exit with 130. Call it before starting
/// other threads (they inherit the blocked signal mask).
pub fn remove_cgroup_on_signal(parent: Cgroup, child: PathBuf) {
    also_remove_on_signal(child);
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block().expect("block SIGINT/SIGTERM");
    std::thread::spawn(move || {
        if let Ok(signal) = signals.wait() {
            let _ = parent.add_process(std::process::id());
            let dirs = std::mem::take(&mut *TO_REMOVE.lock().unwrap_or_else(|e| e.into_inner()));
            for dir in dirs.iter().rev() {
                eprintln!("{signal}: removing {}", dir.display());
                let _ = std::fs::remove_dir(dir);
            }
            std::process::exit(130);
        }
    });
}

/// One more cgroup directory (a sibling made later, under the same
/// parent) for the signal thread of [`remove_cgroup_on_signal`] to remove.
pub fn also_remove_on_signal(child: PathBuf) {
    TO_REMOVE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(child);
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
