//! What `decide` returns: either the exact limits a node must run a query under, or
//! every reason for refusal. The node's engine takes `Limits` and nothing else from
//! the policy, so what the IG lead signed off is what runs.

use crate::model::{ColumnType, Mechanism, Period, Rounding, Scope, TotalKind};
use phm_proto::AggregateKind;
use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Decision {
    Allow(Box<Limits>),
    Deny(Vec<Refusal>),
}

/// One reason for refusal, tied to the rule that caused it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Refusal {
    pub kind: RefusalKind,
    /// The policy rule, e.g. `requesters.dsu.purposes`.
    pub rule: String,
    /// Plain English an analyst or IG lead can act on.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RefusalKind {
    UnknownRequester,
    RequesterRevoked,
    PurposeNotPermitted,
    DatasetNotPermitted,
    UnknownDataset,
    UnknownColumn,
    IdentifierColumn,
    NotFilterable,
    NotGroupable,
    NotAggregatable,
    TypeMismatch,
    BinTooNarrow,
    TooManyCells,
    ProjectRequired,
    UnknownProject,
    ProjectNotForRequester,
    ProjectExpired,
    ProjectDatasetNotApproved,
    ProjectColumnNotApproved,
    ProjectOnlyForResearch,
    EpsilonInvalid,
    EpsilonOverCap,
    /// A thresholded query gives key selection less than `release.min_threshold_epsilon`.
    ThresholdEpsilonTooSmall,
    UnsupportedAggregate,
    OptOutMissing,
    /// A linked question this node's `[linkage]` rules do not allow (no block, the
    /// partner or dataset not listed, the role, purpose or requester not permitted).
    LinkageNotPermitted,
    /// A linked question whose shape cannot be answered with DP on a set (aggregates
    /// other than COUNT(*), thresholded or not person-level group keys).
    LinkedQueryShape,
    /// Secure aggregation against this node's `[secure_aggregation]` rules: a secure
    /// query where the block is absent or the query's shape cannot be summed securely
    /// (thresholded keys, a linked question), or a plain query where the block
    /// requires secure aggregation.
    SecureAggregation,
}

impl RefusalKind {
    /// Every kind, in declaration order: the one list tests iterate over.
    pub const ALL: [RefusalKind; 28] = [
        RefusalKind::UnknownRequester,
        RefusalKind::RequesterRevoked,
        RefusalKind::PurposeNotPermitted,
        RefusalKind::DatasetNotPermitted,
        RefusalKind::UnknownDataset,
        RefusalKind::UnknownColumn,
        RefusalKind::IdentifierColumn,
        RefusalKind::NotFilterable,
        RefusalKind::NotGroupable,
        RefusalKind::NotAggregatable,
        RefusalKind::TypeMismatch,
        RefusalKind::BinTooNarrow,
        RefusalKind::TooManyCells,
        RefusalKind::ProjectRequired,
        RefusalKind::UnknownProject,
        RefusalKind::ProjectNotForRequester,
        RefusalKind::ProjectExpired,
        RefusalKind::ProjectDatasetNotApproved,
        RefusalKind::ProjectColumnNotApproved,
        RefusalKind::ProjectOnlyForResearch,
        RefusalKind::EpsilonInvalid,
        RefusalKind::EpsilonOverCap,
        RefusalKind::ThresholdEpsilonTooSmall,
        RefusalKind::UnsupportedAggregate,
        RefusalKind::OptOutMissing,
        RefusalKind::LinkageNotPermitted,
        RefusalKind::LinkedQueryShape,
        RefusalKind::SecureAggregation,
    ];

    /// Where this kind sits in [`RefusalKind::ALL`]. An exhaustive match, so a new kind
    /// fails to compile here until it has a place, and a test then checks `ALL` holds
    /// it there.
    pub const fn position(self) -> usize {
        match self {
            RefusalKind::UnknownRequester => 0,
            RefusalKind::RequesterRevoked => 1,
            RefusalKind::PurposeNotPermitted => 2,
            RefusalKind::DatasetNotPermitted => 3,
            RefusalKind::UnknownDataset => 4,
            RefusalKind::UnknownColumn => 5,
            RefusalKind::IdentifierColumn => 6,
            RefusalKind::NotFilterable => 7,
            RefusalKind::NotGroupable => 8,
            RefusalKind::NotAggregatable => 9,
            RefusalKind::TypeMismatch => 10,
            RefusalKind::BinTooNarrow => 11,
            RefusalKind::TooManyCells => 12,
            RefusalKind::ProjectRequired => 13,
            RefusalKind::UnknownProject => 14,
            RefusalKind::ProjectNotForRequester => 15,
            RefusalKind::ProjectExpired => 16,
            RefusalKind::ProjectDatasetNotApproved => 17,
            RefusalKind::ProjectColumnNotApproved => 18,
            RefusalKind::ProjectOnlyForResearch => 19,
            RefusalKind::EpsilonInvalid => 20,
            RefusalKind::EpsilonOverCap => 21,
            RefusalKind::ThresholdEpsilonTooSmall => 22,
            RefusalKind::UnsupportedAggregate => 23,
            RefusalKind::OptOutMissing => 24,
            RefusalKind::LinkageNotPermitted => 25,
            RefusalKind::LinkedQueryShape => 26,
            RefusalKind::SecureAggregation => 27,
        }
    }
}

/// A privacy-budget ledger a query must be charged to.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LedgerCharge {
    /// `requester:<id>` or `project:<id>`.
    pub ledger: String,
    pub period: Period,
    /// Label of the current period, e.g. "2026-11-23", "2026-11" or "2026-Q4".
    pub period_label: String,
    /// Epsilon the ledger holds per period.
    pub total: f64,
    pub per_query_cap: f64,
    /// Delta the ledger holds per period.
    pub delta_total: f64,
}

impl LedgerCharge {
    /// Key under which this period's spend is stored.
    pub fn key(&self) -> String {
        format!("{}/{}", self.ledger, self.period_label)
    }
}

/// A resolved column the query touches.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ColumnLimits {
    pub name: String,
    pub column_type: ColumnType,
    /// Clamping bounds for numeric columns.
    pub bounds: Option<(f64, f64)>,
    /// Declared `never_null` (and checked at load).
    pub never_null: bool,
}

/// The full set of group keys a group-by column releases.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum GroupDomain {
    /// Declared categories, rendered as text the way results label them
    /// (integers as "1", booleans as "true").
    Categories(Vec<String>),
    /// Numeric bins: key i covers `[edges[i], edges[i+1])`; the last bin is closed.
    /// Labels are the lower edges, rendered like "40" (or "40.5").
    Bins { edges: Vec<f64> },
    /// No declared domain: keys are observed, then kept only if they pass DP
    /// thresholding with the policy's delta.
    Thresholded,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GroupLimits {
    pub column: ColumnLimits,
    /// Label in results, e.g. "imd_quintile" or "bin(age, 10)".
    pub label: String,
    pub domain: GroupDomain,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AggregateLimits {
    pub alias: String,
    pub kind: AggregateKind,
    /// `None` for COUNT(*).
    pub column: Option<ColumnLimits>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Limits {
    /// Content hash of the policy that decided this.
    pub policy_version: String,
    pub dataset: String,
    pub person_id: String,
    pub max_rows_per_person: u32,
    pub total_kind: TotalKind,
    /// Rows with this boolean column true are excluded before anything else.
    pub exclude_opted_out: Option<String>,
    pub group_by: Vec<GroupLimits>,
    pub aggregates: Vec<AggregateLimits>,
    /// Total epsilon this query spends at this node (what was requested, within caps).
    pub epsilon: f64,
    pub mechanism: Mechanism,
    /// The policy's per-release delta: the thresholding share and the Gaussian
    /// conversion delta.
    pub delta: f64,
    /// What this query spends on every ledger, planned before it runs; the engine
    /// noises to exactly these amounts.
    pub spend: crate::accounting::Spend,
    pub min_reportable_count: f64,
    pub rounding: Rounding,
    pub scope: Scope,
    /// Every ledger to debit, atomically, before the answer leaves.
    pub charges: Vec<LedgerCharge>,
    /// Public registered population to report for coverage, if declared.
    pub registered_population: Option<u64>,
    /// Set for a linked question: this node's side of the session.
    pub link: Option<LinkLimits>,
    /// Set for a secure (SECURE_SUM) query: this node's rules for joining the session.
    pub secure: Option<SecureLimits>,
}

/// What a node joins a secure-aggregation session under (its `[secure_aggregation]`
/// block). The noise is the discrete Gaussian whatever `release.mechanism` says: it is
/// the one mechanism whose shares add up to a central release.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SecureLimits {
    pub min_cohort: u32,
    pub min_survivors: f64,
    pub assumed_noiseless_peers: u32,
}

/// What a node runs a linkage session under (its own side only; the other node
/// decides its side under its own policy).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkLimits {
    pub role: crate::model::LinkRole,
    /// The other node's ODS code, when the decision was for a known session.
    pub peer: Option<String>,
    /// The other node's public identity text, when this policy pins it.
    pub peer_node_key: Option<String>,
    /// The column holding this dataset's NHS numbers.
    pub link_key: String,
    /// Most real people this node puts in its set.
    pub max_set_size: u64,
    /// NOT EXISTS.
    pub negated: bool,
    /// HAVING COUNT(*) >= k at the partner (1: at least one row).
    pub min_partner_rows: u32,
    /// The delta of each clamped noise draw: the dummy matches and the set padding.
    /// Their sum is the query's delta on the ledger.
    pub delta_link: f64,
    pub delta_size: f64,
}
