//! The SecureAggregate stream at the gRPC edge: `SecAggUp`/`SecAggDown` to and from the
//! session's domain messages. The rounds' messages themselves are converted (and checked
//! field by field) by `phm_secagg::wire`; this module handles the steps and the terms.

use crate::linkwire::rounding_name;
use crate::service::{BeginWire, SecureIn, SecureOut, SecureTerms};
use phm_proto::proto;
use phm_proto::proto::sec_agg_down::Step as Down;
use phm_proto::proto::sec_agg_up::Step as Up;
use phm_proto::{Denial, DenialReason, SignedQuery};
use phm_secagg::wire;

fn bad(what: impl Into<String>) -> Denial {
    Denial::new(DenialReason::InvalidQuery, what.into())
}

/// The stream's first message: the signed query.
pub fn open_from_proto(up: Option<proto::SecAggUp>) -> Result<SignedQuery, Denial> {
    let Some(proto::SecAggUp {
        step: Some(Up::Open(o)),
    }) = up
    else {
        return Err(bad(
            "the first message of a SecureAggregate stream must be `open` (the signed query)",
        ));
    };
    let query = o
        .query
        .ok_or_else(|| bad("field `open.query` is missing"))?;
    SignedQuery::try_from(query).map_err(Denial::from)
}

/// A later message from the coordinator.
pub fn up_from_proto(up: proto::SecAggUp) -> SecureIn {
    let step = match up.step {
        Some(s) => s,
        None => return SecureIn::Malformed("a message with no step".into()),
    };
    let m = |e: wire::WireError| SecureIn::Malformed(e.0);
    match step {
        Up::Open(_) => SecureIn::Malformed("a second `open`".into()),
        Up::Begin(b) => match wire::begin_from_proto(&b) {
            Ok(p) => SecureIn::Begin(Box::new(BeginWire {
                session_nonce: p.session_nonce,
                cohort: p.cohort,
                params: p.params,
                registry_digest: p.registry_digest,
            })),
            Err(e) => m(e),
        },
        Up::PeerKeys(k) => wire::peer_keys_from_proto(&k).map_or_else(m, SecureIn::PeerKeys),
        Up::Forwarded(f) => wire::forwarded_from_proto(&f).map_or_else(m, SecureIn::Forwarded),
        Up::Survivors(s) => wire::survivors_from_proto(&s).map_or_else(m, SecureIn::Survivors),
        Up::Unmask(u) => wire::unmask_request_from_proto(&u).map_or_else(m, SecureIn::Unmask),
    }
}

pub fn terms_to_proto(t: &SecureTerms) -> proto::SecAggTerms {
    proto::SecAggTerms {
        layout_digest: t.layout_digest.to_vec(),
        gammas: t.gammas.clone(),
        delta1: t.delta1,
        delta2: t.delta2,
        rho: t.rho,
        min_cohort: t.min_cohort,
        min_survivors: t.min_survivors,
        assumed_noiseless_peers: t.assumed_noiseless_peers,
        min_reportable_count: t.min_reportable_count,
        rounding: rounding_name(t.rounding).to_string(),
        population: t.population,
        epsilon: t.epsilon,
        delta: t.delta,
        group_columns: t.group_columns.clone(),
        keys: t
            .keys
            .iter()
            .map(|k| proto::SecAggCellKey { labels: k.clone() })
            .collect(),
    }
}

pub fn down_to_proto(out: SecureOut) -> proto::SecAggDown {
    let step = match out {
        SecureOut::Terms(t) => Down::Terms(terms_to_proto(&t)),
        SecureOut::Keys(k) => Down::Keys(wire::keys_to_proto(&k)),
        SecureOut::Shares(s) => Down::Shares(wire::share_keys_to_proto(&s)),
        SecureOut::Masked(m) => Down::Masked(wire::masked_to_proto(&m)),
        SecureOut::Signature(s) => Down::Signature(wire::signature_to_proto(&s)),
        SecureOut::Unmask(u) => Down::UnmaskShares(wire::unmask_shares_to_proto(&u)),
    };
    proto::SecAggDown { step: Some(step) }
}
