//! Service B: the gRPC callee of the incident.
//!
//! Start-up order matters for an honest `/readyz`: the admin listener comes
//! first (so `/healthz` answers while MySQL is awaited), then MySQL,
//! migrations and seed data, then the gRPC listener, then registration in
//! etcd. `/readyz` is 200 only once gRPC is serving, MySQL answers and, when
//! `faults.lb = "etcd"`, B's key is in etcd under a live lease.
//!
//! Shutdown on SIGTERM/SIGINT: health flips to NOT_SERVING and the lease is
//! revoked, B keeps serving for `service_b.drain_period`, then the listener
//! stops accepting, HTTP/2 GOAWAY is sent and in-flight requests finish, for
//! at most `service_b.shutdown_grace`. [`Application`] holds each step.

mod app;
pub mod db;
pub mod deadline;
pub mod grpc;
pub mod http_client;
pub mod item_cache;
pub mod job_queue;
pub mod metrics;
pub mod recycle;
pub mod registry;
pub mod rows;
pub mod worker;

use std::net::SocketAddr;

pub use app::Application;
use lab_common::config::LabConfig;
use tokio_util::sync::CancellationToken;

/// The id this instance reports as `served_by`.
pub fn instance_id(config: &LabConfig) -> String {
    if !config.service_b.instance_id.is_empty() {
        return config.service_b.instance_id.clone();
    }
    let host = host_name();
    let port = config
        .service_b
        .listen
        .parse::<SocketAddr>()
        .map(|a| a.port())
        .unwrap_or_default();
    format!("b-{host}-{port}")
}

/// The address other processes dial: `service_b.advertise_addr`, else the
/// listen address — with the host name instead of an unspecified IP.
pub fn advertise_addr(config: &LabConfig) -> String {
    let b = &config.service_b;
    if !b.advertise_addr.is_empty() {
        return b.advertise_addr.clone();
    }
    match b.listen.parse::<SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => {
            format!("{}:{}", host_name(), addr.port())
        }
        _ => b.listen.clone(),
    }
}

/// This machine's host name, or `localhost` if it has none that is UTF-8.
fn host_name() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into())
}

/// Runs service B until `shutdown` is cancelled: see [`Application`] for
/// the start-up and shutdown steps.
pub async fn run(config: LabConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    Application::build(config, shutdown)
        .await?
        .run_until_stopped()
        .await
}
