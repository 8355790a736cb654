//! One scenario run's data: when each phase ran, what was flipped or done
//! when, and every series sampled. Written as `samples.json`; the report
//! is drawn from it alone. Times are seconds since the run started.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Everything a run recorded (the `samples.json` schema).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Recording {
    /// Scenario name, e.g. `"incident"`.
    pub scenario: String,
    pub description: String,
    /// The scenario file it was read from.
    pub file: String,
    /// The command line that made this run, to repeat it.
    pub command: String,
    /// Time compression (`--speed`): phase durations were divided by it.
    pub speed: f64,
    /// Wall-clock start, RFC 3339 (UTC).
    pub started_at: String,
    /// Seconds the run lasted.
    pub duration_s: f64,
    /// True when the run was cut short (Ctrl-C or an error): the phases
    /// after the cut did not run and their verdicts cannot hold.
    pub interrupted: bool,
    /// Why it stopped early, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interruption: Option<String>,
    pub phases: Vec<PhaseSpan>,
    pub events: Vec<Event>,
    /// One series per signal and instance.
    pub series: Vec<Series>,
}

/// When one phase ran.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PhaseSpan {
    pub name: String,
    pub description: String,
    pub start_s: f64,
    /// Where it ended (earlier than planned if the run was cut short).
    pub end_s: f64,
    /// Every switch as the processes reported it once the phase began
    /// (`lb`, `worker`, …).
    pub switches: BTreeMap<String, String>,
    /// The open-loop rate of this phase's load, requests per second.
    pub load_rps: f64,
    /// Jobs inserted per second during this phase.
    pub inflow_rate: f64,
}

/// Something that happened at a moment: a switch flip or an action.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Event {
    pub t_s: f64,
    pub kind: EventKind,
    /// What, in a few words: `worker=bounded`, `kill service-b-2`, `scale to 3`.
    pub label: String,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A fault switch flipped live.
    Flip,
    /// An action of the scenario (kill, scale, stop/start etcd, restart).
    Action,
    /// Something went wrong (an action failed, a process died unasked).
    Problem,
}

/// One signal of one instance over time.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Series {
    /// A key of [`super::signals::ALL`].
    pub signal: String,
    /// `load`, `service-a`, `service-b-1`, …, `partner-api`.
    pub instance: String,
    /// `(t_s, value)`; `None` where the sample failed (process down,
    /// nothing answered in that second).
    pub points: Vec<(f64, Option<f64>)>,
}

impl Recording {
    /// The series of `signal` for `instance`, created on first use.
    pub fn series_mut(&mut self, signal: &str, instance: &str) -> &mut Series {
        let index = match self
            .series
            .iter()
            .position(|s| s.signal == signal && s.instance == instance)
        {
            Some(index) => index,
            None => {
                self.series.push(Series {
                    signal: signal.to_string(),
                    instance: instance.to_string(),
                    points: Vec::new(),
                });
                self.series.len() - 1
            }
        };
        &mut self.series[index]
    }

    /// Records one value (or a gap) of `signal` for `instance` at `t_s`.
    pub fn push(&mut self, signal: &str, instance: &str, t_s: f64, value: Option<f64>) {
        let value = value.filter(|v| v.is_finite());
        self.series_mut(signal, instance).points.push((t_s, value));
    }

    /// Every series of one signal (one per instance), in instance order.
    pub fn series_of<'a>(&'a self, signal: &'a str) -> impl Iterator<Item = &'a Series> + 'a {
        self.series.iter().filter(move |s| s.signal == signal)
    }

    /// The phase with this name.
    pub fn phase(&self, name: &str) -> Option<&PhaseSpan> {
        self.phases.iter().find(|p| p.name == name)
    }
}
