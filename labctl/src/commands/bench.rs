//! `labctl bench …`: the lb remedies side by side on fresh stacks, B's gRPC
//! path against a bare tonic echo, A's cost as its registry grows, B's
//! claim as the jobs table grows.

use anyhow::Context;
use lab_common::config;
use labctl::bench::{
    grpc::{self as grpc_bench, GrpcBenchSpec},
    jobs::{self as jobs_bench, JobsSpec},
    lb::{self as bench, BenchSpec},
    overload::{self as overload_bench, OverloadSpec},
    scale::{self as scale_bench, ScaleSpec},
};

use crate::cli::{BenchGrpcArgs, BenchJobsArgs, BenchLbArgs, BenchOverloadArgs, BenchScaleArgs};

pub async fn lb(args: BenchLbArgs) -> anyhow::Result<()> {
    let config = bench_config(&args.config, &[]);
    let spec = BenchSpec {
        config,
        variants: args.variants,
        cases: args.cases,
        backends: args.backends,
        concurrency: args.concurrency,
        rps: args.rps,
        max_in_flight: args.max_in_flight,
        slow_latency: args.slow_latency,
        duration: args.duration,
        warmup: args.warmup,
        rounds: args.rounds,
        path: args.path,
    };
    let result = bench::run(&spec, |line| eprintln!("{line}")).await?;
    println!();
    print!("{}", bench::tables(&result));
    write_json(args.json.as_deref(), &result)
}

pub async fn grpc(args: BenchGrpcArgs) -> anyhow::Result<()> {
    let config = bench_config(&args.config, &[]);
    let spec = GrpcBenchSpec {
        config,
        concurrency: args.concurrency,
        connections: args.connections,
        duration: args.duration,
        warmup: args.warmup,
        rounds: args.rounds,
        id_max: args.id_max,
        cache_capacity: args.cache_capacity,
        timeout: args.timeout,
    };
    let results = grpc_bench::run(&spec, |line| eprintln!("{line}")).await?;
    println!(
        "\nGetItem straight at each server; mode {}; closed loop, concurrency {} over {} \
         connection(s); ids 1..={}; {} × {:?} per server, medians:\n",
        super::json_str(&spec.config.mode),
        spec.concurrency,
        spec.connections,
        spec.id_max,
        spec.rounds,
        spec.duration
    );
    print!("{}", grpc_bench::table(&results));
    write_json(args.json.as_deref(), &results)
}

pub async fn overload(args: BenchOverloadArgs) -> anyhow::Result<()> {
    // No job inflow reaches these stacks; the worker only polls.
    let mut presets = Vec::new();
    for mode in &args.presets {
        let name = super::json_str(mode);
        let config = bench_config(&args.config, &[&format!("mode={name}")]);
        // `--mode` or `--set mode=…` would win over the preset and label
        // one preset's figures with another's name.
        if config.mode != *mode {
            anyhow::bail!(
                "--presets {name} runs mode {name}; drop --mode / --set mode=… (the presets \
                 are chosen with --presets)"
            );
        }
        presets.push((name, config));
    }
    let spec = OverloadSpec {
        presets,
        multiple: args.multiple,
        concurrency: args.concurrency,
        warmup: args.warmup,
        capacity_duration: args.capacity_duration,
        baseline_duration: args.baseline_duration,
        duration: args.duration,
        recovery: args.recovery,
        max_in_flight: args.max_in_flight,
        timeout: args.timeout,
        pin: !args.no_pin,
        path: args.path,
    };
    let results = overload_bench::run(&spec, |line| eprintln!("{line}")).await?;
    println!(
        "\nopen loop at {}× the {} stack's capacity for {:?} through A's HTTP port, then half \
         its capacity for {:?}{}; req/s, the generator's latency:\n",
        spec.multiple,
        spec.presets[0].0,
        spec.duration,
        spec.recovery,
        if spec.pin {
            "; stack on one CPU, generator on the others"
        } else {
            "; stack and generator share every CPU"
        }
    );
    print!("{}", overload_bench::table(&results));
    write_json(args.json.as_deref(), &results)
}

/// The config of a benchmark's stack: `defaults` first, then the user's
/// file, environment and flags (which win), with quiet services (the
/// benchmark measures, it does not debug).
fn bench_config(args: &config::ConfigArgs, defaults: &[&str]) -> config::LabConfig {
    let mut sources = config::Sources::from_args(args);
    sources
        .overrides
        .splice(0..0, defaults.iter().map(|d| d.to_string()));
    let mut config = config::load(&sources).unwrap_or_else(|e| e.exit());
    config.telemetry.log_filter = "warn".into();
    config
}

pub async fn scale(args: BenchScaleArgs) -> anyhow::Result<()> {
    // labctl::bench::scale's module doc says why each of these.
    let config = bench_config(
        &args.config,
        &[
            "mode=fixed",
            "worker.enabled=false",
            "service_b.drain_period=0s",
        ],
    );
    let spec = ScaleSpec {
        config,
        backends: args.backends,
        registry_keys: args.registry_keys,
        churn_rate: args.churn_rate,
        rps: args.rps,
        concurrency: args.concurrency,
        duration: args.duration,
        warmup: args.warmup,
        rounds: args.rounds,
        path: args.path,
    };
    let results = scale_bench::run(&spec, |line| eprintln!("{line}")).await?;
    println!(
        "\nlb=etcd, open loop at {} req/s through A's HTTP port, {} × {:?} per case, medians:\n",
        spec.rps, spec.rounds, spec.duration
    );
    print!("{}", scale_bench::table(&results));
    if results.iter().any(|r| !r.sustained) {
        println!(
            "\n(short): a round of this case achieved under 95 % of {} req/s; its CPU per \
             request is not comparable — lower --rps.",
            spec.rps
        );
    }
    write_json(args.json.as_deref(), &results)
}

pub async fn jobs(args: BenchJobsArgs) -> anyhow::Result<()> {
    let config = bench_config(&args.config, &["mode=fixed", "worker.enabled=false"]);
    let spec = JobsSpec {
        config,
        sizes: args.sizes,
        backlogs: args.backlogs,
        claims: args.claims,
        claim_time: args.claim_time,
    };
    let results = jobs_bench::run(&spec, |line| eprintln!("{line}")).await?;
    println!(
        "\nB's claim of worker.pool_size = {} jobs, timed at labctl (B's own Db::claim), medians \
         and p99 over the claims:\n",
        spec.config.worker.pool_size
    );
    print!("{}", jobs_bench::table(&results));
    print!("{}", jobs_bench::explains(&results));
    write_json(args.json.as_deref(), &results)
}

fn write_json(
    path: Option<&std::path::Path>,
    results: &impl serde::Serialize,
) -> anyhow::Result<()> {
    if let Some(path) = path {
        std::fs::write(path, serde_json::to_vec_pretty(results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
