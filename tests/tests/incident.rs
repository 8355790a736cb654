//! The whole incident from the presets alone: `mode = "buggy"` with no other
//! switch, under `labctl jobs`' default inflow (12 jobs/s of 16 KiB) and
//! steady requests, shows the chain — worker tasks piling up, open fds and
//! RSS climbing with every partner call, A's p99 past its deadline, all
//! traffic on one B — and `mode = "fixed"` under the same inflow keeps
//! every one of those flat.
//!
//! Time is compressed 4×: a 250 ms worker tick and a 200 ms partner (the
//! defaults are 1 s and 800 ms); A's deadline is 1 s. One test, two stacks
//! one after the other, alone in its binary so nothing else competes for
//! the two cores while it measures.

use std::time::Duration;

use lab_tests::TestLab;
use labctl::{
    jobs::{JobSpec, produce},
    load::{LoadReport, LoadSpec, run},
};

const DEADLINE_MS: f64 = 1000.0;
const BS: [&str; 2] = ["service-b-1", "service-b-2"];

/// What one preset did under the inflow.
#[derive(Debug)]
struct Chain {
    load: LoadReport,
    /// Highest `lab_worker_tasks_alive` seen on any B.
    tasks_peak: f64,
    /// Growth over the run, per B.
    fds_growth: [f64; 2],
    rss_growth_mib: [f64; 2],
    /// A's own count of requests it answered 504 at its deadline (its
    /// `lab_http_requests_total{status="504"}`, 0 when never counted).
    a_deadline_504s: f64,
}

async fn gauge(lab: &TestLab, b: &str, name: &str) -> anyhow::Result<f64> {
    lab.metric(b, name, &[])
        .await
        .ok_or_else(|| anyhow::anyhow!("{b} does not export {name}"))
}

async fn preset(mode: &str) -> anyhow::Result<Chain> {
    let mode = format!("mode={mode}");
    let lab = TestLab::start(
        2,
        &[
            &mode,
            "service_a.backend_timeout=1s",
            "worker.tick=250ms",
            "partner.latency=200ms",
        ],
    )
    .await?;
    let mut fds = [0.0; 2];
    let mut rss = [0.0; 2];
    for (i, b) in BS.iter().enumerate() {
        fds[i] = gauge(&lab, b, "process_open_fds").await?;
        rss[i] = gauge(&lab, b, "process_resident_memory_bytes").await?;
    }
    // `labctl jobs`' defaults, without poison (the pool drain has its own
    // test in `leaks`).
    let inflow = JobSpec {
        mysql_url: lab.stack.config.mysql.url.clone(),
        rate: 12.0,
        duration: Duration::from_secs(20),
        poison_ratio: 0.0,
        payload_bytes: 16 * 1024,
        seed: 1,
    };
    let producer = tokio::spawn(async move { produce(&inflow).await });
    let sampling = async {
        let mut peak: f64 = 0.0;
        let end = tokio::time::Instant::now() + Duration::from_secs(18);
        while tokio::time::Instant::now() < end {
            for b in BS {
                if let Some(v) = lab.metric(b, "lab_worker_tasks_alive", &[]).await {
                    peak = peak.max(v);
                }
            }
            // The sampling period of a measured window.
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        peak
    };
    let requests = async {
        // Requests start once every B's worker is on the inflow.
        for b in BS {
            lab_tests::eventually(
                Duration::from_secs(10),
                "the worker to start on the inflow",
                || async {
                    let started = lab.metric(b, "lab_worker_tasks_spawned_total", &[]).await?;
                    (started >= 1.0).then_some(())
                },
            )
            .await?;
        }
        let mut spec = LoadSpec::new(lab.a_url(), "/api/items/{rand}");
        spec.rps = Some(50.0);
        spec.duration = Some(Duration::from_secs(12));
        // Enough connections that the generator never queues requests
        // behind A's 1 s deadline.
        spec.concurrency = 128;
        run(&spec, None).await
    };
    let (tasks_peak, load) = tokio::join!(sampling, requests);
    producer.await??;
    let mut chain = Chain {
        load: load?,
        tasks_peak,
        fds_growth: [0.0; 2],
        rss_growth_mib: [0.0; 2],
        a_deadline_504s: lab
            .metric("service-a", "lab_http_requests_total", &[("status", "504")])
            .await
            .unwrap_or(0.0),
    };
    for (i, b) in BS.iter().enumerate() {
        chain.fds_growth[i] = gauge(&lab, b, "process_open_fds").await? - fds[i];
        chain.rss_growth_mib[i] =
            (gauge(&lab, b, "process_resident_memory_bytes").await? - rss[i]) / (1024.0 * 1024.0);
    }
    println!(
        "{mode}: tasks peak {}, fds +{:?}, RSS +{:.1?} MiB, A's p50 {:.1} ms p99 {:.1} ms, {} of {} failed ({} answered 504 by A), by B {:?}",
        chain.tasks_peak,
        chain.fds_growth,
        chain.rss_growth_mib,
        chain.load.latency_ms.p50,
        chain.load.latency_ms.p99,
        chain.load.requests - chain.load.ok,
        chain.load.requests,
        chain.a_deadline_504s,
        chain.load.by_backend
    );
    Ok(chain)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_buggy_preset_reproduces_the_chain_and_the_fixed_preset_stays_flat()
-> anyhow::Result<()> {
    let buggy = preset("buggy").await?;
    let pool = 8.0; // the bounded worker's default pool: the yardstick
    assert!(buggy.tasks_peak >= 5.0 * pool, "tasks pile up: {buggy:?}");
    for (i, b) in BS.iter().enumerate() {
        assert!(
            buggy.fds_growth[i] >= 100.0,
            "{b}: an fd per partner call, never released: {buggy:?}"
        );
        assert!(
            buggy.rss_growth_mib[i] >= 5.0,
            "{b}: memory grows with the held responses: {buggy:?}"
        );
    }
    // A's p99 is past its deadline when at least 1 % of its requests ended
    // there: A's own 504 count says so without the load generator's clock,
    // which shares the saturated cores.
    assert!(
        buggy.a_deadline_504s >= 0.01 * buggy.load.requests as f64,
        "A answers ≥ 1 % of requests 504 at its deadline: {buggy:?}"
    );
    assert!(
        buggy.load.latency_ms.p99 >= DEADLINE_MS,
        "the load generator's p99 passes A's deadline: {buggy:?}"
    );
    assert_eq!(
        buggy.load.by_backend.len(),
        1,
        "L4: every answered request from one B: {buggy:?}"
    );

    let fixed = preset("fixed").await?;
    assert!(
        fixed.tasks_peak <= pool,
        "tasks stay within the pool: {fixed:?}"
    );
    for (i, b) in BS.iter().enumerate() {
        // The shared client's pool (8) and MySQL's (16) may open meanwhile.
        assert!(fixed.fds_growth[i] <= 24.0, "{b}: fds flat: {fixed:?}");
        assert!(
            fixed.rss_growth_mib[i] < buggy.rss_growth_mib[i] / 3.0,
            "{b}: RSS flat next to the buggy run: {fixed:?}"
        );
    }
    assert_eq!(
        fixed.a_deadline_504s, 0.0,
        "A never hits its deadline: {fixed:?}"
    );
    assert!(
        fixed.load.latency_ms.p99 < DEADLINE_MS / 2.0,
        "A's p99 stays well inside its deadline: {fixed:?}"
    );
    assert_eq!(
        fixed.load.ok, fixed.load.requests,
        "no request failed: {fixed:?}"
    );
    assert_eq!(fixed.load.by_backend.len(), 2, "both Bs serve: {fixed:?}");
    Ok(())
}
