//! Bytes take the shortcut, intact, for IPv4, IPv6 and dual-stack.

mod common;
use common::*;
use support::sockopt::set_int_option;

const SIZE: usize = 64 << 20;

fn assert_redirected_both_ways(listen: &str, connect: Option<&str>) {
    let Some(env) = privileged_env() else { return };
    let guard = env.attach(unbounded_queue);
    let before = guard.stats().unwrap();
    let listener = std::net::TcpListener::bind(listen).unwrap();
    let (client, server) = match connect {
        Some(addr) => {
            let port = listener.local_addr().unwrap().port();
            connect_from(&listener, format!("{addr}:{port}").parse().unwrap())
        }
        None => connect_to(&listener),
    };
    assert_eq!(guard.socket_count(), 2, "both ends in the socket map");
    exchange_all_redirected(&guard, &before, client, server, SIZE);
    assert_eq!(wait_map_empty(&guard), 0, "entries leave the map on close");
}

#[test]
fn ipv4_64mib_each_way_redirected() {
    assert_redirected_both_ways("127.0.0.1:0", None);
}

#[test]
fn ipv6_64mib_each_way_redirected() {
    assert_redirected_both_ways("[::1]:0", None);
}

#[test]
fn ipv4_client_of_dual_stack_listener_pairs() {
    // std binds [::] dual-stack (IPV6_V6ONLY off by default on Linux).
    assert_redirected_both_ways("[::]:0", Some("127.0.0.1"));
}

/// docs/selection.md: a socket joins only if no data has moved on it yet. With TCP
/// Fast Open the client's first bytes ride in the SYN, so the connection
/// stays plain (`late_skipped`), intact.
#[test]
fn tcp_fast_open_data_keeps_the_connection_plain() {
    use std::io::{Read, Write};
    let Some(env) = privileged_env() else { return };
    // TFO is configured per network namespace: a fresh one, with client
    // and server on and no cookies needed (0x1 | 0x2 | 0x4 | 0x200).
    let ns = new_netns();
    ns.run(|| std::fs::write("/proc/sys/net/ipv4/tcp_fastopen", "519"))
        .expect("enable TCP Fast Open in the test namespace");
    let guard = env.attach(|b| b);
    let (mut client, mut server) = ns.run(|| {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        set_int_option(
            &listener,
            nix::libc::IPPROTO_TCP,
            nix::libc::TCP_FASTOPEN,
            16,
        );
        let to = socket2::SockAddr::from(listener.local_addr().unwrap());
        let socket =
            socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
        // Non-blocking like an event loop's (a blocking connect would stay
        // plain for that reason alone: tests/blocking.rs).
        socket.set_nonblocking(true).unwrap();
        let sent = socket
            .send_to_with_flags(b"in the SYN", &to, nix::libc::MSG_FASTOPEN)
            .expect("sendto(MSG_FASTOPEN)");
        assert_eq!(sent, 10);
        let (server, _) = listener.accept().unwrap();
        socket.set_nonblocking(false).unwrap();
        (std::net::TcpStream::from(socket), server)
    });
    let mut first = [0u8; 10];
    server.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"in the SYN");
    client.write_all(b"after").unwrap();
    server.write_all(b"reply").unwrap();
    let (mut a, mut b) = ([0u8; 5], [0u8; 5]);
    server.read_exact(&mut a).unwrap();
    client.read_exact(&mut b).unwrap();
    assert_eq!((&a, &b), (b"after", b"reply"));
    // The client sent in its SYN: skipped. The server (established at the
    // SYN for TFO, before its data is counted) finds no waiting peer.
    let s = guard.stats().unwrap();
    assert_eq!(
        (s.late_skipped, s.unpaired_skipped, s.sockets_inserted),
        (1, 1, 0),
        "{s}"
    );
    assert_eq!(s.bytes_redirected, 0, "{s}");
    assert_eq!(guard.socket_count(), 0, "{s}");
}
