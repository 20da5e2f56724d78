//! Development certificates for mutual TLS (`phm certs dev`) from two local CAs:
//!
//! - the **infrastructure CA** (`ca.pem`) issues the nodes' and the coordinator's server
//!   certificates and the coordinator's client certificate. Nodes trust only it for
//!   clients, and answer only the coordinator identity they pin (`allowed_clients`).
//! - the **people CA** (`people-ca.pem`) issues analysts' and researchers' client
//!   certificates. Only the coordinator trusts it.
//!
//! Two CAs, because with one every analyst's certificate would also pass a node's
//! handshake, and an analyst could then query a node directly (or through a coordinator
//! of their own), bypassing the coordinator's scope and suppression rules. Each leaf
//! carries only the key usage of its role. For demos and tests only; a real deployment
//! uses certificates from the ICS's own PKI, split the same way.

use chrono::Datelike;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("node identity or registry for {name}: {reason}")]
    Peer { name: String, reason: String },
    #[error("certificate name {0:?} is not usable (use letters, digits, '-', '_' and '.')")]
    BadName(String),
    #[error("cannot build the certificate for {name}: {source}")]
    Build { name: String, source: rcgen::Error },
    #[error("cannot read the existing CA in {path}: {reason}")]
    ExistingCa { path: PathBuf, reason: String },
    #[error("certificate name {0:?} is given for two roles; each name is one certificate")]
    Duplicate(String),
    #[error("no certificate names given; use --servers, --clients and/or --people")]
    NoNames,
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn write(path: &Path, text: &str, private: bool) -> Result<(), CertError> {
    use std::io::Write;
    let err = |source| CertError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = options.open(path).map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)
}

fn validity(params: &mut CertificateParams) {
    let today = chrono::Utc::now().date_naive();
    let start = today - chrono::Days::new(1);
    let end = today + chrono::Days::new(825);
    params.not_before = rcgen::date_time_ymd(start.year(), start.month() as u8, start.day() as u8);
    params.not_after = rcgen::date_time_ymd(end.year(), end.month() as u8, end.day() as u8);
}

/// Which CA issues a leaf and what it may be used for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeafRole {
    /// A node's or the coordinator's server certificate: infrastructure CA, serverAuth
    /// only, SANs `<name>`, `localhost` and `127.0.0.1`.
    Server,
    /// An infrastructure client, i.e. the coordinator's identity towards nodes:
    /// infrastructure CA, clientAuth only, SAN `<name>` only (so a pin on it singles it
    /// out).
    InfraClient,
    /// An analyst's or researcher's client certificate: people CA, clientAuth only,
    /// SAN `<name>` only.
    Person,
    /// What `--names` always issued: infrastructure CA, server and client use, SANs
    /// `<name>`, `localhost`, `127.0.0.1`. Kept for older scripts.
    Legacy,
}

impl LeafRole {
    pub fn describe(self) -> &'static str {
        match self {
            LeafRole::Server => "server, infrastructure CA",
            LeafRole::InfraClient => "infrastructure client, infrastructure CA",
            LeafRole::Person => "person's client, people CA",
            LeafRole::Legacy => "server and client, infrastructure CA",
        }
    }
}

/// The certificates to issue, by role.
#[derive(Debug, Clone, Default)]
pub struct CertPlan {
    pub servers: Vec<String>,
    pub infra_clients: Vec<String>,
    pub people: Vec<String>,
    /// `--names`: the former one-CA, both-usages certificates.
    pub legacy: Vec<String>,
}

impl CertPlan {
    fn leaves(&self) -> impl Iterator<Item = (&String, LeafRole)> {
        let tagged = [
            (&self.servers, LeafRole::Server),
            (&self.infra_clients, LeafRole::InfraClient),
            (&self.people, LeafRole::Person),
            (&self.legacy, LeafRole::Legacy),
        ];
        tagged
            .into_iter()
            .flat_map(|(names, role)| names.iter().map(move |n| (n, role)))
    }
}

/// One issued leaf.
#[derive(Debug, Clone)]
pub struct Leaf {
    pub name: String,
    pub role: LeafRole,
    pub pem: PathBuf,
    pub key: PathBuf,
    /// `spki-sha256:<hex>`: what a node's `allowed_clients` can pin.
    pub spki_pin: String,
}

/// What `dev` wrote.
#[derive(Debug, Clone)]
pub struct DevCerts {
    /// The infrastructure CA (`ca.pem`).
    pub ca_pem: PathBuf,
    pub reused_ca: bool,
    /// The people CA (`people-ca.pem`).
    pub people_ca_pem: PathBuf,
    pub reused_people_ca: bool,
    pub leaves: Vec<Leaf>,
}

/// File names of the two CAs inside the output folder.
pub const INFRA_CA: &str = "ca";
pub const PEOPLE_CA: &str = "people-ca";

impl DevCerts {
    /// What `phm certs dev` prints: both CAs, each leaf with its role (client leaves
    /// with their pin), and the lines to put in node.toml and coordinator.toml.
    pub fn describe(&self) -> String {
        let verb = |reused: bool| if reused { "reused" } else { "created" };
        let mut t = format!(
            "{} infrastructure CA {} (node and coordinator server certificates, the \
             coordinator's client certificate)\n{} people CA {} (analysts' and researchers' \
             client certificates)\n",
            verb(self.reused_ca),
            self.ca_pem.display(),
            verb(self.reused_people_ca),
            self.people_ca_pem.display()
        );
        for l in &self.leaves {
            t.push_str(&format!(
                "{} ({}): {} {}",
                l.name,
                l.role.describe(),
                l.pem.display(),
                l.key.display()
            ));
            if matches!(l.role, LeafRole::InfraClient | LeafRole::Legacy) {
                t.push_str(&format!("  pin: \"san:{}\" or \"{}\"", l.name, l.spki_pin));
            }
            t.push('\n');
        }
        let relay = self
            .leaves
            .iter()
            .find(|l| l.role == LeafRole::InfraClient)
            .map(|l| l.name.as_str())
            .unwrap_or("coordinator-client");
        t.push_str(&format!(
            "\nnode.toml (every node):      [tls] client_ca = \"{ca}\", \
             allowed_clients = [\"san:{relay}\"]\n\
             coordinator.toml:            [tls] client_ca = \"{people}\"; \
             [client_tls] cert = <{relay}.pem>, ca = \"{ca}\"\n\
             phm query / phm budget:      --ca {ca} --cert <person>.pem --cert-key <person>.key\n",
            ca = self.ca_pem.display(),
            people = self.people_ca_pem.display(),
        ));
        t
    }
}

/// Read the CA `<dir>/<stem>.pem` + `.key`, or create it when either is missing.
fn ca(
    dir: &Path,
    stem: &str,
    common_name: &str,
) -> Result<(Issuer<'static, KeyPair>, PathBuf, bool), CertError> {
    let pem_path = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    let build = |source| CertError::Build {
        name: stem.to_string(),
        source,
    };
    let reused = pem_path.exists() && key_path.exists();
    let (key, cert_pem) = if reused {
        let existing = |reason: String| CertError::ExistingCa {
            path: pem_path.clone(),
            reason,
        };
        let key_pem = std::fs::read_to_string(&key_path).map_err(|e| existing(e.to_string()))?;
        let cert_pem = std::fs::read_to_string(&pem_path).map_err(|e| existing(e.to_string()))?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| existing(e.to_string()))?;
        (key, cert_pem)
    } else {
        let key = KeyPair::generate().map_err(build)?;
        let mut params = CertificateParams::new(Vec::<String>::new()).map_err(build)?;
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.distinguished_name.push(
            DnType::OrganizationName,
            "phm-federation (development only)",
        );
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        validity(&mut params);
        let cert = params.self_signed(&key).map_err(build)?;
        let pem = cert.pem();
        write(&pem_path, &pem, false)?;
        write(&key_path, &key.serialize_pem(), true)?;
        (key, pem)
    };
    let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| CertError::ExistingCa {
        path: pem_path.clone(),
        reason: e.to_string(),
    })?;
    Ok((issuer, pem_path, reused))
}

/// Write the two CAs (or reuse them when their .pem and .key both exist) and one
/// `<name>.pem` + `<name>.key` per name in `plan`, each issued by the CA of its role.
pub fn dev(dir: &Path, plan: &CertPlan) -> Result<DevCerts, CertError> {
    let mut seen = std::collections::BTreeSet::new();
    for (n, _) in plan.leaves() {
        if !valid_name(n) || n == INFRA_CA || n == PEOPLE_CA {
            return Err(CertError::BadName(n.clone()));
        }
        if !seen.insert(n.as_str()) {
            return Err(CertError::Duplicate(n.clone()));
        }
    }
    if seen.is_empty() {
        return Err(CertError::NoNames);
    }
    std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let (infra, ca_pem, reused_ca) = ca(dir, INFRA_CA, "phm development infrastructure CA")?;
    let (people, people_ca_pem, reused_people_ca) =
        ca(dir, PEOPLE_CA, "phm development people CA")?;

    let mut leaves = Vec::new();
    for (name, role) in plan.leaves() {
        let build = |source| CertError::Build {
            name: name.clone(),
            source,
        };
        let key = KeyPair::generate().map_err(build)?;
        let mut sans = vec![name.clone()];
        // Only server certificates carry the shared loopback names: a client
        // certificate's one SAN is its own name, which is what nodes pin.
        if matches!(role, LeafRole::Server | LeafRole::Legacy) {
            for extra in ["localhost", "127.0.0.1"] {
                if !sans.iter().any(|s| s == extra) {
                    sans.push(extra.to_string());
                }
            }
        }
        let mut params = CertificateParams::new(sans).map_err(build)?;
        params
            .distinguished_name
            .push(DnType::CommonName, name.as_str());
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = match role {
            LeafRole::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
            LeafRole::InfraClient | LeafRole::Person => vec![ExtendedKeyUsagePurpose::ClientAuth],
            LeafRole::Legacy => vec![
                ExtendedKeyUsagePurpose::ServerAuth,
                ExtendedKeyUsagePurpose::ClientAuth,
            ],
        };
        params.use_authority_key_identifier_extension = true;
        validity(&mut params);
        let issuer = if role == LeafRole::Person {
            &people
        } else {
            &infra
        };
        let cert = params.signed_by(&key, issuer).map_err(build)?;
        // The key pair's SubjectPublicKeyInfo is what the certificate carries, and what
        // a node hashes when it checks an `spki-sha256:` pin (a test checks the two agree).
        let spki_pin = format!(
            "spki-sha256:{}",
            hex::encode(Sha256::digest(
                rcgen::PublicKeyData::subject_public_key_info(&key)
            ))
        );
        let pem_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}.key"));
        write(&pem_path, &cert.pem(), false)?;
        write(&key_path, &key.serialize_pem(), true)?;
        leaves.push(Leaf {
            name: name.clone(),
            role,
            pem: pem_path,
            key: key_path,
            spki_pin,
        });
    }
    Ok(DevCerts {
        ca_pem,
        reused_ca,
        people_ca_pem,
        reused_people_ca,
        leaves,
    })
}

/// What [`dev_peers`] wrote: each node's identity file, the registry and the key that
/// signed it.
#[derive(Debug, Clone)]
pub struct DevPeers {
    /// `<dir>/<node>.identity`, mode 0600, by node id.
    pub identities: Vec<(String, PathBuf)>,
    /// Each node's public identity line (`phm-node/v1 <id> ed25519:… x25519:…`, the
    /// `.identity.pub` file's content), by node id: what a policy's
    /// `[[linkage.partners]] node_key` pins.
    pub publics: std::collections::BTreeMap<String, String>,
    /// The signed registry (`registry.toml`).
    pub registry: PathBuf,
    /// The base64 public key that signed it: what each policy's `[peers] registry_key`
    /// pins.
    pub registry_key: String,
}

/// Node identities (`phm keys new --kind node`) for `nodes`, in `dir`, and the
/// federation's node registry listing them, signed with the IG leads' key at
/// `signer` (a requester-style key file, created if missing), valid for `days`.
pub fn dev_peers(
    dir: &Path,
    federation_id: &str,
    nodes: &[String],
    signer: &Path,
    days: u64,
) -> Result<DevPeers, CertError> {
    use phm_relay::{NodeId, NodeIdentity, Registry, RegistryEntry};
    let relay = |name: &str, e: phm_relay::RelayError| CertError::Peer {
        name: name.to_string(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|source| CertError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let key = if signer.exists() {
        phm_proto::keyfile::load_private_key(signer)
    } else {
        phm_proto::keyfile::new_key_file(signer)
            .and_then(|_| phm_proto::keyfile::load_private_key(signer))
    }
    .map_err(|e| CertError::Peer {
        name: signer.display().to_string(),
        reason: e.to_string(),
    })?;
    let now = u64::try_from(phm_proto::query::now_unix_ms()).unwrap_or(0);
    let until = now.saturating_add(days.saturating_mul(86_400_000));
    let mut identities = Vec::new();
    let mut publics = std::collections::BTreeMap::new();
    let mut entries = Vec::new();
    for name in nodes {
        let id = NodeId::new(name.clone()).map_err(|e| relay(name, e))?;
        let identity = NodeIdentity::generate(id).map_err(|e| relay(name, e))?;
        let path = dir.join(format!("{name}.identity"));
        write(&path, identity.to_file_text().as_str(), true)?;
        // The public line beside it, as `phm keys new --kind node` writes it.
        let public = identity.public().to_string();
        write(
            &dir.join(format!("{name}.identity.pub")),
            &format!("{public}\n"),
            false,
        )?;
        publics.insert(name.clone(), public);
        entries.push(RegistryEntry {
            node: identity.public().clone(),
            valid_from_ms: now.saturating_sub(86_400_000),
            valid_until_ms: until,
        });
        identities.push((name.clone(), path));
    }
    let mut registry = Registry::new(federation_id, 1, until, entries);
    registry.sign(&key).map_err(|e| relay("registry", e))?;
    let path = dir.join("registry.toml");
    write(&path, &registry.to_toml(), false)?;
    Ok(DevPeers {
        identities,
        publics,
        registry: path,
        registry_key: phm_proto::signing::public_key_to_base64(&key.verifying_key()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use x509_parser::prelude::*;

    fn read_cert(path: &Path) -> Vec<u8> {
        let pem = std::fs::read(path).unwrap();
        let (_, block) = parse_x509_pem(&pem).unwrap();
        block.contents
    }

    fn sans(cert: &X509Certificate<'_>) -> Vec<String> {
        cert.subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|g| match g {
                GeneralName::DNSName(d) => d.to_string(),
                GeneralName::IPAddress(ip) => format!("{ip:?}"),
                other => format!("{other:?}"),
            })
            .collect()
    }

    #[test]
    fn roles_get_their_own_ca_sans_and_ekus() {
        let dir = tempfile::tempdir().unwrap();
        let plan = CertPlan {
            servers: vec!["A81001".into(), "coordinator".into()],
            infra_clients: vec!["coordinator-client".into()],
            people: vec!["dsu-client".into()],
            legacy: vec![],
        };
        let out = dev(dir.path(), &plan).unwrap();
        assert!(!out.reused_ca && !out.reused_people_ca);
        let infra_der = read_cert(&dir.path().join("ca.pem"));
        let people_der = read_cert(&dir.path().join("people-ca.pem"));
        let (_, infra) = X509Certificate::from_der(&infra_der).unwrap();
        let (_, people) = X509Certificate::from_der(&people_der).unwrap();
        assert_ne!(infra.public_key().raw, people.public_key().raw);
        for leaf in &out.leaves {
            let der = read_cert(&leaf.pem);
            let (_, cert) = X509Certificate::from_der(&der).unwrap();
            let (signer, other) = if leaf.role == LeafRole::Person {
                (&people, &infra)
            } else {
                (&infra, &people)
            };
            cert.verify_signature(Some(signer.public_key())).unwrap();
            assert!(
                cert.verify_signature(Some(other.public_key())).is_err(),
                "{} must not chain to the other CA",
                leaf.name
            );
            let cn = cert.subject().iter_common_name().next().unwrap();
            assert_eq!(cn.as_str().unwrap(), leaf.name);
            let names = sans(&cert);
            let eku = cert.extended_key_usage().unwrap().unwrap().value;
            match leaf.role {
                LeafRole::Server => {
                    assert!(eku.server_auth && !eku.client_auth, "{}", leaf.name);
                    assert!(names.contains(&"localhost".to_string()), "{names:?}");
                    assert!(names.iter().any(|n| n.contains("127")), "{names:?}");
                }
                _ => {
                    assert!(eku.client_auth && !eku.server_auth, "{}", leaf.name);
                    assert_eq!(names, vec![leaf.name.clone()]);
                }
            }
            assert_eq!(
                leaf.spki_pin,
                format!(
                    "spki-sha256:{}",
                    hex::encode(phm_node::server::spki_sha256(&der).unwrap())
                )
            );
        }
        let text = out.describe();
        assert!(text.contains("people CA"), "{text}");
        assert!(
            text.contains("allowed_clients = [\"san:coordinator-client\"]"),
            "{text}"
        );
        assert!(text.contains("spki-sha256:"), "{text}");

        // A second run adds names under the same two CAs.
        let again = dev(
            dir.path(),
            &CertPlan {
                people: vec!["researcher-client".into()],
                ..Default::default()
            },
        )
        .unwrap();
        assert!(again.reused_ca && again.reused_people_ca);
        assert_eq!(read_cert(&dir.path().join("ca.pem")), infra_der);
        assert_eq!(read_cert(&dir.path().join("people-ca.pem")), people_der);
        let der = read_cert(&dir.path().join("researcher-client.pem"));
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        cert.verify_signature(Some(people.public_key())).unwrap();
    }

    #[test]
    fn bad_duplicate_or_no_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let plan = |servers: &[&str], people: &[&str]| CertPlan {
            servers: servers.iter().map(|s| s.to_string()).collect(),
            people: people.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        };
        assert!(matches!(
            dev(dir.path(), &plan(&["bad name"], &[])),
            Err(CertError::BadName(_))
        ));
        assert!(matches!(
            dev(dir.path(), &plan(&["people-ca"], &[])),
            Err(CertError::BadName(_))
        ));
        assert!(matches!(
            dev(dir.path(), &plan(&["x"], &["x"])),
            Err(CertError::Duplicate(_))
        ));
        assert!(matches!(
            dev(dir.path(), &plan(&[], &[])),
            Err(CertError::NoNames)
        ));
    }

    #[test]
    fn legacy_names_keep_both_usages_under_the_infrastructure_ca() {
        let dir = tempfile::tempdir().unwrap();
        let out = dev(
            dir.path(),
            &CertPlan {
                legacy: vec!["dsu-client".into()],
                ..Default::default()
            },
        )
        .unwrap();
        let der = read_cert(&out.leaves[0].pem);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let ca_der = read_cert(&out.ca_pem);
        let (_, ca) = X509Certificate::from_der(&ca_der).unwrap();
        cert.verify_signature(Some(ca.public_key())).unwrap();
    }
}
