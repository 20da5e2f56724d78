//! The exact, bounded aggregation of one query inside DataFusion: opt-out exclusion,
//! filter, per-person contribution bounding, clamping, and grouping into the declared
//! key domain. Everything after this (noise, rounding, suppression) works on a few
//! numbers per group.

use std::collections::{BTreeMap, HashMap};

use datafusion::arrow::array::{Array, AsArray};
use datafusion::arrow::datatypes::{DataType, Float64Type, Int64Type};
use datafusion::functions::math::expr_fn::random;
use datafusion::functions_aggregate::expr_fn::{count, sum};
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{Expr, ExprFunctionExt, cast, ident, when};
use datafusion::prelude::{SessionContext, lit};
use datafusion::scalar::ScalarValue;
use phm_policies::model::ColumnType;
use phm_policies::{AggregateLimits, GroupDomain, Limits};
use phm_proto::{AggregateKind, Predicate};

use super::EngineError;
use super::clamp::clamp;
use super::filter::{self, Columns};
use super::load::{LoadedDataset, label_at};

/// Most cells one release may hold, whatever the policy says: a guard against a
/// cartesian product that would exhaust memory.
const MAX_CELLS: usize = 1_000_000;

/// One clamped numeric column that SUM or MEAN aggregates read.
#[derive(Debug, Clone)]
pub(crate) struct ValueColumn {
    pub name: String,
    pub bounds: (f64, f64),
    /// Sum of clamped values per key.
    pub sums: Vec<f64>,
    /// Number of non-null values per key (the denominator of a mean).
    pub counts: Vec<i64>,
}

/// Exact bounded aggregates per candidate key.
#[derive(Debug, Clone)]
pub(crate) struct Exact {
    pub group_columns: Vec<String>,
    /// Candidate keys: the full declared product, or the observed keys when any group
    /// key is thresholded.
    pub keys: Vec<Vec<String>>,
    pub thresholded: bool,
    /// Rows per key (COUNT(*)).
    pub counts: Vec<i64>,
    pub values: Vec<ValueColumn>,
    pub aggregates: Vec<AggregateLimits>,
}

impl Exact {
    pub fn value(&self, column: &str) -> Option<&ValueColumn> {
        self.values.iter().find(|v| v.name == column)
    }

    /// Keeps only the keys at the given (ascending) positions.
    pub fn retain_keys(&mut self, keep: &[usize]) {
        fn pick<T: Clone>(v: &[T], keep: &[usize]) -> Vec<T> {
            keep.iter().filter_map(|&i| v.get(i).cloned()).collect()
        }
        self.keys = pick(&self.keys, keep);
        self.counts = pick(&self.counts, keep);
        for v in &mut self.values {
            v.sums = pick(&v.sums, keep);
            v.counts = pick(&v.counts, keep);
        }
    }
}

const RN: &str = "__phm_rn";
const N: &str = "__phm_n";

fn g(i: usize) -> String {
    format!("__phm_g{i}")
}
fn v(j: usize) -> String {
    format!("__phm_v{j}")
}
fn s(j: usize) -> String {
    format!("__phm_s{j}")
}
fn c(j: usize) -> String {
    format!("__phm_c{j}")
}

/// How one group key is computed and read back.
enum KeyPlan {
    /// Declared categories. DataFusion groups on the raw column and each of the few
    /// output groups is mapped to its label's index afterwards: mapping every row with
    /// a CASE inside the plan cost more than the whole aggregation. Values outside the
    /// domain (possible only if the file changed since load) and NULL map to no key.
    Categories {
        labels: Vec<String>,
        index: HashMap<String, usize>,
    },
    /// Numeric bins: index into `labels` (Int64) computed in the plan, NULL for NULL.
    Bins(Vec<String>),
    /// The raw column; its observed values become labels.
    Observed,
}

impl KeyPlan {
    fn declared_labels(&self) -> Option<&Vec<String>> {
        match self {
            KeyPlan::Categories { labels, .. } | KeyPlan::Bins(labels) => Some(labels),
            KeyPlan::Observed => None,
        }
    }

    /// Index of the declared key that output row `r` of group column `a` belongs to.
    fn declared_index(&self, a: &dyn Array, r: usize) -> Option<usize> {
        match self {
            KeyPlan::Categories { index, .. } => {
                label_at(a, r).and_then(|l| index.get(&l).copied())
            }
            KeyPlan::Bins(labels) => a
                .as_primitive_opt::<Int64Type>()
                .filter(|a| a.is_valid(r))
                .and_then(|a| usize::try_from(a.value(r)).ok())
                .filter(|k| *k < labels.len()),
            KeyPlan::Observed => None,
        }
    }
}

fn invalid(msg: String) -> EngineError {
    EngineError::InvalidLimits(msg)
}

pub(crate) async fn run_exact(
    ctx: &SessionContext,
    ds: &LoadedDataset,
    filter: Option<&Predicate>,
    limits: &Limits,
) -> Result<Exact, EngineError> {
    let cols = Columns {
        dataset: &limits.dataset,
        types: &ds.columns,
    };
    let m = limits.max_rows_per_person;
    if m == 0 {
        return Err(invalid("max_rows_per_person must be at least 1".into()));
    }
    let mut df = ctx.table(ds.table.clone()).await?;

    // 1. National Data Opt-out: keep only rows whose flag is FALSE, so a missing flag
    // counts as opted out.
    if let Some(flag) = &limits.exclude_opted_out {
        match ds.columns.get(flag) {
            Some(ColumnType::Boolean) => df = df.filter(ident(flag).is_false())?,
            _ => {
                return Err(invalid(format!(
                    "opt-out column `{flag}` is not a boolean column of `{}`",
                    limits.dataset
                )));
            }
        }
    }
    // 2. The requester's filter.
    if let Some(p) = filter {
        df = df.filter(filter::to_expr(&cols, p)?)?;
    }
    // 3. Contribution bounding. When the file (unchanged since load) has no person with
    // more than m rows, no filtered subset has either and the window would keep every
    // row; otherwise keep a uniformly random m of each person's rows.
    let within_bound = ds.max_rows_per_person_observed <= u64::from(m)
        && ds.fingerprint.as_ref().is_none_or(|f| f.unchanged());
    if !within_bound {
        let rn = row_number()
            .partition_by(vec![ident(&ds.person_id)])
            .order_by(vec![random().sort(true, false)])
            .build()?
            .alias(RN);
        df = df
            .window(vec![rn])?
            .filter(ident(RN).lt_eq(lit(u64::from(m))))?;
    }

    // 4. Group keys and clamped values.
    let mut select: Vec<Expr> = Vec::new();
    let mut plans: Vec<KeyPlan> = Vec::new();
    let mut thresholded = false;
    for (i, gl) in limits.group_by.iter().enumerate() {
        let name = &gl.column.name;
        let ty = cols_ty(&cols, name)?;
        let (expr, plan) = match &gl.domain {
            GroupDomain::Categories(labels) => {
                if labels.is_empty() {
                    return Err(invalid(format!("group key `{name}` has an empty domain")));
                }
                let index = labels
                    .iter()
                    .enumerate()
                    .map(|(k, l)| (l.clone(), k))
                    .collect();
                (
                    ident(name),
                    KeyPlan::Categories {
                        labels: labels.clone(),
                        index,
                    },
                )
            }
            GroupDomain::Bins { edges } => {
                if edges.len() < 2
                    || edges.iter().any(|e| !e.is_finite())
                    || edges.windows(2).any(|w| w[0] >= w[1])
                {
                    return Err(invalid(format!(
                        "group key `{name}` needs at least two increasing finite bin edges"
                    )));
                }
                if !ty.is_numeric() {
                    return Err(invalid(format!(
                        "group key `{name}` is binned but not numeric"
                    )));
                }
                let x = cast(ident(name), DataType::Float64);
                let nbins = edges.len() - 1;
                let mut b = when(x.clone().is_null(), lit(ScalarValue::Int64(None)));
                // Bin k is [edges[k], edges[k+1]); values below the first edge fall in
                // bin 0 and values at or above the last in the last bin (clamping).
                for (k, upper) in edges.iter().enumerate().skip(1).take(nbins - 1) {
                    b.when(x.clone().lt(lit(*upper)), lit((k - 1) as i64));
                }
                let expr = b.otherwise(lit((nbins - 1) as i64))?;
                let labels = edges[..nbins].iter().map(|e| format!("{e}")).collect();
                (expr, KeyPlan::Bins(labels))
            }
            GroupDomain::Thresholded => {
                thresholded = true;
                (ident(name), KeyPlan::Observed)
            }
        };
        select.push(expr.alias(g(i)));
        plans.push(plan);
    }

    let mut values: Vec<ValueColumn> = Vec::new();
    for a in &limits.aggregates {
        match a.kind {
            AggregateKind::Count => {}
            AggregateKind::Sum | AggregateKind::Mean => {
                let col = a
                    .column
                    .as_ref()
                    .ok_or_else(|| invalid(format!("aggregate `{}` needs a column", a.alias)))?;
                let ty = cols_ty(&cols, &col.name)?;
                if !ty.is_numeric() {
                    return Err(invalid(format!(
                        "aggregate `{}` reads `{}`, which is not numeric",
                        a.alias, col.name
                    )));
                }
                let bounds = match col.bounds {
                    Some((lo, hi)) if lo.is_finite() && hi.is_finite() && lo <= hi => (lo, hi),
                    _ => {
                        return Err(invalid(format!(
                            "aggregate `{}` reads `{}`, which has no usable clamping bounds",
                            a.alias, col.name
                        )));
                    }
                };
                match values.iter().find(|v| v.name == col.name) {
                    Some(existing) if existing.bounds != bounds => {
                        return Err(invalid(format!(
                            "column `{}` is given two different bounds",
                            col.name
                        )));
                    }
                    Some(_) => {}
                    None => values.push(ValueColumn {
                        name: col.name.clone(),
                        bounds,
                        sums: Vec::new(),
                        counts: Vec::new(),
                    }),
                }
            }
            AggregateKind::Quantile(_) => {
                return Err(invalid(format!(
                    "aggregate `{}`: quantiles are not supported",
                    a.alias
                )));
            }
        }
    }
    for (j, vc) in values.iter().enumerate() {
        let (lo, hi) = vc.bounds;
        // Always clamped, even when the data happen to lie within the bounds: skipping it
        // would save ~3 ms at 1M rows but make the sensitivity rest on the file being
        // unchanged since load.
        let clamped = clamp(cast(ident(&vc.name), DataType::Float64), lo, hi);
        select.push(clamped.alias(v(j)));
    }
    if select.is_empty() {
        select.push(lit(1i64).alias(v(0)));
    }
    // Rows whose key is NULL form their own groups and are dropped when read back.
    df = df.select(select)?;
    let mut aggs = vec![count(lit(1i64)).alias(N)];
    for j in 0..values.len() {
        aggs.push(sum(ident(v(j))).alias(s(j)));
        aggs.push(count(ident(v(j))).alias(c(j)));
    }
    let groups: Vec<Expr> = (0..plans.len()).map(|i| ident(g(i))).collect();
    let batches = df.aggregate(groups, aggs)?.collect().await?;

    // 5. Read back into candidate keys.
    let group_columns: Vec<String> = limits.group_by.iter().map(|g| g.label.clone()).collect();
    let nvals = values.len();
    let mut observed: BTreeMap<Vec<String>, (i64, Vec<f64>, Vec<i64>)> = BTreeMap::new();
    let mut declared: Option<(Vec<usize>, usize)> = None;
    if !thresholded {
        let mut total: usize = 1;
        let mut strides = vec![0usize; plans.len()];
        for (i, p) in plans.iter().enumerate().rev() {
            strides[i] = total;
            if let Some(labels) = p.declared_labels() {
                total = total
                    .checked_mul(labels.len())
                    .filter(|t| *t <= MAX_CELLS)
                    .ok_or_else(|| {
                        invalid(format!("more than {MAX_CELLS} group cells requested"))
                    })?;
            }
        }
        declared = Some((strides, total));
    }
    let (mut counts, mut sums, mut nn) = match &declared {
        Some((_, total)) => (
            vec![0i64; *total],
            vec![vec![0f64; *total]; nvals],
            vec![vec![0i64; *total]; nvals],
        ),
        None => (Vec::new(), Vec::new(), Vec::new()),
    };
    for b in &batches {
        let ncol = b
            .column_by_name(N)
            .and_then(|a| a.as_primitive_opt::<Int64Type>());
        let Some(ncol) = ncol else {
            return Err(invalid("aggregation returned no row count".into()));
        };
        let scol: Vec<_> = (0..nvals)
            .map(|j| {
                b.column_by_name(&s(j))
                    .and_then(|a| a.as_primitive_opt::<Float64Type>())
            })
            .collect();
        let ccol: Vec<_> = (0..nvals)
            .map(|j| {
                b.column_by_name(&c(j))
                    .and_then(|a| a.as_primitive_opt::<Int64Type>())
            })
            .collect();
        let gcol: Vec<_> = (0..plans.len()).map(|i| b.column_by_name(&g(i))).collect();
        for r in 0..b.num_rows() {
            let n = ncol.value(r);
            let row_sums: Vec<f64> = scol
                .iter()
                .map(|a| a.filter(|a| a.is_valid(r)).map_or(0.0, |a| a.value(r)))
                .collect();
            let row_nn: Vec<i64> = ccol
                .iter()
                .map(|a| a.filter(|a| a.is_valid(r)).map_or(0, |a| a.value(r)))
                .collect();
            match &declared {
                Some((strides, _)) => {
                    let mut flat = 0usize;
                    let mut ok = true;
                    for (i, p) in plans.iter().enumerate() {
                        match gcol[i].and_then(|a| p.declared_index(a.as_ref(), r)) {
                            Some(k) => flat += k * strides[i],
                            None => ok = false,
                        }
                    }
                    if ok {
                        counts[flat] += n;
                        for j in 0..nvals {
                            sums[j][flat] += row_sums[j];
                            nn[j][flat] += row_nn[j];
                        }
                    }
                }
                None => {
                    let mut key = Vec::with_capacity(plans.len());
                    for (i, p) in plans.iter().enumerate() {
                        let Some(a) = gcol[i] else { break };
                        let label = match p.declared_labels() {
                            Some(labels) => p
                                .declared_index(a.as_ref(), r)
                                .and_then(|k| labels.get(k).cloned()),
                            None => label_at(a.as_ref(), r),
                        };
                        match label {
                            Some(l) => key.push(l),
                            None => break,
                        }
                    }
                    if key.len() == plans.len() {
                        let e = observed
                            .entry(key)
                            .or_insert_with(|| (0, vec![0.0; nvals], vec![0; nvals]));
                        e.0 += n;
                        for j in 0..nvals {
                            e.1[j] += row_sums[j];
                            e.2[j] += row_nn[j];
                        }
                    }
                }
            }
        }
    }
    let keys: Vec<Vec<String>> = match &declared {
        Some((_, total)) => {
            let mut keys = Vec::with_capacity(*total);
            let label_sets: Vec<&Vec<String>> =
                plans.iter().filter_map(KeyPlan::declared_labels).collect();
            for flat in 0..*total {
                let mut rem = flat;
                let mut key = Vec::with_capacity(label_sets.len());
                for (i, labels) in label_sets.iter().enumerate() {
                    let stride = declared.as_ref().map_or(1, |(s, _)| s[i]);
                    let k = rem / stride;
                    rem %= stride;
                    key.push(labels.get(k).cloned().unwrap_or_default());
                }
                keys.push(key);
            }
            keys
        }
        None => {
            if observed.len() > MAX_CELLS {
                return Err(invalid(format!("more than {MAX_CELLS} observed groups")));
            }
            sums = vec![Vec::with_capacity(observed.len()); nvals];
            nn = vec![Vec::with_capacity(observed.len()); nvals];
            let mut keys = Vec::with_capacity(observed.len());
            for (k, (n, s_, c_)) in observed {
                keys.push(k);
                counts.push(n);
                for j in 0..nvals {
                    sums[j].push(s_[j]);
                    nn[j].push(c_[j]);
                }
            }
            keys
        }
    };
    for (j, vc) in values.iter_mut().enumerate() {
        vc.sums = std::mem::take(&mut sums[j]);
        vc.counts = std::mem::take(&mut nn[j]);
    }
    Ok(Exact {
        group_columns,
        keys,
        thresholded,
        counts,
        values,
        aggregates: limits.aggregates.clone(),
    })
}

fn cols_ty(cols: &Columns<'_>, name: &str) -> Result<ColumnType, EngineError> {
    cols.types
        .get(name)
        .copied()
        .ok_or_else(|| EngineError::UnknownColumn {
            dataset: cols.dataset.to_string(),
            column: name.to_string(),
        })
}
