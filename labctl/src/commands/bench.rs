//! `labctl bench …`: `lb`, the lb remedies side by side on fresh stacks;
//! `grpc`, B's gRPC path against a bare tonic echo.

use anyhow::Context;
use lab_common::config;
use labctl::bench::{
    grpc::{self as grpc_bench, GrpcBenchSpec},
    lb::{self as bench, BenchSpec},
};

use crate::cli::{BenchGrpcArgs, BenchLbArgs};

pub async fn lb(args: BenchLbArgs) -> anyhow::Result<()> {
    let mut config = config::load_or_exit(&args.config);
    // Quieter services: the benchmark measures, it does not debug.
    config.telemetry.log_filter = "warn".into();
    let spec = BenchSpec {
        config,
        modes: args.lbs,
        backends: args.backends,
        concurrency: args.concurrency,
        duration: args.duration,
        warmup: args.warmup,
        rounds: args.rounds,
        path: args.path,
    };
    let results = bench::run(&spec, |line| eprintln!("{line}")).await?;
    println!(
        "\n{} B, concurrency {}, {} × {:?} per mode, medians:\n",
        spec.backends, spec.concurrency, spec.rounds, spec.duration
    );
    print!("{}", bench::table(&results));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

pub async fn grpc(args: BenchGrpcArgs) -> anyhow::Result<()> {
    let mut config = config::load_or_exit(&args.config);
    // Quieter services: the benchmark measures, it does not debug.
    config.telemetry.log_filter = "warn".into();
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
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
