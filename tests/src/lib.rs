//! Harness for the end-to-end tests: builds and finds the real binaries, synthesises a
//! small ICS, and starts nodes and a coordinator as real processes on loopback ports
//! chosen at run time, with the certificates `phm synth` generated for the test.

use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub mod client;

/// Paths of the three real binaries, built once per test run.
#[derive(Debug)]
pub struct Bins {
    pub phm: PathBuf,
    pub node: PathBuf,
    pub coordinator: PathBuf,
}

/// The federation id `phm synth` writes (`phm::synth::FEDERATION_ID`); test requesters
/// sign for it.
pub const FEDERATION_ID: &str = "synthetic-ics";

/// Build (if needed) and locate `phm`, `phm-node` and `phm-coordinator` in the same
/// target directory as this test binary, so `cargo test --workspace` alone suffices.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| match build_bins() {
        Ok(b) => b,
        Err(e) => panic!("cannot build the binaries under test: {e:#}"),
    })
}

fn build_bins() -> Result<Bins> {
    let exe = std::env::current_exe().context("locate test binary")?;
    // target/<profile>/deps/e2e-… → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected test binary path {}", exe.display()))?
        .to_path_buf();
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| anyhow!("unexpected profile dir {}", profile_dir.display()))?;
    let profile = profile_dir
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("debug");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    // The same selection `cargo test --workspace` builds (every target, dev-dependencies
    // on), so features unify the same way and the binaries it just built are fresh:
    // building only `-p phm -p phm-node -p phm-coordinator --bins` resolves features
    // differently, recompiles rustls, tonic and friends and relinks every binary, in
    // every test run, and the next `cargo test` undoes it again.
    cmd.args(["build", "--workspace", "--all-targets"])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile != "debug" {
        cmd.args(["--profile", profile]);
    }
    let status = cmd.status().context("run cargo build for the binaries")?;
    if !status.success() {
        bail!("cargo build of the binaries failed: {status}");
    }
    let bin = |n: &str| profile_dir.join(format!("{n}{}", std::env::consts::EXE_SUFFIX));
    let b = Bins {
        phm: bin("phm"),
        node: bin("phm-node"),
        coordinator: bin("phm-coordinator"),
    };
    for p in [&b.phm, &b.node, &b.coordinator] {
        if !p.exists() {
            bail!("binary {} missing after build", p.display());
        }
    }
    Ok(b)
}

/// A loopback port free at the time of asking.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// Run `phm` with arguments; returns (exit code, stdout, stderr).
pub fn phm(args: &[&str]) -> (i32, String, String) {
    run(&bins().phm, args)
}

pub fn run(bin: &Path, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", bin.display()));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A synthetic ICS on disk (`phm synth`), in a temporary folder removed on drop.
pub struct Ics {
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
}

impl Ics {
    pub fn synth(population: u32, seed: u64) -> Ics {
        let tmp = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let root = tmp.path().join("ics");
        let (code, out, err) = phm(&[
            "synth",
            "--out",
            &root.display().to_string(),
            "--population",
            &population.to_string(),
            "--seed",
            &seed.to_string(),
        ]);
        assert_eq!(code, 0, "phm synth failed:\n{out}\n{err}");
        Ics { _tmp: tmp, root }
    }

    /// Every node config the synthesis wrote, sorted by organisation folder.
    pub fn node_configs(&self) -> Vec<PathBuf> {
        let mut v: Vec<PathBuf> = std::fs::read_dir(&self.root)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .map(|e| e.path().join("node.toml"))
                    .filter(|p| p.exists())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn coordinator_config(&self) -> PathBuf {
        self.root.join("coordinator").join("coordinator.toml")
    }

    pub fn certs(&self) -> PathBuf {
        self.root.join("certs")
    }

    pub fn key(&self, requester: &str) -> PathBuf {
        self.root.join("keys").join(format!("{requester}.key"))
    }
}

use phm_devkit::launch::{Launch, Program, Programs};
pub use phm_devkit::launch::{Proc, RunningCoordinator, RunningNode};

/// How long a process may take to listen before a test fails.
const LISTEN_TIMEOUT: Duration = Duration::from_secs(120);

/// Start `bin args…`, logging to `log` (a test failure if it cannot start).
pub fn spawn(name: &str, bin: &Path, args: &[&str], log: PathBuf) -> Proc {
    let mut cmd = Command::new(bin);
    cmd.args(args);
    Proc::spawn_command(name, cmd, log).unwrap_or_else(|e| panic!("{e}"))
}

/// Wait until `addr` accepts TCP connections; panic with the process's log if it exits
/// first or takes more than 120 s.
pub fn wait_listening(addr: &str, proc: &mut Proc) {
    proc.wait_listening(addr, LISTEN_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}"));
}

/// Poll `f` until it returns `Some`, or fail after `timeout` with `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        if Instant::now() > deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Rewrite a TOML file in place with `edit`.
pub fn edit_toml(path: &Path, edit: impl FnOnce(&mut toml::Table)) {
    phm_devkit::launch::edit_toml(path, edit).unwrap_or_else(|e| panic!("{e}"));
}

/// A running federation: nodes and (optionally) a coordinator, on free loopback ports,
/// started by the launcher `phm demo` uses.
pub struct Federation {
    pub ics: Ics,
    pub nodes: Vec<RunningNode>,
    pub coordinator: Option<RunningCoordinator>,
}

/// The binaries under test, as the launcher runs them.
fn programs() -> Programs {
    Programs {
        node: Program::new(&bins().node),
        coordinator: Program::new(&bins().coordinator),
    }
}

/// What a test does to a node or the coordinator beyond the launcher's start and stop.
pub trait Restart {
    /// Start the same process again (after a kill) on the same port.
    fn restart(&mut self) {
        self.restart_with_env(&[]);
    }

    /// Stop the process (if running) and start it again on the same port with `env`
    /// on top of this process's (e.g. FAILPOINTS, to hold a node at one step of a
    /// secure session).
    fn restart_with_env(&mut self, env: &[(&str, &str)]);
}

/// Kill `proc` if it is still running, then start `program` in its place.
fn respawn(
    proc: &mut Proc,
    name: &str,
    program: Program,
    env: &[(&str, &str)],
    config: &Path,
    addr: &str,
) {
    // Only a child not yet reaped: a reaped one's pid may belong to another process.
    if matches!(proc.child.try_wait(), Ok(None)) {
        proc.kill9();
    }
    let program = env.iter().fold(program, |p, (k, v)| p.with_env(k, v));
    let log = proc.log.with_extension("restart.log");
    *proc = Proc::spawn(name, &program, config, log).unwrap_or_else(|e| panic!("{e}"));
    wait_listening(addr, proc);
}

impl Restart for RunningNode {
    fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        respawn(
            &mut self.proc,
            &self.id,
            programs().node,
            env,
            &self.config,
            &self.addr,
        );
    }
}

impl Restart for RunningCoordinator {
    fn restart_with_env(&mut self, env: &[(&str, &str)]) {
        respawn(
            &mut self.proc,
            "coordinator",
            programs().coordinator,
            env,
            &self.config,
            &self.addr,
        );
    }
}

impl Federation {
    /// Synthesise an ICS and start `max_nodes` of its nodes (all when `None`), with
    /// a coordinator registering exactly the started nodes.
    pub fn start(population: u32, seed: u64, max_nodes: Option<usize>) -> Federation {
        let ics = Ics::synth(population, seed);
        Self::start_in(ics, max_nodes, true)
    }

    pub fn start_in(ics: Ics, max_nodes: Option<usize>, with_coordinator: bool) -> Federation {
        let mut ids = phm_devkit::launch::organisations(&ics.root);
        if let Some(n) = max_nodes {
            ids.truncate(n);
        }
        Self::start_nodes(ics, &ids, with_coordinator)
    }

    /// Start exactly the nodes whose organisation folders are `ids` (in that order),
    /// and a coordinator registering only them when `with_coordinator`.
    pub fn start_nodes(ics: Ics, ids: &[String], with_coordinator: bool) -> Federation {
        Self::launch(ics, ids, with_coordinator, programs())
    }

    /// Exactly the nodes `ids` and a coordinator, each node given `env` on top of this
    /// process's (e.g. the variable a policy's `dsn_env` names).
    pub fn start_nodes_with_env(ics: Ics, ids: &[String], env: &[(&str, &str)]) -> Federation {
        let mut p = programs();
        for (k, v) in env {
            p.node = p.node.with_env(k, v);
        }
        Self::launch(ics, ids, true, p)
    }

    /// Every node and the coordinator, each process given `env` on top of this one's
    /// (e.g. `RUST_LOG`, for a test that acts on a debug event in a node's log).
    pub fn start_with_env(ics: Ics, env: &[(&str, &str)]) -> Federation {
        let ids = phm_devkit::launch::organisations(&ics.root);
        let mut p = programs();
        for (k, v) in env {
            p.node = p.node.with_env(k, v);
            p.coordinator = p.coordinator.with_env(k, v);
        }
        Self::launch(ics, &ids, true, p)
    }

    fn launch(ics: Ics, ids: &[String], with_coordinator: bool, programs: Programs) -> Federation {
        let launch = Launch {
            root: ics.root.clone(),
            programs,
            nodes: ids.to_vec(),
            with_coordinator,
            logs: ics.root.join("logs"),
            timeout: LISTEN_TIMEOUT,
        };
        let fed = phm_devkit::launch::Federation::launch(&launch)
            .unwrap_or_else(|e| panic!("cannot start the federation: {e}"));
        Federation {
            ics,
            nodes: fed.nodes,
            coordinator: fed.coordinator,
        }
    }

    pub fn node(&mut self, id: &str) -> &mut RunningNode {
        self.nodes
            .iter_mut()
            .find(|n| n.id == id)
            .unwrap_or_else(|| panic!("no node {id}"))
    }

    /// `phm query --format json` through this federation's coordinator, signed with the
    /// requester `key`'s key over the DSU's client certificate, with `extra` arguments
    /// (purpose, ε, `--secure` …) before `sql`. Exit code 4 (every partner refused) is
    /// an answer too: the JSON says who refused and why.
    pub fn query_json(&self, key: &str, extra: &[&str], sql: &str) -> serde_json::Value {
        let certs = self.ics.certs();
        let s = |p: PathBuf| p.display().to_string();
        let (key, ca, cert, cert_key) = (
            s(self.ics.key(key)),
            s(certs.join("ca.pem")),
            s(certs.join("dsu-client.pem")),
            s(certs.join("dsu-client.key")),
        );
        let url = self.coordinator_url();
        let mut args = vec![
            "query",
            "--coordinator",
            &url,
            "--federation",
            FEDERATION_ID,
            "--key",
            &key,
            "--format",
            "json",
            "--ca",
            &ca,
            "--cert",
            &cert,
            "--cert-key",
            &cert_key,
        ];
        args.extend_from_slice(extra);
        args.push(sql);
        let (code, out, err) = phm(&args);
        assert!(
            code == 0 || code == 4,
            "phm query failed for {sql} (exit {code}):\n{out}\n{err}"
        );
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("phm query --format json: {e}\n{out}"))
    }

    pub fn coordinator_url(&self) -> String {
        self.coordinator
            .as_ref()
            .map(RunningCoordinator::url)
            .unwrap_or_else(|| panic!("federation started without a coordinator"))
    }
}

impl Ics {
    /// `DIR/<id>/node.toml`.
    pub fn node_config(&self, id: &str) -> PathBuf {
        self.root.join(id).join("node.toml")
    }

    /// `DIR/<id>/policy.toml`.
    pub fn policy_path(&self, id: &str) -> PathBuf {
        self.root.join(id).join("policy.toml")
    }

    /// Organisation folders whose policy exposes `dataset`, sorted.
    pub fn nodes_serving(&self, dataset: &str) -> Vec<String> {
        self.node_configs()
            .iter()
            .filter_map(|c| {
                let dir = c.parent()?;
                let policy = read_toml(&dir.join("policy.toml"));
                let serves = policy
                    .get("datasets")
                    .and_then(toml::Value::as_array)
                    .is_some_and(|ds| {
                        ds.iter()
                            .any(|d| d.get("name").and_then(toml::Value::as_str) == Some(dataset))
                    });
                serves.then(|| dir.file_name()?.to_str().map(str::to_string))?
            })
            .collect()
    }
}

/// Parse a TOML file, panicking with its path on failure (test set-up only).
pub fn read_toml(path: &Path) -> toml::Table {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.parse()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `phm audit verify --data-dir DIR`; returns (exit code, stdout + stderr).
pub fn audit_verify(data_dir: &Path) -> (i32, String) {
    let (code, out, err) = phm(&[
        "audit",
        "verify",
        "--data-dir",
        &data_dir.display().to_string(),
    ]);
    (code, format!("{out}{err}"))
}

/// `phm demo` with `flags` (and `--population 4000 --nodes N`) in `dir`, with `env` set;
/// panics with its output unless it succeeds. Returns stdout.
pub fn demo(flags: &[&str], nodes: u32, dir: &Path, env: &[(&str, &str)]) -> String {
    let mut cmd = std::process::Command::new(&bins().phm);
    cmd.arg("demo")
        .args(flags)
        .args([
            "--population",
            "4000",
            "--nodes",
            &nodes.to_string(),
            "--dir",
        ])
        .arg(dir);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = match cmd.output() {
        Ok(out) => out,
        Err(e) => panic!("cannot run phm demo: {e}"),
    };
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "phm demo {flags:?} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

/// How a start attempt ended.
#[derive(Debug)]
pub enum StartOutcome {
    /// The process is listening (and now owned by the `RunningNode`).
    Listening,
    /// The process exited before listening, with this code and log.
    Exited { code: Option<i32>, log: String },
}

/// A node's files, and the restarts fault tests need.
pub trait NodeExt {
    /// The node's state folder (ledger, release cache, audit log).
    fn data_dir(&self) -> PathBuf;
    /// The node's policy file.
    fn policy_path(&self) -> PathBuf;
    /// Start the node again and report whether it came up or exited (and why), for
    /// tests that damage its files first. Waits up to `timeout`.
    fn try_restart(&mut self, timeout: Duration) -> StartOutcome;
    /// Restart the node with these signals ignored (an ignored disposition survives
    /// exec), e.g. `XFSZ` so that exceeding a file-size limit fails the write with
    /// EFBIG instead of killing the process. The shell execs the node, so the pid is
    /// the node's own.
    fn restart_ignoring_signals(&mut self, signals: &[&str]);
}

impl NodeExt for RunningNode {
    fn data_dir(&self) -> PathBuf {
        self.config
            .parent()
            .map(|p| p.join("state"))
            .unwrap_or_default()
    }

    fn policy_path(&self) -> PathBuf {
        self.config
            .parent()
            .map(|p| p.join("policy.toml"))
            .unwrap_or_default()
    }

    fn try_restart(&mut self, timeout: Duration) -> StartOutcome {
        let log = self.proc.log.with_extension("try.log");
        let mut proc = spawn(
            &self.id,
            &bins().node,
            &["--config", &self.config.display().to_string()],
            log,
        );
        match proc.wait_listening(&self.addr, timeout) {
            Ok(()) => {
                self.proc = proc;
                StartOutcome::Listening
            }
            Err(_) => {
                let code = proc.child.try_wait().ok().flatten().and_then(|s| s.code());
                let log = proc.log_text();
                proc.kill9();
                StartOutcome::Exited { code, log }
            }
        }
    }

    fn restart_ignoring_signals(&mut self, signals: &[&str]) {
        let log = self.proc.log.with_extension("restart.log");
        let script = format!("trap '' {}; exec \"$0\" \"$@\"", signals.join(" "));
        let node = bins().node.display().to_string();
        let config = self.config.display().to_string();
        self.proc = spawn(
            &self.id,
            Path::new("/bin/sh"),
            &["-c", &script, &node, "--config", &config],
            log,
        );
        wait_listening(&self.addr, &mut self.proc);
    }
}

/// Set the budget (total epsilon per period and per-query cap) of requester or
/// project `id` in a policy file; `section` is "requesters" or "projects". Also lifts
/// the node-wide per-query cap to at least `per_query_cap`, so the test controls the
/// limit it is about. Panics if `id` is not in the file.
pub fn set_budget(policy: &Path, section: &str, id: &str, epsilon: f64, per_query_cap: f64) {
    let mut found = false;
    edit_toml(policy, |t| {
        if let Some(toml::Value::Array(list)) = t.get_mut(section) {
            for entry in list
                .iter_mut()
                .filter(|e| e.get("id").and_then(toml::Value::as_str) == Some(id))
            {
                if let Some(b) = entry.get_mut("budget").and_then(toml::Value::as_table_mut) {
                    b.insert("epsilon".into(), epsilon.into());
                    b.insert("per_query_cap".into(), per_query_cap.into());
                    found = true;
                }
            }
        }
        let release = t
            .entry("release")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(r) = release.as_table_mut() {
            let cap = r
                .get("per_query_epsilon_cap")
                .and_then(toml::Value::as_float)
                .unwrap_or(1.0);
            if cap < per_query_cap {
                r.insert("per_query_epsilon_cap".into(), per_query_cap.into());
            }
        }
    });
    assert!(
        found,
        "{}: no {section} entry {id:?} with a budget",
        policy.display()
    );
}
