//! One local-federation launcher, for `phm demo` and the end-to-end tests: start the
//! nodes of a synthetic ICS (a folder `phm synth` wrote) and its coordinator as real
//! processes on loopback ports chosen at run time, wait until each listens, and stop
//! them with SIGTERM (so they drain and flush) or SIGKILL.
//!
//! Ports are chosen by binding port 0, all held until every port is chosen so none
//! repeats, and written into each `node.toml` (`listen`; `metrics_listen` is dropped,
//! since every extra port picked ahead of binding is a chance for parallel runs to
//! collide) and into `coordinator.toml` (`listen`, and each registered node's
//! `endpoint`, keeping only the nodes started).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot find free loopback ports: {0}")]
    Ports(std::io::Error),
    #[error("{path}: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error("cannot create log file {path}: {source}")]
    Log {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {name} ({exe}): {source}")]
    Spawn {
        name: String,
        exe: PathBuf,
        source: std::io::Error,
    },
    #[error("{name} exited before listening on {addr}; end of {}:\n{log}", .log_path.display())]
    Exited {
        name: String,
        addr: String,
        log_path: PathBuf,
        log: String,
    },
    #[error("{name} did not listen on {addr} within {} s; end of {}:\n{log}", .timeout.as_secs(), .log_path.display())]
    Timeout {
        name: String,
        addr: String,
        timeout: Duration,
        log_path: PathBuf,
        log: String,
    },
}

/// How to run one role: an executable, the arguments before `--config FILE` (`phm node`
/// in the demo, `phm-node` in the tests) and environment variables to set for it on top
/// of this process's own (e.g. `RUST_LOG` for a benchmark that reads debug timings).
#[derive(Debug, Clone)]
pub struct Program {
    pub exe: PathBuf,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

impl Program {
    pub fn new(exe: impl Into<PathBuf>) -> Program {
        Program {
            exe: exe.into(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }

    /// `exe sub --config FILE`.
    pub fn subcommand(exe: impl Into<PathBuf>, sub: &str) -> Program {
        Program {
            exe: exe.into(),
            args: vec![sub.to_string()],
            env: Vec::new(),
        }
    }

    /// The same program with `key=value` in its environment.
    pub fn with_env(mut self, key: &str, value: &str) -> Program {
        self.env.push((key.to_string(), value.to_string()));
        self
    }
}

/// The programs for the two roles.
#[derive(Debug, Clone)]
pub struct Programs {
    pub node: Program,
    pub coordinator: Program,
}

/// A running child process, killed on drop; its stdout and stderr go to `log`.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    /// Start `program --config config`, logging to `log`.
    pub fn spawn(
        name: &str,
        program: &Program,
        config: &Path,
        log: PathBuf,
    ) -> Result<Proc, LaunchError> {
        let mut cmd = Command::new(&program.exe);
        cmd.args(&program.args).arg("--config").arg(config);
        cmd.envs(program.env.iter().map(|(k, v)| (k, v)));
        Self::spawn_command(name, cmd, log)
    }

    /// Start an arbitrary command (e.g. a shell that execs a node with some signals
    /// ignored), logging to `log`.
    pub fn spawn_command(name: &str, mut cmd: Command, log: PathBuf) -> Result<Proc, LaunchError> {
        let log_err = |source| LaunchError::Log {
            path: log.clone(),
            source,
        };
        let file = std::fs::File::create(&log).map_err(log_err)?;
        let err = file.try_clone().map_err(log_err)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                name: name.to_string(),
                exe: PathBuf::from(cmd.get_program()),
                source,
            })?;
        Ok(Proc {
            name: name.to_string(),
            child,
            log,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send `sig` (e.g. "TERM", "KILL", "STOP") with `kill(1)`: the workspace forbids
    /// unsafe code, and this is the one place that signals.
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }

    /// SIGKILL, then reap.
    pub fn kill9(&mut self) {
        self.signal("KILL");
        let _ = self.child.wait();
    }

    /// Wait up to `timeout` for the process to exit by itself; its exit code if it did
    /// (`Some(None)`: killed by a signal), `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<Option<i32>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code());
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGTERM and wait up to `timeout` for a clean exit; returns the exit code, or
    /// `None` when it had to be killed.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        self.signal("TERM");
        match self.wait_exit(timeout) {
            Some(code) => code,
            None => {
                self.kill9();
                None
            }
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The last `lines` lines of the log, indented, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = self.log_text();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..]
            .iter()
            .map(|l| format!("    | {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Wait until `addr` accepts TCP connections; fails, with the end of the log, if
    /// the process exits first or takes longer than `timeout`.
    pub fn wait_listening(&mut self, addr: &str, timeout: Duration) -> Result<(), LaunchError> {
        let deadline = Instant::now() + timeout;
        loop {
            if std::net::TcpStream::connect(addr).is_ok() {
                return Ok(());
            }
            if !self.is_running() {
                return Err(LaunchError::Exited {
                    name: self.name.clone(),
                    addr: addr.to_string(),
                    log_path: self.log.clone(),
                    log: self.log_tail(30),
                });
            }
            if Instant::now() > deadline {
                return Err(LaunchError::Timeout {
                    name: self.name.clone(),
                    addr: addr.to_string(),
                    timeout,
                    log_path: self.log.clone(),
                    log: self.log_tail(30),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.is_running() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Distinct free loopback ports.
pub fn free_ports(n: usize) -> Result<Vec<u16>, LaunchError> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<Result<_, _>>()
        .map_err(LaunchError::Ports)?;
    listeners
        .iter()
        .map(|l| l.local_addr().map(|a| a.port()).map_err(LaunchError::Ports))
        .collect()
}

fn read_table(path: &Path) -> Result<toml::Table, LaunchError> {
    let err = |reason: String| LaunchError::Config {
        path: path.to_path_buf(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
    text.parse()
        .map_err(|e: toml::de::Error| err(e.to_string()))
}

/// Rewrite a TOML file in place with `edit`.
pub fn edit_toml(path: &Path, edit: impl FnOnce(&mut toml::Table)) -> Result<(), LaunchError> {
    let mut t = read_table(path)?;
    edit(&mut t);
    let text = toml::to_string(&t).map_err(|e| LaunchError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(|e| LaunchError::Config {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// A node of the federation, running.
#[derive(Debug)]
pub struct RunningNode {
    /// ODS code (the organisation's folder name).
    pub id: String,
    pub config: PathBuf,
    /// `127.0.0.1:PORT`.
    pub addr: String,
    pub proc: Proc,
}

impl RunningNode {
    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }
}

/// The coordinator, running.
#[derive(Debug)]
pub struct RunningCoordinator {
    pub config: PathBuf,
    pub addr: String,
    pub proc: Proc,
}

impl RunningCoordinator {
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Launch {
    /// The synthetic ICS folder (`DIR/<ODS>/node.toml`, `DIR/coordinator/coordinator.toml`).
    pub root: PathBuf,
    pub programs: Programs,
    /// Organisation folders to start, in order.
    pub nodes: Vec<String>,
    pub with_coordinator: bool,
    /// Where logs go (`<ODS>.log`, `coordinator.log`).
    pub logs: PathBuf,
    /// How long each process may take to listen.
    pub timeout: Duration,
}

/// A running federation. Dropping it kills every process; [`Federation::stop`]
/// stops them cleanly.
#[derive(Debug)]
pub struct Federation {
    pub root: PathBuf,
    pub programs: Programs,
    pub nodes: Vec<RunningNode>,
    pub coordinator: Option<RunningCoordinator>,
}

/// Organisation folders of a synthetic ICS (those holding a `node.toml`), sorted.
pub fn organisations(root: &Path) -> Vec<String> {
    let mut ids: Vec<String> = std::fs::read_dir(root)
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter(|e| e.path().join("node.toml").exists())
                .filter_map(|e| e.file_name().to_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    ids.sort();
    ids
}

impl Federation {
    /// Start the nodes, wait until each listens, then the coordinator registering
    /// exactly those nodes.
    pub fn launch(l: &Launch) -> Result<Federation, LaunchError> {
        std::fs::create_dir_all(&l.logs).map_err(|source| LaunchError::Log {
            path: l.logs.clone(),
            source,
        })?;
        let ports = free_ports(l.nodes.len() + 1)?;
        let mut nodes = Vec::with_capacity(l.nodes.len());
        for (id, port) in l.nodes.iter().zip(&ports[1..]) {
            let config = l.root.join(id).join("node.toml");
            let addr = format!("127.0.0.1:{port}");
            edit_toml(&config, |t| {
                t.insert("listen".into(), addr.clone().into());
                t.remove("metrics_listen");
            })?;
            let proc = Proc::spawn(
                id,
                &l.programs.node,
                &config,
                l.logs.join(format!("{id}.log")),
            )?;
            nodes.push(RunningNode {
                id: id.clone(),
                config,
                addr,
                proc,
            });
        }
        let mut fed = Federation {
            root: l.root.clone(),
            programs: l.programs.clone(),
            nodes,
            coordinator: None,
        };
        for n in &mut fed.nodes {
            n.proc.wait_listening(&n.addr, l.timeout)?;
        }
        if l.with_coordinator {
            let config = l.root.join("coordinator").join("coordinator.toml");
            let addr = format!("127.0.0.1:{}", ports[0]);
            let endpoints: BTreeMap<&str, String> = fed
                .nodes
                .iter()
                .map(|n| (n.id.as_str(), n.endpoint()))
                .collect();
            edit_toml(&config, |t| register(t, &addr, &endpoints))?;
            let mut proc = Proc::spawn(
                "coordinator",
                &l.programs.coordinator,
                &config,
                l.logs.join("coordinator.log"),
            )?;
            proc.wait_listening(&addr, l.timeout)?;
            fed.coordinator = Some(RunningCoordinator { config, addr, proc });
        }
        Ok(fed)
    }

    /// Every process, nodes first.
    pub fn procs_mut(&mut self) -> impl Iterator<Item = &mut Proc> {
        self.nodes
            .iter_mut()
            .map(|n| &mut n.proc)
            .chain(self.coordinator.as_mut().map(|c| &mut c.proc))
    }

    /// SIGTERM every process (they drain and flush), wait up to `timeout` for each,
    /// SIGKILL any that hang. Returns (stopped cleanly, killed or failed).
    pub fn stop(&mut self, timeout: Duration) -> (usize, usize) {
        for p in self.procs_mut() {
            if p.is_running() {
                p.signal("TERM");
            }
        }
        let (mut clean, mut killed) = (0, 0);
        for p in self.procs_mut() {
            match p.wait_exit(timeout) {
                Some(Some(0)) => clean += 1,
                Some(_) => killed += 1,
                None => {
                    p.kill9();
                    killed += 1;
                }
            }
        }
        (clean, killed)
    }
}

/// Point `coordinator.toml` at `addr` and at the started nodes only.
fn register(t: &mut toml::Table, addr: &str, endpoints: &BTreeMap<&str, String>) {
    t.insert("listen".into(), addr.into());
    if let Some(toml::Value::Array(list)) = t.get_mut("nodes") {
        list.retain(|n| {
            n.get("id")
                .and_then(toml::Value::as_str)
                .is_some_and(|id| endpoints.contains_key(id))
        });
        for n in list.iter_mut() {
            let id = n
                .get("id")
                .and_then(toml::Value::as_str)
                .unwrap_or_default()
                .to_string();
            if let (Some(tbl), Some(e)) = (n.as_table_mut(), endpoints.get(id.as_str())) {
                tbl.insert("endpoint".into(), e.clone().into());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_coordinator_registers_only_the_started_nodes_at_their_ports() {
        let mut t: toml::Table = r#"
            listen = "127.0.0.1:1"
            [[nodes]]
            id = "A"
            endpoint = "https://127.0.0.1:2"
            [[nodes]]
            id = "B"
            endpoint = "https://127.0.0.1:3"
        "#
        .parse()
        .unwrap();
        let endpoints = BTreeMap::from([("B", "https://127.0.0.1:9".to_string())]);
        register(&mut t, "127.0.0.1:8", &endpoints);
        assert_eq!(t["listen"].as_str(), Some("127.0.0.1:8"));
        let nodes = t["nodes"].as_array().unwrap();
        assert_eq!(nodes.len(), 1);
        assert_eq!(nodes[0]["id"].as_str(), Some("B"));
        assert_eq!(nodes[0]["endpoint"].as_str(), Some("https://127.0.0.1:9"));
    }

    #[test]
    fn free_ports_are_distinct() {
        let p = free_ports(20).unwrap();
        let set: std::collections::BTreeSet<_> = p.iter().collect();
        assert_eq!(set.len(), 20);
    }
}
