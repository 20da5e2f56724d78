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
//! The policy and the data are the ones the engine's timing test uses too
//! (`phm_devkit::fixture`): the GP practice sample narrowed to the data's columns.
//!
//! The 1M-row file has no NaN, no infinity and no missing person id, and the engine
//! clamps every value onto its fixed-point lattice and sums it as Int64 whatever the
//! data, so these figures include that work.

use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use phm_devkit::fixture::{bench_policy, engine_limits, write_bench_data};
use phm_node::engine::Engine;
use phm_policies::model::ColumnType;
use phm_policies::{AggregateLimits, ColumnLimits, GroupDomain, GroupLimits, Limits};
use phm_proto::{AggregateKind, CompareOp, Literal, Predicate, Purpose, QueryBody};

const SQL: &str = "SELECT imd_quintile, sex, COUNT(*), SUM(bmi), AVG(bmi) FROM gp_patients \
                   WHERE age >= 40 GROUP BY imd_quintile, sex";

fn limits() -> Limits {
    let col = |name: &str, t, bounds| ColumnLimits {
        name: name.into(),
        column_type: t,
        bounds,
    };
    let bmi = || Some(col("bmi", ColumnType::Real, Some((10.0, 60.0))));
    match engine_limits(
        "bench",
        vec![
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
        vec![
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
        1.0,
    ) {
        Ok(l) => l,
        Err(e) => panic!("limits: {e}"),
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
        linkage: None,
        aggregation: Default::default(),
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
        if let Err(e) = write_bench_data(&path, rows, repeat_every, bmi_max) {
            panic!("writing {file}: {e}");
        }
        eprintln!("{name}: wrote {rows} rows in {:.1?}", t.elapsed());
        let t = Instant::now();
        let engine = match bench_policy(&file) {
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
