//! Post-processing of noisy values (rounding, small-count suppression, display of
//! means) and the exact, noise-free release used by tests and benchmarks. None of this
//! touches the data, so none of it costs privacy budget.

use phm_policies::Limits;
use phm_policies::model::Rounding;
use phm_proto::AggregateKind;

use super::plan::Exact;
use super::{Cell, MeanParts, Release, Row};

/// Rounds a displayable count or sum the way the policy says.
pub(crate) fn round(rounding: Rounding, x: f64) -> f64 {
    match rounding {
        Rounding::None => x,
        Rounding::Nearest5 => (x / 5.0).round() * 5.0,
        Rounding::Nearest10 => (x / 10.0).round() * 10.0,
        // OpenSAFELY midpoint-6: 1..=6 -> 3, 7..=12 -> 9, ...; 0 stays 0.
        Rounding::Midpoint6 => {
            if x == 0.0 {
                0.0
            } else {
                let sign = x.signum();
                sign * ((x.abs() / 6.0).ceil() * 6.0 - 3.0)
            }
        }
    }
}

/// Means are shown to one decimal place.
pub(crate) fn round_mean(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

/// The sentence shown for a suppressed cell.
pub(crate) fn suppression_reason(min_reportable_count: f64) -> String {
    format!(
        "fewer than {} (at or below the minimum reportable count {})",
        min_reportable_count.floor() + 1.0,
        min_reportable_count
    )
}

/// The same cells as a private release, with exact values and no noise, rounding or
/// small-count suppression.
pub(crate) fn release_exact(exact: Exact, limits: &Limits) -> Release {
    let mut rows = Vec::with_capacity(exact.keys.len());
    for (k, key) in exact.keys.iter().enumerate() {
        let n = exact.counts.get(k).copied().unwrap_or(0) as f64;
        let cells = exact
            .aggregates
            .iter()
            .map(|a| {
                let parts = a
                    .column
                    .as_ref()
                    .and_then(|c| exact.value(&c.name))
                    .map(|v| {
                        (
                            v.sums.get(k).copied().unwrap_or(0.0),
                            v.counts.get(k).copied().unwrap_or(0) as f64,
                        )
                    });
                match (a.kind, parts) {
                    (AggregateKind::Sum, Some((s, _))) => exact_cell(&a.alias, s, None),
                    (AggregateKind::Mean, Some((s, c))) if c > 0.0 => {
                        exact_cell(&a.alias, s / c, Some((s, c)))
                    }
                    (AggregateKind::Mean, Some((s, c))) => {
                        let mut cell = exact_cell(&a.alias, 0.0, Some((s, c)));
                        cell.suppressed = true;
                        cell.suppression_reason = Some("no values in this group".into());
                        cell
                    }
                    _ => exact_cell(&a.alias, n, None),
                }
            })
            .collect();
        rows.push(Row {
            key: key.clone(),
            cells,
        });
    }
    Release {
        group_columns: exact.group_columns,
        aliases: limits.aggregates.iter().map(|a| a.alias.clone()).collect(),
        rows,
        epsilon_spent: 0.0,
        delta_spent: 0.0,
        rho_spent: 0.0,
        min_reportable_count: limits.min_reportable_count,
    }
}

fn exact_cell(alias: &str, value: f64, mean: Option<(f64, f64)>) -> Cell {
    Cell {
        alias: alias.to_string(),
        estimate: value,
        noisy_value: value,
        noise_scale: 0.0,
        variance: 0.0,
        ci95: (value, value),
        suppressed: false,
        suppression_reason: None,
        // Exact figures carry no noise at all.
        mechanism: None,
        mean: mean.map(|(s, c)| MeanParts {
            noisy_sum: s,
            sum_variance: 0.0,
            noisy_count: c,
            count_variance: 0.0,
        }),
    }
}
