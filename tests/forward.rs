//! Egress mode: a proxy hands its two connections to the kernel.

mod common;
use common::*;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use sockmap_fastpath::{Accelerator, Error, FastpathGuard, ForwardEnd, RedirectMode};

/// Builds client -> proxy -> upstream through a fresh front listener (see
/// `common::proxied_via`).
fn proxied(
    guard: &FastpathGuard,
    upstream: &TcpListener,
    client_first: &[u8],
    before_hand_over: impl FnOnce(&mut TcpStream, &mut TcpStream),
) -> Proxied {
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    proxied_via(guard, &front, upstream, client_first, before_hand_over)
}

fn egress_env() -> Option<(Env, FastpathGuard, TcpListener)> {
    let env = privileged_env()?;
    let guard = egress_guard();
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    Some((env, guard, upstream))
}

#[test]
fn forwards_both_ways_intact_and_passes_half_closes_on() {
    let Some((_env, guard, upstream)) = egress_env() else {
        return;
    };
    const SIZE: usize = 16 << 20;
    let p = proxied(&guard, &upstream, &[], |_, _| {});
    exchange(
        p.client,
        p.server,
        random_bytes(SIZE, 1),
        random_bytes(SIZE, 2),
    );
    let stats = p.proxy.join().unwrap();
    assert_eq!(stats.end, ForwardEnd::Closed);
    assert_eq!(
        (stats.downstream_to_upstream, stats.upstream_to_downstream),
        (SIZE as u64, SIZE as u64)
    );
    let counters = guard.stats().unwrap();
    assert_every_byte_forwarded_or_kept(&counters, &stats, 2 * SIZE);
    // Counted per segment the verdict program forwarded (not per byte, not
    // per call): at least one per largest segment, none without a peer.
    assert!(
        counters.fwd_segments >= counters.fwd_bytes / LARGEST_VERDICT_SEGMENT as u64
            && counters.fwd_segments < counters.fwd_bytes,
        "{counters}"
    );
    assert_eq!(counters.fwd_unpaired, 0, "{counters}");
}

#[test]
fn bytes_queued_and_peeked_before_the_hand_over_are_forwarded_in_order() {
    let Some((_env, guard, upstream)) = egress_env() else {
        return;
    };
    let mut request = b"GET /thing HTTP/1.1\r\n\r\n".to_vec();
    request.extend(random_bytes(256 << 10, 3));
    let p = proxied(&guard, &upstream, &request, |down, _| {
        let mut header = [0u8; 16];
        for _ in 0..1000 {
            if down.peek(&mut header).unwrap() == header.len() {
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(
            &header, b"GET /thing HTTP/",
            "the proxy looks without consuming"
        );
    });
    let Proxied {
        mut client,
        mut server,
        proxy,
    } = p;
    client.shutdown(Shutdown::Write).unwrap();
    assert_bytes_eq(
        &read_all(&mut server),
        &request,
        "request through the proxy",
    );
    server
        .write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
        .unwrap();
    server.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut client), b"HTTP/1.1 204 No Content\r\n\r\n");
    let stats = proxy.join().unwrap();
    assert_eq!(stats.end, ForwardEnd::Closed);
    assert_eq!(stats.downstream_to_upstream, request.len() as u64);
}

#[test]
fn bytes_the_proxy_read_and_wrote_itself_come_first() {
    let Some((_env, guard, upstream)) = egress_env() else {
        return;
    };
    let greeting = b"HELLO proxy\n".to_vec();
    let p = proxied(&guard, &upstream, &greeting, |down, up| {
        // The proxy consumes the greeting and sends its own first line.
        let mut line = vec![0u8; greeting.len()];
        down.read_exact(&mut line).unwrap();
        up.write_all(b"FROM proxy\n").unwrap();
    });
    let Proxied {
        mut client,
        mut server,
        proxy,
    } = p;
    let body = random_bytes(1 << 20, 4);
    client.write_all(&body).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let mut want = b"FROM proxy\n".to_vec();
    want.extend(&body);
    assert_bytes_eq(
        &read_all(&mut server),
        &want,
        "proxy's bytes, then the client's",
    );
    server.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut client), b"");
    assert_eq!(proxy.join().unwrap().end, ForwardEnd::Closed);
}

#[test]
fn a_reset_on_one_side_resets_the_other() {
    for client_resets in [true, false] {
        let Some((_env, guard, upstream)) = egress_env() else {
            return;
        };
        let Proxied {
            mut client,
            mut server,
            proxy,
        } = live_pair(&guard, &upstream);
        let (resetting, other, end) = if client_resets {
            (client, server, ForwardEnd::DownstreamReset)
        } else {
            client.write_all(b"!").unwrap(); // settle: the pair is live
            let mut bang = [0u8; 1];
            server.read_exact(&mut bang).unwrap();
            (server, client, ForwardEnd::UpstreamReset)
        };
        socket2::SockRef::from(&resetting)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(resetting); // RST
        assert_eq!(proxy.join().unwrap().end, end);
        // The proxy dropped its streams with SO_LINGER 0: the other side
        // is reset too.
        assert_reset(other, end);
    }
}

/// A proxied pair whose first bytes (`partial`) reached the server.
fn live_pair(guard: &FastpathGuard, upstream: &TcpListener) -> Proxied {
    let mut pair = proxied(guard, upstream, b"partial", |_, _| {});
    let mut got = [0u8; 7];
    pair.server.read_exact(&mut got).unwrap();
    pair
}

/// The next read of `stream` fails with ECONNRESET (`end`: how the pair
/// ended, for the message).
fn assert_reset(mut stream: TcpStream, end: ForwardEnd) {
    let mut buf = [0u8; 1];
    match stream.read(&mut buf) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset, "{e}"),
        Ok(n) => panic!("{end:?}: expected a reset, read {n} bytes"),
    }
}

/// A proxy socket that fails locally, not by its peer's reset: the kernel
/// aborts the proxy's upstream socket (`ss -K`, as an administrator would;
/// ECONNABORTED on the proxy's side). The pair ends as an upstream reset and
/// the client is reset too, never handed a clean end of a cut stream.
#[test]
fn a_proxy_socket_aborted_by_the_kernel_resets_the_client() {
    let Some((_env, guard, upstream)) = egress_env() else {
        return;
    };
    let Proxied {
        client,
        server,
        proxy,
    } = live_pair(&guard, &upstream);
    // The proxy's upstream socket is the one the server is connected to.
    let proxy_up = server.peer_addr().unwrap();
    let killed = std::process::Command::new("ss")
        .args(["-K", "src", &proxy_up.ip().to_string(), "sport", "="])
        .arg(format!(":{}", proxy_up.port()))
        .output()
        .expect("ss (iproute2) runs");
    let listed = String::from_utf8_lossy(&killed.stdout);
    assert!(
        listed.contains(&format!(":{}", proxy_up.port())),
        "ss -K found the proxy's socket: {listed}{}",
        String::from_utf8_lossy(&killed.stderr)
    );
    assert_eq!(proxy.join().unwrap().end, ForwardEnd::UpstreamReset);
    assert_reset(client, ForwardEnd::UpstreamReset);
}

#[test]
fn dropping_the_guard_mid_transfer_loses_nothing() {
    let Some((_env, guard, upstream)) = egress_env() else {
        return;
    };
    let p = proxied(&guard, &upstream, &[], |_, _| {});
    let (at_drop, end, sent_after, forwarded) =
        upload_across_guard_drop(p, guard, &random_bytes(32 << 20, 5), 0);
    // The forwarding program still ran on the bytes written after the
    // drop: it forwarded them, or kept them for wait() to copy (behind
    // bytes already kept while the backlog was full).
    let d = end.since(&at_drop);
    assert!(
        d.fwd_segments + d.fwd_queued_behind + d.fwd_backlog_kept > 0,
        "{d}"
    );
    assert!(
        d.fwd_bytes + forwarded.copied >= sent_after,
        "{sent_after} after the drop, {} copied: {d}",
        forwarded.copied
    );
}

#[test]
fn forward_needs_egress_mode() {
    let Some(env) = privileged_env() else { return };
    let guard = env.attach(|b| b);
    let (a, b) = connected_pair("127.0.0.1:0");
    let err = guard.forward(&a, &b).unwrap_err();
    assert!(matches!(err, Error::NotEgressMode), "{err}");
    assert!(err.to_string().contains("RedirectMode::Egress"), "{err}");
}

/// Two namespaces joined by a veth pair: the client and the proxy in one,
/// the upstream server in the other (a different host, as far as TCP knows).
#[test]
fn forwards_to_an_upstream_in_another_namespace_behind_veth() {
    let Some((_env, guard, _)) = egress_env() else {
        return;
    };
    let (app, remote) = (new_netns(), new_netns());
    veth_between(&app, &remote, "10.200.0.1/24", "10.200.0.2/24");

    let upstream = remote.run(|| TcpListener::bind("10.200.0.2:8080").unwrap());
    let (client, down, up) = app.run(|| {
        let front = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = connect(front.local_addr().unwrap());
        let (down, _) = front.accept().unwrap();
        let up = connect("10.200.0.2:8080");
        (client, down, up)
    });
    let (server, _) = upstream.accept().unwrap();
    let forwarding = guard.forward(&down, &up).expect("forward");
    let proxy = thread::spawn(move || {
        let stats = forwarding.wait().expect("wait");
        drop((down, up));
        stats
    });
    const SIZE: usize = 8 << 20;
    exchange(client, server, random_bytes(SIZE, 7), random_bytes(SIZE, 8));
    let stats = proxy.join().unwrap();
    assert_eq!(stats.end, ForwardEnd::Closed);
    assert_eq!(
        (stats.downstream_to_upstream, stats.upstream_to_downstream),
        (SIZE as u64, SIZE as u64)
    );
    assert_every_byte_forwarded_or_kept(&guard.stats().unwrap(), &stats, 2 * SIZE);
}

/// The proxy's sockets for one client -> proxy -> server connection, not
/// yet handed over: (client, downstream, upstream, server).
fn unforwarded(front: &TcpListener, upstream: &TcpListener) -> [TcpStream; 4] {
    let client = connect(front.local_addr().unwrap());
    let (down, _) = front.accept().unwrap();
    let up = connect(upstream.local_addr().unwrap());
    let (server, _) = upstream.accept().unwrap();
    [client, down, up, server]
}

#[test]
fn a_socket_already_forwarded_or_a_full_map_is_refused_and_left_usable() {
    let Some(_env) = privileged_env() else { return };
    let guard = Accelerator::builder()
        .redirect(RedirectMode::Egress)
        .capacity(2)
        .attach()
        .unwrap();
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let [mut client, down, up, mut server] = unforwarded(&front, &upstream);
    let first = guard.forward(&down, &up).expect("the first pair fits");

    let err = guard.forward(&down, &up).unwrap_err();
    assert!(matches!(err, Error::Bpf { .. }), "{err:?}");
    assert_eq!(
        err.kind(),
        sockmap_fastpath::ErrorKind::MapFullOrTaken,
        "{err:?}"
    );
    assert!(
        err.to_string().contains("already forwarded, or map full"),
        "{err}"
    );
    // A second pair does not fit (capacity 2 sockets) ...
    let [c2, mut down2, up2, _server2] = unforwarded(&front, &upstream);
    let err = guard.forward(&down2, &up2).unwrap_err();
    assert!(
        err.to_string().contains("already forwarded, or map full"),
        "{err}"
    );
    assert_eq!(
        err.kind(),
        sockmap_fastpath::ErrorKind::MapFullOrTaken,
        "{err:?}"
    );
    // ... and stays a plain connection the proxy can serve itself.
    exchange(
        c2,
        down2.try_clone().unwrap(),
        random_bytes(1 << 20, 9),
        random_bytes(1 << 20, 10),
    );
    drop((&mut down2, up2));

    // The refusals did not disturb the first pair.
    let proxy = thread::spawn(move || {
        let stats = first.wait().unwrap();
        drop((down, up));
        stats
    });
    client.write_all(b"still forwarded").unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    let got = read_all(&mut server);
    assert_eq!(got, b"still forwarded", "{}", guard.stats().unwrap());
    server.shutdown(Shutdown::Write).unwrap();
    assert_eq!(read_all(&mut client), b"");
    assert_eq!(proxy.join().unwrap().end, ForwardEnd::Closed);
    assert_eq!(guard.stats().unwrap().fwd_bytes, 15);
}

/// The proxy process is SIGKILLed in the middle of a forwarded transfer: its
/// sockets close with it, so the connection ends; the server must have
/// received an exact prefix of what the client sent: nothing misdelivered,
/// nothing reordered.
#[test]
fn proxy_killed_mid_transfer_delivers_an_exact_prefix() {
    proxy_killed_mid_transfer(RedirectMode::Egress);
}

/// Both mode: the client's bytes go straight out of the dead proxy's
/// upstream socket; the server still holds an exact prefix.
#[test]
fn both_mode_proxy_killed_mid_transfer_delivers_an_exact_prefix() {
    proxy_killed_mid_transfer(RedirectMode::Both);
}

/// A client streams 64 MiB through a proxy in a child process, which is
/// SIGKILLed once 4 MiB have arrived (and, in both mode, once some bytes
/// went straight upstream).
fn proxy_killed_mid_transfer(mode: RedirectMode) {
    let Some(env) = privileged_env() else { return };
    if mode == RedirectMode::Both && !both_mode_or_refused(&env) {
        return;
    }
    let upstream = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_proxy",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("FP_UPSTREAM", upstream.local_addr().unwrap().to_string())
        .env(
            "FP_BOTH_CGROUP",
            match mode {
                RedirectMode::Both => env.cgroup.path(),
                _ => Default::default(),
            },
        )
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    // The child's own listener port (bound there: no port handed over
    // that another socket could take meanwhile).
    let front_port: u16 = lines
        .by_ref()
        .find_map(|l| l.unwrap().strip_prefix("LISTENING ")?.parse().ok())
        .expect("child proxy did not start");
    let mut client = connect(("127.0.0.1", front_port));
    let (mut server, _) = upstream.accept().unwrap();
    assert!(lines.by_ref().any(|l| l.unwrap() == "FORWARDING"));

    const SIZE: usize = 64 << 20;
    let data = random_bytes(SIZE, 11);
    // A first byte through, so that in both mode the downstream queue is
    // empty and the client switches to the direct path.
    client.write_all(&data[..1]).unwrap();
    let mut got = vec![0u8; 1];
    server.read_exact(&mut got).unwrap();
    let writer = {
        let data = data.clone();
        thread::spawn(move || {
            let _ = client.write_all(&data[1..]); // fails once the proxy is gone
        })
    };
    got.resize(4 << 20, 0);
    server.read_exact(&mut got[1..]).unwrap();
    if mode == RedirectMode::Both {
        // The child prints its direct-path byte count every few ms.
        assert!(
            lines
                .by_ref()
                .take(2000) // about 10 s
                .any(|l| l.unwrap().strip_prefix("DIRECT ").is_some_and(|n| n != "0")),
            "the client's bytes never went straight upstream"
        );
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    let killed = std::time::Instant::now();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match server.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    writer.join().unwrap();
    // The client learns soon: a proxy socket left behind in FIN_WAIT2 with
    // its window shut (bytes were kept on it) would keep the client's
    // writes waiting for a minute or more.
    let learned = killed.elapsed();
    eprintln!("the client's writes ended {learned:?} after the kill");
    assert!(learned < Duration::from_secs(30), "{learned:?}");
    assert!(
        got.len() < SIZE,
        "the transfer was cut by the proxy's death"
    );
    assert_bytes_eq(&got, &data[..got.len()], "an exact prefix");
}

/// Run by `proxy_killed_mid_transfer`: a proxy forwarding one connection
/// (in both mode if FP_BOTH_CGROUP names the test's cgroup, else in egress
/// mode) until it is killed.
#[test]
#[ignore = "run as a child process by proxy_killed_mid_transfer"]
fn child_proxy() {
    let upstream = std::env::var("FP_UPSTREAM").expect("run by the parent test");
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = front.local_addr().unwrap().port();
    let both_cgroup = std::env::var("FP_BOTH_CGROUP").unwrap_or_default();
    let builder = match both_cgroup.as_str() {
        "" => Accelerator::builder().redirect(RedirectMode::Egress),
        path => Accelerator::builder()
            .redirect(RedirectMode::Both)
            .cgroup(sockmap_fastpath::Cgroup::path(path).unwrap())
            .ports([port])
            .splice_guard(sockmap_fastpath::SpliceGuard::Off),
    };
    let guard = builder.attach().unwrap();
    println!("\nLISTENING {port}");
    let (down, _) = front.accept().unwrap();
    let up = connect(upstream);
    let forwarding = guard.forward(&down, &up).unwrap();
    println!("\nFORWARDING");
    let reader = guard.stats_reader().unwrap();
    thread::spawn(move || loop {
        println!("DIRECT {}", reader.read().unwrap().fwd_direct_bytes);
        thread::sleep(Duration::from_millis(5));
    });
    let _ = forwarding.wait();
}

/// forward() takes tokio streams as they are; wait() runs on a blocking
/// thread of the runtime.
#[test]
fn forwards_tokio_streams() {
    let Some((_env, guard, upstream)) = egress_env() else {
        return;
    };
    let guard = std::sync::Arc::new(guard);
    let upstream_addr = upstream.local_addr().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (client, server, proxy) = rt.block_on(async {
        let front = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = tokio::net::TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        let (down, _) = front.accept().await.unwrap();
        let up = tokio::net::TcpStream::connect(upstream_addr).await.unwrap();
        let forwarding = guard.forward(&down, &up).expect("forward tokio streams");
        let proxy = tokio::task::spawn_blocking(move || {
            let stats = forwarding.wait().unwrap();
            drop((down, up));
            stats
        });
        (
            client.into_std().unwrap(),
            upstream.accept().unwrap().0,
            proxy,
        )
    });
    client.set_nonblocking(false).unwrap();
    exchange(
        client,
        server,
        random_bytes(4 << 20, 12),
        random_bytes(4 << 20, 13),
    );
    let stats = rt.block_on(proxy).expect("proxy task");
    assert_eq!(stats.end, ForwardEnd::Closed);
    assert_eq!(stats.downstream_to_upstream, 4 << 20);
    assert_every_byte_forwarded_or_kept(&guard.stats().unwrap(), &stats, 8 << 20);
}

/// Segments that arrive while `forward()` puts the pair into the map (the
/// first socket is in, its partner not yet) must still arrive, in order:
/// a client writes small chunks throughout each of many hand-overs.
#[test]
fn a_client_writing_during_many_hand_overs_loses_nothing() {
    let Some((_env, guard, upstream)) = egress_env() else {
        return;
    };
    if !kernel().both_mode.is_yes() {
        // Keeping later segments behind needs the kfunc both mode needs
        // (6.2); docs/known-limits.md says what remains on older kernels.
        not_run("no 6.2 kfuncs to keep segments behind (probe(): both mode)");
        return;
    }
    const HAND_OVERS: usize = 200;
    const CHUNK: usize = 100;
    let data = random_bytes(4000 * CHUNK, 31);
    let front = TcpListener::bind("127.0.0.1:0").unwrap();
    for round in 0..HAND_OVERS {
        let mut client = connect(front.local_addr().unwrap());
        let (down, _) = front.accept().unwrap();
        let up = connect(upstream.local_addr().unwrap());
        let (mut server, _) = upstream.accept().unwrap();
        let writer = {
            let data = data.clone();
            thread::spawn(move || {
                for chunk in data.chunks(CHUNK) {
                    client.write_all(chunk).unwrap();
                }
                client.shutdown(Shutdown::Write).unwrap();
                client
            })
        };
        // The writer is under way once its first bytes are queued here.
        while down.peek(&mut [0u8]).unwrap() == 0 {}
        let forwarding = guard.forward(&down, &up).expect("forward");
        let proxy = thread::spawn(move || {
            let stats = forwarding.wait().expect("wait");
            drop((down, up));
            stats
        });
        let got = read_all(&mut server);
        assert!(
            got == data,
            "round {round}: {} of {} bytes, in order: {}; {}",
            got.len(),
            data.len(),
            data.starts_with(&got),
            guard.stats().unwrap()
        );
        server.shutdown(Shutdown::Write).unwrap();
        drop(writer.join().unwrap());
        assert_eq!(proxy.join().unwrap().end, ForwardEnd::Closed);
    }
    let counters = guard.stats().unwrap();
    eprintln!("{HAND_OVERS} hand-overs during writes: {counters}");
}
