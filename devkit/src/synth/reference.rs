//! Exact answers to the demo's reference questions, computed from the generated records
//! before any noise, as the nodes would compute them (opted-out people excluded for
//! planning and research, every declared group present, zeros included).
//!
//! Linked questions are answered as linkage answers them: on the NHS number each
//! partner *wrote*, validated as the node validates it, so a record whose number is
//! missing or fails the check digit links with nothing; opted-out rows are dropped on
//! both sides first; each side is a set of people (de-duplicated on the number). Their
//! answers also carry the same question joined on `person_id`, which the synthetic
//! partners share but real ones do not: the truth about who is who, which the linked
//! answer falls short of by exactly the unlinkable records.

use super::Records;
use super::activity::EMERGENCY;
use super::ics::PLACES;
use super::nhs::{self, Holder};
use super::people::{DIABETES, ETHNICITIES, HYPERTENSION, Person};
use crate::questions::{self, Question};
use phm_link::NhsNumber;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceAnswers {
    pub seed: u64,
    pub population: usize,
    pub as_of: String,
    pub note: String,
    pub questions: Vec<ReferenceQuestion>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceQuestion {
    pub id: String,
    pub title: String,
    pub sql: String,
    pub dataset: String,
    pub group_columns: Vec<String>,
    /// The exact answer (for a linked question: linked on the NHS number only).
    pub rows: Vec<ReferenceRow>,
    /// Set for a linked question.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linked: Option<LinkedReference>,
}

/// What else is known exactly about a linked question.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinkedReference {
    /// The EXISTS dataset, held by the partner nodes.
    pub partner_dataset: String,
    /// The column both sides link on.
    pub link_key: String,
    /// The same question joined on `person_id` instead: every record links, the
    /// unlinkable ones included. An answer close to these rather than to `rows` would
    /// mean something linked on more than the NHS number.
    pub person_id_rows: Vec<ReferenceRow>,
    /// The sum over every (anchor node, partner node) pair of that pair's own linked
    /// answer, as separate two-party sessions would release it. It differs from `rows`
    /// where the partner dataset is spread over several nodes: a person admitted at both
    /// trusts is counted once per trust, and a HAVING threshold is met (or not) at each
    /// trust separately.
    pub pairwise_rows: Vec<ReferenceRow>,
    /// Records left out of the anchor's set: opted out, or no valid NHS number.
    pub anchor: LinkSide,
    /// The same for the partner's rows that pass the partner filter.
    pub partner: LinkSide,
}

/// How one side's records went into a linked question.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct LinkSide {
    /// Rows considered (after the side's own filter, before opt-outs).
    pub records: u64,
    pub opted_out: u64,
    /// Rows without a number.
    pub missing: u64,
    /// Rows whose number is present but not valid.
    pub invalid: u64,
    /// Distinct people in the side's set (valid numbers, de-duplicated).
    pub people: u64,
}

impl LinkSide {
    /// Count one row; its number if it goes into the set.
    fn note(&mut self, opted_out: bool, text: Option<&str>) -> Option<NhsNumber> {
        self.records += 1;
        if opted_out {
            self.opted_out += 1;
            return None;
        }
        match nhs::linkable(text) {
            Ok(n) => Some(n),
            Err(phm_link::Unlinkable::Missing) => {
                self.missing += 1;
                None
            }
            Err(_) => {
                self.invalid += 1;
                None
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferenceRow {
    /// Group key values in `group_columns` order, rendered as results render them.
    pub key: Vec<String>,
    pub values: BTreeMap<String, f64>,
}

impl ReferenceAnswers {
    pub fn question(&self, id: &str) -> Option<&ReferenceQuestion> {
        self.questions.iter().find(|q| q.id == id)
    }
}

const AGE_BIN: usize = 20;
/// Age bins of width 20 over the policies' age bounds [0, 110]: 0, 20, …, 100 (the last
/// bin is closed and holds everyone aged 100+).
const AGE_BINS: usize = 6;

fn age_bin(age: u8) -> usize {
    (age as usize / AGE_BIN).min(AGE_BINS - 1)
}

fn question(
    q: &Question,
    dataset: &str,
    group_columns: &[&str],
    rows: Vec<ReferenceRow>,
) -> ReferenceQuestion {
    ReferenceQuestion {
        id: q.id.to_string(),
        title: q.title.to_string(),
        sql: q.sql.to_string(),
        dataset: dataset.to_string(),
        group_columns: group_columns.iter().map(|s| s.to_string()).collect(),
        rows,
        linked: None,
    }
}

fn row(key: Vec<String>, values: &[(&str, f64)]) -> ReferenceRow {
    ReferenceRow {
        key,
        values: values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
    }
}

fn by_imd_age<'a>(
    q: &Question,
    alias: &str,
    people: impl Iterator<Item = &'a Person>,
) -> ReferenceQuestion {
    let mut counts = [[0u64; AGE_BINS]; 5];
    for p in people {
        counts[p.imd as usize - 1][age_bin(p.age)] += 1;
    }
    let mut rows = Vec::new();
    for (qi, bins) in counts.iter().enumerate() {
        for (b, n) in bins.iter().enumerate() {
            rows.push(row(
                vec![(qi + 1).to_string(), (b * AGE_BIN).to_string()],
                &[(alias, *n as f64)],
            ));
        }
    }
    question(q, "gp_patients", &["imd_quintile", "bin(age, 20)"], rows)
}

fn by_ethnicity<'a>(
    q: &Question,
    alias: &str,
    people: impl Iterator<Item = &'a Person>,
) -> ReferenceQuestion {
    let mut counts = [0u64; 6];
    for p in people {
        counts[p.ethnicity as usize] += 1;
    }
    let rows = ETHNICITIES
        .iter()
        .zip(counts)
        .map(|(e, n)| row(vec![e.to_string()], &[(alias, n as f64)]))
        .collect();
    question(q, "gp_patients", &["ethnicity"], rows)
}

/// Reference answers for the GP practices in `gp_people` (the included practices) and the
/// non-GP partners (everyone).
pub fn compute(
    seed: u64,
    population: usize,
    as_of: &str,
    records: &Records,
    gp_people: &[std::ops::Range<usize>],
) -> ReferenceAnswers {
    let (people, admissions) = (&records.people, &records.admissions);
    let registered = || {
        gp_people
            .iter()
            .flat_map(|r| people[r.clone()].iter())
            .filter(|p| !p.opted_out)
    };
    let mut out = vec![
        by_imd_age(
            &questions::DIABETES_BY_IMD_AGE,
            "diabetics",
            registered().filter(|p| p.has(DIABETES)),
        ),
        by_imd_age(&questions::POPULATION_BY_IMD_AGE, "people", registered()),
        by_ethnicity(
            &questions::HYPERTENSION_BY_ETHNICITY,
            "hypertensive",
            registered().filter(|p| p.has(HYPERTENSION)),
        ),
        by_ethnicity(&questions::POPULATION_BY_ETHNICITY, "people", registered()),
    ];

    let mut by_place = [0u64; 4];
    for a in admissions {
        let p = &people[a.person as usize];
        if a.method == EMERGENCY && !p.opted_out {
            by_place[p.place as usize] += 1;
        }
    }
    out.push(question(
        &questions::EMERGENCY_ADMISSIONS_BY_PLACE,
        "acute_admissions",
        &["place"],
        PLACES
            .iter()
            .zip(by_place)
            .map(|(pl, n)| row(vec![pl.to_string()], &[("admissions", n as f64)]))
            .collect(),
    ));

    let mut n = [0u64; 5];
    let mut sum = [0f64; 5];
    let mut with_value = [0u64; 5];
    for p in registered().filter(|p| p.has(DIABETES)) {
        let q = p.imd as usize - 1;
        n[q] += 1;
        if let Some(v) = p.hba1c {
            sum[q] += v.clamp(20.0, 150.0);
            with_value[q] += 1;
        }
    }
    out.push(question(
        &questions::RESEARCH_HBA1C_BY_IMD,
        "gp_patients",
        &["imd_quintile"],
        (0..5)
            .map(|q| {
                let mean = if with_value[q] > 0 {
                    sum[q] / with_value[q] as f64
                } else {
                    0.0
                };
                row(
                    vec![(q + 1).to_string()],
                    &[("diabetics", n[q] as f64), ("mean_hba1c", mean)],
                )
            })
            .collect(),
    ));

    out.push(gp_emergency_by_imd(records, gp_people));
    out.push(social_care_frequent_attenders(records));

    ReferenceAnswers {
        seed,
        population,
        as_of: as_of.to_string(),
        note: "Exact figures from the generated records, before any noise, with National Data \
               Opt-out patients excluded (every reference question is for planning or research). \
               GP figures cover only the practices included in this output. Linked questions \
               link on the NHS number each partner wrote, and only where it is present and \
               valid; `linked.person_id_rows` is the same question joined on person_id."
            .into(),
        questions: out,
    }
}

/// Valid NHS numbers of the non-opted-out emergency admissions, per trust, with how many
/// such rows each number has there; and the partner side's accounting.
fn emergency_numbers(records: &Records) -> (Vec<BTreeMap<NhsNumber, u32>>, LinkSide) {
    let trusts = records
        .admissions
        .iter()
        .map(|a| a.trust as usize + 1)
        .max()
        .unwrap_or(0);
    let mut per_trust = vec![BTreeMap::new(); trusts];
    let mut side = LinkSide::default();
    for a in records.admissions.iter().filter(|a| a.method == EMERGENCY) {
        let person = a.person as usize;
        let Some(p) = records.people.get(person) else {
            continue;
        };
        let text = records
            .nhs
            .written(Holder::Trust(a.trust as usize), person, &records.people);
        if let Some(n) = side.note(p.opted_out, text.as_deref())
            && let Some(rows) = per_trust.get_mut(a.trust as usize)
        {
            *rows.entry(n).or_insert(0) += 1;
        }
    }
    let all: BTreeSet<&NhsNumber> = per_trust.iter().flat_map(|m| m.keys()).collect();
    side.people = all.len() as u64;
    (per_trust, side)
}

/// Emergency admissions (rows, over both trusts) of each non-opted-out person, by
/// person index: the person_id join.
fn emergency_rows_by_person(records: &Records) -> BTreeMap<usize, u32> {
    let mut out = BTreeMap::new();
    for a in records.admissions.iter().filter(|a| a.method == EMERGENCY) {
        let person = a.person as usize;
        if records.people.get(person).is_some_and(|p| !p.opted_out) {
            *out.entry(person).or_insert(0) += 1;
        }
    }
    out
}

fn imd_rows(alias: &str, counts: [u64; 5]) -> Vec<ReferenceRow> {
    counts
        .iter()
        .enumerate()
        .map(|(q, n)| row(vec![(q + 1).to_string()], &[(alias, *n as f64)]))
        .collect()
}

/// GP x acute: people with diabetes who had at least one emergency admission, by the
/// GP's IMD quintile, summed over the included practices (each person is registered at
/// one practice, so the sum is of distinct people).
fn gp_emergency_by_imd(
    records: &Records,
    gp_people: &[std::ops::Range<usize>],
) -> ReferenceQuestion {
    const ALIAS: &str = "patients";
    let (per_trust, partner) = emergency_numbers(records);
    let admitted: BTreeSet<&NhsNumber> = per_trust.iter().flat_map(|m| m.keys()).collect();
    let by_person = emergency_rows_by_person(records);

    let mut anchor = LinkSide::default();
    let mut linked = [0u64; 5];
    let mut pairwise = [0u64; 5];
    let mut naive = [0u64; 5];
    let mut anchor_set = BTreeSet::new();
    for i in gp_people.iter().flat_map(|r| r.clone()) {
        let Some(p) = records.people.get(i) else {
            continue;
        };
        if !p.has(DIABETES) {
            continue;
        }
        let q = p.imd as usize - 1;
        if !p.opted_out && by_person.contains_key(&i) {
            naive[q] += 1;
        }
        let text = records.nhs.written(Holder::Gp, i, &records.people);
        let Some(n) = anchor.note(p.opted_out, text.as_deref()) else {
            continue;
        };
        // A number seen twice would be one person in the anchor's set; the test range
        // issues each number once, so this never merges anyone.
        if !anchor_set.insert(n) {
            continue;
        }
        if admitted.contains(&n) {
            linked[q] += 1;
        }
        pairwise[q] += per_trust.iter().filter(|m| m.contains_key(&n)).count() as u64;
    }
    anchor.people = anchor_set.len() as u64;

    let mut rq = question(
        &questions::LINKED_GP_EMERGENCY_BY_IMD,
        "gp_patients",
        &["imd_quintile"],
        imd_rows(ALIAS, linked),
    );
    rq.linked = Some(LinkedReference {
        partner_dataset: "acute_admissions".into(),
        link_key: super::governance::LINK_KEY.into(),
        person_id_rows: imd_rows(ALIAS, naive),
        pairwise_rows: imd_rows(ALIAS, pairwise),
        anchor,
        partner,
    });
    rq
}

/// Social care x acute: distinct social-care clients with at least
/// [`questions::FREQUENT_ATTENDER_ADMISSIONS`] emergency admissions.
fn social_care_frequent_attenders(records: &Records) -> ReferenceQuestion {
    const ALIAS: &str = "clients";
    let k = questions::FREQUENT_ATTENDER_ADMISSIONS;
    let (per_trust, partner) = emergency_numbers(records);
    // The federated partner dataset: rows per number over both trusts.
    let mut over_trusts: BTreeMap<&NhsNumber, u32> = BTreeMap::new();
    for m in &per_trust {
        for (n, rows) in m {
            *over_trusts.entry(n).or_insert(0) += rows;
        }
    }
    let by_person = emergency_rows_by_person(records);

    let mut anchor = LinkSide::default();
    let mut clients = BTreeSet::new();
    let mut naive = BTreeSet::new();
    for pkg in &records.packages {
        let i = pkg.person as usize;
        let Some(p) = records.people.get(i) else {
            continue;
        };
        if !p.opted_out && by_person.get(&i).is_some_and(|rows| *rows >= k) {
            naive.insert(i);
        }
        let text = records.nhs.written(Holder::SocialCare, i, &records.people);
        if let Some(n) = anchor.note(p.opted_out, text.as_deref()) {
            clients.insert(n);
        }
    }
    anchor.people = clients.len() as u64;
    let linked = clients
        .iter()
        .filter(|n| over_trusts.get(n).is_some_and(|rows| *rows >= k))
        .count();
    let pairwise: usize = per_trust
        .iter()
        .map(|m| {
            clients
                .iter()
                .filter(|n| m.get(n).is_some_and(|rows| *rows >= k))
                .count()
        })
        .sum();

    let one = |n: usize| vec![row(Vec::new(), &[(ALIAS, n as f64)])];
    let mut rq = question(
        &questions::LINKED_SOCIAL_CARE_FREQUENT_ATTENDERS,
        "social_care_packages",
        &[],
        one(linked),
    );
    rq.linked = Some(LinkedReference {
        partner_dataset: "acute_admissions".into(),
        link_key: super::governance::LINK_KEY.into(),
        person_id_rows: one(naive.len()),
        pairwise_rows: one(pairwise),
        anchor,
        partner,
    });
    rq
}
