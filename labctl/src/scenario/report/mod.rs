//! The report of a run, drawn from the recording alone:
//!
//! * `report.html` — one self-contained page (inline CSS and SVG, nothing
//!   fetched), written as polyglot HTML5 so it also parses as XML;
//! * `report.md` — the per-phase summary table and the verdicts;
//! * `verdicts.json` — the verdicts, for scripts;
//! * `samples.json` — the recording itself, to redraw or re-judge.
//!
//! [`stats`] has the numbers, [`charts`] the SVG, [`html`] and
//! [`markdown`] the pages.

pub mod charts;
pub mod html;
pub mod markdown;
pub mod stats;

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;

use super::{recording::Recording, spec::Scenario};

/// One verdict, evaluated.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VerdictResult {
    pub cause: String,
    pub symptom: String,
    pub signal: String,
    /// How instances were combined and which statistic, e.g. "max of share, median".
    pub measure: String,
    /// The threshold and its direction, e.g. "> 0.9".
    pub threshold: String,
    /// The unit of the values, e.g. "share", "fds/min" (empty for a signal
    /// outside the catalogue).
    pub unit: String,
    pub buggy_phase: Option<String>,
    /// The statistic in the buggy phase (`None` when none is named or it
    /// has no samples).
    pub buggy_value: Option<f64>,
    pub fixed_phase: Option<String>,
    pub fixed_value: Option<f64>,
    /// Symptom seen in the buggy phase (if one is named) and absent from
    /// the fixed phase (if one is named).
    pub holds: bool,
    /// One sentence: what was seen, with the numbers.
    pub explanation: String,
}

/// The files written.
#[derive(Debug, Clone)]
pub struct ReportFiles {
    pub html: PathBuf,
    pub markdown: PathBuf,
    pub samples: PathBuf,
    /// `verdicts.json`: the same list as `verdicts`.
    pub verdicts_json: PathBuf,
    pub verdicts: Vec<VerdictResult>,
}

/// Evaluates the scenario's verdicts on the recording.
///
/// `scenario` is the scenario as played: with `--speed` that is
/// `Scenario::compressed(speed)`, whose `settle` times are compressed like
/// the phases the recording holds.
pub fn evaluate(recording: &Recording, scenario: &Scenario) -> Vec<VerdictResult> {
    stats::evaluate_all(recording, scenario)
}

/// Writes `samples.json`, `verdicts.json`, `report.md` and `report.html`
/// into `dir` (created if needed). `scenario` is the scenario as played
/// (see [`evaluate`]). The samples go first, so a report that fails to
/// draw still leaves the data behind.
pub fn write(
    dir: &Path,
    recording: &Recording,
    scenario: &Scenario,
) -> anyhow::Result<ReportFiles> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write_file = |name: &str, bytes: &[u8]| -> anyhow::Result<PathBuf> {
        let path = dir.join(name);
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        Ok(path)
    };

    let samples = write_file("samples.json", &serde_json::to_vec_pretty(recording)?)?;
    let verdicts = evaluate(recording, scenario);
    let verdicts_json = write_file("verdicts.json", &serde_json::to_vec_pretty(&verdicts)?)?;
    let table = stats::phase_table(recording);
    let markdown = write_file(
        "report.md",
        markdown::render(recording, &table, &verdicts).as_bytes(),
    )?;
    let charts = charts::all(recording).context("drawing the charts")?;
    let html = write_file(
        "report.html",
        html::render(recording, &table, &verdicts, &charts).as_bytes(),
    )?;
    Ok(ReportFiles {
        html,
        markdown,
        samples,
        verdicts_json,
        verdicts,
    })
}

#[cfg(test)]
mod tests;
