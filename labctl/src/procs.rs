//! Child processes: finding binaries, spawning with logs, signalling, and
//! telling whether a recorded pid is still the process we started.

use std::{
    fs::{File, OpenOptions},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};
use nix::{
    sys::signal::{Signal, kill},
    unistd::Pid,
};

/// Where binaries are searched besides `PATH`: Debian installs the servers
/// under sbin, which a non-root `PATH` often lacks.
const EXTRA_DIRS: [&str; 4] = [
    "/usr/sbin",
    "/usr/local/sbin",
    "/sbin",
    "/usr/local/mysql/bin",
];

/// Finds the first of `names` on `PATH` or in the sbin directories.
pub fn find_binary(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain(EXTRA_DIRS.iter().map(PathBuf::from));
    let dirs: Vec<PathBuf> = dirs.collect();
    names.iter().find_map(|name| {
        dirs.iter()
            .map(|d| d.join(name))
            .find(|candidate| is_executable(candidate))
    })
}

/// Finds one of the lab's own binaries: next to the running executable first
/// (cargo puts them all in `target/<profile>/`), then on `PATH`.
pub fn find_lab_binary(name: &str, bin_dir: Option<&Path>) -> anyhow::Result<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = bin_dir {
        dirs.push(dir.to_path_buf());
    }
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        dirs.push(dir.to_path_buf());
        // Test executables live one level down, in target/<profile>/deps.
        if let Some(parent) = dir.parent() {
            dirs.push(parent.to_path_buf());
        }
    }
    if let Some(found) = dirs.iter().map(|d| d.join(name)).find(|p| is_executable(p)) {
        return Ok(found);
    }
    find_binary(&[name]).with_context(|| {
        format!(
            "{name} not found next to labctl or on PATH; build it with `cargo build --workspace`"
        )
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The error for a missing server binary: one line naming it and the fix.
pub fn missing(what: &str, names: &[&str]) -> anyhow::Error {
    anyhow::anyhow!(
        "{what} not found: none of {} is on PATH or in /usr/sbin; run scripts/install-deps.sh",
        names.join(", ")
    )
}

/// How a child is tied to labctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Dies (SIGTERM) if labctl dies: foreground `up` and tests.
    TiedToLabctl,
    /// Survives labctl: `up --detach`.
    Detached,
}

/// Spawns `cmd` with stdout and stderr appended to `log`, in its own process
/// group (so a terminal's Ctrl-C reaches labctl, which stops children in
/// order), without the lab's `LAB_*` variables (children get their config
/// from the file labctl writes).
pub fn spawn(mut cmd: Command, log: &Path, lifetime: Lifetime) -> anyhow::Result<Child> {
    let out = open_log(log)?;
    let err = out.try_clone()?;
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("LAB_") {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .process_group(0);
    if lifetime == Lifetime::TiedToLabctl {
        // SAFETY: the closure runs between fork and exec and only makes one
        // async-signal-safe system call (prctl).
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.spawn()
        .with_context(|| format!("starting {program} (log: {})", log.display()))
}

fn open_log(path: &Path) -> anyhow::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening log {}", path.display()))
}

/// The kernel's start time of `pid` (clock ticks since boot), which together
/// with the pid identifies one process even after pids are reused.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; starttime is field 22.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    if fields.first() == Some(&"Z") {
        return None; // a zombie is dead for our purposes
    }
    fields.get(19)?.parse().ok()
}

/// True while `pid` is alive and is the process that was started at `started`.
pub fn is_alive(pid: u32, started: u64) -> bool {
    start_time(pid) == Some(started)
}

/// Sends `signal` to `pid` if it is still the recorded process.
pub fn signal(pid: u32, started: u64, signal: Signal) -> anyhow::Result<()> {
    if !is_alive(pid, started) {
        bail!("process {pid} is not running");
    }
    let pid = Pid::from_raw(i32::try_from(pid).context("pid out of range")?);
    kill(pid, signal).with_context(|| format!("sending {signal} to {pid}"))
}

/// SIGTERM, wait up to `grace`, then SIGKILL. Returns true if SIGKILL was needed.
pub async fn terminate(pid: u32, started: u64, grace: Duration) -> bool {
    if signal(pid, started, Signal::SIGTERM).is_err() {
        return false;
    }
    if wait_exit(pid, started, grace).await {
        return false;
    }
    let _ = signal(pid, started, Signal::SIGKILL);
    wait_exit(pid, started, Duration::from_secs(5)).await;
    true
}

/// Polls until the process is gone, for at most `timeout`.
pub async fn wait_exit(pid: u32, started: u64, timeout: Duration) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if !is_alive(pid, started) {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The last `lines` lines of a log, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
