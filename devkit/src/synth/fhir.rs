//! A synthetic acute trust's admissions as a FHIR Bulk Data export: the rows of its
//! `acute_admissions` Parquet file become, as the trust's EPR would export them,
//! `Patient` (sex, birth date, the trust's IMD, Place and opt-out extensions),
//! `Encounter` (inpatient admissions with UK Core's admission method) and `Condition`
//! (each admission's ICD-10 diagnosis) NDJSON files with a manifest, plus what a real
//! export also holds and the views drop: outpatient encounters, and problem-list
//! conditions coded in SNOMED CT only. Beside them go the sample views and query
//! (`policies/samples/fhir/`), so `policies/samples/fhir_trust.toml`'s source reads the
//! same people as the Parquet file and gives the same exact answers.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use chrono::{Datelike, NaiveDate};
use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Date32Type, Int64Type};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::json;

/// The views, the query and their file names in the export folder.
pub const FILES: [(&str, &str); 4] = [
    (
        "patient.view.json",
        include_str!("../../../policies/samples/fhir/patient.view.json"),
    ),
    (
        "admission.view.json",
        include_str!("../../../policies/samples/fhir/admission.view.json"),
    ),
    (
        "diagnosis.view.json",
        include_str!("../../../policies/samples/fhir/diagnosis.view.json"),
    ),
    (
        "acute_admissions.sql",
        include_str!("../../../policies/samples/fhir/acute_admissions.sql"),
    ),
];

/// The folder, inside the trust's, that holds the export.
pub const FOLDER: &str = "fhir";

const EXT: &str = "https://fhir.wolds-ics.nhs.uk/StructureDefinition";
const ACT_CODE: &str = "http://terminology.hl7.org/CodeSystem/v3-ActCode";
const ICD10: &str = "http://hl7.org/fhir/sid/icd-10";
const CATEGORY: &str = "http://terminology.hl7.org/CodeSystem/condition-category";

/// What the export holds, by resource type and by what the views will drop.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    pub patients: u64,
    pub admissions: u64,
    /// Outpatient encounters (no IMP class: "no matching coding").
    pub outpatient: u64,
    pub diagnoses: u64,
    /// SNOMED-only problem-list conditions ("no matching coding").
    pub problems: u64,
}

/// The reference date the sample query computes ages at (and birth dates are made
/// from), as in the OMOP view.
fn reference() -> NaiveDate {
    NaiveDate::from_ymd_opt(2026, 4, 1).unwrap_or_default()
}

/// A stable hash of a person id (FNV-1a): spreads birthdays over the year.
fn spread(id: &str) -> u64 {
    id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// A birth date at which a person is `age` whole years old on the reference date.
fn birth_date(id: &str, age: i64) -> Option<NaiveDate> {
    let r = reference();
    let at_birthday =
        NaiveDate::from_ymd_opt(r.year() - i32::try_from(age).ok()?, r.month(), r.day())?;
    at_birthday.checked_sub_days(chrono::Days::new(spread(id) % 365))
}

fn icd10(group: &str) -> &'static str {
    match group {
        "circulatory" => "I50.9",
        "respiratory" => "J44.1",
        "diabetes" => "E11.9",
        "mental_health" => "F32.9",
        "injury" => "S72.0",
        _ => "R69",
    }
}

fn gender(sex: &str) -> &'static str {
    match sex {
        "F" => "female",
        "M" => "male",
        _ => "unknown",
    }
}

struct Person {
    nhs_number: Option<String>,
    age: Option<i64>,
    sex: Option<String>,
    imd: Option<i64>,
    place: Option<String>,
    opted_out: Option<bool>,
}

/// Writes the export of trust folder `org_dir`'s admissions into `org_dir/fhir`, with
/// the sample views and query.
pub fn write_trust(org_dir: &Path) -> Result<Written, String> {
    let parquet = org_dir.join("data").join("acute_admissions.parquet");
    let err = |e: &dyn std::fmt::Display| format!("{}: {e}", parquet.display());
    let f = File::open(&parquet).map_err(|e| err(&e))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(f)
        .map_err(|e| err(&e))?
        .build()
        .map_err(|e| err(&e))?;
    let dir = org_dir.join(FOLDER);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let create = |name: &str| {
        let p = dir.join(name);
        File::create(&p)
            .map(BufWriter::new)
            .map_err(|e| format!("{}: {e}", p.display()))
    };
    let (mut encounters, mut conditions) =
        (create("Encounter.ndjson")?, create("Condition.ndjson")?);
    let mut people: BTreeMap<String, Person> = BTreeMap::new();
    let mut w = Written::default();
    let io = |e: std::io::Error| format!("{}: {e}", dir.display());
    for batch in reader {
        let b: RecordBatch = batch.map_err(|e| err(&e))?;
        let column = |name: &str, ty: &DataType| {
            let c = b
                .column_by_name(name)
                .ok_or_else(|| err(&format!("no column {name}")))?;
            datafusion::arrow::compute::cast(c, ty).map_err(|e| err(&e))
        };
        let text = |name: &str| -> Result<Vec<Option<String>>, String> {
            let c = column(name, &DataType::Utf8)?;
            let s = c.as_string::<i32>();
            Ok((0..s.len())
                .map(|i| s.is_valid(i).then(|| s.value(i).to_string()))
                .collect())
        };
        let int = |name: &str| -> Result<Vec<Option<i64>>, String> {
            let c = column(name, &DataType::Int64)?;
            let a = c.as_primitive::<Int64Type>();
            Ok((0..a.len())
                .map(|i| a.is_valid(i).then(|| a.value(i)))
                .collect())
        };
        let (pid, aid, method, group) = (
            text("person_id")?,
            text("admission_id")?,
            text("method")?,
            text("diagnosis_group")?,
        );
        let (sex, place) = (text("sex")?, text("place")?);
        // Absent from a policy cut down for a test: then no identifier is written.
        let nhs = if b.column_by_name("nhs_number").is_some() {
            text("nhs_number")?
        } else {
            vec![None; b.num_rows()]
        };
        let (stay, age, imd) = (int("length_of_stay")?, int("age")?, int("imd_quintile")?);
        let date = b
            .column_by_name("admission_date")
            .ok_or_else(|| err(&"no column admission_date"))?
            .as_primitive_opt::<Date32Type>()
            .ok_or_else(|| err(&"admission_date is not a date"))?
            .clone();
        let opt = b
            .column_by_name("ndopt_out")
            .ok_or_else(|| err(&"no column ndopt_out"))?
            .as_boolean_opt()
            .ok_or_else(|| err(&"ndopt_out is not boolean"))?
            .clone();
        for i in 0..b.num_rows() {
            let (Some(pid), Some(aid)) = (&pid[i], &aid[i]) else {
                return Err(err(&format!("row {i} has no person or admission id")));
            };
            people.entry(pid.clone()).or_insert_with(|| Person {
                nhs_number: nhs[i].clone(),
                age: age[i],
                sex: sex[i].clone(),
                imd: imd[i],
                place: place[i].clone(),
                opted_out: opt.is_valid(i).then(|| opt.value(i)),
            });
            let start = date.value_as_date(i);
            let mut period = serde_json::Map::new();
            if let Some(s) = start {
                period.insert("start".into(), json!(s.format("%Y-%m-%d").to_string()));
                if let Some(e) = stay[i]
                    .and_then(|d| s.checked_add_days(chrono::Days::new(u64::try_from(d).ok()?)))
                {
                    period.insert("end".into(), json!(e.format("%Y-%m-%d").to_string()));
                }
            }
            let mut enc = json!({
                "resourceType": "Encounter",
                "id": aid,
                "status": "finished",
                "class": {"system": ACT_CODE, "code": "IMP", "display": "inpatient encounter"},
                "subject": {"reference": format!("Patient/{pid}")},
                "period": period,
            });
            if let Some(m) = &method[i] {
                let code = if m == "emergency" { "21" } else { "11" };
                enc["extension"] = json!([{
                    "url": "https://fhir.hl7.org.uk/StructureDefinition/Extension-UKCore-AdmissionMethod",
                    "valueCodeableConcept": {"coding": [{
                        "system": "https://fhir.hl7.org.uk/CodeSystem/UKCore-AdmissionMethodEngland",
                        "code": code
                    }]}
                }]);
            }
            writeln!(encounters, "{enc}").map_err(io)?;
            w.admissions += 1;
            if let Some(g) = &group[i] {
                let c = json!({
                    "resourceType": "Condition",
                    "id": format!("dx-{aid}"),
                    "category": [{"coding": [{"system": CATEGORY, "code": "encounter-diagnosis"}]}],
                    "code": {"coding": [{"system": ICD10, "code": icd10(g)}]},
                    "subject": {"reference": format!("Patient/{pid}")},
                    "encounter": {"reference": format!("Encounter/{aid}")},
                });
                writeln!(conditions, "{c}").map_err(io)?;
                w.diagnoses += 1;
            }
        }
    }
    let mut patients = create("Patient.ndjson")?;
    for (n, (id, p)) in people.iter().enumerate() {
        let mut ext = Vec::new();
        if let Some(q) = p.imd {
            ext.push(json!({"url": format!("{EXT}/imd-quintile"), "valueInteger": q}));
        }
        if let Some(pl) = &p.place {
            ext.push(json!({"url": format!("{EXT}/place"), "valueString": pl}));
        }
        if let Some(o) = p.opted_out {
            ext.push(json!({"url": format!("{EXT}/national-data-opt-out"), "valueBoolean": o}));
        }
        let mut r = json!({"resourceType": "Patient", "id": id, "extension": ext});
        if let Some(n) = &p.nhs_number {
            r["identifier"] = json!([{"system": "https://fhir.nhs.uk/Id/nhs-number", "value": n}]);
        }
        if let Some(s) = &p.sex {
            r["gender"] = json!(gender(s));
        }
        if let Some(b) = p.age.and_then(|a| birth_date(id, a)) {
            r["birthDate"] = json!(b.format("%Y-%m-%d").to_string());
        }
        writeln!(patients, "{r}").map_err(io)?;
        w.patients += 1;
        // What a real export also holds and the views drop: an outpatient attendance
        // for every fifth patient, a SNOMED-only problem-list entry for every seventh.
        if n % 5 == 0 {
            let e = json!({
                "resourceType": "Encounter", "id": format!("op-{id}"), "status": "finished",
                "class": {"system": ACT_CODE, "code": "AMB", "display": "ambulatory"},
                "subject": {"reference": format!("Patient/{id}")},
                "period": {"start": "2025-06-02T10:15:00+01:00"},
            });
            writeln!(encounters, "{e}").map_err(io)?;
            w.outpatient += 1;
        }
        if n % 7 == 0 {
            let c = json!({
                "resourceType": "Condition", "id": format!("pl-{id}"),
                "category": [{"coding": [{"system": CATEGORY, "code": "problem-list-item"}]}],
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003", "display": "Hypertensive disorder"}]},
                "subject": {"reference": format!("Patient/{id}")},
            });
            writeln!(conditions, "{c}").map_err(io)?;
            w.problems += 1;
        }
    }
    for mut f in [patients, encounters, conditions] {
        f.flush().map_err(io)?;
    }
    let manifest = json!({
        "transactionTime": "2026-04-01T02:00:00Z",
        "request": "https://fhir.wolds.nhs.uk/r4/$export?_type=Patient,Encounter,Condition",
        "requiresAccessToken": true,
        "output": [
            {"type": "Patient", "url": "https://fhir.wolds.nhs.uk/r4/bulk/files/Patient.ndjson", "count": w.patients},
            {"type": "Encounter", "url": "https://fhir.wolds.nhs.uk/r4/bulk/files/Encounter.ndjson", "count": w.admissions + w.outpatient},
            {"type": "Condition", "url": "https://fhir.wolds.nhs.uk/r4/bulk/files/Condition.ndjson", "count": w.diagnoses + w.problems},
        ],
        "error": [],
    });
    let text = serde_json::to_string_pretty(&manifest).map_err(|e| e.to_string())?;
    std::fs::write(dir.join("manifest.json"), text).map_err(io)?;
    for (name, body) in FILES {
        std::fs::write(dir.join(name), body).map_err(io)?;
    }
    Ok(w)
}

/// Writes trust folder `org_dir`'s export (`write_trust`), points its policy's
/// `acute_admissions` dataset at it, and removes the Parquet file, so the trust's node
/// can only answer from FHIR. For `phm demo --fhir`.
pub fn move_trust(org_dir: &Path) -> Result<Written, String> {
    let written = write_trust(org_dir)?;
    let policy_path = org_dir.join("policy.toml");
    let text = std::fs::read_to_string(&policy_path)
        .map_err(|e| format!("cannot read {}: {e}", policy_path.display()))?;
    let mut doc: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", policy_path.display()))?;
    let source = toml::Value::try_from(source()).map_err(|e| e.to_string())?;
    let ds = doc
        .get_mut("datasets")
        .and_then(|d| d.as_array_mut())
        .and_then(|d| {
            d.iter_mut()
                .filter_map(|x| x.as_table_mut())
                .find(|x| x.get("name").and_then(|n| n.as_str()) == Some("acute_admissions"))
        })
        .ok_or_else(|| format!("{}: no acute_admissions dataset", policy_path.display()))?;
    ds.insert("source".into(), source);
    let text = toml::to_string(&doc).map_err(|e| e.to_string())?;
    std::fs::write(&policy_path, text)
        .map_err(|e| format!("cannot write {}: {e}", policy_path.display()))?;
    let parquet = org_dir.join("data").join("acute_admissions.parquet");
    std::fs::remove_file(&parquet).map_err(|e| format!("{}: {e}", parquet.display()))?;
    Ok(written)
}

/// The source a trust's policy names to read the export `write_trust` wrote.
pub fn source() -> phm_policies::model::Source {
    phm_policies::model::Source::FhirNdjson(phm_policies::model::FhirExport {
        manifest: Some(format!("{FOLDER}/manifest.json")),
        files: Vec::new(),
        views: FILES[..3]
            .iter()
            .map(|(n, _)| format!("{FOLDER}/{n}"))
            .collect(),
        query: Some(format!("{FOLDER}/{}", FILES[3].0)),
    })
}
