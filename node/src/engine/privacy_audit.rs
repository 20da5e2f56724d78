//! The release paths the empirical privacy audit runs (`phm_devkit::privacy_audit`),
//! each as the real code on two worst-case neighbouring inputs: the exact aggregates
//! of a dataset and of the same dataset with one more person contributing as much as
//! the policy allows, through `release_private` (OpenDP noise, key selection, rounding,
//! suppression), and the secure and linked modes' noise through the functions those
//! modes call. The coordinator's combine is added by the audit binary (it lives in
//! another crate).
//!
//! Built for tests (the CI smoke case) and, with the `bench` feature, for the audit
//! binary (`node/benches/privacy_audit.rs`, 10⁶ runs per dataset).

use std::cell::RefCell;

use phm_devkit::privacy_audit::Claim;
use phm_policies::model::{ColumnType, Mechanism, Rounding};
use phm_policies::{AggregateLimits, ColumnLimits, GroupDomain, GroupLimits, Limits};
use phm_proto::AggregateKind;

use super::clamp::Lattice;
use super::noise::release_private;
use super::plan::{Exact, ValueColumn};

/// One path: its claim, and a run on each neighbour returning the audited output.
pub struct AuditPath {
    pub name: &'static str,
    pub claim: Claim,
    /// A fixed event "output ≥ this, favouring D" instead of the pilot's choice.
    pub fixed_event: Option<f64>,
    pub d: Box<dyn FnMut() -> Result<f64, String>>,
    pub d2: Box<dyn FnMut() -> Result<f64, String>>,
}

const EPSILON: f64 = 1.0;

/// The audit's (and the noise tests') value column: age in [0, 110].
pub(crate) fn age(never_null: bool) -> ColumnLimits {
    ColumnLimits {
        name: "age".into(),
        column_type: ColumnType::Integer,
        bounds: Some((0.0, 110.0)),
        never_null,
    }
}

pub(crate) fn agg(kind: AggregateKind, column: Option<ColumnLimits>) -> AggregateLimits {
    AggregateLimits {
        alias: format!("{kind:?}").to_lowercase(),
        kind,
        column,
    }
}

/// One group (or, thresholded, observed keys), ages summing to `sum` over `n` people.
pub(crate) fn exact(
    aggregates: &[AggregateLimits],
    keys: &[(&str, i64, f64)],
    thresholded: bool,
) -> Result<Exact, String> {
    Ok(Exact {
        group_columns: vec!["g".into()],
        keys: keys.iter().map(|k| vec![k.0.to_string()]).collect(),
        thresholded,
        counts: keys.iter().map(|k| k.1).collect(),
        values: vec![ValueColumn {
            name: "age".into(),
            bounds: (0.0, 110.0),
            lattice: Lattice::for_bounds(0.0, 110.0)?,
            sums: keys.iter().map(|k| k.2).collect(),
            counts: keys.iter().map(|k| k.1).collect(),
        }],
        aggregates: aggregates.to_vec(),
    })
}

pub(crate) fn limits(aggregates: &[AggregateLimits], thresholded: bool) -> Result<Limits, String> {
    let g = GroupLimits {
        column: ColumnLimits {
            name: "g".into(),
            column_type: ColumnType::Text,
            bounds: None,
            never_null: false,
        },
        label: "g".into(),
        domain: if thresholded {
            GroupDomain::Thresholded
        } else {
            GroupDomain::Categories(vec!["a".into()])
        },
    };
    let mut l = phm_devkit::fixture::engine_limits("audit", vec![g], aggregates.to_vec(), EPSILON)?;
    l.max_rows_per_person = 1;
    l.mechanism = Mechanism::DiscreteLaplace;
    l.rounding = Rounding::None;
    l.min_reportable_count = 0.0;
    Ok(l)
}

/// A path through `release_private`: the output is cell `cell` of key `key` (its noisy
/// value, or its displayed estimate when `displayed`), or 1/0 for whether the key was
/// released at all when `presence`.
struct Release {
    limits: Limits,
    d: Exact,
    d2: Exact,
    key: &'static str,
    cell: usize,
    displayed: bool,
    presence: bool,
}

impl Release {
    /// The noisy value of cell 0 of key "a", the usual output.
    fn of(limits: Limits, d: Exact, d2: Exact) -> Release {
        Release {
            limits,
            d,
            d2,
            key: "a",
            cell: 0,
            displayed: false,
            presence: false,
        }
    }

    fn into_path(self, name: &'static str, claim: Claim) -> AuditPath {
        let self_presence = self.presence;
        let shared = std::rc::Rc::new(RefCell::new(self));
        let run = |second: bool| {
            let s = shared.clone();
            Box::new(move || {
                let s = s.borrow();
                let input = if second { s.d2.clone() } else { s.d.clone() };
                let r = release_private(input, &s.limits).map_err(|e| e.to_string())?;
                let row = r
                    .rows
                    .iter()
                    .find(|row| row.key.first().map(String::as_str) == Some(s.key));
                if s.presence {
                    return Ok(if row.is_some() { 1.0 } else { 0.0 });
                }
                let c = row
                    .and_then(|row| row.cells.get(s.cell))
                    .ok_or_else(|| format!("{name}: no cell {} in key {}", s.cell, s.key))?;
                Ok(if s.displayed {
                    c.estimate
                } else {
                    c.noisy_value
                })
            }) as Box<dyn FnMut() -> Result<f64, String>>
        };
        AuditPath {
            name,
            claim,
            fixed_event: self_presence.then_some(1.0),
            d: run(false),
            d2: run(true),
        }
    }
}

fn pure(epsilon: f64) -> Claim {
    Claim {
        epsilon,
        delta: 0.0,
    }
}

/// One node's COUNT release of a single key "a" holding `count` people, at ε = 1: the
/// coordinator's combine path (in the audit binary) combines two of these.
pub fn count_release(count: i64) -> Result<phm_proto::result::Release, String> {
    let aggs = [agg(AggregateKind::Count, None)];
    let l = limits(&aggs, false)?;
    release_private(exact(&aggs, &[("a", count, 0.0)], false)?, &l).map_err(|e| e.to_string())
}

/// Every audited path of the node, at ε = 1 (see each for its neighbours).
pub fn paths() -> Result<Vec<AuditPath>, String> {
    let mut out = Vec::new();
    let count = [agg(AggregateKind::Count, None)];
    // COUNT: 90 people, then one more.
    out.push(
        Release::of(
            limits(&count, false)?,
            exact(&count, &[("a", 90, 3600.0)], false)?,
            exact(&count, &[("a", 91, 3600.0)], false)?,
        )
        .into_path("count (discrete Laplace)", pure(EPSILON)),
    );
    // COUNT with m = 3: the new person has three rows, all in the cell.
    let mut l3 = limits(&count, false)?;
    l3.max_rows_per_person = 3;
    out.push(
        Release::of(
            l3,
            exact(&count, &[("a", 90, 3600.0)], false)?,
            exact(&count, &[("a", 93, 3600.0)], false)?,
        )
        .into_path("count, 3 rows per person", pure(EPSILON)),
    );
    // SUM(age): the new person is 110, the bound.
    let sum = [agg(AggregateKind::Sum, Some(age(false)))];
    out.push(
        Release::of(
            limits(&sum, false)?,
            exact(&sum, &[("a", 90, 3600.0)], false)?,
            exact(&sum, &[("a", 91, 3710.0)], false)?,
        )
        .into_path("sum (Laplace on the lattice)", pure(EPSILON)),
    );
    // COUNT and AVG(age) of a never-null column: shared count, centred sum; the new
    // person is 110, as far from the centre 55 as a value can be.
    let mean = [
        agg(AggregateKind::Count, None),
        agg(AggregateKind::Mean, Some(age(true))),
    ];
    out.push(
        Release {
            cell: 1,
            ..Release::of(
                limits(&mean, false)?,
                exact(&mean, &[("a", 90, 3600.0)], false)?,
                exact(&mean, &[("a", 91, 3710.0)], false)?,
            )
        }
        .into_path("mean (centred sum / shared count)", pure(EPSILON)),
    );
    // Rounding to 5 and suppression at 7, after noise: the displayed figure of a group
    // of 8, then 9.
    let mut lr = limits(&count, false)?;
    lr.rounding = Rounding::Nearest5;
    lr.min_reportable_count = 7.0;
    out.push(
        Release {
            displayed: true,
            ..Release::of(
                lr,
                exact(&count, &[("a", 8, 0.0)], false)?,
                exact(&count, &[("a", 9, 0.0)], false)?,
            )
        }
        .into_path("rounding and suppression after noise", pure(EPSILON)),
    );
    // Thresholded keys: a key held by one person, then absent. δ = 1e-3 so that a
    // threshold too low for its δ would be seen in 10⁶ runs.
    let mut lt = limits(&count, true)?;
    lt.delta = 1e-3;
    out.push(
        Release {
            key: "z",
            presence: true,
            ..Release::of(
                lt,
                exact(&count, &[("a", 500, 0.0), ("z", 1, 0.0)], true)?,
                exact(&count, &[("a", 500, 0.0)], true)?,
            )
        }
        .into_path(
            "thresholded key selection",
            Claim {
                epsilon: EPSILON,
                delta: 1e-3,
            },
        ),
    );
    // The discrete Gaussian (ρ from ε = 1 at δ = 1e-6 by OpenDP's conversion).
    let mut lg = limits(&count, false)?;
    lg.mechanism = Mechanism::DiscreteGaussian;
    lg.delta = 1e-6;
    out.push(
        Release::of(
            lg,
            exact(&count, &[("a", 90, 0.0)], false)?,
            exact(&count, &[("a", 91, 0.0)], false)?,
        )
        .into_path(
            "count (discrete Gaussian, zCDP)",
            Claim {
                epsilon: EPSILON,
                delta: 1e-6,
            },
        ),
    );
    out.push(secure_path()?);
    out.push(linked_path()?);
    Ok(out)
}

/// Secure mode: the fewest noise shares a session can end with (t_noise − c = 3 of 5
/// members adding OpenDP discrete Gaussian shares calibrated by phm-secagg's
/// accountant), summed on the lattice with the exact count, 90 then 91.
fn secure_path() -> Result<AuditPath, String> {
    use phm_secagg::accountant::{Cohort, NoiseTarget, calibrate};
    let delta = 1e-6;
    let cohort = Cohort {
        n: 5,
        t_noise: 4,
        c: 1,
    };
    let target = NoiseTarget {
        rho: phm_policies::accounting::rho_for(EPSILON, delta),
        delta1: 1.0,
        delta2: 1.0,
        dim: 1,
    };
    let cal = calibrate(cohort, &target).map_err(|e| e.to_string())?;
    let shares = (cohort.t_noise - cohort.c) as usize;
    let run = move |count: i64| {
        Box::new(move || {
            let mut total = 0i64;
            for i in 0..shares {
                // The exact figure is in one member's input; the others add noise only.
                let units = [if i == 0 { count } else { 0 }];
                let s = super::secure::noisy_share(&units, cal.lattice, cal.sigma_share)
                    .map_err(|e| e.to_string())?;
                total += s.first().copied().unwrap_or(0);
            }
            Ok(total as f64 / cal.lattice as f64)
        }) as Box<dyn FnMut() -> Result<f64, String>>
    };
    Ok(AuditPath {
        name: "secure sum (shares of the discrete Gaussian)",
        claim: Claim {
            epsilon: EPSILON,
            delta,
        },
        fixed_event: None,
        d: run(90),
        d2: run(91),
    })
}

/// Linked mode: a linked count is the truth plus phm-link's clamped discrete Laplace
/// (OpenDP's draws, `LinkLaplace`), 10 then 11, at phm-link's calibration for ε = 1
/// and δ = 1e-6.
fn linked_path() -> Result<AuditPath, String> {
    use phm_link::{ClampedLaplace, LinkNoise as _, NoisePurpose};
    let delta = 1e-6;
    let c = ClampedLaplace::calibrate(EPSILON, delta).map_err(|e| e.to_string())?;
    let (scale, mu) = (c.scale(), i64::from(c.mu()));
    let run = move |truth: i64| {
        Box::new(move || {
            let z = super::noise::LinkLaplace
                .draw(NoisePurpose::Link, scale, 1)
                .map_err(|e| e.to_string())?;
            Ok((truth + z.first().copied().unwrap_or(0).clamp(-mu, mu)) as f64)
        }) as Box<dyn FnMut() -> Result<f64, String>>
    };
    Ok(AuditPath {
        name: "linked count (clamped discrete Laplace)",
        claim: Claim {
            epsilon: EPSILON,
            delta,
        },
        fixed_event: None,
        d: run(10),
        d2: run(11),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use phm_devkit::privacy_audit::audit;

    /// CI's smoke case: every path, 4,000 runs per dataset, at a confidence of
    /// 1 − 1e-7 (so a correct path fails with probability below 1e-7). The full audit,
    /// 10⁶ runs at 95%, is `cargo bench -p phm-node --features bench --bench
    /// privacy_audit`.
    #[test]
    fn no_release_path_spends_more_than_it_claims() {
        for p in paths().unwrap() {
            let f = audit(p.name, p.claim, 4_000, 1.0 - 1e-7, p.fixed_event, p.d, p.d2).unwrap();
            assert!(f.passes(), "{f:?}");
        }
    }
}
