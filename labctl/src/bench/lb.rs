//! `labctl bench lb`: the cause-1 remedies side by side, in the cases that
//! show what each one is for.
//!
//! Variants: `l4`, `l7` (HAProxy round robin), `l7-leastconn`, `etcd` (A's
//! power-of-two-choices over requests in flight) and `etcd-peak-ewma`.
//! Cases:
//!
//! * `homogeneous` — identical healthy Bs, closed loop: throughput, and
//!   what each variant costs in CPU per request;
//! * `degraded` — B number [`SLOW_B`] answers `--slow-latency` later
//!   (`service_b.handler_latency`, given to that instance alone), open loop
//!   at a fixed rate well below capacity, so every variant is offered the
//!   same load and the tails compare: round robin keeps sending that B its
//!   share, a load-aware balancer moves calls away from it;
//! * `killed` — halfway through, open loop, the B that has used the most
//!   CPU since the measurement began (the one carrying the traffic) is
//!   SIGKILLed: errors and tail per variant. Killing the busiest B, not a
//!   fixed one, keeps the case about losing a B that matters: under `l4`
//!   that is the B A's one connection is pinned to, and a peak-EWMA
//!   balancer that happened to favour one B at low load loses that one.
//!
//! For every case, round and variant a fresh native stack is started (free
//! ports; one state dir for the whole run, so MySQL is initialised once),
//! warmed up with the case's load, then measured. Within a round the cases
//! and variants interleave, so machine noise hits them alike; tables give
//! medians over the rounds. CPU is each process's own `utime + stime`
//! (`/proc/<pid>/stat`) read before and after the measured window: A plus
//! HAProxy, and every B, per 10 000 requests sent.

use std::{collections::BTreeMap, path::Path, time::Duration};

use anyhow::Context;
use lab_common::config::{BalanceLoad, LabConfig, LbMode, SlbBalance};
use serde::Serialize;

use super::{cpu_per_10k, median};
use crate::{
    launcher::Stack,
    load::{self, LoadReport, LoadSpec},
};

/// The B the `degraded` case slows down (`service-b-1`, serving as `b-1`).
/// Under `l4` the result depends on whether A's one connection landed on
/// it (HAProxy's round robin gives A's first connection to the first
/// server, so it usually does); the table shows its share.
pub const SLOW_B: usize = 1;

/// One way for A to reach the Bs: the `lb` switch and its balancing choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Variant {
    /// `lb = "l4"`: A's one connection through HAProxy's `mode tcp` frontend.
    L4,
    /// `lb = "l7"`, HAProxy's `balance roundrobin` per request.
    L7,
    /// `lb = "l7"`, `slb.balance = "leastconn"` (fewest requests in flight).
    L7Leastconn,
    /// `lb = "etcd"`, A's P2C over requests in flight.
    Etcd,
    /// `lb = "etcd"`, `service_a.balance_load = "peak-ewma"`.
    EtcdPeakEwma,
}

impl Variant {
    /// As the command line and the tables spell it.
    pub fn name(self) -> &'static str {
        match self {
            Variant::L4 => "l4",
            Variant::L7 => "l7",
            Variant::L7Leastconn => "l7-leastconn",
            Variant::Etcd => "etcd",
            Variant::EtcdPeakEwma => "etcd-peak-ewma",
        }
    }

    /// Sets the keys this variant is made of; the rest of `config` stays.
    pub fn apply(self, config: &mut LabConfig) {
        let (lb, balance, load) = match self {
            Variant::L4 => (LbMode::L4, SlbBalance::Roundrobin, BalanceLoad::Pending),
            Variant::L7 => (LbMode::L7, SlbBalance::Roundrobin, BalanceLoad::Pending),
            Variant::L7Leastconn => (LbMode::L7, SlbBalance::Leastconn, BalanceLoad::Pending),
            Variant::Etcd => (LbMode::Etcd, SlbBalance::Roundrobin, BalanceLoad::Pending),
            Variant::EtcdPeakEwma => (LbMode::Etcd, SlbBalance::Roundrobin, BalanceLoad::PeakEwma),
        };
        config.faults.lb = lb;
        config.slb.balance = balance;
        config.service_a.balance_load = load;
    }

    fn is_etcd(self) -> bool {
        matches!(self, Variant::Etcd | Variant::EtcdPeakEwma)
    }
}

/// What the Bs go through while they are measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum Case {
    /// Identical healthy Bs, closed loop.
    Homogeneous,
    /// One B answers `--slow-latency` later, open loop.
    Degraded,
    /// One B is SIGKILLed halfway through, open loop.
    Killed,
}

impl Case {
    /// What the case did to the B it acted on, for progress lines.
    fn acted_on(self) -> &'static str {
        match self {
            Case::Homogeneous => "",
            Case::Degraded => "slow",
            Case::Killed => "killed",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Case::Homogeneous => "homogeneous",
            Case::Degraded => "degraded",
            Case::Killed => "killed",
        }
    }

    /// Open loop at `--rps` (the same offered load for every variant), or
    /// closed loop at `--concurrency` (what the stack can do).
    fn open_loop(self) -> bool {
        self != Case::Homogeneous
    }
}

/// What to compare, and under which load.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub config: LabConfig,
    pub variants: Vec<Variant>,
    pub cases: Vec<Case>,
    pub backends: usize,
    /// Closed loop (`homogeneous`): connections, each sending its next
    /// request when the previous one is answered.
    pub concurrency: usize,
    /// Open loop (`degraded`, `killed`): requests per second, due whether
    /// or not earlier ones were answered…
    pub rps: f64,
    /// …with at most this many in flight (past it a request is dropped).
    pub max_in_flight: usize,
    /// `degraded`: added to every answer of the slow B.
    pub slow_latency: Duration,
    /// Measured time per case, variant and round.
    pub duration: Duration,
    /// Unmeasured load, the same as measured, before each measurement.
    pub warmup: Duration,
    pub rounds: usize,
    pub path: String,
}

impl BenchSpec {
    /// A's and the Bs' config for one measurement. The Bs need no drain
    /// period: the stack is stopped only after the load has ended.
    fn config_for(&self, variant: Variant) -> LabConfig {
        let mut config = self.config.clone();
        variant.apply(&mut config);
        config.service_b.drain_period = Duration::ZERO;
        config
    }

    /// How the case's load is described above its table.
    pub fn load_text(&self, case: Case) -> String {
        if case.open_loop() {
            format!("open loop at {} req/s", self.rps)
        } else {
            format!("closed loop over {} connections", self.concurrency)
        }
    }
}

/// One measurement: the load generator's report and the CPU the processes
/// used in the measured window.
#[derive(Debug, Clone)]
struct Sample {
    report: LoadReport,
    /// A's and HAProxy's CPU seconds.
    cpu_a_proxy: f64,
    /// Every B's CPU seconds.
    cpu_backends: f64,
    /// How long the stack took to start.
    startup: Duration,
    /// The instance id of the B the case acted on (slowed or killed).
    affected: Option<String>,
}

/// One variant's results in one case: medians over the rounds, except
/// `errors` and `dropped`, which are totals.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub variant: Variant,
    pub rounds: usize,
    /// Requests sent in the measured window (median).
    pub requests: f64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Failed requests, all rounds together, by kind (HTTP status,
    /// `timeout`, …).
    pub errors: BTreeMap<String, u64>,
    /// Open loop: due requests not sent because too many were in flight.
    pub dropped: u64,
    /// Share of the answers from the busiest B (1/backends is even).
    pub busiest_share: f64,
    /// Share of the answers from the B the case acted on: the slow one in
    /// `degraded`, the one killed halfway in `killed` (0 in `homogeneous`).
    pub affected_share: f64,
    /// A's and HAProxy's CPU seconds per 10 000 requests sent.
    pub cpu_a_proxy_per_10k: f64,
    /// Every B's CPU seconds per 10 000 requests sent.
    pub cpu_backends_per_10k: f64,
}

impl Row {
    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

/// A target from the issue, checked against this run's medians (printed,
/// never asserted: one run on a shared machine is evidence, not a verdict).
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub what: String,
    /// Measured: the variant's figure over the reference's.
    pub ratio: f64,
    /// The target: `ratio` at most this.
    pub at_most: f64,
    pub met: bool,
}

impl Target {
    fn new(what: String, value: f64, reference: f64, at_most: f64) -> Self {
        let ratio = value / reference;
        Self {
            what,
            ratio,
            at_most,
            met: ratio <= at_most,
        }
    }
}

/// One case's table.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    pub case: Case,
    /// The load, in words (`open loop at 1000 req/s`).
    pub load: String,
    pub rows: Vec<Row>,
    pub targets: Vec<Target>,
}

/// The whole run, as `--json` writes it.
#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub backends: usize,
    pub rounds: usize,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub concurrency: usize,
    pub rps: f64,
    pub max_in_flight: usize,
    pub slow_latency_ms: f64,
    /// The B the `degraded` case slows down.
    pub slow_b: String,
    pub cases: Vec<CaseResult>,
}

/// Runs the comparison; `progress` gets one line per finished measurement.
pub async fn run(spec: &BenchSpec, mut progress: impl FnMut(&str)) -> anyhow::Result<BenchResult> {
    anyhow::ensure!(
        spec.backends >= 2,
        "--backends must be at least 2: the cases act on one B and need another"
    );
    anyhow::ensure!(
        spec.rounds >= 1 && !spec.variants.is_empty() && !spec.cases.is_empty(),
        "nothing to measure: give at least one round, variant and case"
    );
    // One state dir for every stack of the run, used one after the other:
    // MySQL's data dir is initialised once, not once per stack.
    let dir = super::state_dir("lb", None);
    let measured = measure_all(spec, &dir, &mut progress).await;
    let _ = std::fs::remove_dir_all(&dir);
    let mut samples = measured?;
    let cases = spec
        .cases
        .iter()
        .map(|&case| {
            let rows: Vec<Row> = spec
                .variants
                .iter()
                .map(|&variant| {
                    summarise(
                        variant,
                        samples.remove(&(case, variant)).unwrap_or_default(),
                    )
                })
                .collect();
            CaseResult {
                case,
                load: spec.load_text(case),
                targets: targets(case, &rows),
                rows,
            }
        })
        .collect();
    Ok(BenchResult {
        backends: spec.backends,
        rounds: spec.rounds,
        duration_s: spec.duration.as_secs_f64(),
        warmup_s: spec.warmup.as_secs_f64(),
        concurrency: spec.concurrency,
        rps: spec.rps,
        max_in_flight: spec.max_in_flight,
        slow_latency_ms: spec.slow_latency.as_secs_f64() * 1000.0,
        slow_b: format!("b-{SLOW_B}"),
        cases,
    })
}

/// Every round, case and variant, interleaved.
async fn measure_all(
    spec: &BenchSpec,
    dir: &Path,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<BTreeMap<(Case, Variant), Vec<Sample>>> {
    let mut samples: BTreeMap<(Case, Variant), Vec<Sample>> = BTreeMap::new();
    for round in 1..=spec.rounds {
        for &case in &spec.cases {
            for &variant in &spec.variants {
                let sample = measure(spec, case, variant, dir).await.with_context(|| {
                    format!("{} / {} (round {round})", case.name(), variant.name())
                })?;
                progress(&progress_line(spec, round, case, variant, &sample));
                samples.entry((case, variant)).or_default().push(sample);
            }
        }
    }
    Ok(samples)
}

fn progress_line(
    spec: &BenchSpec,
    round: usize,
    case: Case,
    variant: Variant,
    s: &Sample,
) -> String {
    let r = &s.report;
    format!(
        "round {round}/{} {:<11} {:<14} up {:>4.1} s {:>7.0} req/s  p50 {:>6.2} ms  p99 {:>7.2} ms  p999 {:>7.2} ms  errors {:>5}  {} {:>5.1}%  CPU/10k A+proxy {:.2} s  B {:.2} s",
        spec.rounds,
        case.name(),
        variant.name(),
        s.startup.as_secs_f64(),
        r.rps,
        r.latency_ms.p50,
        r.latency_ms.p99,
        r.latency_ms.p999,
        r.errors.values().sum::<u64>(),
        match &s.affected {
            Some(b) => format!("{} {b}", case.acted_on()),
            None => "busiest B".to_string(),
        },
        match &s.affected {
            Some(b) => share_of(r, b),
            None => r.max_backend_share(),
        } * 100.0,
        cpu_per_10k(s.cpu_a_proxy, r.requests),
        cpu_per_10k(s.cpu_backends, r.requests),
    )
}

/// One fresh stack, warmed up, measured, stopped.
async fn measure(
    spec: &BenchSpec,
    case: Case,
    variant: Variant,
    dir: &Path,
) -> anyhow::Result<Sample> {
    let mut options = super::stack_options(spec.config_for(variant), dir, spec.backends);
    if case == Case::Degraded {
        options.instance_overrides.insert(
            SLOW_B,
            vec![format!(
                "service_b.handler_latency={}",
                humantime::format_duration(spec.slow_latency)
            )],
        );
    }
    let mut stack = Stack::up(options).await.context("starting the stack")?;
    let sample = drive(spec, case, &stack).await;
    stack.down().await.context("stopping the stack")?;
    sample
}

/// The case's load on a running stack: warm-up, then the measured window
/// with the processes' CPU read on either side of it.
async fn drive(spec: &BenchSpec, case: Case, stack: &Stack) -> anyhow::Result<Sample> {
    let mut load_spec = LoadSpec::new(stack.a_url(), spec.path.clone());
    load_spec.concurrency = spec.concurrency;
    if case.open_loop() {
        load_spec.rps = Some(spec.rps);
        load_spec.max_in_flight = spec.max_in_flight;
    }
    load_spec.duration = Some(spec.warmup);
    load::run(&load_spec, None).await.context("warming up")?;
    load_spec.duration = Some(spec.duration);

    let processes = Processes::of(stack);
    let before = processes.cpu(&BTreeMap::new());
    let kill = async {
        if case != Case::Killed {
            return Ok(None);
        }
        tokio::time::sleep(spec.duration / 2).await;
        let now = processes.cpu(&BTreeMap::new());
        let victim = processes
            .busiest_backend(&before, &now)
            .context("no B to kill")?;
        stack
            .signal(&victim, nix::sys::signal::Signal::SIGKILL)
            .with_context(|| format!("killing {victim}"))?;
        // Its reading now stands for its last: the CPU it uses until the
        // signal lands is lost in the kernel's 10 ms ticks.
        let last = now.get(&victim).copied().unwrap_or_default();
        Ok::<_, anyhow::Error>(Some((victim, last)))
    };
    let (report, killed) = tokio::join!(load::run(&load_spec, None), kill);
    let (report, killed) = (report.context("measuring")?, killed?);
    let final_readings: BTreeMap<String, Duration> = killed.iter().cloned().collect();
    let after = processes.cpu(&final_readings);
    let affected = match (case, killed) {
        (Case::Homogeneous, _) => None,
        (Case::Degraded, _) => Some(format!("service-b-{SLOW_B}")),
        (Case::Killed, killed) => killed.map(|(victim, _)| victim),
    }
    .and_then(|name| stack.service(&name).ok()?.instance_id.clone());
    let used = |names: &[String]| -> f64 {
        names
            .iter()
            .map(|n| {
                let b = before.get(n).copied().unwrap_or_default();
                let a = after.get(n).copied().unwrap_or(b);
                a.saturating_sub(b).as_secs_f64()
            })
            .sum()
    };
    Ok(Sample {
        cpu_a_proxy: used(&processes.front),
        cpu_backends: used(&processes.backends),
        startup: stack.startup,
        affected,
        report,
    })
}

/// The processes whose CPU is counted, by name, with their pids.
struct Processes {
    pids: BTreeMap<String, u32>,
    /// A and HAProxy: the path in front of the Bs.
    front: Vec<String>,
    backends: Vec<String>,
}

impl Processes {
    fn of(stack: &Stack) -> Self {
        let mut pids = BTreeMap::new();
        let (mut front, mut backends) = (Vec::new(), Vec::new());
        for s in &stack.state.services {
            let group = match s.name.as_str() {
                "service-a" | "slb" => &mut front,
                name if name.starts_with("service-b-") => &mut backends,
                _ => continue,
            };
            group.push(s.name.clone());
            pids.insert(s.name.clone(), s.pid);
        }
        Self {
            pids,
            front,
            backends,
        }
    }

    /// CPU used so far by each process, except that a process in `settled`
    /// keeps the reading given there (a killed B: its pid is gone, or may
    /// even be another process's by now).
    fn cpu(&self, settled: &BTreeMap<String, Duration>) -> BTreeMap<String, Duration> {
        self.pids
            .iter()
            .filter_map(|(name, &pid)| {
                let used = settled.get(name).copied().or_else(|| {
                    let usage = super::process::usage(pid).ok()?;
                    Some(Duration::from_secs_f64(usage.cpu_seconds))
                })?;
                Some((name.clone(), used))
            })
            .collect()
    }

    /// The B that used the most CPU between the two readings (the first
    /// of equals).
    fn busiest_backend(
        &self,
        before: &BTreeMap<String, Duration>,
        now: &BTreeMap<String, Duration>,
    ) -> Option<String> {
        let used = |name: &String| {
            let start = before.get(name).copied().unwrap_or_default();
            now.get(name)
                .copied()
                .unwrap_or(start)
                .saturating_sub(start)
        };
        let mut busiest: Option<(&String, Duration)> = None;
        for name in &self.backends {
            if busiest.is_none_or(|(_, most)| used(name) > most) {
                busiest = Some((name, used(name)));
            }
        }
        busiest.map(|(name, _)| name.clone())
    }
}

/// The share of the answers `instance` gave (0 when none came back).
fn share_of(report: &LoadReport, instance: &str) -> f64 {
    let total: u64 = report.by_backend.values().sum();
    if total == 0 {
        return 0.0;
    }
    report.by_backend.get(instance).copied().unwrap_or(0) as f64 / total as f64
}

fn summarise(variant: Variant, samples: Vec<Sample>) -> Row {
    let med = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect());
    let mut errors = BTreeMap::new();
    for s in &samples {
        for (kind, n) in &s.report.errors {
            *errors.entry(kind.clone()).or_default() += n;
        }
    }
    Row {
        variant,
        rounds: samples.len(),
        requests: med(&|s| s.report.requests as f64),
        rps: med(&|s| s.report.rps),
        p50_ms: med(&|s| s.report.latency_ms.p50),
        p99_ms: med(&|s| s.report.latency_ms.p99),
        p999_ms: med(&|s| s.report.latency_ms.p999),
        errors,
        dropped: samples.iter().map(|s| s.report.dropped).sum(),
        busiest_share: med(&|s| s.report.max_backend_share()),
        affected_share: med(&|s| {
            s.affected
                .as_deref()
                .map_or(0.0, |b| share_of(&s.report, b))
        }),
        cpu_a_proxy_per_10k: med(&|s| cpu_per_10k(s.cpu_a_proxy, s.report.requests)),
        cpu_backends_per_10k: med(&|s| cpu_per_10k(s.cpu_backends, s.report.requests)),
    }
}

/// The targets for `case`, for each variant they name that ran.
///
/// * `degraded`: etcd p99 ≤ 0.3 × l7 round robin's, and ≤ l7 leastconn's;
/// * `homogeneous` and `degraded`: etcd's A+proxy CPU per request ≤ 0.7 ×
///   l7's, at saturation (closed loop: many requests share each wake-up
///   of A or HAProxy) and at a fixed modest rate (open loop: few do, and
///   each request costs several times more). Not under `killed`, where
///   HAProxy's retries to the dead B are part of l7's cost.
fn targets(case: Case, rows: &[Row]) -> Vec<Target> {
    let row = |v: Variant| rows.iter().find(|r| r.variant == v && r.rounds > 0);
    let mut out = Vec::new();
    for etcd in rows.iter().filter(|r| r.variant.is_etcd() && r.rounds > 0) {
        let name = etcd.variant.name();
        if case == Case::Degraded {
            if let Some(l7) = row(Variant::L7) {
                out.push(Target::new(
                    format!("{name} p99 ≤ 0.3× l7 round-robin p99"),
                    etcd.p99_ms,
                    l7.p99_ms,
                    0.3,
                ));
            }
            if let Some(lc) = row(Variant::L7Leastconn) {
                out.push(Target::new(
                    format!("{name} p99 ≤ l7-leastconn p99"),
                    etcd.p99_ms,
                    lc.p99_ms,
                    1.0,
                ));
            }
        }
        if matches!(case, Case::Homogeneous | Case::Degraded)
            && let Some(l7) = row(Variant::L7)
        {
            out.push(Target::new(
                format!("{name} A+proxy CPU per request ≤ 0.7× l7's"),
                etcd.cpu_a_proxy_per_10k,
                l7.cpu_a_proxy_per_10k,
                0.7,
            ));
        }
    }
    out
}

/// One Markdown table per case, each with its targets below it.
pub fn tables(result: &BenchResult) -> String {
    let mut out = String::new();
    for c in &result.cases {
        let share = match c.case {
            Case::Homogeneous => "busiest B",
            Case::Degraded => "slow B",
            Case::Killed => "killed B",
        };
        out.push_str(&format!(
            "### {} — {} B, {}, {:?} per variant, medians of {} round(s)\n\n",
            c.case.name(),
            result.backends,
            c.load,
            Duration::from_secs_f64(result.duration_s),
            result.rounds
        ));
        out.push_str(&format!(
            "| variant | req/s | p50 ms | p99 ms | p999 ms | errors | dropped | {share} | A+proxy CPU s/10k | B CPU s/10k |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n"
        ));
        for r in &c.rows {
            let share = match c.case {
                Case::Homogeneous => r.busiest_share,
                Case::Degraded | Case::Killed => r.affected_share,
            };
            out.push_str(&format!(
                "| {} | {:.0} | {:.2} | {:.2} | {:.2} | {} | {} | {:.0}% | {:.2} | {:.2} |\n",
                r.variant.name(),
                r.rps,
                r.p50_ms,
                r.p99_ms,
                r.p999_ms,
                r.error_count(),
                r.dropped,
                share * 100.0,
                r.cpu_a_proxy_per_10k,
                r.cpu_backends_per_10k,
            ));
        }
        out.push('\n');
        for t in &c.targets {
            out.push_str(&format!(
                "target: {}: measured {:.2}× ({})\n",
                t.what,
                t.ratio,
                if t.met { "met" } else { "not met" }
            ));
        }
        if !c.targets.is_empty() {
            out.push('\n');
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(variant: Variant, p99_ms: f64, cpu: f64) -> Row {
        Row {
            variant,
            rounds: 1,
            requests: 1000.0,
            rps: 1000.0,
            p50_ms: 1.0,
            p99_ms,
            p999_ms: p99_ms,
            errors: BTreeMap::new(),
            dropped: 0,
            busiest_share: 0.5,
            affected_share: 0.5,
            cpu_a_proxy_per_10k: cpu,
            cpu_backends_per_10k: 1.0,
        }
    }

    #[test]
    fn variants_set_the_keys_they_are_named_after() {
        let mut config = LabConfig::default();
        Variant::L7Leastconn.apply(&mut config);
        assert_eq!(
            (
                config.faults.lb,
                config.slb.balance,
                config.service_a.balance_load
            ),
            (LbMode::L7, SlbBalance::Leastconn, BalanceLoad::Pending)
        );
        Variant::EtcdPeakEwma.apply(&mut config);
        assert_eq!(
            (
                config.faults.lb,
                config.slb.balance,
                config.service_a.balance_load
            ),
            (LbMode::Etcd, SlbBalance::Roundrobin, BalanceLoad::PeakEwma)
        );
        use clap::ValueEnum;
        for v in Variant::value_variants() {
            let on_command_line = v.to_possible_value().expect("not hidden");
            assert_eq!(on_command_line.get_name(), v.name());
        }
    }

    #[test]
    fn the_busiest_b_is_the_one_that_used_the_most_cpu_in_between() {
        let names = ["service-b-1", "service-b-2", "service-b-3"].map(String::from);
        let processes = Processes {
            pids: BTreeMap::new(),
            front: Vec::new(),
            backends: names.to_vec(),
        };
        let ms = |v: [u64; 3]| -> BTreeMap<String, Duration> {
            names
                .iter()
                .cloned()
                .zip(v.map(Duration::from_millis))
                .collect()
        };
        // b-1 has used the most overall, b-2 the most in between.
        let busiest = processes.busiest_backend(&ms([900, 100, 100]), &ms([950, 300, 200]));
        assert_eq!(busiest.as_deref(), Some("service-b-2"));
        let tie = processes.busiest_backend(&ms([0, 0, 0]), &ms([10, 10, 10]));
        assert_eq!(tie.as_deref(), Some("service-b-1"));
    }

    #[test]
    fn targets_compare_each_etcd_variant_with_the_l7_variants() {
        let rows = [
            row(Variant::L7, 20.0, 2.0),
            row(Variant::L7Leastconn, 10.0, 2.0),
            row(Variant::Etcd, 12.0, 1.6),
            row(Variant::EtcdPeakEwma, 2.0, 1.2),
        ];
        let degraded = targets(Case::Degraded, &rows);
        let get = |what: &str| degraded.iter().find(|t| t.what == what).expect(what);
        let p99 = get("etcd-peak-ewma p99 ≤ 0.3× l7 round-robin p99");
        assert!((p99.ratio - 0.1).abs() < 1e-9 && p99.met);
        assert!(!get("etcd p99 ≤ 0.3× l7 round-robin p99").met);
        assert!(!get("etcd p99 ≤ l7-leastconn p99").met);
        assert!(get("etcd-peak-ewma p99 ≤ l7-leastconn p99").met);
        assert!(get("etcd-peak-ewma A+proxy CPU per request ≤ 0.7× l7's").met);
        assert_eq!(degraded.len(), 6, "{degraded:?}");

        let homogeneous = targets(Case::Homogeneous, &rows);
        let cpu: Vec<(&str, f64, bool)> = homogeneous
            .iter()
            .map(|t| (t.what.as_str(), (t.ratio * 100.0).round() / 100.0, t.met))
            .collect();
        assert_eq!(
            cpu,
            [
                ("etcd A+proxy CPU per request ≤ 0.7× l7's", 0.8, false),
                (
                    "etcd-peak-ewma A+proxy CPU per request ≤ 0.7× l7's",
                    0.6,
                    true
                ),
            ]
        );
        assert!(
            targets(Case::Killed, &rows).is_empty(),
            "no target for a killed B"
        );
    }
}
