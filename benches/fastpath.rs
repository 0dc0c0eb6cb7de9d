//! Side-by-side benchmarks: plain loopback TCP, TCP accelerated by this
//! crate, and AF_UNIX stream sockets, interleaved (ABCABC...) and repeated;
//! median and spread per workload. Needs root.
//!
//! `cargo bench --bench fastpath -- [--quick] [--json PATH]`
//!
//! Writes a markdown table to stdout and JSON to `target/bench/fastpath.json`
//! (or PATH). `--quick` finishes in well under two minutes.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use libbpf_rs::query::ProgInfoIter;
use std::net::TcpListener;
use std::sync::Arc;

use sockmap_fastpath::{Accelerator, Cgroup, FastpathGuard, RedirectMode, SpliceGuard, Stats};
use support::connect::connect_nonblocking;
use support::relay::copy_until_eof;
use support::workloads::{self, Connector, Rate};
use support::{reference, signals};

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Plain,
    Accelerated,
    Unix,
}

const PATHS: [Path; 3] = [Path::Plain, Path::Accelerated, Path::Unix];
const PINNED: Option<usize> = Some(0);

type Run = Box<dyn Fn(&Connector, Duration) -> Rate>;

struct Case {
    name: String,
    unit: &'static str,
    scale: f64,
    latency: bool,
    /// Also run on a selected socket whose sends fall back to plain TCP
    /// (measures the kernel's sockmap send path without the redirect).
    fallback: bool,
    run: Run,
}

fn rr(size: usize, cpu: Option<usize>) -> Run {
    Box::new(move |c, d| workloads::request_response(c, size, d, cpu))
}

fn bulk(size: usize, cpu: Option<usize>) -> Run {
    Box::new(move |c, d| workloads::bulk(c, size, d, cpu))
}

fn cases(quick: bool) -> Vec<Case> {
    let mut cases = Vec::new();
    let sizes: &[(usize, &str)] = if quick {
        &[(1, "1 B"), (1024, "1 KiB"), (65536, "64 KiB")]
    } else {
        &[
            (1, "1 B"),
            (1024, "1 KiB"),
            (16384, "16 KiB"),
            (65536, "64 KiB"),
        ]
    };
    for &(size, label) in sizes {
        cases.push(Case {
            name: format!("req/resp {label}, one CPU"),
            unit: "trips/s",
            scale: 1.0,
            latency: true,
            fallback: false,
            run: rr(size, PINNED),
        });
    }
    for &(size, label) in &sizes[..2] {
        cases.push(Case {
            name: format!("req/resp {label}, unpinned"),
            unit: "trips/s",
            scale: 1.0,
            latency: true,
            fallback: false,
            run: rr(size, None),
        });
    }
    for (size, label) in [
        (64, "64 B"),
        (1024, "1 KiB"),
        (4096, "4 KiB"),
        (16384, "16 KiB"),
        (65536, "64 KiB"),
    ] {
        cases.push(Case {
            name: format!("bulk {label} writes, one CPU"),
            unit: "Gbit/s",
            scale: 1e-9,
            latency: false,
            fallback: size <= 4096,
            run: bulk(size, PINNED),
        });
    }
    cases.push(Case {
        name: "connect+1 req+close, one CPU".into(),
        unit: "conn/s",
        scale: 1.0,
        latency: false,
        fallback: false,
        run: Box::new(|c, d| workloads::churn(c, d, PINNED)),
    });
    let fanouts: &[usize] = if quick { &[64] } else { &[64, 1024] };
    for &n in fanouts {
        cases.push(Case {
            name: format!("{n} connections, req/resp 1 KiB, unpinned"),
            unit: "trips/s",
            scale: 1.0,
            latency: false,
            fallback: false,
            run: Box::new(move |c, d| workloads::concurrent(c, n, 1024, d)),
        });
    }
    cases
}

struct Measured {
    name: String,
    unit: &'static str,
    /// Per path: rates of each repetition, and all latencies.
    rates: [Vec<f64>; 3],
    fallback: Vec<f64>,
    latencies: [Vec<u64>; 3],
    redirected_share: f64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// run_time_ns and run_cnt of a loaded program, by name (kernel BPF stats).
fn prog_stats(name: &str) -> (u64, u64) {
    ProgInfoIter::default()
        .filter(|p| p.name.to_str() == Some(name))
        .fold((0, 0), |(t, c), p| (t + p.run_time_ns, c + p.run_cnt))
}

struct BpfStatsSwitch(String);

impl BpfStatsSwitch {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";
    fn on() -> Self {
        let old = std::fs::read_to_string(Self::PATH).unwrap_or_else(|_| "0".into());
        let _ = std::fs::write(Self::PATH, "1");
        BpfStatsSwitch(old)
    }
}

impl Drop for BpfStatsSwitch {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.trim());
    }
}

/// client -> proxy (`front`) -> server pairs: the proxy copies in user
/// space, or hands the pair to the kernel (egress or both mode).
fn proxy_connector(front: TcpListener, forwarder: Option<Arc<FastpathGuard>>) -> Connector {
    let upstream = TcpListener::bind("127.0.0.1:0").expect("bind");
    Connector::Custom(Box::new(move || {
        let client = connect_nonblocking(front.local_addr().unwrap()).unwrap();
        let (down, _) = front.accept().unwrap();
        let up = connect_nonblocking(upstream.local_addr().unwrap()).unwrap();
        let (server, _) = upstream.accept().unwrap();
        down.set_nodelay(true).unwrap();
        up.set_nodelay(true).unwrap();
        match &forwarder {
            Some(guard) => {
                let forwarding = guard.forward(&down, &up).expect("forward");
                std::thread::spawn(move || {
                    let _ = forwarding.wait();
                    drop((down, up));
                });
            }
            None => {
                let (d2, u2) = (down.try_clone().unwrap(), up.try_clone().unwrap());
                std::thread::spawn(move || copy_until_eof(down, up));
                std::thread::spawn(move || copy_until_eof(u2, d2));
            }
        }
        (client, server)
    }))
}

/// Proxy workloads, interleaved: user-space copy, kernel forwarding (egress
/// mode), and both mode (client and proxy in a child cgroup, the
/// client-to-proxy hop selected by port).
fn proxy_table(
    parent: &Cgroup,
    reps: usize,
    duration: Duration,
) -> Result<String, Box<dyn std::error::Error>> {
    let cgroup = parent.create_child(&format!(
        "sockmap-fastpath-bench-proxy-{}",
        std::process::id()
    ))?;
    cgroup.add_process(std::process::id())?;
    let egress = Arc::new(
        Accelerator::builder()
            .redirect(RedirectMode::Egress)
            .attach()?,
    );
    let both_front = TcpListener::bind("127.0.0.1:0")?;
    let both = Arc::new(
        Accelerator::builder()
            .cgroup(cgroup.cgroup().clone())
            .redirect(RedirectMode::Both)
            .ports([both_front.local_addr()?.port()])
            .splice_guard(SpliceGuard::Off)
            .attach()?,
    );
    let connectors = [
        proxy_connector(TcpListener::bind("127.0.0.1:0")?, None),
        proxy_connector(TcpListener::bind("127.0.0.1:0")?, Some(egress.clone())),
        proxy_connector(both_front, Some(both.clone())),
    ];
    let cases: [(&str, &str, f64, Run); 3] = [
        (
            "req/resp 1 KiB through the proxy",
            "trips/s",
            1.0,
            rr(1024, None),
        ),
        (
            "bulk 64 KiB writes through the proxy",
            "Gbit/s",
            1e-9,
            bulk(65536, None),
        ),
        (
            "bulk 4 KiB writes through the proxy",
            "Gbit/s",
            1e-9,
            bulk(4096, None),
        ),
    ];
    let mut out = String::from("\nProxy forwarding, unpinned: a proxy copying in user space vs the kernel forwarding the pair (egress mode) vs both mode (the client's bytes leave straight through the upstream socket, the server's go straight into the client's queue).\n\n");
    paths_header(
        &mut out,
        "proxy",
        &["user-space copy", "egress mode", "both mode"],
        &["egress/copy", "both/copy"],
    );
    for (name, unit, scale, run) in cases {
        let mut rates = [Vec::new(), Vec::new(), Vec::new()];
        for _ in 0..reps {
            for (i, connector) in connectors.iter().enumerate() {
                rates[i].push(run(connector, duration).per_second * scale);
            }
        }
        let copy = median(&rates[0]);
        let ratios = [median(&rates[1]) / copy, median(&rates[2]) / copy];
        eprintln!(
            "{name}: copy {copy:.2} {unit}; egress {:.2}x, both {:.2}x",
            ratios[0], ratios[1]
        );
        paths_row(
            &mut out,
            name,
            unit,
            &rates.each_ref().map(Vec::as_slice),
            &ratios,
        );
    }
    let (egress, both) = (egress.stats()?, both.stats()?);
    if egress.fwd_bytes == 0 || both.fwd_direct_bytes == 0 {
        return Err(
            format!("kernel forwarding moved no bytes: egress {egress}\nboth {both}").into(),
        );
    }
    let _ = writeln!(
        out,
        "\nIn this section: egress mode forwarded {} bytes; both mode forwarded {} bytes from the server, sent {} client bytes straight upstream, and redirected {} bytes (server bytes into the clients' queues, client bytes into the proxy's downstream queue while the upstream had no room, copied upstream by wait()).",
        egress.fwd_bytes, both.fwd_bytes, both.fwd_direct_bytes, both.bytes_redirected
    );
    drop(connectors);
    Ok(out)
}

/// Container to container: two namespaces, each joined by veth to a bridge
/// in a third (the "host"), as container runtimes do. Plain TCP vs TCP
/// accelerated through a namespace group, interleaved, in `cgroup`.
fn container_table(
    cgroup: &Cgroup,
    reps: usize,
    duration: Duration,
) -> Result<String, Box<dyn std::error::Error>> {
    use std::net::SocketAddr;
    use support::netns::{ip, run_in, NetNs};

    let tag = std::process::id();
    let (a, b, host) = (
        NetNs::new(format!("fp-bench-a-{tag}")),
        NetNs::new(format!("fp-bench-b-{tag}")),
        NetNs::new(format!("fp-bench-host-{tag}")),
    );
    ip(&["-n", &host.name, "link", "add", "br0", "type", "bridge"]);
    ip(&["-n", &host.name, "link", "set", "br0", "up"]);
    for (ns, addr) in [(&a, "10.202.0.1/24"), (&b, "10.202.0.2/24")] {
        let (_, port) = ns.veth_to(&host, Some(addr), None);
        ip(&["-n", &host.name, "link", "set", &port, "master", "br0"]);
    }
    const ACCELERATED_PORT: u16 = 7000;
    let guard = Accelerator::builder()
        .cgroup(cgroup.clone())
        .ports([ACCELERATED_PORT])
        .namespace_group([a.path(), b.path()])
        .splice_guard(SpliceGuard::Off)
        .attach()?;
    // Server in b, client connecting from a.
    let connector = |port: u16| {
        let addr: SocketAddr = ([10, 202, 0, 2], port).into();
        let listener = b.run(move || TcpListener::bind(addr).expect("bind in b"));
        let a_path = a.path();
        Connector::Custom(Box::new(move || {
            let client = run_in(a_path.clone(), move || {
                connect_nonblocking(addr).expect("connect from a")
            });
            (client, listener.accept().expect("accept in b").0)
        }))
    };
    let connectors = [connector(ACCELERATED_PORT + 1), connector(ACCELERATED_PORT)];
    let cases: [(&str, &str, f64, Run); 4] = [
        ("req/resp 1 KiB, one CPU", "trips/s", 1.0, rr(1024, PINNED)),
        (
            "bulk 1 KiB writes, one CPU",
            "Gbit/s",
            1e-9,
            bulk(1024, PINNED),
        ),
        (
            "bulk 4 KiB writes, one CPU",
            "Gbit/s",
            1e-9,
            bulk(4096, PINNED),
        ),
        (
            "bulk 64 KiB writes, one CPU",
            "Gbit/s",
            1e-9,
            bulk(65536, PINNED),
        ),
    ];
    let mut out = String::from("\nContainer to container: two network namespaces, each joined by veth to a bridge in a third, plain TCP vs accelerated (`namespace_group`), interleaved:\n\n");
    paths_header(
        &mut out,
        "containers",
        &["plain TCP", "accelerated"],
        &["accel/plain"],
    );
    for (name, unit, scale, run) in cases {
        let mut rates = [Vec::new(), Vec::new()];
        for _ in 0..reps {
            for (i, connector) in connectors.iter().enumerate() {
                rates[i].push(run(connector, duration).per_second * scale);
            }
        }
        let ratio = median(&rates[1]) / median(&rates[0]);
        eprintln!("container {name}: {ratio:.2}x plain");
        paths_row(&mut out, name, unit, &[&rates[0], &rates[1]], &[ratio]);
    }
    let stats = guard.stats()?;
    if stats.bytes_redirected == 0 {
        return Err(format!("nothing redirected between the namespaces: {stats}").into());
    }
    let _ = writeln!(
        out,
        "\nRedirected between the namespaces in this section: {} bytes.",
        stats.bytes_redirected
    );
    drop(connectors);
    Ok(out)
}

/// Our programs vs the minimal reference redirect, each attached to its own
/// child cgroup, interleaved: what the safety checks cost.
fn reference_table(
    parent: &Cgroup,
    reps: usize,
    duration: Duration,
) -> Result<String, Box<dyn std::error::Error>> {
    let here = Cgroup::current()?;
    let ours_cg = parent.create_child(&format!(
        "sockmap-fastpath-bench-ours-{}",
        std::process::id()
    ))?;
    let ref_cg = parent.create_child(&format!(
        "sockmap-fastpath-bench-ref-{}",
        std::process::id()
    ))?;
    let ours = Accelerator::builder()
        .cgroup(ours_cg.cgroup().clone())
        .splice_guard(SpliceGuard::Off)
        .attach()?;
    let _reference = attach_reference(ref_cg.cgroup(), Batching::None)?;
    let mut batched_cgroups = Vec::new();

    // Sockets belong to the cgroup their creator is in: make each side's
    // listener, and run its clients, inside its cgroup.
    let in_cgroup = |cg: &Cgroup, f: &mut dyn FnMut()| -> Result<(), Box<dyn std::error::Error>> {
        cg.add_process(std::process::id())?;
        f();
        here.add_process(std::process::id())?;
        Ok(())
    };
    let mut connectors: Vec<Connector> = Vec::new();
    for cg in [ours_cg.cgroup(), ref_cg.cgroup()] {
        in_cgroup(cg, &mut || connectors.push(Connector::tcp("127.0.0.1:0")))?;
    }
    let cases: [(&str, &str, f64, Run); 2] = [
        ("req/resp 1 B, one CPU", "trips/s", 1.0, rr(1, PINNED)),
        (
            "bulk 64 KiB writes, one CPU",
            "Gbit/s",
            1e-9,
            bulk(65536, PINNED),
        ),
    ];
    let programs = [("fp_sk_msg", "fp_sock_ops"), ("ref_sk_msg", "ref_sock_ops")];
    let before = programs.map(|(m, o)| (prog_stats(m), prog_stats(o)));
    let mut out = String::from("\nOur programs vs a minimal reference redirect (examples/support/reference.bpf.c: IPv4 only, no netns, no policy, no ordering fallback; never use it), interleaved:\n\n");
    paths_header(
        &mut out,
        "reference",
        &["sockmap-fastpath", "minimal reference"],
        &["ratio"],
    );
    for (name, unit, scale, run) in cases {
        let mut rates = [Vec::new(), Vec::new()];
        for _ in 0..reps {
            for (i, cg) in [ours_cg.cgroup(), ref_cg.cgroup()].into_iter().enumerate() {
                in_cgroup(cg, &mut || {
                    rates[i].push(run(&connectors[i], duration).per_second * scale)
                })?;
            }
        }
        let ratio = median(&rates[0]) / median(&rates[1]);
        paths_row(&mut out, name, unit, &[&rates[0], &rates[1]], &[ratio]);
    }
    let after = programs.map(|(m, o)| (prog_stats(m), prog_stats(o)));
    let per = |a: (u64, u64), b: (u64, u64)| (a.0 - b.0) as f64 / (a.1 - b.1).max(1) as f64;
    let _ = writeln!(
        out,
        "\nBPF run time per call: fp_sk_msg {:.0} ns vs ref_sk_msg {:.0} ns ({:.2}x); fp_sock_ops {:.0} ns vs ref_sock_ops {:.0} ns.",
        per(after[0].0, before[0].0),
        per(after[1].0, before[1].0),
        per(after[0].0, before[0].0) / per(after[1].0, before[1].0),
        per(after[0].1, before[0].1),
        per(after[1].1, before[1].1),
    );
    let stats = ours.stats()?;
    if stats.bytes_redirected == 0 {
        return Err(format!("our side redirected nothing: {stats}").into());
    }

    // The batching experiments: fewer verdicts (apply_bytes), or fewer,
    // larger redirects (cork), for small writes.
    let mut batched = Vec::new();
    for (i, variant) in [Batching::ApplyBytes, Batching::Cork]
        .into_iter()
        .enumerate()
    {
        let cg = parent.create_child(&format!(
            "sockmap-fastpath-bench-batch{i}-{}",
            std::process::id()
        ))?;
        batched.push(attach_reference(cg.cgroup(), variant)?);
        in_cgroup(cg.cgroup(), &mut || {
            connectors.push(Connector::tcp("127.0.0.1:0"))
        })?;
        batched_cgroups.push(cg);
    }
    in_cgroup(&here, &mut || {
        connectors.push(Connector::tcp("127.0.0.1:0"))
    })?;
    let _ = writeln!(
        out,
        "\nBatching experiments on the reference program: bpf_msg_apply_bytes({BATCH}) (one verdict per {kib} KiB instead of per message) and bpf_msg_cork_bytes({BATCH}) (small writes redirected in {kib} KiB batches). Cork is NOT usable: a request smaller than the cork waits forever, and bytes still corked at close are dropped (its received totals are short by up to {kib} KiB per connection).\n",
        kib = BATCH >> 10
    );
    paths_header(
        &mut out,
        "batching",
        &[
            "plain TCP",
            "sockmap-fastpath",
            "reference + apply_bytes",
            "reference + cork",
        ],
        &["fastpath/plain", "apply/plain", "cork/plain"],
    );
    // (cgroup, connector) per column: plain, ours, apply_bytes, cork.
    let columns = [
        (here.clone(), 4),
        (ours_cg.cgroup().clone(), 0),
        (batched_cgroups[0].cgroup().clone(), 2),
        (batched_cgroups[1].cgroup().clone(), 3),
    ];
    for size in [64usize, 1024, 4096] {
        let mut rates: [Vec<f64>; 4] = Default::default();
        for _ in 0..reps {
            for (i, (cg, conn)) in columns.iter().enumerate() {
                let conn = &connectors[*conn];
                in_cgroup(cg, &mut || {
                    rates[i].push(workloads::bulk(conn, size, duration, PINNED).per_second * 1e-9)
                })?;
            }
        }
        let plain = median(&rates[0]);
        let ratios = [1, 2, 3].map(|i| median(&rates[i]) / plain);
        let name = format!("bulk {size} B writes, one CPU");
        paths_row(
            &mut out,
            &name,
            "Gbit/s",
            &rates.each_ref().map(Vec::as_slice),
            &ratios,
        );
    }
    drop(connectors);
    drop(ours);
    Ok(out)
}

/// Batch size of the batching experiments.
const BATCH: u32 = 64 << 10;

/// Which batching the reference program does (bench experiments only).
#[derive(Clone, Copy)]
enum Batching {
    None,
    ApplyBytes,
    Cork,
}

/// The reference program loaded and attached to `cgroup` (its sk_msg
/// program with the legacy attach: it goes when the map does). Its object
/// storage is leaked: the benchmark loads it twice.
fn attach_reference(
    cgroup: &Cgroup,
    batching: Batching,
) -> Result<(reference::ReferenceSkel<'static>, libbpf_rs::Link), Box<dyn std::error::Error>> {
    use libbpf_rs::skel::{OpenSkel, SkelBuilder};
    use std::os::fd::{AsFd, AsRawFd};

    let storage = Box::leak(Box::new(std::mem::MaybeUninit::uninit()));
    let mut open = reference::ReferenceSkelBuilder::default().open(storage)?;
    let rodata = open
        .maps
        .rodata_data
        .as_deref_mut()
        .expect("reference.bpf.c has .rodata");
    match batching {
        Batching::None => {}
        Batching::ApplyBytes => rodata.apply_bytes = BATCH,
        Batching::Cork => rodata.cork_bytes = BATCH,
    }
    let skel = open.load()?;
    skel.progs
        .ref_sk_msg
        .attach_sockmap(skel.maps.ref_map.as_fd().as_raw_fd())?;
    let dir = std::fs::File::open(cgroup.as_path())?;
    let link = skel.progs.ref_sock_ops.attach_cgroup(dir.as_raw_fd())?;
    Ok((skel, link))
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let json_path = args
        .iter()
        .position(|a| a == "--json")
        .and_then(|i| args.get(i + 1))
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench/fastpath.json")
        });
    let (seconds, reps) = if quick { (0.25, 3) } else { (1.0, 5) };
    let duration = Duration::from_secs_f64(seconds);
    if !nix::unistd::Uid::effective().is_root() {
        return Err("the benchmarks load BPF programs: run as root".into());
    }
    let started = Instant::now();

    let parent = Cgroup::current()?;
    let cgroup = parent.create_child(&format!("sockmap-fastpath-bench-{}", std::process::id()))?;
    signals::remove_cgroup_on_signal(parent.clone(), cgroup.as_path().to_owned());
    cgroup.add_process(std::process::id())?;
    let plain = Connector::tcp("127.0.0.1:0");
    let accelerated = Connector::tcp("127.0.0.1:0");
    let unix = Connector::unix(
        std::env::temp_dir().join(format!("fastpath-bench-{}.sock", std::process::id())),
    );
    // The benchmark's own traffic never splices (see README, splice guard).
    let guard = Accelerator::builder()
        .cgroup(cgroup.cgroup().clone())
        .ports(accelerated.port())
        .splice_guard(SpliceGuard::Off)
        .attach()?;
    // A second accelerator with room for one socket: the client of each
    // connection is inserted, the server is refused, and the client leaves
    // the map again (it never paired): the cost of a selected connection
    // that cannot take the shortcut, which should now be plain TCP's.
    let fallback = Connector::tcp("127.0.0.1:0");
    let fallback_guard = Accelerator::builder()
        .cgroup(cgroup.cgroup().clone())
        .ports(fallback.port())
        .capacity(1)
        .splice_guard(SpliceGuard::Off)
        .attach()?;
    let stats_switch = BpfStatsSwitch::on();
    let prog_before = (prog_stats("fp_sk_msg"), prog_stats("fp_sock_ops"));

    let mut results = Vec::new();
    for case in cases(quick) {
        let mut m = Measured {
            name: case.name.clone(),
            unit: case.unit,
            rates: Default::default(),
            fallback: Vec::new(),
            latencies: Default::default(),
            redirected_share: 0.0,
        };
        let (mut moved, mut redirected) = (0u64, 0u64);
        for _ in 0..reps {
            for (i, path) in PATHS.iter().enumerate() {
                let conn = match path {
                    Path::Plain => &plain,
                    Path::Accelerated => &accelerated,
                    Path::Unix => &unix,
                };
                let before = guard.stats()?;
                let rate = (case.run)(conn, duration);
                if *path == Path::Accelerated {
                    moved += rate.bytes;
                    redirected += guard.stats()?.since(&before).bytes_redirected;
                }
                m.rates[i].push(rate.per_second * case.scale);
                if case.latency {
                    m.latencies[i].extend(rate.latencies_ns);
                }
            }
            if case.fallback {
                m.fallback
                    .push((case.run)(&fallback, duration).per_second * case.scale);
            }
        }
        m.latencies.iter_mut().for_each(|l| l.sort_unstable());
        m.redirected_share = redirected as f64 / moved.max(1) as f64;
        eprintln!(
            "{}: plain {:.0}, accelerated {:.0}, unix {:.0} {}",
            m.name,
            median(&m.rates[0]),
            median(&m.rates[1]),
            median(&m.rates[2]),
            m.unit
        );
        results.push(m);
    }
    let prog_after = (prog_stats("fp_sk_msg"), prog_stats("fp_sock_ops"));
    let reference = reference_table(&parent, reps, duration)?;
    let containers = container_table(cgroup.cgroup(), reps, duration)?;
    drop(stats_switch);
    let final_stats = guard.stats()?;
    let fallback_stats = fallback_guard.stats()?;
    drop((guard, fallback_guard));
    if fallback_stats.bytes_redirected != 0
        || fallback_stats.unpaired_removed != fallback_stats.sockets_inserted
    {
        return Err(format!(
            "fallback path: every inserted client should have left the map: {fallback_stats}"
        )
        .into());
    }
    drop(cgroup);

    let per = |after: (u64, u64), before: (u64, u64)| {
        (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64
    };
    let msg_ns = per(prog_after.0, prog_before.0);
    let ops_ns = per(prog_after.1, prog_before.1);
    let mut table = markdown(&results, reps, seconds, msg_ns, ops_ns, &final_stats);
    table.push_str(&containers);
    table.push_str(&reference);
    table.push_str(&proxy_table(&parent, reps, duration)?);
    println!("{table}");
    std::fs::create_dir_all(json_path.parent().unwrap())?;
    std::fs::write(&json_path, json(&results, reps, seconds, msg_ns, ops_ns))?;
    eprintln!("wrote {} in {:.0?}", json_path.display(), started.elapsed());
    Ok(())
}

fn spread(v: &[f64]) -> String {
    let min = v.iter().cloned().fold(f64::INFINITY, f64::min);
    let max = v.iter().cloned().fold(0.0, f64::max);
    let m = median(v);
    format!(
        "±{:.0}%",
        100.0 * (max - min) / (2.0 * m.max(f64::MIN_POSITIVE))
    )
}

/// Header of a markdown table comparing two paths side by side.
/// The extra sections' rows as JSON objects, for the JSON output (the
/// section's name and its path names come from the last `paths_header`).
static SECTION_JSON: std::sync::Mutex<(String, Vec<String>, Vec<String>)> =
    std::sync::Mutex::new((String::new(), Vec::new(), Vec::new()));

fn paths_header(out: &mut String, section: &str, paths: &[&str], ratios: &[&str]) {
    let columns: Vec<&str> = paths.iter().chain(ratios).copied().collect();
    let _ = writeln!(out, "| workload | unit | {} |", columns.join(" | "));
    let _ = writeln!(out, "|---|---|{}", "---|".repeat(columns.len()));
    let mut json = SECTION_JSON.lock().unwrap();
    json.0 = section.to_owned();
    json.1 = paths.iter().map(|p| p.to_string()).collect();
}

/// One workload's row: median and spread of each path, then the ratios.
fn paths_row(out: &mut String, name: &str, unit: &str, rates: &[&[f64]], ratios: &[f64]) {
    let cells: Vec<String> = rates
        .iter()
        .map(|r| format!("{} {}", num(median(r)), spread(r)))
        .chain(ratios.iter().map(|r| format!("{r:.2}x")))
        .collect();
    let _ = writeln!(out, "| {name} | {unit} | {} |", cells.join(" | "));
    let mut json = SECTION_JSON.lock().unwrap();
    let paths: Vec<String> = json
        .1
        .iter()
        .zip(rates)
        .map(|(path, r)| format!("\"{path}\":{}", json_rates(r)))
        .collect();
    let row = format!(
        "{{\"section\":\"{}\",\"name\":\"{name}\",\"unit\":\"{unit}\",{}}}",
        json.0,
        paths.join(",")
    );
    json.2.push(row);
}

/// `[r1,r2,...]` with three decimals.
fn json_rates(v: &[f64]) -> String {
    format!(
        "[{}]",
        v.iter()
            .map(|x| format!("{x:.3}"))
            .collect::<Vec<_>>()
            .join(",")
    )
}

fn num(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

fn markdown(
    results: &[Measured],
    reps: usize,
    seconds: f64,
    msg_ns: f64,
    ops_ns: f64,
    stats: &Stats,
) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "{reps} interleaved repetitions of {seconds} s per path; median (spread = half the min-max range).\n");
    let _ = writeln!(out, "| workload | unit | plain TCP | accelerated | AF_UNIX | accel/plain | accel/unix | bytes redirected |");
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
    for m in results {
        let [p, a, u] = [
            median(&m.rates[0]),
            median(&m.rates[1]),
            median(&m.rates[2]),
        ];
        let _ = writeln!(
            out,
            "| {} | {} | {} {} | {} {} | {} {} | {:.2}x | {:.2}x | {:.0}% |",
            m.name,
            m.unit,
            num(p),
            spread(&m.rates[0]),
            num(a),
            spread(&m.rates[1]),
            num(u),
            spread(&m.rates[2]),
            a / p,
            a / u,
            100.0 * m.redirected_share
        );
    }
    let _ = writeln!(out, "\nRound-trip latency (µs): p50 / p99 / p99.9 / max\n");
    let _ = writeln!(out, "| workload | plain TCP | accelerated | AF_UNIX |");
    let _ = writeln!(out, "|---|---|---|---|");
    for m in results.iter().filter(|m| !m.latencies[0].is_empty()) {
        let cell = |l: &[u64]| {
            [0.5, 0.99, 0.999, 1.0]
                .map(|p| format!("{:.1}", percentile(l, p) as f64 / 1000.0))
                .join(" / ")
        };
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} |",
            m.name,
            cell(&m.latencies[0]),
            cell(&m.latencies[1]),
            cell(&m.latencies[2])
        );
    }
    let _ = writeln!(out, "\nThe sockmap send path without the redirect: a selected socket whose sends fall back to plain TCP.\n");
    let _ = writeln!(
        out,
        "| workload | unit | plain TCP | accelerated | selected, peer refused (left the map) | that/plain |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for m in results.iter().filter(|m| !m.fallback.is_empty()) {
        let (p, a, f) = (
            median(&m.rates[0]),
            median(&m.rates[1]),
            median(&m.fallback),
        );
        let _ = writeln!(
            out,
            "| {} | {} | {} | {} | {} {} | {:.2}x |",
            m.name,
            m.unit,
            num(p),
            num(a),
            num(f),
            spread(&m.fallback),
            f / p
        );
    }
    let _ = writeln!(out, "\nBPF run time (kernel.bpf_stats_enabled): fp_sk_msg {msg_ns:.0} ns per message, fp_sock_ops {ops_ns:.0} ns per call.");
    let _ = writeln!(out, "Counters over the whole run: {} sockets inserted, {} bytes redirected, {} bytes passed, {} insert failures.", stats.sockets_inserted, stats.bytes_redirected, stats.bytes_passed, stats.insert_failed);
    out
}

fn json(results: &[Measured], reps: usize, seconds: f64, msg_ns: f64, ops_ns: f64) -> String {
    let mut out = format!("{{\"reps\":{reps},\"seconds\":{seconds},\"fp_sk_msg_ns_per_msg\":{msg_ns:.1},\"fp_sock_ops_ns_per_call\":{ops_ns:.1},\"workloads\":[");
    for (i, m) in results.iter().enumerate() {
        let rates = json_rates;
        let lat = |l: &[u64]| {
            format!(
                "[{}]",
                [0.5, 0.99, 0.999, 1.0]
                    .map(|p| percentile(l, p).to_string())
                    .join(",")
            )
        };
        let _ = write!(
            out,
            "{}{{\"name\":\"{}\",\"unit\":\"{}\",\"plain\":{},\"accelerated\":{},\"unix\":{},\"latency_ns_p50_p99_p999_max\":{{\"plain\":{},\"accelerated\":{},\"unix\":{}}},\"redirected_share\":{:.4}}}",
            if i > 0 { "," } else { "" },
            m.name, m.unit, rates(&m.rates[0]), rates(&m.rates[1]), rates(&m.rates[2]),
            lat(&m.latencies[0]), lat(&m.latencies[1]), lat(&m.latencies[2]), m.redirected_share
        );
    }
    let sections = SECTION_JSON.lock().unwrap().2.join(",");
    let _ = writeln!(out, "],\"sections\":[{sections}]}}");
    out
}
