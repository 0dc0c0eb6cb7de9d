//! Each policy knob: a matching connection is redirected, a non-matching one
//! works over plain TCP and is counted as skipped, never redirected.

mod common;
use common::*;

use std::net::TcpListener;

use sockmap_fastpath::{Cidr, Error, FastpathGuard, Stats};

const SIZE: usize = 1 << 20;

/// Runs one exchange on a new connection to `listener` and returns the
/// counter deltas it caused.
fn exchange_on(guard: &FastpathGuard, listener: &TcpListener, seed: u64) -> Stats {
    let before = guard.stats().unwrap();
    let (client, server) = connect_to(listener);
    exchange(
        client,
        server,
        random_bytes(SIZE, seed),
        random_bytes(SIZE, seed + 1),
    );
    wait_map_empty(guard);
    delta(guard, &before)
}

fn assert_accelerated(d: &Stats) {
    assert_eq!(d.sockets_inserted, 2, "{d}");
    assert_eq!(d.bytes_redirected, 2 * SIZE as u64, "{d}");
    assert_eq!(d.policy_skipped, 0, "{d}");
}

fn assert_plain(d: &Stats) {
    assert_eq!(d.sockets_inserted, 0, "{d}");
    assert_eq!(d.bytes_redirected, 0, "{d}");
    assert_eq!(d.msgs_redirected, 0, "{d}");
    assert_eq!(d.policy_skipped, 2, "both ends skipped: {d}");
}

#[test]
fn ports_select_by_local_or_remote_port() {
    let Some(env) = privileged_env() else { return };
    let selected = TcpListener::bind("127.0.0.1:0").unwrap();
    let other = TcpListener::bind("127.0.0.1:0").unwrap();
    let guard = env.attach(|b| b.ports([selected.local_addr().unwrap().port()]));
    assert_accelerated(&exchange_on(&guard, &selected, 10));
    assert_plain(&exchange_on(&guard, &other, 20));
}

#[test]
fn cidr_selects_by_peer_address_v4_and_v6() {
    let Some(env) = privileged_env() else { return };
    let v4 = TcpListener::bind("127.0.0.1:0").unwrap();
    let v6 = TcpListener::bind("[::1]:0").unwrap();
    let guard = env.attach(|b| b.cidr("127.0.0.0/8".parse().unwrap()));
    assert_accelerated(&exchange_on(&guard, &v4, 30));
    assert_plain(&exchange_on(&guard, &v6, 40));
    drop(guard);

    let guard = env.attach(|b| b.cidr("::1/128".parse().unwrap()));
    assert_accelerated(&exchange_on(&guard, &v6, 50));
    assert_plain(&exchange_on(&guard, &v4, 60));
}

/// docs/selection.md: IPv4 addresses are matched as IPv4-mapped IPv6, so 127.0.0.0/8
/// also selects an IPv4 client of a dual-stack `[::]` listener (the
/// accepted socket's peer is ::ffff:127.0.0.1).
#[test]
fn an_ipv4_cidr_matches_clients_of_a_dual_stack_listener() {
    let Some(env) = privileged_env() else { return };
    let listener = TcpListener::bind("[::]:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let guard = env.attach(|b| b.cidr("127.0.0.0/8".parse().unwrap()));
    let before = guard.stats().unwrap();
    let (client, server) = connect_from(&listener, ([127, 0, 0, 1], port).into());
    assert!(server
        .peer_addr()
        .unwrap()
        .to_string()
        .starts_with("[::ffff:127.0.0.1]"));
    exchange(
        client,
        server,
        random_bytes(SIZE, 41),
        random_bytes(SIZE, 42),
    );
    assert_accelerated(&delta(&guard, &before));
}

/// docs/selection.md: a listener created before `attach()` has no recorded owner, so a
/// comm policy does not match its connections (the client, made after,
/// is matched, waits, and is taken out again).
#[test]
fn a_comm_policy_does_not_match_listeners_from_before_attach() {
    let Some(env) = privileged_env() else { return };
    if !kernel_records_owners() {
        // Comm policies are refused there: the test below asserts that.
        not_run("no socket owners for comm policies (probe(): socket owners)");
        return;
    }
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let comm = std::fs::read_to_string("/proc/self/comm").unwrap();
    let guard = env.attach(|b| b.comm(comm.trim()));
    let d = exchange_on(&guard, &listener, 43);
    assert_eq!(d.bytes_redirected, 0, "{d}");
    assert_eq!(
        (d.sockets_inserted, d.unpaired_removed, d.policy_skipped),
        (1, 1, 1),
        "the client joined and left, the server was skipped: {d}"
    );
}

#[test]
fn comm_is_the_owning_process_not_the_thread() {
    let Some(env) = privileged_env() else { return };
    let process_comm = std::fs::read_to_string("/proc/self/comm")
        .unwrap()
        .trim()
        .to_owned();
    // Test threads carry the test's name as their comm; the policy must
    // look at the process name instead.
    let thread_comm = std::fs::read_to_string("/proc/thread-self/comm")
        .unwrap()
        .trim()
        .to_owned();
    assert_ne!(process_comm, thread_comm);
    if !kernel_records_owners() {
        // Before 6.10: refused, naming the feature, nothing attached.
        let baseline = loaded_programs();
        let err = env.builder().comm(process_comm).attach().unwrap_err();
        assert!(matches!(err, Error::KernelFeature { .. }), "{err:?}");
        assert!(err.to_string().contains("comm policies"), "{err}");
        // Not the splice guard: falling back to SpliceGuard::Off would not help.
        assert!(!err.is_splice_guard_refused(), "{err}");
        assert_nothing_left(&env.cgroup.cgroup(), &baseline);
        return;
    }

    let guard = env.attach(|b| b.comm(process_comm.clone()));
    // Listener created after attach: its owner is recorded at listen().
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    assert_accelerated(&exchange_on(&guard, &listener, 70));
    drop(guard);

    let guard = env.attach(|b| b.comm(thread_comm.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    assert_plain(&exchange_on(&guard, &listener, 80));
    drop(guard);

    let guard = env.attach(|b| b.comm("no-such-proc"));
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    assert_plain(&exchange_on(&guard, &listener, 90));
}

#[test]
fn knobs_combine_with_and() {
    let Some(env) = privileged_env() else { return };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let guard = env.attach(|b| b.ports([port]).cidr("10.0.0.0/8".parse().unwrap()));
    assert_plain(&exchange_on(&guard, &listener, 100));
    drop(guard);
    let guard = env.attach(|b| b.ports([port]).cidr("127.0.0.1/32".parse().unwrap()));
    assert_accelerated(&exchange_on(&guard, &listener, 110));
}

#[test]
fn live_policy_changes_apply_to_new_connections() {
    let Some(env) = privileged_env() else { return };
    let a = TcpListener::bind("127.0.0.1:0").unwrap();
    let b = TcpListener::bind("127.0.0.1:0").unwrap();
    let (port_a, port_b) = (
        a.local_addr().unwrap().port(),
        b.local_addr().unwrap().port(),
    );
    let mut guard = env.attach(|builder| builder.ports([port_a]));
    assert_plain(&exchange_on(&guard, &b, 120));

    guard.set_ports([port_b]).unwrap();
    assert_accelerated(&exchange_on(&guard, &b, 130));
    assert_plain(&exchange_on(&guard, &a, 140));

    guard.set_ports([]).unwrap(); // empty: every port
    assert_accelerated(&exchange_on(&guard, &a, 150));

    guard
        .set_cidrs(["192.168.0.0/16".parse::<Cidr>().unwrap()])
        .unwrap();
    assert_plain(&exchange_on(&guard, &a, 160));
    guard.set_cidrs([]).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    if kernel_records_owners() {
        guard.set_comms(["no-such-proc"]).unwrap();
        assert_plain(&exchange_on(&guard, &listener, 170));
    } else {
        let err = guard.set_comms(["no-such-proc"]).unwrap_err();
        assert!(matches!(err, Error::KernelFeature { .. }), "{err:?}");
    }
    guard.set_comms(Vec::<String>::new()).unwrap();
    assert_accelerated(&exchange_on(&guard, &listener, 180));

    let err = guard.set_ports([0]).unwrap_err();
    assert!(err.to_string().contains("port 0"), "{err}");
    let err = guard.set_comms(["far-too-long-process-name"]).unwrap_err();
    assert!(err.to_string().contains("longer than 15 bytes"), "{err}");
    // A refused change leaves the policy as it was (every connection).
    assert_accelerated(&exchange_on(&guard, &listener, 190));
}
