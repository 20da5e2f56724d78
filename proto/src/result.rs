//! The one result model: what a node released for one query, as domain types, with the
//! conversions to and from the wire (`proto::AggregateResult`) in one place.
//!
//! The node's engine builds a [`Release`], the node wraps it in an [`Answer`] and sends
//! it; the coordinator decodes the wire form back into an [`Answer`], which checks
//! everything an answer must satisfy on its own (finite figures, non-negative variances,
//! one key per group column, one cell per aggregate, no group twice). The coordinator
//! then checks only what depends on the query it asked. The node's release cache stores
//! the wire form, so a repeat decodes the same bytes.

use crate::proto;

/// The noise distribution a figure was released with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mechanism {
    /// OpenDP discrete Laplace under pure epsilon-DP.
    DiscreteLaplace,
    /// OpenDP discrete Gaussian under zero-concentrated DP.
    DiscreteGaussian,
}

/// Where a node's figures may be shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// This organisation's figures may be shown on their own.
    Standalone,
    /// Only inside a system-level total; never displayed per organisation.
    SystemTotalOnly,
}

/// How a system total of a dataset across partners reads (spelt as in
/// `coordinator.toml`'s `datasets.total_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TotalKind {
    /// Each person counted once (every person belongs to one partner).
    DistinctPeople,
    /// A person known to two partners counts twice.
    #[default]
    SumOfPartnerCounts,
}

/// The noisy parts of a mean, so a coordinator can form a ratio estimate across nodes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanParts {
    /// The noisy sum of the values, each minus `centre`.
    pub noisy_sum: f64,
    pub sum_variance: f64,
    pub noisy_count: f64,
    pub count_variance: f64,
    /// What each value was shifted by before summing (the middle of its bounds, or 0):
    /// the mean is `centre + noisy_sum / noisy_count`.
    pub centre: f64,
}

/// One released figure.
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    pub alias: String,
    /// Displayable value: rounded per policy; 0 when suppressed.
    pub estimate: f64,
    /// Unrounded noisy value, for forming system totals.
    pub noisy_value: f64,
    /// Laplace b or Gaussian sigma; for means, the delta-method standard error.
    pub noise_scale: f64,
    /// Variance of the noise (delta-method variance for means).
    pub variance: f64,
    pub ci95: (f64, f64),
    pub suppressed: bool,
    pub suppression_reason: Option<String>,
    /// `None` for an exact (unnoised, benchmark-only) figure, or a mechanism this build
    /// does not know; intervals then become distribution-free.
    pub mechanism: Option<Mechanism>,
    /// Set for means.
    pub mean: Option<MeanParts>,
}

/// One group's figures.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    /// One label per group key.
    pub key: Vec<String>,
    /// One cell per aggregate.
    pub cells: Vec<Cell>,
}

/// What one query released: the table and what it cost.
#[derive(Debug, Clone, PartialEq)]
pub struct Release {
    /// Labels of the group keys, in query order.
    pub group_columns: Vec<String>,
    /// Aggregate aliases, in query order.
    pub aliases: Vec<String>,
    /// Every declared group (zeros included), or the groups that passed thresholding.
    pub rows: Vec<Row>,
    /// Privacy loss actually realised by the mechanisms (OpenDP privacy maps), never
    /// more than the query's epsilon.
    pub epsilon_spent: f64,
    /// Delta of this release: the thresholding share, plus the zCDP conversion's for
    /// the Gaussian; 0 for a pure epsilon-DP release.
    pub delta_spent: f64,
    /// zCDP rho of the Gaussian noise (0 for the discrete Laplace).
    pub rho_spent: f64,
    pub min_reportable_count: f64,
}

/// A node's answer to one query: the release and what the wire carries around it.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub query_id: String,
    /// ODS code of the answering organisation.
    pub node_id: String,
    pub dataset: String,
    pub release: Release,
    /// Budget left on the charged ledger (project ledger for research) right after
    /// this release.
    pub epsilon_remaining: f64,
    /// Content hash of the policy that decided the query.
    pub policy_version: String,
    pub scope: Scope,
    /// Published registered population when the policy declares one, else 0.
    pub population_noisy: f64,
    pub released_at_unix_ms: i64,
    /// Set on answers served from the release cache.
    pub cached: bool,
    /// How this node's policy says a system total of the dataset reads; `None` from
    /// a node that does not say.
    pub total_kind: Option<TotalKind>,
}

/// Why a wire answer is not a well-formed answer. The text names the figure at fault
/// (e.g. `group ["1"] count.variance is negative (-1)`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MalformedResult(pub String);

fn finite(what: &str, v: f64) -> Result<(), MalformedResult> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(MalformedResult(format!(
            "{what} is not a finite number ({v})"
        )))
    }
}

fn non_negative(what: &str, v: f64) -> Result<(), MalformedResult> {
    finite(what, v)?;
    if v < 0.0 {
        return Err(MalformedResult(format!("{what} is negative ({v})")));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------
// Domain -> wire.

impl From<Mechanism> for proto::NoiseMechanism {
    fn from(m: Mechanism) -> Self {
        match m {
            Mechanism::DiscreteLaplace => proto::NoiseMechanism::DiscreteLaplace,
            Mechanism::DiscreteGaussian => proto::NoiseMechanism::DiscreteGaussian,
        }
    }
}

impl From<Scope> for proto::ReleaseScope {
    fn from(s: Scope) -> Self {
        match s {
            Scope::Standalone => proto::ReleaseScope::Standalone,
            Scope::SystemTotalOnly => proto::ReleaseScope::SystemTotalOnly,
        }
    }
}

impl From<TotalKind> for proto::TotalKind {
    fn from(k: TotalKind) -> Self {
        match k {
            TotalKind::DistinctPeople => proto::TotalKind::DistinctPeople,
            TotalKind::SumOfPartnerCounts => proto::TotalKind::SumOfPartnerCounts,
        }
    }
}

impl From<MeanParts> for proto::MeanParts {
    fn from(p: MeanParts) -> Self {
        let MeanParts {
            noisy_sum,
            sum_variance,
            noisy_count,
            count_variance,
            centre,
        } = p;
        proto::MeanParts {
            noisy_sum,
            sum_variance,
            noisy_count,
            count_variance,
            centre,
        }
    }
}

impl From<Cell> for proto::Cell {
    fn from(c: Cell) -> Self {
        // Destructured so that a new field fails to compile here until it is sent.
        let Cell {
            alias,
            estimate,
            noisy_value,
            noise_scale,
            variance,
            ci95: (ci95_low, ci95_high),
            suppressed,
            suppression_reason,
            mechanism,
            mean,
        } = c;
        proto::Cell {
            alias,
            estimate,
            noisy_value,
            noise_scale,
            variance,
            ci95_low,
            ci95_high,
            suppressed,
            suppression_reason: suppression_reason.unwrap_or_default(),
            mechanism: mechanism
                .map_or(proto::NoiseMechanism::Unspecified, Into::into)
                .into(),
            mean: mean.map(Into::into),
        }
    }
}

impl From<Answer> for proto::AggregateResult {
    fn from(a: Answer) -> Self {
        let Answer {
            query_id,
            node_id,
            dataset,
            release:
                Release {
                    group_columns,
                    aliases,
                    rows,
                    epsilon_spent,
                    delta_spent,
                    rho_spent,
                    min_reportable_count,
                },
            epsilon_remaining,
            policy_version,
            scope,
            population_noisy,
            released_at_unix_ms,
            cached,
            total_kind,
        } = a;
        proto::AggregateResult {
            query_id,
            node_id,
            dataset,
            group_columns,
            aggregate_aliases: aliases,
            rows: rows
                .into_iter()
                .map(|Row { key, cells }| proto::ResultRow {
                    key,
                    cells: cells.into_iter().map(Into::into).collect(),
                })
                .collect(),
            epsilon_spent,
            epsilon_remaining,
            policy_version,
            release_scope: proto::ReleaseScope::from(scope).into(),
            cached,
            population_noisy,
            released_at_unix_ms,
            min_reportable_count,
            delta_spent,
            rho_spent,
            total_kind: total_kind
                .map_or(proto::TotalKind::Unspecified, Into::into)
                .into(),
        }
    }
}

// ---------------------------------------------------------------------------------
// Wire -> domain, with the checks an answer must pass on its own.

fn mechanism_of(m: i32) -> Option<Mechanism> {
    match proto::NoiseMechanism::try_from(m) {
        Ok(proto::NoiseMechanism::DiscreteLaplace) => Some(Mechanism::DiscreteLaplace),
        Ok(proto::NoiseMechanism::DiscreteGaussian) => Some(Mechanism::DiscreteGaussian),
        _ => None,
    }
}

fn cell_of(key: &[String], c: proto::Cell) -> Result<Cell, MalformedResult> {
    let proto::Cell {
        alias,
        estimate,
        noisy_value,
        noise_scale,
        variance,
        ci95_low,
        ci95_high,
        suppressed,
        suppression_reason,
        mechanism,
        mean,
    } = c;
    let at = |f: &str| format!("group {key:?} {alias}.{f}");
    finite(&at("estimate"), estimate)?;
    finite(&at("noisy_value"), noisy_value)?;
    non_negative(&at("variance"), variance)?;
    non_negative(&at("noise_scale"), noise_scale)?;
    finite(&at("ci95_low"), ci95_low)?;
    finite(&at("ci95_high"), ci95_high)?;
    let mean = match mean {
        None => None,
        Some(m) => {
            finite(&at("mean.noisy_sum"), m.noisy_sum)?;
            non_negative(&at("mean.sum_variance"), m.sum_variance)?;
            finite(&at("mean.noisy_count"), m.noisy_count)?;
            non_negative(&at("mean.count_variance"), m.count_variance)?;
            finite(&at("mean.centre"), m.centre)?;
            Some(MeanParts {
                noisy_sum: m.noisy_sum,
                sum_variance: m.sum_variance,
                noisy_count: m.noisy_count,
                count_variance: m.count_variance,
                centre: m.centre,
            })
        }
    };
    Ok(Cell {
        alias,
        estimate,
        noisy_value,
        noise_scale,
        variance,
        ci95: (ci95_low, ci95_high),
        suppressed,
        suppression_reason: (!suppression_reason.is_empty()).then_some(suppression_reason),
        // An unknown or unspecified mechanism is not an error (the figure and its
        // variance are still usable); its intervals become distribution-free.
        mechanism: mechanism_of(mechanism),
        mean,
    })
}

fn rows_of(
    group_columns: &[String],
    aliases: &[String],
    rows: Vec<proto::ResultRow>,
) -> Result<Vec<Row>, MalformedResult> {
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::with_capacity(rows.len());
    for (ri, row) in rows.into_iter().enumerate() {
        let proto::ResultRow { key, cells } = row;
        if key.len() != group_columns.len() {
            return Err(MalformedResult(format!(
                "row {ri} has {} key values for {} group columns",
                key.len(),
                group_columns.len()
            )));
        }
        if !seen.insert(key.clone()) {
            return Err(MalformedResult(format!("group {key:?} appears twice")));
        }
        if cells.len() != aliases.len() {
            return Err(MalformedResult(format!(
                "group {key:?} has {} cells for {} aggregates (missing cells)",
                cells.len(),
                aliases.len()
            )));
        }
        let mut decoded = Vec::with_capacity(cells.len());
        for (ci, (c, alias)) in cells.into_iter().zip(aliases).enumerate() {
            if c.alias != *alias {
                return Err(MalformedResult(format!(
                    "group {key:?}: cell {ci} is {:?}, but the answer's aggregate aliases say {alias:?}",
                    c.alias
                )));
            }
            decoded.push(cell_of(&key, c)?);
        }
        out.push(Row {
            key,
            cells: decoded,
        });
    }
    Ok(out)
}

impl TryFrom<proto::AggregateResult> for Answer {
    type Error = MalformedResult;

    fn try_from(r: proto::AggregateResult) -> Result<Self, Self::Error> {
        let proto::AggregateResult {
            query_id,
            node_id,
            dataset,
            group_columns,
            aggregate_aliases,
            rows,
            epsilon_spent,
            epsilon_remaining,
            policy_version,
            release_scope,
            cached,
            population_noisy,
            released_at_unix_ms,
            min_reportable_count,
            delta_spent,
            rho_spent,
            total_kind,
        } = r;
        non_negative("min_reportable_count", min_reportable_count)?;
        non_negative("epsilon_spent", epsilon_spent)?;
        non_negative("delta_spent", delta_spent)?;
        non_negative("rho_spent", rho_spent)?;
        finite("population_noisy", population_noisy)?;
        // Not checked for finiteness: a ledger without a cap reports infinity.
        if epsilon_remaining.is_nan() {
            return Err(MalformedResult("epsilon_remaining is not a number".into()));
        }
        let rows = rows_of(&group_columns, &aggregate_aliases, rows)?;
        let scope = match proto::ReleaseScope::try_from(release_scope) {
            Ok(proto::ReleaseScope::Standalone) => Scope::Standalone,
            // Unspecified or unknown scopes are read as the restrictive one.
            _ => Scope::SystemTotalOnly,
        };
        let total_kind = match proto::TotalKind::try_from(total_kind) {
            Ok(proto::TotalKind::DistinctPeople) => Some(TotalKind::DistinctPeople),
            Ok(proto::TotalKind::SumOfPartnerCounts) => Some(TotalKind::SumOfPartnerCounts),
            _ => None,
        };
        Ok(Answer {
            query_id,
            node_id,
            dataset,
            release: Release {
                group_columns,
                aliases: aggregate_aliases,
                rows,
                epsilon_spent,
                delta_spent,
                rho_spent,
                min_reportable_count,
            },
            epsilon_remaining,
            policy_version,
            scope,
            population_noisy,
            released_at_unix_ms,
            cached,
            total_kind,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn answer() -> Answer {
        Answer {
            query_id: "q1".into(),
            node_id: "A81001".into(),
            dataset: "gp_patients".into(),
            release: Release {
                group_columns: vec!["sex".into()],
                aliases: vec!["n".into(), "m".into()],
                rows: ["F", "M"]
                    .iter()
                    .map(|k| Row {
                        key: vec![k.to_string()],
                        cells: vec![
                            Cell {
                                alias: "n".into(),
                                estimate: 10.0,
                                noisy_value: 11.25,
                                noise_scale: 2.0,
                                variance: 8.0,
                                ci95: (5.0, 17.5),
                                suppressed: false,
                                suppression_reason: None,
                                mechanism: Some(Mechanism::DiscreteLaplace),
                                mean: None,
                            },
                            Cell {
                                alias: "m".into(),
                                estimate: 0.0,
                                noisy_value: 3.5,
                                noise_scale: 0.5,
                                variance: 0.25,
                                ci95: (2.5, 4.5),
                                suppressed: true,
                                suppression_reason: Some("below 10".into()),
                                mechanism: None,
                                mean: Some(MeanParts {
                                    noisy_sum: 35.0,
                                    sum_variance: 4.0,
                                    noisy_count: 10.0,
                                    count_variance: 2.0,
                                    centre: 1.5,
                                }),
                            },
                        ],
                    })
                    .collect(),
                epsilon_spent: 0.5,
                delta_spent: 1e-9,
                rho_spent: 0.0,
                min_reportable_count: 10.0,
            },
            epsilon_remaining: f64::INFINITY,
            policy_version: "abc".into(),
            scope: Scope::Standalone,
            population_noisy: 1234.0,
            released_at_unix_ms: 1_700_000_000_000,
            cached: true,
            total_kind: Some(TotalKind::DistinctPeople),
        }
    }

    #[test]
    fn an_answer_survives_the_wire_unchanged() {
        let a = answer();
        let wire = proto::AggregateResult::from(a.clone());
        assert_eq!(Answer::try_from(wire).unwrap(), a);
        let mut silent = a;
        silent.total_kind = None;
        let wire = proto::AggregateResult::from(silent.clone());
        assert_eq!(wire.total_kind, proto::TotalKind::Unspecified as i32);
        assert_eq!(Answer::try_from(wire).unwrap(), silent);
    }

    #[test]
    fn an_unspecified_scope_is_read_as_system_total_only() {
        let mut wire = proto::AggregateResult::from(answer());
        wire.release_scope = proto::ReleaseScope::Unspecified as i32;
        assert_eq!(
            Answer::try_from(wire).unwrap().scope,
            Scope::SystemTotalOnly
        );
    }

    #[test]
    fn malformed_answers_are_refused_naming_the_figure() {
        let check = |f: &dyn Fn(&mut proto::AggregateResult), needle: &str| {
            let mut r = proto::AggregateResult::from(answer());
            f(&mut r);
            let err = Answer::try_from(r).unwrap_err().0;
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        };
        check(
            &|r| r.rows[0].cells[0].noisy_value = f64::NAN,
            "n.noisy_value",
        );
        check(
            &|r| r.rows[0].cells[0].variance = -1.0,
            "variance is negative",
        );
        check(
            &|r| r.rows[0].cells[0].ci95_high = f64::INFINITY,
            "ci95_high",
        );
        check(
            &|r| {
                r.rows[0].cells.pop();
            },
            "missing cells",
        );
        check(
            &|r| r.rows[1].cells[1].mean.as_mut().unwrap().count_variance = -2.0,
            "count_variance",
        );
        check(&|r| r.rows[0].key.push("extra".into()), "key values");
        check(&|r| r.rows[1].key = vec!["F".into()], "twice");
        check(&|r| r.rows[0].cells[0].alias = "zz".into(), "cell 0");
        check(
            &|r| r.min_reportable_count = f64::NAN,
            "min_reportable_count",
        );
        check(&|r| r.delta_spent = -1e-9, "delta_spent");
        check(&|r| r.epsilon_remaining = f64::NAN, "epsilon_remaining");
    }
}
