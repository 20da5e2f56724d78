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

/// A TLS channel to `endpoint` trusting `certs/ca.pem`, presenting
/// `certs/<client>.pem` when `client` is given.
pub async fn channel(endpoint: &str, certs: &Path, client: Option<&str>) -> Result<Channel> {
    init_crypto();
    let ca = std::fs::read_to_string(certs.join("ca.pem")).context("read ca.pem")?;
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(ca))
        .domain_name("localhost");
    if let Some(name) = client {
        let cert = std::fs::read_to_string(certs.join(format!("{name}.pem")))
            .with_context(|| format!("read {name}.pem"))?;
        let key = std::fs::read_to_string(certs.join(format!("{name}.key")))
            .with_context(|| format!("read {name}.key"))?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    let ch = Channel::from_shared(endpoint.to_string())?
        .tls_config(tls)?
        .connect()
        .await
        .with_context(|| format!("connect to {endpoint}"))?;
    Ok(ch)
}

pub fn load_key(path: &Path) -> SigningKey {
    let pem = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    phm_proto::signing::private_key_from_pem(&pem)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

pub fn nonce() -> Vec<u8> {
    use rand::RngCore;
    let mut n = vec![0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

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
    phm_proto::Denial::from_status(status).reason_name().to_string()
}
