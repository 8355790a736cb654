//! Readiness probes used while starting the stack: a small HTTP GET and a
//! MySQL greeting check.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::{io::AsyncReadExt, net::TcpStream};

/// A plain-HTTP client (the lab's admin and API ports are HTTP/1.1).
pub type HttpClient = Client<HttpConnector, Empty<Bytes>>;

pub fn http_client() -> HttpClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(Duration::from_secs(1)));
    Client::builder(TokioExecutor::new()).build(connector)
}

/// Why a probe GET failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("invalid URL {url:?}")]
    Url {
        url: String,
        #[source]
        source: hyper::http::uri::InvalidUri,
    },
    #[error("GET {url}")]
    Request {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("GET {url}: reading the body")]
    Body {
        url: String,
        #[source]
        source: hyper::Error,
    },
    #[error("GET {url} timed out after {timeout:?}")]
    Timeout { url: String, timeout: Duration },
}

/// GET `url`, returning the status and body, within `timeout`.
pub async fn get(
    client: &HttpClient,
    url: &str,
    timeout: Duration,
) -> Result<(u16, Bytes), ProbeError> {
    let uri: hyper::Uri = url.parse().map_err(|source| ProbeError::Url {
        url: url.to_string(),
        source,
    })?;
    let fetch = async {
        let response = client
            .get(uri)
            .await
            .map_err(|source| ProbeError::Request {
                url: url.to_string(),
                source,
            })?;
        let status = response.status().as_u16();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|source| ProbeError::Body {
                url: url.to_string(),
                source,
            })?
            .to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(timeout, fetch)
        .await
        .map_err(|_| ProbeError::Timeout {
            url: url.to_string(),
            timeout,
        })?
}

/// True when `url` answers 200.
pub async fn http_ok(client: &HttpClient, url: &str) -> bool {
    matches!(get(client, url, Duration::from_secs(2)).await, Ok((200, _)))
}

/// True when a MySQL-protocol server at `addr` sends its handshake
/// (protocol version 10) — i.e. it accepts clients, not just TCP.
pub async fn mysql_greets(addr: &str) -> bool {
    let check = async {
        let mut stream = TcpStream::connect(addr).await.ok()?;
        let mut header = [0u8; 5];
        stream.read_exact(&mut header).await.ok()?;
        Some(header[4] == 10)
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), check).await,
        Ok(Some(true))
    )
}
