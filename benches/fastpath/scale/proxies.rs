//! The proxy of the scale section runs in a child process of its own (the
//! bench binary started with `--scale-proxy`), so the threads and resident
//! memory measured are the proxy's alone.
//!
//! The child prints its port on a line, serves until its stdin closes,
//! then prints its forwarding counters on a line and exits.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use sockmap_fastpath::{
    Accelerator, Cgroup, FastpathGuard, ForwardPath, ForwardedPair, RedirectMode, SpliceGuard,
};
use support::connect::connect_nonblocking;

use super::splice_relay::SpliceRelay;

/// The argument that starts the bench binary as a proxy child.
pub const ROLE_ARG: &str = "--scale-proxy";

#[derive(Clone, Copy, PartialEq, Debug)]
pub enum ProxyKind {
    /// tokio's `copy_bidirectional` on a two-worker runtime.
    Copy,
    /// splice(2) through pipes, one epoll thread.
    Splice,
    /// This crate's `Forwarder` in egress mode.
    Egress,
    /// This crate's `Forwarder` in both mode.
    Both,
    /// This crate's `Forwarder` in egress mode on `ForwardPath::ADAPTIVE`:
    /// its own splice relay first, the kernel once a pair turns out to be
    /// request/response.
    Adaptive,
}

impl ProxyKind {
    pub const ALL: [ProxyKind; 5] = [
        ProxyKind::Copy,
        ProxyKind::Splice,
        ProxyKind::Egress,
        ProxyKind::Both,
        ProxyKind::Adaptive,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ProxyKind::Copy => "tokio copy",
            ProxyKind::Splice => "splice relay",
            ProxyKind::Egress => "egress mode",
            ProxyKind::Both => "both mode",
            ProxyKind::Adaptive => "adaptive",
        }
    }

    pub fn arg(self) -> &'static str {
        match self {
            ProxyKind::Copy => "copy",
            ProxyKind::Splice => "splice",
            ProxyKind::Egress => "egress",
            ProxyKind::Both => "both",
            ProxyKind::Adaptive => "adaptive",
        }
    }

    pub fn from_arg(arg: &str) -> Option<ProxyKind> {
        ProxyKind::ALL.into_iter().find(|k| k.arg() == arg)
    }

    /// Whether it is this crate's (a guard and a `Forwarder`).
    pub fn in_kernel(self) -> bool {
        matches!(
            self,
            ProxyKind::Egress | ProxyKind::Both | ProxyKind::Adaptive
        )
    }
}

/// A loopback listener with room for thousands of pending connections
/// (std's backlog of 128 drops SYNs when clients connect in a burst).
pub fn listen_loopback() -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// The child's main: `--scale-proxy KIND UPSTREAM_PORT MAX_PIPES
/// FORWARDER_THREADS` (0: the `Forwarder`'s default).
pub fn proxy_role(args: &[String]) -> ! {
    let usage = "usage: --scale-proxy copy|splice|egress|both|adaptive UPSTREAM_PORT MAX_PIPES \
                 FORWARDER_THREADS";
    let kind = args
        .first()
        .and_then(|a| ProxyKind::from_arg(a))
        .expect(usage);
    let upstream_port: u16 = args.get(1).and_then(|a| a.parse().ok()).expect(usage);
    let max_pipes: usize = args.get(2).and_then(|a| a.parse().ok()).expect(usage);
    let forwarder_threads: usize = args.get(3).and_then(|a| a.parse().ok()).expect(usage);
    let upstream = SocketAddr::from((Ipv4Addr::LOCALHOST, upstream_port));
    support::limits::raise_open_files(1 << 20).expect("raise the open-file limit");
    let listener = listen_loopback().expect("listen");
    let port = listener.local_addr().unwrap().port();
    let guard = kind.in_kernel().then(|| Arc::new(attach(kind, port)));
    let ends = Arc::new(PairEnds::default());
    exit_when_stdin_closes(guard.clone(), Arc::clone(&ends));
    println!("{port}");
    std::io::stdout().flush().unwrap();
    match (kind, guard) {
        (ProxyKind::Copy, _) => copy_proxy(listener, upstream),
        (ProxyKind::Splice, _) => SpliceRelay::new(listener, upstream, max_pipes)
            .expect("splice relay")
            .run(),
        (_, Some(guard)) => {
            let path = match kind {
                ProxyKind::Adaptive => ForwardPath::ADAPTIVE,
                _ => ForwardPath::Kernel,
            };
            let threads = NonZeroUsize::new(forwarder_threads);
            forwarder_proxy(&guard, path, threads, listener, upstream, &ends)
        }
        (_, None) => unreachable!("kernel proxies have a guard"),
    }
}

fn attach(kind: ProxyKind, port: u16) -> FastpathGuard {
    let builder = Accelerator::builder().splice_guard(SpliceGuard::Off);
    let builder = match kind {
        ProxyKind::Egress | ProxyKind::Adaptive => builder.redirect(RedirectMode::Egress),
        // The client-to-proxy hop, in the bench's child cgroup (this
        // process's own).
        _ => builder
            .cgroup(Cgroup::current().expect("current cgroup"))
            .redirect(RedirectMode::Both)
            .ports([port]),
    };
    builder.attach().expect("attach")
}

/// On EOF from the parent: the counters that show which path the bytes
/// took, then exit (the kernel detaches the programs with the last fd).
fn exit_when_stdin_closes(guard: Option<Arc<FastpathGuard>>, ends: Arc<PairEnds>) {
    std::thread::spawn(move || {
        for _ in std::io::stdin().lock().lines() {}
        ends.reap();
        match guard.map(|g| g.stats()) {
            Some(Ok(s)) => println!(
                "fwd_bytes={} fwd_direct_bytes={} bytes_redirected={}; pairs ended: {}",
                s.fwd_bytes,
                s.fwd_direct_bytes,
                s.bytes_redirected,
                ends.summary()
            ),
            Some(Err(err)) => println!("stats failed: {err}"),
            None => println!("user space"),
        }
        let _ = std::io::stdout().flush();
        std::process::exit(0);
    });
}

fn copy_proxy(listener: TcpListener, upstream: SocketAddr) -> ! {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        loop {
            let Ok((mut down, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut up = tokio::net::TcpStream::connect(upstream).await?;
                down.set_nodelay(true)?;
                up.set_nodelay(true)?;
                tokio::io::copy_bidirectional(&mut down, &mut up).await
            });
        }
    })
}

/// How the forwarder's pairs ended (ForwardEnd, or the error), counted as
/// they end.
#[derive(Default)]
struct PairEnds {
    serving: Mutex<Vec<ForwardedPair>>,
    ended: Mutex<BTreeMap<String, u64>>,
}

impl PairEnds {
    fn reap(&self) {
        let finished: Vec<ForwardedPair> = {
            let mut serving = self.serving.lock().unwrap();
            let (done, open) = serving.drain(..).partition(|p| p.is_finished());
            *serving = open;
            done
        };
        let mut ended = self.ended.lock().unwrap();
        for pair in finished {
            let end = match pair.wait() {
                Ok(stats) if stats.in_kernel => format!("{:?}", stats.end),
                Ok(stats) => format!("{:?} in user space", stats.end),
                Err(err) => format!("error: {err}"),
            };
            *ended.entry(end).or_default() += 1;
        }
    }

    fn summary(&self) -> String {
        let ended = self.ended.lock().unwrap();
        let ends: Vec<String> = ended.iter().map(|(end, n)| format!("{end} {n}")).collect();
        ends.join(", ")
    }
}

fn forwarder_proxy(
    guard: &FastpathGuard,
    path: ForwardPath,
    threads: Option<NonZeroUsize>,
    listener: TcpListener,
    upstream: SocketAddr,
    ends: &Arc<PairEnds>,
) -> ! {
    let mut forwarder = guard.forwarder().expect("forwarder").with_path(path);
    if let Some(threads) = threads {
        forwarder = forwarder.with_threads(threads).expect("forwarder threads");
    }
    let reaper = Arc::clone(ends);
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_millis(100));
        reaper.reap();
    });
    loop {
        let Ok((down, _)) = listener.accept() else {
            continue;
        };
        let Ok(up) = connect_nonblocking(upstream) else {
            continue;
        };
        let _ = (down.set_nodelay(true), up.set_nodelay(true));
        match forwarder.forward(down, up) {
            Ok(pair) => ends.serving.lock().unwrap().push(pair),
            Err(refused) => eprintln!("forward refused: {}", refused.error),
        }
    }
}
