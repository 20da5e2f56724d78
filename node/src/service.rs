//! The node's domain service, free of any transport: authenticate a signed query,
//! serve repeats from the release cache, refuse stale and replayed messages, ask the
//! policy, spend budget durably, run the engine, cache and audit the release. Also
//! Describe (what the requester may use) and Budget (what it has left). Every decision,
//! allowed or refused, is written to the audit log before the caller sees it.

use crate::audit::{AuditLog, AuditRecord, Outcome};
use crate::engine::{Engine, EngineError, Release};
use crate::metrics::Metrics;
use crate::store::{CacheLookup, LedgerState, QueryKey, Store, StoreError};
use chrono::{DateTime, Utc};
use phm_policies::model::{Column, Grouping, Organisation, Period, Scope};
use phm_policies::{Decision, Limits, Policy};
use phm_proto::{Denial, DenialReason, ProofOp, QueryBody, RequesterProof, SignedQuery};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;

/// The policy in force and the engine loaded for it; swapped atomically on reload.
#[derive(Debug)]
pub struct Loaded {
    pub policy: Arc<Policy>,
    pub engine: Arc<Engine>,
    /// Folder of the policy file (dataset paths are relative to it).
    pub base_dir: PathBuf,
}

/// Limits the service enforces itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceLimits {
    pub max_concurrent_queries: usize,
    pub query_deadline: Duration,
    /// A storage operation (sled write, fsync, audit append) not finished within this
    /// is taken as a failed disk: the node stops. Independent of any query's deadline.
    pub storage_timeout: Duration,
}

/// A released answer and what the wire needs around it. This is what the release
/// cache stores, so a repeat returns exactly the same figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Answer {
    pub query_id: String,
    /// ODS code of this organisation.
    pub node_id: String,
    pub dataset: String,
    pub release: Release,
    /// Budget left on the charged ledger (project ledger for research) right after
    /// this release.
    pub epsilon_remaining: f64,
    pub policy_version: String,
    pub scope: Scope,
    /// Published registered population when the policy declares one, else 0.
    pub population_noisy: f64,
    pub released_at_unix_ms: i64,
    /// Set on answers served from the release cache.
    #[serde(default)]
    pub cached: bool,
    /// How this node's policy says a system total of the dataset reads; the
    /// coordinator checks it against its own configuration.
    #[serde(default)]
    pub total_kind: phm_policies::model::TotalKind,
}

/// A dataset as the requester may see it.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetView {
    pub name: String,
    pub max_rows_per_person: u32,
    /// Only usable, non-identifier columns.
    pub columns: Vec<Column>,
}

/// What Describe returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    pub organisation: Organisation,
    pub datasets: Vec<DatasetView>,
    pub policy_version: String,
    /// The strictest per-query cap that applies to this requester (and project).
    pub per_query_epsilon_cap: f64,
    pub min_reportable_count: f64,
    pub scope: Scope,
}

/// One ledger as Budget reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerView {
    pub ledger: String,
    pub period: Period,
    pub period_label: String,
    pub total: f64,
    pub spent: f64,
    pub remaining: f64,
    pub per_query_cap: f64,
    pub delta_total: f64,
    pub delta_spent: f64,
    pub delta_remaining: f64,
    /// Composed zCDP rho of this period's Gaussian releases.
    pub rho_spent: f64,
}

/// What Budget returns.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetView {
    pub node_id: String,
    pub ledgers: Vec<LedgerView>,
    pub policy_version: String,
}

/// Label of the budget period `now` falls in: the policy crate's, so the node's
/// budget view and the decision's ledger charges can never disagree.
pub use phm_policies::period_label;

/// An audit record of a refusal with nothing yet known about the query; callers fill
/// in what they know, and later steps turn it into an allowed decision.
fn refused_record(
    now: DateTime<Utc>,
    rpc: &str,
    requester: &str,
    peer: &str,
    policy_version: String,
) -> AuditRecord {
    AuditRecord {
        time: now_rfc3339(now),
        rpc: rpc.to_string(),
        requester: requester.to_string(),
        purpose: None,
        project: None,
        query_id: None,
        query_digest: None,
        sql: None,
        dataset: None,
        epsilon_requested: None,
        client_identity: peer.to_string(),
        decision: Outcome::Refused,
        cached: false,
        reason: None,
        reasons: vec![],
        epsilon_spent: 0.0,
        delta_spent: 0.0,
        ledger_spend: None,
        ledgers: vec![],
        charged: vec![],
        policy_version,
    }
}

/// Record the first storage failure; the node's run loop then stops the node.
fn report_storage_failure(fatal: &tokio::sync::watch::Sender<Option<String>>, what: String) {
    // Flag first: logging goes to the same failing disk.
    fatal.send_if_modified(|f| {
        if f.is_none() {
            *f = Some(what.clone());
            true
        } else {
            false
        }
    });
    tracing::error!(
        "storage failure: {what}; the node stops, since it can no longer record spends and decisions before answering"
    );
}

/// Run `f` on the blocking pool; if it fails or takes longer than `limit`, report a
/// storage failure (from a task of its own, so the report happens even when the caller
/// has gone) and refuse `UNAVAILABLE`.
async fn watched_io<T: Send + 'static>(
    fatal: Arc<tokio::sync::watch::Sender<Option<String>>>,
    limit: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, Denial> {
    let task = tokio::task::spawn_blocking(f);
    let reporter = fatal.clone();
    let watched = tokio::spawn(async move {
        let failure = match tokio::time::timeout(limit, task).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) => format!("the node's storage task failed: {e}"),
            Err(_) => format!(
                "a write to the ledger, release cache or audit log did not finish within {} ms (limits.storage_timeout_ms); the disk is failing or full",
                limit.as_millis()
            ),
        };
        report_storage_failure(&reporter, failure.clone());
        Err(failure)
    });
    let failure = match watched.await {
        Ok(Ok(v)) => return Ok(v),
        Ok(Err(msg)) => msg,
        Err(e) => {
            let msg = format!("the node's storage watchdog failed: {e}");
            report_storage_failure(&fatal, msg.clone());
            msg
        }
    };
    Err(Denial::new(
        DenialReason::Unavailable,
        format!("{failure}; nothing is released and the node is stopping"),
    ))
}

/// Budget periods follow the wall clock, so a clock pushed forward (NTP spoofing, an
/// operator error) would open fresh budgets. The guard compares the wall clock's
/// advance since start with the monotonic clock's; a node whose wall clock moved by
/// more than the tolerance refuses queries until it is restarted with the right time.
#[derive(Debug)]
struct ClockGuard {
    origin_wall_ms: i64,
    origin: Instant,
}

/// Largest disagreement between the wall clock and the monotonic clock tolerated
/// (NTP slews far less than this; a step of a minute or more is a jump).
const CLOCK_JUMP_TOLERANCE_MS: i64 = 60_000;

impl ClockGuard {
    fn new() -> ClockGuard {
        ClockGuard {
            origin_wall_ms: Utc::now().timestamp_millis(),
            origin: Instant::now(),
        }
    }

    fn check(&self) -> Result<(), Denial> {
        let mono_ms = i64::try_from(self.origin.elapsed().as_millis()).unwrap_or(i64::MAX);
        clock_drift_check(
            Utc::now()
                .timestamp_millis()
                .saturating_sub(self.origin_wall_ms),
            mono_ms,
        )
    }
}

/// Refuse when the wall clock advanced `wall_ms` while the monotonic clock advanced
/// `mono_ms`, and the two differ by more than the tolerance.
fn clock_drift_check(wall_ms: i64, mono_ms: i64) -> Result<(), Denial> {
    let drift = wall_ms.saturating_sub(mono_ms);
    if drift.saturating_abs() <= CLOCK_JUMP_TOLERANCE_MS {
        return Ok(());
    }
    let (amount, way) = if drift > 0 {
        (drift, "forward")
    } else {
        (drift.saturating_neg(), "back")
    };
    tracing::error!(
        drift_ms = drift,
        "the wall clock jumped {way} by {:.0} s since the node started",
        amount as f64 / 1000.0
    );
    Err(Denial::new(
        DenialReason::Unavailable,
        format!(
            "this node's clock jumped {way} by {:.0} s while it was running; budget periods follow the clock, so the node refuses queries until its operator fixes the time and restarts it",
            amount as f64 / 1000.0
        ),
    ))
}

/// Delta of one release on its own: its thresholding delta, or for Gaussian noise the
/// policy's whole delta (the plan splits it between thresholding and the conversion).
fn release_delta(limits: &Limits) -> f64 {
    if limits.spend.rho > 0.0 {
        limits.delta
    } else {
        limits.spend.delta
    }
}

/// The domain service. Cheap to share (`Arc<Service>`).
pub struct Service {
    state: RwLock<Arc<Loaded>>,
    /// The federation this node belongs to: the audience every signature must name.
    federation_id: String,
    clock: ClockGuard,
    store: Arc<Store>,
    audit: Arc<AuditLog>,
    metrics: Arc<Metrics>,
    slots: Arc<Semaphore>,
    max_slots: u32,
    deadline: Duration,
    storage_timeout: Duration,
    // Set once storage fails: the node then stops rather than run without being able
    // to record spends and decisions.
    fatal: Arc<tokio::sync::watch::Sender<Option<String>>>,
}

impl std::fmt::Debug for Service {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Service")
            .field("store", &self.store)
            .field("audit", &self.audit)
            .finish_non_exhaustive()
    }
}

fn internal(msg: impl Into<String>) -> Denial {
    Denial::new(DenialReason::Internal, msg)
}

fn outcome_label(d: &Denial) -> String {
    d.reason_name().to_ascii_lowercase()
}

fn now_rfc3339(now: DateTime<Utc>) -> String {
    now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An epsilon for people: at most six decimals, no float noise like 0.09999999999999998.
fn eps(x: f64) -> String {
    if x != 0.0 && x.abs() < 1e-6 {
        return format!("{x:e}");
    }
    let s = format!("{x:.6}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s.to_string()
    }
}

fn ledger_note(s: &LedgerState) -> String {
    format!(
        "{} {}: spent {} of {}, {} left; delta {:e} of {:e}",
        s.ledger,
        s.period_label,
        eps(s.spent),
        eps(s.total),
        eps(s.remaining()),
        s.delta_spent,
        s.delta_total
    )
}

fn find_project<'a>(policy: &'a Policy, id: &str) -> Option<&'a phm_policies::model::Project> {
    policy.file().projects.iter().find(|p| p.id == id)
}

/// Is a message issued at `issued_at_ms` within ±`validity_s` of `now`?
fn freshness(issued_at_ms: i64, now: DateTime<Utc>, validity_s: u64) -> Result<(), Denial> {
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
    pub fn new(
        federation_id: String,
        loaded: Loaded,
        store: Arc<Store>,
        audit: Arc<AuditLog>,
        metrics: Arc<Metrics>,
        limits: ServiceLimits,
    ) -> Arc<Service> {
        let max_slots =
            u32::try_from(limits.max_concurrent_queries.clamp(1, 100_000)).unwrap_or(100_000);
        Arc::new(Service {
            state: RwLock::new(Arc::new(loaded)),
            federation_id,
            clock: ClockGuard::new(),
            store,
            audit,
            metrics,
            slots: Arc::new(Semaphore::new(max_slots as usize)),
            max_slots,
            deadline: limits.query_deadline,
            storage_timeout: limits.storage_timeout,
            fatal: Arc::new(tokio::sync::watch::Sender::new(None)),
        })
    }

    /// The policy and engine in force now.
    pub fn current(&self) -> Arc<Loaded> {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Put a new policy (and engine) in force. Queries already running finish under
    /// the one they started with.
    pub fn install(&self, loaded: Loaded) {
        *self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Arc::new(loaded);
    }

    pub fn store(&self) -> &Arc<Store> {
        &self.store
    }

    pub fn audit_log(&self) -> &Arc<AuditLog> {
        &self.audit
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn deadline(&self) -> Duration {
        self.deadline
    }

    /// Take `n` query slots, as running queries would (for overload tests).
    #[doc(hidden)]
    pub fn occupy_slots_for_tests(&self, n: u32) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.slots.clone().try_acquire_many_owned(n).ok()
    }

    /// Wait until no query is running (including ones whose caller already timed
    /// out), at most `timeout`. Returns whether everything finished.
    pub async fn drain(&self, timeout: Duration) -> bool {
        matches!(
            tokio::time::timeout(timeout, self.slots.acquire_many(self.max_slots)).await,
            Ok(Ok(_))
        )
    }

    /// fsync the ledger and the audit log.
    pub async fn flush(&self) -> Result<(), String> {
        let store = self.store.clone();
        let audit = self.audit.clone();
        self.io(move || {
            store.flush().map_err(|e| e.to_string())?;
            audit.flush().map_err(|e| e.to_string())
        })
        .await
        .map_err(|d| d.message)?
    }

    /// Becomes `Some(reason)` when the ledger, release cache or audit log could not
    /// be written; the node must then stop.
    pub fn storage_failure(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.fatal.subscribe()
    }

    /// After a storage failure every request is refused at once, without touching the
    /// disk (so not even the refusal is audited: nothing can be recorded any more).
    fn refuse_if_stopping(&self) -> Result<(), Denial> {
        match self.fatal.borrow().as_ref() {
            None => Ok(()),
            Some(failure) => Err(Denial::new(
                DenialReason::Unavailable,
                format!(
                    "this node is stopping after a storage failure ({failure}); retry once its operator has restarted it"
                ),
            )),
        }
    }

    fn storage_failed(&self, what: String) {
        report_storage_failure(&self.fatal, what);
    }

    /// Run blocking IO (sled, fsync) off the async workers, under the storage watchdog.
    ///
    /// The watchdog runs in its own task, so it fires even when the query that asked
    /// for the IO has already given up at its deadline: a disk that hangs (sled 0.34
    /// never completes a flush after a failed write) stops the node instead of leaving
    /// it wedged, accepting connections and answering nothing.
    async fn io<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Denial> {
        watched_io(self.fatal.clone(), self.storage_timeout, f).await
    }

    /// A refusal for a store error; a failing database also stops the node.
    fn store_denial(&self, e: StoreError, during: &str) -> Denial {
        let msg = format!("{during}: {e}");
        if e.is_storage_failure() {
            self.storage_failed(msg.clone());
        }
        internal(format!("{msg}; nothing is released"))
    }

    async fn write_audit(&self, record: AuditRecord) -> Result<(), Denial> {
        let audit = self.audit.clone();
        match self.io(move || audit.append(&record)).await? {
            Ok(_) => Ok(()),
            Err(e) => {
                self.storage_failed(format!("cannot write the audit log: {e}"));
                Err(internal(format!(
                    "the node could not write its audit log ({e}); nothing is released"
                )))
            }
        }
    }

    /// Audit a refusal and return it (with the policy version filled in).
    async fn refuse(&self, mut record: AuditRecord, denial: Denial, started: Instant) -> Denial {
        let denial = if denial.policy_version.is_empty() {
            denial.with_policy_version(record.policy_version.clone())
        } else {
            denial
        };
        record.decision = Outcome::Refused;
        record.reason = Some(denial.reason_name().to_string());
        if record.reasons.is_empty() {
            record.reasons = if denial.reasons.is_empty() {
                vec![denial.message.clone()]
            } else {
                denial.reasons.clone()
            };
        }
        tracing::info!(
            rpc = %record.rpc,
            requester = %record.requester,
            query_id = record.query_id.as_deref().unwrap_or(""),
            client = %record.client_identity,
            reason = denial.reason_name(),
            message = %denial.message,
            "refused"
        );
        if record.rpc == "query" {
            self.metrics
                .query_outcome(&outcome_label(&denial), started.elapsed().as_secs_f64());
        }
        match self.write_audit(record).await {
            Ok(()) => denial,
            Err(audit_failure) => audit_failure,
        }
    }

    /// Audit a request that could not even be decoded (invalid wire message).
    pub async fn refuse_unparsed(
        &self,
        rpc: &str,
        requester: &str,
        query_id: &str,
        peer: &str,
        denial: Denial,
        now: DateTime<Utc>,
    ) -> Denial {
        let policy_version = self.current().policy.version().to_string();
        let record = AuditRecord {
            query_id: (!query_id.is_empty()).then(|| query_id.to_string()),
            ..refused_record(now, rpc, requester, peer, policy_version)
        };
        self.refuse(record, denial, Instant::now()).await
    }

    fn query_record(
        &self,
        policy: &Policy,
        q: &SignedQuery,
        peer: &str,
        now: DateTime<Utc>,
    ) -> AuditRecord {
        let b = &q.body;
        AuditRecord {
            purpose: Some(b.purpose.as_str().to_string()),
            project: b.project_id.clone(),
            query_id: Some(b.query_id.clone()),
            query_digest: Some(b.digest()),
            sql: Some(b.to_sql()),
            dataset: Some(b.dataset.clone()),
            epsilon_requested: Some(b.epsilon),
            ..refused_record(
                now,
                "query",
                &b.requester_id,
                peer,
                policy.version().to_string(),
            )
        }
    }

    /// The requester is known, not revoked, and signed this.
    fn authenticate(
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
    fn check_federation(&self, federation_id: &str) -> Result<(), Denial> {
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
    /// of one query"). Every step either succeeds or returns a `Denial`; this is the
    /// one place the outcome is audited, so no exit can skip the audit log.
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
            Err(d) => Err(self.refuse(record, d, started).await),
        }
    }

    async fn answer_steps(
        &self,
        loaded: &Loaded,
        body: &QueryBody,
        record: &mut AuditRecord,
        now: DateTime<Utc>,
    ) -> Result<Answer, Denial> {
        let policy = &loaded.policy;
        match self.lookup_release(body).await? {
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
                return Err(Denial::new(
                    DenialReason::QueryIdReused,
                    format!(
                        "you already used query id {:?} for a different question; give every new query a new id",
                        body.query_id
                    ),
                ));
            }
            CacheLookup::Miss => {}
        }
        self.check_fresh_and_unseen(policy, body, now).await?;
        let limits = self.decide(policy, body, now)?;
        let states = self.spend(&limits, record).await?;
        let release = self.execute(loaded, body, &limits).await?;
        let answer = self.answer_of(policy, body, &limits, &states, release);
        self.cache_release(body, answer).await
    }

    fn served_from_cache(mut answer: Answer, record: &mut AuditRecord) -> Answer {
        answer.cached = true;
        record.cached = true;
        record.reasons =
            vec!["repeat of an answered query: served from the release cache, no new spend".into()];
        answer
    }

    async fn lookup_release(&self, body: &QueryBody) -> Result<CacheLookup<Answer>, Denial> {
        let store = self.store.clone();
        let (requester, id) = (body.requester_id.clone(), body.query_id.clone());
        let (digest, content) = (body.digest(), body.content_digest());
        match self
            .io(move || {
                let key = QueryKey {
                    requester_id: &requester,
                    query_id: &id,
                };
                store.cached_release::<Answer>(&key, &digest, &content)
            })
            .await?
        {
            Ok(lookup) => Ok(lookup),
            Err(e) => Err(self.store_denial(e, "cannot read the release cache")),
        }
    }

    async fn check_fresh_and_unseen(
        &self,
        policy: &Policy,
        body: &QueryBody,
        now: DateTime<Utc>,
    ) -> Result<(), Denial> {
        let validity = policy.file().release.query_validity_seconds;
        freshness(body.issued_at_unix_ms, now, validity)?;
        let store = self.store.clone();
        let (req, nonce, issued) = (
            body.requester_id.clone(),
            body.nonce.clone(),
            body.issued_at_unix_ms,
        );
        match self
            .io(move || store.record_nonce("query", &req, &nonce, issued))
            .await?
        {
            Ok(()) => Ok(()),
            Err(StoreError::Replayed { .. }) => Err(Denial::new(
                DenialReason::Replayed,
                "this nonce was already used by this requester: a replayed or re-signed copy of an earlier message is refused (sign the query afresh with a new nonce)",
            )),
            Err(e) => Err(self.store_denial(e, "cannot record the nonce")),
        }
    }

    /// Ask the policy; a refusal lists every reason with its rule.
    fn decide(
        &self,
        policy: &Policy,
        body: &QueryBody,
        now: DateTime<Utc>,
    ) -> Result<Box<Limits>, Denial> {
        let refusals = match phm_policies::decide(policy, body, now) {
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

    /// Spend, durably, before anything is computed from the data.
    async fn spend(
        &self,
        limits: &Limits,
        record: &mut AuditRecord,
    ) -> Result<Vec<LedgerState>, Denial> {
        let store = self.store.clone();
        let charges = limits.charges.clone();
        let (spend, delta_conv) = (limits.spend, limits.delta);
        let states = match self
            .io(move || store.check_and_spend(&charges, spend, delta_conv))
            .await?
        {
            Ok(states) => states,
            Err(StoreError::BudgetExhausted {
                ledger,
                period_label,
                measure,
                total,
                remaining,
                requested,
                ..
            }) => {
                let fmt = |x: f64| {
                    if measure == "delta" {
                        format!("{x:e}")
                    } else {
                        eps(x)
                    }
                };
                return Err(Denial::new(
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
                )]));
            }
            Err(e) => return Err(self.store_denial(e, "cannot charge the budget")),
        };
        record.epsilon_spent = limits.epsilon;
        record.delta_spent = release_delta(limits);
        record.ledger_spend = Some(limits.spend);
        record.ledgers = states.iter().map(ledger_note).collect();
        record.charged = limits.charges.iter().map(|c| c.key()).collect();
        record.charged.sort();
        record.charged.dedup();
        self.metrics.spent(limits.epsilon);
        Ok(states)
    }

    /// Run the engine on the spent budget; its failures keep the spend (waste, never
    /// an under-count).
    async fn execute(
        &self,
        loaded: &Loaded,
        body: &QueryBody,
        limits: &Limits,
    ) -> Result<Release, Denial> {
        let epsilon = limits.epsilon;
        let release = loaded.engine.execute(body, limits).await.map_err(|e| {
            let reason = match e {
                EngineError::UnknownDataset(_)
                | EngineError::UnknownColumn { .. }
                | EngineError::BadLiteral { .. }
                | EngineError::TooManyGroups => DenialReason::InvalidQuery,
                _ => DenialReason::Internal,
            };
            Denial::new(
                reason,
                format!("{e}; the {epsilon} epsilon charged for this query stays spent"),
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

    fn answer_of(
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
            scope: limits.scope,
            total_kind: limits.total_kind,
            population_noisy: limits
                .registered_population
                .or(org.registered_population)
                .map(|p| p as f64)
                .unwrap_or(0.0),
            released_at_unix_ms: Utc::now().timestamp_millis(),
            cached: false,
        }
    }

    async fn cache_release(&self, body: &QueryBody, answer: Answer) -> Result<Answer, Denial> {
        let store = self.store.clone();
        let (requester, id) = (body.requester_id.clone(), body.query_id.clone());
        let (digest, content) = (body.digest(), body.content_digest());
        match self
            .io(move || {
                let key = QueryKey {
                    requester_id: &requester,
                    query_id: &id,
                };
                store.store_release(&key, &digest, &content, &answer)
            })
            .await?
        {
            Ok(stored) => Ok(stored),
            Err(e) => Err(self.store_denial(
                e,
                "cannot cache the release (the epsilon charged stays spent)",
            )),
        }
    }

    fn proof_record(
        &self,
        op: ProofOp,
        policy: &Policy,
        proof: &RequesterProof,
        peer: &str,
        now: DateTime<Utc>,
    ) -> AuditRecord {
        AuditRecord {
            project: proof.project_id.clone(),
            ..refused_record(
                now,
                op.as_str(),
                &proof.requester_id,
                peer,
                policy.version().to_string(),
            )
        }
    }

    /// Authenticate a Describe/Budget proof: known, not revoked, signed for `op`,
    /// fresh, not replayed, and (if a project is named) a member of that project.
    async fn check_proof(
        &self,
        op: ProofOp,
        policy: &Policy,
        proof: &RequesterProof,
        now: DateTime<Utc>,
    ) -> Result<(), Denial> {
        self.check_federation(&proof.federation_id)?;
        self.clock.check()?;
        Self::authenticate(policy, &proof.requester_id, |k| proof.verify(op, k))?;
        freshness(
            proof.issued_at_unix_ms,
            now,
            policy.file().release.query_validity_seconds,
        )?;
        let store = self.store.clone();
        let (req, nonce, issued) = (
            proof.requester_id.clone(),
            proof.nonce.clone(),
            proof.issued_at_unix_ms,
        );
        match self
            .io(move || store.record_nonce(op.as_str(), &req, &nonce, issued))
            .await?
        {
            Ok(()) => {}
            Err(StoreError::Replayed { .. }) => {
                return Err(Denial::new(
                    DenialReason::Replayed,
                    "this proof's nonce was already used by this requester; sign a fresh one",
                ));
            }
            Err(e) => return Err(self.store_denial(e, "cannot record the nonce")),
        }
        if let Some(pid) = &proof.project_id {
            let member = policy
                .file()
                .projects
                .iter()
                .find(|p| p.id == *pid)
                .is_some_and(|p| p.requesters.contains(&proof.requester_id));
            if !member {
                return Err(Denial::new(
                    DenialReason::PolicyDenied,
                    format!(
                        "project {pid:?} is not approved on this node for requester {:?}",
                        proof.requester_id
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The datasets and columns this requester (under its project, if named) may use.
    pub async fn describe(
        &self,
        proof: RequesterProof,
        peer: &str,
        now: DateTime<Utc>,
    ) -> Result<Description, Denial> {
        let started = Instant::now();
        self.refuse_if_stopping()?;
        let loaded = self.current();
        let policy = &loaded.policy;
        let mut record = self.proof_record(ProofOp::Describe, policy, &proof, peer, now);
        if let Err(d) = self
            .check_proof(ProofOp::Describe, policy, &proof, now)
            .await
        {
            return Err(self.refuse(record, d, started).await);
        }
        let file = policy.file();
        let requester = policy.requester(&proof.requester_id);
        let project = proof
            .project_id
            .as_deref()
            .and_then(|id| find_project(policy, id));
        let opt_out_column = file.opt_out.as_ref().map(|o| o.column.as_str());
        let datasets: Vec<DatasetView> = file
            .datasets
            .iter()
            .filter(|d| requester.is_some_and(|r| r.datasets.contains(&d.name)))
            .filter(|d| project.is_none_or(|p| p.datasets.contains(&d.name)))
            .map(|d| DatasetView {
                name: d.name.clone(),
                max_rows_per_person: d.max_rows_per_person,
                columns: d
                    .columns
                    .iter()
                    .filter(|c| !c.identifier && c.name != d.person_id)
                    .filter(|c| Some(c.name.as_str()) != opt_out_column)
                    .filter(|c| c.filter || c.aggregate || c.group != Grouping::No)
                    .filter(|c| project.is_none_or(|p| p.columns.contains(&c.name)))
                    .cloned()
                    .collect(),
            })
            .collect();
        let mut cap = file.release.per_query_epsilon_cap;
        if let Some(r) = requester {
            cap = cap.min(r.budget.per_query_cap);
        }
        if let Some(p) = project {
            cap = cap.min(p.budget.per_query_cap);
        }
        record.decision = Outcome::Allowed;
        record.reasons = vec![format!(
            "described {} dataset(s): {}",
            datasets.len(),
            datasets
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )];
        self.write_audit(record).await?;
        Ok(Description {
            organisation: file.organisation.clone(),
            datasets,
            policy_version: policy.version().to_string(),
            per_query_epsilon_cap: cap,
            min_reportable_count: file.release.min_reportable_count,
            scope: file.release.scope,
        })
    }

    /// The requester's ledger (and its project's, if named) for the current period.
    pub async fn budget(
        &self,
        proof: RequesterProof,
        peer: &str,
        now: DateTime<Utc>,
    ) -> Result<BudgetView, Denial> {
        let started = Instant::now();
        self.refuse_if_stopping()?;
        let loaded = self.current();
        let policy = &loaded.policy;
        let mut record = self.proof_record(ProofOp::Budget, policy, &proof, peer, now);
        if let Err(d) = self.check_proof(ProofOp::Budget, policy, &proof, now).await {
            return Err(self.refuse(record, d, started).await);
        }
        let mut wanted = Vec::new();
        if let Some(r) = policy.requester(&proof.requester_id) {
            wanted.push((format!("requester:{}", r.id), r.budget.clone()));
        }
        if let Some(p) = proof
            .project_id
            .as_deref()
            .and_then(|id| find_project(policy, id))
        {
            wanted.push((format!("project:{}", p.id), p.budget.clone()));
        }
        let store = self.store.clone();
        let delta_conv = policy.file().release.delta;
        let read = self
            .io(move || {
                wanted
                    .into_iter()
                    .map(|(ledger, b)| {
                        let label = period_label(b.period, now);
                        let sums = store.held(&ledger, &label)?;
                        let (spent, delta_spent) = sums.effective(delta_conv);
                        Ok(LedgerView {
                            ledger,
                            period: b.period,
                            period_label: label,
                            total: b.epsilon,
                            spent,
                            remaining: (b.epsilon - spent).max(0.0),
                            per_query_cap: b.per_query_cap,
                            delta_total: b.delta,
                            delta_spent,
                            delta_remaining: (b.delta - delta_spent).max(0.0),
                            rho_spent: sums.rho,
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
            })
            .await?;
        let ledgers = match read {
            Ok(l) => l,
            Err(e) => {
                let d = self.store_denial(e, "cannot read the ledger");
                return Err(self.refuse(record, d, started).await);
            }
        };
        record.decision = Outcome::Allowed;
        record.reasons = ledgers
            .iter()
            .map(|l| {
                format!(
                    "{} {}: spent {} of {}, delta {:e} of {:e}",
                    l.ledger,
                    l.period_label,
                    eps(l.spent),
                    eps(l.total),
                    l.delta_spent,
                    l.delta_total
                )
            })
            .collect();
        self.write_audit(record).await?;
        Ok(BudgetView {
            node_id: policy.file().organisation.ods_code.clone(),
            ledgers,
            policy_version: policy.version().to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[test]
    fn epsilons_print_without_float_noise() {
        assert_eq!(eps(0.09999999999999998), "0.1");
        assert_eq!(eps(10.0), "10");
        assert_eq!(eps(0.0), "0");
        assert_eq!(eps(0.25), "0.25");
        assert_eq!(eps(1e-9), "1e-9");
    }

    #[test]
    fn period_labels() {
        let t = Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).unwrap();
        assert_eq!(period_label(Period::Day, t), "2026-11-23");
        assert_eq!(period_label(Period::Month, t), "2026-11");
        assert_eq!(period_label(Period::Quarter, t), "2026-Q4");
        let t = Utc.with_ymd_and_hms(2026, 3, 31, 23, 59, 59).unwrap();
        assert_eq!(period_label(Period::Quarter, t), "2026-Q1");
    }

    #[test]
    fn a_wall_clock_jump_against_the_monotonic_clock_is_refused() {
        // F13: budget periods follow the wall clock; a clock stepped forward (NTP
        // spoofing, an operator error) would open fresh budgets.
        assert!(
            clock_drift_check(3_600_000, 3_600_000 - 500).is_ok(),
            "NTP slew"
        );
        let forward = clock_drift_check(40 * 86_400_000, 3_600_000).unwrap_err();
        assert_eq!(forward.reason, DenialReason::Unavailable);
        assert!(forward.message.contains("forward"), "{}", forward.message);
        let back = clock_drift_check(0, 3_600_000).unwrap_err();
        assert!(back.message.contains("back"), "{}", back.message);
        assert!(ClockGuard::new().check().is_ok());
    }

    #[test]
    fn freshness_window_is_symmetric() {
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 10, 0, 0).unwrap();
        let ms = now.timestamp_millis();
        assert!(freshness(ms - 299_000, now, 300).is_ok());
        assert!(freshness(ms + 299_000, now, 300).is_ok());
        let old = freshness(ms - 301_000, now, 300).unwrap_err();
        assert_eq!(old.reason, DenialReason::Stale);
        assert!(old.message.contains("ago"), "{}", old.message);
        let future = freshness(ms + 301_000, now, 300).unwrap_err();
        assert!(future.message.contains("future"), "{}", future.message);
        assert!(freshness(i64::MIN + 1, now, u64::MAX).is_ok());
        assert!(freshness(1, now, 0).is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_hung_storage_call_is_refused_and_stops_the_node_even_if_the_caller_left() {
        let fatal = Arc::new(tokio::sync::watch::Sender::new(None));
        let limit = Duration::from_millis(100);
        let hang = || std::thread::sleep(Duration::from_secs(3));

        let started = Instant::now();
        let d = watched_io(fatal.clone(), limit, hang).await.unwrap_err();
        assert_eq!(d.reason, DenialReason::Unavailable);
        assert!(
            d.message.contains("did not finish within 100 ms"),
            "{}",
            d.message
        );
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "refused only when the call ended"
        );
        assert!(fatal.borrow().is_some(), "the node must be told to stop");

        // A caller that gives up first (its query deadline) must not silence the watchdog.
        let fatal = Arc::new(tokio::sync::watch::Sender::new(None));
        let mut stopped = fatal.subscribe();
        let gave_up = tokio::time::timeout(
            Duration::from_millis(10),
            watched_io(fatal.clone(), limit, hang),
        )
        .await;
        assert!(gave_up.is_err());
        tokio::time::timeout(Duration::from_secs(2), stopped.wait_for(Option::is_some))
            .await
            .expect("the watchdog reports the hang after its caller left")
            .expect("sender alive");

        // A call that finishes in time is just its result.
        let fatal = Arc::new(tokio::sync::watch::Sender::new(None));
        assert_eq!(watched_io(fatal.clone(), limit, || 7).await.unwrap(), 7);
        assert!(fatal.borrow().is_none());
    }
}
