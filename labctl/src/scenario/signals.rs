//! What a scenario samples, once a second: each signal's key (used in
//! scenario files' verdicts and in `samples.json`), its chart title, unit
//! and where the number comes from. A signal has one series per instance
//! (`load`, `service-a`, `service-b-1`, …, `partner-api`).
//!
//! Rates ("per second") are the increase of a counter between two good
//! scrapes divided by the time between them; "in the last second"
//! percentiles come from what finished between two samples.

use serde::Serialize;

/// One signal of the catalogue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Signal {
    /// Key in scenario files and `samples.json`, e.g. `"latency_p99_ms"`.
    pub key: &'static str,
    /// Chart title.
    pub title: &'static str,
    /// Axis unit, e.g. `"ms"`, `"req/s"`, `"share"`.
    pub unit: &'static str,
    /// Where the number comes from and what it measures, said plainly
    /// (shown under each chart).
    pub source: &'static str,
}

macro_rules! signals {
    ($($name:ident = $key:literal, $title:literal, $unit:literal, $source:literal;)*) => {
        $(
            #[doc = $source]
            pub const $name: Signal = Signal { key: $key, title: $title, unit: $unit, source: $source };
        )*
        /// Every signal, in the order the report charts them.
        pub const ALL: &[Signal] = &[$($name),*];
    };
}

signals! {
    RPS = "rps", "Requests answered", "req/s",
        "The scenario's load generator: requests answered (any status) in the last second.";
    ERRORS = "errors", "Failed requests", "req/s",
        "The scenario's load generator: requests that got a non-2xx status, a timeout or a transport error in the last second, and those it dropped (see the next chart).";
    DROPPED = "dropped", "Requests dropped by the generator", "req/s",
        "The scenario's load generator (open loop): requests due in the last second while its in-flight limit (the load's concurrency) was reached, so never sent. Callers that went unserved: also counted in the failed requests.";
    LATENCY_P50_MS = "latency_p50_ms", "Latency p50 (load generator)", "ms",
        "The scenario's load generator: median latency of the requests answered or timed out in the last second, measured from when each was due (open loop). A timed-out request counts at its timeout (or more, if it went out late); one refused or cut off with no answer is left out, as its few microseconds would pull the figure down.";
    LATENCY_P99_MS = "latency_p99_ms", "Latency p99 (load generator)", "ms",
        "The scenario's load generator: 99th percentile latency of the requests answered or timed out in the last second, measured from when each was due (open loop). A timed-out request counts at its timeout (or more, if it went out late); one refused or cut off with no answer is left out, as its few microseconds would pull the figure down.";
    SHARE = "share", "Share of requests per B", "share",
        "The scenario's load generator: of the last second's answers that named a B in A's x-served-by header, the fraction each B served. Answers without the header (errors A made up itself) are left out; a second with none that named a B is a gap.";
    A_P50_MS = "a_p50_ms", "A's p50 (A's own histogram)", "ms",
        "service-a's lab_http_request_duration_seconds: median of the requests A answered since the previous good scrape of A (normally 1 s), interpolated within its histogram buckets and capped at the highest finite bucket bound.";
    A_P99_MS = "a_p99_ms", "A's p99 (A's own histogram)", "ms",
        "service-a's lab_http_request_duration_seconds: p99 of the requests A answered since the previous good scrape of A (normally 1 s), interpolated within its histogram buckets and capped at the highest finite bucket bound.";
    CPU_PERCENT = "cpu_percent", "CPU", "% of one core",
        "Each process's process_cpu_seconds_total, per second of wall time (100 = one core busy), averaged over the last 5 s (less in a process's first seconds): the counter moves in whole seconds.";
    RSS_MIB = "rss_mib", "Resident memory", "MiB",
        "Each process's process_resident_memory_bytes.";
    OPEN_FDS = "open_fds", "Open file descriptors", "fds",
        "Each process's process_open_fds (sockets included).";
    TASKS_ALIVE = "tasks_alive", "Tokio tasks alive", "tasks",
        "Each process's tokio_alive_tasks: every task its runtime holds.";
    JOB_TASKS = "job_tasks", "Job tasks running (B)", "tasks",
        "Each B's lab_worker_tasks_alive: jobs being handled right now.";
    POOL_IN_USE = "pool_in_use", "MySQL connections in use (B)", "connections",
        "Each B's lab_db_pool_connections{state=\"in_use\"}.";
    POOL_LEAKED = "pool_leaked", "MySQL connections leaked (B)", "connections",
        "Each B's lab_db_connections_leaked: pool connections held by result sets nobody closed.";
    JOBS_DONE = "jobs_done", "Jobs done", "jobs/s",
        "Each B's lab_jobs_total{outcome=\"done\"}, per second since the previous good scrape; a gap if B has no lab_jobs_total at all.";
    JOBS_DUPLICATE = "jobs_duplicate", "Jobs run twice (cumulative)", "jobs",
        "Each B's lab_jobs_duplicate_total: job attempts it started while another attempt of the same job was still running there. Counted since the process started: back to 0 when a B restarts and, with --attach, including what happened before the scenario.";
    JOBS_DEAD = "jobs_dead", "Jobs dead-lettered (cumulative)", "jobs",
        "Each B's lab_jobs_total{outcome=\"dead\"}: poison rows set aside (0 until the first; a gap if B has no lab_jobs_total at all). Counted since the process started: back to 0 when a B restarts and, with --attach, including what happened before the scenario.";
    WORK_AFTER_DEADLINE = "work_after_deadline", "Work after the deadline (cumulative)", "requests",
        "Each B's lab_work_after_deadline_total: requests still worked on after their caller's deadline passed. Counted since the process started: back to 0 when a B restarts and, with --attach, including what happened before the scenario.";
    PARTNER_HANDSHAKES = "partner_handshakes", "TLS handshakes at the partner", "handshakes/s",
        "partner-api's partner_tls_handshakes_total, per second: one per new connection from a B.";
    PARTNER_CONNECTIONS = "partner_connections", "Connections open at the partner", "connections",
        "partner-api's partner_connections_open.";
    HTTP_RESPONSES_UNCLOSED = "http_responses_unclosed", "Partner responses never closed (B)", "responses",
        "Each B's lab_http_responses_unclosed: partner responses whose body was neither read nor dropped.";
}

/// The signal with this key.
pub fn by_key(key: &str) -> Option<Signal> {
    ALL.iter().copied().find(|s| s.key == key)
}

/// Every key, for error messages.
pub fn keys() -> String {
    ALL.iter().map(|s| s.key).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_found() {
        for signal in ALL {
            assert_eq!(by_key(signal.key), Some(*signal));
            assert_eq!(ALL.iter().filter(|s| s.key == signal.key).count(), 1);
        }
        assert_eq!(by_key("nope"), None);
    }

    /// The sentences under the charts name what the sampler does in the
    /// cases a reader would otherwise guess wrong.
    #[test]
    fn sources_say_what_is_left_out_and_since_when() {
        let says = |signal: Signal, words: &[&str]| {
            for word in words {
                assert!(
                    signal.source.contains(word),
                    "{}: no \"{word}\" in {:?}",
                    signal.key,
                    signal.source
                );
            }
        };
        for latency in [LATENCY_P50_MS, LATENCY_P99_MS] {
            says(
                latency,
                &["timed out", "at its timeout", "no answer is left out"],
            );
        }
        says(
            SHARE,
            &["named a B", "x-served-by", "without the header", "left out"],
        );
        for a in [A_P50_MS, A_P99_MS] {
            says(
                a,
                &[
                    "since the previous good scrape",
                    "highest finite bucket bound",
                ],
            );
        }
        let cpu_window = format!("last {} s", crate::scenario::sampler::CPU_WINDOW.as_secs());
        says(CPU_PERCENT, &[&cpu_window]);
        for cumulative in [JOBS_DUPLICATE, JOBS_DEAD, WORK_AFTER_DEADLINE] {
            says(
                cumulative,
                &[
                    "since the process started",
                    "back to 0 when a B restarts",
                    "--attach",
                ],
            );
        }
        for counted in [JOBS_DONE, JOBS_DEAD] {
            says(counted, &["a gap if B has no lab_jobs_total"]);
        }
    }
}
