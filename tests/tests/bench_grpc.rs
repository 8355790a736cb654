//! `labctl bench grpc` runs end to end once, with tiny durations: it starts
//! its stack and echo, loads each of the three servers, and reports every
//! one of them with answers from the right server and no errors. The
//! figures themselves belong in the README, not in a test.

use std::process::Command;

use serde_json::Value;

#[test]
fn bench_grpc_reports_the_echo_and_both_bs() {
    let labctl = labctl::procs::find_lab_binary("labctl", None).expect("labctl is built");
    let dir = tempfile::tempdir().expect("temp dir");
    let json = dir.path().join("grpc.json");
    let output = Command::new(labctl)
        .args(["bench", "grpc", "--duration", "1s", "--warmup", "1s"])
        .args(["--rounds", "1", "--concurrency", "8", "--json"])
        .arg(&json)
        .output()
        .expect("labctl runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "exit {}\n{stdout}\n{stderr}",
        output.status
    );

    let results: Vec<Value> =
        serde_json::from_slice(&std::fs::read(&json).expect("the JSON was written"))
            .expect("the JSON parses");
    let targets: Vec<&str> = results
        .iter()
        .map(|r| r["target"].as_str().expect("a target name"))
        .collect();
    assert_eq!(targets, ["echo", "b-cached", "b-mysql"]);
    for (result, served_by) in results.iter().zip(["echo", "b-1", "b-2"]) {
        let target = &result["target"];
        let requests = result["requests"].as_u64().expect("requests");
        assert!(requests > 0, "{target}: no requests");
        assert_eq!(result["errors"], 0, "{target}: {result}");
        // Every answer came from the server this row is about.
        assert_eq!(
            result["served_by"],
            serde_json::json!({ served_by: requests }),
            "{target}"
        );
        for figure in ["rps", "p50_ms", "p99_ms", "p999_ms", "vs_echo"] {
            let value = result[figure].as_f64().expect(figure);
            assert!(value > 0.0, "{target}: {figure} = {value}");
        }
        assert!(
            stdout.contains(&format!("| {} |", target.as_str().expect("name"))),
            "{target} missing from the table:\n{stdout}"
        );
    }
    // The cached B served from its cache; the other B never looked in one.
    let hit_ratio = results[1]["cache_hit_ratio"].as_f64().expect("hit ratio");
    assert!(hit_ratio > 0.0, "b-cached hit ratio {hit_ratio}");
    assert!(results[2]["cache_hit_ratio"].is_null(), "{}", results[2]);
}
