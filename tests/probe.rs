//! probe() reports this kernel from real attempts and leaves nothing behind.

mod common;
use common::*;

use sockmap_fastpath::{probe, Accelerator, Finding};

#[test]
fn probe_reports_this_kernel_and_leaves_nothing_behind() {
    let Some(env) = privileged_env() else { return };
    let baseline = loaded_programs();
    // The caller's cgroup never changes, not even for a moment.
    let cgroup_file = || std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let before = cgroup_file();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut seen = std::collections::BTreeSet::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                seen.insert(cgroup_file());
            }
            seen
        })
    };
    let report = probe();
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let seen = watcher.join().unwrap();
    assert_eq!(
        seen,
        std::collections::BTreeSet::from([before.clone()]),
        "probe() moved this process"
    );
    assert_eq!(cgroup_file(), before);
    println!("{report}");
    for (name, finding) in [
        ("privileges", &report.privileges),
        ("btf", &report.btf),
        ("cgroup2", &report.cgroup2),
        ("programs_load", &report.programs_load),
        ("redirect", &report.redirect),
    ] {
        assert!(finding.is_yes(), "{name}: {finding:?}");
    }
    // Kernel-dependent (6.1 says no to some): tested either way, never
    // left untested.
    for (name, finding) in [
        ("socket_owners", &report.socket_owners),
        ("splice_guard", &report.splice_guard),
        ("fionread", &report.fionread_counts_redirected),
        (
            "fionread_plain_in_map",
            &report.fionread_counts_plain_in_map,
        ),
        ("both_mode", &report.both_mode),
    ] {
        assert!(
            !matches!(finding, Finding::NotTested(_)),
            "{name}: {finding:?}"
        );
    }
    assert!(report.can_accelerate());
    // Both mode needs the 6.2 kfuncs: a "no" from 6.2 on is our programs
    // failing to load.
    assert_eq!(
        report.both_mode.is_yes(),
        kernel_at_least(6, 2),
        "{:?}",
        report.both_mode
    );
    // Sockmap links came with 6.10; before, the older attach is used.
    if kernel_at_least(6, 10) {
        assert!(report.sockmap_link.is_yes(), "{:?}", report.sockmap_link);
    } else {
        assert!(
            matches!(&report.sockmap_link, Finding::No(t) if t.contains("BPF_PROG_ATTACH")),
            "{:?}",
            report.sockmap_link
        );
    }
    // FACTS.md: this kernel's splice does not read redirected bytes.
    assert!(
        matches!(report.splice_reads_redirected, Finding::No(_)),
        "{:?}",
        report.splice_reads_redirected
    );
    // Measured either way (6.18.44: "0 of 1000", no; 6.12.117: yes);
    // tests/pairing.rs shows unpaired sockets behave as plain TCP on both.
    assert!(
        matches!(&report.fionread_counts_plain_in_map,
            Finding::Yes(t) | Finding::No(t) if t.ends_with("of 1000 plain bytes counted")),
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
    // Where the guard loads, the finding says whether io_uring splices are
    // caught too (they need kernel addresses in /proc/kallsyms).
    if let Finding::Yes(text) = &report.splice_guard {
        assert!(text.contains("io_uring splices"), "{text}");
    }

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
