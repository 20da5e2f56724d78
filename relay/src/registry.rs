//! The federation registry: every node's id and public keys with their validity, signed by
//! the IG leads' registry key (Ed25519), which each node pins.
//!
//! The coordinator may carry the registry to nodes, but cannot change it: nodes accept only
//! a registry that verifies under their pinned key. This is the PKI assumption of secure
//! aggregation (Bonawitz et al.) and of linkage: whoever holds the registry key can add
//! nodes, so it must not be the coordinator operator's.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;

use crate::canon::Canon;
use crate::error::RelayError;
use crate::identity::{
    HpkePublicKey, NodeId, NodeIdentity, NodePublic, signing_key_from_base64,
    signing_key_to_base64, validate_federation_id,
};

/// Domain label of the registry's signed bytes.
const REGISTRY_LABEL: &str = "phm-registry/v1";

/// One node as the registry lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegistryEntry {
    pub node: NodePublic,
    /// First instant (unix ms) at which the node's keys are valid.
    pub valid_from_ms: u64,
    /// First instant (unix ms) at which they are no longer valid.
    pub valid_until_ms: u64,
}

/// A registry as read from its file or built by `phm registry sign`; nothing is trusted
/// until [`Registry::verify`] returns a [`VerifiedRegistry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registry {
    pub federation_id: String,
    /// Incremented on every re-issue, so a node can refuse to go back to an older registry
    /// (one that still lists a withdrawn node) once it has seen a newer one.
    pub serial: u64,
    /// The whole registry stops being valid at this instant (unix ms): the IG leads re-sign
    /// it periodically, which bounds how long a registry withdrawn by a newer one stays usable.
    pub valid_until_ms: u64,
    pub nodes: Vec<RegistryEntry>,
    signature: Option<[u8; 64]>,
}

impl Registry {
    /// An unsigned registry.
    pub fn new(
        federation_id: impl Into<String>,
        serial: u64,
        valid_until_ms: u64,
        nodes: Vec<RegistryEntry>,
    ) -> Registry {
        Registry {
            federation_id: federation_id.into(),
            serial,
            valid_until_ms,
            nodes,
            signature: None,
        }
    }

    /// The signature, if signed.
    pub fn signature(&self) -> Option<&[u8; 64]> {
        self.signature.as_ref()
    }

    /// The canonical bytes the registry key signs: label, federation id, serial, expiry and
    /// the node entries sorted by node id (so the order of the file does not matter), each
    /// field length-prefixed.
    pub fn signing_bytes(&self) -> Vec<u8> {
        let mut nodes: Vec<&RegistryEntry> = self.nodes.iter().collect();
        nodes.sort_by(|a, b| a.node.node_id.cmp(&b.node.node_id));
        let mut c = Canon::new(REGISTRY_LABEL);
        c.bytes(self.federation_id.as_bytes())
            .u64(self.serial)
            .u64(self.valid_until_ms)
            .u64(nodes.len() as u64);
        for e in nodes {
            c.bytes(e.node.node_id.as_str().as_bytes())
                .fixed(e.node.signing_key.as_bytes())
                .fixed(&e.node.hpke_key.to_bytes())
                .u64(e.valid_from_ms)
                .u64(e.valid_until_ms);
        }
        c.finish()
    }

    /// SHA-256 of [`Registry::signing_bytes`]: a short name for exactly this registry, to
    /// bind into a session's params or show in an audit entry.
    pub fn digest(&self) -> [u8; 32] {
        Sha256::digest(self.signing_bytes()).into()
    }

    /// Check the contents (ids, no duplicate node or key, non-empty windows, the registry
    /// key not used by a node) and sign with the IG leads' registry key. What
    /// `phm registry sign` calls: it refuses to sign a registry that nodes would refuse.
    pub fn sign(&mut self, registry_key: &SigningKey) -> Result<(), RelayError> {
        self.check_contents(&registry_key.verifying_key())?;
        self.signature = Some(registry_key.sign(&self.signing_bytes()).to_bytes());
        Ok(())
    }

    /// Sign without checking the contents, to test that [`Registry::verify`] checks them.
    #[cfg(test)]
    pub(crate) fn sign_unchecked(&mut self, registry_key: &SigningKey) {
        self.signature = Some(registry_key.sign(&self.signing_bytes()).to_bytes());
    }

    /// Verify under the pinned registry key at `now_ms`: refuses an unsigned registry, one
    /// signed by another key or altered after signing, an expired one, and one that lists a
    /// node or a key twice. Nodes outside their own validity window at `now_ms` are left out
    /// of the result: a frame from them is refused as from an unknown sender.
    ///
    /// Verify again for each session (it is cheap), so that expiry is seen.
    pub fn verify(
        &self,
        pinned_registry_key: &VerifyingKey,
        now_ms: u64,
    ) -> Result<VerifiedRegistry, RelayError> {
        let signature = self.signature.ok_or(RelayError::RegistryUnsigned)?;
        pinned_registry_key
            .verify_strict(&self.signing_bytes(), &Signature::from_bytes(&signature))
            .map_err(|_| RelayError::RegistrySignature)?;
        if now_ms >= self.valid_until_ms {
            return Err(RelayError::RegistryExpired {
                valid_until_ms: self.valid_until_ms,
                now_ms,
            });
        }
        self.check_contents(pinned_registry_key)?;
        let nodes = self
            .nodes
            .iter()
            .filter(|e| e.valid_from_ms <= now_ms && now_ms < e.valid_until_ms)
            .map(|e| (e.node.node_id.clone(), e.node.clone()))
            .collect();
        Ok(VerifiedRegistry {
            federation_id: self.federation_id.clone(),
            serial: self.serial,
            digest: self.digest(),
            verified_at_ms: now_ms,
            nodes,
        })
    }

    fn check_contents(&self, registry_key: &VerifyingKey) -> Result<(), RelayError> {
        validate_federation_id(&self.federation_id)?;
        let mut ids: HashSet<&NodeId> = HashSet::new();
        let mut signing: HashMap<[u8; 32], &NodeId> = HashMap::new();
        let mut hpke: HashMap<[u8; 32], &NodeId> = HashMap::new();
        for e in &self.nodes {
            let id = &e.node.node_id;
            if !ids.insert(id) {
                return Err(RelayError::DuplicateNode(id.clone()));
            }
            if e.node.signing_key == *registry_key {
                return Err(RelayError::RegistryKeyIsNodeKey(id.clone()));
            }
            if let Some(first) = signing.insert(e.node.signing_key.to_bytes(), id) {
                return Err(RelayError::DuplicateKey {
                    first: first.clone(),
                    second: id.clone(),
                    which: "signing",
                });
            }
            if let Some(first) = hpke.insert(e.node.hpke_key.to_bytes(), id) {
                return Err(RelayError::DuplicateKey {
                    first: first.clone(),
                    second: id.clone(),
                    which: "HPKE",
                });
            }
            if e.valid_from_ms >= e.valid_until_ms {
                return Err(RelayError::EmptyValidity {
                    node: id.clone(),
                    from: e.valid_from_ms,
                    until: e.valid_until_ms,
                });
            }
        }
        Ok(())
    }

    /// The registry file (TOML), signature included when signed. Deterministic: entries in
    /// the order held, which [`Registry::parse`] keeps.
    pub fn to_toml(&self) -> String {
        // Every other value written here is a validated node id (letters, digits,
        // `_ - . : @`), base64 or a number, so none needs TOML escaping.
        let mut out = String::new();
        out.push_str("# phm federation registry. Signed by the IG leads' registry key;\n");
        out.push_str("# any change after signing makes every node refuse it.\n");
        out.push_str("version = 1\n");
        // The federation id is checked only when signing or verifying; quote it as TOML
        // does, so even an invalid one cannot break the file's structure.
        let federation_id = toml::Value::String(self.federation_id.clone());
        out.push_str(&format!("federation_id = {federation_id}\n"));
        out.push_str(&format!("serial = {}\n", self.serial));
        out.push_str(&format!("valid_until_ms = {}\n", self.valid_until_ms));
        if let Some(sig) = &self.signature {
            out.push_str(&format!("signature = \"{}\"\n", B64.encode(sig)));
        }
        for e in &self.nodes {
            out.push_str("\n[[nodes]]\n");
            out.push_str(&format!("node_id = \"{}\"\n", e.node.node_id));
            out.push_str(&format!(
                "signing_key = \"{}\"\n",
                signing_key_to_base64(&e.node.signing_key)
            ));
            out.push_str(&format!("hpke_key = \"{}\"\n", e.node.hpke_key.to_base64()));
            out.push_str(&format!("valid_from_ms = {}\n", e.valid_from_ms));
            out.push_str(&format!("valid_until_ms = {}\n", e.valid_until_ms));
        }
        out
    }

    /// Parse a registry file. Structure only (ids, keys, numbers); trust comes from
    /// [`Registry::verify`]. Errors carry the 1-based line.
    pub fn parse(text: &str) -> Result<Registry, RelayError> {
        let file: RegistryFile = toml::from_str(text).map_err(|e| RelayError::RegistryFile {
            line: e.span().map(|s| line_of(text, s.start)),
            message: e.message().to_owned(),
        })?;
        let at = |span: std::ops::Range<usize>, e: RelayError| RelayError::RegistryFile {
            line: Some(line_of(text, span.start)),
            message: e.to_string(),
        };
        if *file.version.get_ref() != 1 {
            return Err(RelayError::RegistryFile {
                line: Some(line_of(text, file.version.span().start)),
                message: "this code reads registry files of version 1 only".into(),
            });
        }
        validate_federation_id(file.federation_id.get_ref())
            .map_err(|e| at(file.federation_id.span(), e))?;
        let signature = match &file.signature {
            None => None,
            Some(s) => {
                let bytes =
                    B64.decode(s.get_ref().trim())
                        .map_err(|_| RelayError::RegistryFile {
                            line: Some(line_of(text, s.span().start)),
                            message: "signature is not valid standard base64".into(),
                        })?;
                let sig: [u8; 64] =
                    bytes
                        .as_slice()
                        .try_into()
                        .map_err(|_| RelayError::RegistryFile {
                            line: Some(line_of(text, s.span().start)),
                            message: format!(
                                "signature is {} bytes; an Ed25519 signature is 64",
                                bytes.len()
                            ),
                        })?;
                Some(sig)
            }
        };
        let mut nodes = Vec::with_capacity(file.nodes.len());
        for n in file.nodes {
            let node_id =
                NodeId::new(n.node_id.get_ref().clone()).map_err(|e| at(n.node_id.span(), e))?;
            let signing_key = signing_key_from_base64(n.signing_key.get_ref())
                .map_err(|e| at(n.signing_key.span(), e))?;
            let hpke_key = HpkePublicKey::from_base64(n.hpke_key.get_ref())
                .map_err(|e| at(n.hpke_key.span(), e))?;
            nodes.push(RegistryEntry {
                node: NodePublic {
                    node_id,
                    signing_key,
                    hpke_key,
                },
                valid_from_ms: n.valid_from_ms,
                valid_until_ms: n.valid_until_ms,
            });
        }
        Ok(Registry {
            federation_id: file.federation_id.into_inner(),
            serial: file.serial,
            valid_until_ms: file.valid_until_ms,
            nodes,
            signature,
        })
    }
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()
        .iter()
        .take(offset)
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// The file as TOML sees it. `deny_unknown_fields`: a misspelt field must not be dropped
/// silently (it would then not be what the IG leads meant to sign).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    version: toml::Spanned<u32>,
    federation_id: toml::Spanned<String>,
    serial: u64,
    valid_until_ms: u64,
    signature: Option<toml::Spanned<String>>,
    #[serde(default)]
    nodes: Vec<NodeRow>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeRow {
    node_id: toml::Spanned<String>,
    signing_key: toml::Spanned<String>,
    hpke_key: toml::Spanned<String>,
    valid_from_ms: u64,
    valid_until_ms: u64,
}

/// A registry that verified under the pinned key, restricted to the nodes valid when it
/// was verified. The only source of sender keys for [`crate::open`].
#[derive(Debug, Clone)]
pub struct VerifiedRegistry {
    federation_id: String,
    serial: u64,
    digest: [u8; 32],
    verified_at_ms: u64,
    nodes: BTreeMap<NodeId, NodePublic>,
}

impl VerifiedRegistry {
    pub fn federation_id(&self) -> &str {
        &self.federation_id
    }

    pub fn serial(&self) -> u64 {
        self.serial
    }

    /// [`Registry::digest`] of the registry this came from.
    pub fn digest(&self) -> [u8; 32] {
        self.digest
    }

    /// The `now_ms` it was verified at.
    pub fn verified_at_ms(&self) -> u64 {
        self.verified_at_ms
    }

    /// A node valid at verification time.
    pub fn get(&self, node_id: &NodeId) -> Option<&NodePublic> {
        self.nodes.get(node_id)
    }

    /// Every node valid at verification time, by node id.
    pub fn nodes(&self) -> impl Iterator<Item = &NodePublic> {
        self.nodes.values()
    }

    /// Check that the registry lists this node with exactly this identity's keys, as a node
    /// should at start-up: a mismatch means a wrong identity file or a stale registry, and
    /// every frame to it would fail to open.
    pub fn check_identity(&self, me: &NodeIdentity) -> Result<(), RelayError> {
        match self.get(me.node_id()) {
            None => Err(RelayError::NotInRegistry(me.node_id().clone())),
            Some(listed) if listed != me.public() => {
                Err(RelayError::IdentityMismatch(me.node_id().clone()))
            }
            Some(_) => Ok(()),
        }
    }

    /// The cohort members' public keys, in the order given, refusing any node the registry
    /// does not list (as valid) and any named twice.
    pub fn cohort(&self, ids: &[NodeId]) -> Result<Vec<&NodePublic>, RelayError> {
        let mut seen = BTreeSet::new();
        ids.iter()
            .map(|id| {
                if !seen.insert(id) {
                    return Err(RelayError::DuplicateCohortMember(id.clone()));
                }
                self.get(id)
                    .ok_or_else(|| RelayError::NotInRegistry(id.clone()))
            })
            .collect()
    }
}
