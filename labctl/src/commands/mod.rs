//! One module per `labctl` subcommand: each takes its parsed arguments
//! (from `cli`) and does the work, printing what the user sees.

pub mod bench;
pub mod config;
pub mod down;
pub mod drill;
pub mod faults;
pub mod jobs;
pub mod kill;
pub mod load;
pub mod scale;
pub mod scenario;
pub mod status;
pub mod up;

/// A config enum as the word it has in config files (`"l4"`, `"buggy"`, …).
fn json_str<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_value(v)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Raises the soft limit on open files to the hard one, for every command:
/// an open-loop load (`load`, `bench`, `scenario`) holds a connection per
/// HTTP request in flight (up to its max-in-flight), past a distro's 1 024
/// default, and running out would show as `connect` errors blamed on the lab.
pub fn raise_open_file_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
    {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
}
