//! `labctl up`: start the stack, print where everything is, then either
//! return (`--detach`) or supervise it until Ctrl-C / SIGTERM.

use std::collections::BTreeSet;

use lab_common::config::{self, LabConfig};
use labctl::{
    launcher::{Stack, UpOptions},
    procs::Lifetime,
};

use super::json_str;
use crate::cli::UpArgs;

pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    let config: LabConfig = config::load_or_exit(&args.config);
    let mut options = UpOptions::new(config, &args.dir.state_dir);
    options.backends = args.backends;
    options.ports = args.ports;
    // A detached stack has no supervisor: its processes are reparented when
    // labctl exits, `status` reads their liveness from /proc and `down`
    // stops them by pid.
    options.lifetime = if args.detach {
        Lifetime::Detached
    } else {
        Lifetime::TiedToLabctl
    };
    eprintln!("starting the lab in {} …", args.dir.state_dir.display());
    let mut stack = Stack::up(options).await?;
    print_table(&stack);
    if args.detach {
        println!(
            "\nrunning in the background; stop it with: labctl down --state-dir {}",
            args.dir.state_dir.display()
        );
        stack.detach();
        return Ok(());
    }
    println!("\nCtrl-C stops everything.");
    wait_for_stop(&mut stack).await?;
    eprintln!("stopping …");
    stack.down().await?;
    eprintln!("stopped.");
    Ok(())
}

/// Waits for Ctrl-C or SIGTERM, reporting any child that dies meanwhile
/// (as it exits: the wait is on the children themselves).
async fn wait_for_stop(stack: &mut Stack) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut reported = BTreeSet::new();
    loop {
        tokio::select! {
            _ = term.recv() => return Ok(()),
            _ = int.recv() => return Ok(()),
            (name, status) = stack.next_exit(&reported) => {
                let how = status.map_or_else(|e| e.to_string(), |s| s.to_string());
                match stack.service(&name) {
                    Ok(s) => eprintln!("warning: {name} (pid {}) exited ({how}); see {}", s.pid, s.log.display()),
                    Err(_) => eprintln!("warning: {name} exited ({how})"),
                }
                reported.insert(name);
            }
        }
    }
}

fn print_table(stack: &Stack) {
    match (&stack.state.mode, &stack.state.faults) {
        (Some(mode), Some(f)) => println!(
            "lab is up in {:.1} s — mode {}; lb={} worker={} deadline={} http_client={} rows={}",
            stack.startup.as_secs_f64(),
            json_str(mode),
            json_str(&f.lb),
            json_str(&f.worker),
            json_str(&f.deadline),
            json_str(&f.http_client),
            json_str(&f.rows),
        ),
        _ => println!(
            "lab is up in {:.1} s — a drill: the switches are hidden",
            stack.startup.as_secs_f64()
        ),
    }
    println!();
    println!(
        "{:<14} {:>7}  {:<38} {:<24} LOG",
        "NAME", "PID", "ADDRESS", "ADMIN"
    );
    for s in &stack.state.services {
        let address = s
            .url
            .as_deref()
            .map(lab_common::config::redacted_url)
            .or_else(|| s.grpc_addr.clone().map(|a| format!("grpc://{a}")))
            .unwrap_or_default();
        let address = match (&s.l4_addr, &s.l7_addr) {
            (Some(l4), Some(l7)) => format!("l4 {l4}  l7 {l7}"),
            _ => address,
        };
        println!(
            "{:<14} {:>7}  {:<38} {:<24} {}",
            s.name,
            s.pid,
            address,
            s.admin_url.clone().unwrap_or_else(|| "-".into()),
            s.log.display()
        );
    }
    println!(
        "\ntry: labctl load --url {} --path '/api/items/{{rand}}' --requests 1000 --concurrency 16",
        stack.a_url()
    );
}
