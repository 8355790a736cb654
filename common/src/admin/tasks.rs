//! `GET /debug/tasks`: how many tasks are alive, grouped by what spawned
//! them — the equivalent of Go's `/debug/pprof/goroutine?debug=1`
//! (docs/architecture.md, "Profiles and task dumps").
//!
//! * `format=text` (default) — one line per name, most first;
//! * `format=json` — the same as JSON;
//! * `stacks=1` — also every task's stack, grouped by identical trace, from
//!   tokio's task dump. Only in builds with `--cfg tokio_unstable` (the
//!   lab's `.cargo/config.toml`) on Linux x86_64/aarch64; elsewhere 501.
//!   One at a time per process: 409 while another is being taken.

use std::{collections::HashMap, fmt::Write as _, sync::atomic::AtomicBool};

use axum::{
    Extension, Json,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::{AdminState, auth, profiles::OneAtATime};
use crate::tasks::{self, NamedCount};

/// One stack dump at a time per process: a dump pauses every worker
/// thread and resolving thousands of traces costs seconds of CPU; a second
/// one at once would double both for the same answer.
static STACK_DUMP_RUNNING: AtomicBool = AtomicBool::new(false);

/// The stack dump's slot, `None` while another dump holds it.
fn take_stack_dump_slot() -> Option<OneAtATime> {
    OneAtATime::take(&STACK_DUMP_RUNNING)
}

/// The answer while another stack dump runs.
fn dump_in_progress() -> Response {
    (
        StatusCode::CONFLICT,
        Json(json!({
            "error": "a task stack dump of this process is already being taken; one at \
                      a time (retry when it is done, or leave out stacks=1)",
            "code": "dump_in_progress",
        })),
    )
        .into_response()
}

/// Counts of alive tasks, named and not.
struct Counts {
    alive: i64,
    named: Vec<NamedCount>,
    unnamed: i64,
}

fn counts() -> Counts {
    let alive = i64::try_from(
        tokio::runtime::Handle::current()
            .metrics()
            .num_alive_tasks(),
    )
    .unwrap_or(i64::MAX);
    let named = tasks::snapshot();
    let named_alive: i64 = named.iter().map(|c| c.alive).sum();
    // Named tasks are counted from spawn and tokio's from its own
    // bookkeeping: for an instant they may disagree by a task or two.
    let unnamed = (alive - named_alive).max(0);
    Counts {
        alive,
        named,
        unnamed,
    }
}

pub(super) async fn dump(
    State(state): State<AdminState>,
    Extension(operator): Extension<auth::Operator>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let json = match params.get("format").map(String::as_str) {
        None | Some("text") => false,
        Some("json") => true,
        Some(other) => {
            return bad_request(format!("format: {other:?} is not one of text, json"));
        }
    };
    let with_stacks = match params.get("stacks").map(String::as_str) {
        None | Some("0" | "false") => false,
        Some("1" | "true") => true,
        Some(other) => return bad_request(format!("stacks: {other:?} is not 0 or 1")),
    };
    let stacks_slot = if with_stacks {
        let Some(slot) = take_stack_dump_slot() else {
            return dump_in_progress();
        };
        tracing::info!(by = ?operator.addr, "task stack dump started");
        Some(slot)
    } else {
        None
    };
    let counts = counts();
    let stacks = if let Some(slot) = stacks_slot {
        match stacks::grouped(slot).await {
            Ok(groups) => Some(groups),
            Err((status, code, reason)) => {
                return (status, Json(json!({"error": reason, "code": code}))).into_response();
            }
        }
    } else {
        None
    };
    if json {
        let named_alive: i64 = counts.named.iter().map(|c| c.alive).sum();
        let mut body = json!({
            "service": state.service,
            "alive": counts.alive,
            "named": named_alive,
            "unnamed": counts.unnamed,
            "by_name": counts.named,
        });
        if let Some(groups) = stacks {
            body["stacks"] = groups
                .into_iter()
                .map(|(tasks, trace)| json!({"tasks": tasks, "trace": trace}))
                .collect();
        }
        return Json(body).into_response();
    }
    let mut text = render_text(state.service, &counts);
    if let Some(groups) = stacks {
        for (tasks, trace) in groups {
            let _ = write!(text, "\n{tasks} task(s) with this stack:\n{trace}\n");
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response()
}

/// Go's `goroutine profile: total N`, then `count name` lines.
fn render_text(service: &str, counts: &Counts) -> String {
    let mut text = format!(
        "{service}: {} tasks alive ({} named, {} unnamed)\n\n{:>8}  {:>10}  name\n",
        counts.alive,
        counts.alive - counts.unnamed,
        counts.unnamed,
        "alive",
        "spawned"
    );
    for c in &counts.named {
        let _ = writeln!(text, "{:>8}  {:>10}  {}", c.alive, c.spawned, c.name);
    }
    let _ = writeln!(
        text,
        "{:>8}  {:>10}  (unnamed: connections and requests of hyper, tonic, axum, sqlx)",
        counts.unnamed, "-"
    );
    text
}

/// Why stacks were not given: status, code, reason.
type Refusal = (StatusCode, &'static str, String);

fn bad_request(reason: String) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": reason, "code": "invalid_argument"})),
    )
        .into_response()
}

/// Tokio's task dump, where this build has it.
#[cfg(all(
    tokio_unstable,
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
))]
mod stacks {
    use std::{collections::HashMap, time::Duration};

    use axum::http::StatusCode;

    /// A dump pauses every worker thread; one stuck in blocking code never
    /// pauses, and the dump would wait for ever.
    const DUMP_TIMEOUT: Duration = Duration::from_secs(10);

    /// What an empty trace means.
    const NO_TOKIO_LEAF: &str = "(no tokio future on this task's stack: it waits on \
        something outside tokio, e.g. a futures-channel or hyper's pool)";

    /// `(tasks, trace)` per distinct trace, most tasks first. `slot` is
    /// held until the grouping ends, even if the caller goes away.
    pub(super) async fn grouped(
        slot: super::OneAtATime,
    ) -> Result<Vec<(usize, String)>, super::Refusal> {
        let handle = tokio::runtime::Handle::current();
        let dump = tokio::time::timeout(DUMP_TIMEOUT, handle.dump())
            .await
            .map_err(|_| {
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "dump_timed_out",
                    format!(
                        "tokio's task dump did not finish in {DUMP_TIMEOUT:?}: a worker \
                         thread is blocked and never paused"
                    ),
                )
            })?;
        // Resolving symbols takes long (seconds for thousands of tasks in a
        // debug build): off the runtime it is observing.
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            group(&dump)
        })
        .await
        .map_err(|e| {
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "dump_failed",
                format!("grouping the task dump failed: {e}"),
            )
        })
    }

    /// Groups tasks by their unresolved trace (return addresses, cheap to
    /// compare), then resolves one trace per group.
    fn group(dump: &tokio::runtime::Dump) -> Vec<(usize, String)> {
        let mut by_addresses: HashMap<String, (usize, &tokio::runtime::dump::Trace)> =
            HashMap::new();
        for task in dump.tasks().iter() {
            let key = format!("{:?}", task.trace());
            by_addresses.entry(key).or_insert((0, task.trace())).0 += 1;
        }
        let mut groups: Vec<(usize, String)> = by_addresses
            .into_values()
            .map(|(tasks, trace)| {
                let trace = trace.to_string();
                if trace.trim().is_empty() {
                    // Traces stop at tokio's own leaf futures.
                    (tasks, NO_TOKIO_LEAF.to_string())
                } else {
                    (tasks, trace)
                }
            })
            .collect();
        groups.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
        groups
    }
}

#[cfg(not(all(
    tokio_unstable,
    target_os = "linux",
    any(target_arch = "x86_64", target_arch = "aarch64")
)))]
mod stacks {
    use axum::http::StatusCode;

    pub(super) async fn grouped(
        _slot: super::OneAtATime,
    ) -> Result<Vec<(usize, String)>, super::Refusal> {
        Err((
            StatusCode::NOT_IMPLEMENTED,
            "stacks_unavailable",
            "task stacks need a build with `--cfg tokio_unstable` (the lab's \
             .cargo/config.toml; an env RUSTFLAGS replaces it) on Linux x86_64 or aarch64"
                .into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_stack_dump_at_a_time() {
        let first = take_stack_dump_slot().unwrap();
        assert!(take_stack_dump_slot().is_none());
        let refused = dump_in_progress();
        assert_eq!(refused.status(), StatusCode::CONFLICT);
        let body = axum::body::to_bytes(refused.into_body(), usize::MAX)
            .await
            .unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["code"], "dump_in_progress");
        assert!(
            body["error"].as_str().unwrap().contains("one at a time"),
            "{body}"
        );
        drop(first);
        assert!(take_stack_dump_slot().is_some(), "free again once done");
    }
}
