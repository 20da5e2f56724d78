//! A real coordinator with real nodes over mTLS: system answers against the synthetic
//! truth, coverage when nodes die, stall or refuse, and idempotent resubmission.

use crate::rt;
use phm_e2e::client::{self, body, count, sign};
use phm_e2e::{Federation, Ics, edit_toml};
use phm_proto::proto::NodeOutcome;
use phm_proto::{GroupKey, Purpose};
use std::time::{Duration, Instant};

/// Largest k with P(Binomial(n, p) <= k) < 1e-6: observing more than k successes is
/// what a correct 95% interval produces except with probability below one in a million.
fn binomial_floor(n: usize, p: f64) -> usize {
    let mut cdf = 0.0;
    for k in 0..=n {
        let ln_choose: f64 = (1..=k).map(|i| ((n - k + i) as f64 / i as f64).ln()).sum();
        cdf += (ln_choose + k as f64 * p.ln() + (n - k) as f64 * (1.0 - p).ln()).exp();
        if cdf >= 1e-6 {
            return k.saturating_sub(1);
        }
    }
    n
}

const PLANNING: &[&str] = &["--purpose", "planning"];

#[test]
fn system_answers_cover_the_truth_and_say_who_answered() {
    let fed = Federation::start(30_000, 21, None);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fed.ics.root.join("reference_answers.json")).unwrap(),
    )
    .unwrap();
    let questions = [
        "population_by_imd_age",
        "diabetes_by_imd_age",
        "population_by_ethnicity",
        "hypertension_by_ethnicity",
        "emergency_admissions_by_place",
    ];
    let (mut cells, mut covered) = (0usize, 0usize);
    for id in questions {
        let q = reference["questions"]
            .as_array()
            .and_then(|qs| qs.iter().find(|q| q["id"] == id))
            .unwrap_or_else(|| panic!("reference answer {id}"));
        let sql = q["sql"].as_str().unwrap();
        let answer = fed.query_json("dsu", PLANNING, sql);
        let answered = answer["coverage"]["answered"].as_array().unwrap();
        assert!(!answered.is_empty(), "{id}: someone must answer");
        assert!(
            answer["coverage"]["unreachable"]
                .as_array()
                .unwrap()
                .is_empty(),
            "{id}: every node is up"
        );
        for truth in q["rows"].as_array().unwrap() {
            let key: Vec<String> = truth["key"]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_str().unwrap().to_string())
                .collect();
            let row = answer["rows"]
                .as_array()
                .unwrap()
                .iter()
.find(|r| {
                    // The JSON group is an object keyed by column: match by name.
                    q["group_columns"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .zip(&key)
                        .all(|(col, want)| {
                            r["group"][col.as_str().unwrap()].as_str() == Some(want.as_str())
                        })
                })
                .unwrap_or_else(|| panic!("{id}: group {key:?} missing from the answer (every declared group is released)"));
            for (alias, exact) in truth["values"].as_object().unwrap() {
                let v = &row["values"][alias];
                if v["suppressed"].as_bool() == Some(true) {
                    continue;
                }
                let (lo, hi) = (
                    v["ci95"][0].as_f64().unwrap(),
                    v["ci95"][1].as_f64().unwrap(),
                );
                let exact = exact.as_f64().unwrap();
                cells += 1;
                if lo <= exact && exact <= hi {
                    covered += 1;
                }
            }
        }
    }
    assert!(
        cells >= 40,
        "too few released cells to judge coverage: {cells}"
    );
    // Combined intervals are normal approximations of sums of discrete-Laplace noise;
    // a single Laplace term covers ~93.7% at +-1.96 sd, so judge against 0.93.
    let floor = binomial_floor(cells, 0.93);
    assert!(
        covered > floor,
        "only {covered} of {cells} 95% intervals contain the exact answer (floor {floor})"
    );

    // A node's policy refuses the fuel-poverty question: reported with its reason.
    let refused = fed.query_json("dsu", PLANNING, "SELECT housing_tenure, COUNT(*) AS residents FROM la_residents WHERE fuel_poverty = TRUE GROUP BY housing_tenure");
    let refusals = refused["coverage"]["refused"].as_array().unwrap();
    assert!(
        !refusals.is_empty(),
        "the local authority's refusal is reported: {refused}"
    );
    assert!(
        refusals
            .iter()
            .all(|r| !r["reason"].as_str().unwrap_or_default().is_empty()),
        "every refusal carries the policy's reason: {refused}"
    );
}

fn imd_query(requester: &str) -> phm_proto::QueryBody {
    body(
        requester,
        Purpose::Planning,
        "gp_patients",
        vec![GroupKey::Column("imd_quintile".into())],
        vec![count("patients")],
        None,
        0.25,
    )
}

#[test]
fn dead_and_stalled_nodes_are_reported_and_never_delay_the_answer() {
    let ics = Ics::synth(20_000, 22);
    edit_toml(&ics.coordinator_config(), |t| {
        t.insert("node_deadline_ms".into(), 3000.into());
    });
    let mut fed = Federation::start_in(ics, None, true);
    // Practices by the dataset they serve (other policies name gp_patients too, as a
    // linkage partner's dataset).
    let gp: Vec<String> = fed.ics.nodes_serving("gp_patients");
    assert!(gp.len() >= 3, "need three GP practices, got {gp:?}");
    let (dead, stalled) = (gp[0].clone(), gp[1].clone());
    fed.node(&dead).proc.kill9();
    fed.node(&stalled).proc.signal("STOP");

    let dsu = client::load_key(&fed.ics.key("dsu"));
    let certs = fed.ics.certs();
    let url = fed.coordinator_url();
    let started = Instant::now();
    let (progress, result) = rt().block_on(async {
        let ch = client::channel(&url, &certs, Some("dsu-client"))
            .await
            .unwrap();
        client::submit(ch, sign(imd_query("dsu"), &dsu))
            .await
            .expect("submit")
    });
    let elapsed = started.elapsed();
    fed.node(&stalled).proc.signal("CONT");

    let outcome = |id: &str| {
        progress
            .iter()
            .find(|p| p.node.as_ref().is_some_and(|n| n.node_id == id))
            .map(|p| p.outcome())
            .unwrap_or_else(|| panic!("no progress event for {id}: {progress:?}"))
    };
    assert_eq!(outcome(&dead), NodeOutcome::Unreachable);
    assert_eq!(outcome(&stalled), NodeOutcome::TimedOut);
    for id in &gp[2..] {
        assert_eq!(outcome(id), NodeOutcome::Answered, "{id} should answer");
    }
    assert!(
        elapsed < Duration::from_millis(3000 + 4000),
        "the answer took {elapsed:?}, past the 3 s node deadline plus margin"
    );
    let result = result.expect("a combined result despite the failures");
    let coverage = result.coverage.expect("coverage");
    assert!(
        coverage.partial,
        "an answer missing nodes is labelled partial"
    );
    assert!(coverage.unreachable.iter().any(|n| n.node_id == dead));
    assert!(coverage.timed_out.iter().any(|n| n.node_id == stalled));
    assert_eq!(result.rows.len(), 5);
}

#[test]
fn resubmitting_a_query_returns_the_same_answer_without_new_spend() {
    let fed = Federation::start(20_000, 23, Some(4));
    let dsu = client::load_key(&fed.ics.key("dsu"));
    let certs = fed.ics.certs();
    let url = fed.coordinator_url();
    let question = imd_query("dsu");
    let signed = sign(question.clone(), &dsu);
    rt().block_on(async {
        let ch = client::channel(&url, &certs, Some("dsu-client"))
            .await
            .unwrap();
        let (_, first) = client::submit(ch.clone(), signed.clone())
            .await
            .expect("first");
        let first = first.expect("first result");
        let budget_before = federated_spent(ch.clone(), &dsu).await;
        // `phm query --query-id` re-signs the same question: new nonce and time.
        let mut again = question.clone();
        again.nonce = client::nonce();
        again.issued_at_unix_ms = client::now_ms();
        let (_, second) = client::submit(ch.clone(), sign(again, &dsu))
            .await
            .expect("second");
        let second = second.expect("second result");
        assert_eq!(
            first, second,
            "a resubmitted query id returns the stored answer"
        );
        let budget_after = federated_spent(ch.clone(), &dsu).await;
        assert_eq!(
            budget_before, budget_after,
            "resubmission must not spend budget"
        );

        let mut c = phm_proto::proto::coordinator_service_client::CoordinatorServiceClient::new(ch);
        let stored = c
            .get_result(phm_proto::proto::GetResultRequest {
                query_id: first.query_id.clone(),
                proof: Some(
                    phm_proto::RequesterProof::new(
                        phm_e2e::FEDERATION_ID,
                        "dsu",
                        None,
                        client::now_ms(),
                        client::nonce(),
                    )
                    .about(first.query_id.clone())
                    .sign(phm_proto::ProofOp::GetResult, &dsu)
                    .into(),
                ),
            })
            .await
            .expect("GetResult")
            .into_inner();
        assert_eq!(stored, first);
    });
}

/// Total epsilon spent by `dsu` across every node, via the coordinator's Budget relay.
async fn federated_spent(
    ch: tonic::transport::Channel,
    key: &ed25519_dalek::SigningKey,
) -> Vec<(String, u64)> {
    let mut c = phm_proto::proto::coordinator_service_client::CoordinatorServiceClient::new(ch);
    let proof = phm_proto::RequesterProof::new(
        phm_e2e::FEDERATION_ID,
        "dsu",
        None,
        client::now_ms(),
        client::nonce(),
    )
    .sign(phm_proto::ProofOp::Budget, key);
    let fb = c
        .budget(phm_proto::proto::BudgetRequest {
            proof: Some(proof.into()),
        })
        .await
        .expect("budget")
        .into_inner();
    let mut v: Vec<(String, u64)> = fb
        .nodes
        .iter()
        .map(|n| {
            let spent: f64 = n
                .budget
                .as_ref()
                .map(|b| b.ledgers.iter().map(|l| l.epsilon_spent).sum())
                .unwrap_or(-1.0);
            (
                n.node
                    .as_ref()
                    .map(|r| r.node_id.clone())
                    .unwrap_or_default(),
                (spent * 1e9).round() as u64,
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn a_partner_whose_policy_reads_the_total_differently_is_flagged_and_the_total_is_conservative() {
    let ics = Ics::synth(20_000, 61);
    let gps: Vec<String> = ics
        .nodes_serving("gp_patients")
        .into_iter()
        .take(2)
        .collect();
    assert_eq!(gps.len(), 2, "the synthetic ICS has GP practices");
    // One practice's IG lead says its patients may also be counted at other partners;
    // the coordinator's configuration reads gp_patients as distinct people.
    edit_toml(&ics.policy_path(&gps[0]), |t| {
        if let Some(toml::Value::Array(ds)) = t.get_mut("datasets")
            && let Some(d) = ds.first_mut().and_then(toml::Value::as_table_mut)
        {
            d.insert("total_kind".into(), "sum_of_partner_counts".into());
        }
    });
    let fed = Federation::start_nodes(ics, &gps, true);
    let answer = fed.query_json(
        "dsu",
        PLANNING,
        "SELECT COUNT(*) AS people FROM gp_patients",
    );
    let note = answer["total_note"].as_str().unwrap_or_default();
    assert!(
        note.contains("Mismatch") && note.contains(&gps[0]) && !note.contains(&gps[1]),
        "the note must name the partner whose policy disagrees: {note}"
    );
    assert_eq!(
        answer["total_kind"], "sum_of_partner_counts",
        "a disagreement is read the conservative way"
    );
}

/// `phm query --rate-per 1000 --denominator … --standardise "bin(age, 20)"`: both
/// queries run through the real coordinator and nodes; each IMD quintile gets a crude
/// rate (events / people × 1000, from the two DP counts) and an ESP2013 age-standardised
/// rate, and their intervals cover the synthetic truth (10 intervals, judged against a
/// binomial floor at failure probability 1e-6).
#[test]
fn rates_per_thousand_are_formed_from_two_dp_counts_and_age_standardised() {
    let fed = Federation::start(30_000, 23, None);
    let reference: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fed.ics.root.join("reference_answers.json")).unwrap(),
    )
    .unwrap();
    let truth = |id: &str, alias: &str| -> Vec<(Vec<String>, f64)> {
        let q = reference["questions"]
            .as_array()
            .and_then(|qs| qs.iter().find(|q| q["id"] == id))
            .unwrap_or_else(|| panic!("reference answer {id}"));
        q["rows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let key = r["key"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|k| k.as_str().unwrap().to_string())
                    .collect();
                (key, r["values"][alias].as_f64().unwrap_or(0.0))
            })
            .collect()
    };
    let events = phm_devkit::questions::DIABETES_BY_IMD_AGE.sql;
    let people = phm_devkit::questions::POPULATION_BY_IMD_AGE.sql;
    let out = fed.query_json(
        "dsu",
        &[
            "--purpose",
            "planning",
            "--epsilon",
            "1",
            "--rate-per",
            "1000",
            "--denominator",
            people,
            "--standardise",
            "bin(age, 20)",
        ],
        events,
    );
    let rates = &out["rates"];
    assert_eq!(rates["standard"], "ESP2013", "{rates}");
    let rows = rates["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "one row per IMD quintile: {rates}");
    let (o, n) = (
        truth("diabetes_by_imd_age", "diabetics"),
        truth("population_by_imd_age", "people"),
    );
    let weights =
        phm_coordinator::rates::band_weights(&[0.0, 20.0, 40.0, 60.0, 80.0, 100.0]).unwrap();
    let (mut intervals, mut covered) = (0usize, 0usize);
    for row in rows {
        let q = row["stratum"][0].as_str().unwrap().to_string();
        let band = |key: &[String], b: usize| key[0] == q && key[1] == format!("{}", b * 20);
        let get = |t: &[(Vec<String>, f64)], b: usize| {
            t.iter().find(|(k, _)| band(k, b)).map_or(0.0, |x| x.1)
        };
        let (to, tn): (f64, f64) = (0..6)
            .map(|b| (get(&o, b), get(&n, b)))
            .fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
        let dsr: f64 = (0..6)
            .filter(|&b| get(&n, b) > 0.0)
            .map(|b| weights[b] * get(&o, b) / get(&n, b))
            .sum::<f64>()
            * 1000.0;
        let crude = &row["crude"];
        let (e, p) = (
            crude["events"].as_f64().unwrap(),
            crude["people"].as_f64().unwrap(),
        );
        let est = crude["estimate"].as_f64().unwrap();
        assert!((est - 1000.0 * e / p).abs() < 1e-9 * est.max(1.0), "{row}");
        for (r, exact) in [(crude, 1000.0 * to / tn), (&row["standardised"], dsr)] {
            let (lo, hi, est) = (
                r["ci95_low"].as_f64().unwrap(),
                r["ci95_high"].as_f64().unwrap(),
                r["estimate"].as_f64().unwrap(),
            );
            assert!(lo <= est && est <= hi, "{r}");
            intervals += 1;
            covered += usize::from(lo <= exact && exact <= hi);
        }
    }
    let floor = binomial_floor(intervals, 0.95);
    assert!(
        covered > floor,
        "only {covered} of {intervals} rate intervals cover the truth (floor {floor}): {rates}"
    );
}
