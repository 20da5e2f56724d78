//! The append-only, hash-chained audit log (`<data_dir>/audit.log`, one JSON object a
//! line). Each entry carries `seq` (its 1-based line number), `prev_hash` (the previous
//! entry's `hash`) and `hash` = SHA-256 hex of the entry's canonical JSON without
//! `hash` (keys sorted, no whitespace). Editing, deleting or reordering entries breaks
//! the chain at the first entry touched; `verify_log` names it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// `prev_hash` of the first entry.
pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// File name of the audit log inside the data folder.
pub const AUDIT_FILE: &str = "audit.log";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Allowed,
    Refused,
}

/// What one audit entry records (the chain fields are added on append).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// RFC 3339 UTC time of the decision.
    pub time: String,
    /// "query", "describe", "budget", "link", "secure_aggregate" (a secure session up to
    /// and including its spend) or "secure_aggregate_end" (the rest of that session).
    pub rpc: String,
    pub requester: String,
    pub purpose: Option<String>,
    pub project: Option<String>,
    pub query_id: Option<String>,
    /// `QueryBody::digest()`.
    pub query_digest: Option<String>,
    /// `QueryBody::to_sql()`.
    pub sql: Option<String>,
    pub dataset: Option<String>,
    /// Requested epsilon.
    pub epsilon_requested: Option<f64>,
    /// Identity from the client's TLS certificate (CN and SANs).
    pub client_identity: String,
    pub decision: Outcome,
    /// Served from the release cache (no new spend).
    pub cached: bool,
    /// Denial reason name (e.g. `POLICY_DENIED`) when refused.
    pub reason: Option<String>,
    /// Every individual reason for a refusal, or notes on an allowed decision.
    pub reasons: Vec<String>,
    /// Epsilon this decision spent: the query's own epsilon (its release is
    /// (epsilon_spent, delta_spent)-DP on its own).
    pub epsilon_spent: f64,
    /// Delta this decision spent: the thresholding delta, plus the conversion delta
    /// for a Gaussian release; 0 for pure epsilon-DP.
    #[serde(default)]
    pub delta_spent: f64,
    /// The running-sum components debited from each charged ledger (pure epsilon,
    /// delta, Gaussian rho). Absent in entries written before delta was tracked:
    /// those debited `epsilon_spent` as pure epsilon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ledger_spend: Option<phm_policies::Spend>,
    /// Ledgers charged and what they hold after the charge (for people).
    pub ledgers: Vec<String>,
    /// Keys (`LedgerCharge::key()`) of the ledgers `epsilon_spent` was debited from;
    /// lets start-up check the ledger never holds less than the log records.
    #[serde(default)]
    pub charged: Vec<String>,
    pub policy_version: String,
    /// The text of each statement this decision sent to a warehouse, in order (its
    /// parameters are the query's literals and the policy's values, which `sql` and the
    /// policy already show). Absent for a file source, and in entries written before
    /// warehouse sources existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub statements: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("audit log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("audit log {path}: entry {line} is broken: {reason}")]
    Broken {
        path: PathBuf,
        /// 1-based line number of the first broken entry.
        line: u64,
        reason: String,
    },
    #[error("cannot encode an audit entry: {0}")]
    Encode(String),
}

impl AuditError {
    /// Line number of the broken entry, if this is a chain break.
    pub fn broken_line(&self) -> Option<u64> {
        match self {
            AuditError::Broken { line, .. } => Some(*line),
            _ => None,
        }
    }
}

/// Result of a successful verification.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditReport {
    pub entries: u64,
    /// `hash` of the last entry (`GENESIS_HASH` for an empty log).
    pub last_hash: String,
}

/// Canonical JSON: object keys sorted, no whitespace. Independent of serde_json's
/// map ordering features.
fn write_canonical(v: &Value, out: &mut String) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(x) = m.get(k) {
                    write_canonical(x, out);
                }
            }
            out.push('}');
        }
        Value::Array(a) => {
            out.push('[');
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(x, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// SHA-256 hex of the canonical JSON of `entry` without its `hash` field.
pub fn entry_hash(entry: &Map<String, Value>) -> String {
    let mut without = entry.clone();
    without.remove("hash");
    let mut s = String::new();
    write_canonical(&Value::Object(without), &mut s);
    hex::encode(Sha256::digest(s.as_bytes()))
}

/// The line with its `"hash":"…"` member removed: exactly the canonical JSON that was
/// hashed when the line was written with sorted keys and no whitespace. JSON strings
/// escape every inner quote, so the member text can only occur as a real member.
fn strip_hash_member(line: &str, hash: &str) -> Option<String> {
    let member = format!("\"hash\":{}", Value::String(hash.to_string()));
    if line.matches(&member).count() != 1 {
        return None;
    }
    let before = format!(",{member}");
    let after = format!("{member},");
    if line.contains(&before) {
        Some(line.replacen(&before, "", 1))
    } else if line.contains(&after) {
        Some(line.replacen(&after, "", 1))
    } else if line == format!("{{{member}}}") {
        Some("{}".to_string())
    } else {
        None
    }
}

fn check_line(
    path: &Path,
    line_no: u64,
    line: &str,
    prev_hash: &str,
) -> Result<String, AuditError> {
    let broken = |reason: String| AuditError::Broken {
        path: path.to_path_buf(),
        line: line_no,
        reason,
    };
    if line.trim().is_empty() {
        return Err(broken(
            "empty line (an entry was removed or blanked)".into(),
        ));
    }
    let value: Value =
        serde_json::from_str(line).map_err(|e| broken(format!("not valid JSON: {e}")))?;
    let Value::Object(map) = value else {
        return Err(broken("not a JSON object".into()));
    };
    let hash = map
        .get("hash")
        .and_then(Value::as_str)
        .ok_or_else(|| broken("no `hash` field".into()))?;
    let prev = map
        .get("prev_hash")
        .and_then(Value::as_str)
        .ok_or_else(|| broken("no `prev_hash` field".into()))?;
    let seq = map
        .get("seq")
        .and_then(Value::as_u64)
        .ok_or_else(|| broken("no `seq` field".into()))?;
    // Hash the bytes as written rather than a re-serialisation of the parsed entry:
    // re-parsing floats is not guaranteed to be bit-exact, and the log is append-only
    // at the byte level anyway.
    let stripped = strip_hash_member(line, hash)
        .ok_or_else(|| broken("the `hash` field is not written in canonical form".into()))?;
    let computed = hex::encode(Sha256::digest(stripped.as_bytes()));
    if computed != hash {
        return Err(broken(format!(
            "content does not match its hash (the entry was edited): stored {hash}, computed {computed}"
        )));
    }
    if prev != prev_hash {
        return Err(broken(format!(
            "prev_hash {prev} does not match the previous entry's hash {prev_hash} (an entry before it was removed, inserted or reordered)"
        )));
    }
    if seq != line_no {
        return Err(broken(format!(
            "seq is {seq} but the entry is on line {line_no} (entries were removed or reordered)"
        )));
    }
    Ok(hash.to_string())
}

/// Check the whole chain of an audit log file.
pub fn verify_log(path: &Path) -> Result<AuditReport, AuditError> {
    let io = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = File::open(path).map_err(io)?;
    let mut reader = BufReader::new(file);
    let mut prev_hash = GENESIS_HASH.to_string();
    let mut entries = 0u64;
    let mut buf = String::new();
    loop {
        buf.clear();
        let n = reader.read_line(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        let line_no = entries + 1;
        if !buf.ends_with('\n') {
            return Err(AuditError::Broken {
                path: path.to_path_buf(),
                line: line_no,
                reason: "incomplete final entry (no line end): the write was cut short".into(),
            });
        }
        prev_hash = check_line(
            path,
            line_no,
            buf.trim_end_matches(['\n', '\r']),
            &prev_hash,
        )?;
        entries = line_no;
    }
    Ok(AuditReport {
        entries,
        last_hash: prev_hash,
    })
}

/// What the log records as debited, per ledger key: the sum of each entry's
/// `ledger_spend` (or, for entries older than delta accounting, of `epsilon_spent`
/// as pure epsilon) over the ledgers in its `charged` list. Every released answer
/// is audited, and its spend was made durable before it.
pub fn audited_spend(
    path: &Path,
) -> Result<std::collections::BTreeMap<String, phm_policies::Spend>, AuditError> {
    use phm_policies::Spend;
    let io = |source| AuditError::Io {
        path: path.to_path_buf(),
        source,
    };
    let reader = BufReader::new(File::open(path).map_err(io)?);
    let mut out: std::collections::BTreeMap<String, Spend> = std::collections::BTreeMap::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(io)?;
        let broken = |reason: String| AuditError::Broken {
            path: path.to_path_buf(),
            line: i as u64 + 1,
            reason,
        };
        let v: Value =
            serde_json::from_str(&line).map_err(|e| broken(format!("not valid JSON: {e}")))?;
        let spend = match v.get("ledger_spend") {
            Some(Value::Null) | None => Spend {
                epsilon: v
                    .get("epsilon_spent")
                    .and_then(Value::as_f64)
                    .unwrap_or(0.0),
                ..Spend::ZERO
            },
            Some(raw) => serde_json::from_value::<Spend>(raw.clone())
                .map_err(|e| broken(format!("ledger_spend is not a spend: {e}")))?,
        };
        if !spend.is_valid() || spend == Spend::ZERO {
            continue;
        }
        if let Some(keys) = v.get("charged").and_then(Value::as_array) {
            for k in keys.iter().filter_map(Value::as_str) {
                let e = out.entry(k.to_string()).or_insert(Spend::ZERO);
                *e = e.plus(spend);
            }
        }
    }
    Ok(out)
}

struct Tail {
    file: File,
    prev_hash: String,
    seq: u64,
    /// File length after the last complete entry.
    len: u64,
}

/// The open audit log. Appends are serialised and fsynced one by one.
pub struct AuditLog {
    path: PathBuf,
    tail: Mutex<Tail>,
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditLog")
            .field("path", &self.path)
            .finish()
    }
}

impl AuditLog {
    /// Open `data_dir/audit.log`, creating it if needed. Refuses a log whose existing
    /// chain is broken: the node must not continue an untrustworthy record.
    pub fn open(data_dir: &Path) -> Result<AuditLog, AuditError> {
        let path = data_dir.join(AUDIT_FILE);
        let io = |source| AuditError::Io {
            path: path.clone(),
            source,
        };
        // Owner-only: the log holds query text, requesters and ids (never values).
        let file = {
            let mut o = OpenOptions::new();
            o.create(true).append(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut o, 0o600);
            o.open(&path).map_err(io)?
        };
        let report = verify_log(&path)?;
        let len = file.metadata().map_err(io)?.len();
        Ok(AuditLog {
            tail: Mutex::new(Tail {
                file,
                prev_hash: report.last_hash,
                seq: report.entries,
                len,
            }),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Entries written so far.
    pub fn entries(&self) -> u64 {
        self.tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .seq
    }

    /// Append one entry and fsync it. Returns the entry's hash.
    pub fn append(&self, record: &AuditRecord) -> Result<String, AuditError> {
        let value = serde_json::to_value(record).map_err(|e| AuditError::Encode(e.to_string()))?;
        let Value::Object(mut map) = value else {
            return Err(AuditError::Encode("record is not an object".into()));
        };
        let mut tail = self
            .tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let seq = tail.seq + 1;
        map.insert("seq".into(), Value::from(seq));
        map.insert("prev_hash".into(), Value::String(tail.prev_hash.clone()));
        let hash = entry_hash(&map);
        map.insert("hash".into(), Value::String(hash.clone()));
        let mut line = String::new();
        write_canonical(&Value::Object(map), &mut line);
        line.push('\n');
        let io = |source| AuditError::Io {
            path: self.path.clone(),
            source,
        };
        // One write call per line keeps a crash from interleaving partial entries.
        let written = tail
            .file
            .write_all(line.as_bytes())
            .and_then(|()| tail.file.sync_data());
        if let Err(e) = written {
            // Cut off whatever part of the line reached the file, so the chain stays
            // verifiable once the disk works again.
            let _ = tail.file.set_len(tail.len);
            let _ = tail.file.sync_data();
            return Err(io(e));
        }
        tail.len += line.len() as u64;
        tail.seq = seq;
        tail.prev_hash = hash.clone();
        Ok(hash)
    }

    /// fsync the file (appends already sync; this is for shutdown).
    pub fn flush(&self) -> Result<(), AuditError> {
        let tail = self
            .tail
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        tail.file.sync_all().map_err(|source| AuditError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(i: usize) -> AuditRecord {
        AuditRecord {
            time: format!("2026-11-23T10:00:{:02}Z", i % 60),
            rpc: "query".into(),
            requester: "dsu".into(),
            purpose: Some("planning".into()),
            project: None,
            query_id: Some(format!("q{i}")),
            query_digest: Some("ab".repeat(32)),
            sql: Some("SELECT COUNT(*) AS n FROM gp_patients WHERE name = 'O''Neil \"x\"'".into()),
            dataset: Some("gp_patients".into()),
            epsilon_requested: Some(0.1 * i as f64),
            client_identity: "CN=coordinator".into(),
            decision: if i.is_multiple_of(2) {
                Outcome::Allowed
            } else {
                Outcome::Refused
            },
            cached: false,
            reason: (i % 2 == 1).then(|| "POLICY_DENIED".into()),
            reasons: vec!["a reason é ✓".into()],
            epsilon_spent: 0.1 * i as f64,
            delta_spent: 0.0,
            ledger_spend: None,
            ledgers: vec![],
            charged: vec!["requester:dsu/2026-11".into()],
            policy_version: "v".into(),
            statements: vec![],
        }
    }

    fn write_log(n: usize) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        for i in 0..n {
            log.append(&record(i)).unwrap();
        }
        let path = log.path().to_path_buf();
        (dir, path)
    }

    fn lines(path: &Path) -> Vec<String> {
        std::fs::read_to_string(path)
            .unwrap()
            .lines()
            .map(String::from)
            .collect()
    }

    fn rewrite(path: &Path, lines: &[String]) {
        let mut s = lines.join("\n");
        s.push('\n');
        std::fs::write(path, s).unwrap();
    }

    #[test]
    fn chain_verifies_and_continues_after_reopen() {
        let (dir, path) = write_log(5);
        assert_eq!(verify_log(&path).unwrap().entries, 5);
        let log = AuditLog::open(dir.path()).unwrap();
        assert_eq!(log.entries(), 5);
        log.append(&record(5)).unwrap();
        let report = verify_log(&path).unwrap();
        assert_eq!(report.entries, 6);
        let last: Value = serde_json::from_str(lines(&path).last().unwrap()).unwrap();
        assert_eq!(last["hash"], report.last_hash.as_str());
        assert_eq!(last["seq"], 6);
    }

    #[test]
    fn editing_one_field_is_detected_at_that_line() {
        let (_dir, path) = write_log(6);
        let mut ls = lines(&path);
        let mut v: Value = serde_json::from_str(&ls[3]).unwrap();
        v["epsilon_spent"] = Value::from(0.0);
        ls[3] = v.to_string();
        rewrite(&path, &ls);
        let err = verify_log(&path).unwrap_err();
        assert_eq!(err.broken_line(), Some(4), "{err}");
        assert!(err.to_string().contains("edited"), "{err}");
    }

    #[test]
    fn editing_and_rehashing_is_detected_at_the_next_line() {
        let (_dir, path) = write_log(6);
        let mut ls = lines(&path);
        let Value::Object(mut m) = serde_json::from_str(&ls[1]).unwrap() else {
            panic!()
        };
        m.insert("requester".into(), Value::from("someone-else"));
        let h = entry_hash(&m);
        m.insert("hash".into(), Value::from(h));
        let mut line = String::new();
        write_canonical(&Value::Object(m), &mut line);
        ls[1] = line;
        rewrite(&path, &ls);
        assert_eq!(verify_log(&path).unwrap_err().broken_line(), Some(3));
    }

    #[test]
    fn deleting_a_line_is_detected() {
        let (_dir, path) = write_log(6);
        let mut ls = lines(&path);
        ls.remove(2);
        rewrite(&path, &ls);
        let err = verify_log(&path).unwrap_err();
        assert_eq!(err.broken_line(), Some(3), "{err}");
    }

    #[test]
    fn broken_log_refuses_to_open_and_torn_tail_is_reported() {
        let (dir, path) = write_log(3);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"seq\":4");
        std::fs::write(&path, &text).unwrap();
        let err = verify_log(&path).unwrap_err();
        assert_eq!(err.broken_line(), Some(4));
        assert!(AuditLog::open(dir.path()).is_err());
    }

    #[test]
    fn audited_spend_sums_each_charged_ledger() {
        let (_dir, path) = write_log(4);
        let sums = audited_spend(&path).unwrap();
        // Entries 0..4 spent 0, 0.1, 0.2, 0.3 on the same ledger (as pure epsilon,
        // the format before delta accounting).
        assert!((sums["requester:dsu/2026-11"].epsilon - 0.6).abs() < 1e-12);
        assert_eq!(sums.len(), 1);
    }

    #[test]
    fn audited_spend_sums_delta_and_rho_components() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        let part = phm_policies::Spend {
            epsilon: 0.1,
            delta: 1e-9,
            rho: 0.002,
        };
        for i in 0..3 {
            let mut r = record(i + 1);
            r.ledger_spend = Some(part);
            log.append(&r).unwrap();
        }
        let sums = audited_spend(log.path()).unwrap();
        let got = sums["requester:dsu/2026-11"];
        assert!((got.epsilon - 0.3).abs() < 1e-12, "{got:?}");
        assert!((got.delta - 3e-9).abs() < 1e-20, "{got:?}");
        assert!((got.rho - 0.006).abs() < 1e-12, "{got:?}");
    }

    #[cfg(unix)]
    #[test]
    fn the_log_is_created_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::open(dir.path()).unwrap();
        let mode = std::fs::metadata(log.path()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "mode {:o}", mode & 0o777);
    }

    #[test]
    fn concurrent_appends_keep_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let log = std::sync::Arc::new(AuditLog::open(dir.path()).unwrap());
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let log = log.clone();
                std::thread::spawn(move || {
                    for i in 0..10 {
                        log.append(&record(t * 10 + i)).unwrap();
                    }
                })
            })
            .collect();
        for h in handles {
            h.join().unwrap();
        }
        assert_eq!(verify_log(log.path()).unwrap().entries, 80);
    }
}
