//! Live switches, A's side and `labctl faults` (issue #10, items 5 and 6):
//! `lb` flipped on a running A moves new requests to the new channel
//! without failing one, and leaves nothing of the old channel behind;
//! `labctl faults` reads and flips every process's switches; the operator
//! token guards `PUT /faults` and is never shown.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use lab_common::faults::Switch;
use lab_tests::{TestLab, eventually, plain_client};
use labctl::faults::{self, Assignment};
use serde_json::{Value, json};

/// One request of the background load.
#[derive(Debug, Clone)]
struct Outcome {
    sent: Instant,
    status: Option<u16>,
    served_by: Option<String>,
    error: Option<String>,
}

/// Closed-loop load on A's API that records every request, so shares can
/// be measured over any window (here: the requests sent after a flip).
struct Load {
    outcomes: Arc<Mutex<Vec<Outcome>>>,
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(a_url: String, concurrency: usize) -> anyhow::Result<Load> {
        let outcomes = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let client = plain_client()?;
        let workers = (0..concurrency)
            .map(|worker| {
                let (client, outcomes, stop, a_url) = (
                    client.clone(),
                    outcomes.clone(),
                    stop.clone(),
                    a_url.clone(),
                );
                tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let id = 1 + (worker as u64 * 7919 + n * 104_729) % 10_000;
                        let sent = Instant::now();
                        let outcome =
                            match client.get(format!("{a_url}/api/items/{id}")).send().await {
                                Ok(response) => Outcome {
                                    sent,
                                    status: Some(response.status().as_u16()),
                                    served_by: response
                                        .headers()
                                        .get("x-served-by")
                                        .and_then(|v| v.to_str().ok())
                                        .map(str::to_owned),
                                    error: None,
                                },
                                Err(e) => Outcome {
                                    sent,
                                    status: None,
                                    served_by: None,
                                    error: Some(e.to_string()),
                                },
                            };
                        outcomes.lock().expect("lock").push(outcome);
                    }
                })
            })
            .collect();
        Ok(Load {
            outcomes,
            stop,
            workers,
        })
    }

    /// Requests per B among the last `window` sent after `since`, once
    /// there are that many.
    fn shares(&self, since: Instant, window: usize) -> Option<BTreeMap<String, usize>> {
        let outcomes = self.outcomes.lock().expect("lock");
        let after: Vec<&Outcome> = outcomes.iter().filter(|o| o.sent >= since).collect();
        if after.len() < window {
            return None;
        }
        let mut shares = BTreeMap::new();
        for o in &after[after.len() - window..] {
            *shares
                .entry(o.served_by.clone().unwrap_or_else(|| "none".into()))
                .or_insert(0) += 1;
        }
        Some(shares)
    }

    async fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            let _ = worker.await;
        }
        let outcomes = self.outcomes.lock().expect("lock");
        outcomes.clone()
    }
}

/// Requests measured per window: enough for a share to mean something.
const WINDOW: usize = 200;

fn pinned(shares: &BTreeMap<String, usize>) -> bool {
    shares.values().any(|n| *n as f64 >= 0.95 * WINDOW as f64)
}

fn spread(shares: &BTreeMap<String, usize>) -> bool {
    shares.len() == 2 && shares.values().all(|n| *n as f64 >= 0.3 * WINDOW as f64)
}

/// Flips `lb` with labctl's own code, against the lab's state dir and
/// token, and checks A reports the change.
async fn flip_lb(lab: &TestLab, to: &str) -> anyhow::Result<()> {
    let token = labctl::token::read(&lab.stack.state.state_dir)?;
    let assignment: Assignment = format!("lb={to}").parse()?;
    let results = faults::set(&lab.stack.state, &token, &[assignment]).await?;
    assert_eq!(results.len(), 1, "lb is A's alone: {results:?}");
    let a = &results[0];
    assert_eq!(a.name, "service-a");
    assert_eq!(a.error, None);
    assert_eq!(a.changed.len(), 1, "{a:?}");
    assert_eq!(a.changed[0].to, to);
    Ok(())
}

/// Waits until the requests sent after `since` show `pattern`; returns
/// how long that took from `since` and the shares seen.
async fn until_shares(
    load: &Load,
    since: Instant,
    what: &str,
    pattern: fn(&BTreeMap<String, usize>) -> bool,
) -> anyhow::Result<(Duration, BTreeMap<String, usize>)> {
    let shares = eventually(Duration::from_secs(20), what, || async {
        load.shares(since, WINDOW).filter(pattern)
    })
    .await?;
    Ok((since.elapsed(), shares))
}

/// The remote ports of A's established TCP connections, read from /proc
/// (A's socket inodes, looked up in the kernel's TCP tables).
fn tcp_peers(pid: u32) -> anyhow::Result<Vec<u16>> {
    let mut inodes = BTreeSet::new();
    for fd in std::fs::read_dir(format!("/proc/{pid}/fd"))? {
        let Ok(target) = std::fs::read_link(fd?.path()) else {
            continue;
        };
        if let Some(inode) = target
            .to_str()
            .and_then(|t| t.strip_prefix("socket:["))
            .and_then(|t| t.strip_suffix(']'))
        {
            inodes.insert(inode.to_string());
        }
    }
    let mut peers = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            // sl local rem st tx:rx tr:when retrnsmt uid timeout inode
            if cols.len() > 9 && cols[3] == "01" && inodes.contains(cols[9]) {
                let port = cols[2].rsplit(':').next().unwrap_or_default();
                peers.push(u16::from_str_radix(port, 16)?);
            }
        }
    }
    Ok(peers)
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lb_flips_live_under_load_without_failing_a_request_or_leaking() -> anyhow::Result<()> {
    // Every call takes 20 ms in B, so at each flip calls are in flight on
    // the old channel: they must finish there.
    let lab = TestLab::start(2, &["faults.lb=l4", "service_b.handler_latency=20ms"]).await?;
    let a = lab.stack.service("service-a")?.clone();
    let etcd_port = port_of(&lab.stack.config.etcd.endpoints[0]);
    let b_ports: Vec<u16> = lab
        .stack
        .state
        .backends()
        .map(|b| port_of(b.grpc_addr.as_deref().expect("B's gRPC address")))
        .collect();
    let tasks_idle = lab
        .metric("service-a", "tokio_alive_tasks", &[])
        .await
        .expect("tokio_alive_tasks");

    let load = Load::start(lab.a_url(), 4)?;
    let started = Instant::now();
    let (_, l4) = until_shares(&load, started, "l4 to pin one B", pinned).await?;
    println!("l4 (at start): {l4:?}");

    let mut figures = Vec::new();
    for (to, pattern, expect_endpoints) in [
        ("etcd", spread as fn(&_) -> bool, 2.0),
        ("l4", pinned, 1.0),
        ("l7", spread, 1.0),
        ("etcd", spread, 2.0),
        ("l4", pinned, 1.0),
    ] {
        let flipped = Instant::now();
        flip_lb(&lab, to).await?;
        let (took, shares) =
            until_shares(&load, flipped, &format!("{to}'s shares"), pattern).await?;
        eventually(
            Duration::from_secs(10),
            "lab_backend_endpoints of the mode",
            || async {
                (lab.metric("service-a", "lab_backend_endpoints", &[]).await
                    == Some(expect_endpoints))
                .then_some(())
            },
        )
        .await?;
        println!("{to}: {shares:?} within {took:?} of the flip");
        figures.push((to, took, shares));
    }
    let outcomes = load.stop().await;

    // Not one request failed across five flips.
    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.status != Some(200)).collect();
    println!(
        "{} requests in {:?}, {} failed",
        outcomes.len(),
        started.elapsed(),
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the flips, e.g. {:?}",
        failed.len(),
        outcomes.len(),
        failed
            .iter()
            .take(5)
            .map(|o| (o.status, o.served_by.as_deref(), o.error.as_deref()))
            .collect::<Vec<_>>()
    );

    // Back on l4, nothing of the etcd and l7 channels is left: no
    // connection to etcd (discovery stopped) or to a B (the balancer's
    // endpoints closed), one to the proxy, and the task count back where
    // it was before the flips.
    let peers = eventually(
        Duration::from_secs(15),
        "A's old connections to close",
        || async {
            let peers = tcp_peers(a.pid).ok()?;
            let stale = peers
                .iter()
                .filter(|p| **p == etcd_port || b_ports.contains(p))
                .count();
            (stale == 0).then_some(peers)
        },
    )
    .await?;
    println!("A's TCP peers on l4 after the flips: {peers:?}");
    let tasks = eventually(
        Duration::from_secs(15),
        "A's tasks back to their idle count",
        || async {
            let now = lab.metric("service-a", "tokio_alive_tasks", &[]).await?;
            (now <= tasks_idle + 1.0).then_some(now)
        },
    )
    .await?;
    println!("tokio_alive_tasks on A: {tasks_idle} idle before, {tasks} after five flips");

    let log = std::fs::read_to_string(&a.log)?;
    assert_eq!(
        log.matches("A's channel rebuilt").count(),
        5,
        "each flip logged once"
    );
    Ok(())
}

async fn json_of(response: reqwest::Response) -> anyhow::Result<Value> {
    Ok(serde_json::from_str(&response.text().await?)?)
}

/// The path of the labctl binary built beside the services.
fn labctl_bin() -> anyhow::Result<std::path::PathBuf> {
    Ok(labctl::procs::find_lab_binary("labctl", None)?)
}

fn labctl(state_dir: &Path, args: &[&str]) -> anyhow::Result<std::process::Output> {
    Ok(std::process::Command::new(labctl_bin()?)
        .args(args)
        .arg("--state-dir")
        .arg(state_dir)
        .output()?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn labctl_faults_shows_and_flips_every_process_and_the_token_guards_a() -> anyhow::Result<()>
{
    let lab = TestLab::start(2, &["faults.lb=l4", "faults.worker=unbounded"]).await?;
    let state_dir = lab.stack.state.state_dir.clone();
    let token = lab.admin_token();
    let a_admin = lab.admin_url("service-a")?;
    let backends: Vec<String> = lab.stack.state.backends().map(|b| b.name.clone()).collect();
    assert_eq!(backends.len(), 2);

    // (c) `labctl faults` shows every process and what it owns.
    let shown = labctl(&state_dir, &["faults", "--json"])?;
    assert!(shown.status.success(), "{shown:?}");
    let shown: Value = serde_json::from_slice(&shown.stdout)?;
    let by_name: BTreeMap<&str, &Value> = shown["processes"]
        .as_array()
        .expect("processes")
        .iter()
        .map(|p| (p["name"].as_str().expect("name"), &p["faults"]))
        .collect();
    assert_eq!(
        by_name["service-a"],
        &json!({"lb": "l4", "deadline": "ignore"})
    );
    assert_eq!(by_name["partner-api"], &json!({}));
    for b in &backends {
        let keys: Vec<&str> = by_name[b.as_str()]
            .as_object()
            .expect("B's switches")
            .keys()
            .map(String::as_str)
            .collect();
        let owned: Vec<&str> = Switch::SERVICE_B.iter().map(|s| s.name()).collect();
        assert_eq!(keys.len(), owned.len(), "{b}: {keys:?}");
        assert!(owned.iter().all(|k| keys.contains(k)), "{b}: {keys:?}");
        assert_eq!(by_name[b.as_str()]["worker"], "unbounded");
    }

    // A bad key or value is refused before anything is sent: exit 2.
    for bad in ["wroker=bounded", "worker=fast", "faults.worker=capped"] {
        let args = ["faults", "set", "worker=bounded", bad];
        let out = labctl(&state_dir, &args)?;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {out:?}");
    }
    for b in &backends {
        assert_eq!(
            lab.metric(
                b,
                "lab_fault_info",
                &[("switch", "worker"), ("value", "unbounded")]
            )
            .await,
            Some(1.0),
            "{b} untouched by a refused set"
        );
    }

    // `labctl faults set worker=bounded` flips it on every B, and only there.
    let out = labctl(&state_dir, &["faults", "set", "worker=bounded"])?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{out:?}");
    println!("labctl faults set worker=bounded:\n{stdout}");
    for b in &backends {
        assert!(
            stdout.contains(&format!("{b:<14} worker unbounded → bounded")),
            "{stdout}"
        );
        let faults = json_of(lab.operator(b, "GET", "/faults", None).await?).await?;
        assert_eq!(faults["faults"]["worker"], "bounded", "{b}: {faults}");
        for (value, expected) in [("bounded", 1.0), ("unbounded", 0.0), ("capped", 0.0)] {
            assert_eq!(
                lab.metric(
                    b,
                    "lab_fault_info",
                    &[("switch", "worker"), ("value", value)]
                )
                .await,
                Some(expected),
                "{b}: lab_fault_info worker={value}"
            );
        }
    }
    assert!(!stdout.contains("service-a"), "A owns no worker: {stdout}");
    let status = labctl(&state_dir, &["status"])?;
    let status = String::from_utf8_lossy(&status.stdout).into_owned();
    assert_eq!(
        status.matches("worker=bounded").count(),
        2,
        "status shows the live switches: {status}"
    );

    // (b) A refuses a switch it does not own, and changes nothing.
    for patch in [
        json!({"worker": "bounded"}),
        json!({"lb": "etcd", "worker": "bounded"}),
    ] {
        let response = lab
            .operator("service-a", "PUT", "/faults", Some(patch.to_string()))
            .await?;
        assert_eq!(response.status(), 400, "{patch}");
        let body = json_of(response).await?;
        assert_eq!(body["code"], "invalid_argument");
        assert!(
            body["error"]
                .as_str()
                .is_some_and(|e| e.contains("`worker` belongs to service-b")),
            "{body}"
        );
    }
    let faults = json_of(
        plain_client()?
            .get(format!("{a_admin}/faults"))
            .send()
            .await?,
    )
    .await?;
    assert_eq!(faults["faults"], json!({"lb": "l4", "deadline": "ignore"}));
    assert_eq!(
        lab.metric(
            "service-a",
            "lab_fault_info",
            &[("switch", "lb"), ("value", "l4")]
        )
        .await,
        Some(1.0)
    );
    assert_eq!(
        lab.metric("service-a", "lab_backend_endpoints", &[]).await,
        Some(1.0),
        "still the proxy"
    );

    // (d) The token: 401 without, 403 wrong, never echoed or logged.
    let client = plain_client()?;
    let put = |auth: Option<String>| {
        let mut request = client
            .put(format!("{a_admin}/faults"))
            .header("content-type", "application/json")
            .body(r#"{"lb":"etcd"}"#);
        if let Some(auth) = auth {
            request = request.header("authorization", auth);
        }
        request.send()
    };
    let mut bodies = Vec::new();
    for (auth, expected) in [
        (None, 401),
        (Some("Basic abc".to_string()), 401),
        (Some(format!("Bearer {token}x")), 403),
        (Some(format!("Bearer {}", &token[..token.len() - 1])), 403),
    ] {
        let response = put(auth.clone()).await?;
        assert_eq!(response.status(), expected, "{auth:?}");
        bodies.push(response.text().await?);
    }
    bodies.push(faults.to_string());
    for name in ["service-a", "service-b-1", "service-b-2"] {
        bodies.push(
            client
                .get(format!("{}/faults", lab.admin_url(name)?))
                .send()
                .await?
                .text()
                .await?,
        );
    }
    for body in &bodies {
        assert!(!body.contains(&token), "the token is echoed: {body}");
    }
    assert_eq!(
        lab.metric(
            "service-a",
            "lab_fault_info",
            &[("switch", "lb"), ("value", "l4")]
        )
        .await,
        Some(1.0),
        "refused PUTs changed nothing"
    );
    let a_log = std::fs::read_to_string(&lab.stack.service("service-a")?.log)?;
    assert!(
        a_log.contains("operator endpoint refused"),
        "the refusals are logged"
    );
    for record in &lab.stack.state.services {
        let log = std::fs::read_to_string(&record.log).unwrap_or_default();
        assert!(
            !log.contains(&token),
            "{} logs the token ({})",
            record.name,
            record.log.display()
        );
    }
    assert!(!stdout.contains(&token) && !status.contains(&token));
    Ok(())
}

/// The dashboard marks every switch flip: an annotation on the provisioned
/// Prometheus that reads `lab_fault_info` and names the switch and value.
#[test]
fn the_dashboard_annotates_switch_flips() {
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo.join("deploy/grafana/dashboards/lab.json"))
            .expect("dashboard"),
    )
    .expect("dashboard JSON");
    let datasource = std::fs::read_to_string(
        repo.join("deploy/grafana/provisioning/datasources/prometheus.yml"),
    )
    .expect("datasource");
    let flips: Vec<&Value> = dashboard["annotations"]["list"]
        .as_array()
        .expect("annotations")
        .iter()
        .filter(|a| {
            a["expr"]
                .as_str()
                .is_some_and(|e| e.contains("lab_fault_info"))
        })
        .collect();
    assert_eq!(flips.len(), 1, "one flip annotation");
    let flip = flips[0];
    assert_eq!(flip["enable"], true);
    let uid = flip["datasource"]["uid"].as_str().expect("datasource uid");
    assert!(datasource.contains(&format!("uid: {uid}")), "{uid}");
    let text = format!("{}{}", flip["titleFormat"], flip["textFormat"]);
    assert!(
        text.contains("{{switch}}") && text.contains("{{value}}"),
        "{text}"
    );
}
