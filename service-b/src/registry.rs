//! Cause 1, the fix — B's half: registration in etcd.
//!
//! B puts `<prefix><instance_id>` → `{"Op":0,"Addr":"host:port","Metadata":{…}}`
//! (the value layout of etcd's Go naming/endpoints manager, so a grpc-go
//! client with etcd's resolver finds the same instances) under a lease of
//! `etcd.lease_ttl`, kept alive every TTL/3. If the lease is lost — a
//! keepalive answers TTL ≤ 0, etcd restarts, the network drops — B grants a
//! new lease and puts the key again, with backoff, without restarting.
//! On shutdown it revokes the lease first, so A stops sending before B stops
//! serving.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions, PutOptions};
use lab_common::config::EtcdConfig;
use prometheus::{IntCounter, IntGauge, Opts, Registry};
use serde_json::json;
use tokio_util::sync::CancellationToken;

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
        let registered = IntGauge::with_opts(Opts::new(
            "lab_registry_registered",
            "1 while this B's key is in etcd under a live lease.",
        ))?;
        let registrations = IntCounter::with_opts(Opts::new(
            "lab_registry_registrations_total",
            "Leases granted and keys put (1 at start, +1 per recovery).",
        ))?;
        let keepalives = IntCounter::with_opts(Opts::new(
            "lab_registry_lease_keepalives_total",
            "Lease keepalives answered by etcd.",
        ))?;
        let failures = IntCounter::with_opts(Opts::new(
            "lab_registry_failures_total",
            "Registration or keepalive attempts that failed (etcd down, lease lost).",
        ))?;
        for c in [&registrations, &keepalives, &failures] {
            registry.register(Box::new(c.clone()))?;
        }
        registry.register(Box::new(registered.clone()))?;
        Ok(Self {
            registered,
            registrations,
            keepalives,
            failures,
        })
    }
}

/// What B registers.
#[derive(Debug, Clone)]
pub struct Registration {
    pub key: String,
    pub value: String,
}

impl Registration {
    /// The key and value for one B instance.
    pub fn new(config: &EtcdConfig, instance_id: &str, addr: &str, admin: &str) -> Self {
        let value = json!({
            "Op": 0,
            "Addr": addr,
            "Metadata": {"instance_id": instance_id, "admin": admin},
        });
        Self {
            key: format!("{}{instance_id}", config.prefix),
            value: value.to_string(),
        }
    }
}

/// Why one registration session ended.
enum Ended {
    /// Asked to stop; the lease was revoked (or etcd was unreachable).
    Stopped,
    /// The lease or the connection was lost: register again.
    Lost(String),
}

/// Keeps `registration` in etcd until `stop` is cancelled, then revokes it.
pub async fn maintain(
    config: EtcdConfig,
    registration: Registration,
    metrics: RegistryMetrics,
    stop: CancellationToken,
) {
    let ttl = config.lease_ttl;
    let mut backoff = Duration::from_millis(100);
    loop {
        match session(&config, &registration, &metrics, &stop).await {
            Ok(Ended::Stopped) => return,
            Ok(Ended::Lost(why)) | Err(why) => {
                metrics.registered.set(0);
                metrics.failures.inc();
                tracing::warn!(reason = %why, retry_in = ?backoff, "etcd registration lost");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(ttl / 3).max(Duration::from_millis(100));
    }
}

async fn session(
    config: &EtcdConfig,
    registration: &Registration,
    metrics: &RegistryMetrics,
    stop: &CancellationToken,
) -> Result<Ended, String> {
    let ttl = config.lease_ttl;
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_timeout(ttl / 3)
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1));
    let mut client = Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let ttl_secs = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
    let lease = client
        .lease_grant(ttl_secs, None)
        .await
        .map_err(|e| format!("lease grant: {e}"))?
        .id();
    client
        .put(
            registration.key.as_bytes(),
            registration.value.as_bytes(),
            Some(PutOptions::new().with_lease(lease)),
        )
        .await
        .map_err(|e| format!("put: {e}"))?;
    metrics.registered.set(1);
    metrics.registrations.inc();
    tracing::info!(key = %registration.key, lease, ?ttl, "registered in etcd");

    let (mut keeper, mut answers) = client
        .lease_keep_alive(lease)
        .await
        .map_err(|e| format!("keepalive stream: {e}"))?;
    let mut tick = tokio::time::interval(ttl / 3);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                metrics.registered.set(0);
                let revoke = client.lease_revoke(lease);
                match tokio::time::timeout(Duration::from_secs(1), revoke).await {
                    Ok(Ok(_)) => tracing::info!(key = %registration.key, "lease revoked"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "lease revoke failed; the key expires with the TTL"),
                    Err(_) => tracing::warn!("lease revoke timed out; the key expires with the TTL"),
                }
                return Ok(Ended::Stopped);
            }
            _ = tick.tick() => {
                keeper.keep_alive().await.map_err(|e| format!("keepalive send: {e}"))?;
                match tokio::time::timeout(ttl / 3, answers.message()).await {
                    Ok(Ok(Some(answer))) if answer.ttl() > 0 => metrics.keepalives.inc(),
                    Ok(Ok(Some(_))) => return Ok(Ended::Lost("lease expired (keepalive TTL 0)".into())),
                    Ok(Ok(None)) => return Ok(Ended::Lost("keepalive stream closed".into())),
                    Ok(Err(e)) => return Ok(Ended::Lost(format!("keepalive: {e}"))),
                    Err(_) => return Ok(Ended::Lost("keepalive unanswered".into())),
                }
            }
        }
    }
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
    }
}
