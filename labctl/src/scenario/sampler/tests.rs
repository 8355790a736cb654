//! The sampler against real `/metrics` output of the lab's services
//! (testdata/: captured from a native buggy stack after 500 reads and
//! 250 jobs), fed through `record` with chosen scrape times so rates are
//! exact; and once end to end against a small HTTP server.

use std::collections::BTreeMap;

use super::*;
use crate::load::Finished;

const A_TEXT: &str = include_str!("testdata/service-a.prom");
const B_TEXT: &str = include_str!("testdata/service-b.prom");
const PARTNER_TEXT: &str = include_str!("testdata/partner-api.prom");

fn target(instance: &str, instance_id: Option<&str>) -> Target {
    Target {
        instance: instance.to_string(),
        admin_url: format!("http://127.0.0.1:1/{instance}"),
        instance_id: instance_id.map(str::to_string),
    }
}

fn lab_targets() -> Vec<Target> {
    vec![
        target("service-a", None),
        target("service-b-1", Some("b-1")),
        target("partner-api", None),
    ]
}

fn sampler(targets: Vec<Target>) -> Sampler {
    let mut sampler = Sampler::new(Arc::new(LiveWindow::new()));
    sampler.set_targets(targets);
    sampler
}

fn scrape(at: Instant, text: &str) -> Option<Scrape> {
    Some(Scrape {
        at,
        metrics: Exposition::parse(text),
    })
}

fn quiet_window() -> WindowStats {
    WindowStats {
        elapsed: Duration::from_secs(1),
        answered: 0,
        ok: 0,
        errors: 0,
        dropped: 0,
        p50_ms: None,
        p99_ms: None,
        by_backend: BTreeMap::new(),
    }
}

/// The value of `signal` for `instance` at `t_s`; panics when no point
/// was written there (a missing point is not a gap).
fn at(recording: &Recording, signal: &str, instance: &str, t_s: f64) -> Option<f64> {
    let series = recording
        .series
        .iter()
        .find(|s| s.signal == signal && s.instance == instance)
        .unwrap_or_else(|| panic!("no series {signal}/{instance}"));
    series
        .points
        .iter()
        .find(|(t, _)| *t == t_s)
        .unwrap_or_else(|| panic!("no point {signal}/{instance} at {t_s}"))
        .1
}

/// Replaces the whole sample line that starts with `prefix` + " ".
fn set_line(text: &str, prefix: &str, value: f64) -> String {
    let mut found = false;
    let out = text
        .lines()
        .map(|line| {
            if line
                .strip_prefix(prefix)
                .is_some_and(|r| r.starts_with(' '))
            {
                found = true;
                format!("{prefix} {value}")
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    assert!(found, "no line {prefix}");
    out
}

/// Adds `n` observations between `above` and the next bound to every
/// bucket of A's histogram from there on (so the counts stay cumulative).
fn observe_in_a(text: &str, above: f64, n: f64) -> String {
    text.lines()
        .map(|line| {
            let Some(rest) = line.strip_prefix("lab_http_request_duration_seconds_bucket{") else {
                return line.to_string();
            };
            let le: f64 = rest
                .split("le=\"")
                .nth(1)
                .and_then(|r| r.split('"').next())
                .unwrap()
                .parse()
                .unwrap();
            let (head, count) = line.rsplit_once(' ').unwrap();
            let count: f64 = count.parse().unwrap();
            if le > above {
                format!("{head} {}", count + n)
            } else {
                line.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// One quiet sample of A, B and partner-api as captured from a real lab,
/// their scrapes taken at `at`.
fn record_the_lab_as_captured(sampler: &mut Sampler, t_s: f64, at: Instant, rec: &mut Recording) {
    let scrapes = vec![
        scrape(at, A_TEXT),
        scrape(at, B_TEXT),
        scrape(at, PARTNER_TEXT),
    ];
    sampler.record(t_s, &quiet_window(), scrapes, rec);
}

#[test]
fn the_first_sample_reads_every_gauge_of_every_kind() {
    let mut sampler = sampler(lab_targets());
    let mut rec = Recording::default();
    let t0 = Instant::now();
    record_the_lab_as_captured(&mut sampler, 1.0, t0, &mut rec);

    // Every process.
    assert_eq!(
        at(&rec, "rss_mib", "service-a", 1.0),
        Some(36597760.0 / MIB)
    );
    assert_eq!(at(&rec, "open_fds", "service-a", 1.0), Some(16.0));
    assert_eq!(at(&rec, "tasks_alive", "service-a", 1.0), Some(9.0));
    assert_eq!(
        at(&rec, "rss_mib", "service-b-1", 1.0),
        Some(45215744.0 / MIB)
    );
    assert_eq!(at(&rec, "open_fds", "service-b-1", 1.0), Some(50.0));
    assert_eq!(at(&rec, "tasks_alive", "service-b-1", 1.0), Some(50.0));
    assert_eq!(at(&rec, "open_fds", "partner-api", 1.0), Some(51.0));
    assert_eq!(at(&rec, "tasks_alive", "partner-api", 1.0), Some(40.0));
    // B's own.
    assert_eq!(at(&rec, "job_tasks", "service-b-1", 1.0), Some(0.0));
    assert_eq!(at(&rec, "pool_in_use", "service-b-1", 1.0), Some(8.0));
    assert_eq!(at(&rec, "pool_leaked", "service-b-1", 1.0), Some(8.0));
    assert_eq!(at(&rec, "jobs_duplicate", "service-b-1", 1.0), Some(9.0));
    assert_eq!(
        at(&rec, "jobs_dead", "service-b-1", 1.0),
        Some(0.0),
        "no dead job yet: lab_jobs_total has no outcome=\"dead\" line"
    );
    assert_eq!(
        at(&rec, "work_after_deadline", "service-b-1", 1.0),
        Some(0.0)
    );
    assert_eq!(
        at(&rec, "http_responses_unclosed", "service-b-1", 1.0),
        Some(18.0)
    );
    assert_eq!(
        at(&rec, "partner_connections", "partner-api", 1.0),
        Some(36.0)
    );
    // Rates and A's window need a previous sample.
    for (signal, instance) in [
        ("cpu_percent", "service-a"),
        ("a_p50_ms", "service-a"),
        ("a_p99_ms", "service-a"),
        ("jobs_done", "service-b-1"),
        ("cpu_percent", "service-b-1"),
        ("partner_handshakes", "partner-api"),
    ] {
        assert_eq!(at(&rec, signal, instance, 1.0), None, "{signal}/{instance}");
    }
    // Each instance has exactly the signals of its kind.
    let of = |instance: &str| {
        let mut keys: Vec<&str> = rec
            .series
            .iter()
            .filter(|s| s.instance == instance)
            .map(|s| s.signal.as_str())
            .collect();
        keys.sort();
        keys
    };
    assert_eq!(
        of("service-a"),
        [
            "a_p50_ms",
            "a_p99_ms",
            "cpu_percent",
            "open_fds",
            "rss_mib",
            "tasks_alive"
        ]
    );
    assert_eq!(
        of("service-b-1").len(),
        4 + 8 + 1,
        "and its share of the load"
    );
    assert!(of("service-b-1").contains(&"share"));
    assert!(!of("service-b-1").contains(&"a_p99_ms"));
    assert_eq!(
        of("partner-api"),
        [
            "cpu_percent",
            "open_fds",
            "partner_connections",
            "partner_handshakes",
            "rss_mib",
            "tasks_alive"
        ]
    );
}

#[test]
fn rates_and_a_p99_come_from_the_increase_between_two_samples() {
    let mut sampler = sampler(lab_targets());
    let mut rec = Recording::default();
    let t0 = Instant::now();
    let t1 = t0 + Duration::from_secs(2);
    record_the_lab_as_captured(&mut sampler, 1.0, t0, &mut rec);
    // Two seconds later: 100 more reads at A, all between 25 and 50 ms;
    // A used 1 s of CPU more, B 3 s; B finished 40 jobs and dead-lettered
    // 2; the partner shook hands 10 more times.
    let a = set_line(
        &observe_in_a(A_TEXT, 0.025, 100.0),
        "process_cpu_seconds_total",
        1.0,
    );
    let b = set_line(
        &set_line(B_TEXT, "lab_jobs_total{outcome=\"done\"}", 58.0),
        "process_cpu_seconds_total",
        4.0,
    ) + "\nlab_jobs_total{outcome=\"dead\"} 2\n";
    let partner = set_line(PARTNER_TEXT, "partner_tls_handshakes_total", 46.0);
    sampler.record(
        2.0,
        &quiet_window(),
        vec![scrape(t1, &a), scrape(t1, &b), scrape(t1, &partner)],
        &mut rec,
    );

    assert_eq!(at(&rec, "cpu_percent", "service-a", 2.0), Some(50.0));
    assert_eq!(at(&rec, "cpu_percent", "service-b-1", 2.0), Some(150.0));
    assert_eq!(at(&rec, "cpu_percent", "partner-api", 2.0), Some(0.0));
    assert_eq!(at(&rec, "jobs_done", "service-b-1", 2.0), Some(20.0));
    assert_eq!(at(&rec, "jobs_dead", "service-b-1", 2.0), Some(2.0));
    assert_eq!(
        at(&rec, "partner_handshakes", "partner-api", 2.0),
        Some(5.0)
    );
    // The 99th of 100 new observations, all in (0.025, 0.05]:
    // 25 ms + 25 ms × 99/100. The 500 older ones do not count.
    let p99 = at(&rec, "a_p99_ms", "service-a", 2.0).unwrap();
    assert!((p99 - 49.75).abs() < 1e-9, "a_p99_ms {p99}");
    // The 50th: 25 ms + 25 ms × 50/100.
    let p50 = at(&rec, "a_p50_ms", "service-a", 2.0).unwrap();
    assert!((p50 - 37.5).abs() < 1e-9, "a_p50_ms {p50}");
}

#[test]
fn a_window_in_which_a_finished_nothing_has_no_p99() {
    let mut sampler = sampler(vec![target("service-a", None)]);
    let mut rec = Recording::default();
    let t0 = Instant::now();
    sampler.record(1.0, &quiet_window(), vec![scrape(t0, A_TEXT)], &mut rec);
    sampler.record(
        2.0,
        &quiet_window(),
        vec![scrape(t0 + Duration::from_secs(1), A_TEXT)],
        &mut rec,
    );
    assert_eq!(at(&rec, "a_p99_ms", "service-a", 2.0), None);
}

#[test]
fn a_restarted_process_counts_from_zero_and_no_rate_goes_negative() {
    let mut sampler = sampler(vec![
        target("service-b-1", Some("b-1")),
        target("partner-api", None),
    ]);
    let mut rec = Recording::default();
    let t0 = Instant::now();
    let b = set_line(B_TEXT, "process_cpu_seconds_total", 40.0);
    sampler.record(
        1.0,
        &quiet_window(),
        vec![scrape(t0, &b), scrape(t0, PARTNER_TEXT)],
        &mut rec,
    );

    // B restarted: its counters went down. The partner restarted too, but
    // by the next scrape its counter is already above the old value: only
    // its new start time tells.
    let b = set_line(
        &set_line(
            &set_line(B_TEXT, "lab_jobs_total{outcome=\"done\"}", 6.0),
            "lab_jobs_duplicate_total",
            2.0,
        ),
        "process_cpu_seconds_total",
        1.0,
    );
    let partner = set_line(
        &set_line(PARTNER_TEXT, "partner_tls_handshakes_total", 40.0),
        "process_start_time_seconds",
        1795765999.0,
    );
    let t1 = t0 + Duration::from_secs(2);
    sampler.record(
        2.0,
        &quiet_window(),
        vec![scrape(t1, &b), scrape(t1, &partner)],
        &mut rec,
    );
    assert_eq!(at(&rec, "jobs_done", "service-b-1", 2.0), Some(3.0));
    assert_eq!(at(&rec, "cpu_percent", "service-b-1", 2.0), Some(50.0));
    assert_eq!(at(&rec, "jobs_duplicate", "service-b-1", 1.0), Some(9.0));
    assert_eq!(
        at(&rec, "jobs_duplicate", "service-b-1", 2.0),
        Some(2.0),
        "a cumulative counter is the new process's own, as its source says"
    );
    assert_eq!(
        at(&rec, "partner_handshakes", "partner-api", 2.0),
        Some(20.0),
        "40 handshakes since the restart, not 4"
    );
}

#[test]
fn a_restarted_a_gives_the_p99_of_its_new_requests() {
    let mut sampler = sampler(vec![target("service-a", None)]);
    let mut rec = Recording::default();
    let t0 = Instant::now();
    sampler.record(
        1.0,
        &quiet_window(),
        vec![scrape(t0, &observe_in_a(A_TEXT, 0.0, 1000.0))],
        &mut rec,
    );
    // Fewer requests in every bucket than before: a new process. Its 500
    // requests are the window: p99 is rank 495, between 50 and 100 ms
    // (479 at or below 50 ms, 499 at or below 100 ms).
    sampler.record(
        2.0,
        &quiet_window(),
        vec![scrape(t0 + Duration::from_secs(1), A_TEXT)],
        &mut rec,
    );
    let p99 = at(&rec, "a_p99_ms", "service-a", 2.0).unwrap();
    assert!(
        (p99 - (50.0 + 50.0 * 16.0 / 20.0)).abs() < 1e-9,
        "a_p99_ms {p99}"
    );
}

#[test]
fn a_target_that_does_not_answer_gets_gaps_and_the_next_rate_spans_the_gap() {
    let mut sampler = sampler(lab_targets());
    let mut rec = Recording::default();
    let t0 = Instant::now();
    record_the_lab_as_captured(&mut sampler, 1.0, t0, &mut rec);
    sampler.record(
        2.0,
        &quiet_window(),
        vec![
            scrape(t0 + Duration::from_secs(1), A_TEXT),
            None,
            scrape(t0 + Duration::from_secs(1), PARTNER_TEXT),
        ],
        &mut rec,
    );
    let b_signals = Kind::ServiceB.signals();
    for signal in &b_signals {
        assert_eq!(
            at(&rec, signal.key, "service-b-1", 2.0),
            None,
            "{}",
            signal.key
        );
    }
    assert_eq!(
        rec.series
            .iter()
            .filter(|s| s.instance == "service-b-1" && s.signal != "share")
            .count(),
        b_signals.len(),
        "a gap for every signal a B has, and nothing else"
    );
    // The others are still read.
    assert_eq!(at(&rec, "open_fds", "service-a", 2.0), Some(16.0));
    assert_eq!(
        at(&rec, "partner_handshakes", "partner-api", 2.0),
        Some(0.0)
    );

    // Back at t0 + 4 s with 60 more jobs done: 60 over the 4 s since the
    // last good scrape.
    let b = set_line(B_TEXT, "lab_jobs_total{outcome=\"done\"}", 78.0);
    sampler.record(
        3.0,
        &quiet_window(),
        vec![
            scrape(t0 + Duration::from_secs(4), A_TEXT),
            scrape(t0 + Duration::from_secs(4), &b),
            scrape(t0 + Duration::from_secs(4), PARTNER_TEXT),
        ],
        &mut rec,
    );
    assert_eq!(at(&rec, "jobs_done", "service-b-1", 3.0), Some(15.0));
    assert_eq!(at(&rec, "pool_in_use", "service-b-1", 3.0), Some(8.0));
}

/// `text` with every line (sample, `# HELP`, `# TYPE`) that mentions
/// `metric` dropped.
fn without_metric(text: &str, metric: &str) -> String {
    let out: Vec<&str> = text.lines().filter(|l| !l.contains(metric)).collect();
    assert!(out.len() < text.lines().count(), "no line of {metric}");
    out.join("\n")
}

#[test]
fn a_labelled_counter_with_no_line_yet_reads_0_while_its_metric_is_there() {
    let mut sampler = sampler(vec![target("service-b-1", Some("b-1"))]);
    let mut rec = Recording::default();
    let t0 = Instant::now();
    // A B that has finished no job: `lab_jobs_total` is declared (# HELP,
    // # TYPE) but has no line for any outcome.
    let fresh = without_metric(B_TEXT, "lab_jobs_total{");
    assert!(fresh.contains("# TYPE lab_jobs_total counter"));
    sampler.record(1.0, &quiet_window(), vec![scrape(t0, &fresh)], &mut rec);
    assert_eq!(at(&rec, "jobs_dead", "service-b-1", 1.0), Some(0.0));

    // Two seconds later it has done 10: 5 a second, counted from the 0.
    let done = format!("{fresh}\nlab_jobs_total{{outcome=\"done\"}} 10\n");
    sampler.record(
        2.0,
        &quiet_window(),
        vec![scrape(t0 + Duration::from_secs(2), &done)],
        &mut rec,
    );
    assert_eq!(at(&rec, "jobs_done", "service-b-1", 2.0), Some(5.0));
    assert_eq!(at(&rec, "jobs_dead", "service-b-1", 2.0), Some(0.0));

    // No # TYPE lines at all: a sample of another outcome is enough to
    // know the metric is there.
    let bare: String = B_TEXT
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    sampler.record(
        3.0,
        &quiet_window(),
        vec![scrape(t0 + Duration::from_secs(3), &bare)],
        &mut rec,
    );
    assert_eq!(at(&rec, "jobs_dead", "service-b-1", 3.0), Some(0.0));
    assert_eq!(at(&rec, "jobs_done", "service-b-1", 3.0), Some(8.0));
}

#[test]
fn a_missing_counter_metric_is_a_gap_not_0() {
    let mut sampler = sampler(vec![target("service-b-1", Some("b-1"))]);
    let mut rec = Recording::default();
    let t0 = Instant::now();
    // As if B had renamed the metric: no line, declared or sampled, under
    // the name the sampler reads.
    let renamed = B_TEXT.replace("lab_jobs_total", "lab_job_attempts_total");
    assert!(!renamed.contains("lab_jobs_total"));
    let missing = without_metric(B_TEXT, "lab_jobs_total");
    for (i, text) in [&renamed, &renamed, &missing].into_iter().enumerate() {
        let t_s = i as f64 + 1.0;
        sampler.record(
            t_s,
            &quiet_window(),
            vec![scrape(t0 + Duration::from_secs(i as u64), text)],
            &mut rec,
        );
        assert_eq!(at(&rec, "jobs_dead", "service-b-1", t_s), None, "at {t_s}");
        assert_eq!(at(&rec, "jobs_done", "service-b-1", t_s), None, "at {t_s}");
        // The rest of the scrape is still read.
        assert_eq!(at(&rec, "pool_in_use", "service-b-1", t_s), Some(8.0));
    }
    // Back: its first reading has nothing to count a rate from.
    sampler.record(
        4.0,
        &quiet_window(),
        vec![scrape(t0 + Duration::from_secs(3), B_TEXT)],
        &mut rec,
    );
    assert_eq!(at(&rec, "jobs_dead", "service-b-1", 4.0), Some(0.0));
    assert_eq!(at(&rec, "jobs_done", "service-b-1", 4.0), None);
}

#[test]
fn a_target_that_left_and_came_back_starts_afresh() {
    let mut sampler = sampler(lab_targets());
    let mut rec = Recording::default();
    let t0 = Instant::now();
    record_the_lab_as_captured(&mut sampler, 1.0, t0, &mut rec);
    sampler.set_targets(vec![target("service-a", None), target("partner-api", None)]);
    sampler.set_targets(lab_targets());
    let b = set_line(B_TEXT, "lab_jobs_total{outcome=\"done\"}", 1018.0);
    let t1 = t0 + Duration::from_secs(1);
    sampler.record(
        2.0,
        &quiet_window(),
        vec![scrape(t1, A_TEXT), scrape(t1, &b), scrape(t1, PARTNER_TEXT)],
        &mut rec,
    );
    assert_eq!(at(&rec, "jobs_done", "service-b-1", 2.0), None);
    assert_eq!(at(&rec, "jobs_done", "service-b-1", 1.0), None);
}

#[test]
fn cpu_is_averaged_over_a_trailing_window_of_whole_seconds() {
    let mut sampler = sampler(vec![target("partner-api", None)]);
    let mut rec = Recording::default();
    let t0 = Instant::now();
    // A process using 40 % of a core: the whole-second counter steps by one
    // every 2.5 s.
    let counter = [0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 2.0, 3.0, 3.0, 4.0];
    for (i, cpu) in counter.iter().enumerate() {
        let text = set_line(PARTNER_TEXT, "process_cpu_seconds_total", *cpu);
        sampler.record(
            i as f64,
            &quiet_window(),
            vec![scrape(t0 + Duration::from_secs(i as u64), &text)],
            &mut rec,
        );
    }
    let cpu = |i: usize| at(&rec, "cpu_percent", "partner-api", i as f64);
    assert_eq!(cpu(0), None);
    assert_eq!(cpu(1), Some(0.0));
    let so_far = cpu(3).unwrap();
    assert!(
        (so_far - 100.0 / 3.0).abs() < 1e-9,
        "1 s over the 3 s so far: {so_far}"
    );
    // From here on, the last 5 s: 40 % every time, never the 0 or 100 % of
    // one second alone.
    for i in 5..counter.len() {
        let percent = cpu(i).unwrap();
        assert!((percent - 40.0).abs() < 1e-9, "at {i} s: {percent}");
    }
}

#[test]
fn the_load_window_gives_rate_errors_latency_and_the_share_of_each_b_by_name() {
    let mut sampler = sampler(vec![
        target("service-a", None),
        target("service-b-1", Some("b-1")),
        target("service-b-2", Some("b-2")),
        target("service-b-3", Some("b-3")),
    ]);
    let mut rec = Recording::default();
    let window = WindowStats {
        elapsed: Duration::from_millis(2000),
        answered: 120,
        ok: 100,
        errors: 30,
        dropped: 10,
        p50_ms: Some(12.5),
        p99_ms: Some(480.0),
        by_backend: BTreeMap::from([
            ("b-1".to_string(), 60),
            ("b-2".to_string(), 20),
            ("b-9".to_string(), 20),
        ]),
    };
    sampler.record(1.0, &window, vec![None, None, None, None], &mut rec);
    assert_eq!(at(&rec, "rps", "load", 1.0), Some(60.0));
    assert_eq!(at(&rec, "errors", "load", 1.0), Some(15.0));
    assert_eq!(at(&rec, "dropped", "load", 1.0), Some(5.0));
    assert_eq!(at(&rec, "latency_p50_ms", "load", 1.0), Some(12.5));
    assert_eq!(at(&rec, "latency_p99_ms", "load", 1.0), Some(480.0));
    assert_eq!(at(&rec, "share", "service-b-1", 1.0), Some(0.6));
    assert_eq!(at(&rec, "share", "service-b-2", 1.0), Some(0.2));
    assert_eq!(
        at(&rec, "share", "service-b-3", 1.0),
        Some(0.0),
        "served nothing"
    );
    assert_eq!(
        at(&rec, "share", "b-9", 1.0),
        Some(0.2),
        "an id no target has"
    );
    assert!(rec.series_of("share").all(|s| s.instance != "service-a"));

    // A second with no answer at all: no rate of answers is 0, shares are gaps.
    sampler.record(2.0, &quiet_window(), vec![None, None, None, None], &mut rec);
    assert_eq!(at(&rec, "rps", "load", 2.0), Some(0.0));
    assert_eq!(at(&rec, "latency_p99_ms", "load", 2.0), None);
    assert_eq!(at(&rec, "share", "service-b-1", 2.0), None);
    assert_eq!(at(&rec, "share", "service-b-3", 2.0), None);
}

#[test]
fn histogram_quantile_interpolates_within_the_bucket() {
    let buckets = [
        (0.1, 50.0),
        (0.5, 90.0),
        (1.0, 100.0),
        (f64::INFINITY, 100.0),
    ];
    assert_eq!(histogram_quantile(0.5, &buckets), Some(0.1));
    assert_eq!(histogram_quantile(0.25, &buckets), Some(0.05));
    let p99 = histogram_quantile(0.99, &buckets).unwrap();
    assert!((p99 - 0.95).abs() < 1e-12, "p99 {p99}");
    // Past the last finite bound: only "more than 0.5 s" is known.
    assert_eq!(
        histogram_quantile(0.99, &[(0.5, 10.0), (f64::INFINITY, 100.0)]),
        Some(0.5)
    );
    assert_eq!(
        histogram_quantile(0.99, &[(0.5, 0.0), (f64::INFINITY, 0.0)]),
        None
    );
    assert_eq!(histogram_quantile(0.99, &[]), None);
}

#[test]
fn bucket_increase_subtracts_per_bound_and_restarts_from_zero() {
    let before = [(0.1, 5.0), (1.0, 8.0), (f64::INFINITY, 9.0)];
    let now = [(0.1, 6.0), (1.0, 12.0), (f64::INFINITY, 13.0)];
    assert_eq!(
        bucket_increase(&before, &now, false),
        vec![(0.1, 1.0), (1.0, 4.0), (f64::INFINITY, 4.0)]
    );
    let restarted = [(0.1, 1.0), (1.0, 1.0), (f64::INFINITY, 2.0)];
    assert_eq!(
        bucket_increase(&before, &restarted, false),
        restarted.to_vec()
    );
    assert_eq!(bucket_increase(&before, &now, true), now.to_vec());
    assert_eq!(bucket_increase(&[], &now, false), now.to_vec());
}

#[test]
fn kinds_follow_the_instance_names() {
    assert_eq!(Kind::of("service-a"), Kind::ServiceA);
    assert_eq!(Kind::of("service-b-12"), Kind::ServiceB);
    assert_eq!(Kind::of("partner-api"), Kind::Partner);
    assert_eq!(Kind::of("slb"), Kind::Other);
    // Every signal but the load generator's is some kind's.
    let scraped: Vec<&str> = [Kind::ServiceA, Kind::ServiceB, Kind::Partner]
        .into_iter()
        .flat_map(Kind::signals)
        .map(|s| s.key)
        .collect();
    for signal in signals::ALL {
        let from_load = [
            "rps",
            "errors",
            "dropped",
            "latency_p50_ms",
            "latency_p99_ms",
            "share",
        ];
        assert_eq!(
            scraped.contains(&signal.key),
            !from_load.contains(&signal.key),
            "{}",
            signal.key
        );
    }
}

/// `sample()` end to end: a small server stands in for the admin
/// listeners (its texts changed between samples), one target's port is
/// closed and three never answer. Scraped one after another, the three
/// would take 3 × [`SCRAPE_TIMEOUT`]; at once, one.
#[tokio::test]
async fn sample_scrapes_every_target_at_once_and_reads_the_live_window() {
    use std::sync::Mutex;

    use axum::{
        Router,
        extract::{Path, State},
        http::StatusCode,
        routing::get,
    };

    type Texts = Arc<Mutex<HashMap<String, String>>>;
    let texts: Texts = Arc::new(Mutex::new(HashMap::from([
        ("a".to_string(), A_TEXT.to_string()),
        ("b".to_string(), B_TEXT.to_string()),
        ("p".to_string(), PARTNER_TEXT.to_string()),
    ])));
    async fn metrics(State(texts): State<Texts>, Path(who): Path<String>) -> (StatusCode, String) {
        if who == "stuck" {
            std::future::pending::<()>().await;
        }
        match texts.lock().unwrap().get(&who) {
            Some(text) => (StatusCode::OK, text.clone()),
            None => (StatusCode::NOT_FOUND, String::new()),
        }
    }
    let app = Router::new()
        .route("/{who}/metrics", get(metrics))
        .with_state(texts.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });
    let closed = {
        let spare = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        spare.local_addr().unwrap()
    };

    let at_path = |instance: &str, path: &str, id: Option<&str>| Target {
        instance: instance.to_string(),
        admin_url: format!("http://{addr}/{path}/"),
        instance_id: id.map(str::to_string),
    };
    let live = Arc::new(LiveWindow::new());
    let mut sampler = Sampler::new(live.clone());
    sampler.set_targets(vec![
        at_path("service-a", "a", None),
        at_path("service-b-1", "b", Some("b-1")),
        Target {
            instance: "service-b-2".to_string(),
            admin_url: format!("http://{closed}"),
            instance_id: Some("b-2".to_string()),
        },
        at_path("service-b-3", "stuck", Some("b-3")),
        at_path("service-b-4", "stuck", Some("b-4")),
        at_path("service-b-5", "stuck", Some("b-5")),
        at_path("partner-api", "p", None),
    ]);
    for served_by in ["b-1", "b-1", "b-1", "b-2"] {
        live.record(
            Duration::from_millis(7),
            Finished::Answered {
                status: 200,
                served_by: Some(served_by),
            },
        );
    }

    let mut rec = Recording::default();
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), sampler.sample(1.0, &mut rec))
        .await
        .expect("a stuck target must not hold the sample up");
    let first = started.elapsed();
    // Below two timeouts: even two stuck targets waited for in turn would
    // miss it. At least one: the stuck ones really were waited for.
    let at_once = Duration::from_millis(1500);
    assert!(at_once < 2 * SCRAPE_TIMEOUT);
    assert!(
        first >= SCRAPE_TIMEOUT && first < at_once,
        "the first sample took {first:?}"
    );
    assert_eq!(at(&rec, "share", "service-b-1", 1.0), Some(0.75));
    assert_eq!(at(&rec, "share", "service-b-2", 1.0), Some(0.25));
    assert_eq!(
        at(&rec, "latency_p99_ms", "load", 1.0).map(f64::round),
        Some(7.0)
    );
    assert_eq!(at(&rec, "open_fds", "service-a", 1.0), Some(16.0));
    assert_eq!(at(&rec, "pool_in_use", "service-b-1", 1.0), Some(8.0));
    assert_eq!(
        at(&rec, "partner_connections", "partner-api", 1.0),
        Some(36.0)
    );
    for down in ["service-b-2", "service-b-3", "service-b-4", "service-b-5"] {
        assert_eq!(at(&rec, "pool_in_use", down, 1.0), None, "{down}");
        assert_eq!(at(&rec, "open_fds", down, 1.0), None, "{down}");
    }

    let updated = set_line(B_TEXT, "lab_jobs_total{outcome=\"done\"}", 38.0);
    texts.lock().unwrap().insert("b".to_string(), updated);
    tokio::time::timeout(Duration::from_secs(5), sampler.sample(2.0, &mut rec))
        .await
        .expect("a stuck target must not hold the sample up");
    let elapsed = started.elapsed().as_secs_f64();
    server.abort();

    // 20 jobs between two scrapes that both fell within `elapsed`.
    let jobs_done = at(&rec, "jobs_done", "service-b-1", 2.0).unwrap();
    assert!(
        jobs_done >= 20.0 / elapsed,
        "jobs_done {jobs_done}/s in {elapsed} s"
    );
    assert_eq!(
        at(&rec, "partner_handshakes", "partner-api", 2.0),
        Some(0.0)
    );
    assert_eq!(
        at(&rec, "rps", "load", 2.0),
        Some(0.0),
        "the window was taken"
    );
    assert_eq!(at(&rec, "share", "service-b-1", 2.0), None);
}
