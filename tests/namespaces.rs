//! Namespace groups: connections between network namespaces that share one
//! address space (joined by veth) are paired, and identical 4-tuples in
//! different groups still never meet.

mod common;
use common::*;

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};

use sockmap_fastpath::Error;

/// A client in `client_ns` (bound to `from`, if given) connected to a
/// server in `server_ns` listening on `to`.
fn pair_across(
    client_ns: &NetNs,
    server_ns: &NetNs,
    from: Option<SocketAddr>,
    to: SocketAddr,
) -> (TcpStream, TcpStream) {
    let listener = server_ns.run(move || TcpListener::bind(to).unwrap());
    let client = client_ns.run(move || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        if let Some(from) = from {
            socket.set_reuse_address(true)?;
            socket.bind(&from.into())?;
        }
        std::io::Result::Ok(connect_socket(socket, to))
    });
    let client = client.expect("a client socket");
    let (server, _) = listener.accept().unwrap();
    (client, server)
}

fn joined() -> (NetNs, NetNs) {
    let (a, b) = (new_netns(), new_netns());
    veth_between(&a, &b, "10.201.0.1/24", "10.201.0.2/24");
    (a, b)
}

const SERVER: &str = "10.201.0.2:7000";

#[test]
fn connections_between_grouped_namespaces_are_accelerated() {
    let Some(env) = privileged_env() else { return };
    let (a, b) = joined();
    let guard =
        env.attach(|builder| unbounded_queue(builder.namespace_group([a.path(), b.path()])));
    let before = guard.stats().unwrap();
    let (client, server) = pair_across(&a, &b, None, SERVER.parse().unwrap());
    // Every byte takes the shortcut across the veth.
    exchange_all_redirected(&guard, &before, client, server, 8 << 20);
}

#[test]
fn without_a_group_namespaces_stay_apart() {
    let Some(env) = privileged_env() else { return };
    let (a, b) = joined();
    let guard = env.attach(|builder| builder);
    let before = guard.stats().unwrap();
    let (client, server) = pair_across(&a, &b, None, SERVER.parse().unwrap());
    exchange(
        client,
        server,
        random_bytes(1 << 20, 33),
        random_bytes(1 << 20, 34),
    );
    let counters = delta(&guard, &before);
    assert_eq!(counters.bytes_redirected, 0, "{counters}");
    // The server's key for its peer carries its own namespace: no pair, so
    // it stays out, and the client leaves the map as soon as it learns.
    assert_eq!(counters.sockets_inserted, 1, "the client only: {counters}");
    assert_eq!(counters.unpaired_skipped, 1, "{counters}");
    assert_eq!(counters.unpaired_removed, 1, "{counters}");
    assert_eq!(guard.socket_count(), 0, "nobody left in the map");
}

/// Two groups with the same addresses and the same 4-tuple: each client's
/// bytes reach its own server only.
#[test]
fn identical_four_tuples_in_two_groups_never_meet() {
    let Some(env) = privileged_env() else { return };
    let ((a1, b1), (a2, b2)) = (joined(), joined());
    let guard = env.attach(|builder| {
        builder
            .namespace_group([a1.path(), b1.path()])
            .namespace_group([a2.path(), b2.path()])
    });
    let before = guard.stats().unwrap();
    let from: SocketAddr = "10.201.0.1:40000".parse().unwrap();
    let (mut c1, mut s1) = pair_across(&a1, &b1, Some(from), SERVER.parse().unwrap());
    let (mut c2, mut s2) = pair_across(&a2, &b2, Some(from), SERVER.parse().unwrap());
    assert_eq!(c1.local_addr().unwrap(), c2.local_addr().unwrap());
    let (d1, d2) = (random_bytes(1 << 20, 35), random_bytes(1 << 20, 36));
    c1.write_all(&d1).unwrap();
    c2.write_all(&d2).unwrap();
    c1.shutdown(Shutdown::Write).unwrap();
    c2.shutdown(Shutdown::Write).unwrap();
    assert_bytes_eq(&read_all(&mut s1), &d1, "group 1's server");
    assert_bytes_eq(&read_all(&mut s2), &d2, "group 2's server");
    let counters = delta(&guard, &before);
    assert_eq!(counters.sockets_inserted, 4, "{counters}");
    assert_eq!(counters.bytes_redirected, 2 << 20, "{counters}");
}

#[test]
fn bad_groups_are_refused_and_nothing_is_attached() {
    let Some(env) = privileged_env() else { return };
    let baseline = loaded_programs();
    let (a, b) = joined();
    let cases: [(Vec<std::path::PathBuf>, &str); 3] = [
        (vec![a.path()], "at least two"),
        (vec![a.path(), a.path()], "already in a group"),
        (
            vec![a.path(), "/etc/hostname".into()],
            "not a network namespace",
        ),
    ];
    for (group, why) in cases {
        let err = env.builder().namespace_group(group).attach().unwrap_err();
        assert!(matches!(err, Error::NamespaceGroup { .. }), "{err}");
        assert!(err.to_string().contains(why), "{err}");
    }
    let err = env
        .builder()
        .namespace_group([b.path(), a.path()])
        .namespace_group(["/nonexistent/netns".into(), a.path()])
        .attach()
        .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/netns"), "{err}");
    assert_nothing_left(&env.cgroup.cgroup(), &baseline);
}
