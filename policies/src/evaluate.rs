//! The decision: one pass over a query that records, for every part, the rule that
//! allowed or refused it. `decide` keeps the verdict, `explain` keeps the lines, so an
//! explanation can never disagree with the decision it explains.

use crate::Policy;
use crate::accounting::{self, Spend};
use crate::decision::{
    AggregateLimits, ColumnLimits, Decision, GroupDomain, GroupLimits, LedgerCharge, Limits,
    Refusal, RefusalKind, SecureLimits,
};
use crate::domain::{self, PlainGroup};
use crate::linking::{self, LinkSide};
use crate::model::{
    Budget, Column, ColumnType, Dataset, Grouping, Mechanism, Period, Project, Requester,
};
use chrono::{DateTime, Datelike, Utc};
use phm_proto::{
    AggregateKind, Aggregation, CompareOp, GroupKey, Literal, Predicate, Purpose, QueryBody,
};
use serde::Serialize;

/// One step of a decision: which part of the query, which rule, and the outcome.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ExplainLine {
    pub allowed: bool,
    /// Set on refused lines.
    pub kind: Option<RefusalKind>,
    /// The part of the query, e.g. `requester dsu` or `group key bin(age, 10)`.
    pub subject: String,
    /// The policy rule, e.g. `requesters.dsu.purposes`.
    pub rule: String,
    pub detail: String,
}

impl std::fmt::Display for ExplainLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mark = if self.allowed { "allowed" } else { "REFUSED" };
        write!(
            f,
            "{mark:<8} {}  [{}]  {}",
            self.subject, self.rule, self.detail
        )
    }
}

/// Label of the budget period `now` falls in: "2026-11-23", "2026-11" or "2026-Q4".
pub fn period_label(period: Period, now: DateTime<Utc>) -> String {
    match period {
        Period::Day => now.format("%Y-%m-%d").to_string(),
        Period::Month => now.format("%Y-%m").to_string(),
        Period::Quarter => format!("{}-Q{}", now.year(), (now.month() - 1) / 3 + 1),
    }
}

/// The first and last day a period label covers ("2026-11-23", "2026-11", "2026-Q4").
pub fn period_span(label: &str) -> Option<(chrono::NaiveDate, chrono::NaiveDate)> {
    use chrono::NaiveDate;
    let parts: Vec<&str> = label.split('-').collect();
    let year: i32 = parts.first()?.parse().ok()?;
    let month_end = |y: i32, m: u32| {
        let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
        NaiveDate::from_ymd_opt(ny, nm, 1).and_then(|d| d.pred_opt())
    };
    match parts.as_slice() {
        [_, m, d] => {
            let day = NaiveDate::from_ymd_opt(year, m.parse().ok()?, d.parse().ok()?)?;
            Some((day, day))
        }
        [_, q] if q.starts_with('Q') => {
            let n: u32 = q[1..].parse().ok()?;
            if !(1..=4).contains(&n) {
                return None;
            }
            let first = NaiveDate::from_ymd_opt(year, 3 * n - 2, 1)?;
            Some((first, month_end(year, 3 * n)?))
        }
        [_, m] => {
            let m: u32 = m.parse().ok()?;
            Some((NaiveDate::from_ymd_opt(year, m, 1)?, month_end(year, m)?))
        }
        _ => None,
    }
}

/// Do two period labels cover a common day? A ledger's spend under one period kind
/// still counts when the policy switches to another (month → quarter), so a period
/// change never opens a fresh budget for time already spent. Unparseable labels
/// are taken to overlap (fail closed).
pub fn periods_overlap(a: &str, b: &str) -> bool {
    match (period_span(a), period_span(b)) {
        (Some((a0, a1)), Some((b0, b1))) => a0 <= b1 && b0 <= a1,
        _ => true,
    }
}

/// A policy enum as the policy file spells it.
fn snake<T: Serialize>(v: &T) -> String {
    match serde_json::to_value(v) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::from("?"),
    }
}

pub(crate) struct Evaluation {
    pub decision: Decision,
    pub lines: Vec<ExplainLine>,
}

#[derive(Default)]
struct Trace {
    lines: Vec<ExplainLine>,
    refusals: Vec<Refusal>,
}

impl Trace {
    fn extend(&mut self, notes: Vec<linking::Note>) {
        for n in notes {
            match n {
                linking::Note::Allow {
                    subject,
                    rule,
                    detail,
                } => self.allow(subject, rule, detail),
                linking::Note::Refuse {
                    kind,
                    subject,
                    rule,
                    message,
                } => self.refuse(kind, subject, rule, message),
            }
        }
    }

    fn allow(
        &mut self,
        subject: impl Into<String>,
        rule: impl Into<String>,
        detail: impl Into<String>,
    ) {
        self.lines.push(ExplainLine {
            allowed: true,
            kind: None,
            subject: subject.into(),
            rule: rule.into(),
            detail: detail.into(),
        });
    }

    fn refuse(
        &mut self,
        kind: RefusalKind,
        subject: impl Into<String>,
        rule: impl Into<String>,
        message: impl Into<String>,
    ) {
        let (rule, message) = (rule.into(), message.into());
        self.lines.push(ExplainLine {
            allowed: false,
            kind: Some(kind),
            subject: subject.into(),
            rule: rule.clone(),
            detail: message.clone(),
        });
        let refusal = Refusal {
            kind,
            rule,
            message,
        };
        // The same column may be refused in several places; say it once.
        if !self.refusals.contains(&refusal) {
            self.refusals.push(refusal);
        }
    }
}

/// A group key's domain before it is built: sizes are checked first.
enum PendingDomain {
    Categories(Vec<String>),
    Bins(Vec<f64>),
    IntegerValues(i64, i64),
    BinWidth { lower: f64, upper: f64, width: f64 },
    Thresholded,
}

impl PendingDomain {
    /// Number of keys, `None` when keys are observed and thresholded.
    fn size(&self) -> Option<f64> {
        match self {
            PendingDomain::Categories(v) => Some(v.len() as f64),
            PendingDomain::Bins(e) => Some(e.len().saturating_sub(1) as f64),
            PendingDomain::IntegerValues(lo, hi) => Some((*hi as f64 - *lo as f64 + 1.0).max(0.0)),
            PendingDomain::BinWidth {
                lower,
                upper,
                width,
            } => Some(domain::bin_count(*lower, *upper, *width)),
            PendingDomain::Thresholded => None,
        }
    }

    fn build(self) -> GroupDomain {
        match self {
            PendingDomain::Categories(v) => GroupDomain::Categories(v),
            PendingDomain::Bins(edges) => GroupDomain::Bins { edges },
            PendingDomain::IntegerValues(lo, hi) => {
                GroupDomain::Categories((lo..=hi).map(|i| i.to_string()).collect())
            }
            PendingDomain::BinWidth {
                lower,
                upper,
                width,
            } => GroupDomain::Bins {
                edges: domain::bin_edges(lower, upper, width),
            },
            PendingDomain::Thresholded => GroupDomain::Thresholded,
        }
    }
}

fn column_limits(c: &Column) -> ColumnLimits {
    ColumnLimits {
        name: c.name.clone(),
        column_type: c.column_type,
        bounds: c.bounds.map(|[lo, hi]| (lo, hi)),
        never_null: c.never_null,
    }
}

struct DatasetCtx<'a> {
    d: &'a Dataset,
    path: String,
}

impl<'a> DatasetCtx<'a> {
    fn col_rule(&self, c: &str, field: &str) -> String {
        format!("{}.columns.{c}.{field}", self.path)
    }

    fn visible(&self) -> String {
        let v: Vec<&str> = self
            .d
            .columns
            .iter()
            .filter(|c| !c.identifier)
            .map(|c| c.name.as_str())
            .collect();
        if v.is_empty() {
            "none".into()
        } else {
            v.join(", ")
        }
    }

    /// The column, if it exists and is not an identifier.
    fn resolve(&self, t: &mut Trace, subject: &str, name: &str) -> Option<&'a Column> {
        match self.d.columns.iter().find(|c| c.name == name) {
            None => {
                t.refuse(
                    RefusalKind::UnknownColumn,
                    subject,
                    format!("{}.columns", self.path),
                    format!(
                        "dataset {} has no column {name:?}; visible columns: {}",
                        self.d.name,
                        self.visible()
                    ),
                );
                None
            }
            Some(c) if c.identifier => {
                t.refuse(
                    RefusalKind::IdentifierColumn,
                    subject,
                    self.col_rule(name, "identifier"),
                    format!(
                        "column {name} is an identifier; identifiers can never be filtered, \
                         grouped or aggregated"
                    ),
                );
                None
            }
            Some(c) => Some(c),
        }
    }
}

/// What the checks against the dataset produced; empty when the dataset is unknown.
#[derive(Default)]
struct DatasetChecks {
    group_by: Vec<GroupLimits>,
    aggregates: Vec<AggregateLimits>,
    exclude_opted_out: Option<String>,
}

/// Every check, in the order the explanation lists them: who asks, for which dataset
/// and project, the query's parts against the dataset, epsilon, the spend, the ledgers
/// to charge and the release rules. Allowed only when nothing was refused.
pub(crate) fn evaluate(
    policy: &Policy,
    signed: &QueryBody,
    side: Option<LinkSide<'_>>,
    now: DateTime<Utc>,
) -> Evaluation {
    let mut t = Trace::default();
    // A partner decides the EXISTS clause as a query of its own.
    let view;
    let q = match (&signed.linkage, side) {
        (Some(l), Some(LinkSide::Partner { .. })) => {
            view = linking::partner_view(signed, l);
            &view
        }
        _ => signed,
    };
    refuse_out_of_session(signed, side, &mut t);
    let requester = check_requester(policy, q, &mut t);
    let dataset = check_dataset(policy, q, requester, &mut t);
    let project = check_project(policy, q, requester, now, &mut t);
    let checks = dataset
        .map(|d| check_against_dataset(policy, q, d, project, &mut t))
        .unwrap_or_default();
    check_epsilon(policy, q, requester, project, &mut t);
    let thresholded = checks
        .group_by
        .iter()
        .any(|g: &GroupLimits| g.domain == GroupDomain::Thresholded);
    let link = match (&signed.linkage, side) {
        (Some(linkage), Some(side)) => {
            let (notes, limits) = linking::check(&linking::LinkCheck {
                policy,
                query: signed,
                linkage,
                side,
                dataset,
                requester,
                project,
                group_by: &checks.group_by,
            });
            t.extend(notes);
            limits
        }
        _ => None,
    };
    let secure = check_aggregation(policy, signed, thresholded, &mut t);
    let spend = if signed.linkage.is_some() {
        // Two clamped discrete Laplace draws (dummy matches, set padding) at the
        // query's epsilon in all, each with half the policy's delta of truncation.
        Spend {
            epsilon: q.epsilon,
            delta: policy.file().release.delta,
            rho: 0.0,
        }
    } else if secure.is_some() {
        // The discrete Gaussian, whatever release.mechanism says: shares of it add up
        // to a central release (secagg/PROTOCOL.md), and the Laplace's do not.
        let r = &policy.file().release;
        accounting::plan(
            Mechanism::DiscreteGaussian,
            q.epsilon,
            q.aggregates.len(),
            false,
            r.delta,
        )
        .spend
    } else {
        plan_spend(policy, q, &checks.aggregates, thresholded, &mut t)
    };
    let charges = ledger_charges(q, requester, project, spend.delta, now, &mut t);
    note_release_rules(policy, &mut t);
    let decision = match (requester, dataset) {
        (Some(_), Some(d)) if t.refusals.is_empty() => {
            let mut limits = limits(policy, q, d, checks, spend, charges);
            limits.link = link;
            if let Some(s) = secure {
                limits.secure = Some(s);
                limits.mechanism = Mechanism::DiscreteGaussian;
            }
            Decision::Allow(Box::new(limits))
        }
        _ => Decision::Deny(t.refusals),
    };
    Evaluation {
        decision,
        lines: t.lines,
    }
}

/// Secure aggregation against the `[secure_aggregation]` block: a secure query needs the
/// block, declared group keys (thresholding would release each node's own keys) and no
/// EXISTS clause; a plain query is refused where the block requires secure mode.
/// Returns this node's session rules for a secure query that passed.
fn check_aggregation(
    policy: &Policy,
    q: &QueryBody,
    thresholded: bool,
    t: &mut Trace,
) -> Option<SecureLimits> {
    let block = policy.file().secure_aggregation.as_ref();
    let rule = "secure_aggregation";
    match (q.aggregation, block) {
        (Aggregation::Plain, Some(b)) if b.require => {
            t.refuse(
                RefusalKind::SecureAggregation,
                "aggregation",
                "secure_aggregation.require",
                "this partner answers only secure queries, so no figure of its own is released: ask again in secure mode (phm query --secure)",
            );
            None
        }
        (Aggregation::Plain, _) => None,
        (Aggregation::SecureSum, None) => {
            t.refuse(
                RefusalKind::SecureAggregation,
                "aggregation",
                rule,
                "this node's policy has no [secure_aggregation] block, so it takes part in no secure query",
            );
            None
        }
        (Aggregation::SecureSum, Some(b)) => {
            let mut ok = true;
            if thresholded {
                ok = false;
                t.refuse(
                    RefusalKind::SecureAggregation,
                    "aggregation",
                    rule,
                    "a secure query must group only by keys with a declared domain (categories or bins): thresholded keys would release this node's own key set",
                );
            }
            if q.linkage.is_some() {
                ok = false;
                t.refuse(
                    RefusalKind::SecureAggregation,
                    "aggregation",
                    rule,
                    "a linked question cannot be summed securely; ask it without --secure",
                );
            }
            if !ok {
                return None;
            }
            t.allow(
                "aggregation",
                rule,
                format!(
                    "secure aggregation: joins cohorts of at least {} nodes whose noise holds with {}% surviving, assuming {} noiseless; discrete Gaussian share",
                    b.min_cohort,
                    b.min_survivors * 100.0,
                    b.assumed_noiseless_peers
                ),
            );
            Some(SecureLimits {
                min_cohort: b.min_cohort,
                min_survivors: b.min_survivors,
                assumed_noiseless_peers: b.assumed_noiseless_peers,
            })
        }
    }
}

/// A linked question is answered only inside a link session (the Link RPC, with a
/// partner in view); a plain Query of one, or a session for a plain query, is refused.
fn refuse_out_of_session(q: &QueryBody, side: Option<LinkSide<'_>>, t: &mut Trace) {
    match (&q.linkage, side) {
        (Some(_), None) => t.refuse(
            RefusalKind::LinkageNotPermitted,
            "linkage",
            "linkage",
            "a linked question is answered only in a linkage session the coordinator relays, not as a plain query",
        ),
        (None, Some(_)) => t.refuse(
            RefusalKind::LinkedQueryShape,
            "linkage",
            "linkage",
            "this query has no EXISTS clause, so there is nothing to link",
        ),
        _ => {}
    }
}

/// The query's group keys, aggregates and filter against the dataset's columns, the
/// project's approved columns, and the opt-out rule.
fn check_against_dataset(
    policy: &Policy,
    q: &QueryBody,
    d: &Dataset,
    project: Option<&Project>,
    t: &mut Trace,
) -> DatasetChecks {
    let ctx = DatasetCtx {
        d,
        path: format!("datasets.{}", d.name),
    };
    let group_by = check_group_keys(policy, q, &ctx, t);
    let aggregates = check_aggregates(q, &ctx, t);
    if let Some(filter) = &q.filter {
        check_filter(filter, &ctx, t);
    }
    if let Some(p) = project {
        check_project_columns(q, p, t);
    }
    let exclude_opted_out = check_opt_out(policy, q, d, t);
    DatasetChecks {
        group_by,
        aggregates,
        exclude_opted_out,
    }
}

/// The ledgers the spend is charged to: the requester's, then the project's.
fn ledger_charges(
    q: &QueryBody,
    requester: Option<&Requester>,
    project: Option<&Project>,
    delta: f64,
    now: DateTime<Utc>,
    t: &mut Trace,
) -> Vec<LedgerCharge> {
    let charge = |ledger: String, b: &Budget, t: &mut Trace, rule: String| {
        let c = LedgerCharge {
            ledger,
            period: b.period,
            period_label: period_label(b.period, now),
            total: b.epsilon,
            per_query_cap: b.per_query_cap,
            delta_total: b.delta,
        };
        t.allow(
            format!("budget {}", c.key()),
            rule,
            format!(
                "epsilon {} (delta {:e}) to be charged against {} (delta {:e}) per {}",
                q.epsilon,
                delta,
                b.epsilon,
                b.delta,
                b.period.as_str()
            ),
        );
        c
    };
    let mut charges = Vec::new();
    if let Some(r) = requester {
        charges.push(charge(
            format!("requester:{}", r.id),
            &r.budget,
            t,
            format!("requesters.{}.budget", r.id),
        ));
    }
    if let Some(p) = project {
        charges.push(charge(
            format!("project:{}", p.id),
            &p.budget,
            t,
            format!("projects.{}.budget", p.id),
        ));
    }
    charges
}

/// The release rules the answer will follow, for the explanation.
fn note_release_rules(policy: &Policy, t: &mut Trace) {
    let r = &policy.file().release;
    t.allow(
        "release",
        "release",
        format!(
            "mechanism {}, delta {:e}, suppress at or below {}, rounding {}, scope {}",
            snake(&r.mechanism),
            r.delta,
            r.min_reportable_count,
            snake(&r.rounding),
            snake(&r.scope)
        ),
    );
}

/// The limits an allowed query runs under.
fn limits(
    policy: &Policy,
    q: &QueryBody,
    d: &Dataset,
    checks: DatasetChecks,
    spend: Spend,
    charges: Vec<LedgerCharge>,
) -> Limits {
    let f = policy.file();
    let r = &f.release;
    Limits {
        policy_version: policy.version().to_string(),
        dataset: d.name.clone(),
        person_id: d.person_id.clone(),
        max_rows_per_person: d.max_rows_per_person,
        total_kind: d.total_kind,
        exclude_opted_out: checks.exclude_opted_out,
        group_by: checks.group_by,
        aggregates: checks.aggregates,
        epsilon: q.epsilon,
        mechanism: r.mechanism,
        delta: r.delta,
        spend,
        min_reportable_count: r.min_reportable_count,
        rounding: r.rounding,
        scope: r.scope,
        charges,
        registered_population: f.organisation.registered_population,
        link: None,
        secure: None,
    }
}

fn check_requester<'a>(policy: &'a Policy, q: &QueryBody, t: &mut Trace) -> Option<&'a Requester> {
    let id = &q.requester_id;
    let subject = format!("requester {id}");
    let Some(r) = policy.requester(id) else {
        t.refuse(
            RefusalKind::UnknownRequester,
            subject,
            "requesters",
            format!("requester {id:?} is not listed in this node's policy"),
        );
        return None;
    };
    if r.revoked {
        t.refuse(
            RefusalKind::RequesterRevoked,
            &subject,
            format!("requesters.{id}.revoked"),
            format!("requester {id:?} has been revoked"),
        );
    } else {
        t.allow(
            &subject,
            format!("requesters.{id}"),
            format!("listed ({}, {}), not revoked", r.role, r.organisation),
        );
    }
    let purpose = q.purpose.as_str();
    let rule = format!("requesters.{id}.purposes");
    if r.purposes.iter().any(|p| p == purpose) {
        t.allow(
            format!("purpose {purpose}"),
            rule,
            "permitted for this requester",
        );
    } else {
        t.refuse(
            RefusalKind::PurposeNotPermitted,
            format!("purpose {purpose}"),
            rule,
            format!(
                "requester {id:?} may query for {} only, not {purpose}",
                r.purposes.join(", ")
            ),
        );
    }
    Some(r)
}

fn check_dataset<'a>(
    policy: &'a Policy,
    q: &QueryBody,
    requester: Option<&Requester>,
    t: &mut Trace,
) -> Option<&'a Dataset> {
    let name = &q.dataset;
    let subject = format!("dataset {name}");
    let Some(d) = policy.dataset(name) else {
        let offered: Vec<&str> = policy
            .file()
            .datasets
            .iter()
            .map(|d| d.name.as_str())
            .collect();
        t.refuse(
            RefusalKind::UnknownDataset,
            subject,
            "datasets",
            format!(
                "dataset {name:?} is not offered by this node (offered: {})",
                if offered.is_empty() {
                    "none".to_string()
                } else {
                    offered.join(", ")
                }
            ),
        );
        return None;
    };
    if let Some(r) = requester {
        let rule = format!("requesters.{}.datasets", r.id);
        if r.datasets.iter().any(|x| x == name) {
            t.allow(&subject, rule, "permitted for this requester");
        } else {
            t.refuse(
                RefusalKind::DatasetNotPermitted,
                &subject,
                rule,
                format!(
                    "requester {:?} may not query dataset {name} (permitted: {})",
                    r.id,
                    if r.datasets.is_empty() {
                        "none".to_string()
                    } else {
                        r.datasets.join(", ")
                    }
                ),
            );
        }
    }
    Some(d)
}

/// A research query must name an approved project; any other purpose must not.
fn check_project<'a>(
    policy: &'a Policy,
    q: &QueryBody,
    requester: Option<&Requester>,
    now: DateTime<Utc>,
    t: &mut Trace,
) -> Option<&'a Project> {
    match (q.purpose, &q.project_id) {
        (Purpose::Research, None) => {
            t.refuse(
                RefusalKind::ProjectRequired,
                "project",
                "projects",
                "research queries must name an approved project",
            );
            None
        }
        (Purpose::Research, Some(id)) => check_research_project(policy, q, requester, id, now, t),
        (_, Some(id)) => {
            t.refuse(
                RefusalKind::ProjectOnlyForResearch,
                format!("project {id}"),
                "projects",
                format!(
                    "a project is named but the purpose is {}; projects apply to research only",
                    q.purpose
                ),
            );
            None
        }
        (_, None) => None,
    }
}

/// The named project: approved here, with this requester on it, not expired, and
/// approved for the dataset.
fn check_research_project<'a>(
    policy: &'a Policy,
    q: &QueryBody,
    requester: Option<&Requester>,
    id: &str,
    now: DateTime<Utc>,
    t: &mut Trace,
) -> Option<&'a Project> {
    let subject = format!("project {id}");
    let Some(p) = policy.project(id) else {
        t.refuse(
            RefusalKind::UnknownProject,
            subject,
            "projects",
            format!("project {id:?} is not approved at this node"),
        );
        return None;
    };
    let base = format!("projects.{id}");
    if requester.is_some() {
        check_project_member(q, p, &subject, &base, t);
    }
    check_project_expiry(p, now, &subject, &base, t);
    if policy.dataset(&q.dataset).is_some() {
        check_project_dataset(q, p, &subject, &base, t);
    }
    Some(p)
}

fn check_project_member(q: &QueryBody, p: &Project, subject: &str, base: &str, t: &mut Trace) {
    if p.requesters.contains(&q.requester_id) {
        t.allow(
            subject,
            format!("{base}.requesters"),
            "requester is on the project",
        );
    } else {
        t.refuse(
            RefusalKind::ProjectNotForRequester,
            subject,
            format!("{base}.requesters"),
            format!(
                "requester {:?} is not on project {} ({})",
                q.requester_id,
                p.id,
                p.requesters.join(", ")
            ),
        );
    }
}

fn check_project_expiry(p: &Project, now: DateTime<Utc>, subject: &str, base: &str, t: &mut Trace) {
    match crate::validate::expiry_date(&p.expires) {
        Some(expires) if expires >= now.date_naive() => t.allow(
            subject,
            format!("{base}.expires"),
            format!("approval {} valid until {expires}", p.approval_ref),
        ),
        _ => t.refuse(
            RefusalKind::ProjectExpired,
            subject,
            format!("{base}.expires"),
            format!("project {} approval expired on {}", p.id, p.expires),
        ),
    }
}

fn check_project_dataset(q: &QueryBody, p: &Project, subject: &str, base: &str, t: &mut Trace) {
    if p.datasets.contains(&q.dataset) {
        t.allow(
            subject,
            format!("{base}.datasets"),
            format!("dataset {} approved", q.dataset),
        );
    } else {
        t.refuse(
            RefusalKind::ProjectDatasetNotApproved,
            subject,
            format!("{base}.datasets"),
            format!(
                "project {} is not approved for dataset {} (approved: {})",
                p.id,
                q.dataset,
                p.datasets.join(", ")
            ),
        );
    }
}

fn check_project_columns(q: &QueryBody, p: &Project, t: &mut Trace) {
    for c in q.columns() {
        let rule = format!("projects.{}.columns", p.id);
        if p.columns.iter().any(|x| x == c) {
            t.allow(format!("column {c}"), rule, "approved for the project");
        } else {
            t.refuse(
                RefusalKind::ProjectColumnNotApproved,
                format!("column {c}"),
                rule,
                format!("project {} is not approved to use column {c}", p.id),
            );
        }
    }
}

fn check_group_keys(
    policy: &Policy,
    q: &QueryBody,
    ctx: &DatasetCtx<'_>,
    t: &mut Trace,
) -> Vec<GroupLimits> {
    let mut pending = Vec::new();
    for g in &q.group_by {
        let subject = format!("group key {}", g.label());
        let Some(c) = ctx.resolve(t, &subject, g.column()) else {
            continue;
        };
        if let Some(d) = group_domain(g, c, ctx, t, &subject) {
            pending.push((g, c, d));
        }
    }
    if pending.len() != q.group_by.len() {
        return Vec::new();
    }
    let max = policy.file().release.max_group_cells;
    let cells = pending
        .iter()
        .filter_map(|(_, _, d)| d.size())
        .fold(1.0_f64, |acc, n| acc * n);
    let thresholded = pending.iter().any(|(_, _, d)| d.size().is_none());
    let note = if thresholded {
        " (thresholded keys not counted: only keys passing DP thresholding are released)"
    } else {
        ""
    };
    if !q.group_by.is_empty() {
        if cells > max as f64 || !cells.is_finite() {
            t.refuse(
                RefusalKind::TooManyCells,
                "group cells",
                "release.max_group_cells",
                format!(
                    "the group keys make {cells} cells; this node releases at most {max} per query{note}"
                ),
            );
            return Vec::new();
        }
        t.allow(
            "group cells",
            "release.max_group_cells",
            format!("{cells} cells, at most {max}{note}"),
        );
    }
    pending
        .into_iter()
        .map(|(g, c, d)| GroupLimits {
            column: column_limits(c),
            label: g.label(),
            domain: d.build(),
        })
        .collect()
}

/// The domain of one group key: a groupable column, by its declared domain or
/// thresholded (a plain column key), or by declared bins (`bin(col, width)`).
fn group_domain(
    g: &GroupKey,
    c: &Column,
    ctx: &DatasetCtx<'_>,
    t: &mut Trace,
    subject: &str,
) -> Option<PendingDomain> {
    let name = &c.name;
    if c.group == Grouping::No {
        t.refuse(
            RefusalKind::NotGroupable,
            subject,
            ctx.col_rule(name, "group"),
            format!("column {name} may not be grouped by"),
        );
        return None;
    }
    match g {
        GroupKey::Column(_) => column_domain(c, ctx, t, subject),
        GroupKey::Bin { width, .. } => bin_domain(*width, c, ctx, t, subject),
    }
}

/// A plain column key: observed and thresholded, or the column's declared categories,
/// bins or integer values.
fn column_domain(
    c: &Column,
    ctx: &DatasetCtx<'_>,
    t: &mut Trace,
    subject: &str,
) -> Option<PendingDomain> {
    let name = &c.name;
    if c.group == Grouping::Threshold {
        t.allow(
            subject,
            ctx.col_rule(name, "group"),
            "observed keys, kept only if they pass DP thresholding",
        );
        return Some(PendingDomain::Thresholded);
    }
    let rule = ctx.col_rule(name, "group");
    let d = match domain::plain_group(c) {
        PlainGroup::Categories(v) => PendingDomain::Categories(v),
        PlainGroup::Bins(e) => PendingDomain::Bins(e),
        PlainGroup::IntegerValues { low, high } => PendingDomain::IntegerValues(low, high),
        PlainGroup::TooNarrow { min_bin_width } => {
            t.refuse(
                RefusalKind::BinTooNarrow,
                subject,
                ctx.col_rule(name, "min_bin_width"),
                format!(
                    "grouping by single values of {name} is narrower than its \
                     min_bin_width {min_bin_width}; use bin({name}, {min_bin_width}) or wider"
                ),
            );
            return None;
        }
        PlainGroup::NeedsBin | PlainGroup::Undeclared => {
            t.refuse(
                RefusalKind::NotGroupable,
                subject,
                rule,
                format!("{name} has no declared categories; group by bin({name}, width) instead"),
            );
            return None;
        }
    };
    t.allow(
        subject,
        rule,
        format!("declared domain of {} keys", d.size().unwrap_or(0.0)),
    );
    Some(d)
}

/// `bin(col, width)`: a numeric column with bounds, and a width no narrower than its
/// `min_bin_width`.
fn bin_domain(
    width: f64,
    c: &Column,
    ctx: &DatasetCtx<'_>,
    t: &mut Trace,
    subject: &str,
) -> Option<PendingDomain> {
    let name = &c.name;
    if !c.column_type.is_numeric() {
        t.refuse(
            RefusalKind::TypeMismatch,
            subject,
            ctx.col_rule(name, "type"),
            format!(
                "bin() needs an integer or real column; {name} is {}",
                c.column_type.as_str()
            ),
        );
        return None;
    }
    let min = c.min_bin_width.unwrap_or(0.0);
    if !(width.is_finite() && width > 0.0) || width < min {
        t.refuse(
            RefusalKind::BinTooNarrow,
            subject,
            ctx.col_rule(name, "min_bin_width"),
            format!(
                "bin width {width} for {name} is narrower than the minimum {}",
                c.min_bin_width
                    .map_or("(positive)".to_string(), |m| m.to_string())
            ),
        );
        return None;
    }
    let Some([lower, upper]) = c.bounds else {
        t.refuse(
            RefusalKind::NotGroupable,
            subject,
            ctx.col_rule(name, "bounds"),
            format!("{name} has no bounds, so bin({name}, width) has no declared bins"),
        );
        return None;
    };
    t.allow(
        subject,
        ctx.col_rule(name, "min_bin_width"),
        format!("width {width} at least {min}; bins over bounds [{lower}, {upper}]"),
    );
    Some(PendingDomain::BinWidth {
        lower,
        upper,
        width,
    })
}

fn check_aggregates(q: &QueryBody, ctx: &DatasetCtx<'_>, t: &mut Trace) -> Vec<AggregateLimits> {
    let mut out = Vec::new();
    if q.aggregates.is_empty() {
        t.refuse(
            RefusalKind::UnsupportedAggregate,
            "aggregates",
            "release",
            "the query asks for no aggregate; use COUNT(*), SUM(col) or AVG(col)",
        );
    }
    for a in &q.aggregates {
        let arg = a.column.as_deref().unwrap_or("*");
        let subject = format!("{}({arg}) AS {}", a.kind.name(), a.alias);
        match (a.kind, &a.column) {
            (AggregateKind::Count, None) => {
                t.allow(&subject, "release", "person-level count");
                out.push(AggregateLimits {
                    alias: a.alias.clone(),
                    kind: a.kind,
                    column: None,
                });
            }
            (AggregateKind::Count, Some(c)) => t.refuse(
                RefusalKind::UnsupportedAggregate,
                &subject,
                "release",
                format!("COUNT({c}) is not supported; use COUNT(*) with WHERE {c} IS NOT NULL"),
            ),
            (AggregateKind::Quantile(_), _) => t.refuse(
                RefusalKind::UnsupportedAggregate,
                &subject,
                "release",
                "QUANTILE is not supported yet; use COUNT(*) over bins instead",
            ),
            (AggregateKind::Sum | AggregateKind::Mean, None) => t.refuse(
                RefusalKind::UnsupportedAggregate,
                &subject,
                "release",
                format!("{} needs a column", a.kind.name()),
            ),
            (AggregateKind::Sum | AggregateKind::Mean, Some(name)) => {
                let Some(c) = ctx.resolve(t, &subject, name) else {
                    continue;
                };
                if !c.column_type.is_numeric() {
                    t.refuse(
                        RefusalKind::TypeMismatch,
                        &subject,
                        ctx.col_rule(name, "type"),
                        format!(
                            "{} needs an integer or real column; {name} is {}",
                            a.kind.name(),
                            c.column_type.as_str()
                        ),
                    );
                } else if !c.aggregate || c.bounds.is_none() {
                    t.refuse(
                        RefusalKind::NotAggregatable,
                        &subject,
                        ctx.col_rule(name, "aggregate"),
                        format!("column {name} may not be summed or averaged"),
                    );
                } else {
                    let limits = column_limits(c);
                    if let Some((lo, hi)) = limits.bounds {
                        t.allow(
                            &subject,
                            ctx.col_rule(name, "aggregate"),
                            format!("values clamped to [{lo}, {hi}]"),
                        );
                    }
                    out.push(AggregateLimits {
                        alias: a.alias.clone(),
                        kind: a.kind,
                        column: Some(limits),
                    });
                }
            }
        }
    }
    out
}

/// Leaves of a filter tree, without recursion (a hostile tree cannot exhaust the stack).
fn leaves(p: &Predicate) -> Vec<&Predicate> {
    let mut out = Vec::new();
    let mut stack = vec![p];
    while let Some(p) = stack.pop() {
        match p {
            Predicate::All(ps) | Predicate::Any(ps) => stack.extend(ps.iter().rev()),
            Predicate::Not(inner) => stack.push(inner),
            leaf => out.push(leaf),
        }
    }
    out
}

/// Every column the filter reads is filterable and compared with literals of its
/// type. (The engine derives what it needs from the query itself, so nothing is kept.)
fn check_filter(filter: &Predicate, ctx: &DatasetCtx<'_>, t: &mut Trace) {
    for leaf in leaves(filter) {
        let subject = format!("filter {leaf}");
        let (name, literals, ordered): (&str, Vec<&Literal>, bool) = match leaf {
            Predicate::Compare { column, op, value } => (
                column,
                vec![value],
                !matches!(op, CompareOp::Eq | CompareOp::Ne),
            ),
            Predicate::InList { column, values, .. } => (column, values.iter().collect(), false),
            Predicate::Between {
                column, low, high, ..
            } => (column, vec![low, high], true),
            Predicate::IsNull { column, .. } => (column, Vec::new(), false),
            Predicate::All(_) | Predicate::Any(_) | Predicate::Not(_) => continue,
        };
        let Some(c) = ctx.resolve(t, &subject, name) else {
            continue;
        };
        if !c.filter {
            t.refuse(
                RefusalKind::NotFilterable,
                &subject,
                ctx.col_rule(name, "filter"),
                format!("column {name} may not be filtered on"),
            );
            continue;
        }
        let mut ok = true;
        if ordered && c.column_type == ColumnType::Boolean {
            ok = false;
            t.refuse(
                RefusalKind::TypeMismatch,
                &subject,
                ctx.col_rule(name, "type"),
                format!("{name} is boolean; compare it with = or <> only"),
            );
        }
        for lit in literals {
            if let Err(why) = literal_fits(c, lit) {
                ok = false;
                t.refuse(
                    RefusalKind::TypeMismatch,
                    &subject,
                    ctx.col_rule(name, "type"),
                    why,
                );
            }
        }
        if ok {
            t.allow(
                &subject,
                ctx.col_rule(name, "filter"),
                "filterable, types match",
            );
        }
    }
}

fn literal_fits(c: &Column, lit: &Literal) -> Result<(), String> {
    let fits = match (c.column_type, lit) {
        (ColumnType::Integer | ColumnType::Real, Literal::Integer(_) | Literal::Real(_))
        | (ColumnType::Text, Literal::Text(_))
        | (ColumnType::Boolean, Literal::Boolean(_)) => true,
        (ColumnType::Date, Literal::Text(s)) => {
            if chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok() {
                true
            } else {
                return Err(format!(
                    "{} is a date; write dates as 'YYYY-MM-DD', not {lit}",
                    c.name
                ));
            }
        }
        _ => false,
    };
    if fits {
        Ok(())
    } else {
        let what = match lit {
            Literal::Boolean(_) => "a boolean",
            Literal::Integer(_) => "an integer",
            Literal::Real(_) => "a number",
            Literal::Text(_) => "a text",
        };
        Err(format!(
            "{} is {}, but {lit} is {what}",
            c.name,
            c.column_type.as_str()
        ))
    }
}

fn check_opt_out(policy: &Policy, q: &QueryBody, d: &Dataset, t: &mut Trace) -> Option<String> {
    let purpose = q.purpose.as_str();
    let subject = "national data opt-out";
    match &policy.file().opt_out {
        Some(o) if o.purposes.iter().any(|p| p == purpose) => {
            if d.opt_out_not_applicable {
                t.allow(
                    subject,
                    format!("datasets.{}.opt_out_not_applicable", d.name),
                    "dataset cannot hold opted-out patients; nothing to exclude",
                );
                None
            } else if d.columns.iter().any(|c| c.name == o.column) {
                t.allow(
                    subject,
                    "opt_out.purposes",
                    format!("rows with {} = true excluded for {purpose}", o.column),
                );
                Some(o.column.clone())
            } else {
                t.refuse(
                    RefusalKind::OptOutMissing,
                    subject,
                    "opt_out.column",
                    format!(
                        "the opt-out applies to {purpose} but dataset {} has no column {}",
                        d.name, o.column
                    ),
                );
                None
            }
        }
        Some(_) => {
            t.allow(
                subject,
                "opt_out.purposes",
                format!("the opt-out does not apply to {purpose}"),
            );
            None
        }
        None if q.purpose != Purpose::DirectCare && !d.opt_out_not_applicable => {
            t.refuse(
                RefusalKind::OptOutMissing,
                subject,
                "opt_out",
                format!(
                    "the policy has no [opt_out] section and dataset {} is not marked \
                     opt_out_not_applicable, so {purpose} queries cannot honour the National \
                     Data Opt-out",
                    d.name
                ),
            );
            None
        }
        None => {
            t.allow(
                subject,
                "opt_out",
                format!("no opt-out exclusion for {purpose}"),
            );
            None
        }
    }
}

/// What the query will spend (`accounting::plan`), planned here so the ledger can
/// be charged before anything runs; refuses a thresholded query whose key-selection
/// share is below the policy's minimum.
fn plan_spend(
    policy: &Policy,
    q: &QueryBody,
    aggregates: &[AggregateLimits],
    thresholded: bool,
    t: &mut Trace,
) -> Spend {
    let r = &policy.file().release;
    let e = q.epsilon;
    // Shares go to measurements, not aggregates (`measures`): figures formed from
    // the same noisy vector are post-processing of it.
    let plan = crate::measures::measures(aggregates);
    if !plan.is_empty() && e.is_finite() && e > 0.0 {
        t.allow(
            format!("epsilon {e}"),
            "release",
            format!(
                "split evenly over {} noisy measurement{}{}: {}; every figure asked for is \
                 formed from these, so figures that share one pay for it once",
                plan.len(),
                if plan.len() == 1 { "" } else { "s" },
                if thresholded {
                    " and key selection"
                } else {
                    ""
                },
                plan.describe()
            ),
        );
    }
    let planned = accounting::plan(r.mechanism, e, plan.len(), thresholded, r.delta);
    let (threshold_epsilon, shares) = (planned.key_selection, planned.shares);
    if thresholded && e.is_finite() && e > 0.0 {
        let subject = format!("epsilon {e}");
        if threshold_epsilon < r.min_threshold_epsilon {
            t.refuse(
                RefusalKind::ThresholdEpsilonTooSmall,
                &subject,
                "release.min_threshold_epsilon",
                format!(
                    "a thresholded group key needs at least {} epsilon for key selection; this \
                     query gives it {threshold_epsilon} ({e} split over {shares} shares): ask \
                     for at least {} epsilon, or group by a column with a declared domain",
                    r.min_threshold_epsilon,
                    r.min_threshold_epsilon * shares as f64
                ),
            );
        } else {
            t.allow(
                &subject,
                "release.min_threshold_epsilon",
                format!(
                    "key selection gets {threshold_epsilon} epsilon, at least {}",
                    r.min_threshold_epsilon
                ),
            );
        }
    }
    planned.spend
}

fn check_epsilon(
    policy: &Policy,
    q: &QueryBody,
    requester: Option<&Requester>,
    project: Option<&Project>,
    t: &mut Trace,
) {
    let e = q.epsilon;
    let subject = format!("epsilon {e}");
    if !(e.is_finite() && e > 0.0) {
        t.refuse(
            RefusalKind::EpsilonInvalid,
            subject,
            "release.per_query_epsilon_cap",
            format!("epsilon must be a positive finite number, got {e}"),
        );
        return;
    }
    let mut caps = vec![(
        "release.per_query_epsilon_cap".to_string(),
        policy.file().release.per_query_epsilon_cap,
        "this node's per-query cap".to_string(),
    )];
    if let Some(r) = requester {
        caps.push((
            format!("requesters.{}.budget.per_query_cap", r.id),
            r.budget.per_query_cap,
            format!("requester {}'s per-query cap", r.id),
        ));
    }
    if let Some(p) = project {
        caps.push((
            format!("projects.{}.budget.per_query_cap", p.id),
            p.budget.per_query_cap,
            format!("project {}'s per-query cap", p.id),
        ));
    }
    for (rule, cap, what) in caps {
        if e > cap {
            t.refuse(
                RefusalKind::EpsilonOverCap,
                &subject,
                rule,
                format!("epsilon {e} is over {what} of {cap}"),
            );
        } else {
            t.allow(&subject, rule, format!("within {what} of {cap}"));
        }
    }
}
