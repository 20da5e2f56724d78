//! This node's side of one linkage session (linkage.md "Flow"; SECURITY.md), as its
//! steps: authenticate the signed query, serve the anchor's repeat from the release cache,
//! check freshness and the nonce, decide under the `[linkage]` rules, claim the session
//! (partner) and spend durably, and only then exchange sealed frames through the
//! coordinator: the anchor sends `L` and counts, the partner sends `F` and `R`. Audited in
//! one place, like a plain query; the audit record holds the parameters, never a scalar,
//! a noise draw or a count before noise.
//!
//! The protocol's secrets (`a`, `b`, the dummy scalars, `K`, `J`) live inside phm-link's
//! type states for the duration of the rounds and are wiped when each round has used
//! them; nothing here stores or prints them.
//!
//! Each step's wall time is logged at debug level ("linkage phase", for the linkage
//! benchmark in BENCHMARKS.md): a duration and the step's name only, never a count, a
//! size, a scalar or a point.

use super::query::{limits_or_denial, query_id_reused};
use super::{Answer, Loaded, Service, Stop, internal};
use crate::audit::{AuditRecord, Outcome};
use crate::engine::{
    AnchorSide, LinkLaplace, LinkedRules, Statements, release_linked, stricter_rounding,
};
use crate::peer::Peer;
use crate::store::{CacheLookup, LedgerState, QueryKey, StoreError};
use chrono::{DateTime, Utc};
use phm_link::{Anchor, Channel, Incoming, LinkParams, LinkSession, LinkedCounts, Partner, Role};
use phm_policies::model::{LinkRole, Rounding, Scope};
use phm_policies::{Limits, LinkSide, Policy, partner_view};
use phm_proto::{Denial, DenialReason, QueryBody, SignedQuery};
use phm_relay::{NodeId, NodePublic, SealedFrame, VerifiedRegistry};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// The release rules a node brings to a session, bound into the session id with the
/// other node's (see `LinkTerms::bind`).
#[derive(Debug, Clone, PartialEq)]
pub struct LinkTerms {
    pub min_reportable_count: f64,
    pub rounding: Rounding,
    pub scope: Scope,
    pub max_set_size: u64,
    pub delta: f64,
    /// The anchor's declared cells; 0 from the partner.
    pub cells: u32,
}

impl LinkTerms {
    fn canonical(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        out.extend_from_slice(b"phm-link/v1 terms\0");
        out.extend_from_slice(&self.min_reportable_count.to_bits().to_be_bytes());
        out.push(match self.rounding {
            Rounding::None => 0,
            Rounding::Nearest5 => 1,
            Rounding::Nearest10 => 2,
            Rounding::Midpoint6 => 3,
        });
        out.push(match self.scope {
            Scope::Standalone => 0,
            Scope::SystemTotalOnly => 1,
        });
        out.extend_from_slice(&self.max_set_size.to_be_bytes());
        out.extend_from_slice(&self.delta.to_bits().to_be_bytes());
        out.extend_from_slice(&self.cells.to_be_bytes());
        out
    }

    /// The nonce the session id is derived from: the coordinator's nonce bound to both
    /// nodes' terms. Each node uses its own terms for its side and what it was told for
    /// the other's, so a coordinator that tells a node weaker terms than the other node
    /// holds gives the two nodes different session ids, and not a single frame opens.
    fn bind(nonce: &[u8], anchor: &LinkTerms, partner: &LinkTerms) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"phm-link/v1 session nonce\0");
        h.update((nonce.len() as u64).to_be_bytes());
        h.update(nonce);
        h.update(anchor.canonical());
        h.update(partner.canonical());
        h.finalize().into()
    }
}

/// What the coordinator asks a node to run.
#[derive(Debug, Clone)]
pub struct LinkOpen {
    pub signed: SignedQuery,
    pub role: LinkRole,
    pub anchor: String,
    pub partner: String,
    pub session_nonce: Vec<u8>,
}

/// Coordinator → node, after the open.
#[derive(Debug)]
pub enum LinkIn {
    PeerTerms(LinkTerms),
    Frame(Box<SealedFrame>),
    /// A message that did not decode (the adapter says what was wrong).
    Malformed(String),
}

/// Node → coordinator.
#[derive(Debug)]
pub enum LinkOut {
    /// Decided and spent: only now will data frames follow.
    Ready(LinkTerms),
    Frame(Box<SealedFrame>),
    /// The anchor's release.
    Result(Box<Answer>),
    /// The partner has sent everything.
    Finished,
}

/// Bytes of the coordinator's session nonce.
pub const SESSION_NONCE_LEN: usize = 32;

/// One session's plumbing: the coordinator's stream in and out, and what was counted.
struct Wire {
    rx: mpsc::Receiver<LinkIn>,
    tx: mpsc::Sender<LinkOut>,
    frames_in: usize,
    frames_out: usize,
}

impl Wire {
    async fn send(&mut self, out: LinkOut) -> Result<(), Denial> {
        if matches!(out, LinkOut::Frame(_)) {
            self.frames_out += 1;
        }
        self.tx.send(out).await.map_err(|_| {
            Denial::new(
                DenialReason::Unavailable,
                "the coordinator closed the linkage session; any budget already charged stays spent",
            )
        })
    }

    async fn send_frames(&mut self, frames: Vec<SealedFrame>) -> Result<(), Denial> {
        for f in frames {
            self.send(LinkOut::Frame(Box::new(f))).await?;
        }
        Ok(())
    }

    async fn recv(&mut self) -> Result<LinkIn, Denial> {
        match self.rx.recv().await {
            Some(LinkIn::Malformed(why)) => Err(Denial::new(
                DenialReason::InvalidQuery,
                format!(
                    "the coordinator relayed a malformed message: {why}; the session is abandoned and no further data is sent"
                ),
            )),
            Some(m) => {
                if matches!(m, LinkIn::Frame(_)) {
                    self.frames_in += 1;
                }
                Ok(m)
            }
            None => Err(Denial::new(
                DenialReason::Unavailable,
                "the coordinator closed the linkage session before it was complete; any budget already charged stays spent",
            )),
        }
    }

    async fn peer_terms(&mut self) -> Result<LinkTerms, Denial> {
        match self.recv().await? {
            LinkIn::PeerTerms(t) => Ok(t),
            _ => Err(relay_refusal(
                "expected the other node's terms before any frame",
            )),
        }
    }

    async fn frame(&mut self) -> Result<SealedFrame, Denial> {
        match self.recv().await? {
            LinkIn::Frame(f) => Ok(*f),
            _ => Err(relay_refusal("expected a frame")),
        }
    }
}

/// Log the wall time of one step of a session since `since` (debug level): the step's
/// name and a duration, nothing else.
fn phase(step: &'static str, since: Instant) {
    tracing::debug!(
        phase = step,
        ms = since.elapsed().as_secs_f64() * 1e3,
        "linkage phase"
    );
}

/// Where a node's time goes while it reassembles the other node's message: waiting for
/// the relay, and opening and decoding frames (signature, unsealing, point checks).
#[derive(Debug, Default)]
struct FrameTimes {
    waiting: std::time::Duration,
    opening: std::time::Duration,
}

impl FrameTimes {
    fn log(&self, waiting: &'static str, opening: &'static str) {
        tracing::debug!(
            phase = waiting,
            ms = self.waiting.as_secs_f64() * 1e3,
            "linkage phase"
        );
        tracing::debug!(
            phase = opening,
            ms = self.opening.as_secs_f64() * 1e3,
            "linkage phase"
        );
    }
}

fn relay_refusal(why: impl std::fmt::Display) -> Denial {
    Denial::new(
        DenialReason::InvalidQuery,
        format!(
            "linkage session refused: {why}; no further data is sent, and any budget already charged stays spent"
        ),
    )
}

/// Everything a session needs once decided.
struct Session<'a> {
    peer: &'a Peer,
    registry: VerifiedRegistry,
    anchor: NodePublic,
    partner: NodePublic,
    body: &'a QueryBody,
    limits: Box<Limits>,
    own: LinkTerms,
    /// This node's `release.max_group_cells`: a partner pads and injects noise per cell,
    /// so it refuses an anchor asking for more.
    max_cells: f64,
}

impl Session<'_> {
    fn role(&self) -> Role {
        match self.limits.link.as_ref().map(|l| l.role) {
            Some(LinkRole::Partner) => Role::Partner,
            _ => Role::Anchor,
        }
    }

    /// Agree the parameters with the other node's terms and open this node's channel.
    fn channel(&self, nonce: &[u8], peer: &LinkTerms) -> Result<(LinkParams, Channel), Denial> {
        let (anchor_terms, partner_terms) = match self.role() {
            Role::Anchor => (&self.own, peer),
            Role::Partner => (peer, &self.own),
        };
        let cells = usize::try_from(anchor_terms.cells).unwrap_or(usize::MAX);
        if cells == 0 || cells as f64 > self.max_cells {
            return Err(relay_refusal(format!(
                "the anchor's terms declare {cells} cells; this node links over 1 to {} (its release.max_group_cells)",
                self.max_cells
            )));
        }
        let delta = self.own.delta.min(peer.delta);
        let max_set = self.own.max_set_size.min(peer.max_set_size);
        let link = self
            .limits
            .link
            .as_ref()
            .ok_or_else(|| internal("a linked decision without link limits"))?;
        let params = LinkParams::for_query(
            cells,
            self.body.epsilon,
            delta / 2.0,
            delta / 2.0,
            link.negated,
            usize::try_from(max_set).unwrap_or(usize::MAX),
        )
        .map_err(|e| relay_refusal(format!("the session's parameters: {e}")))?;
        let bound = LinkTerms::bind(nonce, anchor_terms, partner_terms);
        let digest = phm_relay::parse_digest(&self.body.digest())
            .map_err(|e| internal(format!("the query digest: {e}")))?;
        let session = LinkSession::new(
            &self.registry,
            digest,
            &bound,
            &self.anchor,
            &self.partner,
            &params,
        )
        .map_err(|e| relay_refusal(format!("the session: {e}")))?;
        let channel = session
            .channel(&self.peer.identity, self.role())
            .map_err(|e| relay_refusal(format!("the session: {e}")))?;
        Ok((params, channel))
    }
}

/// A refusal of a relayed frame: the relay (or someone posing as the other node)
/// injected, replayed, re-signed or reordered it.
fn frame_refusal(e: phm_link::LinkError) -> Denial {
    relay_refusal(format!("a relayed frame was refused ({e})"))
}

fn cohort_failure(e: crate::engine::EngineError) -> Denial {
    Denial::new(
        DenialReason::Internal,
        format!("{e}; the budget charged stays spent"),
    )
}

fn link_failure(e: phm_link::LinkError) -> Denial {
    Denial::new(
        DenialReason::Internal,
        format!("the linkage computation failed: {e}; the budget charged stays spent"),
    )
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, phm_link::LinkError> + Send + 'static,
) -> Result<T, Denial> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(link_failure),
        Err(e) => Err(internal(format!("the linkage task failed: {e}"))),
    }
}

impl Service {
    /// Run this node's side of one linkage session. `rx`/`tx` are the coordinator's
    /// stream after its open message. Returns when the session is over; a refusal is
    /// audited (unless storage is down) and returned for the stream's final status.
    pub async fn link(
        self: &Arc<Self>,
        open: LinkOpen,
        client: &str,
        now: DateTime<Utc>,
        rx: mpsc::Receiver<LinkIn>,
        tx: mpsc::Sender<LinkOut>,
    ) -> Result<(), Denial> {
        let started = Instant::now();
        self.refuse_if_stopping()?;
        let loaded = self.current();
        let mut record = self.query_record(&loaded.policy, &open.signed, client, now);
        record.rpc = "link".into();
        if open.role == LinkRole::Partner
            && let Some(l) = &open.signed.body.linkage
        {
            // The partner's side reads its own dataset.
            record.dataset = Some(l.partner_dataset.clone());
        }
        record.reasons = vec![format!(
            "linkage session as {} (anchor {}, partner {})",
            open.role.as_str(),
            open.anchor,
            open.partner
        )];
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            let d = Denial::new(
                DenialReason::Overloaded,
                format!(
                    "this node is already running its maximum of {} queries; retry shortly",
                    self.max_slots
                ),
            );
            return Err(self.refuse(record, d, started).await);
        };
        let body = &open.signed.body;
        let authentic = self
            .check_federation(&body.federation_id)
            .and_then(|()| self.clock.check())
            .and_then(|()| {
                Self::authenticate(&loaded.policy, &body.requester_id, |k| {
                    open.signed.verify(k)
                })
            });
        if let Err(d) = authentic {
            return Err(self.refuse(record, d, started).await);
        }
        let mut wire = Wire {
            rx,
            tx,
            frames_in: 0,
            frames_out: 0,
        };
        // One session per (query, anchor, partner) at a time; sessions with different
        // partners run side by side.
        let slot = cache_id(body, &open.partner);
        let key = QueryKey {
            requester_id: &body.requester_id,
            query_id: &slot,
        };
        let _in_flight = self.store.lock_query_id(&key).await;
        let outcome = tokio::time::timeout(
            self.link_deadline,
            self.link_steps(&loaded, &open, &mut record, &mut wire, now),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Denial::new(
                DenialReason::Unavailable,
                format!(
                    "the linkage session did not finish within this node's {} s; the budget charged stays spent",
                    self.link_deadline.as_secs()
                ),
            )
            .into())
        });
        drop(permit);
        record.reasons.push(format!(
            "frames: {} received, {} sent",
            wire.frames_in, wire.frames_out
        ));
        match outcome {
            Ok(()) => {
                record.decision = Outcome::Allowed;
                self.write_audit(record).await?;
                self.metrics
                    .query_outcome("linked", started.elapsed().as_secs_f64());
                tracing::info!(query_id = %body.query_id, role = open.role.as_str(), "linkage session complete");
                Ok(())
            }
            Err(stop) => Err(self.stopped(record, stop, started).await),
        }
    }

    fn peer_or_refuse(&self) -> Result<Arc<Peer>, Denial> {
        self.peer.get().cloned().ok_or_else(|| {
            Denial::new(
                DenialReason::PolicyDenied,
                "this node has no node identity and registry ([peer] in node.toml), so it takes part in no linked question",
            )
        })
    }

    async fn link_steps(
        &self,
        loaded: &Loaded,
        open: &LinkOpen,
        record: &mut AuditRecord,
        wire: &mut Wire,
        now: DateTime<Utc>,
    ) -> Result<(), Stop> {
        let policy = &loaded.policy;
        let body = &open.signed.body;
        let Some(linkage) = &body.linkage else {
            return Err(relay_refusal("the query has no EXISTS clause").into());
        };
        if open.session_nonce.len() != SESSION_NONCE_LEN {
            return Err(relay_refusal(format!(
                "the session nonce must be {SESSION_NONCE_LEN} bytes, not {}",
                open.session_nonce.len()
            ))
            .into());
        }
        let peer = self.peer_or_refuse()?;
        let me = peer.identity.node_id().as_str().to_string();
        let (mine, other, side) = match open.role {
            LinkRole::Anchor => (
                &open.anchor,
                &open.partner,
                LinkSide::Anchor {
                    partner: Some(open.partner.as_str()),
                },
            ),
            LinkRole::Partner => (
                &open.partner,
                &open.anchor,
                LinkSide::Partner {
                    anchor: Some(open.anchor.as_str()),
                },
            ),
        };
        if *mine != me {
            return Err(relay_refusal(format!(
                "this node is {me}, but the session names {mine} as the {}",
                open.role.as_str()
            ))
            .into());
        }
        if open.role == LinkRole::Anchor {
            match self
                .lookup_release(body, &cache_id(body, &open.partner))
                .await?
            {
                CacheLookup::Hit(answer) => {
                    limits_or_denial(phm_policies::decide_linked(policy, body, side, now))?;
                    let answer = Self::served_from_cache(answer, record);
                    wire.send(LinkOut::Result(Box::new(answer))).await?;
                    return Ok(());
                }
                CacheLookup::Retry(answer) => {
                    self.check_fresh_and_unseen_in(&nonce_scope(open), policy, body, now)
                        .await?;
                    limits_or_denial(phm_policies::decide_linked(policy, body, side, now))?;
                    let answer = Self::served_from_cache(answer, record);
                    wire.send(LinkOut::Result(Box::new(answer))).await?;
                    return Ok(());
                }
                CacheLookup::Conflict { .. } => {
                    return Err(query_id_reused(&body.query_id).into());
                }
                // Linkage sessions never record a bare charge (a failed session is
                // not retried under its charge: its partner's spend is its own).
                CacheLookup::Charged { .. } => {
                    return Err(query_id_reused(&body.query_id).into());
                }
                CacheLookup::Miss => {}
            }
        }
        self.check_fresh_and_unseen_in(&nonce_scope(open), policy, body, now)
            .await?;
        let limits = limits_or_denial(phm_policies::decide_linked(policy, body, side, now))?;
        let registry = self.registry(&peer, &limits, other)?;
        let (anchor, partner) = match (
            registry_entry(&registry, &open.anchor),
            registry_entry(&registry, &open.partner),
        ) {
            (Ok(a), Ok(p)) => (a, p),
            (Err(d), _) | (_, Err(d)) => return Err(d.into()),
        };
        if open.role == LinkRole::Partner {
            self.claim_session(body, &open.anchor).await?;
        }
        let states = self.spend(&limits, record).await?;
        let own = own_terms(policy, &limits, linkage_cells(&limits));
        let session = Session {
            peer: &peer,
            registry,
            anchor,
            partner,
            body,
            limits,
            own,
            max_cells: policy.file().release.max_group_cells as f64,
        };
        wire.send(LinkOut::Ready(session.own.clone())).await?;
        let peer_terms = wire.peer_terms().await?;
        let (params, channel) = session.channel(&open.session_nonce, &peer_terms)?;
        record.reasons.push(format!(
            "session parameters: {} cells, noise scale {:.3} (mu {}), padding scale {:.3} (mu {}), NOT EXISTS {}, HAVING k {}",
            params.groups,
            params.link.scale(),
            params.link.mu(),
            params.size.scale(),
            params.size.mu(),
            params.negated,
            linkage.min_partner_rows
        ));
        match session.role() {
            Role::Anchor => {
                let answer = self
                    .run_anchor(
                        loaded,
                        &session,
                        params,
                        channel,
                        &peer_terms,
                        &states,
                        wire,
                        &mut record.statements,
                    )
                    .await?;
                wire.send(LinkOut::Result(Box::new(answer))).await?;
            }
            Role::Partner => {
                self.run_partner(
                    loaded,
                    &session,
                    params,
                    channel,
                    wire,
                    &mut record.statements,
                )
                .await?;
                wire.send(LinkOut::Finished).await?;
            }
        }
        Ok(())
    }

    /// The registry, verified now, with the other node in it (and matching this
    /// policy's pin of its key, if there is one).
    fn registry(
        &self,
        peer: &Peer,
        limits: &Limits,
        other: &str,
    ) -> Result<VerifiedRegistry, Denial> {
        let now_ms = u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0);
        let registry = peer.verified(now_ms).map_err(|e| {
            Denial::new(
                DenialReason::PolicyDenied,
                format!("this node's node registry is not usable now: {e}"),
            )
        })?;
        let entry = registry_entry(&registry, other)?;
        if let Some(pin) = limits
            .link
            .as_ref()
            .and_then(|l| l.peer_node_key.as_deref())
        {
            let pinned: NodePublic = pin.parse().map_err(|e| {
                Denial::new(
                    DenialReason::PolicyDenied,
                    format!("this node's policy pins an unreadable node key for {other}: {e}"),
                )
            })?;
            if pinned != entry {
                return Err(Denial::new(
                    DenialReason::PolicyDenied,
                    format!(
                        "the node registry lists a key for {other} other than the one this node's policy pins; refusing to link"
                    ),
                ));
            }
        }
        Ok(registry)
    }

    async fn claim_session(&self, body: &QueryBody, anchor: &str) -> Result<(), Stop> {
        let store = self.store.clone();
        let (req, id, digest, anchor) = (
            body.requester_id.clone(),
            body.query_id.clone(),
            body.digest(),
            anchor.to_string(),
        );
        match self
            .io(move || {
                store.claim_link_session(
                    &QueryKey {
                        requester_id: &req,
                        query_id: &id,
                    },
                    &anchor,
                    &digest,
                )
            })
            .await?
        {
            Ok(()) => Ok(()),
            Err(StoreError::SecondSession { .. }) => Err(Denial::new(
                DenialReason::QueryIdReused,
                format!(
                    "this node already took part in a linkage session for query id {:?} with this anchor; a second session is refused (its fresh noise could be averaged): ask again with a new query id",
                    body.query_id
                ),
            )
            .into()),
            Err(e) => Err(self
                .store_denial(e, "cannot record the linkage session")
                .into()),
        }
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_anchor(
        &self,
        loaded: &Loaded,
        s: &Session<'_>,
        params: LinkParams,
        mut channel: Channel,
        peer_terms: &LinkTerms,
        states: &[LedgerState],
        wire: &mut Wire,
        sent: &mut Statements,
    ) -> Result<Answer, Stop> {
        let t = Instant::now();
        let side: AnchorSide = loaded
            .engine
            .anchor_cohort(s.body, &s.limits, sent)
            .await
            .map_err(cohort_failure)?;
        phase("anchor.cohort_scan", t);
        let AnchorSide {
            cohort,
            group_columns,
            keys,
        } = side;
        let p = params.clone();
        let t = Instant::now();
        let (state, l) =
            blocking(move || Anchor::start(&p, &cohort, &mut LinkLaplace, &mut rand::rngs::OsRng))
                .await?;
        phase("anchor.blind_l", t);
        let t = Instant::now();
        let frames = channel
            .send_l(&s.peer.identity, &s.registry, &l)
            .map_err(link_failure)?;
        drop(l);
        phase("anchor.seal_l", t);
        let t = Instant::now();
        wire.send_frames(frames).await?;
        phase("anchor.send_l", t);
        let mut times = FrameTimes::default();
        let f = match self.next_message(s, &mut channel, wire, &mut times).await? {
            Incoming::F(f) => f,
            _ => return Err(relay_refusal("expected the partner's blinded set first").into()),
        };
        times.log("anchor.wait_f", "anchor.open_f");
        let t = Instant::now();
        let state = blocking(move || state.receive_f(f)).await?;
        phase("anchor.blind_f", t);
        let mut times = FrameTimes::default();
        let r = match self.next_message(s, &mut channel, wire, &mut times).await? {
            Incoming::R(r) => r,
            _ => return Err(relay_refusal("expected the partner's reply").into()),
        };
        times.log("anchor.wait_r", "anchor.open_r");
        let t = Instant::now();
        let counts: LinkedCounts = blocking(move || state.receive_r(r)).await?;
        phase("anchor.match_r", t);
        let rules = LinkedRules {
            min_reportable_count: s
                .own
                .min_reportable_count
                .max(peer_terms.min_reportable_count),
            rounding: stricter_rounding(s.own.rounding, peer_terms.rounding),
            epsilon: s.limits.epsilon,
            delta: s.limits.spend.delta,
        };
        let alias = s.body.aggregates.first().map_or("n", |a| a.alias.as_str());
        let release = release_linked(group_columns, keys, alias, &counts, rules);
        let mut limits = (*s.limits).clone();
        if peer_terms.scope == Scope::SystemTotalOnly {
            limits.scope = Scope::SystemTotalOnly;
        }
        let answer = self.answer_of(&loaded.policy, s.body, &limits, states, release);
        let id = cache_id(s.body, s.partner.node_id.as_str());
        self.cache_release(s.body, &id, answer).await
    }

    async fn run_partner(
        &self,
        loaded: &Loaded,
        s: &Session<'_>,
        params: LinkParams,
        mut channel: Channel,
        wire: &mut Wire,
        sent: &mut Statements,
    ) -> Result<(), Stop> {
        let Some(linkage) = &s.body.linkage else {
            return Err(internal("a partner session without linkage").into());
        };
        let view = partner_view(s.body, linkage);
        let t = Instant::now();
        let cohort = loaded
            .engine
            .partner_cohort(&view, &s.limits, sent)
            .await
            .map_err(cohort_failure)?;
        phase("partner.cohort_scan", t);
        let p = params.clone();
        let t = Instant::now();
        let (state, f) =
            blocking(move || Partner::start(&p, &cohort, &mut LinkLaplace, &mut rand::rngs::OsRng))
                .await?;
        phase("partner.blind_f", t);
        let t = Instant::now();
        let frames = channel
            .send_f(&s.peer.identity, &s.registry, &f)
            .map_err(link_failure)?;
        drop(f);
        phase("partner.seal_f", t);
        let t = Instant::now();
        wire.send_frames(frames).await?;
        phase("partner.send_f", t);
        let mut times = FrameTimes::default();
        let l = match self.next_message(s, &mut channel, wire, &mut times).await? {
            Incoming::L(l) => l,
            _ => return Err(relay_refusal("expected the anchor's set").into()),
        };
        times.log("partner.wait_l", "partner.open_l");
        let t = Instant::now();
        let r = blocking(move || state.receive_l(l, &mut rand::rngs::OsRng)).await?;
        phase("partner.blind_r", t);
        let t = Instant::now();
        let frames = channel
            .send_r(&s.peer.identity, &s.registry, &r)
            .map_err(link_failure)?;
        drop(r);
        phase("partner.seal_r", t);
        let t = Instant::now();
        wire.send_frames(frames).await?;
        phase("partner.send_r", t);
        Ok(())
    }

    /// Frames until the other node's next whole message; any refused frame ends the
    /// session (the channel fails closed).
    async fn next_message(
        &self,
        s: &Session<'_>,
        channel: &mut Channel,
        wire: &mut Wire,
        times: &mut FrameTimes,
    ) -> Result<Incoming, Denial> {
        loop {
            let t = Instant::now();
            let frame = wire.frame().await?;
            let t = {
                let now = Instant::now();
                times.waiting += now - t;
                now
            };
            let accepted = channel
                .accept(&s.peer.identity, &s.registry, &frame)
                .map_err(frame_refusal)?;
            times.opening += t.elapsed();
            if let Some(m) = accepted {
                return Ok(m);
            }
        }
    }
}

/// Where an anchor caches its release of `body` with `partner`: the query id and the
/// partner's ODS code, separated by a NUL that no id can contain (so it is never
/// another query's id). One linked query releases once per partner node.
pub(super) fn cache_id(body: &QueryBody, partner: &str) -> String {
    format!("{}\0link:{partner}", body.query_id)
}

/// The nonce namespace of a session: a node sees one signed linked query once per
/// session (an anchor once per partner, a partner once per anchor).
fn nonce_scope(open: &LinkOpen) -> String {
    format!(
        "link:{}:{}:{}",
        open.role.as_str(),
        open.anchor,
        open.partner
    )
}

fn registry_entry(registry: &VerifiedRegistry, ods: &str) -> Result<NodePublic, Denial> {
    let id = NodeId::new(ods).map_err(|e| relay_refusal(format!("node id {ods:?}: {e}")))?;
    registry.get(&id).cloned().ok_or_else(|| {
        Denial::new(
            DenialReason::PolicyDenied,
            format!("{ods} is not in this node's node registry (or its entry is not valid now)"),
        )
    })
}

/// The anchor's declared cells: the product of its group domains (1 with no keys).
fn linkage_cells(limits: &Limits) -> u32 {
    if limits.link.as_ref().map(|l| l.role) != Some(LinkRole::Anchor) {
        return 0;
    }
    limits
        .group_by
        .iter()
        .map(|g| match &g.domain {
            phm_policies::GroupDomain::Categories(c) => c.len(),
            phm_policies::GroupDomain::Bins { edges } => edges.len().saturating_sub(1),
            phm_policies::GroupDomain::Thresholded => 0,
        })
        .try_fold(1u32, |acc, n| {
            u32::try_from(n).ok().and_then(|n| acc.checked_mul(n))
        })
        .unwrap_or(0)
}

fn own_terms(policy: &Policy, limits: &Limits, cells: u32) -> LinkTerms {
    let r = &policy.file().release;
    LinkTerms {
        min_reportable_count: r.min_reportable_count,
        rounding: r.rounding,
        scope: r.scope,
        max_set_size: limits.link.as_ref().map_or(0, |l| l.max_set_size),
        delta: r.delta,
        cells,
    }
}
