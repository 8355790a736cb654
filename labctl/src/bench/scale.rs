//! `labctl bench scale`: how A's cost per request grows with the size of
//! its registry — more B instances in etcd, then a big registry that
//! churns.
//!
//! **The stack.** Native, free ports, `mode = fixed` with `lb = etcd`: A
//! discovers every B from etcd and balances each request itself (P2C over
//! requests in flight, one HTTP/2 connection per endpoint), so everything
//! that grows with the registry grows in A. The Bs run with
//! `worker.enabled = false`: 32 Bs each polling MySQL for jobs every second
//! would load the machine with work that is not A's, and no request here
//! creates a job. `service_b.drain_period = 0s` only shortens the
//! teardown of 32 Bs (A is stopped before them).
//!
//! **The cases, per round:** N real B processes for each `--backends`
//! value (ascending: the stack starts with the first and scales up, since
//! starting 32 Bs per case would cost more than the measurement), then at
//! the largest N, `--registry-keys` extra keys under the B prefix — first
//! static, then churning at `--churn-rate` replacements per second. The
//! largest-N case just before is their baseline: same processes, same
//! rate, only the registry differs. Rounds repeat the whole sequence on a
//! fresh stack (so memory figures start over), and the table reports
//! medians over rounds.
//!
//! **What the extra keys point at.** A dials every endpoint it discovers,
//! so the target decides what is measured:
//! * unreachable addresses would be ejected by A's circuit breaker, but
//!   every request that met a fresh one would fail over to a retry — that
//!   measures failure handling, not a large registry;
//! * a cheap stand-in listener would answer without doing B's work,
//!   making the big-registry requests cheaper than the baseline's;
//! * so each extra key is a fresh instance id (`extra-000123`) at a real
//!   B's address, round robin, in B's own value layout
//!   ([`service_b::registry::Registration`]). To A it is one more healthy
//!   instance: its own connection, HTTP/2 keepalive pings, a slot in the
//!   balancer, a share of the requests — exactly what a registry of
//!   N + keys instances costs A, with B's work per request unchanged.
//!
//! Churn replaces the oldest key the way a B that stops and a new one that
//! starts would: the leaving value (`"Op": 1`, which A honours at once and
//! never counts as a loss for its registry guard), the delete, and the new
//! instance's put. Keys have no lease (no keepalives to send for 1 000 of
//! them; A sees the same events either way).
//!
//! **The load** is open loop at a fixed `--rps` through A's HTTP port, the
//! same in every case: A then does the same work at the same pace, so its
//! CPU per request compares like with like. A closed loop would let the
//! rate follow how much CPU the extra Bs take from the shared cores, and
//! batching (more requests per wake-up at higher rates) would change A's
//! cost per request by itself. A case whose achieved rate falls short of
//! `--rps` is flagged. The rate must be one every case sustains; at a fixed
//! rate, CPU per request = the work of a request + A's background work (the
//! discovery watch, one keepalive ping per endpoint per second) ÷ rate.
//!
//! **The figures:** A's CPU seconds per 10 000 requests from the kernel's
//! own counters (`/proc/<pid>/stat` before and after the window, see
//! [`super::process`]), the generator's p50/p99 (open loop: from when each
//! request was due), the achieved rate, A's resident memory at the end of
//! the window, and A's endpoint count (`lab_backend_endpoints`).

use std::{
    collections::VecDeque,
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use anyhow::{Context, bail};
use etcd_client::{Client, Txn, TxnOp};
use lab_common::config::{EtcdConfig, LabConfig, LbMode};
use serde::Serialize;
use service_b::registry::Registration;
use tokio::time::Instant;

use super::{median, process};
use crate::{
    launcher::Stack,
    load::{self, LoadReport, LoadSpec},
};

/// What to measure.
#[derive(Debug, Clone)]
pub struct ScaleSpec {
    pub config: LabConfig,
    /// Real B processes per case, ascending.
    pub backends: Vec<usize>,
    /// Extra keys at the largest `backends` (0: no registry cases).
    pub registry_keys: usize,
    /// Extra keys replaced per second in the churning case (0: no such case).
    pub churn_rate: f64,
    /// The generator's open-loop rate at A.
    pub rps: f64,
    /// The generator's workers (connections to A).
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub rounds: usize,
    pub path: String,
}

/// One configuration of the registry.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Case {
    /// Real B processes.
    pub backends: usize,
    /// Extra keys under the B prefix, each at a real B's address.
    pub extra_keys: usize,
    /// Extra keys replaced per second (0: they stay put).
    pub churn_rate: f64,
}

impl Case {
    pub fn label(&self) -> String {
        let (n, keys, rate) = (self.backends, self.extra_keys, self.churn_rate);
        if keys == 0 {
            format!("{n} Bs")
        } else if rate == 0.0 {
            format!("{n} Bs + {keys} keys")
        } else {
            format!("{n} Bs + {keys} keys, {rate}/s churn")
        }
    }
}

/// The cases of one round, in the order they run.
pub fn cases(spec: &ScaleSpec) -> Vec<Case> {
    let mut cases: Vec<Case> = spec
        .backends
        .iter()
        .map(|&backends| Case {
            backends,
            extra_keys: 0,
            churn_rate: 0.0,
        })
        .collect();
    if let (Some(&largest), true) = (spec.backends.last(), spec.registry_keys > 0) {
        let with_keys = |churn_rate| Case {
            backends: largest,
            extra_keys: spec.registry_keys,
            churn_rate,
        };
        cases.push(with_keys(0.0));
        if spec.churn_rate > 0.0 {
            cases.push(with_keys(spec.churn_rate));
        }
    }
    cases
}

/// One case's medians over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    #[serde(flatten)]
    pub case: Case,
    pub label: String,
    /// A's `lab_backend_endpoints` at the end of the window.
    pub endpoints: f64,
    /// The generator's achieved rate.
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// A's CPU seconds (user + system) per 10 000 requests.
    pub a_cpu_s_per_10k: f64,
    /// A's resident memory at the end of the window.
    pub a_rss_mib: f64,
    /// Extra keys actually replaced per second during the window.
    pub churned_per_s: f64,
    /// Failed requests, summed over rounds.
    pub errors: u64,
    /// Whether every round reached 95 % of the target rate.
    pub sustained: bool,
    pub rounds: usize,
}

/// One case in one round.
struct Sample {
    report: LoadReport,
    cpu_seconds: f64,
    rss_bytes: u64,
    endpoints: f64,
    churned: u64,
}

/// A case reaches the target rate when it achieves this share of it.
const SUSTAINED: f64 = 0.95;
/// Bs started at once while scaling up: the launcher gives new Bs a fixed
/// 30 s to become ready, and two cores start about this many in time.
const SCALE_STEP: usize = 8;
/// How long A may take to see a change of its registry.
const DISCOVERY_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs every round; `progress` gets one line per finished measurement.
pub async fn run(
    spec: &ScaleSpec,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Vec<CaseResult>> {
    if spec.backends.is_empty() || spec.backends.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--backends must be ascending numbers of Bs, e.g. 2,8,32");
    }
    let cases = cases(spec);
    let mut samples: Vec<Vec<Sample>> = cases.iter().map(|_| Vec::new()).collect();
    for round in 1..=spec.rounds {
        let dir = super::state_dir("scale", Some(round));
        let mut config = spec.config.clone();
        config.faults.lb = LbMode::Etcd;
        let started = Instant::now();
        let mut stack = Stack::up(super::stack_options(config, &dir, spec.backends[0]))
            .await
            .context("starting the stack for bench scale")?;
        progress(&format!(
            "round {round}/{}: stack with {} Bs up in {:.1} s",
            spec.rounds,
            spec.backends[0],
            started.elapsed().as_secs_f64()
        ));
        let mut extra: Option<ExtraKeys> = None;
        for (i, case) in cases.iter().enumerate() {
            let sample = measure_case(spec, &mut stack, &mut extra, case, &mut progress).await?;
            progress(&format!(
                "round {round}/{} {:<34} {:>5.0} endpoints {:>7.0} req/s  p50 {:>6.2} ms  p99 {:>7.2} ms  A {:>6.3} CPU s/10k  {:>6.1} MiB",
                spec.rounds,
                case.label(),
                sample.endpoints,
                sample.report.rps,
                sample.report.latency_ms.p50,
                sample.report.latency_ms.p99,
                a_cpu_per_10k(&sample),
                sample.rss_bytes as f64 / MIB,
            ));
            samples[i].push(sample);
        }
        let stopping = Instant::now();
        stack.down().await?;
        let _ = std::fs::remove_dir_all(&dir);
        progress(&format!(
            "round {round}/{}: stack down in {:.1} s",
            spec.rounds,
            stopping.elapsed().as_secs_f64()
        ));
    }
    Ok(cases
        .iter()
        .zip(samples)
        .map(|(case, rounds)| summarise(spec, *case, &rounds))
        .collect())
}

const MIB: f64 = 1024.0 * 1024.0;

fn a_cpu_per_10k(sample: &Sample) -> f64 {
    super::cpu_per_10k(sample.cpu_seconds, sample.report.requests)
}

fn summarise(spec: &ScaleSpec, case: Case, rounds: &[Sample]) -> CaseResult {
    let of = |f: &dyn Fn(&Sample) -> f64| median(rounds.iter().map(f).collect());
    CaseResult {
        case,
        label: case.label(),
        endpoints: of(&|s| s.endpoints),
        rps: of(&|s| s.report.rps),
        p50_ms: of(&|s| s.report.latency_ms.p50),
        p99_ms: of(&|s| s.report.latency_ms.p99),
        a_cpu_s_per_10k: of(&a_cpu_per_10k),
        a_rss_mib: of(&|s| s.rss_bytes as f64 / MIB),
        churned_per_s: of(&|s| s.churned as f64 / spec.duration.as_secs_f64()),
        errors: rounds
            .iter()
            .map(|s| s.report.errors.values().sum::<u64>())
            .sum(),
        sustained: rounds.iter().all(|s| s.report.rps >= SUSTAINED * spec.rps),
        rounds: rounds.len(),
    }
}

/// Brings the stack to `case` (more Bs, the extra keys), waits until A
/// sees the whole registry, warms up and measures one window.
async fn measure_case(
    spec: &ScaleSpec,
    stack: &mut Stack,
    extra: &mut Option<ExtraKeys>,
    case: &Case,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<Sample> {
    scale_to(stack, case.backends, progress).await?;
    let mut warmup = spec.warmup;
    if case.extra_keys > 0 && extra.is_none() {
        let mut keys = ExtraKeys::connect(stack).await?;
        keys.fill(case.extra_keys).await?;
        *extra = Some(keys);
        // A connects to an endpoint on the first request it sends there:
        // give each extra endpoint a few requests' chance before the
        // window, so the static case does not pay for its connections.
        let first_requests = Duration::from_secs_f64(5.0 * case.extra_keys as f64 / spec.rps);
        warmup = warmup.max(first_requests);
    }
    let a = stack.service("service-a")?.clone();
    let a_admin = a.admin_url.clone().context("service-a has no admin URL")?;
    let expected = case.backends + case.extra_keys;
    wait_for_endpoints(&a_admin, expected).await?;

    let mut load_spec = LoadSpec::new(stack.a_url(), spec.path.clone());
    load_spec.rps = Some(spec.rps);
    load_spec.concurrency = spec.concurrency;
    load_spec.timeout = Duration::from_secs(5);
    let churned = AtomicU64::new(0);
    let window = async {
        load_spec.duration = Some(warmup);
        load::run(&load_spec, None).await?;
        let before = process::usage(a.pid)?;
        let churned_before = churned.load(Ordering::Relaxed);
        load_spec.duration = Some(spec.duration);
        let report = load::run(&load_spec, None).await?;
        let after = process::usage(a.pid)?;
        Ok::<_, anyhow::Error>(Sample {
            report,
            cpu_seconds: after.cpu_seconds - before.cpu_seconds,
            rss_bytes: after.rss_bytes,
            endpoints: 0.0,
            churned: churned.load(Ordering::Relaxed) - churned_before,
        })
    };
    let mut sample = match (extra.as_mut(), case.churn_rate > 0.0) {
        (Some(keys), true) => tokio::select! {
            sample = window => sample?,
            failed = keys.churn(case.churn_rate, &churned) => return Err(failed),
        },
        _ => window.await?,
    };
    sample.endpoints = endpoints(&a_admin).await.unwrap_or(f64::NAN);
    Ok(sample)
}

/// Scales the stack's Bs up to `n`, [`SCALE_STEP`] at a time.
async fn scale_to(
    stack: &mut Stack,
    n: usize,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<()> {
    let mut running = stack.state.backends().filter(|b| b.is_alive()).count();
    if running == n {
        return Ok(());
    }
    let started = Instant::now();
    while running != n {
        running = if running < n {
            (running + SCALE_STEP).min(n)
        } else {
            n
        };
        stack
            .scale_backends(running)
            .await
            .with_context(|| format!("scaling to {running} Bs"))?;
    }
    progress(&format!(
        "scaled to {n} Bs in {:.1} s",
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

/// A's `lab_backend_endpoints` now.
async fn endpoints(admin_url: &str) -> Option<f64> {
    super::admin_sample(admin_url, "lab_backend_endpoints").await
}

/// Waits until A's balancer holds `expected` endpoints.
async fn wait_for_endpoints(admin_url: &str, expected: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + DISCOVERY_TIMEOUT;
    let mut seen = None;
    while Instant::now() < deadline {
        seen = endpoints(admin_url).await;
        if seen == Some(expected as f64) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("A did not see {expected} endpoints within {DISCOVERY_TIMEOUT:?} (last seen: {seen:?})")
}

/// The extra registrations: fresh instance ids at the real Bs' addresses
/// (the module doc says why), oldest first.
struct ExtraKeys {
    client: Client,
    etcd: EtcdConfig,
    /// gRPC address of each real B, dealt round robin.
    targets: Vec<String>,
    live: VecDeque<Registration>,
    next_id: u64,
}

/// Puts per etcd transaction while filling (etcd allows 128 by default).
const FILL_BATCH: usize = 100;

impl ExtraKeys {
    async fn connect(stack: &Stack) -> anyhow::Result<Self> {
        let etcd = stack.config().etcd.clone();
        let targets: Vec<String> = stack
            .state
            .backends()
            .filter(|b| b.is_alive())
            .filter_map(|b| b.grpc_addr.clone())
            .collect();
        if targets.is_empty() {
            bail!("no running B to point the extra keys at");
        }
        let client = Client::connect(&etcd.endpoints, None)
            .await
            .context("connecting to the stack's etcd")?;
        Ok(Self {
            client,
            etcd,
            targets,
            live: VecDeque::new(),
            next_id: 0,
        })
    }

    /// The next fresh instance.
    fn next_registration(&mut self) -> Registration {
        let grpc = &self.targets[self.next_id as usize % self.targets.len()];
        let registration =
            Registration::new(&self.etcd, &format!("extra-{:06}", self.next_id), grpc);
        self.next_id += 1;
        registration
    }

    /// Registers `n` keys.
    async fn fill(&mut self, n: usize) -> anyhow::Result<()> {
        let mut left = n;
        while left > 0 {
            let batch: Vec<Registration> = (0..left.min(FILL_BATCH))
                .map(|_| self.next_registration())
                .collect();
            let puts = batch
                .iter()
                .map(|r| TxnOp::put(r.key.as_str(), r.value.as_str(), None))
                .collect::<Vec<_>>();
            self.client
                .txn(Txn::new().and_then(puts))
                .await
                .context("registering extra keys")?;
            left -= batch.len();
            self.live.extend(batch);
        }
        Ok(())
    }

    /// One instance leaves (its leaving value, then its delete) and a new
    /// one registers.
    async fn replace_oldest(&mut self) -> anyhow::Result<()> {
        if let Some(old) = self.live.pop_front() {
            self.client
                .put(old.key.as_str(), old.leaving.as_str(), None)
                .await
                .context("marking an extra key as leaving")?;
            self.client
                .delete(old.key.as_str(), None)
                .await
                .context("deleting an extra key")?;
        }
        let new = self.next_registration();
        self.client
            .put(new.key.as_str(), new.value.as_str(), None)
            .await
            .context("registering an extra key")?;
        self.live.push_back(new);
        Ok(())
    }

    /// Replaces keys at `rate` per second until the caller stops polling,
    /// counting each in `done`; returns only on an etcd failure.
    async fn churn(&mut self, rate: f64, done: &AtomicU64) -> anyhow::Error {
        let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tick.tick().await;
            if let Err(e) = self.replace_oldest().await {
                return e;
            }
            done.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A Markdown table of the results.
pub fn table(results: &[CaseResult]) -> String {
    let mut out = String::from(
        "| case | A endpoints | req/s | p50 ms | p99 ms | A CPU s / 10k req | A RSS MiB | churned/s | errors |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {:.0} | {:.0}{} | {:.2} | {:.2} | {:.3} | {:.1} | {:.0} | {} |\n",
            r.label,
            r.endpoints,
            r.rps,
            if r.sustained { "" } else { " (short)" },
            r.p50_ms,
            r.p99_ms,
            r.a_cpu_s_per_10k,
            r.a_rss_mib,
            r.churned_per_s,
            r.errors
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(backends: Vec<usize>, registry_keys: usize, churn_rate: f64) -> ScaleSpec {
        ScaleSpec {
            config: LabConfig::default(),
            backends,
            registry_keys,
            churn_rate,
            rps: 1000.0,
            concurrency: 8,
            duration: Duration::from_secs(1),
            warmup: Duration::from_secs(1),
            rounds: 1,
            path: "/".into(),
        }
    }

    #[test]
    fn the_registry_cases_come_last_at_the_largest_number_of_bs() {
        let labels: Vec<String> = cases(&spec(vec![2, 8, 32], 1000, 50.0))
            .iter()
            .map(Case::label)
            .collect();
        assert_eq!(
            labels,
            [
                "2 Bs",
                "8 Bs",
                "32 Bs",
                "32 Bs + 1000 keys",
                "32 Bs + 1000 keys, 50/s churn"
            ]
        );
        assert_eq!(
            cases(&spec(vec![2, 3], 0, 50.0)).len(),
            2,
            "no keys: no registry cases"
        );
        assert_eq!(
            cases(&spec(vec![2], 10, 0.0)).len(),
            2,
            "no churn: the static case only"
        );
    }
}
