//! Closed loop: `concurrency` workers, each sends its next request as soon
//! as its previous one finished. Latency runs from the send. Each worker
//! keeps its own tallies (merged at the end), so they share nothing per
//! request but the counter that numbers the requests.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use tokio::time::Instant;

use super::{
    LoadReport, LoadSpec,
    outcome::{Tally, Transport, call_with_timeout},
};

/// Shared between workers: the next request number and the stop rule.
struct Plan {
    next: AtomicU64,
    done: AtomicU64,
    limit: Option<u64>,
    end: Option<Instant>,
}

impl Plan {
    /// Claims the next request's number, or `None` to stop.
    fn claim(&self) -> Option<u64> {
        let k = self.next.fetch_add(1, Ordering::Relaxed);
        if self.limit.is_some_and(|limit| k >= limit) {
            return None;
        }
        if self.end.is_some_and(|end| Instant::now() >= end) {
            return None;
        }
        Some(k)
    }
}

pub(super) async fn run<T: Transport>(
    spec: &LoadSpec,
    transport: Arc<T>,
    progress: Option<indicatif::ProgressBar>,
) -> anyhow::Result<LoadReport> {
    let start = Instant::now();
    let plan = Arc::new(Plan {
        next: AtomicU64::new(0),
        done: AtomicU64::new(0),
        limit: spec.requests,
        end: spec.duration.map(|d| start + d),
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

    let workers: Vec<_> = (0..spec.concurrency)
        .map(|_| {
            let plan = plan.clone();
            let transport = transport.clone();
            let spec = spec.clone();
            tokio::spawn(async move { worker(&spec, &*transport, &plan, start).await })
        })
        .collect();
    let mut total = Tally::new()?;
    for result in futures::future::join_all(workers).await {
        total.merge(result.context("load worker panicked")??)?;
    }
    let elapsed = start.elapsed();
    if let Some(t) = ticker {
        t.abort();
    }
    Ok(total.report(elapsed))
}

async fn worker<T: Transport>(
    spec: &LoadSpec,
    transport: &T,
    plan: &Plan,
    start: Instant,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new()?;
    let mut session = transport.session();
    while let Some(k) = plan.claim() {
        let sent = Instant::now();
        let outcome = call_with_timeout(transport, &mut session, k, spec.timeout).await;
        let latency = sent.elapsed();
        tally.record(&outcome, latency, start.elapsed(), spec.live.as_deref());
        plan.done.fetch_add(1, Ordering::Relaxed);
    }
    Ok(tally)
}
