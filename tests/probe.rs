//! probe() reports this kernel from real attempts and leaves nothing behind.

mod common;
use common::*;

use sockmap_fastpath::{probe, Accelerator, Finding};

#[test]
fn probe_reports_this_kernel_and_leaves_nothing_behind() {
    let Some(env) = privileged_env() else { return };
    let baseline = loaded_programs();
    let report = probe();
    println!("{report}");
    for (name, finding) in [
        ("privileges", &report.privileges),
        ("btf", &report.btf),
        ("cgroup2", &report.cgroup2),
        ("programs_load", &report.programs_load),
        ("sockmap_link", &report.sockmap_link),
        ("redirect", &report.redirect),
        ("fionread", &report.fionread_counts_redirected),
        ("both_mode", &report.both_mode),
    ] {
        assert!(finding.is_yes(), "{name}: {finding:?}");
    }
    assert!(report.can_accelerate());
    // FACTS.md: this kernel's splice does not read redirected bytes.
    assert!(
        matches!(report.splice_reads_redirected, Finding::No(_)),
        "{:?}",
        report.splice_reads_redirected
    );
    // FACTS.md: on this kernel a map member reads FIONREAD 0 while plain
    // bytes wait (why tests/pairing.rs keeps unpaired sockets out).
    assert!(
        matches!(report.fionread_counts_plain_in_map, Finding::No(ref t) if t.starts_with("0 of")),
        "{:?}",
        report.fionread_counts_plain_in_map
    );
    // The guard finding agrees with what attach() does by default.
    let attached = Accelerator::builder().cgroup(env.cgroup.cgroup()).attach();
    assert_eq!(
        report.splice_guard.is_yes(),
        attached.is_ok(),
        "{:?} vs {attached:?}",
        report.splice_guard
    );
    drop(attached);
    assert!(
        report.duration.as_millis() < 1000,
        "took {:?}",
        report.duration
    );

    let children = std::fs::read_dir(env.cgroup.path())
        .unwrap()
        .filter(|e| e.as_ref().unwrap().file_type().unwrap().is_dir())
        .count();
    assert_eq!(children, 0, "probe removed its cgroup");
    assert_eq!(
        env.cgroup.cgroup().processes().unwrap(),
        vec![std::process::id()]
    );
    assert_nothing_left(&env.cgroup.cgroup(), &baseline);
}
