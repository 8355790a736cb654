//! `labctl status`: what the state dir says is running, checked against
//! `/proc` (works for a detached stack and from any shell).

use anyhow::Context;
use labctl::state::LabState;

use super::json_str;
use crate::cli::StatusArgs;

pub fn run(args: StatusArgs) -> anyhow::Result<()> {
    let state_dir = &args.dir.state_dir;
    let mut state = LabState::load(state_dir)?.with_context(|| {
        format!(
            "no lab state in {} (start one with `labctl up`)",
            state_dir.display()
        )
    })?;
    for s in &mut state.services {
        s.running = Some(s.is_alive());
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&state)?);
        return Ok(());
    }
    println!(
        "mode {}; faults {}",
        json_str(&state.mode),
        serde_json::to_string(&state.faults)?
    );
    println!("{:<14} {:>7}  {:<8} ADDRESS", "NAME", "PID", "STATE");
    for s in &state.services {
        let address = s
            .url
            .clone()
            .or_else(|| s.grpc_addr.clone())
            .unwrap_or_default();
        println!(
            "{:<14} {:>7}  {:<8} {}",
            s.name,
            s.pid,
            if s.running == Some(true) {
                "running"
            } else {
                "dead"
            },
            address
        );
    }
    Ok(())
}
