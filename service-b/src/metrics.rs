//! Service B's own metrics (docs/architecture.md, "Metrics"), registered next to the process
//! and tokio metrics of `lab_common::metrics`.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Histogram, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
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

    /// `method`'s series, resolved once (at start) rather than per request.
    /// So its OK count and duration are exported at 0 before the first call
    /// (A's series appear only once counted); a zero series is what lets
    /// `rate()` see the first calls at all.
    pub fn method(&self, method: &'static str) -> MethodMetrics {
        MethodMetrics {
            method,
            ok: self
                .grpc_requests
                .with_label_values(&[method, lab_proto::code_name(tonic::Code::Ok)]),
            duration: self.grpc_duration.with_label_values(&[method]),
            requests: self.grpc_requests.clone(),
        }
    }
}

/// One method's request count and duration series. Counting an answered
/// request is an atomic add on a series held here; only a failed one looks
/// its code's series up by label (a hash and a lock), since codes are many
/// and failures are not the hot path.
#[derive(Clone)]
pub struct MethodMetrics {
    method: &'static str,
    ok: IntCounter,
    duration: Histogram,
    requests: IntCounterVec,
}

impl MethodMetrics {
    /// Counts one finished (or abandoned) request and its duration.
    pub fn record(&self, code: tonic::Code, seconds: f64) {
        if code == tonic::Code::Ok {
            self.ok.inc();
        } else {
            self.requests
                .with_label_values(&[self.method, lab_proto::code_name(code)])
                .inc();
        }
        self.duration.observe(seconds);
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_method_counts_each_code_and_its_durations() {
        let metrics = Metrics::register(&Registry::new()).expect("metrics");
        let get_item = metrics.method("GetItem");
        get_item.record(tonic::Code::Ok, 0.001);
        get_item.record(tonic::Code::Ok, 0.002);
        get_item.record(tonic::Code::NotFound, 0.003);
        let count = |code| {
            metrics
                .grpc_requests
                .with_label_values(&["GetItem", code])
                .get()
        };
        assert_eq!((count("OK"), count("NotFound")), (2, 1));
        let duration = metrics.grpc_duration.with_label_values(&["GetItem"]);
        assert_eq!(duration.get_sample_count(), 3);
        assert!((duration.get_sample_sum() - 0.006).abs() < 1e-9);
    }
}
