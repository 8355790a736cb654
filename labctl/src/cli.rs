//! The command line: every subcommand, flag and help text of `labctl` (the
//! "labctl" section of docs/architecture.md lists them). Parsing only; `commands` does the
//! work.

use std::{path::PathBuf, time::Duration};

use clap::{Args, Parser, Subcommand};
use lab_common::config::ConfigArgs;
use labctl::{
    bench::lb::{Case, Variant},
    faults::{Assignment, AssignmentError},
    ports::PortPolicy,
};
use nix::sys::signal::Signal;

#[derive(Debug, Parser)]
#[command(version, about = "Run and load-test the gRPC incident lab natively")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Start MySQL/MariaDB, etcd, partner-api, HAProxy, N× service-b and service-a on loopback.
    Up(UpArgs),
    /// Show what is running (`--json` for scripts).
    Status(StatusArgs),
    /// Stop everything `up` started.
    Down(DownArgs),
    /// Send HTTP load at A or gRPC load at B, closed or open loop; report
    /// latency percentiles, errors, drops and backends.
    Load(LoadArgs),
    /// Insert jobs into the running stack's MySQL at a steady rate.
    Jobs(JobsArgs),
    /// Send a signal to one process of the running stack (watch failover).
    Kill(KillArgs),
    /// Show the fault switches of every running process, as in force now;
    /// `faults set KEY=VALUE...` flips them live.
    Faults(FaultsArgs),
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
    /// Play a story (the incident, one cause, the remedies) on a stack and
    /// write a report with charts and verdicts.
    Scenario {
        #[command(subcommand)]
        what: ScenarioCmd,
    },
    /// Configuration helpers.
    Config {
        #[command(subcommand)]
        command: ConfigCmd,
    },
    /// Incident drills: a lab with hidden, randomly drawn causes for a
    /// trainee to diagnose from its signals; answers scored against a
    /// sealed key.
    Drill {
        #[command(subcommand)]
        what: DrillCmd,
    },
}

#[derive(Debug, Subcommand)]
pub enum DrillCmd {
    /// Start a drill (facilitator): a detached lab whose switches are drawn
    /// from the seed and hidden, with steady load and job inflow. Prints the
    /// drill token once (keep it: it scores and reveals) and the trainee's
    /// brief (also in <state-dir>/drill/brief.txt).
    Start(DrillStartArgs),
    /// Score answers against the sealed key, e.g. `lb=l4 worker=bounded`;
    /// every answer is logged with its time. Needs the drill token.
    Answer(DrillAnswerArgs),
    /// Print the drill's causes (facilitator). Needs the drill token.
    Reveal(DrillTokenArgs),
    /// Stop the drill's lab; with the drill token, also print the final
    /// score and the causes.
    Stop(DrillStopArgs),
}

#[derive(Debug, Args)]
pub struct DrillStartArgs {
    /// The lab's config (ports, time constants). Its switches do not count:
    /// the drill draws them.
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Seed of the draw: the same seed and --causes give the same causes
    /// [default: random].
    #[arg(long)]
    pub seed: Option<u64>,
    /// How many causes are in their buggy form: `all`, a number 0..=5, or
    /// `random` (each switch independently, even odds).
    #[arg(long, default_value = "random")]
    pub causes: labctl::drill::CauseCount,
    /// Number of service-b instances.
    #[arg(long, default_value_t = 2)]
    pub backends: usize,
    /// `auto` picks free loopback ports.
    #[arg(long, default_value = "config", value_parser = parse_ports)]
    pub ports: PortPolicy,
    #[command(flatten)]
    pub dir: StateDir,
    /// Also write the drill token to this file (mode 0600; not inside the
    /// state dir, which the trainee may read).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Start no load and no job inflow (bring your own).
    #[arg(long)]
    pub no_traffic: bool,
    /// The steady load's rate at A (open loop).
    #[arg(long, default_value_t = 50.0)]
    pub rps: f64,
    /// Jobs per second inserted into MySQL.
    #[arg(long, default_value_t = 12.0)]
    pub job_rate: f64,
}

/// Where the drill token comes from.
#[derive(Debug, Args)]
pub struct DrillToken {
    /// A file holding the drill token (as written by `start --token-file`);
    /// or set LABCTL_DRILL_TOKEN.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct DrillTokenArgs {
    #[command(flatten)]
    pub token: DrillToken,
    #[command(flatten)]
    pub dir: StateDir,
}

#[derive(Debug, Args)]
pub struct DrillAnswerArgs {
    /// SWITCH=VALUE for each cause diagnosed, e.g. `lb=l4 worker=bounded`.
    pub answers: Vec<String>,
    /// Ask for each switch in turn instead.
    #[arg(long, conflicts_with = "answers")]
    pub interactive: bool,
    #[command(flatten)]
    pub token: DrillToken,
    #[command(flatten)]
    pub dir: StateDir,
}

#[derive(Debug, Args)]
pub struct DrillStopArgs {
    #[command(flatten)]
    pub token: DrillToken,
    #[command(flatten)]
    pub dir: StateDir,
}

#[derive(Debug, Args)]
pub struct StateDir {
    /// Where the stack keeps its state, data and logs.
    #[arg(long, default_value = ".lab")]
    pub state_dir: PathBuf,
}

#[derive(Debug, Args)]
pub struct UpArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Number of service-b instances.
    #[arg(long, default_value_t = 2)]
    pub backends: usize,
    /// `auto` picks free loopback ports (find them with `status --json`).
    #[arg(long, default_value = "config", value_parser = parse_ports)]
    pub ports: PortPolicy,
    #[command(flatten)]
    pub dir: StateDir,
    /// Leave the stack running and return (stop it with `labctl down`).
    #[arg(long)]
    pub detach: bool,
}

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub dir: StateDir,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct DownArgs {
    #[command(flatten)]
    pub dir: StateDir,
}

/// What `labctl load --help` says each figure of the report measures.
const LOAD_FIGURES: &str = "\
Loops:
  closed (no --rps)  --concurrency workers; each sends its next request when the previous
                     one finished (as wrk does). Latency runs from the send.
  open (--rps R)     request k is due at start + k/R and starts then, whether or not
                     earlier ones answered. Requests in flight (HTTP: connections) grow on
                     demand up to --max-in-flight; --concurrency of them are opened before
                     the clock starts. Latency runs from when the request was due, so time
                     spent behind a stalled server counts (no coordinated omission).

The report (table, and --json FILE):
  requests    requests sent that finished: answered, failed or timed out
  ok          2xx answers (gRPC: status OK)
  dropped     open loop: requests due while --max-in-flight were in flight; never sent,
              not in requests, not in the latencies (json: dropped)
  rate        finished requests per second over the whole run, drain included; open loop
              also shows the rate sent (requests not dropped per second up to the last
              due time) and the target (json: rps, sent_rps, target_rps)
  latency     p50 p90 p99 p99.9 max in ms, from an HDR histogram (3 significant digits);
              closed loop from the send, open loop from the due time (json: latency_ms)
  lag         open loop: how late the generator itself started requests after they were
              due, p50 p99 max in ms; tenths of a millisecond is the clock's own wake-up,
              more means the generator fell behind (json: dispatch_lag_ms)
  in flight   open loop: the most requests in flight at once (json: peak_in_flight)
  errors      HTTP: non-2xx statuses by code. gRPC: the status code's name (unavailable,
              deadline_exceeded, ...) when B answered. Both: timeout (--timeout ran out),
              connect and transport (no answer); etcd://: no_endpoint (no B registered)
  served by   answers per backend: A's x-served-by header (HTTP), the reply's served_by
              (gRPC; x-served-by metadata on errors) (json: by_backend)
  (json only) first_error_s, last_error_s: seconds from the start to the first and last
              failed request";

#[derive(Debug, Args)]
#[command(after_long_help = LOAD_FIGURES)]
#[command(group(clap::ArgGroup::new("target").required(true).args(["url", "grpc"])))]
pub struct LoadArgs {
    /// What to load: http://HOST:PORT (A's HTTP front), grpc://HOST:PORT (one B) or
    /// etcd://HOST:PORT/PREFIX (every B registered under PREFIX, read as grpc-go reads
    /// etcd:///PREFIX, e.g. etcd://127.0.0.1:2379/lab/services/backend, balanced per
    /// request by A's own balancer; add
    /// ?balance_load=peak-ewma to weigh requests in flight by each B's latency).
    #[arg(long)]
    pub url: Option<String>,
    /// Shorthand for --url grpc://HOST:PORT.
    #[arg(long, value_name = "HOST:PORT", conflicts_with = "url")]
    pub grpc: Option<String>,
    /// HTTP: path to request; `{rand}` becomes a random item id
    /// [default: /api/items/{rand}].
    #[arg(long)]
    pub path: Option<String>,
    /// gRPC: the method, with ids from 1..=--id-max (SubmitJob sends a small fixed
    /// payload) [default: lab.v1.Backend/GetItem; also GetJob, SubmitJob].
    #[arg(long)]
    pub method: Option<String>,
    /// Number of requests to send (open loop: due, whether sent or dropped).
    #[arg(long, required_unless_present = "duration")]
    pub requests: Option<u64>,
    /// How long to send for, e.g. 30s.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Closed loop: requests in flight (HTTP: one connection each). Open loop:
    /// workers (HTTP: connections) opened before the clock starts.
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Open loop at this many requests per second (latency from the due time).
    #[arg(long)]
    pub rps: Option<f64>,
    /// Open loop: requests in flight at most; a request due past it is dropped.
    /// The default lets 1 000 req/s ride out a 1 s stall, measured rather than
    /// dropped, with a connection (a descriptor) per HTTP request in flight.
    #[arg(long, default_value_t = labctl::load::DEFAULT_MAX_IN_FLIGHT)]
    pub max_in_flight: usize,
    /// gRPC straight at B: HTTP/2 connections, taken in turn per request
    /// [default: 1, as ghz].
    #[arg(long)]
    pub connections: Option<usize>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Largest item id for `{rand}` and gRPC ids.
    #[arg(long, default_value_t = 10_000)]
    pub id_max: u64,
    /// Seed for the ids.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Per-request timeout (gRPC: also sent as the call's deadline).
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, Args)]
pub struct JobsArgs {
    #[command(flatten)]
    pub dir: StateDir,
    /// The database to feed, instead of the native lab's in the state dir:
    /// e.g. a compose lab's, `mysql://lab:lab@127.0.0.1:3306/lab`.
    #[arg(long, value_name = "URL")]
    pub mysql_url: Option<String>,
    /// Jobs per second. The defaults are the incident's inflow: the buggy
    /// preset falls over under it, the fixed one keeps up.
    #[arg(long, default_value_t = 12.0)]
    pub rate: f64,
    /// How long to produce.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Fraction of rows whose payload cannot be decoded (0–1), spread
    /// evenly: 0.001 makes every 1 000th row poison.
    #[arg(long, default_value_t = 0.001)]
    pub poison_ratio: f64,
    /// Size of each good payload (the handler's CPU work scales with it:
    /// `worker.cpu_per_kib` per KiB).
    #[arg(long, default_value_t = 16384)]
    pub payload_bytes: usize,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

#[derive(Debug, Args)]
pub struct KillArgs {
    /// Process name from `labctl status`, e.g. service-b-2.
    pub name: String,
    /// TERM (graceful), KILL (crash), STOP (freeze) or CONT (thaw).
    #[arg(long, default_value = "TERM", value_parser = parse_signal)]
    pub signal: Signal,
    #[command(flatten)]
    pub dir: StateDir,
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct FaultsArgs {
    #[command(subcommand)]
    pub command: Option<FaultsCmd>,
    #[command(flatten)]
    pub dir: StateDir,
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum FaultsCmd {
    /// Flip switches live on every process that owns them: lb on
    /// service-a; deadline on service-a and every B; worker, http_client
    /// and rows on every B.
    Set(FaultsSetArgs),
}

#[derive(Debug, Args)]
pub struct FaultsSetArgs {
    /// e.g. `worker=bounded lb=etcd` (or `faults.worker=bounded`).
    #[arg(required = true, value_name = "KEY=VALUE", value_parser = parse_assignment)]
    pub assignments: Vec<Assignment>,
    #[command(flatten)]
    pub dir: StateDir,
}

#[derive(Debug, Subcommand)]
pub enum BenchCmd {
    /// The lb remedies in the cases that show what each is for: identical
    /// Bs (closed loop), one slow B and one B killed halfway (open loop);
    /// latency, errors and CPU per request of A+HAProxy and of the Bs.
    Lb(BenchLbArgs),
    /// B's GetItem (item cache on, and off) against a bare tonic echo,
    /// gRPC straight at each server, in one run.
    Grpc(BenchGrpcArgs),
    /// The bare tonic echo `bench grpc` compares B with (started by it).
    #[command(hide = true)]
    GrpcEcho(BenchGrpcEchoArgs),
    /// A's CPU per request, latency and memory as the Bs in etcd grow
    /// (2, 8, 32) and as 1 000 extra keys sit in, then churn through, the
    /// registry. Open loop at a fixed rate, fresh stack per round.
    Scale(BenchScaleArgs),
    /// B's job claim as the jobs table grows: latency per claim, EXPLAIN
    /// of each of its statements and the rows they examine.
    Jobs(BenchJobsArgs),
    /// Open-loop load at 3× what the stack sustains, fixed preset then
    /// buggy: goodput, shedding, memory and recovery after the load drops.
    Overload(BenchOverloadArgs),
}

#[derive(Debug, Args)]
pub struct BenchOverloadArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Presets, in order; the first one's capacity sets the load for all.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "fixed,buggy")]
    pub presets: Vec<lab_common::config::Mode>,
    /// The overload as a multiple of the first preset's capacity.
    #[arg(long, default_value_t = 3.0)]
    pub multiple: f64,
    /// Closed-loop connections for the warm-up and the capacity.
    #[arg(long, default_value_t = 64)]
    pub concurrency: usize,
    /// Unmeasured closed-loop load first.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// How long the capacity is measured (closed loop).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub capacity_duration: Duration,
    /// Open loop at half the capacity before the overload: normal latency.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub baseline_duration: Duration,
    /// How long the overload lasts.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Open loop at half the capacity after the overload.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    pub recovery: Duration,
    /// Open loop: requests in flight at most; one due past it is dropped.
    /// High enough that callers wait on the stack, not on the generator.
    #[arg(long, default_value_t = 16384)]
    pub max_in_flight: usize,
    /// How long a caller waits before giving up (A's own deadline is 5 s):
    /// an answer later than this is no use to anyone.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Share every CPU between the stack and the generator instead of
    /// running the stack on CPU 0 and the generator on the others.
    #[arg(long)]
    pub no_pin: bool,
    #[arg(long, default_value = "/api/items/{rand}")]
    pub path: String,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchGrpcArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Calls in flight at once, per server (closed loop).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// HTTP/2 connections the calls share (ghz's default is one).
    #[arg(long, default_value_t = 1)]
    pub connections: usize,
    /// Measured time per server and round.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured load on each server before the first round (it also
    /// fills the cache).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Rounds (servers interleave within a round); medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// Item ids are drawn from 1..=N: the hot set the cached B holds.
    #[arg(long, default_value_t = 1_000)]
    pub id_max: u64,
    /// `service_b.item_cache_capacity` of the cached B.
    #[arg(long, default_value_t = 10_000)]
    pub cache_capacity: u64,
    /// Each call's deadline, sent as grpc-timeout.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchGrpcEchoArgs {
    /// Where to listen; port 0 picks a free one (printed on stdout).
    #[arg(long, default_value = "127.0.0.1:0")]
    pub listen: std::net::SocketAddr,
}

#[derive(Debug, Args)]
pub struct BenchLbArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Which variants, in order: l4, l7 (HAProxy round robin),
    /// l7-leastconn, etcd (A's P2C over requests in flight),
    /// etcd-peak-ewma (A's P2C over tower's PeakEwma).
    #[arg(
        long,
        alias = "lbs",
        value_enum,
        value_delimiter = ',',
        default_value = "l4,l7,l7-leastconn,etcd,etcd-peak-ewma"
    )]
    pub variants: Vec<Variant>,
    /// Which cases, in order: homogeneous (identical Bs, closed loop),
    /// degraded (b-1 answers --slow-latency later, open loop), killed (b-1
    /// SIGKILLed halfway through, open loop).
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "homogeneous,degraded,killed"
    )]
    pub cases: Vec<Case>,
    #[arg(long, default_value_t = 2)]
    pub backends: usize,
    /// Closed loop (homogeneous): connections, each sending its next
    /// request when the previous one is answered.
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Open loop (degraded, killed): requests per second, the same for
    /// every variant; keep it well below what the stack can serve.
    #[arg(long, default_value_t = 1000.0)]
    pub rps: f64,
    /// Open loop: requests in flight at most; a request due past it is
    /// counted as dropped.
    #[arg(long, default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Degraded: latency added to every answer of b-1
    /// (service_b.handler_latency on that instance alone).
    #[arg(long, default_value = "20ms", value_parser = humantime::parse_duration)]
    pub slow_latency: Duration,
    /// Measured time per case, variant and round.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured load (the case's own) before each measurement.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Rounds (cases and variants interleave within a round); medians are
    /// reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value = "/api/items/{rand}")]
    pub path: String,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchScaleArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Real B processes per case, ascending (the stack scales up through them).
    #[arg(long, value_delimiter = ',', default_value = "2,8,32")]
    pub backends: Vec<usize>,
    /// Extra keys registered under the B prefix at the largest --backends,
    /// each a fresh instance id at a real B's address (0: skip).
    #[arg(long, default_value_t = 1000)]
    pub registry_keys: usize,
    /// Extra keys replaced per second in the churn case (leave, delete,
    /// register a new one; 0: skip the churn case).
    #[arg(long, default_value_t = 50.0)]
    pub churn_rate: f64,
    /// Open-loop request rate at A, the same in every case; pick one every
    /// case sustains (a case short of 95 % of it is flagged).
    #[arg(long, default_value_t = 1000.0)]
    pub rps: f64,
    /// The load generator's workers (connections to A).
    #[arg(long, default_value_t = 32)]
    pub concurrency: usize,
    /// Measured time per case and round.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured load before each measurement (longer with extra keys: A
    /// connects to each endpoint on its first request).
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Rounds, each on a fresh stack; medians are reported.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    #[arg(long, default_value = "/api/items/{rand}")]
    pub path: String,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct BenchJobsArgs {
    #[command(flatten)]
    pub config: ConfigArgs,
    /// Rows in the jobs table, ascending: 10000, 10k, 1M.
    #[arg(long, value_delimiter = ',', default_value = "10k,1M", value_parser = labctl::bench::jobs::parse_count)]
    pub sizes: Vec<u64>,
    /// Pending jobs at each size: a count (a worker keeping up) or a share
    /// of the table, e.g. 10% (a worker that fell behind).
    #[arg(long, value_delimiter = ',', default_value = "100,10%")]
    pub backlogs: Vec<labctl::bench::jobs::Backlog>,
    /// Claims timed per size and backlog…
    #[arg(long, default_value_t = 200)]
    pub claims: usize,
    /// …or fewer if they take longer than this (below
    /// worker.visibility_timeout, so the live claims stay live).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub claim_time: Duration,
    /// Also write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum ScaleCmd {
    /// Run N service-b instances.
    Backends(ScaleBackendsArgs),
}

#[derive(Debug, Args)]
pub struct ScaleBackendsArgs {
    pub n: usize,
    #[command(flatten)]
    pub dir: StateDir,
}

#[derive(Debug, Subcommand)]
pub enum ScenarioCmd {
    /// The built-in scenarios (deploy/scenarios/*.toml).
    List,
    /// Run one: start a stack on free ports (or --attach), play the phases,
    /// write report.html, report.md and samples.json. Exits 0 only when
    /// every verdict holds.
    Run(ScenarioRunArgs),
}

#[derive(Debug, Args)]
pub struct ScenarioRunArgs {
    /// A built-in scenario (`labctl scenario list`) or the path of a
    /// scenario file.
    pub name: String,
    /// Where the report goes [default: <state-dir>/scenarios/<name>-<time>].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Play faster: every duration in the scenario is divided by F (rates
    /// stay). Symptoms that need time to grow may not show at high speeds.
    #[arg(long, default_value_t = 1.0)]
    pub speed: f64,
    /// Config for the stack the scenario starts, after the scenario's own
    /// `set` (repeatable), e.g. --set worker.pool_size=4.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Play on the stack already running in --state-dir (left running, with
    /// the switches the scenario leaves) instead of starting one.
    #[arg(long)]
    pub attach: bool,
    #[command(flatten)]
    pub dir: StateDir,
}

#[derive(Debug, Subcommand)]
pub enum ConfigCmd {
    /// Validate a config file the way every service does (exit 2 if invalid).
    Check { file: PathBuf },
}

/// A signal `labctl kill` can send.
#[derive(Debug, thiserror::Error)]
#[error("unknown signal {0:?}: expected TERM, KILL, INT, STOP or CONT")]
pub struct UnknownSignal(String);

fn parse_signal(s: &str) -> Result<Signal, UnknownSignal> {
    match s.trim_start_matches("SIG").to_ascii_uppercase().as_str() {
        "TERM" => Ok(Signal::SIGTERM),
        "KILL" => Ok(Signal::SIGKILL),
        "INT" => Ok(Signal::SIGINT),
        "STOP" => Ok(Signal::SIGSTOP),
        "CONT" => Ok(Signal::SIGCONT),
        other => Err(UnknownSignal(other.to_string())),
    }
}

fn parse_assignment(s: &str) -> Result<Assignment, AssignmentError> {
    s.parse()
}

fn parse_ports(s: &str) -> Result<PortPolicy, labctl::ports::InvalidPortPolicy> {
    s.parse()
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn signals_parse_with_or_without_the_sig_prefix() {
        assert_eq!(parse_signal("SIGKILL").ok(), Some(Signal::SIGKILL));
        assert_eq!(parse_signal("stop").ok(), Some(Signal::SIGSTOP));
        let err = parse_signal("HUP").map(|_| ()).expect_err("not offered");
        assert!(err.to_string().contains("expected TERM, KILL"), "{err}");
    }

    #[test]
    fn faults_shows_or_sets_with_the_state_dir_after_either() {
        let cli = Cli::try_parse_from(["labctl", "faults", "--state-dir", "/s", "--json"])
            .expect("parses");
        let Cmd::Faults(args) = cli.command else {
            panic!("not faults: {cli:?}")
        };
        assert!(args.command.is_none() && args.json);
        assert_eq!(args.dir.state_dir, PathBuf::from("/s"));

        let cli = Cli::try_parse_from([
            "labctl",
            "faults",
            "set",
            "worker=bounded",
            "faults.lb=etcd",
            "--state-dir",
            "/s",
        ])
        .expect("parses");
        let Cmd::Faults(FaultsArgs {
            command: Some(FaultsCmd::Set(set)),
            ..
        }) = cli.command
        else {
            panic!("not faults set: {cli:?}")
        };
        assert_eq!(set.dir.state_dir, PathBuf::from("/s"));
        let written: Vec<String> = set
            .assignments
            .iter()
            .map(|a| format!("{}={}", a.switch, a.value))
            .collect();
        assert_eq!(written, ["worker=bounded", "lb=etcd"]);
    }

    #[test]
    fn faults_set_refuses_bad_input_as_a_usage_error() {
        for args in [
            vec!["labctl", "faults", "set"],
            vec!["labctl", "faults", "set", "lb=l5"],
            vec!["labctl", "faults", "set", "speed=fast"],
            vec!["labctl", "faults", "set", "worker"],
        ] {
            let err = Cli::try_parse_from(&args).expect_err("refused");
            assert_eq!(err.exit_code(), 2, "{args:?}: {err}");
        }
        let err = Cli::try_parse_from(["labctl", "faults", "set", "lb=l5"]).expect_err("refused");
        assert!(
            err.to_string().contains("expected one of l4, l7, etcd"),
            "{err}"
        );
    }
}
