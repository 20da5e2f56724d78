//! Synthetic people: demographics, GP registration, long-term conditions calibrated to
//! published English prevalence (QOF 2023/24), recent measurements and opt-out.

use super::ics::{Ics, POSTCODE_AREAS};
use super::rng::{Rng, bern, mix64, normal, pick, range, unit};

/// Ethnic groups (ONS 2021 high-level categories), in column-value spelling.
pub const ETHNICITIES: [&str; 6] = ["White", "Asian", "Black", "Mixed", "Other", "Unknown"];
/// Sex as GP systems record it: F, M, or U (indeterminate / not recorded).
pub const SEXES: [&str; 3] = ["F", "M", "U"];
pub const SMOKING: [&str; 4] = ["current", "ex", "never", "unknown"];

/// Ethnicity shares by Place (North, South, East, West); averaging to roughly England's
/// White 80%, Asian 9%, Black 4%, Mixed 3%, Other 2%, Unknown 2%.
const PLACE_ETHNICITY: [[f64; 6]; 4] = [
    [0.86, 0.06, 0.020, 0.025, 0.015, 0.020],
    [0.90, 0.04, 0.015, 0.020, 0.010, 0.015],
    [0.64, 0.18, 0.080, 0.045, 0.035, 0.020],
    [0.80, 0.08, 0.040, 0.035, 0.020, 0.025],
];

/// England population share by 5-year age band 0-4 … 85-89, 90+ (ONS mid-2022).
const AGE_BANDS: [f64; 19] = [
    5.4, 5.9, 6.1, 5.8, 6.1, 6.6, 6.9, 6.8, 6.5, 6.2, 6.8, 6.7, 5.9, 5.0, 4.8, 3.9, 2.6, 1.6, 0.9,
];

/// Condition bits.
pub const DIABETES: u16 = 1;
pub const HYPERTENSION: u16 = 1 << 1;
pub const CVD: u16 = 1 << 2;
pub const COPD: u16 = 1 << 3;
pub const ASTHMA: u16 = 1 << 4;
pub const DEPRESSION: u16 = 1 << 5;
pub const SMI: u16 = 1 << 6;
pub const OBESITY: u16 = 1 << 7;

/// One registered person.
#[derive(Debug, Clone)]
pub struct Person {
    /// Index into `Ics::practices`.
    pub practice: u16,
    pub place: u8,
    pub pcn: u16,
    pub lsoa: u32,
    pub age: u8,
    /// Index into [`SEXES`]: 0 F, 1 M, 2 U.
    pub sex: u8,
    /// Index into [`ETHNICITIES`].
    pub ethnicity: u8,
    pub imd: u8,
    pub opted_out: bool,
    pub conditions: u16,
    /// Index into [`SMOKING`].
    pub smoking: u8,
    pub bmi: Option<f64>,
    pub hba1c: Option<f64>,
    pub systolic_bp: Option<f64>,
    /// The NHS number issued to this person (ten digits, from the test range). What
    /// each partner wrote down for it is in [`super::nhs::NhsRecords`].
    pub nhs_number: u64,
    /// Days before the reference date that the last birthday fell (0-364).
    pub birthday_offset: u16,
    /// Postcode inward code "9XX" packed as (digit, letter, letter).
    pub postcode_unit: [u8; 3],
}

impl Person {
    pub fn has(&self, c: u16) -> bool {
        self.conditions & c != 0
    }
}

/// Stable pseudonymous id shared by every organisation that holds the person.
pub fn person_id(seed: u64, index: usize) -> String {
    format!("{:016x}", mix64(mix64(seed) ^ index as u64))
}

pub fn postcode(ics: &Ics, p: &Person) -> String {
    let lsoa = &ics.lsoas[p.lsoa as usize];
    format!(
        "{}{} {}{}{}",
        POSTCODE_AREAS[lsoa.place],
        lsoa.district,
        p.postcode_unit[0] as char,
        p.postcode_unit[1] as char,
        p.postcode_unit[2] as char
    )
}

/// Age-band weights of a practice whose list is tilted younger (tilt > 0) or older.
fn age_weights(tilt: f64) -> [f64; 19] {
    let mut w = [0.0; 19];
    for (i, slot) in w.iter_mut().enumerate() {
        let mid = i as f64 * 5.0 + 2.5;
        *slot = AGE_BANDS[i] * (tilt * (40.0 - mid) / 40.0).exp();
    }
    w
}

fn draw_age(rng: &mut Rng, weights: &[f64; 19]) -> u8 {
    let band = pick(rng, weights);
    if band == 18 {
        // 90+: geometric tail to 104.
        let mut age = 90u8;
        while age < 104 && bern(rng, 0.78) {
            age += 1;
        }
        age
    } else {
        (band * 5) as u8 + range(rng, 0, 5) as u8
    }
}

fn draw_ethnicity(rng: &mut Rng, place: usize, age: u8) -> u8 {
    let mut w = PLACE_ETHNICITY[place];
    // Minority ethnic populations are younger than the White British population.
    if age >= 65 {
        for slot in w.iter_mut().skip(1).take(4) {
            *slot *= 0.5;
        }
    }
    pick(rng, &w) as u8
}

const POSTCODE_LETTERS: &[u8] = b"ABDEFGHJLNPQRSTUWXYZ";

/// More people than the NHS-number test range has numbers for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "population must be at most {max} people (got {got}): each needs an NHS number of its own from the test range 999 000 0000 – 999 999 9999"
)]
pub struct TooManyPeople {
    pub max: usize,
    pub got: usize,
}

/// Generate every registered person, practice by practice.
pub fn generate(
    rng: &mut Rng,
    ics: &Ics,
    on_progress: &mut dyn FnMut(u64),
) -> Result<Vec<Person>, TooManyPeople> {
    let total: usize = ics.practices.iter().map(|p| p.list_size).sum();
    // Every valid test-range number, drawn without replacement by a partial
    // Fisher–Yates shuffle: person k swaps a uniformly chosen one of the numbers not yet
    // issued into slot k. Unique by construction, one draw per person.
    let mut nhs_pool = super::nhs::test_range_numbers();
    if total > nhs_pool.len().min(super::nhs::MAX_POPULATION) {
        return Err(TooManyPeople {
            max: super::nhs::MAX_POPULATION,
            got: total,
        });
    }
    let mut people = Vec::with_capacity(total);
    for (pi, practice) in ics.practices.iter().enumerate() {
        let weights = age_weights(practice.age_tilt);
        for _ in 0..practice.list_size {
            let age = draw_age(rng, &weights);
            let p_female = match age {
                0..=49 => 0.49,
                50..=74 => 0.51,
                75..=84 => 0.55,
                _ => 0.64,
            };
            let sex = if bern(rng, 0.001) {
                2
            } else if bern(rng, p_female) {
                0
            } else {
                1
            };
            let ethnicity = draw_ethnicity(rng, practice.place, age);
            let imd = pick(rng, &practice.imd) as u8 + 1;
            let candidates = &ics.lsoa_index[practice.place][imd as usize - 1];
            let lsoa = if candidates.is_empty() {
                // A Place too small to have an LSOA of this quintile: any of its LSOAs.
                let any: Vec<usize> = ics.lsoa_index[practice.place]
                    .iter()
                    .flatten()
                    .copied()
                    .collect();
                any[range(rng, 0, any.len() as u64) as usize]
            } else {
                candidates[range(rng, 0, candidates.len() as u64) as usize]
            };
            // The opt-out rate is ~5% overall, higher in working-age adults.
            let opt_out_p = match age {
                25..=64 => 0.06,
                _ => 0.035,
            };
            let opted_out = bern(rng, opt_out_p);
            let k = people.len();
            let pick = range(rng, k as u64, nhs_pool.len() as u64) as usize;
            nhs_pool.swap(k, pick);
            let nhs_number = nhs_pool[k];
            let birthday_offset = range(rng, 0, 365) as u16;
            let postcode_unit = [
                b'0' + range(rng, 1, 10) as u8,
                POSTCODE_LETTERS[range(rng, 0, POSTCODE_LETTERS.len() as u64) as usize],
                POSTCODE_LETTERS[range(rng, 0, POSTCODE_LETTERS.len() as u64) as usize],
            ];
            people.push(Person {
                practice: pi as u16,
                place: practice.place as u8,
                pcn: practice.pcn as u16,
                lsoa: lsoa as u32,
                age,
                sex,
                ethnicity,
                imd,
                opted_out,
                conditions: 0,
                smoking: 3,
                bmi: None,
                hba1c: None,
                systolic_bp: None,
                nhs_number,
                birthday_offset,
                postcode_unit,
            });
        }
        on_progress(practice.list_size as u64);
    }
    assign_smoking(rng, &mut people);
    assign_conditions(rng, &mut people);
    assign_measurements(rng, &mut people);
    Ok(people)
}

/// Scale relative risks so the expected share among eligible people equals `target`,
/// accounting for probabilities capped at `cap`; returns the probability per person
/// (0 for the ineligible).
fn calibrate(risks: &[f64], eligible: &[bool], target: f64, cap: f64) -> Vec<f64> {
    let n_eligible = eligible.iter().filter(|e| **e).count().max(1) as f64;
    let total: f64 = risks
        .iter()
        .zip(eligible)
        .filter(|(_, e)| **e)
        .map(|(r, _)| r)
        .sum();
    let mut scale = if total > 0.0 {
        target * n_eligible / total
    } else {
        0.0
    };
    // Capping removes mass; a few fixed-point steps put it back.
    for _ in 0..6 {
        let expected: f64 = risks
            .iter()
            .zip(eligible)
            .filter(|(_, e)| **e)
            .map(|(r, _)| (r * scale).min(cap))
            .sum();
        if expected <= 0.0 {
            break;
        }
        scale *= target * n_eligible / expected;
    }
    risks
        .iter()
        .zip(eligible)
        .map(|(r, e)| if *e { (r * scale).min(cap) } else { 0.0 })
        .collect()
}

fn age_curve(age: u8, points: &[(u8, f64)]) -> f64 {
    let mut value = 0.0;
    for (from, v) in points {
        if age >= *from {
            value = *v;
        }
    }
    value
}

fn assign_smoking(rng: &mut Rng, people: &mut [Person]) {
    const DEP: [f64; 5] = [1.9, 1.3, 1.0, 0.75, 0.55];
    let eligible: Vec<bool> = people.iter().map(|p| p.age >= 16).collect();
    let current_risk: Vec<f64> = people
        .iter()
        .map(|p| {
            age_curve(
                p.age,
                &[
                    (16, 0.9),
                    (25, 1.3),
                    (35, 1.1),
                    (50, 1.0),
                    (65, 0.7),
                    (75, 0.45),
                ],
            ) * DEP[p.imd as usize - 1]
                * if p.sex == 1 { 1.2 } else { 0.85 }
        })
        .collect();
    // Current smokers ~13% of adults (APS 2023 12.9%).
    let current = calibrate(&current_risk, &eligible, 0.13, 0.8);
    let ex_risk: Vec<f64> = people
        .iter()
        .map(|p| {
            age_curve(
                p.age,
                &[(16, 0.15), (30, 0.5), (45, 0.8), (60, 1.2), (70, 1.4)],
            )
        })
        .collect();
    let ex = calibrate(&ex_risk, &eligible, 0.30, 0.7);
    for (i, p) in people.iter_mut().enumerate() {
        if !eligible[i] {
            p.smoking = 3;
            continue;
        }
        p.smoking = if bern(rng, current[i]) {
            0
        } else if bern(rng, ex[i]) {
            1
        } else if bern(rng, 0.03) {
            3
        } else {
            2
        };
    }
}

struct ConditionModel {
    bit: u16,
    target: f64,
    min_age: u8,
    ages: &'static [(u8, f64)],
    deprivation: [f64; 5],
    ethnicity: [f64; 6],
}

fn condition_risk(m: &ConditionModel, p: &Person) -> f64 {
    let mut r = age_curve(p.age, m.ages)
        * m.deprivation[p.imd as usize - 1]
        * m.ethnicity[p.ethnicity as usize];
    // Conditions cluster: obesity drives diabetes and hypertension; both drive CVD;
    // smoking drives COPD and CVD.
    let smoker = match p.smoking {
        0 => 1.0,
        1 => 0.7,
        _ => 0.0,
    };
    match m.bit {
        DIABETES if p.has(OBESITY) => r *= 2.6,
        HYPERTENSION => {
            if p.has(OBESITY) {
                r *= 1.7;
            }
            if p.has(DIABETES) {
                r *= 1.8;
            }
        }
        CVD => {
            if p.has(DIABETES) {
                r *= 2.0;
            }
            if p.has(HYPERTENSION) {
                r *= 2.2;
            }
            r *= 1.0 + smoker;
        }
        COPD => r *= 0.15 + 3.5 * smoker,
        DEPRESSION if p.sex == 0 => r *= 1.6,
        _ => {}
    }
    r
}

fn assign_conditions(rng: &mut Rng, people: &mut [Person]) {
    // Targets are QOF 2023/24 England register prevalence over each register's age
    // range; gradients follow published age, deprivation and ethnicity patterns.
    let models = [
        ConditionModel {
            bit: OBESITY,
            target: 0.10,
            min_age: 18,
            ages: &[
                (18, 0.6),
                (30, 0.9),
                (45, 1.2),
                (60, 1.25),
                (75, 0.9),
                (85, 0.5),
            ],
            deprivation: [1.5, 1.25, 1.0, 0.85, 0.7],
            ethnicity: [1.0, 0.8, 1.3, 1.0, 0.8, 0.9],
        },
        ConditionModel {
            bit: DIABETES,
            target: 0.075,
            min_age: 17,
            ages: &[
                (17, 0.12),
                (30, 0.3),
                (40, 0.55),
                (50, 1.0),
                (60, 1.5),
                (70, 1.9),
                (80, 1.8),
            ],
            deprivation: [1.45, 1.2, 1.0, 0.85, 0.75],
            ethnicity: [1.0, 2.2, 1.7, 1.2, 1.3, 1.0],
        },
        ConditionModel {
            bit: HYPERTENSION,
            target: 0.14,
            min_age: 0,
            ages: &[
                (18, 0.01),
                (30, 0.03),
                (40, 0.09),
                (50, 0.2),
                (60, 0.33),
                (70, 0.45),
                (80, 0.55),
            ],
            deprivation: [1.2, 1.1, 1.0, 0.95, 0.9],
            ethnicity: [1.0, 1.1, 1.35, 1.0, 1.0, 1.0],
        },
        ConditionModel {
            bit: CVD,
            target: 0.03,
            min_age: 0,
            ages: &[
                (30, 0.001),
                (40, 0.01),
                (50, 0.03),
                (60, 0.07),
                (70, 0.12),
                (80, 0.17),
            ],
            deprivation: [1.5, 1.25, 1.0, 0.85, 0.75],
            ethnicity: [1.0, 1.4, 0.8, 1.0, 1.0, 1.0],
        },
        ConditionModel {
            bit: COPD,
            target: 0.02,
            min_age: 0,
            ages: &[(35, 0.005), (50, 0.02), (60, 0.045), (70, 0.07), (80, 0.08)],
            deprivation: [2.3, 1.6, 1.0, 0.7, 0.5],
            ethnicity: [1.0, 0.5, 0.5, 0.8, 0.6, 1.0],
        },
        ConditionModel {
            bit: ASTHMA,
            target: 0.065,
            min_age: 6,
            ages: &[(6, 1.1), (18, 1.0), (65, 1.05)],
            deprivation: [1.2, 1.1, 1.0, 0.95, 0.9],
            ethnicity: [1.0, 0.9, 1.0, 1.1, 0.9, 1.0],
        },
        ConditionModel {
            bit: DEPRESSION,
            target: 0.13,
            min_age: 18,
            ages: &[(18, 1.05), (30, 1.15), (50, 1.0), (65, 0.75)],
            deprivation: [1.4, 1.2, 1.0, 0.9, 0.8],
            ethnicity: [1.0, 0.6, 0.6, 1.1, 0.8, 0.9],
        },
        ConditionModel {
            bit: SMI,
            target: 0.01,
            min_age: 0,
            ages: &[(16, 0.8), (25, 1.1), (45, 1.2), (65, 0.9), (80, 0.7)],
            deprivation: [2.4, 1.6, 1.0, 0.75, 0.6],
            ethnicity: [1.0, 0.9, 2.2, 1.3, 1.3, 1.0],
        },
    ];
    for m in &models {
        let eligible: Vec<bool> = people.iter().map(|p| p.age >= m.min_age).collect();
        let risks: Vec<f64> = people.iter().map(|p| condition_risk(m, p)).collect();
        let probs = calibrate(&risks, &eligible, m.target, 0.95);
        for (p, prob) in people.iter_mut().zip(probs) {
            if prob > 0.0 && bern(rng, prob) {
                p.conditions |= m.bit;
            }
        }
    }
}

fn clamp_round(v: f64, lo: f64, hi: f64, decimals: i32) -> f64 {
    let f = 10f64.powi(decimals);
    (v.clamp(lo, hi) * f).round() / f
}

fn assign_measurements(rng: &mut Rng, people: &mut [Person]) {
    for p in people.iter_mut() {
        let has_ltc = p.conditions & (DIABETES | HYPERTENSION | CVD | COPD | OBESITY) != 0;
        if p.age >= 18 {
            // BMI is recorded for people on a register and ~65% of the rest.
            if has_ltc || bern(rng, 0.65) {
                let bmi = if p.has(OBESITY) {
                    30.0 + (-(unit(rng).max(1e-12)).ln()) * 4.5
                } else {
                    26.5 + normal(rng) * 4.2 + if p.has(DIABETES) { 2.0 } else { 0.0 }
                };
                p.bmi = Some(clamp_round(bmi, 15.0, 65.0, 1));
            }
            // HbA1c (mmol/mol): everyone with diabetes; a third of other adults 40+.
            if p.has(DIABETES) {
                let deprivation_shift = (3 - p.imd as i32) as f64 * 1.5;
                let v = 58.0 + deprivation_shift + normal(rng) * 13.0;
                p.hba1c = Some(clamp_round(v, 30.0, 140.0, 0));
            } else if p.age >= 40 && bern(rng, 0.33) {
                let v = 37.0 + normal(rng) * 3.5;
                p.hba1c = Some(clamp_round(v, 25.0, 47.0, 0));
            }
            // Systolic BP (mmHg): everyone with hypertension; half of other adults.
            if p.has(HYPERTENSION) || bern(rng, 0.5) {
                let base = 112.0 + p.age as f64 * 0.35;
                let v = base + if p.has(HYPERTENSION) { 14.0 } else { 0.0 } + normal(rng) * 13.0;
                p.systolic_bp = Some(clamp_round(v, 80.0, 220.0, 0));
            }
        }
    }
}
