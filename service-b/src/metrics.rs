//! Service B's own metrics (DESIGN.md §5), registered next to the process
//! and tokio metrics of `lab_common::metrics`.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry};

/// gRPC traffic and pool state.
#[derive(Clone)]
pub struct Metrics {
    pub grpc_requests: IntCounterVec,
    pub grpc_duration: HistogramVec,
    pub db_pool_connections: IntGaugeVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let grpc_requests = IntCounterVec::new(
            Opts::new(
                "lab_grpc_requests_total",
                "gRPC requests handled by this B instance, by method and status code.",
            ),
            &["method", "code"],
        )?;
        let grpc_duration = HistogramVec::new(
            HistogramOpts::new(
                "lab_grpc_request_duration_seconds",
                "Time from receiving a gRPC request to its reply.",
            )
            .buckets(lab_common::metrics::LATENCY_BUCKETS.to_vec()),
            &["method"],
        )?;
        let db_pool_connections = IntGaugeVec::new(
            Opts::new(
                "lab_db_pool_connections",
                "MySQL pool connections by state (idle or in_use).",
            ),
            &["state"],
        )?;
        registry.register(Box::new(grpc_requests.clone()))?;
        registry.register(Box::new(grpc_duration.clone()))?;
        registry.register(Box::new(db_pool_connections.clone()))?;
        Ok(Self {
            grpc_requests,
            grpc_duration,
            db_pool_connections,
        })
    }
}
