//! Service B's own metrics (docs/architecture.md, "Metrics"), registered next to the process
//! and tokio metrics of `lab_common::metrics`.

use std::sync::{Arc, OnceLock};

use prometheus::{
    HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

use lab_common::metrics::GaugeGuard;

use crate::db::Db;

/// gRPC traffic.
#[derive(Clone)]
pub struct Metrics {
    pub grpc_requests: IntCounterVec,
    pub grpc_duration: HistogramVec,
    grpc_in_flight: IntGauge,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let r = lab_common::metrics::Registrar(registry);
        Ok(Self {
            grpc_requests: r.int_counter_vec(
                "lab_grpc_requests_total",
                "gRPC requests handled by this B instance, by method and status code.",
                &["method", "code"],
            )?,
            grpc_duration: r.latency_histogram_vec(
                "lab_grpc_request_duration_seconds",
                "Time from receiving a gRPC request to its reply.",
                &["method"],
            )?,
            grpc_in_flight: r.int_gauge(
                "lab_grpc_requests_in_flight",
                "gRPC requests inside this B's handlers right now.",
            )?,
        })
    }

    /// Counts one request as in flight until the guard drops — when the
    /// handler returns, or when tonic drops it because the caller gave up.
    pub fn in_flight(&self) -> GaugeGuard {
        GaugeGuard::new(&self.grpc_in_flight)
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
        // A collector, not a metric: it reads the pool when scraped.
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
