//! `labctl load`: a load generator that tells the truth about latency, over
//! HTTP/1.1 at A or gRPC straight at B.
//!
//! * Closed loop (`concurrency` C, no `rps`): C workers, each sends its next
//!   request as soon as the previous answer arrives. Latency is measured
//!   from the actual send. This is what wrk measures.
//! * Open loop (`rps` R): request *k* is due at `start + k/R` and starts when
//!   it is due, whether or not earlier ones have answered
//!   ([`open_loop`]). Requests in flight grow on demand up to
//!   `max_in_flight`; a request due while that many are in flight is
//!   `dropped` (never sent, never delayed, not in the histogram). Latency is
//!   measured from when the request was due, so a stalled server shows as
//!   the wait its callers saw (no coordinated omission).
//!
//! Targets ([`LoadSpec::url`]): `http://host:port` (HTTP/1.1, one request per
//! connection at a time), `grpc://host:port` (one B, over `connections`
//! HTTP/2 connections) and `etcd://host:port/<prefix>` (every B registered
//! under the prefix, balanced by service A's own balancer).
//!
//! Latencies go into HDR histograms (1 µs – 1 h, 3 significant digits).
//! `by_backend` counts the `x-served-by` header (HTTP) or the reply's
//! `served_by` (gRPC; `x-served-by` metadata on errors).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::bail;
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

mod closed_loop;
mod grpc;
mod http;
mod live;
mod open_loop;
mod outcome;
mod pacer;
#[cfg(test)]
mod tests;

pub use live::{Finished, LiveWindow, WindowStats};

/// Requests in flight at most in open loop, unless told otherwise. In flight
/// is rate × latency: 1 024 lets a 1 000 req/s load ride out a full second
/// of stall (measured, not dropped), while each in-flight HTTP request holds
/// a connection (a descriptor here and one at A) — far inside this machine's
/// limits and A's, and small enough that a dead server cannot make the
/// generator hold tens of thousands of sockets.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 1024;

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// `http://host:port` (HTTP at A), `grpc://host:port` (gRPC at one B) or
    /// `etcd://host:port/<prefix>` (gRPC over the Bs registered in etcd).
    pub url: String,
    /// HTTP: the path appended to `url`; `{rand}` becomes a random item id.
    /// gRPC: the method, e.g. `lab.v1.Backend/GetItem`.
    pub path: String,
    /// Stop after this many requests (open loop: this many due, sent or
    /// dropped)…
    pub requests: Option<u64>,
    /// …or after this long (whichever is given; both → whichever first).
    pub duration: Option<Duration>,
    /// Closed loop: workers, each with one request in flight (HTTP: each on
    /// its own connection). Open loop: workers (HTTP: connections) opened
    /// before the clock starts; more are opened on demand.
    pub concurrency: usize,
    /// Open-loop target rate; `None` = closed loop.
    pub rps: Option<f64>,
    /// Open loop: requests in flight at most; a request due while this many
    /// are in flight is dropped.
    pub max_in_flight: usize,
    /// gRPC: HTTP/2 connections to B; requests take them in turn.
    pub connections: usize,
    /// Upper bound of `{rand}` and of gRPC ids (ids are 1..=id_max).
    pub id_max: u64,
    pub seed: u64,
    /// Per-request timeout; a request that exceeds it counts as error
    /// `timeout`. gRPC also sends it as the call's deadline.
    pub timeout: Duration,
    /// Where each finished request is also recorded as it finishes, for a
    /// reader that wants the last second rather than the whole run (the
    /// scenario sampler). `None` costs nothing.
    pub live: Option<Arc<LiveWindow>>,
}

impl LoadSpec {
    pub fn new(url: impl Into<String>, path: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            path: path.into(),
            requests: None,
            duration: None,
            concurrency: 16,
            rps: None,
            max_in_flight: DEFAULT_MAX_IN_FLIGHT,
            connections: 1,
            id_max: 10_000,
            seed: 1,
            timeout: Duration::from_secs(30),
            live: None,
        }
    }
}

/// Latency percentiles in milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Percentiles {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    #[serde(default)]
    pub p999: f64,
    pub max: f64,
}

impl Percentiles {
    /// From a histogram of microseconds.
    fn of(h: &Histogram<u64>) -> Self {
        let ms = |us: u64| us as f64 / 1000.0;
        Self {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        }
    }
}

/// How late the open-loop generator started requests, in milliseconds
/// (from when each was due to when its worker began it).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DispatchLag {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

/// The `--json` report (docs/architecture.md, "labctl").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoadReport {
    /// Requests sent that finished (answered, failed or timed out).
    pub requests: u64,
    pub ok: u64,
    /// HTTP: non-2xx statuses by code. gRPC: status codes by name
    /// (`unavailable`, `deadline_exceeded`, …). Both: `timeout` (the
    /// per-request timeout), `connect` and `transport` for no answer.
    pub errors: BTreeMap<String, u64>,
    /// Open loop: requests due while `max_in_flight` were in flight, never
    /// sent (not in `requests`, not in the latencies). 0 in closed loop.
    #[serde(default)]
    pub dropped: u64,
    /// Finished requests per second of the whole run. Open loop: that
    /// includes the drain after the last request was due, so a server that
    /// stalls at the end lowers it; `sent_rps` is the sending rate alone.
    pub rps: f64,
    /// Closed loop: from send to answer. Open loop: from when the request
    /// was due to its answer.
    pub latency_ms: Percentiles,
    /// The same, of the successes alone (absent when none succeeded)…
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ok_ms: Option<Percentiles>,
    /// …and of the failures alone (absent when none failed): under
    /// overload, how fast the admitted requests were and how fast the shed
    /// ones were told.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_failed_ms: Option<Percentiles>,
    pub by_backend: BTreeMap<String, u64>,
    /// Open loop: the rate asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_rps: Option<f64>,
    /// Open loop: requests sent (not dropped) per second of the sending —
    /// the schedule's span (N requests due every 1/R take N/R seconds), or
    /// longer if the generator fell behind it. The rate the server was offered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_rps: Option<f64>,
    /// Open loop: most requests in flight at once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_in_flight: Option<u64>,
    /// Open loop: how late requests started, from due to begun (the
    /// generator's own delay: its timer wakes within ~0.1 ms of a due time,
    /// and at most every 0.1 ms at high rates).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatch_lag_ms: Option<DispatchLag>,
    /// Seconds from the start to the first and the last failed request
    /// (absent when nothing failed): where in the run the failures were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_error_s: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error_s: Option<f64>,
}

impl LoadReport {
    /// The largest share of requests any one backend served (0.0–1.0).
    pub fn max_backend_share(&self) -> f64 {
        let total: u64 = self.by_backend.values().sum();
        if total == 0 {
            return 0.0;
        }
        self.by_backend.values().copied().max().unwrap_or(0) as f64 / total as f64
    }

    /// A human-readable table.
    pub fn table(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "requests  {:>10}\nok        {:>10}\n",
            self.requests, self.ok
        ));
        if self.target_rps.is_some() || self.dropped > 0 {
            out.push_str(&format!("dropped   {:>10}\n", self.dropped));
        }
        out.push_str(&format!("rate      {:>10.1} req/s", self.rps));
        if let Some(sent) = self.sent_rps {
            out.push_str(&format!("  (sent {sent:.1}"));
            if let Some(target) = self.target_rps {
                out.push_str(&format!(", target {target:.1}"));
            }
            out.push(')');
        } else if let Some(target) = self.target_rps {
            out.push_str(&format!("  (target {target:.1})"));
        }
        out.push('\n');
        let line = |label: &str, l: &Percentiles| {
            format!(
                "{label:<10}p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   p99.9 {:.2} ms   max {:.2} ms\n",
                l.p50, l.p90, l.p99, l.p999, l.max
            )
        };
        out.push_str(&line("latency", &self.latency_ms));
        // With successes and failures mixed, each apart (a fast 503 pulls
        // the overall percentiles down).
        if let (Some(ok), Some(failed)) = (&self.latency_ok_ms, &self.latency_failed_ms) {
            out.push_str(&line("  ok", ok));
            out.push_str(&line("  failed", failed));
        }
        if let Some(lag) = &self.dispatch_lag_ms {
            out.push_str(&format!(
                "lag       p50 {:.2} ms   p99 {:.2} ms   max {:.2} ms   (generator: start vs due)\n",
                lag.p50, lag.p99, lag.max
            ));
        }
        if let Some(peak) = self.peak_in_flight {
            out.push_str(&format!("in flight {peak:>10} at most\n"));
        }
        if !self.errors.is_empty() {
            out.push_str("errors\n");
            for (kind, n) in &self.errors {
                out.push_str(&format!("  {kind:<18} {n:>10}\n"));
            }
        }
        if !self.by_backend.is_empty() {
            let total: u64 = self.by_backend.values().sum();
            out.push_str("served by\n");
            for (backend, n) in &self.by_backend {
                out.push_str(&format!(
                    "  {backend:<20} {n:>10}  {:>5.1}%\n",
                    100.0 * *n as f64 / total.max(1) as f64
                ));
            }
        }
        out
    }
}

/// Runs the load and returns the report. `progress` (if any) follows the
/// finished requests.
pub async fn run(
    spec: &LoadSpec,
    progress: Option<indicatif::ProgressBar>,
) -> anyhow::Result<LoadReport> {
    if spec.requests.is_none() && spec.duration.is_none() {
        bail!("give --requests N or --duration D");
    }
    if spec.concurrency == 0 {
        bail!("--concurrency must be at least 1");
    }
    if spec.max_in_flight == 0 {
        bail!("--max-in-flight must be at least 1");
    }
    if spec.connections == 0 {
        bail!("--connections must be at least 1");
    }
    if let Some(rps) = spec.rps
        && !(rps > 0.0 && rps.is_finite())
    {
        bail!("--rps must be a positive number, got {rps}");
    }
    match Target::of(&spec.url)? {
        Target::Http => {
            let transport = http::Http::new(spec)?;
            drive(spec, Arc::new(transport), progress).await
        }
        Target::Grpc => {
            let transport = grpc::Grpc::direct(spec).await?;
            drive(spec, Arc::new(transport), progress).await
        }
        Target::Etcd => {
            let (transport, discovery) = grpc::Grpc::balanced(spec).await?;
            let report = drive(spec, Arc::new(transport), progress).await;
            discovery.stop().await;
            report
        }
    }
}

/// Which transport a URL asks for.
enum Target {
    Http,
    Grpc,
    Etcd,
}

impl Target {
    fn of(url: &str) -> anyhow::Result<Self> {
        let scheme = url.split_once("://").map(|(scheme, _)| scheme);
        Ok(match scheme {
            Some("http") => Target::Http,
            Some("grpc") => Target::Grpc,
            Some("etcd") => Target::Etcd,
            _ => bail!(
                "--url must be http://HOST:PORT, grpc://HOST:PORT or etcd://HOST:PORT/PREFIX, got {url:?}"
            ),
        })
    }
}

async fn drive<T: outcome::Transport>(
    spec: &LoadSpec,
    transport: Arc<T>,
    progress: Option<indicatif::ProgressBar>,
) -> anyhow::Result<LoadReport> {
    match spec.rps {
        Some(rps) => open_loop::run(spec, rps, transport, progress).await,
        None => closed_loop::run(spec, transport, progress).await,
    }
}
