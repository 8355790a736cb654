//! Configuration shared by every lab binary, and the fault switches.
//!
//! One [`LabConfig`] describes the whole lab (every service reads the same file
//! and uses its own section), so a single `lab.toml` drives `labctl up`,
//! `docker compose up` and each process. Values are layered, later wins:
//!
//! 1. built-in defaults (the native ports in the README's "Architecture" table),
//! 2. a TOML file (`--config FILE` or `LAB_CONFIG`),
//! 3. environment variables: `LAB_` + the upper-snake key path
//!    (`faults.http_client` → `LAB_FAULTS_HTTP_CLIENT`); an empty variable
//!    counts as unset,
//! 4. command-line overrides (`--set KEY=VALUE`, `--mode`).
//!
//! Nothing is silently ignored: an unknown key, an unknown `LAB_*` variable or
//! a bad value is a [`ConfigError`] that names the key, the value, where it came
//! from and what is allowed; binaries print it and exit with status 2.

use std::{
    collections::BTreeMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Exit status for invalid configuration (README, "Configuration").
pub const CONFIG_ERROR_EXIT_CODE: i32 = 2;

/// The preset that sets every switch at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Every cause in the form the incident had.
    #[default]
    Buggy,
    /// Every cause in its fixed form.
    Fixed,
}

/// Cause 1: how service A reaches the B instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LbMode {
    /// One HTTP/2 connection through HAProxy's `mode tcp` frontend: every
    /// request rides the connection's one backend (the incident).
    L4,
    /// HAProxy's `mode http` h2 frontend balances each request (one extra hop).
    L7,
    /// B instances register in etcd; A balances per request itself.
    Etcd,
}

/// Cause 2: how service B's job worker turns MySQL rows into work.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerMode {
    /// One task per fetched row per tick, no limit (the incident).
    Unbounded,
    /// The team's counter-and-sleep patch.
    Capped,
    /// Fixed pool, backpressure, atomic row claims.
    Bounded,
}

/// Cause 3: whether B honours its caller's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeadlineMode {
    /// Work is detached from the caller; nothing is shed.
    Ignore,
    /// The deadline is honoured and forwarded; stale work is skipped.
    Propagate,
}

/// Cause 4a: how B builds its outbound HTTPS client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum HttpClientMode {
    /// A new client and TLS config per call, bodies left open (the incident).
    PerRequest,
    /// One shared, pooled client with timeouts; bodies consumed.
    Shared,
}

/// Cause 4b: what happens to a SQL result set when a row fails to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum RowsMode {
    /// The result set and its pooled connection are never released.
    LeakOnError,
    /// Released on every path; the bad row is dead-lettered.
    Close,
}

/// The effective fault switches (preset plus per-switch overrides).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    pub lb: LbMode,
    pub worker: WorkerMode,
    pub deadline: DeadlineMode,
    pub http_client: HttpClientMode,
    pub rows: RowsMode,
}

impl Faults {
    /// Every switch as the preset sets it.
    pub fn preset(mode: Mode) -> Self {
        match mode {
            Mode::Buggy => Self {
                lb: LbMode::L4,
                worker: WorkerMode::Unbounded,
                deadline: DeadlineMode::Ignore,
                http_client: HttpClientMode::PerRequest,
                rows: RowsMode::LeakOnError,
            },
            Mode::Fixed => Self {
                lb: LbMode::Etcd,
                worker: WorkerMode::Bounded,
                deadline: DeadlineMode::Propagate,
                http_client: HttpClientMode::Shared,
                rows: RowsMode::Close,
            },
        }
    }
}

/// The `[faults]` table as written: any switch set here overrides the preset.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct FaultOverrides {
    #[serde(skip_serializing_if = "Option::is_none")]
    lb: Option<LbMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    worker: Option<WorkerMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    deadline: Option<DeadlineMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    http_client: Option<HttpClientMode>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rows: Option<RowsMode>,
}

const FAULT_KEYS: [&str; 5] = ["lb", "worker", "deadline", "http_client", "rows"];

/// Service A: the HTTP/JSON front and gRPC client of B.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceAConfig {
    /// Public HTTP listener.
    pub listen: String,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`, `/faults`).
    pub admin_listen: String,
    /// HAProxy's `mode tcp` frontend, dialled when `faults.lb = "l4"`.
    pub backend_l4_url: String,
    /// HAProxy's `mode http` h2 frontend, dialled when `faults.lb = "l7"`.
    pub backend_l7_url: String,
    /// A's deadline for each call to B, sent as `grpc-timeout`.
    #[serde(with = "humantime_serde")]
    pub backend_timeout: Duration,
    /// TCP connect timeout towards B (or the proxy in front of it).
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Largest accepted request body; larger ones get 413.
    pub max_body_bytes: usize,
}

impl Default for ServiceAConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            admin_listen: "127.0.0.1:9080".into(),
            backend_l4_url: "http://127.0.0.1:50050".into(),
            backend_l7_url: "http://127.0.0.1:50060".into(),
            backend_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(1),
            max_body_bytes: 64 * 1024,
        }
    }
}

/// Service B: the gRPC server over MySQL.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServiceBConfig {
    /// gRPC listener.
    pub listen: String,
    /// Admin listener.
    pub admin_listen: String,
    /// Instance id reported as `served_by`; empty means `b-<hostname>-<port>`.
    pub instance_id: String,
    /// Address other processes should dial (registered in etcd); empty means
    /// the listen address.
    pub advertise_addr: String,
    /// Largest accepted job payload; larger ones get INVALID_ARGUMENT.
    pub max_payload_bytes: usize,
    /// Artificial latency added to every request handler (tests and demos).
    #[serde(with = "humantime_serde")]
    pub handler_latency: Duration,
    /// `deadline = "propagate"`: requests worked on at once; more are shed
    /// with RESOURCE_EXHAUSTED.
    pub max_concurrent_requests: u32,
    /// On SIGTERM B revokes its etcd lease, then keeps serving this long so
    /// clients can move away before the listener closes.
    #[serde(with = "humantime_serde")]
    pub drain_period: Duration,
    /// How long shutdown waits for in-flight requests before giving up.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// Server-side connection recycling (`0s` = off); see issue #3.
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// Grace period after `max_connection_age` before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Duration,
    /// Spread of `max_connection_age` per instance, as a fraction (0.1 = ±10%).
    pub max_connection_age_jitter: f64,
}

impl Default for ServiceBConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:50051".into(),
            admin_listen: "127.0.0.1:9081".into(),
            instance_id: String::new(),
            advertise_addr: String::new(),
            max_payload_bytes: 16 * 1024,
            handler_latency: Duration::ZERO,
            max_concurrent_requests: 64,
            drain_period: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
            max_connection_age: Duration::ZERO,
            max_connection_age_grace: Duration::from_secs(5),
            max_connection_age_jitter: 0.1,
        }
    }
}

/// Service B's job worker (cause 2) and its handler.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Run the worker at all (tests of other causes may turn it off).
    pub enabled: bool,
    /// How often the worker looks for pending rows.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// Rows fetched per tick by `unbounded` and `capped`.
    pub batch: u32,
    /// `capped`: running tasks above which a tick is skipped.
    pub cap: u32,
    /// `capped`: how long it sleeps when over the cap.
    #[serde(with = "humantime_serde")]
    pub cap_sleep: Duration,
    /// `bounded`: jobs handled at once by one B.
    pub pool_size: u32,
    /// `bounded`: a claim older than this is taken back (its B presumed dead).
    #[serde(with = "humantime_serde")]
    pub visibility_timeout: Duration,
    /// `bounded`: a job running longer than this is abandoned and retried.
    #[serde(with = "humantime_serde")]
    pub job_timeout: Duration,
    /// `bounded`: attempts before a failing job is marked failed.
    pub max_attempts: u32,
    /// CPU time the handler burns per KiB of payload.
    #[serde(with = "humantime_serde")]
    pub cpu_per_kib: Duration,
    /// `bounded`: wait before a failed attempt is retried, doubled per
    /// attempt, with ±50 % jitter.
    #[serde(with = "humantime_serde")]
    pub retry_backoff: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            tick: Duration::from_secs(1),
            batch: 100,
            cap: 200,
            cap_sleep: Duration::from_secs(3),
            pool_size: 8,
            visibility_timeout: Duration::from_secs(30),
            job_timeout: Duration::from_secs(10),
            max_attempts: 3,
            cpu_per_kib: Duration::from_millis(5),
            retry_backoff: Duration::from_secs(1),
        }
    }
}

/// The HTTPS partner API (cause 4): the server's settings, and how B's
/// client reaches and trusts it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PartnerConfig {
    /// partner-api: HTTPS listener.
    pub listen: String,
    /// partner-api: admin listener.
    pub admin_listen: String,
    /// partner-api: time before each answer.
    #[serde(with = "humantime_serde")]
    pub latency: Duration,
    /// partner-api: size of each JSON answer. Large on purpose: an answer
    /// that fits in one read would free its connection even if never read.
    pub body_bytes: usize,
    /// partner-api: how long an idle keep-alive connection stays open.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// partner-api: certificate chain (PEM) and private key (PEM).
    pub cert: String,
    pub key: String,
    /// B: the partner's base URL.
    pub url: String,
    /// B: the CA certificate (PEM) B trusts for the partner, and nothing else.
    pub ca_cert: String,
    /// B, `http_client = "shared"`: limit on one call, connect to last byte.
    #[serde(with = "humantime_serde")]
    pub client_timeout: Duration,
    /// B, `http_client = "shared"`: TCP and TLS connect limit.
    #[serde(with = "humantime_serde")]
    pub client_connect_timeout: Duration,
    /// B, `http_client = "shared"`: calls in flight, and so connections, at most.
    pub client_max_connections: u32,
    /// B, `http_client = "shared"`: larger answers are refused.
    pub client_max_body_bytes: usize,
}

impl Default for PartnerConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8443".into(),
            admin_listen: "127.0.0.1:9089".into(),
            latency: Duration::from_millis(800),
            body_bytes: 256 * 1024,
            idle_timeout: Duration::from_secs(90),
            cert: String::new(),
            key: String::new(),
            url: "https://127.0.0.1:8443".into(),
            ca_cert: String::new(),
            client_timeout: Duration::from_secs(2),
            client_connect_timeout: Duration::from_secs(1),
            client_max_connections: 8,
            client_max_body_bytes: 1024 * 1024,
        }
    }
}

/// MySQL / MariaDB.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MysqlConfig {
    /// `mysql://user:password@host:port/database`.
    pub url: String,
    /// Create the database named in `url` if it does not exist.
    pub create_database: bool,
    /// Pool size.
    pub pool_max: u32,
    /// How long a request waits for a pooled connection before failing with
    /// UNAVAILABLE (keeps a dead database from turning into hung requests).
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// Upper bound on one query (covers a database that accepts but hangs).
    #[serde(with = "humantime_serde")]
    pub query_timeout: Duration,
    /// How long B waits for the database at start before giving up.
    #[serde(with = "humantime_serde")]
    pub startup_timeout: Duration,
    /// Rows in `items` after start (ids 1..=seed_items).
    pub seed_items: u32,
}

impl Default for MysqlConfig {
    fn default() -> Self {
        Self {
            url: "mysql://lab:lab@127.0.0.1:33306/lab".into(),
            create_database: true,
            pool_max: 16,
            acquire_timeout: Duration::from_millis(500),
            query_timeout: Duration::from_secs(2),
            startup_timeout: Duration::from_secs(30),
            seed_items: 10_000,
        }
    }
}

/// etcd, the service registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client endpoints.
    pub endpoints: Vec<String>,
    /// Key prefix under which B instances register.
    pub prefix: String,
    /// Registration lease TTL.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "/lab/services/backend/".into(),
            lease_ttl: Duration::from_secs(10),
        }
    }
}

/// HAProxy, the "SLB".
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SlbConfig {
    /// `mode tcp` frontend (the L4 balancer of the incident).
    pub l4_listen: String,
    /// `mode http` h2 frontend (per-request L7 balancing).
    pub l7_listen: String,
    /// Stats page and HAProxy's own Prometheus exporter.
    pub stats_listen: String,
    /// HAProxy `maxconn`; each connection needs two file descriptors.
    pub maxconn: u32,
}

impl Default for SlbConfig {
    fn default() -> Self {
        Self {
            l4_listen: "127.0.0.1:50050".into(),
            l7_listen: "127.0.0.1:50060".into(),
            stats_listen: "127.0.0.1:8404".into(),
            maxconn: 2000,
        }
    }
}

/// Log output.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// A `tracing` filter (`RUST_LOG` wins when set).
    pub log_filter: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_filter: "info".into(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The whole lab's configuration after layering and validation.
#[derive(Debug, Clone, Serialize)]
pub struct LabConfig {
    pub mode: Mode,
    /// The switches in force: the preset of `mode` plus any `[faults]` overrides.
    pub faults: Faults,
    pub service_a: ServiceAConfig,
    pub service_b: ServiceBConfig,
    pub worker: WorkerConfig,
    pub partner: PartnerConfig,
    pub mysql: MysqlConfig,
    pub etcd: EtcdConfig,
    pub slb: SlbConfig,
    pub telemetry: TelemetryConfig,
}

impl Default for LabConfig {
    fn default() -> Self {
        RawConfig::default().resolve()
    }
}

impl LabConfig {
    /// The config as a TOML document that loads back to the same effective
    /// values (every switch written out explicitly).
    pub fn to_toml(&self) -> Result<String, toml::ser::Error> {
        toml::to_string(self)
    }
}

/// The file shape: like [`LabConfig`] but with the switches still optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawConfig {
    mode: Mode,
    faults: FaultOverrides,
    service_a: ServiceAConfig,
    service_b: ServiceBConfig,
    worker: WorkerConfig,
    partner: PartnerConfig,
    mysql: MysqlConfig,
    etcd: EtcdConfig,
    slb: SlbConfig,
    telemetry: TelemetryConfig,
}

impl RawConfig {
    fn resolve(self) -> LabConfig {
        let preset = Faults::preset(self.mode);
        let o = self.faults;
        LabConfig {
            mode: self.mode,
            faults: Faults {
                lb: o.lb.unwrap_or(preset.lb),
                worker: o.worker.unwrap_or(preset.worker),
                deadline: o.deadline.unwrap_or(preset.deadline),
                http_client: o.http_client.unwrap_or(preset.http_client),
                rows: o.rows.unwrap_or(preset.rows),
            },
            service_a: self.service_a,
            service_b: self.service_b,
            worker: self.worker,
            partner: self.partner,
            mysql: self.mysql,
            etcd: self.etcd,
            slb: self.slb,
            telemetry: self.telemetry,
        }
    }
}

/// Where a configured value came from; quoted in error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    Default,
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File(p) => write!(f, "file {}", p.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "command-line {flag}"),
        }
    }
}

/// Why a configuration was rejected. Every variant names the key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    ReadFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("unknown config key `{key}` (from {origin}); allowed keys here: {allowed}")]
    UnknownKey {
        key: String,
        origin: Origin,
        allowed: String,
    },
    #[error("malformed override `{arg}` (from {origin}): expected KEY=VALUE, e.g. faults.lb=etcd")]
    MalformedOverride { arg: String, origin: Origin },
    #[error("invalid value for `{key}`: {value} (from {origin}): {reason}")]
    InvalidValue {
        key: String,
        value: String,
        origin: Origin,
        reason: String,
    },
}

impl ConfigError {
    /// Prints the error the way every binary does and exits with status 2.
    pub fn exit(&self) -> ! {
        eprintln!("error: {self}");
        std::process::exit(CONFIG_ERROR_EXIT_CODE)
    }
}

/// The inputs to [`load`]: a file, the environment and command-line overrides.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// TOML file to read, if any.
    pub file: Option<PathBuf>,
    /// Environment variables (only `LAB_*` ones are looked at).
    pub env: Vec<(String, String)>,
    /// `KEY=VALUE` overrides from the command line, in order.
    pub overrides: Vec<String>,
}

impl Sources {
    /// File from `--config` (or `LAB_CONFIG`), the process environment, and
    /// `--set` / `--mode` flags.
    pub fn from_args(args: &ConfigArgs) -> Self {
        let mut overrides = Vec::new();
        if let Some(mode) = &args.mode {
            overrides.push(format!("mode={mode}"));
        }
        overrides.extend(args.set.iter().cloned());
        Self {
            file: args.config.clone(),
            env: std::env::vars().collect(),
            overrides,
        }
    }
}

/// Command-line flags every lab binary accepts for its configuration.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConfigArgs {
    /// TOML config file (every key optional; see deploy/lab.toml).
    #[arg(long, env = "LAB_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Preset for every fault switch: buggy | fixed (same as --set mode=...).
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    /// Override one key, e.g. --set faults.lb=etcd (repeatable; wins over
    /// file and environment).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
}

/// Loads from `args` and the environment, or prints the error and exits 2.
pub fn load_or_exit(args: &ConfigArgs) -> LabConfig {
    load(&Sources::from_args(args)).unwrap_or_else(|e| e.exit())
}

/// Environment variables that are not config keys but are still ours.
const RESERVED_ENV: [&str; 1] = ["LAB_CONFIG"];

/// The type of a leaf key, taken from its default value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Str,
    Int,
    Float,
    Bool,
    List,
}

/// Every settable key path with its kind.
fn known_keys() -> BTreeMap<String, Kind> {
    let defaults = toml::Table::try_from(RawConfig::default())
        .expect("default config serializes to a TOML table");
    let mut keys = BTreeMap::new();
    collect_leaves(&defaults, "", &mut keys);
    for k in FAULT_KEYS {
        keys.insert(format!("faults.{k}"), Kind::Str);
    }
    keys
}

fn collect_leaves(table: &toml::Table, prefix: &str, out: &mut BTreeMap<String, Kind>) {
    for (k, v) in table {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let kind = match v {
            toml::Value::Table(t) => {
                collect_leaves(t, &path, out);
                continue;
            }
            toml::Value::Integer(_) => Kind::Int,
            toml::Value::Float(_) => Kind::Float,
            toml::Value::Boolean(_) => Kind::Bool,
            toml::Value::Array(_) => Kind::List,
            _ => Kind::Str,
        };
        out.insert(path, kind);
    }
}

/// `faults.http_client` → `LAB_FAULTS_HTTP_CLIENT`.
pub fn env_var_for(key: &str) -> String {
    format!("LAB_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// Layers defaults, file, environment and overrides, then validates.
pub fn load(sources: &Sources) -> Result<LabConfig, ConfigError> {
    let known = known_keys();
    let mut merged = toml::Table::new();
    let mut origins: BTreeMap<String, Origin> = BTreeMap::new();

    if let Some(path) = &sources.file {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::ReadFile {
            path: path.clone(),
            source,
        })?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let origin = Origin::File(path.clone());
        let mut leaves = Vec::new();
        flatten(&table, "", &mut leaves);
        for (key, value) in leaves {
            check_known(&known, &key, &origin)?;
            set_path(&mut merged, &key, value);
            origins.insert(key, origin.clone());
        }
    }

    let by_env: BTreeMap<String, &String> = known.keys().map(|k| (env_var_for(k), k)).collect();
    let mut env: Vec<&(String, String)> = sources
        .env
        .iter()
        // An empty variable counts as unset: compose passes `${X:-}` through
        // as "" when the user did not set X.
        .filter(|(k, v)| {
            k.starts_with("LAB_") && !RESERVED_ENV.contains(&k.as_str()) && !v.is_empty()
        })
        .collect();
    env.sort();
    for (var, raw) in env {
        let origin = Origin::Env(var.clone());
        let Some(key) = by_env.get(var) else {
            return Err(ConfigError::UnknownKey {
                key: var.clone(),
                origin,
                allowed: by_env.keys().cloned().collect::<Vec<_>>().join(", "),
            });
        };
        let value = typed_value(key, known[*key], raw, &origin)?;
        set_path(&mut merged, key, value);
        origins.insert((*key).clone(), origin);
    }

    for arg in &sources.overrides {
        let origin = Origin::Flag(format!("--set {arg}"));
        let Some((key, raw)) = arg.split_once('=') else {
            return Err(ConfigError::MalformedOverride {
                arg: arg.clone(),
                origin,
            });
        };
        let key = key.trim();
        check_known(&known, key, &origin)?;
        let value = typed_value(key, known[key], raw.trim(), &origin)?;
        set_path(&mut merged, key, value);
        origins.insert(key.to_string(), origin);
    }

    let raw: RawConfig = serde_path_to_error::deserialize(toml::Value::Table(merged.clone()))
        .map_err(|e| {
            let key = e.path().to_string();
            let value = lookup(&merged, &key)
                .map(|v| v.to_string())
                .unwrap_or_else(|| "?".into());
            ConfigError::InvalidValue {
                origin: origins.get(&key).cloned().unwrap_or(Origin::Default),
                key,
                value,
                reason: first_line(&e.into_inner().to_string()),
            }
        })?;
    let config = raw.resolve();
    validate(&config, &origins)?;
    Ok(config)
}

/// The deserializer's message without the `in `key`` context line it appends
/// (the key is already in our message).
fn first_line(message: &str) -> String {
    message.lines().next().unwrap_or(message).trim().to_string()
}

fn check_known(
    known: &BTreeMap<String, Kind>,
    key: &str,
    origin: &Origin,
) -> Result<(), ConfigError> {
    if known.contains_key(key) {
        return Ok(());
    }
    // List the keys of the same section, which is what a typo is usually near.
    let section = key.rsplit_once('.').map(|(s, _)| s).unwrap_or("");
    let mut allowed: Vec<&str> = known
        .keys()
        .filter(|k| k.rsplit_once('.').map(|(s, _)| s).unwrap_or("") == section)
        .map(String::as_str)
        .collect();
    if allowed.is_empty() {
        allowed = known.keys().map(String::as_str).collect();
    }
    Err(ConfigError::UnknownKey {
        key: key.to_string(),
        origin: origin.clone(),
        allowed: allowed.join(", "),
    })
}

/// Converts an environment or flag string to the TOML type the key expects.
fn typed_value(
    key: &str,
    kind: Kind,
    raw: &str,
    origin: &Origin,
) -> Result<toml::Value, ConfigError> {
    let invalid = |reason: &str| ConfigError::InvalidValue {
        key: key.to_string(),
        value: format!("{raw:?}"),
        origin: origin.clone(),
        reason: reason.to_string(),
    };
    Ok(match kind {
        Kind::Str => toml::Value::String(raw.to_string()),
        Kind::Int => toml::Value::Integer(raw.parse().map_err(|_| invalid("expected an integer"))?),
        Kind::Float => toml::Value::Float(raw.parse().map_err(|_| invalid("expected a number"))?),
        Kind::Bool => {
            toml::Value::Boolean(raw.parse().map_err(|_| invalid("expected true or false"))?)
        }
        Kind::List => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_string()))
                .collect(),
        ),
    })
}

fn flatten(table: &toml::Table, prefix: &str, out: &mut Vec<(String, toml::Value)>) {
    for (k, v) in table {
        let path = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        match v {
            toml::Value::Table(t) => flatten(t, &path, out),
            other => out.push((path, other.clone())),
        }
    }
}

fn set_path(table: &mut toml::Table, key: &str, value: toml::Value) {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().unwrap_or(key);
    let mut cur = table;
    for part in parts {
        let entry = cur
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            unreachable!("just made it a table")
        };
        cur = next;
    }
    cur.insert(last.to_string(), value);
}

fn lookup<'a>(table: &'a toml::Table, key: &str) -> Option<&'a toml::Value> {
    let mut parts = key.split('.');
    let mut cur = table.get(parts.next()?)?;
    for part in parts {
        cur = cur.as_table()?.get(part)?;
    }
    Some(cur)
}

/// Checks that go beyond types: addresses parse, sizes and timeouts are sane.
fn validate(c: &LabConfig, origins: &BTreeMap<String, Origin>) -> Result<(), ConfigError> {
    let err = |key: &str, value: String, reason: &str| ConfigError::InvalidValue {
        key: key.to_string(),
        value,
        origin: origins.get(key).cloned().unwrap_or(Origin::Default),
        reason: reason.to_string(),
    };
    let addrs = [
        ("service_a.listen", &c.service_a.listen),
        ("service_a.admin_listen", &c.service_a.admin_listen),
        ("service_b.listen", &c.service_b.listen),
        ("service_b.admin_listen", &c.service_b.admin_listen),
        ("partner.listen", &c.partner.listen),
        ("partner.admin_listen", &c.partner.admin_listen),
    ];
    for (key, value) in addrs {
        if value.parse::<SocketAddr>().is_err() {
            return Err(err(
                key,
                format!("{value:?}"),
                "expected IP:PORT, e.g. 127.0.0.1:8080",
            ));
        }
    }
    let urls = [
        ("service_a.backend_l4_url", &c.service_a.backend_l4_url),
        ("service_a.backend_l7_url", &c.service_a.backend_l7_url),
    ];
    for (key, value) in urls {
        if !(value.starts_with("http://") || value.starts_with("https://")) {
            return Err(err(
                key,
                format!("{value:?}"),
                "expected an http:// or https:// URL",
            ));
        }
    }
    if !c.mysql.url.starts_with("mysql://") && !c.mysql.url.starts_with("mariadb://") {
        return Err(err(
            "mysql.url",
            format!("{:?}", c.mysql.url),
            "expected mysql://user:password@host:port/database",
        ));
    }
    let positive = [
        ("service_a.backend_timeout", c.service_a.backend_timeout),
        ("service_a.connect_timeout", c.service_a.connect_timeout),
        ("mysql.acquire_timeout", c.mysql.acquire_timeout),
        ("mysql.query_timeout", c.mysql.query_timeout),
        ("etcd.lease_ttl", c.etcd.lease_ttl),
        ("partner.idle_timeout", c.partner.idle_timeout),
        ("partner.client_timeout", c.partner.client_timeout),
        (
            "partner.client_connect_timeout",
            c.partner.client_connect_timeout,
        ),
    ];
    for (key, value) in positive {
        if value.is_zero() {
            return Err(err(key, "\"0s\"".into(), "must be greater than zero"));
        }
    }
    let jitter = c.service_b.max_connection_age_jitter;
    if !(0.0..=0.5).contains(&jitter) {
        return Err(err(
            "service_b.max_connection_age_jitter",
            jitter.to_string(),
            "expected a fraction between 0 and 0.5",
        ));
    }
    let at_least_one = [
        ("worker.batch", c.worker.batch),
        ("worker.cap", c.worker.cap),
        ("worker.pool_size", c.worker.pool_size),
        ("worker.max_attempts", c.worker.max_attempts),
        (
            "service_b.max_concurrent_requests",
            c.service_b.max_concurrent_requests,
        ),
        (
            "partner.client_max_connections",
            c.partner.client_max_connections,
        ),
    ];
    for (key, value) in at_least_one {
        if value == 0 {
            return Err(err(key, "0".into(), "must be at least 1"));
        }
    }
    let worker_positive = [
        ("worker.tick", c.worker.tick),
        ("worker.visibility_timeout", c.worker.visibility_timeout),
        ("worker.job_timeout", c.worker.job_timeout),
    ];
    for (key, value) in worker_positive {
        if value.is_zero() {
            return Err(err(key, "\"0s\"".into(), "must be greater than zero"));
        }
    }
    if c.worker.visibility_timeout <= c.worker.job_timeout {
        return Err(err(
            "worker.visibility_timeout",
            format!(
                "{:?}",
                humantime::format_duration(c.worker.visibility_timeout).to_string()
            ),
            "must be longer than worker.job_timeout, or running jobs get reclaimed and run twice",
        ));
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&c.telemetry.log_filter) {
        return Err(err(
            "telemetry.log_filter",
            format!("{:?}", c.telemetry.log_filter),
            &format!("not a tracing filter: {e}"),
        ));
    }
    if c.mysql.pool_max == 0 {
        return Err(err("mysql.pool_max", "0".into(), "must be at least 1"));
    }
    if c.service_b.max_payload_bytes == 0 {
        return Err(err(
            "service_b.max_payload_bytes",
            "0".into(),
            "must be at least 1",
        ));
    }
    if !c.partner.url.starts_with("https://") {
        return Err(err(
            "partner.url",
            format!("{:?}", c.partner.url),
            "expected an https:// URL (the partner speaks TLS only)",
        ));
    }
    if c.partner.client_max_body_bytes == 0 {
        return Err(err(
            "partner.client_max_body_bytes",
            "0".into(),
            "must be at least 1",
        ));
    }
    if c.etcd.lease_ttl < Duration::from_secs(1) {
        return Err(err(
            "etcd.lease_ttl",
            format!(
                "{:?}",
                humantime::format_duration(c.etcd.lease_ttl).to_string()
            ),
            "etcd leases are granted in whole seconds: use at least 1s",
        ));
    }
    Ok(())
}

/// Reads `path` and validates it as a full lab config (for `labctl config check`),
/// ignoring the environment.
pub fn check_file(path: &Path) -> Result<LabConfig, ConfigError> {
    load(&Sources {
        file: Some(path.to_path_buf()),
        ..Sources::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(text.as_bytes()).expect("write temp file");
        f
    }

    #[test]
    fn defaults_are_the_buggy_preset_on_native_ports() {
        let c = load(&Sources::default()).expect("defaults load");
        assert_eq!(c.mode, Mode::Buggy);
        assert_eq!(c.faults, Faults::preset(Mode::Buggy));
        assert_eq!(c.service_a.listen, "127.0.0.1:8080");
        assert_eq!(c.service_b.listen, "127.0.0.1:50051");
        assert_eq!(c.service_a.backend_timeout, Duration::from_secs(5));
    }

    #[test]
    fn file_then_env_then_flag_later_wins() {
        let f =
            file("mode = \"fixed\"\n[service_a]\nbackend_timeout = \"3s\"\nmax_body_bytes = 10\n");
        let sources = Sources {
            file: Some(f.path().to_path_buf()),
            env: env(&[
                ("LAB_SERVICE_A_BACKEND_TIMEOUT", "4s"),
                ("LAB_MYSQL_POOL_MAX", "7"),
            ]),
            overrides: vec!["service_a.backend_timeout=250ms".into()],
        };
        let c = load(&sources).expect("loads");
        assert_eq!(c.mode, Mode::Fixed);
        assert_eq!(c.service_a.max_body_bytes, 10, "file beats default");
        assert_eq!(c.mysql.pool_max, 7, "env beats default");
        assert_eq!(
            c.service_a.backend_timeout,
            Duration::from_millis(250),
            "flag beats env and file"
        );
    }

    #[test]
    fn a_switch_overrides_the_preset_and_the_rest_follow_it() {
        let sources = Sources {
            env: env(&[("LAB_MODE", "fixed"), ("LAB_FAULTS_LB", "l4")]),
            ..Sources::default()
        };
        let c = load(&sources).expect("loads");
        assert_eq!(c.faults.lb, LbMode::L4);
        assert_eq!(c.faults.worker, WorkerMode::Bounded);
        assert_eq!(c.faults.http_client, HttpClientMode::Shared);
        assert_eq!(c.faults.rows, RowsMode::Close);
    }

    #[test]
    fn bad_switch_value_names_key_value_origin_and_allowed_values() {
        let sources = Sources {
            env: env(&[("LAB_FAULTS_LB", "round-robin")]),
            ..Sources::default()
        };
        let msg = load(&sources).expect_err("rejected").to_string();
        assert!(msg.contains("faults.lb"), "{msg}");
        assert!(msg.contains("round-robin"), "{msg}");
        assert!(msg.contains("LAB_FAULTS_LB"), "{msg}");
        assert!(msg.contains("`l4`, `l7`, `etcd`"), "{msg}");
    }

    #[test]
    fn unknown_keys_are_rejected_from_every_source() {
        let f = file("[service_a]\nlisten_port = 1\n");
        let from_file = load(&Sources {
            file: Some(f.path().to_path_buf()),
            ..Sources::default()
        })
        .expect_err("file key rejected")
        .to_string();
        assert!(from_file.contains("service_a.listen_port"), "{from_file}");
        assert!(
            from_file.contains("service_a.listen"),
            "lists allowed keys: {from_file}"
        );

        let from_env = load(&Sources {
            env: env(&[("LAB_FAULTS_WORKERS", "bounded")]),
            ..Sources::default()
        })
        .expect_err("env var rejected")
        .to_string();
        assert!(from_env.contains("LAB_FAULTS_WORKERS"), "{from_env}");
        assert!(from_env.contains("LAB_FAULTS_WORKER"), "{from_env}");

        let from_flag = load(&Sources {
            overrides: vec!["faults.bogus=1".into()],
            ..Sources::default()
        })
        .expect_err("flag key rejected")
        .to_string();
        assert!(from_flag.contains("faults.bogus"), "{from_flag}");
    }

    #[test]
    fn type_errors_and_semantic_errors_name_the_key() {
        let bad_int = load(&Sources {
            env: env(&[("LAB_MYSQL_POOL_MAX", "many")]),
            ..Sources::default()
        })
        .expect_err("rejected")
        .to_string();
        assert!(
            bad_int.contains("mysql.pool_max") && bad_int.contains("many"),
            "{bad_int}"
        );

        let bad_duration = load(&Sources {
            overrides: vec!["service_a.backend_timeout=soon".into()],
            ..Sources::default()
        })
        .expect_err("rejected")
        .to_string();
        assert!(
            bad_duration.contains("service_a.backend_timeout"),
            "{bad_duration}"
        );

        let bad_addr = load(&Sources {
            overrides: vec!["service_b.listen=localhost".into()],
            ..Sources::default()
        })
        .expect_err("rejected")
        .to_string();
        assert!(
            bad_addr.contains("service_b.listen") && bad_addr.contains("IP:PORT"),
            "{bad_addr}"
        );
    }

    #[test]
    fn empty_env_vars_count_as_unset() {
        let c = load(&Sources {
            env: env(&[("LAB_FAULTS_LB", ""), ("LAB_MODE", "fixed")]),
            ..Sources::default()
        })
        .expect("loads");
        assert_eq!(
            c.faults.lb,
            LbMode::Etcd,
            "preset applies, empty override ignored"
        );
    }

    #[test]
    fn lists_come_from_comma_separated_env() {
        let c = load(&Sources {
            env: env(&[("LAB_ETCD_ENDPOINTS", "http://a:1, http://b:2")]),
            ..Sources::default()
        })
        .expect("loads");
        assert_eq!(c.etcd.endpoints, vec!["http://a:1", "http://b:2"]);
    }

    #[test]
    fn written_config_loads_back_identically() {
        let sources = Sources {
            overrides: vec!["mode=fixed".into(), "faults.worker=capped".into()],
            ..Sources::default()
        };
        let c = load(&sources).expect("loads");
        let f = file(&c.to_toml().expect("serializes"));
        let back = check_file(f.path()).expect("loads back");
        assert_eq!(back.faults, c.faults);
        assert_eq!(
            back.to_toml().expect("serializes"),
            c.to_toml().expect("serializes")
        );
    }

    #[test]
    fn malformed_override_is_explained() {
        let msg = load(&Sources {
            overrides: vec!["faults.lb".into()],
            ..Sources::default()
        })
        .expect_err("rejected")
        .to_string();
        assert!(msg.contains("KEY=VALUE"), "{msg}");
    }
}
