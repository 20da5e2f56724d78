//! Talking to the coordinator: mutual-TLS channel set-up, building and signing queries
//! and requester proofs, `Submit` with per-node progress, and `Budget`. Errors carry the
//! exit code the `phm` command uses for them.

use phm_proto::proto::coordinator_service_client::CoordinatorServiceClient;
use phm_proto::proto::{self, submit_event};
use phm_proto::{Denial, DenialReason, ProofOp, Purpose, QueryBody, RequesterProof, SignedQuery};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Exit codes of `phm query` / `phm budget` (documented in their --help).
pub mod exit {
    /// Something went wrong that is not one of the cases below.
    pub const FAILURE: u8 = 1;
    /// The input was wrong: SQL, key file, certificate files, arguments.
    pub const INPUT: u8 = 2;
    /// The coordinator could not be reached.
    pub const UNREACHABLE: u8 = 3;
    /// The query was refused (by the coordinator or every node that was asked).
    pub const REFUSED: u8 = 4;
}

/// Largest message accepted from the coordinator (results are small; this is a guard).
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Input(String),
    #[error("cannot read {what} {path}: {reason}")]
    File {
        what: &'static str,
        path: PathBuf,
        reason: String,
    },
    #[error("cannot reach coordinator at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    #[error("refused: {} — {}", .0.reason_name(), .0.message)]
    Refused(Denial),
    #[error("the coordinator's answer could not be used: {0}")]
    Protocol(String),
}

impl ClientError {
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Input(_) | ClientError::File { .. } => exit::INPUT,
            ClientError::Unreachable { .. } => exit::UNREACHABLE,
            ClientError::Refused(_) => exit::REFUSED,
            ClientError::Protocol(_) => exit::FAILURE,
        }
    }
}

/// Where the coordinator is and which certificates to use.
#[derive(Debug, Clone, Default)]
pub struct Connection {
    pub url: String,
    /// CA the coordinator's certificate chains to (required for https).
    pub ca: Option<PathBuf>,
    /// Client certificate and key: the coordinator requires mutual TLS, so `connect`
    /// refuses an https URL without them (see [`with_default_identity`]).
    pub cert: Option<PathBuf>,
    pub cert_key: Option<PathBuf>,
    pub connect_timeout: Option<Duration>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, ClientError> {
    phm_proto::tls::read_pem(what, path).map_err(|e| ClientError::File {
        what,
        path: path.to_path_buf(),
        reason: match e {
            phm_proto::tls::PemError::Read { cause, .. } => cause.to_string(),
            phm_proto::tls::PemError::NotPem { .. } => {
                "it holds no PEM block (expected \"-----BEGIN …\")".to_string()
            }
        },
    })
}

/// Install the process-wide rustls provider (ring) once; harmless when already set.
pub fn install_crypto_provider() {
    phm_proto::tls::install_crypto_provider();
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        let text = inner.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = inner.source();
    }
    s
}

/// Fill in the client certificate a requester presents when none was given: the
/// `<requester>-client.pem` and `.key` next to the CA certificate (the layout of
/// `phm synth` and `phm certs dev`), when both exist. A `--cert` given without a
/// key gets the `.key` file beside it.
pub fn with_default_identity(mut c: Connection, requester: &str) -> Connection {
    match (&c.cert, &c.cert_key) {
        (None, None) => {
            let folder = c.ca.as_deref().and_then(Path::parent);
            if let Some(folder) = folder {
                let cert = folder.join(format!("{requester}-client.pem"));
                let key = folder.join(format!("{requester}-client.key"));
                if cert.is_file() && key.is_file() {
                    c.cert = Some(cert);
                    c.cert_key = Some(key);
                }
            }
        }
        (Some(cert), None) => {
            let key = cert.with_extension("key");
            if key.is_file() {
                c.cert_key = Some(key);
            }
        }
        _ => {}
    }
    c
}

/// Open a channel to `c.url`, over TLS for https:// URLs.
pub async fn connect(c: &Connection) -> Result<Channel, ClientError> {
    install_crypto_provider();
    let mut endpoint = Endpoint::from_shared(c.url.clone()).map_err(|e| {
        ClientError::Input(format!(
            "coordinator URL {:?} is not valid ({e}); expected e.g. https://127.0.0.1:50050",
            c.url
        ))
    })?;
    endpoint = endpoint
        .connect_timeout(c.connect_timeout.unwrap_or(Duration::from_secs(5)))
        .tcp_nodelay(true);
    if c.url.starts_with("https://") {
        let Some(ca) = &c.ca else {
            return Err(ClientError::Input(format!(
                "{} uses TLS: give the CA certificate with --ca FILE (or PHM_CA)",
                c.url
            )));
        };
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read("CA certificate", ca)?));
        // Always mutual TLS: the coordinator refuses a client without a certificate
        // from the people CA at the handshake, so say what is missing here instead of
        // letting that surface as an opaque transport error.
        match (&c.cert, &c.cert_key) {
            (Some(cert), Some(key)) => {
                tls = tls.identity(Identity::from_pem(
                    read("client certificate", cert)?,
                    read("client certificate key", key)?,
                ));
            }
            (None, None) => {
                return Err(ClientError::Input(format!(
                    "{} requires a client certificate: give --cert FILE and --cert-key FILE \
                     (or PHM_CLIENT_CERT and PHM_CLIENT_KEY), e.g. certs/dsu-client.pem and \
                     certs/dsu-client.key",
                    c.url
                )));
            }
            _ => {
                return Err(ClientError::Input(
                    "give both --cert and --cert-key (or PHM_CLIENT_CERT and PHM_CLIENT_KEY)"
                        .into(),
                ));
            }
        }
        endpoint = endpoint.tls_config(tls).map_err(|e| {
            ClientError::Input(format!("TLS settings rejected: {}", error_chain(&e)))
        })?;
    } else if !c.url.starts_with("http://") {
        return Err(ClientError::Input(format!(
            "coordinator URL {:?} must start with https:// (or http:// for a plaintext test server)",
            c.url
        )));
    }
    endpoint
        .connect()
        .await
        .map_err(|e| ClientError::Unreachable {
            url: c.url.clone(),
            reason: error_chain(&e),
        })
}

fn coordinator(channel: Channel) -> CoordinatorServiceClient<Channel> {
    CoordinatorServiceClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A status from the coordinator: transport failures mean unreachable, the rest are
/// refusals carrying a Denial.
fn from_status(url: &str, status: &tonic::Status) -> ClientError {
    let denial = Denial::from_status(status);
    let transport = status.details().is_empty()
        && matches!(
            status.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::DeadlineExceeded
        )
        && denial.reason == DenialReason::Unavailable;
    if transport {
        let mut reason = status.message().to_string();
        if let Some(src) = std::error::Error::source(status) {
            reason = format!("{reason}: {}", error_chain(src));
        }
        ClientError::Unreachable {
            url: url.to_string(),
            reason,
        }
    } else {
        ClientError::Refused(denial)
    }
}

/// 16 bytes from the OS random source, for nonces.
pub use phm_proto::query::fresh_nonce as nonce;

/// A query body with a fresh nonce, issued now.
pub fn query_body(
    sql: crate::sql::SqlQuery,
    federation_id: &str,
    requester: &str,
    purpose: Purpose,
    project: Option<String>,
    epsilon: f64,
    query_id: Option<String>,
) -> QueryBody {
    QueryBody {
        federation_id: federation_id.to_string(),
        query_id: query_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
        requester_id: requester.to_string(),
        purpose,
        project_id: project,
        dataset: sql.dataset,
        filter: sql.filter,
        group_by: sql.group_by,
        aggregates: sql.aggregates,
        epsilon,
        issued_at_unix_ms: chrono::Utc::now().timestamp_millis(),
        nonce: nonce(),
        linkage: sql.linkage,
        aggregation: Default::default(),
    }
}

/// What came back from Submit.
#[derive(Debug, Clone)]
pub struct Submission {
    pub result: proto::CombinedResult,
    pub progress: Vec<proto::NodeProgress>,
}

/// Submit a signed query and follow its progress to the combined result.
pub async fn submit(
    channel: Channel,
    url: &str,
    query: SignedQuery,
    on_progress: &mut (dyn FnMut(&proto::NodeProgress) + Send),
) -> Result<Submission, ClientError> {
    let mut client = coordinator(channel);
    let request = proto::SubmitRequest {
        query: Some(query.into()),
    };
    let mut stream = client
        .submit(request)
        .await
        .map_err(|s| from_status(url, &s))?
        .into_inner();
    let mut progress = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(event)) => match event.event {
                Some(submit_event::Event::Progress(p)) => {
                    on_progress(&p);
                    progress.push(p);
                }
                Some(submit_event::Event::Result(result)) => {
                    return Ok(Submission { result, progress });
                }
                None => {}
            },
            Ok(None) => {
                return Err(ClientError::Protocol(
                    "the coordinator closed the stream without a result".into(),
                ));
            }
            Err(status) => return Err(from_status(url, &status)),
        }
    }
}

/// Ask every node, through the coordinator, what the requester has left.
pub async fn budget(
    channel: Channel,
    url: &str,
    federation_id: &str,
    requester: &str,
    project: Option<String>,
    key: &phm_proto::signing::PrivateKey,
) -> Result<proto::FederatedBudget, ClientError> {
    let proof = RequesterProof::fresh(federation_id, requester, project).sign(ProofOp::Budget, key);
    let mut client = coordinator(channel);
    let response = client
        .budget(proto::BudgetRequest {
            proof: Some(proof.into()),
        })
        .await
        .map_err(|s| from_status(url, &s))?;
    Ok(response.into_inner())
}

/// Read a stored combined result from the coordinator, with a fresh proof that the
/// requester (under the same project, for research) is the one asking.
pub async fn get_result(
    channel: Channel,
    url: &str,
    federation_id: &str,
    requester: &str,
    project: Option<String>,
    query_id: &str,
    key: &phm_proto::signing::PrivateKey,
) -> Result<proto::CombinedResult, ClientError> {
    let proof = RequesterProof::fresh(federation_id, requester, project)
        .about(query_id)
        .sign(ProofOp::GetResult, key);
    let mut client = coordinator(channel);
    let response = client
        .get_result(proto::GetResultRequest {
            query_id: query_id.to_string(),
            proof: Some(proof.into()),
        })
        .await
        .map_err(|s| from_status(url, &s))?;
    Ok(response.into_inner())
}
