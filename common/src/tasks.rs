//! Named tasks: what `GET /debug/tasks` counts, the equivalent of Go's
//! `/debug/pprof/goroutine?debug=1` (docs/architecture.md, "Profiles and
//! task dumps").
//!
//! Tokio knows how many tasks are alive but not who spawned them. Every
//! long-lived or per-job task of the lab is spawned through [`spawn`] (or
//! wrapped with [`named`] for a `JoinSet`) with a short dotted name; a guard
//! inside the future keeps a per-name alive count true however the task ends
//! (finished, aborted, or dropped unpolled by a runtime shutting down).
//! Counting starts at spawn, not at first poll: on a starved runtime the
//! spawned-but-waiting tasks are the pile-up.

use std::{
    collections::BTreeMap,
    future::Future,
    sync::{
        Arc, LazyLock, Mutex,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
};

use serde::Serialize;
use tokio::task::JoinHandle;

/// Per-name counters. A name's entry is made once and kept (names are a
/// small fixed set), so a spawn only bumps two atomics after one lookup.
#[derive(Default)]
struct Counters {
    alive: AtomicI64,
    spawned: AtomicU64,
}

static BY_NAME: LazyLock<Mutex<BTreeMap<&'static str, Arc<Counters>>>> =
    LazyLock::new(|| Mutex::new(BTreeMap::new()));

fn counters(name: &'static str) -> Arc<Counters> {
    // A poisoned lock only means another thread panicked mid-insert; the
    // map itself is still sound.
    let mut map = BY_NAME.lock().unwrap_or_else(|e| e.into_inner());
    map.entry(name).or_default().clone()
}

/// Counts one alive task under its name until dropped.
struct Alive(Arc<Counters>);

impl Alive {
    fn start(name: &'static str) -> Self {
        let counters = counters(name);
        counters.alive.fetch_add(1, Ordering::Relaxed);
        counters.spawned.fetch_add(1, Ordering::Relaxed);
        Self(counters)
    }
}

impl Drop for Alive {
    fn drop(&mut self) {
        self.0.alive.fetch_sub(1, Ordering::Relaxed);
    }
}

/// `future`, counted as an alive task named `name` from now until it is
/// dropped. For spawners other than [`spawn`] (e.g. `JoinSet::spawn`).
pub fn named<F>(name: &'static str, future: F) -> impl Future<Output = F::Output> + Send + 'static
where
    F: Future + Send + 'static,
{
    let alive = Alive::start(name);
    async move {
        let _alive = alive;
        future.await
    }
}

/// `tokio::spawn`, counted under `name` in `GET /debug/tasks`.
pub fn spawn<F>(name: &'static str, future: F) -> JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    tokio::spawn(named(name, future))
}

/// One name's line in the dump.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct NamedCount {
    pub name: &'static str,
    pub alive: i64,
    /// Spawned since the process started.
    pub spawned: u64,
}

/// Alive tasks by name, most first; names with none alive are kept (a count
/// that fell to zero is information too).
pub fn snapshot() -> Vec<NamedCount> {
    let map = BY_NAME.lock().unwrap_or_else(|e| e.into_inner());
    let mut counts: Vec<NamedCount> = map
        .iter()
        .map(|(name, c)| NamedCount {
            name,
            alive: c.alive.load(Ordering::Relaxed),
            spawned: c.spawned.load(Ordering::Relaxed),
        })
        .collect();
    counts.sort_by(|a, b| b.alive.cmp(&a.alive).then(a.name.cmp(b.name)));
    counts
}

/// Alive tasks named `name` (0 if never spawned).
pub fn alive(name: &'static str) -> i64 {
    let map = BY_NAME.lock().unwrap_or_else(|e| e.into_inner());
    map.get(name).map_or(0, |c| c.alive.load(Ordering::Relaxed))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn counts_alive_tasks_by_name_until_they_end() {
        let (release, hold) = tokio::sync::watch::channel(false);
        let handles: Vec<_> = (0..3)
            .map(|_| {
                let mut hold = hold.clone();
                spawn("test.held", async move {
                    let _ = hold.wait_for(|go| *go).await;
                })
            })
            .collect();
        assert_eq!(alive("test.held"), 3, "counted from spawn, before any poll");
        release.send(true).unwrap();
        for h in handles {
            h.await.unwrap();
        }
        assert_eq!(alive("test.held"), 0);
        let line = snapshot()
            .into_iter()
            .find(|c| c.name == "test.held")
            .unwrap();
        assert_eq!((line.alive, line.spawned), (0, 3));
    }

    #[tokio::test]
    async fn an_aborted_task_is_no_longer_counted() {
        let h = spawn(
            "test.aborted",
            tokio::time::sleep(Duration::from_secs(3600)),
        );
        assert_eq!(alive("test.aborted"), 1);
        h.abort();
        assert!(h.await.unwrap_err().is_cancelled());
        assert_eq!(alive("test.aborted"), 0);
    }
}
