//! The fixed preset (two Bs) while a dependency fails under steady traffic:
//! what fails, how fast, what keeps working, and that everything comes back
//! without restarting a service and without losing or repeating a job.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lab_tests::{TestLab, eventually, get_json, request_json};

const BS: [&str; 2] = ["service-b-1", "service-b-2"];
/// Items read before the outage, so that each B has them in its cache.
const CACHED_IDS: std::ops::RangeInclusive<u32> = 1..=10;

/// One request of the steady traffic.
#[derive(Debug, Clone)]
struct Sample {
    /// When it was sent, from the start of the traffic.
    at: Duration,
    /// `true`: a job submission (needs MySQL); `false`: a cached item read.
    needs_mysql: bool,
    status: u16,
    took: Duration,
    body: serde_json::Value,
}

/// Sends a job submission and a cached item read every 100 ms until
/// `stop`, recording every answer.
async fn steady_traffic(
    a: String,
    start: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
) {
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    let mut sent = tokio::task::JoinSet::new();
    let mut n: u32 = 0;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        n += 1;
        let id = CACHED_IDS.start() + n % CACHED_IDS.end();
        let at = start.elapsed();
        let (a, samples) = (a.clone(), samples.clone());
        // Each pair on its own task: a slow answer does not delay the next.
        sent.spawn(async move {
            let jobs_url = format!("{a}/api/jobs");
            let item_url = format!("{a}/api/items/{id}");
            let job = format!(r#"{{"payload":"steady {n}"}}"#);
            let (submit, read) = tokio::join!(
                request_json("POST", &jobs_url, Some(job)),
                get_json(&item_url),
            );
            let mut samples = samples.lock().unwrap_or_else(|e| e.into_inner());
            for (needs_mysql, reply) in [(true, submit), (false, read)] {
                // A transport error (A not answering) is recorded as status 0.
                let (status, body, took) = match reply {
                    Ok((status, _, body, took)) => (status, body, took),
                    Err(e) => (
                        0,
                        serde_json::json!({"transport": e.to_string()}),
                        Duration::ZERO,
                    ),
                };
                samples.push(Sample {
                    at,
                    needs_mysql,
                    status,
                    took,
                    body,
                });
            }
        });
    }
    while sent.join_next().await.is_some() {}
}

/// [`steady_traffic`] running in the background.
struct Traffic {
    start: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Traffic {
    fn start(a: String) -> Self {
        let start = Instant::now();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(steady_traffic(a, start, samples.clone(), stop.clone()));
        Self {
            start,
            samples,
            stop,
            task,
        }
    }

    /// Time since the traffic started, on the samples' clock.
    fn now(&self) -> Duration {
        self.start.elapsed()
    }

    /// Stops sending, waits for the answers still due, returns them all.
    async fn stop(self) -> anyhow::Result<Vec<Sample>> {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await?;
        Ok(self
            .samples
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone())
    }
}

async fn count(db: &sqlx::MySqlPool, sql: &'static str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(sql).fetch_one(db).await?)
}

/// Waits until every row of `jobs` is done (60 s at most); returns how many
/// there are.
async fn every_job_done(db: &sqlx::MySqlPool) -> anyhow::Result<i64> {
    let jobs = count(db, "SELECT COUNT(*) FROM jobs").await?;
    eventually(Duration::from_secs(60), "every job done", || async {
        let done = count(db, "SELECT COUNT(*) FROM jobs WHERE status = 'done'")
            .await
            .ok()?;
        (done == jobs).then_some(())
    })
    .await?;
    Ok(jobs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_stopped_for_10s_fails_fast_keeps_cached_reads_and_recovers_without_a_restart()
-> anyhow::Result<()> {
    let mut lab = TestLab::start(
        2,
        &[
            "mode=fixed",
            "service_b.item_cache_capacity=1000",
            "worker.tick=100ms",
            "partner.latency=300ms",
        ],
    )
    .await?;
    let a = lab.a_url();
    // Warm both Bs' caches: 30 reads of each id over A's balancer.
    for _ in 0..30 {
        for id in CACHED_IDS {
            let (status, _, body, _) = get_json(&format!("{a}/api/items/{id}")).await?;
            anyhow::ensure!(status == 200, "warming the cache: {body}");
        }
    }
    let pids: Vec<u32> = BS
        .iter()
        .map(|b| lab.stack.service(b).map(|s| s.pid))
        .collect::<Result<_, _>>()?;

    let traffic = Traffic::start(a.clone());
    // Jobs in flight when MySQL goes: 300 at ~16 a second per B.
    lab.insert_jobs(300, 0.0).await?;
    tokio::time::sleep(Duration::from_secs(3)).await; // healthy traffic, measured

    let stopping_at = traffic.now();
    lab.stack.stop_service("mysql").await?;
    let down_at = traffic.now();
    // While MySQL is down, B says why it is not ready.
    let admin = lab.admin_url(BS[0])?;
    let why = eventually(
        Duration::from_secs(5),
        "B's /readyz to name MySQL",
        || async {
            let (status, _, body, _) = get_json(&format!("{admin}/readyz")).await.ok()?;
            (status == 503).then_some(body)
        },
    )
    .await?;
    let reason = why["reason"].as_str().unwrap_or_default().to_lowercase();
    assert!(reason.contains("mysql"), "/readyz names MySQL: {why}");
    tokio::time::sleep(Duration::from_secs(10)).await; // the outage, measured

    let restarting_at = traffic.now();
    lab.stack.restart_mysql().await?;
    let up_at = traffic.now();
    // The measured recovery window.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let samples = traffic.stop().await?;
    // Sent once MySQL had been gone a second, answered before its restart
    // began: a submission that waited for a pooled connection across the
    // restart may rightly succeed. One that hung instead of failing fast
    // would still be caught: the outage (10 s) is far longer than the
    // bound below, so the samples sent early in it are kept.
    let during: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > down_at + Duration::from_secs(1) && s.at + s.took < restarting_at)
        .collect();
    let before: Vec<&Sample> = samples.iter().filter(|s| s.at < stopping_at).collect();
    let failed_writes: Vec<&&Sample> = during.iter().filter(|s| s.needs_mysql).collect();
    let cached_reads: Vec<&&Sample> = during.iter().filter(|s| !s.needs_mysql).collect();
    anyhow::ensure!(!failed_writes.is_empty() && !cached_reads.is_empty());

    assert!(
        before.iter().all(|s| s.status / 100 == 2),
        "healthy before: {:?}",
        before.iter().find(|s| s.status / 100 != 2)
    );
    // Needs MySQL: 503 naming it, within the pool's acquire timeout (500 ms)
    // and far from A's 5 s deadline.
    for s in &failed_writes {
        assert_eq!(s.status, 503, "{s:?}");
        let error = s.body["error"].as_str().unwrap_or_default().to_lowercase();
        assert!(error.contains("mysql"), "names MySQL: {s:?}");
    }
    let slowest_failure = failed_writes
        .iter()
        .map(|s| s.took)
        .max()
        .unwrap_or_default();
    assert!(
        slowest_failure < Duration::from_millis(1500),
        "fails fast, not at A's deadline: {slowest_failure:?}"
    );
    // Does not need MySQL: served from the cache throughout.
    assert!(
        cached_reads.iter().all(|s| s.status == 200),
        "cached reads keep working: {:?}",
        cached_reads.iter().find(|s| s.status != 200)
    );
    // Back without restarting anything: every request answered 2xx from
    // the first second after MySQL was ready.
    let after: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > up_at + Duration::from_secs(1))
        .collect();
    assert!(
        after.iter().all(|s| s.status / 100 == 2),
        "recovered: {:?}",
        after.iter().find(|s| s.status / 100 != 2)
    );
    let first_ok = samples
        .iter()
        .filter(|s| s.needs_mysql && s.at >= up_at && s.status / 100 == 2)
        .map(|s| s.at - up_at)
        .min();
    for (b, pid) in BS.iter().zip(&pids) {
        assert_eq!(lab.stack.service(b)?.pid, *pid, "{b} was not restarted");
    }

    // No job lost or run twice: every row done, and partner-api (one call
    // per run of a job) served exactly as many calls as there are rows.
    // (`attempts` is no measure: a claim counts one, so a row claimed just
    // as MySQL stopped and never started reads 2 once it is taken back.)
    let db = lab.db().await?;
    let jobs = every_job_done(&db).await?;
    let partner_calls = lab
        .metric("partner-api", "partner_requests_total", &[])
        .await
        .unwrap_or(0.0);
    println!(
        "MySQL down {:.1}s: {} job submissions answered 503 naming MySQL, the slowest in \
         {slowest_failure:.2?}; {} cached reads all 200; first submission accepted {first_ok:.2?} \
         after MySQL was ready; {jobs} jobs done, partner-api calls {partner_calls}",
        (restarting_at - down_at).as_secs_f64(),
        failed_writes.len(),
        cached_reads.len()
    );
    assert_eq!(partner_calls, jobs as f64, "one partner call per job");
    Ok(())
}

/// MySQL killed (its connections cut without a goodbye) and started again
/// at once: B's pools hold connections to a server that is gone, and must
/// not hand them out once MySQL is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_killed_and_restarted_costs_no_request_once_it_is_back() -> anyhow::Result<()> {
    // Pools of 4, filled by a burst: most connections are still in the pool,
    // dead, when MySQL is back, and the steady traffic takes each one again
    // soon after (sqlx hands out the longest idle first).
    let mut lab = TestLab::start(
        2,
        &[
            "mode=fixed",
            "service_b.item_cache_capacity=1000",
            "mysql.pool_max=4",
        ],
    )
    .await?;
    let traffic = Traffic::start(lab.a_url());
    tokio::time::sleep(Duration::from_secs(2)).await; // healthy traffic, measured
    // A burst fills both pools with open connections, more than the outage's
    // few requests can wear out: most are still in the pool, dead, when
    // MySQL is back.
    let burst: Vec<_> = (0..16)
        .map(|i| {
            let url = format!("{}/api/jobs", lab.a_url());
            tokio::spawn(async move {
                request_json("POST", &url, Some(format!(r#"{{"payload":"burst {i}"}}"#))).await
            })
        })
        .collect();
    for sent in burst {
        let (status, _, body, _) = sent.await??;
        anyhow::ensure!(status == 202, "burst: {body}");
    }
    let pooled = lab
        .metric(BS[0], "lab_db_pool_connections", &[])
        .await
        .unwrap_or(0.0);
    anyhow::ensure!(pooled >= 3.0, "the burst filled b-1's pool: {pooled}");
    let killed_at = traffic.now();
    lab.stack
        .signal("mysql", nix::sys::signal::Signal::SIGKILL)?;
    lab.stack
        .wait_exit("mysql", Duration::from_secs(10))
        .await?;
    lab.stack.restart_mysql().await?;
    let up_at = traffic.now();
    tokio::time::sleep(Duration::from_secs(5)).await; // the measured recovery window
    let samples = traffic.stop().await?;
    let writes = |from: Duration, to: Duration| {
        samples
            .iter()
            .filter(|s| s.needs_mysql && s.at >= from && s.at < to)
            .collect::<Vec<_>>()
    };
    let before = writes(Duration::ZERO, killed_at);
    let outage = writes(killed_at, up_at);
    let after = writes(up_at, Duration::MAX);
    let failed_after: Vec<_> = after.iter().filter(|s| s.status / 100 != 2).collect();
    println!(
        "{pooled} connections in b-1's pool; MySQL killed and back in {:.1}s: {} of {} \
         submissions failed during it, {} of {} after it was back: {:?}",
        (up_at - killed_at).as_secs_f64(),
        outage.iter().filter(|s| s.status / 100 != 2).count(),
        outage.len(),
        failed_after.len(),
        after.len(),
        failed_after.first()
    );
    assert!(before.iter().all(|s| s.status / 100 == 2), "healthy before");
    assert!(failed_after.is_empty(), "no dead connection handed out");
    Ok(())
}

/// HAProxy restarted while A sends it steady traffic, under `lb = "l4"` and
/// `lb = "l7"`: A reconnects by itself, and the requests that fail are
/// those of about a second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn haproxy_restarted_under_l4_and_l7_costs_about_a_second_of_requests() -> anyhow::Result<()>
{
    for lb in ["l4", "l7"] {
        let lb_switch = format!("faults.lb={lb}");
        let mut lab = TestLab::start(
            2,
            &[
                "mode=fixed",
                &lb_switch,
                "service_b.item_cache_capacity=1000",
            ],
        )
        .await?;
        let traffic = Traffic::start(lab.a_url());
        tokio::time::sleep(Duration::from_secs(2)).await; // healthy traffic, measured
        let restart_at = traffic.now();
        lab.stack.restart_slb().await?;
        let back_at = traffic.now();
        tokio::time::sleep(Duration::from_secs(5)).await; // the measured recovery window
        let samples = traffic.stop().await?;
        let failed: Vec<&Sample> = samples.iter().filter(|s| s.status / 100 != 2).collect();
        let first = failed.iter().map(|s| s.at).min();
        let last = failed.iter().map(|s| s.at).max();
        let window = first.zip(last).map(|(f, l)| l - f);
        println!(
            "lb={lb}: HAProxy restart took {:.2?}; {} of {} requests failed, sent between \
             {first:.2?} and {last:.2?} (restart began at {restart_at:.2?}); codes {:?}",
            back_at - restart_at,
            failed.len(),
            samples.len(),
            failed
                .iter()
                .map(|s| s.body["code"].as_str().unwrap_or("?").to_string())
                .collect::<std::collections::BTreeSet<_>>()
        );
        // Failures only around the restart, spread over about a second.
        if let (Some(first), Some(window)) = (first, window) {
            // (A request sent in the same tick as the restart may be
            // stamped a moment before it.)
            assert!(
                first + Duration::from_millis(100) >= restart_at,
                "nothing failed before the restart"
            );
            assert!(
                window <= (back_at - restart_at) + Duration::from_millis(1500),
                "lb={lb}: failures over {window:?}"
            );
        }
        let late: Vec<&&Sample> = failed
            .iter()
            .filter(|s| s.at > back_at + Duration::from_secs(2))
            .collect();
        assert!(late.is_empty(), "lb={lb}: A is back: {late:?}");
    }
    Ok(())
}

/// partner-api down for 10 s (connections refused), then back but slower
/// than B's client timeout for about 5 s, then itself again, under steady
/// traffic: calls fail to connect while it is down and end at the 300 ms
/// client timeout while it is slow (so a worker slot is free again within
/// 0.5 s, not after the partner's 2 s), each failure becomes one retry
/// after a growing backoff, every job is done once the partner is back —
/// one answered call per job, no outcome lost — and requests through A,
/// which never call the partner, keep succeeding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partner_down_then_slow_delays_jobs_and_loses_none() -> anyhow::Result<()> {
    let mut lab = TestLab::start(
        2,
        &[
            "mode=fixed",
            "worker.tick=100ms",
            "worker.pool_size=4",
            "worker.cpu_per_kib=0s",
            "worker.retry_backoff=500ms",
            "worker.max_attempts=50",
            "partner.latency=10ms",
            "partner.client_timeout=300ms",
        ],
    )
    .await?;
    let traffic = Traffic::start(lab.a_url());
    lab.insert_jobs(40, 0.0).await?;

    lab.stack.stop_service("partner-api").await?;
    tokio::time::sleep(Duration::from_secs(10)).await; // down: refused
    lab.stack
        .restart_partner(&["partner.latency=2s".to_string()])
        .await?;
    // Slow: each call would take 2 s, past the 300 ms client timeout.
    tokio::time::sleep(Duration::from_secs(5)).await;
    lab.stack.stop_service("partner-api").await?;
    lab.stack.restart_partner(&[]).await?;

    let samples = traffic.stop().await?;
    let db = lab.db().await?;
    let jobs = every_job_done(&db).await?;
    let most_attempts = count(&db, "SELECT CAST(MAX(attempts) AS SIGNED) FROM jobs").await?;
    // Both Bs' counters, summed. Each B must answer; a series it never
    // created (no call of that outcome there) counts 0.
    let mut texts = Vec::new();
    for b in BS {
        texts.push(lab.metrics(b).await?);
    }
    let sum = |metric: &str, labels: &[(&str, &str)]| -> f64 {
        texts
            .iter()
            .map(|text| lab_tests::metric_sum(text, metric, labels).unwrap_or(0.0))
            .sum()
    };
    let calls = sum("lab_partner_call_duration_seconds_count", &[]);
    let ok_calls = sum("lab_partner_calls_total", &[("outcome", "ok")]);
    let call_errors = sum("lab_partner_calls_total", &[("outcome", "error")]);
    let timed_out = sum("lab_partner_calls_total", &[("outcome", "timeout")]);
    // A worker slot is held for the length of its partner call: every call
    // over within 0.5 s — while the slow partner took 2 s to answer — means
    // the 300 ms client timeout freed each slot, none waited the partner out.
    let calls_within_half_s = sum("lab_partner_call_duration_seconds_bucket", &[("le", "0.5")]);
    let retries = sum("lab_jobs_total", &[("outcome", "retry")]);
    let lost = sum("lab_jobs_total", &[("outcome", "lost")]);
    let failed_requests = samples.iter().filter(|s| s.status / 100 != 2).count();
    println!(
        "partner down 10 s then slow 5 s: {calls} partner calls — {call_errors} failed to \
         connect, {timed_out} cut at the 300 ms timeout, {ok_calls} answered; \
         {calls_within_half_s} over within 0.5 s; {retries} retries, at most {most_attempts} \
         attempts for one job; {jobs} jobs done, {lost} outcomes lost; {failed_requests} of {} \
         requests through A failed",
        samples.len()
    );
    assert!(call_errors >= 1.0, "calls to the stopped partner failed");
    assert!(
        timed_out >= 1.0,
        "calls to the slow partner ended at the client timeout"
    );
    assert_eq!(
        calls_within_half_s, calls,
        "no call held its worker slot past 0.5 s, though the partner took 2 s"
    );
    assert_eq!(
        retries,
        calls - ok_calls,
        "each failed call sent its job back to wait for a retry, once"
    );
    // Backoff: 500 ms doubling (±50 % jitter) spans the ~16 s outage in
    // about 7 attempts; retrying at every 100 ms tick would take ~150.
    assert!(
        most_attempts <= 12,
        "jobs waited out a growing backoff, not a retry per tick: {most_attempts} attempts"
    );
    // Exactly once: one answered partner call per job (B's own count,
    // which survives partner-api's restarts) and no outcome lost to a
    // stale claim.
    assert_eq!(
        ok_calls, jobs as f64,
        "each job's call answered once, none lost"
    );
    assert_eq!(lost, 0.0);
    assert!(
        samples.len() >= 100,
        "steady traffic ran: {}",
        samples.len()
    );
    assert_eq!(failed_requests, 0, "A's requests never need the partner");
    Ok(())
}
