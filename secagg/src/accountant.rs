//! The distributed discrete Gaussian (DDG) accountant: pure math, no sampling.
//!
//! Kairouz, Liu and Steinke (ICML 2021, arXiv 2102.06387, Thm 1 / Prop 14, as coded in
//! google-research/federated `distributed_dp/accounting_utils.py::compute_rdp_dgaussian`):
//! for n honest summands X_i ~ N_Z(0, σ²)^d with σ ≥ ½ (lattice units) and neighbouring
//! inputs with ‖Δ‖₁ ≤ Δ₁, ‖Δ‖₂ ≤ Δ₂, let s₂ = Δ₂/(√n σ), s₁ = Δ₁/(√n σ) and
//! τ = 10·Σ_{k=1}^{n−1} exp(−2π²σ²·k/(k+1)). Then the sum is ρ-zCDP with
//!
//! ρ = ½·min{ s₂² + 2τd,  s₂² + 2s₁τ + τ²d,  (s₂ + τ√d)² }.
//!
//! The central bound is s₂²/2; the τ terms are the price of the sum of discrete Gaussians
//! not being a discrete Gaussian. τ is about 10·e^{−π²σ²}, negligible once σ ≥ 2 lattice
//! units, which is why [`calibrate`] scales the lattice until g·σ_share ≥ 4.

use crate::error::SecAggError;

/// Smallest σ (lattice units) for which KLS21's bound is stated.
pub const MIN_SIGMA: f64 = 0.5;

/// Lattice units g·σ_share that [`calibrate`] aims for (secagg.md §c): the smallest power
/// of two g reaching it makes τ < 1e-60, so the distributed noise costs nothing in ρ.
pub const TARGET_LATTICE_SIGMA: f64 = 4.0;

/// Largest lattice factor [`calibrate`] will choose (2^20): beyond it, the inputs' range
/// 2^62 / N would start to bind for realistic counts.
pub const MAX_LATTICE: u64 = 1 << 20;

/// KLS21's τ for n summands of σ (lattice units).
pub fn tau(n: u32, sigma: f64) -> Result<f64, SecAggError> {
    check_sigma(sigma)?;
    if n == 0 {
        return Err(SecAggError::AccountantInput("n must be at least 1".into()));
    }
    let c = 2.0 * std::f64::consts::PI.powi(2) * sigma * sigma;
    // Terms fall geometrically after k = 1, but n ≤ a few hundred, so summing all is cheap
    // and matches the reference accountant term for term.
    let sum: f64 = (1..n)
        .map(|k| {
            let k = f64::from(k);
            (-c * k / (k + 1.0)).exp()
        })
        .sum();
    Ok(10.0 * sum)
}

/// ρ (zCDP) of the sum of `n` honest discrete Gaussian shares of `sigma` (lattice units)
/// on `d` coordinates, for sensitivities `delta1`, `delta2` (lattice units).
pub fn rho_ddg(n: u32, sigma: f64, d: u32, delta1: f64, delta2: f64) -> Result<f64, SecAggError> {
    if d == 0 {
        return Err(SecAggError::AccountantInput("d must be at least 1".into()));
    }
    if !(delta1.is_finite() && delta1 >= 0.0 && delta2.is_finite() && delta2 >= 0.0) {
        return Err(SecAggError::AccountantInput(
            "sensitivities must be finite and non-negative".into(),
        ));
    }
    let t = tau(n, sigma)?;
    let root_n_sigma = f64::from(n).sqrt() * sigma;
    let s2 = delta2 / root_n_sigma;
    let s1 = delta1 / root_n_sigma;
    let d = f64::from(d);
    let a = s2 * s2 + 2.0 * t * d;
    let b = s2 * s2 + 2.0 * s1 * t + t * t * d;
    let c = (s2 + t * d.sqrt()).powi(2);
    Ok(0.5 * a.min(b).min(c))
}

fn check_sigma(sigma: f64) -> Result<(), SecAggError> {
    if !sigma.is_finite() {
        return Err(SecAggError::AccountantInput("σ must be finite".into()));
    }
    if sigma < MIN_SIGMA {
        return Err(SecAggError::SigmaTooSmall(sigma));
    }
    Ok(())
}

/// What the noise must achieve, in *original integer units* (persons, γ-steps).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NoiseTarget {
    /// The zCDP budget of this release (from the policy's (ε, δ) via
    /// `phm_policies::rho_for`, the conversion PLAIN mode uses).
    pub rho: f64,
    /// ‖Δ‖₁ bound of one person's contribution.
    pub delta1: f64,
    /// ‖Δ‖₂ bound of one person's contribution.
    pub delta2: f64,
    /// Coordinates in the vector.
    pub dim: u32,
}

/// The survivor range the noise must cover.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cohort {
    /// N.
    pub n: u32,
    /// Fewest survivors (|U3|) ever unmasked.
    pub t_noise: u32,
    /// Survivors assumed to add no noise (colluding with the coordinator).
    pub c: u32,
}

/// A calibrated noise share.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Calibration {
    /// The lattice factor g (a power of two).
    pub lattice: u64,
    /// σ of each node's share in lattice units (what the engine's discrete Gaussian uses).
    pub sigma_share: f64,
    /// The largest ρ over every survivor count s ∈ [t_noise, N]; never above the target.
    pub rho_worst: f64,
    /// σ_c = Δ₂/√(2ρ): a central release's σ (original units), for comparison.
    pub sigma_central: f64,
}

impl Calibration {
    /// σ_share in original units (σ_share / g).
    pub fn sigma_share_units(&self) -> f64 {
        self.sigma_share / self.lattice as f64
    }

    /// Predicted standard deviation of the decoded total (original units) with `survivors`
    /// noisy summands: √s·σ_share/g.
    pub fn total_sd(&self, survivors: u32) -> f64 {
        f64::from(survivors).sqrt() * self.sigma_share_units()
    }
}

/// The largest ρ over every survivor count s ∈ [t_noise, N] (with s − c honest summands)
/// for shares of `sigma` on lattice `g`; sensitivities scale with g.
pub fn rho_worst(
    cohort: Cohort,
    target: &NoiseTarget,
    lattice: u64,
    sigma: f64,
) -> Result<f64, SecAggError> {
    check_cohort(cohort)?;
    let g = lattice as f64;
    let mut worst = 0.0f64;
    for s in cohort.t_noise..=cohort.n {
        let honest = s - cohort.c;
        let rho = rho_ddg(
            honest,
            sigma,
            target.dim,
            g * target.delta1,
            g * target.delta2,
        )?;
        worst = worst.max(rho);
    }
    Ok(worst)
}

fn check_cohort(cohort: Cohort) -> Result<(), SecAggError> {
    if cohort.t_noise == 0 || cohort.t_noise > cohort.n || cohort.c >= cohort.t_noise {
        return Err(SecAggError::AccountantInput(format!(
            "need c < t_noise ≤ N; got c = {}, t_noise = {}, N = {}",
            cohort.c, cohort.t_noise, cohort.n
        )));
    }
    Ok(())
}

/// Choose g and σ_share (secagg.md §c): σ_c = Δ₂/√(2ρ); σ_share = σ_c/√(t_noise − c) in
/// original units; g = the smallest power of two with g·σ_share ≥ 4; then raise σ_share
/// (exponential search then bisection, to 1e-12 relative) until ρ_DDG ≤ ρ for every
/// survivor count in [t_noise, N]. Refuses a target that would need σ < ½ lattice units.
pub fn calibrate(cohort: Cohort, target: &NoiseTarget) -> Result<Calibration, SecAggError> {
    check_cohort(cohort)?;
    if !(target.rho.is_finite() && target.rho > 0.0) {
        return Err(SecAggError::AccountantInput(
            "ρ must be positive and finite".into(),
        ));
    }
    if !(target.delta2.is_finite() && target.delta2 > 0.0) || target.dim == 0 {
        return Err(SecAggError::AccountantInput(
            "Δ₂ must be positive and d at least 1".into(),
        ));
    }
    let sigma_central = target.delta2 / (2.0 * target.rho).sqrt();
    let sigma_units = sigma_central / f64::from(cohort.t_noise - cohort.c).sqrt();
    let mut lattice = 1u64;
    while (lattice as f64) * sigma_units < TARGET_LATTICE_SIGMA && lattice < MAX_LATTICE {
        lattice *= 2;
    }
    let start = lattice as f64 * sigma_units;
    check_sigma(start)?;
    let ok = |sigma: f64| -> Result<bool, SecAggError> {
        Ok(rho_worst(cohort, target, lattice, sigma)? <= target.rho)
    };
    // ρ_DDG falls as σ grows (both s terms and τ do), so the feasible set is [σ*, ∞).
    let (mut lo, mut hi) = (start, start);
    let mut step = start * 1e-12;
    while !ok(hi)? {
        lo = hi;
        hi = start + step;
        step *= 2.0;
        if !hi.is_finite() || hi > start * 1e6 {
            return Err(SecAggError::AccountantInput(
                "no σ meets the target (sensitivity or dimension too large)".into(),
            ));
        }
    }
    if lo < hi {
        while (hi - lo) > hi * 1e-12 {
            let mid = 0.5 * (lo + hi);
            if ok(mid)? {
                hi = mid;
            } else {
                lo = mid;
            }
        }
    }
    Ok(Calibration {
        lattice,
        sigma_share: hi,
        rho_worst: rho_worst(cohort, target, lattice, hi)?,
        sigma_central,
    })
}

/// Predicted standard deviation (original units) of the system total in PLAIN mode: N
/// nodes, each adding a full central discrete Gaussian of σ_c = Δ₂/√(2ρ).
pub fn plain_gaussian_sd(n: u32, rho: f64, delta2: f64) -> f64 {
    f64::from(n).sqrt() * delta2 / (2.0 * rho).sqrt()
}

/// Predicted standard deviation of the system total in PLAIN mode with each node's
/// discrete Laplace of scale b = Δ₁/ε (the sample policies' mechanism): √N·√2·b (the
/// continuous Laplace's sd, an upper bound within 1% for b ≥ 2).
pub fn plain_laplace_sd(n: u32, epsilon: f64, delta1: f64) -> f64 {
    f64::from(n).sqrt() * std::f64::consts::SQRT_2 * delta1 / epsilon
}

#[cfg(test)]
mod tests {
    use super::*;

    /// secagg.md §c's fixtures, computed by a port of Google's accountant; to 1e-9 relative.
    #[test]
    fn reproduces_the_pinned_fixtures() {
        let cases = [
            (100, 1.0, 1, 1.0, 5.0549289061e-3),
            (100, 1.0, 100, 1.0, 5.0697824928e-3),
            (200, 0.8, 500, 1.0, 2.3185279529e-1),
            (90, 5.5, 500, 8.0, 1.1753902663e-2),
            (10, 0.5, 10, 1.0, 2.3653253192e+1),
        ];
        for (n, sigma, d, delta, want) in cases {
            let got = rho_ddg(n, sigma, d, delta, delta).unwrap();
            let rel = ((got - want) / want).abs();
            assert!(
                rel < 1e-9,
                "n={n} σ={sigma} d={d}: {got:e} vs {want:e} ({rel:e})"
            );
        }
    }

    #[test]
    fn tau_matches_the_memo_table() {
        for (n, sigma, want) in [
            (10, 0.5, 2.35),
            (100, 0.5, 9.70),
            (200, 0.5, 17.1),
            (10, 0.75, 0.052),
            (100, 0.75, 0.070),
            (200, 0.75, 0.087),
            (100, 1.0, 5.5e-4),
            (100, 1.5, 2.3e-9),
            (100, 2.0, 7e-17),
        ] {
            let got = tau(n, sigma).unwrap();
            assert!(
                ((got - want) / want).abs() < 0.03,
                "τ({n}, {sigma}) = {got:e}"
            );
        }
    }

    #[test]
    fn refuses_sigma_below_a_half() {
        assert_eq!(tau(10, 0.49), Err(SecAggError::SigmaTooSmall(0.49)));
        assert!(matches!(
            rho_ddg(10, 0.3, 1, 1.0, 1.0),
            Err(SecAggError::SigmaTooSmall(_))
        ));
        assert!(rho_ddg(10, f64::NAN, 1, 1.0, 1.0).is_err());
    }

    fn rho_for(epsilon: f64, delta: f64) -> f64 {
        // phm_policies::rho_for, restated so this crate need not depend on the policies.
        let l = (1.0 / delta).ln();
        ((l + epsilon).sqrt() - l.sqrt()).powi(2) * (1.0 - 1e-9)
    }

    /// secagg.md §c's accuracy table: ε = 0.5, δ = 1e-9, one COUNT.
    #[test]
    fn calibration_matches_the_accuracy_table() {
        let rho = rho_for(0.5, 1e-9);
        assert!((rho - 2.98e-3).abs() < 0.01e-3);
        let target = NoiseTarget {
            rho,
            delta1: 1.0,
            delta2: 1.0,
            dim: 1,
        };
        for n in [10u32, 100, 200] {
            let t_noise = (9 * n).div_ceil(10);
            let cal = calibrate(Cohort { n, t_noise, c: 0 }, &target).unwrap();
            assert!(cal.rho_worst <= rho);
            assert!(cal.sigma_share >= TARGET_LATTICE_SIGMA);
            // All survive: 13.65; exactly t_noise survive: 12.95 (= central σ_c).
            assert!((cal.total_sd(n) - 13.65).abs() < 0.01 * 13.65, "{cal:?}");
            assert!((cal.total_sd(t_noise) - 12.95).abs() < 0.005 * 12.95);
            assert!((cal.sigma_central - 12.95).abs() < 0.01);
            // The raise over σ_c/√t is only floating-point dust once g·σ ≥ 4.
            let exact = cal.sigma_central / f64::from(t_noise).sqrt() * cal.lattice as f64;
            assert!((cal.sigma_share - exact) / exact < 1e-9);
            let ratio = cal.total_sd(n) / cal.sigma_central;
            assert!((ratio - (f64::from(n) / f64::from(t_noise)).sqrt()).abs() < 1e-3);
            // PLAIN with full per-node Gaussians: √N·σ_c.
            let plain = plain_gaussian_sd(n, rho, 1.0);
            assert!((plain / cal.sigma_central - f64::from(n).sqrt()).abs() < 1e-9);
        }
    }

    /// "For ε = 1, m = 1 the scaling is g = 8 at N=100 and g = 16 at N=200."
    #[test]
    fn lattice_factor_matches_the_memo() {
        let target = NoiseTarget {
            rho: rho_for(1.0, 1e-9),
            delta1: 1.0,
            delta2: 1.0,
            dim: 1,
        };
        let g = |n: u32| {
            calibrate(
                Cohort {
                    n,
                    t_noise: (9 * n).div_ceil(10),
                    c: 0,
                },
                &target,
            )
            .unwrap()
            .lattice
        };
        assert_eq!(g(100), 8);
        assert_eq!(g(200), 16);
    }

    /// Without the lattice (σ ≈ 0.8 lattice units at N = 200, d = 500) the bound is 60×
    /// the central one; calibrate must land every s ∈ [t_noise, N] at or below ρ.
    #[test]
    fn calibrated_share_holds_for_every_survivor_count() {
        let target = NoiseTarget {
            rho: 3.906e-3,
            delta1: 1.0,
            delta2: 1.0,
            dim: 500,
        };
        let cohort = Cohort {
            n: 200,
            t_noise: 180,
            c: 3,
        };
        let cal = calibrate(cohort, &target).unwrap();
        for s in cohort.t_noise..=cohort.n {
            let r = rho_ddg(
                s - cohort.c,
                cal.sigma_share,
                500,
                cal.lattice as f64,
                cal.lattice as f64,
            )
            .unwrap();
            assert!(r <= target.rho, "s = {s}: {r:e}");
        }
        assert!(
            calibrate(
                Cohort {
                    n: 10,
                    t_noise: 11,
                    c: 0
                },
                &target
            )
            .is_err()
        );
        assert!(
            calibrate(
                Cohort {
                    n: 10,
                    t_noise: 9,
                    c: 9
                },
                &target
            )
            .is_err()
        );
    }
}
