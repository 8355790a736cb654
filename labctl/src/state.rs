//! `state.json`: what `labctl up` started, read by `status`, `down`, `kill`
//! and the tests. Its shape is what `labctl status --json` prints.

use std::path::{Path, PathBuf};

use lab_common::config::{Faults, Mode};
use serde::{Deserialize, Serialize};

/// Why `state.json` could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("reading {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("reading {}", path.display())]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("encoding {}", path.display())]
    Encode {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("writing {}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// One started process.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ServiceRecord {
    /// `mysql`, `etcd`, `partner-api`, `service-b-1`, …, `slb`, `service-a`.
    pub name: String,
    pub pid: u32,
    /// Kernel start time of `pid`, so a reused pid is never signalled.
    pub start_time: u64,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub instance_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub grpc_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub admin_url: Option<String>,
    /// Extra addresses (HAProxy's frontends).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub l4_addr: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub l7_addr: Option<String>,
    pub log: PathBuf,
    /// Filled in by `status`: whether the process is alive right now.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub running: Option<bool>,
}

impl ServiceRecord {
    pub fn new(name: impl Into<String>, pid: u32, start_time: u64, log: PathBuf) -> Self {
        Self {
            name: name.into(),
            pid,
            start_time,
            instance_id: None,
            url: None,
            grpc_addr: None,
            admin_url: None,
            l4_addr: None,
            l7_addr: None,
            log,
            running: None,
        }
    }

    pub fn is_alive(&self) -> bool {
        crate::procs::is_alive(self.pid, self.start_time)
    }
}

/// The running stack.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabState {
    /// The preset and the switches at start; absent in a drill, where they
    /// are the answer (`drill` is then true).
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub mode: Option<Mode>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub faults: Option<Faults>,
    /// Started by `labctl drill start`: the switches are hidden.
    #[serde(default)]
    pub drill: bool,
    pub state_dir: PathBuf,
    /// The config file every service was started with.
    pub config_file: PathBuf,
    /// Started with `--ports auto` (new Bs then get free ports too).
    #[serde(default)]
    pub auto_ports: bool,
    /// In start order; `down` stops them in reverse.
    pub services: Vec<ServiceRecord>,
}

impl LabState {
    pub fn path(state_dir: &Path) -> PathBuf {
        state_dir.join("state.json")
    }

    /// The recorded stack, or `None` when nothing was started from `state_dir`.
    pub fn load(state_dir: &Path) -> Result<Option<LabState>, StateError> {
        let path = Self::path(state_dir);
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Read { path, source }),
        };
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|source| StateError::Parse { path, source })
    }

    /// Written atomically (temp file + rename) so readers never see half a file.
    pub fn save(&self) -> Result<(), StateError> {
        let path = Self::path(&self.state_dir);
        let tmp = path.with_extension("json.tmp");
        let json = serde_json::to_vec_pretty(self).map_err(|source| StateError::Encode {
            path: path.clone(),
            source,
        })?;
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| StateError::Write { path, source })
    }

    pub fn remove(state_dir: &Path) -> Result<(), StateError> {
        let path = Self::path(state_dir);
        match std::fs::remove_file(&path) {
            Err(source) if source.kind() != std::io::ErrorKind::NotFound => {
                Err(StateError::Write { path, source })
            }
            _ => Ok(()),
        }
    }

    pub fn service(&self, name: &str) -> Option<&ServiceRecord> {
        self.services.iter().find(|s| s.name == name)
    }

    /// The B instances, in order.
    pub fn backends(&self) -> impl Iterator<Item = &ServiceRecord> {
        self.services
            .iter()
            .filter(|s| s.name.starts_with("service-b-"))
    }

    pub fn any_alive(&self) -> bool {
        self.services.iter().any(ServiceRecord::is_alive)
    }
}
