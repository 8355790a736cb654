//! labctl as a library: the launcher that runs the native stack (used by the
//! `labctl` binary and the end-to-end tests alike), the load generator, and
//! their helpers.

pub mod bench;
pub mod drill;
pub mod faults;
pub mod jobs;
pub mod launcher;
pub mod load;
pub mod ports;
pub mod probe;
pub mod procs;
pub mod scenario;
pub mod state;
pub mod token;
