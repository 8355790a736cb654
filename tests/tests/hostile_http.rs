//! A's public port against hostile clients at the connection level, on a
//! real stack (fixed preset, one B): heads trickled a byte at a time
//! (slowloris), two thousand connections that send nothing, heads too large,
//! request-smuggling attempts, a body that never finishes. None of them may
//! crash A, keep its file descriptors, or stop it serving everyone else.
//!
//! A's header read timeout is 4 s here (default 10 s) and its deadline 1 s,
//! so a body gets 4 s + 1 s before A answers 408.

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use lab_tests::{TestLab, eventually, get_json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(4);
const A: &str = "service-a";

/// A lab with A's timeouts as above, and `extra` settings.
async fn start(extra: &[&str]) -> anyhow::Result<TestLab> {
    let mut settings = vec![
        "mode=fixed",
        "service_a.header_read_timeout=4s",
        "service_a.backend_timeout=1s",
    ];
    settings.extend_from_slice(extra);
    TestLab::start(1, &settings).await
}

/// This test holds over 2 000 sockets; a soft limit of 1 024 is common.
fn raise_open_file_limit() -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(())
}

/// A's address (parsed once: connecting by a `host:port` string would ask
/// the resolver on every connect).
fn a_addr(lab: &TestLab) -> anyhow::Result<SocketAddr> {
    Ok(lab.a_url().trim_start_matches("http://").parse()?)
}

async fn a_gauge(lab: &TestLab, name: &str) -> anyhow::Result<f64> {
    lab.metric(A, name, &[])
        .await
        .ok_or_else(|| anyhow::anyhow!("service-a does not export {name}"))
}

/// Reads until A closes the connection, for at most `limit`. Returns what
/// was read and how long after `since` the close came (`None`: still open).
async fn read_until_closed(
    stream: &mut (impl AsyncReadExt + Unpin),
    since: Instant,
    limit: Duration,
) -> (String, Option<Duration>) {
    let mut seen = Vec::new();
    let mut buf = [0u8; 8192];
    let end = Instant::now() + limit;
    loop {
        let left = end.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, stream.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => {
                return (String::from_utf8_lossy(&seen).into(), Some(since.elapsed()));
            }
            Ok(Ok(n)) => seen.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&seen).into(), None),
        }
    }
}

/// Sends `raw` on a new connection and reads every answer until A closes
/// it. Returns the status of each answer, in order.
async fn exchange(lab: &TestLab, raw: &[u8]) -> anyhow::Result<Vec<u16>> {
    let mut stream = TcpStream::connect(a_addr(lab)?).await?;
    stream.write_all(raw).await?;
    let (seen, closed) =
        read_until_closed(&mut stream, Instant::now(), Duration::from_secs(10)).await;
    anyhow::ensure!(closed.is_some(), "A kept the connection open: {seen:?}");
    Ok(statuses(&seen))
}

/// The status codes of the HTTP/1.1 answers in `text`.
fn statuses(text: &str) -> Vec<u16> {
    text.match_indices("HTTP/1.1 ")
        .filter_map(|(at, prefix)| text.get(at + prefix.len()..at + prefix.len() + 3))
        .filter_map(|code| code.parse().ok())
        .collect()
}

/// A's count of answered requests on one route.
async fn route_count(lab: &TestLab, route: &str) -> f64 {
    lab.metric(A, "lab_http_requests_total", &[("route", route)])
        .await
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_connections_are_closed_and_everyone_else_is_served() -> anyhow::Result<()> {
    raise_open_file_limit()?;
    let lab = start(&[]).await?;
    let addr = a_addr(&lab)?;
    let fds_before = a_gauge(&lab, "process_open_fds").await?;
    let rss_before = a_gauge(&lab, "process_resident_memory_bytes").await?;

    // Slowloris: 50 connections, each sending a header byte every 200 ms
    // and never the blank line that ends the head.
    let mut trickles = Vec::new();
    for _ in 0..50 {
        let stream = TcpStream::connect(addr).await?;
        let opened = Instant::now();
        let (mut read, mut write) = stream.into_split();
        trickles.push(tokio::spawn(async move {
            let writer = tokio::spawn(async move {
                let _ = write
                    .write_all(b"GET /api/items/1 HTTP/1.1\r\nHost: a\r\n")
                    .await;
                while write.write_all(b"X").await.is_ok() {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            let (_, closed) = read_until_closed(&mut read, opened, Duration::from_secs(15)).await;
            writer.abort();
            closed
        }));
    }

    // 2 000 connections that send nothing at all.
    let mut idle = Vec::new();
    let connecting = Instant::now();
    for _ in 0..2000 {
        idle.push((TcpStream::connect(addr).await?, Instant::now()));
    }
    let connected_in = connecting.elapsed();
    let peak_fds = eventually(
        Duration::from_secs(5),
        "A to hold the idle connections",
        || async {
            let fds = a_gauge(&lab, "process_open_fds").await.ok()?;
            (fds >= fds_before + 1900.0).then_some(fds)
        },
    )
    .await?;
    let peak_rss = a_gauge(&lab, "process_resident_memory_bytes").await?;

    // Meanwhile an ordinary client is served as usual.
    let (status, _, body, took) = get_json(&format!("{}/api/items/7", lab.a_url())).await?;
    assert_eq!(status, 200, "{body}");
    assert!(
        took < Duration::from_millis(500),
        "served at once: {took:?}"
    );

    // Every trickling connection is closed at the header read timeout,
    // although it kept sending.
    let mut trickle_closed = Vec::new();
    for trickle in trickles {
        let closed = trickle
            .await?
            .ok_or_else(|| anyhow::anyhow!("a slowloris connection was still open after 15 s"))?;
        trickle_closed.push(closed);
    }
    trickle_closed.sort();
    let (first, last) = (trickle_closed[0], trickle_closed[trickle_closed.len() - 1]);
    assert!(
        first >= HEADER_READ_TIMEOUT - Duration::from_millis(100),
        "{first:?}"
    );
    assert!(last < HEADER_READ_TIMEOUT * 3, "{last:?}");

    // Every idle connection is closed too, and A's fds come back.
    let mut idle_closed = Vec::new();
    for (stream, opened) in &mut idle {
        let (_, closed) = read_until_closed(stream, *opened, Duration::from_secs(15)).await;
        idle_closed.push(closed.ok_or_else(|| anyhow::anyhow!("an idle connection stayed open"))?);
    }
    let (first_idle, last_idle) = (
        idle_closed.iter().min().copied().unwrap_or_default(),
        idle_closed.iter().max().copied().unwrap_or_default(),
    );
    assert!(
        first_idle >= HEADER_READ_TIMEOUT - Duration::from_millis(100),
        "{first_idle:?}"
    );
    let fds_after = eventually(
        Duration::from_secs(5),
        "A's fds back to where they were",
        || async {
            let fds = a_gauge(&lab, "process_open_fds").await.ok()?;
            (fds <= fds_before + 10.0).then_some(fds)
        },
    )
    .await?;
    let rss_after = a_gauge(&lab, "process_resident_memory_bytes").await?;
    let mib = |b: f64| b / (1024.0 * 1024.0);
    println!(
        "slowloris: 50 connections closed {first:.2?}–{last:.2?} after opening; \
         2 000 idle (connected in {connected_in:.2?}): A's fds {fds_before} → {peak_fds} → \
         {fds_after}, each closed {first_idle:.2?}–{last_idle:.2?} after it opened; A's RSS \
         {:.1} → {:.1} → {:.1} MiB",
        mib(rss_before),
        mib(peak_rss),
        mib(rss_after)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_heads_and_smuggling_attempts_get_one_clear_answer() -> anyhow::Result<()> {
    // One admission place: if the stalled body below kept its place, the
    // request after it would be shed.
    let lab = start(&["service_a.max_concurrent_requests=1"]).await?;
    const ITEMS: &str = "/api/items/{id}";

    // A head over 32 KiB, and one with more header fields than 100: 431.
    let huge = format!(
        "GET /api/items/1 HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40 * 1024)
    );
    assert_eq!(exchange(&lab, huge.as_bytes()).await?, [431], "huge header");
    let many: String = (0..150).map(|i| format!("X-{i}: v\r\n")).collect();
    let many = format!("GET /api/items/1 HTTP/1.1\r\nHost: a\r\n{many}\r\n");
    assert_eq!(exchange(&lab, many.as_bytes()).await?, [431], "150 fields");

    // Smuggling: a request hidden behind Content-Length + chunked. Whichever
    // length A believed, the bytes after the chunked body's end would be a
    // second request; A must answer once and close, the hidden GET unread.
    let items_before = route_count(&lab, ITEMS).await;
    let smuggled = b"POST /api/jobs HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n\
Content-Length: 48\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n\
GET /api/items/9 HTTP/1.1\r\nHost: a\r\n\r\n";
    let answers = exchange(&lab, smuggled).await?;
    assert_eq!(
        answers.len(),
        1,
        "one answer, then the connection closes: {answers:?}"
    );
    assert_eq!(answers[0], 400, "an empty body is not a job: {answers:?}");
    // Two Content-Length values that differ, and a coding A cannot read.
    let two_lengths = b"POST /api/jobs HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\
Content-Length: 50\r\n\r\nhello";
    assert_eq!(exchange(&lab, two_lengths).await?, [400], "two lengths");
    let gzip = b"POST /api/jobs HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nhello";
    assert_eq!(exchange(&lab, gzip).await?, [400], "not chunked");
    assert_eq!(
        route_count(&lab, ITEMS).await,
        items_before,
        "no hidden GET reached A's item route"
    );

    // A body that stops halfway: 408 once the request has had the header
    // read timeout plus A's deadline (4 s + 1 s), and the one admission
    // place it held is free again.
    let mut stream = TcpStream::connect(a_addr(&lab)?).await?;
    stream
        .write_all(
            b"POST /api/jobs HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n\
Content-Length: 100\r\n\r\n{\"payload\":",
        )
        .await?;
    let sent = Instant::now();
    let (answer, closed) = read_until_closed(&mut stream, sent, Duration::from_secs(10)).await;
    let took = closed.ok_or_else(|| anyhow::anyhow!("A kept waiting for the body: {answer}"))?;
    assert_eq!(statuses(&answer), [408], "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    let bound = HEADER_READ_TIMEOUT + Duration::from_secs(1);
    assert!(took >= bound - Duration::from_millis(100), "{took:?}");
    assert!(took < bound + Duration::from_secs(2), "{took:?}");
    println!("a body that stopped halfway: 408 after {took:.2?} (bound {bound:?})");

    // A is still whole, and its one admission place free.
    let (status, _, body, _) = get_json(&format!("{}/api/items/7", lab.a_url())).await?;
    assert_eq!(status, 200, "{body}");
    Ok(())
}
