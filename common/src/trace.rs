//! W3C trace context across the lab (docs/architecture.md, "Trace ids").
//!
//! A request carries its trace as a `traceparent` header
//! (`00-<32 hex trace id>-<16 hex span id>-<2 hex flags>`): A takes it from
//! the caller or starts a trace, sends it to B as gRPC metadata, B stores it
//! with a job row and sends it to partner-api as an HTTP header. Each hop
//! opens a `tracing` span whose parent is the incoming context and whose
//! `trace_id` field is that trace's id, so every log line on the request's
//! path names it, and — with `telemetry.otlp_endpoint` set — the spans are
//! exported as one trace.

use std::{
    future::Future,
    pin::Pin,
    task::{Context as TaskContext, Poll},
};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::{
    Context,
    propagation::{Extractor, Injector, TextMapPropagator},
    trace::{TraceContextExt, TraceId},
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::{Instrument, Span, instrument::Instrumented};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The W3C header (HTTP) and metadata key (gRPC) carrying the context.
pub const TRACEPARENT: &str = "traceparent";
/// The response header in which every service names the request's trace.
pub const TRACE_ID_HEADER: &str = "x-trace-id";

/// Reads `traceparent` (and `tracestate`) from HTTP headers — which is also
/// where tonic keeps gRPC metadata.
struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// Writes the context into HTTP headers; a value that is not a valid
/// header (never, for the W3C format) is skipped rather than failing a call.
struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(key.as_bytes()),
            HeaderValue::from_str(&value),
        ) {
            self.0.insert(name, value);
        }
    }
}

/// A single `traceparent` value, for carriers that are not a header map
/// (a job row).
struct OneValue(Option<String>);

impl Extractor for OneValue {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0.as_deref()).flatten()
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

impl Injector for OneValue {
    fn set(&mut self, key: &str, value: String) {
        if key == TRACEPARENT {
            self.0 = Some(value);
        }
    }
}

/// The remote context in `headers`; an absent or malformed `traceparent`
/// gives an empty context (the span then starts a new trace). Extracted
/// against an empty context, not the active one: a request's trace comes
/// from its own headers only.
pub fn extract(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract_with_context(&Context::new(), &HeaderExtractor(headers))
}

/// The remote context in a stored `traceparent` value (empty, as for
/// [`extract`], when there is none).
pub fn extract_traceparent(traceparent: Option<&str>) -> Context {
    TraceContextPropagator::new()
        .extract_with_context(&Context::new(), &OneValue(traceparent.map(str::to_owned)))
}

/// Writes `span`'s context as `traceparent` into outgoing `headers`.
pub fn inject(span: &Span, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// The current span's context as a `traceparent` value (to store with a
/// job, or to put in gRPC metadata); `None` outside any traced span.
pub fn current_traceparent() -> Option<String> {
    let mut value = OneValue(None);
    TraceContextPropagator::new().inject_context(&Span::current().context(), &mut value);
    value.0
}

/// `span`'s trace id, if it belongs to a trace.
pub fn trace_id(span: &Span) -> Option<TraceId> {
    let cx = span.context();
    let span_context = cx.span().span_context().clone();
    span_context.is_valid().then(|| span_context.trace_id())
}

/// Joins `span` to the trace in `parent` (or, with none, to a new trace)
/// and records the trace id in its `trace_id` field, so that log lines
/// inside it carry the id. The span must declare `trace_id = Empty`.
pub fn adopt(span: &Span, parent: Context) -> Option<TraceId> {
    if parent.span().span_context().is_valid() {
        // Fails only for a span that is disabled or already started, and
        // then it cannot join anything: it keeps whatever trace it has.
        let _ = span.set_parent(parent);
    }
    let id = trace_id(span)?;
    span.record("trace_id", tracing::field::display(id));
    Some(id)
}

/// A tower layer for every service's inbound HTTP or gRPC requests: each
/// request runs in a `request` span joined to the caller's `traceparent`
/// (or a new trace), and every response — errors included — carries
/// `x-trace-id`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TraceContextLayer;

impl<S> tower::Layer<S> for TraceContextLayer {
    type Service = TraceContextService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        TraceContextService { inner }
    }
}

/// See [`TraceContextLayer`].
#[derive(Debug, Clone)]
pub struct TraceContextService<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for TraceContextService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = WithTraceId<S::Future>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let span = tracing::info_span!(
            "request",
            otel.name = %format_args!("{} {}", request.method(), request.uri().path()),
            trace_id = tracing::field::Empty,
        );
        let trace_id = adopt(&span, extract(request.headers()))
            .and_then(|id| HeaderValue::from_str(&id.to_string()).ok());
        let future = span.in_scope(|| self.inner.call(request));
        WithTraceId {
            inner: future.instrument(span),
            trace_id,
        }
    }
}

pin_project_lite::pin_project! {
    /// The inner response future, in its span, adding `x-trace-id`.
    pub struct WithTraceId<F> {
        #[pin]
        inner: Instrumented<F>,
        trace_id: Option<HeaderValue>,
    }
}

impl<F, RB, E> Future for WithTraceId<F>
where
    F: Future<Output = Result<http::Response<RB>, E>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let mut response = std::task::ready!(this.inner.poll(cx))?;
        if let Some(id) = this.trace_id.take() {
            response.headers_mut().insert(TRACE_ID_HEADER, id);
        }
        Poll::Ready(Ok(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tracing_subscriber::prelude::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    /// A subscriber with the same OpenTelemetry layer the services install,
    /// no exporter.
    fn with_tracer<T>(f: impl FnOnce() -> T) -> T {
        let (layer, _provider) =
            crate::telemetry::otel_layer::<tracing_subscriber::Registry>("test", "")
                .expect("no exporter to fail");
        let subscriber = tracing_subscriber::registry().with(layer);
        tracing::subscriber::with_default(subscriber, f)
    }

    fn headers(traceparent: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TRACEPARENT, traceparent.parse().expect("ascii"));
        h
    }

    #[test]
    fn an_incoming_traceparent_is_joined_and_passed_on() {
        with_tracer(|| {
            let span = tracing::info_span!("request", trace_id = tracing::field::Empty);
            let id = adopt(&span, extract(&headers(PARENT))).expect("a trace");
            assert_eq!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
            let mut out = HeaderMap::new();
            inject(&span, &mut out);
            let sent = out[TRACEPARENT].to_str().expect("ascii");
            assert!(
                sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
                "{sent}"
            );
            assert!(
                !sent.contains("00f067aa0ba902b7"),
                "a new span id for this hop: {sent}"
            );
            let inside = span.in_scope(current_traceparent).expect("in a span");
            assert_eq!(inside, sent);
        });
    }

    #[test]
    fn no_or_a_malformed_traceparent_starts_a_new_trace() {
        with_tracer(|| {
            for incoming in [
                HeaderMap::new(),
                headers("garbage"),
                headers("00-00000000000000000000000000000000-00f067aa0ba902b7-01"),
            ] {
                let span = tracing::info_span!("request", trace_id = tracing::field::Empty);
                let id = adopt(&span, extract(&incoming)).expect("a new trace");
                let text = id.to_string();
                assert_eq!(text.len(), 32);
                assert_ne!(id, TraceId::INVALID);
                assert_ne!(text, "4bf92f3577b34da6a3ce929d0e0e4736");
            }
        });
    }

    #[test]
    fn a_stored_traceparent_continues_the_trace() {
        with_tracer(|| {
            let span = tracing::info_span!("job", trace_id = tracing::field::Empty);
            let id = adopt(&span, extract_traceparent(Some(PARENT))).expect("a trace");
            assert_eq!(id.to_string(), "4bf92f3577b34da6a3ce929d0e0e4736");
            let fresh = tracing::info_span!("job", trace_id = tracing::field::Empty);
            let other = adopt(&fresh, extract_traceparent(None)).expect("a new trace");
            assert_ne!(other, id);
        });
    }

    #[tokio::test]
    async fn the_layer_answers_with_the_trace_id_even_on_errors() {
        use tower::{Layer, ServiceExt};
        let (layer, _provider) =
            crate::telemetry::otel_layer::<tracing_subscriber::Registry>("test", "")
                .expect("no exporter");
        let _guard = tracing_subscriber::registry().with(layer).set_default();
        let failing = tower::service_fn(|_req: http::Request<()>| async {
            Ok::<_, std::convert::Infallible>(
                http::Response::builder()
                    .status(504)
                    .body(())
                    .expect("response"),
            )
        });
        let request = http::Request::builder()
            .header(TRACEPARENT, PARENT)
            .body(())
            .expect("request");
        let response = TraceContextLayer
            .layer(failing)
            .oneshot(request)
            .await
            .expect("infallible");
        assert_eq!(response.status(), 504);
        assert_eq!(
            response.headers()[TRACE_ID_HEADER],
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
    }
}
