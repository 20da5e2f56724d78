//! kill -9 during a burst of spends: a child process (this test binary re-executed)
//! spends, caches and audits in a loop on several threads, printing each answer only
//! after all three are durable, exactly as the node orders them. The parent SIGKILLs it
//! mid-burst, then checks the ledger covers every printed answer, every printed
//! answer is in the release cache, and the audit chain still verifies.
// Helpers outside #[test] functions panic on broken fixtures too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use phm_node::audit::{AuditLog, AuditRecord, Outcome, verify_log};
use phm_node::store::{CacheLookup, QueryKey, Store};
use phm_policies::LedgerCharge;
use phm_policies::model::Period;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CHILD_ENV: &str = "PHM_NODE_CRASH_CHILD_DIR";
const EPS: f64 = 0.01;

fn charges() -> Vec<LedgerCharge> {
    ["requester:dsu", "project:p1"]
        .into_iter()
        .map(|l| LedgerCharge {
            ledger: l.into(),
            period: Period::Month,
            period_label: "2026-11".into(),
            total: 1e9,
            per_query_cap: 1.0,
            delta_total: 1e-6,
        })
        .collect()
}

/// The answer cached for `qid`: its id and cost, so a lost or mixed-up entry shows.
fn answer(qid: &str) -> phm_proto::result::Answer {
    use phm_proto::result::{Answer, Release, Scope};
    Answer {
        query_id: qid.to_string(),
        node_id: "A81001".into(),
        dataset: "gp_patients".into(),
        release: Release {
            group_columns: vec![],
            aliases: vec![],
            rows: vec![],
            epsilon_spent: EPS,
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

fn record(qid: &str) -> AuditRecord {
    AuditRecord {
        time: "2026-11-23T10:00:00.000Z".into(),
        rpc: "query".into(),
        requester: "dsu".into(),
        purpose: Some("planning".into()),
        project: Some("p1".into()),
        query_id: Some(qid.into()),
        query_digest: Some(format!("digest-{qid}")),
        sql: Some("SELECT COUNT(*) AS n FROM gp_patients".into()),
        dataset: Some("gp_patients".into()),
        epsilon_requested: Some(EPS),
        client_identity: "CN=test".into(),
        decision: Outcome::Allowed,
        cached: false,
        reason: None,
        reasons: vec![],
        epsilon_spent: EPS,
        delta_spent: 0.0,
        ledger_spend: None,
        ledgers: vec![],
        charged: charges().iter().map(|c| c.key()).collect(),
        policy_version: "v".into(),
        statements: vec![],
    }
}

/// The child's body: runs only when re-executed by the parent test.
#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let dir = Path::new(&dir);
    let store = Arc::new(Store::open(dir).expect("open store"));
    let audit = Arc::new(AuditLog::open(dir).expect("open audit"));
    let pid = std::process::id();
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let (store, audit) = (store.clone(), audit.clone());
            std::thread::spawn(move || {
                let charges = charges();
                for i in 0.. {
                    let qid = format!("q-{pid}-{t}-{i}");
                    store
                        .check_and_spend(
                            &charges,
                            phm_policies::Spend {
                                epsilon: EPS,
                                ..phm_policies::Spend::ZERO
                            },
                            1e-9,
                        )
                        .expect("spend");
                    store
                        .store_release(
                            &QueryKey {
                                requester_id: "dsu",
                                query_id: &qid,
                            },
                            &format!("digest-{qid}"),
                            "",
                            answer(&qid),
                        )
                        .expect("cache");
                    audit.append(&record(&qid)).expect("audit");
                    let mut out = std::io::stdout().lock();
                    writeln!(out, "RELEASED {qid}").expect("stdout");
                    out.flush().expect("flush");
                }
            })
        })
        .collect();
    for t in threads {
        let _ = t.join();
    }
}

#[test]
fn kill9_mid_burst_never_undercounts() {
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut released: Vec<String> = Vec::new();
    for (round, wanted) in [5usize, 40, 1, 120].into_iter().enumerate() {
        let mut child = Command::new(&exe)
            .args([
                "--exact",
                "crash::crash_child",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if let Some(qid) = line.strip_prefix("RELEASED ") {
                    let _ = tx.send(qid.to_string());
                }
            }
        });
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut this_round = Vec::new();
        while this_round.len() < wanted && Instant::now() < deadline {
            if let Ok(qid) = rx.recv_timeout(Duration::from_millis(100)) {
                this_round.push(qid);
            }
        }
        assert!(
            this_round.len() >= wanted,
            "round {round}: the child released only {} answers",
            this_round.len()
        );
        child.kill().unwrap(); // SIGKILL, mid-burst
        child.wait().unwrap();
        reader.join().unwrap();
        // Everything printed before death reached the "client" too.
        this_round.extend(rx.try_iter());
        let n_round = this_round.len();
        released.extend(this_round);

        let report = verify_log(&dir.path().join("audit.log"))
            .unwrap_or_else(|e| panic!("round {round}: audit chain broken after kill -9: {e}"));
        let store = Store::open(dir.path()).unwrap();
        let spent = store.spent(&charges()[0].key()).unwrap().epsilon;
        let project = store.spent(&charges()[1].key()).unwrap().epsilon;
        assert_eq!(
            spent.to_bits(),
            project.to_bits(),
            "the two ledgers diverged"
        );
        let owed = released.len() as f64 * EPS;
        assert!(
            spent >= owed - 1e-9,
            "round {round}: ledger says {spent} spent but answers costing {owed} were released"
        );
        assert!(report.entries as usize >= released.len());
        for qid in &released {
            assert_eq!(
                store
                    .cached_release(
                        &QueryKey {
                            requester_id: "dsu",
                            query_id: qid,
                        },
                        &format!("digest-{qid}"),
                        "",
                    )
                    .unwrap(),
                CacheLookup::Hit(answer(qid)),
                "round {round}: released answer {qid} missing from the cache"
            );
        }
        eprintln!(
            "round {round}: killed after {n_round} answers; {} released in all, ledger {spent:.2}, audit {} entries",
            released.len(),
            report.entries
        );
    }
}
