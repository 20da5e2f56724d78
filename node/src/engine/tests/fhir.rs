//! FHIR Bulk Data sources: the same people as Parquet and as a FHIR export (through the
//! sample views and query, and through views written for the fixture) give exactly the
//! same noise-free answers; every dropped resource is counted under its reason; a
//! damaged export, a view outside the subset and a query that is not a plain SELECT
//! are refused naming the file and the element or line.

use std::path::Path;

use phm_policies::model::{FhirExport, Source};
use serde_json::{Value, json};

use super::warehouse::{acute_trust, assert_same_admissions, parquet_engine_of, queries};
use super::*;
use crate::engine::fhir::DropReason;

#[tokio::test]
async fn fhir_export_answers_equal_parquet_answers_exactly() {
    let (_tmp, trust, file_policy) = acute_trust().await;
    let t2 = trust.clone();
    let written = tokio::task::spawn_blocking(move || phm_devkit::synth::fhir::write_trust(&t2))
        .await
        .unwrap()
        .unwrap();
    let mut fhir_policy = file_policy.clone();
    fhir_policy.datasets[0].source = phm_devkit::synth::fhir::source();
    // The sample policy reads the export the synth writes.
    let sample: PolicyFile =
        toml::from_str(include_str!("../../../../policies/samples/fhir_trust.toml")).unwrap();
    assert_eq!(sample.datasets[0].source, fhir_policy.datasets[0].source);
    let file = Engine::load(&file_policy, &trust).await.unwrap();
    let fhir = Engine::load(&fhir_policy, &trust).await.unwrap();
    assert_same_admissions(&file, &fhir).await;

    // What the export held beside the admissions was dropped, each under its reason,
    // and nothing else was.
    let report = fhir.load_report("acute_admissions").expect("a FHIR report");
    let view = |name: &str| report.views.iter().find(|v| v.name == name).unwrap();
    assert_eq!(report.resources["Patient"], written.patients);
    assert_eq!(view("patient").kept, written.patients);
    let admission = view("admission");
    assert_eq!(admission.read, written.admissions + written.outpatient);
    assert_eq!(admission.kept, written.admissions);
    assert_eq!(admission.dropped.len(), 1);
    assert_eq!(
        admission.dropped[&DropReason::NoMatchingCoding].count,
        written.outpatient
    );
    let diagnosis = view("diagnosis");
    assert_eq!(diagnosis.kept, written.diagnoses);
    assert_eq!(
        diagnosis.dropped[&DropReason::NoMatchingCoding].count,
        written.problems
    );
    assert!(written.outpatient > 0 && written.problems > 0);
    assert_eq!(report.dataset_rows, written.admissions);
}

const PATIENT_VIEW: &str = include_str!("../../../../policies/samples/fhir/patient.view.json");

fn bmi_view() -> Value {
    json!({
        "resourceType": "ViewDefinition", "name": "bmi", "resource": "Observation",
        "where": [{"path": "code.coding.where(system = 'http://snomed.info/sct' and code = '60621009').exists()"}],
        "select": [{"column": [
            {"name": "person_id", "path": "subject.getReferenceKey(Patient)"},
            {"name": "bmi", "path": "valueQuantity.value", "type": "decimal"}
        ]}]
    })
}

fn diagnosis_view() -> Value {
    json!({
        "resourceType": "ViewDefinition", "name": "diag", "resource": "Condition",
        "where": [{"path": "code.coding.where(system = 'http://hl7.org/fhir/sid/icd-10').exists()"}],
        "select": [{"column": [
            {"name": "person_id", "path": "subject.getReferenceKey(Patient)"},
            {"name": "diag_date", "path": "onsetDateTime", "type": "dateTime"}
        ]}]
    })
}

const FIXTURE_QUERY: &str = "
SELECT p.person_id,
       CAST(2026 - date_part('year', p.birth_date)
            - CASE WHEN to_char(p.birth_date, '%m-%d') > '04-01' THEN 1 ELSE 0 END AS BIGINT) AS age,
       CASE p.gender WHEN 'female' THEN 'F' WHEN 'male' THEN 'M' END AS sex,
       p.imd_quintile, b.bmi, p.ndopt_out, p.place, d.diag_date
FROM patient p
LEFT JOIN bmi b ON b.person_id = p.person_id
LEFT JOIN diag d ON d.person_id = p.person_id";

const EXT: &str = "https://fhir.wolds-ics.nhs.uk/StructureDefinition";

/// The fixture people as an export in `dir/export`, with the views and query beside
/// it, plus one resource of each kind the views must drop.
fn write_fixture_export(dir: &Path, ps: &[Person]) {
    let export = dir.join("export");
    std::fs::create_dir_all(&export).unwrap();
    let (mut patients, mut observations, mut conditions) =
        (String::new(), String::new(), String::new());
    let line = |out: &mut String, v: Value| {
        out.push_str(&v.to_string());
        out.push('\n');
    };
    for (i, p) in ps.iter().enumerate() {
        let birth = chrono::NaiveDate::from_ymd_opt(2026 - p.age as i32, 4, 1).unwrap()
            - chrono::Duration::days((i % 300) as i64);
        let mut ext = vec![
            json!({"url": format!("{EXT}/imd-quintile"), "valueInteger": p.imd}),
            json!({"url": format!("{EXT}/place"), "valueString": p.place}),
        ];
        if let Some(o) = p.opted_out {
            ext.push(json!({"url": format!("{EXT}/national-data-opt-out"), "valueBoolean": o}));
        }
        line(
            &mut patients,
            json!({"resourceType": "Patient", "id": p.id, "extension": ext,
                   "gender": if p.sex == "F" { "female" } else { "male" },
                   "birthDate": birth.format("%Y-%m-%d").to_string()}),
        );
        if let Some(b) = p.bmi {
            line(
                &mut observations,
                json!({"resourceType": "Observation", "id": format!("bmi-{i}"), "status": "final",
                       "code": {"coding": [{"system": "http://snomed.info/sct", "code": "60621009"}]},
                       "subject": {"reference": format!("Patient/{}", p.id)},
                       "valueQuantity": {"value": b, "unit": "kg/m2"}}),
            );
        }
        let date = chrono::NaiveDate::from_ymd_opt(1970, 1, 1).unwrap()
            + chrono::Duration::days(i64::from(p.diag_days));
        line(
            &mut conditions,
            json!({"resourceType": "Condition", "id": format!("c-{i}"),
                   "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11.9"}]},
                   "subject": {"reference": format!("Patient/{}", p.id)},
                   "onsetDateTime": format!("{}T08:00:00Z", date.format("%Y-%m-%d"))}),
        );
    }
    let obs = |id: &str, subject: Value, value: Value, system: &str| {
        json!({"resourceType": "Observation", "id": id, "status": "final",
               "code": {"coding": [{"system": system, "code": "60621009"}]},
               "subject": subject, "valueQuantity": {"value": value}})
    };
    let sct = "http://snomed.info/sct";
    line(
        &mut observations,
        obs(
            "hba1c",
            json!({"reference": "Patient/p0"}),
            json!(48),
            "http://loinc.org",
        ),
    );
    line(
        &mut observations,
        obs("group", json!({"reference": "Group/g1"}), json!(30.0), sct),
    );
    line(
        &mut observations,
        obs("nobody", json!({"display": "unknown"}), json!(30.0), sct),
    );
    line(
        &mut observations,
        obs("text", json!({"reference": "Patient/p2"}), json!("31"), sct),
    );
    line(
        &mut conditions,
        json!({"resourceType": "Condition", "id": "partial",
               "code": {"coding": [{"system": "http://hl7.org/fhir/sid/icd-10", "code": "E11.9"}]},
               "subject": {"reference": "Patient/p1"}, "onsetDateTime": "2023-04"}),
    );
    std::fs::write(export.join("Patient.ndjson"), patients).unwrap();
    // Blank lines are skipped, as NDJSON readers do.
    std::fs::write(
        export.join("Observation.ndjson"),
        format!("{observations}\n"),
    )
    .unwrap();
    std::fs::write(export.join("Condition.ndjson"), conditions).unwrap();
    std::fs::write(dir.join("patient.view.json"), PATIENT_VIEW).unwrap();
    std::fs::write(dir.join("bmi.view.json"), bmi_view().to_string()).unwrap();
    std::fs::write(dir.join("diag.view.json"), diagnosis_view().to_string()).unwrap();
    std::fs::write(dir.join("gp.sql"), FIXTURE_QUERY).unwrap();
}

fn fixture_export() -> FhirExport {
    FhirExport {
        manifest: None,
        files: vec!["export".into()],
        views: vec![
            "patient.view.json".into(),
            "bmi.view.json".into(),
            "diag.view.json".into(),
        ],
        query: Some("gp.sql".into()),
    }
}

fn fhir_policy(export: FhirExport) -> PolicyFile {
    let mut p = policy("parquet", "unused", 1);
    p.datasets[0].source = Source::FhirNdjson(export);
    p
}

/// The fixture's people (NULL BMIs, unknown opt-outs, dates) as Parquet and as FHIR:
/// the warehouse test's 27 generated queries give the same answers.
#[tokio::test]
async fn fhir_answers_with_nulls_equal_parquet_answers_exactly() {
    let ps = people();
    let (_pdir, file) = parquet_engine_of(&ps).await;
    let dir = tempfile::tempdir().unwrap();
    write_fixture_export(dir.path(), &ps);
    let fhir = Engine::load(&fhir_policy(fixture_export()), dir.path())
        .await
        .unwrap();
    let qs = queries();
    assert!(qs.len() >= 20);
    for (i, (filter, l)) in qs.into_iter().enumerate() {
        let q = query(filter);
        let a = file.execute_exact(&q, &l).await.unwrap();
        let b = fhir.execute_exact(&q, &l).await.unwrap();
        assert_eq!(a, b, "query {i} differs: {:?}", q.filter);
    }

    let report = fhir.load_report("gp_patients").unwrap();
    let counts = |name: &str| -> Vec<(DropReason, u64)> {
        let v = report.views.iter().find(|v| v.name == name).unwrap();
        v.dropped.iter().map(|(r, d)| (*r, d.count)).collect()
    };
    assert_eq!(
        counts("bmi"),
        vec![
            (DropReason::NoMatchingCoding, 1),
            (DropReason::BadReference, 1),
            (DropReason::MissingValue, 1),
            (DropReason::InvalidValue, 1),
        ]
    );
    assert_eq!(counts("diag"), vec![(DropReason::PartialDate, 1)]);
    assert!(counts("patient").is_empty());
    let bmi = report.views.iter().find(|v| v.name == "bmi").unwrap();
    let first = &bmi.dropped[&DropReason::BadReference];
    assert_eq!(first.element, "person_id");
    assert!(first.first.file.ends_with("export/Observation.ndjson"));
    let with_bmi = ps.iter().filter(|p| p.bmi.is_some()).count() as u64;
    assert_eq!(
        first.first.line,
        with_bmi + 2,
        "the line of the Group reference"
    );
    let line = report.lines().join("\n");
    assert!(line.contains("view `bmi` (Observation):"), "{line}");
    assert!(
        line.contains("1 bad reference (`person_id`, first at "),
        "{line}"
    );
    assert!(!line.contains("Group/g1"), "no value in the report: {line}");
}

/// What refuses the load, each naming the file and where.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_damaged_export_or_an_unsupported_view_is_refused() {
    let ps = people();
    let load_err = |edit: &dyn Fn(&Path, &mut FhirExport)| {
        let dir = tempfile::tempdir().unwrap();
        write_fixture_export(dir.path(), &ps);
        let mut export = fixture_export();
        edit(dir.path(), &mut export);
        let policy = fhir_policy(export);
        let rt = tokio::runtime::Handle::current();
        let loaded = tokio::task::block_in_place(|| rt.block_on(Engine::load(&policy, dir.path())));
        let Err(err) = loaded else {
            panic!("the load was not refused")
        };
        err.to_string()
    };
    // A line that is not JSON: the file and line.
    let e = load_err(&|d, _| {
        let p = d.join("export/Condition.ndjson");
        let mut text = std::fs::read_to_string(&p).unwrap();
        text.push_str("{\"resourceType\": \"Condition\", \"id\": \n");
        std::fs::write(&p, text).unwrap();
    });
    assert!(e.contains("Condition.ndjson, line 202: not JSON"), "{e}");
    // A file with no line breaks is refused at the cap, not read whole.
    let e = load_err(&|d, _| {
        std::fs::write(d.join("export/Huge.ndjson"), vec![b' '; (64 << 20) + 10]).unwrap()
    });
    assert!(e.contains("Huge.ndjson, line 1: longer than 64 MiB"), "{e}");
    let e = load_err(&|d, _| std::fs::write(d.join("export/Other.ndjson"), "[1, 2]\n").unwrap());
    assert!(
        e.contains("Other.ndjson, line 1: not a FHIR resource"),
        "{e}"
    );
    // A view outside the subset: the view file and the element.
    let e = load_err(&|d, _| {
        let mut v = bmi_view();
        v["select"][0]["column"][1]["path"] = json!("value.ofType(Quantity).value");
        std::fs::write(d.join("bmi.view.json"), v.to_string()).unwrap();
    });
    assert!(
        e.contains("bmi.view.json: element `select[0].column[1].path`")
            && e.contains("ofType() is outside the supported subset"),
        "{e}"
    );
    let e = load_err(&|d, _| {
        let mut v = diagnosis_view();
        v["select"][0]["unionAll"] = json!([]);
        std::fs::write(d.join("diag.view.json"), v.to_string()).unwrap();
    });
    assert!(e.contains("element `select[0].unionAll`"), "{e}");
    // A query that is not a plain SELECT, or names what is not there.
    let e =
        load_err(&|d, _| std::fs::write(d.join("gp.sql"), "CREATE TABLE x AS SELECT 1").unwrap());
    assert!(
        e.contains("query ") && e.contains("gp.sql: Error during planning: DDL not supported"),
        "{e}"
    );
    let e = load_err(&|d, _| {
        std::fs::write(d.join("gp.sql"), "SET datafusion.execution.batch_size = 1").unwrap()
    });
    assert!(
        e.contains("gp.sql: Error during planning: Statement not supported"),
        "{e}"
    );
    let e = load_err(&|d, _| {
        std::fs::write(d.join("gp.sql"), FIXTURE_QUERY.replace("p.place,", "")).unwrap()
    });
    assert!(
        e.contains("column `place` is required by the policy"),
        "{e}"
    );
    // A value outside the declared domain: the row of the query's result.
    let e = load_err(&|d, _| {
        std::fs::write(
            d.join("gp.sql"),
            FIXTURE_QUERY.replace("p.imd_quintile,", "p.imd_quintile + 10 AS imd_quintile,"),
        )
        .unwrap()
    });
    assert!(e.contains("row 1, column `imd_quintile`"), "{e}");
    // A manifest naming a file that is not there, or a resource of another type.
    let e = load_err(&|d, x| {
        std::fs::write(
            d.join("manifest.json"),
            json!({"output": [{"type": "Patient", "url": "https://x/bulk/Missing.ndjson"}]})
                .to_string(),
        )
        .unwrap();
        x.files.clear();
        x.manifest = Some("manifest.json".into());
    });
    assert!(
        e.contains("manifest ") && e.contains("Missing.ndjson is not there"),
        "{e}"
    );
    let e = load_err(&|d, x| {
        std::fs::write(
            d.join("manifest.json"),
            json!({"output": [{"type": "Patient", "url": "export/Condition.ndjson"}]}).to_string(),
        )
        .unwrap();
        x.files.clear();
        x.manifest = Some("manifest.json".into());
    });
    assert!(
        e.contains("line 1: a Condition resource in a file the manifest lists as Patient"),
        "{e}"
    );
}

/// A manifest with server URLs reads the files downloaded beside it.
#[tokio::test]
async fn a_manifest_names_the_files_downloaded_beside_it() {
    let ps = people();
    let dir = tempfile::tempdir().unwrap();
    write_fixture_export(dir.path(), &ps);
    let url = |t: &str| format!("https://fhir.example.nhs.uk/bulk/{t}.ndjson");
    std::fs::write(
        dir.path().join("export/manifest.json"),
        json!({"transactionTime": "2026-04-01T02:00:00Z", "output": [
            {"type": "Patient", "url": url("Patient")},
            {"type": "Observation", "url": url("Observation")},
            {"type": "Condition", "url": "file://".to_string()
                + dir.path().join("export/Condition.ndjson").to_str().unwrap()},
        ], "error": [{"type": "OperationOutcome", "url": url("errors")}]})
        .to_string(),
    )
    .unwrap();
    let mut export = fixture_export();
    export.files.clear();
    export.manifest = Some("export/manifest.json".into());
    let fhir = Engine::load(&fhir_policy(export), dir.path())
        .await
        .unwrap();
    let report = fhir.load_report("gp_patients").unwrap();
    assert_eq!(report.files.len(), 3);
    assert_eq!(report.export_errors, 1);
    assert_eq!(report.dataset_rows, ps.len() as u64);
}
