//! What `TraceContextLayer` costs per request with the services' tracing
//! layers (OpenTelemetry with no exporter, spans formatted for a text log
//! written nowhere), with and without an incoming `traceparent`. A figure
//! to read, not a check:
//!
//! ```sh
//! cargo run --release -p lab-common --example trace_layer_cost
//! ```

use http::HeaderValue;
use lab_common::trace::{TRACE_ID_HEADER, TRACEPARENT, TraceContextLayer};
use tower::{Layer, ServiceExt};
use tracing_subscriber::layer::SubscriberExt;

/// A W3C `traceparent` as a caller would send it.
const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const REQUESTS: u32 = 200_000;

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let (otel, _provider) =
        lab_common::telemetry::otel_layer::<tracing_subscriber::Registry>("bench", "")
            .map_err(|e| anyhow::anyhow!(e))?;
    let subscriber = tracing_subscriber::registry()
        .with(otel)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::sink));
    let _guard = tracing::subscriber::set_default(subscriber);
    let ok = tower::service_fn(|_req: http::Request<()>| async {
        Ok::<_, std::convert::Infallible>(http::Response::new(()))
    });
    let service = TraceContextLayer.layer(ok);
    for with_parent in [false, true] {
        let started = std::time::Instant::now();
        for _ in 0..REQUESTS {
            let mut request = http::Request::new(());
            if with_parent {
                request
                    .headers_mut()
                    .insert(TRACEPARENT, HeaderValue::from_static(PARENT));
            }
            let response = service.clone().oneshot(request).await?;
            anyhow::ensure!(
                response.headers().contains_key(TRACE_ID_HEADER),
                "the layer set no {TRACE_ID_HEADER}"
            );
        }
        println!(
            "with traceparent: {with_parent}: {:?} per request",
            started.elapsed() / REQUESTS
        );
    }
    Ok(())
}
