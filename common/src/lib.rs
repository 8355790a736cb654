//! What every lab binary shares: configuration and the fault switches
//! ([`config`]), logging ([`telemetry`]), Prometheus metrics ([`metrics`]),
//! the admin HTTP listener ([`admin`]) and signal-driven shutdown
//! ([`shutdown`]).

pub mod admin;
pub mod config;
pub mod faults;
pub mod metrics;
pub mod shutdown;
pub mod telemetry;
pub mod trace;
