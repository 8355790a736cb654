//! Cause 3, deadlines: B ignoring its caller's deadline keeps working after
//! the caller gave up; propagating it stops the work, sheds the excess and
//! answers A within its deadline.

use std::time::Duration;

use lab_tests::{TestLab, get_json};

const DEADLINE: Duration = Duration::from_millis(300);

/// 20 concurrent reads through A; returns (status, elapsed) of each.
async fn burst(lab: &TestLab) -> anyhow::Result<Vec<(u16, Duration)>> {
    let calls = (1..=20).map(|id| {
        let url = format!("{}/api/items/{id}", lab.a_url());
        tokio::spawn(async move { get_json(&url).await })
    });
    let mut out = Vec::new();
    for call in futures::future::join_all(calls).await {
        let (status, _, _, elapsed) = call??;
        out.push((status, elapsed));
    }
    Ok(out)
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
    let results = burst(&lab).await?;
    assert!(
        results.iter().all(|(s, _)| *s == 504),
        "A gave up on every call: {results:?}"
    );
    // B's detached work ends 600 ms after it started, 300 ms after A left.
    tokio::time::sleep(Duration::from_millis(800)).await;
    let late = lab
        .metric("service-b-1", "lab_work_after_deadline_total", &[])
        .await
        .unwrap_or(0.0);
    assert!(late >= 20.0, "work after the deadline: {late}");
    let shed = lab
        .metric("service-b-1", "lab_requests_refused_total", &[])
        .await;
    assert_eq!(shed, None, "nothing was shed");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn propagating_the_deadline_stops_work_sheds_load_and_answers_in_time() -> anyhow::Result<()>
{
    let lab = TestLab::start(1, &lab_args("faults.deadline=propagate")).await?;
    let results = burst(&lab).await?;
    for (status, elapsed) in &results {
        assert!(matches!(status, 503 | 504), "{results:?}");
        assert!(
            *elapsed <= DEADLINE + Duration::from_millis(100),
            "a failure took {elapsed:?}: {results:?}"
        );
    }
    let shed = results.iter().filter(|(s, _)| *s == 503).count();
    assert!(
        shed >= 16,
        "beyond 4 in flight, requests are shed at once: {results:?}"
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
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
    Ok(())
}
