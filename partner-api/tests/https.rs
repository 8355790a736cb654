//! partner-api over real HTTPS on loopback: answers, errors, and the
//! metrics that show handshakes and open connections.

// Test code: its helpers may panic, which fails the test with the message.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::{future::Future, sync::Arc, time::Duration};

use lab_common::config::LabConfig;
use partner_api::certs::{self, TlsFiles};
use reqwest::StatusCode;
use rustls::pki_types::{CertificateDer, pem::PemObject};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// A partner running in this test's runtime, on free loopback ports.
struct Partner {
    https: String,
    admin: String,
    files: TlsFiles,
    shutdown: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port()
}

impl Partner {
    async fn start(body_bytes: usize, idle_timeout: Duration) -> Partner {
        let dir = tempfile::tempdir().expect("tempdir");
        let files = certs::ensure(dir.path(), &["127.0.0.1", "localhost"]).expect("certs");
        let mut config = LabConfig::default();
        let p = &mut config.partner;
        p.listen = format!("127.0.0.1:{}", free_port());
        p.admin_listen = format!("127.0.0.1:{}", free_port());
        p.cert = files.cert.display().to_string();
        p.key = files.key.display().to_string();
        p.latency = Duration::from_millis(5);
        p.body_bytes = body_bytes;
        p.idle_timeout = idle_timeout;
        let https = format!("https://{}", p.listen);
        let admin = format!("http://{}", p.admin_listen);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(partner_api::run(config, shutdown.clone()));
        let partner = Partner {
            https,
            admin,
            files,
            shutdown,
            task,
            _dir: dir,
        };
        let probe = client(&partner.files.ca_cert);
        let ready = format!("{}/readyz", partner.admin);
        eventually("partner ready", || async {
            let response = probe.get(&ready).send().await.ok()?;
            (response.status() == StatusCode::OK).then_some(())
        })
        .await;
        partner
    }

    fn enrich_url(&self) -> String {
        format!("{}/v1/enrich", self.https)
    }

    async fn metrics(&self) -> String {
        client(&self.files.ca_cert)
            .get(format!("{}/metrics", self.admin))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics text")
    }

    /// Polls `/metrics` until `series` has `value`.
    async fn metric_reaches(&self, series: &str, value: f64) {
        let what = format!("{series} == {value}");
        eventually(&what, || async {
            (metric(&self.metrics().await, series) == Some(value)).then_some(())
        })
        .await;
    }
}

/// An HTTPS client that trusts only `ca` and speaks HTTP/1.1, like B's.
fn client(ca: &std::path::Path) -> reqwest::Client {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots.add(cert.expect("CA PEM")).expect("CA accepted");
    }
    let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .http1_only()
        .build()
        .expect("client")
}

async fn json_of(response: reqwest::Response) -> serde_json::Value {
    let body = response.bytes().await.expect("body");
    serde_json::from_slice(&body).expect("JSON body")
}

/// The value of one series (`name` or `name{labels}`) in metrics text.
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<()>>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if check().await.is_some() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not true after {WAIT:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn answers_over_https_and_counts_handshakes_and_connections() {
    let partner = Partner::start(100_000, Duration::from_secs(90)).await;

    // One new client per call, as B's buggy client does: one handshake each.
    let mut clients = Vec::new();
    for i in 0..3 {
        let client = client(&partner.files.ca_cert);
        let request = format!(r#"{{"id":{i}}}"#);
        let response = client
            .post(partner.enrich_url())
            .body(request.clone())
            .send()
            .await
            .expect("POST /v1/enrich");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.version(), reqwest::Version::HTTP_11);
        assert_eq!(
            response.headers()["content-type"],
            "application/json",
            "content type"
        );
        assert_eq!(response.content_length(), Some(100_000));
        let body = response.bytes().await.expect("body");
        assert_eq!(body.len(), 100_000);
        assert!(body.starts_with(b"{\"score\":"), "score comes first");
        let value: serde_json::Value = serde_json::from_slice(&body).expect("JSON answer");
        assert!(value["score"].is_u64());
        assert_eq!(value["request_bytes"], request.len());
        clients.push(client);
    }
    partner
        .metric_reaches("partner_tls_handshakes_total", 3.0)
        .await;
    let text = partner.metrics().await;
    assert_eq!(
        metric(&text, "partner_connections_accepted_total"),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, "partner_requests_total{status=\"200\"}"),
        Some(3.0)
    );
    assert_eq!(
        metric(&text, "partner_connections_open"),
        Some(3.0),
        "kept alive by the clients' pools"
    );
    drop(clients);
    partner
        .metric_reaches("partner_connections_open", 0.0)
        .await;

    // Errors: JSON bodies with a code, on one reused connection.
    let c = client(&partner.files.ca_cert);
    let bad = c
        .post(partner.enrich_url())
        .body("not json")
        .send()
        .await
        .expect("bad JSON");
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    let err = json_of(bad).await;
    assert_eq!(err["code"], "invalid_json");
    assert!(err["error"].as_str().is_some_and(|s| !s.is_empty()));

    let big = c
        .post(partner.enrich_url())
        .body(vec![b' '; 70 * 1024])
        .send()
        .await
        .expect("large body");
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let err = json_of(big).await;
    assert_eq!(err["code"], "payload_too_large");

    let missing = c
        .post(format!("{}/v1/nothing", partner.https))
        .body("{}")
        .send()
        .await
        .expect("unknown path");
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let wrong_method = c.get(partner.enrich_url()).send().await.expect("GET");
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    partner
        .metric_reaches("partner_requests_total{status=\"400\"}", 1.0)
        .await;
    let text = partner.metrics().await;
    for status in ["413", "404", "405"] {
        let series = format!("partner_requests_total{{status=\"{status}\"}}");
        assert_eq!(metric(&text, &series), Some(1.0), "{series}");
    }

    // A client that does not trust the lab CA fails its handshake.
    let other = tempfile::tempdir().expect("tempdir");
    let other_ca = certs::ensure(other.path(), &["127.0.0.1"]).expect("other CA");
    let refused = client(&other_ca.ca_cert)
        .post(partner.enrich_url())
        .body("{}")
        .send()
        .await;
    assert!(refused.is_err(), "an unknown CA must not be trusted");
    partner
        .metric_reaches("partner_tls_handshake_failures_total", 1.0)
        .await;

    partner.shutdown.cancel();
    partner.task.await.expect("join").expect("clean stop");
}

#[tokio::test]
async fn idle_connections_close_but_unread_answers_pin_theirs() {
    // Far larger than loopback socket buffers can hold, so the server is
    // still writing while the client does not read.
    const BODY: usize = 32 * 1024 * 1024;
    let partner = Partner::start(BODY, Duration::from_millis(1500)).await;
    let pinning = client(&partner.files.ca_cert);
    let idle = client(&partner.files.ca_cert);

    // Headers only: the answer stays unread and the server keeps writing.
    let pinned = pinning
        .post(partner.enrich_url())
        .body("{}")
        .send()
        .await
        .expect("pinned call");
    assert_eq!(pinned.status(), StatusCode::OK);
    let read = idle
        .post(partner.enrich_url())
        .body("{}")
        .send()
        .await
        .expect("idle call")
        .bytes()
        .await
        .expect("read in full");
    assert_eq!(read.len(), BODY);
    partner
        .metric_reaches("partner_connections_open", 2.0)
        .await;

    // The read connection goes idle and is closed after 1.5 s although
    // its client keeps it pooled; the pinned one, older, stays open.
    partner
        .metric_reaches("partner_connections_open", 1.0)
        .await;

    // ... and still delivers the whole answer.
    let mut pinned = pinned;
    let (mut total, mut last) = (0, 0);
    while let Some(chunk) = pinned.chunk().await.expect("pinned body") {
        total += chunk.len();
        last = chunk.last().copied().unwrap_or(last);
    }
    assert_eq!((total, last), (BODY, b'}'));

    // Read, it is just idle: closed in turn.
    partner
        .metric_reaches("partner_connections_open", 0.0)
        .await;
    drop((pinning, idle));

    partner.shutdown.cancel();
    partner.task.await.expect("join").expect("clean stop");
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_pinned_connection() {
    let partner = Partner::start(32 * 1024 * 1024, Duration::from_secs(90)).await;
    let c = client(&partner.files.ca_cert);
    let pinned = c
        .post(partner.enrich_url())
        .body("{}")
        .send()
        .await
        .expect("pinned call");
    partner
        .metric_reaches("partner_connections_open", 1.0)
        .await;

    partner.shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), partner.task)
        .await
        .expect("run returns promptly despite the pinned connection")
        .expect("join")
        .expect("clean stop");
    drop(pinned);
}

#[tokio::test]
async fn missing_certificate_or_key_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let files = certs::ensure(dir.path(), &["127.0.0.1"]).expect("certs");
    let run = |cert: String, key: String| {
        let mut config = LabConfig::default();
        config.partner.listen = format!("127.0.0.1:{}", free_port());
        config.partner.admin_listen = format!("127.0.0.1:{}", free_port());
        config.partner.cert = cert;
        config.partner.key = key;
        partner_api::run(config, CancellationToken::new())
    };
    let key = files.key.display().to_string();
    let cert = files.cert.display().to_string();

    let err = run(String::new(), key.clone()).await.expect_err("no cert");
    assert!(err.to_string().contains("partner.cert is empty"), "{err:#}");
    let err = run(cert.clone(), "/nonexistent/partner.key".into())
        .await
        .expect_err("no key");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("partner.key") && msg.contains("/nonexistent/partner.key"),
        "{msg}"
    );
    let err = run(key, cert).await.expect_err("swapped");
    assert!(format!("{err:#}").contains("partner.cert"), "{err:#}");
}
