//! Namespaces, detaching, connection churn, a full map, guards side by side.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use socket2::{Domain, Socket, Type};

const LISTEN: &str = "127.0.0.1:5555";
const CLIENT: &str = "127.0.0.1:6666";

/// A connection with fixed 4-tuple 127.0.0.1:6666 -> 127.0.0.1:5555.
fn fixed_tuple_pair() -> (TcpStream, TcpStream) {
    let listener = TcpListener::bind(LISTEN).unwrap();
    let client = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    client.set_reuse_address(true).unwrap();
    client
        .bind(&CLIENT.parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let client = connect_socket(client, LISTEN.parse().unwrap());
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

#[test]
fn identical_tuples_in_two_netns_never_meet() {
    let Some(env) = privileged_env() else { return };
    let guard = env.attach(unbounded_queue);
    let (ns1, ns2) = (new_netns(), new_netns());
    // Both connections exist at once, with the same addresses and ports.
    let (c1, s1) = ns1.run(fixed_tuple_pair);
    let (c2, s2) = ns2.run(fixed_tuple_pair);
    assert_eq!(c1.local_addr().unwrap(), c2.local_addr().unwrap());
    assert_eq!(
        guard.socket_count(),
        4,
        "four distinct keys: {}",
        guard.stats().unwrap()
    );

    const SIZE: usize = 8 << 20;
    let t1 =
        thread::spawn(move || exchange(c1, s1, random_bytes(SIZE, 11), random_bytes(SIZE, 12)));
    let t2 =
        thread::spawn(move || exchange(c2, s2, random_bytes(SIZE, 21), random_bytes(SIZE, 22)));
    t1.join().expect("namespace 1 got only its own bytes");
    t2.join().expect("namespace 2 got only its own bytes");
    let stats = guard.stats().unwrap();
    assert_eq!(stats.sockets_inserted, 4, "{stats}");
    assert_eq!(stats.insert_failed, 0, "{stats}");
    assert_eq!(stats.bytes_redirected, 4 * SIZE as u64, "{stats}");
}

#[test]
fn detach_mid_transfer_loses_nothing_and_the_pair_stays_on_the_shortcut() {
    let Some(env) = privileged_env() else { return };
    let baseline = loaded_programs();
    let guard = env.attach(unbounded_queue);
    let reader = guard.stats_reader().unwrap();
    let (client, mut server) = connected_pair("127.0.0.1:0");
    const SIZE: usize = 16 << 20;
    let data = random_bytes(SIZE, 99);
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let writer = {
        let mut client = client.try_clone().unwrap();
        let data = data.clone();
        thread::spawn(move || {
            client.write_all(&data[..SIZE / 2]).unwrap();
            rx.recv().unwrap(); // wait until the guard is gone
            client.write_all(&data[SIZE / 2..]).unwrap();
            client.shutdown(Shutdown::Write).unwrap();
        })
    };
    // Let redirected bytes pile up unread in the server's queue (counted by
    // the programs: FIONREAD does not count them on every kernel).
    let mut queued = 0;
    for _ in 0..500 {
        queued = reader.read().unwrap().bytes_redirected;
        if queued >= 1 << 20 {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    assert!(
        queued >= 1 << 20,
        "bytes queued unread before detach: {queued}"
    );
    let at_detach = guard.detach().unwrap();
    assert!(at_detach.bytes_redirected >= queued, "{at_detach}");
    tx.send(()).unwrap();

    let got = read_all(&mut server);
    writer.join().unwrap();
    assert_bytes_eq(&got, &data, "bytes across detach, in order");
    // Detaching stops new insertions only: switching a pair to plain TCP
    // would put plain bytes into map members, which misreport FIONREAD.
    let total = reader.read().unwrap();
    assert_eq!(total.bytes_redirected, SIZE as u64, "{total}");
    assert_eq!(total.bytes_passed, 0, "{total}");

    // A connection made after detach is not selected at all.
    let (c, s) = connected_pair("127.0.0.1:0");
    exchange(c, s, random_bytes(1 << 20, 5), random_bytes(1 << 20, 6));
    let later = reader.read().unwrap().since(&total);
    assert_eq!(later.sockets_inserted, 0, "{later}");
    assert_eq!(later.bytes_redirected, 0, "{later}");

    // The pair kept the programs loaded after detach; once it closes, the
    // kernel frees them.
    assert!(
        !loaded_programs().is_subset(&baseline),
        "the open pair holds the programs"
    );
    drop((client, server));
    assert_nothing_left(&env.cgroup.cgroup(), &baseline);
}

#[test]
fn ten_thousand_short_connections_then_an_empty_map() {
    let Some(env) = privileged_env() else { return };
    let guard = env.attach(|b| b);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    const N: usize = 10_000;
    let server = thread::spawn(move || {
        for _ in 0..N {
            let (mut s, _) = listener.accept().unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            s.write_all(&b).unwrap();
        }
    });
    for i in 0..N {
        let mut c = connect(addr);
        c.write_all(&[i as u8]).unwrap();
        let mut b = [0u8; 1];
        c.read_exact(&mut b).unwrap();
        assert_eq!(b[0], i as u8);
    }
    server.join().unwrap();
    assert_eq!(wait_map_empty(&guard), 0, "map empty once all closed");
    // Each connection paired, or (when the client's byte left before its
    // server was established: seen under emulation on 6.1) fell back whole:
    // the client missed, left the map, and both bytes went plain.
    let s = guard.stats().unwrap();
    let fell_back = s.peer_missing;
    let paired = N as u64 - fell_back;
    assert_eq!(
        (s.unpaired_removed, s.unpaired_skipped, s.insert_failed),
        (fell_back, fell_back, 0),
        "{s}"
    );
    assert_eq!(s.sockets_inserted, 2 * paired + fell_back, "{s}");
    assert_eq!(s.bytes_redirected, 2 * paired, "{s}");
    // The client's byte passed its program; the server was never in the
    // map, so its reply ran no program at all.
    assert_eq!(s.bytes_passed, fell_back, "{s}");
    assert!(paired >= N as u64 / 2, "most connections pair: {s}");
}

#[test]
fn full_map_leaves_new_connections_on_plain_tcp() {
    let Some(env) = privileged_env() else { return };
    let guard = env.attach(|b| b.capacity(3));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    const SIZE: usize = 1 << 20;

    // First connection: both sockets fit.
    let (c1, s1) = connect_to(&listener);
    let first = guard.stats().unwrap();
    assert_eq!(first.sockets_inserted, 2, "{first}");
    // Second: the client takes the last slot, the server is refused, so
    // the client leaves the map again (it never paired). Third: the same.
    let (c2, s2) = connect_to(&listener);
    let (c3, s3) = connect_to(&listener);
    let before = guard.stats().unwrap();
    assert_eq!(before.sockets_inserted, 4, "{before}");
    assert_eq!(before.insert_failed, 2, "{before}");
    assert_eq!(before.unpaired_removed, 2, "{before}");
    assert_eq!(guard.socket_count(), 2, "only the first pair is left");

    exchange(c2, s2, random_bytes(SIZE, 1), random_bytes(SIZE, 2));
    exchange(c3, s3, random_bytes(SIZE, 3), random_bytes(SIZE, 4));
    let plain = guard.stats().unwrap().since(&before);
    assert_eq!(plain.bytes_redirected, 0, "{plain}");
    assert_eq!(
        plain.bytes_passed, 0,
        "the removed sockets have no sk_msg program left: {plain}"
    );
    exchange(c1, s1, random_bytes(SIZE, 5), random_bytes(SIZE, 6));
    let d = guard.stats().unwrap().since(&before);
    assert_eq!(
        d.bytes_redirected,
        2 * SIZE as u64,
        "the pair that fit is redirected: {d}"
    );
}

#[test]
fn guards_side_by_side_on_sibling_and_same_cgroups() {
    let Some(env) = privileged_env() else { return };
    let sibling = env.cgroup.sibling();
    let here = env.attach(|b| b);
    let there = sockmap_fastpath::Accelerator::builder()
        .cgroup(sibling.cgroup().clone())
        .splice_guard(sockmap_fastpath::SpliceGuard::Off)
        .attach()
        .unwrap();
    const SIZE: usize = 1 << 20;

    let (c, s) = connected_pair("127.0.0.1:0");
    exchange(c, s, random_bytes(SIZE, 1), random_bytes(SIZE, 2));
    assert_eq!(here.stats().unwrap().bytes_redirected, 2 * SIZE as u64);
    assert_eq!(there.stats().unwrap().sockets_inserted, 0);

    sibling.add_process(std::process::id()).unwrap();
    let (c, s) = connected_pair("127.0.0.1:0");
    env.cgroup.cgroup().add_process(std::process::id()).unwrap();
    exchange(c, s, random_bytes(SIZE, 3), random_bytes(SIZE, 4));
    assert_eq!(there.stats().unwrap().bytes_redirected, 2 * SIZE as u64);
    assert_eq!(
        here.stats().unwrap().bytes_redirected,
        2 * SIZE as u64,
        "unchanged"
    );

    // A second guard on the same cgroup: a socket joins only one map (the
    // kernel refuses a second sk_msg program), the bytes still flow once.
    let second = env.attach(|b| b);
    let before = (here.stats().unwrap(), second.stats().unwrap());
    let (c, s) = connected_pair("127.0.0.1:0");
    exchange(c, s, random_bytes(SIZE, 5), random_bytes(SIZE, 6));
    let d_here = here.stats().unwrap().since(&before.0);
    let d_second = second.stats().unwrap().since(&before.1);
    assert_eq!(
        d_here.sockets_inserted, 2,
        "first attached runs first: {d_here}"
    );
    assert_eq!(
        (d_second.insert_failed, d_second.unpaired_skipped),
        (1, 1),
        "the client is refused, so the server does not join: {d_second}"
    );
    assert_eq!(
        d_here.bytes_redirected + d_second.bytes_redirected,
        2 * SIZE as u64
    );
}
