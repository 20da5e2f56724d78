-- The view an acute trust's DBA writes so its node can answer over an OMOP CDM 5.4
-- warehouse (policies/samples/omop_trust.toml reads it as phm.acute_admissions), and
-- the role the node connects as. The node needs SELECT on this view and nothing else.
--
-- What is not in the CDM comes from three small tables the trust keeps beside it, in
-- schema phm_local:
--   icd10_group  ICD-10 prefix -> the policy's diagnosis_group (the trust's grouping)
--   person_area  person -> IMD quintile and Place of residence (from the LSOA of the
--                patient's address, through the published IMD 2019 lookup)
--   opt_out      person -> National Data Opt-out (TRUE: opted out; NULL: unknown, which
--                the node treats as opted out)
-- Ages are whole years at the extract's reference date (here 2026-04-01): change the
-- date when the extract is refreshed, so every figure is "age at the reference date".

CREATE SCHEMA IF NOT EXISTS phm_local;
CREATE SCHEMA IF NOT EXISTS phm;

CREATE TABLE IF NOT EXISTS phm_local.icd10_group (
    prefix          text PRIMARY KEY,
    diagnosis_group text NOT NULL
);
INSERT INTO phm_local.icd10_group VALUES
    ('I', 'circulatory'), ('J', 'respiratory'), ('E1', 'diabetes'),
    ('F', 'mental_health'), ('S', 'injury'), ('T', 'injury'), ('R', 'other')
ON CONFLICT DO NOTHING;

CREATE TABLE IF NOT EXISTS phm_local.person_area (
    person_source_value text PRIMARY KEY,
    imd_quintile        bigint,
    place               text
);

CREATE TABLE IF NOT EXISTS phm_local.opt_out (
    person_source_value text PRIMARY KEY,
    dissent             boolean
);

CREATE OR REPLACE VIEW phm.acute_admissions AS
SELECT
    p.person_source_value                                    AS person_id,
    v.visit_source_value                                     AS admission_id,
    v.visit_start_date                                       AS admission_date,
    CASE v.visit_concept_id
        WHEN 262  THEN 'emergency'  -- Emergency Room and Inpatient Visit
        WHEN 9203 THEN 'emergency'  -- Emergency Room Visit
        WHEN 9201 THEN 'elective'   -- Inpatient Visit
    END                                                      AS method,
    g.diagnosis_group,
    CAST(v.visit_end_date - v.visit_start_date AS bigint)    AS length_of_stay,
    CAST(date_part('year', age(DATE '2026-04-01', p.birth_datetime)) AS bigint) AS age,
    CASE p.gender_concept_id WHEN 8532 THEN 'F' WHEN 8507 THEN 'M' ELSE 'U' END AS sex,
    a.imd_quintile,
    a.place,
    o.dissent                                                AS ndopt_out
FROM cdm.visit_occurrence v
JOIN cdm.person p ON p.person_id = v.person_id
LEFT JOIN cdm.condition_occurrence c
       ON c.visit_occurrence_id = v.visit_occurrence_id
      AND c.condition_status_concept_id = 32902              -- primary diagnosis
LEFT JOIN phm_local.icd10_group g ON c.condition_source_value LIKE g.prefix || '%'
LEFT JOIN phm_local.person_area a ON a.person_source_value = p.person_source_value
LEFT JOIN phm_local.opt_out o ON o.person_source_value = p.person_source_value;

-- The node's role: it can read this view and nothing else (not the cdm tables, not
-- phm_local). Give it a password or a client certificate as your site requires.
DO $$ BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'phm_node') THEN
        CREATE ROLE phm_node LOGIN;
    END IF;
END $$;
GRANT USAGE ON SCHEMA phm TO phm_node;
GRANT SELECT ON phm.acute_admissions TO phm_node;
