//! Integration tests of the coordinator against in-process mock nodes over real mutual
//! TLS: interval coverage of combined estimates, failure handling (unreachable, timed
//! out, refused, malformed), idempotent resubmission, GetResult, Budget and the CLI.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::*;
use phm_proto::proto;
use phm_proto::{Denial, DenialReason};
use rand::{Rng, SeedableRng};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn outcome_of(progress: &[proto::NodeProgress], id: &str) -> proto::NodeProgress {
    progress
        .iter()
        .find(|p| p.node.as_ref().is_some_and(|n| n.node_id == id))
        .cloned()
        .unwrap_or_else(|| panic!("no progress for {id}: {progress:?}"))
}

/// A standard normal draw (Box-Muller). Test-only: this noise checks the combining
/// arithmetic, not privacy.
fn normal(rng: &mut impl Rng) -> f64 {
    let u1: f64 = rng.r#gen::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.r#gen();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

const GROUPS: usize = 50;

/// Exact per-node, per-group count and sum of ages used by the coverage test.
fn exact(node: usize, group: usize) -> (f64, f64) {
    let count = 200.0 + 37.0 * node as f64 + 11.0 * group as f64;
    (count, count * (40.0 + group as f64 * 0.3 + node as f64))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn combined_intervals_cover_the_exact_answer_at_the_stated_rate() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    const NODES: usize = 5;
    let mut nodes = Vec::new();
    for n in 0..NODES {
        // Each node adds Gaussian noise of known, node-specific variance.
        let sd_count = 3.0 + n as f64;
        let sd_sum = 150.0 + 40.0 * n as f64;
        let rng = Arc::new(std::sync::Mutex::new(rand::rngs::StdRng::seed_from_u64(
            1000 + n as u64,
        )));
        let id = format!("N{n}");
        let behaviour = Behaviour::Answer(Arc::new(move |q| {
            let mut rng = rng.lock().unwrap();
            let rows = (0..GROUPS)
                .map(|g| {
                    let (c, s) = exact(n, g);
                    let noisy_c = c + sd_count * normal(&mut *rng);
                    let noisy_c2 = c + sd_count * normal(&mut *rng);
                    let noisy_s = s + sd_sum * normal(&mut *rng);
                    let mut mean = cell("mean_age", noisy_s / noisy_c2, 1.0);
                    mean.mean = Some(proto::MeanParts {
                        noisy_sum: noisy_s,
                        sum_variance: sd_sum * sd_sum,
                        noisy_count: noisy_c2,
                        count_variance: sd_count * sd_count,
                        centre: 0.0,
                    });
                    proto::ResultRow {
                        key: vec![format!("g{g}")],
                        cells: vec![cell("patients", noisy_c, sd_count * sd_count), mean],
                    }
                })
                .collect();
            result_for(q, &format!("N{n}"), rows)
        }));
        nodes.push(start_node(&pki, &id, behaviour).await);
    }
    let regs: Vec<Reg> = nodes
        .iter()
        .enumerate()
        .map(|(i, n)| Reg::new(&format!("N{i}"), n.addr))
        .collect();
    let config = coordinator_config(&pki, &regs, 10_000, "");
    let mut coord = start_coordinator(&pki, config).await;
    let key = requester_key();

    const QUERIES: usize = 20;
    let (mut trials, mut covered_count, mut covered_mean) = (0usize, 0usize, 0usize);
    for qi in 0..QUERIES {
        let q = signed_query(&key, &format!("cover-{qi}"), true, true);
        let (_, r) = submit(&mut coord.client, q).await.unwrap();
        assert_eq!(r.rows.len(), GROUPS);
        for (g, row) in r.rows.iter().enumerate() {
            assert_eq!(row.key, vec![format!("g{g}")]);
            let (mut c, mut s) = (0.0, 0.0);
            for n in 0..NODES {
                let (cn, sn) = exact(n, g);
                c += cn;
                s += sn;
            }
            let count = &row.cells[0];
            let mean = &row.cells[1];
            assert!(!count.suppressed && !mean.suppressed);
            assert_eq!(count.contributors, NODES as u32);
            // The stated standard error is the root of the summed variances.
            let var: f64 = (0..NODES).map(|n| (3.0 + n as f64).powi(2)).sum();
            assert!((count.standard_error - var.sqrt()).abs() < 1e-9);
            trials += 1;
            covered_count += usize::from(count.ci95_low <= c && c <= count.ci95_high);
            covered_mean += usize::from(mean.ci95_low <= s / c && s / c <= mean.ci95_high);
        }
    }
    // 1000 trials at p = 0.95: sd = 6.9, so ±40 (5.8 sd) fails with probability < 1e-6
    // if the intervals are right, and catches intervals that are half or double width
    // (coverage 68% or 99.99%).
    let lo = trials * 95 / 100 - 40;
    let hi = trials * 95 / 100 + 40;
    assert!(
        (lo..=hi).contains(&covered_count),
        "count intervals covered {covered_count}/{trials}"
    );
    assert!(
        (lo..=hi).contains(&covered_mean),
        "mean intervals covered {covered_mean}/{trials}"
    );
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failures_are_reported_per_node_and_never_delay_the_answer() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let ok = start_node(&pki, "OK", fixed_count("OK", 1234.0, 16.0)).await;
    let stalled = start_node(&pki, "SLOW", Behaviour::Stall).await;
    let refusing = start_node(
        &pki,
        "NO",
        Behaviour::Refuse(
            Denial::new(DenialReason::BudgetExhausted, "no budget left this month")
                .with_reasons(vec!["requester dsu: 0.0 of 10.0 left".into()]),
        ),
    )
    .await;
    let malformed = start_node(
        &pki,
        "BAD",
        Behaviour::Answer(Arc::new(|q| {
            let mut r = result_for(
                q,
                "BAD",
                vec![proto::ResultRow {
                    key: vec![],
                    cells: vec![cell("patients", 50.0, 4.0)],
                }],
            );
            r.rows[0].cells[0].variance = -4.0;
            r
        })),
    )
    .await;
    let dead = dead_addr().await;
    let regs = vec![
        Reg::new("OK", ok.addr),
        Reg::new("SLOW", stalled.addr),
        Reg::new("NO", refusing.addr),
        Reg::new("BAD", malformed.addr),
        Reg::new("DEAD", dead),
    ];
    const DEADLINE_MS: u64 = 800;
    let config = coordinator_config(&pki, &regs, DEADLINE_MS, "");
    let mut coord = start_coordinator(&pki, config).await;
    let key = requester_key();

    let started = Instant::now();
    let (progress, r) = submit(&mut coord.client, signed_query(&key, "f1", false, false))
        .await
        .unwrap();
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(DEADLINE_MS - 50),
        "the stalled node must have been waited for up to its deadline ({took:?})"
    );
    assert!(
        took < Duration::from_millis(DEADLINE_MS + 1500),
        "a stalled node delayed the answer past deadline + margin: {took:?}"
    );

    assert_eq!(progress.len(), 5);
    assert!(progress.iter().all(|p| p.nodes_total == 5));
    let o = |id| outcome_of(&progress, id);
    assert_eq!(o("OK").outcome, proto::NodeOutcome::Answered as i32);
    assert_eq!(o("OK").epsilon_spent, 0.5);
    assert_eq!(o("SLOW").outcome, proto::NodeOutcome::TimedOut as i32);
    assert_eq!(o("NO").outcome, proto::NodeOutcome::Refused as i32);
    assert_eq!(o("NO").reason, DenialReason::BudgetExhausted as i32);
    assert!(o("NO").message.contains("no budget left") && o("NO").message.contains("0.0 of 10.0"));
    assert_eq!(o("BAD").outcome, proto::NodeOutcome::Malformed as i32);
    assert!(
        o("BAD").message.contains("variance is negative"),
        "{:?}",
        o("BAD")
    );
    assert_eq!(o("DEAD").outcome, proto::NodeOutcome::Unreachable as i32);
    assert!(!o("DEAD").message.is_empty());
    // The stalled node is the last to be reported.
    assert_eq!(
        progress.last().unwrap().node.as_ref().unwrap().node_id,
        "SLOW"
    );

    // Only the valid answer is in the total.
    assert_eq!(r.rows.len(), 1);
    assert_eq!(r.rows[0].cells[0].estimate, 1234.0);
    assert_eq!(r.rows[0].cells[0].contributors, 1);
    assert!((r.rows[0].cells[0].standard_error - 4.0).abs() < 1e-12);
    let cov = r.coverage.unwrap();
    assert!(cov.partial);
    assert_eq!(cov.answered.len(), 1);
    assert_eq!(cov.timed_out[0].node_id, "SLOW");
    assert_eq!(cov.unreachable[0].node_id, "DEAD");
    assert_eq!(cov.refused[0].reason, DenialReason::BudgetExhausted as i32);
    assert_eq!(cov.malformed[0].node.as_ref().unwrap().node_id, "BAD");
    assert_eq!(cov.population_answered, 1000.0);
    // Four registered populations are unknown, so the registered total is unknown (0).
    assert_eq!(cov.population_registered, 0.0);
    assert_eq!(r.total_kind, proto::TotalKind::SumOfPartnerCounts as i32);
    assert!(
        r.total_note.contains("Partial: only 1 of the 5"),
        "{}",
        r.total_note
    );
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_after_answering_is_reported_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = start_node(&pki, "A", fixed_count("A", 101.0, 4.0)).await;
    let b = start_node(&pki, "B", fixed_count("B", 203.0, 4.0)).await;
    let config = coordinator_config(
        &pki,
        &[Reg::new("A", a.addr), Reg::new("B", b.addr)],
        3_000,
        "",
    );
    let mut coord = start_coordinator(&pki, config).await;
    let key = requester_key();
    let (_, r) = submit(&mut coord.client, signed_query(&key, "k1", false, false))
        .await
        .unwrap();
    assert_eq!(r.rows[0].cells[0].estimate, 304.0);

    // B goes away after its connection to the coordinator was established.
    b.kill().await;
    let started = Instant::now();
    let (progress, r) = submit(&mut coord.client, signed_query(&key, "k2", false, false))
        .await
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_millis(3_000),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        outcome_of(&progress, "B").outcome,
        proto::NodeOutcome::Unreachable as i32,
        "{progress:?}"
    );
    assert_eq!(
        outcome_of(&progress, "A").outcome,
        proto::NodeOutcome::Answered as i32
    );
    assert_eq!(r.rows[0].cells[0].estimate, 101.0);
    let cov = r.coverage.unwrap();
    assert!(cov.partial);
    assert_eq!(cov.unreachable[0].node_id, "B");
    // B's population is remembered from its earlier answer.
    assert_eq!(cov.population_registered, 2000.0);
    assert_eq!(cov.population_answered, 1000.0);
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resubmission_is_idempotent_and_results_are_durable() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = start_node(&pki, "A", fixed_count("A", 101.0, 4.0)).await;
    let b = start_node(&pki, "B", fixed_count("B", 203.0, 4.0)).await;
    let mut ra = Reg::new("A", a.addr);
    ra.place = "North".into();
    let mut rb = Reg::new("B", b.addr);
    rb.place = "North".into();
    let config = coordinator_config(
        &pki,
        &[ra, rb],
        5_000,
        "[datasets.gp_patients]\ntotal_kind = \"distinct_people\"",
    );
    let mut coord = start_coordinator(&pki, config.clone()).await;
    let key = requester_key();
    let q = signed_query(&key, "same-1", false, false);

    let (p1, r1) = submit(&mut coord.client, q.clone()).await.unwrap();
    assert_eq!((a.calls(), b.calls()), (1, 1));
    // The node received exactly what the requester signed.
    assert_eq!(a.received.lock().unwrap()[0], q);
    let signed = phm_proto::SignedQuery::try_from(a.received.lock().unwrap()[0].clone()).unwrap();
    signed.verify(&key.verifying_key()).unwrap();
    assert_eq!(r1.rows[0].cells[0].estimate, 304.0);
    assert_eq!(r1.total_kind, proto::TotalKind::DistinctPeople as i32);
    assert!(r1.total_note.starts_with("Distinct people"));
    let labels: Vec<_> = r1
        .breakdowns
        .iter()
        .map(|b| (b.level.as_str(), b.label.as_str()))
        .collect();
    assert_eq!(
        labels,
        vec![("partner", "A"), ("partner", "B"), ("place", "North")]
    );
    let cov = r1.coverage.clone().unwrap();
    assert!(!cov.partial);
    assert_eq!(cov.population_answered, 2000.0);
    assert_eq!(cov.population_registered, 2000.0);

    // Same id, same question re-signed: the stored answer, no node contacted.
    let (p2, r2) = submit(&mut coord.client, resign(&q, &key)).await.unwrap();
    assert_eq!((a.calls(), b.calls()), (1, 1));
    assert_eq!(r2, r1);
    assert_eq!(p2, p1);
    // The very same message again is a replay: refused, even by its requester.
    let err = submit(&mut coord.client, q.clone()).await.unwrap_err();
    assert_eq!(Denial::from_status(&err).reason, DenialReason::Replayed);

    // Same id, different query: refused as a reused id.
    let other = signed_query(&key, "same-1", true, false);
    let err = submit(&mut coord.client, other).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::AlreadyExists);
    assert_eq!(
        Denial::from_status(&err).reason,
        DenialReason::QueryIdReused
    );
    assert_eq!((a.calls(), b.calls()), (1, 1));

    let got = coord
        .client
        .get_result(get_result_request("same-1", &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, r1);
    let missing = coord
        .client
        .get_result(get_result_request("never", &key))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);

    // The history survives a restart.
    coord.stop().await;
    let mut coord = start_coordinator(&pki, config).await;
    let got = coord
        .client
        .get_result(get_result_request("same-1", &key))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got, r1);
    let (_, r3) = submit(&mut coord.client, resign(&q, &key)).await.unwrap();
    assert_eq!(r3, r1);
    assert_eq!((a.calls(), b.calls()), (1, 1));
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_duplicate_submitted_while_running_waits_for_the_same_answer() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = start_node(&pki, "A", fixed_count("A", 101.0, 4.0)).await;
    // The stalled node keeps the first run in flight until the 600 ms deadline.
    let slow = start_node(&pki, "SLOW", Behaviour::Stall).await;
    let config = coordinator_config(
        &pki,
        &[Reg::new("A", a.addr), Reg::new("SLOW", slow.addr)],
        600,
        "",
    );
    let coord = start_coordinator(&pki, config).await;
    let key = requester_key();
    let q = signed_query(&key, "dup-1", false, false);
    let (mut c1, mut c2) = (coord.client.clone(), coord.client.clone());
    let (q1, q2) = (q.clone(), resign(&q, &key));
    let first = tokio::spawn(async move { submit(&mut c1, q1).await });
    // Wait until the first run has reached the nodes, then submit the duplicate.
    tokio::time::timeout(Duration::from_secs(5), async {
        while slow.calls() == 0 {
            tokio::task::yield_now().await;
        }
    })
    .await
    .unwrap();
    let (p2, r2) = submit(&mut c2, q2).await.unwrap();
    let (p1, r1) = first.await.unwrap().unwrap();
    assert_eq!(r1, r2);
    assert_eq!(p1, p2);
    assert_eq!((a.calls(), slow.calls()), (1, 1));
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_queries_are_refused_before_any_node_is_asked() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = start_node(&pki, "A", fixed_count("A", 101.0, 4.0)).await;
    let config = coordinator_config(&pki, &[Reg::new("A", a.addr)], 5_000, "");
    let mut coord = start_coordinator(&pki, config).await;
    let key = requester_key();

    let mut q = signed_query(&key, "bad-1", false, false);
    q.nonce = vec![1, 2, 3];
    let err = submit(&mut coord.client, q).await.unwrap_err();
    assert_eq!(Denial::from_status(&err).reason, DenialReason::InvalidQuery);
    assert!(err.message().contains("nonce"), "{}", err.message());

    let mut q = signed_query(&key, "bad-2", false, false);
    q.dataset = "acute_admissions".into();
    let err = submit(&mut coord.client, q).await.unwrap_err();
    assert_eq!(Denial::from_status(&err).reason, DenialReason::InvalidQuery);
    assert!(err.message().contains("acute_admissions"));

    let mut q = signed_query(&key, "bad-3", false, false);
    q.signature.clear();
    let err = submit(&mut coord.client, q).await.unwrap_err();
    assert_eq!(
        Denial::from_status(&err).reason,
        DenialReason::Unauthenticated
    );
    assert_eq!(a.calls(), 0);
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn budget_and_list_nodes_cover_every_registered_node() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = start_node(&pki, "A", fixed_count("A", 101.0, 4.0)).await;
    let dead = dead_addr().await;
    let mut rd = Reg::new("DEAD", dead);
    rd.datasets = vec!["acute_admissions".into()];
    let config = coordinator_config(&pki, &[Reg::new("A", a.addr), rd], 2_000, "");
    let mut coord = start_coordinator(&pki, config).await;
    let key = requester_key();

    let nodes = coord
        .client
        .list_nodes(proto::ListNodesRequest {})
        .await
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[1].datasets, vec!["acute_admissions"]);
    assert_eq!(nodes[0].node.as_ref().unwrap().name, "Node A");

    let proof = phm_proto::RequesterProof::new(
        "ics-test",
        "dsu",
        None,
        chrono::Utc::now().timestamp_millis(),
        vec![7; 16],
    )
    .sign(phm_proto::ProofOp::Budget, &key);
    let fed = coord
        .client
        .budget(proto::BudgetRequest {
            proof: Some(proof.into()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(fed.nodes.len(), 2);
    assert_eq!(fed.nodes[0].outcome, proto::NodeOutcome::Answered as i32);
    assert_eq!(
        fed.nodes[0].budget.as_ref().unwrap().ledgers[0].epsilon_remaining,
        9.0
    );
    assert_eq!(fed.nodes[1].outcome, proto::NodeOutcome::Unreachable as i32);
    assert!(!fed.nodes[1].message.is_empty());

    let err = coord
        .client
        .budget(proto::BudgetRequest { proof: None })
        .await
        .unwrap_err();
    assert_eq!(Denial::from_status(&err).reason, DenialReason::InvalidQuery);
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_served_and_clients_without_a_certificate_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = start_node(&pki, "A", fixed_count("A", 101.0, 4.0)).await;
    let config = coordinator_config(&pki, &[Reg::new("A", a.addr)], 2_000, "");
    let coord = start_coordinator(&pki, config).await;

    let channel =
        tonic::transport::Channel::from_shared(format!("https://127.0.0.1:{}", coord.addr.port()))
            .unwrap()
            .tls_config(pki.client_tls())
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "phm.v1.CoordinatorService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    let anonymous = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(&pki.ca_pem))
        .domain_name("localhost");
    let refused = async {
        let ch = tonic::transport::Channel::from_shared(format!(
            "https://127.0.0.1:{}",
            coord.addr.port()
        ))
        .unwrap()
        .tls_config(anonymous)
        .unwrap()
        .connect()
        .await?;
        proto::coordinator_service_client::CoordinatorServiceClient::new(ch)
            .list_nodes(proto::ListNodesRequest {})
            .await
            .map_err(|s| Box::new(s) as Box<dyn std::error::Error + Send + Sync>)?;
        Ok::<(), Box<dyn std::error::Error + Send + Sync>>(())
    }
    .await;
    assert!(
        refused.is_err(),
        "a client without a certificate was served"
    );
    coord.stop().await;
}

#[test]
fn binary_documents_config_fields_and_refuses_bad_config() {
    let exe = env!("CARGO_BIN_EXE_phm-coordinator");
    let out = std::process::Command::new(exe)
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    for field in [
        "listen",
        "data_dir",
        "node_deadline_ms",
        "log_format",
        "client_ca",
        "[client_tls]",
        "tls_server_name",
        "datasets",
        "total_kind",
        "sum_of_partner_counts",
    ] {
        assert!(
            help.contains(field),
            "--help does not mention {field}:\n{help}"
        );
    }

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("coordinator.toml");
    std::fs::write(
        &path,
        "listen = \"127.0.0.1:0\"\ndata_dir = \"s\"\nfavourite = 3\n",
    )
    .unwrap();
    let out = std::process::Command::new(exe)
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("favourite") && err.contains("coordinator.toml"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stored_results_belong_to_their_requester() {
    // F5: GetResult and every replay from the history need a fresh proof from the
    // requester who asked; nobody else can read a result by its id.
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = start_node(&pki, "A", fixed_count("A", 101.0, 4.0)).await;
    let config = coordinator_config(&pki, &[Reg::new("A", a.addr)], 5_000, "");
    let mut coord = start_coordinator(&pki, config).await;
    let key = requester_key();
    let q = signed_query(&key, "mine-1", false, false);
    submit(&mut coord.client, q.clone()).await.unwrap();

    // No proof, a proof by a key the directory does not list for "dsu", a proof for
    // another query id, a replayed proof, a proof for another federation.
    let mut no_proof = get_result_request("mine-1", &key);
    no_proof.proof = None;
    let stranger = stranger_key();
    let forged = get_result_request("mine-1", &stranger);
    let mut other_subject = get_result_request("mine-1", &key);
    other_subject.query_id = "mine-2".into();
    let fresh = get_result_request("mine-1", &key);
    coord.client.get_result(fresh.clone()).await.unwrap();
    let other_federation = {
        let proof = phm_proto::RequesterProof::new(
            "another-ics",
            "dsu",
            None,
            chrono::Utc::now().timestamp_millis(),
            rand::random::<[u8; 16]>().to_vec(),
        )
        .about("mine-1")
        .sign(phm_proto::ProofOp::GetResult, &key);
        proto::GetResultRequest {
            query_id: "mine-1".into(),
            proof: Some(proof.into()),
        }
    };
    for (what, req, reason) in [
        ("no proof", no_proof, DenialReason::Unauthenticated),
        ("forged proof", forged, DenialReason::Unauthenticated),
        (
            "proof for another query",
            other_subject,
            DenialReason::Unauthenticated,
        ),
        ("replayed proof", fresh, DenialReason::Replayed),
        (
            "another federation",
            other_federation,
            DenialReason::Unauthenticated,
        ),
    ] {
        let err = coord.client.get_result(req).await.unwrap_err();
        assert_eq!(Denial::from_status(&err).reason, reason, "{what}: {err:?}");
    }

    // Submitting the same body signed by a stranger's key under "dsu" (what a
    // compromised node could do with a body it relayed) is refused, not replayed.
    let mut body = phm_proto::SignedQuery::try_from(q.clone()).unwrap().body;
    body.nonce = rand::random::<[u8; 16]>().to_vec();
    let err = submit(&mut coord.client, body.sign(&stranger).into())
        .await
        .unwrap_err();
    assert_eq!(
        Denial::from_status(&err).reason,
        DenialReason::Unauthenticated
    );
    assert_eq!(a.calls(), 1);
    coord.stop().await;
}
