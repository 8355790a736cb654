//! A's channel to B, rebuilt while A runs when `faults.lb` flips
//! (`PUT /faults {"lb":"etcd"}` on A's admin listener).
//!
//! Every call to B — and `/readyz` — goes through a [`LiveChannel`]: a
//! tower service that takes the channel in force when it gets ready and
//! keeps that one until it has sent the call. A flip builds the new
//! channel beside the old one, proves it with a gRPC health check through
//! it (so the first requests on it do not wait for a connection or for
//! discovery, or fail for want of an endpoint), then puts it in force:
//!
//! * requests already sent on the old channel finish there — their
//!   futures hold the old HTTP/2 streams, not the channel;
//! * new requests take the new one;
//! * the old channel is dropped with its last handle: its buffer worker
//!   ends once the requests queued in it are handed to a connection, and
//!   its connections close when their last stream ends. Leaving `etcd`,
//!   its discovery task (etcd session and watch) is stopped at the switch.
//!
//! The tower stack in [`crate::backend`] does not know any of this: it
//! holds a `BackendChannel` like before.

use std::{
    future::Future,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use lab_common::config::{Faults, LbMode, SwitchValue};
use tokio::{sync::watch, time::Instant};
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tower::{Service, util::BoxCloneSyncService};

use crate::balancer::{BackendChannel, Backends, Dialer, DiscoveryTask};

/// How long one health check may take (readiness and warm-up alike).
const HEALTH_TIMEOUT: Duration = Duration::from_secs(1);
/// How long a new channel may take to answer its first health check
/// before it is put in force anyway: the switch was asked for, and an
/// `etcd` channel with no B registered is what `etcd` does then (it fails
/// fast), not something to hide by keeping the old mode.
const WARM_UP_LIMIT: Duration = Duration::from_secs(5);
/// Pause between warm-up health checks (a new `etcd` channel fails its
/// first check at once, before discovery has read the registry).
const WARM_UP_RETRY: Duration = Duration::from_millis(25);

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The channel in force now, taken per call. Cloning is cheap; each clone
/// takes the channel in force when it next gets ready.
pub struct LiveChannel {
    in_force: watch::Receiver<BackendChannel>,
    /// The channel this handle got ready on, until its call is sent: tower's
    /// contract is that `call` goes to the service `poll_ready` readied.
    pinned: Option<BackendChannel>,
}

impl Clone for LiveChannel {
    /// A fresh handle: it has readied nothing, so it pins nothing.
    fn clone(&self) -> Self {
        Self {
            in_force: self.in_force.clone(),
            pinned: None,
        }
    }
}

impl LiveChannel {
    /// As the `BackendChannel` the rest of A uses.
    pub fn boxed(self) -> BackendChannel {
        BoxCloneSyncService::new(self)
    }
}

impl Service<http::Request<Body>> for LiveChannel {
    type Response = http::Response<Body>;
    type Error = tonic::Status;
    type Future = BoxFuture<Result<http::Response<Body>, tonic::Status>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), tonic::Status>> {
        // A flip while this handle waited: wait on the new channel instead
        // (dropping a readied old handle gives its buffer slot back).
        if self.pinned.is_none() || self.in_force.has_changed().unwrap_or(false) {
            self.pinned = Some(self.in_force.borrow_and_update().clone());
        }
        match &mut self.pinned {
            Some(channel) => channel.poll_ready(cx),
            None => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        match self.pinned.take() {
            // Dropping the pinned handle here is what lets an old channel
            // go once no call waits on it.
            Some(mut channel) => channel.call(request),
            None => Box::pin(std::future::ready(Err(tonic::Status::internal(
                "LiveChannel called before it was ready",
            )))),
        }
    }
}

/// Builds the channel for the `lb` in force, and rebuilds it on every flip
/// until `shutdown`. Returns the channel and what it dials first (for logs).
/// `hidden` (a drill): a flip is logged without naming `lb`'s values.
pub fn start(
    dialer: Dialer,
    faults: watch::Receiver<Faults>,
    hidden: bool,
    shutdown: CancellationToken,
) -> (LiveChannel, String) {
    let lb = faults.borrow().lb;
    let Backends {
        channel,
        target,
        discovery,
    } = dialer.dial(lb, &shutdown);
    dialer.in_force(lb);
    let (sender, in_force) = watch::channel(channel);
    let current = InForce {
        lb,
        target: target.clone(),
        discovery,
    };
    lab_common::tasks::spawn(
        "balancer.follow-lb",
        follow(dialer, current, sender, faults, hidden, shutdown),
    );
    (
        LiveChannel {
            in_force,
            pinned: None,
        },
        target,
    )
}

/// What the follower knows of the channel in force. It holds no handle of
/// the channel itself: only the watch does, so the channel goes with its
/// last user.
struct InForce {
    lb: LbMode,
    target: String,
    discovery: Option<DiscoveryTask>,
}

/// Waits for `lb` flips and puts a proven channel for each in force.
async fn follow(
    dialer: Dialer,
    mut current: InForce,
    sender: watch::Sender<BackendChannel>,
    mut faults: watch::Receiver<Faults>,
    hidden: bool,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            changed = faults.changed() => if changed.is_err() { return },
            () = shutdown.cancelled() => return,
        }
        let wanted = faults.borrow_and_update().lb;
        if wanted == current.lb {
            continue;
        }
        let next = dialer.dial(wanted, &shutdown);
        let started = Instant::now();
        let warmed = tokio::select! {
            warmed = warm_up(next.channel.clone()) => warmed,
            () = shutdown.cancelled() => return,
        };
        if faults.borrow().lb != wanted {
            // Flipped again while this one warmed up: build the newest.
            if let Some(discovery) = next.discovery {
                discovery.stop().await;
            }
            continue;
        }
        let Backends {
            channel,
            target,
            discovery,
        } = next;
        sender.send_replace(channel);
        let previous = std::mem::replace(
            &mut current,
            InForce {
                lb: wanted,
                target,
                discovery,
            },
        );
        if let Some(discovery) = previous.discovery {
            discovery.stop().await;
        }
        dialer.in_force(wanted);
        if hidden {
            tracing::info!(warm_up = ?started.elapsed(), ok = warmed.is_ok(),
                "A's channel rebuilt after a switch change (a drill: which is hidden)");
            continue;
        }
        match warmed {
            Ok(()) => tracing::info!(
                from = previous.lb.as_str(),
                to = wanted.as_str(),
                backend = %current.target,
                warm_up = ?started.elapsed(),
                "lb flipped: A's channel rebuilt; calls already sent finish on the old one"
            ),
            Err(reason) => tracing::warn!(
                from = previous.lb.as_str(),
                to = wanted.as_str(),
                backend = %current.target,
                %reason,
                "lb flipped: the new channel did not answer a health check within {WARM_UP_LIMIT:?}; in force anyway"
            ),
        }
    }
}

/// Health-checks `channel` until it answers, for at most [`WARM_UP_LIMIT`].
async fn warm_up(channel: BackendChannel) -> Result<(), String> {
    let deadline = Instant::now() + WARM_UP_LIMIT;
    loop {
        let reason = match check_health(channel.clone()).await {
            Ok(()) => return Ok(()),
            Err(reason) => reason,
        };
        if Instant::now() + WARM_UP_RETRY >= deadline {
            return Err(reason);
        }
        tokio::time::sleep(WARM_UP_RETRY).await;
    }
}

/// One gRPC health check of B's service over `channel`: `Ok` when some B
/// says it is serving.
pub async fn check_health(channel: BackendChannel) -> Result<(), String> {
    let mut health = HealthClient::new(channel);
    let check = health.check(HealthCheckRequest {
        service: "lab.v1.Backend".into(),
    });
    match tokio::time::timeout(HEALTH_TIMEOUT, check).await {
        Ok(Ok(reply)) if reply.get_ref().status == 1 => Ok(()),
        Ok(Ok(reply)) => Err(format!("B health status {}", reply.get_ref().status)),
        Ok(Err(status)) => Err(format!("B unreachable: {}", status.message())),
        Err(_) => Err(format!("B health check timed out after {HEALTH_TIMEOUT:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Weak};
    use tower::ServiceExt;

    /// A channel that answers with its `tag` in a header and holds `alive`
    /// (the test keeps a `Weak` to see when the channel is gone).
    fn tagged(tag: &'static str) -> (BackendChannel, Weak<()>) {
        let alive = Arc::new(());
        let weak = Arc::downgrade(&alive);
        let channel = tower::service_fn(move |_: http::Request<Body>| {
            let _held = alive.clone();
            std::future::ready(Ok::<_, tonic::Status>(
                http::Response::builder()
                    .header("tag", tag)
                    .body(Body::empty())
                    .expect("response"),
            ))
        });
        (BoxCloneSyncService::new(channel), weak)
    }

    async fn send(channel: &mut LiveChannel) -> String {
        let response = channel
            .call(http::Request::new(Body::empty()))
            .await
            .expect("answered");
        response.headers()["tag"].to_str().expect("tag").to_owned()
    }

    #[tokio::test]
    async fn a_call_readied_before_a_flip_goes_out_on_the_old_channel_which_then_goes() {
        let (old, old_alive) = tagged("old");
        let (sender, in_force) = watch::channel(old);
        let mut readied = LiveChannel {
            in_force,
            pinned: None,
        };
        let mut fresh = readied.clone();
        readied.ready().await.expect("ready");

        let (new, new_alive) = tagged("new");
        drop(sender.send_replace(new));
        assert!(old_alive.upgrade().is_some(), "held by the readied call");
        assert_eq!(send(&mut readied).await, "old");
        assert!(old_alive.upgrade().is_none(), "the old channel is gone");

        fresh.ready().await.expect("ready");
        assert_eq!(send(&mut fresh).await, "new");
        readied.ready().await.expect("ready");
        assert_eq!(send(&mut readied).await, "new");
        assert!(new_alive.upgrade().is_some());
    }

    #[tokio::test]
    async fn a_handle_readied_again_after_a_flip_moves_to_the_new_channel() {
        let (old, old_alive) = tagged("old");
        let (sender, in_force) = watch::channel(old);
        let mut channel = LiveChannel {
            in_force,
            pinned: None,
        };
        channel.ready().await.expect("ready");
        let (new, _) = tagged("new");
        drop(sender.send_replace(new));
        channel.ready().await.expect("ready again");
        assert!(old_alive.upgrade().is_none(), "the old pin was let go");
        assert_eq!(send(&mut channel).await, "new");
    }
}
