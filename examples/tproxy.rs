//! A transparent proxy that embeds the accelerator: the reference
//! integration. Connections diverted to it by TPROXY (see
//! `examples/tproxy/setup.sh`) arrive with their original destination as
//! the accepted socket's local address; it connects there (with SO_MARK 2,
//! so its own connection is not diverted again) and moves the bytes:
//!
//! - `--mode copy`: user-space copy loops (no accelerator);
//! - `--mode ingress`: user-space copy, with the application-to-proxy hop
//!   accelerated by an ingress-mode accelerator on `--cgroup` (the
//!   application and the proxy must both run in it);
//! - `--mode egress`: the kernel forwards each pair (egress mode);
//! - `--mode both`: both at once (both mode, needs `--cgroup`): the kernel
//!   forwards each pair, the application's later bytes leave straight
//!   through the upstream socket, and the upstream's bytes go straight into
//!   the application's receive queue.
//!
//! It stops after `--seconds N` or on SIGINT/SIGTERM and prints its
//! counters.
//!
//! ```text
//! tproxy [--listen 127.0.0.1:15001] [--mode copy|ingress|egress|both] [--cgroup DIR] [--seconds N]
//! ```

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use socket2::{Domain, Socket, Type};
use sockmap_fastpath::{Accelerator, Cgroup, FastpathGuard, RedirectMode};
use support::relay::copy_until_eof;
use support::{attach, report};

/// The mark the setup script's iptables rules exempt from diversion.
const UPSTREAM_MARK: u32 = 2;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Copy,
    Ingress,
    Egress,
    Both,
}

/// What the proxy moved in user space.
#[derive(Default)]
struct Copied {
    /// By its own copy loops (copy and ingress modes).
    by_loops: AtomicU64,
    /// By `Forwarding::wait` at the hand-over (both mode).
    at_hand_over: AtomicU64,
}

fn main() {
    if let Err(err) = run() {
        report::print_error("tproxy", err.as_ref());
        std::process::exit(2);
    }
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let opt = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let listen: SocketAddr = opt("--listen")
        .unwrap_or_else(|| "127.0.0.1:15001".into())
        .parse()?;
    let mode = match opt("--mode").as_deref().unwrap_or("copy") {
        "copy" => Mode::Copy,
        "ingress" => Mode::Ingress,
        "egress" => Mode::Egress,
        "both" => Mode::Both,
        other => {
            return Err(format!("unknown --mode {other}: copy, ingress, egress or both").into())
        }
    };
    let seconds: Option<f64> = opt("--seconds").map(|s| s.parse()).transpose()?;

    // Block SIGINT/SIGTERM before starting threads; a waiter thread ends us.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;

    let guard: Option<Arc<FastpathGuard>> = match mode {
        Mode::Copy => None,
        Mode::Egress => Some(Arc::new(
            Accelerator::builder()
                .redirect(RedirectMode::Egress)
                .attach()?,
        )),
        Mode::Ingress | Mode::Both => {
            let cgroup = opt("--cgroup").ok_or(
                "--mode ingress and --mode both need --cgroup DIR (where the application and this proxy run)",
            )?;
            let redirect = match mode {
                Mode::Both => RedirectMode::Both,
                _ => RedirectMode::Ingress,
            };
            // This proxy copies with read/write, never splice: the guard is
            // not needed for its own sockets.
            let builder = Accelerator::builder()
                .cgroup(Cgroup::path(cgroup)?)
                .redirect(redirect);
            Some(Arc::new(attach::attach_or_without_splice_guard(
                builder, "tproxy",
            )?))
        }
    };

    let socket = Socket::new(Domain::for_address(listen), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.set_ip_transparent_v4(true)?; // accept diverted connections (CAP_NET_ADMIN)
    socket.bind(&listen.into())?;
    socket.listen(1024)?;
    let listener: TcpListener = socket.into();
    eprintln!("tproxy: listening on {listen}");

    let copied = Arc::new(Copied::default());
    {
        let (guard, copied) = (guard.clone(), copied.clone());
        std::thread::spawn(move || {
            for down in listener.incoming().flatten() {
                let (guard, copied) = (guard.clone(), copied.clone());
                std::thread::spawn(move || {
                    if let Err(err) = serve(down, mode, guard.as_deref(), &copied) {
                        report::print_error("tproxy: connection", &err);
                    }
                });
            }
        });
    }
    match seconds {
        Some(s) => std::thread::sleep(Duration::from_secs_f64(s)),
        None => {
            signals.wait()?;
        }
    }
    println!(
        "tproxy: bytes copied in user space: {}",
        copied.by_loops.load(Ordering::Relaxed)
    );
    println!(
        "tproxy: bytes copied at hand-over: {}",
        copied.at_hand_over.load(Ordering::Relaxed)
    );
    if let Some(guard) = &guard {
        print!("tproxy: counters\n{}", guard.stats()?);
    }
    Ok(())
}

fn serve(
    down: TcpStream,
    mode: Mode,
    guard: Option<&FastpathGuard>,
    copied: &Copied,
) -> std::io::Result<()> {
    let original_destination = down.local_addr()?;
    let socket = Socket::new(
        Domain::for_address(original_destination),
        Type::STREAM,
        None,
    )?;
    socket.set_mark(UPSTREAM_MARK)?;
    socket.connect(&original_destination.into())?;
    let up: TcpStream = socket.into();
    if matches!(mode, Mode::Egress | Mode::Both) {
        let forwarding = guard
            .expect("egress and both modes have a guard")
            .forward(&down, &up)
            .map_err(std::io::Error::other)?;
        let stats = forwarding.wait().map_err(std::io::Error::other)?;
        copied
            .at_hand_over
            .fetch_add(stats.copied_at_hand_over, Ordering::Relaxed);
        return Ok(());
    }
    let (down2, up2) = (down.try_clone()?, up.try_clone()?);
    let back = std::thread::spawn(move || copy_until_eof(up2, down2));
    let sent = copy_until_eof(down, up);
    copied
        .by_loops
        .fetch_add(sent + back.join().unwrap_or(0), Ordering::Relaxed);
    Ok(())
}
