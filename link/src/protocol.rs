//! The two roles as type-state machines, following linkage.md "Flow" rounds 1–3.
//!
//! * Anchor A: [`Anchor::start`] draws `a` and padding, gives `L` and an
//!   [`AnchorAwaitingF`]; [`AnchorAwaitingF::receive_f`] computes `U = {a·V : V ∈ F}` and
//!   wipes `a`, giving an [`AnchorAwaitingR`]; [`AnchorAwaitingR::receive_r`] counts
//!   `m_g = |R[g] ∩ U|` and releases `m_g − μ` (or `n_g − m_g + μ` for NOT EXISTS).
//! * Partner B: [`Partner::start`] draws `b`, `K_g`, `J_B` and the dummy scalars, gives
//!   `F` and a [`PartnerAwaitingL`]; [`PartnerAwaitingL::receive_l`] gives `R` and ends.
//!
//! Each step consumes its state, so a round cannot be run twice or out of order, and the
//! secrets (`a`, `b`, the dummy scalars, `K`) live in `Zeroizing` buffers inside the
//! states and are wiped as soon as the step that needs them last has run. No state is
//! `Clone` and none prints a secret.

use std::collections::HashSet;
use std::fmt;

use curve25519_dalek::ristretto::{CompressedRistretto, RistrettoPoint};
use curve25519_dalek::scalar::Scalar;
use rand::seq::SliceRandom as _;
use rand::{CryptoRng, RngCore};
use zeroize::Zeroizing;

use crate::cohort::{AnchorCohort, PartnerCohort};
use crate::dp::{Accuracy, ClampedLaplace, LinkNoise, NoisePurpose};
use crate::error::LinkError;
use crate::wire::{RoundF, RoundL, RoundR};

/// Label of [`LinkParams::canonical_bytes`].
const PARAMS_LABEL: &[u8] = b"phm-link/v1 params";

/// What both nodes of a session must agree on. Bound into the session id (see
/// [`crate::LinkSession`]), so two nodes told different parameters cannot talk at all.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkParams {
    /// Size of the anchor's group domain (the query's cells).
    pub groups: usize,
    /// The dummy-match noise at `ε_link`: `K_g = μ + clamp(Z_g)`, `2μ` slots per group.
    pub link: ClampedLaplace,
    /// The padding noise at `ε_size`: `J_g` at the anchor, `J_B` at the partner.
    pub size: ClampedLaplace,
    /// NOT EXISTS: release `n_g − m_g + μ` instead of `m_g − μ`.
    pub negated: bool,
    /// Most real people either side may bring (the policies' `max_set_size`); also bounds
    /// what each node will decode from the other.
    pub max_set_size: usize,
}

impl LinkParams {
    /// Parameters for a query at `epsilon` with a δ for each clamped mechanism: ε is split
    /// by [`crate::EpsilonSplit`], and each part calibrated by [`ClampedLaplace::calibrate`].
    pub fn for_query(
        groups: usize,
        epsilon: f64,
        delta_link: f64,
        delta_size: f64,
        negated: bool,
        max_set_size: usize,
    ) -> Result<LinkParams, LinkError> {
        let split = crate::dp::EpsilonSplit::new(epsilon)?;
        let p = LinkParams {
            groups,
            link: ClampedLaplace::calibrate(split.link, delta_link)?,
            size: ClampedLaplace::calibrate(split.size, delta_size)?,
            negated,
            max_set_size,
        };
        p.check()?;
        Ok(p)
    }

    fn check(&self) -> Result<(), LinkError> {
        if self.groups == 0 || u32::try_from(self.groups).is_err() {
            return Err(LinkError::Params(format!(
                "the number of groups must be at least 1 and fit 32 bits, not {}",
                self.groups
            )));
        }
        Ok(())
    }

    /// Length-prefixed canonical bytes, for [`phm_relay::session_id`]'s `params`.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&(PARAMS_LABEL.len() as u64).to_be_bytes());
        out.extend_from_slice(PARAMS_LABEL);
        out.extend_from_slice(&(self.groups as u64).to_be_bytes());
        for c in [self.link, self.size] {
            out.extend_from_slice(&c.scale().to_bits().to_be_bytes());
            out.extend_from_slice(&u64::from(c.mu()).to_be_bytes());
        }
        out.push(u8::from(self.negated));
        out.extend_from_slice(&(self.max_set_size as u64).to_be_bytes());
        out
    }

    /// Most elements an `F` can honestly hold: `n_B + ΣK + J_B`.
    pub fn max_f(&self) -> usize {
        self.max_set_size
            .saturating_add(self.groups.saturating_mul(slots(&self.link)))
            .saturating_add(slots(&self.size))
    }

    /// Most elements an `L` can honestly hold: `n_A + ΣJ_g`.
    pub fn max_l(&self) -> usize {
        self.max_set_size
            .saturating_add(self.groups.saturating_mul(slots(&self.size)))
    }

    /// Most elements an `R` can honestly hold: `|L| + 2μ` per group.
    pub fn max_r(&self) -> usize {
        self.max_l()
            .saturating_add(self.groups.saturating_mul(slots(&self.link)))
    }
}

fn slots(c: &ClampedLaplace) -> usize {
    usize::try_from(c.slots()).unwrap_or(usize::MAX)
}

fn count(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

/// A fresh non-zero scalar. Zero has probability 2⁻²⁵², but a zero `a` or `b` would map
/// every point to the identity, so it is excluded outright.
fn nonzero_scalar<R: RngCore + CryptoRng>(rng: &mut R) -> Zeroizing<Scalar> {
    loop {
        let s = Zeroizing::new(Scalar::random(rng));
        if *s != Scalar::ZERO {
            return s;
        }
    }
}

/// Map `f` over `items` on every available core, keeping order. Pure computation, no IO:
/// the scoped threads end before this returns. Each thread writes its share of the one
/// output vector in place, so the results are never held twice (per-thread vectors
/// concatenated afterwards doubled the transient memory, in the threads' own allocator
/// arenas: ~160 MB more for a million points).
pub(crate) fn par_map<T: Sync, U: Send + Default + Clone>(
    items: &[T],
    f: impl Fn(&T) -> U + Sync,
) -> Vec<U> {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    if threads <= 1 || items.len() < 2048 {
        return items.iter().map(f).collect();
    }
    let per = items.len().div_ceil(threads);
    let mut out = vec![U::default(); items.len()];
    let f = &f;
    std::thread::scope(|s| {
        let handles: Vec<_> = out
            .chunks_mut(per)
            .zip(items.chunks(per))
            .map(|(dst, src)| {
                s.spawn(move || {
                    for (d, x) in dst.iter_mut().zip(src) {
                        *d = f(x);
                    }
                })
            })
            .collect();
        for h in handles {
            // A panic in pure arithmetic is a bug; re-raise it where it happened.
            if let Err(e) = h.join() {
                std::panic::resume_unwind(e);
            }
        }
    });
    out
}

// ---------------------------------------------------------------------------------------
// The anchor

/// The anchor's entry point.
#[derive(Debug)]
pub struct Anchor;

/// The anchor after sending `L`, waiting for `F`. Holds `a`.
pub struct AnchorAwaitingF {
    params: LinkParams,
    a: Zeroizing<Scalar>,
    l_sizes: Vec<usize>,
    n_g: Vec<u64>,
}

/// The anchor after `F`, waiting for `R`. `a` has been wiped; it holds `U = {a·V}`.
pub struct AnchorAwaitingR {
    params: LinkParams,
    u: HashSet<[u8; 32]>,
    l_sizes: Vec<usize>,
    n_g: Vec<u64>,
}

/// What the anchor releases for one session, one value per group, with the accuracy
/// figures that go into the `AggregateResult`.
#[derive(Debug, Clone, PartialEq)]
pub struct LinkedCounts {
    /// `m_g − μ`, or `n_g − m_g + μ` for NOT EXISTS: the true count plus `clamp(Z_g)`
    /// (negated for NOT EXISTS, which is the same distribution). May be negative; rounding
    /// and suppression are the node's release rules, applied after.
    pub released: Vec<i64>,
    pub negated: bool,
    /// The noise scale `s` (OpenDP's `scale`).
    pub noise_scale: f64,
    /// Variance and 95% interval of each value (all groups alike).
    pub accuracy: Accuracy,
}

impl Anchor {
    /// Round 1 at the anchor: draw `a` and `J_g`, and build `P = a·G` and `L`.
    pub fn start<R: RngCore + CryptoRng>(
        params: &LinkParams,
        cohort: &AnchorCohort,
        noise: &mut dyn LinkNoise,
        rng: &mut R,
    ) -> Result<(AnchorAwaitingF, RoundL), LinkError> {
        params.check()?;
        if cohort.groups() != params.groups {
            return Err(LinkError::Params(format!(
                "the cohort has {} groups; the session has {}",
                cohort.groups(),
                params.groups
            )));
        }
        let people = count(cohort.stats().people);
        if people > params.max_set_size {
            return Err(LinkError::SetTooLarge {
                got: people,
                max: params.max_set_size,
            });
        }
        let padding = Zeroizing::new(params.size.draw_shifted(
            noise,
            NoisePurpose::Size,
            params.groups,
        )?);
        let a = nonzero_scalar(rng);
        let key_share = RistrettoPoint::mul_base(&a);
        let mut groups = Vec::with_capacity(params.groups);
        for (members, &j) in cohort.members().iter().zip(padding.iter()) {
            let mut g = par_map(members, |x| *a * x.to_point());
            g.extend((0..j).map(|_| RistrettoPoint::random(rng)));
            g.shuffle(rng);
            groups.push(g);
        }
        let l = RoundL { key_share, groups };
        let state = AnchorAwaitingF {
            params: params.clone(),
            a,
            l_sizes: l.group_sizes(),
            n_g: cohort.group_sizes(),
        };
        Ok((state, l))
    }
}

impl AnchorAwaitingF {
    /// Take in `F`: `U = {compress(a·V) : V ∈ F}`. `a` is wiped when this returns.
    pub fn receive_f(self, f: RoundF) -> Result<AnchorAwaitingR, LinkError> {
        if f.len() > self.params.max_f() {
            return Err(LinkError::SetTooLarge {
                got: f.len(),
                max: self.params.max_f(),
            });
        }
        let a = &self.a;
        let u: HashSet<[u8; 32]> = par_map(&f.points, |v| (**a * v).compress().to_bytes())
            .into_iter()
            .collect();
        Ok(AnchorAwaitingR {
            params: self.params,
            u,
            l_sizes: self.l_sizes,
            n_g: self.n_g,
        })
    }
}

impl AnchorAwaitingR {
    /// Take in `R`, count `m_g = #{E ∈ R[g] : E ∈ U}` and release. Refuses an `R` whose
    /// groups are not exactly `|L_g| + 2μ` long: anything else is not what an honest
    /// partner sends, and counting it could leak more than `c_g + K_g`.
    pub fn receive_r(self, r: RoundR) -> Result<LinkedCounts, LinkError> {
        let mu = i64::from(self.params.link.mu());
        let slots = slots(&self.params.link);
        if r.groups.len() != self.l_sizes.len() {
            return Err(LinkError::Params(format!(
                "R has {} groups; the session has {}",
                r.groups.len(),
                self.l_sizes.len()
            )));
        }
        let mut released = Vec::with_capacity(r.groups.len());
        for (g, (reply, (&l, &n))) in r
            .groups
            .iter()
            .zip(self.l_sizes.iter().zip(&self.n_g))
            .enumerate()
        {
            let expected = l.saturating_add(slots);
            if reply.len() != expected {
                return Err(LinkError::ReplySize {
                    group: u32::try_from(g).unwrap_or(u32::MAX),
                    expected,
                    got: reply.len(),
                });
            }
            let m = reply
                .iter()
                .filter(|e: &&CompressedRistretto| self.u.contains(e.as_bytes()))
                .count();
            let m = i64::try_from(m).unwrap_or(i64::MAX);
            let n = i64::try_from(n).unwrap_or(i64::MAX);
            released.push(if self.params.negated {
                n - m + mu
            } else {
                m - mu
            });
        }
        Ok(LinkedCounts {
            released,
            negated: self.params.negated,
            noise_scale: self.params.link.scale(),
            accuracy: self.params.link.accuracy(),
        })
    }
}

// ---------------------------------------------------------------------------------------
// The partner

/// The partner's entry point.
#[derive(Debug)]
pub struct Partner;

/// The partner after sending `F`, waiting for `L`. Holds `b`, `K_g` and the dummy scalars
/// `s_j = b·r_j` (so `F` holds `s_j·G` and `R` will hold `s_j·P`).
pub struct PartnerAwaitingL {
    params: LinkParams,
    b: Zeroizing<Scalar>,
    dummies_per_group: Zeroizing<Vec<u64>>,
    dummies: Zeroizing<Vec<Scalar>>,
}

impl Partner {
    /// Round 1 at the partner: draw `b`, `K_g = μ + clamp(Z_g)`, `J_B`, and build
    /// `F = shuffle({b·H(y)} ∪ {b·r_j·G} ∪ J_B random points)`.
    pub fn start<R: RngCore + CryptoRng>(
        params: &LinkParams,
        cohort: &PartnerCohort,
        noise: &mut dyn LinkNoise,
        rng: &mut R,
    ) -> Result<(PartnerAwaitingL, RoundF), LinkError> {
        params.check()?;
        let people = cohort.members().len();
        if people > params.max_set_size {
            return Err(LinkError::SetTooLarge {
                got: people,
                max: params.max_set_size,
            });
        }
        let k = Zeroizing::new(params.link.draw_shifted(
            noise,
            NoisePurpose::Link,
            params.groups,
        )?);
        let j_b = Zeroizing::new(params.size.draw_shifted(noise, NoisePurpose::Size, 1)?);
        let b = nonzero_scalar(rng);
        let total_k: u64 = k.iter().sum();
        let mut dummies = Zeroizing::new(Vec::with_capacity(count(total_k)));
        for _ in 0..total_k {
            // s_j = b·r_j with r_j fresh and non-zero.
            let r = nonzero_scalar(rng);
            dummies.push(*b * *r);
        }
        let mut points = par_map(cohort.members(), |y| *b * y.to_point());
        points.extend(dummies.iter().map(RistrettoPoint::mul_base));
        let padding = j_b.first().copied().unwrap_or(0);
        points.extend((0..padding).map(|_| RistrettoPoint::random(rng)));
        points.shuffle(rng);
        let state = PartnerAwaitingL {
            params: params.clone(),
            b,
            dummies_per_group: k,
            dummies,
        };
        Ok((state, RoundF { points }))
    }
}

impl PartnerAwaitingL {
    /// Round 2 at the partner: per group, `b·Q` for every `Q` of `L`'s group, the group's
    /// `K_g` dummies `s_j·P`, and `2μ − K_g` fresh `t·P` (t uniform, so distributed as
    /// `b·r·P` with a fresh r, and matching nothing), shuffled within the group with a
    /// fresh permutation, so `R`'s order is independent of `L`'s. Every secret is wiped
    /// when this returns.
    pub fn receive_l<R: RngCore + CryptoRng>(
        self,
        l: RoundL,
        rng: &mut R,
    ) -> Result<RoundR, LinkError> {
        if l.groups.len() != self.params.groups {
            return Err(LinkError::Params(format!(
                "L has {} groups; the session has {}",
                l.groups.len(),
                self.params.groups
            )));
        }
        let total: usize = l.groups.iter().map(Vec::len).sum();
        if total > self.params.max_l() {
            return Err(LinkError::SetTooLarge {
                got: total,
                max: self.params.max_l(),
            });
        }
        let p = l.key_share;
        let slots = self.params.link.slots();
        let b = &self.b;
        let mut dummies = self.dummies.iter();
        let mut groups = Vec::with_capacity(l.groups.len());
        for (members, &k) in l.groups.iter().zip(self.dummies_per_group.iter()) {
            let mut g: Vec<CompressedRistretto> = par_map(members, |q| (**b * q).compress());
            for s in dummies.by_ref().take(count(k)) {
                g.push((s * p).compress());
            }
            for _ in k..slots {
                let t = nonzero_scalar(rng);
                g.push((*t * p).compress());
            }
            g.shuffle(rng);
            groups.push(g);
        }
        Ok(RoundR { groups })
    }
}

impl fmt::Debug for AnchorAwaitingF {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnchorAwaitingF")
            .field("l_sizes", &self.l_sizes)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for AnchorAwaitingR {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AnchorAwaitingR")
            .field("l_sizes", &self.l_sizes)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for PartnerAwaitingL {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PartnerAwaitingL").finish_non_exhaustive()
    }
}
