//! This node's side of one secure-aggregation session (secagg/PROTOCOL.md; SECURITY.md):
//! authenticate the signed SECURE_SUM query, check freshness and the nonce, decide under
//! the policy's `[secure_aggregation]` rules, compute the exact input and state this
//! node's terms, then run `phm-secagg`'s rounds R0–R4 with the coordinator. The spend is
//! charged and recorded, durably, inside the protocol's commit step: before the masked
//! input exists, and it stays charged whatever happens to the session.
//!
//! One session per (requester, query id), ever: the store keeps the session this node
//! joined, and a second one is refused from R0 on. The audit record holds the session's
//! parameters (N, thresholds, σ, ρ_local), never the input, the noise or a share.

use super::query::limits_or_denial;
use super::{Service, Stop, internal};
use crate::audit::{AuditRecord, Outcome};
use crate::engine::{SecureInput, noisy_share};
use crate::peer::Peer;
use crate::store::{LedgerState, QueryKey, StoreError};
use chrono::{DateTime, Utc};
use phm_policies::Limits;
use phm_policies::model::Rounding;
use phm_proto::{Aggregation, Denial, DenialReason, QueryBody, SignedQuery};
use phm_relay::NodeId;
use phm_secagg::{
    AdvertiseKeys, Begin, ConsistencySig, ForwardedShares, MaskedInput, NodePolicy, PeerKeys,
    SecAggError, SessionParams, ShareKeys, SurvivorSet, UnmaskRequest, UnmaskShares,
};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::mpsc;

/// Bytes of the coordinator's session nonce.
pub const SECURE_NONCE_LEN: usize = 32;

/// What a node brings to a session (sent before anything is spent).
#[derive(Debug, Clone, PartialEq)]
pub struct SecureTerms {
    pub layout_digest: [u8; 32],
    pub gammas: Vec<f64>,
    pub delta1: f64,
    pub delta2: f64,
    pub rho: f64,
    pub min_cohort: u32,
    pub min_survivors: f64,
    pub assumed_noiseless_peers: u32,
    pub min_reportable_count: f64,
    pub rounding: Rounding,
    pub population: f64,
    pub epsilon: f64,
    pub delta: f64,
    pub group_columns: Vec<String>,
    pub keys: Vec<Vec<String>>,
}

/// R0's request as the wire carries it; the query id and digest come from the signed
/// query this node verified, never from the coordinator.
#[derive(Debug, Clone)]
pub struct BeginWire {
    pub session_nonce: Vec<u8>,
    pub cohort: Vec<NodeId>,
    pub params: SessionParams,
    /// The digest of the registry the coordinator opened the session under; the node
    /// uses its own copy, and only if the digests match.
    pub registry_digest: [u8; 32],
}

/// Coordinator → node, after the open.
#[derive(Debug)]
pub enum SecureIn {
    Begin(Box<BeginWire>),
    PeerKeys(PeerKeys),
    Forwarded(ForwardedShares),
    Survivors(SurvivorSet),
    Unmask(UnmaskRequest),
    /// A message that did not decode (the adapter says what was wrong).
    Malformed(String),
}

impl SecureIn {
    fn name(&self) -> &'static str {
        match self {
            SecureIn::Begin(_) => "the session's parameters",
            SecureIn::PeerKeys(_) => "the members' keys",
            SecureIn::Forwarded(_) => "the shares addressed to this node",
            SecureIn::Survivors(_) => "the survivor set",
            SecureIn::Unmask(_) => "the unmasking request",
            SecureIn::Malformed(_) => "a malformed message",
        }
    }
}

/// Node → coordinator.
#[derive(Debug)]
pub enum SecureOut {
    Terms(Box<SecureTerms>),
    Keys(AdvertiseKeys),
    Shares(ShareKeys),
    Masked(MaskedInput),
    Signature(ConsistencySig),
    Unmask(UnmaskShares),
}

/// The coordinator's stream in and out.
struct Wire {
    rx: mpsc::Receiver<SecureIn>,
    tx: mpsc::Sender<SecureOut>,
}

fn closed() -> Denial {
    Denial::new(
        DenialReason::Unavailable,
        "the coordinator closed the secure-aggregation session before it was complete; any budget already charged stays spent",
    )
}

fn session_refusal(why: impl std::fmt::Display) -> Denial {
    Denial::new(
        DenialReason::InvalidQuery,
        format!(
            "secure-aggregation session refused: {why}; nothing further is sent, and any budget already charged stays spent"
        ),
    )
}

impl Wire {
    async fn send(&mut self, out: SecureOut) -> Result<(), Denial> {
        self.tx.send(out).await.map_err(|_| closed())
    }

    async fn recv(&mut self) -> Result<SecureIn, Denial> {
        match self.rx.recv().await {
            Some(SecureIn::Malformed(why)) => Err(session_refusal(format!(
                "the coordinator sent a malformed message ({why})"
            ))),
            Some(m) => Ok(m),
            None => Err(closed()),
        }
    }
}

/// Expect one kind of message next; anything else is refused, naming both.
macro_rules! expect {
    ($wire:expr, $variant:ident, $what:expr) => {
        match $wire.recv().await? {
            SecureIn::$variant(m) => m,
            other => {
                return Err(
                    session_refusal(format!("expected {}, got {}", $what, other.name())).into(),
                );
            }
        }
    };
}

fn protocol_refusal(e: SecAggError) -> Denial {
    session_refusal(e)
}

/// Why the commit step failed: the protocol refused, or the charge did.
enum CommitError {
    SecAgg(SecAggError),
    Store(StoreError),
}

impl From<SecAggError> for CommitError {
    fn from(e: SecAggError) -> Self {
        CommitError::SecAgg(e)
    }
}

/// The key of a secure session's lock and record: the query id in the requester's
/// namespace, with a suffix no id can contain, so it never meets the plain path's.
fn slot(query_id: &str) -> String {
    format!("{query_id}\0secagg")
}

fn now_ms() -> u64 {
    u64::try_from(Utc::now().timestamp_millis()).unwrap_or(0)
}

impl Service {
    /// Run this node's side of one secure-aggregation session. `rx`/`tx` are the
    /// coordinator's stream after its open message. A refusal is audited (unless
    /// storage is down) and returned for the stream's final status.
    pub async fn secure_aggregate(
        self: &Arc<Self>,
        signed: SignedQuery,
        client: &str,
        now: DateTime<Utc>,
        rx: mpsc::Receiver<SecureIn>,
        tx: mpsc::Sender<SecureOut>,
    ) -> Result<(), Denial> {
        let started = Instant::now();
        self.refuse_if_stopping()?;
        let loaded = self.current();
        let mut record = self.query_record(&loaded.policy, &signed, client, now);
        record.rpc = "secure_aggregate".into();
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
        let body = &signed.body;
        let authentic = self
            .check_federation(&body.federation_id)
            .and_then(|()| self.clock.check())
            .and_then(|()| {
                Self::authenticate(&loaded.policy, &body.requester_id, |k| signed.verify(k))
            });
        if let Err(d) = authentic {
            return Err(self.refuse(record, d, started).await);
        }
        let id = slot(&body.query_id);
        let key = QueryKey {
            requester_id: &body.requester_id,
            query_id: &id,
        };
        let _in_flight = self.store.lock_query_id(&key).await;
        let mut wire = Wire { rx, tx };
        let outcome = tokio::time::timeout(
            self.link_deadline,
            self.secure_steps(&loaded.policy, &loaded.engine, &signed, &mut record, &mut wire, now),
        )
        .await
        .unwrap_or_else(|_| {
            Err(Denial::new(
                DenialReason::Unavailable,
                format!(
                    "the secure-aggregation session did not finish within this node's {} s; any budget charged stays spent",
                    self.link_deadline.as_secs()
                ),
            )
            .into())
        });
        drop(permit);
        match outcome {
            Ok(()) => {
                record.decision = Outcome::Allowed;
                self.write_audit(record).await?;
                self.metrics
                    .query_outcome("secure", started.elapsed().as_secs_f64());
                tracing::info!(query_id = %body.query_id, "secure-aggregation session complete");
                Ok(())
            }
            Err(stop) => Err(self.stopped(record, stop, started).await),
        }
    }

    fn secure_peer(&self) -> Result<Arc<Peer>, Denial> {
        self.peer.get().cloned().ok_or_else(|| {
            Denial::new(
                DenialReason::PolicyDenied,
                "this node has no node identity and registry ([peer] in node.toml), so it takes part in no secure query",
            )
        })
    }

    async fn secure_steps(
        &self,
        policy: &phm_policies::Policy,
        engine: &crate::engine::Engine,
        signed: &SignedQuery,
        record: &mut AuditRecord,
        wire: &mut Wire,
        now: DateTime<Utc>,
    ) -> Result<(), Stop> {
        let body = &signed.body;
        if body.aggregation != Aggregation::SecureSum {
            // A plain query is answered by Query, each node releasing its own figure;
            // running it here would be a downgrade the requester did not sign.
            return Err(
                session_refusal("the signed query does not ask for secure aggregation").into(),
            );
        }
        let peer = self.secure_peer()?;
        self.check_fresh_and_unseen_in("secagg", policy, body, now)
            .await?;
        let limits = limits_or_denial(phm_policies::decide(policy, body, now))?;
        let Some(rules) = limits.secure else {
            return Err(internal("a secure decision without its rules").into());
        };
        let id = slot(&body.query_id);
        let key = QueryKey {
            requester_id: &body.requester_id,
            query_id: &id,
        };
        let prior = self.participation(&key).await?;
        if let Some(p) = &prior {
            return Err(second_session(&body.query_id, &crate::store::hex8(&p.session_id)).into());
        }
        let input = engine
            .secure_input(body, &limits, &mut record.statements)
            .await;
        let input: SecureInput = input
            .map_err(|e| session_refusal(format!("this node cannot compute its input: {e}")))?;
        let terms = SecureTerms {
            layout_digest: input.layout.digest,
            gammas: input.layout.gammas(),
            delta1: input.layout.delta1,
            delta2: input.layout.delta2,
            rho: limits.spend.rho,
            min_cohort: rules.min_cohort,
            min_survivors: rules.min_survivors,
            assumed_noiseless_peers: rules.assumed_noiseless_peers,
            min_reportable_count: limits.min_reportable_count,
            rounding: limits.rounding,
            population: limits.registered_population.map_or(0.0, |p| p as f64),
            epsilon: limits.epsilon,
            delta: limits.delta,
            group_columns: input.layout.group_columns.clone(),
            keys: input.layout.keys.clone(),
        };
        let node_policy = NodePolicy {
            registry_key: peer.registry_key,
            min_cohort: rules.min_cohort,
            min_survivors: rules.min_survivors,
            assumed_noiseless_peers: rules.assumed_noiseless_peers,
            layout_digest: terms.layout_digest,
            gammas: terms.gammas.clone(),
            rho: terms.rho,
            delta1: terms.delta1,
            delta2: terms.delta2,
        };
        wire.send(SecureOut::Terms(Box::new(terms))).await?;

        // R0: check the session against this node's rules; record the join durably
        // before the keys go out.
        let b = expect!(wire, Begin, "the session's parameters");
        if b.session_nonce.len() != SECURE_NONCE_LEN {
            return Err(session_refusal(format!(
                "the session nonce must be {SECURE_NONCE_LEN} bytes, not {}",
                b.session_nonce.len()
            ))
            .into());
        }
        // The registry is this node's own copy (verified again below, under the pinned
        // key, at this instant); the coordinator only names which one it opened under.
        let registry = peer.registry.clone();
        if b.registry_digest != registry.digest() {
            return Err(session_refusal(format!(
                "the coordinator opened this session under node registry {}…, but this node holds registry serial {} ({}…): install the federation's current signed registry ([peer] registry in node.toml) and restart the node, or ask the ICS which registry is current",
                hex::encode(&b.registry_digest[..6]),
                registry.serial,
                hex::encode(&registry.digest()[..6])
            ))
            .into());
        }
        let query_digest = phm_relay::parse_digest(&body.digest())
            .map_err(|e| internal(format!("the query digest: {e}")))?;
        let begin = Begin {
            query_id: body.query_id.clone(),
            query_digest,
            session_nonce: b.session_nonce,
            cohort: b.cohort,
            params: b.params,
            registry,
        };
        let (state, keys, joined) = phm_secagg::client::begin(
            &peer.identity,
            &node_policy,
            &begin,
            now_ms(),
            None,
            &mut rand::rngs::OsRng,
        )
        .map_err(protocol_refusal)?;
        self.join(&key, &body.query_id, &joined).await?;
        let p = &begin.params;
        record.reasons.push(format!(
            "secure aggregation: N {}, t_sss {}, t_noise {}, c {}, lattice {}, sigma_share {:.4} (lattice units), {} coordinates",
            p.n,
            p.t_sss,
            p.t_noise,
            p.c,
            p.lattice,
            p.sigma_share,
            p.dim()
        ));
        wire.send(SecureOut::Keys(keys)).await?;
        sent(body, "R0 (keys)");

        // R1.
        let peer_keys = expect!(wire, PeerKeys, "the members' keys");
        let (state, shares) = state
            .share_keys(&peer_keys, &mut rand::rngs::OsRng)
            .map_err(protocol_refusal)?;
        wire.send(SecureOut::Shares(shares)).await?;
        sent(body, "R1 (shares)");

        // R2: the shares addressed to this node; then the spend, durably, and only then
        // the masked input.
        let forwarded = expect!(wire, Forwarded, "the shares addressed to this node");
        // The e2e tests hold a node here to kill it between its shares and its spend.
        fail::fail_point!("secure-before-commit");
        let ready = state.receive_shares(&forwarded).map_err(protocol_refusal)?;
        let (committed, states) = self.commit(&limits, &key, ready, joined).await?;
        self.note_spend(&limits, &states, record);
        self.audit_commit(record).await?;
        let noisy = noisy_share(&input.units, p.lattice, p.sigma_share)
            .map_err(|e| internal(format!("{e}; the budget charged stays spent")))?;
        drop(input);
        let (state, masked) = committed.mask(&noisy).map_err(protocol_refusal)?;
        drop(noisy);
        wire.send(SecureOut::Masked(masked)).await?;
        sent(body, "R2 (masked input)");
        // … and here, to kill it between its masked input and its consistency signature.
        fail::fail_point!("secure-after-masked-input");

        // R3.
        let survivors = expect!(wire, Survivors, "the survivor set");
        let (state, signature) = state
            .consistency(&peer.identity, &survivors)
            .map_err(protocol_refusal)?;
        wire.send(SecureOut::Signature(signature)).await?;
        sent(body, "R3 (consistency)");

        // R4.
        let request = expect!(wire, Unmask, "the unmasking request");
        let survivors = state.survivors().len();
        let shares = state.unmask(&request).map_err(protocol_refusal)?;
        record.reasons.push(format!(
            "unmasking: {survivors} survivors; revealed {} b-shares and {} s-shares",
            shares.b_shares.len(),
            shares.s_shares.len()
        ));
        wire.send(SecureOut::Unmask(shares)).await?;
        Ok(())
    }

    /// The charge is on disk; its audit entry is written before the masked input
    /// exists, so a node that dies from here on still has both (a spend is never without
    /// its record). What follows (unmasking, or a failure) is a second entry,
    /// `secure_aggregate_end`, that spends nothing.
    async fn audit_commit(&self, record: &mut AuditRecord) -> Result<(), Stop> {
        let mut entry = record.clone();
        entry.decision = Outcome::Allowed;
        entry
            .reasons
            .push("committed: the budget is charged; the masked input leaves next".into());
        self.write_audit(entry).await?;
        record.rpc = SESSION_END_RPC.into();
        record.epsilon_spent = 0.0;
        record.delta_spent = 0.0;
        record.ledger_spend = Some(phm_policies::Spend::ZERO);
        record.ledgers.clear();
        record.charged.clear();
        Ok(())
    }

    async fn participation(
        &self,
        key: &QueryKey<'_>,
    ) -> Result<Option<phm_secagg::Participation>, Stop> {
        let store = self.store.clone();
        let (req, id) = (key.requester_id.to_string(), key.query_id.to_string());
        self.io(move || {
            store.secagg_participation(&QueryKey {
                requester_id: &req,
                query_id: &id,
            })
        })
        .await?
        .map_err(|e| {
            self.store_denial(e, "cannot read the secure-aggregation record")
                .into()
        })
    }

    async fn join(
        &self,
        key: &QueryKey<'_>,
        query_id: &str,
        joined: &phm_secagg::Participation,
    ) -> Result<(), Stop> {
        let store = self.store.clone();
        let (req, id, p) = (
            key.requester_id.to_string(),
            key.query_id.to_string(),
            joined.clone(),
        );
        match self
            .io(move || {
                store.join_secagg(
                    &QueryKey {
                        requester_id: &req,
                        query_id: &id,
                    },
                    &p,
                )
            })
            .await?
        {
            Ok(()) => Ok(()),
            Err(StoreError::SecondSecureSession { prior_session, .. }) => {
                Err(second_session(query_id, &prior_session).into())
            }
            Err(e) => Err(self
                .store_denial(e, "cannot record the secure-aggregation session")
                .into()),
        }
    }

    /// The protocol's commit step: charge the budget and move the session record to
    /// "spent", both on disk, inside `ReadyToCommit::commit`, so a `Committed` (the only
    /// state that can mask an input) exists only once the spend is durable.
    async fn commit(
        &self,
        limits: &Limits,
        key: &QueryKey<'_>,
        ready: phm_secagg::client::ReadyToCommit,
        joined: phm_secagg::Participation,
    ) -> Result<(phm_secagg::client::Committed, Vec<LedgerState>), Stop> {
        let store = self.store.clone();
        let charges = limits.charges.clone();
        let (spend, delta_conv) = (limits.spend, limits.delta);
        let (req, id) = (key.requester_id.to_string(), key.query_id.to_string());
        let outcome = self
            .io(move || {
                let mut states = Vec::new();
                let committed = ready.commit(Some(&joined), |intent| {
                    states = store
                        .check_and_spend(&charges, spend, delta_conv)
                        .map_err(CommitError::Store)?;
                    store
                        .advance_secagg(
                            &QueryKey {
                                requester_id: &req,
                                query_id: &id,
                            },
                            &joined,
                            &intent.participation,
                        )
                        .map_err(CommitError::Store)
                });
                committed.map(|c| (c, states))
            })
            .await?;
        match outcome {
            Ok(done) => Ok(done),
            Err(CommitError::SecAgg(e)) => Err(protocol_refusal(e).into()),
            Err(CommitError::Store(e)) => Err(self.spend_failure(e)),
        }
    }
}

/// The `rpc` of the audit entry for what happens after a secure session's commit.
pub const SESSION_END_RPC: &str = "secure_aggregate_end";

/// A round's message has left (debug: what a benchmark or an operator tracing a stuck
/// session reads; it names no value).
fn sent(body: &QueryBody, round: &'static str) {
    tracing::debug!(query_id = %body.query_id, round, "secure round sent");
}

/// The refusal of a second session for one query id; `prior` names the first session
/// (its id's first eight bytes, hex).
fn second_session(query_id: &str, prior: &str) -> Denial {
    Denial::new(
        DenialReason::QueryIdReused,
        format!(
            "this node already joined secure-aggregation session {prior} for query id {query_id:?}; a second session is refused (two totals could be differenced): ask again with a new query id"
        ),
    )
}
