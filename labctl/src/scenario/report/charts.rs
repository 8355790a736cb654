//! One SVG chart per recorded signal, drawn with plotters into a string so
//! it can sit inline in `report.html`: a line per instance, the phases as
//! shaded bands named along the top, every flip, action and problem as a
//! dashed vertical line with its label, and the legend beside the plot so
//! it never covers a line.

use plotters::{
    coord::Shift,
    element::DashedPathElement,
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};

use crate::scenario::{
    recording::{EventKind, Recording},
    signals,
};

/// The whole chart, in pixels.
const SIZE: (u32, u32) = (900, 300);
/// Width of the legend column on the right.
const LEGEND_WIDTH: u32 = 150;
/// Above the plot: the title, then a row for the phase names.
const TITLE_ROW: i32 = 20;
const PHASE_ROW: i32 = 18;
const FONT: &str = "sans-serif";
/// Plotters' SVG backend writes `font-size` as the size given / 1.24.
const FONT_SCALE: f64 = 1.24;
/// Rough width of an average character, as a share of the font size (the
/// browser lays the text out; this only decides where to shorten names).
const CHAR_WIDTH: f64 = 0.6;

/// Line colours for instances (Tableau 10 without its red and grey, which
/// mark problems and flips). Which instance gets which: [`instance_colours`].
pub(super) const PALETTE: &[RGBColor] = &[
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];
const BANDS: [RGBColor; 2] = [RGBColor(236, 240, 247), RGBColor(250, 250, 252)];
const TEXT: RGBColor = RGBColor(40, 40, 40);
const GRID: RGBColor = RGBColor(225, 225, 225);

fn event_color(kind: EventKind) -> RGBColor {
    match kind {
        EventKind::Flip => RGBColor(80, 80, 80),
        EventKind::Action => RGBColor(20, 20, 120),
        EventKind::Problem => RGBColor(200, 0, 0),
    }
}

/// Where an instance comes in the colour order: the Bs first by number (so
/// `service-b-1` is always the palette's first colour, `service-b-2` its
/// second), then `service-a`, `load`, `partner-api`, then any other name.
fn colour_rank(instance: &str) -> (u8, u64, &str) {
    if let Some(n) = instance
        .strip_prefix("service-b-")
        .and_then(|n| n.parse().ok())
    {
        return (0, n, instance);
    }
    let group = match instance {
        "service-a" => 1,
        "load" => 2,
        "partner-api" => 3,
        _ => 4,
    };
    (group, 0, instance)
}

/// Every instance of the recording with its line colour: one colour per
/// name in every chart of a report, so a B reads the same throughout.
pub fn instance_colours(recording: &Recording) -> Vec<(String, RGBColor)> {
    let mut instances: Vec<&str> = recording
        .series
        .iter()
        .map(|s| s.instance.as_str())
        .collect();
    instances.sort_by_key(|name| colour_rank(name));
    instances.dedup();
    instances
        .into_iter()
        .enumerate()
        .map(|(i, name)| (name.to_string(), PALETTE[i % PALETTE.len()]))
        .collect()
}

fn colour_of(colours: &[(String, RGBColor)], instance: &str) -> RGBColor {
    colours
        .iter()
        .find(|(name, _)| name == instance)
        .map_or(PALETTE[0], |(_, colour)| *colour)
}

fn kind_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Flip => "switch flip",
        EventKind::Action => "action",
        EventKind::Problem => "problem",
    }
}

/// One chart, ready to be placed inline.
#[derive(Debug, Clone)]
pub struct Chart {
    /// The signal's key (`chart-<key>` is the figure's id).
    pub key: String,
    pub title: String,
    pub unit: String,
    /// Where the number comes from, said plainly.
    pub source: String,
    /// A complete `<svg>` element (with its namespace).
    pub svg: String,
}

/// Every signal the recording has, in the catalogue's order; signals not in
/// the catalogue (a newer sampler) follow under their key.
pub fn signal_keys(recording: &Recording) -> Vec<String> {
    let mut keys: Vec<String> = signals::ALL
        .iter()
        .filter(|s| recording.series_of(s.key).next().is_some())
        .map(|s| s.key.to_string())
        .collect();
    for series in &recording.series {
        if signals::by_key(&series.signal).is_none() && !keys.contains(&series.signal) {
            keys.push(series.signal.clone());
        }
    }
    keys
}

/// A chart for every signal of the recording.
pub fn all(recording: &Recording) -> anyhow::Result<Vec<Chart>> {
    signal_keys(recording)
        .into_iter()
        .map(|key| {
            let (title, unit, source) = match signals::by_key(&key) {
                Some(s) => (
                    s.title.to_string(),
                    s.unit.to_string(),
                    s.source.to_string(),
                ),
                None => (
                    key.clone(),
                    String::new(),
                    "Not in labctl's signal catalogue.".into(),
                ),
            };
            let svg = draw(recording, &key, &title, &unit)?;
            Ok(Chart {
                key,
                title,
                unit,
                source,
                svg,
            })
        })
        .collect()
}

/// XML 1.0 cannot hold most control characters, even escaped; labels come
/// from process names and config values, so drop any.
fn printable(text: &str) -> String {
    text.chars().filter(|c| !c.is_control()).collect()
}

/// `text` cut to about `pixels` wide at `font_size`, with an ellipsis.
fn fit(text: &str, pixels: f64, font_size: f64) -> String {
    let char_px = font_size / FONT_SCALE * CHAR_WIDTH;
    let room = (pixels / char_px).floor().max(0.0) as usize;
    let count = text.chars().count();
    if count <= room {
        text.to_string()
    } else if room <= 1 {
        String::new()
    } else {
        text.chars().take(room - 1).chain(['…']).collect()
    }
}

/// Axis numbers: as many decimals as the axis' span needs, no trailing
/// zeros, thousands and millions shortened.
fn axis_number(v: f64, span: f64) -> String {
    let magnitude = v.abs();
    if magnitude >= 1e6 {
        return format!("{:.1}M", v / 1e6).replace(".0M", "M");
    }
    if magnitude >= 1e4 {
        return format!("{:.0}k", v / 1e3);
    }
    let decimals = if span >= 50.0 {
        0
    } else if span >= 5.0 {
        1
    } else {
        2
    };
    let text = format!("{v:.decimals$}");
    let text = if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    };
    if text == "-0" { "0".into() } else { text }
}

/// The y range: from 0 (or below, for a negative value) to a little above
/// the largest value.
fn y_range(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (mut low, mut high) = (0.0_f64, 0.0_f64);
    for v in values {
        low = low.min(v);
        high = high.max(v);
    }
    if high - low <= 0.0 {
        return (low, low + 1.0);
    }
    (low, high + (high - low) * 0.08)
}

/// Draws one signal's chart as an `<svg>` element.
pub fn draw(recording: &Recording, key: &str, title: &str, unit: &str) -> anyhow::Result<String> {
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, SIZE).into_drawing_area();
        draw_on(&root, recording, key, title, unit)?;
        root.present()?;
    }
    let label = format!("Chart: {} over time", printable(title));
    Ok(svg.replacen(
        "<svg ",
        &format!(
            "<svg role=\"img\" aria-label=\"{}\" ",
            label
                .replace('&', "&amp;")
                .replace('"', "&quot;")
                .replace('<', "&lt;")
        ),
        1,
    ))
}

fn draw_on(
    root: &DrawingArea<SVGBackend<'_>, Shift>,
    recording: &Recording,
    key: &str,
    title: &str,
    unit: &str,
) -> anyhow::Result<()> {
    root.fill(&WHITE)?;
    let series: Vec<_> = recording.series_of(key).collect();
    let colours = instance_colours(recording);
    let x_end = recording
        .phases
        .iter()
        .map(|p| p.end_s)
        .chain(series.iter().flat_map(|s| s.points.iter().map(|p| p.0)))
        .fold(recording.duration_s, f64::max)
        .max(1.0);
    let (y_low, y_high) = y_range(
        series
            .iter()
            .flat_map(|s| s.points.iter().filter_map(|p| p.1)),
    );

    let (plot_area, legend_area) = root.split_horizontally(SIZE.0 - LEGEND_WIDTH);
    plot_area.draw(&Text::new(
        printable(title),
        (8, 4),
        (FONT, 16).into_font().style(FontStyle::Bold).color(&TEXT),
    ))?;

    let mut chart = ChartBuilder::on(&plot_area)
        .margin_top(TITLE_ROW + PHASE_ROW + 4)
        .margin_left(6)
        .margin_right(6)
        .margin_bottom(4)
        .x_label_area_size(34)
        .y_label_area_size(62)
        .build_cartesian_2d(0.0..x_end, y_low..y_high)?;
    let (x_pixels, y_pixels) = chart.plotting_area().get_pixel_range();

    // The phases: a band from the phase-name row down to the x axis.
    let band_top = y_pixels.start - PHASE_ROW;
    for (i, phase) in recording.phases.iter().enumerate() {
        let left = chart.backend_coord(&(phase.start_s, y_high)).0;
        let right = chart.backend_coord(&(phase.end_s.min(x_end), y_high)).0;
        if right <= left {
            continue;
        }
        root.draw(&Rectangle::new(
            [(left, band_top), (right, y_pixels.end)],
            BANDS[i % 2].filled(),
        ))?;
        let name = fit(&printable(&phase.name), f64::from(right - left - 6), 13.0);
        root.draw(&Text::new(
            name,
            (left + 4, band_top + 3),
            (FONT, 13).into_font().color(&TEXT),
        ))?;
    }

    chart
        .configure_mesh()
        .x_desc("seconds since start")
        .y_desc(printable(unit))
        .x_labels(12)
        .y_labels(6)
        .x_label_formatter(&|x| axis_number(*x, x_end))
        .y_label_formatter(&|y| axis_number(*y, y_high - y_low))
        .bold_line_style(GRID.stroke_width(1))
        .light_line_style(TRANSPARENT)
        .axis_desc_style((FONT, 14).into_font().color(&TEXT))
        .label_style((FONT, 13).into_font().color(&TEXT))
        .draw()?;

    // Events, grouped when their lines would touch, labelled downwards
    // from the top of the plot.
    let mut groups: Vec<(i32, EventKind, Vec<String>)> = Vec::new();
    let mut events: Vec<_> = recording.events.iter().collect();
    events.sort_by(|a, b| a.t_s.total_cmp(&b.t_s));
    for event in events {
        let x = chart
            .backend_coord(&(event.t_s.clamp(0.0, x_end), y_high))
            .0;
        match groups.last_mut() {
            Some((gx, kind, labels)) if x - *gx < 12 => {
                labels.push(printable(&event.label));
                if event.kind == EventKind::Problem {
                    *kind = EventKind::Problem;
                }
            }
            _ => groups.push((x, event.kind, vec![printable(&event.label)])),
        }
    }
    let plot_height = f64::from(y_pixels.end - y_pixels.start);
    for (x, kind, labels) in &groups {
        let color = event_color(*kind);
        root.draw(&DashedPathElement::new(
            [(*x, y_pixels.start), (*x, y_pixels.end)],
            5,
            4,
            color.stroke_width(1),
        ))?;
        let label = fit(&labels.join(", "), plot_height - 8.0, 12.0);
        let style = (FONT, 12)
            .into_font()
            .transform(FontTransform::Rotate90)
            .color(&color)
            .pos(Pos::new(HPos::Left, VPos::Bottom));
        root.draw(&Text::new(label, (*x + 3, y_pixels.start + 4), style))?;
    }

    // The data: one line per instance, broken where a sample is missing;
    // a lone sample between gaps is a dot.
    for s in &series {
        let color = colour_of(&colours, &s.instance);
        for run in s.points.split(|p| p.1.is_none()) {
            let points: Vec<(f64, f64)> = run.iter().filter_map(|p| Some((p.0, p.1?))).collect();
            if let [single] = points[..] {
                chart.draw_series([Circle::new(single, 2, color.filled())])?;
            } else if !points.is_empty() {
                chart.draw_series(LineSeries::new(points, color.stroke_width(2)))?;
            }
        }
    }
    if series
        .iter()
        .all(|s| s.points.iter().all(|p| p.1.is_none()))
    {
        let middle = (
            (x_pixels.start + x_pixels.end) / 2,
            (y_pixels.start + y_pixels.end) / 2,
        );
        root.draw(&Text::new(
            "no samples",
            middle,
            (FONT, 14)
                .into_font()
                .color(&TEXT)
                .pos(Pos::new(HPos::Center, VPos::Center)),
        ))?;
    }

    draw_legend(&legend_area, &series, &colours, recording, y_pixels.start)?;
    Ok(())
}

/// The legend column: each instance's colour and name, then the kinds of
/// event marked on this chart.
fn draw_legend(
    area: &DrawingArea<SVGBackend<'_>, Shift>,
    series: &[&crate::scenario::recording::Series],
    colours: &[(String, RGBColor)],
    recording: &Recording,
    top: i32,
) -> anyhow::Result<()> {
    let width = f64::from(LEGEND_WIDTH) - 34.0;
    let mut y = top;
    for s in series {
        let color = colour_of(colours, &s.instance);
        area.draw(&PathElement::new(
            [(4, y + 7), (24, y + 7)],
            color.stroke_width(3),
        ))?;
        area.draw(&Text::new(
            fit(&printable(&s.instance), width, 13.0),
            (30, y),
            (FONT, 13).into_font().color(&TEXT),
        ))?;
        y += 18;
    }
    y += 6;
    for kind in [EventKind::Flip, EventKind::Action, EventKind::Problem] {
        if !recording.events.iter().any(|e| e.kind == kind) {
            continue;
        }
        let color = event_color(kind);
        area.draw(&DashedPathElement::new(
            [(14, y), (14, y + 14)],
            4,
            3,
            color.stroke_width(1),
        ))?;
        area.draw(&Text::new(
            kind_name(kind),
            (30, y),
            (FONT, 12).into_font().color(&color),
        ))?;
        y += 18;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::recording::{Event, PhaseSpan};

    fn recording() -> Recording {
        let mut recording = Recording {
            duration_s: 20.0,
            phases: vec![
                PhaseSpan {
                    name: "buggy".into(),
                    start_s: 0.0,
                    end_s: 10.0,
                    ..PhaseSpan::default()
                },
                PhaseSpan {
                    name: "fixed & <calm>".into(),
                    start_s: 10.0,
                    end_s: 20.0,
                    ..PhaseSpan::default()
                },
            ],
            events: vec![Event {
                t_s: 10.0,
                kind: EventKind::Flip,
                label: "lb=etcd\u{7}".into(),
            }],
            ..Recording::default()
        };
        for t in 0..20 {
            let t = f64::from(t);
            recording.push("rps", "load", t, Some(50.0));
            recording.push("custom_gauge", "service-a", t, Some(t));
            recording.push("share", "service-b-1", t, (t != 5.0).then_some(0.9));
        }
        recording
    }

    #[test]
    fn a_chart_per_signal_in_catalogue_order_then_unknown_keys() {
        let keys = signal_keys(&recording());
        assert_eq!(keys, ["rps", "share", "custom_gauge"]);
    }

    #[test]
    fn chart_is_well_formed_svg_with_bands_events_lines_and_legend() {
        let recording = recording();
        let svg = draw(&recording, "share", "Share", "share").unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let root = doc.root_element();
        assert_eq!(root.tag_name().name(), "svg");
        assert_eq!(
            root.tag_name().namespace(),
            Some("http://www.w3.org/2000/svg")
        );
        assert_eq!(root.attribute("width"), Some("900"));
        let texts: Vec<String> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(|t| t.trim().to_string())
            .collect();
        for expected in [
            "Share",
            "buggy",
            "fixed & <calm>",
            "lb=etcd",
            "service-b-1",
            "switch flip",
            "seconds since start",
        ] {
            assert!(
                texts.iter().any(|t| t == expected),
                "{expected:?} in {texts:?}"
            );
        }
        // Both phase bands.
        for fill in ["#ECF0F7", "#FAFAFC"] {
            assert!(
                doc.descendants()
                    .any(|n| n.has_tag_name("rect") && n.attribute("fill") == Some(fill)),
                "band {fill}"
            );
        }
        // The gap at t = 5 splits the line in two.
        let lines = doc
            .descendants()
            .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke") == Some("#1F77B4"))
            .filter(|n| n.attribute("stroke-width") == Some("2"))
            .count();
        assert_eq!(lines, 2);
    }

    /// The colours of the series lines (2 px polylines) a chart draws.
    fn line_colours(svg: &str) -> Vec<String> {
        let doc = roxmltree::Document::parse(svg).unwrap();
        let mut colours: Vec<String> = doc
            .descendants()
            .filter(|n| n.has_tag_name("polyline") && n.attribute("stroke-width") == Some("2"))
            .filter_map(|n| n.attribute("stroke").map(String::from))
            .collect();
        colours.sort();
        colours.dedup();
        colours
    }

    #[test]
    fn an_instance_has_one_colour_in_every_chart() {
        let mut recording = Recording {
            duration_s: 5.0,
            ..Recording::default()
        };
        for t in 0..5 {
            let t = f64::from(t);
            // Each chart lists its instances in another order, and some
            // charts lack some instances.
            recording.push("tasks_alive", "service-b-2", t, Some(3.0));
            recording.push("tasks_alive", "service-a", t, Some(4.0));
            recording.push("share", "service-b-2", t, Some(0.4));
            recording.push("share", "service-b-1", t, Some(0.6));
            recording.push("rps", "load", t, Some(50.0));
            recording.push("partner_connections", "partner-api", t, Some(2.0));
            recording.push("job_tasks", "service-b-1", t, Some(1.0));
        }
        let colours: Vec<(String, String)> = instance_colours(&recording)
            .into_iter()
            .map(|(name, c)| (name, format!("#{:02X}{:02X}{:02X}", c.0, c.1, c.2)))
            .collect();
        let expected = [
            ("service-b-1", "#1F77B4"),
            ("service-b-2", "#FF7F0E"),
            ("service-a", "#2CA02C"),
            ("load", "#9467BD"),
            ("partner-api", "#8C564B"),
        ];
        assert_eq!(
            colours,
            expected.map(|(name, c)| (name.to_string(), c.to_string()))
        );
        let chart = |key: &str| line_colours(&draw(&recording, key, key, "").unwrap());
        assert_eq!(chart("share"), ["#1F77B4", "#FF7F0E"]);
        assert_eq!(chart("tasks_alive"), ["#2CA02C", "#FF7F0E"]);
        assert_eq!(chart("job_tasks"), ["#1F77B4"]);
        assert_eq!(chart("rps"), ["#9467BD"]);
        assert_eq!(chart("partner_connections"), ["#8C564B"]);
    }

    #[test]
    fn bs_order_by_number_not_by_text() {
        let mut recording = Recording::default();
        for instance in ["service-b-10", "service-b-2", "service-b-1"] {
            recording.push("share", instance, 0.0, Some(0.3));
        }
        let names: Vec<String> = instance_colours(&recording)
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        assert_eq!(names, ["service-b-1", "service-b-2", "service-b-10"]);
    }

    #[test]
    fn axis_numbers_are_short() {
        assert_eq!(axis_number(0.8, 1.1), "0.8");
        assert_eq!(axis_number(1.0, 1.1), "1");
        assert_eq!(axis_number(0.25, 1.1), "0.25");
        assert_eq!(axis_number(2.5, 10.0), "2.5");
        assert_eq!(axis_number(250.0, 1000.0), "250");
        assert_eq!(axis_number(25_000.0, 30_000.0), "25k");
        assert_eq!(axis_number(2_000_000.0, 3e6), "2M");
    }

    #[test]
    fn long_names_are_shortened() {
        assert_eq!(fit("fix-worker", 200.0, 13.0), "fix-worker");
        let short = fit("fix-worker", 30.0, 13.0);
        assert!(
            short.ends_with('…') && short.chars().count() < 10,
            "{short}"
        );
    }
}
