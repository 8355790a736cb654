//! What both loops share: the transport a worker sends through, how a
//! request ended, and the tallies a report is made of.

use std::{collections::BTreeMap, future::Future, time::Duration};

use hdrhistogram::Histogram;

use super::{Finished, LiveWindow, LoadReport, Percentiles};

/// Highest latency kept apart from others, in µs (1 h).
const MAX_US: u64 = 3_600_000_000;

/// One way of sending requests (HTTP/1.1, gRPC). Each worker holds a
/// session and uses it for one request at a time.
pub(crate) trait Transport: Send + Sync + 'static {
    /// A worker's own state: its HTTP connection, its gRPC client handles.
    type Session: Send + 'static;

    fn session(&self) -> Self::Session;

    /// Opens what the session needs before the clock starts (best effort:
    /// a failure shows up in the first request instead).
    fn warm(&self, session: &mut Self::Session) -> impl Future<Output = ()> + Send;

    /// Sends request number `k` (its id and, for gRPC, its connection are
    /// derived from `k`) and waits for the whole answer.
    fn call(&self, session: &mut Self::Session, k: u64) -> impl Future<Output = Outcome> + Send;

    /// The per-request timeout cut a call short: forget what it left
    /// half-done (an HTTP/1.1 connection still owed an answer).
    fn abandon(&self, _session: &mut Self::Session) {}
}

/// Sends request `k` with the spec's timeout around it.
pub(crate) async fn call_with_timeout<T: Transport>(
    transport: &T,
    session: &mut T::Session,
    k: u64,
    timeout: Duration,
) -> Outcome {
    match tokio::time::timeout(timeout, transport.call(session, k)).await {
        Ok(outcome) => outcome,
        Err(_) => {
            transport.abandon(session);
            Outcome::TimedOut
        }
    }
}

/// The instance that answered, as it came (no copy per request).
#[derive(Debug)]
pub(crate) enum ServedBy {
    Header(http::HeaderValue),
    Text(String),
}

impl ServedBy {
    pub(crate) fn as_str(&self) -> Option<&str> {
        match self {
            ServedBy::Header(value) => value.to_str().ok(),
            ServedBy::Text(text) => Some(text),
        }
    }
}

/// What counts as an error, before it becomes a report key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum ErrorKey {
    /// A non-2xx HTTP status.
    Status(u16),
    /// A gRPC code name or a transport kind.
    Named(&'static str),
}

impl std::fmt::Display for ErrorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ErrorKey::Status(code) => write!(f, "{code}"),
            ErrorKey::Named(name) => f.write_str(name),
        }
    }
}

/// How one request ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// The server answered: `error` is `None` for a success. `status` is the
    /// HTTP status (for gRPC, the code's HTTP equivalent, for the live
    /// window).
    Answered {
        status: u16,
        error: Option<ErrorKey>,
        served_by: Option<ServedBy>,
    },
    /// The per-request timeout ran out.
    TimedOut,
    /// No answer: `connect` or `transport`.
    Failed(&'static str),
}

impl Outcome {
    pub(crate) fn finished(&self) -> Finished<'_> {
        match self {
            Outcome::Answered {
                status, served_by, ..
            } => Finished::Answered {
                status: *status,
                served_by: served_by.as_ref().and_then(ServedBy::as_str),
            },
            Outcome::TimedOut => Finished::TimedOut,
            Outcome::Failed(_) => Finished::Failed,
        }
    }
}

/// Request `k`'s id in `1..=id_max`: a hash of the seed and `k`, so the ids
/// do not depend on which worker sends which request.
pub(crate) fn id_for(seed: u64, k: u64, id_max: u64) -> u64 {
    // splitmix64's finaliser: cheap and well mixed.
    let mut z = seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(k.wrapping_mul(0xBF58_476D_1CE4_E5B9));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    1 + z % id_max.max(1)
}

pub(crate) fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, MAX_US, 3)?)
}

pub(crate) fn record(histogram: &mut Histogram<u64>, d: Duration) {
    histogram.saturating_record((d.as_micros() as u64).clamp(1, MAX_US));
}

/// Counts of finished requests, merged into a report at the end.
pub(crate) struct Tally {
    pub(crate) latency: Histogram<u64>,
    /// The same latencies split by outcome: successes, and the rest.
    latency_ok: Histogram<u64>,
    latency_failed: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<ErrorKey, u64>,
    by_backend: BTreeMap<String, u64>,
    first_error: Option<Duration>,
    last_error: Option<Duration>,
}

impl Tally {
    pub(crate) fn new() -> anyhow::Result<Self> {
        Ok(Self {
            latency: histogram()?,
            latency_ok: histogram()?,
            latency_failed: histogram()?,
            ok: 0,
            errors: BTreeMap::new(),
            by_backend: BTreeMap::new(),
            first_error: None,
            last_error: None,
        })
    }

    /// One finished request: `latency` as measured, `at` its end since the
    /// start of the run.
    pub(crate) fn record(
        &mut self,
        outcome: &Outcome,
        latency: Duration,
        at: Duration,
        live: Option<&LiveWindow>,
    ) {
        if let Some(live) = live {
            live.record(latency, outcome.finished());
        }
        record(&mut self.latency, latency);
        let error = match outcome {
            Outcome::Answered {
                error, served_by, ..
            } => {
                if let Some(backend) = served_by.as_ref().and_then(ServedBy::as_str) {
                    match self.by_backend.get_mut(backend) {
                        Some(n) => *n += 1,
                        None => {
                            self.by_backend.insert(backend.to_string(), 1);
                        }
                    }
                }
                *error
            }
            Outcome::TimedOut => Some(ErrorKey::Named("timeout")),
            Outcome::Failed(kind) => Some(ErrorKey::Named(kind)),
        };
        match error {
            None => {
                self.ok += 1;
                record(&mut self.latency_ok, latency);
            }
            Some(key) => {
                record(&mut self.latency_failed, latency);
                *self.errors.entry(key).or_default() += 1;
                self.first_error.get_or_insert(at);
                self.last_error = Some(at);
            }
        }
    }

    pub(crate) fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        self.latency.add(&other.latency)?;
        self.latency_ok.add(&other.latency_ok)?;
        self.latency_failed.add(&other.latency_failed)?;
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

    /// The report of a run that took `elapsed`; the open loop fills in its
    /// own fields after.
    pub(crate) fn report(self, elapsed: Duration) -> LoadReport {
        let requests = self.latency.len();
        LoadReport {
            requests,
            ok: self.ok,
            errors: self
                .errors
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
            dropped: 0,
            rps: requests as f64 / elapsed.as_secs_f64().max(1e-9),
            latency_ms: Percentiles::of(&self.latency),
            latency_ok_ms: (!self.latency_ok.is_empty()).then(|| Percentiles::of(&self.latency_ok)),
            latency_failed_ms: (!self.latency_failed.is_empty())
                .then(|| Percentiles::of(&self.latency_failed)),
            by_backend: self.by_backend,
            target_rps: None,
            sent_rps: None,
            peak_in_flight: None,
            dispatch_lag_ms: None,
            first_error_s: self.first_error.map(|d| d.as_secs_f64()),
            last_error_s: self.last_error.map(|d| d.as_secs_f64()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn successes_and_failures_have_latencies_of_their_own() {
        let mut tally = Tally::new().unwrap();
        let answered = |status: u16| Outcome::Answered {
            status,
            error: (status != 200).then_some(ErrorKey::Status(status)),
            served_by: None,
        };
        // 90 slow successes (100 ms), 10 fast refusals (1 ms).
        for _ in 0..90 {
            tally.record(
                &answered(200),
                Duration::from_millis(100),
                Duration::ZERO,
                None,
            );
        }
        for _ in 0..10 {
            tally.record(
                &answered(503),
                Duration::from_millis(1),
                Duration::ZERO,
                None,
            );
        }
        let report = tally.report(Duration::from_secs(1));
        let ms = |p: f64| (p * 10.0).round() / 10.0;
        // Mixed, the refusals hide in the overall percentiles.
        assert_eq!(ms(report.latency_ms.p50), 100.0);
        assert_eq!(ms(report.latency_ok_ms.as_ref().unwrap().p50), 100.0);
        assert_eq!(ms(report.latency_failed_ms.as_ref().unwrap().p99), 1.0);
        assert_eq!(report.errors.get("503"), Some(&10));

        let none_failed = Tally::new().unwrap().report(Duration::from_secs(1));
        assert_eq!(none_failed.latency_ok_ms, None);
        assert_eq!(none_failed.latency_failed_ms, None);
    }

    #[test]
    fn ids_cover_the_range_and_follow_the_seed() {
        let ids: Vec<u64> = (0..10_000).map(|k| id_for(7, k, 10)).collect();
        assert!(ids.iter().all(|id| (1..=10).contains(id)));
        for id in 1..=10 {
            let n = ids.iter().filter(|&&x| x == id).count();
            assert!((800..1200).contains(&n), "id {id} drawn {n} times");
        }
        assert_eq!(id_for(7, 42, 1000), id_for(7, 42, 1000));
        let other: Vec<u64> = (0..100).map(|k| id_for(8, k, 1000)).collect();
        let same: Vec<u64> = (0..100).map(|k| id_for(7, k, 1000)).collect();
        assert_ne!(other, same);
    }
}
