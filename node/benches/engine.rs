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
use phm_devkit::fixture::{BENCH_SQL, bench_limits, bench_policy, bench_query, write_bench_data};
use phm_node::engine::Engine;
use phm_policies::Limits;

fn limits() -> Limits {
    match bench_limits(1) {
        Ok(l) => l,
        Err(e) => panic!("limits: {e}"),
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
    let (q, l) = (bench_query(), limits());
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
                        match ctx.sql(BENCH_SQL).await {
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
