//! This node's place among its peers, for linked and secure queries: its identity
//! (the secret keys it seals and signs frames with) and the federation's node registry,
//! signed by the IG leads' key that its own policy pins. Loaded and checked at start-up,
//! so a node that is set up to take part in sealed exchanges but cannot (a wrong key, a
//! registry that does not list it, an identity file others can read) does not start.

use crate::config::{NodeConfig, PeerFiles};
use phm_policies::Policy;
use phm_relay::{NodeIdentity, Registry, VerifiedRegistry};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error(
        "the policy pins a node registry key ([peers] registry_key) but {config} has no [peer] section: add identity = \"…\" and registry = \"…\" (see `phm-node --help`)"
    )]
    NoFiles { config: PathBuf },
    #[error(
        "{config} has a [peer] section but the policy pins no node registry key: add [peers] registry_key to the policy (the IG leads' registry key), or remove [peer]"
    )]
    NoRegistryKey { config: PathBuf },
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "the identity file {path} is readable by group or others (mode {mode:o}); it holds this node's secret keys: chmod 600 it"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error("identity file {path}: {reason}")]
    Identity { path: PathBuf, reason: String },
    #[error("node registry {path}: {reason}")]
    Registry { path: PathBuf, reason: String },
}

/// The checked identity and registry.
pub struct Peer {
    pub identity: NodeIdentity,
    /// The registry as read; verify it again for each session, so expiry is seen.
    pub registry: Registry,
    pub registry_key: ed25519_dalek::VerifyingKey,
}

impl std::fmt::Debug for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Peer")
            .field("identity", &self.identity)
            .field("registry_serial", &self.registry.serial)
            .finish_non_exhaustive()
    }
}

impl Peer {
    /// The registry, verified now under the pinned key.
    pub fn verified(&self, now_ms: u64) -> Result<VerifiedRegistry, phm_relay::RelayError> {
        self.registry.verify(&self.registry_key, now_ms)
    }
}

fn read(what: &'static str, path: &Path) -> Result<String, PeerError> {
    std::fs::read_to_string(path).map_err(|source| PeerError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

/// Secret keys readable by anyone but the node's own user are refused, as ssh does.
#[cfg(unix)]
fn private_to_owner(path: &Path) -> Result<(), PeerError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| PeerError::Read {
        what: "identity file",
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(PeerError::Exposed {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn private_to_owner(_path: &Path) -> Result<(), PeerError> {
    Ok(())
}

fn now_ms() -> u64 {
    u64::try_from(phm_proto::query::now_unix_ms()).unwrap_or(0)
}

/// Load and check `[peer]` against the policy's `[peers]`: both or neither. With both,
/// the identity file is private to the node's user, the registry verifies under the
/// pinned key, is for this node's federation, and lists this node's identity.
pub fn load(config: &NodeConfig, policy: &Policy) -> Result<Option<Peer>, PeerError> {
    let (files, key) = match (&config.peer, policy.registry_key()) {
        (None, None) => return Ok(None),
        (None, Some(_)) => {
            return Err(PeerError::NoFiles {
                config: config.source.clone(),
            });
        }
        (Some(_), None) => {
            return Err(PeerError::NoRegistryKey {
                config: config.source.clone(),
            });
        }
        (Some(files), Some(key)) => (files, key),
    };
    load_files(files, &config.federation_id, key, now_ms()).map(Some)
}

fn load_files(
    files: &PeerFiles,
    federation_id: &str,
    registry_key: ed25519_dalek::VerifyingKey,
    now_ms: u64,
) -> Result<Peer, PeerError> {
    let id_path = &files.identity;
    private_to_owner(id_path)?;
    let text = zeroize::Zeroizing::new(read("identity file", id_path)?);
    let identity = NodeIdentity::from_file_text(&text).map_err(|e| PeerError::Identity {
        path: id_path.clone(),
        reason: e.to_string(),
    })?;
    let reg_path = &files.registry;
    let registry_err = |reason: String| PeerError::Registry {
        path: reg_path.clone(),
        reason,
    };
    let registry = Registry::parse(&read("node registry", reg_path)?)
        .map_err(|e| registry_err(e.to_string()))?;
    let verified = registry.verify(&registry_key, now_ms).map_err(|e| {
        registry_err(format!(
            "{e} (checked against the policy's [peers] registry_key)"
        ))
    })?;
    if verified.federation_id() != federation_id {
        return Err(registry_err(format!(
            "it is the registry of federation {:?}, but this node belongs to {federation_id:?}",
            verified.federation_id()
        )));
    }
    verified.check_identity(&identity).map_err(|e| {
        registry_err(format!(
            "{e} (this node's identity is {})",
            identity.public()
        ))
    })?;
    Ok(Peer {
        identity,
        registry,
        registry_key,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use ed25519_dalek::SigningKey;
    use phm_relay::{NodeId, RegistryEntry};

    const FED: &str = "test-ics";
    const NOW: u64 = 1_800_000_000_000;

    struct Setup {
        _dir: tempfile::TempDir,
        files: PeerFiles,
        signer: SigningKey,
        identity_public: phm_relay::NodePublic,
    }

    fn write_registry(path: &Path, fed: &str, nodes: &[&phm_relay::NodePublic], key: &SigningKey) {
        let mut r = Registry::new(
            fed,
            1,
            NOW + 86_400_000,
            nodes
                .iter()
                .map(|n| RegistryEntry {
                    node: (*n).clone(),
                    valid_from_ms: 0,
                    valid_until_ms: NOW + 86_400_000,
                })
                .collect(),
        );
        r.sign(key).unwrap();
        std::fs::write(path, r.to_toml()).unwrap();
    }

    fn setup() -> Setup {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let me = NodeIdentity::generate(NodeId::new("A81001").unwrap()).unwrap();
        let other = NodeIdentity::generate(NodeId::new("RW2").unwrap()).unwrap();
        let signer = SigningKey::generate(&mut rand::rngs::OsRng);
        let identity = dir.path().join("A81001.identity");
        std::fs::write(&identity, me.to_file_text().as_str()).unwrap();
        std::fs::set_permissions(&identity, std::fs::Permissions::from_mode(0o600)).unwrap();
        let registry = dir.path().join("registry.toml");
        write_registry(&registry, FED, &[me.public(), other.public()], &signer);
        Setup {
            identity_public: me.public().clone(),
            _dir: dir,
            files: PeerFiles { identity, registry },
            signer,
        }
    }

    #[test]
    fn a_registry_signed_by_the_pinned_key_and_listing_this_node_is_accepted() {
        let s = setup();
        let peer = load_files(&s.files, FED, s.signer.verifying_key(), NOW).unwrap();
        assert_eq!(peer.identity.public(), &s.identity_public);
        assert!(peer.verified(NOW).is_ok());
    }

    #[test]
    fn a_registry_signed_by_another_key_is_refused() {
        let s = setup();
        let stranger = SigningKey::generate(&mut rand::rngs::OsRng);
        let e = load_files(&s.files, FED, stranger.verifying_key(), NOW).unwrap_err();
        assert!(e.to_string().contains("registry_key"), "{e}");
    }

    #[test]
    fn a_registry_of_another_federation_or_without_this_node_is_refused() {
        let s = setup();
        let e = load_files(&s.files, "another-ics", s.signer.verifying_key(), NOW).unwrap_err();
        assert!(e.to_string().contains("another-ics"), "{e}");
        let stranger = NodeIdentity::generate(NodeId::new("ZZ999").unwrap()).unwrap();
        write_registry(&s.files.registry, FED, &[stranger.public()], &s.signer);
        let e = load_files(&s.files, FED, s.signer.verifying_key(), NOW).unwrap_err();
        assert!(e.to_string().contains("A81001"), "{e}");
    }

    #[test]
    fn an_expired_registry_is_refused() {
        let s = setup();
        let later = NOW + 2 * 86_400_000;
        assert!(load_files(&s.files, FED, s.signer.verifying_key(), later).is_err());
    }

    #[test]
    fn an_identity_file_others_can_read_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let s = setup();
        std::fs::set_permissions(&s.files.identity, std::fs::Permissions::from_mode(0o644))
            .unwrap();
        let e = load_files(&s.files, FED, s.signer.verifying_key(), NOW).unwrap_err();
        assert!(matches!(e, PeerError::Exposed { mode: 0o644, .. }), "{e}");
    }
}
