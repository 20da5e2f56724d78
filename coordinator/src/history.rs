//! Durable query history (sled): which query ids have been used for which question,
//! the finished combined results with the progress events that led to them, and the
//! last population each node reported.

use phm_proto::proto;
use prost::Message;
use std::collections::HashMap;
use std::path::Path;

/// What is stored per query id.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StoredQuery {
    /// `QueryBody::digest()` of the validated query that claimed this id.
    #[prost(string, tag = "1")]
    pub digest: String,
    #[prost(message, repeated, tag = "2")]
    pub progress: Vec<proto::NodeProgress>,
    /// Absent while the query is running (or if the coordinator stopped mid-query).
    #[prost(message, optional, tag = "3")]
    pub result: Option<proto::CombinedResult>,
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
    Existing(Box<StoredQuery>),
}

#[derive(Clone)]
pub struct History {
    db: sled::Db,
    queries: sled::Tree,
    populations: sled::Tree,
}

impl History {
    pub fn open(dir: &Path) -> Result<History, HistoryError> {
        let db = sled::open(dir).map_err(|source| HistoryError::Open {
            path: dir.display().to_string(),
            source,
        })?;
        let queries = db.open_tree("queries")?;
        let populations = db.open_tree("node_population")?;
        Ok(History {
            db,
            queries,
            populations,
        })
    }

    fn decode(id: &str, bytes: &[u8]) -> Result<StoredQuery, HistoryError> {
        StoredQuery::decode(bytes).map_err(|e| HistoryError::Corrupt {
            id: id.to_string(),
            reason: e.to_string(),
        })
    }

    pub fn get(&self, query_id: &str) -> Result<Option<StoredQuery>, HistoryError> {
        self.queries
            .get(query_id.as_bytes())?
            .map(|b| Self::decode(query_id, &b))
            .transpose()
    }

    /// Atomically record `digest` for `query_id` unless the id is already taken.
    /// Synchronous so callers can decide under a lock; follow a `Claim::New` with
    /// [`History::flush`] before contacting nodes.
    pub fn claim(&self, query_id: &str, digest: &str) -> Result<Claim, HistoryError> {
        let record = StoredQuery {
            digest: digest.to_string(),
            progress: Vec::new(),
            result: None,
        }
        .encode_to_vec();
        match self
            .queries
            .compare_and_swap(query_id.as_bytes(), None::<&[u8]>, Some(record))?
        {
            Ok(()) => Ok(Claim::New),
            Err(cas) => match cas.current {
                Some(b) => Ok(Claim::Existing(Box::new(Self::decode(query_id, &b)?))),
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
    pub async fn finish(&self, query_id: &str, record: &StoredQuery) -> Result<(), HistoryError> {
        self.queries
            .insert(query_id.as_bytes(), record.encode_to_vec())?;
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

    #[tokio::test]
    async fn claim_is_exclusive_and_results_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let h = History::open(dir.path()).unwrap();
            assert!(matches!(h.claim("q1", "d1").unwrap(), Claim::New));
            h.flush().await.unwrap();
            match h.claim("q1", "d2").unwrap() {
                Claim::Existing(r) => {
                    assert_eq!(r.digest, "d1");
                    assert!(r.result.is_none());
                }
                Claim::New => panic!("second claim must see the first"),
            }
            let rec = StoredQuery {
                digest: "d1".into(),
                progress: vec![proto::NodeProgress {
                    message: "ok".into(),
                    ..Default::default()
                }],
                result: Some(proto::CombinedResult {
                    query_id: "q1".into(),
                    ..Default::default()
                }),
            };
            h.finish("q1", &rec).await.unwrap();
            h.remember_population("A", 1234.0).unwrap();
        }
        let h = History::open(dir.path()).unwrap();
        let r = h.get("q1").unwrap().unwrap();
        assert_eq!(r.progress[0].message, "ok");
        assert_eq!(r.result.unwrap().query_id, "q1");
        assert!(h.get("q2").unwrap().is_none());
        assert_eq!(h.populations().unwrap().get("A"), Some(&1234.0));
    }
}
