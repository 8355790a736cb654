//! One B endpoint inside A's client-side balancer (`lb = "etcd"`), as a
//! tower stack: `Ejection<Channel>`, which the balancer wraps in the load
//! measure it compares (`crate::balancer::balanced`).
//!
//! * `Channel` — a tonic channel to this one B: connect timeout and HTTP/2
//!   keepalive of about a second, so a dead or black-holed B is noticed fast.
//! * [`Ejection`] — a circuit breaker on transport failures (no B answered).
//!   After [`Verdict::Gone`] or [`TIMEOUT_THRESHOLD`] consecutive timeouts the
//!   endpoint is ejected for a backoff (250 ms doubling to 5 s): its
//!   `poll_ready` stays pending, so power-of-two-choices never picks it. When
//!   the backoff ends it is half-open: exactly one call probes it while
//!   `poll_ready` stays pending for every other; the probe's success closes
//!   the circuit, its failure ejects again for twice as long. The failed
//!   call's error becomes UNAVAILABLE, which A's read retry
//!   ([`crate::backend`]) sends to another endpoint.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError},
    task::{Context, Poll, Waker},
    time::Duration,
};

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use prometheus::IntCounterVec;
use tokio::{
    sync::mpsc::UnboundedSender,
    time::{Instant, Sleep},
};
use tonic::transport::{Channel, Endpoint};
use tower::{BoxError, Service};

/// Ejection lengths: the first is short (a restarting B is back quickly),
/// each further one without a success in between doubles, up to a cap that
/// keeps a long-dead B probed now and then until its lease removes it.
const EJECT_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(250))
    .with_max_delay(Duration::from_secs(5))
    .with_factor(2.0)
    .without_max_times();
/// The cap of [`EJECT_BACKOFF`], should its iterator ever end.
const EJECT_MAX: Duration = Duration::from_secs(5);

/// Consecutive connect timeouts that eject an endpoint.
///
/// A refused or reset connection is proof: nothing listens, or the process
/// under the connection died. It ejects at once ([`Verdict::Gone`]) — every
/// further call would fail the same way, and because such calls fail in
/// microseconds the endpoint looks least loaded, so power-of-two-choices
/// would send it most of the traffic, one failure (and one retry) each.
/// A connect timeout is not proof: a B whose accept backlog overflowed for a
/// moment, or a dropped SYN, looks the same as a dead host. Each one costs a
/// full connect timeout (about a second), so waiting for a third before
/// ejecting costs a handful of calls, not a flood, and keeps one slow
/// connect from taking a healthy B out of rotation.
pub const TIMEOUT_THRESHOLD: u32 = 3;

/// The balancer's view of one B, before its load measure.
pub type EndpointService = Ejection<Channel>;

/// Builds the stack for the B registered as `id` at `addr`.
pub fn service(
    id: &str,
    addr: &str,
    connect_timeout: Duration,
    ejections: IntCounterVec,
    report: UnboundedSender<String>,
) -> Result<EndpointService, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(Ejection::new(id, channel, ejections).reporting_to(report))
}

/// What a failed call says about its endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A's own deadline ran out (tonic's `grpc-timeout`): this B is slow,
    /// not gone. Ejecting it would also turn A's 504 into a 503.
    CallerDeadline,
    /// The connection attempt timed out: counts toward [`TIMEOUT_THRESHOLD`].
    TimedOut,
    /// Refused, reset, closed — any other transport failure: ejects at once.
    Gone,
}

impl Verdict {
    /// Reads the verdict from the error's source chain.
    pub fn of(error: &(dyn std::error::Error + 'static)) -> Self {
        let mut timed_out = false;
        let mut current = Some(error);
        while let Some(e) = current {
            if e.is::<tonic::TimeoutExpired>() {
                return Verdict::CallerDeadline;
            }
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|io| io.kind() == std::io::ErrorKind::TimedOut)
            {
                timed_out = true;
            }
            current = e.source();
        }
        if timed_out {
            Verdict::TimedOut
        } else {
            Verdict::Gone
        }
    }
}

/// The circuit of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Circuit {
    /// In rotation; `timeouts` is the run of consecutive connect timeouts.
    Closed { timeouts: u32 },
    /// Out of rotation until the backoff ends.
    Ejected { until: Instant },
    /// The backoff ended: the next call is the probe; while it runs
    /// (`probing`) every other call keeps away.
    HalfOpen { probing: bool },
}

/// Whether the balancer may send a call now.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Now,
    After(Instant),
    AfterProbe,
}

/// How a call ended, for the circuit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Success,
    Failure(Verdict),
    /// Dropped before it ended (A stopped waiting): says nothing.
    Abandoned,
}

/// The circuit plus what it needs to move: the backoff of the next
/// ejection and the balancer task waiting for a probe to end.
#[derive(Debug)]
struct Health {
    circuit: Circuit,
    backoff: ExponentialBackoff,
    waiting_for_probe: Option<Waker>,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            circuit: Circuit::Closed { timeouts: 0 },
            backoff: EJECT_BACKOFF.build(),
            waiting_for_probe: None,
        }
    }
}

impl Health {
    fn admit(&mut self, now: Instant, waker: &Waker) -> Admission {
        match self.circuit {
            Circuit::Closed { .. } | Circuit::HalfOpen { probing: false } => Admission::Now,
            Circuit::Ejected { until } if now < until => Admission::After(until),
            Circuit::Ejected { .. } => {
                self.circuit = Circuit::HalfOpen { probing: false };
                Admission::Now
            }
            Circuit::HalfOpen { probing: true } => {
                self.waiting_for_probe = Some(waker.clone());
                Admission::AfterProbe
            }
        }
    }

    /// Records that a call was sent; true when it is the half-open probe.
    fn dispatch(&mut self) -> bool {
        match &mut self.circuit {
            Circuit::HalfOpen { probing } if !*probing => {
                *probing = true;
                true
            }
            _ => false,
        }
    }

    /// Moves the circuit on a call's outcome; returns the ejection's length
    /// when this outcome ejected the endpoint.
    ///
    /// Only the probe moves an open circuit: a call sent before the
    /// ejection that ends after it belongs to the incident that ejected it.
    fn settle(&mut self, probe: bool, outcome: Outcome, now: Instant) -> Option<Duration> {
        let ejected = match (self.circuit, outcome) {
            (_, Outcome::Abandoned | Outcome::Failure(Verdict::CallerDeadline)) => {
                if probe {
                    self.circuit = Circuit::HalfOpen { probing: false };
                }
                None
            }
            (Circuit::Closed { .. }, Outcome::Success) => {
                self.circuit = Circuit::Closed { timeouts: 0 };
                None
            }
            (Circuit::Closed { timeouts }, Outcome::Failure(Verdict::TimedOut))
                if timeouts + 1 < TIMEOUT_THRESHOLD =>
            {
                self.circuit = Circuit::Closed {
                    timeouts: timeouts + 1,
                };
                None
            }
            (Circuit::Closed { .. }, Outcome::Failure(_)) => Some(self.eject(now)),
            (_, Outcome::Success) if probe => {
                self.circuit = Circuit::Closed { timeouts: 0 };
                self.backoff = EJECT_BACKOFF.build();
                None
            }
            (_, Outcome::Failure(_)) if probe => Some(self.eject(now)),
            _ => None,
        };
        if probe && let Some(waker) = self.waiting_for_probe.take() {
            waker.wake();
        }
        ejected
    }

    fn eject(&mut self, now: Instant) -> Duration {
        let backoff = self.backoff.next().unwrap_or(EJECT_MAX);
        self.circuit = Circuit::Ejected {
            until: now + backoff,
        };
        backoff
    }
}

/// Takes an endpoint out of rotation after transport failures (the module
/// doc says when, and how it comes back).
pub struct Ejection<S> {
    id: Arc<str>,
    inner: S,
    health: Arc<Mutex<Health>>,
    wait: Option<Pin<Box<Sleep>>>,
    ejections: IntCounterVec,
    /// Who else hears of each ejection (discovery: a stale endpoint that
    /// fails leaves the balancer).
    report: Option<UnboundedSender<String>>,
}

impl<S> Ejection<S> {
    pub fn new(id: &str, inner: S, ejections: IntCounterVec) -> Self {
        Self {
            id: id.into(),
            inner,
            health: Arc::default(),
            wait: None,
            ejections,
            report: None,
        }
    }

    /// Sends this endpoint's id to `report` on every ejection.
    pub fn reporting_to(mut self, report: UnboundedSender<String>) -> Self {
        self.report = Some(report);
        self
    }
}

/// The health of an endpoint, locked. A panic while it was held cannot
/// leave it half-updated (every update is a single assignment), so a
/// poisoned lock is still good to use.
fn lock(health: &Mutex<Health>) -> std::sync::MutexGuard<'_, Health> {
    health.lock().unwrap_or_else(PoisonError::into_inner)
}

impl<S, Req> Service<Req> for Ejection<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            let admission = lock(&self.health).admit(Instant::now(), cx.waker());
            match admission {
                Admission::Now => break,
                Admission::AfterProbe => return Poll::Pending,
                Admission::After(until) => {
                    let wait = self
                        .wait
                        .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(until)));
                    if wait.deadline() != until {
                        wait.as_mut().reset(until);
                    }
                    if wait.as_mut().poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                }
            }
        }
        self.wait = None;
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let probe = lock(&self.health).dispatch();
        let mut settle = Settle {
            health: self.health.clone(),
            probe,
            settled: false,
        };
        let response = self.inner.call(request);
        let id = self.id.clone();
        let ejections = self.ejections.clone();
        let report = self.report.clone();
        Box::pin(async move {
            let error: BoxError = match response.await {
                Ok(response) => {
                    settle.settle(Outcome::Success);
                    return Ok(response);
                }
                Err(e) => e.into(),
            };
            let verdict = Verdict::of(&*error);
            let ejected = settle.settle(Outcome::Failure(verdict));
            if verdict == Verdict::CallerDeadline {
                return Err(error);
            }
            if let Some(backoff) = ejected {
                ejections.with_label_values(&[&id]).inc();
                if let Some(report) = &report {
                    let _ = report.send(id.to_string());
                }
                tracing::warn!(backend = %id, error = %error, ?verdict, ?backoff, probe, "backend ejected");
            }
            Err(Box::new(tonic::Status::unavailable(format!(
                "backend {id} unreachable: {error}"
            ))) as BoxError)
        })
    }
}

/// Settles a call's outcome exactly once — also when its future is dropped
/// before the end (A stopped waiting), so an abandoned probe frees the
/// half-open slot instead of keeping the endpoint out forever.
struct Settle {
    health: Arc<Mutex<Health>>,
    probe: bool,
    settled: bool,
}

impl Settle {
    /// Returns the ejection's length if this outcome ejected the endpoint.
    fn settle(&mut self, outcome: Outcome) -> Option<Duration> {
        self.settled = true;
        lock(&self.health).settle(self.probe, outcome, Instant::now())
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        if !self.settled {
            lock(&self.health).settle(self.probe, Outcome::Abandoned, Instant::now());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        io,
        sync::atomic::{AtomicBool, Ordering},
        task::Wake,
    };
    use tokio::sync::oneshot;

    /// How the test ends one open call.
    type Answer = oneshot::Sender<Result<(), BoxError>>;

    /// A service whose every call waits for the test to end it.
    #[derive(Clone, Default)]
    struct Remote {
        calls: Arc<Mutex<Vec<Answer>>>,
    }

    impl Remote {
        /// Ends the oldest call still open.
        fn answer(&self, outcome: Result<(), BoxError>) {
            let mut calls = self.calls.lock().expect("lock");
            assert!(!calls.is_empty(), "no call is open");
            let _ = calls.remove(0).send(outcome);
        }

        fn open_calls(&self) -> usize {
            self.calls.lock().expect("lock").len()
        }
    }

    impl Service<()> for Remote {
        type Response = ();
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: ()) -> Self::Future {
            let (tx, rx) = oneshot::channel();
            self.calls.lock().expect("lock").push(tx);
            Box::pin(async move { rx.await.unwrap_or_else(|_| Err("test dropped".into())) })
        }
    }

    fn refused() -> BoxError {
        Box::new(io::Error::from(io::ErrorKind::ConnectionRefused))
    }

    fn connect_timeout() -> BoxError {
        Box::new(io::Error::from(io::ErrorKind::TimedOut))
    }

    fn caller_deadline() -> BoxError {
        Box::new(tonic::TimeoutExpired(()))
    }

    #[derive(Default)]
    struct Flag(AtomicBool);
    impl Wake for Flag {
        fn wake(self: Arc<Self>) {
            self.0.store(true, Ordering::SeqCst);
        }
    }

    struct Harness {
        remote: Remote,
        svc: Ejection<Remote>,
        ejections: IntCounterVec,
    }

    impl Harness {
        fn new() -> Self {
            let remote = Remote::default();
            let ejections =
                IntCounterVec::new(prometheus::Opts::new("e", "e"), &["backend"]).expect("metric");
            let svc = Ejection::new("b-1", remote.clone(), ejections.clone());
            Self {
                remote,
                svc,
                ejections,
            }
        }

        fn ready_with(&mut self, waker: &Waker) -> bool {
            let mut cx = Context::from_waker(waker);
            match self.svc.poll_ready(&mut cx) {
                Poll::Ready(result) => {
                    result.expect("never fails");
                    true
                }
                Poll::Pending => false,
            }
        }

        fn ready(&mut self) -> bool {
            self.ready_with(Waker::noop())
        }

        /// Sends a call the balancer would send (only when ready).
        fn send(&mut self) -> tokio::task::JoinHandle<Result<(), BoxError>> {
            assert!(self.ready(), "the balancer only calls a ready endpoint");
            let call = self.svc.call(());
            tokio::spawn(call)
        }

        /// One whole call ending with `outcome`.
        async fn call_ending(&mut self, outcome: Result<(), BoxError>) -> Result<(), BoxError> {
            let call = self.send();
            tokio::task::yield_now().await;
            self.remote.answer(outcome);
            call.await.expect("call task")
        }

        fn ejections(&self) -> u64 {
            self.ejections.with_label_values(&["b-1"]).get()
        }
    }

    #[test]
    fn verdicts_read_the_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("transport error")]
        struct Wrapped(#[source] BoxError);
        assert_eq!(
            Verdict::of(&Wrapped(caller_deadline())),
            Verdict::CallerDeadline
        );
        assert_eq!(Verdict::of(&Wrapped(connect_timeout())), Verdict::TimedOut);
        assert_eq!(Verdict::of(&Wrapped(refused())), Verdict::Gone);
        assert_eq!(
            Verdict::of(&Wrapped("h2 protocol error".into())),
            Verdict::Gone
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_refused_connection_ejects_at_once_until_the_backoff_ends() {
        let mut h = Harness::new();
        let err = h.call_ending(Err(refused())).await.expect_err("fails");
        let status = err.downcast::<tonic::Status>().expect("a Status");
        assert_eq!(status.code(), tonic::Code::Unavailable, "A may retry it");
        assert_eq!(h.ejections(), 1);
        assert!(!h.ready(), "ejected");
        tokio::time::advance(Duration::from_millis(249)).await;
        assert!(!h.ready(), "still ejected");
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(h.ready(), "half-open after 250 ms");
    }

    #[tokio::test(start_paused = true)]
    async fn connect_timeouts_eject_at_the_threshold_and_a_success_resets_the_run() {
        let mut h = Harness::new();
        for _ in 1..TIMEOUT_THRESHOLD {
            h.call_ending(Err(connect_timeout()))
                .await
                .expect_err("fails");
            assert!(h.ready(), "below the threshold it stays in rotation");
        }
        h.call_ending(Ok(())).await.expect("succeeds");
        for _ in 1..TIMEOUT_THRESHOLD {
            h.call_ending(Err(connect_timeout()))
                .await
                .expect_err("fails");
        }
        assert!(h.ready(), "the success started the run over");
        assert_eq!(h.ejections(), 0);
        h.call_ending(Err(connect_timeout()))
            .await
            .expect_err("fails");
        assert!(!h.ready(), "ejected at the threshold");
        assert_eq!(h.ejections(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_callers_deadline_running_out_is_not_a_failure() {
        let mut h = Harness::new();
        for _ in 0..10 {
            let err = h
                .call_ending(Err(caller_deadline()))
                .await
                .expect_err("fails");
            assert!(err.is::<tonic::TimeoutExpired>(), "passed through: {err}");
        }
        assert!(h.ready());
        assert_eq!(h.ejections(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn half_open_lets_exactly_one_probe_through_and_its_success_closes() {
        let mut h = Harness::new();
        h.call_ending(Err(refused())).await.expect_err("fails");
        tokio::time::advance(Duration::from_millis(250)).await;

        let probe = h.send();
        tokio::task::yield_now().await;
        assert!(!h.ready(), "no second call while the probe runs");
        tokio::time::advance(Duration::from_secs(60)).await;
        let flag = Arc::new(Flag::default());
        let waker = Waker::from(flag.clone());
        assert!(!h.ready_with(&waker), "however long the probe takes");
        assert_eq!(h.remote.open_calls(), 1);

        h.remote.answer(Ok(()));
        probe.await.expect("task").expect("probe succeeds");
        assert!(flag.0.load(Ordering::SeqCst), "the balancer is woken");
        assert!(h.ready(), "closed");
        // Closed means reset: the next refusal ejects for 250 ms again.
        h.call_ending(Err(refused())).await.expect_err("fails");
        tokio::time::advance(Duration::from_millis(250)).await;
        assert!(h.ready());
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_ejects_again_for_twice_as_long_up_to_5s() {
        let mut h = Harness::new();
        h.call_ending(Err(refused())).await.expect_err("fails");
        let mut backoff = Duration::from_millis(250);
        for _ in 0..7 {
            tokio::time::advance(backoff - Duration::from_millis(1)).await;
            assert!(!h.ready(), "ejected for {backoff:?}");
            tokio::time::advance(Duration::from_millis(1)).await;
            assert!(h.ready(), "half-open after {backoff:?}");
            h.call_ending(Err(refused()))
                .await
                .expect_err("probe fails");
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
        assert_eq!(backoff, Duration::from_secs(5));
        assert_eq!(h.ejections(), 8);
    }

    #[tokio::test(start_paused = true)]
    async fn calls_sent_before_the_ejection_do_not_move_it() {
        let mut h = Harness::new();
        let early = [h.send(), h.send(), h.send()];
        tokio::task::yield_now().await;
        h.remote.answer(Err(refused()));
        h.remote.answer(Err(refused()));
        h.remote.answer(Ok(()));
        for call in early {
            let _ = call.await.expect("task");
        }
        assert_eq!(h.ejections(), 1, "one incident, one ejection");
        assert!(!h.ready(), "a late success does not close the circuit");
        tokio::time::advance(Duration::from_millis(250)).await;
        assert!(h.ready(), "and a late failure does not extend it");
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_or_timed_out_probe_frees_the_slot() {
        let mut h = Harness::new();
        h.call_ending(Err(refused())).await.expect_err("fails");
        tokio::time::advance(Duration::from_millis(250)).await;

        assert!(h.ready());
        let probe = h.svc.call(());
        assert!(!h.ready(), "probing");
        drop(probe);
        assert!(h.ready(), "A stopped waiting: another call may probe");
        h.remote.answer(Ok(())); // the dropped call's answer goes nowhere

        h.call_ending(Err(caller_deadline()))
            .await
            .expect_err("fails");
        assert!(h.ready(), "a slow probe is no verdict either");
        assert_eq!(h.ejections(), 1);
    }
}
