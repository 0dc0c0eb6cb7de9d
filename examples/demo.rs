//! sockmap-fastpath demo: the same loopback traffic with and without the
//! shortcut, side by side, with the counters that prove which path it took.
//!
//! Run as root: `cargo run --release --example demo [-- --seconds N]`.
//! It creates a child cgroup of its own cgroup, moves itself in, attaches
//! there (never to the root cgroup), and removes everything on exit.

use std::time::Duration;

use sockmap_fastpath::{Accelerator, Cgroup, RedirectMode, Stats};
use support::workloads::{self, Connector, Rate};
use support::{attach, signals};

type Workload = (&'static str, &'static str, fn(&Connector, Duration) -> Rate);

const CPU: Option<usize> = Some(0);

const WORKLOADS: &[Workload] = &[
    ("request/response 1 B", "trips/s", |l, d| {
        workloads::request_response(l, 1, d, CPU)
    }),
    ("request/response 1 KiB", "trips/s", |l, d| {
        workloads::request_response(l, 1024, d, CPU)
    }),
    ("request/response 64 KiB", "trips/s", |l, d| {
        workloads::request_response(l, 65536, d, CPU)
    }),
    ("bulk, 64 KiB writes", "Gbit/s", |l, d| {
        scale(workloads::bulk(l, 65536, d, CPU), 1e-9)
    }),
    ("bulk, 4 KiB writes", "Gbit/s", |l, d| {
        scale(workloads::bulk(l, 4096, d, CPU), 1e-9)
    }),
];

fn scale(rate: Rate, factor: f64) -> Rate {
    Rate {
        per_second: rate.per_second * factor,
        ..rate
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let seconds: f64 = std::env::args()
        .skip_while(|a| a != "--seconds")
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1.0);
    let duration = Duration::from_secs_f64(seconds);

    let report = sockmap_fastpath::probe();
    println!("{report}");
    if !report.can_accelerate() {
        return Err("this kernel cannot accelerate (see the probe above)".into());
    }

    let parent = Cgroup::current()?;
    let cgroup = parent.create_child(&format!("sockmap-fastpath-demo-{}", std::process::id()))?;
    signals::remove_cgroup_on_signal(parent.clone(), cgroup.as_path().to_owned());
    cgroup.add_process(std::process::id())?;
    println!("cgroup: {}", cgroup.as_path().display());

    // Two listeners: the policy selects only the accelerated one's port, so
    // the plain runs share the same process, cgroup and programs.
    let plain = Connector::tcp("127.0.0.1:0");
    let accelerated = Connector::tcp("127.0.0.1:0");
    let builder = Accelerator::builder()
        .cgroup(cgroup.cgroup().clone())
        .ports(accelerated.port())
        .redirect(RedirectMode::Ingress);
    let guard = attach::attach_or_without_splice_guard(builder, "demo")?;
    println!("attached: {guard:?}; both ends pinned to CPU 0; {seconds} s per run\n");

    println!(
        "| workload | unit | plain TCP | sockmap-fastpath | ratio | bytes redirected / moved |"
    );
    println!("|---|---|---|---|---|---|");
    let mut total = Stats::default();
    for (name, unit, run) in WORKLOADS {
        let plain_rate = run(&plain, duration);
        let before = guard.stats()?;
        let fast_rate = run(&accelerated, duration);
        let delta = guard.stats()?.since(&before);
        println!(
            "| {name} | {unit} | {} | {} | {:.2}x | {} / {} |",
            human(plain_rate.per_second),
            human(fast_rate.per_second),
            fast_rate.per_second / plain_rate.per_second,
            delta.bytes_redirected,
            fast_rate.bytes,
        );
        total = total + delta;
    }
    println!("\ncounters of the accelerated runs:\n{total}");
    let final_stats = guard.detach()?;
    println!(
        "detached; {} sockets were accelerated in total",
        final_stats.sockets_inserted
    );
    drop(cgroup);
    Ok(())
}

fn human(v: f64) -> String {
    if v >= 1000.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}
