//! This node's input to a secure-aggregation session: the exact, bounded figures of a
//! query laid out as one integer vector (cells × coordinates), what one person can move
//! it by, and the noise share each node adds (OpenDP's discrete Gaussian). The protocol
//! itself (masks, shares, unmasking) is `phm-secagg`'s; this module only decides what is
//! summed, and samples.
//!
//! **Layout.** Per declared cell, in the release's row order, one coordinate per COUNT
//! and SUM and two per MEAN (its sum, then its count of values). Every coordinate is an
//! integer number of *units*, and units are weighted so that one row moves every
//! coordinate of its cell by at most the same `W`: a count unit is 1/W person, a sum unit
//! is `step / w` with `w = ⌊W / U⌋` where U is the column's largest clamped value in
//! lattice steps. With one σ for the whole vector each coordinate then gets the same
//! share of ρ, as the plain path's even split does. W is the largest U of the query's
//! value columns (1 for counts alone).
//!
//! **Sensitivity.** One person has at most m rows (contribution bounding, as in the plain
//! path), each in one cell, each moving the k coordinates of its cell by at most W: so
//! ‖Δ‖₁ ≤ m·W·k and ‖Δ‖₂ ≤ m·W·√k (all m rows in one cell is the worst case for both).
//!
//! The layout digest binds the dataset, the group labels and every coordinate's kind,
//! column and step: nodes contributing different vectors cannot share a session.

use opendp::domains::{AtomDomain, VectorDomain};
use opendp::measurements::make_gaussian;
use opendp::measures::ZeroConcentratedDivergence;
use opendp::metrics::L2Distance;
use phm_policies::Limits;
use phm_proto::AggregateKind;
use sha2::{Digest, Sha256};

use super::EngineError;
use super::plan::Exact;

/// What one coordinate of a cell holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Part {
    /// COUNT(*) of the cell.
    Count,
    /// SUM(column).
    Sum,
    /// A MEAN's numerator.
    MeanSum,
    /// A MEAN's denominator: the values that are neither NULL nor NaN.
    MeanCount,
}

impl Part {
    fn tag(self) -> u8 {
        match self {
            Part::Count => 1,
            Part::Sum => 2,
            Part::MeanSum => 3,
            Part::MeanCount => 4,
        }
    }
}

/// One coordinate of a cell: which aggregate, which part of it, and the real value of
/// one unit.
#[derive(Debug, Clone, PartialEq)]
pub struct Coordinate {
    /// Index into the query's aggregates.
    pub aggregate: usize,
    pub part: Part,
    pub gamma: f64,
}

/// The vector's shape, which every member must share.
#[derive(Debug, Clone, PartialEq)]
pub struct SecureLayout {
    pub group_columns: Vec<String>,
    /// Every declared cell's key, in order.
    pub keys: Vec<Vec<String>>,
    /// The coordinates of each cell (the same for every cell).
    pub coordinates: Vec<Coordinate>,
    /// SHA-256 of the canonical layout.
    pub digest: [u8; 32],
    /// ‖Δ‖₁ and ‖Δ‖₂ of one person's contribution, in units.
    pub delta1: f64,
    pub delta2: f64,
}

impl SecureLayout {
    /// γ of every coordinate of the whole vector, cell-major.
    pub fn gammas(&self) -> Vec<f64> {
        let mut out = Vec::with_capacity(self.keys.len() * self.coordinates.len());
        for _ in &self.keys {
            out.extend(self.coordinates.iter().map(|c| c.gamma));
        }
        out
    }
}

/// The exact input, in units, with its layout. Never leaves the node unmasked.
#[derive(Clone)]
pub struct SecureInput {
    pub layout: SecureLayout,
    pub units: Vec<i64>,
}

impl std::fmt::Debug for SecureInput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The exact figures are never printed.
        f.debug_struct("SecureInput")
            .field("layout", &self.layout)
            .finish_non_exhaustive()
    }
}

fn invalid(msg: impl Into<String>) -> EngineError {
    EngineError::InvalidLimits(msg.into())
}

/// Lay out an exact, bounded result for secure summation.
pub(crate) fn input(exact: &Exact, limits: &Limits) -> Result<SecureInput, EngineError> {
    if exact.thresholded {
        return Err(invalid(
            "a secure query must group only by keys with a declared domain",
        ));
    }
    // W: the largest per-row magnitude of any value column, in its lattice steps.
    let mut w_big: i64 = 1;
    for a in &exact.aggregates {
        if let Some(c) = &a.column {
            let v = exact
                .value(&c.name)
                .ok_or_else(|| invalid(format!("no values for column {}", c.name)))?;
            w_big = w_big.max(max_units(v.lattice.lo_units, v.lattice.hi_units));
        }
    }
    let mut coordinates = Vec::new();
    // Per coordinate: where its exact value comes from and its integer weight.
    let mut sources: Vec<(Source, i64)> = Vec::new();
    for (i, a) in exact.aggregates.iter().enumerate() {
        let column = a.column.as_ref().map(|c| c.name.as_str());
        let value = |name: &str| {
            exact
                .values
                .iter()
                .position(|v| v.name == name)
                .ok_or_else(|| invalid(format!("no values for column {name}")))
        };
        match (a.kind, column) {
            (AggregateKind::Count, _) => {
                coordinates.push(Coordinate {
                    aggregate: i,
                    part: Part::Count,
                    gamma: 1.0 / w_big as f64,
                });
                sources.push((Source::Rows, w_big));
            }
            (AggregateKind::Sum | AggregateKind::Mean, Some(name)) => {
                let j = value(name)?;
                let v = &exact.values[j];
                let u = max_units(v.lattice.lo_units, v.lattice.hi_units);
                let w = (w_big / u).max(1);
                let part = if a.kind == AggregateKind::Sum {
                    Part::Sum
                } else {
                    Part::MeanSum
                };
                coordinates.push(Coordinate {
                    aggregate: i,
                    part,
                    gamma: v.lattice.step / w as f64,
                });
                sources.push((Source::Sum(j), w));
                if a.kind == AggregateKind::Mean {
                    coordinates.push(Coordinate {
                        aggregate: i,
                        part: Part::MeanCount,
                        gamma: 1.0 / w_big as f64,
                    });
                    sources.push((Source::Values(j), w_big));
                }
            }
            _ => {
                return Err(invalid(format!(
                    "aggregate `{}` cannot be summed securely (COUNT, SUM and AVG can)",
                    a.alias
                )));
            }
        }
    }
    let k = coordinates.len();
    let m = f64::from(limits.max_rows_per_person.max(1));
    let w = w_big as f64;
    let layout_digest = digest(
        limits,
        &exact.group_columns,
        &exact.keys,
        &coordinates,
        w_big,
    );
    let mut units = Vec::with_capacity(exact.keys.len() * k);
    for cell in 0..exact.keys.len() {
        for (source, weight) in &sources {
            let raw = match source {
                Source::Rows => exact.counts.get(cell).copied().unwrap_or(0),
                Source::Sum(j) => {
                    let v = &exact.values[*j];
                    let sum = v.sums.get(cell).copied().unwrap_or(0.0);
                    // Exact: sums are whole numbers of steps, well below 2^53.
                    (sum / v.lattice.step).round() as i64
                }
                Source::Values(j) => exact.values[*j].counts.get(cell).copied().unwrap_or(0),
            };
            units.push(raw.checked_mul(*weight).ok_or(EngineError::SumOverflow)?);
        }
    }
    Ok(SecureInput {
        layout: SecureLayout {
            group_columns: exact.group_columns.clone(),
            keys: exact.keys.clone(),
            coordinates,
            digest: layout_digest,
            delta1: m * w * k as f64,
            delta2: m * w * (k as f64).sqrt(),
        },
        units,
    })
}

enum Source {
    Rows,
    Sum(usize),
    Values(usize),
}

fn max_units(lo: i64, hi: i64) -> i64 {
    lo.unsigned_abs()
        .max(hi.unsigned_abs())
        .clamp(1, i64::MAX as u64) as i64
}

fn digest(
    limits: &Limits,
    group_columns: &[String],
    keys: &[Vec<String>],
    coordinates: &[Coordinate],
    w: i64,
) -> [u8; 32] {
    let mut h = Sha256::new();
    let text = |h: &mut Sha256, s: &str| {
        h.update((s.len() as u64).to_be_bytes());
        h.update(s.as_bytes());
    };
    text(&mut h, "phm-secagg/v1 layout");
    text(&mut h, &limits.dataset);
    for g in group_columns {
        text(&mut h, g);
    }
    for key in keys {
        for label in key {
            text(&mut h, label);
        }
    }
    h.update((keys.len() as u64).to_be_bytes());
    h.update(w.to_be_bytes());
    for (c, a) in coordinates.iter().zip(0u64..) {
        h.update(a.to_be_bytes());
        h.update((c.aggregate as u64).to_be_bytes());
        h.update([c.part.tag()]);
        h.update(c.gamma.to_bits().to_be_bytes());
        let column = limits
            .aggregates
            .get(c.aggregate)
            .and_then(|a| a.column.as_ref())
            .map_or("", |c| c.name.as_str());
        text(&mut h, column);
    }
    h.finalize().into()
}

/// This node's noisy lattice input: `g · units` plus OpenDP's discrete Gaussian of σ =
/// `sigma_share` (lattice units) on every coordinate. The sampler is OpenDP's
/// (`make_gaussian` over `VectorDomain<AtomDomain<i64>>`, which is the discrete Gaussian
/// for integer input); nothing here draws noise by hand.
pub fn noisy_share(units: &[i64], lattice: u64, sigma_share: f64) -> Result<Vec<i64>, EngineError> {
    let g = i64::try_from(lattice).map_err(|_| invalid("lattice factor too large"))?;
    let scaled = units
        .iter()
        .map(|u| u.checked_mul(g).ok_or(EngineError::SumOverflow))
        .collect::<Result<Vec<i64>, _>>()?;
    let m = make_gaussian::<_, _, ZeroConcentratedDivergence>(
        VectorDomain::new(AtomDomain::<i64>::default()),
        L2Distance::<i64>::default(),
        sigma_share,
        None,
    )
    .map_err(|e| EngineError::Noise(e.to_string()))?;
    m.invoke(&scaled)
        .map_err(|e| EngineError::Noise(e.to_string()))
}
