//! examples/tproxy.rs end to end: namespaces, veth, TPROXY, curl through the
//! proxy in every mode (examples/tproxy/run.sh checks bytes and counters).

mod common;
use common::*;

#[test]
fn transparent_proxy_in_every_mode() {
    let Some(_env) = privileged_env() else { return };
    // Both mode needs Linux 6.2 (probe(); tests/both.rs checks the refusal).
    let modes: &[&str] = if kernel().both_mode.is_yes() {
        &["copy", "ingress", "egress", "adaptive", "both"]
    } else {
        &["copy", "ingress", "egress", "adaptive"]
    };
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tproxy/run.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .env("SIZE_MIB", "256")
        .env("MODES", modes.join(" "))
        .output()
        .expect("run examples/tproxy/run.sh");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "run.sh failed:\n{stdout}\n{stderr}");
    for mode in modes {
        let row = stdout
            .lines()
            .find(|l| l.starts_with(&format!("| {mode} |")))
            .unwrap_or_else(|| panic!("no {mode} row:\n{stdout}"));
        assert!(row.ends_with("| ok |"), "{row}");
    }
    println!("{stdout}");
}
