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
    // usize::MAX); the client then holds back streams past it. A thousand
    // streams opened on one connection and never ended keep no one else
    // from being served.
    let mut send = h2_connect(&addr).await?;
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
        stream.send_data(frame(&[0x08]), false)?; // half a message, never ended
        open.push((response, stream));
    }
    item_is_served(&addr).await?;
    let fds_open = lab.metric(B, "process_open_fds", &[]).await.unwrap_or(0.0);
    drop(open);
    drop(send);

    // Rapid reset: 5 000 streams, each reset as soon as it is sent. B must
    // not do 5 000 calls' work; h2 ends such a connection with GOAWAY.
    let mut send = h2_connect(&addr).await?;
    let mut sent = 0;
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
    let calls = lab
        .metric(B, "lab_grpc_requests_total", &[("method", "GetItem")])
        .await
        .unwrap_or(0.0);
    assert!(
        sent < 5000,
        "B ended the flooding connection ({sent} streams sent)"
    );
    assert!(
        calls < 10.0,
        "reset streams did no work in B ({calls} GetItem calls)"
    );
    item_is_served(&addr).await?;
    assert_eq!(lab.stack.service(B)?.pid, pid, "B still the same process");
    assert!(lab.stack.service(B)?.is_alive(), "B survived every flood");
    println!(
        "B: a non-protobuf body and a truncated frame → INTERNAL, unknown methods → \
         UNIMPLEMENTED; 1 000 streams held open on one connection (B announces {announced}; \
         B's fds then {fds_open}); rapid reset: {sent} streams sent \
         and reset before B closed the connection; B counted {calls} GetItem calls in all"
    );
    Ok(())
}
