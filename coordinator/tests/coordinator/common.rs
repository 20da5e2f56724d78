//! Test harness shared by the integration tests and the fan-out benchmark: the
//! development PKI (phm-devkit), in-process mock nodes served over real mutual TLS, an
//! in-process coordinator and a signed-query builder.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use ed25519_dalek::SigningKey;
use phm_coordinator::config::Config;
use phm_proto::proto;
use phm_proto::proto::coordinator_service_client::CoordinatorServiceClient;
use phm_proto::proto::node_service_server::{NodeService, NodeServiceServer};
use phm_proto::{Aggregate, AggregateKind, GroupKey, Purpose, QueryBody};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// A test CA and one leaf certificate (SANs localhost and 127.0.0.1, server and client
/// use) written as PEM files under `dir`.
pub struct Pki {
    pub dir: PathBuf,
    pub ca_pem: String,
    pub leaf_pem: String,
    pub leaf_key: String,
}

impl Pki {
    /// The development PKI `phm certs dev` issues (one both-usage leaf for
    /// localhost), under `dir/certs`, as `leaf.pem` / `leaf.key` for the configs.
    pub fn new(dir: &Path) -> Pki {
        phm_proto::tls::install_crypto_provider();
        let certs = dir.join("certs");
        let issued = phm_devkit::pki::dev(
            &certs,
            &phm_devkit::pki::CertPlan {
                legacy: vec!["localhost".into()],
                ..Default::default()
            },
        )
        .expect("development PKI");
        let leaf = &issued.leaves[0];
        let read = |p: &Path| std::fs::read_to_string(p).expect("read PEM");
        let pki = Pki {
            dir: dir.to_path_buf(),
            ca_pem: read(&issued.ca_pem),
            leaf_pem: read(&leaf.pem),
            leaf_key: read(&leaf.key),
        };
        std::fs::write(certs.join("leaf.pem"), &pki.leaf_pem).expect("write leaf");
        std::fs::write(certs.join("leaf.key"), &pki.leaf_key).expect("write key");
        pki
    }

    pub fn server_tls(&self) -> ServerTlsConfig {
        ServerTlsConfig::new()
            .identity(Identity::from_pem(&self.leaf_pem, &self.leaf_key))
            .client_ca_root(Certificate::from_pem(&self.ca_pem))
    }

    pub fn client_tls(&self) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .identity(Identity::from_pem(&self.leaf_pem, &self.leaf_key))
            .domain_name("localhost")
    }
}

pub type Answer = Arc<dyn Fn(&proto::AggregateQuery) -> proto::AggregateResult + Send + Sync>;

/// How a mock node behaves.
#[derive(Clone)]
pub enum Behaviour {
    Answer(Answer),
    Refuse(phm_proto::Denial),
    /// Never answers (until the caller gives up).
    Stall,
}

#[derive(Clone)]
struct MockNode {
    behaviour: Behaviour,
    calls: Arc<AtomicUsize>,
    received: Arc<Mutex<Vec<proto::AggregateQuery>>>,
    budget: proto::BudgetResponse,
}

#[tonic::async_trait]
impl NodeService for MockNode {
    type LinkStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<proto::LinkDown, Status>> + Send + 'static>,
    >;

    async fn link(
        &self,
        _: Request<tonic::Streaming<proto::LinkUp>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        Err(Status::unimplemented(
            "this mock node takes part in no linkage session",
        ))
    }

    type SecureAggregateStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<proto::SecAggDown, Status>> + Send + 'static>,
    >;

    async fn secure_aggregate(
        &self,
        _: Request<tonic::Streaming<proto::SecAggUp>>,
    ) -> Result<Response<Self::SecureAggregateStream>, Status> {
        Err(Status::unimplemented(
            "this mock node takes part in no secure-aggregation session",
        ))
    }

    async fn describe(
        &self,
        _request: Request<proto::DescribeRequest>,
    ) -> Result<Response<proto::DescribeResponse>, Status> {
        Err(Status::unimplemented("mock node"))
    }

    async fn query(
        &self,
        request: Request<proto::QueryRequest>,
    ) -> Result<Response<proto::AggregateResult>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let query = request
            .into_inner()
            .query
            .ok_or_else(|| Status::invalid_argument("no query"))?;
        self.received.lock().unwrap().push(query.clone());
        match &self.behaviour {
            Behaviour::Answer(f) => Ok(Response::new(f(&query))),
            Behaviour::Refuse(d) => Err(d.to_status()),
            Behaviour::Stall => {
                std::future::pending::<()>().await;
                Err(Status::internal("unreachable"))
            }
        }
    }

    async fn budget(
        &self,
        _request: Request<proto::BudgetRequest>,
    ) -> Result<Response<proto::BudgetResponse>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        match &self.behaviour {
            Behaviour::Refuse(d) => Err(d.to_status()),
            Behaviour::Stall => {
                std::future::pending::<()>().await;
                Err(Status::internal("unreachable"))
            }
            Behaviour::Answer(_) => Ok(Response::new(self.budget.clone())),
        }
    }
}

/// A running mock node.
pub struct RunningNode {
    pub addr: SocketAddr,
    pub calls: Arc<AtomicUsize>,
    pub received: Arc<Mutex<Vec<proto::AggregateQuery>>>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl RunningNode {
    pub fn calls(&self) -> usize {
        self.calls.load(Ordering::SeqCst)
    }

    /// Shut the node down and wait until its listener is closed.
    pub async fn kill(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            d.await.unwrap();
        }
    }
}

impl Drop for RunningNode {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn start_node(pki: &Pki, id: &str, behaviour: Behaviour) -> RunningNode {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let calls = Arc::new(AtomicUsize::new(0));
    let received = Arc::new(Mutex::new(Vec::new()));
    let node = MockNode {
        behaviour,
        calls: calls.clone(),
        received: received.clone(),
        budget: proto::BudgetResponse {
            node_id: id.to_string(),
            ledgers: vec![proto::BudgetLedger {
                ledger: "requester:dsu".into(),
                period: "month".into(),
                period_label: "2026-11".into(),
                epsilon_total: 10.0,
                epsilon_spent: 1.0,
                epsilon_remaining: 9.0,
                per_query_cap: 1.0,
                ..Default::default()
            }],
            policy_version: "v1".into(),
        },
    };
    let (tx, rx) = oneshot::channel::<()>();
    let server = Server::builder()
        .tls_config(pki.server_tls())
        .unwrap()
        .add_service(NodeServiceServer::new(node));
    let done = tokio::spawn(async move {
        let _ = server
            .serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                async {
                    let _ = rx.await;
                },
            )
            .await;
    });
    RunningNode {
        addr,
        calls,
        received,
        stop: Some(tx),
        done: Some(done),
    }
}

/// An address nothing listens on (a bound listener, dropped).
pub async fn dead_addr() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// How a node is registered in coordinator.toml.
pub struct Reg {
    pub id: String,
    pub addr: SocketAddr,
    pub place: String,
    pub pcn: String,
    pub datasets: Vec<String>,
}

impl Reg {
    pub fn new(id: &str, addr: SocketAddr) -> Reg {
        Reg {
            id: id.into(),
            addr,
            place: String::new(),
            pcn: String::new(),
            datasets: vec!["gp_patients".into()],
        }
    }
}

/// Write coordinator.toml into `pki.dir` (relative paths) and load it.
pub fn coordinator_config(pki: &Pki, nodes: &[Reg], deadline_ms: u64, extra: &str) -> Config {
    let dsu = phm_proto::signing::public_key_to_base64(&requester_key().verifying_key());
    let mut text = format!(
        "federation_id = \"ics-test\"\nlisten = \"127.0.0.1:0\"\ndata_dir = \"state\"\n\
         node_deadline_ms = {deadline_ms}\n\
         {extra}\n\
         [[requesters]]\nid = \"dsu\"\npublic_key = \"{dsu}\"\n\
         [tls]\ncert = \"certs/leaf.pem\"\nkey = \"certs/leaf.key\"\nclient_ca = \"certs/ca.pem\"\n\
         [client_tls]\ncert = \"certs/leaf.pem\"\nkey = \"certs/leaf.key\"\nca = \"certs/ca.pem\"\n"
    );
    for n in nodes {
        let datasets: Vec<String> = n.datasets.iter().map(|d| format!("{d:?}")).collect();
        text.push_str(&format!(
            "[[nodes]]\nid = {:?}\nname = \"Node {}\"\nkind = \"gp_practice\"\nplace = {:?}\n\
             pcn = {:?}\nendpoint = \"https://127.0.0.1:{}\"\ntls_server_name = \"localhost\"\n\
             datasets = [{}]\n",
            n.id,
            n.id,
            n.place,
            n.pcn,
            n.addr.port(),
            datasets.join(", ")
        ));
    }
    let path = pki.dir.join("coordinator.toml");
    std::fs::write(&path, text).unwrap();
    Config::load(&path).unwrap()
}

/// A coordinator running in this process, with a client connected over mutual TLS.
pub struct RunningCoordinator {
    pub addr: SocketAddr,
    pub client: CoordinatorServiceClient<Channel>,
    stop: Option<oneshot::Sender<()>>,
    done: Option<tokio::task::JoinHandle<()>>,
}

impl RunningCoordinator {
    /// Stop gracefully and wait until the server (and its sled handle) is gone.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(d) = self.done.take() {
            d.await.unwrap();
        }
    }
}

impl Drop for RunningCoordinator {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

pub async fn start_coordinator(pki: &Pki, config: Config) -> RunningCoordinator {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = oneshot::channel::<()>();
    let done = tokio::spawn(async move {
        phm_coordinator::server::serve(config, listener, async {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    let channel = Channel::from_shared(format!("https://127.0.0.1:{}", addr.port()))
        .unwrap()
        .tls_config(pki.client_tls())
        .unwrap()
        .connect()
        .await
        .unwrap();
    RunningCoordinator {
        addr,
        client: CoordinatorServiceClient::new(channel),
        stop: Some(tx),
        done: Some(done),
    }
}

/// The test requester "dsu"'s key: fixed, so the coordinator's requester directory
/// (written by `coordinator_config`) can list its public key.
pub fn requester_key() -> SigningKey {
    SigningKey::from_bytes(&[7u8; 32])
}

/// A key the coordinator's directory does not list for anyone.
pub fn stranger_key() -> SigningKey {
    SigningKey::generate(&mut rand::rngs::OsRng)
}

/// A signed COUNT (+ optional AVG) query grouped by `g` when `grouped`.
pub fn signed_query(
    key: &SigningKey,
    id: &str,
    grouped: bool,
    with_mean: bool,
) -> proto::AggregateQuery {
    let mut aggregates = vec![Aggregate {
        alias: "patients".into(),
        kind: AggregateKind::Count,
        column: None,
    }];
    if with_mean {
        aggregates.push(Aggregate {
            alias: "mean_age".into(),
            kind: AggregateKind::Mean,
            column: Some("age".into()),
        });
    }
    let body = QueryBody {
        federation_id: "ics-test".into(),
        query_id: id.into(),
        requester_id: "dsu".into(),
        purpose: Purpose::Planning,
        project_id: None,
        dataset: "gp_patients".into(),
        filter: None,
        group_by: if grouped {
            vec![GroupKey::Column("g".into())]
        } else {
            vec![]
        },
        aggregates,
        epsilon: 0.5,
        issued_at_unix_ms: chrono::Utc::now().timestamp_millis(),
        nonce: phm_proto::query::fresh_nonce(),
        linkage: None,
        aggregation: Default::default(),
    };
    body.sign(key).into()
}

/// One answered cell: estimate shown unrounded (equal to the noisy value).
pub fn cell(alias: &str, noisy: f64, variance: f64) -> proto::Cell {
    let se = variance.sqrt();
    proto::Cell {
        alias: alias.into(),
        estimate: noisy,
        noisy_value: noisy,
        noise_scale: se,
        variance,
        ci95_low: noisy - 1.96 * se,
        ci95_high: noisy + 1.96 * se,
        mechanism: proto::NoiseMechanism::DiscreteGaussian as i32,
        ..Default::default()
    }
}

/// A result shell echoing the query's id, dataset, group labels and aliases.
pub fn result_for(
    q: &proto::AggregateQuery,
    node_id: &str,
    rows: Vec<proto::ResultRow>,
) -> proto::AggregateResult {
    let signed = phm_proto::SignedQuery::try_from(q.clone()).unwrap();
    proto::AggregateResult {
        query_id: q.query_id.clone(),
        node_id: node_id.into(),
        dataset: q.dataset.clone(),
        group_columns: signed.body.group_by.iter().map(GroupKey::label).collect(),
        aggregate_aliases: signed
            .body
            .aggregates
            .iter()
            .map(|a| a.alias.clone())
            .collect(),
        rows,
        epsilon_spent: q.epsilon,
        epsilon_remaining: 9.0,
        policy_version: "v1".into(),
        release_scope: proto::ReleaseScope::Standalone as i32,
        population_noisy: 1000.0,
        released_at_unix_ms: 1,
        min_reportable_count: 7.0,
        ..Default::default()
    }
}

/// A node that answers an ungrouped COUNT with a fixed noisy value.
pub fn fixed_count(node_id: &str, value: f64, variance: f64) -> Behaviour {
    let id = node_id.to_string();
    Behaviour::Answer(Arc::new(move |q| {
        result_for(
            q,
            &id,
            vec![proto::ResultRow {
                key: vec![],
                cells: vec![cell("patients", value, variance)],
            }],
        )
    }))
}

/// Drain a Submit stream: progress events, then the result.
pub async fn submit(
    client: &mut CoordinatorServiceClient<Channel>,
    query: proto::AggregateQuery,
) -> Result<(Vec<proto::NodeProgress>, proto::CombinedResult), Status> {
    let mut stream = client
        .submit(proto::SubmitRequest { query: Some(query) })
        .await?
        .into_inner();
    let mut progress = Vec::new();
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(proto::submit_event::Event::Progress(p)) => progress.push(p),
            Some(proto::submit_event::Event::Result(r)) => {
                assert!(
                    stream.message().await?.is_none(),
                    "nothing after the result"
                );
                return Ok((progress, r));
            }
            None => panic!("empty event"),
        }
    }
    Err(Status::internal("stream ended without a result"))
}

/// The same question re-signed with a fresh nonce and time, as `phm query --query-id`
/// does on a retry.
pub fn resign(q: &proto::AggregateQuery, key: &SigningKey) -> proto::AggregateQuery {
    let mut body = phm_proto::SignedQuery::try_from(q.clone()).unwrap().body;
    body.nonce = phm_proto::query::fresh_nonce();
    body.issued_at_unix_ms = chrono::Utc::now().timestamp_millis();
    body.sign(key).into()
}

/// A fresh GetResult request for `query_id`, signed by `key` as "dsu".
pub fn get_result_request(query_id: &str, key: &SigningKey) -> proto::GetResultRequest {
    let proof = phm_proto::RequesterProof::new(
        "ics-test",
        "dsu",
        None,
        chrono::Utc::now().timestamp_millis(),
        phm_proto::query::fresh_nonce(),
    )
    .about(query_id)
    .sign(phm_proto::ProofOp::GetResult, key);
    proto::GetResultRequest {
        query_id: query_id.into(),
        proof: Some(proof.into()),
    }
}
