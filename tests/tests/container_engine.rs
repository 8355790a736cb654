//! The compose stack on a real container engine: the lab's image built from
//! `deploy/docker/Dockerfile`, and `docker-compose.yml` brought up, checked,
//! switched to the fixed preset and taken down.
//!
//! No image can be pulled here, so the test makes what it would pull:
//! `debian:<DEBIAN_VERSION>-slim` from Debian's packages (mmdebstrap, then
//! `docker import`), the lab's image from binaries built outside
//! (`BINARIES=prebuilt`: this run's debug build, not the rust image's
//! release build), and the infrastructure from Debian's packages through
//! `deploy/docker/local/compose.yml` laid over the real file. What that
//! leaves uncovered: the official MySQL, etcd, HAProxy and Prometheus
//! images themselves (their Debian stand-ins keep their contract), Grafana
//! and Jaeger (no Debian package: moved to profiles by the override), and
//! the Dockerfile's build stage.
//!
//! Engine: Debian's `docker.io` (`scripts/install-deps.sh --for-tests`), with
//! its own client `/usr/bin/docker`: a newer CLI on PATH without the buildx
//! plugin cannot build with BuildKit, which the Dockerfile needs. The test
//! starts `dockerd` if none answers. Compose: Debian's `docker-compose`
//! (v1.29); the file is the one `docker compose` (v2) reads.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::Context;
use lab_tests::{eventually, get_json};
use tokio::process::Command;

/// Debian's docker.io client, the daemon's own version.
const DOCKER: &str = "/usr/bin/docker";
const PROJECT: &str = "labengine";
const LAB_IMAGE: &str = "grpc-incident-lab:local";
/// The services that run until stopped (partner-certs is a one-shot).
const LONG_RUNNING: [&str; 8] = [
    "mysql",
    "etcd",
    "partner-api",
    "service-b-1",
    "service-b-2",
    "slb",
    "service-a",
    "prometheus",
];
const A: &str = "http://127.0.0.1:8080";
const A_METRICS: &str = "http://127.0.0.1:9080/metrics";
const B1_METRICS: &str = "http://127.0.0.1:9081/metrics";
const B2_METRICS: &str = "http://127.0.0.1:9082/metrics";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository")
}

/// Runs a command to completion; its output on success, an error with its
/// stderr otherwise.
async fn run(program: &str, args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    let output = Command::new(program)
        .args(args)
        .envs(env.iter().copied())
        .current_dir(repo())
        .stdin(Stdio::null())
        .output()
        .await
        .with_context(|| format!("{program} {}", args.join(" ")))?;
    anyhow::ensure!(
        output.status.success(),
        "{program} {}: {}\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

async fn docker(args: &[&str]) -> anyhow::Result<String> {
    run(DOCKER, args, &[]).await
}

/// `docker-compose` on the real file and the local stand-ins, as project
/// `labengine`, with `env` on top of `.env`.
async fn compose(args: &[&str], env: &[(&str, &str)]) -> anyhow::Result<String> {
    run("docker-compose", &compose_args(args), env).await
}

fn compose_args<'a>(args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec![
        "-p",
        PROJECT,
        "-f",
        "docker-compose.yml",
        "-f",
        "deploy/docker/local/compose.yml",
    ];
    all.extend_from_slice(args);
    all
}

fn dotenv(key: &str) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(repo().join(".env"))?;
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .with_context(|| format!("{key} in .env"))
}

/// A running engine: the one already there (`None`), or a `dockerd`
/// started here.
async fn engine() -> anyhow::Result<Option<std::process::Child>> {
    if docker(&["info"]).await.is_ok() {
        return Ok(None);
    }
    let log = std::fs::File::create(std::env::temp_dir().join("lab-dockerd.log"))?;
    let child = std::process::Command::new("dockerd")
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("start dockerd (Debian's docker.io; scripts/install-deps.sh --for-tests)")?;
    eventually(Duration::from_secs(60), "dockerd answers", || async {
        docker(&["info"]).await.ok().map(|_| ())
    })
    .await?;
    Ok(Some(child))
}

/// Leaves the machine as the test found it, however the test ends: the
/// project down with its volumes, the images the test made removed (they
/// carry this run's debug binaries and a base without Debian's security
/// updates, which a later `docker compose up` must not mistake for its
/// own), and a `dockerd` the test started stopped as its service manager
/// would (SIGTERM: it stops its containerd too).
#[derive(Default)]
struct Cleanup {
    images: Vec<String>,
    dockerd: Option<std::process::Child>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let sync = |program: &str, args: &[&str]| {
            let _ = std::process::Command::new(program)
                .args(args)
                .current_dir(repo())
                .output();
        };
        sync(
            "docker-compose",
            &compose_args(&["--profile", "load", "down", "-v", "--remove-orphans"]),
        );
        for image in &self.images {
            sync(DOCKER, &["rmi", "--force", image]);
        }
        if let Some(dockerd) = &mut self.dockerd {
            if let Ok(pid) = i32::try_from(dockerd.id()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && matches!(dockerd.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(100));
            }
            let _ = dockerd.kill();
            let _ = dockerd.wait();
        }
    }
}

/// Host ports docker-compose.yml publishes: each must be free, or `up`
/// fails halfway (e.g. a system MariaDB or etcd started by their Debian
/// packages on a machine with systemd).
const PUBLISHED: [u16; 14] = [
    3306, 2379, 8443, 9089, 50051, 9081, 50052, 9082, 50050, 50060, 8404, 8080, 9080, 9090,
];

fn ports_are_free() -> anyhow::Result<()> {
    let taken: Vec<u16> = PUBLISHED
        .into_iter()
        .filter(|&port| std::net::TcpListener::bind(("127.0.0.1", port)).is_err())
        .collect();
    anyhow::ensure!(
        taken.is_empty(),
        "ports docker-compose.yml publishes are taken on this machine: {taken:?} \
         (a system MariaDB or etcd? stop it, or run the test elsewhere)"
    );
    Ok(())
}

/// The base image the Dockerfiles name, made from Debian's packages when
/// the engine does not have it.
async fn base_image(debian: &str) -> anyhow::Result<Option<String>> {
    let tag = format!("debian:{debian}-slim");
    if docker(&["image", "inspect", &tag]).await.is_ok() {
        return Ok(None);
    }
    let dir = tempfile::tempdir()?;
    let rootfs = dir.path().join("rootfs.tar");
    let rootfs = rootfs.to_str().context("temp path")?;
    run(
        "mmdebstrap",
        &["--variant=minbase", "--quiet", debian, rootfs],
        &[],
    )
    .await?;
    docker(&["import", "--change", "CMD [\"bash\"]", rootfs, &tag]).await?;
    Ok(Some(tag))
}

/// The lab's image from `deploy/docker/Dockerfile` with `BINARIES=prebuilt`,
/// in a build context holding only what the runtime stage copies.
async fn lab_image(debian: &str) -> anyhow::Result<()> {
    let context = tempfile::tempdir()?;
    let bin = context.path().join("deploy/docker/bin");
    std::fs::create_dir_all(&bin)?;
    for name in ["service-a", "service-b", "partner-api", "labctl"] {
        let built = labctl::procs::find_lab_binary(name, None)?;
        std::fs::copy(&built, bin.join(name)).with_context(|| format!("copy {built:?}"))?;
    }
    std::fs::copy(
        repo().join("deploy/lab.toml"),
        context.path().join("deploy/lab.toml"),
    )?;
    let dockerfile = repo().join("deploy/docker/Dockerfile");
    let args = [
        "build",
        "--quiet",
        "--build-arg",
        "BINARIES=prebuilt",
        "--build-arg",
        &format!("DEBIAN_VERSION={debian}"),
        "-t",
        LAB_IMAGE,
        "-f",
        path_str(&dockerfile)?,
        path_str(context.path())?,
    ];
    run(DOCKER, &args, &[("DOCKER_BUILDKIT", "1")]).await?;
    Ok(())
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str().context("a UTF-8 path")
}

/// Each compose service's container id, by service name.
async fn containers() -> anyhow::Result<BTreeMap<String, String>> {
    let mut found = BTreeMap::new();
    let ids = docker(&[
        "ps",
        "-a",
        "-q",
        "--filter",
        &format!("label=com.docker.compose.project={PROJECT}"),
    ])
    .await?;
    for id in ids.split_whitespace() {
        let service = docker(&[
            "inspect",
            "-f",
            "{{index .Config.Labels \"com.docker.compose.service\"}}",
            id,
        ])
        .await?;
        found.insert(service.trim().to_string(), id.to_string());
    }
    Ok(found)
}

/// Waits until every long-running service's healthcheck says healthy and
/// the certificate one-shot has exited 0.
async fn all_healthy(timeout: Duration) -> anyhow::Result<()> {
    eventually(timeout, "every service healthy", || async {
        let ids = containers().await.ok()?;
        for service in LONG_RUNNING {
            let health = docker(&[
                "inspect",
                "-f",
                "{{.State.Health.Status}}",
                ids.get(service)?,
            ])
            .await
            .ok()?;
            if health.trim() != "healthy" {
                return None;
            }
        }
        let certs = docker(&[
            "inspect",
            "-f",
            "{{.State.Status}} {{.State.ExitCode}}",
            ids.get("partner-certs")?,
        ])
        .await
        .ok()?;
        (certs.trim() == "exited 0").then_some(())
    })
    .await
}

/// How `n` reads through A spread over the Bs (`served_by` → count); every
/// read must be answered 200.
async fn spread(n: usize) -> anyhow::Result<BTreeMap<String, usize>> {
    let mut by_b = BTreeMap::new();
    for i in 0..n {
        let (status, _, body, _) = get_json(&format!("{A}/api/items/{}", i % 50 + 1)).await?;
        anyhow::ensure!(status == 200, "read {i} answered {status}: {body}");
        let b = body["served_by"].as_str().context("served_by")?.to_string();
        *by_b.entry(b).or_insert(0) += 1;
    }
    Ok(by_b)
}

/// `up -d` again with one variable set, as a user would switch: waits
/// until every service is healthy again, checks A's preset and `lb`, and
/// returns how reads spread once both Bs serve.
async fn recreate_with(
    var: (&str, &str),
    (mode, lb): (&str, &str),
) -> anyhow::Result<BTreeMap<String, usize>> {
    compose(&["up", "-d", "--no-build"], &[var]).await?;
    all_healthy(Duration::from_secs(120)).await?;
    let (_, _, faults, _) = get_json("http://127.0.0.1:9080/faults").await?;
    assert_eq!(faults["mode"], mode, "{}={}: {faults}", var.0, var.1);
    assert_eq!(faults["faults"]["lb"], lb, "{}={}: {faults}", var.0, var.1);
    eventually(Duration::from_secs(30), "both Bs serve", || async {
        let by_b = spread(100).await.ok()?;
        (by_b.len() == 2 && by_b.values().all(|&n| n >= 20)).then_some(by_b)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_comes_up_on_a_real_engine_shows_the_l4_symptom_and_leaves_nothing()
-> anyhow::Result<()> {
    let started = Instant::now();
    let mut lap = Instant::now();
    let mut laps = Vec::new();
    let mut mark = |what: &str| {
        laps.push(format!("{what} {:.1} s", lap.elapsed().as_secs_f64()));
        lap = Instant::now();
    };

    let mut cleanup = Cleanup::default();
    cleanup.dockerd = engine().await?;
    let debian = dotenv("DEBIAN_VERSION")?;
    cleanup.images.extend(base_image(&debian).await?);
    mark("engine and base image");
    cleanup.images.push(LAB_IMAGE.to_string());
    lab_image(&debian).await?;
    let user = docker(&["image", "inspect", "-f", "{{.Config.User}}", LAB_IMAGE]).await?;
    assert_eq!(
        user.trim(),
        "10001:10001",
        "the lab's image runs as non-root"
    );
    mark("lab image");
    for standin in ["mysql", "etcd", "haproxy", "prometheus"] {
        cleanup
            .images
            .push(format!("grpc-incident-lab/{standin}-debian:local"));
    }
    compose(&["build", "mysql", "etcd", "slb", "prometheus"], &[]).await?;
    mark("stand-in images");

    // Leftovers of an earlier run would hold the ports; then nothing may.
    compose(
        &["--profile", "load", "down", "-v", "--remove-orphans"],
        &[],
    )
    .await?;
    ports_are_free()?;
    let volumes_before = docker(&["volume", "ls", "-q"]).await?;
    compose(&["up", "-d", "--no-build"], &[]).await?;
    all_healthy(Duration::from_secs(120)).await?;
    mark("up, every healthcheck healthy");

    // `up` says where to go once A is healthy.
    let welcome = eventually(Duration::from_secs(30), "the welcome", || async {
        let logs = compose(&["logs", "--no-color", "welcome"], &[])
            .await
            .ok()?;
        logs.contains("http://localhost:8080/api/items/1")
            .then_some(logs)
    })
    .await?;
    assert!(welcome.contains("preset: buggy"), "{welcome}");

    // Each long-running service restarts unless stopped, within a memory
    // limit; the lab's run as the image's user on a read-only root.
    let ids = containers().await?;
    for service in LONG_RUNNING {
        let settings = docker(&[
            "inspect",
            "-f",
            "{{.HostConfig.RestartPolicy.Name}} {{.HostConfig.Memory}}",
            &ids[service],
        ])
        .await?;
        let (policy, memory) = settings.trim().split_once(' ').context("two fields")?;
        assert_eq!(policy, "unless-stopped", "{service}");
        assert!(
            memory.parse::<u64>()? > 0,
            "{service}: memory limit {memory}"
        );
    }
    for service in ["partner-api", "service-b-1", "service-b-2", "service-a"] {
        let settings = docker(&[
            "inspect",
            "-f",
            "{{.Config.User}} {{.HostConfig.ReadonlyRootfs}}",
            &ids[service],
        ])
        .await?;
        assert_eq!(settings.trim(), "10001:10001 true", "{service}");
    }

    // The .env preset (buggy): A balances per connection through HAProxy
    // in TCP mode, so every read lands on one B.
    let (_, _, faults, _) = get_json("http://127.0.0.1:9080/faults").await?;
    assert_eq!(faults["faults"]["lb"], "l4", "{faults}");
    let l4 = spread(100).await?;
    assert_eq!(l4.len(), 1, "lb=l4: one B served every read: {l4:?}");

    // Prometheus scrapes every target of deploy/prometheus/prometheus.yml.
    let targets = eventually(Duration::from_secs(60), "every target up", || async {
        let (_, _, body, _) = get_json("http://127.0.0.1:9090/api/v1/targets")
            .await
            .ok()?;
        let active = body["data"]["activeTargets"].as_array()?.clone();
        let up = active.iter().filter(|t| t["health"] == "up").count();
        (active.len() == 5 && up == 5).then_some(active)
    })
    .await?;
    let scraped: Vec<&str> = targets
        .iter()
        .filter_map(|t| t["scrapeUrl"].as_str())
        .collect();
    mark("checks, buggy");

    // One switch from the environment: lb=l7, HAProxy balancing each
    // request over both Bs.
    let l7 = recreate_with(("LAB_FAULTS_LB", "l7"), ("buggy", "l7")).await?;
    mark("LAB_FAULTS_LB=l7");
    // LAB_MODE=fixed: compose recreates the lab's services with the fixed
    // preset, and A balances per request over the Bs it finds in etcd.
    let fixed = recreate_with(("LAB_MODE", "fixed"), ("fixed", "etcd")).await?;
    mark("LAB_MODE=fixed");

    // The `load` profile: reads at A and jobs into MySQL, which the Bs run.
    let http = lab_tests::plain_client()?;
    let counter = |url: &'static str, metric: &'static str| {
        let http = http.clone();
        async move {
            let text = http
                .get(url)
                .send()
                .await?
                .error_for_status()?
                .text()
                .await?;
            lab_tests::metric_sum(&text, metric, &[]).with_context(|| format!("{metric} at {url}"))
        }
    };
    let reads_before = counter(A_METRICS, "lab_http_requests_total").await?;
    compose(
        &[
            "--profile",
            "load",
            "up",
            "-d",
            "--no-build",
            "load",
            "jobs",
        ],
        &[],
    )
    .await?;
    let (reads, jobs) = eventually(Duration::from_secs(60), "load and jobs flow", || async {
        let reads = counter(A_METRICS, "lab_http_requests_total").await.ok()? - reads_before;
        let jobs = counter(B1_METRICS, "lab_jobs_total").await.ok()?
            + counter(B2_METRICS, "lab_jobs_total").await.ok()?;
        (reads >= 200.0 && jobs >= 20.0).then_some((reads, jobs))
    })
    .await?;
    mark("profile load");

    compose(&["--profile", "load", "down", "-v"], &[]).await?;
    let label = format!("label=com.docker.compose.project={PROJECT}");
    let containers_left = docker(&["ps", "-a", "-q", "--filter", &label]).await?;
    let networks_left = docker(&["network", "ls", "-q", "--filter", &label]).await?;
    // Named volumes carry the project's label; anonymous ones (the
    // stand-ins', like the official images', VOLUMEs) do not: compare all.
    let volumes_after = docker(&["volume", "ls", "-q"]).await?;
    let volumes_left: Vec<&str> = volumes_after
        .split_whitespace()
        .filter(|v| !volumes_before.split_whitespace().any(|b| b == *v))
        .collect();
    mark("down -v");
    println!(
        "engine: lab image as 10001 on a read-only root; every long-running service \
         unless-stopped with a memory limit; lb=l4 (.env): {l4:?}; prometheus scraped \
         {scraped:?}; LAB_FAULTS_LB=l7: {l7:?}; LAB_MODE=fixed: {fixed:?}; profile load: \
         {reads} reads at A, {jobs} job attempts in the Bs; after down -v: {} containers, \
         {} volumes, {} networks; {} (total {:.0} s)",
        containers_left.split_whitespace().count(),
        volumes_left.len(),
        networks_left.split_whitespace().count(),
        laps.join(", "),
        started.elapsed().as_secs_f64()
    );
    assert!(
        containers_left.trim().is_empty()
            && networks_left.trim().is_empty()
            && volumes_left.is_empty(),
        "down -v left containers {containers_left:?}, networks {networks_left:?}, \
         volumes {volumes_left:?}"
    );
    Ok(())
}
