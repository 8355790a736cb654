use std::process::ExitCode;

use clap::Parser;
use lab_common::config::{ConfigArgs, load_or_exit};

// jemalloc, with its heap profiler ready (GET /debug/pprof/heap).
lab_common::jemalloc_with_heap_profiling!();

/// Service A: HTTP/JSON front and gRPC client of B. Ports and roles: docs/architecture.md, "Processes".
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = load_or_exit(&cli.config);
    lab_common::shutdown::run_service("service-a", config, service_a::run).await
}
