//! Secure aggregation end to end: `phm query --secure` through the real coordinator and
//! the synthetic ICS's GP practices (one session, the system total only, honest
//! intervals around the synthetic truth, no partner figure anywhere in the result), then
//! this test standing in for the coordinator at one practice: a second session for the
//! same query id is refused, and so is a plain query on the secure stream (a downgrade
//! the requester did not sign); and practices killed mid-session (after R1, after R2):
//! named in coverage, the total still released, the killed practice's spend in its
//! ledger and audit log when it comes back, and no node ever holding a connection it
//! opened itself.

use crate::rt;
use phm_e2e::client::{self, body, count, sign};
use phm_e2e::{Federation, Restart};
use phm_proto::proto;
use phm_proto::proto::sec_agg_up::Step as Up;
use phm_proto::{Aggregation, CompareOp, GroupKey, Literal, Predicate, Purpose, QueryBody};
use std::collections::BTreeMap;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const PLANNING_1: &[&str] = &["--purpose", "planning", "--epsilon", "1"];

const SQL: &str = "SELECT imd_quintile, COUNT(*) AS diabetics FROM gp_patients \
                   WHERE diabetes = TRUE GROUP BY imd_quintile";

/// Diabetics per IMD quintile in the synthetic truth (the reference's age bands added up).
fn truth(fed: &Federation) -> BTreeMap<String, f64> {
    let reference = phm_devkit::synth::load_reference(&fed.ics.root).unwrap();
    let q = reference
        .questions
        .iter()
        .find(|q| q.id == phm_devkit::questions::DIABETES_BY_IMD_AGE.id)
        .unwrap();
    let at = q
        .group_columns
        .iter()
        .position(|c| c == "imd_quintile")
        .unwrap();
    let mut out = BTreeMap::new();
    for row in &q.rows {
        *out.entry(row.key[at].clone()).or_insert(0.0) += row.values["diabetics"];
    }
    out
}

#[test]
fn a_secure_query_gives_one_system_total_within_its_interval_and_no_partner_figure() {
    let fed = Federation::start(20_000, 41, None);
    let gps = fed.ics.nodes_serving("gp_patients");
    assert!(gps.len() >= 5, "{gps:?}");
    let truth = truth(&fed);
    let r = fed.query_json("dsu", &[PLANNING_1, &["--secure"]].concat(), SQL);
    let answered: Vec<&str> = r["coverage"]["answered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert_eq!(
        answered.len(),
        gps.len(),
        "every practice is in the total: {r}"
    );
    assert_eq!(r["partial"], false, "{r}");
    let note = r["total_note"].as_str().unwrap();
    assert!(note.contains("Secure aggregation"), "{note}");
    assert!(
        note.contains("plain mode would give"),
        "both predictions are shown: {note}"
    );
    let rows = r["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 5, "one row per declared quintile: {r}");
    for row in rows {
        let q = row["group"]["imd_quintile"].as_str().unwrap().to_string();
        let cell = &row["values"]["diabetics"];
        assert_eq!(cell["suppressed"], false, "{row}");
        let (est, se) = (
            cell["estimate"].as_f64().unwrap(),
            cell["noise_scale"].as_f64().unwrap(),
        );
        // One system figure, from every practice's share of the noise.
        assert_eq!(cell["contributors"].as_u64().unwrap() as usize, gps.len());
        assert!(
            se > 1.0,
            "the total carries the noise of a central release: {se}"
        );
        // The noise is a sum of discrete Gaussians of this sd: 6 sd is a failure
        // probability of 2e-9; the policies round to 5.
        let exact = truth[&q];
        assert!(
            (est - exact).abs() <= 6.0 * se + 5.0,
            "quintile {q}: {est} vs exact {exact} (sd {se})"
        );
        let ci = cell["ci95"].as_array().unwrap();
        let (lo, hi) = (ci[0].as_f64().unwrap(), ci[1].as_f64().unwrap());
        assert!(
            lo <= est && est <= hi && hi - lo >= 2.0 * 1.9 * se - 10.0,
            "{cell}"
        );
    }
    // No per-partner figure anywhere: the JSON holds the system rows and nothing keyed
    // by a practice.
    let text = r.to_string();
    assert!(r.get("breakdowns").is_none(), "{r}");
    for gp in &gps {
        assert_eq!(
            text.matches(gp.as_str()).count(),
            1,
            "{gp} appears only in coverage: {text}"
        );
    }

    // The same question in plain mode, beside it: each practice's own noisy figure.
    let plain = fed.query_json("dsu", PLANNING_1, SQL);
    assert!(
        !plain["total_note"]
            .as_str()
            .unwrap()
            .contains("Secure aggregation")
    );

    // Every practice audited its part: allowed, with the session's parameters.
    for gp in &gps {
        let log = fed.ics.root.join(gp).join("state/audit.log");
        let text = std::fs::read_to_string(&log).unwrap();
        let entry = text
            .lines()
            .rev()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|e| e["rpc"] == "secure_aggregate")
            .unwrap_or_else(|| panic!("{gp} audited no secure session"));
        assert_eq!(entry["decision"], "allowed", "{entry}");
        assert_eq!(entry["epsilon_spent"], 1.0, "{entry}");
        let reasons = entry["reasons"].to_string();
        assert!(reasons.contains("secure aggregation: N"), "{reasons}");
    }
}

fn secure_body(epsilon: f64) -> QueryBody {
    let mut q = body(
        "dsu",
        Purpose::Planning,
        "gp_patients",
        vec![GroupKey::Column("imd_quintile".into())],
        vec![count("diabetics")],
        Some(Predicate::Compare {
            column: "diabetes".into(),
            op: CompareOp::Eq,
            value: Literal::Boolean(true),
        }),
        epsilon,
    );
    q.aggregation = Aggregation::SecureSum;
    q
}

/// Open a SecureAggregate stream to a node as the coordinator, sending `query` first.
async fn open_secure(
    ch: tonic::transport::Channel,
    query: proto::AggregateQuery,
) -> Result<
    (
        mpsc::Sender<proto::SecAggUp>,
        tonic::Streaming<proto::SecAggDown>,
    ),
    tonic::Status,
> {
    let (tx, rx) = mpsc::channel(4);
    tx.send(proto::SecAggUp {
        step: Some(Up::Open(proto::SecAggOpen { query: Some(query) })),
    })
    .await
    .map_err(|_| tonic::Status::internal("the stream closed before the open"))?;
    let mut c = proto::node_service_client::NodeServiceClient::new(ch);
    let stream = c
        .secure_aggregate(ReceiverStream::new(rx))
        .await?
        .into_inner();
    Ok((tx, stream))
}

/// Open a SecureAggregate stream to a node as the coordinator and read its first reply.
async fn first_reply(
    ch: tonic::transport::Channel,
    query: proto::AggregateQuery,
) -> Result<proto::SecAggDown, tonic::Status> {
    let (tx, mut stream) = open_secure(ch, query).await?;
    let reply = stream.message().await?;
    drop(tx);
    reply.ok_or_else(|| tonic::Status::internal("closed without a message"))
}

/// As the coordinator: open a session, read the node's terms, send a Begin naming a
/// registry by `registry_digest`, and return the node's refusal.
async fn refusal_after_begin(
    ch: tonic::transport::Channel,
    query: proto::AggregateQuery,
    cohort: Vec<String>,
    registry_digest: Vec<u8>,
) -> String {
    let (tx, mut stream) = open_secure(ch, query).await.unwrap();
    let Some(proto::sec_agg_down::Step::Terms(t)) = stream.message().await.unwrap().unwrap().step
    else {
        panic!("expected terms");
    };
    let n = u32::try_from(cohort.len()).unwrap();
    tx.send(proto::SecAggUp {
        step: Some(Up::Begin(proto::SecAggBegin {
            session_nonce: vec![7; 32],
            cohort,
            params: Some(proto::SecAggParams {
                n,
                t_sss: n / 2 + 1,
                t_noise: n,
                c: 1,
                lattice: 8,
                gammas: t.gammas.clone(),
                layout_digest: t.layout_digest.clone(),
                sigma_share: 4.0,
            }),
            registry_digest,
        })),
    })
    .await
    .unwrap();
    let status = stream.message().await.unwrap_err();
    client::denial_text(&status)
}

#[test]
fn a_node_joins_one_secure_session_per_query_id_and_refuses_a_downgrade() {
    let fed = Federation::start(20_000, 43, None);
    let gp = fed.ics.nodes_serving("gp_patients")[0].clone();
    let endpoint = fed
        .nodes
        .iter()
        .find(|n| n.id == gp)
        .map(|n| n.endpoint())
        .unwrap();
    let certs = fed.ics.certs();
    let dsu = client::load_key(&fed.ics.key("dsu"));
    let id = "e2e-secure-once";
    let r = fed.query_json(
        "dsu",
        &[PLANNING_1, &["--secure", "--query-id", id]].concat(),
        SQL,
    );
    assert_eq!(r["partial"], false, "{r}");
    rt().block_on(async {
        let ch = client::channel(&endpoint, &certs, Some(client::RELAY_CERT))
            .await
            .unwrap();
        // The same question and id, freshly signed: the practice already took part in a
        // session for it, so a second one (a second total to difference) is refused.
        let mut again = secure_body(1.0);
        again.query_id = id.into();
        let status = first_reply(ch.clone(), sign(again, &dsu))
            .await
            .unwrap_err();
        let text = client::denial_text(&status);
        assert!(
            text.contains("already joined secure-aggregation session"),
            "{text}"
        );
        // A plain query on the secure stream: refused before anything is decided.
        let mut plain = secure_body(1.0);
        plain.aggregation = Aggregation::Plain;
        let status = first_reply(ch.clone(), sign(plain, &dsu))
            .await
            .unwrap_err();
        let text = client::denial_text(&status);
        assert!(
            text.contains("does not ask for secure aggregation"),
            "{text}"
        );
        // A fresh secure query: the node states its terms, and has spent nothing yet
        // (the spend is part of its commit, after the shares arrive).
        let before = {
            let b = client::node_budget(ch.clone(), "dsu", None, &dsu)
                .await
                .unwrap();
            client::ledger(&b, "requester:dsu").unwrap().epsilon_spent
        };
        let reply = first_reply(ch.clone(), sign(secure_body(1.0), &dsu))
            .await
            .unwrap();
        let Some(proto::sec_agg_down::Step::Terms(t)) = reply.step else {
            panic!("expected terms, got {reply:?}");
        };
        assert_eq!(t.keys.len(), 5);
        assert!(t.rho > 0.0 && t.delta2 > 0.0);
        let after = {
            let b = client::node_budget(ch.clone(), "dsu", None, &dsu)
                .await
                .unwrap();
            client::ledger(&b, "requester:dsu").unwrap().epsilon_spent
        };
        assert_eq!(before, after, "nothing is spent before the commit step");
        // A Begin naming another registry than the node's own: refused before any key
        // is advertised (the node never takes a registry from the coordinator).
        let cohort: Vec<String> = fed.ics.nodes_serving("gp_patients");
        let text = refusal_after_begin(ch.clone(), sign(secure_body(1.0), &dsu), cohort, vec![9; 32])
            .await;
        assert!(
            text.contains("the coordinator opened this session under node registry 090909090909…, but this node holds registry serial"),
            "{text}"
        );
    });
}

/// Has `log` recorded that this node's message of `round` left for query `id`?
fn round_sent(log: &std::path::Path, id: &str, round: &str) -> bool {
    std::fs::read_to_string(log).is_ok_and(|text| {
        text.lines()
            .any(|l| l.contains("secure round sent") && l.contains(id) && l.contains(round))
    })
}

/// TCP sockets `pid` holds that are not on its own listening port: outbound
/// connections (established or being opened). A node's only sockets should be its
/// listener and the connections the coordinator opened to it.
fn outbound_sockets(pid: u32, listen_port: u16) -> Vec<String> {
    let inodes: std::collections::BTreeSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|rd| {
            rd.filter_map(Result::ok)
                .filter_map(|e| std::fs::read_link(e.path()).ok())
                .filter_map(|l| {
                    let l = l.to_string_lossy().to_string();
                    l.strip_prefix("socket:[")
                        .and_then(|r| r.strip_suffix(']'))
                        .map(str::to_string)
                })
                .collect()
        })
        .unwrap_or_default();
    let mut out = Vec::new();
    for table in ["tcp", "tcp6"] {
        let text = std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(state), Some(inode)) = (f.get(1), f.get(3), f.get(9)) else {
                continue;
            };
            if !inodes.contains(*inode) || *state == "0A" {
                continue; // another process's socket, or a listener
            }
            let port = local
                .rsplit_once(':')
                .and_then(|(_, p)| u16::from_str_radix(p, 16).ok());
            if port != Some(listen_port) {
                out.push(format!("{table} {line}"));
            }
        }
    }
    out
}

#[test]
fn practices_dropping_mid_session_are_named_the_total_survives_and_nodes_never_connect_to_each_other()
 {
    let ics = phm_e2e::Ics::synth(20_000, 47);
    let mut fed =
        Federation::start_with_env(ics, &[("RUST_LOG", "info,phm_node::service::secure=debug")]);
    let gps = fed.ics.nodes_serving("gp_patients");
    assert!(gps.len() >= 5, "{gps:?}");
    let port = |fed: &Federation, id: &str| -> u16 {
        let n = fed.nodes.iter().find(|n| n.id == id).unwrap();
        n.addr.rsplit_once(':').unwrap().1.parse().unwrap()
    };
    let run = |fed: &mut Federation, id: &str, victim: &str, round: &str| -> serde_json::Value {
        let fed_ref: &Federation = fed;
        let log = fed_ref
            .nodes
            .iter()
            .find(|n| n.id == victim)
            .unwrap()
            .proc
            .log
            .clone();
        let watched: Vec<(u32, u16, String)> = fed_ref
            .nodes
            .iter()
            .filter(|n| gps.contains(&n.id))
            .map(|n| (n.proc.pid(), port(fed_ref, &n.id), n.id.clone()))
            .collect();
        std::thread::scope(|scope| {
            let query = scope.spawn(|| {
                fed_ref.query_json(
                    "dsu",
                    &[PLANNING_1, &["--secure", "--query-id", id]].concat(),
                    SQL,
                )
            });
            let mut killed = false;
            while !query.is_finished() {
                for (pid, port, node) in &watched {
                    let out = outbound_sockets(*pid, *port);
                    assert!(
                        out.is_empty(),
                        "{node} opened a connection of its own: {out:?}"
                    );
                }
                if !killed && round_sent(&log, id, round) {
                    fed_ref
                        .nodes
                        .iter()
                        .find(|n| n.id == victim)
                        .unwrap()
                        .proc
                        .signal("KILL");
                    killed = true;
                }
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            assert!(killed, "{victim} never logged its {round} message");
            query.join().unwrap()
        })
    };

    // A practice killed once its R1 shares left: named in coverage, not in the total,
    // and the others' total is still released.
    let (a, b) = (gps[0].clone(), gps[1].clone());
    // The victim is held (a fail point, test builds only) between the step the watcher
    // waits for and the next, so the kill lands exactly there however fast the rest is.
    let hold = |fed: &mut Federation, victim: &str, point: &str| {
        let failpoints = format!("{point}=sleep(60000)");
        fed.node(victim).restart_with_env(&[
            ("RUST_LOG", "info,phm_node::service::secure=debug"),
            ("FAILPOINTS", &failpoints),
        ]);
    };
    hold(&mut fed, &a, "secure-before-commit");
    let r = run(&mut fed, "e2e-secure-drop-r1", &a, "R1 (shares)");
    let answered: Vec<String> = r["coverage"]["answered"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect();
    assert!(!answered.contains(&a), "{r}");
    assert_eq!(answered.len(), gps.len() - 1, "{r}");
    assert_eq!(r["partial"], true, "{r}");
    assert!(
        r.to_string().contains(&a),
        "coverage names the practice that dropped: {r}"
    );
    for row in r["rows"].as_array().unwrap() {
        assert_eq!(
            row["values"]["diabetics"]["contributors"].as_u64().unwrap() as usize,
            gps.len() - 1,
            "{row}"
        );
    }
    fed.node(&a)
        .proc
        .wait_exit(std::time::Duration::from_secs(5));
    fed.node(&a).restart();

    // A practice killed once its masked input left has spent: the spend is in its
    // ledger and its audit log when it comes back, though its session ended without it.
    let certs = fed.ics.certs();
    let dsu = client::load_key(&fed.ics.key("dsu"));
    // ρ: Gaussian releases compose in zCDP on the ledger, so its ε is not additive.
    let spent = |fed: &Federation| -> f64 {
        let endpoint = fed.nodes.iter().find(|n| n.id == b).unwrap().endpoint();
        rt().block_on(async {
            let ch = client::channel(&endpoint, &certs, Some(client::RELAY_CERT))
                .await
                .unwrap();
            let budget = client::node_budget(ch, "dsu", None, &dsu).await.unwrap();
            client::ledger(&budget, "requester:dsu").unwrap().rho_spent
        })
    };
    hold(&mut fed, &b, "secure-after-masked-input");
    let before = spent(&fed);
    let id = "e2e-secure-drop-r2";
    let r = run(&mut fed, id, &b, "R2 (masked input)");
    let answered = r["coverage"]["answered"].as_array().unwrap().len();
    assert!(answered >= gps.len() - 1, "{r}");
    for row in r["rows"].as_array().unwrap() {
        assert_eq!(
            row["values"]["diabetics"]["contributors"].as_u64().unwrap() as usize,
            answered,
            "{row}"
        );
    }
    fed.node(&b)
        .proc
        .wait_exit(std::time::Duration::from_secs(5));
    fed.node(&b).restart();
    let after = spent(&fed);
    let log = fed.ics.root.join(&b).join("state/audit.log");
    let text = std::fs::read_to_string(&log).unwrap();
    let entry = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|e| e["query_id"] == id && e["rpc"] == "secure_aggregate")
        .unwrap_or_else(|| panic!("{b}'s audit log has no entry for the killed session"));
    assert_eq!(entry["epsilon_spent"], 1.0, "{entry}");
    let rho = entry["ledger_spend"]["rho"].as_f64().unwrap();
    assert!(rho > 0.0, "{entry}");
    assert!(
        (after - before - rho).abs() < 1e-12,
        "{b}'s ledger gained rho {} in the session it was killed in; its audit entry says {rho}",
        after - before
    );
}
