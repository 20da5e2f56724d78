-- The rows of dataset acute_admissions (policies/samples/fhir_trust.toml), from the
-- three views' tables: one row per inpatient admission, with the patient's attributes
-- and the group of the admission's ICD-10 diagnosis (the trust's grouping, as
-- phm_local.icd10_group in the OMOP view). Ages are whole years at the extract's
-- reference date, 2026-04-01: change both 2026 and '04-01' when the extract is
-- refreshed. Run by the node once at load, over its own tables only.
SELECT
    a.person_id,
    p.nhs_number,
    a.admission_id,
    a.admitted AS admission_date,
    CASE substr(a.admission_method, 1, 1)
        WHEN '1' THEN 'elective'
        WHEN '2' THEN 'emergency'
    END AS method,
    CASE
        WHEN d.icd10 LIKE 'I%' THEN 'circulatory'
        WHEN d.icd10 LIKE 'J%' THEN 'respiratory'
        WHEN d.icd10 LIKE 'E1%' THEN 'diabetes'
        WHEN d.icd10 LIKE 'F%' THEN 'mental_health'
        WHEN d.icd10 LIKE 'S%' OR d.icd10 LIKE 'T%' THEN 'injury'
        WHEN d.icd10 LIKE 'R%' THEN 'other'
    END AS diagnosis_group,
    CAST(date_part('day', CAST(a.discharged AS TIMESTAMP) - CAST(a.admitted AS TIMESTAMP)) AS BIGINT)
        AS length_of_stay,
    CAST(2026 - date_part('year', p.birth_date)
         - CASE WHEN to_char(p.birth_date, '%m-%d') > '04-01' THEN 1 ELSE 0 END AS BIGINT) AS age,
    CASE p.gender
        WHEN 'female' THEN 'F'
        WHEN 'male' THEN 'M'
        WHEN 'other' THEN 'U'
        WHEN 'unknown' THEN 'U'
    END AS sex,
    p.imd_quintile,
    p.place,
    p.ndopt_out
FROM admission a
LEFT JOIN patient p ON p.person_id = a.person_id
LEFT JOIN diagnosis d ON d.admission_id = a.admission_id
