use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use lab_common::config::{ConfigArgs, load_or_exit};

// jemalloc, with its heap profiler ready (GET /debug/pprof/heap).
lab_common::jemalloc_with_heap_profiling!();

/// partner-api: the HTTPS partner service B calls once per job (docs/architecture.md; the README's "Cause 4" tells its story).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(flatten)]
    config: ConfigArgs,
    #[command(subcommand)]
    command: Option<Cmd>,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Make the lab CA and the partner's certificate in DIR (kept if they
    /// exist) and print their paths: ca.pem, partner.pem, partner.key.
    Certs {
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Host name or IP the certificate is valid for (repeatable).
        #[arg(long = "host", value_name = "HOST", required = true)]
        hosts: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Cmd::Certs { dir, hosts }) => {
            let hosts: Vec<&str> = hosts.iter().map(String::as_str).collect();
            match partner_api::certs::ensure(&dir, &hosts) {
                Ok(files) => {
                    println!("ca_cert {}", files.ca_cert.display());
                    println!("cert    {}", files.cert.display());
                    println!("key     {}", files.key.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        None => {
            let config = load_or_exit(&cli.config);
            lab_common::shutdown::run_service("partner-api", config, partner_api::run).await
        }
    }
}
