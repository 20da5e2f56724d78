-- OMOP Common Data Model 5.4: the five clinical tables phm-federation's OMOP views read
-- (person, observation_period, visit_occurrence, condition_occurrence, measurement), in
-- schema `cdm`, for PostgreSQL. Column names, order, types and nullability follow the
-- CDM 5.4 specification (https://ohdsi.github.io/CommonDataModel/cdm54.html); the
-- vocabulary tables and foreign keys are left out, as the tests load no vocabulary.
-- Used by the tests and `phm_devkit::synth::omop`; a partner's warehouse already has
-- these tables.

CREATE SCHEMA IF NOT EXISTS cdm;

CREATE TABLE cdm.person (
    person_id                   bigint       NOT NULL,
    gender_concept_id           integer      NOT NULL,
    year_of_birth               integer      NOT NULL,
    month_of_birth              integer      NULL,
    day_of_birth                integer      NULL,
    birth_datetime              timestamp    NULL,
    race_concept_id             integer      NOT NULL,
    ethnicity_concept_id        integer      NOT NULL,
    location_id                 bigint       NULL,
    provider_id                 bigint       NULL,
    care_site_id                bigint       NULL,
    person_source_value         varchar(50)  NULL,
    gender_source_value         varchar(50)  NULL,
    gender_source_concept_id    integer      NULL,
    race_source_value           varchar(50)  NULL,
    race_source_concept_id      integer      NULL,
    ethnicity_source_value      varchar(50)  NULL,
    ethnicity_source_concept_id integer      NULL,
    PRIMARY KEY (person_id)
);

CREATE TABLE cdm.observation_period (
    observation_period_id         bigint  NOT NULL,
    person_id                     bigint  NOT NULL,
    observation_period_start_date date    NOT NULL,
    observation_period_end_date   date    NOT NULL,
    period_type_concept_id        integer NOT NULL,
    PRIMARY KEY (observation_period_id)
);

CREATE TABLE cdm.visit_occurrence (
    visit_occurrence_id           bigint      NOT NULL,
    person_id                     bigint      NOT NULL,
    visit_concept_id              integer     NOT NULL,
    visit_start_date              date        NOT NULL,
    visit_start_datetime          timestamp   NULL,
    visit_end_date                date        NOT NULL,
    visit_end_datetime            timestamp   NULL,
    visit_type_concept_id         integer     NOT NULL,
    provider_id                   bigint      NULL,
    care_site_id                  bigint      NULL,
    visit_source_value            varchar(50) NULL,
    visit_source_concept_id       integer     NULL,
    admitted_from_concept_id      integer     NULL,
    admitted_from_source_value    varchar(50) NULL,
    discharged_to_concept_id      integer     NULL,
    discharged_to_source_value    varchar(50) NULL,
    preceding_visit_occurrence_id bigint      NULL,
    PRIMARY KEY (visit_occurrence_id)
);

CREATE TABLE cdm.condition_occurrence (
    condition_occurrence_id       bigint      NOT NULL,
    person_id                     bigint      NOT NULL,
    condition_concept_id          integer     NOT NULL,
    condition_start_date          date        NOT NULL,
    condition_start_datetime      timestamp   NULL,
    condition_end_date            date        NULL,
    condition_end_datetime        timestamp   NULL,
    condition_type_concept_id     integer     NOT NULL,
    condition_status_concept_id   integer     NULL,
    stop_reason                   varchar(20) NULL,
    provider_id                   bigint      NULL,
    visit_occurrence_id           bigint      NULL,
    visit_detail_id               bigint      NULL,
    condition_source_value        varchar(50) NULL,
    condition_source_concept_id   integer     NULL,
    condition_status_source_value varchar(50) NULL,
    PRIMARY KEY (condition_occurrence_id)
);

CREATE TABLE cdm.measurement (
    measurement_id                bigint      NOT NULL,
    person_id                     bigint      NOT NULL,
    measurement_concept_id        integer     NOT NULL,
    measurement_date              date        NOT NULL,
    measurement_datetime          timestamp   NULL,
    measurement_time              varchar(10) NULL,
    measurement_type_concept_id   integer     NOT NULL,
    operator_concept_id           integer     NULL,
    value_as_number               numeric     NULL,
    value_as_concept_id           integer     NULL,
    unit_concept_id               integer     NULL,
    range_low                     numeric     NULL,
    range_high                    numeric     NULL,
    provider_id                   bigint      NULL,
    visit_occurrence_id           bigint      NULL,
    visit_detail_id               bigint      NULL,
    measurement_source_value      varchar(50) NULL,
    measurement_source_concept_id integer     NULL,
    unit_source_value             varchar(50) NULL,
    unit_source_concept_id        integer     NULL,
    value_source_value            varchar(50) NULL,
    measurement_event_id          bigint      NULL,
    meas_event_field_concept_id   integer     NULL,
    PRIMARY KEY (measurement_id)
);

CREATE INDEX idx_visit_person ON cdm.visit_occurrence (person_id);
CREATE INDEX idx_condition_visit ON cdm.condition_occurrence (visit_occurrence_id);
