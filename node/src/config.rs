//! node.toml: what a node runs with (policy file, state folder, listen addresses, TLS
//! material, limits), parsed strictly and resolved against the config file's folder.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// Field documentation shown by `phm-node --help`; kept next to the types it describes.
pub const CONFIG_HELP: &str = "\
node.toml fields (paths are relative to the config file's folder unless absolute):

  policy = \"policy.toml\"            IG policy file. Invalid at start-up: the node does not
                                    start. Edited while running: reloaded within a second (or
                                    on SIGHUP); an invalid edit is refused and logged, and the
                                    policy in force stays.
  data_dir = \"state\"                Folder for the sled database (budget ledger, release
                                    cache, nonces) and audit.log (hash-chained JSON lines).
                                    Created if missing.
  listen = \"127.0.0.1:50051\"        gRPC address (phm.v1.NodeService, grpc.health.v1,
                                    reflection). Mutual TLS only.
  metrics_listen = \"127.0.0.1:9101\" Optional. Prometheus text on GET /metrics (plain HTTP).
  log_format = \"human\"              \"human\" or \"json\" (--log-format overrides it).

  [tls]
  cert = \"certs/A81001.pem\"         The node's server certificate chain (PEM).
  key = \"certs/A81001.key\"          Its private key (PEM).
  client_ca = \"certs/ca.pem\"        CA that every client certificate must chain to; clients
                                    without a certificate are refused.

  [limits]                          All optional; the values shown are the defaults.
  max_message_bytes = 4194304       Largest request message accepted.
  max_concurrent_queries = 32       Queries running at once; more are refused at once with
                                    OVERLOADED (RESOURCE_EXHAUSTED), never queued.
  query_deadline_ms = 30000         A query not answered within this is refused as
                                    UNAVAILABLE; budget already spent stays spent and the
                                    answer, once ready, is served to a retry of the same
                                    signed query from the release cache.
  storage_timeout_ms = 15000        A ledger, release-cache or audit-log write not finished
                                    within this means the disk has failed: the node stops
                                    (exit code 1) rather than run unable to record spends.

Signals: SIGHUP reloads the policy now; SIGTERM or Ctrl-C stops accepting, lets running
queries finish (bounded by query_deadline_ms), flushes the ledger and audit log, exits 0.";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    policy: PathBuf,
    data_dir: PathBuf,
    listen: String,
    #[serde(default)]
    metrics_listen: Option<String>,
    #[serde(default)]
    log_format: LogFormat,
    tls: RawTls,
    #[serde(default)]
    limits: Limits,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

/// Operational limits of the gRPC server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_concurrent_queries: usize,
    pub query_deadline_ms: u64,
    pub storage_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_queries: 32,
            query_deadline_ms: 30_000,
            storage_timeout_ms: 15_000,
        }
    }
}

/// TLS material, paths resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
}

/// A validated node configuration with absolute (or config-relative resolved) paths.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// Where the configuration was read from (for messages).
    pub source: PathBuf,
    pub policy: PathBuf,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub tls: TlsFiles,
    pub limits: Limits,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config file {path}: field `{field}`: {reason}")]
    Field {
        path: PathBuf,
        field: &'static str,
        reason: String,
    },
}

fn parse_addr(path: &Path, field: &'static str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse().map_err(|e| ConfigError::Field {
        path: path.to_path_buf(),
        field,
        reason: format!("{s:?} is not an IP address and port such as \"127.0.0.1:50051\" ({e})"),
    })
}

fn resolve(base: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base.join(p)
    }
}

impl NodeConfig {
    /// Read and validate a node.toml.
    pub fn load(path: &Path) -> Result<NodeConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(path, &text)
    }

    /// Validate config text as if read from `path` (relative paths resolve against
    /// `path`'s folder).
    pub fn parse(path: &Path, text: &str) -> Result<NodeConfig, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let location = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!("line {line}: ")
                })
                .unwrap_or_default();
            ConfigError::Parse {
                path: path.to_path_buf(),
                message: format!("{location}{}", e.message()),
            }
        })?;
        let field = |field: &'static str, reason: &str| ConfigError::Field {
            path: path.to_path_buf(),
            field,
            reason: reason.to_string(),
        };
        let base = path
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let listen = parse_addr(path, "listen", &raw.listen)?;
        let metrics_listen = raw
            .metrics_listen
            .as_deref()
            .map(|s| parse_addr(path, "metrics_listen", s))
            .transpose()?;
        if metrics_listen == Some(listen) && listen.port() != 0 {
            return Err(field(
                "metrics_listen",
                "must differ from `listen` (metrics are served on their own port)",
            ));
        }
        for (name, p) in [
            ("policy", &raw.policy),
            ("data_dir", &raw.data_dir),
            ("tls.cert", &raw.tls.cert),
            ("tls.key", &raw.tls.key),
            ("tls.client_ca", &raw.tls.client_ca),
        ] {
            if p.as_os_str().is_empty() {
                return Err(field(name, "is empty; give a path"));
            }
        }
        let limits = raw.limits;
        if limits.max_message_bytes < 1024 {
            return Err(field(
                "limits.max_message_bytes",
                "must be at least 1024 bytes",
            ));
        }
        if limits.max_concurrent_queries == 0 {
            return Err(field(
                "limits.max_concurrent_queries",
                "must be at least 1 (0 would refuse every query)",
            ));
        }
        if limits.max_concurrent_queries > 100_000 {
            return Err(field(
                "limits.max_concurrent_queries",
                "must be at most 100000",
            ));
        }
        if limits.query_deadline_ms == 0 {
            return Err(field(
                "limits.query_deadline_ms",
                "must be at least 1 millisecond",
            ));
        }
        if limits.storage_timeout_ms < 100 {
            return Err(field(
                "limits.storage_timeout_ms",
                "must be at least 100 milliseconds (an fsync can take that long on a busy disk)",
            ));
        }
        Ok(NodeConfig {
            source: path.to_path_buf(),
            policy: resolve(base, &raw.policy),
            data_dir: resolve(base, &raw.data_dir),
            listen,
            metrics_listen,
            log_format: raw.log_format,
            tls: TlsFiles {
                cert: resolve(base, &raw.tls.cert),
                key: resolve(base, &raw.tls.key),
                client_ca: resolve(base, &raw.tls.client_ca),
            },
            limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
policy = "policy.toml"
data_dir = "state"
listen = "127.0.0.1:50051"
metrics_listen = "127.0.0.1:9101"
log_format = "json"
[tls]
cert = "certs/A81001.pem"
key = "/abs/A81001.key"
client_ca = "certs/ca.pem"
[limits]
max_concurrent_queries = 4
"#;

    #[test]
    fn parses_and_resolves_relative_paths() {
        let c = NodeConfig::parse(Path::new("/etc/phm/node.toml"), GOOD).unwrap();
        assert_eq!(c.policy, Path::new("/etc/phm/policy.toml"));
        assert_eq!(c.data_dir, Path::new("/etc/phm/state"));
        assert_eq!(c.tls.cert, Path::new("/etc/phm/certs/A81001.pem"));
        assert_eq!(c.tls.key, Path::new("/abs/A81001.key"));
        assert_eq!(c.log_format, LogFormat::Json);
        assert_eq!(c.limits.max_concurrent_queries, 4);
        assert_eq!(c.limits.query_deadline_ms, 30_000);
        assert_eq!(c.limits.storage_timeout_ms, 15_000);
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9101".parse().unwrap()));
    }

    #[test]
    fn unknown_field_is_refused_by_name() {
        let text = GOOD.replace("log_format", "log_fromat");
        let e = NodeConfig::parse(Path::new("node.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("log_fromat"), "{e}");
        assert!(e.contains("line 6"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let text = GOOD.replace("127.0.0.1:50051", "localhost");
        let e = NodeConfig::parse(Path::new("node.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`listen`"), "{e}");
        let text = GOOD.replace("max_concurrent_queries = 4", "max_concurrent_queries = 0");
        let e = NodeConfig::parse(Path::new("node.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.max_concurrent_queries"), "{e}");
        let text = GOOD.replace(
            "max_concurrent_queries = 4",
            "max_concurrent_queries = 4\nstorage_timeout_ms = 5",
        );
        let e = NodeConfig::parse(Path::new("node.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("limits.storage_timeout_ms"), "{e}");
        let text = GOOD.replace("[tls]", "[tls]\nextra = 1");
        let e = NodeConfig::parse(Path::new("node.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("extra"), "{e}");
    }

    #[test]
    fn missing_required_field_is_named() {
        let text = GOOD.replace("data_dir = \"state\"\n", "");
        let e = NodeConfig::parse(Path::new("node.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("data_dir"), "{e}");
    }
}
