//! `labctl load`: an HTTP load generator that tells the truth about latency.
//!
//! * Closed loop (`--concurrency C`, no `--rps`): C workers, each sends its
//!   next request as soon as the previous answer arrives. Latency is measured
//!   from the actual send.
//! * Open loop (`--rps R`): request *k* is due at `start + k/R` whatever
//!   happened before. The C workers take requests in order, and latency is
//!   measured from the **intended** send time, so when the server stalls
//!   and requests queue behind it, the wait is counted (no coordinated
//!   omission, as in wrk2).
//!
//! Latencies go into HDR histograms (1 µs – 1 h, 3 significant digits), one
//! per worker, merged at the end. `by_backend` counts the `x-served-by`
//! header of each response.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

mod live;
pub use live::{Finished, LiveWindow, WindowStats};

/// What to send.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Path appended to `url`; `{rand}` becomes a random item id.
    pub path: String,
    /// Stop after this many requests…
    pub requests: Option<u64>,
    /// …or after this long (whichever is given; both → whichever first).
    pub duration: Option<Duration>,
    pub concurrency: usize,
    /// Open-loop target rate; `None` = closed loop.
    pub rps: Option<f64>,
    /// Open loop: requests in flight at most (the load contract; this
    /// generator's bound is still `concurrency`, and it drops nothing).
    pub max_in_flight: usize,
    /// Upper bound of `{rand}` (ids are 1..=id_max).
    pub id_max: u64,
    pub seed: u64,
    /// Per-request timeout; a request that exceeds it counts as error `timeout`.
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
            max_in_flight: 1024,
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

/// The `--json` report (docs/architecture.md, "labctl").
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LoadReport {
    pub requests: u64,
    pub ok: u64,
    /// Non-2xx statuses by code, plus `timeout` and `connect` for transport errors.
    pub errors: BTreeMap<String, u64>,
    /// Open loop: due requests not sent because `max_in_flight` were in
    /// flight (the load contract; always 0 from this generator).
    #[serde(default)]
    pub dropped: u64,
    pub rps: f64,
    pub latency_ms: Percentiles,
    pub by_backend: BTreeMap<String, u64>,
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
            "requests  {:>10}\nok        {:>10}\nrate      {:>10.1} req/s\n",
            self.requests, self.ok, self.rps
        ));
        out.push_str(&format!(
            "latency   p50 {:.2} ms   p90 {:.2} ms   p99 {:.2} ms   max {:.2} ms\n",
            self.latency_ms.p50, self.latency_ms.p90, self.latency_ms.p99, self.latency_ms.max
        ));
        if !self.errors.is_empty() {
            out.push_str("errors\n");
            for (kind, n) in &self.errors {
                out.push_str(&format!("  {kind:<12} {n:>10}\n"));
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

/// One worker's tallies, merged at the end.
struct Tally {
    histogram: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    by_backend: BTreeMap<String, u64>,
    first_error: Option<Duration>,
    last_error: Option<Duration>,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            histogram: Histogram::new_with_bounds(1, 3_600_000_000, 3)?,
            ok: 0,
            errors: BTreeMap::new(),
            by_backend: BTreeMap::new(),
            first_error: None,
            last_error: None,
        })
    }

    fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        self.histogram.add(&other.histogram)?;
        self.ok += other.ok;
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
        for (k, v) in other.by_backend {
            *self.by_backend.entry(k).or_default() += v;
        }
        self.first_error = match (self.first_error, other.first_error) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_error = self.last_error.max(other.last_error);
        Ok(())
    }

    fn error(&mut self, kind: &str, at: Duration) {
        *self.errors.entry(kind.to_string()).or_default() += 1;
        self.first_error.get_or_insert(at);
        self.last_error = Some(at);
    }
}

/// Shared between workers: the next request number and the stop rule.
struct Plan {
    next: AtomicU64,
    done: AtomicU64,
    limit: Option<u64>,
    end: Option<Instant>,
    start: Instant,
    interval: Option<Duration>,
}

impl Plan {
    /// Claims the next request; returns its intended send time, or `None` to stop.
    fn claim(&self) -> Option<Instant> {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        if self.limit.is_some_and(|limit| k >= limit) {
            return None;
        }
        let due = match self.interval {
            Some(interval) => self.start + interval.mul_f64(k as f64),
            None => Instant::now(),
        };
        if self.end.is_some_and(|end| due >= end) {
            return None;
        }
        Some(due)
    }
}

/// Runs the load and returns the report. `progress` (if any) is advanced
/// once per finished request.
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
    if let Some(rps) = spec.rps
        && !(rps > 0.0 && rps.is_finite())
    {
        bail!("--rps must be a positive number, got {rps}");
    }
    let target = Arc::new(Target::parse(&spec.url, &spec.path)?);
    let start = Instant::now();
    let plan = Arc::new(Plan {
        next: AtomicU64::new(0),
        done: AtomicU64::new(0),
        limit: spec.requests,
        end: spec.duration.map(|d| start + d),
        start,
        interval: spec.rps.map(|r| Duration::from_secs_f64(1.0 / r)),
    });

    let ticker = progress.map(|bar| {
        let plan = plan.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(plan.done.load(Ordering::Relaxed));
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    });

    let workers = (0..spec.concurrency).map(|i| {
        let plan = plan.clone();
        let target = target.clone();
        let spec = spec.clone();
        tokio::spawn(async move { worker(i as u64, &spec, &target, &plan).await })
    });
    let mut total = Tally::new()?;
    for result in futures::future::join_all(workers).await {
        total.merge(result.context("load worker panicked")??)?;
    }
    let elapsed = start.elapsed();
    if let Some(t) = ticker {
        t.abort();
    }

    let h = &total.histogram;
    let ms = |us: u64| us as f64 / 1000.0;
    let requests = h.len();
    Ok(LoadReport {
        requests,
        ok: total.ok,
        errors: total.errors,
        dropped: 0,
        rps: requests as f64 / elapsed.as_secs_f64().max(1e-9),
        latency_ms: Percentiles {
            p50: ms(h.value_at_quantile(0.50)),
            p90: ms(h.value_at_quantile(0.90)),
            p99: ms(h.value_at_quantile(0.99)),
            p999: ms(h.value_at_quantile(0.999)),
            max: ms(h.max()),
        },
        by_backend: total.by_backend,
        first_error_s: total.first_error.map(|d| d.as_secs_f64()),
        last_error_s: total.last_error.map(|d| d.as_secs_f64()),
    })
}

async fn worker(
    index: u64,
    spec: &LoadSpec,
    target: &Target,
    plan: &Plan,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new()?;
    let mut rng = SmallRng::seed_from_u64(spec.seed.wrapping_mul(1_000_003).wrapping_add(index));
    let needs_id = spec.path.contains("{rand}");
    let mut conn: Option<http1::SendRequest<Empty<Bytes>>> = None;
    while let Some(due) = plan.claim() {
        // Only sleep when early: tokio timers tick in whole milliseconds, so
        // even an already-due sleep would cost up to 1 ms per request.
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        // No allocation per request unless the path has `{rand}`.
        let path: std::borrow::Cow<'_, str> = if needs_id {
            target
                .path_prefix
                .replace(
                    "{rand}",
                    &rng.random_range(1..=spec.id_max.max(1)).to_string(),
                )
                .into()
        } else {
            target.path_prefix.as_str().into()
        };
        // Open loop: measured from when the request was due, not when it went out.
        let measured_from = if plan.interval.is_some() {
            due
        } else {
            Instant::now()
        };
        let outcome = tokio::time::timeout(spec.timeout, send(&mut conn, target, &path)).await;
        let latency = measured_from.elapsed();
        if let Some(live) = &spec.live {
            live.record(latency, finished(&outcome));
        }
        tally
            .histogram
            .saturating_record((latency.as_micros() as u64).max(1));
        match outcome {
            Ok(Ok((status, served_by))) => {
                if (200..300).contains(&status) {
                    tally.ok += 1;
                } else {
                    tally.error(&status.to_string(), plan.start.elapsed());
                }
                if let Some(b) = served_by {
                    match tally.by_backend.get_mut(b.as_str()) {
                        Some(n) => *n += 1,
                        None => {
                            tally.by_backend.insert(b, 1);
                        }
                    }
                }
            }
            Ok(Err(kind)) => {
                conn = None;
                tally.error(kind, plan.start.elapsed());
            }
            Err(_) => {
                // The connection may still carry the late answer: start afresh.
                conn = None;
                tally.error("timeout", plan.start.elapsed());
            }
        }
        plan.done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(tally)
}

/// How a request ended, in the live window's terms.
fn finished<'a, E>(
    outcome: &'a Result<Result<(u16, Option<String>), &'static str>, E>,
) -> Finished<'a> {
    match outcome {
        Ok(Ok((status, served_by))) => Finished::Answered {
            status: *status,
            served_by: served_by.as_deref(),
        },
        Ok(Err(_)) => Finished::Failed,
        Err(_) => Finished::TimedOut,
    }
}

/// Where requests go: `host:port` to dial, the Host header, and the path
/// template (with `{rand}` still in it).
struct Target {
    addr: String,
    host: http::HeaderValue,
    path_prefix: String,
}

impl Target {
    fn parse(url: &str, path: &str) -> anyhow::Result<Target> {
        let base: hyper::Uri = url
            .parse()
            .with_context(|| format!("invalid --url {url:?}"))?;
        if base.scheme_str() != Some("http") {
            bail!("--url must be an http:// URL, got {url:?}");
        }
        let authority = base
            .authority()
            .with_context(|| format!("--url {url:?} has no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        let addr = format!("{}:{port}", authority.host());
        let prefix = base.path().trim_end_matches('/');
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let path_prefix = format!("{prefix}{path}");
        // Check once that the path makes a valid URI.
        path_prefix
            .replace("{rand}", "1")
            .parse::<hyper::Uri>()
            .with_context(|| format!("invalid --path {path:?}"))?;
        Ok(Target {
            host: http::HeaderValue::from_str(authority.as_str())?,
            addr,
            path_prefix,
        })
    }
}

/// One GET on this worker's own keep-alive connection (dialled on first use
/// and after any error): no shared pool, so workers never contend on a lock
/// and the generator stays far from being the bottleneck.
async fn send(
    conn: &mut Option<http1::SendRequest<Empty<Bytes>>>,
    target: &Target,
    path: &str,
) -> Result<(u16, Option<String>), &'static str> {
    let sender = match conn {
        Some(sender) if !sender.is_closed() => sender,
        _ => {
            let stream = tokio::net::TcpStream::connect(&target.addr)
                .await
                .map_err(|_| "connect")?;
            let _ = stream.set_nodelay(true);
            let (sender, connection) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|_| "connect")?;
            tokio::spawn(async move {
                let _ = connection.await;
            });
            conn.insert(sender)
        }
    };
    sender.ready().await.map_err(|_| "transport")?;
    let request = hyper::Request::get(path)
        .header(http::header::HOST, target.host.clone())
        .body(Empty::<Bytes>::new())
        .map_err(|_| "request")?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|_| "transport")?;
    let status = response.status().as_u16();
    let served_by = response
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    // Read the body to the end so the connection can be reused.
    response
        .into_body()
        .collect()
        .await
        .map_err(|_| "transport")?;
    Ok((status, served_by))
}
