use std::process::ExitCode;

use clap::Parser;
use lab_common::config::{ConfigArgs, ConfigError, Origin, load_or_exit};

// jemalloc, with its heap profiler ready (GET /debug/pprof/heap).
lab_common::jemalloc_with_heap_profiling!();

/// Service B: the gRPC callee over MySQL, and partner-api's client.
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
    // B's job worker calls partner-api over TLS and trusts only this CA;
    // without it every job would fail, so refuse to start.
    if config.worker.enabled && config.partner.ca_cert.is_empty() {
        ConfigError::InvalidValue {
            key: "partner.ca_cert".into(),
            value: "\"\"".into(),
            origin: Origin::Default,
            reason: "the job worker calls partner-api over TLS: give the CA certificate \
                     (PEM) it is signed by (labctl up writes <state-dir>/tls/ca.pem), \
                     or set worker.enabled=false"
                .into(),
        }
        .exit();
    }
    lab_common::shutdown::run_service("service-b", config, service_b::run).await
}
