//! `labctl scenario`: plays a story (the incident, one cause, the remedies)
//! on a native stack as a timeline of phases, samples every service once a
//! second, and writes a report with charts and verdicts.
//!
//! * [`spec`] — the scenario file format (`deploy/scenarios/*.toml`): phases
//!   with durations, load, job inflow, switch flips, actions, verdicts.
//! * [`signals`] — the catalogue of what is sampled: the contract between
//!   the sampler and the report.
//! * [`recording`] — one run's data: phases, events and time series
//!   (`samples.json`).
//! * [`sampler`] — reads every service's `/metrics` once a second (and the
//!   load generator's live window) into the recording.
//! * [`report`] — `report.html` (inline SVG charts), `report.md` (a table per
//!   phase and the verdicts) and `samples.json`.
//! * [`runner`] — starts or attaches to the stack, plays the phases, shows
//!   progress and stops everything on Ctrl-C, still writing the report.

pub mod progress;
pub mod recording;
pub mod report;
pub mod runner;
pub mod sampler;
pub mod signals;
pub mod spec;
