//! Engine tests: small Parquet/CSV fixtures written to a temp dir, loaded under a policy
//! and queried through `execute` / `execute_exact`. Statistical tests use tolerances of
//! 5.3 standard errors (two-sided failure probability about 1e-7).

use std::path::Path;
use std::sync::Arc;

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use phm_policies::model::{ColumnType, Mechanism, Rounding, Scope, SourceFormat, TotalKind};
use phm_policies::{AggregateLimits, ColumnLimits, GroupDomain, GroupLimits, Limits, PolicyFile};
use phm_proto::{AggregateKind, CompareOp, Literal, Predicate, Purpose, QueryBody};

use super::*;

const N_PEOPLE: usize = 200;

/// One fixture person. Person i: age (7i mod 100), sex F/M alternating, IMD quintile
/// 1..=4 (5 never occurs), bmi 15..64 (some above the bound 60), opted out when
/// i % 10 == 0, unknown opt-out when i % 10 == 5, region "North" except the last 3
/// ("Tiny"), diagnosis date 2023-01-01 + i days.
#[derive(Clone)]
struct Person {
    id: String,
    age: i64,
    sex: &'static str,
    imd: i64,
    bmi: Option<f64>,
    opted_out: Option<bool>,
    region: &'static str,
    diag_days: i32,
}

fn people() -> Vec<Person> {
    let base = super::load::parse_date("2023-01-01").unwrap_or(0);
    (0..N_PEOPLE)
        .map(|i| Person {
            id: format!("p{i}"),
            age: ((i * 7) % 100) as i64,
            sex: if i % 2 == 0 { "F" } else { "M" },
            imd: 1 + (i % 4) as i64,
            bmi: if i % 17 == 3 {
                None
            } else {
                Some(15.0 + (i % 50) as f64)
            },
            opted_out: match i % 10 {
                0 => Some(true),
                5 => None,
                _ => Some(false),
            },
            region: if i >= N_PEOPLE - 3 { "Tiny" } else { "North" },
            diag_days: base + i as i32,
        })
        .collect()
}

fn batch(ps: &[Person]) -> RecordBatch {
    let schema = Arc::new(Schema::new(vec![
        Field::new("person_id", DataType::Utf8, true),
        Field::new("age", DataType::Int32, true),
        Field::new("sex", DataType::Utf8, true),
        Field::new("imd_quintile", DataType::Int64, true),
        Field::new("bmi", DataType::Float64, true),
        Field::new("opted_out", DataType::Boolean, true),
        Field::new("region", DataType::Utf8, true),
        Field::new("diag_date", DataType::Date32, true),
    ]));
    let cols: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(
            ps.iter().map(|p| Some(p.id.clone())).collect::<Vec<_>>(),
        )),
        Arc::new(datafusion::arrow::array::Int32Array::from(
            ps.iter().map(|p| p.age as i32).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            ps.iter().map(|p| p.sex).collect::<Vec<_>>(),
        )),
        Arc::new(Int64Array::from(
            ps.iter().map(|p| p.imd).collect::<Vec<_>>(),
        )),
        Arc::new(Float64Array::from(
            ps.iter().map(|p| p.bmi).collect::<Vec<_>>(),
        )),
        Arc::new(BooleanArray::from(
            ps.iter().map(|p| p.opted_out).collect::<Vec<_>>(),
        )),
        Arc::new(StringArray::from(
            ps.iter().map(|p| p.region).collect::<Vec<_>>(),
        )),
        Arc::new(Date32Array::from(
            ps.iter().map(|p| p.diag_days).collect::<Vec<_>>(),
        )),
    ];
    RecordBatch::try_new(schema, cols).unwrap()
}

fn write_parquet(path: &Path, b: &RecordBatch) {
    let f = std::fs::File::create(path).unwrap();
    let mut w = ArrowWriter::try_new(f, b.schema(), None).unwrap();
    w.write(b).unwrap();
    w.close().unwrap();
}

fn write_csv(path: &Path, ps: &[Person]) {
    let mut s =
        String::from("person_id,age,sex,imd_quintile,bmi,opted_out,region,diag_date,extra\n");
    for p in ps {
        let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()
            + chrono::Duration::days(i64::from(p.diag_days));
        s.push_str(&format!(
            "{},{},{},{},{},{},{},{},x\n",
            p.id,
            p.age,
            p.sex,
            p.imd,
            p.bmi.map(|b| b.to_string()).unwrap_or_default(),
            p.opted_out.map(|b| b.to_string()).unwrap_or_default(),
            p.region,
            date.format("%Y-%m-%d"),
        ));
    }
    std::fs::write(path, s).unwrap();
}

fn policy_text(format: &str, path: &str, max_rows: u32) -> String {
    format!(
        r#"
version = 1
[organisation]
ods_code = "A81001"
name = "Riverside Medical Practice"
kind = "gp_practice"
[opt_out]
column = "opted_out"
[[datasets]]
name = "gp_patients"
person_id = "person_id"
max_rows_per_person = {max_rows}
source = {{ format = "{format}", path = "{path}" }}
[[datasets.columns]]
name = "person_id"
type = "text"
identifier = true
[[datasets.columns]]
name = "age"
type = "integer"
filter = true
group = "declared"
bounds = [0, 110]
bin_edges = [0, 18, 40, 65, 110]
[[datasets.columns]]
name = "sex"
type = "text"
filter = true
group = "declared"
domain = ["F", "M"]
[[datasets.columns]]
name = "imd_quintile"
type = "integer"
filter = true
group = "declared"
domain = "1..5"
[[datasets.columns]]
name = "bmi"
type = "real"
filter = true
aggregate = true
bounds = [10, 60]
[[datasets.columns]]
name = "region"
type = "text"
filter = true
group = "threshold"
[[datasets.columns]]
name = "diag_date"
type = "date"
filter = true
"#
    )
}

fn policy(format: &str, path: &str, max_rows: u32) -> PolicyFile {
    toml::from_str(&policy_text(format, path, max_rows)).unwrap()
}

/// A temp dir holding the standard fixture as Parquet, and the engine loaded on it.
async fn parquet_engine() -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    write_parquet(&dir.path().join("gp.parquet"), &batch(&people()));
    let engine = Engine::load(&policy("parquet", "gp.parquet", 1), dir.path())
        .await
        .unwrap();
    (dir, engine)
}

fn col(name: &str, ty: ColumnType, bounds: Option<(f64, f64)>) -> ColumnLimits {
    ColumnLimits {
        name: name.into(),
        column_type: ty,
        bounds,
    }
}

fn by_sex() -> GroupLimits {
    GroupLimits {
        column: col("sex", ColumnType::Text, None),
        label: "sex".into(),
        domain: GroupDomain::Categories(vec!["F".into(), "M".into()]),
    }
}

fn by_imd() -> GroupLimits {
    GroupLimits {
        column: col("imd_quintile", ColumnType::Integer, None),
        label: "imd_quintile".into(),
        domain: GroupDomain::Categories((1..=5).map(|i| i.to_string()).collect()),
    }
}

fn by_age_band() -> GroupLimits {
    GroupLimits {
        column: col("age", ColumnType::Integer, Some((0.0, 110.0))),
        label: "age".into(),
        domain: GroupDomain::Bins {
            edges: vec![0.0, 18.0, 40.0, 65.0, 110.0],
        },
    }
}

fn by_region() -> GroupLimits {
    GroupLimits {
        column: col("region", ColumnType::Text, None),
        label: "region".into(),
        domain: GroupDomain::Thresholded,
    }
}

fn count_agg() -> AggregateLimits {
    AggregateLimits {
        alias: "n".into(),
        kind: AggregateKind::Count,
        column: None,
    }
}

fn bmi_agg(alias: &str, kind: AggregateKind) -> AggregateLimits {
    AggregateLimits {
        alias: alias.into(),
        kind,
        column: Some(col("bmi", ColumnType::Real, Some((10.0, 60.0)))),
    }
}

fn limits(group_by: Vec<GroupLimits>, aggregates: Vec<AggregateLimits>, epsilon: f64) -> Limits {
    Limits {
        policy_version: "test".into(),
        dataset: "gp_patients".into(),
        source_format: SourceFormat::Parquet,
        source_path: "gp.parquet".into(),
        person_id: "person_id".into(),
        max_rows_per_person: 1,
        total_kind: TotalKind::DistinctPeople,
        exclude_opted_out: None,
        group_by,
        aggregates,
        filter_columns: vec![],
        epsilon,
        mechanism: Mechanism::DiscreteLaplace,
        delta: 1e-9,
        min_reportable_count: 7.0,
        rounding: Rounding::Nearest5,
        scope: Scope::Standalone,
        charges: vec![],
        registered_population: None,
    }
}

fn query(filter: Option<Predicate>) -> QueryBody {
    QueryBody {
        query_id: "q".into(),
        requester_id: "dsu".into(),
        purpose: Purpose::DirectCare,
        project_id: None,
        dataset: "gp_patients".into(),
        filter,
        group_by: vec![],
        aggregates: vec![],
        epsilon: 1.0,
        issued_at_unix_ms: 0,
        nonce: vec![0; 16],
    }
}

fn total_count(r: &Release) -> f64 {
    r.rows.iter().map(|row| row.cells[0].noisy_value).sum()
}

async fn exact_count(engine: &Engine, filter: Option<Predicate>) -> f64 {
    let l = limits(vec![], vec![count_agg()], 1.0);
    total_count(&engine.execute_exact(&query(filter), &l).await.unwrap())
}

fn cmp(column: &str, op: CompareOp, value: Literal) -> Predicate {
    Predicate::Compare {
        column: column.into(),
        op,
        value,
    }
}

// ---------------------------------------------------------------- load errors

#[tokio::test]
async fn load_refuses_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let err = Engine::load(&policy("parquet", "nope.parquet", 1), dir.path())
        .await
        .unwrap_err();
    assert!(matches!(err, DataError::Read { .. }), "{err}");
    assert!(err.to_string().contains("nope.parquet"), "{err}");
}

#[tokio::test]
async fn load_refuses_missing_column() {
    let dir = tempfile::tempdir().unwrap();
    let b = batch(&people());
    let idx = b.schema().index_of("bmi").unwrap();
    let b = b
        .project(
            &(0..b.num_columns())
                .filter(|i| *i != idx)
                .collect::<Vec<_>>(),
        )
        .unwrap();
    write_parquet(&dir.path().join("gp.parquet"), &b);
    let err = Engine::load(&policy("parquet", "gp.parquet", 1), dir.path())
        .await
        .unwrap_err();
    match &err {
        DataError::MissingColumn { column, file, .. } => {
            assert_eq!(column, "bmi");
            assert!(file.ends_with("gp.parquet"));
        }
        other => panic!("wrong error: {other}"),
    }
}

#[tokio::test]
async fn load_refuses_wrong_type() {
    let dir = tempfile::tempdir().unwrap();
    let b = batch(&people());
    let mut fields: Vec<Field> = b
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut cols = b.columns().to_vec();
    let idx = b.schema().index_of("bmi").unwrap();
    fields[idx] = Field::new("bmi", DataType::Utf8, true);
    cols[idx] = Arc::new(StringArray::from(vec!["x"; b.num_rows()]));
    let b = RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).unwrap();
    write_parquet(&dir.path().join("gp.parquet"), &b);
    let err = Engine::load(&policy("parquet", "gp.parquet", 1), dir.path())
        .await
        .unwrap_err();
    match &err {
        DataError::WrongType { column, found, .. } => {
            assert_eq!(column, "bmi");
            assert_eq!(found, "Utf8");
        }
        other => panic!("wrong error: {other}"),
    }
}

#[tokio::test]
async fn load_names_first_out_of_domain_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut ps = people();
    ps[2].imd = 7; // row 3
    ps[9].imd = 0; // row 10: not the first
    write_parquet(&dir.path().join("gp.parquet"), &batch(&ps));
    let err = Engine::load(&policy("parquet", "gp.parquet", 1), dir.path())
        .await
        .unwrap_err();
    match &err {
        DataError::BadValue {
            column,
            row,
            reason,
            ..
        } => {
            assert_eq!(column, "imd_quintile");
            assert_eq!(*row, 3);
            assert!(reason.contains("\"7\""), "{reason}");
        }
        other => panic!("wrong error: {other}"),
    }
    assert!(err.to_string().contains("row 3"), "{err}");
}

#[tokio::test]
async fn load_names_row_outside_group_bounds() {
    let dir = tempfile::tempdir().unwrap();
    let mut ps = people();
    ps[41].age = 130; // age is a declared group key with bounds [0, 110]
    write_parquet(&dir.path().join("gp.parquet"), &batch(&ps));
    let err = Engine::load(&policy("parquet", "gp.parquet", 1), dir.path())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DataError::BadValue { column, row: 42, .. } if column == "age"),
        "{err}"
    );
}

#[tokio::test]
async fn load_csv_names_unparseable_and_out_of_domain_rows() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gp.csv");
    write_csv(&path, &people());
    let text = std::fs::read_to_string(&path).unwrap();
    let mut lines: Vec<String> = text.lines().map(String::from).collect();
    // Data row 5 (line 6): age "forty".
    let mut fields: Vec<&str> = lines[5].split(',').collect();
    fields[1] = "forty";
    lines[5] = fields.join(",");
    std::fs::write(&path, lines.join("\n") + "\n").unwrap();
    let err = Engine::load(&policy("csv", "gp.csv", 1), dir.path())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DataError::BadValue { column, row: 5, .. } if column == "age"),
        "{err}"
    );

    let mut ps = people();
    ps[11].sex = "X";
    write_csv(&path, &ps);
    let err = Engine::load(&policy("csv", "gp.csv", 1), dir.path())
        .await
        .unwrap_err();
    assert!(
        matches!(&err, DataError::BadValue { column, row: 12, .. } if column == "sex"),
        "{err}"
    );
}

#[tokio::test]
async fn csv_and_parquet_give_the_same_exact_answer() {
    let (_d, pq) = parquet_engine().await;
    let dir = tempfile::tempdir().unwrap();
    write_csv(&dir.path().join("gp.csv"), &people());
    let csv = Engine::load(&policy("csv", "gp.csv", 1), dir.path())
        .await
        .unwrap();
    let l = limits(
        vec![by_imd(), by_sex()],
        vec![
            count_agg(),
            bmi_agg("s", AggregateKind::Sum),
            bmi_agg("m", AggregateKind::Mean),
        ],
        1.0,
    );
    let f = Some(cmp(
        "diag_date",
        CompareOp::Ge,
        Literal::Text("2023-03-01".into()),
    ));
    let a = pq.execute_exact(&query(f.clone()), &l).await.unwrap();
    let b = csv.execute_exact(&query(f), &l).await.unwrap();
    assert_eq!(a, b);
}

// ---------------------------------------------------------------- semantics

#[tokio::test]
async fn opted_out_and_unknown_opt_out_rows_are_excluded() {
    let (_d, engine) = parquet_engine().await;
    let mut l = limits(vec![], vec![count_agg()], 1.0);
    l.exclude_opted_out = Some("opted_out".into());
    let r = engine.execute_exact(&query(None), &l).await.unwrap();
    let expected = people()
        .iter()
        .filter(|p| p.opted_out == Some(false))
        .count();
    assert_eq!(total_count(&r), expected as f64);
    assert_eq!(expected, 160);
}

#[tokio::test]
async fn every_predicate_form_matches_a_reference() {
    let (_d, engine) = parquet_engine().await;
    let ps = people();
    let n = |f: &dyn Fn(&Person) -> bool| ps.iter().filter(|p| f(p)).count() as f64;
    let d = |s: &str| super::load::parse_date(s).unwrap();
    let cases: Vec<(Predicate, f64)> = vec![
        (
            cmp("age", CompareOp::Eq, Literal::Integer(14)),
            n(&|p| p.age == 14),
        ),
        (
            cmp("age", CompareOp::Ne, Literal::Integer(14)),
            n(&|p| p.age != 14),
        ),
        (
            cmp("age", CompareOp::Lt, Literal::Integer(40)),
            n(&|p| p.age < 40),
        ),
        (
            cmp("age", CompareOp::Le, Literal::Integer(40)),
            n(&|p| p.age <= 40),
        ),
        (
            cmp("age", CompareOp::Gt, Literal::Integer(40)),
            n(&|p| p.age > 40),
        ),
        (
            cmp("age", CompareOp::Ge, Literal::Integer(40)),
            n(&|p| p.age >= 40),
        ),
        (
            cmp("age", CompareOp::Lt, Literal::Real(40.5)),
            n(&|p| (p.age as f64) < 40.5),
        ),
        (
            cmp("age", CompareOp::Ge, Literal::Text("40".into())),
            n(&|p| p.age >= 40),
        ),
        (
            cmp("bmi", CompareOp::Gt, Literal::Integer(30)),
            n(&|p| p.bmi.is_some_and(|b| b > 30.0)),
        ),
        (
            cmp("sex", CompareOp::Eq, Literal::Text("F".into())),
            n(&|p| p.sex == "F"),
        ),
        (
            cmp(
                "diag_date",
                CompareOp::Lt,
                Literal::Text("2023-02-01".into()),
            ),
            n(&|p| p.diag_days < d("2023-02-01")),
        ),
        (
            Predicate::InList {
                column: "imd_quintile".into(),
                values: vec![Literal::Integer(1), Literal::Integer(3)],
                negated: false,
            },
            n(&|p| p.imd == 1 || p.imd == 3),
        ),
        (
            Predicate::InList {
                column: "imd_quintile".into(),
                values: vec![Literal::Integer(1), Literal::Integer(3)],
                negated: true,
            },
            n(&|p| p.imd != 1 && p.imd != 3),
        ),
        (
            Predicate::Between {
                column: "age".into(),
                low: Literal::Integer(20),
                high: Literal::Integer(30),
                negated: false,
            },
            n(&|p| (20..=30).contains(&p.age)),
        ),
        (
            Predicate::Between {
                column: "age".into(),
                low: Literal::Integer(20),
                high: Literal::Integer(30),
                negated: true,
            },
            n(&|p| !(20..=30).contains(&p.age)),
        ),
        (
            Predicate::IsNull {
                column: "bmi".into(),
                negated: false,
            },
            n(&|p| p.bmi.is_none()),
        ),
        (
            Predicate::IsNull {
                column: "bmi".into(),
                negated: true,
            },
            n(&|p| p.bmi.is_some()),
        ),
        (
            Predicate::All(vec![
                cmp("sex", CompareOp::Eq, Literal::Text("M".into())),
                cmp("age", CompareOp::Ge, Literal::Integer(50)),
            ]),
            n(&|p| p.sex == "M" && p.age >= 50),
        ),
        (
            Predicate::Any(vec![
                cmp("sex", CompareOp::Eq, Literal::Text("M".into())),
                cmp("age", CompareOp::Ge, Literal::Integer(50)),
            ]),
            n(&|p| p.sex == "M" || p.age >= 50),
        ),
        (
            Predicate::Not(Box::new(cmp(
                "region",
                CompareOp::Eq,
                Literal::Text("Tiny".into()),
            ))),
            n(&|p| p.region != "Tiny"),
        ),
        (Predicate::All(vec![]), N_PEOPLE as f64),
        (Predicate::Any(vec![]), 0.0),
    ];
    for (p, expected) in cases {
        let got = exact_count(&engine, Some(p.clone())).await;
        assert_eq!(got, expected, "filter {p}");
    }
}

#[tokio::test]
async fn unconvertible_literal_names_column_and_value() {
    let (_d, engine) = parquet_engine().await;
    let l = limits(vec![], vec![count_agg()], 1.0);
    for (p, column) in [
        (
            cmp(
                "diag_date",
                CompareOp::Lt,
                Literal::Text("01/02/2023".into()),
            ),
            "diag_date",
        ),
        (
            cmp("age", CompareOp::Lt, Literal::Text("old".into())),
            "age",
        ),
        (cmp("sex", CompareOp::Eq, Literal::Boolean(true)), "sex"),
    ] {
        let err = engine.execute_exact(&query(Some(p)), &l).await.unwrap_err();
        match &err {
            EngineError::BadLiteral { column: c, .. } => assert_eq!(c, column),
            other => panic!("wrong error: {other}"),
        }
    }
    let err = engine
        .execute_exact(
            &query(Some(cmp("nhs_number", CompareOp::Eq, Literal::Integer(1)))),
            &l,
        )
        .await
        .unwrap_err();
    assert!(matches!(err, EngineError::UnknownColumn { .. }), "{err}");
}

#[tokio::test]
async fn text_literals_cannot_inject() {
    let (_d, engine) = parquet_engine().await;
    let evil = "F' OR '1'='1";
    let got = exact_count(
        &engine,
        Some(cmp("sex", CompareOp::Eq, Literal::Text(evil.into()))),
    )
    .await;
    assert_eq!(got, 0.0);
}

/// A person with 100 rows among 50 single-row people.
async fn heavy_engine(max_rows: u32) -> (tempfile::TempDir, Engine) {
    let dir = tempfile::tempdir().unwrap();
    let mut ps: Vec<Person> = people().into_iter().take(50).collect();
    let heavy = Person {
        id: "heavy".into(),
        ..ps[1].clone()
    };
    ps.extend(std::iter::repeat_n(heavy, 100));
    write_parquet(&dir.path().join("gp.parquet"), &batch(&ps));
    let engine = Engine::load(&policy("parquet", "gp.parquet", max_rows), dir.path())
        .await
        .unwrap();
    (dir, engine)
}

#[tokio::test]
async fn a_person_contributes_at_most_max_rows() {
    let (_d, engine) = heavy_engine(3).await;
    let heavy_bmi = people()[1].bmi.unwrap();
    for m in [1u32, 3, 7] {
        let mut l = limits(
            vec![],
            vec![count_agg(), bmi_agg("s", AggregateKind::Sum)],
            1.0,
        );
        l.max_rows_per_person = m;
        let only_heavy = Some(cmp(
            "person_id",
            CompareOp::Eq,
            Literal::Text("heavy".into()),
        ));
        let r = engine.execute_exact(&query(only_heavy), &l).await.unwrap();
        assert_eq!(r.rows[0].cells[0].noisy_value, f64::from(m), "m = {m}");
        assert_eq!(r.rows[0].cells[1].noisy_value, f64::from(m) * heavy_bmi);
        let all = engine.execute_exact(&query(None), &l).await.unwrap();
        assert_eq!(all.rows[0].cells[0].noisy_value, 50.0 + f64::from(m));
    }
    // With a bound above every person's rows nothing is dropped.
    let mut l = limits(vec![], vec![count_agg()], 1.0);
    l.max_rows_per_person = 100;
    let r = engine.execute_exact(&query(None), &l).await.unwrap();
    assert_eq!(r.rows[0].cells[0].noisy_value, 150.0);
}

#[tokio::test]
async fn values_are_clamped_to_declared_bounds() {
    let (_d, engine) = parquet_engine().await;
    let l = limits(
        vec![],
        vec![
            bmi_agg("s", AggregateKind::Sum),
            bmi_agg("m", AggregateKind::Mean),
        ],
        1.0,
    );
    let r = engine.execute_exact(&query(None), &l).await.unwrap();
    let vals: Vec<f64> = people()
        .iter()
        .filter_map(|p| p.bmi)
        .map(|b| b.clamp(10.0, 60.0))
        .collect();
    let expected: f64 = vals.iter().sum();
    assert!(people().iter().any(|p| p.bmi.is_some_and(|b| b > 60.0)));
    assert!((r.rows[0].cells[0].noisy_value - expected).abs() < 1e-9);
    let mean = r.rows[0].cells[1].noisy_value;
    assert!((mean - expected / vals.len() as f64).abs() < 1e-9);
    assert_eq!(
        r.rows[0].cells[1].mean.as_ref().unwrap().noisy_count,
        vals.len() as f64
    );
}

/// Group keys are mapped to the declared domain after aggregation, and the domain was
/// validated at load: a file replaced under the running node with values outside the
/// domain must put them in no key, and its out-of-bounds values must still be clamped.
#[tokio::test]
async fn a_file_replaced_after_load_is_still_clamped_and_kept_to_declared_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gp.parquet");
    let original = people();
    write_parquet(&path, &batch(&original));
    let engine = Engine::load(&policy("parquet", "gp.parquet", 1), dir.path())
        .await
        .unwrap();
    let l = limits(
        vec![by_sex()],
        vec![count_agg(), bmi_agg("s", AggregateKind::Sum)],
        1.0,
    );
    let exact = |ps: &[Person], sex: &str| -> (f64, f64) {
        let rows: Vec<&Person> = ps.iter().filter(|p| p.sex == sex).collect();
        let sum = rows
            .iter()
            .filter_map(|p| p.bmi)
            .map(|b| b.clamp(10.0, 60.0))
            .sum();
        (rows.len() as f64, sum)
    };
    let before = engine.execute_exact(&query(None), &l).await.unwrap();
    for (row, sex) in before.rows.iter().zip(["F", "M"]) {
        assert_eq!(row.key, vec![sex.to_string()]);
        let (n, sum) = exact(&original, sex);
        assert_eq!(row.cells[0].noisy_value, n);
        assert!((row.cells[1].noisy_value - sum).abs() < 1e-9);
    }

    // Replaced under the running node: one huge and one negative BMI, and rows of a sex
    // outside the declared domain.
    let mut replaced = original.clone();
    replaced[2].bmi = Some(500.0);
    replaced[3].bmi = Some(-5.0);
    for i in 0..5 {
        replaced.push(Person {
            id: format!("x{i}"),
            sex: "X",
            ..original[1].clone()
        });
    }
    write_parquet(&path, &batch(&replaced));
    let after = engine.execute_exact(&query(None), &l).await.unwrap();
    assert_eq!(after.rows.len(), 2, "only the declared keys F and M");
    for (row, sex) in after.rows.iter().zip(["F", "M"]) {
        assert_eq!(row.key, vec![sex.to_string()]);
        let (n, sum) = exact(&replaced, sex);
        assert_eq!(
            row.cells[0].noisy_value, n,
            "{sex}: X rows must count nowhere"
        );
        assert!(
            (row.cells[1].noisy_value - sum).abs() < 1e-9,
            "{sex}: BMI 500 and -5 must be clamped to 60 and 10: got {}, expected {sum}",
            row.cells[1].noisy_value
        );
    }
}

#[tokio::test]
async fn every_declared_key_is_released_with_zeros_in_domain_order() {
    let (_d, engine) = parquet_engine().await;
    let l = limits(vec![by_imd(), by_sex()], vec![count_agg()], 1.0);
    let r = engine.execute_exact(&query(None), &l).await.unwrap();
    assert_eq!(r.group_columns, vec!["imd_quintile", "sex"]);
    let keys: Vec<Vec<String>> = r.rows.iter().map(|row| row.key.clone()).collect();
    let mut expected_keys = Vec::new();
    for q in 1..=5 {
        for s in ["F", "M"] {
            expected_keys.push(vec![q.to_string(), s.to_string()]);
        }
    }
    assert_eq!(keys, expected_keys);
    for row in &r.rows {
        let q: i64 = row.key[0].parse().unwrap();
        let expected = people()
            .iter()
            .filter(|p| p.imd == q && p.sex == row.key[1])
            .count() as f64;
        assert_eq!(row.cells[0].noisy_value, expected, "{:?}", row.key);
    }
    assert_eq!(r.rows[8].cells[0].noisy_value, 0.0);

    // The private release has the same keys, zeros included.
    let private = engine.execute(&query(None), &l).await.unwrap();
    let pkeys: Vec<Vec<String>> = private.rows.iter().map(|row| row.key.clone()).collect();
    assert_eq!(pkeys, expected_keys);
}

#[tokio::test]
async fn numeric_bins_label_by_lower_edge_and_clamp() {
    let (_d, engine) = parquet_engine().await;
    let mut band = by_age_band();
    // Narrower edges than the data: ages below 18 and at or above 65 clamp.
    band.domain = GroupDomain::Bins {
        edges: vec![18.0, 40.0, 65.0],
    };
    let r = engine
        .execute_exact(&query(None), &limits(vec![band], vec![count_agg()], 1.0))
        .await
        .unwrap();
    let keys: Vec<&str> = r.rows.iter().map(|row| row.key[0].as_str()).collect();
    assert_eq!(keys, vec!["18", "40"]);
    let ps = people();
    assert_eq!(
        r.rows[0].cells[0].noisy_value,
        ps.iter().filter(|p| p.age < 40).count() as f64
    );
    assert_eq!(
        r.rows[1].cells[0].noisy_value,
        ps.iter().filter(|p| p.age >= 40).count() as f64
    );
}

#[tokio::test]
async fn thresholded_keys_drop_small_groups() {
    let (_d, engine) = parquet_engine().await;
    let l = limits(vec![by_region()], vec![count_agg()], 1.0);
    let exact = engine.execute_exact(&query(None), &l).await.unwrap();
    let keys: Vec<&str> = exact.rows.iter().map(|r| r.key[0].as_str()).collect();
    assert_eq!(keys, vec!["North", "Tiny"]);
    // Threshold at epsilon 0.5 / delta 1e-9 is about 42: "Tiny" (3 people) passes with
    // probability about e^-19, "North" (197) fails with probability below e^-70.
    let private = engine.execute(&query(None), &l).await.unwrap();
    let keys: Vec<&str> = private.rows.iter().map(|r| r.key[0].as_str()).collect();
    assert_eq!(keys, vec!["North"]);
    assert!(private.epsilon_spent <= 1.0 + 1e-12);
    assert!(private.epsilon_spent > 0.99);
}

// ---------------------------------------------------------------- privacy accounting

#[tokio::test]
async fn epsilon_spent_never_exceeds_the_query_epsilon() {
    let (_d, engine) = parquet_engine().await;
    let aggs = vec![
        count_agg(),
        bmi_agg("s", AggregateKind::Sum),
        bmi_agg("m", AggregateKind::Mean),
    ];
    for mechanism in [Mechanism::DiscreteLaplace, Mechanism::DiscreteGaussian] {
        for eps in [0.01, 0.3, 1.0, 7.0] {
            for groups in [vec![by_imd(), by_sex()], vec![by_region()], vec![]] {
                let mut l = limits(groups, aggs.clone(), eps);
                l.mechanism = mechanism;
                l.max_rows_per_person = 2;
                let r = engine.execute(&query(None), &l).await.unwrap();
                assert!(
                    r.epsilon_spent <= eps + 1e-12,
                    "{mechanism:?} {eps}: {}",
                    r.epsilon_spent
                );
                // Calibration spends (almost) the whole budget, not a fraction of it.
                assert!(
                    r.epsilon_spent >= eps * 0.99,
                    "{mechanism:?} {eps}: {}",
                    r.epsilon_spent
                );
                assert_eq!(r.mechanism, mechanism);
            }
        }
    }
}

#[tokio::test]
async fn noise_scale_follows_sensitivity_and_budget_split() {
    let (_d, engine) = parquet_engine().await;
    let mut l = limits(
        vec![by_sex()],
        vec![count_agg(), bmi_agg("s", AggregateKind::Sum)],
        1.0,
    );
    l.max_rows_per_person = 2;
    let r = engine.execute(&query(None), &l).await.unwrap();
    // Two aggregates: epsilon 0.5 each. Counts: b = m / 0.5 = 4. Sums: b = m * 60 / 0.5.
    let count = &r.rows[0].cells[0];
    let sum = &r.rows[0].cells[1];
    assert!(
        (count.noise_scale - 4.0).abs() < 1e-9,
        "{}",
        count.noise_scale
    );
    assert!(
        (sum.noise_scale - 240.0).abs() < 1e-6,
        "{}",
        sum.noise_scale
    );
    assert!((sum.variance - 2.0 * 240.0 * 240.0).abs() < 1e-3);
    let q = (-1.0f64 / 4.0).exp();
    assert!((count.variance - 2.0 * q / (1.0 - q).powi(2)).abs() < 1e-9);
}

// ---------------------------------------------------------------- post-processing

#[tokio::test]
async fn small_groups_are_suppressed_with_a_reason_and_rounding_applies() {
    let (_d, engine) = parquet_engine().await;
    // Very large epsilon: noise is essentially zero, so the outcome is deterministic.
    // Filter to 3 women and every man.
    let f = Predicate::Any(vec![
        Predicate::All(vec![
            cmp("sex", CompareOp::Eq, Literal::Text("F".into())),
            Predicate::InList {
                column: "person_id".into(),
                values: ["p0", "p4", "p8"]
                    .iter()
                    .map(|s| Literal::Text((*s).into()))
                    .collect(),
                negated: false,
            },
        ]),
        cmp("sex", CompareOp::Eq, Literal::Text("M".into())),
    ]);
    let l = limits(
        vec![by_sex()],
        vec![
            count_agg(),
            bmi_agg("s", AggregateKind::Sum),
            bmi_agg("m", AggregateKind::Mean),
        ],
        3000.0,
    );
    let exact = engine
        .execute_exact(&query(Some(f.clone())), &l)
        .await
        .unwrap();
    let women = exact.rows[0].cells[0].noisy_value;
    assert_eq!(women, 3.0);
    let r = engine.execute(&query(Some(f)), &l).await.unwrap();
    let f_row = &r.rows[0];
    for cell in &f_row.cells {
        assert!(cell.suppressed, "{}", cell.alias);
        assert_eq!(cell.estimate, 0.0);
        assert_eq!(
            cell.suppression_reason.as_deref(),
            Some("fewer than 8 (at or below the minimum reportable count 7)")
        );
    }
    let m_row = &r.rows[1];
    for cell in &m_row.cells {
        assert!(!cell.suppressed, "{}", cell.alias);
    }
    let men = exact.rows[1].cells[0].noisy_value;
    assert_eq!(m_row.cells[0].noisy_value, men);
    assert_eq!(m_row.cells[0].estimate, (men / 5.0).round() * 5.0);
    assert_eq!(m_row.cells[0].estimate % 5.0, 0.0);
    let mean = m_row.cells[2].noisy_value;
    assert_eq!(m_row.cells[2].estimate, (mean * 10.0).round() / 10.0);
}

#[test]
fn rounding_rules() {
    use super::post::round;
    assert_eq!(round(Rounding::Nearest5, 12.0), 10.0);
    assert_eq!(round(Rounding::Nearest5, 13.0), 15.0);
    assert_eq!(round(Rounding::Nearest10, 14.0), 10.0);
    assert_eq!(round(Rounding::Nearest10, 15.0), 20.0);
    assert_eq!(round(Rounding::Midpoint6, 0.0), 0.0);
    assert_eq!(round(Rounding::Midpoint6, 1.0), 3.0);
    assert_eq!(round(Rounding::Midpoint6, 6.0), 3.0);
    assert_eq!(round(Rounding::Midpoint6, 7.0), 9.0);
    assert_eq!(round(Rounding::None, 7.0), 7.0);
}

// ---------------------------------------------------------------- statistics

/// Runs `runs` private COUNT queries over 10 declared cells and checks, for every
/// sample, whether the 95% interval covers the exact value; returns (coverage, the
/// empirical variance of noise, the reported variance, samples).
async fn count_noise_samples(
    mechanism: Mechanism,
    epsilon: f64,
    runs: usize,
) -> (f64, f64, f64, usize) {
    let (_d, engine) = parquet_engine().await;
    let mut l = limits(vec![by_imd(), by_sex()], vec![count_agg()], epsilon);
    l.mechanism = mechanism;
    let exact = engine.execute_exact(&query(None), &l).await.unwrap();
    let truth: Vec<f64> = exact.rows.iter().map(|r| r.cells[0].noisy_value).collect();
    let (mut covered, mut n, mut sq, mut reported) = (0usize, 0usize, 0.0f64, 0.0f64);
    for _ in 0..runs {
        let r = engine.execute(&query(None), &l).await.unwrap();
        for (row, t) in r.rows.iter().zip(&truth) {
            let c = &row.cells[0];
            if c.ci95.0 <= *t && *t <= c.ci95.1 {
                covered += 1;
            }
            sq += (c.noisy_value - t).powi(2);
            reported = c.variance;
            n += 1;
        }
    }
    (covered as f64 / n as f64, sq / n as f64, reported, n)
}

#[tokio::test]
async fn discrete_laplace_interval_coverage_and_variance() {
    // epsilon 0.1, m 1: discrete Laplace with b = 10.
    let (coverage, emp_var, var, n) =
        count_noise_samples(Mechanism::DiscreteLaplace, 0.1, 1000).await;
    let b = 10.0f64;
    // Exact coverage of [v - a, v + a]: P(|X| <= floor(a)) with
    // P(|X| >= t) = 2 e^{-t/b} / (1 + e^{-1/b}) for integer t >= 1.
    let a = opendp::accuracy::discrete_laplacian_scale_to_accuracy(b, 0.05).unwrap();
    let t = a.floor() + 1.0;
    let p = 1.0 - 2.0 * (-t / b).exp() / (1.0 + (-1.0 / b).exp());
    assert!(p >= 0.95);
    let tol = 5.3 * (p * (1.0 - p) / n as f64).sqrt();
    assert!(
        (coverage - p).abs() <= tol,
        "coverage {coverage}, expected {p} ± {tol}"
    );
    assert!(coverage >= 0.95 - 5.3 * (0.95 * 0.05 / n as f64).sqrt());
    // The sample mean of squared noise has relative sd sqrt((kurtosis - 1) / n);
    // kurtosis of a Laplace is 6.
    let tol = 5.3 * var * (5.0 / n as f64).sqrt();
    assert!(
        (emp_var - var).abs() <= tol,
        "variance {emp_var}, reported {var} ± {tol}"
    );
    let q = (-1.0 / b).exp();
    assert!((var - 2.0 * q / (1.0 - q).powi(2)).abs() < 1e-9);
}

#[tokio::test]
async fn discrete_gaussian_interval_coverage_and_variance() {
    let (coverage, emp_var, var, n) =
        count_noise_samples(Mechanism::DiscreteGaussian, 0.5, 500).await;
    assert!(
        coverage >= 0.95 - 5.3 * (0.95 * 0.05 / n as f64).sqrt(),
        "coverage {coverage}"
    );
    // Gaussian kurtosis 3: relative sd of the mean of squares sqrt(2 / n). The discrete
    // Gaussian's variance is a hair under sigma^2 (relative gap < 1e-6 at these scales).
    let tol = 5.3 * var * (2.0 / n as f64).sqrt();
    assert!(
        (emp_var - var).abs() <= tol,
        "variance {emp_var}, reported {var} ± {tol}"
    );
}

#[tokio::test]
async fn mean_interval_is_the_delta_method_from_its_parts() {
    let (_d, engine) = parquet_engine().await;
    let l = limits(vec![by_sex()], vec![bmi_agg("m", AggregateKind::Mean)], 1.0);
    let r = engine.execute(&query(None), &l).await.unwrap();
    for row in &r.rows {
        let c = &row.cells[0];
        let p = c.mean.as_ref().unwrap();
        let mean = p.noisy_sum / p.noisy_count;
        assert!((c.noisy_value - mean).abs() < 1e-12);
        let var = p.sum_variance / p.noisy_count.powi(2)
            + p.noisy_sum.powi(2) * p.count_variance / p.noisy_count.powi(4);
        assert!((c.variance - var).abs() <= 1e-12 * var.max(1.0));
        let half = 1.959_963_984_540_054 * var.sqrt();
        assert!((c.ci95.0 - (mean - half)).abs() < 1e-9);
        assert!((c.ci95.1 - (mean + half)).abs() < 1e-9);
    }
}
