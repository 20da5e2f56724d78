//! The linkage rules of a policy: may this node take its side of a linked question
//! (`[NOT] EXISTS (SELECT 1 FROM other a WHERE a.person = g.person ...)`), with whom, on
//! which datasets, and under what limits. Each node decides only its own side: the
//! anchor checks the outer query against its dataset, the partner checks the EXISTS
//! clause (its [`partner_view`]) against its own. Default deny: without a `[linkage]`
//! block, a `[[linkage.partners]]` entry naming the other organisation, both datasets
//! and this role, the purpose and the requester's (or project's) `linked_queries`, the
//! answer is no.

use crate::Policy;
use crate::decision::{GroupDomain, GroupLimits, LinkLimits, RefusalKind};
use crate::model::{Dataset, LinkPartner, LinkRole, Project, Requester};
use phm_proto::query::Linkage;
use phm_proto::{Aggregate, AggregateKind, Purpose, QueryBody};

/// Which side of a linked question is being decided, and with whom (`None` when
/// explaining a policy with no session in view: any listed organisation will do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkSide<'a> {
    Anchor { partner: Option<&'a str> },
    Partner { anchor: Option<&'a str> },
}

impl LinkSide<'_> {
    pub fn role(&self) -> LinkRole {
        match self {
            LinkSide::Anchor { .. } => LinkRole::Anchor,
            LinkSide::Partner { .. } => LinkRole::Partner,
        }
    }

    fn peer(&self) -> Option<&str> {
        match self {
            LinkSide::Anchor { partner } => *partner,
            LinkSide::Partner { anchor } => *anchor,
        }
    }
}

/// The partner's side of a linked query as a query of its own: its dataset, its
/// filter, one count and no group keys. The partner's policy checks this exactly as it
/// would a plain query (requester, dataset, filterable columns, project, opt-out,
/// epsilon), and the partner's engine builds its set from it.
pub fn partner_view(q: &QueryBody, l: &Linkage) -> QueryBody {
    QueryBody {
        dataset: l.partner_dataset.clone(),
        filter: l.partner_filter.clone(),
        group_by: Vec::new(),
        aggregates: vec![Aggregate {
            alias: "people".into(),
            kind: AggregateKind::Count,
            column: None,
        }],
        ..q.clone()
    }
}

/// One refusal or allowance, as the evaluation's trace records it.
pub(crate) enum Note {
    Allow {
        subject: String,
        rule: String,
        detail: String,
    },
    Refuse {
        kind: RefusalKind,
        subject: String,
        rule: String,
        message: String,
    },
}

fn allow(subject: impl Into<String>, rule: impl Into<String>, detail: impl Into<String>) -> Note {
    Note::Allow {
        subject: subject.into(),
        rule: rule.into(),
        detail: detail.into(),
    }
}

fn refuse(
    kind: RefusalKind,
    subject: impl Into<String>,
    rule: impl Into<String>,
    message: impl Into<String>,
) -> Note {
    Note::Refuse {
        kind,
        subject: subject.into(),
        rule: rule.into(),
        message: message.into(),
    }
}

/// What the checks need to know about the query as this side sees it.
pub(crate) struct LinkCheck<'a> {
    pub policy: &'a Policy,
    /// The query as signed (the anchor's view).
    pub query: &'a QueryBody,
    pub linkage: &'a Linkage,
    pub side: LinkSide<'a>,
    /// This node's dataset for its side, when it has it.
    pub dataset: Option<&'a Dataset>,
    pub requester: Option<&'a Requester>,
    pub project: Option<&'a Project>,
    /// The anchor's group keys, as decided.
    pub group_by: &'a [GroupLimits],
}

/// Every linkage rule for this side. Returns the notes in explanation order and, when
/// nothing was refused, the limits of the session.
pub(crate) fn check(c: &LinkCheck<'_>) -> (Vec<Note>, Option<LinkLimits>) {
    let mut notes = Vec::new();
    let role = c.side.role();
    let (ours, theirs) = match role {
        LinkRole::Anchor => (&c.query.dataset, &c.linkage.partner_dataset),
        LinkRole::Partner => (&c.linkage.partner_dataset, &c.query.dataset),
    };
    let Some(block) = &c.policy.file().linkage else {
        notes.push(refuse(
            RefusalKind::LinkageNotPermitted,
            "linkage",
            "linkage",
            "this node's policy has no [linkage] block, so it takes part in no linked question",
        ));
        return (notes, None);
    };
    notes.push(allow(
        "linkage",
        "linkage",
        format!(
            "this node links as {} of {ours} with {theirs}",
            role.as_str()
        ),
    ));
    let link_key = c.dataset.and_then(|d| link_key(d, &mut notes));
    purpose(c, &block.purposes, &mut notes);
    requester_permits(c, &mut notes);
    let entry = partner_entry(c, &block.partners, ours, theirs, &mut notes);
    if role == LinkRole::Anchor {
        anchor_shape(c, &mut notes);
    }
    let refused = notes.iter().any(|n| matches!(n, Note::Refuse { .. }));
    let limits = match (refused, link_key) {
        (false, Some(link_key)) => Some(LinkLimits {
            role,
            peer: c.side.peer().map(str::to_string),
            peer_node_key: entry.and_then(|e| e.node_key.clone()),
            link_key,
            max_set_size: block.max_set_size,
            negated: c.linkage.negated,
            min_partner_rows: c.linkage.min_partner_rows.max(1),
            delta_link: c.policy.file().release.delta / 2.0,
            delta_size: c.policy.file().release.delta / 2.0,
        }),
        _ => None,
    };
    (notes, limits)
}

fn link_key(d: &Dataset, notes: &mut Vec<Note>) -> Option<String> {
    let rule = format!("datasets.{}.link_key", d.name);
    match &d.link_key {
        Some(k) => {
            notes.push(allow(
                format!("dataset {}", d.name),
                rule,
                format!("links on column {k} (matched as blinded points, never released)"),
            ));
            Some(k.clone())
        }
        None => {
            notes.push(refuse(
                RefusalKind::LinkageNotPermitted,
                format!("dataset {}", d.name),
                rule,
                format!(
                    "dataset {} declares no link_key, so it cannot be linked",
                    d.name
                ),
            ));
            None
        }
    }
}

fn purpose(c: &LinkCheck<'_>, purposes: &[String], notes: &mut Vec<Note>) {
    let p = c.query.purpose.as_str();
    if purposes.iter().any(|x| x == p) {
        notes.push(allow(
            format!("purpose {p}"),
            "linkage.purposes",
            "linked questions may serve it",
        ));
    } else {
        notes.push(refuse(
            RefusalKind::LinkageNotPermitted,
            format!("purpose {p}"),
            "linkage.purposes",
            format!(
                "this node links only for {}, not {p}",
                if purposes.is_empty() {
                    "no purpose".to_string()
                } else {
                    purposes.join(", ")
                }
            ),
        ));
    }
}

/// The requester must have `linked_queries`, and for research so must the project.
fn requester_permits(c: &LinkCheck<'_>, notes: &mut Vec<Note>) {
    if let Some(r) = c.requester {
        let rule = format!("requesters.{}.linked_queries", r.id);
        if r.linked_queries {
            notes.push(allow(
                format!("requester {}", r.id),
                rule,
                "may ask linked questions",
            ));
        } else {
            notes.push(refuse(
                RefusalKind::LinkageNotPermitted,
                format!("requester {}", r.id),
                rule,
                format!(
                    "requester {:?} may not ask linked questions (linked_queries is not set)",
                    r.id
                ),
            ));
        }
    }
    if c.query.purpose == Purpose::Research
        && let Some(p) = c.project
    {
        let rule = format!("projects.{}.linked_queries", p.id);
        if p.linked_queries {
            notes.push(allow(
                format!("project {}", p.id),
                rule,
                "linked questions are approved for this project",
            ));
        } else {
            notes.push(refuse(
                RefusalKind::LinkageNotPermitted,
                format!("project {}", p.id),
                rule,
                format!(
                    "project {} is not approved for linked questions (linked_queries is not set)",
                    p.id
                ),
            ));
        }
    }
}

/// Does an entry allow linking `ours` with `theirs` in this role, with the peer in
/// view (or, when explaining, with anyone)?
fn entry_allows(e: &LinkPartner, role: LinkRole, ours: &str, theirs: &str) -> Result<(), String> {
    if !e.roles.contains(&role) {
        return Err(format!(
            "{} is listed, but not for this node to be the {}",
            e.ods_code,
            role.as_str()
        ));
    }
    if !e.our_datasets.iter().any(|d| d == ours) {
        return Err(format!(
            "{} is listed, but not for our dataset {ours} (listed: {})",
            e.ods_code,
            e.our_datasets.join(", ")
        ));
    }
    if !e.their_datasets.iter().any(|d| d == theirs) {
        return Err(format!(
            "{} is listed, but not for their dataset {theirs} (listed: {})",
            e.ods_code,
            e.their_datasets.join(", ")
        ));
    }
    Ok(())
}

fn partner_entry<'a>(
    c: &LinkCheck<'_>,
    entries: &'a [LinkPartner],
    ours: &str,
    theirs: &str,
    notes: &mut Vec<Note>,
) -> Option<&'a LinkPartner> {
    let role = c.side.role();
    match c.side.peer() {
        Some(peer) => {
            let Some((i, e)) = entries.iter().enumerate().find(|(_, e)| e.ods_code == peer) else {
                notes.push(refuse(
                    RefusalKind::LinkageNotPermitted,
                    format!("link with {peer}"),
                    "linkage.partners",
                    format!(
                        "{peer} is not listed among this node's linkage partners (listed: {})",
                        listed(entries)
                    ),
                ));
                return None;
            };
            let rule = format!("linkage.partners[{i}]");
            match entry_allows(e, role, ours, theirs) {
                Ok(()) => {
                    notes.push(allow(
                        format!("link with {peer}"),
                        rule,
                        format!("{ours} with their {theirs}, as {}", role.as_str()),
                    ));
                    Some(e)
                }
                Err(why) => {
                    notes.push(refuse(
                        RefusalKind::LinkageNotPermitted,
                        format!("link with {peer}"),
                        rule,
                        why,
                    ));
                    None
                }
            }
        }
        None => {
            let ok: Vec<&str> = entries
                .iter()
                .filter(|e| entry_allows(e, role, ours, theirs).is_ok())
                .map(|e| e.ods_code.as_str())
                .collect();
            if ok.is_empty() {
                notes.push(refuse(
                    RefusalKind::LinkageNotPermitted,
                    format!("link {ours} with {theirs}"),
                    "linkage.partners",
                    format!(
                        "no linkage partner entry lets this node be the {} of {ours} with {theirs} (listed: {})",
                        role.as_str(),
                        listed(entries)
                    ),
                ));
            } else {
                notes.push(allow(
                    format!("link {ours} with {theirs}"),
                    "linkage.partners",
                    format!("as {} with {}", role.as_str(), ok.join(", ")),
                ));
            }
            None
        }
    }
}

fn listed(entries: &[LinkPartner]) -> String {
    if entries.is_empty() {
        "none".into()
    } else {
        entries
            .iter()
            .map(|e| e.ods_code.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The outer query must count people over declared, person-level groups: the noise is
/// calibrated to one person changing one group's count by one.
fn anchor_shape(c: &LinkCheck<'_>, notes: &mut Vec<Note>) {
    let q = c.query;
    let counts_people = q
        .aggregates
        .iter()
        .all(|a| a.kind == AggregateKind::Count && a.column.is_none());
    if !counts_people || q.aggregates.len() != 1 {
        notes.push(refuse(
            RefusalKind::LinkedQueryShape,
            "aggregates",
            "linkage",
            "a linked question counts people: use exactly one COUNT(*)",
        ));
    }
    if c.group_by
        .iter()
        .any(|g| g.domain == GroupDomain::Thresholded)
    {
        notes.push(refuse(
            RefusalKind::LinkedQueryShape,
            "group keys",
            "linkage",
            "a linked question groups only by columns with a declared domain (both nodes must know every cell in advance)",
        ));
    }
    if let Some(d) = c.dataset
        && d.max_rows_per_person > 1
        && !q.group_by.is_empty()
    {
        notes.push(refuse(
            RefusalKind::LinkedQueryShape,
            "group keys",
            format!("datasets.{}.max_rows_per_person", d.name),
            format!(
                "dataset {} may hold {} rows per person, so its columns are not person-level labels; a linked question over it cannot be grouped",
                d.name, d.max_rows_per_person
            ),
        ));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::{Decision, decide, decide_linked, explain};
    use phm_proto::{CompareOp, GroupKey, Literal, Predicate};

    const GP: &str = include_str!("../samples/gp_practice.toml");
    const TRUST: &str = include_str!("../samples/acute_trust.toml");

    fn now() -> chrono::DateTime<chrono::Utc> {
        "2026-12-02T10:00:00Z".parse().unwrap()
    }

    fn gp() -> Policy {
        Policy::parse("gp.toml", GP).unwrap()
    }

    fn trust() -> Policy {
        Policy::parse("trust.toml", TRUST).unwrap()
    }

    /// Diabetic patients by IMD quintile who had an emergency admission.
    fn linked() -> QueryBody {
        QueryBody {
            federation_id: "ics".into(),
            query_id: "q-linked".into(),
            requester_id: "dsu".into(),
            purpose: Purpose::Planning,
            project_id: None,
            dataset: "gp_patients".into(),
            filter: Some(Predicate::Compare {
                column: "diabetes".into(),
                op: CompareOp::Eq,
                value: Literal::Boolean(true),
            }),
            group_by: vec![GroupKey::Column("imd_quintile".into())],
            aggregates: vec![Aggregate {
                alias: "patients".into(),
                kind: AggregateKind::Count,
                column: None,
            }],
            epsilon: 1.0,
            issued_at_unix_ms: 1,
            nonce: vec![1; 16],
            linkage: Some(Linkage {
                partner_dataset: "acute_admissions".into(),
                partner_filter: Some(Predicate::Compare {
                    column: "method".into(),
                    op: CompareOp::Eq,
                    value: Literal::Text("emergency".into()),
                }),
                negated: false,
                min_partner_rows: 1,
            }),
            aggregation: Default::default(),
        }
    }

    fn anchor(partner: &str) -> LinkSide<'_> {
        LinkSide::Anchor {
            partner: Some(partner),
        }
    }

    fn partner(anchor: &str) -> LinkSide<'_> {
        LinkSide::Partner {
            anchor: Some(anchor),
        }
    }

    fn kinds(d: Decision) -> Vec<RefusalKind> {
        match d {
            Decision::Allow(_) => vec![],
            Decision::Deny(r) => r.into_iter().map(|r| r.kind).collect(),
        }
    }

    fn messages(d: Decision) -> String {
        match d {
            Decision::Allow(_) => "allowed".into(),
            Decision::Deny(r) => r
                .into_iter()
                .map(|r| format!("{} [{}]", r.message, r.rule))
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }

    #[test]
    fn both_sides_allow_the_listed_pairing_with_their_own_limits() {
        let q = linked();
        let Decision::Allow(a) = decide_linked(&gp(), &q, anchor("RXF"), now()) else {
            panic!(
                "anchor: {}",
                messages(decide_linked(&gp(), &q, anchor("RXF"), now()))
            );
        };
        let link = a.link.as_ref().unwrap();
        assert_eq!(link.role, LinkRole::Anchor);
        assert_eq!(link.link_key, "nhs_number");
        assert_eq!(a.dataset, "gp_patients");
        assert_eq!(a.group_by.len(), 1);
        // The whole query's epsilon, and the policy's delta for the two clamped draws.
        assert_eq!(a.spend.epsilon, 1.0);
        assert!((link.delta_link + link.delta_size - 1e-9).abs() < 1e-21);
        let Decision::Allow(p) = decide_linked(&trust(), &q, partner("A81001"), now()) else {
            panic!(
                "partner: {}",
                messages(decide_linked(&trust(), &q, partner("A81001"), now()))
            );
        };
        // The partner decides the EXISTS clause as its own query: its dataset, no keys.
        assert_eq!(p.dataset, "acute_admissions");
        assert!(p.group_by.is_empty());
        assert_eq!(p.link.as_ref().unwrap().role, LinkRole::Partner);
        assert_eq!(p.charges[0].ledger, "requester:dsu");
    }

    #[test]
    fn a_linked_query_outside_a_session_and_a_session_without_linkage_are_refused() {
        assert_eq!(
            kinds(decide(&gp(), &linked(), now())),
            vec![RefusalKind::LinkageNotPermitted]
        );
        let mut plain = linked();
        plain.linkage = None;
        assert_eq!(
            kinds(decide_linked(&gp(), &plain, anchor("RXF"), now())),
            vec![RefusalKind::LinkedQueryShape]
        );
    }

    #[test]
    fn each_linkage_rule_refuses_with_its_rule_named() {
        let q = linked();
        // A partner not listed.
        let m = messages(decide_linked(&gp(), &q, anchor("RW9"), now()));
        assert!(
            m.contains("RW9 is not listed") && m.contains("[linkage.partners]"),
            "{m}"
        );
        // Listed, but not in this role.
        let m = messages(decide_linked(&gp(), &q, partner("RXF"), now()));
        assert!(m.contains("not for this node to be the partner"), "{m}");
        // A requester without linked_queries.
        let text = GP.replacen("linked_queries = true", "", 1);
        let p = Policy::parse("gp.toml", &text).unwrap();
        let m = messages(decide_linked(&p, &q, anchor("RXF"), now()));
        assert!(m.contains("requesters.dsu.linked_queries"), "{m}");
        // A purpose the [linkage] block does not list.
        let mut dc = q.clone();
        dc.purpose = Purpose::DirectCare;
        let m = messages(decide_linked(&gp(), &dc, anchor("RXF"), now()));
        assert!(m.contains("[linkage.purposes]"), "{m}");
        // No [linkage] block.
        let text = GP.split("\n[linkage]").next().unwrap();
        let p = Policy::parse("gp.toml", text).unwrap();
        assert_eq!(
            kinds(decide_linked(&p, &q, anchor("RXF"), now())),
            vec![RefusalKind::LinkageNotPermitted]
        );
        // A dataset without a link key.
        let text = GP.replacen("link_key = \"nhs_number\"", "", 1);
        let e = Policy::parse("gp.toml", &text).unwrap_err().to_string();
        assert!(e.contains("declares no link_key"), "{e}");
        // The partner filter on a column the trust does not allow filtering on.
        let mut f = q.clone();
        if let Some(l) = &mut f.linkage {
            l.partner_filter = Some(Predicate::Compare {
                column: "admission_id".into(),
                op: CompareOp::Eq,
                value: Literal::Text("x".into()),
            });
        }
        let k = kinds(decide_linked(&trust(), &f, partner("A81001"), now()));
        assert_eq!(k, vec![RefusalKind::IdentifierColumn], "{k:?}");
    }

    #[test]
    fn the_anchor_counts_people_over_declared_person_level_groups() {
        let mut q = linked();
        q.aggregates.push(Aggregate {
            alias: "bmi".into(),
            kind: AggregateKind::Mean,
            column: Some("bmi".into()),
        });
        let k = kinds(decide_linked(&gp(), &q, anchor("RXF"), now()));
        assert!(k.contains(&RefusalKind::LinkedQueryShape), "{k:?}");
    }

    #[test]
    fn explain_covers_the_side_the_policy_holds() {
        let lines = explain(&gp(), &linked(), now());
        let text: Vec<String> = lines
            .iter()
            .map(|l| format!("{} {}", l.rule, l.detail))
            .collect();
        assert!(
            text.iter()
                .any(|l| l.contains("links as anchor of gp_patients")),
            "{text:?}"
        );
        let lines = explain(&trust(), &linked(), now());
        assert!(
            lines
                .iter()
                .any(|l| l.allowed && l.detail.contains("as partner with A81001")),
            "{:?}",
            lines
        );
    }
}
