//! The admin listeners' profiles and task dump, end to end: what an operator
//! sees of the incident's causes through `GET /debug/pprof/profile`,
//! `GET /debug/pprof/heap` and `GET /debug/tasks` (docs/architecture.md,
//! "Profiles and task dumps").

use std::{collections::HashMap, io::Read, time::Duration};

use lab_tests::{TestLab, eventually, plain_client};
use pprof::protos::{Message, Profile};

const B: &str = "service-b-1";

/// Reads a profile body: gunzips when gzipped, then decodes the protobuf.
fn decode(body: &[u8]) -> anyhow::Result<Profile> {
    let raw = if body.starts_with(&[0x1f, 0x8b]) {
        let mut raw = Vec::new();
        flate2::read::GzDecoder::new(body).read_to_end(&mut raw)?;
        raw
    } else {
        body.to_vec()
    };
    Ok(Profile::decode(&raw[..])?)
}

/// The function names of each sample's stack, with the sample's first value
/// (CPU: samples; heap: in-use bytes).
fn stacks(profile: &Profile) -> Vec<(Vec<&str>, i64)> {
    let functions: HashMap<u64, &str> = profile
        .function
        .iter()
        .map(|f| (f.id, profile.string_table[f.name as usize].as_str()))
        .collect();
    let locations: HashMap<u64, Vec<&str>> = profile
        .location
        .iter()
        .map(|l| {
            let names = l
                .line
                .iter()
                .filter_map(|line| functions.get(&line.function_id).copied())
                .collect();
            (l.id, names)
        })
        .collect();
    profile
        .sample
        .iter()
        .map(|s| {
            let names = s
                .location_id
                .iter()
                .flat_map(|id| locations.get(id).cloned().unwrap_or_default())
                .collect();
            (names, s.value.first().copied().unwrap_or(0))
        })
        .collect()
}

/// Share of the total value whose stack has a frame matching `hit`.
fn share(stacks: &[(Vec<&str>, i64)], hit: impl Fn(&str) -> bool) -> (i64, f64) {
    let total: i64 = stacks.iter().map(|(_, v)| v).sum();
    let matched: i64 = stacks
        .iter()
        .filter(|(names, _)| names.iter().any(|n| hit(n)))
        .map(|(_, v)| v)
        .sum();
    (matched, matched as f64 / total.max(1) as f64)
}

/// The project's own functions ranked by the share of samples in which
/// each is the innermost project frame (`pprof -top` with the runtime's and
/// libraries' frames folded into the project function that called them).
fn top_project_frames<'a>(stacks: &[(Vec<&'a str>, i64)], n: usize) -> Vec<(&'a str, f64)> {
    top_innermost(stacks, n, is_project_function)
}

/// Functions matching `pick` ranked by the share of the total in which each
/// is the innermost matching frame.
fn top_innermost<'a>(
    stacks: &[(Vec<&'a str>, i64)],
    n: usize,
    pick: fn(&str) -> bool,
) -> Vec<(&'a str, f64)> {
    let total: i64 = stacks.iter().map(|(_, v)| v).sum();
    let mut by_function: HashMap<&str, i64> = HashMap::new();
    for (names, value) in stacks {
        // pprof lists a stack leaf first.
        if let Some(name) = names.iter().find(|n| pick(n)) {
            *by_function.entry(name).or_default() += value;
        }
    }
    let mut ranked: Vec<(&str, f64)> = by_function
        .into_iter()
        .map(|(name, v)| (name, v as f64 / total.max(1) as f64))
        .collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    ranked.truncate(n);
    ranked
}

/// Functions of the project itself, not of the runtime or libraries that
/// every stack passes through.
fn is_project_function(name: &str) -> bool {
    name.starts_with("service_b::") || name.starts_with("lab_common::")
}

async fn get_ok(lab: &TestLab, service: &str, path: &str) -> anyhow::Result<Vec<u8>> {
    let response = lab.operator(service, "GET", path, None).await?;
    let status = response.status();
    let body = response.bytes().await?;
    anyhow::ensure!(
        status.is_success(),
        "GET {path} on {service} answered {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(body.to_vec())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_profile_under_the_unbounded_worker_names_the_job_cpu_work() -> anyhow::Result<()> {
    let lab = TestLab::start(
        1,
        &[
            "faults.worker=unbounded",
            "worker.tick=200ms",
            "worker.batch=50",
            "worker.cpu_per_kib=20ms",
            "partner.latency=50ms",
        ],
    )
    .await?;
    // The route is operator-only.
    let url = format!("{}/debug/pprof/profile?seconds=1", lab.admin_url(B)?);
    let anonymous = plain_client()?.get(&url).send().await?;
    assert_eq!(anonymous.status(), reqwest::StatusCode::UNAUTHORIZED);
    let bad = lab
        .operator(B, "GET", "/debug/pprof/profile?seconds=600", None)
        .await?;
    assert_eq!(bad.status(), reqwest::StatusCode::BAD_REQUEST);
    assert!(
        bad.text().await?.contains("seconds"),
        "the answer names the parameter"
    );

    lab.insert_jobs(2000, 0.0).await?;
    eventually(
        Duration::from_secs(30),
        "job tasks to be running",
        || async {
            let alive = lab.metric(B, "lab_worker_tasks_alive", &[]).await?;
            (alive >= 50.0).then_some(())
        },
    )
    .await?;

    // A second profile while one runs is refused, not queued.
    let first = lab.operator(B, "GET", "/debug/pprof/profile?seconds=3", None);
    let second = async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        lab.operator(B, "GET", "/debug/pprof/profile?seconds=1", None)
            .await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(second?.status(), reqwest::StatusCode::CONFLICT);
    let first = first?;
    assert_eq!(first.status(), reqwest::StatusCode::OK);
    let profile = decode(&first.bytes().await?)?;
    let stacks = stacks(&profile);
    assert!(!stacks.is_empty(), "the profile has samples");
    let (samples, burn_share) = share(&stacks, |n| n.starts_with("service_b::worker::burn_cpu"));
    let top = top_project_frames(&stacks, 5);
    let total: i64 = stacks.iter().map(|(_, v)| v).sum();
    println!(
        "B under the unbounded worker: {total} samples in 3 s, burn_cpu in {samples} ({:.0} %); top project frames: {top:?}",
        burn_share * 100.0
    );
    // Each job burns 20 ms per KiB of payload inline on the runtime and
    // otherwise waits: the handler's CPU work is most of what B does.
    assert!(
        burn_share > 0.5,
        "the job handler's CPU work dominates B's profile (got {:.0} %)",
        burn_share * 100.0
    );
    assert!(
        top.first()
            .is_some_and(|(n, _)| n.starts_with("service_b::worker::burn_cpu")),
        "the top project frame is the job's CPU work: {top:?}"
    );

    let svg = get_ok(&lab, B, "/debug/pprof/profile?seconds=1&format=svg").await?;
    let svg = String::from_utf8(svg)?;
    assert!(svg.contains("<svg"), "an SVG document");
    assert!(
        svg.contains("burn_cpu"),
        "the flame graph names the job's CPU work"
    );
    Ok(())
}

/// In-use bytes of B's live heap under client and connection construction
/// (reqwest, rustls, hyper frames), and the whole, after each of two rounds
/// of jobs.
async fn client_heap_after_two_rounds(form: &str) -> anyhow::Result<HeapRounds> {
    let lab = TestLab::start(
        1,
        &[
            "mode=fixed",
            &format!("faults.http_client={form}"),
            "worker.pool_size=8",
            "worker.tick=50ms",
            "worker.cpu_per_kib=0s",
            "partner.latency=5ms",
        ],
    )
    .await?;
    let db = lab.db().await?;
    let mut rounds = HeapRounds::default();
    for (round, jobs) in [(0usize, 300i64), (1, 600)] {
        lab.insert_jobs(300, 0.0).await?;
        eventually(Duration::from_secs(120), "every job to be done", || async {
            let done: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE status = 'done'")
                .fetch_one(&db)
                .await
                .ok()?;
            (done == jobs).then_some(())
        })
        .await?;
        let profile = decode(&get_ok(&lab, B, "/debug/pprof/heap").await?)?;
        let stacks = stacks(&profile);
        assert!(!stacks.is_empty(), "the heap profile has samples");
        // Under `shared` B's own live allocations can be too few for
        // jemalloc's sampling to catch; the leaking client never is.
        if form == "per-request" {
            assert!(
                stacks
                    .iter()
                    .any(|(names, _)| names.iter().any(|n| n.starts_with("service_b::"))),
                "a function of B appears in its heap profile"
            );
        }
        let (client_bytes, _) = share(&stacks, is_client_construction);
        let total: i64 = stacks.iter().map(|(_, v)| v).sum();
        if round == 1 {
            rounds.top_project = top_innermost(&stacks, 3, is_service_code)
                .into_iter()
                .map(|(n, s)| (n.to_string(), s))
                .collect();
            let top_client = top_innermost(&stacks, 3, is_client_construction);
            println!(
                "{form}: top project frames of the live heap {:?}; top library frames {top_client:?}",
                rounds.top_project
            );
        }
        rounds.bytes[round] = (client_bytes, total);
    }
    let svg = String::from_utf8(get_ok(&lab, B, "/debug/pprof/heap?format=svg").await?)?;
    assert!(svg.contains("<svg"), "an SVG document");
    Ok(rounds)
}

/// Project code other than the heap profiler itself: the first dump's
/// symbol tables stay cached, and live, under the heap route's frames.
fn is_service_code(name: &str) -> bool {
    is_project_function(name)
        && !name.starts_with("lab_common::heap::")
        && !name.starts_with("lab_common::admin::profiles::")
}

/// (bytes under client construction, all live bytes) after each round,
/// and the top project frames of the live heap after the second.
#[derive(Default)]
struct HeapRounds {
    bytes: [(i64, i64); 2],
    top_project: Vec<(String, f64)>,
}

fn is_client_construction(name: &str) -> bool {
    ["reqwest::", "rustls::", "hyper::", "hyper_util::"]
        .iter()
        .any(|p| name.starts_with(p) || name.starts_with(&format!("<{p}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_profile_names_the_per_request_client_and_shared_stays_flat() -> anyhow::Result<()> {
    let per_request = client_heap_after_two_rounds("per-request").await?;
    let shared = client_heap_after_two_rounds("shared").await?;
    let mib = |b: i64| b as f64 / (1024.0 * 1024.0);
    for (form, rounds) in [("per-request", &per_request), ("shared", &shared)] {
        let rounds = rounds.bytes;
        println!(
            "{form}: in-use bytes under reqwest/rustls/hyper {:.1} MiB after 300 jobs, {:.1} MiB after 600 (of {:.1} / {:.1} MiB live)",
            mib(rounds[0].0),
            mib(rounds[1].0),
            mib(rounds[0].1),
            mib(rounds[1].1)
        );
    }
    // What the top of the live heap names under per-request: B's client
    // construction, which holds the most live bytes of all B's code.
    assert!(
        per_request
            .top_project
            .first()
            .is_some_and(|(n, _)| n.starts_with("service_b::http_client::")),
        "per-request: the top of the heap is B's partner client: {:?}",
        per_request.top_project
    );
    let (per_request, shared) = (per_request.bytes, shared.bytes);
    let per_request_growth = per_request[1].0 - per_request[0].0;
    let shared_growth = shared[1].0 - shared[0].0;
    // Each per-request call leaves a client, its TLS config and a held
    // connection behind: 300 more calls hold megabytes more.
    assert!(
        per_request_growth > 10 * 1024 * 1024,
        "per-request: the client path's live bytes grow with calls ({:.1} MiB)",
        mib(per_request_growth)
    );
    assert!(
        per_request[1].0 as f64 > 0.3 * per_request[1].1 as f64,
        "per-request: client construction holds a large part of the live heap"
    );
    // Jemalloc samples one allocation per 512 KiB on average and weighs
    // each sample up, so the shared client's figure moves by a few MiB
    // with its pool's connection buffers — bounded by the pool, not by the
    // calls: a fifth of per-request's growth at most.
    assert!(
        shared_growth < per_request_growth / 5,
        "shared: the client path does not grow with calls ({:.1} MiB against {:.1} MiB)",
        mib(shared_growth),
        mib(per_request_growth)
    );
    Ok(())
}

/// `name`'s alive count in a JSON task dump (0 when absent).
fn named_alive(dump: &serde_json::Value, name: &str) -> i64 {
    dump["by_name"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["name"] == name)
        .and_then(|c| c["alive"].as_i64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn task_dump_shows_the_pile_up_of_job_tasks() -> anyhow::Result<()> {
    let lab = TestLab::start(
        1,
        &[
            "faults.worker=unbounded",
            "worker.tick=200ms",
            "worker.batch=200",
            "partner.latency=2s",
            "worker.cpu_per_kib=0s",
        ],
    )
    .await?;
    lab.insert_jobs(3000, 0.0).await?;
    eventually(
        Duration::from_secs(30),
        "a pile-up of job tasks",
        || async {
            let alive = lab.metric(B, "lab_worker_tasks_alive", &[]).await?;
            (alive >= 1000.0).then_some(())
        },
    )
    .await?;

    // The gauge, the dump, the gauge: the dump's count lies between.
    let before = lab
        .metric(B, "lab_worker_tasks_alive", &[])
        .await
        .unwrap_or(0.0);
    let dump: serde_json::Value =
        serde_json::from_slice(&get_ok(&lab, B, "/debug/tasks?format=json").await?)?;
    let after = lab
        .metric(B, "lab_worker_tasks_alive", &[])
        .await
        .unwrap_or(0.0);
    let jobs = named_alive(&dump, "worker.job") as f64;
    println!(
        "task dump: {} alive, worker.job {jobs}, unnamed {}; lab_worker_tasks_alive {before} then {after}",
        dump["alive"], dump["unnamed"]
    );
    let (low, high) = (before.min(after), before.max(after));
    assert!(
        jobs >= 0.9 * low && jobs <= 1.1 * high && jobs >= 1000.0,
        "worker.job ({jobs}) tracks lab_worker_tasks_alive ({before}..{after})"
    );
    assert!(
        dump["alive"].as_i64().unwrap_or(0) >= jobs as i64,
        "tokio's count includes them"
    );
    for long_lived in ["worker.loop", "registry.keepalive", "admin.listener"] {
        assert_eq!(
            named_alive(&dump, long_lived),
            1,
            "{long_lived} is alive once"
        );
    }

    // At a glance: the text form's biggest line is the job tasks.
    let text = String::from_utf8(get_ok(&lab, B, "/debug/tasks").await?)?;
    let first_line = text
        .lines()
        .find(|l| l.trim_end().ends_with("worker.job") || l.contains(" worker."))
        .unwrap_or_default()
        .to_string();
    println!("{}", text.lines().take(8).collect::<Vec<_>>().join("\n"));
    let count: f64 = first_line
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    assert!(
        first_line.ends_with("worker.job") && count >= 1000.0,
        "the first named line is thousands of job tasks: {first_line:?}"
    );

    // The stacks, grouped: thousands of job tasks share one trace.
    let stacks: serde_json::Value =
        serde_json::from_slice(&get_ok(&lab, B, "/debug/tasks?format=json&stacks=1").await?)?;
    let groups = stacks["stacks"].as_array().cloned().unwrap_or_default();
    let job_group = groups
        .iter()
        .find(|g| {
            g["trace"]
                .as_str()
                .is_some_and(|t| t.contains("service_b::worker"))
        })
        .cloned()
        .unwrap_or_default();
    let tasks = job_group["tasks"].as_u64().unwrap_or(0);
    let trace = job_group["trace"].as_str().unwrap_or_default();
    println!(
        "{} distinct stacks; the biggest group of job tasks: {tasks} tasks\n{}",
        groups.len(),
        trace.lines().take(12).collect::<Vec<_>>().join("\n")
    );
    let named_jobs = named_alive(&stacks, "worker.job");
    assert!(
        tasks >= 100 && tasks as f64 >= 0.25 * named_jobs as f64,
        "hundreds of job tasks share one stack ({tasks} of {named_jobs})"
    );
    Ok(())
}
