//! Pairing states: only the two sockets of one connection, both on the
//! shortcut, stay in the socket map. A socket whose peer does not join
//! (outside the cgroup, outside the policy, refused, in another network
//! namespace, or too late after a plain send) must behave exactly like
//! plain TCP: on some kernels (6.18.44 here) FIONREAD on a map member
//! counts only redirected bytes and reads 0 while plain bytes wait.
//!
//! Every mixed setup runs the same observations as a plain pair, over IPv4
//! and IPv6, and the counters must show which sockets joined and left.

mod common;
use common::*;
use support::sockopt::{fionread, readable_within, set_int_option, set_linger_zero, set_rcvlowat};

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::thread;
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use sockmap_fastpath::{Cidr, FastpathGuard};

const ADDRS: [&str; 2] = ["127.0.0.1:0", "[::1]:0"];
const SMALL_WRITES: usize = 300;

/// What the receiving socket of a connection observes, in every way a
/// program may look at it.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    /// Wake-ups after which FIONREAD said 0 although a recv() then got
    /// bytes (the kernel quirk this file guards against), over all three
    /// epoll runs below.
    fionread_zero_with_bytes: usize,
    /// Bytes read in order: paced writes, edge-triggered epoll.
    bytes_via_epoll_et: usize,
    /// Bytes read in order: 10,000 unpaced tiny writes, a level-triggered
    /// reader that sleeps between wake-ups and reads 1 KiB at a time.
    bytes_via_epoll_lt_sleepy: usize,
    /// The same with an edge-triggered reader that drains each wake-up.
    bytes_via_epoll_et_sleepy: usize,
    /// What recv(MSG_PEEK) returned, then what recv() returned.
    peeked_then_read: (Vec<u8>, Vec<u8>),
    splice_moved_plain_bytes: bool,
    readable_below_rcvlowat: bool,
    half_close_then_eof: bool,
    reset_seen: String,
}

/// How the receiver of [`epoll_reader`] waits and reads.
#[derive(Clone, Copy)]
enum Reader {
    /// Edge-triggered, reads until EAGAIN at every wake-up.
    Edge { sleep: Duration },
    /// Level-triggered, one read of at most 1 KiB per wake-up.
    Level { sleep: Duration },
}

/// `writes` writes of `size` bytes from `tx` (one byte value per write,
/// pausing `pace` between writes) while `rx` waits with epoll as `reader`
/// says, sleeping between wake-ups, and reads FIONREAD at every wake-up.
/// A missed wake-up fails after 2 s; bytes out of order fail at once.
/// Returns (wake-ups where FIONREAD said 0 yet bytes were read, bytes read).
fn epoll_reader(
    tx: &TcpStream,
    rx: &TcpStream,
    (writes, size, pace): (usize, usize, Duration),
    reader: Reader,
) -> (usize, usize) {
    tx.set_nodelay(true).unwrap();
    rx.set_nonblocking(true).unwrap();
    let epoll = Epoll::new(EpollCreateFlags::empty()).unwrap();
    let (flags, sleep, chunk) = match reader {
        Reader::Edge { sleep } => (EpollFlags::EPOLLIN | EpollFlags::EPOLLET, sleep, 64 << 10),
        Reader::Level { sleep } => (EpollFlags::EPOLLIN, sleep, 1 << 10),
    };
    epoll.add(rx, EpollEvent::new(flags, 0)).unwrap();
    let writer = {
        let mut tx = tx.try_clone().unwrap();
        thread::spawn(move || {
            for i in 0..writes {
                tx.write_all(&vec![i as u8; size]).unwrap();
                if !pace.is_zero() {
                    thread::sleep(pace);
                }
            }
        })
    };
    let (mut zero_with_bytes, mut got) = (0, 0);
    let mut buf = vec![0u8; chunk];
    while got < writes * size {
        let mut events = [EpollEvent::empty()];
        let n = epoll
            .wait(&mut events, EpollTimeout::from(2000u16))
            .unwrap();
        assert_eq!(n, 1, "no wake-up within 2 s with {got} bytes read");
        thread::sleep(sleep);
        let announced = fionread(rx);
        let mut read_now = 0;
        loop {
            match (&*rx).read(&mut buf) {
                Ok(0) => panic!("unexpected EOF"),
                Ok(k) => {
                    for (at, byte) in buf[..k].iter().enumerate() {
                        let want = ((got + read_now + at) / size) as u8;
                        assert_eq!(*byte, want, "byte {} out of order", got + read_now + at);
                    }
                    read_now += k;
                    if matches!(reader, Reader::Level { .. }) {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => panic!("read: {e}"),
            }
        }
        if announced == 0 && read_now > 0 {
            zero_with_bytes += 1;
        }
        got += read_now;
    }
    writer.join().unwrap();
    rx.set_nonblocking(false).unwrap();
    (zero_with_bytes, got)
}

const PACED: (usize, usize, Duration) = (SMALL_WRITES, 100, Duration::from_micros(200));
const TINY_UNPACED: (usize, usize, Duration) = (10_000, 10, Duration::ZERO);
const SLEEPY: Duration = Duration::from_micros(200);

/// recv(MSG_PEEK) shows the bytes without taking them.
fn peek_then_read(tx: &mut TcpStream, rx: &mut TcpStream) -> (Vec<u8>, Vec<u8>) {
    tx.write_all(b"peekaboo").unwrap();
    let mut peeked = [0u8; 8];
    let n = rx.peek(&mut peeked).unwrap();
    let mut read = vec![0u8; n];
    rx.read_exact(&mut read).unwrap();
    (peeked[..n].to_vec(), read)
}

/// splice(2) from the socket into a pipe moves bytes that arrived as plain
/// TCP (it does not on a map member, whose queue splice cannot see).
fn splice_moves(tx: &mut TcpStream, rx: &TcpStream) -> bool {
    tx.write_all(&[7u8; 1000]).unwrap();
    thread::sleep(Duration::from_millis(20));
    let (pipe_r, pipe_w) = nix::unistd::pipe().unwrap();
    let moved = nix::fcntl::splice(
        rx.as_fd(),
        None,
        pipe_w.as_fd(),
        None,
        1000,
        nix::fcntl::SpliceFFlags::SPLICE_F_NONBLOCK,
    );
    let mut out = [0u8; 1000];
    let read = moved.map(|n| nix::unistd::read(&pipe_r, &mut out[..n]).unwrap());
    matches!(read, Ok(1000)) && out == [7u8; 1000]
}

fn observe(mut tx: TcpStream, mut rx: TcpStream) -> Observed {
    let no_sleep = Duration::ZERO;
    let (zero_et, bytes_via_epoll_et) =
        epoll_reader(&tx, &rx, PACED, Reader::Edge { sleep: no_sleep });
    let (zero_lt, bytes_via_epoll_lt_sleepy) =
        epoll_reader(&tx, &rx, TINY_UNPACED, Reader::Level { sleep: SLEEPY });
    let (zero_et_sleepy, bytes_via_epoll_et_sleepy) =
        epoll_reader(&tx, &rx, TINY_UNPACED, Reader::Edge { sleep: SLEEPY });
    let peeked_then_read = peek_then_read(&mut tx, &mut rx);
    let splice_moved_plain_bytes = splice_moves(&mut tx, &rx);
    set_rcvlowat(&rx, 1000);
    tx.write_all(&[1u8; 500]).unwrap();
    thread::sleep(Duration::from_millis(20));
    let readable_below_rcvlowat = readable_within(&rx, 50);
    set_rcvlowat(&rx, 1);
    let mut half = [0u8; 500];
    rx.read_exact(&mut half).unwrap();
    tx.write_all(b"last").unwrap();
    tx.shutdown(Shutdown::Write).unwrap();
    let half_close_then_eof = read_all(&mut rx) == b"last";
    // The other way, then an abortive close.
    rx.write_all(b"reply").unwrap();
    let mut reply = [0u8; 5];
    tx.read_exact(&mut reply).unwrap();
    set_linger_zero(&rx);
    drop(rx);
    thread::sleep(Duration::from_millis(20));
    let reset_seen = match tx.read(&mut reply) {
        Ok(n) => format!("{n} bytes"),
        Err(e) => format!("{:?}", e.kind()),
    };
    Observed {
        fionread_zero_with_bytes: zero_et + zero_lt + zero_et_sleepy,
        bytes_via_epoll_et,
        bytes_via_epoll_lt_sleepy,
        bytes_via_epoll_et_sleepy,
        peeked_then_read,
        splice_moved_plain_bytes,
        readable_below_rcvlowat,
        half_close_then_eof,
        reset_seen,
    }
}

/// Observes both directions of a connection: client -> server and
/// server -> client (on a second connection made the same way).
fn observe_both_ways(make: &dyn Fn() -> (TcpStream, TcpStream)) -> (Observed, Observed) {
    let (c, s) = make();
    let up = observe(c, s);
    let (c, s) = make();
    let down = observe(s, c);
    (up, down)
}

/// The same observations on a pair made outside the accelerator's cgroup.
fn plain_reference(env: &Env, addr: &str) -> (Observed, Observed) {
    let (up, down) = observe_both_ways(&|| env.cgroup.outside(|| connected_pair(addr)));
    assert_eq!(up.fionread_zero_with_bytes, 0, "plain TCP: {up:?}");
    assert!(up.splice_moved_plain_bytes && down.splice_moved_plain_bytes);
    (up, down)
}

/// Runs a mixed setup against the plain reference and checks the
/// counters: `joined` sockets inserted, `removed` taken out again, and
/// `skipped` accepted sockets kept out, per connection; nothing redirected
/// and nobody left in the map.
fn same_as_plain_and_counted(
    env: &Env,
    guard: &FastpathGuard,
    addr: &str,
    make: &dyn Fn() -> (TcpStream, TcpStream),
    (joined, removed, skipped): (u64, u64, u64),
) {
    let plain = plain_reference(env, addr);
    let before = guard.stats().unwrap();
    let mixed = observe_both_ways(make);
    let d = guard.stats().unwrap().since(&before);
    assert_eq!(mixed, plain, "{addr}: differs from plain TCP; {d}");
    assert_eq!(d.bytes_redirected, 0, "{addr}: {d}");
    assert_eq!(
        (d.sockets_inserted, d.unpaired_removed, d.unpaired_skipped),
        (2 * joined, 2 * removed, 2 * skipped),
        "{addr}: two connections; {d}"
    );
    assert_eq!(guard.socket_count(), 0, "{addr}: nobody left in the map");
}

/// The server is in the accelerator's cgroup, the client is not (a client
/// outside the policy in the words: the server's peer never joins).
#[test]
fn server_in_scope_client_outside() {
    let Some(env) = privileged_env() else { return };
    let guard = env.attach(|b| b);
    for addr in ADDRS {
        let listener = TcpListener::bind(addr).unwrap();
        let to = listener.local_addr().unwrap();
        let make = || {
            let client = env.cgroup.outside(|| connect(to));
            let (server, _) = listener.accept().unwrap();
            (client, server)
        };
        same_as_plain_and_counted(&env, &guard, addr, &make, (0, 0, 1));
    }
}

/// The client is in scope, its server outside the cgroup (a local service
/// the policy does not cover, or a remote one): the client joins, learns
/// its peer did not, and leaves before its plain bytes can be misread.
#[test]
fn client_in_scope_server_outside() {
    let Some(env) = privileged_env() else { return };
    let guard = env.attach(|b| b);
    for addr in ADDRS {
        let listener = env.cgroup.outside(|| TcpListener::bind(addr).unwrap());
        let to = listener.local_addr().unwrap();
        let make = || {
            let client = connect(to);
            let (server, _) = listener.accept().unwrap();
            (client, server)
        };
        same_as_plain_and_counted(&env, &guard, addr, &make, (1, 1, 0));
    }
}

/// Both in scope, only the client selected by the policy (its peer address
/// is in the CIDR, the server's peer address is not): the server refuses,
/// and takes the waiting client out of the map.
#[test]
fn server_not_selected_by_policy() {
    let Some(env) = privileged_env() else { return };
    let guard = env.attach(|b| b.cidr("127.0.0.1/32".parse::<Cidr>().unwrap()));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let to = listener.local_addr().unwrap();
    let make = || {
        let client = connect_from_source("127.0.0.2:0", to);
        let (server, _) = listener.accept().unwrap();
        (client, server)
    };
    same_as_plain_and_counted(&env, &guard, "127.0.0.1:0", &make, (1, 1, 0));
    let d = guard.stats().unwrap();
    assert_eq!(d.policy_skipped, 2, "the two servers: {d}");
}

/// The client sends before its server is established (TCP_DEFER_ACCEPT
/// keeps the server half-open until data arrives): the client's first
/// message misses, goes plain, and the pair never forms.
#[test]
fn client_that_sent_before_its_peer_joined() {
    let Some(env) = privileged_env() else { return };
    let guard = env.attach(|b| b);
    for addr in ADDRS {
        let listener = TcpListener::bind(addr).unwrap();
        set_int_option(
            &listener,
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_DEFER_ACCEPT,
            1,
        );
        let to = listener.local_addr().unwrap();
        let before = guard.stats().unwrap();
        let mut client = connect(to);
        client.write_all(b"first").unwrap();
        let (mut server, _) = listener.accept().unwrap();
        let mut first = [0u8; 5];
        server.read_exact(&mut first).unwrap();
        assert_eq!(&first, b"first");
        let d = guard.stats().unwrap().since(&before);
        assert_eq!(
            (d.sockets_inserted, d.peer_missing, d.unpaired_removed),
            (1, 1, 1),
            "{addr}: the client joined, missed, left: {d}"
        );
        assert_eq!(d.bytes_redirected, 0, "{addr}: {d}");
        assert_eq!(
            (d.msgs_passed, d.bytes_passed),
            (1, 5),
            "{addr}: the first message went plain: {d}"
        );
        assert_eq!(guard.socket_count(), 0, "{addr}");
        let observed = observe(client, server);
        assert_eq!(observed.fionread_zero_with_bytes, 0, "{addr}: {observed:?}");
        assert!(observed.splice_moved_plain_bytes, "{addr}: {observed:?}");
    }
}

/// FACTS.md: a server keeps the fd of a socket its client reset; the
/// client reconnects from the same port, so the new server socket has the
/// same key as the dead one. Before per-connection pairing the new client
/// was redirected into the dead socket and its bytes vanished.
#[test]
fn a_reused_four_tuple_never_reaches_the_dead_socket() {
    let Some(env) = privileged_env() else { return };
    let guard = env.attach(|b| b);
    for addr in ADDRS {
        let listener = TcpListener::bind(addr).unwrap();
        let to = listener.local_addr().unwrap();
        let first = socket2_client(to, None);
        let source = first.local_addr().unwrap();
        let (_dead_server, _) = listener.accept().unwrap(); // fd kept open
        set_linger_zero(&first);
        drop(first); // RST
        thread::sleep(Duration::from_millis(50));
        let before = guard.stats().unwrap();
        let mut again = socket2_client(to, Some(source));
        let (mut server, _) = listener.accept().unwrap();
        again.write_all(b"hello").unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let mut got = [0u8; 5];
        server
            .read_exact(&mut got)
            .expect("the new server socket gets the new client's bytes");
        assert_eq!(&got, b"hello");
        let d = guard.stats().unwrap().since(&before);
        assert_eq!(d.bytes_redirected, 0, "{addr}: {d}");
        assert_eq!(
            (d.insert_failed, d.unpaired_removed),
            (1, 1),
            "{addr}: the new server's key is taken; the client left: {d}"
        );
    }
}

fn socket2_client(to: SocketAddr, source: Option<SocketAddr>) -> TcpStream {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )
    .unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.set_reuse_port(true).unwrap();
    // Without a source, bind to port 0 first: a port no other socket
    // holds (connect() alone may share a port in use towards another
    // destination, which a later explicit bind to it then finds taken).
    if source.is_none() {
        socket.bind(&SocketAddr::new(to.ip(), 0).into()).unwrap();
    }
    if let Some(source) = source {
        // The reset socket's port is released asynchronously: retry.
        let mut tries = 0;
        while let Err(err) = socket.bind(&source.into()) {
            tries += 1;
            assert!(tries < 200, "bind {source}: {err}");
            thread::sleep(Duration::from_millis(10));
        }
    }
    connect_socket(socket, to)
}

fn connect_from_source(source: &str, to: SocketAddr) -> TcpStream {
    socket2_client(to, Some(source.parse().unwrap()))
}

/// The paired case stays paired through every wake-up pattern above (the
/// counters prove the shortcut), FIONREAD counts the redirected bytes, and
/// MSG_PEEK sees them.
#[test]
fn a_paired_connection_is_observed_like_plain_tcp() {
    let Some(env) = privileged_env() else { return };
    let guard = env.attach(|b| b);
    for addr in ADDRS {
        let before = guard.stats().unwrap();
        let (mut c, mut s) = connected_pair(addr);
        let no_sleep = Duration::ZERO;
        let runs = [
            epoll_reader(&c, &s, PACED, Reader::Edge { sleep: no_sleep }),
            epoll_reader(&c, &s, TINY_UNPACED, Reader::Level { sleep: SLEEPY }),
            epoll_reader(&c, &s, TINY_UNPACED, Reader::Edge { sleep: SLEEPY }),
        ];
        let (peeked, read) = peek_then_read(&mut c, &mut s);
        assert_eq!(
            (&peeked[..], &read[..]),
            (&b"peekaboo"[..], &b"peekaboo"[..])
        );
        let d = guard.stats().unwrap().since(&before);
        let sent = PACED.0 * PACED.1 + 2 * TINY_UNPACED.0 * TINY_UNPACED.1;
        // FIONREAD ignores redirected bytes on some kernels (probe(): 6.1).
        let counted = fionread_counts_redirected();
        let runs = runs.map(|(zero, got)| (counted && zero > 0, got));
        assert_eq!(
            runs,
            [
                (false, PACED.0 * PACED.1),
                (false, TINY_UNPACED.0 * TINY_UNPACED.1),
                (false, TINY_UNPACED.0 * TINY_UNPACED.1)
            ],
            "{addr}: (FIONREAD said 0 with bytes queued, bytes read) per run"
        );
        assert_eq!(d.sockets_inserted, 2, "{addr}: {d}");
        assert_eq!(d.bytes_redirected, (sent + 8) as u64, "{addr}: {d}");
        assert_eq!(d.bytes_passed, 0, "{addr}: {d}");
    }
}

/// The client's peer is across a veth in another network namespace, with
/// no namespace group: the server's key for its peer carries its own
/// namespace, so it never pairs; the client leaves the map.
#[test]
fn peer_across_a_veth_in_another_namespace() {
    let Some(env) = privileged_env() else { return };
    let (client_ns, server_ns) = (new_netns(), new_netns());
    let (here, there) = veth_between(&client_ns, &server_ns, "10.202.0.1/24", "10.202.0.2/24");
    client_ns.add_addr(&here, "fd00:202::1/64");
    server_ns.add_addr(&there, "fd00:202::2/64");
    let guard = env.attach(|b| b);
    for (server, plain_addr) in [("10.202.0.2:0", ADDRS[0]), ("[fd00:202::2]:0", ADDRS[1])] {
        let listener = server_ns.run(move || TcpListener::bind(server).unwrap());
        let to = listener.local_addr().unwrap();
        let make = || {
            let client = client_ns.run(move || connect(to));
            let (server, _) = listener.accept().unwrap();
            (client, server)
        };
        same_as_plain_and_counted(&env, &guard, plain_addr, &make, (1, 1, 1));
    }
}

/// Bytes a `send()` queued as plain TCP while the socket was still
/// connecting (the kernel picks the send path before the socket joins the
/// map) and that TCP has not sent yet (`MSG_MORE` holds them) must not be
/// overtaken by the next `send()`, which takes the shortcut. The client's
/// SYN is held back by a full accept queue, so its first `send()` waits in
/// the connect and then queues plain bytes.
#[test]
fn bytes_corked_by_a_send_made_while_connecting_are_not_overtaken() {
    use socket2::{Domain, Protocol, Socket, Type};
    let Some(env) = privileged_env() else { return };
    for addr in ADDRS {
        let guard = env.attach(|b| b);
        let listener = socket2::Socket::new(
            Domain::for_address(addr.parse::<SocketAddr>().unwrap()),
            Type::STREAM,
            Some(Protocol::TCP),
        )
        .unwrap();
        listener
            .bind(&addr.parse::<SocketAddr>().unwrap().into())
            .unwrap();
        listener.listen(0).unwrap();
        let listener = TcpListener::from(listener);
        let to = listener.local_addr().unwrap();
        // Fills the accept queue: the next SYN is dropped, then retried.
        let filler = connect(to);
        thread::sleep(Duration::from_millis(50));
        let client =
            Socket::new(Domain::for_address(to), Type::STREAM, Some(Protocol::TCP)).unwrap();
        client.set_nonblocking(true).unwrap();
        match client.connect(&to.into()) {
            Err(e) if e.raw_os_error() == Some(nix::libc::EINPROGRESS) => {}
            other => panic!("{addr}: connect: {other:?}"),
        }
        client.set_nonblocking(false).unwrap();
        let sender = thread::spawn(move || {
            // Waits for the connection, then queues plain bytes, held.
            client
                .send_with_flags(b"first ", nix::libc::MSG_MORE)
                .unwrap();
            // The connection's last ACK waited to ride on these bytes (a
            // writer was pending); it leaves on its own within 200 ms, and
            // the server's socket then joins.
            thread::sleep(Duration::from_millis(300));
            client.send(b"second").unwrap();
            client.shutdown(Shutdown::Write).unwrap();
        });
        thread::sleep(Duration::from_millis(100));
        drop(listener.accept().unwrap());
        drop(filler);
        let (mut server, _) = listener.accept().unwrap();
        sender.join().unwrap();
        let got = read_all(&mut server);
        let stats = guard.stats().unwrap();
        drop(guard);
        assert_eq!(
            String::from_utf8_lossy(&got),
            "first second",
            "{addr}: {stats}"
        );
        // The second send went plain: as late_plain once the server had
        // joined (what reordered before the fix, seen on this host), or,
        // when the timing differs, because the pair was never formed
        // (peer_missing, or the client taken out: unpaired_removed).
        assert_eq!(stats.msgs_redirected, 0, "{addr}: {stats}");
        assert_eq!(
            stats.late_plain + stats.peer_missing + stats.unpaired_removed,
            1,
            "{addr}: {stats}"
        );
        eprintln!(
            "{addr}: late_plain {}, peer_missing {}, unpaired_removed {}",
            stats.late_plain, stats.peer_missing, stats.unpaired_removed
        );
    }
}

/// How many of `connections` connections (made by `make`, the client
/// first) announced their first bytes with FIONREAD 0: the server writes
/// 100 bytes while the client spins on a zero-timeout `epoll_wait`, then
/// reads FIONREAD the moment it is woken. Returns that count.
fn first_bytes_announced_as_zero(
    connections: usize,
    make: &dyn Fn() -> (TcpStream, TcpStream),
) -> usize {
    let mut zero = 0;
    for _ in 0..connections {
        let (client, mut server) = make();
        client.set_nonblocking(true).unwrap();
        server.set_nodelay(true).unwrap();
        let epoll = Epoll::new(EpollCreateFlags::empty()).unwrap();
        epoll
            .add(&client, EpollEvent::new(EpollFlags::EPOLLIN, 0))
            .unwrap();
        let writer = thread::spawn(move || {
            thread::sleep(Duration::from_micros(200));
            server.write_all(&[9u8; 100]).unwrap();
            server
        });
        let mut events = [EpollEvent::empty()];
        let spinning_since = std::time::Instant::now();
        while epoll.wait(&mut events, EpollTimeout::ZERO).unwrap() == 0 {
            assert!(
                spinning_since.elapsed() < Duration::from_secs(2),
                "no bytes within 2 s"
            );
        }
        let announced = fionread(&client);
        let mut got = [0u8; 100];
        let mut read = 0;
        while read < got.len() {
            match (&client).read(&mut got[read..]) {
                Ok(0) => panic!("unexpected EOF"),
                Ok(n) => read += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => thread::yield_now(),
                Err(e) => panic!("read: {e}"),
            }
        }
        assert_eq!(got, [9u8; 100]);
        if announced == 0 {
            zero += 1;
        }
        drop(writer.join().unwrap());
    }
    zero
}

/// A waiting client whose server never joins leaves the map when the
/// server's first bytes arrive, before the kernel queues them and wakes
/// the reader. Before, it left at the ACK of those bytes, after the
/// wake-up: a reader that asked FIONREAD in between got 0 (the call picks
/// the map member's FIONREAD, then waits for the socket lock until the
/// removal, then finds no BPF queue), in 4,695 of 10,000 connections
/// with this spinning reader on 6.18.44 and in 142 of 60,000 with a
/// sleeping one; the pairing tests above had caught it once in CI.
#[test]
fn a_refused_client_leaves_before_its_first_bytes_are_announced() {
    const CONNECTIONS: usize = 300;
    let Some(env) = privileged_env() else { return };
    let (client_ns, server_ns) = (new_netns(), new_netns());
    veth_between(&client_ns, &server_ns, "10.204.0.1/24", "10.204.0.2/24");
    let guard = env.attach(|b| b);
    let outside: Vec<TcpListener> = ADDRS
        .iter()
        .map(|addr| env.cgroup.outside(|| TcpListener::bind(addr).unwrap()))
        .collect();
    let across = server_ns.run(|| TcpListener::bind("10.204.0.2:0").unwrap());
    for (what, listener, client_ns) in [
        ("IPv4, server outside the cgroup", &outside[0], None),
        ("IPv6, server outside the cgroup", &outside[1], None),
        ("server in another namespace", &across, Some(&client_ns)),
    ] {
        let to = listener.local_addr().unwrap();
        let make = || {
            let client = match client_ns {
                Some(ns) => ns.run(move || connect(to)),
                None => connect(to),
            };
            (client, listener.accept().unwrap().0)
        };
        let before = guard.stats().unwrap();
        let zero = first_bytes_announced_as_zero(CONNECTIONS, &make);
        let d = guard.stats().unwrap().since(&before);
        assert_eq!(
            zero, 0,
            "{what}: FIONREAD 0 at the wake-up, of {CONNECTIONS}"
        );
        assert_eq!(
            (d.sockets_inserted, d.unpaired_removed, d.bytes_redirected),
            (CONNECTIONS as u64, CONNECTIONS as u64, 0),
            "{what}: every client joined and left, nothing redirected: {d}"
        );
    }
    assert_eq!(guard.socket_count(), 0);
}
