//! The scenario file: a small TOML document per scenario under
//! `deploy/scenarios/` (see `deploy/scenarios/README.md` for every field).
//! Scenarios are data: the runner plays any file of this shape, so a user
//! writes their own by copying one.
//!
//! Reading is strict: an unknown field, a wrong type, a switch value that
//! does not exist, a verdict naming a phase or signal that does not exist —
//! each is an error naming the file, the line and the field.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use serde::Deserialize;

use super::signals;
use crate::faults::Assignment;

/// The scenarios that ship with labctl (compiled in, so `labctl scenario
/// run incident` works from any directory).
pub const BUILT_IN: &[(&str, &str)] = &[
    (
        "incident",
        include_str!("../../../deploy/scenarios/incident.toml"),
    ),
    ("lb", include_str!("../../../deploy/scenarios/lb.toml")),
    (
        "worker",
        include_str!("../../../deploy/scenarios/worker.toml"),
    ),
    (
        "deadline",
        include_str!("../../../deploy/scenarios/deadline.toml"),
    ),
    (
        "leaks",
        include_str!("../../../deploy/scenarios/leaks.toml"),
    ),
    (
        "remedies",
        include_str!("../../../deploy/scenarios/remedies.toml"),
    ),
    ("soak", include_str!("../../../deploy/scenarios/soak.toml")),
];

/// A scenario as written.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// One line: what this scenario shows.
    pub description: String,
    /// B instances to start.
    #[serde(default = "default_backends")]
    pub backends: usize,
    /// Config overrides for the stack this scenario starts, as `labctl up
    /// --set` takes them (`mode=buggy`, `worker.tick=200ms`, …). Ignored
    /// with `--attach` (the running stack keeps its config).
    #[serde(default)]
    pub set: Vec<String>,
    /// The load of every phase, unless a phase changes it.
    pub load: Load,
    /// Jobs inserted into MySQL during every phase, unless a phase changes it.
    #[serde(default)]
    pub inflow: Inflow,
    /// Played in order.
    #[serde(rename = "phase")]
    pub phases: Vec<Phase>,
    /// What must be seen for the scenario to pass.
    #[serde(default, rename = "verdict")]
    pub verdicts: Vec<VerdictSpec>,
    /// Where it was read from (set by the loader).
    #[serde(skip)]
    pub name: String,
    #[serde(skip)]
    pub file: String,
}

fn default_backends() -> usize {
    2
}

/// Open-loop HTTP load at A.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Load {
    /// Requests started per second, whether or not earlier ones answered.
    pub rps: f64,
    /// Path at A; `{rand}` becomes a random item id.
    #[serde(default = "default_path")]
    pub path: String,
    /// Requests in flight at most (the generator's connections); a request
    /// due while this many are in flight is dropped and counted as an error.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// A request not answered within this counts as a `timeout` error.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
}

fn default_path() -> String {
    "/api/items/{rand}".into()
}

fn default_concurrency() -> usize {
    64
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}

/// Jobs inserted into the `jobs` table (as `labctl jobs` does).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Inflow {
    /// Jobs per second; 0 = none.
    #[serde(default)]
    pub rate: f64,
    /// Size of each good payload (the handler's CPU work scales with it).
    #[serde(default = "default_payload_bytes")]
    pub payload_bytes: usize,
    /// Fraction of rows whose payload cannot be decoded (0–1).
    #[serde(default)]
    pub poison_ratio: f64,
}

impl Default for Inflow {
    fn default() -> Self {
        Self {
            rate: 0.0,
            payload_bytes: default_payload_bytes(),
            poison_ratio: 0.0,
        }
    }
}

fn default_payload_bytes() -> usize {
    16384
}

/// A phase: what changes when it begins, and how long it lasts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Phase {
    pub name: String,
    /// Shown in the report.
    #[serde(default)]
    pub description: String,
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Switches flipped live when the phase begins, e.g. `{ worker = "bounded" }`.
    #[serde(default)]
    pub switches: BTreeMap<String, String>,
    /// Replaces the scenario's `load.rps` for this phase.
    #[serde(default)]
    pub rps: Option<f64>,
    /// Replaces the scenario's `inflow.rate` for this phase.
    #[serde(default)]
    pub inflow_rate: Option<f64>,
    /// Done at moments within the phase.
    #[serde(default, rename = "action")]
    pub actions: Vec<ActionSpec>,
}

/// An action as written: `{ at = "20s", do = "kill", target = "service-b-2" }`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActionSpec {
    /// Offset from the start of the phase.
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    #[serde(rename = "do")]
    pub what: ActionKind,
    /// The process, for `kill`, `stop` and `start`.
    #[serde(default)]
    pub target: Option<String>,
    /// How many Bs, for `scale`.
    #[serde(default)]
    pub n: Option<usize>,
    /// Config overrides, for `restart-backends`.
    #[serde(default)]
    pub set: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ActionKind {
    /// SIGKILL a process (a crash): `target`.
    Kill,
    /// Stop a process gracefully (SIGTERM, wait): `target`.
    Stop,
    /// Start a stopped etcd again (only etcd can be started).
    Start,
    /// Run `n` Bs.
    Scale,
    /// Restart every B, one at a time, with extra config `set` (for knobs
    /// that are not live switches, e.g. `service_b.max_connection_age`).
    RestartBackends,
}

/// What an action does, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Kill(String),
    Stop(String),
    StartEtcd,
    Scale(usize),
    RestartBackends(Vec<String>),
}

impl Action {
    /// The event label, e.g. `kill service-b-2`.
    pub fn label(&self) -> String {
        match self {
            Action::Kill(target) => format!("kill {target}"),
            Action::Stop(target) => format!("stop {target}"),
            Action::StartEtcd => "start etcd".into(),
            Action::Scale(n) => format!("scale to {n} B"),
            Action::RestartBackends(set) => format!("restart Bs with {}", set.join(" ")),
        }
    }
}

/// A verdict: a number that shows a cause's symptom in one phase and its
/// absence in another.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictSpec {
    /// Which cause this verdict is about (`lb`, `worker`, …): a heading.
    pub cause: String,
    /// What the symptom is, in words, e.g. "one B serves nearly everything".
    pub symptom: String,
    /// A key of the signal catalogue.
    pub signal: String,
    /// How the per-instance statistics combine into one number.
    #[serde(default)]
    pub instances: Combine,
    /// Which statistic of each instance over the phase window is computed
    /// (then combined by `instances`).
    pub stat: Stat,
    /// The phase where the symptom must show (optional: a soak only checks
    /// that a symptom never shows).
    #[serde(default)]
    pub buggy: Option<String>,
    /// The phase where it must be absent (optional: some verdicts only
    /// check that a symptom shows). At least one of the two is named.
    #[serde(default)]
    pub fixed: Option<String>,
    /// The symptom is the statistic above this…
    #[serde(default)]
    pub above: Option<f64>,
    /// …or below this (exactly one of the two).
    #[serde(default)]
    pub below: Option<f64>,
    /// Leave out the first seconds of each phase (the change takes a moment
    /// to show). Divided by `--speed` like every duration.
    #[serde(default, with = "humantime_serde")]
    pub settle: Option<Duration>,
}

/// How the numbers of a signal's instances make one number: each
/// instance's statistic over the phase window is computed first, then
/// combined (an instance with values in fewer than half the window's sample
/// times is left out and named).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Combine {
    /// The largest (e.g. the busiest B's median share).
    #[default]
    Max,
    /// The total over instances (e.g. the jobs every B ran twice).
    Sum,
    /// The smallest.
    Min,
}

/// A statistic of a series over a phase.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stat {
    Median,
    P99,
    Max,
    Mean,
    /// The last value.
    Last,
    /// How much a counter rose over the phase (a drop counts as a restart
    /// from 0).
    Increase,
    /// Least-squares slope, per minute (for a leak: how fast it grows).
    GrowthPerMin,
    /// How much the least-squares line rises over the window, in the
    /// signal's unit (for a soak: "fds grew by 2"). Unlike a rate, a few
    /// connections opened and closed in a short window do not make it large.
    Growth,
    /// How much the least-squares line rises over the window, in percent of
    /// where it starts (for a soak: "RSS grew 2 % in 10 minutes").
    GrowthPercent,
}

impl Stat {
    pub fn name(self) -> &'static str {
        match self {
            Stat::Median => "median",
            Stat::P99 => "p99",
            Stat::Max => "max",
            Stat::Mean => "mean",
            Stat::Last => "last",
            Stat::Increase => "increase",
            Stat::GrowthPerMin => "growth per min",
            Stat::Growth => "growth",
            Stat::GrowthPercent => "growth %",
        }
    }
}

impl Combine {
    pub fn name(self) -> &'static str {
        match self {
            Combine::Max => "max",
            Combine::Sum => "sum",
            Combine::Min => "min",
        }
    }
}

impl VerdictSpec {
    /// `(threshold, true)` when the symptom is "above", `(threshold, false)`
    /// when "below". Checked at load time to be exactly one.
    pub fn threshold(&self) -> (f64, bool) {
        match (self.above, self.below) {
            (Some(above), _) => (above, true),
            (None, Some(below)) => (below, false),
            (None, None) => (f64::NAN, true),
        }
    }
}

/// A scenario file that cannot be played, and where the problem is.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{file}: cannot read it: {source}")]
    Read {
        file: String,
        source: std::io::Error,
    },
    /// Line and column are 1-based.
    #[error("{file}:{line}:{column}: {field}: {message}")]
    Invalid {
        file: String,
        line: usize,
        column: usize,
        field: String,
        message: String,
    },
    #[error("unknown scenario {name:?}; known: {known} (or give a path to a .toml file)")]
    Unknown { name: String, known: String },
}

/// The names of the built-in scenarios, for `list` and errors.
pub fn known_names() -> String {
    BUILT_IN
        .iter()
        .map(|(name, _)| *name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A built-in scenario by name, or a scenario file by path (anything with
/// a `/` or ending in `.toml`).
pub fn find(name_or_path: &str) -> Result<Scenario, SpecError> {
    if name_or_path.contains('/') || name_or_path.ends_with(".toml") {
        let path = PathBuf::from(name_or_path);
        let text = std::fs::read_to_string(&path).map_err(|source| SpecError::Read {
            file: name_or_path.to_string(),
            source,
        })?;
        let name = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or(name_or_path)
            .to_string();
        return parse(&name, name_or_path, &text);
    }
    match BUILT_IN.iter().find(|(name, _)| *name == name_or_path) {
        Some((name, text)) => parse(name, &built_in_path(name), text),
        None => Err(SpecError::Unknown {
            name: name_or_path.to_string(),
            known: known_names(),
        }),
    }
}

/// Where a built-in scenario lives in the repository.
pub fn built_in_path(name: &str) -> String {
    format!("deploy/scenarios/{name}.toml")
}

/// Parses and checks one scenario file's text.
pub fn parse(name: &str, file: &str, text: &str) -> Result<Scenario, SpecError> {
    let invalid = |span: Option<std::ops::Range<usize>>, field: String, message: String| {
        let (line, column) = line_column(text, span.map_or(0, |s| s.start));
        SpecError::Invalid {
            file: file.to_string(),
            line,
            column,
            field,
            message,
        }
    };
    let document = toml::de::Deserializer::parse(text)
        .map_err(|e| invalid(e.span(), "(syntax)".into(), e.message().to_string()))?;
    let mut scenario: Scenario = serde_path_to_error::deserialize(document).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let span = inner.span().or_else(|| span_of_path(text, &field));
        invalid(span, field, inner.message().to_string())
    })?;
    scenario.name = name.to_string();
    scenario.file = file.to_string();
    check(&scenario).map_err(|(field, message)| {
        let span = span_of_path(text, &field);
        invalid(span, field, message)
    })?;
    Ok(scenario)
}

/// 1-based line and column of a byte offset.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

/// Finds where a checked field (e.g. `phase[2].switches.worker`, `verdict[0].signal`)
/// is written, for errors found after parsing: the n-th `[[phase]]` /
/// `[[verdict]]` header, then the last key of the path below it.
fn span_of_path(text: &str, path: &str) -> Option<std::ops::Range<usize>> {
    let mut offset = 0;
    let mut rest = path;
    if let Some((table, after)) = path.split_once('[')
        && let Some((index, tail)) = after.split_once(']')
        && let Ok(index) = index.parse::<usize>()
    {
        let header = format!("[[{table}]]");
        let mut found = None;
        let mut from = 0;
        for _ in 0..=index {
            let at = text[from..].find(&header)? + from;
            found = Some(at);
            from = at + header.len();
        }
        offset = found?;
        rest = tail.trim_start_matches('.');
    }
    let key = rest.rsplit('.').next().unwrap_or(rest);
    if key.is_empty() {
        return Some(offset..offset);
    }
    let at = text[offset..]
        .match_indices(key)
        .find(|(i, _)| {
            let abs = offset + i;
            let before_ok = abs == 0
                || !text.as_bytes()[abs - 1].is_ascii_alphanumeric()
                    && text.as_bytes()[abs - 1] != b'_';
            let after = text[abs + key.len()..].trim_start();
            // Not inside a string on its line, e.g. a description that
            // says "lb = etcd".
            let line_start = text[..abs].rfind('\n').map_or(0, |nl| nl + 1);
            let outside_strings = text[line_start..abs].matches('"').count().is_multiple_of(2);
            before_ok && outside_strings && after.starts_with('=')
        })
        .map(|(i, _)| offset + i)
        .unwrap_or(offset);
    Some(at..at + key.len())
}

/// The checks serde cannot do: names that must exist, values in range.
/// Errors are `(field path, message)`.
fn check(scenario: &Scenario) -> Result<(), (String, String)> {
    if scenario.backends == 0 {
        return Err(("backends".into(), "at least 1 B is needed".into()));
    }
    check_load_rate("load.rps", scenario.load.rps)?;
    if scenario.load.concurrency == 0 {
        return Err(("load.concurrency".into(), "must be at least 1".into()));
    }
    check_inflow_rate("inflow.rate", scenario.inflow.rate)?;
    if !(0.0..=1.0).contains(&scenario.inflow.poison_ratio) {
        return Err((
            "inflow.poison_ratio".into(),
            format!("{} is not between 0 and 1", scenario.inflow.poison_ratio),
        ));
    }
    if scenario.phases.is_empty() {
        return Err((
            "phase".into(),
            "a scenario needs at least one [[phase]]".into(),
        ));
    }
    for (i, phase) in scenario.phases.iter().enumerate() {
        let at = |field: &str| format!("phase[{i}].{field}");
        if phase.name.trim().is_empty() {
            return Err((at("name"), "a phase needs a name".into()));
        }
        if scenario.phases[..i].iter().any(|p| p.name == phase.name) {
            return Err((at("name"), format!("phase {:?} is named twice", phase.name)));
        }
        if phase.duration.is_zero() {
            return Err((at("duration"), "must be longer than 0s".into()));
        }
        for (switch, value) in &phase.switches {
            format!("{switch}={value}")
                .parse::<Assignment>()
                .map_err(|e| (at(&format!("switches.{switch}")), e.to_string()))?;
        }
        if let Some(rps) = phase.rps {
            check_load_rate(&at("rps"), rps)?;
        }
        if let Some(rate) = phase.inflow_rate {
            check_inflow_rate(&at("inflow_rate"), rate)?;
        }
        for (j, action) in phase.actions.iter().enumerate() {
            let field = format!("phase[{i}].action[{j}]");
            if action.at >= phase.duration {
                return Err((
                    format!("{field}.at"),
                    format!(
                        "{} is not within the phase ({})",
                        humantime::format_duration(action.at),
                        humantime::format_duration(phase.duration)
                    ),
                ));
            }
            action_of(action).map_err(|message| (format!("{field}.do"), message))?;
        }
    }
    for (i, verdict) in scenario.verdicts.iter().enumerate() {
        let at = |field: &str| format!("verdict[{i}].{field}");
        if signals::by_key(&verdict.signal).is_none() {
            return Err((
                at("signal"),
                format!(
                    "unknown signal {:?}; signals: {}",
                    verdict.signal,
                    signals::keys()
                ),
            ));
        }
        if verdict.buggy.is_none() && verdict.fixed.is_none() {
            return Err((
                at("buggy"),
                "name the phase where the symptom must show (`buggy`), the one where it \
                 must be absent (`fixed`), or both"
                    .into(),
            ));
        }
        for (field, phase) in [
            ("buggy", verdict.buggy.as_ref()),
            ("fixed", verdict.fixed.as_ref()),
        ] {
            if let Some(phase) = phase
                && !scenario.phases.iter().any(|p| &p.name == phase)
            {
                let names: Vec<&str> = scenario.phases.iter().map(|p| p.name.as_str()).collect();
                return Err((
                    at(field),
                    format!("no phase named {phase:?}; phases: {}", names.join(", ")),
                ));
            }
        }
        if let Some(settle) = verdict.settle {
            for phase in [verdict.buggy.as_ref(), verdict.fixed.as_ref()]
                .into_iter()
                .flatten()
            {
                if let Some(phase) = scenario.phases.iter().find(|p| &p.name == phase)
                    && settle >= phase.duration
                {
                    return Err((
                        at("settle"),
                        format!(
                            "{} leaves nothing of phase {:?} ({})",
                            humantime::format_duration(settle),
                            phase.name,
                            humantime::format_duration(phase.duration)
                        ),
                    ));
                }
            }
        }
        match (verdict.above, verdict.below) {
            (Some(_), Some(_)) => {
                return Err((at("below"), "give `above` or `below`, not both".into()));
            }
            (None, None) => {
                return Err((
                    at("stat"),
                    "give the symptom's threshold: `above = N` or `below = N`".into(),
                ));
            }
            (Some(t), None) if !t.is_finite() => {
                return Err((at("above"), "the threshold must be a number".into()));
            }
            (None, Some(t)) if !t.is_finite() => {
                return Err((at("below"), "the threshold must be a number".into()));
            }
            _ => {}
        }
    }
    Ok(())
}

fn check_load_rate(field: &str, rps: f64) -> Result<(), (String, String)> {
    if rps.is_finite() && rps >= 0.0 {
        Ok(())
    } else {
        Err((
            field.into(),
            format!("{rps} is not a rate (requests per second, 0 or more)"),
        ))
    }
}

fn check_inflow_rate(field: &str, rate: f64) -> Result<(), (String, String)> {
    if rate.is_finite() && rate >= 0.0 {
        Ok(())
    } else {
        Err((
            field.into(),
            format!("{rate} is not a rate (jobs per second, 0 or more)"),
        ))
    }
}

/// An action as written → what it does, or why it makes no sense.
pub fn action_of(spec: &ActionSpec) -> Result<Action, String> {
    let target = || {
        spec.target.clone().ok_or_else(|| {
            format!(
                "{:?} needs a `target` (a process name such as service-b-2)",
                spec.what
            )
        })
    };
    match spec.what {
        ActionKind::Kill => Ok(Action::Kill(target()?)),
        ActionKind::Stop => Ok(Action::Stop(target()?)),
        ActionKind::Start => match target()?.as_str() {
            "etcd" => Ok(Action::StartEtcd),
            other => Err(format!("only etcd can be started again, not {other:?}")),
        },
        ActionKind::Scale => match spec.n {
            Some(n) if n >= 1 => Ok(Action::Scale(n)),
            _ => Err("scale needs `n`, the number of Bs (1 or more)".into()),
        },
        ActionKind::RestartBackends => {
            if spec.set.is_empty() {
                Err("restart-backends needs `set`, the config to restart them with".into())
            } else {
                Ok(Action::RestartBackends(spec.set.clone()))
            }
        }
    }
}

impl Scenario {
    /// The scenario with every duration divided by `speed` (rates stay:
    /// the same load, for less time).
    pub fn compressed(&self, speed: f64) -> Scenario {
        let scale = |d: Duration| d.div_f64(speed);
        let mut out = self.clone();
        for phase in &mut out.phases {
            phase.duration = scale(phase.duration);
            for action in &mut phase.actions {
                action.at = scale(action.at);
            }
        }
        for verdict in &mut out.verdicts {
            verdict.settle = verdict.settle.map(scale);
        }
        out
    }

    /// Planned length of the whole run.
    pub fn duration(&self) -> Duration {
        self.phases.iter().map(|p| p.duration).sum()
    }
}

/// The built-in scenario files, for `list` (name, description, length).
pub fn built_ins() -> Vec<Result<Scenario, SpecError>> {
    BUILT_IN
        .iter()
        .map(|(name, text)| parse(name, &built_in_path(name), text))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_built_in_scenario_parses_and_its_config_loads() {
        use lab_common::config::{Sources, load};
        for scenario in built_ins() {
            let scenario = scenario.expect("a built-in scenario is valid");
            assert!(!scenario.phases.is_empty(), "{}", scenario.name);
            assert!(!scenario.verdicts.is_empty(), "{}", scenario.name);
            // CI plays only `lb`: a typo in another scenario's settings
            // must still fail here, not at a user's run.
            let mut sets = vec![scenario.set.clone()];
            for action in scenario.phases.iter().flat_map(|p| &p.actions) {
                sets.push([scenario.set.clone(), action.set.clone()].concat());
            }
            for overrides in sets {
                let sources = Sources {
                    overrides,
                    ..Sources::default()
                };
                if let Err(e) = load(&sources) {
                    panic!("{}: {e}", scenario.name);
                }
            }
        }
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    const GOOD: &str = r#"
description = "a test"

[load]
rps = 10

[[phase]]
name = "one"
duration = "5s"

[[phase]]
name = "two"
description = "worker = bounded"
duration = "5s"
switches = { worker = "bounded" }

[[verdict]]
cause = "worker"
symptom = "tasks"
signal = "job_tasks"
stat = "max"
buggy = "one"
fixed = "two"
above = 16
"#;

    /// The error for `GOOD` with `from` replaced by `to`.
    fn error_for(from: &str, to: &str) -> String {
        assert!(GOOD.contains(from), "{from:?} is in the base file");
        let text = GOOD.replacen(from, to, 1);
        parse("t", "my.toml", &text)
            .map(|_| ())
            .expect_err("refused")
            .to_string()
    }

    #[test]
    fn the_base_file_is_valid() {
        let scenario = parse("t", "my.toml", GOOD).expect("valid");
        assert_eq!(scenario.phases.len(), 2);
        assert_eq!(scenario.backends, 2);
        assert_eq!(scenario.load.concurrency, 64);
    }

    #[test]
    fn a_misspelt_field_is_named_with_its_line() {
        let e = error_for(
            "duration = \"5s\"\n\n[[phase]]",
            "durashun = \"5s\"\n\n[[phase]]",
        );
        assert!(e.starts_with("my.toml:9:"), "{e}");
        assert!(e.contains("durashun"), "{e}");
    }

    #[test]
    fn a_bad_duration_is_named_with_its_line() {
        let e = error_for(
            "duration = \"5s\"\nswitches",
            "duration = \"five\"\nswitches",
        );
        assert!(e.starts_with("my.toml:14:"), "{e}");
        assert!(e.contains("phase[1].duration"), "{e}");
    }

    #[test]
    fn a_switch_value_that_does_not_exist_lists_the_values() {
        let e = error_for("worker = \"bounded\"", "worker = \"boundless\"");
        assert!(e.starts_with("my.toml:15:"), "{e}");
        assert!(e.contains("phase[1].switches.worker"), "{e}");
        assert!(e.contains("unbounded, capped, bounded"), "{e}");
    }

    #[test]
    fn a_verdict_on_a_missing_phase_or_signal_is_refused() {
        let e = error_for("fixed = \"two\"", "fixed = \"three\"");
        assert!(e.starts_with("my.toml:23:"), "{e}");
        assert!(
            e.contains("verdict[0].fixed") && e.contains("phases: one, two"),
            "{e}"
        );
        let e = error_for("signal = \"job_tasks\"", "signal = \"jobtasks\"");
        assert!(e.starts_with("my.toml:20:"), "{e}");
        assert!(
            e.contains("verdict[0].signal") && e.contains("job_tasks"),
            "{e}"
        );
    }

    #[test]
    fn a_verdict_names_a_buggy_or_a_fixed_phase() {
        let e = error_for("buggy = \"one\"\nfixed = \"two\"\n", "");
        assert!(
            e.contains("verdict[0].buggy") && e.contains("`fixed`"),
            "{e}"
        );
        // Either one alone is a verdict: a soak names only the phase where
        // the symptom must never show.
        let soak = GOOD.replacen("buggy = \"one\"\n", "", 1);
        let scenario = parse("t", "my.toml", &soak).expect("valid");
        assert_eq!(scenario.verdicts[0].buggy, None);
        assert_eq!(scenario.verdicts[0].fixed.as_deref(), Some("two"));
    }

    #[test]
    fn a_syntax_error_has_its_line() {
        let e = error_for("rps = 10", "rps = = 10");
        assert!(e.starts_with("my.toml:5:"), "{e}");
    }

    #[test]
    fn an_action_outside_its_phase_or_without_a_target_is_refused() {
        let e = error_for(
            "switches = { worker = \"bounded\" }",
            "switches = { worker = \"bounded\" }\naction = [{ at = \"9s\", do = \"scale\", n = 3 }]",
        );
        assert!(e.contains("phase[1].action[0].at"), "{e}");
        let e = error_for(
            "switches = { worker = \"bounded\" }",
            "switches = { worker = \"bounded\" }\naction = [{ at = \"1s\", do = \"kill\" }]",
        );
        assert!(
            e.contains("phase[1].action[0].do") && e.contains("target"),
            "{e}"
        );
    }

    #[test]
    fn an_unknown_name_lists_the_known_ones() {
        let e = find("incidnet")
            .map(|_| ())
            .expect_err("unknown")
            .to_string();
        assert!(
            e.contains("incident, lb, worker, deadline, leaks, remedies"),
            "{e}"
        );
    }

    #[test]
    fn speed_divides_every_duration() {
        let text = GOOD
            .replace(
                "switches = { worker = \"bounded\" }",
                "switches = { worker = \"bounded\" }\naction = [{ at = \"4s\", do = \"scale\", n = 3 }]",
            )
            .replace("above = 16", "above = 16\nsettle = \"2s\"");
        let scenario = parse("t", "my.toml", &text).expect("valid").compressed(5.0);
        assert_eq!(scenario.duration(), Duration::from_secs(2));
        assert_eq!(scenario.phases[1].actions[0].at, Duration::from_millis(800));
        assert_eq!(
            scenario.verdicts[0].settle,
            Some(Duration::from_millis(400))
        );
    }

    #[test]
    fn a_settle_as_long_as_a_phase_is_refused() {
        let e = error_for("above = 16", "above = 16\nsettle = \"5s\"");
        assert!(
            e.contains("verdict[0].settle") && e.contains("leaves nothing"),
            "{e}"
        );
    }
}
