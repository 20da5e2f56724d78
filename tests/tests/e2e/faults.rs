//! Faults that must not lose data or release an unrecorded answer: kill -9 during a
//! burst, a coordinator crash mid-query, unreachable and stopped nodes, a node that can
//! no longer write to disk, and damaged state or policy files at start-up.

// Test code: a panic with a message is how a set-up failure is reported.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use crate::rt;
use phm_e2e::client::{self, body, count, sign};
use phm_e2e::{
    Federation, Ics, NodeExt, Restart, RunningNode, StartOutcome, audit_verify, set_budget,
};
use phm_proto::proto;
use phm_proto::{GroupKey, Purpose, QueryBody};
use rand::{Rng, SeedableRng};
use std::path::Path;
use std::time::{Duration, Instant};

const DATASET: &str = "gp_patients";
/// Longest a Submit may take before the test calls the coordinator hung.
const SUBMIT_LIMIT: Duration = Duration::from_secs(60);

fn planning(epsilon: f64) -> QueryBody {
    body(
        "dsu",
        Purpose::Planning,
        DATASET,
        vec![GroupKey::Column("imd_quintile".into())],
        vec![count("patients")],
        None,
        epsilon,
    )
}

fn gp_ids(ics: &Ics, n: usize) -> Vec<String> {
    let ids: Vec<String> = ics.nodes_serving(DATASET).into_iter().take(n).collect();
    assert_eq!(ids.len(), n, "the synthetic ICS needs {n} GP practices");
    ids
}

/// A seed printed with every randomised test, so a failure can be replayed.
fn seed() -> u64 {
    let s = std::env::var("PHM_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        });
    eprintln!("fault seed: {s} (set PHM_FAULT_SEED={s} to replay)");
    s
}

async fn dsu_spent(node: &RunningNode, certs: &Path, key: &ed25519_dalek::SigningKey) -> f64 {
    let ch = client::channel(&node.endpoint(), certs, Some("dsu-client"))
        .await
        .expect("channel to node");
    let b = tokio::time::timeout(
        Duration::from_secs(30),
        client::node_budget(ch, "dsu", None, key),
    )
    .await
    .unwrap_or_else(|_| panic!("node {} Budget RPC hung for 30 s", node.id))
    .unwrap_or_else(|e| panic!("node {} Budget RPC: {e:?}", node.id));
    client::ledger(&b, "requester:dsu")
        .map(|l| l.epsilon_spent)
        .unwrap_or_else(|| panic!("no requester:dsu ledger in {b:?}"))
}

/// kill -9 at random moments in bursts of concurrent queries. After each restart the
/// ledger covers at least every answer a client received, the audit chain verifies,
/// and answers released before the crash are served again, identical, from the cache.
#[test]
fn kill9_during_bursts_never_undercounts_and_keeps_releases() {
    const ROUNDS: usize = 4;
    const BURST: usize = 40;
    const EPS: f64 = 0.05;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let ics = Ics::synth(20_000, 901);
    let id = gp_ids(&ics, 1).remove(0);
    set_budget(&ics.policy_path(&id), "requesters", "dsu", 1000.0, 1.0);
    let mut fed = Federation::start_nodes(ics, std::slice::from_ref(&id), false);
    let certs = fed.ics.certs();
    let dsu = client::load_key(&fed.ics.key("dsu"));
    let mut received: Vec<(proto::AggregateQuery, proto::AggregateResult)> = Vec::new();

    for round in 0..ROUNDS {
        // Kill after a random number of answers has reached the client, plus a random
        // few milliseconds: the rest of the burst is then somewhere between decision,
        // spend, noise, cache and reply.
        let kill_after = rng.gen_range(1..BURST / 2);
        let extra = Duration::from_millis(rng.gen_range(0..30));
        let node = fed.node(&id);
        let got = rt().block_on(async {
            let ch = client::channel(&node.endpoint(), &certs, Some("dsu-client"))
                .await
                .expect("mTLS channel");
            let mut set = tokio::task::JoinSet::new();
            for _ in 0..BURST {
                let q = sign(planning(EPS), &dsu);
                let ch = ch.clone();
                set.spawn(async move {
                    let r = client::node_query_within(ch, q.clone(), Duration::from_secs(60)).await;
                    (q, r)
                });
            }
            let mut got = Vec::new();
            let mut killed = false;
            while let Some(r) = set.join_next().await {
                if let Ok((q, Ok(a))) = r {
                    got.push((q, a));
                }
                if !killed && got.len() >= kill_after {
                    tokio::time::sleep(extra).await;
                    node.proc.kill9();
                    killed = true;
                }
            }
            if !killed {
                node.proc.kill9();
            }
            got
        });
        eprintln!(
            "round {round}: killed after {kill_after} answers + {extra:?}; {} of {BURST} \
             answers received in all",
            got.len()
        );
        received.extend(got);
        let node = fed.node(&id);
        node.restart();
        let spent = rt().block_on(dsu_spent(node, &certs, &dsu));
        let released: f64 = received.iter().map(|(_, a)| a.epsilon_spent).sum();
        assert!(
            spent >= released - 1e-9,
            "round {round}: after kill -9 the ledger says {spent} spent, but answers \
             costing {released} had reached the client (under-count)"
        );
        let (code, out) = audit_verify(&node.data_dir());
        assert_eq!(
            code, 0,
            "round {round}: audit chain broken after kill -9: {out}"
        );
    }
    assert!(
        !received.is_empty(),
        "no answer was received in any round; the test proved nothing (seed above)"
    );

    // Released answers survive the crashes: the same signed query gets the same
    // answer from the cache, with no new spend.
    let node = fed.node(&id);
    rt().block_on(async {
        let before = dsu_spent(node, &certs, &dsu).await;
        let ch = client::channel(&node.endpoint(), &certs, Some("dsu-client"))
            .await
            .expect("mTLS channel");
        for (i, (q, first)) in received.iter().enumerate().step_by(7) {
            let again = client::node_query_within(ch.clone(), q.clone(), Duration::from_secs(60))
                .await
                .unwrap_or_else(|e| panic!("released answer {i} lost after crash: {e:?}"));
            assert!(again.cached, "answer {i} must come from the release cache");
            assert_eq!(again.rows, first.rows, "answer {i} changed after the crash");
        }
        let after = dsu_spent(node, &certs, &dsu).await;
        assert!(
            (after - before).abs() < 1e-12,
            "re-sent queries spent again ({before} → {after})"
        );
    });
    let code = node.proc.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "clean shutdown after the crash rounds");
    let (code, out) = audit_verify(&node.data_dir());
    assert_eq!(code, 0, "audit chain after shutdown: {out}");
}

/// The coordinator dies mid-Submit and the analyst resubmits: nodes answer from
/// their caches and nobody spends twice. A dead node is reported unreachable; a
/// stopped node is reported timed out within the deadline while the others answer.
#[test]
fn coordinator_crash_and_dead_or_stopped_nodes_are_reported_without_double_spend() {
    const EPS: f64 = 0.1;
    const DEADLINE_MS: u64 = 3_000;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed());
    let ics = Ics::synth(20_000, 902);
    let ids = gp_ids(&ics, 3);
    phm_e2e::edit_toml(&ics.coordinator_config(), |t| {
        t.insert("node_deadline_ms".into(), (DEADLINE_MS as i64).into());
    });
    let mut fed = Federation::start_nodes(ics, &ids, true);
    let certs = fed.ics.certs();
    let dsu = client::load_key(&fed.ics.key("dsu"));
    let outcome = |p: &[proto::NodeProgress], id: &str| {
        p.iter()
            .find(|e| e.node.as_ref().is_some_and(|n| n.node_id == id))
            .map(|e| e.outcome)
    };

    // 1. SIGKILL the coordinator during a Submit, restart it, resubmit.
    let question = planning(EPS);
    let q = sign(question.clone(), &dsu);
    // Kill it the moment the first node's answer is relayed (plus a random few ms):
    // one node has answered and spent, the others are in flight or answered too.
    let extra = Duration::from_millis(rng.gen_range(0..20));
    let url = fed.coordinator_url();
    let coordinator = fed.coordinator.as_mut().expect("coordinator");
    rt().block_on(async {
        let ch = client::channel(&url, &certs, Some("dsu-client"))
            .await
            .expect("coordinator channel");
        let mut c = proto::coordinator_service_client::CoordinatorServiceClient::new(ch);
        let mut stream = c
            .submit(proto::SubmitRequest {
                query: Some(q.clone()),
            })
            .await
            .expect("submit accepted")
            .into_inner();
        let first = tokio::time::timeout(SUBMIT_LIMIT, stream.message())
            .await
            .expect("a first progress event");
        tokio::time::sleep(extra).await;
        coordinator.proc.kill9();
        eprintln!("coordinator killed {extra:?} after the first event: {first:?}");
        assert!(
            matches!(first, Ok(Some(_))),
            "set-up: the first Submit produced no event before the kill"
        );
    });
    coordinator.restart();
    let before: Vec<f64> = rt().block_on(async {
        let mut v = Vec::new();
        for n in &fed.nodes {
            v.push(dsu_spent(n, &certs, &dsu).await);
        }
        v
    });
    assert!(
        before.iter().any(|s| *s > 0.0),
        "set-up: no node had answered before the coordinator was killed"
    );
    for (n, s) in fed.nodes.iter().zip(&before) {
        assert!(
            *s <= EPS + 1e-9,
            "node {} spent {s} on one query before the resubmit",
            n.id
        );
    }
    rt().block_on(async {
        let ch = client::channel(&url, &certs, Some("dsu-client"))
            .await
            .expect("coordinator channel after restart");
        // The analyst resubmits as `phm query --query-id` does: the same question,
        // re-signed with a fresh nonce (the coordinator refuses an exact replay).
        let mut again = question.clone();
        again.nonce = client::nonce();
        again.issued_at_unix_ms = client::now_ms();
        let (progress, result) = client::submit_within(ch, sign(again, &dsu), SUBMIT_LIMIT)
            .await
            .expect("the resubmitted query is answered");
        let result = result.expect("a combined result after the resubmit");
        let cov = result.coverage.expect("coverage");
        assert_eq!(
            cov.answered.len(),
            3,
            "every node answers the resubmit: {progress:?}"
        );
        for n in &fed.nodes {
            let s = dsu_spent(n, &certs, &dsu).await;
            assert!(
                (s - EPS).abs() < 1e-9,
                "node {}: one query, resubmitted after a coordinator crash, must be \
                 charged exactly once ({EPS}); ledger says {s}",
                n.id
            );
        }
    });

    // 2. A node killed: unreachable, the others answer, coverage says partial.
    let dead = ids[2].clone();
    fed.node(&dead).proc.kill9();
    rt().block_on(async {
        let ch = client::channel(&url, &certs, Some("dsu-client"))
            .await
            .expect("coordinator channel");
        let (progress, result) = client::submit_within(ch, sign(planning(EPS), &dsu), SUBMIT_LIMIT)
            .await
            .expect("submit with one node down");
        assert_eq!(
            outcome(&progress, &dead),
            Some(proto::NodeOutcome::Unreachable as i32),
            "dead node must be UNREACHABLE: {progress:?}"
        );
        for id in &ids[..2] {
            assert_eq!(
                outcome(&progress, id),
                Some(proto::NodeOutcome::Answered as i32),
                "node {id} must answer: {progress:?}"
            );
        }
        let cov = result.expect("partial result").coverage.expect("coverage");
        assert!(cov.partial, "coverage must say partial");
        assert!(cov.unreachable.iter().any(|n| n.node_id == dead));
    });
    fed.node(&dead).restart();

    // 3. A node stopped (SIGSTOP): timed out within the deadline, others answer.
    let slow = ids[1].clone();
    fed.node(&slow).proc.signal("STOP");
    let elapsed = rt().block_on(async {
        let ch = client::channel(&url, &certs, Some("dsu-client"))
            .await
            .expect("coordinator channel");
        let start = Instant::now();
        let (progress, result) = client::submit_within(ch, sign(planning(EPS), &dsu), SUBMIT_LIMIT)
            .await
            .expect("submit with one node stopped");
        let elapsed = start.elapsed();
        assert_eq!(
            outcome(&progress, &slow),
            Some(proto::NodeOutcome::TimedOut as i32),
            "stopped node must be TIMED_OUT: {progress:?}"
        );
        for id in [&ids[0], &ids[2]] {
            assert_eq!(
                outcome(&progress, id),
                Some(proto::NodeOutcome::Answered as i32),
                "node {id} must answer while {slow} is stopped: {progress:?}"
            );
        }
        let cov = result.expect("partial result").coverage.expect("coverage");
        assert!(cov.partial && cov.timed_out.iter().any(|n| n.node_id == slow));
        elapsed
    });
    fed.node(&slow).proc.signal("CONT");
    let margin = Duration::from_millis(3_000);
    assert!(
        elapsed <= Duration::from_millis(DEADLINE_MS) + margin,
        "a stopped node held the answer for {elapsed:?}, deadline {DEADLINE_MS} ms + {margin:?}"
    );
    // Continued, it serves again.
    rt().block_on(async {
        let ch = client::channel(&url, &certs, Some("dsu-client"))
            .await
            .expect("coordinator channel");
        let (progress, _) = client::submit_within(ch, sign(planning(EPS), &dsu), SUBMIT_LIMIT)
            .await
            .expect("submit after SIGCONT");
        assert_eq!(
            outcome(&progress, &slow),
            Some(proto::NodeOutcome::Answered as i32),
            "the continued node answers again: {progress:?}"
        );
    });
}

/// What happened when a running node's disk stopped accepting writes.
struct DiskFailure {
    fed: Federation,
    id: String,
    /// Epsilon the ledger showed before the failure.
    spent_before: f64,
    /// Each query sent while writes failed: what the client got.
    during: Vec<Result<proto::AggregateResult, tonic::Status>>,
    /// After writes work again: the Budget RPC's spent, or why it failed.
    after_restore: Result<f64, tonic::Status>,
    /// After writes work again: a new query's outcome.
    query_after_restore: Result<proto::AggregateResult, tonic::Status>,
}

/// Node query deadline used in the disk-failure scenario (node.toml `[limits]`).
const DISK_QUERY_DEADLINE: Duration = Duration::from_secs(5);
/// Storage watchdog in the disk-failure scenario: a write hanging this long stops the
/// node (the default, 15 s, would only make the test slower).
const DISK_STORAGE_TIMEOUT: Duration = Duration::from_secs(3);

/// Start one node, let it answer, then make every file write fail, query it, and
/// let writes work again.
///
/// Mechanism: RLIMIT_FSIZE lowered to 1 byte on the running node (`prlimit`). Every
/// write at an offset past the limit then fails with EFBIG, for root too (it is a
/// resource limit, not a permission), on files already open. The node is started with
/// SIGXFSZ ignored so the failing write returns an error instead of killing it.
/// (Replacing audit.log with a directory, or chmod, does not work: the node holds the
/// file open, and root ignores permissions.)
fn disk_failure(synth_seed: u64) -> DiskFailure {
    let ics = Ics::synth(20_000, synth_seed);
    let id = gp_ids(&ics, 1).remove(0);
    phm_e2e::edit_toml(&ics.node_config(&id), |t| {
        let limits = t
            .entry("limits")
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if let Some(l) = limits.as_table_mut() {
            l.insert(
                "query_deadline_ms".into(),
                (DISK_QUERY_DEADLINE.as_millis() as i64).into(),
            );
            l.insert(
                "storage_timeout_ms".into(),
                (DISK_STORAGE_TIMEOUT.as_millis() as i64).into(),
            );
        }
    });
    let mut fed = Federation::start_nodes(ics, std::slice::from_ref(&id), false);
    let certs = fed.ics.certs();
    let dsu = client::load_key(&fed.ics.key("dsu"));
    let node = fed.node(&id);
    node.proc.terminate(Duration::from_secs(30));
    node.restart_ignoring_signals(&["XFSZ"]);
    let pid = node.proc.pid().to_string();
    let limit = DISK_QUERY_DEADLINE + Duration::from_secs(10);

    let answered_before = rt().block_on(async {
        let ch = client::channel(&node.endpoint(), &certs, Some("dsu-client"))
            .await
            .expect("mTLS channel");
        client::node_query_within(ch, sign(planning(0.1), &dsu), limit)
            .await
            .expect("answers while the disk works")
            .epsilon_spent
    });
    let spent_before = rt().block_on(dsu_spent(node, &certs, &dsu));
    assert!(spent_before >= answered_before - 1e-9);

    let (code, out, err) = phm_e2e::run(Path::new("prlimit"), &["--pid", &pid, "--fsize=1:"]);
    assert_eq!(code, 0, "prlimit failed: {out}{err}");
    let during = rt().block_on(async {
        let ch = client::channel(&node.endpoint(), &certs, Some("dsu-client"))
            .await
            .expect("mTLS channel");
        let mut results = Vec::new();
        for _ in 0..3 {
            results.push(
                client::node_query_within(ch.clone(), sign(planning(0.1), &dsu), limit).await,
            );
        }
        results
    });
    let (code, out, err) =
        phm_e2e::run(Path::new("prlimit"), &["--pid", &pid, "--fsize=unlimited:"]);
    assert!(
        code == 0 || !node.proc.is_running(),
        "prlimit restore failed: {out}{err}"
    );
    let (after_restore, query_after_restore) = rt().block_on(async {
        let ch = client::channel(&node.endpoint(), &certs, Some("dsu-client")).await;
        let Ok(ch) = ch else {
            let e = tonic::Status::unavailable("cannot connect after the disk recovered");
            return (Err(e.clone()), Err(e));
        };
        let budget =
            match tokio::time::timeout(limit, client::node_budget(ch.clone(), "dsu", None, &dsu))
                .await
            {
                Err(_) => Err(tonic::Status::deadline_exceeded(format!(
                    "Budget RPC did not answer within {limit:?}"
                ))),
                Ok(Err(e)) => Err(e),
                Ok(Ok(b)) => client::ledger(&b, "requester:dsu")
                    .map(|l| l.epsilon_spent)
                    .ok_or_else(|| tonic::Status::not_found("no requester:dsu ledger")),
            };
        let q = client::node_query_within(ch, sign(planning(0.1), &dsu), limit).await;
        (budget, q)
    });
    DiskFailure {
        fed,
        id,
        spent_before,
        during,
        after_restore,
        query_after_restore,
    }
}

/// A node whose disk refuses writes must refuse to answer: an answer may only leave
/// after its spend and audit entry are on disk. Afterwards the state on disk is
/// intact and the node starts again from it.
#[test]
fn a_node_that_cannot_persist_refuses_to_answer() {
    let mut d = disk_failure(903);
    for (i, r) in d.during.iter().enumerate() {
        match r {
            Ok(a) => panic!(
                "query {i}: answered (epsilon {}) although nothing could be written to disk",
                a.epsilon_spent
            ),
            Err(e) => {
                assert_ne!(
                    e.code(),
                    tonic::Code::DeadlineExceeded,
                    "query {i}: the node neither answered nor refused within its own \
                     query deadline {DISK_QUERY_DEADLINE:?} + 10 s: {e:?}"
                );
                eprintln!("query {i} while the disk fails: {e:?}");
            }
        }
    }
    let certs = d.fed.ics.certs();
    let dsu = client::load_key(&d.fed.ics.key("dsu"));
    let node = d.fed.node(&d.id);
    // Whatever state the process is in, stop it hard, as a supervisor would.
    node.proc.kill9();
    let (code, out) = audit_verify(&node.data_dir());
    assert_eq!(code, 0, "audit chain after write failures: {out}");
    match node.try_restart(Duration::from_secs(120)) {
        StartOutcome::Listening => {
            let spent = rt().block_on(dsu_spent(node, &certs, &dsu));
            assert!(
                spent >= d.spent_before - 1e-9,
                "ledger went backwards: {} → {spent}",
                d.spent_before
            );
        }
        StartOutcome::Exited { code, log } => {
            panic!("node cannot restart after write failures ({code:?}):\n{log}")
        }
    }
}

/// Once the disk accepts writes again, the node either serves again (with a ledger
/// that never went backwards) or has exited so a supervisor can restart it; it must
/// not sit wedged, accepting connections and answering nothing.
#[test]
fn a_node_recovers_or_exits_when_its_disk_recovers() {
    let mut d = disk_failure(905);
    let node = d.fed.node(&d.id);
    // A node that stops on the failure may still be finishing; one that keeps running
    // must be serving properly by the end of this wait.
    if let Some(code) = node.proc.wait_exit(Duration::from_secs(20)) {
        // Exit status 1, the node's own error exit: not 0 (a supervisor's
        // Restart=on-failure would not restart it), not 101 (a panic), not a signal.
        // Its log cannot say why here: RLIMIT_FSIZE stops it writing its log file too.
        let log = node.proc.log_text();
        assert_eq!(
            code,
            Some(1),
            "the node stopped after a storage failure with the wrong status:\n{log}"
        );
        return;
    }
    let spent = d
        .after_restore
        .as_ref()
        .unwrap_or_else(|e| panic!("the disk works again but the node's Budget RPC fails: {e:?}"));
    assert!(
        *spent >= d.spent_before - 1e-9,
        "ledger went backwards: {} → {spent}",
        d.spent_before
    );
    let q = d.query_after_restore.as_ref();
    assert!(
        q.is_ok(),
        "the disk works again but the node does not answer a good query: {q:?}"
    );
}

fn copy_dir(from: &Path, to: &Path) {
    let (code, out, err) = phm_e2e::run(
        Path::new("cp"),
        &["-a", &from.display().to_string(), &to.display().to_string()],
    );
    assert_eq!(code, 0, "cp -a failed: {out}{err}");
}

fn overwrite(path: &Path, offset: u64, bytes: &[u8]) {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    f.seek(SeekFrom::Start(offset)).expect("seek");
    f.write_all(bytes).expect("write");
    f.sync_all().expect("sync");
}

fn garbage(n: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(42);
    (0..n).map(|_| rng.r#gen::<u8>()).collect()
}

/// Damaged files at start-up: the node refuses to start and says which file and why;
/// for damage sled cannot detect, it must at least never under-count the ledger.
#[test]
fn damaged_state_or_policy_stops_the_node_with_a_reason() {
    let ics = Ics::synth(20_000, 904);
    let id = gp_ids(&ics, 1).remove(0);
    let mut fed = Federation::start_nodes(ics, std::slice::from_ref(&id), false);
    let certs = fed.ics.certs();
    let dsu = client::load_key(&fed.ics.key("dsu"));
    let node = fed.node(&id);
    rt().block_on(async {
        let ch = client::channel(&node.endpoint(), &certs, Some("dsu-client"))
            .await
            .expect("mTLS channel");
        for _ in 0..6 {
            client::node_query(ch.clone(), sign(planning(0.05), &dsu))
                .await
                .expect("answered");
        }
    });
    let spent = rt().block_on(dsu_spent(node, &certs, &dsu));
    assert!(spent > 0.0);
    assert_eq!(node.proc.terminate(Duration::from_secs(30)), Some(0));

    let data_dir = node.data_dir();
    let policy = node.policy_path();
    let backup = tempfile::tempdir().expect("tempdir");
    let state_backup = backup.path().join("state");
    copy_dir(&data_dir, &state_backup);
    let policy_text = std::fs::read_to_string(&policy).expect("policy");
    let restore = |data_dir: &Path, policy: &Path| {
        let _ = std::fs::remove_dir_all(data_dir);
        let _ = std::fs::remove_file(data_dir);
        copy_dir(&state_backup, data_dir);
        std::fs::write(policy, &policy_text).expect("restore policy");
    };
    let audit = data_dir.join("audit.log");
    let sled_dir = data_dir.join("ledger.sled");

    type Damage = Box<dyn Fn(&Path, &Path)>;
    // (name, damage, words the log must contain; None = may start if no under-count)
    let cases: Vec<(&str, Damage, Option<Vec<&str>>)> = vec![
        (
            "policy file is not TOML",
            Box::new(|_, p| std::fs::write(p, "version = 1\n[organisation\n").expect("write")),
            Some(vec!["policy.toml"]),
        ),
        (
            "policy rule misspelt",
            Box::new({
                let text = policy_text.clone();
                move |_, p| {
                    std::fs::write(
                        p,
                        format!("{text}\n[release]\nper_query_epsilon_capp = 5.0\n"),
                    )
                    .expect("write")
                }
            }),
            Some(vec!["policy.toml"]),
        ),
        (
            "identifier column marked filterable and groupable (IG lead's slip)",
            Box::new({
                let text = policy_text.clone();
                move |_, p| {
                    let mut t: toml::Table = text.parse().expect("policy TOML");
                    let mut marked = false;
                    if let Some(toml::Value::Array(ds)) = t.get_mut("datasets") {
                        for d in ds.iter_mut() {
                            if let Some(toml::Value::Array(cs)) = d.get_mut("columns") {
                                for c in cs.iter_mut().filter(|c| {
                                    c.get("name").and_then(toml::Value::as_str)
                                        == Some("nhs_number")
                                }) {
                                    if let Some(c) = c.as_table_mut() {
                                        c.insert("filter".into(), true.into());
                                        c.insert("group".into(), "threshold".into());
                                        marked = true;
                                    }
                                }
                            }
                        }
                    }
                    assert!(marked, "set-up: no nhs_number column to mark");
                    std::fs::write(p, toml::to_string(&t).unwrap_or_default()).expect("write");
                }
            }),
            Some(vec!["nhs_number"]),
        ),
        (
            "policy file missing",
            Box::new(|_, p| std::fs::remove_file(p).expect("remove")),
            Some(vec!["policy.toml"]),
        ),
        (
            "audit entry edited (epsilon lowered)",
            Box::new({
                let audit = audit.clone();
                move |_, _| {
                    let text = std::fs::read_to_string(&audit).expect("audit");
                    let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
                    let i = lines.len() / 2;
                    let line = &lines[i];
                    let edited = line.replacen("0.05", "0.01", 1);
                    let edited = if edited == *line {
                        line.replacen("\"seq\"", "\"seq \"", 1)
                    } else {
                        edited
                    };
                    assert_ne!(&edited, line, "set-up: audit line not altered");
                    lines[i] = edited;
                    std::fs::write(&audit, lines.join("\n") + "\n").expect("write");
                }
            }),
            Some(vec!["audit"]),
        ),
        (
            "audit entry deleted from the middle",
            Box::new({
                let audit = audit.clone();
                move |_, _| {
                    let text = std::fs::read_to_string(&audit).expect("audit");
                    let mut lines: Vec<&str> = text.lines().collect();
                    assert!(lines.len() >= 3, "set-up: audit log too short");
                    lines.remove(lines.len() / 2);
                    std::fs::write(&audit, lines.join("\n") + "\n").expect("write");
                }
            }),
            Some(vec!["audit"]),
        ),
        (
            "sled config file overwritten",
            Box::new({
                let conf = sled_dir.join("conf");
                move |_, _| {
                    let len = std::fs::metadata(&conf).map(|m| m.len()).unwrap_or(64);
                    overwrite(&conf, 0, &garbage(len.max(16) as usize));
                }
            }),
            Some(vec!["ledger.sled"]),
        ),
        (
            "data_dir is a file",
            Box::new(|d, _| {
                std::fs::remove_dir_all(d).expect("remove");
                std::fs::write(d, "not a folder").expect("write");
            }),
            Some(vec!["state"]),
        ),
        (
            "sled db header overwritten",
            Box::new({
                let db = sled_dir.join("db");
                move |_, _| overwrite(&db, 0, &garbage(4096))
            }),
            None,
        ),
        (
            "sled db entirely overwritten",
            Box::new({
                let db = sled_dir.join("db");
                move |_, _| {
                    let len = std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
                    overwrite(&db, 0, &garbage(len as usize));
                }
            }),
            None,
        ),
    ];

    let mut findings = Vec::new();
    for (name, damage, expect) in cases {
        restore(&data_dir, &policy);
        damage(&data_dir, &policy);
        let node = fed.node(&id);
        match (node.try_restart(Duration::from_secs(120)), expect) {
            (StartOutcome::Exited { code, log }, Some(words)) => {
                assert!(
                    code.is_some_and(|c| c != 0),
                    "{name}: must exit non-zero, exited {code:?}"
                );
                for w in words {
                    assert!(
                        log.contains(w),
                        "{name}: the log must say what is wrong (mention {w:?}):\n{log}"
                    );
                }
            }
            (StartOutcome::Exited { code, log }, None) => {
                assert!(
                    code.is_some_and(|c| c != 0),
                    "{name}: must exit non-zero, exited {code:?}"
                );
                assert!(
                    log.contains("ledger") || log.contains("sled") || log.contains("database"),
                    "{name}: the log must name the database:\n{log}"
                );
            }
            (StartOutcome::Listening, Some(_)) => {
                let log = node.proc.log_text();
                node.proc.kill9();
                findings.push(format!("{name}: the node started anyway; log:\n{log}"));
            }
            (StartOutcome::Listening, None) => {
                let now = rt().block_on(dsu_spent(node, &certs, &dsu));
                node.proc.kill9();
                if now < spent - 1e-9 {
                    findings.push(format!(
                        "{name}: the node started with the ledger under-counted \
                         ({spent} spent before, {now} after)"
                    ));
                }
            }
        }
    }
    assert!(findings.is_empty(), "{}", findings.join("\n\n"));
}
