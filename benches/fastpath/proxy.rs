//! Proxy forwarding: a user-space copy vs egress mode vs both mode.

use std::fmt::Write as _;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use sockmap_fastpath::{Accelerator, Cgroup, Forwarder, RedirectMode, SpliceGuard};
use support::connect::connect_nonblocking;
use support::relay::copy_until_eof;
use support::workloads::Connector;

use crate::cases::{bulk, interleaved, median_or_nan, rr, BoxError, Run};
use crate::report::Section;

/// client -> proxy (`front`) -> server pairs: the proxy copies in user
/// space (a thread each way), or hands the pair to one `Forwarder` (egress
/// or both mode: one thread for every pair).
fn proxy_connector(front: TcpListener, forwarder: Option<Arc<Forwarder>>) -> Connector {
    let upstream = TcpListener::bind("127.0.0.1:0").expect("bind");
    Connector::Custom(Box::new(move || {
        let client = connect_nonblocking(front.local_addr().unwrap()).unwrap();
        let (down, _) = front.accept().unwrap();
        let up = connect_nonblocking(upstream.local_addr().unwrap()).unwrap();
        let (server, _) = upstream.accept().unwrap();
        down.set_nodelay(true).unwrap();
        up.set_nodelay(true).unwrap();
        match &forwarder {
            Some(forwarder) => {
                // Served until the pair ends; the benchmark needs no result.
                drop(forwarder.forward(down, up).expect("forward"));
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
pub fn proxy_table(parent: &Cgroup, reps: usize, duration: Duration) -> Result<Section, BoxError> {
    let cgroup = parent.create_child(&format!(
        "sockmap-fastpath-bench-proxy-{}",
        std::process::id()
    ))?;
    support::signals::also_remove_on_signal(cgroup.as_path().to_owned());
    cgroup.add_process(std::process::id())?;
    let egress = Accelerator::builder()
        .redirect(RedirectMode::Egress)
        .attach()?;
    let both_front = TcpListener::bind("127.0.0.1:0")?;
    let both = Accelerator::builder()
        .cgroup(cgroup.cgroup().clone())
        .redirect(RedirectMode::Both)
        .ports([both_front.local_addr()?.port()])
        .splice_guard(SpliceGuard::Off)
        .attach()?;
    let connectors = [
        proxy_connector(TcpListener::bind("127.0.0.1:0")?, None),
        proxy_connector(
            TcpListener::bind("127.0.0.1:0")?,
            Some(Arc::new(egress.forwarder()?)),
        ),
        proxy_connector(both_front, Some(Arc::new(both.forwarder()?))),
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
    let mut section = Section::new(
        "proxy",
        "Proxy forwarding, unpinned: a proxy copying in user space vs the kernel forwarding the pair (egress mode) vs both mode (the client's bytes leave straight through the upstream socket, the server's go straight into the client's queue).",
        &["user-space copy", "egress mode", "both mode"],
        &["egress/copy", "both/copy"],
    );
    let mut failures = String::new();
    for (name, unit, scale, run) in cases {
        let mut rates = interleaved(connectors.len(), reps, |i| {
            // A workload panics when a send or receive fails: recorded as
            // a failed run (NaN), the section goes on.
            let measured = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                run(&connectors[i], duration).per_second * scale
            }));
            Ok(measured.unwrap_or(f64::NAN))
        })?;
        for (path, rates) in ["user-space copy", "egress mode", "both mode"]
            .iter()
            .zip(rates.iter_mut())
        {
            if rates.iter().any(|r| r.is_nan()) {
                let failed = rates.iter().filter(|r| r.is_nan()).count();
                let _ = writeln!(
                    failures,
                    "- {name}, {path}: {failed} of {reps} runs failed (the panic message above says why)"
                );
                rates.clear();
            }
        }
        let copy = median_or_nan(&rates[0]);
        let ratios = [
            median_or_nan(&rates[1]) / copy,
            median_or_nan(&rates[2]) / copy,
        ];
        eprintln!(
            "{name}: copy {copy:.2} {unit}; egress {:.2}x, both {:.2}x",
            ratios[0], ratios[1]
        );
        section.row(name, unit, &rates, &ratios);
    }
    if !failures.is_empty() {
        let _ = write!(section.text, "\nFailed (\"failed\" above):\n\n{failures}");
    }
    let (egress, both) = (egress.stats()?, both.stats()?);
    if egress.fwd_bytes == 0 || both.fwd_direct_bytes == 0 {
        return Err(
            format!("kernel forwarding moved no bytes: egress {egress}\nboth {both}").into(),
        );
    }
    let _ = writeln!(
        section.text,
        "\nIn this section: egress mode forwarded {} bytes; both mode forwarded {} bytes from the server, sent {} client bytes straight upstream, and redirected {} bytes (server bytes into the clients' queues, client bytes into the proxy's downstream queue while the upstream had no room, copied upstream by wait()).",
        egress.fwd_bytes, both.fwd_bytes, both.fwd_direct_bytes, both.bytes_redirected
    );
    drop(connectors);
    Ok(section)
}
