//! `labctl bench …`: configurations compared under identical load, in one
//! run, on this machine. Each benchmark is a command, not a timed test; CI
//! runs every one once with tiny durations so they keep working.
//!
//! * [`lb`] — the cause-1 remedies (`l4`, `l7` round robin and leastconn,
//!   `etcd` over requests in flight and peak-EWMA) with identical Bs, one
//!   slow B and one killed B.
//! * [`grpc`] — B's gRPC path (item cache on, and off) against a bare tonic echo.
//! * [`scale`] — A's cost per request as its registry grows and churns.
//! * [`jobs`] — B's claim as the jobs table grows, with its plans.
//! * [`overload`] — 3× the stack's capacity: shedding, goodput, recovery.

pub mod grpc;
pub mod jobs;
pub mod lb;
pub mod overload;
pub mod process;
pub mod scale;

use std::path::{Path, PathBuf};

use lab_common::config::LabConfig;

use crate::{launcher::UpOptions, ports::PortPolicy};

/// A state dir for `bench`'s stacks, unique to this process, and to
/// `round` when each round needs a stack of its own.
pub fn state_dir(bench: &str, round: Option<usize>) -> PathBuf {
    let pid = std::process::id();
    std::env::temp_dir().join(match round {
        Some(round) => format!("labctl-bench-{bench}-{pid}-{round}"),
        None => format!("labctl-bench-{bench}-{pid}"),
    })
}

/// How every benchmark starts its stack: `backends` Bs, on free ports, so
/// a benchmark never collides with a lab already running.
pub fn stack_options(config: LabConfig, dir: &Path, backends: usize) -> UpOptions {
    let mut options = UpOptions::new(config, dir);
    options.backends = backends;
    options.ports = PortPolicy::Auto;
    options
}

/// The value of the unlabelled sample `name` on an admin listener's
/// `/metrics` (`None` if it cannot be read or is not there).
pub async fn admin_sample(admin_url: &str, name: &str) -> Option<f64> {
    let url = format!("{}/metrics", admin_url.trim_end_matches('/'));
    let (status, body) = crate::probe::get(
        &crate::probe::http_client(),
        &url,
        std::time::Duration::from_secs(5),
    )
    .await
    .ok()?;
    if status != 200 {
        return None;
    }
    sample(&String::from_utf8_lossy(&body), name)
}

/// The value of an unlabelled sample `name` in a Prometheus text exposition.
fn sample(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))?
        .trim()
        .parse()
        .ok()
}

/// CPU seconds per 10 000 requests (NaN when none were made): a process's
/// cost per request, far less noisy on a shared machine than throughput.
pub fn cpu_per_10k(cpu_seconds: f64, requests: u64) -> f64 {
    if requests == 0 {
        return f64::NAN;
    }
    cpu_seconds / requests as f64 * 10_000.0
}

/// The median of `v` (NaN when empty): benchmarks report medians of rounds
/// so one noisy round on a shared machine does not decide the result.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unlabelled_sample_is_found_by_its_exact_name() {
        let text =
            "# TYPE lab_http_shed_total counter\nlab_http_shed_total_x 9\nlab_http_shed_total 42\n";
        assert_eq!(sample(text, "lab_http_shed_total"), Some(42.0));
        assert_eq!(sample(text, "lab_missing"), None);
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(vec![]).is_nan());
    }
}
