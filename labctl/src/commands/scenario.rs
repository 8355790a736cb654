//! `labctl scenario list` and `labctl scenario run NAME`: play a story on
//! the lab and write its report (see `labctl::scenario`).

use std::{path::PathBuf, process::ExitCode};

use lab_common::config::{self, Sources};
use labctl::scenario::{
    runner::{self, RunOptions, StackChoice, StopSignal},
    spec::{self, SpecError},
};

use crate::cli::ScenarioRunArgs;

/// Exit status for a scenario file or name that cannot be played, like a
/// usage error.
const BAD_INPUT: u8 = 2;
/// Exit status when the run finished but a verdict did not hold or the run
/// was cut short.
const VERDICT_FAILED: u8 = 1;
/// `--speed` bounds: beyond 100× a phase lasts less than a sample.
const MIN_SPEED: f64 = 0.01;
const MAX_SPEED: f64 = 100.0;

pub fn list() -> anyhow::Result<()> {
    println!("{:<10} {:>7}  DESCRIPTION", "NAME", "LENGTH");
    for scenario in spec::built_ins() {
        match scenario {
            Ok(s) => println!(
                "{:<10} {:>7}  {}",
                s.name,
                humantime::format_duration(s.duration()).to_string(),
                s.description
            ),
            Err(e) => println!("(invalid) {e}"),
        }
    }
    println!(
        "\nrun one: labctl scenario run NAME [--speed F] [--out DIR]; \
         or give the path of your own file (see deploy/scenarios/README.md)"
    );
    Ok(())
}

pub async fn run(args: ScenarioRunArgs) -> ExitCode {
    let scenario = match spec::find(&args.name) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            if let SpecError::Invalid { .. } = e {
                eprintln!("(every field is described in deploy/scenarios/README.md)");
            }
            return ExitCode::from(BAD_INPUT);
        }
    };
    if !(MIN_SPEED..=MAX_SPEED).contains(&args.speed) {
        eprintln!(
            "error: --speed must be between {MIN_SPEED} and {MAX_SPEED}, got {}",
            args.speed
        );
        return ExitCode::from(BAD_INPUT);
    }
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace([':', '-'], "");
    let out_dir = args.out.clone().unwrap_or_else(|| {
        args.dir
            .state_dir
            .join("scenarios")
            .join(format!("{}-{stamp}", scenario.name))
    });
    // Every config the scenario would give a process, checked before
    // anything starts: its own `set`, the command line's, and each
    // `restart-backends`.
    let mut overrides = scenario.set.clone();
    overrides.extend(args.set.iter().cloned());
    let config = match config::load(&sources(overrides.clone())) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: in the `set` of {} or a --set: {e}", scenario.file);
            return ExitCode::from(BAD_INPUT);
        }
    };
    for (phase, action) in scenario
        .phases
        .iter()
        .flat_map(|p| p.actions.iter().map(move |a| (p, a)))
    {
        let mut with_action = overrides.clone();
        with_action.extend(action.set.iter().cloned());
        if let Err(e) = config::load(&sources(with_action)) {
            eprintln!(
                "error: in {}, phase {:?}, the `set` of an action: {e}",
                scenario.file, phase.name
            );
            return ExitCode::from(BAD_INPUT);
        }
    }
    let stack = if args.attach {
        if !args.set.is_empty() {
            eprintln!(
                "error: --set cannot change an attached stack's config; leave out --attach or --set"
            );
            return ExitCode::from(BAD_INPUT);
        }
        if !scenario.set.is_empty() {
            eprintln!(
                "warning: attached: the running stack keeps its own config and number of Bs; \
                 the scenario's ({}; backends = {}) are not applied, so its symptoms may differ",
                scenario.set.join(" "),
                scenario.backends
            );
        }
        StackChoice::Attach {
            state_dir: args.dir.state_dir.clone(),
        }
    } else {
        StackChoice::Start {
            config: Box::new(config),
            state_dir: out_dir.join("stack"),
        }
    };
    let options = RunOptions {
        scenario: scenario.compressed(args.speed),
        speed: args.speed,
        out_dir: out_dir.clone(),
        stack,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    };
    eprintln!(
        "scenario {} ({}; {}): {}",
        scenario.name,
        scenario.file,
        humantime::format_duration(options.scenario.duration()),
        scenario.description
    );
    let outcome = match runner::run(options, stop_signal()).await {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    print_summary(&outcome, &out_dir);
    if outcome.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(VERDICT_FAILED)
    }
}

/// The scenario's settings, then the command line's (later wins), over
/// the defaults and the environment, as `labctl up` reads them.
fn sources(overrides: Vec<String>) -> Sources {
    Sources {
        file: None,
        env: std::env::vars().collect(),
        overrides,
        stdin: None,
    }
}

/// Ctrl-C or SIGTERM. The handlers are installed now, before the stack
/// starts, so a Ctrl-C at any moment reaches the runner (which stops the
/// stack and writes the report) instead of killing labctl outright.
fn stop_signal() -> StopSignal {
    use tokio::signal::unix::{SignalKind, signal};
    let int = signal(SignalKind::interrupt());
    let term = signal(SignalKind::terminate());
    Box::pin(async move {
        match (int, term) {
            (Ok(mut int), Ok(mut term)) => {
                let reason = tokio::select! {
                    _ = int.recv() => "interrupted (Ctrl-C)".to_string(),
                    _ = term.recv() => "terminated (SIGTERM)".to_string(),
                };
                // Stopping takes a few seconds (each process gets SIGTERM
                // and time to drain); a second Ctrl-C does not wait. The
                // stack's processes die with labctl (PR_SET_PDEATHSIG).
                tokio::spawn(async move {
                    int.recv().await;
                    eprintln!("second Ctrl-C: exiting now, without the report");
                    std::process::exit(130);
                });
                reason
            }
            _ => std::future::pending().await,
        }
    })
}

fn print_summary(outcome: &runner::RunOutcome, out_dir: &std::path::Path) {
    let recording = &outcome.recording;
    println!();
    for verdict in &outcome.files.verdicts {
        println!(
            "{} {:<9} {}",
            if verdict.holds { "✓" } else { "✗" },
            verdict.cause,
            verdict.explanation
        );
    }
    let problems: Vec<_> = outcome.problems().collect();
    if !problems.is_empty() {
        println!(
            "\n{} problem(s) during the run, so it does not pass:",
            problems.len()
        );
        for problem in problems {
            println!("  t={:.1} s  {}", problem.t_s, problem.label);
        }
    }
    if recording.interrupted {
        println!(
            "the run was cut short ({}); phases that did not run cannot pass",
            recording.interruption.as_deref().unwrap_or("stopped")
        );
    }
    println!("\nreport: {}", outcome.files.html.display());
    println!("        {}", outcome.files.markdown.display());
    println!("        {}", outcome.files.samples.display());
    let logs: PathBuf = out_dir.join("logs");
    if logs.is_dir() {
        println!("logs:   {}", logs.display());
    }
}
