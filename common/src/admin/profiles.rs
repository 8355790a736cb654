//! `GET /debug/pprof/profile` and `GET /debug/pprof/heap`: the profiles Go
//! services serve from `net/http/pprof`, for every lab process
//! (docs/architecture.md, "Profiles and task dumps"). Operator-only: a CPU
//! profile costs CPU, a heap dump symbolises the whole binary.
//!
//! Both answer a pprof protobuf by default (`go tool pprof` and Google's
//! `pprof` read it; symbols are resolved in the process, so no binary is
//! needed) and a flame graph SVG with `format=svg`.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use axum::{
    Extension, Json,
    extract::Query,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::auth;
use crate::heap::{self, HeapDumpError, HeapFormat};

/// Sampling rate of CPU profiles: 99 Hz (not 100) so sampling does not run
/// in lockstep with 10 ms timers, as Go and perf users do.
const CPU_SAMPLE_HZ: i32 = 99;

/// `seconds` when not given, as in Go.
const DEFAULT_SECONDS: u64 = 30;
/// Longest CPU profile; a minute is plenty to see a hot path.
const MAX_SECONDS: u64 = 60;

/// Frames from these libraries are not unwound through: their unwind info
/// is missing or wrong often enough to crash or garble a DWARF unwind from a
/// signal handler.
const UNWIND_BLOCKLIST: [&str; 4] = ["libc", "libgcc", "pthread", "vdso"];

/// One CPU profile at a time per process: the SIGPROF timer and the sample
/// table are process-wide.
static CPU_PROFILE_RUNNING: AtomicBool = AtomicBool::new(false);

/// Holds a process-wide "running" flag until dropped (after the answer is
/// built), for work of which a process can do only one at a time or gains
/// nothing from two: CPU profiles, task stack dumps.
#[derive(Debug)]
pub(super) struct OneAtATime(&'static AtomicBool);

impl OneAtATime {
    /// `None` while another holder has `running`.
    pub(super) fn take(running: &'static AtomicBool) -> Option<Self> {
        running
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Self(running))
    }
}

impl Drop for OneAtATime {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Pprof,
    Svg,
}

/// `format`: absent, `pprof` or `proto` → protobuf; `svg` or `flamegraph`
/// → SVG.
fn parse_format(params: &HashMap<String, String>) -> Result<Format, String> {
    match params.get("format").map(String::as_str) {
        None | Some("pprof" | "proto") => Ok(Format::Pprof),
        Some("svg" | "flamegraph") => Ok(Format::Svg),
        Some(other) => Err(format!(
            "format: {other:?} is not one of pprof, proto, svg, flamegraph"
        )),
    }
}

/// `seconds`: a whole number in 1..=60, 30 when absent.
fn parse_seconds(params: &HashMap<String, String>) -> Result<u64, String> {
    let Some(raw) = params.get("seconds") else {
        return Ok(DEFAULT_SECONDS);
    };
    match raw.parse::<u64>() {
        Ok(s) if (1..=MAX_SECONDS).contains(&s) => Ok(s),
        _ => Err(format!(
            "seconds: {raw:?} is not a whole number of seconds in 1..={MAX_SECONDS}"
        )),
    }
}

/// Samples every thread of the process for `seconds` and answers the
/// profile. The capture and the report (symbolising) run on a blocking
/// thread, never on the async runtime being profiled.
pub(super) async fn cpu_profile(
    Extension(operator): Extension<auth::Operator>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let (seconds, format) = match (parse_seconds(&params), parse_format(&params)) {
        (Ok(s), Ok(f)) => (s, f),
        (Err(reason), _) | (_, Err(reason)) => return invalid(reason),
    };
    let Some(slot) = OneAtATime::take(&CPU_PROFILE_RUNNING) else {
        return error(
            StatusCode::CONFLICT,
            "profile_in_progress",
            "a CPU profile of this process is already being taken; one at a time \
             (retry when it is done)"
                .into(),
        );
    };
    tracing::info!(by = ?operator.addr, seconds, ?format, "CPU profile started");
    let captured = tokio::task::spawn_blocking(move || {
        let _slot = slot;
        capture_cpu(Duration::from_secs(seconds), format)
    })
    .await;
    match captured {
        Ok(Ok(body)) => profile_response(body, format, false),
        Ok(Err(reason)) => error(StatusCode::INTERNAL_SERVER_ERROR, "profile_failed", reason),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "profile_failed",
            format!("the profiling thread failed: {e}"),
        ),
    }
}

/// Runs the SIGPROF sampler for `duration` (this thread sleeps meanwhile)
/// and encodes the result.
fn capture_cpu(duration: Duration, format: Format) -> Result<Vec<u8>, String> {
    let guard = pprof::ProfilerGuardBuilder::default()
        .frequency(CPU_SAMPLE_HZ)
        .blocklist(&UNWIND_BLOCKLIST)
        .build()
        .map_err(|e| format!("cannot start the CPU profiler: {e}"))?;
    std::thread::sleep(duration);
    let report = guard
        .report()
        .build()
        .map_err(|e| format!("cannot build the CPU profile: {e}"))?;
    drop(guard);
    let mut body = Vec::new();
    match format {
        Format::Pprof => {
            let profile = report
                .pprof()
                .map_err(|e| format!("cannot encode the CPU profile: {e}"))?;
            pprof::protos::Message::encode(&profile, &mut body)
                .map_err(|e| format!("cannot encode the CPU profile: {e}"))?;
        }
        Format::Svg => {
            let mut options = pprof::flamegraph::Options::default();
            // Frames narrower than a pixel cannot be seen or clicked; left
            // out they halve the SVG of a busy async process.
            options.min_width = 1.0;
            options.title = "CPU".into();
            report
                .flamegraph_with_options(&mut body, &mut options)
                .map_err(|e| format!("cannot draw the flame graph: {e}"))?
        }
    }
    Ok(body)
}

/// Dumps the bytes allocated and still live, by allocation site, from
/// jemalloc's samples (`[admin] heap_profiling`); 503 with how to switch it
/// on when sampling is off.
pub(super) async fn heap_profile(
    Extension(operator): Extension<auth::Operator>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let format = match parse_format(&params) {
        Ok(Format::Pprof) => HeapFormat::Pprof,
        Ok(Format::Svg) => HeapFormat::Svg,
        Err(reason) => return invalid(reason),
    };
    tracing::info!(by = ?operator.addr, ?format, "heap profile dumped");
    match tokio::task::spawn_blocking(move || heap::dump(format)).await {
        Ok(Ok(body)) => {
            let format = match format {
                HeapFormat::Pprof => Format::Pprof,
                HeapFormat::Svg => Format::Svg,
            };
            profile_response(body, format, true)
        }
        Ok(Err(HeapDumpError::Off(reason))) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "heap_profiling_off",
            reason.into(),
        ),
        Ok(Err(e @ HeapDumpError::Dump(_))) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "profile_failed",
            e.to_string(),
        ),
        Err(e) => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "profile_failed",
            format!("the heap dump thread failed: {e}"),
        ),
    }
}

/// The profile with its content type; `gzipped` protobufs say so, as Go's
/// do (pprof tools read either).
fn profile_response(body: Vec<u8>, format: Format, gzipped: bool) -> Response {
    let content_type = match format {
        Format::Pprof => "application/octet-stream",
        Format::Svg => "image/svg+xml",
    };
    let mut response = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    if format == Format::Pprof {
        let name = if gzipped {
            "attachment; filename=\"heap.pb.gz\""
        } else {
            "attachment; filename=\"profile.pb\""
        };
        response.headers_mut().insert(
            header::CONTENT_DISPOSITION,
            header::HeaderValue::from_static(name),
        );
    }
    response
}

fn invalid(reason: String) -> Response {
    error(StatusCode::BAD_REQUEST, "invalid_argument", reason)
}

fn error(status: StatusCode, code: &str, reason: String) -> Response {
    (status, Json(json!({"error": reason, "code": code}))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn seconds_must_be_a_whole_number_in_range() {
        assert_eq!(parse_seconds(&params(&[])).unwrap(), 30);
        assert_eq!(parse_seconds(&params(&[("seconds", "5")])).unwrap(), 5);
        for bad in ["0", "61", "-1", "1.5", "x"] {
            let reason = parse_seconds(&params(&[("seconds", bad)])).unwrap_err();
            assert!(
                reason.starts_with("seconds:") && reason.contains("1..=60"),
                "{reason}"
            );
        }
    }

    #[test]
    fn format_names_are_checked() {
        assert_eq!(parse_format(&params(&[])).unwrap(), Format::Pprof);
        assert_eq!(
            parse_format(&params(&[("format", "flamegraph")])).unwrap(),
            Format::Svg
        );
        let reason = parse_format(&params(&[("format", "png")])).unwrap_err();
        assert!(reason.starts_with("format:"), "{reason}");
    }

    #[test]
    fn one_cpu_profile_at_a_time() {
        let first = OneAtATime::take(&CPU_PROFILE_RUNNING).unwrap();
        assert!(OneAtATime::take(&CPU_PROFILE_RUNNING).is_none());
        drop(first);
        assert!(OneAtATime::take(&CPU_PROFILE_RUNNING).is_some());
    }
}
