//! NHS numbers as the partners hold them, for linked questions.
//!
//! Every person is issued one number from the official test range (999 000 0000 –
//! 999 999 9999, which is never issued to a real patient), unique across the ICS. Each
//! partner then keeps its own record of it, and like real partners' records these are
//! mostly right but not always: a number can be *missing* (never traced, or not captured
//! at the point of care) or *mistyped* (one digit keyed wrongly, which the mod-11 check
//! digit always catches). Linkage is on the number alone, so those records cannot link;
//! the reference answers count exactly what can.
//!
//! The state of each record is drawn per person per partner, not per row: a partner holds
//! one patient (or client, or resident) record whose number every row it writes repeats,
//! as a trust's patient administration system does for all of a patient's admissions.

use super::people::Person;
use super::rng::{Rng, range, unit};
use phm_link::{NhsNumber, Unlinkable};

/// Nine-digit bodies of the official test range: 999 000 000 – 999 999 999.
pub const TEST_RANGE_BODIES: std::ops::Range<u32> = 999_000_000..1_000_000_000;

/// Most people `phm synth` generates: every person needs a number of their own from the
/// test range, which holds 909,090 valid ones (a body whose mod-11 remainder is 10 has
/// no valid number, and 999 999 999 9 is a repeated-digit placeholder).
pub const MAX_POPULATION: usize = 900_000;

/// Every valid number of the test range, in ascending order.
pub fn test_range_numbers() -> Vec<u64> {
    TEST_RANGE_BODIES
        .filter_map(phm_link::with_check_digit)
        .map(|n| {
            n.digits()
                .iter()
                .fold(0u64, |v, d| v * 10 + u64::from(d - b'0'))
        })
        .collect()
}

/// Whose record of the number: the partners that hold one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Holder {
    /// The practice the person is registered with.
    Gp,
    /// Acute trust 0 (Riverside Hospitals) or 1 (Wolds and Coast).
    Trust(usize),
    SocialCare,
    /// The council's residents file.
    Council,
}

/// How often a partner's record of the number is missing or mistyped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RecordQuality {
    pub missing: f64,
    pub mistyped: f64,
}

impl Holder {
    /// Every holder, in the order their records are drawn (which the seed's output
    /// depends on: append, never reorder).
    pub const ALL: [Holder; 5] = [
        Holder::Gp,
        Holder::Trust(0),
        Holder::Trust(1),
        Holder::SocialCare,
        Holder::Council,
    ];

    pub fn quality(self) -> RecordQuality {
        match self {
            // Registration traces the patient against the national Spine, so a practice
            // lacks a number only for the few new registrations still being traced; it
            // never keys one by hand.
            Holder::Gp => RecordQuality {
                missing: 0.003,
                mistyped: 0.0,
            },
            // Admitted before tracing (unconscious, overseas visitors, unverified
            // identity), or a number copied from a referral letter.
            Holder::Trust(_) | Holder::SocialCare => RecordQuality {
                missing: 0.03,
                mistyped: 0.005,
            },
            // Council systems do not record NHS numbers at the point of service; they
            // are matched in afterwards from name, date of birth and address, which
            // fails more often.
            Holder::Council => RecordQuality {
                missing: 0.08,
                mistyped: 0.005,
            },
        }
    }
}

/// One partner's record of one person's number.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recorded {
    /// The number as issued.
    AsIssued,
    /// No number (written as NULL).
    Missing,
    /// The digit at `position` (0-9, left to right) is `shift` (1-9) more, mod 10, than
    /// issued. Any single changed digit fails the mod-11 check: each of the first nine
    /// has a weight (10 down to 2) coprime to 11, and the tenth is the check itself.
    Mistyped { position: u8, shift: u8 },
}

impl Recorded {
    /// The text this record holds for the issued `number`, `None` for a missing one.
    pub fn text(self, number: u64) -> Option<String> {
        let issued = format!("{number:010}");
        match self {
            Recorded::AsIssued => Some(issued),
            Recorded::Missing => None,
            Recorded::Mistyped { position, shift } => Some(
                issued
                    .bytes()
                    .enumerate()
                    .map(|(i, b)| {
                        if i == usize::from(position) {
                            char::from(b'0' + (b - b'0' + shift) % 10)
                        } else {
                            char::from(b)
                        }
                    })
                    .collect(),
            ),
        }
    }
}

/// Every partner's record of every person's number, indexed by person.
#[derive(Debug, Clone)]
pub struct NhsRecords {
    by_holder: Vec<Vec<Recorded>>,
}

fn draw(rng: &mut Rng, q: RecordQuality) -> Recorded {
    let u = unit(rng);
    if u < q.missing {
        Recorded::Missing
    } else if u < q.missing + q.mistyped {
        Recorded::Mistyped {
            position: range(rng, 0, 10) as u8,
            shift: range(rng, 1, 10) as u8,
        }
    } else {
        Recorded::AsIssued
    }
}

impl NhsRecords {
    /// Draw every holder's record of every person. Drawn for everyone at every holder
    /// (not only for the people a holder has rows for), so a person's record at one
    /// partner does not depend on their activity at another.
    pub fn generate(rng: &mut Rng, people: &[Person]) -> NhsRecords {
        let by_holder = Holder::ALL
            .iter()
            .map(|h| {
                let q = h.quality();
                people.iter().map(|_| draw(rng, q)).collect()
            })
            .collect();
        NhsRecords { by_holder }
    }

    fn slot(holder: Holder) -> Option<usize> {
        Holder::ALL.iter().position(|h| *h == holder)
    }

    /// How `holder` recorded person `person`'s number. A holder or person not generated
    /// reads as missing: unlinkable, never someone else's number.
    pub fn recorded(&self, holder: Holder, person: usize) -> Recorded {
        Self::slot(holder)
            .and_then(|s| self.by_holder.get(s))
            .and_then(|v| v.get(person))
            .copied()
            .unwrap_or(Recorded::Missing)
    }

    /// The text `holder` writes in its `nhs_number` column for `people[person]`: what
    /// the Parquet files hold and the reference answers link on.
    pub fn written(&self, holder: Holder, person: usize, people: &[Person]) -> Option<String> {
        let number = people.get(person)?.nhs_number;
        self.recorded(holder, person).text(number)
    }
}

/// The number a record links on, validated as the node validates it (`phm_link`).
pub fn linkable(text: Option<&str>) -> Result<NhsNumber, Unlinkable> {
    NhsNumber::parse_opt(text)
}

/// Measured quality of the numbers one dataset was written with.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NumberQuality {
    pub dataset: String,
    pub records: u64,
    pub missing: u64,
    /// Present but not a valid number (a mistyped digit).
    pub invalid: u64,
}

impl NumberQuality {
    pub fn new(dataset: &str) -> NumberQuality {
        NumberQuality {
            dataset: dataset.to_string(),
            ..NumberQuality::default()
        }
    }

    /// Count one written value.
    pub fn note(&mut self, text: Option<&str>) {
        self.records += 1;
        match linkable(text) {
            Ok(_) => {}
            Err(Unlinkable::Missing) => self.missing += 1,
            Err(_) => self.invalid += 1,
        }
    }

    pub fn missing_rate(&self) -> f64 {
        self.missing as f64 / self.records.max(1) as f64
    }

    pub fn invalid_rate(&self) -> f64 {
        self.invalid as f64 / self.records.max(1) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_test_range_holds_enough_valid_numbers() {
        let numbers = test_range_numbers();
        assert_eq!(numbers.len(), 909_090);
        assert!(numbers.len() >= MAX_POPULATION);
        assert!(
            numbers
                .iter()
                .all(|n| (9_990_000_000..=9_999_999_999).contains(n))
        );
        // 999 999 999 9 passes mod 11 but is a placeholder, never issued.
        assert!(!numbers.contains(&9_999_999_999));
        for n in numbers.iter().step_by(9_973) {
            assert!(linkable(Some(&format!("{n:010}"))).is_ok());
        }
    }

    #[test]
    fn every_single_digit_mistype_fails_the_check_digit() {
        let numbers = test_range_numbers();
        for n in numbers.iter().step_by(50_021) {
            assert_eq!(
                Recorded::AsIssued.text(*n),
                Some(format!("{n:010}")),
                "as issued"
            );
            for position in 0..10 {
                for shift in 1..10 {
                    let text = Recorded::Mistyped { position, shift }.text(*n);
                    let text = text.as_deref();
                    assert_eq!(text.map(str::len), Some(10));
                    // A change can also make a repeated-digit placeholder, which is
                    // refused before its check digit is looked at.
                    assert!(
                        matches!(
                            linkable(text),
                            Err(Unlinkable::BadCheckDigit | Unlinkable::Placeholder)
                        ),
                        "{n} {position} {shift}: {text:?}"
                    );
                }
            }
        }
        assert_eq!(Recorded::Missing.text(9_434_765_919), None);
    }
}
