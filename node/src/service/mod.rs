//! The node's domain service, free of any transport: authenticate a signed query,
//! serve repeats from the release cache, refuse stale and replayed messages, ask the
//! policy, spend budget durably, run the engine, cache and audit the release. Also
//! Describe (what the requester may use) and Budget (what it has left). Every decision,
//! allowed or refused, is written to the audit log before the caller sees it.
//!
//! - `query.rs`: the privacy path, as its steps.
//! - `views.rs`: Describe and Budget.
//! - `record.rs`: the audit records each RPC starts from.
//! - `watchdog.rs`: the storage watchdog and the wall-clock guard.

mod link;
mod query;
mod record;
mod secure;
mod views;
mod watchdog;

pub use link::{LinkIn, LinkOpen, LinkOut, LinkTerms, SESSION_NONCE_LEN};
pub use secure::{BeginWire, SECURE_NONCE_LEN, SecureIn, SecureOut, SecureTerms};
pub use views::{BudgetView, DatasetView, Description, LedgerView};

use crate::audit::{AuditLog, AuditRecord, Outcome};
use crate::engine::Engine;
use crate::metrics::Metrics;
use crate::store::{LedgerState, Store, StoreError};
use chrono::{DateTime, Utc};
use phm_policies::Policy;
pub use phm_proto::result::Answer;
use phm_proto::{Denial, DenialReason};
use record::refused_record;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use watchdog::{ClockGuard, report_storage_failure, watched_io};

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
    /// Most time one linkage session may take, rounds and computation included.
    pub link_deadline: Duration,
    /// A storage operation (sled write, fsync, audit append) not finished within this
    /// is taken as a failed disk: the node stops. Independent of any query's deadline.
    pub storage_timeout: Duration,
}

/// Label of the budget period `now` falls in: the policy crate's, so the node's
/// budget view and the decision's ledger charges can never disagree.
pub use phm_policies::period_label;

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
    link_deadline: Duration,
    storage_timeout: Duration,
    /// This node's identity and registry, when it takes part in linked questions.
    peer: std::sync::OnceLock<Arc<crate::peer::Peer>>,
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

/// Why a request stopped short of its answer, and so whether that can be audited.
///
/// The privacy path's steps return `Result<_, Stop>`, and `Service::stopped` is the one
/// place a `Stop` becomes what the caller sees. A refusal is written to the audit log
/// first. A storage-down stop is not even attempted: the storage watchdog has fired and
/// the node is stopping, and an audit append goes to the same failing disk, so it would
/// hang (or fail) the same way and record nothing.
#[derive(Debug)]
pub(super) enum Stop {
    /// A refusal the node can still record: audited, then returned.
    Refuse(Denial),
    /// A ledger, release-cache or audit call failed or hung under the storage watchdog:
    /// returned without an audit attempt, since the node is stopping.
    StorageDown(Denial),
}

/// A step's own refusal (policy, freshness, the engine) is an ordinary, audited one;
/// only `Service::io` makes a `StorageDown`. This keeps `?` readable in the steps.
impl From<Denial> for Stop {
    fn from(d: Denial) -> Stop {
        Stop::Refuse(d)
    }
}

impl Stop {
    /// The denial either way, for callers that return it as it is.
    fn into_denial(self) -> Denial {
        match self {
            Stop::Refuse(d) | Stop::StorageDown(d) => d,
        }
    }
}

pub(super) fn internal(msg: impl Into<String>) -> Denial {
    Denial::new(DenialReason::Internal, msg)
}

pub(super) fn outcome_label(d: &Denial) -> String {
    d.reason_name().to_ascii_lowercase()
}

/// An epsilon for people: at most six decimals, no float noise like 0.09999999999999998.
pub(super) fn eps(x: f64) -> String {
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

pub(super) fn ledger_note(s: &LedgerState) -> String {
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
            link_deadline: limits.link_deadline,
            storage_timeout: limits.storage_timeout,
            peer: std::sync::OnceLock::new(),
            fatal: Arc::new(tokio::sync::watch::Sender::new(None)),
        })
    }

    /// Give the service this node's identity and registry (once, at start-up).
    pub fn install_peer(&self, peer: Arc<crate::peer::Peer>) {
        let _ = self.peer.set(peer);
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
        .map_err(|stop| stop.into_denial().message)?
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
    /// it wedged, accepting connections and answering nothing. A watchdog failure is a
    /// `Stop::StorageDown`: the caller must not try to audit it on the same disk.
    async fn io<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, Stop> {
        watched_io(self.fatal.clone(), self.storage_timeout, f)
            .await
            .map_err(Stop::StorageDown)
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
        // Already the last write of the request: a watchdog failure here is returned
        // as it is, like any failure to audit.
        match self
            .io(move || audit.append(&record))
            .await
            .map_err(Stop::into_denial)?
        {
            Ok(_) => Ok(()),
            Err(e) => {
                self.storage_failed(format!("cannot write the audit log: {e}"));
                Err(internal(format!(
                    "the node could not write its audit log ({e}); nothing is released"
                )))
            }
        }
    }

    /// The one place a `Stop` becomes the caller's denial: a refusal is audited, a
    /// storage-down stop is logged and counted but not written (see `Stop`).
    async fn stopped(&self, mut record: AuditRecord, stop: Stop, started: Instant) -> Denial {
        match stop {
            Stop::Refuse(denial) => self.refuse(record, denial, started).await,
            Stop::StorageDown(denial) => self.note_refusal(&mut record, denial, started),
        }
    }

    /// Audit a refusal and return it (with the policy version filled in).
    async fn refuse(&self, mut record: AuditRecord, denial: Denial, started: Instant) -> Denial {
        let denial = self.note_refusal(&mut record, denial, started);
        match self.write_audit(record).await {
            Ok(()) => denial,
            Err(audit_failure) => audit_failure,
        }
    }

    /// Everything a refusal does short of writing it: fill in the policy version and
    /// the record's reasons, log it and count it.
    fn note_refusal(&self, record: &mut AuditRecord, denial: Denial, started: Instant) -> Denial {
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
        denial
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
}

#[cfg(test)]
mod tests {
    use super::query::freshness;
    use super::watchdog::{ClockGuard, clock_drift_check};
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

    /// A one-dataset practice in a temporary folder, served by a `Service`.
    async fn small_service(dir: &std::path::Path) -> Arc<Service> {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]).verifying_key();
        let policy = format!(
            r#"version = 1

[organisation]
ods_code = "A81001"
name = "Test Practice"
kind = "gp_practice"

[release]
min_reportable_count = 7
rounding = "nearest_5"
scope = "standalone"
per_query_epsilon_cap = 1.0
mechanism = "discrete_laplace"
query_validity_seconds = 300

[[datasets]]
name = "gp_patients"
source = {{ format = "csv", path = "gp_patients.csv" }}
person_id = "person_id"
max_rows_per_person = 1

  [[datasets.columns]]
  name = "person_id"
  type = "text"
  identifier = true

  [[datasets.columns]]
  name = "age"
  type = "integer"
  aggregate = true
  bounds = [0, 110]

[[requesters]]
id = "dsu"
organisation = "Test ICB"
role = "analyst"
public_key = "{key}"
purposes = ["planning"]
datasets = ["gp_patients"]
budget = {{ epsilon = 10.0, period = "month", per_query_cap = 1.0 }}
"#,
            key = phm_proto::signing::public_key_to_base64(&key),
        );
        std::fs::write(dir.join("gp_patients.csv"), "person_id,age\np1,40\np2,50\n").expect("csv");
        std::fs::write(dir.join("policy.toml"), policy).expect("policy");
        let loaded = crate::reload::load(&dir.join("policy.toml"), None)
            .await
            .expect("the test policy loads");
        let state = dir.join("state");
        std::fs::create_dir_all(&state).expect("state dir");
        Service::new(
            "ics-test".into(),
            loaded,
            Arc::new(Store::open(&state).expect("store")),
            Arc::new(AuditLog::open(&state).expect("audit log")),
            Arc::new(Metrics::new()),
            ServiceLimits {
                max_concurrent_queries: 4,
                query_deadline: Duration::from_secs(60),
                link_deadline: Duration::from_secs(600),
                storage_timeout: Duration::from_secs(60),
            },
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_refusal_is_audited_but_a_storage_down_stop_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let svc = small_service(dir.path()).await;
        let record = || refused_record(Utc::now(), "query", "dsu", "peer", "v1".into());

        // A step's own refusal converts to an audited stop.
        let refusal = Denial::new(DenialReason::PolicyDenied, "refused by this node's policy");
        assert!(matches!(Stop::from(refusal.clone()), Stop::Refuse(_)));
        let d = svc
            .stopped(record(), Stop::Refuse(refusal), Instant::now())
            .await;
        assert_eq!(d.reason, DenialReason::PolicyDenied);
        assert_eq!(d.policy_version, "v1");
        assert_eq!(svc.audit_log().entries(), 1, "a refusal is audited");

        // A storage call that fails under the watchdog is a storage-down stop...
        let stop = svc
            .io(|| -> () { panic!("the disk is gone") })
            .await
            .expect_err("a panicking storage call fails");
        let Stop::StorageDown(down) = stop else {
            panic!("a watchdog failure must be a storage-down stop, not {stop:?}");
        };
        assert_eq!(down.reason, DenialReason::Unavailable);
        assert!(svc.storage_failure().borrow().is_some(), "the node stops");

        // ...which is returned as it is, without an audit attempt.
        let d = svc
            .stopped(record(), Stop::StorageDown(down.clone()), Instant::now())
            .await;
        assert_eq!(d.message, down.message);
        assert_eq!(
            svc.audit_log().entries(),
            1,
            "a storage-down stop is not audited"
        );
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
