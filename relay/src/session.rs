//! Session ids: one 32-byte name for one run of a protocol, which every frame header,
//! HPKE `info` and statement signature carries, so nothing from one run is accepted in
//! another.
//!
//! Every participant recomputes it from what it was told (the query it verified, the
//! coordinator's nonce, the cohort, the parameters) instead of trusting the coordinator's
//! copy: if the coordinator told two nodes different cohorts or parameters, their session
//! ids differ and none of their frames opens at the other.

use sha2::{Digest as _, Sha256};

use crate::canon::Canon;
use crate::error::RelayError;
use crate::frame::Protocol;
use crate::identity::NodePublic;

/// Domain label of the session id hash.
const SESSION_LABEL: &str = "phm-session/v1";
/// Shortest session nonce: 128 bits, as the query nonce.
pub const MIN_SESSION_NONCE_LEN: usize = 16;
/// Longest session nonce.
pub const MAX_SESSION_NONCE_LEN: usize = 64;

/// `SHA-256(label, protocol, query digest, session nonce, params, cohort)`, where the
/// cohort is the members' (node id, Ed25519 signing key), sorted by node id so that the
/// order the coordinator lists them in does not matter. `params` is the protocol's own
/// canonical encoding of whatever all members must agree on (secure aggregation: N,
/// thresholds, layout digest, σ; linkage: roles); it is length-prefixed, so the protocol
/// need not frame it.
///
/// Refuses an empty cohort, a node named twice and a nonce outside
/// [`MIN_SESSION_NONCE_LEN`]..=[`MAX_SESSION_NONCE_LEN`] bytes.
pub fn session_id<'a>(
    protocol: Protocol,
    query_digest: &[u8; 32],
    session_nonce: &[u8],
    cohort: impl IntoIterator<Item = &'a NodePublic>,
    params: &[u8],
) -> Result<[u8; 32], RelayError> {
    if !(MIN_SESSION_NONCE_LEN..=MAX_SESSION_NONCE_LEN).contains(&session_nonce.len()) {
        return Err(RelayError::BadNonce {
            len: session_nonce.len(),
            min: MIN_SESSION_NONCE_LEN,
            max: MAX_SESSION_NONCE_LEN,
        });
    }
    let mut members: Vec<&NodePublic> = cohort.into_iter().collect();
    if members.is_empty() {
        return Err(RelayError::InvalidSession("the cohort is empty".into()));
    }
    members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
    if let Some(w) = members.windows(2).find(|w| w[0].node_id == w[1].node_id) {
        return Err(RelayError::DuplicateCohortMember(w[0].node_id.clone()));
    }
    let mut c = Canon::new(SESSION_LABEL);
    c.bytes(protocol.label().as_bytes())
        .fixed(query_digest)
        .bytes(session_nonce)
        .bytes(params)
        .u64(members.len() as u64);
    for m in members {
        c.bytes(m.node_id.as_str().as_bytes())
            .fixed(m.signing_key.as_bytes());
    }
    Ok(Sha256::digest(c.finish()).into())
}

/// Decode a query digest as phm-proto prints it (`QueryBody::digest`: 64 hex digits).
pub fn parse_digest(hex_digest: &str) -> Result<[u8; 32], RelayError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_digest.trim(), &mut out).map_err(|e| {
        RelayError::InvalidSession(format!("query digest is not 64 hex digits: {e}"))
    })?;
    Ok(out)
}
