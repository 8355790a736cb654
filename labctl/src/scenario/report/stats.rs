//! Numbers drawn from a recording: a statistic of each instance of a signal
//! over a phase, those combined into one number, the verdicts and the
//! per-phase summary table. Pure functions of the recording, so the report
//! can be redrawn from `samples.json` alone.
//!
//! Each instance is reduced on its own first and the per-instance numbers
//! are combined after: combining per second first would let one instance's
//! missing sample, restart or flat line move (or hide) another's number.

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

/// How one instance's values over a window become one number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reduce {
    Stat(Stat),
    /// A per-second rate integrated into a count (see [`total`]).
    Total,
}

impl Reduce {
    fn apply(self, points: &[(f64, f64)]) -> Option<f64> {
        match self {
            Reduce::Stat(stat) => statistic(points, stat),
            Reduce::Total => total(points),
        }
    }

    fn name(self) -> &'static str {
        match self {
            Reduce::Stat(stat) => stat.name(),
            Reduce::Total => "total",
        }
    }
}

/// A signal measured over a window.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    /// The per-instance numbers combined; `None` when no instance had
    /// enough samples.
    pub value: Option<f64>,
    /// Distinct sample times in the window, over every instance of the
    /// signal (values and gaps alike).
    pub sample_times: usize,
    /// Instances left out of `value`, each with why, e.g.
    /// "service-b-2 left out: values in 3 of 10 s".
    pub left_out: Vec<String>,
}

/// `signal` over `start_s <= t < end_s`: each instance reduced on its own,
/// then the instances' numbers combined. An instance with values at fewer
/// than half of the window's sample times is left out (a process that was
/// down most of the window says little about it) and named in `left_out`.
pub fn measure(
    recording: &Recording,
    signal: &str,
    combine: Combine,
    reduce: Reduce,
    start_s: f64,
    end_s: f64,
) -> Measurement {
    let in_window = |t: f64| t >= start_s && t < end_s;
    let mut times: Vec<f64> = recording
        .series_of(signal)
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .filter(|&t| in_window(t))
        .collect();
    times.sort_by(f64::total_cmp);
    times.dedup_by(|later, earlier| (*later - *earlier).abs() <= SAME_T);
    let sample_times = times.len();

    let mut left_out = Vec::new();
    // Instances with no value at all in the window (not started yet,
    // stopped, killed, or never answering): one short note for all.
    let mut without_values = Vec::new();
    let mut numbers = Vec::new();
    for series in recording.series_of(signal) {
        let points: Vec<(f64, f64)> = series
            .points
            .iter()
            .filter(|p| in_window(p.0))
            .filter_map(|&(t, v)| v.filter(|v| v.is_finite()).map(|v| (t, v)))
            .collect();
        if points.is_empty() && sample_times == 0 {
            continue;
        }
        if points.is_empty() {
            without_values.push(series.instance.clone());
            continue;
        }
        if 2 * points.len() < sample_times {
            left_out.push(format!(
                "{} left out: values in {} of {sample_times} s",
                series.instance,
                points.len()
            ));
            continue;
        }
        match reduce.apply(&points) {
            Some(number) => numbers.push(number),
            None => left_out.push(format!(
                "{} left out: {} needs at least 2 samples",
                series.instance,
                reduce.name()
            )),
        }
    }
    if !without_values.is_empty() {
        left_out.push(format!("no values from {}", without_values.join(", ")));
    }
    let value = numbers.into_iter().reduce(|a, b| match combine {
        Combine::Max => a.max(b),
        Combine::Sum => a + b,
        Combine::Min => a.min(b),
    });
    Measurement {
        value,
        sample_times,
        left_out,
    }
}

/// A statistic of `(t, value)` points in time order. `None` when there are
/// no points, or fewer than two for `increase` and `growth-per-min` (one
/// sample says nothing about a change).
pub fn statistic(points: &[(f64, f64)], stat: Stat) -> Option<f64> {
    let last = points.last()?;
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
        Stat::Increase if n >= 2 => Some(counter_increase(points)),
        Stat::GrowthPerMin if n >= 2 => line(points).map(|(_, per_s)| per_s * 60.0),
        Stat::Growth if n >= 2 => {
            let (_, per_s) = line(points)?;
            Some(per_s * (last.0 - points[0].0))
        }
        Stat::GrowthPercent if n >= 2 => {
            let (first_t, last_t) = (points[0].0, last.0);
            let (at_first, per_s) = line(points)?;
            (at_first > 0.0).then(|| per_s * (last_t - first_t) / at_first * 100.0)
        }
        Stat::Increase | Stat::GrowthPerMin | Stat::Growth | Stat::GrowthPercent => None,
    }
}

/// How much a counter rose: the sum of its rises from sample to sample. A
/// drop is a restarted process counting again from 0, so the value after
/// the drop is all it rose since.
fn counter_increase(points: &[(f64, f64)]) -> f64 {
    points
        .windows(2)
        .map(|pair| {
            let (before, after) = (pair[0].1, pair[1].1);
            if after >= before {
                after - before
            } else {
                after
            }
        })
        .sum()
}

/// The least-squares line of value over time: its value at the first
/// point's time and its slope per second; `None` when every point has the
/// same time.
fn line(points: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = points.len() as f64;
    let mean_t = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_v = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut covariance, mut variance) = (0.0, 0.0);
    for &(t, v) in points {
        covariance += (t - mean_t) * (v - mean_v);
        variance += (t - mean_t) * (t - mean_t);
    }
    if variance <= 0.0 {
        return None;
    }
    let slope = covariance / variance;
    let first_t = points.first()?.0;
    Some((mean_v + slope * (first_t - mean_t), slope))
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
    /// Instances left out of the value, each with why.
    left_out: Vec<String>,
}

impl PhaseReading {
    /// `"2 (> 0.9: symptom seen)"` and the like, or why there is no value;
    /// instances left out are named inside the parentheses.
    fn describe(&self, verdict: impl FnOnce(f64) -> String) -> String {
        match self.value {
            Some(v) => {
                let mut notes = vec![verdict(v)];
                notes.extend(self.left_out.iter().cloned());
                format!("{} ({})", number(v), notes.join("; "))
            }
            None => format!(
                "no value, {}",
                self.missing.as_deref().unwrap_or("no samples")
            ),
        }
    }
}

fn read_phase(recording: &Recording, spec: &VerdictSpec, phase_name: &str) -> PhaseReading {
    let Some(phase) = ran(recording.phase(phase_name)) else {
        let why = if recording.interrupted {
            "the phase did not run (the run was interrupted before it)"
        } else {
            "the phase did not run"
        };
        return PhaseReading {
            value: None,
            missing: Some(why.into()),
            left_out: Vec::new(),
        };
    };
    let settle = spec.settle.map_or(0.0, |d| d.as_secs_f64());
    let measured = measure(
        recording,
        &spec.signal,
        spec.instances,
        Reduce::Stat(spec.stat),
        phase.start_s + settle,
        phase.end_s,
    );
    let missing = measured.value.is_none().then(|| {
        if measured.sample_times == 0 {
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
            format!("too few samples: {}", measured.left_out.join("; "))
        }
    });
    PhaseReading {
        value: measured.value,
        missing,
        left_out: measured.left_out,
    }
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
        Stat::GrowthPercent => "%".to_string(),
        _ => base_unit.to_string(),
    };

    let mut parts = Vec::new();
    let buggy = spec
        .buggy
        .as_ref()
        .map(|name| (name, read_phase(recording, spec, name)));
    let seen = match &buggy {
        None => true,
        Some((name, reading)) => {
            parts.push(format!(
                "over {name}: {}",
                reading.describe(|v| {
                    if shows(v) {
                        format!("{threshold_text}: symptom seen")
                    } else {
                        format!("not {threshold_text}: symptom not seen")
                    }
                })
            ));
            reading.value.is_some_and(shows)
        }
    };
    let fixed = spec
        .fixed
        .as_ref()
        .map(|name| (name, read_phase(recording, spec, name)));
    let gone = match &fixed {
        None => true,
        Some((name, reading)) => {
            // With no buggy phase the symptom was never there to go.
            let (present, absent) = match buggy {
                Some(_) => (format!("still {threshold_text}: not gone"), "gone"),
                None => (format!("{threshold_text}: symptom present"), "absent"),
            };
            parts.push(format!(
                "over {name}: {}",
                reading.describe(|v| if shows(v) { present } else { absent.into() })
            ));
            reading.value.is_some_and(|v| !shows(v))
        }
    };
    let explanation = format!("{measure} {}", parts.join("; "));

    VerdictResult {
        cause: spec.cause.clone(),
        symptom: spec.symptom.clone(),
        signal: spec.signal.clone(),
        measure,
        threshold: threshold_text,
        unit,
        buggy_phase: spec.buggy.clone(),
        buggy_value: buggy.and_then(|(_, reading)| reading.value),
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

/// A summary column: a signal, each instance reduced over the phase, the
/// instances' numbers combined (the verdicts' rule, see [`measure`]). The
/// header says both steps where the signal has more than one instance.
struct Column {
    header: &'static str,
    signal: &'static str,
    combine: Combine,
    reduce: Reduce,
}

/// The per-phase summary's columns after the phase's own ones; a column
/// whose signal the recording lacks is left out.
const COLUMNS: &[Column] = &[
    // The load generator's signals have one instance, `load`.
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
        header: "job tasks (sum of each B's peak)",
        signal: signals::JOB_TASKS.key,
        combine: Combine::Sum,
        reduce: Reduce::Stat(Stat::Max),
    },
    Column {
        header: "fds growth/min (fastest process)",
        signal: signals::OPEN_FDS.key,
        combine: Combine::Max,
        reduce: Reduce::Stat(Stat::GrowthPerMin),
    },
    Column {
        header: "RSS MiB growth/min (fastest process)",
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
        header: "work after deadline (increase, all Bs)",
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
    /// Instances a cell left out, e.g. "fixed, busiest B share (median):
    /// service-b-2 left out: values in 3 of 10 s".
    pub notes: Vec<String>,
}

/// One row per phase that ran: its length, its switches (all of them for
/// the first phase, then only what changed), its load, and the summary
/// columns whose signal was recorded.
pub fn phase_table(recording: &Recording) -> PhaseTable {
    let columns: Vec<&Column> = COLUMNS
        .iter()
        .filter(|c| recording.series_of(c.signal).next().is_some())
        .collect();
    let mut headers: Vec<String> = ["phase", "duration s", "switches", "load rps"]
        .into_iter()
        .map(String::from)
        .collect();
    headers.extend(columns.iter().map(|c| c.header.to_string()));

    let mut rows = Vec::new();
    let mut notes = Vec::new();
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
        for column in &columns {
            let measured = measure(
                recording,
                column.signal,
                column.combine,
                column.reduce,
                phase.start_s,
                phase.end_s,
            );
            for why in &measured.left_out {
                notes.push(format!("{}, {}: {why}", phase.name, column.header));
            }
            row.push(measured.value.map_or_else(|| "—".into(), number));
        }
        rows.push(row);
        previous = Some(phase);
    }
    PhaseTable {
        headers,
        rows,
        notes,
    }
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
            buggy: Some("buggy".into()),
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
        let counter = points(&[2.0, 8.0, 8.0, 9.0]);
        assert_eq!(statistic(&counter, Stat::Increase), Some(7.0));
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
    fn growth_percent_is_the_fitted_rise_over_the_fitted_start() {
        // The fitted line starts at 0.8 and rises 1.6 a second: 6.4 over
        // the 4 s, 800 % of where it starts.
        let series = points(&[1.0, 2.0, 4.0, 6.0, 7.0]);
        let growth = statistic(&series, Stat::GrowthPercent).unwrap();
        assert!((growth - 800.0).abs() < 1e-9, "{growth}");
        // 100 → 102 in a straight line: 2 %, whatever the noise around it.
        let soak: Vec<f64> = (0..=100)
            .map(|i| 100.0 + 0.02 * f64::from(i) + if i % 2 == 0 { 0.5 } else { -0.5 })
            .collect();
        let growth = statistic(&points(&soak), Stat::GrowthPercent).unwrap();
        assert!((growth - 2.0).abs() < 0.05, "{growth}");
        assert_eq!(
            statistic(&points(&[5.0; 4]), Stat::GrowthPercent),
            Some(0.0)
        );
        // A line that starts at or below 0 has no percentage.
        assert_eq!(
            statistic(&points(&[0.0, 0.0, 1.0]), Stat::GrowthPercent),
            None
        );
        assert_eq!(statistic(&points(&[3.0]), Stat::GrowthPercent), None);
        // The same line's rise in the signal's unit: 1.6 a second for 4 s.
        let growth = statistic(&series, Stat::Growth).unwrap();
        assert!((growth - 6.4).abs() < 1e-9, "{growth}");
        assert_eq!(statistic(&points(&[3.0]), Stat::Growth), None);
    }

    #[test]
    fn a_verdict_with_only_a_fixed_phase_holds_while_the_symptom_is_absent() {
        let recording = share_recording();
        let mut spec = verdict("share", Combine::Max, Stat::Median);
        spec.buggy = None;
        let result = evaluate_one(&recording, &spec);
        assert!(result.holds, "{}", result.explanation);
        assert_eq!(result.buggy_phase, None);
        assert_eq!(result.buggy_value, None);
        assert_eq!(
            result.explanation,
            "max of share, median over fixed: 0.50 (absent)"
        );
        // The same verdict over the phase where b-1 served everything.
        spec.fixed = Some("buggy".into());
        let result = evaluate_one(&recording, &spec);
        assert!(!result.holds, "{}", result.explanation);
        assert_eq!(
            result.explanation,
            "max of share, median over buggy: 1 (> 0.9: symptom present)"
        );
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
    fn increase_counts_a_restart_from_zero() {
        // 5 → 8 (+3), restart, 2 (+2), 4 (+2).
        let series = points(&[5.0, 8.0, 2.0, 4.0]);
        assert_eq!(statistic(&series, Stat::Increase), Some(7.0));
    }

    /// The built-in soak's verdicts over a recording of its phases: a flat
    /// fixed stack holds all eight, and each one fails on its own symptom.
    #[test]
    fn the_soak_verdicts_hold_on_a_flat_stack_and_each_fails_on_its_symptom() {
        let soak = crate::scenario::spec::find("soak").expect("the built-in soak");
        let recording = |leak: Option<&str>| {
            let mut r = Recording {
                phases: vec![phase("warm-up", 0.0, 60.0), phase("soak", 60.0, 660.0)],
                duration_s: 660.0,
                ..Recording::default()
            };
            for t in 0..660 {
                let t = f64::from(t);
                let minutes = (t - 60.0).max(0.0) / 60.0;
                // The flat value, or what a leak makes of it.
                let value = |signal: &str, flat: f64, leaking: f64| {
                    if leak == Some(signal) { leaking } else { flat }
                };
                r.push("errors", "load", t, Some(value("errors", 0.0, 1.0)));
                for b in ["service-b-1", "service-b-2"] {
                    r.push(
                        "rss_mib",
                        b,
                        t,
                        Some(value("rss_mib", 25.0, 25.0 + minutes)),
                    );
                    r.push(
                        "open_fds",
                        b,
                        t,
                        Some(value("open_fds", 30.0, 30.0 + 2.0 * minutes)),
                    );
                    r.push(
                        "tasks_alive",
                        b,
                        t,
                        Some(value("tasks_alive", 28.0, 28.0 + 3.0 * minutes)),
                    );
                    r.push(
                        "pool_in_use",
                        b,
                        t,
                        Some(value("pool_in_use", 1.0, 1.0 + minutes)),
                    );
                    r.push("pool_leaked", b, t, Some(value("pool_leaked", 0.0, 1.0)));
                    r.push("jobs_done", b, t, Some(value("jobs_done", 6.0, 5.0)));
                    r.push(
                        "jobs_duplicate",
                        b,
                        t,
                        Some(value("jobs_duplicate", 0.0, t)),
                    );
                }
            }
            r
        };
        let holding = |r: &Recording| -> Vec<(String, bool)> {
            evaluate_all(r, &soak)
                .into_iter()
                .map(|v| (v.signal, v.holds))
                .collect()
        };
        let flat = holding(&recording(None));
        assert_eq!(flat.len(), 8);
        assert!(flat.iter().all(|(_, holds)| *holds), "{flat:?}");
        for verdict in &soak.verdicts {
            let leaking = holding(&recording(Some(&verdict.signal)));
            for (signal, holds) in leaking {
                assert_eq!(
                    holds,
                    signal != verdict.signal,
                    "{signal} with {} leaking",
                    verdict.signal
                );
            }
        }
    }

    /// Ten seconds of one phase, for the per-instance tests.
    fn ten_seconds() -> Recording {
        Recording {
            phases: vec![phase("buggy", 0.0, 10.0), phase("fixed", 10.0, 20.0)],
            duration_s: 20.0,
            ..Recording::default()
        }
    }

    #[test]
    fn instances_reduce_on_their_own_then_combine() {
        let mut recording = ten_seconds();
        for t in 0..10 {
            let t = f64::from(t);
            recording.push("job_tasks", "service-b-1", t, Some(t));
            recording.push("job_tasks", "service-b-2", t, Some(20.0 - t));
        }
        let max = Reduce::Stat(Stat::Max);
        let of = |combine| measure(&recording, "job_tasks", combine, max, 0.0, 10.0);
        // Each B's peak: 9 and 20. Per second, the sum would peak at 20.
        assert_eq!(of(Combine::Sum).value, Some(29.0));
        assert_eq!(of(Combine::Max).value, Some(20.0));
        assert_eq!(of(Combine::Min).value, Some(9.0));
        assert_eq!(of(Combine::Sum).sample_times, 10);
        assert!(of(Combine::Sum).left_out.is_empty());
    }

    #[test]
    fn a_missing_last_sample_does_not_turn_a_sum_of_increases_negative() {
        // Two Bs each count 5 a second; B-2's last sample fails.
        let mut recording = ten_seconds();
        for t in 0..10 {
            let t = f64::from(t);
            recording.push("work_after_deadline", "service-b-1", t, Some(5.0 * t));
            let b2 = (t < 9.0).then_some(100.0 + 5.0 * t);
            recording.push("work_after_deadline", "service-b-2", t, b2);
        }
        let mut spec = verdict("work_after_deadline", Combine::Sum, Stat::Increase);
        spec.above = Some(10.0);
        spec.fixed = None;
        let result = evaluate_one(&recording, &spec);
        // 45 by B-1 over 9 s, 40 by B-2 over the 8 s it answered.
        assert_eq!(result.buggy_value, Some(85.0));
        assert!(result.holds, "{}", result.explanation);
    }

    #[test]
    fn a_restarted_instance_keeps_counting_in_an_increase() {
        let mut recording = ten_seconds();
        let values = [50.0, 52.0, 54.0, 1.0, 3.0, 5.0];
        for (t, v) in values.into_iter().enumerate() {
            recording.push("jobs_duplicate", "service-b-1", t as f64, Some(v));
        }
        let measured = measure(
            &recording,
            "jobs_duplicate",
            Combine::Sum,
            Reduce::Stat(Stat::Increase),
            0.0,
            10.0,
        );
        // 2 + 2, then 1 after the restart, 2 + 2: last minus first says -45.
        assert_eq!(measured.value, Some(9.0));
    }

    #[test]
    fn growth_is_the_fastest_instance_not_the_slope_of_the_largest() {
        // B-1 holds 500 fds, flat; B-2 leaks 30 a minute from 10.
        let mut recording = ten_seconds();
        for t in 0..10 {
            let t = f64::from(t);
            recording.push("open_fds", "service-b-1", t, Some(500.0));
            recording.push("open_fds", "service-b-2", t, Some(10.0 + 0.5 * t));
        }
        let mut spec = verdict("open_fds", Combine::Max, Stat::GrowthPerMin);
        spec.above = Some(20.0);
        spec.fixed = None;
        let result = evaluate_one(&recording, &spec);
        let growth = result.buggy_value.unwrap();
        assert!((growth - 30.0).abs() < 1e-9, "{growth}");
        assert!(result.holds, "{}", result.explanation);
        let table = phase_table(&recording);
        let column = table
            .headers
            .iter()
            .position(|h| h == "fds growth/min (fastest process)")
            .unwrap();
        assert_eq!(table.rows[0][column], "30");
    }

    #[test]
    fn an_instance_with_values_in_under_half_the_window_is_left_out_and_named() {
        // B-2 answers 3 of 10 s, with a huge share; B-1 answers every second.
        let mut recording = ten_seconds();
        for t in 0..10 {
            let t = f64::from(t);
            recording.push("share", "service-b-1", t, Some(0.5));
            recording.push("share", "service-b-2", t, (t < 3.0).then_some(1.0));
        }
        let result = evaluate_one(&recording, &verdict("share", Combine::Max, Stat::Median));
        assert_eq!(result.buggy_value, Some(0.5));
        assert!(!result.holds);
        assert!(
            result.explanation.contains(
                "over buggy: 0.50 (not > 0.9: symptom not seen; \
                 service-b-2 left out: values in 3 of 10 s)"
            ),
            "{}",
            result.explanation
        );
        let table = phase_table(&recording);
        assert_eq!(
            table.notes,
            ["buggy, busiest B share (median): service-b-2 left out: values in 3 of 10 s"]
        );
        // Half the window is enough.
        recording.push("share", "service-b-2", 3.0, Some(1.0));
        recording.push("share", "service-b-2", 4.0, Some(1.0));
        let result = evaluate_one(&recording, &verdict("share", Combine::Max, Stat::Median));
        assert_eq!(result.buggy_value, Some(1.0));
    }

    #[test]
    fn no_instance_with_enough_samples_fails_with_too_few_samples() {
        let mut recording = ten_seconds();
        for t in 0..10 {
            let t = f64::from(t);
            recording.push("share", "service-b-1", t, (t < 4.0).then_some(1.0));
            recording.push("share", "service-b-2", t, (t >= 6.0).then_some(1.0));
        }
        let mut spec = verdict("share", Combine::Max, Stat::Median);
        spec.fixed = None;
        let result = evaluate_one(&recording, &spec);
        assert_eq!(result.buggy_value, None);
        assert!(!result.holds);
        assert!(
            result.explanation.ends_with(
                "no value, too few samples: service-b-1 left out: values in 4 of 10 s; \
                 service-b-2 left out: values in 4 of 10 s"
            ),
            "{}",
            result.explanation
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
