//! MySQL access: pool, embedded migrations, seeding and the queries behind
//! the gRPC methods.
//!
//! Every query is bounded twice: waiting for a pooled connection by
//! `mysql.acquire_timeout`, and the query itself by `mysql.query_timeout`.
//! A database that is down or hung therefore turns into a fast UNAVAILABLE,
//! never into a request that hangs until the caller's deadline.

use std::{future::Future, time::Duration};

use lab_common::config::MysqlConfig;
use sqlx::{
    AssertSqlSafe, MySql, QueryBuilder,
    mysql::{MySqlConnectOptions, MySqlConnection, MySqlPool, MySqlPoolOptions},
};
use tokio_util::sync::CancellationToken;

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

/// The pool plus the per-query time bound.
#[derive(Debug, Clone)]
pub struct Db {
    pool: MySqlPool,
    query_timeout: Duration,
}

impl Db {
    /// Connects, retrying while the server is still starting, for at most
    /// `mysql.startup_timeout` (or until `shutdown`).
    pub async fn connect_with_retry(
        config: &MysqlConfig,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Db> {
        let deadline = tokio::time::Instant::now() + config.startup_timeout;
        let mut backoff = Duration::from_millis(100);
        loop {
            match Db::connect(config).await {
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
    pub async fn connect(config: &MysqlConfig) -> Result<Db, DbError> {
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
        })
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

    /// `SELECT 1` within the query timeout: the `/readyz` probe.
    pub async fn ping(&self) -> Result<(), DbError> {
        self.bounded(sqlx::query("SELECT 1").execute(&self.pool))
            .await
            .map(|_| ())
    }

    pub async fn get_item(&self, id: i64) -> Result<Option<ItemRow>, DbError> {
        self.bounded(
            sqlx::query_as::<_, ItemRow>(
                "SELECT id, name, price_cents, description FROM items WHERE id = ?",
            )
            .bind(id)
            .fetch_optional(&self.pool),
        )
        .await
    }

    pub async fn insert_job(&self, payload: &[u8]) -> Result<i64, DbError> {
        let done = self
            .bounded(
                sqlx::query("INSERT INTO jobs (payload) VALUES (?)")
                    .bind(payload)
                    .execute(&self.pool),
            )
            .await?;
        i64::try_from(done.last_insert_id())
            .map_err(|_| DbError::Other("job id out of range".into()))
    }

    pub async fn get_job(&self, id: i64) -> Result<Option<JobRow>, DbError> {
        self.bounded(
            sqlx::query_as::<_, JobRow>(
                "SELECT id, status, attempts, payload, result, \
                 CAST(UNIX_TIMESTAMP(created_at) * 1000 AS SIGNED) AS created_at_ms, \
                 CAST(UNIX_TIMESTAMP(updated_at) * 1000 AS SIGNED) AS updated_at_ms \
                 FROM jobs WHERE id = ?",
            )
            .bind(id)
            .fetch_optional(&self.pool),
        )
        .await
    }

    /// Pool gauges for `/metrics`: (open connections, idle connections).
    pub fn pool_stats(&self) -> (u32, usize) {
        (self.pool.size(), self.pool.num_idle())
    }

    async fn bounded<T>(
        &self,
        query: impl Future<Output = Result<T, sqlx::Error>>,
    ) -> Result<T, DbError> {
        match tokio::time::timeout(self.query_timeout, query).await {
            Ok(result) => result.map_err(DbError::from),
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
