//! Serving the coordinator: mutual TLS (clients must present a certificate chaining to
//! `tls.client_ca`, the people CA), gRPC health and reflection, and `CoordinatorGrpc`,
//! the thin adapter that decodes phm.v1 requests into the core's domain calls
//! (`coordinator.rs`) and encodes their outcomes, until a shutdown signal.

use crate::config::Config;
use crate::coordinator::Coordinator;
use crate::fanout::{ClientError, Relayed, build_clients};
use crate::history::{History, HistoryError};
use crate::model::NodeRef;
use phm_proto::proto::coordinator_service_server::{CoordinatorService, CoordinatorServiceServer};
use phm_proto::{Denial, DenialReason, RequesterProof, SignedQuery, proto};
use std::future::Future;
use std::pin::Pin;
use tokio_stream::StreamExt;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

/// phm.v1.CoordinatorService over the core.
#[derive(Clone)]
pub struct CoordinatorGrpc {
    core: Coordinator,
}

impl CoordinatorGrpc {
    pub fn new(core: Coordinator) -> Self {
        CoordinatorGrpc { core }
    }
}

fn proof_of(proof: Option<proto::RequesterProof>, missing: &str) -> Result<RequesterProof, Status> {
    let Some(raw) = proof else {
        return Err(Denial::new(DenialReason::Unauthenticated, missing).to_status());
    };
    RequesterProof::try_from(raw).map_err(|e| Denial::from(e).to_status())
}

type SubmitStream =
    Pin<Box<dyn tokio_stream::Stream<Item = Result<proto::SubmitEvent, Status>> + Send>>;

#[tonic::async_trait]
impl CoordinatorService for CoordinatorGrpc {
    type SubmitStream = SubmitStream;

    async fn submit(
        &self,
        request: Request<proto::SubmitRequest>,
    ) -> Result<Response<Self::SubmitStream>, Status> {
        let Some(query) = request.into_inner().query else {
            return Err(
                Denial::new(DenialReason::InvalidQuery, "the request carries no query").to_status(),
            );
        };
        // Validate a copy; the original message is what gets relayed.
        let signed =
            SignedQuery::try_from(query.clone()).map_err(|e| Denial::from(e).to_status())?;
        let events = self
            .core
            .submit(signed, Relayed::new(query))
            .map_err(|d| d.to_status())?;
        let stream = ReceiverStream::new(events)
            .map(|e| e.map(proto::SubmitEvent::from).map_err(|d| d.to_status()));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_result(
        &self,
        request: Request<proto::GetResultRequest>,
    ) -> Result<Response<proto::CombinedResult>, Status> {
        let request = request.into_inner();
        let proof = proof_of(
            request.proof,
            "GetResult needs a fresh proof signed by the requester who submitted the query (op get_result, subject = the query id)",
        )?;
        self.core
            .get_result(&request.query_id, proof)
            .map(|r| Response::new(r.into()))
            .map_err(|d| d.to_status())
    }

    async fn list_nodes(
        &self,
        _request: Request<proto::ListNodesRequest>,
    ) -> Result<Response<proto::ListNodesResponse>, Status> {
        Ok(Response::new(proto::ListNodesResponse {
            nodes: self
                .core
                .nodes()
                .map(|c| proto::NodeInfo {
                    node: Some(NodeRef::from(c).into()),
                    endpoint: c.endpoint.clone(),
                    datasets: c.datasets.clone(),
                })
                .collect(),
        }))
    }

    async fn budget(
        &self,
        request: Request<proto::BudgetRequest>,
    ) -> Result<Response<proto::FederatedBudget>, Status> {
        let request = request.into_inner();
        let Some(raw) = request.proof.clone() else {
            return Err(Denial::new(
                DenialReason::InvalidQuery,
                "the budget request carries no requester proof",
            )
            .to_status());
        };
        let proof = RequesterProof::try_from(raw).map_err(|e| Denial::from(e).to_status())?;
        let nodes = self
            .core
            .budget(&proof, Relayed::new(request))
            .await
            .map_err(|d| d.to_status())?;
        Ok(Response::new(proto::FederatedBudget {
            nodes: nodes
                .into_iter()
                .map(|n| proto::NodeBudget {
                    node: Some(n.node.into()),
                    outcome: proto::NodeOutcome::from(n.outcome) as i32,
                    message: n.message,
                    budget: n.budget.map(Relayed::into_inner),
                })
                .collect(),
        }))
    }
}

/// Largest request accepted from analysts' clients.
pub const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Pem(#[from] phm_proto::tls::PemError),
    #[error("cannot create data_dir {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Clients(#[from] ClientError),
    #[error(transparent)]
    History(#[from] HistoryError),
    #[error("gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("{0}")]
    Secure(String),
}

pub use phm_proto::tls::install_crypto_provider;
use phm_proto::tls::read_pem as read;

/// Serve on `listener` until `shutdown` completes; in-flight calls are drained.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServeError> {
    install_crypto_provider();
    // Client certificates are required, never optional: the coordinator relays to
    // nodes with its own pinned identity, so the handshake is the one place that ties
    // a caller to a person the ICS issued a certificate to.
    let tls = ServerTlsConfig::new()
        .identity(Identity::from_pem(
            read("tls.cert", &config.tls.cert)?,
            read("tls.key", &config.tls.key)?,
        ))
        .client_ca_root(Certificate::from_pem(read(
            "tls.client_ca",
            &config.tls.client_ca,
        )?))
        .client_auth_optional(false);
    std::fs::create_dir_all(&config.data_dir).map_err(|source| ServeError::DataDir {
        path: config.data_dir.display().to_string(),
        source,
    })?;
    let history = History::open(&config.data_dir)?;
    let clients = build_clients(&config)?;
    let secure = crate::secure::load_setup(&config).map_err(ServeError::Secure)?;
    let coordinator = CoordinatorGrpc::new(Coordinator::new(&config, clients, history, secure));

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServiceServer<CoordinatorGrpc>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(phm_proto::proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()?;

    tracing::info!(
        listen = %listener.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        nodes = config.nodes.len(),
        federation = %config.federation_id,
        client_ca = %config.tls.client_ca.display(),
        "coordinator serving (mutual TLS)"
    );
    Server::builder()
        .tls_config(tls)?
        .add_service(health)
        .add_service(reflection)
        .add_service(
            CoordinatorServiceServer::new(coordinator).max_decoding_message_size(MAX_REQUEST_BYTES),
        )
        // `Server::tcp_nodelay` only applies to listeners tonic binds itself; without
        // TCP_NODELAY small gRPC frames wait ~40 ms for delayed ACKs.
        .serve_with_incoming_shutdown(
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await?;
    tracing::info!("coordinator stopped");
    Ok(())
}
