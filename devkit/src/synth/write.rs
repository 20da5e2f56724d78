//! Parquet output of the synthetic datasets, one file per partner and dataset, with
//! column names and types matching the generated policies.

use super::Records;
use super::activity::{Admission, DIAGNOSIS_GROUPS, METHODS, PACKAGE_TYPES, TENURES};
use super::ics::{Ics, PLACES};
use super::nhs::Holder;
use super::people::{
    ASTHMA, COPD, CVD, DEPRESSION, DIABETES, ETHNICITIES, HYPERTENSION, OBESITY, Person, SEXES,
    SMI, SMOKING, person_id, postcode,
};
use chrono::{Datelike, NaiveDate};
use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, StringArray, StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::basic::Compression;
use datafusion::parquet::file::properties::WriterProperties;
use std::path::Path;
use std::sync::Arc;

/// A column to write: name and values.
enum Col {
    Text(&'static str, StringArray),
    /// Text that may be missing (NULL).
    OptText(&'static str, StringArray),
    Int(&'static str, Vec<i64>),
    Real(&'static str, Vec<Option<f64>>),
    Bool(&'static str, Vec<bool>),
    Date(&'static str, Vec<i32>),
}

/// Build a text column without allocating a String per row where the values are
/// borrowed (most are static category labels).
fn texts<S: AsRef<str>>(values: impl Iterator<Item = S>) -> StringArray {
    let mut b = StringBuilder::new();
    for v in values {
        b.append_value(v);
    }
    b.finish()
}

/// The `nhs_number` column of `holder`'s rows, one per entry of `persons` (indices into
/// `records.people`): what that partner recorded, NULL where it recorded nothing.
fn nhs_numbers(records: &Records, holder: Holder, persons: impl Iterator<Item = usize>) -> Col {
    let mut b = StringBuilder::new();
    for i in persons {
        match records.nhs.written(holder, i, &records.people) {
            Some(text) => b.append_value(text),
            None => b.append_null(),
        }
    }
    Col::OptText("nhs_number", b.finish())
}

fn write_parquet(path: &Path, cols: Vec<Col>) -> Result<u64, String> {
    let mut fields = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    for c in cols {
        match c {
            Col::Text(n, v) => {
                fields.push(Field::new(n, DataType::Utf8, false));
                arrays.push(Arc::new(v));
            }
            Col::OptText(n, v) => {
                fields.push(Field::new(n, DataType::Utf8, true));
                arrays.push(Arc::new(v));
            }
            Col::Int(n, v) => {
                fields.push(Field::new(n, DataType::Int64, false));
                arrays.push(Arc::new(Int64Array::from(v)));
            }
            Col::Real(n, v) => {
                fields.push(Field::new(n, DataType::Float64, true));
                arrays.push(Arc::new(Float64Array::from(v)));
            }
            Col::Bool(n, v) => {
                fields.push(Field::new(n, DataType::Boolean, false));
                arrays.push(Arc::new(BooleanArray::from(v)));
            }
            Col::Date(n, v) => {
                fields.push(Field::new(n, DataType::Date32, false));
                arrays.push(Arc::new(Date32Array::from(v)));
            }
        }
    }
    let schema = Arc::new(Schema::new(fields));
    let batch = RecordBatch::try_new(schema.clone(), arrays)
        .map_err(|e| format!("building {}: {e}", path.display()))?;
    let rows = batch.num_rows() as u64;
    let file = std::fs::File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // Uncompressed: dictionary and run-length encoding already shrink these columns,
    // and compressing in the unoptimised dev build cost a quarter of synth's time.
    let props = WriterProperties::builder()
        .set_compression(Compression::UNCOMPRESSED)
        .build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(props))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    writer
        .write(&batch)
        .map_err(|e| format!("writing {}: {e}", path.display()))?;
    let file = writer
        .into_inner()
        .map_err(|e| format!("finishing {}: {e}", path.display()))?;
    file.sync_all()
        .map_err(|e| format!("syncing {}: {e}", path.display()))?;
    Ok(rows)
}

/// Days since 1970-01-01.
pub fn epoch_days(d: NaiveDate) -> i32 {
    let epoch = NaiveDate::from_ymd_opt(1970, 1, 1).unwrap_or_default();
    d.signed_duration_since(epoch).num_days() as i32
}

fn date_of_birth(as_of: NaiveDate, p: &Person) -> i32 {
    let last_birthday = as_of - chrono::Days::new(p.birthday_offset as u64);
    let year = last_birthday.year() - p.age as i32;
    // 29 February birthdays fall on 28 February in non-leap years.
    let dob = last_birthday
        .with_year(year)
        .or_else(|| NaiveDate::from_ymd_opt(year, 2, 28))
        .unwrap_or(last_birthday);
    epoch_days(dob)
}

fn flags(people: &[&Person], bit: u16) -> Vec<bool> {
    people.iter().map(|p| p.has(bit)).collect()
}

fn common(people: &[&Person]) -> (Vec<i64>, StringArray, Vec<i64>, StringArray, Vec<bool>) {
    (
        people.iter().map(|p| p.age as i64).collect(),
        texts(people.iter().map(|p| SEXES[p.sex as usize])),
        people.iter().map(|p| p.imd as i64).collect(),
        texts(people.iter().map(|p| PLACES[p.place as usize])),
        people.iter().map(|p| p.opted_out).collect(),
    )
}

pub fn gp_patients(
    path: &Path,
    ics: &Ics,
    seed: u64,
    as_of: NaiveDate,
    records: &Records,
    range: std::ops::Range<usize>,
) -> Result<u64, String> {
    let people = &records.people;
    let idx: Vec<usize> = range.collect();
    let ps: Vec<&Person> = idx.iter().map(|i| &people[*i]).collect();
    let (age, sex, imd, place, opt) = common(&ps);
    let cols = vec![
        Col::Text("person_id", texts(idx.iter().map(|i| person_id(seed, *i)))),
        nhs_numbers(records, Holder::Gp, idx.iter().copied()),
        Col::Date(
            "date_of_birth",
            ps.iter().map(|p| date_of_birth(as_of, p)).collect(),
        ),
        Col::Text("postcode", texts(ps.iter().map(|p| postcode(ics, p)))),
        Col::Int("age", age),
        Col::Text("sex", sex),
        Col::Text(
            "ethnicity",
            texts(ps.iter().map(|p| ETHNICITIES[p.ethnicity as usize])),
        ),
        Col::Int("imd_quintile", imd),
        Col::Text(
            "lsoa",
            texts(ps.iter().map(|p| ics.lsoas[p.lsoa as usize].code.as_str())),
        ),
        Col::Text("place", place),
        Col::Text(
            "pcn",
            texts(ps.iter().map(|p| ics.pcns[p.pcn as usize].0.as_str())),
        ),
        Col::Bool("diabetes", flags(&ps, DIABETES)),
        Col::Bool("hypertension", flags(&ps, HYPERTENSION)),
        Col::Bool("cvd", flags(&ps, CVD)),
        Col::Bool("copd", flags(&ps, COPD)),
        Col::Bool("asthma", flags(&ps, ASTHMA)),
        Col::Bool("depression", flags(&ps, DEPRESSION)),
        Col::Bool("smi", flags(&ps, SMI)),
        Col::Bool("obesity", flags(&ps, OBESITY)),
        Col::Real("bmi", ps.iter().map(|p| p.bmi).collect()),
        Col::Real("hba1c", ps.iter().map(|p| p.hba1c).collect()),
        Col::Real("systolic_bp", ps.iter().map(|p| p.systolic_bp).collect()),
        Col::Text(
            "smoking",
            texts(ps.iter().map(|p| SMOKING[p.smoking as usize])),
        ),
        Col::Bool("ndopt_out", opt),
    ];
    write_parquet(path, cols)
}

pub fn acute_admissions(
    path: &Path,
    trust_code: &str,
    trust: usize,
    seed: u64,
    as_of: NaiveDate,
    records: &Records,
    admissions: &[&Admission],
) -> Result<u64, String> {
    let people = &records.people;
    let ps: Vec<&Person> = admissions
        .iter()
        .map(|a| &people[a.person as usize])
        .collect();
    let (age, sex, imd, place, opt) = common(&ps);
    let cols = vec![
        Col::Text(
            "person_id",
            texts(
                admissions
                    .iter()
                    .map(|a| person_id(seed, a.person as usize)),
            ),
        ),
        nhs_numbers(
            records,
            Holder::Trust(trust),
            admissions.iter().map(|a| a.person as usize),
        ),
        Col::Text(
            "admission_id",
            texts(
                admissions
                    .iter()
                    .map(|a| format!("{trust_code}-{:08}", a.seq)),
            ),
        ),
        Col::Date(
            "admission_date",
            admissions
                .iter()
                .map(|a| epoch_days(as_of - chrono::Days::new(a.days_before as u64)))
                .collect(),
        ),
        Col::Text(
            "method",
            texts(admissions.iter().map(|a| METHODS[a.method as usize])),
        ),
        Col::Text(
            "diagnosis_group",
            texts(
                admissions
                    .iter()
                    .map(|a| DIAGNOSIS_GROUPS[a.diagnosis as usize]),
            ),
        ),
        Col::Int(
            "length_of_stay",
            admissions.iter().map(|a| a.length_of_stay as i64).collect(),
        ),
        Col::Int("age", age),
        Col::Text("sex", sex),
        Col::Int("imd_quintile", imd),
        Col::Text("place", place),
        Col::Bool("ndopt_out", opt),
    ];
    write_parquet(path, cols)
}

pub fn social_care_packages(path: &Path, seed: u64, records: &Records) -> Result<u64, String> {
    let (people, packages) = (&records.people, &records.packages);
    let ps: Vec<&Person> = packages
        .iter()
        .map(|k| &people[k.person as usize])
        .collect();
    let (age, sex, imd, place, opt) = common(&ps);
    let cols = vec![
        Col::Text(
            "person_id",
            texts(packages.iter().map(|k| person_id(seed, k.person as usize))),
        ),
        nhs_numbers(
            records,
            Holder::SocialCare,
            packages.iter().map(|k| k.person as usize),
        ),
        Col::Text(
            "package_type",
            texts(
                packages
                    .iter()
                    .map(|k| PACKAGE_TYPES[k.package_type as usize]),
            ),
        ),
        Col::Real(
            "weekly_hours",
            packages.iter().map(|k| k.weekly_hours).collect(),
        ),
        Col::Real(
            "weekly_cost",
            packages.iter().map(|k| Some(k.weekly_cost)).collect(),
        ),
        Col::Int("age", age),
        Col::Text("sex", sex),
        Col::Int("imd_quintile", imd),
        Col::Text("place", place),
        Col::Bool("ndopt_out", opt),
    ];
    write_parquet(path, cols)
}

pub fn la_residents(path: &Path, ics: &Ics, seed: u64, records: &Records) -> Result<u64, String> {
    let (people, residents) = (&records.people, &records.residents);
    let ps: Vec<&Person> = people.iter().collect();
    let (age, sex, imd, place, opt) = common(&ps);
    let cols = vec![
        Col::Text(
            "person_id",
            texts((0..people.len()).map(|i| person_id(seed, i))),
        ),
        nhs_numbers(records, Holder::Council, 0..people.len()),
        Col::Text(
            "lsoa",
            texts(ps.iter().map(|p| ics.lsoas[p.lsoa as usize].code.as_str())),
        ),
        Col::Int("imd_quintile", imd),
        Col::Text(
            "housing_tenure",
            texts(residents.iter().map(|r| TENURES[r.tenure as usize])),
        ),
        Col::Bool(
            "fuel_poverty",
            residents.iter().map(|r| r.fuel_poverty).collect(),
        ),
        Col::Int("age", age),
        Col::Text("sex", sex),
        Col::Text("place", place),
        Col::Bool("ndopt_out", opt),
    ];
    write_parquet(path, cols)
}
