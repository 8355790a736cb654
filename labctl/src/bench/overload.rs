//! `labctl bench overload`: open-loop load at a multiple (3×) of what the
//! stack sustains, on the fixed preset and on the buggy one, a fresh stack
//! for each.
//!
//! What the fixed preset should show: A sheds what it cannot serve — a 503
//! `overloaded` at once when `service_a.max_concurrent_requests` requests
//! are in (`faults.deadline = propagate`) — instead of queueing them; the
//! requests it admits are still served at close to capacity; its memory
//! stays bounded; and once the load drops, latency is back to normal within
//! seconds. The buggy preset (`deadline = ignore`, `lb = l4`)
//! admits everything: requests queue in A and B until A's deadline, the
//! goodput collapses, and the queue outlives the overload.
//!
//! **The machine.** The generator's own work grows with the rate it offers:
//! at 3× capacity it spends about as much CPU as the stack. On a 2-core
//! machine that CPU would come out of the stack's and any overload would
//! look like a collapse. So by default the stack — every process it starts,
//! MySQL and etcd included — runs on the first CPU this process may use and
//! the generator (this process) on the others; capacity is then one core's
//! worth of stack (and each service's runtime, seeing one CPU, starts one
//! worker thread). `--no-pin` shares every CPU (and measures the generator's
//! cost too).
//!
//! **Per preset, on a fresh stack (2 Bs, no job inflow):**
//! 1. warm-up: closed loop, not measured;
//! 2. capacity: closed loop over `--concurrency` connections for
//!    `--capacity-duration`: 2xx answers per second;
//! 3. baseline: open loop at half the reference capacity: the p99 of a
//!    stack with room to spare;
//! 4. overload: open loop at `--multiple` × the reference capacity for
//!    `--duration`;
//! 5. recovery: open loop at half the reference capacity for `--recovery`,
//!    started when the overload's schedule ends — not when its last request
//!    is answered — so a queue left behind shows as slow seconds.
//!
//! The reference capacity is the first preset's (`fixed`, by default): every
//! preset is offered the same load.
//!
//! **The callers** wait `--timeout` (1 s) for an answer and then give up, as
//! a caller behind a user does; up to `--max-in-flight` (16 384) of them
//! wait at once, so they queue on the stack, not on the generator. A stack
//! that admits everything then answers callers who have gone: its goodput
//! collapses although it is busy.
//!
//! **Figures.** Goodput: 2xx answers per second that arrived during the
//! overload (the generator's one-second windows), and its ratio to the
//! reference capacity. 503s per second, the 2xx latency and the failures'
//! latency. A's and the Bs' resident memory (`/proc`) before the overload
//! and at most during it. The stack's CPU by process while the capacity was
//! measured and during the overload (`/proc`, % of one core): where the
//! capacity went. Recovered after: the first second of the recovery from
//! which every second has no error and a p99 within
//! [`RECOVERED_P99_FACTOR`]× the baseline's (and at least
//! [`RECOVERED_P99_SLACK_MS`] ms above it).

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use lab_common::config::LabConfig;
use serde::Serialize;
use tokio::time::Instant;

use super::process;
use crate::{
    launcher::Stack,
    load::{self, LiveWindow, LoadReport, LoadSpec, Percentiles, WindowStats},
};

/// What to measure.
#[derive(Debug, Clone)]
pub struct OverloadSpec {
    /// Each preset's name and config, in order; the first one's capacity
    /// is the reference load.
    pub presets: Vec<(String, LabConfig)>,
    /// The overload, as a multiple of the reference capacity.
    pub multiple: f64,
    /// Closed-loop connections for the warm-up and the capacity.
    pub concurrency: usize,
    pub warmup: Duration,
    pub capacity_duration: Duration,
    pub baseline_duration: Duration,
    pub duration: Duration,
    pub recovery: Duration,
    /// Open loop: requests in flight at most (past it, due requests are
    /// dropped and counted).
    pub max_in_flight: usize,
    /// The generator gives up on a request after this.
    pub timeout: Duration,
    /// Stack on CPU 0, generator on the others.
    pub pin: bool,
    pub path: String,
}

/// One preset's figures.
#[derive(Debug, Clone, Serialize)]
pub struct PresetResult {
    pub preset: String,
    /// Whether the stack ran on one CPU and the generator on the others…
    pub pinned: bool,
    /// …and the CPUs each process of the stack was allowed, as the kernel
    /// says (`Cpus_allowed_list` of `/proc/<pid>/status`).
    pub stack_cpus_allowed: BTreeMap<String, String>,
    /// This preset's own capacity: 2xx per second, closed loop.
    pub capacity_rps: f64,
    /// The load offered during the overload (multiple × the reference
    /// capacity) and what the generator managed to send.
    pub offered_rps: f64,
    pub sent_rps: f64,
    /// 2xx answers per second during the overload…
    pub goodput_rps: f64,
    /// …divided by the reference capacity.
    pub goodput_ratio: f64,
    /// 503 answers per second of the overload's schedule, as the generator
    /// counted them…
    pub answered_503_rps: f64,
    /// …and of those, the ones A shed itself (its `lab_http_shed_total`;
    /// the rest are B's refusals passed on). 0 under `deadline = ignore`.
    pub a_shed_rps: f64,
    /// Every failure of the overload run by kind (`503`, `504`, `timeout`,
    /// `dropped` …), whole run including its drain.
    pub errors: BTreeMap<String, u64>,
    /// Latency of the overload's 2xx answers and of its failures.
    pub ok_latency_ms: Option<Percentiles>,
    pub failed_latency_ms: Option<Percentiles>,
    /// The generator's p99 at half the reference capacity before the overload.
    pub baseline_p99_ms: f64,
    pub a_rss_before_mib: f64,
    pub a_rss_max_mib: f64,
    /// The Bs together.
    pub bs_rss_before_mib: f64,
    pub bs_rss_max_mib: f64,
    /// CPU of the stack's processes while the capacity was measured and
    /// during the overload, in % of one core: `service-a`, `service-b`
    /// (every B) and `other` (MySQL, etcd, HAProxy, partner-api). Pinned,
    /// they add up to at most 100.
    pub capacity_cpu_percent: BTreeMap<String, f64>,
    pub overload_cpu_percent: BTreeMap<String, f64>,
    /// Seconds into the recovery until latency was normal for good (`None`:
    /// not within the recovery).
    pub recovered_after_s: Option<f64>,
    /// Each second of the recovery: its p99 (ms) and its errors.
    pub recovery_p99_ms: Vec<Option<f64>>,
    pub recovery_errors: Vec<u64>,
}

/// A recovery second counts as normal when its p99 is at most this many
/// times the baseline's…
pub const RECOVERED_P99_FACTOR: f64 = 2.0;
/// …or this much above it, whichever is more: one second's p99 is the
/// 30-odd slowest of a few thousand requests, and on one shared core it
/// wanders by tens of milliseconds with no queue behind it (10–40 ms seen
/// after a 7 ms baseline), while a queue shows as hundreds.
pub const RECOVERED_P99_SLACK_MS: f64 = 50.0;

const MIB: f64 = 1024.0 * 1024.0;

/// Runs every preset; `progress` gets a line per step.
pub async fn run(
    spec: &OverloadSpec,
    mut progress: impl FnMut(&str),
) -> anyhow::Result<Vec<PresetResult>> {
    anyhow::ensure!(!spec.presets.is_empty(), "no preset to run");
    anyhow::ensure!(
        spec.multiple.is_finite() && spec.multiple > 0.0,
        "--multiple must be a positive number, got {}",
        spec.multiple
    );
    let cpus = pinning(spec.pin)?;
    let mut reference: Option<f64> = None;
    let mut results = Vec::new();
    for (preset, config) in &spec.presets {
        let dir = super::state_dir("overload", None);
        if let Some(cpus) = &cpus {
            // The stack's processes inherit the CPUs of the thread that
            // starts them, which may be any of this runtime's.
            pin_this_process(&cpus.stack)?;
        }
        let started = Instant::now();
        let stack = Stack::up(super::stack_options(config.clone(), &dir, 2))
            .await
            .with_context(|| format!("starting the {preset} stack for bench overload"))?;
        if let Some(cpus) = &cpus {
            pin_this_process(&cpus.generator)?;
        }
        progress(&format!(
            "{preset}: stack up in {:.1} s{}",
            started.elapsed().as_secs_f64(),
            match &cpus {
                Some(cpus) => format!(
                    " (stack on CPU {}, generator on CPU {})",
                    list(&cpus.stack),
                    list(&cpus.generator)
                ),
                None => String::new(),
            }
        ));
        let measured = measure(spec, &stack, preset, &mut reference, &mut progress).await;
        let mut stack = stack;
        stack.down().await?;
        let _ = std::fs::remove_dir_all(&dir);
        let result = measured?;
        progress(&format!(
            "{preset}: goodput {:.0} req/s ({:.2} of capacity), 503 {:.0}/s, recovered after {}",
            result.goodput_rps,
            result.goodput_ratio,
            result.answered_503_rps,
            result
                .recovered_after_s
                .map_or("—".to_string(), |s| format!("{s:.0} s"))
        ));
        results.push(result);
    }
    if let Some(cpus) = &cpus {
        pin_this_process(&cpus.all)?;
    }
    Ok(results)
}

async fn measure(
    spec: &OverloadSpec,
    stack: &Stack,
    preset: &str,
    reference: &mut Option<f64>,
    progress: &mut impl FnMut(&str),
) -> anyhow::Result<PresetResult> {
    let a_pid = stack.service("service-a")?.pid;
    let stack_cpus_allowed = stack
        .state
        .services
        .iter()
        .map(|s| (s.name.clone(), cpus_allowed(s.pid)))
        .collect();
    let b_pids: Vec<u32> = stack
        .state
        .services
        .iter()
        .filter(|s| s.name.starts_with("service-b-"))
        .map(|s| s.pid)
        .collect();
    let closed = |duration| {
        let mut load = LoadSpec::new(stack.a_url(), spec.path.clone());
        load.concurrency = spec.concurrency;
        load.duration = Some(duration);
        load.timeout = spec.timeout;
        load
    };
    load::run(&closed(spec.warmup), None).await?;
    let cpu = StackCpu::start(stack)?;
    let capacity_report = load::run(&closed(spec.capacity_duration), None).await?;
    let capacity_cpu_percent = cpu.percent();
    let capacity = capacity_report.ok as f64 / spec.capacity_duration.as_secs_f64();
    progress(&format!(
        "{preset}: capacity {capacity:.0} req/s (closed loop, {} connections, p99 {:.1} ms)",
        spec.concurrency, capacity_report.latency_ms.p99
    ));
    anyhow::ensure!(
        capacity > 0.0,
        "the {preset} stack answered no request with 2xx in {:?}: {:?}",
        spec.capacity_duration,
        capacity_report.errors
    );
    let reference = *reference.get_or_insert(capacity);
    let open = |rps: f64, duration, live: &Arc<LiveWindow>| {
        let mut load = LoadSpec::new(stack.a_url(), spec.path.clone());
        load.rps = Some(rps);
        load.concurrency = spec.concurrency;
        load.max_in_flight = spec.max_in_flight;
        load.duration = Some(duration);
        load.timeout = spec.timeout;
        load.live = Some(live.clone());
        load
    };

    let calm = reference / 2.0;
    let baseline = load::run(
        &open(calm, spec.baseline_duration, &Arc::new(LiveWindow::new())),
        None,
    )
    .await?;
    let baseline_p99 = baseline.latency_ms.p99;
    let a_before = process::usage(a_pid)?.rss_bytes;
    let bs_before = rss_sum(&b_pids)?;
    let a_admin = stack
        .service("service-a")?
        .admin_url
        .clone()
        .context("service-a has no admin URL")?;
    let a_shed_before = super::admin_sample(&a_admin, "lab_http_shed_total").await;

    // The overload, and the recovery starting when its schedule ends.
    let offered = spec.multiple * reference;
    progress(&format!(
        "{preset}: baseline p99 {baseline_p99:.1} ms at {calm:.0} req/s; offering {offered:.0} req/s for {:?}",
        spec.duration
    ));
    let overload_window = Arc::new(LiveWindow::new());
    let recovery_window = Arc::new(LiveWindow::new());
    let overload_spec = open(offered, spec.duration, &overload_window);
    let recovery_spec = open(calm, spec.recovery, &recovery_window);
    let overloading = tokio::spawn(async move { load::run(&overload_spec, None).await });
    let memory = MemoryWatch::start(a_pid, b_pids.clone());
    let cpu = StackCpu::start(stack)?;
    let (mut ok, mut elapsed) = (0, Duration::ZERO);
    let start = Instant::now();
    let mut tick = every_second(start);
    overload_window.take();
    while start.elapsed() < spec.duration {
        tick.tick().await;
        let second = overload_window.take();
        ok += second.ok;
        elapsed += second.elapsed;
    }
    let overload_cpu_percent = cpu.percent();
    let (a_max, bs_max) = memory.stop().await;
    let a_shed_after = super::admin_sample(&a_admin, "lab_http_shed_total").await;
    let recovering = tokio::spawn(async move { load::run(&recovery_spec, None).await });
    recovery_window.take();
    let mut recovery = Vec::new();
    let recovery_start = Instant::now();
    let mut tick = every_second(recovery_start);
    while recovery_start.elapsed() < spec.recovery {
        tick.tick().await;
        recovery.push(recovery_window.take());
    }
    let overload_report: LoadReport = overloading.await??;
    recovering.await??;

    let goodput_rps = ok as f64 / elapsed.as_secs_f64().max(1e-9);
    let a_shed = match (a_shed_before, a_shed_after) {
        (Some(before), Some(after)) => after - before,
        _ => f64::NAN,
    };
    let answered_503 = overload_report.errors.get("503").copied().unwrap_or(0);
    let answered_503_rps = answered_503 as f64 / spec.duration.as_secs_f64();
    let mut errors = overload_report.errors.clone();
    if overload_report.dropped > 0 {
        errors.insert("dropped".into(), overload_report.dropped);
    }
    Ok(PresetResult {
        preset: preset.to_string(),
        pinned: spec.pin,
        stack_cpus_allowed,
        capacity_rps: capacity,
        offered_rps: offered,
        sent_rps: overload_report.sent_rps.unwrap_or(f64::NAN),
        goodput_rps,
        goodput_ratio: goodput_rps / reference,
        answered_503_rps,
        a_shed_rps: a_shed / spec.duration.as_secs_f64(),
        errors,
        ok_latency_ms: overload_report.latency_ok_ms.clone(),
        failed_latency_ms: overload_report.latency_failed_ms.clone(),
        baseline_p99_ms: baseline_p99,
        a_rss_before_mib: a_before as f64 / MIB,
        a_rss_max_mib: a_max.max(a_before) as f64 / MIB,
        bs_rss_before_mib: bs_before as f64 / MIB,
        bs_rss_max_mib: bs_max.max(bs_before) as f64 / MIB,
        capacity_cpu_percent,
        overload_cpu_percent,
        recovered_after_s: recovered_after(&recovery, baseline_p99),
        recovery_p99_ms: recovery.iter().map(|s| s.p99_ms).collect(),
        recovery_errors: recovery.iter().map(|s| s.errors).collect(),
    })
}

/// The first second of `recovery` from which every second is normal (no
/// error, p99 within the bound), in seconds from the recovery's start;
/// `None` when its last second is not normal.
pub fn recovered_after(recovery: &[WindowStats], baseline_p99_ms: f64) -> Option<f64> {
    let bound =
        (baseline_p99_ms * RECOVERED_P99_FACTOR).max(baseline_p99_ms + RECOVERED_P99_SLACK_MS);
    let normal = |s: &WindowStats| s.errors == 0 && s.p99_ms.is_some_and(|p99| p99 <= bound);
    let last_abnormal = recovery.iter().rposition(|s| !normal(s));
    match last_abnormal {
        None if recovery.is_empty() => None,
        None => Some(0.0),
        Some(last) if last + 1 == recovery.len() => None,
        Some(last) => Some((last + 1) as f64),
    }
}

/// Ticks a second after `start` and every second after; a tick the busy
/// generator delays is taken late, not followed by a burst of short ones.
fn every_second(start: Instant) -> tokio::time::Interval {
    let mut tick = tokio::time::interval_at(start + Duration::from_secs(1), Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick
}

fn rss_sum(pids: &[u32]) -> anyhow::Result<u64> {
    let mut sum = 0;
    for &pid in pids {
        sum += process::usage(pid)?.rss_bytes;
    }
    Ok(sum)
}

/// The highest resident memory of A and of the Bs together, read every
/// 200 ms until stopped (a process that cannot be read is skipped).
struct MemoryWatch {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(u64, u64)>,
}

impl MemoryWatch {
    fn start(a_pid: u32, b_pids: Vec<u32>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let task = tokio::spawn(async move {
            let (mut a_max, mut bs_max) = (0, 0);
            let mut tick = tokio::time::interval(Duration::from_millis(200));
            while !stopped.load(Ordering::Relaxed) {
                tick.tick().await;
                if let Ok(a) = process::usage(a_pid) {
                    a_max = a_max.max(a.rss_bytes);
                }
                if let Ok(bs) = rss_sum(&b_pids) {
                    bs_max = bs_max.max(bs);
                }
            }
            (a_max, bs_max)
        });
        Self { stop, task }
    }

    async fn stop(self) -> (u64, u64) {
        self.stop.store(true, Ordering::Relaxed);
        self.task.await.unwrap_or((0, 0))
    }
}

/// CPU time of every process of the stack from `start` on, by group.
struct StackCpu {
    /// (group, pid, CPU seconds at the start)
    processes: Vec<(&'static str, u32, f64)>,
    started: Instant,
}

impl StackCpu {
    fn start(stack: &Stack) -> anyhow::Result<Self> {
        let mut processes = Vec::new();
        for service in &stack.state.services {
            let group = match service.name.as_str() {
                "service-a" => "service-a",
                name if name.starts_with("service-b-") => "service-b",
                _ => "other",
            };
            // A process already gone has nothing to count.
            if let Ok(usage) = process::usage(service.pid) {
                processes.push((group, service.pid, usage.cpu_seconds));
            }
        }
        Ok(Self {
            processes,
            started: Instant::now(),
        })
    }

    /// Each group's CPU since `start`, in % of one core (a process that died
    /// meanwhile is left out: its last reading is gone with it).
    fn percent(&self) -> BTreeMap<String, f64> {
        let wall = self.started.elapsed().as_secs_f64();
        let mut groups = BTreeMap::new();
        for &(group, pid, before) in &self.processes {
            if let Ok(now) = process::usage(pid) {
                let used = now.cpu_seconds - before;
                *groups.entry(group.to_string()).or_insert(0.0) += 100.0 * used / wall;
            }
        }
        groups
    }
}

/// Which CPUs the stack and the generator get.
struct Cpus {
    stack: Vec<usize>,
    generator: Vec<usize>,
    /// What this process had at the start, given back at the end.
    all: Vec<usize>,
}

/// The CPU split when pinning is asked for and this process may use at
/// least two CPUs: the first for the stack, the rest for the generator.
fn pinning(pin: bool) -> anyhow::Result<Option<Cpus>> {
    if !pin {
        return Ok(None);
    }
    let mask = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0))
        .context("reading this process's CPU affinity")?;
    let all: Vec<usize> = (0..nix::sched::CpuSet::count())
        .filter(|&cpu| mask.is_set(cpu).unwrap_or(false))
        .collect();
    anyhow::ensure!(
        all.len() >= 2,
        "--pin needs two CPUs and this process may use {}; pass --no-pin",
        all.len()
    );
    Ok(Some(Cpus {
        stack: all[..1].to_vec(),
        generator: all[1..].to_vec(),
        all,
    }))
}

/// Pins every thread of this process to `cpus`. The affinity is a thread's,
/// and a thread or child process inherits its creator's: the runtime's
/// threads already exist, so each is set; a thread started meanwhile by one
/// not yet set is caught by the next pass, until a pass finds none new.
fn pin_this_process(cpus: &[usize]) -> anyhow::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    for &cpu in cpus {
        set.set(cpu).with_context(|| format!("CPU {cpu}"))?;
    }
    let mut pinned = std::collections::BTreeSet::new();
    loop {
        let tasks =
            std::fs::read_dir("/proc/self/task").context("listing this process's threads")?;
        let mut new = 0;
        for task in tasks {
            let Some(tid) = task?
                .file_name()
                .to_str()
                .and_then(|name| name.parse::<i32>().ok())
            else {
                continue;
            };
            if !pinned.insert(tid) {
                continue;
            }
            new += 1;
            // A thread that ended since the listing is not an error.
            match nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(tid), &set) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("pinning thread {tid} to {cpus:?}"));
                }
            }
        }
        if new == 0 {
            return Ok(());
        }
    }
}

/// The CPUs `pid` may run on, as `/proc/<pid>/status` lists them (`0`,
/// `0-1`); `?` if it cannot be read.
fn cpus_allowed(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| Some(line.strip_prefix("Cpus_allowed_list:")?.trim().to_owned()))
        })
        .unwrap_or_else(|| "?".into())
}

fn list(cpus: &[usize]) -> String {
    cpus.iter()
        .map(usize::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// The table `labctl bench overload` prints.
pub fn table(results: &[PresetResult]) -> String {
    let mut out = format!(
        "{:<7} {:>9} {:>9} {:>9} {:>9} {:>6} {:>8} {:>10} {:>10} {:>12} {:>12} {:>10}   CPU % A/Bs/other: capacity → overload\n",
        "preset",
        "capacity",
        "offered",
        "sent",
        "goodput",
        "ratio",
        "503/s",
        "ok p99",
        "fail p99",
        "A RSS MiB",
        "Bs RSS MiB",
        "recovered"
    );
    let cpu = |shares: &BTreeMap<String, f64>| {
        ["service-a", "service-b", "other"]
            .map(|group| format!("{:.0}", shares.get(group).copied().unwrap_or(0.0)))
            .join("/")
    };
    for r in results {
        let p99 = |p: &Option<Percentiles>| {
            p.as_ref()
                .map_or("—".into(), |p| format!("{:.1} ms", p.p99))
        };
        out.push_str(&format!(
            "{:<7} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>6.2} {:>8.0} {:>10} {:>10} {:>12} {:>12} {:>10}   {} → {}\n",
            r.preset,
            r.capacity_rps,
            r.offered_rps,
            r.sent_rps,
            r.goodput_rps,
            r.goodput_ratio,
            r.answered_503_rps,
            p99(&r.ok_latency_ms),
            p99(&r.failed_latency_ms),
            format!("{:.0}→{:.0}", r.a_rss_before_mib, r.a_rss_max_mib),
            format!("{:.0}→{:.0}", r.bs_rss_before_mib, r.bs_rss_max_mib),
            r.recovered_after_s
                .map_or("not yet".into(), |s| format!("{s:.0} s")),
            cpu(&r.capacity_cpu_percent),
            cpu(&r.overload_cpu_percent),
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn second(p99_ms: Option<f64>, errors: u64) -> WindowStats {
        WindowStats {
            elapsed: Duration::from_secs(1),
            answered: 100,
            ok: 100 - errors,
            errors,
            dropped: 0,
            p50_ms: p99_ms.map(|p| p / 2.0),
            p99_ms,
            by_backend: BTreeMap::new(),
        }
    }

    #[test]
    fn recovery_is_the_first_second_from_which_every_second_is_normal() {
        // Baseline p99 100 ms: normal is up to 200 ms.
        let calm = second(Some(120.0), 0);
        let slow = second(Some(900.0), 0);
        let failing = second(Some(150.0), 3);
        assert_eq!(
            recovered_after(&[calm.clone(), calm.clone()], 100.0),
            Some(0.0)
        );
        assert_eq!(
            recovered_after(
                &[slow.clone(), failing.clone(), calm.clone(), calm.clone()],
                100.0
            ),
            Some(2.0)
        );
        // A relapse resets it: the normal seconds must last to the end.
        assert_eq!(
            recovered_after(
                &[slow.clone(), calm.clone(), slow.clone(), calm.clone()],
                100.0
            ),
            Some(3.0)
        );
        assert_eq!(recovered_after(&[calm.clone(), slow.clone()], 100.0), None);
        // A second with no answer at all is not normal.
        assert_eq!(recovered_after(&[second(None, 0)], 100.0), None);
        assert_eq!(recovered_after(&[], 100.0), None);
        // A 1 ms baseline gets the slack: 51 ms is normal, 52 ms is not.
        assert_eq!(recovered_after(&[second(Some(51.0), 0)], 1.0), Some(0.0));
        assert_eq!(recovered_after(&[second(Some(52.0), 0)], 1.0), None);
    }

    #[test]
    fn the_table_has_a_row_per_preset_with_its_figures() {
        let result = PresetResult {
            preset: "fixed".into(),
            pinned: true,
            stack_cpus_allowed: BTreeMap::new(),
            capacity_rps: 1000.0,
            offered_rps: 3000.0,
            sent_rps: 2990.0,
            goodput_rps: 900.0,
            goodput_ratio: 0.9,
            answered_503_rps: 2000.0,
            a_shed_rps: 1990.0,
            errors: BTreeMap::from([("503".into(), 60_000)]),
            ok_latency_ms: None,
            failed_latency_ms: None,
            baseline_p99_ms: 4.0,
            a_rss_before_mib: 14.0,
            a_rss_max_mib: 20.0,
            bs_rss_before_mib: 50.0,
            bs_rss_max_mib: 52.0,
            capacity_cpu_percent: BTreeMap::from([
                ("service-a".into(), 30.0),
                ("service-b".into(), 40.0),
                ("other".into(), 25.0),
            ]),
            overload_cpu_percent: BTreeMap::from([("service-a".into(), 61.0)]),
            recovered_after_s: Some(1.0),
            recovery_p99_ms: vec![],
            recovery_errors: vec![],
        };
        let table = table(&[result]);
        let row = table.lines().nth(1).unwrap();
        let cells: Vec<&str> = row.split_whitespace().collect();
        assert_eq!(
            cells,
            [
                "fixed", "1000", "3000", "2990", "900", "0.90", "2000", "—", "—", "14→20", "50→52",
                "1", "s", "30/40/25", "→", "61/0/0"
            ]
        );
    }
}
