//! A proxy at scale: 1, 100 and thousands of concurrent pairs through a
//! proxy process of each kind (tokio `copy_bidirectional`, a splice relay,
//! this crate's `Forwarder` in egress and in both mode), side by side:
//! throughput, request/response p99, and the proxy's threads and peak
//! resident memory.

mod load;
mod proxies;
mod splice_relay;

use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use sockmap_fastpath::Cgroup;
use support::signals;

use crate::cases::{median_or_nan, percentile, BoxError};
use crate::report::Section;
use load::{Load, Workload};
use proxies::ProxyKind;
pub use proxies::{proxy_role, ROLE_ARG};

const WORKLOADS: [Workload; 5] = [
    Workload::RequestResponse(1 << 10),
    Workload::Upload(4 << 10),
    Workload::Upload(64 << 10),
    Workload::Download(4 << 10),
    Workload::Download(64 << 10),
];

/// A part of the section to run alone (`--scale-pairs N`,
/// `--scale-workload NAME-PREFIX`, `--scale-proxies KIND,KIND`), for how
/// long (`--scale-seconds S` per measurement: long enough to profile a
/// proxy with `perf record -p`), and with how many `Forwarder` threads
/// (`--scale-forwarder-threads N`; default: one per CPU), for looking into
/// one row; and how long every connection may take to reach the server
/// (`--scale-establish-seconds S`, default 60: slower machines, such as an
/// emulated guest at 10,000 pairs, need longer).
#[derive(Default)]
pub struct Only {
    pub pairs: Option<usize>,
    pub workload: Option<String>,
    /// The proxies to measure (`ProxyKind::arg` names); the others' cells
    /// show "-".
    pub proxies: Option<Vec<String>>,
    pub seconds: Option<f64>,
    pub establish_seconds: Option<f64>,
    pub forwarder_threads: Option<usize>,
}

/// The value of `--name S`, a positive number of seconds, if given.
fn seconds_arg(args: &[String], name: &str) -> Result<Option<f64>, BoxError> {
    match crate::arg_value(args, name) {
        Some(s) => Ok(Some(
            s.parse::<f64>()
                .ok()
                .filter(|s| *s > 0.0 && s.is_finite())
                .ok_or_else(|| format!("{name} {s}: not a positive number"))?,
        )),
        None => Ok(None),
    }
}

impl Only {
    pub fn from_args(args: &[String]) -> Result<Only, BoxError> {
        let pairs = match crate::arg_value(args, "--scale-pairs") {
            Some(n) => Some(
                n.parse()
                    .map_err(|_| format!("--scale-pairs {n}: not a number"))?,
            ),
            None => None,
        };
        let seconds = seconds_arg(args, "--scale-seconds")?;
        let establish_seconds = seconds_arg(args, "--scale-establish-seconds")?;
        let proxies = match crate::arg_value(args, "--scale-proxies") {
            Some(list) => {
                let names: Vec<String> = list.split(',').map(str::to_owned).collect();
                if let Some(unknown) = names.iter().find(|n| ProxyKind::from_arg(n).is_none()) {
                    let known: Vec<&str> = ProxyKind::ALL.iter().map(|k| k.arg()).collect();
                    return Err(format!(
                        "--scale-proxies: unknown proxy {unknown:?} (known: {})",
                        known.join(",")
                    )
                    .into());
                }
                Some(names)
            }
            None => None,
        };
        let forwarder_threads =
            match crate::arg_value(args, "--scale-forwarder-threads") {
                Some(n) => Some(n.parse().ok().filter(|n| *n > 0).ok_or_else(|| {
                    format!("--scale-forwarder-threads {n}: not a positive number")
                })?),
                None => None,
            };
        Ok(Only {
            pairs,
            forwarder_threads,
            workload: crate::arg_value(args, "--scale-workload").map(str::to_owned),
            proxies,
            seconds,
            establish_seconds,
        })
    }

    fn proxy(&self, kind: ProxyKind) -> bool {
        self.proxies
            .as_ref()
            .is_none_or(|names| names.iter().any(|n| n == kind.arg()))
    }

    fn workload(&self, workload: Workload) -> bool {
        self.workload
            .as_ref()
            .is_none_or(|prefix| workload.name().starts_with(prefix.as_str()))
    }
}

/// The largest number of pairs this process's open-file limit allows:
/// the bench holds two sockets per pair (client and server), and so does
/// the proxy (downstream and upstream). 10,000 where the limit allows.
fn largest_scale(open_files: u64) -> usize {
    let pairs = (open_files.saturating_sub(512) / 2).min(10_000) as usize;
    pairs / 500 * 500
}

/// The scale tables: throughput, request/response p99, proxy resources.
pub fn scale_tables(parent: &Cgroup, quick: bool, only: &Only) -> Result<Vec<Section>, BoxError> {
    let cgroup = parent.create_child(&format!(
        "sockmap-fastpath-bench-scale-{}",
        std::process::id()
    ))?;
    signals::also_remove_on_signal(cgroup.as_path().to_owned());
    cgroup.add_process(std::process::id())?;
    let open_files = support::limits::raise_open_files(1 << 20)?;
    let largest = largest_scale(open_files);
    let scales = match only.pairs {
        Some(pairs) => vec![pairs.min(largest)],
        None => vec![1, 100, if quick { largest.min(1000) } else { largest }],
    };
    let (reps, warmup, duration) = if quick {
        (1, Duration::from_millis(100), Duration::from_millis(300))
    } else {
        (3, Duration::from_millis(300), Duration::from_secs(1))
    };
    let duration = only.seconds.map_or(duration, Duration::from_secs_f64);
    let establish = Duration::from_secs_f64(only.establish_seconds.unwrap_or(60.0));
    let load = Load::new(establish)?;
    let kinds: Vec<&'static str> = ProxyKind::ALL.iter().map(|k| k.name()).collect();
    let mut throughput = Section::new(
        "scale",
        &format!(
            "Proxy at scale, unpinned: concurrent pairs through a proxy process of each kind, {reps} interleaved repetition(s) of {} s each (one above 1,000 pairs); \"best\" is the faster user-space proxy of the row. The largest scale is what this process's open-file limit ({open_files}) allows, up to 10,000.",
            duration.as_secs_f64()
        ),
        &kinds,
        &["egress/best", "both/best", "adaptive/best"],
    );
    let mut latency = Section::new(
        "scale-p99",
        "Request/response 1 KiB round-trip p99 through each proxy (µs; lower is better; the ratios are the kernel path's p99 over the best user-space one's, below 1.00x is better):",
        &kinds,
        &["egress/best", "both/best", "adaptive/best"],
    );
    let mut resources = Section::new(
        "scale-resources",
        "The proxy process's threads (most seen at the end of a measurement) and peak resident memory (VmHWM, MiB), per scale; and the most the machine's memory in use (MemTotal - MemAvailable) rose during a run of that proxy, which includes the kernel's socket buffers and queues (and the benchmark's own clients and server):",
        &kinds,
        &[],
    );
    let mut cpu = Section::new(
        "scale-cpu",
        "CPU time per unit of work while measuring (µs per round trip, ms per GiB moved): the whole machine's busy time (every CPU, including softirqs and kworkers), the benchmark's clients and server (one process), and the proxy process. The machine's figure less the two processes' is the kernel's work outside their threads (softirqs that interrupted another task, the psock backlog's kworkers):",
        &kinds,
        &[],
    );
    let mut counters = String::new();
    let mut failures = String::new();
    for pairs in scales {
        // Thousands of pairs take minutes per row: one repetition there.
        let reps = if pairs > 1000 { 1 } else { reps };
        let max_pipes = (open_files as usize).saturating_sub(2 * pairs + 512) / 2;
        let mut children = ProxyKind::ALL
            .iter()
            .map(|&kind| {
                ProxyChild::spawn(kind, load.server_port(), max_pipes, only.forwarder_threads)
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut threads = vec![0.0f64; children.len()];
        let mut memory_rise = vec![0.0f64; children.len()];
        for workload in WORKLOADS.into_iter().filter(|w| only.workload(*w)) {
            let name = format!("{}, {pairs} pairs", workload.name());
            let mut cells: Vec<Cell> = children.iter().map(|_| Cell::default()).collect();
            for _ in 0..reps {
                for (i, child) in children.iter_mut().enumerate() {
                    if !only.proxy(child.kind) {
                        (cells[i].rates, cells[i].p99s) = (vec![f64::NAN], vec![f64::NAN]);
                        cells[i].cpu = [vec![f64::NAN], vec![f64::NAN], vec![f64::NAN]];
                        continue;
                    }
                    if cells[i].failure.is_some() {
                        continue;
                    }
                    if let Some(broken) = &child.broken {
                        cells[i].failure = Some(broken.clone());
                        continue;
                    }
                    let measured = load.run(
                        workload,
                        child.port,
                        child.child.id(),
                        pairs,
                        (warmup, duration),
                        || threads[i] = threads[i].max(child.threads() as f64),
                    );
                    let per_unit = workload.cpu_unit_scale();
                    cells[i].cpu[0].push(measured.cpu_per_op.machine * per_unit);
                    cells[i].cpu[1].push(measured.cpu_per_op.load * per_unit);
                    cells[i].cpu[2].push(measured.cpu_per_op.proxy * per_unit);
                    let rise = measured.memory_rise_kib as f64 / 1024.0;
                    memory_rise[i] = memory_rise[i].max(rise);
                    cells[i].failure = measured.failure;
                    cells[i].rates.push(measured.per_second * workload.scale());
                    if !measured.latencies_ns.is_empty() {
                        let p99 = percentile(&measured.latencies_ns, 0.99);
                        cells[i].p99s.push(p99 as f64 / 1e3);
                    }
                    if let Err(err) = child.wait_released() {
                        child.broken = Some(err.to_string());
                    }
                }
            }
            for (cell, child) in cells.iter_mut().zip(&children) {
                if let Some(failure) = &cell.failure {
                    eprintln!("{name}: {} failed: {failure}", child.kind.name());
                    let _ = writeln!(failures, "- {name}, {}: {failure}", child.kind.name());
                    (cell.rates, cell.p99s) = (Vec::new(), Vec::new());
                    cell.cpu = Default::default();
                }
            }
            let rates: Vec<Vec<f64>> = cells.iter().map(|c| c.rates.clone()).collect();
            let medians: Vec<f64> = rates.iter().map(|r| median_or_nan(r)).collect();
            let best = medians[0].max(medians[1]);
            let ratios = [medians[2] / best, medians[3] / best, medians[4] / best];
            eprintln!(
                "{name}: best user space {best:.2} {}; egress {:.2}x, both {:.2}x, adaptive {:.2}x",
                workload.unit(),
                ratios[0],
                ratios[1],
                ratios[2]
            );
            throughput.row(&name, workload.unit(), &rates, &ratios);
            for (k, whose) in ["machine", "clients and server", "proxy"]
                .iter()
                .enumerate()
            {
                let figures: Vec<Vec<f64>> = cells.iter().map(|c| c.cpu[k].clone()).collect();
                cpu.row(
                    &format!("{name}: {whose}"),
                    workload.cpu_unit(),
                    &figures,
                    &[],
                );
            }
            if let Workload::RequestResponse(_) = workload {
                let p99s: Vec<Vec<f64>> = cells.iter().map(|c| c.p99s.clone()).collect();
                let p: Vec<f64> = p99s.iter().map(|r| median_or_nan(r)).collect();
                let best = p[0].min(p[1]);
                let ratios = [p[2] / best, p[3] / best, p[4] / best];
                latency.row(&name, "µs p99", &p99s, &ratios);
            }
        }
        // One figure per proxy; "-" for those not measured.
        let figures = |figure: &dyn Fn(usize) -> f64| -> Vec<Vec<f64>> {
            (0..children.len())
                .map(|i| match only.proxy(children[i].kind) {
                    true => vec![figure(i)],
                    false => vec![f64::NAN],
                })
                .collect()
        };
        let thread_rows = figures(&|i| threads[i]);
        let rss = figures(&|i| children[i].peak_rss_kib() as f64 / 1024.0);
        let rise = figures(&|i| memory_rise[i]);
        resources.row(
            &format!("threads, {pairs} pairs"),
            "threads",
            &thread_rows,
            &[],
        );
        resources.row(&format!("peak RSS, {pairs} pairs"), "MiB", &rss, &[]);
        resources.row(
            &format!("machine memory rise, {pairs} pairs"),
            "MiB",
            &rise,
            &[],
        );
        for child in children.drain(..) {
            let kind = child.kind;
            let said = child.finish()?;
            if kind.in_kernel() && only.proxy(kind) {
                // The adaptive proxy relays bulk itself: with bulk rows
                // alone, the kernel rightly forwards nothing.
                if kind != ProxyKind::Adaptive {
                    check_kernel_forwarded(kind, &said)?;
                }
                let _ = writeln!(counters, "- {}, {pairs} pairs: {said}", kind.name());
            }
        }
    }
    if !failures.is_empty() {
        let _ = write!(
            throughput.text,
            "\nFailed (\"failed\" above):\n\n{failures}"
        );
    }
    let _ = write!(
        resources.text,
        "\nThe kernel proxies' counters over each scale's runs (bytes the forwarding program moved):\n\n{counters}"
    );
    drop(load);
    cgroup.remove()?;
    Ok(vec![throughput, latency, resources, cpu])
}

/// One proxy's measurements of one row.
#[derive(Default)]
struct Cell {
    rates: Vec<f64>,
    p99s: Vec<f64>,
    /// CPU per unit of work: the machine's, the load's, the proxy's.
    cpu: [Vec<f64>; 3],
    failure: Option<String>,
}

/// The counters a kernel proxy printed show that the kernel moved bytes.
fn check_kernel_forwarded(kind: ProxyKind, said: &str) -> Result<(), BoxError> {
    let counter = |name: &str| -> u64 {
        said.split_whitespace()
            .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
            .unwrap_or(0)
    };
    // Both mode: bytes the forwarding program moved (from the server), or
    // sent straight upstream (from the client).
    let moved = match kind {
        ProxyKind::Egress => counter("fwd_bytes"),
        _ => counter("fwd_bytes") + counter("fwd_direct_bytes"),
    };
    if moved == 0 {
        return Err(format!("{}: the kernel forwarded nothing: {said}", kind.name()).into());
    }
    Ok(())
}

/// A proxy process serving on `port`; killed if dropped before `finish`.
struct ProxyChild {
    kind: ProxyKind,
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    port: u16,
    /// Open files while no pair is open.
    idle_fds: usize,
    /// Why it can take no more runs (it kept a run's pairs open).
    broken: Option<String>,
}

impl ProxyChild {
    fn spawn(
        kind: ProxyKind,
        upstream_port: u16,
        max_pipes: usize,
        forwarder_threads: Option<usize>,
    ) -> Result<Self, BoxError> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args([
                ROLE_ARG,
                kind.arg(),
                &upstream_port.to_string(),
                &max_pipes.to_string(),
                &forwarder_threads.unwrap_or(0).to_string(),
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        signals::unblock_in_child(&mut command);
        die_with_parent(&mut command);
        let mut child = command.spawn()?;
        let stdin = child.stdin.take();
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut line = String::new();
        stdout.read_line(&mut line)?;
        let mut proxy = ProxyChild {
            kind,
            child,
            stdin,
            stdout,
            port: 0,
            idle_fds: 0,
            broken: None,
        };
        proxy.port = line
            .trim()
            .parse()
            .map_err(|_| format!("{} proxy did not start: {line:?}", kind.name()))?;
        // Its runtime or epoll is up shortly after it prints the port.
        std::thread::sleep(Duration::from_millis(200));
        proxy.idle_fds = proxy.open_fds();
        Ok(proxy)
    }

    fn status(&self, field: &str) -> u64 {
        load::proc_field(&format!("/proc/{}/status", self.child.id()), field)
    }

    fn threads(&self) -> u64 {
        self.status("Threads:")
    }

    fn peak_rss_kib(&self) -> u64 {
        self.status("VmHWM:")
    }

    fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    /// Waits until the proxy has closed the pairs of the last run, so the
    /// next run's pairs fit in its open-file limit; a proxy that keeps
    /// them is an error (a leak).
    fn wait_released(&self) -> Result<(), BoxError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let open = self.open_fds();
            if open <= self.idle_fds + 16 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "{} proxy still has {open} files open 20 s after its clients closed (idle: {})",
                    self.kind.name(),
                    self.idle_fds
                )
                .into());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes its stdin; what it printed before exiting.
    fn finish(mut self) -> Result<String, BoxError> {
        drop(self.stdin.take());
        let mut said = String::new();
        self.stdout.read_line(&mut said)?;
        let status = self.child.wait()?;
        if !status.success() {
            return Err(format!("{} proxy exited with {status}", self.kind.name()).into());
        }
        Ok(said.trim().to_owned())
    }
}

/// The proxy child is killed if the benchmark dies (e.g. by the OOM
/// killer), instead of holding its pairs and programs on.
fn die_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and only calls
    // prctl(PR_SET_PDEATHSIG), which is async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
        });
    }
}

impl Drop for ProxyChild {
    fn drop(&mut self) {
        if self.stdin.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}
