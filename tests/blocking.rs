//! Blocking sockets. A blocking read of a socket in the socket map fails
//! with EAGAIN when another thread's activity on that socket wakes it with
//! nothing queued (the kernel's tcp_bpf_recvmsg); plain TCP waits again.
//! Thread-per-direction programs treat that as fatal, so connections from
//! sockets that are blocking at connect() stay plain by default
//! (`BlockingSockets::KeepPlain`). Every read error here is counted in
//! `SPURIOUS_EAGAIN` (and retried, so the transfer can still be checked).

mod common;
use common::*;
use support::sockopt::readable_within;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::Ordering;
use std::thread;

use sockmap_fastpath::{BlockingSockets, Stats};

const ADDRS: [&str; 2] = ["127.0.0.1:0", "[::1]:0"];
const TRANSFERS: u64 = 20;
const EACH_WAY: usize = 4 << 20;

/// `transfers` duplex exchanges of 4 MiB each way between a blocking
/// client (std's blocking connect) and its accepted socket, one thread
/// reading and another writing each socket. Returns the EAGAIN count.
fn blocking_duplex(addr: &str, transfers: u64) -> u32 {
    SPURIOUS_EAGAIN.store(0, Ordering::Relaxed);
    let listener = TcpListener::bind(addr).unwrap();
    for i in 0..transfers {
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        exchange(
            client,
            server,
            random_bytes(EACH_WAY, i),
            random_bytes(EACH_WAY, i + 1000),
        );
    }
    SPURIOUS_EAGAIN.load(Ordering::Relaxed)
}

#[test]
fn blocking_duplex_transfers_stay_plain_and_never_see_eagain() {
    let Some(env) = privileged_env() else { return };
    for addr in ADDRS {
        let guard = env.attach(|b| b);
        let eagain = blocking_duplex(addr, TRANSFERS);
        let stats = guard.stats().unwrap();
        assert_eq!(eagain, 0, "{addr}: a blocking read failed with EAGAIN");
        // Each client kept out at establishment, and so its accepted peer.
        assert_eq!(
            (
                stats.blocking_skipped,
                stats.unpaired_skipped,
                stats.sockets_inserted,
                stats.bytes_redirected
            ),
            (TRANSFERS, TRANSFERS, 0, 0),
            "{addr}: {stats}"
        );
    }
}

/// The opt-in: the same blocking connections are accelerated (the EAGAIN
/// count varies from run to run, so it is reported, not asserted).
#[test]
fn accelerate_opts_blocking_connections_in() {
    let Some(env) = privileged_env() else { return };
    let guard = env.attach(|b| b.blocking_sockets(BlockingSockets::Accelerate));
    let transfers = 5;
    let eagain = blocking_duplex(ADDRS[0], transfers);
    let stats = guard.stats().unwrap();
    eprintln!(
        "BlockingSockets::Accelerate: {eagain} spurious EAGAIN in {transfers} duplex transfers"
    );
    assert_eq!(
        (stats.blocking_skipped, stats.sockets_inserted),
        (0, 2 * transfers),
        "{stats}"
    );
    assert_eq!(
        stats.bytes_redirected,
        2 * transfers * EACH_WAY as u64,
        "{stats}"
    );
}

/// Copies `from` to `to` until EOF, then half-closes `to`.
fn pump(mut from: TcpStream, mut to: TcpStream) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match read_some(&mut from, &mut buf) {
            0 => break,
            n => to.write_all(&buf[..n]).expect("relay write"),
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// Two threads per connection, one per direction.
fn spawn_both_ways(a: TcpStream, b: TcpStream) {
    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    thread::spawn(move || pump(a, b));
    thread::spawn(move || pump(b2, a2));
}

/// An echo connection served by a reading thread that hands what it reads
/// to a writing thread.
fn echo_thread_per_direction(conn: TcpStream) {
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let mut writer = conn.try_clone().unwrap();
    thread::spawn(move || {
        for chunk in rx {
            writer.write_all(&chunk).expect("echo write");
        }
        let _ = writer.shutdown(Shutdown::Write);
    });
    let mut reader = conn;
    thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match read_some(&mut reader, &mut buf) {
                0 => break,
                n => tx.send(buf[..n].to_vec()).unwrap(),
            }
        }
    });
}

/// client -> relay -> echo server, all blocking, thread per direction
/// everywhere, 20 transfers of 4 MiB each way.
#[test]
fn thread_per_direction_relay_stays_intact() {
    let Some(env) = privileged_env() else { return };
    for addr in ADDRS {
        SPURIOUS_EAGAIN.store(0, Ordering::Relaxed);
        let guard = env.attach(|b| b);
        let echo = TcpListener::bind(addr).unwrap();
        let relay = TcpListener::bind(addr).unwrap();
        let echo_addr = echo.local_addr().unwrap();
        let relay_addr = relay.local_addr().unwrap();
        thread::spawn(move || {
            for conn in echo.incoming() {
                echo_thread_per_direction(conn.unwrap());
            }
        });
        thread::spawn(move || {
            for down in relay.incoming() {
                let up = TcpStream::connect(echo_addr).unwrap();
                spawn_both_ways(down.unwrap(), up);
            }
        });
        for i in 0..TRANSFERS {
            let data = random_bytes(EACH_WAY, i);
            let mut client = TcpStream::connect(relay_addr).unwrap();
            let mut writer = client.try_clone().unwrap();
            let sent = data.clone();
            let w = thread::spawn(move || {
                writer.write_all(&sent).unwrap();
                writer.shutdown(Shutdown::Write).unwrap();
            });
            let got = read_all(&mut client);
            w.join().unwrap();
            assert_bytes_eq(&got, &data, &format!("{addr}: transfer {i} echoed"));
        }
        let stats: Stats = guard.stats().unwrap();
        assert_eq!(SPURIOUS_EAGAIN.load(Ordering::Relaxed), 0, "{addr}: EAGAIN");
        // Client -> relay and relay -> echo: both blocking connects.
        assert_eq!(
            (
                stats.blocking_skipped,
                stats.sockets_inserted,
                stats.bytes_redirected
            ),
            (2 * TRANSFERS, 0, 0),
            "{addr}: {stats}"
        );
    }
}

/// What the library cannot see at connect(): a socket connected
/// non-blocking and then set blocking, and a blocking accepted socket. Such
/// pairs stay on the shortcut and are counted at their first send; a pair
/// that stays non-blocking is not.
#[test]
fn paired_sockets_found_blocking_are_counted() {
    let Some(env) = privileged_env() else { return };
    for addr in ADDRS {
        let guard = env.attach(|b| b);
        // Both blocking at their first send.
        let (mut client, mut server) = connected_pair(addr);
        client.write_all(b"q").unwrap();
        server.read_exact(&mut [0u8; 1]).unwrap();
        server.write_all(b"r").unwrap();
        client.read_exact(&mut [0u8; 1]).unwrap();
        let blocking = guard.stats().unwrap();
        // Both non-blocking throughout.
        let (client, server) = connected_pair(addr);
        client.set_nonblocking(true).unwrap();
        server.set_nonblocking(true).unwrap();
        for (mut from, mut to) in [(&client, &server), (&server, &client)] {
            from.write_all(b"x").unwrap();
            assert!(readable_within(to, 2000));
            to.read_exact(&mut [0u8; 1]).unwrap();
        }
        let both = guard.stats().unwrap();
        assert_eq!(
            (blocking.sockets_inserted, blocking.bytes_redirected),
            (2, 2),
            "{addr}: {blocking}"
        );
        assert_eq!(blocking.blocking_paired, 2, "{addr}: {blocking}");
        assert_eq!(both.since(&blocking).bytes_redirected, 2, "{addr}: {both}");
        assert_eq!(
            both.blocking_paired, 2,
            "{addr}: non-blocking counted: {both}"
        );
    }
}
