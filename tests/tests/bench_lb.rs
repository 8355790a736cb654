//! `labctl bench lb` once, as a user runs it, with tiny durations: every
//! variant is measured in every case, with CPU figures, no errors where
//! none are expected, and the degraded case shows its symptom — HAProxy's
//! round robin still gives the slow B half of the calls.

use std::{path::PathBuf, process::Command, time::Instant};

use serde_json::Value;

fn labctl() -> PathBuf {
    labctl::procs::find_lab_binary("labctl", None).expect("labctl is built")
}

const VARIANTS: [&str; 5] = ["l4", "l7", "l7-leastconn", "etcd", "etcd-peak-ewma"];
const CASES: [&str; 3] = ["homogeneous", "degraded", "killed"];

#[test]
fn every_variant_is_measured_in_every_case_and_round_robin_feeds_the_slow_b() {
    let dir = tempfile::tempdir().unwrap();
    let json = dir.path().join("lb.json");
    let started = Instant::now();
    let output = Command::new(labctl())
        .args(["bench", "lb", "--rounds", "1", "--duration", "1s"])
        .args(["--warmup", "300ms", "--rps", "200", "--concurrency", "8"])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    println!(
        "labctl bench lb: {:?} in {:.0?}\n{stdout}\n{stderr}",
        output.status,
        started.elapsed()
    );
    assert_eq!(output.status.code(), Some(0));

    let result: Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    let cases = result["cases"].as_array().expect("cases");
    let names: Vec<&str> = cases.iter().map(|c| c["case"].as_str().unwrap()).collect();
    assert_eq!(names, CASES);
    for case in cases {
        let name = case["case"].as_str().unwrap();
        let rows = case["rows"].as_array().expect("rows");
        let variants: Vec<&str> = rows
            .iter()
            .map(|r| r["variant"].as_str().unwrap())
            .collect();
        assert_eq!(variants, VARIANTS, "{name}");
        for row in rows {
            let what = format!("{name} / {}: {row}", row["variant"]);
            assert_eq!(row["rounds"], 1, "{what}");
            assert!(row["requests"].as_f64().unwrap() > 0.0, "{what}");
            for figure in ["p50_ms", "p99_ms", "p999_ms"] {
                assert!(row[figure].as_f64().is_some_and(|v| v > 0.0), "{what}");
            }
            // A and HAProxy did work for every request (HAProxy at least
            // its health checks), and so did the Bs.
            assert!(row["cpu_a_proxy_per_10k"].as_f64().unwrap() > 0.0, "{what}");
            assert!(
                row["cpu_backends_per_10k"].as_f64().unwrap() > 0.0,
                "{what}"
            );
            if name != "killed" {
                assert_eq!(row["errors"], serde_json::json!({}), "{what}");
            } else {
                // The busiest B is killed: it had answered calls before.
                assert!(row["affected_share"].as_f64().unwrap() > 0.0, "{what}");
            }
        }
        assert!(
            stdout.contains(&format!("### {name} — 2 B,")),
            "a table per case: {stdout}"
        );
    }

    // Round robin alternates per request whatever each B's latency: the
    // slow B answered about half of the calls.
    let degraded = &cases[1]["rows"];
    let l7 = degraded
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["variant"] == "l7")
        .unwrap();
    let slow_share = l7["affected_share"].as_f64().unwrap();
    assert!((0.4..=0.6).contains(&slow_share), "{l7}");
    // …and that B really is slow: with half the calls on it, the p99 is
    // its latency (the 20 ms default of --slow-latency) or more.
    assert!(l7["p99_ms"].as_f64().unwrap() >= 20.0, "{l7}");
    assert!(
        stdout.contains("target: etcd p99 ≤ 0.3× l7 round-robin p99: measured "),
        "{stdout}"
    );
    assert!(
        stdout.contains("target: etcd A+proxy CPU per request ≤ 0.7× l7's: measured "),
        "{stdout}"
    );
}
