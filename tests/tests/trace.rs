//! Trace ids across A → B → partner-api (W3C trace context): the id a
//! caller sends in `traceparent`, or the one A starts, comes back in
//! `x-trace-id` and is on the log lines of B and of the partner for the
//! request and for the job it submitted; late work is logged with it.
//!
//! The labs log JSON, as compose runs them, and the tests read the
//! `trace_id` span field from each line — except one, which reads text logs.

use std::time::Duration;

use lab_tests::{TestLab, eventually, plain_client};
use serde_json::Value;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

/// The JSON log lines whose current span, or any enclosing span, has
/// `trace_id` = `id`.
fn json_lines_of(log: &str, id: &str) -> Vec<Value> {
    log.lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|line| {
            let in_span = |span: &Value| span["trace_id"].as_str() == Some(id);
            in_span(&line["span"])
                || line["spans"]
                    .as_array()
                    .is_some_and(|spans| spans.iter().any(in_span))
        })
        .collect()
}

fn messages(lines: &[Value]) -> Vec<&str> {
    lines
        .iter()
        .filter_map(|l| l["fields"]["message"].as_str())
        .collect()
}

/// `POST /api/jobs` through A, with `traceparent` if given; the status and
/// `x-trace-id`.
async fn submit_job(lab: &TestLab, traceparent: Option<&str>) -> anyhow::Result<(u16, String)> {
    let mut request = plain_client()?
        .post(format!("{}/api/jobs", lab.a_url()))
        .header("content-type", "application/json")
        .body(r#"{"payload":"traced"}"#);
    if let Some(value) = traceparent {
        request = request.header("traceparent", value);
    }
    let response = request.send().await?;
    let trace_id = response
        .headers()
        .get("x-trace-id")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| anyhow::anyhow!("no x-trace-id in A's answer {}", response.status()))?
        .to_owned();
    Ok((response.status().as_u16(), trace_id))
}

fn is_valid_trace_id(id: &str) -> bool {
    id.len() == 32
        && id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        && id.bytes().any(|b| b != b'0')
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callers_trace_id_reaches_b_the_job_and_the_partner() -> anyhow::Result<()> {
    let lab = TestLab::start(
        1,
        &[
            "telemetry.log_format=json",
            "faults.worker=bounded",
            "partner.latency=0s",
        ],
    )
    .await?;
    let (status, trace_id) = submit_job(&lab, Some(TRACEPARENT)).await?;
    assert_eq!(status, 202);
    assert_eq!(trace_id, TRACE_ID, "A joined the caller's trace");

    // B: the request's line, then the job's — which ran later, in the worker.
    let b_lines = eventually(Duration::from_secs(20), "B to run the job", || async {
        let lines = json_lines_of(&lab.log("service-b-1").ok()?, TRACE_ID);
        messages(&lines)
            .contains(&"partner called")
            .then_some(lines)
    })
    .await?;
    let messages = messages(&b_lines);
    assert!(messages.contains(&"job submitted"), "{b_lines:#?}");
    let partner_call = b_lines
        .iter()
        .find(|l| l["fields"]["message"] == "partner called")
        .ok_or_else(|| anyhow::anyhow!("no partner call line"))?;
    assert_eq!(partner_call["fields"]["outcome"], "ok", "{partner_call}");
    assert_eq!(
        partner_call["span"]["name"], "job",
        "the partner call ran in the job's span: {partner_call}"
    );

    // The partner served that call in the same trace.
    let served = eventually(
        Duration::from_secs(10),
        "the partner's log line",
        || async {
            let lines = json_lines_of(&lab.log("partner-api").ok()?, TRACE_ID);
            lines
                .into_iter()
                .find(|l| l["fields"]["message"] == "served")
        },
    )
    .await?;
    assert_eq!(served["fields"]["status"], 200, "{served}");
    println!("B: {messages:?}; partner: {served}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_without_traceparent_gets_a_fresh_trace_id_that_b_logs() -> anyhow::Result<()> {
    // Text logs this time: the span's fields are on each line as
    // `request{… trace_id=<id>}:`.
    let lab = TestLab::start(1, &["worker.enabled=false"]).await?;
    let (status, first) = submit_job(&lab, None).await?;
    let (_, second) = submit_job(&lab, None).await?;
    assert_eq!(status, 202);
    for id in [&first, &second] {
        assert!(is_valid_trace_id(id), "{id:?} is not a W3C trace id");
    }
    assert_ne!(first, second, "each request starts its own trace");
    let line = eventually(
        Duration::from_secs(10),
        "B's line for the request",
        || async {
            lab.log("service-b-1")
                .ok()?
                .lines()
                .find(|l| l.contains(&format!("trace_id={first}")) && l.contains("job submitted"))
                .map(str::to_owned)
        },
    )
    .await?;
    println!("{line}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_work_is_logged_with_the_trace_id_from_as_504() -> anyhow::Result<()> {
    // As in tests/tests/deadline.rs: B's handler outlasts A's deadline, and
    // under `ignore` it runs on after A answered 504.
    let lab = TestLab::start(
        1,
        &[
            "telemetry.log_format=json",
            "faults.deadline=ignore",
            "service_a.backend_timeout=300ms",
            "service_b.handler_latency=1s",
            "worker.enabled=false",
        ],
    )
    .await?;
    let (status, trace_id) = submit_job(&lab, None).await?;
    assert_eq!(status, 504, "A gave up");
    assert!(is_valid_trace_id(&trace_id), "{trace_id:?}");
    let late = eventually(Duration::from_secs(10), "B's late-work line", || async {
        let lines = json_lines_of(&lab.log("service-b-1").ok()?, &trace_id);
        lines
            .into_iter()
            .find(|l| l["fields"]["late_by_ms"].is_u64())
    })
    .await?;
    assert_eq!(late["level"], "WARN", "{late}");
    let late_by_ms = late["fields"]["late_by_ms"].as_u64().unwrap_or(0);
    // B's deadline is A's 300 ms from when the call reached B; the work took
    // 1 s from then, so it finished about 700 ms late.
    assert!(
        (500..5_000).contains(&late_by_ms),
        "finished {late_by_ms} ms after the deadline: {late}"
    );
    println!("A answered 504 with x-trace-id {trace_id}; B: {late}");
    Ok(())
}
