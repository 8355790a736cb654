//! What every lab binary shares: configuration and the fault switches
//! ([`config`]), logging ([`telemetry`]), Prometheus metrics ([`metrics`]),
//! the HTTP listener with its limits ([`http_listener`]), the admin
//! endpoints ([`admin`]) with their profiles ([`heap`], CPU in
//! `admin::profiles`) and task dump ([`tasks`]), and signal-driven shutdown
//! ([`shutdown`]).

pub mod admin;
pub mod config;
pub mod faults;
pub mod heap;
pub mod http_listener;
pub mod metrics;
pub mod shutdown;
pub mod tasks;
pub mod telemetry;
pub mod trace;
