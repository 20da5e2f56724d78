//! The rounds' messages to and from their `phm.v1` protobuf form (secagg.proto), for the
//! node's and the coordinator's gRPC edges (feature `wire`). Every field from the wire
//! is checked here, so a malformed message is refused with the field that was wrong
//! before either state machine sees it.

use phm_proto::proto;
use phm_relay::NodeId;

use crate::crypto::Share;
use crate::messages::{
    AdvertiseKeys, ConsistencySig, EncryptedShares, ForwardedShares, MaskedInput, PeerKeys,
    ShareKeys, SurvivorSet, UnmaskRequest, UnmaskShares,
};
use crate::params::{MAX_COHORT, SessionParams};

/// What was wrong with a message, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

fn err(field: &str, why: impl std::fmt::Display) -> WireError {
    WireError(format!("field `{field}`: {why}"))
}

fn fixed<const N: usize>(field: &str, b: &[u8]) -> Result<[u8; N], WireError> {
    <[u8; N]>::try_from(b).map_err(|_| err(field, format!("must be {N} bytes, not {}", b.len())))
}

fn node(field: &str, s: &str) -> Result<NodeId, WireError> {
    NodeId::new(s).map_err(|e| err(field, e))
}

/// Most entries a list may hold: a share or key per member at most.
fn at_most<T>(field: &str, v: &[T], max: usize) -> Result<(), WireError> {
    if v.len() > max {
        return Err(err(field, format!("{} entries; at most {max}", v.len())));
    }
    Ok(())
}

pub fn keys_to_proto(k: &AdvertiseKeys) -> proto::SecAggKeys {
    proto::SecAggKeys {
        node: k.node.as_str().to_string(),
        c_pk: k.c_pk.to_vec(),
        s_pk: k.s_pk.to_vec(),
        signature: k.signature.to_vec(),
    }
}

pub fn keys_from_proto(k: &proto::SecAggKeys) -> Result<AdvertiseKeys, WireError> {
    Ok(AdvertiseKeys {
        node: node("keys.node", &k.node)?,
        c_pk: fixed("keys.c_pk", &k.c_pk)?,
        s_pk: fixed("keys.s_pk", &k.s_pk)?,
        signature: fixed("keys.signature", &k.signature)?,
    })
}

pub fn peer_keys_to_proto(p: &PeerKeys) -> proto::SecAggPeerKeys {
    proto::SecAggPeerKeys {
        keys: p.keys.iter().map(keys_to_proto).collect(),
    }
}

pub fn peer_keys_from_proto(p: &proto::SecAggPeerKeys) -> Result<PeerKeys, WireError> {
    at_most("peer_keys.keys", &p.keys, MAX_COHORT)?;
    Ok(PeerKeys {
        keys: p
            .keys
            .iter()
            .map(keys_from_proto)
            .collect::<Result<_, _>>()?,
    })
}

fn ciphertexts_to_proto(shares: &[EncryptedShares]) -> proto::SecAggShares {
    proto::SecAggShares {
        shares: shares
            .iter()
            .map(|s| proto::SecAggCiphertext {
                from: s.from.as_str().to_string(),
                to: s.to.as_str().to_string(),
                ciphertext: s.ciphertext.clone(),
            })
            .collect(),
    }
}

fn ciphertexts_from_proto(p: &proto::SecAggShares) -> Result<Vec<EncryptedShares>, WireError> {
    at_most("shares", &p.shares, MAX_COHORT)?;
    p.shares
        .iter()
        .map(|s| {
            if s.ciphertext.len() != crate::SHARE_CIPHERTEXT_LEN {
                return Err(err(
                    "shares.ciphertext",
                    format!(
                        "must be {} bytes, not {}",
                        crate::SHARE_CIPHERTEXT_LEN,
                        s.ciphertext.len()
                    ),
                ));
            }
            Ok(EncryptedShares {
                from: node("shares.from", &s.from)?,
                to: node("shares.to", &s.to)?,
                ciphertext: s.ciphertext.clone(),
            })
        })
        .collect()
}

/// R1 from a node: every ciphertext must be from `from`.
pub fn share_keys_to_proto(s: &ShareKeys) -> proto::SecAggShares {
    ciphertexts_to_proto(&s.shares)
}

pub fn share_keys_from_proto(
    from: &NodeId,
    p: &proto::SecAggShares,
) -> Result<ShareKeys, WireError> {
    Ok(ShareKeys {
        from: from.clone(),
        shares: ciphertexts_from_proto(p)?,
    })
}

pub fn forwarded_to_proto(f: &ForwardedShares) -> proto::SecAggShares {
    ciphertexts_to_proto(&f.shares)
}

pub fn forwarded_from_proto(p: &proto::SecAggShares) -> Result<ForwardedShares, WireError> {
    Ok(ForwardedShares {
        shares: ciphertexts_from_proto(p)?,
    })
}

pub fn masked_to_proto(m: &MaskedInput) -> proto::SecAggMasked {
    proto::SecAggMasked { y: m.y.clone() }
}

pub fn masked_from_proto(from: &NodeId, p: &proto::SecAggMasked) -> MaskedInput {
    MaskedInput {
        from: from.clone(),
        y: p.y.clone(),
    }
}

pub fn survivors_to_proto(s: &SurvivorSet) -> proto::SecAggSurvivors {
    proto::SecAggSurvivors {
        survivors: s.survivors.iter().map(|n| n.as_str().to_string()).collect(),
    }
}

pub fn survivors_from_proto(p: &proto::SecAggSurvivors) -> Result<SurvivorSet, WireError> {
    at_most("survivors", &p.survivors, MAX_COHORT)?;
    Ok(SurvivorSet {
        survivors: p
            .survivors
            .iter()
            .map(|s| node("survivors", s))
            .collect::<Result<_, _>>()?,
    })
}

pub fn signature_to_proto(s: &ConsistencySig) -> proto::SecAggSignature {
    proto::SecAggSignature {
        node: s.from.as_str().to_string(),
        signature: s.signature.to_vec(),
    }
}

pub fn signature_from_proto(p: &proto::SecAggSignature) -> Result<ConsistencySig, WireError> {
    Ok(ConsistencySig {
        from: node("signature.node", &p.node)?,
        signature: fixed("signature.signature", &p.signature)?,
    })
}

pub fn unmask_request_to_proto(r: &UnmaskRequest) -> proto::SecAggUnmaskRequest {
    proto::SecAggUnmaskRequest {
        signatures: r.signatures.iter().map(signature_to_proto).collect(),
    }
}

pub fn unmask_request_from_proto(
    p: &proto::SecAggUnmaskRequest,
) -> Result<UnmaskRequest, WireError> {
    at_most("unmask.signatures", &p.signatures, MAX_COHORT)?;
    Ok(UnmaskRequest {
        signatures: p
            .signatures
            .iter()
            .map(signature_from_proto)
            .collect::<Result<_, _>>()?,
    })
}

fn shares_to_proto(v: &[(NodeId, Share)]) -> Vec<proto::SecAggShare> {
    v.iter()
        .map(|(n, s)| proto::SecAggShare {
            node: n.as_str().to_string(),
            share: s.as_bytes().to_vec(),
        })
        .collect()
}

fn shares_from_proto(
    field: &str,
    v: &[proto::SecAggShare],
) -> Result<Vec<(NodeId, Share)>, WireError> {
    at_most(field, v, MAX_COHORT)?;
    v.iter()
        .map(|s| {
            let share = Share::from_bytes(&s.share).ok_or_else(|| {
                err(
                    field,
                    format!("a share must be {} bytes with x ≠ 0", crate::SHARE_LEN),
                )
            })?;
            Ok((node(field, &s.node)?, share))
        })
        .collect()
}

pub fn unmask_shares_to_proto(u: &UnmaskShares) -> proto::SecAggUnmaskShares {
    proto::SecAggUnmaskShares {
        b_shares: shares_to_proto(&u.b_shares),
        s_shares: shares_to_proto(&u.s_shares),
    }
}

pub fn unmask_shares_from_proto(
    from: &NodeId,
    p: &proto::SecAggUnmaskShares,
) -> Result<UnmaskShares, WireError> {
    Ok(UnmaskShares {
        from: from.clone(),
        b_shares: shares_from_proto("unmask_shares.b_shares", &p.b_shares)?,
        s_shares: shares_from_proto("unmask_shares.s_shares", &p.s_shares)?,
    })
}

pub fn params_to_proto(p: &SessionParams) -> proto::SecAggParams {
    proto::SecAggParams {
        n: p.n,
        t_sss: p.t_sss,
        t_noise: p.t_noise,
        c: p.c,
        lattice: p.lattice,
        gammas: p.gammas.clone(),
        layout_digest: p.layout_digest.to_vec(),
        sigma_share: p.sigma_share,
    }
}

/// The parameters as announced; their rules are checked by `SessionParams::check` and
/// each node's policy in R0, not here.
pub fn params_from_proto(p: &proto::SecAggParams) -> Result<SessionParams, WireError> {
    Ok(SessionParams {
        n: p.n,
        t_sss: p.t_sss,
        t_noise: p.t_noise,
        c: p.c,
        lattice: p.lattice,
        gammas: p.gammas.clone(),
        layout_digest: fixed("params.layout_digest", &p.layout_digest)?,
        sigma_share: p.sigma_share,
    })
}

/// R0's request without the query id and digest (which each node takes from the signed
/// query it verified).
pub struct BeginParts {
    pub session_nonce: Vec<u8>,
    pub cohort: Vec<NodeId>,
    pub params: SessionParams,
    /// `phm_relay::Registry::digest` of the coordinator's registry: the node must hold the same.
    pub registry_digest: [u8; 32],
}

pub fn begin_to_proto(b: &crate::Begin) -> proto::SecAggBegin {
    proto::SecAggBegin {
        session_nonce: b.session_nonce.clone(),
        cohort: b.cohort.iter().map(|n| n.as_str().to_string()).collect(),
        params: Some(params_to_proto(&b.params)),
        registry_digest: b.registry.digest().to_vec(),
    }
}

pub fn begin_from_proto(p: &proto::SecAggBegin) -> Result<BeginParts, WireError> {
    at_most("begin.cohort", &p.cohort, MAX_COHORT)?;
    let params = p
        .params
        .as_ref()
        .ok_or_else(|| err("begin.params", "missing"))?;
    Ok(BeginParts {
        session_nonce: p.session_nonce.clone(),
        cohort: p
            .cohort
            .iter()
            .map(|s| node("begin.cohort", s))
            .collect::<Result<_, _>>()?,
        params: params_from_proto(params)?,
        registry_digest: fixed("begin.registry_digest", &p.registry_digest)?,
    })
}
