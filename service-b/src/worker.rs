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

use std::{
    collections::HashSet,
    hash::{DefaultHasher, Hash, Hasher},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lab_common::config::{WorkerConfig, WorkerMode};
use prometheus::{HistogramVec, IntCounter, IntCounterVec, IntGauge, Registry};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use lab_common::metrics::Registrar;

use crate::{
    db::Db,
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
}

impl WorkerMetrics {
    pub fn register(registry: &Registry) -> prometheus::Result<Self> {
        let r = Registrar(registry);
        Ok(Self {
            tasks_alive: r.int_gauge(
                "lab_worker_tasks_alive",
                "Job tasks currently alive in this B.",
            )?,
            tasks_spawned: r.int_counter("lab_worker_tasks_spawned_total", "Job tasks started.")?,
            jobs: r.int_counter_vec(
                "lab_jobs_total",
                "Job attempts finished, by outcome (done, retry, failed, dead, timeout, lost).",
                &["outcome"],
            )?,
            duplicates: r.int_counter(
                "lab_jobs_duplicate_total",
                "Job attempts started while another attempt of the same job was still running here.",
            )?,
            job_lag: r.latency_histogram_vec(
                "lab_job_lag_seconds",
                "Time from a job's creation to an attempt picking it up.",
                &["mode"],
            )?,
        })
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
    /// Low-priority threads for `bounded`'s CPU work.
    cpu_pool: Option<rayon::ThreadPool>,
}

/// Keeps the alive counts and the running set true however a task ends.
struct TaskGuard {
    shared: Arc<Shared>,
    job: i64,
    duplicate: bool,
}

impl TaskGuard {
    fn start(shared: &Arc<Shared>, job: i64) -> Self {
        shared.metrics.tasks_alive.inc();
        shared.metrics.tasks_spawned.inc();
        let duplicate = match shared.running.lock() {
            Ok(mut running) => !running.insert(job),
            Err(_) => false,
        };
        if duplicate {
            shared.metrics.duplicates.inc();
        }
        Self {
            shared: shared.clone(),
            job,
            duplicate,
        }
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.shared.metrics.tasks_alive.dec();
        if !self.duplicate
            && let Ok(mut running) = self.shared.running.lock()
        {
            running.remove(&self.job);
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

/// Runs the configured worker until `shutdown`.
pub async fn run(mode: WorkerMode, config: WorkerConfig, deps: Deps, shutdown: CancellationToken) {
    let cpu_pool = (mode == WorkerMode::Bounded)
        .then(|| low_priority_pool(&config))
        .flatten();
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
        cpu_pool,
    });
    tracing::info!(?mode, "job worker started");
    match mode {
        WorkerMode::Unbounded => unbounded(shared, shutdown).await,
        WorkerMode::Capped => capped(shared, shutdown).await,
        WorkerMode::Bounded => bounded(shared, shutdown).await,
    }
}

/// Sleeps `d` unless shutdown comes first; false on shutdown.
async fn pause(d: Duration, shutdown: &CancellationToken) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = shutdown.cancelled() => false,
    }
}

/// The incident: fetch a batch every tick, one task per row, no limit.
async fn unbounded(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        spawn_pending_batch(&shared, "unbounded").await;
        if !pause(shared.config.tick, &shutdown).await {
            return;
        }
    }
}

/// One tick of `unbounded` / `capped`: read pending rows (unclaimed) and
/// start a task for each as it is decoded.
async fn spawn_pending_batch(shared: &Arc<Shared>, mode: &'static str) {
    let batch = Batch::Pending(shared.config.batch);
    let streamed = shared
        .rows
        .stream(&shared.db, &batch, |job| {
            // Counted at spawn, not when first polled: on a starved runtime,
            // spawned-but-waiting tasks are the pile-up.
            let guard = TaskGuard::start(shared, job.id);
            let shared = shared.clone();
            tokio::spawn(async move { attempt_unclaimed(shared, job, guard, mode).await });
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
async fn capped(shared: Arc<Shared>, shutdown: CancellationToken) {
    loop {
        // The patch's counter is the alive-tasks gauge itself.
        let running = shared.metrics.tasks_alive.get();
        if running > i64::from(shared.config.cap) {
            // "if more than 200 running, sleep 3 s" — and then fetch a whole
            // batch again, whatever the count is by then.
            if !pause(shared.config.cap_sleep, &shutdown).await {
                return;
            }
            continue;
        }
        spawn_pending_batch(&shared, "capped").await;
        if !pause(shared.config.tick, &shutdown).await {
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
        .with_label_values(&[mode])
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
async fn bounded(shared: Arc<Shared>, shutdown: CancellationToken) {
    let slots = Arc::new(Semaphore::new(shared.config.pool_size as usize));
    loop {
        // Backpressure: wait for a free slot before reading anything.
        let first = tokio::select! {
            permit = slots.clone().acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let free = 1 + slots.available_permits() as u32;
        let ids = match shared
            .db
            .claim(
                free,
                &shared.instance,
                shared.config.visibility_timeout,
                shared.config.max_attempts,
            )
            .await
        {
            Ok(ids) => ids,
            Err(e) => {
                tracing::warn!(error = %e, "claiming jobs failed");
                Vec::new()
            }
        };
        if ids.is_empty() {
            drop(first);
            if !pause(shared.config.tick, &shutdown).await {
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
                tokio::spawn(async move {
                    let _slot = permit;
                    attempt_claimed(shared, job, guard).await;
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

/// One attempt of a claimed job (`bounded`): time-limited, fenced by the
/// attempt number, retried or failed on error.
async fn attempt_claimed(shared: Arc<Shared>, job: JobTask, _guard: TaskGuard) {
    shared
        .metrics
        .job_lag
        .with_label_values(&["bounded"])
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
    record(&shared, job.id, Some(job.attempts), outcome).await;
}

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

async fn record(shared: &Shared, id: i64, fence: Option<u32>, outcome: Outcome) {
    let (status, label, result, error, retry_after) = match &outcome {
        Outcome::Done(r) => ("done", "done", Some(r.as_str()), None, None),
        Outcome::Retry(e, after) => ("pending", "retry", None, Some(e.as_str()), Some(*after)),
        Outcome::Failed(e) => ("failed", "failed", None, Some(e.as_str()), None),
        Outcome::Dead(e) => ("dead", "dead", None, Some(e.as_str()), None),
    };
    match shared
        .db
        .finish_job(id, fence, status, result, error, retry_after)
        .await
    {
        Ok(true) => shared.metrics.jobs.with_label_values(&[label]).inc(),
        Ok(false) => {
            // Our claim was taken back (we were too slow); the new owner decides.
            shared.metrics.jobs.with_label_values(&["lost"]).inc();
        }
        Err(e) => tracing::warn!(job = id, error = %e, "writing the job outcome failed"),
    }
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
    let digest = match (cpu, &shared.cpu_pool) {
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
/// or until `stop` is set.
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
