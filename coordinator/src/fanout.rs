//! Calling nodes: one long-lived mutual-TLS channel per registered node, per-call
//! deadlines, and the classification of what came back (answered, refused with the
//! node's reason, unreachable, timed out).

use crate::config::{Config, NodeConfig};
use phm_proto::proto;
use phm_proto::proto::node_service_client::NodeServiceClient;
use phm_proto::result::Answer;
use phm_proto::{Denial, DenialReason};
use prost::Message;
use std::time::{Duration, Instant};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// Largest node answer accepted (a result of many groups is still far below this).
pub const MAX_NODE_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(transparent)]
    Pem(#[from] phm_proto::tls::PemError),
    #[error("node {node:?}: endpoint {endpoint:?} cannot be used: {source}")]
    Endpoint {
        node: String,
        endpoint: String,
        source: tonic::transport::Error,
    },
}

/// A registered node and a channel to it. Cheap to clone.
#[derive(Clone)]
pub struct NodeClient {
    pub config: NodeConfig,
    channel: Channel,
}

/// Build one lazily-connecting channel per node, presenting the coordinator's client
/// identity and trusting only `client_tls.ca` for node certificates.
pub fn build_clients(config: &Config) -> Result<Vec<NodeClient>, ClientError> {
    let read = phm_proto::tls::read_pem;
    let ca = Certificate::from_pem(read("client_tls.ca", &config.client_tls.ca)?);
    let identity = Identity::from_pem(
        read("client_tls.cert", &config.client_tls.cert)?,
        read("client_tls.key", &config.client_tls.key)?,
    );
    config
        .nodes
        .iter()
        .map(|n| {
            let err = |source| ClientError::Endpoint {
                node: n.id.clone(),
                endpoint: n.endpoint.clone(),
                source,
            };
            let tls = ClientTlsConfig::new()
                .ca_certificate(ca.clone())
                .identity(identity.clone())
                .domain_name(n.tls_server_name.clone());
            let endpoint = Endpoint::from_shared(n.endpoint.clone())
                .map_err(err)?
                .tls_config(tls)
                .map_err(err)?
                .connect_timeout(config.node_deadline)
                .tcp_nodelay(true);
            Ok(NodeClient {
                config: n.clone(),
                channel: endpoint.connect_lazy(),
            })
        })
        .collect()
}

/// What one call to a node came to.
/// A message relayed to nodes exactly as its requester sent it (the signature covers
/// it): the core passes it on and never looks inside.
#[derive(Debug, Clone)]
pub struct Relayed<T>(T);

impl<T> Relayed<T> {
    pub fn new(message: T) -> Self {
        Relayed(message)
    }

    pub fn into_inner(self) -> T {
        self.0
    }
}

/// A requester's signed query, as relayed.
pub type RelayedQuery = Relayed<proto::AggregateQuery>;
/// A requester's budget request (with its proof), as relayed.
pub type RelayedBudgetRequest = Relayed<proto::BudgetRequest>;
/// A node's budget report, relayed back unchanged.
pub type RelayedBudget = Relayed<proto::BudgetResponse>;

#[derive(Debug, Clone, PartialEq)]
pub enum CallOutcome<T> {
    Answered(T),
    /// The node answered, but not with a well-formed answer (see
    /// `phm_proto::result::Answer`'s checks); what it claims to have spent, when that
    /// is a number.
    Malformed {
        reason: String,
        epsilon_spent: f64,
    },
    /// The node said no, with its machine-readable reason.
    Refused(Denial),
    /// No answer could be had: connection refused, TLS failure, reset.
    Unreachable(String),
    TimedOut(String),
}

/// Whether the status carries a phm `Denial` (a deliberate refusal by the node).
fn carries_denial(status: &tonic::Status) -> bool {
    proto::Denial::decode(status.details())
        .map(|d| d.reason != DenialReason::Unspecified as i32)
        .unwrap_or(false)
}

/// The status message with its error chain, so "transport error" says why.
fn describe(status: &tonic::Status) -> String {
    let mut out = status.message().to_string();
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        source = e.source();
    }
    if out.is_empty() {
        out = format!("gRPC status {:?}", status.code());
    }
    out
}

pub fn classify<T>(status: &tonic::Status) -> CallOutcome<T> {
    if carries_denial(status) {
        return CallOutcome::Refused(Denial::from_status(status));
    }
    match status.code() {
        tonic::Code::DeadlineExceeded => CallOutcome::TimedOut(describe(status)),
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            CallOutcome::Unreachable(describe(status))
        }
        _ => CallOutcome::Refused(Denial::from_status(status)),
    }
}

/// A node's answer read from the wire: decoded with its checks, or malformed (with
/// what it claims to have spent, when that is a number).
pub(crate) fn decode_answer(wire: proto::AggregateResult) -> CallOutcome<Answer> {
    let epsilon = wire.epsilon_spent;
    match Answer::try_from(wire) {
        Ok(a) => CallOutcome::Answered(a),
        Err(e) => CallOutcome::Malformed {
            reason: e.to_string(),
            epsilon_spent: if epsilon.is_finite() { epsilon } else { 0.0 },
        },
    }
}

/// A failure this close to the deadline is read as the deadline passing.
const DEADLINE_SLACK: Duration = Duration::from_millis(50);

fn with_deadline<T>(msg: T, deadline: Duration) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    // Tells the node how long we will wait, so it can give up too.
    req.set_timeout(deadline);
    req
}

async fn call<T, F>(deadline: Duration, fut: F) -> CallOutcome<T>
where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let start = Instant::now();
    match tokio::time::timeout(deadline, fut).await {
        Ok(Ok(resp)) => CallOutcome::Answered(resp.into_inner()),
        // The node's server enforces our grpc-timeout too and may cancel the call a
        // moment before our own timer fires: that is a timeout, not unreachability.
        Ok(Err(status))
            if !carries_denial(&status) && start.elapsed() + DEADLINE_SLACK >= deadline =>
        {
            CallOutcome::TimedOut(format!(
                "no answer within the {} ms deadline ({})",
                deadline.as_millis(),
                describe(&status)
            ))
        }
        Ok(Err(status)) => classify(&status),
        Err(_) => CallOutcome::TimedOut(format!(
            "no answer within the {} ms deadline",
            deadline.as_millis()
        )),
    }
}

impl NodeClient {
    pub(crate) fn client(&self) -> NodeServiceClient<Channel> {
        NodeServiceClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_NODE_MESSAGE_BYTES)
    }

    /// Relay the requester's signed query exactly as received.
    pub async fn query(
        &self,
        query: RelayedQuery,
        deadline: Duration,
    ) -> (CallOutcome<Answer>, Duration) {
        let start = Instant::now();
        let mut client = self.client();
        let req = with_deadline(
            proto::QueryRequest {
                query: Some(query.into_inner()),
            },
            deadline,
        );
        let out = call(deadline, client.query(req))
            .await
            .and_then(decode_answer);
        (out, start.elapsed())
    }

    pub async fn budget(
        &self,
        request: RelayedBudgetRequest,
        deadline: Duration,
    ) -> CallOutcome<RelayedBudget> {
        let mut client = self.client();
        call(
            deadline,
            client.budget(with_deadline(request.into_inner(), deadline)),
        )
        .await
        .and_then(|b| CallOutcome::Answered(Relayed(b)))
    }
}

impl<T> CallOutcome<T> {
    /// Read an answer further (decode it, wrap it); every other outcome is kept.
    fn and_then<U>(self, f: impl FnOnce(T) -> CallOutcome<U>) -> CallOutcome<U> {
        match self {
            CallOutcome::Answered(a) => f(a),
            CallOutcome::Malformed {
                reason,
                epsilon_spent,
            } => CallOutcome::Malformed {
                reason,
                epsilon_spent,
            },
            CallOutcome::Refused(d) => CallOutcome::Refused(d),
            CallOutcome::Unreachable(m) => CallOutcome::Unreachable(m),
            CallOutcome::TimedOut(m) => CallOutcome::TimedOut(m),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let denial = Denial::new(DenialReason::BudgetExhausted, "no budget").to_status();
        assert_eq!(
            classify::<()>(&denial),
            CallOutcome::Refused(Denial::new(DenialReason::BudgetExhausted, "no budget"))
        );
        // A node that is "unavailable" on purpose is a refusal, not unreachability.
        let busy = Denial::new(DenialReason::Unavailable, "draining").to_status();
        assert!(matches!(classify::<()>(&busy), CallOutcome::Refused(_)));
        assert!(matches!(
            classify::<()>(&tonic::Status::unavailable("tcp connect error")),
            CallOutcome::Unreachable(m) if m.contains("tcp connect error")
        ));
        assert!(matches!(
            classify::<()>(&tonic::Status::deadline_exceeded("slow")),
            CallOutcome::TimedOut(_)
        ));
        assert!(matches!(
            classify::<()>(&tonic::Status::permission_denied("no")),
            CallOutcome::Refused(d) if d.reason == DenialReason::PolicyDenied
        ));
    }
}
