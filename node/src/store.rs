//! The node's durable state in sled: the privacy-budget ledger (the only code that
//! spends budget), the release cache keyed by query id, and the seen-nonce store.
//! Every spend and every cached release is fsynced before the caller may release an
//! answer, so a crash can waste budget but never under-count it.

use phm_policies::LedgerCharge;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

/// Slack allowed when comparing a floating-point spend against a ledger total, so
/// that e.g. three spends of 0.1 fit a total of 0.3. Far below any meaningful epsilon.
pub const SPEND_TOLERANCE: f64 = 1e-9;

const LEDGER_TREE: &str = "ledger";
const RELEASE_TREE: &str = "releases";
const NONCE_TREE: &str = "nonces";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the node database (budget ledger) in {path}: {source}")]
    Open { path: PathBuf, source: sled::Error },
    #[error(
        "cannot open the node database (budget ledger) in {path}: the database is damaged ({message})"
    )]
    Damaged { path: PathBuf, message: String },
    #[error("node database error while {during}: {source}")]
    Db {
        during: &'static str,
        source: sled::Error,
    },
    #[error("corrupt {what} under key {key:?} in the node database: {reason}")]
    Corrupt {
        what: &'static str,
        key: String,
        reason: String,
    },
    #[error(
        "budget exhausted on ledger {ledger} for {period_label}: {remaining} of {total} epsilon left, this query asks for {requested}"
    )]
    BudgetExhausted {
        ledger: String,
        period_label: String,
        total: f64,
        spent: f64,
        remaining: f64,
        requested: f64,
    },
    #[error("cannot spend epsilon {0}: it must be a positive finite number")]
    InvalidSpend(f64),
    #[error("no budget ledger to charge: refusing to spend untracked budget")]
    NoLedger,
    #[error("nonce already used by requester {requester}")]
    Replayed { requester: String },
    #[error("cannot serialise {what}: {reason}")]
    Encode { what: &'static str, reason: String },
}

impl StoreError {
    /// True when the database itself failed (IO error, damage), as opposed to a
    /// refusal (budget, replay) or a caller mistake. The node cannot keep its
    /// spend-before-release promise after such a failure.
    pub fn is_storage_failure(&self) -> bool {
        matches!(
            self,
            StoreError::Open { .. }
                | StoreError::Damaged { .. }
                | StoreError::Db { .. }
                | StoreError::Corrupt { .. }
                | StoreError::Encode { .. }
        )
    }
}

fn db_err(during: &'static str) -> impl FnOnce(sled::Error) -> StoreError {
    move |source| StoreError::Db { during, source }
}

/// One ledger's state for the current period.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerState {
    pub ledger: String,
    pub period_label: String,
    pub total: f64,
    pub spent: f64,
}

impl LedgerState {
    pub fn remaining(&self) -> f64 {
        (self.total - self.spent).max(0.0)
    }
}

/// What the release cache holds for a query id.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheLookup<T> {
    Miss,
    /// The same question (same digest) was answered before: here is that answer.
    Hit(T),
    /// The id was used before for a different question.
    Conflict {
        cached_digest: String,
    },
}

#[derive(Serialize, serde::Deserialize)]
struct CachedEntry<T> {
    digest: String,
    answer: T,
}

/// Held while a query id is being answered, so two concurrent identical queries
/// never both spend: the second waits, then finds the first one's cached release.
pub type QueryIdGuard = tokio::sync::OwnedMutexGuard<()>;

pub struct Store {
    path: PathBuf,
    db: sled::Db,
    ledger: sled::Tree,
    releases: sled::Tree,
    nonces: sled::Tree,
    // sled transactions are optimistic and retried on conflict; serialising spends
    // in-process as well makes "never overspend" independent of that machinery (the
    // transaction still gives all-or-nothing across the ledgers on a crash).
    spend_lock: Mutex<()>,
    in_flight: Mutex<HashMap<String, Weak<tokio::sync::Mutex<()>>>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

fn f64_from(what: &'static str, key: &[u8], v: &[u8]) -> Result<f64, StoreError> {
    let arr: [u8; 8] = v.try_into().map_err(|_| StoreError::Corrupt {
        what,
        key: String::from_utf8_lossy(key).into_owned(),
        reason: format!("{} bytes, expected 8", v.len()),
    })?;
    let x = f64::from_be_bytes(arr);
    if !x.is_finite() || x < 0.0 {
        return Err(StoreError::Corrupt {
            what,
            key: String::from_utf8_lossy(key).into_owned(),
            reason: format!("value {x} is not a non-negative number"),
        });
    }
    Ok(x)
}

fn nonce_key(scope: &str, requester: &str, nonce: &[u8]) -> Vec<u8> {
    // Ids cannot contain NUL (validated on receipt), so the key is unambiguous.
    let mut k = Vec::with_capacity(scope.len() + requester.len() + nonce.len() + 2);
    k.extend_from_slice(scope.as_bytes());
    k.push(0);
    k.extend_from_slice(requester.as_bytes());
    k.push(0);
    k.extend_from_slice(nonce);
    k
}

impl Store {
    /// Open (or create) the database in `data_dir/ledger.sled`.
    pub fn open(data_dir: &Path) -> Result<Store, StoreError> {
        let path = data_dir.join("ledger.sled");
        // sled can panic instead of returning an error on some damaged files; the
        // operator must still be told which database is damaged.
        match std::panic::catch_unwind(|| Self::open_at(path.clone())) {
            Ok(r) => r,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "the database library panicked".into());
                Err(StoreError::Damaged { path, message })
            }
        }
    }

    fn open_at(path: PathBuf) -> Result<Store, StoreError> {
        let db = sled::Config::new()
            .path(&path)
            .open()
            .map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })?;
        let tree = |name: &str| {
            db.open_tree(name).map_err(|source| StoreError::Open {
                path: path.clone(),
                source,
            })
        };
        Ok(Store {
            ledger: tree(LEDGER_TREE)?,
            releases: tree(RELEASE_TREE)?,
            nonces: tree(NONCE_TREE)?,
            db,
            path,
            spend_lock: Mutex::new(()),
            in_flight: Mutex::new(HashMap::new()),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Write everything to disk (fsync).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.db
            .flush()
            .map(|_| ())
            .map_err(db_err("flushing to disk"))
    }

    /// Epsilon spent so far under a ledger key (`LedgerCharge::key()`).
    pub fn spent(&self, key: &str) -> Result<f64, StoreError> {
        match self
            .ledger
            .get(key.as_bytes())
            .map_err(db_err("reading the ledger"))?
        {
            None => Ok(0.0),
            Some(v) => f64_from("ledger entry", key.as_bytes(), &v),
        }
    }

    /// Debit `epsilon` from every ledger in `charges`, all or nothing, then fsync.
    /// Refuses (spending nothing) if any ledger would go over its total. Returns the
    /// state of each ledger after the spend.
    pub fn check_and_spend(
        &self,
        charges: &[LedgerCharge],
        epsilon: f64,
    ) -> Result<Vec<LedgerState>, StoreError> {
        if !epsilon.is_finite() || epsilon <= 0.0 {
            return Err(StoreError::InvalidSpend(epsilon));
        }
        if charges.is_empty() {
            return Err(StoreError::NoLedger);
        }
        // A ledger named twice is charged once, against its strictest total.
        let mut unique: Vec<(String, &LedgerCharge, f64)> = Vec::new();
        for c in charges {
            let key = c.key();
            match unique.iter_mut().find(|(k, _, _)| *k == key) {
                Some(entry) => entry.2 = entry.2.min(c.total),
                None => unique.push((key, c, c.total)),
            }
        }
        let states = {
            let _serial = self
                .spend_lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            self.ledger
                .transaction(|tx| {
                    use sled::transaction::ConflictableTransactionError as Tx;
                    let mut states = Vec::with_capacity(unique.len());
                    for (key, charge, total) in &unique {
                        let spent = match tx.get(key.as_bytes())? {
                            None => 0.0,
                            Some(v) => {
                                f64_from("ledger entry", key.as_bytes(), &v).map_err(Tx::Abort)?
                            }
                        };
                        if !total.is_finite() || spent + epsilon > total + SPEND_TOLERANCE {
                            return Err(Tx::Abort(StoreError::BudgetExhausted {
                                ledger: charge.ledger.clone(),
                                period_label: charge.period_label.clone(),
                                total: *total,
                                spent,
                                remaining: (total - spent).max(0.0),
                                requested: epsilon,
                            }));
                        }
                        states.push(LedgerState {
                            ledger: charge.ledger.clone(),
                            period_label: charge.period_label.clone(),
                            total: *total,
                            spent: spent + epsilon,
                        });
                    }
                    for ((key, _, _), state) in unique.iter().zip(&states) {
                        tx.insert(key.as_bytes(), &state.spent.to_be_bytes())?;
                    }
                    Ok(states)
                })
                .map_err(|e| match e {
                    sled::transaction::TransactionError::Abort(e) => e,
                    sled::transaction::TransactionError::Storage(source) => StoreError::Db {
                        during: "spending budget",
                        source,
                    },
                })?
        };
        // Durable before the caller may release anything. Any flush that starts after
        // the commit above persists it, so flushing outside the lock is safe.
        self.flush()?;
        Ok(states)
    }

    /// Raise every ledger to at least what the audit log records as spent, then
    /// fsync. A ledger below its audited spend can only mean the database lost
    /// writes (damage, or a restore from an old copy): never under-count. Returns
    /// (key, held, raised to) for each ledger corrected.
    pub fn reconcile(
        &self,
        audited: &std::collections::BTreeMap<String, f64>,
    ) -> Result<Vec<(String, f64, f64)>, StoreError> {
        let _serial = self
            .spend_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut fixed = Vec::new();
        for (key, &audited) in audited {
            let held = self.spent(key)?;
            if held + SPEND_TOLERANCE < audited {
                self.ledger
                    .insert(key.as_bytes(), &audited.to_be_bytes())
                    .map_err(db_err("correcting the ledger"))?;
                fixed.push((key.clone(), held, audited));
            }
        }
        if !fixed.is_empty() {
            self.flush()?;
        }
        Ok(fixed)
    }

    /// Take the per-query-id lock; hold the guard until the answer is cached.
    pub async fn lock_query_id(&self, query_id: &str) -> QueryIdGuard {
        let mutex = {
            let mut map = self
                .in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match map.get(query_id).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    if map.len() > 1024 {
                        map.retain(|_, w| w.strong_count() > 0);
                    }
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(query_id.to_string(), Arc::downgrade(&m));
                    m
                }
            }
        };
        mutex.lock_owned().await
    }

    /// Look a query id up in the release cache.
    pub fn cached_release<T: DeserializeOwned>(
        &self,
        query_id: &str,
        digest: &str,
    ) -> Result<CacheLookup<T>, StoreError> {
        let Some(bytes) = self
            .releases
            .get(query_id.as_bytes())
            .map_err(db_err("reading the release cache"))?
        else {
            return Ok(CacheLookup::Miss);
        };
        let entry: CachedEntry<T> =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                what: "cached release",
                key: query_id.to_string(),
                reason: e.to_string(),
            })?;
        if entry.digest == digest {
            Ok(CacheLookup::Hit(entry.answer))
        } else {
            Ok(CacheLookup::Conflict {
                cached_digest: entry.digest,
            })
        }
    }

    /// Cache the answer released for `query_id`, then fsync. Returns the answer as
    /// decoded from the stored bytes: release exactly that, so the first answer and
    /// every repeat served from the cache are bit-for-bit the same (a text round trip
    /// of a float is not guaranteed to be exact, but decoding the same bytes is).
    pub fn store_release<T: Serialize + DeserializeOwned>(
        &self,
        query_id: &str,
        digest: &str,
        answer: &T,
    ) -> Result<T, StoreError> {
        let bytes = serde_json::to_vec(&CachedEntry {
            digest: digest.to_string(),
            answer,
        })
        .map_err(|e| StoreError::Encode {
            what: "release",
            reason: e.to_string(),
        })?;
        let stored: CachedEntry<T> =
            serde_json::from_slice(&bytes).map_err(|e| StoreError::Encode {
                what: "release",
                reason: e.to_string(),
            })?;
        self.releases
            .insert(query_id.as_bytes(), bytes)
            .map_err(db_err("writing the release cache"))?;
        self.flush()?;
        Ok(stored.answer)
    }

    /// Record that `requester` used `nonce` (in `scope`, e.g. "query" or "describe")
    /// for a message issued at `issued_at_unix_ms`; refuses a nonce seen before.
    pub fn record_nonce(
        &self,
        scope: &str,
        requester: &str,
        nonce: &[u8],
        issued_at_unix_ms: i64,
    ) -> Result<(), StoreError> {
        let key = nonce_key(scope, requester, nonce);
        match self
            .nonces
            .compare_and_swap(
                key,
                None as Option<&[u8]>,
                Some(&issued_at_unix_ms.to_be_bytes()[..]),
            )
            .map_err(db_err("recording a nonce"))?
        {
            Ok(()) => Ok(()),
            Err(_) => Err(StoreError::Replayed {
                requester: requester.to_string(),
            }),
        }
    }

    /// Forget nonces of messages issued before `cutoff_unix_ms`. Safe once such
    /// messages are refused as stale anyway. Returns how many were removed.
    pub fn prune_nonces(&self, cutoff_unix_ms: i64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for item in self.nonces.iter() {
            let (k, v) = item.map_err(db_err("scanning nonces"))?;
            let issued = <[u8; 8]>::try_from(&v[..])
                .map(i64::from_be_bytes)
                // An unreadable entry is useless for replay protection; drop it.
                .unwrap_or(i64::MIN);
            if issued < cutoff_unix_ms {
                self.nonces.remove(k).map_err(db_err("pruning nonces"))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Number of nonces currently remembered.
    pub fn nonce_count(&self) -> usize {
        self.nonces.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use phm_policies::model::Period;

    fn charge(ledger: &str, total: f64) -> LedgerCharge {
        LedgerCharge {
            ledger: ledger.into(),
            period: Period::Month,
            period_label: "2026-11".into(),
            total,
            per_query_cap: 1.0,
        }
    }

    #[test]
    fn multi_ledger_spend_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let req = charge("requester:dsu", 10.0);
        let proj = charge("project:p1", 1.0);
        let states = store
            .check_and_spend(&[req.clone(), proj.clone()], 0.75)
            .unwrap();
        assert_eq!(states.len(), 2);
        assert_eq!(states[1].remaining(), 0.25);
        // The project ledger cannot take 0.5 more: nothing is spent anywhere.
        let err = store
            .check_and_spend(&[req.clone(), proj.clone()], 0.5)
            .unwrap_err();
        match err {
            StoreError::BudgetExhausted {
                ledger, remaining, ..
            } => {
                assert_eq!(ledger, "project:p1");
                assert!((remaining - 0.25).abs() < 1e-12);
            }
            other => panic!("unexpected {other}"),
        }
        assert_eq!(store.spent(&req.key()).unwrap(), 0.75);
        assert_eq!(store.spent(&proj.key()).unwrap(), 0.75);
        // The message names the ledger and what is left.
        let msg = store
            .check_and_spend(&[req, proj], 0.5)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("project:p1") && msg.contains("0.25"), "{msg}");
    }

    #[test]
    fn small_spends_fill_a_total_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = charge("requester:a", 0.3);
        for _ in 0..3 {
            store
                .check_and_spend(std::slice::from_ref(&c), 0.1)
                .unwrap();
        }
        assert!(matches!(
            store.check_and_spend(&[c], 0.1),
            Err(StoreError::BudgetExhausted { .. })
        ));
    }

    #[test]
    fn reconcile_never_lowers_and_raises_lost_spend() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = charge("requester:a", 5.0);
        store
            .check_and_spend(std::slice::from_ref(&c), 2.0)
            .unwrap();
        let audited = [(c.key(), 1.5), ("project:p/2026-11".to_string(), 0.7)]
            .into_iter()
            .collect();
        let fixed = store.reconcile(&audited).unwrap();
        assert_eq!(fixed, vec![("project:p/2026-11".to_string(), 0.0, 0.7)]);
        assert_eq!(store.spent(&c.key()).unwrap(), 2.0, "never lowered");
        assert_eq!(store.spent("project:p/2026-11").unwrap(), 0.7);
    }

    #[test]
    fn invalid_spends_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = charge("requester:a", 1.0);
        for eps in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                store.check_and_spend(std::slice::from_ref(&c), eps),
                Err(StoreError::InvalidSpend(_))
            ));
        }
        assert!(matches!(
            store.check_and_spend(&[], 0.1),
            Err(StoreError::NoLedger)
        ));
    }

    #[test]
    fn spend_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = charge("requester:a", 5.0);
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .check_and_spend(std::slice::from_ref(&c), 1.5)
                .unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.spent(&c.key()).unwrap(), 1.5);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_spends_never_overspend() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(dir.path()).unwrap());
        // 250 spends of 0.1 against totals of 7.0 and 5.0: exactly 50 fit.
        let charges = vec![charge("requester:a", 7.0), charge("project:p", 5.0)];
        let mut tasks = Vec::new();
        for _ in 0..250 {
            let store = store.clone();
            let charges = charges.clone();
            tasks.push(tokio::task::spawn_blocking(move || {
                store.check_and_spend(&charges, 0.1)
            }));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(StoreError::BudgetExhausted { .. }) => {}
                Err(e) => panic!("unexpected {e}"),
            }
        }
        assert_eq!(ok, 50);
        let spent = store.spent(&charges[1].key()).unwrap();
        assert!(spent <= 5.0 + SPEND_TOLERANCE, "{spent}");
        assert!((spent - 5.0).abs() < 1e-9, "{spent}");
        assert!((store.spent(&charges[0].key()).unwrap() - 5.0).abs() < 1e-9);
    }

    #[test]
    fn release_cache_hits_same_digest_and_flags_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(
            store.cached_release::<Vec<f64>>("q1", "d1").unwrap(),
            CacheLookup::Miss
        );
        let released = store.store_release("q1", "d1", &vec![1.5, 2.5]).unwrap();
        assert_eq!(released, vec![1.5, 2.5]);
        assert_eq!(
            store.cached_release::<Vec<f64>>("q1", "d1").unwrap(),
            CacheLookup::Hit(vec![1.5, 2.5])
        );
        assert_eq!(
            store.cached_release::<Vec<f64>>("q1", "d2").unwrap(),
            CacheLookup::Conflict {
                cached_digest: "d1".into()
            }
        );
    }

    #[test]
    fn nonces_are_single_use_and_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.record_nonce("query", "dsu", &[7; 16], 1_000).unwrap();
        assert!(matches!(
            store.record_nonce("query", "dsu", &[7; 16], 1_000),
            Err(StoreError::Replayed { .. })
        ));
        // Another requester or another operation may use the same bytes.
        store
            .record_nonce("query", "other", &[7; 16], 1_000)
            .unwrap();
        store
            .record_nonce("describe", "dsu", &[7; 16], 1_000)
            .unwrap();
        store.record_nonce("query", "dsu", &[8; 16], 5_000).unwrap();
        assert_eq!(store.prune_nonces(2_000).unwrap(), 3);
        assert_eq!(store.nonce_count(), 1);
        assert!(store.record_nonce("query", "dsu", &[8; 16], 5_000).is_err());
    }

    #[tokio::test]
    async fn query_id_lock_serialises_the_same_id_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let g1 = store.lock_query_id("q").await;
        // A different id is not blocked.
        let _g2 = store.lock_query_id("other").await;
        let blocked = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            store.lock_query_id("q"),
        )
        .await;
        assert!(blocked.is_err());
        drop(g1);
        let _g3 = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            store.lock_query_id("q"),
        )
        .await
        .unwrap();
    }
}
