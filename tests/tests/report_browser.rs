//! The report's browser check, proven on pages whose pixels are known: it
//! must see what a chart drew, see that a blank chart drew nothing, and catch
//! a page's console errors and requests. No lab: only headless Chromium.

use std::path::Path;

use lab_tests::browser::{BrowserCheck, check_report};

/// A chart as the report writes it: a figure holding an inline 600×200 SVG.
/// `shape-rendering: crispEdges` keeps the rectangles' edges free of
/// anti-aliasing, so their pixel counts are exact.
fn chart(id: &str, body: &str) -> String {
    format!(
        r##"<figure class="chart" id="{id}">
<svg xmlns="http://www.w3.org/2000/svg" width="600" height="200" viewBox="0 0 600 200" shape-rendering="crispEdges">
<rect x="0" y="0" width="600" height="200" fill="#ffffff"/>
{body}
</svg>
<figcaption>{id}</figcaption>
</figure>"##
    )
}

fn page(body: &str) -> String {
    format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>browser check</title>
<style>body {{ margin: 0; padding: 16px; font-family: sans-serif; background: #fff; }}
figure {{ margin: 24px 0; }}</style></head>
<body><h1>Known charts</h1>
{body}
</body></html>"#
    )
}

fn check(dir: &Path, name: &str, html: &str) -> BrowserCheck {
    let path = dir.join(name);
    std::fs::write(&path, html).unwrap();
    let check = check_report(&path, &dir.join("shots")).unwrap();
    println!("{check:#?}");
    check
}

#[test]
fn drawn_charts_are_measured_and_a_blank_one_reads_empty() {
    let dir = tempfile::tempdir().unwrap();
    let html = page(
        &[
            // One rectangle over exactly a quarter of the area.
            chart(
                "chart-quarter",
                r##"<rect x="0" y="0" width="300" height="100" fill="#1f77b4"/>"##,
            ),
            // Three colours, 10 % of the area each; black is ink, not colour.
            chart(
                "chart-three-colours",
                r##"<rect x="0" y="0" width="60" height="200" fill="#d62728"/>
<rect x="100" y="0" width="60" height="200" fill="#2ca02c"/>
<rect x="200" y="0" width="60" height="200" fill="#000000"/>"##,
            ),
            // A line chart like the report's: axes, a series and a label.
            chart(
                "chart-line",
                r##"<line x1="40" y1="10" x2="40" y2="180" stroke="#000" stroke-width="2"/>
<line x1="40" y1="180" x2="590" y2="180" stroke="#000" stroke-width="2"/>
<polyline points="40,170 150,60 260,120 370,30 480,90 590,40" fill="none" stroke="#ff7f0e" stroke-width="3" shape-rendering="auto"/>
<text x="300" y="198" font-size="12" text-anchor="middle">time (s)</text>"##,
            ),
            // The report's frame without its data: a shaded phase band, a
            // grid, axes and a label, but the series is missing.
            chart(
                "chart-frame-only",
                r##"<rect x="40" y="10" width="275" height="170" fill="#ecf0f7"/>
<line x1="40" y1="95" x2="590" y2="95" stroke="#e6e8ec" stroke-width="1"/>
<line x1="40" y1="10" x2="40" y2="180" stroke="#000" stroke-width="2"/>
<line x1="40" y1="180" x2="590" y2="180" stroke="#000" stroke-width="2"/>
<text x="300" y="198" font-size="12" text-anchor="middle">time (s)</text>"##,
            ),
            // Background only: a chart whose points all fell outside.
            chart(
                "chart-blank",
                r##"<polyline points="700,10 800,20" fill="none" stroke="#ff7f0e" stroke-width="3"/>"##,
            ),
        ]
        .concat(),
    );
    // A space in the name: the page is still told apart from other requests.
    let check = check(dir.path(), "known charts.html", &html);

    let ids: Vec<&str> = check.charts.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "chart-quarter",
            "chart-three-colours",
            "chart-line",
            "chart-frame-only",
            "chart-blank"
        ]
    );
    for chart in &check.charts {
        assert_eq!((chart.width, chart.height), (600, 200), "{chart:?}");
        assert_eq!(chart.background, "#ffffff", "{chart:?}");
    }
    // The boxes' edges may fall between pixels: one row or column of the
    // chart is then left out, half a percent of it at most.
    let about = |measured: f64, expected: f64| (measured - expected).abs() < 0.006;

    let quarter = check.chart("chart-quarter").unwrap();
    assert!(about(quarter.ink_fraction, 0.25), "{quarter:?}");
    assert!(about(quarter.coloured_fraction, 0.25), "{quarter:?}");
    assert_eq!(quarter.colours, 1, "{quarter:?}");
    assert_eq!(quarter.palette[0].0, "#1f77b4", "{quarter:?}");

    let three = check.chart("chart-three-colours").unwrap();
    assert!(about(three.ink_fraction, 0.30), "{three:?}");
    assert!(about(three.coloured_fraction, 0.20), "{three:?}");
    assert_eq!(three.colours, 3, "{three:?}");
    let mut palette: Vec<&str> = three.palette.iter().map(|(hex, _)| hex.as_str()).collect();
    palette.sort();
    assert_eq!(palette, ["#000000", "#2ca02c", "#d62728"], "{three:?}");

    let line = check.chart("chart-line").unwrap();
    assert!(
        line.ink_fraction > 0.01 && line.ink_fraction < 0.2,
        "axes, a line and a label: {line:?}"
    );
    assert!(
        line.coloured_fraction > 0.005 && line.coloured_fraction < line.ink_fraction,
        "the orange line is coloured, the axes and label are not: {line:?}"
    );
    assert!(
        line.palette.iter().any(|(hex, _)| hex == "#ff7f0e"),
        "{line:?}"
    );

    let frame = check.chart("chart-frame-only").unwrap();
    assert!(frame.ink_fraction > 0.3, "{frame:?}");
    assert_eq!(frame.coloured_fraction, 0.0, "no series drawn: {frame:?}");

    let blank = check.chart("chart-blank").unwrap();
    assert_eq!(blank.ink_fraction, 0.0, "{blank:?}");
    assert_eq!(blank.coloured_fraction, 0.0, "{blank:?}");
    assert_eq!(blank.colours, 0, "{blank:?}");

    assert!(
        check.console_errors.is_empty(),
        "{:?}",
        check.console_errors
    );
    assert!(check.requests.is_empty(), "{:?}", check.requests);

    // The screenshot is the whole page: as wide as the viewport and at
    // least as tall as the five charts.
    let png = std::fs::read(&check.screenshot).unwrap();
    let header = png::Decoder::new(std::io::Cursor::new(png))
        .read_info()
        .unwrap()
        .info()
        .clone();
    assert_eq!(header.width, 1280);
    assert!(header.height >= 5 * 200, "{}", header.height);
}

#[test]
fn console_errors_exceptions_and_requests_are_caught() {
    let dir = tempfile::tempdir().unwrap();
    let html = page(&format!(
        r##"{}
<script>
console.log("an ordinary message");
console.error("deliberate console error");
throw new Error("deliberate uncaught exception");
</script>
<img src="missing-image.png" alt="">"##,
        chart(
            "chart-quarter",
            r##"<rect x="0" y="0" width="300" height="100" fill="#1f77b4"/>"##
        )
    ));
    let check = check(dir.path(), "errors.html", &html);

    let has_error = |needle: &str| check.console_errors.iter().any(|e| e.contains(needle));
    assert!(
        has_error("console.error: deliberate console error"),
        "{:?}",
        check.console_errors
    );
    assert!(
        has_error("deliberate uncaught exception"),
        "{:?}",
        check.console_errors
    );
    assert!(
        has_error("missing-image.png"),
        "the failed image load: {:?}",
        check.console_errors
    );
    assert!(
        !has_error("an ordinary message"),
        "a log line is no error: {:?}",
        check.console_errors
    );
    assert!(
        check
            .console_messages
            .iter()
            .any(|m| m == "console.log: an ordinary message"),
        "{:?}",
        check.console_messages
    );
    assert!(
        check
            .requests
            .iter()
            .any(|url| url.ends_with("/missing-image.png")),
        "{:?}",
        check.requests
    );
    // The errors do not stop the chart being measured.
    let quarter = check.chart("chart-quarter").unwrap();
    assert!((quarter.ink_fraction - 0.25).abs() < 0.006, "{quarter:?}");
}

#[test]
fn a_figure_without_svg_or_hidden_reads_empty() {
    let dir = tempfile::tempdir().unwrap();
    let html = page(
        r##"<figure class="chart" id="chart-no-svg"><figcaption>no data</figcaption></figure>
<figure class="chart" id="chart-hidden" style="display: none">
<svg xmlns="http://www.w3.org/2000/svg" width="600" height="200"><rect width="600" height="200" fill="#1f77b4"/></svg>
</figure>"##,
    );
    let check = check(dir.path(), "empty.html", &html);
    assert_eq!(check.charts.len(), 2, "{:?}", check.charts);
    for chart in &check.charts {
        assert_eq!((chart.width, chart.height), (0, 0), "{chart:?}");
        assert_eq!(chart.ink_fraction, 0.0, "{chart:?}");
    }
}
