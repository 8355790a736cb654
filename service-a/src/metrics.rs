//! Service A's metrics (listed in docs/architecture.md, "Metrics").

use std::{
    sync::{Arc, OnceLock},
    time::Duration,
};

use http::StatusCode;
use lab_common::metrics::Registrar;
use prometheus::{Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};

#[derive(Clone)]
pub struct Metrics {
    /// Front traffic, by route template and HTTP status.
    pub http: HttpMetrics,
    /// Calls to B, by the B instance that answered (`served_by`) and gRPC code.
    pub backend_calls: IntCounterVec,
    /// Endpoints currently in A's balancer (1 for l4/l7: the proxy). Only
    /// reported: what the balancer does is decided by the balancer itself.
    pub backend_endpoints: IntGauge,
    /// Reads retried after no B answered.
    pub backend_retries: IntCounter,
    /// Requests answered 503 `overloaded` at admission ([`crate::overload`]).
    pub shed: IntCounter,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let r = Registrar(registry);
        let backend_calls = r.int_counter_vec(
            "lab_backend_calls_total",
            "gRPC calls from A to B, by answering B instance and status code \
             (backend=\"unknown\" when no B answered).",
            &["backend", "code"],
        )?;
        // The two ways a call fails without any B's answer, exported at 0
        // from the start so a dashboard can set them side by side before
        // either happens: A's own deadline ran out (DeadlineExceeded), or no
        // B could be reached (Unavailable).
        for code in [tonic::Code::DeadlineExceeded, tonic::Code::Unavailable] {
            backend_calls.with_label_values(&["unknown", lab_proto::code_name(code)]);
        }
        Ok(Self {
            backend_retries: r.int_counter(
                "lab_backend_retries_total",
                "Reads A sent a second time because no B answered the first.",
            )?,
            shed: r.int_counter(
                "lab_http_shed_total",
                "Requests A answered 503 overloaded at once: service_a.max_concurrent_requests \
                 were in flight (deadline = propagate).",
            )?,
            http: HttpMetrics::new(
                r.int_counter_vec(
                    "lab_http_requests_total",
                    "HTTP requests served by A.",
                    &["route", "status"],
                )?,
                r.latency_histogram_vec(
                    "lab_http_request_duration_seconds",
                    "Time from receiving an HTTP request to sending its response.",
                    &["route"],
                )?,
                &crate::api::ROUTES,
            ),
            backend_calls,
            backend_endpoints: r.int_gauge(
                "lab_backend_endpoints",
                "Endpoints currently in A's balancer.",
            )?,
        })
    }
}

/// The statuses A answers with on purpose (docs/architecture.md, "A's HTTP
/// API"): the ones whose series [`HttpMetrics`] keeps resolved.
const STATUSES: [StatusCode; 8] = [
    StatusCode::OK,
    StatusCode::ACCEPTED,
    StatusCode::BAD_REQUEST,
    StatusCode::NOT_FOUND,
    StatusCode::PAYLOAD_TOO_LARGE,
    StatusCode::BAD_GATEWAY,
    StatusCode::SERVICE_UNAVAILABLE,
    StatusCode::GATEWAY_TIMEOUT,
];

/// `lab_http_requests_total{route,status}` and
/// `lab_http_request_duration_seconds{route}`, counted once per request.
///
/// `with_label_values` hashes the labels and takes the vector's lock on
/// every call. A's routes and the statuses it answers with are few and
/// known, so each of those series is looked up the first time it is
/// counted and kept: a series still appears only once a request has been
/// counted in it, as before. Anything else (a status A does not answer on
/// purpose) takes the lookup.
#[derive(Clone)]
pub struct HttpMetrics {
    requests: IntCounterVec,
    duration: HistogramVec,
    routes: Arc<[RouteSeries]>,
}

/// The resolved series of one route label.
struct RouteSeries {
    route: &'static str,
    duration: OnceLock<Histogram>,
    /// By the index of the status in [`STATUSES`].
    requests: [OnceLock<IntCounter>; STATUSES.len()],
}

impl HttpMetrics {
    fn new(requests: IntCounterVec, duration: HistogramVec, routes: &[&'static str]) -> Self {
        let routes = routes
            .iter()
            .map(|&route| RouteSeries {
                route,
                duration: OnceLock::new(),
                requests: Default::default(),
            })
            .collect();
        Self {
            requests,
            duration,
            routes,
        }
    }

    /// Counts one answered request of `route` (a route template, or
    /// `unmatched`) and its time.
    pub fn observe(&self, route: &str, status: StatusCode, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let Some(series) = self.routes.iter().find(|s| s.route == route) else {
            self.requests
                .with_label_values(&[route, status.as_str()])
                .inc();
            self.duration.with_label_values(&[route]).observe(seconds);
            return;
        };
        series
            .duration
            .get_or_init(|| self.duration.with_label_values(&[route]))
            .observe(seconds);
        match STATUSES.iter().position(|known| *known == status) {
            Some(i) => series.requests[i]
                .get_or_init(|| self.requests.with_label_values(&[route, status.as_str()]))
                .inc(),
            None => self
                .requests
                .with_label_values(&[route, status.as_str()])
                .inc(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_and_looked_up_series_count_in_the_same_place() {
        let registry = Registry::new();
        let metrics = Metrics::register(&registry).expect("metrics");
        let http = &metrics.http;
        let item = crate::api::ROUTES[0];
        let ms = Duration::from_millis(3);
        http.observe(item, StatusCode::OK, ms);
        http.observe(item, StatusCode::OK, ms);
        http.observe(item, StatusCode::IM_A_TEAPOT, ms);
        http.observe("/not/a/route", StatusCode::OK, ms);

        let text = lab_common::metrics::render(&registry);
        for line in [
            r#"lab_http_requests_total{route="/api/items/{id}",status="200"} 2"#,
            r#"lab_http_requests_total{route="/api/items/{id}",status="418"} 1"#,
            r#"lab_http_requests_total{route="/not/a/route",status="200"} 1"#,
            r#"lab_http_request_duration_seconds_count{route="/api/items/{id}"} 3"#,
            r#"lab_http_request_duration_seconds_count{route="/not/a/route"} 1"#,
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert!(
            !text.contains(r#"status="503""#) && !text.contains(r#"route="/api/jobs""#),
            "a series appears only once counted:\n{text}"
        );
    }
}
