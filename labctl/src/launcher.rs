//! Starts, watches and stops the native stack — the one launcher behind
//! `labctl up` and every end-to-end test.
//!
//! Start order, each step waiting until its processes are ready:
//! MySQL/MariaDB, etcd and partner-api (B's HTTPS dependency, with a private
//! CA made in `<state-dir>/tls/`) → every B (ready = gRPC serving and MySQL
//! answering) → HAProxy → A (ready = a B answers a gRPC health check through
//! A's own channel). Stop order is the reverse, SIGTERM first.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use lab_common::config::{AdminToken, Faults, LabConfig, SlbCheck, SlbConfig};
use partner_api::certs::{self, TlsFiles};
use tokio::process::Child;

mod error;

use error::Doing;
pub use error::LaunchError;

use crate::{
    ports::{PortPolicy, Ports},
    probe::{self, HttpClient},
    procs::{self, Lifetime},
    state::{LabState, ServiceRecord},
    token,
};

/// The HAProxy frontends, shared with docker compose.
pub const HAPROXY_CFG: &str = include_str!("../../deploy/haproxy/haproxy.cfg");
/// Creates the lab's database and user at server start (MySQL and MariaDB).
pub const MYSQL_INIT_SQL: &str = include_str!("../../deploy/mysql/init.sql");

/// What to start and how.
#[derive(Debug, Clone)]
pub struct UpOptions {
    /// The effective config (mode, switches, time constants); ports and
    /// dependency addresses in it are replaced by the planned ones.
    pub config: LabConfig,
    /// Number of B instances.
    pub backends: usize,
    pub ports: PortPolicy,
    pub state_dir: PathBuf,
    pub lifetime: Lifetime,
    /// Where `service-a` and `service-b` are, if not next to this executable.
    pub bin_dir: Option<PathBuf>,
    /// How long each step may take to become ready.
    pub ready_timeout: Duration,
    /// Extra `--set KEY=VALUE` for every B this stack starts, after the
    /// shared config: for tests that give the Bs a different view than A
    /// (e.g. reaching etcd through a relay the test can cut).
    pub backend_overrides: Vec<String>,
    /// Extra `--set KEY=VALUE` for one B, by its number (1 for
    /// `service-b-1`), after `backend_overrides`: one instance unlike the
    /// others, e.g. a degraded B with `service_b.handler_latency=20ms`.
    pub instance_overrides: BTreeMap<usize, Vec<String>>,
    /// A drill: these switches (not `config`'s) and the drill token go to A
    /// and the Bs on standard input, and nothing the stack writes — the
    /// config file, `state.json`, the arguments — names them.
    pub drill: Option<DrillSecrets>,
}

/// What a drill hides from the trainee: the switches in force and the
/// facilitator's token that reads them back.
#[derive(Debug, Clone)]
pub struct DrillSecrets {
    pub token: AdminToken,
    pub faults: Faults,
}

impl DrillSecrets {
    /// The TOML layer A and the Bs read with `--config-stdin`: every switch
    /// spelled out (so the file's preset decides nothing) and the token.
    fn stdin_layer(&self) -> Result<String, toml::ser::Error> {
        #[derive(serde::Serialize)]
        struct Admin<'a> {
            drill_token: &'a AdminToken,
        }
        #[derive(serde::Serialize)]
        struct Layer<'a> {
            faults: &'a Faults,
            admin: Admin<'a>,
        }
        toml::to_string(&Layer {
            faults: &self.faults,
            admin: Admin {
                drill_token: &self.token,
            },
        })
    }
}

/// `config` as the file every process reads, minus what a drill hides: no
/// `mode`, no `[faults]`, no drill token (each comes on standard input).
fn config_file_text(config: &LabConfig, drill: bool) -> Result<String, LaunchError> {
    let text = config.to_toml()?;
    if !drill {
        return Ok(text);
    }
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| LaunchError::Io {
        what: "re-reading the config written for the services".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    table.remove("mode");
    table.remove("faults");
    if let Some(toml::Value::Table(admin)) = table.get_mut("admin") {
        admin.remove("drill_token");
    }
    // Read without the services' standard input, this file gives the
    // defaults for what it leaves out; say so to whoever reads it.
    Ok(format!(
        "# A drill is running: the switches are not in this file; the services\n\
         # read them on standard input.\n{}",
        toml::to_string(&table)?
    ))
}

impl UpOptions {
    pub fn new(config: LabConfig, state_dir: impl Into<PathBuf>) -> Self {
        Self {
            config,
            backends: 2,
            ports: PortPolicy::Configured,
            state_dir: state_dir.into(),
            lifetime: Lifetime::TiedToLabctl,
            bin_dir: None,
            ready_timeout: Duration::from_secs(30),
            backend_overrides: Vec::new(),
            instance_overrides: BTreeMap::new(),
            drill: None,
        }
    }
}

/// A started stack. Dropping it without [`Stack::down`] still stops every
/// process (SIGTERM, then SIGKILL), so a failing test leaves nothing behind.
pub struct Stack {
    pub state: LabState,
    pub ports: Ports,
    /// The config the services were given (with the planned ports).
    pub config: LabConfig,
    /// How long `up` took until everything was ready.
    pub startup: Duration,
    /// The processes this labctl spawned, by name (empty after `attach`).
    children: HashMap<String, Child>,
    lifetime: Lifetime,
    /// Set when the processes must outlive this value (`down` done,
    /// `--detach`, or attached from another labctl).
    stopped: bool,
    /// [`UpOptions::backend_overrides`], for Bs added later by `scale`.
    backend_overrides: Vec<String>,
    /// [`UpOptions::instance_overrides`], kept for a B that is restarted.
    instance_overrides: BTreeMap<usize, Vec<String>>,
    /// [`UpOptions::drill`], for A or a B started again. `None` in a drill
    /// attached from another labctl: then A and the Bs cannot be started.
    drill: Option<DrillSecrets>,
}

/// A readiness check for one process.
#[derive(Clone)]
enum Ready {
    Http(String),
    MysqlGreeting(String),
}

struct Binaries {
    mysqld: PathBuf,
    mysql_flavor: MysqlFlavor,
    etcd: PathBuf,
    haproxy: PathBuf,
    service_a: PathBuf,
    service_b: PathBuf,
    partner_api: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MysqlFlavor {
    MariaDb,
    MySql,
}

impl Binaries {
    async fn find(bin_dir: Option<&Path>) -> Result<Self, LaunchError> {
        const MYSQLD: [&str; 2] = ["mariadbd", "mysqld"];
        let mysqld = procs::find_binary(&MYSQLD)
            .ok_or_else(|| procs::missing("MySQL/MariaDB server", &MYSQLD))?;
        let version = tokio::process::Command::new(&mysqld)
            .arg("--version")
            .output()
            .await
            .doing(|| format!("running {} --version", mysqld.display()))?;
        let mysql_flavor = if String::from_utf8_lossy(&version.stdout).contains("MariaDB") {
            MysqlFlavor::MariaDb
        } else {
            MysqlFlavor::MySql
        };
        Ok(Self {
            mysqld,
            mysql_flavor,
            etcd: procs::find_binary(&["etcd"]).ok_or_else(|| procs::missing("etcd", &["etcd"]))?,
            haproxy: procs::find_binary(&["haproxy"])
                .ok_or_else(|| procs::missing("HAProxy", &["haproxy"]))?,
            service_a: procs::find_lab_binary("service-a", bin_dir)?,
            service_b: procs::find_lab_binary("service-b", bin_dir)?,
            partner_api: procs::find_lab_binary("partner-api", bin_dir)?,
        })
    }
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

fn url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

/// The port of `127.0.0.1:50051` or `http://127.0.0.1:9081`.
fn port_of(address: &str) -> Option<u16> {
    address
        .rsplit(':')
        .next()?
        .trim_end_matches('/')
        .parse()
        .ok()
}

fn https_url(port: u16) -> String {
    format!("https://127.0.0.1:{port}")
}

/// The names partner-api's certificate is valid for: what B dials natively.
const PARTNER_HOSTS: [&str; 2] = ["127.0.0.1", "localhost"];

/// What every start-up step needs: the binaries, a probe client and the
/// time each step may take to become ready.
struct Launch {
    bins: Binaries,
    client: HttpClient,
    timeout: Duration,
}

impl Stack {
    /// Starts everything and waits until it is ready. The binaries are found
    /// first, so a missing one fails before anything is written or spawned.
    /// Each step waits for readiness before the next one starts, because
    /// each tier dials the one before it at start-up (B needs MySQL, HAProxy
    /// checks the Bs, A's readiness needs a B through HAProxy or etcd).
    pub async fn up(options: UpOptions) -> Result<Stack, LaunchError> {
        let started = Instant::now();
        let launch = Launch {
            bins: Binaries::find(options.bin_dir.as_deref()).await?,
            client: probe::http_client(),
            timeout: options.ready_timeout,
        };
        let mut stack = Stack::prepare(&options)?;
        stack.start_dependencies(&launch).await?;
        stack.start_backends(&launch).await?;
        stack.start_slb(&launch).await?;
        stack.start_service_a(&launch).await?;
        stack.startup = started.elapsed();
        Ok(stack)
    }

    /// Checks that nothing runs from the state dir yet, plans the ports and
    /// writes the config every service reads: nothing is spawned until the
    /// whole plan is known to work.
    fn prepare(options: &UpOptions) -> Result<Stack, LaunchError> {
        let state_dir = absolute(&options.state_dir)?;
        std::fs::create_dir_all(state_dir.join("logs"))
            .doing(|| format!("creating state dir {}", state_dir.display()))?;
        if let Some(old) = LabState::load(&state_dir)?
            && old.any_alive()
        {
            return Err(LaunchError::AlreadyRunning {
                dir: state_dir.display().to_string(),
            });
        }
        if options.backends == 0 {
            return Err(LaunchError::NoBackends);
        }
        let ports = Ports::plan(&options.config, options.backends, options.ports)?;
        if options.ports == PortPolicy::Configured {
            ports.ensure_free()?;
        }
        // Kept across runs (see `certs::ensure`): a restarted lab trusts
        // the same CA.
        let tls_dir = state_dir.join("tls");
        let tls = certs::ensure(&tls_dir, &PARTNER_HOSTS).map_err(|source| LaunchError::Certs {
            dir: tls_dir.clone(),
            source: source.into(),
        })?;
        let mysql_password = token::ensure_mysql_password(&state_dir)
            .doing(|| format!("writing {}", state_dir.join("mysql.password").display()))?;
        let mut config = with_ports(&options.config, &ports, &tls, &mysql_password);
        config.admin.token = token::ensure(&state_dir, &config.admin.token)
            .doing(|| format!("writing {}", token::path(&state_dir).display()))?;
        if let Some(drill) = &options.drill {
            config.faults = drill.faults;
            config.admin.drill_token = drill.token.clone();
        }
        let drill = options.drill.is_some();
        // Private: it carries the operator token.
        let config_file = state_dir.join("lab.toml");
        token::write_private(&config_file, config_file_text(&config, drill)?.as_bytes())
            .doing(|| format!("writing {}", config_file.display()))?;
        Ok(Stack {
            state: LabState {
                mode: (!drill).then_some(config.mode),
                faults: (!drill).then_some(config.faults),
                drill,
                state_dir,
                config_file,
                auto_ports: options.ports == PortPolicy::Auto,
                services: Vec::new(),
            },
            ports,
            config,
            startup: Duration::ZERO,
            children: HashMap::new(),
            lifetime: options.lifetime,
            stopped: false,
            backend_overrides: options.backend_overrides.clone(),
            instance_overrides: options.instance_overrides.clone(),
            drill: options.drill.clone(),
        })
    }

    /// MySQL, etcd and the partner API, side by side: they depend on
    /// nothing, and every B needs all three as soon as it starts.
    async fn start_dependencies(&mut self, launch: &Launch) -> Result<(), LaunchError> {
        let ports = self.ports.clone();
        let mysql_cmd = mysql_command(&launch.bins, &self.state.state_dir, ports.mysql).await?;
        let shown = lab_common::config::redacted_url(&self.config.mysql.url);
        self.start("mysql", mysql_cmd, |r| r.url = Some(shown))?;
        self.spawn_etcd(&launch.bins.etcd, true)?;
        self.spawn_partner(&launch.bins.partner_api, &[])?;
        self.wait_ready(
            &launch.client,
            launch.timeout,
            vec![
                ("mysql", Ready::MysqlGreeting(addr(ports.mysql))),
                ("etcd", etcd_ready(&ports)),
                ("partner-api", partner_ready(&ports)),
            ],
        )
        .await
    }

    /// Every B, side by side. Ready means serving gRPC with MySQL answering
    /// (and, under `lb = "etcd"`, registered), so HAProxy's first health
    /// checks and A's first calls find them up.
    async fn start_backends(&mut self, launch: &Launch) -> Result<(), LaunchError> {
        let mut waits = Vec::new();
        for (i, (grpc, admin)) in self.ports.b.clone().into_iter().enumerate() {
            let name = self.spawn_backend(&launch.bins.service_b, i + 1, grpc, admin)?;
            waits.push((name, backend_ready(admin)));
        }
        let waits = waits.iter().map(|(n, r)| (n.as_str(), r.clone())).collect();
        self.wait_ready(&launch.client, launch.timeout, waits).await
    }

    /// HAProxy over the Bs that are running: its backends file is generated
    /// from them, so it must come after them.
    async fn start_slb(&mut self, launch: &Launch) -> Result<(), LaunchError> {
        self.spawn_slb(&launch.bins.haproxy)?;
        let ready = vec![("slb", slb_ready(&self.ports))];
        self.wait_ready(&launch.client, launch.timeout, ready).await
    }

    /// A last: it is the stack's front door, and it is ready only once a B
    /// answers through A's own channel, so `up` returning means a request
    /// can go all the way through.
    async fn start_service_a(&mut self, launch: &Launch) -> Result<(), LaunchError> {
        let ports = self.ports.clone();
        let mut cmd = Command::new(&launch.bins.service_a);
        cmd.arg("--config").arg(&self.state.config_file);
        let input = self.drill_input(&mut cmd)?;
        self.start_with_input("service-a", cmd, input, |r| {
            r.url = Some(url(ports.a_http));
            r.admin_url = Some(url(ports.a_admin));
        })?;
        let ready = vec![(
            "service-a",
            Ready::Http(format!("{}/readyz", url(ports.a_admin))),
        )];
        self.wait_ready(&launch.client, launch.timeout, ready).await
    }

    /// Spawns one process, records it and saves the state (so even a
    /// half-started stack can be stopped with `labctl down`). A record of
    /// the same name (a process being restarted) is replaced in place, so
    /// `down` keeps stopping in reverse start order.
    fn start(
        &mut self,
        name: &str,
        cmd: Command,
        describe: impl FnOnce(&mut ServiceRecord),
    ) -> Result<(), LaunchError> {
        self.start_with_input(name, cmd, None, describe)
    }

    /// Starts a process that is part of the lab but not a service of it
    /// (a drill's steady load and job inflow), recorded so that `status`
    /// lists it and `down` stops it first.
    pub fn start_companion(&mut self, name: &str, cmd: Command) -> Result<(), LaunchError> {
        self.start(name, cmd, |_| {})
    }

    /// [`Stack::start`] with `input` as the process's standard input.
    fn start_with_input(
        &mut self,
        name: &str,
        cmd: Command,
        input: Option<String>,
        describe: impl FnOnce(&mut ServiceRecord),
    ) -> Result<(), LaunchError> {
        let log = self
            .state
            .state_dir
            .join("logs")
            .join(format!("{name}.log"));
        let input = input.as_deref().map(str::as_bytes);
        let child = procs::spawn_with_input(cmd, &log, self.lifetime, input)?;
        let (pid, start_time) = child
            .id()
            .and_then(|pid| Some((pid, procs::start_time(pid)?)))
            .ok_or_else(|| LaunchError::ExitedAtOnce {
                name: name.to_string(),
                log: log.clone(),
            })?;
        let mut record = ServiceRecord::new(name, pid, start_time, log);
        describe(&mut record);
        match self.state.services.iter_mut().find(|s| s.name == name) {
            Some(old) => *old = record,
            None => self.state.services.push(record),
        }
        self.children.insert(name.to_string(), child);
        Ok(self.state.save()?)
    }

    /// Probes every named process until all are ready, failing fast with the
    /// log's tail when one exits or the timeout passes.
    async fn wait_ready(
        &self,
        client: &HttpClient,
        timeout: Duration,
        waits: Vec<(&str, Ready)>,
    ) -> Result<(), LaunchError> {
        let checks = waits.into_iter().map(|(name, ready)| async move {
            let record = self
                .state
                .service(name)
                .ok_or_else(|| LaunchError::NotStarted {
                    name: name.to_string(),
                })?;
            let deadline = Instant::now() + timeout;
            loop {
                let ok = match &ready {
                    Ready::Http(u) => probe::http_ok(client, u).await,
                    Ready::MysqlGreeting(a) => probe::mysql_greets(a).await,
                };
                if ok {
                    return Ok::<(), LaunchError>(());
                }
                if !record.is_alive() {
                    return Err(LaunchError::ExitedDuringStartup {
                        name: name.to_string(),
                        log: record.log.clone(),
                        tail: procs::tail(&record.log, 15),
                    });
                }
                if Instant::now() >= deadline {
                    return Err(LaunchError::NotReady {
                        name: name.to_string(),
                        timeout,
                        log: record.log.clone(),
                        tail: procs::tail(&record.log, 15),
                    });
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        futures::future::try_join_all(checks).await.map(|_| ())
    }

    /// The record of `name`.
    pub fn service(&self, name: &str) -> Result<&ServiceRecord, LaunchError> {
        self.state
            .service(name)
            .ok_or_else(|| LaunchError::NoService {
                name: name.to_string(),
            })
    }

    /// Sends `signal` to the named process (e.g. SIGTERM one B, SIGKILL MySQL).
    pub fn signal(&self, name: &str, signal: nix::sys::signal::Signal) -> Result<(), LaunchError> {
        let record = self.service(name)?;
        Ok(procs::signal(record.pid, record.start_time, signal)?)
    }

    /// Waits for the named child to exit and returns its exit status.
    pub async fn wait_exit(
        &mut self,
        name: &str,
        timeout: Duration,
    ) -> Result<std::process::ExitStatus, LaunchError> {
        let child = self
            .children
            .get_mut(name)
            .ok_or_else(|| LaunchError::NotAChild {
                name: name.to_string(),
            })?;
        match tokio::time::timeout(timeout, child.wait()).await {
            Ok(status) => status.doing(|| format!("waiting for {name}")),
            Err(_) => Err(LaunchError::StillRunning {
                name: name.to_string(),
                timeout,
            }),
        }
    }

    /// Waits until a child of this labctl whose name is not in `seen` exits
    /// and returns its name and status; never returns if there is none.
    /// Cancel-safe, for a `select!` that also waits for Ctrl-C.
    pub async fn next_exit(
        &mut self,
        seen: &BTreeSet<String>,
    ) -> (String, std::io::Result<std::process::ExitStatus>) {
        let waits: Vec<_> = self
            .children
            .iter_mut()
            .filter(|(name, _)| !seen.contains(name.as_str()))
            .map(|(name, child)| Box::pin(async move { (name.clone(), child.wait().await) }))
            .collect();
        if waits.is_empty() {
            return std::future::pending().await;
        }
        futures::future::select_all(waits).await.0
    }

    /// The lab's effective configuration (ports, TLS paths and operator
    /// token filled in), as every process reads it.
    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    /// A's public base URL.
    pub fn a_url(&self) -> String {
        format!("http://{}", self.config.service_a.listen)
    }

    /// Re-attaches to the stack recorded in `state_dir` (for `labctl kill`
    /// and `labctl scale`). Its processes are not children of this labctl,
    /// and dropping the value leaves them running.
    pub fn attach(state_dir: &Path) -> Result<Stack, LaunchError> {
        let state_dir = absolute(state_dir)?;
        let state = LabState::load(&state_dir)?.ok_or_else(|| LaunchError::NoLab {
            dir: state_dir.clone(),
        })?;
        let config = lab_common::config::check_file(&state.config_file).map_err(|source| {
            LaunchError::Config {
                path: state.config_file.clone(),
                source: Box::new(source),
            }
        })?;
        let ports = Ports::plan(&config, 0, PortPolicy::Configured)?;
        Ok(Stack {
            state,
            ports,
            config,
            startup: Duration::ZERO,
            children: HashMap::new(),
            lifetime: Lifetime::Detached,
            stopped: true,
            // Not recorded in the state file: test and benchmark knobs.
            backend_overrides: Vec::new(),
            instance_overrides: BTreeMap::new(),
            drill: None,
        })
    }

    /// In a drill, what A or a B reads on standard input (and the flag that
    /// makes it read it); `None` outside one.
    fn drill_input(&self, cmd: &mut Command) -> Result<Option<String>, LaunchError> {
        if !self.state.drill {
            return Ok(None);
        }
        let drill = self.drill.as_ref().ok_or(LaunchError::DrillHidden)?;
        cmd.arg("--config-stdin");
        Ok(Some(drill.stdin_layer()?))
    }

    /// Starts B number `index` on the given ports (not waiting for it).
    fn spawn_backend(
        &mut self,
        binary: &Path,
        index: usize,
        grpc: u16,
        admin: u16,
    ) -> Result<String, LaunchError> {
        let name = format!("service-b-{index}");
        let instance_id = format!("b-{index}");
        let mut cmd = Command::new(binary);
        cmd.arg("--config").arg(&self.state.config_file);
        for set in [
            format!("service_b.instance_id={instance_id}"),
            format!("service_b.listen={}", addr(grpc)),
            format!("service_b.admin_listen={}", addr(admin)),
        ]
        .iter()
        .chain(&self.backend_overrides)
        .chain(self.instance_overrides.get(&index).into_iter().flatten())
        {
            cmd.arg("--set").arg(set);
        }
        let input = self.drill_input(&mut cmd)?;
        self.start_with_input(&name, cmd, input, |r| {
            r.instance_id = Some(instance_id.clone());
            r.grpc_addr = Some(addr(grpc));
            r.admin_url = Some(url(admin));
        })?;
        Ok(name)
    }

    /// Starts etcd (not waiting for it). `fresh` wipes its data dir.
    /// Starts partner-api on the lab's config, with `extra` `--set
    /// KEY=VALUE` after it (not waiting for it).
    fn spawn_partner(&mut self, partner_api: &Path, extra: &[String]) -> Result<(), LaunchError> {
        let mut cmd = Command::new(partner_api);
        cmd.arg("--config").arg(&self.state.config_file);
        for set in extra {
            cmd.arg("--set").arg(set);
        }
        let ports = self.ports.clone();
        self.start("partner-api", cmd, |r| {
            r.url = Some(https_url(ports.partner_https));
            r.admin_url = Some(url(ports.partner_admin));
        })
    }

    fn spawn_etcd(&mut self, etcd: &Path, fresh: bool) -> Result<(), LaunchError> {
        let client_url = url(self.ports.etcd_client);
        let cmd = etcd_command(etcd, &self.state.state_dir, &self.ports, fresh)?;
        self.start("etcd", cmd, |r| r.url = Some(client_url))
    }

    /// Starts HAProxy over the recorded Bs (not waiting for it).
    fn spawn_slb(&mut self, haproxy: &Path) -> Result<(), LaunchError> {
        let cmd = haproxy_command(
            haproxy,
            &self.state.state_dir,
            &self.config,
            &slb_servers(&self.state),
        )?;
        let ports = self.ports.clone();
        self.start("slb", cmd, |r| {
            r.l4_addr = Some(addr(ports.slb_l4));
            r.l7_addr = Some(addr(ports.slb_l7));
            r.admin_url = Some(url(ports.slb_stats));
            r.url = Some(format!("{}/stats", url(ports.slb_stats)));
        })
    }

    /// Runs `n` B instances: starts new ones (numbered after the highest) or
    /// stops the highest-numbered ones gracefully, then points HAProxy at
    /// the new set (a restart: its open connections drop and clients
    /// reconnect). With `lb = "etcd"` A learns of the change from etcd alone.
    pub async fn scale_backends(&mut self, n: usize) -> Result<Vec<String>, LaunchError> {
        if n == 0 {
            return Err(LaunchError::LastBackend);
        }
        let mut changed = Vec::new();
        let alive: Vec<(usize, String)> = self
            .state
            .backends()
            .filter(|b| b.is_alive())
            .filter_map(|b| {
                let index = b.name.strip_prefix("service-b-")?.parse().ok()?;
                Some((index, b.name.clone()))
            })
            .collect();
        // Forget Bs that died on their own.
        let before = self.state.services.len();
        self.state
            .services
            .retain(|s| !s.name.starts_with("service-b-") || s.is_alive());
        let pruned = self.state.services.len() != before;
        if n == alive.len() && !pruned {
            return Ok(changed);
        }
        if n > alive.len() {
            let bins = Binaries::find(None).await?;
            let client = probe::http_client();
            let mut next = alive.iter().map(|(i, _)| *i).max().unwrap_or(0);
            let mut names = Vec::new();
            for _ in alive.len()..n {
                next += 1;
                let (grpc, admin) = self.ports_for_backend(next)?;
                let name = self.spawn_backend(&bins.service_b, next, grpc, admin)?;
                names.push((name, backend_ready(admin)));
            }
            let waits = names.iter().map(|(n, r)| (n.as_str(), r.clone())).collect();
            self.wait_ready(&client, Duration::from_secs(30), waits)
                .await?;
            changed.extend(names.into_iter().map(|(n, _)| n));
        } else {
            let mut by_index = alive.clone();
            by_index.sort();
            for (_, name) in by_index.into_iter().skip(n).rev() {
                self.stop_service_within(&name, Duration::from_secs(30))
                    .await?;
                self.state.services.retain(|s| s.name != name);
                changed.push(name);
            }
        }
        self.state.save()?;
        self.restart_slb().await?;
        Ok(changed)
    }

    /// Adds `--set KEY=VALUE` overrides for every B started from now on
    /// (by `scale_backends` or `restart_backends`), after those it has.
    pub fn add_backend_overrides(&mut self, extra: &[String]) {
        self.backend_overrides.extend(extra.iter().cloned());
    }

    /// Restarts every running B, one at a time, with `extra` config added
    /// after the shared config (and kept for every B started later): how a
    /// knob that is not a live switch changes, e.g.
    /// `service_b.max_connection_age`, and how a fix is deployed. Each B is
    /// stopped gracefully (it leaves etcd first) and started again on the
    /// same ports before the next one goes, so HAProxy's backends stay valid.
    pub async fn restart_backends(&mut self, extra: &[String]) -> Result<Vec<String>, LaunchError> {
        self.add_backend_overrides(extra);
        let bins = Binaries::find(None).await?;
        let client = probe::http_client();
        let running: Vec<ServiceRecord> = self
            .state
            .backends()
            .filter(|b| b.is_alive())
            .cloned()
            .collect();
        let mut restarted = Vec::new();
        for record in running {
            let index = record
                .name
                .strip_prefix("service-b-")
                .and_then(|i| i.parse().ok());
            let grpc = record.grpc_addr.as_deref().and_then(port_of);
            let admin = record.admin_url.as_deref().and_then(port_of);
            let (Some(index), Some(grpc), Some(admin)) = (index, grpc, admin) else {
                return Err(LaunchError::NoService { name: record.name });
            };
            self.stop_record(&record, Duration::from_secs(30)).await;
            let name = self.spawn_backend(&bins.service_b, index, grpc, admin)?;
            self.wait_ready(
                &client,
                Duration::from_secs(30),
                vec![(name.as_str(), backend_ready(admin))],
            )
            .await?;
            restarted.push(name);
        }
        Ok(restarted)
    }

    /// Ports for B number `index`: the configured base + (index − 1), or
    /// free ones when the stack was started with `--ports auto`.
    fn ports_for_backend(&self, index: usize) -> Result<(u16, u16), LaunchError> {
        if self.state.auto_ports {
            return Ok(Ports::free_pair()?);
        }
        let base = Ports::plan(&self.config, index, PortPolicy::Configured)?;
        base.b.last().copied().ok_or(LaunchError::NoBackendPort)
    }

    /// Stops one process (SIGTERM, then SIGKILL after 15 s) and waits for it.
    pub async fn stop_service(&mut self, name: &str) -> Result<(), LaunchError> {
        self.stop_service_within(name, Duration::from_secs(15))
            .await
    }

    async fn stop_service_within(
        &mut self,
        name: &str,
        grace: Duration,
    ) -> Result<(), LaunchError> {
        let record = self.service(name)?.clone();
        self.stop_record(&record, grace).await;
        Ok(())
    }

    /// Stops one recorded process: through its [`Child`] handle when this
    /// labctl started it (waited for, not polled), by pid otherwise.
    /// Returns true if SIGKILL was needed.
    async fn stop_record(&mut self, record: &ServiceRecord, grace: Duration) -> bool {
        let own = self
            .children
            .get(&record.name)
            .is_some_and(|child| child.id() == Some(record.pid));
        if own && let Some(mut child) = self.children.remove(&record.name) {
            return procs::terminate_child(&mut child, grace).await;
        }
        procs::terminate(record.pid, record.start_time, grace).await
    }

    /// Starts etcd again on the same port and data dir after
    /// [`Stack::stop_service`] (an etcd outage and recovery).
    pub async fn restart_etcd(&mut self) -> Result<(), LaunchError> {
        if self.service("etcd")?.is_alive() {
            return Err(LaunchError::ServiceStillRunning("etcd"));
        }
        let bins = Binaries::find(None).await?;
        self.spawn_etcd(&bins.etcd, false)?;
        let ready = vec![("etcd", etcd_ready(&self.ports))];
        self.wait_ready(&probe::http_client(), Duration::from_secs(30), ready)
            .await
    }

    /// Starts MySQL again on the same port and data after
    /// [`Stack::stop_service`] (a database outage and recovery).
    pub async fn restart_mysql(&mut self) -> Result<(), LaunchError> {
        if self.service("mysql")?.is_alive() {
            return Err(LaunchError::ServiceStillRunning("mysql"));
        }
        let bins = Binaries::find(None).await?;
        let port = self.ports.mysql;
        let cmd = mysql_command(&bins, &self.state.state_dir, port).await?;
        let shown = lab_common::config::redacted_url(&self.config.mysql.url);
        self.start("mysql", cmd, |r| r.url = Some(shown))?;
        let ready = vec![("mysql", Ready::MysqlGreeting(addr(port)))];
        self.wait_ready(&probe::http_client(), Duration::from_secs(30), ready)
            .await
    }

    /// Starts partner-api again on its ports and certificate after
    /// [`Stack::stop_service`], with `extra` `--set KEY=VALUE` after the
    /// lab's config (a partner back but slow: `partner.latency=2s`).
    pub async fn restart_partner(&mut self, extra: &[String]) -> Result<(), LaunchError> {
        if self.service("partner-api")?.is_alive() {
            return Err(LaunchError::ServiceStillRunning("partner-api"));
        }
        let bins = Binaries::find(None).await?;
        self.spawn_partner(&bins.partner_api, extra)?;
        let ready = vec![("partner-api", partner_ready(&self.ports))];
        self.wait_ready(&probe::http_client(), Duration::from_secs(30), ready)
            .await
    }

    /// Rewrites HAProxy's backends for the current Bs and restarts it.
    pub async fn restart_slb(&mut self) -> Result<(), LaunchError> {
        if self.state.service("slb").is_none() {
            return Ok(());
        }
        self.stop_service_within("slb", Duration::from_secs(10))
            .await?;
        let bins = Binaries::find(None).await?;
        self.spawn_slb(&bins.haproxy)?;
        let ready = vec![("slb", slb_ready(&self.ports))];
        self.wait_ready(&probe::http_client(), Duration::from_secs(10), ready)
            .await
    }

    /// Stops every process (reverse start order) and removes `state.json`.
    /// What another labctl added meanwhile (`scale`, an HAProxy restart) is
    /// in the file, not in memory: both are stopped.
    pub async fn down(&mut self) -> Result<(), LaunchError> {
        let mut records = match LabState::load(&self.state.state_dir) {
            Ok(Some(on_disk)) => on_disk.services,
            _ => Vec::new(),
        };
        for record in &self.state.services {
            if !records.contains(record) {
                records.push(record.clone());
            }
        }
        for record in records.iter().rev() {
            if self.stop_record(record, STOP_GRACE).await {
                tracing::warn!(name = %record.name, "did not stop on SIGTERM; killed");
            }
        }
        self.stopped = true;
        Ok(LabState::remove(&self.state.state_dir)?)
    }

    /// Leaves the processes running (after `up --detach`). Only a stack
    /// started with [`Lifetime::Detached`] outlives labctl: tied children
    /// die with their handles and with labctl itself.
    pub fn detach(mut self) {
        self.stopped = true;
    }
}

/// How long `down` gives each process to stop on SIGTERM.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// How long dropping a running [`Stack`] waits for SIGTERM to work.
const DROP_GRACE: Duration = Duration::from_secs(5);

/// The fallback when a stack is dropped without [`Stack::down`] (a test that
/// failed or panicked, `up` failing half-way).
///
/// It stays synchronous and blocks the dropping thread, on purpose (up to
/// [`DROP_GRACE`] for SIGTERM, and as long again after SIGKILL): `Drop` cannot await, and the caller needs the
/// processes gone when it returns (the test harness deletes the state dir,
/// with MySQL's data, right after). tokio's `kill_on_drop` alone would only
/// SIGKILL our own children, without letting them shut down, and would not
/// reach processes another labctl added (`scale`). So: SIGTERM to every
/// recorded process, wait on our children with `try_wait` (which needs no
/// runtime), then SIGKILL our children that are still there and wait for
/// them to go. Processes another labctl added only get the SIGTERM: they
/// are not our children, so they can be neither waited on nor reaped here.
impl Drop for Stack {
    fn drop(&mut self) {
        if self.stopped {
            return;
        }
        let mut records = LabState::load(&self.state.state_dir)
            .ok()
            .flatten()
            .map(|s| s.services)
            .unwrap_or_default();
        for record in &self.state.services {
            if !records.contains(record) {
                records.push(record.clone());
            }
        }
        for record in records.iter().rev() {
            let _ = procs::signal(
                record.pid,
                record.start_time,
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        wait_for_children(&mut self.children, DROP_GRACE);
        for child in self.children.values_mut() {
            let _ = child.start_kill();
        }
        wait_for_children(&mut self.children, DROP_GRACE);
        let _ = LabState::remove(&self.state.state_dir);
    }
}

/// Blocks until every child has exited (and is reaped), for at most
/// `timeout`. Only for [`Stack`]'s `Drop`, which cannot await.
fn wait_for_children(children: &mut HashMap<String, Child>, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while children
        .values_mut()
        .any(|c| matches!(c.try_wait(), Ok(None)))
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Stops every recorded process in reverse start order.
pub async fn stop_all(state: &LabState) {
    for record in state.services.iter().rev() {
        if procs::terminate(record.pid, record.start_time, STOP_GRACE).await {
            tracing::warn!(name = %record.name, "did not stop on SIGTERM; killed");
        }
    }
}

/// `labctl down`: stops the stack recorded in `state_dir`. Returns the
/// names of the processes that were still running.
pub async fn down(state_dir: &Path) -> Result<Vec<String>, LaunchError> {
    let Some(state) = LabState::load(state_dir)? else {
        return Ok(Vec::new());
    };
    let running = state
        .services
        .iter()
        .filter(|s| s.is_alive())
        .map(|s| s.name.clone())
        .collect();
    stop_all(&state).await;
    LabState::remove(state_dir)?;
    Ok(running)
}

/// etcd is ready when its own health endpoint says so.
fn etcd_ready(ports: &Ports) -> Ready {
    Ready::Http(format!("{}/health", url(ports.etcd_client)))
}

fn partner_ready(ports: &Ports) -> Ready {
    Ready::Http(format!("{}/readyz", url(ports.partner_admin)))
}

/// A B is ready when its admin `/readyz` says so (see service-b's admin routes).
fn backend_ready(admin: u16) -> Ready {
    Ready::Http(format!("{}/readyz", url(admin)))
}

/// HAProxy is ready once its stats page answers (its frontends bind first).
fn slb_ready(ports: &Ports) -> Ready {
    Ready::Http(format!("{}/stats", url(ports.slb_stats)))
}

fn absolute(path: &Path) -> Result<PathBuf, LaunchError> {
    if path.is_absolute() {
        Ok(path.to_path_buf())
    } else {
        Ok(std::env::current_dir()
            .doing(|| "reading the current directory".to_string())?
            .join(path))
    }
}

/// The config the services get: the user's, with every address replaced by
/// the planned loopback ports, and the partner's certificate files.
fn with_ports(
    config: &LabConfig,
    ports: &Ports,
    tls: &TlsFiles,
    mysql_password: &str,
) -> LabConfig {
    let mut c = config.clone();
    c.service_a.listen = addr(ports.a_http);
    c.service_a.admin_listen = addr(ports.a_admin);
    c.service_a.backend_l4_url = url(ports.slb_l4);
    c.service_a.backend_l7_url = url(ports.slb_l7);
    if let Some((grpc, admin)) = ports.b.first() {
        c.service_b.listen = addr(*grpc);
        c.service_b.admin_listen = addr(*admin);
    }
    c.mysql.url = format!("mysql://lab:{mysql_password}@127.0.0.1:{}/lab", ports.mysql);
    c.etcd.endpoints = vec![url(ports.etcd_client)];
    c.slb.l4_listen = addr(ports.slb_l4);
    c.slb.l7_listen = addr(ports.slb_l7);
    c.slb.stats_listen = addr(ports.slb_stats);
    c.partner.listen = addr(ports.partner_https);
    c.partner.admin_listen = addr(ports.partner_admin);
    c.partner.url = https_url(ports.partner_https);
    c.partner.cert = tls.cert.display().to_string();
    c.partner.key = tls.key.display().to_string();
    c.partner.ca_cert = tls.ca_cert.display().to_string();
    c
}

/// Initialises a private data directory on first use, then returns the
/// server command. Data persists across `up`/`down` in `<state>/mysql/data`.
async fn mysql_command(
    bins: &Binaries,
    state_dir: &Path,
    port: u16,
) -> Result<Command, LaunchError> {
    let dir = state_dir.join("mysql");
    let data = dir.join("data");
    std::fs::create_dir_all(&dir).doing(|| format!("creating {}", dir.display()))?;
    let init_sql = dir.join("init.sql");
    let password = token::ensure_mysql_password(state_dir)
        .doing(|| format!("writing {}", state_dir.join("mysql.password").display()))?;
    token::write_private(&init_sql, init_sql_with_password(&password).as_bytes())
        .doing(|| format!("writing {}", init_sql.display()))?;
    // A private tmpdir: two servers bootstrapping at once in a shared /tmp
    // were seen to delete each other's temporary tables.
    let tmp = dir.join("tmp");
    std::fs::create_dir_all(&tmp).doing(|| format!("creating {}", tmp.display()))?;
    if !data.join("mysql").exists() {
        std::fs::create_dir_all(&data).doing(|| format!("creating {}", data.display()))?;
        let log = state_dir.join("logs").join("mysql-init.log");
        let mut init = match bins.mysql_flavor {
            MysqlFlavor::MariaDb => {
                let tool = procs::find_binary(&["mariadb-install-db", "mysql_install_db"])
                    .ok_or_else(|| procs::missing("mariadb-install-db", &["mariadb-install-db"]))?;
                let mut cmd = tokio::process::Command::new(tool);
                cmd.arg("--no-defaults")
                    .arg(format!("--datadir={}", data.display()))
                    .arg(format!("--tmpdir={}", tmp.display()))
                    .arg("--auth-root-authentication-method=normal")
                    .arg("--skip-test-db");
                cmd
            }
            MysqlFlavor::MySql => {
                let mut cmd = tokio::process::Command::new(&bins.mysqld);
                cmd.arg("--no-defaults")
                    .arg("--initialize-insecure")
                    .arg(format!("--datadir={}", data.display()))
                    .arg(format!("--tmpdir={}", tmp.display()));
                cmd
            }
        };
        if is_root() {
            init.arg("--user=root");
        }
        let output = init
            .output()
            .await
            .doing(|| "initialising the MySQL data directory".to_string())?;
        std::fs::write(
            &log,
            [output.stdout.as_slice(), output.stderr.as_slice()].concat(),
        )
        .doing(|| format!("writing {}", log.display()))?;
        if !output.status.success() {
            return Err(LaunchError::MysqlInit {
                status: output.status,
                tail: procs::tail(&log, 20),
                log,
            });
        }
    }
    let mut cmd = Command::new(&bins.mysqld);
    // --no-defaults must come first: ignore /etc/mysql so the lab's server
    // is private and identical on every machine.
    cmd.arg("--no-defaults")
        .arg(format!("--datadir={}", data.display()))
        .arg(format!("--tmpdir={}", tmp.display()))
        .arg(format!("--socket={}", dir.join("mysqld.sock").display()))
        .arg(format!("--pid-file={}", dir.join("mysqld.pid").display()))
        .arg(format!("--port={port}"))
        .arg("--bind-address=127.0.0.1")
        .arg(format!("--init-file={}", init_sql.display()))
        .arg("--skip-name-resolve")
        .arg("--skip-log-bin")
        .arg("--max-connections=1000")
        .arg("--innodb-buffer-pool-size=128M")
        // Lab data is disposable: do not fsync every commit.
        .arg("--innodb-flush-log-at-trx-commit=2");
    if bins.mysql_flavor == MysqlFlavor::MySql {
        cmd.arg("--mysqlx=OFF");
    }
    if is_root() {
        cmd.arg("--user=root");
    }
    Ok(cmd)
}

/// `deploy/mysql/init.sql` with this lab's password for `lab` instead of
/// the shipped default (compose keeps that one): set on a new user, and on
/// one a data dir made by an earlier lab already has.
fn init_sql_with_password(password: &str) -> String {
    let quoted = format!("IDENTIFIED BY '{password}'");
    let init = MYSQL_INIT_SQL.replace("IDENTIFIED BY 'lab'", &quoted);
    format!("{init}ALTER USER 'lab'@'%' {quoted};\n")
}

/// How often etcd lets a client ping it. A and B ping etcd every second
/// (`ConnectOptions::with_keep_alive`) to notice a frozen or cut-off etcd
/// within two; etcd's default (5 s) answers such a client with GOAWAY
/// `too_many_pings` and breaks its watch every few seconds.
const ETCD_KEEPALIVE_MIN_TIME: &str = "500ms";

/// A single-member etcd. `fresh` wipes its data dir (at `up`: the registry
/// is ephemeral); a restart keeps it, as a real etcd restart would.
fn etcd_command(
    etcd: &Path,
    state_dir: &Path,
    ports: &Ports,
    fresh: bool,
) -> Result<Command, LaunchError> {
    let data = state_dir.join("etcd");
    if fresh && data.exists() {
        std::fs::remove_dir_all(&data).doing(|| format!("removing {}", data.display()))?;
    }
    let client = url(ports.etcd_client);
    let peer = url(ports.etcd_peer);
    let mut cmd = Command::new(etcd);
    cmd.arg("--name=lab")
        .arg(format!("--data-dir={}", data.display()))
        .arg(format!("--listen-client-urls={client}"))
        .arg(format!("--advertise-client-urls={client}"))
        .arg(format!("--listen-peer-urls={peer}"))
        .arg(format!("--initial-advertise-peer-urls={peer}"))
        .arg(format!("--initial-cluster=lab={peer}"))
        .arg("--initial-cluster-state=new")
        .arg(format!(
            "--grpc-keepalive-min-time={ETCD_KEEPALIVE_MIN_TIME}"
        ))
        .env("ETCD_UNSUPPORTED_ARCH", std::env::consts::ARCH);
    Ok(cmd)
}

/// HAProxy with the shared frontends file plus a generated backends file
/// listing every native B.
fn haproxy_command(
    haproxy: &Path,
    state_dir: &Path,
    config: &LabConfig,
    backends: &[SlbServer],
) -> Result<Command, LaunchError> {
    let dir = state_dir.join("haproxy");
    std::fs::create_dir_all(&dir).doing(|| format!("creating {}", dir.display()))?;
    let frontends = dir.join("haproxy.cfg");
    std::fs::write(&frontends, HAPROXY_CFG).doing(|| format!("writing {}", frontends.display()))?;
    let backends_file = dir.join("backends.cfg");
    std::fs::write(&backends_file, backends_cfg(backends, &config.slb))
        .doing(|| format!("writing {}", backends_file.display()))?;
    let mut cmd = Command::new(haproxy);
    cmd.arg("-db")
        .arg("-f")
        .arg(&frontends)
        .arg("-f")
        .arg(&backends_file)
        .env("SLB_L4_BIND", &config.slb.l4_listen)
        .env("SLB_L7_BIND", &config.slb.l7_listen)
        .env("SLB_STATS_BIND", &config.slb.stats_listen)
        .env("SLB_MAXCONN", config.slb.maxconn.to_string());
    Ok(cmd)
}

/// One B as HAProxy's backends list it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SlbServer {
    /// B's gRPC port: where HAProxy sends traffic.
    pub grpc: u16,
    /// B's admin port: where `slb.check = ready` asks for `/readyz`.
    pub admin: u16,
}

/// The recorded B instances, as HAProxy's servers.
fn slb_servers(state: &LabState) -> Vec<SlbServer> {
    state
        .backends()
        .filter_map(|b| {
            Some(SlbServer {
                grpc: port_of(b.grpc_addr.as_deref()?)?,
                admin: port_of(b.admin_url.as_deref()?)?,
            })
        })
        .collect()
}

/// The `b_l4` (tcp) and `b_l7` (h2) backend sections for the given Bs.
/// The l7 backend balances with `slb.balance`; l4 always round robin (its
/// choice is made once per client connection, and A has one). Both check
/// their servers as `slb.check` says: a TCP connect to the gRPC port, or an
/// HTTP/1.1 `GET /readyz` on the admin port that must answer 200.
pub fn backends_cfg(backends: &[SlbServer], slb: &SlbConfig) -> String {
    let check = match slb.check {
        SlbCheck::Tcp => "",
        SlbCheck::Ready => {
            "    option httpchk\n    http-check send meth GET uri /readyz\n    http-check expect status 200\n"
        }
    };
    let check_port = |server: &SlbServer| match slb.check {
        SlbCheck::Tcp => String::new(),
        // The admin listener speaks HTTP/1.1; without check-proto an h2
        // server's check would speak h2 to it.
        SlbCheck::Ready => format!(" port {} check-proto h1", server.admin),
    };
    let mut l4 = format!(
        "# Generated by labctl: one server per native B.\n\nbackend b_l4\n    mode tcp\n    balance roundrobin\n{check}"
    );
    let mut l7 = format!(
        "\nbackend b_l7\n    mode http\n    balance {}\n{check}",
        slb.balance.haproxy_name()
    );
    for (i, server) in backends.iter().enumerate() {
        let n = i + 1;
        let (grpc, port) = (server.grpc, check_port(server));
        l4.push_str(&format!(
            "    server b-{n} 127.0.0.1:{grpc} check inter 1s fall 2 rise 1{port}\n"
        ));
        l7.push_str(&format!(
            "    server b-{n} 127.0.0.1:{grpc} proto h2 check inter 1s fall 2 rise 1{port}\n"
        ));
    }
    l4 + &l7
}

#[cfg(test)]
mod tests {
    use super::*;
    use lab_common::config::SlbBalance;

    /// Two Bs, for the generated backends.
    const SERVERS: [SlbServer; 2] = [
        SlbServer {
            grpc: 5001,
            admin: 9001,
        },
        SlbServer {
            grpc: 5002,
            admin: 9002,
        },
    ];

    #[test]
    fn the_l7_backend_balances_with_slb_balance_and_l4_stays_round_robin() {
        let servers = SERVERS;
        for balance in [SlbBalance::Roundrobin, SlbBalance::Leastconn] {
            let slb = SlbConfig {
                balance,
                ..SlbConfig::default()
            };
            let cfg = backends_cfg(&servers, &slb);
            let (l4, l7) = cfg.split_once("backend b_l7").expect("both sections");
            assert!(l4.contains("balance roundrobin\n"), "{cfg}");
            assert!(
                l7.contains(&format!("balance {}\n", balance.haproxy_name())),
                "{cfg}"
            );
            assert_eq!(l7.matches("proto h2").count(), 2, "{cfg}");
        }
    }

    /// In a drill the file names no switch and no token; the stdin layer
    /// over it gives the services exactly the drill's switches.
    #[test]
    fn a_drill_keeps_the_switches_out_of_the_file_and_hands_them_over_stdin() {
        let drill = DrillSecrets {
            token: AdminToken::new("drill-token-0123456789abcdef"),
            faults: Faults {
                worker: lab_common::config::WorkerMode::Unbounded,
                ..Faults::preset(lab_common::config::Mode::Fixed)
            },
        };
        let mut config = LabConfig {
            faults: drill.faults,
            ..LabConfig::default()
        };
        config.admin.drill_token = drill.token.clone();
        let file = config_file_text(&config, true).expect("file");
        for hidden in [
            "mode",
            "[faults]",
            "unbounded",
            "drill_token",
            "drill-token",
        ] {
            assert!(!file.contains(hidden), "{hidden} in the file:\n{file}");
        }
        assert!(
            config_file_text(&config, false)
                .expect("file")
                .contains("[faults]")
        );

        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("lab.toml");
        std::fs::write(&path, &file).expect("write");
        let loaded = lab_common::config::load(&lab_common::config::Sources {
            file: Some(path),
            stdin: Some(drill.stdin_layer().expect("layer")),
            ..Default::default()
        })
        .expect("the services load it");
        assert_eq!(loaded.faults, drill.faults);
        assert_eq!(loaded.admin.drill_token, drill.token);
    }

    #[test]
    fn slb_check_ready_asks_each_b_admin_port_for_readyz_and_tcp_does_not() {
        let servers = SERVERS;
        let tcp = backends_cfg(&servers, &SlbConfig::default());
        assert!(!tcp.contains("httpchk") && !tcp.contains(" port "), "{tcp}");
        let ready = backends_cfg(
            &servers,
            &SlbConfig {
                check: SlbCheck::Ready,
                ..SlbConfig::default()
            },
        );
        for section in ready.split("\nbackend ").skip(1) {
            assert!(section.contains("option httpchk\n"), "{ready}");
            assert!(
                section.contains("http-check send meth GET uri /readyz\n"),
                "{ready}"
            );
            assert!(
                section.contains("http-check expect status 200\n"),
                "{ready}"
            );
            assert!(
                section.contains("127.0.0.1:5001 ")
                    && section.contains(" port 9001 check-proto h1"),
                "{ready}"
            );
            assert!(section.contains(" port 9002 check-proto h1"), "{ready}");
        }
    }

    #[test]
    fn each_lab_gives_mysql_its_own_password() {
        let sql = init_sql_with_password("0123abcd");
        assert!(!sql.contains("BY 'lab'"), "{sql}");
        // For a new user, and for one an earlier lab's data dir holds.
        assert!(sql.contains("CREATE USER IF NOT EXISTS 'lab'@'%' IDENTIFIED BY '0123abcd';"));
        assert!(
            sql.trim_end()
                .ends_with("ALTER USER 'lab'@'%' IDENTIFIED BY '0123abcd';")
        );
        let ports = Ports::plan(&LabConfig::default(), 1, PortPolicy::Auto).expect("ports");
        let tls = TlsFiles::in_dir(Path::new("/state/tls"));
        let c = with_ports(&LabConfig::default(), &ports, &tls, "0123abcd");
        assert_eq!(
            c.mysql.url,
            format!("mysql://lab:0123abcd@127.0.0.1:{}/lab", ports.mysql)
        );
    }

    #[test]
    fn services_get_the_planned_partner_addresses_and_certificate_files() {
        let ports = Ports::plan(&LabConfig::default(), 2, PortPolicy::Auto).expect("ports");
        let tls = TlsFiles::in_dir(Path::new("/state/tls"));
        let c = with_ports(&LabConfig::default(), &ports, &tls, "pw");
        assert_eq!(c.partner.listen, addr(ports.partner_https));
        assert_eq!(c.partner.admin_listen, addr(ports.partner_admin));
        assert_eq!(
            c.partner.url,
            format!("https://127.0.0.1:{}", ports.partner_https)
        );
        assert_eq!(c.partner.cert, "/state/tls/partner.pem");
        assert_eq!(c.partner.key, "/state/tls/partner.key");
        assert_eq!(c.partner.ca_cert, "/state/tls/ca.pem");
        // The services read it back from the file labctl writes.
        let dir = std::env::temp_dir().join(format!("labctl-with-ports-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("lab.toml");
        std::fs::write(&file, c.to_toml().expect("toml")).expect("write");
        let back = lab_common::config::check_file(&file).expect("valid config");
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(back.partner.url, c.partner.url);
        assert_eq!(back.partner.ca_cert, c.partner.ca_cert);
    }
}
