//! The kernel's BPF run-time statistics (`kernel.bpf_stats_enabled`).

use libbpf_rs::query::ProgInfoIter;

/// run_time_ns and run_cnt of a loaded program, by name (kernel BPF stats).
pub fn prog_stats(name: &str) -> (u64, u64) {
    ProgInfoIter::default()
        .filter(|p| p.name.to_str() == Some(name))
        .fold((0, 0), |(t, c), p| (t + p.run_time_ns, c + p.run_cnt))
}

/// Turns the statistics on; dropping it restores the old setting.
pub struct BpfStatsSwitch(String);

impl BpfStatsSwitch {
    const PATH: &'static str = "/proc/sys/kernel/bpf_stats_enabled";
    pub fn on() -> Self {
        let old = std::fs::read_to_string(Self::PATH).unwrap_or_else(|_| "0".into());
        let _ = std::fs::write(Self::PATH, "1");
        BpfStatsSwitch(old)
    }
}

impl Drop for BpfStatsSwitch {
    fn drop(&mut self) {
        let _ = std::fs::write(Self::PATH, self.0.trim());
    }
}

/// Nanoseconds per call between two `prog_stats` readings.
pub fn ns_per_call(after: (u64, u64), before: (u64, u64)) -> f64 {
    (after.0 - before.0) as f64 / (after.1 - before.1).max(1) as f64
}
