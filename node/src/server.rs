//! The gRPC edge: phm.v1.NodeService over mutual TLS (rustls), with grpc.health.v1 and
//! server reflection. The only node module that knows tonic and the generated wire
//! types; it converts, takes the client certificate's identity, checks it against the
//! pinned relay identities (`tls.allowed_clients`), and hands everything to the domain
//! `Service`. Refusals become statuses through `Denial::to_status`.

use crate::config::{ClientPin, TlsFiles};
use crate::service::{Answer, BudgetView, Description, Service};
use chrono::Utc;
use phm_policies::model::{Column, Domain, Grouping, Period};
use phm_proto::proto;
use phm_proto::proto::node_service_server::{NodeService, NodeServiceServer};
use phm_proto::{Denial, DenialReason, RequesterProof, SignedQuery};
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error(transparent)]
    Pem(#[from] phm_proto::tls::PemError),
    #[error("TLS configuration (cert {cert}, key {key}, client CA {ca}) is unusable: {message}")]
    Tls {
        cert: PathBuf,
        key: PathBuf,
        ca: PathBuf,
        message: String,
    },
    #[error("gRPC reflection setup failed: {0}")]
    Reflection(String),
    #[error("gRPC server failed: {0}")]
    Serve(String),
}

pub use phm_proto::tls::install_crypto_provider;

/// Mutual TLS: the node's identity, and the CA every client certificate must chain
/// to. Client certificates are required (tonic's default with a client CA).
pub fn tls_config(tls: &TlsFiles) -> Result<ServerTlsConfig, ServerError> {
    let cert = phm_proto::tls::read_pem("server certificate", &tls.cert)?;
    let key = phm_proto::tls::read_pem("server private key", &tls.key)?;
    let ca = phm_proto::tls::read_pem("client CA", &tls.client_ca)?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca))
        .client_auth_optional(false))
}

/// SHA-256 of a DER certificate's SubjectPublicKeyInfo: what `spki-sha256:` pins name.
pub fn spki_sha256(der: &[u8]) -> Option<[u8; 32]> {
    use sha2::{Digest, Sha256};
    use x509_parser::prelude::{FromDer, X509Certificate};
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    Some(Sha256::digest(cert.public_key().raw).into())
}

/// Does the DER leaf certificate carry one of the pinned identities?
fn pinned(pins: &[ClientPin], der: &[u8]) -> bool {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return false;
    };
    let mut dns = Vec::new();
    let mut exact = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(s) => dns.push(*s),
                GeneralName::URI(s) | GeneralName::RFC822Name(s) => exact.push(*s),
                // IP SANs are never pinned (config refuses them): every dev server
                // certificate carries 127.0.0.1.
                _ => {}
            }
        }
    }
    let spki = spki_sha256(der);
    pins.iter().any(|pin| match pin {
        ClientPin::San(want) => {
            dns.iter().any(|d| d.eq_ignore_ascii_case(want)) || exact.iter().any(|e| e == want)
        }
        ClientPin::SpkiSha256(want) => spki.as_ref() == Some(want),
    })
}

/// Is the caller one of the relay identities this node answers? Every client that got
/// past the handshake holds a certificate from `client_ca`, but that CA may issue
/// certificates for more than the coordinator (other nodes' certificates, or, in a
/// single-CA deployment, analysts'), and a caller talking to a node directly bypasses
/// the coordinator's scope and suppression rules. So NodeService answers only the
/// identities `tls.allowed_clients` names.
pub fn check_client<T>(pins: &[ClientPin], req: &Request<T>) -> Result<(), Denial> {
    let certs = req.peer_certs();
    let leaf = certs.as_ref().and_then(|c| c.first());
    if let Some(leaf) = leaf
        && pinned(pins, leaf.as_ref())
    {
        return Ok(());
    }
    let who = match leaf {
        Some(leaf) => {
            let fp = spki_sha256(leaf.as_ref())
                .map(|b| format!(" (spki-sha256:{})", hex::encode(b)))
                .unwrap_or_default();
            format!(
                "the client certificate {}{fp}",
                certificate_identity(leaf.as_ref())
            )
        }
        None => "a client without a certificate".to_string(),
    };
    Err(Denial::new(
        DenialReason::PermissionDenied,
        format!(
            "this node answers Query, Budget and Describe only for its federation's \
             coordinator; {who} is not in the node's tls.allowed_clients"
        ),
    ))
}

/// Identity of the client certificate: its CN and subject alternative names.
pub fn peer_identity<T>(req: &Request<T>) -> String {
    let certs = req.peer_certs();
    let Some(leaf) = certs.as_ref().and_then(|c| c.first()) else {
        return "no client certificate".to_string();
    };
    certificate_identity(leaf.as_ref())
}

/// `CN=<cn> SAN=<a>,<b>` from a DER certificate.
pub fn certificate_identity(der: &[u8]) -> String {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let Ok((_, cert)) = X509Certificate::from_der(der) else {
        return "unparseable client certificate".to_string();
    };
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .unwrap_or("")
        .to_string();
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(s) | GeneralName::RFC822Name(s) | GeneralName::URI(s) => {
                    sans.push((*s).to_string())
                }
                GeneralName::IPAddress(b) => {
                    if let Ok(v4) = <[u8; 4]>::try_from(*b) {
                        sans.push(std::net::Ipv4Addr::from(v4).to_string());
                    } else if let Ok(v6) = <[u8; 16]>::try_from(*b) {
                        sans.push(std::net::Ipv6Addr::from(v6).to_string());
                    }
                }
                _ => {}
            }
        }
    }
    if sans.is_empty() {
        format!("CN={cn}")
    } else {
        format!("CN={cn} SAN={}", sans.join(","))
    }
}

// ---------------------------------------------------------------------------------
// Domain -> wire.

/// A released answer on the wire.
pub fn aggregate_result(a: Answer) -> proto::AggregateResult {
    a.into()
}

/// Declared category domain as text; integer ranges "a..b" are expanded (up to a
/// sane size, otherwise shown as written).
fn domain_text(d: &Domain) -> Vec<String> {
    match d {
        Domain::Range(s) => {
            let parsed = s.split_once("..").and_then(|(a, b)| {
                Some((a.trim().parse::<i64>().ok()?, b.trim().parse::<i64>().ok()?))
            });
            match parsed {
                Some((a, b)) if a <= b && b.saturating_sub(a) < 10_000 => {
                    (a..=b).map(|i| i.to_string()).collect()
                }
                _ => vec![s.clone()],
            }
        }
        Domain::Integers(v) => v.iter().map(i64::to_string).collect(),
        Domain::Texts(v) => v.clone(),
        Domain::Booleans(v) => v.iter().map(bool::to_string).collect(),
    }
}

fn column_info(c: Column) -> proto::ColumnInfo {
    proto::ColumnInfo {
        column_type: c.column_type.as_str().to_string(),
        filterable: c.filter,
        groupable: c.group != Grouping::No,
        aggregatable: c.aggregate,
        lower: c.bounds.map(|b| b[0]),
        upper: c.bounds.map(|b| b[1]),
        domain: c.domain.as_ref().map(domain_text).unwrap_or_default(),
        bin_edges: c.bin_edges.unwrap_or_default(),
        name: c.name,
    }
}

pub fn describe_response(d: Description) -> proto::DescribeResponse {
    let o = d.organisation;
    proto::DescribeResponse {
        organisation: Some(proto::Organisation {
            ods_code: o.ods_code,
            name: o.name,
            kind: o.kind.as_str().to_string(),
            place: o.place.unwrap_or_default(),
            pcn: o.pcn.unwrap_or_default(),
        }),
        datasets: d
            .datasets
            .into_iter()
            .map(|ds| proto::DatasetInfo {
                name: ds.name,
                columns: ds.columns.into_iter().map(column_info).collect(),
                max_rows_per_person: ds.max_rows_per_person,
                linkable: ds.linkable,
                link_partners: ds.link_partners,
            })
            .collect(),
        policy_version: d.policy_version,
        per_query_epsilon_cap: d.per_query_epsilon_cap,
        min_reportable_count: d.min_reportable_count,
        release_scope: proto::ReleaseScope::from(phm_proto::result::Scope::from(d.scope)) as i32,
    }
}

fn period(p: Period) -> String {
    p.as_str().to_string()
}

pub fn budget_response(b: BudgetView) -> proto::BudgetResponse {
    proto::BudgetResponse {
        node_id: b.node_id,
        ledgers: b
            .ledgers
            .into_iter()
            .map(|l| proto::BudgetLedger {
                ledger: l.ledger,
                period: period(l.period),
                period_label: l.period_label,
                epsilon_total: l.total,
                epsilon_spent: l.spent,
                epsilon_remaining: l.remaining,
                per_query_cap: l.per_query_cap,
                delta_total: l.delta_total,
                delta_spent: l.delta_spent,
                delta_remaining: l.delta_remaining,
                rho_spent: l.rho_spent,
            })
            .collect(),
        policy_version: b.policy_version,
    }
}

// ---------------------------------------------------------------------------------
// The tonic service.

/// phm.v1.NodeService backed by the domain service, answering only the pinned clients.
#[derive(Debug, Clone)]
pub struct NodeGrpc {
    service: Arc<Service>,
    allowed_clients: Arc<[ClientPin]>,
}

impl NodeGrpc {
    pub fn new(service: Arc<Service>, allowed_clients: &[ClientPin]) -> NodeGrpc {
        NodeGrpc {
            service,
            allowed_clients: allowed_clients.into(),
        }
    }

    /// Refuse (and audit) a caller that is not a pinned relay. Runs before the message
    /// is validated any further, so an unpinned caller learns nothing about the policy,
    /// its requesters or its data; the requester and query id it claimed are recorded.
    async fn refuse_unpinned<T>(
        &self,
        rpc: &str,
        request: &Request<T>,
        claimed: impl FnOnce(&T) -> (String, String),
    ) -> Result<(), Status> {
        let Err(denial) = check_client(&self.allowed_clients, request) else {
            return Ok(());
        };
        let peer = peer_identity(request);
        let (requester, query_id) = claimed(request.get_ref());
        // Claimed by a caller we do not answer: bound what it can write into the log.
        let (requester, query_id) = (bounded(&requester), bounded(&query_id));
        Err(self
            .refuse_unparsed(rpc, &requester, &query_id, &peer, denial)
            .await)
    }

    /// Decode a proof from the wire; an absent or malformed one is audited and refused.
    async fn proof(
        &self,
        rpc: &str,
        proof: Option<proto::RequesterProof>,
        peer: &str,
    ) -> Result<RequesterProof, Status> {
        let Some(raw) = proof else {
            let d = Denial::new(DenialReason::InvalidQuery, "field `proof` is missing");
            return Err(self.refuse_unparsed(rpc, "", "", peer, d).await);
        };
        let requester = raw.requester_id.clone();
        match RequesterProof::try_from(raw) {
            Ok(p) => Ok(p),
            Err(e) => {
                let d = Denial::new(DenialReason::InvalidQuery, format!("invalid proof: {e}"));
                Err(self.refuse_unparsed(rpc, &requester, "", peer, d).await)
            }
        }
    }

    async fn refuse_unparsed(
        &self,
        rpc: &str,
        requester: &str,
        query_id: &str,
        peer: &str,
        denial: Denial,
    ) -> Status {
        self.service
            .refuse_unparsed(rpc, requester, query_id, peer, denial, Utc::now())
            .await
            .to_status()
    }
}

/// At most 128 characters of an unverified string, for the audit log.
fn bounded(s: &str) -> String {
    s.chars().take(128).collect()
}

/// The requester a proof claims to be (unverified; for the audit record only).
fn proof_requester(proof: Option<&proto::RequesterProof>) -> String {
    proof.map(|p| p.requester_id.clone()).unwrap_or_default()
}

/// Messages buffered each way on a Link stream: enough to keep a round's frames moving
/// while the other side computes, few enough to bound memory (a frame is at most 4 MiB).
const LINK_BUFFER: usize = 8;

#[tonic::async_trait]
impl NodeService for NodeGrpc {
    type SecureAggregateStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<proto::SecAggDown, Status>> + Send + 'static>,
    >;

    async fn secure_aggregate(
        &self,
        request: Request<tonic::Streaming<proto::SecAggUp>>,
    ) -> Result<Response<Self::SecureAggregateStream>, Status> {
        self.refuse_unpinned("secure_aggregate", &request, |_| {
            (String::new(), String::new())
        })
        .await?;
        let client = peer_identity(&request);
        let mut inbound = request.into_inner();
        let first = match inbound.message().await {
            Ok(m) => m,
            Err(status) => {
                let d = Denial::new(
                    DenialReason::InvalidQuery,
                    format!(
                        "the SecureAggregate stream's first message could not be read: {}",
                        status.message()
                    ),
                );
                return Err(self
                    .refuse_unparsed("secure_aggregate", "", "", &client, d)
                    .await);
            }
        };
        let claimed = first
            .as_ref()
            .and_then(|m| match &m.step {
                Some(proto::sec_agg_up::Step::Open(o)) => o.query.as_ref(),
                _ => None,
            })
            .map(|q| (bounded(&q.requester_id), bounded(&q.query_id)))
            .unwrap_or_default();
        let signed = match crate::secwire::open_from_proto(first) {
            Ok(o) => o,
            Err(d) => {
                return Err(self
                    .refuse_unparsed("secure_aggregate", &claimed.0, &claimed.1, &client, d)
                    .await);
            }
        };
        let (in_tx, in_rx) = tokio::sync::mpsc::channel(LINK_BUFFER);
        tokio::spawn(async move {
            loop {
                let next = match inbound.message().await {
                    Ok(Some(m)) => crate::secwire::up_from_proto(m),
                    // The coordinator closed its side: the session sees the channel end.
                    Ok(None) => break,
                    Err(status) => crate::service::SecureIn::Malformed(format!(
                        "the stream failed: {}",
                        status.message()
                    )),
                };
                let stop = matches!(next, crate::service::SecureIn::Malformed(_));
                if in_tx.send(next).await.is_err() || stop {
                    break;
                }
            }
        });
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel(LINK_BUFFER);
        let (down_tx, down_rx) = tokio::sync::mpsc::channel(LINK_BUFFER);
        let forward_tx = down_tx.clone();
        let forward = tokio::spawn(async move {
            while let Some(out) = out_rx.recv().await {
                if forward_tx
                    .send(Ok(crate::secwire::down_to_proto(out)))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        });
        let service = self.service.clone();
        tokio::spawn(async move {
            let result = service
                .secure_aggregate(signed, &client, Utc::now(), in_rx, out_tx)
                .await;
            let _ = forward.await;
            if let Err(d) = result {
                let _ = down_tx.send(Err(d.to_status())).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(down_rx),
        )))
    }

    type LinkStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<proto::LinkDown, Status>> + Send + 'static>,
    >;

    async fn link(
        &self,
        request: Request<tonic::Streaming<proto::LinkUp>>,
    ) -> Result<Response<Self::LinkStream>, Status> {
        self.refuse_unpinned("link", &request, |_| (String::new(), String::new()))
            .await?;
        let client = peer_identity(&request);
        let mut inbound = request.into_inner();
        let first = match inbound.message().await {
            Ok(m) => m,
            Err(status) => {
                let d = Denial::new(
                    DenialReason::InvalidQuery,
                    format!(
                        "the Link stream's first message could not be read: {}",
                        status.message()
                    ),
                );
                return Err(self.refuse_unparsed("link", "", "", &client, d).await);
            }
        };
        let claimed = first
            .as_ref()
            .and_then(|m| match &m.step {
                Some(proto::link_up::Step::Open(o)) => o.query.as_ref(),
                _ => None,
            })
            .map(|q| (bounded(&q.requester_id), bounded(&q.query_id)))
            .unwrap_or_default();
        let open = match crate::linkwire::open_from_proto(first) {
            Ok(o) => o,
            Err(d) => {
                return Err(self
                    .refuse_unparsed("link", &claimed.0, &claimed.1, &client, d)
                    .await);
            }
        };
        let (in_tx, in_rx) = tokio::sync::mpsc::channel(LINK_BUFFER);
        tokio::spawn(async move {
            loop {
                let next = match inbound.message().await {
                    Ok(Some(m)) => crate::linkwire::up_from_proto(m),
                    // The coordinator closed its side: the session sees the channel end.
                    Ok(None) => break,
                    Err(status) => crate::service::LinkIn::Malformed(format!(
                        "the stream failed: {}",
                        status.message()
                    )),
                };
                let stop = matches!(next, crate::service::LinkIn::Malformed(_));
                if in_tx.send(next).await.is_err() || stop {
                    break;
                }
            }
        });
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel(LINK_BUFFER);
        let (down_tx, down_rx) = tokio::sync::mpsc::channel(LINK_BUFFER);
        let forward_tx = down_tx.clone();
        let forward = tokio::spawn(async move {
            while let Some(out) = out_rx.recv().await {
                let down = crate::linkwire::down_to_proto(out, aggregate_result);
                if forward_tx.send(Ok(down)).await.is_err() {
                    break;
                }
            }
        });
        let service = self.service.clone();
        tokio::spawn(async move {
            let result = service.link(open, &client, Utc::now(), in_rx, out_tx).await;
            // Everything the session sent goes first; then its refusal, if any, ends
            // the stream.
            let _ = forward.await;
            if let Err(d) = result {
                let _ = down_tx.send(Err(d.to_status())).await;
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(down_rx),
        )))
    }

    async fn describe(
        &self,
        request: Request<proto::DescribeRequest>,
    ) -> Result<Response<proto::DescribeResponse>, Status> {
        self.refuse_unpinned("describe", &request, |r| {
            (proof_requester(r.proof.as_ref()), String::new())
        })
        .await?;
        let peer = peer_identity(&request);
        let proof = self
            .proof("describe", request.into_inner().proof, &peer)
            .await?;
        self.service
            .describe(proof, &peer, Utc::now())
            .await
            .map(|d| Response::new(describe_response(d)))
            .map_err(|d| d.to_status())
    }

    async fn query(
        &self,
        request: Request<proto::QueryRequest>,
    ) -> Result<Response<proto::AggregateResult>, Status> {
        self.refuse_unpinned("query", &request, |r| {
            r.query
                .as_ref()
                .map(|q| (q.requester_id.clone(), q.query_id.clone()))
                .unwrap_or_default()
        })
        .await?;
        let peer = peer_identity(&request);
        let Some(raw) = request.into_inner().query else {
            let d = Denial::new(DenialReason::InvalidQuery, "field `query` is missing");
            return Err(self.refuse_unparsed("query", "", "", &peer, d).await);
        };
        let (requester, query_id) = (raw.requester_id.clone(), raw.query_id.clone());
        let signed = match SignedQuery::try_from(raw) {
            Ok(s) => s,
            Err(e) => {
                return Err(self
                    .refuse_unparsed("query", &requester, &query_id, &peer, Denial::from(e))
                    .await);
            }
        };
        self.service
            .query(signed, &peer, Utc::now())
            .await
            .map(|a| Response::new(aggregate_result(a)))
            .map_err(|d| d.to_status())
    }

    async fn budget(
        &self,
        request: Request<proto::BudgetRequest>,
    ) -> Result<Response<proto::BudgetResponse>, Status> {
        self.refuse_unpinned("budget", &request, |r| {
            (proof_requester(r.proof.as_ref()), String::new())
        })
        .await?;
        let peer = peer_identity(&request);
        let proof = self
            .proof("budget", request.into_inner().proof, &peer)
            .await?;
        self.service
            .budget(proof, &peer, Utc::now())
            .await
            .map(|b| Response::new(budget_response(b)))
            .map_err(|d| d.to_status())
    }
}

/// Serve NodeService, health and reflection on `listener` over mutual TLS until
/// `shutdown` completes; then stop accepting and let open requests finish.
pub async fn serve_grpc(
    service: Arc<Service>,
    tls: &TlsFiles,
    max_message_bytes: usize,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), ServerError> {
    install_crypto_provider();
    let tls_err = |message: String| ServerError::Tls {
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        ca: tls.client_ca.clone(),
        message,
    };
    let mut builder = Server::builder()
        .tls_config(tls_config(tls)?)
        .map_err(|e| tls_err(e.to_string()))?;
    let (health_reporter, health) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<NodeServiceServer<NodeGrpc>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| ServerError::Reflection(e.to_string()))?;
    let node = NodeServiceServer::new(NodeGrpc::new(service, &tls.allowed_clients))
        .max_decoding_message_size(max_message_bytes);
    let reporter = health_reporter.clone();
    let signal = async move {
        shutdown.await;
        reporter
            .set_not_serving::<NodeServiceServer<NodeGrpc>>()
            .await;
    };
    builder
        .add_service(health)
        .add_service(reflection)
        .add_service(node)
        .serve_with_incoming_shutdown(
            // Nagle plus delayed ACK otherwise stalls every small reply by ~40 ms.
            TcpIncoming::from(listener).with_nodelay(Some(true)),
            signal,
        )
        .await
        .map_err(|e| ServerError::Serve(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(sans: &[&str]) -> Vec<u8> {
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn pins_match_a_san_or_the_public_key_and_nothing_else() {
        let relay = cert(&["coordinator-client"]);
        let analyst = cert(&["dsu-client", "localhost", "127.0.0.1"]);
        let by_san = [ClientPin::San("coordinator-client".into())];
        assert!(pinned(&by_san, &relay));
        assert!(pinned(
            &[ClientPin::San("Coordinator-Client".into())],
            &relay
        ));
        assert!(!pinned(&by_san, &analyst));
        let fp = spki_sha256(&relay).unwrap();
        assert!(pinned(&[ClientPin::SpkiSha256(fp)], &relay));
        assert!(!pinned(&[ClientPin::SpkiSha256(fp)], &analyst));
        // A prefix or suffix of the pinned name is not the name.
        assert!(!pinned(&by_san, &cert(&["coordinator-client.evil"])));
        assert!(!pinned(&by_san, &cert(&["evil-coordinator-client"])));
        assert!(!pinned(&by_san, b"not a certificate"));
    }

    #[test]
    fn a_request_without_a_pinned_certificate_is_permission_denied() {
        let req = Request::new(());
        let d = check_client(&[ClientPin::San("coordinator-client".into())], &req).unwrap_err();
        assert_eq!(d.reason, DenialReason::PermissionDenied);
        assert_eq!(d.code(), tonic::Code::PermissionDenied);
        assert!(d.message.contains("allowed_clients"), "{}", d.message);
    }
}
