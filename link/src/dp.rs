//! Differential privacy for linked counts: the noise interface, the clamping that turns a
//! draw into a number of dummy matches or padding points, and the calibration math.
//!
//! This crate never samples noise. The node supplies draws through [`LinkNoise`], from
//! OpenDP's `make_laplace` over `VectorDomain<AtomDomain<i64>>` with the given scale (the
//! discrete Laplace, `P(Z = z) ∝ exp(−|z|/s)`). Everything here is the exact arithmetic
//! of that distribution once clamped to `[−μ, μ]`:
//!
//! * a released linked count is `c + clamp(Z, −μ, μ)`; the partner adds `K = μ + clamp(Z)`
//!   dummy matches and the anchor subtracts the public `μ` (post-processing);
//! * on the interior of `[−μ, μ]` the ratio of neighbouring probabilities is exactly
//!   `e^{1/s}`, so the mechanism is `ε = 1/s` apart from the two clamped ends, whose
//!   excess is the `δ` of [`ClampedLaplace::delta`] (an exact hockey-stick sum);
//! * `μ` is the smallest value whose `δ` is within the target ([`ClampedLaplace::calibrate`]).

use crate::error::LinkError;

/// Why a draw was asked for: the node may audit the purpose and scale (never the draw).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoisePurpose {
    /// The partner's dummy matches `K_g`, one per group, at `ε_link`.
    Link,
    /// Padding: the anchor's `J_g` per group, the partner's `J_B` (one), at `ε_size`.
    Size,
}

/// A noise source failed (the node's OpenDP measurement could not be built or run).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("noise could not be drawn: {0}")]
pub struct NoiseError(pub String);

/// Where the noise comes from. The node implements it with OpenDP's `make_laplace` at the
/// given scale over a zero vector of length `len`, and returns the vector (`Z`, one per
/// group). Implementations must never log or keep what they return.
pub trait LinkNoise {
    fn draw(
        &mut self,
        purpose: NoisePurpose,
        scale: f64,
        len: usize,
    ) -> Result<Vec<i64>, NoiseError>;
}

/// Largest `μ` that [`ClampedLaplace::calibrate`] will choose: far beyond any useful
/// `ε` (it corresponds to `s ≈ 50 000` at `δ = 10⁻⁹`) and small enough that `2μ`
/// dummy slots per group stay a bounded cost.
pub const MAX_MU: u32 = 1 << 20;

/// The ε split of linkage.md: `ε_size = 0.1 ε` pays for the padded set sizes, `ε_link =
/// 0.9 ε` for the linked counts.
pub const SIZE_EPSILON_SHARE: f64 = 0.1;

/// Both parts of one query's ε, as every node computes them from the query.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EpsilonSplit {
    pub size: f64,
    pub link: f64,
}

impl EpsilonSplit {
    /// Split `epsilon` with [`SIZE_EPSILON_SHARE`]. They add back to `epsilon` under basic
    /// composition (see SECURITY.md, linkage proof sketch, "Composition").
    pub fn new(epsilon: f64) -> Result<EpsilonSplit, LinkError> {
        if !(epsilon.is_finite() && epsilon > 0.0) {
            return Err(LinkError::Params(format!(
                "ε must be positive and finite, not {epsilon}"
            )));
        }
        let size = epsilon * SIZE_EPSILON_SHARE;
        Ok(EpsilonSplit {
            size,
            link: epsilon - size,
        })
    }
}

/// A discrete Laplace of scale `s` clamped to `[−μ, μ]`, and its shifted form
/// `μ + clamp(Z)` in `[0, 2μ]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClampedLaplace {
    scale: f64,
    mu: u32,
}

/// How accurate a released count is: exact figures for `clamp(Z, −μ, μ)`, the error of
/// one released linked count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Accuracy {
    /// `Var(clamp(Z))`, summed exactly over the clamped distribution (its mean is 0).
    pub variance: f64,
    /// The smallest integer `h` with `P(|clamp(Z)| ≤ h) ≥ 0.95`: the 95% interval is the
    /// released count `± h`.
    pub half_width_95: u32,
    /// `P(|clamp(Z)| ≤ h)` itself: at least 0.95, more because the noise is discrete.
    pub coverage_95: f64,
}

impl ClampedLaplace {
    /// Scale `s` and bound `μ` given directly (both nodes must agree on them; they are
    /// bound into the session id by [`crate::LinkParams::canonical_bytes`]).
    pub fn new(scale: f64, mu: u32) -> Result<ClampedLaplace, LinkError> {
        if !(scale.is_finite() && scale > 0.0) {
            return Err(LinkError::Params(format!(
                "the noise scale must be positive and finite, not {scale}"
            )));
        }
        if mu == 0 || mu > MAX_MU {
            return Err(LinkError::Params(format!(
                "μ must be in 1..={MAX_MU}, not {mu}"
            )));
        }
        Ok(ClampedLaplace { scale, mu })
    }

    /// Scale `s = 1/ε` and the smallest `μ` whose [`delta`](Self::delta) at `ε` is at most
    /// `delta`. Refuses `δ` outside (0, 1) and an `ε` so small that `μ` would pass [`MAX_MU`].
    pub fn calibrate(epsilon: f64, delta: f64) -> Result<ClampedLaplace, LinkError> {
        if !(epsilon.is_finite() && epsilon > 0.0) {
            return Err(LinkError::Params(format!(
                "ε must be positive and finite, not {epsilon}"
            )));
        }
        if !(delta > 0.0 && delta < 1.0) {
            return Err(LinkError::Params(format!(
                "δ must be in (0, 1), not {delta}"
            )));
        }
        let scale = 1.0 / epsilon;
        let at = |mu: u32| ClampedLaplace { scale, mu }.delta();
        if at(MAX_MU) > delta {
            return Err(LinkError::Params(format!(
                "ε = {epsilon} needs μ beyond {MAX_MU} for δ = {delta}"
            )));
        }
        // δ falls strictly with μ (both of its terms are multiples of e^{−μ/s}), so the
        // smallest good μ is found by bisection.
        let (mut lo, mut hi) = (1u32, MAX_MU);
        while lo < hi {
            let mid = lo + (hi - lo) / 2;
            if at(mid) <= delta {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        Ok(ClampedLaplace { scale, mu: lo })
    }

    pub fn scale(&self) -> f64 {
        self.scale
    }

    pub fn mu(&self) -> u32 {
        self.mu
    }

    /// The ε of the interior: `1/s`.
    pub fn epsilon(&self) -> f64 {
        1.0 / self.scale
    }

    /// `P(clamp(Z) = z)` for `z` in `[−μ, μ]` (the two ends carry the clamped tails).
    fn pmf(&self, z: i64) -> f64 {
        let t = 1.0 / self.scale;
        let mu = i64::from(self.mu);
        if z.abs() > mu {
            0.0
        } else if z.abs() == mu {
            // P(Z ≥ μ) = e^{−tμ} / (1 + e^{−t})
            (-t * mu as f64).exp() / (1.0 + (-t).exp())
        } else {
            // P(Z = z) = tanh(t/2) e^{−t|z|}
            (t / 2.0).tanh() * (-t * z.abs() as f64).exp()
        }
    }

    /// The exact hockey-stick divergence `δ(ε) = max over both directions of
    /// Σ_y max(0, P(y) − e^ε Q(y))` between `c + clamp(Z)` and `c + 1 + clamp(Z)`, at
    /// `ε = 1/s`. A count vector of L1 sensitivity 1 changes in one coordinate only, so
    /// this is also the δ of the whole per-group vector.
    ///
    /// Where both neighbours lie strictly inside `(−μ, μ)` the ratio is `e^{±1/s}` exactly
    /// and contributes nothing at `ε = 1/s`; that term is computed from the ratio, not by
    /// subtracting two rounded probabilities, so the sum is exact up to the rounding of
    /// the edge terms themselves.
    pub fn delta(&self) -> f64 {
        let eps = self.epsilon();
        let t = 1.0 / self.scale;
        let mu = i64::from(self.mu);
        let e_eps = eps.exp();
        let interior = |z: i64| z.abs() < mu;
        // P is the law of clamp(Z) at y, Q of 1 + clamp(Z) (so Q(y) = pmf(y − 1)); the
        // reverse direction is the mirror image, because clamp(Z) is symmetric.
        let one_way = |forward: bool| -> f64 {
            let mut sum = 0.0;
            for y in -mu..=mu + 1 {
                let (p_at, q_at) = if forward { (y, y - 1) } else { (y - 1, y) };
                let p = self.pmf(p_at);
                if p == 0.0 {
                    continue;
                }
                let term = if interior(p_at) && interior(q_at) {
                    // p / q = e^{t(|q_at| − |p_at|)}: exactly e^{±t}.
                    let ratio = (t * (q_at.abs() - p_at.abs()) as f64).exp();
                    self.pmf(q_at) * (ratio - e_eps).max(0.0)
                } else {
                    (p - e_eps * self.pmf(q_at)).max(0.0)
                };
                sum += term;
            }
            sum
        };
        one_way(true).max(one_way(false))
    }

    /// Variance and 95% interval of `clamp(Z)`, from its exact distribution. A released
    /// linked count `m − μ = c + clamp(Z)` is unbiased with this variance; the interval
    /// `released ± half_width_95` holds the true count with probability `coverage_95`.
    /// Over several anchors the variances add (the coordinator's combination).
    pub fn accuracy(&self) -> Accuracy {
        let mu = i64::from(self.mu);
        let variance = (-mu..=mu)
            .map(|z| (z * z) as f64 * self.pmf(z))
            .sum::<f64>();
        let mut covered = self.pmf(0);
        let mut h = 0u32;
        while covered < 0.95 && h < self.mu {
            h += 1;
            covered += 2.0 * self.pmf(i64::from(h));
        }
        Accuracy {
            variance,
            half_width_95: h,
            coverage_95: covered.min(1.0),
        }
    }

    /// `μ + clamp(z, −μ, μ)`, in `[0, 2μ]`.
    pub fn shift(&self, z: i64) -> u64 {
        let mu = i64::from(self.mu);
        // In [0, 2μ] by construction, so non-negative.
        u64::try_from(mu + z.clamp(-mu, mu)).unwrap_or(0)
    }

    /// `2μ`: how many dummy slots each group of R carries.
    pub fn slots(&self) -> u64 {
        2 * u64::from(self.mu)
    }

    /// Ask `noise` for `len` draws at this scale and shift each into `[0, 2μ]`.
    pub(crate) fn draw_shifted(
        &self,
        noise: &mut dyn LinkNoise,
        purpose: NoisePurpose,
        len: usize,
    ) -> Result<Vec<u64>, LinkError> {
        let z = noise.draw(purpose, self.scale, len)?;
        if z.len() != len {
            return Err(LinkError::Noise(NoiseError(format!(
                "asked for {len} draws, got {}",
                z.len()
            ))));
        }
        Ok(z.into_iter().map(|z| self.shift(z)).collect())
    }
}

/// Test doubles for [`LinkNoise`]. **Test-only**: production noise is OpenDP's, drawn by
/// the node; nothing here is compiled outside `cfg(test)`.
#[cfg(test)]
pub(crate) mod test_noise {
    use rand::{Rng as _, SeedableRng as _};
    use rand_chacha::ChaCha20Rng;

    use super::{LinkNoise, NoiseError, NoisePurpose};

    /// Every draw is 0: the noise-free path, so counts can be checked exactly.
    pub(crate) struct ZeroNoise;

    impl LinkNoise for ZeroNoise {
        fn draw(&mut self, _: NoisePurpose, _: f64, len: usize) -> Result<Vec<i64>, NoiseError> {
            Ok(vec![0; len])
        }
    }

    /// A seeded discrete Laplace (the difference of two geometric variables), for
    /// distribution tests. Not constant-time and not OpenDP's sampler: a test double.
    pub(crate) struct SeededLaplace {
        rng: ChaCha20Rng,
        /// Every draw made, so a test can compare what the partner injected.
        pub(crate) log: Vec<(NoisePurpose, Vec<i64>)>,
    }

    impl SeededLaplace {
        pub(crate) fn new(seed: u64) -> SeededLaplace {
            SeededLaplace {
                rng: ChaCha20Rng::seed_from_u64(seed),
                log: Vec::new(),
            }
        }

        fn geometric(&mut self, t: f64) -> i64 {
            // P(G = k) = (1 − e^{−t}) e^{−tk}, by inversion.
            let u: f64 = 1.0 - self.rng.r#gen::<f64>(); // in (0, 1]
            (u.ln() / -t).floor() as i64
        }
    }

    impl LinkNoise for SeededLaplace {
        fn draw(
            &mut self,
            purpose: NoisePurpose,
            scale: f64,
            len: usize,
        ) -> Result<Vec<i64>, NoiseError> {
            let t = 1.0 / scale;
            let z: Vec<i64> = (0..len)
                .map(|_| self.geometric(t) - self.geometric(t))
                .collect();
            self.log.push((purpose, z.clone()));
            Ok(z)
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    #[test]
    fn mu_matches_the_values_pinned_in_linkage_md() {
        let split = EpsilonSplit::new(1.0).unwrap();
        assert!((split.size - 0.1).abs() < 1e-12 && (split.link - 0.9).abs() < 1e-12);
        for (eps, scale, mu) in [(0.9, 1.11, 23), (0.45, 2.22, 46), (0.1, 10.0, 208)] {
            let c = ClampedLaplace::calibrate(eps, 1e-9).unwrap();
            assert_eq!(c.mu(), mu, "ε = {eps}");
            assert!(
                (c.scale() - scale).abs() < 0.005,
                "ε = {eps}: s = {}",
                c.scale()
            );
            assert!(c.delta() <= 1e-9);
            // Minimal: one less would exceed δ.
            assert!(ClampedLaplace::new(c.scale(), mu - 1).unwrap().delta() > 1e-9);
        }
    }

    #[test]
    fn delta_equals_a_brute_force_hockey_stick_sum() {
        for (scale, mu) in [(1.11, 3), (2.0, 5), (10.0, 40), (0.5, 1)] {
            let c = ClampedLaplace::new(scale, mu).unwrap();
            let e = c.epsilon().exp();
            let m = i64::from(mu);
            let brute = (-m - 1..=m + 1)
                .map(|y| (c.pmf(y) - e * c.pmf(y - 1)).max(0.0))
                .sum::<f64>();
            assert!(
                (c.delta() - brute).abs() <= 1e-12 * brute.max(1e-300) + 1e-15,
                "s {scale} μ {mu}: {} vs {brute}",
                c.delta()
            );
        }
    }

    #[test]
    fn accuracy_matches_linkage_md() {
        // s = 1/0.9: sd 1.52, 95% ± 3.
        let a = ClampedLaplace::calibrate(0.9, 1e-9).unwrap().accuracy();
        assert!((a.variance.sqrt() - 1.52).abs() < 0.01, "{a:?}");
        assert_eq!(a.half_width_95, 3);
        assert!(a.coverage_95 >= 0.95 && a.coverage_95 < 0.97, "{a:?}");
        // s = 1/0.45: sd 3.1.
        let b = ClampedLaplace::calibrate(0.45, 1e-9).unwrap().accuracy();
        assert!((b.variance.sqrt() - 3.1).abs() < 0.05, "{b:?}");
        // The probabilities sum to one.
        let c = ClampedLaplace::new(2.0, 7).unwrap();
        let total: f64 = (-7..=7).map(|z| c.pmf(z)).sum();
        assert!((total - 1.0).abs() < 1e-12);
    }

    #[test]
    fn shift_stays_in_zero_to_two_mu() {
        let c = ClampedLaplace::new(1.0, 5).unwrap();
        assert_eq!(c.shift(i64::MIN), 0);
        assert_eq!(c.shift(-5), 0);
        assert_eq!(c.shift(0), 5);
        assert_eq!(c.shift(3), 8);
        assert_eq!(c.shift(i64::MAX), 10);
        assert_eq!(c.slots(), 10);
    }

    #[test]
    fn bad_parameters_are_refused() {
        assert!(EpsilonSplit::new(0.0).is_err());
        assert!(EpsilonSplit::new(f64::NAN).is_err());
        assert!(ClampedLaplace::calibrate(1.0, 0.0).is_err());
        assert!(ClampedLaplace::calibrate(1.0, 1.0).is_err());
        assert!(ClampedLaplace::calibrate(1e-9, 1e-9).is_err());
        assert!(ClampedLaplace::new(-1.0, 3).is_err());
        assert!(ClampedLaplace::new(1.0, 0).is_err());
    }

    #[test]
    fn the_seeded_double_has_the_discrete_laplace_variance() {
        let mut n = test_noise::SeededLaplace::new(7);
        let z = n.draw(NoisePurpose::Link, 2.0, 200_000).unwrap();
        let var = z.iter().map(|&z| (z * z) as f64).sum::<f64>() / z.len() as f64;
        let t: f64 = 0.5;
        let expected = 2.0 * (-t).exp() / (1.0 - (-t).exp()).powi(2);
        assert!((var / expected - 1.0).abs() < 0.03, "{var} vs {expected}");
    }
}
