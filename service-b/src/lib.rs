//! Service B: the gRPC callee of the incident.
//!
//! Start-up order matters for an honest `/readyz`: the admin listener comes
//! first (so `/healthz` answers while MySQL is awaited), then MySQL,
//! migrations and seed data, then the gRPC listener. `/readyz` is 200 only
//! once gRPC is serving and MySQL answers.
//!
//! Shutdown on SIGTERM/SIGINT: health flips to NOT_SERVING, the listener
//! stops accepting, HTTP/2 GOAWAY is sent and in-flight requests finish, for
//! at most `service_b.shutdown_grace`.

pub mod db;
pub mod deadline;
pub mod grpc;
pub mod http_client;
pub mod metrics;
pub mod recycle;
pub mod registry;
pub mod rows;
pub mod worker;

use std::{
    net::SocketAddr,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context;
use lab_common::{admin, config::LabConfig};
use lab_proto::v1::{FILE_DESCRIPTOR_SET, backend_server::BackendServer};
use tokio::net::TcpListener;
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::{
    db::Db,
    grpc::BackendService,
    metrics::Metrics,
    registry::{Registration, RegistryMetrics},
};

/// Largest gRPC message B decodes; job payloads have their own, smaller,
/// limit checked in the handler so they get INVALID_ARGUMENT with a reason.
const MAX_DECODED_MESSAGE_BYTES: usize = 1024 * 1024;

/// The id this instance reports as `served_by`.
pub fn instance_id(config: &LabConfig) -> String {
    if !config.service_b.instance_id.is_empty() {
        return config.service_b.instance_id.clone();
    }
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".into());
    let port = config
        .service_b
        .listen
        .parse::<SocketAddr>()
        .map(|a| a.port())
        .unwrap_or_default();
    format!("b-{host}-{port}")
}

/// The address other processes dial: `service_b.advertise_addr`, else the
/// listen address — with the host name instead of an unspecified IP.
pub fn advertise_addr(config: &LabConfig) -> String {
    let b = &config.service_b;
    if !b.advertise_addr.is_empty() {
        return b.advertise_addr.clone();
    }
    match b.listen.parse::<SocketAddr>() {
        Ok(addr) if addr.ip().is_unspecified() => {
            let host = nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_else(|| "localhost".into());
            format!("{host}:{}", addr.port())
        }
        _ => b.listen.clone(),
    }
}

/// Runs service B until `shutdown` is cancelled.
pub async fn run(config: LabConfig, shutdown: CancellationToken) -> anyhow::Result<()> {
    let config = Arc::new(config);
    let instance_id: Arc<str> = instance_id(&config).into();
    let registry = lab_common::metrics::registry()?;
    let metrics = Metrics::register(&registry)?;
    let registry_metrics = RegistryMetrics::register(&registry)?;
    let worker_metrics = worker::WorkerMetrics::register(&registry)?;
    let deadline_metrics = deadline::DeadlineMetrics::register(&registry)?;
    let pool_metrics = db::PoolMetrics::register(&registry)?;
    let job_rows = Arc::new(rows::JobRows::new(config.faults.rows, &registry)?);
    let http_metrics = http_client::HttpClientMetrics::register(&registry)?;
    // Only the job worker calls partner-api: without it, no client (and no
    // CA needed).
    let partner = if config.worker.enabled {
        Some(Arc::new(
            http_client::PartnerClient::new(
                config.faults.http_client,
                &config.partner,
                http_metrics,
            )
            .context("building the partner-api client")?,
        ))
    } else {
        None
    };

    let db_slot: Arc<OnceLock<Db>> = Arc::new(OnceLock::new());
    let serving = Arc::new(AtomicBool::new(false));
    metrics::PoolCollector::register(&registry, db_slot.clone())?;
    let readiness: admin::ReadinessProbe = {
        let db_slot = db_slot.clone();
        let serving = serving.clone();
        Arc::new(move || {
            let db = db_slot.get().cloned();
            let serving = serving.load(Ordering::Acquire);
            Box::pin(async move {
                let Some(db) = db else {
                    return Err("waiting for MySQL".to_string());
                };
                if !serving {
                    return Err("gRPC listener not serving".to_string());
                }
                db.ping().await.map_err(|e| e.to_string())
            })
        })
    };

    let admin_addr = &config.service_b.admin_listen;
    let admin_listener = TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("binding admin listener {admin_addr}"))?;
    let admin_router = admin::router(admin::AdminState {
        service: "service-b",
        registry: registry.clone(),
        config: config.clone(),
        readiness,
    });
    let admin_task = tokio::spawn(admin::serve(admin_listener, admin_router, shutdown.clone()));

    let db = Db::connect_with_retry(
        &config.mysql,
        db::PoolWait::for_deadline(config.faults.deadline),
        pool_metrics,
        &shutdown,
    )
    .await?;
    tokio::time::timeout(
        config.mysql.startup_timeout,
        db.migrate_and_seed(config.mysql.seed_items),
    )
    .await
    .map_err(|_| {
        anyhow::anyhow!(
            "migrations and seeding did not finish within {:?} (mysql.startup_timeout)",
            config.mysql.startup_timeout
        )
    })??;
    let _ = db_slot.set(db.clone());

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<BackendServer<BackendService>>()
        .await;
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    let backend = BackendService::new(
        db,
        instance_id.clone(),
        config.service_b.max_payload_bytes,
        config.service_b.handler_latency,
        deadline::DeadlinePolicy::new(
            config.faults.deadline,
            config.service_b.max_concurrent_requests as usize,
            deadline_metrics,
        ),
        metrics,
    );

    let grpc_addr = &config.service_b.listen;
    let listener = TcpListener::bind(grpc_addr)
        .await
        .with_context(|| format!("binding gRPC listener {grpc_addr}"))?;
    // Connection recycling: tonic sends GOAWAY at the age; AgedStream cuts
    // what is still open after the grace (see `recycle`).
    let age = recycle::jittered(
        config.service_b.max_connection_age,
        config.service_b.max_connection_age_jitter,
    );
    let hard_limit = (!age.is_zero()).then(|| age + config.service_b.max_connection_age_grace);
    // An accept error (say, out of file descriptors) pauses accepting for a
    // moment: tonic retries at once, which would spin a core.
    let incoming = TcpListenerStream::new(listener).then(move |accepted| async move {
        match accepted {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                Ok(recycle::AgedStream::new(stream, hard_limit))
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; pausing 100 ms");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                Err(e)
            }
        }
    });
    let mut server = Server::builder();
    if !age.is_zero() {
        tracing::info!(?age, grace = ?config.service_b.max_connection_age_grace, "connection recycling on");
        server = server.max_connection_age(age);
    }
    // Shutdown sequence: SIGTERM → NOT_SERVING and lease revoked → keep
    // serving for the drain period → stop accepting, finish in-flight.
    let stop_serving = CancellationToken::new();
    let stop_registration = CancellationToken::new();
    let drain = {
        let stop_serving = stop_serving.clone();
        async move { stop_serving.cancelled().await }
    };
    // Stamp each request's arrival before its handler task is scheduled, so
    // time spent waiting for a starved runtime is measured too.
    let stamp_arrival = tower::util::MapRequestLayer::new(|mut request: http::Request<_>| {
        request
            .extensions_mut()
            .insert(deadline::Arrived(tokio::time::Instant::now()));
        request
    });
    let serve = server
        .layer(stamp_arrival)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            BackendServer::new(backend).max_decoding_message_size(MAX_DECODED_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(incoming, drain);
    serving.store(true, Ordering::Release);
    let advertised = advertise_addr(&config);
    tracing::info!(%instance_id, grpc = %grpc_addr, advertised = %advertised, admin = %admin_addr, mode = ?config.mode, faults = ?config.faults, "service-b serving");

    let registration = tokio::spawn(registry::maintain(
        config.etcd.clone(),
        Registration::new(&config.etcd, &instance_id, &advertised, admin_addr),
        registry_metrics,
        stop_registration.clone(),
    ));
    let stop_worker = CancellationToken::new();
    if let Some(partner) = partner {
        tokio::spawn(worker::run(
            config.faults.worker,
            config.worker.clone(),
            worker::Deps {
                db: db_slot.get().cloned().context("database connected above")?,
                rows: job_rows,
                partner,
                instance: instance_id.clone(),
                metrics: worker_metrics,
            },
            stop_worker.clone(),
        ));
    }
    let drain_period = config.service_b.drain_period;
    let sequence = {
        let shutdown = shutdown.clone();
        let stop_serving = stop_serving.clone();
        async move {
            shutdown.cancelled().await;
            // No new jobs from now on; claimed ones still running are
            // reclaimed by another B after the visibility timeout if cut.
            stop_worker.cancel();
            health_reporter
                .set_not_serving::<BackendServer<BackendService>>()
                .await;
            stop_registration.cancel();
            let _ = registration.await;
            tracing::info!(?drain_period, "deregistered; draining");
            tokio::time::sleep(drain_period).await;
            stop_serving.cancel();
        }
    };
    let sequence = tokio::spawn(sequence);

    let grace = config.service_b.shutdown_grace;
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => result.context("gRPC server failed")?,
        _ = async { stop_serving.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "in-flight requests still running after the grace period; closing anyway");
        }
    }
    sequence.abort();
    serving.store(false, Ordering::Release);
    shutdown.cancel();
    let _ = admin_task.await;
    tracing::info!("service-b stopped");
    Ok(())
}
