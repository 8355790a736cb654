//! B's four switches flipped live with `PUT /faults` (issue #10, item 5):
//! each flip is judged by what B does next — metrics that start or stop
//! moving, rows in MySQL — and `GET /faults` and `lab_fault_info` must
//! agree with it. One lab per switch, several flips in sequence in each.

use std::time::Duration;

use lab_tests::{TestLab, eventually, get_json};
use serde_json::{Value, json};

const B: &str = "service-b-1";

async fn count(db: &sqlx::MySqlPool, sql: &'static str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(db).await?)
}

/// A metric of B; a missing one is 0 (counters with labels appear only once
/// counted).
async fn b_metric(lab: &TestLab, metric: &str, labels: &[(&str, &str)]) -> f64 {
    lab.metric(B, metric, labels).await.unwrap_or(0.0)
}

/// `PUT /faults {switch: value}` on B; checks the answer names the change,
/// and that `GET /faults` and `lab_fault_info` show the new value in force.
/// (What the flip *does* is each test's business.)
async fn flip(lab: &TestLab, switch: &str, value: &str) -> anyhow::Result<()> {
    let patch = json!({ switch: value }).to_string();
    let response = lab.operator(B, "PUT", "/faults", Some(patch)).await?;
    let status = response.status().as_u16();
    let body: Value = serde_json::from_slice(&response.bytes().await?)?;
    anyhow::ensure!(
        status == 200,
        "PUT /faults {switch}={value}: {status} {body}"
    );
    anyhow::ensure!(
        body["changed"]
            .as_array()
            .is_some_and(|c| c.iter().any(|f| f["switch"] == switch && f["to"] == value)),
        "the answer names the flip: {body}"
    );
    let (_, _, shown, _) = get_json(&format!("{}/faults", lab.admin_url(B)?)).await?;
    anyhow::ensure!(
        shown["faults"][switch] == value,
        "GET /faults shows {switch}={value}: {shown}"
    );
    for other in lab_common::faults::Switch::SERVICE_B
        .iter()
        .find(|s| s.name() == switch)
        .map(|s| s.values())
        .unwrap_or_default()
    {
        let expected = if other == value { 1.0 } else { 0.0 };
        let info = lab
            .metric(B, "lab_fault_info", &[("switch", switch), ("value", other)])
            .await;
        anyhow::ensure!(
            info == Some(expected),
            "lab_fault_info{{switch={switch},value={other}}} should be {expected}"
        );
    }
    Ok(())
}

/// Inserts `rate` jobs a second until dropped (the inflow a flip meets).
struct Inflow(tokio::task::JoinHandle<()>);

impl Inflow {
    fn start(lab: &TestLab, rate: f64, poison_ratio: f64) -> Self {
        let spec = labctl::jobs::JobSpec {
            mysql_url: lab.stack.config.mysql.url.clone(),
            rate,
            duration: Duration::from_secs(600),
            poison_ratio,
            payload_bytes: 256,
            seed: 11,
        };
        Self(tokio::spawn(async move {
            if let Err(e) = labctl::jobs::produce(&spec).await {
                eprintln!("job inflow stopped: {e:#}");
            }
        }))
    }
}

impl Drop for Inflow {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Waits until `metric` rises above its value now: something just started.
async fn rises(
    lab: &TestLab,
    metric: &str,
    labels: &[(&str, &str)],
    timeout: Duration,
) -> anyhow::Result<f64> {
    let before = b_metric(lab, metric, labels).await;
    eventually(timeout, &format!("{metric}{labels:?} to rise"), || async {
        let now = b_metric(lab, metric, labels).await;
        (now > before).then_some(now)
    })
    .await
}

/// Samples `metric` every 50 ms for `window` (the measurement); returns
/// (min, max).
async fn range_over(
    lab: &TestLab,
    metric: &str,
    labels: &[(&str, &str)],
    window: Duration,
) -> (f64, f64) {
    let end = tokio::time::Instant::now() + window;
    let (mut min, mut max) = (f64::MAX, f64::MIN);
    while tokio::time::Instant::now() < end {
        let v = b_metric(lab, metric, labels).await;
        min = min.min(v);
        max = max.max(v);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (min, max)
}

/// Runs `action` (a flip) while sampling `metric` every 20 ms, from before
/// it starts until `after` past its end; returns its result and the highest
/// value seen. A gauge the flip raises and the end of tasks lowers again is
/// caught at its peak wherever that falls — a single read after the flip
/// could come too late and see 0.
async fn peak_around<T>(
    lab: &TestLab,
    metric: &str,
    after: Duration,
    action: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, f64)> {
    let ended = std::sync::OnceLock::new();
    let act = async {
        let result = action.await;
        let _ = ended.set(tokio::time::Instant::now());
        result
    };
    let sample = async {
        let mut peak = f64::MIN;
        loop {
            peak = peak.max(b_metric(lab, metric, &[]).await);
            if ended.get().is_some_and(|end| end.elapsed() >= after) {
                return peak;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    let (result, peak) = tokio::join!(act, sample);
    Ok((result?, peak))
}

/// worker: unbounded → bounded → unbounded under a steady inflow.
///
/// The settings keep `unbounded` from running jobs twice by itself: a job
/// takes about `partner.latency` (400 ms, 32 partner connections for at
/// most 20 jobs a tick), well below the 1 s tick, so every row a tick reads
/// is done before the next tick reads again (asserted before the first
/// flip and again at the end). Any duplicate, then, comes from a flip. Each
/// flip is made just after the old loop started a batch, so its tasks are
/// in flight when the new loop starts — the case that could run a job
/// twice: the old `unbounded` tasks hold rows that are still `pending`,
/// first in line for the new `bounded` loop's claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_flips_replace_the_loop_and_run_no_job_twice() -> anyhow::Result<()> {
    const TICK: Duration = Duration::from_secs(1);
    let lab = TestLab::start(
        1,
        &[
            "faults.worker=unbounded",
            "faults.http_client=shared",
            "faults.rows=close",
            "faults.deadline=propagate",
            "worker.tick=1s",
            "worker.batch=20",
            "worker.pool_size=8",
            "worker.cpu_per_kib=0s",
            "partner.latency=400ms",
            "partner.client_max_connections=32",
        ],
    )
    .await?;
    let db = lab.db().await?;
    let lag = |mode: &'static str| [("mode", mode)];
    let inflow = Inflow::start(&lab, 10.0, 0.0);

    // unbounded, before any flip: a few ticks' worth of jobs, none twice.
    for _ in 0..2 {
        rises(
            &lab,
            "lab_job_lag_seconds_count",
            &lag("unbounded"),
            TICK * 3,
        )
        .await?;
    }
    assert_eq!(
        b_metric(&lab, "lab_jobs_duplicate_total", &[]).await,
        0.0,
        "unbounded runs no job twice by itself with these settings"
    );

    // Flip 1, right as a tick starts its batch.
    rises(
        &lab,
        "lab_job_lag_seconds_count",
        &lag("unbounded"),
        TICK * 3,
    )
    .await?;
    let ((), inherited) = peak_around(
        &lab,
        "lab_worker_old_loop_tasks_alive",
        TICK / 2,
        flip(&lab, "worker", "bounded"),
    )
    .await?;
    let unbounded_started = b_metric(&lab, "lab_job_lag_seconds_count", &lag("unbounded")).await;
    assert!(
        inherited > 0.0,
        "the old loop's tasks were in flight at the flip (peak of the gauge): {inherited}"
    );
    eventually(TICK * 3, "the old loop's tasks to end", || async {
        (b_metric(&lab, "lab_worker_old_loop_tasks_alive", &[]).await == 0.0).then_some(())
    })
    .await?;
    // bounded claims: rows go `running` (only a claim does that).
    eventually(TICK * 3, "a bounded claim", || async {
        let running = count(&db, "SELECT COUNT(*) FROM jobs WHERE status = 'running'")
            .await
            .ok()?;
        (running > 0).then_some(())
    })
    .await?;
    // Two ticks of the old loop: it would have started a batch in each.
    let (_, loops) = range_over(&lab, "lab_worker_loops_running", &[], TICK * 2).await;
    assert_eq!(loops, 1.0, "one loop at a time");
    assert_eq!(
        b_metric(&lab, "lab_job_lag_seconds_count", &lag("unbounded")).await,
        unbounded_started,
        "the unbounded loop started nothing after the flip"
    );
    assert_eq!(
        b_metric(
            &lab,
            "lab_worker_loops_started_total",
            &[("mode", "bounded")]
        )
        .await,
        1.0
    );

    // Flip 2, right as the bounded loop starts a job.
    rises(&lab, "lab_job_lag_seconds_count", &lag("bounded"), TICK * 3).await?;
    let ((), inherited_back) = peak_around(
        &lab,
        "lab_worker_old_loop_tasks_alive",
        TICK / 2,
        flip(&lab, "worker", "unbounded"),
    )
    .await?;
    assert!(
        inherited_back > 0.0,
        "the bounded loop's tasks were in flight at the flip (peak of the gauge): {inherited_back}"
    );
    eventually(
        TICK * 3,
        "the bounded loop's tasks and claims to end",
        || async {
            let old = b_metric(&lab, "lab_worker_old_loop_tasks_alive", &[]).await;
            let running = count(&db, "SELECT COUNT(*) FROM jobs WHERE status = 'running'")
                .await
                .ok()?;
            (old == 0.0 && running == 0).then_some(())
        },
    )
    .await?;
    let bounded_started = b_metric(&lab, "lab_job_lag_seconds_count", &lag("bounded")).await;
    rises(
        &lab,
        "lab_job_lag_seconds_count",
        &lag("unbounded"),
        TICK * 3,
    )
    .await?;
    // Two more ticks: the bounded loop claims nothing more.
    let (_, loops) = range_over(&lab, "lab_worker_loops_running", &[], TICK * 2).await;
    assert_eq!(loops, 1.0, "one loop at a time");
    assert_eq!(
        b_metric(&lab, "lab_job_lag_seconds_count", &lag("bounded")).await,
        bounded_started,
        "the bounded loop started nothing after the flip"
    );
    assert_eq!(
        count(&db, "SELECT COUNT(*) FROM jobs WHERE status = 'running'").await?,
        0,
        "no claim after the flip"
    );
    assert_eq!(
        b_metric(
            &lab,
            "lab_worker_loops_started_total",
            &[("mode", "unbounded")]
        )
        .await,
        2.0
    );

    // Every job once: by B's count and by MySQL's.
    drop(inflow);
    eventually(Duration::from_secs(15), "every job to be done", || async {
        let open = count(&db, "SELECT COUNT(*) FROM jobs WHERE status <> 'done'")
            .await
            .ok()?;
        (open == 0).then_some(())
    })
    .await?;
    let jobs = count(&db, "SELECT COUNT(*) FROM jobs").await?;
    let duplicates = b_metric(&lab, "lab_jobs_duplicate_total", &[]).await;
    let twice = count(&db, "SELECT COUNT(*) FROM jobs WHERE attempts <> 1").await?;
    println!(
        "worker flips: {inherited} old unbounded tasks and {inherited_back} old bounded tasks \
         in flight at the flips; {jobs} jobs, {duplicates} duplicate starts, \
         {twice} attempted other than once"
    );
    assert_eq!(duplicates, 0.0, "no job started twice across the flips");
    assert_eq!(twice, 0, "every job attempted exactly once");
    Ok(())
}

/// deadline: ignore → propagate → ignore, with B's handler (600 ms) slower
/// than A's deadline (300 ms). Also: a refused patch changes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_flips_apply_to_the_next_request() -> anyhow::Result<()> {
    const HANDLER_LATENCY: Duration = Duration::from_millis(600);
    const CALLS: usize = 8;
    const MAX_CONCURRENT: usize = 4;
    let lab = TestLab::start(
        1,
        &[
            "faults.deadline=ignore",
            "service_a.backend_timeout=300ms",
            "service_b.handler_latency=600ms",
            "service_b.max_concurrent_requests=4",
            "worker.enabled=false",
        ],
    )
    .await?;
    let burst = || async {
        let url = format!("{}/api/items/1", lab.a_url());
        let calls = (0..CALLS).map(|_| get_json(&url));
        let mut statuses = Vec::new();
        for call in futures::future::join_all(calls).await {
            let (status, _, _, elapsed) = call?;
            statuses.push((status, elapsed));
        }
        anyhow::Ok(statuses)
    };
    let late = || b_metric(&lab, "lab_work_after_deadline_total", &[]);
    let shed = || b_metric(&lab, "lab_requests_refused_total", &[("reason", "shed")]);

    // ignore: every call times out at A, and B finishes each one late.
    let calls = burst().await?;
    assert!(calls.iter().all(|(s, _)| *s == 504), "{calls:?}");
    eventually(
        HANDLER_LATENCY * 5,
        "B to finish every call late",
        || async { (late().await == CALLS as f64).then_some(()) },
    )
    .await?;
    assert_eq!(shed().await, 0.0, "ignore sheds nothing");

    flip(&lab, "deadline", "propagate").await?;
    // A patch with one bad entry is refused whole: `deadline` stays.
    let refused = lab
        .operator(
            B,
            "PUT",
            "/faults",
            Some(json!({"deadline": "ignore", "rows": "sometimes"}).to_string()),
        )
        .await?;
    assert_eq!(refused.status().as_u16(), 400);
    let body: Value = serde_json::from_slice(&refused.bytes().await?)?;
    let error = body["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("rows") && error.contains("leak-on-error, close"),
        "names the switch and its values: {body}"
    );
    assert_eq!(body["code"], "invalid_argument", "{body}");

    // propagate (still): beyond 4 in flight, shed at once; the rest cut at
    // the deadline; nothing finishes late.
    let calls = burst().await?;
    let shed_now = calls.iter().filter(|(s, _)| *s == 503).count();
    assert!(shed_now >= CALLS - MAX_CONCURRENT, "{calls:?}");
    assert!(
        calls
            .iter()
            .all(|(s, e)| matches!(s, 503 | 504) && *e < Duration::from_millis(400)),
        "answered within A's deadline: {calls:?}"
    );
    assert_eq!(shed().await, shed_now as f64);
    // Twice the handler latency: any work that outlived its caller would
    // have finished, and been counted, by then.
    let (_, late_max) = range_over(
        &lab,
        "lab_work_after_deadline_total",
        &[],
        HANDLER_LATENCY * 2,
    )
    .await;
    assert_eq!(late_max, CALLS as f64, "no late work under propagate");

    flip(&lab, "deadline", "ignore").await?;
    let calls = burst().await?;
    assert!(calls.iter().all(|(s, _)| *s == 504), "{calls:?}");
    eventually(HANDLER_LATENCY * 5, "late work again", || async {
        (late().await == 2.0 * CALLS as f64).then_some(())
    })
    .await?;
    assert_eq!(shed().await, shed_now as f64, "nothing shed under ignore");
    println!(
        "deadline flips: ignore {CALLS} late; propagate {shed_now} shed, 0 late; ignore {CALLS} late again"
    );
    Ok(())
}

/// http_client: per-request → shared → per-request under a steady inflow
/// through the bounded worker (one partner call per job).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_client_flips_stop_and_restart_building_clients() -> anyhow::Result<()> {
    const POOL: f64 = 4.0;
    let lab = TestLab::start(
        1,
        &[
            "mode=fixed",
            "faults.http_client=per-request",
            "worker.pool_size=4",
            "worker.tick=100ms",
            "worker.cpu_per_kib=0s",
            "partner.latency=20ms",
        ],
    )
    .await?;
    let _inflow = Inflow::start(&lab, 20.0, 0.0);
    let built = || b_metric(&lab, "lab_http_clients_built_total", &[]);
    let unclosed = || b_metric(&lab, "lab_http_responses_unclosed", &[]);
    let ok = || b_metric(&lab, "lab_partner_calls_total", &[("outcome", "ok")]);

    eventually(Duration::from_secs(10), "per-request clients", || async {
        (built().await >= 10.0).then_some(())
    })
    .await?;
    flip(&lab, "http_client", "shared").await?;
    let at_flip = built().await;
    // Calls in flight at the flip (at most the worker's pool) end in their
    // own form; by the time twice that many calls more have finished, they
    // have.
    let ok_at_flip = ok().await;
    eventually(Duration::from_secs(10), "calls after the flip", || async {
        (ok().await >= ok_at_flip + 2.0 * POOL).then_some(())
    })
    .await?;
    let settled = built().await;
    assert!(
        settled - at_flip <= 1.0 + POOL,
        "after the flip only the shared client and calls already in flight built one: \
         {at_flip} → {settled}"
    );
    let leaked = unclosed().await;
    assert!(
        leaked >= 10.0,
        "per-request calls left bodies open: {leaked}"
    );
    // Two seconds of inflow (40 jobs): calls go on, no client is built.
    let ok_before = ok().await;
    let (_, built_max) = range_over(
        &lab,
        "lab_http_clients_built_total",
        &[],
        Duration::from_secs(2),
    )
    .await;
    let calls_meanwhile = ok().await - ok_before;
    assert!(calls_meanwhile >= 20.0, "calls went on: {calls_meanwhile}");
    assert_eq!(built_max, settled, "no client built under shared");
    assert_eq!(
        unclosed().await,
        leaked,
        "what leaked stays leaked; shared leaks nothing more"
    );

    flip(&lab, "http_client", "per-request").await?;
    eventually(Duration::from_secs(10), "clients built again", || async {
        (built().await >= settled + 10.0 && unclosed().await >= leaked + 10.0).then_some(())
    })
    .await?;
    println!(
        "http_client flips: {at_flip} clients built under per-request, {} at the flip's end, \
         none in 2 s of shared ({calls_meanwhile} calls), building again after the flip back; \
         {leaked} responses left open stay open",
        settled - at_flip
    );
    Ok(())
}

/// rows: leak-on-error → close → leak-on-error with poison rows; then, the
/// pool leaked away, deadline ignore → propagate releases the queries that
/// wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_flips_stop_the_leak_and_deadline_flip_releases_pool_waiters() -> anyhow::Result<()> {
    const POOL_MAX: f64 = 6.0;
    let lab = TestLab::start(
        1,
        &[
            "mode=fixed",
            "faults.worker=unbounded",
            "faults.rows=leak-on-error",
            "faults.deadline=ignore",
            "service_a.backend_timeout=1s",
            "mysql.pool_max=6",
            "worker.tick=300ms",
            "worker.batch=20",
            "worker.cpu_per_kib=0s",
            "partner.latency=5ms",
        ],
    )
    .await?;
    let db = lab.db().await?;
    let leaked = || b_metric(&lab, "lab_db_connections_leaked", &[]);
    let poison_dead = || async {
        count(
            &db,
            "SELECT COUNT(*) FROM jobs WHERE status = 'dead' AND last_error LIKE '%failed to decode%'",
        )
        .await
    };
    let all_poison = || async {
        count(
            &db,
            "SELECT COUNT(*) FROM jobs WHERE HEX(payload) LIKE 'FFFEFD%'",
        )
        .await
    };
    // Every row done or dead-lettered, the poison ones dead with the reason.
    let settled = || async {
        eventually(
            Duration::from_secs(10),
            "every row done or dead",
            || async {
                let open = count(
                    &db,
                    "SELECT COUNT(*) FROM jobs WHERE status NOT IN ('done', 'dead')",
                )
                .await
                .ok()?;
                let poison = all_poison().await.ok()?;
                (open == 0 && poison_dead().await.ok()? == poison).then_some(())
            },
        )
        .await
    };

    // leak-on-error: a poison row leaks a connection each tick.
    anyhow::ensure!(lab.insert_jobs(10, 0.3).await?.poison > 0, "no poison row");
    eventually(
        Duration::from_secs(10),
        "two leaked connections",
        || async { (leaked().await >= 2.0).then_some(()) },
    )
    .await?;
    assert_eq!(
        poison_dead().await?,
        0,
        "leak-on-error dead-letters nothing"
    );

    flip(&lab, "rows", "close").await?;
    settled().await?;
    let kept = leaked().await;
    assert!(
        (2.0..POOL_MAX).contains(&kept),
        "connections leaked before the flip stay leaked: {kept}"
    );
    // New poison rows under close: dead-lettered, no leak.
    anyhow::ensure!(lab.insert_jobs(10, 0.3).await?.poison > 0, "no poison row");
    settled().await?;
    assert_eq!(leaked().await, kept, "close leaks nothing");

    // Back to leak-on-error: new poison rows leak the pool away.
    flip(&lab, "rows", "leak-on-error").await?;
    anyhow::ensure!(lab.insert_jobs(10, 0.3).await?.poison > 0, "no poison row");
    eventually(Duration::from_secs(10), "the pool leaked away", || async {
        (leaked().await >= POOL_MAX).then_some(())
    })
    .await?;

    // deadline = ignore: a query waits for a free connection as long as it
    // takes — A gives up at its deadline, B waits on.
    let item = format!("{}/api/items/1", lab.a_url());
    let (status, _, body, hung) = get_json(&item).await?;
    assert_eq!(status, 504, "{body}");
    assert!(hung >= Duration::from_millis(950), "{hung:?}");
    let waiting = b_metric(&lab, "lab_db_acquire_waiting", &[]).await;
    assert!(
        waiting >= 1.0,
        "the abandoned request still waits: {waiting}"
    );

    // propagate: the waits already under way end (each looks again every
    // mysql.acquire_timeout, 500 ms), and a new request fails fast, naming
    // the pool.
    flip(&lab, "deadline", "propagate").await?;
    eventually(
        Duration::from_secs(3),
        "the waiting queries to give up",
        || async { (b_metric(&lab, "lab_db_acquire_waiting", &[]).await == 0.0).then_some(()) },
    )
    .await?;
    let (status, _, body, elapsed) = get_json(&item).await?;
    assert_eq!(status, 503, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("pool exhausted"),
        "{body}"
    );
    assert!(
        elapsed < Duration::from_millis(900),
        "fails fast: {elapsed:?}"
    );
    println!(
        "rows flips: {kept} connections leaked before close stayed leaked, none after; \
         leak-on-error again leaked the pool ({POOL_MAX}); deadline flip: a request hung \
         {hung:?} (504), after the flip 503 in {elapsed:?}"
    );
    Ok(())
}
