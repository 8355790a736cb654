//! `report.md`: what ran, the per-phase summary table and the verdicts, to
//! read in a terminal or paste into an issue.

use std::fmt::Write as _;

use super::{
    VerdictResult,
    stats::{PhaseTable, number},
};
use crate::scenario::recording::{Event, EventKind, Recording};

/// A table cell: pipes would end the cell, newlines the row.
fn cell(text: &str) -> String {
    text.replace('|', "\\|").replace(['\n', '\r'], " ")
}

/// Inline code that survives backticks inside it.
fn code(text: &str) -> String {
    if text.contains('`') {
        format!("`` {text} ``")
    } else {
        format!("`{text}`")
    }
}

/// ✓ or ✗.
pub fn mark(holds: bool) -> &'static str {
    if holds { "✓" } else { "✗" }
}

/// "N of M verdicts hold".
pub fn tally(verdicts: &[VerdictResult]) -> String {
    let holding = verdicts.iter().filter(|v| v.holds).count();
    match verdicts.len() {
        1 => format!("{holding} of 1 verdict holds"),
        n => format!("{holding} of {n} verdicts hold"),
    }
}

/// An event's kind as `samples.json` spells it.
pub fn kind_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Flip => "flip",
        EventKind::Action => "action",
        EventKind::Problem => "problem",
    }
}

/// The recording's problems (an action failed, a process died unasked).
pub fn problems(recording: &Recording) -> impl Iterator<Item = &Event> {
    recording
        .events
        .iter()
        .filter(|e| e.kind == EventKind::Problem)
}

/// The whole `report.md`.
pub fn render(recording: &Recording, table: &PhaseTable, verdicts: &[VerdictResult]) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = write_document(&mut out, recording, table, verdicts);
    out
}

fn write_document(
    out: &mut String,
    recording: &Recording,
    table: &PhaseTable,
    verdicts: &[VerdictResult],
) -> std::fmt::Result {
    writeln!(out, "# Scenario {}\n", code(&recording.scenario))?;
    if !recording.description.is_empty() {
        writeln!(out, "{}\n", recording.description)?;
    }
    writeln!(out, "Command: {}  ", code(&recording.command))?;
    writeln!(
        out,
        "Started {}, speed ×{}, ran {} s{}.\n",
        recording.started_at,
        number(recording.speed),
        number(recording.duration_s),
        if recording.file.is_empty() {
            String::new()
        } else {
            format!(", scenario file {}", code(&recording.file))
        }
    )?;
    if recording.interrupted {
        writeln!(
            out,
            "**Interrupted**: {}. The phases after the cut did not run; their verdicts cannot hold.\n",
            recording
                .interruption
                .as_deref()
                .unwrap_or("the run stopped early")
        )?;
    }

    // Problems first: they can explain every number below.
    let problems: Vec<&Event> = problems(recording).collect();
    if !problems.is_empty() {
        writeln!(out, "## Problems\n")?;
        for problem in &problems {
            writeln!(
                out,
                "- **at {} s**: {}",
                number(problem.t_s),
                cell(&problem.label)
            )?;
        }
        writeln!(out)?;
    }

    writeln!(out, "## Phases\n")?;
    let headers: Vec<String> = table.headers.iter().map(|h| cell(h)).collect();
    writeln!(out, "| {} |", headers.join(" | "))?;
    // The phase and its switches are words; the other columns are numbers.
    let alignment: Vec<&str> = (0..table.headers.len())
        .map(|i| if i == 0 || i == 2 { "---" } else { "---:" })
        .collect();
    writeln!(out, "|{}|", alignment.join("|"))?;
    for row in &table.rows {
        let cells: Vec<String> = row.iter().map(|c| cell(c)).collect();
        writeln!(out, "| {} |", cells.join(" | "))?;
    }
    writeln!(out)?;
    for note in &table.notes {
        writeln!(out, "- {}", cell(note))?;
    }
    if !table.notes.is_empty() {
        writeln!(out)?;
    }

    writeln!(out, "## Verdicts: {}\n", tally(verdicts))?;
    for verdict in verdicts {
        writeln!(
            out,
            "- {} **{}** — {}: {}.",
            mark(verdict.holds),
            verdict.cause,
            verdict.symptom,
            verdict.explanation
        )?;
    }
    if verdicts.is_empty() {
        writeln!(out, "The scenario has no verdicts.")?;
    }
    if !recording.events.is_empty() {
        writeln!(out, "\n## Events\n")?;
        writeln!(out, "| at s | kind | what |")?;
        writeln!(out, "|---:|---|---|")?;
        for event in &recording.events {
            let kind = kind_name(event.kind);
            let kind = if event.kind == EventKind::Problem {
                format!("**{kind}**")
            } else {
                kind.to_string()
            };
            writeln!(
                out,
                "| {} | {kind} | {} |",
                number(event.t_s),
                cell(&event.label)
            )?;
        }
    }
    writeln!(out, "\nCharts: report.html  ")?;
    writeln!(out, "samples: samples.json")?;
    Ok(())
}
