//! Seeded sampling helpers for generating synthetic records. These shape fake data
//! only; no differential-privacy noise is ever drawn here (that comes from OpenDP).

use rand::{Rng as _, RngCore, SeedableRng};

/// The generator every synthetic draw comes from: xoshiro256++ (Blackman and Vigna),
/// whose state is taken from ChaCha8 seeded with the user's seed. Both are fixed,
/// portable algorithms, so a seed gives the same people on every platform and version.
/// xoshiro rather than ChaCha for the bulk draws because `phm synth` runs in the dev
/// profile, where unoptimised ChaCha made a million people take minutes.
#[derive(Debug, Clone)]
pub struct Rng {
    s: [u64; 4],
}

pub fn seeded(seed: u64) -> Rng {
    let mut chacha = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut s = [0u64; 4];
    for slot in s.iter_mut() {
        *slot = chacha.next_u64();
    }
    if s == [0; 4] {
        // The all-zero state is the one xoshiro cannot leave.
        s[0] = 1;
    }
    Rng { s }
}

impl RngCore for Rng {
    fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    fn next_u32(&mut self) -> u32 {
        (self.next_u64() >> 32) as u32
    }

    fn fill_bytes(&mut self, dest: &mut [u8]) {
        for chunk in dest.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }

    fn try_fill_bytes(&mut self, dest: &mut [u8]) -> Result<(), rand::Error> {
        self.fill_bytes(dest);
        Ok(())
    }
}

/// Uniform in [0, 1), from the top 53 bits.
pub fn unit(rng: &mut Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

pub fn bern(rng: &mut Rng, p: f64) -> bool {
    unit(rng) < p
}

/// Uniform integer in [lo, hi).
pub fn range(rng: &mut Rng, lo: u64, hi: u64) -> u64 {
    if hi <= lo {
        return lo;
    }
    rng.gen_range(lo..hi)
}

/// Standard normal (Box-Muller).
pub fn normal(rng: &mut Rng) -> f64 {
    let u1 = unit(rng).max(f64::MIN_POSITIVE);
    let u2 = unit(rng);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// Poisson by inversion; fine for the small rates used here (admissions per year).
pub fn poisson(rng: &mut Rng, lambda: f64) -> u32 {
    if lambda <= 0.0 {
        return 0;
    }
    let limit = (-lambda).exp();
    let mut k = 0u32;
    let mut p = unit(rng);
    while p > limit && k < 1_000 {
        k += 1;
        p *= unit(rng);
    }
    k
}

/// Index drawn with probability proportional to `weights` (which need not sum to 1).
pub fn pick(rng: &mut Rng, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut x = unit(rng) * total;
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    weights.len().saturating_sub(1)
}

/// A bijection on u64 (the SplitMix64 finaliser), so distinct inputs give distinct
/// pseudonymous ids without keeping a set of ids already used.
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xoshiro_matches_the_reference_implementation() {
        // First outputs of xoshiro256++ from state {1, 2, 3, 4} (reference C code).
        let mut r = Rng { s: [1, 2, 3, 4] };
        assert_eq!(r.next_u64(), 41_943_041);
        assert_eq!(r.next_u64(), 58_720_359);
        assert_eq!(r.next_u64(), 3_588_806_011_781_223);
    }

    #[test]
    fn same_seed_same_stream() {
        let mut a = seeded(9);
        let mut b = seeded(9);
        let mut c = seeded(10);
        let xs: Vec<u64> = (0..4).map(|_| a.next_u64()).collect();
        let ys: Vec<u64> = (0..4).map(|_| b.next_u64()).collect();
        let zs: Vec<u64> = (0..4).map(|_| c.next_u64()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        let u = unit(&mut a);
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn poisson_mean_is_close_to_lambda() {
        let mut rng = seeded(1);
        let n = 200_000;
        let total: u64 = (0..n).map(|_| poisson(&mut rng, 0.3) as u64).sum();
        let mean = total as f64 / n as f64;
        // sd of the mean = sqrt(0.3 / 200000) ~ 0.0012; 0.01 is > 8 sd.
        assert!((mean - 0.3).abs() < 0.01, "mean {mean}");
    }

    #[test]
    fn pick_follows_weights() {
        let mut rng = seeded(2);
        let mut counts = [0u32; 3];
        for _ in 0..100_000 {
            counts[pick(&mut rng, &[1.0, 2.0, 7.0])] += 1;
        }
        // Expected 10k/20k/70k; sd < 150, tolerance 1,500.
        assert!((counts[0] as i64 - 10_000).abs() < 1_500);
        assert!((counts[2] as i64 - 70_000).abs() < 1_500);
    }
}
