//! The audit record each RPC starts from: a refusal with what is known about the
//! request, which later steps fill in and turn into an allowed decision.

use super::Service;
use crate::audit::{AuditRecord, Outcome};
use chrono::{DateTime, Utc};
use phm_policies::Policy;
use phm_proto::{ProofOp, RequesterProof, SignedQuery};

/// An audit record of a refusal with nothing yet known about the query; callers fill
/// in what they know, and later steps turn it into an allowed decision.
pub(super) fn refused_record(
    now: DateTime<Utc>,
    rpc: &str,
    requester: &str,
    peer: &str,
    policy_version: String,
) -> AuditRecord {
    AuditRecord {
        time: now_rfc3339(now),
        rpc: rpc.to_string(),
        requester: requester.to_string(),
        purpose: None,
        project: None,
        query_id: None,
        query_digest: None,
        sql: None,
        dataset: None,
        epsilon_requested: None,
        client_identity: peer.to_string(),
        decision: Outcome::Refused,
        cached: false,
        reason: None,
        reasons: vec![],
        epsilon_spent: 0.0,
        delta_spent: 0.0,
        ledger_spend: None,
        ledgers: vec![],
        charged: vec![],
        policy_version,
        statements: vec![],
    }
}

fn now_rfc3339(now: DateTime<Utc>) -> String {
    now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

impl Service {
    pub(super) fn query_record(
        &self,
        policy: &Policy,
        q: &SignedQuery,
        peer: &str,
        now: DateTime<Utc>,
    ) -> AuditRecord {
        let b = &q.body;
        AuditRecord {
            purpose: Some(b.purpose.as_str().to_string()),
            project: b.project_id.clone(),
            query_id: Some(b.query_id.clone()),
            query_digest: Some(b.digest()),
            sql: Some(b.to_sql()),
            dataset: Some(b.dataset.clone()),
            epsilon_requested: Some(b.epsilon),
            ..refused_record(
                now,
                "query",
                &b.requester_id,
                peer,
                policy.version().to_string(),
            )
        }
    }

    pub(super) fn proof_record(
        &self,
        op: ProofOp,
        policy: &Policy,
        proof: &RequesterProof,
        peer: &str,
        now: DateTime<Utc>,
    ) -> AuditRecord {
        AuditRecord {
            project: proof.project_id.clone(),
            ..refused_record(
                now,
                op.as_str(),
                &proof.requester_id,
                peer,
                policy.version().to_string(),
            )
        }
    }
}
