//! Describe (the datasets and columns a requester may use) and Budget (what its
//! ledgers have left), each behind a fresh signed proof and audited.

use super::query::freshness;
use super::{Service, Stop, eps, period_label};
use crate::audit::Outcome;
use crate::store::StoreError;
use chrono::{DateTime, Utc};
use phm_policies::Policy;
use phm_policies::model::{Column, Grouping, Organisation, Period, Scope};
use phm_proto::{Denial, DenialReason, ProofOp, RequesterProof};
use std::time::Instant;

/// A dataset as the requester may see it.
#[derive(Debug, Clone, PartialEq)]
pub struct DatasetView {
    pub name: String,
    pub max_rows_per_person: u32,
    /// Only usable, non-identifier columns.
    pub columns: Vec<Column>,
    /// The dataset declares a link key and the requester may ask linked questions.
    pub linkable: bool,
    /// `role:ODS` of each partner this dataset may be linked with.
    pub link_partners: Vec<String>,
}

/// What Describe returns.
#[derive(Debug, Clone, PartialEq)]
pub struct Description {
    pub organisation: Organisation,
    pub datasets: Vec<DatasetView>,
    pub policy_version: String,
    /// The strictest per-query cap that applies to this requester (and project).
    pub per_query_epsilon_cap: f64,
    pub min_reportable_count: f64,
    pub scope: Scope,
}

/// One ledger as Budget reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct LedgerView {
    pub ledger: String,
    pub period: Period,
    pub period_label: String,
    pub total: f64,
    pub spent: f64,
    pub remaining: f64,
    pub per_query_cap: f64,
    pub delta_total: f64,
    pub delta_spent: f64,
    pub delta_remaining: f64,
    /// Composed zCDP rho of this period's Gaussian releases.
    pub rho_spent: f64,
}

/// What Budget returns.
#[derive(Debug, Clone, PartialEq)]
pub struct BudgetView {
    pub node_id: String,
    pub ledgers: Vec<LedgerView>,
    pub policy_version: String,
}

/// `role:ODS` of every linkage partner entry that names `dataset` as ours.
fn link_partners(file: &phm_policies::PolicyFile, dataset: &str) -> Vec<String> {
    let Some(l) = &file.linkage else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for p in l
        .partners
        .iter()
        .filter(|p| p.our_datasets.iter().any(|d| d == dataset))
    {
        for r in &p.roles {
            out.push(format!("{}:{}", r.as_str(), p.ods_code));
        }
    }
    out
}

impl Service {
    /// Authenticate a Describe/Budget proof: known, not revoked, signed for `op`,
    /// fresh, not replayed, and (if a project is named) a member of that project.
    async fn check_proof(
        &self,
        op: ProofOp,
        policy: &Policy,
        proof: &RequesterProof,
        now: DateTime<Utc>,
    ) -> Result<(), Stop> {
        self.check_federation(&proof.federation_id)?;
        self.clock.check()?;
        Self::authenticate(policy, &proof.requester_id, |k| proof.verify(op, k))?;
        freshness(
            proof.issued_at_unix_ms,
            now,
            policy.file().release.query_validity_seconds,
        )?;
        let store = self.store.clone();
        let (req, nonce, issued) = (
            proof.requester_id.clone(),
            proof.nonce.clone(),
            proof.issued_at_unix_ms,
        );
        match self
            .io(move || store.record_nonce(op.as_str(), &req, &nonce, issued))
            .await?
        {
            Ok(()) => {}
            Err(StoreError::Replayed { .. }) => {
                return Err(Denial::new(
                    DenialReason::Replayed,
                    "this proof's nonce was already used by this requester; sign a fresh one",
                )
                .into());
            }
            Err(e) => return Err(self.store_denial(e, "cannot record the nonce").into()),
        }
        if let Some(pid) = &proof.project_id {
            let member = policy
                .file()
                .projects
                .iter()
                .find(|p| p.id == *pid)
                .is_some_and(|p| p.requesters.contains(&proof.requester_id));
            if !member {
                return Err(Denial::new(
                    DenialReason::PolicyDenied,
                    format!(
                        "project {pid:?} is not approved on this node for requester {:?}",
                        proof.requester_id
                    ),
                )
                .into());
            }
        }
        Ok(())
    }

    /// The datasets and columns this requester (under its project, if named) may use.
    pub async fn describe(
        &self,
        proof: RequesterProof,
        peer: &str,
        now: DateTime<Utc>,
    ) -> Result<Description, Denial> {
        let started = Instant::now();
        self.refuse_if_stopping()?;
        let loaded = self.current();
        let policy = &loaded.policy;
        let mut record = self.proof_record(ProofOp::Describe, policy, &proof, peer, now);
        if let Err(stop) = self
            .check_proof(ProofOp::Describe, policy, &proof, now)
            .await
        {
            return Err(self.stopped(record, stop, started).await);
        }
        let file = policy.file();
        let requester = policy.requester(&proof.requester_id);
        let project = proof
            .project_id
            .as_deref()
            .and_then(|id| policy.project(id));
        let opt_out_column = file.opt_out.as_ref().map(|o| o.column.as_str());
        let datasets: Vec<DatasetView> = file
            .datasets
            .iter()
            .filter(|d| requester.is_some_and(|r| r.datasets.contains(&d.name)))
            .filter(|d| project.is_none_or(|p| p.datasets.contains(&d.name)))
            .map(|d| DatasetView {
                linkable: d.link_key.is_some()
                    && requester.is_some_and(|r| r.linked_queries)
                    && file.linkage.is_some(),
                link_partners: link_partners(file, &d.name),
                name: d.name.clone(),
                max_rows_per_person: d.max_rows_per_person,
                columns: d
                    .columns
                    .iter()
                    .filter(|c| !c.identifier && c.name != d.person_id)
                    .filter(|c| Some(c.name.as_str()) != opt_out_column)
                    .filter(|c| c.filter || c.aggregate || c.group != Grouping::No)
                    .filter(|c| project.is_none_or(|p| p.columns.contains(&c.name)))
                    .cloned()
                    .collect(),
            })
            .collect();
        let mut cap = file.release.per_query_epsilon_cap;
        if let Some(r) = requester {
            cap = cap.min(r.budget.per_query_cap);
        }
        if let Some(p) = project {
            cap = cap.min(p.budget.per_query_cap);
        }
        record.decision = Outcome::Allowed;
        record.reasons = vec![format!(
            "described {} dataset(s): {}",
            datasets.len(),
            datasets
                .iter()
                .map(|d| d.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )];
        self.write_audit(record).await?;
        Ok(Description {
            organisation: file.organisation.clone(),
            datasets,
            policy_version: policy.version().to_string(),
            per_query_epsilon_cap: cap,
            min_reportable_count: file.release.min_reportable_count,
            scope: file.release.scope,
        })
    }

    /// The requester's ledger (and its project's, if named) for the current period.
    pub async fn budget(
        &self,
        proof: RequesterProof,
        peer: &str,
        now: DateTime<Utc>,
    ) -> Result<BudgetView, Denial> {
        let started = Instant::now();
        self.refuse_if_stopping()?;
        let loaded = self.current();
        let policy = &loaded.policy;
        let mut record = self.proof_record(ProofOp::Budget, policy, &proof, peer, now);
        if let Err(stop) = self.check_proof(ProofOp::Budget, policy, &proof, now).await {
            return Err(self.stopped(record, stop, started).await);
        }
        let ledgers = match self.read_ledgers(policy, &proof, now).await {
            Ok(l) => l,
            Err(stop) => return Err(self.stopped(record, stop, started).await),
        };
        record.decision = Outcome::Allowed;
        record.reasons = ledgers
            .iter()
            .map(|l| {
                format!(
                    "{} {}: spent {} of {}, delta {:e} of {:e}",
                    l.ledger,
                    l.period_label,
                    eps(l.spent),
                    eps(l.total),
                    l.delta_spent,
                    l.delta_total
                )
            })
            .collect();
        self.write_audit(record).await?;
        Ok(BudgetView {
            node_id: policy.file().organisation.ods_code.clone(),
            ledgers,
            policy_version: policy.version().to_string(),
        })
    }

    /// The requester's ledger and its project's (if named), read for `now`'s period.
    async fn read_ledgers(
        &self,
        policy: &Policy,
        proof: &RequesterProof,
        now: DateTime<Utc>,
    ) -> Result<Vec<LedgerView>, Stop> {
        let mut wanted = Vec::new();
        if let Some(r) = policy.requester(&proof.requester_id) {
            wanted.push((format!("requester:{}", r.id), r.budget.clone()));
        }
        if let Some(p) = proof
            .project_id
            .as_deref()
            .and_then(|id| policy.project(id))
        {
            wanted.push((format!("project:{}", p.id), p.budget.clone()));
        }
        let store = self.store.clone();
        let delta_conv = policy.file().release.delta;
        let read = self
            .io(move || {
                wanted
                    .into_iter()
                    .map(|(ledger, b)| {
                        let label = period_label(b.period, now);
                        let sums = store.held(&ledger, &label)?;
                        let (spent, delta_spent) = sums.effective(delta_conv);
                        Ok(LedgerView {
                            ledger,
                            period: b.period,
                            period_label: label,
                            total: b.epsilon,
                            spent,
                            remaining: (b.epsilon - spent).max(0.0),
                            per_query_cap: b.per_query_cap,
                            delta_total: b.delta,
                            delta_spent,
                            delta_remaining: (b.delta - delta_spent).max(0.0),
                            rho_spent: sums.rho,
                        })
                    })
                    .collect::<Result<Vec<_>, StoreError>>()
            })
            .await?;
        read.map_err(|e| self.store_denial(e, "cannot read the ledger").into())
    }
}
