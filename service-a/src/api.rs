//! A's public HTTP/JSON API (docs/architecture.md, "A's HTTP API"): each route validates its input,
//! calls B with A's deadline, and answers with `served_by` in the body and
//! the `x-served-by` header, and the request's trace id in `x-trace-id`.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use axum::{
    BoxError, Json, Router,
    error_handling::HandleErrorLayer,
    extract::{
        FromRequest, FromRequestParts, MatchedPath, Path, Request, State,
        rejection::{JsonRejection, PathRejection},
    },
    http::{HeaderValue, StatusCode},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use lab_proto::v1::{GetItemRequest, GetJobRequest, SubmitJobRequest};
use serde::{Deserialize, Serialize};

use crate::{
    backend::{Backend, CallError, Served},
    metrics::Metrics,
    overload::{Admission, admit},
};

/// What every request handler needs.
#[derive(Clone)]
pub struct AppState {
    /// B, behind the resilience stack ([`crate::backend`]).
    pub backend: Backend,
    pub metrics: Metrics,
}

/// A's route templates, which label its request metrics.
const ITEM_ROUTE: &str = "/api/items/{id}";
const JOBS_ROUTE: &str = "/api/jobs";
const JOB_ROUTE: &str = "/api/jobs/{id}";
/// The route label of a request no route matched.
const UNMATCHED: &str = "unmatched";
/// Every `route` label A's request metrics can have.
pub const ROUTES: [&str; 4] = [ITEM_ROUTE, JOBS_ROUTE, JOB_ROUTE, UNMATCHED];

/// What the router refuses from a client.
#[derive(Debug, Clone, Copy)]
pub struct RequestLimits {
    /// Larger bodies get 413 (`service_a.max_body_bytes`).
    pub max_body_bytes: usize,
    /// The longest one admitted request may take, body and call to B
    /// together; past it, 408. The call to B ends at A's deadline, so only
    /// a body sent too slowly gets there — and without this bound it would
    /// hold one of `service_a.max_concurrent_requests` places for as long
    /// as it liked.
    pub request_timeout: Duration,
}

/// The public router, with request metrics around every route and
/// admission ([`crate::overload`]) inside them, so a shed request is
/// counted with its route and status.
pub fn router(state: AppState, admission: Admission, limits: RequestLimits) -> Router {
    let metrics = state.metrics.clone();
    Router::new()
        .route(ITEM_ROUTE, get(get_item))
        .route(JOBS_ROUTE, post(submit_job))
        .route(JOB_ROUTE, get(get_job))
        .fallback(not_found)
        .with_state(Arc::new(state))
        .layer(axum::extract::DefaultBodyLimit::max(limits.max_body_bytes))
        .layer(
            tower::ServiceBuilder::new()
                .layer(HandleErrorLayer::new(|_: BoxError| async {
                    ApiError::request_timeout()
                }))
                .timeout(limits.request_timeout),
        )
        .layer(middleware::from_fn_with_state(admission, admit))
        .layer(middleware::from_fn_with_state(metrics, track))
        // Outermost, so every answer — 404, 413 and 5xx too — carries
        // `x-trace-id`, and the call to B runs inside the request's span.
        .layer(lab_common::trace::TraceContextLayer)
}

/// Counts and times every request by route template and status.
async fn track(State(metrics): State<Metrics>, request: Request, next: Next) -> Response {
    // The template is an `Arc<str>` inside: cloning it does not allocate.
    let route = request.extensions().get::<MatchedPath>().cloned();
    let started = Instant::now();
    let response = next.run(request).await;
    let route = route.as_ref().map_or(UNMATCHED, MatchedPath::as_str);
    metrics
        .http
        .observe(route, response.status(), started.elapsed());
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

    /// A already has `max_concurrent` requests in flight (`deadline =
    /// "propagate"`, [`crate::overload`]): 503 at once.
    pub(crate) fn overloaded(max_concurrent: u32) -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            format!(
                "A is working on {max_concurrent} requests (service_a.max_concurrent_requests); shedding"
            ),
        )
    }

    /// An admitted request outlived [`RequestLimits::request_timeout`]: its
    /// body came too slowly.
    fn request_timeout() -> Self {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            "request_timeout",
            "the request body did not arrive in time (service_a.header_read_timeout + service_a.backend_timeout)",
        )
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

/// An error body. (Answers are typed structs rather than `json!` values:
/// a `serde_json::Value` allocates every key and value before it is
/// written. Fields are in alphabetical order, the order the `json!` maps
/// wrote them in, so the bytes on the wire did not change.)
#[derive(Serialize)]
struct ErrorBody<'a> {
    code: &'static str,
    error: &'a str,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            code: self.code,
            error: &self.message,
        };
        let mut response = (self.status, Json(body)).into_response();
        if let Some(value) = self.served_by.and_then(|s| HeaderValue::try_from(s).ok()) {
            response.headers_mut().insert("x-served-by", value);
        }
        response
    }
}

/// A success answer whose body carries `served_by`, mirrored in the header.
fn served(status: StatusCode, served_by: &str, body: impl Serialize) -> Response {
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
    PathSegment(raw_id): PathSegment<String>,
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
    let body = ItemBody {
        item: ItemJson {
            description: &item.description,
            id: item.id,
            name: &item.name,
            price_cents: item.price_cents,
        },
        served_by: &served_by,
    };
    Ok(served(StatusCode::OK, &served_by, body))
}

/// `GET /api/items/{id}`'s answer (fields in alphabetical order, see
/// [`ErrorBody`]).
#[derive(Serialize)]
struct ItemBody<'a> {
    item: ItemJson<'a>,
    served_by: &'a str,
}

#[derive(Serialize)]
struct ItemJson<'a> {
    description: &'a str,
    id: i64,
    name: &'a str,
    price_cents: i64,
}

/// `POST /api/jobs` body.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NewJob {
    pub payload: String,
}

/// Path extractor whose rejections use the API's error shape (axum's own
/// rejections answer a segment that is not UTF-8 in plain text).
#[derive(FromRequestParts)]
#[from_request(via(Path), rejection(ApiError))]
pub struct PathSegment<T>(T);

/// A path segment axum could not decode: 400 with axum's reason. A
/// rejection axum counts as a server error (a route declared with the
/// wrong parameters) stays one.
impl From<PathRejection> for ApiError {
    fn from(rejection: PathRejection) -> Self {
        if rejection.status().is_client_error() {
            Self::bad_request(rejection.body_text())
        } else {
            Self::new(rejection.status(), "internal", rejection.body_text())
        }
    }
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
    let body = SubmittedBody {
        job_id: reply.job_id,
        served_by: &served_by,
    };
    Ok(served(StatusCode::ACCEPTED, &served_by, body))
}

/// `POST /api/jobs`'s answer.
#[derive(Serialize)]
struct SubmittedBody<'a> {
    job_id: i64,
    served_by: &'a str,
}

async fn get_job(
    State(state): State<Arc<AppState>>,
    PathSegment(raw_id): PathSegment<String>,
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
    let body = JobBody {
        job: JobJson {
            attempts: job.attempts,
            created_at_ms: job.created_at_ms,
            id: job.id,
            payload: &job.payload,
            result: &job.result,
            status: &job.status,
            updated_at_ms: job.updated_at_ms,
        },
        served_by: &served_by,
    };
    Ok(served(StatusCode::OK, &served_by, body))
}

/// `GET /api/jobs/{id}`'s answer (fields in alphabetical order, see
/// [`ErrorBody`]).
#[derive(Serialize)]
struct JobBody<'a> {
    job: JobJson<'a>,
    served_by: &'a str,
}

#[derive(Serialize)]
struct JobJson<'a> {
    attempts: u32,
    created_at_ms: i64,
    id: i64,
    payload: &'a str,
    result: &'a str,
    status: &'a str,
    updated_at_ms: i64,
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    mod hostile_input {
        //! Arbitrary requests against A's real router, with no B behind it
        //! (every call to B is UNAVAILABLE): whatever arrives, A answers
        //! with its JSON error shape and a status of the contract, never
        //! 500, and never panics. Proptest runs 256 cases per property.

        use std::time::Duration;

        use axum::body::Body;
        use lab_common::{
            config::{Faults, Mode},
            faults::{LiveFaults, Switch},
        };
        use proptest::prelude::*;
        use tower::{ServiceExt, util::BoxCloneSyncService};

        use super::super::*;
        use crate::overload::Admission;

        const MAX_BODY_BYTES: usize = 1024;

        fn app() -> Router {
            let registry = prometheus::Registry::new();
            let metrics = Metrics::register(&registry).expect("metrics");
            let no_b = tower::service_fn(|_: http::Request<tonic::body::Body>| async {
                Err::<http::Response<tonic::body::Body>, _>(tonic::Status::unavailable(
                    "no B in this test",
                ))
            });
            let backend = Backend::new(
                BoxCloneSyncService::new(no_b),
                Duration::from_secs(1),
                &metrics,
            );
            let faults = LiveFaults::new(
                "service-a",
                Faults::preset(Mode::Fixed),
                Switch::SERVICE_A,
                &registry,
            )
            .expect("faults");
            let admission = Admission::new(256, faults, metrics.shed.clone());
            let limits = RequestLimits {
                max_body_bytes: MAX_BODY_BYTES,
                request_timeout: Duration::from_secs(10),
            };
            router(AppState { backend, metrics }, admission, limits)
        }

        /// Sends `request` to a fresh A; returns the status and the JSON
        /// body, failing if the body is not A's error shape.
        fn answer(request: http::Request<Body>) -> Result<(StatusCode, serde_json::Value), String> {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map_err(|e| e.to_string())?;
            runtime.block_on(async {
                let response = app().oneshot(request).await.map_err(|e| e.to_string())?;
                let status = response.status();
                let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
                    .await
                    .map_err(|e| e.to_string())?;
                let body: serde_json::Value = serde_json::from_slice(&bytes)
                    .map_err(|e| format!("{status}: not JSON ({e}): {bytes:?}"))?;
                if !(body["error"].is_string() && body["code"].is_string()) {
                    return Err(format!("{status}: not the error shape: {body}"));
                }
                Ok((status, body))
            })
        }

        proptest! {
            /// Any id segment: a positive i64 reaches B (here: 503, no B);
            /// anything else — negative, zero, overflowing, not a number —
            /// is 400 naming what was sent.
            #[test]
            fn any_item_id_is_400_or_reaches_b(raw in prop_oneof![
                any::<i64>().prop_map(|n| n.to_string()),
                "[0-9]{19,30}",
                "-?[0-9a-zA-Z%._~+-]{1,40}",
            ]) {
                let request = http::Request::get(format!("/api/items/{raw}"))
                    .body(Body::empty())
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let (status, body) = answer(request).map_err(TestCaseError::fail)?;
                // The handler sees the segment percent-decoded (`%31` is 1).
                let decoded = percent_encoding::percent_decode_str(&raw).decode_utf8();
                match decoded.ok().and_then(|id| id.parse::<i64>().ok()) {
                    Some(id) if id >= 1 => prop_assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE),
                    _ => {
                        prop_assert_eq!(status, StatusCode::BAD_REQUEST, "{}", body);
                        prop_assert_eq!(&body["code"], "invalid_argument");
                    }
                }
            }

            /// Any bytes as a job, with or without a JSON content type:
            /// 400 (not declared JSON, or not the JSON `{"payload": "..."}`),
            /// 413 (over the limit) or 503 (valid, and no B).
            #[test]
            fn any_job_body_is_refused_with_a_reason_or_reaches_b(
                bytes in prop_oneof![
                    proptest::collection::vec(any::<u8>(), 0..2 * MAX_BODY_BYTES),
                    "[{}\\[\\]\":,a-z0-9 ]{0,64}".prop_map(String::into_bytes),
                    // Valid jobs, any payload, so the 503 (reaches B) branch runs.
                    any::<String>().prop_map(|payload| {
                        serde_json::to_vec(&NewJob { payload }).unwrap_or_default()
                    }),
                    (1usize..200).prop_map(|depth| {
                        format!("{}{}", "[".repeat(depth * 10), "]".repeat(depth * 10)).into_bytes()
                    }),
                ],
                json_type in any::<bool>(),
            ) {
                let mut request = http::Request::post("/api/jobs");
                if json_type {
                    request = request.header(http::header::CONTENT_TYPE, "application/json");
                }
                let request = request
                    .body(Body::from(bytes.clone()))
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                let (status, body) = answer(request).map_err(TestCaseError::fail)?;
                let valid = serde_json::from_slice::<NewJob>(&bytes)
                    .is_ok_and(|job| !job.payload.is_empty());
                let expected = if !json_type {
                    // A's contract has no 415: bad input is 400, with the
                    // reason (here: the missing JSON content type).
                    prop_assert!(
                        body["error"].as_str().is_some_and(|e| e.contains("Content-Type")),
                        "{}",
                        body
                    );
                    StatusCode::BAD_REQUEST
                } else if bytes.len() > MAX_BODY_BYTES {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else if valid {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::BAD_REQUEST
                };
                prop_assert_eq!(status, expected, "{}", body);
            }
        }
    }

    /// The typed answers write, byte for byte, what the `json!` values
    /// they replaced wrote.
    #[test]
    fn typed_bodies_write_what_the_json_values_wrote() {
        let item = ItemBody {
            item: ItemJson {
                description: "a \"quoted\" thing",
                id: 7,
                name: "item-7",
                price_cents: 1999,
            },
            served_by: "b-1",
        };
        assert_eq!(
            text(&item),
            json!({
                "item": {"id": 7, "name": "item-7", "price_cents": 1999, "description": "a \"quoted\" thing"},
                "served_by": "b-1",
            })
            .to_string()
        );
        let job = JobBody {
            job: JobJson {
                attempts: 2,
                created_at_ms: 1,
                id: 3,
                payload: "p",
                result: "",
                status: "done",
                updated_at_ms: 4,
            },
            served_by: "b-2",
        };
        assert_eq!(
            text(&job),
            json!({
                "job": {"id": 3, "status": "done", "attempts": 2, "payload": "p", "result": "",
                        "created_at_ms": 1, "updated_at_ms": 4},
                "served_by": "b-2",
            })
            .to_string()
        );
        let submitted = SubmittedBody {
            job_id: 9,
            served_by: "b-1",
        };
        assert_eq!(
            text(&submitted),
            json!({"job_id": 9, "served_by": "b-1"}).to_string()
        );
        let error = ErrorBody {
            code: "not_found",
            error: "no such route",
        };
        assert_eq!(
            text(&error),
            json!({"error": "no such route", "code": "not_found"}).to_string()
        );
    }

    fn text(body: &impl Serialize) -> String {
        serde_json::to_string(body).expect("serialises")
    }
}
