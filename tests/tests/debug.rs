//! The admin listeners' profiles and task dump, end to end: what an operator
//! sees of the incident's causes through `GET /debug/pprof/profile`,
//! `GET /debug/pprof/heap` and `GET /debug/tasks` (docs/architecture.md,
//! "Profiles and task dumps").

use std::{collections::HashMap, io::Read, time::Duration};

use lab_tests::{TestLab, eventually, partner_client, plain_client};
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

/// Each sample's thread, as pprof-rs labels it (`thread`); Linux keeps the
/// first 15 bytes of a thread's name.
fn threads(profile: &Profile) -> Vec<&str> {
    let string = |i: i64| profile.string_table[i as usize].as_str();
    profile
        .sample
        .iter()
        .map(|s| {
            s.label
                .iter()
                .find(|l| string(l.key) == "thread")
                .map_or("", |l| string(l.str))
        })
        .collect()
}

/// The runtime's worker threads, which serve requests (tokio's name for
/// them).
const RUNTIME_THREAD: &str = "tokio-rt-worker";
/// The bounded worker's low-priority CPU pool (service-b/src/worker.rs).
const JOB_CPU_THREAD: &str = "job-cpu-";

fn is_burn_cpu(name: &str) -> bool {
    name.starts_with("service_b::worker::burn_cpu")
}

/// Where a CPU profile's samples ran, and how many were the job's CPU work.
#[derive(Debug)]
struct CpuByThread {
    /// Samples by thread name, digits left out (`job-cpu-`).
    threads: std::collections::BTreeMap<String, i64>,
    total: i64,
    runtime: i64,
    burn_on_runtime: i64,
    job_pool: i64,
    burn_on_job_pool: i64,
}

impl CpuByThread {
    fn of(profile: &Profile) -> Self {
        let mut figures = Self {
            threads: Default::default(),
            total: 0,
            runtime: 0,
            burn_on_runtime: 0,
            job_pool: 0,
            burn_on_job_pool: 0,
        };
        for ((names, value), thread) in stacks(profile).into_iter().zip(threads(profile)) {
            let burn = names.iter().any(|n| is_burn_cpu(n));
            figures.total += value;
            *figures
                .threads
                .entry(
                    thread
                        .trim_end_matches(|c: char| c.is_ascii_digit())
                        .to_string(),
                )
                .or_default() += value;
            if thread.starts_with(RUNTIME_THREAD) {
                figures.runtime += value;
                figures.burn_on_runtime += if burn { value } else { 0 };
            } else if thread.starts_with(JOB_CPU_THREAD) {
                figures.job_pool += value;
                figures.burn_on_job_pool += if burn { value } else { 0 };
            }
        }
        figures
    }

    /// The job's CPU work's share of the runtime threads' samples.
    fn burn_share_of_runtime(&self) -> f64 {
        self.burn_on_runtime as f64 / self.runtime.max(1) as f64
    }
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

    // A second profile while one runs is refused, not queued: once B logs
    // that the first holds the slot, a second is sent while the first runs.
    let started_before = lab.log(B)?.matches("CPU profile started").count();
    let first_done = std::sync::atomic::AtomicBool::new(false);
    let first = async {
        let response = lab
            .operator(B, "GET", "/debug/pprof/profile?seconds=3", None)
            .await;
        first_done.store(true, std::sync::atomic::Ordering::SeqCst);
        response
    };
    let second = async {
        eventually(
            Duration::from_secs(3),
            "B to log that the first profile started",
            || async {
                let count = lab.log(B).ok()?.matches("CPU profile started").count();
                (count > started_before).then_some(())
            },
        )
        .await?;
        let response = lab
            .operator(B, "GET", "/debug/pprof/profile?seconds=1", None)
            .await?;
        let first_still_running = !first_done.load(std::sync::atomic::Ordering::SeqCst);
        anyhow::Ok((response, first_still_running))
    };
    let (first, second) = tokio::join!(first, second);
    let (second, first_still_running) = second?;
    assert!(
        first_still_running,
        "the second profile was answered while the first ran"
    );
    assert_eq!(second.status(), reqwest::StatusCode::CONFLICT);
    assert!(
        second.text().await?.contains("one at a time"),
        "the 409 says why"
    );
    let first = first?;
    assert_eq!(first.status(), reqwest::StatusCode::OK);
    let profile = decode(&first.bytes().await?)?;
    let stacks = stacks(&profile);
    assert!(!stacks.is_empty(), "the profile has samples");
    let (samples, burn_share) = share(&stacks, is_burn_cpu);
    let top = top_project_frames(&stacks, 5);
    let total: i64 = stacks.iter().map(|(_, v)| v).sum();
    let unbounded = CpuByThread::of(&profile);
    println!(
        "B under the unbounded worker: {total} samples in 3 s, burn_cpu in {samples} ({:.0} %); top project frames: {top:?}; by thread: {unbounded:?}, burn_cpu {:.0} % of the runtime threads' samples",
        burn_share * 100.0,
        unbounded.burn_share_of_runtime() * 100.0
    );
    // Each job burns 20 ms per KiB of payload inline on the runtime and
    // otherwise waits: the handler's CPU work is most of what B does.
    assert!(
        burn_share > 0.5,
        "the job handler's CPU work dominates B's profile (got {:.0} %)",
        burn_share * 100.0
    );
    assert!(
        top.first().is_some_and(|(n, _)| is_burn_cpu(n)),
        "the top project frame is the job's CPU work: {top:?}"
    );
    assert!(
        unbounded.burn_share_of_runtime() > 0.5,
        "unbounded: the job's CPU work runs on the runtime's threads: {unbounded:?}"
    );

    let svg = get_ok(&lab, B, "/debug/pprof/profile?seconds=1&format=svg").await?;
    let svg = String::from_utf8(svg)?;
    assert!(svg.contains("<svg"), "an SVG document");
    assert!(
        svg.contains("burn_cpu"),
        "the flame graph names the job's CPU work"
    );

    // The fix, flipped live on the same B with the same inflow: the job's
    // CPU work moves to the low-priority pool and off the runtime's threads.
    let flip = lab
        .operator(B, "PUT", "/faults", Some(r#"{"worker":"bounded"}"#.into()))
        .await?;
    assert!(flip.status().is_success(), "flip: {}", flip.status());
    eventually(
        Duration::from_secs(120),
        "the unbounded loop's tasks to end after the flip",
        || async {
            let bounded = lab
                .metric(B, "lab_worker_loops_started_total", &[("mode", "bounded")])
                .await?;
            let old = lab
                .metric(B, "lab_worker_old_loop_tasks_alive", &[])
                .await?;
            (bounded >= 1.0 && old == 0.0).then_some(())
        },
    )
    .await?;
    lab.insert_jobs(2000, 0.0).await?;
    eventually(
        Duration::from_secs(30),
        "bounded jobs to be running",
        || async {
            let alive = lab.metric(B, "lab_worker_tasks_alive", &[]).await?;
            (alive >= 2.0).then_some(())
        },
    )
    .await?;
    let profile = decode(&get_ok(&lab, B, "/debug/pprof/profile?seconds=3").await?)?;
    let bounded = CpuByThread::of(&profile);
    let bounded_top = top_project_frames(&self::stacks(&profile), 5);
    println!(
        "B under the bounded worker: {bounded:?}; burn_cpu {:.1} % of the runtime threads' samples; top project frames: {bounded_top:?}",
        bounded.burn_share_of_runtime() * 100.0
    );
    assert!(
        bounded.burn_on_job_pool > 0,
        "bounded: jobs ran their CPU work during the profile, on the job-cpu pool: {bounded:?}"
    );
    assert!(
        bounded.burn_share_of_runtime() < 0.1,
        "bounded: the job's CPU work does not dominate the runtime's threads: {bounded:?}"
    );
    Ok(())
}

/// A function of `crate_prefix`'s crate or of lab_common.
fn names_project_function(name: &str, crate_prefix: &str) -> bool {
    [crate_prefix, "lab_common::"]
        .iter()
        .any(|p| name.starts_with(p) || name.starts_with(&format!("<{p}")))
}

/// The profilers' own code, whose symbol caches stay live after a profile.
fn is_profiler_function(name: &str) -> bool {
    name.contains("lab_common::heap::") || name.contains("lab_common::admin::profiles::")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_service_serves_profiles_and_a_task_dump() -> anyhow::Result<()> {
    let lab = TestLab::start(
        1,
        &[
            "worker.tick=100ms",
            "worker.cpu_per_kib=1ms",
            "partner.latency=5ms",
        ],
    )
    .await?;
    // Load on every service while it is profiled, in two windows so that
    // neither load takes the CPU the other's profile needs (B's jobs, which
    // build a partner client each, can take a core by themselves): first
    // requests to A (which calls B) while A and B are profiled; then jobs on
    // B, which call partner-api, and calls straight to partner-api while it
    // is profiled (on a fast machine B may finish its jobs before that).
    let client = plain_client()?;
    eventually(Duration::from_secs(30), "A to answer", || async {
        let url = format!("{}/api/items/1", lab.a_url());
        let response = client.get(url).send().await.ok()?;
        response.status().is_success().then_some(())
    })
    .await?;
    #[derive(Clone, Copy, PartialEq, PartialOrd)]
    enum Window {
        AAndB,
        Partner,
        Done,
    }
    let (window_tx, window) = tokio::sync::watch::channel(Window::AAndB);
    let load = futures::future::join_all((0..8u32).map(|caller| {
        let (client, a, window) = (client.clone(), lab.a_url(), window.clone());
        async move {
            let mut requests = 0u32;
            while *window.borrow() == Window::AAndB {
                let url = format!("{a}/api/items/{}", (caller * 7 + requests) % 20 + 1);
                let _ = client.get(url).send().await;
                requests += 1;
            }
            requests
        }
    }));
    let partner = &lab.stack.config.partner;
    let partner_load = futures::future::join_all((0..8).map(|_| {
        let (client, url, mut window) = (
            partner_client(&partner.ca_cert),
            format!("{}/v1/enrich", partner.url),
            window.clone(),
        );
        async move {
            let client = client?;
            window.wait_for(|w| *w >= Window::Partner).await?;
            let mut calls = 0u32;
            while *window.borrow() == Window::Partner {
                let _ = client.post(&url).body(r#"{"payload":"x"}"#).send().await;
                calls += 1;
            }
            anyhow::Ok(calls)
        }
    }));
    let cpu = "/debug/pprof/profile?seconds=1";
    let profiles = async {
        let (a, b) = tokio::join!(get_ok(&lab, "service-a", cpu), get_ok(&lab, B, cpu));
        window_tx.send_replace(Window::Partner);
        lab.insert_jobs(300, 0.0).await?;
        let partner = get_ok(&lab, "partner-api", cpu).await;
        window_tx.send_replace(Window::Done);
        anyhow::Ok((a, partner, b))
    };
    let (requests, partner_calls, profiles) = tokio::join!(load, partner_load, profiles);
    let (a, partner, b) = profiles?;
    let requests: u32 = requests.iter().sum();
    let partner_calls = partner_calls.into_iter().sum::<anyhow::Result<u32>>()?;
    println!(
        "{requests} requests to A while A and B were profiled, {partner_calls} straight to partner-api while it was"
    );
    let services = [
        ("service-a", "service_a::", a?),
        ("partner-api", "partner_api::", partner?),
        (B, "service_b::", b?),
    ];
    for (service, crate_prefix, cpu) in services {
        let cpu = decode(&cpu)?;
        let cpu_stacks = stacks(&cpu);
        let cpu_samples: i64 = cpu_stacks.iter().map(|(_, v)| v).sum();
        let cpu_named = cpu_stacks
            .iter()
            .flat_map(|(names, _)| names.iter())
            .find(|n| names_project_function(n, crate_prefix) && !is_profiler_function(n))
            .map(|n| n.to_string());
        // Jemalloc samples one allocation per 512 KiB: the live heap of a
        // small process (A's, partner-api's: a few MiB) holds a handful of
        // samples, and its largest live project allocation may be the CPU
        // profile's symbol cache just built. The check is that the heap
        // profile decodes and its project frames resolve; which one it
        // names is printed.
        let heap = decode(&get_ok(&lab, service, "/debug/pprof/heap").await?)?;
        let heap_stacks = stacks(&heap);
        let heap_samples = heap_stacks.len();
        let project_names = |service_code_only: bool| {
            heap_stacks
                .iter()
                .flat_map(|(names, _)| names.iter())
                .find(|n| {
                    names_project_function(n, crate_prefix)
                        && (!service_code_only || !is_profiler_function(n))
                })
                .map(|n| n.to_string())
        };
        let (service_code, named) = (project_names(true), project_names(false));
        let dump: serde_json::Value =
            serde_json::from_slice(&get_ok(&lab, service, "/debug/tasks?format=json").await?)?;
        let names: Vec<&str> = dump["by_name"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str())
            .collect();
        println!(
            "{service}: CPU profile {cpu_samples} samples in 1 s, names {cpu_named:?}; heap profile {heap_samples} samples, names {named:?} (service code other than the profilers: {service_code:?}); tasks {} alive, named {names:?}",
            dump["alive"]
        );
        assert!(cpu_samples > 0, "{service}: the CPU profile has samples");
        assert!(
            cpu_named.is_some(),
            "{service}: the CPU profile names a function of {crate_prefix} or lab_common"
        );
        assert!(
            named.is_some(),
            "{service}: the heap profile names a function of {crate_prefix} or lab_common"
        );
        assert_eq!(
            named_alive(&dump, "admin.listener"),
            1,
            "{service}: the task dump names the admin listener"
        );
    }
    Ok(())
}

/// Jobs per round of [`client_heap_after_rounds`].
const JOBS_PER_ROUND: i64 = 300;

/// In-use bytes of B's live heap under client and connection construction
/// (reqwest, rustls, hyper frames), and the whole, after each of `rounds`
/// rounds of [`JOBS_PER_ROUND`] jobs.
async fn client_heap_after_rounds(form: &str, rounds: usize) -> anyhow::Result<HeapRounds> {
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
    let mut heap = HeapRounds::default();
    for round in 0..rounds {
        let jobs = JOBS_PER_ROUND * (round as i64 + 1);
        lab.insert_jobs(JOBS_PER_ROUND as u64, 0.0).await?;
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
        if round + 1 == rounds {
            heap.top_project = top_innermost(&stacks, 3, is_service_code)
                .into_iter()
                .map(|(n, s)| (n.to_string(), s))
                .collect();
            let top_client = top_innermost(&stacks, 3, is_client_construction);
            println!(
                "{form}: top project frames of the live heap {:?}; top library frames {top_client:?}",
                heap.top_project
            );
        }
        heap.bytes.push((client_bytes, total));
    }
    let svg = String::from_utf8(get_ok(&lab, B, "/debug/pprof/heap?format=svg").await?)?;
    assert!(svg.contains("<svg"), "an SVG document");
    Ok(heap)
}

/// Project code other than the heap profiler itself: the first dump's
/// symbol tables stay cached, and live, under the heap route's frames.
fn is_service_code(name: &str) -> bool {
    is_project_function(name)
        && !name.starts_with("lab_common::heap::")
        && !name.starts_with("lab_common::admin::profiles::")
}

/// (bytes under client construction, all live bytes) after each round,
/// and the top project frames of the live heap after the last.
#[derive(Default)]
struct HeapRounds {
    bytes: Vec<(i64, i64)>,
    top_project: Vec<(String, f64)>,
}

fn is_client_construction(name: &str) -> bool {
    ["reqwest::", "rustls::", "hyper::", "hyper_util::"]
        .iter()
        .any(|p| name.starts_with(p) || name.starts_with(&format!("<{p}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heap_profile_names_the_per_request_client_and_shared_stays_flat() -> anyhow::Result<()> {
    let per_request = client_heap_after_rounds("per-request", 2).await?;
    // Shared: a first round warms the pool up, two more measure growth.
    let shared = client_heap_after_rounds("shared", 3).await?;
    let mib = |b: i64| b as f64 / (1024.0 * 1024.0);
    for (form, rounds) in [("per-request", &per_request), ("shared", &shared)] {
        let figures: Vec<String> = rounds
            .bytes
            .iter()
            .enumerate()
            .map(|(i, (client, total))| {
                format!(
                    "{:.1} MiB after {} jobs (of {:.1} MiB live)",
                    mib(*client),
                    JOBS_PER_ROUND * (i as i64 + 1),
                    mib(*total)
                )
            })
            .collect();
        println!(
            "{form}: in-use bytes under reqwest/rustls/hyper: {}",
            figures.join(", ")
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
    // Shared: 600 calls after the warm-up hold no more than the sampling
    // noise. Jemalloc samples one allocation per 512 KiB on average and
    // weighs each sample up, so a snapshot moves by up to ~2.5 MiB with the
    // pool's connection buffers (one round to the next is all noise, so
    // only the whole is bounded); a leak of 7 KiB per call (per-request's
    // is ~100 KiB) would exceed the bound.
    const SHARED_NOISE: i64 = 4 * 1024 * 1024;
    let shared_growth = shared[2].0 - shared[0].0;
    let (first_round, second_round) = (shared[1].0 - shared[0].0, shared[2].0 - shared[1].0);
    println!(
        "shared: growth over the two rounds after the warm-up {:.1} MiB ({:.1} then {:.1}); per-request's over one round {:.1} MiB",
        mib(shared_growth),
        mib(first_round),
        mib(second_round),
        mib(per_request_growth)
    );
    assert!(
        shared_growth < SHARED_NOISE,
        "shared: the client path does not grow with calls ({:.1} MiB over {} calls)",
        mib(shared_growth),
        2 * JOBS_PER_ROUND
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
            // Each job waits 5 s on the partner, so even a loop slowed by a
            // busy machine (a TLS handshake per job) piles up 1 000 of them.
            "partner.latency=5s",
            "worker.cpu_per_kib=0s",
        ],
    )
    .await?;
    lab.insert_jobs(3000, 0.0).await?;
    let highest = std::sync::Mutex::new(0.0_f64);
    let piled_up = eventually(
        Duration::from_secs(60),
        "a pile-up of job tasks",
        || async {
            let alive = lab.metric(B, "lab_worker_tasks_alive", &[]).await?;
            if let Ok(mut highest) = highest.lock() {
                *highest = highest.max(alive);
            }
            (alive >= 1000.0).then_some(())
        },
    )
    .await;
    if let Err(error) = piled_up {
        let highest = highest.lock().map(|h| *h).unwrap_or(0.0);
        anyhow::bail!("{error}: lab_worker_tasks_alive peaked at {highest}");
    }

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

    // At a glance: the text form's first row, under the header, is the
    // job tasks.
    let text = String::from_utf8(get_ok(&lab, B, "/debug/tasks").await?)?;
    println!("{}", text.lines().take(8).collect::<Vec<_>>().join("\n"));
    let first_row = text
        .lines()
        .skip_while(|l| !(l.trim_start().starts_with("alive") && l.trim_end().ends_with("name")))
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let count: f64 = first_row
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0.0);
    assert!(
        first_row.trim_end().ends_with("  worker.job") && count >= 1000.0,
        "the first row under the header is thousands of job tasks: {first_row:?}"
    );

    // The stacks, grouped: thousands of job tasks share one trace. A second
    // stack dump, sent once B logs the first started, is refused while the
    // first runs.
    let started_before = lab.log(B)?.matches("task stack dump started").count();
    let first_done = std::sync::atomic::AtomicBool::new(false);
    let first = async {
        let body = get_ok(&lab, B, "/debug/tasks?format=json&stacks=1").await;
        first_done.store(true, std::sync::atomic::Ordering::SeqCst);
        body
    };
    let second = async {
        eventually(
            Duration::from_secs(5),
            "B to log that the first stack dump started",
            || async {
                let count = lab.log(B).ok()?.matches("task stack dump started").count();
                (count > started_before).then_some(())
            },
        )
        .await?;
        let response = lab
            .operator(B, "GET", "/debug/tasks?stacks=1", None)
            .await?;
        let first_still_running = !first_done.load(std::sync::atomic::Ordering::SeqCst);
        anyhow::Ok((
            response.status(),
            response.text().await?,
            first_still_running,
        ))
    };
    let (first, second) = tokio::join!(first, second);
    let (status, reason, first_still_running) = second?;
    println!("second stack dump: {status} {reason}");
    assert!(
        first_still_running,
        "the second stack dump was answered while the first ran"
    );
    assert_eq!(status, reqwest::StatusCode::CONFLICT, "{reason}");
    assert!(reason.contains("one at a time"), "the 409 says why");
    let stacks: serde_json::Value = serde_json::from_slice(&first?)?;
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
