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
