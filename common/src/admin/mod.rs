//! The admin listener every service runs beside its main port:
//!
//! * `GET /metrics` — Prometheus text format;
//! * `GET /healthz` — the process is alive (always 200 once listening);
//! * `GET /readyz`  — dependencies reachable (200, or 503 with the reason);
//! * `GET /faults`  — the mode the process started with and the switches
//!   it owns, as last set (at start or by `PUT /faults`), as JSON;
//!
//! and, for operators only (bearer `admin.token`, see [`auth`]), the routes
//! that change state or cost CPU, in [`operator_routes`]:
//!
//! * `PUT /faults`  — a partial JSON patch of owned switches, applied live;
//! * `GET /debug/pprof/profile?seconds=N` — a CPU profile ([`profiles`]);
//! * `GET /debug/pprof/heap` — live heap by allocation site ([`profiles`]);
//! * `GET /debug/tasks` — alive tasks by name, stacks with `stacks=1`
//!   ([`tasks`]).
//!
//! Every service serves exactly these routes, each with its own
//! [`AdminState`]: what differs between services is the readiness probe and
//! the metrics in the registry, not the routes.

pub mod auth;
mod profiles;
mod tasks;

use std::{future::Future, pin::Pin, sync::Arc};

use axum::{
    Extension, Json, Router,
    extract::{DefaultBodyLimit, State, rejection::JsonRejection},
    http::{StatusCode, header},
    middleware,
    response::{IntoResponse, Response},
    routing::{get, put},
};
use prometheus::Registry;
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{config::LabConfig, faults::LiveFaults};

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
    /// The switches this process owns, live.
    pub faults: LiveFaults,
    pub readiness: ReadinessProbe,
}

/// The admin routes for `state`: the open ones, and the operator ones
/// behind the token check.
///
/// In a drill (`admin.drill_token` set) both `GET` and `PUT /faults` sit
/// behind the drill token instead: the switches are the drill's answer.
pub fn router(state: AdminState) -> Router {
    let by_token = |routes: Router<AdminState>| {
        routes.route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_operator,
        ))
    };
    let switches = Router::new()
        .route("/faults", get(faults).put(put_faults))
        .layer(DefaultBodyLimit::max(MAX_OPERATOR_BODY_BYTES));
    let open = Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz));
    let router = if state.config.admin.drill_token.is_set() {
        let switches = switches.route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_drill_facilitator,
        ));
        open.merge(switches).merge(by_token(operator_routes()))
    } else {
        let read_switches = Router::new().route("/faults", get(faults));
        let set_switches = Router::new()
            .route("/faults", put(put_faults))
            .layer(DefaultBodyLimit::max(MAX_OPERATOR_BODY_BYTES));
        open.merge(read_switches)
            .merge(by_token(set_switches.merge(operator_routes())))
    };
    router.with_state(state)
}

/// Routes that cost CPU or show internals; [`router`] puts them behind
/// [`auth::require_operator`] (with `PUT /faults`, outside a drill).
fn operator_routes() -> Router<AdminState> {
    Router::new()
        .route("/debug/pprof/profile", get(profiles::cpu_profile))
        .route("/debug/pprof/heap", get(profiles::heap_profile))
        .route("/debug/tasks", get(tasks::dump))
        .layer(DefaultBodyLimit::max(MAX_OPERATOR_BODY_BYTES))
}

/// Operator requests are small JSON patches.
const MAX_OPERATOR_BODY_BYTES: usize = 4096;

/// Serves `router` on `listener` until `shutdown` is cancelled, with the
/// admin listeners' limits (a header read timeout among them: see
/// [`crate::http_listener`]). Handlers see the caller's address
/// (`ConnectInfo`), which operator actions log.
pub async fn serve(listener: TcpListener, router: Router, shutdown: CancellationToken) {
    crate::http_listener::serve(
        listener,
        router,
        crate::http_listener::Limits::default(),
        shutdown,
    )
    .await;
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
        "faults": state.faults.owned_values(),
    }))
    .into_response()
}

/// Applies `{"switch": "value", ...}` at once; answers what changed and the
/// switches now in force. A refused patch changes nothing.
async fn put_faults(
    State(state): State<AdminState>,
    Extension(operator): Extension<auth::Operator>,
    body: Result<Json<Value>, JsonRejection>,
) -> Response {
    let patch = match body {
        Ok(Json(patch)) => patch,
        Err(rejection) => return bad_request(rejection.status(), rejection.body_text()),
    };
    let by = match operator.addr {
        Some(addr) => format!("operator at {addr}"),
        None => "operator".to_string(),
    };
    match state.faults.apply(&patch, &by) {
        Ok(flips) => Json(json!({
            "service": state.service,
            "changed": flips,
            "faults": state.faults.owned_values(),
        }))
        .into_response(),
        Err(e) => bad_request(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

fn bad_request(status: StatusCode, reason: String) -> Response {
    (
        status,
        Json(json!({"error": reason, "code": "invalid_argument"})),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{config::AdminToken, faults::Switch};
    use axum::body::Body;
    use http::Request;
    use tower::ServiceExt as _;

    const TOKEN: &str = "operator-token-for-tests-0123";

    /// Every operator route, with a request that would change state or
    /// cost CPU if it got through.
    const OPERATOR_ROUTES: [(&str, &str); 4] = [
        ("PUT", "/faults"),
        ("GET", "/debug/pprof/profile?seconds=1"),
        ("GET", "/debug/pprof/heap"),
        ("GET", "/debug/tasks"),
    ];

    fn admin(token: &str) -> Router {
        admin_in_drill(token, "").0
    }

    /// The admin routes of a B started with `token` and `drill_token`
    /// (empty: none), and its metrics registry.
    fn admin_in_drill(token: &str, drill_token: &str) -> (Router, Registry) {
        let registry = Registry::new();
        let mut config = LabConfig::default();
        config.admin.token = AdminToken::new(token);
        config.admin.drill_token = AdminToken::new(drill_token);
        let faults = LiveFaults::from_config("service-b", &config, Switch::SERVICE_B, &registry)
            .expect("live faults");
        let router = router(AdminState {
            service: "service-b",
            registry: registry.clone(),
            config: Arc::new(config),
            faults,
            readiness: Arc::new(|| Box::pin(async { Ok(()) })),
        });
        (router, registry)
    }

    async fn status(router: &Router, method: &str, uri: &str, authorization: Option<&str>) -> u16 {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        let body = if method == "PUT" {
            Body::from(r#"{"worker":"bounded"}"#)
        } else {
            Body::empty()
        };
        let request = request
            .header(header::CONTENT_TYPE, "application/json")
            .body(body)
            .expect("request");
        router
            .clone()
            .oneshot(request)
            .await
            .expect("infallible")
            .status()
            .as_u16()
    }

    #[tokio::test]
    async fn every_operator_route_needs_the_token() {
        let router = admin(TOKEN);
        for (method, uri) in OPERATOR_ROUTES {
            assert_eq!(
                status(&router, method, uri, None).await,
                401,
                "{method} {uri} without a token"
            );
            assert_eq!(
                status(
                    &router,
                    method,
                    uri,
                    Some("Bearer another-token-0123456789")
                )
                .await,
                403,
                "{method} {uri} with a wrong token"
            );
        }
        let off = admin("");
        for (method, uri) in OPERATOR_ROUTES {
            assert_eq!(
                status(&off, method, uri, Some(&format!("Bearer {TOKEN}"))).await,
                403,
                "{method} {uri} with no token configured"
            );
        }
    }

    #[tokio::test]
    async fn the_token_lets_a_patch_through_and_open_routes_need_none() {
        let router = admin(TOKEN);
        let bearer = format!("Bearer {TOKEN}");
        assert_eq!(status(&router, "PUT", "/faults", Some(&bearer)).await, 200);
        for uri in ["/metrics", "/healthz", "/readyz", "/faults"] {
            assert_eq!(status(&router, "GET", uri, None).await, 200, "GET {uri}");
        }
    }

    /// In a drill the trainee holds `admin.token` (profiles, task dumps)
    /// but only the facilitator's drill token reads or sets the switches,
    /// and `/metrics` has no `lab_fault_info`.
    #[tokio::test]
    async fn in_a_drill_only_the_drill_token_reaches_the_switches() {
        const DRILL: &str = "drill-token-for-tests-4567";
        let (router, registry) = admin_in_drill(TOKEN, DRILL);
        let trainee = format!("Bearer {TOKEN}");
        let facilitator = format!("Bearer {DRILL}");
        for method in ["GET", "PUT"] {
            for who in [None, Some(trainee.as_str())] {
                assert_eq!(
                    status(&router, method, "/faults", who).await,
                    403,
                    "{method} /faults as {who:?}"
                );
            }
            assert_eq!(
                status(&router, method, "/faults", Some(&facilitator)).await,
                200,
                "{method} /faults with the drill token"
            );
        }
        assert_eq!(
            status(&router, "GET", "/debug/tasks", Some(&trainee)).await,
            200
        );
        assert_eq!(status(&router, "GET", "/metrics", None).await, 200);
        assert!(
            registry
                .gather()
                .iter()
                .all(|f| f.name() != "lab_fault_info"),
            "lab_fault_info is not exported in a drill"
        );
        let (_, outside) = admin_in_drill(TOKEN, "");
        assert!(
            outside
                .gather()
                .iter()
                .any(|f| f.name() == "lab_fault_info"),
            "outside a drill it is"
        );
    }
}
