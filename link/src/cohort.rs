//! The people each side links: de-duplicated on NHS number, with unlinkable records
//! counted by reason and never hashed.
//!
//! Sensitivity rests here. Each side is a *set* of people, so adding or removing one
//! person changes each count by at most one; and the anchor's group label must be
//! person-level (one label per person), so that one person can move at most one group's
//! count. A person given two different labels is refused, not silently counted twice.
//!
//! Neither type is `Clone`, serialisable or printable with its numbers: `Debug` shows
//! only the statistics.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::error::LinkError;
use crate::nhs::{NhsNumber, Unlinkable};

/// What was left out of a cohort, by reason. These are the node's own exact figures:
/// like any other count of its data they may be released only through DP.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CohortStats {
    /// Records given.
    pub records: u64,
    /// Distinct people linked on (records with a valid number, de-duplicated).
    pub people: u64,
    /// Records with a valid number that repeated one already seen.
    pub duplicates: u64,
    pub missing: u64,
    pub malformed: u64,
    pub bad_check_digit: u64,
    pub placeholder: u64,
}

impl CohortStats {
    fn note(&mut self, why: Unlinkable) {
        match why {
            Unlinkable::Missing => self.missing += 1,
            Unlinkable::Malformed => self.malformed += 1,
            Unlinkable::BadCheckDigit => self.bad_check_digit += 1,
            Unlinkable::Placeholder => self.placeholder += 1,
        }
    }

    /// Records that could not be linked at all.
    pub fn unlinkable(&self) -> u64 {
        self.missing + self.malformed + self.bad_check_digit + self.placeholder
    }
}

/// The anchor's people, each in one of `groups` groups (indices into the query's group
/// domain, which both nodes know).
pub struct AnchorCohort {
    groups: usize,
    /// People per group, each group sorted (the order is discarded by the shuffle anyway).
    members: Vec<Vec<NhsNumber>>,
    stats: CohortStats,
}

impl AnchorCohort {
    /// Build from records of (raw NHS number, group index). Opt-outs must already be
    /// excluded by the caller. Refuses a group index ≥ `groups` and a person with two
    /// different labels ([`LinkError::NotPersonLevel`]).
    pub fn new<'a>(
        groups: usize,
        records: impl IntoIterator<Item = (Option<&'a str>, usize)>,
    ) -> Result<AnchorCohort, LinkError> {
        if groups == 0 {
            return Err(LinkError::Params(
                "the anchor needs at least one group".into(),
            ));
        }
        let mut stats = CohortStats::default();
        let mut label: BTreeMap<NhsNumber, usize> = BTreeMap::new();
        for (raw, group) in records {
            stats.records += 1;
            if group >= groups {
                return Err(LinkError::GroupOutOfRange { group, groups });
            }
            match NhsNumber::parse_opt(raw) {
                Err(why) => stats.note(why),
                Ok(n) => match label.get(&n) {
                    None => {
                        label.insert(n, group);
                    }
                    Some(&g) if g == group => stats.duplicates += 1,
                    Some(_) => return Err(LinkError::NotPersonLevel),
                },
            }
        }
        let mut members = vec![Vec::new(); groups];
        for (n, g) in label {
            members[g].push(n);
        }
        stats.people = members.iter().map(|m| m.len() as u64).sum();
        Ok(AnchorCohort {
            groups,
            members,
            stats,
        })
    }

    pub fn groups(&self) -> usize {
        self.groups
    }

    pub fn stats(&self) -> &CohortStats {
        &self.stats
    }

    /// Linkable people per group (`n_g`), which NOT EXISTS releases against.
    pub fn group_sizes(&self) -> Vec<u64> {
        self.members.iter().map(|m| m.len() as u64).collect()
    }

    pub(crate) fn members(&self) -> &[Vec<NhsNumber>] {
        &self.members
    }
}

/// The partner's people: a set of valid NHS numbers (its filter, HAVING and opt-outs
/// already applied by the caller).
pub struct PartnerCohort {
    members: Vec<NhsNumber>,
    stats: CohortStats,
}

impl PartnerCohort {
    pub fn new<'a>(records: impl IntoIterator<Item = Option<&'a str>>) -> PartnerCohort {
        let mut stats = CohortStats::default();
        let mut set = BTreeSet::new();
        for raw in records {
            stats.records += 1;
            match NhsNumber::parse_opt(raw) {
                Err(why) => stats.note(why),
                Ok(n) => {
                    if !set.insert(n) {
                        stats.duplicates += 1;
                    }
                }
            }
        }
        stats.people = set.len() as u64;
        PartnerCohort {
            members: set.into_iter().collect(),
            stats,
        }
    }

    /// The people with at least `k` records (`GROUP BY a.person HAVING COUNT(*) >= k`),
    /// records counted per valid number after normalising, so two spellings of one
    /// number count together. `k` of 0 or 1 is [`PartnerCohort::new`]. A HAVING cohort
    /// is still a set, so one person still moves the linked count by at most one.
    pub fn with_min_rows<'a>(
        records: impl IntoIterator<Item = Option<&'a str>>,
        k: u32,
    ) -> PartnerCohort {
        if k <= 1 {
            return PartnerCohort::new(records);
        }
        let mut stats = CohortStats::default();
        let mut rows: BTreeMap<NhsNumber, u32> = BTreeMap::new();
        for raw in records {
            stats.records += 1;
            match NhsNumber::parse_opt(raw) {
                Err(why) => stats.note(why),
                Ok(n) => {
                    let c = rows.entry(n).or_insert(0);
                    if *c > 0 {
                        stats.duplicates += 1;
                    }
                    *c = c.saturating_add(1);
                }
            }
        }
        let members: Vec<NhsNumber> = rows
            .into_iter()
            .filter(|(_, c)| *c >= k)
            .map(|(n, _)| n)
            .collect();
        stats.people = members.len() as u64;
        PartnerCohort { members, stats }
    }

    pub fn stats(&self) -> &CohortStats {
        &self.stats
    }

    pub(crate) fn members(&self) -> &[NhsNumber] {
        &self.members
    }
}

impl fmt::Debug for AnchorCohort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnchorCohort")
            .field("groups", &self.groups)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for PartnerCohort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartnerCohort")
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}
