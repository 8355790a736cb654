//! A's public HTTP/JSON API (README, "A's API"): each route validates its input,
//! calls B with A's deadline, and answers with `served_by` in the body and
//! the `x-served-by` header.

use std::{sync::Arc, time::Instant};

use axum::{
    Json, Router,
    extract::{FromRequest, MatchedPath, Path, Request, State, rejection::JsonRejection},
    http::{HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use lab_proto::v1::{
    GetItemRequest, GetJobRequest, SubmitJobRequest, backend_client::BackendClient,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::{balancer::BackendChannel, metrics::Metrics};

/// What every request handler needs.
#[derive(Clone)]
pub struct AppState {
    pub backend: BackendClient<BackendChannel>,
    pub deadline: std::time::Duration,
    pub metrics: Metrics,
}

/// How close to A's deadline a CANCELLED from B counts as the deadline.
const DEADLINE_SLACK: std::time::Duration = std::time::Duration::from_millis(20);

/// Whether a call may safely be sent twice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Call {
    Read,
    Write,
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
            // A never cancels its own calls (its deadline is the branch above),
            // so CANCELLED here means the transport dropped the call before
            // B answered — e.g. it was queued on a connection that got GOAWAY.
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

/// Sends one call to B with A's deadline: the deadline travels as
/// `grpc-timeout`, and A also stops waiting itself when it passes. With no
/// endpoint at all the call fails at once (503) instead of waiting for one.
/// A read that no B answered (the call failed in the transport: connection
/// refused or reset, queued on a connection that got GOAWAY) is retried once
/// within the same deadline, like gRPC clients' transparent retry. With
/// `lb = "etcd"` the balancer has ejected the failed endpoint, so the retry
/// lands on another B. Writes are never retried: B may have applied them.
async fn call_b<T, F, Fut>(state: &AppState, kind: Call, call: F) -> Result<(T, String), ApiError>
where
    F: Fn(BackendClient<BackendChannel>, std::time::Duration) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    if state.metrics.backend_endpoints.get() == 0 {
        state
            .metrics
            .backend_calls
            .with_label_values(&["none", lab_proto::code_name(tonic::Code::Unavailable)])
            .inc();
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "no B instance is registered",
        ));
    }
    let deadline = state.deadline;
    let started = tokio::time::Instant::now();
    let mut attempts_left = if kind == Call::Read { 2 } else { 1 };
    loop {
        attempts_left -= 1;
        let remaining = deadline.saturating_sub(started.elapsed());
        let outcome = tokio::time::timeout(remaining, call(state.backend.clone(), remaining)).await;
        let (served_by, code, result) = match outcome {
            Err(_) => (
                None,
                tonic::Code::DeadlineExceeded,
                Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "deadline_exceeded",
                    format!("B did not answer within {deadline:?}"),
                )),
            ),
            Ok(Ok(response)) => {
                let served_by = metadata_served_by(response.metadata());
                (
                    served_by.clone(),
                    tonic::Code::Ok,
                    Ok((response.into_inner(), served_by.unwrap_or_default())),
                )
            }
            Ok(Err(status)) => {
                let served_by = metadata_served_by(status.metadata());
                // tonic's server answers CANCELLED when the grpc-timeout A
                // sent runs out: at A's deadline that is a deadline, not an
                // outage.
                let code = match status.code() {
                    tonic::Code::Cancelled if started.elapsed() + DEADLINE_SLACK >= deadline => {
                        tonic::Code::DeadlineExceeded
                    }
                    code => code,
                };
                let error = if code == tonic::Code::DeadlineExceeded {
                    ApiError {
                        served_by: served_by.clone(),
                        ..ApiError::new(
                            StatusCode::GATEWAY_TIMEOUT,
                            "deadline_exceeded",
                            format!("B did not answer within {deadline:?}: {}", status.message()),
                        )
                    }
                } else {
                    ApiError::from_status(&status, served_by.clone())
                };
                (served_by, code, Err(error))
            }
        };
        state
            .metrics
            .backend_calls
            .with_label_values(&[
                served_by.as_deref().unwrap_or("unknown"),
                lab_proto::code_name(code),
            ])
            .inc();
        if let (None, Err(e)) = (&served_by, &result) {
            tracing::debug!(?code, error = %e.message, "no B answered");
        }
        let nobody_answered = served_by.is_none() && code != tonic::Code::DeadlineExceeded;
        if nobody_answered && attempts_left > 0 && started.elapsed() < deadline {
            state.metrics.backend_retries.inc();
            continue;
        }
        return result;
    }
}

fn metadata_served_by(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(lab_proto::SERVED_BY_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn with_deadline<T>(message: T, deadline: std::time::Duration) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(deadline);
    request
}

async fn get_item(
    State(state): State<Arc<AppState>>,
    Path(raw_id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id("id", &raw_id)?;
    let (reply, served_by) = call_b(&state, Call::Read, |mut b, deadline| async move {
        b.get_item(with_deadline(GetItemRequest { id }, deadline))
            .await
    })
    .await?;
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
pub struct JsonBody<T>(T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    Json<T>: FromRequest<S, Rejection = JsonRejection>,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(request, state).await {
            Ok(Json(value)) => Ok(JsonBody(value)),
            Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "request body exceeds service_a.max_body_bytes",
                ))
            }
            Err(rejection) => Err(ApiError::bad_request(rejection.body_text())),
        }
    }
}

async fn submit_job(
    State(state): State<Arc<AppState>>,
    JsonBody(job): JsonBody<NewJob>,
) -> Result<Response, ApiError> {
    if job.payload.is_empty() {
        return Err(ApiError::bad_request("payload must not be empty"));
    }
    let payload = job.payload;
    let (reply, served_by) = call_b(&state, Call::Write, |mut b, deadline| {
        let payload = payload.clone();
        async move {
            b.submit_job(with_deadline(SubmitJobRequest { payload }, deadline))
                .await
        }
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
    let (reply, served_by) = call_b(&state, Call::Read, |mut b, deadline| async move {
        b.get_job(with_deadline(GetJobRequest { job_id }, deadline))
            .await
    })
    .await?;
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
