//! The messages of the five rounds, as domain types. The integration maps them to and from
//! the `SecAggDown` / `SecAggUp` protobuf messages field by field; nothing here is a wire
//! format except the bytes that are signed or encrypted (see `canon`).
//!
//! Direction: a node sends `AdvertiseKeys`, `ShareKeys`, `MaskedInput`, `ConsistencySig`
//! and `UnmaskShares`; the coordinator sends `Begin`, `PeerKeys`, `ForwardedShares`,
//! `SurvivorSet` and `UnmaskRequest`.

use phm_relay::NodeId;

use crate::canon::Canon;
use crate::crypto::Share;

/// Statement kind of the R0 key advertisement (signed with `sign_statement`).
pub(crate) const KEYS_KIND: &str = "phm-secagg/v1 keys";
/// Statement kind of the R3 survivor-set signature.
pub(crate) const U3_KIND: &str = "phm-secagg/v1 U3";

/// R0 → coordinator: a node's two ephemeral X25519 public keys, signed by its registry
/// identity over (session id, c_pk, s_pk).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertiseKeys {
    pub node: NodeId,
    /// Encrypts R1 shares.
    pub c_pk: [u8; 32],
    /// Derives the pairwise masks.
    pub s_pk: [u8; 32],
    pub signature: [u8; 64],
}

impl AdvertiseKeys {
    pub(crate) fn statement_body(c_pk: &[u8; 32], s_pk: &[u8; 32]) -> Vec<u8> {
        let mut c = Canon::new(KEYS_KIND);
        c.bytes(c_pk).bytes(s_pk);
        c.finish()
    }
}

/// R1 request: every advertisement the coordinator received (U1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerKeys {
    pub keys: Vec<AdvertiseKeys>,
}

/// One encrypted pair of shares from `from` to `to`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedShares {
    pub from: NodeId,
    pub to: NodeId,
    pub ciphertext: Vec<u8>,
}

/// R1 → coordinator: a node's shares for every other member of U1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareKeys {
    pub from: NodeId,
    pub shares: Vec<EncryptedShares>,
}

/// R2 request: the ciphertexts addressed to this node from every member of U2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForwardedShares {
    pub shares: Vec<EncryptedShares>,
}

/// R2 → coordinator: the masked input y_u.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedInput {
    pub from: NodeId,
    pub y: Vec<u64>,
}

/// R3 request: the survivor set U3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurvivorSet {
    pub survivors: Vec<NodeId>,
}

impl SurvivorSet {
    /// What a node signs: U3 sorted, each id length-prefixed.
    pub(crate) fn statement_body(sorted: &[NodeId]) -> Vec<u8> {
        let mut c = Canon::new(U3_KIND);
        c.u64(sorted.len() as u64);
        for id in sorted {
            c.bytes(id.as_str().as_bytes());
        }
        c.finish()
    }
}

/// R3 → coordinator: the node's signature on U3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistencySig {
    pub from: NodeId,
    pub signature: [u8; 64],
}

/// R4 request: the U3 signatures the coordinator collected (from U4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskRequest {
    pub signatures: Vec<ConsistencySig>,
}

/// R4 → coordinator: b-shares of U3's members and s-shares of U2 ∖ U3's; never both for one
/// node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskShares {
    pub from: NodeId,
    pub b_shares: Vec<(NodeId, Share)>,
    pub s_shares: Vec<(NodeId, Share)>,
}
