//! Invalid configuration: every binary exits 2 with a message naming the
//! key, the value and what is allowed.

use std::{path::PathBuf, process::Command};

fn binary(name: &str) -> PathBuf {
    labctl::procs::find_lab_binary(name, None)
        .unwrap_or_else(|e| panic!("{e:#} (run `cargo build --workspace` before the tests)"))
}

fn run(cmd: &mut Command) -> (i32, String) {
    // Keep the caller's LAB_* variables out of the child.
    for (key, _) in std::env::vars() {
        if key.starts_with("LAB_") {
            cmd.env_remove(key);
        }
    }
    let out = cmd.output().expect("binary runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn repo_file(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(path)
}

#[test]
fn bad_switch_in_env_exits_2_naming_key_value_and_choices() {
    for service in ["service-a", "service-b"] {
        let (code, stderr) =
            run(Command::new(binary(service)).env("LAB_FAULTS_WORKER", "infinite"));
        assert_eq!(code, 2, "{service}: {stderr}");
        assert!(stderr.contains("faults.worker"), "{service}: {stderr}");
        assert!(stderr.contains("infinite"), "{service}: {stderr}");
        assert!(
            stderr.contains("`unbounded`, `capped`, `bounded`"),
            "{service}: {stderr}"
        );
    }
}

#[test]
fn unknown_key_from_flag_or_env_exits_2() {
    let (code, stderr) =
        run(Command::new(binary("service-b")).args(["--set", "service_b.threads=4"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("service_b.threads"), "{stderr}");
    let (code, stderr) = run(Command::new(binary("service-a")).env("LAB_SERVICE_A_TIMEOUT", "1s"));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("LAB_SERVICE_A_TIMEOUT"), "{stderr}");
    let (code, stderr) = run(Command::new(binary("labctl")).args(["up", "--set", "mode=broken"]));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("`buggy` or `fixed`"), "{stderr}");
}

#[test]
fn config_check_accepts_the_shipped_files_and_rejects_bad_ones() {
    for file in ["deploy/lab.toml", "deploy/lab-fixed.toml"] {
        let (code, stderr) = run(Command::new(binary("labctl"))
            .args(["config", "check"])
            .arg(repo_file(file)));
        assert_eq!(code, 0, "{file}: {stderr}");
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "mode = \"fixed\"\n[faults]\nrows = \"ignore\"\n").expect("write");
    let (code, stderr) = run(Command::new(binary("labctl"))
        .args(["config", "check"])
        .arg(&bad));
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("faults.rows") && stderr.contains("ignore"),
        "{stderr}"
    );
    assert!(stderr.contains("`leak-on-error` or `close`"), "{stderr}");

    std::fs::write(&bad, "[mysql]\nurl = \"postgres://x\"\n").expect("write");
    let (code, stderr) = run(Command::new(binary("labctl"))
        .args(["config", "check"])
        .arg(&bad));
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("mysql.url"), "{stderr}");
}
