//! The one SQL statement a warehouse runs for a query: the whole bounded, clamped
//! aggregation of `plan`, rendered as text whose only variable parts are the policy's
//! identifiers (quoted) and numbered placeholders. Every value a requester sent (filter
//! literals), and every value the policy declared (domains, bins, bounds, the per-person
//! row limit), is a typed bound parameter, so no input can change the statement's shape.
//!
//! The statement has three layers, so each step sees exactly what the DataFusion plan's
//! step sees:
//!
//! 1. **Rows**: opt-out (`flag IS FALSE`, so a missing flag counts as opted out), rows
//!    that name a person (not NULL; for text, not empty or white space as
//!    `str::trim` reads it), the requester's filter; carrying only the columns the
//!    query reads, and each row's rank within its person in a random order.
//! 2. **Bounding, keys and values**: at most `m` rows per person; each group key as the
//!    column (declared categories, thresholded keys) or its bin index; each aggregated
//!    value clamped onto the engine's lattice in steps, NULL staying NULL.
//! 3. **Cells**: rows outside the declared key domain dropped (after bounding, as the
//!    DataFusion plan drops them at read-back), then `count(*)`, the exact integer sum
//!    and the count of each value column per cell.
//!
//! NaN and ±∞ mean what `clamp` says they mean on every backend: NaN is read as NULL
//! everywhere; infinities clamp and fall in the end bins.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use chrono::NaiveDate;
use datafusion::scalar::ScalarValue;
use phm_policies::model::ColumnType;
use phm_policies::{GroupDomain, GroupLimits, Limits};
use phm_proto::{CompareOp, Literal, Predicate};

use super::super::EngineError;
use super::super::clamp::Lattice;
use super::super::filter::{self, Columns, compares_as_real};
use super::super::load::date_of_days;
use super::super::plan::{self, Spec};

/// What differs between SQL dialects. PostgreSQL is the only one today; Spark SQL is the
/// next (issue 17), which is why the few places a dialect decides are behind this trait.
pub(crate) trait Dialect: Send + Sync {
    /// An identifier, quoted so any declared name is read exactly as written.
    fn quote(&self, ident: &str) -> String;
    /// Placeholder number `n` (1-based) for a value of type `ty`.
    fn placeholder(&self, n: usize, ty: ParamType) -> String;
    /// The SQL type a column of policy type `ty` is read as.
    fn type_name(&self, ty: ParamType) -> &'static str;
    /// A random number per row, for the order bounding keeps rows in.
    fn random(&self) -> &'static str;
    /// `expr` compared byte-wise (as DataFusion compares Utf8), whatever the column's
    /// collation.
    fn bytewise(&self, expr: &str) -> String;
    /// True when the text `expr` is empty or only white space.
    fn blank(&self, expr: &str) -> String;
}

/// PostgreSQL (12 and later).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Postgres;

/// Unicode's White_Space characters, which `str::trim` (so `names_a_person`) strips,
/// as the escapes of a PostgreSQL `U&''` string.
const WHITE_SPACE: &str = "\\0009\\000A\\000B\\000C\\000D\\0020\\0085\\00A0\\1680\\2000\\2001\\2002\\2003\\2004\\2005\\2006\\2007\\2008\\2009\\200A\\2028\\2029\\202F\\205F\\3000";

impl Dialect for Postgres {
    fn quote(&self, ident: &str) -> String {
        format!("\"{}\"", ident.replace('"', "\"\""))
    }

    fn placeholder(&self, n: usize, ty: ParamType) -> String {
        // The cast fixes the parameter's type, so the server never infers it.
        format!("${n}::{}", self.type_name(ty))
    }

    fn type_name(&self, ty: ParamType) -> &'static str {
        match ty {
            ParamType::Int => "int8",
            ParamType::Real => "float8",
            ParamType::Text => "text",
            ParamType::Bool => "bool",
            ParamType::Date => "date",
        }
    }

    fn random(&self) -> &'static str {
        "random()"
    }

    fn bytewise(&self, expr: &str) -> String {
        format!("({expr} COLLATE \"C\")")
    }

    fn blank(&self, expr: &str) -> String {
        // btrim with a character set: one pass in C per row, cheaper than the
        // equivalent regular expression (BENCHMARKS.md, "Warehouse sources").
        format!("(btrim({expr}, U&'{WHITE_SPACE}') = '')")
    }
}

/// The type of a bound parameter (and of a column as the statement reads it).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ParamType {
    Int,
    Real,
    Text,
    Bool,
    Date,
}

impl ParamType {
    pub(crate) fn of(ty: ColumnType) -> ParamType {
        match ty {
            ColumnType::Integer => ParamType::Int,
            ColumnType::Real => ParamType::Real,
            ColumnType::Text => ParamType::Text,
            ColumnType::Boolean => ParamType::Bool,
            ColumnType::Date => ParamType::Date,
        }
    }
}

/// One bound parameter.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Param {
    Int(i64),
    Real(f64),
    Text(String),
    Bool(bool),
    Date(NaiveDate),
}

impl Param {
    pub(crate) fn ty(&self) -> ParamType {
        match self {
            Param::Int(_) => ParamType::Int,
            Param::Real(_) => ParamType::Real,
            Param::Text(_) => ParamType::Text,
            Param::Bool(_) => ParamType::Bool,
            Param::Date(_) => ParamType::Date,
        }
    }

    /// A typed value of the engine's filter conversion as a parameter.
    fn of_scalar(column: &str, v: ScalarValue) -> Result<Param, EngineError> {
        Ok(match v {
            ScalarValue::Int64(Some(i)) => Param::Int(i),
            ScalarValue::Float64(Some(r)) => Param::Real(r),
            ScalarValue::Utf8(Some(s)) => Param::Text(s),
            ScalarValue::Boolean(Some(b)) => Param::Bool(b),
            ScalarValue::Date32(Some(d)) => Param::Date(date_of_days(d).ok_or_else(|| {
                EngineError::InvalidLimits(format!(
                    "a date compared with `{column}` is out of range"
                ))
            })?),
            other => {
                return Err(EngineError::InvalidLimits(format!(
                    "a value compared with `{column}` has no SQL form ({other:?})"
                )));
            }
        })
    }

    /// A declared label (a category of the domain) as a value of the column's type.
    pub(crate) fn of_label(
        column: &str,
        ty: ColumnType,
        label: &str,
    ) -> Result<Param, EngineError> {
        filter::literal_value(column, ty, &Literal::Text(label.to_string()))
            .and_then(|v| Param::of_scalar(column, v))
    }
}

/// The parameters of a statement being rendered, numbered as they are bound.
#[derive(Debug, Default)]
pub(crate) struct Params {
    values: Vec<Param>,
}

impl Params {
    /// Binds `v`, returning its placeholder.
    pub(crate) fn bind(&mut self, d: &dyn Dialect, v: Param) -> String {
        let ty = v.ty();
        self.values.push(v);
        d.placeholder(self.values.len(), ty)
    }

    pub(crate) fn into_values(self) -> Vec<Param> {
        self.values
    }
}

/// How an output key column comes back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum KeyType {
    /// A bin index (int8).
    Bin,
    /// The column's value, of its policy type.
    Column(ColumnType),
}

/// A rendered statement: text, parameters, and what its rows hold.
#[derive(Debug)]
pub(crate) struct Statement {
    pub sql: String,
    pub params: Vec<Param>,
    pub keys: Vec<KeyType>,
    /// Value columns (each gives a sum in steps and a count).
    pub values: usize,
    /// Most rows a correct answer can have: the cells of the declared product, or for
    /// thresholded keys one more than a release may hold (so "too many" is seen).
    pub max_rows: usize,
    /// True when some key is thresholded (rows are observed keys).
    pub observed: bool,
}

/// The relation a dataset lives in, as a statement reads it.
pub(crate) struct Relation<'a> {
    pub dialect: &'a dyn Dialect,
    /// Already quoted (`"schema"."name"`).
    pub relation: &'a str,
    pub dataset: &'a str,
    pub columns: &'a std::collections::HashMap<String, ColumnType>,
    pub person_id: &'a str,
    pub person_type: ColumnType,
}

impl Relation<'_> {
    fn q(&self, ident: &str) -> String {
        self.dialect.quote(ident)
    }

    /// Column `name` as the statement reads it: cast to its policy type, with a real's
    /// NaN as NULL (NaN is missing everywhere).
    pub(crate) fn read(&self, name: &str, ty: ColumnType) -> String {
        let d = self.dialect;
        let cast = format!(
            "CAST({} AS {})",
            self.q(name),
            d.type_name(ParamType::of(ty))
        );
        match ty {
            ColumnType::Real => format!("NULLIF({cast}, CAST('NaN' AS float8))"),
            _ => cast,
        }
    }

    /// TRUE when the row names a person (the rule `names_a_person` applies), never NULL.
    pub(crate) fn has_person(&self) -> String {
        let id = self.q(self.person_id);
        match self.person_type {
            // A first character that is printable ASCII other than space names someone
            // whatever follows: a cheap test that settles almost every real id, so the
            // exact white-space test runs only for the rest (OR stops at the first
            // TRUE; the two together are exactly `names_a_person`).
            ColumnType::Text => format!(
                "({id} IS NOT NULL AND (ascii(CAST({id} AS text)) BETWEEN 33 AND 126 OR NOT {}))",
                self.dialect.blank(&format!("CAST({id} AS text)"))
            ),
            _ => format!("({id} IS NOT NULL)"),
        }
    }

    fn columns(&self) -> Columns<'_> {
        Columns {
            dataset: self.dataset,
            types: self.columns,
        }
    }

    /// The requester's filter, mirroring `filter::to_expr` clause by clause.
    fn predicate(&self, p: &Predicate, params: &mut Params) -> Result<String, EngineError> {
        let cols = self.columns();
        Ok(match p {
            Predicate::Compare { column, op, value } => {
                let (c, mut vals) = self.operand(&cols, column, &[value], params)?;
                let v = vals.pop().ok_or_else(|| {
                    EngineError::InvalidLimits(format!("comparison on `{column}` lost its value"))
                })?;
                let op = match op {
                    CompareOp::Eq => "=",
                    CompareOp::Ne => "<>",
                    CompareOp::Lt => "<",
                    CompareOp::Le => "<=",
                    CompareOp::Gt => ">",
                    CompareOp::Ge => ">=",
                };
                format!("({c} {op} {v})")
            }
            Predicate::InList {
                column,
                values,
                negated,
            } => {
                let refs: Vec<&Literal> = values.iter().collect();
                let (c, vals) = self.operand(&cols, column, &refs, params)?;
                if vals.is_empty() {
                    // x IN () is false for every row; NOT IN () is true for non-null x.
                    return Ok(if *negated {
                        format!("({c} IS NOT NULL)")
                    } else {
                        "FALSE".into()
                    });
                }
                let not = if *negated { "NOT " } else { "" };
                format!("({c} {not}IN ({}))", vals.join(", "))
            }
            Predicate::Between {
                column,
                low,
                high,
                negated,
            } => {
                let (c, vals) = self.operand(&cols, column, &[low, high], params)?;
                let [lo, hi] = vals.as_slice() else {
                    return Err(EngineError::InvalidLimits(format!(
                        "BETWEEN on `{column}` lost a bound"
                    )));
                };
                let not = if *negated { "NOT " } else { "" };
                format!("({c} {not}BETWEEN {lo} AND {hi})")
            }
            Predicate::IsNull { column, negated } => {
                let c = self.read(column, cols.ty(column)?);
                let not = if *negated { "NOT " } else { "" };
                format!("({c} IS {not}NULL)")
            }
            Predicate::All(ps) => self.joined(ps, " AND ", "TRUE", params)?,
            Predicate::Any(ps) => self.joined(ps, " OR ", "FALSE", params)?,
            Predicate::Not(p) => format!("(NOT {})", self.predicate(p, params)?),
        })
    }

    fn joined(
        &self,
        ps: &[Predicate],
        op: &str,
        empty: &str,
        params: &mut Params,
    ) -> Result<String, EngineError> {
        if ps.is_empty() {
            return Ok(empty.into());
        }
        let parts = ps
            .iter()
            .map(|p| self.predicate(p, params))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(format!("({})", parts.join(op)))
    }

    /// The column as a comparison reads it, and the placeholders of `values` converted
    /// to its type (an integer compared with a fractional real is compared as real).
    fn operand(
        &self,
        cols: &Columns<'_>,
        column: &str,
        values: &[&Literal],
        params: &mut Params,
    ) -> Result<(String, Vec<String>), EngineError> {
        let ty = cols.ty(column)?;
        let ty = if compares_as_real(ty, values) {
            ColumnType::Real
        } else {
            ty
        };
        let mut c = self.read(column, ty);
        if ty == ColumnType::Text {
            c = self.dialect.bytewise(&c);
        }
        let mut out = Vec::with_capacity(values.len());
        for v in values {
            let value = Param::of_scalar(column, filter::literal_value(column, ty, v)?)?;
            out.push(params.bind(self.dialect, value));
        }
        Ok((c, out))
    }
}

/// The rows a query reads: the opt-out flag `IS FALSE` (so a missing flag counts as
/// opted out), rows that name a person when `named` (what bounding partitions on), and
/// the requester's filter.
fn row_conditions(
    rel: &Relation<'_>,
    spec: &Spec,
    filter: Option<&Predicate>,
    named: bool,
    params: &mut Params,
) -> Result<Vec<String>, EngineError> {
    let mut wheres = Vec::new();
    if let Some(flag) = &spec.opt_out {
        wheres.push(format!("({} IS FALSE)", rel.q(flag)));
    }
    if named {
        wheres.push(rel.has_person());
    }
    if let Some(p) = filter {
        wheres.push(rel.predicate(p, params)?);
    }
    Ok(wheres)
}

/// Renders the statement for one query. `spec` is the plan `plan::Spec` checked (the
/// same checks, so a query the DataFusion path refuses is refused here too).
pub(crate) fn render(
    rel: &Relation<'_>,
    spec: &Spec,
    filter: Option<&Predicate>,
    limits: &Limits,
) -> Result<Statement, EngineError> {
    let d = rel.dialect;
    let mut params = Params::default();

    // Layer 1: the rows the query may read.
    let wheres = row_conditions(rel, spec, filter, true, &mut params)?;
    let mut carried: BTreeSet<&str> = BTreeSet::new();
    for g in &limits.group_by {
        carried.insert(&g.column.name);
    }
    for vc in spec.value_columns() {
        carried.insert(&vc.name);
    }
    let mut inner = String::from("SELECT ");
    for c in &carried {
        let _ = write!(inner, "{}, ", rel.q(c));
    }
    let person = rel.q(rel.person_id);
    let _ = write!(
        inner,
        "row_number() OVER (PARTITION BY {person} ORDER BY {}) AS phm_rn FROM {} WHERE {}",
        d.random(),
        rel.relation,
        wheres.join(" AND ")
    );

    // Layer 2: bounding, then keys and clamped values.
    let mut middle_select: Vec<String> = Vec::new();
    let mut outer_where: Vec<String> = Vec::new();
    let mut keys = Vec::with_capacity(limits.group_by.len());
    for (i, gl) in limits.group_by.iter().enumerate() {
        let alias = plan::g(i);
        let (expr, key) = key_expr(rel, gl, &mut params)?;
        middle_select.push(format!("{expr} AS {alias}"));
        // Rows outside the declared domain (and NULL keys) belong to no cell.
        outer_where.push(match (&gl.domain, key) {
            (GroupDomain::Categories(labels), KeyType::Column(ty)) => {
                let name = &gl.column.name;
                let placeholders = labels
                    .iter()
                    .map(|l| Param::of_label(name, ty, l).map(|p| params.bind(d, p)))
                    .collect::<Result<Vec<_>, _>>()?;
                format!("{alias} IN ({})", placeholders.join(", "))
            }
            _ => format!("{alias} IS NOT NULL"),
        });
        keys.push(key);
    }
    for (j, vc) in spec.value_columns().iter().enumerate() {
        middle_select.push(format!(
            "{} AS {}",
            clamp(rel, &vc.name, &vc.lattice, &mut params),
            value_alias(j)
        ));
    }
    if middle_select.is_empty() {
        middle_select.push("1 AS phm_one".into());
    }
    let m = params.bind(d, Param::Int(i64::from(limits.max_rows_per_person)));
    let middle = format!(
        "SELECT {} FROM ({inner}) AS phm_rows WHERE phm_rn <= {m}",
        middle_select.join(", ")
    );

    // Layer 3: the cells.
    let mut outer_select: Vec<String> = (0..keys.len()).map(plan::g).collect();
    outer_select.push(format!("count(*) AS {}", plan::N));
    for j in 0..spec.value_columns().len() {
        let v = value_alias(j);
        outer_select.push(format!("CAST(sum({v}) AS int8) AS {}", plan::s(j)));
        outer_select.push(format!("count({v}) AS {}", plan::c(j)));
    }
    let mut sql = format!(
        "SELECT {} FROM ({middle}) AS phm_bounded",
        outer_select.join(", ")
    );
    if !outer_where.is_empty() {
        let _ = write!(sql, " WHERE {}", outer_where.join(" AND "));
    }
    if !keys.is_empty() {
        let groups: Vec<String> = (0..keys.len()).map(plan::g).collect();
        let _ = write!(sql, " GROUP BY {}", groups.join(", "));
    }
    let observed = spec.thresholded;
    let max_rows = match spec.declared_cells() {
        Some(cells) if !observed => cells,
        _ => plan::MAX_CELLS + 1,
    };
    Ok(Statement {
        sql,
        params: params.into_values(),
        keys,
        values: spec.value_columns().len(),
        max_rows,
        observed,
    })
}

/// Most rows a cohort statement may return (one per row of the filtered relation): the
/// people of a linked question are held in the node, as they are for a file source.
pub(crate) const MAX_COHORT_ROWS: usize = 50_000_000;

/// The statement that reads a linked question's people (`cohort`): opt-out and the
/// filter as in [`render`], then each row's group keys (as `render` computes them,
/// before the domain restriction, which `cohort` applies as read-back does) and its
/// link key as text, aliased `link`. No bounding: a cohort is a set of people.
pub(crate) fn render_cohort(
    rel: &Relation<'_>,
    spec: &Spec,
    filter: Option<&Predicate>,
    limits: &Limits,
    link_key: &str,
    link: &str,
    with_keys: bool,
) -> Result<Statement, EngineError> {
    let d = rel.dialect;
    let cols = rel.columns();
    let mut params = Params::default();
    // No person rule: a cohort is the people whose link key is valid, which phm-link
    // decides, as for a file.
    let wheres = row_conditions(rel, spec, filter, false, &mut params)?;
    let mut select = Vec::new();
    let mut keys = Vec::new();
    if with_keys {
        for (i, gl) in limits.group_by.iter().enumerate() {
            let (expr, key) = key_expr(rel, gl, &mut params)?;
            select.push(format!("{expr} AS {}", plan::g(i)));
            keys.push(key);
        }
    }
    let _ = cols.ty(link_key)?;
    select.push(format!(
        "CAST({} AS text) AS {}",
        rel.q(link_key),
        d.quote(link)
    ));
    let mut sql = format!("SELECT {} FROM {}", select.join(", "), rel.relation);
    if !wheres.is_empty() {
        let _ = write!(sql, " WHERE {}", wheres.join(" AND "));
    }
    Ok(Statement {
        sql,
        params: params.into_values(),
        keys,
        values: 0,
        max_rows: MAX_COHORT_ROWS,
        observed: false,
    })
}

/// Group key `gl` as a statement computes it, before any domain restriction: the column
/// (declared categories, thresholded keys) or its bin index.
fn key_expr(
    rel: &Relation<'_>,
    gl: &GroupLimits,
    params: &mut Params,
) -> Result<(String, KeyType), EngineError> {
    let name = &gl.column.name;
    let ty = rel.columns().ty(name)?;
    Ok(match &gl.domain {
        GroupDomain::Bins { edges } => (bin_case(rel, name, edges, params), KeyType::Bin),
        GroupDomain::Categories(_) | GroupDomain::Thresholded => {
            (rel.read(name, ty), KeyType::Column(ty))
        }
    })
}

/// The bin index of column `name` among `edges` (see [`render`]).
fn bin_case(rel: &Relation<'_>, name: &str, edges: &[f64], params: &mut Params) -> String {
    let d = rel.dialect;
    let x = rel.read(name, ColumnType::Real);
    let mut case = format!("CASE WHEN {x} IS NULL THEN NULL");
    // Bin k is [edges[k], edges[k+1]); below the first edge is bin 0 and at or above the
    // last is the last bin, so only the inner edges decide.
    let inner_edges = edges.get(1..edges.len().saturating_sub(1)).unwrap_or(&[]);
    for (k, e) in inner_edges.iter().enumerate() {
        let e = params.bind(d, Param::Real(*e));
        let _ = write!(case, " WHEN {x} < {e} THEN {k}");
    }
    let _ = write!(case, " ELSE {} END", inner_edges.len());
    format!("CAST({case} AS int8)")
}

fn value_alias(j: usize) -> String {
    format!("phm_v{j}")
}

/// A value clamped onto `lattice` in whole steps, NULL (and NaN) staying NULL. Clamped
/// in value space first (the bounds are exact multiples of the step), then scaled by a
/// power of two (exact) and rounded to the nearest step, ties to even, as
/// `clamp::to_units` does; scaling first could overflow to an error for a huge value.
fn clamp(rel: &Relation<'_>, name: &str, lattice: &Lattice, params: &mut Params) -> String {
    let d = rel.dialect;
    let x = rel.read(name, ColumnType::Real);
    let lo = params.bind(d, Param::Real(lattice.value_of(lattice.lo_units)));
    let hi = params.bind(d, Param::Real(lattice.value_of(lattice.hi_units)));
    let inv = params.bind(d, Param::Real(lattice.inv_step));
    format!(
        "CASE WHEN {x} IS NULL THEN NULL ELSE CAST(round(LEAST(GREATEST({x}, {lo}), {hi}) * {inv}) AS int8) END"
    )
}
