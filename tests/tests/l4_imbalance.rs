//! Cause 1, the symptom: behind HAProxy `mode tcp`, one long-lived HTTP/2
//! connection carries all of A's requests to a single B.

use lab_tests::{TestLab, metric_sum};
use labctl::load::{LoadSpec, run};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l4_balancer_pins_all_traffic_to_one_backend() -> anyhow::Result<()> {
    let lab = TestLab::start(2, &["faults.lb=l4"]).await?;

    let mut spec = LoadSpec::new(lab.a_url(), "/api/items/{rand}");
    spec.requests = Some(1000);
    spec.concurrency = 16;
    let report = run(&spec, None).await?;

    assert_eq!(report.ok, 1000, "every request should succeed: {report:?}");
    let share = report.max_backend_share();
    assert!(
        share >= 0.95,
        "expected >= 95% on one B, got {:.1}%: {:?}",
        share * 100.0,
        report.by_backend
    );

    // Cross-check with B's own counters: the busy B counted the requests,
    // the other one (almost) none.
    let (busy, busy_count) = report
        .by_backend
        .iter()
        .max_by_key(|(_, n)| **n)
        .map(|(b, n)| (b.clone(), *n))
        .ok_or_else(|| anyhow::anyhow!("no backend seen"))?;
    let mut served = Vec::new();
    for b in lab.stack.state.backends() {
        let text = lab.metrics(&b.name).await?;
        let n =
            metric_sum(&text, "lab_grpc_requests_total", &[("method", "GetItem")]).unwrap_or(0.0);
        served.push((b.instance_id.clone().unwrap_or_default(), n));
    }
    let busy_metric = served
        .iter()
        .find(|(id, _)| *id == busy)
        .map(|(_, n)| *n)
        .ok_or_else(|| anyhow::anyhow!("{busy} is not one of the B instances {served:?}"))?;
    assert_eq!(
        busy_metric as u64, busy_count,
        "B's counter agrees with served_by: {served:?}"
    );
    let total: f64 = served.iter().map(|(_, n)| n).sum();
    assert!(
        busy_metric / total >= 0.95,
        "B metrics show the same imbalance: {served:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn l7_proxy_spreads_the_same_load() -> anyhow::Result<()> {
    let lab = TestLab::start(2, &["faults.lb=l7"]).await?;
    let mut spec = LoadSpec::new(lab.a_url(), "/api/items/{rand}");
    spec.requests = Some(1000);
    spec.concurrency = 16;
    let report = run(&spec, None).await?;
    assert_eq!(report.ok, 1000, "{report:?}");
    assert_eq!(report.by_backend.len(), 2, "{:?}", report.by_backend);
    for (backend, n) in &report.by_backend {
        let share = *n as f64 / 1000.0;
        assert!(
            (0.40..=0.60).contains(&share),
            "{backend} got {:.1}%",
            share * 100.0
        );
    }
    Ok(())
}
