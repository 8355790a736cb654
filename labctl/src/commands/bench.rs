//! `labctl bench lb`: the lb remedies side by side on fresh stacks.

use anyhow::Context;
use lab_common::config;
use labctl::bench::lb::{self as bench, BenchSpec};

use crate::cli::BenchLbArgs;

pub async fn lb(args: BenchLbArgs) -> anyhow::Result<()> {
    let mut config = config::load_or_exit(&args.config);
    // Quieter services: the benchmark measures, it does not debug.
    config.telemetry.log_filter = "warn".into();
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
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&result)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
