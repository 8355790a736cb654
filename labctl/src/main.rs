//! `labctl`: run the lab natively, drive load at it, check config files.
//! The command line is listed in docs/architecture.md, "labctl"; `cli` defines it and
//! `commands` holds one module per subcommand.

mod cli;
mod commands;

use std::process::ExitCode;

use clap::{CommandFactory, Parser};
use lab_common::config::{LogFormat, TelemetryConfig};

use cli::{BenchCmd, Cli, Cmd, ConfigCmd, DrillCmd, FaultsCmd, ScaleCmd, ScenarioCmd};

/// Parses the command line (invalid input exits 2 with clap's message),
/// runs the subcommand, and exits 1 with the error chain if it fails.
#[tokio::main]
async fn main() -> ExitCode {
    let _telemetry = lab_common::telemetry::init(
        "labctl",
        &TelemetryConfig {
            log_format: LogFormat::Text,
            log_filter: "warn".into(),
            otlp_endpoint: String::new(),
        },
    );
    commands::raise_open_file_limit();
    let result = match Cli::parse().command {
        Cmd::Up(args) => commands::up::run(args).await,
        Cmd::Status(args) => commands::status::run(args).await,
        Cmd::Down(args) => commands::down::run(args).await,
        Cmd::Load(args) => commands::load::run(args).await,
        Cmd::Jobs(args) => commands::jobs::run(args).await,
        Cmd::Kill(args) => commands::kill::run(args),
        Cmd::Faults(args) => match args.command {
            None => commands::faults::show(args.dir, args.json).await,
            Some(FaultsCmd::Set(set)) => {
                // Like a malformed KEY=VALUE: a usage error, exit 2, nothing sent.
                if let Err(e) = labctl::faults::check_distinct(&set.assignments) {
                    Cli::command()
                        .error(clap::error::ErrorKind::ArgumentConflict, e)
                        .exit();
                }
                commands::faults::set(set).await
            }
        },
        Cmd::Scale {
            what: ScaleCmd::Backends(args),
        } => commands::scale::backends(args).await,
        Cmd::Bench {
            what: BenchCmd::Lb(args),
        } => commands::bench::lb(args).await,
        Cmd::Bench {
            what: BenchCmd::Grpc(args),
        } => commands::bench::grpc(args).await,
        Cmd::Bench {
            what: BenchCmd::GrpcEcho(args),
        } => labctl::bench::grpc::echo::serve(args.listen).await,
        Cmd::Bench {
            what: BenchCmd::Scale(args),
        } => commands::bench::scale(args).await,
        Cmd::Bench {
            what: BenchCmd::Jobs(args),
        } => commands::bench::jobs(args).await,
        Cmd::Bench {
            what: BenchCmd::Overload(args),
        } => commands::bench::overload(args).await,
        Cmd::Config {
            command: ConfigCmd::Check { file },
        } => commands::config::check(&file),
        Cmd::Drill { what } => match what {
            DrillCmd::Start(args) => commands::drill::start(args).await,
            DrillCmd::Answer(args) => commands::drill::answer(args),
            DrillCmd::Reveal(args) => commands::drill::reveal(args),
            DrillCmd::Stop(args) => commands::drill::stop(args).await,
        },
        Cmd::Scenario {
            what: ScenarioCmd::List,
        } => commands::scenario::list(),
        // Its own exit statuses: 2 for a file that cannot be played, 1
        // when a verdict fails.
        Cmd::Scenario {
            what: ScenarioCmd::Run(args),
        } => return commands::scenario::run(args).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
