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
//! - `--mode egress`: the kernel forwards each pair (egress mode), handed
//!   to one `Forwarder`: one thread serves every pair;
//! - `--mode adaptive`: egress mode on the adaptive path: the forwarder
//!   relays each pair itself (bulk stays there) and hands request/response
//!   pairs to the kernel;
//! - `--mode both`: both at once (both mode, needs `--cgroup`): the kernel
//!   forwards each pair, the application's later bytes leave straight
//!   through the upstream socket, and the upstream's bytes go straight into
//!   the application's receive queue.
//!
//! In copy and ingress modes each connection gets two copying threads; in
//! egress, adaptive and both modes the accepting thread connects upstream and hands
//! the pair over, and no thread per connection exists.
//!
//! It stops after `--seconds N` or on SIGINT/SIGTERM and prints its
//! counters.
//!
//! ```text
//! tproxy [--listen 127.0.0.1:15001] [--mode copy|ingress|egress|adaptive|both] [--cgroup DIR] [--seconds N]
//! ```

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use nix::sys::signal::{SigSet, Signal};
use socket2::{Domain, Socket, Type};
use sockmap_fastpath::{
    Accelerator, Cgroup, FastpathGuard, ForwardPath, ForwardedPair, Forwarder, RedirectMode,
};
use support::relay::copy_until_eof;
use support::{attach, report};

/// The mark the setup script's iptables rules exempt from diversion.
const UPSTREAM_MARK: u32 = 2;

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Copy,
    Ingress,
    Egress,
    Adaptive,
    Both,
}

/// What the proxy moved in user space.
#[derive(Default)]
struct Copied {
    /// By its own copy loops (copy and ingress modes, and pairs the
    /// forwarder refused).
    by_loops: AtomicU64,
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
        "adaptive" => Mode::Adaptive,
        "both" => Mode::Both,
        other => {
            return Err(
                format!("unknown --mode {other}: copy, ingress, egress, adaptive or both").into(),
            )
        }
    };
    let seconds: Option<f64> = opt("--seconds").map(|s| s.parse()).transpose()?;
    // Two sockets per connection: as many connections as the hard limit allows.
    support::limits::raise_open_files(u64::MAX)?;

    // Block SIGINT/SIGTERM before starting threads; a waiter thread ends us.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;

    let guard: Option<Arc<FastpathGuard>> = match mode {
        Mode::Copy => None,
        Mode::Egress | Mode::Adaptive => Some(Arc::new(
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
    let path = match mode {
        Mode::Adaptive => ForwardPath::ADAPTIVE,
        _ => ForwardPath::Kernel,
    };
    let forwarder = match mode {
        Mode::Egress | Mode::Adaptive | Mode::Both => Some(
            guard
                .as_ref()
                .expect("egress and both modes have a guard")
                .forwarder()?
                .with_path(path),
        ),
        Mode::Copy | Mode::Ingress => None,
    };
    let pairs: Arc<std::sync::Mutex<Vec<ForwardedPair>>> = Arc::default();
    {
        let (copied, pairs) = (copied.clone(), pairs.clone());
        std::thread::spawn(move || {
            for down in listener.incoming().flatten() {
                let result = match &forwarder {
                    Some(forwarder) => hand_over(down, forwarder, &copied)
                        .map(|pair| pairs.lock().unwrap().extend(pair)),
                    None => {
                        let copied = copied.clone();
                        std::thread::spawn(move || copy_both_ways(down, &copied));
                        Ok(())
                    }
                };
                if let Err(err) = result {
                    report::print_error("tproxy: connection", &err);
                }
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
    // Pairs still open are left to the forwarder (and end with us).
    let ended: Vec<ForwardedPair> = {
        let mut pairs = pairs.lock().unwrap();
        let (ended, open) = pairs.drain(..).partition(ForwardedPair::is_finished);
        *pairs = open;
        ended
    };
    let (mut at_hand_over, mut by_forwarder, mut not_taken, mut relayed) = (0, 0, 0, 0);
    for pair in ended {
        let stats = pair.wait()?;
        at_hand_over += stats.copied_at_hand_over;
        if stats.in_kernel {
            by_forwarder += stats.copied - stats.relayed;
        } else {
            not_taken += stats.copied - stats.relayed;
        }
        relayed += stats.relayed;
    }
    println!("tproxy: bytes copied at hand-over: {at_hand_over}");
    // Egress mode: bytes kept on a socket while the other side's backlog
    // was full (its receiver lagged), copied on by the forwarder in order.
    println!("tproxy: bytes the forwarder copied: {by_forwarder}");
    // Pairs whose client had sent its FIN before we handed them over (the
    // kernel takes only established sockets): copied in user space whole.
    println!("tproxy: bytes of pairs the kernel did not take: {not_taken}");
    // Adaptive path: bytes the forwarder's relay moved before a hand-over
    // to the kernel, or to the pair's end.
    println!("tproxy: bytes the forwarder relayed: {relayed}");
    if let Some(guard) = &guard {
        print!("tproxy: counters\n{}", guard.stats()?);
    }
    Ok(())
}

/// Connects to the diverted connection's original destination (the
/// accepted socket's local address), marked so it is not diverted again.
fn connect_upstream(down: &TcpStream) -> std::io::Result<TcpStream> {
    let original_destination = down.local_addr()?;
    let socket = Socket::new(
        Domain::for_address(original_destination),
        Type::STREAM,
        None,
    )?;
    socket.set_mark(UPSTREAM_MARK)?;
    socket.connect(&original_destination.into())?;
    Ok(socket.into())
}

/// Egress and both modes: hands the pair to the forwarder; a pair it
/// refuses is copied here instead (its streams come back untouched).
fn hand_over(
    down: TcpStream,
    forwarder: &Forwarder,
    copied: &Arc<Copied>,
) -> std::io::Result<Option<ForwardedPair>> {
    let up = connect_upstream(&down)?;
    match forwarder.forward(down, up) {
        Ok(pair) => Ok(Some(pair)),
        Err(refused) => {
            report::print_error("tproxy: copying a pair the kernel refused", &refused);
            let copied = copied.clone();
            let (down, up) = (refused.downstream, refused.upstream);
            std::thread::spawn(move || copy_pair(down, up, &copied));
            Ok(None)
        }
    }
}

/// Copy and ingress modes: a copying thread each way.
fn copy_both_ways(down: TcpStream, copied: &Copied) {
    match connect_upstream(&down) {
        Ok(up) => copy_pair(down, up, copied),
        Err(err) => report::print_error("tproxy: connection", &err),
    }
}

fn copy_pair(down: TcpStream, up: TcpStream, copied: &Copied) {
    let (down2, up2) = match (down.try_clone(), up.try_clone()) {
        (Ok(down2), Ok(up2)) => (down2, up2),
        (Err(err), _) | (_, Err(err)) => return report::print_error("tproxy: dup", &err),
    };
    let back = std::thread::spawn(move || copy_until_eof(up2, down2));
    let sent = copy_until_eof(down, up);
    copied
        .by_loops
        .fetch_add(sent + back.join().unwrap_or(0), Ordering::Relaxed);
}
