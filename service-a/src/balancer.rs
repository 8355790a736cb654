//! Cause 1 — how A reaches the B instances (`faults.lb`).
//!
//! * `l4` (buggy): one tonic `Channel` to HAProxy's `mode tcp` frontend. A
//!   channel holds **one** HTTP/2 connection and multiplexes every request
//!   over it; an L4 balancer only chooses a server when a connection opens,
//!   so every request of this A lands on the same B. This is the incident.
//! * `l7`: the same single channel, but to HAProxy's `mode http` h2 frontend,
//!   which terminates HTTP/2 and picks a B for every request — balanced, at
//!   the cost of one extra proxy hop.
//! * `etcd` (fixed): A discovers the Bs in etcd ([`crate::discovery`]) and
//!   balances each request itself with power-of-two-choices (tower's
//!   `p2c::Balance` over [`crate::endpoint`] stacks). No proxy hop, and the
//!   load measure is real — tonic's own `balance_channel` reports a
//!   constant load of 0, which makes its P2C a random pick. The stack is
//!   `Buffer<FailFast<Balance<…>>>` ([`balanced`]): [`FailFast`] answers at
//!   once when the balancer holds no endpoint at all.
//!
//! The load P2C compares is `service_a.balance_load`: requests in flight
//! (tower's `PendingRequests`), or tower's `PeakEwma` — in flight + 1 times
//! a latency estimate that takes every slower answer at once and decays
//! towards faster ones. In flight alone cannot tell a slow B from a fast
//! one while both are idle (they tie, and the pick is random), so a B that
//! is slow but not overloaded keeps a large share; peak-EWMA prices the
//! latency itself.
//!
//! [`Dialer`] builds a channel for any of the three, as often as `lb` flips
//! live; [`crate::live_channel`] decides which one is in force.

use std::{
    future::Future,
    hash::Hash,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use lab_common::config::{BalanceLoad, LabConfig, LbMode};
use lab_common::metrics::Registrar;
use prometheus::Registry;
use tokio_stream::{Stream, StreamExt, wrappers::UnboundedReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::{body::Body, transport::Endpoint};
use tower::{
    BoxError, Service, ServiceExt,
    balance::p2c::Balance,
    buffer::Buffer,
    discover::{Change, Discover},
    load::{CompleteOnResponse, PeakEwma, PendingRequests},
    util::BoxCloneSyncService,
};

use crate::discovery::{self, DiscoveryMetrics};

/// The service every call to B goes through, whatever `faults.lb` is. Its
/// error is already a gRPC `Status` (a concrete error type also keeps the
/// handlers' futures `Send` — a boxed `dyn Error` trips a compiler limit on
/// higher-ranked lifetimes in tonic's bounds).
pub type BackendChannel =
    BoxCloneSyncService<http::Request<Body>, http::Response<Body>, tonic::Status>;

/// TCP keepalive on the connection to the proxy. The proxy's own kernel
/// answers these probes, so a dead or unreachable proxy is noticed — but no
/// HTTP/2 ping is sent: through an L4 proxy it would reach B, and a B too
/// starved to answer within the timeout would have its connection cut and
/// re-placed by the proxy, quietly rebalancing the incident away. grpc-go,
/// the incident's client, sends no pings by default either.
const PROXY_TCP_KEEPALIVE: Duration = Duration::from_secs(10);
/// Requests waiting for the balancer.
const BALANCER_QUEUE: usize = 1024;
/// Peak-EWMA: the latency assumed for a B that has not answered yet. A
/// healthy B answers within a millisecond or two on the lab's loopback, so
/// a new B looks a few times dearer than a warm one: it is tried soon (at
/// once under load), but not flooded before it has shown its speed.
pub const PEAK_EWMA_DEFAULT_RTT: Duration = Duration::from_millis(5);
/// Peak-EWMA: the time constant over which a peak is forgotten (tower has
/// no default; Finagle and Linkerd use 10 s). The lab's runs last seconds
/// and its Bs share two cores, where a healthy B's answer often takes a few
/// ms longer than usual (and its first, which sets up the connection, more):
/// with 10 s such a peak kept a fast B out of rotation for seconds, and a B
/// 20 ms slower than the other got 1–7 % of the calls in 3 s runs at
/// 1 000 req/s; with 1 s, 2 %. While the fast B is idle the slow one is
/// probed about every τ × ln(its latency / the fast one's); it gets more
/// when calls queue on the fast one, and then it is the better pick.
pub const PEAK_EWMA_DECAY: Duration = Duration::from_secs(1);

/// Why no channel could be built.
#[derive(Debug, thiserror::Error)]
#[error("invalid backend URL {url:?}")]
pub struct BadUrl {
    url: String,
    #[source]
    source: tonic::transport::Error,
}

/// A channel for one `faults.lb` value, as [`Dialer::dial`] builds it.
pub struct Backends {
    pub channel: BackendChannel,
    /// What A dials, for logs.
    pub target: String,
    /// With `etcd`: the discovery task feeding this channel's balancer.
    pub discovery: Option<DiscoveryTask>,
}

/// The discovery task of one `etcd` channel. It has its own stop token
/// (a child of A's shutdown), so a flip away from `etcd` ends its etcd
/// session and watch while A keeps running.
pub struct DiscoveryTask {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
}

impl DiscoveryTask {
    /// Stops discovery and waits until it has, so that it no longer sets
    /// `lab_backend_endpoints` once the next channel is in force. The
    /// balancer it fed keeps the endpoints it has for the requests still
    /// queued on it.
    pub async fn stop(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// Builds A's channel for any `faults.lb`, as often as the switch flips.
/// Everything that can be wrong is checked once, at start-up (both proxy
/// URLs, the metrics), so a live flip cannot fail half-way.
pub struct Dialer {
    l4: (String, Endpoint),
    l7: (String, Endpoint),
    etcd: lab_common::config::EtcdConfig,
    guard: discovery::Guard,
    connect_timeout: Duration,
    balance_load: BalanceLoad,
    discovery_metrics: DiscoveryMetrics,
    ejections: prometheus::IntCounterVec,
}

impl Dialer {
    /// Registers the balancer's metrics; `endpoints` is `lab_backend_endpoints`.
    pub fn new(
        config: &LabConfig,
        registry: &Registry,
        endpoints: prometheus::IntGauge,
    ) -> anyhow::Result<Self> {
        let a = &config.service_a;
        Ok(Self {
            l4: proxy_endpoint(&a.backend_l4_url, a.connect_timeout)?,
            l7: proxy_endpoint(&a.backend_l7_url, a.connect_timeout)?,
            etcd: config.etcd.clone(),
            guard: discovery::Guard::from_config(a),
            connect_timeout: a.connect_timeout,
            balance_load: a.balance_load,
            discovery_metrics: DiscoveryMetrics::register(registry, endpoints)?,
            ejections: Registrar(registry).int_counter_vec(
                "lab_backend_ejections_total",
                "Times an endpoint was taken out of A's balancer after transport failures.",
                &["backend"],
            )?,
        })
    }

    /// A new channel for `lb`. With `etcd` it also starts its discovery
    /// task, which stops with `shutdown` or [`DiscoveryTask::stop`].
    pub fn dial(&self, lb: LbMode, shutdown: &CancellationToken) -> Backends {
        match lb {
            LbMode::L4 => proxy(&self.l4),
            LbMode::L7 => proxy(&self.l7),
            LbMode::Etcd => self.client_side(shutdown),
        }
    }

    /// `lab_backend_endpoints` once a channel for `lb` is in force: a proxy
    /// is a balancer of one; discovery counts its own endpoints.
    pub fn in_force(&self, lb: LbMode) {
        if lb != LbMode::Etcd {
            self.discovery_metrics.endpoints.set(1);
        }
    }

    /// Discovery from etcd feeding tower's power-of-two-choices balancer,
    /// comparing the load `service_a.balance_load` names.
    fn client_side(&self, shutdown: &CancellationToken) -> Backends {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let (ejected_tx, ejected_rx) = tokio::sync::mpsc::unbounded_channel();
        let stop = shutdown.child_token();
        let task = lab_common::tasks::spawn(
            "discovery.watch",
            discovery::run(
                self.etcd.clone(),
                self.guard.clone(),
                tx,
                ejected_rx,
                self.discovery_metrics.clone(),
                stop.clone(),
            ),
        );
        let connect_timeout = self.connect_timeout;
        let ejections = self.ejections.clone();
        let changes = UnboundedReceiverStream::new(rx).filter_map(move |change| match change {
            Change::Insert(id, addr) => {
                match crate::endpoint::service(
                    &id,
                    &addr,
                    connect_timeout,
                    ejections.clone(),
                    ejected_tx.clone(),
                ) {
                    Ok(svc) => Some(Ok::<_, BoxError>(Change::Insert(id, svc))),
                    Err(e) => {
                        tracing::warn!(%id, %addr, error = %e, "unusable backend address; skipped");
                        None
                    }
                }
            }
            Change::Remove(id) => Some(Ok(Change::Remove(id))),
        });
        let channel = balanced(self.balance_load, changes).map_err(tonic::Status::from_error);
        Backends {
            channel: BoxCloneSyncService::new(channel),
            target: format!(
                "etcd {} {}",
                self.etcd.endpoints.join(","),
                self.etcd.prefix
            ),
            discovery: Some(DiscoveryTask { stop, task }),
        }
    }
}

/// What [`balanced`] returns: a cloneable handle on the balancer, whose
/// buffer task drives it.
pub type Balanced<Req, Rsp> =
    Buffer<Req, Pin<Box<dyn Future<Output = Result<Rsp, BoxError>> + Send>>>;

/// Power-of-two-choices over the endpoints `changes` brings, comparing the
/// load `measure` names, behind [`FailFast`] and a buffer of
/// [`BALANCER_QUEUE`] requests. Each endpoint is wrapped in the load
/// measure as it is inserted, so the rest of the stack does not depend on
/// which one is in force.
pub fn balanced<S, Req>(
    measure: BalanceLoad,
    changes: impl Stream<Item = Result<Change<String, S>, BoxError>> + Send + Unpin + 'static,
) -> Balanced<Req, S::Response>
where
    S: Service<Req> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
    Req: Send + 'static,
{
    match measure {
        BalanceLoad::Pending => {
            let measured = changes.map(|change| {
                change.map(|c| {
                    wrap(c, |s| {
                        PendingRequests::new(s, CompleteOnResponse::default())
                    })
                })
            });
            Buffer::new(FailFast::new(Balance::new(measured)), BALANCER_QUEUE)
        }
        BalanceLoad::PeakEwma => {
            let decay_ns = PEAK_EWMA_DECAY.as_nanos() as f64;
            let measured = changes.map(move |change| {
                change.map(|c| {
                    wrap(c, |s| {
                        PeakEwma::new(
                            s,
                            PEAK_EWMA_DEFAULT_RTT,
                            decay_ns,
                            CompleteOnResponse::default(),
                        )
                    })
                })
            });
            Buffer::new(FailFast::new(Balance::new(measured)), BALANCER_QUEUE)
        }
    }
}

/// The same discovery change with its service wrapped.
fn wrap<S, T>(change: Change<String, S>, f: impl FnOnce(S) -> T) -> Change<String, T> {
    match change {
        Change::Insert(id, svc) => Change::Insert(id, f(svc)),
        Change::Remove(id) => Change::Remove(id),
    }
}

/// The endpoint of an HAProxy frontend, parsed (not dialled).
fn proxy_endpoint(url: &str, connect_timeout: Duration) -> Result<(String, Endpoint), BadUrl> {
    let endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|source| BadUrl {
            url: url.to_string(),
            source,
        })?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .tcp_keepalive(Some(PROXY_TCP_KEEPALIVE));
    Ok((url.to_string(), endpoint))
}

/// One lazy channel to HAProxy: a balancer of one, the proxy.
fn proxy((url, endpoint): &(String, Endpoint)) -> Backends {
    let channel = endpoint
        .connect_lazy()
        .map_err(|e| tonic::Status::from_error(Box::new(e)));
    Backends {
        channel: BoxCloneSyncService::new(channel),
        target: url.clone(),
        discovery: None,
    }
}

/// The balancer has no endpoint at all. Travels as the source of the
/// UNAVAILABLE status [`FailFast`] answers, so the caller can tell it from
/// an endpoint that failed ([`crate::backend`] counts it as `backend="none"`).
#[derive(Debug, thiserror::Error)]
#[error("no B instance is registered")]
pub struct NoEndpoint;

impl NoEndpoint {
    fn status() -> tonic::Status {
        let mut status = tonic::Status::unavailable(NoEndpoint.to_string());
        status.set_source(Arc::new(NoEndpoint));
        status
    }
}

/// A balancer that can say whether it holds any endpoint.
pub trait Endpoints {
    fn is_empty(&self) -> bool;
}

impl<D, Req> Endpoints for Balance<D, Req>
where
    D: Discover,
    D::Key: Hash,
    D::Service: Service<Req>,
    <D::Service as Service<Req>>::Error: Into<BoxError>,
{
    fn is_empty(&self) -> bool {
        Balance::is_empty(self)
    }
}

/// Fails a call at once when the balancer holds no endpoint at all, instead
/// of letting it wait out A's deadline for a B that is not coming. It asks
/// the balancer after the balancer applied the pending discovery changes
/// (its `poll_ready` does that), so a B that just registered is not missed.
/// When every endpoint is only ejected the call waits: one will be probed
/// again within the backoff.
pub struct FailFast<S> {
    inner: S,
    fail_next: bool,
}

impl<S> FailFast<S> {
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            fail_next: false,
        }
    }
}

impl<S, Req> Service<Req> for FailFast<S>
where
    S: Service<Req> + Endpoints,
    S::Response: Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        match self.inner.poll_ready(cx) {
            Poll::Pending if self.inner.is_empty() => {
                self.fail_next = true;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
            Poll::Ready(ready) => {
                self.fail_next = false;
                Poll::Ready(ready.map_err(Into::into))
            }
        }
    }

    fn call(&mut self, request: Req) -> Self::Future {
        if std::mem::take(&mut self.fail_next) {
            return Box::pin(std::future::ready(Err(
                Box::new(NoEndpoint::status()) as BoxError
            )));
        }
        let response = self.inner.call(request);
        Box::pin(async move { response.await.map_err(Into::into) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A balancer whose endpoints, if any, are all ejected.
    struct NoneReady {
        endpoints: usize,
    }

    impl Endpoints for NoneReady {
        fn is_empty(&self) -> bool {
            self.endpoints == 0
        }
    }

    impl Service<()> for NoneReady {
        type Response = ();
        type Error = BoxError;
        type Future = std::future::Ready<Result<(), BoxError>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Pending
        }
        fn call(&mut self, _: ()) -> Self::Future {
            unreachable!("never ready")
        }
    }

    fn poll_ready(svc: &mut FailFast<NoneReady>) -> Poll<Result<(), BoxError>> {
        svc.poll_ready(&mut Context::from_waker(std::task::Waker::noop()))
    }

    #[tokio::test]
    async fn with_no_endpoint_the_call_fails_at_once_as_no_endpoint() {
        let mut svc = FailFast::new(NoneReady { endpoints: 0 });
        assert!(matches!(poll_ready(&mut svc), Poll::Ready(Ok(()))));
        let error = svc.call(()).await.expect_err("fails");
        let status = error.downcast::<tonic::Status>().expect("a Status");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert!(
            std::error::Error::source(&*status).is_some_and(|s| s.is::<NoEndpoint>()),
            "{status:?}"
        );
    }

    #[test]
    fn with_every_endpoint_ejected_the_call_waits() {
        let mut svc = FailFast::new(NoneReady { endpoints: 2 });
        assert!(poll_ready(&mut svc).is_pending());
    }

    /// An in-process B that answers with its name after `delay`.
    struct Delayed {
        name: &'static str,
        delay: Duration,
    }

    impl Service<()> for Delayed {
        type Response = &'static str;
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<&'static str, BoxError>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: ()) -> Self::Future {
            let (name, delay) = (self.name, self.delay);
            Box::pin(async move {
                tokio::time::sleep(delay).await;
                Ok(name)
            })
        }
    }

    /// Sends `calls` calls one after the other through the balancer that
    /// `measure` builds over a B answering in 1 ms and one answering in
    /// 20 ms, and returns how many the slow one answered. Each call waits
    /// for the previous answer, so both Bs are idle whenever P2C picks:
    /// what decides is the load measure alone.
    async fn answered_by_the_slow_b(measure: BalanceLoad, calls: usize) -> usize {
        let bs = [("fast", 1), ("slow", 20)].map(|(name, ms)| {
            Ok(Change::Insert(
                name.to_string(),
                Delayed {
                    name,
                    delay: Duration::from_millis(ms),
                },
            ))
        });
        let changes = tokio_stream::iter(bs).chain(tokio_stream::pending());
        let mut balancer = balanced(measure, changes);
        let mut slow = 0;
        for _ in 0..calls {
            let name = balancer.ready().await.unwrap().call(()).await.unwrap();
            slow += usize::from(name == "slow");
        }
        slow
    }

    #[tokio::test(start_paused = true)]
    async fn with_requests_in_flight_an_idle_slow_b_gets_about_half_the_calls() {
        let slow = answered_by_the_slow_b(BalanceLoad::Pending, 200).await;
        assert!((60..=140).contains(&slow), "{slow} of 200 on the slow B");
    }

    #[tokio::test(start_paused = true)]
    async fn with_peak_ewma_an_idle_slow_b_gets_only_probes() {
        let slow = answered_by_the_slow_b(BalanceLoad::PeakEwma, 200).await;
        assert!(slow <= 10, "{slow} of 200 on the slow B");
    }
}
