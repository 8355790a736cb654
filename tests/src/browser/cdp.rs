//! A minimal client of Chromium's DevTools protocol over
//! `--remote-debugging-pipe`: JSON messages separated by NUL bytes, commands
//! written to the browser's fd 3, responses and events read from its fd 4.
//!
//! Why not a DevTools crate: the ones on crates.io (headless_chrome,
//! chromiumoxide) compile a typed copy of the whole protocol (1 to 2.5
//! minutes of CI per build, measured) and drop events their copy cannot
//! parse. The check needs a dozen untyped messages. A pipe also needs no
//! port (no race with a lab's listeners), and reading one ordered stream
//! means every event before a command's response has been seen when the
//! response arrives.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, Command, Stdio},
    sync::mpsc::{self, Receiver, RecvTimeoutError},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use serde_json::{Value, json};

/// How long a closing Chromium gets before it is killed.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// One DevTools event: its method, its params, and the session (page) it
/// came from, if any.
#[derive(Debug, Clone)]
pub struct CdpEvent {
    pub method: String,
    pub params: Value,
    pub session: Option<String>,
}

/// A headless Chromium driven over its DevTools pipe; killed on drop.
pub struct Chromium {
    child: Child,
    commands: ChildStdin,
    messages: Receiver<Value>,
    next_id: u64,
    /// Events read so far, in arrival order.
    pub events: Vec<CdpEvent>,
    timeout: Duration,
    stderr_log: PathBuf,
    // Declared last: removed after the browser is gone.
    _profile: tempfile::TempDir,
}

impl Chromium {
    /// Starts `binary` headless with a fresh profile and `extra_args`.
    /// Chromium's stderr goes to `stderr_log`; each command may take up to
    /// `timeout`.
    pub fn launch(
        binary: &Path,
        extra_args: &[String],
        stderr_log: &Path,
        timeout: Duration,
    ) -> anyhow::Result<Chromium> {
        let profile = tempfile::Builder::new()
            .prefix("lab-chromium-")
            .tempdir()
            .context("creating Chromium's profile dir")?;
        let stderr = std::fs::File::create(stderr_log)
            .with_context(|| format!("creating {}", stderr_log.display()))?;
        // std cannot hand a child extra descriptors without unsafe code, so a
        // shell moves the pipes on stdin and stdout to the fds 3 and 4
        // Chromium uses, then execs it (the child's pid is Chromium's).
        let mut child = Command::new("sh")
            .arg("-c")
            .arg(r#"exec "$0" "$@" 3<&0 4>&1 </dev/null >/dev/null"#)
            .arg(binary)
            .arg("--remote-debugging-pipe")
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(extra_args)
            .arg("about:blank")
            // Its shared-memory files too (with --disable-dev-shm-usage they
            // go to TMPDIR), so they go with the profile.
            .env("TMPDIR", profile.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let (Some(commands), Some(replies)) = (child.stdin.take(), child.stdout.take()) else {
            anyhow::bail!("Chromium's pipes were not set up");
        };
        let (sender, messages) = mpsc::channel();
        // A reader thread, so waits can time out; it ends when Chromium
        // closes its end of the pipe.
        std::thread::Builder::new()
            .name("chromium-devtools".into())
            .spawn(move || {
                let mut replies = BufReader::new(replies);
                let mut message = Vec::new();
                loop {
                    message.clear();
                    match replies.read_until(0, &mut message) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                    if message.last() == Some(&0) {
                        message.pop();
                    }
                    let Ok(value) = serde_json::from_slice::<Value>(&message) else {
                        continue;
                    };
                    if sender.send(value).is_err() {
                        break;
                    }
                }
            })
            .context("starting the DevTools reader thread")?;
        Ok(Chromium {
            child,
            commands,
            messages,
            next_id: 1,
            events: Vec::new(),
            timeout,
            stderr_log: stderr_log.to_path_buf(),
            _profile: profile,
        })
    }

    /// Sends `method` (to a page's `session`, or to the browser) and waits
    /// for its result, keeping the events that arrive meanwhile.
    pub fn call(
        &mut self,
        session: Option<&str>,
        method: &str,
        params: Value,
    ) -> anyhow::Result<Value> {
        let id = self.next_id;
        self.next_id += 1;
        let mut command = json!({ "id": id, "method": method, "params": params });
        if let Some(session) = session {
            command["sessionId"] = json!(session);
        }
        let mut bytes = serde_json::to_vec(&command)?;
        bytes.push(0);
        self.commands
            .write_all(&bytes)
            .and_then(|()| self.commands.flush())
            .with_context(|| format!("sending {method} to Chromium{}", self.stderr_tail()))?;

        let deadline = Instant::now() + self.timeout;
        loop {
            let message = self.next_message(deadline, method)?;
            if message.get("id").and_then(Value::as_u64) != Some(id) {
                continue;
            }
            if let Some(error) = message.get("error") {
                anyhow::bail!("Chromium answered {method} with an error: {error}");
            }
            return Ok(message.get("result").cloned().unwrap_or(Value::Null));
        }
    }

    /// Waits until an event `method` from `session` whose params satisfy
    /// `matches` has arrived (it may already have).
    pub fn wait_for_event(
        &mut self,
        session: &str,
        method: &str,
        matches: impl Fn(&Value) -> bool,
    ) -> anyhow::Result<()> {
        let arrived = |events: &[CdpEvent]| {
            events.iter().any(|e| {
                e.method == method && e.session.as_deref() == Some(session) && matches(&e.params)
            })
        };
        let deadline = Instant::now() + self.timeout;
        while !arrived(&self.events) {
            self.next_message(deadline, method)?;
        }
        Ok(())
    }

    /// The next message, events set aside in `self.events` as they pass.
    fn next_message(&mut self, deadline: Instant, waiting_for: &str) -> anyhow::Result<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        let message = match self.messages.recv_timeout(left) {
            Ok(message) => message,
            Err(RecvTimeoutError::Timeout) => anyhow::bail!(
                "Chromium did not answer {waiting_for} within {:?}{}",
                self.timeout,
                self.stderr_tail()
            ),
            Err(RecvTimeoutError::Disconnected) => anyhow::bail!(
                "Chromium closed its DevTools pipe while we waited for {waiting_for}{}",
                self.stderr_tail()
            ),
        };
        if let Some(method) = message.get("method").and_then(Value::as_str) {
            self.events.push(CdpEvent {
                method: method.to_string(),
                params: message.get("params").cloned().unwrap_or(Value::Null),
                session: message
                    .get("sessionId")
                    .and_then(Value::as_str)
                    .map(str::to_string),
            });
        }
        Ok(message)
    }

    /// The end of Chromium's stderr, to explain a failure.
    fn stderr_tail(&self) -> String {
        let log = std::fs::read_to_string(&self.stderr_log).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        let tail = lines[lines.len().saturating_sub(15)..].join("\n");
        if tail.is_empty() {
            String::new()
        } else {
            format!("; Chromium's stderr ends:\n{tail}")
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // Asked to close, Chromium ends its helper processes before it exits
        // (killed, it leaves them to notice on their own); its end of the
        // pipe closing tells us it is gone. Killed anyway if it lingers.
        let close = json!({ "id": 0, "method": "Browser.close" });
        let mut bytes = close.to_string().into_bytes();
        bytes.push(0);
        if self.commands.write_all(&bytes).is_ok() {
            let deadline = Instant::now() + CLOSE_TIMEOUT;
            // Replies are read and dropped until the pipe closes (or the
            // deadline passes).
            while self
                .messages
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                .is_ok()
            {}
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
