//! `report.html`: one file that opens anywhere without a network — the
//! styles are inline, the charts are inline SVG, there is no script. It is
//! written as polyglot HTML5 (lower-case tags, every element closed, only
//! XML's own character references) so XML tools read it too.
//!
//! The browser test relies on this shape: each chart is a
//! `<figure class="chart" id="chart-KEY">` holding a `<figcaption>` and an
//! inline `<svg>`.

use std::fmt::Write as _;

use super::{
    VerdictResult,
    charts::Chart,
    markdown::{kind_name, mark, problems, tally},
    stats::{PhaseTable, number},
};
use crate::scenario::recording::{EventKind, Recording};

const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto; max-width: 960px; padding: 0 1rem; color: #222; }
h1 { margin-bottom: 0.2rem; }
.description { color: #444; margin-top: 0; }
dl.run { display: grid; grid-template-columns: max-content 1fr; gap: 0.2rem 1rem; }
dl.run dt { font-weight: 600; }
dl.run dd { margin: 0; }
code { background: #f3f3f6; padding: 0 0.25em; border-radius: 3px; }
.problems { background: #fdecea; border: 1px solid #b00020; padding: 0.6rem 1rem; border-radius: 4px; }
.problems h2 { color: #b00020; margin-top: 0; }
tr.problem td { color: #b00020; font-weight: 600; background: #fdecea; }
.notes { color: #555; font-size: 0.85rem; }
.banner { background: #fff3cd; border: 1px solid #e0b100; padding: 0.6rem 1rem; border-radius: 4px; }
.tally { font-weight: 600; }
.tally.pass, td.holds.pass { color: #137333; }
.tally.fail, td.holds.fail { color: #b00020; }
table { border-collapse: collapse; margin: 0.5rem 0 1.5rem; font-size: 0.9rem; }
th, td { border: 1px solid #d8d8e0; padding: 0.3rem 0.5rem; vertical-align: top; }
th { background: #f3f3f6; text-align: left; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
td.holds { font-size: 1.2rem; text-align: center; }
.explanation { color: #555; font-size: 0.85rem; }
.table-scroll { overflow-x: auto; }
figure.chart { margin: 1.5rem 0; }
figure.chart figcaption { font-size: 0.85rem; color: #444; margin-bottom: 0.3rem; }
figure.chart svg { max-width: 100%; height: auto; display: block; }
";

/// Text for an element or an attribute value.
fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // XML cannot hold most control characters at all.
            c if c.is_control() && !matches!(c, '\n' | '\t') => {}
            c => out.push(c),
        }
    }
    out
}

/// A value with its unit, or a dash when there is none.
fn value(v: Option<f64>, unit: &str) -> String {
    match v {
        Some(v) if unit.is_empty() => number(v),
        Some(v) => format!("{} {unit}", number(v)),
        None => "—".into(),
    }
}

/// The whole page.
pub fn render(
    recording: &Recording,
    table: &PhaseTable,
    verdicts: &[VerdictResult],
    charts: &[Chart],
) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = write_page(&mut out, recording, table, verdicts, charts);
    out
}

fn write_page(
    out: &mut String,
    recording: &Recording,
    table: &PhaseTable,
    verdicts: &[VerdictResult],
    charts: &[Chart],
) -> std::fmt::Result {
    let name = escape(&recording.scenario);
    writeln!(out, "<!DOCTYPE html>")?;
    writeln!(
        out,
        "<html xmlns=\"http://www.w3.org/1999/xhtml\" lang=\"en\" xml:lang=\"en\">"
    )?;
    writeln!(out, "<head>")?;
    writeln!(out, "<meta charset=\"utf-8\"/>")?;
    writeln!(
        out,
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"/>"
    )?;
    writeln!(out, "<title>Scenario {name} — labctl report</title>")?;
    writeln!(out, "<style>{STYLE}</style>")?;
    writeln!(out, "</head>")?;
    writeln!(out, "<body>")?;

    writeln!(out, "<header>")?;
    writeln!(out, "<h1>Scenario <code>{name}</code></h1>")?;
    if !recording.description.is_empty() {
        writeln!(
            out,
            "<p class=\"description\">{}</p>",
            escape(&recording.description)
        )?;
    }
    writeln!(out, "<dl class=\"run\">")?;
    let mut fact = |term: &str, detail: String| writeln!(out, "<dt>{term}</dt><dd>{detail}</dd>");
    fact(
        "Command",
        format!("<code>{}</code>", escape(&recording.command)),
    )?;
    if !recording.file.is_empty() {
        fact(
            "Scenario file",
            format!("<code>{}</code>", escape(&recording.file)),
        )?;
    }
    fact("Started", escape(&recording.started_at))?;
    fact("Speed", format!("×{}", number(recording.speed)))?;
    fact("Duration", format!("{} s", number(recording.duration_s)))?;
    writeln!(out, "</dl>")?;
    if recording.interrupted {
        writeln!(
            out,
            "<p class=\"banner\" id=\"interrupted\"><strong>Interrupted:</strong> {}. The phases after the cut did not run; their verdicts cannot hold.</p>",
            escape(
                recording
                    .interruption
                    .as_deref()
                    .unwrap_or("the run stopped early")
            )
        )?;
    }
    writeln!(out, "</header>")?;

    write_problems(out, recording)?;
    write_verdicts(out, verdicts)?;
    write_phases(out, recording, table)?;
    write_events(out, recording)?;

    writeln!(out, "<section id=\"charts\">")?;
    writeln!(out, "<h2>Charts</h2>")?;
    for chart in charts {
        writeln!(
            out,
            "<figure class=\"chart\" id=\"chart-{}\">",
            escape(&chart.key)
        )?;
        writeln!(
            out,
            "<figcaption><strong>{}</strong> — {}</figcaption>",
            escape(&chart.title),
            escape(&chart.source)
        )?;
        out.push_str(&chart.svg);
        writeln!(out, "</figure>")?;
    }
    writeln!(out, "</section>")?;

    writeln!(
        out,
        "<footer><p>Samples: <a href=\"samples.json\">samples.json</a> · verdicts: <a href=\"verdicts.json\">verdicts.json</a> · <a href=\"report.md\">report.md</a></p></footer>"
    )?;
    writeln!(out, "</body>")?;
    writeln!(out, "</html>")?;
    Ok(())
}

/// Problems above everything else: they can explain every number below.
fn write_problems(out: &mut String, recording: &Recording) -> std::fmt::Result {
    let problems: Vec<_> = problems(recording).collect();
    if problems.is_empty() {
        return Ok(());
    }
    writeln!(out, "<section id=\"problems\" class=\"problems\">")?;
    writeln!(out, "<h2>Problems</h2>")?;
    writeln!(out, "<ul>")?;
    for problem in problems {
        writeln!(
            out,
            "<li><strong>at {} s</strong>: {}</li>",
            number(problem.t_s),
            escape(&problem.label)
        )?;
    }
    writeln!(out, "</ul>")?;
    writeln!(out, "</section>")
}

fn write_verdicts(out: &mut String, verdicts: &[VerdictResult]) -> std::fmt::Result {
    writeln!(out, "<section id=\"verdicts\">")?;
    writeln!(out, "<h2>Verdicts</h2>")?;
    let all_hold = verdicts.iter().all(|v| v.holds);
    writeln!(
        out,
        "<p class=\"tally {}\">{}</p>",
        if all_hold { "pass" } else { "fail" },
        tally(verdicts)
    )?;
    if verdicts.is_empty() {
        writeln!(out, "</section>")?;
        return Ok(());
    }
    writeln!(out, "<div class=\"table-scroll\"><table>")?;
    writeln!(
        out,
        "<thead><tr><th>cause</th><th>symptom</th><th>measure</th><th>symptom when</th><th>buggy phase</th><th>fixed phase</th><th>holds</th></tr></thead>"
    )?;
    writeln!(out, "<tbody>")?;
    for verdict in verdicts {
        let cell = |phase: &Option<String>, number: Option<f64>| match phase {
            Some(phase) => format!(
                "{}<br/><span class=\"explanation\">{}</span>",
                escape(&value(number, &verdict.unit)),
                escape(phase)
            ),
            None => "—".into(),
        };
        let buggy = cell(&verdict.buggy_phase, verdict.buggy_value);
        let fixed = cell(&verdict.fixed_phase, verdict.fixed_value);
        writeln!(
            out,
            "<tr><td>{}</td><td>{}<br/><span class=\"explanation\">{}</span></td><td>{}</td><td class=\"number\">{}</td><td class=\"number\">{}</td><td class=\"number\">{}</td><td class=\"holds {}\">{}</td></tr>",
            escape(&verdict.cause),
            escape(&verdict.symptom),
            escape(&verdict.explanation),
            escape(&verdict.measure),
            escape(&verdict.threshold),
            buggy,
            fixed,
            if verdict.holds { "pass" } else { "fail" },
            mark(verdict.holds),
        )?;
    }
    writeln!(out, "</tbody></table></div>")?;
    writeln!(out, "</section>")
}

fn write_phases(out: &mut String, recording: &Recording, table: &PhaseTable) -> std::fmt::Result {
    writeln!(out, "<section id=\"phases\">")?;
    writeln!(out, "<h2>Phases</h2>")?;
    writeln!(out, "<div class=\"table-scroll\"><table>")?;
    write!(out, "<thead><tr>")?;
    for (i, header) in table.headers.iter().enumerate() {
        write!(out, "<th>{}</th>", escape(header))?;
        if i == 0 {
            write!(out, "<th>description</th>")?;
        }
    }
    writeln!(out, "</tr></thead>")?;
    writeln!(out, "<tbody>")?;
    for (row, phase) in table.rows.iter().zip(&recording.phases) {
        write!(out, "<tr>")?;
        for (i, text) in row.iter().enumerate() {
            // The name and switches are words; everything else is a number.
            let class = if i == 0 || i == 2 {
                ""
            } else {
                " class=\"number\""
            };
            write!(out, "<td{class}>{}</td>", escape(text))?;
            if i == 0 {
                write!(out, "<td>{}</td>", escape(&phase.description))?;
            }
        }
        writeln!(out, "</tr>")?;
    }
    writeln!(out, "</tbody></table></div>")?;
    if !table.notes.is_empty() {
        writeln!(out, "<ul class=\"notes\">")?;
        for note in &table.notes {
            writeln!(out, "<li>{}</li>", escape(note))?;
        }
        writeln!(out, "</ul>")?;
    }
    writeln!(out, "</section>")
}

fn write_events(out: &mut String, recording: &Recording) -> std::fmt::Result {
    if recording.events.is_empty() {
        return Ok(());
    }
    writeln!(out, "<section id=\"events\">")?;
    writeln!(out, "<h2>Events</h2>")?;
    writeln!(out, "<table>")?;
    writeln!(
        out,
        "<thead><tr><th>at s</th><th>kind</th><th>what</th></tr></thead>"
    )?;
    writeln!(out, "<tbody>")?;
    for event in &recording.events {
        let class = if event.kind == EventKind::Problem {
            " class=\"problem\""
        } else {
            ""
        };
        writeln!(
            out,
            "<tr{class}><td class=\"number\">{}</td><td>{}</td><td>{}</td></tr>",
            number(event.t_s),
            kind_name(event.kind),
            escape(&event.label)
        )?;
    }
    writeln!(out, "</tbody></table>")?;
    writeln!(out, "</section>")
}
