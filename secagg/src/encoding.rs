//! The encoding of a node's input into Z_2^64, and of the unmasked total back out.
//!
//! Values travel as integers in *lattice units*: a COUNT in persons, a SUM in fixed-point
//! steps γ (e.g. γ = 0.01 £ per step), both multiplied by the session's lattice factor g
//! so that the discrete Gaussian share can be fine relative to one unit (KLS21's scaling;
//! see `accountant`). The node's engine adds its noise share on that lattice, then this
//! module maps the noisy integers to `u64` by two's complement. Addition mod 2^64 of
//! two's-complement words is addition of the integers, so the masked sum decodes exactly
//! as long as no partial sum leaves ±2^63 — which [`Encoding::encode`] guarantees by
//! bounding every coordinate by 2^62 / N. No floating point touches the masked path; γ
//! and g are used only at the two ends.

use crate::error::SecAggError;

/// Largest absolute total the coordinator accepts after unmasking: 2^62. A larger one
/// cannot come from N inputs each within 2^62 / N, so it means a bad share or a lying node.
pub const MAX_ABS_TOTAL: i64 = 1 << 62;

/// The session's lattice factor and each coordinate's fixed-point step.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoding {
    lattice: u64,
    gammas: Vec<f64>,
    cohort: u32,
}

impl Encoding {
    /// `lattice` (g) must be a power of two (so that g·x is exact and dividing back is exact
    /// in f64); `gammas` holds one positive, finite step per coordinate (1.0 for a COUNT);
    /// `cohort` is N, which bounds each input so that N of them cannot wrap.
    pub fn new(lattice: u64, gammas: Vec<f64>, cohort: u32) -> Result<Encoding, SecAggError> {
        if !lattice.is_power_of_two() || lattice > (1 << 20) {
            return Err(SecAggError::Encoding(format!(
                "lattice factor {lattice} must be a power of two no larger than 2^20"
            )));
        }
        if gammas.is_empty() {
            return Err(SecAggError::Encoding(
                "the layout has no coordinates".into(),
            ));
        }
        if let Some(g) = gammas.iter().find(|g| !(g.is_finite() && **g > 0.0)) {
            return Err(SecAggError::Encoding(format!(
                "fixed-point step {g} must be positive and finite"
            )));
        }
        if cohort == 0 {
            return Err(SecAggError::Encoding("the cohort is empty".into()));
        }
        Ok(Encoding {
            lattice,
            gammas,
            cohort,
        })
    }

    /// g.
    pub fn lattice(&self) -> u64 {
        self.lattice
    }

    /// γ per coordinate.
    pub fn gammas(&self) -> &[f64] {
        &self.gammas
    }

    /// Number of coordinates.
    pub fn dim(&self) -> usize {
        self.gammas.len()
    }

    /// Largest |coordinate| one node may submit: 2^62 / N.
    pub fn max_abs_input(&self) -> i64 {
        MAX_ABS_TOTAL / i64::from(self.cohort)
    }

    /// A real value (already clamped to its bounds) in integer γ-steps of coordinate
    /// `index`, rounded to the nearest step. Quantise each *row* before summing, so that a
    /// person's contribution, and so Δ, is an exact integer.
    pub fn quantise(&self, index: usize, value: f64) -> Result<i64, SecAggError> {
        let gamma = *self.gammas.get(index).ok_or(SecAggError::Dimension {
            expected: self.dim(),
            got: index + 1,
        })?;
        let steps = (value / gamma).round();
        // 2^53: beyond it f64 no longer holds every integer, so rounding is not exact.
        if !steps.is_finite() || steps.abs() > 9_007_199_254_740_992.0 {
            return Err(SecAggError::Encoding(format!(
                "value at coordinate {index} does not fit the fixed-point range"
            )));
        }
        Ok(steps as i64)
    }

    /// Integer units (persons or γ-steps) onto the lattice: g·units, checked.
    pub fn to_lattice(&self, units: &[i64]) -> Result<Vec<i64>, SecAggError> {
        self.check_dim(units.len())?;
        let g = self.lattice as i64;
        units
            .iter()
            .enumerate()
            .map(|(index, &u)| {
                u.checked_mul(g).ok_or(SecAggError::OutOfRange {
                    index,
                    value: i128::from(u) * i128::from(g),
                    bound: self.max_abs_input(),
                })
            })
            .collect()
    }

    /// A node's noisy lattice vector into Z_2^64, refusing any coordinate beyond
    /// ±[`Encoding::max_abs_input`] (N such inputs could then wrap the modulus).
    pub fn encode(&self, lattice_values: &[i64]) -> Result<Vec<u64>, SecAggError> {
        self.check_dim(lattice_values.len())?;
        let bound = self.max_abs_input();
        lattice_values
            .iter()
            .enumerate()
            .map(|(index, &v)| {
                if v.unsigned_abs() > bound.unsigned_abs() {
                    Err(SecAggError::OutOfRange {
                        index,
                        value: i128::from(v),
                        bound,
                    })
                } else {
                    // Two's complement: −1 becomes 2^64 − 1, and wrapping addition of the
                    // words is addition of the integers.
                    Ok(v as u64)
                }
            })
            .collect()
    }

    /// The unmasked total (Z_2^64) back to signed lattice integers, refusing one outside
    /// ±[`MAX_ABS_TOTAL`].
    pub fn decode(&self, total: &[u64]) -> Result<Vec<i64>, SecAggError> {
        self.check_dim(total.len())?;
        total
            .iter()
            .enumerate()
            .map(|(index, &w)| {
                let v = w as i64;
                if v.unsigned_abs() > MAX_ABS_TOTAL.unsigned_abs() {
                    Err(SecAggError::OutOfRange {
                        index,
                        value: i128::from(v),
                        bound: MAX_ABS_TOTAL,
                    })
                } else {
                    Ok(v)
                }
            })
            .collect()
    }

    /// Lattice integers to real values: z / g · γ. Division by a power of two is exact.
    pub fn to_real(&self, lattice_values: &[i64]) -> Result<Vec<f64>, SecAggError> {
        self.check_dim(lattice_values.len())?;
        let g = self.lattice as f64;
        Ok(lattice_values
            .iter()
            .zip(&self.gammas)
            .map(|(&z, &gamma)| z as f64 / g * gamma)
            .collect())
    }

    fn check_dim(&self, got: usize) -> Result<(), SecAggError> {
        if got == self.dim() {
            Ok(())
        } else {
            Err(SecAggError::Dimension {
                expected: self.dim(),
                got,
            })
        }
    }
}

/// `a + b` coordinate-wise in Z_2^64.
pub(crate) fn add_into(acc: &mut [u64], v: &[u64]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a = a.wrapping_add(*b);
    }
}

/// `a − b` coordinate-wise in Z_2^64.
pub(crate) fn sub_into(acc: &mut [u64], v: &[u64]) {
    for (a, b) in acc.iter_mut().zip(v) {
        *a = a.wrapping_sub(*b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn negative_values_survive_the_round_trip() {
        let e = Encoding::new(4, vec![1.0, 0.01], 10).unwrap();
        let x = e.to_lattice(&[-3, 12345]).unwrap();
        assert_eq!(x, vec![-12, 49380]);
        let words = e.encode(&x).unwrap();
        assert_eq!(words[0], u64::MAX - 11);
        assert_eq!(e.decode(&words).unwrap(), x);
        let real = e.to_real(&x).unwrap();
        assert_eq!(real[0], -3.0);
        assert!((real[1] - 123.45).abs() < 1e-9);
        assert_eq!(e.quantise(1, 123.454).unwrap(), 12345);
        assert_eq!(e.quantise(1, -0.016).unwrap(), -2);
    }

    #[test]
    fn inputs_that_could_wrap_are_refused() {
        let e = Encoding::new(1, vec![1.0], 100).unwrap();
        let bound = e.max_abs_input();
        assert!(e.encode(&[bound]).is_ok());
        assert!(e.encode(&[-bound]).is_ok());
        assert!(matches!(
            e.encode(&[bound + 1]),
            Err(SecAggError::OutOfRange { .. })
        ));
        assert!(matches!(
            e.decode(&[(MAX_ABS_TOTAL as u64) + 1]),
            Err(SecAggError::OutOfRange { .. })
        ));
        assert!(matches!(
            e.encode(&[1, 2]),
            Err(SecAggError::Dimension { .. })
        ));
        assert!(Encoding::new(3, vec![1.0], 1).is_err());
        assert!(Encoding::new(2, vec![0.0], 1).is_err());
        assert!(Encoding::new(2, vec![f64::NAN], 1).is_err());
    }

    proptest! {
        #[test]
        fn wrapping_sum_is_integer_sum(xs in proptest::collection::vec(-(1i64 << 40)..(1i64 << 40), 1..50)) {
            let e = Encoding::new(1, vec![1.0], 64).unwrap();
            let mut acc = vec![0u64];
            for x in &xs {
                add_into(&mut acc, &e.encode(&[*x]).unwrap());
            }
            prop_assert_eq!(e.decode(&acc).unwrap()[0], xs.iter().sum::<i64>());
        }
    }
}
