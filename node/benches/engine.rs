//! Benchmark of the DP query engine against the same query run exactly: on 1M and 10M
//! synthetic `gp_patients` rows (Parquet, fixed seed), the query
//! `SELECT imd_quintile, sex, COUNT(*), SUM(bmi), AVG(bmi) FROM gp_patients
//!  WHERE age >= 40 GROUP BY imd_quintile, sex`
//! as (a) `Engine::execute` (bounding, clamping, declared keys, OpenDP noise),
//! (b) `Engine::execute_exact` (same pipeline, no noise) and (c) plain DataFusion SQL.
//! At 1M rows it also runs a file where a third of BMI values lie above the clamping
//! bound (so clamping cannot be skipped) and one where 1% of people have two rows (so
//! the per-person bounding window must run). Run with
//! `cargo bench -p phm-node --profile bench-fast --features bench --bench engine`
//! (`execute_exact` exists only with the `bench` feature, so it is never in a
//! production build).
//!
//! The 1M-row file has no NaN, no infinity and no missing person id, and the engine
//! clamps every value onto its fixed-point lattice and sums it as Int64 whatever the
//! data, so these figures include that work.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use datafusion::arrow::array::{ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use phm_node::engine::Engine;
use phm_policies::model::{ColumnType, Mechanism, Rounding, Scope, TotalKind};
use phm_policies::{AggregateLimits, ColumnLimits, GroupDomain, GroupLimits, Limits, PolicyFile};
use phm_proto::{AggregateKind, CompareOp, Literal, Predicate, Purpose, QueryBody};
use rand::{Rng, SeedableRng, rngs::StdRng};

const SQL: &str = "SELECT imd_quintile, sex, COUNT(*), SUM(bmi), AVG(bmi) FROM gp_patients \
                   WHERE age >= 40 GROUP BY imd_quintile, sex";

/// Writes `rows` synthetic rows; `repeat_every` > 0 gives every such person a second row.
/// BMI is uniform on [15, `bmi_max`): above 60 (the clamping bound) only when
/// `bmi_max` > 60, which makes the engine clamp.
fn write_data(
    path: &Path,
    rows: usize,
    repeat_every: usize,
    bmi_max: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = StdRng::seed_from_u64(20_261_123);
    let schema = Arc::new(Schema::new(vec![
        Field::new("person_id", DataType::Utf8, false),
        Field::new("age", DataType::Int64, false),
        Field::new("sex", DataType::Utf8, false),
        Field::new("imd_quintile", DataType::Int64, false),
        Field::new("bmi", DataType::Float64, true),
        Field::new("opted_out", DataType::Boolean, false),
    ]));
    let mut w = ArrowWriter::try_new(std::fs::File::create(path)?, schema.clone(), None)?;
    let chunk = 1_000_000;
    let mut person = 0usize;
    let mut written = 0usize;
    while written < rows {
        let n = chunk.min(rows - written);
        let mut ids = Vec::with_capacity(n);
        let mut age = Vec::with_capacity(n);
        let mut sex = Vec::with_capacity(n);
        let mut imd = Vec::with_capacity(n);
        let mut bmi = Vec::with_capacity(n);
        let mut opt = Vec::with_capacity(n);
        while ids.len() < n {
            let copies = if repeat_every > 0 && person.is_multiple_of(repeat_every) {
                2
            } else {
                1
            };
            let a: i64 = rng.gen_range(0..100);
            let s = if rng.gen_bool(0.5) { "F" } else { "M" };
            let q: i64 = rng.gen_range(1..=5);
            let b: Option<f64> = if rng.gen_bool(0.95) {
                Some(rng.gen_range(15.0..bmi_max))
            } else {
                None
            };
            let o = rng.gen_bool(0.03);
            for _ in 0..copies {
                if ids.len() < n {
                    ids.push(format!("P{person:09}"));
                    age.push(a);
                    sex.push(s);
                    imd.push(q);
                    bmi.push(b);
                    opt.push(o);
                }
            }
            person += 1;
        }
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(ids)),
            Arc::new(Int64Array::from(age)),
            Arc::new(StringArray::from(sex)),
            Arc::new(Int64Array::from(imd)),
            Arc::new(Float64Array::from(bmi)),
            Arc::new(BooleanArray::from(opt)),
        ];
        w.write(&RecordBatch::try_new(schema.clone(), cols)?)?;
        written += n;
    }
    w.close()?;
    Ok(())
}

fn policy(file: &str) -> Result<PolicyFile, toml::de::Error> {
    toml::from_str(&format!(
        r#"
version = 1
[organisation]
ods_code = "A81001"
name = "Bench practice"
kind = "gp_practice"
[opt_out]
column = "opted_out"
[[datasets]]
name = "gp_patients"
person_id = "person_id"
max_rows_per_person = 1
source = {{ format = "parquet", path = "{file}" }}
[[datasets.columns]]
name = "person_id"
type = "text"
identifier = true
[[datasets.columns]]
name = "age"
type = "integer"
filter = true
bounds = [0, 110]
[[datasets.columns]]
name = "sex"
type = "text"
group = "declared"
domain = ["F", "M"]
[[datasets.columns]]
name = "imd_quintile"
type = "integer"
group = "declared"
domain = "1..5"
[[datasets.columns]]
name = "bmi"
type = "real"
aggregate = true
bounds = [10, 60]
"#
    ))
}

fn limits() -> Limits {
    let col = |name: &str, t, bounds| ColumnLimits {
        name: name.into(),
        column_type: t,
        bounds,
    };
    let bmi = || Some(col("bmi", ColumnType::Real, Some((10.0, 60.0))));
    Limits {
        policy_version: "bench".into(),
        dataset: "gp_patients".into(),
        person_id: "person_id".into(),
        max_rows_per_person: 1,
        total_kind: TotalKind::DistinctPeople,
        exclude_opted_out: None,
        group_by: vec![
            GroupLimits {
                column: col("imd_quintile", ColumnType::Integer, None),
                label: "imd_quintile".into(),
                domain: GroupDomain::Categories((1..=5).map(|i| i.to_string()).collect()),
            },
            GroupLimits {
                column: col("sex", ColumnType::Text, None),
                label: "sex".into(),
                domain: GroupDomain::Categories(vec!["F".into(), "M".into()]),
            },
        ],
        aggregates: vec![
            AggregateLimits {
                alias: "n".into(),
                kind: AggregateKind::Count,
                column: None,
            },
            AggregateLimits {
                alias: "sum_bmi".into(),
                kind: AggregateKind::Sum,
                column: bmi(),
            },
            AggregateLimits {
                alias: "mean_bmi".into(),
                kind: AggregateKind::Mean,
                column: bmi(),
            },
        ],
        filter_columns: vec![col("age", ColumnType::Integer, None)],
        epsilon: 1.0,
        mechanism: Mechanism::DiscreteLaplace,
        delta: 1e-9,
        spend: phm_policies::Spend::ZERO,
        min_reportable_count: 7.0,
        rounding: Rounding::Nearest5,
        scope: Scope::Standalone,
        charges: vec![],
        registered_population: None,
    }
}

fn query() -> QueryBody {
    QueryBody {
        federation_id: "ics-test".into(),
        query_id: "bench".into(),
        requester_id: "dsu".into(),
        purpose: Purpose::DirectCare,
        project_id: None,
        dataset: "gp_patients".into(),
        filter: Some(Predicate::Compare {
            column: "age".into(),
            op: CompareOp::Ge,
            value: Literal::Integer(40),
        }),
        group_by: vec![],
        aggregates: vec![],
        epsilon: 1.0,
        issued_at_unix_ms: 0,
        nonce: vec![0; 16],
    }
}

fn bench_engine(c: &mut Criterion) {
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => panic!("tokio runtime: {e}"),
    };
    let dir = match tempfile::tempdir() {
        Ok(d) => d,
        Err(e) => panic!("temp dir: {e}"),
    };
    let cases: [(&str, usize, usize, f64); 4] = [
        ("1M", 1_000_000, 0, 45.0),
        ("1M_clamping", 1_000_000, 0, 75.0),
        ("1M_bounding", 1_000_000, 100, 45.0),
        ("10M", 10_000_000, 0, 45.0),
    ];
    let (q, l) = (query(), limits());
    for (name, rows, repeat_every, bmi_max) in cases {
        let file = format!("gp_{name}.parquet");
        let path = dir.path().join(&file);
        let t = Instant::now();
        if let Err(e) = write_data(&path, rows, repeat_every, bmi_max) {
            panic!("writing {file}: {e}");
        }
        eprintln!("{name}: wrote {rows} rows in {:.1?}", t.elapsed());
        let t = Instant::now();
        let engine = match policy(&file) {
            Ok(p) => match rt.block_on(Engine::load(&p, dir.path())) {
                Ok(e) => e,
                Err(e) => panic!("load {file}: {e}"),
            },
            Err(e) => panic!("policy: {e}"),
        };
        eprintln!(
            "{name}: Engine::load (validation + registration) {:.1?}",
            t.elapsed()
        );
        let ctx = SessionContext::new();
        if let Err(e) = rt.block_on(ctx.register_parquet(
            "gp_patients",
            path.to_string_lossy().as_ref(),
            ParquetReadOptions::default(),
        )) {
            panic!("register: {e}");
        }

        let mut group = c.benchmark_group(format!("engine_{name}"));
        group.sample_size(10);
        group.measurement_time(Duration::from_secs(if rows > 1_000_000 { 30 } else { 8 }));
        group.bench_function("dp_execute", |b| {
            b.iter(|| match rt.block_on(engine.execute(&q, &l)) {
                Ok(r) => r,
                Err(e) => panic!("execute: {e}"),
            })
        });
        group.bench_function("execute_exact", |b| {
            b.iter(|| match rt.block_on(engine.execute_exact(&q, &l)) {
                Ok(r) => r,
                Err(e) => panic!("execute_exact: {e}"),
            })
        });
        if repeat_every == 0 {
            group.bench_function("datafusion_sql", |b| {
                b.iter(|| {
                    rt.block_on(async {
                        match ctx.sql(SQL).await {
                            Ok(df) => match df.collect().await {
                                Ok(batches) => batches,
                                Err(e) => panic!("collect: {e}"),
                            },
                            Err(e) => panic!("sql: {e}"),
                        }
                    })
                })
            });
        }
        group.finish();
    }
}

criterion_group!(benches, bench_engine);
criterion_main!(benches);
