//! `labctl up` runs partner-api: certificates in the state dir, the
//! partner's addresses in every service's config, ready before the Bs.

use std::time::Duration;

use lab_tests::{TestLab, eventually, metric_sum};

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

    // It answers TLS on its port: a connection shows on its metrics.
    let before = lab
        .metric("partner-api", "partner_connections_accepted_total", &[])
        .await
        .ok_or_else(|| anyhow::anyhow!("no partner metrics"))?;
    let _tcp = tokio::net::TcpStream::connect(&partner.listen).await?;
    eventually(
        Duration::from_secs(10),
        "the connection is counted",
        || async {
            let text = lab.metrics("partner-api").await.ok()?;
            let now = metric_sum(&text, "partner_connections_accepted_total", &[])?;
            (now > before).then_some(())
        },
    )
    .await?;

    lab.stack.down().await?;
    assert!(!record.is_alive(), "partner-api stopped by down");
    Ok(())
}
