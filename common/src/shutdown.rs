//! Signal-driven shutdown: SIGTERM (what `labctl down`, Docker and Kubernetes
//! send) and SIGINT (Ctrl-C) both cancel one token that every task watches.

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Returns a token cancelled on the first SIGTERM or SIGINT.
pub fn on_signal() -> std::io::Result<CancellationToken> {
    let token = CancellationToken::new();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let cancel = token.clone();
    crate::tasks::spawn("shutdown.signal", async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(signal = name, "shutdown requested");
        cancel.cancel();
    });
    Ok(token)
}

/// The tail of every service's `main`: logging, signal handling, running the
/// service until a signal, and the exit code (0 after a clean shutdown).
pub async fn run_service<F, Fut>(
    service: &'static str,
    config: crate::config::LabConfig,
    run: F,
) -> std::process::ExitCode
where
    F: FnOnce(crate::config::LabConfig, CancellationToken) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    let telemetry = crate::telemetry::init(service, &config.telemetry);
    raise_open_file_limit();
    if let Err(reason) = crate::heap::set_active(config.admin.heap_profiling).await {
        tracing::warn!(%reason, "heap profiling unavailable");
    }
    let shutdown = match on_signal() {
        Ok(token) => token,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            telemetry.shutdown().await;
            return std::process::ExitCode::FAILURE;
        }
    };
    let code = match run(config, shutdown).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{service} failed");
            std::process::ExitCode::FAILURE
        }
    };
    telemetry.shutdown().await;
    code
}

/// Raises the soft limit on open files to the hard limit, as Go's runtime
/// does at start (since Go 1.19): a leak of sockets then meets the same
/// ceiling the incident's Go service had, not a distro's 1 024 default.
fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-file limit"),
            Err(e) => tracing::warn!(error = %e, soft, "could not raise the open-file limit"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "could not read the open-file limit"),
    }
}
