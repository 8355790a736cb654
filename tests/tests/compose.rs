//! docker-compose.yml checked statically (`container_engine.rs` runs it on a
//! real engine, with stand-ins for the images no registry here serves):
//! what it references exists, images are pinned, every
//! long-running service has a healthcheck and waits for healthy dependencies
//! (or for one-shot ones to complete), the lab's environment variables are
//! valid config, published ports agree with the config defaults, and the
//! partner API's certificates reach partner-api and the Bs. What Prometheus
//! scrapes and the dashboard reads is checked against a running lab: every
//! target answers `/metrics`, and every metric and label the dashboard
//! queries is really served.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    time::Duration,
};

use lab_common::config::{LabConfig, Sources};
use lab_tests::{TestLab, eventually, get_json};
use nix::sys::signal::Signal;
use serde_norway::Value;

/// The lab's own image, built from deploy/docker/Dockerfile.
const LAB_IMAGE: &str = "grpc-incident-lab:local";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn compose() -> Value {
    let text =
        std::fs::read_to_string(repo().join("docker-compose.yml")).expect("docker-compose.yml");
    let mut value: Value = serde_norway::from_str(&text).expect("valid YAML");
    value.apply_merge().expect("YAML merge keys resolve");
    value
}

fn dotenv() -> BTreeMap<String, String> {
    std::fs::read_to_string(repo().join(".env"))
        .expect(".env")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .filter_map(|l| {
            l.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

fn services(c: &Value) -> &serde_norway::Mapping {
    c["services"].as_mapping().expect("services map")
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        _ => String::new(),
    }
}

/// `${NAME}`, `${NAME:-default}` → (NAME, default).
fn variables(text: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        let Some(end) = rest[start..].find('}') else {
            break;
        };
        let inner = &rest[start + 2..start + end];
        match inner.split_once(":-") {
            Some((name, default)) => out.push((name.to_string(), Some(default.to_string()))),
            None => out.push((inner.to_string(), None)),
        }
        rest = &rest[start + end + 1..];
    }
    out
}

/// Substitutes variables the way compose does, from .env and defaults.
fn interpolate(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = text.to_string();
    for (name, default) in variables(text) {
        let value = env
            .get(&name)
            .cloned()
            .or(default.clone())
            .unwrap_or_default();
        let pattern = match &default {
            Some(d) => format!("${{{name}:-{d}}}"),
            None => format!("${{{name}}}"),
        };
        out = out.replace(&pattern, &value);
    }
    out
}

/// Services that run once and exit: those others wait on to complete
/// rather than to be healthy, and those that are never restarted.
fn one_shots(svcs: &serde_norway::Mapping) -> BTreeSet<String> {
    let awaited = svcs
        .values()
        .filter_map(|svc| svc.get("depends_on")?.as_mapping())
        .flatten()
        .filter(|(_, how)| str_of(&how["condition"]) == "service_completed_successfully")
        .map(|(dep, _)| str_of(dep));
    let never_restarted = svcs
        .iter()
        .filter(|(_, svc)| str_of(&svc["restart"]) == "no")
        .map(|(name, _)| str_of(name));
    awaited.chain(never_restarted).collect()
}

/// A service's `environment` with .env substituted.
fn environment(svc: &Value, env: &BTreeMap<String, String>) -> Vec<(String, String)> {
    svc["environment"]
        .as_mapping()
        .expect("environment")
        .iter()
        .map(|(k, v)| (str_of(k), interpolate(&str_of(v), env)))
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .map(|s| s.iter().map(str_of).collect())
        .unwrap_or_default()
}

fn port_of(addr: &str) -> u16 {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr}"))
}

#[test]
fn every_variable_is_defined_and_every_image_pinned() {
    let text = std::fs::read_to_string(repo().join("docker-compose.yml")).expect("compose file");
    let env = dotenv();
    for (name, default) in variables(&text) {
        assert!(
            env.contains_key(&name) || default.is_some(),
            "${{{name}}} is used in docker-compose.yml but not set in .env and has no default"
        );
    }
    let c = compose();
    for (name, svc) in services(&c) {
        let name = str_of(name);
        let image = interpolate(&str_of(&svc["image"]), &env);
        assert!(!image.is_empty(), "{name} has no image");
        if svc.get("build").is_some() || image == LAB_IMAGE {
            assert_eq!(image, LAB_IMAGE, "{name}: locally built image tag");
            continue;
        }
        let (_, tag) = image.rsplit_once(':').unwrap_or((&image, ""));
        assert!(
            !tag.is_empty()
                && tag != "latest"
                && tag.chars().any(|c| c.is_ascii_digit())
                && tag.contains('.'),
            "{name}: image {image:?} is not pinned to a version"
        );
    }
    let dockerfile =
        std::fs::read_to_string(repo().join("deploy/docker/Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains(" AS build") && dockerfile.contains(" AS runtime"),
        "multi-stage"
    );
    let user = dockerfile
        .lines()
        .rev()
        .find(|l| l.starts_with("USER "))
        .expect("runtime stage sets USER");
    assert!(
        !user.contains("root") && !user.contains(" 0"),
        "non-root runtime: {user}"
    );
    for arg in ["RUST_VERSION", "DEBIAN_VERSION"] {
        assert!(
            env.contains_key(arg),
            "{arg} pinned in .env for the Dockerfile"
        );
    }
}

/// The lab's containers run as the image's non-root user on a read-only
/// root filesystem (a writable /tmp for heap profiles), and nothing secret
/// is in the image: the state dirs holding the operator token, the MySQL
/// password and the partner's key are kept out of the build context, the
/// runtime stage copies only the binaries and the shipped config, and that
/// config sets no operator token (each lab makes its own or takes
/// LAB_ADMIN_TOKEN). Its `mysql.url` holds compose's default `lab:lab`,
/// as public as the compose file. The third-party images (MySQL, etcd,
/// HAProxy, Prometheus, Grafana, Jaeger) keep their own users.
#[test]
fn lab_containers_run_read_only_and_the_image_carries_no_secret() {
    let c = compose();
    let mut built = 0;
    for (name, svc) in services(&c) {
        if svc.get("build").is_none() && str_of(&svc["image"]) != LAB_IMAGE {
            continue;
        }
        built += 1;
        let name = str_of(name);
        assert_eq!(svc["read_only"], Value::Bool(true), "{name}: read_only");
        // The long-running ones write heap profiles under /tmp; the
        // one-shots that only print or send need no tmpfs.
        if str_of(&svc["restart"]) != "no" {
            assert!(
                strings(&svc["tmpfs"]).contains(&"/tmp".to_string()),
                "{name}: a tmpfs on /tmp"
            );
        }
        assert!(
            svc.get("user").is_none(),
            "{name}: runs as the image's user, not {:?}",
            svc["user"]
        );
    }
    assert_eq!(
        built, 8,
        "partner-certs, partner-api, two Bs, A, and the welcome, load and jobs one-shots"
    );

    let ignored = std::fs::read_to_string(repo().join(".dockerignore")).expect(".dockerignore");
    for dir in [".lab/", "target/"] {
        assert!(
            ignored.lines().any(|l| l.trim() == dir),
            "{dir} is kept out of the build context"
        );
    }
    let dockerfile =
        std::fs::read_to_string(repo().join("deploy/docker/Dockerfile")).expect("Dockerfile");
    let runtime = dockerfile
        .split_once(" AS runtime")
        .expect("a runtime stage")
        .1;
    let user = runtime
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("the runtime stage sets USER");
    let uid: u32 = user
        .split(':')
        .next()
        .and_then(|uid| uid.parse().ok())
        .unwrap_or_else(|| panic!("USER {user} is a numeric uid"));
    assert!(uid >= 1000, "USER {user}: not root, not a system account");
    let copies: Vec<&str> = runtime.lines().filter(|l| l.starts_with("COPY ")).collect();
    assert_eq!(
        copies,
        [
            "COPY --from=binaries /out/ /usr/local/bin/",
            "COPY deploy/lab.toml /etc/lab/lab.toml"
        ],
        "the runtime stage copies the binaries and the config, nothing else"
    );
    let shipped = lab_common::config::load(&Sources {
        file: Some(repo().join("deploy/lab.toml")),
        ..Sources::default()
    })
    .expect("deploy/lab.toml is valid");
    assert!(
        !shipped.admin.token.is_set(),
        "deploy/lab.toml sets no operator token"
    );
}

#[test]
fn the_topology_matches_labctl_up() {
    let c = compose();
    let svcs = services(&c);
    for required in [
        "mysql",
        "etcd",
        "service-b-1",
        "service-b-2",
        "slb",
        "service-a",
        "prometheus",
        "grafana",
        "partner-certs",
        "partner-api",
        "jaeger",
    ] {
        assert!(svcs.contains_key(required), "service {required} missing");
    }
    let one_shots = one_shots(svcs);
    for (name, svc) in svcs {
        let name = str_of(name);
        if one_shots.contains(&name) {
            // A one-shot exits when done: no healthcheck, no restart loop.
            assert!(
                svc.get("healthcheck").is_none() && str_of(&svc["restart"]) == "no",
                "{name} is a one-shot: restart \"no\" and no healthcheck"
            );
        } else {
            assert!(
                svc.get("healthcheck").is_some(),
                "{name} has no healthcheck"
            );
        }
        if let Some(deps) = svc.get("depends_on").and_then(Value::as_mapping) {
            for (dep, how) in deps {
                let dep = str_of(dep);
                assert!(
                    svcs.contains_key(dep.as_str()),
                    "{name} depends on unknown service {dep}"
                );
                let expected = if one_shots.contains(&dep) {
                    "service_completed_successfully"
                } else {
                    "service_healthy"
                };
                assert_eq!(str_of(&how["condition"]), expected, "{name} → {dep}");
            }
        }
        // Every host file mounted into a container exists in the repo.
        for volume in svc
            .get("volumes")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let spec = str_of(volume);
            if let Some(host) = spec.strip_prefix("./") {
                let host = host.split(':').next().unwrap_or(host);
                assert!(repo().join(host).exists(), "{name} mounts missing {host}");
            }
        }
    }
    // HAProxy in compose loads the very frontends file labctl embeds, and
    // its backends name the compose B services.
    let slb = &svcs["slb"];
    let mounts: Vec<String> = slb["volumes"]
        .as_sequence()
        .expect("slb volumes")
        .iter()
        .map(str_of)
        .collect();
    assert!(
        mounts
            .iter()
            .any(|m| m.starts_with("./deploy/haproxy/haproxy.cfg:")),
        "{mounts:?}"
    );
    let backends = std::fs::read_to_string(repo().join("deploy/haproxy/backends-compose.cfg"))
        .expect("backends");
    for b in ["service-b-1:50051", "service-b-2:50051"] {
        assert_eq!(backends.matches(b).count(), 2, "{b} in both b_l4 and b_l7");
    }
    let mysql_mounts: Vec<String> = svcs["mysql"]["volumes"]
        .as_sequence()
        .expect("mysql volumes")
        .iter()
        .map(str_of)
        .collect();
    assert!(
        mysql_mounts
            .iter()
            .any(|m| m.starts_with("./deploy/mysql/init.sql:")),
        "{mysql_mounts:?}"
    );
}

/// Compose's HAProxy picks its checks from `SLB_CHECK` with `.if`: both
/// values must give a config HAProxy accepts, and only `ready` may ask the
/// Bs' admin port (9081, where compose's Bs listen) for `/readyz`.
#[test]
fn compose_haproxy_accepts_both_slb_check_values() {
    let haproxy = labctl::procs::find_binary(&["haproxy"])
        .expect("haproxy (scripts/install-deps.sh installs it)");
    let c = compose();
    let env = dotenv();
    let slb_env = &services(&c)["slb"]["environment"];
    assert_eq!(
        interpolate(&str_of(&slb_env["SLB_CHECK"]), &env),
        "tcp",
        "the incident's SLB checks TCP unless LAB_SLB_CHECK says otherwise"
    );
    let b_admin = str_of(&services(&c)["service-b-1"]["environment"]["LAB_SERVICE_B_ADMIN_LISTEN"]);
    assert!(b_admin.ends_with(":9081"), "{b_admin}");
    let dir = tempfile::tempdir().expect("temp dir");
    // The compose service names resolve only inside compose's network.
    let backends = std::fs::read_to_string(repo().join("deploy/haproxy/backends-compose.cfg"))
        .expect("backends")
        .replace("service-b-1", "127.0.0.1")
        .replace("service-b-2", "127.0.0.1");
    assert_eq!(
        backends.matches("port 9081 check-proto h1").count(),
        2,
        "{backends}"
    );
    let backends_file = dir.path().join("backends.cfg");
    std::fs::write(&backends_file, backends).expect("write");
    for check in ["tcp", "ready"] {
        let out = std::process::Command::new(&haproxy)
            .arg("-c")
            .arg("-f")
            .arg(repo().join("deploy/haproxy/haproxy.cfg"))
            .arg("-f")
            .arg(&backends_file)
            .env("SLB_L4_BIND", "127.0.0.1:1")
            .env("SLB_L7_BIND", "127.0.0.1:2")
            .env("SLB_STATS_BIND", "127.0.0.1:3")
            .env("SLB_MAXCONN", "100")
            .env("SLB_L7_BALANCE", "roundrobin")
            .env("SLB_CHECK", check)
            .output()
            .expect("haproxy runs");
        assert!(
            out.status.success(),
            "SLB_CHECK={check}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn lab_environment_is_valid_config_and_ports_agree_with_defaults() {
    let c = compose();
    let env = dotenv();
    let defaults = LabConfig::default();
    for name in ["service-a", "service-b-1", "service-b-2"] {
        let svc = &services(&c)[name];
        let vars: Vec<(String, String)> = svc["environment"]
            .as_mapping()
            .unwrap_or_else(|| panic!("{name} environment"))
            .iter()
            .map(|(k, v)| (str_of(k), interpolate(&str_of(v), &env)))
            .collect();
        assert!(
            vars.iter().any(|(k, _)| k == "LAB_MODE"),
            "{name} passes LAB_MODE through"
        );
        let config = lab_common::config::load(&Sources {
            env: vars,
            ..Sources::default()
        })
        .unwrap_or_else(|e| panic!("{name}: its environment is not valid lab config: {e}"));
        assert_eq!(
            config.mode,
            lab_common::config::Mode::Buggy,
            "{name}: LAB_MODE from .env"
        );

        // Container ports are the config's default ports; `[IP:]HOST:CONTAINER`.
        let bindings: Vec<(Option<String>, u16, u16)> = svc["ports"]
            .as_sequence()
            .expect("ports")
            .iter()
            .map(|p| {
                let p = str_of(p);
                let (rest, container) = p.rsplit_once(':').expect("HOST:CONTAINER");
                let (ip, host) = match rest.rsplit_once(':') {
                    Some((ip, host)) => (Some(ip.to_string()), host),
                    None => (None, rest),
                };
                (
                    ip,
                    host.parse().expect("host port"),
                    container.parse().expect("container port"),
                )
            })
            .collect();
        // The admin port (the second) carries the operator endpoints: it is
        // published on the host's loopback only.
        assert_eq!(
            bindings.get(1).and_then(|(ip, _, _)| ip.as_deref()),
            Some("127.0.0.1"),
            "{name}: admin port published on loopback"
        );
        let published: Vec<(u16, u16)> = bindings.iter().map(|(_, h, c)| (*h, *c)).collect();
        let port = |addr: &str| {
            addr.rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .expect("port")
        };
        let (listen, admin) = if name == "service-a" {
            (
                config.service_a.listen.clone(),
                config.service_a.admin_listen.clone(),
            )
        } else {
            (
                config.service_b.listen.clone(),
                config.service_b.admin_listen.clone(),
            )
        };
        let container_ports: Vec<u16> = published.iter().map(|(_, c)| *c).collect();
        assert_eq!(container_ports, vec![port(&listen), port(&admin)], "{name}");
        let expected_host = match name {
            "service-a" => vec![
                port(&defaults.service_a.listen),
                port(&defaults.service_a.admin_listen),
            ],
            "service-b-1" => vec![
                port(&defaults.service_b.listen),
                port(&defaults.service_b.admin_listen),
            ],
            _ => vec![
                port(&defaults.service_b.listen) + 1,
                port(&defaults.service_b.admin_listen) + 1,
            ],
        };
        let host_ports: Vec<u16> = published.iter().map(|(h, _)| *h).collect();
        assert_eq!(
            host_ports, expected_host,
            "{name}: host ports are the native defaults"
        );
    }
    let slb_ports: Vec<String> = services(&c)["slb"]["ports"]
        .as_sequence()
        .expect("slb ports")
        .iter()
        .map(str_of)
        .collect();
    for addr in [
        &defaults.slb.l4_listen,
        &defaults.slb.l7_listen,
        &defaults.slb.stats_listen,
    ] {
        let p = addr.rsplit_once(':').map(|(_, p)| p).expect("port");
        assert!(
            slb_ports.contains(&format!("{p}:{p}"))
                || slb_ports.contains(&format!("127.0.0.1:{p}:{p}")),
            "slb publishes {p}: {slb_ports:?}"
        );
    }
    let etcd_ports: Vec<String> = services(&c)["etcd"]["ports"]
        .as_sequence()
        .expect("etcd ports")
        .iter()
        .map(str_of)
        .collect();
    assert_eq!(etcd_ports, vec!["127.0.0.1:2379:2379"]);
}

/// One sample line of a `/metrics` text: its name and labels.
struct Sample {
    name: String,
    labels: BTreeMap<String, String>,
}

/// The samples of a Prometheus text exposition (values are not needed).
fn samples(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .filter_map(|line| {
            let end = line.find(['{', ' '])?;
            let name = line[..end].to_string();
            let mut labels = BTreeMap::new();
            if let Some(rest) = line[end..].strip_prefix('{') {
                // k="v" pairs; values may hold `,`, `{`, `}` and `\"`.
                let mut rest = rest;
                while let Some((key, after)) = rest.split_once("=\"") {
                    let mut value = String::new();
                    let mut chars = after.char_indices();
                    let mut close = after.len();
                    while let Some((i, c)) = chars.next() {
                        match c {
                            '\\' => value.extend(chars.next().map(|(_, c)| c)),
                            '"' => {
                                close = i;
                                break;
                            }
                            c => value.push(c),
                        }
                    }
                    labels.insert(key.trim_start_matches(',').to_string(), value);
                    rest = after.get(close + 1..).unwrap_or("");
                    if rest.starts_with('}') {
                        break;
                    }
                }
            }
            Some(Sample { name, labels })
        })
        .collect()
}

/// The metric names an expression reads.
fn metric_names(expr: &str) -> Vec<&str> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| {
            ["lab_", "tokio_", "process_", "partner_"]
                .iter()
                .any(|prefix| w.starts_with(prefix))
        })
        .collect()
}

/// The labels an expression groups by (`by (a, b)`) or selects on
/// (`{a="v"}`), with the selected value when there is one.
fn labels_used(expr: &str) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("by (") {
        let inner = &rest[at + 4..];
        let close = inner.find(')').unwrap_or(inner.len());
        out.extend(
            inner[..close]
                .split(',')
                .map(|l| (l.trim().to_string(), None)),
        );
        rest = &inner[close..];
    }
    let mut rest = expr;
    while let Some(at) = rest.find('{') {
        let inner = &rest[at + 1..];
        let close = inner.find('}').unwrap_or(inner.len());
        for pair in inner[..close].split(',') {
            if let Some((k, v)) = pair.split_once('=') {
                out.push((
                    k.trim().to_string(),
                    Some(v.trim().trim_matches('"').to_string()),
                ));
            }
        }
        rest = &inner[close..];
    }
    out
}

/// Drives a running lab through what the dashboard shows — requests,
/// jobs, shedding, a dead endpoint — so that every labelled metric has a
/// sample: a metric family with no sample is not in `/metrics` at all.
async fn exercised_lab() -> anyhow::Result<TestLab> {
    let lab = TestLab::start(
        2,
        &[
            "mode=fixed",
            "service_b.max_concurrent_requests=1",
            "service_b.handler_latency=200ms",
            "worker.tick=100ms",
            "worker.cpu_per_kib=0s",
            "partner.latency=10ms",
        ],
    )
    .await?;
    lab.insert_jobs(4, 0.0).await?;
    eventually(Duration::from_secs(20), "a job done", || async {
        let mut done = 0.0;
        for b in ["service-b-1", "service-b-2"] {
            done += lab
                .metric(b, "lab_jobs_total", &[("outcome", "done")])
                .await
                .unwrap_or(0.0);
        }
        (done >= 1.0).then_some(())
    })
    .await?;
    // One slot per B and 200 ms per request: a burst is partly shed.
    eventually(Duration::from_secs(20), "a request shed", || async {
        let burst = (1..=10).map(|id| get_json_ok(format!("{}/api/items/{id}", lab.a_url())));
        futures::future::join_all(burst).await;
        let mut shed = 0.0;
        for b in ["service-b-1", "service-b-2"] {
            shed += lab
                .metric(b, "lab_requests_refused_total", &[])
                .await
                .unwrap_or(0.0);
        }
        (shed >= 1.0).then_some(())
    })
    .await?;
    Ok(lab)
}

/// A GET whose outcome does not matter (it is there to move metrics).
async fn get_json_ok(url: String) {
    let _ = get_json(&url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_reads_is_served_by_a_running_lab() -> anyhow::Result<()> {
    // What Prometheus scrapes: service → the labels its targets add.
    let prometheus: Value = serde_norway::from_str(&std::fs::read_to_string(
        repo().join("deploy/prometheus/prometheus.yml"),
    )?)?;
    let mut scraped: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    for job in prometheus["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
    {
        for config in job["static_configs"].as_sequence().expect("static_configs") {
            let labels: BTreeMap<String, String> = config
                .get("labels")
                .and_then(Value::as_mapping)
                .into_iter()
                .flatten()
                .map(|(k, v)| (str_of(k), str_of(v)))
                .collect();
            for target in strings(&config["targets"]) {
                let (host, _) = target.rsplit_once(':').expect("host:port target");
                scraped.insert(host.to_string(), labels.clone());
            }
        }
    }

    let lab = exercised_lab().await?;
    let mut exported: Vec<(String, Sample)> = Vec::new();
    let mut scrape = async |service: &str| -> anyhow::Result<()> {
        let text = lab.metrics(service).await?;
        let extra = scraped.get(service).cloned().unwrap_or_default();
        exported.retain(|(s, _)| s != service);
        for mut sample in samples(&text) {
            sample.labels.extend(extra.clone());
            exported.push((service.to_string(), sample));
        }
        Ok(())
    };
    for service in scraped.keys() {
        // Every target Prometheus is given answers /metrics in the lab.
        scrape(service).await?;
    }
    // A dead endpoint is ejected by A: kill b-2 and read until A says so.
    lab.stack.signal("service-b-2", Signal::SIGKILL)?;
    eventually(Duration::from_secs(20), "A to eject the dead B", || async {
        get_json_ok(format!("{}/api/items/1", lab.a_url())).await;
        lab.metric("service-a", "lab_backend_ejections_total", &[])
            .await
            .filter(|n| *n >= 1.0)
    })
    .await?;
    scrape("service-a").await?;

    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        repo().join("deploy/grafana/dashboards/lab.json"),
    )?)?;
    let panels = dashboard["panels"].as_array().expect("panels");
    assert!(!panels.is_empty());
    let mut checked = BTreeSet::new();
    for panel in panels {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            for name in names {
                let of_name: Vec<&(String, Sample)> =
                    exported.iter().filter(|(_, s)| s.name == name).collect();
                assert!(
                    !of_name.is_empty(),
                    "the dashboard reads {name} ({expr}); no service of the lab serves it"
                );
                for (label, value) in labels_used(expr) {
                    if label == "le" && name.ends_with("_bucket") {
                        continue;
                    }
                    assert!(
                        of_name.iter().any(|(_, s)| match &value {
                            Some(v) => s.labels.get(&label) == Some(v),
                            None => s.labels.contains_key(&label),
                        }),
                        "the dashboard reads {name} by {label}{} ({expr}); served by {:?} without it",
                        value.map(|v| format!("=\"{v}\"")).unwrap_or_default(),
                        of_name.iter().map(|(svc, _)| svc).collect::<BTreeSet<_>>()
                    );
                }
                checked.insert(name);
            }
        }
    }
    println!(
        "{} metrics the dashboard reads, all served by {:?}",
        checked.len(),
        scraped.keys().collect::<Vec<_>>()
    );
    Ok(())
}

#[test]
fn the_partner_api_gets_its_certificates_and_the_bs_trust_its_ca() {
    let c = compose();
    let env = dotenv();
    let svcs = services(&c);
    let defaults = LabConfig::default();
    assert!(
        c["volumes"]
            .as_mapping()
            .is_some_and(|v| v.contains_key("tls")),
        "named volume tls declared"
    );

    // The one-shot writes the certificates into the volume, for the name
    // the Bs dial.
    let init = &svcs["partner-certs"];
    let command = strings(&init["command"]);
    assert_eq!(command[..2], ["partner-api", "certs"], "{command:?}");
    let arg = |flag: &str| -> Vec<String> {
        command
            .windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].clone())
            .collect()
    };
    let dirs = arg("--dir");
    let [dir] = dirs.as_slice() else {
        panic!("one --dir: {command:?}")
    };
    let hosts = arg("--host");
    assert!(
        strings(&init["volumes"]).contains(&format!("tls:{dir}")),
        "partner-certs mounts tls writable at {dir}"
    );
    // The file names `partner_api::certs` writes.
    let ca = format!("{dir}/ca.pem");
    let cert = format!("{dir}/partner.pem");
    let key = format!("{dir}/partner.key");

    // partner-api: valid config, its files from the read-only volume, and
    // the native default ports.
    let partner = &svcs["partner-api"];
    assert_eq!(strings(&partner["command"]), ["partner-api"]);
    assert!(
        strings(&partner["volumes"]).contains(&format!("tls:{dir}:ro")),
        "partner-api mounts tls read-only"
    );
    let config = lab_common::config::load(&Sources {
        env: environment(partner, &env),
        ..Sources::default()
    })
    .unwrap_or_else(|e| panic!("partner-api: its environment is not valid lab config: {e}"));
    assert_eq!(
        (config.partner.cert.as_str(), config.partner.key.as_str()),
        (cert.as_str(), key.as_str())
    );
    let listen = port_of(&config.partner.listen);
    let admin = port_of(&config.partner.admin_listen);
    let expected_ports = vec![
        format!("127.0.0.1:{}:{listen}", port_of(&defaults.partner.listen)),
        format!(
            "127.0.0.1:{}:{admin}",
            port_of(&defaults.partner.admin_listen)
        ),
    ];
    assert_eq!(
        strings(&partner["ports"]),
        expected_ports,
        "partner-api ports"
    );
    let healthcheck = strings(&partner["healthcheck"]["test"]).join(" ");
    assert!(
        healthcheck.contains(&format!(":{admin}/readyz")),
        "{healthcheck}"
    );

    // Every B dials partner-api by its service name, on its port, and
    // trusts only the CA from the read-only volume.
    for name in ["service-b-1", "service-b-2"] {
        let b = &svcs[name];
        let config = lab_common::config::load(&Sources {
            env: environment(b, &env),
            ..Sources::default()
        })
        .unwrap_or_else(|e| panic!("{name}: its environment is not valid lab config: {e}"));
        let url = &config.partner.url;
        let host_port = url
            .strip_prefix("https://")
            .unwrap_or_else(|| panic!("{name}: partner.url {url} is not https"));
        let host = host_port.split(':').next().unwrap_or_default();
        assert_eq!(host, "partner-api", "{name} dials the compose service");
        assert!(hosts.iter().any(|h| h == host), "certificate names {host}");
        assert_eq!(port_of(host_port), listen, "{name}: partner port");
        assert_eq!(config.partner.ca_cert, ca, "{name}: CA file");
        assert!(
            strings(&b["volumes"]).contains(&format!("tls:{dir}:ro")),
            "{name} mounts tls read-only"
        );
        assert_eq!(
            str_of(&b["depends_on"]["partner-api"]["condition"]),
            "service_healthy",
            "{name} waits for partner-api"
        );
    }

    // Prometheus scrapes the partner's admin port.
    let prometheus: Value = serde_norway::from_str(
        &std::fs::read_to_string(repo().join("deploy/prometheus/prometheus.yml"))
            .expect("prometheus.yml"),
    )
    .expect("prometheus.yml is YAML");
    let targets: Vec<String> = prometheus["scrape_configs"]
        .as_sequence()
        .expect("scrape_configs")
        .iter()
        .flat_map(|job| {
            job["static_configs"]
                .as_sequence()
                .cloned()
                .unwrap_or_default()
        })
        .flat_map(|sc| strings(&sc["targets"]))
        .collect();
    assert!(
        targets.contains(&format!("partner-api:{admin}")),
        "{targets:?}"
    );

    // The image has the binary, and a /tls owned by the non-root user: a
    // new named volume copies that owner, so the init container can write
    // and partner-api can read its 0600 key.
    let dockerfile =
        std::fs::read_to_string(repo().join("deploy/docker/Dockerfile")).expect("Dockerfile");
    assert!(
        dockerfile.contains("target/release/partner-api"),
        "the image ships partner-api"
    );
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("USER")
        .trim();
    assert!(
        dockerfile.contains(&format!("chown {user} {dir}")),
        "{dir} is prepared for user {user} in the image"
    );
}

/// Every lab service logs JSON lines (with the trace id) and exports its
/// spans to the compose trace backend, on the port that backend takes
/// OTLP/HTTP on; Grafana reads that backend through a provisioned datasource.
#[test]
fn the_lab_services_log_json_and_export_spans_to_jaeger() {
    let c = compose();
    let env = dotenv();
    let svcs = services(&c);
    let jaeger = &svcs["jaeger"];
    let jaeger_ports: Vec<u16> = strings(&jaeger["ports"])
        .iter()
        .map(|p| port_of(p))
        .collect();
    for name in ["service-a", "service-b-1", "service-b-2", "partner-api"] {
        let config = lab_common::config::load(&Sources {
            env: environment(&svcs[name], &env),
            ..Sources::default()
        })
        .unwrap_or_else(|e| panic!("{name}: its environment is not valid lab config: {e}"));
        assert_eq!(
            config.telemetry.log_format,
            lab_common::config::LogFormat::Json,
            "{name} logs JSON"
        );
        let endpoint = &config.telemetry.otlp_endpoint;
        let authority = endpoint
            .strip_prefix("http://")
            .unwrap_or_else(|| panic!("{name}: OTLP endpoint {endpoint:?} is not http://"));
        let (host, port) = authority
            .trim_end_matches('/')
            .rsplit_once(':')
            .unwrap_or_else(|| panic!("{name}: {endpoint:?} has no port"));
        assert_eq!(host, "jaeger", "{name} exports to the jaeger service");
        assert_eq!(port, "4318", "{name}: OTLP/HTTP's port");
        assert!(
            jaeger_ports.contains(&4318),
            "jaeger takes OTLP/HTTP on 4318: {jaeger_ports:?}"
        );
    }
    let datasource =
        std::fs::read_to_string(repo().join("deploy/grafana/provisioning/datasources/jaeger.yml"))
            .expect("the Jaeger datasource");
    let datasource: Value = serde_norway::from_str(&datasource).expect("YAML");
    let source = &datasource["datasources"][0];
    assert_eq!(str_of(&source["type"]), "jaeger");
    let url = str_of(&source["url"]);
    let query_port = port_of(url.trim_start_matches("http://jaeger"));
    assert!(
        url.starts_with("http://jaeger:") && jaeger_ports.contains(&query_port),
        "Grafana reads jaeger's query port: {url} vs {jaeger_ports:?}"
    );
}

/// What users expect of a compose file: one port per UI on every
/// interface and everything else on the host's loopback only, a restart
/// policy and a memory limit on every long-running service, the optional
/// parts behind profiles, and `docker compose up` saying where each UI is.
#[test]
fn one_public_port_per_ui_limits_restarts_profiles_and_a_welcome() {
    let c = compose();
    let svcs = services(&c);
    // A's API, Grafana, Prometheus, HAProxy's stats, Jaeger.
    let uis: BTreeSet<u16> = [8080, 3000, 9090, 8404, 16686].into();
    let mut public = BTreeSet::new();
    for (name, svc) in svcs {
        let name = str_of(name);
        for binding in strings(&svc["ports"]) {
            let host = binding
                .rsplit_once(':')
                .map(|(rest, _)| rest)
                .expect("HOST:CONTAINER");
            match host.split_once(':') {
                Some((ip, _)) => assert_eq!(ip, "127.0.0.1", "{name}: {binding}"),
                None => {
                    let port: u16 = host.parse().expect("host port");
                    assert!(
                        uis.contains(&port),
                        "{name}: {binding} is on every interface but is no UI"
                    );
                    public.insert(port);
                }
            }
        }
    }
    assert_eq!(public, uis, "each UI is published once, on every interface");

    let one_shots = one_shots(svcs);
    for (name, svc) in svcs {
        let name = str_of(name);
        let limit = str_of(&svc["mem_limit"]);
        assert!(
            limit.ends_with('m') || limit.ends_with('g'),
            "{name}: a memory limit, got {limit:?}"
        );
        if !one_shots.contains(&name) {
            assert_eq!(str_of(&svc["restart"]), "unless-stopped", "{name}: restart");
        }
    }

    let profiles: BTreeMap<String, Vec<String>> = svcs
        .iter()
        .filter(|(_, svc)| svc.get("profiles").is_some())
        .map(|(name, svc)| (str_of(name), strings(&svc["profiles"])))
        .collect();
    let expected: BTreeMap<String, Vec<String>> =
        [("jaeger", "tracing"), ("load", "load"), ("jobs", "load")]
            .into_iter()
            .map(|(name, profile)| (name.to_string(), vec![profile.to_string()]))
            .collect();
    assert_eq!(profiles, expected, "the optional parts and nothing else");

    let welcome = strings(&svcs["welcome"]["command"]).join(" ");
    for port in &uis {
        assert!(
            welcome.contains(&format!("http://localhost:{port}")),
            "the welcome names the UI on {port}: {welcome}"
        );
    }
}
