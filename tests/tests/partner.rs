//! `labctl up` runs partner-api: certificates in the state dir, the
//! partner's addresses in every service's config, ready before the Bs.

use std::time::Duration;

use lab_tests::{TestLab, eventually, metric_sum, partner_client};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partner_api_starts_before_the_bs_with_the_lab_ca() -> anyhow::Result<()> {
    let mut lab = TestLab::start(1, &[]).await?;
    let names: Vec<&str> = lab
        .stack
        .state
        .services
        .iter()
        .map(|s| s.name.as_str())
        .collect();
    let partner_at = names.iter().position(|n| *n == "partner-api");
    let first_b = names.iter().position(|n| n.starts_with("service-b-"));
    assert!(
        matches!((partner_at, first_b), (Some(p), Some(b)) if p < b),
        "partner-api starts before the Bs (and so stops after them): {names:?}"
    );

    let record = lab.stack.service("partner-api")?.clone();
    let partner = &lab.stack.config.partner;
    assert_eq!(record.url.as_deref(), Some(partner.url.as_str()));
    assert_eq!(partner.url, format!("https://{}", partner.listen));
    assert!(record.admin_url.is_some());
    let tls = lab.stack.state.state_dir.join("tls");
    for (key, path) in [
        ("partner.cert", &partner.cert),
        ("partner.key", &partner.key),
        ("partner.ca_cert", &partner.ca_cert),
    ] {
        assert!(
            std::path::Path::new(path).starts_with(&tls) && std::fs::metadata(path)?.is_file(),
            "{key} = {path} is a file in {}",
            tls.display()
        );
    }

    // It answers HTTPS, with a certificate the lab's CA vouches for: a
    // client trusting only that CA gets a JSON answer, and the handshake is
    // counted on partner-api's side.
    let handshakes = |text: &str| metric_sum(text, "partner_tls_handshakes_total", &[]);
    let before = handshakes(&lab.metrics("partner-api").await?)
        .ok_or_else(|| anyhow::anyhow!("no partner metrics"))?;
    let answer = partner_client(&partner.ca_cert)?
        .post(format!("{}/v1/enrich", partner.url))
        .body(r#"{"payload":"hello"}"#)
        .send()
        .await?;
    assert_eq!(answer.status(), 200);
    let body: serde_json::Value = serde_json::from_slice(&answer.bytes().await?)?;
    assert!(body["score"].is_u64(), "a JSON answer with a score");
    eventually(
        Duration::from_secs(10),
        "the handshake is counted",
        || async {
            let now = handshakes(&lab.metrics("partner-api").await.ok()?)?;
            (now > before).then_some(())
        },
    )
    .await?;

    lab.stack.down().await?;
    assert!(!record.is_alive(), "partner-api stopped by down");
    Ok(())
}

/// How B's jobs ended when every partner answer was broken in one way.
async fn jobs_against_a_broken_partner(
    lab: &mut TestLab,
    jobs: u64,
) -> anyhow::Result<Vec<(String, u32, String)>> {
    lab.insert_jobs(jobs, 0.0).await?;
    let db = lab.db().await?;
    eventually(Duration::from_secs(30), "every job to end", || async {
        let open: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE status NOT IN ('done', 'failed', 'dead')",
        )
        .fetch_one(&db)
        .await
        .ok()?;
        (open == 0).then_some(())
    })
    .await?;
    Ok(
        sqlx::query_as("SELECT status, attempts, COALESCE(last_error, '') FROM jobs ORDER BY id")
            .fetch_all(&db)
            .await?,
    )
}

/// partner-api answering broken bodies, too much, or with a certificate
/// from a CA B does not trust: under `http_client = "shared"` every attempt
/// fails with the reason, each job is retried up to `worker.max_attempts`
/// and then failed — none hangs, none is lost — and B keeps no connection
/// or response of any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_partner_answers_fail_each_attempt_with_the_reason() -> anyhow::Result<()> {
    let cases = [
        (
            "partner.answer=truncated",
            "partner.body_bytes=262144",
            "error decoding response body",
        ),
        (
            "partner.answer=not-json",
            "partner.body_bytes=262144",
            "not JSON",
        ),
        (
            "partner.answer=json",
            "partner.body_bytes=2097152",
            "larger than 1048576 bytes",
        ),
        // The other CA has the same name as the lab's, so rustls finds the
        // issuer and refuses its signature.
        (
            "partner.answer=json",
            "partner.body_bytes=262144",
            "invalid peer certificate",
        ),
    ];
    let foreign = tempfile::tempdir()?;
    let foreign_ca = partner_api::certs::ensure(foreign.path(), &["127.0.0.1"])?.ca_cert;
    for (answer, size, reason) in cases {
        let mut lab = TestLab::start(
            1,
            &[
                "mode=fixed",
                answer,
                size,
                "partner.latency=0s",
                "worker.tick=100ms",
                "worker.max_attempts=2",
                "worker.retry_backoff=100ms",
            ],
        )
        .await?;
        if reason == "invalid peer certificate" {
            // B restarted trusting another CA than the one partner-api's
            // certificate comes from.
            lab.stack
                .restart_backends(&[format!("partner.ca_cert={}", foreign_ca.display())])
                .await?;
        }
        let rows = jobs_against_a_broken_partner(&mut lab, 5).await?;
        let b = "service-b-1";
        let unclosed = lab.metric(b, "lab_http_responses_unclosed", &[]).await;
        let alive = lab.metric(b, "lab_worker_tasks_alive", &[]).await;
        let failed = rows
            .iter()
            .filter(|(status, ..)| status == "failed")
            .count();
        let first_error = rows.first().map_or("", |(.., error)| error.as_str());
        println!(
            "{answer} {size}: {failed} of {} jobs failed after their attempts ({first_error}); \
             responses kept {unclosed:?}, worker tasks alive {alive:?}",
            rows.len()
        );
        assert_eq!(rows.len(), 5, "no job lost");
        for (status, attempts, error) in &rows {
            assert_eq!(status, "failed", "{answer}: {rows:?}");
            assert_eq!(*attempts, 2, "retried once, then failed: {rows:?}");
            assert!(
                error.contains(reason),
                "{answer}: names {reason:?}: {error}"
            );
        }
        assert_eq!(unclosed, Some(0.0), "no response kept");
        assert_eq!(alive, Some(0.0), "no worker task left waiting");
    }
    Ok(())
}
