//! gRPC straight at B, as ghz does, with the lab's generated client:
//!
//! * `grpc://host:port` — one B over `connections` HTTP/2 connections
//!   (tonic channels, connected before the clock starts); request *k* takes
//!   connection *k* mod N. HTTP/2 multiplexes, so one connection carries
//!   many requests at once — up to the server's stream limit (hyper's
//!   default is 200), past which a call waits for a stream, as in any gRPC
//!   client.
//! * `etcd://host:port/<prefix>[?balance_load=pending|peak-ewma]` — every
//!   B registered under the prefix, through service A's own balancer
//!   (`service_a::balancer::Dialer` with `lb = etcd`: discovery from etcd,
//!   power-of-two-choices over requests in flight or, with
//!   `balance_load=peak-ewma`, over requests in flight weighted by a
//!   peak-EWMA of each B's latency, as A's
//!   `service_a.balance_load`; ejection of failing endpoints), so the load
//!   sees what A's calls see minus A's HTTP front.
//!
//! Errors are keyed by the status code's name (`unavailable`,
//! `deadline_exceeded`, …) when B answered, and by what went wrong when
//! none did: `connect`, `transport`, `timeout` (the call's deadline, which
//! is also sent to B as `grpc-timeout`), `no_endpoint` (the balancer holds
//! no B).

use std::time::Duration;

use anyhow::{Context, bail};
use lab_common::config::{BalanceLoad, LabConfig, LbMode};
use lab_proto::v1::{
    GetItemRequest, GetJobRequest, SubmitJobRequest, backend_client::BackendClient,
};
use service_a::balancer::{BackendChannel, Dialer, DiscoveryTask, NoEndpoint};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::{
    Code, Status,
    transport::{Channel, Endpoint},
};

use super::{
    LoadSpec,
    outcome::{ErrorKey, Outcome, ServedBy, Transport, id_for},
};

/// What `SubmitJob` sends: small, so the call measures the path, not the
/// payload (B's worker then runs each job, as it would any other).
const JOB_PAYLOAD: &str = "labctl load";
/// How long connecting to one B may take before the load starts anyway
/// (its calls then fail with `connect`).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the balancer may take to find a B that answers a health check
/// before the load starts anyway (its calls then fail as they will).
const DISCOVERY_WARM_UP: Duration = Duration::from_secs(5);
const DISCOVERY_RETRY: Duration = Duration::from_millis(25);

/// Which of B's methods to call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Method {
    GetItem,
    GetJob,
    SubmitJob,
}

impl Method {
    /// `lab.v1.Backend/GetItem`, with or without the leading `/`, or just
    /// `GetItem`.
    fn parse(name: &str) -> anyhow::Result<Self> {
        let name = name.trim_start_matches('/');
        let method = name.strip_prefix("lab.v1.Backend/").unwrap_or(name);
        Ok(match method {
            "GetItem" => Method::GetItem,
            "GetJob" => Method::GetJob,
            "SubmitJob" => Method::SubmitJob,
            _ => bail!(
                "unknown gRPC method {name:?}: expected lab.v1.Backend/GetItem, \
                 lab.v1.Backend/GetJob or lab.v1.Backend/SubmitJob"
            ),
        })
    }
}

/// A generated client on one connection to B, or on A's balancer.
#[derive(Clone)]
pub(crate) enum Client {
    Direct(BackendClient<Channel>),
    Balanced(BackendClient<BackendChannel>),
}

pub(crate) struct Grpc {
    clients: Vec<Client>,
    method: Method,
    seed: u64,
    id_max: u64,
    timeout: Duration,
}

/// The discovery behind an `etcd://` load, stopped when the load ends.
pub(crate) struct Discovery(DiscoveryTask);

impl Discovery {
    pub(crate) async fn stop(self) {
        self.0.stop().await;
    }
}

/// `host:port` of a `scheme://host:port[/path]` URL, and its path.
fn authority_and_path<'a>(url: &'a str, scheme: &str) -> anyhow::Result<(&'a str, &'a str)> {
    let rest = url
        .strip_prefix(scheme)
        .and_then(|rest| rest.strip_prefix("://"))
        .with_context(|| format!("expected a {scheme}:// URL, got {url:?}"))?;
    let (authority, path) = match rest.find('/') {
        Some(slash) => rest.split_at(slash),
        None => (rest, ""),
    };
    if authority.is_empty() {
        bail!("{url:?} has no host:port");
    }
    Ok((authority, path))
}

/// The config A's balancer gets from `etcd://host:port/<prefix>[?query]`:
/// etcd at `host:port`, the prefix as grpc-go reads `etcd:///<prefix>` (the
/// URL's path without its leading slash; a trailing slash added if missing,
/// so `etcd://host:port/lab/services/backend` is the lab's default layout),
/// and the load measure the query names.
fn balancer_config(url: &str) -> anyhow::Result<LabConfig> {
    let (url, query) = match url.split_once('?') {
        Some((url, query)) => (url, Some(query)),
        None => (url, None),
    };
    let (authority, prefix) = authority_and_path(url, "etcd")?;
    let mut config = LabConfig::default();
    config.etcd.endpoints = vec![format!("http://{authority}")];
    let prefix = prefix.trim_start_matches('/');
    if !prefix.is_empty() {
        config.etcd.prefix = if prefix.ends_with('/') {
            prefix.to_string()
        } else {
            format!("{prefix}/")
        };
    }
    config.service_a.balance_load = balance_load_of(query)?;
    Ok(config)
}

/// The load measure an `etcd://` URL's query names
/// (`?balance_load=peak-ewma`); A's default without one.
fn balance_load_of(query: Option<&str>) -> anyhow::Result<BalanceLoad> {
    let Some(query) = query else {
        return Ok(BalanceLoad::default());
    };
    let allowed = "pending, peak-ewma";
    let value = query.strip_prefix("balance_load=").with_context(|| {
        format!("unknown query {query:?} in an etcd:// URL: only balance_load=({allowed})")
    })?;
    <BalanceLoad as clap::ValueEnum>::from_str(value, false).map_err(|_| {
        anyhow::anyhow!("balance_load={value:?} in an etcd:// URL: expected one of {allowed}")
    })
}

impl Grpc {
    fn new(spec: &LoadSpec, clients: Vec<Client>) -> anyhow::Result<Self> {
        Ok(Self {
            clients,
            method: Method::parse(&spec.path)?,
            seed: spec.seed,
            id_max: spec.id_max,
            timeout: spec.timeout,
        })
    }

    /// `grpc://host:port`: `spec.connections` connections to one B.
    pub(crate) async fn direct(spec: &LoadSpec) -> anyhow::Result<Self> {
        let (authority, path) = authority_and_path(&spec.url, "grpc")?;
        if !path.trim_matches('/').is_empty() {
            bail!(
                "a grpc:// URL is host:port only (the method goes in --method), got {:?}",
                spec.url
            );
        }
        Method::parse(&spec.path)?;
        let endpoint = Endpoint::from_shared(format!("http://{authority}"))
            .with_context(|| format!("invalid --url {:?}", spec.url))?
            .connect_timeout(CONNECT_TIMEOUT.min(spec.timeout))
            .tcp_nodelay(true);
        let connecting = (0..spec.connections).map(|_| {
            let endpoint = endpoint.clone();
            async move {
                // Each `connect` is a connection of its own; one that fails
                // now is retried lazily by the calls that use it.
                match endpoint.connect().await {
                    Ok(channel) => channel,
                    Err(_) => endpoint.connect_lazy(),
                }
            }
        });
        let clients = futures::future::join_all(connecting)
            .await
            .into_iter()
            .map(|channel| Client::Direct(BackendClient::new(channel)))
            .collect();
        Self::new(spec, clients)
    }

    /// `etcd://host:port/<prefix>`: the Bs registered under the prefix,
    /// balanced by A's own balancer.
    pub(crate) async fn balanced(spec: &LoadSpec) -> anyhow::Result<(Self, Discovery)> {
        let config = balancer_config(&spec.url)?;
        if spec.connections != 1 {
            bail!(
                "--connections is for grpc:// only: A's balancer keeps one connection per B it discovers"
            );
        }
        Method::parse(&spec.path)?;
        let registry = prometheus::Registry::new();
        let endpoints = prometheus::IntGauge::new(
            "lab_backend_endpoints",
            "Endpoints in the load generator's balancer.",
        )?;
        let dialer = Dialer::new(&config, &registry, endpoints)?;
        let backends = dialer.dial(LbMode::Etcd, &CancellationToken::new());
        let discovery = backends
            .discovery
            .context("the etcd balancer came without its discovery task")?;
        warm_up(&backends.channel).await;
        let client = Client::Balanced(BackendClient::new(backends.channel));
        Ok((Self::new(spec, vec![client])?, Discovery(discovery)))
    }
}

/// Health-checks the balancer until some B answers (discovery has read the
/// registry and a connection is up), for at most [`DISCOVERY_WARM_UP`].
async fn warm_up(channel: &BackendChannel) {
    let deadline = Instant::now() + DISCOVERY_WARM_UP;
    while service_a::live_channel::check_health(channel.clone())
        .await
        .is_err()
        && Instant::now() < deadline
    {
        tokio::time::sleep(DISCOVERY_RETRY).await;
    }
}

/// Calls `$method` on whichever kind of client `$client` is; the reply's
/// `served_by`, or the status.
macro_rules! call {
    ($client:expr, $timeout:expr, $method:ident, $message:expr) => {{
        let mut request = tonic::Request::new($message);
        request.set_timeout($timeout);
        match $client {
            Client::Direct(c) => c
                .$method(request)
                .await
                .map(|reply| reply.into_inner().served_by),
            Client::Balanced(c) => c
                .$method(request)
                .await
                .map(|reply| reply.into_inner().served_by),
        }
    }};
}

impl Transport for Grpc {
    type Session = Vec<Client>;

    fn session(&self) -> Vec<Client> {
        self.clients.clone()
    }

    async fn warm(&self, _: &mut Vec<Client>) {}

    async fn call(&self, clients: &mut Vec<Client>, k: u64) -> Outcome {
        let n = clients.len() as u64;
        let Some(client) = clients.get_mut((k % n.max(1)) as usize) else {
            return Outcome::Failed("transport");
        };
        let id = i64::try_from(id_for(self.seed, k, self.id_max)).unwrap_or(i64::MAX);
        let result = match self.method {
            Method::GetItem => call!(client, self.timeout, get_item, GetItemRequest { id }),
            Method::GetJob => call!(client, self.timeout, get_job, GetJobRequest { job_id: id }),
            Method::SubmitJob => call!(
                client,
                self.timeout,
                submit_job,
                SubmitJobRequest {
                    payload: JOB_PAYLOAD.into()
                }
            ),
        };
        match result {
            Ok(served_by) => Outcome::Answered {
                status: 200,
                error: None,
                served_by: Some(ServedBy::Text(served_by)),
            },
            Err(status) => outcome_of(&status),
        }
    }
}

/// How a failed call ended: a status B sent, or one the client made up
/// because no B answered (it then carries the error as its source).
pub(crate) fn outcome_of(status: &Status) -> Outcome {
    let mut source = std::error::Error::source(status);
    let mut local = None;
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return Outcome::TimedOut;
        }
        if error.is::<tonic::ConnectError>() {
            local = Some("connect");
        } else if error.is::<NoEndpoint>() {
            local = Some("no_endpoint");
        }
        local.get_or_insert("transport");
        source = error.source();
    }
    if let Some(kind) = local {
        return Outcome::Failed(kind);
    }
    let served_by = status
        .metadata()
        .get(lab_proto::SERVED_BY_METADATA)
        .and_then(|v| v.to_str().ok())
        .map(|v| ServedBy::Text(v.to_owned()));
    Outcome::Answered {
        status: http_status(status.code()),
        error: Some(ErrorKey::Named(code_key(status.code()))),
        served_by,
    }
}

/// The report's name for a status code.
pub(crate) fn code_key(code: Code) -> &'static str {
    match code {
        Code::Ok => "ok",
        Code::Cancelled => "cancelled",
        Code::Unknown => "unknown",
        Code::InvalidArgument => "invalid_argument",
        Code::DeadlineExceeded => "deadline_exceeded",
        Code::NotFound => "not_found",
        Code::AlreadyExists => "already_exists",
        Code::PermissionDenied => "permission_denied",
        Code::ResourceExhausted => "resource_exhausted",
        Code::FailedPrecondition => "failed_precondition",
        Code::Aborted => "aborted",
        Code::OutOfRange => "out_of_range",
        Code::Unimplemented => "unimplemented",
        Code::Internal => "internal",
        Code::Unavailable => "unavailable",
        Code::DataLoss => "data_loss",
        Code::Unauthenticated => "unauthenticated",
    }
}

/// The HTTP status a gateway would answer for `code` (google.rpc.Code's
/// documented mapping), so the live window's 2xx / non-2xx split holds for
/// gRPC too.
fn http_status(code: Code) -> u16 {
    match code {
        Code::Ok => 200,
        Code::Cancelled => 499,
        Code::InvalidArgument | Code::FailedPrecondition | Code::OutOfRange => 400,
        Code::Unauthenticated => 401,
        Code::PermissionDenied => 403,
        Code::NotFound => 404,
        Code::AlreadyExists | Code::Aborted => 409,
        Code::ResourceExhausted => 429,
        Code::Unimplemented => 501,
        Code::Unavailable => 503,
        Code::DeadlineExceeded => 504,
        Code::Unknown | Code::Internal | Code::DataLoss => 500,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_in_any_of_their_spellings() {
        for name in [
            "lab.v1.Backend/GetItem",
            "/lab.v1.Backend/GetItem",
            "GetItem",
        ] {
            assert_eq!(Method::parse(name).unwrap(), Method::GetItem, "{name}");
        }
        assert_eq!(
            Method::parse("lab.v1.Backend/SubmitJob").unwrap(),
            Method::SubmitJob
        );
        let err = Method::parse("lab.v1.Backend/Nope").unwrap_err();
        assert!(err.to_string().contains("GetJob"), "{err}");
    }

    #[test]
    fn urls_split_into_authority_and_prefix() {
        assert_eq!(
            authority_and_path("etcd://127.0.0.1:2379/lab/services/backend/", "etcd").unwrap(),
            ("127.0.0.1:2379", "/lab/services/backend/")
        );
        assert_eq!(
            authority_and_path("grpc://h:1", "grpc").unwrap(),
            ("h:1", "")
        );
        assert!(authority_and_path("grpc:///x", "grpc").is_err());
        assert!(authority_and_path("http://h:1", "grpc").is_err());
    }

    #[test]
    fn an_etcd_url_configures_the_balancer() {
        let config = balancer_config("etcd://127.0.0.1:2379/x/bs/?balance_load=peak-ewma").unwrap();
        assert_eq!(config.etcd.endpoints, ["http://127.0.0.1:2379"]);
        assert_eq!(config.etcd.prefix, "x/bs/");
        // grpc-go's spelling: no trailing slash.
        let go = balancer_config("etcd://h:1/lab/services/backend").unwrap();
        assert_eq!(go.etcd.prefix, "lab/services/backend/");
        assert_eq!(config.service_a.balance_load, BalanceLoad::PeakEwma);
        let default = balancer_config("etcd://h:1").unwrap();
        assert_eq!(default.etcd.endpoints, ["http://h:1"]);
        assert_eq!(default.etcd.prefix, LabConfig::default().etcd.prefix);
        assert_eq!(default.service_a.balance_load, BalanceLoad::Pending);
        assert!(balancer_config("etcd://h:1?balance_load=nope").is_err());
    }

    #[test]
    fn an_etcd_url_query_picks_the_load_measure() {
        assert_eq!(balance_load_of(None).unwrap(), BalanceLoad::Pending);
        assert_eq!(
            balance_load_of(Some("balance_load=peak-ewma")).unwrap(),
            BalanceLoad::PeakEwma
        );
        let err = balance_load_of(Some("balance_load=fastest")).unwrap_err();
        assert!(err.to_string().contains("peak-ewma"), "{err}");
        let err = balance_load_of(Some("lb=l7")).unwrap_err();
        assert!(err.to_string().contains("\"lb=l7\""), "{err}");
    }

    #[test]
    fn a_status_made_by_the_client_is_a_transport_kind_not_a_code() {
        let from_server = Status::unavailable("shedding");
        assert!(matches!(
            outcome_of(&from_server),
            Outcome::Answered {
                status: 503,
                error: Some(ErrorKey::Named("unavailable")),
                ..
            }
        ));
        let refused = Status::from_error(Box::new(tonic::ConnectError(Box::new(
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused),
        ))));
        assert_eq!(refused.code(), Code::Unavailable);
        assert!(matches!(outcome_of(&refused), Outcome::Failed("connect")));
        let deadline = Status::from_error(Box::new(tonic::TimeoutExpired(())));
        assert!(matches!(outcome_of(&deadline), Outcome::TimedOut));
        let mut none_registered = Status::unavailable("no B instance is registered");
        none_registered.set_source(std::sync::Arc::new(NoEndpoint));
        assert!(matches!(
            outcome_of(&none_registered),
            Outcome::Failed("no_endpoint")
        ));
    }
}
