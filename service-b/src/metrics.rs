//! Service B's own metrics (README, "Admin endpoints and metrics"), registered next to the process
//! and tokio metrics of `lab_common::metrics`.

use std::sync::{Arc, OnceLock};

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use crate::db::Db;

/// gRPC traffic.
#[derive(Clone)]
pub struct Metrics {
    pub grpc_requests: IntCounterVec,
    pub grpc_duration: HistogramVec,
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
        registry.register(Box::new(grpc_requests.clone()))?;
        registry.register(Box::new(grpc_duration.clone()))?;
        Ok(Self {
            grpc_requests,
            grpc_duration,
        })
    }
}

/// `lab_db_pool_connections{state}`, read from the pool at scrape time
/// (empty until MySQL is connected).
pub struct PoolCollector {
    db: Arc<OnceLock<Db>>,
    gauge: IntGaugeVec,
}

impl PoolCollector {
    pub fn register(registry: &Registry, db: Arc<OnceLock<Db>>) -> prometheus::Result<()> {
        let gauge = IntGaugeVec::new(
            Opts::new(
                "lab_db_pool_connections",
                "MySQL pool connections by state (idle or in_use).",
            ),
            &["state"],
        )?;
        registry.register(Box::new(PoolCollector { db, gauge }))
    }
}

impl Collector for PoolCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.gauge.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        if let Some(db) = self.db.get() {
            let (open, idle) = db.pool_stats();
            let idle = i64::try_from(idle).unwrap_or(i64::MAX);
            self.gauge.with_label_values(&["idle"]).set(idle);
            self.gauge
                .with_label_values(&["in_use"])
                .set(i64::from(open) - idle);
        }
        self.gauge.collect()
    }
}
