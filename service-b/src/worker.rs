//! Cause 2 — the job worker over MySQL rows (`faults.worker`), its three
//! forms side by side.
//!
//! * [`unbounded`] — the incident's loop, translated faithfully: every tick,
//!   read a batch of pending rows (without claiming them) and spawn one task
//!   per row, no limit. The handler's CPU work runs inline on the runtime
//!   threads, as goroutines ran on the Go scheduler, so it competes with
//!   request serving. When a tick's work takes longer than a tick, the same
//!   still-pending rows are read and started again: tasks pile up, the
//!   runtime starves, everything slows further — the feedback loop.
//! * [`capped`] — the team's patch: skip the tick and sleep 3 s while more
//!   than `cap` tasks run. It still spawns a whole batch after the check (so
//!   the count overshoots by up to a batch) and still re-reads rows in
//!   flight (so jobs still run twice).
//! * [`bounded`] — the fix: a fixed pool; each tick claims only as many rows
//!   as there are free slots, atomically (`FOR UPDATE SKIP LOCKED`, then
//!   marked running), so no two Bs ever hold the same job; a claim older
//!   than the visibility timeout is taken back (a crashed B loses nothing);
//!   per-job timeout; bounded retries with exponential backoff and jitter; an
//!   undecodable row is dead-lettered at once (with `rows = "close"`). Its
//!   CPU work runs on a small pool of low-priority threads, so request
//!   serving keeps the CPU it needs.
//!
//! Every form reads its rows through [`crate::rows`] (cause 4b) and ends
//! each job with a call to partner-api through [`crate::http_client`]
//! (cause 4a).
//!
//! The switch is live: [`run`] runs one loop in the current form and
//! replaces it when `PUT /faults` flips `worker`. The old loop stops
//! fetching and claiming at once (it finishes the fetch or claim it is in,
//! starting tasks for the rows it already holds, and reads nothing more;
//! the new loop starts when that step ends — bounded by the query timeouts,
//! except a wait for a pooled connection under `deadline = "ignore"`);
//! the job tasks it started run to their end — a Go goroutine could not be
//! recalled either, and cutting a job mid-way would leave its row half
//! done. Until they end, the new loop does not start any job they hold:
//! `bounded` leaves those rows out of its claim (under `unbounded` and
//! `capped` rows stay `pending` while they run, so a claim would otherwise
//! take them), `unbounded` and `capped` skip them when they read a batch.
//! So a flip never runs a job twice; `unbounded` and `capped` still re-run
//! their *own* rows in flight — that is their bug. `bounded` builds a new
//! pool on each start (tasks of an older `bounded` loop keep their slots of
//! the old one), and `capped` counts every task alive, the old loop's too.
//! Rows a `bounded` loop claimed but never started (its read of them
//! failed) wait, as ever, for a `bounded` loop — here or on another B — to
//! take them back after `worker.visibility_timeout`.
//! The claim names the held jobs one by one, so while more than
//! [`CLAIM_SKIP_MAX`] of them still run — the pile-up a flip from
//! `unbounded` is meant to cure — `bounded` claims nothing (see
//! [`plan_claim`]); `lab_worker_claims_deferred_total` counts those ticks.
//! `lab_worker_loops_running`, `lab_worker_loops_started_total{mode}` and
//! `lab_worker_old_loop_tasks_alive` show the replacement.

use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    sync::{
        Arc, Mutex, MutexGuard, OnceLock, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lab_common::config::{Faults, SwitchValue, WorkerConfig, WorkerMode};
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};
use tokio::sync::{Semaphore, watch};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use lab_common::metrics::Registrar;

use crate::{
    db::{CLAIM_SKIP_MAX, Db},
    http_client::PartnerClient,
    rows::{BadRow, Batch, JobRows, JobTask},
};

/// Worker metrics (docs/architecture.md, "Metrics").
#[derive(Clone)]
pub struct WorkerMetrics {
    pub tasks_alive: IntGauge,
    pub tasks_spawned: IntCounter,
    pub jobs: IntCounterVec,
    pub duplicates: IntCounter,
    pub job_lag: HistogramVec,
    pub loops_running: IntGauge,
    pub loops_started: IntCounterVec,
    pub old_loop_tasks: IntGauge,
    pub claims_deferred: IntCounter,
    /// A drill: the `mode` labels read `hidden`, since the worker's form is
    /// the answer.
    hide_mode: bool,
}

impl WorkerMetrics {
    pub fn register(registry: &Registry, hide_mode: bool) -> prometheus::Result<Self> {
        let r = Registrar(registry);
        let jobs = r.int_counter_vec(
            "lab_jobs_total",
            "Job attempts finished, by outcome (done, retry, failed, dead, lost).",
            &["outcome"],
        )?;
        // Every outcome exported from the start, at 0: a reader (a
        // dashboard's rate(), a scenario's sampler) then sees "none yet"
        // rather than a metric that does not exist.
        for outcome in ["done", "retry", "failed", "dead", "lost"] {
            jobs.with_label_values(&[outcome]);
        }
        Ok(Self {
            tasks_alive: r.int_gauge(
                "lab_worker_tasks_alive",
                "Job tasks currently alive in this B.",
            )?,
            tasks_spawned: r.int_counter("lab_worker_tasks_spawned_total", "Job tasks started.")?,
            jobs,
            duplicates: r.int_counter(
                "lab_jobs_duplicate_total",
                "Job attempts started while another attempt of the same job was still running here.",
            )?,
            job_lag: r.latency_histogram_vec(
                "lab_job_lag_seconds",
                "Time from a job's creation to an attempt picking it up.",
                &["mode"],
            )?,
            loops_running: r.int_gauge(
                "lab_worker_loops_running",
                "Worker loops fetching or claiming jobs now: 1 while the worker runs (a flip of faults.worker replaces the loop, never adds one).",
            )?,
            loops_started: r.int_counter_vec(
                "lab_worker_loops_started_total",
                "Worker loops started, by mode: one at start, one more per flip of faults.worker.",
                &["mode"],
            )?,
            old_loop_tasks: r.int_gauge(
                "lab_worker_old_loop_tasks_alive",
                "Job tasks still alive that a loop replaced by a flip of faults.worker started (part of lab_worker_tasks_alive).",
            )?,
            claims_deferred: r.int_counter(
                "lab_worker_claims_deferred_total",
                "Ticks the bounded loop claimed nothing because more jobs than its claim can leave out (1000) still ran in tasks of a loop a flip replaced.",
            )?,
            hide_mode,
        })
    }

    /// The `mode` label for the worker form `mode`.
    fn mode_label(&self, mode: &'static str) -> &'static str {
        if self.hide_mode { "hidden" } else { mode }
    }

    /// Whether the worker's form is hidden (a drill).
    fn hidden(&self) -> bool {
        self.hide_mode
    }
}

/// What every job task shares.
struct Shared {
    db: Db,
    rows: Arc<JobRows>,
    partner: Arc<PartnerClient>,
    instance: Arc<str>,
    config: WorkerConfig,
    metrics: WorkerMetrics,
    /// Job ids with an attempt running in this process (duplicate detection).
    running: Mutex<HashSet<i64>>,
    /// Low-priority threads for `bounded`'s CPU work, built when a
    /// `bounded` loop first starts.
    cpu_pool: OnceLock<Option<rayon::ThreadPool>>,
    /// The tasks of the loop running now.
    current_loop: Mutex<Arc<LoopTasks>>,
    /// Loops a flip replaced, while some of their tasks still run.
    old_loops: Mutex<Vec<Arc<LoopTasks>>>,
}

impl Shared {
    fn current_loop(&self) -> Arc<LoopTasks> {
        lock(&self.current_loop).clone()
    }

    /// After a flip: the tasks of the loop that stopped become old-loop
    /// tasks, and the next loop starts with none.
    fn replace_loop(&self) {
        let old = std::mem::take(&mut *lock(&self.current_loop));
        let alive = old.mark_replaced();
        self.metrics.old_loop_tasks.add(alive);
        if alive > 0 {
            lock(&self.old_loops).push(old);
        }
    }

    /// Jobs that tasks of replaced loops still run: the current loop must
    /// not start them again.
    fn held_by_old_loops(&self) -> HashSet<i64> {
        let mut old_loops = lock(&self.old_loops);
        old_loops.retain(|l| !l.is_empty());
        old_loops.iter().flat_map(|l| l.jobs()).collect()
    }
}

/// The job tasks one loop started that are still alive.
#[derive(Default)]
struct LoopTasks(Mutex<LoopState>);

#[derive(Default)]
struct LoopState {
    /// Job id → tasks of this loop running it (more than one: a duplicate).
    jobs: HashMap<i64, i64>,
    /// A flip replaced the loop.
    replaced: bool,
}

impl LoopTasks {
    fn hold(&self, job: i64) {
        *lock(&self.0).jobs.entry(job).or_default() += 1;
    }

    /// One task ended; returns whether its loop was already replaced.
    fn release(&self, job: i64) -> bool {
        let mut state = lock(&self.0);
        if let Some(n) = state.jobs.get_mut(&job) {
            *n -= 1;
            if *n <= 0 {
                state.jobs.remove(&job);
            }
        }
        state.replaced
    }

    /// Marks the loop replaced; returns its tasks still alive.
    fn mark_replaced(&self) -> i64 {
        let mut state = lock(&self.0);
        state.replaced = true;
        state.jobs.values().sum()
    }

    fn is_empty(&self) -> bool {
        lock(&self.0).jobs.is_empty()
    }

    fn jobs(&self) -> Vec<i64> {
        lock(&self.0).jobs.keys().copied().collect()
    }
}

/// Nothing panics while holding these locks; a poisoned one is still
/// consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Keeps the alive counts and the running set true however a task ends.
struct TaskGuard {
    shared: Arc<Shared>,
    /// The loop that started the task.
    owner: Arc<LoopTasks>,
    job: i64,
    duplicate: bool,
}

impl TaskGuard {
    fn start(shared: &Arc<Shared>, job: i64) -> Self {
        let owner = shared.current_loop();
        owner.hold(job);
        shared.metrics.tasks_alive.inc();
        shared.metrics.tasks_spawned.inc();
        let duplicate = !lock(&shared.running).insert(job);
        if duplicate {
            shared.metrics.duplicates.inc();
        }
        Self {
            shared: shared.clone(),
            owner,
            job,
            duplicate,
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.shared.metrics.tasks_alive.dec();
        if self.owner.release(self.job) {
            self.shared.metrics.old_loop_tasks.dec();
        }
        if !self.duplicate {
            lock(&self.shared.running).remove(&self.job);
        }
    }
}

/// What the worker works with.
pub struct Deps {
    pub db: Db,
    pub rows: Arc<JobRows>,
    pub partner: Arc<PartnerClient>,
    pub instance: Arc<str>,
    pub metrics: WorkerMetrics,
}

/// Runs the worker until `shutdown`: a loop in the form `faults` says now,
/// replaced by one in the new form each time the `worker` switch flips (see
/// the module comment for what happens to the old loop's jobs).
pub async fn run(
    mut faults: watch::Receiver<Faults>,
    config: WorkerConfig,
    deps: Deps,
    shutdown: CancellationToken,
) {
    let Deps {
        db,
        rows,
        partner,
        instance,
        metrics,
    } = deps;
    let shared = Arc::new(Shared {
        db,
        rows,
        partner,
        instance,
        config,
        metrics,
        running: Mutex::new(HashSet::new()),
        cpu_pool: OnceLock::new(),
        current_loop: Mutex::default(),
        old_loops: Mutex::default(),
    });
    loop {
        let mode = faults.borrow_and_update().worker;
        let stop = shutdown.child_token();
        shared.metrics.loops_running.inc();
        shared
            .metrics
            .loops_started
            .with_label_values(&[shared.metrics.mode_label(mode.as_str())])
            .inc();
        if shared.metrics.hidden() {
            tracing::info!("job worker loop started");
        } else {
            tracing::info!(?mode, "job worker loop started");
        }
        let work = run_loop(mode, shared.clone(), stop.clone());
        tokio::pin!(work);
        let flipped = tokio::select! {
            () = &mut work => false,
            () = worker_flipped(&mut faults, mode) => true,
        };
        if flipped {
            // Finishes the fetch or claim it is in, then reads no more.
            stop.cancel();
            work.await;
        }
        shared.metrics.loops_running.dec();
        if !flipped || shutdown.is_cancelled() {
            return;
        }
        shared.replace_loop();
        if shared.metrics.hidden() {
            tracing::info!("job worker loop stopped by a flip; its tasks run to their end");
        } else {
            tracing::info!(from = ?mode, "job worker loop stopped by a flip; its tasks run to their end");
        }
    }
}

/// Returns once the `worker` switch is no longer `from` (never, if the
/// switches can no longer change).
async fn worker_flipped(faults: &mut watch::Receiver<Faults>, from: WorkerMode) {
    if faults.wait_for(|f| f.worker != from).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// One loop in `mode`, until `stop`.
async fn run_loop(mode: WorkerMode, shared: Arc<Shared>, stop: CancellationToken) {
    match mode {
        WorkerMode::Unbounded => unbounded(shared, stop).await,
        WorkerMode::Capped => capped(shared, stop).await,
        WorkerMode::Bounded => {
            shared
                .cpu_pool
                .get_or_init(|| low_priority_pool(&shared.config));
            bounded(shared, stop).await
        }
    }
}

/// Sleeps `d` unless the loop is stopped first; false when stopped.
async fn pause(d: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        biased;
        _ = stop.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// The incident: fetch a batch every tick, one task per row, no limit.
async fn unbounded(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        spawn_pending_batch(&shared, "unbounded").await;
        if !pause(shared.config.tick, &stop).await {
            return;
        }
    }
}

/// One tick of `unbounded` / `capped`: read pending rows (unclaimed) and
/// start a task for each as it is decoded — except rows a replaced loop's
/// tasks still run.
async fn spawn_pending_batch(shared: &Arc<Shared>, mode: &'static str) {
    let batch = Batch::Pending(shared.config.batch);
    let held_by_old_loops = shared.held_by_old_loops();
    let streamed = shared
        .rows
        .stream(&shared.db, &batch, |job| {
            if held_by_old_loops.contains(&job.id) {
                return;
            }
            // Counted at spawn, not when first polled: on a starved runtime,
            // spawned-but-waiting tasks are the pile-up.
            let guard = TaskGuard::start(shared, job.id);
            let shared = shared.clone();
            lab_common::tasks::spawn("worker.job", async move {
                attempt_unclaimed(shared, job, guard, mode).await
            });
        })
        .await;
    match streamed {
        Ok(bad) => dead_letter(shared, bad, false).await,
        Err(e) => tracing::warn!(error = %e, "fetching pending jobs failed"),
    }
}

/// Writes rows that did not decode as `dead`, with the reason (`rows =
/// "close"`). `fenced`: only while this claim still holds the row.
async fn dead_letter(shared: &Shared, bad: Vec<BadRow>, fenced: bool) {
    for row in bad {
        let fence = fenced.then_some(row.attempts);
        record(shared, row.id, fence, Outcome::Dead(row.reason)).await;
    }
}

/// The team's patch: the same loop, skipped while more than `cap` run.
async fn capped(shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        // The patch's counter is the alive-tasks gauge itself.
        let running = shared.metrics.tasks_alive.get();
        if running > i64::from(shared.config.cap) {
            // "if more than 200 running, sleep 3 s" — and then fetch a whole
            // batch again, whatever the count is by then.
            if !pause(shared.config.cap_sleep, &stop).await {
                return;
            }
            continue;
        }
        spawn_pending_batch(&shared, "capped").await;
        if !pause(shared.config.tick, &stop).await {
            return;
        }
    }
}

/// One attempt of an unclaimed row (`unbounded` / `capped`): CPU inline on
/// the runtime, no timeout, the row written at the end.
async fn attempt_unclaimed(
    shared: Arc<Shared>,
    row: JobTask,
    _guard: TaskGuard,
    mode: &'static str,
) {
    shared
        .metrics
        .job_lag
        .with_label_values(&[shared.metrics.mode_label(mode)])
        .observe(row.age_us.max(0) as f64 / 1e6);
    if let Err(e) = shared.db.start_attempt(row.id, &shared.instance).await {
        tracing::warn!(job = row.id, error = %e, "recording the attempt failed");
    }
    let outcome = handle(&shared, &row.payload, Cpu::Inline)
        .instrument(row.span())
        .await;
    record(&shared, row.id, None, outcome).await;
}

/// The fix: a fixed pool fed by atomic claims, only as many as fit.
async fn bounded(shared: Arc<Shared>, stop: CancellationToken) {
    let slots = Arc::new(Semaphore::new(shared.config.pool_size as usize));
    // Ticks in a row deferred so far: one warning per streak, not per tick.
    let mut deferred_streak: u64 = 0;
    let mut claim_expires = Instant::now();
    loop {
        // Backpressure: wait for a free slot before reading anything.
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let free = 1 + slots.available_permits() as u32;
        let ids = match plan_claim(shared.held_by_old_loops()) {
            ClaimPlan::Defer { held } => {
                shared.metrics.claims_deferred.inc();
                if deferred_streak == 0 {
                    tracing::warn!(
                        held,
                        max = CLAIM_SKIP_MAX,
                        "claiming deferred: too many jobs still run in tasks of the loop a flip replaced"
                    );
                }
                deferred_streak += 1;
                Vec::new()
            }
            ClaimPlan::Claim { skip } => {
                // The claim is this loop's until `visibility_timeout` from
                // (at the latest) now.
                claim_expires = Instant::now() + shared.config.visibility_timeout;
                if deferred_streak > 0 {
                    tracing::info!(
                        ticks = deferred_streak,
                        held = skip.len(),
                        "claiming resumed: the replaced loop's tasks are few enough to leave out"
                    );
                    deferred_streak = 0;
                }
                match shared
                    .db
                    .claim(
                        free,
                        &shared.instance,
                        shared.config.visibility_timeout,
                        shared.config.max_attempts,
                        &skip,
                    )
                    .await
                {
                    Ok(ids) => ids,
                    Err(e) => {
                        tracing::warn!(error = %e, "claiming jobs failed");
                        Vec::new()
                    }
                }
            }
        };
        if ids.is_empty() {
            drop(first);
            if !pause(shared.config.tick, &stop).await {
                return;
            }
            continue;
        }
        let mut first = Some(first);
        let streamed = shared
            .rows
            .stream(&shared.db, &Batch::Claimed(ids), |job| {
                let permit = match first.take() {
                    Some(p) => p,
                    None => match slots.clone().try_acquire_owned() {
                        Ok(p) => p,
                        // Cannot happen: we claimed no more than were free.
                        Err(_) => return,
                    },
                };
                let guard = TaskGuard::start(&shared, job.id);
                let shared = shared.clone();
                lab_common::tasks::spawn("worker.job", async move {
                    let _slot = permit;
                    attempt_claimed(shared, job, guard, claim_expires).await;
                });
            })
            .await;
        match streamed {
            Ok(bad) => dead_letter(&shared, bad, true).await,
            // Claimed rows not started are taken back after the visibility
            // timeout.
            Err(e) => tracing::warn!(error = %e, "reading claimed jobs failed"),
        }
    }
}

/// What a `bounded` tick does about the jobs replaced loops still run.
#[derive(Debug, PartialEq, Eq)]
enum ClaimPlan {
    /// Claim, leaving these jobs out.
    Claim { skip: Vec<i64> },
    /// Claim nothing this tick: `held` jobs are too many to leave out.
    Defer { held: usize },
}

/// Each held job is one bind in the claim's `NOT IN (…)`, so the list needs
/// a bound ([`CLAIM_SKIP_MAX`]); above it the tick claims nothing.
///
/// Deferring was chosen over the other cure — marking the held rows
/// `running` under this B at flip time, in chunks, so the claim skips them
/// without a list — because such a mark is a claim no attempt holds: an
/// old `unbounded` task on a starved runtime can outlive
/// `worker.visibility_timeout`, and then a `bounded` loop (here or on
/// another B) takes its row back as abandoned and runs the job a second
/// time, which is what the skip list exists to prevent; and the mark is a
/// burst of writes at the very moment B is overloaded. Deferring writes
/// nothing, and it is the right backpressure too: thousands of old tasks
/// are the pile-up eating the CPU, and new jobs would only compete with
/// them. Claiming resumes once they drain to the bound; other Bs go on
/// claiming meanwhile.
fn plan_claim(held: HashSet<i64>) -> ClaimPlan {
    if held.len() > CLAIM_SKIP_MAX {
        ClaimPlan::Defer { held: held.len() }
    } else {
        ClaimPlan::Claim {
            skip: held.into_iter().collect(),
        }
    }
}

/// One attempt of a claimed job (`bounded`): time-limited, fenced by the
/// attempt number, retried or failed on error.
async fn attempt_claimed(
    shared: Arc<Shared>,
    job: JobTask,
    _guard: TaskGuard,
    claim_expires: Instant,
) {
    shared
        .metrics
        .job_lag
        .with_label_values(&[shared.metrics.mode_label("bounded")])
        .observe(job.age_us.max(0) as f64 / 1e6);
    let outcome = match tokio::time::timeout(
        shared.config.job_timeout,
        handle(&shared, &job.payload, Cpu::Pool).instrument(job.span()),
    )
    .await
    {
        Ok(outcome) => outcome,
        Err(_) => Outcome::Failed(format!(
            "timed out after {:?} (worker.job_timeout)",
            shared.config.job_timeout
        )),
    };
    let outcome = match outcome {
        Outcome::Failed(reason) if job.attempts < shared.config.max_attempts => {
            Outcome::Retry(reason, backoff(shared.config.retry_backoff, job.attempts))
        }
        other => other,
    };
    record_claimed(&shared, job.id, job.attempts, outcome, claim_expires).await;
}

/// Writes a claimed job's outcome, again and again while MySQL cannot take
/// it, until the claim expires. Giving up sooner would leave the row
/// `running` until some B takes it back as abandoned and runs the job a
/// second time, so a database outage shorter than the claim costs no job
/// a second run. The worker slot stays taken meanwhile, which is the
/// backpressure wanted: no new claim could be written either. Past expiry
/// the attempt fence decides, as for any late attempt.
async fn record_claimed(
    shared: &Shared,
    id: i64,
    fence: u32,
    outcome: Outcome,
    claim_expires: Instant,
) {
    let mut pause = RECORD_RETRY_FIRST;
    let mut failures = 0u32;
    loop {
        let error = match try_record(shared, id, Some(fence), &outcome).await {
            Ok(()) => {
                if failures > 0 {
                    tracing::info!(
                        job = id,
                        failures,
                        "job outcome written after MySQL came back"
                    );
                }
                return;
            }
            Err(e) => e,
        };
        failures += 1;
        if Instant::now() + pause >= claim_expires {
            tracing::warn!(job = id, failures, error = %error, "writing the job outcome failed until its claim expired");
            return;
        }
        if failures == 1 {
            tracing::warn!(job = id, error = %error, "writing the job outcome failed; retrying until the claim expires");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(RECORD_RETRY_MAX);
    }
}

/// The pauses between attempts to write a claimed job's outcome: doubling
/// from the first to the most.
const RECORD_RETRY_FIRST: Duration = Duration::from_millis(100);
const RECORD_RETRY_MAX: Duration = Duration::from_secs(2);

/// Exponential backoff with ±50 % jitter: `base × 2^(attempt−1)`, at most a
/// minute after the jitter, so failing jobs do not retry in lockstep against
/// a partner that is down.
fn backoff(base: Duration, attempt: u32) -> Duration {
    let exponential = base.saturating_mul(1 << attempt.saturating_sub(1).min(16));
    let jittered = exponential.mul_f64(rand::random_range(0.5..1.5));
    jittered.min(Duration::from_secs(60))
}

/// What one attempt came to.
#[derive(Debug)]
enum Outcome {
    Done(String),
    /// Failed; may be retried.
    Failed(String),
    /// Failed, to be retried after the backoff (bounded only).
    Retry(String, Duration),
    /// The row cannot be decoded: never retried.
    Dead(String),
}

/// Writes a job's outcome once: the incident's loops (`unbounded` /
/// `capped`) did not retry it, and a dead letter not written now is
/// written when the row comes round again.
async fn record(shared: &Shared, id: i64, fence: Option<u32>, outcome: Outcome) {
    if let Err(e) = try_record(shared, id, fence, &outcome).await {
        tracing::warn!(job = id, error = %e, "writing the job outcome failed");
    }
}

/// Writes a job's outcome and counts it.
async fn try_record(
    shared: &Shared,
    id: i64,
    fence: Option<u32>,
    outcome: &Outcome,
) -> Result<(), crate::db::DbError> {
    let (status, label, result, error, retry_after) = match outcome {
        Outcome::Done(r) => ("done", "done", Some(r.as_str()), None, None),
        Outcome::Retry(e, after) => ("pending", "retry", None, Some(e.as_str()), Some(*after)),
        Outcome::Failed(e) => ("failed", "failed", None, Some(e.as_str()), None),
        Outcome::Dead(e) => ("dead", "dead", None, Some(e.as_str()), None),
    };
    let written = shared
        .db
        .finish_job(id, fence, status, result, error, retry_after)
        .await?;
    if written {
        shared.metrics.jobs.with_label_values(&[label]).inc();
    } else {
        // Our claim was taken back (we were too slow); the new owner decides.
        shared.metrics.jobs.with_label_values(&["lost"]).inc();
    }
    Ok(())
}

/// Where the handler's CPU work runs.
#[derive(Debug, Clone, Copy)]
enum Cpu {
    /// On the async runtime's own threads (the incident's behaviour).
    Inline,
    /// On the worker's low-priority thread pool.
    Pool,
}

/// The job handler: CPU work proportional to the payload, then the call to
/// partner-api (the caller writes the row).
async fn handle(shared: &Shared, payload: &str, cpu: Cpu) -> Outcome {
    let budget = shared
        .config
        .cpu_per_kib
        .mul_f64(payload.len() as f64 / 1024.0);
    let digest = match (cpu, shared.cpu_pool.get().and_then(Option::as_ref)) {
        (Cpu::Pool, Some(pool)) => {
            // If this attempt is abandoned (job timeout), the flag stops the
            // CPU work too, so the pool never does work nobody waits for.
            let abandon = AbandonOnDrop(Arc::new(AtomicBool::new(false)));
            let stop = abandon.0.clone();
            let text = payload.to_owned();
            let (tx, rx) = tokio::sync::oneshot::channel();
            pool.spawn(move || {
                let _ = tx.send(burn_cpu(text.as_bytes(), budget, &stop));
            });
            let digest = match rx.await {
                Ok(d) => d,
                Err(_) => return Outcome::Failed("CPU pool dropped the job".into()),
            };
            drop(abandon);
            digest
        }
        _ => burn_cpu(payload.as_bytes(), budget, &AtomicBool::new(false)),
    };
    match shared.partner.enrich(payload).await {
        Ok(enrichment) => Outcome::Done(format!("digest {digest:016x}, {enrichment}")),
        Err(e) => Outcome::Failed(e.to_string()),
    }
}

/// Sets its flag when dropped.
struct AbandonOnDrop(Arc<AtomicBool>);

impl Drop for AbandonOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Real CPU work — repeated hashing of the payload — for `budget` of time,
/// or until `stop` is set. Never inlined, so CPU profiles name it.
#[inline(never)]
pub fn burn_cpu(data: &[u8], budget: Duration, stop: &AtomicBool) -> u64 {
    let started = Instant::now();
    let mut hasher = DefaultHasher::new();
    loop {
        data.hash(&mut hasher);
        let digest = hasher.finish();
        if started.elapsed() >= budget || stop.load(Ordering::Relaxed) {
            return digest;
        }
        digest.hash(&mut hasher);
    }
}

/// A pool of low-priority (nice 10) threads, at most one per core, for the
/// bounded worker's CPU work: the OS then gives request-serving threads the
/// CPU first. `None` (CPU work inline) if the pool cannot be built.
fn low_priority_pool(config: &WorkerConfig) -> Option<rayon::ThreadPool> {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = (config.pool_size as usize).min(cores).max(1);
    rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("job-cpu-{i}"))
        .start_handler(|_| lower_thread_priority(10))
        .build()
        .map_err(|e| tracing::warn!(error = %e, "no CPU pool; job CPU work runs inline"))
        .ok()
}

/// Raises the calling thread's nice value (Linux: per thread).
fn lower_thread_priority(nice: i32) {
    // SAFETY: setpriority only reads its integer arguments; `who = 0` is
    // the calling thread on Linux. Neither nix nor the standard library
    // wraps it, hence the one unsafe call in this crate.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, nice) };
    if rc != 0 {
        tracing::debug!("could not lower the CPU pool's priority");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replaced_loop_counts_and_names_its_tasks_until_they_end() {
        let tasks = LoopTasks::default();
        tasks.hold(7);
        tasks.hold(7); // a duplicate start of job 7
        tasks.hold(8);
        assert!(!tasks.release(8), "not replaced yet");
        assert_eq!(tasks.mark_replaced(), 2, "two tasks still alive");
        assert_eq!(
            tasks.jobs(),
            vec![7],
            "the job the next loop must not start"
        );
        assert!(tasks.release(7), "an old-loop task ended");
        assert_eq!(tasks.jobs(), vec![7], "still held by the other task");
        assert!(tasks.release(7));
        assert!(tasks.is_empty());
    }

    #[test]
    fn a_claim_leaves_out_at_most_claim_skip_max_jobs_and_defers_above() {
        let ids = |n: usize| (0..n as i64).collect::<HashSet<i64>>();
        assert_eq!(plan_claim(ids(0)), ClaimPlan::Claim { skip: vec![] });
        match plan_claim(ids(CLAIM_SKIP_MAX)) {
            ClaimPlan::Claim { mut skip } => {
                skip.sort_unstable();
                assert_eq!(skip, (0..CLAIM_SKIP_MAX as i64).collect::<Vec<_>>());
            }
            other => panic!("{CLAIM_SKIP_MAX} held jobs still fit the claim: {other:?}"),
        }
        // The pile-up a flip from `unbounded` inherits: past the bound, and
        // past MySQL's 65,535 placeholders.
        for held in [CLAIM_SKIP_MAX + 1, 70_000] {
            let plan = plan_claim(ids(held));
            assert!(
                plan == ClaimPlan::Defer { held },
                "{held} held jobs must defer the claim, not become {held} binds"
            );
        }
    }

    #[test]
    fn backoff_doubles_with_jitter_and_is_capped() {
        let base = Duration::from_millis(100);
        for _ in 0..50 {
            let first = backoff(base, 1);
            assert!(first >= Duration::from_millis(50) && first <= Duration::from_millis(150));
            let third = backoff(base, 3);
            assert!(third >= Duration::from_millis(200) && third <= Duration::from_millis(600));
            assert!(backoff(base, 40) <= Duration::from_secs(60));
        }
    }

    #[test]
    fn burn_cpu_takes_its_budget_and_depends_on_the_data() {
        let started = Instant::now();
        let go = AtomicBool::new(false);
        let a = burn_cpu(b"abc", Duration::from_millis(20), &go);
        assert!(started.elapsed() >= Duration::from_millis(20));
        let b = burn_cpu(b"abd", Duration::ZERO, &go);
        let c = burn_cpu(b"abd", Duration::ZERO, &go);
        assert_eq!(b, c);
        assert_ne!(a, 0);
        let started = Instant::now();
        burn_cpu(b"abc", Duration::from_secs(60), &AtomicBool::new(true));
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "a stop flag ends it"
        );
    }
}
