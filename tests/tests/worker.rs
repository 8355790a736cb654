//! Cause 2, the job worker, on real MariaDB: the unbounded loop's pile-up,
//! the capped patch's overshoot and duplicates, and the bounded pool's
//! exactly-once processing, dead-lettering and crash recovery.

use std::time::Duration;

use lab_tests::{TestLab, eventually};
use nix::sys::signal::Signal;

/// Samples a gauge every 50 ms for `window`; returns the highest value.
/// The window is the measurement: callers size it from the configured
/// durations of what they watch.
async fn max_over(lab: &TestLab, service: &str, metric: &str, window: Duration) -> f64 {
    let end = tokio::time::Instant::now() + window;
    let mut max: f64 = 0.0;
    while tokio::time::Instant::now() < end {
        if let Some(v) = lab.metric(service, metric, &[]).await {
            max = max.max(v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    max
}

async fn count(db: &sqlx::MySqlPool, sql: &'static str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(db).await?)
}

/// Waits until no job is pending or running.
async fn drained(db: &sqlx::MySqlPool, timeout: Duration) -> anyhow::Result<()> {
    eventually(timeout, "every job to finish", || async {
        let open = count(
            db,
            "SELECT COUNT(*) FROM jobs WHERE status IN ('pending', 'running')",
        )
        .await
        .ok()?;
        (open == 0).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unbounded_worker_piles_up_tasks_and_runs_jobs_twice() -> anyhow::Result<()> {
    const TICK: Duration = Duration::from_millis(200);
    const BATCH: f64 = 50.0;
    const PARTNER_LATENCY: Duration = Duration::from_secs(2);
    let lab = TestLab::start(
        1,
        &[
            "faults.worker=unbounded",
            &format!("worker.tick={}ms", TICK.as_millis()),
            &format!("worker.batch={BATCH}"),
            &format!("partner.latency={}ms", PARTNER_LATENCY.as_millis()),
            "worker.cpu_per_kib=0s",
        ],
    )
    .await?;
    lab.insert_jobs(300, 0.0).await?;
    // The mechanism: every tick starts a task for each of the first BATCH
    // pending rows — the same rows again while earlier tasks still handle
    // them — and each task lives as long as its partner call. In steady
    // state, then, BATCH × PARTNER_LATENCY / TICK tasks are alive (500).
    // Tolerance: ticks slip by the time their query takes, so fewer are
    // started, and tasks outlive the call by their TLS handshake and row
    // writes, so more stay alive; both are small next to 200 ms and 2 s.
    // A worker that caps its tasks or slows its ticks falls below 80 %.
    let expected = BATCH * PARTNER_LATENCY.as_secs_f64() / TICK.as_secs_f64();
    let (low, high) = (0.8 * expected, 1.3 * expected);
    // The measured window: steady state comes one partner latency after the
    // first tick; a second more lets the peak show.
    let peak = max_over(
        &lab,
        "service-b-1",
        "lab_worker_tasks_alive",
        PARTNER_LATENCY + Duration::from_secs(1),
    )
    .await;
    assert!(
        (low..=high).contains(&peak),
        "alive tasks peaked at {peak}; the mechanism makes {expected} (accepting {low} to {high})"
    );
    let duplicates = lab
        .metric("service-b-1", "lab_jobs_duplicate_total", &[])
        .await
        .unwrap_or(0.0);
    assert!(
        duplicates > 0.0,
        "the same rows were started again while running"
    );
    let db = lab.db().await?;
    let rerun = count(&db, "SELECT COUNT(*) FROM jobs WHERE attempts > 1").await?;
    assert!(rerun > 0, "attempts > 1 in MySQL too");
    println!(
        "unbounded: peak {peak} alive tasks (expected {expected}), {duplicates} duplicate starts, {rerun} jobs attempted more than once"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capped_worker_overshoots_its_cap_and_still_duplicates() -> anyhow::Result<()> {
    let cap = 60.0;
    let lab = TestLab::start(
        1,
        &[
            "faults.worker=capped",
            "worker.cap=60",
            "worker.batch=50",
            "worker.tick=200ms",
            "worker.cap_sleep=500ms",
            "partner.latency=2s",
            "worker.cpu_per_kib=0s",
        ],
    )
    .await?;
    lab.insert_jobs(300, 0.0).await?;
    let peak = max_over(
        &lab,
        "service-b-1",
        "lab_worker_tasks_alive",
        Duration::from_secs(3),
    )
    .await;
    assert!(peak > cap, "the cap of {cap} was overshot: peak {peak}");
    assert!(peak <= cap + 50.0, "by at most a batch: peak {peak}");
    let duplicates = lab
        .metric("service-b-1", "lab_jobs_duplicate_total", &[])
        .await
        .unwrap_or(0.0);
    assert!(
        duplicates > 0.0,
        "rows in flight were fetched and started again"
    );
    println!("capped: cap {cap}, peak {peak} alive, {duplicates} duplicate starts");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_pool_on_two_backends_runs_every_job_exactly_once() -> anyhow::Result<()> {
    let pool_size = 8.0;
    let lab = TestLab::start(
        2,
        &[
            "faults.worker=bounded",
            "faults.rows=close",
            "faults.http_client=shared",
            "worker.pool_size=8",
            "worker.tick=100ms",
            "partner.latency=10ms",
            "worker.cpu_per_kib=1ms",
        ],
    )
    .await?;
    let inserted = lab.insert_jobs(2000, 0.01).await?;
    assert_eq!(inserted.inserted, 2000);
    let db = lab.db().await?;

    // Sample both pools while they work.
    let sampling = async {
        let mut peaks = [0.0f64; 2];
        loop {
            for (i, b) in ["service-b-1", "service-b-2"].iter().enumerate() {
                if let Some(v) = lab.metric(b, "lab_worker_tasks_alive", &[]).await {
                    peaks[i] = peaks[i].max(v);
                }
            }
            let open = count(
                &db,
                "SELECT COUNT(*) FROM jobs WHERE status IN ('pending', 'running')",
            )
            .await?;
            if open == 0 {
                return anyhow::Ok(peaks);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let peaks = tokio::time::timeout(Duration::from_secs(90), sampling).await??;
    for (b, peak) in ["b-1", "b-2"].iter().zip(peaks) {
        assert!(
            peak <= pool_size,
            "{b}: {peak} tasks alive, pool is {pool_size}"
        );
        assert!(peak >= 1.0, "{b} took part");
    }
    for b in ["service-b-1", "service-b-2"] {
        assert_eq!(
            lab.metric(b, "lab_jobs_duplicate_total", &[]).await,
            Some(0.0),
            "{b}"
        );
    }
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM jobs WHERE attempts <> 1").await?,
        0,
        "every job attempted once"
    );
    let dead = count(&db, "SELECT COUNT(*) FROM jobs WHERE status = 'dead'").await?;
    assert_eq!(dead as u64, inserted.poison, "poison rows dead-lettered");
    let explained = count(
        &db,
        "SELECT COUNT(*) FROM jobs WHERE status = 'dead' AND last_error LIKE '%UTF-8%'",
    )
    .await?;
    assert_eq!(explained, dead, "each dead row says why");
    let done = count(&db, "SELECT COUNT(*) FROM jobs WHERE status = 'done'").await?;
    assert_eq!(done as u64, 2000 - inserted.poison);
    let by_b: Vec<(String, i64)> = sqlx::query_as(
        "SELECT claimed_by, COUNT(*) FROM jobs GROUP BY claimed_by ORDER BY claimed_by",
    )
    .fetch_all(&db)
    .await?;
    println!(
        "bounded: peaks {peaks:?} (pool {pool_size}), {done} done, {dead} dead, split {by_b:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_backends_claims_are_finished_by_the_other() -> anyhow::Result<()> {
    let lab = TestLab::start(
        2,
        &[
            "faults.worker=bounded",
            "faults.rows=close",
            "faults.http_client=shared",
            "worker.pool_size=8",
            "worker.tick=100ms",
            "partner.latency=400ms",
            "worker.cpu_per_kib=0s",
            "worker.visibility_timeout=2s",
            "worker.job_timeout=1s",
        ],
    )
    .await?;
    lab.insert_jobs(200, 0.0).await?;
    let db = lab.db().await?;
    eventually(Duration::from_secs(10), "b-2 to hold claims", || async {
        let held = count(
            &db,
            "SELECT COUNT(*) FROM jobs WHERE status = 'running' AND claimed_by = 'b-2'",
        )
        .await
        .ok()?;
        (held > 0).then_some(())
    })
    .await?;
    lab.stack.signal("service-b-2", Signal::SIGKILL)?;
    drained(&db, Duration::from_secs(60)).await?;
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM jobs WHERE status <> 'done'").await?,
        0,
        "no job lost"
    );
    let reclaimed = count(
        &db,
        "SELECT COUNT(*) FROM jobs WHERE attempts = 2 AND claimed_by = 'b-1'",
    )
    .await?;
    assert!(reclaimed > 0, "b-1 finished the jobs b-2 held when it died");
    println!("crash: {reclaimed} jobs reclaimed by b-1 after the visibility timeout");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bounded_pool_retries_a_timing_out_job_then_marks_it_failed() -> anyhow::Result<()> {
    let lab = TestLab::start(
        1,
        &[
            "faults.worker=bounded",
            "faults.http_client=shared",
            "worker.tick=100ms",
            "worker.retry_backoff=100ms",
            "partner.latency=1s",
            "worker.job_timeout=200ms",
            "worker.max_attempts=2",
            "worker.cpu_per_kib=0s",
        ],
    )
    .await?;
    lab.insert_jobs(3, 0.0).await?;
    let db = lab.db().await?;
    drained(&db, Duration::from_secs(20)).await?;
    let failed: Vec<(u32, Option<String>)> =
        sqlx::query_as("SELECT attempts, last_error FROM jobs WHERE status = 'failed'")
            .fetch_all(&db)
            .await?;
    assert_eq!(failed.len(), 3, "every job gave up: {failed:?}");
    for (attempts, error) in &failed {
        assert_eq!(*attempts, 2, "retried up to worker.max_attempts");
        assert!(
            error.as_deref().unwrap_or_default().contains("job_timeout"),
            "{error:?}"
        );
    }
    let retries = lab
        .metric("service-b-1", "lab_jobs_total", &[("outcome", "retry")])
        .await;
    assert_eq!(retries, Some(3.0));
    Ok(())
}
