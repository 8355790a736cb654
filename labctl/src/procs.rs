//! Child processes: finding binaries, spawning with logs, signalling, and
//! telling whether a recorded pid is still the process we started.
//!
//! Two kinds of process are stopped here. A child of this labctl is a
//! `tokio::process::Child`: it is waited on (woken by SIGCHLD, no polling)
//! and killed when its handle is dropped if it is tied to labctl. A process
//! another labctl started (`up --detach`, then `down`, `kill` or `scale`
//! from a new shell) is known only by the pid and start time in
//! `state.json`; it is signalled by pid and its exit is seen in `/proc`.

use std::{
    fs::{File, OpenOptions},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use tokio::process::Child;

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
pub fn find_lab_binary(name: &str, bin_dir: Option<&Path>) -> Result<PathBuf, ProcError> {
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
    find_binary(&[name]).ok_or_else(|| ProcError::LabBinaryMissing {
        name: name.to_string(),
    })
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The error for a missing server binary: one line naming it and the fix.
pub fn missing(what: &str, names: &[&str]) -> ProcError {
    ProcError::ServerMissing {
        what: what.to_string(),
        names: names.join(", "),
    }
}

/// How a child is tied to labctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Dies with labctl (SIGTERM from the kernel if labctl dies, SIGKILL
    /// when its handle is dropped): foreground `up` and tests.
    TiedToLabctl,
    /// Survives labctl: `up --detach`.
    Detached,
}

/// Why a process could not be started or signalled.
#[derive(Debug, thiserror::Error)]
pub enum ProcError {
    #[error(
        "{what} not found: none of {names} is on PATH or in /usr/sbin; run scripts/install-deps.sh"
    )]
    ServerMissing { what: String, names: String },
    #[error("{name} not found next to labctl or on PATH; build it with `cargo build --workspace`")]
    LabBinaryMissing { name: String },
    #[error("opening log {}", path.display())]
    OpenLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("starting {program} (log: {})", log.display())]
    Spawn {
        program: String,
        log: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("process {pid} is not running")]
    NotRunning { pid: u32 },
    #[error("pid {pid} is out of range")]
    PidOutOfRange { pid: u32 },
    #[error("sending {signal} to {pid}")]
    Signal {
        signal: Signal,
        pid: u32,
        #[source]
        source: nix::Error,
    },
}

/// Spawns `cmd` with stdout and stderr appended to `log`, in its own process
/// group (so a terminal's Ctrl-C reaches labctl, which stops children in
/// order), without the lab's `LAB_*` variables (children get their config
/// from the file labctl writes).
///
/// A [`Lifetime::TiedToLabctl`] child gets two guarantees: the kernel sends
/// it SIGTERM if labctl dies (`PR_SET_PDEATHSIG`, even on SIGKILL), and
/// tokio sends it SIGKILL when its [`Child`] handle is dropped
/// (`kill_on_drop`). The graceful path is [`terminate_child`].
pub fn spawn(cmd: Command, log: &Path, lifetime: Lifetime) -> Result<Child, ProcError> {
    spawn_with_input(cmd, log, lifetime, None)
}

/// [`spawn`], with `input` (if any) as the process's standard input: a pipe
/// that holds exactly those bytes and is closed, so the process reads them
/// and then end-of-file. (How a drill hands a service its hidden switches:
/// a pipe leaves nothing in a file, the arguments or the environment.)
pub fn spawn_with_input(
    mut cmd: Command,
    log: &Path,
    lifetime: Lifetime,
    input: Option<&[u8]>,
) -> Result<Child, ProcError> {
    let out = open_log(log)?;
    let err = out.try_clone().map_err(|source| ProcError::OpenLog {
        path: log.to_path_buf(),
        source,
    })?;
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("LAB_") {
            cmd.env_remove(key);
        }
    }
    match input {
        Some(bytes) => {
            let program = cmd.get_program().to_string_lossy().into_owned();
            let pipe = filled_pipe(bytes).map_err(|source| ProcError::Spawn {
                program,
                log: log.to_path_buf(),
                source,
            })?;
            cmd.stdin(pipe)
        }
        None => cmd.stdin(Stdio::null()),
    }
    .stdout(Stdio::from(out))
    .stderr(Stdio::from(err))
    .process_group(0);
    let tied = lifetime == Lifetime::TiedToLabctl;
    if tied {
        // SAFETY: the closure runs between fork and exec and only makes one
        // async-signal-safe system call (prctl). This is the module's only
        // unsafe code: the standard library and nix offer no safe way to set
        // a child's parent-death signal.
        #[allow(unsafe_code)]
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
            });
        }
    }
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(tied);
    cmd.spawn().map_err(|source| ProcError::Spawn {
        program,
        log: log.to_path_buf(),
        source,
    })
}

/// A pipe's read end, with `bytes` already written and the write end
/// closed. The bytes must fit the pipe's buffer (64 KiB on Linux; a drill's
/// input is a few hundred bytes), or writing them would block.
fn filled_pipe(bytes: &[u8]) -> std::io::Result<std::io::PipeReader> {
    use std::io::Write;
    const PIPE_BUFFER: usize = 64 * 1024;
    if bytes.len() > PIPE_BUFFER {
        return Err(std::io::Error::other(
            "standard input larger than a pipe buffer",
        ));
    }
    let (reader, mut writer) = std::io::pipe()?;
    writer.write_all(bytes)?;
    Ok(reader)
}

fn open_log(path: &Path) -> Result<File, ProcError> {
    let open = || {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        OpenOptions::new().create(true).append(true).open(path)
    };
    open().map_err(|source| ProcError::OpenLog {
        path: path.to_path_buf(),
        source,
    })
}

/// The kernel's start time of `pid` (clock ticks since boot), which together
/// with the pid identifies one process even after pids are reused.
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the parenthesised command name; starttime is field 22.
    let rest = stat.get(stat.rfind(')')? + 2..)?;
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
pub fn signal(pid: u32, started: u64, signal: Signal) -> Result<(), ProcError> {
    if !is_alive(pid, started) {
        return Err(ProcError::NotRunning { pid });
    }
    let raw = i32::try_from(pid).map_err(|_| ProcError::PidOutOfRange { pid })?;
    kill(Pid::from_raw(raw), signal).map_err(|source| ProcError::Signal {
        signal,
        pid,
        source,
    })
}

/// How long SIGKILL may take before a process is given up on.
const KILL_WAIT: Duration = Duration::from_secs(5);

/// Stops a child of this labctl: SIGTERM, wait up to `grace`, then SIGKILL.
/// Waits on the child itself (woken by SIGCHLD, and reaped), so no pid can
/// be reused under it. Returns true if SIGKILL was needed.
pub async fn terminate_child(child: &mut Child, grace: Duration) -> bool {
    let Some(pid) = child.id().and_then(|pid| i32::try_from(pid).ok()) else {
        return false; // already reaped
    };
    // Until it is reaped the pid stays ours, even as a zombie.
    let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_ok() {
        return false;
    }
    // `kill` sends SIGKILL and waits for the exit.
    let _ = tokio::time::timeout(KILL_WAIT, child.kill()).await;
    true
}

/// Stops a process recorded by pid: SIGTERM, wait up to `grace`, then
/// SIGKILL. Returns true if SIGKILL was needed. For processes another labctl
/// started (`up --detach`, `scale`), which this one cannot wait on.
pub async fn terminate(pid: u32, started: u64, grace: Duration) -> bool {
    if signal(pid, started, Signal::SIGTERM).is_err() {
        return false;
    }
    if wait_exit(pid, started, grace).await {
        return false;
    }
    let _ = signal(pid, started, Signal::SIGKILL);
    wait_exit(pid, started, KILL_WAIT).await;
    true
}

/// Waits until a recorded process is gone, for at most `timeout`.
///
/// Polls `/proc` every 20 ms: only a parent can wait on a process (and a
/// pidfd for a stranger would need an unsafe syscall). The poll reads one
/// small file and runs only while `down`, `scale` or a restart waits.
pub async fn wait_exit(pid: u32, started: u64, timeout: Duration) -> bool {
    let gone = async {
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        while is_alive(pid, started) {
            tick.tick().await;
        }
    };
    tokio::time::timeout(timeout, gone).await.is_ok()
}

/// The last `lines` lines of a log, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
