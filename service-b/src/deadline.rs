//! Cause 3 — whether B honours its caller's deadline (`faults.deadline`),
//! both forms side by side.
//!
//! tonic already enforces the caller's `grpc-timeout` on the handler future:
//! when it passes, tonic drops the future and answers CANCELLED. What it
//! cannot stop is work the handler *detached* — a spawned task runs on.
//!
//! * `ignore` (the incident): the handler does its work in a detached task,
//!   as the Go service did in a goroutine with a background context. The
//!   caller gives up at its deadline; B keeps working, nothing is shed, and
//!   requests queue behind each other on a starved runtime.
//! * `propagate` (the fix): the work stays in the handler future, so it
//!   stops when the deadline passes; at most `max_concurrent_requests` run
//!   at once and the excess is shed at once with RESOURCE_EXHAUSTED (A
//!   answers 503); a request whose deadline already passed while it waited
//!   is skipped; and the remaining budget bounds every downstream call.
//!
//! In both modes, work that finishes after its caller's deadline is counted
//! in `lab_work_after_deadline_total` by the work future itself, so the
//! count shows late work however the work was run.
//!
//! The switch is read per request, so `PUT /faults` applies to the next
//! request. Requests already running keep the mode they started with: work
//! detached under `ignore` runs on after a flip to `propagate` (nothing can
//! reattach it) and is not counted against `max_concurrent_requests`, so
//! for a while B may do more than that; a handler under `propagate` stays
//! bound to its caller after a flip to `ignore`.

use std::{future::Future, sync::Arc, time::Duration};

use prometheus::{Histogram, IntCounter, IntCounterVec, Registry};
use tokio::{sync::Semaphore, time::Instant};
use tonic::{Status, metadata::MetadataMap};
use tracing::Instrument as _;

use lab_common::{config::DeadlineMode, faults::LiveFaults, metrics::Registrar};

/// When the request reached B's connection (stamped by a server layer
/// before the handler task is scheduled, so runtime queueing shows).
#[derive(Debug, Clone, Copy)]
pub struct Arrived(pub Instant);

/// Deadline metrics.
#[derive(Clone)]
pub struct DeadlineMetrics {
    work_after_deadline: IntCounter,
    queue: Histogram,
    refused: IntCounterVec,
}

impl DeadlineMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let r = Registrar(registry);
        let refused = r.int_counter_vec(
            "lab_requests_refused_total",
            "Requests not worked on: shed (over max_concurrent_requests) or stale (deadline passed while queued).",
            &["reason"],
        )?;
        // At 0 from the start: a series that appeared only once the bounded
        // form sheds would tell a drill's trainee the switch.
        for reason in ["shed", "stale"] {
            refused.with_label_values(&[reason]);
        }
        Ok(Self {
            work_after_deadline: r.int_counter(
                "lab_work_after_deadline_total",
                "Requests still being worked on after their caller's deadline passed.",
            )?,
            queue: r.latency_histogram(
                "lab_request_queue_seconds",
                "Time from a request reaching B to its work starting.",
            )?,
            refused,
        })
    }
}

/// The caller's deadline: arrival + `grpc-timeout` (gRPC over HTTP/2 spec:
/// up to 8 digits and a unit H, M, S, m, u or n).
pub fn caller_deadline(arrived: Instant, metadata: &MetadataMap) -> Option<Instant> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    let timeout = match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    };
    arrived.checked_add(timeout)
}

/// Runs request work under the deadline policy in force.
#[derive(Clone)]
pub struct DeadlinePolicy {
    /// B's live switches; `deadline` is read per request.
    faults: LiveFaults,
    limiter: Arc<Semaphore>,
    max_concurrent: usize,
    metrics: DeadlineMetrics,
}

impl DeadlinePolicy {
    pub fn new(faults: LiveFaults, max_concurrent: usize, metrics: DeadlineMetrics) -> Self {
        Self {
            faults,
            limiter: Arc::new(Semaphore::new(max_concurrent)),
            max_concurrent,
            metrics,
        }
    }

    /// Runs `work`. It receives the deadline to honour downstream (`None`
    /// under `ignore`, which forwards nothing).
    pub async fn run<T, F, Fut>(
        &self,
        arrived: Instant,
        deadline: Option<Instant>,
        work: F,
    ) -> Result<T, Status>
    where
        F: FnOnce(Option<Instant>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, Status>> + Send + 'static,
        T: Send + 'static,
    {
        let metrics = self.metrics.clone();
        // Late work is counted by the work future itself, whichever way it
        // runs: work that outlives its caller shows in both modes, and work
        // stopped at the deadline never reaches the count.
        let late = self.metrics.work_after_deadline.clone();
        let work = move |honoured: Option<Instant>| async move {
            let result = work(honoured).await;
            if let Some(late_by) = late_by(deadline, Instant::now()) {
                late.inc();
                // In the request's span: the line carries its trace id, so
                // the id from A's 504 finds it (docs/architecture.md, "Trace ids").
                tracing::warn!(
                    late_by_ms = u64::try_from(late_by.as_millis()).unwrap_or(u64::MAX),
                    ok = result.is_ok(),
                    "finished after the caller's deadline; the caller had already given up"
                );
            }
            result
        };
        match self.faults.current().deadline {
            DeadlineMode::Ignore => {
                // Detached: dropping this handler (caller gone, deadline
                // passed) does not stop the task.
                // The task keeps the request's span (and so its trace id).
                let task = lab_common::tasks::spawn(
                    "grpc.detached-request",
                    async move {
                        metrics.queue.observe(arrived.elapsed().as_secs_f64());
                        work(None).await
                    }
                    .in_current_span(),
                );
                task.await
                    .map_err(|e| Status::internal(format!("request task failed: {e}")))?
            }
            DeadlineMode::Propagate => {
                let Ok(_permit) = self.limiter.try_acquire() else {
                    metrics.refused.with_label_values(&["shed"]).inc();
                    return Err(Status::resource_exhausted(format!(
                        "B is working on {} requests (service_b.max_concurrent_requests); shedding",
                        self.max_concurrent
                    )));
                };
                metrics.queue.observe(arrived.elapsed().as_secs_f64());
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    metrics.refused.with_label_values(&["stale"]).inc();
                    return Err(Status::deadline_exceeded(
                        "the caller's deadline passed before work started; skipped",
                    ));
                }
                work(deadline).await
            }
        }
    }
}

/// How long after `deadline` work finished at `now`, if it was late.
fn late_by(deadline: Option<Instant>, now: Instant) -> Option<Duration> {
    let late_by = now.checked_duration_since(deadline?)?;
    (!late_by.is_zero()).then_some(late_by)
}

/// What is left of `deadline`, capped at `cap` (no deadline: `cap`).
pub fn remaining(deadline: Option<Instant>, cap: Duration) -> Duration {
    match deadline {
        Some(d) => d.saturating_duration_since(Instant::now()).min(cap),
        None => cap,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lab_common::{
        config::{Faults, Mode},
        faults::Switch,
    };

    fn metadata(timeout: &str) -> MetadataMap {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", timeout.parse().expect("ascii"));
        m
    }

    #[test]
    fn late_by_is_only_for_work_past_its_deadline() {
        let deadline = Instant::now();
        let after = deadline + Duration::from_millis(1500);
        assert_eq!(
            late_by(Some(deadline), after),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(late_by(Some(after), deadline), None, "early");
        assert_eq!(late_by(Some(deadline), deadline), None, "on time");
        assert_eq!(late_by(None, after), None, "no deadline");
    }

    #[test]
    fn grpc_timeout_units_parse() {
        let now = Instant::now();
        assert_eq!(
            caller_deadline(now, &metadata("5S")),
            Some(now + Duration::from_secs(5))
        );
        assert_eq!(
            caller_deadline(now, &metadata("250m")),
            Some(now + Duration::from_millis(250))
        );
        assert_eq!(
            caller_deadline(now, &metadata("2M")),
            Some(now + Duration::from_secs(120))
        );
        assert_eq!(
            caller_deadline(now, &metadata("123456789S")),
            None,
            "at most 8 digits"
        );
        assert_eq!(caller_deadline(now, &metadata("5x")), None);
        assert_eq!(caller_deadline(now, &MetadataMap::new()), None);
    }

    fn live(mode: DeadlineMode) -> LiveFaults {
        let mut faults = Faults::preset(Mode::Buggy);
        faults.deadline = mode;
        LiveFaults::new("service-b", faults, Switch::SERVICE_B, &Registry::new())
            .expect("live faults")
    }

    fn policy(mode: DeadlineMode, max: usize) -> (DeadlinePolicy, DeadlineMetrics) {
        let metrics = DeadlineMetrics::register(&Registry::new()).expect("metrics");
        (
            DeadlinePolicy::new(live(mode), max, metrics.clone()),
            metrics,
        )
    }

    #[tokio::test]
    async fn ignore_keeps_working_after_the_caller_gave_up() {
        let (policy, metrics) = policy(DeadlineMode::Ignore, 1);
        let now = Instant::now();
        let deadline = Some(now + Duration::from_millis(20));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let call = policy.run(now, deadline, move |_| async move {
            tokio::time::sleep(Duration::from_millis(60)).await;
            let _ = tx.send(());
            Ok(())
        });
        // The caller gives up at its deadline: the handler future is dropped…
        assert!(
            tokio::time::timeout(Duration::from_millis(20), call)
                .await
                .is_err()
        );
        // …but the detached work finishes anyway, late.
        // (The count is taken in the same poll that sent this, before this
        // single-threaded test runs again.)
        rx.await.expect("work ran to the end");
        assert_eq!(metrics.work_after_deadline.get(), 1);
    }

    #[tokio::test]
    async fn propagate_stops_the_work_at_the_callers_deadline() {
        let (policy, metrics) = policy(DeadlineMode::Propagate, 1);
        let now = Instant::now();
        let deadline = Some(now + Duration::from_millis(20));
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let call = policy.run(now, deadline, move |_| async move {
            tokio::time::sleep(Duration::from_millis(60)).await;
            let _ = tx.send(());
            Ok(())
        });
        // The caller gives up at its deadline, as tonic does…
        assert!(
            tokio::time::timeout(Duration::from_millis(20), call)
                .await
                .is_err()
        );
        // …and the work went with it: it never reached its side effect.
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(rx.try_recv().is_err(), "the work ran on");
        assert_eq!(metrics.work_after_deadline.get(), 0);
    }

    #[tokio::test]
    async fn a_flip_applies_to_the_next_request() {
        let metrics = DeadlineMetrics::register(&Registry::new()).expect("metrics");
        let faults = live(DeadlineMode::Ignore);
        let policy = DeadlinePolicy::new(faults.clone(), 1, metrics.clone());
        let now = Instant::now();
        let stale = Some(now);
        // `ignore` runs work whose deadline already passed (and counts it late)…
        policy
            .run(now, stale, |_| async { Ok(()) })
            .await
            .expect("ignore runs it");
        assert_eq!(metrics.work_after_deadline.get(), 1);
        faults
            .apply(&serde_json::json!({"deadline": "propagate"}), "test")
            .expect("flip");
        // …and right after the flip the same request is skipped.
        let skipped = policy
            .run(now, stale, |_| async { Ok(()) })
            .await
            .expect_err("propagate skips it");
        assert_eq!(skipped.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(metrics.refused.with_label_values(&["stale"]).get(), 1);
        assert_eq!(metrics.work_after_deadline.get(), 1);
    }

    #[tokio::test]
    async fn propagate_sheds_the_excess_and_skips_stale_work() {
        let (policy, metrics) = policy(DeadlineMode::Propagate, 1);
        let now = Instant::now();
        let slow = {
            let policy = policy.clone();
            tokio::spawn(async move {
                policy
                    .run(now, None, |_| async {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(())
                    })
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        let shed = policy.run(Instant::now(), None, |_| async { Ok(()) }).await;
        assert_eq!(
            shed.expect_err("shed").code(),
            tonic::Code::ResourceExhausted
        );
        slow.await.expect("join").expect("first request ran");

        let stale = policy
            .run(now, Some(now), |_| async { Ok(()) })
            .await
            .expect_err("skipped");
        assert_eq!(stale.code(), tonic::Code::DeadlineExceeded);
        assert_eq!(metrics.refused.with_label_values(&["shed"]).get(), 1);
        assert_eq!(metrics.refused.with_label_values(&["stale"]).get(), 1);
        assert_eq!(metrics.work_after_deadline.get(), 0);
    }
}
