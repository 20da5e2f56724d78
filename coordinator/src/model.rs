//! The coordinator's domain outcomes: what one node's call came to, which partners a
//! system result covers, and the system result itself. The core (`coordinator.rs`)
//! produces these; `wire.rs` converts them to and from phm.v1 for the server and the
//! history store, so nothing here knows tonic or prost.

use crate::combine::{Breakdown, Row};
use crate::config::{NodeConfig, TotalKind};
use phm_proto::DenialReason;

/// Who a node is, as registered with the coordinator (and as stored with a result,
/// so it outlives a change of configuration).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeRef {
    pub id: String,
    pub ods_code: String,
    pub name: String,
    pub kind: String,
    pub place: String,
    pub pcn: String,
}

impl From<&NodeConfig> for NodeRef {
    fn from(n: &NodeConfig) -> Self {
        NodeRef {
            id: n.id.clone(),
            ods_code: n.ods_code.clone(),
            name: n.name.clone(),
            kind: n.kind.clone(),
            place: n.place.clone(),
            pcn: n.pcn.clone(),
        }
    }
}

/// How one node's call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeOutcome {
    Answered,
    Refused,
    Unreachable,
    TimedOut,
    /// It answered, but the answer failed the checks and was excluded.
    Malformed,
}

/// One node's call, as streamed to the requester while the query runs.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeProgress {
    pub node: NodeRef,
    /// How many nodes this query went to.
    pub nodes_total: u32,
    pub outcome: NodeOutcome,
    /// Set when the node refused.
    pub reason: Option<DenialReason>,
    pub message: String,
    /// What the node reports spending (0 unless it answered).
    pub epsilon_spent: f64,
}

/// A node that refused, or whose answer was excluded, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeRefusal {
    pub node: NodeRef,
    pub reason: Option<DenialReason>,
    pub message: String,
}

/// Which partners a system result covers.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Coverage {
    pub answered: Vec<NodeRef>,
    pub refused: Vec<NodeRefusal>,
    pub unreachable: Vec<NodeRef>,
    pub timed_out: Vec<NodeRef>,
    pub malformed: Vec<NodeRefusal>,
    /// Registered population of the partners that answered; 0 when unknown.
    pub population_answered: f64,
    /// Registered population of every partner serving the dataset; 0 when unknown.
    pub population_registered: f64,
    /// Some partner serving the dataset did not answer.
    pub partial: bool,
}

impl Coverage {
    /// True when asking again may complete the answer: some partner could not be
    /// reached, ran out of time, or failed inside (a warehouse that was down, say)
    /// rather than refusing by its policy. A resubmit then asks every partner again:
    /// those that answered serve their cached release (no new spend), and one that
    /// was charged but released nothing answers under that charge.
    pub fn retryable(&self) -> bool {
        !self.unreachable.is_empty()
            || !self.timed_out.is_empty()
            || self.refused.iter().any(|r| {
                matches!(
                    r.reason,
                    Some(DenialReason::Internal | DenialReason::Unavailable)
                )
            })
    }
}

/// The system-level answer to one query, as recorded and returned.
#[derive(Debug, Clone, PartialEq)]
pub struct SystemResult {
    pub query_id: String,
    pub dataset: String,
    pub group_columns: Vec<String>,
    pub aggregate_aliases: Vec<String>,
    pub rows: Vec<Row>,
    pub coverage: Coverage,
    pub total_kind: TotalKind,
    pub total_note: String,
    pub epsilon_spent_per_node: f64,
    pub delta_spent_per_node: f64,
    pub breakdowns: Vec<Breakdown>,
    pub completed_at_unix_ms: i64,
    pub min_reportable_count: f64,
}

/// What a Submit streams: progress per node, then the result.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Progress(NodeProgress),
    Result(Box<SystemResult>),
}

/// What the history holds for one (requester, query id).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Record {
    /// `QueryBody::digest()` of the validated query that claimed this id.
    pub digest: String,
    /// The requester who signed it: the only one a stored result is returned to.
    pub requester_id: String,
    /// Its research project (empty for other purposes): a GetResult proof must name
    /// the same project.
    pub project_id: String,
    /// The question without id, time and nonce, so a re-signed retry is recognised.
    pub content_digest: String,
    pub progress: Vec<NodeProgress>,
    /// Absent while the query is running (or if the coordinator stopped mid-query).
    pub result: Option<SystemResult>,
}
