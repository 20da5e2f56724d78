//! An empirical privacy audit: run a release path on two neighbouring datasets many
//! times and lower-bound the ε it spends, to check that bound never exceeds the claim.
//!
//! The method is the one DP-Sniper (Bichsel et al., S&P 2021) and Delta-Siege (Lokna et
//! al., S&P 2023) make rigorous, for one-dimensional outputs: a pilot sample from each
//! dataset chooses an event `S` (the output at or above a threshold, or at or below it,
//! in either direction between the two datasets) that maximises the pilot's
//! likelihood ratio; a *fresh* sample of `trials` runs from each dataset then gives
//! Clopper–Pearson bounds `p ≥ p_lo` on `P[M(D) ∈ S]` and `q ≤ q_hi` on `P[M(D') ∈ S]`,
//! each at one-sided level `(1 − confidence) / 2`. An (ε, δ)-DP mechanism has
//! `p ≤ e^ε·q + δ`, so with the stated confidence
//!
//! `ε ≥ ln((p_lo − δ) / q_hi)`.
//!
//! A path passes when that lower bound is at most the claimed ε. The bound is also a
//! measure of how *tight* the claim is: a mechanism that spends much less than it claims
//! (an over-noised release, a budget charged twice) shows a bound far below its ε.
//!
//! This is a test of the implementation, not a proof: it can only catch a violation
//! that the chosen family of events exposes and that the sample is large enough to
//! see. Choosing D and D' to be the worst-case neighbours of the path (one person with
//! the largest contribution the policy allows) is the auditor's job.

use statrs::function::beta::checked_beta_reg;

/// What a release path claims to spend.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Claim {
    pub epsilon: f64,
    pub delta: f64,
}

/// The audit of one path.
#[derive(Debug, Clone, PartialEq)]
pub struct Finding {
    pub name: String,
    pub claim: Claim,
    /// ε lower bound at the stated confidence (0 when the event shows nothing).
    pub epsilon_lower: f64,
    pub event: String,
    /// Empirical `P[S]` on the dataset the event favours and on the other.
    pub p: f64,
    pub q: f64,
    pub trials: usize,
    pub confidence: f64,
}

impl Finding {
    /// The bound does not exceed the claim.
    pub fn passes(&self) -> bool {
        self.epsilon_lower <= self.claim.epsilon + 1e-12
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Side {
    AtLeast,
    AtMost,
}

#[derive(Debug, Clone, Copy)]
struct Event {
    side: Side,
    threshold: f64,
    /// The event favours the second dataset (D') rather than the first.
    flipped: bool,
}

impl Event {
    fn holds(&self, x: f64) -> bool {
        match self.side {
            Side::AtLeast => x >= self.threshold,
            Side::AtMost => x <= self.threshold,
        }
    }
}

/// `x` with `I_x(a, b) = target`, by bisection (I is increasing in x).
fn beta_quantile(target: f64, a: f64, b: f64) -> f64 {
    let (mut lo, mut hi) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (lo + hi);
        let v = checked_beta_reg(a, b, mid).unwrap_or(f64::NAN);
        if v < target {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    0.5 * (lo + hi)
}

/// Clopper–Pearson one-sided bounds on a binomial proportion from `k` of `n`, each at
/// level `a`: (lower, upper).
pub fn clopper_pearson(k: usize, n: usize, a: f64) -> (f64, f64) {
    let (kf, nf) = (k as f64, n as f64);
    let lower = if k == 0 {
        0.0
    } else {
        beta_quantile(a, kf, nf - kf + 1.0)
    };
    let upper = if k == n {
        1.0
    } else {
        beta_quantile(1.0 - a, kf + 1.0, nf - kf)
    };
    (lower, upper)
}

fn bound(k_p: usize, k_q: usize, n: usize, a: f64, delta: f64) -> f64 {
    let (p_lo, _) = clopper_pearson(k_p, n, a);
    let (_, q_hi) = clopper_pearson(k_q, n, a);
    if p_lo - delta <= 0.0 || q_hi <= 0.0 {
        return 0.0;
    }
    ((p_lo - delta) / q_hi).ln().max(0.0)
}

fn sample(n: usize, f: &mut impl FnMut() -> Result<f64, String>) -> Result<Vec<f64>, String> {
    (0..n).map(|_| f()).collect()
}

/// The pilot's best event: thresholds at the pooled pilot's quantiles (and every
/// distinct value when there are few), both sides, both directions.
fn choose(pilot_d: &[f64], pilot_d2: &[f64], delta: f64) -> Event {
    let mut pooled: Vec<f64> = pilot_d.iter().chain(pilot_d2).copied().collect();
    pooled.sort_by(f64::total_cmp);
    pooled.dedup();
    let candidates: Vec<f64> = if pooled.len() <= 400 {
        pooled
    } else {
        (1..400)
            .map(|i| pooled[i * (pooled.len() - 1) / 400])
            .collect()
    };
    let n = pilot_d.len().min(pilot_d2.len());
    let mut best = (
        f64::NEG_INFINITY,
        Event {
            side: Side::AtLeast,
            threshold: 0.0,
            flipped: false,
        },
    );
    for &t in &candidates {
        for side in [Side::AtLeast, Side::AtMost] {
            for flipped in [false, true] {
                let e = Event {
                    side,
                    threshold: t,
                    flipped,
                };
                let k1 = pilot_d[..n].iter().filter(|&&x| e.holds(x)).count();
                let k2 = pilot_d2[..n].iter().filter(|&&x| e.holds(x)).count();
                let (kp, kq) = if flipped { (k2, k1) } else { (k1, k2) };
                let b = bound(kp, kq, n, 0.025, delta);
                if b > best.0 {
                    best = (b, e);
                }
            }
        }
    }
    best.1
}

/// Audits one path: `d` and `d2` each run the real release once on the two neighbouring
/// datasets and return the output the event is over. `fixed` skips the pilot with the
/// event "output ≥ fixed, favouring D" (for an event too rare for a pilot to find, such
/// as a key held by one person being released at all).
pub fn audit(
    name: &str,
    claim: Claim,
    trials: usize,
    confidence: f64,
    fixed: Option<f64>,
    mut d: impl FnMut() -> Result<f64, String>,
    mut d2: impl FnMut() -> Result<f64, String>,
) -> Result<Finding, String> {
    if trials < 10 || !(0.5..1.0).contains(&confidence) {
        return Err(format!(
            "audit {name}: needs at least 10 trials and a confidence in [0.5, 1), got {trials} and {confidence}"
        ));
    }
    let event = match fixed {
        Some(threshold) => Event {
            side: Side::AtLeast,
            threshold,
            flipped: false,
        },
        None => {
            let pilot = (trials / 5).max(10);
            let (pd, pd2) = (sample(pilot, &mut d)?, sample(pilot, &mut d2)?);
            choose(&pd, &pd2, claim.delta)
        }
    };
    let (xd, xd2) = (sample(trials, &mut d)?, sample(trials, &mut d2)?);
    let k1 = xd.iter().filter(|&&x| event.holds(x)).count();
    let k2 = xd2.iter().filter(|&&x| event.holds(x)).count();
    let (kp, kq) = if event.flipped { (k2, k1) } else { (k1, k2) };
    let a = (1.0 - confidence) / 2.0;
    let side = match event.side {
        Side::AtLeast => "≥",
        Side::AtMost => "≤",
    };
    Ok(Finding {
        name: name.to_string(),
        claim,
        epsilon_lower: bound(kp, kq, trials, a, claim.delta),
        event: format!(
            "output {side} {} (favouring {})",
            event.threshold,
            if event.flipped { "D'" } else { "D" }
        ),
        p: kp as f64 / trials as f64,
        q: kq as f64 / trials as f64,
        trials,
        confidence,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn clopper_pearson_matches_known_values() {
        // 5 of 10 at two-sided 95% (2.5% each side): 0.1871 to 0.8129.
        let (lo, hi) = clopper_pearson(5, 10, 0.025);
        assert!((lo - 0.187_086).abs() < 1e-5 && (hi - 0.812_914).abs() < 1e-5);
        assert_eq!(clopper_pearson(0, 10, 0.025).0, 0.0);
        assert_eq!(clopper_pearson(10, 10, 0.025).1, 1.0);
    }

    /// A mechanism that spends twice what it claims is caught; the honest one passes
    /// with a bound near its ε (the audit is tight enough to matter).
    #[test]
    fn the_audit_catches_a_mechanism_spending_more_than_it_claims() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut laplace = move |b: f64| {
            let u: f64 = rng.gen_range(-0.5..0.5);
            -b * u.signum() * (1.0 - 2.0 * u.abs()).ln()
        };
        let claim = Claim {
            epsilon: 1.0,
            delta: 0.0,
        };
        let cell = std::cell::RefCell::new(&mut laplace);
        let honest = audit(
            "honest",
            claim,
            200_000,
            0.95,
            None,
            || Ok(cell.borrow_mut()(1.0)),
            || Ok(1.0 + cell.borrow_mut()(1.0)),
        )
        .unwrap();
        assert!(honest.passes(), "{honest:?}");
        assert!(honest.epsilon_lower > 0.8, "{honest:?}");
        let leaky = audit(
            "leaky",
            claim,
            200_000,
            0.95,
            None,
            || Ok(cell.borrow_mut()(0.5)),
            || Ok(1.0 + cell.borrow_mut()(0.5)),
        )
        .unwrap();
        assert!(!leaky.passes(), "{leaky:?}");
    }
}
