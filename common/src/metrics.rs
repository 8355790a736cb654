//! Prometheus registry with the process and tokio runtime metrics every lab
//! service exports (listed in docs/architecture.md, "Metrics"), and [`Registrar`],
//! which the services declare their own metrics with.

use prometheus::{
    Gauge, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
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

/// Declares and registers a service's metrics, one call each. (prometheus's
/// `register_*_with_registry!` macros do the same but panic on a bad name
/// instead of returning the error.) Histograms use the latency buckets of
/// this module.
#[derive(Clone, Copy)]
pub struct Registrar<'a>(pub &'a Registry);

impl Registrar<'_> {
    fn add<M: Collector + Clone + 'static>(self, metric: M) -> prometheus::Result<M> {
        self.0.register(Box::new(metric.clone()))?;
        Ok(metric)
    }

    pub fn int_gauge(self, name: &str, help: &str) -> prometheus::Result<IntGauge> {
        self.add(IntGauge::new(name, help)?)
    }

    pub fn gauge(self, name: &str, help: &str) -> prometheus::Result<Gauge> {
        self.add(Gauge::new(name, help)?)
    }

    pub fn int_counter(self, name: &str, help: &str) -> prometheus::Result<IntCounter> {
        self.add(IntCounter::new(name, help)?)
    }

    pub fn int_counter_vec(
        self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<IntCounterVec> {
        self.add(IntCounterVec::new(Opts::new(name, help), labels)?)
    }

    pub fn latency_histogram(self, name: &str, help: &str) -> prometheus::Result<Histogram> {
        self.add(Histogram::with_opts(latency_opts(name, help))?)
    }

    pub fn latency_histogram_vec(
        self,
        name: &str,
        help: &str,
        labels: &[&str],
    ) -> prometheus::Result<HistogramVec> {
        self.add(HistogramVec::new(latency_opts(name, help), labels)?)
    }
}

fn latency_opts(name: &str, help: &str) -> HistogramOpts {
    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec())
}

/// Holds one unit of a gauge from creation until it is dropped: on every
/// exit path, including a future dropped at its caller's deadline or a task
/// aborted at shutdown. For gauges that count things in progress.
#[must_use = "the gauge goes back down as soon as the guard is dropped"]
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
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
