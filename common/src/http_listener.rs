//! Serving an axum router over HTTP/1.1 with the limits a listener facing
//! strangers needs: A's public port and every admin port.
//!
//! `axum::serve` would do everything else, but it gives hyper no timer, and
//! without one hyper's header read timeout is off: a client that opens a
//! connection and sends its request head a byte at a time (slowloris), or
//! sends nothing at all, holds a socket and a task for ever. Here each
//! connection is served by hyper's own HTTP/1.1 builder with a Tokio timer:
//!
//! * a request head must arrive whole within [`Limits::header_read_timeout`]
//!   of the connection opening or of the previous answer ending. The same
//!   timer closes idle kept-alive connections: hyper arms it whenever it
//!   waits for a head, not only for the first (hyper 1.x,
//!   `proto/h1/conn.rs`, `poll_read_head`);
//! * a head larger than [`Limits::max_header_bytes`], or with more than 100
//!   header fields (hyper's default), is answered 431 and the connection
//!   closed;
//! * what request smuggling relies on is refused by hyper's parser: two
//!   `Content-Length` values that differ, or a `Transfer-Encoding` whose last
//!   coding is not `chunked`, get 400; with both `Content-Length` and
//!   `chunked`, the length is dropped and the connection closes after the
//!   answer, so no byte after the body is ever read as a second request.
//!
//! A body sent too slowly is the router's business (service A bounds the
//! whole request in time, `service_a::api::router`).
//!
//! On shutdown the listener stops accepting, asks every connection to close
//! once its current answer is written (idle ones close at once), and waits
//! for them at most [`Limits::drain_timeout`].

use std::{net::SocketAddr, time::Duration};

use axum::{Router, extract::ConnectInfo};
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
    service::TowerToHyperService,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// The bounds one listener puts on its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a connection may take to send a whole request head, counted
    /// from when it opened or its previous answer ended.
    pub header_read_timeout: Duration,
    /// Largest request head (request line and headers), in bytes.
    pub max_header_bytes: usize,
    /// How long shutdown waits for connections still answering.
    pub drain_timeout: Duration,
}

impl Default for Limits {
    /// The admin listeners' bounds: operators' tools send small heads at
    /// once; a profile being taken may need a few seconds to finish.
    fn default() -> Self {
        Self {
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
            drain_timeout: Duration::from_secs(5),
        }
    }
}

/// Connections the kernel may hold for [`serve`] before it accepts them.
/// `TcpListener::bind` (std's and tokio's) asks for 128, and a burst of a
/// few hundred connects overflows that: the kernel drops each SYN past it
/// and the client waits a second to send it again. Go's `net.Listen` asks
/// for `net.core.somaxconn`, which caps this (4 096 by default).
const LISTEN_BACKLOG: u32 = 4096;

/// Binds `addr` (`host:port`) with a backlog of [`LISTEN_BACKLOG`].
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    let mut last_error = None;
    for addr in tokio::net::lookup_host(addr).await? {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        match socket.bind(addr) {
            Ok(()) => return socket.listen(LISTEN_BACKLOG),
            Err(e) => last_error = Some(e),
        }
    }
    Err(last_error.unwrap_or_else(|| {
        std::io::Error::new(std::io::ErrorKind::InvalidInput, "no address to bind")
    }))
}

/// Serves `router` on `listener` until `shutdown` is cancelled, then drains
/// (see the module doc). Handlers can extract the peer's address as
/// `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: CancellationToken,
) {
    let mut http1 = hyper::server::conn::http1::Builder::new();
    http1
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_header_size(limits.max_header_bytes);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        let (tcp, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors, say: accepting again at once
                // would spin a core.
                tracing::warn!(error = %e, "accept failed; pausing 100 ms");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_millis(100)) => continue,
                }
            }
        };
        let _ = tcp.set_nodelay(true);
        let service =
            router
                .clone()
                .map_request(move |mut request: http::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    request
                });
        let connection =
            http1.serve_connection(TokioIo::new(tcp), TowerToHyperService::new(service));
        let connection = graceful.watch(connection);
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                log_connection_end(peer, &e);
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(limits.drain_timeout, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            drain_timeout = ?limits.drain_timeout,
            "stopped waiting for connections still answering; they end with the process"
        );
    }
}

/// A connection that ends in an error is the client's doing (a timeout, a
/// malformed head, a reset), worth a debug line, not a warning.
fn log_connection_end(peer: SocketAddr, error: &hyper::Error) {
    if error.is_timeout() {
        tracing::debug!(%peer, "connection closed: no whole request head in time");
    } else {
        tracing::debug!(%peer, %error, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use std::{sync::Arc, time::Instant};

    use axum::routing::get;
    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::TcpStream,
        sync::Notify,
        task::JoinHandle,
    };

    use super::*;

    const TIMEOUT: Duration = Duration::from_millis(300);

    /// Signalled when `/slow` starts handling a request.
    static SLOW_ENTERED: std::sync::OnceLock<Arc<Notify>> = std::sync::OnceLock::new();

    /// A listener on a free port with a 300 ms header read timeout and an
    /// 1 KiB head limit: `/peer` answers the caller's address as A's handlers
    /// would see it, `/slow` answers 300 ms after it signals `SLOW_ENTERED`.
    async fn listener() -> (SocketAddr, CancellationToken, JoinHandle<()>) {
        let entered = SLOW_ENTERED.get_or_init(|| Arc::new(Notify::new())).clone();
        let router = Router::new()
            .route(
                "/peer",
                get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
            )
            .route(
                "/slow",
                get(move || async move {
                    entered.notify_one();
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    "done"
                }),
            );
        let tcp = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = tcp.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let limits = Limits {
            header_read_timeout: TIMEOUT,
            max_header_bytes: 1024,
            drain_timeout: Duration::from_secs(2),
        };
        let server = tokio::spawn(serve(tcp, router, limits, shutdown.clone()));
        (addr, shutdown, server)
    }

    /// Reads until the server closes the connection (or 5 s pass); returns
    /// what was read and when the close came.
    async fn read_to_close(stream: &mut TcpStream) -> (String, Option<Instant>) {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, stream.read(&mut buf)).await {
                Ok(Ok(0) | Err(_)) => {
                    return (String::from_utf8_lossy(&seen).into(), Some(Instant::now()));
                }
                Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
                Err(_) => return (String::from_utf8_lossy(&seen).into(), None),
            }
        }
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_after_the_header_read_timeout() {
        let (addr, _shutdown, _server) = listener().await;
        let opened = Instant::now();
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let (_, closed) = read_to_close(&mut stream).await;
        let after = closed.expect("the server closed the idle connection") - opened;
        assert!(after >= TIMEOUT - Duration::from_millis(50), "{after:?}");
        assert!(after < TIMEOUT * 4, "{after:?}");
    }

    #[tokio::test]
    async fn a_head_trickled_a_byte_at_a_time_is_cut_off_although_bytes_keep_coming() {
        let (addr, _shutdown, _server) = listener().await;
        let opened = Instant::now();
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (mut read, mut write) = stream.into_split();
        // One header byte every 20 ms, never the blank line that ends a head.
        let trickle = tokio::spawn(async move {
            let _ = write.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\n").await;
            loop {
                tokio::time::sleep(Duration::from_millis(20)).await;
                if write.write_all(b"X").await.is_err() {
                    break;
                }
            }
        });
        let mut buf = [0u8; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(n) = read.read(&mut buf).await
                && n > 0
            {}
        })
        .await;
        trickle.abort();
        assert!(closed.is_ok(), "the trickling connection was never closed");
        let after = opened.elapsed();
        assert!(after >= TIMEOUT - Duration::from_millis(50), "{after:?}");
        assert!(after < TIMEOUT * 4, "{after:?}");
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_closed_once_idle_for_the_timeout() {
        let (addr, _shutdown, _server) = listener().await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        let answered = Instant::now();
        let (seen, closed) = read_to_close(&mut stream).await;
        assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
        let idle = closed.expect("the server closed the idle connection") - answered;
        assert!(idle >= TIMEOUT - Duration::from_millis(50), "{idle:?}");
        assert!(idle < TIMEOUT * 4, "{idle:?}");
    }

    #[tokio::test]
    async fn a_head_over_the_limit_gets_431() {
        let (addr, _shutdown, _server) = listener().await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let big = "a".repeat(2048);
        let head = format!("GET /peer HTTP/1.1\r\nHost: x\r\nX-Big: {big}\r\n\r\n");
        stream.write_all(head.as_bytes()).await.expect("write");
        let (seen, _) = read_to_close(&mut stream).await;
        assert!(seen.starts_with("HTTP/1.1 431"), "{seen}");
    }

    #[tokio::test]
    async fn handlers_see_the_address_of_the_client() {
        let (addr, _shutdown, _server) = listener().await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let me = stream.local_addr().expect("local addr").to_string();
        stream
            .write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("write");
        let (seen, _) = read_to_close(&mut stream).await;
        assert!(seen.ends_with(&me), "answer {seen:?} should end with {me}");
    }

    #[tokio::test]
    async fn shutdown_lets_an_answer_in_flight_finish_then_returns() {
        let (addr, shutdown, server) = listener().await;
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream
            .write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("write");
        // Shut down once the request is in its handler.
        SLOW_ENTERED
            .get()
            .expect("the listener made it")
            .notified()
            .await;
        shutdown.cancel();
        let (seen, closed) = read_to_close(&mut stream).await;
        assert!(
            seen.starts_with("HTTP/1.1 200") && seen.ends_with("done"),
            "{seen}"
        );
        assert!(closed.is_some(), "closed after the answer");
        tokio::time::timeout(Duration::from_secs(2), server)
            .await
            .expect("serve returns once drained")
            .expect("serve did not panic");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "no longer accepting"
        );
    }
}
