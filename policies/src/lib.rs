//! The IG policy language: parse and validate a node's policy file, and decide (a pure
//! function of policy, query and time, default deny) whether a query may run.
//! No IO and no async here: callers read files and pass text in.

pub mod decision;
pub mod model;

pub use decision::{
    AggregateLimits, ColumnLimits, Decision, GroupDomain, GroupLimits, LedgerCharge, Limits,
    Refusal, RefusalKind,
};
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
    pub line: usize,
    pub column: usize,
    /// Dotted path to the field, e.g. `requesters[0].purposes`.
    pub field: String,
    pub message: String,
}

impl std::fmt::Display for PolicyError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.message
        )
    }
}

/// Every problem found in a policy file (all are reported at once).
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
    /// in error locations.
    pub fn parse(source_name: &str, text: &str) -> Result<Policy, PolicyErrors> {
        let file: PolicyFile = toml::from_str(text).map_err(|e| {
            PolicyErrors(vec![PolicyError {
                file: source_name.to_string(),
                line: 1,
                column: 1,
                field: String::new(),
                message: e.message().to_string(),
            }])
        })?;
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
}

/// Decide whether `query` may run under `policy` at time `now`. Default deny.
pub fn decide(_policy: &Policy, _query: &QueryBody, _now: chrono::DateTime<chrono::Utc>) -> Decision {
    Decision::Deny(vec![])
}
