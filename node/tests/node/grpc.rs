//! The node served in-process over real mutual TLS: a signed query answered with every
//! wire field filled, refusals carrying their Denial, the client certificate's identity
//! in the audit log, health and reflection, plaintext / certificate-less / foreign-CA
//! clients refused, Prometheus metrics, and a graceful shutdown that flushes state.
// Helpers outside #[test] functions panic on broken fixtures too.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::*;
use phm_node::config::NodeConfig;
use phm_proto::proto;
use phm_proto::proto::node_service_client::NodeServiceClient;
use phm_proto::{Denial, DenialReason, ProofOp, RequesterProof};
use std::path::Path;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

struct Running {
    addr: std::net::SocketAddr,
    metrics: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), phm_node::run::NodeError>>,
}

async fn start(f: &Fixture, pki: &TestPki) -> Running {
    let text = format!(
        r#"federation_id = "ics-test"
policy = "policy.toml"
data_dir = "state"
listen = "127.0.0.1:0"
metrics_listen = "127.0.0.1:0"
[tls]
cert = "{}"
key = "{}"
client_ca = "{}"
allowed_clients = ["san:dsu-client"]
[limits]
max_concurrent_queries = 8
query_deadline_ms = 20000
"#,
        pki.server_cert.display(),
        pki.server_key.display(),
        pki.ca.display()
    );
    let config = NodeConfig::parse(&f.dir.path().join("node.toml"), &text).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let metrics = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (addr, maddr) = (
        listener.local_addr().unwrap(),
        metrics.local_addr().unwrap(),
    );
    let node = phm_node::run::Node::start(config).await.unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(node.serve(listener, Some(metrics), async {
        let _ = rx.await;
    }));
    Running {
        addr,
        metrics: maddr,
        stop: Some(tx),
        task,
    }
}

async fn channel(
    addr: std::net::SocketAddr,
    ca: &Path,
    client: Option<(&Path, &Path)>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()))
        .domain_name("localhost");
    if let Some((c, k)) = client {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(c).unwrap(),
            std::fs::read(k).unwrap(),
        ));
    }
    Channel::from_shared(format!("https://{addr}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_queries_over_mutual_tls_and_shuts_down_cleanly() {
    phm_node::server::install_crypto_provider();
    let f = fixture(10.0);
    let pki = pki(f.dir.path());
    let mut node = start(&f, &pki).await;
    let ch = channel(
        node.addr,
        &pki.ca,
        Some((&pki.client_cert, &pki.client_key)),
    )
    .await
    .expect("mTLS channel");
    let mut client = NodeServiceClient::new(ch.clone());

    // An answer, with every wire field filled.
    let signed = sign(count_by_imd("dsu", 0.2), &f.dsu);
    let r = client
        .query(proto::QueryRequest {
            query: Some(signed.clone().into()),
        })
        .await
        .expect("answered")
        .into_inner();
    assert_eq!(r.query_id, signed.body.query_id);
    assert_eq!(r.node_id, "A81001");
    assert_eq!(r.dataset, "gp_patients");
    assert_eq!(r.group_columns, ["imd_quintile"]);
    assert_eq!(r.aggregate_aliases, ["patients"]);
    assert_eq!(r.rows.len(), 5);
    assert!(r.epsilon_spent > 0.0 && r.epsilon_spent <= 0.2 + 1e-12);
    assert!((r.epsilon_remaining - 9.8).abs() < 1e-9);
    assert_eq!(r.policy_version.len(), 64);
    assert_eq!(r.release_scope, proto::ReleaseScope::Standalone as i32);
    assert_eq!(r.population_noisy, 240.0);
    assert_eq!(r.min_reportable_count, 7.0);
    assert!(r.released_at_unix_ms > 0);
    assert!(!r.cached);
    let cell = &r.rows[0].cells[0];
    assert_eq!(
        cell.mechanism,
        proto::NoiseMechanism::DiscreteLaplace as i32
    );
    assert!(cell.noise_scale > 0.0 && cell.variance > 0.0);
    assert!(cell.ci95_low <= cell.noisy_value && cell.noisy_value <= cell.ci95_high);

    let again = client
        .query(proto::QueryRequest {
            query: Some(signed.clone().into()),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.cached);
    assert_eq!(again.rows, r.rows);

    // Refusals carry a Denial with the right code.
    let mut bad = sign(count_by_imd("dsu", 0.2), &f.dsu);
    bad.body.epsilon = 0.3;
    let e = client
        .query(proto::QueryRequest {
            query: Some(bad.into()),
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert_eq!(
        Denial::from_status(&e).reason,
        DenialReason::Unauthenticated
    );
    let mut nan: proto::AggregateQuery = sign(count_by_imd("dsu", 0.2), &f.dsu).into();
    nan.epsilon = f64::NAN;
    let e = client
        .query(proto::QueryRequest { query: Some(nan) })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument);
    let e = client
        .query(proto::QueryRequest { query: None })
        .await
        .unwrap_err();
    assert_eq!(Denial::from_status(&e).reason, DenialReason::InvalidQuery);

    // Describe and Budget.
    let d = client
        .describe(proto::DescribeRequest {
            proof: Some(
                RequesterProof::fresh("ics-test", "dsu", None)
                    .sign(ProofOp::Describe, &f.dsu)
                    .into(),
            ),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(d.organisation.unwrap().ods_code, "A81001");
    let cols = &d.datasets[0].columns;
    let imd = cols.iter().find(|c| c.name == "imd_quintile").unwrap();
    assert_eq!(imd.domain, ["1", "2", "3", "4", "5"]);
    assert!(imd.groupable && imd.filterable && !imd.aggregatable);
    let age = cols.iter().find(|c| c.name == "age").unwrap();
    assert_eq!((age.lower, age.upper), (Some(0.0), Some(110.0)));
    assert!(
        !cols
            .iter()
            .any(|c| c.name == "person_id" || c.name == "ndopt_out")
    );
    let b = client
        .budget(proto::BudgetRequest {
            proof: Some(
                RequesterProof::fresh("ics-test", "dsu", None)
                    .sign(ProofOp::Budget, &f.dsu)
                    .into(),
            ),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(b.ledgers[0].ledger, "requester:dsu");
    assert_eq!(b.ledgers[0].period, "month");
    assert!((b.ledgers[0].epsilon_spent - 0.2).abs() < 1e-12);

    // Health and reflection.
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "phm.v1.NodeService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let mut reflection =
        tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                String::new(),
            ),
        ),
    };
    let mut stream = reflection
        .server_reflection_info(tokio_stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().unwrap();
    let listed = format!("{resp:?}");
    assert!(listed.contains("phm.v1.NodeService"), "{listed}");

    // Transport: no client certificate, a foreign CA's certificate, plaintext.
    let no_cert = match channel(node.addr, &pki.ca, None).await {
        Err(_) => true,
        Ok(ch) => NodeServiceClient::new(ch)
            .query(proto::QueryRequest {
                query: Some(sign(count_by_imd("dsu", 0.1), &f.dsu).into()),
            })
            .await
            .is_err(),
    };
    assert!(no_cert, "a client without a certificate must be refused");
    let rogue = match channel(node.addr, &pki.ca, Some((&pki.rogue_cert, &pki.rogue_key))).await {
        Err(_) => true,
        Ok(ch) => NodeServiceClient::new(ch)
            .query(proto::QueryRequest {
                query: Some(sign(count_by_imd("dsu", 0.1), &f.dsu).into()),
            })
            .await
            .is_err(),
    };
    assert!(rogue, "a certificate from another CA must be refused");
    let plain = match Channel::from_shared(format!("http://{}", node.addr))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
    {
        Err(_) => true,
        Ok(ch) => NodeServiceClient::new(ch)
            .query(proto::QueryRequest {
                query: Some(sign(count_by_imd("dsu", 0.1), &f.dsu).into()),
            })
            .await
            .is_err(),
    };
    assert!(plain, "plaintext must be refused");

    // Metrics.
    let metrics = http_get(node.metrics, "/metrics").await;
    assert!(
        metrics.contains("phm_node_queries_total{outcome=\"answered\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("phm_node_queries_total{outcome=\"cached\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("phm_node_epsilon_spent_total 0.2"),
        "{metrics}"
    );

    // Graceful shutdown: serve returns Ok, and the audit log names the client.
    drop(client);
    drop(health);
    drop(reflection);
    drop(ch);
    let _ = node.stop.take().unwrap().send(());
    tokio::time::timeout(Duration::from_secs(40), &mut node.task)
        .await
        .expect("shutdown within the grace period")
        .unwrap()
        .expect("clean shutdown");
    let report = phm_node::audit::verify_log(&f.data_dir.join("audit.log")).unwrap();
    // Answer, cached repeat, 3 refusals, Describe, Budget (handshake failures never
    // reach the service).
    assert_eq!(report.entries, 7);
    let log = std::fs::read_to_string(f.data_dir.join("audit.log")).unwrap();
    assert!(
        log.contains("CN=dsu-client SAN=dsu-client,localhost,127.0.0.1"),
        "{log}"
    );
}

async fn http_get(addr: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    text
}
