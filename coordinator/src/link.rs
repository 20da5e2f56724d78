//! The blind relay of one linkage session (linkage.md, "Flow"): open a Link stream to the
//! anchor and, once it has decided and spent, to the partner; hand each node the other's
//! terms; then move frames from one stream to the other until the anchor releases. The
//! coordinator never parses a frame's ciphertext. It checks only what routing needs
//! (each frame names the session's two nodes, sender and recipient the right way round)
//! and caps the bytes and the time a session may take; everything else (signatures,
//! sealing, order, replay) is each node's to refuse, and a node that refuses ends the
//! session with a Denial the coordinator reports.

use crate::fanout::{CallOutcome, NodeClient, classify, decode_answer};
use phm_proto::proto;
use phm_proto::proto::link_down::Step as Down;
use phm_proto::proto::link_up::Step as Up;
use phm_proto::result::Answer;
use phm_proto::{Denial, DenialReason};
use rand::RngCore as _;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// Most bytes of frames relayed in one session, both ways: 1,000,000 × 1,000,000 people
/// with their padding is about 100 MB, so this is far above any honest session and far
/// below what would exhaust the coordinator.
pub const MAX_SESSION_BYTES: usize = 1 << 30;

/// Messages buffered towards each node.
const BUFFER: usize = 8;

/// How a session ended, for progress and coverage.
#[derive(Debug)]
pub struct SessionOutcome {
    /// The anchor's release, or why there is none.
    pub anchor: CallOutcome<Answer>,
    /// The partner's refusal or failure, when it was the partner that ended the session.
    pub partner_failure: Option<String>,
    /// Frame bytes relayed (both ways).
    pub bytes: usize,
}

struct End {
    tx: mpsc::Sender<proto::LinkUp>,
    rx: tonic::Streaming<proto::LinkDown>,
}

fn refused(message: impl Into<String>) -> CallOutcome<Answer> {
    CallOutcome::Refused(Denial::new(DenialReason::Unavailable, message))
}

/// Open a Link stream to `client` with `open` as its first message.
async fn open(
    client: &NodeClient,
    open: proto::LinkOpen,
    deadline: Duration,
) -> Result<End, CallOutcome<Answer>> {
    let (tx, rx) = mpsc::channel(BUFFER);
    let first = proto::LinkUp {
        step: Some(Up::Open(open)),
    };
    if tx.send(first).await.is_err() {
        return Err(refused("the link stream closed before it opened"));
    }
    let mut req = tonic::Request::new(ReceiverStream::new(rx));
    req.set_timeout(deadline);
    match client.client().link(req).await {
        Ok(resp) => Ok(End {
            tx,
            rx: resp.into_inner(),
        }),
        Err(status) => Err(classify(&status)),
    }
}

/// The node's first message: its terms (decided and spent), or for the anchor a cached
/// release.
enum First {
    Ready(proto::LinkTerms),
    Result(proto::AggregateResult),
}

async fn first(end: &mut End) -> Result<First, CallOutcome<Answer>> {
    match end.rx.message().await {
        Ok(Some(proto::LinkDown {
            step: Some(Down::Ready(r)),
        })) => r
            .terms
            .map(First::Ready)
            .ok_or_else(|| refused("the node said ready without its terms")),
        Ok(Some(proto::LinkDown {
            step: Some(Down::Result(r)),
        })) => Ok(First::Result(r)),
        Ok(Some(_)) => Err(refused("the node sent data before saying it was ready")),
        Ok(None) => Err(refused("the node closed the link stream")),
        Err(status) => Err(classify(&status)),
    }
}

/// The ids a frame must carry to be routed in this session.
struct Route<'a> {
    anchor: &'a str,
    partner: &'a str,
}

impl Route<'_> {
    fn check(&self, f: &proto::RelayFrame, from_anchor: bool) -> Result<(), String> {
        let (from, to) = if from_anchor {
            (self.anchor, self.partner)
        } else {
            (self.partner, self.anchor)
        };
        if f.from != from || f.to != to {
            return Err(format!(
                "a frame on {from}'s stream is addressed from {:?} to {:?}; only {from} → {to} is routed",
                f.from, f.to
            ));
        }
        Ok(())
    }
}

fn frame_bytes(f: &proto::RelayFrame) -> usize {
    f.ciphertext.len() + f.enc.len() + f.signature.len()
}

/// Run one session between `anchor` and `partner` for the signed `query`.
pub async fn run_session(
    anchor: &NodeClient,
    partner: &NodeClient,
    query: proto::AggregateQuery,
    deadline: Duration,
) -> (SessionOutcome, Duration) {
    let start = Instant::now();
    let outcome =
        match tokio::time::timeout(deadline, relay(anchor, partner, query, deadline)).await {
            Ok(o) => o,
            Err(_) => SessionOutcome {
                anchor: CallOutcome::TimedOut(format!(
                    "the linkage session did not finish within {} s",
                    deadline.as_secs()
                )),
                partner_failure: None,
                bytes: 0,
            },
        };
    (outcome, start.elapsed())
}

async fn relay(
    anchor: &NodeClient,
    partner: &NodeClient,
    query: proto::AggregateQuery,
    deadline: Duration,
) -> SessionOutcome {
    let mut nonce = vec![0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut nonce);
    let opening = |role: proto::LinkRole| proto::LinkOpen {
        query: Some(query.clone()),
        role: role as i32,
        anchor: anchor.config.id.clone(),
        partner: partner.config.id.clone(),
        session_nonce: nonce.clone(),
    };
    let fail = |anchor: CallOutcome<Answer>, partner_failure: Option<String>| SessionOutcome {
        anchor,
        partner_failure,
        bytes: 0,
    };
    // The anchor first: a repeat is answered from its cache, and the partner then never
    // hears of it (no spend, no frames).
    let mut a = match open(anchor, opening(proto::LinkRole::Anchor), deadline).await {
        Ok(e) => e,
        Err(o) => return fail(o, None),
    };
    let anchor_terms = match first(&mut a).await {
        Ok(First::Result(r)) => return fail(decode_answer(r), None),
        Ok(First::Ready(t)) => t,
        Err(o) => return fail(o, None),
    };
    let partner_side = |o: CallOutcome<Answer>| -> String {
        let why = match o {
            CallOutcome::Refused(d) => {
                if d.reasons.is_empty() {
                    d.message
                } else {
                    format!("{} ({})", d.message, d.reasons.join("; "))
                }
            }
            CallOutcome::Unreachable(m) | CallOutcome::TimedOut(m) => m,
            CallOutcome::Malformed { reason, .. } => reason,
            CallOutcome::Answered(_) => "answered out of turn".into(),
        };
        format!("partner {} did not take part: {why}", partner.config.id)
    };
    let mut p = match open(partner, opening(proto::LinkRole::Partner), deadline).await {
        Ok(e) => e,
        Err(o) => {
            let why = partner_side(o);
            return fail(refused(why.clone()), Some(why));
        }
    };
    let partner_terms = match first(&mut p).await {
        Ok(First::Ready(t)) => t,
        Ok(First::Result(_)) => {
            let why = format!(
                "partner {} sent a release; only anchors release",
                partner.config.id
            );
            return fail(refused(why.clone()), Some(why));
        }
        Err(o) => {
            let why = partner_side(o);
            return fail(refused(why.clone()), Some(why));
        }
    };
    let terms = |t: proto::LinkTerms| proto::LinkUp {
        step: Some(Up::PeerTerms(t)),
    };
    if a.tx.send(terms(partner_terms)).await.is_err()
        || p.tx.send(terms(anchor_terms)).await.is_err()
    {
        return fail(refused("a node closed its link stream"), None);
    }
    let route = Route {
        anchor: &anchor.config.id,
        partner: &partner.config.id,
    };
    exchange(&mut a, &mut p, &route, &partner_side).await
}

/// Move frames both ways until the anchor's release (or a failure).
async fn exchange(
    a: &mut End,
    p: &mut End,
    route: &Route<'_>,
    partner_side: &(dyn Fn(CallOutcome<Answer>) -> String + Sync),
) -> SessionOutcome {
    let mut bytes = 0usize;
    let mut partner_done = false;
    let done = |anchor, partner_failure, bytes| SessionOutcome {
        anchor,
        partner_failure,
        bytes,
    };
    loop {
        tokio::select! {
            m = a.rx.message() => match m {
                Ok(Some(proto::LinkDown { step: Some(Down::Frame(f)) })) => {
                    if let Err(why) = route.check(&f, true) {
                        return done(refused(why), None, bytes);
                    }
                    bytes = bytes.saturating_add(frame_bytes(&f));
                    if bytes > MAX_SESSION_BYTES {
                        return done(refused(format!("the session exceeded {MAX_SESSION_BYTES} bytes of frames")), None, bytes);
                    }
                    let up = proto::LinkUp { step: Some(Up::Frame(f)) };
                    if p.tx.send(up).await.is_err() {
                        return done(refused("the partner's link stream closed"), None, bytes);
                    }
                }
                Ok(Some(proto::LinkDown { step: Some(Down::Result(r)) })) => {
                    return done(decode_answer(r), None, bytes);
                }
                Ok(Some(_)) => return done(refused("the anchor sent an unexpected message"), None, bytes),
                Ok(None) => return done(refused("the anchor closed the link stream without a release"), None, bytes),
                Err(status) => return done(classify(&status), None, bytes),
            },
            m = p.rx.message(), if !partner_done => match m {
                Ok(Some(proto::LinkDown { step: Some(Down::Frame(f)) })) => {
                    if let Err(why) = route.check(&f, false) {
                        return done(refused(why.clone()), Some(why), bytes);
                    }
                    bytes = bytes.saturating_add(frame_bytes(&f));
                    if bytes > MAX_SESSION_BYTES {
                        return done(refused(format!("the session exceeded {MAX_SESSION_BYTES} bytes of frames")), None, bytes);
                    }
                    let up = proto::LinkUp { step: Some(Up::Frame(f)) };
                    if a.tx.send(up).await.is_err() {
                        return done(refused("the anchor's link stream closed"), None, bytes);
                    }
                }
                Ok(Some(proto::LinkDown { step: Some(Down::Finished(_)) })) => partner_done = true,
                Ok(Some(_)) => {
                    let why = "the partner sent an unexpected message".to_string();
                    return done(refused(why.clone()), Some(why), bytes);
                }
                Ok(None) => partner_done = true,
                Err(status) => {
                    let why = partner_side(classify(&status));
                    return done(refused(why.clone()), Some(why), bytes);
                }
            },
        }
    }
}
