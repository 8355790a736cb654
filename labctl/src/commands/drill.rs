//! `labctl drill`: start a lab with hidden causes, score the trainee's
//! answers against the sealed key, reveal it, stop.
//!
//! What a drill keeps where, and who can read it:
//!
//! * the switches and the drill token reach A and the Bs on standard input
//!   only (see `launcher::DrillSecrets`): no file, argument or environment
//!   variable names them, and the services hide them from `/faults`,
//!   `/metrics` and their logs;
//! * `<state-dir>/drill/key.sealed` holds the causes, encrypted with the
//!   drill token, which is printed once to the facilitator (and written to
//!   `--token-file`, outside the state dir, if asked);
//! * `<state-dir>/drill/answers.jsonl` logs every answer with its time, and
//!   `brief.txt` is what the trainee is given.

use std::{
    io::{BufRead, Write},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use anyhow::Context;
use lab_common::{
    config::{self, AdminToken},
    faults::Switch,
};
use labctl::{
    drill::{self, AnswerRecord, BriefInputs, DrillKey},
    launcher::{self, DrillSecrets, Stack, UpOptions},
    procs::Lifetime,
    state::LabState,
    token,
};

use crate::cli::{DrillAnswerArgs, DrillStartArgs, DrillStopArgs, DrillToken, DrillTokenArgs};

/// The environment variable that may hold the drill token.
const TOKEN_VAR: &str = "LABCTL_DRILL_TOKEN";

/// How long the drill's load and job inflow run: longer than any drill,
/// stopped with the lab.
const TRAFFIC_FOR: &str = "24h";

/// A drill's job inflow carries 1 poison row in 500 (the default is 1 in
/// 1 000): at 12 jobs/s about one every 40 s. Under `rows = leak-on-error`
/// the first one pins B's pool within seconds (the unbounded loop meets it
/// again every tick), after which the worker's and the deadline's signals
/// stop moving; the other causes get that long to show first.
const POISON_RATIO: &str = "0.002";

fn drill_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("drill")
}

fn key_path(state_dir: &Path) -> PathBuf {
    drill_dir(state_dir).join("key.sealed")
}

fn answers_path(state_dir: &Path) -> PathBuf {
    drill_dir(state_dir).join("answers.jsonl")
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub async fn start(args: DrillStartArgs) -> anyhow::Result<()> {
    let config = config::load_or_exit(&args.config);
    if let Some(file) = &args.token_file {
        refuse_inside(file, &args.dir.state_dir)?;
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let faults = drill::draw(seed, args.causes);
    let token = drill::new_token();
    let mut options = UpOptions::new(config, &args.dir.state_dir);
    options.backends = args.backends;
    options.ports = args.ports;
    options.lifetime = Lifetime::Detached;
    options.drill = Some(DrillSecrets {
        token: AdminToken::new(token.clone()),
        faults,
    });
    eprintln!("starting a drill in {} …", args.dir.state_dir.display());
    let mut stack = Stack::up(options).await?;
    if !args.no_traffic {
        start_traffic(&mut stack, &args)?;
    }
    // The clock starts when the lab is up and loaded, not while it starts.
    let started_at_unix_ms = now_unix_ms();
    let state_dir = stack.state.state_dir.clone();
    let key = DrillKey {
        seed,
        causes: args.causes.to_string(),
        faults,
        started_at_unix_ms,
    };
    std::fs::create_dir_all(drill_dir(&state_dir))
        .with_context(|| format!("creating {}", drill_dir(&state_dir).display()))?;
    let sealed = drill::seal(&key, &token)?;
    token::write_private(&key_path(&state_dir), sealed.as_bytes())
        .with_context(|| format!("writing {}", key_path(&state_dir).display()))?;
    // A new drill starts a new answer log.
    match std::fs::remove_file(answers_path(&state_dir)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            return Err(e).context("removing the previous drill's answers");
        }
        _ => {}
    }
    if let Some(file) = &args.token_file {
        token::write_private(file, format!("{token}\n").as_bytes())
            .with_context(|| format!("writing {}", file.display()))?;
    }
    let brief = drill::brief(&brief_inputs(&stack, started_at_unix_ms));
    let brief_file = drill_dir(&state_dir).join("brief.txt");
    std::fs::write(&brief_file, &brief)
        .with_context(|| format!("writing {}", brief_file.display()))?;
    stack.detach();

    println!("Drill started (seed {seed}, causes {}).", args.causes);
    println!();
    println!("For the facilitator only — the drill token (it scores and reveals):");
    println!();
    println!("    {token}");
    println!();
    println!("    export {TOKEN_VAR}={token}");
    if let Some(file) = &args.token_file {
        println!("    (also in {})", file.display());
    }
    println!();
    println!("For the trainee — {}:", brief_file.display());
    println!();
    print!("{brief}");
    Ok(())
}

/// Steady load at A and job inflow into MySQL: `labctl load` and `labctl
/// jobs`, run as companions of the lab (stopped with it).
fn start_traffic(stack: &mut Stack, args: &DrillStartArgs) -> anyhow::Result<()> {
    let labctl = std::env::current_exe().context("finding the labctl executable")?;
    let state_dir = stack.state.state_dir.clone();
    let mut load = Command::new(&labctl);
    load.args(["load", "--url", &stack.a_url()])
        .args(["--rps", &args.rps.to_string()])
        .args(["--concurrency", "256", "--duration", TRAFFIC_FOR]);
    stack.start_companion("drill-load", load)?;
    let mut jobs = Command::new(&labctl);
    jobs.arg("jobs")
        .arg("--state-dir")
        .arg(&state_dir)
        .args(["--rate", &args.job_rate.to_string()])
        .args(["--duration", TRAFFIC_FOR, "--poison-ratio", POISON_RATIO]);
    stack.start_companion("drill-jobs", jobs)?;
    Ok(())
}

/// What the trainee's brief lists: A, every admin listener, HAProxy's stats.
fn brief_inputs(stack: &Stack, started_at_unix_ms: u64) -> BriefInputs {
    let services = &stack.state.services;
    BriefInputs {
        started_at_unix_ms,
        a_url: stack.a_url(),
        endpoints: services
            .iter()
            .filter(|s| s.name != "slb")
            .filter_map(|s| Some((s.name.clone(), s.admin_url.clone()?)))
            .collect(),
        slb_stats_url: stack
            .state
            .service("slb")
            .and_then(|s| s.admin_url.as_ref())
            .map(|u| format!("{}/stats", u.trim_end_matches('/'))),
        admin_token_path: token::path(&stack.state.state_dir).display().to_string(),
    }
}

/// The token file must not be where the trainee looks. Paths are compared
/// resolved (`..` and symlinks), so neither sneaks the file into the dir.
fn refuse_inside(file: &Path, state_dir: &Path) -> anyhow::Result<()> {
    let resolved = |p: &Path| {
        p.canonicalize()
            .or_else(|_| std::path::absolute(p))
            .unwrap_or_else(|_| p.to_path_buf())
    };
    let file_resolved = match (file.parent(), file.file_name()) {
        (Some(dir), Some(name)) if !dir.as_os_str().is_empty() => resolved(dir).join(name),
        _ => resolved(file),
    };
    anyhow::ensure!(
        !file_resolved.starts_with(resolved(state_dir)),
        "--token-file {} is inside the state dir {}, which the trainee may read; \
         put it elsewhere",
        file.display(),
        state_dir.display()
    );
    Ok(())
}

/// The drill token, from `--token-file` or `LABCTL_DRILL_TOKEN`.
fn read_token(args: &DrillToken) -> anyhow::Result<Option<String>> {
    if let Some(file) = &args.token_file {
        let text = std::fs::read_to_string(file)
            .with_context(|| format!("reading the drill token from {}", file.display()))?;
        return Ok(Some(text.trim().to_owned()));
    }
    Ok(std::env::var(TOKEN_VAR)
        .ok()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty()))
}

/// The drill's key, opened with the token.
fn open_key(token: &DrillToken, state_dir: &Path) -> anyhow::Result<(DrillKey, String)> {
    let token = read_token(token)?.ok_or_else(|| {
        anyhow::anyhow!(
            "this needs the drill token `labctl drill start` printed: set {TOKEN_VAR} or pass --token-file"
        )
    })?;
    let path = key_path(state_dir);
    let sealed = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading {} (was a drill started with --state-dir {}?)",
            path.display(),
            state_dir.display()
        )
    })?;
    let key = drill::open(&sealed, &token)?;
    Ok((key, token))
}

pub fn answer(args: DrillAnswerArgs) -> anyhow::Result<()> {
    let state_dir = &args.dir.state_dir;
    let (key, token) = open_key(&args.token, state_dir)?;
    let answers = if args.interactive {
        drill::parse_answers(&ask()?)?
    } else {
        drill::parse_answers(&args.answers)?
    };
    let record = AnswerRecord::new(now_unix_ms(), &answers);
    let log_path = answers_path(state_dir);
    drill::append_record(&log_path, &record, &token)?;
    let log = drill::read_records(&log_path, &token)?;
    let elapsed = Duration::from_millis(record.at_unix_ms.saturating_sub(key.started_at_unix_ms));
    println!(
        "answer recorded {} into the drill",
        humantime::format_duration(Duration::from_secs(elapsed.as_secs()))
    );
    print!("{}", drill::score(&key, &log));
    Ok(())
}

/// `--interactive`: one question per switch; an empty line skips it.
fn ask() -> anyhow::Result<Vec<String>> {
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    let mut answers = Vec::new();
    for switch in Switch::ALL {
        let [buggy, fixed] = drill::allowed_answers(switch);
        print!("{} ({buggy} | {fixed}, empty to skip)? ", switch.name());
        std::io::stdout().flush()?;
        let Some(line) = lines.next() else { break };
        let value = line?.trim().to_owned();
        if !value.is_empty() {
            answers.push(format!("{}={value}", switch.name()));
        }
    }
    Ok(answers)
}

pub fn reveal(args: DrillTokenArgs) -> anyhow::Result<()> {
    let (key, _) = open_key(&args.token, &args.dir.state_dir)?;
    print!("{}", drill::render_key(&key));
    Ok(())
}

pub async fn stop(args: DrillStopArgs) -> anyhow::Result<()> {
    let state_dir = &args.dir.state_dir;
    match LabState::load(state_dir)? {
        Some(state) if !state.drill => anyhow::bail!(
            "the lab in {} is not a drill; stop it with `labctl down`",
            state_dir.display()
        ),
        None => println!("no lab running in {}", state_dir.display()),
        Some(_) => {
            let stopped = launcher::down(state_dir).await?;
            println!("drill stopped ({} processes)", stopped.len());
        }
    }
    if read_token(&args.token)?.is_some() {
        let (key, token) = open_key(&args.token, state_dir)?;
        let log = drill::read_records(&answers_path(state_dir), &token)?;
        println!();
        print!("{}", drill::score(&key, &log));
        println!();
        print!("{}", drill::render_key(&key));
    } else {
        println!(
            "the score and the causes: `labctl drill reveal` and `answer` with the drill token"
        );
    }
    Ok(())
}
