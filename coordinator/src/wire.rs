//! The coordinator's domain outcomes (`model.rs`, `combine.rs`) to and from phm.v1:
//! used by the server to answer and by the history store to record and replay. Each
//! conversion destructures its source, so a new field fails to compile here until it
//! is carried.

use crate::combine::{Breakdown, Cell, Level, Row};
use crate::config::TotalKind;
use crate::model::{
    Coverage, Event, NodeOutcome, NodeProgress, NodeRef, NodeRefusal, SystemResult,
};
use phm_proto::{DenialReason, proto};

/// A stored message that no longer reads as a result (the history is corrupt).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct WireError(pub String);

fn reason_of(r: Option<DenialReason>) -> i32 {
    r.map_or(DenialReason::Unspecified, |r| r) as i32
}

fn reason_from(r: i32) -> Option<DenialReason> {
    DenialReason::try_from(r)
        .ok()
        .filter(|r| *r != DenialReason::Unspecified)
}

impl From<NodeRef> for proto::NodeRef {
    fn from(n: NodeRef) -> Self {
        let NodeRef {
            id,
            ods_code,
            name,
            kind,
            place,
            pcn,
        } = n;
        proto::NodeRef {
            node_id: id,
            ods_code,
            name,
            kind,
            place,
            pcn,
        }
    }
}

impl From<proto::NodeRef> for NodeRef {
    fn from(n: proto::NodeRef) -> Self {
        let proto::NodeRef {
            node_id,
            ods_code,
            name,
            kind,
            place,
            pcn,
        } = n;
        NodeRef {
            id: node_id,
            ods_code,
            name,
            kind,
            place,
            pcn,
        }
    }
}

fn node_from(n: Option<proto::NodeRef>) -> NodeRef {
    n.map(NodeRef::from).unwrap_or_default()
}

impl From<NodeOutcome> for proto::NodeOutcome {
    fn from(o: NodeOutcome) -> Self {
        match o {
            NodeOutcome::Answered => proto::NodeOutcome::Answered,
            NodeOutcome::Refused => proto::NodeOutcome::Refused,
            NodeOutcome::Unreachable => proto::NodeOutcome::Unreachable,
            NodeOutcome::TimedOut => proto::NodeOutcome::TimedOut,
            NodeOutcome::Malformed => proto::NodeOutcome::Malformed,
        }
    }
}

fn outcome_from(o: i32) -> NodeOutcome {
    match proto::NodeOutcome::try_from(o) {
        Ok(proto::NodeOutcome::Answered) => NodeOutcome::Answered,
        Ok(proto::NodeOutcome::Refused) => NodeOutcome::Refused,
        Ok(proto::NodeOutcome::TimedOut) => NodeOutcome::TimedOut,
        Ok(proto::NodeOutcome::Malformed) => NodeOutcome::Malformed,
        // Nothing known about the call: it did not reach the node.
        _ => NodeOutcome::Unreachable,
    }
}

impl From<NodeProgress> for proto::NodeProgress {
    fn from(p: NodeProgress) -> Self {
        let NodeProgress {
            node,
            nodes_total,
            outcome,
            reason,
            message,
            epsilon_spent,
        } = p;
        proto::NodeProgress {
            node: Some(node.into()),
            outcome: proto::NodeOutcome::from(outcome) as i32,
            reason: reason_of(reason),
            message,
            // Response times stay in the coordinator's log: sent to analysts they would
            // amplify a timing side channel (see `Inner::ask_node`).
            elapsed_ms: 0,
            epsilon_spent,
            nodes_total,
        }
    }
}

impl From<proto::NodeProgress> for NodeProgress {
    fn from(p: proto::NodeProgress) -> Self {
        let proto::NodeProgress {
            node,
            outcome,
            reason,
            message,
            elapsed_ms: _,
            epsilon_spent,
            nodes_total,
        } = p;
        NodeProgress {
            node: node_from(node),
            nodes_total,
            outcome: outcome_from(outcome),
            reason: reason_from(reason),
            message,
            epsilon_spent,
        }
    }
}

impl From<NodeRefusal> for proto::NodeRefusal {
    fn from(r: NodeRefusal) -> Self {
        let NodeRefusal {
            node,
            reason,
            message,
        } = r;
        proto::NodeRefusal {
            node: Some(node.into()),
            reason: reason_of(reason),
            message,
        }
    }
}

impl From<proto::NodeRefusal> for NodeRefusal {
    fn from(r: proto::NodeRefusal) -> Self {
        NodeRefusal {
            node: node_from(r.node),
            reason: reason_from(r.reason),
            message: r.message,
        }
    }
}

fn all<A, B: From<A>>(v: Vec<A>) -> Vec<B> {
    v.into_iter().map(B::from).collect()
}

impl From<Coverage> for proto::Coverage {
    fn from(c: Coverage) -> Self {
        let Coverage {
            answered,
            refused,
            unreachable,
            timed_out,
            malformed,
            population_answered,
            population_registered,
            partial,
        } = c;
        proto::Coverage {
            answered: all(answered),
            refused: all(refused),
            unreachable: all(unreachable),
            timed_out: all(timed_out),
            malformed: all(malformed),
            population_answered,
            population_registered,
            partial,
        }
    }
}

impl From<proto::Coverage> for Coverage {
    fn from(c: proto::Coverage) -> Self {
        let proto::Coverage {
            answered,
            refused,
            unreachable,
            timed_out,
            malformed,
            population_answered,
            population_registered,
            partial,
        } = c;
        Coverage {
            answered: all(answered),
            refused: all(refused),
            unreachable: all(unreachable),
            timed_out: all(timed_out),
            malformed: all(malformed),
            population_answered,
            population_registered,
            partial,
        }
    }
}

impl From<Cell> for proto::CombinedCell {
    fn from(c: Cell) -> Self {
        let Cell {
            alias,
            estimate,
            standard_error,
            ci95_low,
            ci95_high,
            suppressed,
            suppression_reason,
            contributors,
            note,
        } = c;
        proto::CombinedCell {
            alias,
            estimate,
            standard_error,
            ci95_low,
            ci95_high,
            suppressed,
            suppression_reason,
            contributors,
            note,
        }
    }
}

impl From<proto::CombinedCell> for Cell {
    fn from(c: proto::CombinedCell) -> Self {
        let proto::CombinedCell {
            alias,
            estimate,
            standard_error,
            ci95_low,
            ci95_high,
            suppressed,
            suppression_reason,
            contributors,
            note,
        } = c;
        Cell {
            alias,
            estimate,
            standard_error,
            ci95_low,
            ci95_high,
            suppressed,
            suppression_reason,
            contributors,
            note,
        }
    }
}

impl From<Row> for proto::CombinedRow {
    fn from(r: Row) -> Self {
        let Row {
            key,
            cells,
            missing,
            note,
        } = r;
        proto::CombinedRow {
            key,
            cells: all(cells),
            missing,
            note,
        }
    }
}

impl From<proto::CombinedRow> for Row {
    fn from(r: proto::CombinedRow) -> Self {
        let proto::CombinedRow {
            key,
            cells,
            missing,
            note,
        } = r;
        Row {
            key,
            cells: all(cells),
            missing,
            note,
        }
    }
}

impl From<Breakdown> for proto::Breakdown {
    fn from(b: Breakdown) -> Self {
        let Breakdown { level, label, rows } = b;
        proto::Breakdown {
            level: level.as_str().to_string(),
            label,
            rows: all(rows),
        }
    }
}

impl TryFrom<proto::Breakdown> for Breakdown {
    type Error = WireError;

    fn try_from(b: proto::Breakdown) -> Result<Self, WireError> {
        let level = Level::parse(&b.level)
            .ok_or_else(|| WireError(format!("unknown breakdown level {:?}", b.level)))?;
        Ok(Breakdown {
            level,
            label: b.label,
            rows: all(b.rows),
        })
    }
}

impl From<SystemResult> for proto::CombinedResult {
    fn from(r: SystemResult) -> Self {
        let SystemResult {
            query_id,
            dataset,
            group_columns,
            aggregate_aliases,
            rows,
            coverage,
            total_kind,
            total_note,
            epsilon_spent_per_node,
            delta_spent_per_node,
            breakdowns,
            completed_at_unix_ms,
            min_reportable_count,
        } = r;
        proto::CombinedResult {
            query_id,
            dataset,
            group_columns,
            aggregate_aliases,
            rows: all(rows),
            coverage: Some(coverage.into()),
            total_kind: proto::TotalKind::from(total_kind) as i32,
            total_note,
            epsilon_spent_per_node,
            breakdowns: all(breakdowns),
            completed_at_unix_ms,
            min_reportable_count,
            delta_spent_per_node,
        }
    }
}

impl TryFrom<proto::CombinedResult> for SystemResult {
    type Error = WireError;

    fn try_from(r: proto::CombinedResult) -> Result<Self, WireError> {
        let proto::CombinedResult {
            query_id,
            dataset,
            group_columns,
            aggregate_aliases,
            rows,
            coverage,
            total_kind,
            total_note,
            epsilon_spent_per_node,
            breakdowns,
            completed_at_unix_ms,
            min_reportable_count,
            delta_spent_per_node,
        } = r;
        let total_kind = match proto::TotalKind::try_from(total_kind) {
            Ok(proto::TotalKind::DistinctPeople) => TotalKind::DistinctPeople,
            Ok(proto::TotalKind::SumOfPartnerCounts) => TotalKind::SumOfPartnerCounts,
            _ => return Err(WireError(format!("unknown total kind {total_kind}"))),
        };
        Ok(SystemResult {
            query_id,
            dataset,
            group_columns,
            aggregate_aliases,
            rows: all(rows),
            coverage: coverage.map(Coverage::from).unwrap_or_default(),
            total_kind,
            total_note,
            epsilon_spent_per_node,
            delta_spent_per_node,
            breakdowns: breakdowns
                .into_iter()
                .map(Breakdown::try_from)
                .collect::<Result<_, _>>()?,
            completed_at_unix_ms,
            min_reportable_count,
        })
    }
}

impl From<Event> for proto::SubmitEvent {
    fn from(e: Event) -> Self {
        proto::SubmitEvent {
            event: Some(match e {
                Event::Progress(p) => proto::submit_event::Event::Progress(p.into()),
                Event::Result(r) => proto::submit_event::Event::Result((*r).into()),
            }),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_system_result_survives_the_wire_unchanged() {
        let node = NodeRef {
            id: "A81001".into(),
            ods_code: "A81001".into(),
            name: "Practice".into(),
            kind: "gp_practice".into(),
            place: "North".into(),
            pcn: "PCN1".into(),
        };
        let row = Row {
            key: vec!["1".into()],
            cells: vec![Cell {
                alias: "n".into(),
                estimate: 10.0,
                standard_error: 1.5,
                ci95_low: 7.0,
                ci95_high: 13.0,
                suppressed: false,
                suppression_reason: String::new(),
                contributors: 2,
                note: "n".into(),
            }],
            missing: 1,
            note: "one missing".into(),
        };
        let result = SystemResult {
            query_id: "q".into(),
            dataset: "gp_patients".into(),
            group_columns: vec!["imd".into()],
            aggregate_aliases: vec!["n".into()],
            rows: vec![row.clone()],
            coverage: Coverage {
                answered: vec![node.clone()],
                refused: vec![NodeRefusal {
                    node: node.clone(),
                    reason: Some(DenialReason::BudgetExhausted),
                    message: "spent".into(),
                }],
                population_answered: 10.0,
                population_registered: 20.0,
                partial: true,
                ..Default::default()
            },
            total_kind: TotalKind::DistinctPeople,
            total_note: "note".into(),
            epsilon_spent_per_node: 0.5,
            delta_spent_per_node: 1e-9,
            breakdowns: vec![Breakdown {
                level: Level::Pcn,
                label: "PCN1".into(),
                rows: vec![row],
            }],
            completed_at_unix_ms: 17,
            min_reportable_count: 7.0,
        };
        let wire = proto::CombinedResult::from(result.clone());
        assert_eq!(SystemResult::try_from(wire).unwrap(), result);
        let progress = NodeProgress {
            node,
            nodes_total: 3,
            outcome: NodeOutcome::Malformed,
            reason: None,
            message: "excluded".into(),
            epsilon_spent: 0.25,
        };
        let wire = proto::NodeProgress::from(progress.clone());
        assert_eq!(wire.elapsed_ms, 0);
        assert_eq!(NodeProgress::from(wire), progress);
    }
}
