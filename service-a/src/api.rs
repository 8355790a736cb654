//! A's public HTTP/JSON API (docs/architecture.md, "A's HTTP API"): each route validates its input,
//! calls B with A's deadline, and answers with `served_by` in the body and
//! the `x-served-by` header, and the request's trace id in `x-trace-id`.

use std::{sync::Arc, time::Instant};

use axum::{
    Json, Router,
    extract::{FromRequest, MatchedPath, Path, Request, State, rejection::JsonRejection},
    http::{HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use lab_proto::v1::{GetItemRequest, GetJobRequest, SubmitJobRequest};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{
    backend::{Backend, CallError, Served},
    metrics::Metrics,
};

/// What every request handler needs.
#[derive(Clone)]
pub struct AppState {
    /// B, behind the resilience stack ([`crate::backend`]).
    pub backend: Backend,
    pub metrics: Metrics,
}

/// The public router, with request metrics around every route.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        .route("/api/items/{id}", get(get_item))
        .route("/api/jobs", post(submit_job))
        .route("/api/jobs/{id}", get(get_job))
        .fallback(not_found)
        .with_state(Arc::new(state))
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .layer(middleware::from_fn_with_state(metrics, track))
        // Outermost, so every answer — 404, 413 and 5xx too — carries
        // `x-trace-id`, and the call to B runs inside the request's span.
        .layer(lab_common::trace::TraceContextLayer)
}

/// Counts and times every request by route template and status.
async fn track(State(metrics): State<Metrics>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    metrics
        .http_requests
        .with_label_values(&[route.as_str(), response.status().as_str()])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[route.as_str()])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// An error answer: status, JSON `{"error", "code"}`, and the B that
/// produced it when one did.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    served_by: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
            served_by: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_argument", message)
    }

    /// Maps B's gRPC status to the HTTP contract: 400 bad input, 404 unknown
    /// id, 503 B unavailable or shedding, 504 deadline exceeded.
    fn from_status(status: &tonic::Status, served_by: Option<String>) -> Self {
        use tonic::Code;
        let (http, code) = match status.code() {
            Code::InvalidArgument | Code::OutOfRange => {
                (StatusCode::BAD_REQUEST, "invalid_argument")
            }
            Code::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            Code::Unavailable | Code::ResourceExhausted => {
                (StatusCode::SERVICE_UNAVAILABLE, "unavailable")
            }
            Code::DeadlineExceeded => (StatusCode::GATEWAY_TIMEOUT, "deadline_exceeded"),
            // A never cancels its own calls (a CANCELLED at A's deadline is
            // sorted as the deadline in `crate::backend`), so CANCELLED here
            // means the transport dropped the call before B answered — e.g.
            // it was queued on a connection that got GOAWAY.
            Code::Cancelled => (StatusCode::SERVICE_UNAVAILABLE, "unavailable"),
            _ => (StatusCode::BAD_GATEWAY, "backend_error"),
        };
        Self {
            status: http,
            code,
            message: status.message().to_owned(),
            served_by,
        }
    }
}

impl From<CallError> for ApiError {
    fn from(error: CallError) -> Self {
        match error {
            CallError::NoEndpoint => Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                error.to_string(),
            ),
            CallError::Deadline { ref served_by, .. } => Self {
                served_by: served_by.clone(),
                ..Self::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "deadline_exceeded",
                    error.to_string(),
                )
            },
            CallError::NotAnswered(status) => Self::from_status(&status, None),
            CallError::Answered { status, served_by } => {
                Self::from_status(&status, Some(served_by))
            }
        }
    }
}

/// A request body that is not the JSON the route expects: 413 over
/// `service_a.max_body_bytes`, else 400 with axum's reason.
impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> Self {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Self::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "request body exceeds service_a.max_body_bytes",
            )
        } else {
            Self::bad_request(rejection.body_text())
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (
            self.status,
            Json(json!({"error": self.message, "code": self.code})),
        )
            .into_response();
        if let Some(value) = self.served_by.and_then(|s| HeaderValue::try_from(s).ok()) {
            response.headers_mut().insert("x-served-by", value);
        }
        response
    }
}

/// A success answer whose body carries `served_by`, mirrored in the header.
fn served(status: StatusCode, served_by: &str, body: serde_json::Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    if let Ok(value) = HeaderValue::try_from(served_by) {
        response.headers_mut().insert("x-served-by", value);
    }
    response
}

fn parse_id(field: &str, raw: &str) -> Result<i64, ApiError> {
    match raw.parse::<i64>() {
        Ok(id) if id >= 1 => Ok(id),
        _ => Err(ApiError::bad_request(format!(
            "{field} must be a positive integer, got {raw:?}"
        ))),
    }
}

async fn get_item(
    State(state): State<Arc<AppState>>,
    Path(raw_id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id("id", &raw_id)?;
    let Served { reply, served_by } = state.backend.call(GetItemRequest { id }).await?;
    let item = reply.item.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "backend_error",
            "B replied without an item",
        )
    })?;
    Ok(served(
        StatusCode::OK,
        &served_by,
        json!({
            "item": {
                "id": item.id,
                "name": item.name,
                "price_cents": item.price_cents,
                "description": item.description,
            },
            "served_by": served_by,
        }),
    ))
}

/// `POST /api/jobs` body.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    pub payload: String,
}

/// JSON extractor whose rejections use the API's error shape.
#[derive(FromRequest)]
#[from_request(via(Json), rejection(ApiError))]
pub struct JsonBody<T>(T);

async fn submit_job(
    State(state): State<Arc<AppState>>,
    JsonBody(job): JsonBody<NewJob>,
) -> Result<Response, ApiError> {
    if job.payload.is_empty() {
        return Err(ApiError::bad_request("payload must not be empty"));
    }
    let Served { reply, served_by } = state
        .backend
        .call(SubmitJobRequest {
            payload: job.payload,
        })
        .await?;
    Ok(served(
        StatusCode::ACCEPTED,
        &served_by,
        json!({"job_id": reply.job_id, "served_by": served_by}),
    ))
}

async fn get_job(
    State(state): State<Arc<AppState>>,
    Path(raw_id): Path<String>,
) -> Result<Response, ApiError> {
    let job_id = parse_id("id", &raw_id)?;
    let Served { reply, served_by } = state.backend.call(GetJobRequest { job_id }).await?;
    let job = reply.job.ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "backend_error",
            "B replied without a job",
        )
    })?;
    Ok(served(
        StatusCode::OK,
        &served_by,
        json!({
            "job": {
                "id": job.id,
                "status": job.status,
                "attempts": job.attempts,
                "payload": job.payload,
                "result": job.result,
                "created_at_ms": job.created_at_ms,
                "updated_at_ms": job.updated_at_ms,
            },
            "served_by": served_by,
        }),
    ))
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}
