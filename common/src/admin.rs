//! The admin listener every service runs beside its main port:
//!
//! * `GET /metrics` — Prometheus text format;
//! * `GET /healthz` — the process is alive (always 200 once listening);
//! * `GET /readyz`  — dependencies reachable (200, or 503 with the reason);
//! * `GET /faults`  — the effective mode and switches, as JSON.
//!
//! Every service serves exactly these routes, each with its own
//! [`AdminState`]: what differs between services is the readiness probe and
//! the metrics in the registry, not the routes.

use std::{future::Future, pin::Pin, sync::Arc};

use axum::{
    Json, Router,
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use prometheus::Registry;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::LabConfig;

/// Future returned by a readiness probe: `Err(reason)` when not ready.
pub type ReadinessFuture = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// Checks the service's dependencies for `/readyz`.
pub type ReadinessProbe = Arc<dyn Fn() -> ReadinessFuture + Send + Sync>;

/// What the admin routes read.
#[derive(Clone)]
pub struct AdminState {
    pub service: &'static str,
    pub registry: Registry,
    pub config: Arc<LabConfig>,
    pub readiness: ReadinessProbe,
}

/// The admin routes for `state`.
pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/faults", get(faults))
        .with_state(state)
}

/// Serves `router` on `listener` until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

async fn metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        crate::metrics::render(&state.registry),
    )
        .into_response()
}

async fn healthz(State(state): State<AdminState>) -> Response {
    Json(json!({"status": "alive", "service": state.service})).into_response()
}

async fn readyz(State(state): State<AdminState>) -> Response {
    match (state.readiness)().await {
        Ok(()) => Json(json!({"ready": true, "service": state.service})).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"ready": false, "service": state.service, "reason": reason})),
        )
            .into_response(),
    }
}

async fn faults(State(state): State<AdminState>) -> Response {
    Json(json!({
        "service": state.service,
        "mode": state.config.mode,
        "faults": state.config.faults,
    }))
    .into_response()
}
