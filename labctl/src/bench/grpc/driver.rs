//! A closed-loop gRPC load driver for `labctl bench grpc`: C workers share
//! one HTTP/2 connection (or `connections` of them), as ghz does by default,
//! each sending `lab.v1.Backend/GetItem` as soon as its previous answer
//! arrives. Latency is measured per call from the moment it is sent.
//!
//! It stands behind [`measure`] only until `labctl load` speaks gRPC
//! (`LoadSpec::new("grpc://host:port", "lab.v1.Backend/GetItem")`): the
//! benchmark needs nothing else from it.

use std::{collections::BTreeMap, time::Duration};

use anyhow::Context;
use hdrhistogram::Histogram;
use lab_proto::v1::{GetItemRequest, backend_client::BackendClient};
use rand::{Rng, SeedableRng, rngs::SmallRng};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

/// How to load one server.
#[derive(Debug, Clone)]
pub struct MeasureSpec {
    /// Calls in flight at once (closed loop).
    pub concurrency: usize,
    /// HTTP/2 connections the calls share.
    pub connections: usize,
    pub duration: Duration,
    /// Item ids are drawn uniformly from 1..=id_max.
    pub id_max: i64,
    /// Each call's deadline, sent as `grpc-timeout` (as A sends its own).
    pub timeout: Duration,
    pub seed: u64,
}

/// What one measurement saw.
#[derive(Debug, Clone)]
pub struct Sample {
    pub requests: u64,
    pub ok: u64,
    /// Failed calls by gRPC code (as grpc-go spells it).
    pub errors: BTreeMap<String, u64>,
    pub rps: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// Answers by their `served_by`.
    pub by_backend: BTreeMap<String, u64>,
}

/// One worker's tallies, merged at the end.
struct Tally {
    histogram: Histogram<u64>,
    ok: u64,
    errors: BTreeMap<String, u64>,
    by_backend: BTreeMap<String, u64>,
}

/// Loads the gRPC server at `addr` (`host:port`) for `spec.duration`.
pub async fn measure(addr: &str, spec: &MeasureSpec) -> anyhow::Result<Sample> {
    anyhow::ensure!(spec.concurrency >= 1, "concurrency must be at least 1");
    anyhow::ensure!(spec.connections >= 1, "connections must be at least 1");
    anyhow::ensure!(spec.id_max >= 1, "the largest item id must be at least 1");
    let mut channels = Vec::with_capacity(spec.connections);
    for _ in 0..spec.connections {
        channels.push(connect(addr, spec.timeout).await?);
    }
    let start = Instant::now();
    let end = start + spec.duration;
    let workers: Vec<_> = (0..spec.concurrency)
        .map(|i| {
            let client = BackendClient::new(channels[i % channels.len()].clone());
            let seed = spec.seed.wrapping_mul(1_000_003).wrapping_add(i as u64);
            tokio::spawn(worker(client, seed, spec.clone(), end))
        })
        .collect();
    let mut total = Tally::new()?;
    for worker in workers {
        total.merge(worker.await.context("a load worker panicked")??)?;
    }
    let elapsed = start.elapsed().as_secs_f64().max(1e-9);
    let h = &total.histogram;
    let ms = |quantile: f64| h.value_at_quantile(quantile) as f64 / 1000.0;
    Ok(Sample {
        requests: h.len(),
        ok: total.ok,
        rps: h.len() as f64 / elapsed,
        p50_ms: ms(0.50),
        p99_ms: ms(0.99),
        p999_ms: ms(0.999),
        errors: total.errors,
        by_backend: total.by_backend,
    })
}

/// One HTTP/2 connection, dialled now so that connecting is not measured.
async fn connect(addr: &str, timeout: Duration) -> anyhow::Result<Channel> {
    Endpoint::from_shared(format!("http://{addr}"))
        .with_context(|| format!("{addr:?} is not host:port"))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .timeout(timeout)
        .connect()
        .await
        .with_context(|| format!("connecting to {addr}"))
}

async fn worker(
    mut client: BackendClient<Channel>,
    seed: u64,
    spec: MeasureSpec,
    end: Instant,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new()?;
    let mut rng = SmallRng::seed_from_u64(seed);
    while Instant::now() < end {
        let mut request = tonic::Request::new(GetItemRequest {
            id: rng.random_range(1..=spec.id_max),
        });
        request.set_timeout(spec.timeout);
        let sent = Instant::now();
        let outcome = client.get_item(request).await;
        let micros = u64::try_from(sent.elapsed().as_micros()).unwrap_or(u64::MAX);
        tally.histogram.saturating_record(micros.max(1));
        match outcome {
            Ok(reply) => {
                tally.ok += 1;
                let served_by = reply.into_inner().served_by;
                match tally.by_backend.get_mut(&served_by) {
                    Some(n) => *n += 1,
                    None => {
                        tally.by_backend.insert(served_by, 1);
                    }
                }
            }
            Err(status) => {
                let code = lab_proto::code_name(status.code());
                *tally.errors.entry(code.to_owned()).or_default() += 1;
            }
        }
    }
    Ok(tally)
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            // 1 µs to 1 min, 3 significant digits.
            histogram: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            ok: 0,
            errors: BTreeMap::new(),
            by_backend: BTreeMap::new(),
        })
    }

    fn merge(&mut self, other: Tally) -> anyhow::Result<()> {
        self.histogram.add(&other.histogram)?;
        self.ok += other.ok;
        for (code, n) in other.errors {
            *self.errors.entry(code).or_default() += n;
        }
        for (backend, n) in other.by_backend {
            *self.by_backend.entry(backend).or_default() += n;
        }
        Ok(())
    }
}
