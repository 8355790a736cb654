//! Service A: the caller of the incident. An axum HTTP/JSON front whose every
//! request becomes a gRPC call to a B, with A's deadline (default 5 s).
//!
//! * [`api`] — routes, error mapping, request metrics;
//! * [`backend`] — every call to B: A's deadline and the transparent read
//!   retry, as tower layers around the balancer;
//! * [`balancer`] — cause 1: which connection(s) the calls ride on, with
//!   [`discovery`] (etcd) and [`endpoint`] (one B in the balancer, ejected
//!   after transport failures) for the fix;
//! * [`live_channel`] — the channel in force, rebuilt when `lb` flips live
//!   (`PUT /faults`), without dropping calls in flight;
//! * [`overload`] — cause 3 at A's front: whether A sheds requests past
//!   `service_a.max_concurrent_requests`;
//! * [`metrics`] — A's Prometheus metrics.

pub mod api;
pub mod backend;
pub mod balancer;
pub mod discovery;
pub mod endpoint;
pub mod live_channel;
pub mod metrics;
pub mod overload;

use std::{sync::Arc, time::Duration};

use anyhow::Context;
use lab_common::{admin, config::LabConfig, http_listener};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Largest request head A reads (request line and headers); larger ones get
/// 431. Its own clients send a few hundred bytes.
const MAX_HEADER_BYTES: usize = 32 * 1024;

/// Runs service A until `shutdown` is cancelled.
pub async fn run(config: LabConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let registry = lab_common::metrics::registry()?;
    let metrics = metrics::Metrics::register(&registry)?;
    let faults = lab_common::faults::LiveFaults::from_config(
        "service-a",
        &config,
        lab_common::faults::Switch::SERVICE_A,
        &registry,
    )?;
    let dialer = balancer::Dialer::new(&config, &registry, metrics.backend_endpoints.clone())?;
    let (channel, target) = live_channel::start(
        dialer,
        faults.subscribe(),
        faults.hidden(),
        shutdown.clone(),
    );
    let channel = channel.boxed();

    // Ready when some B answers a gRPC health check over A's own channel
    // (the one in force: it follows `lb` flips).
    let readiness: admin::ReadinessProbe = {
        let channel = channel.clone();
        Arc::new(move || Box::pin(live_channel::check_health(channel.clone())))
    };

    let admin_addr = &config.service_a.admin_listen;
    let admin_listener = TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("binding admin listener {admin_addr}"))?;
    let admin_router = admin::router(admin::AdminState {
        service: "service-a",
        registry,
        config: config.clone(),
        faults: faults.clone(),
        readiness,
    });
    let admin_task = lab_common::tasks::spawn(
        "admin.listener",
        admin::serve(admin_listener, admin_router, shutdown.clone()),
    );

    let admission = overload::Admission::new(
        config.service_a.max_concurrent_requests,
        faults.clone(),
        metrics.shed.clone(),
    );
    let app = api::router(
        api::AppState {
            backend: backend::Backend::new(channel, config.service_a.backend_timeout, &metrics),
            metrics,
        },
        admission,
        api::RequestLimits {
            max_body_bytes: config.service_a.max_body_bytes,
            // As long to read the body as the head, plus A's deadline.
            request_timeout: config.service_a.header_read_timeout
                + config.service_a.backend_timeout,
        },
    );
    let addr = &config.service_a.listen;
    let listener = http_listener::bind(addr)
        .await
        .with_context(|| format!("binding HTTP listener {addr}"))?;
    if faults.hidden() {
        // A drill: what A dials, the preset and the switches are the answer.
        tracing::info!(http = %addr, admin = %admin_addr, "service-a serving");
    } else {
        tracing::info!(http = %addr, admin = %admin_addr, backend = %target, mode = ?config.mode, faults = ?config.faults, "service-a serving");
    }
    let limits = http_listener::Limits {
        header_read_timeout: config.service_a.header_read_timeout,
        max_header_bytes: MAX_HEADER_BYTES,
        // Calls to B end by A's deadline; a client still sending its body
        // (it may take `request_timeout`) is not waited for.
        drain_timeout: config.service_a.backend_timeout + Duration::from_secs(1),
    };
    http_listener::serve(listener, app, limits, shutdown.clone()).await;
    shutdown.cancel();
    let _ = admin_task.await;
    tracing::info!("service-a stopped");
    Ok(())
}
