//! The node's durable state in sled: the privacy-budget ledger (the only code that
//! spends budget), the release cache keyed by query id, and the seen-nonce store.
//! Every spend and every cached release is fsynced before the caller may release an
//! answer, so a crash can waste budget but never under-count it.

use phm_policies::{LedgerCharge, Spend};
pub use phm_proto::QueryKey;
use phm_proto::result::Answer;
use prost::Message;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

/// Slack allowed when comparing a floating-point spend against a ledger total, so
/// that e.g. three spends of 0.1 fit a total of 0.3. Far below any meaningful epsilon.
pub const SPEND_TOLERANCE: f64 = 1e-9;

/// Relative slack for delta sums (deltas are tiny, so an absolute slack would not do).
const DELTA_RELATIVE_TOLERANCE: f64 = 1e-9;

const LEDGER_TREE: &str = "ledger";
const RELEASE_TREE: &str = "releases";
const NONCE_TREE: &str = "nonces";
const LINK_TREE: &str = "link_sessions";
const SECAGG_TREE: &str = "secagg_sessions";

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
        "budget exhausted on ledger {ledger} for {period_label}: {remaining} of {total} {measure} left, this query asks for {requested}"
    )]
    BudgetExhausted {
        ledger: String,
        period_label: String,
        /// "epsilon" or "delta": which budget ran out.
        measure: &'static str,
        total: f64,
        spent: f64,
        remaining: f64,
        requested: f64,
    },
    #[error(
        "cannot spend epsilon {}, delta {}, rho {}: each must be a finite number, not negative, and epsilon or rho above 0",
        .0.epsilon, .0.delta, .0.rho
    )]
    InvalidSpend(Spend),
    #[error("no budget ledger to charge: refusing to spend untracked budget")]
    NoLedger,
    #[error("nonce already used by requester {requester}")]
    Replayed { requester: String },
    #[error("this node already joined a linkage session for query {query_id} with anchor {anchor}")]
    SecondSession { query_id: String, anchor: String },
    #[error(
        "this node already joined secure-aggregation session {prior_session} for query {query_id}"
    )]
    SecondSecureSession {
        query_id: String,
        prior_session: String,
    },
    #[error("the secure-aggregation record for query {query_id} is not the one expected")]
    SecureRecordMismatch { query_id: String },
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
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LedgerState {
    pub ledger: String,
    pub period_label: String,
    /// Epsilon per period.
    pub total: f64,
    /// Epsilon spent: pure epsilon plus the conversion of the composed rho.
    pub spent: f64,
    /// Delta per period.
    pub delta_total: f64,
    /// Delta spent: thresholding deltas plus the conversion delta once rho > 0.
    pub delta_spent: f64,
    /// The running sums behind `spent` and `delta_spent`.
    pub sums: Spend,
}

impl LedgerState {
    pub fn remaining(&self) -> f64 {
        (self.total - self.spent).max(0.0)
    }

    pub fn delta_remaining(&self) -> f64 {
        (self.delta_total - self.delta_spent).max(0.0)
    }

    /// The state of a ledger holding `sums`, read against its totals.
    pub fn of(charge: &LedgerCharge, total: f64, sums: Spend, delta_conv: f64) -> LedgerState {
        let (spent, delta_spent) = sums.effective(delta_conv);
        LedgerState {
            ledger: charge.ledger.clone(),
            period_label: charge.period_label.clone(),
            total,
            spent,
            delta_total: charge.delta_total,
            delta_spent,
            sums,
        }
    }
}

/// What the release cache holds for a query id.
#[derive(Debug, Clone, PartialEq)]
pub enum CacheLookup<T> {
    Miss,
    /// The same signed message (same digest) was answered before: here is that answer.
    Hit(T),
    /// The same question, re-signed with a new nonce and time (a retry by the
    /// requester): the answer released for it before.
    Retry(T),
    /// The id was used before for a different question.
    Conflict {
        cached_digest: String,
    },
    /// This question was charged before but its release failed (a warehouse that was
    /// down, say): it is answered now under that charge, with no new spend.
    /// `same_message` when it is the very signed message charged (a relay's retry);
    /// `policy_version` is the policy the charge was decided under.
    Charged {
        same_message: bool,
        policy_version: String,
    },
}

/// A release cache entry: the answer in its wire form, as the coordinator's history
/// stores its results, so what is cached is exactly what was sent and decoding it
/// re-applies the answer checks.
#[derive(Clone, PartialEq, prost::Message)]
struct CachedEntry {
    #[prost(string, tag = "1")]
    digest: String,
    /// The question without id, time and nonce.
    #[prost(string, tag = "2")]
    content_digest: String,
    #[prost(message, optional, tag = "3")]
    answer: Option<phm_proto::proto::AggregateResult>,
    /// For a charge whose release failed (no `answer`): the policy version the charge
    /// was decided under. A retry is answered under the charge only while that policy
    /// is in force, since another policy may plan a different spend.
    #[prost(string, tag = "4")]
    charged_policy_version: String,
}

fn decode_entry(bytes: &[u8], query_id: &str) -> Result<(CachedEntry, Answer), StoreError> {
    match decode_entry_or_charge(bytes, query_id)? {
        (entry, Some(answer)) => Ok((entry, answer)),
        (_, None) => Err(StoreError::Corrupt {
            what: "cached release",
            key: query_id.to_string(),
            reason: "the entry holds no answer".into(),
        }),
    }
}

/// A cache entry, and its answer unless it records a charge whose release failed.
fn decode_entry_or_charge(
    bytes: &[u8],
    query_id: &str,
) -> Result<(CachedEntry, Option<Answer>), StoreError> {
    let corrupt = |reason: String| StoreError::Corrupt {
        what: "cached release",
        key: query_id.to_string(),
        reason,
    };
    let mut entry = CachedEntry::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    let answer = match entry.answer.take() {
        Some(wire) => Some(Answer::try_from(wire).map_err(|e| corrupt(e.to_string()))?),
        None if entry.content_digest.is_empty() => {
            return Err(corrupt("the entry holds no answer".into()));
        }
        None => None,
    };
    Ok((entry, answer))
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
    /// (requester, query id, anchor) of every linkage session this node joined as a
    /// partner: never forgotten, so a second session (fresh noise to average) is refused.
    link_sessions: sled::Tree,
    /// (requester, query id) → the secure-aggregation session this node joined for it
    /// and how far it went (`phm_secagg::Participation`): never forgotten, so a second
    /// session for one query (a total to difference with the first) is refused.
    secagg_sessions: sled::Tree,
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

/// A ledger entry: (pure epsilon, delta, rho), 24 bytes. An 8-byte entry is a ledger
/// written before delta and rho were tracked: pure epsilon only.
fn spend_from(key: &[u8], v: &[u8]) -> Result<Spend, StoreError> {
    let part = |i: usize| f64_from("ledger entry", key, &v[i * 8..i * 8 + 8]);
    match v.len() {
        8 => Ok(Spend {
            epsilon: part(0)?,
            ..Spend::ZERO
        }),
        24 => Ok(Spend {
            epsilon: part(0)?,
            delta: part(1)?,
            rho: part(2)?,
        }),
        n => Err(StoreError::Corrupt {
            what: "ledger entry",
            key: String::from_utf8_lossy(key).into_owned(),
            reason: format!("{n} bytes, expected 24"),
        }),
    }
}

fn spend_bytes(s: Spend) -> [u8; 24] {
    let mut out = [0u8; 24];
    out[..8].copy_from_slice(&s.epsilon.to_be_bytes());
    out[8..16].copy_from_slice(&s.delta.to_be_bytes());
    out[16..].copy_from_slice(&s.rho.to_be_bytes());
    out
}

fn component_max(a: Spend, b: Spend) -> Spend {
    Spend {
        epsilon: a.epsilon.max(b.epsilon),
        delta: a.delta.max(b.delta),
        rho: a.rho.max(b.rho),
    }
}

/// Refuse a spend that takes a ledger over its epsilon or its delta total.
fn check_totals(
    charge: &LedgerCharge,
    before: &LedgerState,
    after: &LedgerState,
) -> Result<(), StoreError> {
    let exhausted = |measure, total: f64, spent: f64, after: f64| StoreError::BudgetExhausted {
        ledger: charge.ledger.clone(),
        period_label: charge.period_label.clone(),
        measure,
        total,
        spent,
        remaining: (total - spent).max(0.0),
        requested: after - spent,
    };
    if !after.total.is_finite() || after.spent > after.total + SPEND_TOLERANCE {
        return Err(exhausted("epsilon", after.total, before.spent, after.spent));
    }
    let delta_slack = after.delta_total * DELTA_RELATIVE_TOLERANCE;
    if !after.delta_total.is_finite() || after.delta_spent > after.delta_total + delta_slack {
        return Err(exhausted(
            "delta",
            after.delta_total,
            before.delta_spent,
            after.delta_spent,
        ));
    }
    Ok(())
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
            link_sessions: tree(LINK_TREE)?,
            secagg_sessions: tree(SECAGG_TREE)?,
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

    /// The running sums (pure epsilon, delta, rho) under a ledger key
    /// (`LedgerCharge::key()`).
    pub fn spent(&self, key: &str) -> Result<Spend, StoreError> {
        match self
            .ledger
            .get(key.as_bytes())
            .map_err(db_err("reading the ledger"))?
        {
            None => Ok(Spend::ZERO),
            Some(v) => spend_from(key.as_bytes(), &v),
        }
    }

    /// What a ledger holds for a period: its own entry plus every entry of the same
    /// ledger under another period label that overlaps it (a policy that changed
    /// from monthly to quarterly periods still counts the months already spent).
    pub fn held(&self, ledger: &str, period_label: &str) -> Result<Spend, StoreError> {
        let own = self.spent(&format!("{ledger}/{period_label}"))?;
        Ok(own.plus(self.carried(ledger, period_label)?))
    }

    /// The overlapping other-period entries of `ledger` (see [`Store::held`]).
    fn carried(&self, ledger: &str, period_label: &str) -> Result<Spend, StoreError> {
        let prefix = format!("{ledger}/");
        let mut sum = Spend::ZERO;
        for item in self.ledger.scan_prefix(prefix.as_bytes()) {
            let (k, v) = item.map_err(db_err("reading the ledger"))?;
            let label = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            if label != period_label && phm_policies::periods_overlap(&label, period_label) {
                sum = sum.plus(spend_from(&k, &v)?);
            }
        }
        Ok(sum)
    }

    /// Debit `spend` from every ledger in `charges`, all or nothing, then fsync.
    /// Refuses (spending nothing) if any ledger would go over its epsilon or its delta
    /// total, with Gaussian rho composed on the ledger and converted once at
    /// `delta_conv`. Returns the state of each ledger after the spend.
    pub fn check_and_spend(
        &self,
        charges: &[LedgerCharge],
        spend: Spend,
        delta_conv: f64,
    ) -> Result<Vec<LedgerState>, StoreError> {
        if !spend.is_valid() || spend.epsilon + spend.rho <= 0.0 {
            return Err(StoreError::InvalidSpend(spend));
        }
        if spend.rho > 0.0 && !(delta_conv > 0.0 && delta_conv < 1.0) {
            return Err(StoreError::InvalidSpend(spend));
        }
        if charges.is_empty() {
            return Err(StoreError::NoLedger);
        }
        // A ledger named twice is charged once, against its strictest totals.
        let mut unique: Vec<(String, LedgerCharge)> = Vec::new();
        for c in charges {
            let key = c.key();
            match unique.iter_mut().find(|(k, _)| *k == key) {
                Some((_, held)) => {
                    held.total = held.total.min(c.total);
                    held.delta_total = held.delta_total.min(c.delta_total);
                }
                None => unique.push((key, c.clone())),
            }
        }
        let states = {
            let _serial = self
                .spend_lock
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Other periods' entries only change under this same lock, so reading
            // them outside the transaction is consistent with it.
            let carried = unique
                .iter()
                .map(|(_, c)| self.carried(&c.ledger, &c.period_label))
                .collect::<Result<Vec<_>, _>>()?;
            self.ledger
                .transaction(|tx| {
                    use sled::transaction::ConflictableTransactionError as Tx;
                    let mut states = Vec::with_capacity(unique.len());
                    let mut writes = Vec::with_capacity(unique.len());
                    for ((key, charge), carried) in unique.iter().zip(&carried) {
                        let own = match tx.get(key.as_bytes())? {
                            None => Spend::ZERO,
                            Some(v) => spend_from(key.as_bytes(), &v).map_err(Tx::Abort)?,
                        };
                        let held = own.plus(*carried);
                        let before = LedgerState::of(charge, charge.total, held, delta_conv);
                        let after =
                            LedgerState::of(charge, charge.total, held.plus(spend), delta_conv);
                        check_totals(charge, &before, &after).map_err(Tx::Abort)?;
                        states.push(after);
                        writes.push(own.plus(spend));
                    }
                    for ((key, _), own) in unique.iter().zip(&writes) {
                        tx.insert(key.as_bytes(), &spend_bytes(*own))?;
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

    /// Raise every ledger to at least what the audit log records as spent, component
    /// by component, then fsync. A ledger below its audited spend can only mean the
    /// database lost writes (damage, or a restore from an old copy): never
    /// under-count. Returns (key, held, raised to) for each ledger corrected.
    pub fn reconcile(
        &self,
        audited: &std::collections::BTreeMap<String, Spend>,
    ) -> Result<Vec<(String, Spend, Spend)>, StoreError> {
        let _serial = self
            .spend_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut fixed = Vec::new();
        for (key, &audited) in audited {
            let held = self.spent(key)?;
            let raised = component_max(held, audited);
            let below = |h: f64, a: f64, tol: f64| h + tol < a;
            if below(held.epsilon, audited.epsilon, SPEND_TOLERANCE)
                || below(held.rho, audited.rho, SPEND_TOLERANCE)
                || below(
                    held.delta,
                    audited.delta,
                    audited.delta * DELTA_RELATIVE_TOLERANCE,
                )
            {
                self.ledger
                    .insert(key.as_bytes(), &spend_bytes(raised))
                    .map_err(db_err("correcting the ledger"))?;
                fixed.push((key.clone(), held, raised));
            }
        }
        if !fixed.is_empty() {
            self.flush()?;
        }
        Ok(fixed)
    }

    /// Take the lock on (requester, query id); hold the guard until the answer is
    /// cached.
    pub async fn lock_query_id(&self, id: &QueryKey<'_>) -> QueryIdGuard {
        let key = String::from_utf8_lossy(&id.key_bytes()).into_owned();
        let mutex = {
            let mut map = self
                .in_flight
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            match map.get(&key).and_then(Weak::upgrade) {
                Some(m) => m,
                None => {
                    if map.len() > 1024 {
                        map.retain(|_, w| w.strong_count() > 0);
                    }
                    let m = Arc::new(tokio::sync::Mutex::new(()));
                    map.insert(key, Arc::downgrade(&m));
                    m
                }
            }
        };
        mutex.lock_owned().await
    }

    /// Look a (requester, query id) up in the release cache. The same signed message
    /// is an exact hit; the same question re-signed (new nonce and time) is a retry;
    /// anything else under that id is a conflict.
    pub fn cached_release(
        &self,
        id: &QueryKey<'_>,
        digest: &str,
        content_digest: &str,
    ) -> Result<CacheLookup<Answer>, StoreError> {
        let Some(bytes) = self
            .releases
            .get(id.key_bytes())
            .map_err(db_err("reading the release cache"))?
        else {
            return Ok(CacheLookup::Miss);
        };
        let (entry, answer) = decode_entry_or_charge(&bytes, id.query_id)?;
        let Some(answer) = answer else {
            return Ok(if entry.content_digest == content_digest {
                CacheLookup::Charged {
                    same_message: entry.digest == digest,
                    policy_version: entry.charged_policy_version,
                }
            } else {
                CacheLookup::Conflict {
                    cached_digest: entry.digest,
                }
            });
        };
        if entry.digest == digest {
            Ok(CacheLookup::Hit(answer))
        } else if !entry.content_digest.is_empty() && entry.content_digest == content_digest {
            Ok(CacheLookup::Retry(answer))
        } else {
            Ok(CacheLookup::Conflict {
                cached_digest: entry.digest,
            })
        }
    }

    /// Cache the answer released for (requester, query id), then fsync. Returns the
    /// answer as decoded from the stored bytes: release exactly that, so the first
    /// answer and every repeat served from the cache are bit-for-bit the same, and an
    /// answer that would not pass the coordinator's checks is never released.
    pub fn store_release(
        &self,
        id: &QueryKey<'_>,
        digest: &str,
        content_digest: &str,
        answer: Answer,
    ) -> Result<Answer, StoreError> {
        let bytes = CachedEntry {
            digest: digest.to_string(),
            content_digest: content_digest.to_string(),
            answer: Some(answer.into()),
            charged_policy_version: String::new(),
        }
        .encode_to_vec();
        let (_, stored) = decode_entry(&bytes, id.query_id).map_err(|e| StoreError::Encode {
            what: "release",
            reason: e.to_string(),
        })?;
        self.releases
            .insert(id.key_bytes(), bytes)
            .map_err(db_err("writing the release cache"))?;
        self.flush()?;
        Ok(stored)
    }

    /// Record that (requester, query id) was charged for this question but nothing was
    /// released (its execution failed), then fsync: a retry of the same question is
    /// answered under that charge instead of a second one. `store_release` replaces
    /// the record with the answer.
    pub fn store_charge(
        &self,
        id: &QueryKey<'_>,
        digest: &str,
        content_digest: &str,
        policy_version: &str,
    ) -> Result<(), StoreError> {
        let bytes = CachedEntry {
            digest: digest.to_string(),
            content_digest: content_digest.to_string(),
            answer: None,
            charged_policy_version: policy_version.to_string(),
        }
        .encode_to_vec();
        self.releases
            .insert(id.key_bytes(), bytes)
            .map_err(db_err("writing the release cache"))?;
        self.flush()
    }

    /// The state of each ledger in `charges` as it stands, without spending.
    pub fn ledger_states(
        &self,
        charges: &[LedgerCharge],
        delta_conv: f64,
    ) -> Result<Vec<LedgerState>, StoreError> {
        charges
            .iter()
            .map(|c| {
                let held = self.held(&c.ledger, &c.period_label)?;
                Ok(LedgerState::of(c, c.total, held, delta_conv))
            })
            .collect()
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

    /// Record, durably, that this node joins the linkage session of (`key`, `anchor`)
    /// as a partner; refuses a second one for the same pair whatever its digest or
    /// nonce, since fresh noise in a second session would let the anchor average.
    pub fn claim_link_session(
        &self,
        key: &QueryKey<'_>,
        anchor: &str,
        digest: &str,
    ) -> Result<(), StoreError> {
        let mut k = key.key_bytes();
        k.push(0);
        k.extend_from_slice(anchor.as_bytes());
        match self
            .link_sessions
            .compare_and_swap(k, None as Option<&[u8]>, Some(digest.as_bytes()))
            .map_err(db_err("recording a linkage session"))?
        {
            Ok(()) => self.flush(),
            Err(_) => Err(StoreError::SecondSession {
                query_id: key.query_id.to_string(),
                anchor: anchor.to_string(),
            }),
        }
    }

    /// The secure-aggregation record for (requester, query id), if this node ever joined a
    /// session for it. An unreadable record reads as a session of all zeros at the
    /// furthest stage: it still blocks a second session (fail closed).
    pub fn secagg_participation(
        &self,
        key: &QueryKey<'_>,
    ) -> Result<Option<phm_secagg::Participation>, StoreError> {
        let v = self
            .secagg_sessions
            .get(key.key_bytes())
            .map_err(db_err("reading a secure-aggregation record"))?;
        Ok(v.map(|v| decode_participation(key.query_id, &v)))
    }

    /// Record, durably, that this node joined `p`'s session: only if it never joined one
    /// for this query (compare-and-swap from nothing, then flush).
    pub fn join_secagg(
        &self,
        key: &QueryKey<'_>,
        p: &phm_secagg::Participation,
    ) -> Result<(), StoreError> {
        match self
            .secagg_sessions
            .compare_and_swap(
                key.key_bytes(),
                None as Option<&[u8]>,
                Some(encode_participation(p)),
            )
            .map_err(db_err("recording a secure-aggregation session"))?
        {
            Ok(()) => self.flush(),
            Err(e) => Err(StoreError::SecondSecureSession {
                query_id: key.query_id.to_string(),
                prior_session: e
                    .current
                    .map(|v| hex8(&decode_participation(key.query_id, &v).session_id))
                    .unwrap_or_default(),
            }),
        }
    }

    /// Move the record from `joined` to `spent` (compare-and-swap, then flush): the
    /// caller has just charged the budget for this very session.
    pub fn advance_secagg(
        &self,
        key: &QueryKey<'_>,
        joined: &phm_secagg::Participation,
        spent: &phm_secagg::Participation,
    ) -> Result<(), StoreError> {
        match self
            .secagg_sessions
            .compare_and_swap(
                key.key_bytes(),
                Some(encode_participation(joined)),
                Some(encode_participation(spent)),
            )
            .map_err(db_err("recording a secure-aggregation spend"))?
        {
            Ok(()) => self.flush(),
            Err(_) => Err(StoreError::SecureRecordMismatch {
                query_id: key.query_id.to_string(),
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

/// The first eight bytes of a session id, hex: how messages name a session.
pub(crate) fn hex8(b: &[u8; 32]) -> String {
    b.iter().take(8).map(|x| format!("{x:02x}")).collect()
}

/// Session id (32 bytes) then the stage (0 joined, 1 spent).
fn encode_participation(p: &phm_secagg::Participation) -> Vec<u8> {
    let mut v = p.session_id.to_vec();
    v.push(match p.stage {
        phm_secagg::Stage::Joined => 0,
        phm_secagg::Stage::Spent => 1,
    });
    v
}

fn decode_participation(query_id: &str, v: &[u8]) -> phm_secagg::Participation {
    let session_id = v
        .get(..32)
        .and_then(|s| <[u8; 32]>::try_from(s).ok())
        .unwrap_or([0; 32]);
    let stage = match v.get(32) {
        Some(0) => phm_secagg::Stage::Joined,
        _ => phm_secagg::Stage::Spent,
    };
    phm_secagg::Participation {
        query_id: query_id.to_string(),
        session_id,
        stage,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// sled releases its file lock from a background thread after the drop, so a
    /// reopen in the same process may have to wait a moment on a busy machine.
    fn reopen(path: &std::path::Path) -> Store {
        for _ in 0..100 {
            if let Ok(s) = Store::open(path) {
                return s;
            }
            std::thread::sleep(std::time::Duration::from_millis(40));
        }
        Store::open(path).unwrap()
    }
    use phm_policies::model::Period;

    const DELTA: f64 = 1e-9;

    fn charge(ledger: &str, total: f64) -> LedgerCharge {
        LedgerCharge {
            ledger: ledger.into(),
            period: Period::Month,
            period_label: "2026-11".into(),
            total,
            per_query_cap: 1.0,
            delta_total: 1e-6,
        }
    }

    fn pure(epsilon: f64) -> Spend {
        Spend {
            epsilon,
            ..Spend::ZERO
        }
    }

    fn spend(
        store: &Store,
        charges: &[LedgerCharge],
        eps: f64,
    ) -> Result<Vec<LedgerState>, StoreError> {
        store.check_and_spend(charges, pure(eps), DELTA)
    }

    fn key<'a>(requester_id: &'a str, query_id: &'a str) -> QueryKey<'a> {
        QueryKey {
            requester_id,
            query_id,
        }
    }

    #[test]
    fn a_node_joins_one_secure_session_per_query_id_for_ever() {
        use phm_secagg::{Participation, Stage};
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let k = key("dsu", "q1");
        let first = Participation {
            query_id: "q1".into(),
            session_id: [1; 32],
            stage: Stage::Joined,
        };
        store.join_secagg(&k, &first).unwrap();
        let second = Participation {
            session_id: [2; 32],
            ..first.clone()
        };
        match store.join_secagg(&k, &second) {
            Err(StoreError::SecondSecureSession { prior_session, .. }) => {
                assert_eq!(prior_session, hex8(&[1; 32]));
            }
            other => panic!("a second session was not refused: {other:?}"),
        }
        // The record moves to "spent" only from this very session's "joined".
        let spent = Participation {
            stage: Stage::Spent,
            ..first.clone()
        };
        let other_spent = Participation {
            stage: Stage::Spent,
            ..second.clone()
        };
        assert!(matches!(
            store.advance_secagg(&k, &second, &other_spent),
            Err(StoreError::SecureRecordMismatch { .. })
        ));
        store.advance_secagg(&k, &first, &spent).unwrap();
        assert!(matches!(
            store.advance_secagg(&k, &first, &spent),
            Err(StoreError::SecureRecordMismatch { .. })
        ));
        // Durable: after a restart the record is there and still blocks a new session.
        drop(store);
        let store = reopen(dir.path());
        let back = store.secagg_participation(&k).unwrap().unwrap();
        assert_eq!((back.session_id, back.stage), ([1; 32], Stage::Spent));
        assert!(store.join_secagg(&k, &second).is_err());
        // Another requester's query of the same id is a query of its own.
        store
            .join_secagg(&key("researcher", "q1"), &second)
            .unwrap();
    }

    #[test]
    fn multi_ledger_spend_is_all_or_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let req = charge("requester:dsu", 10.0);
        let proj = charge("project:p1", 1.0);
        let states = spend(&store, &[req.clone(), proj.clone()], 0.75).unwrap();
        assert_eq!(states.len(), 2);
        assert_eq!(states[1].remaining(), 0.25);
        // The project ledger cannot take 0.5 more: nothing is spent anywhere.
        let err = spend(&store, &[req.clone(), proj.clone()], 0.5).unwrap_err();
        match err {
            StoreError::BudgetExhausted {
                ledger,
                remaining,
                measure,
                ..
            } => {
                assert_eq!(ledger, "project:p1");
                assert_eq!(measure, "epsilon");
                assert!((remaining - 0.25).abs() < 1e-12);
            }
            other => panic!("unexpected {other}"),
        }
        assert_eq!(store.spent(&req.key()).unwrap(), pure(0.75));
        assert_eq!(store.spent(&proj.key()).unwrap(), pure(0.75));
        // The message names the ledger and what is left.
        let msg = spend(&store, &[req, proj], 0.5).unwrap_err().to_string();
        assert!(msg.contains("project:p1") && msg.contains("0.25"), "{msg}");
    }

    #[test]
    fn small_spends_fill_a_total_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = charge("requester:a", 0.3);
        for _ in 0..3 {
            spend(&store, std::slice::from_ref(&c), 0.1).unwrap();
        }
        assert!(matches!(
            spend(&store, &[c], 0.1),
            Err(StoreError::BudgetExhausted { .. })
        ));
    }

    #[test]
    fn thresholded_queries_spend_delta_until_the_delta_budget_is_gone() {
        // F1: a thresholded query may release a one-person key with probability up
        // to its delta whatever its epsilon, so deltas add up and are budgeted: a
        // delta budget of 1e-6 takes exactly 1000 thresholded queries at 1e-9.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = charge("requester:a", 1e9);
        let one = Spend {
            epsilon: 1e-3,
            delta: 1e-9,
            rho: 0.0,
        };
        for i in 0..1000 {
            store
                .check_and_spend(std::slice::from_ref(&c), one, DELTA)
                .unwrap_or_else(|e| panic!("query {i}: {e}"));
        }
        match store.check_and_spend(std::slice::from_ref(&c), one, DELTA) {
            Err(StoreError::BudgetExhausted { measure, .. }) => assert_eq!(measure, "delta"),
            other => panic!("the 1001st thresholded query must be refused on delta: {other:?}"),
        }
        let held = store.spent(&c.key()).unwrap();
        assert!((held.delta - 1e-6).abs() < 1e-15, "{held:?}");
    }

    #[test]
    fn gaussian_spends_compose_in_rho_on_the_ledger() {
        // Ten Gaussian queries each worth epsilon 0.5 on their own: summing converted
        // epsilons would exhaust a budget of 3 after six; composed in rho they fit.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = charge("requester:a", 3.0);
        let one = Spend {
            rho: phm_policies::accounting::rho_for(0.5, DELTA),
            ..Spend::ZERO
        };
        let mut last = None;
        for i in 0..10 {
            last = Some(
                store
                    .check_and_spend(std::slice::from_ref(&c), one, DELTA)
                    .unwrap_or_else(|e| panic!("query {i}: {e}")),
            );
        }
        let state = &last.unwrap()[0];
        let (eps, delta) = Spend {
            rho: one.rho * 10.0,
            ..Spend::ZERO
        }
        .effective(DELTA);
        assert!(
            (state.spent - eps).abs() < 1e-12 && state.spent < 3.0,
            "{state:?}"
        );
        assert_eq!(state.delta_spent, delta);
        assert!(state.sums.rho > 0.0 && state.sums.epsilon == 0.0);
    }

    #[test]
    fn reconcile_never_lowers_and_raises_lost_spend() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = charge("requester:a", 5.0);
        spend(&store, std::slice::from_ref(&c), 2.0).unwrap();
        let lost = Spend {
            epsilon: 0.7,
            delta: 3e-9,
            rho: 0.01,
        };
        let audited = [
            (c.key(), pure(1.5)),
            ("project:p/2026-11".to_string(), lost),
        ]
        .into_iter()
        .collect();
        let fixed = store.reconcile(&audited).unwrap();
        assert_eq!(
            fixed,
            vec![("project:p/2026-11".to_string(), Spend::ZERO, lost)]
        );
        assert_eq!(store.spent(&c.key()).unwrap(), pure(2.0), "never lowered");
        assert_eq!(store.spent("project:p/2026-11").unwrap(), lost);
    }

    #[test]
    fn a_period_change_carries_the_overlapping_spend() {
        // F13: spent 4 of 5 in November under monthly periods; the policy switches to
        // quarterly. The quarter 2026-Q4 must start at 4, not at 0.
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let month = charge("requester:a", 5.0);
        spend(&store, std::slice::from_ref(&month), 4.0).unwrap();
        let quarter = LedgerCharge {
            period: Period::Quarter,
            period_label: "2026-Q4".into(),
            ..charge("requester:a", 5.0)
        };
        assert!(matches!(
            spend(&store, std::slice::from_ref(&quarter), 1.5),
            Err(StoreError::BudgetExhausted { .. })
        ));
        let states = spend(&store, std::slice::from_ref(&quarter), 1.0).unwrap();
        assert!((states[0].spent - 5.0).abs() < 1e-12, "{states:?}");
        assert_eq!(store.held("requester:a", "2026-Q4").unwrap(), pure(5.0));
        // A month of another quarter is not carried.
        let september = LedgerCharge {
            period_label: "2026-09".into(),
            ..charge("requester:a", 5.0)
        };
        spend(&store, std::slice::from_ref(&september), 5.0).unwrap();
    }

    #[test]
    fn an_old_eight_byte_ledger_entry_reads_as_pure_epsilon() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store
            .ledger
            .insert(b"requester:a/2026-11", &1.25f64.to_be_bytes())
            .unwrap();
        assert_eq!(store.spent("requester:a/2026-11").unwrap(), pure(1.25));
        store
            .ledger
            .insert(b"requester:b/2026-11", &[1u8; 5])
            .unwrap();
        assert!(matches!(
            store.spent("requester:b/2026-11"),
            Err(StoreError::Corrupt { .. })
        ));
    }

    #[test]
    fn invalid_spends_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let c = charge("requester:a", 1.0);
        for eps in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                spend(&store, std::slice::from_ref(&c), eps),
                Err(StoreError::InvalidSpend(_))
            ));
        }
        let bad_delta = Spend {
            epsilon: 0.1,
            delta: f64::NAN,
            rho: 0.0,
        };
        assert!(matches!(
            store.check_and_spend(std::slice::from_ref(&c), bad_delta, DELTA),
            Err(StoreError::InvalidSpend(_))
        ));
        let rho_without_conversion = Spend {
            rho: 0.01,
            ..Spend::ZERO
        };
        assert!(matches!(
            store.check_and_spend(std::slice::from_ref(&c), rho_without_conversion, 0.0),
            Err(StoreError::InvalidSpend(_))
        ));
        assert!(matches!(spend(&store, &[], 0.1), Err(StoreError::NoLedger)));
    }

    #[test]
    fn spend_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let c = charge("requester:a", 5.0);
        {
            let store = Store::open(dir.path()).unwrap();
            spend(&store, std::slice::from_ref(&c), 1.5).unwrap();
        }
        let store = reopen(dir.path());
        assert_eq!(store.spent(&c.key()).unwrap(), pure(1.5));
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
                spend(&store, &charges, 0.1)
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
        let spent = store.spent(&charges[1].key()).unwrap().epsilon;
        assert!(spent <= 5.0 + SPEND_TOLERANCE, "{spent}");
        assert!((spent - 5.0).abs() < 1e-9, "{spent}");
        assert!((store.spent(&charges[0].key()).unwrap().epsilon - 5.0).abs() < 1e-9);
    }

    /// A small, well-formed answer whose figure tells entries apart.
    pub(crate) fn answer(figure: f64) -> Answer {
        use phm_proto::result::{Release, Scope};
        Answer {
            query_id: "q1".into(),
            node_id: "A81001".into(),
            dataset: "gp_patients".into(),
            release: Release {
                group_columns: vec![],
                aliases: vec![],
                rows: vec![],
                epsilon_spent: figure,
                delta_spent: 0.0,
                rho_spent: 0.0,
                min_reportable_count: 0.0,
            },
            epsilon_remaining: 1.0,
            policy_version: String::new(),
            scope: Scope::Standalone,
            population_noisy: 0.0,
            released_at_unix_ms: 0,
            cached: false,
            total_kind: None,
        }
    }

    #[test]
    fn release_cache_hits_same_digest_recognises_retries_and_flags_reuse() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let q1 = key("dsu", "q1");
        assert_eq!(
            store.cached_release(&q1, "d1", "c1").unwrap(),
            CacheLookup::Miss
        );
        let released = store.store_release(&q1, "d1", "c1", answer(1.5)).unwrap();
        assert_eq!(released, answer(1.5));
        assert_eq!(
            store.cached_release(&q1, "d1", "c1").unwrap(),
            CacheLookup::Hit(answer(1.5))
        );
        // Re-signed with a new nonce: other digest, same content.
        assert_eq!(
            store.cached_release(&q1, "d2", "c1").unwrap(),
            CacheLookup::Retry(answer(1.5))
        );
        assert_eq!(
            store.cached_release(&q1, "d3", "c3").unwrap(),
            CacheLookup::Conflict {
                cached_digest: "d1".into()
            }
        );
        // F9: ids are a per-requester namespace.
        assert_eq!(
            store
                .cached_release(&key("other", "q1"), "d9", "c9")
                .unwrap(),
            CacheLookup::Miss
        );
    }

    #[test]
    fn a_charge_without_a_release_is_found_by_its_question_until_the_release_replaces_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let q = key("dsu", "q1");
        store.store_charge(&q, "d1", "c1", "policy-v1").unwrap();
        let charged = |same_message| CacheLookup::Charged {
            same_message,
            policy_version: "policy-v1".into(),
        };
        assert_eq!(store.cached_release(&q, "d1", "c1").unwrap(), charged(true));
        // The same question re-signed, and another question under the same id.
        assert_eq!(
            store.cached_release(&q, "d2", "c1").unwrap(),
            charged(false)
        );
        assert_eq!(
            store.cached_release(&q, "d3", "c3").unwrap(),
            CacheLookup::Conflict {
                cached_digest: "d1".into()
            }
        );
        // Survives a restart.
        drop(store);
        let store = reopen(dir.path());
        assert_eq!(
            store.cached_release(&q, "d2", "c1").unwrap(),
            charged(false)
        );
        // The release replaces the record.
        store.store_release(&q, "d2", "c1", answer(2.0)).unwrap();
        assert_eq!(
            store.cached_release(&q, "d2", "c1").unwrap(),
            CacheLookup::Hit(answer(2.0))
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
        let g1 = store.lock_query_id(&key("dsu", "q")).await;
        // A different id, or the same id of another requester, is not blocked.
        let _g2 = store.lock_query_id(&key("dsu", "other")).await;
        let _g2b = store.lock_query_id(&key("other", "q")).await;
        let blocked = tokio::time::timeout(
            std::time::Duration::from_millis(50),
            store.lock_query_id(&key("dsu", "q")),
        )
        .await;
        assert!(blocked.is_err());
        drop(g1);
        let _g3 = tokio::time::timeout(
            std::time::Duration::from_millis(500),
            store.lock_query_id(&key("dsu", "q")),
        )
        .await
        .unwrap();
    }
}
