//! One module per `labctl` subcommand: each takes its parsed arguments
//! (from `cli`) and does the work, printing what the user sees.

pub mod bench;
pub mod config;
pub mod down;
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
