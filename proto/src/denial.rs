//! Refusals on the wire: the one place that maps a machine-readable reason to a gRPC
//! status code, and back.

use crate::proto;
use prost::Message;

pub use proto::DenialReason;

/// Metadata key carrying the reason name (e.g. `POLICY_DENIED`) next to the status.
pub const REASON_METADATA_KEY: &str = "phm-reason";

/// A refusal with everything an analyst needs to act on it.
#[derive(Debug, Clone, PartialEq)]
pub struct Denial {
    pub reason: DenialReason,
    pub message: String,
    pub reasons: Vec<String>,
    pub policy_version: String,
}

impl Denial {
    pub fn new(reason: DenialReason, message: impl Into<String>) -> Self {
        Denial {
            reason,
            message: message.into(),
            reasons: Vec::new(),
            policy_version: String::new(),
        }
    }

    pub fn with_reasons(mut self, reasons: Vec<String>) -> Self {
        self.reasons = reasons;
        self
    }

    pub fn with_policy_version(mut self, v: impl Into<String>) -> Self {
        self.policy_version = v.into();
        self
    }

    /// Short upper-case name used in metadata, logs and the CLI.
    pub fn reason_name(&self) -> &'static str {
        reason_name(self.reason)
    }

    pub fn code(&self) -> tonic::Code {
        match self.reason {
            DenialReason::PolicyDenied | DenialReason::PermissionDenied => {
                tonic::Code::PermissionDenied
            }
            DenialReason::BudgetExhausted | DenialReason::Overloaded => {
                tonic::Code::ResourceExhausted
            }
            DenialReason::InvalidQuery => tonic::Code::InvalidArgument,
            DenialReason::Unauthenticated | DenialReason::Replayed | DenialReason::Stale => {
                tonic::Code::Unauthenticated
            }
            DenialReason::QueryIdReused => tonic::Code::AlreadyExists,
            DenialReason::NotFound => tonic::Code::NotFound,
            DenialReason::Unavailable => tonic::Code::Unavailable,
            DenialReason::Internal | DenialReason::Unspecified => tonic::Code::Internal,
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        let details = proto::Denial {
            reason: self.reason as i32,
            message: self.message.clone(),
            reasons: self.reasons.clone(),
            policy_version: self.policy_version.clone(),
        }
        .encode_to_vec();
        let mut status =
            tonic::Status::with_details(self.code(), self.message.clone(), details.into());
        if let Ok(v) = self.reason_name().parse() {
            status.metadata_mut().insert(REASON_METADATA_KEY, v);
        }
        status
    }

    /// Recover a denial from a status; statuses without phm details become
    /// `UNAVAILABLE`/`INTERNAL` denials carrying the status message.
    pub fn from_status(status: &tonic::Status) -> Denial {
        if let Ok(d) = proto::Denial::decode(status.details())
            && let Ok(reason) = DenialReason::try_from(d.reason)
            && reason != DenialReason::Unspecified
        {
            return Denial {
                reason,
                message: d.message,
                reasons: d.reasons,
                policy_version: d.policy_version,
            };
        }
        let reason = match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded => DenialReason::Unavailable,
            tonic::Code::Unauthenticated => DenialReason::Unauthenticated,
            tonic::Code::InvalidArgument => DenialReason::InvalidQuery,
            tonic::Code::ResourceExhausted => DenialReason::Overloaded,
            tonic::Code::PermissionDenied => DenialReason::PolicyDenied,
            tonic::Code::NotFound => DenialReason::NotFound,
            _ => DenialReason::Internal,
        };
        Denial::new(reason, status.message().to_string())
    }
}

pub fn reason_name(r: DenialReason) -> &'static str {
    match r {
        DenialReason::Unspecified => "UNSPECIFIED",
        DenialReason::PolicyDenied => "POLICY_DENIED",
        DenialReason::BudgetExhausted => "BUDGET_EXHAUSTED",
        DenialReason::InvalidQuery => "INVALID_QUERY",
        DenialReason::Unauthenticated => "UNAUTHENTICATED",
        DenialReason::Replayed => "REPLAYED",
        DenialReason::Stale => "STALE",
        DenialReason::QueryIdReused => "QUERY_ID_REUSED",
        DenialReason::Overloaded => "OVERLOADED",
        DenialReason::Unavailable => "UNAVAILABLE",
        DenialReason::Internal => "INTERNAL",
        DenialReason::PermissionDenied => "PERMISSION_DENIED",
        DenialReason::NotFound => "NOT_FOUND",
    }
}

impl From<crate::query::ProtocolError> for Denial {
    fn from(e: crate::query::ProtocolError) -> Self {
        Denial::new(DenialReason::InvalidQuery, format!("invalid query: {e}"))
    }
}

impl std::fmt::Display for Denial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.reason_name(), self.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn denial_round_trips_through_status() {
        let d = Denial::new(DenialReason::BudgetExhausted, "no budget left this month")
            .with_reasons(vec!["requester dsu: 0.0 of 10.0 left".into()])
            .with_policy_version("abc");
        let s = d.to_status();
        assert_eq!(s.code(), tonic::Code::ResourceExhausted);
        assert_eq!(
            s.metadata().get(REASON_METADATA_KEY).unwrap(),
            "BUDGET_EXHAUSTED"
        );
        assert_eq!(Denial::from_status(&s), d);
    }

    #[test]
    fn not_found_round_trips_with_the_grpc_code() {
        let d = Denial::new(DenialReason::NotFound, "no query with id \"q\"");
        let s = d.to_status();
        assert_eq!(s.code(), tonic::Code::NotFound);
        assert_eq!(Denial::from_status(&s), d);
        // A bare NOT_FOUND status (no phm details) is still read as not found.
        let bare = Denial::from_status(&tonic::Status::not_found("gone"));
        assert_eq!(bare.reason, DenialReason::NotFound);
    }

    #[test]
    fn permission_denied_is_its_own_reason_with_the_grpc_code() {
        let d = Denial::new(
            DenialReason::PermissionDenied,
            "this node answers only its coordinator",
        );
        let s = d.to_status();
        assert_eq!(s.code(), tonic::Code::PermissionDenied);
        assert_eq!(
            s.metadata().get(REASON_METADATA_KEY).unwrap(),
            "PERMISSION_DENIED"
        );
        let back = Denial::from_status(&s);
        assert_eq!(back.reason, DenialReason::PermissionDenied);
        assert_eq!(back, d);
    }

    #[test]
    fn plain_status_maps_to_a_reason() {
        let s = tonic::Status::unavailable("connection refused");
        let d = Denial::from_status(&s);
        assert_eq!(d.reason, DenialReason::Unavailable);
        assert_eq!(d.message, "connection refused");
    }
}
