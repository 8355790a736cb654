use std::process::ExitCode;

use clap::Parser;
use lab_common::config::{CONFIG_ERROR_EXIT_CODE, ConfigArgs, load_or_exit};

/// Service A: HTTP/JSON front and gRPC client of B. See DESIGN.md §2.
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
    // A switch value this build cannot honour is a config error, not a
    // silent fallback.
    if let Err(e) = service_a::balancer::connect(&config) {
        eprintln!("error: {e}");
        return ExitCode::from(CONFIG_ERROR_EXIT_CODE as u8);
    }
    lab_common::shutdown::run_service("service-a", config, service_a::run).await
}
