//! The HTTPS listener, written out by hand (rustls + hyper's HTTP/1.1
//! connection) rather than through `axum::serve`, because the partner must
//! count handshakes, bound them in time, close idle keep-alive connections
//! and drop everything at once on shutdown.

use std::{net::SocketAddr, path::Path, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use axum::Router;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    service::TowerToHyperService,
};
use lab_common::config::{PartnerConfig, env_var_for};
use rustls::{
    ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
};
use tokio::{net::TcpListener, task::JoinSet};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use lab_common::metrics::GaugeGuard;

use crate::metrics::Metrics;

/// A client that opens TCP but never finishes the handshake is cut off
/// after this, so it cannot hold a connection forever.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The rustls server config from `partner.cert` and `partner.key`, on the
/// ring provider (the workspace builds rustls without a default one).
pub fn tls_config(partner: &PartnerConfig) -> anyhow::Result<Arc<ServerConfig>> {
    let cert_path = required_path("partner.cert", &partner.cert)?;
    let key_path = required_path("partner.key", &partner.key)?;
    let certs = CertificateDer::pem_file_iter(cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("cannot read partner.cert = {:?}: {e}", partner.cert))?;
    if certs.is_empty() {
        bail!("partner.cert = {:?} holds no PEM certificate", partner.cert);
    }
    let key = PrivateKeyDer::from_pem_file(key_path)
        .map_err(|e| anyhow::anyhow!("cannot read partner.key = {:?}: {e}", partner.key))?;
    let mut config =
        ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS protocol versions")?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .context("partner.cert and partner.key do not make a usable certificate and key")?;
    // HTTP/1.1 only, as many partner APIs are: one request per connection
    // at a time, so every call in flight needs a connection of its own.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn required_path<'a>(key: &str, value: &'a str) -> anyhow::Result<&'a Path> {
    if value.trim().is_empty() {
        bail!(
            "{key} is empty: set it to a PEM file (--set {key}=FILE or {}); \
             `partner-api certs --dir DIR --host HOST` makes one",
            env_var_for(key)
        );
    }
    Ok(Path::new(value))
}

/// How each connection is served.
#[derive(Clone)]
pub struct ConnectionSettings {
    pub acceptor: TlsAcceptor,
    pub app: Router,
    /// How long a kept-alive connection may wait for its next request
    /// (`partner.idle_timeout`; the config rules refuse zero).
    pub idle_timeout: Duration,
    pub metrics: Metrics,
}

/// Accepts until `shutdown`, then returns at once. Connections still open
/// are dropped rather than awaited: a client that never reads its answer
/// would otherwise hold the partner up forever.
pub async fn serve(
    listener: TcpListener,
    settings: ConnectionSettings,
    shutdown: CancellationToken,
) {
    let mut connections = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            biased;
            () = shutdown.cancelled() => break,
            Some(done) = connections.join_next(), if !connections.is_empty() => {
                if let Err(e) = done
                    && e.is_panic()
                {
                    tracing::error!(error = %e, "connection task panicked");
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                settings.metrics.connections_accepted.inc();
                let open = settings.metrics.open_connection();
                let _ = tcp.set_nodelay(true);
                connections.spawn(lab_common::tasks::named(
                    "partner.connection",
                    connection(tcp, peer, settings.clone(), open),
                ));
            }
            Err(e) => {
                // Out of file descriptors, say: accepting again at once
                // would spin a core.
                tracing::warn!(error = %e, "accept failed; pausing 100 ms");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => {}
                }
            }
        }
    }
    let still_open = connections.len();
    connections.abort_all();
    tracing::info!(
        still_open,
        "HTTPS listener closed; open connections dropped"
    );
}

/// One connection: TLS handshake (bounded), then HTTP/1.1 until either side
/// closes it or it sits idle for `idle_timeout`.
async fn connection(
    tcp: tokio::net::TcpStream,
    peer: SocketAddr,
    settings: ConnectionSettings,
    _open: GaugeGuard,
) {
    let metrics = &settings.metrics;
    let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, settings.acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => {
            metrics.tls_handshakes.inc();
            tls
        }
        Ok(Err(e)) => {
            metrics.tls_handshake_failures.inc();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            return;
        }
        Err(_) => {
            metrics.tls_handshake_failures.inc();
            tracing::debug!(%peer, "TLS handshake timed out");
            return;
        }
    };

    // The idle close is hyper's header read timeout. Read in hyper 1.12
    // (src/proto/h1/conn.rs): `poll_read_head` starts the timer when it
    // begins waiting for a request head and clears it once a head is
    // parsed, and `State::idle()` — run when a request/response exchange
    // has finished on a kept-alive connection — sets `notify_read` "so we
    // can close the connection if another header isn't received in a
    // timely manner". The head is only read while `reading` is `Init`,
    // which it is not while a request is handled or its response written
    // (`can_read_head`), so a connection whose answer the client never
    // reads is not closed by this timer. It also bounds a client that
    // sends nothing after the handshake. It needs a timer: without one a
    // configured timeout panics (src/common/time.rs `Time::check`).
    let result = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(settings.idle_timeout)
        .serve_connection(TokioIo::new(tls), TowerToHyperService::new(settings.app))
        .await;
    match result {
        Ok(()) => {}
        Err(e) if e.is_timeout() => {
            tracing::debug!(%peer, "idle connection closed");
        }
        Err(e) => tracing::debug!(%peer, error = %e, "connection ended with an error"),
    }
}
