//! The partner's own metrics: what its side of the wire sees when B leaks
//! clients and connections (cause 4) — a handshake per call, and
//! connections that stay open because nobody reads their answers.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub connections_accepted: IntCounter,
    pub connections_open: IntGauge,
    pub tls_handshakes: IntCounter,
    pub tls_handshake_failures: IntCounter,
    pub requests: IntCounterVec,
}

impl Metrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let connections_accepted = IntCounter::new(
            "partner_connections_accepted_total",
            "TCP connections accepted on the HTTPS listener.",
        )?;
        let connections_open = IntGauge::new(
            "partner_connections_open",
            "TCP connections open now, from accept to close (idle, busy or mid-handshake).",
        )?;
        let tls_handshakes = IntCounter::new(
            "partner_tls_handshakes_total",
            "Completed TLS handshakes: one per connection, so a client that reuses \
             connections makes few.",
        )?;
        let tls_handshake_failures = IntCounter::new(
            "partner_tls_handshake_failures_total",
            "TLS handshakes that failed or did not finish in time.",
        )?;
        let requests = IntCounterVec::new(
            Opts::new(
                "partner_requests_total",
                "HTTP requests answered, by status code (counted when the answer's head is ready).",
            ),
            &["status"],
        )?;
        registry.register(Box::new(connections_accepted.clone()))?;
        registry.register(Box::new(connections_open.clone()))?;
        registry.register(Box::new(tls_handshakes.clone()))?;
        registry.register(Box::new(tls_handshake_failures.clone()))?;
        registry.register(Box::new(requests.clone()))?;
        Ok(Self {
            connections_accepted,
            connections_open,
            tls_handshakes,
            tls_handshake_failures,
            requests,
        })
    }

    /// Counts one open connection until the guard is dropped — on every
    /// exit path, including a task aborted at shutdown.
    pub fn open_connection(&self) -> OpenConnection {
        self.connections_open.inc();
        OpenConnection(self.connections_open.clone())
    }
}

/// Holds one unit of `partner_connections_open`.
pub struct OpenConnection(IntGauge);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.dec();
    }
}
