//! The partner's one route, `POST /v1/enrich`, and its request counting.
//!
//! The answer is deliberately large (`partner.body_bytes`): an answer that
//! fits in the socket buffers is fully sent whether or not the client reads
//! it, and would free the connection; a large one keeps the server writing,
//! so a client that never reads its answers really pins a connection each.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use axum::{
    Json, Router,
    body::Body,
    extract::{DefaultBodyLimit, Request, State, rejection::BytesRejection},
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::post,
};
use bytes::Bytes;
use http_body::{Frame, SizeHint};
use serde_json::json;

use lab_common::config::PartnerAnswer;

use crate::metrics::Metrics;

/// Largest request body; larger ones get 413.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;

/// What the handler needs: the answer's shape and how long to wait.
pub struct Enrich {
    latency: Duration,
    body_bytes: usize,
    answer: PartnerAnswer,
    /// `body_bytes` of padding made once: each answer takes a slice of it
    /// (a reference count, no copy).
    padding: Bytes,
}

impl Enrich {
    pub fn new(latency: Duration, body_bytes: usize) -> Self {
        Self {
            latency,
            body_bytes,
            answer: PartnerAnswer::Json,
            padding: Bytes::from(vec![b'x'; body_bytes]),
        }
    }

    /// Answers as `partner.answer` says, well-formed by default.
    pub fn answering(mut self, answer: PartnerAnswer) -> Self {
        self.answer = answer;
        self
    }

    /// `{"score":…,"request_bytes":…,"padding":"xx…"}`, exactly
    /// `body_bytes` long unless the JSON needs more.
    fn answer(&self, request: &[u8]) -> Response {
        match self.answer {
            PartnerAnswer::Json => self.json(request),
            PartnerAnswer::Truncated => {
                // The length of the whole answer, half of it, then the end:
                // hyper finds the body short of its length and closes the
                // connection, which is what the client sees.
                let half = self.padding.slice(..self.body_bytes / 2);
                let body = Chunks::promising(self.body_bytes as u64, vec![half]);
                (
                    [(header::CONTENT_TYPE, "application/json")],
                    Body::new(body),
                )
                    .into_response()
            }
            PartnerAnswer::NotJson => {
                const HEAD: &[u8] = b"<html><body>";
                let pad = self.body_bytes.saturating_sub(HEAD.len());
                let body = Chunks::new(vec![Bytes::from_static(HEAD), self.padding.slice(..pad)]);
                ([(header::CONTENT_TYPE, "text/html")], Body::new(body)).into_response()
            }
        }
    }

    fn json(&self, request: &[u8]) -> Response {
        const TAIL: &[u8] = b"\"}";
        let head = format!(
            "{{\"score\":{},\"request_bytes\":{},\"padding\":\"",
            score(request),
            request.len()
        );
        let pad = self.body_bytes.saturating_sub(head.len() + TAIL.len());
        let body = Chunks::new(vec![
            Bytes::from(head),
            self.padding.slice(..pad),
            Bytes::from_static(TAIL),
        ]);
        (
            [(header::CONTENT_TYPE, "application/json")],
            Body::new(body),
        )
            .into_response()
    }
}

/// The partner's HTTPS routes; every answer (404 and 405 included) is counted.
pub fn router(enrich: Arc<Enrich>, metrics: Metrics) -> Router {
    Router::new()
        .route("/v1/enrich", post(enrich_handler))
        .with_state(enrich)
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BYTES))
        .layer(middleware::from_fn_with_state(metrics, count))
        // Each request in a span joined to B's `traceparent`: the line
        // `count` logs carries the trace id of the job's submitting request.
        .layer(lab_common::trace::TraceContextLayer)
}

/// Counts every answer and logs it (one line per call, in the request's
/// span, so with its trace id).
async fn count(State(metrics): State<Metrics>, request: Request, next: Next) -> Response {
    let started = std::time::Instant::now();
    let response = next.run(request).await;
    metrics
        .requests
        .with_label_values(&[response.status().as_str()])
        .inc();
    tracing::info!(
        status = response.status().as_u16(),
        elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
        "served"
    );
    response
}

/// Any JSON value is accepted, whatever the content type says: the partner
/// is lenient so that only B's behaviour is under study.
async fn enrich_handler(
    State(enrich): State<Arc<Enrich>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match body {
        Ok(body) => body,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body exceeds {MAX_REQUEST_BYTES} bytes"),
            );
        }
        Err(rejection) => {
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_body",
                rejection.body_text(),
            );
        }
    };
    if let Err(e) = serde_json::from_slice::<serde::de::IgnoredAny>(&body) {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_json",
            format!("request body is not JSON: {e}"),
        );
    }
    if !enrich.latency.is_zero() {
        tokio::time::sleep(enrich.latency).await;
    }
    enrich.answer(&body)
}

fn error(status: StatusCode, code: &'static str, message: String) -> Response {
    (status, Json(json!({"error": message, "code": code}))).into_response()
}

/// FNV-1a: a stable score for the same request, in every process and
/// version (std's hasher promises neither).
fn score(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5_u32, |hash, &b| {
        (hash ^ u32::from(b)).wrapping_mul(0x0100_0193)
    })
}

/// A body of ready chunks with an exact length, so hyper sends
/// `content-length` and copies nothing into a bigger buffer first.
struct Chunks {
    /// In reverse order, so the next one is popped off the end.
    rest: Vec<Bytes>,
    remaining: u64,
}

impl Chunks {
    fn new(chunks: Vec<Bytes>) -> Self {
        let length = chunks.iter().map(|c| c.len() as u64).sum();
        Self::promising(length, chunks)
    }

    /// A body that announces `length` whatever `chunks` add up to.
    fn promising(length: u64, chunks: Vec<Bytes>) -> Self {
        let mut rest: Vec<Bytes> = chunks.into_iter().filter(|c| !c.is_empty()).collect();
        rest.reverse();
        Self {
            rest,
            remaining: length,
        }
    }
}

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        Poll::Ready(this.rest.pop().map(|chunk| {
            this.remaining = this.remaining.saturating_sub(chunk.len() as u64);
            Ok(Frame::data(chunk))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.rest.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::BodyExt;

    use super::*;

    async fn body_of(response: Response) -> (Option<u64>, Bytes) {
        let body = response.into_body();
        let exact = http_body::Body::size_hint(&body).exact();
        (exact, body.collect().await.expect("body").to_bytes())
    }

    #[tokio::test]
    async fn broken_answers_are_what_they_say() {
        use http_body::Body as _;
        let truncated = Enrich::new(Duration::ZERO, 4096).answering(PartnerAnswer::Truncated);
        let body = truncated.answer(b"{}").into_body();
        assert_eq!(
            body.size_hint().exact(),
            Some(4096),
            "promises the whole answer"
        );
        let sent = body.collect().await.expect("body").to_bytes();
        assert_eq!(sent.len(), 2048, "sends half");

        let html = Enrich::new(Duration::ZERO, 4096).answering(PartnerAnswer::NotJson);
        let (_, body) = body_of(html.answer(b"{}")).await;
        assert_eq!(body.len(), 4096);
        assert!(body.starts_with(b"<html>"));
        assert!(serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_err());
    }

    #[tokio::test]
    async fn the_answer_has_the_configured_size_and_score_first() {
        let enrich = Enrich::new(Duration::ZERO, 4096);
        let (exact, body) = body_of(enrich.answer(br#"{"id":1}"#)).await;
        assert_eq!(body.len(), 4096);
        assert_eq!(exact, Some(4096), "content-length is known up front");
        assert!(body.starts_with(b"{\"score\":"));
        let value: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(value["request_bytes"], 8);
        assert_eq!(value["score"], u64::from(score(br#"{"id":1}"#)));
    }

    #[tokio::test]
    async fn a_tiny_body_size_still_gives_valid_json() {
        let enrich = Enrich::new(Duration::ZERO, 0);
        let (exact, body) = body_of(enrich.answer(b"{}")).await;
        let value: serde_json::Value = serde_json::from_slice(&body).expect("JSON");
        assert_eq!(value["padding"], "");
        assert_eq!(exact, Some(body.len() as u64));
    }

    #[test]
    fn the_score_depends_on_the_request_only() {
        assert_eq!(score(b"abc"), score(b"abc"));
        assert_ne!(score(b"abc"), score(b"abd"));
        assert_eq!(score(b""), 0x811c_9dc5);
    }
}
