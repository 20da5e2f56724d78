//! Red team: who may talk to a node, and to the coordinator.
//!
//! The attack this closes: an analyst with an ordinary `dsu-client` certificate runs a
//! coordinator of their own (that certificate as its client identity), registers the
//! `system_total_only` acute trust (RW2) plus a node of their own that contributes
//! nothing, and reads RW2's admissions by Place on their own. It worked because every
//! client certificate chained to the one CA the nodes trusted.
//!
//! Three defences, each tested on its own so that removing any one fails a test:
//! - **separate CAs**: nodes trust only the infrastructure CA for clients, so a person's
//!   certificate (people CA) is refused at a node's TLS handshake;
//! - **pinning**: a node answers Query, Budget and Describe only for the client
//!   identities in its `tls.allowed_clients` (the coordinator's), refusing every other
//!   certificate, even from the CA it trusts, with `PERMISSION_DENIED`, audited. Tested
//!   with a freshly issued infrastructure certificate, and with RW2 configured to trust
//!   the people CA as well (the one-CA deployments of before, or a misconfiguration);
//! - **mandatory client certificates at the coordinator**.
//!
//! Everything runs as real processes on loopback ports chosen at run time, with the
//! certificates `phm synth` and `phm certs dev` generate.

use crate::rt;
use phm_e2e::client::{self, body, count, sign};
use phm_e2e::{
    Federation, Ics, Proc, Restart, bins, edit_toml, free_port, phm, read_toml, spawn,
    wait_listening,
};
use phm_proto::{GroupKey, Purpose};
use std::path::{Path, PathBuf};
use std::time::Duration;

const PROTECTED: &str = "RW2";
const OTHER_TRUST: &str = "RW1";
const ANALYST_NODE: &str = "ZZ999";
const SQL: &str = "SELECT place, COUNT(*) AS admissions FROM acute_admissions GROUP BY place";

fn s(p: &Path) -> String {
    p.display().to_string()
}

fn place_count(requester: &str) -> phm_proto::QueryBody {
    body(
        requester,
        Purpose::Planning,
        "acute_admissions",
        vec![GroupKey::Column("place".into())],
        vec![count("admissions")],
        None,
        0.2,
    )
}

/// Concatenate PEM files into one (a CA bundle).
fn bundle(out: &Path, parts: &[PathBuf]) -> PathBuf {
    let mut text = String::new();
    for p in parts {
        text.push_str(&std::fs::read_to_string(p).unwrap());
        text.push('\n');
    }
    std::fs::write(out, text).unwrap();
    out.to_path_buf()
}

/// Audit-log entries of a node (JSON lines), read while it runs: each is fsynced.
fn audit_entries(node_dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(node_dir.join("state/audit.log"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// Was a call refused before the node's service ever saw it (TLS handshake), rather
/// than answered or refused with a phm Denial?
async fn refused_at_handshake(
    endpoint: &str,
    ca: &Path,
    cert: &Path,
    key: &Path,
    q: phm_proto::proto::AggregateQuery,
) -> Result<(), String> {
    let ch = match client::channel_exact(endpoint, ca, Some((cert, key))).await {
        Err(_) => return Ok(()),
        Ok(ch) => ch,
    };
    match client::node_query(ch, q).await {
        Ok(_) => Err("the node answered".into()),
        // A phm refusal carries a Denial in the status details; a handshake failure
        // surfaces as a bare transport error.
        Err(status) if status.details().is_empty() => Ok(()),
        Err(status) => Err(format!(
            "the handshake let it through; the service refused it {} ({})",
            client::reason(&status),
            status.message()
        )),
    }
}

/// The analyst's own infrastructure: a CA of their own, a server certificate for their
/// coordinator and their node, a node that serves `acute_admissions` from an empty file,
/// and a coordinator that relays with the analyst's `dsu-client` certificate.
struct AnalystRig {
    dir: PathBuf,
    node: Proc,
    coordinator: Proc,
    url: String,
}

impl AnalystRig {
    fn start(fed: &Federation, dir: &Path) -> AnalystRig {
        let certs = fed.ics.certs();
        let own = dir.join("certs");
        let (code, _, err) = phm(&[
            "certs",
            "dev",
            "--out",
            &s(&own),
            "--servers",
            "analyst-coordinator,analyst-node",
        ]);
        assert_eq!(code, 0, "phm certs dev for the analyst: {err}");

        // The analyst's node: RW2's published policy shape, released standalone, over
        // a file with no rows, so it contributes nothing and everything in a system
        // total would be RW2's.
        let node_dir = dir.join(ANALYST_NODE);
        std::fs::create_dir_all(node_dir.join("data")).unwrap();
        // The analyst's services accept the analyst's certificate whichever of the
        // federation's (public) CA certificates issued it.
        let ics_cas = bundle(
            &dir.join("ics-cas.pem"),
            &[certs.join("ca.pem"), certs.join("people-ca.pem")],
        );
        let mut policy = read_toml(&fed.ics.policy_path(PROTECTED));
        let header: Vec<String>;
        {
            let org = policy["organisation"].as_table_mut().unwrap();
            org.insert("ods_code".into(), ANALYST_NODE.into());
            org.insert("name".into(), "The analyst's own node".into());
            let release = policy["release"].as_table_mut().unwrap();
            release.insert("scope".into(), "standalone".into());
            // The analyst's node is in no node registry: it takes part in no linked or
            // secure query, so its policy pins no registry key.
            policy.remove("peers");
            policy.remove("linkage");
            let ds = policy["datasets"].as_array_mut().unwrap()[0]
                .as_table_mut()
                .unwrap();
            header = ds["columns"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c["name"].as_str().unwrap().to_string())
                .collect();
            let mut source = toml::Table::new();
            source.insert("format".into(), "csv".into());
            source.insert("path".into(), "data/empty.csv".into());
            ds.insert("source".into(), toml::Value::Table(source));
        }
        std::fs::write(node_dir.join("data/empty.csv"), header.join(",") + "\n").unwrap();
        std::fs::write(
            node_dir.join("policy.toml"),
            toml::to_string(&policy).unwrap(),
        )
        .unwrap();
        let node_addr = format!("127.0.0.1:{}", free_port());
        let node_toml = format!(
            "federation_id = {fed_id:?}\npolicy = \"policy.toml\"\ndata_dir = \"state\"\n\
             listen = {node_addr:?}\n[tls]\ncert = {cert:?}\nkey = {key:?}\n\
             client_ca = {people:?}\nallowed_clients = [\"san:dsu-client\"]\n",
            fed_id = phm_e2e::FEDERATION_ID,
            cert = s(&own.join("analyst-node.pem")),
            key = s(&own.join("analyst-node.key")),
            people = s(&ics_cas),
        );
        std::fs::write(node_dir.join("node.toml"), node_toml).unwrap();
        let mut node = spawn(
            "analyst node",
            &bins().node,
            &["--config", &s(&node_dir.join("node.toml"))],
            dir.join("analyst-node.log"),
        );
        wait_listening(&node_addr, &mut node);

        // The analyst's coordinator: the real coordinator.toml (as published to
        // partners), relaying with the analyst's own certificate to RW2 and to the
        // analyst's node. It trusts the federation's infrastructure CA (RW2's server
        // certificate) and the analyst's own CA (their node's).
        let cdir = dir.join("coordinator");
        std::fs::create_dir_all(&cdir).unwrap();
        let config = cdir.join("coordinator.toml");
        std::fs::copy(fed.ics.coordinator_config(), &config).unwrap();
        let node_ca = bundle(
            &cdir.join("node-cas.pem"),
            &[certs.join("ca.pem"), own.join("ca.pem")],
        );
        let addr = format!("127.0.0.1:{}", free_port());
        let rw2_endpoint = fed
            .nodes
            .iter()
            .find(|n| n.id == PROTECTED)
            .map(|n| n.endpoint())
            .unwrap();
        // The published file names the registry relative to the ICS's folder.
        let registry = fed
            .ics
            .coordinator_config()
            .parent()
            .map(|d| d.join("../peer/registry.toml"))
            .unwrap();
        edit_toml(&config, |t| {
            if let Some(sa) = t
                .get_mut("secure_aggregation")
                .and_then(|v| v.as_table_mut())
            {
                sa.insert("registry".into(), s(&registry).into());
            }
            t.insert("listen".into(), addr.clone().into());
            t.insert("data_dir".into(), s(&cdir.join("state")).into());
            let tls = t["tls"].as_table_mut().unwrap();
            tls.insert(
                "cert".into(),
                s(&own.join("analyst-coordinator.pem")).into(),
            );
            tls.insert("key".into(), s(&own.join("analyst-coordinator.key")).into());
            tls.insert("client_ca".into(), s(&ics_cas).into());
            let ct = t["client_tls"].as_table_mut().unwrap();
            ct.insert("cert".into(), s(&certs.join("dsu-client.pem")).into());
            ct.insert("key".into(), s(&certs.join("dsu-client.key")).into());
            ct.insert("ca".into(), s(&node_ca).into());
            let nodes = t["nodes"].as_array_mut().unwrap();
            nodes.retain(|n| n["id"].as_str() == Some(PROTECTED));
            nodes[0]
                .as_table_mut()
                .unwrap()
                .insert("endpoint".into(), rw2_endpoint.clone().into());
            let mut mine = toml::Table::new();
            mine.insert("id".into(), ANALYST_NODE.into());
            mine.insert("name".into(), "The analyst's own node".into());
            mine.insert("kind".into(), "acute_trust".into());
            mine.insert("place".into(), "North".into());
            mine.insert("endpoint".into(), format!("https://{node_addr}").into());
            mine.insert("tls_server_name".into(), "localhost".into());
            mine.insert(
                "datasets".into(),
                toml::Value::Array(vec!["acute_admissions".into()]),
            );
            nodes.push(toml::Value::Table(mine));
        });
        let mut coordinator = spawn(
            "analyst coordinator",
            &bins().coordinator,
            &["--config", &s(&config)],
            dir.join("analyst-coordinator.log"),
        );
        wait_listening(&addr, &mut coordinator);
        AnalystRig {
            dir: dir.to_path_buf(),
            node,
            coordinator,
            url: format!("https://{addr}"),
        }
    }

    /// `phm query` through the analyst's coordinator, as the DSU; the JSON answer.
    fn query(&self, ics: &Ics, query_id: &str) -> serde_json::Value {
        let certs = ics.certs();
        let (code, out, err) = phm(&[
            "query",
            "--coordinator",
            &self.url,
            "--ca",
            &s(&self.dir.join("certs/ca.pem")),
            "--cert",
            &s(&certs.join("dsu-client.pem")),
            "--cert-key",
            &s(&certs.join("dsu-client.key")),
            "--key",
            &s(&ics.key("dsu")),
            "--federation",
            phm_e2e::FEDERATION_ID,
            "--purpose",
            "planning",
            "--format",
            "json",
            "--query-id",
            query_id,
            SQL,
        ]);
        assert!(
            code == 0 || code == 4,
            "phm query through the analyst's coordinator (exit {code}):\n{out}\n{err}\n\
             analyst coordinator log:\n{}\nanalyst node log:\n{}",
            self.coordinator.log_text(),
            self.node.log_text()
        );
        serde_json::from_str(&out)
            .unwrap_or_else(|e| panic!("phm query --format json: {e}: {out}\n{err}"))
    }
}

fn ids(v: &serde_json::Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .map(|x| x.as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

fn refusal<'a>(answer: &'a serde_json::Value, node: &str) -> Option<&'a serde_json::Value> {
    answer["coverage"]["refused"]
        .as_array()?
        .iter()
        .find(|r| r["node"] == node)
}

#[test]
fn an_analyst_run_coordinator_gets_nothing_from_the_protected_trust() {
    let ics = Ics::synth(20_000, 31);
    let mut fed =
        Federation::start_nodes(ics, &[OTHER_TRUST.to_string(), PROTECTED.to_string()], true);
    let certs = fed.ics.certs();
    let rw2_dir = fed.ics.root.join(PROTECTED);
    let dsu = client::load_key(&fed.ics.key("dsu"));

    // The real, pinned coordinator still works, and shows RW2 only inside the total.
    let (code, out, err) = phm(&[
        "query",
        "--coordinator",
        &fed.coordinator_url(),
        "--ca",
        &s(&certs.join("ca.pem")),
        "--cert",
        &s(&certs.join("dsu-client.pem")),
        "--cert-key",
        &s(&certs.join("dsu-client.key")),
        "--key",
        &s(&fed.ics.key("dsu")),
        "--federation",
        phm_e2e::FEDERATION_ID,
        "--purpose",
        "planning",
        "--format",
        "json",
        SQL,
    ]);
    assert_eq!(code, 0, "the federation's own coordinator:\n{out}\n{err}");
    let real: serde_json::Value = serde_json::from_str(&out).unwrap();
    let mut answered = ids(&real["coverage"]["answered"]);
    answered.sort();
    assert_eq!(answered, vec![OTHER_TRUST, PROTECTED], "{real}");

    let tmp = tempfile::tempdir().unwrap();
    let rig = AnalystRig::start(&fed, tmp.path());

    // 1. As synthesised (separate CAs): the analyst's certificate cannot complete a
    // handshake with RW2, so RW2 contributes nothing to the analyst's coordinator.
    let answer = rig.query(&fed.ics, "pin-attack-1");
    let answered = ids(&answer["coverage"]["answered"]);
    assert!(
        !answered.iter().any(|n| n == PROTECTED),
        "RW2 answered the analyst's own coordinator: {answer}\nRW2 log:\n{}",
        fed.node(PROTECTED).proc.log_text()
    );
    assert!(
        ids(&answer["coverage"]["unreachable"])
            .iter()
            .any(|n| n == PROTECTED),
        "RW2 must be refused at the handshake (reported unreachable): {answer}"
    );
    assert!(
        audit_entries(&rw2_dir).iter().all(|e| !e["client_identity"]
            .as_str()
            .unwrap_or_default()
            .contains("dsu-client")),
        "nothing from the analyst's certificate may reach RW2's service"
    );
    rt().block_on(async {
        let q = sign(place_count("dsu"), &dsu);
        refused_at_handshake(
            &fed.node(PROTECTED).endpoint(),
            &certs.join("ca.pem"),
            &certs.join("dsu-client.pem"),
            &certs.join("dsu-client.key"),
            q,
        )
        .await
        .unwrap_or_else(|e| panic!("the analyst's certificate at RW2's handshake: {e}"));
    });

    // 2. Pinning on its own: RW2 now also trusts the people CA (one CA for everything,
    // as before, or a misconfigured node). The handshake succeeds; the pin refuses,
    // PERMISSION_DENIED, and RW2 audits it.
    {
        let node = fed.node(PROTECTED);
        node.proc.terminate(Duration::from_secs(30));
        let both = bundle(
            &rw2_dir.join("infra-and-people-ca.pem"),
            &[certs.join("ca.pem"), certs.join("people-ca.pem")],
        );
        edit_toml(&node.config, |t| {
            t["tls"]
                .as_table_mut()
                .unwrap()
                .insert("client_ca".into(), s(&both).into());
        });
        node.restart();
    }
    let answer = rig.query(&fed.ics, "pin-attack-2");
    let answered = ids(&answer["coverage"]["answered"]);
    assert!(
        !answered.iter().any(|n| n == PROTECTED),
        "RW2 answered a coordinator relaying with an analyst's certificate: {answer}"
    );
    let r = refusal(&answer, PROTECTED)
        .unwrap_or_else(|| panic!("RW2 must refuse the analyst's coordinator: {answer}"));
    assert_eq!(r["reason"], "PERMISSION_DENIED", "{answer}");
    assert!(
        r["message"].as_str().unwrap().contains("allowed_clients"),
        "{answer}"
    );
    for row in answer["rows"].as_array().unwrap() {
        for (alias, v) in row["values"].as_object().unwrap() {
            assert!(
                v["contributors"].as_u64().unwrap_or(0) <= 1,
                "{alias}: only the analyst's empty node may contribute: {row}"
            );
        }
    }
    let audited = audit_entries(&rw2_dir);
    let entry = audited
        .iter()
        .find(|e| e["query_id"] == "pin-attack-2")
        .unwrap_or_else(|| panic!("RW2's audit log must record the refusal: {audited:?}"));
    assert_eq!(entry["reason"], "PERMISSION_DENIED", "{entry}");
    assert_eq!(entry["requester"], "dsu", "{entry}");
    assert!(
        entry["client_identity"]
            .as_str()
            .unwrap()
            .contains("dsu-client"),
        "{entry}"
    );

    // Direct calls with the analyst's certificate: Query, Budget, Describe.
    rt().block_on(async {
        let ch = client::channel_exact(
            &fed.node(PROTECTED).endpoint(),
            &certs.join("ca.pem"),
            Some((&certs.join("dsu-client.pem"), &certs.join("dsu-client.key"))),
        )
        .await
        .expect("RW2 now completes the handshake");
        let before = audit_entries(&rw2_dir).len();
        let q = client::node_query(ch.clone(), sign(place_count("dsu"), &dsu))
            .await
            .expect_err("Query with the analyst's certificate must be refused");
        let b = client::node_budget(ch.clone(), "dsu", None, &dsu)
            .await
            .expect_err("Budget with the analyst's certificate must be refused");
        let d = client::node_describe(ch, "dsu", None, &dsu)
            .await
            .expect_err("Describe with the analyst's certificate must be refused");
        for (rpc, st) in [("query", &q), ("budget", &b), ("describe", &d)] {
            assert_eq!(st.code(), tonic::Code::PermissionDenied, "{rpc}: {st:?}");
            assert_eq!(client::reason(st), "PERMISSION_DENIED", "{rpc}: {st:?}");
            assert!(
                client::denial_text(st).contains("allowed_clients"),
                "{rpc}: the refusal must say why: {st:?}"
            );
        }
        let after = audit_entries(&rw2_dir);
        let rpcs: Vec<&str> = after[before..]
            .iter()
            .filter(|e| e["reason"] == "PERMISSION_DENIED")
            .filter_map(|e| e["rpc"].as_str())
            .collect();
        assert_eq!(rpcs, vec!["query", "budget", "describe"], "{after:?}");
    });
    drop(rig);
}

#[test]
fn nodes_answer_only_the_pinned_coordinator_identity() {
    let ics = Ics::synth(20_000, 32);
    let mut fed =
        Federation::start_nodes(ics, &[OTHER_TRUST.to_string(), PROTECTED.to_string()], true);
    let certs = fed.ics.certs();
    let rw2_dir = fed.ics.root.join(PROTECTED);
    let endpoint = fed.node(PROTECTED).endpoint();
    let dsu = client::load_key(&fed.ics.key("dsu"));

    // A freshly issued certificate from the infrastructure CA the node trusts, with
    // clientAuth, that is not the pinned coordinator identity.
    let (code, out, err) = phm(&[
        "certs",
        "dev",
        "--out",
        &s(&certs),
        "--clients",
        "rogue-relay",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("reused infrastructure CA"), "{out}");

    rt().block_on(async {
        let rogue = client::channel_exact(
            &endpoint,
            &certs.join("ca.pem"),
            Some((
                &certs.join("rogue-relay.pem"),
                &certs.join("rogue-relay.key"),
            )),
        )
        .await
        .expect("an infrastructure-CA certificate completes the handshake");
        let q = client::node_query(rogue.clone(), sign(place_count("dsu"), &dsu))
            .await
            .expect_err("Query from an unpinned infrastructure certificate");
        let b = client::node_budget(rogue.clone(), "dsu", None, &dsu)
            .await
            .expect_err("Budget from an unpinned infrastructure certificate");
        let d = client::node_describe(rogue.clone(), "dsu", None, &dsu)
            .await
            .expect_err("Describe from an unpinned infrastructure certificate");
        for (rpc, st) in [("query", &q), ("budget", &b), ("describe", &d)] {
            assert_eq!(st.code(), tonic::Code::PermissionDenied, "{rpc}: {st:?}");
            assert_eq!(client::reason(st), "PERMISSION_DENIED", "{rpc}: {st:?}");
            assert!(
                client::denial_text(st).contains("rogue-relay"),
                "{rpc}: the refusal names the certificate: {st:?}"
            );
        }
        // Health stays open to any certificate from the CA the node trusts.
        assert!(
            serving(rogue).await,
            "health must answer an infrastructure certificate"
        );

        let audited = audit_entries(&rw2_dir);
        let rogue_entries: Vec<&serde_json::Value> = audited
            .iter()
            .filter(|e| {
                e["client_identity"]
                    .as_str()
                    .unwrap_or_default()
                    .contains("rogue-relay")
            })
            .collect();
        assert_eq!(rogue_entries.len(), 3, "{audited:?}");
        assert!(
            rogue_entries
                .iter()
                .all(|e| e["reason"] == "PERMISSION_DENIED"),
            "{rogue_entries:?}"
        );

        // Another node's server certificate as a client certificate: it carries
        // serverAuth only, so the handshake refuses it.
        refused_at_handshake(
            &endpoint,
            &certs.join("ca.pem"),
            &certs.join(format!("{OTHER_TRUST}.pem")),
            &certs.join(format!("{OTHER_TRUST}.key")),
            sign(place_count("dsu"), &dsu),
        )
        .await
        .unwrap_or_else(|e| panic!("RW1's server certificate as a client at RW2: {e}"));

        // The pinned coordinator identity is answered, directly and through the
        // coordinator.
        let relay = client::channel_exact(
            &endpoint,
            &certs.join("ca.pem"),
            Some((
                &certs.join("coordinator-client.pem"),
                &certs.join("coordinator-client.key"),
            )),
        )
        .await
        .expect("coordinator-client channel");
        let a = client::node_query(relay, sign(place_count("dsu"), &dsu))
            .await
            .expect("the pinned coordinator identity is answered");
        assert!(!a.rows.is_empty());
        let coord = client::channel(&fed.coordinator_url(), &certs, Some("dsu-client"))
            .await
            .expect("coordinator channel");
        let (_, result) = client::submit(coord, sign(place_count("dsu"), &dsu))
            .await
            .expect("Submit through the pinned coordinator");
        let result = result.expect("a combined result");
        let coverage = result.coverage.expect("coverage");
        assert_eq!(coverage.answered.len(), 2, "{coverage:?}");
    });

    // A node whose config names no client to answer does not start, and says what to
    // write; an empty list likewise.
    let node_toml = fed.node(PROTECTED).config.clone();
    for (label, edit) in [
        ("missing", None),
        ("empty", Some(toml::Value::Array(vec![]))),
    ] {
        let path = rw2_dir.join(format!("node-{label}-pins.toml"));
        std::fs::copy(&node_toml, &path).unwrap();
        edit_toml(&path, |t| {
            t.insert("listen".into(), format!("127.0.0.1:{}", free_port()).into());
            let tls = t["tls"].as_table_mut().unwrap();
            match &edit {
                None => {
                    tls.remove("allowed_clients");
                }
                Some(v) => {
                    tls.insert("allowed_clients".into(), v.clone());
                }
            }
        });
        let mut p = spawn(
            "unpinned node",
            &bins().node,
            &["--config", &s(&path)],
            rw2_dir.join(format!("node-{label}-pins.log")),
        );
        let code = p.wait_exit(Duration::from_secs(30));
        let log = p.log_text();
        assert!(
            matches!(code, Some(Some(c)) if c != 0),
            "{label} allowed_clients: the node must refuse to start ({code:?}):\n{log}"
        );
        assert!(
            log.contains("tls.allowed_clients") && log.contains("san:coordinator-client"),
            "{label} allowed_clients: the error must say what to write:\n{log}"
        );
    }
}

/// grpc.health.v1 Check (for the whole server) over `ch`: true when it reports
/// SERVING. Sent as raw protobuf: an empty HealthCheckRequest is zero bytes, and the
/// response `status = SERVING (1)` is the two bytes 08 01.
async fn serving(ch: tonic::transport::Channel) -> bool {
    client::unary_raw(ch, "/grpc.health.v1.Health/Check", Vec::new())
        .await
        .is_ok_and(|body| body == [0x08, 0x01])
}

#[test]
fn the_coordinator_requires_a_client_certificate_from_the_people_ca() {
    let ics = Ics::synth(20_000, 33);
    let fed = Federation::start_nodes(ics, &[OTHER_TRUST.to_string()], true);
    let certs = fed.ics.certs();
    let url = fed.coordinator_url();
    let dsu = client::load_key(&fed.ics.key("dsu"));

    rt().block_on(async {
        // No client certificate: refused before any RPC is served.
        let anonymous = async {
            let ch = client::channel_exact(&url, &certs.join("ca.pem"), None)
                .await
                .map_err(|e| e.to_string())?;
            let mut c =
                phm_proto::proto::coordinator_service_client::CoordinatorServiceClient::new(ch);
            c.list_nodes(phm_proto::proto::ListNodesRequest {})
                .await
                .map_err(|s| s.to_string())?;
            Ok::<(), String>(())
        }
        .await;
        assert!(
            anonymous.is_err(),
            "a client without a certificate was served by the coordinator"
        );
        let anonymous_submit = async {
            let ch = client::channel_exact(&url, &certs.join("ca.pem"), None)
                .await
                .map_err(|e| e.to_string())?;
            client::submit(ch, sign(place_count("dsu"), &dsu))
                .await
                .map_err(|s| s.to_string())?;
            Ok::<(), String>(())
        }
        .await;
        assert!(
            anonymous_submit.is_err(),
            "a client without a certificate could submit"
        );

        // An infrastructure certificate (the coordinator's own relay identity) is not
        // a person: the coordinator trusts only the people CA for clients.
        let relay = async {
            let ch = client::channel_exact(
                &url,
                &certs.join("ca.pem"),
                Some((
                    &certs.join("coordinator-client.pem"),
                    &certs.join("coordinator-client.key"),
                )),
            )
            .await
            .map_err(|e| e.to_string())?;
            let mut c =
                phm_proto::proto::coordinator_service_client::CoordinatorServiceClient::new(ch);
            c.list_nodes(phm_proto::proto::ListNodesRequest {})
                .await
                .map_err(|s| s.to_string())?;
            Ok::<(), String>(())
        }
        .await;
        assert!(
            relay.is_err(),
            "the coordinator served an infrastructure-CA client certificate"
        );

        // A person's certificate works.
        let ch = client::channel(&url, &certs, Some("dsu-client"))
            .await
            .expect("dsu-client channel");
        let mut c = phm_proto::proto::coordinator_service_client::CoordinatorServiceClient::new(ch);
        c.list_nodes(phm_proto::proto::ListNodesRequest {})
            .await
            .expect("ListNodes with a people-CA certificate");
    });

    // `phm query` always presents a certificate; without one (none given, none next
    // to the CA) it says what to pass instead of failing at the handshake.
    let lonely = tempfile::tempdir().unwrap();
    let ca = lonely.path().join("ca.pem");
    std::fs::copy(certs.join("ca.pem"), &ca).unwrap();
    let (code, out, err) = phm(&[
        "query",
        "--coordinator",
        &url,
        "--ca",
        &s(&ca),
        "--key",
        &s(&fed.ics.key("dsu")),
        "--federation",
        phm_e2e::FEDERATION_ID,
        "--purpose",
        "planning",
        SQL,
    ]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(
        err.contains("requires a client certificate") && err.contains("--cert"),
        "{err}"
    );
    // With the ICS layout it finds certs/dsu-client.pem beside certs/ca.pem.
    let (code, out, err) = phm(&[
        "query",
        "--coordinator",
        &url,
        "--ca",
        &s(&certs.join("ca.pem")),
        "--key",
        &s(&fed.ics.key("dsu")),
        "--federation",
        phm_e2e::FEDERATION_ID,
        "--purpose",
        "planning",
        "--format",
        "json",
        SQL,
    ]);
    assert_eq!(code, 0, "{out}{err}");

    // A coordinator.toml without tls.client_ca does not start, and says what to write.
    let config = fed.ics.root.join("coordinator/no-client-ca.toml");
    std::fs::copy(fed.ics.coordinator_config(), &config).unwrap();
    edit_toml(&config, |t| {
        t.insert("listen".into(), format!("127.0.0.1:{}", free_port()).into());
        t.insert(
            "data_dir".into(),
            s(&fed.ics.root.join("coordinator/other-state")).into(),
        );
        t["tls"].as_table_mut().unwrap().remove("client_ca");
    });
    let mut p = spawn(
        "coordinator without client_ca",
        &bins().coordinator,
        &["--config", &s(&config)],
        fed.ics.root.join("coordinator/no-client-ca.log"),
    );
    let code = p.wait_exit(Duration::from_secs(30));
    let log = p.log_text();
    assert!(
        matches!(code, Some(Some(c)) if c != 0),
        "a coordinator without tls.client_ca must not start ({code:?}):\n{log}"
    );
    assert!(log.contains("tls.client_ca"), "{log}");
}
