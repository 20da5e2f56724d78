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
use phm_policies::model::{ColumnType, Grouping, PolicyFile, Source, SourceFormat};
use phm_policies::{AggregateLimits, ColumnLimits, GroupDomain, GroupLimits, Limits, Spend};
use phm_proto::{AggregateKind, CompareOp, Literal, Predicate, Purpose, QueryBody};
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
    ds.source = Source::file(format, path);
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

/// The benchmark's question as plain SQL, for DataFusion to run unbounded beside the
/// engine.
pub const BENCH_SQL: &str = "SELECT imd_quintile, sex, COUNT(*), SUM(bmi), AVG(bmi) \
                             FROM gp_patients WHERE age >= 40 GROUP BY imd_quintile, sex";

/// The benchmark's question: `SELECT imd_quintile, sex, COUNT(*), SUM(bmi), AVG(bmi)
/// FROM gp_patients WHERE age >= 40 GROUP BY imd_quintile, sex`, as the engine receives
/// it ([`bench_query`] and these limits, at most `m` rows per person, BMI within
/// [10, 60]).
pub fn bench_limits(m: u32) -> Result<Limits, String> {
    let col = |name: &str, t, bounds| ColumnLimits {
        name: name.into(),
        column_type: t,
        bounds,
        never_null: false,
    };
    let bmi = || Some(col("bmi", ColumnType::Real, Some((10.0, 60.0))));
    let mut l = engine_limits(
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
    )?;
    l.max_rows_per_person = m;
    Ok(l)
}

/// The query body of [`bench_limits`]' question (its filter, `age >= 40`).
pub fn bench_query() -> QueryBody {
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

/// One chunk of [`BENCH_COLUMNS`] rows being built.
#[derive(Default)]
struct BenchChunk {
    ids: Vec<String>,
    age: Vec<i64>,
    sex: Vec<&'static str>,
    imd: Vec<i64>,
    bmi: Vec<Option<f64>>,
    opt: Vec<bool>,
}

/// One person's fixed columns: age uniform on 0..100, sex F/M, IMD quintile 1..=5, 3%
/// opted out.
#[derive(Clone, Copy)]
struct BenchPerson {
    age: i64,
    sex: &'static str,
    imd: i64,
    opt_out: bool,
}

impl BenchPerson {
    fn draw(rng: &mut StdRng) -> BenchPerson {
        BenchPerson {
            age: rng.gen_range(0..100),
            sex: if rng.gen_bool(0.5) { "F" } else { "M" },
            imd: rng.gen_range(1..=5),
            opt_out: rng.gen_bool(0.03),
        }
    }
}

/// BMI uniform on [15, `max`), NULL 5% of the time.
fn draw_bmi(rng: &mut StdRng, max: f64) -> Option<f64> {
    rng.gen_bool(0.95).then(|| rng.gen_range(15.0..max))
}

impl BenchChunk {
    fn len(&self) -> usize {
        self.ids.len()
    }

    fn push(&mut self, person: usize, p: BenchPerson, bmi: Option<f64>) {
        self.ids.push(format!("P{person:09}"));
        self.age.push(p.age);
        self.sex.push(p.sex);
        self.imd.push(p.imd);
        self.bmi.push(bmi);
        self.opt.push(p.opt_out);
    }

    fn batch(self, schema: &Arc<Schema>) -> Result<RecordBatch, Box<dyn std::error::Error>> {
        let cols: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from(self.ids)),
            Arc::new(Int64Array::from(self.age)),
            Arc::new(StringArray::from(self.sex)),
            Arc::new(Int64Array::from(self.imd)),
            Arc::new(Float64Array::from(self.bmi)),
            Arc::new(BooleanArray::from(self.opt)),
        ];
        Ok(RecordBatch::try_new(schema.clone(), cols)?)
    }
}

/// Writes `rows` rows of [`BENCH_COLUMNS`] to `path` in chunks of a million, each chunk
/// filled by `fill` (which must stop at the chunk's length; a person cut off at a
/// chunk's end carries on in the next).
fn write_bench_file(
    path: &Path,
    rows: usize,
    mut fill: impl FnMut(&mut BenchChunk, usize),
) -> Result<(), Box<dyn std::error::Error>> {
    let schema = Arc::new(Schema::new(vec![
        Field::new("person_id", DataType::Utf8, false),
        Field::new("age", DataType::Int64, false),
        Field::new("sex", DataType::Utf8, false),
        Field::new("imd_quintile", DataType::Int64, false),
        Field::new("bmi", DataType::Float64, true),
        Field::new("ndopt_out", DataType::Boolean, false),
    ]));
    let mut w = ArrowWriter::try_new(std::fs::File::create(path)?, schema.clone(), None)?;
    let mut written = 0usize;
    while written < rows {
        let n = 1_000_000.min(rows - written);
        let mut chunk = BenchChunk::default();
        fill(&mut chunk, n);
        w.write(&chunk.batch(&schema)?)?;
        written += n;
    }
    w.close()?;
    Ok(())
}

/// Writes `rows` synthetic `gp_patients` rows (fixed seed, so every run writes the same
/// file) with [`BENCH_COLUMNS`]: age uniform on 0..100, sex F/M, IMD quintile 1..=5,
/// 3% opted out, BMI uniform on [15, `bmi_max`) with 5% NULL, so above 60 (the
/// benchmark's clamping bound) only when `bmi_max` > 60. One row per person unless
/// `repeat_every` > 0, which gives every such person a second, identical row.
pub fn write_bench_data(
    path: &Path,
    rows: usize,
    repeat_every: usize,
    bmi_max: f64,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = StdRng::seed_from_u64(20_261_123);
    let mut person = 0usize;
    write_bench_file(path, rows, |chunk, n| {
        while chunk.len() < n {
            let copies = if repeat_every > 0 && person.is_multiple_of(repeat_every) {
                2
            } else {
                1
            };
            // Drawn in the order the earlier figures' files were (age, sex, IMD, BMI,
            // opt-out), so the file is byte for byte the one BENCHMARKS.md measured.
            let (age, sex, imd) = (
                rng.gen_range(0..100),
                if rng.gen_bool(0.5) { "F" } else { "M" },
                rng.gen_range(1..=5),
            );
            let b = draw_bmi(&mut rng, bmi_max);
            let p = BenchPerson {
                age,
                sex,
                imd,
                opt_out: rng.gen_bool(0.03),
            };
            for _ in 0..copies {
                if chunk.len() < n {
                    chunk.push(person, p, b);
                }
            }
            person += 1;
        }
    })
}

/// Writes `rows` admissions-shaped rows with [`BENCH_COLUMNS`] (fixed seed): each person
/// has a geometric number of rows with mean 3 (P(k) = (1/3)(2/3)^(k−1), so about 13% of
/// people have more than 5), the person's age, sex, IMD quintile and opt-out flag on
/// every row, and a BMI drawn per row (a per-episode measurement, uniform on [15, 45),
/// 5% NULL). For the contribution-bounding benchmark at m = 5.
pub fn write_admissions_data(path: &Path, rows: usize) -> Result<(), Box<dyn std::error::Error>> {
    let mut rng = StdRng::seed_from_u64(20_261_203);
    let mut person = 0usize;
    // The person whose rows did not all fit in the last chunk, and how many are left.
    let mut carry: Option<(BenchPerson, usize)> = None;
    write_bench_file(path, rows, |chunk, n| {
        while chunk.len() < n {
            let (p, mut left) = match carry.take() {
                Some(c) => c,
                None => {
                    let mut k = 1;
                    while rng.gen_bool(2.0 / 3.0) {
                        k += 1;
                    }
                    person += 1;
                    (BenchPerson::draw(&mut rng), k)
                }
            };
            while left > 0 && chunk.len() < n {
                let b = draw_bmi(&mut rng, 45.0);
                chunk.push(person - 1, p, b);
                left -= 1;
            }
            if left > 0 {
                carry = Some((p, left));
            }
        }
    })
}
