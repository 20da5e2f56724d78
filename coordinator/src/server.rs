//! Serving the coordinator: mutual TLS (clients must present a certificate chaining to
//! `tls.client_ca`, the people CA), the CoordinatorService, gRPC health and
//! reflection, until a shutdown signal.

use crate::config::Config;
use crate::fanout::{ClientError, build_clients};
use crate::history::{History, HistoryError};
use crate::service::Coordinator;
use phm_proto::proto::coordinator_service_server::CoordinatorServiceServer;
use std::future::Future;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};

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
    let coordinator = Coordinator::new(&config, clients, history);

    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<CoordinatorServiceServer<Coordinator>>()
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
