//! Red team: what a malicious analyst, a malicious coordinator or a careless client can
//! try against a real node over mTLS, and the refusal (or bounded, noisy answer) each
//! attempt must get. Every case is named after the attack; after each batch the node
//! must still answer a good query.

// Test code: a panic with a message is how a set-up failure is reported.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use crate::rt;
use phm_e2e::client::{self, agg, body, count, sign};
use phm_e2e::{Federation, Ics, NodeExt, read_toml, set_budget};
use phm_proto::proto;
use phm_proto::{AggregateKind, CompareOp, GroupKey, Literal, Predicate, Purpose, QueryBody};
use std::time::Duration;
use tonic::transport::Channel;

const DATASET: &str = "gp_patients";
const PROJECT: &str = "RP-2026-014";

// ---------------------------------------------------------------------------------
// Reading the generated policy, so the attacks target the columns really declared.

/// The `gp_patients` dataset table of a policy file.
fn dataset(policy: &toml::Table) -> toml::Table {
    policy
        .get("datasets")
        .and_then(toml::Value::as_array)
        .and_then(|ds| {
            ds.iter()
                .find(|d| d.get("name").and_then(toml::Value::as_str) == Some(DATASET))
        })
        .and_then(toml::Value::as_table)
        .cloned()
        .unwrap_or_else(|| panic!("policy has no {DATASET} dataset"))
}

fn columns(ds: &toml::Table) -> Vec<toml::Table> {
    ds.get("columns")
        .and_then(toml::Value::as_array)
        .map(|cs| cs.iter().filter_map(|c| c.as_table().cloned()).collect())
        .unwrap_or_default()
}

fn column(ds: &toml::Table, name: &str) -> Option<toml::Table> {
    columns(ds)
        .into_iter()
        .find(|c| c.get("name").and_then(toml::Value::as_str) == Some(name))
}

fn str_of<'a>(t: &'a toml::Table, k: &str) -> &'a str {
    t.get(k).and_then(toml::Value::as_str).unwrap_or_default()
}

fn flag(t: &toml::Table, k: &str) -> bool {
    t.get(k).and_then(toml::Value::as_bool).unwrap_or(false)
}

/// Number of keys a declared group-by column releases.
fn domain_size(c: &toml::Table) -> Option<u64> {
    match c.get("domain")? {
        toml::Value::Array(a) => Some(a.len() as u64),
        toml::Value::String(r) => {
            let (lo, hi) = r.split_once("..")?;
            let (lo, hi): (i64, i64) = (lo.trim().parse().ok()?, hi.trim().parse().ok()?);
            Some((hi - lo + 1).max(0) as u64)
        }
        _ => None,
    }
}

fn bounds(c: &toml::Table) -> Option<(f64, f64)> {
    let b = c.get("bounds")?.as_array()?;
    let f = |v: &toml::Value| v.as_float().or_else(|| v.as_integer().map(|i| i as f64));
    Some((f(b.first()?)?, f(b.get(1)?)?))
}

/// A plausible literal of the column's type, as an attacker who knows one person's
/// details would write it.
fn literal_for(c: &toml::Table) -> Literal {
    match str_of(c, "type") {
        "integer" => Literal::Integer(4_857_773_456),
        "real" => Literal::Real(1.5),
        "boolean" => Literal::Boolean(true),
        "date" => Literal::Text("1957-03-14".into()),
        _ => Literal::Text("9434765919".into()),
    }
}

// ---------------------------------------------------------------------------------
// Query building and checking.

fn planning(group_by: Vec<GroupKey>, filter: Option<Predicate>, epsilon: f64) -> QueryBody {
    body(
        "dsu",
        Purpose::Planning,
        DATASET,
        group_by,
        vec![count("patients")],
        filter,
        epsilon,
    )
}

fn research(group_by: Vec<GroupKey>, epsilon: f64) -> QueryBody {
    let mut b = body(
        "researcher",
        Purpose::Research,
        DATASET,
        group_by,
        vec![count("patients")],
        None,
        epsilon,
    );
    b.project_id = Some(PROJECT.into());
    b
}

fn cmp(column: &str, op: CompareOp, value: Literal) -> Predicate {
    Predicate::Compare {
        column: column.into(),
        op,
        value,
    }
}

/// Assert that `q` is refused with one of `reasons`, and that the refusal's text
/// names every string in `mention` (case-insensitive).
async fn expect_refused(
    ch: &Channel,
    name: &str,
    q: proto::AggregateQuery,
    reasons: &[&str],
    mention: &[&str],
) {
    match client::node_query(ch.clone(), q).await {
        Ok(r) => panic!(
            "{name}: must be refused, but the node answered ({} rows, epsilon {})",
            r.rows.len(),
            r.epsilon_spent
        ),
        Err(e) => {
            let reason = client::reason(&e);
            assert!(
                reasons.contains(&reason.as_str()),
                "{name}: refused as {reason}, expected one of {reasons:?} ({e:?})"
            );
            let text = client::denial_text(&e).to_lowercase();
            assert!(!e.message().is_empty(), "{name}: a refusal must say why");
            for m in mention {
                assert!(
                    text.contains(&m.to_lowercase()),
                    "{name}: the refusal must name {m:?}, it says: {text}"
                );
            }
        }
    }
}

/// The node still answers a good signed query.
async fn assert_alive(ch: &Channel, key: &ed25519_dalek::SigningKey, after: &str) {
    let q = sign(
        planning(vec![GroupKey::Column("imd_quintile".into())], None, 0.01),
        key,
    );
    let r = client::node_query(ch.clone(), q).await;
    assert!(
        r.is_ok(),
        "after {after}: the node must still answer a good query, got {r:?}"
    );
}

/// Probability bound used for every statistical assertion here.
const FAILURE_PROBABILITY: f64 = 1e-6;

/// Largest |noise| a cell may show with probability ≥ 1 − FAILURE_PROBABILITY/cells.
fn noise_bound(cell: &proto::Cell, cells: usize) -> f64 {
    let p = FAILURE_PROBABILITY / cells.max(1) as f64;
    if cell.mechanism == proto::NoiseMechanism::DiscreteGaussian as i32 {
        // Gaussian tail: P(|X| > t) ≤ 2 exp(−t²/2σ²).
        cell.noise_scale * (2.0 * (2.0 / p).ln()).sqrt() + 1.0
    } else {
        // (Discrete) Laplace tail: P(|X| ≥ t) ≤ 2 exp(−(t − 1)/b).
        cell.noise_scale * (2.0 / p).ln() + 1.0
    }
}

/// Variance of OpenDP's discrete Laplace with scale `b` (what `Cell.variance` must say).
fn discrete_laplace_variance(b: f64) -> f64 {
    let a = (-1.0 / b).exp();
    2.0 * a / (1.0 - a).powi(2)
}

fn first_gp(ics: &Ics) -> String {
    ics.nodes_serving(DATASET)
        .into_iter()
        .next()
        .unwrap_or_else(|| panic!("the synthetic ICS has no node serving {DATASET}"))
}

// ---------------------------------------------------------------------------------

#[test]
fn row_extraction_attempts_are_refused_naming_the_column() {
    let ics = Ics::synth(20_000, 801);
    let id = first_gp(&ics);
    let policy = read_toml(&ics.policy_path(&id));
    let fed = Federation::start_nodes(ics, std::slice::from_ref(&id), false);
    let node = &fed.nodes[0];
    let ds = dataset(&policy);
    let person_id = str_of(&ds, "person_id").to_string();
    assert!(
        !person_id.is_empty(),
        "dataset declares its person id column"
    );
    let identifiers: Vec<toml::Table> = columns(&ds)
        .into_iter()
        .filter(|c| flag(c, "identifier"))
        .collect();
    let identifier_names: Vec<String> = identifiers
        .iter()
        .map(|c| str_of(c, "name").to_string())
        .collect();
    for expected in ["nhs_number", "date_of_birth", "postcode"] {
        assert!(
            identifier_names.iter().any(|n| n == expected),
            "policy must mark {expected} as an identifier (has {identifier_names:?})"
        );
    }
    let person_col = column(&ds, &person_id).unwrap_or_else(|| {
        let mut t = toml::Table::new();
        t.insert("type".into(), "text".into());
        t
    });

    let dsu = client::load_key(&fed.ics.key("dsu"));
    let mut cases: Vec<(String, QueryBody, Vec<String>)> = Vec::new();
    // Every identifier, and the person id, used every way a column can be used.
    let mut targets: Vec<(String, toml::Table)> = identifiers
        .iter()
        .map(|c| (str_of(c, "name").to_string(), c.clone()))
        .collect();
    targets.push((person_id.clone(), person_col));
    for (name, col) in &targets {
        cases.push((
            format!("group by identifier {name}"),
            planning(vec![GroupKey::Column(name.clone())], None, 0.1),
            vec![name.clone()],
        ));
        cases.push((
            format!("filter picking one person by {name}"),
            planning(
                vec![],
                Some(cmp(name, CompareOp::Eq, literal_for(col))),
                0.1,
            ),
            vec![name.clone()],
        ));
        cases.push((
            format!("IN-list of one person's {name} inside an AND"),
            planning(
                vec![GroupKey::Column("imd_quintile".into())],
                Some(Predicate::All(vec![
                    cmp("imd_quintile", CompareOp::Ge, Literal::Integer(1)),
                    Predicate::InList {
                        column: name.clone(),
                        values: vec![literal_for(col)],
                        negated: false,
                    },
                ])),
                0.1,
            ),
            vec![name.clone()],
        ));
        cases.push((
            format!("identifier {name} hidden under NOT"),
            planning(
                vec![],
                Some(Predicate::Not(Box::new(Predicate::IsNull {
                    column: name.clone(),
                    negated: false,
                }))),
                0.1,
            ),
            vec![name.clone()],
        ));
        for kind in [
            AggregateKind::Count,
            AggregateKind::Sum,
            AggregateKind::Mean,
        ] {
            let mut b = planning(vec![], None, 0.1);
            b.aggregates = vec![agg("x", kind, name)];
            cases.push((
                format!("{} over identifier {name}", kind.name()),
                b,
                vec![name.clone()],
            ));
        }
        cases.push((
            format!("bin over identifier {name}"),
            planning(
                vec![GroupKey::Bin {
                    column: name.clone(),
                    width: 1.0,
                }],
                None,
                0.1,
            ),
            vec![name.clone()],
        ));
    }
    // Small-area geography: LSOA has ~1,500 residents, so a GP list split by LSOA
    // (times anything) isolates people.
    if column(&ds, "lsoa").is_some() {
        cases.push((
            "group by lsoa".into(),
            planning(vec![GroupKey::Column("lsoa".into())], None, 0.1),
            vec!["lsoa".into()],
        ));
        cases.push((
            "group by lsoa × sex".into(),
            planning(
                vec![
                    GroupKey::Column("lsoa".into()),
                    GroupKey::Column("sex".into()),
                ],
                None,
                0.1,
            ),
            vec!["lsoa".into()],
        ));
    }
    // Quasi-identifier combination beyond max_group_cells.
    let max_cells = policy
        .get("release")
        .and_then(|r| r.get("max_group_cells"))
        .and_then(toml::Value::as_integer)
        .unwrap_or(500) as u64;
    let age = column(&ds, "age").expect("gp_patients declares age");
    let (lo, hi) = bounds(&age).expect("age has bounds");
    let age_bins = ((hi / 5.0).floor() - (lo / 5.0).floor()) as u64 + 1;
    let mut cells = age_bins;
    for c in ["sex", "ethnicity", "imd_quintile"] {
        let col = column(&ds, c).unwrap_or_else(|| panic!("gp_patients declares {c}"));
        cells *= domain_size(&col).unwrap_or_else(|| panic!("{c} has a declared domain"));
    }
    assert!(
        cells > max_cells,
        "set-up: bin(age,5)×sex×ethnicity×imd_quintile has {cells} cells, not above {max_cells}"
    );
    cases.push((
        format!("bin(age,5) × sex × ethnicity × imd_quintile = {cells} cells > {max_cells}"),
        planning(
            vec![
                GroupKey::Bin {
                    column: "age".into(),
                    width: 5.0,
                },
                GroupKey::Column("sex".into()),
                GroupKey::Column("ethnicity".into()),
                GroupKey::Column("imd_quintile".into()),
            ],
            None,
            0.1,
        ),
        vec!["cell".into()],
    ));
    if let Some(w) = age
        .get("min_bin_width")
        .and_then(|v| v.as_float().or_else(|| v.as_integer().map(|i| i as f64)))
    {
        cases.push((
            format!("bin(age) narrower than min_bin_width {w}"),
            planning(
                vec![GroupKey::Bin {
                    column: "age".into(),
                    width: w / 2.0,
                }],
                None,
                0.1,
            ),
            vec!["age".into()],
        ));
    }

    rt().block_on(async {
        let ch = client::channel(&node.endpoint(), &fed.ics.certs(), Some("dsu-client"))
            .await
            .expect("mTLS channel");
        let before = client::node_budget(ch.clone(), "dsu", None, &dsu)
            .await
            .expect("budget");
        for (name, q, mention) in cases {
            let mention: Vec<&str> = mention.iter().map(String::as_str).collect();
            expect_refused(&ch, &name, sign(q, &dsu), &["POLICY_DENIED"], &mention).await;
        }
        let after = client::node_budget(ch.clone(), "dsu", None, &dsu)
            .await
            .expect("budget");
        let spent =
            |b: &proto::BudgetResponse| client::ledger(b, "requester:dsu").map(|l| l.epsilon_spent);
        assert_eq!(
            spent(&before),
            spent(&after),
            "refused queries must not spend budget"
        );
        assert_alive(&ch, &dsu, "row-extraction attempts").await;
    });
}

/// Differencing: A and B differ by (at most) one person. Each costs its epsilon,
/// each carries the full noise for that epsilon, and the budget stops the attack.
#[test]
fn differencing_pays_full_price_until_the_budget_is_exhausted() {
    const TOTAL: f64 = 2.0;
    const EPS: f64 = 0.25;
    let ics = Ics::synth(20_000, 802);
    let id = first_gp(&ics);
    set_budget(&ics.policy_path(&id), "requesters", "dsu", TOTAL, 1.0);
    let policy = read_toml(&ics.policy_path(&id));
    let ds = dataset(&policy);
    let (_, age_hi) = column(&ds, "age")
        .and_then(|c| bounds(&c))
        .expect("age bounds");
    let m = ds
        .get("max_rows_per_person")
        .and_then(toml::Value::as_integer)
        .expect("max_rows_per_person") as f64;
    let fed = Federation::start_nodes(ics, std::slice::from_ref(&id), false);
    let dsu = client::load_key(&fed.ics.key("dsu"));

    rt().block_on(async {
        let ch = client::channel(
            &fed.nodes[0].endpoint(),
            &fed.ics.certs(),
            Some("dsu-client"),
        )
        .await
        .expect("mTLS channel");
        // A: everyone aged 90+. B: the same minus the oldest age, which in a 20,000
        // list is a handful of people or one.
        let a = || {
            planning(
                vec![],
                Some(cmp("age", CompareOp::Ge, Literal::Integer(90))),
                EPS,
            )
        };
        let b = || {
            planning(
                vec![],
                Some(Predicate::All(vec![
                    cmp("age", CompareOp::Ge, Literal::Integer(90)),
                    cmp("age", CompareOp::Lt, Literal::Integer(age_hi as i64)),
                ])),
                EPS,
            )
        };
        let mut answers = Vec::new();
        let mut refusal = None;
        for i in 0..100 {
            let q = if i % 2 == 0 { a() } else { b() };
            match client::node_query(ch.clone(), sign(q, &dsu)).await {
                Ok(r) => answers.push(r),
                Err(e) => {
                    refusal = Some(e);
                    break;
                }
            }
        }
        let refusal = refusal.expect("the budget must stop a differencing attack");
        assert_eq!(client::reason(&refusal), "BUDGET_EXHAUSTED", "{refusal:?}");
        let expected = (TOTAL / EPS + 1e-9).floor() as usize;
        assert_eq!(
            answers.len(),
            expected,
            "with {TOTAL} epsilon at {EPS} per query exactly {expected} answers fit"
        );
        let spent: f64 = answers.iter().map(|r| r.epsilon_spent).sum();
        assert!(
            spent <= TOTAL + 1e-9,
            "answers spent {spent} > budget {TOTAL}"
        );
        for r in &answers {
            assert!(!r.cached, "every differencing query is a fresh release");
            assert!(
                (r.epsilon_spent - EPS).abs() < 1e-9,
                "each query is charged its epsilon, got {}",
                r.epsilon_spent
            );
            let c = &r.rows[0].cells[0];
            // Documented (node/src/engine/noise.rs): a count's sensitivity is m, the
            // dataset's max rows per person; one aggregate gets the whole epsilon;
            // the scale is m/ε, raised by at most a few ulps to satisfy OpenDP's map.
            let documented = m / EPS;
            assert!(
                c.noise_scale >= documented * (1.0 - 1e-12)
                    && c.noise_scale <= documented * (1.0 + 1e-9),
                "noise scale {} is not the documented sensitivity/epsilon = {documented}",
                c.noise_scale
            );
            if c.mechanism == proto::NoiseMechanism::DiscreteLaplace as i32 {
                let v = discrete_laplace_variance(c.noise_scale);
                assert!(
                    (c.variance - v).abs() <= 1e-6 * v.max(1.0),
                    "stated variance {} disagrees with scale {} (expected {v})",
                    c.variance,
                    c.noise_scale
                );
            }
        }
        // A and B carry identical noise: the difference of one person is hidden in
        // noise of twice the variance of either.
        let scale_a = answers[0].rows[0].cells[0].noise_scale;
        let scale_b = answers[1].rows[0].cells[0].noise_scale;
        assert_eq!(scale_a, scale_b, "A and B must be noised alike");

        let budget = client::node_budget(ch.clone(), "dsu", None, &dsu)
            .await
            .expect("budget");
        let l = client::ledger(&budget, "requester:dsu").expect("dsu ledger");
        assert!((l.epsilon_total - TOTAL).abs() < 1e-9);
        assert!(
            (l.epsilon_spent - spent).abs() < 1e-9,
            "ledger says {} spent, answers received cost {spent}",
            l.epsilon_spent
        );
        assert!(l.epsilon_remaining < EPS, "nothing usable is left");
        // A cheaper query still fits only if it fits what remains.
        let mut tiny = a();
        tiny.epsilon = l.epsilon_remaining + 0.01;
        expect_refused(
            &ch,
            "query just over the remaining budget",
            sign(tiny, &dsu),
            &["BUDGET_EXHAUSTED"],
            &[],
        )
        .await;
    });
}

/// Averaging: the same question, many times. Same id: the cached release, free.
/// New ids and rewordings: charged every time until the budget ends, so averaging
/// the answers never beats asking once with the whole budget.
#[test]
fn averaging_repeated_questions_cannot_beat_the_budget() {
    const TOTAL: f64 = 2.0;
    const EPS: f64 = 0.25;
    let ics = Ics::synth(20_000, 803);
    let id = first_gp(&ics);
    set_budget(
        &ics.policy_path(&id),
        "requesters",
        "researcher",
        TOTAL,
        1.0,
    );
    set_budget(&ics.policy_path(&id), "projects", PROJECT, TOTAL, 1.0);
    let fed = Federation::start_nodes(ics, std::slice::from_ref(&id), false);
    let key = client::load_key(&fed.ics.key("researcher"));

    rt().block_on(async {
        let ch = client::channel(
            &fed.nodes[0].endpoint(),
            &fed.ics.certs(),
            Some("dsu-client"),
        )
        .await
        .expect("mTLS channel");
        let spent = |b: &proto::BudgetResponse| {
            client::ledger(b, &format!("project:{PROJECT}"))
                .map(|l| l.epsilon_spent)
                .unwrap_or_else(|| panic!("no project ledger in {b:?}"))
        };
        let first_q = sign(research(vec![], EPS), &key);
        let first = client::node_query(ch.clone(), first_q.clone())
            .await
            .expect("first research query answered");
        let after_first = spent(
            &client::node_budget(ch.clone(), "researcher", Some(PROJECT), &key)
                .await
                .expect("budget"),
        );
        assert!(
            (after_first - EPS).abs() < 1e-9,
            "first answer charged {after_first}"
        );

        // Same signed query five more times: identical, cached, free.
        for i in 0..5 {
            let again = client::node_query(ch.clone(), first_q.clone())
                .await
                .unwrap_or_else(|e| panic!("repeat {i} refused: {e:?}"));
            assert!(again.cached, "repeat {i} must come from the release cache");
            assert_eq!(
                again.rows, first.rows,
                "repeat {i} must be the same release"
            );
        }
        let after_repeats = spent(
            &client::node_budget(ch.clone(), "researcher", Some(PROJECT), &key)
                .await
                .expect("budget"),
        );
        assert!(
            (after_repeats - after_first).abs() < 1e-12,
            "cached repeats must not spend ({after_first} → {after_repeats})"
        );

        // New ids and small rewordings: each one charged.
        let rewordings: Vec<(&str, MakeQuery)> = vec![
            ("same question, new id", Box::new(|| research(vec![], EPS))),
            (
                "renamed output column",
                Box::new(|| {
                    let mut b = research(vec![], EPS);
                    b.aggregates = vec![count("n")];
                    b
                }),
            ),
            (
                "two identical counts in one query",
                Box::new(|| {
                    let mut b = research(vec![], EPS);
                    b.aggregates = vec![count("n1"), count("n2")];
                    b
                }),
            ),
            (
                "epsilon nudged down",
                Box::new(|| research(vec![], EPS - 1e-6)),
            ),
        ];
        let mut answers = vec![first];
        let mut exhausted = None;
        'outer: for _ in 0..50 {
            for (name, make) in &rewordings {
                let before = spent(
                    &client::node_budget(ch.clone(), "researcher", Some(PROJECT), &key)
                        .await
                        .expect("budget"),
                );
                match client::node_query(ch.clone(), sign(make(), &key)).await {
                    Ok(r) => {
                        assert!(!r.cached, "{name}: a new id is a new release");
                        let after = spent(
                            &client::node_budget(ch.clone(), "researcher", Some(PROJECT), &key)
                                .await
                                .expect("budget"),
                        );
                        assert!(
                            after - before >= r.epsilon_spent - 1e-12 && r.epsilon_spent > 0.0,
                            "{name}: answered but charged {} (ledger {before} → {after})",
                            r.epsilon_spent
                        );
                        answers.push(r);
                    }
                    Err(e) => {
                        exhausted = Some(e);
                        break 'outer;
                    }
                }
            }
        }
        let e = exhausted.expect("averaging must run out of budget");
        assert_eq!(client::reason(&e), "BUDGET_EXHAUSTED", "{e:?}");
        let total_spent: f64 = answers.iter().map(|r| r.epsilon_spent).sum();
        assert!(total_spent <= TOTAL + 1e-9, "spent {total_spent} > {TOTAL}");
        let k = answers.len();
        assert!(
            k as f64 <= TOTAL / (EPS - 1e-6) + 1e-9,
            "{k} answers obtained, at most budget/epsilon = {} possible",
            TOTAL / EPS
        );

        // Convergence: the average of the k answers has variance Σv_i/k², where v_i
        // is each answer's stated noise variance. One query spending the whole budget
        // once would have the scale of the first answer shrunk by ε/Σε. Averaging
        // must never do better than that.
        let cell = |r: &proto::AggregateResult| r.rows[0].cells[0].clone();
        let var_avg: f64 = answers.iter().map(|r| cell(r).variance).sum::<f64>() / (k * k) as f64;
        let c0 = cell(&answers[0]);
        let b_single = c0.noise_scale * answers[0].epsilon_spent / total_spent;
        let var_single = if c0.mechanism == proto::NoiseMechanism::DiscreteGaussian as i32 {
            b_single * b_single
        } else {
            discrete_laplace_variance(b_single)
        };
        assert!(
            var_avg >= var_single,
            "averaging {k} answers gives variance {var_avg}, below {var_single} for one \
             query at the whole budget {total_spent}"
        );
    });
}

/// Budget races: 300 concurrent queries at one node, then 100 through a coordinator.
/// Whatever interleaving happens, the answers released never cost more than the
/// ledger holds, and the Budget RPC agrees with what clients received.
#[test]
fn concurrent_queries_never_overspend_at_a_node_or_through_the_coordinator() {
    const NODE_TOTAL: f64 = 3.0;
    const NODE_EPS: f64 = 0.05;
    const COORD_TOTAL: f64 = 1.0;
    const COORD_EPS: f64 = 0.05;
    let ics = Ics::synth(20_000, 804);
    let ids: Vec<String> = ics.nodes_serving(DATASET).into_iter().take(2).collect();
    assert_eq!(ids.len(), 2, "need two GP practices");
    for id in &ids {
        let p = ics.policy_path(id);
        set_budget(&p, "requesters", "dsu", NODE_TOTAL, 1.0);
        set_budget(&p, "requesters", "researcher", COORD_TOTAL, 1.0);
        set_budget(&p, "projects", PROJECT, COORD_TOTAL, 1.0);
        // Let all 300 in at once: the race is the point, not the overload guard.
        phm_e2e::edit_toml(&ics.node_config(id), |t| {
            let limits = t
                .entry("limits")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let Some(l) = limits.as_table_mut() {
                l.insert("max_concurrent_queries".into(), 1024.into());
            }
        });
    }
    let fed = Federation::start_nodes(ics, &ids, true);
    let dsu = client::load_key(&fed.ics.key("dsu"));
    let researcher = client::load_key(&fed.ics.key("researcher"));

    rt().block_on(async {
        // 300 at one node.
        let ch = client::channel(
            &fed.nodes[0].endpoint(),
            &fed.ics.certs(),
            Some("dsu-client"),
        )
        .await
        .expect("mTLS channel");
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..300 {
            let q = sign(planning(vec![], None, NODE_EPS), &dsu);
            let ch = ch.clone();
            set.spawn(async move { client::node_query(ch, q).await });
        }
        let (mut ok_eps, mut ok, mut refused) = (0.0, 0usize, Vec::new());
        while let Some(r) = set.join_next().await {
            match r.expect("task") {
                Ok(a) => {
                    ok += 1;
                    ok_eps += a.epsilon_spent;
                }
                Err(e) => refused.push(client::reason(&e)),
            }
        }
        assert!(ok > 0, "some of the 300 must be answered");
        assert!(
            ok_eps <= NODE_TOTAL + 1e-9,
            "{ok} answers released costing {ok_eps} > budget {NODE_TOTAL}"
        );
        for r in &refused {
            assert!(
                r == "BUDGET_EXHAUSTED" || r == "OVERLOADED",
                "a racing query was refused as {r}; only BUDGET_EXHAUSTED or OVERLOADED fit"
            );
        }
        assert!(
            refused.iter().filter(|r| *r == "BUDGET_EXHAUSTED").count() > 0,
            "300 × {NODE_EPS} exceeds {NODE_TOTAL}: some must hit the budget"
        );
        let b = client::node_budget(ch.clone(), "dsu", None, &dsu)
            .await
            .expect("budget");
        let l = client::ledger(&b, "requester:dsu").expect("dsu ledger");
        assert!(
            (l.epsilon_spent - ok_eps).abs() < 1e-9,
            "node ledger says {} spent; the {ok} answers released cost {ok_eps}",
            l.epsilon_spent
        );
        assert!(l.epsilon_spent <= l.epsilon_total + 1e-9);
        assert_eq!(
            ok,
            (NODE_TOTAL / NODE_EPS + 1e-9).floor() as usize,
            "with no overload every epsilon of the budget is usable, and no more"
        );

        // 100 through the coordinator, researcher under the project.
        let coord = client::channel(&fed.coordinator_url(), &fed.ics.certs(), Some("dsu-client"))
            .await
            .expect("coordinator channel");
        let mut set = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let q = sign(research(vec![], COORD_EPS), &researcher);
            let coord = coord.clone();
            set.spawn(
                async move { client::submit_within(coord, q, Duration::from_secs(120)).await },
            );
        }
        let mut per_node: std::collections::BTreeMap<String, f64> = Default::default();
        let mut combined = 0usize;
        while let Some(r) = set.join_next().await {
            let (progress, result) = match r.expect("task") {
                Ok(v) => v,
                Err(e) => {
                    assert_ne!(
                        e.code(),
                        tonic::Code::DeadlineExceeded,
                        "a concurrent Submit hung: {e:?}"
                    );
                    continue;
                }
            };
            for p in progress {
                if p.outcome == proto::NodeOutcome::Answered as i32 {
                    let id = p.node.map(|n| n.node_id).unwrap_or_default();
                    *per_node.entry(id).or_default() += p.epsilon_spent;
                }
            }
            if result.is_some() {
                combined += 1;
            }
        }
        assert!(
            combined > 0,
            "some of the 100 must produce a combined result"
        );
        for n in &fed.nodes {
            let ch = client::channel(&n.endpoint(), &fed.ics.certs(), Some("dsu-client"))
                .await
                .expect("node channel");
            let b = client::node_budget(ch, "researcher", Some(PROJECT), &researcher)
                .await
                .expect("budget");
            let l = client::ledger(&b, &format!("project:{PROJECT}")).expect("project ledger");
            let released = per_node.get(&n.id).copied().unwrap_or(0.0);
            assert!(
                released <= COORD_TOTAL + 1e-9,
                "node {}: answers relayed cost {released} > budget {COORD_TOTAL}",
                n.id
            );
            assert!(
                l.epsilon_spent <= l.epsilon_total + 1e-9,
                "node {} overspent its project ledger",
                n.id
            );
            assert!(
                (l.epsilon_spent - released).abs() < 1e-9,
                "node {}: ledger says {} spent, answers relayed cost {released}",
                n.id,
                l.epsilon_spent
            );
        }
    });
}

/// Authentication and authorisation beyond signatures (see node_server.rs for the
/// basic ones): a coordinator altering a signed query in flight, another requester's
/// project, the wrong purpose, an expired project and a revoked key.
#[test]
fn altered_revoked_expired_and_misused_credentials_are_refused() {
    let ics = Ics::synth(20_000, 805);
    let id = first_gp(&ics);
    let fed = Federation::start_nodes(ics, std::slice::from_ref(&id), false);
    let node = &fed.nodes[0];
    let policy_path = node.policy_path();
    let dsu = client::load_key(&fed.ics.key("dsu"));
    let researcher = client::load_key(&fed.ics.key("researcher"));
    let base = || planning(vec![GroupKey::Column("imd_quintile".into())], None, 0.1);

    type Alter = Box<dyn Fn(&mut proto::AggregateQuery)>;
    let alterations: Vec<(&str, Alter)> = vec![
        ("epsilon raised", Box::new(|q| q.epsilon *= 2.0)),
        ("epsilon lowered", Box::new(|q| q.epsilon /= 2.0)),
        (
            "group key swapped",
            Box::new(|q| q.group_by = vec![GroupKey::Column("sex".into()).into()]),
        ),
        (
            "filter added",
            Box::new(|q| q.filter = Some(cmp("age", CompareOp::Ge, Literal::Integer(80)).into())),
        ),
        (
            "purpose changed to direct care",
            Box::new(|q| q.purpose = proto::Purpose::DirectCare as i32),
        ),
        (
            "requester changed to researcher",
            Box::new(|q| q.requester_id = "researcher".into()),
        ),
        ("project added", Box::new(|q| q.project_id = PROJECT.into())),
        ("query id changed", Box::new(|q| q.query_id.push('x'))),
        (
            "issued_at moved 1 ms",
            Box::new(|q| q.issued_at_unix_ms += 1),
        ),
        ("nonce changed", Box::new(|q| q.nonce[0] ^= 1)),
        (
            "aggregate renamed",
            Box::new(|q| q.aggregates[0].alias = "renamed".into()),
        ),
        (
            "aggregate kind changed",
            Box::new(|q| {
                q.aggregates[0].kind = proto::AggregateKind::Sum as i32;
                q.aggregates[0].column = "age".into();
            }),
        ),
        (
            "one signature bit flipped",
            Box::new(|q| q.signature[7] ^= 0x10),
        ),
        (
            "signature truncated",
            Box::new(|q| q.signature.truncate(63)),
        ),
    ];

    rt().block_on(async {
        let ch = client::channel(&node.endpoint(), &fed.ics.certs(), Some("dsu-client"))
            .await
            .expect("mTLS channel");
        for (name, alter) in &alterations {
            let mut q = sign(base(), &dsu);
            alter(&mut q);
            expect_refused(
                &ch,
                &format!("altered in flight: {name}"),
                q,
                &["UNAUTHENTICATED"],
                &[],
            )
            .await;
        }

        let misuse: Vec<(&str, proto::AggregateQuery, &str)> = vec![
            (
                "dsu uses the researcher's project",
                sign(
                    {
                        let mut b = research(vec![], 0.1);
                        b.requester_id = "dsu".into();
                        b
                    },
                    &dsu,
                ),
                "",
            ),
            (
                "dsu asks for research without a project",
                sign(
                    {
                        let mut b = base();
                        b.purpose = Purpose::Research;
                        b
                    },
                    &dsu,
                ),
                "research",
            ),
            (
                "researcher asks for planning",
                sign(
                    {
                        let mut b = base();
                        b.requester_id = "researcher".into();
                        b
                    },
                    &researcher,
                ),
                "planning",
            ),
            (
                "researcher asks for direct care under the project",
                sign(
                    {
                        let mut b = research(vec![], 0.1);
                        b.purpose = Purpose::DirectCare;
                        b
                    },
                    &researcher,
                ),
                "",
            ),
            (
                "researcher under an unknown project",
                sign(
                    {
                        let mut b = research(vec![], 0.1);
                        b.project_id = Some("RP-1999-001".into());
                        b
                    },
                    &researcher,
                ),
                "RP-1999-001",
            ),
            (
                "researcher asks for research with no project",
                sign(
                    {
                        let mut b = research(vec![], 0.1);
                        b.project_id = None;
                        b
                    },
                    &researcher,
                ),
                "project",
            ),
        ];
        for (name, q, mention) in misuse {
            let mention: Vec<&str> = [mention].into_iter().filter(|m| !m.is_empty()).collect();
            expect_refused(&ch, name, q, &["POLICY_DENIED"], &mention).await;
        }
        // The researcher's legitimate query works before the project expires.
        client::node_query(ch.clone(), sign(research(vec![], 0.1), &researcher))
            .await
            .expect("research under the approved project is answered");

        // Expired project: the IG lead's approval ended yesterday (or years ago).
        let v0 = policy_version(&ch, &dsu).await;
        phm_e2e::edit_toml(&policy_path, |t| {
            if let Some(toml::Value::Array(ps)) = t.get_mut("projects") {
                for p in ps.iter_mut() {
                    if p.get("id").and_then(toml::Value::as_str) == Some(PROJECT)
                        && let Some(p) = p.as_table_mut()
                    {
                        let past: toml::value::Datetime =
                            "2020-01-31".parse().expect("a TOML date");
                        p.insert("expires".into(), toml::Value::Datetime(past));
                    }
                }
            }
        });
        node.proc.signal("HUP");
        let v1 = wait_new_version(&ch, &dsu, &v0).await;
        expect_refused(
            &ch,
            "research under an expired project",
            sign(research(vec![], 0.1), &researcher),
            &["POLICY_DENIED"],
            &["expire"],
        )
        .await;

        // Revoked key: dsu's key is compromised; the IG lead sets revoked = true.
        phm_e2e::edit_toml(&policy_path, |t| {
            if let Some(toml::Value::Array(rs)) = t.get_mut("requesters") {
                for r in rs.iter_mut() {
                    if r.get("id").and_then(toml::Value::as_str) == Some("dsu")
                        && let Some(r) = r.as_table_mut()
                    {
                        r.insert("revoked".into(), true.into());
                    }
                }
            }
        });
        node.proc.signal("HUP");
        wait_new_version_as(&ch, "researcher", Some(PROJECT), &researcher, &v1).await;
        expect_refused(
            &ch,
            "query signed with a revoked key",
            sign(base(), &dsu),
            &["UNAUTHENTICATED", "POLICY_DENIED"],
            &["revoked"],
        )
        .await;
        let budget = client::node_budget(ch.clone(), "dsu", None, &dsu).await;
        assert!(
            budget.is_err(),
            "a revoked key must not read its budget either: {budget:?}"
        );
        assert!(
            fed.nodes[0].policy_path().exists(),
            "policy file still in place"
        );
    });
}

async fn policy_version(ch: &Channel, key: &ed25519_dalek::SigningKey) -> String {
    client::node_describe(ch.clone(), "dsu", None, key)
        .await
        .expect("describe")
        .policy_version
}

async fn wait_new_version(ch: &Channel, key: &ed25519_dalek::SigningKey, old: &str) -> String {
    wait_new_version_as(ch, "dsu", None, key, old).await
}

async fn wait_new_version_as(
    ch: &Channel,
    requester: &str,
    project: Option<&str>,
    key: &ed25519_dalek::SigningKey,
    old: &str,
) -> String {
    for _ in 0..200 {
        if let Ok(d) = client::node_describe(ch.clone(), requester, project, key).await
            && d.policy_version != old
        {
            return d.policy_version;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the edited policy did not take effect within 20 s");
}

// ---------------------------------------------------------------------------------
// Bad input.

/// Protobuf length-delimited field `field` holding `bytes`.
fn ld(field: u32, bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 10);
    varint(&mut out, u64::from(field << 3 | 2));
    varint(&mut out, bytes.len() as u64);
    out.extend_from_slice(bytes);
    out
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let byte = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// A `Predicate` of `depth` NOTs around `age >= 0`, encoded by hand (building it as
/// nested Rust values would itself overflow the test's stack at 10,000 levels).
fn nested_not_bytes(depth: usize) -> Vec<u8> {
    let mut cmp = ld(1, b"age");
    cmp.extend_from_slice(&[0x10, proto::CompareOp::Ge as u8]);
    cmp.extend(ld(3, &[0x10, 0x00]));
    let mut pred = ld(1, &cmp);
    for _ in 0..depth {
        pred = ld(7, &ld(1, &pred));
    }
    pred
}

#[test]
fn malformed_oversized_and_deeply_nested_messages_get_clean_errors() {
    let ics = Ics::synth(20_000, 806);
    let id = first_gp(&ics);
    let max_bytes = read_toml(&ics.node_config(&id))
        .get("limits")
        .and_then(|l| l.get("max_message_bytes"))
        .and_then(toml::Value::as_integer)
        .unwrap_or(4 * 1024 * 1024) as usize;
    let mut fed = Federation::start_nodes(ics, std::slice::from_ref(&id), false);
    let dsu = client::load_key(&fed.ics.key("dsu"));
    let endpoint = fed.nodes[0].endpoint();
    let certs = fed.ics.certs();
    let good = || sign(planning(vec![], None, 0.05), &dsu);
    let good_bytes = client::query_request_bytes(good());

    const QUERY: &str = "/phm.v1.NodeService/Query";
    // (name, body bytes, acceptable reasons; empty = any clean gRPC error)
    let mut cases: Vec<(String, Vec<u8>, Vec<&str>)> = vec![
        ("64 bytes of 0xff".into(), vec![0xff; 64], vec![]),
        (
            "valid request truncated by 5 bytes".into(),
            good_bytes[..good_bytes.len() - 5].to_vec(),
            vec![],
        ),
        (
            "query field sent as a varint".into(),
            vec![0x08, 0x01],
            vec![],
        ),
        (
            "length prefix claiming 4 GiB".into(),
            vec![0x0a, 0xff, 0xff, 0xff, 0xff, 0x0f, 0x01],
            vec![],
        ),
        (
            "query_id not UTF-8".into(),
            ld(1, &ld(1, &[0xff, 0xfe, 0xfd])),
            vec![],
        ),
        (
            "empty request (no query)".into(),
            Vec::new(),
            vec!["INVALID_QUERY"],
        ),
        (
            "unknown purpose code 99".into(),
            {
                let mut q = good();
                q.purpose = 99;
                client::query_request_bytes(q)
            },
            vec!["INVALID_QUERY"],
        ),
    ];
    // A valid query plus an unknown field large enough to exceed max_message_bytes.
    let mut oversized_query = prost_encode(&good());
    oversized_query.extend(ld(15, &vec![b'x'; max_bytes + 1024]));
    cases.push((
        format!(
            "message of {} bytes > max_message_bytes {max_bytes}",
            max_bytes + 1024
        ),
        ld(1, &oversized_query),
        vec![],
    ));
    {
        // The signed query without filter, then a filter nested 33 deep appended:
        // protobuf merges it in; the node must refuse before checking the signature.
        let mut q = prost_encode(&good());
        q.extend(ld(6, &nested_not_bytes(33)));
        cases.push((
            "filter nested 33 NOTs deep (raw)".into(),
            ld(1, &q),
            vec!["INVALID_QUERY"],
        ));
    }

    rt().block_on(async {
        let ch = client::channel(&endpoint, &certs, Some("dsu-client"))
            .await
            .expect("mTLS channel");
        for (name, bytes, reasons) in cases {
            let r = client::unary_raw(ch.clone(), QUERY, bytes).await;
            let e = match r {
                Ok(body) => panic!(
                    "{name}: must be refused, node answered {} bytes",
                    body.len()
                ),
                Err(e) => e,
            };
            assert!(
                !matches!(e.code(), tonic::Code::Unknown | tonic::Code::Ok),
                "{name}: not a clean gRPC error: {e:?}"
            );
            assert!(!e.message().is_empty(), "{name}: the error must say why");
            if !reasons.is_empty() {
                let got = client::reason(&e);
                assert!(
                    reasons.contains(&got.as_str()),
                    "{name}: refused as {got} ({e:?}), expected {reasons:?}"
                );
            }
            assert!(
                fed.nodes[0].proc.is_running(),
                "{name}: the node died; log:\n{}",
                fed.nodes[0].proc.log_text()
            );
            assert_alive(&ch, &dsu, &name).await;
        }

        // 33 deep through the typed client, properly signed: INVALID_QUERY.
        let mut filter = cmp("age", CompareOp::Ge, Literal::Integer(0));
        for _ in 0..33 {
            filter = Predicate::Not(Box::new(filter));
        }
        expect_refused(
            &ch,
            "signed filter nested 33 NOTs deep",
            sign(planning(vec![], Some(filter), 0.05), &dsu),
            &["INVALID_QUERY"],
            &["nested"],
        )
        .await;
        assert_alive(&ch, &dsu, "33-deep filter").await;
    });
    assert!(
        fed.nodes[0].proc.is_running(),
        "node must survive bad input"
    );
}

/// 10,000 nested NOTs: far past protobuf's own recursion limit (100), so the refusal
/// happens while decoding; it must still be a clean INVALID_QUERY, node up.
#[test]
fn filter_nested_ten_thousand_deep_is_refused_as_invalid_query() {
    let ics = Ics::synth(20_000, 808);
    let id = first_gp(&ics);
    let mut fed = Federation::start_nodes(ics, std::slice::from_ref(&id), false);
    let dsu = client::load_key(&fed.ics.key("dsu"));
    let endpoint = fed.nodes[0].endpoint();
    let certs = fed.ics.certs();
    let mut q = prost_encode(&sign(planning(vec![], None, 0.05), &dsu));
    q.extend(ld(6, &nested_not_bytes(10_000)));
    rt().block_on(async {
        let ch = client::channel(&endpoint, &certs, Some("dsu-client"))
            .await
            .expect("mTLS channel");
        let e = client::unary_raw(ch.clone(), "/phm.v1.NodeService/Query", ld(1, &q))
            .await
            .expect_err("a 10,000-deep filter must be refused");
        assert_eq!(
            client::reason(&e),
            "INVALID_QUERY",
            "10,000-deep filter: {}",
            e.message().chars().take(300).collect::<String>()
        );
        assert!(fed.nodes[0].proc.is_running(), "node died");
        assert_alive(&ch, &dsu, "10,000-deep filter").await;
    });
}

/// Epsilon so small that sensitivity/epsilon overflows: refused before anything is
/// spent (INVALID_QUERY or POLICY_DENIED), or answered with noise of at least that
/// scale. Never an internal error after the spend.
#[test]
fn vanishing_epsilon_is_refused_before_any_spend_or_fully_noised() {
    let ics = Ics::synth(20_000, 809);
    let id = first_gp(&ics);
    let fed = Federation::start_nodes(ics, std::slice::from_ref(&id), false);
    let dsu = client::load_key(&fed.ics.key("dsu"));
    rt().block_on(async {
        let ch = client::channel(
            &fed.nodes[0].endpoint(),
            &fed.ics.certs(),
            Some("dsu-client"),
        )
        .await
        .expect("mTLS channel");
        for eps in [1e-300, 5e-324] {
            let name = format!("epsilon {eps:e}");
            let spent = |b: &proto::BudgetResponse| {
                client::ledger(b, "requester:dsu").map(|l| l.epsilon_spent)
            };
            let before = client::node_budget(ch.clone(), "dsu", None, &dsu)
                .await
                .expect("budget");
            match client::node_query(ch.clone(), sign(planning(vec![], None, eps), &dsu)).await {
                Ok(r) => {
                    let c = &r.rows[0].cells[0];
                    assert!(
                        c.noise_scale.is_finite() && c.noise_scale * eps >= 1.0 - 1e-9,
                        "{name}: answered with noise scale {} only",
                        c.noise_scale
                    );
                }
                Err(e) => {
                    let reason = client::reason(&e);
                    assert!(
                        matches!(reason.as_str(), "INVALID_QUERY" | "POLICY_DENIED"),
                        "{name}: refused as {reason}, expected INVALID_QUERY or POLICY_DENIED \
                         before any spend: {}",
                        e.message().chars().take(300).collect::<String>()
                    );
                    let after = client::node_budget(ch.clone(), "dsu", None, &dsu)
                        .await
                        .expect("budget");
                    assert_eq!(spent(&before), spent(&after), "{name}: refused but charged");
                }
            }
            assert_alive(&ch, &dsu, &name).await;
        }
    });
}

fn prost_encode(q: &proto::AggregateQuery) -> Vec<u8> {
    use prost::Message;
    q.encode_to_vec()
}

#[test]
fn absurd_epsilons_and_injection_strings_never_crash_or_leak_rows() {
    let ics = Ics::synth(20_000, 807);
    let id = first_gp(&ics);
    let policy = read_toml(&ics.policy_path(&id));
    let ds = dataset(&policy);
    // A filterable, non-identifier text column with a declared domain.
    let text_col = columns(&ds)
        .into_iter()
        .find(|c| {
            str_of(c, "type") == "text"
                && flag(c, "filter")
                && !flag(c, "identifier")
                && c.get("domain").is_some()
        })
        .map(|c| str_of(&c, "name").to_string())
        .expect("a filterable text column with a domain (e.g. sex)");
    let fed = Federation::start_nodes(ics, std::slice::from_ref(&id), false);
    let dsu = client::load_key(&fed.ics.key("dsu"));

    let with_eps = |eps: f64| planning(vec![], None, eps);
    let epsilon_cases: Vec<(&str, f64, &[&str])> = vec![
        ("epsilon 0", 0.0, &["INVALID_QUERY", "POLICY_DENIED"]),
        ("epsilon -1", -1.0, &["INVALID_QUERY", "POLICY_DENIED"]),
        ("epsilon -0.0", -0.0, &["INVALID_QUERY", "POLICY_DENIED"]),
        ("epsilon NaN", f64::NAN, &["INVALID_QUERY", "POLICY_DENIED"]),
        (
            "epsilon +inf",
            f64::INFINITY,
            &["INVALID_QUERY", "POLICY_DENIED"],
        ),
        (
            "epsilon -inf",
            f64::NEG_INFINITY,
            &["INVALID_QUERY", "POLICY_DENIED"],
        ),
        ("epsilon 1e300", 1e300, &["INVALID_QUERY", "POLICY_DENIED"]),
        (
            "epsilon f64::MAX",
            f64::MAX,
            &["INVALID_QUERY", "POLICY_DENIED"],
        ),
    ];

    let nasty = [
        "' OR 1=1 --",
        "'; DROP TABLE gp_patients; --",
        "\" OR \"\"=\"",
        "x' UNION SELECT nhs_number FROM gp_patients --",
        "%",
        "_",
        "\\",
        "🦀🏥💉",
        "\u{202E}elamef\u{202C}",
        "a\u{0}b",
        "\u{FEFF}",
        "",
    ];

    rt().block_on(async {
        let ch = client::channel(
            &fed.nodes[0].endpoint(),
            &fed.ics.certs(),
            Some("dsu-client"),
        )
        .await
        .expect("mTLS channel");
        for (name, eps, reasons) in epsilon_cases {
            expect_refused(&ch, name, sign(with_eps(eps), &dsu), reasons, &["epsilon"]).await;
            assert_alive(&ch, &dsu, name).await;
        }

        // Injection-looking literals: only ever literals. No row has these values, so
        // an answer must be noise around zero; SQL that escaped would count thousands.
        for s in nasty {
            for (shape, filter) in [
                ("=", cmp(&text_col, CompareOp::Eq, Literal::Text(s.into()))),
                (
                    "IN",
                    Predicate::InList {
                        column: text_col.clone(),
                        values: vec![Literal::Text(s.into()), Literal::Text(format!("{s}'"))],
                        negated: false,
                    },
                ),
                (
                    "BETWEEN",
                    Predicate::Between {
                        column: text_col.clone(),
                        low: Literal::Text(s.into()),
                        high: Literal::Text(s.into()),
                        negated: false,
                    },
                ),
            ] {
                let name = format!("{text_col} {shape} {s:?}");
                let q = sign(planning(vec![], Some(filter), 0.2), &dsu);
                match client::node_query(ch.clone(), q).await {
                    Ok(r) => {
                        assert_eq!(r.rows.len(), 1, "{name}: one figure, never rows");
                        assert_eq!(r.rows[0].cells.len(), 1, "{name}: one cell");
                        let c = &r.rows[0].cells[0];
                        assert!(c.noise_scale > 0.0, "{name}: answer must be noised");
                        let bound = noise_bound(c, 1);
                        assert!(
                            c.noisy_value.abs() <= bound,
                            "{name}: matched rows (noisy count {} beyond noise bound {bound})",
                            c.noisy_value
                        );
                    }
                    Err(e) => assert!(
                        matches!(
                            client::reason(&e).as_str(),
                            "INVALID_QUERY" | "POLICY_DENIED"
                        ),
                        "{name}: refused unclearly: {e:?}"
                    ),
                }
            }
        }
        assert_alive(&ch, &dsu, "injection literals").await;

        // Injection in identifiers the node might splice into SQL: always refused.
        let bad_names: Vec<(&str, AlterBody)> = vec![
            (
                "column name with a quote",
                Box::new(|b| {
                    b.filter = Some(cmp(
                        "sex' OR '1'='1",
                        CompareOp::Eq,
                        Literal::Text("F".into()),
                    ))
                }),
            ),
            (
                "group key with a semicolon",
                Box::new(|b| b.group_by = vec![GroupKey::Column("sex; DROP TABLE x".into())]),
            ),
            (
                "alias with SQL",
                Box::new(|b| b.aggregates = vec![count("n FROM gp_patients --")]),
            ),
            (
                "alias with emoji",
                Box::new(|b| b.aggregates = vec![count("🦀")]),
            ),
            (
                "dataset with a path",
                Box::new(|b| b.dataset = "../../etc/passwd".into()),
            ),
            (
                "dataset with SQL",
                Box::new(|b| b.dataset = "gp_patients; DROP TABLE gp_patients".into()),
            ),
            (
                "query id with RTL mark",
                Box::new(|b| b.query_id = "q\u{202E}1".into()),
            ),
            (
                "bin width NaN",
                Box::new(|b| {
                    b.group_by = vec![GroupKey::Bin {
                        column: "age".into(),
                        width: f64::NAN,
                    }]
                }),
            ),
            (
                "bin width negative",
                Box::new(|b| {
                    b.group_by = vec![GroupKey::Bin {
                        column: "age".into(),
                        width: -5.0,
                    }]
                }),
            ),
            (
                "quantile (reserved)",
                Box::new(|b| b.aggregates = vec![agg("q", AggregateKind::Quantile(0.5), "age")]),
            ),
            (
                "real literal infinity",
                Box::new(|b| {
                    b.filter = Some(cmp("age", CompareOp::Lt, Literal::Real(f64::INFINITY)))
                }),
            ),
        ];
        for (name, alter) in bad_names {
            let mut b = planning(vec![], None, 0.1);
            alter(&mut b);
            expect_refused(
                &ch,
                name,
                sign(b, &dsu),
                &["INVALID_QUERY", "POLICY_DENIED"],
                &[],
            )
            .await;
        }
        assert_alive(&ch, &dsu, "injection in names").await;
    });
}

type MakeQuery = Box<dyn Fn() -> QueryBody>;
type AlterBody = Box<dyn Fn(&mut QueryBody)>;
