//! Cause 1, the fix — B's half: registration in etcd.
//!
//! B puts `<prefix><instance_id>` → `{"Op":0,"Addr":"host:port","Metadata":{…}}`
//! (the value layout of etcd's Go naming/endpoints manager, so a grpc-go
//! client with etcd's resolver finds the same instances) under a lease of
//! `etcd.lease_ttl`, kept alive every TTL/3. If the lease is lost — a
//! keepalive answers TTL ≤ 0, etcd restarts, the network drops — B grants a
//! new lease and puts the key again, with backoff, without restarting; if
//! only the key is deleted, B puts it back under the same lease at once.
//! On shutdown it revokes the lease first, so A stops sending before B stops
//! serving.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBuilder};
use etcd_client::{Client, ConnectOptions, EventType, PutOptions};
use lab_common::config::EtcdConfig;
use prometheus::{IntCounter, IntGauge, Registry};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use lab_common::metrics::Registrar;

/// Registration metrics.
#[derive(Clone)]
pub struct RegistryMetrics {
    registered: IntGauge,
    registrations: IntCounter,
    keepalives: IntCounter,
    failures: IntCounter,
}

impl RegistryMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let r = Registrar(registry);
        Ok(Self {
            registered: r.int_gauge(
                "lab_registry_registered",
                "1 while this B's key is in etcd under a live lease.",
            )?,
            registrations: r.int_counter(
                "lab_registry_registrations_total",
                "Leases granted and keys put (1 at start, +1 per recovery).",
            )?,
            keepalives: r.int_counter(
                "lab_registry_lease_keepalives_total",
                "Lease keepalives answered by etcd.",
            )?,
            failures: r.int_counter(
                "lab_registry_failures_total",
                "Registration or keepalive attempts that failed (etcd down, lease lost).",
            )?,
        })
    }
}

/// Whether this B's key is in etcd under a live lease right now: what
/// `/readyz` asks when A finds Bs through etcd. Kept apart from the
/// `lab_registry_registered` gauge so no decision reads a metric.
#[derive(Debug, Clone, Default)]
pub struct RegistrationStatus(Arc<AtomicBool>);

impl RegistrationStatus {
    pub fn is_registered(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }

    fn set(&self, metrics: &RegistryMetrics, registered: bool) {
        self.0.store(registered, Ordering::Release);
        metrics.registered.set(i64::from(registered));
    }
}

/// What B registers.
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
    pub fn new(config: &EtcdConfig, instance_id: &str, addr: &str, admin: &str) -> Self {
        let entry = |op: u8| {
            json!({
                "Op": op,
                "Addr": addr,
                "Metadata": {"instance_id": instance_id, "admin": admin},
            })
            .to_string()
        };
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
    status: RegistrationStatus,
    stop: CancellationToken,
) {
    let min_delay = Duration::from_millis(100);
    let backoff = ExponentialBuilder::new()
        .with_min_delay(min_delay)
        .with_max_delay((config.lease_ttl / 6).max(min_delay))
        .without_max_times();
    let mut delays = backoff.build();
    loop {
        let mut registered = false;
        let why = match session(
            &config,
            &registration,
            &metrics,
            &status,
            &stop,
            &mut registered,
        )
        .await
        {
            Ok(()) => return,
            Err(why) => why,
        };
        if registered {
            delays = backoff.build();
        }
        let retry_in = delays.next().unwrap_or(min_delay);
        status.set(&metrics, false);
        metrics.failures.inc();
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
    status: &RegistrationStatus,
    stop: &CancellationToken,
    registered: &mut bool,
) -> Result<(), RegistrationLost> {
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
    let lease = client
        .lease_grant(ttl_secs, None)
        .await
        .map_err(RegistrationLost::LeaseGrant)?
        .id();
    put_under(&mut client, &registration.key, &registration.value, lease)
        .await
        .map_err(RegistrationLost::Put)?;
    status.set(metrics, true);
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
                status.set(metrics, false);
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
                keeper.keep_alive().await.map_err(RegistrationLost::KeepAliveSend)?;
                match tokio::time::timeout(ttl / 3, answers.message()).await {
                    Ok(Ok(Some(answer))) if answer.ttl() > 0 => {
                        metrics.keepalives.inc();
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

    #[test]
    fn value_has_the_go_naming_layout() {
        let r = Registration::new(
            &EtcdConfig::default(),
            "b-1",
            "10.0.0.5:50051",
            "10.0.0.5:9081",
        );
        assert_eq!(r.key, "/lab/services/backend/b-1");
        let v: serde_json::Value = serde_json::from_str(&r.value).expect("json");
        assert_eq!(v["Op"], 0);
        assert_eq!(v["Addr"], "10.0.0.5:50051");
        assert_eq!(v["Metadata"]["instance_id"], "b-1");
        let leaving: serde_json::Value = serde_json::from_str(&r.leaving).expect("json");
        assert_eq!(leaving["Op"], 1);
        assert_eq!(leaving["Addr"], "10.0.0.5:50051");
    }
}
