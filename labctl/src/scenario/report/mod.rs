//! The report of a run (stub: filled in by the report work).

use std::path::{Path, PathBuf};

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
    pub buggy_phase: String,
    /// The statistic in the buggy phase (`None` when the phase has no samples).
    pub buggy_value: Option<f64>,
    pub fixed_phase: Option<String>,
    pub fixed_value: Option<f64>,
    /// Symptom seen in the buggy phase and (if a fixed phase is named) gone in it.
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
    pub verdicts: Vec<VerdictResult>,
}

/// Evaluates the scenario's verdicts on the recording.
pub fn evaluate(_recording: &Recording, _scenario: &Scenario) -> Vec<VerdictResult> {
    Vec::new()
}

/// Writes `report.html`, `report.md` and `samples.json` into `dir`.
pub fn write(
    dir: &Path,
    recording: &Recording,
    scenario: &Scenario,
) -> anyhow::Result<ReportFiles> {
    std::fs::create_dir_all(dir)?;
    let verdicts = evaluate(recording, scenario);
    let samples = dir.join("samples.json");
    std::fs::write(&samples, serde_json::to_vec_pretty(recording)?)?;
    Ok(ReportFiles {
        html: dir.join("report.html"),
        markdown: dir.join("report.md"),
        samples,
        verdicts,
    })
}
