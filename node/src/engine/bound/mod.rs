//! Per-person contribution bounding: which of a person's rows one query keeps.
//!
//! A person may hold many rows (admissions, contacts, care packages); the noise assumes
//! each person moves a cell by at most m rows, so a query keeps at most m rows per
//! person. Which m: each query draws a fresh 128-bit key, ranks every row by its keyed
//! SipHash-2-4 over the row as the query sees it (person id, group keys, clamped values;
//! [`row_ranks`]), and keeps each person's m lowest ranks.
//! The selection is therefore a function of that person's own rows and the key alone:
//! adding, removing or reordering anyone else's rows, or reordering the file, cannot
//! change it, and over fresh keys each of a person's k rows is kept with probability
//! m/k (a uniform m-subset, like the `ORDER BY random()` window this replaces). Two rows
//! that tie are identical in every column the query reads, so which one is kept does not
//! change the answer.
//!
//! Three plans give the same rows for the same key ([`Plan`]); only their cost differs
//! (BENCHMARKS.md, "Contribution bounding"):
//! - [`Plan::Known`]: load counted rows per person and indexed the ids of the people
//!   over m ([`OverLimit`], [`PersonIndex`]); one operator ([`known`]) streams everyone
//!   else's rows through and keeps the m lowest ranks of theirs as rows arrive: one
//!   probe per row, no join, no sort. Valid only for the data load measured (plan.rs
//!   checks the file's fingerprint before and after the scan and falls back otherwise).
//! - [`Plan::Counted`]: the over-limit ids counted by this query (one extra group-by over
//!   the person column), everyone else's rows through an anti-join and theirs through
//!   the window: for data nobody measured.
//! - [`Plan::Window`]: the window over every row, ranked by the keyed hash.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

#[cfg(feature = "bench")]
use datafusion::arrow::array::RecordBatch;
use datafusion::arrow::array::{ArrayRef, UInt64Array};
use datafusion::arrow::datatypes::DataType;
use datafusion::common::hash_utils::create_hashes_with_hasher;
use datafusion::common::{DataFusionError, JoinType, Result as DfResult};
use datafusion::dataframe::DataFrame;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::functions_window::expr_fn::row_number;
use datafusion::logical_expr::{
    ColumnarValue, Expr, ExprFunctionExt, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    Volatility, ident,
};
use datafusion::prelude::{SessionContext, lit};
use rand::RngCore;
use siphasher::sip::SipHasher24;

mod known;
pub(crate) use known::PersonIndex;

/// The person id column inside the bounded plan.
pub(super) const PERSON: &str = "__phm_person";
const OVER: &str = "__phm_over";
const RANK: &str = "__phm_rank";
const ROWS: &str = "__phm_rows";

/// One query's key for ranking rows. Fresh for every query from the operating system's
/// generator; tests fix it to check that a selection depends on nothing else.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) struct RowKey(u64, u64);

impl RowKey {
    /// A key from the operating system's generator; fails only when that does.
    pub(crate) fn fresh() -> Result<RowKey, rand::Error> {
        let (mut k0, mut k1) = ([0u8; 8], [0u8; 8]);
        rand::rngs::OsRng.try_fill_bytes(&mut k0)?;
        rand::rngs::OsRng.try_fill_bytes(&mut k1)?;
        Ok(RowKey(u64::from_le_bytes(k0), u64::from_le_bytes(k1)))
    }

    #[cfg(test)]
    pub(crate) fn fixed(k0: u64, k1: u64) -> RowKey {
        RowKey(k0, k1)
    }
}

// Never printed: plans are logged at debug level and in EXPLAIN output.
impl std::fmt::Debug for RowKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RowKey(..)")
    }
}

impl BuildHasher for RowKey {
    type Hasher = SipHasher24;
    fn build_hasher(&self) -> SipHasher24 {
        SipHasher24::new_with_keys(self.0, self.1)
    }
}

/// `phm_row_rank(c1, …, cn)`: the keyed hash (UInt64) of each row's values.
#[derive(Debug, PartialEq, Eq, Hash)]
struct RowRank {
    key: RowKey,
    signature: Signature,
}

impl ScalarUDFImpl for RowRank {
    fn name(&self) -> &str {
        "phm_row_rank"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, _args: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::UInt64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let arrays: Vec<ArrayRef> = ColumnarValue::values_to_arrays(&args.args)?;
        let hashes = row_ranks(self.key, &arrays)?;
        Ok(ColumnarValue::Array(Arc::new(UInt64Array::from(hashes))))
    }
}

/// The keyed rank of each row of `columns` (all of one length): SipHash-2-4 under the
/// query's key over the row's values in one pass, each value written with a NULL flag
/// and, for text, its length first, so two different rows are two different inputs.
///
/// One hash per row rather than one per value combined: hashing each column on its own
/// and combining (DataFusion's `create_hashes_with_hasher`, 37·h₁ + h₂) made two
/// people's rows with the same values rank in nearly the same order, a bias the χ² test
/// caught (χ² = 3,742 against 44.8) until the combination was hashed again; one pass over
/// the whole row needs no second hash and costs a third of the seven finalisations.
pub(super) fn row_ranks(key: RowKey, columns: &[ArrayRef]) -> DfResult<Vec<u64>> {
    use datafusion::arrow::array::{Array, AsArray};
    use datafusion::arrow::datatypes::{
        Date32Type, Float64Type, Int32Type, Int64Type, UInt32Type, UInt64Type,
    };
    let n = columns.first().map_or(0, |c| c.len());
    let mut rows: Vec<SipHasher24> = (0..n).map(|_| key.build_hasher()).collect();
    for c in columns {
        // The NULL flag, then the value; `put` writes one valid value.
        fn each<A: Array + ?Sized>(
            c: &A,
            rows: &mut [SipHasher24],
            mut put: impl FnMut(&mut SipHasher24, usize),
        ) {
            for (i, h) in rows.iter_mut().enumerate() {
                if c.is_null(i) {
                    h.write_u8(0);
                } else {
                    h.write_u8(1);
                    put(h, i);
                }
            }
        }
        fn text(h: &mut SipHasher24, v: &str) {
            h.write_usize(v.len());
            h.write(v.as_bytes());
        }
        match c.data_type() {
            DataType::Utf8View => {
                let a = c.as_string_view();
                each(a, &mut rows, |h, i| text(h, a.value(i)));
            }
            DataType::Utf8 => {
                let a = c.as_string::<i32>();
                each(a, &mut rows, |h, i| text(h, a.value(i)));
            }
            DataType::LargeUtf8 => {
                let a = c.as_string::<i64>();
                each(a, &mut rows, |h, i| text(h, a.value(i)));
            }
            DataType::Int64 => {
                let a = c.as_primitive::<Int64Type>();
                each(a, &mut rows, |h, i| h.write_i64(a.value(i)));
            }
            DataType::Int32 => {
                let a = c.as_primitive::<Int32Type>();
                each(a, &mut rows, |h, i| h.write_i32(a.value(i)));
            }
            DataType::UInt64 => {
                let a = c.as_primitive::<UInt64Type>();
                each(a, &mut rows, |h, i| h.write_u64(a.value(i)));
            }
            DataType::UInt32 => {
                let a = c.as_primitive::<UInt32Type>();
                each(a, &mut rows, |h, i| h.write_u32(a.value(i)));
            }
            DataType::Float64 => {
                let a = c.as_primitive::<Float64Type>();
                each(a, &mut rows, |h, i| h.write_u64(a.value(i).to_bits()));
            }
            DataType::Date32 => {
                let a = c.as_primitive::<Date32Type>();
                each(a, &mut rows, |h, i| h.write_i32(a.value(i)));
            }
            DataType::Boolean => {
                let a = c.as_boolean();
                each(a, &mut rows, |h, i| h.write_u8(u8::from(a.value(i))));
            }
            // Any other type: its value's own keyed hash stands for it (equal values hash
            // alike, so identical rows still tie and different ones almost never do).
            _ => {
                let mut hashes = vec![0u64; n];
                create_hashes_with_hasher([c], &key, &mut hashes)?;
                for (h, v) in rows.iter_mut().zip(&hashes) {
                    h.write_u64(*v);
                }
            }
        }
    }
    Ok(rows.iter().map(Hasher::finish).collect())
}

fn rank(key: RowKey, columns: Vec<Expr>) -> Expr {
    ScalarUDF::from(RowRank {
        key,
        // Immutable: the same row under the same key always ranks the same (the key is
        // part of the function, so two queries' plans never share a rank).
        signature: Signature::variadic_any(Volatility::Immutable),
    })
    .call(columns)
}

/// The people with more than `m` rows, measured at load.
#[derive(Debug, Clone)]
pub(crate) struct OverLimit {
    pub m: u32,
    /// Their ids, indexed; `None` where nobody is over m or nothing was measured.
    pub index: Option<Arc<PersonIndex>>,
    pub people: usize,
}

/// How to find the people a query must bound.
#[derive(Debug, Clone, Copy)]
pub(super) enum Plan<'a> {
    Known(&'a OverLimit),
    Counted,
    /// [`Plan::Known`]'s split as two joins against load's list, the form the one-pass
    /// operator replaced, for the benchmark's comparison only.
    #[cfg(feature = "bench")]
    Joined(&'a OverLimit),
    #[cfg(any(test, feature = "bench"))]
    Window,
    /// The window ordered by `random()` that the keyed plans replaced, for the
    /// benchmark's comparison only.
    #[cfg(feature = "bench")]
    Random,
}

/// Load's index of the people over m. Fail closed: a list without its index must not
/// pass rows unbounded.
fn indexed(o: &OverLimit) -> DfResult<Arc<PersonIndex>> {
    o.index.clone().ok_or_else(|| {
        DataFusionError::Internal("the people over the limit were not indexed".into())
    })
}

/// Keep at most `m` rows per person of `df`, whose columns are `columns` (in order)
/// with the person id among them as [`PERSON`]; rows must already name a person.
pub(super) async fn keep(
    ctx: &SessionContext,
    df: DataFrame,
    columns: &[String],
    m: u32,
    key: RowKey,
    plan: Plan<'_>,
) -> DfResult<DataFrame> {
    let over = match plan {
        #[cfg(any(test, feature = "bench"))]
        Plan::Window => return window(df, columns, m, key),
        #[cfg(feature = "bench")]
        Plan::Random => {
            let order = datafusion::functions::math::expr_fn::random();
            return window_by(df, columns, m, order);
        }
        Plan::Known(o) => {
            if o.people == 0 {
                return Ok(df);
            }
            let index = indexed(o)?;
            let person = df
                .schema()
                .index_of_column_by_name(None, PERSON)
                .ok_or_else(|| {
                    DataFusionError::Internal("the bounded rows have no person id".into())
                })?;
            let input = df.create_physical_plan().await?;
            let table = known::table(input, person, index, m, key)?;
            return ctx.read_table(Arc::new(table));
        }
        #[cfg(feature = "bench")]
        Plan::Joined(o) => {
            ctx.read_batch(RecordBatch::try_from_iter([(OVER, indexed(o)?.ids())])?)?
        }
        Plan::Counted => df
            .clone()
            .aggregate(vec![ident(PERSON)], vec![count(lit(1i64)).alias(ROWS)])?
            .filter(ident(ROWS).gt(lit(i64::from(m))))?
            .select(vec![ident(PERSON).alias(OVER)])?,
    };
    let within = df
        .clone()
        .join(over.clone(), JoinType::LeftAnti, &[PERSON], &[OVER], None)?;
    let heavy = df.join(over, JoinType::LeftSemi, &[PERSON], &[OVER], None)?;
    within.union(window(heavy, columns, m, key)?)
}

/// The column name of [`OverLimit::ids`].
pub(crate) const PERSON_AT_LOAD: &str = "__phm_over_limit";

/// Keep each person's m rows of lowest keyed rank.
fn window(df: DataFrame, columns: &[String], m: u32, key: RowKey) -> DfResult<DataFrame> {
    let order = rank(key, columns.iter().map(ident).collect());
    window_by(df, columns, m, order)
}

/// Keep each person's first m rows in `order`, as `columns`.
fn window_by(df: DataFrame, columns: &[String], m: u32, order: Expr) -> DfResult<DataFrame> {
    let rn = row_number()
        .partition_by(vec![ident(PERSON)])
        .order_by(vec![order.sort(true, false)])
        .build()?
        .alias(RANK);
    df.window(vec![rn])?
        .filter(ident(RANK).lt_eq(lit(u64::from(m))))?
        .select(columns.iter().map(ident).collect::<Vec<Expr>>())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::load::over_limit;
    use datafusion::arrow::array::{AsArray, Int64Array, RecordBatch, StringArray};
    use datafusion::arrow::datatypes::{Field, Int64Type, Schema};
    use datafusion::common::TableReference;
    use rand::{Rng, SeedableRng, rngs::StdRng, seq::SliceRandom};
    use std::collections::BTreeMap;

    /// Rows (person, x) as a table `t`, and the rows each person keeps under `plan`.
    async fn kept(
        rows: &[(String, i64)],
        m: u32,
        key: RowKey,
        how: &str,
    ) -> BTreeMap<String, Vec<i64>> {
        let schema = Arc::new(Schema::new(vec![
            Field::new("p", DataType::Utf8, false),
            Field::new("x", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema,
            vec![
                Arc::new(StringArray::from_iter_values(
                    rows.iter().map(|r| r.0.as_str()),
                )),
                Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| r.1))),
            ],
        )
        .unwrap();
        // Three partitions, so a person's rows arrive through several streams.
        let n = batch.num_rows();
        let parts: Vec<Vec<RecordBatch>> = (0..3)
            .map(|i| vec![batch.slice(i * n / 3, (i + 1) * n / 3 - i * n / 3)])
            .collect();
        let ctx = SessionContext::new();
        let t = datafusion::catalog::MemTable::try_new(batch.schema(), parts).unwrap();
        ctx.register_table("t", Arc::new(t)).unwrap();
        let table = TableReference::bare("t");
        let known = over_limit(&ctx, &table, "p", m).await.unwrap();
        let plan = match how {
            "known" => Plan::Known(&known),
            "counted" => Plan::Counted,
            "window" => Plan::Window,
            other => panic!("{other}"),
        };
        let df = ctx
            .table(table)
            .await
            .unwrap()
            .select(vec![ident("p").alias(PERSON), ident("x")])
            .unwrap();
        let columns = vec![PERSON.to_string(), "x".to_string()];
        let out = keep(&ctx, df, &columns, m, key, plan)
            .await
            .unwrap()
            .collect()
            .await
            .unwrap();
        let mut by: BTreeMap<String, Vec<i64>> = BTreeMap::new();
        for b in &out {
            let p = datafusion::arrow::compute::cast(b.column(0), &DataType::Utf8).unwrap();
            let p = p.as_string::<i32>();
            let x = b.column(1).as_primitive::<Int64Type>();
            for i in 0..b.num_rows() {
                by.entry(p.value(i).to_string())
                    .or_default()
                    .push(x.value(i));
            }
        }
        for v in by.values_mut() {
            v.sort_unstable();
        }
        by
    }

    const PLANS: [&str; 3] = ["known", "counted", "window"];

    /// People with 1–12 rows of distinct values, in random order.
    fn people(rng: &mut StdRng, n: usize) -> Vec<(String, i64)> {
        let mut rows = Vec::new();
        for p in 0..n {
            let k = rng.gen_range(1..=12);
            for j in 0..k {
                rows.push((format!("p{p}"), 100 * p as i64 + j));
            }
        }
        rows.shuffle(rng);
        rows
    }

    #[tokio::test]
    async fn every_plan_keeps_the_same_rows_at_most_m_per_person_and_everyone_within_m_whole() {
        let mut rng = StdRng::seed_from_u64(1);
        for round in 0..5u64 {
            let rows = people(&mut rng, 200);
            let m = 1 + (round as u32 % 4);
            let key = RowKey::fixed(round, 7);
            let known = kept(&rows, m, key, "known").await;
            for how in ["counted", "window"] {
                assert_eq!(
                    kept(&rows, m, key, how).await,
                    known,
                    "{how} differs from known, m = {m}"
                );
            }
            let mut all: BTreeMap<String, Vec<i64>> = BTreeMap::new();
            for (p, x) in &rows {
                all.entry(p.clone()).or_default().push(*x);
            }
            assert_eq!(known.len(), all.len(), "a person lost every row");
            for (p, xs) in &all {
                let got = &known[p];
                assert!(got.len() <= m as usize, "{p} kept {} > {m}", got.len());
                assert_eq!(got.len(), xs.len().min(m as usize), "{p}");
                assert!(
                    got.iter().all(|x| xs.contains(x)),
                    "{p} kept a row it never had"
                );
            }
        }
    }

    /// A list of people over m without its index must stop the query, not pass their
    /// rows unbounded.
    #[tokio::test]
    async fn a_list_without_its_index_refuses_rather_than_passing_rows() {
        let ctx = SessionContext::new();
        let df = ctx.sql("SELECT 'p' AS __phm_person, 1 AS x").await.unwrap();
        let o = OverLimit {
            m: 1,
            index: None,
            people: 3,
        };
        let columns = vec![PERSON.to_string(), "x".to_string()];
        let err = keep(&ctx, df, &columns, 1, RowKey::fixed(1, 2), Plan::Known(&o))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("not indexed"), "{err}");
    }

    /// Identical rows rank alike; each still counts towards m on its own.
    #[tokio::test]
    async fn identical_rows_are_kept_at_most_m_times() {
        let mut rows: Vec<(String, i64)> = (0..10).map(|_| ("twin".to_string(), 5)).collect();
        rows.extend((0..4).map(|j| ("other".to_string(), j)));
        rows.extend([("twin".to_string(), 6), ("twin".to_string(), 6)]);
        for how in PLANS {
            for m in 1..=4u32 {
                let by = kept(&rows, m, RowKey::fixed(5, u64::from(m)), how).await;
                assert_eq!(by["twin"].len(), m as usize, "{how}, m = {m}");
                assert_eq!(by["other"].len(), m as usize, "{how}, m = {m}");
            }
        }
    }

    #[tokio::test]
    async fn a_persons_rows_are_chosen_by_their_own_rows_and_the_key_alone() {
        let mut rng = StdRng::seed_from_u64(2);
        let me: Vec<(String, i64)> = (0..10).map(|j| ("me".to_string(), 7 * j)).collect();
        let key = RowKey::fixed(11, 13);
        for how in PLANS {
            let mut first: Option<Vec<i64>> = None;
            for others in [0usize, 50, 300] {
                // Different neighbours each time, and the file in a different order.
                let mut rows = people(&mut rng, others);
                rows.extend(me.iter().cloned());
                rows.shuffle(&mut rng);
                let mine = kept(&rows, 3, key, how).await.remove("me").unwrap();
                assert_eq!(mine.len(), 3);
                match &first {
                    None => first = Some(mine),
                    Some(f) => assert_eq!(&mine, f, "{how}: {others} other people moved my rows"),
                }
            }
            // A new key is a new draw (with 120 subsets, the same one by chance at 1/120 for
            // one key; three keys all equal to the first would be 1 in 1.7 million).
            let mut moved = false;
            for k in 0..3 {
                let again = kept(&me, 3, RowKey::fixed(99, k), how)
                    .await
                    .remove("me")
                    .unwrap();
                moved |= Some(&again) != first.as_ref();
            }
            assert!(moved, "{how}: the key does not change the selection");
        }
    }

    /// One person's ten rows over 800 queries (keys), read in three partitions: each
    /// row must be kept in 3 of 10 queries; the same χ² bound as below (P = 1e-6).
    #[tokio::test]
    async fn over_many_queries_each_row_is_kept_with_probability_m_over_k() {
        let (q, k, m) = (800usize, 10usize, 3u32);
        let rows: Vec<(String, i64)> = (0..k).map(|j| ("me".to_string(), j as i64)).collect();
        let mut observed = vec![0f64; k];
        for query in 0..q {
            let mut by = kept(&rows, m, RowKey::fixed(7, query as u64), "known").await;
            let mine = by.remove("me").unwrap();
            assert_eq!(mine.len(), m as usize);
            for x in mine {
                observed[x as usize] += 1.0;
            }
        }
        let p = f64::from(m) / k as f64;
        let expected = q as f64 * p;
        let c = q as f64 * p * (1.0 - p) * k as f64 / (k as f64 - 1.0);
        let chi2: f64 = observed.iter().map(|o| (o - expected).powi(2) / c).sum();
        assert!(chi2 < 44.81, "χ² = {chi2:.1} for kept counts {observed:?}");
    }

    /// Over 4,000 people with the same ten distinct rows, one key: each row position must
    /// be kept with probability m/k = 0.3. The kept indicators of one person are a uniform
    /// 3-subset, so with c = Q·p(1−p)·k/(k−1), Σ(O−E)²/c is χ² with 9 degrees of freedom;
    /// P(χ²₉ > 44.81) = 1e-6. A plan that kept the first rows in file order gives ≈ 8,000.
    #[tokio::test]
    async fn every_row_is_kept_with_probability_m_over_k() {
        let (q, k, m) = (4_000usize, 10usize, 3u32);
        let mut rng = StdRng::seed_from_u64(3);
        let mut rows = Vec::with_capacity(q * k);
        for p in 0..q {
            for j in 0..k {
                rows.push((format!("person-{p}"), j as i64));
            }
        }
        rows.shuffle(&mut rng);
        for (n, how) in PLANS.iter().enumerate() {
            let by = kept(&rows, m, RowKey::fixed(2026, n as u64), how).await;
            assert_eq!(by.len(), q);
            let mut observed = vec![0f64; k];
            for xs in by.values() {
                assert_eq!(xs.len(), m as usize);
                for x in xs {
                    observed[*x as usize] += 1.0;
                }
            }
            let p = f64::from(m) / k as f64;
            let expected = q as f64 * p;
            let c = q as f64 * p * (1.0 - p) * k as f64 / (k as f64 - 1.0);
            let chi2: f64 = observed.iter().map(|o| (o - expected).powi(2) / c).sum();
            assert!(
                chi2 < 44.81,
                "{how}: χ² = {chi2:.1} for kept counts {observed:?}"
            );
        }
    }
}
