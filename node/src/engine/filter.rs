//! Translating the signed filter tree into DataFusion expressions. Values become typed
//! literals (never SQL text), converted to the column's policy type, so no requester
//! value can change the shape of the plan.

use std::collections::HashMap;

use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::{Expr, cast, ident};
use datafusion::prelude::lit;
use datafusion::scalar::ScalarValue;
use phm_policies::model::ColumnType;
use phm_proto::{CompareOp, Literal, Predicate};

use super::EngineError;
use super::clamp::missing;
use super::load::{parse_bool, parse_date};

/// Column types of the dataset being queried.
pub(crate) struct Columns<'a> {
    pub dataset: &'a str,
    pub types: &'a HashMap<String, ColumnType>,
}

impl Columns<'_> {
    pub(crate) fn ty(&self, column: &str) -> Result<ColumnType, EngineError> {
        self.types
            .get(column)
            .copied()
            .ok_or_else(|| EngineError::UnknownColumn {
                dataset: self.dataset.to_string(),
                column: column.to_string(),
            })
    }
}

/// A column as filters read it: a real column with NaN as NULL, because NaN is missing
/// (see `clamp`), so `x IS NULL` holds for it and no comparison does.
fn column_expr(column: &str, ty: ColumnType) -> Expr {
    match ty {
        ColumnType::Real => missing(ident(column)),
        _ => ident(column),
    }
}

/// The column as an expression, plus a literal converter for it. An integer column
/// compared with a non-integral real is compared as real, so `age < 40.5` means what
/// it says.
fn operand(
    cols: &Columns<'_>,
    column: &str,
    values: &[&Literal],
) -> Result<(Expr, Vec<Expr>), EngineError> {
    let ty = cols.ty(column)?;
    let as_real = compares_as_real(ty, values);
    let (column_expr, ty) = if as_real {
        (cast(ident(column), DataType::Float64), ColumnType::Real)
    } else {
        (column_expr(column, ty), ty)
    };
    let lits = values
        .iter()
        .map(|v| literal(column, ty, v))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((column_expr, lits))
}

/// Converts a literal to the column's type, or says why it cannot be.
pub(crate) fn literal(column: &str, ty: ColumnType, v: &Literal) -> Result<Expr, EngineError> {
    literal_value(column, ty, v).map(lit)
}

/// True when an integer column compared with `values` is compared as real: some value
/// is a real with a fractional part, so `age < 40.5` means what it says.
pub(crate) fn compares_as_real(ty: ColumnType, values: &[&Literal]) -> bool {
    ty == ColumnType::Integer
        && values
            .iter()
            .any(|v| matches!(v, Literal::Real(r) if r.fract() != 0.0))
}

/// A literal as a typed value of the column's type (what every backend binds), or why
/// it cannot be one.
pub(crate) fn literal_value(
    column: &str,
    ty: ColumnType,
    v: &Literal,
) -> Result<ScalarValue, EngineError> {
    let bad = || EngineError::BadLiteral {
        column: column.to_string(),
        value: v.to_string(),
        expected: super::type_name(ty),
    };
    let scalar = match (ty, v) {
        (ColumnType::Integer, Literal::Integer(i)) => ScalarValue::Int64(Some(*i)),
        (ColumnType::Integer, Literal::Real(r)) if r.fract() == 0.0 && r.abs() < 9.0e15 => {
            ScalarValue::Int64(Some(*r as i64))
        }
        (ColumnType::Integer, Literal::Text(s)) => {
            ScalarValue::Int64(Some(s.trim().parse().map_err(|_| bad())?))
        }
        (ColumnType::Real, Literal::Integer(i)) => ScalarValue::Float64(Some(*i as f64)),
        (ColumnType::Real, Literal::Real(r)) if r.is_finite() => ScalarValue::Float64(Some(*r)),
        (ColumnType::Real, Literal::Text(s)) => {
            let r: f64 = s.trim().parse().map_err(|_| bad())?;
            if !r.is_finite() {
                return Err(bad());
            }
            ScalarValue::Float64(Some(r))
        }
        (ColumnType::Text, Literal::Text(s)) => ScalarValue::Utf8(Some(s.clone())),
        (ColumnType::Text, Literal::Integer(i)) => ScalarValue::Utf8(Some(i.to_string())),
        (ColumnType::Boolean, Literal::Boolean(b)) => ScalarValue::Boolean(Some(*b)),
        // The spellings a CSV file may use, so a filter can say what the file says.
        (ColumnType::Boolean, Literal::Text(s)) => {
            ScalarValue::Boolean(Some(parse_bool(s.trim()).ok_or_else(bad)?))
        }
        (ColumnType::Date, Literal::Text(s)) => {
            ScalarValue::Date32(Some(parse_date(s.trim()).ok_or_else(bad)?))
        }
        _ => return Err(bad()),
    };
    Ok(scalar)
}

/// The filter as a DataFusion predicate; rows where it is not TRUE (false or NULL) are
/// dropped, as in SQL.
pub(crate) fn to_expr(cols: &Columns<'_>, p: &Predicate) -> Result<Expr, EngineError> {
    Ok(match p {
        Predicate::Compare { column, op, value } => {
            let (c, mut lits) = operand(cols, column, &[value])?;
            let v = lits.pop().ok_or_else(|| {
                EngineError::InvalidLimits(format!("comparison on `{column}` lost its value"))
            })?;
            match op {
                CompareOp::Eq => c.eq(v),
                CompareOp::Ne => c.not_eq(v),
                CompareOp::Lt => c.lt(v),
                CompareOp::Le => c.lt_eq(v),
                CompareOp::Gt => c.gt(v),
                CompareOp::Ge => c.gt_eq(v),
            }
        }
        Predicate::InList {
            column,
            values,
            negated,
        } => {
            let refs: Vec<&Literal> = values.iter().collect();
            let (c, lits) = operand(cols, column, &refs)?;
            if lits.is_empty() {
                // x IN () is false for every row; NOT IN () is true for non-null x.
                return Ok(if *negated {
                    c.is_not_null()
                } else {
                    lit(false)
                });
            }
            c.in_list(lits, *negated)
        }
        Predicate::Between {
            column,
            low,
            high,
            negated,
        } => {
            let (c, mut lits) = operand(cols, column, &[low, high])?;
            let (Some(hi), Some(lo)) = (lits.pop(), lits.pop()) else {
                return Err(EngineError::InvalidLimits(format!(
                    "BETWEEN on `{column}` lost a bound"
                )));
            };
            if *negated {
                c.not_between(lo, hi)
            } else {
                c.between(lo, hi)
            }
        }
        Predicate::IsNull { column, negated } => {
            let c = column_expr(column, cols.ty(column)?);
            if *negated {
                c.is_not_null()
            } else {
                c.is_null()
            }
        }
        Predicate::All(ps) => {
            let mut acc: Option<Expr> = None;
            for p in ps {
                let e = to_expr(cols, p)?;
                acc = Some(match acc {
                    None => e,
                    Some(a) => a.and(e),
                });
            }
            acc.unwrap_or_else(|| lit(true))
        }
        Predicate::Any(ps) => {
            let mut acc: Option<Expr> = None;
            for p in ps {
                let e = to_expr(cols, p)?;
                acc = Some(match acc {
                    None => e,
                    Some(a) => a.or(e),
                });
            }
            acc.unwrap_or_else(|| lit(false))
        }
        Predicate::Not(p) => Expr::Not(Box::new(to_expr(cols, p)?)),
    })
}
