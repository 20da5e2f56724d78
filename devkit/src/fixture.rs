//! The one policy fixture of the node's tests and its benchmark: the GP practice sample
//! (`policies/samples/gp_practice.toml`), parsed, narrowed to the columns a test's data
//! holds; and the benchmark's synthetic `gp_patients` data, which the engine's timing
//! test writes too.
//!
//! The policy language's own tests (`policies/src/tests.rs`) start from the same sample
//! but edit its text (they locate errors by line), so they cannot use this module.

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{ArrayRef, BooleanArray, Float64Array, Int64Array, StringArray};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use phm_policies::model::{Grouping, PolicyFile, Source, SourceFormat};
use phm_policies::{AggregateLimits, GroupLimits, Limits, Spend};
use rand::{Rng, SeedableRng, rngs::StdRng};

/// The text of `policies/samples/gp_practice.toml`.
pub const GP_PRACTICE_SAMPLE: &str = include_str!("../../policies/samples/gp_practice.toml");

/// The GP practice sample, as written.
pub fn gp_practice() -> Result<PolicyFile, String> {
    toml::from_str(GP_PRACTICE_SAMPLE)
        .map_err(|e| format!("policies/samples/gp_practice.toml: {e}"))
}

/// The GP practice sample with its `gp_patients` dataset read from `path` (relative to
/// the folder the node is given) in `format`, declaring only `columns`, in that order.
/// The node refuses data that lacks a declared column, so a test declares exactly the
/// columns its generated data holds; naming a column the sample lacks is an error.
pub fn gp_patients(
    format: SourceFormat,
    path: &str,
    columns: &[&str],
) -> Result<PolicyFile, String> {
    let mut p = gp_practice()?;
    let ds = p
        .datasets
        .iter_mut()
        .find(|d| d.name == "gp_patients")
        .ok_or("the GP sample has no gp_patients dataset")?;
    ds.source = Source {
        format,
        path: path.to_string(),
    };
    ds.columns = columns
        .iter()
        .map(|name| {
            ds.columns
                .iter()
                .find(|c| c.name == *name)
                .cloned()
                .ok_or_else(|| format!("the GP sample has no gp_patients column `{name}`"))
        })
        .collect::<Result<_, _>>()?;
    // Without its NHS-number column the dataset cannot be linked (a policy naming a
    // missing link key is refused).
    if ds
        .link_key
        .as_ref()
        .is_some_and(|k| !columns.contains(&k.as_str()))
    {
        ds.link_key = None;
    }
    // The fixture is one node on its own: no registry, no linkage partners (a node
    // whose policy pins a registry key refuses to start without its identity files).
    p.peers = None;
    p.linkage = None;
    Ok(p)
}

/// [`gp_patients`] for the engine's tests and its benchmark, which test and time BMI
/// clamping: there BMI is an aggregated column only. The sample also groups by BMI
/// class, and the node checks at load that every value of a declared group key lies
/// within its bounds, while these fixtures write BMIs beyond the bounds (and NaN and
/// infinities) so that clamping has work to do.
pub fn engine_gp_patients(
    format: SourceFormat,
    path: &str,
    columns: &[&str],
) -> Result<PolicyFile, String> {
    let mut p = gp_patients(format, path, columns)?;
    for c in p.datasets.iter_mut().flat_map(|d| d.columns.iter_mut()) {
        if c.name == "bmi" {
            c.group = Grouping::No;
            c.bin_edges = None;
            c.min_bin_width = None;
        }
    }
    Ok(p)
}

/// Limits for running a query on the fixture's `gp_patients` without a decision (the
/// engine's tests and benchmark): the sample's release rules and dataset settings, with
/// `group_by`, `aggregates` and `epsilon`; no filter columns, no opt-out exclusion, no
/// ledger charges.
pub fn engine_limits(
    policy_version: &str,
    group_by: Vec<GroupLimits>,
    aggregates: Vec<AggregateLimits>,
    epsilon: f64,
) -> Result<Limits, String> {
    let p = gp_practice()?;
    let ds = p
        .datasets
        .into_iter()
        .find(|d| d.name == "gp_patients")
        .ok_or("the GP sample has no gp_patients dataset")?;
    Ok(Limits {
        policy_version: policy_version.to_string(),
        dataset: ds.name,
        person_id: ds.person_id,
        max_rows_per_person: ds.max_rows_per_person,
        total_kind: ds.total_kind,
        exclude_opted_out: None,
        group_by,
        aggregates,
        epsilon,
        mechanism: p.release.mechanism,
        delta: p.release.delta,
        spend: Spend::ZERO,
        min_reportable_count: p.release.min_reportable_count,
        rounding: p.release.rounding,
        scope: p.release.scope,
        charges: vec![],
        registered_population: None,
        link: None,
        secure: None,
    })
}

/// The columns [`write_bench_data`] writes.
pub const BENCH_COLUMNS: &[&str] = &[
    "person_id",
    "age",
    "sex",
    "imd_quintile",
    "bmi",
    "ndopt_out",
];

/// The benchmark's policy: [`engine_gp_patients`] over the Parquet `file` that
/// [`write_bench_data`] wrote.
pub fn bench_policy(file: &str) -> Result<PolicyFile, String> {
    engine_gp_patients(SourceFormat::Parquet, file, BENCH_COLUMNS)
}

/// Writes `rows` synthetic `gp_patients` rows (fixed seed, so every run writes the same
/// file) with [`BENCH_COLUMNS`]: age uniform on 0..100, sex F/M, IMD quintile 1..=5,
/// 3% opted out, BMI uniform on [15, `bmi_max`) with 5% NULL, so above 60 (the
/// benchmark's clamping bound) only when `bmi_max` > 60. One row per person unless
/// `repeat_every` > 0, which gives every such person a second row.
pub fn write_bench_data(
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
        Field::new("ndopt_out", DataType::Boolean, false),
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
