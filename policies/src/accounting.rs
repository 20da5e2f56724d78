//! Privacy accounting: what one query costs a ledger, and what a period's releases
//! add up to. Pure arithmetic, shared by the decision (which plans the spend before
//! anything runs), the node's ledger (which composes it) and the engine (which noises
//! to exactly the planned amounts).
//!
//! A ledger holds three running sums per period: pure epsilon (discrete Laplace
//! releases and the key-selection share of thresholded queries), delta of the
//! thresholding events (each thresholded query may release a key held by one person
//! with probability up to its delta, whatever its epsilon, so those events add up
//! linearly), and zCDP rho of discrete Gaussian noise. Gaussian releases compose in
//! rho (additively, and far tighter than summing converted epsilons); the sum is
//! converted to (epsilon, delta) once, with the policy's delta, when the ledger is
//! read or checked. Basic composition then joins the three parts:
//! `epsilon = pure + eps(rho)` and `delta = thresholds + (rho > 0 ? delta_conv : 0)`.
//! `eps(rho)` is OpenDP's conversion ([`epsilon_of_rho`]); at ε = 1, δ = 1e-6 it lets a
//! query have 1.39× the ρ the classic bound allowed, so Gaussian noise 0.85× as wide.

use crate::model::Mechanism;
use opendp::combinators::ConcentratedMeasure as _;
use opendp::measures::ZeroConcentratedDivergence;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

/// The planned privacy cost of one query, before it runs.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
pub struct Spend {
    /// Pure epsilon-DP part: the whole query for the discrete Laplace; the
    /// key-selection share for a thresholded Gaussian query.
    pub epsilon: f64,
    /// Delta of thresholded key selection (0 when every group key has a declared
    /// domain).
    pub delta: f64,
    /// zCDP rho of the discrete Gaussian noise (0 for the discrete Laplace).
    pub rho: f64,
}

impl Spend {
    /// A spend that costs nothing (refusals).
    pub const ZERO: Spend = Spend {
        epsilon: 0.0,
        delta: 0.0,
        rho: 0.0,
    };

    /// Component-wise sum (basic composition for epsilon and delta, additive rho).
    pub fn plus(self, o: Spend) -> Spend {
        Spend {
            epsilon: self.epsilon + o.epsilon,
            delta: self.delta + o.delta,
            rho: self.rho + o.rho,
        }
    }

    /// Every component is finite and not negative.
    pub fn is_valid(self) -> bool {
        [self.epsilon, self.delta, self.rho]
            .iter()
            .all(|v| v.is_finite() && *v >= 0.0)
    }

    /// (epsilon, delta) of these releases taken together, with Gaussian rho converted
    /// once at `delta_conv`.
    pub fn effective(self, delta_conv: f64) -> (f64, f64) {
        if self.rho > 0.0 {
            (
                self.epsilon + epsilon_of_rho(self.rho, delta_conv),
                self.delta + delta_conv,
            )
        } else {
            (self.epsilon, self.delta)
        }
    }
}

/// A query's plan: what it spends, and how that is divided between its noisy
/// measurements and key selection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Planned {
    pub spend: Spend,
    /// How many equal shares ε is split into: the measurements (at least one) and,
    /// when keys are thresholded, key selection.
    pub shares: usize,
    /// ε of key selection (0 when no key is thresholded).
    pub key_selection: f64,
    /// Each measurement's budget in the mechanism's own measure: ε for the discrete
    /// Laplace, ρ for the discrete Gaussian (which composes in ρ).
    pub per_measurement: f64,
}

/// Plan what a query spends: an even split of `epsilon`, one share per measurement
/// (`measures`: the noisy vectors its aggregates are formed from; at least one) plus
/// one for key selection when keys are thresholded. Thresholding is
/// (share, delta)-DP; the rest is pure epsilon (discrete Laplace) or rho-zCDP
/// (discrete Gaussian, converted at `delta`, halved when thresholding also takes a
/// delta). The decision plans with this before the ledger is charged, and the engine
/// noises with it, so the two cannot disagree.
pub fn plan(
    mechanism: Mechanism,
    epsilon: f64,
    measurements: usize,
    thresholded: bool,
    delta: f64,
) -> Planned {
    let measurements = measurements.max(1);
    let shares = measurements + usize::from(thresholded);
    if !(epsilon.is_finite() && epsilon > 0.0) {
        return Planned {
            spend: Spend::ZERO,
            shares,
            key_selection: 0.0,
            per_measurement: 0.0,
        };
    }
    let share = epsilon / shares as f64;
    let key_selection = if thresholded { share } else { 0.0 };
    let spend = match mechanism {
        Mechanism::DiscreteLaplace => Spend {
            epsilon,
            delta: if thresholded { delta } else { 0.0 },
            rho: 0.0,
        },
        Mechanism::DiscreteGaussian => {
            let (delta_t, delta_conv) = if thresholded {
                (delta / 2.0, delta / 2.0)
            } else {
                (0.0, delta)
            };
            Spend {
                epsilon: key_selection,
                delta: delta_t,
                rho: if delta_conv > 0.0 && delta_conv < 1.0 {
                    rho_for(epsilon - key_selection, delta_conv)
                } else {
                    0.0
                },
            }
        }
    };
    let per_measurement = match mechanism {
        Mechanism::DiscreteLaplace => share,
        Mechanism::DiscreteGaussian => spend.rho / measurements as f64,
    };
    Planned {
        spend,
        shares,
        key_selection,
        per_measurement,
    }
}

/// ε of a ρ-zCDP release at δ, by OpenDP's conversion (`ZeroConcentratedDivergence`'s
/// privacy profile, the bound of Canonne, Kamath and Steinke 2020), which is never above
/// the classic ρ + 2√(ρ ln(1/δ)) (Bun and Steinke 2016, Proposition 1.3) and well below it
/// at the ρ and δ PHM queries use. Should OpenDP refuse the inputs, the classic bound,
/// always valid and looser, is what is returned: a spend is never under-counted.
pub fn epsilon_of_rho(rho: f64, delta: f64) -> f64 {
    static CACHE: Memo<(u64, u64), f64> = Memo::new(4096);
    CACHE.get_or((rho.to_bits(), delta.to_bits()), || {
        epsilon_of_rho_uncached(rho, delta)
    })
}

fn epsilon_of_rho_uncached(rho: f64, delta: f64) -> f64 {
    let classic = classic_epsilon_of_rho(rho, delta);
    if rho.is_nan() || rho <= 0.0 {
        return classic;
    }
    match ZeroConcentratedDivergence::convert(rho).and_then(|p| p.epsilon(delta)) {
        Ok(e) if e.is_finite() && e >= 0.0 && e <= classic => e,
        _ => classic,
    }
}

/// Bun and Steinke's conversion: ρ-zCDP implies (ρ + 2√(ρ ln(1/δ)), δ)-DP.
pub fn classic_epsilon_of_rho(rho: f64, delta: f64) -> f64 {
    rho + 2.0 * (rho * (1.0 / delta).ln()).sqrt()
}

/// The largest ρ whose conversion at `delta` ([`epsilon_of_rho`]) spends at most
/// `epsilon`, a hair under so rounding can never push the conversion over: found by
/// bisection between the classic bound's ρ, which the tighter conversion always allows,
/// and ε itself, more than any conversion allows.
pub fn rho_for(epsilon: f64, delta: f64) -> f64 {
    static CACHE: Memo<(u64, u64), f64> = Memo::new(4096);
    CACHE.get_or((epsilon.to_bits(), delta.to_bits()), || {
        rho_for_uncached(epsilon, delta)
    })
}

/// Remembered results of a pure, slow computation: OpenDP's conversions and searches
/// (a few milliseconds each), which a node repeats with the same few inputs on every
/// query of a policy. Keys are the inputs (floats by their bits); only successes are
/// kept; bounded, cleared when full.
pub struct Memo<K, V> {
    capacity: usize,
    map: OnceLock<Mutex<HashMap<K, V>>>,
}

impl<K: Eq + std::hash::Hash, V: Copy> Memo<K, V> {
    pub const fn new(capacity: usize) -> Memo<K, V> {
        Memo {
            capacity,
            map: OnceLock::new(),
        }
    }

    /// The remembered value for `key`, or `f`'s, remembered when it succeeds.
    pub fn get_or_try<E>(&self, key: K, f: impl FnOnce() -> Result<V, E>) -> Result<V, E> {
        let map = self.map.get_or_init(Default::default);
        if let Some(v) = map.lock().ok().and_then(|m| m.get(&key).copied()) {
            return Ok(v);
        }
        let v = f()?;
        if let Ok(mut m) = map.lock() {
            if m.len() >= self.capacity {
                m.clear();
            }
            m.insert(key, v);
        }
        Ok(v)
    }

    /// [`Memo::get_or_try`] for a computation that cannot fail.
    pub fn get_or(&self, key: K, f: impl FnOnce() -> V) -> V {
        match self.get_or_try::<std::convert::Infallible>(key, || Ok(f())) {
            Ok(v) => v,
            Err(never) => match never {},
        }
    }
}

fn rho_for_uncached(epsilon: f64, delta: f64) -> f64 {
    let l = (1.0 / delta).ln();
    let mut lo = ((l + epsilon).sqrt() - l.sqrt()).powi(2) * (1.0 - 1e-9);
    let mut hi = epsilon;
    if lo.is_nan() || lo <= 0.0 || hi.is_nan() || hi <= lo {
        return lo.max(0.0);
    }
    // ε(ρ) ≤ ε exactly when OpenDP's δ(ρ, ε) ≤ δ, and δ is one evaluation where ε is a
    // search of its own.
    let allowed = |rho: f64| {
        ZeroConcentratedDivergence::convert(rho)
            .and_then(|p| p.delta(epsilon))
            .is_ok_and(|d| d <= delta)
    };
    for _ in 0..64 {
        let mid = 0.5 * (lo + hi);
        if allowed(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
        if hi - lo <= lo * 1e-12 {
            break;
        }
    }
    lo * (1.0 - 1e-9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn period_labels_overlap_across_period_kinds() {
        use crate::{period_span, periods_overlap};
        assert!(periods_overlap("2026-11", "2026-Q4"));
        assert!(periods_overlap("2026-11-23", "2026-11"));
        assert!(periods_overlap("2026-12-31", "2026-Q4"));
        assert!(!periods_overlap("2026-09", "2026-Q4"));
        assert!(!periods_overlap("2026-10-31", "2026-11"));
        assert!(!periods_overlap("2025-Q4", "2026-Q4"));
        assert!(periods_overlap("garbage", "2026-Q4"), "fail closed");
        let (a, b) = period_span("2024-02").unwrap();
        assert_eq!(
            (a.to_string(), b.to_string()),
            ("2024-02-01".into(), "2024-02-29".into())
        );
        assert_eq!(period_span("2026-Q5"), None);
    }

    #[test]
    fn rho_round_trips_to_epsilon() {
        for (eps, delta) in [(0.1, 1e-9), (1.0, 1e-6), (5.0, 1e-12)] {
            let r = rho_for(eps, delta);
            let back = epsilon_of_rho(r, delta);
            assert!(back <= eps && back > eps * (1.0 - 1e-6), "{eps} {back}");
            // Tighter than the classic conversion: more ρ for the same ε.
            let classic = classic_epsilon_of_rho(r, delta);
            assert!(
                classic > back * 1.05,
                "{eps}: classic {classic}, OpenDP {back}"
            );
        }
    }

    #[test]
    fn gaussian_releases_compose_tighter_in_rho_than_in_epsilon() {
        // Ten Gaussian queries at epsilon 0.1 each: summing converted epsilons says
        // 1.0; composing rho and converting once says much less, at one delta.
        let delta = 1e-9;
        let one = Spend {
            rho: rho_for(0.1, delta),
            ..Spend::ZERO
        };
        let ten = (0..10).fold(Spend::ZERO, |acc, _| acc.plus(one));
        let (eps, d) = ten.effective(delta);
        assert!(eps < 0.5, "composed in rho: {eps}");
        assert_eq!(d, delta);
        // One query alone costs exactly what was asked.
        let (eps1, _) = one.effective(delta);
        assert!(eps1 <= 0.1 && (eps1 - 0.1).abs() < 1e-6, "{eps1}");
    }

    #[test]
    fn pure_parts_add_and_delta_counts_every_threshold_event() {
        let t = Spend {
            epsilon: 0.25,
            delta: 1e-9,
            rho: 0.0,
        };
        let total = (0..4).fold(Spend::ZERO, |acc, _| acc.plus(t));
        assert_eq!(total.effective(1e-9), (1.0, 4e-9));
        assert!(
            !Spend {
                epsilon: f64::NAN,
                ..Spend::ZERO
            }
            .is_valid()
        );
    }
}
