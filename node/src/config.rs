//! node.toml: what a node runs with (federation id, policy file, state folder, listen
//! addresses, TLS material and the client identities it answers, limits), parsed
//! strictly and resolved against the config file's folder.

use serde::Deserialize;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Field documentation shown by `phm-node --help`; kept next to the types it describes.
pub const CONFIG_HELP: &str = "\
node.toml fields (paths are relative to the config file's folder unless absolute):

  federation_id = \"synthetic-ics\"   Required. The federation this node belongs to (letters,
                                    digits and _ - . :); signed queries name it.
  policy = \"policy.toml\"            IG policy file. Invalid at start-up: the node does not
                                    start. Edited while running: reloaded within a second (or
                                    on SIGHUP); an invalid edit is refused and logged, and the
                                    policy in force stays.
  data_dir = \"state\"                Folder for the sled database (budget ledger, release
                                    cache, nonces) and audit.log (hash-chained JSON lines).
                                    Created if missing.
  listen = \"127.0.0.1:50051\"        gRPC address (phm.v1.NodeService, grpc.health.v1,
                                    reflection). Mutual TLS only.
  metrics_listen = \"127.0.0.1:9101\" Optional; no metrics when absent. Prometheus text on
                                    GET /metrics: plain HTTP with NO authentication, so it is
                                    bound to loopback: a bare port (\"9101\") means
                                    127.0.0.1:9101, and a non-loopback address is refused
                                    unless metrics_allow_remote = true. Exports counts of
                                    query outcomes, epsilon spent and policy reloads, never
                                    per-query timings (a timing side channel).
  metrics_allow_remote = false      true: allow a non-loopback metrics_listen (put it behind
                                    a firewall or an authenticating proxy).
  log_format = \"human\"              \"human\" or \"json\" (--log-format overrides it).

  [tls]
  cert = \"certs/A81001.pem\"         The node's server certificate chain (PEM).
  key = \"certs/A81001.key\"          Its private key (PEM).
  client_ca = \"certs/ca.pem\"        The INFRASTRUCTURE CA (the one that issued the coordinator's
                                    client certificate), never the CA of analysts' certificates.
                                    Clients without a certificate chaining to it are refused at
                                    the TLS handshake.
  allowed_clients = [\"san:coordinator-client\"]
                                    Required, at least one. The client identities this node
                                    answers Query, Budget and Describe for: the coordinator's
                                    client certificate, named by a subject alternative name
                                    (\"san:<name>\") or by the SHA-256 of its public key
                                    (\"spki-sha256:<64 hex digits>\", printed by `phm certs dev`).
                                    Any other certificate, even from the same CA, is refused
                                    PERMISSION_DENIED and audited. Health and reflection stay
                                    open to any certificate from client_ca.

  [peer]                            Optional: only for linked and secure queries, and then
                                    required with the policy's [peers] registry_key.
  identity = \"peer/A81001.identity\" This node's identity file (`phm keys new --kind node`):
                                    its Ed25519 and X25519 secret keys. Must not be readable
                                    by group or others (mode 0600), or the node does not start.
  registry = \"../registry.toml\"     The federation's node registry (`phm registry sign`),
                                    signed by the key the policy pins; it must list this
                                    node's identity, for this federation, and not be expired.

  [limits]                          All optional; the values shown are the defaults.
  max_message_bytes = 4194304       Largest request message accepted.
  max_concurrent_queries = 32       Queries running at once; more are refused at once with
                                    OVERLOADED (RESOURCE_EXHAUSTED), never queued.
  query_deadline_ms = 30000         A query not answered within this is refused as
                                    UNAVAILABLE; budget already spent stays spent and the
                                    answer, once ready, is served to a retry of the same
                                    signed query from the release cache.
  link_deadline_ms = 600000         A linkage session (both rounds and the blinding of
                                    up to millions of NHS numbers) not finished within
                                    this is abandoned; its spend stays spent.
  storage_timeout_ms = 15000        A ledger, release-cache or audit-log write not finished
                                    within this means the disk has failed: the node stops
                                    (exit code 1) rather than run unable to record spends.

Signals: SIGHUP reloads the policy now; SIGTERM or Ctrl-C stops accepting, lets running
queries finish (bounded by query_deadline_ms), flushes the ledger and audit log, exits 0.";

pub use phm_daemon::LogFormat;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    // Optional here only so that a missing one gets the sentence below rather than
    // serde's bare "missing field".
    #[serde(default)]
    federation_id: Option<String>,
    policy: PathBuf,
    data_dir: PathBuf,
    listen: String,
    #[serde(default)]
    metrics_listen: Option<String>,
    #[serde(default)]
    metrics_allow_remote: bool,
    #[serde(default)]
    log_format: LogFormat,
    tls: RawTls,
    #[serde(default)]
    peer: Option<PeerFiles>,
    #[serde(default)]
    limits: Limits,
}

/// `[peer]`: the files a node needs to exchange sealed frames with other nodes (for
/// linked and secure queries), through the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerFiles {
    /// This node's identity file (secret keys; mode 0600).
    pub identity: PathBuf,
    /// The federation's node registry, signed by the key the policy pins.
    pub registry: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
    #[serde(default)]
    allowed_clients: Option<Vec<String>>,
}

/// Operational limits of the gRPC server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_concurrent_queries: usize,
    pub query_deadline_ms: u64,
    pub link_deadline_ms: u64,
    pub storage_timeout_ms: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_message_bytes: 4 * 1024 * 1024,
            max_concurrent_queries: 32,
            query_deadline_ms: 30_000,
            link_deadline_ms: 600_000,
            storage_timeout_ms: 15_000,
        }
    }
}

/// One entry of `tls.allowed_clients`: a client identity the node answers.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ClientPin {
    /// A subject alternative name of the client certificate (DNS name, URI or e-mail),
    /// compared exactly (DNS names without regard to ASCII case).
    San(String),
    /// SHA-256 of the certificate's DER SubjectPublicKeyInfo. Survives re-issuing the
    /// certificate with the same key; names exactly one key pair.
    SpkiSha256([u8; 32]),
}

/// Names every development and most real server certificates carry; pinning one of them
/// would let any such certificate through, so they are refused as pins.
const SHARED_NAMES: [&str; 2] = ["localhost", "localhost.localdomain"];

impl ClientPin {
    /// Parse `san:<name>` or `spki-sha256:<64 hex digits>`; the error says what to write.
    pub fn parse(entry: &str) -> Result<ClientPin, String> {
        let formats = "write \"san:<subject alternative name of the coordinator's client \
                       certificate>\" (e.g. \"san:coordinator-client\") or \
                       \"spki-sha256:<64 hex digits>\" (the fingerprint `phm certs dev` prints)";
        if let Some(name) = entry.strip_prefix("san:") {
            let name = name.trim();
            if name.is_empty() {
                return Err(format!("{entry:?} names no SAN; {formats}"));
            }
            if SHARED_NAMES.iter().any(|s| s.eq_ignore_ascii_case(name))
                || name.parse::<IpAddr>().is_ok()
            {
                return Err(format!(
                    "{entry:?} is a name or address that many certificates share (every \
                     development server certificate carries localhost and 127.0.0.1), so it \
                     would not single out the coordinator; pin the coordinator's own SAN or \
                     its spki-sha256 fingerprint"
                ));
            }
            return Ok(ClientPin::San(name.to_string()));
        }
        if let Some(hex_text) = entry.strip_prefix("spki-sha256:") {
            let hex_text = hex_text.trim().replace(':', "");
            let bytes = hex::decode(&hex_text).ok().filter(|b| b.len() == 32);
            return match bytes.and_then(|b| <[u8; 32]>::try_from(b).ok()) {
                Some(b) => Ok(ClientPin::SpkiSha256(b)),
                None => Err(format!(
                    "{entry:?}: the fingerprint must be 64 hex digits (SHA-256); {formats}"
                )),
            };
        }
        Err(format!("{entry:?} is not a client identity; {formats}"))
    }
}

impl std::fmt::Display for ClientPin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientPin::San(s) => write!(f, "san:{s}"),
            ClientPin::SpkiSha256(b) => write!(f, "spki-sha256:{}", hex::encode(b)),
        }
    }
}

/// TLS material, paths resolved, and the client identities the node answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// Never empty once parsed: a node answers no one until its coordinator is named.
    pub allowed_clients: Vec<ClientPin>,
}

pub use phm_proto::query::{MAX_FEDERATION_ID_LEN, validate_federation_id};

/// A validated node configuration with absolute (or config-relative resolved) paths.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeConfig {
    /// Where the configuration was read from (for messages).
    pub source: PathBuf,
    /// The federation this node serves; signed queries for another one are refused.
    pub federation_id: String,
    pub policy: PathBuf,
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub metrics_listen: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub tls: TlsFiles,
    /// `[peer]`, with paths resolved.
    pub peer: Option<PeerFiles>,
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

/// `metrics_listen`: an address and port, or a bare port meaning loopback.
fn parse_metrics_addr(path: &Path, s: &str) -> Result<SocketAddr, ConfigError> {
    match s.trim().parse::<u16>() {
        Ok(port) => Ok(SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)),
        Err(_) => parse_addr(path, "metrics_listen", s),
    }
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
        let federation_id = match raw.federation_id.as_deref() {
            None => {
                return Err(field(
                    "federation_id",
                    "is missing; add a top-level line such as federation_id = \"synthetic-ics\" \
                     (the same id the coordinator and the requesters' signed queries use)",
                ));
            }
            Some(id) => {
                validate_federation_id(id).map_err(|r| field("federation_id", &r))?;
                id.to_string()
            }
        };
        let listen = parse_addr(path, "listen", &raw.listen)?;
        let metrics_listen = raw
            .metrics_listen
            .as_deref()
            .map(|s| parse_metrics_addr(path, s))
            .transpose()?;
        // /metrics has no authentication: exposing it beyond this machine must be a
        // decision written in the file, not the accident of a wildcard address.
        if let Some(m) = metrics_listen
            && !m.ip().is_loopback()
            && !raw.metrics_allow_remote
        {
            return Err(field(
                "metrics_listen",
                &format!(
                    "{m} is not a loopback address; /metrics is unauthenticated plain HTTP, so \
                     bind it to 127.0.0.1 (or give a bare port), or set \
                     metrics_allow_remote = true to expose it on purpose"
                ),
            ));
        }
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
        let allowed_clients = match &raw.tls.allowed_clients {
            None => {
                return Err(field(
                    "tls.allowed_clients",
                    "is missing; under [tls] name the coordinator's client certificate, e.g. \
                     allowed_clients = [\"san:coordinator-client\"] or \
                     allowed_clients = [\"spki-sha256:<64 hex digits>\"] \
                     (without it any certificate from client_ca could query this node directly)",
                ));
            }
            Some(list) if list.is_empty() => {
                return Err(field(
                    "tls.allowed_clients",
                    "is empty, so the node would answer no one; name the coordinator's client \
                     certificate, e.g. allowed_clients = [\"san:coordinator-client\"]",
                ));
            }
            Some(list) => list
                .iter()
                .map(|e| ClientPin::parse(e))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|r| field("tls.allowed_clients", &r))?,
        };
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
        if limits.link_deadline_ms < 1_000 {
            return Err(field(
                "limits.link_deadline_ms",
                "must be at least 1000 milliseconds",
            ));
        }
        if limits.storage_timeout_ms < 100 {
            return Err(field(
                "limits.storage_timeout_ms",
                "must be at least 100 milliseconds (an fsync can take that long on a busy disk)",
            ));
        }
        if let Some(peer) = &raw.peer {
            for (name, p) in [
                ("peer.identity", &peer.identity),
                ("peer.registry", &peer.registry),
            ] {
                if p.as_os_str().is_empty() {
                    return Err(field(name, "is empty; give a path"));
                }
            }
        }
        let peer = raw.peer.as_ref().map(|p| PeerFiles {
            identity: resolve(base, &p.identity),
            registry: resolve(base, &p.registry),
        });
        Ok(NodeConfig {
            source: path.to_path_buf(),
            federation_id,
            peer,
            policy: resolve(base, &raw.policy),
            data_dir: resolve(base, &raw.data_dir),
            listen,
            metrics_listen,
            log_format: raw.log_format,
            tls: TlsFiles {
                cert: resolve(base, &raw.tls.cert),
                key: resolve(base, &raw.tls.key),
                client_ca: resolve(base, &raw.tls.client_ca),
                allowed_clients,
            },
            limits,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
federation_id = "synthetic-ics"
policy = "policy.toml"
data_dir = "state"
listen = "127.0.0.1:50051"
metrics_listen = "127.0.0.1:9101"
log_format = "json"
[tls]
cert = "certs/A81001.pem"
key = "/abs/A81001.key"
client_ca = "certs/ca.pem"
allowed_clients = ["san:coordinator-client"]
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
        assert_eq!(c.federation_id, "synthetic-ics");
        assert_eq!(
            c.tls.allowed_clients,
            vec![ClientPin::San("coordinator-client".into())]
        );
    }

    fn parse_err(text: &str) -> String {
        NodeConfig::parse(Path::new("node.toml"), text)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn allowed_clients_are_required_non_empty_and_well_formed() {
        let e = parse_err(&GOOD.replace("allowed_clients = [\"san:coordinator-client\"]\n", ""));
        assert!(
            e.contains("tls.allowed_clients") && e.contains("is missing"),
            "{e}"
        );
        assert!(
            e.contains("allowed_clients = [\"san:coordinator-client\"]"),
            "{e}"
        );
        let e = parse_err(&GOOD.replace("[\"san:coordinator-client\"]", "[]"));
        assert!(
            e.contains("tls.allowed_clients") && e.contains("empty"),
            "{e}"
        );
        for bad in [
            "cn:coordinator",
            "coordinator-client",
            "san:",
            "san:localhost",
            "san:127.0.0.1",
            "san:::1",
            "spki-sha256:abcd",
            "spki-sha256:zz",
        ] {
            let e = parse_err(&GOOD.replace("san:coordinator-client", bad));
            assert!(e.contains("tls.allowed_clients"), "{bad}: {e}");
        }
        let fp = "AB".repeat(32);
        let text = GOOD.replace(
            "[\"san:coordinator-client\"]",
            &format!("[\"san:coordinator-client\", \"spki-sha256:{fp}\"]"),
        );
        let c = NodeConfig::parse(Path::new("node.toml"), &text).unwrap();
        assert_eq!(c.tls.allowed_clients[1], ClientPin::SpkiSha256([0xab; 32]));
        assert_eq!(
            c.tls.allowed_clients[1].to_string(),
            format!("spki-sha256:{}", "ab".repeat(32))
        );
    }

    #[test]
    fn federation_id_is_required_and_restricted() {
        let e = parse_err(&GOOD.replace("federation_id = \"synthetic-ics\"\n", ""));
        assert!(e.contains("federation_id") && e.contains("missing"), "{e}");
        for bad in ["", "has space", "semi;colon", "ünï", &"x".repeat(129)] {
            let e = parse_err(&GOOD.replace("synthetic-ics", bad));
            assert!(e.contains("`federation_id`"), "{bad:?}: {e}");
        }
        let c = NodeConfig::parse(
            Path::new("node.toml"),
            &GOOD.replace("synthetic-ics", "nhs:ics.QR1_v-2"),
        )
        .unwrap();
        assert_eq!(c.federation_id, "nhs:ics.QR1_v-2");
    }

    #[test]
    fn metrics_bind_to_loopback_unless_remote_is_allowed() {
        let c = NodeConfig::parse(
            Path::new("node.toml"),
            &GOOD.replace("\"127.0.0.1:9101\"", "\"9102\""),
        )
        .unwrap();
        assert_eq!(c.metrics_listen, Some("127.0.0.1:9102".parse().unwrap()));
        let wide = GOOD.replace("127.0.0.1:9101", "0.0.0.0:9101");
        let e = parse_err(&wide);
        assert!(
            e.contains("metrics_listen") && e.contains("metrics_allow_remote"),
            "{e}"
        );
        let allowed = wide.replace("log_format", "metrics_allow_remote = true\nlog_format");
        let c = NodeConfig::parse(Path::new("node.toml"), &allowed).unwrap();
        assert_eq!(c.metrics_listen, Some("0.0.0.0:9101".parse().unwrap()));
        let c = NodeConfig::parse(
            Path::new("node.toml"),
            &GOOD.replace("127.0.0.1:9101", "[::1]:9101"),
        )
        .unwrap();
        assert!(c.metrics_listen.unwrap().ip().is_loopback());
    }

    #[test]
    fn unknown_field_is_refused_by_name() {
        let text = GOOD.replace("log_format", "log_fromat");
        let e = NodeConfig::parse(Path::new("node.toml"), &text)
            .unwrap_err()
            .to_string();
        assert!(e.contains("log_fromat"), "{e}");
        assert!(e.contains("line 7"), "{e}");
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
