//! How a value enters an aggregate: the one place that defines what NaN, ±infinity and
//! out-of-bounds values mean, as DataFusion scalar functions that run one vectorised
//! pass each (a `CASE WHEN x < lo …` did the same row by row and cost about half of a
//! whole 1M-row query).
//!
//! # Semantics of non-finite reals (every backend must do exactly this)
//!
//! - **NaN is missing.** A NaN value behaves exactly like NULL everywhere: it is neither
//!   summed nor counted by SUM, AVG or COUNT(column), it falls in no bin (so it is dropped
//!   like a key outside the declared domain), it is no thresholded key, and in a filter
//!   `x IS NULL` is true and every comparison is not true for it. Rationale: a NaN is
//!   not a measurement, and any other reading lets one person move a sum by more than
//!   the clamping bound (a NaN sum, which OpenDP would turn into 0 + noise).
//! - **+inf and -inf clamp** to the upper and the lower bound, like any other value
//!   outside the bounds; in bins they fall in the last and the first bin.
//! - Load refuses any non-finite real (a node does not start on such data); these rules
//!   are for data read at query time, which may have been replaced since load.
//!
//! # Fixed-point sums
//!
//! A clamped value is rounded to a lattice of step 2^e chosen from the bounds (see
//! [`Lattice`]) and summed as an exact Int64 count of steps, so a sum is an exact,
//! order-independent function of the rows and one person's rows move it by at most
//! `m * max(|lo|, |hi|)`: the bounds are rounded *inwards* onto the lattice, so rounding
//! never takes a value further from zero than the declared bounds allow.

use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{Array, AsArray, BooleanArray, PrimitiveArray};
use datafusion::arrow::buffer::{BooleanBuffer, NullBuffer};
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::lit;

/// Most steps one clamped value may be from zero (2^20: a resolution of about one
/// millionth of the larger bound).
pub(crate) const MAX_UNITS_PER_VALUE: i64 = 1 << 20;
/// Most values one cell may sum (2^33, about 8.6 billion): with
/// [`MAX_UNITS_PER_VALUE`] the exact sum stays within ±2^53, so DataFusion's Int64 SUM
/// (which wraps on overflow) cannot wrap, and the sum converts to f64 exactly.
pub(crate) const MAX_VALUES_PER_CELL: i64 = 1 << 33;

/// The fixed-point lattice a value column is clamped to and summed on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct Lattice {
    /// The lattice spacing, a power of two, so scaling by it is exact.
    pub step: f64,
    /// 1 / step, also a power of two.
    pub inv_step: f64,
    /// The clamping interval in steps: the declared bounds rounded inwards.
    pub lo_units: i64,
    pub hi_units: i64,
}

/// 2^e as an f64, exactly; `e` in [-1022, 1023].
fn pow2(e: i32) -> f64 {
    let e = e.clamp(-1022, 1023);
    f64::from_bits(((e + 1023) as u64) << 52)
}

impl Lattice {
    /// The finest power-of-two lattice on which every value in [lo, hi] is at most
    /// [`MAX_UNITS_PER_VALUE`] steps from zero, and the bounds rounded inwards onto it.
    pub fn for_bounds(lo: f64, hi: f64) -> std::result::Result<Lattice, String> {
        if !(lo.is_finite() && hi.is_finite() && lo <= hi) {
            return Err(format!("bounds [{lo}, {hi}] are not a finite interval"));
        }
        let max_abs = lo.abs().max(hi.abs());
        if max_abs > pow2(960) {
            return Err(format!("bounds [{lo}, {hi}] are too large to sum exactly"));
        }
        let limit = MAX_UNITS_PER_VALUE as f64;
        let mut e: i32 = if max_abs > 0.0 {
            (max_abs.log2().floor() as i32 - 22).max(-1022)
        } else {
            0
        };
        while max_abs * pow2(-e) > limit {
            e += 1;
        }
        let (step, inv_step) = (pow2(e), pow2(-e));
        let mut lo_u = (lo * inv_step).ceil();
        let mut hi_u = (hi * inv_step).floor();
        if lo_u > hi_u {
            // [lo, hi] holds no lattice point (it is narrower than a step and does not
            // contain 0): use the neighbouring point nearer zero, which is no further
            // from zero than either bound.
            if lo > 0.0 {
                lo_u = hi_u;
            } else {
                hi_u = lo_u;
            }
        }
        // |lo_u|, |hi_u| <= 2^20 here, so the casts are exact.
        Ok(Lattice {
            step,
            inv_step,
            lo_units: lo_u as i64,
            hi_units: hi_u as i64,
        })
    }

    /// The largest |value| one row can add to a sum: at most max(|lo|, |hi|).
    pub fn max_abs(&self) -> f64 {
        self.lo_units.abs().max(self.hi_units.abs()) as f64 * self.step
    }

    /// The lattice point at the middle of the clamping interval (rounded down): what a
    /// mean's values are centred on before summing.
    pub fn centre_units(&self) -> i64 {
        self.lo_units + (self.hi_units - self.lo_units) / 2
    }

    /// The largest |value − centre| of one clamped row: about (hi − lo) / 2.
    pub fn centred_max_abs(&self) -> f64 {
        let c = self.centre_units();
        (self.hi_units - c).max(c - self.lo_units) as f64 * self.step
    }

    /// A sum in steps as a value; exact while |units| <= 2^53.
    pub fn value_of(&self, units: i64) -> f64 {
        units as f64 * self.step
    }
}

/// 1.5 * 2^52: adding and subtracting it rounds any |u| <= 2^51 to the nearest integer
/// (ties to even) in two additions that vectorise, where `f64::round` is a libm call per
/// value on baseline x86-64.
const ROUND: f64 = 6_755_399_441_055_744.0;

/// One value in steps: scaled (exactly), clamped, rounded to the nearest step. NaN
/// stays NaN through all three (its slot is made NULL by the caller); ±inf clamp.
#[inline]
fn to_units(v: f64, lo: f64, hi: f64, inv_step: f64) -> i64 {
    let u = (v * inv_step).clamp(lo, hi);
    ((u + ROUND) - ROUND) as i64
}

/// `nulls` with every NaN slot of `values` made NULL too.
fn nan_as_null(values: &[f64], nulls: Option<&NullBuffer>) -> Option<NullBuffer> {
    let not_nan = BooleanBuffer::collect_bool(values.len(), |i| !values[i].is_nan());
    if not_nan.count_set_bits() == values.len() {
        return nulls.cloned();
    }
    NullBuffer::union(nulls, Some(&NullBuffer::new(not_nan)))
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct ClampUnits {
    signature: Signature,
}

impl ScalarUDFImpl for ClampUnits {
    fn name(&self) -> &str {
        "phm_clamp"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let arg = |i: usize| match args.args.get(i) {
            Some(ColumnarValue::Scalar(ScalarValue::Float64(Some(v)))) => Ok(*v),
            _ => exec_err!("phm_clamp: argument {i} must be a non-null Float64 literal"),
        };
        let (lo, hi, inv_step) = (arg(1)?, arg(2)?, arg(3)?);
        // f64::clamp panics on NaN or lo > hi: refuse instead.
        if lo.is_nan() || hi.is_nan() || lo > hi || !(inv_step.is_finite() && inv_step > 0.0) {
            return exec_err!("phm_clamp: [{lo}, {hi}] by {inv_step} is not a lattice interval");
        }
        match args.args.first() {
            Some(ColumnarValue::Array(a)) => {
                let Some(values) = a.as_primitive_opt::<Float64Type>() else {
                    return exec_err!("phm_clamp: expected Float64 values, got {}", a.data_type());
                };
                let units = values.unary::<_, Int64Type>(|v| to_units(v, lo, hi, inv_step));
                let nulls = nan_as_null(values.values(), values.nulls());
                let out = PrimitiveArray::<Int64Type>::new(units.values().clone(), nulls);
                Ok(ColumnarValue::Array(Arc::new(out)))
            }
            Some(ColumnarValue::Scalar(ScalarValue::Float64(v))) => {
                Ok(ColumnarValue::Scalar(ScalarValue::Int64(
                    v.filter(|v| !v.is_nan())
                        .map(|v| to_units(v, lo, hi, inv_step)),
                )))
            }
            _ => exec_err!("phm_clamp: expected Float64 values"),
        }
    }
}

static CLAMP: LazyLock<ScalarUDF> = LazyLock::new(|| {
    ScalarUDF::from(ClampUnits {
        signature: Signature::exact(
            vec![
                DataType::Float64,
                DataType::Float64,
                DataType::Float64,
                DataType::Float64,
            ],
            Volatility::Immutable,
        ),
    })
});

/// `x` (Float64) clamped to the lattice's interval and rounded to it, as an Int64
/// number of steps. NULL and NaN give NULL (neither summed nor counted); ±inf clamp.
pub(crate) fn clamp_units(x: Expr, lattice: &Lattice) -> Expr {
    CLAMP.call(vec![
        x,
        lit(lattice.lo_units as f64),
        lit(lattice.hi_units as f64),
        lit(lattice.inv_step),
    ])
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Missing {
    signature: Signature,
}

impl ScalarUDFImpl for Missing {
    fn name(&self) -> &str {
        "phm_missing"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        match args.args.first() {
            Some(ColumnarValue::Array(a)) => {
                let Some(values) = a.as_primitive_opt::<Float64Type>() else {
                    return exec_err!(
                        "phm_missing: expected Float64 values, got {}",
                        a.data_type()
                    );
                };
                let nulls = nan_as_null(values.values(), values.nulls());
                let out = PrimitiveArray::<Float64Type>::new(values.values().clone(), nulls);
                Ok(ColumnarValue::Array(Arc::new(out)))
            }
            Some(ColumnarValue::Scalar(ScalarValue::Float64(v))) => Ok(ColumnarValue::Scalar(
                ScalarValue::Float64(v.filter(|v| !v.is_nan())),
            )),
            _ => exec_err!("phm_missing: expected Float64 values"),
        }
    }
}

static MISSING: LazyLock<ScalarUDF> = LazyLock::new(|| {
    ScalarUDF::from(Missing {
        signature: Signature::exact(vec![DataType::Float64], Volatility::Immutable),
    })
});

/// `x` (Float64) with NaN read as NULL: how filters and bins see a real column.
pub(crate) fn missing(x: Expr) -> Expr {
    MISSING.call(vec![x])
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct Bin {
    signature: Signature,
}

impl ScalarUDFImpl for Bin {
    fn name(&self) -> &str {
        "phm_bin"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Int64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let mut edges = Vec::with_capacity(args.args.len().saturating_sub(1));
        for (i, a) in args.args.iter().enumerate().skip(1) {
            match a {
                ColumnarValue::Scalar(ScalarValue::Float64(Some(e))) if e.is_finite() => {
                    edges.push(*e)
                }
                _ => return exec_err!("phm_bin: edge {i} must be a finite Float64 literal"),
            }
        }
        if edges.len() < 2 || edges.windows(2).any(|w| w[0] >= w[1]) {
            return exec_err!("phm_bin: needs at least two increasing edges");
        }
        // Bin k is [edges[k], edges[k+1]); below the first edge is bin 0 and at or above
        // the last is the last bin, so only the inner edges decide.
        let inner = &edges[1..edges.len() - 1];
        let bin = |v: f64| inner.partition_point(|e| *e <= v) as i64;
        match args.args.first() {
            Some(ColumnarValue::Array(a)) => {
                let Some(values) = a.as_primitive_opt::<Float64Type>() else {
                    return exec_err!("phm_bin: expected Float64 values, got {}", a.data_type());
                };
                let bins = values.unary::<_, Int64Type>(bin);
                let nulls = nan_as_null(values.values(), values.nulls());
                let out = PrimitiveArray::<Int64Type>::new(bins.values().clone(), nulls);
                Ok(ColumnarValue::Array(Arc::new(out)))
            }
            Some(ColumnarValue::Scalar(ScalarValue::Float64(v))) => Ok(ColumnarValue::Scalar(
                ScalarValue::Int64(v.filter(|v| !v.is_nan()).map(bin)),
            )),
            _ => exec_err!("phm_bin: expected Float64 values"),
        }
    }
}

static BIN: LazyLock<ScalarUDF> = LazyLock::new(|| {
    ScalarUDF::from(Bin {
        signature: Signature::variadic(vec![DataType::Float64], Volatility::Immutable),
    })
});

/// The bin index (Int64) of `x` (Float64) among `edges`: bin k is
/// [edges[k], edges[k+1]); values below the first edge (and -inf) fall in bin 0, values
/// at or above the last edge (and +inf) in the last bin; NULL and NaN give NULL, which
/// is no key.
pub(crate) fn bin_index(x: Expr, edges: &[f64]) -> Expr {
    let mut args = Vec::with_capacity(edges.len() + 1);
    args.push(x);
    args.extend(edges.iter().map(|e| lit(*e)));
    BIN.call(args)
}

/// True when a person id names someone: not NULL and, for text, not empty or only
/// whitespace (`str::trim`, Unicode White_Space), the same rule load applies.
pub(crate) fn names_a_person(s: Option<&str>) -> bool {
    s.is_some_and(|s| !s.trim().is_empty())
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct HasPerson {
    signature: Signature,
}

impl ScalarUDFImpl for HasPerson {
    fn name(&self) -> &str {
        "phm_has_person"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Boolean)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let a = match args.args.first() {
            Some(ColumnarValue::Array(a)) => a.clone(),
            Some(ColumnarValue::Scalar(s)) => s.to_array()?,
            None => return exec_err!("phm_has_person: expected one argument"),
        };
        let n = a.len();
        let present = match a.data_type() {
            DataType::Utf8View => {
                let s = a.as_string_view();
                BooleanBuffer::collect_bool(n, |i| {
                    names_a_person(s.is_valid(i).then(|| s.value(i)))
                })
            }
            DataType::Utf8 => {
                let s = a.as_string::<i32>();
                BooleanBuffer::collect_bool(n, |i| {
                    names_a_person(s.is_valid(i).then(|| s.value(i)))
                })
            }
            DataType::LargeUtf8 => {
                let s = a.as_string::<i64>();
                BooleanBuffer::collect_bool(n, |i| {
                    names_a_person(s.is_valid(i).then(|| s.value(i)))
                })
            }
            // Integer ids name someone whenever they are present.
            _ => BooleanBuffer::collect_bool(n, |i| a.is_valid(i)),
        };
        let out = BooleanArray::new(present, None);
        match args.args.first() {
            Some(ColumnarValue::Scalar(_)) => {
                Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?))
            }
            _ => Ok(ColumnarValue::Array(Arc::new(out))),
        }
    }
}

static HAS_PERSON: LazyLock<ScalarUDF> = LazyLock::new(|| {
    ScalarUDF::from(HasPerson {
        signature: Signature::any(1, Volatility::Immutable),
    })
});

/// TRUE when the person id names someone (see [`names_a_person`]), FALSE otherwise,
/// never NULL: the rows contribution bounding may keep.
pub(crate) fn has_person(id: Expr) -> Expr {
    HAS_PERSON.call(vec![id])
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Float64Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::prelude::{SessionContext, col};

    async fn eval(x: Vec<Option<f64>>, e: impl Fn(Expr) -> Expr) -> Arc<dyn Array> {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Float64, true)]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(Float64Array::from(x))]).unwrap();
        let out = SessionContext::new()
            .read_batch(batch)
            .unwrap()
            .select(vec![e(col("x")).alias("c")])
            .unwrap()
            .collect()
            .await
            .unwrap();
        out[0].column(0).clone()
    }

    #[tokio::test]
    async fn clamps_to_lattice_units_nan_is_null_and_infinities_clamp() {
        let l = Lattice::for_bounds(10.0, 60.0).unwrap();
        assert_eq!(l.step, 1.0 / 16384.0);
        let x = vec![
            Some(-5.0),
            None,
            Some(10.0),
            Some(35.5),
            Some(500.0),
            Some(f64::NAN),
            Some(-f64::NAN),
            Some(f64::INFINITY),
            Some(f64::NEG_INFINITY),
        ];
        let out = eval(x, |x| clamp_units(x, &l)).await;
        let got: Vec<Option<f64>> = out
            .as_primitive::<Int64Type>()
            .iter()
            .map(|u| u.map(|u| l.value_of(u)))
            .collect();
        assert_eq!(
            got,
            vec![
                Some(10.0),
                None,
                Some(10.0),
                Some(35.5),
                Some(60.0),
                None,
                None,
                Some(60.0),
                Some(10.0),
            ]
        );
    }

    #[tokio::test]
    async fn missing_reads_nan_as_null_and_keeps_infinities() {
        let x = vec![Some(1.5), None, Some(f64::NAN), Some(f64::INFINITY)];
        let out = eval(x, missing).await;
        let got: Vec<Option<f64>> = out.as_primitive::<Float64Type>().iter().collect();
        assert_eq!(got, vec![Some(1.5), None, None, Some(f64::INFINITY)]);
    }

    #[tokio::test]
    async fn bins_drop_nan_and_put_infinities_in_the_end_bins() {
        let x = vec![
            Some(5.0),
            Some(18.0),
            Some(39.9),
            Some(65.0),
            Some(500.0),
            None,
            Some(f64::NAN),
            Some(-f64::NAN),
            Some(f64::INFINITY),
            Some(f64::NEG_INFINITY),
        ];
        let out = eval(x, |x| bin_index(x, &[0.0, 18.0, 40.0, 65.0, 110.0])).await;
        let got: Vec<Option<i64>> = out.as_primitive::<Int64Type>().iter().collect();
        assert_eq!(
            got,
            vec![
                Some(0),
                Some(1),
                Some(1),
                Some(3),
                Some(3),
                None,
                None,
                None,
                Some(3),
                Some(0)
            ]
        );
    }

    #[tokio::test]
    async fn has_person_is_false_for_null_empty_and_blank_ids() {
        let schema = Arc::new(Schema::new(vec![Field::new("id", DataType::Utf8, true)]));
        let ids = StringArray::from(vec![Some("p1"), None, Some(""), Some(" \t"), Some(" p2 ")]);
        let batch = RecordBatch::try_new(schema, vec![Arc::new(ids)]).unwrap();
        let out = SessionContext::new()
            .read_batch(batch)
            .unwrap()
            .select(vec![has_person(col("id")).alias("h")])
            .unwrap()
            .collect()
            .await
            .unwrap();
        let got: Vec<Option<bool>> = out[0].column(0).as_boolean().iter().collect();
        assert_eq!(
            got,
            vec![
                Some(true),
                Some(false),
                Some(false),
                Some(false),
                Some(true)
            ]
        );
    }

    #[test]
    fn lattice_never_widens_the_bounds_and_keeps_sums_exact() {
        for (lo, hi) in [
            (10.0, 60.0),
            (0.0, 110.0),
            (0.5, 45.3),
            (-7.25, 3.1),
            (-1e9, 1e9),
            (1e-9, 3e-9),
            (0.3, 0.3),
            (-0.3, -0.3),
            (0.0, 0.0),
            (123_456.789, 123_456.789_1),
            (-1e200, 1e200),
        ] {
            let l = Lattice::for_bounds(lo, hi).unwrap();
            let max_abs = f64::abs(lo).max(f64::abs(hi));
            assert!(l.max_abs() <= max_abs, "[{lo}, {hi}]: {}", l.max_abs());
            assert!(l.lo_units <= l.hi_units, "[{lo}, {hi}]");
            let units = l.lo_units.abs().max(l.hi_units.abs());
            assert!(units <= MAX_UNITS_PER_VALUE, "[{lo}, {hi}]: {units}");
            // The finest such lattice: half the step would need more units.
            if max_abs > 0.0 {
                assert!(
                    max_abs / (l.step / 2.0) > MAX_UNITS_PER_VALUE as f64,
                    "[{lo}, {hi}]"
                );
            }
            // Every sum of at most MAX_VALUES_PER_CELL values is exact in i64 and f64.
            let worst = i128::from(units) * i128::from(MAX_VALUES_PER_CELL);
            assert!(worst <= 1i128 << 53);
            assert!(l.value_of(worst as i64).is_finite());
            // The step is a power of two.
            assert_eq!(l.step.to_bits() & ((1u64 << 52) - 1), 0, "[{lo}, {hi}]");
        }
        assert!(Lattice::for_bounds(f64::NAN, 1.0).is_err());
        assert!(Lattice::for_bounds(2.0, 1.0).is_err());
        assert!(Lattice::for_bounds(-1e300, 1e300).is_err());
    }

    #[test]
    fn rounding_is_to_the_nearest_step() {
        let l = Lattice::for_bounds(-4.0, 4.0).unwrap();
        let (lo, hi) = (l.lo_units as f64, l.hi_units as f64);
        let s = l.step;
        for (v, want) in [
            (0.0, 0),
            (0.4 * s, 0),
            (0.6 * s, 1),
            (-0.6 * s, -1),
            (2.5 * s, 2),
            (3.5 * s, 4),
            (-2.5 * s, -2),
            (4.0, l.hi_units),
            (-4.0, l.lo_units),
        ] {
            assert_eq!(to_units(v, lo, hi, l.inv_step), want, "{v}");
        }
    }
}
