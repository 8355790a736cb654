//! Test harness: each test gets its own lab — real MariaDB/MySQL, etcd,
//! HAProxy and the lab's own binaries on free loopback ports, in a temporary
//! state dir — started by the same launcher as `labctl up`.
//!
//! The service binaries must be built first (`cargo build --workspace`;
//! `scripts/test.sh` does it): the launcher looks for them in
//! `target/<profile>/`, next to the test executable's `deps/` folder.
//!
//! [`browser`] opens a scenario report in headless Chromium.

pub mod browser;

use std::{
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use lab_common::config::{LabConfig, Sources};
use labctl::{
    launcher::{Stack, UpOptions},
    ports::PortPolicy,
};

/// A running lab that is stopped (and its state dir removed) on drop.
pub struct TestLab {
    pub stack: Stack,
    // Declared after `stack` so the processes stop before the dir goes.
    _dir: tempfile::TempDir,
}

impl TestLab {
    /// Starts a lab with `backends` B instances and `--set`-style overrides
    /// applied to the built-in defaults (the environment is ignored).
    pub async fn start(backends: usize, overrides: &[&str]) -> anyhow::Result<TestLab> {
        let config = lab_common::config::load(&Sources {
            overrides: overrides.iter().map(|s| s.to_string()).collect(),
            ..Sources::default()
        })?;
        Self::start_with(backends, config).await
    }

    pub async fn start_with(backends: usize, config: LabConfig) -> anyhow::Result<TestLab> {
        Self::start_customised(backends, config, |_, _| {}).await
    }

    /// Like [`TestLab::start_with`], letting the test adjust the launch
    /// options; `customise` also gets the state dir the lab will use.
    pub async fn start_customised(
        backends: usize,
        config: LabConfig,
        customise: impl FnOnce(&mut UpOptions, &Path),
    ) -> anyhow::Result<TestLab> {
        let dir = tempfile::Builder::new().prefix("lab-e2e-").tempdir()?;
        let state_dir = dir.path().join("state");
        let mut options = UpOptions::new(config, &state_dir);
        options.backends = backends;
        options.ports = PortPolicy::Auto;
        customise(&mut options, &state_dir);
        let stack = Stack::up(options).await?;
        Ok(TestLab { stack, _dir: dir })
    }

    /// A's base URL.
    pub fn a_url(&self) -> String {
        self.stack.a_url()
    }

    /// The admin URL of a named service.
    pub fn admin_url(&self, name: &str) -> anyhow::Result<String> {
        self.stack
            .service(name)?
            .admin_url
            .clone()
            .ok_or_else(|| anyhow::anyhow!("{name} has no admin URL"))
    }

    /// The operator token `labctl up` generated for this lab.
    pub fn admin_token(&self) -> String {
        self.stack.config().admin.token.expose().to_string()
    }

    /// `method path` on a named service's admin listener with the lab's
    /// operator token; the response as it came.
    pub async fn operator(
        &self,
        name: &str,
        method: &str,
        path: &str,
        body: Option<String>,
    ) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{path}", self.admin_url(name)?);
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .with_context(|| format!("{method:?} is not an HTTP method"))?;
        let mut request = plain_client()?
            .request(method.clone(), &url)
            .bearer_auth(self.admin_token());
        if let Some(body) = body {
            request = request
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(body);
        }
        request
            .send()
            .await
            .with_context(|| format!("{method} {url}"))
    }

    /// Everything a named service has logged so far (its stderr, which the
    /// launcher writes to `<state-dir>/logs/<name>.log`).
    pub fn log(&self, name: &str) -> anyhow::Result<String> {
        let path = &self.stack.service(name)?.log;
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }

    /// The `/metrics` text of a named service.
    pub async fn metrics(&self, name: &str) -> anyhow::Result<String> {
        let url = format!("{}/metrics", self.admin_url(name)?);
        let response = plain_client()?
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .with_context(|| format!("GET {url}"))?;
        let status = response.status();
        anyhow::ensure!(status.is_success(), "GET {url} answered {status}");
        response
            .text()
            .await
            .with_context(|| format!("reading the body of GET {url}"))
    }
}

/// Polls `check` every 100 ms until it returns `Some`, for at most `timeout`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return Ok(value);
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

impl TestLab {
    /// A connection pool to the lab's database (to check job rows).
    pub async fn db(&self) -> anyhow::Result<sqlx::MySqlPool> {
        Ok(sqlx::mysql::MySqlPoolOptions::new()
            .max_connections(2)
            .connect(&self.stack.config.mysql.url)
            .await?)
    }

    /// Inserts `count` jobs at once (`poison` of them undecodable).
    pub async fn insert_jobs(
        &self,
        count: u64,
        poison: f64,
    ) -> anyhow::Result<labctl::jobs::JobReport> {
        let spec = labctl::jobs::JobSpec {
            mysql_url: self.stack.config.mysql.url.clone(),
            rate: count as f64 * 10.0,
            duration: Duration::from_millis(100),
            poison_ratio: poison,
            payload_bytes: 1024,
            seed: 7,
        };
        labctl::jobs::produce(&spec).await
    }

    /// HAProxy's view of one server (`UP`, `DOWN`, `UP 1/2`, …) in one
    /// backend (`b_l4`, `b_l7`), from its stats page as CSV.
    pub async fn haproxy_status(&self, backend: &str, server: &str) -> anyhow::Result<String> {
        let url = format!("{}/stats;csv", self.admin_url("slb")?.trim_end_matches('/'));
        let csv = plain_client()?
            .get(&url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .with_context(|| format!("GET {url}"))?
            .text()
            .await?;
        haproxy_csv_status(&csv, backend, server)
            .ok_or_else(|| anyhow::anyhow!("{backend}/{server} not in HAProxy's stats:\n{csv}"))
    }

    /// One metric of a named service, summed over matching samples.
    pub async fn metric(&self, name: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let text = self.metrics(name).await.ok()?;
        metric_sum(&text, metric, labels)
    }
}

/// The `status` column of `backend`/`server` in HAProxy's stats CSV
/// (its first line names the columns: `# pxname,svname,…,status,…`).
pub fn haproxy_csv_status(csv: &str, backend: &str, server: &str) -> Option<String> {
    let mut lines = csv.lines();
    let header = lines.next()?.trim_start_matches("# ");
    let status = header.split(',').position(|c| c == "status")?;
    lines.find_map(|line| {
        let fields: Vec<&str> = line.split(',').collect();
        (fields.first() == Some(&backend) && fields.get(1) == Some(&server))
            .then(|| fields.get(status).map(|s| (*s).to_owned()))?
    })
}

/// Sum of every sample of `name` whose labels include all of `labels`.
/// Returns `None` when no sample matches (so a missing metric fails loudly).
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let Some(rest) = line.strip_prefix(name) else {
            continue;
        };
        let (label_part, value) = if let Some(inner) = rest.strip_prefix('{') {
            let Some((inner, value)) = inner.rsplit_once('}') else {
                continue;
            };
            (inner, value)
        } else if rest.starts_with(' ') {
            ("", rest)
        } else {
            continue; // a longer metric name with the same prefix
        };
        let matches = labels.iter().all(|(k, v)| {
            label_part
                .split(',')
                .any(|pair| pair == format!("{k}=\"{v}\""))
        });
        if !matches {
            continue;
        }
        if let Ok(v) = value.trim().parse::<f64>() {
            *found.get_or_insert(0.0) += v;
        }
    }
    found
}

/// What one request to the lab came to: status, `x-served-by`, the body as
/// JSON (`Null` when it is not JSON), and how long the exchange took.
pub type JsonReply = (u16, Option<String>, serde_json::Value, Duration);

/// A GET against the lab; see [`JsonReply`].
pub async fn get_json(url: &str) -> anyhow::Result<JsonReply> {
    request_json("GET", url, None).await
}

/// Any request with an optional JSON body; see [`JsonReply`].
pub async fn request_json(
    method: &str,
    url: &str,
    body: Option<String>,
) -> anyhow::Result<JsonReply> {
    let method = reqwest::Method::from_bytes(method.as_bytes())
        .with_context(|| format!("{method:?} is not an HTTP method"))?;
    let mut request = plain_client()?
        .request(method.clone(), url)
        .header(reqwest::header::CONTENT_TYPE, "application/json");
    if let Some(body) = body {
        request = request.body(body);
    }
    let started = std::time::Instant::now();
    let response = request
        .send()
        .await
        .with_context(|| format!("{method} {url}"))?;
    let status = response.status().as_u16();
    let served_by = response
        .headers()
        .get("x-served-by")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = response
        .bytes()
        .await
        .with_context(|| format!("reading the body of {method} {url}"))?;
    let elapsed = started.elapsed();
    let json = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok((status, served_by, json, elapsed))
}

/// A client that adds nothing between a test and the service: no retries,
/// no redirects, no proxy, and no idle connection kept, so every request
/// is exactly one exchange on a connection of its own, timed end to end.
/// The lab speaks plain HTTP, but reqwest's rustls backend (built without
/// a default provider, see the workspace manifest) needs one to build at
/// all: ring, trusting no root, so an `https` URL here fails loudly.
pub fn plain_client() -> anyhow::Result<reqwest::Client> {
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .retry(reqwest::retry::never())
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .pool_max_idle_per_host(0)
        // Far above any latency a test provokes: only a hung lab hits it.
        .timeout(Duration::from_secs(60))
        .build()
        .context("building the test HTTP client")
}

/// A client that trusts only the CA in `ca_pem` — the lab's CA, for calls
/// straight to partner-api (ring provider, as [`plain_client`]).
pub fn partner_client(ca_pem: &str) -> anyhow::Result<reqwest::Client> {
    use rustls::pki_types::{CertificateDer, pem::PemObject};
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_pem).context("reading the lab's CA")? {
        roots.add(cert?)?;
    }
    let tls = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .context("TLS protocol versions")?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .no_proxy()
        .build()?)
}

/// A TCP relay to the lab's etcd that a test can cut: while cut, it
/// forwards nothing in either direction and holds new connections, without
/// closing anything — a network partition, not a refused connection.
///
/// The etcd it forwards to is read, per connection, from the lab's config
/// file, which the launcher writes before it starts any process. (Unlike a
/// real partition it still accepts TCP connections while cut, so a client
/// sees its HTTP/2 handshake stall rather than its connect time out; the
/// effect on the lease is the same.)
pub struct EtcdRelay {
    pub addr: std::net::SocketAddr,
    cut: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl EtcdRelay {
    /// Listens at once (synchronous, so it can be set up while the lab's
    /// launch options are being prepared); must run inside a tokio runtime.
    pub fn start(lab_config_file: PathBuf) -> anyhow::Result<Self> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let addr = listener.local_addr()?;
        let (cut, cut_rx) = tokio::sync::watch::channel(false);
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let file = lab_config_file.clone();
                let cut = cut_rx.clone();
                tokio::spawn(async move {
                    let _ = relay_connection(client, &file, cut).await;
                });
            }
        });
        Ok(Self { addr, cut, task })
    }

    /// `http://addr`, as an `etcd.endpoints` value.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Starts (`true`) or ends (`false`) the partition.
    pub fn set_cut(&self, cut: bool) {
        self.cut.send_replace(cut);
    }
}

impl Drop for EtcdRelay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn relay_connection(
    client: tokio::net::TcpStream,
    lab_config_file: &Path,
    mut cut: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    cut.wait_for(|cut| !cut).await?;
    let config = lab_common::config::check_file(lab_config_file)?;
    let etcd = config
        .etcd
        .endpoints
        .first()
        .and_then(|u| u.strip_prefix("http://"))
        .ok_or_else(|| anyhow::anyhow!("no http etcd endpoint in the lab's config"))?
        .to_owned();
    let upstream = tokio::net::TcpStream::connect(etcd).await?;
    let (client_read, client_write) = client.into_split();
    let (upstream_read, upstream_write) = upstream.into_split();
    tokio::select! {
        _ = pump(client_read, upstream_write, cut.clone()) => {}
        _ = pump(upstream_read, client_write, cut) => {}
    }
    Ok(())
}

/// Copies bytes one way, holding them (not dropping them) while cut.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut cut: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        cut.wait_for(|cut| !cut).await?;
        let n = tokio::select! {
            n = from.read(&mut buf) => n?,
            // Stop reading the moment the cut starts.
            _ = cut.wait_for(|cut| *cut) => continue,
        };
        if n == 0 {
            return Ok(());
        }
        cut.wait_for(|cut| !cut).await?;
        to.write_all(&buf[..n]).await?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haproxy_csv_status_reads_the_status_column_of_one_server() {
        let csv = "# pxname,svname,qcur,status,weight\n\
                   b_l4,b-1,0,UP,1\nb_l4,b-2,0,DOWN,1\nb_l7,b-1,0,UP 1/2,1\nb_l4,BACKEND,0,UP,2\n";
        assert_eq!(
            haproxy_csv_status(csv, "b_l4", "b-2").as_deref(),
            Some("DOWN")
        );
        assert_eq!(
            haproxy_csv_status(csv, "b_l7", "b-1").as_deref(),
            Some("UP 1/2")
        );
        assert_eq!(haproxy_csv_status(csv, "b_l7", "b-2"), None);
    }

    #[test]
    fn metric_sum_matches_names_and_labels_exactly() {
        let text = "# HELP x\nlab_grpc_requests_total{method=\"GetItem\",code=\"OK\"} 7\n\
                    lab_grpc_requests_total{method=\"GetItem\",code=\"NotFound\"} 2\n\
                    lab_grpc_requests_total{method=\"GetJob\",code=\"OK\"} 5\n\
                    lab_grpc_requests_total_extra 100\nprocess_threads 9\n\
                    lab_http_requests_total{route=\"/api/items/{id}\",status=\"404\"} 3\n";
        assert_eq!(
            metric_sum(text, "lab_grpc_requests_total", &[("method", "GetItem")]),
            Some(9.0)
        );
        assert_eq!(metric_sum(text, "lab_grpc_requests_total", &[]), Some(14.0));
        assert_eq!(metric_sum(text, "process_threads", &[]), Some(9.0));
        assert_eq!(
            metric_sum(
                text,
                "lab_http_requests_total",
                &[("route", "/api/items/{id}")]
            ),
            Some(3.0)
        );
        assert_eq!(
            metric_sum(text, "lab_grpc_requests_total", &[("method", "Nope")]),
            None
        );
    }
}
