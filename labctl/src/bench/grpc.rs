//! `labctl bench grpc`: what B's gRPC path costs next to the bare
//! transport, measured in one run.
//!
//! One native stack is started with one B whose item cache is on
//! (`service-b-1`), then a second B with the cache off (`service-b-2`,
//! every `GetItem` a MySQL read), plus the bare tonic echo of [`echo`] in a
//! process of its own. After a warm-up of each (which also fills the
//! cache), every round loads the three in turn with the same closed loop —
//! same client, method, concurrency and connections, gRPC straight at each
//! server — and the table gives medians over the rounds, each server's CPU
//! per call (from /proc, so the echo, which exports nothing, is measured
//! like the Bs) and the cached B's hit ratio from its own counter.

pub mod echo;

use std::{collections::BTreeMap, net::SocketAddr, path::Path, time::Duration};

use anyhow::Context;
use lab_common::config::LabConfig;
use serde::Serialize;
use tokio::process::Child;

use super::median;
use crate::{
    launcher::Stack,
    load::{self, LoadReport, LoadSpec},
    probe,
    procs::{self, Lifetime},
    scenario::sampler::exposition::Exposition,
};

/// What to compare and how hard to load it.
#[derive(Debug, Clone)]
pub struct GrpcBenchSpec {
    /// The stack's config; the cache of the first B is set from
    /// `cache_capacity`, the second B's is off.
    pub config: LabConfig,
    pub concurrency: usize,
    pub connections: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub rounds: usize,
    /// Ids are drawn from 1..=id_max: the hot set the cache must hold.
    pub id_max: u64,
    pub cache_capacity: u64,
    /// Each call's deadline (`grpc-timeout`).
    pub timeout: Duration,
}

/// The three servers, in the order each round loads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Target {
    /// The bare tonic echo: the transport and nothing else.
    Echo,
    /// service-b-1, item cache on: B's whole gRPC path without MySQL.
    BCached,
    /// service-b-2, cache off: every call reads MySQL, as the lab's B does.
    BMysql,
}

impl Target {
    pub const ALL: [Target; 3] = [Target::Echo, Target::BCached, Target::BMysql];

    pub fn name(self) -> &'static str {
        match self {
            Target::Echo => "echo",
            Target::BCached => "b-cached",
            Target::BMysql => "b-mysql",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Target::Echo => "bare tonic GetItem, no layers",
            Target::BCached => "service-b-1, item cache on",
            Target::BMysql => "service-b-2, cache off: a MySQL read per call",
        }
    }
}

/// One server's figures: medians over the rounds unless named otherwise.
#[derive(Debug, Clone, Serialize)]
pub struct TargetResult {
    pub target: Target,
    pub addr: String,
    /// Calls sent in all measured rounds.
    pub requests: u64,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// This server's median req/s over the echo's.
    pub vs_echo: f64,
    /// The server process's CPU (user + system) per call, in µs.
    pub server_cpu_us_per_request: f64,
    /// Hits over lookups in B's item cache in all measured rounds (`None`
    /// where nothing was looked up: the echo, and a B with the cache off).
    pub cache_hit_ratio: Option<f64>,
    /// Failed calls in all measured rounds, and by gRPC code.
    pub errors: u64,
    pub error_codes: BTreeMap<String, u64>,
    /// Answers by `served_by` in all measured rounds.
    pub served_by: BTreeMap<String, u64>,
    pub rounds: usize,
}

/// A server under test: where to call it, whose CPU to count, and (for a B)
/// where its counters are.
struct Server {
    target: Target,
    addr: String,
    pid: u32,
    admin_url: Option<String>,
}

/// One measured round of one server.
struct Round {
    sample: LoadReport,
    cpu_seconds: f64,
    lookups: Lookups,
}

/// Item cache lookups counted by a B.
#[derive(Debug, Clone, Copy, Default)]
struct Lookups {
    hits: f64,
    misses: f64,
}

/// Runs the comparison; `progress` gets one line per finished measurement.
pub async fn run(
    spec: &GrpcBenchSpec,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Vec<TargetResult>> {
    anyhow::ensure!(spec.rounds >= 1, "--rounds must be at least 1");
    anyhow::ensure!(
        spec.cache_capacity >= 1,
        "--cache-capacity must be at least 1: the b-cached row needs the cache on"
    );
    let seeded = u64::from(spec.config.mysql.seed_items);
    anyhow::ensure!(
        (1..=seeded).contains(&spec.id_max),
        "--id-max {} must be between 1 and mysql.seed_items ({seeded}), or B answers NOT_FOUND",
        spec.id_max
    );
    let dir = super::state_dir("grpc", None);
    let mut config = spec.config.clone();
    config.service_b.item_cache_capacity = spec.cache_capacity;
    let mut stack = Stack::up(super::stack_options(config, &dir.join("stack"), 1))
        .await
        .context("starting the stack (one B, item cache on)")?;
    let outcome = async {
        // The second B is the first one's twin with the cache off.
        stack.add_backend_overrides(&["service_b.item_cache_capacity=0".to_owned()]);
        stack
            .scale_backends(2)
            .await
            .context("starting the second B (item cache off)")?;
        let mut echo = EchoProcess::start(&dir).await?;
        let servers = vec![
            Server {
                target: Target::Echo,
                addr: echo.addr.to_string(),
                pid: echo.pid,
                admin_url: None,
            },
            b_server(&stack, Target::BCached, "service-b-1")?,
            b_server(&stack, Target::BMysql, "service-b-2")?,
        ];
        let results = compare(spec, &servers, &mut progress).await;
        echo.stop().await;
        results
    }
    .await;
    stack.down().await?;
    let _ = std::fs::remove_dir_all(&dir);
    outcome
}

fn b_server(stack: &Stack, target: Target, name: &str) -> anyhow::Result<Server> {
    let record = stack.service(name)?;
    Ok(Server {
        target,
        addr: record
            .grpc_addr
            .clone()
            .with_context(|| format!("{name} has no gRPC address"))?,
        pid: record.pid,
        admin_url: record.admin_url.clone(),
    })
}

/// Warms every server up, then runs the rounds, servers interleaved.
async fn compare(
    spec: &GrpcBenchSpec,
    servers: &[Server],
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<Vec<TargetResult>> {
    let load = |server: &Server, duration, seed| {
        let mut load = LoadSpec::new(format!("grpc://{}", server.addr), "lab.v1.Backend/GetItem");
        load.concurrency = spec.concurrency;
        load.connections = spec.connections;
        load.duration = Some(duration);
        load.id_max = spec.id_max;
        load.timeout = spec.timeout;
        load.seed = seed;
        load
    };
    let client = probe::http_client();
    for server in servers {
        load::run(&load(server, spec.warmup, 0), None)
            .await
            .with_context(|| format!("warming up {}", server.target.name()))?;
    }
    let mut rounds: Vec<Vec<Round>> = servers.iter().map(|_| Vec::new()).collect();
    for round in 1..=spec.rounds {
        for (server, done) in servers.iter().zip(&mut rounds) {
            let cpu_before = cpu_seconds(server.pid)?;
            let lookups_before = lookups(&client, server).await?;
            let sample = load::run(&load(server, spec.duration, round as u64), None)
                .await
                .with_context(|| format!("loading {}", server.target.name()))?;
            let cpu = cpu_seconds(server.pid)? - cpu_before;
            let after = lookups(&client, server).await?;
            progress(&format!(
                "round {round}/{} {:<8} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  p999 {:>6.2} ms  errors {}",
                spec.rounds,
                server.target.name(),
                sample.rps,
                sample.latency_ms.p50,
                sample.latency_ms.p99,
                sample.latency_ms.p999,
                sample.errors.values().sum::<u64>(),
            ));
            done.push(Round {
                sample,
                cpu_seconds: cpu,
                lookups: Lookups {
                    hits: after.hits - lookups_before.hits,
                    misses: after.misses - lookups_before.misses,
                },
            });
        }
    }
    Ok(summarise(servers, rounds))
}

/// Medians over the rounds, and each server's throughput against the echo's.
fn summarise(servers: &[Server], rounds: Vec<Vec<Round>>) -> Vec<TargetResult> {
    let mut results: Vec<TargetResult> = servers
        .iter()
        .zip(rounds)
        .map(|(server, rounds)| summarise_one(server, &rounds))
        .collect();
    let echo_rps = results
        .iter()
        .find(|r| r.target == Target::Echo)
        .map(|r| r.rps);
    for result in &mut results {
        result.vs_echo = echo_rps.map_or(f64::NAN, |echo| result.rps / echo);
    }
    results
}

fn summarise_one(server: &Server, rounds: &[Round]) -> TargetResult {
    let of = |f: fn(&LoadReport) -> f64| median(rounds.iter().map(|r| f(&r.sample)).collect());
    let mut error_codes = BTreeMap::new();
    let mut served_by = BTreeMap::new();
    for round in rounds {
        for (code, n) in &round.sample.errors {
            *error_codes.entry(code.clone()).or_default() += n;
        }
        for (backend, n) in &round.sample.by_backend {
            *served_by.entry(backend.clone()).or_default() += n;
        }
    }
    let hits: f64 = rounds.iter().map(|r| r.lookups.hits).sum();
    let lookups: f64 = rounds
        .iter()
        .map(|r| r.lookups.hits + r.lookups.misses)
        .sum();
    TargetResult {
        target: server.target,
        addr: server.addr.clone(),
        requests: rounds.iter().map(|r| r.sample.requests).sum(),
        rps: of(|s| s.rps),
        p50_ms: of(|s| s.latency_ms.p50),
        p99_ms: of(|s| s.latency_ms.p99),
        p999_ms: of(|s| s.latency_ms.p999),
        vs_echo: f64::NAN,
        server_cpu_us_per_request: median(
            rounds
                .iter()
                .map(|r| r.cpu_seconds * 1e6 / (r.sample.requests.max(1) as f64))
                .collect(),
        ),
        cache_hit_ratio: (lookups > 0.0).then(|| hits / lookups),
        errors: error_codes.values().sum(),
        error_codes,
        served_by,
        rounds: rounds.len(),
    }
}

/// A Markdown table of the results.
pub fn table(results: &[TargetResult]) -> String {
    let mut out = String::from(
        "| target | what answers | req/s | p50 ms | p99 ms | p999 ms | × echo | server CPU µs/call | cache hits | errors |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        let hits = r
            .cache_hit_ratio
            .map_or_else(|| "—".to_owned(), |h| format!("{:.1}%", h * 100.0));
        out.push_str(&format!(
            "| {} | {} | {:.0} | {:.2} | {:.2} | {:.2} | {:.2} | {:.1} | {hits} | {} |\n",
            r.target.name(),
            r.target.description(),
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.p999_ms,
            r.vs_echo,
            r.server_cpu_us_per_request,
            r.errors,
        ));
    }
    out
}

/// The process's CPU time so far (user + system), from /proc/PID/stat.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    Ok(super::process::usage(pid)?.cpu_seconds)
}

/// A B's `lab_item_cache_lookups_total` now (zero for the echo).
async fn lookups(client: &probe::HttpClient, server: &Server) -> anyhow::Result<Lookups> {
    let Some(admin) = &server.admin_url else {
        return Ok(Lookups::default());
    };
    let url = format!("{admin}/metrics");
    let (status, body) = probe::get(client, &url, Duration::from_secs(5)).await?;
    anyhow::ensure!(status == 200, "GET {url} answered {status}");
    let metrics = Exposition::parse(&String::from_utf8_lossy(&body));
    let count = |outcome| {
        metrics
            .get_labelled("lab_item_cache_lookups_total", "outcome", outcome)
            .unwrap_or(0.0)
    };
    Ok(Lookups {
        hits: count("hit"),
        misses: count("miss"),
    })
}

/// The echo, a child of this labctl (it dies with it).
struct EchoProcess {
    child: Child,
    pid: u32,
    addr: SocketAddr,
}

impl EchoProcess {
    /// Starts `labctl bench grpc-echo` on a free port and waits until it
    /// says where it listens; its output goes to `dir/grpc-echo.log`.
    async fn start(dir: &Path) -> anyhow::Result<Self> {
        let labctl = procs::find_lab_binary("labctl", None)?;
        let log = dir.join("grpc-echo.log");
        let mut cmd = std::process::Command::new(&labctl);
        cmd.args(["bench", "grpc-echo", "--listen", "127.0.0.1:0"]);
        let mut child = procs::spawn(cmd, &log, Lifetime::TiedToLabctl)?;
        let pid = child.id().context("the echo exited at once")?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        loop {
            tick.tick().await;
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if let Some(addr) = text.lines().find_map(echo::parse_listening_line) {
                return Ok(Self { child, pid, addr });
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "the echo exited ({status}) before listening:\n{}",
                    procs::tail(&log, 15)
                );
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "the echo did not listen within 10 s:\n{}",
                    procs::tail(&log, 15)
                );
            }
        }
    }

    async fn stop(&mut self) {
        procs::terminate_child(&mut self.child, Duration::from_secs(5)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(rps: f64, requests: u64) -> LoadReport {
        LoadReport {
            requests,
            ok: requests,
            errors: BTreeMap::new(),
            dropped: 0,
            rps,
            latency_ms: load::Percentiles {
                p50: 1.0,
                p90: 1.5,
                p99: 2.0,
                p999: 3.0,
                max: 4.0,
            },
            latency_ok_ms: None,
            latency_failed_ms: None,
            by_backend: BTreeMap::new(),
            target_rps: None,
            sent_rps: None,
            peak_in_flight: None,
            dispatch_lag_ms: None,
            first_error_s: None,
            last_error_s: None,
        }
    }

    fn server(target: Target) -> Server {
        Server {
            target,
            addr: "127.0.0.1:1".into(),
            pid: 1,
            admin_url: None,
        }
    }

    #[test]
    fn each_server_is_compared_with_the_echo_by_its_median() {
        let round = |rps, cpu, hits, misses| Round {
            sample: sample(rps, 10_000),
            cpu_seconds: cpu,
            lookups: Lookups { hits, misses },
        };
        let results = summarise(
            &[server(Target::Echo), server(Target::BCached)],
            vec![
                vec![
                    round(20_000.0, 0.5, 0.0, 0.0),
                    round(30_000.0, 0.5, 0.0, 0.0),
                ],
                vec![
                    round(12_000.0, 1.0, 9_000.0, 1_000.0),
                    round(20_000.0, 1.0, 10_000.0, 0.0),
                ],
            ],
        );
        assert_eq!(results[0].vs_echo, 1.0);
        assert_eq!(results[1].rps, 16_000.0);
        assert_eq!(results[1].vs_echo, 16_000.0 / 25_000.0);
        assert_eq!(results[0].cache_hit_ratio, None);
        assert_eq!(results[1].cache_hit_ratio, Some(0.95));
        assert_eq!(results[1].server_cpu_us_per_request, 100.0);
        assert_eq!(results[1].requests, 20_000);
        let table = table(&results);
        assert!(
            table.contains("| b-cached | service-b-1, item cache on | 16000 |"),
            "{table}"
        );
        assert!(table.contains("| 0.64 | 100.0 | 95.0% | 0 |"), "{table}");
    }
}
