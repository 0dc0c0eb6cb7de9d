//! Network namespaces and veth pairs for the tests and benchmarks (made
//! with iproute2; a namespace and its devices go when it is dropped).

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread;

static DEVICES: AtomicU32 = AtomicU32::new(0);

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates namespace `name` with its loopback up.
    pub fn new(name: String) -> Self {
        ip(&["netns", "add", &name]);
        let ns = NetNs { name };
        ip(&["-n", &ns.name, "link", "set", "lo", "up"]);
        ns
    }

    /// Its namespace file, `/run/netns/NAME`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/run/netns/{}", self.name))
    }

    /// Joins this namespace to `other` with a veth pair, each end up and
    /// with its address if given (CIDR notation, e.g. "10.200.0.1/24").
    /// Returns the device names (here, there).
    pub fn veth_to(
        &self,
        other: &NetNs,
        here: Option<&str>,
        there: Option<&str>,
    ) -> (String, String) {
        let id = format!(
            "{}x{}",
            std::process::id() % 100_000,
            DEVICES.fetch_add(1, Ordering::Relaxed)
        );
        let (a, b) = (format!("fpa{id}"), format!("fpb{id}"));
        ip(&[
            "link",
            "add",
            &a,
            "netns",
            &self.name,
            "type",
            "veth",
            "peer",
            "name",
            &b,
            "netns",
            &other.name,
        ]);
        for (ns, dev, addr) in [(self, &a, here), (other, &b, there)] {
            if let Some(addr) = addr {
                ns.add_addr(dev, addr);
            }
            ip(&["-n", &ns.name, "link", "set", dev, "up"]);
        }
        (a, b)
    }

    /// Adds `addr` (CIDR notation) to device `dev` in this namespace. IPv6
    /// addresses skip duplicate address detection, so they work at once.
    pub fn add_addr(&self, dev: &str, addr: &str) {
        let mut args = vec!["-n", &self.name, "addr", "add", addr, "dev", dev];
        if addr.contains(':') {
            args.push("nodad");
        }
        ip(&args);
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it
    /// creates live there.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        run_in(self.path(), f)
    }
}

/// Runs `f` on a thread that has entered the network namespace at `path`.
pub fn run_in<T: Send + 'static>(path: PathBuf, f: impl FnOnce() -> T + Send + 'static) -> T {
    thread::spawn(move || {
        let file = std::fs::File::open(&path).expect("open netns");
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
    .join()
    .expect("netns thread")
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `ip ARGS`, panicking if it fails.
pub fn ip(args: &[&str]) {
    let status = Command::new("ip")
        .args(args)
        .status()
        .unwrap_or_else(|e| panic!("ip: {e}"));
    assert!(status.success(), "ip {args:?} failed: {status}");
}
