//! Structured logging and trace spans through `tracing`.
//!
//! Two layers over one registry: the log formatter (filtered by
//! `telemetry.log_filter` / `RUST_LOG`) and OpenTelemetry (every span at
//! INFO or above, whatever the log filter), so trace ids are made and
//! propagated even when logs are quiet. Spans are exported over OTLP/HTTP
//! only when `telemetry.otlp_endpoint` is set (see [`crate::trace`]).

use std::io::IsTerminal;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::{Resource, trace::SdkTracerProvider};
use tracing_subscriber::{
    EnvFilter, Layer, filter::LevelFilter, fmt, prelude::*, registry::LookupSpan,
};

use crate::config::{LogFormat, TelemetryConfig};

/// Keeps the tracer provider so spans still queued are exported at exit.
#[must_use = "dropping it early stops nothing, but `shutdown` flushes spans at exit"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports what is still queued (when exporting) and stops the exporter.
    /// Blocking, so it runs off the async workers.
    pub async fn shutdown(self) {
        if let Some(provider) = self.provider {
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }
}

/// Installs the global subscriber. `RUST_LOG` wins over `telemetry.log_filter`.
/// Logs go to stderr, which `labctl up` writes to the state dir's `logs/`.
/// JSON lines carry the current span's fields (the `trace_id` among them)
/// under `span` and every enclosing span under `spans`.
pub fn init(service: &'static str, config: &TelemetryConfig) -> Telemetry {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&config.log_filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let logs: Box<dyn Layer<_> + Send + Sync> = match config.log_format {
        LogFormat::Text => fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::stderr().is_terminal())
            .with_target(false)
            .boxed(),
        LogFormat::Json => fmt::layer()
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    let (otel, provider, export_error) = match otel_layer(service, &config.otlp_endpoint) {
        Ok((layer, provider)) => (Some(layer), Some(provider), None),
        Err(e) => (None, None, Some(e)),
    };
    let result = tracing_subscriber::registry()
        .with(logs.with_filter(filter))
        .with(otel.map(|layer| layer.with_filter(LevelFilter::INFO)))
        .try_init();
    if result.is_ok() {
        tracing::debug!(service, "logging initialised");
    }
    if let Some(e) = export_error {
        tracing::error!(error = %error_chain(e.as_ref()), endpoint = %config.otlp_endpoint, "span export is off: the OTLP exporter could not be built");
    } else if !config.otlp_endpoint.is_empty() {
        tracing::info!(endpoint = %config.otlp_endpoint, "exporting spans over OTLP/HTTP");
    }
    Telemetry { provider }
}

/// The OpenTelemetry layer: a tracer provider that always assigns trace
/// ids, with a batch exporter to `{endpoint}/v1/traces` when `endpoint` is
/// not empty.
pub fn otel_layer<S>(
    service: &'static str,
    endpoint: &str,
) -> Result<
    (
        tracing_opentelemetry::OpenTelemetryLayer<S, opentelemetry_sdk::trace::SdkTracer>,
        SdkTracerProvider,
    ),
    Box<dyn std::error::Error + Send + Sync>,
>
where
    S: tracing::Subscriber + for<'span> LookupSpan<'span>,
{
    let mut builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service).build());
    if !endpoint.is_empty() {
        // reqwest is built without a TLS provider of its own (see the
        // workspace Cargo.toml); an https collector needs the process default.
        let _ = rustls::crypto::ring::default_provider().install_default();
        use opentelemetry_otlp::WithExportConfig as _;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(traces_url(endpoint))
            .build()?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    let tracer = provider.tracer(service);
    // Three things the layer does by default, on every request, that the
    // lab has no use for (together about a third of the tracing CPU in A's
    // and B's profiles under load):
    // * context activation attaches the span's OpenTelemetry context each
    //   time its tracing span is entered — every poll of the request's
    //   future, in every task that carries the span. The lab reads a span's
    //   context from the tracing span (`OpenTelemetrySpanExt::context`) and
    //   extracts remote ones against an empty context ([`crate::trace`]),
    //   never from the active OpenTelemetry context;
    // * busy/idle timings read the clock on every enter and exit;
    // * thread attributes copy the name of the runtime thread that created
    //   the span, which says nothing of a request that moves between them.
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_context_activation(false)
        .with_tracked_inactivity(false)
        .with_threads(false);
    Ok((layer, provider))
}

/// The OTLP/HTTP traces URL under a collector's base URL.
fn traces_url(endpoint: &str) -> String {
    let base = endpoint.trim_end_matches('/');
    if base.ends_with("/v1/traces") {
        base.to_owned()
    } else {
        format!("{base}/v1/traces")
    }
}

/// An error and its sources on one line, for logs: `outer: inner: root`.
/// (Errors here keep their causes as sources rather than in their own
/// message, so printing only the top one would lose them.)
pub fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    /// With an endpoint set, finished spans reach it as an OTLP/HTTP
    /// protobuf POST to `/v1/traces` (flushed at shutdown, as at exit).
    #[test]
    fn spans_are_exported_to_the_configured_endpoint() {
        use std::io::{BufRead, BufReader, Read, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let collector = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("the exporter connects");
            let mut reader = BufReader::new(stream.try_clone().expect("clone"));
            let mut head = Vec::new();
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).expect("read");
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().expect("length");
                }
                if line.trim().is_empty() {
                    break;
                }
                head.push(line.trim().to_owned());
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).expect("body");
            let mut stream = stream;
            let _ = stream.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
            (head, body)
        });
        let (layer, provider) =
            otel_layer::<tracing_subscriber::Registry>("export-test", &endpoint).expect("exporter");
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            tracing::info_span!("exported_span").in_scope(|| {});
        });
        provider.shutdown().expect("flushed");
        let (head, body) = collector.join().expect("collector");
        assert_eq!(head[0], "POST /v1/traces HTTP/1.1", "{head:?}");
        assert!(
            head.iter()
                .any(|h| h.eq_ignore_ascii_case("content-type: application/x-protobuf")),
            "{head:?}"
        );
        let needle = b"exported_span";
        assert!(
            body.windows(needle.len()).any(|w| w == needle),
            "the span's name is in the export"
        );
    }

    #[test]
    fn the_traces_path_is_added_once() {
        assert_eq!(
            traces_url("http://jaeger:4318"),
            "http://jaeger:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://jaeger:4318/"),
            "http://jaeger:4318/v1/traces"
        );
        assert_eq!(
            traces_url("http://jaeger:4318/v1/traces"),
            "http://jaeger:4318/v1/traces"
        );
    }
}
