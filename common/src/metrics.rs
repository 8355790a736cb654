//! Prometheus registry with the process and tokio runtime metrics every lab
//! service exports (README, "Admin endpoints and metrics"), plus small helpers for the services' own.

use prometheus::{
    Gauge, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};

/// Latency buckets in seconds: fine below 10 ms, and reaching past A's 5 s
/// deadline up to the 400 s delays of the incident.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 400.0,
];

/// A registry with `process_*` (RSS, fds, CPU, threads) and `tokio_*` metrics.
/// Must be called inside a tokio runtime.
pub fn registry() -> prometheus::Result<Registry> {
    let registry = Registry::new();
    registry.register(Box::new(
        prometheus::process_collector::ProcessCollector::for_self(),
    ))?;
    registry.register(Box::new(TokioCollector::new(
        tokio::runtime::Handle::current(),
    )?))?;
    Ok(registry)
}

/// Renders every metric of `registry` in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    if let Err(e) = prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    out
}

/// Reads the tokio runtime's counters at scrape time. The gauges are not
/// registered one by one: the collector is, and sets them when scraped.
struct TokioCollector {
    handle: tokio::runtime::Handle,
    alive_tasks: Gauge,
    workers: Gauge,
    global_queue_depth: Gauge,
}

impl TokioCollector {
    fn new(handle: tokio::runtime::Handle) -> prometheus::Result<Self> {
        Ok(Self {
            handle,
            alive_tasks: Gauge::new(
                "tokio_alive_tasks",
                "Tasks currently alive in the tokio runtime.",
            )?,
            workers: Gauge::new("tokio_workers", "Worker threads of the tokio runtime.")?,
            global_queue_depth: Gauge::new(
                "tokio_global_queue_depth",
                "Tasks waiting in the runtime's global queue (a starved runtime shows it here).",
            )?,
        })
    }

    fn gauges(&self) -> [&Gauge; 3] {
        [&self.alive_tasks, &self.workers, &self.global_queue_depth]
    }
}

impl Collector for TokioCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.gauges().into_iter().flat_map(|g| g.desc()).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let m = self.handle.metrics();
        self.alive_tasks.set(m.num_alive_tasks() as f64);
        self.workers.set(m.num_workers() as f64);
        self.global_queue_depth.set(m.global_queue_depth() as f64);
        self.gauges()
            .into_iter()
            .flat_map(|g| g.collect())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn exports_process_and_tokio_metrics() {
        let registry = registry().expect("registry");
        let text = render(&registry);
        for name in [
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_cpu_seconds_total",
            "process_threads",
            "tokio_alive_tasks",
        ] {
            assert!(
                text.contains(&format!("\n{name} ")),
                "{name} missing in:\n{text}"
            );
        }
    }
}
