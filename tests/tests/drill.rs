//! `labctl drill` end to end, through the command line a facilitator uses:
//! the causes drawn from a seed are the ones in force, nothing the trainee
//! can reach — an admin endpoint without the drill token, `/metrics`, a
//! log, a file in the state dir, a process's arguments or environment,
//! `labctl status` — names them, the metrics have the same names and labels
//! whichever form a switch is in, and answers are scored against the
//! sealed key.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::{Command, Output},
    time::Duration,
};

use lab_common::{config::Faults, faults::Switch};
use lab_tests::{eventually, metric_sum, plain_client};
use labctl::{
    drill::{self, CauseCount},
    state::LabState,
};

fn binary(name: &str) -> PathBuf {
    labctl::procs::find_lab_binary(name, None)
        .unwrap_or_else(|e| panic!("{e:#} (run `cargo build --workspace` before the tests)"))
}

/// Every value any switch can take, and the presets' names.
const SWITCH_VALUES: [&str; 14] = [
    "l4",
    "l7",
    "etcd",
    "unbounded",
    "bounded",
    "capped",
    "ignore",
    "propagate",
    "per-request",
    "shared",
    "leak-on-error",
    "close",
    "buggy",
    "fixed",
];

/// A drill started with `labctl drill start` in a temp dir; stopped (with
/// `labctl down`, whatever happened) when dropped.
struct Drill {
    dir: tempfile::TempDir,
    token_file: PathBuf,
    /// What `drill start` printed.
    printed: String,
}

impl Drill {
    fn start(seed: u64, causes: &str, traffic: bool) -> anyhow::Result<Drill> {
        let dir = tempfile::tempdir()?;
        // Outside the state dir, as `start` requires.
        let token_file = dir.path().join("facilitator.token");
        let state_dir = dir.path().join("lab");
        let mut args = vec![
            "drill".to_string(),
            "start".into(),
            "--seed".into(),
            seed.to_string(),
            "--causes".into(),
            causes.into(),
            "--ports".into(),
            "auto".into(),
            "--state-dir".into(),
            state_dir.display().to_string(),
            "--token-file".into(),
            token_file.display().to_string(),
        ];
        if traffic {
            args.extend(["--rps".into(), "20".into(), "--job-rate".into(), "5".into()]);
        } else {
            args.push("--no-traffic".into());
        }
        let mut drill = Drill {
            dir,
            token_file,
            printed: String::new(),
        };
        let out = drill.labctl(&args)?;
        anyhow::ensure!(
            out.status.success(),
            "drill start failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        drill.printed = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(drill)
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("lab")
    }

    fn token(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(&self.token_file)?.trim().to_owned())
    }

    fn state(&self) -> anyhow::Result<LabState> {
        LabState::load(&self.state_dir())?.ok_or_else(|| anyhow::anyhow!("no state.json"))
    }

    fn admin_url(&self, name: &str) -> anyhow::Result<String> {
        self.state()?
            .service(name)
            .and_then(|s| s.admin_url.clone())
            .ok_or_else(|| anyhow::anyhow!("{name} has no admin URL"))
    }

    /// `labctl ARGS`, without the drill token in its environment.
    fn labctl<S: AsRef<std::ffi::OsStr>>(&self, args: &[S]) -> anyhow::Result<Output> {
        Ok(Command::new(binary("labctl"))
            .args(args)
            .env_remove("LABCTL_DRILL_TOKEN")
            .output()?)
    }

    /// `labctl drill SUBCOMMAND … --state-dir … [--token-file …]`; stdout.
    fn drill(&self, args: &[&str], with_token: bool) -> anyhow::Result<String> {
        let mut all: Vec<String> = vec!["drill".into()];
        all.extend(args.iter().map(|a| a.to_string()));
        all.extend(["--state-dir".into(), self.state_dir().display().to_string()]);
        if with_token {
            all.extend(["--token-file".into(), self.token_file.display().to_string()]);
        }
        let out = self.labctl(&all)?;
        anyhow::ensure!(
            out.status.success(),
            "labctl {all:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Drill {
    fn drop(&mut self) {
        let _ = Command::new(binary("labctl"))
            .arg("down")
            .arg("--state-dir")
            .arg(self.state_dir())
            .output();
    }
}

/// GET `url` with an optional bearer token: (status, body).
async fn get(url: &str, token: Option<&str>) -> anyhow::Result<(u16, String)> {
    let mut request = plain_client()?.get(url).timeout(Duration::from_secs(10));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await?;
    Ok((response.status().as_u16(), response.text().await?))
}

/// How a switch's value could be spelled where it leaks: a config line, a
/// `--set` flag, JSON, a log field (as `Display` or as `Debug`, e.g.
/// `faults=Faults { lb: L4, … }`).
fn spellings(faults: &Faults) -> Vec<String> {
    let debug = format!("{faults:?}");
    let debug_fields = debug
        .trim_start_matches("Faults {")
        .trim_end_matches('}')
        .split(',')
        .map(|field| field.trim().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(debug_fields.len(), Switch::ALL.len(), "{debug}");
    Switch::ALL
        .iter()
        .flat_map(|s| {
            let (name, value) = (s.name(), s.value_in(faults));
            [
                format!("{name}={value}"),
                format!("{name} = \"{value}\""),
                format!("{name}=\"{value}\""),
                format!("\"{name}\":\"{value}\""),
                format!("faults.{name}"),
            ]
        })
        .chain(["buggy", "fixed"].into_iter().flat_map(|preset| {
            [
                format!("mode = \"{preset}\""),
                format!("\"mode\":\"{preset}\""),
                format!("mode={preset}"),
            ]
        }))
        .chain(["mode=Buggy".into(), "mode=Fixed".into()])
        .chain(debug_fields)
        .collect()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            match entry.file_type() {
                Ok(t) if t.is_dir() => dirs.push(path),
                Ok(t) if t.is_file() => files.push(path),
                _ => {}
            }
        }
    }
    files
}

/// Label values of every sample in a `/metrics` text that are a switch's
/// value.
fn switch_values_in(metrics: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for line in metrics.lines().filter(|l| !l.starts_with('#')) {
        let Some((_, labels)) = line.split_once('{') else {
            continue;
        };
        for value in labels.split("=\"").skip(1) {
            let value = value.split('"').next().unwrap_or_default();
            if SWITCH_VALUES.contains(&value) {
                found.insert(format!("{value} in {line}"));
            }
        }
    }
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drill_runs_the_drawn_causes_and_nothing_the_trainee_reaches_names_them()
-> anyhow::Result<()> {
    const SEED: u64 = 42;
    let drill = Drill::start(SEED, "3", true)?;
    let drawn = drill::draw(SEED, CauseCount::Exactly(3));
    let token = drill.token()?;
    let state_dir = drill.state_dir();
    let admin_token = std::fs::read_to_string(state_dir.join("admin.token"))?;
    let trainee = admin_token.trim();
    assert!(
        drill.printed.contains(&token),
        "the facilitator gets the token"
    );

    // Let the load and the job inflow run through every service's logs.
    until_traffic_flowed(&drill).await?;

    // The switches in force are the drawn ones; only the drill token reads them.
    let services = ["service-a", "service-b-1", "service-b-2"];
    for name in services {
        let url = format!("{}/faults", drill.admin_url(name)?);
        for who in [None, Some(trainee)] {
            let (status, body) = get(&url, who).await?;
            assert_eq!(status, 403, "{name} /faults as {who:?}: {body}");
            assert!(
                !SWITCH_VALUES
                    .iter()
                    .any(|v| body.contains(&format!("\"{v}\""))),
                "{body}"
            );
        }
        let (status, body) = get(&url, Some(&token)).await?;
        assert_eq!(status, 200, "{body}");
        let json: serde_json::Value = serde_json::from_str(&body)?;
        let owned = json["faults"].as_object().map_or(0, |f| f.len());
        let expected = if name == "service-a" { 2 } else { 4 };
        assert_eq!(owned, expected, "{name} shows every switch it owns: {body}");
        for (switch, value) in json["faults"].as_object().into_iter().flatten() {
            let switch = Switch::ALL
                .into_iter()
                .find(|s| s.name() == switch)
                .expect("a switch");
            assert_eq!(
                value.as_str(),
                Some(switch.value_in(&drawn)),
                "{name}'s {switch} is the drawn one"
            );
        }
    }

    // /metrics: no lab_fault_info, no label value that is a switch value.
    for name in ["service-a", "service-b-1", "service-b-2", "partner-api"] {
        let (_, metrics) = get(&format!("{}/metrics", drill.admin_url(name)?), None).await?;
        assert!(
            !metrics.contains("lab_fault_info"),
            "{name} exports lab_fault_info"
        );
        // Gauges the leaking code path keeps itself name the cause.
        for self_reported in ["lab_db_connections_leaked", "lab_http_responses_unclosed"] {
            assert!(
                !metrics.contains(self_reported),
                "{name} exports {self_reported}"
            );
        }
        let leaks = switch_values_in(&metrics);
        assert!(
            leaks.is_empty(),
            "{name}'s metrics name switch values: {leaks:?}"
        );
    }

    // labctl status.
    let status = drill.labctl(&["status", "--state-dir", &state_dir.display().to_string()])?;
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(status.contains("switches are hidden"), "{status}");

    // Every file in the state dir (logs, state.json, lab.toml, the brief,
    // the sealed key, MySQL's and etcd's data), every recorded process's
    // arguments and environment, and labctl status: no spelling of a drawn
    // switch, no token.
    let mut needles = spellings(&drawn);
    needles.push(token.clone());
    // The seed draws the causes again (`drill start --seed` elsewhere).
    needles.extend([
        format!("seed {SEED}"),
        format!("seed={SEED}"),
        format!("\"seed\":{SEED}"),
        format!("--seed\0{SEED}"),
    ]);
    let mut places: Vec<(String, Vec<u8>)> = files_under(&state_dir)
        .into_iter()
        .filter_map(|f| Some((f.display().to_string(), std::fs::read(&f).ok()?)))
        .collect();
    for s in &drill.state()?.services {
        for what in ["cmdline", "environ"] {
            let path = format!("/proc/{}/{what}", s.pid);
            if let Ok(bytes) = std::fs::read(&path) {
                places.push((format!("{} {what}", s.name), bytes));
            }
        }
    }
    places.push(("labctl status".into(), status.into_bytes()));
    let files = places.len();
    let search = aho_corasick::AhoCorasick::new(&needles)?;
    for (place, bytes) in &places {
        if let Some(found) = search.find(bytes) {
            panic!("{place} holds {:?}", needles[found.pattern().as_usize()]);
        }
    }
    println!(
        "drill (seed {SEED}, 3 causes): {files} files and process views hold none of {} \
         spellings of the switches or the token",
        needles.len()
    );

    // Scoring, through the command line: without the token nothing is
    // scored; the drawn values score 100 %; wrong ones name what was missed.
    let refused = drill.labctl(&[
        "drill",
        "answer",
        "lb=l4",
        "--state-dir",
        &state_dir.display().to_string(),
    ])?;
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && why.contains("needs the drill token"),
        "answering needs the drill token: {why}"
    );
    let right: Vec<String> = Switch::ALL
        .iter()
        .map(|s| format!("{}={}", s.name(), s.value_in(&drawn)))
        .collect();
    let mut args: Vec<&str> = vec!["answer"];
    args.extend(right.iter().map(String::as_str));
    let scored = drill.drill(&args, true)?;
    assert!(
        scored.contains("score: 100 % (5 of 5 switches right)"),
        "{scored}"
    );

    let flip = |s: Switch| {
        let [buggy, fixed] = drill::allowed_answers(s);
        let value = if s.value_in(&drawn) == buggy {
            fixed
        } else {
            buggy
        };
        format!("{}={value}", s.name())
    };
    let wrong = [flip(Switch::Worker), flip(Switch::Rows)];
    let scored = drill.drill(&["answer", &wrong[0], &wrong[1]], true)?;
    assert!(
        scored.contains("score: 60 % (3 of 5 switches right)"),
        "{scored}"
    );
    let missed: Vec<&str> = scored
        .lines()
        .filter(|l| l.contains("missed"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(missed, ["worker", "rows"], "{scored}");
    assert!(
        scored.contains("docs/diagnose.md#"),
        "points to the diagnosis: {scored}"
    );

    let revealed = drill.drill(&["reveal"], true)?;
    for switch in Switch::ALL {
        let line = revealed
            .lines()
            .find(|l| l.split_whitespace().next() == Some(switch.name()))
            .unwrap_or_default();
        assert!(
            line.split_whitespace().nth(1) == Some(switch.value_in(&drawn)),
            "{switch} revealed as {line:?}:\n{revealed}"
        );
    }
    let stopped = drill.drill(&["stop"], true)?;
    assert!(stopped.contains("drill stopped"), "{stopped}");
    assert!(drill.state().is_err(), "the lab is down");
    Ok(())
}

/// The metric families and label names each service exports:
/// `name{label,…}`.
async fn shape(drill: &Drill) -> anyhow::Result<BTreeSet<String>> {
    let mut shape = BTreeSet::new();
    for name in ["service-a", "service-b-1", "partner-api"] {
        let (_, metrics) = get(&format!("{}/metrics", drill.admin_url(name)?), None).await?;
        for line in metrics
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let (metric, labels) = line
                .split_once('{')
                .unwrap_or((line.split_whitespace().next().unwrap_or_default(), ""));
            let keys: Vec<&str> = labels
                .split(',')
                .filter_map(|pair| pair.split_once('=').map(|(k, _)| k))
                .collect();
            shape.insert(format!("{name} {metric}{{{}}}", keys.join(",")));
        }
    }
    Ok(shape)
}

/// Waits until the drill's load and job inflow have gone through A and
/// the Bs: ≥ 100 requests served by A, ≥ 5 job attempts finished.
async fn until_traffic_flowed(drill: &Drill) -> anyhow::Result<()> {
    let (a, b1, b2) = (
        drill.admin_url("service-a")?,
        drill.admin_url("service-b-1")?,
        drill.admin_url("service-b-2")?,
    );
    eventually(
        Duration::from_secs(30),
        "requests served and jobs done",
        || async {
            let a = get(&format!("{a}/metrics"), None).await.ok()?.1;
            let mut jobs = 0.0;
            for b in [&b1, &b2] {
                let text = get(&format!("{b}/metrics"), None).await.ok()?.1;
                jobs += metric_sum(&text, "lab_jobs_total", &[]).unwrap_or(0.0);
            }
            let served = metric_sum(&a, "lab_http_requests_total", &[])?;
            (served >= 100.0 && jobs >= 5.0).then_some(())
        },
    )
    .await
}

/// A trainee must diagnose from what the metrics say, not from which
/// metrics exist: every switch buggy and every switch fixed export the same
/// names with the same labels, under the drill's load and job inflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_metrics_have_the_same_names_and_labels_whichever_form_is_drawn() -> anyhow::Result<()>
{
    let mut shapes = Vec::new();
    for causes in ["all", "0"] {
        let drill = Drill::start(7, causes, true)?;
        until_traffic_flowed(&drill).await?;
        shapes.push(shape(&drill).await?);
        drill.drill(&["stop"], false)?;
    }
    let (buggy, fixed) = (&shapes[0], &shapes[1]);
    let only_buggy: Vec<_> = buggy.difference(fixed).collect();
    let only_fixed: Vec<_> = fixed.difference(buggy).collect();
    println!(
        "{} metric names and label sets in either form; only buggy {only_buggy:?}, only fixed {only_fixed:?}",
        buggy.len()
    );
    assert!(
        only_buggy.is_empty() && only_fixed.is_empty(),
        "only with every switch buggy: {only_buggy:?}; only fixed: {only_fixed:?}"
    );
    Ok(())
}
