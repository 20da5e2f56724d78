//! Exact answers to the demo's reference questions, computed from the generated records
//! before any noise, as the nodes would compute them (opted-out people excluded for
//! planning and research, every declared group present, zeros included).

use super::activity::Admission;
use super::ics::PLACES;
use super::people::{DIABETES, ETHNICITIES, HYPERTENSION, Person};
use crate::questions::{self, Question};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

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
    pub rows: Vec<ReferenceRow>,
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
    people: &[Person],
    gp_people: &[std::ops::Range<usize>],
    admissions: &[Admission],
) -> ReferenceAnswers {
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
        if a.method == 0 && !p.opted_out {
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

    ReferenceAnswers {
        seed,
        population,
        as_of: as_of.to_string(),
        note: "Exact figures from the generated records, before any noise, with National Data \
               Opt-out patients excluded (every reference question is for planning or research). \
               GP figures cover only the practices included in this output."
            .into(),
        questions: out,
    }
}
