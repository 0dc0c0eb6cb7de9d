//! A `Forwarder`: a few threads serving many forwarded pairs (egress mode).

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use sockmap_fastpath::{Accelerator, Error, ErrorKind, ForwardEnd, ForwardPath, ForwardStats};
use support::sockopt::{set_linger_zero, tcp_state};

/// Threads of this process whose name starts with `prefix`.
fn threads_named(prefix: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.starts_with(prefix))
        .count()
}

/// How many forwarder threads there are once `done` holds of that count,
/// or after 5 s.
fn wait_for_threads(done: impl Fn(usize) -> bool) -> usize {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let threads = threads_named("fastpath-fwd");
        if done(threads) || std::time::Instant::now() > deadline {
            return threads;
        }
        thread::sleep(Duration::from_millis(5));
    }
}

/// A forwarder of `guard` with `threads` threads.
fn forwarder_with_threads(
    guard: &sockmap_fastpath::FastpathGuard,
    threads: usize,
) -> sockmap_fastpath::Forwarder {
    guard
        .forwarder()
        .expect("forwarder")
        .with_threads(NonZeroUsize::new(threads).unwrap())
        .expect("forwarder threads")
}

/// The most forwarder threads seen while it runs, sampled every 5 ms.
struct ThreadWatch {
    stop: Arc<AtomicBool>,
    most: Arc<AtomicUsize>,
    sampler: thread::JoinHandle<()>,
}

impl ThreadWatch {
    fn start() -> Self {
        let (stop, most) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicUsize::new(0)),
        );
        let sampler = {
            let (stop, most) = (stop.clone(), most.clone());
            thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    most.fetch_max(threads_named("fastpath-fwd"), Ordering::Relaxed);
                    thread::sleep(Duration::from_millis(5));
                }
            })
        };
        ThreadWatch {
            stop,
            most,
            sampler,
        }
    }

    fn most(self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        self.sampler.join().unwrap();
        self.most.load(Ordering::Relaxed)
    }
}

const PAIRS: usize = 1000;
const UPLOAD: usize = 32 << 10;
const RESPONSE: usize = 8 << 10;
/// Long enough for an emulated kernel; the host takes about 7 s.
const RUN_LIMIT: Duration = Duration::from_secs(400);

/// How far a run got (counts of clients, pairs and answers).
#[derive(Debug, Default)]
struct Progress {
    connected: AtomicUsize,
    forwarded: AtomicUsize,
    answered: AtomicUsize,
    ended: AtomicUsize,
    done: AtomicUsize,
}

/// Connects in flight at once: a burst of 1000 overflows the listeners'
/// accept queues and the kernel resets the overflow, with or without us.
const CONNECTING: usize = 64;

/// 1000 client -> proxy -> server connections open at once, all handed to
/// one forwarder with two threads (it holds all 1000 pairs before any
/// client half-closes) and awaited as futures on a two-worker tokio
/// runtime: every byte arrives both ways (each client's upload is its own
/// pseudo-random stream, the server answers after the client's
/// half-close), every pair ends `Closed` in the kernel with exact byte
/// counts, and the forwarder never runs more than its two threads.
#[test]
fn two_threads_serve_a_thousand_pairs() {
    let Some(_env) = privileged_env() else { return };
    // Four sockets per connection, and a dup of two while handing over.
    let wanted = (6 * PAIRS + 200) as u64;
    let limit = support::limits::raise_open_files(wanted).expect("RLIMIT_NOFILE");
    assert!(
        limit >= wanted,
        "this test needs {wanted} open files, got {limit} (above the hard limit needs \
         CAP_SYS_RESOURCE)"
    );
    let guard = egress_guard();
    let forwarder = forwarder_with_threads(&guard, 2);
    assert_eq!(forwarder.threads(), 2);
    let forwarder = Arc::new(forwarder);
    let watch = ThreadWatch::start();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // Where the run got to, said if it does not finish in time.
    let progress = Arc::new(Progress::default());
    let (held_at_once, stats): (usize, Vec<ForwardStats>) = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let progress_at_end = progress.clone();
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (front_addr, upstream_addr) =
            (front.local_addr().unwrap(), upstream.local_addr().unwrap());
        let all_forwarded = Arc::new(tokio::sync::Notify::new());
        let server = tokio::spawn({
            let progress = progress.clone();
            async move {
                let mut served = Vec::new();
                for _ in 0..PAIRS {
                    let (mut s, _) = upstream.accept().await.unwrap();
                    let progress = progress.clone();
                    served.push(tokio::spawn(async move {
                        let mut got = Vec::new();
                        s.read_to_end(&mut got).await.unwrap();
                        let index = u64::from_ne_bytes(got[..8].try_into().unwrap());
                        assert_bytes_eq(&got[8..], &random_bytes(UPLOAD, index), "upload");
                        s.write_all(&random_bytes(RESPONSE, index + 1_000_000))
                            .await
                            .unwrap();
                        s.shutdown().await.unwrap();
                        progress.answered.fetch_add(1, Ordering::Relaxed);
                    }));
                }
                for task in served {
                    task.await.unwrap();
                }
            }
        });
        let proxy = {
            let (forwarder, all_forwarded) = (forwarder.clone(), all_forwarded.clone());
            let progress = progress.clone();
            tokio::spawn(async move {
                let mut pairs = Vec::new();
                for _ in 0..PAIRS {
                    let (down, _) = front.accept().await.unwrap();
                    let up = tokio::net::TcpStream::connect(upstream_addr).await.unwrap();
                    let pair = forwarder
                        .forward(down.into_std().unwrap(), up.into_std().unwrap())
                        .expect("forward");
                    progress.forwarded.fetch_add(1, Ordering::Relaxed);
                    let progress = progress.clone();
                    pairs.push(tokio::spawn(async move {
                        let stats = pair.await;
                        progress.ended.fetch_add(1, Ordering::Relaxed);
                        stats
                    }));
                }
                let held = forwarder.pairs();
                all_forwarded.notify_waiters();
                let mut stats = Vec::new();
                for pair in pairs {
                    stats.push(pair.await.unwrap().expect("pair"));
                }
                (held, stats)
            })
        };
        let connecting = Arc::new(tokio::sync::Semaphore::new(CONNECTING));
        let clients: Vec<_> = (0..PAIRS as u64)
            .map(|index| {
                let (connecting, all_forwarded) = (connecting.clone(), all_forwarded.clone());
                let progress = progress.clone();
                tokio::spawn(async move {
                    let forwarded = all_forwarded.notified();
                    let permit = connecting.acquire().await.unwrap();
                    let mut c = tokio::net::TcpStream::connect(front_addr).await.unwrap();
                    drop(permit);
                    progress.connected.fetch_add(1, Ordering::Relaxed);
                    c.write_all(&index.to_ne_bytes()).await.unwrap();
                    c.write_all(&random_bytes(UPLOAD, index)).await.unwrap();
                    forwarded.await;
                    c.shutdown().await.unwrap();
                    let mut got = Vec::new();
                    c.read_to_end(&mut got).await.unwrap();
                    assert_bytes_eq(&got, &random_bytes(RESPONSE, index + 1_000_000), "response");
                    progress.done.fetch_add(1, Ordering::Relaxed);
                })
            })
            .collect();
        let run = async {
            for client in clients {
                client.await.unwrap();
            }
            server.await.unwrap();
            proxy.await.unwrap()
        };
        match tokio::time::timeout(RUN_LIMIT, run).await {
            Ok(result) => result,
            Err(_) => panic!(
                "not done after {RUN_LIMIT:?}: {progress_at_end:?}, forwarder holds {} pairs",
                forwarder.pairs()
            ),
        }
    });
    let most_threads = watch.most();
    let counters = guard.stats().unwrap();
    eprintln!(
        "{PAIRS} pairs, {held_at_once} held at once: {most_threads} forwarder thread(s) at \
         most; fwd_bytes {}, fwd_unpaired {}",
        counters.fwd_bytes, counters.fwd_unpaired
    );
    assert_eq!(held_at_once, PAIRS, "every pair open at once");
    assert_eq!(stats.len(), PAIRS);
    for s in &stats {
        assert!(s.in_kernel, "{s:?}");
        assert_eq!(s.end, ForwardEnd::Closed, "{s:?}");
        assert_eq!(s.downstream_to_upstream, (8 + UPLOAD) as u64, "{s:?}");
        assert_eq!(s.upstream_to_downstream, RESPONSE as u64, "{s:?}");
    }
    assert_eq!(
        most_threads, 2,
        "the forwarder's two threads, none per pair"
    );
    assert!(counters.fwd_bytes > 0, "the kernel forwarded: {counters}");
    assert_eq!(forwarder.pairs(), 0);
}

/// A client that sent its request and half-closed before the proxy took
/// the connection: its socket is no longer established and the kernel's
/// maps refuse it, so the forwarder copies the pair in user space, with
/// the same half-close and byte-count semantics (`in_kernel` false).
#[test]
fn a_pair_the_kernel_refuses_is_copied_in_user_space() {
    let Some(_env) = privileged_env() else { return };
    let guard = egress_guard();
    let forwarder = guard.forwarder().expect("forwarder");
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = connect(front.local_addr().unwrap());
    // Small enough to fit the receive window: the FIN follows at once.
    let request = random_bytes(16 << 10, 31);
    client.write_all(&request).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let (down, _) = front.accept().unwrap();
    // Until the proxy's socket has the client's FIN (CLOSE_WAIT).
    while !readable_after_eof(&down) {
        thread::sleep(Duration::from_millis(1));
    }
    let up = connect(upstream.local_addr().unwrap());
    let (mut server, _) = upstream.accept().unwrap();
    let pair = forwarder.forward(down, up).expect("served, not refused");
    assert_bytes_eq(&read_all(&mut server), &request, "request");
    let response = random_bytes(1 << 20, 32);
    server.write_all(&response).unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    assert_bytes_eq(&read_all(&mut client), &response, "response");
    let stats = pair.wait().expect("pair");
    assert!(!stats.in_kernel, "{stats:?}");
    assert_eq!(stats.end, ForwardEnd::Closed);
    assert_eq!(stats.downstream_to_upstream, 16 << 10);
    assert_eq!(stats.upstream_to_downstream, 1 << 20);
    assert_eq!(
        guard.stats().unwrap().fwd_bytes,
        0,
        "the kernel forwarded nothing"
    );
}

/// Whether the peer's FIN has arrived (CLOSE_WAIT).
fn readable_after_eof(s: &TcpStream) -> bool {
    const TCP_CLOSE_WAIT: u8 = 8;
    tcp_state(s) == TCP_CLOSE_WAIT
}

/// A client -> proxy -> server connection handed to `forwarder`.
fn forwarded(
    forwarder: &sockmap_fastpath::Forwarder,
    upstream: &TcpListener,
) -> (TcpStream, TcpStream, sockmap_fastpath::ForwardedPair) {
    forwarded_with(forwarder, upstream, |_| {})
}

/// [`forwarded`], with the proxy's upstream socket set up by `set_up_up`
/// before the hand-over.
fn forwarded_with(
    forwarder: &sockmap_fastpath::Forwarder,
    upstream: &TcpListener,
    set_up_up: impl FnOnce(&TcpStream),
) -> (TcpStream, TcpStream, sockmap_fastpath::ForwardedPair) {
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = connect(front.local_addr().unwrap());
    let (down, _) = front.accept().unwrap();
    let up = connect(upstream.local_addr().unwrap());
    set_up_up(&up);
    let (server, _) = upstream.accept().unwrap();
    let pair = forwarder.forward(down, up).expect("forward");
    (client, server, pair)
}

/// Half-closes pass through in order with the other direction still
/// flowing, and a reset on either side resets the other, as with
/// `Forwarding::wait` (the forwarder runs the same steps, driven by epoll),
/// in the kernel and on the adaptive path's splice relay.
#[test]
fn half_closes_and_resets_pass_through_the_forwarder() {
    let Some(_env) = privileged_env() else { return };
    let guard = egress_guard();
    for path in [ForwardPath::Kernel, ForwardPath::ADAPTIVE] {
        let forwarder = guard.forwarder().expect("forwarder").with_path(path);
        half_closes_and_resets_pass_through(&forwarder);
    }
}

fn half_closes_and_resets_pass_through(forwarder: &sockmap_fastpath::Forwarder) {
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();

    // Half-close: the client stops sending, the server keeps sending.
    let (mut client, mut server, pair) = forwarded(forwarder, &upstream);
    let upload = random_bytes(1 << 20, 21);
    client.write_all(&upload).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_bytes_eq(
        &read_all(&mut server),
        &upload,
        "upload before the half-close",
    );
    let download = random_bytes(4 << 20, 22);
    server.write_all(&download).unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    assert_bytes_eq(&read_all(&mut client), &download, "download after it");
    let stats = pair.wait().expect("pair");
    assert_eq!(stats.end, ForwardEnd::Closed);
    assert_eq!(stats.downstream_to_upstream, 1 << 20);
    assert_eq!(stats.upstream_to_downstream, 4 << 20);

    for client_resets in [true, false] {
        let (client, server, pair) = forwarded(forwarder, &upstream);
        let (mut survivor, resetter) = if client_resets {
            (server, client)
        } else {
            (client, server)
        };
        set_linger_zero(&resetter);
        drop(resetter);
        let mut buf = [0u8; 16];
        let err = survivor
            .read(&mut buf)
            .expect_err("the other side is reset too");
        assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
        let want = if client_resets {
            ForwardEnd::DownstreamReset
        } else {
            ForwardEnd::UpstreamReset
        };
        assert_eq!(pair.wait().expect("pair").end, want);
    }
    assert_eq!(forwarder.pairs(), 0);
}

/// An egress guard's forwarder on the adaptive path, and a client ->
/// proxy -> server connection handed to it.
fn adaptive_pair(
    guard: &sockmap_fastpath::FastpathGuard,
) -> (
    sockmap_fastpath::Forwarder,
    TcpStream,
    TcpStream,
    sockmap_fastpath::ForwardedPair,
) {
    let forwarder = guard
        .forwarder()
        .expect("forwarder")
        .with_path(ForwardPath::ADAPTIVE);
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let (client, server, pair) = forwarded(&forwarder, &upstream);
    (forwarder, client, server, pair)
}

/// The size of each request and response in `request_response`.
const MESSAGE: usize = 1 << 10;

/// One request and one response of `MESSAGE` bytes per round, each checked.
fn request_response(client: &mut TcpStream, server: &mut TcpStream, rounds: std::ops::Range<u64>) {
    let (mut request, mut response) = (vec![0u8; MESSAGE], vec![0u8; MESSAGE]);
    for round in rounds {
        client.write_all(&random_bytes(MESSAGE, 2 * round)).unwrap();
        server.read_exact(&mut request).unwrap();
        assert_bytes_eq(&request, &random_bytes(MESSAGE, 2 * round), "request");
        server
            .write_all(&random_bytes(MESSAGE, 2 * round + 1))
            .unwrap();
        client.read_exact(&mut response).unwrap();
        assert_bytes_eq(&response, &random_bytes(MESSAGE, 2 * round + 1), "response");
    }
}

/// The range `relayed` falls in when the hand-over came after `bytes`:
/// it waits for a step with both pipes empty, which may be a round later.
fn handed_over_after(bytes: u64) -> std::ops::RangeInclusive<u64> {
    bytes..=bytes + 8 * MESSAGE as u64
}

/// Request/response on the adaptive path: the forwarder relays the first
/// turns itself with splice(2), then hands the pair to the kernel, which
/// forwards the rest: 8 MiB to a server that reads late, then 8 MiB each
/// way at once. Every byte arrives in order; the pair's counts say how
/// many the relay moved, the program's counters the rest.
#[test]
fn an_adaptive_request_response_pair_moves_to_the_kernel() {
    let Some(_env) = privileged_env() else { return };
    let guard = egress_guard();
    let before = guard.stats().unwrap();
    let (forwarder, mut client, mut server, pair) = adaptive_pair(&guard);
    const ROUNDS: u64 = 200;
    request_response(&mut client, &mut server, 0..ROUNDS);
    // A server that reads late: the kernel path keeps segments on the
    // proxy's socket once the backlog is full (6.2+), and the forwarder
    // copies them, counting from the hand-over, not from the relay.
    const BULK: usize = 8 << 20;
    let late = random_bytes(BULK, 999);
    let writer = {
        let (mut client, late) = (client.try_clone().unwrap(), late.clone());
        thread::spawn(move || client.write_all(&late).unwrap())
    };
    thread::sleep(Duration::from_millis(300));
    let mut got = vec![0u8; BULK];
    server.read_exact(&mut got).unwrap();
    writer.join().unwrap();
    assert_bytes_eq(&got, &late, "upload read late");
    exchange(
        client,
        server,
        random_bytes(BULK, 1000),
        random_bytes(BULK, 1001),
    );
    let stats = pair.wait().expect("pair");
    let counters = delta(&guard, &before);
    eprintln!("{stats:?}; {counters}");
    let up = ROUNDS * MESSAGE as u64 + 2 * BULK as u64;
    let down = ROUNDS * MESSAGE as u64 + BULK as u64;
    assert_eq!(stats.end, ForwardEnd::Closed);
    assert!(stats.in_kernel, "handed to the kernel: {stats:?}");
    assert_eq!(stats.downstream_to_upstream, up);
    assert_eq!(stats.upstream_to_downstream, down);
    // 8 turns take 9 messages of 1 KiB.
    assert!(
        handed_over_after(9 * MESSAGE as u64).contains(&stats.relayed),
        "the relay moved the first turns only: {stats:?}"
    );
    assert_eq!(
        counters.fwd_bytes + stats.copied,
        up + down,
        "the kernel forwarded the rest: {counters}"
    );
    assert!(counters.fwd_bytes > BULK as u64, "{counters}");
    assert_eq!(forwarder.pairs(), 0);
}

/// `max_in_kernel` caps the pairs in the kernel, across the forwarder's
/// threads: with a cap of one and two threads (each pair on its own), a
/// second request/response pair stays on the relay while the first is in
/// the kernel, and moves there once the first has ended.
#[test]
fn adaptive_pairs_beyond_the_kernel_cap_stay_on_the_relay() {
    let Some(_env) = privileged_env() else { return };
    let guard = egress_guard();
    let forwarder = forwarder_with_threads(&guard, 2).with_path(ForwardPath::Adaptive {
        turns: 8,
        max_turn_bytes: 16 << 10,
        max_in_kernel: Some(1),
    });
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut first_client, mut first_server, first) = forwarded(&forwarder, &upstream);
    let (mut client, mut server, second) = forwarded(&forwarder, &upstream);
    const ROUNDS: u64 = 20;
    request_response(&mut first_client, &mut first_server, 0..ROUNDS);
    request_response(&mut client, &mut server, 0..ROUNDS);
    drop((first_client, first_server));
    let first = first.wait().expect("first pair");
    assert!(first.in_kernel, "{first:?}");
    assert!(
        handed_over_after(9 * MESSAGE as u64).contains(&first.relayed),
        "{first:?}"
    );
    // The second pair had its turns long ago; the first step after the
    // first pair ended hands it over.
    request_response(&mut client, &mut server, ROUNDS..2 * ROUNDS);
    drop((client, server));
    let second = second.wait().expect("second pair");
    assert!(second.in_kernel, "{second:?}");
    assert!(
        handed_over_after(2 * ROUNDS * MESSAGE as u64).contains(&second.relayed),
        "{second:?}"
    );
    assert_eq!(forwarder.pairs(), 0);
}

/// `with_threads` given fewer threads than it has: a thread given up takes
/// no new pairs, serves the ones it has to their end (every byte), then
/// exits; the remaining thread serves new pairs.
#[test]
fn a_thread_given_up_serves_its_pairs_to_the_end() {
    let Some(_env) = privileged_env() else { return };
    let guard = egress_guard();
    let forwarder = forwarder_with_threads(&guard, 2);
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    // The fewest pairs first: one pair on each thread.
    let (mut kept_client, mut kept_server, kept) = forwarded(&forwarder, &upstream);
    let (mut client, mut server, given_up) = forwarded(&forwarder, &upstream);
    let forwarder = forwarder
        .with_threads(NonZeroUsize::MIN)
        .expect("one thread");
    assert_eq!(forwarder.threads(), 1);
    // A new thread names itself once it runs.
    let with_both = wait_for_threads(|n| n >= 2);
    request_response(&mut client, &mut server, 0..20);
    drop((client, server));
    let given_up = given_up.wait().expect("pair on the thread given up");
    assert_eq!(given_up.end, ForwardEnd::Closed, "{given_up:?}");
    assert_eq!(given_up.downstream_to_upstream, 20 * MESSAGE as u64);
    let after = wait_for_threads(|n| n < with_both);
    assert!(
        after < with_both,
        "the thread given up exits after its last pair ({with_both} threads before, {after} after)"
    );
    let (mut new_client, mut new_server, new) = forwarded(&forwarder, &upstream);
    request_response(&mut new_client, &mut new_server, 0..20);
    request_response(&mut kept_client, &mut kept_server, 0..20);
    drop((new_client, new_server, kept_client, kept_server));
    for pair in [kept, new] {
        let stats = pair.wait().expect("pair");
        assert_eq!(
            stats.upstream_to_downstream,
            20 * MESSAGE as u64,
            "{stats:?}"
        );
    }
    assert_eq!(forwarder.pairs(), 0);
}

/// A thread `with_threads` cannot set up (no file descriptor left for its
/// epoll set): the error names the call, and the forwarder's threads,
/// the one it had included, end.
#[test]
fn a_thread_that_cannot_be_set_up_is_an_error_naming_the_call() {
    let Some(_env) = privileged_env() else { return };
    let guard = egress_guard();
    let forwarder = forwarder_with_threads(&guard, 1);
    // A new thread names itself once it runs.
    let before = wait_for_threads(|n| n >= 1);
    let grown = {
        let _no_more_files = support::limits::NoMoreFiles::start().expect("RLIMIT_NOFILE");
        forwarder.with_threads(NonZeroUsize::new(3).unwrap())
    };
    let err = grown.expect_err("no descriptor for a second epoll set");
    assert!(
        matches!(
            err,
            Error::Io {
                call: "epoll_create1",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::Io);
    assert!(err.to_string().contains("forwarder"), "{err}");
    let after = wait_for_threads(|n| n < before);
    assert!(
        after < before,
        "its thread ended: {before} before, {after} after"
    );
    // With descriptors again, a new forwarder serves pairs.
    let forwarder = guard.forwarder().expect("forwarder");
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut client, mut server, pair) = forwarded(&forwarder, &upstream);
    request_response(&mut client, &mut server, 0..4);
    drop((client, server));
    assert_eq!(pair.wait().expect("pair").end, ForwardEnd::Closed);
}

/// The relay copies short reads through user memory and splices long
/// runs; what the other side has no room for waits, and goes out before
/// anything read later. 1 KiB messages with pauses between them, behind
/// the smallest socket buffers and a server that starts reading late,
/// arrive complete and in order.
#[test]
fn an_adaptive_relay_keeps_what_the_other_side_had_no_room_for() {
    let Some(_env) = privileged_env() else { return };
    let guard = egress_guard();
    let forwarder = guard
        .forwarder()
        .expect("forwarder")
        .with_path(ForwardPath::ADAPTIVE);
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let smallest = |s: socket2::SockRef<'_>| {
        s.set_send_buffer_size(1).unwrap();
        s.set_recv_buffer_size(1).unwrap();
    };
    smallest(socket2::SockRef::from(&upstream));
    let (client, mut server, pair) = forwarded_with(&forwarder, &upstream, |up| {
        smallest(socket2::SockRef::from(up))
    });
    const MESSAGES: usize = 2048;
    let sent = random_bytes(MESSAGES * MESSAGE, 77);
    let writer = {
        let (mut client, sent) = (client.try_clone().unwrap(), sent.clone());
        thread::spawn(move || {
            for message in sent.chunks(MESSAGE) {
                client.write_all(message).unwrap();
                thread::sleep(Duration::from_micros(100));
            }
            client.shutdown(Shutdown::Write).unwrap();
        })
    };
    thread::sleep(Duration::from_millis(300));
    assert_bytes_eq(&read_all(&mut server), &sent, "upload read late");
    writer.join().unwrap();
    drop((client, server));
    let stats = pair.wait().expect("pair");
    assert!(!stats.in_kernel, "{stats:?}");
    assert_eq!(stats.relayed, sent.len() as u64, "{stats:?}");
}

/// A client that half-closes, reads part of a download and then resets
/// its connection ends the pair (`DownstreamReset`) on both paths, also
/// with bytes taken for it that can no longer go anywhere. (The first
/// failed send clears the socket's error, so that is no sign to wait for;
/// found by the scale benchmark: 71 of 1,000 relayed pairs never ended.)
#[test]
fn a_client_that_resets_mid_download_ends_the_pair() {
    let Some(_env) = privileged_env() else { return };
    let guard = egress_guard();
    for path in [ForwardPath::Kernel, ForwardPath::ADAPTIVE] {
        let forwarder = guard.forwarder().expect("forwarder").with_path(path);
        let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut client, server, pair) = forwarded(&forwarder, &upstream);
        client.shutdown(Shutdown::Write).unwrap();
        let writer = {
            let mut server = server.try_clone().unwrap();
            thread::spawn(move || {
                let chunk = random_bytes(64 << 10, 5);
                while server.write_all(&chunk).is_ok() {}
            })
        };
        let mut part = vec![0u8; 1 << 20];
        client.read_exact(&mut part).unwrap();
        set_linger_zero(&client);
        drop(client);
        let (done, ended) = std::sync::mpsc::channel();
        thread::spawn(move || done.send(pair.wait()));
        let stats = ended
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("{path:?}: the pair did not end 20 s after the reset"))
            .expect("pair");
        assert_eq!(
            stats.end,
            ForwardEnd::DownstreamReset,
            "{path:?}: {stats:?}"
        );
        writer.join().unwrap();
        assert_eq!(forwarder.pairs(), 0);
    }
}

/// Writes `data` on a thread of its own, then half-closes.
fn send_and_half_close(stream: &TcpStream, data: Vec<u8>) -> thread::JoinHandle<()> {
    let mut stream = stream.try_clone().unwrap();
    thread::spawn(move || {
        stream.write_all(&data).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
    })
}

/// Bulk on the adaptive path: 32 MiB up, then (after the client's
/// half-close) 32 MiB down. One change of direction after a long run is
/// no request/response turn, so the relay moves every byte and the kernel
/// none.
#[test]
fn an_adaptive_bulk_pair_stays_on_the_relay() {
    let Some(_env) = privileged_env() else { return };
    let guard = egress_guard();
    let before = guard.stats().unwrap();
    let (forwarder, mut client, mut server, pair) = adaptive_pair(&guard);
    const BULK: usize = 32 << 20;
    let upload = random_bytes(BULK, 41);
    let writer = send_and_half_close(&client, upload.clone());
    assert_bytes_eq(&read_all(&mut server), &upload, "upload");
    writer.join().unwrap();
    let download = random_bytes(BULK, 42);
    let writer = send_and_half_close(&server, download.clone());
    assert_bytes_eq(&read_all(&mut client), &download, "download");
    writer.join().unwrap();
    let stats = pair.wait().expect("pair");
    let counters = delta(&guard, &before);
    assert_eq!(stats.end, ForwardEnd::Closed);
    assert!(!stats.in_kernel, "{stats:?}");
    assert_eq!(stats.downstream_to_upstream, BULK as u64);
    assert_eq!(stats.upstream_to_downstream, BULK as u64);
    assert_eq!(stats.relayed, 2 * BULK as u64, "{stats:?}");
    assert_eq!(stats.copied, stats.relayed, "{stats:?}");
    assert_eq!(
        counters.fwd_bytes, 0,
        "the kernel forwarded nothing: {counters}"
    );
    assert_eq!(forwarder.pairs(), 0);
}

/// A pair the kernel refuses (one socket as both sides: already forwarded
/// when its second entry goes in) comes back with both streams, untouched
/// and usable; `?` turns the refusal into the crate's error. A pair served
/// meanwhile is unaffected; an ingress guard has no forwarder.
#[test]
fn a_refused_pair_gets_its_streams_back() {
    let Some(env) = privileged_env() else { return };
    let guard = egress_guard();
    let forwarder = guard.forwarder().expect("forwarder");
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut client, mut server, first) = forwarded(&forwarder, &upstream);

    let lone = connect(upstream.local_addr().unwrap());
    let (mut lone_server, _) = upstream.accept().unwrap();
    let refused = forwarder
        .forward(lone.try_clone().unwrap(), lone)
        .expect_err("one socket on both sides");
    assert_eq!(
        refused.error.kind(),
        ErrorKind::MapFullOrTaken,
        "{}",
        refused.error
    );
    let mut given_back = refused.downstream;
    given_back.write_all(b"plain").unwrap();
    let mut got = [0u8; 5];
    lone_server.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"plain", "the stream given back works as plain TCP");
    let err = Error::from(
        forwarder
            .forward(given_back.try_clone().unwrap(), given_back)
            .expect_err("again"),
    );
    assert_eq!(err.kind(), ErrorKind::MapFullOrTaken, "{err}");

    client.write_all(b"still there").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut server), b"still there");
    server.shutdown(Shutdown::Write).unwrap();
    assert!(read_all(&mut client).is_empty());
    assert_eq!(first.wait().expect("first").end, ForwardEnd::Closed);
    assert_eq!(forwarder.pairs(), 0);

    let ingress = Accelerator::builder()
        .cgroup(env.cgroup.cgroup())
        .splice_guard(sockmap_fastpath::SpliceGuard::Off)
        .attach()
        .unwrap();
    let err = ingress.forwarder().expect_err("ingress mode");
    assert!(matches!(err, Error::NotEgressMode), "{err:?}");
}

/// CPU time (user + system) the threads of this process named `prefix`
/// have used so far.
fn cpu_time_of_threads_named(prefix: &str) -> Duration {
    let ticks: u64 = std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|task| {
            let path = task.ok()?.path();
            let comm = std::fs::read_to_string(path.join("comm")).ok()?;
            let stat = std::fs::read_to_string(path.join("stat")).ok()?;
            comm.starts_with(prefix).then_some(stat)
        })
        .map(|stat| {
            // Fields after the parenthesised name: utime and stime are the
            // 12th and 13th (stat fields 14 and 15).
            let fields: Vec<&str> = stat
                .rsplit(')')
                .next()
                .unwrap()
                .split_whitespace()
                .collect();
            fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
        })
        .sum();
    // SAFETY: sysconf has no preconditions.
    let per_second = unsafe { nix::libc::sysconf(nix::libc::_SC_CLK_TCK) } as u64;
    Duration::from_millis(ticks * 1000 / per_second)
}

/// Ten pairs whose servers stop reading: the forwarder holds each pair's
/// kept bytes and waits for the kernel, with no event to say when. It
/// looks again on a timer that backs off while nothing moves, and never
/// spins (it did: a timeout rounded down to 0 ms kept the thread at a whole
/// core). The bound is loose on purpose (a quarter of the time watched):
/// what it catches is a busy loop, not a slow one. Then every byte arrives.
#[test]
fn stalled_pairs_leave_the_forwarder_idle() {
    let Some(_env) = privileged_env() else { return };
    if !kernel().both_mode.is_yes() {
        // No backlog bound without the 6.2 kfuncs: nothing is held.
        not_run("the forwarding backlog bound needs the 6.2 kfuncs");
        return;
    }
    const STALLED: usize = 10;
    const WATCH: Duration = Duration::from_secs(2);
    let guard = egress_guard();
    let forwarder = guard.forwarder().expect("forwarder");
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let data = Arc::new(random_bytes(32 << 20, 11));
    let pairs: Vec<_> = (0..STALLED)
        .map(|_| {
            // A small upstream send buffer: the backlog cannot drain into
            // it, so the kept bytes wait for the backlog (on a timer), not
            // for room (an event).
            let front = TcpListener::bind("127.0.0.1:0").unwrap();
            let client = connect(front.local_addr().unwrap());
            let (down, _) = front.accept().unwrap();
            let up = connect(upstream.local_addr().unwrap());
            socket2::SockRef::from(&up)
                .set_send_buffer_size(256 << 10)
                .unwrap();
            let (server, _) = upstream.accept().unwrap();
            let pair = forwarder.forward(down, up).expect("forward");
            let data = Arc::clone(&data);
            let writer = thread::spawn(move || {
                let mut client = client;
                client.write_all(&data).unwrap();
                client.shutdown(Shutdown::Write).unwrap();
                client
            });
            (writer, server, pair)
        })
        .collect();
    let waited = std::time::Instant::now();
    while (guard.stats().unwrap().fwd_backlog_kept as usize) < STALLED {
        assert!(
            waited.elapsed() < Duration::from_secs(300),
            "not every pair kept bytes: {}",
            guard.stats().unwrap()
        );
        thread::sleep(Duration::from_millis(50));
    }
    thread::sleep(Duration::from_millis(500));
    let before = cpu_time_of_threads_named("fastpath-fwd");
    thread::sleep(WATCH);
    let used = cpu_time_of_threads_named("fastpath-fwd") - before;
    eprintln!("forwarder CPU with {STALLED} stalled pairs: {used:?} in {WATCH:?}");
    assert!(
        used < WATCH / 4,
        "the forwarder spun: {used:?} in {WATCH:?}"
    );
    for (writer, mut server, pair) in pairs {
        assert_bytes_eq(&read_all(&mut server), &data, "upload after the stall");
        server.shutdown(Shutdown::Write).unwrap();
        let mut client = writer.join().unwrap();
        assert_eq!(read_all(&mut client), b"");
        assert_eq!(pair.wait().unwrap().end, ForwardEnd::Closed);
    }
}
