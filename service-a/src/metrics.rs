//! Service A's metrics (listed in docs/architecture.md, "Metrics").

use lab_common::metrics::Registrar;
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};

#[derive(Clone)]
pub struct Metrics {
    /// Front traffic, by route template and HTTP status.
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// Calls to B, by the B instance that answered (`served_by`) and gRPC code.
    pub backend_calls: IntCounterVec,
    /// Endpoints currently in A's balancer (1 for l4/l7: the proxy). Only
    /// reported: what the balancer does is decided by the balancer itself.
    pub backend_endpoints: IntGauge,
    /// Reads retried after no B answered.
    pub backend_retries: IntCounter,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let r = Registrar(registry);
        Ok(Self {
            backend_retries: r.int_counter(
                "lab_backend_retries_total",
                "Reads A sent a second time because no B answered the first.",
            )?,
            http_requests: r.int_counter_vec(
                "lab_http_requests_total",
                "HTTP requests served by A.",
                &["route", "status"],
            )?,
            http_duration: r.latency_histogram_vec(
                "lab_http_request_duration_seconds",
                "Time from receiving an HTTP request to sending its response.",
                &["route"],
            )?,
            backend_calls: r.int_counter_vec(
                "lab_backend_calls_total",
                "gRPC calls from A to B, by answering B instance and status code \
                 (backend=\"unknown\" when no B answered).",
                &["backend", "code"],
            )?,
            backend_endpoints: r.int_gauge(
                "lab_backend_endpoints",
                "Endpoints currently in A's balancer.",
            )?,
        })
    }
}
