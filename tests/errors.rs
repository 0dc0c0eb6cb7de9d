//! Every error names what was wrong, and a failed attach leaves nothing
//! attached or loaded.

mod common;
use common::*;

use std::process::Command;

use sockmap_fastpath::{Accelerator, Cgroup, Error};

fn expect_err(result: sockmap_fastpath::Result<sockmap_fastpath::FastpathGuard>) -> Error {
    match result {
        Ok(guard) => panic!("attach succeeded: {guard:?}"),
        Err(err) => err,
    }
}

#[test]
fn invalid_input_is_refused_before_touching_the_kernel() {
    let Some(env) = privileged_env() else { return };
    let cg = env.cgroup.cgroup();
    let baseline = loaded_programs();
    let cases: Vec<(Error, &str)> = vec![
        (
            expect_err(Accelerator::builder().attach()),
            "no cgroup chosen",
        ),
        (expect_err(env.builder().ports([80, 0]).attach()), "port 0"),
        (expect_err(env.builder().comm("").attach()), "is empty"),
        (
            expect_err(env.builder().comm("a-very-long-process-name").attach()),
            "longer than 15 bytes",
        ),
        (expect_err(env.builder().capacity(0).attach()), "capacity 0"),
        (
            expect_err(
                Accelerator::builder()
                    .redirect(sockmap_fastpath::RedirectMode::Egress)
                    .capacity(0)
                    .attach(),
            ),
            "capacity 0",
        ),
    ];
    for (err, needle) in cases {
        assert!(
            err.to_string().contains(needle),
            "{err:?} should mention {needle:?}"
        );
        assert_eq!(
            err.kind(),
            sockmap_fastpath::ErrorKind::InvalidInput,
            "{err:?}"
        );
        assert_nothing_left(&cg, &baseline);
    }
    let err = "10.0.0.0/40".parse::<sockmap_fastpath::Cidr>().unwrap_err();
    assert!(
        err.to_string().contains("prefix length 40 is out of range"),
        "{err}"
    );
}

#[test]
fn bad_cgroup_paths_are_named() {
    let Some(env) = privileged_env() else { return };
    let missing = env.cgroup.path().join("no-such-child");
    let err = Cgroup::path(&missing).unwrap_err();
    assert!(matches!(err, Error::CgroupNotFound { .. }), "{err}");
    assert!(
        err.to_string().contains("no-such-child") && err.to_string().contains("does not exist")
    );
    let err = Cgroup::path("/tmp").unwrap_err();
    assert!(
        err.to_string()
            .contains("/tmp is not a cgroup v2 directory"),
        "{err}"
    );
}

#[test]
fn kernel_refusing_the_map_leaves_nothing_loaded() {
    let Some(env) = privileged_env() else { return };
    let cg = env.cgroup.cgroup();
    let baseline = loaded_programs();
    // The kernel refuses a socket hash this large when creating it.
    let err = expect_err(env.builder().capacity(u32::MAX).attach());
    assert!(matches!(err, Error::Bpf { .. }), "{err:?}");
    assert!(err.to_string().contains("loading the BPF object"), "{err}");
    assert_nothing_left(&cg, &baseline);
}

#[test]
fn cgroup_vanishing_before_attach_undoes_the_sockmap_link() {
    let Some(env) = privileged_env() else { return };
    let baseline = loaded_programs();
    let doomed = env.cgroup.sibling();
    let cgroup = doomed.cgroup().clone();
    doomed.remove().unwrap();
    // Fails after the programs are loaded and fp_sk_msg is linked.
    let err = expect_err(env.builder().cgroup(cgroup.clone()).attach());
    assert!(matches!(err, Error::Io { call: "open", .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(&cgroup.as_path().display().to_string()),
        "{err}"
    );
    assert_nothing_left(&env.cgroup.cgroup(), &baseline);
}

/// The running kernel's release and its `(major, minor)`.
fn running_kernel() -> (String, (u32, u32)) {
    let release = nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned();
    let mut numbers = release.split(|c: char| !c.is_ascii_digit());
    let mut next = || numbers.next().and_then(|n| n.parse().ok()).unwrap();
    let version = (next(), next());
    (release, version)
}

/// 6.1 is the oldest kernel supported: there and later `attach()` works
/// and `probe()` says the programs load. Older kernels' verifiers refuse
/// them (Debian's 5.10: "BPF_STX uses reserved fields", no BPF atomics),
/// and `attach()`, with or without the splice guard, says that Linux 6.1
/// is needed and which kernel refused, instead of the verifier's words
/// alone, leaving nothing loaded. The kernel matrix runs this test on
/// Debian's 5.10 (`scripts/vmtest.sh`).
#[test]
fn a_kernel_older_than_6_1_is_named_as_too_old() {
    let Some(env) = privileged_env() else { return };
    let cg = env.cgroup.cgroup();
    let baseline = loaded_programs();
    let (release, version) = running_kernel();
    let programs_load = sockmap_fastpath::probe().programs_load;
    if version >= (6, 1) {
        drop(
            env.builder()
                .attach()
                .expect("attach on a supported kernel"),
        );
        assert!(programs_load.is_yes(), "{programs_load:?}");
        return;
    }
    for builder in [Accelerator::builder().cgroup(cg.clone()), env.builder()] {
        let err = expect_err(builder.attach());
        assert!(
            matches!(
                err,
                Error::KernelFeature {
                    min_kernel: "6.1",
                    ..
                }
            ),
            "{err:?}"
        );
        let text = err.with_causes();
        for wanted in ["upgrade the kernel", &format!("Linux {release} refused")] {
            assert!(text.contains(wanted), "{wanted:?} in {text}");
        }
        assert_nothing_left(&cg, &baseline);
    }
    assert!(
        matches!(&programs_load, sockmap_fastpath::Finding::No(why) if why.contains("6.1")),
        "{programs_load:?}"
    );
}

#[test]
fn missing_capabilities_are_named() {
    let Some(env) = privileged_env() else { return };
    let baseline = loaded_programs();
    let exe = std::env::current_exe().unwrap();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(&exe)
        .args([
            "--ignored",
            "--exact",
            "child_attach_without_privileges",
            "--nocapture",
        ])
        .env("FP_CHILD_CGROUP", env.cgroup.path())
        .output()
        .expect("setpriv");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains(
            "CHILD-ERROR: attaching sock_ops and sk_msg programs needs CAP_BPF and CAP_NET_ADMIN"
        ),
        "child output: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_nothing_left(&env.cgroup.cgroup(), &baseline);
}

/// Run by `missing_capabilities_are_named` as an unprivileged user.
#[test]
#[ignore = "run as a child process without privileges"]
fn child_attach_without_privileges() {
    let path = std::env::var("FP_CHILD_CGROUP").expect("run by missing_capabilities_are_named");
    let err = Accelerator::builder()
        .cgroup(Cgroup::path(path).unwrap())
        .attach()
        .unwrap_err();
    assert_eq!(err.kind(), sockmap_fastpath::ErrorKind::Permission);
    println!("CHILD-ERROR: {err}");
}

/// The library never writes to the program's stderr: libbpf's messages go
/// to the `log` facade. A child (no logger installed) runs probe() and an
/// attach with the default splice guard, which fails or loads here
/// depending on the kernel, and deliberately fails an attach; its stderr
/// must hold no libbpf line.
#[test]
fn libbpf_output_never_reaches_stderr() {
    let Some(env) = privileged_env() else { return };
    let out = Command::new(std::env::current_exe().unwrap())
        .args([
            "--ignored",
            "--exact",
            "child_probe_and_attach",
            "--nocapture",
        ])
        .env("FP_CHILD_CGROUP", env.cgroup.path())
        .output()
        .expect("run the child");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("CHILD-DONE"), "{stdout}\n{stderr}");
    assert!(!stderr.contains("libbpf"), "stderr: {stderr}");
    assert!(!stdout.contains("libbpf:"), "stdout: {stdout}");
}

/// Run by `libbpf_output_never_reaches_stderr`.
#[test]
#[ignore = "run as a child process by libbpf_output_never_reaches_stderr"]
fn child_probe_and_attach() {
    let path = std::env::var("FP_CHILD_CGROUP").expect("run by libbpf_output_never_reaches_stderr");
    let report = sockmap_fastpath::probe();
    let cgroup = Cgroup::path(path).unwrap();
    let guarded = Accelerator::builder().cgroup(cgroup.clone()).attach();
    // A map far beyond what the kernel allocates: libbpf reports the failure.
    let huge = Accelerator::builder()
        .cgroup(cgroup)
        .splice_guard(sockmap_fastpath::SpliceGuard::Off)
        .capacity(u32::MAX)
        .attach();
    println!(
        "CHILD-DONE guard attached: {}, huge map refused: {}, redirect: {}",
        guarded.is_ok(),
        huge.is_err(),
        report.redirect.is_yes()
    );
}
