//! The Link stream at the gRPC edge: `LinkUp`/`LinkDown` to and from the service's
//! domain messages, and `RelayFrame` to and from phm-relay's `SealedFrame`. Every field
//! from the wire is checked here, so a malformed frame is refused with what was wrong
//! before the session sees it.

use crate::service::{Answer, LinkIn, LinkOpen, LinkOut, LinkTerms};
use phm_policies::model::{LinkRole, Rounding, Scope};
use phm_proto::proto;
use phm_proto::proto::link_down::Step as Down;
use phm_proto::proto::link_up::Step as Up;
use phm_proto::{Denial, DenialReason, SignedQuery};
use phm_relay::{Header, NodeId, Protocol, SealedFrame};

fn bad(what: impl Into<String>) -> Denial {
    Denial::new(DenialReason::InvalidQuery, what.into())
}

fn fixed<const N: usize>(field: &str, b: &[u8]) -> Result<[u8; N], String> {
    <[u8; N]>::try_from(b).map_err(|_| format!("{field} must be {N} bytes, not {}", b.len()))
}

/// A relayed frame, checked field by field.
pub fn frame_from_proto(f: proto::RelayFrame) -> Result<SealedFrame, String> {
    let protocol = Protocol::from_label(&f.protocol)
        .ok_or_else(|| format!("unknown frame protocol {:?}", f.protocol))?;
    let from = NodeId::new(&f.from).map_err(|e| format!("frame sender: {e}"))?;
    let to = NodeId::new(&f.to).map_err(|e| format!("frame recipient: {e}"))?;
    let header = Header {
        protocol,
        federation_id: f.federation_id,
        query_digest: fixed("query_digest", &f.query_digest)?,
        session_id: fixed("session_id", &f.session_id)?,
        from,
        to,
        round: f.round,
        seq: f.seq,
        last: f.last,
    };
    SealedFrame::from_parts(header, &f.enc, f.ciphertext, &f.signature).map_err(|e| e.to_string())
}

pub fn frame_to_proto(f: &SealedFrame) -> proto::RelayFrame {
    let h = f.header();
    proto::RelayFrame {
        protocol: h.protocol.label().to_string(),
        federation_id: h.federation_id.clone(),
        query_digest: h.query_digest.to_vec(),
        session_id: h.session_id.to_vec(),
        from: h.from.as_str().to_string(),
        to: h.to.as_str().to_string(),
        round: h.round,
        seq: h.seq,
        last: h.last,
        enc: f.enc().to_vec(),
        ciphertext: f.ciphertext().to_vec(),
        signature: f.signature().to_vec(),
    }
}

pub(crate) fn rounding_from(s: &str) -> Result<Rounding, String> {
    match s {
        "none" => Ok(Rounding::None),
        "nearest5" => Ok(Rounding::Nearest5),
        "nearest10" => Ok(Rounding::Nearest10),
        "midpoint6" => Ok(Rounding::Midpoint6),
        other => Err(format!("unknown rounding {other:?}")),
    }
}

pub(crate) fn rounding_name(r: Rounding) -> &'static str {
    match r {
        Rounding::None => "none",
        Rounding::Nearest5 => "nearest5",
        Rounding::Nearest10 => "nearest10",
        Rounding::Midpoint6 => "midpoint6",
    }
}

pub fn terms_from_proto(t: proto::LinkTerms) -> Result<LinkTerms, String> {
    let scope = match proto::ReleaseScope::try_from(t.release_scope) {
        Ok(proto::ReleaseScope::Standalone) => Scope::Standalone,
        Ok(proto::ReleaseScope::SystemTotalOnly) => Scope::SystemTotalOnly,
        _ => return Err(format!("unknown release scope {}", t.release_scope)),
    };
    if !(t.min_reportable_count.is_finite() && t.min_reportable_count >= 0.0) {
        return Err("min_reportable_count must be a non-negative number".into());
    }
    if !(t.delta > 0.0 && t.delta < 1.0) {
        return Err(format!(
            "delta {} must lie strictly between 0 and 1",
            t.delta
        ));
    }
    Ok(LinkTerms {
        min_reportable_count: t.min_reportable_count,
        rounding: rounding_from(&t.rounding)?,
        scope,
        max_set_size: t.max_set_size,
        delta: t.delta,
        cells: t.cells,
    })
}

pub fn terms_to_proto(t: &LinkTerms) -> proto::LinkTerms {
    let scope = match t.scope {
        Scope::Standalone => proto::ReleaseScope::Standalone,
        Scope::SystemTotalOnly => proto::ReleaseScope::SystemTotalOnly,
    };
    proto::LinkTerms {
        min_reportable_count: t.min_reportable_count,
        rounding: rounding_name(t.rounding).to_string(),
        release_scope: scope as i32,
        max_set_size: t.max_set_size,
        delta: t.delta,
        cells: t.cells,
    }
}

/// The first message of a Link stream: what to run.
pub fn open_from_proto(up: Option<proto::LinkUp>) -> Result<LinkOpen, Denial> {
    let Some(proto::LinkUp {
        step: Some(Up::Open(o)),
    }) = up
    else {
        return Err(bad(
            "the first message of a Link stream must be `open` (the signed query, role and peers)",
        ));
    };
    let query = o
        .query
        .ok_or_else(|| bad("field `open.query` is missing"))?;
    let signed = SignedQuery::try_from(query).map_err(Denial::from)?;
    let role = match proto::LinkRole::try_from(o.role) {
        Ok(proto::LinkRole::Anchor) => LinkRole::Anchor,
        Ok(proto::LinkRole::Partner) => LinkRole::Partner,
        _ => return Err(bad(format!("field `open.role`: unknown role {}", o.role))),
    };
    for (field, v) in [("open.anchor", &o.anchor), ("open.partner", &o.partner)] {
        NodeId::new(v).map_err(|e| bad(format!("field `{field}`: {e}")))?;
    }
    if o.anchor == o.partner {
        return Err(bad(
            "a node cannot link with itself: anchor and partner are the same",
        ));
    }
    Ok(LinkOpen {
        signed,
        role,
        anchor: o.anchor,
        partner: o.partner,
        session_nonce: o.session_nonce,
    })
}

/// A later message of the stream.
pub fn up_from_proto(up: proto::LinkUp) -> LinkIn {
    match up.step {
        Some(Up::PeerTerms(t)) => match terms_from_proto(t) {
            Ok(t) => LinkIn::PeerTerms(t),
            Err(e) => LinkIn::Malformed(format!("the other node's terms: {e}")),
        },
        Some(Up::Frame(f)) => match frame_from_proto(f) {
            Ok(f) => LinkIn::Frame(Box::new(f)),
            Err(e) => LinkIn::Malformed(format!("a frame: {e}")),
        },
        Some(Up::Open(_)) => LinkIn::Malformed("a second `open` in one stream".into()),
        None => LinkIn::Malformed("an empty message".into()),
    }
}

pub fn down_to_proto(
    out: LinkOut,
    result: impl FnOnce(Answer) -> proto::AggregateResult,
) -> proto::LinkDown {
    let step = match out {
        LinkOut::Ready(t) => Down::Ready(proto::LinkReady {
            terms: Some(terms_to_proto(&t)),
        }),
        LinkOut::Frame(f) => Down::Frame(frame_to_proto(&f)),
        LinkOut::Result(a) => Down::Result(result(*a)),
        LinkOut::Finished => Down::Finished(proto::LinkFinished {}),
    };
    proto::LinkDown { step: Some(step) }
}
