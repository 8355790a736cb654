//! `labctl config check`: validate a file the way every service does.

use std::path::Path;

use lab_common::config;

use super::json_str;

/// Prints a one-line summary when `file` is valid; otherwise prints the
/// loader's message and exits 2, like a service given that file would.
pub fn check(file: &Path) -> anyhow::Result<()> {
    match config::check_file(file) {
        Ok(c) => {
            println!(
                "{}: ok (mode {}, faults {})",
                file.display(),
                json_str(&c.mode),
                serde_json::to_string(&c.faults).unwrap_or_default()
            );
            Ok(())
        }
        Err(e) => e.exit(),
    }
}
