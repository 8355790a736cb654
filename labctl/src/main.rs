//! `labctl`: run the lab natively, drive load at it, check config files.
//! The command line is listed in the README, "labctl".

use std::{io::IsTerminal, path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use lab_common::config::{self, ConfigArgs, LabConfig};
use labctl::{
    launcher::{self, Stack, UpOptions},
    load::{self, LoadSpec},
    ports::PortPolicy,
    procs::Lifetime,
    state::LabState,
};

#[derive(Debug, Parser)]
#[command(version, about = "Run and load-test the gRPC incident lab natively")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Start MySQL/MariaDB, etcd, partner-api, HAProxy, N× service-b and service-a on loopback.
    Up(UpArgs),
    /// Show what is running (`--json` for scripts).
    Status {
        #[command(flatten)]
        dir: StateDir,
        #[arg(long)]
        json: bool,
    },
    /// Stop everything `up` started.
    Down {
        #[command(flatten)]
        dir: StateDir,
    },
    /// Send HTTP load and report latency percentiles, errors and backends.
    Load(LoadArgs),
    /// Insert jobs into the running stack's MySQL at a steady rate.
    Jobs(JobsArgs),
    /// Send a signal to one process of the running stack (watch failover).
    Kill {
        /// Process name from `labctl status`, e.g. service-b-2.
        name: String,
        /// TERM (graceful), KILL (crash), STOP (freeze) or CONT (thaw).
        #[arg(long, default_value = "TERM", value_parser = parse_signal)]
        signal: nix::sys::signal::Signal,
        #[command(flatten)]
        dir: StateDir,
    },
    /// Compare configurations under identical load (fresh stacks, one run).
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
    /// Change the number of running instances (watch scale-out live).
    Scale {
        #[command(subcommand)]
        what: ScaleCmd,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
}

#[derive(Debug, Args)]
struct JobsArgs {
    #[command(flatten)]
    dir: StateDir,
    /// Jobs per second. The defaults are the incident's inflow: the buggy
    /// preset falls over under it, the fixed one keeps up.
    #[arg(long, default_value_t = 12.0)]
    rate: f64,
    /// How long to produce.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Fraction of rows whose payload cannot be decoded (0–1), spread
    /// evenly: 0.001 makes every 1 000th row poison.
    #[arg(long, default_value_t = 0.001)]
    poison_ratio: f64,
    /// Size of each good payload (the handler's CPU work scales with it:
    /// `worker.cpu_per_kib` per KiB).
    #[arg(long, default_value_t = 16384)]
    payload_bytes: usize,
    #[arg(long, default_value_t = 1)]
    seed: u64,
}

#[derive(Debug, Subcommand)]
enum BenchCmd {
    /// Throughput and p50/p99 through A for each `faults.lb` value.
    Lb(BenchLbArgs),
}

#[derive(Debug, Args)]
struct BenchLbArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Which lb values, in order.
    #[arg(long, value_delimiter = ',', default_value = "l4,l7,etcd")]
    lbs: Vec<String>,
    #[arg(long, default_value_t = 2)]
    backends: usize,
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Measured time per mode and round.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Unmeasured load before each measurement.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Rounds (modes interleave within a round); medians are reported.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    #[arg(long, default_value = "/api/items/{rand}")]
    path: String,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
enum ScaleCmd {
    /// Run N service-b instances.
    Backends {
        n: usize,
        #[command(flatten)]
        dir: StateDir,
    },
}

fn parse_signal(s: &str) -> Result<nix::sys::signal::Signal, String> {
    use nix::sys::signal::Signal;
    match s.trim_start_matches("SIG").to_ascii_uppercase().as_str() {
        "TERM" => Ok(Signal::SIGTERM),
        "KILL" => Ok(Signal::SIGKILL),
        "INT" => Ok(Signal::SIGINT),
        "STOP" => Ok(Signal::SIGSTOP),
        "CONT" => Ok(Signal::SIGCONT),
        other => Err(format!(
            "unknown signal {other:?}: expected TERM, KILL, INT, STOP or CONT"
        )),
    }
}

#[derive(Debug, Subcommand)]
enum ConfigCmd {
    /// Validate a config file the way every service does (exit 2 if invalid).
    Check { file: PathBuf },
}

#[derive(Debug, Args)]
struct StateDir {
    /// Where the stack keeps its state, data and logs.
    #[arg(long, default_value = ".lab")]
    state_dir: PathBuf,
}

#[derive(Debug, Args)]
struct UpArgs {
    #[command(flatten)]
    config: ConfigArgs,
    /// Number of service-b instances.
    #[arg(long, default_value_t = 2)]
    backends: usize,
    /// `auto` picks free loopback ports (find them with `status --json`).
    #[arg(long, default_value = "config", value_parser = parse_ports)]
    ports: PortPolicy,
    #[command(flatten)]
    dir: StateDir,
    /// Leave the stack running and return (stop it with `labctl down`).
    #[arg(long)]
    detach: bool,
}

fn parse_ports(s: &str) -> Result<PortPolicy, String> {
    s.parse()
}

#[derive(Debug, Args)]
struct LoadArgs {
    /// Base URL of service A, e.g. http://127.0.0.1:8080.
    #[arg(long)]
    url: String,
    /// Path to request; `{rand}` becomes a random item id.
    #[arg(long, default_value = "/api/items/{rand}")]
    path: String,
    /// Number of requests to send.
    #[arg(long, required_unless_present = "duration")]
    requests: Option<u64>,
    /// How long to send for, e.g. 30s.
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Concurrent connections (closed loop: requests in flight).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// Open loop at this rate (latency counted from the intended send time).
    #[arg(long)]
    rps: Option<f64>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Largest item id for `{rand}`.
    #[arg(long, default_value_t = 10_000)]
    id_max: u64,
    /// Seed for `{rand}`.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Per-request timeout.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber_init();
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Up(args) => up(args).await,
        Cmd::Status { dir, json } => status(&dir.state_dir, json),
        Cmd::Down { dir } => down(&dir.state_dir).await,
        Cmd::Load(args) => load_cmd(args).await,
        Cmd::Jobs(args) => jobs(args).await,
        Cmd::Kill { name, signal, dir } => Stack::attach(&dir.state_dir).and_then(|stack| {
            stack.signal(&name, signal)?;
            let pid = stack.service(&name)?.pid;
            println!("sent {signal} to {name} (pid {pid})");
            Ok(())
        }),
        Cmd::Scale {
            what: ScaleCmd::Backends { n, dir },
        } => scale(&dir.state_dir, n).await,
        Cmd::Bench {
            what: BenchCmd::Lb(args),
        } => bench_lb(args).await,
        Cmd::Config {
            command: ConfigCmd::Check { file },
        } => match config::check_file(&file) {
            Ok(c) => {
                println!(
                    "{}: ok (mode {}, faults {})",
                    file.display(),
                    json_str(&c.mode),
                    serde_json::to_string(&c.faults).unwrap_or_default()
                );
                Ok(())
            }
            Err(e) => e.exit(),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn tracing_subscriber_init() {
    lab_common::telemetry::init(
        "labctl",
        &config::TelemetryConfig {
            log_format: config::LogFormat::Text,
            log_filter: "warn".into(),
        },
    );
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let config: LabConfig = config::load_or_exit(&args.config);
    let mut options = UpOptions::new(config, &args.dir.state_dir);
    options.backends = args.backends;
    options.ports = args.ports;
    options.lifetime = if args.detach {
        Lifetime::Detached
    } else {
        Lifetime::TiedToLabctl
    };
    eprintln!("starting the lab in {} …", args.dir.state_dir.display());
    let mut stack = Stack::up(options).await?;
    print_table(&stack);
    if args.detach {
        println!(
            "\nrunning in the background; stop it with: labctl down --state-dir {}",
            args.dir.state_dir.display()
        );
        stack.detach();
        return Ok(());
    }
    println!("\nCtrl-C stops everything.");
    wait_for_stop(&mut stack).await?;
    eprintln!("stopping …");
    stack.down().await?;
    eprintln!("stopped.");
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM, reporting any process that dies meanwhile.
async fn wait_for_stop(stack: &mut Stack) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut reported = std::collections::BTreeSet::new();
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            _ = tokio::time::sleep(Duration::from_secs(1)) => {
                stack.reap();
                for s in &stack.state.services {
                    if !s.is_alive() && reported.insert(s.name.clone()) {
                        eprintln!("warning: {} (pid {}) exited; see {}", s.name, s.pid, s.log.display());
                    }
                }
            }
        }
    }
}

fn print_table(stack: &Stack) {
    let f = &stack.state.faults;
    println!(
        "lab is up in {:.1} s — mode {}; lb={} worker={} deadline={} http_client={} rows={}",
        stack.startup.as_secs_f64(),
        json_str(&stack.state.mode),
        json_str(&f.lb),
        json_str(&f.worker),
        json_str(&f.deadline),
        json_str(&f.http_client),
        json_str(&f.rows),
    );
    println!();
    println!(
        "{:<14} {:>7}  {:<34} {:<24} LOG",
        "NAME", "PID", "ADDRESS", "ADMIN"
    );
    for s in &stack.state.services {
        let address = s
            .url
            .clone()
            .or_else(|| s.grpc_addr.clone().map(|a| format!("grpc://{a}")))
            .unwrap_or_default();
        let address = match (&s.l4_addr, &s.l7_addr) {
            (Some(l4), Some(l7)) => format!("l4 {l4}  l7 {l7}"),
            _ => address,
        };
        println!(
            "{:<14} {:>7}  {:<38} {:<24} {}",
            s.name,
            s.pid,
            address,
            s.admin_url.clone().unwrap_or_else(|| "-".into()),
            s.log.display()
        );
    }
    println!(
        "\ntry: labctl load --url {} --path '/api/items/{{rand}}' --requests 1000 --concurrency 16",
        stack.a_url()
    );
}

fn json_str<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

fn status(state_dir: &std::path::Path, json: bool) -> anyhow::Result<()> {
    let mut state = LabState::load(state_dir)?.with_context(|| {
        format!(
            "no lab state in {} (start one with `labctl up`)",
            state_dir.display()
        )
    })?;
    for s in &mut state.services {
        s.running = Some(s.is_alive());
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&state)?);
        return Ok(());
    }
    println!(
        "mode {}; faults {}",
        json_str(&state.mode),
        serde_json::to_string(&state.faults)?
    );
    println!("{:<14} {:>7}  {:<8} ADDRESS", "NAME", "PID", "STATE");
    for s in &state.services {
        let address = s
            .url
            .clone()
            .or_else(|| s.grpc_addr.clone())
            .unwrap_or_default();
        println!(
            "{:<14} {:>7}  {:<8} {}",
            s.name,
            s.pid,
            if s.running == Some(true) {
                "running"
            } else {
                "dead"
            },
            address
        );
    }
    Ok(())
}

async fn jobs(args: JobsArgs) -> anyhow::Result<()> {
    let stack = Stack::attach(&args.dir.state_dir)?;
    let spec = labctl::jobs::JobSpec {
        mysql_url: stack.config.mysql.url.clone(),
        rate: args.rate,
        duration: args.duration,
        poison_ratio: args.poison_ratio,
        payload_bytes: args.payload_bytes,
        seed: args.seed,
    };
    eprintln!(
        "inserting {} jobs/s for {:?} into {} …",
        spec.rate, spec.duration, spec.mysql_url
    );
    let report = labctl::jobs::produce(&spec).await?;
    println!(
        "inserted {} jobs ({} poison)",
        report.inserted, report.poison
    );
    Ok(())
}

async fn bench_lb(args: BenchLbArgs) -> anyhow::Result<()> {
    let mut config = config::load_or_exit(&args.config);
    // Quieter services: the benchmark measures, it does not debug.
    config.telemetry.log_filter = "warn".into();
    let modes = args
        .lbs
        .iter()
        .map(|name| {
            config::load(&config::Sources {
                overrides: vec![format!("faults.lb={name}")],
                ..config::Sources::default()
            })
            .map(|c| c.faults.lb)
            .unwrap_or_else(|e| e.exit())
        })
        .collect();
    let spec = labctl::bench::BenchSpec {
        config,
        modes,
        backends: args.backends,
        concurrency: args.concurrency,
        duration: args.duration,
        warmup: args.warmup,
        rounds: args.rounds,
        path: args.path,
    };
    let results = labctl::bench::run(&spec, |line| eprintln!("{line}")).await?;
    println!(
        "\n{} B, concurrency {}, {} × {:?} per mode, medians:\n",
        spec.backends, spec.concurrency, spec.rounds, spec.duration
    );
    print!("{}", labctl::bench::table(&results));
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&results)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

async fn scale(state_dir: &std::path::Path, n: usize) -> anyhow::Result<()> {
    let mut stack = Stack::attach(state_dir)?;
    let changed = stack.scale_backends(n).await?;
    if changed.is_empty() {
        println!("already {n} backends");
    } else {
        println!("now {n} backends (changed: {})", changed.join(", "));
    }
    Ok(())
}

async fn down(state_dir: &std::path::Path) -> anyhow::Result<()> {
    let stopped = launcher::down(state_dir).await?;
    if stopped.is_empty() {
        println!("nothing running in {}", state_dir.display());
    } else {
        println!("stopped {}", stopped.join(", "));
    }
    Ok(())
}

async fn load_cmd(args: LoadArgs) -> anyhow::Result<()> {
    let spec = LoadSpec {
        url: args.url,
        path: args.path,
        requests: args.requests,
        duration: args.duration,
        concurrency: args.concurrency,
        rps: args.rps,
        id_max: args.id_max,
        seed: args.seed,
        timeout: args.timeout,
    };
    let bar = std::io::stderr().is_terminal().then(|| {
        let bar = match spec.requests {
            Some(n) => indicatif::ProgressBar::new(n),
            None => indicatif::ProgressBar::new_spinner(),
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {wide_bar} {pos} requests ({per_sec})",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let report = load::run(&spec, bar.clone()).await?;
    if let Some(bar) = bar {
        bar.finish_and_clear();
    }
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    print!("{}", report.table());
    Ok(())
}
