//! What every lab binary shares: configuration and the fault switches
//! ([`config`]), logging ([`telemetry`]), Prometheus metrics ([`metrics`]),
//! the admin HTTP listener ([`admin`]) with its profiles ([`heap`], CPU in
//! `admin::profiles`) and task dump ([`tasks`]), and signal-driven shutdown
//! ([`shutdown`]).

pub mod admin;
pub mod config;
pub mod faults;
pub mod heap;
pub mod metrics;
pub mod shutdown;
pub mod tasks;
pub mod telemetry;
pub mod trace;
