//! Cause 4b — what becomes of a MySQL result set when one of its rows fails
//! to decode (`faults.rows`), both forms side by side.
//!
//! The job worker reads its batches through [`JobRows::stream`]: rows are
//! decoded one by one as they arrive and each good one is handed on at once
//! (the worker starts a task for it). A row whose payload is not UTF-8 — a
//! "poison" row, `labctl jobs --poison-ratio` writes them — fails to decode.
//!
//! * `leak-on-error` (the incident): the Go loop was
//!   `for rows.Next() { if err := rows.Scan(&job); err != nil { return err } … }`
//!   with no `defer rows.Close()`. The `*sql.Rows` kept its pooled connection
//!   checked out until closed — never. Rust would release it on the early
//!   return (dropping the stream and the `PoolConnection` hands the
//!   connection back, and sqlx drains the unread rows on its next use), so
//!   this form keeps the `PoolConnection`, its unread result set still on
//!   the socket, in a list that is never drained: [`LeakedResultSet`]. A
//!   poison row stays pending and is met again every tick, so the pool
//!   drains one connection per tick under `unbounded` and `capped`;
//!   `lab_db_connections_leaked` counts them and
//!   `lab_db_pool_connections{state="in_use"}` climbs to `mysql.pool_max`.
//!   (Under `bounded` a poison row is claimed, so it is met again only after
//!   `worker.visibility_timeout`, at most `worker.max_attempts` times, and
//!   the rows claimed after it wait in `running` that long too.)
//! * `close` (the fix): the connection is released on every path (the
//!   stream and the connection are dropped at the end of the call, whatever
//!   happened); a row that fails to decode is skipped and returned as a
//!   [`BadRow`] so the worker dead-letters it with the reason, and the rest
//!   of the batch goes on.
//!
//! The switch is read per batch, so `PUT /faults` applies from the next
//! batch. A flip to `close` does not give back connections already leaked:
//! they stay checked out until B restarts, as the Go process's did, and
//! `lab_db_connections_leaked` keeps its value; it just stops rising.

use std::sync::Mutex;

use futures::TryStreamExt;
use lab_common::{config::RowsMode, faults::LiveFaults};
use prometheus::{IntGauge, Registry};
use sqlx::{
    MySql, QueryBuilder, Row,
    mysql::{MySqlArguments, MySqlRow},
    query::Query,
};

use lab_common::metrics::Registrar;

use crate::db::{Checkout, Db, DbError, Failure, Purpose};

/// A job as the worker sees it, decoded from its row.
#[derive(Debug, Clone)]
pub struct JobTask {
    pub id: i64,
    /// The payload as text: a row whose bytes are not UTF-8 does not decode.
    pub payload: String,
    /// Attempts so far (after a claim: including this one).
    pub attempts: u32,
    /// Microseconds since the job was created (for the job-lag histogram).
    pub age_us: i64,
    /// The submitting request's W3C trace context, if it came through A.
    pub traceparent: Option<String>,
}

impl JobTask {
    /// The span a job attempt runs in: a child of the submitting request's
    /// trace (a new trace for rows written straight into the table), with
    /// its `trace_id` on every log line and on the partner call.
    pub fn span(&self) -> tracing::Span {
        let span = tracing::info_span!("job", job = self.id, trace_id = tracing::field::Empty);
        lab_common::trace::adopt(
            &span,
            lab_common::trace::extract_traceparent(self.traceparent.as_deref()),
        );
        span
    }
}

/// A row that failed to decode (`close` only): to be dead-lettered.
#[derive(Debug, Clone)]
pub struct BadRow {
    pub id: i64,
    /// The attempt number the row carried (the fence for a claimed job).
    pub attempts: u32,
    pub reason: String,
}

/// Which rows a batch reads.
#[derive(Debug, Clone)]
pub enum Batch {
    /// `unbounded` / `capped`: up to this many pending rows, *not* claimed —
    /// exactly what the incident's loop read, so a row stays pending (and is
    /// read again next tick) while it is handled.
    Pending(u32),
    /// `bounded`: the rows just claimed ([`Db::claim`]).
    Claimed(Vec<i64>),
}

const JOB_COLUMNS: &str = "SELECT id, payload, attempts, traceparent, \
    CAST(TIMESTAMPDIFF(MICROSECOND, created_at, NOW(3)) AS SIGNED) AS age_us FROM jobs ";

/// A result set abandoned on a decode error: the pooled connection, with
/// the rest of the rows unread on its socket (`leak-on-error`). Never
/// dropped: that is the leak.
struct LeakedResultSet {
    _connection: Checkout,
}

/// The batch reader of the job worker, in the form in force.
pub struct JobRows {
    /// B's live switches; `rows` is read per batch.
    faults: LiveFaults,
    leaked: Mutex<Vec<LeakedResultSet>>,
    leaked_gauge: IntGauge,
}

impl JobRows {
    pub fn new(faults: LiveFaults, registry: &Registry) -> prometheus::Result<Self> {
        let leaked_gauge = Registrar(registry).int_gauge(
            "lab_db_connections_leaked",
            "MySQL pool connections held forever by a result set abandoned on a row decode error (rows = leak-on-error).",
        )?;
        Ok(Self {
            faults,
            leaked: Mutex::new(Vec::new()),
            leaked_gauge,
        })
    }

    /// Streams `batch`, handing each decoded row to `each` as it arrives.
    /// Returns the rows that failed to decode (`close`), or an error after
    /// leaking the connection (`leak-on-error`).
    pub async fn stream(
        &self,
        db: &Db,
        batch: &Batch,
        mut each: impl FnMut(JobTask),
    ) -> Result<Vec<BadRow>, DbError> {
        let mut sql: QueryBuilder<MySql> = QueryBuilder::new(JOB_COLUMNS);
        match batch {
            Batch::Pending(limit) => {
                sql.push("WHERE status = 'pending' ORDER BY id LIMIT ");
                sql.push_bind(*limit);
            }
            Batch::Claimed(ids) if ids.is_empty() => return Ok(Vec::new()),
            Batch::Claimed(ids) => {
                sql.push("WHERE id IN (");
                let mut list = sql.separated(", ");
                for id in ids {
                    list.push_bind(*id);
                }
                list.push_unseparated(") ORDER BY id");
            }
        }
        self.stream_query(db, sql.build(), &mut each).await
    }

    async fn stream_query(
        &self,
        db: &Db,
        query: Query<'_, MySql, MySqlArguments>,
        each: &mut impl FnMut(JobTask),
    ) -> Result<Vec<BadRow>, DbError> {
        let mut connection = db.acquire(None, Purpose::Job).await?;
        let mut bad = Vec::new();
        let mode = self.faults.current().rows;
        let abandoned_on = db
            .within(None, async {
                let mut rows = query.fetch(&mut *connection);
                while let Some(row) = rows.try_next().await? {
                    match decode_job(&row) {
                        Ok(job) => each(job),
                        Err(e) => match mode {
                            // `return err` — and the result set stays open.
                            RowsMode::LeakOnError => return Ok(Some(e)),
                            RowsMode::Close => {
                                if let Some(b) = bad_row(&row, &e) {
                                    bad.push(b);
                                }
                            }
                        },
                    }
                }
                Ok(None)
            })
            .await?;
        match abandoned_on {
            None => Ok(bad), // `close`: the stream and the connection drop here.
            Some(decode_error) => {
                self.keep_forever(connection, decode_error.to_string());
                Err(Failure::RowDecode(decode_error).into())
            }
        }
    }

    /// `leak-on-error`: the connection, with its unread rows, is kept.
    fn keep_forever(&self, connection: Checkout, reason: String) {
        if self.faults.hidden() {
            // A drill: what the Go loop would log, the error it returned,
            // and nothing about the connection it kept.
            tracing::warn!(%reason, "reading a job batch failed");
        } else {
            tracing::warn!(%reason, "job batch abandoned; its MySQL connection is never returned");
        }
        if let Ok(mut leaked) = self.leaked.lock() {
            leaked.push(LeakedResultSet {
                _connection: connection,
            });
            self.leaked_gauge.set(leaked.len() as i64);
        }
    }
}

/// The row scan: every column, and the payload as UTF-8 text.
fn decode_job(row: &MySqlRow) -> Result<JobTask, sqlx::Error> {
    let payload: Vec<u8> = row.try_get("payload")?;
    let payload = String::from_utf8(payload).map_err(|e| sqlx::Error::ColumnDecode {
        index: "payload".into(),
        source: Box::new(e.utf8_error()),
    })?;
    Ok(JobTask {
        id: row.try_get("id")?,
        payload,
        attempts: row.try_get("attempts")?,
        age_us: row.try_get("age_us")?,
        traceparent: row.try_get("traceparent")?,
    })
}

/// What is needed to dead-letter a row that did not decode (`None` if not
/// even its id decodes — then there is nothing to write back to).
fn bad_row(row: &MySqlRow, error: &sqlx::Error) -> Option<BadRow> {
    Some(BadRow {
        id: row.try_get("id").ok()?,
        attempts: row.try_get("attempts").unwrap_or(0),
        reason: format!("row failed to decode: {error}"),
    })
}
