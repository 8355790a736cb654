//! B's start-up and shutdown, one named step each. [`Application::build`]
//! and [`Application::run_until_stopped`] read top to bottom in the order
//! the steps happen; the processes around B are described in
//! docs/architecture.md.

use std::{
    future::Future,
    sync::{
        Arc, OnceLock,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use lab_common::{
    admin,
    config::{LabConfig, LbMode},
    faults::{LiveFaults, Switch},
};
use lab_proto::v1::{FILE_DESCRIPTOR_SET, backend_server::BackendServer};
use prometheus::Registry;
use tokio::{net::TcpListener, task::JoinHandle};
use tokio_stream::{StreamExt, wrappers::TcpListenerStream};
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;
use tonic_health::server::HealthReporter;

use crate::{
    db::{self, Db},
    deadline,
    grpc::BackendService,
    http_client,
    item_cache::{ItemCache, ItemCacheMetrics},
    job_queue, metrics, recycle,
    registry::{self, Registration, RegistrationStatus, RegistryMetrics},
    rows, worker,
};

/// Streams one client connection may have open at once. A multiplexes all
/// its calls to a B on one connection; under `deadline = "propagate"` it
/// admits at most `service_a.max_concurrent_requests` (256), well inside
/// this. Under `ignore` A admits everything, and calls past this limit wait
/// in A's HTTP/2 client for a stream to end (the incident's grpc-go server
/// had no limit: the difference shows only past 1 000 calls in flight on
/// one connection).
const MAX_STREAMS_PER_CONNECTION: u32 = 1000;

/// Largest gRPC message B decodes; job payloads have their own, smaller,
/// limit checked in the handler so they get INVALID_ARGUMENT with a reason.
/// Past it tonic answers OUT_OF_RANGE, which the lab keeps rather than
/// gRPC's RESOURCE_EXHAUSTED: here that code means "shed, try again", and a
/// message too big to decode never fits (docs/architecture.md, "B's gRPC API").
const MAX_DECODED_MESSAGE_BYTES: usize = 1024 * 1024;

/// A B that has its admin listener, its database and its gRPC port, and is
/// about to serve.
pub struct Application {
    config: Arc<LabConfig>,
    /// B's switches, live: `PUT /faults` changes them while B runs.
    faults: LiveFaults,
    instance_id: Arc<str>,
    metrics: ServiceMetrics,
    partner: Option<Arc<http_client::PartnerClient>>,
    readiness: Readiness,
    admin: JoinHandle<()>,
    db: Db,
    grpc_listener: TcpListener,
    shutdown: CancellationToken,
}

impl Application {
    /// Everything that can fail at start-up, in the order `/readyz` needs:
    /// the admin listener first (so `/healthz` answers while MySQL is
    /// awaited), then MySQL with migrations and seed data, then the gRPC
    /// port. Nothing is served on it yet.
    pub async fn build(config: LabConfig, shutdown: CancellationToken) -> anyhow::Result<Self> {
        let config = Arc::new(config);
        let instance_id: Arc<str> = crate::instance_id(&config).into();
        let registry = lab_common::metrics::registry()?;
        let faults = LiveFaults::from_config("service-b", &config, Switch::SERVICE_B, &registry)?;
        let metrics = ServiceMetrics::register(&faults, &registry)?;
        let partner = partner_client(&config, &faults, &metrics)?;
        let readiness = Readiness::new(config.faults.lb, metrics.registry.status());
        metrics::PoolCollector::register(&registry, readiness.db.clone())?;
        let admin = start_admin(&config, registry, &faults, &readiness, &shutdown).await?;
        let db = connect_database(&config, &faults, &metrics, &shutdown).await?;
        readiness.database_connected(&db);
        let grpc_listener = bind_grpc(&config).await?;
        Ok(Self {
            config,
            faults,
            instance_id,
            metrics,
            partner,
            readiness,
            admin,
            db,
            grpc_listener,
            shutdown,
        })
    }

    /// Serves until `shutdown` is cancelled, then shuts down in the order
    /// [`shutdown_sequence`] explains and waits for in-flight requests.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self {
            config,
            faults,
            instance_id,
            metrics,
            partner,
            readiness,
            admin,
            db,
            grpc_listener,
            shutdown,
        } = self;
        let stop_serving = CancellationToken::new();
        let backend = backend_service(&config, &faults, &db, &instance_id, &metrics);
        let (health, serve) = grpc_server(&config, backend, grpc_listener, stop_serving.clone())?;
        health.set_serving::<BackendServer<BackendService>>().await;
        readiness.serving.store(true, Ordering::Release);
        let advertised = crate::advertise_addr(&config);
        if faults.hidden() {
            // A drill: the preset and the switches are the answer.
            tracing::info!(%instance_id, grpc = %config.service_b.listen,
                advertised = %advertised, admin = %config.service_b.admin_listen,
                "service-b serving");
        } else {
            tracing::info!(%instance_id, grpc = %config.service_b.listen,
                advertised = %advertised, admin = %config.service_b.admin_listen,
                mode = ?config.mode, faults = ?config.faults, "service-b serving");
        }
        let stop_registration = CancellationToken::new();
        let registration = register_in_etcd(
            &config,
            &instance_id,
            &advertised,
            &metrics,
            stop_registration.clone(),
        );
        let stop_worker = start_worker(&config, &faults, partner, &db, &instance_id, &metrics);
        lab_common::tasks::spawn(
            "jobs.queue_gauges",
            job_queue::watch(
                config.mysql.clone(),
                metrics.job_queue.clone(),
                shutdown.clone(),
            ),
        );
        let sequence = lab_common::tasks::spawn(
            "shutdown.sequence",
            shutdown_sequence(ShutdownSteps {
                shutdown: shutdown.clone(),
                stop_worker,
                health,
                stop_registration,
                registration,
                drain_period: config.service_b.drain_period,
                stop_serving: stop_serving.clone(),
            }),
        );
        let served = finish_in_flight(serve, &stop_serving, config.service_b.shutdown_grace).await;
        sequence.abort();
        readiness.serving.store(false, Ordering::Release);
        shutdown.cancel();
        let _ = admin.await;
        tracing::info!("service-b stopped");
        served
    }
}

/// The `lab.v1.Backend` handlers, under the deadline policy in force.
fn backend_service(
    config: &LabConfig,
    faults: &LiveFaults,
    db: &Db,
    instance_id: &Arc<str>,
    metrics: &ServiceMetrics,
) -> BackendService {
    BackendService::new(
        db.clone(),
        ItemCache::new(
            config.service_b.item_cache_capacity,
            metrics.item_cache.clone(),
        ),
        instance_id.clone(),
        config.service_b.max_payload_bytes,
        config.service_b.handler_latency,
        deadline::DeadlinePolicy::new(
            faults.clone(),
            config.service_b.max_concurrent_requests as usize,
            metrics.deadline.clone(),
        ),
        metrics.grpc.clone(),
    )
}

/// The gRPC server on the bound listener — health, reflection and `lab.v1.Backend` — as a future that serves until
/// `stop_serving`, then finishes the requests already inside.
fn grpc_server(
    config: &LabConfig,
    backend: BackendService,
    listener: TcpListener,
    stop_serving: CancellationToken,
) -> anyhow::Result<(
    HealthReporter,
    impl Future<Output = Result<(), tonic::transport::Error>>,
)> {
    let (health, health_service) = tonic_health::server::health_reporter();
    let reflection_v1 = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;
    // Connection recycling: tonic sends GOAWAY at the age; AgedStream cuts
    // what is still open after the grace (see `recycle`).
    let age = recycle::jittered(
        config.service_b.max_connection_age,
        config.service_b.max_connection_age_jitter,
    );
    let hard_limit = (!age.is_zero()).then(|| age + config.service_b.max_connection_age_grace);
    // tonic passes no stream limit of its own, which overrides hyper's
    // default of 200 with none at all (grpc-go's default is none too): one
    // connection could then open streams, each a handler task, without
    // bound. Past this many, a client waits for one to end.
    let mut server = Server::builder().max_concurrent_streams(MAX_STREAMS_PER_CONNECTION);
    if !age.is_zero() {
        tracing::info!(?age, grace = ?config.service_b.max_connection_age_grace, "connection recycling on");
        server = server.max_connection_age(age);
    }
    // Stamp each request's arrival before its handler task is scheduled,
    // so time spent waiting for a starved runtime is measured too.
    let stamp_arrival = tower::util::MapRequestLayer::new(|mut request: http::Request<_>| {
        request
            .extensions_mut()
            .insert(deadline::Arrived(tokio::time::Instant::now()));
        request
    });
    let serve = server
        .layer(stamp_arrival)
        // Each call in a span joined to A's `traceparent` metadata.
        .layer(lab_common::trace::TraceContextLayer)
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(
            BackendServer::new(backend).max_decoding_message_size(MAX_DECODED_MESSAGE_BYTES),
        )
        .serve_with_incoming_shutdown(accept_loop(listener, hard_limit), async move {
            stop_serving.cancelled().await
        });
    Ok((health, serve))
}

/// Puts B's key in etcd and keeps it there. This comes after the gRPC
/// listener is bound and serving: A dials whatever etcd lists, so a key put
/// earlier would send it calls that meet a closed port.
fn register_in_etcd(
    config: &LabConfig,
    instance_id: &str,
    advertised: &str,
    metrics: &ServiceMetrics,
    stop: CancellationToken,
) -> JoinHandle<()> {
    lab_common::tasks::spawn(
        "registry.keepalive",
        registry::maintain(
            config.etcd.clone(),
            Registration::new(&config.etcd, instance_id, advertised),
            metrics.registry.clone(),
            stop,
        ),
    )
}

/// Starts the job worker if it is enabled, following the `worker` switch
/// live; the returned token stops it.
fn start_worker(
    config: &LabConfig,
    faults: &LiveFaults,
    partner: Option<Arc<http_client::PartnerClient>>,
    db: &Db,
    instance_id: &Arc<str>,
    metrics: &ServiceMetrics,
) -> CancellationToken {
    let stop = CancellationToken::new();
    if let Some(partner) = partner {
        lab_common::tasks::spawn(
            "worker.loop",
            worker::run(
                faults.subscribe(),
                config.worker.clone(),
                worker::Deps {
                    db: db.clone(),
                    rows: metrics.job_rows.clone(),
                    partner,
                    instance: instance_id.clone(),
                    metrics: metrics.worker.clone(),
                },
                stop.clone(),
            ),
        );
    }
    stop
}

/// Every metric family B exports, registered once at start.
struct ServiceMetrics {
    grpc: metrics::Metrics,
    registry: RegistryMetrics,
    worker: worker::WorkerMetrics,
    deadline: deadline::DeadlineMetrics,
    pool: db::PoolMetrics,
    http: http_client::HttpClientMetrics,
    item_cache: ItemCacheMetrics,
    job_rows: Arc<rows::JobRows>,
    job_queue: job_queue::QueueMetrics,
}

impl ServiceMetrics {
    fn register(faults: &LiveFaults, registry: &Registry) -> anyhow::Result<Self> {
        // Where the gauges go that the buggy code path itself keeps
        // (`lab_db_connections_leaked`, `lab_http_responses_unclosed`): no
        // real service counts its own leaks, and in a drill such a gauge
        // would name the cause. A drill registers them where nobody scrapes,
        // so the trainee infers the leak from what any service can observe.
        let self_reported = if faults.hidden() {
            Registry::new()
        } else {
            registry.clone()
        };
        Ok(Self {
            grpc: metrics::Metrics::register(registry)?,
            registry: RegistryMetrics::register(registry)?,
            worker: worker::WorkerMetrics::register(registry, faults.hidden())?,
            deadline: deadline::DeadlineMetrics::register(registry)?,
            pool: db::PoolMetrics::register(registry)?,
            job_rows: Arc::new(rows::JobRows::new(faults.clone(), &self_reported)?),
            http: http_client::HttpClientMetrics::register(registry, &self_reported)?,
            item_cache: ItemCacheMetrics::register(registry)?,
            job_queue: job_queue::QueueMetrics::register(registry)?,
        })
    }
}

/// The partner-api client, built before anything binds so a bad CA fails
/// start-up at once. Only the job worker calls partner-api: without it, no
/// client (and no CA needed).
fn partner_client(
    config: &LabConfig,
    faults: &LiveFaults,
    metrics: &ServiceMetrics,
) -> anyhow::Result<Option<Arc<http_client::PartnerClient>>> {
    if !config.worker.enabled {
        return Ok(None);
    }
    let client =
        http_client::PartnerClient::new(faults.clone(), &config.partner, metrics.http.clone())
            .context("building the partner-api client")?;
    Ok(Some(Arc::new(client)))
}

/// What `/readyz` checks: MySQL connected and answering, the gRPC listener
/// serving, and — when A finds Bs through etcd — B's key in etcd under a
/// live lease, since only then does A send it anything.
#[derive(Clone)]
struct Readiness {
    db: Arc<OnceLock<Db>>,
    serving: Arc<AtomicBool>,
    registration: RegistrationStatus,
    needs_registration: bool,
}

impl Readiness {
    fn new(lb: LbMode, registration: RegistrationStatus) -> Self {
        Self {
            db: Arc::new(OnceLock::new()),
            serving: Arc::new(AtomicBool::new(false)),
            registration,
            needs_registration: lb == LbMode::Etcd,
        }
    }

    fn database_connected(&self, db: &Db) {
        let _ = self.db.set(db.clone());
    }

    /// The probe the admin listener calls on each `/readyz`.
    fn probe(&self) -> admin::ReadinessProbe {
        let readiness = self.clone();
        Arc::new(move || {
            let readiness = readiness.clone();
            Box::pin(async move { readiness.check().await })
        })
    }

    async fn check(&self) -> Result<(), String> {
        let Some(db) = self.db.get() else {
            return Err("waiting for MySQL".into());
        };
        if !self.serving.load(Ordering::Acquire) {
            return Err("gRPC listener not serving".into());
        }
        db.ping().await.map_err(|e| format!("{}: {e}", e.kind()))?;
        if self.needs_registration && !self.registration.is_registered() {
            return Err("not registered in etcd".into());
        }
        Ok(())
    }
}

/// Binds and serves the admin routes. First of all, so that `/healthz`
/// answers (and `/readyz` says why not ready) while MySQL is awaited.
async fn start_admin(
    config: &Arc<LabConfig>,
    registry: Registry,
    faults: &LiveFaults,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> anyhow::Result<JoinHandle<()>> {
    let addr = &config.service_b.admin_listen;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding admin listener {addr}"))?;
    let router = admin::router(admin::AdminState {
        service: "service-b",
        registry,
        config: config.clone(),
        faults: faults.clone(),
        readiness: readiness.probe(),
    });
    Ok(lab_common::tasks::spawn(
        "admin.listener",
        admin::serve(listener, router, shutdown.clone()),
    ))
}

/// Connects to MySQL (waiting for it to come up), then migrates and seeds,
/// all within `mysql.startup_timeout`: a B whose database never comes
/// exits instead of hanging.
async fn connect_database(
    config: &LabConfig,
    faults: &LiveFaults,
    metrics: &ServiceMetrics,
    shutdown: &CancellationToken,
) -> anyhow::Result<Db> {
    let db = Db::connect_with_retry(
        &config.mysql,
        faults.clone(),
        metrics.pool.clone(),
        shutdown,
    )
    .await?;
    let startup_timeout = config.mysql.startup_timeout;
    tokio::time::timeout(startup_timeout, db.migrate_and_seed(config.mysql.seed_items))
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "migrations and seeding did not finish within {startup_timeout:?} (mysql.startup_timeout)"
            )
        })??;
    Ok(db)
}

/// Binds the gRPC port last: a caller that can connect finds the schema in
/// place.
async fn bind_grpc(config: &LabConfig) -> anyhow::Result<TcpListener> {
    let addr = &config.service_b.listen;
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding gRPC listener {addr}"))
}

/// Accepted connections, aged for recycling. An accept error (say, out of
/// file descriptors) pauses accepting for a moment: tonic retries at once,
/// which would spin a core.
fn accept_loop(
    listener: TcpListener,
    hard_limit: Option<Duration>,
) -> impl tokio_stream::Stream<Item = std::io::Result<recycle::AgedStream>> {
    TcpListenerStream::new(listener).then(move |accepted| async move {
        match accepted {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                Ok(recycle::AgedStream::new(stream, hard_limit))
            }
            Err(e) => {
                tracing::warn!(error = %e, "accept failed; pausing 100 ms");
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err(e)
            }
        }
    })
}

/// What [`shutdown_sequence`] acts on.
struct ShutdownSteps {
    shutdown: CancellationToken,
    stop_worker: CancellationToken,
    health: HealthReporter,
    stop_registration: CancellationToken,
    registration: JoinHandle<()>,
    drain_period: Duration,
    stop_serving: CancellationToken,
}

/// On SIGTERM/SIGINT: stop claiming jobs, report NOT_SERVING, and revoke
/// the etcd lease *before* the listener closes, so A stops choosing this B
/// while it still answers; keep serving for `service_b.drain_period` (the
/// time A's etcd watch and HAProxy's health checks need to notice); only
/// then stop accepting.
async fn shutdown_sequence(steps: ShutdownSteps) {
    steps.shutdown.cancelled().await;
    // Claimed jobs still running are reclaimed by another B after the
    // visibility timeout if cut.
    steps.stop_worker.cancel();
    steps
        .health
        .set_not_serving::<BackendServer<BackendService>>()
        .await;
    steps.stop_registration.cancel();
    let _ = steps.registration.await;
    tracing::info!(drain_period = ?steps.drain_period, "deregistered; draining");
    tokio::time::sleep(steps.drain_period).await;
    steps.stop_serving.cancel();
}

/// Runs the server; once `stop_serving` fires it sends GOAWAY and lets the
/// requests already inside finish, for at most `grace` (then they are cut).
async fn finish_in_flight(
    serve: impl Future<Output = Result<(), tonic::transport::Error>>,
    stop_serving: &CancellationToken,
    grace: Duration,
) -> anyhow::Result<()> {
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => result.context("gRPC server failed")?,
        () = async { stop_serving.cancelled().await; tokio::time::sleep(grace).await } => {
            tracing::warn!(?grace, "in-flight requests still running after the grace period; closing anyway");
        }
    }
    Ok(())
}
