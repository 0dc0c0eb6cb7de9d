//! Side-by-side benchmarks: plain loopback TCP, TCP accelerated by this
//! crate, and AF_UNIX stream sockets, interleaved (ABCABC...) and repeated;
//! median and spread per workload. Needs root.
//!
//! `cargo bench --bench fastpath -- [--quick] [--json PATH] [--markdown PAGE]`
//! (`--scale-only [--scale-pairs N] [--scale-workload PREFIX]
//! [--scale-proxies splice,adaptive,...] [--scale-seconds S]
//! [--scale-forwarder-threads N] [--scale-establish-seconds S]`: just the proxy-at-scale tables, or one
//! scale, workload or proxy of them, with measurements of S seconds and
//! N `Forwarder` threads, printed; `--main-only`: just the main table;
//! `--demote-streaming`: its accelerated path with
//! `AcceleratorBuilder::demote_streaming(StreamingDemotion::default())`;
//! `--receive-queue-limit BYTES`: its accelerated path with that
//! `AcceleratorBuilder::receive_queue_limit`.)
//!
//! Writes markdown tables to stdout and JSON to `target/bench/fastpath.json`
//! (or PATH); with `--markdown docs/benchmarks.md` it also replaces that
//! page's generated part. `--quick` finishes in well under two minutes.
//!
//! The scale section starts this binary again as its proxy processes
//! (`--scale-proxy KIND UPSTREAM_PORT MAX_PIPES FORWARDER_THREADS`, see
//! `scale/proxies.rs`).

mod bpf_stats;
mod cases;
mod containers;
mod proxy;
mod reference;
mod report;
mod scale;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use sockmap_fastpath::{Accelerator, Cgroup, SpliceGuard, StreamingDemotion};
use support::signals;
use support::workloads::Connector;

use bpf_stats::{ns_per_call, prog_stats, BpfStatsSwitch};
use cases::{cases, median, Measured, Path, PATHS};
use containers::container_table;
use proxy::proxy_table;
use reference::reference_tables;
use scale::scale_tables;

/// The argument after `name` (`--name VALUE`), if given.
fn arg_value<'a>(args: &'a [String], name: &str) -> Option<&'a str> {
    let at = args.iter().position(|a| a == name)?;
    args.get(at + 1).map(String::as_str)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(role) = args.iter().position(|a| a == scale::ROLE_ARG) {
        scale::proxy_role(&args[role + 1..]);
    }
    let quick = args.iter().any(|a| a == "--quick");
    let json_path: PathBuf = arg_value(&args, "--json")
        .map(Into::into)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/bench/fastpath.json")
        });
    let markdown_page: Option<PathBuf> = arg_value(&args, "--markdown").map(Into::into);
    let (seconds, reps) = if quick { (0.25, 3) } else { (1.0, 5) };
    let duration = Duration::from_secs_f64(seconds);
    if !nix::unistd::Uid::effective().is_root() {
        return Err("the benchmarks load BPF programs: run as root".into());
    }
    let started = Instant::now();
    let demote = args.iter().any(|a| a == "--demote-streaming");
    let main_only = args.iter().any(|a| a == "--main-only");

    let parent = Cgroup::current()?;
    if args.iter().any(|a| a == "--scale-only") {
        for section in scale_tables(&parent, quick, &scale::Only::from_args(&args)?)? {
            println!("{}", section.text);
        }
        eprintln!("scale section in {:.0?}", started.elapsed());
        return Ok(());
    }
    let cgroup = parent.create_child(&format!("sockmap-fastpath-bench-{}", std::process::id()))?;
    signals::remove_cgroup_on_signal(parent.clone(), cgroup.as_path().to_owned());
    cgroup.add_process(std::process::id())?;
    let plain = Connector::tcp("127.0.0.1:0");
    let accelerated = Connector::tcp("127.0.0.1:0");
    let unix = Connector::unix(
        std::env::temp_dir().join(format!("fastpath-bench-{}.sock", std::process::id())),
    );
    // The benchmark's own traffic never splices (see README, splice guard).
    let mut builder = Accelerator::builder()
        .cgroup(cgroup.cgroup().clone())
        .ports(accelerated.port())
        .splice_guard(SpliceGuard::Off);
    if demote {
        builder = builder.demote_streaming(StreamingDemotion::default());
    }
    if let Some(limit) = arg_value(&args, "--receive-queue-limit") {
        builder = builder.receive_queue_limit(limit.parse()?);
    }
    let guard = builder.attach()?;
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
    let mut sections = Vec::new();
    if !main_only {
        sections.push(container_table(cgroup.cgroup(), reps, duration)?);
        sections.extend(reference_tables(&parent, reps, duration)?);
    }
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

    if !main_only {
        sections.push(proxy_table(&parent, reps, duration)?);
        sections.extend(scale_tables(&parent, quick, &scale::Only::default())?);
    }
    let run = report::Run {
        reps,
        seconds,
        results: &results,
        msg_ns: ns_per_call(prog_after.0, prog_before.0),
        ops_ns: ns_per_call(prog_after.1, prog_before.1),
        stats: &final_stats,
        sections: &sections,
    };
    println!("{}", run.markdown());
    std::fs::create_dir_all(json_path.parent().unwrap())?;
    std::fs::write(&json_path, run.json()?)?;
    if let Some(page) = markdown_page {
        run.write_into_page(&page, quick)?;
        eprintln!("updated {}", page.display());
    }
    eprintln!("wrote {} in {:.0?}", json_path.display(), started.elapsed());
    Ok(())
}
