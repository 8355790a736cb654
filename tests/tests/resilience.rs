//! Failure behaviour: graceful shutdown of a B, and a MySQL outage.

use std::time::Duration;

use lab_tests::{TestLab, get_json, metric_sum};
use nix::sys::signal::Signal;

/// SIGTERM to the B that carries A's traffic while requests are inside it:
/// every in-flight request still completes, and B exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() -> anyhow::Result<()> {
    let mut lab = TestLab::start(2, &["faults.lb=l4", "service_b.handler_latency=800ms"]).await?;
    let a = lab.a_url();

    // Which B does A's L4 connection land on?
    let (status, busy, _, _) = get_json(&format!("{a}/api/items/1")).await?;
    assert_eq!(status, 200);
    let busy = busy.ok_or_else(|| anyhow::anyhow!("no x-served-by"))?;
    let name = lab
        .stack
        .state
        .backends()
        .find(|b| b.instance_id.as_deref() == Some(busy.as_str()))
        .map(|b| b.name.clone())
        .ok_or_else(|| anyhow::anyhow!("unknown backend {busy}"))?;

    let in_flight: Vec<_> = (1..=16)
        .map(|i| {
            let url = format!("{a}/api/items/{i}");
            tokio::spawn(async move { get_json(&url).await })
        })
        .collect();
    // Let the requests reach B (each then sleeps 800 ms inside the handler).
    tokio::time::sleep(Duration::from_millis(300)).await;
    let metrics = lab.metrics(&name).await?;
    let before = metric_sum(
        &metrics,
        "lab_grpc_requests_total",
        &[("method", "GetItem")],
    )
    .unwrap_or(0.0);
    lab.stack.signal(&name, Signal::SIGTERM)?;

    for handle in in_flight {
        let (status, served_by, body, elapsed) = handle.await??;
        assert_eq!(status, 200, "in-flight request lost: {body}");
        assert_eq!(served_by.as_deref(), Some(busy.as_str()));
        assert!(
            elapsed >= Duration::from_millis(700),
            "request was really in flight ({elapsed:?})"
        );
    }
    // The 16 were still running when the signal came (only the warm-up had finished).
    assert_eq!(before, 1.0, "requests completed before SIGTERM: {before}");
    let exit = lab.stack.wait_exit(&name, Duration::from_secs(15)).await?;
    assert!(exit.success(), "{name} exited with {exit}");
    Ok(())
}

/// MySQL down → A answers 503 fast (B fails with UNAVAILABLE instead of
/// hanging), and B's /readyz says not ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mysql_outage_turns_into_fast_503() -> anyhow::Result<()> {
    let mut lab = TestLab::start(1, &[]).await?;
    let a = lab.a_url();
    let (status, _, _, _) = get_json(&format!("{a}/api/items/7")).await?;
    assert_eq!(status, 200);

    lab.stack.signal("mysql", Signal::SIGTERM)?;
    lab.stack
        .wait_exit("mysql", Duration::from_secs(30))
        .await?;

    for id in 1..=5 {
        let (status, served_by, body, elapsed) = get_json(&format!("{a}/api/items/{id}")).await?;
        assert_eq!(status, 503, "{body}");
        assert_eq!(body["code"], "unavailable", "{body}");
        assert_eq!(
            served_by.as_deref(),
            Some("b-1"),
            "B answered, not A's timeout"
        );
        assert!(elapsed < Duration::from_secs(1), "503 took {elapsed:?}");
    }
    let (status, _, body, _) =
        get_json(&format!("{}/readyz", lab.admin_url("service-b-1")?)).await?;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    Ok(())
}
