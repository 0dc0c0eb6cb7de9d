//! libbpf's own messages (verifier logs, load and attach failures) go to
//! the [`log`] facade under the target `"libbpf"`, never straight to the
//! program's stderr. A program sees them by installing a logger (e.g.
//! `env_logger` with `RUST_LOG=libbpf=debug`).
//!
//! Failures the library provokes on purpose (`probe()`, and the reloads
//! that tell a missing kernel feature from a bug) are logged at debug
//! level only: they are findings, not problems.

use std::cell::{Cell, RefCell};
use std::sync::Once;

use libbpf_rs::PrintLevel;

thread_local! {
    /// Nesting depth of [`expecting_failures`] on this thread.
    static PROBING: Cell<u32> = const { Cell::new(0) };
    /// libbpf's messages on this thread while [`capturing`] runs.
    static CAPTURED: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Routes libbpf's output to `log` (once per process). A libbpf print
/// callback the program installs itself later replaces this one.
pub(crate) fn route_libbpf_output() {
    static ROUTED: Once = Once::new();
    ROUTED.call_once(|| {
        libbpf_rs::set_print(Some((PrintLevel::Debug, to_log)));
    });
}

/// Runs `attempt`, logging what libbpf says meanwhile (on this thread) at
/// debug level: the caller expects it may fail and reports the outcome.
pub(crate) fn expecting_failures<T>(attempt: impl FnOnce() -> T) -> T {
    PROBING.with(|depth| depth.set(depth.get() + 1));
    let result = attempt();
    PROBING.with(|depth| depth.set(depth.get() - 1));
    result
}

/// Runs `attempt` and returns, with its result, what libbpf said meanwhile
/// on this thread (still logged as usual), so an error can carry it.
pub(crate) fn capturing<T>(attempt: impl FnOnce() -> T) -> (T, Vec<String>) {
    route_libbpf_output();
    let outer = CAPTURED.with(|c| c.replace(Some(Vec::new())));
    let result = attempt();
    let said = CAPTURED.with(|c| c.replace(outer)).unwrap_or_default();
    (result, said)
}

fn to_log(level: PrintLevel, message: String) {
    let message = message.trim_end();
    CAPTURED.with(|c| {
        if let Some(said) = c.borrow_mut().as_mut() {
            said.push(message.to_owned());
        }
    });
    if PROBING.with(Cell::get) > 0 {
        log::debug!(target: "libbpf", "{message} (while probing; expected)");
        return;
    }
    match level {
        PrintLevel::Warn => log::warn!(target: "libbpf", "{message}"),
        PrintLevel::Info => log::info!(target: "libbpf", "{message}"),
        PrintLevel::Debug => log::debug!(target: "libbpf", "{message}"),
    }
}
