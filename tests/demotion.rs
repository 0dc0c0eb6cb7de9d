//! Streaming demotion (`AcceleratorBuilder::demote_streaming`): pairs that
//! stream small writes leave the shortcut mid-transfer, both sockets, with
//! both directions busy, and every byte arrives in order; request/response
//! pairs stay. The counters say which path the bytes took and that both
//! sockets left the socket map.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;

use sockmap_fastpath::{Error, FastpathGuard, RedirectMode, Stats, StreamingDemotion};

const EACH_WAY: usize = 64 << 20;

/// A guard with streaming demotion on (its defaults), or, where the
/// kernel lacks what it needs (before 6.2), the refusal checked and None.
fn demoting_guard(env: &Env) -> Option<FastpathGuard> {
    let attached = env
        .builder()
        .demote_streaming(StreamingDemotion::default())
        .attach();
    if kernel_at_least(6, 2) {
        return Some(attached.expect("attach with streaming demotion"));
    }
    let baseline = loaded_programs();
    match attached {
        Err(Error::KernelFeature { min_kernel, .. }) => assert_eq!(min_kernel, "6.2"),
        other => panic!("streaming demotion before 6.2: {other:?}"),
    }
    assert_nothing_left(&env.cgroup.cgroup(), &baseline);
    not_run("streaming demotion needs Linux 6.2 (refusal checked)");
    None
}

/// Whether the socket map emptied while `writer` was still running.
fn map_empty_before<T>(guard: &FastpathGuard, writer: &thread::JoinHandle<T>) -> bool {
    while !writer.is_finished() {
        if guard.socket_count() == 0 {
            return !writer.is_finished();
        }
        thread::sleep(std::time::Duration::from_millis(5));
    }
    false
}

/// Writes `data` in writes of `size` bytes, then half-closes.
fn write_in(mut s: TcpStream, data: Vec<u8>, size: usize) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        for chunk in data.chunks(size) {
            s.write_all(chunk).expect("write");
        }
        s.shutdown(Shutdown::Write).expect("shutdown");
    })
}

/// Sends `a_to_b` and `b_to_a` at once in writes of `size` bytes and
/// checks both arrive whole and in order; returns the counters' change and
/// how many sockets were still in the map before the pair closed.
fn stream_both_ways(
    guard: &FastpathGuard,
    size: usize,
    a_to_b: usize,
    b_to_a: usize,
) -> (Stats, usize) {
    let before = guard.stats().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = connect_to(&listener);
    let (sent_ab, sent_ba) = (random_bytes(a_to_b, 11), random_bytes(b_to_a, 12));
    let writers = [
        write_in(a.try_clone().unwrap(), sent_ab.clone(), size),
        write_in(b.try_clone().unwrap(), sent_ba.clone(), size),
    ];
    let (mut ra, mut rb) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let got_b = thread::spawn(move || read_all(&mut rb));
    let got_a = read_all(&mut ra);
    writers.into_iter().for_each(|w| w.join().unwrap());
    assert_bytes_eq(
        &got_b.join().unwrap(),
        &sent_ab,
        &format!("{size} B writes a -> b"),
    );
    assert_bytes_eq(&got_a, &sent_ba, &format!("{size} B writes b -> a"));
    let in_map = guard.socket_count();
    drop((a, b));
    (delta(guard, &before), in_map)
}

#[test]
fn pairs_streaming_both_ways_leave_the_shortcut_mid_transfer_and_lose_nothing() {
    let Some(env) = privileged_env() else { return };
    let Some(guard) = demoting_guard(&env) else {
        return;
    };
    for size in [64, 1024, 4096] {
        let (d, in_map) = stream_both_ways(&guard, size, EACH_WAY, EACH_WAY);
        println!("{size} B writes: {in_map} sockets left in the map; {d}");
        assert_eq!(d.sockets_inserted, 2, "{size} B: {d}");
        assert!(d.demote_requested >= 1, "{size} B: {d}");
        assert_eq!(d.demote_stopped, 2, "{size} B: {d}");
        assert_eq!(d.demoted_sockets, 2, "{size} B: {d}");
        assert_eq!(in_map, 0, "{size} B: both left the map before the end: {d}");
        // Both paths carried bytes: the shortcut before, plain TCP after.
        assert!(d.bytes_redirected > 0, "{size} B: {d}");
        // Once out of the map their sends skip the programs: most bytes
        // went by neither counter.
        assert!(
            d.bytes_redirected + d.bytes_passed < EACH_WAY as u64,
            "{size} B: {d}"
        );
        assert_eq!(d.demote_unprovable, 0, "{size} B: {d}");
    }
}

#[test]
fn a_one_way_stream_takes_its_idle_peer_off_too_mid_transfer() {
    let Some(env) = privileged_env() else { return };
    let Some(guard) = demoting_guard(&env) else {
        return;
    };
    let before = guard.stats().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (a, b) = connect_to(&listener);
    let sent = random_bytes(4 * EACH_WAY, 13);
    let mut rb = b.try_clone().unwrap();
    let reader = thread::spawn(move || read_all(&mut rb));
    let writer = write_in(a.try_clone().unwrap(), sent.clone(), 1024);
    // Both sockets leave while the writer still writes (not at its FIN).
    let left_while_writing = map_empty_before(&guard, &writer);
    writer.join().unwrap();
    assert_bytes_eq(&reader.join().unwrap(), &sent, "1 KiB writes, one way");
    let d = delta(&guard, &before);
    println!("one way, 1 KiB writes: left while writing: {left_while_writing}; {d}");
    assert!(left_while_writing, "{d}");
    assert_eq!(d.demote_requested, 1, "{d}");
    assert_eq!(d.demote_stopped, 2, "{d}");
    assert_eq!(d.demoted_sockets, 2, "{d}");
    assert!(d.bytes_redirected > 0, "{d}");
    // Once out of the map the writer's sends skip the programs: most bytes
    // went by neither counter.
    assert!(
        d.bytes_redirected + d.bytes_passed < sent.len() as u64 / 2,
        "{d}"
    );
    drop((a, b));
}

/// A request, then a streamed reply: the client's thread made the last
/// redirect into the server and then only reads, so nothing but its
/// changed user-entry frame (it has entered the kernel anew, to read)
/// proves that redirect landed (x86_64: the frame is read there).
#[test]
fn a_streamed_reply_after_a_request_leaves_the_shortcut_mid_transfer() {
    let Some(env) = privileged_env() else { return };
    let Some(guard) = demoting_guard(&env) else {
        return;
    };
    let before = guard.stats().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut client, server) = connect_to(&listener);
    let request = random_bytes(100, 14);
    let reply = random_bytes(4 * EACH_WAY, 15);
    client.write_all(&request).unwrap();
    let (mut rs, sent) = (server.try_clone().unwrap(), reply.clone());
    let writer = thread::spawn(move || {
        let mut got = vec![0u8; 100];
        rs.read_exact(&mut got).expect("read the request");
        for chunk in sent.chunks(1024) {
            rs.write_all(chunk).expect("write");
        }
        rs.shutdown(Shutdown::Write).expect("shutdown");
        got
    });
    let mut rc = client.try_clone().unwrap();
    let reader = thread::spawn(move || read_all(&mut rc));
    let left_while_writing = map_empty_before(&guard, &writer);
    assert_eq!(writer.join().unwrap(), request);
    assert_bytes_eq(&reader.join().unwrap(), &reply, "the reply");
    let d = delta(&guard, &before);
    println!("request, then a 1 KiB-write reply: left while writing: {left_while_writing}; {d}");
    assert!(left_while_writing, "{d}");
    assert_eq!(d.demoted_sockets, 2, "{d}");
    assert!(d.bytes_redirected >= 100, "{d}");
    drop((client, server));
}

#[test]
fn request_response_pairs_stay_on_the_shortcut() {
    let Some(env) = privileged_env() else { return };
    let Some(guard) = demoting_guard(&env) else {
        return;
    };
    for size in [1usize, 1024] {
        let before = guard.stats().unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (mut client, mut server) = connect_to(&listener);
        let trips = 20_000;
        let echo = thread::spawn(move || {
            let mut buf = vec![0u8; size];
            for _ in 0..trips {
                server.read_exact(&mut buf).expect("server read");
                server.write_all(&buf).expect("server write");
            }
            server
        });
        let (request, mut reply) = (random_bytes(size, 5), vec![0u8; size]);
        for _ in 0..trips {
            client.write_all(&request).unwrap();
            client.read_exact(&mut reply).unwrap();
            assert_eq!(reply, request);
        }
        let server = echo.join().unwrap();
        let in_map = guard.socket_count();
        drop((client, server));
        let d = delta(&guard, &before);
        println!("request/response {size} B: {d}");
        assert_eq!(in_map, 2, "{size} B: the pair stayed: {d}");
        assert_eq!(d.demote_requested, 0, "{size} B: {d}");
        assert_eq!(
            d.bytes_redirected,
            2 * (trips * size) as u64,
            "{size} B: {d}"
        );
    }
}

/// Why demotion is off by default: between a receiver's reading the last
/// of its BPF queue and its leaving the map (at its next segment: sk_msg
/// programs cannot delete map entries, and nothing runs when it reads),
/// its peer's plain bytes wait in a socket that is still a map member, and
/// kernels with the sockmap FIONREAD change (6.18.44) count only the BPF
/// queue there: FIONREAD reads 0 with bytes waiting, which plain TCP never
/// does. A burst of small writes into a receiver that reads only later.
#[test]
fn fionread_during_a_demotion_counts_what_the_kernel_counts() {
    let Some(env) = privileged_env() else { return };
    let Some(guard) = demoting_guard(&env) else {
        return;
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let (mut client, server) = connect_to(&listener);
    let sent = random_bytes(200 * 100, 16);
    for message in sent.chunks(100) {
        client.write_all(message).unwrap();
    }
    thread::sleep(std::time::Duration::from_millis(100));
    server.set_nonblocking(true).unwrap();
    let (mut got, mut reads, mut announced_zero) = (Vec::new(), 0, 0);
    let mut buf = [0u8; 1000];
    while got.len() < sent.len() {
        let announced = support::sockopt::fionread(&server);
        let n = (&server).read(&mut buf).expect("read what was sent");
        reads += 1;
        announced_zero += usize::from(announced == 0);
        got.extend_from_slice(&buf[..n]);
    }
    let stats = guard.stats().unwrap();
    println!("FIONREAD read 0 before {announced_zero} of {reads} reads that got bytes; {stats}");
    assert_bytes_eq(&got, &sent, "the burst");
    assert_eq!(stats.demote_requested, 1, "{stats}");
    assert!(
        stats.bytes_redirected > 0 && stats.bytes_passed > 0,
        "{stats}"
    );
    if kernel().fionread_counts_plain_in_map.is_yes() {
        assert_eq!(announced_zero, 0, "{stats}");
    } else {
        assert!(announced_zero > 0, "{reads} reads: {stats}");
    }
    drop((client, server));
}

#[test]
fn demotion_input_is_checked_before_anything_is_loaded() {
    let Some(env) = privileged_env() else { return };
    let baseline = loaded_programs();
    let zero_messages = StreamingDemotion {
        messages_in_a_row: 0,
        ..StreamingDemotion::default()
    };
    let zero_bytes = StreamingDemotion {
        max_message_bytes: 0,
        ..StreamingDemotion::default()
    };
    for (when, field) in [
        (zero_messages, "messages_in_a_row"),
        (zero_bytes, "max_message_bytes"),
    ] {
        let err = env.builder().demote_streaming(when).attach().unwrap_err();
        assert!(
            matches!(err, Error::ZeroStreamingDemotion { field: f } if f == field),
            "{err}"
        );
        assert!(err.to_string().contains(field), "{err}");
        assert_eq!(
            err.kind(),
            sockmap_fastpath::ErrorKind::InvalidInput,
            "{err}"
        );
    }
    for mode in [RedirectMode::Egress, RedirectMode::Both] {
        let err = env
            .builder()
            .redirect(mode)
            .demote_streaming(StreamingDemotion::default())
            .attach()
            .unwrap_err();
        assert!(
            matches!(err, Error::StreamingDemotionMode { mode: m } if m == mode),
            "{err}"
        );
        assert_eq!(err.kind(), sockmap_fastpath::ErrorKind::WrongMode, "{err}");
        assert!(err.to_string().contains("Ingress"), "{err}");
    }
    assert_nothing_left(&env.cgroup.cgroup(), &baseline);
}
