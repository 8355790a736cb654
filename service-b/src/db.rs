//! MySQL access: pool, embedded migrations, seeding and the queries behind
//! the gRPC methods and the job worker.
//!
//! Every query first takes a pooled connection ([`Db::acquire`]), then runs
//! within `mysql.query_timeout` (and the caller's remaining budget). How long
//! a query may wait for a *free* connection follows the deadline switch,
//! because that is where the incident's Go service and a careful one differ:
//!
//! * [`PoolWait::Bounded`] (`deadline = "propagate"`): at most
//!   `mysql.acquire_timeout` or the caller's remaining budget, whichever is
//!   shorter; an exhausted pool is a fast UNAVAILABLE that names the pool.
//! * [`PoolWait::UntilFree`] (`deadline = "ignore"`): like Go's
//!   `database/sql` with a background context, which has no acquire timeout —
//!   a query waits for a free connection for as long as it takes, so an
//!   exhausted pool shows up as hung requests, not errors. A database that
//!   refuses connections still fails, after `mysql.acquire_timeout` (sqlx
//!   retries a refused connection until then; Go returns the dial error),
//!   unless the pool was exhausted when it went away.
//!
//! The wait is chosen per query from the `deadline` switch in force, so a
//! flip (`PUT /faults`) applies to the next query; a query already waiting
//! under `UntilFree` looks again each `mysql.acquire_timeout` and, after a
//! flip to `propagate`, gives up with the pool-exhausted error (or, below
//! the pool's maximum, the no-connection one).

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use backon::{ExponentialBuilder, Retryable};
use lab_common::{
    config::{DeadlineMode, MysqlConfig},
    faults::LiveFaults,
};
use prometheus::{
    Gauge, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use sqlx::{
    AssertSqlSafe, Connection as _, MySql, QueryBuilder,
    mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions},
    pool::PoolConnection,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use lab_common::metrics::{GaugeGuard, Registrar};

/// How long a query waits for a free pooled connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PoolWait {
    /// `mysql.acquire_timeout`, or less if the caller's deadline is nearer.
    Bounded,
    /// For as long as the pool stays exhausted (Go's `database/sql`).
    UntilFree,
}

impl PoolWait {
    /// The wait that goes with the `deadline` switch.
    pub fn for_deadline(mode: DeadlineMode) -> Self {
        match mode {
            DeadlineMode::Ignore => PoolWait::UntilFree,
            DeadlineMode::Propagate => PoolWait::Bounded,
        }
    }
}

/// What a pooled connection is taken for: the `purpose` label of the pool
/// metrics, so a pool drained by the worker is told from one drained by
/// requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A gRPC request's query (`GetItem`, `SubmitJob`, `GetJob`).
    Request,
    /// The job worker's claims, reads and outcome writes.
    Job,
    /// `/readyz`'s `SELECT 1`.
    Probe,
}

impl Purpose {
    const ALL: [Purpose; 3] = [Purpose::Request, Purpose::Job, Purpose::Probe];

    fn label(self) -> &'static str {
        match self {
            Purpose::Request => "request",
            Purpose::Job => "job",
            Purpose::Probe => "probe",
        }
    }
}

/// The pool's metrics, B's view of its MySQL connections:
///
/// * `lab_db_acquire_waiting` — queries waiting for a free connection right
///   now (the hung requests of an exhausted pool under `UntilFree`);
/// * `lab_db_acquire_wait_seconds{purpose}` — how long each wait took,
///   whether it got a connection or not;
/// * `lab_db_acquire_timeouts_total{purpose}` — waits that gave up (pool
///   exhausted, no connection in time, or the caller's deadline): the fast
///   failures of a bounded wait, which an unbounded one never has;
/// * `lab_db_connections_in_use{purpose}` and
///   `lab_db_oldest_checkout_seconds` — connections checked out now, and how
///   long the oldest of them has been out. A busy connection comes back
///   within a query timeout; one that never comes back (a leak) makes the
///   oldest checkout age grow without bound while the in-use count stays
///   pinned.
#[derive(Clone)]
pub struct PoolMetrics {
    waiting: IntGauge,
    wait: HistogramVec,
    timeouts: IntCounterVec,
    checkouts: Checkouts,
}

impl PoolMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let r = Registrar(registry);
        let waiting = r.int_gauge(
            "lab_db_acquire_waiting",
            "Queries waiting for a free MySQL pool connection right now.",
        )?;
        let wait = r.latency_histogram_vec(
            "lab_db_acquire_wait_seconds",
            "Time spent waiting for a MySQL pool connection, by purpose (request, job, probe), \
             whether the wait got one or gave up.",
            &["purpose"],
        )?;
        let timeouts = r.int_counter_vec(
            "lab_db_acquire_timeouts_total",
            "Waits for a MySQL pool connection that gave up (pool exhausted, no connection \
             in time, or the caller's deadline), by purpose.",
            &["purpose"],
        )?;
        for purpose in Purpose::ALL {
            wait.with_label_values(&[purpose.label()]);
            timeouts.with_label_values(&[purpose.label()]);
        }
        let checkouts = Checkouts::default();
        registry.register(Box::new(CheckoutCollector::new(checkouts.clone())?))?;
        Ok(Self {
            waiting,
            wait,
            timeouts,
            checkouts,
        })
    }

    /// Records one wait for a connection (started at `started`) and, if
    /// it got one, checks it out under `purpose`.
    fn record(
        &self,
        purpose: Purpose,
        started: Instant,
        result: Result<PoolConnection<MySql>, DbError>,
    ) -> Result<Checkout, DbError> {
        let label = [purpose.label()];
        self.wait
            .with_label_values(&label)
            .observe(started.elapsed().as_secs_f64());
        match result {
            Ok(connection) => Ok(Checkout {
                connection,
                _held: self.checkouts.open(purpose),
            }),
            Err(error) => {
                if error.is_acquire_timeout() {
                    self.timeouts.with_label_values(&label).inc();
                }
                Err(error)
            }
        }
    }
}

/// A pooled connection checked out for one purpose. It derefs to the
/// connection, goes back to the pool when dropped, and is listed in the
/// pool metrics' checkouts until then — so a connection that is never
/// dropped (`rows = leak-on-error` keeps it forever) stays listed, and
/// its age keeps growing.
pub struct Checkout {
    connection: PoolConnection<MySql>,
    _held: CheckoutEntry,
}

impl std::ops::Deref for Checkout {
    type Target = MySqlConnection;

    fn deref(&self) -> &MySqlConnection {
        &self.connection
    }
}

impl std::ops::DerefMut for Checkout {
    fn deref_mut(&mut self) -> &mut MySqlConnection {
        &mut self.connection
    }
}

/// The connections checked out now: when each went out, and for what.
/// Entries are keyed by a sequence number, so the first is the oldest.
#[derive(Clone, Default)]
struct Checkouts(Arc<Mutex<CheckoutTable>>);

#[derive(Default)]
struct CheckoutTable {
    next: u64,
    open: BTreeMap<u64, (Instant, Purpose)>,
}

impl Checkouts {
    fn open(&self, purpose: Purpose) -> CheckoutEntry {
        let mut table = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let id = table.next;
        table.next += 1;
        table.open.insert(id, (Instant::now(), purpose));
        CheckoutEntry {
            checkouts: self.clone(),
            id,
        }
    }

    /// (in use by purpose, in [`Purpose::ALL`] order; the oldest's age).
    fn snapshot(&self) -> ([i64; 3], Duration) {
        let table = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        let mut in_use = [0; 3];
        for (_, purpose) in table.open.values() {
            if let Some(i) = Purpose::ALL.iter().position(|p| p == purpose) {
                in_use[i] += 1;
            }
        }
        let oldest = table
            .open
            .values()
            .next()
            .map_or(Duration::ZERO, |(since, _)| since.elapsed());
        (in_use, oldest)
    }
}

/// One checkout's entry in [`Checkouts`], removed when dropped.
struct CheckoutEntry {
    checkouts: Checkouts,
    id: u64,
}

impl Drop for CheckoutEntry {
    fn drop(&mut self) {
        let mut table = self
            .checkouts
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        table.open.remove(&self.id);
    }
}

/// `lab_db_connections_in_use{purpose}` and
/// `lab_db_oldest_checkout_seconds`, read from [`Checkouts`] when scraped.
struct CheckoutCollector {
    checkouts: Checkouts,
    in_use: IntGaugeVec,
    oldest: Gauge,
}

impl CheckoutCollector {
    fn new(checkouts: Checkouts) -> prometheus::Result<Self> {
        Ok(Self {
            checkouts,
            in_use: IntGaugeVec::new(
                Opts::new(
                    "lab_db_connections_in_use",
                    "MySQL pool connections checked out right now, by purpose (request, job, probe).",
                ),
                &["purpose"],
            )?,
            oldest: Gauge::new(
                "lab_db_oldest_checkout_seconds",
                "How long the longest-held checked-out MySQL connection has been out (0 when \
                 none is): a busy one comes back within mysql.query_timeout, a leaked one never.",
            )?,
        })
    }
}

impl Collector for CheckoutCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.in_use
            .desc()
            .into_iter()
            .chain(self.oldest.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let (in_use, oldest) = self.checkouts.snapshot();
        for (purpose, n) in Purpose::ALL.iter().zip(in_use) {
            self.in_use.with_label_values(&[purpose.label()]).set(n);
        }
        self.oldest.set(oldest.as_secs_f64());
        self.in_use
            .collect()
            .into_iter()
            .chain(self.oldest.collect())
            .collect()
    }
}

/// A pooled connection idle for less than this is handed out without a
/// ping. sqlx pings every connection as it goes back to the pool, and by
/// default once more as it is taken out: under load that second ping comes
/// microseconds after the first and costs a MySQL round trip per query —
/// 17 % of B's CPU samples under `perf` (README, "The hot path, profiled").
/// A connection idle for longer (MySQL may have restarted or timed it out
/// since) is still pinged before use. A connection to a MySQL that has
/// restarted since has been idle at least as long as the restart took —
/// it cannot have been used since it died — and a restart takes longer than
/// this (0.3 s natively here), so the ping catches every such connection;
/// under load connections come back and go out again within milliseconds
/// and are not pinged. (At 1 s, a connection last used 0.4 s before a kill
/// was handed out dead once MySQL was back: CI, dependency_faults.)
/// [`LinkTrouble`] covers what is faster still, e.g. a fail-over.
const PING_IF_IDLE_FOR: Duration = Duration::from_millis(100);

/// How long after a query fails on its connection every pooled connection
/// is pinged before use, however briefly it was idle (see [`LinkTrouble`]).
const PING_ALL_AFTER_LINK_TROUBLE: Duration = Duration::from_secs(5);

/// When a query last failed on its connection — MySQL stopped, restarted or
/// cut off. Such a failure means the other connections in the pool may be
/// dead too, even those used a moment ago, so for
/// [`PING_ALL_AFTER_LINK_TROUBLE`] after it each one is pinged as it is
/// taken from the pool and a dead one is dropped instead of handed out.
/// (Measured: a burst that filled the pool, MySQL killed and back within
/// 0.7 s; without this, a request after MySQL was back still failed on a
/// connection last used just before the kill.) The ping costs a round trip
/// per query only in those seconds.
#[derive(Clone)]
struct LinkTrouble {
    epoch: Instant,
    /// Microseconds from `epoch` to the last failure; 0 = none yet.
    last_us: Arc<AtomicU64>,
}

impl LinkTrouble {
    fn new() -> Self {
        Self {
            epoch: Instant::now(),
            last_us: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Notes `error` if it is a failure of the connection itself.
    fn note(&self, error: &DbError) {
        if let DbError::Unavailable(Unavailable::Connection(_)) = error {
            let now = u64::try_from(self.epoch.elapsed().as_micros()).unwrap_or(u64::MAX);
            self.last_us.store(now.max(1), Ordering::Relaxed);
        }
    }

    fn recent(&self) -> bool {
        let last = self.last_us.load(Ordering::Relaxed);
        last != 0
            && self
                .epoch
                .elapsed()
                .saturating_sub(Duration::from_micros(last))
                < PING_ALL_AFTER_LINK_TROUBLE
    }
}

/// Schema migrations compiled into the binary (service-b/migrations).
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Why B could not get its database at start-up.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("MySQL not reachable after {after:?}")]
    Unreachable {
        after: Duration,
        #[source]
        source: DbError,
    },
    #[error("shutdown while waiting for MySQL")]
    Shutdown,
}

/// Why a database call failed, as far as callers care: each kind maps to
/// one gRPC code (see `grpc`), and its message (the gRPC message too)
/// names the limit that was hit.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database cannot be reached or did not answer in time: retryable.
    #[error(transparent)]
    Unavailable(#[from] Unavailable),
    /// Anything else (a bug, bad configuration or a schema mismatch).
    #[error(transparent)]
    Failed(#[from] Failure),
    /// The caller's deadline left no time for the query.
    #[error(transparent)]
    Deadline(#[from] DeadlineCut),
}

impl DbError {
    /// The kind in words, to put before the message where the gRPC code
    /// is not there to tell it (`/readyz`).
    pub fn kind(&self) -> &'static str {
        match self {
            DbError::Unavailable(_) => "MySQL unavailable",
            DbError::Failed(_) => "MySQL error",
            DbError::Deadline(_) => "deadline",
        }
    }

    /// A wait for a pooled connection that ran out of time.
    fn is_acquire_timeout(&self) -> bool {
        matches!(
            self,
            DbError::Unavailable(
                Unavailable::PoolExhausted { .. }
                    | Unavailable::NoConnection(_)
                    | Unavailable::Connection(sqlx::Error::PoolTimedOut)
            ) | DbError::Deadline(DeadlineCut::NoConnection(_))
        )
    }
}

/// MySQL could not serve the query in time; the caller may try again.
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// The connection failed or was lost. (The message carries sqlx's, so
    /// it is not also given as the source: a chain would say it twice.)
    #[error("MySQL connection failed: {0}")]
    Connection(sqlx::Error),
    /// Every pooled connection is busy (`leak-on-error` pins them for good).
    #[error(
        "MySQL pool exhausted: all {pool_max} connections in use, none free within \
         {acquire_timeout:?} (mysql.pool_max, mysql.acquire_timeout)"
    )]
    PoolExhausted {
        pool_max: u32,
        acquire_timeout: Duration,
    },
    /// The pool could not open or hand out a connection within the limit.
    #[error("no MySQL connection within {0:?} (mysql.acquire_timeout)")]
    NoConnection(Duration),
    /// The query ran past `mysql.query_timeout`.
    #[error("MySQL query did not finish within {0:?} (mysql.query_timeout)")]
    QueryTimeout(Duration),
    /// One start-up connection attempt ran out of `mysql.startup_timeout`.
    #[error("connecting did not finish within {0:?}")]
    ConnectTimeout(Duration),
    /// Another B kept the migration lock (see [`Db::migrate_and_seed`]).
    #[error("another instance held the schema lock for 60 s")]
    SchemaLocked,
}

/// A failure that trying again will not fix.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// MySQL refused the query or its result did not fit the row types.
    #[error(transparent)]
    Query(sqlx::Error),
    /// `mysql.url` does not parse as a MySQL URL.
    #[error("mysql.url does not parse")]
    Url(#[source] sqlx::Error),
    /// `mysql.url` lacks a part the lab needs to create the database.
    #[error("mysql.url {url:?} {problem}")]
    UrlShape { url: String, problem: &'static str },
    /// The database name is spliced into DDL, so it must be an identifier.
    #[error("mysql.url database {0:?} must be letters, digits and _")]
    DatabaseName(String),
    /// An embedded migration failed.
    #[error("migration failed")]
    Migration(#[source] sqlx::migrate::MigrateError),
    /// MySQL returned an insert id that does not fit the API's i64.
    #[error("job id out of range")]
    JobIdOutOfRange(#[source] std::num::TryFromIntError),
    /// A job row did not decode; `rows = leak-on-error` gave up the batch.
    #[error("a job row failed to decode")]
    RowDecode(#[source] sqlx::Error),
}

/// The caller's deadline cut the query short (or left no time to start it).
#[derive(Debug, thiserror::Error)]
pub enum DeadlineCut {
    #[error("no time left before the caller's deadline; query skipped")]
    NoTimeLeft,
    #[error("no MySQL connection before the caller's deadline ({0:?} left)")]
    NoConnection(Duration),
    #[error("query cut at the caller's deadline ({0:?} left)")]
    Query(Duration),
}

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        match e {
            E::Database(_)
            | E::RowNotFound
            | E::ColumnNotFound(_)
            | E::ColumnIndexOutOfBounds { .. }
            | E::ColumnDecode { .. }
            | E::Decode(_)
            | E::TypeNotFound { .. }
            | E::Migrate(_) => Failure::Query(e).into(),
            _ => Unavailable::Connection(e).into(),
        }
    }
}

/// A catalogue row.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ItemRow {
    pub id: i64,
    pub name: String,
    pub price_cents: i64,
    pub description: String,
}

/// A job row as `GetJob` shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct JobRow {
    pub id: i64,
    pub status: String,
    pub attempts: u32,
    pub payload: Vec<u8>,
    pub result: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// The pool plus the time bounds of every query.
#[derive(Clone)]
pub struct Db {
    pool: MySqlPool,
    query_timeout: Duration,
    acquire_timeout: Duration,
    pool_max: u32,
    /// B's live switches: `deadline` decides the [`PoolWait`] per query.
    faults: LiveFaults,
    metrics: PoolMetrics,
    link_trouble: LinkTrouble,
    /// For [`Db::mysql_accepts_connections`].
    probe: Arc<MysqlProbe>,
}

/// Logs in to MySQL on a connection of its own, at most once per
/// `mysql.acquire_timeout` for the whole pool (waiters in between share the
/// answer), and closes it properly. A full login, not a bare TCP connect:
/// MySQL counts a connection dropped mid-handshake against
/// `max_connect_errors` and, with name resolution on (the stock MySQL image),
/// blocks the host after 100, while a completed login resets the count.
struct MysqlProbe {
    options: MySqlConnectOptions,
    every: Duration,
    last: tokio::sync::Mutex<Option<(Instant, bool)>>,
}

impl MysqlProbe {
    async fn accepts(&self) -> bool {
        let mut last = self.last.lock().await;
        if let Some((at, accepted)) = *last
            && at.elapsed() < self.every
        {
            return accepted;
        }
        let accepted =
            match tokio::time::timeout(self.every, MySqlConnection::connect_with(&self.options))
                .await
            {
                Ok(Ok(conn)) => {
                    let _ = conn.close().await;
                    true
                }
                // Refused, reset, or turned away: MySQL does not answer.
                Ok(Err(_)) => false,
                // Slow but not refused: Go's dial, which has no timeout, would
                // still be waiting.
                Err(_) => true,
            };
        *last = Some((Instant::now(), accepted));
        accepted
    }
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("pool_max", &self.pool_max)
            .field("wait", &self.wait())
            .finish_non_exhaustive()
    }
}

/// The most job ids [`Db::claim`] leaves out through its `NOT IN (…)` list.
/// Each is one placeholder, and MySQL refuses a statement with more than
/// 65,535 of them, so the list must have a bound; 1,000 keeps each claim a
/// small statement. Above it the worker defers claiming (see
/// `worker::plan_claim`).
pub const CLAIM_SKIP_MAX: usize = 1_000;

/// MySQL's limit on placeholders in one prepared statement; the claim's
/// other binds are the visibility timeout and the limit.
const _: () = assert!(CLAIM_SKIP_MAX + 2 <= u16::MAX as usize);

impl Db {
    /// Connects, retrying while the server is still starting, for at most
    /// `mysql.startup_timeout` (or until `shutdown`). Attempts are 100 ms
    /// apart, doubling up to 1 s: MySQL usually comes up within seconds, and
    /// a B waiting for it has nothing else to do.
    pub async fn connect_with_retry(
        config: &MysqlConfig,
        faults: LiveFaults,
        metrics: PoolMetrics,
        shutdown: &CancellationToken,
    ) -> Result<Db, StartupError> {
        let deadline = Instant::now() + config.startup_timeout;
        let backoff = ExponentialBuilder::new()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(1))
            .without_max_times();
        let attempt = || async {
            // Each attempt is bounded too: a server that accepts connections
            // but stalls must not hang start-up past the budget.
            let left = deadline.saturating_duration_since(Instant::now());
            let connect = Db::connect(config, faults.clone(), metrics.clone());
            match tokio::time::timeout(left, connect).await {
                Ok(result) => result,
                Err(_) => Err(Unavailable::ConnectTimeout(config.startup_timeout).into()),
            }
        };
        let connecting = attempt
            .retry(backoff)
            .sleep(tokio::time::sleep)
            // No attempt starts past the start-up budget.
            .adjust(|_, delay| delay.filter(|d| Instant::now() + *d < deadline))
            .notify(|e, delay| {
                tracing::warn!(error = %e, retry_in = ?delay, "MySQL not reachable yet");
            });
        tokio::select! {
            result = connecting => result.map_err(|source| StartupError::Unreachable {
                after: config.startup_timeout,
                source,
            }),
            () = shutdown.cancelled() => Err(StartupError::Shutdown),
        }
    }

    /// One connection attempt (creating the database first if configured).
    pub async fn connect(
        config: &MysqlConfig,
        faults: LiveFaults,
        metrics: PoolMetrics,
    ) -> Result<Db, DbError> {
        let (server_url, database) = split_database(&config.url)?;
        if config.create_database {
            let options: MySqlConnectOptions = server_url.parse().map_err(Failure::Url)?;
            let admin = MySqlPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(config.acquire_timeout)
                .connect_with(options)
                .await?;
            let create = format!("CREATE DATABASE IF NOT EXISTS `{database}`");
            sqlx::query(AssertSqlSafe(create)).execute(&admin).await?;
            admin.close().await;
        }
        let options: MySqlConnectOptions = config.url.parse().map_err(Failure::Url)?;
        let probe = Arc::new(MysqlProbe {
            options: options.clone(),
            every: config.acquire_timeout,
            last: tokio::sync::Mutex::new(None),
        });
        let link_trouble = LinkTrouble::new();
        let pool = MySqlPoolOptions::new()
            .max_connections(config.pool_max)
            .acquire_timeout(config.acquire_timeout)
            .test_before_acquire(false)
            .before_acquire({
                let link_trouble = link_trouble.clone();
                move |conn, meta| {
                    let ping = meta.idle_for >= PING_IF_IDLE_FOR || link_trouble.recent();
                    Box::pin(async move {
                        if ping {
                            conn.ping().await?;
                        }
                        Ok(true)
                    })
                }
            })
            .connect_with(options)
            .await?;
        Ok(Db {
            pool,
            query_timeout: config.query_timeout,
            acquire_timeout: config.acquire_timeout,
            pool_max: config.pool_max,
            faults,
            metrics,
            link_trouble,
            probe,
        })
    }

    /// How long a query starting now waits for a free connection.
    fn wait(&self) -> PoolWait {
        PoolWait::for_deadline(self.faults.current().deadline)
    }

    /// Takes a connection from the pool, waiting for a free one as
    /// [`PoolWait`] says (see the module comment).
    pub async fn acquire(
        &self,
        deadline: Option<Instant>,
        purpose: Purpose,
    ) -> Result<Checkout, DbError> {
        let _waiting = GaugeGuard::new(&self.metrics.waiting);
        let started = Instant::now();
        let result = self.wait_for_connection(deadline).await;
        self.metrics.record(purpose, started, result)
    }

    async fn wait_for_connection(
        &self,
        deadline: Option<Instant>,
    ) -> Result<PoolConnection<MySql>, DbError> {
        match self.wait() {
            PoolWait::Bounded => {
                let budget = crate::deadline::remaining(deadline, self.acquire_timeout);
                if budget.is_zero() {
                    return Err(DeadlineCut::NoTimeLeft.into());
                }
                match tokio::time::timeout(budget, self.pool.acquire()).await {
                    Ok(Ok(conn)) => Ok(conn),
                    // The caller's deadline, not the pool's limit, cut the wait.
                    Ok(Err(sqlx::Error::PoolTimedOut)) | Err(_)
                        if budget < self.acquire_timeout =>
                    {
                        Err(DeadlineCut::NoConnection(budget).into())
                    }
                    Ok(Err(sqlx::Error::PoolTimedOut)) | Err(_) if self.at_max() => {
                        Err(self.exhausted_error())
                    }
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err(Unavailable::NoConnection(budget).into()),
                }
            }
            PoolWait::UntilFree => loop {
                match self.pool.acquire().await {
                    Ok(conn) => return Ok(conn),
                    // No connection within sqlx's acquire timeout, and the
                    // pool is at its maximum (all busy) or MySQL takes
                    // connections (new ones are just slow to open, e.g. on a
                    // starved B): wait on, as Go does, whose pool has no
                    // acquire timeout and whose dial has none either (each
                    // retry joins the back of sqlx's queue again). Giving up
                    // below the maximum whatever the cause turned a buggy
                    // B's pool into fast UNAVAILABLEs, the signature of the
                    // fixed form: a blind diagnosis saw calls fail at 0.75 s
                    // and could not tell the deadline was ignored.
                    // A flip to `propagate` meanwhile ends the wait here.
                    Err(sqlx::Error::PoolTimedOut)
                        if self.at_max() || self.mysql_accepts_connections().await =>
                    {
                        if self.wait() == PoolWait::Bounded {
                            return Err(if self.at_max() {
                                self.exhausted_error()
                            } else {
                                Unavailable::NoConnection(self.acquire_timeout).into()
                            });
                        }
                    }
                    // Below the maximum and MySQL refuses connections: it is
                    // down, and that error returns, as Go's dial error does.
                    Err(e) => return Err(e.into()),
                }
            },
        }
    }

    /// Whether MySQL takes a new connection: what Go's dial would find.
    /// Asked only when a wait below the pool's maximum timed out, to tell a
    /// MySQL that is down (refused: give up) from one that is slow to hand
    /// out a connection (wait on). See [`MysqlProbe`].
    async fn mysql_accepts_connections(&self) -> bool {
        self.probe.accepts().await
    }

    /// The pool has opened every connection it may (idle or not).
    fn at_max(&self) -> bool {
        self.pool.size() >= self.pool_max
    }

    /// What an exhausted pool answers.
    fn exhausted_error(&self) -> DbError {
        Unavailable::PoolExhausted {
            pool_max: self.pool_max,
            acquire_timeout: self.acquire_timeout,
        }
        .into()
    }

    /// Applies pending migrations and seeds `items` 1..=seed_items.
    ///
    /// Several B instances start at once, so this runs under a named MySQL
    /// lock on one connection. (sqlx's own migration lock asks for
    /// `GET_LOCK(…, -1)`, which MariaDB does not treat as "wait forever": two
    /// instances then race and one fails on a duplicate migration row.)
    pub async fn migrate_and_seed(&self, item_count: u32) -> Result<(), DbError> {
        let mut conn = self.pool.acquire().await?;
        let locked: Option<i64> = sqlx::query_scalar("SELECT GET_LOCK('lab_schema', 60)")
            .fetch_one(&mut *conn)
            .await?;
        if locked != Some(1) {
            return Err(Unavailable::SchemaLocked.into());
        }
        let result = async {
            MIGRATOR.run(&mut *conn).await.map_err(Failure::Migration)?;
            seed_items(&mut conn, item_count).await
        }
        .await;
        let _ = sqlx::query("SELECT RELEASE_LOCK('lab_schema')")
            .execute(&mut *conn)
            .await;
        result
    }

    /// `SELECT 1` within the query timeout: the `/readyz` probe. It never
    /// waits longer than `mysql.acquire_timeout` for a connection, whatever
    /// [`PoolWait`] says, and names an exhausted pool.
    pub async fn ping(&self) -> Result<(), DbError> {
        let started = Instant::now();
        let result = match tokio::time::timeout(self.acquire_timeout, self.pool.acquire()).await {
            Ok(Ok(conn)) => Ok(conn),
            Ok(Err(sqlx::Error::PoolTimedOut)) | Err(_) if self.at_max() => {
                Err(self.exhausted_error())
            }
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(Unavailable::NoConnection(self.acquire_timeout).into()),
        };
        let mut conn = self.metrics.record(Purpose::Probe, started, result)?;
        self.bounded(sqlx::query("SELECT 1").execute(&mut *conn))
            .await
            .map(|_| ())
    }

    pub async fn get_item(
        &self,
        id: i64,
        deadline: Option<Instant>,
    ) -> Result<Option<ItemRow>, DbError> {
        let mut conn = self.acquire(deadline, Purpose::Request).await?;
        self.within(
            deadline,
            sqlx::query_as::<_, ItemRow>(
                "SELECT id, name, price_cents, description FROM items WHERE id = ?",
            )
            .bind(id)
            .fetch_optional(&mut *conn),
        )
        .await
    }

    /// Inserts a pending job; `traceparent` is the submitting request's
    /// trace context, which the job's span continues.
    pub async fn insert_job(
        &self,
        payload: &[u8],
        traceparent: Option<&str>,
        deadline: Option<Instant>,
    ) -> Result<i64, DbError> {
        let mut conn = self.acquire(deadline, Purpose::Request).await?;
        let done = self
            .within(
                deadline,
                sqlx::query("INSERT INTO jobs (payload, traceparent) VALUES (?, ?)")
                    .bind(payload)
                    .bind(traceparent)
                    .execute(&mut *conn),
            )
            .await?;
        i64::try_from(done.last_insert_id()).map_err(|e| Failure::JobIdOutOfRange(e).into())
    }

    pub async fn get_job(
        &self,
        id: i64,
        deadline: Option<Instant>,
    ) -> Result<Option<JobRow>, DbError> {
        let mut conn = self.acquire(deadline, Purpose::Request).await?;
        self.within(
            deadline,
            sqlx::query_as::<_, JobRow>(
                "SELECT id, status, attempts, payload, result, \
                 CAST(UNIX_TIMESTAMP(created_at) * 1000 AS SIGNED) AS created_at_ms, \
                 CAST(UNIX_TIMESTAMP(updated_at) * 1000 AS SIGNED) AS updated_at_ms \
                 FROM jobs WHERE id = ?",
            )
            .bind(id)
            .fetch_optional(&mut *conn),
        )
        .await
    }

    // ----- the job worker's queries (see `worker` and `rows`) -----

    /// Records that an attempt started (attempts + 1), without claiming.
    /// Returns the attempt number.
    pub async fn start_attempt(&self, id: i64, instance: &str) -> Result<u32, DbError> {
        let mut conn = self.acquire(None, Purpose::Job).await?;
        self.bounded(
            sqlx::query(
                "UPDATE jobs SET attempts = attempts + 1, claimed_by = ?, claimed_at = NOW(3) \
                 WHERE id = ?",
            )
            .bind(instance)
            .bind(id)
            .execute(&mut *conn),
        )
        .await?;
        let attempts: u32 = self
            .bounded(
                sqlx::query_scalar("SELECT attempts FROM jobs WHERE id = ?")
                    .bind(id)
                    .fetch_one(&mut *conn),
            )
            .await?;
        Ok(attempts)
    }

    /// `bounded`: atomically claims up to `limit` jobs — running ones whose
    /// claim is older than `visibility` (their B died) first, then pending
    /// ones whose retry time has come, oldest first (one SELECT each, see
    /// [`claim_select`]) — and returns their ids. `FOR UPDATE SKIP
    /// LOCKED` lets several Bs claim side by side without ever taking the
    /// same row. The rows themselves are read afterwards, through [`crate::rows`].
    /// `skip`: jobs this B still runs in tasks of a loop a flip replaced
    /// (they are `pending`, unclaimed, if that loop was `unbounded`); one
    /// bind each, so the caller keeps it within [`CLAIM_SKIP_MAX`].
    pub async fn claim(
        &self,
        limit: u32,
        instance: &str,
        visibility: Duration,
        max_attempts: u32,
        skip: &[i64],
    ) -> Result<Vec<i64>, DbError> {
        let mut conn = self.acquire(None, Purpose::Job).await?;
        let claim = async {
            // READ COMMITTED: the claim locks only the rows it takes, no gap
            // locks, so it neither blocks nor deadlocks with new inserts.
            sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                .execute(&mut *conn)
                .await?;
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            fail_abandoned_claims("", max_attempts, visibility)
                .build()
                .execute(&mut *tx)
                .await?;
            let mut ids: Vec<i64> =
                claim_select("", Claimable::Expired { visibility }, skip, limit)
                    .build_query_scalar()
                    .fetch_all(&mut *tx)
                    .await?;
            let more = limit.saturating_sub(u32::try_from(ids.len()).unwrap_or(limit));
            if more > 0 {
                let pending: Vec<i64> = claim_select("", Claimable::Pending, skip, more)
                    .build_query_scalar()
                    .fetch_all(&mut *tx)
                    .await?;
                ids.extend(pending);
            }
            if !ids.is_empty() {
                claim_update("", instance, &ids)
                    .build()
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(ids)
        };
        self.bounded(claim).await
    }

    /// Writes a job's outcome. With `fence = Some(attempt)` only the holder
    /// of that attempt may write (a reclaimed job's old owner cannot
    /// overwrite the new one); returns whether the row was written. A job
    /// set back to `pending` with `retry_after` is not claimed before then.
    pub async fn finish_job(
        &self,
        id: i64,
        fence: Option<u32>,
        status: &str,
        result: Option<&str>,
        error: Option<&str>,
        retry_after: Option<Duration>,
    ) -> Result<bool, DbError> {
        let retry_us = retry_after.map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
        let query = match fence {
            Some(attempt) => sqlx::query(
                "UPDATE jobs SET status = ?, result = ?, last_error = ?, \
                 claimed_by = IF(? = 'pending', NULL, claimed_by), \
                 not_before = IF(? IS NULL, NULL, NOW(3) + INTERVAL ? MICROSECOND) \
                 WHERE id = ? AND attempts = ? AND status = 'running'",
            )
            .bind(status)
            .bind(result)
            .bind(error)
            .bind(status)
            .bind(retry_us)
            .bind(retry_us)
            .bind(id)
            .bind(attempt),
            None => {
                sqlx::query("UPDATE jobs SET status = ?, result = ?, last_error = ? WHERE id = ?")
                    .bind(status)
                    .bind(result)
                    .bind(error)
                    .bind(id)
            }
        };
        let mut conn = self.acquire(None, Purpose::Job).await?;
        let done = self.bounded(query.execute(&mut *conn)).await?;
        Ok(done.rows_affected() > 0)
    }

    /// Pool gauges for `/metrics`: (open connections, idle connections).
    pub fn pool_stats(&self) -> (u32, usize) {
        (self.pool.size(), self.pool.num_idle())
    }

    pub(crate) async fn bounded<T>(
        &self,
        query: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, DbError> {
        self.within(None, query).await
    }

    /// Runs `query` within `mysql.query_timeout` and, when the caller has a
    /// deadline, within what is left of it (the budget forwarded downstream).
    pub(crate) async fn within<T>(
        &self,
        deadline: Option<Instant>,
        query: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, DbError> {
        let budget = crate::deadline::remaining(deadline, self.query_timeout);
        if budget.is_zero() {
            return Err(DeadlineCut::NoTimeLeft.into());
        }
        match tokio::time::timeout(budget, query).await {
            Ok(result) => result.map_err(|e| {
                let error = DbError::from(e);
                self.link_trouble.note(&error);
                error
            }),
            Err(_) if budget < self.query_timeout => Err(DeadlineCut::Query(budget).into()),
            Err(_) => Err(Unavailable::QueryTimeout(self.query_timeout).into()),
        }
    }
}

// ----- the claim's statements, one builder each -----
//
// Public so that `labctl bench jobs` runs EXPLAIN (`head` = "EXPLAIN ") on
// the very text and binds [`Db::claim`] sends, not on a copy that could
// drift from it.

/// The claim's first statement: a stale claim (older than `visibility`)
/// that already used every attempt — its job keeps killing or stalling its
/// B — is failed, not retried forever.
pub fn fail_abandoned_claims(
    head: &str,
    max_attempts: u32,
    visibility: Duration,
) -> QueryBuilder<MySql> {
    let mut update = QueryBuilder::new(head);
    update.push(
        "UPDATE jobs SET status = 'failed', \
         last_error = CONCAT('abandoned by ', COALESCE(claimed_by, '?'), \
         ' after ', attempts, ' attempts (worker.max_attempts)') \
         WHERE status = 'running' AND attempts >= ",
    );
    update.push_bind(max_attempts);
    update.push(" AND claimed_at < NOW(3) - INTERVAL ");
    update.push_bind(micros(visibility));
    update.push(" MICROSECOND");
    update
}

/// Which claimable jobs a claim SELECT looks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claimable {
    /// `running` jobs whose claim is older than the visibility timeout
    /// (their B died): taken back first, they are the oldest work there is.
    Expired { visibility: Duration },
    /// `pending` jobs whose retry time (`not_before`) has come.
    Pending,
}

/// A claim SELECT: up to `limit` ids of `which` jobs, oldest first,
/// leaving out `skip`; `FOR UPDATE SKIP LOCKED`, so Bs claiming side by
/// side never take the same row.
///
/// Each SELECT asks for one `status`, so `jobs_status_id (status, id)`
/// hands it its rows already in id order and it stops after `limit`
/// (plus the rows it skips: retries not yet due, rows other Bs hold). One
/// SELECT for both kinds (`status = 'pending' … OR status = 'running' …
/// ORDER BY id`) cannot be read in order from that index: MariaDB either
/// sorts every pending and running row, or — once pending rows are a few
/// percent of the table, i.e. when the worker falls behind — walks the
/// primary key from the oldest job and reads the whole `done` history
/// before the first pending one (`labctl bench jobs`: 0.9 s and 900 k
/// rows per claim at 1 M rows with 10 % pending). No index fixes that
/// plan; asking for one status at a time does.
pub fn claim_select(head: &str, which: Claimable, skip: &[i64], limit: u32) -> QueryBuilder<MySql> {
    let mut select = QueryBuilder::new(head);
    match which {
        Claimable::Expired { visibility } => {
            select.push(
                "SELECT id FROM jobs WHERE status = 'running' \
                 AND claimed_at < NOW(3) - INTERVAL ",
            );
            select.push_bind(micros(visibility));
            select.push(" MICROSECOND");
        }
        Claimable::Pending => {
            select.push(
                "SELECT id FROM jobs WHERE status = 'pending' \
                 AND (not_before IS NULL OR not_before <= NOW(3))",
            );
        }
    }
    if !skip.is_empty() {
        select.push(" AND id NOT IN (");
        let mut list = select.separated(", ");
        for id in skip {
            list.push_bind(*id);
        }
        list.push_unseparated(")");
    }
    select.push(" ORDER BY id LIMIT ");
    select.push_bind(limit);
    select.push(" FOR UPDATE SKIP LOCKED");
    select
}

/// The claim's last statement: the selected jobs become `running` under
/// `instance`, one more attempt each.
pub fn claim_update(head: &str, instance: &str, ids: &[i64]) -> QueryBuilder<MySql> {
    let mut update = QueryBuilder::new(head);
    update.push(
        "UPDATE jobs SET status = 'running', attempts = attempts + 1, \
         not_before = NULL, claimed_by = ",
    );
    update.push_bind(instance);
    update.push(", claimed_at = NOW(3) WHERE id IN (");
    let mut list = update.separated(", ");
    for id in ids {
        list.push_bind(*id);
    }
    list.push_unseparated(")");
    update
}

/// One statement of [`Db::claim`], built for a look at its plan.
pub struct ClaimStatement {
    /// What it does, in a few words.
    pub what: &'static str,
    pub query: QueryBuilder<MySql>,
}

/// Every statement [`Db::claim`] sends, in order, each after `head` (e.g.
/// `"EXPLAIN "`), with the binds a claim of `limit` jobs would send and no
/// skip list; `claimed` stands for the ids the SELECT returned.
pub fn claim_statements(
    head: &str,
    limit: u32,
    visibility: Duration,
    max_attempts: u32,
    claimed: &[i64],
) -> Vec<ClaimStatement> {
    vec![
        ClaimStatement {
            what: "fail abandoned claims",
            query: fail_abandoned_claims(head, max_attempts, visibility),
        },
        ClaimStatement {
            what: "select expired claims",
            query: claim_select(head, Claimable::Expired { visibility }, &[], limit),
        },
        ClaimStatement {
            what: "select pending jobs",
            query: claim_select(head, Claimable::Pending, &[], limit),
        },
        ClaimStatement {
            what: "mark them running",
            query: claim_update(head, "bench", claimed),
        },
    ]
}

/// A duration as the whole microseconds MySQL's `INTERVAL … MICROSECOND` takes.
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// Makes sure items 1..=count exist. Idempotent (`INSERT IGNORE`).
async fn seed_items(conn: &mut MySqlConnection, count: u32) -> Result<(), DbError> {
    let present: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM items WHERE id <= ?")
        .bind(i64::from(count))
        .fetch_one(&mut *conn)
        .await?;
    if present >= i64::from(count) {
        return Ok(());
    }
    const BATCH: u32 = 1000;
    let mut start = 1;
    while start <= count {
        let end = (start + BATCH - 1).min(count);
        let mut insert: QueryBuilder<MySql> =
            QueryBuilder::new("INSERT IGNORE INTO items (id, name, price_cents, description) ");
        insert.push_values(start..=end, |mut row, id| {
            let id = i64::from(id);
            row.push_bind(id)
                .push_bind(format!("item-{id}"))
                .push_bind((id * 7919) % 100_000)
                .push_bind(format!("Seeded catalogue item number {id}."));
        });
        insert.build().execute(&mut *conn).await?;
        start = end + 1;
    }
    tracing::info!(count, "items seeded");
    Ok(())
}

/// `mysql://u:p@h:1/lab?x=y` → (`mysql://u:p@h:1/?x=y`, `lab`), checking that
/// the database name is a plain identifier (it is spliced into DDL).
fn split_database(url: &str) -> Result<(String, String), DbError> {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (url, None),
    };
    let Some(scheme_end) = base.find("://") else {
        return Err(Failure::UrlShape {
            url: lab_common::config::redacted_url(url),
            problem: "has no scheme",
        }
        .into());
    };
    let Some((server, database)) = base[scheme_end + 3..].rsplit_once('/') else {
        return Err(Failure::UrlShape {
            url: lab_common::config::redacted_url(url),
            problem: "names no database (…/DATABASE)",
        }
        .into());
    };
    if database.is_empty()
        || !database
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(Failure::DatabaseName(database.to_owned()).into());
    }
    let mut server_url = format!("{}{server}/", &base[..scheme_end + 3]);
    if let Some(q) = query {
        server_url.push('?');
        server_url.push_str(q);
    }
    Ok((server_url, database.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection held long (a leak) shows as the oldest checkout's age;
    /// ones that come back leave no trace.
    #[tokio::test(start_paused = true)]
    async fn checkouts_count_by_purpose_and_age_the_oldest() {
        let checkouts = Checkouts::default();
        assert_eq!(checkouts.snapshot(), ([0, 0, 0], Duration::ZERO));
        let leaked = checkouts.open(Purpose::Job);
        tokio::time::advance(Duration::from_secs(30)).await;
        let busy = checkouts.open(Purpose::Request);
        let probe = checkouts.open(Purpose::Probe);
        tokio::time::advance(Duration::from_millis(5)).await;
        let (in_use, oldest) = checkouts.snapshot();
        assert_eq!(in_use, [1, 1, 1]);
        assert_eq!(oldest, Duration::from_millis(30_005));
        drop((busy, probe));
        assert_eq!(
            checkouts.snapshot(),
            ([0, 1, 0], Duration::from_millis(30_005))
        );
        drop(leaked);
        assert_eq!(checkouts.snapshot(), ([0, 0, 0], Duration::ZERO));
    }

    #[test]
    fn only_waits_that_ran_out_of_time_count_as_acquire_timeouts() {
        let timeouts: [DbError; 4] = [
            Unavailable::PoolExhausted {
                pool_max: 4,
                acquire_timeout: Duration::from_millis(500),
            }
            .into(),
            Unavailable::NoConnection(Duration::from_millis(500)).into(),
            Unavailable::Connection(sqlx::Error::PoolTimedOut).into(),
            DeadlineCut::NoConnection(Duration::from_millis(20)).into(),
        ];
        assert!(timeouts.iter().all(DbError::is_acquire_timeout));
        let others: [DbError; 3] = [
            Unavailable::QueryTimeout(Duration::from_secs(1)).into(),
            Unavailable::Connection(sqlx::Error::PoolClosed).into(),
            DeadlineCut::NoTimeLeft.into(),
        ];
        assert!(!others.iter().any(DbError::is_acquire_timeout));
    }

    #[test]
    fn errors_name_each_cause_once() {
        let exhausted: DbError = Unavailable::PoolExhausted {
            pool_max: 4,
            acquire_timeout: Duration::from_millis(500),
        }
        .into();
        assert_eq!(
            exhausted.to_string(),
            "MySQL pool exhausted: all 4 connections in use, none free within 500ms \
             (mysql.pool_max, mysql.acquire_timeout)"
        );
        assert_eq!(exhausted.kind(), "MySQL unavailable");
        let startup = StartupError::Unreachable {
            after: Duration::from_secs(30),
            source: Unavailable::ConnectTimeout(Duration::from_secs(30)).into(),
        };
        assert_eq!(
            format!("{:#}", anyhow::Error::new(startup)),
            "MySQL not reachable after 30s: connecting did not finish within 30s"
        );
    }

    #[test]
    fn database_is_split_off_the_url() {
        let (server, db) = split_database("mysql://lab:lab@127.0.0.1:3306/lab_1?ssl-mode=disabled")
            .expect("valid");
        assert_eq!(server, "mysql://lab:lab@127.0.0.1:3306/?ssl-mode=disabled");
        assert_eq!(db, "lab_1");
    }

    #[test]
    fn unsafe_database_names_are_refused() {
        assert!(split_database("mysql://h/lab`; DROP").is_err());
        assert!(split_database("mysql://h/").is_err());
        assert!(split_database("nonsense").is_err());
    }
}
