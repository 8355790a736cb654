//! The rules a configuration keeps beyond its types. Each rule is one small
//! check that names the key it rejects; [`validate`] runs them in order and
//! reports the first one broken, with where the value came from.

use std::{net::SocketAddr, time::Duration};

use super::{ConfigError, LabConfig, Origin};

/// A broken rule: the key, its value as quoted in the message, and why.
struct Broken {
    key: &'static str,
    value: String,
    reason: String,
}

type Rule = fn(&LabConfig) -> Result<(), Broken>;

/// Every rule, in the order they are checked.
const RULES: [Rule; 18] = [
    listeners_are_ip_port,
    backend_urls_are_http,
    mysql_url_is_mysql,
    timeouts_are_positive,
    recycle_jitter_is_at_most_half,
    counts_are_at_least_one,
    worker_intervals_are_positive,
    claims_outlive_jobs,
    log_filter_parses,
    pool_and_payload_are_at_least_one,
    partner_url_is_https,
    partner_answers_may_have_a_body,
    lease_ttl_is_whole_seconds,
    registry_prefix_is_a_go_target,
    registry_guard_loss_is_a_share,
    admin_token_is_strong,
    otlp_endpoint_is_http,
    item_cache_is_bounded,
];

/// Checks every rule; `origin_of` says where a rejected key's value came from.
pub(super) fn validate(
    config: &LabConfig,
    origin_of: impl Fn(&str) -> Origin,
) -> Result<(), ConfigError> {
    for rule in RULES {
        rule(config).map_err(|broken| ConfigError::InvalidValue {
            key: broken.key.to_string(),
            value: broken.value,
            origin: origin_of(broken.key),
            reason: broken.reason,
        })?;
    }
    Ok(())
}

/// Listen addresses are read as IP:PORT elsewhere too (B's instance id and
/// advertised address, labctl's port plan): a host name would fail there,
/// later and far from the key.
fn listeners_are_ip_port(c: &LabConfig) -> Result<(), Broken> {
    let listeners = [
        ("service_a.listen", &c.service_a.listen),
        ("service_a.admin_listen", &c.service_a.admin_listen),
        ("service_b.listen", &c.service_b.listen),
        ("service_b.admin_listen", &c.service_b.admin_listen),
        ("partner.listen", &c.partner.listen),
        ("partner.admin_listen", &c.partner.admin_listen),
    ];
    for (key, value) in listeners {
        if value.parse::<SocketAddr>().is_err() {
            return Err(broken(
                key,
                quoted(value),
                "expected IP:PORT, e.g. 127.0.0.1:8080",
            ));
        }
    }
    Ok(())
}

/// A's gRPC channel to HAProxy needs a scheme to dial.
fn backend_urls_are_http(c: &LabConfig) -> Result<(), Broken> {
    let urls = [
        ("service_a.backend_l4_url", &c.service_a.backend_l4_url),
        ("service_a.backend_l7_url", &c.service_a.backend_l7_url),
    ];
    for (key, value) in urls {
        if !(value.starts_with("http://") || value.starts_with("https://")) {
            return Err(broken(
                key,
                quoted(value),
                "expected an http:// or https:// URL",
            ));
        }
    }
    Ok(())
}

/// B's pool speaks the MySQL protocol only.
fn mysql_url_is_mysql(c: &LabConfig) -> Result<(), Broken> {
    let url = &c.mysql.url;
    if url.starts_with("mysql://") || url.starts_with("mariadb://") {
        return Ok(());
    }
    Err(broken(
        "mysql.url",
        quoted(&super::redacted_url(url)),
        "expected mysql://user:password@host:port/database",
    ))
}

/// A zero timeout or lease would expire before any call or registration
/// could finish.
fn timeouts_are_positive(c: &LabConfig) -> Result<(), Broken> {
    all_positive(&[
        ("service_a.backend_timeout", c.service_a.backend_timeout),
        ("service_a.connect_timeout", c.service_a.connect_timeout),
        (
            "service_a.header_read_timeout",
            c.service_a.header_read_timeout,
        ),
        (
            "service_a.registry_guard_window",
            c.service_a.registry_guard_window,
        ),
        (
            "service_a.registry_stale_grace",
            c.service_a.registry_stale_grace,
        ),
        ("mysql.acquire_timeout", c.mysql.acquire_timeout),
        ("mysql.query_timeout", c.mysql.query_timeout),
        ("etcd.lease_ttl", c.etcd.lease_ttl),
        ("partner.idle_timeout", c.partner.idle_timeout),
        ("partner.client_timeout", c.partner.client_timeout),
        (
            "partner.client_connect_timeout",
            c.partner.client_connect_timeout,
        ),
    ])
}

/// The guard compares a share of A's endpoints: 0 would trip on any
/// removal, above 1 never.
fn registry_guard_loss_is_a_share(c: &LabConfig) -> Result<(), Broken> {
    let loss = c.service_a.registry_guard_max_loss;
    if loss > 0.0 && loss <= 1.0 {
        return Ok(());
    }
    Err(broken(
        "service_a.registry_guard_max_loss",
        loss.to_string(),
        "expected a fraction above 0 and at most 1",
    ))
}

/// The operator token guards live switches and profiles: a short one is
/// guessed, and whitespace would not survive an `Authorization` header. The
/// message never quotes the value.
fn admin_token_is_strong(c: &LabConfig) -> Result<(), Broken> {
    let token = c.admin.token.expose();
    if token.is_empty() || (token.len() >= 16 && token.chars().all(|ch| ch.is_ascii_graphic())) {
        return Ok(());
    }
    Err(broken(
        "admin.token",
        "(not shown)".into(),
        "expected empty (operator endpoints off) or at least 16 visible ASCII characters without spaces",
    ))
}

/// Each B scales its connection age once by a random factor in 1 ± jitter:
/// past one half, a B could recycle connections almost as soon as they open.
fn recycle_jitter_is_at_most_half(c: &LabConfig) -> Result<(), Broken> {
    let jitter = c.service_b.max_connection_age_jitter;
    if (0.0..=0.5).contains(&jitter) {
        return Ok(());
    }
    Err(broken(
        "service_b.max_connection_age_jitter",
        jitter.to_string(),
        "expected a fraction between 0 and 0.5",
    ))
}

/// Zero of these would stop the worker, A, B or B's partner client outright.
fn counts_are_at_least_one(c: &LabConfig) -> Result<(), Broken> {
    all_at_least_one(&[
        ("worker.batch", c.worker.batch),
        ("worker.cap", c.worker.cap),
        ("worker.pool_size", c.worker.pool_size),
        ("worker.max_attempts", c.worker.max_attempts),
        (
            "service_a.max_concurrent_requests",
            c.service_a.max_concurrent_requests,
        ),
        (
            "service_b.max_concurrent_requests",
            c.service_b.max_concurrent_requests,
        ),
        (
            "partner.client_max_connections",
            c.partner.client_max_connections,
        ),
    ])
}

/// A zero tick spins; zero claim and job timeouts reclaim or abandon every
/// job at once.
fn worker_intervals_are_positive(c: &LabConfig) -> Result<(), Broken> {
    all_positive(&[
        ("worker.tick", c.worker.tick),
        ("worker.visibility_timeout", c.worker.visibility_timeout),
        ("worker.job_timeout", c.worker.job_timeout),
    ])
}

/// A claim that expires while its job may still run hands the job to a
/// second B.
fn claims_outlive_jobs(c: &LabConfig) -> Result<(), Broken> {
    if c.worker.visibility_timeout > c.worker.job_timeout {
        return Ok(());
    }
    Err(broken(
        "worker.visibility_timeout",
        duration_text(c.worker.visibility_timeout),
        "must be longer than worker.job_timeout, or running jobs get reclaimed and run twice",
    ))
}

/// Caught here, a bad filter is a config error instead of silently
/// falling back to `info` at start.
fn log_filter_parses(c: &LabConfig) -> Result<(), Broken> {
    let filter = &c.telemetry.log_filter;
    match tracing_subscriber::EnvFilter::try_new(filter) {
        Ok(_) => Ok(()),
        Err(e) => Err(broken(
            "telemetry.log_filter",
            quoted(filter),
            &format!("not a tracing filter: {e}"),
        )),
    }
}

/// An empty pool or a zero payload limit would refuse every request.
fn pool_and_payload_are_at_least_one(c: &LabConfig) -> Result<(), Broken> {
    all_at_least_one(&[("mysql.pool_max", c.mysql.pool_max)])?;
    all_at_least_one(&[("service_b.max_payload_bytes", c.service_b.max_payload_bytes)])
}

/// The partner speaks TLS only; a plain http:// URL would fail every call.
fn partner_url_is_https(c: &LabConfig) -> Result<(), Broken> {
    if c.partner.url.starts_with("https://") {
        return Ok(());
    }
    Err(broken(
        "partner.url",
        quoted(&c.partner.url),
        "expected an https:// URL (the partner speaks TLS only)",
    ))
}

/// The OTLP exporter speaks HTTP/protobuf; anything else would fail every
/// export in the background, where nobody looks.
fn otlp_endpoint_is_http(c: &LabConfig) -> Result<(), Broken> {
    let endpoint = &c.telemetry.otlp_endpoint;
    if endpoint.is_empty() || endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        return Ok(());
    }
    Err(broken(
        "telemetry.otlp_endpoint",
        quoted(endpoint),
        "expected empty (no export) or an http:// or https:// base URL of an OTLP/HTTP collector",
    ))
}

/// The largest `service_b.item_cache_capacity`: a thousand times the
/// catalogue the lab seeds by default (10 000 items), about 1.5 GiB of B's
/// memory at the seeded items' size.
const ITEM_CACHE_CAPACITY_MAX: u64 = 10_000_000;

/// A cache as large as the host's memory is not bounded in practice: a
/// typo (a few zeros too many) fails at start, not when B runs out of memory.
fn item_cache_is_bounded(c: &LabConfig) -> Result<(), Broken> {
    let capacity = c.service_b.item_cache_capacity;
    if capacity <= ITEM_CACHE_CAPACITY_MAX {
        return Ok(());
    }
    Err(broken(
        "service_b.item_cache_capacity",
        capacity.to_string(),
        &format!("expected 0 (off) up to {ITEM_CACHE_CAPACITY_MAX} items"),
    ))
}

/// A zero body limit would refuse every partner answer.
fn partner_answers_may_have_a_body(c: &LabConfig) -> Result<(), Broken> {
    all_at_least_one(&[(
        "partner.client_max_body_bytes",
        c.partner.client_max_body_bytes,
    )])
}

/// etcd grants leases in whole seconds; less would round down to nothing.
fn lease_ttl_is_whole_seconds(c: &LabConfig) -> Result<(), Broken> {
    if c.etcd.lease_ttl >= Duration::from_secs(1) {
        return Ok(());
    }
    Err(broken(
        "etcd.lease_ttl",
        duration_text(c.etcd.lease_ttl),
        "etcd leases are granted in whole seconds: use at least 1s",
    ))
}

/// grpc-go dials `etcd:///lab/services/backend` and etcd's resolver watches
/// `lab/services/backend`: grpc-go drops the slash after `etcd:///`, so keys
/// under a prefix that starts with one are never found. The trailing slash
/// keeps `…/backend/` from also matching `…/backend-old/…`, and A reads the
/// instance id as what follows the prefix.
fn registry_prefix_is_a_go_target(c: &LabConfig) -> Result<(), Broken> {
    let prefix = &c.etcd.prefix;
    let reason = if prefix.starts_with('/') {
        "must not start with '/': grpc-go's etcd resolver looks up the prefix of \
         etcd:///PREFIX without its leading slash; e.g. \"lab/services/backend/\""
    } else if !prefix.ends_with('/') {
        "must be a path ending in '/', e.g. \"lab/services/backend/\""
    } else {
        return Ok(());
    };
    Err(broken("etcd.prefix", quoted(prefix), reason))
}

fn all_positive(durations: &[(&'static str, Duration)]) -> Result<(), Broken> {
    match durations.iter().find(|(_, value)| value.is_zero()) {
        Some((key, value)) => Err(broken(
            key,
            duration_text(*value),
            "must be greater than zero",
        )),
        None => Ok(()),
    }
}

fn all_at_least_one<N: Copy + Default + PartialEq + ToString>(
    counts: &[(&'static str, N)],
) -> Result<(), Broken> {
    match counts.iter().find(|(_, value)| *value == N::default()) {
        Some((key, value)) => Err(broken(key, value.to_string(), "must be at least 1")),
        None => Ok(()),
    }
}

fn broken(key: &'static str, value: String, reason: &str) -> Broken {
    Broken {
        key,
        value,
        reason: reason.to_string(),
    }
}

/// A string value as the messages quote it.
fn quoted(value: &str) -> String {
    format!("{value:?}")
}

/// A duration as the messages quote it, e.g. `"500ms"`.
fn duration_text(value: Duration) -> String {
    quoted(&humantime::format_duration(value).to_string())
}
