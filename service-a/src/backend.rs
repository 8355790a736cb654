//! A's calls to B, as a tower stack around the balancer, so that handlers
//! read like the happy path (`backend.call(GetItemRequest { id }).await?`):
//!
//! ```text
//! Retry<ReadRetry, Calls>          one transparent retry of a read, with a budget
//!   Calls                          A's deadline, the outcome and its metric
//!     BackendClient<BackendChannel>  the balancer (crate::balancer): fail-fast,
//!                                    p2c, and ejection per endpoint (crate::endpoint)
//! ```

use std::{future::Future, pin::Pin, sync::Arc, task::Poll, time::Duration};

use lab_proto::v1::{
    GetItemReply, GetItemRequest, GetJobReply, GetJobRequest, SubmitJobReply, SubmitJobRequest,
    backend_client::BackendClient,
};
use prometheus::{IntCounter, IntCounterVec};
use tokio::time::Instant;
use tonic::{Code, Status};
use tower::{
    Service, ServiceExt,
    retry::{
        Policy, Retry,
        budget::{Budget, TpsBudget},
    },
};

use crate::{
    balancer::{BackendChannel, NoEndpoint},
    metrics::Metrics,
};

/// How close to A's deadline a CANCELLED from B counts as the deadline:
/// tonic's server answers CANCELLED when the `grpc-timeout` A sent runs out.
const DEADLINE_SLACK: Duration = Duration::from_millis(20);

/// How many retries the budget allows: at least `RETRY_MIN_PER_SEC` a
/// second (a crashed B fails the few calls in flight on it at once) and
/// beyond that `RETRY_RATIO` of the reads over the last `RETRY_WINDOW`, so
/// an outage of every B cannot double the load on whatever is left.
const RETRY_WINDOW: Duration = Duration::from_secs(10);
const RETRY_MIN_PER_SEC: u32 = 10;
const RETRY_RATIO: f32 = 0.2;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// One of B's methods, as a message A can send.
pub trait Rpc: Clone + Send + Sync + 'static {
    type Reply: Send + 'static;
    /// Whether B may safely receive the call twice.
    const IDEMPOTENT: bool;
    fn send(
        client: BackendClient<BackendChannel>,
        request: tonic::Request<Self>,
    ) -> BoxFuture<Result<tonic::Response<Self::Reply>, Status>>;
}

/// `impl Rpc` for one request type: its reply, whether it is idempotent,
/// and the client method that sends it.
macro_rules! rpc {
    ($request:ty => $reply:ty, idempotent: $idempotent:expr, $method:ident) => {
        impl Rpc for $request {
            type Reply = $reply;
            const IDEMPOTENT: bool = $idempotent;
            fn send(
                mut client: BackendClient<BackendChannel>,
                request: tonic::Request<Self>,
            ) -> BoxFuture<Result<tonic::Response<$reply>, Status>> {
                Box::pin(async move { client.$method(request).await })
            }
        }
    };
}

rpc!(GetItemRequest => GetItemReply, idempotent: true, get_item);
rpc!(GetJobRequest => GetJobReply, idempotent: true, get_job);
// A write: B may have applied it even when the answer was lost.
rpc!(SubmitJobRequest => SubmitJobReply, idempotent: false, submit_job);

/// One call to B: the message and the instant A stops waiting, which every
/// attempt shares.
#[derive(Debug, Clone)]
pub struct Call<R> {
    message: R,
    deadline: Instant,
    /// A's whole deadline, for messages.
    timeout: Duration,
    retried: bool,
}

/// B's answer and the instance that gave it.
#[derive(Debug)]
pub struct Served<T> {
    pub reply: T,
    pub served_by: String,
}

/// Why a call to B did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The balancer has no endpoint at all: failing at once beats waiting
    /// out the deadline for a B that is not coming.
    #[error("no B instance is registered")]
    NoEndpoint,
    /// A's deadline ran out (`served_by` when B said it gave up).
    #[error("B did not answer within {timeout:?}{}", detail.as_deref().map(|d| format!(": {d}")).unwrap_or_default())]
    Deadline {
        timeout: Duration,
        served_by: Option<String>,
        detail: Option<String>,
    },
    /// No B answered: the call failed in the transport (refused, reset,
    /// queued on a connection that got GOAWAY). A read may be retried.
    #[error("no B answered: {}", .0.message())]
    NotAnswered(#[source] Status),
    /// B answered with an error.
    #[error("B {served_by} answered {}: {}", .status.code(), .status.message())]
    Answered {
        #[source]
        status: Status,
        served_by: String,
    },
}

impl CallError {
    /// The `backend` and `code` labels of `lab_backend_calls_total`.
    fn labels(&self) -> (&str, &'static str) {
        match self {
            CallError::NoEndpoint => ("none", lab_proto::code_name(Code::Unavailable)),
            CallError::Deadline { served_by, .. } => (
                served_by.as_deref().unwrap_or("unknown"),
                lab_proto::code_name(Code::DeadlineExceeded),
            ),
            CallError::NotAnswered(status) => ("unknown", lab_proto::code_name(status.code())),
            CallError::Answered { status, served_by } => {
                (served_by.as_str(), lab_proto::code_name(status.code()))
            }
        }
    }
}

/// The innermost typed layer: sends one attempt with the time left before
/// the call's deadline (as `grpc-timeout`, and A stops waiting itself when
/// it passes), sorts the outcome and counts it.
#[derive(Clone)]
pub struct Calls {
    client: BackendClient<BackendChannel>,
    calls: IntCounterVec,
}

impl<R: Rpc> Service<Call<R>> for Calls {
    type Response = Served<R::Reply>;
    type Error = CallError;
    type Future = BoxFuture<Result<Served<R::Reply>, CallError>>;

    /// Always ready: the client waits for the balancer inside the call,
    /// where A's deadline bounds the wait.
    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), CallError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call<R>) -> Self::Future {
        let client = self.client.clone();
        let calls = self.calls.clone();
        // The handler's request span, read here where it is current.
        let traceparent = lab_common::trace::current_traceparent()
            .and_then(|v| tonic::metadata::AsciiMetadataValue::try_from(v).ok());
        Box::pin(async move {
            let mut request = tonic::Request::new(call.message);
            request.set_timeout(call.deadline.saturating_duration_since(Instant::now()));
            if let Some(value) = traceparent {
                request
                    .metadata_mut()
                    .insert(lab_common::trace::TRACEPARENT, value);
            }
            let outcome = tokio::time::timeout_at(call.deadline, R::send(client, request)).await;
            let result = match outcome {
                Err(_) => Err(CallError::Deadline {
                    timeout: call.timeout,
                    served_by: None,
                    detail: None,
                }),
                Ok(Ok(response)) => Ok(Served {
                    served_by: served_by(response.metadata()).unwrap_or_default(),
                    reply: response.into_inner(),
                }),
                Ok(Err(status)) => Err(sort(status, call.deadline, call.timeout)),
            };
            let (backend, code) = match &result {
                Ok(served) => (served.served_by.as_str(), lab_proto::code_name(Code::Ok)),
                Err(e) => e.labels(),
            };
            calls.with_label_values(&[backend, code]).inc();
            if let Err(e @ (CallError::NotAnswered(_) | CallError::NoEndpoint)) = &result {
                tracing::debug!(error = %e, "no B answered");
            }
            result
        })
    }
}

/// Sorts an error status by who produced it: the balancer, A's deadline,
/// the transport (no `served_by`), or B.
fn sort(status: Status, deadline: Instant, timeout: Duration) -> CallError {
    if std::error::Error::source(&status).is_some_and(|s| s.is::<NoEndpoint>()) {
        return CallError::NoEndpoint;
    }
    let served_by = served_by(status.metadata());
    let is_deadline = match status.code() {
        Code::DeadlineExceeded => true,
        Code::Cancelled => Instant::now() + DEADLINE_SLACK >= deadline,
        _ => false,
    };
    match served_by {
        served_by if is_deadline => CallError::Deadline {
            timeout,
            served_by,
            detail: Some(status.message().to_owned()),
        },
        Some(served_by) => CallError::Answered { status, served_by },
        None => CallError::NotAnswered(status),
    }
}

fn served_by(metadata: &tonic::metadata::MetadataMap) -> Option<String> {
    metadata
        .get(lab_proto::SERVED_BY_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Sends a read a second time when no B answered it, like gRPC clients'
/// transparent retry: at once, within the same deadline, at most once, and
/// only while the budget allows. With `lb = "etcd"` the failed endpoint is
/// already ejected, so the retry lands on another B. Writes are never
/// retried: B may have applied them.
#[derive(Clone)]
pub struct ReadRetry {
    budget: Arc<TpsBudget>,
    retries: IntCounter,
}

impl ReadRetry {
    pub fn new(retries: IntCounter) -> Self {
        Self {
            budget: Arc::new(TpsBudget::new(RETRY_WINDOW, RETRY_MIN_PER_SEC, RETRY_RATIO)),
            retries,
        }
    }
}

impl<R: Rpc> Policy<Call<R>, Served<R::Reply>, CallError> for ReadRetry {
    type Future = std::future::Ready<()>;

    fn retry(
        &mut self,
        call: &mut Call<R>,
        result: &mut Result<Served<R::Reply>, CallError>,
    ) -> Option<Self::Future> {
        if call.retried {
            return None;
        }
        self.budget.deposit();
        let nobody_answered = matches!(result, Err(CallError::NotAnswered(_)));
        if !nobody_answered || Instant::now() >= call.deadline || !self.budget.withdraw() {
            return None;
        }
        call.retried = true;
        self.retries.inc();
        Some(std::future::ready(()))
    }

    fn clone_request(&mut self, call: &Call<R>) -> Option<Call<R>> {
        (R::IDEMPOTENT && !call.retried).then(|| call.clone())
    }
}

/// What handlers call B through.
#[derive(Clone)]
pub struct Backend {
    stack: Retry<ReadRetry, Calls>,
    timeout: Duration,
}

impl Backend {
    /// The stack over `channel`, giving every call `timeout` in all.
    pub fn new(channel: BackendChannel, timeout: Duration, metrics: &Metrics) -> Self {
        let calls = Calls {
            client: BackendClient::new(channel),
            calls: metrics.backend_calls.clone(),
        };
        Self {
            stack: Retry::new(ReadRetry::new(metrics.backend_retries.clone()), calls),
            timeout,
        }
    }

    /// Calls B with A's deadline.
    pub async fn call<R: Rpc>(&self, message: R) -> Result<Served<R::Reply>, CallError> {
        let call = Call {
            message,
            deadline: Instant::now() + self.timeout,
            timeout: self.timeout,
            retried: false,
        };
        self.stack.clone().oneshot(call).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::{
        collections::VecDeque,
        sync::{
            Mutex,
            atomic::{AtomicUsize, Ordering},
        },
    };
    use tower::{buffer::Buffer, util::BoxCloneSyncService};

    use crate::balancer::{Endpoints, FailFast};

    /// The attempt outcomes a test scripts for [`Scripted`].
    #[derive(Debug, Clone, Copy)]
    enum Attempt {
        Ok,
        NotAnswered,
        Answered,
        Deadline,
        NoEndpoint,
    }

    /// Stands in for [`Calls`]: answers each attempt from a script.
    #[derive(Clone)]
    struct Scripted {
        script: Arc<Mutex<VecDeque<Attempt>>>,
        attempts: Arc<AtomicUsize>,
    }

    impl Scripted {
        fn new(script: &[Attempt]) -> Self {
            Self {
                script: Arc::new(Mutex::new(script.iter().copied().collect())),
                attempts: Arc::default(),
            }
        }
    }

    impl<R: Rpc> Service<Call<R>> for Scripted
    where
        R::Reply: Default,
    {
        type Response = Served<R::Reply>;
        type Error = CallError;
        type Future = std::future::Ready<Result<Served<R::Reply>, CallError>>;
        fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> Poll<Result<(), CallError>> {
            Poll::Ready(Ok(()))
        }
        fn call(&mut self, call: Call<R>) -> Self::Future {
            self.attempts.fetch_add(1, Ordering::SeqCst);
            let next = self.script.lock().expect("lock").pop_front();
            let unavailable = || Status::unavailable("connection refused");
            std::future::ready(match next.unwrap_or(Attempt::Ok) {
                Attempt::Ok => Ok(Served {
                    reply: R::Reply::default(),
                    served_by: "b-2".into(),
                }),
                Attempt::NotAnswered => Err(CallError::NotAnswered(unavailable())),
                Attempt::Answered => Err(CallError::Answered {
                    status: unavailable(),
                    served_by: "b-1".into(),
                }),
                Attempt::Deadline => Err(CallError::Deadline {
                    timeout: call.timeout,
                    served_by: None,
                    detail: None,
                }),
                Attempt::NoEndpoint => Err(CallError::NoEndpoint),
            })
        }
    }

    fn call<R>(message: R, timeout: Duration) -> Call<R> {
        Call {
            message,
            deadline: Instant::now() + timeout,
            timeout,
            retried: false,
        }
    }

    async fn run<R: Rpc>(script: &[Attempt], message: R) -> (usize, u64, bool)
    where
        R::Reply: Default,
    {
        let scripted = Scripted::new(script);
        let retries = IntCounter::new("r", "r").expect("metric");
        let stack = Retry::new(ReadRetry::new(retries.clone()), scripted.clone());
        let ok = stack
            .oneshot(call(message, Duration::from_secs(5)))
            .await
            .is_ok();
        (scripted.attempts.load(Ordering::SeqCst), retries.get(), ok)
    }

    #[tokio::test]
    async fn a_read_nobody_answered_is_sent_once_more() {
        let read = GetItemRequest { id: 1 };
        assert_eq!(run(&[Attempt::NotAnswered], read).await, (2, 1, true));
        let twice = [Attempt::NotAnswered, Attempt::NotAnswered];
        assert_eq!(run(&twice, read).await, (2, 1, false), "at most once");
    }

    #[tokio::test]
    async fn only_a_read_nobody_answered_is_retried() {
        let read = GetItemRequest { id: 1 };
        for answered in [Attempt::Answered, Attempt::Deadline, Attempt::NoEndpoint] {
            assert_eq!(run(&[answered], read).await, (1, 0, false), "{answered:?}");
        }
        let write = SubmitJobRequest {
            payload: "x".into(),
        };
        assert_eq!(
            run(&[Attempt::NotAnswered], write).await,
            (1, 0, false),
            "B may have applied a write"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn no_retry_once_the_deadline_has_passed() {
        let scripted = Scripted::new(&[Attempt::NotAnswered]);
        let retries = IntCounter::new("r", "r").expect("metric");
        let mut policy = ReadRetry::new(retries.clone());
        let mut late = call(GetItemRequest { id: 1 }, Duration::from_secs(1));
        tokio::time::advance(Duration::from_secs(1)).await;
        let mut result =
            Service::<Call<GetItemRequest>>::call(&mut scripted.clone(), late.clone()).await;
        assert!(policy.retry(&mut late, &mut result).is_none());
        assert_eq!(retries.get(), 0);
    }

    #[tokio::test]
    async fn the_budget_bounds_retries_when_nothing_answers() {
        let reads = 1000;
        let scripted = Scripted::new(&vec![Attempt::NotAnswered; 2 * reads]);
        let retries = IntCounter::new("r", "r").expect("metric");
        let stack = Retry::new(ReadRetry::new(retries.clone()), scripted);
        for _ in 0..reads {
            let _ = stack
                .clone()
                .oneshot(call(GetItemRequest { id: 1 }, Duration::from_secs(5)))
                .await;
        }
        let allowed = f64::from(RETRY_MIN_PER_SEC) * RETRY_WINDOW.as_secs_f64()
            + f64::from(RETRY_RATIO) * reads as f64;
        let retried = retries.get() as f64;
        assert!(
            retried > 0.0 && retried <= allowed + 1.0,
            "{retried} retries for {reads} reads (budget {allowed})"
        );
    }

    /// A balancer holding no endpoint.
    struct Empty;

    impl Endpoints for Empty {
        fn is_empty(&self) -> bool {
            true
        }
    }

    impl<Req> Service<Req> for Empty {
        type Response = http::Response<tonic::body::Body>;
        type Error = tower::BoxError;
        type Future = std::future::Pending<Result<Self::Response, tower::BoxError>>;
        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> Poll<Result<(), tower::BoxError>> {
            Poll::Pending
        }
        fn call(&mut self, _: Req) -> Self::Future {
            std::future::pending()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn with_no_endpoint_a_call_fails_at_once_and_is_not_retried() {
        let channel: BackendChannel = BoxCloneSyncService::new(
            Buffer::new(FailFast::new(Empty), 8).map_err(Status::from_error),
        );
        let registry = prometheus::Registry::new();
        let metrics = Metrics::register(&registry).expect("metrics");
        let backend = Backend::new(channel, Duration::from_secs(5), &metrics);
        let started = Instant::now();
        let error = backend
            .call(GetItemRequest { id: 1 })
            .await
            .expect_err("no endpoint");
        assert!(matches!(error, CallError::NoEndpoint), "{error:?}");
        assert_eq!(started.elapsed(), Duration::ZERO, "at once");
        assert_eq!(metrics.backend_retries.get(), 0);
        assert_eq!(
            metrics
                .backend_calls
                .with_label_values(&["none", "Unavailable"])
                .get(),
            1
        );
    }
}
