//! Cause 1, the fix — B's half: registration in etcd.
//!
//! B puts `<prefix><instance_id>` → `{"Op":0,"Addr":"host:port"}` (the value
//! layout of etcd's Go naming/endpoints manager, so a grpc-go client with
//! etcd's resolver finds the same instances: see [`Registration`]) under a lease of
//! `etcd.lease_ttl`, kept alive every TTL/3. If the lease is lost — a
//! keepalive answers TTL ≤ 0, etcd restarts, the network drops — B grants a
//! new lease and puts the key again, with backoff, without restarting; if
//! only the key is deleted, B puts it back under the same lease at once.
//! On shutdown it revokes the lease first, so A stops sending before B stops
//! serving.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use etcd_client::{Client, ConnectOptions, EventType, PutOptions};
use lab_common::config::EtcdConfig;
use prometheus::{
    Gauge, Histogram, IntCounter, IntCounterVec, IntGauge, Registry,
    core::{Collector, Desc},
    proto::MetricFamily,
};
use serde_json::json;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use lab_common::metrics::Registrar;

/// Registration metrics. `lab_registry_registered` and
/// `lab_registry_lease_ttl_seconds` are read from [`RegistrationStatus`]
/// when scraped, so they follow the lease's clock even while this B is too
/// starved to run its keepalive loop.
#[derive(Clone)]
pub struct RegistryMetrics {
    status: RegistrationStatus,
    registrations: IntCounter,
    keepalives: IntCounter,
    keepalive_rtt: Histogram,
    failures: IntCounterVec,
}

impl RegistryMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let r = Registrar(registry);
        let status = RegistrationStatus::new();
        registry.register(Box::new(LeaseCollector::new(status.clone())?))?;
        let failures = r.int_counter_vec(
            "lab_registry_failures_total",
            "Registration sessions that ended in failure, by reason (connect, lease_grant, put, \
             keepalive_send, keepalive_error, keepalive_unanswered, lease_expired, …).",
            &["reason"],
        )?;
        // Every reason exported from the start at 0, so a first failure is
        // a visible step and not a new series.
        for reason in RegistrationLost::REASONS {
            failures.with_label_values(&[reason]);
        }
        Ok(Self {
            status,
            registrations: r.int_counter(
                "lab_registry_registrations_total",
                "Leases granted and keys put (1 at start, +1 per recovery).",
            )?,
            keepalives: r.int_counter(
                "lab_registry_lease_keepalives_total",
                "Lease keepalives answered by etcd.",
            )?,
            keepalive_rtt: r.latency_histogram(
                "lab_registry_keepalive_rtt_seconds",
                "From sending a lease keepalive to etcd's answer (answered ones only; an \
                 unanswered one counts as a failure, reason keepalive_unanswered).",
            )?,
            failures,
        })
    }

    /// The registration state these metrics report; `/readyz` reads it too.
    pub fn status(&self) -> RegistrationStatus {
        self.status.clone()
    }
}

/// `lab_registry_registered` and `lab_registry_lease_ttl_seconds`, computed
/// from [`RegistrationStatus`] at scrape time.
struct LeaseCollector {
    status: RegistrationStatus,
    registered: IntGauge,
    ttl_left: Gauge,
}

impl LeaseCollector {
    fn new(status: RegistrationStatus) -> prometheus::Result<Self> {
        Ok(Self {
            status,
            registered: IntGauge::new(
                "lab_registry_registered",
                "1 while this B's key is in etcd under a lease that etcd last confirmed \
                 and whose TTL has not run out since (0 as soon as either fails).",
            )?,
            ttl_left: Gauge::new(
                "lab_registry_lease_ttl_seconds",
                "Time left on this B's lease as of etcd's last confirmation (grant or \
                 keepalive answer), counted down by B's clock; 0 when not registered.",
            )?,
        })
    }
}

impl Collector for LeaseCollector {
    fn desc(&self) -> Vec<&Desc> {
        self.registered
            .desc()
            .into_iter()
            .chain(self.ttl_left.desc())
            .collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let left = self.status.lease_left();
        self.registered.set(i64::from(!left.is_zero()));
        self.ttl_left.set(left.as_secs_f64());
        self.registered
            .collect()
            .into_iter()
            .chain(self.ttl_left.collect())
            .collect()
    }
}

/// Whether this B's key is in etcd under a live lease right now: what
/// `/readyz` asks when A finds Bs through etcd, and what the
/// `lab_registry_registered` gauge reports.
///
/// It holds the instant the lease runs out as etcd last confirmed it (the
/// grant, then each keepalive answer: sent-at + the TTL etcd answered), not
/// a flag the keepalive loop sets. A B starved of CPU runs its loop late or
/// not at all, and a flag would read "registered" long after etcd dropped
/// the lease and A stopped sending; the deadline expires on time however
/// late the loop runs.
#[derive(Debug, Clone)]
pub struct RegistrationStatus {
    epoch: Instant,
    /// Microseconds from `epoch` until the lease runs out; 0 = no lease.
    valid_until_us: Arc<AtomicU64>,
}

impl Default for RegistrationStatus {
    fn default() -> Self {
        Self::new()
    }
}

impl RegistrationStatus {
    pub fn new() -> Self {
        Self {
            epoch: Instant::now(),
            valid_until_us: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn is_registered(&self) -> bool {
        !self.lease_left().is_zero()
    }

    /// Time left on the lease (zero when there is none or it ran out).
    pub fn lease_left(&self) -> Duration {
        let until = Duration::from_micros(self.valid_until_us.load(Ordering::Acquire));
        until.saturating_sub(self.epoch.elapsed())
    }

    /// etcd confirmed the lease, asked at `asked_at`, for `ttl` more.
    fn confirmed(&self, asked_at: Instant, ttl: Duration) {
        let until = (asked_at + ttl).saturating_duration_since(self.epoch);
        let until_us = u64::try_from(until.as_micros()).unwrap_or(u64::MAX);
        self.valid_until_us
            .store(until_us.max(1), Ordering::Release);
    }

    /// The lease is gone or given up (B stops, or starts a new session).
    fn lost(&self) {
        self.valid_until_us.store(0, Ordering::Release);
    }
}

/// What B registers: `<etcd.prefix><instance_id>` → `{"Op":0,"Addr":"host:port"}`.
///
/// The layout is the one etcd's Go `naming/endpoints` package reads, so that
/// grpc-go with etcd's resolver (`etcd:///lab/services/backend`) finds every B
/// unaided: the prefix has no leading slash (grpc-go drops the one after
/// `etcd:///`), and there is no `Metadata`, because the resolver hands it to
/// grpc-go as address metadata and grpc-go 1.33's round_robin hashes it (a
/// JSON object there panics: "hash of unhashable type"). The instance id is
/// the key's last segment; nothing else is needed to dial B.
#[derive(Debug, Clone)]
pub struct Registration {
    pub key: String,
    pub value: String,
    /// The value B puts right before revoking its lease on shutdown: the
    /// same entry with `"Op": 1`, the naming package's Delete. It tells A
    /// this B is leaving on purpose, so A's registry guard never mistakes a
    /// graceful leave for a registry that lost its Bs.
    pub leaving: String,
}

impl Registration {
    /// The key and value for one B instance.
    pub fn new(config: &EtcdConfig, instance_id: &str, addr: &str) -> Self {
        let entry = |op: u8| json!({"Op": op, "Addr": addr}).to_string();
        Self {
            key: format!("{}{instance_id}", config.prefix),
            value: entry(0),
            leaving: entry(1),
        }
    }
}

/// Why one registration session ended other than by being asked to stop:
/// B registers again after a backoff.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationLost {
    #[error("connect")]
    Connect(#[source] etcd_client::Error),
    #[error("lease grant")]
    LeaseGrant(#[source] etcd_client::Error),
    #[error("put")]
    Put(#[source] etcd_client::Error),
    #[error("keepalive stream")]
    KeepAliveStream(#[source] etcd_client::Error),
    #[error("keepalive send")]
    KeepAliveSend(#[source] etcd_client::Error),
    #[error("keepalive")]
    KeepAlive(#[source] etcd_client::Error),
    #[error("lease expired (keepalive TTL 0)")]
    LeaseExpired,
    #[error("keepalive stream closed")]
    StreamClosed,
    #[error("keepalive unanswered")]
    Unanswered,
    #[error("watching our own key")]
    Watch(#[source] etcd_client::Error),
    #[error("the watch on our own key closed")]
    WatchClosed,
}

impl RegistrationLost {
    /// Every value [`RegistrationLost::reason`] returns.
    const REASONS: [&'static str; 11] = [
        "connect",
        "lease_grant",
        "put",
        "keepalive_stream",
        "keepalive_send",
        "keepalive_error",
        "lease_expired",
        "keepalive_stream_closed",
        "keepalive_unanswered",
        "watch",
        "watch_closed",
    ];

    /// The `reason` label of `lab_registry_failures_total`.
    fn reason(&self) -> &'static str {
        match self {
            RegistrationLost::Connect(_) => "connect",
            RegistrationLost::LeaseGrant(_) => "lease_grant",
            RegistrationLost::Put(_) => "put",
            RegistrationLost::KeepAliveStream(_) => "keepalive_stream",
            RegistrationLost::KeepAliveSend(_) => "keepalive_send",
            RegistrationLost::KeepAlive(_) => "keepalive_error",
            RegistrationLost::LeaseExpired => "lease_expired",
            RegistrationLost::StreamClosed => "keepalive_stream_closed",
            RegistrationLost::Unanswered => "keepalive_unanswered",
            RegistrationLost::Watch(_) => "watch",
            RegistrationLost::WatchClosed => "watch_closed",
        }
    }
}

/// Keeps `registration` in etcd until `stop` is cancelled, then revokes it.
///
/// A lost session is retried 100 ms later, doubling up to a sixth of the
/// lease TTL, and never given up: B keeps serving while etcd is away. A
/// session that had registered resets the backoff, so an outage leaves no
/// long delay behind: with each attempt bounded by its 1 s connect timeout,
/// B is registered again within about TTL/3 of etcd answering.
pub async fn maintain(
    config: EtcdConfig,
    registration: Registration,
    metrics: RegistryMetrics,
    stop: CancellationToken,
) {
    let status = metrics.status();
    let min_delay = Duration::from_millis(100);
    let backoff = ExponentialBuilder::new()
        .with_min_delay(min_delay)
        .with_max_delay((config.lease_ttl / 6).max(min_delay))
        .without_max_times();
    let mut delays = backoff.build();
    loop {
        let mut registered = false;
        let why = match session(&config, &registration, &metrics, &stop, &mut registered).await {
            Ok(()) => return,
            Err(why) => why,
        };
        if registered {
            delays = backoff.build();
        }
        let retry_in = delays.next().unwrap_or(min_delay);
        status.lost();
        metrics.failures.with_label_values(&[why.reason()]).inc();
        tracing::warn!(reason = %lab_common::telemetry::error_chain(&why), ?retry_in, "etcd registration lost");
        tokio::select! {
            () = tokio::time::sleep(retry_in) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// One lease: grant it, put the key under it, keep it alive until it is
/// lost (an error) or `stop` is cancelled (the lease is revoked: `Ok`).
async fn session(
    config: &EtcdConfig,
    registration: &Registration,
    metrics: &RegistryMetrics,
    stop: &CancellationToken,
    registered: &mut bool,
) -> Result<(), RegistrationLost> {
    let status = &metrics.status;
    // A stop during the backoff sleep ends it early: no new lease then.
    if stop.is_cancelled() {
        return Ok(());
    }
    let ttl = config.lease_ttl;
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(ttl / 3)
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1));
    let mut client = Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(RegistrationLost::Connect)?;
    let ttl_secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let asked_at = Instant::now();
    let grant = client
        .lease_grant(ttl_secs, None)
        .await
        .map_err(RegistrationLost::LeaseGrant)?;
    let lease = grant.id();
    put_under(&mut client, &registration.key, &registration.value, lease)
        .await
        .map_err(RegistrationLost::Put)?;
    status.confirmed(asked_at, seconds(grant.ttl()));
    metrics.registrations.inc();
    tracing::info!(key = %registration.key, lease, ?ttl, "registered in etcd");

    // Our own key, watched: deleted while the lease lives (an operator
    // removing the prefix, a restore) means put it back now, not at the
    // next lost lease.
    let mut own_key = client
        .watch(registration.key.as_bytes(), None)
        .await
        .map_err(RegistrationLost::Watch)?;

    let (mut keeper, mut answers) = client
        .lease_keep_alive(lease)
        .await
        .map_err(RegistrationLost::KeepAliveStream)?;
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                status.lost();
                // Say we are leaving, then revoke: A drops us on the first.
                let leaving = put_under(&mut client, &registration.key, &registration.leaving, lease);
                match tokio::time::timeout(Duration::from_secs(1), leaving).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => tracing::warn!(error = %e, "could not mark the registration as leaving"),
                    Err(_) => tracing::warn!("marking the registration as leaving timed out"),
                }
                let revoke = client.lease_revoke(lease);
                match tokio::time::timeout(Duration::from_secs(1), revoke).await {
                    Ok(Ok(_)) => tracing::info!(key = %registration.key, "lease revoked"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "lease revoke failed; the key expires with the TTL"),
                    Err(_) => tracing::warn!("lease revoke timed out; the key expires with the TTL"),
                }
                return Ok(());
            }
            event = own_key.message() => {
                let deleted = event
                    .map_err(RegistrationLost::Watch)?
                    .ok_or(RegistrationLost::WatchClosed)?
                    .events()
                    .iter()
                    .any(|e| e.event_type() == EventType::Delete);
                if deleted {
                    tracing::warn!(key = %registration.key, "our key was deleted while the lease lives; putting it back");
                    put_under(&mut client, &registration.key, &registration.value, lease)
                        .await
                        .map_err(RegistrationLost::Put)?;
                    metrics.registrations.inc();
                }
            }
            _ = tick.tick() => {
                let asked_at = Instant::now();
                keeper.keep_alive().await.map_err(RegistrationLost::KeepAliveSend)?;
                match tokio::time::timeout(ttl / 3, answers.message()).await {
                    Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                        metrics.keepalives.inc();
                        metrics.keepalive_rtt.observe(asked_at.elapsed().as_secs_f64());
                        status.confirmed(asked_at, seconds(answer.ttl()));
                        // A session that kept its lease alive at least once
                        // resets the backoff (not one that fails right after
                        // its put, which would retry every 100 ms).
                        *registered = true;
                    }
                    Ok(Ok(Some(_))) => return Err(RegistrationLost::LeaseExpired),
                    Ok(Ok(None)) => return Err(RegistrationLost::StreamClosed),
                    Ok(Err(e)) => return Err(RegistrationLost::KeepAlive(e)),
                    Err(_) => return Err(RegistrationLost::Unanswered),
                }
            }
        }
    }
}

/// A TTL etcd answered, in seconds (negative = none left).
fn seconds(ttl: i64) -> Duration {
    Duration::from_secs(u64::try_from(ttl).unwrap_or(0))
}

/// Puts `key` → `value` attached to `lease`, so it goes when the lease does.
async fn put_under(
    client: &mut Client,
    key: &str,
    value: &str,
    lease: i64,
) -> Result<(), etcd_client::Error> {
    client
        .put(key, value, Some(PutOptions::new().with_lease(lease)))
        .await
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The gauge and `/readyz` go to 0 when the lease's TTL runs out,
    /// with no help from the keepalive loop — as when B is too starved of
    /// CPU to run it.
    #[tokio::test(start_paused = true)]
    async fn registration_ends_when_the_confirmed_ttl_runs_out_without_the_loop() {
        let registry = Registry::new();
        let metrics = RegistryMetrics::register(&registry).expect("metrics");
        let status = metrics.status();
        let gauge = |name: &str| {
            registry
                .gather()
                .iter()
                .find(|f| f.name() == name)
                .map(|f| f.get_metric()[0].get_gauge().value())
        };
        assert!(!status.is_registered());
        assert_eq!(gauge("lab_registry_registered"), Some(0.0));

        // Asked 1 s ago, confirmed for 3 s: 2 s left.
        let asked_at = Instant::now();
        tokio::time::advance(Duration::from_secs(1)).await;
        status.confirmed(asked_at, Duration::from_secs(3));
        assert!(status.is_registered());
        assert_eq!(gauge("lab_registry_registered"), Some(1.0));
        assert_eq!(gauge("lab_registry_lease_ttl_seconds"), Some(2.0));

        tokio::time::advance(Duration::from_millis(1999)).await;
        assert!(status.is_registered());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(!status.is_registered());
        assert_eq!(gauge("lab_registry_registered"), Some(0.0));
        assert_eq!(gauge("lab_registry_lease_ttl_seconds"), Some(0.0));

        // A new confirmation registers again; giving the lease up ends it
        // at once.
        status.confirmed(Instant::now(), Duration::from_secs(3));
        assert!(status.is_registered());
        status.lost();
        assert!(!status.is_registered());
        assert_eq!(gauge("lab_registry_registered"), Some(0.0));
    }

    #[test]
    fn every_failure_reason_is_exported_from_the_start() {
        let registry = Registry::new();
        RegistryMetrics::register(&registry).expect("metrics");
        let families = registry.gather();
        let failures = families
            .iter()
            .find(|f| f.name() == "lab_registry_failures_total")
            .expect("failures family");
        let mut reasons: Vec<&str> = failures
            .get_metric()
            .iter()
            .flat_map(|m| m.get_label().iter().map(|l| l.value()))
            .collect();
        reasons.sort_unstable();
        let mut expected = RegistrationLost::REASONS.to_vec();
        expected.sort_unstable();
        assert_eq!(reasons, expected);
        let lost = RegistrationLost::Unanswered;
        assert!(RegistrationLost::REASONS.contains(&lost.reason()));
    }

    #[test]
    fn value_has_the_go_naming_layout() {
        let r = Registration::new(&EtcdConfig::default(), "b-1", "10.0.0.5:50051");
        // No leading slash: grpc-go's `etcd:///lab/services/backend` watches
        // `lab/services/backend`.
        assert_eq!(r.key, "lab/services/backend/b-1");
        // Exactly Op and Addr: a `Metadata` object would reach grpc-go's
        // round_robin as address metadata, which it cannot hash.
        assert_eq!(r.value, r#"{"Addr":"10.0.0.5:50051","Op":0}"#);
        assert_eq!(r.leaving, r#"{"Addr":"10.0.0.5:50051","Op":1}"#);
    }
}
