//! The written report as a whole: files, their shape, and what they say.

use std::collections::BTreeMap;

use super::*;
use crate::scenario::{
    recording::{Event, EventKind, PhaseSpan},
    spec,
};

/// Two phases of 30 s, three instances (A and two Bs) plus the load
/// generator. In "buggy" B-1 serves everything and job tasks pile up; in
/// "fixed" the share is even and the tasks stay low. Small deterministic
/// wobble so the lines look sampled.
pub(super) fn synthetic_recording() -> Recording {
    let phase = |name: &str, start_s: f64, end_s: f64, lb: &str| PhaseSpan {
        name: name.into(),
        // Markup characters that must arrive escaped.
        description: format!("lb = {lb} <live> & sampled"),
        start_s,
        end_s,
        switches: BTreeMap::from([
            ("lb".to_string(), lb.to_string()),
            ("worker".to_string(), "unbounded".to_string()),
        ]),
        load_rps: 50.0,
        inflow_rate: 12.0,
    };
    let mut recording = Recording {
        scenario: "lb".into(),
        description: "One B takes everything under l4; etcd spreads it".into(),
        file: "deploy/scenarios/lb.toml".into(),
        command: "labctl scenario run lb --speed 1".into(),
        speed: 1.0,
        started_at: "2026-01-02T03:04:05Z".into(),
        duration_s: 60.0,
        interrupted: false,
        interruption: None,
        phases: vec![
            phase("buggy", 0.0, 30.0, "l4"),
            phase("fixed", 30.0, 60.0, "etcd"),
        ],
        events: vec![
            Event {
                t_s: 30.0,
                kind: EventKind::Flip,
                label: "lb=etcd".into(),
            },
            Event {
                t_s: 45.0,
                kind: EventKind::Action,
                label: "kill service-b-2".into(),
            },
        ],
        series: Vec::new(),
    };
    for second in 0..60 {
        let t = f64::from(second);
        let wobble = ((t * 1.7).sin() + (t * 0.37).cos()) / 2.0;
        let buggy = t < 30.0;
        recording.push("rps", "load", t, Some(50.0 + 2.0 * wobble));
        recording.push(
            "latency_p99_ms",
            "load",
            t,
            Some(if buggy { 400.0 } else { 40.0 } + 20.0 * wobble),
        );
        let b1_share = if buggy { 1.0 } else { 0.5 + 0.04 * wobble };
        recording.push("share", "service-b-1", t, Some(b1_share));
        // B-2 is killed at 45 s: its samples fail from then on.
        let b2_alive = second < 45;
        recording.push(
            "share",
            "service-b-2",
            t,
            b2_alive.then_some(1.0 - b1_share),
        );
        let tasks = if buggy { 10.0 * t } else { 4.0 + wobble };
        recording.push("job_tasks", "service-b-1", t, Some(tasks));
        recording.push(
            "job_tasks",
            "service-b-2",
            t,
            b2_alive.then_some(tasks / 2.0),
        );
        for (instance, base) in [
            ("service-a", 60.0),
            ("service-b-1", 80.0),
            ("service-b-2", 80.0),
        ] {
            let alive = instance != "service-b-2" || b2_alive;
            let rss = base + if buggy { t } else { 30.0 } + wobble;
            recording.push("rss_mib", instance, t, alive.then_some(rss));
        }
    }
    recording
}

pub(super) fn synthetic_scenario() -> Scenario {
    let text = r#"
description = "One B takes everything under l4; etcd spreads it"
[load]
rps = 50
[[phase]]
name = "buggy"
duration = "30s"
switches = { lb = "l4" }
[[phase]]
name = "fixed"
duration = "30s"
switches = { lb = "etcd" }

[[verdict]]
cause = "lb"
symptom = "one B serves nearly every request"
signal = "share"
instances = "max"
stat = "median"
buggy = "buggy"
fixed = "fixed"
above = 0.9
settle = "3s"

[[verdict]]
cause = "worker"
symptom = "job tasks pile up"
signal = "job_tasks"
instances = "sum"
stat = "max"
buggy = "buggy"
fixed = "fixed"
above = 16

[[verdict]]
cause = "leaks"
symptom = "memory keeps growing even when fixed (this one must fail)"
signal = "rss_mib"
instances = "max"
stat = "growth-per-min"
buggy = "buggy"
fixed = "fixed"
below = 10
"#;
    spec::parse("lb", "test.toml", text).unwrap()
}

fn html_document(text: &str) -> roxmltree::Document<'_> {
    let options = roxmltree::ParsingOptions {
        allow_dtd: true,
        ..roxmltree::ParsingOptions::default()
    };
    roxmltree::Document::parse_with_options(text, options)
        .unwrap_or_else(|e| panic!("report.html is not well-formed XML: {e}"))
}

/// The marks a chart draws for its series: 2 px lines and dots in a line
/// colour. Axes, grid, legend swatches (3 px) and event lines (1 px, not
/// in the palette) are polylines too, so counting polylines alone proves
/// nothing.
fn series_marks(svg: roxmltree::Node<'_, '_>) -> usize {
    let palette: Vec<String> = charts::PALETTE
        .iter()
        .map(|c| format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2))
        .collect();
    let in_palette = |colour: Option<&str>| colour.is_some_and(|c| palette.iter().any(|p| p == c));
    svg.descendants()
        .filter(|n| {
            (n.has_tag_name("polyline")
                && n.attribute("stroke-width") == Some("2")
                && in_palette(n.attribute("stroke")))
                || (n.has_tag_name("circle") && in_palette(n.attribute("fill")))
        })
        .count()
}

#[test]
fn series_marks_are_zero_for_a_chart_whose_series_have_no_values() {
    let mut recording = synthetic_recording();
    for t in 0..60 {
        recording.push("open_fds", "service-b-1", f64::from(t), None);
    }
    let svg = charts::draw(&recording, "open_fds", "Open fds", "fds").unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    // Polylines there are (axes, legend, event lines), series none.
    let polylines = doc
        .descendants()
        .filter(|n| n.has_tag_name("polyline"))
        .count();
    assert!(polylines > 0);
    assert_eq!(series_marks(doc.root_element()), 0);
    // One value at t = 7 between gaps is a dot; one run of two a line.
    let series = recording.series_mut("open_fds", "service-b-1");
    series.points[7].1 = Some(40.0);
    let svg = charts::draw(&recording, "open_fds", "Open fds", "fds").unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    assert_eq!(series_marks(doc.root_element()), 1);
    let series = recording.series_mut("open_fds", "service-b-1");
    series.points[20].1 = Some(40.0);
    series.points[21].1 = Some(41.0);
    let svg = charts::draw(&recording, "open_fds", "Open fds", "fds").unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    assert_eq!(series_marks(doc.root_element()), 2);
}

#[test]
fn write_produces_every_file_and_the_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("nested/report");
    let files = write(&out, &synthetic_recording(), &synthetic_scenario()).unwrap();
    for path in [
        &files.html,
        &files.markdown,
        &files.samples,
        &files.verdicts_json,
    ] {
        assert!(path.starts_with(&out), "{}", path.display());
        assert!(
            std::fs::metadata(path).unwrap().len() > 0,
            "{}",
            path.display()
        );
    }
    let holds: Vec<bool> = files.verdicts.iter().map(|v| v.holds).collect();
    assert_eq!(holds, [true, true, false], "{:#?}", files.verdicts);

    let written: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files.verdicts_json).unwrap()).unwrap();
    assert_eq!(written, serde_json::to_value(&files.verdicts).unwrap());
}

#[test]
fn failing_verdict_says_why_with_its_numbers() {
    let verdicts = evaluate(&synthetic_recording(), &synthetic_scenario());
    let leak = &verdicts[2];
    assert!(!leak.holds);
    // RSS grows 1 MiB/s in "buggy" (60/min): below 10 is not seen.
    let growth = leak.buggy_value.unwrap();
    assert!((growth - 60.0).abs() < 3.0, "{growth}");
    assert_eq!(leak.unit, "MiB/min");
    assert!(
        leak.explanation.contains("symptom not seen"),
        "{}",
        leak.explanation
    );
}

#[test]
fn samples_json_round_trips_into_the_recording() {
    let dir = tempfile::tempdir().unwrap();
    let recording = synthetic_recording();
    let files = write(dir.path(), &recording, &synthetic_scenario()).unwrap();
    let read: Recording = serde_json::from_slice(&std::fs::read(&files.samples).unwrap()).unwrap();
    assert_eq!(read, recording);
    // Judging the recording read back gives the same verdicts.
    assert_eq!(evaluate(&read, &synthetic_scenario()), files.verdicts);
}

#[test]
fn html_is_xml_with_a_chart_per_signal() {
    let dir = tempfile::tempdir().unwrap();
    let recording = synthetic_recording();
    let files = write(dir.path(), &recording, &synthetic_scenario()).unwrap();
    let text = std::fs::read_to_string(&files.html).unwrap();
    assert!(text.starts_with("<!DOCTYPE html>"));
    let doc = html_document(&text);
    let xhtml = "http://www.w3.org/1999/xhtml";
    assert_eq!(doc.root_element().tag_name().namespace(), Some(xhtml));
    let title = doc
        .descendants()
        .find(|n| n.has_tag_name((xhtml, "title")))
        .and_then(|n| n.text())
        .unwrap();
    assert!(title.contains("lb"), "{title}");

    let figures: Vec<_> = doc
        .descendants()
        .filter(|n| n.has_tag_name((xhtml, "figure")) && n.attribute("class") == Some("chart"))
        .collect();
    let mut keys: Vec<&str> = recording.series.iter().map(|s| s.signal.as_str()).collect();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(figures.len(), keys.len());
    for key in keys {
        let id = format!("chart-{key}");
        let figure = figures
            .iter()
            .find(|f| f.attribute("id") == Some(id.as_str()))
            .unwrap_or_else(|| panic!("no figure#{id}"));
        let svg = figure
            .children()
            .find(|n| n.has_tag_name(("http://www.w3.org/2000/svg", "svg")))
            .unwrap_or_else(|| panic!("figure#{id} has no inline svg"));
        assert!(series_marks(svg) > 0, "chart {key} draws no series");
        let caption = figure
            .children()
            .find(|n| n.has_tag_name((xhtml, "figcaption")))
            .unwrap();
        let signal = crate::scenario::signals::by_key(key).unwrap();
        let caption_text: String = caption.descendants().filter_map(|n| n.text()).collect();
        assert!(caption_text.contains(signal.title), "{caption_text}");
        assert!(caption_text.contains(signal.source), "{caption_text}");
    }
}

#[test]
fn html_needs_no_network() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), &synthetic_recording(), &synthetic_scenario()).unwrap();
    let text = std::fs::read_to_string(&files.html).unwrap();
    let namespaces = ["http://www.w3.org/1999/xhtml", "http://www.w3.org/2000/svg"];
    for (at, _) in text.match_indices("http") {
        let rest = &text[at..];
        if rest.starts_with("http://") || rest.starts_with("https://") {
            assert!(
                namespaces.iter().any(|ns| rest.starts_with(ns)),
                "a network reference: {}",
                &rest[..rest.len().min(80)]
            );
        }
    }
    let doc = html_document(&text);
    for node in doc.descendants() {
        assert!(!node.has_tag_name("script"), "report.html has a script");
        assert!(!node.has_tag_name("link"), "report.html links a resource");
        for attribute in ["src", "href"] {
            if let Some(value) = node.attribute(attribute) {
                assert!(!value.contains("//"), "{attribute}={value}");
            }
        }
    }
}

#[test]
fn html_shows_the_verdicts_and_phases() {
    let dir = tempfile::tempdir().unwrap();
    let mut recording = synthetic_recording();
    let files = write(dir.path(), &recording, &synthetic_scenario()).unwrap();
    let text = std::fs::read_to_string(&files.html).unwrap();
    let doc = html_document(&text);
    let table_rows = |section: &str| -> Vec<String> {
        let section = doc
            .descendants()
            .find(|n| n.attribute("id") == Some(section))
            .unwrap();
        section
            .descendants()
            .filter(|n| n.has_tag_name("tr"))
            .map(|row| row.descendants().filter_map(|n| n.text()).collect())
            .collect()
    };
    let verdict_rows = table_rows("verdicts");
    assert_eq!(verdict_rows.len(), 4, "{verdict_rows:?}");
    assert!(verdict_rows[1].contains("one B serves") && verdict_rows[1].ends_with('✓'));
    assert!(verdict_rows[3].contains("memory keeps growing") && verdict_rows[3].ends_with('✗'));
    let phase_rows = table_rows("phases");
    assert_eq!(phase_rows.len(), 3, "{phase_rows:?}");
    assert!(phase_rows[1].starts_with("buggy") && phase_rows[2].starts_with("fixed"));
    assert!(!text.contains("id=\"interrupted\""));

    recording.interrupted = true;
    recording.interruption = Some("Ctrl-C during phase fixed".into());
    let files = write(dir.path(), &recording, &synthetic_scenario()).unwrap();
    let text = std::fs::read_to_string(&files.html).unwrap();
    let doc = html_document(&text);
    let banner = doc
        .descendants()
        .find(|n| n.attribute("id") == Some("interrupted"))
        .unwrap();
    let banner_text: String = banner.descendants().filter_map(|n| n.text()).collect();
    assert!(
        banner_text.contains("Ctrl-C during phase fixed"),
        "{banner_text}"
    );
}

#[test]
fn markdown_has_the_phase_table_and_verdict_lines() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), &synthetic_recording(), &synthetic_scenario()).unwrap();
    let text = std::fs::read_to_string(&files.markdown).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "# Scenario `lb`");
    assert!(text.contains("Command: `labctl scenario run lb --speed 1`"));

    let header = lines
        .iter()
        .position(|l| l.starts_with("| phase |"))
        .unwrap();
    assert_eq!(
        lines[header],
        "| phase | duration s | switches | load rps | rps (median) | p99 ms (median) \
         | busiest B share (median) | job tasks (sum of each B's peak) \
         | RSS MiB growth/min (fastest process) |"
    );
    assert!(lines[header + 1].starts_with("|---|---:|---|---:|"));
    let buggy: Vec<&str> = lines[header + 2].split(" | ").collect();
    assert_eq!(
        buggy[..4],
        ["| buggy", "30.0", "lb=l4 worker=unbounded", "50"]
    );
    // The busiest B's median share; B-1's peak (10 tasks/s × 29 s) plus B-2's
    // (half that).
    assert_eq!(buggy[6], "1");
    assert_eq!(buggy[7], "435");
    let fixed: Vec<&str> = lines[header + 3].split(" | ").collect();
    assert_eq!(fixed[..3], ["| fixed", "30.0", "lb=etcd"]);

    assert!(text.contains("## Verdicts: 2 of 3 verdicts hold"));
    let verdicts: Vec<&str> = lines
        .iter()
        .copied()
        .filter(|l| l.starts_with("- ✓") || l.starts_with("- ✗"))
        .collect();
    assert_eq!(verdicts.len(), 3);
    assert!(verdicts[0].starts_with("- ✓ **lb** — one B serves nearly every request: max of share, median over buggy: 1 (> 0.9: symptom seen); over fixed:"));
    assert!(verdicts[2].starts_with("- ✗ **leaks**"));
    assert_eq!(lines.last(), Some(&"samples: samples.json"));
}

/// The synthetic recording with B-2 dying unasked at 45 s.
fn recording_with_a_problem() -> Recording {
    let mut recording = synthetic_recording();
    recording.events.push(Event {
        t_s: 45.5,
        kind: EventKind::Problem,
        label: "service-b-2 exited | unasked".into(),
    });
    recording
}

#[test]
fn markdown_lists_events_and_puts_problems_above_the_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), &synthetic_recording(), &synthetic_scenario()).unwrap();
    let text = std::fs::read_to_string(&files.markdown).unwrap();
    assert!(!text.contains("## Problems"), "{text}");
    let events = text.find("## Events").expect("an events section");
    let after: Vec<&str> = text[events..].lines().collect();
    assert_eq!(
        after[2..6],
        [
            "| at s | kind | what |",
            "|---:|---|---|",
            "| 30 | flip | lb=etcd |",
            "| 45 | action | kill service-b-2 |"
        ]
    );

    let files = write(
        dir.path(),
        &recording_with_a_problem(),
        &synthetic_scenario(),
    )
    .unwrap();
    let text = std::fs::read_to_string(&files.markdown).unwrap();
    let problems = text.find("## Problems\n").expect("a problems section");
    assert!(problems < text.find("## Verdicts").unwrap());
    assert!(problems < text.find("## Phases").unwrap());
    assert!(
        text[problems..].contains("- **at 45.5 s**: service-b-2 exited \\| unasked\n"),
        "{text}"
    );
    assert!(text.contains("| 45.5 | **problem** | service-b-2 exited \\| unasked |"));
}

#[test]
fn html_highlights_problems_above_the_verdicts() {
    let dir = tempfile::tempdir().unwrap();
    let files = write(dir.path(), &synthetic_recording(), &synthetic_scenario()).unwrap();
    let text = std::fs::read_to_string(&files.html).unwrap();
    assert!(!text.contains("id=\"problems\""));

    let files = write(
        dir.path(),
        &recording_with_a_problem(),
        &synthetic_scenario(),
    )
    .unwrap();
    let text = std::fs::read_to_string(&files.html).unwrap();
    let doc = html_document(&text);
    let sections: Vec<&str> = doc
        .descendants()
        .filter(|n| n.has_tag_name("section"))
        .filter_map(|n| n.attribute("id"))
        .collect();
    assert_eq!(
        sections,
        ["problems", "verdicts", "phases", "events", "charts"]
    );
    let problems = doc
        .descendants()
        .find(|n| n.attribute("id") == Some("problems"))
        .unwrap();
    let problems_text: String = problems
        .descendants()
        .filter(|n| n.is_text())
        .filter_map(|n| n.text())
        .collect();
    assert!(
        problems_text.contains("at 45.5 s: service-b-2 exited | unasked"),
        "{problems_text}"
    );
    let highlighted: Vec<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name("tr") && n.attribute("class") == Some("problem"))
        .map(|row| {
            row.descendants()
                .filter(|n| n.is_text())
                .filter_map(|n| n.text())
                .collect()
        })
        .collect();
    assert_eq!(highlighted, ["45.5problemservice-b-2 exited | unasked"]);
}
