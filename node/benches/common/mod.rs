//! What the benches that run the real `phm-node` and `phm-coordinator` processes share:
//! the coordinator binary built with the bench's profile, a process's CPU seconds and
//! memory from `/proc`, the JSON log events the processes write, and the DSU's TLS
//! client configuration for a `phm synth` folder.
#![allow(dead_code)]

use anyhow::{Context, Result, anyhow, ensure};
use phm_devkit::launch::{Program, Programs};
use std::path::{Path, PathBuf};

/// The options every process bench takes (flattened into its own).
#[derive(Debug, clap::Args)]
pub struct Processes {
    /// Working folder (replaced). Default: a folder named after the bench in the
    /// system's temporary directory.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the working folder (data, configs, logs) afterwards.
    #[arg(long)]
    pub keep: bool,
    /// `phm-node` to run; default: the one cargo built for this bench.
    #[arg(long, env = "PHM_NODE_BIN")]
    pub node: Option<PathBuf>,
    /// `phm-coordinator` to run; default: built by cargo with this bench's profile.
    #[arg(long, env = "PHM_COORDINATOR_BIN")]
    pub coordinator: Option<PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    pub bench: bool,
}

impl Processes {
    /// The working folder: `--dir`, or `<tmp>/<default_name>`.
    pub fn dir(&self, default_name: &str) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join(default_name))
    }

    /// The node (`--node`, or the `phm-node` cargo built beside this bench) and the
    /// coordinator (`--coordinator`, or built with this bench's profile), both run with
    /// `RUST_LOG=rust_log`.
    pub fn programs(&self, rust_log: &str) -> Result<Programs> {
        let node = self
            .node
            .clone()
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_phm-node")));
        Ok(Programs {
            node: Program::new(node).with_env("RUST_LOG", rust_log),
            coordinator: Program::new(coordinator_binary(self.coordinator.as_deref())?)
                .with_env("RUST_LOG", rust_log),
        })
    }
}

/// The `phm-coordinator` binary: built with the profile this bench was built with, in
/// the same target folder.
pub fn coordinator_binary(chosen: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = chosen {
        return Ok(p.to_path_buf());
    }
    let exe = std::env::current_exe().context("locate the bench binary")?;
    // target/<profile>/deps/<bench>-… → target/<profile>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .ok_or_else(|| anyhow!("unexpected bench binary path {}", exe.display()))?;
    let target_dir = profile_dir
        .parent()
        .ok_or_else(|| anyhow!("unexpected profile folder {}", profile_dir.display()))?;
    let profile = profile_dir
        .file_name()
        .and_then(|s| s.to_str())
        .unwrap_or("release");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = std::process::Command::new(cargo);
    cmd.args(["build", "-p", "phm-coordinator", "--bins"])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    if profile != "debug" {
        cmd.args(["--profile", profile]);
    }
    let status = cmd
        .status()
        .context("run cargo build for phm-coordinator")?;
    ensure!(
        status.success(),
        "cargo build of phm-coordinator failed: {status}"
    );
    let bin = profile_dir.join(format!("phm-coordinator{}", std::env::consts::EXE_SUFFIX));
    ensure!(bin.exists(), "{} missing after the build", bin.display());
    Ok(bin)
}

/// Clock ticks per second (`getconf CLK_TCK`), for `/proc/<pid>/stat`.
pub fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of `pid`, every thread, in seconds.
pub fn cpu_seconds(pid: u32, ticks: f64) -> Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces), from field 3 (state) on.
    let rest = stat
        .rsplit_once(") ")
        .map(|(_, r)| r)
        .ok_or_else(|| anyhow!("unexpected /proc/{pid}/stat"))?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| -> Result<f64> {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .ok_or_else(|| anyhow!("/proc/{pid}/stat has no field {}", i + 3))
    };
    // utime and stime are fields 14 and 15.
    Ok((field(11)? + field(12)?) / ticks)
}

/// A `kB` line of `/proc/<pid>/status` (VmHWM, VmRSS), in MiB.
pub fn status_mib(pid: u32, key: &str) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .ok_or_else(|| anyhow!("/proc/{pid}/status has no {key}"))
}

/// The 1, 5 and 15 minute load averages, as `/proc/loadavg` prints them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Every JSON log line of `path` whose message is `message`, as its fields.
pub fn log_events(path: &Path, message: &str) -> Vec<serde_json::Map<String, serde_json::Value>> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|v| match v.get("fields") {
            Some(serde_json::Value::Object(f)) => Some(f.clone()),
            _ => None,
        })
        .filter(|f| f.get("message").and_then(|m| m.as_str()) == Some(message))
        .collect()
}

/// The DSU's client TLS configuration in a `phm synth` folder.
pub fn channel_tls(dir: &Path) -> Result<tonic::transport::ClientTlsConfig> {
    use tonic::transport::{Certificate, ClientTlsConfig, Identity};
    let read = |p: PathBuf| std::fs::read_to_string(&p).with_context(|| format!("{}", p.display()));
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read(dir.join("certs/ca.pem"))?))
        .identity(Identity::from_pem(
            read(dir.join("certs/dsu-client.pem"))?,
            read(dir.join("certs/dsu-client.key"))?,
        ))
        .domain_name("localhost"))
}

/// The median (NaN when empty).
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Submit `query` to the coordinator at `url` as the DSU of the `phm synth` folder
/// `dir`; the combined result and every progress event.
pub async fn submit(
    url: &str,
    dir: &Path,
    query: phm_proto::proto::AggregateQuery,
) -> Result<(
    phm_proto::proto::CombinedResult,
    Vec<phm_proto::proto::NodeProgress>,
)> {
    use phm_proto::proto::submit_event::Event;
    let channel = tonic::transport::Channel::from_shared(url.to_string())?
        .tls_config(channel_tls(dir)?)?
        .connect()
        .await
        .with_context(|| format!("connect to {url}"))?;
    let mut c =
        phm_proto::proto::coordinator_service_client::CoordinatorServiceClient::new(channel);
    let mut stream = c
        .submit(phm_proto::proto::SubmitRequest { query: Some(query) })
        .await?
        .into_inner();
    let (mut result, mut progress) = (None, Vec::new());
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(Event::Progress(p)) => progress.push(p),
            Some(Event::Result(r)) => result = Some(r),
            None => {}
        }
    }
    let result = result.ok_or_else(|| anyhow!("no result; progress: {progress:?}"))?;
    Ok((result, progress))
}

/// The whole-number option `name` from the command line, or `default`.
pub fn arg(name: &str, default: usize) -> Result<usize> {
    let args: Vec<String> = std::env::args().collect();
    match args.iter().position(|a| a == name) {
        Some(i) => args
            .get(i + 1)
            .ok_or_else(|| anyhow!("{name} needs a value"))?
            .parse()
            .with_context(|| format!("{name} must be a whole number")),
        None => Ok(default),
    }
}
