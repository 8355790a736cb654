//! `labctl bench lb`: the three cause-1 remedies under the same load, in
//! one run. For each round and each `lb` value a fresh native stack is
//! started (free ports, temporary state dir), warmed up, then loaded in a
//! closed loop; rounds interleave the modes so machine noise hits them
//! alike, and the table reports per-mode medians over rounds.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use anyhow::Context;
use lab_common::config::{LabConfig, LbMode};
use serde::Serialize;

use super::median;
use crate::{
    launcher::{Stack, UpOptions},
    load::{self, LoadSpec},
    ports::PortPolicy,
};

/// What to compare.
#[derive(Debug, Clone)]
pub struct BenchSpec {
    pub config: LabConfig,
    pub modes: Vec<LbMode>,
    pub backends: usize,
    pub concurrency: usize,
    pub duration: Duration,
    pub warmup: Duration,
    pub rounds: usize,
    pub path: String,
}

/// One mode's medians over the rounds.
#[derive(Debug, Clone, Serialize)]
pub struct ModeResult {
    pub lb: LbMode,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    /// Share of requests on the busiest B (1/backends = perfectly even).
    pub max_backend_share: f64,
    pub errors: u64,
    pub rounds: usize,
}

/// Runs the comparison; `progress` gets one line per finished measurement.
pub async fn run(
    spec: &BenchSpec,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Vec<ModeResult>> {
    let mut samples: BTreeMap<usize, Vec<load::LoadReport>> = BTreeMap::new();
    for round in 1..=spec.rounds {
        for (i, mode) in spec.modes.iter().enumerate() {
            let mut config = spec.config.clone();
            config.faults.lb = *mode;
            let dir: PathBuf = std::env::temp_dir()
                .join(format!("labctl-bench-{}-{round}-{i}", std::process::id()));
            let mut options = UpOptions::new(config, &dir);
            options.backends = spec.backends;
            options.ports = PortPolicy::Auto;
            let mut stack = Stack::up(options)
                .await
                .with_context(|| format!("starting the stack for lb={mode:?}"))?;
            let mut load_spec = LoadSpec::new(stack.a_url(), spec.path.clone());
            load_spec.concurrency = spec.concurrency;
            load_spec.duration = Some(spec.warmup);
            load::run(&load_spec, None).await?;
            load_spec.duration = Some(spec.duration);
            let report = load::run(&load_spec, None).await?;
            stack.down().await?;
            let _ = std::fs::remove_dir_all(&dir);
            progress(&format!(
                "round {round}/{} lb={:<4} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  busiest B {:>5.1}%",
                spec.rounds,
                lb_name(*mode),
                report.rps,
                report.latency_ms.p50,
                report.latency_ms.p99,
                report.max_backend_share() * 100.0
            ));
            samples.entry(i).or_default().push(report);
        }
    }
    Ok(samples
        .into_iter()
        .map(|(i, reports)| ModeResult {
            lb: spec.modes[i],
            rps: median(reports.iter().map(|r| r.rps).collect()),
            p50_ms: median(reports.iter().map(|r| r.latency_ms.p50).collect()),
            p99_ms: median(reports.iter().map(|r| r.latency_ms.p99).collect()),
            max_backend_share: median(reports.iter().map(|r| r.max_backend_share()).collect()),
            errors: reports.iter().map(|r| r.errors.values().sum::<u64>()).sum(),
            rounds: reports.len(),
        })
        .collect())
}

/// The switch value as the config and the command line spell it.
pub fn lb_name(mode: LbMode) -> String {
    use clap::ValueEnum;
    mode.to_possible_value()
        .map(|v| v.get_name().to_owned())
        .unwrap_or_else(|| format!("{mode:?}"))
}

/// A Markdown table of the results.
pub fn table(results: &[ModeResult]) -> String {
    let mut out = String::from(
        "| lb | req/s | p50 ms | p99 ms | busiest B | errors |\n|---|---:|---:|---:|---:|---:|\n",
    );
    for r in results {
        out.push_str(&format!(
            "| {} | {:.0} | {:.2} | {:.2} | {:.0}% | {} |\n",
            lb_name(r.lb),
            r.rps,
            r.p50_ms,
            r.p99_ms,
            r.max_backend_share * 100.0,
            r.errors
        ));
    }
    out
}
