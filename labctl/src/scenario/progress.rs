//! What a person watching a scenario sees: on a terminal one live line
//! (phase, time, the load generator's rate, p99 and errors of the last
//! second) under the permanent lines of what happened; in a log file or a
//! pipe, plain lines only — a status line every few seconds.

use std::{
    io::IsTerminal,
    time::{Duration, Instant},
};

use indicatif::{ProgressBar, ProgressStyle};

use super::recording::Recording;
use super::signals;

/// How often a status line is printed when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub struct Progress {
    bar: Option<ProgressBar>,
    last_plain: Option<Instant>,
}

/// Where the run is, for the status line.
#[derive(Debug, Clone, Default)]
pub struct Position {
    pub phase: String,
    /// 1-based.
    pub index: usize,
    pub phases: usize,
    pub in_phase: Duration,
    pub phase_length: Duration,
}

impl Progress {
    /// A live line when stderr is a terminal, plain lines otherwise.
    pub fn new() -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Self {
            bar,
            last_plain: None,
        }
    }

    /// A line that stays: a phase begins, a switch flips, an action runs.
    pub fn say(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    /// Updates the status from the newest sample.
    pub fn update(&mut self, position: &Position, t_s: f64, recording: &Recording) {
        let line = status_line(position, t_s, recording);
        match &self.bar {
            Some(bar) => bar.set_message(line),
            None => {
                let due = self
                    .last_plain
                    .is_none_or(|last| last.elapsed() >= PLAIN_EVERY);
                if due {
                    eprintln!("{line}");
                    self.last_plain = Some(Instant::now());
                }
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// `[2/5 fix-lb 12/30 s] t=102 s  49.8 req/s  p99 12.3 ms  errors 0/s`.
pub fn status_line(position: &Position, t_s: f64, recording: &Recording) -> String {
    let newest = |key: &str| {
        recording
            .series
            .iter()
            .find(|s| s.signal == key && s.instance == "load")
            .and_then(|s| s.points.last())
            .and_then(|(_, v)| *v)
    };
    let number = |v: Option<f64>, unit: &str| match v {
        Some(v) => format!("{v:.1} {unit}"),
        None => format!("- {unit}"),
    };
    format!(
        "[{}/{} {} {:.0}/{:.0} s] t={t_s:.0} s  {}  p99 {}  errors {}",
        position.index,
        position.phases,
        position.phase,
        position.in_phase.as_secs_f64(),
        position.phase_length.as_secs_f64(),
        number(newest(signals::RPS.key), "req/s"),
        number(newest(signals::LATENCY_P99_MS.key), "ms"),
        number(newest(signals::ERRORS.key), "/s"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_shows_the_newest_load_figures() {
        let mut recording = Recording::default();
        recording.push("rps", "load", 1.0, Some(10.0));
        recording.push("rps", "load", 2.0, Some(49.84));
        recording.push("latency_p99_ms", "load", 2.0, Some(12.34));
        recording.push("errors", "load", 2.0, None);
        let position = Position {
            phase: "fix-lb".into(),
            index: 2,
            phases: 5,
            in_phase: Duration::from_secs(12),
            phase_length: Duration::from_secs(30),
        };
        assert_eq!(
            status_line(&position, 102.4, &recording),
            "[2/5 fix-lb 12/30 s] t=102 s  49.8 req/s  p99 12.3 ms  errors - /s"
        );
    }
}
