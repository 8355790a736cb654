//! Plays a scenario on a stack: its own (started on free ports, stopped at
//! the end) or a running one (`--attach`, left running).
//!
//! Three things run side by side for the whole run:
//! * the phases, in order: each flips its switches live, starts its load
//!   and job inflow for its duration, and does its actions on time;
//! * the sampler, once a second, into the shared [`Recording`], which also
//!   drives the progress line;
//! * a watch on the stack's processes: one that dies unasked is an event
//!   in the report.
//!
//! A stop (Ctrl-C) at any point ends the phase where it is, stops the
//! stack if the run started it, and still writes the report of what ran.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    path::{Path, PathBuf},
    pin::Pin,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use lab_common::config::{AdminToken, LabConfig};
use nix::sys::signal::Signal;
use tokio::{
    sync::{Mutex, watch},
    task::JoinHandle,
};

use super::{
    progress::{Position, Progress},
    recording::{Event, EventKind, PhaseSpan, Recording},
    report::{self, ReportFiles},
    sampler::{Sampler, Target},
    spec::{Action, Phase, Scenario, action_of},
};
use crate::{
    faults::{self, Assignment},
    jobs::{self, JobSpec},
    launcher::{Stack, UpOptions},
    load::{self, LiveWindow, LoadSpec},
    ports::PortPolicy,
    procs::Lifetime,
    token,
};

/// Which stack the scenario plays on.
pub enum StackChoice {
    /// Start one in `state_dir` with `config` (the scenario's and the
    /// command line's `--set` applied) and stop it at the end.
    Start {
        config: Box<LabConfig>,
        state_dir: PathBuf,
    },
    /// Play on the stack recorded in this state dir and leave it running.
    Attach { state_dir: PathBuf },
}

pub struct RunOptions {
    /// The scenario with its durations already divided by `speed`.
    pub scenario: Scenario,
    pub speed: f64,
    pub out_dir: PathBuf,
    pub stack: StackChoice,
    /// The command line, recorded so the report says how to repeat it.
    pub command: String,
}

/// What a run produced.
pub struct RunOutcome {
    pub recording: Recording,
    pub files: ReportFiles,
}

impl RunOutcome {
    /// Every phase ran, nothing went wrong on the way (an action that
    /// failed, a flip refused, a process that died unasked, the load or the
    /// inflow stopping) and every verdict held: the exit status is 0.
    pub fn passed(&self) -> bool {
        !self.recording.interrupted
            && self.problems().next().is_none()
            && self.files.verdicts.iter().all(|v| v.holds)
    }

    /// The problems of the run, in order.
    pub fn problems(&self) -> impl Iterator<Item = &Event> {
        self.recording
            .events
            .iter()
            .filter(|e| e.kind == EventKind::Problem)
    }
}

/// Resolves with the reason to stop early (e.g. "Ctrl-C").
pub type StopSignal = Pin<Box<dyn Future<Output = String> + Send>>;

/// Plays the scenario and writes the report into `options.out_dir`.
pub async fn run(options: RunOptions, mut stop: StopSignal) -> anyhow::Result<RunOutcome> {
    let RunOptions {
        scenario,
        speed,
        out_dir,
        stack: choice,
        command,
    } = options;
    std::fs::create_dir_all(&out_dir)
        .with_context(|| format!("creating the report directory {}", out_dir.display()))?;
    let progress = Arc::new(std::sync::Mutex::new(Progress::new()));
    let say = |line: String| {
        if let Ok(progress) = progress.lock() {
            progress.say(&line);
        }
    };

    let (mut stack, owned) = match choice {
        StackChoice::Start { config, state_dir } => {
            say(format!(
                "starting a stack with {} B in {} …",
                scenario.backends,
                state_dir.display()
            ));
            let mut up_options = UpOptions::new(*config, &state_dir);
            up_options.backends = scenario.backends;
            up_options.ports = PortPolicy::Auto;
            up_options.lifetime = Lifetime::TiedToLabctl;
            let up = Stack::up(up_options);
            tokio::pin!(up);
            tokio::select! {
                stack = &mut up => (stack?, true),
                reason = &mut stop => {
                    say(format!("{reason}: stopping once the stack is up …"));
                    let mut stack = up.await?;
                    stack.down().await?;
                    keep_logs_only(&state_dir, &out_dir);
                    anyhow::bail!("{reason} before the first phase began; nothing to report");
                }
            }
        }
        StackChoice::Attach { state_dir } => (Stack::attach(&state_dir)?, false),
    };
    let token = token::read(&stack.state.state_dir).with_context(|| {
        format!(
            "reading the operator token {}",
            token::path(&stack.state.state_dir).display()
        )
    })?;

    let started = Instant::now();
    let recording = Arc::new(Mutex::new(Recording {
        scenario: scenario.name.clone(),
        description: scenario.description.clone(),
        file: scenario.file.clone(),
        command,
        speed,
        started_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        ..Recording::default()
    }));
    let live = Arc::new(LiveWindow::default());
    let (targets_tx, targets_rx) = watch::channel(targets_of(&stack));
    let (position_tx, position_rx) = watch::channel(Position {
        phase: scenario
            .phases
            .first()
            .map(|p| p.name.clone())
            .unwrap_or_default(),
        index: 1,
        phases: scenario.phases.len(),
        in_phase: Duration::ZERO,
        phase_length: scenario
            .phases
            .first()
            .map(|p| p.duration)
            .unwrap_or_default(),
    });
    let sampling = tokio::spawn(sample_every_second(
        Sampler::new(live.clone()),
        targets_rx,
        position_rx,
        recording.clone(),
        progress.clone(),
        started,
    ));

    let mut play = Play {
        stack: &mut stack,
        token,
        recording: recording.clone(),
        started,
        live,
        progress: progress.clone(),
        targets: targets_tx,
        exited: BTreeSet::new(),
        switches: BTreeMap::new(),
        background: Vec::new(),
    };
    let mut interruption = None;
    for (index, phase) in scenario.phases.iter().enumerate() {
        let _ = position_tx.send(Position {
            phase: phase.name.clone(),
            index: index + 1,
            phases: scenario.phases.len(),
            in_phase: Duration::ZERO,
            phase_length: phase.duration,
        });
        if let Err(reason) = play
            .phase(&scenario, index, phase, &mut stop, &position_tx)
            .await
        {
            interruption = Some(reason);
            break;
        }
    }
    sampling.abort();
    let _ = sampling.await;
    for task in play.background.drain(..) {
        task.abort();
    }
    drop(play);

    let mut recording = recording.lock().await.clone();
    recording.duration_s = started.elapsed().as_secs_f64();
    if let Some(reason) = &interruption {
        recording.interrupted = true;
        recording.interruption = Some(reason.clone());
        say(format!("{reason}: stopping"));
    }
    if let Ok(progress) = progress.lock() {
        progress.finish();
    }
    if owned {
        eprintln!("stopping the stack …");
        match stack.down().await {
            Ok(()) => keep_logs_only(&stack.state.state_dir, &out_dir),
            // The report is still written; the problem is in it.
            Err(e) => recording.events.push(Event {
                t_s: started.elapsed().as_secs_f64(),
                kind: EventKind::Problem,
                label: format!("stopping the stack failed: {e}"),
            }),
        }
    } else {
        eprintln!(
            "the attached stack keeps running, with the switches the scenario left: {}",
            stack.state.state_dir.display()
        );
    }
    let files = report::write(&out_dir, &recording, &scenario)?;
    Ok(RunOutcome { recording, files })
}

/// The state shared by the phases of one run.
struct Play<'a> {
    stack: &'a mut Stack,
    token: AdminToken,
    recording: Arc<Mutex<Recording>>,
    started: Instant,
    live: Arc<LiveWindow>,
    progress: Arc<std::sync::Mutex<Progress>>,
    targets: watch::Sender<Vec<Target>>,
    /// Processes whose exit is expected or already reported.
    exited: BTreeSet<String>,
    /// Every switch flipped so far, re-applied to Bs that start later.
    switches: BTreeMap<String, String>,
    /// Load and inflow of past phases, still draining.
    background: Vec<JoinHandle<()>>,
}

impl Play<'_> {
    fn now(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn say(&self, line: String) {
        if let Ok(progress) = self.progress.lock() {
            progress.say(&line);
        }
    }

    /// A way for a background task to record a problem at the moment it
    /// happens.
    fn problem_reporter(
        &self,
    ) -> impl FnOnce(String) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + 'static {
        let recording = self.recording.clone();
        let progress = self.progress.clone();
        let started = self.started;
        move |label: String| {
            Box::pin(async move {
                let t_s = started.elapsed().as_secs_f64();
                if let Ok(progress) = progress.lock() {
                    progress.say(&format!("  t={t_s:>5.1} s  PROBLEM: {label}"));
                }
                recording.lock().await.events.push(Event {
                    t_s,
                    kind: EventKind::Problem,
                    label,
                });
            })
        }
    }

    async fn event(&self, kind: EventKind, label: String) {
        let t_s = self.now();
        let prefix = match kind {
            EventKind::Flip => "flip",
            EventKind::Action => "action",
            EventKind::Problem => "PROBLEM",
        };
        self.say(format!("  t={t_s:>5.1} s  {prefix}: {label}"));
        self.recording
            .lock()
            .await
            .events
            .push(Event { t_s, kind, label });
    }

    /// Plays one phase; `Err(reason)` when the run is stopped during it.
    async fn phase(
        &mut self,
        scenario: &Scenario,
        index: usize,
        phase: &Phase,
        stop: &mut StopSignal,
        position: &watch::Sender<Position>,
    ) -> Result<(), String> {
        let begin = Instant::now();
        let start_s = self.now();
        self.say(format!(
            "phase {}/{} {} ({}): {}",
            index + 1,
            scenario.phases.len(),
            phase.name,
            humantime::format_duration(round_to_ms(phase.duration)),
            phase.description
        ));
        let rps = phase.rps.unwrap_or(scenario.load.rps);
        let inflow_rate = phase.inflow_rate.unwrap_or(scenario.inflow.rate);
        self.recording.lock().await.phases.push(PhaseSpan {
            name: phase.name.clone(),
            description: phase.description.clone(),
            start_s,
            end_s: start_s + phase.duration.as_secs_f64(),
            switches: BTreeMap::new(),
            load_rps: rps,
            inflow_rate,
        });

        let flips: Vec<(String, String)> = phase
            .switches
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        self.flip(&flips).await;
        self.note_switches_in_force().await;

        if rps > 0.0 {
            let mut spec = LoadSpec::new(self.stack.a_url(), scenario.load.path.clone());
            spec.rps = Some(rps);
            spec.duration = Some(phase.duration);
            // `load.concurrency` is the most requests in flight: past it a
            // due request is dropped (counted as an error in the window).
            spec.concurrency = scenario.load.concurrency;
            spec.max_in_flight = scenario.load.concurrency;
            spec.timeout = scenario.load.timeout;
            spec.seed = index as u64 + 1;
            spec.live = Some(self.live.clone());
            let problem = self.problem_reporter();
            self.background.push(tokio::spawn(async move {
                if let Err(e) = load::run(&spec, None).await {
                    problem(format!("the load generator stopped: {e:#}")).await;
                }
            }));
        }
        if inflow_rate > 0.0 {
            let spec = JobSpec {
                mysql_url: self.stack.config.mysql.url.clone(),
                rate: inflow_rate,
                duration: phase.duration,
                poison_ratio: scenario.inflow.poison_ratio,
                payload_bytes: scenario.inflow.payload_bytes,
                seed: index as u64 + 1,
            };
            let problem = self.problem_reporter();
            self.background.push(tokio::spawn(async move {
                if let Err(e) = jobs::produce(&spec).await {
                    problem(format!("the job inflow stopped: {e:#}")).await;
                }
            }));
        }

        let mut actions: Vec<_> = phase.actions.iter().collect();
        actions.sort_by_key(|a| a.at);
        for spec in actions {
            self.wait_until(begin + spec.at, stop, position, begin)
                .await?;
            match action_of(spec) {
                Ok(action) => self.act(&action).await,
                Err(message) => self.event(EventKind::Problem, message).await,
            }
            // A restart changes switches too (`restart-backends` with
            // `faults.*`): the phase shows what is in force after it.
            self.note_switches_in_force().await;
        }
        self.wait_until(begin + phase.duration, stop, position, begin)
            .await
    }

    /// Waits until `deadline`, noting processes that die meanwhile; `Err`
    /// with the reason when the run is stopped.
    async fn wait_until(
        &mut self,
        deadline: Instant,
        stop: &mut StopSignal,
        position: &watch::Sender<Position>,
        phase_begin: Instant,
    ) -> Result<(), String> {
        loop {
            let exited = self.exited.clone();
            tokio::select! {
                _ = tokio::time::sleep_until(deadline.into()) => {
                    position.send_modify(|p| p.in_phase = phase_begin.elapsed());
                    return Ok(());
                }
                reason = &mut *stop => {
                    self.end_phase_now().await;
                    return Err(reason);
                }
                (name, status) = self.stack.next_exit(&exited) => {
                    let how = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                    self.event(EventKind::Problem, format!("{name} exited unasked ({how})")).await;
                    self.exited.insert(name);
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {
                    position.send_modify(|p| p.in_phase = phase_begin.elapsed());
                }
            }
        }
    }

    async fn end_phase_now(&self) {
        let now = self.now();
        if let Some(span) = self.recording.lock().await.phases.last_mut() {
            span.end_s = now;
        }
    }

    /// Flips switches live on every process that owns them.
    async fn flip(&mut self, flips: &[(String, String)]) {
        if flips.is_empty() {
            return;
        }
        let mut assignments = Vec::new();
        for (switch, value) in flips {
            match format!("{switch}={value}").parse::<Assignment>() {
                Ok(a) => assignments.push(a),
                Err(e) => {
                    self.event(EventKind::Problem, e.to_string()).await;
                    return;
                }
            }
        }
        match faults::set(&self.stack.state, &self.token, &assignments).await {
            Ok(results) => {
                let mut refused = 0;
                for result in &results {
                    if let Some(error) = &result.error {
                        refused += 1;
                        self.event(
                            EventKind::Problem,
                            format!("{} did not take the flip: {error}", result.name),
                        )
                        .await;
                    }
                }
                let mut label = flips
                    .iter()
                    .map(|(k, v)| format!("{k}={v}"))
                    .collect::<Vec<_>>()
                    .join(" ");
                if refused > 0 {
                    label.push_str(&format!(" (refused by {refused} of {})", results.len()));
                }
                self.event(EventKind::Flip, label).await;
                for (k, v) in flips {
                    self.switches.insert(k.clone(), v.clone());
                }
            }
            Err(e) => self.event(EventKind::Problem, e.to_string()).await,
        }
    }

    /// Records in the current phase every switch as the processes report
    /// it now (A's `lb`, the Bs' others). Processes that disagree on a
    /// switch show as `b-1:x,b-2:y`, and that is a problem: every B should
    /// play the same phase.
    async fn note_switches_in_force(&self) {
        let mut seen: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for process in faults::show(&self.stack.state).await {
            if process.error.is_some() {
                continue;
            }
            for (switch, value) in process.faults {
                if let Some(value) = value.as_str() {
                    seen.entry(switch)
                        .or_default()
                        .insert(process.name.clone(), value.to_string());
                }
            }
        }
        let mut in_force = BTreeMap::new();
        let mut disagreements = Vec::new();
        for (switch, by_process) in seen {
            let mut values: Vec<&String> = by_process.values().collect();
            values.dedup();
            let shown = if values.len() == 1 {
                values[0].clone()
            } else {
                let each: Vec<String> =
                    by_process.iter().map(|(p, v)| format!("{p}:{v}")).collect();
                disagreements.push(format!("{switch}: {}", each.join(", ")));
                each.join(",")
            };
            in_force.insert(switch, shown);
        }
        for disagreement in disagreements {
            self.event(
                EventKind::Problem,
                format!("processes disagree on a switch: {disagreement}"),
            )
            .await;
        }
        if let Some(span) = self.recording.lock().await.phases.last_mut() {
            span.switches = in_force;
        }
    }

    async fn act(&mut self, action: &Action) {
        let result = self.try_act(action).await;
        match result {
            Ok(label) => self.event(EventKind::Action, label).await,
            Err(e) => {
                self.event(
                    EventKind::Problem,
                    format!("{} failed: {e:#}", action.label()),
                )
                .await;
            }
        }
        let _ = self.targets.send(targets_of(self.stack));
    }

    async fn try_act(&mut self, action: &Action) -> anyhow::Result<String> {
        match action {
            Action::Kill(target) => {
                let name = self.resolve(target)?;
                self.exited.insert(name.clone());
                self.stack.signal(&name, Signal::SIGKILL)?;
                Ok(format!("kill {name}"))
            }
            Action::Stop(target) => {
                let name = self.resolve(target)?;
                self.exited.insert(name.clone());
                self.stack.stop_service(&name).await?;
                Ok(format!("stop {name}"))
            }
            Action::StartEtcd => {
                self.stack.restart_etcd().await?;
                self.exited.remove("etcd");
                Ok("start etcd".into())
            }
            Action::Scale(n) => {
                self.start_new_backends_as_flipped();
                let changed = self.stack.scale_backends(*n).await?;
                for name in &changed {
                    self.exited.remove(name);
                }
                self.reapply_switches().await;
                Ok(format!("scale to {n} B ({})", changed.join(", ")))
            }
            Action::RestartBackends(set) => {
                for assignment in set {
                    if let Some((key, value)) = assignment.split_once('=')
                        && let Some(switch) = key.strip_prefix("faults.")
                    {
                        self.switches.insert(switch.to_string(), value.to_string());
                    }
                }
                self.start_new_backends_as_flipped();
                let restarted = self.stack.restart_backends(set).await?;
                for name in &restarted {
                    self.exited.remove(name);
                }
                self.reapply_switches().await;
                Ok(format!(
                    "restart {} with {}",
                    restarted.join(", "),
                    set.join(" ")
                ))
            }
        }
    }

    /// A B that starts reads its switches from its config: the B-owned
    /// flips made so far become config overrides of every B started from
    /// now on, so a new or restarted B never runs a switch's old form, not
    /// even for the moment before [`Self::reapply_switches`] reaches it.
    fn start_new_backends_as_flipped(&mut self) {
        let overrides: Vec<String> = self
            .switches
            .iter()
            .filter_map(|(switch, value)| {
                let assignment: Assignment = format!("{switch}={value}").parse().ok()?;
                faults::owns("service-b-1", assignment.switch)
                    .then(|| format!("faults.{switch}={value}"))
            })
            .collect();
        self.stack.add_backend_overrides(&overrides);
    }

    /// The flips made so far, sent again to every process that owns them:
    /// also reaches a B that another labctl started meanwhile.
    async fn reapply_switches(&mut self) {
        let assignments: Vec<Assignment> = self
            .switches
            .iter()
            .filter_map(|(k, v)| format!("{k}={v}").parse().ok())
            .collect();
        if assignments.is_empty() {
            return;
        }
        match faults::set(&self.stack.state, &self.token, &assignments).await {
            Ok(results) => {
                for result in results {
                    if let Some(error) = result.error {
                        self.event(
                            EventKind::Problem,
                            format!("{} did not take the flips again: {error}", result.name),
                        )
                        .await;
                    }
                }
            }
            Err(e) => {
                self.event(EventKind::Problem, format!("re-applying the flips: {e}"))
                    .await;
            }
        }
    }

    /// `oldest-b` / `newest-b` → the lowest / highest numbered B alive;
    /// any other name as it is.
    fn resolve(&self, target: &str) -> anyhow::Result<String> {
        let mut alive: Vec<(usize, String)> = self
            .stack
            .state
            .backends()
            .filter(|b| b.is_alive() && !self.exited.contains(&b.name))
            .filter_map(|b| {
                let index = b.name.strip_prefix("service-b-")?.parse().ok()?;
                Some((index, b.name.clone()))
            })
            .collect();
        alive.sort();
        let pick = match target {
            "oldest-b" => alive.first(),
            "newest-b" => alive.last(),
            name => return Ok(name.to_string()),
        };
        pick.map(|(_, name)| name.clone())
            .with_context(|| format!("no B alive for {target}"))
    }
}

/// The processes with a `/metrics` to sample: A, every B, partner-api.
fn targets_of(stack: &Stack) -> Vec<Target> {
    stack
        .state
        .services
        .iter()
        .filter(|s| {
            s.name == "service-a" || s.name.starts_with("service-b-") || s.name == "partner-api"
        })
        .filter_map(|s| {
            Some(Target {
                instance: s.name.clone(),
                admin_url: s.admin_url.clone()?,
                instance_id: s.instance_id.clone(),
            })
        })
        .collect()
}

/// Samples once a second until aborted, and refreshes the progress line.
async fn sample_every_second(
    mut sampler: Sampler,
    mut targets: watch::Receiver<Vec<Target>>,
    position: watch::Receiver<Position>,
    recording: Arc<Mutex<Recording>>,
    progress: Arc<std::sync::Mutex<Progress>>,
    started: Instant,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        sampler.set_targets(targets.borrow_and_update().clone());
        let t_s = started.elapsed().as_secs_f64();
        let collected = sampler.collect().await;
        let mut recording = recording.lock().await;
        sampler.write(t_s, collected, &mut recording);
        let position = position.borrow().clone();
        if let Ok(mut progress) = progress.lock() {
            progress.update(&position, t_s, &recording);
        }
    }
}

/// After the run's own stack is down: its logs move next to the report,
/// the rest (MySQL's and etcd's data, certificates) goes.
/// A report directory used before keeps its old logs: these go to
/// `logs.1`, `logs.2`, …; if they cannot be moved, nothing is removed.
fn keep_logs_only(state_dir: &Path, out_dir: &Path) {
    let logs = state_dir.join("logs");
    if logs.is_dir() {
        let target = std::iter::once(out_dir.join("logs"))
            .chain((1..).map(|n| out_dir.join(format!("logs.{n}"))))
            .find(|path| !path.exists())
            .unwrap_or_else(|| out_dir.join("logs"));
        if std::fs::rename(&logs, &target).is_err() {
            return;
        }
    }
    if state_dir.starts_with(out_dir) {
        let _ = std::fs::remove_dir_all(state_dir);
    }
}

fn round_to_ms(d: Duration) -> Duration {
    Duration::from_millis(d.as_millis() as u64)
}
