//! Cause 1 — how A reaches the B instances (`faults.lb`).
//!
//! * `l4` (buggy): one tonic `Channel` to HAProxy's `mode tcp` frontend. A
//!   channel holds **one** HTTP/2 connection and multiplexes every request
//!   over it; an L4 balancer only chooses a server when a connection opens,
//!   so every request of this A lands on the same B. This is the incident.
//! * `l7`: the same single channel, but to HAProxy's `mode http` h2 frontend,
//!   which terminates HTTP/2 and picks a B for every request — balanced, at
//!   the cost of one extra proxy hop.
//! * `etcd` (fixed): client-side per-request balancing over the instances
//!   registered in etcd. It parses today and arrives with issue #3; until
//!   then A refuses to start with it rather than silently doing something
//!   else.

use lab_common::config::{LabConfig, LbMode};
use std::time::Duration;
use tonic::transport::{Channel, Endpoint};

/// How long an idle HTTP/2 connection may go without a ping answer before it
/// is considered dead.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// Why no channel could be built.
#[derive(Debug, thiserror::Error)]
pub enum BalancerError {
    #[error("invalid backend URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    #[error(
        "faults.lb = \"etcd\" is a valid switch but service-a does not implement it yet \
         (issue #3); use \"l4\" or \"l7\""
    )]
    NotYetImplemented,
}

/// The channel requests to B travel on, and how many endpoints it spreads
/// them over (for `lab_backend_endpoints`).
pub struct Backends {
    pub channel: Channel,
    pub endpoints: i64,
    pub target: String,
}

/// Builds the channel for the configured `faults.lb`.
pub fn connect(config: &LabConfig) -> Result<Backends, BalancerError> {
    let url = match config.faults.lb {
        LbMode::L4 => &config.service_a.backend_l4_url,
        LbMode::L7 => &config.service_a.backend_l7_url,
        LbMode::Etcd => return Err(BalancerError::NotYetImplemented),
    };
    let endpoint = Endpoint::from_shared(url.clone())
        .map_err(|e| BalancerError::BadUrl {
            url: url.clone(),
            reason: e.to_string(),
        })?
        .connect_timeout(config.service_a.connect_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true);
    // Lazy: A starts even if the proxy is not up yet; the first request dials.
    Ok(Backends {
        channel: endpoint.connect_lazy(),
        endpoints: 1,
        target: url.clone(),
    })
}
