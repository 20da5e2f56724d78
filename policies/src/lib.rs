//! The IG policy language: parse and validate a node's policy file, and decide (a pure
//! function of policy, query and time, default deny) whether a query may run.
//! No IO and no async here: callers read files and pass text in.

pub mod accounting;
pub mod decision;
mod domain;
mod evaluate;
pub mod linking;
pub mod measures;
pub mod model;
mod parse;
mod validate;

#[cfg(test)]
mod tests;

pub use accounting::Spend;
pub use decision::{
    AggregateLimits, ColumnLimits, Decision, GroupDomain, GroupLimits, LedgerCharge, Limits,
    LinkLimits, Refusal, RefusalKind, SecureLimits,
};
pub use evaluate::{ExplainLine, period_label, period_span, periods_overlap};
pub use linking::{LinkSide, partner_view};
pub use model::PolicyFile;

use phm_proto::QueryBody;
use sha2::{Digest, Sha256};

/// A parsed, validated policy and its version.
#[derive(Debug, Clone)]
pub struct Policy {
    file: PolicyFile,
    version: String,
    source_name: String,
}

/// One problem in a policy file, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyError {
    pub file: String,
    /// 1-based line of the offending value (or key).
    pub line: usize,
    /// 1-based column, counted in characters.
    pub column: usize,
    /// Dotted path to the field, e.g. `requesters[0].purposes[1]`; empty for syntax
    /// errors that belong to no field.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )?;
        if !self.field.is_empty() {
            write!(f, " (at {})", self.field)?;
        }
        Ok(())
    }
}

/// Every problem found in a policy file (all are reported at once, in file order).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct PolicyErrors(pub Vec<PolicyError>);

impl std::fmt::Display for PolicyErrors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl Policy {
    /// Parse and validate policy text. `source_name` (usually the file name) is used
    /// in error locations. Every syntax error is reported; when the syntax is sound,
    /// every structural and cross-field problem is reported.
    pub fn parse(source_name: &str, text: &str) -> Result<Policy, PolicyErrors> {
        let located = |problems: Vec<parse::Located>| {
            let map = parse::LineMap::new(text);
            let mut errors: Vec<(usize, PolicyError)> = problems
                .into_iter()
                .map(|p| {
                    let (line, column) = map.locate(p.offset);
                    (
                        p.offset,
                        PolicyError {
                            file: source_name.to_string(),
                            line,
                            column,
                            field: p.field,
                            message: p.message,
                        },
                    )
                })
                .collect();
            // Stable sort keeps messages about the same spot in the order they were found.
            errors.sort_by_key(|(offset, _)| *offset);
            PolicyErrors(errors.into_iter().map(|(_, e)| e).collect())
        };
        let (file, index) = parse::parse(text).map_err(located)?;
        let problems = validate::validate(&file);
        if !problems.is_empty() {
            return Err(located(
                problems
                    .into_iter()
                    .map(|(field, message)| parse::Located {
                        offset: index.offset_of(&field),
                        field,
                        message,
                    })
                    .collect(),
            ));
        }
        Ok(Policy {
            file,
            version: hex::encode(Sha256::digest(text.as_bytes())),
            source_name: source_name.to_string(),
        })
    }

    /// Content hash (SHA-256 hex) of the policy text in force.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn file(&self) -> &PolicyFile {
        &self.file
    }

    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    pub fn requester(&self, id: &str) -> Option<&model::Requester> {
        self.file.requesters.iter().find(|r| r.id == id)
    }

    /// The requester's decoded public key (validated at parse time).
    pub fn requester_key(&self, id: &str) -> Option<ed25519_dalek::VerifyingKey> {
        self.requester(id)
            .and_then(|r| phm_proto::signing::public_key_from_base64(&r.public_key).ok())
    }

    pub fn dataset(&self, name: &str) -> Option<&model::Dataset> {
        self.file.datasets.iter().find(|d| d.name == name)
    }

    /// The key the federation's node registry must be signed with (`[peers]`), when
    /// this node takes part in linked and secure queries (validated at parse time).
    pub fn registry_key(&self) -> Option<ed25519_dalek::VerifyingKey> {
        self.file
            .peers
            .as_ref()
            .and_then(|p| phm_proto::signing::public_key_from_base64(&p.registry_key).ok())
    }

    pub fn project(&self, id: &str) -> Option<&model::Project> {
        self.file.projects.iter().find(|p| p.id == id)
    }
}

/// Decide whether `query` may run under `policy` at time `now`. Default deny: the
/// answer is `Allow` only when every check passed, otherwise `Deny` with every
/// reason found (not just the first).
pub fn decide(policy: &Policy, query: &QueryBody, now: chrono::DateTime<chrono::Utc>) -> Decision {
    evaluate::evaluate(policy, query, None, now).decision
}

/// Decide this node's side of a linked question (see [`linking`]): the same checks as
/// [`decide`] on this side's view of the query, plus the `[linkage]` rules.
pub fn decide_linked(
    policy: &Policy,
    query: &QueryBody,
    side: LinkSide<'_>,
    now: chrono::DateTime<chrono::Utc>,
) -> Decision {
    evaluate::evaluate(policy, query, Some(side), now).decision
}

/// The side this policy would take in a linked question, for `explain`: the anchor if
/// it holds the outer dataset, else the partner if it holds the EXISTS dataset.
pub fn linked_side<'a>(policy: &Policy, query: &QueryBody) -> Option<LinkSide<'a>> {
    let l = query.linkage.as_ref()?;
    if policy.dataset(&query.dataset).is_some() || policy.dataset(&l.partner_dataset).is_none() {
        Some(LinkSide::Anchor { partner: None })
    } else {
        Some(LinkSide::Partner { anchor: None })
    }
}

/// Line by line, which rule allowed or refused each part of `query` (the same
/// evaluation `decide` runs, so the explanation cannot drift from the decision).
pub fn explain(
    policy: &Policy,
    query: &QueryBody,
    now: chrono::DateTime<chrono::Utc>,
) -> Vec<ExplainLine> {
    evaluate::evaluate(policy, query, linked_side(policy, query), now).lines
}

/// JSON Schema of the policy file format (for editors and documentation).
pub fn schema() -> serde_json::Value {
    schemars::schema_for!(PolicyFile).to_value()
}
