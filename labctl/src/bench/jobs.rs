//! `labctl bench jobs`: what one claim of B's job worker costs as the jobs
//! table grows, and whether its statements use an index.
//!
//! A native stack (one B, `worker.enabled = false`, so nothing but this
//! bench touches the table; B's migrations make the schema) is filled to
//! each `--sizes` value with MariaDB's sequence engine (`INSERT … SELECT …
//! FROM seq_1_to_N`, in batches). The table looks like a queue that has
//! run for a while: old jobs `done`, the newest `--backlogs` of them
//! `pending` (a count, or a share of the table: the backlog of a worker
//! that fell behind), the oldest 2 % of those waiting out a retry backoff
//! (`not_before` in the future), and [`LIVE_CLAIMS`] jobs just before them
//! `running` under another B's fresh claim (not reclaimable). Payloads are
//! small: no statement of the claim reads them.
//!
//! For each size and backlog the bench prints `EXPLAIN` of every statement
//! B's claim sends and the rows each one really examined (`ANALYZE
//! FORMAT=JSON`, run in a transaction that is rolled back), then times
//! `--claims` claims with B's own [`service_b::db::Db::claim`] — the
//! statements are built by the functions B uses, never copied — each
//! claiming `worker.pool_size` jobs, as a B with a free pool does. Between
//! claims (untimed) the claimed jobs are marked `done` and as many new
//! pending jobs are appended, so the backlog stays the same size.

use std::{fmt, str::FromStr, time::Duration};

use anyhow::{Context, bail};
use lab_common::{config::LabConfig, faults::LiveFaults};
use serde::Serialize;
use service_b::db::{self, ClaimStatement, Db, PoolMetrics};
use sqlx::{
    Column, ConnectOptions, MySql, MySqlPool, Row,
    mysql::{MySqlConnectOptions, MySqlRow},
};
use tokio::time::Instant;

use crate::launcher::Stack;

/// What to measure.
#[derive(Debug, Clone)]
pub struct JobsSpec {
    pub config: LabConfig,
    /// Table sizes in rows, ascending.
    pub sizes: Vec<u64>,
    pub backlogs: Vec<Backlog>,
    /// Claims timed per size and backlog…
    pub claims: usize,
    /// …or fewer, if they take longer than this.
    pub claim_time: Duration,
}

/// How many jobs are pending.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Backlog {
    /// This many.
    Jobs(u64),
    /// This percentage of the table.
    Percent(f64),
}

impl Backlog {
    pub fn jobs(&self, table_rows: u64) -> u64 {
        match *self {
            Backlog::Jobs(n) => n.min(table_rows),
            Backlog::Percent(p) => ((table_rows as f64 * p / 100.0).round() as u64).min(table_rows),
        }
    }
}

impl fmt::Display for Backlog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Backlog::Jobs(n) => write!(f, "{}", count_text(*n)),
            Backlog::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl FromStr for Backlog {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(p) if (0.0..=100.0).contains(&p) => Ok(Backlog::Percent(p)),
                _ => Err(format!("{s:?}: expected a percentage from 0% to 100%")),
            },
            None => parse_count(s).map(Backlog::Jobs),
        }
    }
}

/// `10000`, `10k` or `1M`.
pub fn parse_count(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (digits, factor) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 1_000),
        Some((i, 'm' | 'M')) => (&t[..i], 1_000_000),
        _ => (t, 1),
    };
    digits
        .trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(factor))
        .ok_or_else(|| format!("{s:?}: expected a count such as 10000, 10k or 1M"))
}

/// A count as the command line would write it.
fn count_text(n: u64) -> String {
    match n {
        n if n >= 1_000_000 && n % 1_000_000 == 0 => format!("{}M", n / 1_000_000),
        n if n >= 1_000 && n % 1_000 == 0 => format!("{}k", n / 1_000),
        n => n.to_string(),
    }
}

/// Jobs running under another B's fresh claim while the bench claims.
pub const LIVE_CLAIMS: u64 = 16;
/// Rows per filling INSERT.
const FILL_BATCH: u64 = 100_000;
/// Payload of a filled row (no claim statement reads it).
const PAYLOAD_BYTES: u32 = 200;

/// One row of `EXPLAIN`, the columns that say which access path is used.
#[derive(Debug, Clone, Serialize)]
pub struct PlanRow {
    pub table: Option<String>,
    /// `type`: `ref`, `range`, `eq_ref`, `const` use an index to find rows;
    /// `index` reads a whole index in order, `ALL` the whole table.
    pub access: Option<String>,
    pub possible_keys: Option<String>,
    pub key: Option<String>,
    /// The optimizer's estimate of rows to examine.
    pub rows: Option<String>,
    pub extra: Option<String>,
}

impl PlanRow {
    /// Whether this row finds its rows through an index rather than by
    /// reading a whole index or table.
    pub fn uses_index(&self) -> bool {
        self.key.is_some()
            && matches!(
                self.access.as_deref(),
                Some("ref" | "range" | "eq_ref" | "const" | "ref_or_null" | "index_merge")
            )
    }
}

/// One statement of the claim, its plan and what it really examined.
#[derive(Debug, Clone, Serialize)]
pub struct StatementPlan {
    pub what: String,
    pub sql: String,
    pub plan: Vec<PlanRow>,
    /// Rows read from `jobs` by one execution (`ANALYZE`'s `r_rows`).
    pub rows_examined: Option<f64>,
}

impl StatementPlan {
    pub fn uses_index(&self) -> bool {
        !self.plan.is_empty() && self.plan.iter().all(PlanRow::uses_index)
    }

    /// The indexes its plan uses, comma-separated.
    pub fn keys(&self) -> String {
        let keys: Vec<&str> = self.plan.iter().filter_map(|r| r.key.as_deref()).collect();
        if keys.is_empty() {
            "none".into()
        } else {
            keys.join(",")
        }
    }
}

/// One size and backlog.
#[derive(Debug, Clone, Serialize)]
pub struct JobsResult {
    pub rows: u64,
    pub backlog: Backlog,
    pub pending: u64,
    pub claims: usize,
    /// Jobs each claim took, on average (the worker's pool size if the
    /// backlog never ran dry).
    pub claimed_per_claim: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub statements: Vec<StatementPlan>,
}

impl JobsResult {
    /// Whether every statement of the claim uses an index.
    pub fn uses_index(&self) -> bool {
        self.statements.iter().all(StatementPlan::uses_index)
    }

    /// Rows the claim's statements examined together.
    pub fn rows_examined(&self) -> Option<f64> {
        self.statements.iter().map(|s| s.rows_examined).sum()
    }
}

/// Runs the benchmark; `progress` gets one line per step.
pub async fn run(
    spec: &JobsSpec,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Vec<JobsResult>> {
    if spec.sizes.is_empty() || spec.sizes.windows(2).any(|w| w[0] >= w[1]) {
        bail!("--sizes must be ascending row counts, e.g. 10k,1M");
    }
    let worker = &spec.config.worker;
    if spec.claim_time >= worker.visibility_timeout {
        bail!(
            "--claim-time must be shorter than worker.visibility_timeout ({:?}): the live claims \
             would expire during the measurement",
            worker.visibility_timeout
        );
    }
    let dir = super::state_dir("jobs", None);
    let mut stack = Stack::up(super::stack_options(spec.config.clone(), &dir, 1))
        .await
        .context("starting the stack for bench jobs")?;
    let result = measure(spec, &stack, &mut progress).await;
    stack.down().await?;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn measure(
    spec: &JobsSpec,
    stack: &Stack,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<Vec<JobsResult>> {
    let config = stack.config();
    // Filling and shaping a million rows is slow on purpose: not worth a
    // warning per statement.
    let options = MySqlConnectOptions::from_str(&config.mysql.url)
        .context("the stack's mysql.url")?
        .disable_statement_logging();
    let pool = sqlx::mysql::MySqlPoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await
        .context("connecting to the stack's database")?;
    let version: String = sqlx::query_scalar("SELECT VERSION()")
        .fetch_one(&pool)
        .await?;
    if !version.contains("MariaDB") {
        bail!(
            "bench jobs fills the table with MariaDB's sequence engine; this server is {version}"
        );
    }
    let faults = LiveFaults::new("labctl", config.faults, &[], &Default::default())?;
    let db = Db::connect(
        &config.mysql,
        faults,
        PoolMetrics::register(&Default::default())?,
    )
    .await
    .context("connecting B's database layer")?;
    let mut results = Vec::new();
    for &size in &spec.sizes {
        let started = Instant::now();
        grow(&pool, size).await?;
        progress(&format!(
            "{} rows in {:.1} s",
            count_text(size),
            started.elapsed().as_secs_f64()
        ));
        for backlog in &spec.backlogs {
            let pending = backlog.jobs(size).min(size.saturating_sub(LIVE_CLAIMS));
            shape(&pool, pending).await?;
            let statements = plans(&pool, spec).await?;
            let (claims, claimed, latencies) = time_claims(&pool, &db, spec).await?;
            let result = JobsResult {
                rows: size,
                backlog: *backlog,
                pending,
                claims,
                claimed_per_claim: claimed as f64 / claims.max(1) as f64,
                p50_ms: percentile(&latencies, 0.50),
                p99_ms: percentile(&latencies, 0.99),
                statements,
            };
            progress(&format!(
                "{} rows, {} pending: {} claims, p50 {:.2} ms, p99 {:.2} ms, {} rows examined, index: {}",
                count_text(size),
                count_text(pending),
                result.claims,
                result.p50_ms,
                result.p99_ms,
                result
                    .rows_examined()
                    .map_or("?".to_string(), |r| format!("{r:.0}")),
                if result.uses_index() { "yes" } else { "NO" },
            ));
            results.push(result);
        }
    }
    Ok(results)
}

/// Appends `done` jobs until the table has `size` rows.
async fn grow(pool: &MySqlPool, size: u64) -> anyhow::Result<()> {
    let have: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs")
        .fetch_one(pool)
        .await?;
    let mut missing = size.saturating_sub(u64::try_from(have).unwrap_or(0));
    while missing > 0 {
        let batch = missing.min(FILL_BATCH);
        // The sequence engine's table name carries the count; it is a number.
        let insert = format!(
            "INSERT INTO jobs (status, attempts, payload, result) \
             SELECT 'done', 1, REPEAT('x', {PAYLOAD_BYTES}), 'ok' FROM seq_1_to_{batch}"
        );
        sqlx::query(sqlx::AssertSqlSafe(insert))
            .execute(pool)
            .await
            .context("filling the jobs table")?;
        missing -= batch;
    }
    Ok(())
}

/// Gives the table its queue shape (the module doc describes it) and fresh
/// optimizer statistics.
async fn shape(pool: &MySqlPool, pending: u64) -> anyhow::Result<()> {
    let backoff = pending / 50;
    sqlx::query(
        "UPDATE jobs SET status = 'done', not_before = NULL, claimed_by = NULL \
         WHERE status <> 'done'",
    )
    .execute(pool)
    .await
    .context("resetting the jobs table to done")?;
    let steps: [(&str, u64); 3] = [
        (
            "UPDATE jobs SET status = 'pending', attempts = 0, claimed_by = NULL, \
             claimed_at = NULL, not_before = NULL ORDER BY id DESC LIMIT ?",
            pending,
        ),
        (
            "UPDATE jobs SET attempts = 1, not_before = NOW(3) + INTERVAL 1 HOUR \
             WHERE status = 'pending' ORDER BY id LIMIT ?",
            backoff,
        ),
        (
            "UPDATE jobs SET status = 'running', attempts = 1, claimed_by = 'another-b', \
             claimed_at = NOW(3) WHERE status = 'done' ORDER BY id DESC LIMIT ?",
            LIVE_CLAIMS,
        ),
    ];
    for (sql, n) in steps {
        sqlx::query(sql)
            .bind(n)
            .execute(pool)
            .await
            .with_context(|| format!("shaping the jobs table: {sql}"))?;
    }
    // What InnoDB would recompute on its own after enough changes; done now
    // so the plan shown is the plan the optimizer makes for this table.
    sqlx::query("ANALYZE TABLE jobs").execute(pool).await?;
    Ok(())
}

/// `EXPLAIN` and `ANALYZE` of every statement of B's claim.
async fn plans(pool: &MySqlPool, spec: &JobsSpec) -> anyhow::Result<Vec<StatementPlan>> {
    let worker = &spec.config.worker;
    let limit = worker.pool_size;
    // What the SELECT would return, for the UPDATE that follows it.
    let claimed: Vec<i64> = sqlx::query_scalar(
        "SELECT id FROM jobs WHERE status = 'pending' AND not_before IS NULL ORDER BY id LIMIT ?",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    let statements = |head| {
        db::claim_statements(
            head,
            limit,
            worker.visibility_timeout,
            worker.max_attempts,
            &claimed,
        )
    };
    let mut out = Vec::new();
    for ClaimStatement { what, mut query } in statements("EXPLAIN ") {
        let sql = query
            .sql()
            .as_str()
            .trim_start_matches("EXPLAIN ")
            .to_owned();
        let rows = query
            .build()
            .fetch_all(pool)
            .await
            .with_context(|| format!("EXPLAIN {sql}"))?;
        out.push(StatementPlan {
            what: what.to_owned(),
            sql,
            plan: rows.iter().map(plan_row).collect(),
            rows_examined: None,
        });
    }
    // ANALYZE runs the statements: in a transaction that is rolled back.
    let mut tx = pool.begin().await?;
    for (plan, ClaimStatement { mut query, .. }) in
        out.iter_mut().zip(statements("ANALYZE FORMAT=JSON "))
    {
        let json: String = query
            .build_query_scalar()
            .fetch_one(&mut *tx)
            .await
            .with_context(|| format!("ANALYZE {}", plan.sql))?;
        plan.rows_examined = serde_json::from_str(&json)
            .ok()
            .map(|v| rows_read(&v, "jobs"));
    }
    tx.rollback().await?;
    Ok(out)
}

/// One `EXPLAIN` row, by column name.
fn plan_row(row: &MySqlRow) -> PlanRow {
    let column = |name: &str| {
        let i = row.columns().iter().position(|c| c.name() == name)?;
        text_at(row, i)
    };
    PlanRow {
        table: column("table"),
        access: column("type"),
        possible_keys: column("possible_keys"),
        key: column("key"),
        rows: column("rows"),
        extra: column("Extra"),
    }
}

/// A column as text, whatever its SQL type.
fn text_at(row: &MySqlRow, i: usize) -> Option<String> {
    if let Ok(v) = row.try_get::<Option<String>, _>(i) {
        return v;
    }
    if let Ok(v) = row.try_get::<Option<i64>, _>(i) {
        return v.map(|v| v.to_string());
    }
    if let Ok(v) = row.try_get::<Option<u64>, _>(i) {
        return v.map(|v| v.to_string());
    }
    row.try_get::<Option<f64>, _>(i)
        .ok()
        .flatten()
        .map(|v| v.to_string())
}

/// Rows read from `table` in an `ANALYZE FORMAT=JSON` document: `r_rows`
/// (rows per loop) × `r_loops` of every access to it.
fn rows_read(node: &serde_json::Value, table: &str) -> f64 {
    match node {
        serde_json::Value::Object(map) => {
            let own = if map.get("table_name").and_then(|t| t.as_str()) == Some(table) {
                let rows = map.get("r_rows").and_then(|r| r.as_f64()).unwrap_or(0.0);
                let loops = map.get("r_loops").and_then(|r| r.as_f64()).unwrap_or(1.0);
                rows * loops
            } else {
                0.0
            };
            own + map.values().map(|v| rows_read(v, table)).sum::<f64>()
        }
        serde_json::Value::Array(items) => items.iter().map(|v| rows_read(v, table)).sum(),
        _ => 0.0,
    }
}

/// Times B's claim; returns (claims, jobs claimed, latencies in ms).
async fn time_claims(
    pool: &MySqlPool,
    db: &Db,
    spec: &JobsSpec,
) -> anyhow::Result<(usize, usize, Vec<f64>)> {
    let worker = &spec.config.worker;
    let started = Instant::now();
    let mut latencies = Vec::with_capacity(spec.claims);
    let mut claimed = 0;
    while latencies.len() < spec.claims && started.elapsed() < spec.claim_time {
        let at = Instant::now();
        let ids = db
            .claim(
                worker.pool_size,
                "labctl-bench",
                worker.visibility_timeout,
                worker.max_attempts,
                &[],
            )
            .await
            .context("B's claim")?;
        latencies.push(at.elapsed().as_secs_f64() * 1e3);
        claimed += ids.len();
        finish_and_replace(pool, &ids).await?;
    }
    Ok((latencies.len(), claimed, latencies))
}

/// The claimed jobs are done; as many new ones arrive.
async fn finish_and_replace(pool: &MySqlPool, ids: &[i64]) -> anyhow::Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let mut done: sqlx::QueryBuilder<MySql> =
        sqlx::QueryBuilder::new("UPDATE jobs SET status = 'done' WHERE id IN (");
    let mut list = done.separated(", ");
    for id in ids {
        list.push_bind(*id);
    }
    list.push_unseparated(")");
    done.build().execute(pool).await?;
    let insert = format!(
        "INSERT INTO jobs (payload) SELECT REPEAT('x', {PAYLOAD_BYTES}) FROM seq_1_to_{}",
        ids.len()
    );
    sqlx::query(sqlx::AssertSqlSafe(insert))
        .execute(pool)
        .await?;
    Ok(())
}

/// The `q` quantile (nearest rank) of `values`, NaN when empty.
fn percentile(values: &[f64], q: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// The summary table, Markdown.
pub fn table(results: &[JobsResult]) -> String {
    let mut out = String::from(
        "| rows | pending | claims | jobs/claim | claim p50 ms | claim p99 ms | rows examined | indexes used |\n\
         |---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in results {
        let keys: Vec<String> = r.statements.iter().map(StatementPlan::keys).collect();
        out.push_str(&format!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.2} | {} | {}{} |\n",
            count_text(r.rows),
            count_text(r.pending),
            r.claims,
            r.claimed_per_claim,
            r.p50_ms,
            r.p99_ms,
            r.rows_examined()
                .map_or("?".to_string(), |n| format!("{n:.0}")),
            keys.join(" · "),
            if r.uses_index() { "" } else { " (full scan)" },
        ));
    }
    out
}

/// Every statement's `EXPLAIN`, per size and backlog, as text.
pub fn explains(results: &[JobsResult]) -> String {
    let mut out = String::new();
    for r in results {
        out.push_str(&format!(
            "\n{} rows, {} pending:\n",
            count_text(r.rows),
            count_text(r.pending)
        ));
        for s in &r.statements {
            out.push_str(&format!(
                "  {} — examined {}\n    {}\n",
                s.what,
                s.rows_examined
                    .map_or("?".to_string(), |n| format!("{n:.0} rows")),
                s.sql
            ));
            for p in &s.plan {
                let show = |v: &Option<String>| v.clone().unwrap_or_else(|| "NULL".into());
                out.push_str(&format!(
                    "    EXPLAIN table={} type={} possible_keys={} key={} rows={} Extra={}\n",
                    show(&p.table),
                    show(&p.access),
                    show(&p.possible_keys),
                    show(&p.key),
                    show(&p.rows),
                    show(&p.extra)
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_and_backlogs_parse_as_written() {
        assert_eq!(parse_count("10k"), Ok(10_000));
        assert_eq!(parse_count("1M"), Ok(1_000_000));
        assert_eq!(parse_count("2500"), Ok(2500));
        assert!(parse_count("ten").is_err());
        assert!(parse_count("").is_err());
        assert_eq!("10%".parse(), Ok(Backlog::Percent(10.0)));
        assert_eq!("1k".parse(), Ok(Backlog::Jobs(1000)));
        assert!("150%".parse::<Backlog>().is_err());
        assert_eq!(Backlog::Percent(10.0).jobs(1_000_000), 100_000);
        assert_eq!(
            Backlog::Jobs(500).jobs(100),
            100,
            "never more than the table"
        );
        assert_eq!(count_text(1_000_000), "1M");
        assert_eq!(count_text(10_000), "10k");
        assert_eq!(count_text(1234), "1234");
    }

    #[test]
    fn rows_read_sums_every_access_to_the_table() {
        let analyze = serde_json::json!({
            "query_block": {"nested_loop": [
                {"table": {"table_name": "jobs", "r_loops": 1, "r_rows": 9008}},
                {"read_sorted_file": {"filesort": {"table": {"table_name": "jobs", "r_loops": 2, "r_rows": 5}}}},
                {"table": {"table_name": "other", "r_loops": 1, "r_rows": 77}}
            ]}
        });
        assert_eq!(rows_read(&analyze, "jobs"), 9018.0);
    }

    #[test]
    fn only_index_lookups_count_as_using_an_index() {
        let row = |access: &str, key: Option<&str>| PlanRow {
            table: Some("jobs".into()),
            access: Some(access.into()),
            possible_keys: None,
            key: key.map(Into::into),
            rows: None,
            extra: None,
        };
        assert!(row("range", Some("jobs_status_id")).uses_index());
        assert!(row("ref", Some("jobs_status_id")).uses_index());
        assert!(
            !row("index", Some("PRIMARY")).uses_index(),
            "a walk of the whole index"
        );
        assert!(!row("ALL", None).uses_index());
    }

    #[test]
    fn percentiles_take_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert!(percentile(&[], 0.5).is_nan());
    }
}
