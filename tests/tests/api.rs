//! A's HTTP contract and B's gRPC contract on a real stack: served_by on
//! every answer, validation, error mapping, health and reflection.

use std::time::Duration;

use lab_proto::v1::{GetItemRequest, SubmitJobRequest, backend_client::BackendClient};
use lab_tests::{TestLab, get_json, request_json};
use tokio_stream::StreamExt;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::{
    ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
    server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_and_grpc_contracts_hold() -> anyhow::Result<()> {
    let lab = TestLab::start(1, &["service_b.max_payload_bytes=100"]).await?;
    let a = lab.a_url();

    // Item read: served_by in body and header, the seeded row.
    let (status, header, body, _) = get_json(&format!("{a}/api/items/42")).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(header.as_deref(), Some("b-1"));
    assert_eq!(body["served_by"], "b-1");
    assert_eq!(body["item"]["id"], 42);
    assert_eq!(body["item"]["name"], "item-42");

    // Bad input → 400 with a reason; unknown id → 404; unknown route → 404 JSON.
    let (status, _, body, _) = get_json(&format!("{a}/api/items/abc")).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (400, Some("invalid_argument")),
        "{body}"
    );
    assert!(
        body["error"].as_str().unwrap_or_default().contains("abc"),
        "{body}"
    );
    let (status, _, body, _) = get_json(&format!("{a}/api/items/0")).await?;
    assert_eq!(status, 400, "{body}");
    let (status, header, body, _) = get_json(&format!("{a}/api/items/99999999")).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );
    assert_eq!(
        header.as_deref(),
        Some("b-1"),
        "errors from B still name it"
    );
    let (status, _, body, _) = get_json(&format!("{a}/nope")).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (404, Some("not_found")),
        "{body}"
    );

    // Jobs: submit then read back.
    let (status, _, body, _) = request_json(
        "POST",
        &format!("{a}/api/jobs"),
        Some(r#"{"payload":"hello"}"#.into()),
    )
    .await?;
    assert_eq!(status, 202, "{body}");
    let job_id = body["job_id"]
        .as_i64()
        .ok_or_else(|| anyhow::anyhow!("no job_id in {body}"))?;
    let (status, _, body, _) = get_json(&format!("{a}/api/jobs/{job_id}")).await?;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["job"]["payload"], "hello");
    assert_eq!(body["served_by"], "b-1");
    // B's worker picks it up and records the result.
    let done = lab_tests::eventually(Duration::from_secs(10), "the job to be done", || async {
        let (_, _, body, _) = get_json(&format!("{a}/api/jobs/{job_id}")).await.ok()?;
        (body["job"]["status"] == "done").then_some(body)
    })
    .await?;
    assert!(
        done["job"]["result"]
            .as_str()
            .unwrap_or_default()
            .starts_with("digest "),
        "{done}"
    );
    assert!(done["job"]["attempts"].as_u64().unwrap_or(0) >= 1, "{done}");

    // Oversized payload (B's limit is 100 bytes here) → 400 naming the limit;
    // a body over A's own limit → 413; malformed JSON → 400.
    let big = format!(r#"{{"payload":"{}"}}"#, "x".repeat(200));
    let (status, _, body, _) = request_json("POST", &format!("{a}/api/jobs"), Some(big)).await?;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or_default()
            .contains("max_payload_bytes"),
        "{body}"
    );
    let huge = format!(r#"{{"payload":"{}"}}"#, "x".repeat(100_000));
    let (status, _, body, _) = request_json("POST", &format!("{a}/api/jobs"), Some(huge)).await?;
    assert_eq!(
        (status, body["code"].as_str()),
        (413, Some("payload_too_large")),
        "{body}"
    );
    let (status, _, body, _) =
        request_json("POST", &format!("{a}/api/jobs"), Some("{not json".into())).await?;
    assert_eq!(status, 400, "{body}");

    // gRPC straight to B: validation, health, reflection (grpcurl's needs).
    let grpc = format!(
        "http://{}",
        lab.stack
            .service("service-b-1")?
            .grpc_addr
            .clone()
            .ok_or_else(|| anyhow::anyhow!("no grpc addr"))?
    );
    let channel = tonic::transport::Endpoint::from_shared(grpc)?
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?;
    let mut backend = BackendClient::new(channel.clone());
    let err = backend
        .get_item(GetItemRequest { id: -5 })
        .await
        .expect_err("negative id rejected");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("-5"), "{}", err.message());
    let err = backend
        .submit_job(SubmitJobRequest {
            payload: "y".repeat(101),
        })
        .await
        .expect_err("oversized payload rejected");
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let err = backend
        .submit_job(SubmitJobRequest {
            payload: "y".repeat(2 * 1024 * 1024),
        })
        .await
        .expect_err("payload over the transport limit refused");
    // Over B's 1 MiB decoding limit tonic answers OUT_OF_RANGE, where gRPC's
    // own servers say RESOURCE_EXHAUSTED. The lab keeps OUT_OF_RANGE: B says
    // RESOURCE_EXHAUSTED when it sheds load, which callers may retry, and a
    // message too big to decode will never fit (A answers it 400).
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(
        err.message().contains("the limit is: 1048576 bytes"),
        "{}",
        err.message()
    );

    let health = HealthClient::new(channel.clone())
        .check(HealthCheckRequest {
            service: "lab.v1.Backend".into(),
        })
        .await?;
    assert_eq!(health.get_ref().status, 1, "SERVING");

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter(vec![request]))
        .await?
        .into_inner();
    let response = responses
        .next()
        .await
        .ok_or_else(|| anyhow::anyhow!("no reflection answer"))??;
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        anyhow::bail!("unexpected reflection answer {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains(&"lab.v1.Backend".to_string()), "{names:?}");
    assert!(
        names.contains(&"grpc.health.v1.Health".to_string()),
        "{names:?}"
    );

    // Admin endpoints.
    let (status, _, body, _) = get_json(&format!("{}/faults", lab.admin_url("service-a")?)).await?;
    assert_eq!(status, 200);
    assert_eq!(body["faults"]["lb"], "l4");
    assert_eq!(body["mode"], "buggy");
    let (status, _, _, _) = get_json(&format!("{}/healthz", lab.admin_url("service-b-1")?)).await?;
    assert_eq!(status, 200);
    let metrics = lab.metrics("service-a").await?;
    for name in [
        "lab_http_requests_total",
        "lab_http_request_duration_seconds_bucket",
        "lab_backend_calls_total",
        "lab_backend_endpoints",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
        "process_threads",
        "tokio_alive_tasks",
    ] {
        assert!(
            lab_tests::metric_sum(&metrics, name, &[]).is_some(),
            "A lacks {name}"
        );
    }
    assert_eq!(
        lab_tests::metric_sum(
            &metrics,
            "lab_http_requests_total",
            &[("route", "/api/items/{id}"), ("status", "404")]
        ),
        Some(1.0)
    );
    let metrics = lab.metrics("service-b-1").await?;
    for name in [
        "lab_grpc_requests_total",
        "lab_grpc_request_duration_seconds_bucket",
        "process_resident_memory_bytes",
        "tokio_alive_tasks",
    ] {
        assert!(
            lab_tests::metric_sum(&metrics, name, &[]).is_some(),
            "B lacks {name}"
        );
    }
    Ok(())
}
