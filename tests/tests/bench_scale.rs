//! `labctl bench scale`, `labctl bench jobs` and `labctl bench overload`,
//! each run once through the real command with tiny sizes, so they keep
//! working. They check that
//! every case is reported with numbers that can be true, not how fast
//! anything is (the README has the figures and the commands that made
//! them).

use std::{path::PathBuf, process::Command};

use serde_json::Value;

fn labctl() -> PathBuf {
    labctl::procs::find_lab_binary("labctl", None)
        .unwrap_or_else(|e| panic!("{e:#} (run `cargo build --workspace` before the tests)"))
}

/// Runs `labctl bench <args> --json FILE`; returns the JSON and stdout.
fn bench(args: &[&str]) -> (Vec<Value>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("bench.json");
    let mut cmd = Command::new(labctl());
    cmd.arg("bench").args(args).arg("--json").arg(&json);
    // The caller's LAB_* variables would change the stack under test.
    for (key, _) in std::env::vars() {
        if key.starts_with("LAB_") {
            cmd.env_remove(key);
        }
    }
    let out = cmd.output().expect("labctl runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "labctl bench {args:?} failed\nstdout:\n{stdout}\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let results = serde_json::from_slice(&std::fs::read(&json).expect("JSON written"))
        .expect("the JSON is a list of results");
    (results, stdout)
}

fn number(v: &Value, key: &str) -> f64 {
    v[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} is not a number in {v}"))
}

#[test]
fn bench_scale_reports_every_case_with_a_sane_cost() {
    let (results, stdout) = bench(&[
        "scale",
        "--backends",
        "2,3",
        "--registry-keys",
        "20",
        "--churn-rate",
        "20",
        "--rps",
        "100",
        "--concurrency",
        "8",
        "--duration",
        "1s",
        "--warmup",
        "500ms",
        "--rounds",
        "1",
    ]);
    let labels: Vec<&str> = results
        .iter()
        .map(|r| r["label"].as_str().expect("label"))
        .collect();
    assert_eq!(
        labels,
        [
            "2 Bs",
            "3 Bs",
            "3 Bs + 20 keys",
            "3 Bs + 20 keys, 20/s churn"
        ]
    );
    for r in &results {
        let label = r["label"].as_str().unwrap_or_default();
        assert!(
            stdout.contains(&format!("| {label} |")),
            "{label} not in the table:\n{stdout}"
        );
        let registered = number(r, "backends") + number(r, "extra_keys");
        let endpoints = number(r, "endpoints");
        // Under churn a key may be between its delete and its successor's put.
        assert!(
            endpoints <= registered && endpoints >= registered - 1.0,
            "{label}: A sees {endpoints} endpoints for {registered} registered"
        );
        assert!(number(r, "rps") > 0.0, "{label}: no requests: {r}");
        let (p50, p99) = (number(r, "p50_ms"), number(r, "p99_ms"));
        assert!(p50 > 0.0 && p99 >= p50, "{label}: p50 {p50} p99 {p99}");
        assert!(
            number(r, "a_cpu_s_per_10k") > 0.0,
            "{label}: A used no CPU: {r}"
        );
        assert!(
            number(r, "a_rss_mib") > 1.0,
            "{label}: A has no memory: {r}"
        );
        assert_eq!(number(r, "errors"), 0.0, "{label}: {r}");
    }
    assert!(
        number(&results[3], "churned_per_s") > 0.0,
        "the churn case churned nothing: {}",
        results[3]
    );
    assert_eq!(number(&results[2], "churned_per_s"), 0.0);
}

#[test]
fn bench_jobs_claims_through_the_status_index_at_every_size() {
    let (results, stdout) = bench(&[
        "jobs",
        "--sizes",
        "1k,10k",
        // 10 % pending at 10 k rows is where one SELECT over both statuses
        // made MariaDB walk the primary key through every done row.
        "--backlogs",
        "10%",
        "--claims",
        "20",
        "--claim-time",
        "5s",
    ]);
    let rows: Vec<f64> = results.iter().map(|r| number(r, "rows")).collect();
    assert_eq!(rows, [1_000.0, 10_000.0]);
    for r in &results {
        let size = number(r, "rows");
        assert_eq!(number(r, "pending"), size / 10.0, "{r}");
        assert_eq!(number(r, "claims"), 20.0, "{r}");
        // worker.pool_size (8): the backlog never ran dry.
        assert_eq!(number(r, "claimed_per_claim"), 8.0, "{r}");
        let (p50, p99) = (number(r, "p50_ms"), number(r, "p99_ms"));
        assert!(p50 > 0.0 && p99 >= p50, "{size} rows: p50 {p50} p99 {p99}");
        let statements = r["statements"].as_array().expect("statements");
        assert!(statements.len() >= 3, "{r}");
        for s in statements {
            let what = s["what"].as_str().expect("what");
            let plan = s["plan"].as_array().expect("plan");
            assert!(!plan.is_empty(), "{size} rows, {what}: no EXPLAIN rows");
            let keys: Vec<&str> = plan.iter().filter_map(|p| p["key"].as_str()).collect();
            let access: Vec<&str> = plan.iter().filter_map(|p| p["access"].as_str()).collect();
            // Every statement but the UPDATE by id finds its jobs by status.
            let index = if what.starts_with("mark") {
                "PRIMARY"
            } else {
                "jobs_status_id"
            };
            assert_eq!(keys, [index], "{size} rows, {what}: plan {plan:?}");
            assert!(
                access.iter().all(|a| ["ref", "range"].contains(a)),
                "{size} rows, {what}: reads a whole index or table: {plan:?}"
            );
            let examined = number(s, "rows_examined");
            assert!(
                examined < size / 10.0,
                "{size} rows, {what}: examined {examined} rows for one claim"
            );
        }
        assert!(
            stdout.contains(&format!("key={}", "jobs_status_id")),
            "EXPLAIN not printed:\n{stdout}"
        );
    }
}

/// The fixed preset alone (the buggy one is the README's contrast), a few
/// seconds per step: A sheds at 3× its capacity, quickly and with 503s
/// only, keeps serving, and the calm load after it is served again.
#[test]
fn bench_overload_sheds_on_the_fixed_preset_and_recovers() {
    let (results, stdout) = bench(&[
        "overload",
        "--presets",
        "fixed",
        "--warmup",
        "1s",
        "--capacity-duration",
        "2s",
        "--baseline-duration",
        "2s",
        "--duration",
        "3s",
        "--recovery",
        "4s",
        // A debug build answers its admitted requests in about a second
        // under this load: wait for them, so that every failure counted is
        // one A chose to make.
        "--timeout",
        "10s",
    ]);
    println!("{stdout}");
    assert_eq!(results.len(), 1);
    let fixed = &results[0];
    assert_eq!(fixed["preset"], "fixed");
    // Every process of the stack ran on one CPU, as the kernel says.
    let allowed = fixed["stack_cpus_allowed"]
        .as_object()
        .expect("per process");
    assert!(allowed.len() >= 7, "{allowed:?}");
    for (process, cpus) in allowed {
        let cpus = cpus.as_str().unwrap_or_default();
        assert!(
            !cpus.is_empty() && cpus.chars().all(|c| c.is_ascii_digit()),
            "{process} may run on {cpus:?}, not one CPU"
        );
    }
    assert!(number(fixed, "goodput_rps") > 0.0, "{fixed}");
    // Every failure is a 503 (nothing timed out, was dropped or reset),
    // nearly all of them A's own `overloaded` (its lab_http_shed_total).
    let errors = fixed["errors"].as_object().expect("errors");
    assert_eq!(errors.keys().collect::<Vec<_>>(), ["503"], "{fixed}");
    let answered_503 = number(fixed, "answered_503_rps");
    let a_shed = number(fixed, "a_shed_rps");
    assert!(
        answered_503 > 0.0 && a_shed >= 0.9 * answered_503 && a_shed <= answered_503 * 1.01,
        "A shed {a_shed}/s of {answered_503} 503s/s"
    );
    // Refused at once, never at A's 5 s deadline.
    let shed_p99 = number(&fixed["failed_latency_ms"], "p99");
    assert!(shed_p99 < 1000.0, "shed p99 {shed_p99} ms");
    // A holds at most its 256 admitted requests: its memory grows by
    // megabytes, not by the thousands of requests it refused.
    let a_growth = number(fixed, "a_rss_max_mib") - number(fixed, "a_rss_before_mib");
    assert!(a_growth < 100.0, "A grew by {a_growth:.0} MiB");
    let recovery = fixed["recovery_errors"].as_array().expect("per second");
    assert_eq!(recovery.len(), 4, "{fixed}");
    assert!(
        fixed["recovered_after_s"].is_number(),
        "normal again within the recovery: {fixed}"
    );
    assert!(
        stdout.lines().any(|line| line.starts_with("fixed ")),
        "a table row for the preset: {stdout}"
    );
}
