//! Cause 3 of the incident (requests served long after their caller gave
//! up) at A's front door: whether A bounds the requests it works on
//! (`faults.deadline`, the switch B reads for the same cause), both forms
//! side by side.
//!
//! * `ignore` (the incident): A takes every request that arrives. Past what
//!   the stack can serve, requests queue — in A's tasks, in its calls to B,
//!   in B — each waiting up to A's deadline; latency climbs to the deadline
//!   and the work done for callers that already gave up crowds out the
//!   work for those still waiting.
//! * `propagate` (the fix): at most `service_a.max_concurrent_requests`
//!   requests are in A at once; one more is answered 503 `overloaded` at
//!   once, before it costs a call to B. The callers over capacity learn it
//!   in microseconds (and can retry elsewhere or later), and the requests
//!   admitted keep the latency of a stack at capacity.
//!
//! The switch is read per request, as B reads it, so `PUT /faults` on A
//! applies to the next request; requests admitted under `ignore` hold no
//! permit, so right after a flip to `propagate` A may have those and the
//! limit's worth more. The limit is a semaphore: a request holds a permit
//! from admission until its answer is built — also while its body is still
//! arriving, which is why a request may hold one for at most
//! `header_read_timeout` + `backend_timeout` before it is answered 408
//! (`api::RequestLimits`).

use std::sync::Arc;

use axum::{
    extract::{Request, State},
    middleware::Next,
    response::{IntoResponse, Response},
};
use lab_common::{config::DeadlineMode, faults::LiveFaults};
use prometheus::IntCounter;
use tokio::sync::Semaphore;

use crate::api::ApiError;

/// What admission needs, shared by every request.
#[derive(Clone)]
pub struct Admission {
    limiter: Arc<Semaphore>,
    max_concurrent: u32,
    faults: LiveFaults,
    /// `lab_http_shed_total`.
    shed: IntCounter,
}

impl Admission {
    pub fn new(max_concurrent: u32, faults: LiveFaults, shed: IntCounter) -> Self {
        Self {
            limiter: Arc::new(Semaphore::new(max_concurrent as usize)),
            max_concurrent,
            faults,
            shed,
        }
    }
}

/// Middleware: admits the request, or sheds it under `propagate` when
/// `max_concurrent` requests are already in A.
pub async fn admit(State(admission): State<Admission>, request: Request, next: Next) -> Response {
    match admission.faults.current().deadline {
        DeadlineMode::Ignore => next.run(request).await,
        DeadlineMode::Propagate => {
            let Ok(_permit) = admission.limiter.try_acquire() else {
                admission.shed.inc();
                return ApiError::overloaded(admission.max_concurrent).into_response();
            };
            next.run(request).await
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use axum::{Router, body::Body, middleware, routing::get};
    use http::StatusCode;
    use lab_common::{
        config::{Faults, Mode},
        faults::Switch,
    };
    use tokio::sync::Notify;
    use tower::ServiceExt;

    use super::*;

    /// A router with room for one request, whose one route counts the
    /// requests that reached it and holds them until `release`.
    struct App {
        router: Router,
        faults: LiveFaults,
        shed: IntCounter,
        entered: Arc<AtomicUsize>,
        release: Arc<Notify>,
    }

    impl App {
        fn new(mode: Mode) -> Self {
            let registry = prometheus::Registry::new();
            let faults = LiveFaults::new(
                "service-a",
                Faults::preset(mode),
                Switch::SERVICE_A,
                &registry,
            )
            .expect("live faults");
            let shed = IntCounter::new("shed", "shed").expect("counter");
            let (entered, release) = (Arc::new(AtomicUsize::new(0)), Arc::new(Notify::new()));
            let handler = {
                let (entered, release) = (entered.clone(), release.clone());
                move || async move {
                    let released = release.notified();
                    entered.fetch_add(1, Ordering::SeqCst);
                    released.await;
                    "done"
                }
            };
            let admission = Admission::new(1, faults.clone(), shed.clone());
            let router = Router::new()
                .route("/", get(handler))
                .layer(middleware::from_fn_with_state(admission, admit));
            Self {
                router,
                faults,
                shed,
                entered,
                release,
            }
        }

        fn get(&self) -> impl Future<Output = Response> + Send + 'static {
            let router = self.router.clone();
            async move {
                let request = Request::get("/").body(Body::empty()).expect("request");
                router.oneshot(request).await.expect("infallible")
            }
        }

        /// A request that must be answered without waiting for the handler
        /// (which holds every request until released).
        async fn answered_at_once(&self) -> Response {
            tokio::time::timeout(std::time::Duration::from_secs(5), self.get())
                .await
                .expect("answered at once, not queued behind the held requests")
        }

        /// Waits until `n` requests in all have reached the handler.
        async fn until_entered(&self, n: usize) {
            tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while self.entered.load(Ordering::SeqCst) < n {
                    tokio::task::yield_now().await;
                }
            })
            .await
            .unwrap_or_else(|_| panic!("{n} requests never reached the handler"));
        }
    }

    #[tokio::test]
    async fn propagate_sheds_past_the_limit_at_once_and_admits_again_after() {
        let app = App::new(Mode::Fixed);
        let first = tokio::spawn(app.get());
        app.until_entered(1).await;

        // The first request holds the one permit: the second is answered
        // at once (awaited here while the first still waits), not queued.
        let second = app.answered_at_once().await;
        assert_eq!(second.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(app.shed.get(), 1);
        let body = axum::body::to_bytes(second.into_body(), 1 << 16)
            .await
            .expect("body");
        let body = String::from_utf8_lossy(&body);
        assert!(
            body.contains(r#""code":"overloaded""#)
                && body.contains("service_a.max_concurrent_requests"),
            "{body}"
        );

        app.release.notify_waiters();
        assert_eq!(first.await.expect("first").status(), StatusCode::OK);
        // The permit is back: the next request is admitted.
        let third = tokio::spawn(app.get());
        app.until_entered(2).await;
        app.release.notify_waiters();
        assert_eq!(third.await.expect("third").status(), StatusCode::OK);
        assert_eq!(app.shed.get(), 1);
    }

    #[tokio::test]
    async fn ignore_admits_every_request_and_a_live_flip_applies_to_the_next() {
        let app = App::new(Mode::Buggy);
        // Three requests inside a router with room for one.
        let waiting: Vec<_> = (0..3).map(|_| tokio::spawn(app.get())).collect();
        app.until_entered(3).await;
        assert_eq!(app.shed.get(), 0);

        app.faults
            .apply(&serde_json::json!({"deadline": "propagate"}), "test")
            .expect("A owns deadline");
        // Requests admitted under `ignore` hold no permit: one more is
        // admitted, and the one after it is shed.
        let admitted = tokio::spawn(app.get());
        app.until_entered(4).await;
        assert_eq!(
            app.answered_at_once().await.status(),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(app.shed.get(), 1);

        app.release.notify_waiters();
        for request in waiting.into_iter().chain([admitted]) {
            assert_eq!(request.await.expect("request").status(), StatusCode::OK);
        }
    }
}
