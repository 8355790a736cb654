//! Service A's metrics (listed in the README, "Admin endpoints and metrics").

use prometheus::{
    HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    /// Front traffic, by route template and HTTP status.
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    /// Calls to B, by the B instance that answered (`served_by`) and gRPC code.
    pub backend_calls: IntCounterVec,
    /// Endpoints currently in A's balancer (1 for l4/l7: the proxy).
    pub backend_endpoints: IntGauge,
    /// Reads retried after no B answered.
    pub backend_retries: IntCounter,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let http_requests = IntCounterVec::new(
            Opts::new("lab_http_requests_total", "HTTP requests served by A."),
            &["route", "status"],
        )?;
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "lab_http_request_duration_seconds",
                "Time from receiving an HTTP request to sending its response.",
            )
            .buckets(lab_common::metrics::LATENCY_BUCKETS.to_vec()),
            &["route"],
        )?;
        let backend_calls = IntCounterVec::new(
            Opts::new(
                "lab_backend_calls_total",
                "gRPC calls from A to B, by answering B instance and status code \
                 (backend=\"unknown\" when no B answered).",
            ),
            &["backend", "code"],
        )?;
        let backend_endpoints = IntGauge::with_opts(Opts::new(
            "lab_backend_endpoints",
            "Endpoints currently in A's balancer.",
        ))?;
        let backend_retries = IntCounter::with_opts(Opts::new(
            "lab_backend_retries_total",
            "Reads A sent a second time because no B answered the first.",
        ))?;
        registry.register(Box::new(backend_retries.clone()))?;
        registry.register(Box::new(http_requests.clone()))?;
        registry.register(Box::new(http_duration.clone()))?;
        registry.register(Box::new(backend_calls.clone()))?;
        registry.register(Box::new(backend_endpoints.clone()))?;
        Ok(Self {
            http_requests,
            http_duration,
            backend_calls,
            backend_endpoints,
            backend_retries,
        })
    }
}
