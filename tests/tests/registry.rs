//! The registry's failure modes under `lb = "etcd"`: etcd frozen for longer
//! than the lease TTL (on its return it revokes every lease it missed
//! keepalives for), the Bs cut off from etcd while A still reaches it (their
//! leases expire while they are healthy), and the registry's keys deleted
//! while every B is healthy. A's registry guard keeps the endpoints the
//! registry dropped in bulk while they answer; B puts itself back as soon as
//! etcd answers.
//!
//! The signals a diagnosis needs are checked on the way: B's
//! `lab_registry_registered` and lease TTL follow the lease, its failures
//! name their reason, and HAProxy's checks follow `slb.check` (a B whose
//! `/readyz` fails stays UP under `tcp`, goes DOWN under `ready`).

use std::time::Duration;

use lab_common::config::{Sources, load};
use lab_tests::{EtcdRelay, TestLab, eventually};
use labctl::load::{LoadReport, LoadSpec, run};
use nix::sys::signal::Signal;

const BS: [&str; 2] = ["service-b-1", "service-b-2"];

fn open_loop(url: String, rps: f64, duration: Duration) -> LoadSpec {
    let mut spec = LoadSpec::new(url, "/api/items/{rand}");
    spec.rps = Some(rps);
    spec.duration = Some(duration);
    spec.concurrency = 64;
    spec
}

fn failed(report: &LoadReport) -> u64 {
    report.errors.values().sum()
}

async fn a_metric(lab: &TestLab, metric: &str, labels: &[(&str, &str)]) -> f64 {
    lab.metric("service-a", metric, labels).await.unwrap_or(0.0)
}

/// Waits until A's balancer holds both Bs, none of them stale.
async fn until_a_sees_both_fresh(lab: &TestLab, within: Duration) -> anyhow::Result<()> {
    eventually(within, "A to hold both Bs, none stale", || async {
        let endpoints = a_metric(lab, "lab_backend_endpoints", &[]).await;
        let stale = a_metric(lab, "lab_discovery_stale_endpoints", &[]).await;
        (endpoints == 2.0 && stale == 0.0).then_some(())
    })
    .await
}

type LoadTask = tokio::task::JoinHandle<anyhow::Result<LoadReport>>;

/// Starts `seconds` of 300 req/s open-loop load at A and waits until it flows.
async fn start_load(lab: &TestLab, seconds: u64) -> anyhow::Result<LoadTask> {
    let spec = open_loop(lab.a_url(), 300.0, Duration::from_secs(seconds));
    let load = tokio::spawn(async move { run(&spec, None).await });
    eventually(Duration::from_secs(5), "the load to flow", || async {
        (a_metric(lab, "lab_http_requests_total", &[]).await >= 100.0).then_some(())
    })
    .await?;
    Ok(load)
}

/// Waits until every B's `lab_registry_registered` reads `value`.
async fn until_bs_registered(lab: &TestLab, value: f64, within: Duration) -> anyhow::Result<()> {
    for b in BS {
        eventually(within, "B's registration gauge", || async {
            (lab.metric(b, "lab_registry_registered", &[]).await == Some(value)).then_some(())
        })
        .await?;
    }
    Ok(())
}

/// What one frozen-etcd run did.
struct Freeze {
    report: LoadReport,
    /// Times A's guard kept a dropped endpoint.
    kept_stale: f64,
    /// Endpoints A removed.
    removed: f64,
    /// From SIGCONT until both Bs were registered again.
    reregistered_in: Duration,
}

/// etcd stopped (SIGSTOP) for twice the lease TTL under 300 req/s, then
/// continued.
async fn freeze_etcd() -> anyhow::Result<Freeze> {
    let ttl = Duration::from_secs(3);
    let lab = TestLab::start(2, &["faults.lb=etcd", "etcd.lease_ttl=3s"]).await?;
    until_a_sees_both_fresh(&lab, Duration::from_secs(5)).await?;
    let load = start_load(&lab, 14).await?;
    lab.stack.signal("etcd", Signal::SIGSTOP)?;
    // Not a synchronisation: the freeze, past the TTL, is what is tested.
    tokio::time::sleep(2 * ttl).await;
    lab.stack.signal("etcd", Signal::SIGCONT)?;
    let thawed = tokio::time::Instant::now();
    until_bs_registered(&lab, 1.0, Duration::from_secs(10)).await?;
    let reregistered_in = thawed.elapsed();
    let report = load.await??;
    let kept_stale = a_metric(&lab, "lab_discovery_events_total", &[("kind", "stale")]).await;
    let removed = a_metric(&lab, "lab_discovery_events_total", &[("kind", "remove")]).await;
    until_a_sees_both_fresh(&lab, Duration::from_secs(5)).await?;
    Ok(Freeze {
        report,
        kept_stale,
        removed,
        reregistered_in,
    })
}

/// Whether the thawed etcd's lease revocations reach A as deletes depends
/// on a race (a B that re-registers first overwrites its key under a new
/// lease), so this test does not count on the guard: it holds A to no
/// failed request and B to registering again within about TTL/3. The guard
/// is measured where it matters, in the partition test below.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_etcd_revoking_every_lease_fails_no_request() -> anyhow::Result<()> {
    let frozen = freeze_etcd().await?;
    println!(
        "etcd frozen 6 s: {} of {} failed, A removed {} endpoints and kept {} stale, \
         Bs registered again {:?} after SIGCONT",
        failed(&frozen.report),
        frozen.report.requests,
        frozen.removed,
        frozen.kept_stale,
        frozen.reregistered_in
    );
    assert_eq!(
        failed(&frozen.report),
        0,
        "no request failed: {:?}",
        frozen.report
    );
    // B's retries come at most TTL/6 (0.5 s) apart, each bounded by a 1 s
    // connect timeout, and a session that kept its lease alive starts the
    // backoff over: TTL/3 (1 s) and half a second of slack.
    assert!(
        frozen.reregistered_in <= Duration::from_millis(1500),
        "Bs registered again {:?} after etcd came back",
        frozen.reregistered_in
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_registry_is_put_back_by_the_backends_and_fails_no_request() -> anyhow::Result<()>
{
    let lab = TestLab::start(2, &["faults.lb=etcd"]).await?;
    until_a_sees_both_fresh(&lab, Duration::from_secs(5)).await?;
    let mut registrations = Vec::new();
    for b in BS {
        let n = lab.metric(b, "lab_registry_registrations_total", &[]).await;
        registrations.push(n.unwrap_or(0.0));
    }
    let load = start_load(&lab, 6).await?;

    // An operator deletes the whole prefix.
    let config = &lab.stack.config.etcd;
    let mut etcd = etcd_client::Client::connect(&config.endpoints, None).await?;
    let deleted = etcd
        .delete(
            config.prefix.as_bytes(),
            Some(etcd_client::DeleteOptions::new().with_prefix()),
        )
        .await?
        .deleted();
    assert_eq!(deleted, 2, "both Bs' keys were deleted");

    for (b, before) in BS.iter().zip(&registrations) {
        eventually(Duration::from_secs(2), "B to put its key back", || async {
            let now = lab
                .metric(b, "lab_registry_registrations_total", &[])
                .await?;
            (now > *before).then_some(())
        })
        .await?;
    }
    until_a_sees_both_fresh(&lab, Duration::from_secs(2)).await?;
    let report = load.await??;
    let kept_stale = a_metric(&lab, "lab_discovery_events_total", &[("kind", "stale")]).await;
    println!(
        "registry deleted: {} of {} failed, A kept {kept_stale} endpoints stale until the Bs put \
         their keys back",
        failed(&report),
        report.requests
    );
    assert!(kept_stale >= 1.0, "the guard kept the deleted Bs");
    assert_eq!(failed(&report), 0, "no request failed: {report:?}");
    Ok(())
}

/// What one partition run did.
struct Partition {
    report: LoadReport,
    kept_stale: f64,
    /// From the end of the partition until both Bs were registered again.
    reregistered_in: Duration,
}

/// The Bs reach etcd through a relay that is cut for twice the lease TTL
/// under 300 req/s; A reaches etcd directly and sees both leases expire.
async fn partition_bs_from_etcd(guard: bool) -> anyhow::Result<Partition> {
    let ttl = Duration::from_secs(3);
    let config = load(&Sources {
        overrides: vec![
            "faults.lb=etcd".into(),
            "etcd.lease_ttl=3s".into(),
            format!("service_a.registry_guard={guard}"),
        ],
        ..Sources::default()
    })?;
    let mut relay = None;
    let lab = TestLab::start_customised(2, config, |options, state_dir| {
        // The relay reads the planned etcd address from the lab's config
        // file when a B connects; the launcher writes it before any B runs.
        if let Ok(r) = EtcdRelay::start(state_dir.join("lab.toml")) {
            options
                .backend_overrides
                .push(format!("etcd.endpoints={}", r.url()));
            relay = Some(r);
        }
    })
    .await?;
    let relay = relay.ok_or_else(|| anyhow::anyhow!("the relay did not start"))?;
    until_a_sees_both_fresh(&lab, Duration::from_secs(5)).await?;
    let load = start_load(&lab, 14).await?;
    relay.set_cut(true);
    let cut_at = tokio::time::Instant::now();
    // B's gauge follows its lease: it reads 0 once a keepalive goes
    // unanswered, before the lease runs out.
    until_bs_registered(&lab, 0.0, ttl).await?;
    // Not a synchronisation: the partition, past the TTL, is what is tested.
    tokio::time::sleep_until(cut_at + 2 * ttl).await;
    // slb.check = tcp (the default, the incident's SLB): HAProxy still
    // counts both Bs UP though each one's /readyz has said 503 for seconds.
    for server in ["b-1", "b-2"] {
        let status = lab.haproxy_status("b_l4", server).await?;
        assert_eq!(status, "UP", "a TCP check does not see /readyz");
    }
    relay.set_cut(false);
    let healed = tokio::time::Instant::now();
    until_bs_registered(&lab, 1.0, Duration::from_secs(10)).await?;
    let reregistered_in = healed.elapsed();
    let report = load.await??;
    let kept_stale = a_metric(&lab, "lab_discovery_events_total", &[("kind", "stale")]).await;
    Ok(Partition {
        report,
        kept_stale,
        reregistered_in,
    })
}

/// What A should do when every B's lease expires because the Bs lost etcd
/// while A did not: keep routing to the Bs that still answer (for up to
/// `service_a.registry_stale_grace`), since a registry that drops every
/// healthy B at once is the failure, not the Bs. Without the guard A drops
/// them all and fails every request until they are back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_cut_off_from_etcd_keep_serving_through_the_guard() -> anyhow::Result<()> {
    let unguarded = partition_bs_from_etcd(false).await?;
    println!(
        "Bs cut off from etcd 6 s, guard off: {} of {} failed ({:?}), Bs registered again {:?} \
         after the partition",
        failed(&unguarded.report),
        unguarded.report.requests,
        unguarded.report.errors,
        unguarded.reregistered_in
    );
    assert!(
        failed(&unguarded.report) > 0,
        "without the guard A drops both Bs when their leases expire"
    );

    let guarded = partition_bs_from_etcd(true).await?;
    println!(
        "Bs cut off from etcd 6 s, guard on: {} of {} failed, A kept {} endpoints stale, \
         Bs registered again {:?} after the partition",
        failed(&guarded.report),
        guarded.report.requests,
        guarded.kept_stale,
        guarded.reregistered_in
    );
    assert!(guarded.kept_stale >= 1.0, "the guard kept the dropped Bs");
    assert_eq!(
        failed(&guarded.report),
        0,
        "no request failed: {:?}",
        guarded.report
    );
    Ok(())
}

/// Waits until HAProxy has every B UP in both backends.
async fn until_haproxy_has_both_up(lab: &TestLab, what: &str) -> anyhow::Result<()> {
    eventually(Duration::from_secs(10), what, || async {
        let states = haproxy_states(lab).await.ok()?;
        states.iter().all(|s| s == "UP").then_some(())
    })
    .await
}

/// The HAProxy state of B-1 and B-2 in both backends.
async fn haproxy_states(lab: &TestLab) -> anyhow::Result<Vec<String>> {
    let mut states = Vec::new();
    for backend in ["b_l4", "b_l7"] {
        for server in ["b-1", "b-2"] {
            states.push(lab.haproxy_status(backend, server).await?);
        }
    }
    Ok(states)
}

/// B-1 alone reaches etcd through a relay that is cut: its lease is lost
/// while B-2's is not. B-1's signals say so — registered 0, no lease time
/// left, the failure's reason — and with `slb.check = ready` HAProxy reads
/// its `/readyz` (503, not registered) and takes it out of both backends,
/// then puts it back once B-1 registers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_lost_its_lease_says_why_and_ready_checks_take_it_out_of_haproxy()
-> anyhow::Result<()> {
    let ttl = Duration::from_secs(3);
    let config = load(&Sources {
        overrides: vec![
            "faults.lb=etcd".into(),
            "etcd.lease_ttl=3s".into(),
            "slb.check=ready".into(),
        ],
        ..Sources::default()
    })?;
    let mut relay = None;
    let lab = TestLab::start_customised(2, config, |options, state_dir| {
        if let Ok(r) = EtcdRelay::start(state_dir.join("lab.toml")) {
            options
                .instance_overrides
                .insert(1, vec![format!("etcd.endpoints={}", r.url())]);
            relay = Some(r);
        }
    })
    .await?;
    let relay = relay.ok_or_else(|| anyhow::anyhow!("the relay did not start"))?;
    until_bs_registered(&lab, 1.0, Duration::from_secs(5)).await?;
    until_haproxy_has_both_up(&lab, "HAProxy to see both Bs UP").await?;
    // A live lease: time left within the TTL, keepalives answered and timed.
    eventually(
        Duration::from_secs(5),
        "B-1's keepalives to be timed",
        || async {
            let rtts = lab
                .metric(BS[0], "lab_registry_keepalive_rtt_seconds_count", &[])
                .await?;
            (rtts >= 1.0).then_some(())
        },
    )
    .await?;
    let left = lab
        .metric(BS[0], "lab_registry_lease_ttl_seconds", &[])
        .await
        .unwrap_or(0.0);
    assert!(
        left > 0.0 && left <= ttl.as_secs_f64(),
        "lease time left {left} s"
    );

    relay.set_cut(true);
    let cut_at = tokio::time::Instant::now();
    eventually(ttl, "B-1 to read unregistered", || async {
        let registered = lab.metric(BS[0], "lab_registry_registered", &[]).await?;
        (registered == 0.0).then_some(())
    })
    .await?;
    let unregistered_after = cut_at.elapsed();
    let left = lab
        .metric(BS[0], "lab_registry_lease_ttl_seconds", &[])
        .await;
    assert_eq!(left, Some(0.0), "no lease time left once it is lost");
    let unanswered = lab
        .metric(
            BS[0],
            "lab_registry_failures_total",
            &[("reason", "keepalive_unanswered")],
        )
        .await;
    assert_eq!(unanswered, Some(1.0), "the loss is named by its reason");
    let (status, _, why, _) =
        lab_tests::get_json(&format!("{}/readyz", lab.admin_url(BS[0])?)).await?;
    assert_eq!(status, 503, "{why}");
    assert!(
        why["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("not registered"),
        "{why}"
    );
    assert_eq!(
        lab.metric(BS[1], "lab_registry_registered", &[]).await,
        Some(1.0),
        "B-2 keeps its lease"
    );
    let down = eventually(
        Duration::from_secs(5),
        "HAProxy to take B-1 out of both backends",
        || async {
            let states = haproxy_states(&lab).await.ok()?;
            (states == ["DOWN", "UP", "DOWN", "UP"]).then_some(states)
        },
    )
    .await?;
    let down_after = cut_at.elapsed();

    relay.set_cut(false);
    let healed = tokio::time::Instant::now();
    until_bs_registered(&lab, 1.0, Duration::from_secs(10)).await?;
    until_haproxy_has_both_up(&lab, "HAProxy to put B-1 back").await?;
    println!(
        "B-1 cut off from etcd: unregistered after {unregistered_after:?}, HAProxy \
         (slb.check = ready) had it {down:?} after {down_after:?}; UP again {:?} after the cut ended",
        healed.elapsed()
    );
    Ok(())
}
