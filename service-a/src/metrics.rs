//! Service A's metrics (listed in the README, "Admin endpoints and metrics").

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry,
    register_histogram_vec_with_registry, register_int_counter_vec_with_registry,
    register_int_counter_with_registry, register_int_gauge_with_registry,
};

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
        Ok(Self {
            backend_retries: register_int_counter_with_registry!(
                "lab_backend_retries_total",
                "Reads A sent a second time because no B answered the first.",
                registry
            )?,
            http_requests: register_int_counter_vec_with_registry!(
                "lab_http_requests_total",
                "HTTP requests served by A.",
                &["route", "status"],
                registry
            )?,
            http_duration: register_histogram_vec_with_registry!(
                HistogramOpts::new(
                    "lab_http_request_duration_seconds",
                    "Time from receiving an HTTP request to sending its response.",
                )
                .buckets(lab_common::metrics::LATENCY_BUCKETS.to_vec()),
                &["route"],
                registry
            )?,
            backend_calls: register_int_counter_vec_with_registry!(
                "lab_backend_calls_total",
                "gRPC calls from A to B, by answering B instance and status code \
                 (backend=\"unknown\" when no B answered).",
                &["backend", "code"],
                registry
            )?,
            backend_endpoints: register_int_gauge_with_registry!(
                "lab_backend_endpoints",
                "Endpoints currently in A's balancer.",
                registry
            )?,
        })
    }
}
