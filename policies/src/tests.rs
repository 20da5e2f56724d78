//! Unit tests: every validation error kind and every refusal kind, table-style, so a new
//! case is one line; plus error locations and the limits an allowed query gets.

use crate::decision::{Decision, GroupDomain, RefusalKind};
use crate::{Policy, PolicyErrors, decide, explain};
use chrono::{DateTime, Utc};
use phm_proto::{
    Aggregate, AggregateKind, CompareOp, GroupKey, Literal, Predicate, Purpose, QueryBody,
};
use std::sync::LazyLock;
use toml_edit::{ArrayOfTables, DocumentMut};

/// The GP practice sample, the one policy fixture. These tests mutate its text and check
/// where errors are located, so it is edited with `toml_edit`, which keeps its layout.
const SAMPLE: &str = include_str!("../samples/gp_practice.toml");

/// The `gp_patients` columns the tests use, in the order their field paths
/// (`datasets[0].columns[N]`) name them.
const COLUMNS: &[&str] = &[
    "person_id",
    "nhs_number",
    "age",
    "sex",
    "imd_quintile",
    "place",
    "bmi",
    "diabetes",
    "admission_date",
    "lsoa",
    "ndopt_out",
];

/// A column the sample lacks: its one date (date of birth) is an identifier, and the
/// date cases need a filterable date that is not a group key.
const ADMISSION_DATE: &str = r#"
  [[datasets.columns]]
  name = "admission_date"
  type = "date"
  filter = true
"#;

/// What the tests add after the sample's dataset: a second dataset (for the dataset
/// and project-dataset refusals) and their own requesters and projects, whose purposes,
/// caps and dates the refusal cases are written against (a revoked requester, an
/// expired project, per-query caps below the node's).
const PARTIES: &str = r#"
[[datasets]]
name = "registry"
source = { format = "csv", path = "registry.csv" }
person_id = "pid"
max_rows_per_person = 1
opt_out_not_applicable = true

  [[datasets.columns]]
  name = "pid"
  type = "text"
  identifier = true

  [[datasets.columns]]
  name = "stage"
  type = "integer"
  filter = true
  group = "declared"
  domain = [1, 2, 3, 4]

[[requesters]]
id = "dsu"
organisation = "Riverside ICB"
role = "analyst"
public_key = "HQg41spvMn5Y3pkUXqMDS9Tect5VyKOiUK/57KoVFFA="
purposes = ["planning", "direct_care"]
datasets = ["gp_patients"]
budget = { epsilon = 10.0, period = "month", per_query_cap = 0.8 }

[[requesters]]
id = "res"
organisation = "University of Riverside"
role = "researcher"
public_key = "684v9yMIBvCEwBmPz/fit/uhIgdzWmGcIbOkwmU6gPQ="
purposes = ["research"]
datasets = ["gp_patients", "registry"]
budget = { epsilon = 4.0, period = "quarter", per_query_cap = 0.6 }

[[requesters]]
id = "old"
organisation = "Riverside ICB"
role = "former analyst"
public_key = "I6CMQX252ee2SZ6zVhdxolQY8JBpTFvaHjf7YuDNejo="
purposes = ["planning"]
datasets = ["gp_patients"]
budget = { epsilon = 1.0, period = "day", per_query_cap = 0.5 }
revoked = true

[[projects]]
id = "proj"
approval_ref = "IRAS 312345"
lead = "res"
requesters = ["res"]
datasets = ["gp_patients"]
columns = ["age", "sex", "diabetes", "imd_quintile", "bmi"]
expires = 2027-03-31
budget = { epsilon = 3.0, period = "quarter", per_query_cap = 0.4 }

[[projects]]
id = "expired"
approval_ref = "IRAS 200000"
lead = "res"
requesters = ["res"]
datasets = ["gp_patients"]
columns = ["age"]
expires = 2026-01-31
budget = { epsilon = 3.0, period = "quarter", per_query_cap = 0.4 }
"#;

/// The base policy's text: the sample with the columns above, BMI in four classes (the
/// limits test checks them), no explicit mechanism (the Gaussian tests add one) and the
/// tests' parties in place of the sample's.
static BASE: LazyLock<String> = LazyLock::new(|| {
    let mut doc: DocumentMut = SAMPLE.parse().expect("the GP sample parses");
    doc["release"]
        .as_table_mut()
        .expect("[release]")
        .remove("mechanism");
    let extra: DocumentMut = ADMISSION_DATE.parse().expect("a column");
    let admission_date = extra["datasets"]["columns"]
        .as_array_of_tables()
        .and_then(|a| a.get(0))
        .expect("the added column")
        .clone();
    let columns = doc["datasets"][0]["columns"]
        .as_array_of_tables_mut()
        .expect("gp_patients columns");
    let first = columns.iter().filter_map(|t| t.position()).min();
    let mut kept = ArrayOfTables::new();
    for (i, name) in COLUMNS.iter().enumerate() {
        let mut t = if *name == "admission_date" {
            admission_date.clone()
        } else {
            columns
                .iter()
                .find(|t| t["name"].as_str() == Some(name))
                .unwrap_or_else(|| panic!("the GP sample has no column {name}"))
                .clone()
        };
        if *name == "bmi" {
            t["bin_edges"] = toml_edit::value(
                "[10, 18.5, 25, 30, 70]"
                    .parse::<toml_edit::Value>()
                    .expect("edges"),
            );
        }
        // Printed in document position order: the order above.
        t.set_position(first.map(|p| p + i as isize));
        kept.push(t);
    }
    *columns = kept;
    doc.remove("requesters");
    doc.remove("projects");
    format!("{doc}{PARTIES}")
});

fn base() -> Policy {
    match Policy::parse("base.toml", &BASE) {
        Ok(p) => p,
        Err(e) => panic!("base policy must be valid:\n{e}"),
    }
}

/// Apply `(from, to)` to BASE; an empty `from` appends `to`.
fn mutate(from: &str, to: &str) -> String {
    if from.is_empty() {
        return format!("{}\n{to}\n", *BASE);
    }
    assert!(BASE.contains(from), "BASE does not contain {from:?}");
    BASE.replacen(from, to, 1)
}

fn errors(text: &str) -> PolicyErrors {
    match Policy::parse("t.toml", text) {
        Ok(_) => panic!("expected errors for:\n{text}"),
        Err(e) => e,
    }
}

#[test]
fn base_policy_is_valid_and_versioned_by_content() {
    let p = base();
    assert_eq!(p.version().len(), 64);
    let q = Policy::parse("x", &format!("{}\n# comment", *BASE)).unwrap();
    assert_ne!(p.version(), q.version());
    assert!(p.requester_key("dsu").is_some());
    assert!(p.requester_key("nobody").is_none());
}

/// (mutation from, mutation to, expected message fragment, expected field path)
const VALIDATION_CASES: &[(&str, &str, &str, &str)] = &[
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"postgres\", relation = \"gp; drop table x\", dsn_env = \"PHM_DSN\" }",
        "must be `name` or `schema.name`",
        "datasets[0].source.relation",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"postgres\", relation = \"a.b.c\", dsn_env = \"PHM_DSN\" }",
        "must be `name` or `schema.name`",
        "datasets[0].source.relation",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"postgres\", relation = \"gp\" }",
        "needs dsn_env",
        "datasets[0].source",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"postgres\", relation = \"gp\", dsn_env = \"A\", dsn_file = \"f\" }",
        "not both",
        "datasets[0].source",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"postgres\", relation = \"gp\", dsn_env = \"1-X\" }",
        "is not an environment variable name",
        "datasets[0].source.dsn_env",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"postgres\", relation = \"gp\", dsn_env = \"A\", statement_timeout_seconds = 0 }",
        "must be between 1 and 86400",
        "datasets[0].source.statement_timeout_seconds",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"postgres\", relation = \"gp\", dsn_env = \"A\", ca_file = \" \" }",
        "ca_file is empty",
        "datasets[0].source.ca_file",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"postgres\", relation = \"gp\", dsn_env = \"A\", password = \"p\" }",
        "unknown field `password`",
        "datasets[0].source",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"fhir_ndjson\", views = [\"v.json\"] }",
        "needs manifest",
        "datasets[0].source",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"fhir_ndjson\", manifest = \"m.json\", files = [\"x\"], views = [\"v.json\"] }",
        "not both",
        "datasets[0].source",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"fhir_ndjson\", manifest = \"m.json\", views = [] }",
        "at least one view",
        "datasets[0].source.views",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"fhir_ndjson\", manifest = \"m.json\", views = [\"a.json\", \"b.json\"] }",
        "2 views need a query",
        "datasets[0].source.query",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"fhir_ndjson\", files = [\" \"], views = [\"v.json\"] }",
        "file path is empty",
        "datasets[0].source.files[0]",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"fhir_ndjson\", manifest = \"m.json\", views = [\"v.json\"], query = \"\" }",
        "query is empty",
        "datasets[0].source.query",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"fhir_ndjson\", manifest = \"m.json\", views = [\"v.json\"], paths = [\"x\"] }",
        "unknown field `paths`",
        "datasets[0].source",
    ),
    (
        "source = { format = \"parquet\", path = \"data/gp_patients.parquet\" }",
        "source = { format = \"oracle\", relation = \"gp\" }",
        "unknown variant `oracle`",
        "datasets[0].source.format",
    ),
    (
        "version = 1",
        "version = 2",
        "version 2 is not supported",
        "version",
    ),
    (
        "ods_code = \"A81001\"",
        "ods_code = \"A8 1001\"",
        "ODS code",
        "organisation.ods_code",
    ),
    (
        "name = \"sex\"",
        "name = \"age\"",
        "column \"age\" is declared twice",
        "datasets[0].columns[3].name",
    ),
    (
        "name = \"registry\"",
        "name = \"gp_patients\"",
        "dataset \"gp_patients\" is declared twice",
        "datasets[1].name",
    ),
    (
        "id = \"old\"",
        "id = \"dsu\"",
        "requester \"dsu\" is declared twice",
        "requesters[2].id",
    ),
    (
        "id = \"expired\"",
        "id = \"proj\"",
        "project \"proj\" is declared twice",
        "projects[1].id",
    ),
    (
        "name = \"place\"",
        "name = \"pla ce\"",
        "contains ' '",
        "datasets[0].columns[5].name",
    ),
    (
        "bounds = [0, 110]",
        "bounds = [110, 0]",
        "bounds [110, 0] must be finite with lower below upper",
        "datasets[0].columns[2].bounds",
    ),
    (
        "bounds = [0, 110]",
        "bounds = [0, inf]",
        "must be finite",
        "datasets[0].columns[2].bounds",
    ),
    (
        "type = \"date\"\n  filter = true",
        "type = \"date\"\n  filter = true\n  bounds = [0, 1]",
        "bounds apply to integer or real",
        "datasets[0].columns[8].bounds",
    ),
    (
        "domain = [\"F\", \"M\", \"U\"]",
        "domain = []",
        "domain is empty",
        "datasets[0].columns[3].domain",
    ),
    (
        "domain = [\"F\", \"M\", \"U\"]",
        "domain = [\"F\", \"M\", \"F\"]",
        "lists \"F\" twice",
        "datasets[0].columns[3].domain",
    ),
    (
        "domain = [\"F\", \"M\", \"U\"]",
        "domain = [1, 2]",
        "domain holds integer values but the column is text",
        "datasets[0].columns[3].domain",
    ),
    (
        "domain = \"1..5\"",
        "domain = \"5..1\"",
        "range \"5..1\" is empty",
        "datasets[0].columns[4].domain",
    ),
    (
        "domain = \"1..5\"",
        "domain = \"1-5\"",
        "must be written \"low..high\"",
        "datasets[0].columns[4].domain",
    ),
    (
        "domain = \"1..5\"",
        "domain = \"1..100000\"",
        "at most 10000",
        "datasets[0].columns[4].domain",
    ),
    (
        "domain = \"1..5\"",
        "domain = [1.5, 2]",
        "a domain is an integer range",
        "datasets[0].columns[4].domain",
    ),
    (
        "bin_edges = [10, 18.5, 25, 30, 70]",
        "bin_edges = [10, 25, 18.5, 70]",
        "strictly increasing (25 then 18.5)",
        "datasets[0].columns[6].bin_edges",
    ),
    (
        "bin_edges = [10, 18.5, 25, 30, 70]",
        "bin_edges = [10]",
        "between 2 and",
        "datasets[0].columns[6].bin_edges",
    ),
    (
        "domain = [\"F\", \"M\", \"U\"]",
        "bin_edges = [1, 2]",
        "bin_edges apply to integer or real",
        "datasets[0].columns[3].bin_edges",
    ),
    (
        "domain = \"1..5\"",
        "domain = \"1..5\"\n  bin_edges = [1, 2]",
        "either domain or bin_edges",
        "datasets[0].columns[4].bin_edges",
    ),
    (
        "min_bin_width = 5",
        "min_bin_width = 0",
        "min_bin_width 0 must be",
        "datasets[0].columns[2].min_bin_width",
    ),
    (
        "domain = [\"F\", \"M\", \"U\"]",
        "",
        "group = \"declared\" needs a domain",
        "datasets[0].columns[3].group",
    ),
    (
        "delta = 1e-9",
        "delta = 0.0",
        "group = \"threshold\" needs release.delta above 0",
        "datasets[0].columns[5].group",
    ),
    (
        "bounds = [10, 70]",
        "",
        "aggregate = true needs bounds",
        "datasets[0].columns[6].bounds",
    ),
    (
        "domain = [\"F\", \"M\", \"U\"]",
        "domain = [\"F\", \"M\", \"U\"]\n  aggregate = true",
        "only integer or real columns can be aggregated",
        "datasets[0].columns[3].aggregate",
    ),
    (
        "epsilon = 10.0",
        "epsilon = 0.0",
        "budget epsilon 0 must be a finite number above 0",
        "requesters[0].budget.epsilon",
    ),
    (
        "per_query_cap = 0.8",
        "per_query_cap = 20.0",
        "per_query_cap 20 is above the budget's epsilon 10 per month",
        "requesters[0].budget.per_query_cap",
    ),
    (
        "per_query_cap = 0.8",
        "per_query_cap = -1.0",
        "per_query_cap -1 must be",
        "requesters[0].budget.per_query_cap",
    ),
    (
        "per_query_epsilon_cap = 1.0",
        "per_query_epsilon_cap = 0.0",
        "per_query_epsilon_cap 0 must be",
        "release.per_query_epsilon_cap",
    ),
    (
        "delta = 1e-9",
        "delta = 0.01",
        "delta 0.01 must be at least 0 and below 0.001",
        "release.delta",
    ),
    (
        "min_reportable_count = 7",
        "min_reportable_count = -1",
        "min_reportable_count -1",
        "release.min_reportable_count",
    ),
    (
        "max_group_cells = 500",
        "max_group_cells = 0",
        "max_group_cells must be at least 1",
        "release.max_group_cells",
    ),
    (
        "expires = 2027-03-31",
        "expires = 2027-03-31T10:00:00",
        "must be a calendar date without a time",
        "projects[0].expires",
    ),
    (
        "expires = 2027-03-31",
        "expires = 2027-02-30",
        "invalid date, expected day between 01 and 28",
        "projects[0].expires",
    ),
    (
        "expires = 2027-03-31",
        "expires = \"2027-03-31\"",
        "write a TOML date",
        "projects[0].expires",
    ),
    (
        "HQg41spvMn5Y3pkUXqMDS9Tect5VyKOiUK/57KoVFFA=",
        "not-a-key!",
        "public key is not valid base64",
        "requesters[0].public_key",
    ),
    (
        "HQg41spvMn5Y3pkUXqMDS9Tect5VyKOiUK/57KoVFFA=",
        "AAAA",
        "public key must be 32 bytes",
        "requesters[0].public_key",
    ),
    (
        "purposes = [\"planning\", \"direct_care\"]",
        "purposes = [\"planning\", \"marketing\"]",
        "requester \"dsu\": purpose \"marketing\" is not one of direct_care, planning, research",
        "requesters[0].purposes[1]",
    ),
    (
        "purposes = [\"planning\", \"direct_care\"]",
        "purposes = []",
        "no purposes listed",
        "requesters[0].purposes",
    ),
    (
        "datasets = [\"gp_patients\", \"registry\"]",
        "datasets = [\"gp_patients\", \"hes\"]",
        "dataset \"hes\" is not declared (declared: gp_patients, registry)",
        "requesters[1].datasets[1]",
    ),
    (
        "lead = \"res\"",
        "lead = \"bob\"",
        "lead \"bob\" is not a declared requester",
        "projects[0].lead",
    ),
    (
        "requesters = [\"res\"]",
        "requesters = [\"res\", \"eve\"]",
        "requester \"eve\" is not declared",
        "projects[0].requesters[1]",
    ),
    (
        "columns = [\"age\", \"sex\"",
        "columns = [\"age\", \"weight\"",
        "column \"weight\" is in none of the project's datasets",
        "projects[0].columns[1]",
    ),
    (
        "datasets = [\"gp_patients\"]\ncolumns = [\"age\", \"sex\"",
        "datasets = [\"gp\"]\ncolumns = [\"age\", \"sex\"",
        "dataset \"gp\" is not declared",
        "projects[0].datasets[0]",
    ),
    (
        "column = \"ndopt_out\"",
        "column = \"nd_opt\"",
        "dataset \"gp_patients\": has no opt-out column \"nd_opt\"",
        "datasets[0].columns",
    ),
    (
        "column = \"ndopt_out\"",
        "column = \"lsoa\"",
        "opt-out column \"lsoa\" must be boolean",
        "opt_out.column",
    ),
    (
        "purposes = [\"planning\", \"research\"]",
        "purposes = [\"planning\", \"audit\"]",
        "opt-out purpose \"audit\"",
        "opt_out.purposes[1]",
    ),
    (
        "person_id = \"person_id\"",
        "person_id = \"patient\"",
        "person_id column \"patient\" is not among the columns",
        "datasets[0].person_id",
    ),
    (
        "person_id = \"person_id\"",
        "person_id = \"lsoa\"",
        "must be marked identifier = true",
        "datasets[0].person_id",
    ),
    (
        "type = \"text\"\n  identifier = true\n\n  [[datasets.columns]]\n  name = \"age\"",
        "type = \"text\"\n  identifier = true\n  filter = true\n\n  [[datasets.columns]]\n  name = \"age\"",
        "an identifier column can never be filtered",
        "datasets[0].columns[1].filter",
    ),
    (
        "max_rows_per_person = 1\n",
        "max_rows_per_person = 0\n",
        "max_rows_per_person 0 must be between 1 and",
        "datasets[0].max_rows_per_person",
    ),
    (
        "approval_ref = \"IRAS 312345\"",
        "approval_ref = \"\"",
        "approval_ref is empty",
        "projects[0].approval_ref",
    ),
    // Structural errors (serde), located too.
    (
        "registered_population = 9840",
        "registered_population = 9840\nnmae = \"x\"",
        "unknown field `nmae`, expected one of",
        "organisation.nmae",
    ),
    (
        "version = 1",
        "colour = \"blue\"\nversion = 1",
        "unknown field `colour`, expected one of version",
        "colour",
    ),
    (
        "max_rows_per_person = 1\n",
        "max_rows_per_person = \"one\"\n",
        "invalid type: string \"one\"",
        "datasets[0].max_rows_per_person",
    ),
    (
        "kind = \"gp_practice\"",
        "kind = \"gp_surgery\"",
        "unknown variant `gp_surgery`, expected one of `gp_practice`",
        "organisation.kind",
    ),
    (
        "type = \"boolean\"\n  filter = true",
        "type = \"bool\"\n  filter = true",
        "unknown variant `bool`",
        "datasets[0].columns[7].type",
    ),
    (
        "period = \"month\"",
        "period = \"week\"",
        "unknown variant `week`",
        "requesters[0].budget.period",
    ),
    (
        "role = \"analyst\"\n",
        "",
        "missing field `role`",
        "requesters[0]",
    ),
    ("version = 1\n", "", "missing field `version`", "version"),
    (
        "",
        "[[requesters]]\nid = 3",
        "invalid type: integer `3`",
        "requesters[3].id",
    ),
];

#[test]
fn a_postgres_source_parses_with_its_defaults() {
    let text = mutate(
        "source = { format = \"csv\", path = \"registry.csv\" }",
        "source = { format = \"postgres\", relation = \"omop.phm_gp\", dsn_file = \"secrets/dsn\" }",
    );
    let p = match Policy::parse("pg.toml", &text) {
        Ok(p) => p,
        Err(e) => panic!("a postgres source must be valid:\n{e}"),
    };
    let ds = &p.file().datasets[1];
    let w = ds.source.warehouse().expect("a warehouse source");
    assert_eq!(w.relation, "omop.phm_gp");
    assert_eq!(w.dsn_file.as_deref(), Some("secrets/dsn"));
    assert_eq!(w.statement_timeout_seconds, 300);
    assert!(ds.source.file_path().is_none());
}

#[test]
fn a_fhir_source_parses() {
    let text = mutate(
        "source = { format = \"csv\", path = \"registry.csv\" }",
        "source = { format = \"fhir_ndjson\", files = [\"export/\"], views = [\"patient.json\"] }",
    );
    let p = match Policy::parse("fhir.toml", &text) {
        Ok(p) => p,
        Err(e) => panic!("a fhir_ndjson source must be valid:\n{e}"),
    };
    let ds = &p.file().datasets[1];
    let crate::model::Source::FhirNdjson(f) = &ds.source else {
        panic!("a FHIR source")
    };
    assert_eq!(f.files, ["export/"]);
    assert_eq!((f.manifest.as_deref(), f.query.as_deref()), (None, None));
    assert!(ds.source.file_path().is_none() && ds.source.warehouse().is_none());
}

#[test]
fn every_validation_error_is_reported_with_its_field() {
    let mut failures = Vec::new();
    for (from, to, message, field) in VALIDATION_CASES {
        let errs = errors(&mutate(from, to));
        let hit = errs
            .0
            .iter()
            .any(|e| e.message.contains(message) && e.field == *field);
        if !hit {
            failures.push(format!(
                "{from:?} -> {to:?}: expected {message:?} at {field}, got:\n{errs}"
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn line_col(text: &str, needle: &str) -> (usize, usize) {
    let offset = text.find(needle).unwrap();
    let line = text[..offset].matches('\n').count() + 1;
    let col = offset - text[..offset].rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

#[test]
fn errors_carry_file_line_and_column_of_the_offending_value() {
    let text = mutate(
        "purposes = [\"planning\", \"direct_care\"]",
        "purposes = [\"planning\", \"marketing\"]",
    );
    let e = &errors(&text).0[0];
    assert_eq!(e.file, "t.toml");
    assert_eq!((e.line, e.column), line_col(&text, "\"marketing\""));
    assert_eq!(
        e.to_string(),
        format!(
            "t.toml:{}:{}: requester \"dsu\": purpose \"marketing\" is not one of direct_care, \
             planning, research (at requesters[0].purposes[1])",
            e.line, e.column
        )
    );

    let text = mutate(
        "registered_population = 9840",
        "registered_population = 9840\nnmae = \"x\"",
    );
    let e = &errors(&text).0[0];
    assert_eq!((e.line, e.column), line_col(&text, "nmae"));

    let text = mutate("bounds = [0, 110]", "bounds = [110, 0]");
    let e = &errors(&text).0[0];
    assert_eq!((e.line, e.column), line_col(&text, "[110, 0]"));

    // A syntax error: an unterminated string on line 2.
    let e = &errors("version = 1\nname = \"abc\n").0[0];
    assert_eq!(e.line, 2);
    assert!(e.message.starts_with("TOML syntax"), "{}", e.message);
    assert_eq!(e.field, "name");
}

#[test]
fn all_problems_are_reported_at_once_in_file_order() {
    let text = mutate("version = 1", "version = 3")
        .replacen("bounds = [0, 110]", "bounds = [110, 0]", 1)
        .replacen("\"direct_care\"]", "\"marketing\"]", 1)
        .replacen("lead = \"res\"", "lead = \"bob\"", 1);
    let errs = errors(&text);
    assert_eq!(errs.0.len(), 4, "{errs}");
    let lines: Vec<usize> = errs.0.iter().map(|e| e.line).collect();
    let mut sorted = lines.clone();
    sorted.sort();
    assert_eq!(lines, sorted);

    // Structural errors in different sections are all reported too.
    let text = mutate("kind = \"gp_practice\"", "kind = \"surgery\"")
        .replacen("period = \"month\"", "period = \"week\"", 1)
        .replacen(
            "type = \"boolean\"\n  filter = true",
            "type = \"bool\"\n  filter = true",
            1,
        );
    assert_eq!(errors(&text).0.len(), 3, "{}", errors(&text));
}

#[test]
fn hostile_inputs_are_errors_not_panics() {
    for text in [
        "",
        "\u{0}",
        "[[datasets]]\n[[datasets.columns]]\nname = 1",
        "datasets = 3",
        "datasets = [1, 2]",
        "[[datasets]]\ncolumns = 7",
        "version = -1",
        "version = 99999999999999",
        "[organisation\n",
        "a = { b = { c = { d = 1 } } }",
    ] {
        assert!(Policy::parse("h.toml", text).is_err(), "{text:?}");
    }
}

// ------------------------------------------------------------------------------------
// Decisions.

fn now() -> DateTime<Utc> {
    DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
        .unwrap()
        .with_timezone(&Utc)
}

fn count() -> Aggregate {
    Aggregate {
        alias: "n".into(),
        kind: AggregateKind::Count,
        column: None,
    }
}

fn query() -> QueryBody {
    QueryBody {
        federation_id: "ics-test".into(),
        query_id: "q1".into(),
        requester_id: "dsu".into(),
        purpose: Purpose::Planning,
        project_id: None,
        dataset: "gp_patients".into(),
        filter: Some(Predicate::All(vec![
            Predicate::Compare {
                column: "age".into(),
                op: CompareOp::Ge,
                value: Literal::Integer(40),
            },
            Predicate::Compare {
                column: "diabetes".into(),
                op: CompareOp::Eq,
                value: Literal::Boolean(true),
            },
        ])),
        group_by: vec![
            GroupKey::Column("imd_quintile".into()),
            GroupKey::Bin {
                column: "age".into(),
                width: 10.0,
            },
        ],
        aggregates: vec![
            count(),
            Aggregate {
                alias: "avg_bmi".into(),
                kind: AggregateKind::Mean,
                column: Some("bmi".into()),
            },
        ],
        epsilon: 0.5,
        issued_at_unix_ms: 1,
        nonce: vec![1; 16],
        linkage: None,
        aggregation: Default::default(),
    }
}

fn research(q: &mut QueryBody) {
    q.requester_id = "res".into();
    q.purpose = Purpose::Research;
    q.project_id = Some("proj".into());
    q.epsilon = 0.3;
}

fn filter(q: &mut QueryBody, p: Predicate) {
    q.filter = Some(p);
}

fn cmp(column: &str, op: CompareOp, value: Literal) -> Predicate {
    Predicate::Compare {
        column: column.into(),
        op,
        value,
    }
}

type Case = (&'static str, fn(&mut QueryBody), RefusalKind);

const REFUSAL_CASES: &[Case] = &[
    (
        "thresholded key with too small an epsilon share",
        |q| {
            q.group_by = vec![GroupKey::Column("place".into())];
            q.epsilon = 0.01;
        },
        RefusalKind::ThresholdEpsilonTooSmall,
    ),
    (
        "unknown requester",
        |q| q.requester_id = "mallory".into(),
        RefusalKind::UnknownRequester,
    ),
    (
        "revoked",
        |q| q.requester_id = "old".into(),
        RefusalKind::RequesterRevoked,
    ),
    (
        "purpose",
        |q| q.purpose = Purpose::Research,
        RefusalKind::PurposeNotPermitted,
    ),
    (
        "dataset not permitted",
        |q| {
            q.dataset = "registry".into();
            q.filter = None;
            q.group_by = vec![];
            q.aggregates = vec![count()];
        },
        RefusalKind::DatasetNotPermitted,
    ),
    (
        "unknown dataset",
        |q| q.dataset = "hes".into(),
        RefusalKind::UnknownDataset,
    ),
    (
        "unknown column",
        |q| q.group_by.push(GroupKey::Column("weight".into())),
        RefusalKind::UnknownColumn,
    ),
    (
        "identifier grouped",
        |q| q.group_by.push(GroupKey::Column("nhs_number".into())),
        RefusalKind::IdentifierColumn,
    ),
    (
        "identifier filtered",
        |q| {
            filter(
                q,
                Predicate::IsNull {
                    column: "person_id".into(),
                    negated: false,
                },
            )
        },
        RefusalKind::IdentifierColumn,
    ),
    (
        "identifier summed",
        |q| {
            q.aggregates.push(Aggregate {
                alias: "s".into(),
                kind: AggregateKind::Sum,
                column: Some("nhs_number".into()),
            })
        },
        RefusalKind::IdentifierColumn,
    ),
    (
        "not filterable",
        |q| {
            filter(
                q,
                cmp("lsoa", CompareOp::Eq, Literal::Text("E01000001".into())),
            )
        },
        RefusalKind::NotFilterable,
    ),
    (
        "not groupable",
        |q| q.group_by = vec![GroupKey::Column("lsoa".into())],
        RefusalKind::NotGroupable,
    ),
    (
        "real needs bin",
        |q| q.group_by = vec![GroupKey::Column("admission_date".into())],
        RefusalKind::NotGroupable,
    ),
    (
        "not aggregatable",
        |q| {
            q.aggregates.push(Aggregate {
                alias: "s".into(),
                kind: AggregateKind::Sum,
                column: Some("imd_quintile".into()),
            })
        },
        RefusalKind::NotAggregatable,
    ),
    (
        "text literal on integer",
        |q| filter(q, cmp("age", CompareOp::Gt, Literal::Text("forty".into()))),
        RefusalKind::TypeMismatch,
    ),
    (
        "number on text",
        |q| {
            filter(
                q,
                Predicate::InList {
                    column: "sex".into(),
                    values: vec![Literal::Integer(1)],
                    negated: false,
                },
            )
        },
        RefusalKind::TypeMismatch,
    ),
    (
        "bad date",
        |q| {
            filter(
                q,
                cmp(
                    "admission_date",
                    CompareOp::Ge,
                    Literal::Text("23/11/2026".into()),
                ),
            )
        },
        RefusalKind::TypeMismatch,
    ),
    (
        "ordered boolean",
        |q| filter(q, cmp("diabetes", CompareOp::Gt, Literal::Boolean(false))),
        RefusalKind::TypeMismatch,
    ),
    (
        "avg of text",
        |q| {
            q.aggregates.push(Aggregate {
                alias: "a".into(),
                kind: AggregateKind::Mean,
                column: Some("sex".into()),
            })
        },
        RefusalKind::TypeMismatch,
    ),
    (
        "bin of text",
        |q| {
            q.group_by = vec![GroupKey::Bin {
                column: "sex".into(),
                width: 5.0,
            }]
        },
        RefusalKind::TypeMismatch,
    ),
    (
        "bin too narrow",
        |q| {
            q.group_by = vec![GroupKey::Bin {
                column: "age".into(),
                width: 1.0,
            }]
        },
        RefusalKind::BinTooNarrow,
    ),
    (
        "single ages",
        |q| q.group_by = vec![GroupKey::Column("age".into())],
        RefusalKind::BinTooNarrow,
    ),
    (
        "too many cells",
        |q| {
            q.group_by = vec![
                GroupKey::Bin {
                    column: "age".into(),
                    width: 5.0,
                },
                GroupKey::Column("imd_quintile".into()),
                GroupKey::Column("sex".into()),
                GroupKey::Column("diabetes".into()),
            ]
        },
        RefusalKind::TooManyCells,
    ),
    (
        "project required",
        |q| {
            research(q);
            q.project_id = None;
        },
        RefusalKind::ProjectRequired,
    ),
    (
        "unknown project",
        |q| {
            research(q);
            q.project_id = Some("x".into());
        },
        RefusalKind::UnknownProject,
    ),
    (
        "project not for requester",
        |q| {
            q.purpose = Purpose::Research;
            q.project_id = Some("proj".into());
        },
        RefusalKind::ProjectNotForRequester,
    ),
    (
        "project expired",
        |q| {
            research(q);
            q.project_id = Some("expired".into());
        },
        RefusalKind::ProjectExpired,
    ),
    (
        "project dataset",
        |q| {
            research(q);
            q.dataset = "registry".into();
            q.filter = None;
            q.group_by = vec![GroupKey::Column("stage".into())];
            q.aggregates = vec![count()];
        },
        RefusalKind::ProjectDatasetNotApproved,
    ),
    (
        "project column",
        |q| {
            research(q);
            q.group_by.push(GroupKey::Column("place".into()));
        },
        RefusalKind::ProjectColumnNotApproved,
    ),
    (
        "project on planning",
        |q| q.project_id = Some("proj".into()),
        RefusalKind::ProjectOnlyForResearch,
    ),
    (
        "epsilon zero",
        |q| q.epsilon = 0.0,
        RefusalKind::EpsilonInvalid,
    ),
    (
        "epsilon nan",
        |q| q.epsilon = f64::NAN,
        RefusalKind::EpsilonInvalid,
    ),
    (
        "over requester cap",
        |q| q.epsilon = 0.9,
        RefusalKind::EpsilonOverCap,
    ),
    (
        "over node cap",
        |q| q.epsilon = 1.5,
        RefusalKind::EpsilonOverCap,
    ),
    (
        "over project cap",
        |q| {
            research(q);
            q.epsilon = 0.5;
        },
        RefusalKind::EpsilonOverCap,
    ),
    (
        "quantile",
        |q| {
            q.aggregates.push(Aggregate {
                alias: "m".into(),
                kind: AggregateKind::Quantile(0.5),
                column: Some("age".into()),
            })
        },
        RefusalKind::UnsupportedAggregate,
    ),
    (
        "count of column",
        |q| {
            q.aggregates = vec![Aggregate {
                alias: "c".into(),
                kind: AggregateKind::Count,
                column: Some("age".into()),
            }]
        },
        RefusalKind::UnsupportedAggregate,
    ),
];

fn refusals(q: &QueryBody) -> Vec<RefusalKind> {
    refusals_under(&base(), q)
}

fn refusals_under(p: &Policy, q: &QueryBody) -> Vec<RefusalKind> {
    match decide(p, q, now()) {
        Decision::Allow(_) => Vec::new(),
        Decision::Deny(r) => r.into_iter().map(|r| r.kind).collect(),
    }
}

#[test]
fn the_base_query_is_allowed() {
    assert_eq!(refusals(&query()), vec![]);
    let mut q = query();
    research(&mut q);
    assert_eq!(refusals(&q), vec![]);
}

#[test]
fn every_refusal_kind_is_produced_by_its_case() {
    let mut failures = Vec::new();
    for (name, change, kind) in REFUSAL_CASES {
        let mut q = query();
        change(&mut q);
        let got = refusals(&q);
        if !got.contains(kind) {
            failures.push(format!("{name}: expected {kind:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn opt_out_missing_is_refused() {
    // No [opt_out] section and a dataset with patient rows: planning cannot run.
    let text = BASE.replacen(
        "[opt_out]\ncolumn = \"ndopt_out\"\npurposes = [\"planning\", \"research\"]\n",
        "",
        1,
    );
    let p = Policy::parse("o.toml", &text).unwrap();
    assert_eq!(
        refusals_under(&p, &query()),
        vec![RefusalKind::OptOutMissing]
    );
    // Direct care is not subject to the opt-out.
    let mut q = query();
    q.purpose = Purpose::DirectCare;
    assert_eq!(refusals_under(&p, &q), vec![]);
}

#[test]
fn secure_queries_need_the_block_and_require_refuses_plain() {
    // No [secure_aggregation] block: a secure query is refused, a plain one is not.
    let p = Policy::parse("b.toml", &BASE).unwrap();
    let mut q = query();
    q.aggregation = phm_proto::Aggregation::SecureSum;
    assert_eq!(refusals_under(&p, &q), vec![RefusalKind::SecureAggregation]);
    assert_eq!(refusals_under(&p, &query()), vec![]);
}

#[test]
fn every_refusal_kind_has_a_test() {
    // `position` is an exhaustive match, so a new kind must take a place; ALL must
    // then hold it there.
    for (i, k) in RefusalKind::ALL.iter().enumerate() {
        assert_eq!(k.position(), i, "{k:?} is out of place in RefusalKind::ALL");
    }
    for k in RefusalKind::ALL {
        let covered = REFUSAL_CASES.iter().any(|(_, _, kind)| *kind == k)
            || k == RefusalKind::OptOutMissing
            // Both have their cases in `linking::tests`.
            || k == RefusalKind::LinkageNotPermitted
            || k == RefusalKind::LinkedQueryShape
            // `secure_queries_need_the_block_and_require_refuses_plain` below.
            || k == RefusalKind::SecureAggregation;
        assert!(covered, "{k:?} has no case");
    }
}

#[test]
fn every_reason_is_collected_not_just_the_first() {
    let mut q = query();
    q.requester_id = "old".into(); // revoked
    q.purpose = Purpose::Research; // not permitted, and no project
    q.epsilon = 2.0; // over caps
    q.group_by.push(GroupKey::Column("nhs_number".into()));
    let got = refusals(&q);
    for k in [
        RefusalKind::RequesterRevoked,
        RefusalKind::PurposeNotPermitted,
        RefusalKind::ProjectRequired,
        RefusalKind::EpsilonOverCap,
        RefusalKind::IdentifierColumn,
    ] {
        assert!(got.contains(&k), "{k:?} missing from {got:?}");
    }
}

#[test]
fn unknown_column_names_the_visible_columns_and_hides_identifiers() {
    let mut q = query();
    q.group_by = vec![GroupKey::Column("weight".into())];
    let Decision::Deny(r) = decide(&base(), &q, now()) else {
        panic!("allowed")
    };
    let m = &r[0].message;
    assert!(m.contains("visible columns: age, sex, imd_quintile"), "{m}");
    assert!(!m.contains("nhs_number"), "{m}");
    assert_eq!(r[0].rule, "datasets.gp_patients.columns");
}

#[test]
fn project_expiry_is_inclusive_of_its_last_day() {
    let mut q = query();
    research(&mut q);
    q.project_id = Some("expired".into());
    q.group_by = vec![];
    q.aggregates = vec![count()];
    q.filter = None;
    let on_last_day = DateTime::parse_from_rfc3339("2026-01-31T23:59:59Z")
        .unwrap()
        .with_timezone(&Utc);
    assert!(matches!(
        decide(&base(), &q, on_last_day),
        Decision::Allow(_)
    ));
    let next_day = DateTime::parse_from_rfc3339("2026-02-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    assert!(matches!(decide(&base(), &q, next_day), Decision::Deny(_)));
}

#[test]
fn allowed_limits_carry_domains_charges_and_release_rules() {
    let mut q = query();
    research(&mut q);
    q.group_by = vec![
        GroupKey::Column("imd_quintile".into()),
        GroupKey::Bin {
            column: "age".into(),
            width: 10.0,
        },
        GroupKey::Column("diabetes".into()),
        GroupKey::Column("bmi".into()),
    ];
    let Decision::Allow(l) = decide(&base(), &q, now()) else {
        panic!("denied")
    };
    let domains: Vec<&GroupDomain> = l.group_by.iter().map(|g| &g.domain).collect();
    assert_eq!(
        domains[0],
        &GroupDomain::Categories(
            vec!["1", "2", "3", "4", "5"]
                .into_iter()
                .map(String::from)
                .collect()
        )
    );
    let GroupDomain::Bins { edges } = domains[1] else {
        panic!("bins")
    };
    assert_eq!(edges.first(), Some(&0.0));
    assert_eq!(edges.last(), Some(&110.0));
    assert_eq!(edges.len(), 12);
    assert_eq!(
        domains[2],
        &GroupDomain::Categories(vec!["false".into(), "true".into()])
    );
    assert_eq!(
        domains[3],
        &GroupDomain::Bins {
            edges: vec![10.0, 18.5, 25.0, 30.0, 70.0]
        }
    );
    assert_eq!(l.group_by[1].label, "bin(age, 10)");
    assert_eq!(l.exclude_opted_out.as_deref(), Some("ndopt_out"));
    assert_eq!(l.epsilon, 0.3);
    let keys: Vec<String> = l.charges.iter().map(|c| c.key()).collect();
    assert_eq!(keys, vec!["requester:res/2026-Q4", "project:proj/2026-Q4"]);
    assert_eq!(
        l.aggregates[1].column.as_ref().unwrap().bounds,
        Some((10.0, 70.0))
    );
    assert_eq!(l.min_reportable_count, 7.0);
    assert_eq!(l.delta, 1e-9);
    assert_eq!(l.policy_version, base().version());
    assert_eq!(l.max_rows_per_person, 1);
    assert_eq!(l.registered_population, Some(9840));
}

#[test]
fn bins_start_at_a_multiple_of_the_width_and_cover_the_upper_bound() {
    let mut q = query();
    q.group_by = vec![GroupKey::Bin {
        column: "bmi".into(),
        width: 7.0,
    }];
    let Decision::Allow(l) = decide(&base(), &q, now()) else {
        panic!("denied")
    };
    assert_eq!(
        l.group_by[0].domain,
        GroupDomain::Bins {
            edges: vec![7.0, 14.0, 21.0, 28.0, 35.0, 42.0, 49.0, 56.0, 63.0, 70.0]
        }
    );
}

#[test]
fn threshold_keys_and_direct_care_without_opt_out() {
    let mut q = query();
    q.purpose = Purpose::DirectCare;
    q.group_by = vec![GroupKey::Column("place".into())];
    let Decision::Allow(l) = decide(&base(), &q, now()) else {
        panic!("denied")
    };
    assert_eq!(l.group_by[0].domain, GroupDomain::Thresholded);
    assert_eq!(l.exclude_opted_out, None);
    // F1: key selection is (epsilon, delta)-DP: the plan charges the policy's delta.
    assert_eq!(l.spend.delta, l.delta);
    assert!(l.spend.epsilon > 0.0);
    assert!(l.charges.iter().all(|c| c.delta_total > 0.0));
}

#[test]
fn declared_domains_spend_no_delta_and_gaussian_plans_rho() {
    let q = query();
    let Decision::Allow(l) = decide(&base(), &q, now()) else {
        panic!("denied")
    };
    assert_eq!(l.spend.delta, 0.0);
    assert_eq!(l.spend.epsilon, q.epsilon);
    let text = BASE.replacen(
        "[release]\n",
        "[release]\nmechanism = \"discrete_gaussian\"\n",
        1,
    );
    let p = Policy::parse("g.toml", &text).unwrap();
    let Decision::Allow(l) = decide(&p, &q, now()) else {
        panic!("denied")
    };
    assert!(l.spend.rho > 0.0 && l.spend.epsilon == 0.0 && l.spend.delta == 0.0);
    let (eps, delta) = l.spend.effective(l.delta);
    assert!(eps <= q.epsilon && eps > q.epsilon * 0.999, "{eps}");
    assert_eq!(delta, l.delta);
}

#[test]
fn a_gaussian_policy_without_delta_and_bad_delta_budgets_are_refused_at_validation() {
    // F11: refused when the policy is loaded, not after each query's spend.
    let text = BASE.replacen(
        "delta = 1e-9\n",
        "mechanism = \"discrete_gaussian\"\ndelta = 0.0\n",
        1,
    );
    let errs = Policy::parse("g.toml", &text).unwrap_err();
    assert!(
        errs.0
            .iter()
            .any(|e| e.field == "release.delta" && e.message.contains("discrete_gaussian")),
        "{errs:?}"
    );
    let text = BASE.replacen(
        "per_query_cap = 0.8 }",
        "per_query_cap = 0.8, delta = 0.5 }",
        1,
    );
    let errs = Policy::parse("d.toml", &text).unwrap_err();
    assert!(
        errs.0.iter().any(|e| e.field.ends_with("budget.delta")),
        "{errs:?}"
    );
}

#[test]
fn a_huge_bin_count_is_refused_without_building_it() {
    let mut q = query();
    q.group_by = vec![GroupKey::Bin {
        column: "bmi".into(),
        width: 2.0,
    }];
    assert_eq!(refusals(&q), vec![]);
    // min_bin_width does not stop tiny widths on a column without one; the cell cap does.
    let text = BASE.replacen("min_bin_width = 2\n", "", 1);
    let p = Policy::parse("b.toml", &text).unwrap();
    q.group_by = vec![GroupKey::Bin {
        column: "bmi".into(),
        width: 1e-300,
    }];
    assert_eq!(refusals_under(&p, &q), vec![RefusalKind::TooManyCells]);
}

#[test]
fn period_labels() {
    use crate::model::Period;
    let t = now();
    assert_eq!(crate::period_label(Period::Day, t), "2026-11-23");
    assert_eq!(crate::period_label(Period::Month, t), "2026-11");
    assert_eq!(crate::period_label(Period::Quarter, t), "2026-Q4");
    let jan = DateTime::parse_from_rfc3339("2027-01-01T00:00:00Z")
        .unwrap()
        .with_timezone(&Utc);
    assert_eq!(crate::period_label(Period::Quarter, jan), "2027-Q1");
}

#[test]
fn explain_marks_each_part_allowed_or_refused_with_its_rule() {
    let mut q = query();
    let lines = explain(&base(), &q, now());
    assert!(lines.iter().all(|l| l.allowed));
    let rules: Vec<&str> = lines.iter().map(|l| l.rule.as_str()).collect();
    for r in [
        "requesters.dsu",
        "requesters.dsu.purposes",
        "requesters.dsu.datasets",
        "datasets.gp_patients.columns.imd_quintile.group",
        "datasets.gp_patients.columns.age.min_bin_width",
        "datasets.gp_patients.columns.age.filter",
        "datasets.gp_patients.columns.bmi.aggregate",
        "release.max_group_cells",
        "release.per_query_epsilon_cap",
        "requesters.dsu.budget.per_query_cap",
        "requesters.dsu.budget",
        "opt_out.purposes",
        "release",
    ] {
        assert!(rules.contains(&r), "no line for {r}: {rules:?}");
    }
    q.purpose = Purpose::Research;
    let lines = explain(&base(), &q, now());
    let refused: Vec<_> = lines.iter().filter(|l| !l.allowed).collect();
    assert!(
        refused.iter().any(|l| l.rule == "requesters.dsu.purposes"
            && l.kind == Some(RefusalKind::PurposeNotPermitted))
    );
    assert!(refused[0].to_string().starts_with("REFUSED"));
}

#[test]
fn schema_describes_the_policy_file() {
    let s = crate::schema();
    let props = s.get("properties").unwrap();
    for k in [
        "version",
        "organisation",
        "release",
        "datasets",
        "requesters",
        "projects",
    ] {
        assert!(props.get(k).is_some(), "schema lacks {k}");
    }
}
