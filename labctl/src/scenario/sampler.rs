//! Samples every service once a second: reads `/metrics` of A, every B and
//! partner-api at once, and takes the load generator's live window, then
//! writes one point per signal and instance (keys of [`super::signals`]).
//!
//! * Which signals an instance has follows from its name: every process
//!   gives CPU, RSS, fds and tasks; `service-a` adds its own p50 and p99;
//!   `service-b-*` the worker, pool, job and leak figures; `partner-api`
//!   its handshakes and connections. The load generator is instance `load`,
//!   and the share of each B is charted under the B's name.
//! * Rates and A's percentiles come from the increase between this scrape
//!   and the previous good one of the same instance, over the real time
//!   between them. A process that restarted (its start time changed, or a counter
//!   went down) counts from zero, so no rate is ever negative.
//! * A metric missing from an answer is a gap, never a made-up 0; only a
//!   labelled counter whose metric is there but whose label has no line
//!   yet (nothing counted so far) reads 0.
//! * A target that does not answer within [`SCRAPE_TIMEOUT`] gets a gap
//!   (`None`) for each of its signals at that time, never its old values.

pub mod exposition;

use std::{
    collections::{HashMap, VecDeque},
    sync::Arc,
    time::{Duration, Instant},
};

use exposition::Exposition;

use super::{
    recording::Recording,
    signals::{self, Signal},
};
use crate::{
    load::{LiveWindow, WindowStats},
    probe,
};

/// Longest wait for one `/metrics`: the sampler runs once a second, and a
/// process too busy to answer in time is itself worth a gap on the chart.
pub const SCRAPE_TIMEOUT: Duration = Duration::from_millis(800);

/// CPU is averaged over this much trailing time. `process_cpu_seconds_total`
/// (the prometheus crate's process collector) counts whole seconds, so a
/// one-second increase is 0 or 100 %: a 5 s window gives 20 % steps and a
/// chart a reader can follow.
pub const CPU_WINDOW: Duration = Duration::from_secs(5);

/// The instance name of the load generator's series.
pub const LOAD_INSTANCE: &str = "load";

const MIB: f64 = 1024.0 * 1024.0;

/// One process to scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `service-a`, `service-b-1`, …, `partner-api`.
    pub instance: String,
    /// Its admin listener, e.g. `http://127.0.0.1:9081`.
    pub admin_url: String,
    /// A B's instance id (what A puts in `x-served-by`, e.g. `b-1`): the
    /// load generator's answers are charted under the B's name through it.
    pub instance_id: Option<String>,
}

/// Reads `/metrics` of every target and the load generator's live window.
pub struct Sampler {
    client: probe::HttpClient,
    live: Arc<LiveWindow>,
    targets: Vec<Target>,
    /// Per instance name: what rates are computed against.
    history: HashMap<String, History>,
}

/// What kind of process a target is, from its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ServiceA,
    ServiceB,
    Partner,
    /// Anything else with a `/metrics`: the process signals only.
    Other,
}

impl Kind {
    fn of(instance: &str) -> Kind {
        if instance == "service-a" {
            Kind::ServiceA
        } else if instance.starts_with("service-b-") {
            Kind::ServiceB
        } else if instance.starts_with("partner-api") {
            Kind::Partner
        } else {
            Kind::Other
        }
    }

    /// Every signal an instance of this kind has a series of.
    fn signals(self) -> Vec<Signal> {
        use signals::*;
        let mut all = vec![CPU_PERCENT, RSS_MIB, OPEN_FDS, TASKS_ALIVE];
        all.extend_from_slice(match self {
            Kind::ServiceA => &[A_P50_MS, A_P99_MS][..],
            Kind::ServiceB => &[
                JOB_TASKS,
                POOL_IN_USE,
                POOL_LEAKED,
                JOBS_DONE,
                JOBS_DUPLICATE,
                JOBS_DEAD,
                WORK_AFTER_DEADLINE,
                HTTP_RESPONSES_UNCLOSED,
            ],
            Kind::Partner => &[PARTNER_HANDSHAKES, PARTNER_CONNECTIONS],
            Kind::Other => &[],
        });
        all
    }
}

/// One good scrape.
struct Scrape {
    /// When the answer arrived.
    at: Instant,
    metrics: Exposition,
}

/// The counters of one good scrape that the next one is compared with.
struct Reading {
    at: Instant,
    start_time: Option<f64>,
    cpu_seconds: Option<f64>,
    jobs_done: Option<f64>,
    handshakes: Option<f64>,
    a_buckets: Vec<(f64, f64)>,
}

#[derive(Default)]
struct History {
    last: Option<Reading>,
    /// `(when, CPU seconds used since first seen)`, restarts bridged, over
    /// the last [`CPU_WINDOW`] and one entry before it.
    cpu: VecDeque<(Instant, f64)>,
    cpu_used: f64,
}

/// One sample's readings, not yet written (see [`Sampler::collect`]).
pub struct Collected {
    window: WindowStats,
    scrapes: Vec<Option<Scrape>>,
}

impl Sampler {
    /// A sampler that reads `live` (give the same window to every
    /// [`crate::load::LoadSpec`] of the run) and no target yet.
    pub fn new(live: Arc<LiveWindow>) -> Self {
        Self {
            client: probe::http_client(),
            live,
            targets: Vec::new(),
            history: HashMap::new(),
        }
    }

    /// Replaces the processes to scrape (Bs come and go with `scale`). An
    /// instance that left is forgotten, so if it comes back its first
    /// sample starts afresh instead of a rate across its absence.
    pub fn set_targets(&mut self, targets: Vec<Target>) {
        self.history
            .retain(|instance, _| targets.iter().any(|t| &t.instance == instance));
        self.targets = targets;
    }

    /// Takes one sample of everything at `t_s` into `recording`: every
    /// target's `/metrics` at once (each within [`SCRAPE_TIMEOUT`]), then
    /// the load generator's window.
    pub async fn sample(&mut self, t_s: f64, recording: &mut Recording) {
        let collected = self.collect().await;
        self.write(t_s, collected, recording);
    }

    /// The reading half of [`Self::sample`]: scrapes every target at once
    /// and takes the load generator's window, touching no recording (so a
    /// caller that shares the recording holds its lock only to write).
    pub async fn collect(&self) -> Collected {
        let scrapes = futures::future::join_all(
            self.targets
                .iter()
                .map(|target| scrape(&self.client, target)),
        )
        .await;
        Collected {
            window: self.live.take(),
            scrapes,
        }
    }

    /// The writing half of [`Self::sample`]: the points of what
    /// [`Self::collect`] read, at `t_s`.
    pub fn write(&mut self, t_s: f64, collected: Collected, recording: &mut Recording) {
        self.record(t_s, &collected.window, collected.scrapes, recording);
    }

    /// Writes the points of one sample; `scrapes` in the order of the
    /// targets, `None` where a target did not answer.
    fn record(
        &mut self,
        t_s: f64,
        window: &WindowStats,
        scrapes: Vec<Option<Scrape>>,
        recording: &mut Recording,
    ) {
        self.record_load(t_s, window, recording);
        for (target, scrape) in self.targets.iter().zip(scrapes) {
            let kind = Kind::of(&target.instance);
            let values = match scrape {
                Some(scrape) => self
                    .history
                    .entry(target.instance.clone())
                    .or_default()
                    .read(kind, scrape),
                None => kind.signals().into_iter().map(|s| (s, None)).collect(),
            };
            for (signal, value) in values {
                recording.push(signal.key, &target.instance, t_s, value);
            }
        }
    }

    /// Rate, errors, latency and each B's share from the live window.
    fn record_load(&self, t_s: f64, window: &WindowStats, recording: &mut Recording) {
        let seconds = window.elapsed.as_secs_f64();
        let per_second = |n: u64| (seconds > 0.0).then(|| n as f64 / seconds);
        recording.push(
            signals::RPS.key,
            LOAD_INSTANCE,
            t_s,
            per_second(window.answered),
        );
        recording.push(
            signals::ERRORS.key,
            LOAD_INSTANCE,
            t_s,
            per_second(window.errors),
        );
        recording.push(
            signals::DROPPED.key,
            LOAD_INSTANCE,
            t_s,
            per_second(window.dropped),
        );
        recording.push(
            signals::LATENCY_P50_MS.key,
            LOAD_INSTANCE,
            t_s,
            window.p50_ms,
        );
        recording.push(
            signals::LATENCY_P99_MS.key,
            LOAD_INSTANCE,
            t_s,
            window.p99_ms,
        );

        // Shares of the answers that named a B (an error A made up itself
        // names none). A known B that served nothing gets 0, not a gap: that
        // is the imbalance the chart is for.
        let named: u64 = window.by_backend.values().sum();
        let share = |n: u64| (named > 0).then(|| n as f64 / named as f64);
        let mut known = Vec::new();
        for target in &self.targets {
            if let Some(id) = target.instance_id.as_deref()
                && Kind::of(&target.instance) == Kind::ServiceB
            {
                let served = window.by_backend.get(id).copied().unwrap_or(0);
                recording.push(signals::SHARE.key, &target.instance, t_s, share(served));
                known.push(id);
            }
        }
        for (id, served) in &window.by_backend {
            if !known.contains(&id.as_str()) {
                recording.push(signals::SHARE.key, id, t_s, share(*served));
            }
        }
    }
}

impl History {
    /// Every signal of one good scrape, against the instance's previous one.
    fn read(&mut self, kind: Kind, scrape: Scrape) -> Vec<(Signal, Option<f64>)> {
        let m = &scrape.metrics;
        let last = self.last.take();
        let start_time = m.get("process_start_time_seconds");
        let restarted = matches!(
            (last.as_ref().and_then(|l| l.start_time), start_time),
            (Some(before), Some(now)) if before != now
        );
        let seconds = last
            .as_ref()
            .map(|l| scrape.at.saturating_duration_since(l.at).as_secs_f64())
            .filter(|s| *s > 0.0);
        let rate = |before: Option<f64>, now: Option<f64>| {
            Some(increase(before?, now?, restarted) / seconds?)
        };
        // A labelled counter has no line until its first increment: 0 while
        // the metric is there without it, a gap when the metric is not
        // there at all (renamed, not registered) rather than a made-up 0.
        let labelled_counter = |name: &str, label: &str, value: &str| {
            m.has(name)
                .then(|| m.get_labelled(name, label, value).unwrap_or(0.0))
        };

        let cpu_seconds = m.get("process_cpu_seconds_total");
        let cpu_before = last.as_ref().and_then(|l| l.cpu_seconds);
        let mut values = vec![
            (
                signals::CPU_PERCENT,
                self.cpu_percent(scrape.at, cpu_before, cpu_seconds, restarted),
            ),
            (
                signals::RSS_MIB,
                m.get("process_resident_memory_bytes").map(|b| b / MIB),
            ),
            (signals::OPEN_FDS, m.get("process_open_fds")),
            (signals::TASKS_ALIVE, m.get("tokio_alive_tasks")),
        ];

        let a_buckets = if kind == Kind::ServiceA {
            m.histogram_buckets("lab_http_request_duration_seconds")
        } else {
            Vec::new()
        };
        let jobs_done = labelled_counter("lab_jobs_total", "outcome", "done");
        let handshakes = m.get("partner_tls_handshakes_total");
        match kind {
            Kind::ServiceA => {
                let increase = last
                    .as_ref()
                    .map(|l| bucket_increase(&l.a_buckets, &a_buckets, restarted));
                for (signal, q) in [(signals::A_P50_MS, 0.5), (signals::A_P99_MS, 0.99)] {
                    let seconds = increase.as_ref().and_then(|b| histogram_quantile(q, b));
                    values.push((signal, seconds.map(|s| s * 1000.0)));
                }
            }
            Kind::ServiceB => values.extend([
                (signals::JOB_TASKS, m.get("lab_worker_tasks_alive")),
                (
                    signals::POOL_IN_USE,
                    m.get_labelled("lab_db_pool_connections", "state", "in_use"),
                ),
                (signals::POOL_LEAKED, m.get("lab_db_connections_leaked")),
                (
                    signals::JOBS_DONE,
                    rate(last.as_ref().and_then(|l| l.jobs_done), jobs_done),
                ),
                (signals::JOBS_DUPLICATE, m.get("lab_jobs_duplicate_total")),
                (
                    signals::JOBS_DEAD,
                    labelled_counter("lab_jobs_total", "outcome", "dead"),
                ),
                (
                    signals::WORK_AFTER_DEADLINE,
                    m.get("lab_work_after_deadline_total"),
                ),
                (
                    signals::HTTP_RESPONSES_UNCLOSED,
                    m.get("lab_http_responses_unclosed"),
                ),
            ]),
            Kind::Partner => values.extend([
                (
                    signals::PARTNER_HANDSHAKES,
                    rate(last.as_ref().and_then(|l| l.handshakes), handshakes),
                ),
                (
                    signals::PARTNER_CONNECTIONS,
                    m.get("partner_connections_open"),
                ),
            ]),
            Kind::Other => {}
        }

        self.last = Some(Reading {
            at: scrape.at,
            start_time,
            cpu_seconds,
            jobs_done,
            handshakes,
            a_buckets,
        });
        values
    }

    /// CPU used per wall second over the trailing [`CPU_WINDOW`], in % of
    /// one core; `None` until two readings are at hand.
    fn cpu_percent(
        &mut self,
        at: Instant,
        before: Option<f64>,
        now: Option<f64>,
        restarted: bool,
    ) -> Option<f64> {
        let Some(now) = now else {
            self.cpu.clear();
            return None;
        };
        match before {
            Some(before) => self.cpu_used += increase(before, now, restarted),
            // Nothing to bridge from: the window starts here.
            None => self.cpu.clear(),
        }
        self.cpu.push_back((at, self.cpu_used));
        while self.cpu.len() > 2
            && self
                .cpu
                .get(1)
                .is_some_and(|(t, _)| at.saturating_duration_since(*t) >= CPU_WINDOW)
        {
            self.cpu.pop_front();
        }
        if self.cpu.len() < 2 {
            return None;
        }
        let (since, used_then) = *self.cpu.front()?;
        let seconds = at.saturating_duration_since(since).as_secs_f64();
        (seconds > 0.0).then(|| (self.cpu_used - used_then) / seconds * 100.0)
    }
}

/// How much a counter grew; after a restart (or any drop) the new value
/// is all growth since zero.
fn increase(before: f64, now: f64, restarted: bool) -> f64 {
    if restarted || now < before {
        now
    } else {
        now - before
    }
}

/// The cumulative buckets of what was observed between two scrapes.
fn bucket_increase(before: &[(f64, f64)], now: &[(f64, f64)], restarted: bool) -> Vec<(f64, f64)> {
    let count_before = |le: f64| {
        before
            .iter()
            .find(|(bound, _)| *bound == le)
            .map_or(0.0, |(_, count)| *count)
    };
    let reset = restarted || now.iter().any(|&(le, count)| count < count_before(le));
    if reset {
        return now.to_vec();
    }
    now.iter()
        .map(|&(le, count)| (le, count - count_before(le)))
        .collect()
}

/// The `q` quantile of cumulative buckets (bounds ascending, `+Inf` last),
/// interpolated linearly within the bucket it falls in, as Prometheus's
/// `histogram_quantile` does; in the buckets' unit. `None` when nothing
/// was observed. A quantile in the `+Inf` bucket is the highest finite
/// bound: all that is known is "more than that".
fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 || total.is_nan() {
        return None;
    }
    let rank = q * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(le, count) in buckets {
        if count >= rank {
            if le.is_infinite() {
                return (lower > 0.0).then_some(lower);
            }
            if count <= below {
                return Some(le);
            }
            return Some(lower + (le - lower) * (rank - below) / (count - below));
        }
        lower = le;
        below = count;
    }
    None
}

/// GETs one target's `/metrics`; `None` on anything but a 200 in time.
async fn scrape(client: &probe::HttpClient, target: &Target) -> Option<Scrape> {
    let url = format!("{}/metrics", target.admin_url.trim_end_matches('/'));
    match probe::get(client, &url, SCRAPE_TIMEOUT).await {
        Ok((200, body)) => {
            let at = Instant::now();
            let metrics = Exposition::parse(&String::from_utf8_lossy(&body));
            if metrics.malformed > 0 {
                tracing::debug!(instance = %target.instance, lines = metrics.malformed,
                    "unreadable lines in /metrics skipped");
            }
            Some(Scrape { at, metrics })
        }
        Ok((status, _)) => {
            tracing::debug!(instance = %target.instance, status, "/metrics refused");
            None
        }
        Err(e) => {
            tracing::debug!(instance = %target.instance, error = %e, "/metrics not read");
            None
        }
    }
}

#[cfg(test)]
mod tests;
