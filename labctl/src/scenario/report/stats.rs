//! Numbers drawn from a recording: a signal's instances combined into one
//! series, a statistic of that series over a phase, the verdicts and the
//! per-phase summary table. Pure functions of the recording, so the report
//! can be redrawn from `samples.json` alone.

use crate::scenario::{
    recording::{PhaseSpan, Recording},
    signals,
    spec::{Combine, Scenario, Stat, VerdictSpec},
};

use super::VerdictResult;

/// Samples taken within this many seconds of each other count as the same
/// second (the sampler stamps every instance with one `t`, but a value that
/// went through JSON may differ in its last bits).
const SAME_T: f64 = 1e-6;

/// One number per sampled second: `signal`'s instances combined with
/// `combine` over the instances that have a value at that second. Seconds
/// where no instance has a value are left out.
pub fn combined(recording: &Recording, signal: &str, combine: Combine) -> Vec<(f64, f64)> {
    let mut points: Vec<(f64, f64)> = recording
        .series_of(signal)
        .flat_map(|s| s.points.iter())
        .filter_map(|&(t, v)| v.filter(|v| v.is_finite()).map(|v| (t, v)))
        .collect();
    points.sort_by(|a, b| a.0.total_cmp(&b.0));
    let mut out: Vec<(f64, f64)> = Vec::new();
    let mut group_t = f64::NAN;
    for (t, v) in points {
        match out.last_mut() {
            Some(last) if (t - group_t).abs() <= SAME_T => {
                last.1 = match combine {
                    Combine::Max => last.1.max(v),
                    Combine::Sum => last.1 + v,
                    Combine::Min => last.1.min(v),
                };
            }
            _ => {
                group_t = t;
                out.push((t, v));
            }
        }
    }
    out
}

/// The points of `series` with `start_s <= t < end_s`.
pub fn window(series: &[(f64, f64)], start_s: f64, end_s: f64) -> Vec<(f64, f64)> {
    series
        .iter()
        .copied()
        .filter(|&(t, _)| t >= start_s && t < end_s)
        .collect()
}

/// A statistic of `(t, value)` points in time order. `None` when there are
/// no points, or fewer than two for `increase` and `growth-per-min` (one
/// sample says nothing about a change).
pub fn statistic(points: &[(f64, f64)], stat: Stat) -> Option<f64> {
    let (first, last) = (points.first()?, points.last()?);
    let mut values: Vec<f64> = points.iter().map(|p| p.1).collect();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match stat {
        Stat::Median if n % 2 == 1 => Some(values[n / 2]),
        Stat::Median => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
        // Nearest rank: the smallest value at or above 99 % of the samples.
        Stat::P99 => {
            let rank = (0.99 * n as f64).ceil() as usize;
            Some(values[rank.clamp(1, n) - 1])
        }
        Stat::Max => Some(values[n - 1]),
        Stat::Mean => Some(values.iter().sum::<f64>() / n as f64),
        Stat::Last => Some(last.1),
        Stat::Increase if n >= 2 => Some(last.1 - first.1),
        Stat::GrowthPerMin if n >= 2 => slope(points).map(|per_s| per_s * 60.0),
        Stat::Increase | Stat::GrowthPerMin => None,
    }
}

/// Least-squares slope of value over time (per second); `None` when every
/// point has the same time.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_v = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut covariance, mut variance) = (0.0, 0.0);
    for &(t, v) in points {
        covariance += (t - mean_t) * (v - mean_v);
        variance += (t - mean_t) * (t - mean_t);
    }
    (variance > 0.0).then(|| covariance / variance)
}

/// A per-second rate integrated over time: each sample's rate times the
/// time since the sample before it (a sample covers the second before it;
/// the first counts one second). Turns "errors per second" into "errors".
pub fn total(points: &[(f64, f64)]) -> Option<f64> {
    if points.is_empty() {
        return None;
    }
    let mut previous_t = None;
    let mut sum = 0.0;
    for &(t, v) in points {
        let covered = previous_t.map_or(1.0, |p| t - p);
        sum += v * covered;
        previous_t = Some(t);
    }
    Some(sum)
}

/// A phase ran when the recording has it and it lasted.
fn ran(phase: Option<&PhaseSpan>) -> Option<&PhaseSpan> {
    phase.filter(|p| p.end_s > p.start_s)
}

/// What one phase showed for one verdict.
struct PhaseReading {
    value: Option<f64>,
    /// Why there is no value, when there is none.
    missing: Option<String>,
}

fn read_phase(
    recording: &Recording,
    series: &[(f64, f64)],
    spec: &VerdictSpec,
    phase_name: &str,
) -> PhaseReading {
    let Some(phase) = ran(recording.phase(phase_name)) else {
        let why = if recording.interrupted {
            "the phase did not run (the run was interrupted before it)"
        } else {
            "the phase did not run"
        };
        return PhaseReading {
            value: None,
            missing: Some(why.into()),
        };
    };
    let settle = spec.settle.map_or(0.0, |d| d.as_secs_f64());
    let points = window(series, phase.start_s + settle, phase.end_s);
    let value = statistic(&points, spec.stat);
    let missing = value.is_none().then(|| {
        if points.is_empty() {
            format!(
                "no samples of {} in the phase{}",
                spec.signal,
                if settle > 0.0 {
                    format!(" after its first {} s", number(settle))
                } else {
                    String::new()
                }
            )
        } else {
            format!("{} needs at least 2 samples", spec.stat.name())
        }
    });
    PhaseReading { value, missing }
}

/// Evaluates one verdict: the statistic in the buggy phase (and the fixed
/// one), against the threshold.
pub fn evaluate_one(recording: &Recording, spec: &VerdictSpec) -> VerdictResult {
    let (threshold, above) = spec.threshold();
    let shows = |v: f64| if above { v > threshold } else { v < threshold };
    let sign = if above { ">" } else { "<" };
    // The threshold as the scenario wrote it.
    let threshold_text = format!("{sign} {threshold}");
    let measure = format!(
        "{} of {}, {}",
        spec.instances.name(),
        spec.signal,
        spec.stat.name()
    );
    let base_unit = signals::by_key(&spec.signal).map_or("", |s| s.unit);
    let unit = match spec.stat {
        Stat::GrowthPerMin if base_unit.is_empty() => "per min".to_string(),
        Stat::GrowthPerMin => format!("{base_unit}/min"),
        _ => base_unit.to_string(),
    };
    let series = combined(recording, &spec.signal, spec.instances);

    let buggy = read_phase(recording, &series, spec, &spec.buggy);
    let seen = buggy.value.is_some_and(shows);
    let mut explanation = format!("{measure} over {}: ", spec.buggy);
    match (buggy.value, &buggy.missing) {
        (Some(v), _) if seen => {
            explanation += &format!("{} ({threshold_text}: symptom seen)", number(v));
        }
        (Some(v), _) => {
            explanation += &format!("{} (not {threshold_text}: symptom not seen)", number(v));
        }
        (None, why) => {
            explanation += &format!("no value, {}", why.as_deref().unwrap_or("no samples"));
        }
    }

    let fixed = spec
        .fixed
        .as_ref()
        .map(|name| (name, read_phase(recording, &series, spec, name)));
    let gone = match &fixed {
        None => true,
        Some((name, reading)) => {
            explanation += &format!("; over {name}: ");
            match (reading.value, &reading.missing) {
                (Some(v), _) if !shows(v) => {
                    explanation += &format!("{} (gone)", number(v));
                    true
                }
                (Some(v), _) => {
                    explanation += &format!("{} (still {threshold_text}: not gone)", number(v));
                    false
                }
                (None, why) => {
                    explanation += &format!("no value, {}", why.as_deref().unwrap_or("no samples"));
                    false
                }
            }
        }
    };

    VerdictResult {
        cause: spec.cause.clone(),
        symptom: spec.symptom.clone(),
        signal: spec.signal.clone(),
        measure,
        threshold: threshold_text,
        unit,
        buggy_phase: spec.buggy.clone(),
        buggy_value: buggy.value,
        fixed_phase: spec.fixed.clone(),
        fixed_value: fixed.and_then(|(_, reading)| reading.value),
        holds: seen && gone,
        explanation,
    }
}

/// Every verdict of the scenario, in its order.
pub fn evaluate_all(recording: &Recording, scenario: &Scenario) -> Vec<VerdictResult> {
    scenario
        .verdicts
        .iter()
        .map(|spec| evaluate_one(recording, spec))
        .collect()
}

/// A number for people: whole numbers as they are, others with two
/// decimals below 10, one below 100, none above.
pub fn number(v: f64) -> String {
    if !v.is_finite() {
        return "—".into();
    }
    let magnitude = v.abs();
    let text = if magnitude >= 100.0 || v == v.trunc() && magnitude < 1e15 {
        format!("{v:.0}")
    } else if magnitude >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    };
    // "-0" reads as a sign error.
    if text
        .trim_start_matches('-')
        .chars()
        .all(|c| c == '0' || c == '.')
    {
        text.trim_start_matches('-').to_string()
    } else {
        text
    }
}

/// How one summary column reduces a phase.
#[derive(Debug, Clone, Copy)]
enum Reduce {
    Stat(Stat),
    /// A rate integrated into a count.
    Total,
}

/// A summary column: a signal, combined, reduced over each phase.
struct Column {
    header: &'static str,
    signal: &'static str,
    combine: Combine,
    reduce: Reduce,
}

/// The per-phase summary's columns after the phase's own ones; a column
/// whose signal the recording lacks is left out.
const COLUMNS: &[Column] = &[
    Column {
        header: "rps (median)",
        signal: signals::RPS.key,
        combine: Combine::Sum,
        reduce: Reduce::Stat(Stat::Median),
    },
    Column {
        header: "p50 ms (median)",
        signal: signals::LATENCY_P50_MS.key,
        combine: Combine::Max,
        reduce: Reduce::Stat(Stat::Median),
    },
    Column {
        header: "p99 ms (median)",
        signal: signals::LATENCY_P99_MS.key,
        combine: Combine::Max,
        reduce: Reduce::Stat(Stat::Median),
    },
    Column {
        header: "errors (total)",
        signal: signals::ERRORS.key,
        combine: Combine::Sum,
        reduce: Reduce::Total,
    },
    Column {
        header: "busiest B share (median)",
        signal: signals::SHARE.key,
        combine: Combine::Max,
        reduce: Reduce::Stat(Stat::Median),
    },
    Column {
        header: "job tasks, all Bs (peak)",
        signal: signals::JOB_TASKS.key,
        combine: Combine::Sum,
        reduce: Reduce::Stat(Stat::Max),
    },
    Column {
        header: "fds growth/min (max of processes)",
        signal: signals::OPEN_FDS.key,
        combine: Combine::Max,
        reduce: Reduce::Stat(Stat::GrowthPerMin),
    },
    Column {
        header: "RSS MiB growth/min (max of processes)",
        signal: signals::RSS_MIB.key,
        combine: Combine::Max,
        reduce: Reduce::Stat(Stat::GrowthPerMin),
    },
    Column {
        header: "partner handshakes/s (median)",
        signal: signals::PARTNER_HANDSHAKES.key,
        combine: Combine::Sum,
        reduce: Reduce::Stat(Stat::Median),
    },
    Column {
        header: "work after deadline (increase)",
        signal: signals::WORK_AFTER_DEADLINE.key,
        combine: Combine::Sum,
        reduce: Reduce::Stat(Stat::Increase),
    },
];

/// The per-phase summary as text cells, shared by the HTML and Markdown.
#[derive(Debug, Clone, PartialEq)]
pub struct PhaseTable {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

/// One row per phase that ran: its length, its switches (all of them for
/// the first phase, then only what changed), its load, and the summary
/// columns whose signal was recorded.
pub fn phase_table(recording: &Recording) -> PhaseTable {
    let columns: Vec<(&Column, Vec<(f64, f64)>)> = COLUMNS
        .iter()
        .filter(|c| recording.series_of(c.signal).next().is_some())
        .map(|c| (c, combined(recording, c.signal, c.combine)))
        .collect();
    let mut headers: Vec<String> = ["phase", "duration s", "switches", "load rps"]
        .into_iter()
        .map(String::from)
        .collect();
    headers.extend(columns.iter().map(|(c, _)| c.header.to_string()));

    let mut rows = Vec::new();
    let mut previous: Option<&PhaseSpan> = None;
    for phase in &recording.phases {
        let switches: Vec<String> = phase
            .switches
            .iter()
            .filter(|(k, v)| previous.is_none_or(|p| p.switches.get(*k) != Some(*v)))
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut row = vec![
            phase.name.clone(),
            // One decimal always: a phase cut short reads 12.4, a whole one 30.0.
            format!("{:.1}", phase.end_s - phase.start_s),
            if switches.is_empty() {
                "—".into()
            } else {
                switches.join(" ")
            },
            number(phase.load_rps),
        ];
        for (column, series) in &columns {
            let points = window(series, phase.start_s, phase.end_s);
            let value = match column.reduce {
                Reduce::Stat(stat) => statistic(&points, stat),
                Reduce::Total => total(&points),
            };
            row.push(value.map_or_else(|| "—".into(), number));
        }
        rows.push(row);
        previous = Some(phase);
    }
    PhaseTable { headers, rows }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::scenario::recording::PhaseSpan;

    fn points(values: &[f64]) -> Vec<(f64, f64)> {
        values
            .iter()
            .enumerate()
            .map(|(i, &v)| (i as f64, v))
            .collect()
    }

    fn phase(name: &str, start_s: f64, end_s: f64) -> PhaseSpan {
        PhaseSpan {
            name: name.into(),
            start_s,
            end_s,
            ..PhaseSpan::default()
        }
    }

    fn verdict(signal: &str, combine: Combine, stat: Stat) -> VerdictSpec {
        VerdictSpec {
            cause: "lb".into(),
            symptom: "one B serves everything".into(),
            signal: signal.into(),
            instances: combine,
            stat,
            buggy: "buggy".into(),
            fixed: Some("fixed".into()),
            above: Some(0.9),
            below: None,
            settle: None,
        }
    }

    /// Two phases of 10 s each; `share` of two Bs: b-1 serves everything in
    /// "buggy", half in "fixed".
    fn share_recording() -> Recording {
        let mut recording = Recording {
            phases: vec![phase("buggy", 0.0, 10.0), phase("fixed", 10.0, 20.0)],
            duration_s: 20.0,
            ..Recording::default()
        };
        for t in 0..20 {
            let t = f64::from(t);
            let b1 = if t < 10.0 { 1.0 } else { 0.5 };
            recording.push("share", "service-b-1", t, Some(b1));
            recording.push("share", "service-b-2", t, Some(1.0 - b1));
        }
        recording
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(
            statistic(&points(&[5.0, 1.0, 3.0]), Stat::Median),
            Some(3.0)
        );
        assert_eq!(
            statistic(&points(&[4.0, 1.0, 3.0, 2.0]), Stat::Median),
            Some(2.5)
        );
    }

    #[test]
    fn p99_is_the_nearest_rank() {
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(statistic(&points(&hundred), Stat::P99), Some(99.0));
        let mut two_hundred: Vec<f64> = (1..=199).map(f64::from).collect();
        two_hundred.push(10_000.0);
        assert_eq!(statistic(&points(&two_hundred), Stat::P99), Some(198.0));
        assert_eq!(statistic(&points(&[7.0]), Stat::P99), Some(7.0));
    }

    #[test]
    fn max_mean_last_and_increase() {
        let series = points(&[2.0, 8.0, 4.0, 6.0]);
        assert_eq!(statistic(&series, Stat::Max), Some(8.0));
        assert_eq!(statistic(&series, Stat::Mean), Some(5.0));
        assert_eq!(statistic(&series, Stat::Last), Some(6.0));
        assert_eq!(statistic(&series, Stat::Increase), Some(4.0));
    }

    #[test]
    fn growth_per_minute_is_the_fitted_slope() {
        // The least-squares line through these rises 1.6 per second; the
        // end points alone would say 1.5.
        let series = points(&[1.0, 2.0, 4.0, 6.0, 7.0]);
        let growth = statistic(&series, Stat::GrowthPerMin).unwrap();
        assert!((growth - 96.0).abs() < 1e-9, "{growth}");
        let flat = points(&[5.0, 5.0, 5.0]);
        assert_eq!(statistic(&flat, Stat::GrowthPerMin), Some(0.0));
    }

    #[test]
    fn changes_need_two_samples_and_nothing_gives_none() {
        assert_eq!(statistic(&points(&[3.0]), Stat::GrowthPerMin), None);
        assert_eq!(statistic(&points(&[3.0]), Stat::Increase), None);
        for stat in [Stat::Median, Stat::P99, Stat::Max, Stat::Mean, Stat::Last] {
            assert_eq!(statistic(&[], stat), None, "{stat:?}");
        }
    }

    #[test]
    fn instances_combine_per_second_skipping_gaps() {
        let mut recording = Recording::default();
        recording.push("job_tasks", "service-b-1", 0.0, Some(3.0));
        recording.push("job_tasks", "service-b-2", 0.0, Some(5.0));
        recording.push("job_tasks", "service-b-1", 1.0, None);
        recording.push("job_tasks", "service-b-2", 1.0, Some(7.0));
        recording.push("job_tasks", "service-b-1", 2.0, None);
        recording.push("job_tasks", "service-b-2", 2.0, None);
        recording.push("other", "service-b-1", 0.0, Some(100.0));
        assert_eq!(
            combined(&recording, "job_tasks", Combine::Sum),
            vec![(0.0, 8.0), (1.0, 7.0)]
        );
        assert_eq!(
            combined(&recording, "job_tasks", Combine::Max),
            vec![(0.0, 5.0), (1.0, 7.0)]
        );
        assert_eq!(
            combined(&recording, "job_tasks", Combine::Min),
            vec![(0.0, 3.0), (1.0, 7.0)]
        );
    }

    #[test]
    fn rates_integrate_into_totals() {
        // 2/s for the first second, then samples 0.5 s apart at 4/s.
        assert_eq!(total(&[(1.0, 2.0), (1.5, 4.0), (2.0, 4.0)]), Some(6.0));
        assert_eq!(total(&[]), None);
    }

    #[test]
    fn above_verdict_holds_when_seen_then_gone() {
        let recording = share_recording();
        let result = evaluate_one(&recording, &verdict("share", Combine::Max, Stat::Median));
        assert_eq!(result.buggy_value, Some(1.0));
        assert_eq!(result.fixed_value, Some(0.5));
        assert!(result.holds, "{}", result.explanation);
        assert_eq!(result.measure, "max of share, median");
        assert_eq!(result.threshold, "> 0.9");
        assert_eq!(
            result.explanation,
            "max of share, median over buggy: 1 (> 0.9: symptom seen); over fixed: 0.50 (gone)"
        );
    }

    #[test]
    fn above_verdict_fails_when_the_symptom_stays() {
        let recording = share_recording();
        let mut spec = verdict("share", Combine::Max, Stat::Median);
        spec.above = Some(0.4);
        let result = evaluate_one(&recording, &spec);
        assert!(!result.holds);
        assert!(
            result.explanation.contains("not gone"),
            "{}",
            result.explanation
        );
    }

    #[test]
    fn above_verdict_fails_when_the_symptom_never_shows() {
        let recording = share_recording();
        let mut spec = verdict("share", Combine::Min, Stat::Median);
        spec.fixed = None;
        let result = evaluate_one(&recording, &spec);
        assert_eq!(result.buggy_value, Some(0.0));
        assert!(!result.holds);
        assert!(result.explanation.contains("symptom not seen"));
    }

    #[test]
    fn below_verdict_compares_the_other_way() {
        let recording = share_recording();
        // The least busy B gets (almost) nothing in "buggy": below 0.1.
        let mut spec = verdict("share", Combine::Min, Stat::Median);
        spec.above = None;
        spec.below = Some(0.1);
        let result = evaluate_one(&recording, &spec);
        assert_eq!(result.threshold, "< 0.1");
        assert!(result.holds, "{}", result.explanation);
        // Flipped: the busiest B is never below 0.1, so nothing is seen.
        spec.instances = Combine::Max;
        assert!(!evaluate_one(&recording, &spec).holds);
    }

    #[test]
    fn settle_leaves_out_the_start_of_each_phase() {
        let mut recording = Recording {
            phases: vec![phase("buggy", 0.0, 10.0), phase("fixed", 10.0, 20.0)],
            ..Recording::default()
        };
        // The change shows 3 s after each phase begins.
        for t in 0..20 {
            let v = match t {
                0..3 => 0.0,
                3..13 => 100.0,
                _ => 0.0,
            };
            recording.push("job_tasks", "service-b-1", f64::from(t), Some(v));
        }
        let mut spec = verdict("job_tasks", Combine::Sum, Stat::Max);
        spec.above = Some(16.0);
        // Without settling, the fixed phase's first seconds still show it.
        assert!(!evaluate_one(&recording, &spec).holds);
        spec.settle = Some(Duration::from_secs(3));
        let result = evaluate_one(&recording, &spec);
        assert!(result.holds, "{}", result.explanation);
        assert_eq!(result.fixed_value, Some(0.0));
        // A settle longer than the phase leaves nothing to measure.
        spec.settle = Some(Duration::from_secs(30));
        let result = evaluate_one(&recording, &spec);
        assert_eq!(result.buggy_value, None);
        assert!(!result.holds);
        assert!(result.explanation.contains("after its first 30 s"));
    }

    #[test]
    fn a_phase_that_did_not_run_fails_its_verdict() {
        let mut recording = share_recording();
        recording.interrupted = true;
        recording.phases.truncate(1);
        let result = evaluate_one(&recording, &verdict("share", Combine::Max, Stat::Median));
        assert_eq!(result.buggy_value, Some(1.0));
        assert_eq!(result.fixed_value, None);
        assert!(!result.holds);
        assert!(
            result
                .explanation
                .contains("over fixed: no value, the phase did not run (the run was interrupted"),
            "{}",
            result.explanation
        );
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(1.0), "1");
        assert_eq!(number(0.514), "0.51");
        assert_eq!(number(12.34), "12.3");
        assert_eq!(number(1234.5), "1234");
        assert_eq!(number(-0.001), "0.00");
        assert_eq!(number(f64::NAN), "—");
    }

    #[test]
    fn phase_table_has_a_row_per_phase_and_only_recorded_columns() {
        let mut recording = share_recording();
        recording.phases[0].switches.extend([
            ("lb".into(), "l4".into()),
            ("worker".into(), "unbounded".into()),
        ]);
        recording.phases[1].switches.extend([
            ("lb".into(), "etcd".into()),
            ("worker".into(), "unbounded".into()),
        ]);
        for t in 0..20 {
            recording.push("errors", "load", f64::from(t), Some(2.0));
        }
        let table = phase_table(&recording);
        assert_eq!(
            table.headers,
            [
                "phase",
                "duration s",
                "switches",
                "load rps",
                "errors (total)",
                "busiest B share (median)"
            ]
        );
        assert_eq!(
            table.rows[0],
            ["buggy", "10.0", "lb=l4 worker=unbounded", "0", "20", "1"]
        );
        assert_eq!(
            table.rows[1],
            ["fixed", "10.0", "lb=etcd", "0", "20", "0.50"]
        );
    }
}
