//! The partner's own metrics: what its side of the wire sees when B leaks
//! clients and connections (cause 4) — a handshake per call, and
//! connections that stay open because nobody reads their answers.

use lab_common::metrics::{GaugeGuard, Registrar};
use prometheus::{IntCounter, IntCounterVec, IntGauge, Registry};

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
        let r = Registrar(registry);
        Ok(Self {
            connections_accepted: r.int_counter(
                "partner_connections_accepted_total",
                "TCP connections accepted on the HTTPS listener.",
            )?,
            connections_open: r.int_gauge(
                "partner_connections_open",
                "TCP connections open now, from accept to close (idle, busy or mid-handshake).",
            )?,
            tls_handshakes: r.int_counter(
                "partner_tls_handshakes_total",
                "Completed TLS handshakes: one per connection, so a client that reuses \
                 connections makes few.",
            )?,
            tls_handshake_failures: r.int_counter(
                "partner_tls_handshake_failures_total",
                "TLS handshakes that failed or did not finish in time.",
            )?,
            requests: r.int_counter_vec(
                "partner_requests_total",
                "HTTP requests answered, by status code (counted when the answer's head is ready).",
                &["status"],
            )?,
        })
    }

    /// Counts one open connection until the guard is dropped — on every
    /// exit path, including a task aborted at shutdown.
    pub fn open_connection(&self) -> GaugeGuard {
        GaugeGuard::new(&self.connections_open)
    }
}
