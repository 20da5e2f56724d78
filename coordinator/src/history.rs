//! Durable query history (sled): which query ids each requester has used for which
//! question, the finished combined results with the progress events that led to them
//! (each bound to its requester and project), the nonces of signed messages seen, and
//! the last population each node reported.

pub use crate::model::Record;
use crate::model::SystemResult;
use crate::wire::WireError;
pub use phm_proto::QueryKey;
use phm_proto::proto;
use prost::Message;
use std::collections::HashMap;
use std::path::Path;

/// What is stored per (requester, query id): a [`Record`] in its wire form.
#[derive(Clone, PartialEq, prost::Message)]
struct StoredQuery {
    /// `QueryBody::digest()` of the validated query that claimed this id.
    #[prost(string, tag = "1")]
    digest: String,
    #[prost(string, tag = "4")]
    requester_id: String,
    #[prost(string, tag = "5")]
    project_id: String,
    #[prost(string, tag = "6")]
    content_digest: String,
    #[prost(message, repeated, tag = "2")]
    progress: Vec<proto::NodeProgress>,
    #[prost(message, optional, tag = "3")]
    result: Option<proto::CombinedResult>,
}

impl From<&Record> for StoredQuery {
    fn from(r: &Record) -> Self {
        let r = r.clone();
        StoredQuery {
            digest: r.digest,
            requester_id: r.requester_id,
            project_id: r.project_id,
            content_digest: r.content_digest,
            progress: r.progress.into_iter().map(Into::into).collect(),
            result: r.result.map(Into::into),
        }
    }
}

impl TryFrom<StoredQuery> for Record {
    type Error = WireError;

    fn try_from(s: StoredQuery) -> Result<Self, WireError> {
        Ok(Record {
            digest: s.digest,
            requester_id: s.requester_id,
            project_id: s.project_id,
            content_digest: s.content_digest,
            progress: s.progress.into_iter().map(Into::into).collect(),
            result: s.result.map(SystemResult::try_from).transpose()?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("query history at {path}: {source}")]
    Open { path: String, source: sled::Error },
    #[error("query history: {0}")]
    Db(#[from] sled::Error),
    #[error("query history: stored record for {id:?} is corrupt: {reason}")]
    Corrupt { id: String, reason: String },
    #[error("query history: flush task failed: {0}")]
    FlushTask(String),
}

/// Outcome of trying to claim a query id.
#[derive(Debug)]
pub enum Claim {
    /// The id was free and is now recorded for this digest.
    New,
    /// The id was already recorded.
    Existing(Box<Record>),
}

#[derive(Clone)]
pub struct History {
    db: sled::Db,
    queries: sled::Tree,
    populations: sled::Tree,
    nonces: sled::Tree,
}

impl History {
    pub fn open(dir: &Path) -> Result<History, HistoryError> {
        let db = sled::open(dir).map_err(|source| HistoryError::Open {
            path: dir.display().to_string(),
            source,
        })?;
        // "queries_by_requester": keys are (requester, id); entries written before
        // results were bound to requesters (tree "queries") are never served.
        let queries = db.open_tree("queries_by_requester")?;
        let populations = db.open_tree("node_population")?;
        let nonces = db.open_tree("nonces")?;
        Ok(History {
            db,
            queries,
            populations,
            nonces,
        })
    }

    /// Record that `requester` used `nonce` for `op` in a message issued at
    /// `issued_at_unix_ms`; false if it was seen before (a replay). Nonces older than
    /// `forget_before_unix_ms` are pruned now and then: their messages are stale
    /// anyway.
    pub fn record_nonce(
        &self,
        op: &str,
        requester: &str,
        nonce: &[u8],
        issued_at_unix_ms: i64,
        forget_before_unix_ms: i64,
    ) -> Result<bool, HistoryError> {
        let mut key = Vec::with_capacity(op.len() + requester.len() + nonce.len() + 2);
        key.extend_from_slice(op.as_bytes());
        key.push(0);
        key.extend_from_slice(requester.as_bytes());
        key.push(0);
        key.extend_from_slice(nonce);
        let fresh = self
            .nonces
            .compare_and_swap(&key, None::<&[u8]>, Some(&issued_at_unix_ms.to_be_bytes()))?
            .is_ok();
        if fresh && self.nonces.len().is_multiple_of(1024) {
            for item in self.nonces.iter() {
                let (k, v) = item?;
                let at = <[u8; 8]>::try_from(&v[..])
                    .map(i64::from_be_bytes)
                    .unwrap_or(0);
                if at < forget_before_unix_ms {
                    self.nonces.remove(k)?;
                }
            }
        }
        Ok(fresh)
    }

    fn decode(id: &str, bytes: &[u8]) -> Result<Record, HistoryError> {
        let corrupt = |reason: String| HistoryError::Corrupt {
            id: id.to_string(),
            reason,
        };
        let stored = StoredQuery::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
        Record::try_from(stored).map_err(|e| corrupt(e.to_string()))
    }

    pub fn get(&self, key: &QueryKey<'_>) -> Result<Option<Record>, HistoryError> {
        self.queries
            .get(key.key_bytes())?
            .map(|b| Self::decode(key.query_id, &b))
            .transpose()
    }

    /// Atomically record `claim` (digest, requester, project, content digest, no
    /// result yet) under `key` unless the key is already taken. Synchronous so callers
    /// can decide under a lock; follow a `Claim::New` with [`History::flush`] before
    /// contacting nodes.
    pub fn claim(&self, key: &QueryKey<'_>, claim: &Record) -> Result<Claim, HistoryError> {
        let record = StoredQuery::from(claim).encode_to_vec();
        match self
            .queries
            .compare_and_swap(key.key_bytes(), None::<&[u8]>, Some(record))?
        {
            Ok(()) => Ok(Claim::New),
            Err(cas) => match cas.current {
                Some(b) => Ok(Claim::Existing(Box::new(Self::decode(key.query_id, &b)?))),
                // compare_and_swap against None only fails when a value exists.
                None => Ok(Claim::New),
            },
        }
    }

    /// Make everything written so far durable.
    pub async fn flush(&self) -> Result<(), HistoryError> {
        // sled 0.34's `flush_async` can deadlock when many tasks await it at once (seen
        // with 100 concurrent Submits); its blocking flush is safe on the blocking pool.
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || db.flush())
            .await
            .map_err(|e| HistoryError::FlushTask(e.to_string()))??;
        Ok(())
    }

    /// Store a finished query and flush it to disk before returning.
    pub async fn finish(&self, key: &QueryKey<'_>, record: &Record) -> Result<(), HistoryError> {
        self.queries
            .insert(key.key_bytes(), StoredQuery::from(record).encode_to_vec())?;
        self.flush().await
    }

    pub fn remember_population(&self, node_id: &str, population: f64) -> Result<(), HistoryError> {
        self.populations
            .insert(node_id.as_bytes(), &population.to_be_bytes())?;
        Ok(())
    }

    /// The last population each node reported (only positive figures are kept).
    pub fn populations(&self) -> Result<HashMap<String, f64>, HistoryError> {
        let mut out = HashMap::new();
        for item in self.populations.iter() {
            let (k, v) = item?;
            let (Ok(id), Ok(bytes)) = (String::from_utf8(k.to_vec()), <[u8; 8]>::try_from(&v[..]))
            else {
                continue;
            };
            out.insert(id, f64::from_be_bytes(bytes));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key<'a>(requester_id: &'a str, query_id: &'a str) -> QueryKey<'a> {
        QueryKey {
            requester_id,
            query_id,
        }
    }

    fn claim(digest: &str, requester: &str) -> Record {
        Record {
            digest: digest.into(),
            requester_id: requester.into(),
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn claim_is_exclusive_per_requester_and_results_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let h = History::open(dir.path()).unwrap();
            assert!(matches!(
                h.claim(&key("dsu", "q1"), &claim("d1", "dsu")).unwrap(),
                Claim::New
            ));
            h.flush().await.unwrap();
            match h.claim(&key("dsu", "q1"), &claim("d2", "dsu")).unwrap() {
                Claim::Existing(r) => {
                    assert_eq!(r.digest, "d1");
                    assert_eq!(r.requester_id, "dsu");
                    assert!(r.result.is_none());
                }
                Claim::New => panic!("second claim must see the first"),
            }
            // Another requester's id space is separate.
            assert!(matches!(
                h.claim(&key("researcher", "q1"), &claim("d9", "researcher"))
                    .unwrap(),
                Claim::New
            ));
            let stored = proto::CombinedResult {
                query_id: "q1".into(),
                total_kind: proto::TotalKind::DistinctPeople as i32,
                ..Default::default()
            };
            let rec = Record {
                progress: vec![
                    proto::NodeProgress {
                        message: "ok".into(),
                        ..Default::default()
                    }
                    .into(),
                ],
                result: Some(SystemResult::try_from(stored).unwrap()),
                ..claim("d1", "dsu")
            };
            h.finish(&key("dsu", "q1"), &rec).await.unwrap();
            h.remember_population("A", 1234.0).unwrap();
        }
        // sled's background flusher holds the file lock for a moment after the last
        // handle is dropped (seen under load): wait for it, as a restarted process would.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let h = loop {
            match History::open(dir.path()) {
                Ok(h) => break h,
                Err(e) if std::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => panic!("reopen: {e}"),
            }
        };
        let r = h.get(&key("dsu", "q1")).unwrap().unwrap();
        assert_eq!(r.progress[0].message, "ok");
        assert_eq!(r.result.unwrap().query_id, "q1");
        assert!(h.get(&key("dsu", "q2")).unwrap().is_none());
        assert!(h.get(&key("other", "q1")).unwrap().is_none());
        assert_eq!(h.populations().unwrap().get("A"), Some(&1234.0));
    }

    #[test]
    fn nonces_are_single_use() {
        let dir = tempfile::tempdir().unwrap();
        let h = History::open(dir.path()).unwrap();
        assert!(h.record_nonce("submit", "dsu", &[1; 16], 10, 0).unwrap());
        assert!(!h.record_nonce("submit", "dsu", &[1; 16], 10, 0).unwrap());
        assert!(
            h.record_nonce("get_result", "dsu", &[1; 16], 10, 0)
                .unwrap()
        );
        assert!(h.record_nonce("submit", "other", &[1; 16], 10, 0).unwrap());
    }
}
