//! `labctl status`: what the state dir says is running, checked against
//! `/proc` (works for a detached stack and from any shell), with the fault
//! switches each process has *now* (asked over its admin listener: a
//! `labctl faults set` or `PUT /faults` since start-up shows here).

use anyhow::Context;
use labctl::{faults, state::LabState};

use super::json_str;
use crate::cli::StatusArgs;

pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
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
    // In a drill every /faults answers 403 to the trainee's token.
    let live = if state.drill {
        Default::default()
    } else {
        faults::live_by_process(&state).await
    };
    if args.json {
        // The state as recorded (its `faults` are the start values), plus
        // `live_faults`: each process's switches in force now.
        let mut json = serde_json::to_value(&state)?;
        if let Some(object) = json.as_object_mut() {
            let live: serde_json::Map<String, serde_json::Value> = live
                .iter()
                .filter(|(_, p)| p.error.is_none())
                .map(|(name, p)| (name.clone(), serde_json::Value::Object(p.faults.clone())))
                .collect();
            object.insert("live_faults".into(), live.into());
        }
        println!("{}", serde_json::to_string_pretty(&json)?);
        return Ok(());
    }
    match (&state.mode, &state.faults) {
        (Some(mode), Some(faults)) => println!(
            "mode {}; switches at start {}",
            json_str(mode),
            serde_json::to_string(faults)?
        ),
        _ => println!("a drill is running: the switches are hidden"),
    }
    println!(
        "{:<14} {:>7}  {:<8} {:<24} SWITCHES (live)",
        "NAME", "PID", "STATE", "ADDRESS"
    );
    for s in &state.services {
        let address = s
            .url
            .as_deref()
            .map(lab_common::config::redacted_url)
            .or_else(|| s.grpc_addr.clone())
            .unwrap_or_default();
        let switches = match live.get(&s.name) {
            Some(p) if p.error.is_none() && !p.faults.is_empty() => {
                faults::render_switches(&p.faults)
            }
            Some(p) => p
                .error
                .as_ref()
                .filter(|_| s.running == Some(true))
                .map(|e| format!("? ({e})"))
                .unwrap_or_default(),
            None => String::new(),
        };
        println!(
            "{:<14} {:>7}  {:<8} {:<24} {switches}",
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
