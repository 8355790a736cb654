//! Cause 4a — B's outbound HTTPS client to the partner API
//! (`faults.http_client`), both forms side by side.
//!
//! Every job the worker handles ends with one call, `POST /v1/enrich`, to
//! partner-api over TLS (rustls), trusting exactly the lab's private CA.
//!
//! * `per-request` (the incident): the Go code, translated. For every call
//!   it read the CA from disk, built a new `tls.Config` and a new
//!   `http.Client` with its own transport, sent the request with no timeout,
//!   checked the status — and never closed the body. In Go the unclosed body
//!   pinned the connection, whose goroutines kept the transport reachable:
//!   socket, buffers, TLS state and pool leaked together, and no connection
//!   was ever reused, so every call paid a full TLS handshake. Rust would
//!   release all of that when the response and the client go out of scope
//!   (hyper would close the unread connection), so this form keeps the real
//!   objects: each call's `(Client, Response)` pair goes into a list that is
//!   never drained ([`UnclosedResponse`]). Each entry holds an open socket
//!   (an fd), hyper's connection task, rustls' session buffers and the
//!   client's own pool — `process_open_fds`, `tokio_alive_tasks` and RSS
//!   grow with it, and partner-api sees one TLS handshake per call. The
//!   client speaks HTTP/1.1 only (Go drops HTTP/2 for a custom `tls.Config`),
//!   and partner-api's answers are larger than one read, so the connection
//!   really stays busy: a small, fully-buffered body would free it.
//! * `shared` (the fix): one client built at start (the CA read once), with
//!   a connect timeout, a timeout on the whole call, and at most
//!   `partner.client_max_connections` calls — and so connections — at once;
//!   every body is read to the end under a size limit, so each connection
//!   goes back to the pool and is reused (one handshake per connection).
//!
//! Both forms live side by side in one [`PartnerClient`], and each call
//! takes the form the switch says at its start, so `PUT /faults` applies to
//! the next call: after a flip to `shared` no client is built any more (the
//! shared one is built at start under `shared`, otherwise by the first call
//! after the flip), after a flip back every call builds one again. Calls in
//! flight finish in the form they started in. A flip does not undo the
//! leak: the `(Client, Response)` pairs already kept stay kept, with their
//! sockets, until B restarts — as the Go process's did.

use std::{
    fmt,
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use lab_common::{
    config::{HttpClientMode, PartnerConfig},
    faults::LiveFaults,
};
use prometheus::{Histogram, IntCounter, IntCounterVec, IntGauge, Registry};
use tokio::{
    sync::{OnceCell, Semaphore},
    time::Instant,
};

use lab_common::metrics::Registrar;

/// Outbound HTTP metrics.
#[derive(Clone)]
pub struct HttpClientMetrics {
    clients_built: IntCounter,
    connections_opened: IntCounter,
    responses_unclosed: IntGauge,
    calls: IntCounterVec,
    call_duration: Histogram,
}

impl HttpClientMetrics {
    /// `self_reported` takes `lab_http_responses_unclosed`, which the
    /// leaking code path counts itself (a drill hides it: see B's app).
    pub fn register(registry: &Registry, self_reported: &Registry) -> prometheus::Result<Self> {
        let r = Registrar(registry);
        Ok(Self {
            clients_built: r.int_counter(
                "lab_http_clients_built_total",
                "HTTP clients (each with its own TLS config and connection pool) built by B.",
            )?,
            connections_opened: r.int_counter(
                "lab_http_connections_opened_total",
                "Outbound TCP+TLS connections opened by B (each one a full TLS handshake).",
            )?,
            responses_unclosed: Registrar(self_reported).int_gauge(
                "lab_http_responses_unclosed",
                "Partner responses whose body was never read or closed, each holding its connection and client.",
            )?,
            calls: r.int_counter_vec(
                "lab_partner_calls_total",
                "Calls to partner-api, by outcome (ok, http_error, timeout, error).",
                &["outcome"],
            )?,
            call_duration: r.latency_histogram(
                "lab_partner_call_duration_seconds",
                "Time of one call to partner-api, until its result was known.",
            )?,
        })
    }
}

/// What the partner told us about a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enrichment {
    /// `shared`: the body was read, and its `score`.
    Score(u64),
    /// `per-request`: only the status was looked at (the body never read).
    StatusOnly(u16),
}

impl fmt::Display for Enrichment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Enrichment::Score(s) => write!(f, "partner score {s}"),
            Enrichment::StatusOnly(code) => write!(f, "partner status {code}"),
        }
    }
}

/// Why a partner call failed.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("partner call timed out: {0}")]
    Timeout(String),
    #[error("partner answered HTTP {0}")]
    Status(u16),
    #[error("partner call failed: {0}")]
    Failed(String),
}

impl CallError {
    fn outcome(&self) -> &'static str {
        match self {
            CallError::Timeout(_) => "timeout",
            CallError::Status(_) => "http_error",
            CallError::Failed(_) => "error",
        }
    }
}

impl From<reqwest::Error> for CallError {
    fn from(e: reqwest::Error) -> Self {
        // The whole source chain: reqwest's own message is often just
        // "error sending request".
        let mut message = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            message.push_str(": ");
            message.push_str(&s.to_string());
            source = s.source();
        }
        if e.is_timeout() {
            CallError::Timeout(message)
        } else {
            CallError::Failed(message)
        }
    }
}

/// B's client of partner-api: both forms, the switch choosing per call.
pub struct PartnerClient {
    url: String,
    metrics: HttpClientMetrics,
    /// B's live switches; `http_client` is read per call.
    faults: LiveFaults,
    per_request: PerRequest,
    /// Built at start under `shared`, else by the first `shared` call.
    shared: OnceCell<Shared>,
    config: PartnerConfig,
}

/// `per-request`: what every call rebuilds, and what it never lets go of.
struct PerRequest {
    ca_cert: PathBuf,
    unclosed: Mutex<Vec<UnclosedResponse>>,
}

/// A response whose body was never read, kept with the client that made it
/// — the Go leak made explicit. Never dropped.
struct UnclosedResponse {
    _client: reqwest::Client,
    _response: reqwest::Response,
}

/// `shared`: one client, a bound on calls in flight, a body size limit.
struct Shared {
    client: reqwest::Client,
    in_flight: Semaphore,
    timeout: Duration,
    max_body_bytes: usize,
}

impl Shared {
    /// The one pooled client. Reads the CA once and fails if it cannot.
    fn build(config: &PartnerConfig, metrics: &HttpClientMetrics) -> anyhow::Result<Self> {
        let pem = std::fs::read(&config.ca_cert)
            .map_err(|e| anyhow::anyhow!("reading partner.ca_cert {:?}: {e}", config.ca_cert))?;
        let max = config.client_max_connections as usize;
        let client = client_builder(tls_config(&pem)?, metrics)
            .connect_timeout(config.client_connect_timeout)
            .timeout(config.client_timeout)
            .pool_max_idle_per_host(max)
            // Close idle connections before partner-api does (its
            // idle timeout), so a reused one is never half-closed.
            .pool_idle_timeout(config.idle_timeout.mul_f64(0.5))
            .build()?;
        metrics.clients_built.inc();
        Ok(Shared {
            client,
            in_flight: Semaphore::new(max),
            timeout: config.client_timeout,
            max_body_bytes: config.client_max_body_bytes,
        })
    }
}

impl PartnerClient {
    /// The client of B's switches `faults`. Under `shared` it builds the
    /// shared client now (reading the CA) and fails if it cannot;
    /// `per-request` reads the CA on every call, as the Go code did.
    pub fn new(
        faults: LiveFaults,
        config: &PartnerConfig,
        metrics: HttpClientMetrics,
    ) -> anyhow::Result<Self> {
        let url = format!("{}/v1/enrich", config.url.trim_end_matches('/'));
        let shared = match faults.current().http_client {
            HttpClientMode::Shared => OnceCell::new_with(Some(Shared::build(config, &metrics)?)),
            HttpClientMode::PerRequest => OnceCell::new(),
        };
        Ok(Self {
            url,
            metrics,
            faults,
            per_request: PerRequest {
                ca_cert: PathBuf::from(&config.ca_cert),
                unclosed: Mutex::new(Vec::new()),
            },
            shared,
            config: config.clone(),
        })
    }

    /// `POST /v1/enrich` with the job's payload, in the form in force now.
    pub async fn enrich(&self, payload: &str) -> Result<Enrichment, CallError> {
        let started = Instant::now();
        let body = serde_json::json!({ "payload": payload }).to_string();
        let result = match self.faults.current().http_client {
            HttpClientMode::PerRequest => self.enrich_per_request(&self.per_request, body).await,
            HttpClientMode::Shared => match self.shared_client().await {
                Ok(form) => self.enrich_shared(form, body).await,
                Err(e) => Err(e),
            },
        };
        self.metrics
            .call_duration
            .observe(started.elapsed().as_secs_f64());
        let outcome = result.as_ref().map_or_else(CallError::outcome, |_| "ok");
        self.metrics.calls.with_label_values(&[outcome]).inc();
        // One line per job, in the job's span: its trace id ties the job to
        // the request that submitted it and to the partner's log line.
        tracing::info!(
            outcome,
            elapsed_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "partner called"
        );
        result
    }

    /// The shared client, built by the first call that needs it (after a
    /// flip from `per-request`); a failed build is tried again next call.
    /// The build reads the CA file and parses it into a TLS config, blocking
    /// work, so it runs on tokio's blocking pool, not on a runtime thread
    /// that serves requests; calls arriving meanwhile wait for that one
    /// build.
    async fn shared_client(&self) -> Result<&Shared, CallError> {
        self.shared
            .get_or_try_init(|| async {
                let (config, metrics) = (self.config.clone(), self.metrics.clone());
                tokio::task::spawn_blocking(move || Shared::build(&config, &metrics))
                    .await
                    .map_err(|e| anyhow::anyhow!("the client build task failed: {e}"))?
            })
            .await
            .map_err(|e| CallError::Failed(format!("building the shared partner client: {e:#}")))
    }

    /// `POST /v1/enrich` with `body`, on `client` — in both forms, with the
    /// job's trace context as `traceparent`, so the partner's log names the
    /// trace of the request that submitted the job.
    fn request(&self, client: &reqwest::Client, body: String) -> reqwest::RequestBuilder {
        let mut headers = http::HeaderMap::new();
        lab_common::trace::inject(&tracing::Span::current(), &mut headers);
        client
            .post(&self.url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .headers(headers)
            .body(body)
    }

    /// The incident's call: new TLS config, new client, no timeout, status
    /// checked, body never read, everything kept.
    async fn enrich_per_request(
        &self,
        form: &PerRequest,
        body: String,
    ) -> Result<Enrichment, CallError> {
        let pem = tokio::fs::read(&form.ca_cert).await.map_err(|e| {
            CallError::Failed(format!(
                "reading partner.ca_cert {}: {e}",
                form.ca_cert.display()
            ))
        })?;
        let tls = tls_config(&pem).map_err(|e| CallError::Failed(e.to_string()))?;
        let client = client_builder(tls, &self.metrics).http1_only().build()?;
        self.metrics.clients_built.inc();
        let response = self.request(&client, body).send().await?;
        let status = response.status().as_u16();
        // resp, err := client.Do(req); if resp.StatusCode != 200 { return … }
        // — and no `defer resp.Body.Close()` on any path.
        if let Ok(mut unclosed) = form.unclosed.lock() {
            unclosed.push(UnclosedResponse {
                _client: client,
                _response: response,
            });
            self.metrics.responses_unclosed.set(unclosed.len() as i64);
        }
        if status == 200 {
            Ok(Enrichment::StatusOnly(status))
        } else {
            Err(CallError::Status(status))
        }
    }

    /// The fix: the shared client, bounded in time, connections and size.
    async fn enrich_shared(&self, form: &Shared, body: String) -> Result<Enrichment, CallError> {
        let call = async {
            let _slot = form
                .in_flight
                .acquire()
                .await
                .map_err(|_| CallError::Failed("client closed".into()))?;
            let mut response = self.request(&form.client, body).send().await?;
            let status = response.status().as_u16();
            let limit = form.max_body_bytes;
            if response.content_length().is_some_and(|n| n > limit as u64) {
                // Dropping an unread response closes its connection.
                return Err(CallError::Failed(format!(
                    "partner answer is larger than {limit} bytes (partner.client_max_body_bytes)"
                )));
            }
            let mut bytes = Vec::new();
            while let Some(chunk) = response.chunk().await? {
                if bytes.len() + chunk.len() > limit {
                    return Err(CallError::Failed(format!(
                        "partner answer is larger than {limit} bytes (partner.client_max_body_bytes)"
                    )));
                }
                bytes.extend_from_slice(&chunk);
            }
            if status != 200 {
                return Err(CallError::Status(status));
            }
            score(&bytes).map(Enrichment::Score)
        };
        // The client's own timeout covers the request; this one also covers
        // waiting for a free slot.
        tokio::time::timeout(form.timeout, call)
            .await
            .unwrap_or_else(|_| {
                Err(CallError::Timeout(format!(
                    "no answer within {:?} (partner.client_timeout)",
                    form.timeout
                )))
            })
    }
}

/// What both forms' clients share: the TLS config, connections counted,
/// no proxy.
fn client_builder(
    tls: rustls::ClientConfig,
    metrics: &HttpClientMetrics,
) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connector_layer(CountConnectionsLayer(metrics.connections_opened.clone()))
        .no_proxy()
}

/// The `score` of partner-api's JSON answer.
fn score(body: &[u8]) -> Result<u64, CallError> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| CallError::Failed(format!("partner answer is not JSON: {e}")))?;
    value
        .get("score")
        .and_then(serde_json::Value::as_u64)
        .ok_or_else(|| CallError::Failed("partner answer has no numeric `score`".into()))
}

/// A rustls client config (ring provider) that trusts only the CA in `pem`.
fn tls_config(pem: &[u8]) -> anyhow::Result<rustls::ClientConfig> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(pem) {
        roots.add(cert.map_err(|e| anyhow::anyhow!("partner.ca_cert: {e}"))?)?;
    }
    anyhow::ensure!(!roots.is_empty(), "partner.ca_cert holds no certificate");
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Ok(rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth())
}

/// Counts the connections reqwest's connector opens (TCP connect + TLS
/// handshake done), whichever form asked.
#[derive(Clone)]
struct CountConnectionsLayer(IntCounter);

impl<S> tower::Layer<S> for CountConnectionsLayer {
    type Service = CountConnections<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CountConnections {
            inner,
            opened: self.0.clone(),
        }
    }
}

#[derive(Clone)]
struct CountConnections<S> {
    inner: S,
    opened: IntCounter,
}

impl<S, R> tower::Service<R> for CountConnections<S>
where
    S: tower::Service<R>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: R) -> Self::Future {
        let connecting = self.inner.call(request);
        let opened = self.opened.clone();
        Box::pin(async move {
            let connection = connecting.await?;
            opened.inc();
            Ok(connection)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_is_read_from_the_json_answer() {
        assert_eq!(score(br#"{"score": 42, "padding": "xx"}"#).ok(), Some(42));
        assert!(score(b"not json").is_err());
        assert!(score(br#"{"padding": "xx"}"#).is_err());
    }

    #[test]
    fn a_pem_without_certificates_is_refused() {
        assert!(tls_config(b"").is_err());
        assert!(tls_config(b"-----BEGIN CERTIFICATE-----\nnot base64\n").is_err());
    }
}
