//! Calibrating and adding OpenDP noise to the exact bounded aggregates, then forming
//! cells with their uncertainty. Every sample comes from an OpenDP measurement; every
//! privacy loss reported is that measurement's own privacy map, checked against the
//! query's epsilon before anything is returned.
//!
//! What is noised is the query's *measurements* (`phm_policies::measures`), one OpenDP
//! measurement each, with an even split of the budget; every aggregate is then formed
//! from one or two of them (COUNT from rows per key, SUM from a sum vector, AVG from a
//! sum vector and a count vector), so shared figures are paid for once.
//!
//! Sensitivities, with m = max rows per person: adding or removing one person changes
//! a count vector by at most m in L1 and in L2 (all m rows may fall in one cell), a
//! vector of sums clamped to [lo, hi] by m * max(|lo|, |hi|) in both norms, and a vector
//! of sums of values centred on c (the lattice point at the middle of [lo, hi]) by
//! m * max(hi - c, c - lo), about m * (hi - lo) / 2.

use std::collections::HashMap;

use opendp::accuracy::{
    discrete_gaussian_scale_to_accuracy, discrete_laplacian_scale_to_accuracy,
    gaussian_scale_to_accuracy, laplacian_scale_to_accuracy,
};
use opendp::domains::{AtomDomain, MapDomain, VectorDomain};
use opendp::measurements::{make_gaussian, make_laplace, make_laplace_threshold};
use opendp::measures::{Approximate, MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::{AbsoluteDistance, L0PInfDistance, L1Distance, L2Distance};
use phm_policies::Limits;
use phm_policies::model::Mechanism;

use super::plan::Exact;
use super::post::{round, round_mean, suppression_reason};
use super::{Cell, EngineError, MeanParts, Release, Row};

/// Intervals are 95%.
const ALPHA: f64 = 0.05;
/// Standard normal quantile for a two-sided 95% interval (delta-method means).
const Z95: f64 = 1.959_963_984_540_054;
/// Slack allowed when comparing realised loss with the budget (floating point).
const EPS_SLACK: f64 = 1e-12;

fn noise_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Noise(e.to_string())
}

/// One noised vector: values, the distribution's scale, its variance and the half-width
/// of its 95% interval, and the privacy loss the measurement's map reports.
struct Noised<T> {
    values: Vec<T>,
    scale: f64,
    variance: f64,
    half_width: f64,
    loss: f64,
}

/// Raises `scale` from its closed-form value until OpenDP's privacy map reports a loss
/// within `budget` (the closed form can miss by a rounding error in the last bit).
fn calibrate(
    start: f64,
    budget: f64,
    loss_at: impl Fn(f64) -> Result<f64, EngineError>,
) -> Result<(f64, f64), EngineError> {
    if !(start.is_finite() && start > 0.0) {
        return Err(EngineError::Noise(format!(
            "noise scale {start} is not a positive number (budget {budget})"
        )));
    }
    let mut scale = start;
    for i in 0..200 {
        let loss = loss_at(scale)?;
        if loss <= budget {
            return Ok((scale, loss));
        }
        scale = if i < 16 {
            scale.next_up()
        } else {
            scale * (1.0 + 1e-12 * f64::from(1u32 << (i - 16).min(30)))
        };
    }
    Err(EngineError::Noise(format!(
        "could not calibrate noise to the budget {budget}"
    )))
}

fn discrete_laplace_variance(b: f64) -> f64 {
    let q = (-1.0 / b).exp();
    2.0 * q / ((1.0 - q) * (1.0 - q))
}

/// Noise for integer counts with sensitivity `m` under `budget` (epsilon for the
/// discrete Laplace, rho for the discrete Gaussian).
fn noise_counts(
    values: &[i64],
    m: i64,
    mechanism: Mechanism,
    budget: f64,
) -> Result<Noised<i64>, EngineError> {
    let domain = VectorDomain::new(AtomDomain::<i64>::default());
    match mechanism {
        Mechanism::DiscreteLaplace => {
            let make = |scale: f64| {
                make_laplace::<_, _, MaxDivergence>(
                    domain.clone(),
                    L1Distance::<i64>::default(),
                    scale,
                    None,
                )
                .map_err(noise_err)
            };
            let (scale, loss) = calibrate(m as f64 / budget, budget, |s| {
                make(s)?.map(&m).map_err(noise_err)
            })?;
            let values = make(scale)?.invoke(&values.to_vec()).map_err(noise_err)?;
            Ok(Noised {
                values,
                scale,
                variance: discrete_laplace_variance(scale),
                half_width: discrete_laplacian_scale_to_accuracy(scale, ALPHA)
                    .map_err(noise_err)?,
                loss,
            })
        }
        Mechanism::DiscreteGaussian => {
            let make = |scale: f64| {
                make_gaussian::<_, _, ZeroConcentratedDivergence>(
                    domain.clone(),
                    L2Distance::<i64>::default(),
                    scale,
                    None,
                )
                .map_err(noise_err)
            };
            let start = m as f64 / (2.0 * budget).sqrt();
            let (scale, loss) = calibrate(start, budget, |s| make(s)?.map(&m).map_err(noise_err))?;
            let values = make(scale)?.invoke(&values.to_vec()).map_err(noise_err)?;
            Ok(Noised {
                values,
                scale,
                // The discrete Gaussian's variance is just below sigma^2; report sigma^2.
                variance: scale * scale,
                half_width: discrete_gaussian_scale_to_accuracy(scale, ALPHA).map_err(noise_err)?,
                loss,
            })
        }
    }
}

/// Noise for real-valued sums with L1/L2 sensitivity `sens`. OpenDP samples these
/// exactly on a fine lattice (no naive floating-point Laplace).
fn noise_sums(
    values: &[f64],
    sens: f64,
    mechanism: Mechanism,
    budget: f64,
) -> Result<Noised<f64>, EngineError> {
    let domain = VectorDomain::new(AtomDomain::<f64>::new_non_nan()).with_size(values.len());
    match mechanism {
        Mechanism::DiscreteLaplace => {
            let make = |scale: f64| {
                make_laplace::<_, _, MaxDivergence>(
                    domain.clone(),
                    L1Distance::<f64>::default(),
                    scale,
                    None,
                )
                .map_err(noise_err)
            };
            let (scale, loss) = calibrate(sens / budget, budget, |s| {
                make(s)?.map(&sens).map_err(noise_err)
            })?;
            let values = make(scale)?.invoke(&values.to_vec()).map_err(noise_err)?;
            Ok(Noised {
                values,
                scale,
                variance: 2.0 * scale * scale,
                half_width: laplacian_scale_to_accuracy(scale, ALPHA).map_err(noise_err)?,
                loss,
            })
        }
        Mechanism::DiscreteGaussian => {
            let make = |scale: f64| {
                make_gaussian::<_, _, ZeroConcentratedDivergence>(
                    domain.clone(),
                    L2Distance::<f64>::default(),
                    scale,
                    None,
                )
                .map_err(noise_err)
            };
            let start = sens / (2.0 * budget).sqrt();
            let (scale, loss) =
                calibrate(start, budget, |s| make(s)?.map(&sens).map_err(noise_err))?;
            let values = make(scale)?.invoke(&values.to_vec()).map_err(noise_err)?;
            Ok(Noised {
                values,
                scale,
                variance: scale * scale,
                half_width: gaussian_scale_to_accuracy(scale, ALPHA).map_err(noise_err)?,
                loss,
            })
        }
    }
}

/// The noise scale for `epsilon` and the smallest threshold whose delta fits, for m
/// rows per person: a search through OpenDP's privacy map (a few dozen maps), the same
/// for every query with the same (m, ε, δ), so remembered. What is remembered is only
/// what the search found; the measurement's own map is still checked on every use.
///
/// The threshold is one above the smallest that OpenDP's map accepts: the map counts
/// the noise tail strictly above the threshold, but the mechanism also releases a key
/// whose noisy count equals it (opendp/opendp#2922), so the map at t − 1 is the true δ
/// at t.
fn threshold_parameters(
    m: i64,
    epsilon: f64,
    delta: f64,
    loss: impl Fn(f64, i64) -> Result<(f64, f64), EngineError>,
) -> Result<(f64, i64), EngineError> {
    static FOUND: Memo<(i64, u64, u64), (f64, i64)> = Memo::new(1024);
    FOUND.get_or_try((m, epsilon.to_bits(), delta.to_bits()), || {
        search_threshold(m, epsilon, delta, &loss)
    })
}

/// [`threshold_parameters`]' search.
fn search_threshold(
    m: i64,
    epsilon: f64,
    delta: f64,
    loss: &impl Fn(f64, i64) -> Result<(f64, f64), EngineError>,
) -> Result<(f64, i64), EngineError> {
    // The epsilon part does not depend on the threshold.
    let (scale, _) = calibrate(m as f64 / epsilon, epsilon, |s| Ok(loss(s, m)?.0))?;
    // Smallest threshold whose delta fits: grow until it does, then bisect.
    let mut hi = m.saturating_add((scale.ceil() as i64).max(1));
    let mut guard = 0;
    while loss(scale, hi)?.1 > delta {
        hi = hi.saturating_mul(2);
        guard += 1;
        if guard > 62 {
            return Err(EngineError::Noise(format!(
                "no threshold achieves delta {delta}"
            )));
        }
    }
    let mut lo = m;
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if loss(scale, mid)?.1 <= delta {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let threshold = (if loss(scale, lo)?.1 <= delta { lo } else { hi }) + 1;
    Ok((scale, threshold))
}

/// DP key selection for observed keys: OpenDP's Laplace threshold mechanism on the
/// per-key counts. Returns the positions of the keys released and the (epsilon, delta)
/// the measurement's map reports for one person (up to m rows in up to m keys).
fn threshold_keys(
    counts: &[i64],
    m: i64,
    epsilon: f64,
    delta: f64,
) -> Result<(Vec<usize>, f64, f64), EngineError> {
    let domain = MapDomain::new(AtomDomain::<u64>::default(), AtomDomain::<i64>::default());
    let metric = L0PInfDistance(AbsoluteDistance::<i64>::default());
    let l0 = u32::try_from(m).map_err(noise_err)?;
    let d_in = (l0, m, m);
    let make = |scale: f64, threshold: i64| {
        make_laplace_threshold::<_, _, Approximate<MaxDivergence>>(
            domain.clone(),
            metric.clone(),
            scale,
            threshold,
            None,
        )
        .map_err(noise_err)
    };
    let loss = |scale: f64, threshold: i64| make(scale, threshold)?.map(&d_in).map_err(noise_err);
    let (scale, threshold) = threshold_parameters(m, epsilon, delta, loss)?;
    let meas = make(scale, threshold)?;
    let (eps, _) = meas.map(&d_in).map_err(noise_err)?;
    // OpenDP 0.16's map understates δ: it keeps noisy counts *at or above* the
    // threshold but counts only the tail strictly above it (opendp/opendp#2922; our
    // privacy audit found the same). The δ of threshold t is the map's at t − 1.
    let (_, del) = loss(scale, threshold - 1)?;
    let data: HashMap<u64, i64> = counts
        .iter()
        .enumerate()
        .map(|(i, c)| (i as u64, *c))
        .collect();
    let kept = meas.invoke(&data).map_err(noise_err)?;
    let mut keep: Vec<usize> = kept
        .keys()
        .filter_map(|k| usize::try_from(*k).ok())
        .collect();
    keep.sort_unstable();
    Ok((keep, eps, del))
}

use phm_policies::accounting::{Memo, epsilon_of_rho};
use phm_policies::measures::{Formed, Measure, Measures, measures};

/// One noised measurement (`phm_policies::measures`): a count vector, or a sum vector
/// with the centre its values were shifted by.
enum Measured {
    Counts(Noised<i64>),
    Sums { noised: Noised<f64>, centre: f64 },
}

/// One aggregate's noisy figures, borrowed from the measurements it is formed from.
enum Noisy<'a> {
    Count(&'a Noised<i64>),
    Sum(&'a Noised<f64>),
    Mean {
        sum: &'a Noised<f64>,
        centre: f64,
        count: &'a Noised<i64>,
    },
}

/// Turn exact bounded aggregates into a differentially private release, in its steps:
/// check the limits, select thresholded keys, noise every measurement with OpenDP,
/// check the realised loss against the query's epsilon, then form each aggregate from
/// its measurements, round, suppress and form intervals from the noisy values only.
pub(crate) fn release_private(mut exact: Exact, limits: &Limits) -> Result<Release, EngineError> {
    check_limits(&exact, limits)?;
    let m = i64::from(limits.max_rows_per_person);
    let plan = measures(&exact.aggregates);
    // The decision charged the ledger with this same plan (an even split over the
    // measurements and key selection; `measures` says why even); noise to exactly it.
    let planned = phm_policies::accounting::plan(
        limits.mechanism,
        limits.epsilon,
        plan.len(),
        exact.thresholded,
        limits.delta,
    );
    let (threshold_eps, delta_rest) = select_keys(
        &mut exact,
        limits,
        m,
        planned.key_selection,
        planned.spend.delta,
    )?;
    let (vectors, loss_total) = noise_measures(&exact, &plan, limits, m, planned.per_measurement)?;
    let epsilon_spent = threshold_eps
        + match limits.mechanism {
            Mechanism::DiscreteLaplace => loss_total,
            Mechanism::DiscreteGaussian => epsilon_of_rho(loss_total, delta_rest),
        };
    if epsilon_spent.is_nan() || epsilon_spent > limits.epsilon + EPS_SLACK {
        return Err(EngineError::BudgetOverrun {
            spent: epsilon_spent,
            limit: limits.epsilon,
        });
    }
    let noisy = formed(&exact, &plan, &vectors)?;
    let rows = released_rows(&exact, limits, &noisy);
    let (delta_spent, rho_spent) = match limits.mechanism {
        Mechanism::DiscreteLaplace => (if exact.thresholded { limits.delta } else { 0.0 }, 0.0),
        Mechanism::DiscreteGaussian => (limits.delta, loss_total),
    };
    Ok(Release {
        group_columns: exact.group_columns,
        aliases: exact.aggregates.iter().map(|a| a.alias.clone()).collect(),
        rows,
        epsilon_spent,
        delta_spent,
        rho_spent,
        min_reportable_count: limits.min_reportable_count,
    })
}

/// The limits can be met at all: a positive epsilon, a usable delta where one is
/// needed, at least one aggregate.
fn check_limits(exact: &Exact, limits: &Limits) -> Result<(), EngineError> {
    let epsilon = limits.epsilon;
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Err(EngineError::InvalidLimits(format!(
            "epsilon {epsilon} is not a positive number"
        )));
    }
    let needs_delta = exact.thresholded || limits.mechanism == Mechanism::DiscreteGaussian;
    if needs_delta && !(limits.delta > 0.0 && limits.delta < 1.0) {
        return Err(EngineError::InvalidLimits(format!(
            "delta {} must be strictly between 0 and 1",
            limits.delta
        )));
    }
    if exact.aggregates.is_empty() {
        return Err(EngineError::InvalidLimits(
            "the query has no aggregates".into(),
        ));
    }
    Ok(())
}

/// Thresholded keys: keep those whose noisy count passes OpenDP's threshold for
/// the key-selection share and its planned delta `delta_t`. Returns the epsilon that
/// selection spent and the delta left for the Gaussian's conversion.
fn select_keys(
    exact: &mut Exact,
    limits: &Limits,
    m: i64,
    share: f64,
    delta_t: f64,
) -> Result<(f64, f64), EngineError> {
    if !exact.thresholded {
        return Ok((0.0, limits.delta));
    }
    let (keep, eps, del) = threshold_keys(&exact.counts, m, share, delta_t)?;
    if del > delta_t {
        return Err(EngineError::Noise(format!(
            "thresholding delta {del} exceeds its share {delta_t}"
        )));
    }
    exact.retain_keys(&keep);
    Ok((eps, limits.delta - delta_t))
}

fn missing_column(column: &str) -> EngineError {
    EngineError::InvalidLimits(format!("column `{column}` was not aggregated"))
}

/// The exact sums of `column` per key, each value minus the lattice point nearest the
/// middle of its bounds when `centred`, with the sensitivity of that vector and the
/// centre. `Σ(x − c) = Σx − c·n` is computed in lattice steps, so it is exact.
fn sum_vector(
    exact: &Exact,
    column: &str,
    centred: bool,
    m: i64,
) -> Result<(Vec<f64>, f64, f64), EngineError> {
    let v = exact.value(column).ok_or_else(|| missing_column(column))?;
    if !centred {
        return Ok((v.sums.clone(), v.sum_sensitivity(m), 0.0));
    }
    let l = &v.lattice;
    let c_units = i128::from(l.centre_units());
    let limit = 1i128 << 53;
    let sums = v
        .sums
        .iter()
        .zip(&v.counts)
        .map(|(&s, &n)| {
            // `s` is an exact multiple of the step below 2^53 steps (`exact_sum`).
            let units = (s * l.inv_step) as i128 - c_units * i128::from(n);
            if units.abs() > limit {
                return Err(EngineError::SumOverflow);
            }
            Ok(l.value_of(units as i64))
        })
        .collect::<Result<Vec<f64>, EngineError>>()?;
    Ok((
        sums,
        m as f64 * l.centred_max_abs(),
        l.value_of(l.centre_units()),
    ))
}

/// One OpenDP measurement per measure; returns the noised vectors and the summed
/// privacy loss in the mechanism's measure.
fn noise_measures(
    exact: &Exact,
    plan: &Measures,
    limits: &Limits,
    m: i64,
    unit: f64,
) -> Result<(Vec<Measured>, f64), EngineError> {
    let mut out = Vec::with_capacity(plan.len());
    let mut loss_total = 0.0;
    for measure in &plan.list {
        let measured = match measure {
            Measure::Rows => {
                Measured::Counts(noise_counts(&exact.counts, m, limits.mechanism, unit)?)
            }
            Measure::Values(column) => {
                let v = exact.value(column).ok_or_else(|| missing_column(column))?;
                Measured::Counts(noise_counts(&v.counts, m, limits.mechanism, unit)?)
            }
            Measure::Sum { column, centred } => {
                let (sums, sens, centre) = sum_vector(exact, column, *centred, m)?;
                Measured::Sums {
                    noised: noise_sums(&sums, sens, limits.mechanism, unit)?,
                    centre,
                }
            }
        };
        loss_total += match &measured {
            Measured::Counts(n) => n.loss,
            Measured::Sums { noised, .. } => noised.loss,
        };
        out.push(measured);
    }
    Ok((out, loss_total))
}

/// Each aggregate from its measurements. An AVG that shares the rows-per-key count
/// relies on load's `never_null` check; should the exact counts disagree anyway (a file
/// changed under the node), the query fails rather than divide by the wrong count.
fn formed<'a>(
    exact: &Exact,
    plan: &Measures,
    vectors: &'a [Measured],
) -> Result<Vec<Noisy<'a>>, EngineError> {
    let counts = |i: usize| match vectors.get(i) {
        Some(Measured::Counts(n)) => Ok(n),
        _ => Err(EngineError::Noise(format!(
            "measurement {i} is not a count"
        ))),
    };
    let sums = |i: usize| match vectors.get(i) {
        Some(Measured::Sums { noised, centre }) => Ok((noised, *centre)),
        _ => Err(EngineError::Noise(format!("measurement {i} is not a sum"))),
    };
    exact
        .aggregates
        .iter()
        .zip(&plan.formed)
        .map(|(a, f)| match f {
            Some(Formed::Count { rows }) => Ok(Noisy::Count(counts(*rows)?)),
            Some(Formed::Sum { sum }) => Ok(Noisy::Sum(sums(*sum)?.0)),
            Some(Formed::Mean { sum, count }) => {
                if let (Some(Measure::Rows), Some(c)) = (plan.list.get(*count), &a.column)
                    && exact
                        .value(&c.name)
                        .is_none_or(|v| v.counts != exact.counts)
                {
                    return Err(EngineError::InvalidLimits(format!(
                        "column `{}` is declared never_null but has empty values in the \
                         data now: reload the dataset",
                        c.name
                    )));
                }
                let (s, centre) = sums(*sum)?;
                Ok(Noisy::Mean {
                    sum: s,
                    centre,
                    count: counts(*count)?,
                })
            }
            None => Err(EngineError::InvalidLimits(format!(
                "aggregate `{}` cannot be computed",
                a.alias
            ))),
        })
        .collect()
}

/// Post-processing only: every row's cells rounded, suppressed and given intervals,
/// all from the noisy values.
fn released_rows(exact: &Exact, limits: &Limits, noisy: &[Noisy]) -> Vec<Row> {
    let mrc = limits.min_reportable_count;
    let reason = suppression_reason(mrc);
    let mut rows = Vec::with_capacity(exact.keys.len());
    for (k, key) in exact.keys.iter().enumerate() {
        let small = group_count(noisy, k).is_some_and(|c| c <= mrc);
        let cells = exact
            .aggregates
            .iter()
            .zip(noisy)
            .map(|(a, n)| {
                let mut cell = released_cell(&a.alias, n, k, limits, &reason);
                if small && !cell.suppressed {
                    cell.suppressed = true;
                    cell.suppression_reason = Some(reason.clone());
                }
                if cell.suppressed {
                    cell.estimate = 0.0;
                }
                cell
            })
            .collect();
        rows.push(Row {
            key: key.clone(),
            cells,
        });
    }
    rows
}

/// The group's noisy size, which decides suppression of every cell in it: the first
/// COUNT, else the first mean's count. (A query of SUMs alone has no count to judge by.)
fn group_count(noisy: &[Noisy], k: usize) -> Option<f64> {
    noisy
        .iter()
        .find_map(|n| match n {
            Noisy::Count(c) => c.values.get(k).map(|v| *v as f64),
            _ => None,
        })
        .or_else(|| {
            noisy.iter().find_map(|n| match n {
                Noisy::Mean { count, .. } => count.values.get(k).map(|v| *v as f64),
                _ => None,
            })
        })
}

fn released_cell(alias: &str, n: &Noisy, k: usize, limits: &Limits, reason: &str) -> Cell {
    let plain = |v: f64, estimate: f64, scale: f64, variance: f64, half: f64| Cell {
        alias: alias.to_string(),
        estimate,
        noisy_value: v,
        noise_scale: scale,
        variance,
        ci95: (v - half, v + half),
        suppressed: false,
        suppression_reason: None,
        mechanism: Some(limits.mechanism.into()),
        mean: None,
    };
    match n {
        Noisy::Count(c) => {
            let v = c.values.get(k).copied().unwrap_or(0) as f64;
            plain(
                v,
                round(limits.rounding, v.max(0.0)),
                c.scale,
                c.variance,
                c.half_width,
            )
        }
        Noisy::Sum(s) => {
            let v = s.values.get(k).copied().unwrap_or(0.0);
            plain(
                v,
                round(limits.rounding, v),
                s.scale,
                s.variance,
                s.half_width,
            )
        }
        Noisy::Mean { sum, centre, count } => {
            mean_cell(alias, sum, *centre, count, k, limits, reason)
        }
    }
}

/// A mean as `centre + noisy centred sum / noisy count`, with a delta-method variance
/// and interval (the centre is a constant: it adds no variance).
fn mean_cell(
    alias: &str,
    sum: &Noised<f64>,
    centre: f64,
    count: &Noised<i64>,
    k: usize,
    limits: &Limits,
    small_reason: &str,
) -> Cell {
    let mrc = limits.min_reportable_count;
    let mechanism = Some(limits.mechanism.into());
    let s = sum.values.get(k).copied().unwrap_or(0.0);
    let c = count.values.get(k).copied().unwrap_or(0) as f64;
    let parts = MeanParts {
        noisy_sum: s,
        sum_variance: sum.variance,
        noisy_count: c,
        count_variance: count.variance,
        centre,
    };
    if c <= 0.0 {
        return Cell {
            alias: alias.to_string(),
            estimate: 0.0,
            noisy_value: 0.0,
            noise_scale: 0.0,
            variance: 0.0,
            ci95: (0.0, 0.0),
            suppressed: true,
            suppression_reason: Some(
                "mean not estimable: the noisy number of values is zero or negative".into(),
            ),
            mechanism,
            mean: Some(parts),
        };
    }
    let mean = centre + s / c;
    let variance = sum.variance / (c * c) + s * s * count.variance / (c * c * c * c);
    let se = variance.sqrt();
    // The ratio's noise is close to a weighted sum of the parts' noises, whose tails
    // are no heavier than the heavier part's; with Laplace noise that is the Laplace's
    // own 95% multiplier ln(20)/√2 ≈ 2.12 sd. The normal's 1.96 would cover about 93.8%
    // of a mean whose sum noise dominates (it usually does).
    let z = match limits.mechanism {
        Mechanism::DiscreteLaplace => (1.0 / ALPHA).ln() / std::f64::consts::SQRT_2,
        Mechanism::DiscreteGaussian => Z95,
    };
    let suppressed = c <= mrc;
    Cell {
        alias: alias.to_string(),
        estimate: round_mean(mean),
        noisy_value: mean,
        noise_scale: se,
        variance,
        ci95: (mean - z * se, mean + z * se),
        suppressed,
        suppression_reason: suppressed.then(|| small_reason.to_string()),
        mechanism,
        mean: Some(parts),
    }
}

/// The noise of a linkage session: OpenDP's discrete Laplace (`make_laplace` over
/// `VectorDomain<AtomDomain<i64>>` with the L1 distance, at phm-link's scale) applied
/// to a zero vector, so each draw is OpenDP's sampler's. What it returns goes straight
/// into phm-link's clamped dummy and padding counts; it is never logged or kept.
#[derive(Debug, Default)]
pub struct LinkLaplace;

impl phm_link::LinkNoise for LinkLaplace {
    fn draw(
        &mut self,
        _purpose: phm_link::NoisePurpose,
        scale: f64,
        len: usize,
    ) -> Result<Vec<i64>, phm_link::NoiseError> {
        let err = |e: opendp::error::Error| phm_link::NoiseError(e.to_string());
        let m = make_laplace::<_, _, MaxDivergence>(
            VectorDomain::new(AtomDomain::<i64>::default()),
            L1Distance::<i64>::default(),
            scale,
            None,
        )
        .map_err(err)?;
        m.invoke(&vec![0i64; len]).map_err(err)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod link_noise_tests {
    use super::LinkLaplace;
    use phm_link::{ClampedLaplace, LinkNoise as _, NoisePurpose};

    /// The stated 95% interval of a linked count (released ± h) covers the truth as often
    /// as phm-link says, with OpenDP's own sampler: a linked count is the truth plus
    /// `clamp(Z)` exactly (the protocol's exact path is tested in phm-link), so the
    /// interval's coverage is the coverage of `clamp(Z)` drawn here. Tolerances are 5.5
    /// binomial (or normal) standard deviations: failure probability below 1e-7.
    #[test]
    fn opendp_draws_give_the_stated_coverage_mean_and_variance() {
        for epsilon in [0.9, 0.45] {
            let c = ClampedLaplace::calibrate(epsilon, 5e-10).unwrap();
            let acc = c.accuracy();
            assert!(
                (0.93..=0.97).contains(&acc.coverage_95),
                "stated coverage {} at epsilon {epsilon}",
                acc.coverage_95
            );
            let n = 20_000usize;
            let mu = i64::from(c.mu());
            let z = LinkLaplace.draw(NoisePurpose::Link, c.scale(), n).unwrap();
            let clamped: Vec<f64> = z.iter().map(|&z| z.clamp(-mu, mu) as f64).collect();
            let h = f64::from(acc.half_width_95);
            let covered = clamped.iter().filter(|z| z.abs() <= h).count() as f64 / n as f64;
            let p = acc.coverage_95;
            let sd = (p * (1.0 - p) / n as f64).sqrt();
            assert!(
                (covered - p).abs() <= 5.5 * sd,
                "epsilon {epsilon}: covered {covered}, stated {p}"
            );
            let mean = clamped.iter().sum::<f64>() / n as f64;
            assert!(
                mean.abs() <= 5.5 * (acc.variance / n as f64).sqrt(),
                "epsilon {epsilon}: mean error {mean}"
            );
            let var = clamped.iter().map(|z| z * z).sum::<f64>() / n as f64;
            // Var of the sample variance of a Laplace-like variable is about 5 sigma^4 / n.
            let var_sd = (5.0 * acc.variance * acc.variance / n as f64).sqrt();
            assert!(
                (var - acc.variance).abs() <= 5.5 * var_sd,
                "epsilon {epsilon}: variance {var}, stated {}",
                acc.variance
            );
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod measure_tests {
    //! The measurements behind a release (`phm_policies::measures`): which figures share
    //! a noisy vector, the noise each is given, and the centred mean's interval.
    use super::super::privacy_audit::{self as audit, age, agg};
    use super::*;
    use phm_policies::AggregateLimits;
    use phm_proto::AggregateKind;

    /// People per group; ages sum to 3600 (mean 40) in F and 4500 (mean 50) in M.
    const N: i64 = 90;
    const TRUE_MEANS: [f64; 2] = [40.0, 50.0];

    /// Two groups of N people (the audit's fixture), with `value_counts` ages known.
    fn exact(aggregates: Vec<AggregateLimits>, value_counts: [i64; 2]) -> Exact {
        let keys = [("F", N, 3600.0), ("M", N, 4500.0)];
        let mut e = audit::exact(&aggregates, &keys, false).unwrap();
        e.values[0].counts = value_counts.to_vec();
        e
    }

    /// The audit's limits (m = 1, discrete Laplace, nothing suppressed) at `epsilon`.
    fn limits(aggregates: &[AggregateLimits], epsilon: f64) -> Limits {
        let mut l = audit::limits(aggregates, false).unwrap();
        l.epsilon = epsilon;
        l
    }

    fn release(aggregates: Vec<AggregateLimits>, epsilon: f64) -> Release {
        let l = limits(&aggregates, epsilon);
        release_private(exact(aggregates, [N, N]), &l).unwrap()
    }

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() <= 1e-9 * b.abs().max(1.0)
    }

    /// A key held by one person (m rows in up to m keys) is released with probability
    /// `1 − (1 − P[Z ≥ T − m])^m`, Z discrete Laplace, T the threshold; that exact
    /// figure must be within the δ the query was given, and is what `threshold_keys`
    /// reports. OpenDP's own map reports less (opendp/opendp#2922): using its threshold
    /// as is fails this test.
    #[test]
    fn a_key_held_by_one_person_is_released_with_probability_at_most_delta() {
        for (m, epsilon, delta) in [(1i64, 0.5, 1e-3), (1, 1.0, 1e-9), (3, 0.5, 1e-6)] {
            let domain = MapDomain::new(AtomDomain::<u64>::default(), AtomDomain::<i64>::default());
            let metric = L0PInfDistance(AbsoluteDistance::<i64>::default());
            let d_in = (u32::try_from(m).unwrap(), m, m);
            let loss = |scale: f64, threshold: i64| {
                make_laplace_threshold::<_, _, Approximate<MaxDivergence>>(
                    domain.clone(),
                    metric.clone(),
                    scale,
                    threshold,
                    None,
                )
                .map_err(noise_err)?
                .map(&d_in)
                .map_err(noise_err)
            };
            let (scale, threshold) = threshold_parameters(m, epsilon, delta, loss).unwrap();
            let q = (-1.0 / scale).exp();
            let tail = q.powi((threshold - m) as i32) / (1.0 + q);
            let exact = 1.0 - (1.0 - tail).powi(m as i32);
            assert!(
                exact <= delta * (1.0 + 1e-9),
                "m {m}: exact {exact} > δ {delta}"
            );
            let (_, _, reported) = threshold_keys(&[1], m, epsilon, delta).unwrap();
            assert!(
                reported >= exact * (1.0 - 1e-6),
                "m {m}: reported δ {reported} below the exact {exact}"
            );
        }
    }

    #[test]
    fn count_sum_and_mean_of_one_column_are_two_measurements() {
        let r = release(
            vec![
                agg(AggregateKind::Count, None),
                agg(AggregateKind::Sum, Some(age(true))),
                agg(AggregateKind::Mean, Some(age(true))),
            ],
            1.0,
        );
        assert!(r.epsilon_spent <= 1.0 + 1e-12 && r.epsilon_spent >= 0.99);
        for row in &r.rows {
            let [n, s, m] = &row.cells[..] else {
                panic!("three cells")
            };
            // epsilon 1 over two measurements: b = 1 / 0.5 for the count, 110 / 0.5
            // for the sum.
            assert!(close(n.noise_scale, 2.0), "{}", n.noise_scale);
            assert!(close(s.noise_scale, 220.0), "{}", s.noise_scale);
            let p = m.mean.unwrap();
            assert_eq!(p.noisy_count, n.noisy_value, "the mean shares COUNT(*)");
            assert_eq!(p.noisy_sum, s.noisy_value, "the mean shares SUM(age)");
            assert_eq!(p.centre, 0.0);
        }
    }

    #[test]
    fn a_mean_without_its_sum_is_centred_on_the_middle_of_its_bounds() {
        let r = release(
            vec![
                agg(AggregateKind::Count, None),
                agg(AggregateKind::Mean, Some(age(true))),
            ],
            1.0,
        );
        for row in &r.rows {
            let p = row.cells[1].mean.unwrap();
            assert_eq!(p.centre, 55.0);
            assert_eq!(p.noisy_count, row.cells[0].noisy_value);
            // Sensitivity 110 / 2 at epsilon 0.5: b = 110, variance 2 b².
            assert!(
                close(p.sum_variance, 2.0 * 110.0 * 110.0),
                "{}",
                p.sum_variance
            );
        }
    }

    #[test]
    fn a_mean_of_a_column_that_may_be_null_noises_its_own_count() {
        let r = release(
            vec![
                agg(AggregateKind::Count, None),
                agg(AggregateKind::Mean, Some(age(false))),
            ],
            1.5,
        );
        for row in &r.rows {
            let p = row.cells[1].mean.unwrap();
            // Three measurements at 0.5 each: rows, centred sum, values.
            assert!(close(row.cells[0].noise_scale, 2.0));
            assert!(
                close(p.sum_variance, 2.0 * 110.0 * 110.0),
                "{}",
                p.sum_variance
            );
            assert!(close(p.count_variance, discrete_laplace_variance(2.0)));
        }
    }

    #[test]
    fn a_never_null_column_with_empty_values_fails_closed() {
        let aggs = vec![
            agg(AggregateKind::Count, None),
            agg(AggregateKind::Mean, Some(age(true))),
        ];
        let l = limits(&aggs, 1.0);
        let err = release_private(exact(aggs, [N - 1, N]), &l).unwrap_err();
        assert!(err.to_string().contains("never_null"), "{err}");
    }

    /// The centred mean's stated 95% interval covers the truth at least 95% of the
    /// time, and its stated variance is the realised one. 40,000 intervals: the
    /// coverage tolerance is 5.3 binomial sd (failure probability below 1e-7), which
    /// the normal multiplier 1.96 fails (it covers about 93.8% here); the variance's is
    /// 5.3 sd of a mean of squared Laplace-like errors (kurtosis 6: sd σ²·√(5/n)).
    #[test]
    fn the_centred_mean_covers_at_the_stated_rate_with_the_stated_variance() {
        let aggs = vec![
            agg(AggregateKind::Count, None),
            agg(AggregateKind::Mean, Some(age(true))),
        ];
        let l = limits(&aggs, 1.0);
        let (mut covered, mut samples, mut sq, mut stated) = (0usize, 0usize, 0.0, 0.0);
        for _ in 0..20_000 {
            let r = release_private(exact(aggs.clone(), [N, N]), &l).unwrap();
            for (row, truth) in r.rows.iter().zip(TRUE_MEANS) {
                let m = &row.cells[1];
                covered += usize::from(m.ci95.0 <= truth && truth <= m.ci95.1);
                sq += (m.noisy_value - truth).powi(2);
                stated += m.variance;
                samples += 1;
            }
        }
        let n = samples as f64;
        let coverage = covered as f64 / n;
        assert!(
            coverage >= 0.95 - 5.3 * (0.95 * 0.05 / n).sqrt(),
            "coverage {coverage}"
        );
        let (emp, stated) = (sq / n, stated / n);
        assert!(
            (emp - stated).abs() <= 5.3 * stated * (5.0 / n).sqrt(),
            "variance {emp}, stated {stated}"
        );
    }
}
