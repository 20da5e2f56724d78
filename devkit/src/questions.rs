//! The demo's reference questions: what the DSU and the researcher ask, in the SQL the
//! analyst types. `phm synth` computes their exact answers into reference_answers.json
//! and `phm demo` submits them and checks the noisy answers against those.
//!
//! [`LINKED`] holds the linked questions (linkage on NHS number between two partners'
//! datasets). Their exact answers are in reference_answers.json too, but they are kept
//! out of [`ALL`] until the demo asks them: the SQL form with `EXISTS` is not parsed yet
//! and no node serves a linked query today.

use phm_proto::Purpose;

/// Research project every GP practice in the synthetic ICS has approved.
pub const RESEARCH_PROJECT: &str = "RP-2026-014";

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Question {
    /// Stable id, the key in reference_answers.json.
    pub id: &'static str,
    pub title: &'static str,
    /// Key file stem under DIR/keys (the requester id).
    pub requester: &'static str,
    pub purpose: Purpose,
    pub project: Option<&'static str>,
    pub sql: &'static str,
    pub epsilon: f64,
    /// The demo expects a node's policy to refuse this one.
    pub expect_refusal: bool,
}

pub const DIABETES_BY_IMD_AGE: Question = Question {
    id: "diabetes_by_imd_age",
    title: "People on the diabetes register, by IMD quintile and age band",
    requester: "dsu",
    purpose: Purpose::Planning,
    project: None,
    sql: "SELECT imd_quintile, bin(age, 20), COUNT(*) AS diabetics FROM gp_patients \
          WHERE diabetes = TRUE GROUP BY imd_quintile, bin(age, 20)",
    epsilon: 0.5,
    expect_refusal: false,
};

pub const POPULATION_BY_IMD_AGE: Question = Question {
    id: "population_by_imd_age",
    title: "Registered population, by IMD quintile and age band",
    requester: "dsu",
    purpose: Purpose::Planning,
    project: None,
    sql: "SELECT imd_quintile, bin(age, 20), COUNT(*) AS people FROM gp_patients \
          GROUP BY imd_quintile, bin(age, 20)",
    epsilon: 0.5,
    expect_refusal: false,
};

pub const HYPERTENSION_BY_ETHNICITY: Question = Question {
    id: "hypertension_by_ethnicity",
    title: "People on the hypertension register, by ethnic group",
    requester: "dsu",
    purpose: Purpose::Planning,
    project: None,
    sql: "SELECT ethnicity, COUNT(*) AS hypertensive FROM gp_patients \
          WHERE hypertension = TRUE GROUP BY ethnicity",
    epsilon: 0.5,
    expect_refusal: false,
};

pub const POPULATION_BY_ETHNICITY: Question = Question {
    id: "population_by_ethnicity",
    title: "Registered population, by ethnic group",
    requester: "dsu",
    purpose: Purpose::Planning,
    project: None,
    sql: "SELECT ethnicity, COUNT(*) AS people FROM gp_patients GROUP BY ethnicity",
    epsilon: 0.5,
    expect_refusal: false,
};

pub const EMERGENCY_ADMISSIONS_BY_PLACE: Question = Question {
    id: "emergency_admissions_by_place",
    title: "Emergency admissions in the last 12 months, by Place of residence",
    requester: "dsu",
    purpose: Purpose::Planning,
    project: None,
    sql: "SELECT place, COUNT(*) AS admissions FROM acute_admissions \
          WHERE method = 'emergency' GROUP BY place",
    epsilon: 0.5,
    expect_refusal: false,
};

pub const RESEARCH_HBA1C_BY_IMD: Question = Question {
    id: "research_hba1c_by_imd",
    title: "Mean HbA1c (mmol/mol) among people with diabetes, by IMD quintile (research, RP-2026-014)",
    requester: "researcher",
    purpose: Purpose::Research,
    project: Some(RESEARCH_PROJECT),
    sql: "SELECT imd_quintile, COUNT(*) AS diabetics, AVG(hba1c) AS mean_hba1c \
          FROM gp_patients WHERE diabetes = TRUE GROUP BY imd_quintile",
    epsilon: 1.0,
    expect_refusal: false,
};

pub const FUEL_POVERTY_BY_TENURE: Question = Question {
    id: "fuel_poverty_by_tenure",
    title: "Residents in fuel poverty, by housing tenure",
    requester: "dsu",
    purpose: Purpose::Planning,
    project: None,
    sql: "SELECT housing_tenure, COUNT(*) AS residents FROM la_residents \
          WHERE fuel_poverty = TRUE GROUP BY housing_tenure",
    epsilon: 0.5,
    expect_refusal: true,
};

/// Every question, in the order the demo asks them.
pub const ALL: [Question; 7] = [
    DIABETES_BY_IMD_AGE,
    POPULATION_BY_IMD_AGE,
    HYPERTENSION_BY_ETHNICITY,
    POPULATION_BY_ETHNICITY,
    EMERGENCY_ADMISSIONS_BY_PLACE,
    RESEARCH_HBA1C_BY_IMD,
    FUEL_POVERTY_BY_TENURE,
];

/// Emergency admissions in the year that make a frequent attender (the `HAVING COUNT(*)`
/// threshold of [`LINKED_SOCIAL_CARE_FREQUENT_ATTENDERS`]).
pub const FREQUENT_ATTENDER_ADMISSIONS: u32 = 3;

/// GP x acute: each practice (anchor) links its diabetic patients with the trusts'
/// emergency admissions (partner) on the NHS number; `person` is each side's link key.
pub const LINKED_GP_EMERGENCY_BY_IMD: Question = Question {
    id: "linked_diabetes_emergency_by_imd",
    title: "People with diabetes who had an emergency admission in the last 12 months, by IMD \
            quintile (GP x acute, linked on NHS number)",
    requester: "dsu",
    purpose: Purpose::Planning,
    project: None,
    sql: "SELECT imd_quintile, COUNT(*) AS patients FROM gp_patients g \
          WHERE g.diabetes = TRUE AND EXISTS (SELECT 1 FROM acute_admissions a \
          WHERE a.person = g.person AND a.method = 'emergency') GROUP BY imd_quintile",
    epsilon: 1.0,
    expect_refusal: false,
};

/// Social care x acute: the social-care node (anchor) links its clients with the trusts'
/// emergency admissions (partner), counting clients with at least
/// [`FREQUENT_ATTENDER_ADMISSIONS`] of them. A linkage set holds people, so a client with
/// two packages counts once.
pub const LINKED_SOCIAL_CARE_FREQUENT_ATTENDERS: Question = Question {
    id: "linked_social_care_frequent_attenders",
    title: "Social-care clients with 3 or more emergency admissions in the last 12 months \
            (social care x acute, linked on NHS number)",
    requester: "dsu",
    purpose: Purpose::Planning,
    project: None,
    sql: "SELECT COUNT(*) AS clients FROM social_care_packages s \
          WHERE EXISTS (SELECT 1 FROM acute_admissions a \
          WHERE a.person = s.person AND a.method = 'emergency' \
          GROUP BY a.person HAVING COUNT(*) >= 3)",
    epsilon: 1.0,
    expect_refusal: false,
};

/// The linked questions the demo asks (and `phm synth` answers exactly).
pub const LINKED: [Question; 2] = [
    LINKED_GP_EMERGENCY_BY_IMD,
    LINKED_SOCIAL_CARE_FREQUENT_ATTENDERS,
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_frequent_attender_sql_uses_the_threshold_the_reference_uses() {
        let having = format!("HAVING COUNT(*) >= {FREQUENT_ATTENDER_ADMISSIONS})");
        assert!(LINKED_SOCIAL_CARE_FREQUENT_ATTENDERS.sql.ends_with(&having));
        assert!(
            LINKED_SOCIAL_CARE_FREQUENT_ATTENDERS
                .title
                .contains(&format!("{FREQUENT_ATTENDER_ADMISSIONS} or more"))
        );
    }

    #[test]
    fn ids_are_unique_across_all_questions() {
        let mut ids: Vec<&str> = ALL.iter().chain(LINKED.iter()).map(|q| q.id).collect();
        let n = ids.len();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), n);
    }
}
