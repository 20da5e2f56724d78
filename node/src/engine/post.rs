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
            centre: 0.0,
        }),
    }
}

/// The stricter of two rounding rules: the coarser grid.
pub fn stricter_rounding(a: Rounding, b: Rounding) -> Rounding {
    let rank = |r: Rounding| match r {
        Rounding::None => 0,
        Rounding::Nearest5 => 1,
        Rounding::Midpoint6 => 2,
        Rounding::Nearest10 => 3,
    };
    if rank(a) >= rank(b) { a } else { b }
}

/// What a linked release is shown under: the stricter of both nodes' rules.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkedRules {
    pub min_reportable_count: f64,
    pub rounding: Rounding,
    /// Total epsilon and delta the session spent at this node.
    pub epsilon: f64,
    pub delta: f64,
}

/// The anchor's release of one linkage session: one COUNT cell per declared key, the
/// noisy linked count (`c_g + clamp(Z_g)`, the partner's noise) with its exact variance
/// and 95% interval, then small-count suppression and rounding as for any count. This
/// is post-processing of already-noised values, so it costs nothing.
pub fn release_linked(
    group_columns: Vec<String>,
    keys: Vec<Vec<String>>,
    alias: &str,
    counts: &phm_link::LinkedCounts,
    rules: LinkedRules,
) -> Release {
    let mrc = rules.min_reportable_count;
    let reason = suppression_reason(mrc);
    let half = f64::from(counts.accuracy.half_width_95);
    let rows = keys
        .into_iter()
        .zip(&counts.released)
        .map(|(key, &v)| {
            let v = v as f64;
            let small = v <= mrc;
            Row {
                key,
                cells: vec![Cell {
                    alias: alias.to_string(),
                    estimate: if small { 0.0 } else { round(rules.rounding, v) },
                    noisy_value: v,
                    noise_scale: counts.noise_scale,
                    variance: counts.accuracy.variance,
                    ci95: (v - half, v + half),
                    suppressed: small,
                    suppression_reason: small.then(|| reason.clone()),
                    mechanism: Some(phm_proto::result::Mechanism::DiscreteLaplace),
                    mean: None,
                }],
            }
        })
        .collect();
    Release {
        group_columns,
        aliases: vec![alias.to_string()],
        rows,
        epsilon_spent: rules.epsilon,
        delta_spent: rules.delta,
        rho_spent: 0.0,
        min_reportable_count: mrc,
    }
}
