//! Cause 1, the fix — A's half: discovering the B instances from etcd.
//!
//! A background task (never request traffic) keeps A's view of the registry:
//! a prefix Get, then a Watch from that revision + 1. When the watch fails it
//! resumes from the last revision it saw, with backoff; when etcd says that
//! revision was compacted it re-reads everything and sends the difference.
//! While etcd is unreachable nothing is removed: A keeps balancing over the
//! last endpoints it knew (a B that really died is still ejected by the
//! balancer, [`crate::endpoint`], on its first refused call).

use std::{collections::HashMap, time::Duration};

use backon::{ExponentialBuilder, RetryableWithContext};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use lab_common::config::EtcdConfig;
use lab_common::metrics::Registrar;
use prometheus::{IntCounterVec, IntGauge, Registry};
use tokio::sync::mpsc::UnboundedSender;
use tokio_util::sync::CancellationToken;
use tower::discover::Change;

/// One registered B: its instance id (the key suffix) and address.
pub type EndpointChange = Change<String, String>;

/// Discovery metrics.
#[derive(Clone)]
pub struct DiscoveryMetrics {
    /// Endpoints currently known (this is `lab_backend_endpoints`).
    pub endpoints: IntGauge,
    pub events: IntCounterVec,
    pub watch_errors: IntCounterVec,
}

impl DiscoveryMetrics {
    pub fn register(registry: &Registry, endpoints: IntGauge) -> prometheus::Result<Self> {
        Ok(Self {
            endpoints,
            events: Registrar(registry).int_counter_vec(
                "lab_discovery_events_total",
                "Registry changes applied to A's balancer (insert, remove, resync).",
                &["kind"],
            )?,
            watch_errors: Registrar(registry).int_counter_vec(
                "lab_discovery_watch_errors_total",
                "etcd connection, get or watch failures seen by discovery.",
                &["stage"],
            )?,
        })
    }
}

/// The registered address in a value written by B (or by grpc-go's
/// endpoints manager): `{"Addr": "host:port", ...}`.
pub fn parse_addr(value: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(value).ok()?;
    let addr = v.get("Addr")?.as_str()?;
    (!addr.is_empty()).then(|| addr.to_string())
}

/// Applies registry changes to the balancer and keeps the gauge true.
struct View {
    prefix: String,
    known: HashMap<String, String>,
    tx: UnboundedSender<EndpointChange>,
    metrics: DiscoveryMetrics,
}

impl View {
    fn id_of(&self, key: &[u8]) -> Option<String> {
        std::str::from_utf8(key)
            .ok()?
            .strip_prefix(&self.prefix)
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
    }

    fn upsert(&mut self, id: String, addr: String) {
        if self.known.get(&id) == Some(&addr) {
            return;
        }
        tracing::info!(%id, %addr, "backend discovered");
        self.known.insert(id.clone(), addr.clone());
        let _ = self.tx.send(Change::Insert(id, addr));
        self.metrics.events.with_label_values(&["insert"]).inc();
        self.metrics.endpoints.set(self.known.len() as i64);
    }

    fn remove(&mut self, id: &str) {
        if self.known.remove(id).is_some() {
            tracing::info!(%id, "backend removed");
            let _ = self.tx.send(Change::Remove(id.to_string()));
            self.metrics.events.with_label_values(&["remove"]).inc();
            self.metrics.endpoints.set(self.known.len() as i64);
        }
    }

    /// Replaces the whole view with `current`, sending only the difference.
    fn resync(&mut self, current: HashMap<String, String>) {
        self.metrics.events.with_label_values(&["resync"]).inc();
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|id| !current.contains_key(*id))
            .cloned()
            .collect();
        for id in gone {
            self.remove(&id);
        }
        for (id, addr) in current {
            self.upsert(id, addr);
        }
    }
}

/// Retries of a failed discovery session: quick at first (a restarted etcd
/// is back in moments), capped so a long outage costs one attempt every 2 s.
/// Forever: A never gives up on its registry.
const SESSION_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(100))
    .with_max_delay(Duration::from_secs(2))
    .with_factor(2.0)
    .without_max_times();
/// How long the prefix Get may take.
const GET_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a discovery session ended.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("connecting to etcd failed")]
    Connect(#[source] etcd_client::Error),
    #[error("reading the registry failed")]
    Get(#[source] etcd_client::Error),
    #[error("reading the registry timed out after {0:?}")]
    GetTimedOut(Duration),
    #[error("opening the watch failed")]
    Watch(#[source] etcd_client::Error),
    #[error("the watch stream failed")]
    Stream(#[source] etcd_client::Error),
    #[error("the watch stream ended")]
    StreamEnded,
    #[error("etcd canceled the watch: {reason}")]
    Canceled { reason: String },
}

impl DiscoveryError {
    /// The `stage` label of `lab_discovery_watch_errors_total`.
    fn stage(&self) -> &'static str {
        match self {
            DiscoveryError::Connect(_) => "connect",
            DiscoveryError::Get(_) | DiscoveryError::GetTimedOut(_) => "get",
            DiscoveryError::Watch(_)
            | DiscoveryError::Stream(_)
            | DiscoveryError::StreamEnded
            | DiscoveryError::Canceled { .. } => "watch",
        }
    }
}

/// What discovery carries from one session to the next: the view, and the
/// revision it reflects (`None` = must (re)read everything).
struct Session {
    view: View,
    revision: Option<i64>,
}

/// Runs discovery until `shutdown`, sending every change to `tx`.
pub async fn run(
    config: EtcdConfig,
    tx: UnboundedSender<EndpointChange>,
    metrics: DiscoveryMetrics,
    shutdown: CancellationToken,
) {
    metrics.endpoints.set(0);
    let session = Session {
        view: View {
            prefix: config.prefix.clone(),
            known: HashMap::new(),
            tx,
            metrics,
        },
        revision: None,
    };
    tokio::select! {
        _ = follow(&config, session) => {}
        _ = shutdown.cancelled() => {}
    }
}

/// Follows the registry forever. A failed session is retried with
/// [`SESSION_BACKOFF`]; one that ends asking for a resync starts over at
/// once, with the backoff reset.
async fn follow(config: &EtcdConfig, mut session: Session) {
    let watch_errors = session.view.metrics.watch_errors.clone();
    let endpoints = session.view.metrics.endpoints.clone();
    loop {
        let (returned, _) = (|mut session: Session| async move {
            let outcome = watch_once(config, &mut session.view, &mut session.revision).await;
            (session, outcome)
        })
        .retry(SESSION_BACKOFF)
        // backon requires the sleeper before the context.
        .sleep(tokio::time::sleep)
        .context(session)
        .notify(|e: &DiscoveryError, retry_in: Duration| {
            watch_errors.with_label_values(&[e.stage()]).inc();
            tracing::warn!(stage = e.stage(), error = %lab_common::telemetry::error_chain(e), ?retry_in, endpoints = endpoints.get(), "etcd discovery interrupted; keeping the last known endpoints");
        })
        .await;
        session = returned;
    }
}

/// One connection's worth of discovery: (re)sync if needed, then watch until
/// the stream ends. Returns Ok when it should simply start over.
async fn watch_once(
    config: &EtcdConfig,
    view: &mut View,
    revision: &mut Option<i64>,
) -> Result<(), DiscoveryError> {
    let options = ConnectOptions::new()
        .with_connect_timeout(Duration::from_secs(1))
        .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1));
    let mut client = Client::connect(&config.endpoints, Some(options))
        .await
        .map_err(DiscoveryError::Connect)?;

    if revision.is_none() {
        let get = client.get(
            config.prefix.as_bytes(),
            Some(GetOptions::new().with_prefix()),
        );
        let response = tokio::time::timeout(GET_TIMEOUT, get)
            .await
            .map_err(|_| DiscoveryError::GetTimedOut(GET_TIMEOUT))?
            .map_err(DiscoveryError::Get)?;
        let mut current = HashMap::new();
        for kv in response.kvs() {
            if let (Some(id), Some(addr)) = (view.id_of(kv.key()), parse_addr(kv.value())) {
                current.insert(id, addr);
            }
        }
        view.resync(current);
        *revision = response.header().map(|h| h.revision());
    }
    let start = revision.map(|r| r + 1).unwrap_or(0);
    let mut stream = client
        .watch(
            config.prefix.as_bytes(),
            Some(WatchOptions::new().with_prefix().with_start_revision(start)),
        )
        .await
        .map_err(DiscoveryError::Watch)?;
    loop {
        let Some(response) = stream.message().await.map_err(DiscoveryError::Stream)? else {
            return Err(DiscoveryError::StreamEnded);
        };
        if response.compact_revision() > 0 {
            tracing::warn!(
                compacted = response.compact_revision(),
                "watch revision compacted; resyncing"
            );
            *revision = None;
            return Ok(());
        }
        if response.canceled() {
            return Err(DiscoveryError::Canceled {
                reason: response.cancel_reason().to_owned(),
            });
        }
        // An etcd behind our revision is a different store (restored or
        // wiped): what we know may be gone, so read everything again.
        if let (Some(header), Some(seen)) = (response.header(), *revision)
            && header.revision() < seen
        {
            tracing::warn!(
                etcd = header.revision(),
                seen,
                "etcd is behind the revision we saw; resyncing"
            );
            *revision = None;
            return Ok(());
        }
        for event in response.events() {
            let Some(kv) = event.kv() else { continue };
            let Some(id) = view.id_of(kv.key()) else {
                continue;
            };
            match event.event_type() {
                EventType::Put => match parse_addr(kv.value()) {
                    Some(addr) => view.upsert(id, addr),
                    None => {
                        tracing::warn!(%id, "registry value without an Addr; ignoring it");
                        view.remove(&id);
                    }
                },
                EventType::Delete => view.remove(&id),
            }
            // Resume point = the last event applied. (Not the header's
            // revision: etcd may split a catch-up over several responses,
            // each headed with the newest revision.)
            *revision = Some(kv.mod_revision().max(revision.unwrap_or(0)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_b_and_grpc_go_values() {
        assert_eq!(
            parse_addr(br#"{"Op":0,"Addr":"127.0.0.1:50051","Metadata":{"instance_id":"b-1"}}"#),
            Some("127.0.0.1:50051".into())
        );
        assert_eq!(
            parse_addr(br#"{"Addr":"b:1","Metadata":null}"#),
            Some("b:1".into())
        );
        assert_eq!(parse_addr(br#"{"Addr":""}"#), None);
        assert_eq!(parse_addr(b"not json"), None);
    }

    /// A port nothing listens on.
    fn closed_port() -> u16 {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    }

    #[tokio::test]
    async fn a_failed_session_is_retried_with_backoff_until_shutdown() {
        let config = EtcdConfig {
            endpoints: vec![format!("http://127.0.0.1:{}", closed_port())],
            ..EtcdConfig::default()
        };
        let registry = Registry::new();
        let gauge = IntGauge::new("g", "g").expect("gauge");
        let metrics = DiscoveryMetrics::register(&registry, gauge).expect("metrics");
        let (tx, _rx) = tokio::sync::mpsc::unbounded_channel();
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run(config, tx, metrics.clone(), shutdown.clone()));
        let failures = || {
            ["connect", "get", "watch"]
                .iter()
                .map(|stage| metrics.watch_errors.with_label_values(&[stage]).get())
                .sum::<u64>()
        };
        let started = tokio::time::Instant::now();
        while failures() < 3 {
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{} connect failures",
                failures()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // 100 ms, then 200 ms between the attempts.
        assert!(started.elapsed() >= Duration::from_millis(300));
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(1), task)
            .await
            .expect("stops at shutdown")
            .expect("did not panic");
    }

    #[test]
    fn resync_sends_only_the_difference() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let registry = Registry::new();
        let gauge = IntGauge::new("g", "g").expect("gauge");
        let mut view = View {
            prefix: "/p/".into(),
            known: HashMap::new(),
            tx,
            metrics: DiscoveryMetrics::register(&registry, gauge.clone()).expect("metrics"),
        };
        view.upsert("a".into(), "h:1".into());
        view.upsert("b".into(), "h:2".into());
        view.resync(HashMap::from([
            ("b".into(), "h:2".into()),
            ("c".into(), "h:3".into()),
        ]));
        let mut changes = Vec::new();
        while let Ok(change) = rx.try_recv() {
            changes.push(match change {
                Change::Insert(k, v) => format!("+{k}={v}"),
                Change::Remove(k) => format!("-{k}"),
            });
        }
        assert_eq!(changes, ["+a=h:1", "+b=h:2", "-a", "+c=h:3"]);
        assert_eq!(gauge.get(), 2);
        assert_eq!(view.id_of(b"/p/x"), Some("x".into()));
        assert_eq!(view.id_of(b"/other/x"), None);
    }
}
