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
//!   cannot be reached still fails, after `mysql.acquire_timeout` (sqlx
//!   retries a refused connection until then; Go returns the dial error),
//!   unless the pool was exhausted when it went away.

use std::{future::Future, time::Duration};

use lab_common::config::{DeadlineMode, MysqlConfig};
use prometheus::{IntGauge, Opts, Registry};
use sqlx::{
    AssertSqlSafe, MySql, QueryBuilder,
    mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions},
    pool::PoolConnection,
};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

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

/// `lab_db_acquire_waiting`: queries waiting for a free pooled connection
/// right now — the hung requests of an exhausted pool under `UntilFree`.
#[derive(Clone)]
pub struct PoolMetrics {
    waiting: IntGauge,
}

impl PoolMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let waiting = IntGauge::with_opts(Opts::new(
            "lab_db_acquire_waiting",
            "Queries waiting for a free MySQL pool connection right now.",
        ))?;
        registry.register(Box::new(waiting.clone()))?;
        Ok(Self { waiting })
    }
}

/// Decrements the waiting gauge however the wait ends.
struct Waiting<'a>(&'a IntGauge);

impl<'a> Waiting<'a> {
    fn start(gauge: &'a IntGauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Schema migrations compiled into the binary (service-b/migrations).
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Why a database call failed, as far as callers care.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The database cannot be reached or did not answer in time: retryable.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// Anything else (a bug or a schema mismatch).
    #[error("database error: {0}")]
    Other(String),
    /// The caller's deadline left no time for the query.
    #[error("{0}")]
    Deadline(String),
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
            | E::Migrate(_) => DbError::Other(e.to_string()),
            _ => DbError::Unavailable(e.to_string()),
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
    wait: PoolWait,
    metrics: PoolMetrics,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("pool_max", &self.pool_max)
            .field("wait", &self.wait)
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Connects, retrying while the server is still starting, for at most
    /// `mysql.startup_timeout` (or until `shutdown`).
    pub async fn connect_with_retry(
        config: &MysqlConfig,
        wait: PoolWait,
        metrics: PoolMetrics,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Db> {
        let deadline = tokio::time::Instant::now() + config.startup_timeout;
        let mut backoff = Duration::from_millis(100);
        loop {
            // Each attempt is bounded too: a server that accepts connections
            // but stalls must not hang start-up past the budget.
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let attempt = match tokio::time::timeout(
                left,
                Db::connect(config, wait, metrics.clone()),
            )
            .await
            {
                Ok(result) => result,
                Err(_) => Err(DbError::Unavailable(format!(
                    "connecting did not finish within {:?}",
                    config.startup_timeout
                ))),
            };
            match attempt {
                Ok(db) => return Ok(db),
                Err(e) if tokio::time::Instant::now() + backoff < deadline => {
                    tracing::warn!(error = %e, retry_in = ?backoff, "MySQL not reachable yet");
                }
                Err(e) => {
                    anyhow::bail!(
                        "MySQL not reachable after {:?}: {e}",
                        config.startup_timeout
                    )
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => {}
                _ = shutdown.cancelled() => anyhow::bail!("shutdown while waiting for MySQL"),
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One connection attempt (creating the database first if configured).
    pub async fn connect(
        config: &MysqlConfig,
        wait: PoolWait,
        metrics: PoolMetrics,
    ) -> Result<Db, DbError> {
        let (server_url, database) = split_database(&config.url)?;
        if config.create_database {
            let options: MySqlConnectOptions = server_url
                .parse()
                .map_err(|e: sqlx::Error| DbError::Other(format!("mysql.url: {e}")))?;
            let admin = MySqlPoolOptions::new()
                .max_connections(1)
                .acquire_timeout(config.acquire_timeout)
                .connect_with(options)
                .await?;
            let create = format!("CREATE DATABASE IF NOT EXISTS `{database}`");
            sqlx::query(AssertSqlSafe(create)).execute(&admin).await?;
            admin.close().await;
        }
        let options: MySqlConnectOptions = config
            .url
            .parse()
            .map_err(|e: sqlx::Error| DbError::Other(format!("mysql.url: {e}")))?;
        let pool = MySqlPoolOptions::new()
            .max_connections(config.pool_max)
            .acquire_timeout(config.acquire_timeout)
            .connect_with(options)
            .await?;
        Ok(Db {
            pool,
            query_timeout: config.query_timeout,
            acquire_timeout: config.acquire_timeout,
            pool_max: config.pool_max,
            wait,
            metrics,
        })
    }

    /// Takes a connection from the pool, waiting for a free one as
    /// [`PoolWait`] says (see the module comment).
    pub async fn acquire(
        &self,
        deadline: Option<Instant>,
    ) -> Result<PoolConnection<MySql>, DbError> {
        let _waiting = Waiting::start(&self.metrics.waiting);
        match self.wait {
            PoolWait::Bounded => {
                let budget = crate::deadline::remaining(deadline, self.acquire_timeout);
                if budget.is_zero() {
                    return Err(DbError::Deadline(
                        "no time left before the caller's deadline; query skipped".into(),
                    ));
                }
                match tokio::time::timeout(budget, self.pool.acquire()).await {
                    Ok(Ok(conn)) => Ok(conn),
                    // The caller's deadline, not the pool's limit, cut the wait.
                    Ok(Err(sqlx::Error::PoolTimedOut)) | Err(_)
                        if budget < self.acquire_timeout =>
                    {
                        Err(DbError::Deadline(format!(
                            "no MySQL connection before the caller's deadline ({budget:?} left)"
                        )))
                    }
                    Ok(Err(sqlx::Error::PoolTimedOut)) | Err(_) if self.at_max() => {
                        Err(self.exhausted_error())
                    }
                    Ok(Err(e)) => Err(e.into()),
                    Err(_) => Err(DbError::Unavailable(format!(
                        "no MySQL connection within {budget:?} (mysql.acquire_timeout)"
                    ))),
                }
            }
            PoolWait::UntilFree => loop {
                match self.pool.acquire().await {
                    Ok(conn) => return Ok(conn),
                    // The pool has opened every connection it may and none
                    // came free in time: wait on, as Go does (each retry
                    // joins the back of sqlx's queue again). Below the
                    // maximum, a timeout means new connections fail — MySQL
                    // is down — and that error returns, as Go's dial error
                    // does. (With MySQL down, idle connections fail sqlx's
                    // test before acquire and are closed, so the size drops.)
                    Err(sqlx::Error::PoolTimedOut) if self.at_max() => continue,
                    Err(e) => return Err(e.into()),
                }
            },
        }
    }

    /// The pool has opened every connection it may (idle or not).
    fn at_max(&self) -> bool {
        self.pool.size() >= self.pool_max
    }

    /// What an exhausted pool answers.
    fn exhausted_error(&self) -> DbError {
        DbError::Unavailable(format!(
            "MySQL pool exhausted: all {} connections in use, none free within {:?} \
             (mysql.pool_max, mysql.acquire_timeout)",
            self.pool_max, self.acquire_timeout
        ))
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
            return Err(DbError::Unavailable(
                "another instance held the schema lock for 60 s".into(),
            ));
        }
        let result = async {
            MIGRATOR
                .run(&mut *conn)
                .await
                .map_err(|e| DbError::Other(format!("migration failed: {e}")))?;
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
        let mut conn = match tokio::time::timeout(self.acquire_timeout, self.pool.acquire()).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(sqlx::Error::PoolTimedOut)) | Err(_) if self.at_max() => {
                return Err(self.exhausted_error());
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_) => {
                return Err(DbError::Unavailable(format!(
                    "no MySQL connection within {:?} (mysql.acquire_timeout)",
                    self.acquire_timeout
                )));
            }
        };
        self.bounded(sqlx::query("SELECT 1").execute(&mut *conn))
            .await
            .map(|_| ())
    }

    pub async fn get_item(
        &self,
        id: i64,
        deadline: Option<Instant>,
    ) -> Result<Option<ItemRow>, DbError> {
        let mut conn = self.acquire(deadline).await?;
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

    pub async fn insert_job(
        &self,
        payload: &[u8],
        deadline: Option<Instant>,
    ) -> Result<i64, DbError> {
        let mut conn = self.acquire(deadline).await?;
        let done = self
            .within(
                deadline,
                sqlx::query("INSERT INTO jobs (payload) VALUES (?)")
                    .bind(payload)
                    .execute(&mut *conn),
            )
            .await?;
        i64::try_from(done.last_insert_id())
            .map_err(|_| DbError::Other("job id out of range".into()))
    }

    pub async fn get_job(
        &self,
        id: i64,
        deadline: Option<Instant>,
    ) -> Result<Option<JobRow>, DbError> {
        let mut conn = self.acquire(deadline).await?;
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
        let mut conn = self.acquire(None).await?;
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

    /// `bounded`: atomically claims up to `limit` jobs — pending ones whose
    /// retry time has come, and running ones whose claim is older than
    /// `visibility` (their B died) — and returns their ids. `FOR UPDATE SKIP
    /// LOCKED` lets several Bs claim side by side without ever taking the
    /// same row. The rows themselves are read afterwards, through [`crate::rows`].
    pub async fn claim(
        &self,
        limit: u32,
        instance: &str,
        visibility: Duration,
        max_attempts: u32,
    ) -> Result<Vec<i64>, DbError> {
        let visibility_us = i64::try_from(visibility.as_micros()).unwrap_or(i64::MAX);
        let mut conn = self.acquire(None).await?;
        let claim = async {
            // READ COMMITTED: the claim locks only the rows it takes, no gap
            // locks, so it neither blocks nor deadlocks with new inserts.
            sqlx::query("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                .execute(&mut *conn)
                .await?;
            let mut tx = sqlx::Connection::begin(&mut *conn).await?;
            // A stale claim that already used every attempt (its job keeps
            // killing or stalling its B) is failed, not retried forever.
            sqlx::query(
                "UPDATE jobs SET status = 'failed', \
                 last_error = CONCAT('abandoned by ', COALESCE(claimed_by, '?'), \
                 ' after ', attempts, ' attempts (worker.max_attempts)') \
                 WHERE status = 'running' AND attempts >= ? \
                   AND claimed_at < NOW(3) - INTERVAL ? MICROSECOND",
            )
            .bind(max_attempts)
            .bind(visibility_us)
            .execute(&mut *tx)
            .await?;
            let ids: Vec<i64> = sqlx::query_scalar(
                "SELECT id FROM jobs \
                 WHERE (status = 'pending' AND (not_before IS NULL OR not_before <= NOW(3))) \
                    OR (status = 'running' AND claimed_at < NOW(3) - INTERVAL ? MICROSECOND) \
                 ORDER BY id LIMIT ? FOR UPDATE SKIP LOCKED",
            )
            .bind(visibility_us)
            .bind(limit)
            .fetch_all(&mut *tx)
            .await?;
            if !ids.is_empty() {
                let mut update: QueryBuilder<MySql> = QueryBuilder::new(
                    "UPDATE jobs SET status = 'running', attempts = attempts + 1, \
                     not_before = NULL, claimed_by = ",
                );
                update.push_bind(instance);
                update.push(", claimed_at = NOW(3) WHERE id IN (");
                let mut list = update.separated(", ");
                for id in &ids {
                    list.push_bind(*id);
                }
                list.push_unseparated(")");
                update.build().execute(&mut *tx).await?;
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
        let mut conn = self.acquire(None).await?;
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
            return Err(DbError::Deadline(
                "no time left before the caller's deadline; query skipped".into(),
            ));
        }
        match tokio::time::timeout(budget, query).await {
            Ok(result) => result.map_err(DbError::from),
            Err(_) if budget < self.query_timeout => Err(DbError::Deadline(format!(
                "query cut at the caller's deadline ({budget:?} left)"
            ))),
            Err(_) => Err(DbError::Unavailable(format!(
                "query did not finish within {:?}",
                self.query_timeout
            ))),
        }
    }
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
        return Err(DbError::Other(format!("mysql.url {url:?} has no scheme")));
    };
    let Some((server, database)) = base[scheme_end + 3..].rsplit_once('/') else {
        return Err(DbError::Other(format!(
            "mysql.url {url:?} names no database (…/DATABASE)"
        )));
    };
    if database.is_empty()
        || !database
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        return Err(DbError::Other(format!(
            "mysql.url database {database:?} must be letters, digits and _"
        )));
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
