//! The registry and B from other languages, end to end: `examples/go-client`
//! (grpc-go with etcd's own resolver and round_robin, built from Debian's Go
//! packages) and `examples/python-client` (grpcio, stubs generated from the
//! .proto, discovery through etcd's JSON gateway) against a lab with two Bs.
//!
//! Both examples are built here, as their READMEs say, so a change that
//! breaks either one (or the etcd layout they read) fails this test.
//! `scripts/install-deps.sh --for-tests` installs Go and Python's venv.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use lab_proto::v1::{GetItemRequest, backend_client::BackendClient};
use lab_tests::TestLab;
use nix::{
    sys::signal::{Signal, killpg},
    unistd::Pid,
};
use serde::Deserialize;
use tokio::{
    io::{AsyncBufReadExt, BufReader, Lines},
    process::{ChildStdout, Command},
};

/// One JSON line of either client: a window of calls (Go), or the tally of
/// a whole run (`summary`, Go; the Python client's second line).
#[derive(Debug, Deserialize)]
struct Tally {
    #[serde(default)]
    summary: bool,
    calls: u64,
    served_by: BTreeMap<String, u64>,
    errors: BTreeMap<String, u64>,
}

/// What the Python client learnt about one B before calling it.
#[derive(Debug, Deserialize)]
struct Described {
    addr: String,
    health: String,
    services: Vec<String>,
    methods: Vec<String>,
}

#[derive(Debug, Deserialize)]
struct Instances {
    instances: BTreeMap<String, Described>,
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the repository")
        .to_path_buf()
}

/// How long a build step (go build, pip install) or a client run may take
/// before the test gives up on it rather than stall CI.
const STEP_TIMEOUT: Duration = Duration::from_secs(180);

/// Runs `command` to its end and returns its output, within
/// [`STEP_TIMEOUT`]. It runs in a process group of its own, so that on a
/// timeout what it started (go's compilers, pip's builds) is killed with it.
async fn output_within(what: &str, command: &mut Command) -> anyhow::Result<Output> {
    let child = command
        .process_group(0)
        .kill_on_drop(true)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| {
            format!("{what}: could not start it (scripts/install-deps.sh --for-tests installs it)")
        })?;
    let group = Pid::from_raw(child.id().context("a pid")? as i32);
    match tokio::time::timeout(STEP_TIMEOUT, child.wait_with_output()).await {
        Ok(output) => Ok(output?),
        Err(_) => {
            // Best effort: the group may be gone already.
            let _ = killpg(group, Signal::SIGKILL);
            anyhow::bail!("{what} took more than {STEP_TIMEOUT:?}")
        }
    }
}

/// Runs a build step; its output is shown only if it fails.
async fn run_step(what: &str, command: &mut Command) -> anyhow::Result<()> {
    let started = Instant::now();
    let output = output_within(what, command).await?;
    anyhow::ensure!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    eprintln!("{what}: {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// `go build` in GOPATH mode against Debian's /usr/share/gocode, as
/// examples/go-client/README.md says.
async fn build_go_client(work: &Path) -> anyhow::Result<PathBuf> {
    let binary = work.join("go-client");
    let gopath = format!("{}:/usr/share/gocode", work.join("gopath").display());
    run_step(
        "go build examples/go-client",
        Command::new("go")
            .arg("build")
            .arg("-o")
            .arg(&binary)
            .arg(".")
            .current_dir(repo_root().join("examples/go-client"))
            .env("GO111MODULE", "off")
            .env("GOPATH", gopath),
    )
    .await?;
    Ok(binary)
}

/// A venv with requirements.txt from PyPI, and the stubs generate.sh makes;
/// returns the venv's python and the stubs' directory.
async fn set_up_python_client(work: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let example = repo_root().join("examples/python-client");
    let venv = work.join("venv");
    let python = venv.join("bin/python");
    let stubs = work.join("stubs");
    run_step(
        "python3 is 3.10 or later (grpcio 1.85 needs it)",
        Command::new("python3").args(["-c", "import sys; sys.exit(sys.version_info < (3, 10))"]),
    )
    .await?;
    run_step(
        "python3 -m venv",
        Command::new("python3").args(["-m", "venv"]).arg(&venv),
    )
    .await?;
    run_step(
        "pip install -r examples/python-client/requirements.txt",
        Command::new(&python)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(example.join("requirements.txt")),
    )
    .await?;
    run_step(
        "examples/python-client/generate.sh",
        Command::new(example.join("generate.sh"))
            .arg(&stubs)
            .env("PYTHON", &python),
    )
    .await?;
    Ok((python, stubs))
}

/// Instance id → address of every B registered under the lab's prefix, read
/// with the Rust etcd client (not the examples' own discovery).
async fn registered(lab: &TestLab) -> anyhow::Result<BTreeMap<String, String>> {
    let config = &lab.stack.config().etcd;
    let mut etcd = etcd_client::Client::connect(&config.endpoints, None).await?;
    let answer = etcd
        .get(
            config.prefix.as_bytes(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await?;
    let mut instances = BTreeMap::new();
    for kv in answer.kvs() {
        let id = kv
            .key_str()?
            .strip_prefix(&config.prefix)
            .context("key under the prefix")?;
        let value: serde_json::Value = serde_json::from_slice(kv.value())?;
        let addr = value["Addr"].as_str().context("an Addr in the value")?;
        instances.insert(id.to_string(), addr.to_string());
    }
    Ok(instances)
}

fn names(map: &BTreeMap<String, u64>) -> BTreeSet<String> {
    map.keys().cloned().collect()
}

/// The next JSON line of the Go client, within `timeout`.
async fn next_tally(
    lines: &mut Lines<BufReader<ChildStdout>>,
    timeout: Duration,
) -> anyhow::Result<Tally> {
    let line = tokio::time::timeout(timeout, lines.next_line())
        .await
        .context("the Go client printed nothing")??
        .context("the Go client's output ended")?;
    serde_json::from_str(&line).with_context(|| format!("parsing {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn go_and_python_clients_find_every_b_through_etcd_and_spread_calls() -> anyhow::Result<()> {
    let work = tempfile::Builder::new().prefix("lab-polyglot-").tempdir()?;
    let go_client = build_go_client(work.path()).await?;
    let (python, stubs) = set_up_python_client(work.path()).await?;

    // A drain period long enough that b-2 still serves when it leaves the
    // Go client's picks (below).
    let lab = TestLab::start(2, &["mode=fixed", "service_b.drain_period=5s"]).await?;
    let bs = registered(&lab).await?;
    let ids: BTreeSet<String> = bs.keys().cloned().collect();
    assert_eq!(ids, BTreeSet::from(["b-1".into(), "b-2".into()]), "{bs:?}");
    let etcd = lab.stack.config().etcd.endpoints.join(",");

    // Python: discovery, health and reflection as a grpcurl-style tool uses
    // them, then 100 calls.
    let output = output_within(
        "client.py",
        Command::new(&python)
            .arg(repo_root().join("examples/python-client/client.py"))
            .args(["--etcd", &etcd, "--calls", "100", "--stubs"])
            .arg(&stubs),
    )
    .await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "client.py: {}\n{stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let mut lines = stdout.lines();
    let found: Instances = serde_json::from_str(lines.next().context("client.py's first line")?)?;
    let found_addrs: BTreeMap<String, String> = found
        .instances
        .iter()
        .map(|(id, b)| (id.clone(), b.addr.clone()))
        .collect();
    assert_eq!(found_addrs, bs, "Python found what etcd holds");
    for (id, b) in &found.instances {
        assert_eq!(b.health, "SERVING", "{id}: {b:?}");
        for service in ["lab.v1.Backend", "grpc.health.v1.Health"] {
            assert!(
                b.services.iter().any(|s| s == service),
                "{id} reflects {service}: {b:?}"
            );
        }
        assert_eq!(b.methods, ["GetItem", "SubmitJob", "GetJob"], "{id}");
    }
    let python_calls: Tally = serde_json::from_str(lines.next().context("client.py's tally")?)?;
    eprintln!("Python: {python_calls:?}");
    assert_eq!(python_calls.calls, 100);
    assert!(python_calls.errors.is_empty(), "{python_calls:?}");
    assert_eq!(
        names(&python_calls.served_by),
        ids,
        "both Bs served Python: {python_calls:?}"
    );

    // Go: etcd's resolver and round_robin, calling until stopped, one line
    // per 50 calls. It starts calling once one B is connected, so the first
    // windows may not reach the other yet.
    let mut go = Command::new(&go_client)
        // A per-call deadline no loaded machine reaches: a failed call
        // here would be the machine, not the registry.
        .args([
            "-etcd", &etcd, "-calls", "0", "-report", "50", "-timeout", "10s",
        ])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()?;
    let mut windows = BufReader::new(go.stdout.take().context("Go's stdout")?).lines();
    let line_timeout = Duration::from_secs(10);
    let started = Instant::now();
    loop {
        let window = next_tally(&mut windows, line_timeout).await?;
        assert!(window.errors.is_empty(), "{window:?}");
        assert!(
            names(&window.served_by).is_subset(&ids),
            "only registered Bs serve: {window:?}"
        );
        if names(&window.served_by) == ids {
            eprintln!("Go, first window on both Bs: {window:?}");
            break;
        }
        assert!(
            started.elapsed() < line_timeout,
            "round_robin never reached both Bs: {window:?}"
        );
    }

    // A B stopped with SIGTERM revokes its lease, then keeps serving for its
    // drain period: etcd's watch tells the resolver, and round_robin stops
    // picking b-2 while b-2 still answers. So its leaving comes from the
    // registry, not from b-2's connection going away.
    lab.stack.signal("service-b-2", Signal::SIGTERM)?;
    let stopped = Instant::now();
    // Below the drain period, so that b-2 leaving later reads as that,
    // not as a refused direct call.
    let leave_within = Duration::from_secs(4);
    let only_b1 = BTreeSet::from(["b-1".to_string()]);
    let mut windows_until_gone = 0;
    loop {
        let window = next_tally(&mut windows, line_timeout).await?;
        assert!(
            window.errors.is_empty(),
            "a graceful stop fails no call: {window:?}"
        );
        assert!(names(&window.served_by).is_subset(&ids), "{window:?}");
        if names(&window.served_by) == only_b1 {
            break;
        }
        windows_until_gone += 1;
        assert!(
            stopped.elapsed() < leave_within,
            "b-2 still picked {leave_within:?} after its SIGTERM"
        );
    }
    let gone_after = stopped.elapsed();
    let b2 = &bs["b-2"];
    // Had the resolver only dropped b-2 when b-2 closed its connections,
    // this would be refused.
    let in_drain = || {
        format!(
            "b-2 ({b2}) left the picks after {gone_after:?}: it should still serve in its drain"
        )
    };
    let answer = BackendClient::connect(format!("http://{b2}"))
        .await
        .with_context(in_drain)?
        .get_item(GetItemRequest { id: 1 })
        .await
        .with_context(in_drain)?;
    assert_eq!(answer.get_ref().served_by, "b-2");
    eprintln!(
        "b-2 gone from the Go client's picks: the first window without it ended {:.3} s \
         after the SIGTERM, {windows_until_gone} window(s) of 50 calls after it; b-2 still served",
        gone_after.as_secs_f64()
    );
    for _ in 0..5 {
        let window = next_tally(&mut windows, line_timeout).await?;
        assert_eq!(
            names(&window.served_by),
            only_b1,
            "b-2 never comes back: {window:?}"
        );
        assert!(window.errors.is_empty(), "{window:?}");
    }
    assert_eq!(
        registered(&lab)
            .await?
            .keys()
            .cloned()
            .collect::<BTreeSet<_>>(),
        only_b1,
        "etcd no longer lists b-2"
    );

    // SIGTERM ends the Go client with a summary of every call.
    let pid = go.id().context("the Go client's pid")?;
    nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGTERM)?;
    let summary = loop {
        let tally = next_tally(&mut windows, line_timeout).await?;
        if tally.summary {
            break tally;
        }
    };
    let status = tokio::time::timeout(line_timeout, go.wait()).await??;
    assert!(status.success(), "go-client exited {status}");
    eprintln!("Go, summary: {summary:?}");
    assert!(summary.errors.is_empty(), "{summary:?}");
    assert_eq!(names(&summary.served_by), ids);
    Ok(())
}
