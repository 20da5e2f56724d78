//! A synthetic acute trust's admissions as an OMOP CDM 5.4 warehouse: the rows of its
//! `acute_admissions` Parquet file are loaded with COPY into a staging table and turned,
//! in SQL as a trust's ETL would, into `cdm.person`, `cdm.observation_period`,
//! `cdm.visit_occurrence` and `cdm.condition_occurrence` (DDL: `tests/omop/ddl.sql`),
//! plus the trust's own lookups in `phm_local`; then the DBA's view
//! (`policies/samples/omop_trust_view.sql`) gives back `phm.acute_admissions`, which
//! `policies/samples/omop_trust.toml` reads. The same people, so the same question
//! asked of the Parquet file and of the view has the same exact answer.

use std::path::Path;

use datafusion::prelude::SessionContext;

use super::warehouse::copy_parquet;
use crate::postgres::Server;

/// The CDM tables' DDL.
pub const DDL: &str = include_str!("../../../tests/omop/ddl.sql");
/// The DBA's view and the node's role.
pub const VIEW: &str = include_str!("../../../policies/samples/omop_trust_view.sql");
/// The relation the sample policy names.
pub const RELATION: &str = "phm.acute_admissions";

/// The ETL from the staging table: ages become birth dates (whole years at the
/// reference date 2026-04-01, the view's), sexes gender concepts, methods visit
/// concepts, diagnosis groups primary-diagnosis ICD-10 codes.
const ETL: &str = "
INSERT INTO cdm.person (person_id, gender_concept_id, year_of_birth, month_of_birth,
    day_of_birth, birth_datetime, race_concept_id, ethnicity_concept_id,
    person_source_value, gender_source_value)
SELECT row_number() OVER (ORDER BY person_id),
       CASE sex WHEN 'F' THEN 8532 WHEN 'M' THEN 8507 ELSE 8551 END,
       CAST(extract(year FROM b) AS int), CAST(extract(month FROM b) AS int),
       CAST(extract(day FROM b) AS int), CAST(b AS timestamp), 0, 0, person_id, sex
FROM (SELECT DISTINCT ON (person_id) person_id, sex,
             CAST(DATE '2026-04-01' - make_interval(years => CAST(age AS int))
                  - make_interval(days => abs(hashtext(person_id)) % 365) AS date) AS b
      FROM stage_acute ORDER BY person_id, admission_id) AS s;

INSERT INTO cdm.observation_period
SELECT person_id, person_id, DATE '2016-04-01', DATE '2026-04-01', 32817 FROM cdm.person;

INSERT INTO cdm.visit_occurrence (visit_occurrence_id, person_id, visit_concept_id,
    visit_start_date, visit_end_date, visit_type_concept_id, visit_source_value,
    admitted_from_source_value)
SELECT row_number() OVER (ORDER BY s.admission_id), p.person_id,
       CASE s.method WHEN 'emergency' THEN 262 WHEN 'elective' THEN 9201 ELSE 0 END,
       s.admission_date, s.admission_date + CAST(s.length_of_stay AS int), 32817,
       s.admission_id, s.method
FROM stage_acute s JOIN cdm.person p ON p.person_source_value = s.person_id;

INSERT INTO cdm.condition_occurrence (condition_occurrence_id, person_id,
    condition_concept_id, condition_start_date, condition_type_concept_id,
    condition_status_concept_id, visit_occurrence_id, condition_source_value)
SELECT v.visit_occurrence_id, v.person_id, 0, v.visit_start_date, 32817, 32902,
       v.visit_occurrence_id,
       CASE s.diagnosis_group WHEN 'circulatory' THEN 'I50.9' WHEN 'respiratory' THEN 'J44.1'
            WHEN 'diabetes' THEN 'E11.9' WHEN 'mental_health' THEN 'F32.9'
            WHEN 'injury' THEN 'S72.0' ELSE 'R69' END
FROM cdm.visit_occurrence v JOIN stage_acute s ON s.admission_id = v.visit_source_value
WHERE s.diagnosis_group IS NOT NULL;

INSERT INTO phm_local.person_area
SELECT DISTINCT ON (person_id) person_id, imd_quintile, place
FROM stage_acute ORDER BY person_id, admission_id;

INSERT INTO phm_local.opt_out
SELECT DISTINCT ON (person_id) person_id, ndopt_out
FROM stage_acute ORDER BY person_id, admission_id;

DROP TABLE stage_acute;
";

/// Loads trust folder `org_dir`'s admissions into database `db` (which must exist and
/// be empty) as OMOP, with the view and the `phm_node` role. Returns the connection
/// string the node uses (as `phm_node`).
pub async fn load_trust(server: &Server, db: &str, org_dir: &Path) -> Result<String, String> {
    let parquet = org_dir.join("data").join("acute_admissions.parquet");
    let ctx = SessionContext::new();
    copy_parquet(server, db, &ctx, &parquet, "stage_acute", org_dir).await?;
    let script = org_dir.join("omop.sql");
    std::fs::write(&script, format!("{DDL}\n{VIEW}\n{ETL}\nANALYZE;\n"))
        .map_err(|e| format!("cannot write {}: {e}", script.display()))?;
    let loaded = server.psql_file(db, &script);
    let _ = std::fs::remove_file(&script);
    loaded?;
    Ok(server.dsn_as(db, "phm_node"))
}
