//! Samples every service once a second (stub: filled in by the sampler work).

use super::recording::Recording;

/// One process to scrape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `service-a`, `service-b-1`, …, `partner-api`.
    pub instance: String,
    /// Its admin listener, e.g. `http://127.0.0.1:9081`.
    pub admin_url: String,
    pub instance_id: Option<String>,
}

/// Reads `/metrics` of every target and the load generator's live window.
#[derive(Default)]
pub struct Sampler {
    targets: Vec<Target>,
}

impl Sampler {
    pub fn new(_live: std::sync::Arc<crate::load::LiveWindow>) -> Self {
        Self::default()
    }

    /// Replaces the processes to scrape (Bs come and go with `scale`).
    pub fn set_targets(&mut self, targets: Vec<Target>) {
        self.targets = targets;
    }

    /// Takes one sample of everything at `t_s` into `recording`.
    pub async fn sample(&mut self, _t_s: f64, _recording: &mut Recording) {}
}
