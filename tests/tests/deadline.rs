//! Cause 3, deadlines: B ignoring its caller's deadline keeps working after
//! the caller gave up; propagating it stops the work, sheds the excess and
//! answers A within its deadline.
//!
//! Both tests watch the same signal, a side effect outside B: each call
//! submits a job, and B's work writes the job's row only when it completes,
//! `HANDLER_LATENCY` after the call reached B — well after A's deadline. A
//! row in MySQL is work B did for a caller that had already been answered
//! 504; B's own `lab_work_after_deadline_total` must agree with it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use lab_tests::{TestLab, eventually, request_json};

const DEADLINE: Duration = Duration::from_millis(300);
const HANDLER_LATENCY: Duration = Duration::from_millis(600);
const CALLS: usize = 20;
const MAX_CONCURRENT: usize = 4;

/// One call of the burst: which call, what A answered, how long it took,
/// and when the answer arrived (ms since the epoch, MySQL's clock too).
#[derive(Debug)]
struct Call {
    n: usize,
    status: u16,
    elapsed: Duration,
    answered_at_ms: i64,
}

fn epoch_ms() -> anyhow::Result<i64> {
    Ok(i64::try_from(
        SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis(),
    )?)
}

/// `CALLS` concurrent job submissions through A, call `n` with payload
/// `call-n`.
async fn burst(lab: &TestLab) -> anyhow::Result<Vec<Call>> {
    let url = format!("{}/api/jobs", lab.a_url());
    let calls = (0..CALLS).map(|n| {
        let url = url.clone();
        tokio::spawn(async move {
            let body = format!(r#"{{"payload":"call-{n}"}}"#);
            let (status, _, _, elapsed) = request_json("POST", &url, Some(body)).await?;
            anyhow::Ok(Call {
                n,
                status,
                elapsed,
                answered_at_ms: epoch_ms()?,
            })
        })
    });
    let mut out = Vec::new();
    for call in futures::future::join_all(calls).await {
        out.push(call??);
    }
    Ok(out)
}

/// The rows B's work wrote: (call number, written at in ms since the epoch).
async fn rows_written(db: &sqlx::MySqlPool) -> anyhow::Result<Vec<(usize, i64)>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT CAST(payload AS CHAR), \
                CAST(UNIX_TIMESTAMP(created_at) * 1000 AS SIGNED) FROM jobs",
    )
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|(payload, at)| {
            let n = payload
                .strip_prefix("call-")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("a row no call wrote: {payload:?}"))?;
            Ok((n, at))
        })
        .collect()
}

fn lab_args(mode: &'static str) -> [&'static str; 5] {
    [
        mode,
        "service_a.backend_timeout=300ms",
        "service_b.handler_latency=600ms",
        "service_b.max_concurrent_requests=4",
        "worker.enabled=false",
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignoring_the_deadline_leaves_work_running_after_the_caller_gave_up() -> anyhow::Result<()>
{
    let lab = TestLab::start(1, &lab_args("faults.deadline=ignore")).await?;
    let db = lab.db().await?;
    let calls = burst(&lab).await?;
    assert!(
        calls.iter().all(|c| c.status == 504),
        "A gave up on every call: {calls:?}"
    );
    // B's detached work completes HANDLER_LATENCY after each call arrived,
    // after A's 504: every call's row appears anyway.
    let rows = eventually(
        HANDLER_LATENCY * 10,
        "B's detached work to write every row",
        || async {
            let rows = rows_written(&db).await.ok()?;
            (rows.len() == CALLS).then_some(rows)
        },
    )
    .await?;
    for (n, written_at_ms) in &rows {
        let call = calls
            .iter()
            .find(|c| c.n == *n)
            .ok_or_else(|| anyhow::anyhow!("row for unknown call {n}"))?;
        assert!(
            *written_at_ms > call.answered_at_ms,
            "call {n}'s row was written at {written_at_ms} ms, after A answered it {} at {} ms",
            call.status,
            call.answered_at_ms
        );
    }
    let late = lab
        .metric("service-b-1", "lab_work_after_deadline_total", &[])
        .await;
    assert_eq!(late, Some(CALLS as f64), "B counts the same late work");
    let shed = lab
        .metric("service-b-1", "lab_requests_refused_total", &[])
        .await;
    assert_eq!(shed, Some(0.0), "nothing was shed");
    let first_answer = calls.iter().map(|c| c.answered_at_ms).min().unwrap_or(0);
    let last_row = rows.iter().map(|(_, at)| *at).max().unwrap_or(0);
    println!(
        "ignore: {CALLS} calls answered 504, {} rows written after their answers, \
         the last {} ms after the first answer",
        rows.len(),
        last_row - first_answer
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagating_the_deadline_stops_work_sheds_load_and_answers_in_time() -> anyhow::Result<()>
{
    let lab = TestLab::start(1, &lab_args("faults.deadline=propagate")).await?;
    let db = lab.db().await?;
    let calls = burst(&lab).await?;
    for call in &calls {
        assert!(matches!(call.status, 503 | 504), "{calls:?}");
        assert!(
            call.elapsed <= DEADLINE + Duration::from_millis(100),
            "a failure took {:?}: {calls:?}",
            call.elapsed
        );
    }
    let shed = calls.iter().filter(|c| c.status == 503).count();
    assert!(
        shed >= CALLS - MAX_CONCURRENT,
        "beyond {MAX_CONCURRENT} in flight, requests are shed at once: {calls:?}"
    );
    // The measurement: watch for rows over twice the handler latency from
    // the last answer — past the moment every call's work would have
    // written its row had it run on (it started before its caller's
    // deadline, so it would end within HANDLER_LATENCY of it).
    let watch_until = tokio::time::Instant::now() + HANDLER_LATENCY * 2;
    while tokio::time::Instant::now() < watch_until {
        let rows = rows_written(&db).await?;
        assert!(rows.is_empty(), "work outlived its caller: rows {rows:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let late = lab
        .metric("service-b-1", "lab_work_after_deadline_total", &[])
        .await;
    assert_eq!(late, Some(0.0), "no work outlived its caller");
    let refused = lab
        .metric(
            "service-b-1",
            "lab_requests_refused_total",
            &[("reason", "shed")],
        )
        .await;
    assert_eq!(refused, Some(shed as f64));
    println!(
        "propagate: {shed} shed (503), {} stopped at the deadline (504), 0 rows written over {:?}",
        CALLS - shed,
        HANDLER_LATENCY * 2
    );
    Ok(())
}
