//! Cause 1, the fix — A's half: discovering the B instances from etcd.
//!
//! A background task (never request traffic) keeps A's view of the registry:
//! a prefix Get, then a Watch from that revision + 1. When the watch fails it
//! resumes from the last revision it saw, with backoff; when etcd says that
//! revision was compacted it re-reads everything and sends the difference.
//! While etcd is unreachable nothing is removed: A keeps balancing over the
//! last endpoints it knew (a B that really died is still ejected by the
//! balancer, [`crate::endpoint`], on its first refused call).
//!
//! **The registry guard** (`service_a.registry_guard`). A registry that
//! drops many Bs at once is more likely broken than the Bs: a frozen or
//! partitioned etcd, on its return, revokes every lease whose keepalives it
//! missed, and an operator can delete the prefix. So when removals within
//! `registry_guard_window` exceed `registry_guard_max_loss` of the
//! endpoints, or would remove the last one, A keeps those endpoints (and the
//! ones removed just before, in the same window) as *stale*: still in the
//! balancer, counted in `lab_discovery_stale_endpoints`. A stale endpoint
//! leaves when it fails (its first ejection), when `registry_stale_grace`
//! passes without its key coming back, or never, if its key comes back. A B
//! that leaves on purpose says so first (on SIGTERM it puts its entry with
//! `"Op": 1`, then revokes its lease): that is honoured at once and never
//! counted as a loss, so scaling down or restarting every B is not mistaken
//! for a broken registry — the same distinction Eureka draws between a
//! cancel and an expiry in its self-preservation, and close to Envoy's
//! panic threshold. Stale endpoints are swept while the watch runs; during
//! an etcd outage nothing is removed anyway.

use std::{
    collections::{HashMap, VecDeque},
    time::Duration,
};

use backon::{ExponentialBuilder, RetryableWithContext};
use etcd_client::{Client, ConnectOptions, EventType, GetOptions, WatchOptions};
use lab_common::config::{EtcdConfig, ServiceAConfig};
use lab_common::metrics::Registrar;
use prometheus::{IntCounterVec, IntGauge, Registry};
use tokio::{
    sync::mpsc::{UnboundedReceiver, UnboundedSender},
    time::Instant,
};
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
    /// Endpoints the registry dropped but the guard keeps.
    pub stale: IntGauge,
}

impl DiscoveryMetrics {
    pub fn register(registry: &Registry, endpoints: IntGauge) -> prometheus::Result<Self> {
        let events = Registrar(registry).int_counter_vec(
            "lab_discovery_events_total",
            "Registry changes applied to A's balancer (insert, remove, resync, stale, back).",
            &["kind"],
        )?;
        let watch_errors = Registrar(registry).int_counter_vec(
            "lab_discovery_watch_errors_total",
            "etcd connection, get or watch failures seen by discovery.",
            &["stage"],
        )?;
        // Exported at 0 from the start, whatever `lb` is: a series that
        // appeared only under `lb = "etcd"` would tell a drill's trainee
        // the switch without any diagnosis.
        for kind in ["insert", "remove", "resync", "stale", "back"] {
            events.with_label_values(&[kind]);
        }
        for stage in ["connect", "get", "watch"] {
            watch_errors.with_label_values(&[stage]);
        }
        Ok(Self {
            endpoints,
            events,
            watch_errors,
            stale: Registrar(registry).int_gauge(
                "lab_discovery_stale_endpoints",
                "Endpoints the registry removed in bulk that A's registry guard keeps routing to.",
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

/// Whether the value is a B announcing it is leaving: `"Op": 1`, the naming
/// package's Delete, which B puts right before revoking its lease.
pub fn is_leaving(value: &[u8]) -> bool {
    serde_json::from_slice::<serde_json::Value>(value)
        .ok()
        .and_then(|v| v.get("Op")?.as_u64())
        == Some(1)
}

/// The registry guard's settings (`service_a.registry_guard*`).
#[derive(Debug, Clone)]
pub struct Guard {
    pub enabled: bool,
    pub max_loss: f64,
    pub window: Duration,
    pub stale_grace: Duration,
}

impl Guard {
    pub fn from_config(config: &ServiceAConfig) -> Self {
        Self {
            enabled: config.registry_guard,
            max_loss: config.registry_guard_max_loss,
            window: config.registry_guard_window,
            stale_grace: config.registry_stale_grace,
        }
    }
}

/// Applies registry changes to the balancer, through the guard, and keeps
/// the gauges true.
struct View {
    prefix: String,
    /// Every endpoint in the balancer, live or stale: id → address.
    known: HashMap<String, String>,
    /// The stale ones, since when.
    stale: HashMap<String, Instant>,
    /// Removals honoured within the guard's window: (when, id, address).
    recent: VecDeque<(Instant, String, String)>,
    /// Once tripped, the guard holds for a window: the rest of a bulk
    /// loss is kept too, instead of the count starting over.
    tripped_until: Option<Instant>,
    guard: Guard,
    tx: UnboundedSender<EndpointChange>,
    metrics: DiscoveryMetrics,
}

impl View {
    fn new(
        prefix: String,
        guard: Guard,
        tx: UnboundedSender<EndpointChange>,
        metrics: DiscoveryMetrics,
    ) -> Self {
        Self {
            prefix,
            known: HashMap::new(),
            stale: HashMap::new(),
            recent: VecDeque::new(),
            tripped_until: None,
            guard,
            tx,
            metrics,
        }
    }

    fn id_of(&self, key: &[u8]) -> Option<String> {
        std::str::from_utf8(key)
            .ok()?
            .strip_prefix(&self.prefix)
            .filter(|id| !id.is_empty())
            .map(str::to_owned)
    }

    fn count(&self, kind: &str) {
        self.metrics.events.with_label_values(&[kind]).inc();
        self.metrics.endpoints.set(self.known.len() as i64);
        self.metrics.stale.set(self.stale.len() as i64);
    }

    /// The registry has `id` at `addr`.
    fn upsert(&mut self, id: String, addr: String) {
        // Back in the registry: no longer part of a recent loss.
        self.recent.retain(|(_, gone, _)| *gone != id);
        if self.stale.remove(&id).is_some() {
            tracing::info!(%id, %addr, "backend back in the registry; no longer stale");
            self.count("back");
        }
        if self.known.get(&id) == Some(&addr) {
            return;
        }
        tracing::info!(%id, %addr, "backend discovered");
        self.known.insert(id.clone(), addr.clone());
        let _ = self.tx.send(Change::Insert(id, addr));
        self.count("insert");
    }

    /// The registry no longer has `id`: drop it, unless the guard trips.
    fn remove(&mut self, id: &str, now: Instant) {
        let Some(addr) = self.known.get(id).cloned() else {
            return;
        };
        if self.stale.contains_key(id) {
            return;
        }
        if let Some(why) = self.guard_trips(now) {
            self.keep_stale(id, &addr, now, &why);
            // The endpoints removed just before were the start of the same
            // loss: put them back, stale too.
            for (_, id, addr) in std::mem::take(&mut self.recent) {
                if self.known.contains_key(&id) {
                    continue;
                }
                self.known.insert(id.clone(), addr.clone());
                let _ = self.tx.send(Change::Insert(id.clone(), addr.clone()));
                self.keep_stale(&id, &addr, now, &why);
            }
            return;
        }
        if self.guard.enabled {
            self.recent.push_back((now, id.to_owned(), addr));
        }
        self.drop_endpoint(id, "backend removed");
    }

    /// Why removing one more endpoint now would be a bulk loss, if it is.
    fn guard_trips(&mut self, now: Instant) -> Option<String> {
        if !self.guard.enabled {
            return None;
        }
        if self.tripped_until.is_some_and(|until| now < until) {
            self.tripped_until = Some(now + self.guard.window);
            return Some("the registry is still removing endpoints in bulk".into());
        }
        while self
            .recent
            .front()
            .is_some_and(|(at, _, _)| now.duration_since(*at) > self.guard.window)
        {
            self.recent.pop_front();
        }
        let live = self.known.len().saturating_sub(self.stale.len());
        let removed = self.recent.len() + 1;
        let before = live + self.recent.len();
        let why = if live <= 1 {
            Some("the registry would remove A's last live endpoint".to_owned())
        } else {
            (removed as f64 > self.guard.max_loss * before as f64).then(|| {
                format!(
                    "the registry removed {removed} of {before} endpoints within {:?} \
                     (registry_guard_max_loss {})",
                    self.guard.window, self.guard.max_loss
                )
            })
        };
        if why.is_some() {
            self.tripped_until = Some(now + self.guard.window);
        }
        why
    }

    fn keep_stale(&mut self, id: &str, addr: &str, now: Instant, why: &str) {
        tracing::warn!(%id, %addr, reason = why, grace = ?self.guard.stale_grace,
            "registry guard: keeping a removed backend as stale while it answers");
        self.stale.insert(id.to_owned(), now);
        self.count("stale");
    }

    /// `id` announced it is leaving (SIGTERM): honoured at once, and not
    /// a loss the guard counts.
    fn leave(&mut self, id: &str) {
        self.recent.retain(|(_, gone, _)| gone != id);
        self.drop_endpoint(id, "backend left the registry");
    }

    /// Takes `id` out of the balancer.
    fn drop_endpoint(&mut self, id: &str, why: &str) {
        if self.known.remove(id).is_some() {
            self.stale.remove(id);
            tracing::info!(%id, "{why}");
            let _ = self.tx.send(Change::Remove(id.to_string()));
            self.count("remove");
        }
    }

    /// A stale endpoint that failed, or outstayed its grace, leaves.
    fn expire_stale(&mut self, now: Instant, ejected: &[String]) {
        let grace = self.guard.stale_grace;
        let leaving: Vec<(String, &str)> = self
            .stale
            .iter()
            .filter_map(|(id, since)| {
                if ejected.contains(id) {
                    Some((id.clone(), "stale backend failed; removed"))
                } else if now.duration_since(*since) >= grace {
                    Some((
                        id.clone(),
                        "stale backend still not in the registry after the grace period; removed",
                    ))
                } else {
                    None
                }
            })
            .collect();
        for (id, why) in leaving {
            self.drop_endpoint(&id, why);
        }
    }

    /// Replaces the whole view with `current`, sending only the difference.
    fn resync(&mut self, current: HashMap<String, String>, now: Instant) {
        self.metrics.events.with_label_values(&["resync"]).inc();
        let gone: Vec<String> = self
            .known
            .keys()
            .filter(|id| !current.contains_key(*id))
            .cloned()
            .collect();
        for (id, addr) in current {
            self.upsert(id, addr);
        }
        for id in gone {
            self.remove(&id, now);
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

/// What discovery carries from one session to the next: the view, the
/// revision it reflects (`None` = must (re)read everything), and the
/// balancer's reports of ejected endpoints (ids).
struct Session {
    view: View,
    revision: Option<i64>,
    ejected: UnboundedReceiver<String>,
}

/// How often stale endpoints are checked against their grace period.
const STALE_SWEEP: Duration = Duration::from_secs(1);

/// Runs discovery until `shutdown`, sending every change to `tx`.
pub async fn run(
    config: EtcdConfig,
    guard: Guard,
    tx: UnboundedSender<EndpointChange>,
    ejected: UnboundedReceiver<String>,
    metrics: DiscoveryMetrics,
    shutdown: CancellationToken,
) {
    metrics.endpoints.set(0);
    let session = Session {
        view: View::new(config.prefix.clone(), guard, tx, metrics),
        revision: None,
        ejected,
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
            let outcome = watch_once(
                config,
                &mut session.view,
                &mut session.revision,
                &mut session.ejected,
            )
            .await;
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
    ejected: &mut UnboundedReceiver<String>,
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
            if is_leaving(kv.value()) {
                continue;
            }
            if let (Some(id), Some(addr)) = (view.id_of(kv.key()), parse_addr(kv.value())) {
                current.insert(id, addr);
            }
        }
        view.resync(current, Instant::now());
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
    let mut sweep = tokio::time::interval(STALE_SWEEP);
    loop {
        let message = tokio::select! {
            message = stream.message() => message.map_err(DiscoveryError::Stream)?,
            Some(id) = ejected.recv() => {
                view.expire_stale(Instant::now(), &[id]);
                continue;
            }
            _ = sweep.tick() => {
                view.expire_stale(Instant::now(), &[]);
                continue;
            }
        };
        let Some(response) = message else {
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
                EventType::Put if is_leaving(kv.value()) => view.leave(&id),
                EventType::Put => match parse_addr(kv.value()) {
                    Some(addr) => view.upsert(id, addr),
                    None => {
                        tracing::warn!(%id, "registry value without an Addr; ignoring it");
                        view.remove(&id, Instant::now());
                    }
                },
                EventType::Delete => view.remove(&id, Instant::now()),
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
            parse_addr(br#"{"Addr":"127.0.0.1:50051","Op":0}"#),
            Some("127.0.0.1:50051".into())
        );
        // An older B's value, with a Metadata object.
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
        let (_ejected_tx, ejected_rx) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(run(
            config,
            guard(true),
            tx,
            ejected_rx,
            metrics.clone(),
            shutdown.clone(),
        ));
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

    fn guard(enabled: bool) -> Guard {
        Guard {
            enabled,
            max_loss: 0.5,
            window: Duration::from_secs(5),
            stale_grace: Duration::from_secs(60),
        }
    }

    /// A view over a fresh registry, and what it sent the balancer.
    fn view(guard: Guard) -> (View, UnboundedReceiver<EndpointChange>) {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let registry = Registry::new();
        let gauge = IntGauge::new("g", "g").expect("gauge");
        let metrics = DiscoveryMetrics::register(&registry, gauge).expect("metrics");
        (View::new("/p/".into(), guard, tx, metrics), rx)
    }

    fn sent(rx: &mut UnboundedReceiver<EndpointChange>) -> Vec<String> {
        let mut changes = Vec::new();
        while let Ok(change) = rx.try_recv() {
            changes.push(match change {
                Change::Insert(k, v) => format!("+{k}={v}"),
                Change::Remove(k) => format!("-{k}"),
            });
        }
        changes
    }

    #[test]
    fn resync_sends_only_the_difference() {
        let (mut view, mut rx) = view(guard(true));
        let now = Instant::now();
        view.upsert("a".into(), "h:1".into());
        view.upsert("b".into(), "h:2".into());
        view.resync(
            HashMap::from([("b".into(), "h:2".into()), ("c".into(), "h:3".into())]),
            now,
        );
        // New endpoints go in before old ones leave: the balancer is never
        // emptier than it has to be.
        assert_eq!(sent(&mut rx), ["+a=h:1", "+b=h:2", "+c=h:3", "-a"]);
        assert_eq!(view.metrics.endpoints.get(), 2);
        assert_eq!(view.id_of(b"/p/x"), Some("x".into()));
        assert_eq!(view.id_of(b"/other/x"), None);
    }

    #[test]
    fn one_backend_leaving_is_honoured_at_once() {
        let (mut view, mut rx) = view(guard(true));
        view.upsert("a".into(), "h:1".into());
        view.upsert("b".into(), "h:2".into());
        sent(&mut rx);
        view.remove("a", Instant::now());
        assert_eq!(sent(&mut rx), ["-a"]);
        assert_eq!(view.metrics.stale.get(), 0);
    }

    #[test]
    fn a_bulk_removal_keeps_every_endpoint_as_stale() {
        let (mut view, mut rx) = view(guard(true));
        for (id, addr) in [("a", "h:1"), ("b", "h:2"), ("c", "h:3"), ("d", "h:4")] {
            view.upsert(id.into(), addr.into());
        }
        sent(&mut rx);
        let now = Instant::now();
        // A thawed etcd revokes every lease: the deletes come one by one.
        for id in ["a", "b", "c", "d"] {
            view.remove(id, now);
        }
        // Two of four may go (max_loss 0.5); the third trips the guard, and
        // the two removed just before come back, stale.
        assert_eq!(sent(&mut rx), ["-a", "-b", "+a=h:1", "+b=h:2"]);
        assert_eq!(view.metrics.endpoints.get(), 4);
        assert_eq!(view.metrics.stale.get(), 4);
        // The Bs register again: fresh, nothing sent (same addresses).
        for (id, addr) in [("a", "h:1"), ("b", "h:2"), ("c", "h:3"), ("d", "h:4")] {
            view.upsert(id.into(), addr.into());
        }
        assert_eq!(sent(&mut rx), Vec::<String>::new());
        assert_eq!(view.metrics.stale.get(), 0);
    }

    #[test]
    fn removals_outside_the_window_do_not_add_up() {
        let (mut view, mut rx) = view(guard(true));
        for (id, addr) in [("a", "h:1"), ("b", "h:2"), ("c", "h:3"), ("d", "h:4")] {
            view.upsert(id.into(), addr.into());
        }
        sent(&mut rx);
        let now = Instant::now();
        view.remove("a", now);
        view.remove("b", now + Duration::from_secs(6));
        assert_eq!(sent(&mut rx), ["-a", "-b"]);
        assert_eq!(view.metrics.stale.get(), 0);
    }

    #[test]
    fn stale_endpoints_leave_when_they_fail_or_their_grace_ends() {
        let (mut view, mut rx) = view(guard(true));
        view.upsert("a".into(), "h:1".into());
        view.upsert("b".into(), "h:2".into());
        sent(&mut rx);
        let now = Instant::now();
        view.remove("a", now);
        view.remove("b", now);
        assert_eq!(
            sent(&mut rx),
            ["-a", "+a=h:1"],
            "the last one trips the guard"
        );
        assert_eq!(view.metrics.stale.get(), 2);
        view.expire_stale(now + Duration::from_secs(1), &["b".into()]);
        assert_eq!(sent(&mut rx), ["-b"], "a stale endpoint that failed leaves");
        view.expire_stale(now + Duration::from_secs(59), &[]);
        assert_eq!(sent(&mut rx), Vec::<String>::new());
        view.expire_stale(now + Duration::from_secs(60), &[]);
        assert_eq!(sent(&mut rx), ["-a"], "the grace period ended");
        assert_eq!(view.metrics.endpoints.get(), 0);
        assert_eq!(view.metrics.stale.get(), 0);
    }

    #[test]
    fn backends_that_say_they_leave_are_dropped_and_never_trip_the_guard() {
        assert!(is_leaving(br#"{"Op":1,"Addr":"h:1"}"#));
        assert!(!is_leaving(br#"{"Op":0,"Addr":"h:1"}"#));
        assert!(!is_leaving(br#"{"Addr":"h:1"}"#));
        let (mut view, mut rx) = view(guard(true));
        view.upsert("a".into(), "h:1".into());
        view.upsert("b".into(), "h:2".into());
        sent(&mut rx);
        // Both Bs scaled down one after the other: no bulk loss.
        view.leave("a");
        view.remove("a", Instant::now());
        view.leave("b");
        view.remove("b", Instant::now());
        assert_eq!(sent(&mut rx), ["-a", "-b"]);
        assert_eq!(view.metrics.stale.get(), 0);
    }

    #[test]
    fn a_backend_back_in_the_registry_is_not_part_of_a_later_loss() {
        let (mut view, mut rx) = view(guard(true));
        for (id, addr) in [("a", "h:1"), ("b", "h:2"), ("c", "h:3")] {
            view.upsert(id.into(), addr.into());
        }
        sent(&mut rx);
        let now = Instant::now();
        view.remove("a", now);
        view.upsert("a".into(), "h:9".into());
        view.remove("b", now);
        view.remove("c", now);
        // a re-registered at a new address: it is neither re-sent with its
        // old one nor marked stale when the guard trips on b and c.
        assert_eq!(sent(&mut rx), ["-a", "+a=h:9", "-b", "+b=h:2"]);
        assert_eq!(view.known.get("a").map(String::as_str), Some("h:9"));
        assert!(!view.stale.contains_key("a"));
        assert_eq!(view.metrics.stale.get(), 2);
    }

    #[test]
    fn without_the_guard_every_removal_is_honoured() {
        let (mut view, mut rx) = view(guard(false));
        view.upsert("a".into(), "h:1".into());
        view.upsert("b".into(), "h:2".into());
        sent(&mut rx);
        let now = Instant::now();
        view.remove("a", now);
        view.remove("b", now);
        assert_eq!(sent(&mut rx), ["-a", "-b"]);
        assert_eq!(view.metrics.endpoints.get(), 0);
    }
}
