//! A view: the subset of SQL-on-FHIR v2's ViewDefinition that turns one resource type
//! into rows of typed columns, checked element by element at load (an element outside
//! the subset is refused by its JSON path, so a view never means less than it says),
//! and its evaluation on one resource, which gives rows or the reason the resource is
//! dropped.
//!
//! The subset: `resource`, `name`, top-level `where` (each a boolean path), `select`
//! (each with `column`s and at most one `forEach`, no nesting), `column` with `name`,
//! `path` and `type`. Descriptive elements (`title`, `description`, `status`, ...) are
//! accepted and ignored; `constant`, `unionAll`, `forEachOrNull`, `repeat`, nested
//! `select` and `collection: true` are refused.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::path::{Outcome, Path};

/// A column's type: FHIR's primitive types, by the Arrow type the node holds them as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    /// string, code, id, uri, url, canonical, markdown, oid, uuid.
    Text,
    /// integer, positiveInt, unsignedInt.
    Integer,
    /// decimal.
    Decimal,
    /// boolean.
    Boolean,
    /// date, dateTime, instant: the calendar date as written (a dateTime's time and
    /// offset are dropped); a partial date (`1988`, `1988-03`) has no day to give.
    Date,
}

impl Kind {
    fn of(fhir_type: &str) -> Option<Kind> {
        Some(match fhir_type {
            "string" | "code" | "id" | "uri" | "url" | "canonical" | "markdown" | "oid"
            | "uuid" => Kind::Text,
            "integer" | "positiveInt" | "unsignedInt" => Kind::Integer,
            "decimal" => Kind::Decimal,
            "boolean" => Kind::Boolean,
            "date" | "dateTime" | "instant" => Kind::Date,
            _ => return None,
        })
    }
}

/// Why a resource gave no rows. Only the reason and the element are reported, never a
/// value: the load report goes to logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DropReason {
    /// A `where` that tests a coding found none matching.
    NoMatchingCoding,
    /// Another `where` was false.
    ExcludedByWhere,
    /// A reference that is not `Type/id` of the type the view names.
    BadReference,
    /// A date column's value has no day (`1988`, `1988-03`).
    PartialDate,
    /// A key column (`getResourceKey()`, `getReferenceKey()`) has no value, or a
    /// `forEach` found no element.
    MissingValue,
    /// A column found several values where a row holds one.
    SeveralValues,
    /// A value of the wrong JSON kind for its column's type, or a date that is no date.
    InvalidValue,
}

impl DropReason {
    pub fn describe(self) -> &'static str {
        match self {
            DropReason::NoMatchingCoding => "no matching coding",
            DropReason::ExcludedByWhere => "excluded by where",
            DropReason::BadReference => "bad reference",
            DropReason::PartialDate => "partial date",
            DropReason::MissingValue => "missing value",
            DropReason::SeveralValues => "several values",
            DropReason::InvalidValue => "invalid value",
        }
    }
}

/// One dropped resource: why, and the element (a column's name or a `where` index).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Dropped {
    pub reason: DropReason,
    pub element: String,
}

/// One value of a row.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Cell {
    Null,
    Text(String),
    Integer(i64),
    Decimal(f64),
    Boolean(bool),
    Date(i32),
}

#[derive(Debug)]
struct ViewColumn {
    name: String,
    path: Path,
    kind: Kind,
}

#[derive(Debug)]
struct Select {
    for_each: Option<Path>,
    columns: Vec<ViewColumn>,
}

/// A checked view.
#[derive(Debug)]
pub(crate) struct View {
    pub name: String,
    pub resource: String,
    filters: Vec<Path>,
    selects: Vec<Select>,
}

/// Elements a view may carry that describe it and change nothing.
const DESCRIPTIVE: &[&str] = &[
    "id",
    "meta",
    "text",
    "url",
    "identifier",
    "version",
    "title",
    "description",
    "publisher",
    "contact",
    "copyright",
    "useContext",
    "experimental",
    "status",
    "fhirVersion",
];

/// Why a view was refused: the element (a JSON path into the view) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ViewError {
    pub element: String,
    pub reason: String,
}

fn refuse(element: impl Into<String>, reason: impl Into<String>) -> ViewError {
    ViewError {
        element: element.into(),
        reason: reason.into(),
    }
}

fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(f) if f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
        && s.len() <= 63
}

fn object<'a>(v: &'a Value, at: &str) -> Result<&'a Map<String, Value>, ViewError> {
    v.as_object()
        .ok_or_else(|| refuse(at, "must be a JSON object"))
}

fn text<'a>(o: &'a Map<String, Value>, key: &str, at: &str) -> Result<&'a str, ViewError> {
    match o.get(key) {
        Some(Value::String(s)) => Ok(s),
        Some(_) => Err(refuse(format!("{at}{key}"), "must be a string")),
        None => Err(refuse(format!("{at}{key}"), "is required")),
    }
}

fn list<'a>(o: &'a Map<String, Value>, key: &str, at: &str) -> Result<&'a [Value], ViewError> {
    match o.get(key) {
        Some(Value::Array(a)) => Ok(a),
        Some(_) => Err(refuse(format!("{at}{key}"), "must be a JSON array")),
        None => Ok(&[]),
    }
}

fn path(text: &str, at: &str, comparison: bool) -> Result<Path, ViewError> {
    Path::parse(text, comparison).map_err(|e| refuse(at, format!("{text:?} {e}")))
}

impl View {
    /// Checks a view's JSON against the subset.
    pub(crate) fn parse(json: &Value) -> Result<View, ViewError> {
        let top = object(json, "(the view)")?;
        for key in top.keys() {
            let known = DESCRIPTIVE.contains(&key.as_str())
                || matches!(
                    key.as_str(),
                    "resourceType" | "name" | "resource" | "select" | "where"
                );
            if !known {
                return Err(refuse(
                    key.as_str(),
                    "is outside the supported subset of ViewDefinition (resource, name, where, select with column and forEach)",
                ));
            }
        }
        if text(top, "resourceType", "")? != "ViewDefinition" {
            return Err(refuse("resourceType", "must be \"ViewDefinition\""));
        }
        let name = text(top, "name", "")?;
        if !is_identifier(name) {
            return Err(refuse(
                "name",
                format!(
                    "{name:?} must be a plain SQL identifier (letters, digits and _, not starting with a digit): the query names the view's table by it"
                ),
            ));
        }
        let resource = text(top, "resource", "")?;
        if !(resource.starts_with(|c: char| c.is_ascii_uppercase())
            && resource.chars().all(|c| c.is_ascii_alphanumeric()))
        {
            return Err(refuse(
                "resource",
                format!("{resource:?} is not a FHIR resource type"),
            ));
        }
        let mut filters = Vec::new();
        for (i, w) in list(top, "where", "")?.iter().enumerate() {
            let at = format!("where[{i}]");
            let o = object(w, &at)?;
            for key in o.keys() {
                if key != "path" && key != "description" {
                    return Err(refuse(
                        format!("{at}.{key}"),
                        "is outside the supported subset",
                    ));
                }
            }
            let p = path(
                text(o, "path", &format!("{at}."))?,
                &format!("{at}.path"),
                true,
            )?;
            if !p.is_test() {
                return Err(refuse(
                    format!("{at}.path"),
                    "must be true or false for each resource: end it with exists() or compare it with = 'literal'",
                ));
            }
            filters.push(p);
        }
        let selects_json = list(top, "select", "")?;
        if selects_json.is_empty() {
            return Err(refuse(
                "select",
                "is required: at least one select with columns",
            ));
        }
        let mut names = HashSet::new();
        let mut selects = Vec::new();
        for (i, s) in selects_json.iter().enumerate() {
            let at = format!("select[{i}]");
            let o = object(s, &at)?;
            for key in o.keys() {
                let why = match key.as_str() {
                    "column" | "forEach" => continue,
                    "select" => {
                        "(a nested select) is outside the supported subset: one level of select, with at most one forEach"
                    }
                    "forEachOrNull" | "unionAll" | "repeat" => "is outside the supported subset",
                    _ => "is not an element of a ViewDefinition select",
                };
                return Err(refuse(format!("{at}.{key}"), why));
            }
            let for_each = match o.get("forEach") {
                None => None,
                Some(Value::String(t)) => {
                    let p = path(t, &format!("{at}.forEach"), false)?;
                    if p.is_key() || p.is_test() {
                        return Err(refuse(
                            format!("{at}.forEach"),
                            "must name elements, not keys or a test",
                        ));
                    }
                    Some(p)
                }
                Some(_) => return Err(refuse(format!("{at}.forEach"), "must be a string")),
            };
            let mut columns = Vec::new();
            let cols = list(o, "column", &format!("{at}."))?;
            if cols.is_empty() {
                return Err(refuse(
                    format!("{at}.column"),
                    "is required: at least one column",
                ));
            }
            for (j, c) in cols.iter().enumerate() {
                let at = format!("{at}.column[{j}]");
                let o = object(c, &at)?;
                for key in o.keys() {
                    match key.as_str() {
                        "name" | "path" | "type" | "description" | "tag" => {}
                        "collection" => {
                            if o.get("collection") != Some(&Value::Bool(false)) {
                                return Err(refuse(
                                    format!("{at}.collection"),
                                    "collection columns are outside the supported subset: a column holds one value",
                                ));
                            }
                        }
                        _ => {
                            return Err(refuse(
                                format!("{at}.{key}"),
                                "is not an element of a ViewDefinition column",
                            ));
                        }
                    }
                }
                let name = text(o, "name", &format!("{at}."))?;
                if !is_identifier(name) {
                    return Err(refuse(
                        format!("{at}.name"),
                        format!("{name:?} must be a plain SQL identifier"),
                    ));
                }
                if !names.insert(name.to_string()) {
                    return Err(refuse(
                        format!("{at}.name"),
                        format!("{name:?} is already a column of this view"),
                    ));
                }
                let p = path(
                    text(o, "path", &format!("{at}."))?,
                    &format!("{at}.path"),
                    false,
                )?;
                let kind = match o.get("type") {
                    Some(Value::String(t)) => Kind::of(t).ok_or_else(|| {
                        refuse(
                            format!("{at}.type"),
                            format!("{t:?} is not a supported type (string, code, id, uri, integer, positiveInt, unsignedInt, decimal, boolean, date, dateTime, instant)"),
                        )
                    })?,
                    Some(_) => return Err(refuse(format!("{at}.type"), "must be a string")),
                    None if p.is_key() || p.is_test() => {
                        if p.is_key() { Kind::Text } else { Kind::Boolean }
                    }
                    None => {
                        return Err(refuse(
                            format!("{at}.type"),
                            "is required: this node has no FHIR model to infer a column's type from its path",
                        ));
                    }
                };
                if p.is_key() && kind != Kind::Text {
                    return Err(refuse(format!("{at}.type"), "a key column is a string"));
                }
                if p.is_test() && kind != Kind::Boolean {
                    return Err(refuse(
                        format!("{at}.type"),
                        "an exists() column is a boolean",
                    ));
                }
                columns.push(ViewColumn {
                    name: name.to_string(),
                    path: p,
                    kind,
                });
            }
            selects.push(Select { for_each, columns });
        }
        Ok(View {
            name: name.to_string(),
            resource: resource.to_string(),
            filters,
            selects,
        })
    }

    /// The columns, in table order, with their kinds.
    pub(crate) fn columns(&self) -> impl Iterator<Item = (&str, Kind)> {
        self.selects
            .iter()
            .flat_map(|s| s.columns.iter().map(|c| (c.name.as_str(), c.kind)))
    }

    /// The rows `resource` gives (the product of each select's rows), or why it gives
    /// none.
    pub(crate) fn rows(&self, resource: &Value) -> Result<Vec<Vec<Cell>>, Dropped> {
        for (i, f) in self.filters.iter().enumerate() {
            if f.eval(resource) != Outcome::Truth(true) {
                let reason = if f.tests_coding() {
                    DropReason::NoMatchingCoding
                } else {
                    DropReason::ExcludedByWhere
                };
                return Err(Dropped {
                    reason,
                    element: format!("where[{i}]"),
                });
            }
        }
        let mut rows: Vec<Vec<Cell>> = vec![Vec::new()];
        for (i, s) in self.selects.iter().enumerate() {
            let own: Vec<Vec<Cell>> = match &s.for_each {
                None => vec![cells(&s.columns, resource)?],
                Some(p) => {
                    let Outcome::Values(items) = p.eval(resource) else {
                        return Err(Dropped {
                            reason: DropReason::InvalidValue,
                            element: format!("select[{i}].forEach"),
                        });
                    };
                    if items.is_empty() {
                        return Err(Dropped {
                            reason: DropReason::MissingValue,
                            element: format!("select[{i}].forEach"),
                        });
                    }
                    items
                        .into_iter()
                        .map(|item| cells(&s.columns, item))
                        .collect::<Result<_, _>>()?
                }
            };
            rows = if own.len() == 1 {
                let one = &own[0];
                rows.into_iter()
                    .map(|mut r| {
                        r.extend(one.iter().cloned());
                        r
                    })
                    .collect()
            } else {
                rows.iter()
                    .flat_map(|r| {
                        own.iter().map(move |o| {
                            let mut r = r.clone();
                            r.extend(o.iter().cloned());
                            r
                        })
                    })
                    .collect()
            };
        }
        Ok(rows)
    }
}

fn cells(columns: &[ViewColumn], root: &Value) -> Result<Vec<Cell>, Dropped> {
    columns.iter().map(|c| cell(c, root)).collect()
}

fn cell(c: &ViewColumn, root: &Value) -> Result<Cell, Dropped> {
    let drop = |reason| Dropped {
        reason,
        element: c.name.clone(),
    };
    match c.path.eval(root) {
        Outcome::Truth(b) => Ok(Cell::Boolean(b)),
        Outcome::BadReference(_) => Err(drop(DropReason::BadReference)),
        Outcome::Keys(keys) => match keys.as_slice() {
            [] => Err(drop(DropReason::MissingValue)),
            [k] => Ok(Cell::Text((*k).to_string())),
            _ => Err(drop(DropReason::SeveralValues)),
        },
        Outcome::Values(values) => match values.as_slice() {
            [] => Ok(Cell::Null),
            [v] => typed(v, c.kind).map_err(drop),
            _ => Err(drop(DropReason::SeveralValues)),
        },
    }
}

fn typed(v: &Value, kind: Kind) -> Result<Cell, DropReason> {
    let invalid = DropReason::InvalidValue;
    match kind {
        Kind::Text => v.as_str().map(|s| Cell::Text(s.to_string())).ok_or(invalid),
        Kind::Integer => v.as_i64().map(Cell::Integer).ok_or(invalid),
        Kind::Decimal => v
            .as_f64()
            .filter(|f| f.is_finite())
            .map(Cell::Decimal)
            .ok_or(invalid),
        Kind::Boolean => v.as_bool().map(Cell::Boolean).ok_or(invalid),
        Kind::Date => date(v.as_str().ok_or(invalid)?),
    }
}

/// A FHIR date, dateTime or instant as days since 1970-01-01.
fn date(s: &str) -> Result<Cell, DropReason> {
    let b = s.as_bytes();
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let partial = (b.len() == 4 && digits(0..4))
        || (b.len() == 7 && digits(0..4) && b[4] == b'-' && digits(5..7));
    if partial {
        return Err(DropReason::PartialDate);
    }
    if b.len() < 10 || (b.len() > 10 && b[10] != b'T') {
        return Err(DropReason::InvalidValue);
    }
    chrono::NaiveDate::parse_from_str(&s[..10], "%Y-%m-%d")
        .ok()
        .and_then(crate::engine::load::days_of_date)
        .map(Cell::Date)
        .ok_or(DropReason::InvalidValue)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(v: Value) -> Result<View, ViewError> {
        View::parse(&v)
    }

    fn encounter_view() -> View {
        view(json!({
            "resourceType": "ViewDefinition", "name": "encounter", "resource": "Encounter",
            "status": "active", "title": "Admissions",
            "where": [{"path": "class.where(system='http://terminology.hl7.org/CodeSystem/v3-ActCode' and code='IMP').exists()"}],
            "select": [
                {"column": [
                    {"name": "admission_id", "path": "getResourceKey()"},
                    {"name": "person_id", "path": "subject.getReferenceKey(Patient)"},
                    {"name": "admitted", "path": "period.start", "type": "dateTime"},
                    {"name": "stay", "path": "length.value", "type": "integer"}
                ]},
                {"forEach": "diagnosis", "column": [
                    {"name": "condition_id", "path": "condition.getReferenceKey(Condition)"},
                    {"name": "rank", "path": "rank", "type": "positiveInt"}
                ]}
            ]
        }))
        .unwrap()
    }

    fn encounter() -> Value {
        json!({
            "resourceType": "Encounter", "id": "e1",
            "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "IMP"},
            "subject": {"reference": "Patient/p1"},
            "period": {"start": "2025-11-03T09:30:00+00:00"},
            "length": {"value": 4},
            "diagnosis": [
                {"condition": {"reference": "Condition/c1"}, "rank": 1},
                {"condition": {"reference": "Condition/c2"}, "rank": 2}
            ]
        })
    }

    #[test]
    fn a_view_gives_one_row_per_foreach_element() {
        let v = encounter_view();
        let rows = v.rows(&encounter()).unwrap();
        let day = crate::engine::load::days_of_date(
            chrono::NaiveDate::from_ymd_opt(2025, 11, 3).unwrap(),
        )
        .unwrap();
        assert_eq!(
            rows,
            vec![
                vec![
                    Cell::Text("e1".into()),
                    Cell::Text("p1".into()),
                    Cell::Date(day),
                    Cell::Integer(4),
                    Cell::Text("c1".into()),
                    Cell::Integer(1)
                ],
                vec![
                    Cell::Text("e1".into()),
                    Cell::Text("p1".into()),
                    Cell::Date(day),
                    Cell::Integer(4),
                    Cell::Text("c2".into()),
                    Cell::Integer(2)
                ],
            ]
        );
        let names: Vec<&str> = v.columns().map(|(n, _)| n).collect();
        assert_eq!(
            names,
            [
                "admission_id",
                "person_id",
                "admitted",
                "stay",
                "condition_id",
                "rank"
            ]
        );
    }

    #[test]
    fn each_drop_has_its_reason_and_element() {
        let v = encounter_view();
        let dropped = |edit: &dyn Fn(&mut Value)| {
            let mut e = encounter();
            edit(&mut e);
            v.rows(&e).unwrap_err()
        };
        let d = dropped(&|e| e["class"]["code"] = json!("EMER"));
        assert_eq!(
            (d.reason, d.element.as_str()),
            (DropReason::NoMatchingCoding, "where[0]")
        );
        let d = dropped(&|e| e["subject"]["reference"] = json!("Group/g1"));
        assert_eq!(
            (d.reason, d.element.as_str()),
            (DropReason::BadReference, "person_id")
        );
        let d = dropped(&|e| e["period"]["start"] = json!("2025-11"));
        assert_eq!(
            (d.reason, d.element.as_str()),
            (DropReason::PartialDate, "admitted")
        );
        let d = dropped(&|e| e["period"]["start"] = json!("2025"));
        assert_eq!(d.reason, DropReason::PartialDate);
        let d = dropped(&|e| e["period"]["start"] = json!("3 Nov 2025"));
        assert_eq!(d.reason, DropReason::InvalidValue);
        let d = dropped(&|e| {
            e.as_object_mut().unwrap().remove("subject");
        });
        assert_eq!(
            (d.reason, d.element.as_str()),
            (DropReason::MissingValue, "person_id")
        );
        let d = dropped(&|e| e["diagnosis"] = json!([]));
        assert_eq!(
            (d.reason, d.element.as_str()),
            (DropReason::MissingValue, "select[1].forEach")
        );
        let d = dropped(&|e| e["length"] = json!([{"value": 1}, {"value": 2}]));
        assert_eq!(
            (d.reason, d.element.as_str()),
            (DropReason::SeveralValues, "stay")
        );
        let d = dropped(&|e| e["length"]["value"] = json!("4"));
        assert_eq!(
            (d.reason, d.element.as_str()),
            (DropReason::InvalidValue, "stay")
        );
        // An optional value that is absent is NULL, not a drop.
        let mut e = encounter();
        e.as_object_mut().unwrap().remove("length");
        assert_eq!(v.rows(&e).unwrap()[0][3], Cell::Null);
    }

    #[test]
    fn a_view_outside_the_subset_is_refused_naming_the_element() {
        let base = || {
            json!({"resourceType": "ViewDefinition", "name": "v", "resource": "Patient",
                   "select": [{"column": [{"name": "id", "path": "getResourceKey()"}]}]})
        };
        let refused = |edit: &dyn Fn(&mut Value)| {
            let mut v = base();
            edit(&mut v);
            view(v).unwrap_err()
        };
        assert!(view(base()).is_ok());
        let e = refused(&|v| v["constant"] = json!([{"name": "x", "valueString": "y"}]));
        assert_eq!(e.element, "constant");
        let e = refused(&|v| v["select"][0]["unionAll"] = json!([]));
        assert_eq!(e.element, "select[0].unionAll");
        let e = refused(&|v| v["select"][0]["select"] = json!([]));
        assert_eq!(e.element, "select[0].select");
        assert!(e.reason.contains("nested select"));
        let e = refused(&|v| v["select"][0]["forEach"] = json!("name.exists()"));
        assert_eq!(e.element, "select[0].forEach");
        let e = refused(&|v| v["select"][0]["forEachOrNull"] = json!("name"));
        assert_eq!(e.element, "select[0].forEachOrNull");
        let e = refused(&|v| {
            v["select"][0]["column"][0]["collection"] = json!(true);
        });
        assert_eq!(e.element, "select[0].column[0].collection");
        let e = refused(&|v| {
            v["select"][0]["column"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": "b", "path": "birthDate.ofType(date)", "type": "date"}))
        });
        assert_eq!(e.element, "select[0].column[1].path");
        assert!(e.reason.contains("ofType() is outside"), "{}", e.reason);
        let e = refused(&|v| {
            v["select"][0]["column"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": "b", "path": "birthDate"}))
        });
        assert_eq!(e.element, "select[0].column[1].type");
        let e = refused(&|v| {
            v["select"][0]["column"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": "b", "path": "birthDate", "type": "Quantity"}))
        });
        assert_eq!(e.element, "select[0].column[1].type");
        let e = refused(&|v| v["where"] = json!([{"path": "gender"}]));
        assert_eq!(e.element, "where[0].path");
        let e = refused(&|v| v["resourceType"] = json!("Patient"));
        assert_eq!(e.element, "resourceType");
        let e = refused(&|v| v["name"] = json!("my view"));
        assert_eq!(e.element, "name");
        let e = refused(&|v| {
            v["select"][0]["column"]
                .as_array_mut()
                .unwrap()
                .push(json!({"name": "id", "path": "id", "type": "id"}))
        });
        assert!(e.reason.contains("already a column"));
    }
}
