//! `coordinator.toml`: parsing, validation (errors name the field and the reason) and
//! resolution of relative paths against the config file's folder.

use serde::Deserialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Longest per-node deadline accepted: a query held open longer than this is a
/// misconfiguration, not patience.
pub const MAX_NODE_DEADLINE_MS: u64 = 600_000;
pub const DEFAULT_NODE_DEADLINE_MS: u64 = 10_000;

/// Text shown by `--help` for `--config`: every field of coordinator.toml.
pub const CONFIG_HELP: &str = "\
Path to coordinator.toml. Relative paths inside it are resolved against the folder \
that holds the file. Unknown fields are refused.

  federation_id = \"synthetic-ics\" required; the federation this coordinator serves
                                  (letters, digits and _ - . :); signed queries name it
  listen = \"127.0.0.1:50050\"      address:port the coordinator serves gRPC (TLS) on
  data_dir = \"state\"              folder for the sled query history (created if missing)
  node_deadline_ms = 10000        per-node deadline for Query and Budget calls
                                  (1..=600000; default 10000); a node slower than this
                                  is reported TIMED_OUT and never delays the answer
  link_deadline_ms = 600000       deadline for one linkage session between an anchor
                                  and a partner node (1000..=3600000; default 600000)
  log_format = \"human\"            \"human\" or \"json\" (default human)

  [secure_aggregation]            optional; without it secure queries are refused
  registry = \"registry.toml\"      the IG-signed node registry relayed to each node
  registry_key = \"…\"              base64 Ed25519 key that signed it (the IG leads')
  min_survivors = 0.9             the noise must hold with this fraction of the
                                  cohort surviving (0 < x <= 1; default 0.9); each
                                  node may demand more
  round_timeout_ms = 30000        a node silent this long in one round is dropped
                                  (1000..=600000; default 30000)

  [tls]                           what analysts' clients connect to (mutual TLS)
  cert = \"certs/coordinator.pem\"  server certificate chain (PEM), from the
                                  infrastructure CA
  key = \"certs/coordinator.key\"   its private key (PEM)
  client_ca = \"certs/people-ca.pem\"
                                  required: the PEOPLE CA that analysts' and
                                  researchers' client certificates chain to; a
                                  client without such a certificate is refused at
                                  the handshake

  [client_tls]                    identity the coordinator presents to nodes
  cert = \"certs/coordinator-client.pem\"
                                  from the infrastructure CA; every node pins it
                                  in its tls.allowed_clients (by SAN or by
                                  spki-sha256 fingerprint)
  key = \"certs/coordinator-client.key\"
  ca = \"certs/ca.pem\"             the infrastructure CA node server certificates
                                  chain to

  [[nodes]]                       one table per registered node
  id = \"A81001\"                   unique node id (required)
  ods_code = \"A81001\"             ODS code (default: the id)
  name = \"Riverside Medical Practice\"
  kind = \"gp_practice\"            e.g. gp_practice, acute_trust, social_care
  place = \"North\"                 Place, for Place breakdowns (optional)
  pcn = \"Riverside PCN\"           Primary Care Network, for PCN breakdowns (optional)
  endpoint = \"https://127.0.0.1:50051\"   must be https:// (mutual TLS)
  tls_server_name = \"localhost\"   optional; name expected in the node's certificate
                                  (default: the endpoint's host)
  datasets = [\"gp_patients\"]      datasets this node serves (at least one)

  [[requesters]]                  the requesters whose results this coordinator keeps:
  id = \"dsu\"                      requester id, as in the nodes' policies
  public_key = \"base64...\"        its Ed25519 public key (`phm keys new` prints it);
                                  Submit and GetResult verify the requester's signature
                                  with it, so a stored result is only ever returned to
                                  the requester (and project) that asked for it
  revoked = false                 optional; true refuses the requester here

  query_validity_seconds = 300    optional (top level): how long a signed query or
                                  proof stays valid after it was issued (default 300)

  [datasets.<name>]               optional, per dataset
  total_kind = \"sum_of_partner_counts\"
                                  what a system total means: \"distinct_people\" when
                                  every person belongs to exactly one partner (e.g. GP
                                  registrations), or \"sum_of_partner_counts\" when a
                                  person known to two partners counts twice. Default
                                  and fail-closed reading: sum_of_partner_counts.";

/// What is wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{path}: field `{field}` is invalid: {reason}")]
    Invalid {
        path: PathBuf,
        field: String,
        reason: String,
    },
}

pub use phm_daemon::LogFormat;

/// How a system total of the dataset should be read: the one result model's.
pub use phm_proto::result::TotalKind;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The CA analysts' client certificates chain to; always required (mutual TLS).
    pub client_ca: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// One registered node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    pub id: String,
    pub ods_code: String,
    pub name: String,
    pub kind: String,
    pub place: String,
    pub pcn: String,
    pub endpoint: String,
    pub tls_server_name: String,
    pub datasets: Vec<String>,
}

impl NodeConfig {
    pub fn serves(&self, dataset: &str) -> bool {
        self.datasets.iter().any(|d| d == dataset)
    }
}

/// A requester the coordinator knows: who may read which stored result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequesterConfig {
    pub id: String,
    pub public_key: phm_proto::signing::PublicKey,
    pub revoked: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DatasetConfig {
    pub total_kind: TotalKind,
}

/// A validated coordinator configuration with absolute paths.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The federation this coordinator serves; signed queries for another are refused.
    pub federation_id: String,
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub node_deadline: Duration,
    /// Deadline of one linkage session (both nodes' rounds).
    pub link_deadline: Duration,
    pub log_format: LogFormat,
    pub tls: ServerTls,
    pub client_tls: ClientTls,
    pub nodes: Vec<NodeConfig>,
    pub datasets: BTreeMap<String, DatasetConfig>,
    /// The requester directory (public keys only).
    pub requesters: Vec<RequesterConfig>,
    /// How long a signed query or proof stays valid after it was issued.
    pub query_validity: Duration,
    /// Secure aggregation, when configured.
    pub secure: Option<SecureConfig>,
}

/// `[secure_aggregation]`: the registry relayed to nodes and the session's rules.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecureConfig {
    pub registry: PathBuf,
    /// Base64 Ed25519 key that signs the registry.
    pub registry_key: String,
    /// `min_survivors` in thousandths (kept as an integer so the config stays `Eq`).
    pub min_survivors_permille: u32,
    pub round_timeout: Duration,
}

impl Config {
    /// The requester with this id, if the directory lists it.
    pub fn requester(&self, id: &str) -> Option<&RequesterConfig> {
        self.requesters.iter().find(|r| r.id == id)
    }

    /// Read and validate a config file; relative paths resolve against its folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let base = if base.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            base
        };
        Config::from_toml(&text, path, &base)
    }

    /// Parse and validate config text. `origin` names the file in errors; `base` is
    /// the folder relative paths are resolved against. TLS files must be readable PEM.
    pub fn from_toml(text: &str, origin: &Path, base: &Path) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            message: e.to_string().trim_end().to_string(),
        })?;
        let invalid = |field: &str, reason: String| ConfigError::Invalid {
            path: origin.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        let resolve = |p: &Path| -> PathBuf {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let pem = |field: &str, p: &Path| -> Result<PathBuf, ConfigError> {
            let full = resolve(p);
            let text = std::fs::read_to_string(&full)
                .map_err(|e| invalid(field, format!("cannot read {}: {e}", full.display())))?;
            if !text.contains("-----BEGIN") {
                return Err(invalid(
                    field,
                    format!("{} is not a PEM file", full.display()),
                ));
            }
            Ok(full)
        };

        let federation_id = match raw.federation_id {
            None => {
                return Err(invalid(
                    "federation_id",
                    "is missing; add a top-level line such as federation_id = \"synthetic-ics\" \
                     (the same id every node's node.toml and the requesters' signed queries use)"
                        .into(),
                ));
            }
            Some(id) => {
                validate_federation_id(&id).map_err(|r| invalid("federation_id", r))?;
                id
            }
        };
        let listen: SocketAddr = raw.listen.parse().map_err(|e| {
            invalid(
                "listen",
                format!("{:?} is not an address:port ({e})", raw.listen),
            )
        })?;
        if raw.data_dir.as_os_str().is_empty() {
            return Err(invalid("data_dir", "must not be empty".into()));
        }
        let data_dir = resolve(&raw.data_dir);
        if raw.node_deadline_ms == 0 || raw.node_deadline_ms > MAX_NODE_DEADLINE_MS {
            return Err(invalid(
                "node_deadline_ms",
                format!(
                    "must be between 1 and {MAX_NODE_DEADLINE_MS} milliseconds, got {}",
                    raw.node_deadline_ms
                ),
            ));
        }
        if !(1_000..=3_600_000).contains(&raw.link_deadline_ms) {
            return Err(invalid(
                "link_deadline_ms",
                format!(
                    "must be between 1000 and 3600000 milliseconds, got {}",
                    raw.link_deadline_ms
                ),
            ));
        }
        let secure = match &raw.secure_aggregation {
            None => None,
            Some(s) => {
                if !(s.min_survivors.is_finite() && s.min_survivors > 0.0 && s.min_survivors <= 1.0)
                {
                    return Err(invalid(
                        "secure_aggregation.min_survivors",
                        format!("must be above 0 and at most 1, got {}", s.min_survivors),
                    ));
                }
                if !(1_000..=600_000).contains(&s.round_timeout_ms) {
                    return Err(invalid(
                        "secure_aggregation.round_timeout_ms",
                        format!(
                            "must be between 1000 and 600000 milliseconds, got {}",
                            s.round_timeout_ms
                        ),
                    ));
                }
                if phm_proto::signing::public_key_from_base64(&s.registry_key).is_err() {
                    return Err(invalid(
                        "secure_aggregation.registry_key",
                        "is not a base64 Ed25519 public key".into(),
                    ));
                }
                Some(SecureConfig {
                    registry: resolve(&s.registry),
                    registry_key: s.registry_key.clone(),
                    min_survivors_permille: (s.min_survivors * 1000.0).ceil() as u32,
                    round_timeout: Duration::from_millis(s.round_timeout_ms),
                })
            }
        };
        // No optional mTLS: without client certificates anyone who can reach the port
        // could submit, replay or read results, and nothing would tie a caller to a
        // person the ICS issued a certificate to.
        let Some(client_ca) = raw.tls.client_ca.as_deref() else {
            return Err(invalid(
                "tls.client_ca",
                "is missing; under [tls] name the CA analysts' client certificates chain to, \
                 e.g. client_ca = \"certs/people-ca.pem\" (the coordinator always requires \
                 client certificates)"
                    .into(),
            ));
        };
        let tls = ServerTls {
            cert: pem("tls.cert", &raw.tls.cert)?,
            key: pem("tls.key", &raw.tls.key)?,
            client_ca: pem("tls.client_ca", client_ca)?,
        };
        let client_tls = ClientTls {
            cert: pem("client_tls.cert", &raw.client_tls.cert)?,
            key: pem("client_tls.key", &raw.client_tls.key)?,
            ca: pem("client_tls.ca", &raw.client_tls.ca)?,
        };

        let mut ids = BTreeSet::new();
        let mut nodes = Vec::with_capacity(raw.nodes.len());
        for (i, n) in raw.nodes.into_iter().enumerate() {
            let at = |f: &str| format!("nodes[{i}].{f}");
            if !is_identifier(&n.id) {
                return Err(invalid(
                    &at("id"),
                    format!("{:?} must be 1-128 letters, digits or _ - . : @", n.id),
                ));
            }
            if !ids.insert(n.id.clone()) {
                return Err(invalid(
                    &at("id"),
                    format!("node id {:?} is registered twice", n.id),
                ));
            }
            let host =
                endpoint_host(&n.endpoint).map_err(|reason| invalid(&at("endpoint"), reason))?;
            let tls_server_name = match n.tls_server_name {
                Some(s) if s.trim().is_empty() => {
                    return Err(invalid(&at("tls_server_name"), "must not be empty".into()));
                }
                Some(s) => s,
                None => host,
            };
            if n.datasets.is_empty() {
                return Err(invalid(
                    &at("datasets"),
                    "list at least one dataset the node serves".into(),
                ));
            }
            for d in &n.datasets {
                if !is_identifier(d) {
                    return Err(invalid(
                        &at("datasets"),
                        format!("{d:?} is not a dataset name"),
                    ));
                }
            }
            nodes.push(NodeConfig {
                ods_code: n.ods_code.unwrap_or_else(|| n.id.clone()),
                id: n.id,
                name: n.name,
                kind: n.kind,
                place: n.place,
                pcn: n.pcn,
                endpoint: n.endpoint,
                tls_server_name,
                datasets: n.datasets,
            });
        }
        let mut requesters: Vec<RequesterConfig> = Vec::new();
        for (i, r) in raw.requesters.into_iter().enumerate() {
            let at = |f: &str| format!("requesters[{i}].{f}");
            if r.id.is_empty() || !is_identifier(&r.id) {
                return Err(invalid(
                    &at("id"),
                    format!("{:?} is not a requester id", r.id),
                ));
            }
            if requesters.iter().any(|o| o.id == r.id) {
                return Err(invalid(&at("id"), format!("{:?} is listed twice", r.id)));
            }
            let public_key =
                phm_proto::signing::public_key_from_base64(&r.public_key).map_err(|e| {
                    invalid(&at("public_key"), format!("not an Ed25519 public key: {e}"))
                })?;
            requesters.push(RequesterConfig {
                id: r.id,
                public_key,
                revoked: r.revoked,
            });
        }
        if raw.query_validity_seconds == 0 || raw.query_validity_seconds > 86_400 {
            return Err(invalid(
                "query_validity_seconds",
                format!(
                    "{} is out of range (1..=86400 seconds)",
                    raw.query_validity_seconds
                ),
            ));
        }
        let mut datasets = BTreeMap::new();
        for (name, d) in raw.datasets {
            if !is_identifier(&name) {
                return Err(invalid(
                    &format!("datasets.{name}"),
                    format!("{name:?} is not a dataset name"),
                ));
            }
            datasets.insert(
                name,
                DatasetConfig {
                    total_kind: d.total_kind,
                },
            );
        }
        Ok(Config {
            federation_id,
            listen,
            data_dir,
            node_deadline: Duration::from_millis(raw.node_deadline_ms),
            link_deadline: Duration::from_millis(raw.link_deadline_ms),
            log_format: raw.log_format,
            tls,
            client_tls,
            nodes,
            datasets,
            requesters,
            query_validity: Duration::from_secs(raw.query_validity_seconds),
            secure,
        })
    }

    /// How a total of `dataset` should be read; unlisted datasets get the
    /// conservative reading (people known to several partners count several times).
    pub fn total_kind(&self, dataset: &str) -> TotalKind {
        self.datasets
            .get(dataset)
            .map(|d| d.total_kind)
            .unwrap_or_default()
    }
}

pub use phm_proto::query::validate_federation_id;

fn is_identifier(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':' | '@'))
}

/// The host of an `https://host:port` endpoint, or why it is not one.
fn endpoint_host(endpoint: &str) -> Result<String, String> {
    let uri: tonic::transport::Uri = endpoint
        .parse()
        .map_err(|e| format!("{endpoint:?} is not a URI: {e}"))?;
    if uri.scheme_str() != Some("https") {
        return Err(format!(
            "{endpoint:?} must start with https:// (nodes are only reached over mutual TLS)"
        ));
    }
    if uri.port_u16().is_none() {
        return Err(format!(
            "{endpoint:?} must name a port, e.g. https://host:50051"
        ));
    }
    match uri.host() {
        Some(h) if !h.is_empty() => Ok(h.trim_matches(['[', ']']).to_string()),
        _ => Err(format!("{endpoint:?} has no host")),
    }
}

fn default_deadline() -> u64 {
    DEFAULT_NODE_DEADLINE_MS
}

fn default_link_deadline() -> u64 {
    600_000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    // Optional here only so a missing one gets a sentence saying what to write.
    #[serde(default)]
    federation_id: Option<String>,
    listen: String,
    data_dir: PathBuf,
    #[serde(default = "default_deadline")]
    node_deadline_ms: u64,
    #[serde(default = "default_link_deadline")]
    link_deadline_ms: u64,
    #[serde(default)]
    log_format: LogFormat,
    tls: RawServerTls,
    client_tls: RawClientTls,
    #[serde(default)]
    nodes: Vec<RawNode>,
    #[serde(default)]
    datasets: BTreeMap<String, RawDataset>,
    #[serde(default)]
    requesters: Vec<RawRequester>,
    #[serde(default = "default_validity")]
    query_validity_seconds: u64,
    #[serde(default)]
    secure_aggregation: Option<RawSecure>,
}

fn default_min_survivors() -> f64 {
    0.9
}

fn default_round_timeout() -> u64 {
    30_000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecure {
    registry: PathBuf,
    registry_key: String,
    #[serde(default = "default_min_survivors")]
    min_survivors: f64,
    #[serde(default = "default_round_timeout")]
    round_timeout_ms: u64,
}

fn default_validity() -> u64 {
    300
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequester {
    id: String,
    public_key: String,
    #[serde(default)]
    revoked: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServerTls {
    cert: PathBuf,
    key: PathBuf,
    client_ca: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawClientTls {
    cert: PathBuf,
    key: PathBuf,
    ca: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNode {
    id: String,
    ods_code: Option<String>,
    #[serde(default)]
    name: String,
    #[serde(default)]
    kind: String,
    #[serde(default)]
    place: String,
    #[serde(default)]
    pcn: String,
    endpoint: String,
    tls_server_name: Option<String>,
    datasets: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDataset {
    #[serde(default)]
    total_kind: TotalKind,
}

#[cfg(test)]
mod tests {
    use super::*;

    const PEM: &str = "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n";

    fn dir_with_certs() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("certs")).unwrap();
        for f in ["a.pem", "a.key", "ca.pem", "people-ca.pem"] {
            std::fs::write(dir.path().join("certs").join(f), PEM).unwrap();
        }
        dir
    }

    const GOOD: &str = r#"
federation_id = "synthetic-ics"
listen = "127.0.0.1:50050"
data_dir = "state"
[tls]
cert = "certs/a.pem"
key = "certs/a.key"
client_ca = "certs/people-ca.pem"
[client_tls]
cert = "certs/a.pem"
key = "certs/a.key"
ca = "certs/ca.pem"
[[nodes]]
id = "A81001"
place = "North"
endpoint = "https://127.0.0.1:50051"
datasets = ["gp_patients"]
[datasets.acute_admissions]
total_kind = "sum_of_partner_counts"
[datasets.gp_patients]
total_kind = "distinct_people"
"#;

    fn load(text: &str) -> Result<Config, ConfigError> {
        let dir = dir_with_certs();
        let path = dir.path().join("coordinator.toml");
        std::fs::write(&path, text).unwrap();
        Config::load(&path).map(|mut c| {
            // Paths must be absolute under the config folder.
            assert!(c.data_dir.starts_with(dir.path()));
            c.data_dir = PathBuf::from("state");
            c
        })
    }

    #[test]
    fn good_config_resolves_paths_and_defaults() {
        let c = load(GOOD).unwrap();
        assert_eq!(c.node_deadline, Duration::from_millis(10_000));
        assert_eq!(c.nodes[0].ods_code, "A81001");
        assert_eq!(c.nodes[0].tls_server_name, "127.0.0.1");
        assert_eq!(c.total_kind("gp_patients"), TotalKind::DistinctPeople);
        assert_eq!(c.total_kind("unknown"), TotalKind::SumOfPartnerCounts);
        assert!(c.tls.client_ca.ends_with("certs/people-ca.pem"));
        assert!(c.tls.client_ca.is_absolute());
        assert!(c.client_tls.ca.is_absolute());
        assert_eq!(c.federation_id, "synthetic-ics");
    }

    #[test]
    fn client_ca_is_required() {
        let e = err(&GOOD.replace("client_ca = \"certs/people-ca.pem\"\n", ""));
        assert!(
            e.contains("tls.client_ca") && e.contains("is missing"),
            "{e}"
        );
        assert!(e.contains("client_ca = \"certs/people-ca.pem\""), "{e}");
        let e = err(&GOOD.replace("certs/people-ca.pem", "certs/none.pem"));
        assert!(e.contains("tls.client_ca") && e.contains("none.pem"), "{e}");
    }

    #[test]
    fn federation_id_is_required_and_restricted() {
        let e = err(&GOOD.replace("federation_id = \"synthetic-ics\"\n", ""));
        assert!(e.contains("federation_id") && e.contains("missing"), "{e}");
        for bad in ["", "two words", "a/b", "é", &"x".repeat(129)] {
            let e = err(&GOOD.replace("synthetic-ics", bad));
            assert!(e.contains("`federation_id`"), "{bad:?}: {e}");
        }
        let c = load(&GOOD.replace("synthetic-ics", "nhs:ics.QR1_v-2")).unwrap();
        assert_eq!(c.federation_id, "nhs:ics.QR1_v-2");
    }

    fn err(text: &str) -> String {
        load(text).unwrap_err().to_string()
    }

    #[test]
    fn unknown_field_is_refused_by_name() {
        let e = err(&GOOD.replace("data_dir = \"state\"", "data_dir = \"state\"\ncolour = 1"));
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn bad_values_name_the_field_and_reason() {
        let e = err(&GOOD.replace("https://127.0.0.1:50051", "http://127.0.0.1:50051"));
        assert!(
            e.contains("nodes[0].endpoint") && e.contains("https://"),
            "{e}"
        );
        let e = err(&GOOD.replace("127.0.0.1:50050", "nowhere"));
        assert!(e.contains("`listen`"), "{e}");
        let e = err(&GOOD.replace(
            "data_dir = \"state\"",
            "data_dir = \"state\"\nnode_deadline_ms = 0",
        ));
        assert!(
            e.contains("node_deadline_ms") && e.contains("between 1"),
            "{e}"
        );
        let e = err(&GOOD.replace("certs/ca.pem", "certs/missing.pem"));
        assert!(
            e.contains("client_tls.ca") && e.contains("missing.pem"),
            "{e}"
        );
        let e = err(&GOOD.replace("\"distinct_people\"", "\"people\""));
        assert!(e.contains("people") && e.contains("total_kind"), "{e}");
        let e = err(&format!(
            "{GOOD}\n[[nodes]]\nid = \"A81001\"\nendpoint = \"https://h:1\"\ndatasets = [\"x\"]\n"
        ));
        assert!(e.contains("nodes[1].id") && e.contains("twice"), "{e}");
        let e = err(&GOOD.replace("datasets = [\"gp_patients\"]", "datasets = []"));
        assert!(e.contains("nodes[0].datasets"), "{e}");
    }
}
