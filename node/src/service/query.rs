//! The privacy path for one signed query, as its steps (ARCHITECTURE.md, "Life of one
//! query"): authenticate, serve a repeat from the release cache, check freshness and
//! the nonce, decide, spend durably, execute, cache; audited in one place. Each step
//! returns `Result<_, Stop>`, so whether an exit is audited is in its type.

use super::{Answer, Loaded, Service, Stop, eps, internal, ledger_note};
use crate::audit::{AuditRecord, Outcome};
use crate::engine::{EngineError, Release};
use crate::store::{CacheLookup, LedgerState, QueryKey, Store, StoreError};
use chrono::{DateTime, Utc};
use phm_policies::{Decision, Limits, Policy};
use phm_proto::{Denial, DenialReason, QueryBody, SignedQuery};
use std::sync::Arc;
use std::time::Instant;

/// Delta of one release on its own: its thresholding delta, or for Gaussian noise the
/// policy's whole delta (the plan splits it between thresholding and the conversion).
fn release_delta(limits: &Limits) -> f64 {
    if limits.spend.rho > 0.0 {
        limits.delta
    } else {
        limits.spend.delta
    }
}

/// Is a message issued at `issued_at_ms` within ±`validity_s` of `now`?
pub(super) fn freshness(
    issued_at_ms: i64,
    now: DateTime<Utc>,
    validity_s: u64,
) -> Result<(), Denial> {
    let skew_ms = now.timestamp_millis().saturating_sub(issued_at_ms);
    let window_ms = i64::try_from(validity_s.saturating_mul(1000)).unwrap_or(i64::MAX);
    if skew_ms.unsigned_abs() > window_ms.unsigned_abs() {
        let (amount, when) = if skew_ms > 0 {
            (skew_ms, "ago")
        } else {
            (skew_ms.saturating_neg(), "in the future")
        };
        return Err(Denial::new(
            DenialReason::Stale,
            format!(
                "the request was issued {:.1} s {when}; this node accepts requests issued within ±{validity_s} s of its clock (sign a fresh request, and check the requester's clock)",
                amount as f64 / 1000.0
            ),
        ));
    }
    Ok(())
}

impl Service {
    /// The requester is known, not revoked, and signed this.
    pub(super) fn authenticate(
        policy: &Policy,
        requester_id: &str,
        verify: impl FnOnce(
            &ed25519_dalek::VerifyingKey,
        ) -> Result<(), phm_proto::signing::SignatureError>,
    ) -> Result<(), Denial> {
        let Some(requester) = policy.requester(requester_id) else {
            return Err(Denial::new(
                DenialReason::Unauthenticated,
                format!("requester {requester_id:?} is not known to this node's policy"),
            ));
        };
        if requester.revoked {
            return Err(Denial::new(
                DenialReason::Unauthenticated,
                format!("requester {requester_id:?} is revoked in this node's policy"),
            ));
        }
        let Some(key) = policy.requester_key(requester_id) else {
            return Err(Denial::new(
                DenialReason::Unauthenticated,
                format!("the policy's public key for requester {requester_id:?} is unusable"),
            ));
        };
        verify(&key).map_err(|e| {
            Denial::new(
                DenialReason::Unauthenticated,
                format!("signature check failed for requester {requester_id:?}: {e}"),
            )
        })
    }

    /// A query or proof signed for another federation is refused: the federation id
    /// is the audience of every signature.
    pub(super) fn check_federation(&self, federation_id: &str) -> Result<(), Denial> {
        if federation_id == self.federation_id {
            return Ok(());
        }
        Err(Denial::new(
            DenialReason::Unauthenticated,
            format!(
                "this request was signed for federation {federation_id:?}, but this node belongs to federation {:?}",
                self.federation_id
            ),
        ))
    }

    /// Answer one signed query. `peer` is the client certificate's identity.
    pub async fn query(
        self: &Arc<Self>,
        signed: SignedQuery,
        peer: &str,
        now: DateTime<Utc>,
    ) -> Result<Answer, Denial> {
        let started = Instant::now();
        self.refuse_if_stopping()?;
        let loaded = self.current();
        let record = self.query_record(&loaded.policy, &signed, peer, now);
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
        let authentic = self
            .check_federation(&signed.body.federation_id)
            .and_then(|()| self.clock.check())
            .and_then(|()| {
                Self::authenticate(&loaded.policy, &signed.body.requester_id, |k| {
                    signed.verify(k)
                })
            });
        if let Err(d) = authentic {
            return Err(self.refuse(record, d, started).await);
        }
        // The rest runs as its own task holding the slot, so a caller that times out
        // does not abandon a query half way: a spend is always followed by a cached,
        // audited release (or an audited failure), and a retry of the same signed
        // query then finds the answer in the cache.
        let this = self.clone();
        let task_record = record.clone();
        let task = tokio::spawn(async move {
            let _slot = permit;
            this.answer(loaded, signed, task_record, now, started).await
        });
        match tokio::time::timeout(self.deadline, task).await {
            Ok(Ok(result)) => result,
            Ok(Err(e)) => Err(self
                .refuse(
                    record,
                    internal(format!("the query task failed: {e}")),
                    started,
                )
                .await),
            Err(_) => {
                let d = Denial::new(
                    DenialReason::Unavailable,
                    format!(
                        "deadline exceeded: no answer within this node's {} ms; any budget already charged stays spent, and the same signed query retried later gets the answer from the release cache",
                        self.deadline.as_millis()
                    ),
                );
                Err(self.refuse(record, d, started).await)
            }
        }
    }

    /// The privacy path after authentication, as its steps (ARCHITECTURE.md, "Life
    /// of one query"). Every step either succeeds or returns a `Stop`; this is the
    /// one place the outcome is audited, so no exit can skip the audit log: an answer
    /// and a `Stop::Refuse` are written, and only a `Stop::StorageDown` (the disk the
    /// log is on has failed) is returned unwritten.
    async fn answer(
        &self,
        loaded: Arc<Loaded>,
        signed: SignedQuery,
        mut record: AuditRecord,
        now: DateTime<Utc>,
        started: Instant,
    ) -> Result<Answer, Denial> {
        let body = &signed.body;
        let key = QueryKey {
            requester_id: &body.requester_id,
            query_id: &body.query_id,
        };
        let _in_flight = self.store.lock_query_id(&key).await;
        let outcome = self.answer_steps(&loaded, body, &mut record, now).await;
        match outcome {
            Ok(answer) => {
                record.decision = Outcome::Allowed;
                self.write_audit(record).await?;
                let label = if answer.cached { "cached" } else { "answered" };
                self.metrics
                    .query_outcome(label, started.elapsed().as_secs_f64());
                tracing::info!(
                    query_id = %body.query_id,
                    requester = %body.requester_id,
                    cached = answer.cached,
                    "answered"
                );
                Ok(answer)
            }
            Err(stop) => Err(self.stopped(record, stop, started).await),
        }
    }

    async fn answer_steps(
        &self,
        loaded: &Loaded,
        body: &QueryBody,
        record: &mut AuditRecord,
        now: DateTime<Utc>,
    ) -> Result<Answer, Stop> {
        let policy = &loaded.policy;
        match self.lookup_release(body, &body.query_id).await? {
            CacheLookup::Hit(answer) => {
                // The very message answered before (a relay's retry): no new spend,
                // but the policy in force now must still allow it.
                self.decide(policy, body, now)?;
                return Ok(Self::served_from_cache(answer, record));
            }
            CacheLookup::Retry(answer) => {
                // The requester re-signed the same question: a new message, so it
                // must be fresh and its nonce new, and the policy must still allow it.
                self.check_fresh_and_unseen(policy, body, now).await?;
                self.decide(policy, body, now)?;
                return Ok(Self::served_from_cache(answer, record));
            }
            CacheLookup::Conflict { .. } => {
                return Err(query_id_reused(&body.query_id).into());
            }
            CacheLookup::Charged {
                same_message,
                policy_version,
            } => {
                // Charged before, released nothing: answered now under that charge,
                // while the policy it was decided under is in force (another policy
                // may plan a different spend).
                if policy_version != policy.version() {
                    return Err(Denial::new(
                        DenialReason::QueryIdReused,
                        format!(
                            "query id {:?} was charged under an earlier policy and released nothing; the policy has changed since, so ask again with a new query id",
                            body.query_id
                        ),
                    )
                    .into());
                }
                if !same_message {
                    self.check_fresh_and_unseen(policy, body, now).await?;
                }
                let limits = self.decide(policy, body, now)?;
                let states = self.ledger_states(&limits).await?;
                record.reasons = vec![
                    "retry of a query charged earlier whose release failed: answered under that charge, no new spend".into(),
                ];
                record.ledgers = states.iter().map(ledger_note).collect();
                let release = self.execute(loaded, body, &limits, record).await?;
                let answer = self.answer_of(policy, body, &limits, &states, release);
                return self.cache_release(body, &body.query_id, answer).await;
            }
            CacheLookup::Miss => {}
        }
        self.check_fresh_and_unseen(policy, body, now).await?;
        let limits = self.decide(policy, body, now)?;
        let states = self.spend(&limits, record).await?;
        let release = match self.execute(loaded, body, &limits, record).await {
            Ok(release) => release,
            Err(denial) => {
                // The charge is durable and nothing was released: record that, so a
                // retry of this question is answered under this charge, not a second.
                self.note_charge(body, policy.version()).await?;
                record.reasons.push(
                    "charged, nothing released: a retry of this query id is answered under this charge".into(),
                );
                return Err(denial.into());
            }
        };
        let answer = self.answer_of(policy, body, &limits, &states, release);
        self.cache_release(body, &body.query_id, answer).await
    }

    /// Records that `body` was charged and released nothing (see `Store::store_charge`).
    async fn note_charge(&self, body: &QueryBody, policy_version: &str) -> Result<(), Stop> {
        let version = policy_version.to_string();
        match self
            .with_release_key(
                body,
                body.query_id.clone(),
                move |store, key, digest, content| {
                    store.store_charge(key, digest, content, &version)
                },
            )
            .await?
        {
            Ok(()) => Ok(()),
            Err(e) => Err(self.store_denial(e, "cannot record the charge").into()),
        }
    }

    /// The charged ledgers as they stand, spending nothing.
    async fn ledger_states(&self, limits: &Limits) -> Result<Vec<LedgerState>, Stop> {
        let store = self.store.clone();
        let charges = limits.charges.clone();
        let delta_conv = limits.delta;
        match self
            .io(move || store.ledger_states(&charges, delta_conv))
            .await?
        {
            Ok(states) => Ok(states),
            Err(e) => Err(self.store_denial(e, "cannot read the ledger").into()),
        }
    }

    pub(super) fn served_from_cache(mut answer: Answer, record: &mut AuditRecord) -> Answer {
        answer.cached = true;
        record.cached = true;
        record.reasons =
            vec!["repeat of an answered query: served from the release cache, no new spend".into()];
        answer
    }

    /// Run a release-cache operation on `body`'s requester, the cache id `id` and the
    /// digests, off the async workers under the storage watchdog. The id is the query
    /// id, or for an anchor's linkage session [`super::link::cache_id`], since one
    /// linked query releases once per partner.
    async fn with_release_key<T: Send + 'static>(
        &self,
        body: &QueryBody,
        id: String,
        op: impl FnOnce(&Store, &QueryKey<'_>, &str, &str) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<Result<T, StoreError>, Stop> {
        let store = self.store.clone();
        let requester = body.requester_id.clone();
        let (digest, content) = (body.digest(), body.content_digest());
        self.io(move || {
            let key = QueryKey {
                requester_id: &requester,
                query_id: &id,
            };
            op(&store, &key, &digest, &content)
        })
        .await
    }

    pub(super) async fn lookup_release(
        &self,
        body: &QueryBody,
        id: &str,
    ) -> Result<CacheLookup<Answer>, Stop> {
        match self
            .with_release_key(body, id.to_string(), |store, key, digest, content| {
                store.cached_release(key, digest, content)
            })
            .await?
        {
            Ok(lookup) => Ok(lookup),
            Err(e) => Err(self.store_denial(e, "cannot read the release cache").into()),
        }
    }

    async fn check_fresh_and_unseen(
        &self,
        policy: &Policy,
        body: &QueryBody,
        now: DateTime<Utc>,
    ) -> Result<(), Stop> {
        self.check_fresh_and_unseen_in("query", policy, body, now)
            .await
    }

    /// Fresh, and its nonce not seen before in `scope` (a partner sees one signed
    /// linked query once per anchor, so it keeps a scope per anchor).
    pub(super) async fn check_fresh_and_unseen_in(
        &self,
        scope: &str,
        policy: &Policy,
        body: &QueryBody,
        now: DateTime<Utc>,
    ) -> Result<(), Stop> {
        let validity = policy.file().release.query_validity_seconds;
        freshness(body.issued_at_unix_ms, now, validity)?;
        let store = self.store.clone();
        let (req, nonce, issued, scope) = (
            body.requester_id.clone(),
            body.nonce.clone(),
            body.issued_at_unix_ms,
            scope.to_string(),
        );
        match self
            .io(move || store.record_nonce(&scope, &req, &nonce, issued))
            .await?
        {
            Ok(()) => Ok(()),
            Err(StoreError::Replayed { .. }) => Err(Denial::new(
                DenialReason::Replayed,
                "this nonce was already used by this requester: a replayed or re-signed copy of an earlier message is refused (sign the query afresh with a new nonce)",
            )
            .into()),
            Err(e) => Err(self.store_denial(e, "cannot record the nonce").into()),
        }
    }

    /// Ask the policy; a refusal lists every reason with its rule.
    pub(super) fn decide(
        &self,
        policy: &Policy,
        body: &QueryBody,
        now: DateTime<Utc>,
    ) -> Result<Box<Limits>, Denial> {
        limits_or_denial(phm_policies::decide(policy, body, now))
    }
}

/// The release cache holds another question under this id.
pub(super) fn query_id_reused(query_id: &str) -> Denial {
    Denial::new(
        DenialReason::QueryIdReused,
        format!(
            "you already used query id {query_id:?} for a different question; give every new query a new id"
        ),
    )
}

/// The limits of an allowed decision, or a denial listing every reason with its rule.
pub(super) fn limits_or_denial(decision: Decision) -> Result<Box<Limits>, Denial> {
    {
        let refusals = match decision {
            Decision::Allow(limits) => return Ok(limits),
            Decision::Deny(refusals) => refusals,
        };
        let reasons: Vec<String> = refusals
            .iter()
            .map(|r| format!("{} [{}]", r.message, r.rule))
            .collect();
        let message = match refusals.first() {
            None => "refused by this node's policy (no rule allows it)".to_string(),
            Some(first) if refusals.len() == 1 => {
                format!("refused by this node's policy: {}", first.message)
            }
            Some(first) => format!(
                "refused by this node's policy: {} (and {} more reasons)",
                first.message,
                refusals.len() - 1
            ),
        };
        let reasons = if reasons.is_empty() {
            vec![message.clone()]
        } else {
            reasons
        };
        Err(Denial::new(DenialReason::PolicyDenied, message).with_reasons(reasons))
    }
}

impl Service {
    /// Spend, durably, before anything is computed from the data.
    pub(super) async fn spend(
        &self,
        limits: &Limits,
        record: &mut AuditRecord,
    ) -> Result<Vec<LedgerState>, Stop> {
        let store = self.store.clone();
        let charges = limits.charges.clone();
        let (spend, delta_conv) = (limits.spend, limits.delta);
        let states = self
            .io(move || store.check_and_spend(&charges, spend, delta_conv))
            .await?
            .map_err(|e| self.spend_failure(e))?;
        self.note_spend(limits, &states, record);
        Ok(states)
    }

    /// Why a charge failed, for the requester: an exhausted ledger with what is left,
    /// or a storage failure (which also stops the node).
    pub(super) fn spend_failure(&self, e: StoreError) -> Stop {
        match e {
            StoreError::BudgetExhausted {
                ledger,
                period_label,
                measure,
                total,
                remaining,
                requested,
                ..
            } => {
                let fmt = |x: f64| {
                    if measure == "delta" {
                        format!("{x:e}")
                    } else {
                        eps(x)
                    }
                };
                Denial::new(
                    DenialReason::BudgetExhausted,
                    format!(
                        "budget exhausted on {ledger} for {period_label}: {} of {} {measure} left, this query asks for {}",
                        fmt(remaining),
                        fmt(total),
                        fmt(requested)
                    ),
                )
                .with_reasons(vec![format!(
                    "{ledger} {period_label}: {} {measure} left of {}",
                    fmt(remaining),
                    fmt(total)
                )])
                .into()
            }
            e => self.store_denial(e, "cannot charge the budget").into(),
        }
    }

    /// The audit record's account of a charge that is on disk.
    pub(super) fn note_spend(
        &self,
        limits: &Limits,
        states: &[LedgerState],
        record: &mut AuditRecord,
    ) {
        record.epsilon_spent = limits.epsilon;
        record.delta_spent = release_delta(limits);
        record.ledger_spend = Some(limits.spend);
        record.ledgers = states.iter().map(ledger_note).collect();
        record.charged = limits.charges.iter().map(|c| c.key()).collect();
        record.charged.sort();
        record.charged.dedup();
        self.metrics.spent(limits.epsilon);
    }

    /// Run the engine on the spent budget; its failures keep the spend (waste, never
    /// an under-count).
    async fn execute(
        &self,
        loaded: &Loaded,
        body: &QueryBody,
        limits: &Limits,
        record: &mut AuditRecord,
    ) -> Result<Release, Denial> {
        let epsilon = limits.epsilon;
        let release = loaded
            .engine
            .execute_recorded(body, limits, &mut record.statements)
            .await;
        let release = release.map_err(|e| {
            let reason = match &e {
                EngineError::UnknownDataset(_)
                | EngineError::UnknownColumn { .. }
                | EngineError::BadLiteral { .. }
                | EngineError::TooManyGroups => DenialReason::InvalidQuery,
                EngineError::Warehouse(w) if w.is_unavailable() => DenialReason::Unavailable,
                _ => DenialReason::Internal,
            };
            Denial::new(
                reason,
                format!(
                    "{e}; the {epsilon} epsilon charged for this query stays spent, and asking again with the same query id (phm query --query-id) is answered under that charge"
                ),
            )
        })?;
        if release.epsilon_spent.is_nan()
            || release.epsilon_spent > epsilon + crate::store::SPEND_TOLERANCE
        {
            return Err(internal(format!(
                "the engine reports a privacy loss of {} above the {epsilon} charged; nothing is released",
                release.epsilon_spent
            )));
        }
        Ok(release)
    }

    pub(super) fn answer_of(
        &self,
        policy: &Policy,
        body: &QueryBody,
        limits: &Limits,
        states: &[LedgerState],
        release: Release,
    ) -> Answer {
        let charged = states
            .iter()
            .find(|s| s.ledger.starts_with("project:"))
            .or_else(|| states.iter().find(|s| s.ledger.starts_with("requester:")))
            .or(states.first());
        let org = &policy.file().organisation;
        Answer {
            query_id: body.query_id.clone(),
            node_id: org.ods_code.clone(),
            dataset: body.dataset.clone(),
            release,
            epsilon_remaining: charged.map(LedgerState::remaining).unwrap_or(0.0),
            policy_version: policy.version().to_string(),
            scope: limits.scope.into(),
            total_kind: Some(limits.total_kind.into()),
            population_noisy: limits
                .registered_population
                .or(org.registered_population)
                .map(|p| p as f64)
                .unwrap_or(0.0),
            released_at_unix_ms: Utc::now().timestamp_millis(),
            cached: false,
        }
    }

    pub(super) async fn cache_release(
        &self,
        body: &QueryBody,
        id: &str,
        answer: Answer,
    ) -> Result<Answer, Stop> {
        match self
            .with_release_key(body, id.to_string(), move |store, key, digest, content| {
                store.store_release(key, digest, content, answer)
            })
            .await?
        {
            Ok(stored) => Ok(stored),
            Err(e) => Err(self
                .store_denial(
                    e,
                    "cannot cache the release (the epsilon charged stays spent)",
                )
                .into()),
        }
    }
}
