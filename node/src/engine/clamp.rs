//! `phm_clamp(x, lo, hi)`: clamps Float64 values to [lo, hi] in one vectorised pass,
//! NULL staying NULL. A `CASE WHEN x < lo … END` did the same row by row and cost about
//! half of a whole 1M-row query.

use std::sync::{Arc, LazyLock};

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{DataType, Float64Type};
use datafusion::common::{Result, ScalarValue, exec_err};
use datafusion::logical_expr::{
    ColumnarValue, Expr, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use datafusion::prelude::lit;

#[derive(Debug, PartialEq, Eq, Hash)]
struct Clamp {
    signature: Signature,
}

impl ScalarUDFImpl for Clamp {
    fn name(&self) -> &str {
        "phm_clamp"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> Result<DataType> {
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let bound = |i: usize| match args.args.get(i) {
            Some(ColumnarValue::Scalar(ScalarValue::Float64(Some(v)))) => Ok(*v),
            _ => exec_err!("phm_clamp: argument {i} must be a non-null Float64 literal"),
        };
        let (lo, hi) = (bound(1)?, bound(2)?);
        // f64::clamp panics on NaN or lo > hi: refuse instead.
        if lo.is_nan() || hi.is_nan() || lo > hi {
            return exec_err!("phm_clamp: bounds [{lo}, {hi}] are not an interval");
        }
        match args.args.first() {
            Some(ColumnarValue::Array(a)) => {
                let Some(values) = a.as_primitive_opt::<Float64Type>() else {
                    return exec_err!("phm_clamp: expected Float64 values, got {}", a.data_type());
                };
                let clamped = values.unary::<_, Float64Type>(|v| v.clamp(lo, hi));
                Ok(ColumnarValue::Array(Arc::new(clamped)))
            }
            Some(ColumnarValue::Scalar(ScalarValue::Float64(v))) => Ok(ColumnarValue::Scalar(
                ScalarValue::Float64(v.map(|v| v.clamp(lo, hi))),
            )),
            _ => exec_err!("phm_clamp: expected Float64 values"),
        }
    }
}

static CLAMP: LazyLock<ScalarUDF> = LazyLock::new(|| {
    ScalarUDF::from(Clamp {
        signature: Signature::exact(
            vec![DataType::Float64, DataType::Float64, DataType::Float64],
            Volatility::Immutable,
        ),
    })
});

/// `x` (Float64) clamped to [lo, hi]; NULL stays NULL, so it is neither summed nor
/// counted.
pub(crate) fn clamp(x: Expr, lo: f64, hi: f64) -> Expr {
    CLAMP.call(vec![x, lit(lo), lit(hi)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::arrow::array::{Float64Array, RecordBatch};
    use datafusion::arrow::datatypes::{Field, Schema};
    use datafusion::prelude::{SessionContext, col};

    #[tokio::test]
    async fn clamps_values_and_keeps_nulls() {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Float64, true)]));
        let x = Float64Array::from(vec![Some(-5.0), None, Some(10.0), Some(35.5), Some(500.0)]);
        let batch = RecordBatch::try_new(schema, vec![Arc::new(x)]).unwrap();
        let ctx = SessionContext::new();
        let out = ctx
            .read_batch(batch)
            .unwrap()
            .select(vec![clamp(col("x"), 10.0, 60.0).alias("c")])
            .unwrap()
            .collect()
            .await
            .unwrap();
        let c = out[0].column(0).as_primitive::<Float64Type>();
        let got: Vec<Option<f64>> = c.iter().collect();
        assert_eq!(
            got,
            vec![Some(10.0), None, Some(10.0), Some(35.5), Some(60.0)]
        );
    }
}
