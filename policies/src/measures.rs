//! The noisy measurements a query's aggregates are formed from. A query's epsilon is
//! split between *measurements*, not between aggregates: every aggregate the analyst
//! asked for is then post-processing of one or two noisy vectors, so figures that can
//! share a vector do, and pay for it once.
//!
//! - COUNT(*) is the vector of rows per key. Two COUNT(*)s share it, and so does the
//!   denominator of every AVG over a column the policy declares `never_null` (load
//!   refuses a file where such a column has a NULL, so its values per key *are* its
//!   rows per key).
//! - AVG over a column that may be NULL needs its own count of values.
//! - SUM(col) is the vector of sums of the clamped values. AVG(col) in the same query
//!   divides that same sum by its count.
//! - AVG(col) without SUM(col) sums the values *centred* on the middle of the bounds,
//!   `x − (lo + hi)/2`, so one person moves the sum by at most `m·(hi − lo)/2` rather
//!   than `m·max(|lo|, |hi|)`: for ages in [0, 110] half the noise. The mean is then
//!   `centre + noisy centred sum / noisy count`, and the noise that the count's error
//!   contributes scales with `mean − centre` instead of the mean itself.
//!
//! The split is even across measurements (and key selection, when keys are
//! thresholded). For a mean's two vectors that is the allocation that minimises the
//! mean's worst-case variance over the unknown true mean: the count's noise is
//! multiplied by `|mean − centre| ≤ (hi − lo)/2`, and at that bound the two terms have
//! equal sensitivity, where an even split is optimal. Allocating by the data would spend
//! privacy to choose the allocation.
//!
//! The decision (which plans the spend and the key-selection share) and the engine
//! (which noises) both call [`measures`], so they cannot disagree.

use phm_proto::AggregateKind;

use crate::decision::AggregateLimits;

/// One noisy vector over the release's keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Measure {
    /// Rows per key.
    Rows,
    /// Values of the column per key that are neither NULL nor NaN.
    Values(String),
    /// Sum of the column's clamped values per key, each minus the bounds' midpoint when
    /// `centred`.
    Sum { column: String, centred: bool },
}

/// How one aggregate is formed: positions in [`Measures::list`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Formed {
    Count { rows: usize },
    Sum { sum: usize },
    Mean { sum: usize, count: usize },
}

/// The measurements of a query, and how each of its aggregates is formed from them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Measures {
    pub list: Vec<Measure>,
    /// One per aggregate, in the query's order; `None` for an aggregate that names no
    /// usable column (the decision has refused such a query).
    pub formed: Vec<Option<Formed>>,
}

impl Measures {
    /// Number of measurements: the shares the query's epsilon is split into (key
    /// selection aside).
    pub fn len(&self) -> usize {
        self.list.len()
    }

    pub fn is_empty(&self) -> bool {
        self.list.is_empty()
    }

    /// The measurements in words, for `phm policy explain`: e.g. "rows per key; sum of
    /// age centred on the middle of its bounds".
    pub fn describe(&self) -> String {
        self.list
            .iter()
            .map(|m| match m {
                Measure::Rows => "rows per key".to_string(),
                Measure::Values(c) => format!("values of {c} per key"),
                Measure::Sum {
                    column,
                    centred: false,
                } => format!("sum of {column}"),
                Measure::Sum {
                    column,
                    centred: true,
                } => format!("sum of {column} centred on the middle of its bounds"),
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn position(&mut self, m: Measure) -> usize {
        if let Some(i) = self.list.iter().position(|x| *x == m) {
            return i;
        }
        self.list.push(m);
        self.list.len() - 1
    }
}

/// The measurements behind `aggregates`, in order of first use.
pub fn measures(aggregates: &[AggregateLimits]) -> Measures {
    let summed: Vec<&str> = aggregates
        .iter()
        .filter(|a| a.kind == AggregateKind::Sum)
        .filter_map(|a| a.column.as_ref().map(|c| c.name.as_str()))
        .collect();
    let mut out = Measures {
        list: Vec::new(),
        formed: Vec::with_capacity(aggregates.len()),
    };
    for a in aggregates {
        let formed = match (a.kind, &a.column) {
            (AggregateKind::Count, None) => Some(Formed::Count {
                rows: out.position(Measure::Rows),
            }),
            (AggregateKind::Sum, Some(c)) => Some(Formed::Sum {
                sum: out.position(Measure::Sum {
                    column: c.name.clone(),
                    centred: false,
                }),
            }),
            (AggregateKind::Mean, Some(c)) => {
                let sum = out.position(Measure::Sum {
                    column: c.name.clone(),
                    centred: !summed.contains(&c.name.as_str()),
                });
                let count = out.position(if c.never_null {
                    Measure::Rows
                } else {
                    Measure::Values(c.name.clone())
                });
                Some(Formed::Mean { sum, count })
            }
            _ => None,
        };
        out.formed.push(formed);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::decision::ColumnLimits;
    use crate::model::ColumnType;

    fn agg(kind: AggregateKind, column: Option<(&str, bool)>) -> AggregateLimits {
        AggregateLimits {
            alias: format!("{kind:?}"),
            kind,
            column: column.map(|(name, never_null)| ColumnLimits {
                name: name.into(),
                column_type: ColumnType::Integer,
                bounds: Some((0.0, 100.0)),
                never_null,
            }),
        }
    }

    #[test]
    fn count_sum_and_mean_of_a_never_null_column_take_two_measurements() {
        let m = measures(&[
            agg(AggregateKind::Count, None),
            agg(AggregateKind::Sum, Some(("age", true))),
            agg(AggregateKind::Mean, Some(("age", true))),
        ]);
        assert_eq!(
            m.list,
            vec![
                Measure::Rows,
                Measure::Sum {
                    column: "age".into(),
                    centred: false
                }
            ]
        );
        assert_eq!(
            m.formed,
            vec![
                Some(Formed::Count { rows: 0 }),
                Some(Formed::Sum { sum: 1 }),
                Some(Formed::Mean { sum: 1, count: 0 }),
            ]
        );
    }

    #[test]
    fn a_mean_alone_is_centred_and_a_nullable_column_counts_its_values() {
        let m = measures(&[
            agg(AggregateKind::Count, None),
            agg(AggregateKind::Mean, Some(("bmi", false))),
        ]);
        assert_eq!(
            m.list,
            vec![
                Measure::Rows,
                Measure::Sum {
                    column: "bmi".into(),
                    centred: true
                },
                Measure::Values("bmi".into()),
            ]
        );
        assert_eq!(m.formed[1], Some(Formed::Mean { sum: 1, count: 2 }));
        assert_eq!(
            m.describe(),
            "rows per key; sum of bmi centred on the middle of its bounds; values of bmi per key"
        );
    }

    #[test]
    fn repeated_aggregates_share_their_measurement() {
        let m = measures(&[
            agg(AggregateKind::Count, None),
            agg(AggregateKind::Count, None),
            agg(AggregateKind::Mean, Some(("age", true))),
            agg(AggregateKind::Mean, Some(("age", true))),
        ]);
        assert_eq!(m.len(), 2);
        assert_eq!(m.formed[0], m.formed[1]);
        assert_eq!(m.formed[2], m.formed[3]);
    }
}
