use std::process::ExitCode;

use clap::Parser;
use lab_common::config::{ConfigArgs, load_or_exit};

/// Service B: gRPC callee over MySQL. See DESIGN.md §2.
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
    lab_common::telemetry::init("service-b", &config.telemetry);
    let shutdown = match lab_common::shutdown::on_signal() {
        Ok(token) => token,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    match service_b::run(config, shutdown).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "service-b failed");
            ExitCode::FAILURE
        }
    }
}
