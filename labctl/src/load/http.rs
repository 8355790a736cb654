//! HTTP/1.1 at A: each worker has its own keep-alive connection, dialled on
//! first use and again after any error — no shared pool, so workers never
//! contend on a lock.

use std::fmt::Write;

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;

use super::{
    LoadSpec,
    outcome::{ErrorKey, Outcome, ServedBy, Transport, id_for},
};

/// Where requests go: `host:port` to dial, the Host header, and the path
/// cut at each `{rand}`.
pub(crate) struct Http {
    addr: String,
    host: http::HeaderValue,
    /// The path's pieces between `{rand}`s (one piece: no `{rand}`).
    pieces: Vec<String>,
    seed: u64,
    id_max: u64,
}

/// A worker's connection and the buffer its paths are written into.
pub(crate) struct Connection {
    sender: Option<http1::SendRequest<Empty<Bytes>>>,
    path: String,
}

impl Http {
    pub(crate) fn new(spec: &LoadSpec) -> anyhow::Result<Self> {
        let url = &spec.url;
        let base: hyper::Uri = url
            .parse()
            .with_context(|| format!("invalid --url {url:?}"))?;
        if base.scheme_str() != Some("http") {
            bail!("--url must be an http:// URL, got {url:?}");
        }
        let authority = base
            .authority()
            .with_context(|| format!("--url {url:?} has no host"))?;
        let port = authority.port_u16().unwrap_or(80);
        let addr = format!("{}:{port}", authority.host());
        let prefix = base.path().trim_end_matches('/');
        let path = &spec.path;
        let path = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("/{path}")
        };
        let template = format!("{prefix}{path}");
        // Check once that the path makes a valid URI.
        template
            .replace("{rand}", "1")
            .parse::<hyper::Uri>()
            .with_context(|| format!("invalid --path {path:?}"))?;
        Ok(Self {
            host: http::HeaderValue::from_str(authority.as_str())?,
            addr,
            pieces: template.split("{rand}").map(str::to_owned).collect(),
            seed: spec.seed,
            id_max: spec.id_max,
        })
    }

    /// Writes request `k`'s path into `buffer`.
    fn path_of(&self, k: u64, buffer: &mut String) {
        buffer.clear();
        let id = id_for(self.seed, k, self.id_max);
        for (i, piece) in self.pieces.iter().enumerate() {
            if i > 0 {
                let _ = write!(buffer, "{id}");
            }
            buffer.push_str(piece);
        }
    }

    async fn dial(&self) -> Result<http1::SendRequest<Empty<Bytes>>, &'static str> {
        let stream = tokio::net::TcpStream::connect(&self.addr)
            .await
            .map_err(|_| "connect")?;
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|_| "connect")?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    /// One GET on the worker's connection; `Err` is the transport kind.
    async fn get(
        &self,
        connection: &mut Connection,
        k: u64,
    ) -> Result<(u16, Option<ServedBy>), &'static str> {
        let sender = match &mut connection.sender {
            Some(sender) if !sender.is_closed() => sender,
            _ => connection.sender.insert(self.dial().await?),
        };
        sender.ready().await.map_err(|_| "transport")?;
        self.path_of(k, &mut connection.path);
        let request = hyper::Request::get(connection.path.as_str())
            .header(http::header::HOST, self.host.clone())
            .body(Empty::<Bytes>::new())
            .map_err(|_| "request")?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|_| "transport")?;
        let status = response.status().as_u16();
        let served_by = response
            .headers()
            .get("x-served-by")
            .cloned()
            .map(ServedBy::Header);
        // Read the body to the end so the connection can be reused.
        response
            .into_body()
            .collect()
            .await
            .map_err(|_| "transport")?;
        Ok((status, served_by))
    }
}

impl Transport for Http {
    type Session = Connection;

    fn session(&self) -> Connection {
        Connection {
            sender: None,
            path: String::with_capacity(self.pieces.iter().map(String::len).sum::<usize>() + 20),
        }
    }

    async fn warm(&self, connection: &mut Connection) {
        if let Ok(sender) = self.dial().await {
            connection.sender = Some(sender);
        }
    }

    async fn call(&self, connection: &mut Connection, k: u64) -> Outcome {
        match self.get(connection, k).await {
            Ok((status, served_by)) => Outcome::Answered {
                status,
                error: (!(200..300).contains(&status)).then_some(ErrorKey::Status(status)),
                served_by,
            },
            Err(kind) => {
                connection.sender = None;
                Outcome::Failed(kind)
            }
        }
    }

    fn abandon(&self, connection: &mut Connection) {
        // The connection may still carry the late answer: start afresh.
        connection.sender = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_rand_in_the_path_gets_the_request_id() {
        let mut spec = LoadSpec::new("http://127.0.0.1:8080/base/", "api/{rand}/x/{rand}");
        spec.id_max = 5;
        let http = Http::new(&spec).unwrap();
        let mut path = String::new();
        http.path_of(3, &mut path);
        let id = id_for(spec.seed, 3, 5);
        assert_eq!(path, format!("/base/api/{id}/x/{id}"));

        let plain = Http::new(&LoadSpec::new("http://h:1", "/healthz")).unwrap();
        plain.path_of(9, &mut path);
        assert_eq!(path, "/healthz");
    }
}
