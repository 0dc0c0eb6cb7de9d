//! The scale section's load: N clients and the server they reach through
//! the proxy child, all tasks of one two-worker tokio runtime in the bench
//! process (as an event-loop client and server would be).

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::runtime::Runtime;
use tokio::task::AbortHandle;

use super::proxies::listen_loopback;
use crate::cases::BoxError;

#[derive(Clone, Copy, Debug)]
pub enum Workload {
    /// Each client sends this many bytes, the server echoes them.
    RequestResponse(usize),
    /// Clients write chunks of this size; the server reads.
    Upload(usize),
    /// The server writes chunks of this size; clients read.
    Download(usize),
}

impl Workload {
    pub fn name(self) -> String {
        let kib = |n: usize| format!("{} KiB", n >> 10);
        match self {
            Workload::RequestResponse(n) => format!("req/resp {}", kib(n)),
            Workload::Upload(n) => format!("upload, {} writes", kib(n)),
            Workload::Download(n) => format!("download, {} writes", kib(n)),
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Workload::RequestResponse(_) => "trips/s",
            _ => "Gbit/s",
        }
    }

    /// The unit CPU time per operation is shown in.
    pub fn cpu_unit(self) -> &'static str {
        match self {
            Workload::RequestResponse(_) => "µs/trip",
            _ => "ms/GiB",
        }
    }

    /// What CPU seconds per counted operation are worth in `cpu_unit`.
    pub fn cpu_unit_scale(self) -> f64 {
        match self {
            Workload::RequestResponse(_) => 1e6,
            _ => 1e3 * (1u64 << 30) as f64,
        }
    }

    /// What the counted operations are worth in `unit`.
    pub fn scale(self) -> f64 {
        match self {
            Workload::RequestResponse(_) => 1.0,
            _ => 8e-9,
        }
    }
}

/// One measurement: operations (round trips or bytes) per second,
/// round-trip latencies for request/response, and how far the memory in use
/// on the machine (MemTotal - MemAvailable: socket buffers are kernel
/// memory) rose above where it was before the run, at most.
pub struct Measured {
    pub per_second: f64,
    pub latencies_ns: Vec<u64>,
    pub memory_rise_kib: u64,
    /// CPU time spent while measuring, per counted operation (round trip
    /// or byte).
    pub cpu_per_op: CpuSeconds,
    /// Why the run failed (then the figures above are of no use but the
    /// memory rise).
    pub failure: Option<String>,
}

impl Measured {
    fn failed(why: String, memory_rise_kib: u64) -> Self {
        Measured {
            per_second: 0.0,
            latencies_ns: Vec::new(),
            memory_rise_kib,
            cpu_per_op: CpuSeconds::default(),
            failure: Some(why),
        }
    }
}

/// A run stops when the machine's available memory falls below this share
/// of the total: a kernel queue without back-pressure can otherwise take
/// all of it (1,000 pairs of uploads through egress mode took 23 GB and
/// the OOM killer ended the benchmark).
const MEMORY_FLOOR: f64 = 0.25;

/// The server side, shared with its accept loop.
struct Server {
    workload: Mutex<Workload>,
    accepted: AtomicUsize,
    handlers: Mutex<Vec<AbortHandle>>,
    /// Round trips (counted by clients), bytes uploaded (by the server) or
    /// downloaded (by clients).
    done: AtomicU64,
}

pub struct Load {
    runtime: Runtime,
    server: Arc<Server>,
    server_port: u16,
    /// How long every connection may take to reach the server.
    establish: Duration,
}

impl Load {
    pub fn new(establish: Duration) -> Result<Load, BoxError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        let server = Arc::new(Server {
            workload: Mutex::new(Workload::RequestResponse(1)),
            accepted: AtomicUsize::new(0),
            handlers: Mutex::new(Vec::new()),
            done: AtomicU64::new(0),
        });
        let listener = listen_loopback()?;
        listener.set_nonblocking(true)?;
        let server_port = listener.local_addr()?.port();
        let accepting = Arc::clone(&server);
        let _accept_loop = runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let _ = stream.set_nodelay(true);
                let workload = *accepting.workload.lock().unwrap();
                let handler = tokio::spawn(serve(workload, stream, Arc::clone(&accepting)));
                accepting
                    .handlers
                    .lock()
                    .unwrap()
                    .push(handler.abort_handle());
                accepting.accepted.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Load {
            runtime,
            server,
            server_port,
            establish,
        })
    }

    /// Where the proxies connect upstream.
    pub fn server_port(&self) -> u16 {
        self.server_port
    }

    /// Opens `pairs` connections through the proxy at `proxy_port`, runs
    /// `workload` on all of them, measures for `duration` after `warmup`,
    /// calls `at_end` while they are still open, then closes them all.
    /// `proxy_pid` is the proxy's process, whose CPU time is measured.
    ///
    /// A run fails ([`Measured::failure`]) if a connection fails before
    /// the end, not every connection reached the server in time (a minute
    /// unless `--scale-establish-seconds` says otherwise), or
    /// the machine ran low on memory.
    pub fn run(
        &self,
        workload: Workload,
        proxy_port: u16,
        proxy_pid: u32,
        pairs: usize,
        (warmup, duration): (Duration, Duration),
        at_end: impl FnOnce(),
    ) -> Measured {
        let server = &self.server;
        *server.workload.lock().unwrap() = workload;
        server.accepted.store(0, Ordering::Relaxed);
        let proxy = SocketAddr::from((Ipv4Addr::LOCALHOST, proxy_port));
        self.runtime.block_on(async {
            let flags = Arc::new(Flags::default());
            let watch = tokio::spawn(watch_memory(Arc::clone(&flags)));
            let mut clients = Vec::with_capacity(pairs);
            for connected in 0..pairs {
                let stream = match connect(proxy).await {
                    Ok(stream) => stream,
                    Err(err) => {
                        flags.stop.store(true, Ordering::Relaxed);
                        self.close(clients).await;
                        flags.closed.store(true, Ordering::Relaxed);
                        let why = format!("connection {} of {pairs} to the proxy: {err}", connected + 1);
                        return Measured::failed(why, watch.await.unwrap_or_default());
                    }
                };
                let (flags, server) = (Arc::clone(&flags), Arc::clone(server));
                clients.push(tokio::spawn(client(workload, stream, flags, server)));
            }
            let deadline = Instant::now() + self.establish;
            while server.accepted.load(Ordering::Relaxed) < pairs {
                if Instant::now() > deadline {
                    flags.stop.store(true, Ordering::Relaxed);
                    self.close(clients).await;
                    flags.closed.store(true, Ordering::Relaxed);
                    return Measured::failed(
                        format!(
                            "only {} of {pairs} connections reached the server through the proxy",
                            server.accepted.load(Ordering::Relaxed)
                        ),
                        watch.await.unwrap_or_default(),
                    );
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            tokio::time::sleep(warmup).await;
            flags.measuring.store(true, Ordering::Relaxed);
            let (before, start) = (server.done.load(Ordering::Relaxed), Instant::now());
            let cpu_before = CpuSeconds::now(proxy_pid);
            tokio::time::sleep(duration).await;
            let done = server.done.load(Ordering::Relaxed) - before;
            let elapsed = start.elapsed();
            let cpu = CpuSeconds::between(cpu_before, CpuSeconds::now(proxy_pid));
            flags.measuring.store(false, Ordering::Relaxed);
            let tcp_memory = tcp_memory();
            at_end();
            flags.stop.store(true, Ordering::Relaxed);
            let latencies_ns = self.close(clients).await;
            flags.closed.store(true, Ordering::Relaxed);
            let memory_rise_kib = watch.await.unwrap_or_default();
            if let Some(why) = flags.out_of_memory.lock().unwrap().take() {
                return Measured::failed(why, memory_rise_kib);
            }
            let failed = flags.failed.load(Ordering::Relaxed);
            if failed > 0 {
                let first = flags.first_failure.lock().unwrap().take();
                return Measured::failed(format!(
                    "{failed} of {pairs} connections through the proxy failed during {}; the first: {} (TCP memory at the end: {tcp_memory})",
                    workload.name(),
                    first.unwrap_or_default()
                ), memory_rise_kib);
            }
            Measured {
                per_second: done as f64 / elapsed.as_secs_f64(),
                latencies_ns,
                memory_rise_kib,
                cpu_per_op: cpu.per(done.max(1) as f64),
                failure: None,
            }
        })
    }

    /// Waits for the clients to stop (aborting stragglers after 5 s), then
    /// for the server's handlers to see the ends; their latencies.
    async fn close(&self, clients: Vec<tokio::task::JoinHandle<Vec<u64>>>) -> Vec<u64> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut latencies = Vec::new();
        for client in clients {
            let abort = client.abort_handle();
            match tokio::time::timeout_at(deadline, client).await {
                Ok(Ok(l)) => latencies.extend(l),
                _ => abort.abort(),
            }
        }
        let handlers = std::mem::take(&mut *self.server.handlers.lock().unwrap());
        while handlers.iter().any(|h| !h.is_finished())
            && tokio::time::Instant::now() < deadline + Duration::from_secs(5)
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        handlers.iter().for_each(AbortHandle::abort);
        latencies.sort_unstable();
        latencies
    }
}

/// Connects within 10 s (a dropped SYN is retried after 1, 3, 7 s...: a
/// proxy that stops accepting fails the run instead of stalling it).
async fn connect(proxy: SocketAddr) -> std::io::Result<TcpStream> {
    let stream = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(proxy))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    stream.set_nodelay(true)?;
    Ok(stream)
}

#[derive(Default)]
struct Flags {
    measuring: AtomicBool,
    stop: AtomicBool,
    /// Clients whose connection failed before `stop`.
    failed: AtomicUsize,
    first_failure: Mutex<Option<String>>,
    /// Every connection is closed: the memory watch ends.
    closed: AtomicBool,
    /// Why the memory watch stopped the run.
    out_of_memory: Mutex<Option<String>>,
}

/// The number after `field` (e.g. `"VmHWM:"`) in a /proc file of
/// `Name: value [unit]` lines; 0 if missing.
pub fn proc_field(path: &str, field: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// CPU time in seconds: the whole machine's busy time (every CPU, from
/// /proc/stat: user, system, interrupts and softirqs, so also the kernel's
/// work in softirqs and workqueues for any process), the clients' and the
/// server's (this process) and the proxy process's (user and system time
/// of their threads, from /proc/<pid>/stat). What the machine spent beyond
/// the two processes is mostly the kernel's work on their behalf outside
/// their threads: softirqs that interrupted another process and kworkers
/// (e.g. the psock backlog sending forwarded segments).
#[derive(Clone, Copy, Default)]
pub struct CpuSeconds {
    pub machine: f64,
    pub load: f64,
    pub proxy: f64,
}

impl CpuSeconds {
    /// Busy time is counted as the CPUs' time less their idle time: the
    /// kernel measures idle time exactly, while its busy counters are
    /// sampled at each tick (they read 10% low here against the processes'
    /// own times).
    fn now(proxy_pid: u32) -> (Self, f64, Instant) {
        let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
            .ok()
            .flatten()
            .unwrap_or(100) as f64;
        let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        // cpu user nice system idle iowait ...
        let idle: f64 = stat
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(4)
            .take(2)
            .filter_map(|v| v.parse::<f64>().ok())
            .sum();
        let cpus = stat
            .lines()
            .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
            .count() as f64;
        let times = CpuSeconds {
            machine: -idle / ticks,
            load: process_cpu_ticks("/proc/self/stat") / ticks,
            proxy: process_cpu_ticks(&format!("/proc/{proxy_pid}/stat")) / ticks,
        };
        (times, cpus, Instant::now())
    }

    /// From two `now()`s: what was spent in between.
    fn between(earlier: (Self, f64, Instant), later: (Self, f64, Instant)) -> Self {
        let ((before, cpus, start), (after, _, end)) = (earlier, later);
        CpuSeconds {
            machine: (end - start).as_secs_f64() * cpus + after.machine - before.machine,
            load: after.load - before.load,
            proxy: after.proxy - before.proxy,
        }
    }

    fn per(self, ops: f64) -> Self {
        CpuSeconds {
            machine: self.machine / ops,
            load: self.load / ops,
            proxy: self.proxy / ops,
        }
    }
}

/// utime + stime (fields 14 and 15) of a /proc/<pid>/stat, in clock ticks;
/// 0 if unreadable. The command name (field 2) may hold spaces: count from
/// its closing parenthesis.
fn process_cpu_ticks(path: &str) -> f64 {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    // After the name: state is field 3, so utime (14) is index 11.
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    field(11) + field(12)
}

/// `MemTotal` and `MemAvailable` from /proc/meminfo, in KiB.
fn memory_kib() -> (u64, u64) {
    let field = |name| proc_field("/proc/meminfo", name);
    (field("MemTotal:"), field("MemAvailable:"))
}

/// Until the run's connections are closed: the most the memory in use
/// rose (KiB); stops the run if available memory falls below
/// [`MEMORY_FLOOR`].
async fn watch_memory(flags: Arc<Flags>) -> u64 {
    let (total, available_before) = memory_kib();
    let mut rise = 0;
    while !flags.closed.load(Ordering::Relaxed) {
        let (_, available) = memory_kib();
        rise = rise.max(available_before.saturating_sub(available));
        if (available as f64) < MEMORY_FLOOR * total as f64 && !flags.stop.load(Ordering::Relaxed) {
            *flags.out_of_memory.lock().unwrap() = Some(format!(
                "stopped: the kernel held {} MiB more than before the run, {} MiB of {} MiB were left ({})",
                rise >> 10,
                available >> 10,
                total >> 10,
                tcp_memory()
            ));
            flags.stop.store(true, Ordering::Relaxed);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rise
}

async fn client(
    workload: Workload,
    mut stream: TcpStream,
    flags: Arc<Flags>,
    server: Arc<Server>,
) -> Vec<u64> {
    let mut latencies = Vec::new();
    let stopped = || flags.stop.load(Ordering::Relaxed);
    let result: std::io::Result<()> = async {
        match workload {
            Workload::RequestResponse(size) => {
                let mut buf = vec![7u8; size];
                while !stopped() {
                    let start = Instant::now();
                    stream.write_all(&buf).await?;
                    stream.read_exact(&mut buf).await?;
                    server.done.fetch_add(1, Ordering::Relaxed);
                    if flags.measuring.load(Ordering::Relaxed) {
                        latencies.push(start.elapsed().as_nanos() as u64);
                    }
                }
            }
            Workload::Upload(size) => {
                let buf = vec![7u8; size];
                while !stopped() {
                    stream.write_all(&buf).await?;
                }
            }
            Workload::Download(_) => {
                let mut buf = vec![0u8; 64 << 10];
                while !stopped() {
                    match stream.read(&mut buf).await? {
                        0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                        n => server.done.fetch_add(n as u64, Ordering::Relaxed),
                    };
                }
            }
        }
        Ok(())
    }
    .await;
    if let (Err(err), false) = (result, stopped()) {
        flags.failed.fetch_add(1, Ordering::Relaxed);
        flags
            .first_failure
            .lock()
            .unwrap()
            .get_or_insert(err.to_string());
    }
    latencies
}

/// The server's end of one connection, until the client goes away.
async fn serve(workload: Workload, mut stream: TcpStream, server: Arc<Server>) {
    match workload {
        Workload::RequestResponse(size) => {
            let mut buf = vec![0u8; size];
            while stream.read_exact(&mut buf).await.is_ok() {
                if stream.write_all(&buf).await.is_err() {
                    break;
                }
            }
        }
        Workload::Upload(_) => {
            let mut buf = vec![0u8; 64 << 10];
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                server.done.fetch_add(n as u64, Ordering::Relaxed);
            }
        }
        Workload::Download(size) => {
            let buf = vec![7u8; size];
            while stream.write_all(&buf).await.is_ok() {}
        }
    }
}

/// The kernel's TCP memory in use and its pressure threshold, in pages
/// (`/proc/net/sockstat`, `net.ipv4.tcp_mem`).
fn tcp_memory() -> String {
    use support::limits::{tcp_memory_pages, tcp_memory_pressure_pages};
    let shown = |pages: Option<u64>| pages.map_or("?".to_owned(), |p| p.to_string());
    format!(
        "{} pages in use, pressure from {}",
        shown(tcp_memory_pages()),
        shown(tcp_memory_pressure_pages())
    )
}
