//! Configuration shared by every lab binary, and the fault switches.
//!
//! One [`LabConfig`] describes the whole lab (every service reads the same file
//! and uses its own section), so a single `lab.toml` drives `labctl up`,
//! `docker compose up` and each process. Values are layered, later wins:
//!
//! 1. built-in defaults (the native ports in docs/architecture.md, "Processes"),
//! 2. a TOML file (`--config FILE` or `LAB_CONFIG`),
//! 3. environment variables: `LAB_` + the upper-snake key path
//!    (`faults.http_client` → `LAB_FAULTS_HTTP_CLIENT`); an empty variable
//!    counts as unset,
//! 4. command-line overrides (`--set KEY=VALUE`, `--mode`).
//!
//! Nothing is silently ignored: an unknown key, an unknown `LAB_*` variable or
//! a bad value is a [`ConfigError`] that names the key, the value, where it came
//! from and what is allowed; binaries print it and exit with status 2.
//!
//! The layering and the provenance of each value live in `config::layers`
//! (on figment); the rules beyond types, one function each, in `config::rules`.

mod layers;
mod rules;

use std::{
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};

/// Exit status for invalid configuration (docs/architecture.md, "Configuration").
pub const CONFIG_ERROR_EXIT_CODE: i32 = 2;

/// The preset that sets every switch at once.
///
/// This and the switch enums below derive `clap::ValueEnum` with the same
/// spellings as in the config, so a command line can take a switch value
/// (e.g. `--lbs l4,etcd`) without loading a whole config.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
pub enum Mode {
    /// Every cause in the form the incident had.
    #[default]
    Buggy,
    /// Every cause in its fixed form.
    Fixed,
}

/// Cause 1: how service A reaches the B instances.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
pub enum WorkerMode {
    /// One task per fetched row per tick, no limit (the incident).
    Unbounded,
    /// The team's counter-and-sleep patch.
    Capped,
    /// Fixed pool, backpressure, atomic row claims.
    Bounded,
}

/// Cause 3: whether B honours its caller's deadline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
pub enum DeadlineMode {
    /// Work is detached from the caller; nothing is shed.
    Ignore,
    /// The deadline is honoured and forwarded; stale work is skipped.
    Propagate,
}

/// Cause 4a: how B builds its outbound HTTPS client.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum HttpClientMode {
    /// A new client and TLS config per call, bodies left open (the incident).
    PerRequest,
    /// One shared, pooled client with timeouts; bodies consumed.
    Shared,
}

/// Cause 4b: what happens to a SQL result set when a row fails to decode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum RowsMode {
    /// The result set and its pooled connection are never released.
    LeakOnError,
    /// Released on every path; the bad row is dead-lettered.
    Close,
}

/// HAProxy's `balance` algorithm for the `mode http` (l7) backend,
/// spelled as HAProxy spells it (`slb.balance`). The l4 backend always
/// uses `roundrobin`: there the balancer only sees A's one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
pub enum SlbBalance {
    /// Each server in turn, whatever it still has in flight.
    #[default]
    Roundrobin,
    /// The server with the fewest requests in flight (plus queued). In
    /// `mode http` HAProxy counts streams, not TCP connections: each h2
    /// request multiplexed on a server connection counts once.
    Leastconn,
}

impl SlbBalance {
    /// The algorithm as HAProxy's `balance` line names it (the same
    /// spelling as in the config).
    pub fn haproxy_name(self) -> &'static str {
        match self {
            SlbBalance::Roundrobin => "roundrobin",
            SlbBalance::Leastconn => "leastconn",
        }
    }
}

/// How HAProxy decides a B is up (`slb.check`).
///
/// `tcp` is the incident's SLB: a B that accepts a TCP connection is UP,
/// even while its `/readyz` answers 503 (MySQL gone, pool exhausted,
/// draining), so the balancer keeps sending it traffic it will fail. `ready`
/// is part of the remedy: HAProxy asks each B's admin port for `/readyz`
/// and takes a B that answers anything but 200 out of rotation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
pub enum SlbCheck {
    /// A TCP connect to B's gRPC port.
    #[default]
    Tcp,
    /// `GET /readyz` on B's admin port; only a 200 is UP.
    Ready,
}

/// What partner-api answers (`partner.answer`): the contract, or one of the
/// broken answers real partners send, for B's client to survive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum PartnerAnswer {
    /// `{"score":…,…}` of `partner.body_bytes`.
    #[default]
    Json,
    /// Promises `partner.body_bytes`, sends half, and closes the connection.
    Truncated,
    /// An HTML page of `partner.body_bytes` with a 200: not the JSON asked for.
    NotJson,
}

/// The load A's power-of-two-choices balancer compares between two Bs
/// when `lb = "etcd"` (`service_a.balance_load`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
#[value(rename_all = "kebab-case")]
pub enum BalanceLoad {
    /// Requests in flight (tower's `PendingRequests`).
    #[default]
    Pending,
    /// Requests in flight weighted by a peak-sensitive moving average of
    /// the endpoint's latency (tower's `PeakEwma`): a slow B costs more
    /// even when it has as few requests in flight as a fast one.
    PeakEwma,
}

/// The names a switch's values are written with (config, env, JSON,
/// metric labels), without allocating: `lab_fault_info` and `/faults` use
/// them on every flip and scrape. A unit test keeps them equal to serde's.
pub trait SwitchValue: Copy + Sized + 'static {
    /// Every value, in declaration order.
    const ALL: &'static [Self];
    fn as_str(self) -> &'static str;
}

macro_rules! switch_values {
    ($ty:ty { $($variant:ident => $name:literal),+ $(,)? }) => {
        impl SwitchValue for $ty {
            const ALL: &'static [Self] = &[$(<$ty>::$variant),+];
            fn as_str(self) -> &'static str {
                match self { $(<$ty>::$variant => $name),+ }
            }
        }
    };
}

switch_values!(LbMode { L4 => "l4", L7 => "l7", Etcd => "etcd" });
switch_values!(WorkerMode { Unbounded => "unbounded", Capped => "capped", Bounded => "bounded" });
switch_values!(DeadlineMode { Ignore => "ignore", Propagate => "propagate" });
switch_values!(HttpClientMode { PerRequest => "per-request", Shared => "shared" });
switch_values!(RowsMode { LeakOnError => "leak-on-error", Close => "close" });

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
    /// How long a client connection may take to send a whole request head,
    /// from when it opened or its previous answer ended. Closes connections
    /// that trickle their headers (slowloris) or sit idle. A body gets as
    /// long again, plus `backend_timeout`, before A answers 408.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// `deadline = "propagate"`: requests A works on at once; more are
    /// answered 503 `overloaded` at once (`service-a/src/overload.rs`).
    pub max_concurrent_requests: u32,
    /// `lb = "etcd"`: guard A's balancer against the registry dropping many
    /// Bs at once (a frozen or partitioned etcd expiring every lease); see
    /// `service-a/src/discovery.rs`. `false` honours every removal at once.
    pub registry_guard: bool,
    /// The share of A's endpoints the registry may remove within
    /// `registry_guard_window` before the guard keeps the rest (and those
    /// just removed) as stale. Removing the last endpoint always trips it.
    pub registry_guard_max_loss: f64,
    #[serde(with = "humantime_serde")]
    pub registry_guard_window: Duration,
    /// How long a stale endpoint may stay without its key coming back.
    #[serde(with = "humantime_serde")]
    pub registry_stale_grace: Duration,
    /// `lb = "etcd"`: the load A's balancer compares (`pending` |
    /// `peak-ewma`). Not a live switch: A reads it at start (every
    /// balancer it builds, also on a live flip to `etcd`, uses it), so a
    /// change applies when A restarts.
    pub balance_load: BalanceLoad,
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
            header_read_timeout: Duration::from_secs(10),
            max_concurrent_requests: 256,
            registry_guard: true,
            registry_guard_max_loss: 0.5,
            registry_guard_window: Duration::from_secs(5),
            registry_stale_grace: Duration::from_secs(60),
            balance_load: BalanceLoad::Pending,
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
    /// Server-side connection recycling (`0s` = off): B sends GOAWAY to a
    /// connection older than this, so a client behind the L4 proxy reconnects
    /// and may land on another B (service-b's `recycle` module).
    #[serde(with = "humantime_serde")]
    pub max_connection_age: Duration,
    /// Grace period after `max_connection_age` before the connection is closed.
    #[serde(with = "humantime_serde")]
    pub max_connection_age_grace: Duration,
    /// Spread of `max_connection_age` per instance, as a fraction (0.1 = ±10%).
    pub max_connection_age_jitter: f64,
    /// Items `GetItem` keeps in B's memory (0 = off: every call reads MySQL,
    /// as the incident's B did). The catalogue is read-only, so a cached
    /// item never goes stale; the bound keeps B's memory bounded.
    pub item_cache_capacity: u64,
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
            item_cache_capacity: 0,
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
    /// partner-api: a well-formed answer, or a broken one (see
    /// [`PartnerAnswer`]).
    pub answer: PartnerAnswer,
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
            answer: PartnerAnswer::Json,
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

/// `url` as it may be printed: the password, if any, replaced by `***`
/// (`mysql://lab:***@127.0.0.1:33306/lab`). Read as text, not parsed: a
/// password may hold `#`, `/` or `?`, which a URL parser takes for the end
/// of the authority and so for no password at all. Whatever precedes the
/// last `@` is the user info; its part after the first `:` is the password.
/// Without `://`, all of what precedes the last `@` is withheld.
pub fn redacted_url(url: &str) -> String {
    let Some((before_host, host_and_rest)) = url.rsplit_once('@') else {
        return url.to_owned();
    };
    match before_host.split_once("://") {
        Some((scheme, user_info)) => match user_info.split_once(':') {
            Some((user, _password)) => format!("{scheme}://{user}:***@{host_and_rest}"),
            None => url.to_owned(),
        },
        None => format!("***@{host_and_rest}"),
    }
}

/// etcd, the service registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdConfig {
    /// Client endpoints.
    pub endpoints: Vec<String>,
    /// Key prefix under which B instances register: no leading slash, one
    /// trailing slash (`lab/services/backend/`), so that grpc-go dials the
    /// same instances as `etcd:///lab/services/backend`.
    pub prefix: String,
    /// Registration lease TTL.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

impl Default for EtcdConfig {
    fn default() -> Self {
        Self {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            prefix: "lab/services/backend/".into(),
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
    /// The l7 backend's `balance` algorithm (`roundrobin` | `leastconn`).
    pub balance: SlbBalance,
    /// How HAProxy checks a B (`tcp` | `ready`), on both backends.
    pub check: SlbCheck,
}

impl Default for SlbConfig {
    fn default() -> Self {
        Self {
            l4_listen: "127.0.0.1:50050".into(),
            l7_listen: "127.0.0.1:50060".into(),
            stats_listen: "127.0.0.1:8404".into(),
            maxconn: 2000,
            balance: SlbBalance::Roundrobin,
            check: SlbCheck::Tcp,
        }
    }
}

/// The admin listeners' operator endpoints.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Bearer token for what changes state or costs CPU (`PUT /faults`,
    /// profiles, task dumps). Empty: those endpoints are off. `labctl up`
    /// generates one into `<state-dir>/admin.token`.
    pub token: AdminToken,
    /// Set by `labctl drill start` (on standard input, never in a file):
    /// this process is in a drill and its switches are hidden. `GET /faults`
    /// and `PUT /faults` need this token instead of `token`, `lab_fault_info`
    /// is not exported, and no log line names a switch's value. Empty: no
    /// drill.
    pub drill_token: AdminToken,
    /// jemalloc samples allocations from start, so `GET /debug/pprof/heap`
    /// can show what is live. On by default: its measured cost is small
    /// (docs/architecture.md, "Profiles and task dumps").
    pub heap_profiling: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            token: AdminToken::default(),
            drill_token: AdminToken::default(),
            heap_profiling: true,
        }
    }
}

/// The operator token. Its `Debug` never shows it, so a logged config or
/// error cannot leak it; it serialises as written only so that the config
/// file labctl hands to each process carries it.
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AdminToken(String);

impl AdminToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    /// The token, to compare or to send; never to print.
    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_set(&self) -> bool {
        !self.0.is_empty()
    }
}

impl fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.is_set() {
            "AdminToken(<set>)"
        } else {
            "AdminToken(<unset>)"
        })
    }
}

/// Log output and trace export.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` or `json`.
    pub log_format: LogFormat,
    /// A `tracing` filter (`RUST_LOG` wins when set).
    pub log_filter: String,
    /// Base URL of an OTLP/HTTP collector (e.g. `http://127.0.0.1:4318`;
    /// spans go to `/v1/traces` under it). Empty: spans are not exported,
    /// but trace ids are still made, propagated and logged.
    pub otlp_endpoint: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            log_format: LogFormat::Text,
            log_filter: "info".into(),
            otlp_endpoint: String::new(),
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
#[value(rename_all = "lower")]
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
    pub admin: AdminConfig,
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
    admin: AdminConfig,
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
            admin: self.admin,
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
    /// The TOML read from standard input (`--config-stdin`).
    Stdin,
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("built-in default"),
            Origin::File(p) => write!(f, "file {}", p.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "command-line {flag}"),
            Origin::Stdin => f.write_str("standard input (--config-stdin)"),
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
    #[error("config file {path} is not valid TOML: {source}")]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("the config read from standard input (--config-stdin) is not valid TOML")]
    ParseStdin,
    #[error("reading the config from standard input (--config-stdin)")]
    ReadStdin { source: std::io::Error },
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
    /// The layers could not be read back as one document; a defect in the
    /// loader, not in the user's input.
    #[error("cannot combine the configuration layers: {0}")]
    Layers(#[source] Box<figment::Error>),
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
    /// TOML read from standard input (`--config-stdin`), layered after the
    /// file: how `labctl drill` hands a process the hidden switches and the
    /// drill token without putting them in a file, an argument or the
    /// environment.
    pub stdin: Option<String>,
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
            stdin: None,
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
    /// Read one more TOML layer from standard input, after the file (how
    /// `labctl drill` passes the hidden switches).
    #[arg(long)]
    pub config_stdin: bool,
}

/// Loads from `args` and the environment, or prints the error and exits 2.
pub fn load_or_exit(args: &ConfigArgs) -> LabConfig {
    let mut sources = Sources::from_args(args);
    if args.config_stdin {
        let mut text = String::new();
        if let Err(source) = std::io::Read::read_to_string(&mut std::io::stdin(), &mut text) {
            ConfigError::ReadStdin { source }.exit();
        }
        sources.stdin = Some(text);
    }
    load(&sources).unwrap_or_else(|e| e.exit())
}

/// `faults.http_client` → `LAB_FAULTS_HTTP_CLIENT`.
pub fn env_var_for(key: &str) -> String {
    format!("LAB_{}", key.replace('.', "_").to_ascii_uppercase())
}

/// Layers defaults, file, environment and overrides (later wins), then
/// checks the rules in `config::rules`.
pub fn load(sources: &Sources) -> Result<LabConfig, ConfigError> {
    let keys = layers::Keys::known()?;
    let mut figment = layers::defaults();
    if let Some(path) = &sources.file {
        figment = layers::merge_file(figment, path, &keys)?;
    }
    if let Some(text) = &sources.stdin {
        figment = layers::merge_stdin(figment, text, &keys)?;
    }
    figment = layers::merge_env(figment, &sources.env, &keys)?;
    for arg in &sources.overrides {
        figment = layers::merge_override(figment, arg, &keys)?;
    }
    let config = layers::extract(&figment)?.resolve();
    rules::validate(&config, |key| layers::origin_of(&figment, key))?;
    Ok(config)
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

    #[test]
    fn a_printed_url_hides_its_password_and_only_that() {
        assert_eq!(
            redacted_url("mysql://lab:s3cret@127.0.0.1:33306/lab?ssl-mode=disabled"),
            "mysql://lab:***@127.0.0.1:33306/lab?ssl-mode=disabled"
        );
        assert_eq!(
            redacted_url("mysql://lab@db:3306/lab"),
            "mysql://lab@db:3306/lab"
        );
        assert_eq!(
            redacted_url("http://127.0.0.1:2379"),
            "http://127.0.0.1:2379"
        );
        // Characters a URL parser would stop at.
        assert_eq!(
            redacted_url("mysql://lab:123#x/y?z@db:3306/lab"),
            "mysql://lab:***@db:3306/lab"
        );
        assert_eq!(
            redacted_url("mysql://lab:p@ss@db/lab"),
            "mysql://lab:***@db/lab"
        );
        // Not a URL at all, but written like one: what precedes the last
        // `@` may hold the password.
        assert_eq!(redacted_url("lab:s3cret@db/lab"), "***@db/lab");
        assert_eq!(redacted_url("not a url"), "not a url");
    }

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
    fn switch_value_names_are_the_serde_names() {
        fn check<E: SwitchValue + Serialize + clap::ValueEnum>() {
            assert_eq!(E::ALL.len(), E::value_variants().len());
            for value in E::ALL {
                let json = serde_json::to_value(value).expect("serialises");
                assert_eq!(json.as_str(), Some(value.as_str()));
            }
        }
        check::<LbMode>();
        check::<WorkerMode>();
        check::<DeadlineMode>();
        check::<HttpClientMode>();
        check::<RowsMode>();
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
            stdin: None,
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
    fn the_stdin_layer_sits_between_file_and_flags_and_never_echoes_its_text() {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        writeln!(file, "mode = \"fixed\"\n[faults]\nworker = \"bounded\"").expect("write");
        let secret = "[admin]\ndrill_token = \"s3cret-drill\"\n[faults]\nworker = \"unbounded\"\nrows = \"leak-on-error\"\n";
        let c = load(&Sources {
            file: Some(file.path().to_path_buf()),
            stdin: Some(secret.into()),
            overrides: vec!["faults.rows=close".into()],
            ..Sources::default()
        })
        .expect("loads");
        assert_eq!(c.admin.drill_token.expose(), "s3cret-drill");
        assert_eq!(
            c.faults.worker,
            WorkerMode::Unbounded,
            "stdin wins over the file"
        );
        assert_eq!(c.faults.rows, RowsMode::Close, "a flag wins over stdin");
        assert_eq!(
            c.faults.deadline,
            DeadlineMode::Propagate,
            "the file's preset stays"
        );

        let msg = load(&Sources {
            stdin: Some("drill_token = \"s3cret-drill".into()),
            ..Sources::default()
        })
        .expect_err("not TOML")
        .to_string();
        assert!(
            msg.contains("standard input") && !msg.contains("s3cret"),
            "{msg}"
        );
    }

    #[test]
    fn balance_choices_default_to_today_and_reject_unknown_values() {
        let c = LabConfig::default();
        assert_eq!(c.slb.balance, SlbBalance::Roundrobin);
        assert_eq!(c.service_a.balance_load, BalanceLoad::Pending);
        let set = load(&Sources {
            overrides: vec![
                "slb.balance=leastconn".into(),
                "service_a.balance_load=peak-ewma".into(),
            ],
            ..Sources::default()
        })
        .expect("loads");
        assert_eq!(set.slb.balance, SlbBalance::Leastconn);
        assert_eq!(c.slb.check, SlbCheck::Tcp);
        let msg = load(&Sources {
            overrides: vec!["slb.check=http".into()],
            ..Sources::default()
        })
        .expect_err("rejected")
        .to_string();
        assert!(
            msg.contains("slb.check") && msg.contains("`tcp` or `ready`"),
            "{msg}"
        );
        assert_eq!(set.service_a.balance_load, BalanceLoad::PeakEwma);

        let msg = load(&Sources {
            env: env(&[("LAB_SLB_BALANCE", "random")]),
            ..Sources::default()
        })
        .expect_err("rejected")
        .to_string();
        assert!(msg.contains("slb.balance"), "{msg}");
        assert!(msg.contains("random"), "{msg}");
        assert!(msg.contains("LAB_SLB_BALANCE"), "{msg}");
        assert!(
            msg.contains("`roundrobin`") && msg.contains("`leastconn`"),
            "{msg}"
        );

        let msg = load(&Sources {
            overrides: vec!["service_a.balance_load=ewma".into()],
            ..Sources::default()
        })
        .expect_err("rejected")
        .to_string();
        assert!(msg.contains("service_a.balance_load"), "{msg}");
        assert!(msg.contains("ewma"), "{msg}");
        assert!(
            msg.contains("`pending`") && msg.contains("`peak-ewma`"),
            "{msg}"
        );
    }

    #[test]
    fn the_otlp_endpoint_is_off_by_default_and_must_be_http() {
        assert_eq!(LabConfig::default().telemetry.otlp_endpoint, "");
        let ok = load(&Sources {
            env: env(&[("LAB_TELEMETRY_OTLP_ENDPOINT", "http://jaeger:4318")]),
            ..Sources::default()
        })
        .expect("an http endpoint loads");
        assert_eq!(ok.telemetry.otlp_endpoint, "http://jaeger:4318");
        let msg = load(&Sources {
            env: env(&[("LAB_TELEMETRY_OTLP_ENDPOINT", "jaeger:4317")]),
            ..Sources::default()
        })
        .expect_err("rejected")
        .to_string();
        assert!(msg.contains("telemetry.otlp_endpoint"), "{msg}");
        assert!(msg.contains("jaeger:4317"), "{msg}");
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
    fn the_registry_prefix_is_one_grpc_go_can_dial() {
        assert_eq!(LabConfig::default().etcd.prefix, "lab/services/backend/");
        let ok = load(&Sources {
            overrides: vec!["etcd.prefix=drill/backends/".into()],
            ..Sources::default()
        })
        .expect("a relative prefix loads");
        assert_eq!(ok.etcd.prefix, "drill/backends/");
        for (bad, why) in [
            ("/lab/services/backend/", "must not start with '/'"),
            ("lab/services/backend", "ending in '/'"),
            ("/", "must not start with '/'"),
        ] {
            let msg = load(&Sources {
                overrides: vec![format!("etcd.prefix={bad}")],
                ..Sources::default()
            })
            .expect_err(bad)
            .to_string();
            assert!(msg.contains("etcd.prefix"), "{msg}");
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
            assert!(msg.contains(why), "{msg}");
        }
    }

    #[test]
    fn the_item_cache_is_off_by_default_and_bounded() {
        assert_eq!(LabConfig::default().service_b.item_cache_capacity, 0);
        let on = load(&Sources {
            overrides: vec!["service_b.item_cache_capacity=10000".into()],
            ..Sources::default()
        })
        .expect("a capacity loads");
        assert_eq!(on.service_b.item_cache_capacity, 10_000);
        for (value, expect) in [("-1", "-1"), ("lots", "lots"), ("20000000", "20000000")] {
            let msg = load(&Sources {
                env: env(&[("LAB_SERVICE_B_ITEM_CACHE_CAPACITY", value)]),
                ..Sources::default()
            })
            .expect_err("rejected")
            .to_string();
            assert!(msg.contains("service_b.item_cache_capacity"), "{msg}");
            assert!(msg.contains(expect), "{msg}");
            assert!(msg.contains("LAB_SERVICE_B_ITEM_CACHE_CAPACITY"), "{msg}");
        }
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
    fn a_rule_names_the_layer_that_set_the_value() {
        let f = file("[worker]\npool_size = 0\njob_timeout = \"1s\"\n");
        let msg = load(&Sources {
            file: Some(f.path().to_path_buf()),
            env: env(&[("LAB_WORKER_POOL_SIZE", "0")]),
            ..Sources::default()
        })
        .expect_err("rejected")
        .to_string();
        assert!(msg.contains("worker.pool_size"), "{msg}");
        assert!(msg.contains("LAB_WORKER_POOL_SIZE"), "{msg}");

        let fixed = load(&Sources {
            file: Some(f.path().to_path_buf()),
            overrides: vec!["worker.pool_size=2".into()],
            ..Sources::default()
        })
        .expect("a later layer repairs an earlier one");
        assert_eq!(fixed.worker.pool_size, 2);
        assert_eq!(fixed.worker.job_timeout, Duration::from_secs(1));
    }

    #[test]
    fn a_number_is_not_a_switch_value() {
        let f = file("[faults]\nlb = 1\n");
        let msg = check_file(f.path()).expect_err("rejected").to_string();
        assert!(msg.contains("faults.lb"), "{msg}");
        assert!(msg.contains(&f.path().display().to_string()), "{msg}");
    }

    #[test]
    fn switches_parse_on_the_command_line_as_spelled_in_config() {
        fn same_names<T: clap::ValueEnum + Serialize>() {
            for variant in T::value_variants() {
                let in_config = serde_json::to_value(variant).expect("serializes");
                let on_command_line = variant.to_possible_value().expect("not hidden");
                assert_eq!(in_config.as_str(), Some(on_command_line.get_name()));
            }
        }
        same_names::<Mode>();
        same_names::<LbMode>();
        same_names::<WorkerMode>();
        same_names::<DeadlineMode>();
        same_names::<HttpClientMode>();
        same_names::<RowsMode>();
        same_names::<LogFormat>();
        same_names::<SlbBalance>();
        same_names::<SlbCheck>();
        for balance in <SlbBalance as clap::ValueEnum>::value_variants() {
            let in_config = serde_json::to_value(balance).expect("serializes");
            assert_eq!(in_config.as_str(), Some(balance.haproxy_name()));
        }
        same_names::<BalanceLoad>();
        assert_eq!(
            <LbMode as clap::ValueEnum>::from_str("per-request", false).ok(),
            None
        );
        assert_eq!(
            <HttpClientMode as clap::ValueEnum>::from_str("per-request", false).ok(),
            Some(HttpClientMode::PerRequest)
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
