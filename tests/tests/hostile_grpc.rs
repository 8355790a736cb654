//! B's gRPC port against clients that break the rules, spoken in raw HTTP/2
//! (the `h2` crate) so that nothing between the test and B tidies the bytes
//! up: a message that is not protobuf, a method that does not exist, a
//! thousand streams left open on one connection, and five thousand streams
//! reset as soon as they open (the "rapid reset" flood). B must answer each
//! with a gRPC status or refuse it, never crash, and keep serving a well-
//! behaved client meanwhile.

use std::time::Duration;

use bytes::Bytes;
use lab_proto::v1::{GetItemRequest, backend_client::BackendClient};
use lab_tests::TestLab;

const B: &str = "service-b-1";

/// The streams B lets one connection have open at once (`service-b/src/app.rs`).
const B_MAX_STREAMS: usize = 1000;

/// A connection whose driver's end (an error carries the GOAWAY reason) the
/// caller can await.
async fn h2_connect_watched(
    addr: &str,
) -> anyhow::Result<(
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
)> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (send, connection) = h2::client::handshake(tcp).await?;
    let driver = tokio::spawn(connection);
    Ok((send.ready().await?, driver))
}

async fn h2_connect(addr: &str) -> anyhow::Result<h2::client::SendRequest<Bytes>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (send, connection) = h2::client::handshake(tcp).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(send.ready().await?)
}

fn grpc_request(method: &str) -> http::Request<()> {
    http::Request::builder()
        .method("POST")
        .uri(format!("http://b{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap_or_default()
}

/// A length-prefixed gRPC frame around `message`.
fn frame(message: &[u8]) -> Bytes {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(message.len() as u32).to_be_bytes());
    framed.extend_from_slice(message);
    Bytes::from(framed)
}

/// Sends one unary call of raw bytes; returns its `grpc-status` and message.
async fn raw_call(addr: &str, method: &str, body: Bytes) -> anyhow::Result<(String, String)> {
    let mut send = h2_connect(addr).await?;
    let (response, mut stream) = send.send_request(grpc_request(method), false)?;
    stream.send_data(body, true)?;
    let response = tokio::time::timeout(Duration::from_secs(5), response).await??;
    let (head, mut body) = response.into_parts();
    let mut trailers = head.headers.clone();
    while let Some(chunk) = body.data().await {
        chunk?;
    }
    if let Some(more) = body.trailers().await? {
        trailers.extend(more);
    }
    let field = |name: &str| {
        trailers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    Ok((field("grpc-status"), field("grpc-message")))
}

/// A well-behaved call on a fresh connection of its own.
async fn item_is_served(addr: &str) -> anyhow::Result<()> {
    let mut client = BackendClient::connect(format!("http://{addr}")).await?;
    let reply = tokio::time::timeout(
        Duration::from_secs(5),
        client.get_item(GetItemRequest { id: 7 }),
    )
    .await??;
    anyhow::ensure!(reply.get_ref().item.as_ref().map(|i| i.id) == Some(7));
    Ok(())
}

fn b_addr(lab: &TestLab) -> anyhow::Result<String> {
    lab.stack
        .service(B)?
        .grpc_addr
        .clone()
        .ok_or_else(|| anyhow::anyhow!("{B} has no gRPC address"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_calls_get_a_grpc_status_and_floods_are_bounded() -> anyhow::Result<()> {
    let lab = TestLab::start(1, &["mode=fixed"]).await?;
    let addr = b_addr(&lab)?;
    let pid = lab.stack.service(B)?.pid;

    // Bytes that are not a GetItemRequest: INTERNAL (13), as tonic and
    // grpc-go answer a request they cannot decode.
    let garbage = frame(&[0xff, 0xff, 0xff, 0xff, 0x0f, 0x08]);
    let (status, message) = raw_call(&addr, "/lab.v1.Backend/GetItem", garbage).await?;
    assert_eq!(status, "13", "undecodable request: {message}");
    // A frame that claims more bytes than it carries, then ends.
    let (status, message) = raw_call(
        &addr,
        "/lab.v1.Backend/GetItem",
        Bytes::from_static(&[0, 0, 0, 0, 9, 8]),
    )
    .await?;
    assert_eq!(status, "13", "truncated frame: {message}");
    // A method B does not have: UNIMPLEMENTED (12).
    let (status, _) = raw_call(&addr, "/lab.v1.Backend/DropTables", frame(&[])).await?;
    assert_eq!(status, "12", "unknown method");
    let (status, _) = raw_call(&addr, "/no.such.Service/Call", frame(&[])).await?;
    assert_eq!(status, "12", "unknown service");

    // B announces its stream limit (without one, h2 reads "no limit":
    // usize::MAX), and holds a connection to it: 1 000 streams each sending
    // a frame that promises 9 bytes and carries 1, never ended, stay open;
    // a 1 001st complete call on the same connection waits until one of
    // them goes.
    let (mut send, _connection) = h2_connect_watched(&addr).await?;
    // B's SETTINGS arrive after the handshake; one answered call makes sure
    // they have.
    let (response, mut stream) = send.send_request(grpc_request("/no.such.Service/Call"), false)?;
    stream.send_data(frame(&[]), true)?;
    tokio::time::timeout(Duration::from_secs(5), response).await??;
    let announced = send.current_max_send_streams();
    assert_eq!(
        announced, B_MAX_STREAMS,
        "B's SETTINGS_MAX_CONCURRENT_STREAMS"
    );
    let mut open = Vec::new();
    for _ in 0..B_MAX_STREAMS {
        send = send.ready().await?;
        let (response, mut stream) =
            send.send_request(grpc_request("/lab.v1.Backend/GetItem"), false)?;
        stream.send_data(Bytes::from_static(&[0, 0, 0, 0, 9, 8]), false)?;
        open.push((response, stream));
    }
    let (extra, mut extra_stream) =
        send.send_request(grpc_request("/no.such.Service/Call"), false)?;
    extra_stream.send_data(frame(&[]), true)?;
    let mut extra = Box::pin(extra);
    let waited = tokio::time::timeout(Duration::from_secs(1), &mut extra).await;
    assert!(waited.is_err(), "the 1 001st call waited for a free stream");
    let answered_early = futures::future::join_all(
        open.iter_mut()
            .map(|(response, _)| tokio::time::timeout(Duration::from_millis(1), response)),
    )
    .await
    .iter()
    .filter(|r| r.is_ok())
    .count();
    assert_eq!(answered_early, 0, "the unfinished streams stay open in B");
    item_is_served(&addr).await?;
    let fds_open = lab.metric(B, "process_open_fds", &[]).await.unwrap_or(0.0);
    // One stream ends (reset): the waiting call goes through at once.
    let (_, mut first) = open.remove(0);
    first.send_reset(h2::Reason::CANCEL);
    let extra = tokio::time::timeout(Duration::from_secs(5), extra).await??;
    assert_eq!(
        extra
            .headers()
            .get("grpc-status")
            .and_then(|v| v.to_str().ok()),
        Some("12"),
        "answered once a stream was free"
    );
    drop(open);
    drop(send);

    // Rapid reset: streams reset as soon as they are sent. h2 allows 20
    // such resets waiting to be accepted, then ends the connection with
    // GOAWAY ENHANCE_YOUR_CALM.
    let (mut send, connection) = h2_connect_watched(&addr).await?;
    let mut sent = 0;
    let flood = async {
        for _ in 0..5000 {
            let Ok(ready) = send.ready().await else { break };
            send = ready;
            let Ok((response, mut stream)) =
                send.send_request(grpc_request("/lab.v1.Backend/GetItem"), false)
            else {
                break;
            };
            stream.send_reset(h2::Reason::CANCEL);
            drop(response);
            sent += 1;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), flood).await?;
    let ended = tokio::time::timeout(Duration::from_secs(5), connection).await??;
    // B's GOAWAY, or the reset of the socket it closed right after it
    // (which of the two the client reads first varies).
    let ending = match &ended {
        Err(e) if e.is_go_away() => format!("GOAWAY {:?}", e.reason()),
        Err(e) if e.is_io() => format!("the socket closed ({e})"),
        other => panic!("B did not end the flooding connection: {other:?} after {sent} streams"),
    };
    if let Err(e) = &ended
        && e.is_go_away()
    {
        assert_eq!(e.reason(), Some(h2::Reason::ENHANCE_YOUR_CALM), "{e}");
    }
    assert!(
        sent < 5000,
        "cut off before the flood ended ({sent} streams)"
    );
    item_is_served(&addr).await?;
    assert_eq!(lab.stack.service(B)?.pid, pid, "B still the same process");
    assert!(lab.stack.service(B)?.is_alive(), "B survived every flood");
    println!(
        "B: a non-protobuf body and a truncated frame → INTERNAL, unknown methods → \
         UNIMPLEMENTED; 1 000 unfinished streams held open on one connection (B announces \
         {announced}; B's fds then {fds_open}), the 1 001st call waited until one ended; \
         rapid reset: the connection ended ({ending}) after {sent} streams"
    );
    Ok(())
}
