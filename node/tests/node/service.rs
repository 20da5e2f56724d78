//! The domain service over a real engine, policy and CSV fixture: answers, the release
//! cache, every authentication and freshness refusal, policy and budget refusals,
//! concurrency against the ledger, deadlines, overload, Describe, Budget, hot reload,
//! and that every decision is in a verifiable audit log.
// Helpers outside #[test] functions panic on broken fixtures too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::*;
use phm_node::audit::verify_log;
use phm_node::reload::{ReloadOutcome, reload};
use phm_node::service::ServiceLimits;
use phm_policies::model::{Grouping, Period};
use phm_proto::{DenialReason, GroupKey, ProofOp, Purpose, RequesterProof};
use std::time::Duration;

fn dsu_key() -> String {
    format!("requester:dsu/{}", period_label_now(Period::Month))
}

fn audit_lines(f: &Fixture) -> Vec<serde_json::Value> {
    std::fs::read_to_string(f.data_dir.join("audit.log"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_then_serves_the_identical_release_from_the_cache() {
    let f = fixture(10.0);
    let svc = service(&f, limits()).await;
    let signed = sign(count_by_imd("dsu", 0.25), &f.dsu);
    let first = svc
        .query(signed.clone(), "CN=test", chrono::Utc::now())
        .await
        .unwrap();
    assert!(!first.cached);
    assert_eq!(first.release.rows.len(), 5, "every declared quintile");
    assert!(first.release.epsilon_spent > 0.0 && first.release.epsilon_spent <= 0.25 + 1e-12);
    assert_eq!(first.node_id, "A81001");
    assert_eq!(first.population_noisy, 240.0);
    assert!((first.epsilon_remaining - 9.75).abs() < 1e-9);
    assert_eq!(svc.store().spent(&dsu_key()).unwrap().epsilon, 0.25);

    // The same signed query, even later: identical answer, no new spend.
    let later = chrono::Utc::now() + chrono::Duration::hours(2);
    let again = svc.query(signed.clone(), "CN=test", later).await.unwrap();
    assert!(again.cached);
    assert_eq!(again.release, first.release);
    assert_eq!(again.epsilon_remaining, first.epsilon_remaining);
    assert_eq!(svc.store().spent(&dsu_key()).unwrap().epsilon, 0.25);

    // Same id, different question: refused.
    let mut other = signed.body.clone();
    other.group_by = vec![GroupKey::Column("sex".into())];
    other.nonce = nonce();
    let e = svc
        .query(sign(other, &f.dsu), "CN=test", chrono::Utc::now())
        .await
        .unwrap_err();
    assert_eq!(e.reason, DenialReason::QueryIdReused);

    let lines = audit_lines(&f);
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["decision"], "allowed");
    assert_eq!(lines[0]["epsilon_spent"], 0.25);
    assert_eq!(lines[0]["client_identity"], "CN=test");
    assert_eq!(lines[0]["query_digest"], signed.body.digest());
    assert!(
        lines[0]["sql"]
            .as_str()
            .unwrap()
            .contains("GROUP BY imd_quintile")
    );
    assert_eq!(lines[1]["cached"], true);
    assert_eq!(lines[1]["epsilon_spent"], 0.0);
    assert_eq!(lines[2]["reason"], "QUERY_ID_REUSED");
    assert_eq!(
        verify_log(&f.data_dir.join("audit.log")).unwrap().entries,
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn authentication_freshness_and_replay_refusals_are_audited() {
    let f = fixture(10.0);
    let svc = service(&f, limits()).await;
    let now = chrono::Utc::now();
    let peer = "CN=coordinator";

    let mut unsigned = sign(count_by_imd("dsu", 0.1), &f.dsu);
    unsigned.signature.clear();
    let mut tampered = sign(count_by_imd("dsu", 0.1), &f.dsu);
    tampered.body.epsilon = 0.9;
    let mut stale = count_by_imd("dsu", 0.1);
    stale.issued_at_unix_ms -= 3_600_000;
    let mut future = count_by_imd("dsu", 0.1);
    future.issued_at_unix_ms += 3_600_000;
    let cases = vec![
        ("unsigned", unsigned, DenialReason::Unauthenticated),
        ("tampered", tampered, DenialReason::Unauthenticated),
        (
            "signed with another key",
            sign(count_by_imd("dsu", 0.1), &f.researcher),
            DenialReason::Unauthenticated,
        ),
        (
            "unknown requester",
            sign(count_by_imd("mallory", 0.1), &f.dsu),
            DenialReason::Unauthenticated,
        ),
        (
            "revoked requester",
            sign(count_by_imd("gone", 0.1), &f.gone),
            DenialReason::Unauthenticated,
        ),
        ("stale", sign(stale, &f.dsu), DenialReason::Stale),
        ("from the future", sign(future, &f.dsu), DenialReason::Stale),
    ];
    let n = cases.len();
    for (name, q, reason) in cases {
        let e = svc.query(q, peer, now).await.unwrap_err();
        assert_eq!(e.reason, reason, "{name}: {e}");
        assert!(!e.message.is_empty());
        assert!(!e.policy_version.is_empty(), "{name}: names the policy");
    }
    let revoked_msg = svc
        .query(sign(count_by_imd("gone", 0.1), &f.gone), peer, now)
        .await
        .unwrap_err()
        .message;
    assert!(revoked_msg.contains("revoked"), "{revoked_msg}");

    // A fresh query is answered; its nonce under a new id is a replay.
    let q = count_by_imd("dsu", 0.1);
    svc.query(sign(q.clone(), &f.dsu), peer, now).await.unwrap();
    let mut replay = q.clone();
    replay.query_id = new_id();
    let e = svc
        .query(sign(replay, &f.dsu), peer, now)
        .await
        .unwrap_err();
    assert_eq!(e.reason, DenialReason::Replayed);

    // Nothing but the one answer spent budget; every decision is audited.
    assert!((svc.store().spent(&dsu_key()).unwrap().epsilon - 0.1).abs() < 1e-12);
    let lines = audit_lines(&f);
    assert_eq!(lines.len(), n + 3);
    assert!(lines.iter().all(|l| l["client_identity"] == peer));
    let refused = lines.iter().filter(|l| l["decision"] == "refused").count();
    assert_eq!(refused, n + 2);
    verify_log(&f.data_dir.join("audit.log")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn policy_and_budget_refusals_name_their_reasons() {
    let f = fixture(0.5);
    let svc = service(&f, limits()).await;
    let now = chrono::Utc::now();

    let mut identifier = count_by_imd("dsu", 0.1);
    identifier.group_by = vec![GroupKey::Column("person_id".into())];
    identifier.epsilon = 5.0;
    let e = svc
        .query(sign(identifier, &f.dsu), "p", now)
        .await
        .unwrap_err();
    assert_eq!(e.reason, DenialReason::PolicyDenied);
    assert!(
        e.reasons.len() >= 2,
        "every reason is given: {:?}",
        e.reasons
    );
    let text = e.reasons.join(" ");
    assert!(text.contains("person_id"), "{text}");

    let mut research = count_by_imd("dsu", 0.1);
    research.purpose = Purpose::Research;
    let e = svc
        .query(sign(research, &f.dsu), "p", now)
        .await
        .unwrap_err();
    assert_eq!(e.reason, DenialReason::PolicyDenied);

    for _ in 0..2 {
        svc.query(sign(count_by_imd("dsu", 0.2), &f.dsu), "p", now)
            .await
            .unwrap();
    }
    let e = svc
        .query(sign(count_by_imd("dsu", 0.2), &f.dsu), "p", now)
        .await
        .unwrap_err();
    assert_eq!(e.reason, DenialReason::BudgetExhausted);
    assert!(e.message.contains("requester:dsu"), "{}", e.message);
    assert!(
        e.message.contains("0.1"),
        "says what is left: {}",
        e.message
    );
    // A query that still fits is answered.
    svc.query(sign(count_by_imd("dsu", 0.1), &f.dsu), "p", now)
        .await
        .unwrap();
    assert!((svc.store().spent(&dsu_key()).unwrap().epsilon - 0.5).abs() < 1e-12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_queries_never_overspend() {
    const N: usize = 240;
    let f = fixture(5.0);
    let svc = service(&f, limits()).await;
    let now = chrono::Utc::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..N {
        let svc = svc.clone();
        let q = sign(count_by_imd("dsu", 0.1), &f.dsu);
        tasks.spawn(async move { svc.query(q, "p", now).await });
    }
    let (mut answered, mut exhausted, mut released) = (0, 0, 0.0);
    while let Some(r) = tasks.join_next().await {
        match r.unwrap() {
            Ok(a) => {
                answered += 1;
                released += a.release.epsilon_spent;
            }
            Err(d) if d.reason == DenialReason::BudgetExhausted => exhausted += 1,
            Err(d) => panic!("unexpected refusal {d}"),
        }
    }
    let spent = svc.store().spent(&dsu_key()).unwrap().epsilon;
    assert_eq!(answered + exhausted, N);
    assert_eq!(answered, 50, "5.0 / 0.1 queries fit");
    assert!(spent <= 5.0 + 1e-9, "overspent: {spent}");
    assert!(released <= spent + 1e-9);
    assert_eq!(
        verify_log(&f.data_dir.join("audit.log")).unwrap().entries,
        N as u64
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_identical_queries_spend_once() {
    let f = fixture(10.0);
    let svc = service(&f, limits()).await;
    let q = sign(count_by_imd("dsu", 0.3), &f.dsu);
    let now = chrono::Utc::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (svc, q) = (svc.clone(), q.clone());
        tasks.spawn(async move { svc.query(q, "p", now).await.unwrap() });
    }
    let mut answers = Vec::new();
    while let Some(r) = tasks.join_next().await {
        answers.push(r.unwrap());
    }
    assert_eq!(answers.iter().filter(|a| !a.cached).count(), 1);
    assert!(answers.iter().all(|a| a.release == answers[0].release));
    assert!((svc.store().spent(&dsu_key()).unwrap().epsilon - 0.3).abs() < 1e-12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missed_deadline_keeps_the_spend_and_a_retry_gets_the_answer() {
    let f = fixture(10.0);
    let svc = service(
        &f,
        ServiceLimits {
            max_concurrent_queries: 4,
            query_deadline: Duration::from_micros(1),
            link_deadline: Duration::from_secs(600),
            storage_timeout: Duration::from_secs(60),
        },
    )
    .await;
    let q = sign(count_by_imd("dsu", 0.2), &f.dsu);
    let now = chrono::Utc::now();
    let e = svc.query(q.clone(), "p", now).await.unwrap_err();
    assert_eq!(e.reason, DenialReason::Unavailable);
    assert!(e.message.contains("deadline"), "{}", e.message);
    // The query finishes in the background; everything drains.
    assert!(svc.drain(Duration::from_secs(30)).await);
    assert!((svc.store().spent(&dsu_key()).unwrap().epsilon - 0.2).abs() < 1e-12);
    let lines = audit_lines(&f);
    assert!(lines.iter().any(|l| l["decision"] == "allowed"));
    assert!(lines.iter().any(|l| l["reason"] == "UNAVAILABLE"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_refused_at_once() {
    let f = fixture(10.0);
    let svc = service(
        &f,
        ServiceLimits {
            max_concurrent_queries: 2,
            query_deadline: Duration::from_secs(30),
            link_deadline: Duration::from_secs(600),
            storage_timeout: Duration::from_secs(60),
        },
    )
    .await;
    let held = svc.occupy_slots_for_tests(2).expect("two free slots");
    let started = std::time::Instant::now();
    let e = svc
        .query(
            sign(count_by_imd("dsu", 0.1), &f.dsu),
            "p",
            chrono::Utc::now(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.reason, DenialReason::Overloaded);
    assert!(started.elapsed() < Duration::from_secs(2), "never queued");
    drop(held);
    svc.query(
        sign(count_by_imd("dsu", 0.1), &f.dsu),
        "p",
        chrono::Utc::now(),
    )
    .await
    .unwrap();
}

fn proof(
    op: ProofOp,
    who: &str,
    project: Option<&str>,
    key: &ed25519_dalek::SigningKey,
) -> RequesterProof {
    RequesterProof::new(
        "ics-test",
        who,
        project.map(String::from),
        now_ms(),
        nonce(),
    )
    .sign(op, key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn describe_shows_only_what_the_requester_may_use() {
    let f = fixture(10.0);
    let svc = service(&f, limits()).await;
    let now = chrono::Utc::now();
    let d = svc
        .describe(proof(ProofOp::Describe, "dsu", None, &f.dsu), "p", now)
        .await
        .unwrap();
    assert_eq!(d.organisation.ods_code, "A81001");
    assert_eq!(d.datasets.len(), 1);
    let cols: Vec<&str> = d.datasets[0]
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(
        cols,
        ["age", "sex", "imd_quintile"],
        "no identifier or opt-out column"
    );

    let d = svc
        .describe(
            proof(
                ProofOp::Describe,
                "researcher",
                Some(PROJECT),
                &f.researcher,
            ),
            "p",
            now,
        )
        .await
        .unwrap();
    let cols: Vec<&str> = d.datasets[0]
        .columns
        .iter()
        .map(|c| c.name.as_str())
        .collect();
    assert_eq!(cols, ["sex", "imd_quintile"], "only the project's columns");
    assert_eq!(d.per_query_epsilon_cap, 0.5);

    // A proof signed for Budget is not valid for Describe; a replayed proof is refused.
    let e = svc
        .describe(proof(ProofOp::Budget, "dsu", None, &f.dsu), "p", now)
        .await
        .unwrap_err();
    assert_eq!(e.reason, DenialReason::Unauthenticated);
    let p = proof(ProofOp::Describe, "dsu", None, &f.dsu);
    svc.describe(p.clone(), "p", now).await.unwrap();
    let e = svc.describe(p, "p", now).await.unwrap_err();
    assert_eq!(e.reason, DenialReason::Replayed);
    let e = svc
        .describe(
            proof(ProofOp::Describe, "dsu", Some(PROJECT), &f.dsu),
            "p",
            now,
        )
        .await
        .unwrap_err();
    assert_eq!(
        e.reason,
        DenialReason::PolicyDenied,
        "dsu is not in the project"
    );
    let e = svc
        .describe(proof(ProofOp::Describe, "gone", None, &f.gone), "p", now)
        .await
        .unwrap_err();
    assert_eq!(e.reason, DenialReason::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_reports_the_current_period() {
    let f = fixture(3.0);
    let svc = service(&f, limits()).await;
    let now = chrono::Utc::now();
    svc.query(sign(count_by_imd("dsu", 0.4), &f.dsu), "p", now)
        .await
        .unwrap();
    let b = svc
        .budget(proof(ProofOp::Budget, "dsu", None, &f.dsu), "p", now)
        .await
        .unwrap();
    assert_eq!(b.node_id, "A81001");
    assert_eq!(b.ledgers.len(), 1);
    let l = &b.ledgers[0];
    assert_eq!(l.ledger, "requester:dsu");
    assert_eq!(l.period_label, period_label_now(Period::Month));
    assert_eq!((l.total, l.spent), (3.0, 0.4));
    assert!((l.remaining - 2.6).abs() < 1e-12);

    let b = svc
        .budget(
            proof(ProofOp::Budget, "researcher", Some(PROJECT), &f.researcher),
            "p",
            now,
        )
        .await
        .unwrap();
    let names: Vec<String> = b.ledgers.iter().map(|l| l.ledger.clone()).collect();
    assert_eq!(
        names,
        [
            "requester:researcher".to_string(),
            format!("project:{PROJECT}")
        ]
    );
    assert_eq!(b.ledgers[1].period_label, period_label_now(Period::Quarter));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_applies_valid_policies_and_keeps_the_old_one_on_invalid_ones() {
    let f = fixture(10.0);
    let svc = service(&f, limits()).await;
    let v1 = svc.current().policy.version().to_string();
    assert_eq!(reload(&svc, &f.policy_path).await, ReloadOutcome::Unchanged);

    // dsu loses planning: takes effect at once, without reloading the data.
    let engine_before = svc.current().engine.clone();
    std::fs::write(&f.policy_path, policy_text(&f, &["direct_care"])).unwrap();
    let ReloadOutcome::Applied(v2) = reload(&svc, &f.policy_path).await else {
        panic!("valid policy not applied")
    };
    assert_ne!(v2, v1);
    assert!(std::sync::Arc::ptr_eq(
        &engine_before,
        &svc.current().engine
    ));
    let e = svc
        .query(
            sign(count_by_imd("dsu", 0.1), &f.dsu),
            "p",
            chrono::Utc::now(),
        )
        .await
        .unwrap_err();
    assert_eq!(e.reason, DenialReason::PolicyDenied);
    assert_eq!(e.policy_version, v2);

    // Broken TOML, an unknown field, a dataset whose file is missing: all refused.
    let good = std::fs::read_to_string(&f.policy_path).unwrap();
    for bad in [
        "version = 1\n[organisation\n".to_string(),
        good.replace("[release]", "[release]\nper_query_epsilon_capp = 5.0"),
        good.replace("gp_patients.csv", "missing.csv"),
    ] {
        std::fs::write(&f.policy_path, &bad).unwrap();
        let outcome = reload(&svc, &f.policy_path).await;
        assert!(matches!(outcome, ReloadOutcome::Refused(_)), "{outcome:?}");
        assert_eq!(svc.current().policy.version(), v2);
    }
    std::fs::remove_file(&f.policy_path).unwrap();
    assert!(matches!(
        reload(&svc, &f.policy_path).await,
        ReloadOutcome::Refused(_)
    ));
    assert_eq!(svc.current().policy.version(), v2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_ledger_is_restored_from_the_audit_log_at_start() {
    let f = fixture(10.0);
    let config_text = r#"federation_id = "ics-test"
policy = "policy.toml"
data_dir = "state"
listen = "127.0.0.1:0"
[tls]
cert = "unused.pem"
key = "unused.key"
client_ca = "unused-ca.pem"
allowed_clients = ["san:coordinator-client"]
"#;
    let config =
        phm_node::config::NodeConfig::parse(&f.dir.path().join("node.toml"), config_text).unwrap();
    {
        let node = phm_node::run::Node::start(config.clone()).await.unwrap();
        for _ in 0..3 {
            node.service()
                .query(
                    sign(count_by_imd("dsu", 0.3), &f.dsu),
                    "p",
                    chrono::Utc::now(),
                )
                .await
                .unwrap();
        }
        node.service().flush().await.unwrap();
    }
    // The database is lost (e.g. restored from an old backup, or damaged beyond what
    // sled detects); the verified audit log still records 0.9 spent.
    std::fs::remove_dir_all(f.data_dir.join("ledger.sled")).unwrap();
    let node = phm_node::run::Node::start(config).await.unwrap();
    let spent = node.service().store().spent(&dsu_key()).unwrap().epsilon;
    assert!((spent - 0.9).abs() < 1e-9, "ledger restored to {spent}");
}

/// The fixture's policy with `sex` thresholded (no declared domain) and the dsu's
/// delta budget set to `delta_budget`.
fn thresholded_policy(f: &Fixture, delta_budget: f64) -> String {
    let mut p = policy(f, &["planning", "direct_care"]);
    let sex = p.datasets[0]
        .columns
        .iter_mut()
        .find(|c| c.name == "sex")
        .unwrap();
    sex.group = Grouping::Threshold;
    sex.domain = None;
    p.requesters[0].budget.delta = delta_budget;
    toml::to_string(&p).unwrap()
}

fn count_by_sex(epsilon: f64) -> phm_proto::QueryBody {
    let mut q = count_by_imd("dsu", epsilon);
    q.group_by = vec![GroupKey::Column("sex".into())];
    q
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thresholded_queries_spend_delta_until_the_delta_budget_refuses_them() {
    // F1: each thresholded query can release a one-person key with probability up to
    // its delta whatever its epsilon; the ledger counts delta and refuses once the
    // period's delta budget is spent.
    let f = fixture(10.0);
    let svc = service(&f, limits()).await;
    std::fs::write(&f.policy_path, thresholded_policy(&f, 3e-9)).unwrap();
    assert!(matches!(
        reload(&svc, &f.policy_path).await,
        ReloadOutcome::Applied(_)
    ));
    let now = chrono::Utc::now();
    for i in 0..3 {
        let a = svc
            .query(sign(count_by_sex(0.1), &f.dsu), "p", now)
            .await
            .unwrap_or_else(|e| panic!("thresholded query {i}: {e}"));
        assert_eq!(a.release.delta_spent, 1e-9, "the release states its delta");
    }
    let e = svc
        .query(sign(count_by_sex(0.1), &f.dsu), "p", now)
        .await
        .unwrap_err();
    assert_eq!(e.reason, DenialReason::BudgetExhausted, "{e}");
    assert!(e.message.contains("delta"), "{}", e.message);
    // A declared-domain query spends no delta and is still answered.
    let a = svc
        .query(sign(count_by_imd("dsu", 0.1), &f.dsu), "p", now)
        .await
        .unwrap();
    assert_eq!(a.release.delta_spent, 0.0);
    let held = svc.store().spent(&dsu_key()).unwrap();
    assert!((held.delta - 3e-9).abs() < 1e-18, "{held:?}");
    assert!((held.epsilon - 0.4).abs() < 1e-12, "{held:?}");
    // The audit log and the Budget RPC show delta.
    let lines = audit_lines(&f);
    assert_eq!(lines[0]["delta_spent"], 1e-9);
    let b = svc
        .budget(proof(ProofOp::Budget, "dsu", None, &f.dsu), "p", now)
        .await
        .unwrap();
    assert!((b.ledgers[0].delta_spent - 3e-9).abs() < 1e-18);
    assert_eq!(b.ledgers[0].delta_total, 3e-9);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thresholded_query_needs_the_minimum_epsilon_share_before_any_spend() {
    let f = fixture(10.0);
    let svc = service(&f, limits()).await;
    std::fs::write(&f.policy_path, thresholded_policy(&f, 1e-6)).unwrap();
    assert!(matches!(
        reload(&svc, &f.policy_path).await,
        ReloadOutcome::Applied(_)
    ));
    // 0.01 split over COUNT and key selection gives 0.005 < the default 0.01.
    let e = svc
        .query(sign(count_by_sex(0.01), &f.dsu), "p", chrono::Utc::now())
        .await
        .unwrap_err();
    assert_eq!(e.reason, DenialReason::PolicyDenied, "{e}");
    assert!(
        e.reasons
            .iter()
            .any(|r| r.contains("release.min_threshold_epsilon")),
        "{:?}",
        e.reasons
    );
    assert_eq!(svc.store().spent(&dsu_key()).unwrap().epsilon, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_signed_for_another_federation_is_refused_without_spend() {
    // F15: the federation id is the signature's audience.
    let f = fixture(10.0);
    let svc = service(&f, limits()).await;
    let mut q = count_by_imd("dsu", 0.1);
    q.federation_id = "another-ics".into();
    let e = svc
        .query(sign(q, &f.dsu), "p", chrono::Utc::now())
        .await
        .unwrap_err();
    assert_eq!(e.reason, DenialReason::Unauthenticated, "{e}");
    assert!(e.message.contains("another-ics"), "{}", e.message);
    let other_proof =
        RequesterProof::fresh("another-ics", "dsu", None).sign(ProofOp::Budget, &f.dsu);
    let e = svc
        .budget(other_proof, "p", chrono::Utc::now())
        .await
        .unwrap_err();
    assert_eq!(e.reason, DenialReason::Unauthenticated, "{e}");
    assert_eq!(svc.store().spent(&dsu_key()).unwrap().epsilon, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_ids_are_per_requester_retries_are_free_and_cache_hits_are_re_decided() {
    let f = fixture(10.0);
    let svc = service(&f, limits()).await;
    let now = chrono::Utc::now();
    let mut q = count_by_imd("dsu", 0.25);
    q.query_id = "q-shared".into();
    let first = svc.query(sign(q.clone(), &f.dsu), "p", now).await.unwrap();

    // F9: another requester may use the same id; it learns nothing of the first.
    let mut r = count_by_imd("researcher", 0.25);
    r.query_id = "q-shared".into();
    r.purpose = Purpose::Research;
    r.project_id = Some(PROJECT.into());
    let theirs = svc.query(sign(r, &f.researcher), "p", now).await.unwrap();
    assert!(
        !theirs.cached,
        "a different requester's id is not a cache hit"
    );

    // The same question re-signed (new nonce and time), as `phm query --query-id`
    // does on a retry: the stored answer, no new spend.
    let mut retry = q.clone();
    retry.nonce = nonce();
    retry.issued_at_unix_ms = now_ms();
    let again = svc
        .query(sign(retry.clone(), &f.dsu), "p", now)
        .await
        .unwrap();
    assert!(again.cached);
    assert_eq!(again.release, first.release);
    assert!((svc.store().spent(&dsu_key()).unwrap().epsilon - 0.25).abs() < 1e-12);
    // A re-signed retry is a new message: a second copy of it is a replay. (The
    // message that was answered first stays idempotent: a relay may resend it.)
    let e = svc.query(sign(retry, &f.dsu), "p", now).await.unwrap_err();
    assert_eq!(e.reason, DenialReason::Replayed, "{e}");
    let e = svc.query(sign(q.clone(), &f.dsu), "p", now).await;
    assert!(
        e.is_ok_and(|a| a.cached),
        "the answered message is idempotent"
    );

    // The policy no longer allows planning: even a cached answer is refused.
    std::fs::write(&f.policy_path, policy_text(&f, &["direct_care"])).unwrap();
    assert!(matches!(
        reload(&svc, &f.policy_path).await,
        ReloadOutcome::Applied(_)
    ));
    let e = svc.query(sign(q, &f.dsu), "p", now).await.unwrap_err();
    assert_eq!(e.reason, DenialReason::PolicyDenied, "{e}");
}
