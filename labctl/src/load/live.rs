//! The load generator's live window: what finished since someone last
//! looked. The run's report only says what happened over the whole run; a
//! scenario needs each second on its own (rate, errors, p50/p99, which B
//! answered), so every finished request is also recorded here, and
//! [`LiveWindow::take`] hands over the window and starts the next.

use std::{
    collections::BTreeMap,
    sync::{Mutex, PoisonError},
    time::{Duration, Instant},
};

use hdrhistogram::Histogram;

/// Highest latency the window keeps apart from others, in µs (1 h, as the
/// run's own histograms; anything slower is counted as 1 h).
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// How one request ended, as the generator saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finished<'a> {
    /// An HTTP answer of any status, with A's `x-served-by` when it had one.
    Answered {
        status: u16,
        served_by: Option<&'a str>,
    },
    /// Given up after the per-request timeout. Its latency (the timeout, or
    /// more when it was due earlier) is kept: a stall must show in p99.
    TimedOut,
    /// Refused or cut off before any answer. An error, but its latency is
    /// left out: a failing connect takes microseconds and would drag the
    /// percentiles down just when the service is worst.
    Failed,
}

/// What finished between two calls of [`LiveWindow::take`].
#[derive(Debug, Clone, PartialEq)]
pub struct WindowStats {
    /// How long the window was open (divide counts by it for rates).
    pub elapsed: Duration,
    /// Requests that got an HTTP answer, any status.
    pub answered: u64,
    /// Of `answered`: the 2xx ones (the goodput).
    pub ok: u64,
    /// Non-2xx answers, timeouts, transport failures, and requests the
    /// open loop dropped at its in-flight limit (a caller went unserved).
    pub errors: u64,
    /// Of `errors`: requests dropped at the generator's in-flight limit,
    /// never sent.
    pub dropped: u64,
    /// Latency percentiles of the answered and timed-out requests, in ms;
    /// `None` when there were none.
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Answers by their `x-served-by` value (B instance ids).
    pub by_backend: BTreeMap<String, u64>,
}

/// Shared by every load worker and read by the sampler. One short lock per
/// finished request; the histogram is allocated once and reset on `take`.
pub struct LiveWindow {
    tally: Mutex<Tally>,
}

struct Tally {
    since: Instant,
    /// Created on first use: creating one can only fail on invalid bounds,
    /// which are constant here, but `Default` must not fail at all.
    histogram: Option<Histogram<u64>>,
    answered: u64,
    ok: u64,
    errors: u64,
    dropped: u64,
    by_backend: BTreeMap<String, u64>,
}

impl Default for LiveWindow {
    fn default() -> Self {
        Self {
            tally: Mutex::new(Tally {
                since: Instant::now(),
                histogram: None,
                answered: 0,
                ok: 0,
                errors: 0,
                dropped: 0,
                by_backend: BTreeMap::new(),
            }),
        }
    }
}

impl std::fmt::Debug for LiveWindow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveWindow").finish_non_exhaustive()
    }
}

impl LiveWindow {
    /// A window that opens now.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records one finished request; `latency` as the generator measured it
    /// (from when it was due, in open loop).
    pub fn record(&self, latency: Duration, finished: Finished<'_>) {
        // A panic elsewhere while holding the lock cannot leave the tally
        // half-updated in a way that matters: keep counting.
        let mut tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
        let keep_latency = match finished {
            Finished::Answered { status, served_by } => {
                tally.answered += 1;
                if (200..300).contains(&status) {
                    tally.ok += 1;
                } else {
                    tally.errors += 1;
                }
                if let Some(id) = served_by {
                    match tally.by_backend.get_mut(id) {
                        Some(n) => *n += 1,
                        None => {
                            tally.by_backend.insert(id.to_string(), 1);
                        }
                    }
                }
                true
            }
            Finished::TimedOut => {
                tally.errors += 1;
                true
            }
            Finished::Failed => {
                tally.errors += 1;
                false
            }
        };
        if keep_latency {
            if tally.histogram.is_none() {
                tally.histogram = Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).ok();
            }
            if let Some(histogram) = tally.histogram.as_mut() {
                histogram.saturating_record((latency.as_micros() as u64).clamp(1, MAX_LATENCY_US));
            }
        }
    }

    /// Records a request the open loop dropped: due while its in-flight
    /// limit was reached, never sent (no latency).
    pub fn record_dropped(&self) {
        let mut tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
        tally.errors += 1;
        tally.dropped += 1;
    }

    /// Everything since the previous `take` (or since the window was made),
    /// and a fresh window from now.
    pub fn take(&self) -> WindowStats {
        let now = Instant::now();
        let mut tally = self.tally.lock().unwrap_or_else(PoisonError::into_inner);
        let ms = |us: u64| us as f64 / 1000.0;
        let (p50_ms, p99_ms) = match tally.histogram.as_mut() {
            Some(h) if !h.is_empty() => {
                let percentiles = (
                    Some(ms(h.value_at_quantile(0.50))),
                    Some(ms(h.value_at_quantile(0.99))),
                );
                h.reset();
                percentiles
            }
            _ => (None, None),
        };
        let stats = WindowStats {
            elapsed: now.saturating_duration_since(tally.since),
            answered: tally.answered,
            ok: tally.ok,
            errors: tally.errors,
            dropped: tally.dropped,
            p50_ms,
            p99_ms,
            by_backend: std::mem::take(&mut tally.by_backend),
        };
        tally.since = now;
        tally.answered = 0;
        tally.ok = 0;
        tally.errors = 0;
        tally.dropped = 0;
        stats
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: u16, served_by: Option<&str>) -> Finished<'_> {
        Finished::Answered { status, served_by }
    }

    #[test]
    fn a_window_counts_answers_errors_and_backends_then_starts_afresh() {
        let window = LiveWindow::new();
        for i in 1..=100u64 {
            window.record(Duration::from_millis(i), answered(200, Some("b-1")));
        }
        window.record(Duration::from_millis(3), answered(503, None));
        window.record(Duration::from_millis(4), answered(504, Some("b-2")));
        window.record(Duration::from_secs(30), Finished::TimedOut);
        window.record(Duration::from_micros(20), Finished::Failed);

        let stats = window.take();
        assert_eq!(stats.answered, 102);
        assert_eq!(stats.ok, 100, "the 200s");
        assert_eq!(stats.errors, 4, "503, 504, the timeout and the failure");
        assert_eq!(
            stats.by_backend,
            BTreeMap::from([("b-1".to_string(), 100), ("b-2".to_string(), 1)])
        );
        // 103 latencies: 1..=100 ms, 3 ms, 4 ms and 30 s (the failure's 20 µs
        // is left out). HDR keeps 3 significant digits.
        let p50 = stats.p50_ms.unwrap();
        assert!((49.0..=50.1).contains(&p50), "p50 {p50}");
        let p99 = stats.p99_ms.unwrap();
        assert!((99.0..=100.1).contains(&p99), "p99 {p99}");

        let next = window.take();
        assert_eq!(next.answered, 0);
        assert_eq!(next.ok, 0);
        assert_eq!(next.errors, 0);
        assert!(next.by_backend.is_empty());
        assert_eq!((next.p50_ms, next.p99_ms), (None, None));
    }

    #[test]
    fn a_timeout_lifts_p99_and_a_failure_does_not_pull_it_down() {
        let window = LiveWindow::new();
        window.record(Duration::from_secs(5), Finished::TimedOut);
        for _ in 0..50 {
            window.record(Duration::from_micros(5), Finished::Failed);
        }
        let stats = window.take();
        assert_eq!(stats.answered, 0);
        assert_eq!(stats.errors, 51);
        let p50 = stats.p50_ms.unwrap();
        assert!((4990.0..=5010.0).contains(&p50), "p50 {p50}");
    }

    #[test]
    fn elapsed_is_the_time_since_the_previous_take() {
        let window = LiveWindow::new();
        let before_first = Instant::now();
        let _ = window.take();
        let after_first = Instant::now();
        while after_first.elapsed() < Duration::from_millis(20) {
            std::hint::spin_loop();
        }
        let before_second = Instant::now();
        let second = window.take();
        // The window opened inside the first take and closed inside the second.
        assert!(second.elapsed >= before_second - after_first);
        assert!(second.elapsed <= before_first.elapsed());
    }

    #[test]
    fn workers_on_many_threads_lose_no_request() {
        let window = std::sync::Arc::new(LiveWindow::new());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let window = window.clone();
                std::thread::spawn(move || {
                    let id = format!("b-{t}");
                    for _ in 0..1000 {
                        window.record(Duration::from_millis(2), answered(200, Some(&id)));
                    }
                })
            })
            .collect();
        for thread in threads {
            thread.join().unwrap();
        }
        let stats = window.take();
        assert_eq!(stats.answered, 4000);
        assert_eq!(stats.by_backend.values().sum::<u64>(), 4000);
        assert_eq!(stats.by_backend.len(), 4);
    }

    /// The generator feeds the window with what its own report counts.
    #[tokio::test]
    async fn the_load_generator_records_every_request_in_the_window() {
        use std::sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        };

        use axum::{Router, http::StatusCode, response::IntoResponse, routing::get};

        let served = Arc::new(AtomicU64::new(0));
        let app = Router::new().route(
            "/api/items/{id}",
            get(move || {
                let served = served.clone();
                async move {
                    let n = served.fetch_add(1, Ordering::Relaxed);
                    let status = if n % 10 == 9 {
                        StatusCode::SERVICE_UNAVAILABLE
                    } else {
                        StatusCode::OK
                    };
                    let backend = if n.is_multiple_of(2) { "b-1" } else { "b-2" };
                    (status, [("x-served-by", backend)], "{}").into_response()
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let live = Arc::new(LiveWindow::new());
        let mut spec = crate::load::LoadSpec::new(format!("http://{addr}"), "/api/items/{rand}");
        spec.requests = Some(300);
        spec.concurrency = 4;
        spec.live = Some(live.clone());
        let report = crate::load::run(&spec, None).await.unwrap();
        server.abort();

        let stats = live.take();
        assert_eq!(report.requests, 300);
        assert_eq!(stats.answered, 300);
        assert_eq!(stats.errors, 30, "every tenth answer was a 503");
        assert_eq!(stats.by_backend, report.by_backend);
        assert_eq!(stats.by_backend.values().sum::<u64>(), 300);
        let (p50, p99) = (stats.p50_ms.unwrap(), stats.p99_ms.unwrap());
        assert!(p50 > 0.0 && p50 <= p99 && p99 <= report.latency_ms.max + 0.1);
    }
}
