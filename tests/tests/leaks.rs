//! Cause 4, the resource leaks, end to end on real TLS and MariaDB:
//! B's outbound HTTPS client (`http_client`) and its SQL result sets
//! (`rows`), each buggy form showing its leak in numbers and each fixed form
//! staying flat; and the fixed client against a partner that stops answering.

use std::time::Duration;

use lab_tests::{TestLab, eventually, get_json};
use nix::sys::signal::Signal;

const B: &str = "service-b-1";
const PARTNER: &str = "partner-api";

async fn count(db: &sqlx::MySqlPool, sql: &'static str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(db).await?)
}

/// Waits until every job is `done`.
async fn all_done(db: &sqlx::MySqlPool, jobs: i64, timeout: Duration) -> anyhow::Result<()> {
    eventually(timeout, "every job to be done", || async {
        let done = count(db, "SELECT COUNT(*) FROM jobs WHERE status = 'done'")
            .await
            .ok()?;
        (done == jobs).then_some(())
    })
    .await
}

async fn metric(lab: &TestLab, service: &str, name: &str) -> anyhow::Result<f64> {
    lab.metric(service, name, &[])
        .await
        .ok_or_else(|| anyhow::anyhow!("{service} does not export {name}"))
}

/// What 1 000 partner calls left behind in one `http_client` form.
#[derive(Debug)]
struct ClientFootprint {
    connections_opened: f64,
    clients_built: f64,
    handshakes: f64,
    /// Connections partner-api still has open from B (the other end's view).
    partner_open: f64,
    unclosed: f64,
    fds_before: f64,
    fds_after: f64,
    /// MySQL connections the pool opened meanwhile (each an fd too).
    mysql_growth: f64,
    rss_growth_mib: f64,
}

/// 1 000 jobs, each one partner call, through the bounded worker (so every
/// job is exactly one call) with the given client form.
async fn thousand_calls(form: &str) -> anyhow::Result<ClientFootprint> {
    let http_client = format!("faults.http_client={form}");
    let lab = TestLab::start(
        1,
        &[
            "mode=fixed",
            &http_client,
            "worker.pool_size=8",
            "worker.tick=50ms",
            "worker.cpu_per_kib=0s",
            "partner.latency=5ms",
            "partner.client_max_connections=8",
        ],
    )
    .await?;
    let fds_before = metric(&lab, B, "process_open_fds").await?;
    let mysql_before = metric(&lab, B, "lab_db_pool_connections").await?;
    let rss_before = metric(&lab, B, "process_resident_memory_bytes").await?;
    lab.insert_jobs(1000, 0.0).await?;
    let db = lab.db().await?;
    all_done(&db, 1000, Duration::from_secs(120)).await?;
    let footprint = ClientFootprint {
        connections_opened: metric(&lab, B, "lab_http_connections_opened_total").await?,
        clients_built: metric(&lab, B, "lab_http_clients_built_total").await?,
        handshakes: metric(&lab, PARTNER, "partner_tls_handshakes_total").await?,
        partner_open: metric(&lab, PARTNER, "partner_connections_open").await?,
        unclosed: metric(&lab, B, "lab_http_responses_unclosed").await?,
        fds_before,
        fds_after: metric(&lab, B, "process_open_fds").await?,
        mysql_growth: metric(&lab, B, "lab_db_pool_connections").await? - mysql_before,
        rss_growth_mib: (metric(&lab, B, "process_resident_memory_bytes").await? - rss_before)
            / (1024.0 * 1024.0),
    };
    println!("{form}: {footprint:?}");
    Ok(footprint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_request_clients_leak_a_connection_per_call_and_the_shared_client_reuses_its_pool()
-> anyhow::Result<()> {
    let leaky = thousand_calls("per-request").await?;
    assert!(
        leaky.clients_built >= 1000.0,
        "a client per call: {leaky:?}"
    );
    assert!(
        leaky.connections_opened >= 1000.0,
        "a connection per call: {leaky:?}"
    );
    assert!(
        leaky.handshakes >= 1000.0,
        "partner-api saw a full TLS handshake per call: {leaky:?}"
    );
    assert_eq!(leaky.unclosed, 1000.0, "every body left open: {leaky:?}");
    assert!(
        leaky.partner_open >= 1000.0,
        "partner-api still holds every connection open (idle timeout 90 s): {leaky:?}"
    );
    assert!(
        leaky.fds_after - leaky.fds_before >= 500.0,
        "open fds grew by hundreds: {leaky:?}"
    );

    let pooled = thousand_calls("shared").await?;
    assert_eq!(pooled.clients_built, 1.0, "one client: {pooled:?}");
    assert!(
        pooled.connections_opened <= 8.0,
        "at most the pool's 8 connections: {pooled:?}"
    );
    assert!(
        pooled.handshakes <= 8.0,
        "one handshake per pooled connection: {pooled:?}"
    );
    assert_eq!(pooled.unclosed, 0.0);
    assert!(pooled.partner_open <= 8.0, "{pooled:?}");
    // The partner pool may keep its (at most 8) connections open while
    // idle, the MySQL pool grows with the worker's concurrency, and the
    // runtime may open a few of its own (slack 4).
    assert!(
        pooled.fds_after <= pooled.fds_before + 8.0 + pooled.mysql_growth + 4.0,
        "open fds back to the baseline plus the pools: {pooled:?}"
    );
    println!(
        "1000 calls: per-request opened {} connections (+{} fds, +{:.1} MiB RSS); shared opened {} (+{} fds of which {} MySQL, +{:.1} MiB RSS)",
        leaky.connections_opened,
        leaky.fds_after - leaky.fds_before,
        leaky.rss_growth_mib,
        pooled.connections_opened,
        pooled.fds_after - pooled.fds_before,
        pooled.mysql_growth,
        pooled.rss_growth_mib
    );
    Ok(())
}

/// One B whose unbounded worker meets poison rows every 100 ms tick, with a
/// pool of 4 connections; `rows` and `deadline` as given (the deadline
/// switch decides how long a query waits for a pooled connection).
async fn poisoned(rows: &str, deadline: &str) -> anyhow::Result<TestLab> {
    let rows = format!("faults.rows={rows}");
    let deadline = format!("faults.deadline={deadline}");
    let lab = TestLab::start(
        1,
        &[
            "mode=fixed",
            "faults.worker=unbounded",
            "service_a.backend_timeout=1s",
            &rows,
            &deadline,
            "mysql.pool_max=4",
            "worker.tick=100ms",
            "worker.batch=20",
            "worker.cpu_per_kib=0s",
            "partner.latency=5ms",
        ],
    )
    .await?;
    let inserted = lab.insert_jobs(20, 0.3).await?;
    anyhow::ensure!(inserted.poison > 0, "the seed gave no poison row");
    Ok(lab)
}

/// B's `lab_jobs_queued{status}`: job rows in MySQL with that status.
async fn queued(lab: &TestLab, status: &str) -> Option<f64> {
    lab.metric(B, "lab_jobs_queued", &[("status", status)])
        .await
}

/// B's `name{purpose="request"}`: its pool metrics for request queries.
async fn request_acquire(lab: &TestLab, name: &str) -> Option<f64> {
    lab.metric(B, name, &[("purpose", "request")]).await
}

async fn in_use(lab: &TestLab) -> Option<f64> {
    lab.metric(B, "lab_db_pool_connections", &[("state", "in_use")])
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leak_on_error_pins_the_pool_and_items_fail_fast_naming_it() -> anyhow::Result<()> {
    let lab = poisoned("leak-on-error", "propagate").await?;
    eventually(
        Duration::from_secs(20),
        "every pooled connection to be leaked",
        || async {
            let leaked = lab.metric(B, "lab_db_connections_leaked", &[]).await?;
            (leaked >= 4.0).then_some(())
        },
    )
    .await?;
    // Pinned: in use stays at the maximum, nothing comes back. The second
    // of watching is the measurement (ten worker ticks of 100 ms, each of
    // which would return a connection if any came back).
    let oldest_before = metric(&lab, B, "lab_db_oldest_checkout_seconds").await?;
    for _ in 0..10 {
        assert_eq!(in_use(&lab).await, Some(4.0), "pool pinned at its maximum");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A leak, not a busy pool: the job connections never come back, so the
    // oldest checkout ages with the clock (a busy one would be back within
    // mysql.query_timeout and the oldest would stay young).
    let oldest_after = metric(&lab, B, "lab_db_oldest_checkout_seconds").await?;
    let held_by_jobs = lab
        .metric(B, "lab_db_connections_in_use", &[("purpose", "job")])
        .await;
    println!(
        "leak-on-error: oldest checkout {oldest_before:.2} s → {oldest_after:.2} s, \
         {held_by_jobs:?} held by jobs"
    );
    assert_eq!(
        held_by_jobs,
        Some(4.0),
        "the leaked connections are the worker's"
    );
    // The queue as MySQL holds it, read by B on a connection of its own
    // (the pool is gone): rows stay pending, and the oldest one ages.
    let oldest_pending = || async {
        let pending = queued(&lab, "pending").await?;
        let oldest = lab
            .metric(B, "lab_jobs_oldest_pending_seconds", &[])
            .await?;
        (pending > 0.0 && oldest > 0.0).then_some(oldest)
    };
    let first = eventually(
        Duration::from_secs(10),
        "pending jobs in B's queue gauges",
        oldest_pending,
    )
    .await?;
    let later = eventually(
        Duration::from_secs(10),
        "the oldest pending job to age",
        || async { oldest_pending().await.filter(|o| *o >= first + 1.5) },
    )
    .await?;
    println!("leak-on-error: oldest pending job {first:.1} s → {later:.1} s old");
    assert!(
        oldest_after >= oldest_before + 0.9,
        "the oldest checkout ages by the second watched: {oldest_before} → {oldest_after}"
    );
    let timeouts_before = request_acquire(&lab, "lab_db_acquire_timeouts_total").await;
    let waited_before = request_acquire(&lab, "lab_db_acquire_wait_seconds_sum").await;
    let (status, _, body, elapsed) = get_json(&format!("{}/api/items/1", lab.a_url())).await?;
    println!("leak-on-error: GET /api/items/1 → {status} in {elapsed:?}: {body}");
    // The request waited out mysql.acquire_timeout (500 ms) for a
    // connection and gave up: counted as a timeout, its wait recorded.
    let timeouts_after = request_acquire(&lab, "lab_db_acquire_timeouts_total").await;
    let waited_after = request_acquire(&lab, "lab_db_acquire_wait_seconds_sum").await;
    println!(
        "leak-on-error: request acquire timeouts {timeouts_before:?} → {timeouts_after:?}, \
         wait sum {waited_before:?} → {waited_after:?} s"
    );
    assert_eq!(
        timeouts_after,
        timeouts_before.map(|n| n + 1.0),
        "one acquire timeout for the request"
    );
    let waited = waited_after.unwrap_or(0.0) - waited_before.unwrap_or(0.0);
    assert!(
        (0.45..0.9).contains(&waited),
        "the request's wait (~mysql.acquire_timeout) is in the histogram: {waited} s"
    );
    assert_eq!(status, 503, "{body}");
    let error = body["error"].as_str().unwrap_or_default();
    assert!(error.contains("pool exhausted"), "names the cause: {body}");
    // mysql.acquire_timeout is 500 ms; A's deadline is 1 s.
    assert!(
        elapsed < Duration::from_millis(900),
        "fails fast, not at A's deadline: {elapsed:?}"
    );
    let (ready, _, why, _) = get_json(&format!("{}/readyz", lab.admin_url(B)?)).await?;
    assert_eq!(ready, 503, "{why}");
    assert!(
        why["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("pool exhausted"),
        "{why}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_releases_the_connection_and_dead_letters_the_bad_row() -> anyhow::Result<()> {
    let lab = poisoned("close", "propagate").await?;
    let db = lab.db().await?;
    let poison = count(
        &db,
        "SELECT COUNT(*) FROM jobs WHERE HEX(payload) LIKE 'FFFEFD%'",
    )
    .await?;
    eventually(
        Duration::from_secs(20),
        "every row done or dead-lettered",
        || async {
            let open = count(
                &db,
                "SELECT COUNT(*) FROM jobs WHERE status NOT IN ('done', 'dead')",
            )
            .await
            .ok()?;
            (open == 0).then_some(())
        },
    )
    .await?;
    let dead = count(
        &db,
        "SELECT COUNT(*) FROM jobs WHERE status = 'dead' AND last_error LIKE '%failed to decode%'",
    )
    .await?;
    assert_eq!(
        lab.metric(B, "lab_db_connections_leaked", &[]).await,
        Some(0.0),
        "no connection is kept after a bad row"
    );
    assert_eq!(
        dead, poison,
        "each poison row dead-lettered with the reason"
    );
    // Every connection came back: none stays checked out (the worker's
    // 100 ms ticks take one briefly, so wait for a moment with none).
    eventually(
        Duration::from_secs(5),
        "no pooled connection in use",
        || async { (in_use(&lab).await? == 0.0).then_some(()) },
    )
    .await?;
    assert_eq!(
        lab.metric(B, "lab_db_acquire_waiting", &[]).await,
        Some(0.0),
        "nothing waits for the pool"
    );
    // The queue as MySQL holds it, read by B on its own connection.
    let total = count(&db, "SELECT COUNT(*) FROM jobs").await?;
    eventually(
        Duration::from_secs(10),
        "B's queue gauges to show every row done or dead",
        || async {
            let dead = queued(&lab, "dead").await?;
            let done = queued(&lab, "done").await?;
            let pending = queued(&lab, "pending").await?;
            let oldest = lab
                .metric(B, "lab_jobs_oldest_pending_seconds", &[])
                .await?;
            let expected = (poison as f64, (total - poison) as f64, 0.0, 0.0);
            ((dead, done, pending, oldest) == expected).then_some(())
        },
    )
    .await?;
    let (status, _, body, _) = get_json(&format!("{}/api/items/1", lab.a_url())).await?;
    assert_eq!(status, 200, "items keep being served: {body}");
    println!("close: {poison} poison rows dead-lettered, the pool back to 0 in use");
    Ok(())
}

/// `deadline = "ignore"` waits for a pooled connection like Go's
/// `database/sql`: with the pool leaked away, a request hangs in B until A
/// gives up at its deadline, and B goes on waiting for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_ignore_an_exhausted_pool_hangs_requests_past_the_deadline() -> anyhow::Result<()> {
    let lab = poisoned("leak-on-error", "ignore").await?;
    eventually(
        Duration::from_secs(20),
        "every pooled connection to be leaked",
        || async {
            let leaked = lab.metric(B, "lab_db_connections_leaked", &[]).await?;
            (leaked >= 4.0).then_some(())
        },
    )
    .await?;
    let waiting_before = metric(&lab, B, "lab_db_acquire_waiting").await?;
    let (status, _, body, elapsed) = get_json(&format!("{}/api/items/1", lab.a_url())).await?;
    println!("ignore: GET /api/items/1 → {status} in {elapsed:?}: {body}");
    assert_eq!(status, 504, "A gave up at its deadline: {body}");
    assert!(
        elapsed >= Duration::from_millis(950),
        "B did not fail fast, it waited: {elapsed:?}"
    );
    // The request's work is detached: it still waits for a connection
    // after A has answered.
    let waiting_after = metric(&lab, B, "lab_db_acquire_waiting").await?;
    assert!(
        waiting_after >= waiting_before + 1.0,
        "the abandoned request still waits in B: {waiting_before} → {waiting_after}"
    );
    // Waits without a bound never time out: the signal that tells this
    // pool apart from the bounded one, which fails requests fast.
    assert_eq!(
        request_acquire(&lab, "lab_db_acquire_timeouts_total").await,
        Some(0.0),
        "an unbounded wait never gives up"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_partner_fails_shared_calls_in_time_and_jobs_retry_with_backoff()
-> anyhow::Result<()> {
    let lab = TestLab::start(
        1,
        &[
            "mode=fixed",
            "worker.pool_size=4",
            "worker.tick=50ms",
            "worker.cpu_per_kib=0s",
            "worker.retry_backoff=200ms",
            "worker.max_attempts=20",
            "partner.latency=10ms",
            "partner.client_timeout=300ms",
        ],
    )
    .await?;
    // SIGSTOP: the kernel still accepts connections, nothing answers — a
    // partner that is slow without end.
    lab.stack.signal(PARTNER, Signal::SIGSTOP)?;
    lab.insert_jobs(4, 0.0).await?;
    // The outage is the measurement: 3 s is ten partner.client_timeouts,
    // enough for every job to time out and be retried several times.
    let frozen = Duration::from_secs(3);
    tokio::time::sleep(frozen).await;
    let timeouts = lab
        .metric(B, "lab_partner_calls_total", &[("outcome", "timeout")])
        .await
        .unwrap_or(0.0);
    let db = lab.db().await?;
    let max_attempts: i64 = count(&db, "SELECT CAST(MAX(attempts) AS SIGNED) FROM jobs").await?;
    let min_attempts: i64 = count(&db, "SELECT CAST(MIN(attempts) AS SIGNED) FROM jobs").await?;
    lab.stack.signal(PARTNER, Signal::SIGCONT)?;
    all_done(&db, 4, Duration::from_secs(30)).await?;
    let retries = lab
        .metric(B, "lab_jobs_total", &[("outcome", "retry")])
        .await
        .unwrap_or(0.0);
    println!(
        "partner frozen {frozen:?}: {timeouts} calls timed out, {retries} retries, {min_attempts} to {max_attempts} attempts per job"
    );
    assert!(timeouts >= 4.0, "calls ended at the client timeout");
    // Had a call held its slot until worker.job_timeout (10 s), no job
    // would have had a second attempt within the 3 s.
    assert!(
        min_attempts >= 2,
        "every job's slot came free for a retry: {min_attempts}"
    );
    assert!(retries >= 4.0, "failed attempts were retried");
    // Without backoff a 300 ms timeout retries ~8 times in 3 s; with a
    // 200 ms base doubling per attempt, at most 5 attempts fit.
    assert!(
        (2..=6).contains(&max_attempts),
        "retries backed off: {max_attempts} attempts in {frozen:?}"
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM jobs WHERE status <> 'done'").await?,
        0,
        "no job lost or failed"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_that_is_down_fails_calls_at_once_and_jobs_wait_out_their_backoff()
-> anyhow::Result<()> {
    let lab = TestLab::start(
        1,
        &[
            "mode=fixed",
            "worker.tick=50ms",
            "worker.cpu_per_kib=0s",
            "worker.retry_backoff=2s",
            "worker.max_attempts=20",
        ],
    )
    .await?;
    lab.stack.signal(PARTNER, Signal::SIGKILL)?;
    lab.insert_jobs(4, 0.0).await?;
    // Connection refused: each call fails at once, well inside the 2 s
    // client timeout, and every job goes back to pending with a backoff.
    let db = lab.db().await?;
    eventually(
        Duration::from_secs(10),
        "every job waiting to retry",
        || async {
            let waiting = count(
                &db,
                "SELECT COUNT(*) FROM jobs WHERE status = 'pending' AND not_before > NOW(3)",
            )
            .await
            .ok()?;
            (waiting == 4).then_some(())
        },
    )
    .await?;
    let errors = lab
        .metric(B, "lab_partner_calls_total", &[("outcome", "error")])
        .await
        .unwrap_or(0.0);
    let slow = lab
        .metric(
            B,
            "lab_partner_call_duration_seconds_bucket",
            &[("le", "0.5")],
        )
        .await
        .unwrap_or(0.0);
    let alive = metric(&lab, B, "lab_worker_tasks_alive").await?;
    println!("partner down: {errors} calls failed, {slow} within 0.5 s, {alive} tasks alive");
    assert!(errors >= 4.0, "the calls failed");
    assert_eq!(slow, errors, "each within 0.5 s, not at a timeout");
    assert_eq!(
        alive, 0.0,
        "no worker slot held while jobs wait out the backoff"
    );
    Ok(())
}
