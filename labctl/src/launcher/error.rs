//! The launcher's errors: one variant per way starting, changing or
//! stopping the stack fails, with the messages users and tests read.

use std::{path::PathBuf, time::Duration};

use lab_common::config::ConfigError;

use crate::{ports::PortsError, procs::ProcError, state::StateError};

/// Why the stack could not be started, changed or stopped. Start-up
/// failures carry the tail of the failing process's log.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    /// A file or process operation, described by what was being done.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Ports(#[from] PortsError),
    #[error("making TLS certificates in {}", dir.display())]
    Certs {
        dir: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error(transparent)]
    ConfigToml(#[from] toml::ser::Error),
    #[error("reading {}", path.display())]
    Config {
        path: PathBuf,
        #[source]
        source: Box<ConfigError>,
    },
    #[error("a lab is already running from {dir} — stop it with `labctl down --state-dir {dir}`")]
    AlreadyRunning { dir: String },
    #[error("--backends must be at least 1")]
    NoBackends,
    #[error("at least one backend must remain")]
    LastBackend,
    #[error(
        "a drill is running: its switches are hidden, so this labctl cannot start A or a B \
         (end the drill with `labctl drill stop`)"
    )]
    DrillHidden,
    #[error("no port for the new backend")]
    NoBackendPort,
    #[error("no lab running in {} (start one with `labctl up`)", dir.display())]
    NoLab { dir: PathBuf },
    #[error("no service named {name}")]
    NoService { name: String },
    #[error("{name} was not started")]
    NotStarted { name: String },
    #[error("{name} exited at once; see {}", log.display())]
    ExitedAtOnce { name: String, log: PathBuf },
    #[error("{name} exited during start-up; last lines of {}:\n{tail}", log.display())]
    ExitedDuringStartup {
        name: String,
        log: PathBuf,
        tail: String,
    },
    #[error("{name} not ready after {timeout:?}; last lines of {}:\n{tail}", log.display())]
    NotReady {
        name: String,
        timeout: Duration,
        log: PathBuf,
        tail: String,
    },
    #[error("{name} is not a child of this process")]
    NotAChild { name: String },
    #[error("{name} still running after {timeout:?}")]
    StillRunning { name: String, timeout: Duration },
    #[error("{0} is still running: stop it before starting it again")]
    ServiceStillRunning(&'static str),
    #[error(
        "initialising the MySQL data directory failed ({status}); last lines of {}:\n{tail}",
        log.display()
    )]
    MysqlInit {
        status: std::process::ExitStatus,
        log: PathBuf,
        tail: String,
    },
}

/// `with_context` for I/O results: names what was being done.
pub(super) trait Doing<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, LaunchError>;
}

impl<T> Doing<T> for std::io::Result<T> {
    fn doing(self, what: impl FnOnce() -> String) -> Result<T, LaunchError> {
        self.map_err(|source| LaunchError::Io {
            what: what(),
            source,
        })
    }
}
