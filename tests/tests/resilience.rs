//! Failure behaviour: graceful shutdown of a B, and a MySQL outage.

use std::time::{Duration, Instant};

use lab_tests::{TestLab, eventually, get_json, metric_sum};
use nix::sys::signal::Signal;

/// SIGTERM to the B that carries A's traffic while requests are inside it:
/// every in-flight request still completes on that B, and B exits 0.
///
/// With no drain period B stops accepting as soon as it has deregistered,
/// so the requests are still inside its handlers (each sleeps 800 ms there)
/// when the listener closes: only a graceful drain lets them finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_shutdown_finishes_in_flight_requests() -> anyhow::Result<()> {
    const REQUESTS: usize = 16;
    let mut lab = TestLab::start(
        2,
        &[
            "faults.lb=l4",
            "service_b.handler_latency=800ms",
            "service_b.drain_period=0s",
        ],
    )
    .await?;
    let a = lab.a_url();

    // Which B does A's L4 connection land on?
    let (status, busy, _, _) = get_json(&format!("{a}/api/items/1")).await?;
    assert_eq!(status, 200);
    let busy = busy.ok_or_else(|| anyhow::anyhow!("no x-served-by"))?;
    let (name, grpc_addr) = lab
        .stack
        .state
        .backends()
        .find(|b| b.instance_id.as_deref() == Some(busy.as_str()))
        .and_then(|b| Some((b.name.clone(), b.grpc_addr.clone()?)))
        .ok_or_else(|| anyhow::anyhow!("unknown backend {busy}"))?;

    let in_flight: Vec<_> = (1..=REQUESTS)
        .map(|i| {
            let url = format!("{a}/api/items/{i}");
            tokio::spawn(async move {
                let answer = get_json(&url).await;
                (answer, Instant::now())
            })
        })
        .collect();
    let inside = eventually(
        Duration::from_secs(5),
        "all requests inside B's handlers",
        || async {
            let metrics = lab.metrics(&name).await.ok()?;
            let inside = metric_sum(&metrics, "lab_grpc_requests_in_flight", &[])?;
            let finished = metric_sum(
                &metrics,
                "lab_grpc_requests_total",
                &[("method", "GetItem")],
            )?;
            (inside >= REQUESTS as f64).then_some((inside, finished))
        },
    )
    .await?;
    let signalled = Instant::now();
    lab.stack.signal(&name, Signal::SIGTERM)?;

    // Right before the signal all of them were inside B and none had
    // finished (only the warm-up had).
    assert_eq!(
        inside,
        (REQUESTS as f64, 1.0),
        "(in flight, finished) in {name} before SIGTERM"
    );
    // B has stopped accepting (its listener is closed) while every request
    // is still inside a handler: from here on only the drain can finish them.
    eventually(
        Duration::from_secs(5),
        "B's gRPC listener to close",
        || async {
            tokio::net::TcpStream::connect(&grpc_addr)
                .await
                .is_err()
                .then_some(())
        },
    )
    .await?;
    let done_before_close = in_flight.iter().filter(|h| h.is_finished()).count();
    assert_eq!(
        done_before_close, 0,
        "requests finished before B stopped accepting: the drain was not tested"
    );
    for handle in in_flight {
        let ((status, served_by, body, elapsed), finished) = {
            let (answer, finished) = handle.await?;
            (answer?, finished)
        };
        assert_eq!(status, 200, "in-flight request lost: {body}");
        assert_eq!(
            served_by.as_deref(),
            Some(busy.as_str()),
            "finished by the B that was shut down, not retried elsewhere"
        );
        assert!(
            finished > signalled,
            "the request was still inside B when the signal landed"
        );
        assert!(
            elapsed >= Duration::from_millis(700),
            "request was really in flight ({elapsed:?})"
        );
    }
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

/// With `lb = "etcd"` A sends a B work only while its key is in etcd, so
/// B's `/readyz` says ready only then: not while etcd is away (the lease
/// is lost), and ready again once B has registered anew.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_etcd_registration() -> anyhow::Result<()> {
    let mut lab = TestLab::start(1, &["faults.lb=etcd", "etcd.lease_ttl=3s"]).await?;
    let readyz = format!("{}/readyz", lab.admin_url("service-b-1")?);
    let (status, _, body, _) = get_json(&readyz).await?;
    assert_eq!(status, 200, "ready once started: {body}");
    assert_eq!(
        lab.metric("service-b-1", "lab_registry_registered", &[])
            .await,
        Some(1.0)
    );

    lab.stack.stop_service("etcd").await?;
    let why = eventually(
        Duration::from_secs(5),
        "B not ready while etcd is away",
        || async {
            let (status, _, body, _) = get_json(&readyz).await.ok()?;
            (status == 503).then_some(body)
        },
    )
    .await?;
    assert_eq!(why["ready"], false);
    assert!(
        why["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("not registered in etcd"),
        "{why}"
    );

    lab.stack.restart_etcd().await?;
    eventually(
        Duration::from_secs(5),
        "B ready again once registered",
        || async {
            let (status, _, _, _) = get_json(&readyz).await.ok()?;
            (status == 200).then_some(())
        },
    )
    .await?;
    assert_eq!(
        lab.metric("service-b-1", "lab_registry_registered", &[])
            .await,
        Some(1.0),
        "ready means registered"
    );
    Ok(())
}
