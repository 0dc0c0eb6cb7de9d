//! The main table's workloads and what a run of one measures.

use std::time::Duration;

use support::workloads::{self, Connector, Rate};

/// The three paths of the main table, measured side by side.
#[derive(Clone, Copy, PartialEq)]
pub enum Path {
    Plain,
    Accelerated,
    Unix,
}

pub const PATHS: [Path; 3] = [Path::Plain, Path::Accelerated, Path::Unix];
/// Both ends on CPU 0 ("one CPU" in the tables).
pub const PINNED: Option<usize> = Some(0);

/// What the bench's sections fail with.
pub type BoxError = Box<dyn std::error::Error>;

pub type Run = Box<dyn Fn(&Connector, Duration) -> Rate>;

pub struct Case {
    pub name: String,
    pub unit: &'static str,
    pub scale: f64,
    pub latency: bool,
    /// Also run on a selected socket whose sends fall back to plain TCP
    /// (measures the kernel's sockmap send path without the redirect).
    pub fallback: bool,
    pub run: Run,
}

pub fn rr(size: usize, cpu: Option<usize>) -> Run {
    Box::new(move |c, d| workloads::request_response(c, size, d, cpu))
}

pub fn bulk(size: usize, cpu: Option<usize>) -> Run {
    Box::new(move |c, d| workloads::bulk(c, size, d, cpu))
}

pub fn cases(quick: bool) -> Vec<Case> {
    let mut cases = Vec::new();
    let sizes: &[(usize, &str)] = if quick {
        &[(1, "1 B"), (1024, "1 KiB"), (65536, "64 KiB")]
    } else {
        &[
            (1, "1 B"),
            (1024, "1 KiB"),
            (16384, "16 KiB"),
            (65536, "64 KiB"),
        ]
    };
    for &(size, label) in sizes {
        cases.push(Case {
            name: format!("req/resp {label}, one CPU"),
            unit: "trips/s",
            scale: 1.0,
            latency: true,
            fallback: false,
            run: rr(size, PINNED),
        });
    }
    for &(size, label) in &sizes[..2] {
        cases.push(Case {
            name: format!("req/resp {label}, unpinned"),
            unit: "trips/s",
            scale: 1.0,
            latency: true,
            fallback: false,
            run: rr(size, None),
        });
    }
    for (size, label) in [
        (64, "64 B"),
        (1024, "1 KiB"),
        (4096, "4 KiB"),
        (16384, "16 KiB"),
        (65536, "64 KiB"),
    ] {
        cases.push(Case {
            name: format!("bulk {label} writes, one CPU"),
            unit: "Gbit/s",
            scale: 1e-9,
            latency: false,
            fallback: size <= 4096,
            run: bulk(size, PINNED),
        });
    }
    cases.push(Case {
        name: "connect+1 req+close, one CPU".into(),
        unit: "conn/s",
        scale: 1.0,
        latency: false,
        fallback: false,
        run: Box::new(|c, d| workloads::churn(c, d, PINNED)),
    });
    let fanouts: &[usize] = if quick { &[64] } else { &[64, 1024] };
    for &n in fanouts {
        cases.push(Case {
            name: format!("{n} connections, req/resp 1 KiB, unpinned"),
            unit: "trips/s",
            scale: 1.0,
            latency: false,
            fallback: false,
            run: Box::new(move |c, d| workloads::concurrent(c, n, 1024, d)),
        });
    }
    cases
}

/// One case of the main table, measured.
pub struct Measured {
    pub name: String,
    pub unit: &'static str,
    /// Per path: rates of each repetition, and all latencies.
    pub rates: [Vec<f64>; 3],
    pub fallback: Vec<f64>,
    pub latencies: [Vec<u64>; 3],
    pub redirected_share: f64,
}

pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    s[s.len() / 2]
}

/// The median, or NaN for no values (a path whose every run failed).
pub fn median_or_nan(v: &[f64]) -> f64 {
    if v.is_empty() {
        f64::NAN
    } else {
        median(v)
    }
}

pub fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Measures `columns` side by side, `reps` times, interleaved (ABCABC...):
/// each column's rates. `measure(i)` runs column `i` once.
pub fn interleaved(
    columns: usize,
    reps: usize,
    mut measure: impl FnMut(usize) -> Result<f64, BoxError>,
) -> Result<Vec<Vec<f64>>, BoxError> {
    let mut rates = vec![Vec::with_capacity(reps); columns];
    for _ in 0..reps {
        for (i, column) in rates.iter_mut().enumerate() {
            column.push(measure(i)?);
        }
    }
    Ok(rates)
}
