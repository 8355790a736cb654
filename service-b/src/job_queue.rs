//! The job queue as MySQL holds it, exported every few seconds:
//! `lab_jobs_queued{status}` (pending, running, done, failed, dead) and
//! `lab_jobs_oldest_pending_seconds`.
//!
//! The worker's own metrics say what *this* B did; these say what is still
//! waiting, whichever B (or none) will take it — a backlog that grows while
//! every B looks busy, or jobs stuck `running` under a dead claim. They are
//! read on a connection of their own, outside the pool, so an exhausted pool
//! (the symptom to diagnose) does not also blind the gauges.

use std::time::Duration;

use lab_common::config::MysqlConfig;
use prometheus::{Gauge, IntCounter, IntGaugeVec, Opts, Registry};
use sqlx::{Connection as _, mysql::MySqlConnection};
use tokio_util::sync::CancellationToken;

use lab_common::metrics::Registrar;

/// How often the queue is read. A `GROUP BY status` over the
/// `(status, id)` index and one indexed lookup: cheap at this pace.
const READ_EVERY: Duration = Duration::from_secs(2);

/// Every status a job row can have.
const STATUSES: [&str; 5] = ["pending", "running", "done", "failed", "dead"];

/// The queue gauges.
#[derive(Clone)]
pub struct QueueMetrics {
    queued: IntGaugeVec,
    oldest_pending: Gauge,
    read_failures: IntCounter,
}

impl QueueMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let queued = IntGaugeVec::new(
            Opts::new(
                "lab_jobs_queued",
                "Job rows in MySQL by status (pending, running, done, failed, dead), read every 2 s.",
            ),
            &["status"],
        )?;
        registry.register(Box::new(queued.clone()))?;
        for status in STATUSES {
            queued.with_label_values(&[status]);
        }
        let r = Registrar(registry);
        Ok(Self {
            queued,
            oldest_pending: r.gauge(
                "lab_jobs_oldest_pending_seconds",
                "Age of the oldest pending job in MySQL (0 when none is pending), read every 2 s.",
            )?,
            read_failures: r.int_counter(
                "lab_jobs_queue_read_failures_total",
                "Reads of the job queue gauges that failed (the gauges keep their last values).",
            )?,
        })
    }
}

/// Reads the queue every [`READ_EVERY`] until `stop`, reconnecting after a
/// failure.
pub async fn watch(config: MysqlConfig, metrics: QueueMetrics, stop: CancellationToken) {
    let mut tick = tokio::time::interval(READ_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut connection: Option<MySqlConnection> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = stop.cancelled() => break,
        }
        let read = async {
            if connection.is_none() {
                connection = Some(MySqlConnection::connect(&config.url).await?);
            }
            match connection.as_mut() {
                Some(conn) => read_queue(conn).await,
                None => Err(sqlx::Error::PoolClosed),
            }
        };
        match tokio::time::timeout(config.query_timeout, read).await {
            Ok(Ok(queue)) => metrics.show(&queue),
            Ok(Err(error)) => {
                tracing::debug!(%error, "reading the job queue failed");
                metrics.read_failures.inc();
                connection = None;
            }
            Err(_) => {
                tracing::debug!("reading the job queue timed out");
                metrics.read_failures.inc();
                connection = None;
            }
        }
    }
    if let Some(conn) = connection {
        let _ = conn.close().await;
    }
}

/// One reading of the queue.
struct Queue {
    by_status: Vec<(String, i64)>,
    oldest_pending_us: Option<i64>,
}

impl QueueMetrics {
    fn show(&self, queue: &Queue) {
        for status in STATUSES {
            let n = queue
                .by_status
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            self.queued.with_label_values(&[status]).set(n);
        }
        let oldest = queue.oldest_pending_us.unwrap_or(0).max(0);
        self.oldest_pending.set(oldest as f64 / 1e6);
    }
}

async fn read_queue(conn: &mut MySqlConnection) -> Result<Queue, sqlx::Error> {
    let by_status: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, COUNT(*) FROM jobs GROUP BY status")
            .fetch_all(&mut *conn)
            .await?;
    let oldest_pending_us: Option<i64> = sqlx::query_scalar(
        "SELECT CAST(TIMESTAMPDIFF(MICROSECOND, created_at, NOW(3)) AS SIGNED) FROM jobs \
         WHERE status = 'pending' ORDER BY id LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(Queue {
        by_status,
        oldest_pending_us,
    })
}
