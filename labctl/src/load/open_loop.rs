//! Open loop: a constant arrival rate. Request *k* is due at `start + k/R`
//! and is handed to an idle worker when it is due, whatever the earlier
//! requests are doing.
//!
//! One dispatcher task owns the schedule, the pool of workers and every
//! tally; workers only send. Per request that is an atomic store and a
//! wake-up towards an idle worker, and one message back when it finished —
//! no lock shared by workers, no allocation but the channel's blocks, and
//! no histogram per worker (a pool of 1 000 would otherwise hold
//! 1 000 histograms). Workers are long-lived tasks, each with its own
//! session (HTTP: its connection): an idle one is reused (the most recently
//! idle first, so the pool stays as small as the load allows), a new one
//! is started when none is idle, up to `max_in_flight`; past that the due
//! request is dropped.
//!
//! The dispatcher sleeps until the next request is due ([`Pacer`]: a
//! timerfd, not tokio's millisecond ticks) and on waking starts every
//! request that has become due in one batch, so high rates cost at most one
//! wake-up per 100 µs rather than one per request. How late each request
//! started (its dispatch lag) is reported, so a reader can see the
//! generator kept up; latency is measured from when the request was due,
//! lag included.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use anyhow::{Context, bail};
use hdrhistogram::Histogram;
use tokio::{
    sync::{
        Notify,
        mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel},
    },
    task::JoinHandle,
    time::Instant,
};

use super::{
    DispatchLag, LoadReport, LoadSpec,
    outcome::{self, Outcome, Tally, Transport, call_with_timeout},
    pacer::Pacer,
};

/// How long workers opened before the start may take to warm up (dial).
const WARM_TIMEOUT: Duration = Duration::from_secs(2);

/// Slot values that are not a request number.
const EMPTY: u64 = u64::MAX;
const STOP: u64 = u64::MAX - 1;

/// Where the dispatcher hands one worker its next request.
struct Slot {
    request: AtomicU64,
    wake: Notify,
}

impl Slot {
    fn new(request: u64) -> Self {
        Self {
            request: AtomicU64::new(request),
            wake: Notify::new(),
        }
    }

    fn hand(&self, request: u64) {
        self.request.store(request, Ordering::Release);
        self.wake.notify_one();
    }
}

/// A worker is idle again; with the request it finished, if any.
struct Finish {
    worker: u32,
    done: Option<Done>,
}

struct Done {
    request: u64,
    started: Instant,
    finished: Instant,
    outcome: Outcome,
}

pub(super) async fn run<T: Transport>(
    spec: &LoadSpec,
    rps: f64,
    transport: Arc<T>,
    progress: Option<indicatif::ProgressBar>,
) -> anyhow::Result<LoadReport> {
    // On a task of its own: the caller may be a `block_on` thread (labctl's
    // main), which is woken through the runtime's workers, a hop late.
    let spec = spec.clone();
    tokio::spawn(async move {
        Dispatcher::new(&spec, rps, transport, progress)?
            .run()
            .await
    })
    .await
    .context("the load dispatcher panicked")?
}

struct Dispatcher<T: Transport> {
    transport: Arc<T>,
    timeout: Duration,
    max_in_flight: usize,
    warm_workers: usize,
    rps: f64,
    /// How many requests are due in the run.
    scheduled: u64,
    slots: Vec<Arc<Slot>>,
    workers: Vec<JoinHandle<()>>,
    /// Idle workers, the most recently idle last.
    idle: Vec<u32>,
    finished_tx: UnboundedSender<Finish>,
    finished_rx: UnboundedReceiver<Finish>,
    tally: Tally,
    lag: Histogram<u64>,
    dropped: u64,
    peak_in_flight: usize,
    finished: u64,
    live: Option<Arc<super::LiveWindow>>,
    progress: Option<indicatif::ProgressBar>,
}

impl<T: Transport> Dispatcher<T> {
    fn new(
        spec: &LoadSpec,
        rps: f64,
        transport: Arc<T>,
        progress: Option<indicatif::ProgressBar>,
    ) -> anyhow::Result<Self> {
        // Request k is due before the end while k/R < duration.
        let by_duration = spec
            .duration
            .map_or(u64::MAX, |d| (d.as_secs_f64() * rps).ceil() as u64);
        let scheduled = spec.requests.unwrap_or(u64::MAX).min(by_duration);
        if scheduled == u64::MAX {
            bail!("give --requests N or --duration D");
        }
        let (finished_tx, finished_rx) = unbounded_channel();
        Ok(Self {
            transport,
            timeout: spec.timeout,
            max_in_flight: spec.max_in_flight,
            warm_workers: spec.concurrency.min(spec.max_in_flight),
            rps,
            scheduled,
            slots: Vec::new(),
            workers: Vec::new(),
            idle: Vec::new(),
            finished_tx,
            finished_rx,
            tally: Tally::new()?,
            lag: outcome::histogram()?,
            dropped: 0,
            peak_in_flight: 0,
            finished: 0,
            live: spec.live.clone(),
            progress,
        })
    }

    async fn run(mut self) -> anyhow::Result<LoadReport> {
        for _ in 0..self.warm_workers {
            self.start_worker(EMPTY);
        }
        while self.idle.len() < self.warm_workers {
            let Some(ready) = self.finished_rx.recv().await else {
                bail!("load workers stopped before the start");
            };
            self.idle.push(ready.worker);
        }

        let start = Instant::now();
        let pacer = Pacer::new();
        let mut next = 0u64;
        while next < self.scheduled {
            let now = Instant::now();
            while next < self.scheduled && self.due(start, next) <= now {
                self.dispatch(start, next);
                next += 1;
            }
            self.collect(start);
            if next < self.scheduled {
                pacer.until(self.due(start, next)).await;
            }
        }
        // N requests due every 1/R span N/R seconds; if the dispatcher ran
        // late, the sending took until its last dispatch plus one interval.
        let schedule = Duration::from_secs_f64(self.scheduled as f64 / self.rps);
        let sending = schedule.max(start.elapsed() + Duration::from_secs_f64(1.0 / self.rps));
        self.finish(start, sending).await
    }

    /// When request `k` is due.
    fn due(&self, start: Instant, k: u64) -> Instant {
        start + Duration::from_secs_f64(k as f64 / self.rps)
    }

    /// Request `k` is due: to an idle worker, a new one, or dropped.
    fn dispatch(&mut self, start: Instant, k: u64) {
        if self.idle.is_empty() {
            self.collect(start);
        }
        if let Some(worker) = self.idle.pop() {
            self.slots[worker as usize].hand(k);
        } else if self.slots.len() < self.max_in_flight {
            self.start_worker(k);
        } else {
            self.dropped += 1;
            if let Some(live) = &self.live {
                live.record_dropped();
            }
            return;
        }
        self.peak_in_flight = self.peak_in_flight.max(self.slots.len() - self.idle.len());
    }

    /// Starts a worker with request `first` already handed to it, or, with
    /// [`EMPTY`], one that warms its session and reports idle.
    fn start_worker(&mut self, first: u64) {
        let index = self.slots.len() as u32;
        let slot = Arc::new(Slot::new(EMPTY));
        if first != EMPTY {
            slot.hand(first);
        }
        self.slots.push(slot.clone());
        self.workers.push(tokio::spawn(worker(
            index,
            self.transport.clone(),
            slot,
            self.finished_tx.clone(),
            self.timeout,
            first == EMPTY,
        )));
    }

    /// Takes in what finished since the last look, without waiting.
    fn collect(&mut self, start: Instant) {
        while let Ok(finish) = self.finished_rx.try_recv() {
            self.take(start, finish);
        }
        if let Some(bar) = &self.progress {
            bar.set_position(self.finished);
        }
    }

    fn take(&mut self, start: Instant, finish: Finish) {
        self.idle.push(finish.worker);
        if let Some(done) = finish.done {
            let due = self.due(start, done.request);
            outcome::record(&mut self.lag, done.started.saturating_duration_since(due));
            self.tally.record(
                &done.outcome,
                done.finished.saturating_duration_since(due),
                done.finished.saturating_duration_since(start),
                self.live.as_deref(),
            );
            self.finished += 1;
        }
    }

    /// Nothing more is due: stops the workers as they finish and takes in
    /// their last requests.
    /// `sending` is how long the requests were being sent: the schedule's
    /// span, or longer if the dispatcher fell behind it.
    async fn finish(mut self, start: Instant, sending: Duration) -> anyhow::Result<LoadReport> {
        // Only an idle worker is stopped: a busy one may not even have
        // taken its request out of the slot yet.
        let mut running = self.slots.len();
        for worker in std::mem::take(&mut self.idle) {
            self.slots[worker as usize].hand(STOP);
            running -= 1;
        }
        // Without the dispatcher's own sender the channel closes once every
        // worker has returned, even one that panicked.
        let (closed_tx, _) = unbounded_channel();
        drop(std::mem::replace(&mut self.finished_tx, closed_tx));
        while running > 0
            && let Some(finish) = self.finished_rx.recv().await
        {
            let worker = finish.worker;
            self.take(start, finish);
            self.idle.clear();
            self.slots[worker as usize].hand(STOP);
            running -= 1;
        }
        for worker in std::mem::take(&mut self.workers) {
            worker.await.context("load worker panicked")?;
        }
        let elapsed = start.elapsed();
        if let Some(bar) = &self.progress {
            bar.set_position(self.finished);
        }
        let lag = &self.lag;
        let dispatch_lag_ms = (!lag.is_empty()).then(|| DispatchLag {
            p50: lag.value_at_quantile(0.50) as f64 / 1000.0,
            p99: lag.value_at_quantile(0.99) as f64 / 1000.0,
            max: lag.max() as f64 / 1000.0,
        });
        let mut report = self.tally.report(elapsed);
        report.dropped = self.dropped;
        report.target_rps = Some(self.rps);
        let sent = self.scheduled - self.dropped;
        report.sent_rps = Some(sent as f64 / sending.as_secs_f64().max(1e-9));
        report.peak_in_flight = Some(self.peak_in_flight as u64);
        report.dispatch_lag_ms = dispatch_lag_ms;
        Ok(report)
    }
}

/// One worker: waits for a request in its slot, sends it, says so.
async fn worker<T: Transport>(
    index: u32,
    transport: Arc<T>,
    slot: Arc<Slot>,
    finished: UnboundedSender<Finish>,
    timeout: Duration,
    warm: bool,
) {
    let mut session = transport.session();
    if warm {
        let _ = tokio::time::timeout(WARM_TIMEOUT, transport.warm(&mut session)).await;
        let ready = Finish {
            worker: index,
            done: None,
        };
        if finished.send(ready).is_err() {
            return;
        }
    }
    loop {
        slot.wake.notified().await;
        let request = slot.request.swap(EMPTY, Ordering::Acquire);
        match request {
            STOP => return,
            EMPTY => continue,
            _ => {}
        }
        let started = Instant::now();
        let outcome = call_with_timeout(&*transport, &mut session, request, timeout).await;
        let done = Done {
            request,
            started,
            finished: Instant::now(),
            outcome,
        };
        let finish = Finish {
            worker: index,
            done: Some(done),
        };
        if finished.send(finish).is_err() {
            return;
        }
    }
}
