//! The generator against in-process servers that stall on command: what
//! open loop starts while nothing answers, what it measures, what it
//! drops; closed loop as before; gRPC's backends and error codes.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, sync::watch, time::Instant};

use super::{LiveWindow, LoadReport, LoadSpec, outcome::id_for, run};

/// Longest any test waits for a condition before it fails (a guard, not
/// a synchronisation: every wait ends on the condition).
const GUARD: Duration = Duration::from_secs(20);

/// What a stalling server saw.
struct Seen {
    /// Requests that arrived (counted on arrival, before any stall).
    arrivals: watch::Sender<u64>,
    in_flight: AtomicU64,
    most_in_flight: AtomicU64,
    /// When the first request arrived.
    first_arrival: std::sync::Mutex<Option<Instant>>,
}

impl Seen {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            arrivals: watch::Sender::new(0),
            in_flight: AtomicU64::new(0),
            most_in_flight: AtomicU64::new(0),
            first_arrival: std::sync::Mutex::new(None),
        })
    }

    fn arrived(&self) {
        self.first_arrival
            .lock()
            .unwrap()
            .get_or_insert_with(Instant::now);
        self.arrivals.send_modify(|n| *n += 1);
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
    }

    fn answered(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    fn arrivals(&self) -> u64 {
        *self.arrivals.borrow()
    }

    /// Waits until at least `n` requests have arrived; fails the test if
    /// they do not within [`GUARD`], saying how many did.
    async fn wait_for_arrivals(&self, n: u64, why: &str) {
        let mut arrivals = self.arrivals.subscribe();
        let reached = tokio::time::timeout(GUARD, arrivals.wait_for(|seen| *seen >= n)).await;
        assert!(
            matches!(reached, Ok(Ok(_))),
            "{why}: only {} of {n} requests arrived",
            self.arrivals()
        );
    }
}

/// An HTTP/1.1 server that answers nothing while stalled, then answers
/// everything (held and new) with 200 and `x-served-by: b-1`.
struct StallingHttp {
    url: String,
    seen: Arc<Seen>,
    release: watch::Sender<bool>,
}

impl StallingHttp {
    async fn start(stalled: bool) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Seen::new();
        let (release, released) = watch::channel(!stalled);
        let server_seen = seen.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let seen = server_seen.clone();
                let released = released.clone();
                let service = service_fn(move |_: Request<Incoming>| {
                    let seen = seen.clone();
                    let mut released = released.clone();
                    async move {
                        seen.arrived();
                        let _ = released.wait_for(|r| *r).await;
                        seen.answered();
                        Ok::<_, Infallible>(
                            Response::builder()
                                .header("x-served-by", "b-1")
                                .body(Full::new(Bytes::from_static(b"{}")))
                                .unwrap(),
                        )
                    }
                });
                tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
            }
        });
        Self { url, seen, release }
    }

    /// Ends the stall; returns how long it held the first request.
    fn release(&self) -> Duration {
        self.release.send_replace(true);
        self.seen.first_arrival.lock().unwrap().unwrap().elapsed()
    }
}

fn open_loop(url: &str, rps: f64, requests: u64) -> LoadSpec {
    let mut spec = LoadSpec::new(url, "/api/items/{rand}");
    spec.rps = Some(rps);
    spec.requests = Some(requests);
    spec.concurrency = 4;
    spec.max_in_flight = 1000;
    spec
}

fn spawn_run(spec: LoadSpec) -> tokio::task::JoinHandle<LoadReport> {
    tokio::spawn(async move { run(&spec, None).await.unwrap() })
}

#[tokio::test]
async fn open_loop_keeps_starting_requests_while_the_server_stalls() {
    let server = StallingHttp::start(true).await;
    let load = spawn_run(open_loop(&server.url, 200.0, 200));

    // Four connections were opened before the start; with nothing answered,
    // a generator that waits for answers could not send a fifth request.
    server
        .seen
        .wait_for_arrivals(100, "requests stopped starting during the stall")
        .await;
    assert_eq!(
        server.seen.in_flight.load(Ordering::SeqCst),
        server.seen.arrivals(),
        "nothing was answered yet"
    );
    let held = server.release();
    let report = load.await.unwrap();

    assert_eq!(report.requests, 200);
    assert_eq!(report.ok, 200);
    assert_eq!(report.dropped, 0);
    // Sent on schedule through the stall: the offered rate is the target.
    let sent_rps = report.sent_rps.unwrap();
    assert!(
        (180.0..=200.0 + 1e-6).contains(&sent_rps),
        "sent at {sent_rps}"
    );
    assert_eq!(report.by_backend, BTreeMap::from([("b-1".into(), 200)]));
    assert!(report.peak_in_flight.unwrap() >= 100, "{report:?}");
    assert!(
        server.seen.most_in_flight.load(Ordering::SeqCst) >= 100,
        "a connection per request in flight"
    );
    // The first request was due no later than it arrived and was held
    // until the release: its latency is at least the stall.
    assert!(
        report.latency_ms.max >= held.as_secs_f64() * 1000.0,
        "max {} ms, first request held {held:?}",
        report.latency_ms.max
    );
}

#[tokio::test]
async fn open_loop_latency_runs_from_the_due_time_even_when_the_generator_is_late() {
    let server = StallingHttp::start(false).await;
    let mut spec = open_loop(&server.url, 500.0, 300);
    // Enough connections open before the start that what falls due in the
    // block needs no new one.
    spec.concurrency = 200;
    let load = spawn_run(spec);
    // Block this (single) runtime thread for 300 ms once the load runs:
    // the generator cannot start what falls due meanwhile.
    server
        .seen
        .wait_for_arrivals(50, "the load did not start")
        .await;
    std::thread::sleep(Duration::from_millis(300));
    let report = load.await.unwrap();

    assert_eq!(report.requests, 300);
    let lag = report.dispatch_lag_ms.clone().unwrap();
    assert!(
        lag.p99 >= 200.0,
        "the blocked requests started late: {lag:?}"
    );
    // From the due time, each request's latency is its lag plus the
    // server's time, so every percentile is at least the lag's. From the
    // send, only the few in flight across the block would be late.
    let latency = &report.latency_ms;
    assert!(
        latency.p50 >= lag.p50 && latency.p99 >= lag.p99 && latency.max >= lag.max,
        "latency {latency:?} vs lag {lag:?}"
    );
}

#[tokio::test]
async fn past_max_in_flight_due_requests_are_dropped_not_sent_or_delayed() {
    let server = StallingHttp::start(true).await;
    let live = Arc::new(LiveWindow::new());
    let mut spec = open_loop(&server.url, 200.0, 100);
    spec.max_in_flight = 20;
    // Every request is due within 0.5 s; none is answered before this
    // runs out, so no worker frees up before the last is due.
    spec.timeout = Duration::from_secs(2);
    spec.live = Some(live.clone());
    let report = run(&spec, None).await.unwrap();

    assert_eq!(server.seen.arrivals(), 20, "only max_in_flight were sent");
    assert_eq!(report.dropped, 80);
    assert_eq!(report.requests, 20, "drops are not requests");
    assert_eq!(report.errors, BTreeMap::from([("timeout".into(), 20)]));
    assert_eq!(report.peak_in_flight, Some(20));
    // 20 sent while the 100 fell due (0.5 s): 40 req/s offered. The
    // run's rate also counts the 2 s drain of timeouts after that.
    let sent_rps = report.sent_rps.unwrap();
    assert!(
        (30.0..=41.0).contains(&sent_rps),
        "sent at {sent_rps} req/s"
    );
    assert!(report.rps < sent_rps / 2.0, "{report:?}");
    // Only the sent requests have latencies: each waited out the timeout.
    assert!(report.latency_ms.p50 >= 2000.0, "{:?}", report.latency_ms);
    let window = live.take();
    assert_eq!(window.dropped, 80);
    assert_eq!(window.errors, 100, "timeouts and drops");
    let table = report.table();
    assert!(table.contains("dropped           80"), "{table}");
    assert!(
        table.contains(&format!("(sent {sent_rps:.1}, target 200.0)")),
        "{table}"
    );
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["dropped"], 80);
    assert_eq!(json["sent_rps"], sent_rps);
    assert!(json["latency_ms"]["p999"].is_number());
    assert!(json["dispatch_lag_ms"]["p99"].is_number());
}

#[tokio::test]
async fn closed_loop_keeps_concurrency_requests_in_flight_and_never_more() {
    let server = StallingHttp::start(true).await;
    let mut spec = LoadSpec::new(&server.url, "/api/items/{rand}");
    spec.concurrency = 4;
    spec.requests = Some(40);
    let load = spawn_run(spec);
    server
        .seen
        .wait_for_arrivals(4, "closed loop did not start")
        .await;
    let held = server.release();
    let report = load.await.unwrap();

    assert_eq!(server.seen.most_in_flight.load(Ordering::SeqCst), 4);
    assert_eq!(report.requests, 40);
    assert_eq!(report.ok, 40);
    assert_eq!(report.dropped, 0);
    assert_eq!(report.target_rps, None);
    assert_eq!(report.sent_rps, None);
    assert_eq!(report.dispatch_lag_ms, None);
    assert!(report.latency_ms.max >= held.as_secs_f64() * 1000.0 * 0.9);
    let json = serde_json::to_value(&report).unwrap();
    assert!(json.get("dispatch_lag_ms").is_none(), "{json}");
    assert!(json.get("sent_rps").is_none(), "{json}");
}

mod grpc {
    use std::pin::Pin;

    use lab_proto::v1::{
        GetItemReply, GetItemRequest, GetJobReply, GetJobRequest, Item, Job, SubmitJobReply,
        SubmitJobRequest,
        backend_server::{Backend, BackendServer},
    };
    use tonic::{Request, Response, Status};

    use super::*;

    /// lab.v1.Backend in-process. GetItem answers by id: id % 4 == 0 is
    /// UNAVAILABLE from b-2, id % 4 == 1 NOT_FOUND from b-1, the rest OK
    /// from b-1 (odd ids) or b-2 (even). GetJob stalls until released.
    struct FakeB {
        seen: Arc<Seen>,
        released: watch::Receiver<bool>,
    }

    fn from(backend: &str, mut status: Status) -> Status {
        status
            .metadata_mut()
            .insert("x-served-by", backend.parse().unwrap());
        status
    }

    fn expected_item_answer(id: i64) -> (&'static str, Option<&'static str>) {
        match id % 4 {
            0 => ("b-2", Some("unavailable")),
            1 => ("b-1", Some("not_found")),
            _ if id % 2 == 1 => ("b-1", None),
            _ => ("b-2", None),
        }
    }

    #[tonic::async_trait]
    impl Backend for FakeB {
        async fn get_item(
            &self,
            request: Request<GetItemRequest>,
        ) -> Result<Response<GetItemReply>, Status> {
            let id = request.into_inner().id;
            match expected_item_answer(id) {
                (b, Some("unavailable")) => Err(from(b, Status::unavailable("shedding"))),
                (b, Some(_)) => Err(from(b, Status::not_found("no such item"))),
                (b, None) => Ok(Response::new(GetItemReply {
                    item: Some(Item {
                        id,
                        ..Default::default()
                    }),
                    served_by: b.into(),
                })),
            }
        }

        async fn get_job(
            &self,
            request: Request<GetJobRequest>,
        ) -> Result<Response<GetJobReply>, Status> {
            self.seen.arrived();
            let _ = self.released.clone().wait_for(|r| *r).await;
            self.seen.answered();
            Ok(Response::new(GetJobReply {
                job: Some(Job {
                    id: request.into_inner().job_id,
                    ..Default::default()
                }),
                served_by: "b-1".into(),
            }))
        }

        async fn submit_job(
            &self,
            _: Request<SubmitJobRequest>,
        ) -> Result<Response<SubmitJobReply>, Status> {
            Err(from("b-1", Status::deadline_exceeded("too late")))
        }
    }

    struct Server {
        addr: String,
        seen: Arc<Seen>,
        release: watch::Sender<bool>,
        connections: Arc<AtomicU64>,
    }

    async fn serve() -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Seen::new();
        let (release, released) = watch::channel(false);
        let connections = Arc::new(AtomicU64::new(0));
        let counted = connections.clone();
        let incoming = futures::stream::unfold(listener, move |listener| {
            let counted = counted.clone();
            async move {
                let accepted = listener.accept().await.map(|(stream, _)| stream);
                counted.fetch_add(1, Ordering::SeqCst);
                Some((accepted, listener))
            }
        });
        let service = BackendServer::new(FakeB {
            seen: seen.clone(),
            released,
        });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(Box::pin(incoming) as Pin<Box<_>>),
        );
        Server {
            addr,
            seen,
            release,
            connections,
        }
    }

    #[tokio::test]
    async fn grpc_counts_served_by_and_names_error_codes() {
        let server = serve().await;
        let mut spec = LoadSpec::new(format!("grpc://{}", server.addr), "lab.v1.Backend/GetItem");
        spec.requests = Some(400);
        spec.concurrency = 4;
        spec.connections = 3;
        spec.id_max = 1000;
        let report = run(&spec, None).await.unwrap();

        let mut by_backend = BTreeMap::<String, u64>::new();
        let mut errors = BTreeMap::<String, u64>::new();
        for k in 0..400 {
            let (backend, error) = expected_item_answer(id_for(spec.seed, k, 1000) as i64);
            *by_backend.entry(backend.into()).or_default() += 1;
            if let Some(error) = error {
                *errors.entry(error.into()).or_default() += 1;
            }
        }
        assert_eq!(report.requests, 400);
        assert_eq!(report.errors, errors);
        assert_eq!(report.ok, 400 - errors.values().sum::<u64>());
        assert_eq!(report.by_backend, by_backend, "errors name their B too");
        assert!(errors["unavailable"] > 0 && errors["not_found"] > 0);
        assert_eq!(server.connections.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn grpc_open_loop_keeps_starting_calls_over_one_connection_while_b_stalls() {
        let server = serve().await;
        let mut spec = open_loop(&format!("grpc://{}", server.addr), 200.0, 150);
        spec.path = "lab.v1.Backend/GetJob".into();
        spec.concurrency = 2;
        let load = spawn_run(spec);
        server
            .seen
            .wait_for_arrivals(80, "calls stopped starting during the stall")
            .await;
        server.release.send_replace(true);
        let report = load.await.unwrap();

        assert_eq!(report.requests, 150);
        assert_eq!(report.ok, 150);
        assert_eq!(report.dropped, 0);
        assert_eq!(report.by_backend, BTreeMap::from([("b-1".into(), 150)]));
        assert!(report.peak_in_flight.unwrap() >= 80);
        assert_eq!(server.connections.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn grpc_errors_from_b_and_from_no_b() {
        let server = serve().await;
        let mut spec = LoadSpec::new(format!("grpc://{}", server.addr), "SubmitJob");
        spec.requests = Some(10);
        spec.concurrency = 2;
        let report = run(&spec, None).await.unwrap();
        assert_eq!(
            report.errors,
            BTreeMap::from([("deadline_exceeded".into(), 10)])
        );
        assert_eq!(report.by_backend, BTreeMap::from([("b-1".into(), 10)]));

        // Nothing listens there any more.
        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let mut spec = LoadSpec::new(format!("grpc://{addr}"), "GetItem");
        spec.requests = Some(5);
        spec.concurrency = 1;
        let report = run(&spec, None).await.unwrap();
        assert_eq!(report.errors, BTreeMap::from([("connect".into(), 5)]));
        assert!(report.by_backend.is_empty());
    }
}
