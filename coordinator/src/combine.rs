//! Combining the nodes' noisy answers into system-level estimates with honest
//! uncertainty: validation of each answer, totals with summed noise variances, ratio
//! estimates for means, suppression, rounding, and the disclosure rules that keep
//! system-total-only partners (and figures a partner suppressed) from ever being shown
//! on their own.
//!
//! Pure: no IO, no gRPC. Inputs are the nodes' `AggregateResult` messages (plain data).
//!
//! # The statistics
//!
//! Each node adds independent noise of known distribution to each figure. For a total
//! (COUNT, SUM) the combined estimate is the sum of the nodes' noisy values and, since
//! independent noises add their variances, the combined variance is the sum of the
//! variances. The 95% interval depends on how many partners contributed:
//!
//! * one: the node's own interval, from the mechanism's exact distribution;
//! * two to [`MAX_EXACT_TERMS`]: a bound computed from the exact distribution of the
//!   sum of the noises (see [`noise_sum`]): it covers at least 95% by construction and
//!   is at most a few per cent wider than the exact interval. The normal approximation
//!   used before covered about 94% for two Laplace terms, and less for discrete Laplace
//!   noise with a small scale (lattice effects);
//! * more: the normal approximation with a Cornish–Fisher correction for the sum's
//!   kurtosis, which keeps it honest when a few large partners dominate the noise.
//!
//! A partner that does not say which mechanism it used gets a distribution-free
//! (Chebyshev) interval, and the cell says so.
//!
//! The intervals cover the noise only. They do not cover bias from clamping, per-person
//! contribution bounding, opt-out exclusion, or groups a partner did not release: a
//! row whose key some answering partners did not release is flagged in [`Row::missing`]
//! and [`Row::note`], because those partners' share is missing from the total (it is
//! not zero, and it is not in the interval).
//!
//! A mean is combined as a ratio estimate `R = S / C`, the total noisy sum over the
//! total noisy count; see `mean_cell` for its interval and for what happens when the
//! noisy count is small.
//!
//! # Disclosure control
//!
//! Everything below is decided **per result row**, over the partners that actually
//! released that row: partners threshold keys independently, and partners' policies may
//! declare different categories or bin edges, so the partners behind one row of the
//! system total are not, in general, the partners behind another.
//!
//! * A combined cell is suppressed when the group's combined COUNT estimate is at or
//!   below the strictest (largest) `min_reportable_count` among the answering nodes —
//!   the same "at or below" rule the nodes apply — and then the group's SUM and MEAN
//!   are suppressed too. Without a COUNT in the query the MEAN's combined noisy count
//!   is used.
//! * A query of SUMs alone has no count to test, at the node or here, so its groups are
//!   never suppressed as small: they are protected by the noise alone (the sum's noise
//!   scale is at least one person's largest possible contribution divided by the
//!   epsilon share), and [`Combined::notes`] says so. The protected-partner rules below
//!   still apply to them.
//! * Protected figures: in each row, a partner's figure is protected when the partner's
//!   release scope is system-total-only, or when the partner suppressed that cell
//!   itself (secondary suppression: a suppressed cell must not be recoverable as the
//!   total minus the other partners' published figures).
//! * A row released only by system-total-only partners is suppressed whole.
//! * Every published figure of a row is a sum of some of that row's partners' figures.
//!   Figures are published in a fixed order — the system total first, then partner
//!   breakdowns (standalone partners, by id), then Place and PCN breakdowns (only those
//!   whose answering partners are all standalone) — and a figure is withheld when,
//!   together with what is already published for that row and aggregate, some linear
//!   combination would equal one protected figure (a rank test). A system total
//!   that is itself one protected figure (a single contributor) is suppressed.
//! * Rounding: the wire does not carry each node's rounding rule, so the coordinator
//!   reads it from the answers and fails closed: a node counts as "rounding" unless it
//!   demonstrably released an unrounded figure (an unsuppressed COUNT/SUM whose
//!   displayed estimate equals its noisy value and is not a multiple of 5). When any
//!   answering node rounds, combined counts and sums and their interval bounds are
//!   shown to the nearest 5 and means and their bounds to 1 decimal place. Standard
//!   errors are not rounded: they depend only on the public noise parameters. Rounding
//!   does not hide a subtraction (it bounds the error by ±5), so rounded figures are
//!   treated as exact in the rank test.
//!
//! `system_total_only` is a display rule within one answer, not a privacy boundary
//! across queries: two queries whose filters differ by one partner's population can be
//! subtracted, with fresh noise in each, and only differential privacy bounds what that
//! reveals.

use crate::model::NodeRef;
use phm_proto::AggregateKind;
pub use phm_proto::result::Scope;
use phm_proto::result::{Answer, MeanParts, Mechanism};
use std::collections::HashMap;

pub use noise_sum::{Dist, MAX_EXACT_TERMS, Noise, Shape};

/// z for a two-sided 95% normal interval.
pub const Z95: f64 = 1.96;

/// Above this relative error of a mean's combined noisy count (its noise SD over the
/// count) the delta-method interval is not trusted; see `mean_cell`.
pub const MEAN_MAX_COUNT_RELATIVE_ERROR: f64 = 0.1;

/// What a valid answer to the query must look like.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub query_id: String,
    pub dataset: String,
    pub group_columns: Vec<String>,
    pub aliases: Vec<String>,
    pub kinds: Vec<AggregateKind>,
}

impl Expected {
    pub fn from_query(q: &phm_proto::QueryBody) -> Expected {
        Expected {
            query_id: q.query_id.clone(),
            dataset: q.dataset.clone(),
            group_columns: q.group_by.iter().map(phm_proto::GroupKey::label).collect(),
            aliases: q.aggregates.iter().map(|a| a.alias.clone()).collect(),
            kinds: q.aggregates.iter().map(|a| a.kind).collect(),
        }
    }
}

/// A mean's noisy parts as released, with the noise on each.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanNoise {
    pub parts: MeanParts,
    /// The noise on `parts.noisy_sum` (real-valued) and on `parts.noisy_count`
    /// (integer-valued), from the cell's mechanism and the parts' variances.
    pub sum: Noise,
    pub count: Noise,
}

/// One figure as a node released it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeCell {
    pub estimate: f64,
    pub noisy_value: f64,
    pub variance: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    pub suppressed: bool,
    pub suppression_reason: String,
    /// The noise on `noisy_value` (COUNT and SUM cells; for a MEAN see its parts).
    pub noise: Noise,
    pub mean: Option<MeanNoise>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub key: Vec<String>,
    pub cells: Vec<NodeCell>,
}

/// A node's answer that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeAnswer {
    pub node: NodeRef,
    pub scope: Scope,
    pub min_reportable_count: f64,
    pub population_noisy: f64,
    pub epsilon_spent: f64,
    pub rows: Vec<NodeRow>,
}

/// Why a node's answer was excluded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

/// Check a node's answer against the query and take the view combining needs. The
/// answer's own checks (finite figures, one cell per aggregate, ...) were made when it
/// was decoded ([`Answer`]'s `TryFrom`); these are the ones that depend on the query.
/// Answers are compared with the query rather than with each other so each node can
/// be judged as it arrives.
pub fn validate(expected: &Expected, node: NodeRef, a: Answer) -> Result<NodeAnswer, Malformed> {
    check_answers_the_query(expected, &a)?;
    let r = a.release;
    let mut rows = Vec::with_capacity(r.rows.len());
    for row in r.rows {
        let mut cells = Vec::with_capacity(row.cells.len());
        for (c, &kind) in row.cells.into_iter().zip(&expected.kinds) {
            cells.push(node_cell(kind, c, &row.key)?);
        }
        rows.push(NodeRow {
            key: row.key,
            cells,
        });
    }
    Ok(NodeAnswer {
        node,
        scope: a.scope,
        min_reportable_count: r.min_reportable_count,
        population_noisy: a.population_noisy,
        epsilon_spent: r.epsilon_spent,
        rows,
    })
}

/// The answer is for this query: its id, dataset, group columns and aliases, and one
/// row when the query is ungrouped.
fn check_answers_the_query(expected: &Expected, a: &Answer) -> Result<(), Malformed> {
    let r = &a.release;
    if a.query_id != expected.query_id {
        return Err(Malformed(format!(
            "answered query id {:?}, expected {:?}",
            a.query_id, expected.query_id
        )));
    }
    if a.dataset != expected.dataset {
        return Err(Malformed(format!(
            "answered for dataset {:?}, expected {:?}",
            a.dataset, expected.dataset
        )));
    }
    if r.group_columns != expected.group_columns {
        return Err(Malformed(format!(
            "group columns {:?} do not match the query's {:?}",
            r.group_columns, expected.group_columns
        )));
    }
    if r.aliases != expected.aliases {
        return Err(Malformed(format!(
            "aggregate aliases {:?} do not match the query's {:?}",
            r.aliases, expected.aliases
        )));
    }
    if expected.group_columns.is_empty() && r.rows.len() != 1 {
        return Err(Malformed(format!(
            "an ungrouped query needs exactly one row, got {}",
            r.rows.len()
        )));
    }
    Ok(())
}

/// One released cell of row `key` as combining sees it: its figures and the noise
/// behind them; a mean must carry its sum and count parts.
fn node_cell(
    kind: AggregateKind,
    c: phm_proto::result::Cell,
    key: &[String],
) -> Result<NodeCell, Malformed> {
    let shape = c.mechanism.map(|m| match m {
        Mechanism::DiscreteLaplace => Shape::Laplace,
        Mechanism::DiscreteGaussian => Shape::Gaussian,
    });
    let mean = match (kind, c.mean) {
        (AggregateKind::Mean, None) => {
            return Err(Malformed(format!(
                "group {key:?}: mean {} has no sum and count parts",
                c.alias
            )));
        }
        (AggregateKind::Mean, Some(m)) => Some(MeanNoise {
            parts: m,
            // The parts carry variances only; the scale follows from them.
            sum: Noise::new(shape, false, 0.0, m.sum_variance),
            count: Noise::new(shape, true, 0.0, m.count_variance),
        }),
        _ => None,
    };
    // Counts are noised on the integers, sums on a fine lattice of the reals. A mean
    // cell's own scale and variance are the node's delta-method figures, not a noise
    // distribution: its parts carry the noise.
    let noise = match kind {
        AggregateKind::Count | AggregateKind::Sum => Noise::new(
            shape,
            kind == AggregateKind::Count,
            c.noise_scale,
            c.variance,
        ),
        _ => Noise::Unknown {
            variance: c.variance,
        },
    };
    Ok(NodeCell {
        estimate: c.estimate,
        noisy_value: c.noisy_value,
        variance: c.variance,
        ci95_low: c.ci95.0,
        ci95_high: c.ci95.1,
        suppressed: c.suppressed,
        suppression_reason: c.suppression_reason.unwrap_or_default(),
        noise,
        mean,
    })
}

/// One combined figure.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Cell {
    pub alias: String,
    pub estimate: f64,
    pub standard_error: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    pub suppressed: bool,
    pub suppression_reason: String,
    pub contributors: u32,
    /// How the interval was formed, when that is something a reader must know (a
    /// conservative bound for a mean with a small count, a distribution-free bound when
    /// a partner's mechanism is unknown). Empty otherwise.
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Row {
    pub key: Vec<String>,
    pub cells: Vec<Cell>,
    /// How many of the partners this figure is over (all answering partners for the
    /// system total, the answering partners in the Place or PCN for a breakdown) did not
    /// release this group. Their share is missing from the total, which is then biased
    /// low by an amount the interval does not cover.
    pub missing: u32,
    /// A sentence for the analyst when `missing > 0`; empty otherwise.
    pub note: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Partner,
    Place,
    Pcn,
}

impl Level {
    pub fn parse(s: &str) -> Option<Level> {
        [Level::Partner, Level::Place, Level::Pcn]
            .into_iter()
            .find(|l| l.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Level::Partner => "partner",
            Level::Place => "place",
            Level::Pcn => "pcn",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Breakdown {
    pub level: Level,
    pub label: String,
    pub rows: Vec<Row>,
}

/// The system-level answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Combined {
    pub rows: Vec<Row>,
    pub breakdowns: Vec<Breakdown>,
    /// Strictest minimum reportable count among the answering nodes.
    pub min_reportable_count: f64,
    pub epsilon_spent_per_node: f64,
    /// Whether displayed figures were rounded (see the module docs).
    pub rounded: bool,
    /// Sentences about the whole answer an analyst must see (e.g. that a query of SUMs
    /// alone is not small-number suppressed).
    pub notes: Vec<String>,
}

/// Whether a node's answer shows it rounds (fail closed: yes unless shown otherwise).
pub fn node_rounds(expected: &Expected, a: &NodeAnswer) -> bool {
    let mut unrounded_seen = false;
    for row in &a.rows {
        for (c, kind) in row.cells.iter().zip(&expected.kinds) {
            if c.suppressed || !matches!(kind, AggregateKind::Count | AggregateKind::Sum) {
                continue;
            }
            if c.estimate != c.noisy_value {
                return true;
            }
            if (c.noisy_value / 5.0).fract() != 0.0 {
                unrounded_seen = true;
            }
        }
    }
    !unrounded_seen
}

fn round_to(x: f64, step: f64) -> f64 {
    // `+ 0.0` turns -0.0 into 0.0 so "−0" is never displayed.
    (x / step).round() * step + 0.0
}

fn floor_to(x: f64, step: f64) -> f64 {
    // The small tolerance keeps an exact multiple (e.g. 0.3 / 0.1) from dropping a step.
    ((x / step) + 1e-9).floor() * step + 0.0
}

fn ceil_to(x: f64, step: f64) -> f64 {
    ((x / step) - 1e-9).ceil() * step + 0.0
}

fn suppressed_cell(alias: &str, reason: impl Into<String>, contributors: u32) -> Cell {
    Cell {
        alias: alias.to_string(),
        suppressed: true,
        suppression_reason: reason.into(),
        contributors,
        ..Cell::default()
    }
}

/// Intervals for a sum of independent node noises, each symmetric about zero.
///
/// For a few terms the bound is computed from the exact distribution: each term's noise
/// `X` is replaced by `Y = h·⌈X/h⌉ ≥ X` on a common grid of step `h` (exact when every
/// term lives on the integers and `h` is a whole number), the `Y`s are convolved
/// exactly, and the smallest grid point `t ≥ 0` with `2·P(ΣY > t) ≤ α` is returned.
/// Since `ΣX ≤ ΣY` and `ΣX` is symmetric, `P(|ΣX| > t) ≤ 2·P(ΣY > t) ≤ α`: the
/// interval covers at least `1 − α` whatever the scales, and rounding up can widen it
/// by at most `n·h = GAMMA·sd`. Mass left outside each term's grid is counted as
/// exceeding every bound.
pub mod noise_sum {
    use std::collections::HashMap;

    /// Up to this many terms the bound is computed from the exact distribution; beyond
    /// it, a Cornish–Fisher-corrected normal interval (the convolution grows with the
    /// square of the number of terms, and with many terms the sum is close to normal
    /// unless a few dominate, which the kurtosis correction accounts for).
    pub const MAX_EXACT_TERMS: usize = 4;
    /// Grid step `h = GAMMA·sd/n`: rounding every term up moves the sum by < GAMMA·sd.
    const GAMMA: f64 = 0.05;
    /// Probability left beyond each term's grid, and trimmed from each end of the
    /// running sum (the upper end counted as exceeding every bound, the lower moved up
    /// onto the first point kept; both only make the sum larger).
    const TAIL: f64 = 1e-12;
    /// Upper limit on grid points summed over the terms (keeps the cost bounded).
    const MAX_GRID: f64 = 60_000.0;
    /// Below this sigma the discrete Gaussian's tail is summed exactly; above it the
    /// continuous tail at the same point is used, which overstates the discrete tail by
    /// about half a lattice step (conservative).
    const DISCRETE_GAUSSIAN_EXACT_BELOW: f64 = 2.0;

    /// The noise distribution's family (OpenDP's discrete Laplace or discrete Gaussian).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Shape {
        Laplace,
        Gaussian,
    }

    /// One node's noise on one figure: on the integers for counts; for sums on a lattice
    /// fine enough (OpenDP chooses it far below the scale) to be treated as the reals.
    /// `scale` is the Laplace `b` or the Gaussian `sigma`.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub struct Dist {
        pub shape: Shape,
        pub integer: bool,
        pub scale: f64,
    }

    /// What the coordinator knows about one figure's noise.
    #[derive(Debug, Clone, Copy, PartialEq)]
    pub enum Noise {
        Known(Dist),
        /// The node did not name a mechanism we know: only the variance is trusted.
        Unknown {
            variance: f64,
        },
    }

    /// How an interval was formed.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Method {
        /// From the exact distribution of the sum (a bound that covers ≥ 1 − α).
        Exact,
        /// Normal with a Cornish–Fisher kurtosis correction (many terms).
        CornishFisher,
        /// Distribution-free: some term's mechanism is unknown.
        Chebyshev,
    }

    impl Noise {
        /// The noise a node described. The scale is the larger of the reported scale
        /// and the one implied by the reported variance, so a node whose two fields
        /// disagree gets the wider interval, never the narrower.
        pub fn new(shape: Option<Shape>, integer: bool, scale: f64, variance: f64) -> Noise {
            let Some(shape) = shape else {
                return Noise::Unknown { variance };
            };
            let from_variance = match (shape, integer) {
                (Shape::Laplace, true) => discrete_laplace_scale(variance),
                (Shape::Laplace, false) => (variance / 2.0).sqrt(),
                (Shape::Gaussian, _) => variance.sqrt(),
            };
            Noise::Known(Dist {
                shape,
                integer,
                scale: scale.max(from_variance),
            })
        }

        /// The same family with the same variance, on the reals.
        pub fn real_valued(&self) -> Noise {
            match self {
                Noise::Known(d) if d.integer => {
                    let v = d.variance();
                    let scale = match d.shape {
                        Shape::Laplace => (v / 2.0).sqrt(),
                        Shape::Gaussian => v.sqrt(),
                    };
                    Noise::Known(Dist {
                        shape: d.shape,
                        integer: false,
                        scale,
                    })
                }
                other => *other,
            }
        }

        /// This noise multiplied by `k`, on the reals (an integer lattice scaled by `k`
        /// is not the integers, so a count's noise becomes its real-valued twin).
        pub fn scaled(&self, k: f64) -> Noise {
            match self.real_valued() {
                Noise::Known(d) => Noise::Known(Dist {
                    scale: d.scale * k.abs(),
                    ..d
                }),
                Noise::Unknown { variance } => Noise::Unknown {
                    variance: variance * k * k,
                },
            }
        }

        pub fn variance(&self) -> f64 {
            match self {
                Noise::Known(d) => d.variance(),
                Noise::Unknown { variance } => *variance,
            }
        }
    }

    /// The discrete Laplace scale b whose variance 2q/(1−q)², q = e^(−1/b), is `v`.
    fn discrete_laplace_scale(v: f64) -> f64 {
        if !(v > 0.0 && v.is_finite()) {
            return 0.0;
        }
        // The smaller root of v·q² − (2v+2)·q + v = 0, written without cancellation.
        let root = (2.0 * v + 1.0).sqrt();
        let one_minus_q = (1.0 + root) / ((v + 1.0) + root);
        1.0 / -(-one_minus_q).ln_1p()
    }

    impl Dist {
        fn q(&self) -> f64 {
            (-1.0 / self.scale).exp()
        }

        fn one_minus_q(&self) -> f64 {
            -(-1.0 / self.scale).exp_m1()
        }

        pub fn variance(&self) -> f64 {
            let s = self.scale;
            match (self.shape, self.integer) {
                (Shape::Laplace, true) => 2.0 * self.q() / self.one_minus_q().powi(2),
                (Shape::Laplace, false) => 2.0 * s * s,
                // The discrete Gaussian's variance is just below sigma²: an upper bound.
                (Shape::Gaussian, _) => s * s,
            }
        }

        /// Fourth cumulant (0 for the Gaussians; the discrete one's is slightly
        /// negative, so 0 errs wide).
        fn kappa4(&self) -> f64 {
            let s = self.scale;
            match (self.shape, self.integer) {
                (Shape::Laplace, true) => {
                    let q = self.q();
                    2.0 * q * (1.0 + 4.0 * q + q * q) / self.one_minus_q().powi(4)
                }
                (Shape::Laplace, false) => 12.0 * s.powi(4),
                (Shape::Gaussian, _) => 0.0,
            }
        }

        /// A point beyond which at most `TAIL` of the mass lies (the grid's reach; the
        /// mass actually left out is computed exactly).
        fn radius(&self) -> f64 {
            let r = match self.shape {
                Shape::Laplace => self.scale * (1.0 / TAIL).ln(),
                Shape::Gaussian => self.scale * (2.0 * (1.0 / TAIL).ln()).sqrt(),
            };
            if self.integer { r + 1.0 } else { r }
        }

        /// P(X > k) for a whole number k ≥ 0 (integer distributions).
        fn upper_int(&self, k: f64) -> f64 {
            match self.shape {
                Shape::Laplace => (-(k + 1.0) / self.scale).exp() / (1.0 + self.q()),
                Shape::Gaussian if self.scale < DISCRETE_GAUSSIAN_EXACT_BELOW => {
                    let s2 = 2.0 * self.scale * self.scale;
                    let reach = (12.0 * self.scale).ceil() + 1.0;
                    let w = |j: f64| (-(j * j) / s2).exp();
                    let mut total = w(0.0);
                    let mut tail = 0.0;
                    let mut j = 1.0;
                    while j <= reach {
                        total += 2.0 * w(j);
                        if j > k {
                            tail += w(j);
                        }
                        j += 1.0;
                    }
                    tail / total
                }
                Shape::Gaussian => normal_upper(k / self.scale),
            }
        }

        /// P(X > x) for x ≥ 0.
        fn upper(&self, x: f64) -> f64 {
            if self.integer {
                return self.upper_int(x.floor());
            }
            match self.shape {
                Shape::Laplace => 0.5 * (-x / self.scale).exp(),
                Shape::Gaussian => normal_upper(x / self.scale),
            }
        }

        /// P(X ≤ x) for x < 0, by symmetry.
        fn lower(&self, x: f64) -> f64 {
            if self.integer {
                // P(X ≤ ⌊x⌋) = P(X ≥ −⌊x⌋) = P(X > −⌊x⌋ − 1).
                self.upper_int(-x.floor() - 1.0)
            } else {
                self.upper(-x)
            }
        }
    }

    /// Upper tail of the standard normal, P(Z > z).
    pub fn normal_upper(z: f64) -> f64 {
        0.5 * erfc(z / std::f64::consts::SQRT_2)
    }

    /// Complementary error function (Numerical Recipes' Chebyshev fit, relative error
    /// below 1.2e-7 everywhere: far inside the slack the rounding-up grid adds).
    fn erfc(x: f64) -> f64 {
        let z = x.abs();
        let t = 1.0 / (1.0 + 0.5 * z);
        let poly = -z * z - 1.265_512_23
            + t * (1.000_023_68
                + t * (0.374_091_96
                    + t * (0.096_784_18
                        + t * (-0.186_288_06
                            + t * (0.278_868_07
                                + t * (-1.135_203_98
                                    + t * (1.488_515_87
                                        + t * (-0.822_152_23 + t * 0.170_872_77))))))));
        let r = t * poly.exp();
        if x >= 0.0 { r } else { 2.0 - r }
    }

    /// z with P(|Z| > z) = alpha for a standard normal Z.
    fn normal_two_sided(alpha: f64) -> f64 {
        let (mut lo, mut hi) = (0.0, 40.0);
        for _ in 0..100 {
            let mid = 0.5 * (lo + hi);
            if 2.0 * normal_upper(mid) > alpha {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }

    /// A sub-probability mass function on the grid points lo·h, (lo+1)·h, …, plus the
    /// mass beyond the last point (`overflow`).
    struct Grid {
        lo: i64,
        pmf: Vec<f64>,
        overflow: f64,
    }

    /// The distribution of `h·⌈X/h⌉`, with the mass below the first point moved up to
    /// it (which only raises the variable, so stays conservative for the upper tail).
    fn discretise(d: &Dist, h: f64) -> Grid {
        let r = d.radius();
        let lo = (-r / h).floor() as i64;
        let hi = (r / h).ceil() as i64;
        let mut pmf = Vec::with_capacity(usize::try_from(hi - lo + 1).unwrap_or(0));
        pmf.push(d.lower(lo as f64 * h));
        for m in lo + 1..=hi {
            let (x0, x1) = ((m - 1) as f64 * h, m as f64 * h);
            // Tails are computed from the tail side so no small mass is lost to
            // cancellation against 1.
            let p = if x1 < 0.0 {
                d.lower(x1) - d.lower(x0)
            } else if x0 >= 0.0 {
                d.upper(x0) - d.upper(x1)
            } else {
                1.0 - d.lower(x0) - d.upper(x1)
            };
            pmf.push(p.max(0.0));
        }
        Grid {
            lo,
            pmf,
            overflow: d.upper(hi as f64 * h),
        }
    }

    fn convolve(a: &Grid, b: &Grid) -> Grid {
        let mut out = vec![0.0; a.pmf.len() + b.pmf.len() - 1];
        for (i, &x) in a.pmf.iter().enumerate() {
            if x == 0.0 {
                continue;
            }
            out[i..i + b.pmf.len()]
                .iter_mut()
                .zip(&b.pmf)
                .for_each(|(o, y)| *o += x * y);
        }
        trim(Grid {
            lo: a.lo + b.lo,
            pmf: out,
            overflow: 1.0 - (1.0 - a.overflow) * (1.0 - b.overflow),
        })
    }

    /// Cut the far tails of a running sum (at most `TAIL` from each end) so its support
    /// grows with the spread of the sum, not with the sum of the terms' reaches. Both
    /// moves only make the variable larger, so the upper bound stays valid.
    fn trim(mut g: Grid) -> Grid {
        let mut top = g.pmf.len();
        let mut cut = 0.0;
        while top > 1 && cut + g.pmf[top - 1] <= TAIL {
            cut += g.pmf[top - 1];
            top -= 1;
        }
        g.pmf.truncate(top);
        g.overflow += cut;
        let mut low = 0;
        let mut moved = 0.0;
        while low + 1 < g.pmf.len() && moved + g.pmf[low] <= TAIL {
            moved += g.pmf[low];
            low += 1;
        }
        if low > 0 {
            g.pmf.drain(..low);
            g.pmf[0] += moved;
            g.lo += low as i64;
        }
        g
    }

    /// The smallest grid point t ≥ 0 with 2·P(S > t) ≤ alpha, if the grid reaches it.
    fn upper_bound(g: &Grid, h: f64, alpha: f64) -> Option<f64> {
        let target = alpha / 2.0;
        let mut tail = g.overflow;
        if tail > target {
            return None;
        }
        // Walk down from the top: `tail` is P(S > m·h) at each step.
        let mut m = g.lo + g.pmf.len() as i64 - 1;
        while m > 0 {
            let p = usize::try_from(m - g.lo)
                .ok()
                .and_then(|i| g.pmf.get(i))
                .copied()
                .unwrap_or(0.0);
            if tail + p > target {
                return Some(m as f64 * h);
            }
            tail += p;
            m -= 1;
        }
        Some(0.0)
    }

    fn exact(terms: &[Dist], alpha: f64) -> Option<f64> {
        let sd = terms.iter().map(Dist::variance).sum::<f64>().sqrt();
        let n = terms.len() as f64;
        let mut h = GAMMA * sd / n;
        let points: f64 = terms.iter().map(|d| 2.0 * d.radius() / h).sum();
        if points > MAX_GRID {
            h *= points / MAX_GRID;
        }
        if terms.iter().all(|d| d.integer) {
            // A whole-number step keeps integer noise exactly on the grid (h = 1: no
            // rounding at all).
            h = h.floor().max(1.0);
        }
        if !(h.is_finite() && h > 0.0) {
            return None;
        }
        // Smallest first, so the running sum stays short for as long as possible.
        let mut order: Vec<&Dist> = terms.iter().collect();
        order.sort_by(|a, b| a.radius().total_cmp(&b.radius()));
        let mut acc: Option<Grid> = None;
        for d in order {
            let g = discretise(d, h);
            acc = Some(match acc {
                None => g,
                Some(a) => convolve(&a, &g),
            });
        }
        upper_bound(&acc?, h, alpha)
    }

    fn cornish_fisher(terms: &[Dist], alpha: f64) -> f64 {
        let var: f64 = terms.iter().map(Dist::variance).sum();
        let k4: f64 = terms.iter().map(Dist::kappa4).sum();
        let z = normal_two_sided(alpha);
        // For a symmetric sum only the kurtosis term of the expansion remains; it
        // widens the interval when one heavy-tailed term dominates (a single Laplace
        // gets 2.17 sd against its exact 2.12).
        let zc = z + (z.powi(3) - 3.0 * z) * (k4 / (var * var)) / 24.0;
        let t = zc * var.sqrt();
        if terms.iter().all(|d| d.integer) {
            // The sum lives on the integers: P(|S| ≤ m) ≈ P(|normal| ≤ m + ½).
            (t - 0.5).ceil().max(0.0)
        } else {
            t
        }
    }

    /// Per term (Gaussian?, integer?, scale bits), sorted; and alpha's bits.
    type CacheKey = (Vec<(bool, bool, u64)>, u64);

    /// Half-widths, memoised: every row a given set of partners contributes to has the
    /// same noise distributions, so the convolution is done once per query and set.
    #[derive(Debug, Default)]
    pub struct Intervals {
        cache: HashMap<CacheKey, (f64, Method)>,
    }

    impl Intervals {
        /// A half-width t with P(|Σ noise| > t) ≤ alpha (exactly so for
        /// [`Method::Exact`] and [`Method::Chebyshev`]), and how it was formed.
        pub fn half_width(&mut self, terms: &[Noise], alpha: f64) -> (f64, Method) {
            // Point masses (zero scale) add nothing.
            let mut known: Vec<Dist> = Vec::with_capacity(terms.len());
            let mut unknown_var = None::<f64>;
            for t in terms {
                match t {
                    Noise::Known(d) if d.scale > 0.0 && d.scale.is_finite() => known.push(*d),
                    Noise::Known(_) => {}
                    Noise::Unknown { variance } => {
                        *unknown_var.get_or_insert(0.0) += variance;
                    }
                }
            }
            if let Some(v) = unknown_var {
                // Chebyshev holds for any distribution with this variance.
                let var = v + known.iter().map(Dist::variance).sum::<f64>();
                return ((var / alpha).sqrt(), Method::Chebyshev);
            }
            if known.is_empty() {
                return (0.0, Method::Exact);
            }
            let mut terms_key: Vec<(bool, bool, u64)> = known
                .iter()
                .map(|d| (d.shape == Shape::Gaussian, d.integer, d.scale.to_bits()))
                .collect();
            terms_key.sort_unstable();
            let key = (terms_key, alpha.to_bits());
            if let Some(hit) = self.cache.get(&key) {
                return *hit;
            }
            let out = if known.len() <= MAX_EXACT_TERMS {
                match exact(&known, alpha) {
                    Some(t) => (t, Method::Exact),
                    None => (cornish_fisher(&known, alpha), Method::CornishFisher),
                }
            } else {
                (cornish_fisher(&known, alpha), Method::CornishFisher)
            };
            self.cache.insert(key, out);
            out
        }
    }

    #[cfg(test)]
    pub(super) fn exact_for_test(terms: &[Dist], alpha: f64) -> Option<f64> {
        exact(terms, alpha)
    }

    #[cfg(test)]
    pub(super) fn cornish_fisher_for_test(terms: &[Dist], alpha: f64) -> f64 {
        cornish_fisher(terms, alpha)
    }
}

use noise_sum::{Intervals, Method};

fn method_note(m: Method) -> &'static str {
    match m {
        Method::Chebyshev => {
            "A partner did not say which noise mechanism it used, so this interval is a \
             distribution-free (Chebyshev) bound: honest, but wider than usual."
        }
        Method::Exact | Method::CornishFisher => "",
    }
}

/// A total (COUNT or SUM) over the given nodes' cells.
fn total_cell(
    alias: &str,
    kind: AggregateKind,
    cells: &[&NodeCell],
    rounded: bool,
    iv: &mut Intervals,
) -> Cell {
    let n = u32::try_from(cells.len()).unwrap_or(u32::MAX);
    let est: f64 = cells.iter().map(|c| c.noisy_value).sum();
    let var: f64 = cells.iter().map(|c| c.variance).sum();
    let se = var.sqrt();
    let (mut lo, mut hi, note) = match cells {
        // One contributor: its own interval comes from the mechanism's exact
        // distribution.
        [only] => (only.ci95_low, only.ci95_high, ""),
        _ => {
            let noises: Vec<Noise> = cells.iter().map(|c| c.noise).collect();
            let (t, m) = iv.half_width(&noises, 0.05);
            (est - t, est + t, method_note(m))
        }
    };
    if kind == AggregateKind::Count {
        // A count is never negative: trimming the interval to where the true value can
        // lie only improves its coverage.
        lo = lo.max(0.0);
    }
    let mut e = est;
    if rounded {
        // Round the bounds outwards so rounding never narrows the interval.
        (e, lo, hi) = (round_to(e, 5.0), floor_to(lo, 5.0), ceil_to(hi, 5.0));
    }
    Cell {
        alias: alias.to_string(),
        estimate: e,
        standard_error: se,
        ci95_low: lo,
        ci95_high: hi,
        contributors: n,
        note: note.to_string(),
        ..Cell::default()
    }
}

/// A mean over the given nodes' parts, as the ratio `R = S / C` of the total noisy sum
/// and the total noisy count.
///
/// The delta method linearises `1/C` around the noisy count: `var(R) ≈ (var_S +
/// R²·var_C) / C²`. That is accurate while the count's relative error `r = sd_C / C` is
/// small. When it is not, the method is dishonest in two ways: the neglected terms grow
/// like `r²` and make `R` skewed with a heavy tail (a count that came out low inflates
/// `R` without bound as it nears zero), and the standard error is itself computed from
/// the noisy `C`, so a count that came out high shrinks the interval exactly when the
/// estimate is off. Simulation with one discrete Laplace partner (b = 4) gives 93% for
/// the nominal 95% at C = 20 (r ≈ 0.28) and 90% at C = 10.
///
/// So: while `r ≤` [`MEAN_MAX_COUNT_RELATIVE_ERROR`] the delta-method standard error is
/// used with a multiplier no smaller than the sum's and the count's own exact 95%
/// multipliers (Laplace noise needs more than 1.96); above it the interval is the
/// conservative box `[S ± a] / [C ± c]` from separate 97.5% intervals for the sum and
/// the count (together ≥ 95% by the union bound), and the cell says why; and when the
/// count's interval reaches zero the mean is not reported at all.
fn mean_cell(alias: &str, parts: &[MeanNoise], rounded: bool, iv: &mut Intervals) -> (Cell, f64) {
    let n = u32::try_from(parts.len()).unwrap_or(u32::MAX);
    // Each partner's mean is `c_i + S_i / C_i` (its values summed centred on c_i, the
    // middle of its bounds, or c_i = 0). Over partners the mean is `c0 + A / C` with
    // `A = Σ (S_i + (c_i − c0)·C_i)`: when every partner used the same centre (the
    // same bounds, the usual case) the second term vanishes; otherwise A's noise
    // includes the counts' noise scaled by `d_i = c_i − c0`, correlated with C's.
    let c0 = parts.first().map_or(0.0, |m| m.parts.centre);
    let d = |m: &MeanNoise| m.parts.centre - c0;
    let s: f64 = parts
        .iter()
        .map(|m| m.parts.noisy_sum + d(m) * m.parts.noisy_count)
        .sum();
    let vs: f64 = parts
        .iter()
        .map(|m| m.parts.sum_variance + d(m) * d(m) * m.parts.count_variance)
        .sum();
    let cov: f64 = parts.iter().map(|m| d(m) * m.parts.count_variance).sum();
    let cnt: f64 = parts.iter().map(|m| m.parts.noisy_count).sum();
    let vc: f64 = parts.iter().map(|m| m.parts.count_variance).sum();
    if cnt <= 0.0 {
        let cell = suppressed_cell(
            alias,
            "The combined noisy count is not positive, so no mean can be formed.",
            n,
        );
        return (cell, cnt);
    }
    // A's noise: each partner's sum noise, and (mixed centres only) a real-valued twin
    // of its count noise scaled by d_i, as the delta method's multiplier treats counts.
    let mut sum_noise: Vec<Noise> = parts.iter().map(|m| m.sum).collect();
    sum_noise.extend(
        parts
            .iter()
            .filter(|m| d(m) != 0.0)
            .map(|m| m.count.scaled(d(m))),
    );
    let noise = PartNoises {
        sum: sum_noise,
        count: parts.iter().map(|m| m.count).collect(),
    };
    let ratio = s / cnt;
    // var(A/C) ≈ (var A − 2R·cov(A, C) + R²·var C) / C², R = A / C.
    let se = ((vs - 2.0 * ratio * cov + ratio * ratio * vc).max(0.0) / (cnt * cnt)).sqrt();
    let relative_error = vc.sqrt() / cnt;
    let (lo, hi, note) = if relative_error <= MEAN_MAX_COUNT_RELATIVE_ERROR {
        noise.delta_method_interval(ratio, se, iv)
    } else {
        let Some(interval) = noise.box_interval(s, cnt, relative_error, iv) else {
            let cell = suppressed_cell(
                alias,
                "Mean not reported: the count behind it is too small for its noise (its \
                 97.5% interval reaches zero), so the mean could be almost anything. Ask \
                 for a larger group or spend more epsilon.",
                n,
            );
            return (cell, cnt);
        };
        interval
    };
    // The centre is a constant: it shifts the estimate and its interval alike. (The
    // box interval above bounds A / C whatever the correlation of A and C.)
    let (mut e, mut lo, mut hi) = (c0 + ratio, c0 + lo, c0 + hi);
    if rounded {
        (e, lo, hi) = (round_to(e, 0.1), floor_to(lo, 0.1), ceil_to(hi, 0.1));
    }
    let cell = Cell {
        alias: alias.to_string(),
        estimate: e,
        standard_error: se,
        ci95_low: lo,
        ci95_high: hi,
        contributors: n,
        note,
        ..Cell::default()
    };
    (cell, cnt)
}

/// The noises of a mean's parts over the partners: each one's sum noise and count noise.
struct PartNoises {
    sum: Vec<Noise>,
    count: Vec<Noise>,
}

impl PartNoises {
    /// The delta-method interval `ratio ± z·se`, with `z` no smaller than the sum's and
    /// the count's own exact 95% multipliers. Returns (low, high, note).
    fn delta_method_interval(&self, ratio: f64, se: f64, iv: &mut Intervals) -> (f64, f64, String) {
        let (ts, ms) = iv.half_width(&self.sum, 0.05);
        // The count's multiplier is taken from a real-valued twin of its noise (same
        // family and variance): its heavy tail matters to the mean, but the integer
        // lattice does not (the mean is not integer-valued), and the lattice alone
        // would push a small-scale count's multiplier to 2.5 or more.
        let twins: Vec<Noise> = self.count.iter().map(Noise::real_valued).collect();
        let (tc, mc) = iv.half_width(&twins, 0.05);
        // Each part's own multiplier: its exact half-width over its sd.
        let z_of = |t: f64, noise: &[Noise]| {
            let sd = noise.iter().map(Noise::variance).sum::<f64>().sqrt();
            if sd > 0.0 { t / sd } else { 0.0 }
        };
        let z = Z95.max(z_of(ts, &self.sum)).max(z_of(tc, &twins));
        let note = if ms == Method::Chebyshev || mc == Method::Chebyshev {
            method_note(Method::Chebyshev).to_string()
        } else {
            String::new()
        };
        (ratio - z * se, ratio + z * se, note)
    }

    /// The conservative box `[S ± a] / [C ± c]` from separate 97.5% intervals for the
    /// noisy sum `s` and count `cnt`, or `None` when the count's interval reaches zero
    /// (the mean could then be almost anything). Returns (low, high, note).
    fn box_interval(
        &self,
        s: f64,
        cnt: f64,
        relative_error: f64,
        iv: &mut Intervals,
    ) -> Option<(f64, f64, String)> {
        let (a, _) = iv.half_width(&self.sum, 0.025);
        let (c, _) = iv.half_width(&self.count, 0.025);
        if cnt - c <= 0.0 {
            return None;
        }
        // Every corner has a positive denominator, so the ratio is monotone in each
        // coordinate and the extremes are at these corners.
        let lo = if s - a >= 0.0 {
            (s - a) / (cnt + c)
        } else {
            (s - a) / (cnt - c)
        };
        let hi = if s + a >= 0.0 {
            (s + a) / (cnt - c)
        } else {
            (s + a) / (cnt + c)
        };
        let note = format!(
            "The count behind this mean is small for its noise (relative error {:.0}%), \
             so the usual delta-method interval would be too narrow; this interval is a \
             conservative bound from separate 97.5% intervals for the total and the count.",
            relative_error * 100.0
        );
        Some((lo, hi, note))
    }
}

/// Combine the cells of one group from several nodes (no disclosure rules yet).
fn combine_group(
    expected: &Expected,
    parts: &[&NodeRow],
    threshold: f64,
    rounded: bool,
    iv: &mut Intervals,
) -> Vec<Cell> {
    let n = u32::try_from(parts.len()).unwrap_or(u32::MAX);
    let mut cells: Vec<Cell> = Vec::with_capacity(expected.aliases.len());
    // The count that decides group suppression: the first COUNT, else the first MEAN's.
    let mut group_count: Option<f64> = None;
    for (i, (alias, kind)) in expected.aliases.iter().zip(&expected.kinds).enumerate() {
        let cell = match kind {
            AggregateKind::Count | AggregateKind::Sum => {
                let column: Vec<&NodeCell> = parts.iter().map(|r| &r.cells[i]).collect();
                let c = total_cell(alias, *kind, &column, rounded, iv);
                // Decided on the unrounded noisy total, as at the nodes.
                let total: f64 = column.iter().map(|c| c.noisy_value).sum();
                if *kind == AggregateKind::Count && group_count.is_none() {
                    group_count = Some(total);
                }
                if *kind == AggregateKind::Count && total <= threshold {
                    suppressed_cell(alias, low_count_reason(threshold), n)
                } else {
                    c
                }
            }
            AggregateKind::Mean => {
                // validate() guarantees mean parts on MEAN cells.
                let ps: Vec<MeanNoise> = parts.iter().filter_map(|r| r.cells[i].mean).collect();
                let (c, cnt) = mean_cell(alias, &ps, rounded, iv);
                if group_count.is_none() {
                    group_count = Some(cnt);
                }
                c
            }
            AggregateKind::Quantile(_) => {
                suppressed_cell(alias, "Quantiles cannot be combined across partners.", n)
            }
        };
        cells.push(cell);
    }
    if let Some(c) = group_count
        && c <= threshold
    {
        for cell in &mut cells {
            if !cell.suppressed {
                *cell = suppressed_cell(&cell.alias, low_count_reason(threshold), n);
            }
        }
    }
    cells
}

/// The reason a combined cell gives when it is suppressed as a small count (so that
/// derived figures such as rates can tell it from the other suppression rules: it says
/// only that the count is at or below `threshold`).
pub fn low_count_reason(threshold: f64) -> String {
    format!(
        "Suppressed: the group's combined count is at or below {threshold}, the strictest \
         minimum reportable count among the answering partners."
    )
}

const ONLY_PROTECTED_REASON: &str = "Suppressed: only partners whose policy allows their \
     figures only inside a wider system total released this group, so showing it would \
     show them on their own. Coarser groups (fewer group columns, wider bins or broader \
     categories) may bring in other partners.";

const SINGLE_SUPPRESSED_REASON: &str = "Suppressed: only one partner released this group \
     and that partner suppressed this figure itself (a small number), so the system \
     figure would be its figure.";

const WITHHELD_REASON: &str = "Withheld: together with the system total and the figures \
     already shown, this figure would let a reader work out by subtraction the figure of \
     another partner that may not be shown on its own (its policy allows system totals \
     only, or it suppressed the figure as a small number). The system total is not \
     affected.";

const SUM_ONLY_NOTE: &str = "This query has no COUNT or AVG, so no group could be tested \
     against the minimum reportable count: small groups are not suppressed (here or at the \
     partners) and are protected by the noise alone, which differential privacy sizes to \
     the largest contribution one person can make. Add COUNT(*) to have small groups \
     suppressed.";

fn missing_note(missing: usize, of: usize, within: &str) -> String {
    let released = of.saturating_sub(missing);
    let (them, were) = if missing == 1 {
        ("The other partner", "its")
    } else {
        ("The other partners", "their")
    };
    format!(
        "Released by {released} of the {of} answering partners{within}. {them} did not \
         release this group (below {were} release threshold, or outside the categories or \
         bins {were} policy declares), so {were} share is missing from this total, which \
         may be too low by more than the interval shows."
    )
}

/// The rows of the given answers grouped by key, in order of first appearance, with
/// the positions (in `answers`) of the answers that released each.
type Group<'a> = (Vec<String>, Vec<usize>, Vec<&'a NodeRow>);

fn group_rows<'a>(answers: &'a [NodeAnswer], which: &[usize]) -> Vec<Group<'a>> {
    let mut order: Vec<Group<'a>> = Vec::new();
    let mut index: HashMap<&[String], usize> = HashMap::new();
    for &ai in which {
        for row in &answers[ai].rows {
            match index.get(row.key.as_slice()) {
                Some(&i) => {
                    order[i].1.push(ai);
                    order[i].2.push(row);
                }
                None => {
                    index.insert(row.key.as_slice(), order.len());
                    order.push((row.key.clone(), vec![ai], vec![row]));
                }
            }
        }
    }
    order
}

/// Row-reduced basis of published linear combinations of node answers, used to check
/// that no protected figure can be recovered by adding and subtracting published
/// figures.
#[derive(Debug, Clone)]
struct Span {
    n: usize,
    /// Rows in reduced row echelon form, with their pivot columns.
    rows: Vec<(usize, Vec<f64>)>,
}

const EPS: f64 = 1e-9;

impl Span {
    fn new(n: usize) -> Span {
        Span {
            n,
            rows: Vec::new(),
        }
    }

    /// Add a vector; keeps the basis fully reduced.
    fn add(&mut self, v: &[f64]) {
        let mut v = v.to_vec();
        for (p, r) in &self.rows {
            let f = v[*p];
            if f.abs() > EPS {
                v.iter_mut().zip(r).for_each(|(x, y)| *x -= f * y);
            }
        }
        let Some(p) = v.iter().position(|x| x.abs() > EPS) else {
            return;
        };
        let pivot = v[p];
        v.iter_mut().for_each(|x| *x /= pivot);
        for (_, r) in &mut self.rows {
            let f = r[p];
            if f.abs() > EPS {
                r.iter_mut().zip(&v).for_each(|(x, y)| *x -= f * y);
            }
        }
        self.rows.push((p, v));
    }

    /// Whether the unit vector of `j` lies in the span: in a fully reduced basis that
    /// means some row is exactly `e_j`.
    fn contains_unit(&self, j: usize) -> bool {
        self.rows.iter().any(|(p, r)| {
            *p == j
                && r.iter()
                    .enumerate()
                    .all(|(k, x)| if k == j { true } else { x.abs() <= EPS })
        })
    }

    fn reveals_any(&self, protected: &[usize]) -> bool {
        protected.iter().any(|&j| self.contains_unit(j))
    }

    fn indicator(&self, members: &[usize]) -> Vec<f64> {
        let mut v = vec![0.0; self.n];
        members.iter().for_each(|&i| v[i] = 1.0);
        v
    }
}

/// What has been published for one result row, per aggregate, over the partners that
/// released the row. Rows are disjoint groups of people and each aggregate's noise is
/// drawn separately, so no published figure of one row or aggregate helps recover
/// another's: one span per (row, aggregate) is the whole picture.
#[derive(Debug)]
struct RowGuard {
    /// Positions (in the answers) of the partners that released this row, ascending.
    members: Vec<usize>,
    /// Per aggregate: positions in `members` whose figure is protected.
    protected: Vec<Vec<usize>>,
    spans: Vec<Span>,
}

impl RowGuard {
    fn new(answers: &[NodeAnswer], members: &[usize], parts: &[&NodeRow], aggs: usize) -> Self {
        let mut order: Vec<(usize, &NodeRow)> =
            members.iter().copied().zip(parts.iter().copied()).collect();
        order.sort_by_key(|(i, _)| *i);
        let protected = (0..aggs)
            .map(|a| {
                order
                    .iter()
                    .enumerate()
                    .filter(|(_, (i, row))| {
                        answers[*i].scope == Scope::SystemTotalOnly || row.cells[a].suppressed
                    })
                    .map(|(local, _)| local)
                    .collect()
            })
            .collect();
        RowGuard {
            members: order.iter().map(|(i, _)| *i).collect(),
            protected,
            spans: vec![Span::new(members.len()); aggs],
        }
    }

    /// Publish the sum of aggregate `a` over `who` (positions in the answers) unless,
    /// with what is already published, it would let a protected figure be recovered.
    fn try_publish(&mut self, a: usize, who: &[usize]) -> bool {
        let local: Vec<usize> = who
            .iter()
            .filter_map(|i| self.members.binary_search(i).ok())
            .collect();
        let span = &self.spans[a];
        let mut trial = span.clone();
        trial.add(&span.indicator(&local));
        if trial.reveals_any(&self.protected[a]) {
            false
        } else {
            self.spans[a] = trial;
            true
        }
    }
}

/// A partner's own figures as the node released them (its rounding and suppression),
/// each withheld if the row's guard says it would expose a protected figure.
fn partner_rows(
    expected: &Expected,
    answers: &[NodeAnswer],
    j: usize,
    guards: &mut [RowGuard],
    row_of: &HashMap<Vec<String>, usize>,
) -> Vec<Row> {
    let a = &answers[j];
    a.rows
        .iter()
        .map(|row| {
            let mut guard = row_of.get(&row.key).and_then(|&g| guards.get_mut(g));
            let cells = row
                .cells
                .iter()
                .zip(&expected.aliases)
                .enumerate()
                .map(|(ai, (c, alias))| {
                    if c.suppressed {
                        let reason = if c.suppression_reason.is_empty() {
                            "Suppressed by the partner's policy.".to_string()
                        } else {
                            c.suppression_reason.clone()
                        };
                        return suppressed_cell(alias, reason, 1);
                    }
                    // Fail closed: a row with no guard is never shown.
                    let ok = guard.as_mut().is_some_and(|g| g.try_publish(ai, &[j]));
                    if !ok {
                        return suppressed_cell(alias, WITHHELD_REASON, 1);
                    }
                    Cell {
                        alias: alias.clone(),
                        estimate: c.estimate,
                        standard_error: c.variance.sqrt(),
                        ci95_low: c.ci95_low,
                        ci95_high: c.ci95_high,
                        contributors: 1,
                        ..Cell::default()
                    }
                })
                .collect();
            Row {
                key: row.key.clone(),
                cells,
                missing: 0,
                note: String::new(),
            }
        })
        .collect()
}

/// A Place or PCN breakdown: per row, the combined figures of the members that
/// released it, each withheld if the row's guard says so.
#[allow(clippy::too_many_arguments)]
fn area_rows(
    expected: &Expected,
    answers: &[NodeAnswer],
    members: &[usize],
    level: Level,
    threshold: f64,
    rounded: bool,
    iv: &mut Intervals,
    guards: &mut [RowGuard],
    row_of: &HashMap<Vec<String>, usize>,
) -> Vec<Row> {
    group_rows(answers, members)
        .into_iter()
        .map(|(key, who, parts)| {
            let mut cells = combine_group(expected, &parts, threshold, rounded, iv);
            let mut guard = row_of.get(&key).and_then(|&g| guards.get_mut(g));
            for (ai, c) in cells.iter_mut().enumerate() {
                if c.suppressed {
                    continue;
                }
                if !guard.as_mut().is_some_and(|g| g.try_publish(ai, &who)) {
                    *c = suppressed_cell(&c.alias, WITHHELD_REASON, c.contributors);
                }
            }
            let missing = members.len() - who.len();
            let note = if missing > 0 && cells.iter().any(|c| !c.suppressed) {
                missing_note(
                    missing,
                    members.len(),
                    &format!(" in this {}", level.as_str()),
                )
            } else {
                String::new()
            };
            Row {
                key,
                cells,
                missing: u32::try_from(missing).unwrap_or(u32::MAX),
                note,
            }
        })
        .collect()
}

/// Combine validated answers (in registry order) into the system-level result: the
/// system total first, then the breakdowns, each figure withheld if it would make a
/// protected one recoverable from what is already shown.
pub fn combine(expected: &Expected, answers: &[NodeAnswer]) -> Combined {
    let threshold = answers
        .iter()
        .map(|a| a.min_reportable_count)
        .fold(0.0, f64::max);
    let epsilon = answers.iter().map(|a| a.epsilon_spent).fold(0.0, f64::max);
    let rounded = answers.iter().any(|a| node_rounds(expected, a));
    let mut iv = Intervals::default();
    let mut total = system_total(expected, answers, threshold, rounded, &mut iv);
    let breakdowns = breakdowns(expected, answers, threshold, rounded, &mut iv, &mut total);
    Combined {
        rows: total.rows,
        breakdowns,
        min_reportable_count: threshold,
        epsilon_spent_per_node: epsilon,
        rounded,
        notes: notes(expected),
    }
}

/// The system total of a secure-aggregation session: one noisy total per cell, with
/// the strictest member's suppression threshold and rounding. There is no partner
/// figure to break down by (none exists, not even in the coordinator's memory), so
/// there are no breakdowns and no complementary suppression to apply.
pub fn combine_secure(
    expected: &Expected,
    total: &[NodeRow],
    threshold: f64,
    rounded: bool,
    epsilon: f64,
    contributors: u32,
) -> Combined {
    let mut iv = Intervals::default();
    let rows = total
        .iter()
        .map(|r| {
            let mut cells = combine_group(expected, &[r], threshold, rounded, &mut iv);
            for c in &mut cells {
                c.contributors = contributors;
            }
            Row {
                key: r.key.clone(),
                cells,
                missing: 0,
                note: String::new(),
            }
        })
        .collect();
    Combined {
        rows,
        breakdowns: Vec::new(),
        min_reportable_count: threshold,
        epsilon_spent_per_node: epsilon,
        rounded,
        notes: notes(expected),
    }
}

/// The system total's rows, and per row the guard that the breakdowns publish through.
struct SystemTotal {
    rows: Vec<Row>,
    guards: Vec<RowGuard>,
    /// Row key → its position in `rows` and `guards`.
    row_of: HashMap<Vec<String>, usize>,
}

/// The system total, row by row, over the partners that released each row.
fn system_total(
    expected: &Expected,
    answers: &[NodeAnswer],
    threshold: f64,
    rounded: bool,
    iv: &mut Intervals,
) -> SystemTotal {
    let aggs = expected.aliases.len();
    let everyone: Vec<usize> = (0..answers.len()).collect();
    let mut total = SystemTotal {
        rows: Vec::new(),
        guards: Vec::new(),
        row_of: HashMap::new(),
    };
    for (key, members, parts) in group_rows(answers, &everyone) {
        let mut cells = combine_group(expected, &parts, threshold, rounded, iv);
        let mut guard = RowGuard::new(answers, &members, &parts, aggs);
        if members
            .iter()
            .all(|&i| answers[i].scope == Scope::SystemTotalOnly)
        {
            // Whatever else was wrong with the row, this is the reason shown: a
            // low-count reason would say something about the partners' own figures.
            for c in &mut cells {
                *c = suppressed_cell(&c.alias, ONLY_PROTECTED_REASON, c.contributors);
            }
        } else {
            for (a, c) in cells.iter_mut().enumerate() {
                if !c.suppressed && !guard.try_publish(a, &members) {
                    *c = suppressed_cell(&c.alias, SINGLE_SUPPRESSED_REASON, c.contributors);
                }
            }
        }
        let missing = answers.len() - members.len();
        let note = if missing > 0 && cells.iter().any(|c| !c.suppressed) {
            missing_note(missing, answers.len(), "")
        } else {
            String::new()
        };
        total.row_of.insert(key.clone(), total.guards.len());
        total.guards.push(guard);
        total.rows.push(Row {
            key,
            cells,
            missing: u32::try_from(missing).unwrap_or(u32::MAX),
            note,
        });
    }
    total
}

/// Candidate breakdowns in a fixed order: partners (by id), then Places, then PCNs.
/// A breakdown's order matters: each figure is published only if, with everything
/// shown before it, no protected figure becomes recoverable.
fn breakdown_candidates(answers: &[NodeAnswer]) -> Vec<(Level, String, Vec<usize>)> {
    let mut candidates: Vec<(Level, String, Vec<usize>)> = Vec::new();
    let mut partners: Vec<usize> = (0..answers.len())
        .filter(|&i| answers[i].scope == Scope::Standalone)
        .collect();
    partners.sort_by(|&a, &b| answers[a].node.id.cmp(&answers[b].node.id));
    for i in partners {
        candidates.push((Level::Partner, answers[i].node.id.clone(), vec![i]));
    }
    for level in [Level::Place, Level::Pcn] {
        let mut groups: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
        for (i, a) in answers.iter().enumerate() {
            let label = match level {
                Level::Place => a.node.place.as_str(),
                _ => a.node.pcn.as_str(),
            };
            if !label.is_empty() {
                groups.entry(label).or_default().push(i);
            }
        }
        for (label, members) in groups {
            // A system-total-only partner never appears in a sub-total, even where
            // subtraction could not isolate it.
            if members
                .iter()
                .all(|&i| answers[i].scope == Scope::Standalone)
            {
                candidates.push((level, label.to_string(), members));
            }
        }
    }
    candidates
}

/// The partner, Place and PCN breakdowns, published through the system total's guards.
fn breakdowns(
    expected: &Expected,
    answers: &[NodeAnswer],
    threshold: f64,
    rounded: bool,
    iv: &mut Intervals,
    total: &mut SystemTotal,
) -> Vec<Breakdown> {
    let mut breakdowns = Vec::new();
    for (level, label, members) in breakdown_candidates(answers) {
        let rows = match level {
            Level::Partner => partner_rows(
                expected,
                answers,
                members[0],
                &mut total.guards,
                &total.row_of,
            ),
            _ => area_rows(
                expected,
                answers,
                &members,
                level,
                threshold,
                rounded,
                iv,
                &mut total.guards,
                &total.row_of,
            ),
        };
        // A breakdown of nothing but withheld figures says nothing; leave it out (its
        // figures were not added to any span, so nothing else changes).
        let cells = || rows.iter().flat_map(|r| r.cells.iter());
        let withheld_only = cells().any(|c| c.suppression_reason == WITHHELD_REASON)
            && cells().all(|c| c.suppressed);
        if !withheld_only {
            breakdowns.push(Breakdown { level, label, rows });
        }
    }
    breakdowns
}

/// Notes about the whole result.
fn notes(expected: &Expected) -> Vec<String> {
    let mut notes = Vec::new();
    if expected.kinds.contains(&AggregateKind::Sum)
        && !expected
            .kinds
            .iter()
            .any(|k| matches!(k, AggregateKind::Count | AggregateKind::Mean))
    {
        notes.push(SUM_ONLY_NOTE.to_string());
    }
    notes
}

#[cfg(test)]
mod tests {
    use super::*;
    use phm_proto::proto;

    /// As the coordinator sees a node's answer: decoded from the wire (the answer's
    /// own checks), then checked against the query.
    fn validate(
        e: &Expected,
        node: NodeRef,
        r: proto::AggregateResult,
    ) -> Result<NodeAnswer, Malformed> {
        let a = Answer::try_from(r).map_err(|m| Malformed(m.0))?;
        super::validate(e, node, a)
    }

    fn expected(kinds: &[AggregateKind], groups: &[&str]) -> Expected {
        Expected {
            query_id: "q1".into(),
            dataset: "gp_patients".into(),
            group_columns: groups.iter().map(|s| s.to_string()).collect(),
            aliases: (0..kinds.len()).map(|i| format!("a{i}")).collect(),
            kinds: kinds.to_vec(),
        }
    }

    fn cell(alias: &str, noisy: f64, var: f64) -> proto::Cell {
        proto::Cell {
            alias: alias.into(),
            estimate: noisy,
            noisy_value: noisy,
            noise_scale: var.sqrt(),
            variance: var,
            ci95_low: noisy - 1.96 * var.sqrt(),
            ci95_high: noisy + 1.96 * var.sqrt(),
            mechanism: proto::NoiseMechanism::DiscreteGaussian as i32,
            ..Default::default()
        }
    }

    fn mean_cell(alias: &str, s: f64, vs: f64, c: f64, vc: f64) -> proto::Cell {
        proto::Cell {
            alias: alias.into(),
            estimate: s / c,
            noisy_value: s / c,
            mean: Some(proto::MeanParts {
                noisy_sum: s,
                sum_variance: vs,
                noisy_count: c,
                count_variance: vc,
                centre: 0.0,
            }),
            mechanism: proto::NoiseMechanism::DiscreteGaussian as i32,
            ..Default::default()
        }
    }

    fn result(
        e: &Expected,
        rows: Vec<(Vec<&str>, Vec<proto::Cell>)>,
        scope: proto::ReleaseScope,
    ) -> proto::AggregateResult {
        proto::AggregateResult {
            query_id: e.query_id.clone(),
            node_id: "n".into(),
            dataset: e.dataset.clone(),
            group_columns: e.group_columns.clone(),
            aggregate_aliases: e.aliases.clone(),
            rows: rows
                .into_iter()
                .map(|(k, cells)| proto::ResultRow {
                    key: k.into_iter().map(String::from).collect(),
                    cells,
                })
                .collect(),
            epsilon_spent: 0.5,
            release_scope: scope as i32,
            population_noisy: 1000.0,
            min_reportable_count: 7.0,
            ..Default::default()
        }
    }

    fn meta(id: &str, place: &str, pcn: &str) -> NodeRef {
        NodeRef {
            id: id.into(),
            ods_code: id.into(),
            place: place.into(),
            pcn: pcn.into(),
            ..NodeRef::default()
        }
    }

    fn answer(
        e: &Expected,
        id: &str,
        place: &str,
        rows: Vec<(Vec<&str>, Vec<proto::Cell>)>,
        scope: proto::ReleaseScope,
    ) -> NodeAnswer {
        validate(e, meta(id, place, ""), result(e, rows, scope)).unwrap()
    }

    const STANDALONE: proto::ReleaseScope = proto::ReleaseScope::Standalone;
    const SYSTEM: proto::ReleaseScope = proto::ReleaseScope::SystemTotalOnly;

    #[test]
    fn totals_sum_values_and_variances() {
        let e = expected(&[AggregateKind::Count, AggregateKind::Sum], &["sex"]);
        let a = answer(
            &e,
            "A",
            "",
            vec![
                (
                    vec!["F"],
                    vec![cell("a0", 101.0, 8.0), cell("a1", 2001.0, 50.0)],
                ),
                (
                    vec!["M"],
                    vec![cell("a0", 93.0, 8.0), cell("a1", 1003.0, 50.0)],
                ),
            ],
            STANDALONE,
        );
        let b = answer(
            &e,
            "B",
            "",
            vec![
                (
                    vec!["F"],
                    vec![cell("a0", 51.0, 2.0), cell("a1", 499.0, 14.0)],
                ),
                (
                    vec!["M"],
                    vec![cell("a0", 48.0, 2.0), cell("a1", 501.0, 14.0)],
                ),
            ],
            STANDALONE,
        );
        let c = combine(&e, &[a, b]);
        assert!(!c.rounded, "both nodes released unrounded figures");
        let f = &c.rows[0];
        assert_eq!(f.key, vec!["F"]);
        assert_eq!(f.cells[0].estimate, 152.0);
        assert!((f.cells[0].standard_error - 10.0_f64.sqrt()).abs() < 1e-12);
        // Two contributors: the interval comes from the exact distribution of the two
        // (discrete Gaussian) noises, at least as wide as the normal one and at most a
        // lattice step wider; symmetric about the estimate.
        let normal = 1.96 * 10.0_f64.sqrt();
        let half = f.cells[0].ci95_high - 152.0;
        assert!((152.0 - f.cells[0].ci95_low - half).abs() < 1e-9);
        assert!(
            half >= normal - 1e-9 && half <= normal + 1.0,
            "{half} vs {normal}"
        );
        // The SUM (real-valued noise) is within the grid's 5% of an sd of the normal.
        let half = f.cells[1].ci95_high - 2500.0;
        assert!(
            (1.96 * 8.0 - 1e-9..=(1.96 + 0.05) * 8.0).contains(&half),
            "{half}"
        );
        assert_eq!(f.cells[1].estimate, 2500.0);
        assert!((f.cells[1].standard_error - 8.0).abs() < 1e-12);
        assert_eq!(f.cells[0].contributors, 2);
        assert_eq!(c.rows[1].cells[0].estimate, 141.0);
        assert_eq!(c.epsilon_spent_per_node, 0.5);
        assert_eq!(c.min_reportable_count, 7.0);
    }

    #[test]
    fn mean_is_a_ratio_with_delta_method_variance() {
        let e = expected(&[AggregateKind::Mean], &[]);
        let a = answer(
            &e,
            "A",
            "",
            vec![(vec![], vec![mean_cell("a0", 6000.0, 400.0, 100.0, 4.0)])],
            STANDALONE,
        );
        let b = answer(
            &e,
            "B",
            "",
            vec![(vec![], vec![mean_cell("a0", 4000.0, 100.0, 100.0, 4.0)])],
            STANDALONE,
        );
        let c = combine(&e, &[a, b]);
        let cell = &c.rows[0].cells[0];
        // R = 10000/200 = 50; var = (500 + 2500*8)/40000 = 0.5125.
        assert!(!cell.suppressed);
        // Rounded to 1 dp because no COUNT/SUM shows the nodes do not round.
        assert!(c.rounded);
        assert_eq!(cell.estimate, 50.0);
        assert!((cell.standard_error - 0.5125_f64.sqrt()).abs() < 1e-12);
        // The count is precise (relative error 1.4%), so the delta method is used, with
        // a multiplier no smaller than 1.96; bounds are rounded outwards, so rounding
        // never narrows the interval.
        assert!(cell.note.is_empty(), "{}", cell.note);
        let se = 0.5125_f64.sqrt();
        assert!(cell.ci95_low <= 50.0 - 1.96 * se && cell.ci95_high >= 50.0 + 1.96 * se);
        let (lo, hi) = (50.0 - 2.2 * se - 0.1, 50.0 + 2.2 * se + 0.1);
        assert!(cell.ci95_low >= lo && cell.ci95_high <= hi, "{cell:?}");
        assert!(((cell.ci95_low * 10.0).round() - cell.ci95_low * 10.0).abs() < 1e-9);
    }

    fn centred_mean_cell(
        alias: &str,
        s: f64,
        vs: f64,
        c: f64,
        vc: f64,
        centre: f64,
    ) -> proto::Cell {
        let mut cell = mean_cell(alias, s, vs, c, vc);
        cell.noisy_value = centre + s / c;
        cell.estimate = cell.noisy_value;
        if let Some(p) = cell.mean.as_mut() {
            p.centre = centre;
        }
        cell
    }

    #[test]
    fn centred_means_shift_by_their_centre_and_mixed_centres_carry_the_covariance() {
        let e = expected(&[AggregateKind::Mean], &[]);
        let node = |id: &str, s, c, centre| {
            answer(
                &e,
                id,
                "",
                vec![(
                    vec![],
                    vec![centred_mean_cell("a0", s, 400.0, c, 4.0, centre)],
                )],
                STANDALONE,
            )
        };
        // Same centre: the mean is 35 + (−500 + 300) / 200 = 34, and the standard error
        // is the uncentred formula's with the centred sum: ((800 + 1·8) / 200²)^½.
        let c = combine(
            &e,
            &[
                node("A", -500.0, 100.0, 35.0),
                node("B", 300.0, 100.0, 35.0),
            ],
        );
        let cell = &c.rows[0].cells[0];
        assert_eq!(cell.estimate, 34.0);
        assert!((cell.standard_error - (808.0f64 / 40_000.0).sqrt()).abs() < 1e-12);
        assert!(cell.ci95_low < 34.0 && cell.ci95_high > 34.0);
        // Mixed centres: A summed around 35, B around 0. Plain sums are 3000 and 3300,
        // so the mean is 6300 / 200 = 31.5. With c0 = 35: A = −500 + (3300 − 35·100)
        // = −700, R = −3.5, var A = 800 + 35²·4 = 5700, cov(A, C) = −35·4 = −140:
        // var = (5700 − 2·3.5·140 + 3.5²·8) / 200² = 4818 / 40000.
        let c = combine(
            &e,
            &[
                node("A", -500.0, 100.0, 35.0),
                node("B", 3300.0, 100.0, 0.0),
            ],
        );
        let cell = &c.rows[0].cells[0];
        assert!((cell.estimate - 31.5).abs() < 1e-9, "{cell:?}");
        let var = (5700.0 - 2.0 * 3.5 * 140.0 + 3.5f64.powi(2) * 8.0) / 40_000.0;
        assert!((cell.standard_error - var.sqrt()).abs() < 1e-12, "{cell:?}");
        // The same figures uncentred give the same estimate (the centres are
        // bookkeeping for the estimate; for the noise they are not).
        let plain = combine(
            &e,
            &[node("A", 3000.0, 100.0, 0.0), node("B", 3300.0, 100.0, 0.0)],
        );
        let p = &plain.rows[0].cells[0];
        assert!((p.estimate - cell.estimate).abs() < 1e-9);
    }

    #[test]
    fn single_contributor_keeps_its_exact_interval_and_counts_stay_non_negative() {
        let e = expected(&[AggregateKind::Count], &[]);
        let mut c0 = cell("a0", 20.0, 800.0);
        // The node's exact discrete-Laplace interval, wider than the normal one.
        (c0.ci95_low, c0.ci95_high) = (-40.0, 80.0);
        let a = answer(&e, "A", "", vec![(vec![], vec![c0])], STANDALONE);
        let c = combine(&e, &[a]);
        let out = &c.rows[0].cells[0];
        assert_eq!(
            out.ci95_high, 80.0,
            "one contributor keeps its own interval"
        );
        assert_eq!(out.ci95_low, 0.0, "a count interval never goes below zero");
    }

    #[test]
    fn low_combined_count_suppresses_the_group_with_strictest_threshold() {
        let e = expected(
            &[
                AggregateKind::Count,
                AggregateKind::Sum,
                AggregateKind::Mean,
            ],
            &["g"],
        );
        let mk = |id: &str, n: f64, mrc: f64| {
            let mut r = result(
                &e,
                vec![
                    (
                        vec!["x"],
                        vec![
                            cell("a0", n, 1.0),
                            cell("a1", 10.0 * n, 1.0),
                            mean_cell("a2", 10.0 * n, 1.0, n, 1.0),
                        ],
                    ),
                    (
                        vec!["y"],
                        vec![
                            cell("a0", 50.0, 1.0),
                            cell("a1", 500.0, 1.0),
                            mean_cell("a2", 500.0, 1.0, 50.0, 1.0),
                        ],
                    ),
                ],
                STANDALONE,
            );
            r.min_reportable_count = mrc;
            validate(&e, meta(id, "", ""), r).unwrap()
        };
        // 6 + 4 = 10 people in group x: above node A's threshold 7 but at or below B's 10.
        let c = combine(&e, &[mk("A", 6.0, 7.0), mk("B", 4.0, 10.0)]);
        assert_eq!(c.min_reportable_count, 10.0);
        let x = &c.rows[0];
        assert!(x.cells.iter().all(|c| c.suppressed), "{x:?}");
        assert!(x.cells[1].suppression_reason.contains("10"));
        assert_eq!(x.cells[1].estimate, 0.0);
        let y = &c.rows[1];
        assert!(y.cells.iter().all(|c| !c.suppressed));
        assert_eq!(y.cells[0].estimate, 100.0);
        assert_eq!(y.cells[2].estimate, 10.0);
    }

    #[test]
    fn rounding_follows_the_nodes_and_fails_closed() {
        let e = expected(&[AggregateKind::Count], &[]);
        let unrounded = answer(
            &e,
            "A",
            "",
            vec![(vec![], vec![cell("a0", 101.0, 4.0)])],
            STANDALONE,
        );
        let mut r = result(&e, vec![(vec![], vec![cell("a0", 52.0, 4.0)])], STANDALONE);
        r.rows[0].cells[0].estimate = 50.0;
        let rounding = validate(&e, meta("B", "", ""), r).unwrap();
        assert!(!node_rounds(&e, &unrounded));
        assert!(node_rounds(&e, &rounding));
        // A multiple of 5 proves nothing: assume rounding.
        let ambiguous = answer(
            &e,
            "C",
            "",
            vec![(vec![], vec![cell("a0", 55.0, 4.0)])],
            STANDALONE,
        );
        assert!(node_rounds(&e, &ambiguous));

        let only_unrounded = combine(&e, std::slice::from_ref(&unrounded));
        assert_eq!(only_unrounded.rows[0].cells[0].estimate, 101.0);
        let c = combine(&e, &[unrounded, rounding]);
        assert!(c.rounded);
        let cell = &c.rows[0].cells[0];
        assert_eq!(cell.estimate, 155.0); // 153 -> 155
        assert_eq!(cell.ci95_low % 5.0, 0.0);
        assert_eq!(cell.ci95_high % 5.0, 0.0);
        assert!((cell.standard_error - 8.0_f64.sqrt()).abs() < 1e-12);
    }

    fn one_count(
        e: &Expected,
        id: &str,
        place: &str,
        v: f64,
        scope: proto::ReleaseScope,
    ) -> NodeAnswer {
        answer(
            e,
            id,
            place,
            vec![(vec![], vec![cell("a0", v, 1.0)])],
            scope,
        )
    }

    fn labels(c: &Combined, level: Level) -> Vec<String> {
        c.breakdowns
            .iter()
            .filter(|b| b.level == level)
            .map(|b| b.label.clone())
            .collect()
    }

    #[test]
    fn breakdowns_only_from_standalone_partners_and_whole_places() {
        let e = expected(&[AggregateKind::Count], &[]);
        let c = combine(
            &e,
            &[
                one_count(&e, "A", "North", 101.0, STANDALONE),
                one_count(&e, "B", "North", 201.0, STANDALONE),
                one_count(&e, "C", "South", 301.0, STANDALONE),
                one_count(&e, "D", "South", 401.0, SYSTEM),
                one_count(&e, "E", "East", 501.0, SYSTEM),
                one_count(&e, "F", "East", 601.0, SYSTEM),
            ],
        );
        assert_eq!(c.rows[0].cells[0].estimate, 2106.0);
        assert_eq!(labels(&c, Level::Partner), vec!["A", "B", "C"]);
        // South has a system-total-only partner; East is entirely system-total-only.
        assert_eq!(labels(&c, Level::Place), vec!["North"]);
        let north = c.breakdowns.iter().find(|b| b.label == "North").unwrap();
        assert_eq!(north.rows[0].cells[0].estimate, 302.0);
        assert_eq!(north.rows[0].cells[0].contributors, 2);
    }

    /// The oracle: rebuild, from the published result alone, what a reader can combine
    /// for each row and aggregate (the system total and every breakdown row shown, each
    /// a sum over the partners in it that released the row) and check that no protected
    /// figure (a system-total-only partner's, or one a partner suppressed) is a linear
    /// combination of them.
    fn assert_no_reveal(c: &Combined, answers: &[NodeAnswer]) {
        let in_breakdown = |b: &Breakdown, a: &NodeAnswer| match b.level {
            Level::Partner => a.node.id == b.label,
            Level::Place => a.node.place == b.label,
            Level::Pcn => a.node.pcn == b.label,
        };
        for row in &c.rows {
            let members: Vec<usize> = (0..answers.len())
                .filter(|&i| answers[i].rows.iter().any(|r| r.key == row.key))
                .collect();
            let cell_of = |i: usize, a: usize| {
                answers[i]
                    .rows
                    .iter()
                    .find(|r| r.key == row.key)
                    .map(|r| r.cells[a].clone())
                    .unwrap()
            };
            for a in 0..row.cells.len() {
                let mut span = Span::new(members.len());
                if !row.cells[a].suppressed {
                    span.add(&[1.0].repeat(members.len()));
                }
                for b in &c.breakdowns {
                    let Some(br) = b.rows.iter().find(|r| r.key == row.key) else {
                        continue;
                    };
                    if br.cells[a].suppressed {
                        continue;
                    }
                    let local: Vec<usize> = (0..members.len())
                        .filter(|&l| in_breakdown(b, &answers[members[l]]))
                        .collect();
                    span.add(&span.indicator(&local));
                }
                for (l, &i) in members.iter().enumerate() {
                    if answers[i].scope == Scope::SystemTotalOnly || cell_of(i, a).suppressed {
                        assert!(
                            !span.contains_unit(l),
                            "row {:?} aggregate {a}: {}'s figure is recoverable from {:?}",
                            row.key,
                            answers[i].node.id,
                            c
                        );
                    }
                }
                // A row released only by system-total-only partners is never shown.
                if members
                    .iter()
                    .all(|&i| answers[i].scope == Scope::SystemTotalOnly)
                {
                    assert!(row.cells[a].suppressed, "row {:?} shown", row.key);
                }
            }
        }
    }

    #[test]
    fn a_single_system_total_only_partner_is_never_revealed_by_subtraction() {
        let e = expected(&[AggregateKind::Count], &[]);
        let answers = [
            one_count(&e, "A", "North", 101.0, STANDALONE),
            one_count(&e, "B", "North", 201.0, STANDALONE),
            one_count(&e, "C", "South", 301.0, STANDALONE),
            one_count(&e, "D", "South", 401.0, SYSTEM),
        ];
        let c = combine(&e, &answers);
        // Total - A - B - C would equal D, so the last partner breakdown is withheld;
        // North = A + B adds nothing new and stays.
        assert_eq!(labels(&c, Level::Partner), vec!["A", "B"]);
        assert_eq!(labels(&c, Level::Place), vec!["North"]);
        assert_no_reveal(&c, &answers);
    }

    #[test]
    fn place_with_exactly_one_system_total_only_partner_is_not_revealed() {
        let e = expected(&[AggregateKind::Count], &[]);
        // West = {W}: publishing North and South would give W = total - North - South.
        let answers = [
            one_count(&e, "N1", "North", 101.0, STANDALONE),
            one_count(&e, "S1", "South", 201.0, STANDALONE),
            one_count(&e, "W", "West", 301.0, SYSTEM),
        ];
        let c = combine(&e, &answers);
        assert_eq!(labels(&c, Level::Place), vec!["North"]);
        assert_eq!(labels(&c, Level::Partner), vec!["N1"]);
        assert_no_reveal(&c, &answers);
        // With two system-total-only partners nothing singles one out.
        let answers = [
            one_count(&e, "N1", "North", 101.0, STANDALONE),
            one_count(&e, "S1", "South", 201.0, STANDALONE),
            one_count(&e, "W1", "West", 301.0, SYSTEM),
            one_count(&e, "W2", "West", 302.0, SYSTEM),
        ];
        let c = combine(&e, &answers);
        assert_eq!(labels(&c, Level::Partner), vec!["N1", "S1"]);
        assert_eq!(labels(&c, Level::Place), vec!["North", "South"]);
        assert_no_reveal(&c, &answers);
    }

    #[test]
    fn lone_system_total_only_answer_is_suppressed() {
        let e = expected(&[AggregateKind::Count], &[]);
        let c = combine(&e, &[one_count(&e, "D", "South", 401.0, SYSTEM)]);
        assert!(c.rows[0].cells[0].suppressed);
        assert_eq!(c.rows[0].cells[0].estimate, 0.0);
        assert!(c.breakdowns.is_empty());
    }

    #[test]
    fn partner_breakdown_shows_node_suppression() {
        let e = expected(&[AggregateKind::Count], &["g"]);
        let mut small = cell("a0", 3.0, 1.0);
        small.suppressed = true;
        small.estimate = 0.0;
        small.suppression_reason = "fewer than 7".into();
        let a = answer(
            &e,
            "A",
            "",
            vec![
                (vec!["x"], vec![small]),
                (vec!["y"], vec![cell("a0", 42.0, 1.0)]),
            ],
            STANDALONE,
        );
        let b = answer(
            &e,
            "B",
            "",
            vec![
                (vec!["x"], vec![cell("a0", 30.0, 1.0)]),
                (vec!["y"], vec![cell("a0", 41.0, 1.0)]),
            ],
            STANDALONE,
        );
        let answers = [a, b];
        let c = combine(&e, &answers);
        // The total uses A's noisy value even though A suppressed it.
        assert_eq!(c.rows[0].cells[0].estimate, 33.0);
        let pa = c.breakdowns.iter().find(|b| b.label == "A").unwrap();
        assert!(pa.rows[0].cells[0].suppressed);
        assert_eq!(pa.rows[0].cells[0].suppression_reason, "fewer than 7");
        assert!(!pa.rows[1].cells[0].suppressed);
        // Secondary suppression: B's x would give A's suppressed x as 33 - 30.
        let pb = c.breakdowns.iter().find(|b| b.label == "B").unwrap();
        assert!(pb.rows[0].cells[0].suppressed, "{pb:?}");
        assert_eq!(pb.rows[0].cells[0].suppression_reason, WITHHELD_REASON);
        assert!(!pb.rows[1].cells[0].suppressed);
        assert_no_reveal(&c, &answers);
    }

    #[test]
    fn groups_missing_at_a_node_count_only_the_reporting_nodes() {
        let e = expected(&[AggregateKind::Count], &["g"]);
        let a = answer(
            &e,
            "A",
            "",
            vec![
                (vec!["x"], vec![cell("a0", 20.0, 1.0)]),
                (vec!["z"], vec![cell("a0", 30.0, 1.0)]),
            ],
            STANDALONE,
        );
        let b = answer(
            &e,
            "B",
            "",
            vec![(vec!["x"], vec![cell("a0", 21.0, 1.0)])],
            STANDALONE,
        );
        let c = combine(&e, &[a, b]);
        assert_eq!(c.rows.len(), 2);
        assert_eq!(c.rows[1].key, vec!["z"]);
        assert_eq!(c.rows[1].cells[0].contributors, 1);
        assert_eq!(c.rows[0].cells[0].contributors, 2);
        // F14: z is missing at B, so its total leaves B out, and the row says so.
        assert_eq!((c.rows[0].missing, c.rows[1].missing), (0, 1));
        assert!(c.rows[0].note.is_empty());
        assert!(
            c.rows[1]
                .note
                .contains("Released by 1 of the 2 answering partners"),
            "{}",
            c.rows[1].note
        );
    }

    #[test]
    fn malformed_answers_are_detected_with_what_was_wrong() {
        let e = expected(&[AggregateKind::Count, AggregateKind::Mean], &["g"]);
        let good = || {
            result(
                &e,
                vec![(
                    vec!["x"],
                    vec![
                        cell("a0", 20.0, 1.0),
                        mean_cell("a1", 100.0, 1.0, 20.0, 1.0),
                    ],
                )],
                STANDALONE,
            )
        };
        assert!(validate(&e, meta("A", "", ""), good()).is_ok());
        let check = |f: &dyn Fn(&mut proto::AggregateResult), needle: &str| {
            let mut r = good();
            f(&mut r);
            let err = validate(&e, meta("A", "", ""), r).unwrap_err().0;
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        };
        check(&|r| r.query_id = "other".into(), "query id");
        check(&|r| r.dataset = "other".into(), "dataset");
        check(&|r| r.group_columns = vec!["h".into()], "group columns");
        check(&|r| r.aggregate_aliases.reverse(), "aliases");
        check(
            &|r| r.rows[0].cells[0].noisy_value = f64::NAN,
            "noisy_value",
        );
        check(
            &|r| r.rows[0].cells[0].variance = -1.0,
            "variance is negative",
        );
        check(
            &|r| r.rows[0].cells[0].ci95_high = f64::INFINITY,
            "ci95_high",
        );
        check(
            &|r| {
                r.rows[0].cells.pop();
            },
            "missing cells",
        );
        check(&|r| r.rows[0].cells[1].mean = None, "no sum and count");
        check(
            &|r| r.rows[0].cells[1].mean.as_mut().unwrap().count_variance = -2.0,
            "count_variance",
        );
        check(&|r| r.rows[0].key.push("extra".into()), "key values");
        check(
            &|r| {
                let row = r.rows[0].clone();
                r.rows.push(row);
            },
            "twice",
        );
        check(&|r| r.rows[0].cells[0].alias = "zz".into(), "cell 0");
        check(
            &|r| r.min_reportable_count = f64::NAN,
            "min_reportable_count",
        );
    }

    #[test]
    fn unspecified_scope_is_read_as_system_total_only() {
        let e = expected(&[AggregateKind::Count], &[]);
        let a = answer(
            &e,
            "A",
            "",
            vec![(vec![], vec![cell("a0", 1.0, 1.0)])],
            proto::ReleaseScope::Unspecified,
        );
        assert_eq!(a.scope, Scope::SystemTotalOnly);
    }

    // ---- F4: disclosure control per result row -------------------------------------

    fn keyed(
        e: &Expected,
        id: &str,
        place: &str,
        keys: &[(&str, f64)],
        scope: proto::ReleaseScope,
    ) -> NodeAnswer {
        answer(
            e,
            id,
            place,
            keys.iter()
                .map(|(k, v)| (vec![*k], vec![cell("a0", *v, 1.0)]))
                .collect(),
            scope,
        )
    }

    fn breakdown<'a>(c: &'a Combined, label: &str) -> &'a Breakdown {
        c.breakdowns
            .iter()
            .find(|b| b.label == label)
            .unwrap_or_else(|| panic!("no breakdown {label}: {c:?}"))
    }

    fn row<'a>(rows: &'a [Row], key: &str) -> &'a Row {
        rows.iter()
            .find(|r| r.key == vec![key.to_string()])
            .unwrap_or_else(|| panic!("no row {key}: {rows:?}"))
    }

    #[test]
    fn a_key_released_only_by_a_system_total_only_partner_is_suppressed() {
        // Attack 1: the partners' policies declare different bins (A's age bounds stop
        // at 110, P's at 120), so bin "110" exists only at P: its system row would be
        // P's own figure with contributors = 1.
        let e = expected(&[AggregateKind::Count], &["bin(age, 10)"]);
        let answers = [
            keyed(&e, "A", "North", &[("100", 50.0)], STANDALONE),
            keyed(&e, "P", "South", &[("100", 60.0), ("110", 40.0)], SYSTEM),
        ];
        let c = combine(&e, &answers);
        let lone = &row(&c.rows, "110").cells[0];
        assert!(lone.suppressed, "{lone:?}");
        assert_eq!(lone.estimate, 0.0);
        assert_eq!(lone.suppression_reason, ONLY_PROTECTED_REASON);
        // The shared bin is a genuine total of two partners.
        assert_eq!(row(&c.rows, "100").cells[0].estimate, 110.0);
        assert_no_reveal(&c, &answers);
    }

    #[test]
    fn a_row_of_system_total_only_partners_alone_is_suppressed_with_that_reason() {
        // Two protected partners are a total of several partners, but still only
        // partners that may not be shown: the rule is about who is in the row. The
        // low-count reason (which would say their counts are small) is not shown.
        let e = expected(&[AggregateKind::Count], &["g"]);
        let answers = [
            keyed(&e, "A", "", &[("x", 50.0)], STANDALONE),
            keyed(&e, "P1", "", &[("x", 50.0), ("k", 2.0)], SYSTEM),
            keyed(&e, "P2", "", &[("x", 50.0), ("k", 3.0)], SYSTEM),
        ];
        let c = combine(&e, &answers);
        let k = &row(&c.rows, "k").cells[0];
        assert!(k.suppressed);
        assert_eq!(k.suppression_reason, ONLY_PROTECTED_REASON);
        assert!(row(&c.rows, "k").note.is_empty());
        assert!(!row(&c.rows, "x").cells[0].suppressed);
        assert_no_reveal(&c, &answers);
    }

    #[test]
    fn a_standalone_breakdown_never_lets_a_protected_partner_be_subtracted_per_row() {
        // Attack 2: k is released by A (standalone, breakdown published) and P only,
        // so P_k = total_k - A_k; x is released by everyone.
        let e = expected(&[AggregateKind::Count], &["g"]);
        let answers = [
            keyed(&e, "A", "North", &[("x", 101.0), ("k", 30.0)], STANDALONE),
            keyed(&e, "B", "North", &[("x", 201.0)], STANDALONE),
            keyed(&e, "C", "West", &[("x", 11.0)], STANDALONE),
            keyed(&e, "P", "South", &[("x", 301.0), ("k", 40.0)], SYSTEM),
        ];
        let c = combine(&e, &answers);
        // The system total of k is published: it is a sum of two partners.
        assert_eq!(row(&c.rows, "k").cells[0].estimate, 70.0);
        let a = breakdown(&c, "A");
        assert!(!row(&a.rows, "x").cells[0].suppressed);
        let ak = &row(&a.rows, "k").cells[0];
        assert!(ak.suppressed, "A's k would give P's k as 70 - 30");
        assert_eq!(ak.suppression_reason, WITHHELD_REASON);
        // For x, A and B are shown; C would complete the subtraction.
        assert!(!row(&breakdown(&c, "B").rows, "x").cells[0].suppressed);
        assert!(c.breakdowns.iter().all(|b| b.label != "C"), "{c:?}");
        // North = A + B: for x it adds nothing new; for k it is A's figure alone.
        let north = breakdown(&c, "North");
        assert!(!row(&north.rows, "x").cells[0].suppressed);
        assert!(row(&north.rows, "k").cells[0].suppressed);
        assert_eq!(row(&north.rows, "k").missing, 1);
        assert_no_reveal(&c, &answers);
    }

    #[test]
    fn a_partner_suppressed_cell_is_not_recoverable_from_other_breakdowns() {
        // F10: A suppressed x itself; B, C standalone in Place North. Total - B - C,
        // or total - North, would give A's suppressed figure.
        let e = expected(&[AggregateKind::Count], &["g"]);
        let mut small = cell("a0", 3.0, 1.0);
        (small.suppressed, small.estimate) = (true, 0.0);
        small.suppression_reason = "fewer than 7".into();
        let a = answer(
            &e,
            "A",
            "South",
            vec![
                (vec!["x"], vec![small]),
                (vec!["y"], vec![cell("a0", 41.0, 1.0)]),
            ],
            STANDALONE,
        );
        let answers = [
            a,
            keyed(&e, "B", "North", &[("x", 31.0), ("y", 42.0)], STANDALONE),
            keyed(&e, "C", "North", &[("x", 21.0), ("y", 43.0)], STANDALONE),
        ];
        let c = combine(&e, &answers);
        assert!(!c.rounded);
        assert_eq!(row(&c.rows, "x").cells[0].estimate, 55.0);
        assert!(!row(&breakdown(&c, "B").rows, "x").cells[0].suppressed);
        let cx = &row(&breakdown(&c, "C").rows, "x").cells[0];
        assert!(cx.suppressed && cx.suppression_reason == WITHHELD_REASON);
        let nx = &row(&breakdown(&c, "North").rows, "x").cells[0];
        assert!(nx.suppressed && nx.suppression_reason == WITHHELD_REASON);
        // Row y has nothing to protect: everything is shown.
        for b in ["A", "B", "C", "North", "South"] {
            assert!(!row(&breakdown(&c, b).rows, "y").cells[0].suppressed, "{b}");
        }
        assert_no_reveal(&c, &answers);
    }

    #[test]
    fn a_single_contributor_that_suppressed_its_figure_is_not_shown_as_the_total() {
        let e = expected(&[AggregateKind::Sum], &["g"]);
        let mut s = cell("a0", 500.0, 1.0);
        (s.suppressed, s.estimate) = (true, 0.0);
        let answers = [
            answer(
                &e,
                "A",
                "",
                vec![
                    (vec!["k"], vec![s]),
                    (vec!["x"], vec![cell("a0", 9.0, 1.0)]),
                ],
                STANDALONE,
            ),
            keyed(&e, "B", "", &[("x", 10.0)], STANDALONE),
        ];
        let c = combine(&e, &answers);
        let k = &row(&c.rows, "k").cells[0];
        assert!(k.suppressed);
        assert_eq!(k.suppression_reason, SINGLE_SUPPRESSED_REASON);
        assert_no_reveal(&c, &answers);
    }

    /// Random federations: key sets differ per partner, scopes, node suppression and
    /// Places are random. Whatever is published, no protected figure is recoverable.
    #[test]
    fn no_protected_figure_is_ever_recoverable_in_random_federations() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(20261201);
        let e = expected(&[AggregateKind::Count, AggregateKind::Sum], &["g"]);
        let keys = ["a", "b", "c", "d", "e"];
        let places = ["", "North", "South"];
        let mut withheld = 0;
        for _ in 0..400 {
            let n = rng.gen_range(1..=6);
            let answers: Vec<NodeAnswer> = (0..n)
                .map(|i| {
                    let released: Vec<&str> =
                        keys.iter().copied().filter(|_| rng.gen_bool(0.7)).collect();
                    let rows = released
                        .into_iter()
                        .map(|k| {
                            let mut cells = vec![cell("a0", 50.0, 1.0), cell("a1", 500.0, 1.0)];
                            if rng.gen_bool(0.2) {
                                // Nodes suppress whole rows.
                                for c in &mut cells {
                                    (c.suppressed, c.estimate) = (true, 0.0);
                                }
                            }
                            (vec![k], cells)
                        })
                        .collect();
                    let scope = if rng.gen_bool(0.35) {
                        SYSTEM
                    } else {
                        STANDALONE
                    };
                    let place = places[rng.gen_range(0..places.len())];
                    answer(&e, &format!("N{i}"), place, rows, scope)
                })
                .collect();
            let c = combine(&e, &answers);
            assert_no_reveal(&c, &answers);
            withheld += c
                .breakdowns
                .iter()
                .flat_map(|b| &b.rows)
                .flat_map(|r| &r.cells)
                .filter(|c| c.suppression_reason == WITHHELD_REASON)
                .count();
        }
        assert!(
            withheld > 100,
            "the random cases must exercise withholding ({withheld})"
        );
    }

    #[test]
    fn a_query_of_sums_alone_says_it_is_not_small_number_suppressed() {
        let e = expected(&[AggregateKind::Sum], &[]);
        let c = combine(&e, &[one_count(&e, "A", "", 3.0, STANDALONE)]);
        assert_eq!(c.notes, vec![SUM_ONLY_NOTE.to_string()]);
        assert!(!c.rows[0].cells[0].suppressed);
        let e = expected(&[AggregateKind::Sum, AggregateKind::Count], &[]);
        let a = answer(
            &e,
            "A",
            "",
            vec![(vec![], vec![cell("a0", 3.0, 1.0), cell("a1", 30.0, 1.0)])],
            STANDALONE,
        );
        assert!(combine(&e, &[a]).notes.is_empty());
    }

    // ---- F14: honest intervals --------------------------------------------------------

    fn laplace(rng: &mut impl rand::Rng, b: f64) -> f64 {
        let e = -b * (1.0 - rng.r#gen::<f64>()).ln();
        if rng.r#gen::<bool>() { e } else { -e }
    }

    fn discrete_laplace(rng: &mut impl rand::Rng, b: f64) -> f64 {
        // A difference of two geometrics on {0, 1, …} with P(G ≥ k) = e^(-k/b).
        let lnq = -1.0 / b;
        let mut geo = || ((1.0 - rng.r#gen::<f64>()).ln() / lnq).floor();
        geo() - geo()
    }

    fn dl_variance(b: f64) -> f64 {
        let q = (-1.0 / b).exp();
        2.0 * q / ((1.0 - q) * (1.0 - q))
    }

    /// A cell as a real node releases it under the discrete Laplace.
    fn laplace_cell(alias: &str, noisy: f64, b: f64, integer: bool) -> proto::Cell {
        let variance = if integer { dl_variance(b) } else { 2.0 * b * b };
        proto::Cell {
            alias: alias.into(),
            estimate: noisy,
            noisy_value: noisy,
            noise_scale: b,
            variance,
            // The node's exact single-term interval (not used for two or more terms).
            ci95_low: noisy - b * 20f64.ln(),
            ci95_high: noisy + b * 20f64.ln(),
            mechanism: proto::NoiseMechanism::DiscreteLaplace as i32,
            ..Default::default()
        }
    }

    fn many_rows(e: &Expected, id: &str, rows: Vec<Vec<proto::Cell>>, mrc: f64) -> NodeAnswer {
        let mut r = result(e, vec![], STANDALONE);
        r.min_reportable_count = mrc;
        r.rows = rows
            .into_iter()
            .enumerate()
            .map(|(i, cells)| proto::ResultRow {
                key: vec![format!("r{i}")],
                cells,
            })
            .collect();
        validate(e, meta(id, "", ""), r).unwrap()
    }

    /// The largest k with P(Binomial(n, p) < k) < 1e-6: if the true coverage is at
    /// least p, a covered count below k happens with probability below one in a
    /// million, so a test asserting `covered >= k` fails wrongly that rarely.
    fn binomial_lower(n: usize, p: f64) -> usize {
        let mut below = 0.0;
        let mut log_pmf = n as f64 * (1.0 - p).ln();
        let log_odds = (p / (1.0 - p)).ln();
        for k in 0..n {
            let next = below + log_pmf.exp();
            if next >= 1e-6 {
                return k;
            }
            below = next;
            log_pmf += ((n - k) as f64 / (k + 1) as f64).ln() + log_odds;
        }
        n
    }

    /// The smallest k with P(Binomial(n, p) > k) < 1e-6.
    fn binomial_upper(n: usize, p: f64) -> usize {
        n - binomial_lower(n, 1.0 - p)
    }

    #[test]
    fn binomial_bounds_are_right() {
        // n = 1000, p = 0.95: mean 950, sd 6.9; 1e-6 is about 4.75 sd (skewed).
        let lo = binomial_lower(1000, 0.95);
        assert!((912..=916).contains(&lo), "{lo}");
        let hi = binomial_upper(1000, 0.95);
        assert!((977..=981).contains(&hi), "{hi}");
    }

    /// Coverage of the combined 95% intervals of one aggregate over `trials` rows.
    fn coverage(c: &Combined, cell: usize, truth: f64) -> (usize, usize) {
        let shown: Vec<&Cell> = c
            .rows
            .iter()
            .map(|r| &r.cells[cell])
            .filter(|c| !c.suppressed)
            .collect();
        let covered = shown
            .iter()
            .filter(|c| c.ci95_low <= truth && truth <= c.ci95_high)
            .count();
        (covered, shown.len())
    }

    const TRIALS: usize = 50_000;

    #[test]
    fn totals_of_two_or_three_laplace_terms_cover_at_least_95_percent() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(14);
        // Counts with a small discrete Laplace scale (the normal approximation's worst
        // case: 92.7% for two terms at b = 1) and sums with unequal Laplace scales (one
        // term dominates: 94%).
        let e = expected(&[AggregateKind::Count, AggregateKind::Sum], &["r"]);
        let (count, sum) = (100.0, 5000.0);
        let count_b = [1.0, 1.0];
        let sum_b = [10.0, 20.0, 30.0];
        let answers: Vec<NodeAnswer> = (0..3)
            .map(|n| {
                let rows = (0..TRIALS)
                    .map(|_| {
                        // Node 2 has nobody in the counted group (but still adds noise).
                        let cb = if n < 2 { count_b[n] } else { 1.0 };
                        let cv = if n < 2 { count / 2.0 } else { 0.0 };
                        vec![
                            laplace_cell("a0", cv + discrete_laplace(&mut rng, cb), cb, true),
                            laplace_cell(
                                "a1",
                                sum / 3.0 + laplace(&mut rng, sum_b[n]),
                                sum_b[n],
                                false,
                            ),
                        ]
                    })
                    .collect();
                many_rows(&e, &format!("N{n}"), rows, 0.0)
            })
            .collect();
        // Counts: three discrete Laplace terms of scale 1.
        let c = combine(&e, &answers);
        for (cell, truth, what) in [(0, count, "count"), (1, sum, "sum")] {
            let (covered, shown) = coverage(&c, cell, truth);
            assert_eq!(shown, TRIALS);
            let lo = binomial_lower(shown, 0.95);
            assert!(
                covered >= lo,
                "{what}: covered {covered} of {shown}, need {lo}"
            );
            // Not honest by being needlessly wide either (the sum's bound is within 5%
            // of an sd of exact; the counts' lattice makes 97.1% the exact coverage).
            let cap = if cell == 0 { 0.98 } else { 0.96 };
            let hi = binomial_upper(shown, cap);
            assert!(
                covered <= hi,
                "{what}: covered {covered} of {shown}, more than {cap}"
            );
        }
        // Two terms: the first two nodes alone.
        let c = combine(&e, &answers[..2]);
        let (covered, shown) = coverage(&c, 0, count);
        assert!(
            covered >= binomial_lower(shown, 0.95),
            "two counts: {covered} of {shown}"
        );
        let (covered, shown) = coverage(&c, 1, sum * 2.0 / 3.0);
        assert!(
            covered >= binomial_lower(shown, 0.95),
            "two sums: {covered} of {shown}"
        );
    }

    #[test]
    fn the_exact_bound_matches_closed_forms() {
        // Two iid Laplace(b): P(X1 + X2 > t) = e^(-u)(1 + u/2)/2 with u = t/b, so the
        // 95% half-width solves e^(-u)(1 + u/2) = 0.05: u = 4.1134.
        let (mut lo, mut hi) = (0.0, 20.0);
        for _ in 0..100 {
            let u: f64 = 0.5 * (lo + hi);
            if (-u).exp() * (1.0 + u / 2.0) > 0.05 {
                lo = u
            } else {
                hi = u
            }
        }
        let b = 7.0;
        let d = Dist {
            shape: Shape::Laplace,
            integer: false,
            scale: b,
        };
        let t = noise_sum::exact_for_test(&[d, d], 0.05).unwrap();
        let sd = (2.0 * 2.0 * b * b).sqrt();
        assert!(t >= hi * b && t <= hi * b + 0.05 * sd, "{t} vs {}", hi * b);
        // Sums of discrete Laplace: against a brute-force convolution of the pmfs.
        for (b, n) in [(1.0_f64, 2), (1.0, 3), (2.0, 2), (0.5, 2), (4.0, 3)] {
            let q: f64 = (-1.0 / b).exp();
            let reach = 400i64;
            let one: Vec<f64> = (-reach..=reach)
                .map(|k| (1.0 - q) / (1.0 + q) * q.powi(k.abs() as i32))
                .collect();
            let mut sum = one.clone();
            for _ in 1..n {
                let mut out = vec![0.0; sum.len() + one.len() - 1];
                for (i, x) in sum.iter().enumerate() {
                    for (j, y) in one.iter().enumerate() {
                        out[i + j] += x * y;
                    }
                }
                sum = out;
            }
            let mid = (sum.len() / 2) as i64;
            let upper = |m: i64| -> f64 { sum[(mid + m + 1) as usize..].iter().sum() };
            let m = (0..).find(|&m| 2.0 * upper(m) <= 0.05).unwrap();
            let d = Dist {
                shape: Shape::Laplace,
                integer: true,
                scale: b,
            };
            let t = noise_sum::exact_for_test(&vec![d; n], 0.05).unwrap();
            assert_eq!(t, m as f64, "b = {b}, n = {n}");
        }
    }

    #[test]
    fn many_terms_use_a_kurtosis_corrected_interval_that_still_covers() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(41);
        // Six sums, one partner's noise dominating (nearly a single Laplace), and six
        // counts at a small discrete Laplace scale.
        let e = expected(&[AggregateKind::Count, AggregateKind::Sum], &["r"]);
        let sum_b = [60.0, 3.0, 3.0, 3.0, 3.0, 3.0];
        let answers: Vec<NodeAnswer> = (0..6)
            .map(|n| {
                let rows = (0..TRIALS)
                    .map(|_| {
                        vec![
                            laplace_cell("a0", 20.0 + discrete_laplace(&mut rng, 1.0), 1.0, true),
                            laplace_cell(
                                "a1",
                                100.0 + laplace(&mut rng, sum_b[n]),
                                sum_b[n],
                                false,
                            ),
                        ]
                    })
                    .collect();
                many_rows(&e, &format!("N{n}"), rows, 0.0)
            })
            .collect();
        let c = combine(&e, &answers);
        for (cell, truth) in [(0, 120.0), (1, 600.0)] {
            let (covered, shown) = coverage(&c, cell, truth);
            let lo = binomial_lower(shown, 0.95);
            assert!(
                covered >= lo,
                "cell {cell}: covered {covered} of {shown}, need {lo}"
            );
        }
        // The correction sits between the normal and the exact single-Laplace value.
        let d = |b: f64| Dist {
            shape: Shape::Laplace,
            integer: false,
            scale: b,
        };
        let one = noise_sum::cornish_fisher_for_test(&[d(1.0)], 0.05);
        assert!(one >= 20f64.ln(), "{one}");
        let many = noise_sum::cornish_fisher_for_test(&[d(1.0); 50], 0.05);
        let sd = 100f64.sqrt();
        assert!(many > 1.96 * sd && many < 1.97 * sd, "{many}");
    }

    #[test]
    fn an_unknown_mechanism_gets_a_distribution_free_interval() {
        let e = expected(&[AggregateKind::Count], &[]);
        let mk = |id: &str| {
            let mut r = result(&e, vec![(vec![], vec![cell("a0", 101.0, 4.0)])], STANDALONE);
            r.rows[0].cells[0].mechanism = proto::NoiseMechanism::Unspecified as i32;
            validate(&e, meta(id, "", ""), r).unwrap()
        };
        let c = combine(&e, &[mk("A"), mk("B")]);
        let cell = &c.rows[0].cells[0];
        assert!(!c.rounded);
        assert!((cell.ci95_high - (202.0 + (8.0f64 / 0.05).sqrt())).abs() < 1e-9);
        assert!(cell.note.contains("Chebyshev"), "{}", cell.note);
    }

    #[test]
    fn a_reported_scale_narrower_than_the_variance_implies_is_not_trusted() {
        let e = expected(&[AggregateKind::Sum], &[]);
        let mut c0 = laplace_cell("a0", 10.0, 5.0, false);
        c0.noise_scale = 0.5;
        let a = validate(
            &e,
            meta("A", "", ""),
            result(&e, vec![(vec![], vec![c0])], STANDALONE),
        )
        .unwrap();
        let Noise::Known(d) = a.rows[0].cells[0].noise else {
            panic!()
        };
        assert!((d.scale - 5.0).abs() < 1e-12);
        // And for the discrete Laplace, the scale is recovered from its variance.
        let mut c1 = laplace_cell("a0", 10.0, 3.0, true);
        c1.noise_scale = 0.0;
        let e = expected(&[AggregateKind::Count], &[]);
        let a = validate(
            &e,
            meta("A", "", ""),
            result(&e, vec![(vec![], vec![c1])], STANDALONE),
        )
        .unwrap();
        let Noise::Known(d) = a.rows[0].cells[0].noise else {
            panic!()
        };
        assert!((d.scale - 3.0).abs() < 1e-9, "{}", d.scale);
    }

    fn mean_laplace_cell(alias: &str, s: f64, bs: f64, c: f64, bc: f64) -> proto::Cell {
        // A node reports 0 for a mean whose noisy count is not positive.
        let m = if c > 0.0 { s / c } else { 0.0 };
        proto::Cell {
            alias: alias.into(),
            estimate: m,
            noisy_value: m,
            mean: Some(proto::MeanParts {
                noisy_sum: s,
                sum_variance: 2.0 * bs * bs,
                noisy_count: c,
                count_variance: dl_variance(bc),
                centre: 0.0,
            }),
            mechanism: proto::NoiseMechanism::DiscreteLaplace as i32,
            ..Default::default()
        }
    }

    #[test]
    fn means_over_small_counts_get_an_honest_interval_and_say_so() {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // One partner, 20 people with mean 50: count noise b = 4 gives a relative error
        // of 28%, where the delta method covers about 93%.
        let e = expected(&[AggregateKind::Mean], &["r"]);
        let (n, mu, bc, bs) = (20.0, 50.0, 4.0, 20.0);
        let rows = (0..TRIALS)
            .map(|_| {
                let c = n + discrete_laplace(&mut rng, bc);
                let s = n * mu + laplace(&mut rng, bs);
                vec![mean_laplace_cell("a0", s, bs, c, bc)]
            })
            .collect();
        let c = combine(&e, &[many_rows(&e, "A", rows, 0.0)]);
        let (covered, shown) = coverage(&c, 0, mu);
        assert!(
            shown > TRIALS / 2,
            "most means are still reported ({shown})"
        );
        let lo = binomial_lower(shown, 0.95);
        assert!(covered >= lo, "covered {covered} of {shown}, need {lo}");
        // A noisy count above 56 has a relative error under 10%: those few use the
        // delta method; every other shown mean says why its interval is wide.
        let flagged = c
            .rows
            .iter()
            .map(|r| &r.cells[0])
            .filter(|c| !c.suppressed && c.note.contains("small for its noise"))
            .count();
        assert!(flagged * 100 >= shown * 99, "{flagged} of {shown} flagged");
        // Where the count's own interval reaches zero the mean is not reported.
        assert!(c.rows.iter().any(|r| {
            r.cells[0]
                .suppression_reason
                .starts_with("Mean not reported")
        }));

        // Large counts: the delta method, with the parts' own multipliers, still covers
        // when one Laplace term dominates the mean's noise (1.96 alone gives about 94%
        // here: one partner, its sum's noise fifty times the count's contribution, and
        // the mean's standard error, 7, large beside the rounding to 0.1).
        let (n, bc, bs) = (2000.0, 4.0, 10_000.0);
        let rows = (0..TRIALS)
            .map(|_| {
                let c = n + discrete_laplace(&mut rng, bc);
                let s = n * mu + laplace(&mut rng, bs);
                vec![mean_laplace_cell("a0", s, bs, c, bc)]
            })
            .collect();
        let answers = [many_rows(&e, "A", rows, 0.0)];
        let c = combine(&e, &answers);
        let (covered, shown) = coverage(&c, 0, mu);
        assert_eq!(shown, TRIALS);
        assert!(c.rows.iter().all(|r| r.cells[0].note.is_empty()));
        let lo = binomial_lower(shown, 0.95);
        assert!(
            covered >= lo,
            "large counts: covered {covered} of {shown}, need {lo}"
        );
    }
}
