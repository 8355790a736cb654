//! `labctl faults` and `labctl faults set KEY=VALUE...`: the live switches
//! of every process of the running stack (the work is in
//! `labctl::faults`; this prints it).

use anyhow::{Context, bail};
use labctl::{
    faults::{self, render_switches},
    state::LabState,
    token,
};

use crate::cli::{FaultsSetArgs, StateDir};

fn load(dir: &StateDir) -> anyhow::Result<LabState> {
    LabState::load(&dir.state_dir)?.with_context(|| {
        format!(
            "no lab state in {} (start one with `labctl up`)",
            dir.state_dir.display()
        )
    })
}

/// One line per process: its switches as in force now.
pub async fn show(dir: StateDir, json: bool) -> anyhow::Result<()> {
    let state = load(&dir)?;
    let processes = faults::show(&state).await;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "processes": processes }))?
        );
        return Ok(());
    }
    println!("{:<14} {:<24} SWITCHES (live)", "PROCESS", "ADMIN");
    for p in &processes {
        let switches = match &p.error {
            Some(error) => format!("? ({error})"),
            None => render_switches(&p.faults),
        };
        println!("{:<14} {:<24} {switches}", p.name, p.admin_url);
    }
    println!(
        "lb is service-a's; deadline belongs to service-a and every B (A sheds, B stops \
         late work); worker, http_client and rows to every B. \
         Flip them with `labctl faults set KEY=VALUE...`."
    );
    Ok(())
}

/// Sends each process its patch and prints what changed where.
pub async fn set(args: FaultsSetArgs) -> anyhow::Result<()> {
    let state = load(&args.dir)?;
    let token = token::read(&args.dir.state_dir).with_context(|| {
        format!(
            "reading the operator token {}",
            token::path(&args.dir.state_dir).display()
        )
    })?;
    let results = faults::set(&state, &token, &args.assignments).await?;
    let mut failed = 0;
    for r in &results {
        if let Some(error) = &r.error {
            failed += 1;
            println!("{:<14} NOT changed: {error}", r.name);
        } else if r.changed.is_empty() {
            println!(
                "{:<14} unchanged, already {}",
                r.name,
                render_switches(&r.patch)
            );
        } else {
            let changes: Vec<String> = r
                .changed
                .iter()
                .map(|c| format!("{} {} → {}", c.switch, c.from, c.to))
                .collect();
            println!("{:<14} {}", r.name, changes.join(", "));
        }
    }
    if failed > 0 {
        bail!(
            "{failed} of {} processes did not take the change",
            results.len()
        );
    }
    Ok(())
}
