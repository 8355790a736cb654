//! Server-side connection recycling — the third remedy for L4 imbalance.
//!
//! With `[service_b] max_connection_age` set, every client connection is
//! told to go away (HTTP/2 GOAWAY) once it is that old; the client opens a
//! new one, and the L4 balancer places that one afresh — so over time each
//! client's traffic rotates across the Bs.
//!
//! What tonic 0.14.9 really does (read in `transport/server/mod.rs`,
//! `connection_timeout_future`): with `max_connection_age` alone it starts a
//! graceful shutdown (GOAWAY, in-flight streams finish) at that age. But once
//! `max_connection_age_grace` is also set it *never* sends GOAWAY: it sleeps
//! age + grace and then drops the connection, cutting every in-flight
//! request. (The panic some report when no grace is set is gone in this
//! version: its timer future is fused.) So the lab hands tonic only the age,
//! for the graceful GOAWAY, and enforces the grace itself with
//! [`AgedStream`]: a connection still open at age + grace is closed at the
//! socket. tonic has no per-connection jitter; the lab instead spreads each
//! instance's age by ±`max_connection_age_jitter` once at start, so two Bs
//! do not recycle in lockstep.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::TcpStream,
    time::Sleep,
};
use tonic::transport::server::{Connected, TcpConnectInfo};

/// A TCP connection that fails all I/O once its hard deadline has passed.
pub struct AgedStream {
    inner: TcpStream,
    deadline: Option<Pin<Box<Sleep>>>,
}

impl AgedStream {
    /// `limit` = age + grace; `None` = never.
    pub fn new(inner: TcpStream, limit: Option<Duration>) -> Self {
        Self {
            inner,
            deadline: limit.map(|l| Box::pin(tokio::time::sleep(l))),
        }
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> bool {
        match &mut self.deadline {
            Some(sleep) => sleep.as_mut().poll(cx).is_ready(),
            None => false,
        }
    }
}

fn past_grace() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "connection outlived max_connection_age + grace",
    )
}

impl AsyncRead for AgedStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.expired(cx) {
            return Poll::Ready(Err(past_grace()));
        }
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for AgedStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.expired(cx) {
            return Poll::Ready(Err(past_grace()));
        }
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl Connected for AgedStream {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// This instance's connection age: `age` spread by up to ±`jitter` (a
/// fraction, e.g. 0.1), chosen once.
pub fn jittered(age: Duration, jitter: f64) -> Duration {
    if jitter <= 0.0 || age.is_zero() {
        return age;
    }
    let spread = jitter.min(1.0);
    let factor = 1.0 + rand::random_range(-spread..=spread);
    age.mul_f64(factor.max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_bounds() {
        let age = Duration::from_secs(10);
        for _ in 0..100 {
            let j = jittered(age, 0.1);
            assert!(
                j >= Duration::from_secs(9) && j <= Duration::from_secs(11),
                "{j:?}"
            );
        }
        assert_eq!(jittered(age, 0.0), age);
    }

    #[tokio::test]
    async fn io_fails_after_the_hard_limit() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = tokio::spawn(async move { TcpStream::connect(addr).await });
        let (server, _) = listener.accept().await.expect("accept");
        let _client = client.await.expect("join").expect("connect");
        let mut aged = AgedStream::new(server, Some(Duration::from_millis(50)));
        aged.write_all(b"ok").await.expect("write before the limit");
        let mut buf = [0u8; 1];
        let err = aged
            .read(&mut buf)
            .await
            .expect_err("read after the limit fails");
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }
}
