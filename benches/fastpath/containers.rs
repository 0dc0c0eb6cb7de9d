//! Container to container: two namespaces joined by a bridge, plain vs
//! accelerated through a namespace group.

use std::fmt::Write as _;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use sockmap_fastpath::{Accelerator, Cgroup, SpliceGuard};
use support::connect::connect_nonblocking;
use support::netns::{ip, run_in, NetNs};
use support::workloads::Connector;

use crate::cases::{bulk, interleaved, median, rr, BoxError, Run, PINNED};
use crate::report::Section;

/// Container to container: two namespaces, each joined by veth to a bridge
/// in a third (the "host"), as container runtimes do. Plain TCP vs TCP
/// accelerated through a namespace group, interleaved, in `cgroup`.
pub fn container_table(
    cgroup: &Cgroup,
    reps: usize,
    duration: Duration,
) -> Result<Section, BoxError> {
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
    let mut section = Section::new(
        "containers",
        "Container to container: two network namespaces, each joined by veth to a bridge in a third, plain TCP vs accelerated (`namespace_group`), interleaved:",
        &["plain TCP", "accelerated"],
        &["accel/plain"],
    );
    for (name, unit, scale, run) in cases {
        let rates = interleaved(connectors.len(), reps, |i| {
            Ok(run(&connectors[i], duration).per_second * scale)
        })?;
        let ratio = median(&rates[1]) / median(&rates[0]);
        eprintln!("container {name}: {ratio:.2}x plain");
        section.row(name, unit, &rates, &[ratio]);
    }
    let stats = guard.stats()?;
    if stats.bytes_redirected == 0 {
        return Err(format!("nothing redirected between the namespaces: {stats}").into());
    }
    let _ = writeln!(
        section.text,
        "\nRedirected between the namespaces in this section: {} bytes.",
        stats.bytes_redirected
    );
    drop(connectors);
    Ok(section)
}
