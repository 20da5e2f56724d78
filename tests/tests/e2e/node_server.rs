//! phm-node over real mTLS: every refusal with its status code and reason, a successful
//! query, a cached repeat, policy reload (good and broken), and clean shutdown.

use crate::rt;
use phm_e2e::client::{self, body, count, sign};
use phm_e2e::{Federation, NodeExt, RunningNode, phm};
use phm_proto::{GroupKey, Purpose};
use std::time::Duration;

/// First node whose policy exposes `gp_patients`.
fn gp_node(fed: &Federation) -> &RunningNode {
    // By the dataset served: other policies name gp_patients as a linkage partner's.
    let gps = fed.ics.nodes_serving("gp_patients");
    fed.nodes
        .iter()
        .find(|n| gps.contains(&n.id))
        .expect("a GP practice node")
}

fn imd_count(requester: &str) -> phm_proto::QueryBody {
    body(
        requester,
        Purpose::Planning,
        "gp_patients",
        vec![GroupKey::Column("imd_quintile".into())],
        vec![count("patients")],
        None,
        0.2,
    )
}

#[test]
fn node_answers_signed_queries_and_refuses_everything_else() {
    let fed = Federation::start(20_000, 11, Some(1));
    let node = gp_node(&fed);
    let certs = fed.ics.certs();
    let dsu = client::load_key(&fed.ics.key("dsu"));
    let researcher = client::load_key(&fed.ics.key("researcher"));
    let endpoint = node.endpoint();

    rt().block_on(async {
        let ch = client::channel(&endpoint, &certs, Some("dsu-client"))
            .await
            .expect("mTLS channel");

        // Success: a signed planning query gets every declared IMD quintile.
        let q = imd_count("dsu");
        let signed = sign(q.clone(), &dsu);
        let first = client::node_query(ch.clone(), signed.clone())
            .await
            .expect("allowed query answered");
        assert_eq!(first.rows.len(), 5, "every declared quintile is released");
        assert!(first.epsilon_spent > 0.0 && first.epsilon_spent <= 0.2 + 1e-9);
        assert!(!first.policy_version.is_empty());
        assert!(!first.cached);
        for row in &first.rows {
            let c = &row.cells[0];
            assert!(c.noise_scale > 0.0, "every cell states its noise scale");
            assert!(c.ci95_low <= c.noisy_value && c.noisy_value <= c.ci95_high);
        }

        // The same signed query again: identical answer from the cache, no new spend.
        let again = client::node_query(ch.clone(), signed.clone())
            .await
            .expect("repeat answered");
        assert!(again.cached, "repeat must come from the release cache");
        assert_eq!(
            again.rows, first.rows,
            "repeat must be the identical release"
        );
        assert_eq!(again.epsilon_remaining, first.epsilon_remaining);

        let cases: Vec<(&str, phm_proto::proto::AggregateQuery, &str, tonic::Code)> = vec![
            (
                "unsigned",
                client::unsigned(imd_count("dsu")),
                "UNAUTHENTICATED",
                tonic::Code::Unauthenticated,
            ),
            (
                "signed with another requester's key",
                sign(imd_count("dsu"), &researcher),
                "UNAUTHENTICATED",
                tonic::Code::Unauthenticated,
            ),
            (
                "unknown requester",
                sign(imd_count("mallory"), &dsu),
                "UNAUTHENTICATED",
                tonic::Code::Unauthenticated,
            ),
            (
                "stale: issued an hour ago",
                sign(
                    {
                        let mut b = imd_count("dsu");
                        b.issued_at_unix_ms -= 3_600_000;
                        b
                    },
                    &dsu,
                ),
                "STALE",
                tonic::Code::Unauthenticated,
            ),
            (
                "replayed nonce under a new query id",
                sign(
                    {
                        let mut b = imd_count("dsu");
                        b.nonce = q.nonce.clone();
                        b
                    },
                    &dsu,
                ),
                "REPLAYED",
                tonic::Code::Unauthenticated,
            ),
            (
                "query id reused for a different question",
                sign(
                    {
                        let mut b = imd_count("dsu");
                        b.query_id = q.query_id.clone();
                        b.group_by = vec![GroupKey::Column("sex".into())];
                        b
                    },
                    &dsu,
                ),
                "QUERY_ID_REUSED",
                tonic::Code::AlreadyExists,
            ),
            (
                "group by an identifier column",
                sign(
                    {
                        let mut b = imd_count("dsu");
                        b.group_by = vec![GroupKey::Column("nhs_number".into())];
                        b
                    },
                    &dsu,
                ),
                "POLICY_DENIED",
                tonic::Code::PermissionDenied,
            ),
            (
                "epsilon over the per-query cap",
                sign(
                    {
                        let mut b = imd_count("dsu");
                        b.epsilon = 50.0;
                        b
                    },
                    &dsu,
                ),
                "POLICY_DENIED",
                tonic::Code::PermissionDenied,
            ),
            (
                "NaN epsilon",
                sign(
                    {
                        let mut b = imd_count("dsu");
                        b.epsilon = f64::NAN;
                        b
                    },
                    &dsu,
                ),
                "INVALID_QUERY",
                tonic::Code::InvalidArgument,
            ),
        ];
        for (name, query, reason, code) in cases {
            let err = client::node_query(ch.clone(), query)
                .await
                .expect_err(&format!("{name}: must be refused"));
            assert_eq!(err.code(), code, "{name}: wrong status code ({err:?})");
            assert_eq!(
                client::reason(&err),
                reason,
                "{name}: wrong reason ({err:?})"
            );
            assert!(!err.message().is_empty(), "{name}: refusal must say why");
        }

        // Transport: a client without a certificate is refused.
        let refused = match client::channel(&endpoint, &certs, None).await {
            Err(_) => true,
            Ok(ch) => client::node_query(ch, sign(imd_count("dsu"), &dsu))
                .await
                .is_err(),
        };
        assert!(refused, "a client without a certificate must be refused");
    });

    // A certificate from another CA is refused at the handshake.
    let other = tempfile::tempdir().unwrap();
    let (code, _, err) = phm(&[
        "certs",
        "dev",
        "--out",
        &other.path().display().to_string(),
        "--names",
        "intruder",
    ]);
    assert_eq!(code, 0, "phm certs dev: {err}");
    // Trust the node's real CA, but present the intruder's certificate.
    std::fs::copy(certs.join("ca.pem"), other.path().join("ca.pem")).unwrap();
    rt().block_on(async {
        let refused = match client::channel(&endpoint, other.path(), Some("intruder")).await {
            Err(_) => true,
            Ok(ch) => client::node_query(ch, sign(imd_count("dsu"), &dsu))
                .await
                .is_err(),
        };
        assert!(refused, "a certificate from another CA must be refused");

        // Plaintext HTTP/2 to a TLS port fails.
        let plain = tonic::transport::Channel::from_shared(format!("http://{}", node.addr))
            .unwrap()
            .connect()
            .await;
        let refused = match plain {
            Err(_) => true,
            Ok(ch) => client::node_query(ch, sign(imd_count("dsu"), &dsu))
                .await
                .is_err(),
        };
        assert!(refused, "plaintext must be refused");
    });
}

#[test]
fn policy_reload_applies_good_files_and_keeps_the_old_one_on_bad_files() {
    let mut fed = Federation::start(20_000, 12, Some(1));
    let id = gp_node(&fed).id.clone();
    let certs = fed.ics.certs();
    let dsu = client::load_key(&fed.ics.key("dsu"));
    let node = fed.node(&id);
    let endpoint = node.endpoint();
    let policy = node.config.parent().unwrap().join("policy.toml");
    let original = std::fs::read_to_string(&policy).unwrap();

    rt().block_on(async {
        let ch = client::channel(&endpoint, &certs, Some("dsu-client"))
            .await
            .unwrap();
        let v1 = describe_version(ch.clone(), &dsu).await.expect("describe");
        client::node_query(ch.clone(), sign(imd_count("dsu"), &dsu))
            .await
            .expect("allowed before reload");

        // A valid edit: the DSU loses planning on this node. Takes effect.
        phm_e2e::edit_toml(&policy, |t| {
            if let Some(toml::Value::Array(rs)) = t.get_mut("requesters") {
                for r in rs
                    .iter_mut()
                    .filter(|r| r.get("id").and_then(|v| v.as_str()) == Some("dsu"))
                {
                    if let Some(tbl) = r.as_table_mut() {
                        tbl.insert(
                            "purposes".into(),
                            toml::Value::Array(vec!["direct_care".into()]),
                        );
                    }
                }
            }
        });
        assert_ne!(
            std::fs::read_to_string(&policy).unwrap(),
            original,
            "policy edited"
        );
        node.proc.signal("HUP");
        let mut v2 = v1.clone();
        for _ in 0..200 {
            v2 = describe_version(ch.clone(), &dsu).await.expect("describe");
            if v2 != v1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_ne!(v2, v1, "a valid policy edit must take effect within 20 s");
        let err = client::node_query(ch.clone(), sign(imd_count("dsu"), &dsu))
            .await
            .expect_err("planning refused after reload");
        assert_eq!(client::reason(&err), "POLICY_DENIED");

        // A broken edit is refused: the previous policy stays in force.
        std::fs::write(&policy, "version = 1\n[organisation\n").unwrap();
        node.proc.signal("HUP");
        std::thread::sleep(Duration::from_secs(3));
        assert_eq!(
            describe_version(ch.clone(), &dsu)
                .await
                .expect("node still up"),
            v2,
            "an invalid policy must not replace the one in force"
        );
        assert!(
            node.proc.is_running(),
            "a broken reload must not stop the node"
        );
        let log = node.proc.log_text();
        assert!(
            log.to_lowercase().contains("policy"),
            "the refused reload is logged: {log}"
        );
    });
}

async fn describe_version(
    ch: tonic::transport::Channel,
    key: &ed25519_dalek::SigningKey,
) -> Result<String, tonic::Status> {
    let mut c = phm_proto::proto::node_service_client::NodeServiceClient::new(ch);
    let proof = phm_proto::RequesterProof::new(
        phm_e2e::FEDERATION_ID,
        "dsu",
        None,
        client::now_ms(),
        client::nonce(),
    )
    .sign(phm_proto::ProofOp::Describe, key);
    c.describe(phm_proto::proto::DescribeRequest {
        proof: Some(proof.into()),
    })
    .await
    .map(|r| r.into_inner().policy_version)
}

#[test]
fn sigterm_shuts_down_cleanly_and_loses_no_audit_entry() {
    let mut fed = Federation::start(20_000, 13, Some(1));
    let id = gp_node(&fed).id.clone();
    let certs = fed.ics.certs();
    let dsu = client::load_key(&fed.ics.key("dsu"));
    let node = fed.node(&id);
    let endpoint = node.endpoint();
    let decisions = rt().block_on(async {
        let ch = client::channel(&endpoint, &certs, Some("dsu-client"))
            .await
            .unwrap();
        let mut n = 0;
        for i in 0..6 {
            let mut q = imd_count("dsu");
            if i % 2 == 1 {
                q.group_by = vec![GroupKey::Column("postcode".into())]; // refused, still audited
            }
            let _ = client::node_query(ch.clone(), sign(q, &dsu)).await;
            n += 1;
        }
        n
    });
    let code = node.proc.terminate(Duration::from_secs(30));
    assert_eq!(code, Some(0), "SIGTERM must end the node cleanly");
    let data_dir = node.data_dir();
    let audit = std::fs::read_to_string(data_dir.join("audit.log")).expect("audit.log");
    let entries = audit.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(
        entries >= decisions,
        "{decisions} decisions made but only {entries} audit entries survived shutdown"
    );
    let (code, out, err) = phm(&[
        "audit",
        "verify",
        "--data-dir",
        &data_dir.display().to_string(),
    ]);
    assert_eq!(
        code, 0,
        "audit chain must verify after shutdown: {out}{err}"
    );
}
