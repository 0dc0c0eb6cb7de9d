//! Workloads shared by the demo and the benchmarks. Each runs for a fixed
//! time over connected stream pairs made by a `Connector` (loopback TCP or
//! AF_UNIX) and reports a rate.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::connect::connect_nonblocking;

/// A byte stream of either kind.
pub trait Stream: Read + Write + Send + 'static {
    fn shutdown_write(&self);
}

impl Stream for TcpStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

impl Stream for UnixStream {
    fn shutdown_write(&self) {
        let _ = self.shutdown(Shutdown::Write);
    }
}

/// Makes connected (client, server) pairs.
pub enum Connector {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
    /// Any other way of making a TCP pair (e.g. through a proxy).
    Custom(Box<dyn Fn() -> (TcpStream, TcpStream)>),
}

impl Connector {
    pub fn tcp(addr: &str) -> Connector {
        Connector::Tcp(TcpListener::bind(addr).expect("bind"))
    }

    pub fn unix(path: std::path::PathBuf) -> Connector {
        let _ = std::fs::remove_file(&path);
        Connector::Unix(UnixListener::bind(&path).expect("bind unix"), path)
    }

    pub fn port(&self) -> Option<u16> {
        match self {
            Connector::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Connector::Unix(..) | Connector::Custom(_) => None,
        }
    }

    pub fn pair(&self) -> (Box<dyn Stream>, Box<dyn Stream>) {
        let boxed = |s: StdStream| -> Box<dyn Stream> {
            match s {
                StdStream::Tcp(s) => Box::new(s),
                StdStream::Unix(s) => Box::new(s),
            }
        };
        let (client, server) = self.std_pair();
        (boxed(client), boxed(server))
    }
}

impl Drop for Connector {
    fn drop(&mut self) {
        if let Connector::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What a workload measured.
#[derive(Debug, Clone, Default)]
pub struct Rate {
    /// Operations (round trips, bytes*8, connections) per second.
    pub per_second: f64,
    /// Bytes moved in either direction.
    pub bytes: u64,
    /// Round-trip latencies in nanoseconds (request/response only).
    pub latencies_ns: Vec<u64>,
}

/// Pins the calling thread to one CPU.
pub fn pin_to_cpu(cpu: usize) {
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Pins to `cpu`, or allows every CPU again (affinity is inherited by new
/// threads and outlives a workload, so "unpinned" must be set explicitly).
fn maybe_pin(cpu: Option<usize>) {
    match cpu {
        Some(cpu) => pin_to_cpu(cpu),
        None => {
            let mut all = nix::sched::CpuSet::new();
            for cpu in 0..std::thread::available_parallelism().map_or(1, |n| n.get()) {
                let _ = all.set(cpu);
            }
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &all);
        }
    }
}

/// Reads until EOF, retrying the spurious EAGAIN of tcp_bpf (README).
fn drain(stream: &mut dyn Stream) -> u64 {
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return total,
            Ok(n) => total += n as u64,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(e) => panic!("read: {e}"),
        }
    }
}

fn read_full(stream: &mut dyn Stream, buf: &mut [u8]) -> bool {
    let mut done = 0;
    while done < buf.len() {
        match stream.read(&mut buf[done..]) {
            Ok(0) => return false,
            Ok(n) => done += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Echoes `size`-byte messages until the client closes.
fn spawn_echo(
    mut server: Box<dyn Stream>,
    size: usize,
    cpu: Option<usize>,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        maybe_pin(cpu);
        let mut buf = vec![0u8; size];
        while read_full(server.as_mut(), &mut buf) {
            if server.write_all(&buf).is_err() {
                break;
            }
        }
    })
}

/// Ping-pong of `size`-byte messages on one connection; round trips per
/// second, with every round trip's latency.
pub fn request_response(
    conn: &Connector,
    size: usize,
    duration: Duration,
    cpu: Option<usize>,
) -> Rate {
    let (mut client, server) = conn.pair();
    let echo = spawn_echo(server, size, cpu);
    maybe_pin(cpu);
    let mut buf = vec![7u8; size];
    let mut latencies = Vec::with_capacity(1 << 20);
    let start = Instant::now();
    while start.elapsed() < duration {
        let t = Instant::now();
        client.write_all(&buf).unwrap();
        assert!(read_full(client.as_mut(), &mut buf), "echo closed");
        latencies.push(t.elapsed().as_nanos() as u64);
    }
    let secs = start.elapsed().as_secs_f64();
    drop(client);
    echo.join().unwrap();
    Rate {
        per_second: latencies.len() as f64 / secs,
        bytes: 2 * (latencies.len() * size) as u64,
        latencies_ns: latencies,
    }
}

/// One-way stream of `write_size`-byte writes; bits per second.
pub fn bulk(conn: &Connector, write_size: usize, duration: Duration, cpu: Option<usize>) -> Rate {
    let (mut client, mut server) = conn.pair();
    let sink = thread::spawn(move || {
        maybe_pin(cpu);
        drain(server.as_mut())
    });
    maybe_pin(cpu);
    let buf = vec![7u8; write_size];
    let start = Instant::now();
    while start.elapsed() < duration {
        for _ in 0..16 {
            client.write_all(&buf).unwrap();
        }
    }
    client.shutdown_write();
    let total = sink.join().unwrap();
    let secs = start.elapsed().as_secs_f64();
    Rate {
        per_second: total as f64 * 8.0 / secs,
        bytes: total,
        ..Rate::default()
    }
}

/// Connect, one 1-byte request and reply, close; connections per second.
pub fn churn(conn: &Connector, duration: Duration, cpu: Option<usize>) -> Rate {
    maybe_pin(cpu);
    let start = Instant::now();
    let mut count = 0u64;
    while start.elapsed() < duration {
        let (mut client, mut server) = conn.pair();
        client.write_all(&[1]).unwrap();
        let mut b = [0u8; 1];
        assert!(read_full(server.as_mut(), &mut b));
        server.write_all(&b).unwrap();
        assert!(read_full(client.as_mut(), &mut b));
        count += 1;
    }
    Rate {
        per_second: count as f64 / start.elapsed().as_secs_f64(),
        bytes: 2 * count,
        ..Rate::default()
    }
}

/// `connections` concurrent ping-pong connections of `size` bytes, driven
/// by a two-worker tokio runtime on each side (as event-loop servers are);
/// total round trips per second.
pub fn concurrent(conn: &Connector, connections: usize, size: usize, duration: Duration) -> Rate {
    maybe_pin(None);
    let pairs: Vec<_> = (0..connections).map(|_| conn.std_pair()).collect();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let trips = rt.block_on(async move {
        let stop = Arc::new(AtomicBool::new(false));
        let mut clients = Vec::new();
        for (client, server) in pairs {
            let (client, server) = (client.into_tokio(), server.into_tokio());
            tokio::spawn(async move { echo_async(server, size).await });
            let stop = stop.clone();
            clients.push(tokio::spawn(
                async move { ping_async(client, size, stop).await },
            ));
        }
        tokio::time::sleep(duration).await;
        stop.store(true, Ordering::Relaxed);
        let mut trips = 0u64;
        for c in clients {
            trips += c.await.unwrap();
        }
        trips
    });
    Rate {
        per_second: trips as f64 / duration.as_secs_f64(),
        bytes: 2 * trips * size as u64,
        ..Rate::default()
    }
}

/// A std stream of either kind, to be handed to tokio.
pub enum StdStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// A tokio stream of either kind.
pub enum AsyncStream {
    Tcp(tokio::net::TcpStream),
    Unix(tokio::net::UnixStream),
}

impl StdStream {
    fn into_tokio(self) -> AsyncStream {
        match self {
            StdStream::Tcp(s) => {
                s.set_nonblocking(true).unwrap();
                AsyncStream::Tcp(tokio::net::TcpStream::from_std(s).unwrap())
            }
            StdStream::Unix(s) => {
                s.set_nonblocking(true).unwrap();
                AsyncStream::Unix(tokio::net::UnixStream::from_std(s).unwrap())
            }
        }
    }
}

impl Connector {
    fn std_pair(&self) -> (StdStream, StdStream) {
        match self {
            Connector::Tcp(listener) => {
                // Like an event loop: blocking connects stay plain by default.
                let client = connect_nonblocking(listener.local_addr().unwrap()).expect("connect");
                let (server, _) = listener.accept().expect("accept");
                client.set_nodelay(true).unwrap();
                server.set_nodelay(true).unwrap();
                (StdStream::Tcp(client), StdStream::Tcp(server))
            }
            Connector::Unix(listener, path) => {
                let client = UnixStream::connect(path).expect("connect unix");
                let (server, _) = listener.accept().expect("accept unix");
                (StdStream::Unix(client), StdStream::Unix(server))
            }
            Connector::Custom(make) => {
                let (client, server) = make();
                client.set_nodelay(true).unwrap();
                server.set_nodelay(true).unwrap();
                (StdStream::Tcp(client), StdStream::Tcp(server))
            }
        }
    }
}

macro_rules! with_stream {
    ($stream:expr, $s:ident => $body:expr) => {
        match $stream {
            AsyncStream::Tcp(mut $s) => $body,
            AsyncStream::Unix(mut $s) => $body,
        }
    };
}

async fn echo_async(stream: AsyncStream, size: usize) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; size];
    with_stream!(stream, s => {
        while s.read_exact(&mut buf).await.is_ok() {
            if s.write_all(&buf).await.is_err() {
                break;
            }
        }
    })
}

async fn ping_async(stream: AsyncStream, size: usize, stop: Arc<AtomicBool>) -> u64 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![7u8; size];
    let mut trips = 0u64;
    with_stream!(stream, s => {
        while !stop.load(Ordering::Relaxed) {
            s.write_all(&buf).await.unwrap();
            s.read_exact(&mut buf).await.unwrap();
            trips += 1;
        }
    });
    trips
}
