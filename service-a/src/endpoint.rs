//! One B endpoint inside A's client-side balancer (`lb = "etcd"`), as a
//! tower stack: `PendingRequests<Ejecting<Channel>>`.
//!
//! * `Channel` — a tonic channel to this one B: connect timeout and HTTP/2
//!   keepalive of about a second, so a dead or black-holed B is noticed fast.
//! * `Ejecting` — a call that fails at the transport (connection refused or
//!   reset, stream refused: no B answered) takes the endpoint out of rotation
//!   for a backoff (250 ms doubling to 5 s): its `poll_ready` stays pending,
//!   so power-of-two-choices never picks it, until the backoff ends and one
//!   call probes it again. The error becomes UNAVAILABLE, which A may retry
//!   on another endpoint.
//! * `PendingRequests` — the load the balancer compares: requests in flight.

use std::{
    future::Future,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use prometheus::IntCounterVec;
use tokio::time::{Instant, Sleep};
use tonic::transport::{Channel, Endpoint};
use tower::{
    BoxError, Service,
    load::{CompleteOnResponse, PendingRequests},
};

/// First ejection; doubles per consecutive failure.
const EJECT_MIN: Duration = Duration::from_millis(250);
const EJECT_MAX: Duration = Duration::from_secs(5);

/// The balancer's view of one B.
pub type EndpointService = PendingRequests<Ejecting<Channel>, CompleteOnResponse>;

/// Builds the stack for the B registered as `id` at `addr`.
pub fn service(
    id: &str,
    addr: &str,
    connect_timeout: Duration,
    ejections: IntCounterVec,
) -> Result<EndpointService, tonic::transport::Error> {
    let channel = Endpoint::from_shared(format!("http://{addr}"))?
        .connect_timeout(connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(1))
        .keep_alive_timeout(Duration::from_secs(1))
        .keep_alive_while_idle(true)
        .connect_lazy();
    Ok(PendingRequests::new(
        Ejecting::new(id, channel, ejections),
        CompleteOnResponse::default(),
    ))
}

#[derive(Debug, Default)]
struct Health {
    consecutive_failures: u32,
    ejected_until: Option<Instant>,
}

/// Takes an endpoint out of rotation after a transport failure.
pub struct Ejecting<S> {
    id: Arc<str>,
    inner: S,
    health: Arc<Mutex<Health>>,
    wait: Option<Pin<Box<Sleep>>>,
    ejections: IntCounterVec,
}

impl<S> Ejecting<S> {
    pub fn new(id: &str, inner: S, ejections: IntCounterVec) -> Self {
        Self {
            id: id.into(),
            inner,
            health: Arc::default(),
            wait: None,
            ejections,
        }
    }

    fn ejected_until(&self) -> Option<Instant> {
        self.health
            .lock()
            .map(|h| h.ejected_until)
            .unwrap_or(None)
            .filter(|until| *until > Instant::now())
    }
}

impl<S, Req> Service<Req> for Ejecting<S>
where
    S: Service<Req>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        if let Some(until) = self.ejected_until() {
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
        self.wait = None;
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: Req) -> Self::Future {
        let response = self.inner.call(request);
        let health = self.health.clone();
        let id = self.id.clone();
        let ejections = self.ejections.clone();
        Box::pin(async move {
            match response.await {
                Ok(response) => {
                    if let Ok(mut h) = health.lock() {
                        h.consecutive_failures = 0;
                        h.ejected_until = None;
                    }
                    Ok(response)
                }
                Err(e) => {
                    let e: BoxError = e.into();
                    // A's own deadline ran out: this B is slow, not gone.
                    // Ejecting it would also turn the 504 into a 503.
                    if is_caller_deadline(&*e) {
                        return Err(e);
                    }
                    let backoff = if let Ok(mut h) = health.lock() {
                        h.consecutive_failures = h.consecutive_failures.saturating_add(1);
                        let backoff = EJECT_MIN
                            .saturating_mul(1 << h.consecutive_failures.min(8).saturating_sub(1))
                            .min(EJECT_MAX);
                        h.ejected_until = Some(Instant::now() + backoff);
                        backoff
                    } else {
                        EJECT_MIN
                    };
                    ejections.with_label_values(&[&id]).inc();
                    tracing::warn!(backend = %id, error = %e, ?backoff, "backend ejected");
                    Err(Box::new(tonic::Status::unavailable(format!(
                        "backend {id} unreachable: {e}"
                    ))) as BoxError)
                }
            }
        })
    }
}

/// Whether `error` is tonic's client-side `grpc-timeout` running out
/// (`TimeoutExpired`, anywhere in the source chain).
fn is_caller_deadline(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<tonic::TimeoutExpired>() {
            return true;
        }
        current = e.source();
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::convert::Infallible;
    use tower::ServiceExt;

    /// A service whose every call runs out of the caller's time.
    #[derive(Clone)]
    struct Slow;

    impl Service<()> for Slow {
        type Response = ();
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: ()) -> Self::Future {
            Box::pin(async { Err(Box::new(tonic::TimeoutExpired(())) as BoxError) })
        }
    }

    #[tokio::test]
    async fn the_callers_deadline_running_out_does_not_eject() {
        let ejections =
            IntCounterVec::new(prometheus::Opts::new("e", "e"), &["backend"]).expect("metric");
        let mut svc = Ejecting::new("b-1", Slow, ejections.clone());
        let err = svc
            .ready()
            .await
            .expect("ready")
            .call(())
            .await
            .expect_err("times out");
        assert!(err.is::<tonic::TimeoutExpired>(), "passed through: {err}");
        assert_eq!(ejections.with_label_values(&["b-1"]).get(), 0);
    }

    /// A service that fails its first `failures` calls.
    #[derive(Clone)]
    struct Flaky {
        failures: Arc<Mutex<u32>>,
    }

    impl Service<()> for Flaky {
        type Response = ();
        type Error = BoxError;
        type Future = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;
        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, _: ()) -> Self::Future {
            let fail = {
                let mut left = self.failures.lock().expect("lock");
                let fail = *left > 0;
                *left = left.saturating_sub(1);
                fail
            };
            Box::pin(async move {
                if fail {
                    Err("connection refused".into())
                } else {
                    Ok::<(), Infallible>(()).map_err(|e| e.into())
                }
            })
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_failure_ejects_until_the_backoff_ends() {
        let ejections =
            IntCounterVec::new(prometheus::Opts::new("e", "e"), &["backend"]).expect("metric");
        let mut svc = Ejecting::new(
            "b-1",
            Flaky {
                failures: Arc::new(Mutex::new(1)),
            },
            ejections.clone(),
        );
        let err = svc
            .ready()
            .await
            .expect("ready")
            .call(())
            .await
            .expect_err("first call fails");
        let status = err.downcast::<tonic::Status>().expect("a Status");
        assert_eq!(status.code(), tonic::Code::Unavailable);
        assert_eq!(ejections.with_label_values(&["b-1"]).get(), 1);

        // Not ready while ejected…
        let started = Instant::now();
        svc.ready().await.expect("ready again after the backoff");
        assert!(
            started.elapsed() >= EJECT_MIN,
            "waited {:?}",
            started.elapsed()
        );
        // …and a success clears the ejection.
        svc.call(()).await.expect("probe succeeds");
        let started = Instant::now();
        svc.ready().await.expect("ready");
        assert_eq!(started.elapsed(), Duration::ZERO);
    }
}
