//! Our programs vs a minimal reference redirect (what the safety checks
//! cost), and batching experiments on the reference program.

use std::fmt::Write as _;
use std::time::Duration;

use sockmap_fastpath::{Accelerator, Cgroup, SpliceGuard};
use support::reference;
use support::workloads::{self, Connector};

use crate::bpf_stats::{ns_per_call, prog_stats};
use crate::cases::{bulk, interleaved, median, rr, BoxError, Run, PINNED};
use crate::report::Section;

/// Our programs vs the minimal reference redirect, each attached to its own
/// child cgroup, interleaved: what the safety checks cost.
pub fn reference_tables(
    parent: &Cgroup,
    reps: usize,
    duration: Duration,
) -> Result<[Section; 2], BoxError> {
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
    let in_cgroup = |cg: &Cgroup, f: &mut dyn FnMut()| -> Result<(), BoxError> {
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
    let mut section = Section::new(
        "reference",
        "Our programs vs a minimal reference redirect (examples/support/reference.bpf.c: IPv4 only, no netns, no policy, no ordering fallback; never use it), interleaved:",
        &["sockmap-fastpath", "minimal reference"],
        &["ratio"],
    );
    let cgroups = [ours_cg.cgroup(), ref_cg.cgroup()];
    for (name, unit, scale, run) in cases {
        let rates = interleaved(2, reps, |i| {
            let mut rate = 0.0;
            in_cgroup(cgroups[i], &mut || {
                rate = run(&connectors[i], duration).per_second * scale
            })?;
            Ok(rate)
        })?;
        let ratio = median(&rates[0]) / median(&rates[1]);
        section.row(name, unit, &rates, &[ratio]);
    }
    let after = programs.map(|(m, o)| (prog_stats(m), prog_stats(o)));
    let per = ns_per_call;
    let _ = writeln!(
        section.text,
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
    let mut batching = Section::new(
        "batching",
        &format!("Batching experiments on the reference program: bpf_msg_apply_bytes({BATCH}) (one verdict per {kib} KiB instead of per message) and bpf_msg_cork_bytes({BATCH}) (small writes redirected in {kib} KiB batches). Cork is NOT usable: a request smaller than the cork waits forever, and bytes still corked at close are dropped (its received totals are short by up to {kib} KiB per connection).", kib = BATCH >> 10),
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
        let rates = interleaved(columns.len(), reps, |i| {
            let (cg, conn) = &columns[i];
            let mut rate = 0.0;
            in_cgroup(cg, &mut || {
                rate = workloads::bulk(&connectors[*conn], size, duration, PINNED).per_second * 1e-9
            })?;
            Ok(rate)
        })?;
        let plain = median(&rates[0]);
        let ratios = [1, 2, 3].map(|i| median(&rates[i]) / plain);
        batching.row(
            &format!("bulk {size} B writes, one CPU"),
            "Gbit/s",
            &rates,
            &ratios,
        );
    }
    drop(connectors);
    drop(ours);
    Ok([section, batching])
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
) -> Result<(reference::ReferenceSkel<'static>, libbpf_rs::Link), BoxError> {
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
