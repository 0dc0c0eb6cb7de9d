//! Bytes take the shortcut, intact, for IPv4, IPv6 and dual-stack.

mod common;
use common::*;

const SIZE: usize = 64 << 20;

fn assert_redirected_both_ways(listen: &str, connect: Option<&str>) {
    let Some(env) = privileged_env() else { return };
    let guard = env.attach(|b| b);
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
