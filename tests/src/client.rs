//! gRPC clients over TLS for the end-to-end tests, and helpers to build and sign queries
//! the way `phm query` does (tests also need to build queries `phm` would refuse).

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use phm_proto::proto;
use phm_proto::{Aggregate, AggregateKind, GroupKey, Predicate, Purpose, QueryBody, SignedQuery};
use std::path::Path;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

/// Install the process-wide rustls provider once (tonic uses ring).
pub fn init_crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// People's client certificates `phm synth` issues (people CA).
pub const PEOPLE_CERTS: [&str; 2] = ["dsu-client", "researcher-client"];

/// The coordinator's client certificate (infrastructure CA), which every node pins.
pub const RELAY_CERT: &str = "coordinator-client";

/// A TLS channel to `endpoint` trusting `certs/ca.pem` (the infrastructure CA every
/// server certificate chains to), presenting `certs/<client>.pem` when `client` is
/// given.
///
/// Calling a node directly stands in, in most tests, for the coordinator relaying an
/// analyst's signed query: the requester is whoever signed it. Nodes now answer only
/// their pinned coordinator identity, and trust only the infrastructure CA, so when
/// `endpoint` is one of the nodes of the ICS that `certs` belongs to, a person's
/// certificate (`PEOPLE_CERTS`) is replaced by the coordinator's relay certificate.
/// Tests about which certificate a node accepts use [`channel_exact`] instead.
pub async fn channel(endpoint: &str, certs: &Path, client: Option<&str>) -> Result<Channel> {
    let client = match client {
        Some(name) if PEOPLE_CERTS.contains(&name) && is_ics_node(certs, endpoint) => {
            Some(RELAY_CERT)
        }
        other => other,
    };
    let identity = client.map(|name| {
        (
            certs.join(format!("{name}.pem")),
            certs.join(format!("{name}.key")),
        )
    });
    channel_exact(
        endpoint,
        &certs.join("ca.pem"),
        identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
    )
    .await
}

/// A TLS channel to `endpoint` trusting the CA certificate(s) in `ca` and presenting
/// exactly the given certificate and key (none when `identity` is `None`).
pub async fn channel_exact(
    endpoint: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
) -> Result<Channel> {
    init_crypto();
    let ca_pem = std::fs::read_to_string(ca).with_context(|| format!("read {}", ca.display()))?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca_pem))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        let cert =
            std::fs::read_to_string(cert).with_context(|| format!("read {}", cert.display()))?;
        let key =
            std::fs::read_to_string(key).with_context(|| format!("read {}", key.display()))?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let ch = Channel::from_shared(endpoint.to_string())?
        .tls_config(tls)?
        .connect()
        .await
        .with_context(|| format!("connect to {endpoint}"))?;
    Ok(ch)
}

/// Is `endpoint` the `listen` address of a node.toml in the ICS whose `certs` folder
/// this is (`<ics>/certs`, nodes at `<ics>/<ODS>/node.toml`)?
fn is_ics_node(certs: &Path, endpoint: &str) -> bool {
    let Some(root) = certs.parent() else {
        return false;
    };
    let addr = endpoint
        .trim_start_matches("https://")
        .trim_end_matches('/');
    let Ok(entries) = std::fs::read_dir(root) else {
        return false;
    };
    entries.filter_map(|e| e.ok()).any(|e| {
        std::fs::read_to_string(e.path().join("node.toml"))
            .ok()
            .and_then(|text| text.parse::<toml::Table>().ok())
            .and_then(|t| t.get("listen").and_then(|v| v.as_str()).map(str::to_string))
            .is_some_and(|listen| listen == addr)
    })
}

pub fn load_key(path: &Path) -> SigningKey {
    let pem = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    phm_proto::signing::private_key_from_pem(&pem)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub use phm_proto::query::{fresh_nonce as nonce, now_unix_ms as now_ms};

pub fn count(alias: &str) -> Aggregate {
    Aggregate {
        alias: alias.into(),
        kind: AggregateKind::Count,
        column: None,
    }
}

pub fn agg(alias: &str, kind: AggregateKind, column: &str) -> Aggregate {
    Aggregate {
        alias: alias.into(),
        kind,
        column: Some(column.into()),
    }
}

/// A fresh query body (new id, nonce, issued now).
pub fn body(
    requester: &str,
    purpose: Purpose,
    dataset: &str,
    group_by: Vec<GroupKey>,
    aggregates: Vec<Aggregate>,
    filter: Option<Predicate>,
    epsilon: f64,
) -> QueryBody {
    QueryBody {
        federation_id: crate::FEDERATION_ID.into(),
        query_id: format!("e2e-{}", hex_id()),
        requester_id: requester.into(),
        purpose,
        project_id: None,
        dataset: dataset.into(),
        filter,
        group_by,
        aggregates,
        epsilon,
        issued_at_unix_ms: now_ms(),
        nonce: nonce(),
        linkage: None,
        aggregation: Default::default(),
    }
}

fn hex_id() -> String {
    nonce().iter().map(|b| format!("{b:02x}")).collect()
}

pub fn sign(body: QueryBody, key: &SigningKey) -> proto::AggregateQuery {
    proto::AggregateQuery::from(body.sign(key))
}

pub fn unsigned(body: QueryBody) -> proto::AggregateQuery {
    proto::AggregateQuery::from(SignedQuery {
        body,
        signature: Vec::new(),
    })
}

pub async fn node_query(
    ch: Channel,
    q: proto::AggregateQuery,
) -> Result<proto::AggregateResult, tonic::Status> {
    let mut c = proto::node_service_client::NodeServiceClient::new(ch);
    c.query(proto::QueryRequest { query: Some(q) })
        .await
        .map(tonic::Response::into_inner)
}

/// Submit through the coordinator; returns the progress events and the result.
pub async fn submit(
    ch: Channel,
    q: proto::AggregateQuery,
) -> Result<(Vec<proto::NodeProgress>, Option<proto::CombinedResult>), tonic::Status> {
    use proto::submit_event::Event;
    let mut c = proto::coordinator_service_client::CoordinatorServiceClient::new(ch);
    let mut stream = c
        .submit(proto::SubmitRequest { query: Some(q) })
        .await?
        .into_inner();
    let mut progress = Vec::new();
    let mut result = None;
    while let Some(ev) = stream.message().await? {
        match ev.event {
            Some(Event::Progress(p)) => progress.push(p),
            Some(Event::Result(r)) => result = Some(r),
            None => {}
        }
    }
    Ok((progress, result))
}

/// The `phm-reason` of a refusal, e.g. "POLICY_DENIED".
pub fn reason(status: &tonic::Status) -> String {
    phm_proto::Denial::from_status(status)
        .reason_name()
        .to_string()
}

/// Any text a refusal carries: its message and every individual reason, so tests can
/// check that a refusal names the column or rule it is about.
pub fn denial_text(status: &tonic::Status) -> String {
    let d = phm_proto::Denial::from_status(status);
    let mut text = format!("{} {}", status.message(), d.message);
    for r in &d.reasons {
        text.push(' ');
        text.push_str(r);
    }
    text
}

/// A signed "it is me asking" for Describe or Budget.
pub fn proof(
    op: phm_proto::ProofOp,
    requester: &str,
    project: Option<&str>,
    key: &SigningKey,
) -> proto::RequesterProof {
    phm_proto::RequesterProof::new(
        crate::FEDERATION_ID,
        requester,
        project.map(str::to_string),
        now_ms(),
        nonce(),
    )
    .sign(op, key)
    .into()
}

/// The node's Budget RPC for `requester` (and `project`, for research ledgers).
pub async fn node_budget(
    ch: Channel,
    requester: &str,
    project: Option<&str>,
    key: &SigningKey,
) -> Result<proto::BudgetResponse, tonic::Status> {
    let mut c = proto::node_service_client::NodeServiceClient::new(ch);
    c.budget(proto::BudgetRequest {
        proof: Some(proof(phm_proto::ProofOp::Budget, requester, project, key)),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// The node's Describe RPC for `requester`.
pub async fn node_describe(
    ch: Channel,
    requester: &str,
    project: Option<&str>,
    key: &SigningKey,
) -> Result<proto::DescribeResponse, tonic::Status> {
    let mut c = proto::node_service_client::NodeServiceClient::new(ch);
    c.describe(proto::DescribeRequest {
        proof: Some(proof(phm_proto::ProofOp::Describe, requester, project, key)),
    })
    .await
    .map(tonic::Response::into_inner)
}

/// The ledger named `ledger` (e.g. "requester:dsu") in a Budget answer.
pub fn ledger<'a>(b: &'a proto::BudgetResponse, ledger: &str) -> Option<&'a proto::BudgetLedger> {
    b.ledgers.iter().find(|l| l.ledger == ledger)
}

/// A codec that sends and receives message bodies as raw bytes, so tests can put
/// malformed protobuf on the wire exactly as an attacker would.
#[derive(Debug, Clone, Copy, Default)]
pub struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawCodec;
    type Decoder = RawCodec;

    fn encoder(&mut self) -> RawCodec {
        RawCodec
    }

    fn decoder(&mut self) -> RawCodec {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use prost::bytes::BufMut;
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = Vec<u8>;
    type Error = tonic::Status;

    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        use prost::bytes::Buf;
        let mut v = vec![0u8; src.remaining()];
        src.copy_to_slice(&mut v);
        Ok(Some(v))
    }
}

/// Send `bytes` as the request body of the unary RPC at `path`
/// (e.g. "/phm.v1.NodeService/Query"); returns the raw response body.
pub async fn unary_raw(
    ch: Channel,
    path: &'static str,
    bytes: Vec<u8>,
) -> Result<Vec<u8>, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unavailable(format!("channel not ready: {e}")))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static(path);
    grpc.unary(tonic::Request::new(bytes), path, RawCodec)
        .await
        .map(tonic::Response::into_inner)
}

/// Protobuf bytes of a `QueryRequest` for `q`.
pub fn query_request_bytes(q: proto::AggregateQuery) -> Vec<u8> {
    use prost::Message;
    proto::QueryRequest { query: Some(q) }.encode_to_vec()
}

/// [`submit`] bounded by `limit`: a Submit stream that never ends (a hung coordinator)
/// becomes a `DEADLINE_EXCEEDED` error naming the limit instead of a hung test.
pub async fn submit_within(
    ch: Channel,
    q: proto::AggregateQuery,
    limit: std::time::Duration,
) -> Result<(Vec<proto::NodeProgress>, Option<proto::CombinedResult>), tonic::Status> {
    match tokio::time::timeout(limit, submit(ch, q)).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "the coordinator's Submit stream did not end within {limit:?}"
        ))),
    }
}

/// [`node_query`] bounded by `limit`: a node that never answers becomes a
/// `DEADLINE_EXCEEDED` error naming the limit instead of a hung test.
pub async fn node_query_within(
    ch: Channel,
    q: proto::AggregateQuery,
    limit: std::time::Duration,
) -> Result<proto::AggregateResult, tonic::Status> {
    match tokio::time::timeout(limit, node_query(ch, q)).await {
        Ok(r) => r,
        Err(_) => Err(tonic::Status::deadline_exceeded(format!(
            "the node did not answer within {limit:?}"
        ))),
    }
}
