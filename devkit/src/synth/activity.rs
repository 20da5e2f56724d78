//! Synthetic activity held by the non-GP partners: acute admissions (split between the
//! two trusts by Place), social-care packages and the local authority's residents.

use super::ics::Ics;
use super::people::{COPD, CVD, DIABETES, HYPERTENSION, Person, SMI};
use super::rng::{Rng, bern, normal, pick, poisson, range, unit};

pub const METHODS: [&str; 2] = ["emergency", "elective"];
/// Index of "emergency" in [`METHODS`].
pub const EMERGENCY: u8 = 0;
/// Index of "elective" in [`METHODS`].
pub const ELECTIVE: u8 = 1;
/// Diagnosis groups as the trusts' policies declare them.
pub const DIAGNOSIS_GROUPS: [&str; 6] = [
    "circulatory",
    "respiratory",
    "diabetes",
    "mental_health",
    "injury",
    "other",
];
pub const PACKAGE_TYPES: [&str; 5] = [
    "home_care",
    "residential",
    "nursing",
    "reablement",
    "direct_payment",
];
pub const TENURES: [&str; 4] = ["owner", "social_rent", "private_rent", "other"];
/// Longest stay recorded, in days (the trusts' policies clamp at 60).
pub const MAX_LENGTH_OF_STAY: u16 = 60;

/// Most admissions one person has in the year; equals the policy's
/// `max_rows_per_person` so nodes never need to drop rows of real people.
pub const MAX_ADMISSIONS: u32 = 10;
/// Admissions cover the 365 days before the reference date.
pub const ADMISSION_WINDOW_DAYS: u64 = 365;

#[derive(Debug, Clone)]
pub struct Admission {
    pub person: u32,
    /// 0 or 1: which trust.
    pub trust: u8,
    pub seq: u32,
    /// Days before the reference date (1-365).
    pub days_before: u16,
    /// Index into [`METHODS`].
    pub method: u8,
    pub diagnosis: u8,
    pub length_of_stay: u16,
}

#[derive(Debug, Clone)]
pub struct Package {
    pub person: u32,
    pub package_type: u8,
    pub weekly_hours: Option<f64>,
    pub weekly_cost: f64,
}

#[derive(Debug, Clone)]
pub struct Resident {
    pub tenure: u8,
    pub fuel_poverty: bool,
}

fn ltc_count(p: &Person) -> u32 {
    [DIABETES, HYPERTENSION, CVD, COPD, COPD]
        .iter()
        .filter(|c| p.has(**c))
        .count() as u32
}

pub fn admissions(rng: &mut Rng, people: &[Person]) -> Vec<Admission> {
    const DEP: [f64; 5] = [1.35, 1.15, 1.0, 0.9, 0.8];
    let mut out = Vec::new();
    let mut seq = [0u32; 2];
    for (i, p) in people.iter().enumerate() {
        // Rates per person-year, shaped on HES 2023/24 (emergency ~0.11, elective
        // ordinary + day case ~0.14 across all ages).
        let emergency = match p.age {
            0..=4 => 0.12,
            5..=14 => 0.04,
            15..=44 => 0.055,
            45..=64 => 0.08,
            65..=74 => 0.16,
            75..=84 => 0.28,
            _ => 0.5,
        } * DEP[p.imd as usize - 1]
            * (1.0 + 0.35 * ltc_count(p) as f64);
        let elective = match p.age {
            0..=14 => 0.03,
            15..=44 => 0.07,
            45..=64 => 0.16,
            65..=84 => 0.3,
            _ => 0.2,
        };
        let n_emergency = poisson(rng, emergency);
        let n_elective = poisson(rng, elective);
        let total = (n_emergency + n_elective).min(MAX_ADMISSIONS);
        for k in 0..total {
            let method = if k < n_emergency { EMERGENCY } else { ELECTIVE };
            // 90% of residents use their Place's trust.
            let home = Ics::home_trust(p.place as usize) as u8;
            let trust = if bern(rng, 0.9) { home } else { 1 - home };
            let diagnosis = diagnosis(rng, p, method == EMERGENCY) as u8;
            let length_of_stay = length_of_stay(rng, p, method == EMERGENCY);
            seq[trust as usize] += 1;
            out.push(Admission {
                person: i as u32,
                trust,
                seq: seq[trust as usize],
                days_before: range(rng, 1, ADMISSION_WINDOW_DAYS + 1) as u16,
                method,
                diagnosis,
                length_of_stay,
            });
        }
    }
    out
}

fn diagnosis(rng: &mut Rng, p: &Person, emergency: bool) -> usize {
    let old = p.age >= 65;
    // circulatory, respiratory, diabetes, mental_health, injury, other
    let mut w = if emergency {
        [14.0, 16.0, 2.0, 4.0, 14.0, 50.0]
    } else {
        [6.0, 2.0, 1.5, 1.0, 2.0, 87.5]
    };
    if old {
        w[0] *= 1.6;
        w[1] *= 1.4;
    } else {
        w[3] *= 1.8;
        w[4] *= 1.5;
    }
    if p.has(COPD) {
        w[1] *= 3.0;
    }
    if p.has(CVD) {
        w[0] *= 3.0;
    }
    if p.has(DIABETES) {
        w[2] *= 6.0;
    }
    if p.has(SMI) {
        w[3] *= 4.0;
    }
    pick(rng, &w)
}

fn length_of_stay(rng: &mut Rng, p: &Person, emergency: bool) -> u16 {
    if emergency {
        // A quarter go home the same day; the rest stay longer the older they are.
        if bern(rng, 0.25) {
            return 0;
        }
        let mean = 2.0 + p.age as f64 / 15.0;
        (1.0 + (-(unit(rng).max(1e-12)).ln()) * mean).min(MAX_LENGTH_OF_STAY as f64) as u16
    } else if bern(rng, 0.6) {
        0
    } else {
        (1.0 + (-(unit(rng).max(1e-12)).ln()) * 2.5).min(MAX_LENGTH_OF_STAY as f64) as u16
    }
}

pub fn packages(rng: &mut Rng, people: &[Person]) -> Vec<Package> {
    const DEP: [f64; 5] = [1.3, 1.15, 1.0, 0.9, 0.8];
    let mut out = Vec::new();
    for (i, p) in people.iter().enumerate() {
        if p.age < 18 {
            continue;
        }
        let base = match p.age {
            18..=64 if p.has(SMI) => 0.08,
            18..=64 => 0.004,
            65..=74 => 0.025,
            75..=84 => 0.07,
            _ => 0.18,
        } * DEP[p.imd as usize - 1];
        if !bern(rng, base.min(0.9)) {
            continue;
        }
        // home_care, residential, nursing, reablement, direct_payment
        let w = match p.age {
            18..=64 => [0.35, 0.08, 0.02, 0.05, 0.50],
            65..=84 => [0.62, 0.11, 0.05, 0.12, 0.10],
            _ => [0.52, 0.22, 0.13, 0.07, 0.06],
        };
        let first = pick(rng, &w);
        out.push(package(rng, i, first));
        // A fifth of home-care users also take a direct payment (e.g. for day activities).
        if first == 0 && bern(rng, 0.2) {
            out.push(package(rng, i, 4));
        }
    }
    out
}

fn package(rng: &mut Rng, person: usize, kind: usize) -> Package {
    let lognormal = |rng: &mut Rng, median: f64, spread: f64, lo: f64, hi: f64| {
        ((median * (spread * normal(rng)).exp()).clamp(lo, hi) * 2.0).round() / 2.0
    };
    // Hours-based packages carry hours; care homes are priced per week.
    let (hours, cost) = match kind {
        0 => {
            let h = lognormal(rng, 10.0, 0.6, 2.0, 42.0);
            (Some(h), h * 24.5)
        }
        1 => (None, lognormal(rng, 1_050.0, 0.15, 750.0, 1_600.0)),
        2 => (None, lognormal(rng, 1_300.0, 0.15, 950.0, 1_900.0)),
        3 => {
            let h = lognormal(rng, 9.0, 0.4, 3.0, 20.0);
            (Some(h), h * 26.0)
        }
        _ => {
            let h = lognormal(rng, 12.0, 0.5, 3.0, 40.0);
            (Some(h), h * 19.0)
        }
    };
    Package {
        person: person as u32,
        package_type: kind as u8,
        weekly_hours: hours,
        weekly_cost: (cost * 100.0).round() / 100.0,
    }
}

pub fn residents(rng: &mut Rng, people: &[Person]) -> Vec<Resident> {
    people
        .iter()
        .map(|p| {
            let q = p.imd as usize - 1;
            // owner, social_rent, private_rent, other (Census 2021 by
            // deprivation: owner-occupation 35% in quintile 1, ~80% in quintile 5).
            let mut w = [
                [0.35, 0.35, 0.27, 0.03],
                [0.52, 0.22, 0.23, 0.03],
                [0.64, 0.14, 0.20, 0.02],
                [0.74, 0.09, 0.15, 0.02],
                [0.82, 0.05, 0.11, 0.02],
            ][q];
            if (18..35).contains(&p.age) {
                w[2] *= 2.2;
            } else if p.age >= 65 {
                w[0] *= 1.4;
                w[2] *= 0.4;
            }
            let tenure = pick(rng, &w) as u8;
            let fuel: f64 = 0.13
                * [1.8, 1.3, 1.0, 0.7, 0.45][q]
                * match tenure {
                    2 => 1.4,
                    1 => 1.1,
                    _ => 0.8,
                };
            Resident {
                tenure,
                fuel_poverty: bern(rng, fuel.min(0.9)),
            }
        })
        .collect()
}
