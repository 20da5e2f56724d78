//! The FHIRPath subset a view may use, parsed once at load and evaluated on each
//! resource's JSON. Just enough to flatten a Bulk Data export without a typed FHIR
//! model (the research memo found the Rust FHIR crates experimental or without R4):
//!
//! - navigation by element names, `a.b.c`, flattening lists on the way as FHIRPath does
//!   (`address.district` is every address's district);
//! - `where(p = 'v' and q = 'w')`: keeps the items whose relative paths `p`, `q` each
//!   hold exactly that one value (a string, integer or boolean literal);
//! - `first()`, and `exists()` at the end of a path;
//! - `getResourceKey()` (the resource's `id`) and `getReferenceKey(Type)` (the id in a
//!   Reference's `reference`, `Type/id`, or a URL ending so; any other form, or another
//!   type, is a bad reference): SQL-on-FHIR's functions for the keys views join on;
//! - at the top level of a view's `where`, `path = literal`.
//!
//! Anything else (`ofType`, `%resource`, arithmetic, other functions, `or`) is refused
//! with the position of the first character not understood, so a view either means
//! here what it means in FHIRPath or is not accepted.

use serde_json::Value;

/// One step of a path.
#[derive(Debug, Clone, PartialEq)]
enum Step {
    Field(String),
    Where(Vec<(Vec<String>, Literal)>),
    First,
    /// `exists()`: only ever last (the parser refuses a step after it).
    Exists,
    ResourceKey,
    ReferenceKey(Option<String>),
}

/// A literal in a `where` condition or comparison.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Literal {
    Text(String),
    Integer(i64),
    Boolean(bool),
}

impl Literal {
    fn matches(&self, v: &Value) -> bool {
        match (self, v) {
            (Literal::Text(s), Value::String(t)) => s == t,
            (Literal::Integer(i), Value::Number(n)) => n.as_i64() == Some(*i),
            (Literal::Boolean(b), Value::Bool(c)) => b == c,
            _ => false,
        }
    }
}

/// A parsed path, possibly ending in `exists()` or compared with a literal.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Path {
    /// The steps; a last `Exists` makes the result a boolean.
    steps: Vec<Step>,
    /// `path = literal` (only in a view's `where`).
    equals: Option<Literal>,
}

/// What one path gave for one resource or element.
#[derive(Debug, PartialEq)]
pub(crate) enum Outcome<'a> {
    /// The values found (none, one, or several).
    Values(Vec<&'a Value>),
    /// The keys found by `getResourceKey()` / `getReferenceKey()`.
    Keys(Vec<&'a str>),
    /// `exists()` or a comparison.
    Truth(bool),
    /// A reference that is not `Type/id` of the named type: the text found.
    BadReference(String),
}

/// Where a path could not be parsed: the byte offset and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ParseError {
    pub at: usize,
    pub reason: String,
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "at character {}: {}", self.at + 1, self.reason)
    }
}

impl Path {
    /// Parses `text`. `comparison` allows a trailing `= literal` (a view's `where`).
    pub(crate) fn parse(text: &str, comparison: bool) -> Result<Path, ParseError> {
        let mut p = Parser { s: text, at: 0 };
        let steps = p.steps()?;
        let exists = steps.last() == Some(&Step::Exists);
        p.blank();
        let equals = if comparison && !exists && p.eat("=") {
            p.blank();
            Some(p.literal()?)
        } else {
            None
        };
        p.blank();
        if p.at < text.len() {
            return Err(p.error(if comparison {
                "expected the end of the expression (this subset has no `or`, arithmetic or other operators)"
            } else {
                "expected the end of the path"
            }));
        }
        if steps.len() == usize::from(exists) {
            return Err(ParseError {
                at: 0,
                reason: "the path is empty".into(),
            });
        }
        let key = steps
            .iter()
            .position(|s| matches!(s, Step::ResourceKey | Step::ReferenceKey(_)));
        if let Some(i) = key {
            if i + 1 != steps.len() || equals.is_some() {
                return Err(ParseError {
                    at: 0,
                    reason: "getResourceKey() and getReferenceKey() must end the path".into(),
                });
            }
            if matches!(steps[i], Step::ResourceKey) && i != 0 {
                return Err(ParseError {
                    at: 0,
                    reason: "getResourceKey() applies to the resource itself: write it alone"
                        .into(),
                });
            }
        }
        Ok(Path { steps, equals })
    }

    /// True when the path is a key function (its values are required).
    pub(crate) fn is_key(&self) -> bool {
        matches!(
            self.steps.last(),
            Some(Step::ResourceKey | Step::ReferenceKey(_))
        )
    }

    /// True when the result is a boolean (`exists()` or a comparison).
    pub(crate) fn is_test(&self) -> bool {
        self.steps.last() == Some(&Step::Exists) || self.equals.is_some()
    }

    /// True when the path tests a coding (a `where` on an element's `system`, as a
    /// Coding has): failing it is "no matching coding".
    pub(crate) fn tests_coding(&self) -> bool {
        self.steps.iter().any(|s| {
            matches!(s, Step::Where(conds) if conds.iter().any(|(rel, _)| rel.len() == 1 && rel[0] == "system"))
        })
    }

    /// Evaluates the path on `root` (a resource, or a `forEach` element).
    pub(crate) fn eval<'a>(&self, root: &'a Value) -> Outcome<'a> {
        let mut items: Vec<&'a Value> = vec![root];
        for step in &self.steps {
            match step {
                Step::Field(name) => items = children(&items, name),
                Step::Where(conds) => items.retain(|item| {
                    conds.iter().all(|(rel, lit)| {
                        let mut found = vec![*item];
                        for name in rel {
                            found = children(&found, name);
                        }
                        matches!(found.as_slice(), [v] if lit.matches(v))
                    })
                }),
                Step::First => items.truncate(1),
                Step::Exists => return Outcome::Truth(!items.is_empty()),
                Step::ResourceKey => {
                    return Outcome::Keys(
                        items
                            .iter()
                            .filter_map(|r| r.get("id").and_then(Value::as_str))
                            .collect(),
                    );
                }
                Step::ReferenceKey(ty) => {
                    let mut keys = Vec::new();
                    for item in &items {
                        match item.get("reference") {
                            None => {}
                            Some(Value::String(r)) => match reference_key(r, ty.as_deref()) {
                                Some(k) => keys.push(k),
                                None => return Outcome::BadReference(r.clone()),
                            },
                            Some(other) => return Outcome::BadReference(other.to_string()),
                        }
                    }
                    return Outcome::Keys(keys);
                }
            }
        }
        if let Some(lit) = &self.equals {
            return Outcome::Truth(matches!(items.as_slice(), [v] if lit.matches(v)));
        }
        Outcome::Values(items)
    }
}

/// The named children of every item, lists flattened.
fn children<'a>(items: &[&'a Value], name: &str) -> Vec<&'a Value> {
    let mut out = Vec::new();
    for item in items {
        match item.get(name) {
            Some(Value::Array(list)) => out.extend(list.iter().filter(|v| !v.is_null())),
            Some(Value::Null) | None => {}
            Some(v) => out.push(v),
        }
    }
    out
}

/// The id a reference names, if it is `Type/id` (optionally `/_history/v`, optionally
/// after a base URL) and `Type` is `want` (any type when `want` is `None`).
fn reference_key<'a>(reference: &'a str, want: Option<&str>) -> Option<&'a str> {
    let parts: Vec<&str> = reference.split('/').collect();
    let n = parts.len();
    let (ty, id) = if n >= 4 && parts[n - 2] == "_history" {
        (parts[n - 4], parts[n - 3])
    } else if n >= 2 {
        (parts[n - 2], parts[n - 1])
    } else {
        return None;
    };
    let type_ok = !ty.is_empty()
        && ty.starts_with(|c: char| c.is_ascii_uppercase())
        && ty.chars().all(|c| c.is_ascii_alphanumeric());
    // FHIR ids: 1-64 of [A-Za-z0-9-.].
    let id_ok = (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.');
    (type_ok && id_ok && want.is_none_or(|w| w == ty)).then_some(id)
}

struct Parser<'s> {
    s: &'s str,
    at: usize,
}

impl Parser<'_> {
    fn rest(&self) -> &str {
        &self.s[self.at..]
    }

    fn error(&self, reason: &str) -> ParseError {
        ParseError {
            at: self.at,
            reason: reason.to_string(),
        }
    }

    fn blank(&mut self) {
        let trimmed = self.rest().trim_start();
        self.at = self.s.len() - trimmed.len();
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.rest().starts_with(token) {
            self.at += token.len();
            true
        } else {
            false
        }
    }

    fn identifier(&mut self) -> Option<String> {
        let rest = self.rest();
        let len = rest
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_alphabetic() || c == '_' || (i > 0 && c.is_ascii_digit())))
            .map_or(rest.len(), |(i, _)| i);
        if len == 0 {
            return None;
        }
        let id = rest[..len].to_string();
        self.at += len;
        Some(id)
    }

    /// Element names separated by dots (a `where` condition's relative path).
    fn field_path(&mut self) -> Result<Vec<String>, ParseError> {
        let mut names = Vec::new();
        loop {
            self.blank();
            let start = self.at;
            let Some(name) = self.identifier() else {
                return Err(self.error("expected an element name"));
            };
            if self.rest().starts_with('(') {
                self.at = start;
                return Err(self.error(
                    "a where() condition compares an element path with a literal; no functions inside it",
                ));
            }
            names.push(name);
            if !self.eat(".") {
                return Ok(names);
            }
        }
    }

    /// Steps separated by dots.
    fn steps(&mut self) -> Result<Vec<Step>, ParseError> {
        let mut steps = Vec::new();
        loop {
            self.blank();
            let start = self.at;
            let Some(name) = self.identifier() else {
                return Err(self.error("expected an element name or a function"));
            };
            let step = if self.eat("(") {
                self.blank();
                let step = match name.as_str() {
                    "where" => {
                        let conds = self.conditions()?;
                        Step::Where(conds)
                    }
                    "first" => Step::First,
                    "exists" => Step::Exists,
                    "getResourceKey" => Step::ResourceKey,
                    "getReferenceKey" => Step::ReferenceKey(self.identifier()),
                    _ => {
                        self.at = start;
                        return Err(self.error(&format!(
                            "function {name}() is outside the supported subset (where, first, exists, getResourceKey, getReferenceKey)"
                        )));
                    }
                };
                self.blank();
                if !self.eat(")") {
                    return Err(self.error("expected `)`"));
                }
                step
            } else {
                Step::Field(name)
            };
            if steps.last() == Some(&Step::Exists) {
                self.at = start;
                return Err(self.error("exists() must end the path"));
            }
            steps.push(step);
            let before = self.at;
            self.blank();
            if !self.eat(".") {
                self.at = before;
                return Ok(steps);
            }
        }
    }

    fn conditions(&mut self) -> Result<Vec<(Vec<String>, Literal)>, ParseError> {
        let mut conds = Vec::new();
        loop {
            let rel = self.field_path()?;
            self.blank();
            if !self.eat("=") {
                return Err(self.error("expected `=` and a literal in the where() condition"));
            }
            self.blank();
            let lit = self.literal()?;
            conds.push((rel, lit));
            self.blank();
            let save = self.at;
            if self.eat("and") && self.rest().starts_with(|c: char| c.is_whitespace()) {
                continue;
            }
            self.at = save;
            return Ok(conds);
        }
    }

    fn literal(&mut self) -> Result<Literal, ParseError> {
        if self.eat("'") {
            let mut out = String::new();
            let mut chars = self.rest().char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\'' => {
                        self.at += i + 1;
                        return Ok(Literal::Text(out));
                    }
                    '\\' => match chars.next() {
                        Some((_, '\'')) => out.push('\''),
                        Some((_, '\\')) => out.push('\\'),
                        _ => {
                            self.at += i;
                            return Err(self.error("only \\' and \\\\ escapes are supported"));
                        }
                    },
                    c => out.push(c),
                }
            }
            return Err(self.error("the string literal is not closed"));
        }
        if self.eat("true") {
            return Ok(Literal::Boolean(true));
        }
        if self.eat("false") {
            return Ok(Literal::Boolean(false));
        }
        let rest = self.rest();
        let len = rest
            .char_indices()
            .find(|&(i, c)| !(c.is_ascii_digit() || (i == 0 && c == '-')))
            .map_or(rest.len(), |(i, _)| i);
        match rest[..len].parse::<i64>() {
            Ok(v) => {
                self.at += len;
                Ok(Literal::Integer(v))
            }
            Err(_) => Err(self.error("expected a literal: 'text', an integer, true or false")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn values(p: &str, v: &Value) -> Vec<Value> {
        match Path::parse(p, false).unwrap().eval(v) {
            Outcome::Values(v) => v.into_iter().cloned().collect(),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn navigation_flattens_lists_and_where_selects_by_system() {
        let obs = json!({
            "resourceType": "Observation", "id": "o1",
            "code": {"coding": [
                {"system": "http://loinc.org", "code": "8480-6"},
                {"system": "http://snomed.info/sct", "code": "271649006"}
            ]},
            "subject": {"reference": "Patient/p-1"},
            "valueQuantity": {"value": 142.5}
        });
        assert_eq!(
            values(
                "code.coding.where(system='http://snomed.info/sct').code",
                &obs
            ),
            vec![json!("271649006")]
        );
        assert_eq!(values("code.coding.code", &obs).len(), 2);
        assert_eq!(
            values("code.coding.first().code", &obs),
            vec![json!("8480-6")]
        );
        assert_eq!(values("valueQuantity.value", &obs), vec![json!(142.5)]);
        assert!(values("valueString", &obs).is_empty());
        let test = Path::parse(
            "code.coding.where(system='http://snomed.info/sct' and code='271649006').exists()",
            true,
        )
        .unwrap();
        assert!(test.tests_coding() && test.is_test());
        assert_eq!(test.eval(&obs), Outcome::Truth(true));
        let miss = Path::parse("code.coding.where(system='x').exists()", true).unwrap();
        assert_eq!(miss.eval(&obs), Outcome::Truth(false));
        let eq = Path::parse("subject.reference = 'Patient/p-1'", true).unwrap();
        assert_eq!(eq.eval(&obs), Outcome::Truth(true));
    }

    #[test]
    fn keys_come_from_ids_and_typed_references() {
        let r = json!({"id": "e9", "subject": {"reference": "Patient/p-1"},
                       "other": {"reference": "https://x.nhs.uk/fhir/Patient/p.2/_history/3"},
                       "bad": {"reference": "urn:uuid:1234"},
                       "wrong": {"reference": "Group/g1"}});
        let key = |p: &str| Path::parse(p, false).unwrap().eval(&r);
        assert_eq!(key("getResourceKey()"), Outcome::Keys(vec!["e9"]));
        assert_eq!(
            key("subject.getReferenceKey(Patient)"),
            Outcome::Keys(vec!["p-1"])
        );
        assert_eq!(
            key("other.getReferenceKey(Patient)"),
            Outcome::Keys(vec!["p.2"])
        );
        assert_eq!(
            key("bad.getReferenceKey(Patient)"),
            Outcome::BadReference("urn:uuid:1234".into())
        );
        assert_eq!(
            key("wrong.getReferenceKey(Patient)"),
            Outcome::BadReference("Group/g1".into())
        );
        assert_eq!(key("missing.getReferenceKey()"), Outcome::Keys(vec![]));
    }

    #[test]
    fn paths_outside_the_subset_are_refused_where_they_stop() {
        let err = |p: &str, cmp| Path::parse(p, cmp).unwrap_err();
        let e = err("value.ofType(Quantity).value", false);
        assert_eq!(e.at, 6);
        assert!(e.reason.contains("ofType() is outside"), "{e}");
        assert!(err("a or b", true).reason.contains("no `or`"));
        assert!(err("a = b", true).reason.contains("expected a literal"));
        assert!(
            err("name.where(given.first() = 'x')", false)
                .reason
                .contains("no functions")
        );
        assert!(err("code.exists().code", false).reason.contains("must end"));
        assert!(
            err("subject.getReferenceKey(Patient).id", false)
                .reason
                .contains("must end")
        );
        assert!(
            err("subject.getResourceKey()", false)
                .reason
                .contains("resource itself")
        );
        assert!(err("%resource.id", false).reason.contains("element name"));
        assert!(err("a = 'x'", false).reason.contains("end of the path"));
        assert!(err("a.where(b = 'x)", false).reason.contains("not closed"));
    }
}
