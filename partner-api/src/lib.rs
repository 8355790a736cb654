//! partner-api: the outside HTTPS service B calls (cause 4's other side).
//!
//! It behaves like a typical partner API: HTTPS only, HTTP/1.1, a fixed
//! latency and a large JSON answer, keep-alive connections closed after
//! `partner.idle_timeout` of idleness. Its metrics show what a leaking
//! client costs the server: a TLS handshake per call
//! (`partner_tls_handshakes_total`) and connections pinned by answers
//! nobody reads (`partner_connections_open`).
//!
//! [`certs`] makes the lab's private CA and the partner's certificate.

mod api;
pub mod certs;
mod metrics;
mod server;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use lab_common::{admin, config::LabConfig};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// How long shutdown waits for the admin listener's open scrapes.
const ADMIN_SHUTDOWN_GRACE: Duration = Duration::from_secs(2);

/// Runs the partner until `shutdown` is cancelled.
pub async fn run(config: LabConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let partner = &config.partner;
    // Certificate problems are configuration errors: fail before binding.
    let tls = server::tls_config(partner)?;
    let registry = lab_common::metrics::registry()?;
    let metrics = metrics::Metrics::register(&registry)?;

    let listener = TcpListener::bind(&partner.listen)
        .await
        .with_context(|| format!("binding HTTPS listener {} (partner.listen)", partner.listen))?;
    let admin_listener = TcpListener::bind(&partner.admin_listen)
        .await
        .with_context(|| {
            format!(
                "binding admin listener {} (partner.admin_listen)",
                partner.admin_listen
            )
        })?;
    // The admin listener starts after the HTTPS one is bound, and the
    // partner has no dependency of its own: answering at all means ready.
    let readiness: admin::ReadinessProbe = Arc::new(|| Box::pin(async { Ok(()) }));
    let faults = lab_common::faults::LiveFaults::new("partner-api", config.faults, &[], &registry)?;
    let admin_router = admin::router(admin::AdminState {
        service: "partner-api",
        registry,
        config: config.clone(),
        faults,
        readiness,
    });
    let mut admin_task = lab_common::tasks::spawn(
        "admin.listener",
        admin::serve(admin_listener, admin_router, shutdown.clone()),
    );
    tracing::info!(
        listen = %partner.listen,
        admin = %partner.admin_listen,
        latency = ?partner.latency,
        body_bytes = partner.body_bytes,
        idle_timeout = ?partner.idle_timeout,
        "partner-api serving HTTPS"
    );

    let enrich =
        Arc::new(api::Enrich::new(partner.latency, partner.body_bytes).answering(partner.answer));
    let settings = server::ConnectionSettings {
        acceptor: tokio_rustls::TlsAcceptor::from(tls),
        app: api::router(enrich, metrics.clone()),
        idle_timeout: partner.idle_timeout,
        metrics,
    };
    // Stops the HTTPS side if the admin listener fails, and vice versa.
    let https = server::serve(listener, settings, shutdown.clone());
    tokio::select! {
        () = https => {}
        admin = &mut admin_task => {
            shutdown.cancel();
            return admin.context("admin listener task failed");
        }
    }
    match tokio::time::timeout(ADMIN_SHUTDOWN_GRACE, &mut admin_task).await {
        Ok(joined) => joined.context("admin listener task failed")?,
        Err(_) => admin_task.abort(),
    }
    tracing::info!("partner-api stopped");
    Ok(())
}
