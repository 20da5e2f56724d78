//! Spanned TOML parsing of a policy file: syntax errors, unknown fields and type errors,
//! each tied to a byte offset and a field path, reported all at once.
//!
//! serde stops at the first error, so the document is deserialised piece by piece
//! (each section, each dataset, each column, each requester, each project): one bad
//! column does not hide a bad requester further down.

use crate::model::{
    Dataset, Linkage, OptOut, Organisation, Peers, PolicyFile, Project, ReleaseRules, Requester,
    SecureAggregation,
};
use serde::de::DeserializeOwned;
use std::collections::HashMap;
use std::ops::Range;
use toml::Spanned;
use toml::de::{DeArray, DeTable, DeValue, ValueDeserializer};

/// A problem before it is turned into line:column.
#[derive(Debug, Clone)]
pub(crate) struct Located {
    pub offset: usize,
    pub field: String,
    pub message: String,
}

/// Byte offset -> 1-based line and character column.
pub(crate) struct LineMap<'a> {
    text: &'a str,
    line_starts: Vec<usize>,
}

impl<'a> LineMap<'a> {
    pub fn new(text: &'a str) -> Self {
        let mut line_starts = vec![0];
        line_starts.extend(text.match_indices('\n').map(|(i, _)| i + 1));
        LineMap { text, line_starts }
    }

    pub fn locate(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.line_starts.partition_point(|&s| s <= offset).max(1);
        let start = self.line_starts.get(line - 1).copied().unwrap_or(0);
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count())
            + 1;
        (line, column)
    }
}

/// Where each field path sits in the text.
#[derive(Debug, Default)]
pub(crate) struct Index {
    /// Value span per path (key span when the value has none).
    by_path: HashMap<String, Range<usize>>,
    /// Every key and value span with its path, for mapping an error span back to a field.
    entries: Vec<(String, Range<usize>)>,
}

impl Index {
    fn build(root: &DeTable<'_>) -> Index {
        let mut idx = Index::default();
        idx.walk_table("", root);
        idx
    }

    fn add(&mut self, path: &str, span: Range<usize>) {
        self.by_path.insert(path.to_string(), span.clone());
        self.entries.push((path.to_string(), span));
    }

    fn walk_table(&mut self, prefix: &str, t: &DeTable<'_>) {
        for (k, v) in t.iter() {
            let path = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            self.add(&path, k.span());
            self.walk_value(&path, v);
        }
    }

    fn walk_value(&mut self, path: &str, v: &Spanned<DeValue<'_>>) {
        // Arrays of tables ([[x]]) may carry an empty span; keep the key's span then.
        if !v.span().is_empty() {
            self.add(path, v.span());
        }
        match v.get_ref() {
            DeValue::Table(t) => self.walk_table(path, t),
            DeValue::Array(a) => {
                for (i, item) in a.iter().enumerate() {
                    self.walk_value(&format!("{path}[{i}]"), item);
                }
            }
            _ => {}
        }
    }

    /// Offset of a field, or of the nearest enclosing field that is written in the
    /// text (a defaulted field has no place of its own).
    pub fn offset_of(&self, path: &str) -> usize {
        let mut p = path;
        loop {
            if let Some(span) = self.by_path.get(p) {
                return span.start;
            }
            match p.rfind(['.', '[']) {
                Some(i) => p = &p[..i],
                None => return 0,
            }
        }
    }

    /// The innermost field whose span covers `span`.
    fn path_at(&self, span: &Range<usize>) -> Option<&str> {
        self.entries
            .iter()
            .filter(|(_, s)| s.start <= span.start && span.end <= s.end.max(s.start + 1))
            .min_by_key(|(_, s)| s.len())
            .map(|(p, _)| p.as_str())
    }
}

const TOP_LEVEL: &[&str] = &[
    "version",
    "organisation",
    "release",
    "opt_out",
    "datasets",
    "requesters",
    "projects",
    "peers",
    "linkage",
];

/// Parse the text into the model, or every problem found.
pub(crate) fn parse(text: &str) -> Result<(PolicyFile, Index), Vec<Located>> {
    let (root, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        // A broken document can make everything after the break look wrong; report
        // only what the parser itself found, named by field where the recovered
        // document still shows which one.
        let partial = Index::build(root.get_ref());
        return Err(syntax
            .iter()
            .map(|e| Located {
                offset: e.span().map_or(0, |s| s.start),
                field: e
                    .span()
                    .and_then(|s| partial.path_at(&s))
                    .unwrap_or_default()
                    .to_string(),
                message: format!("TOML syntax: {}", one_line(e.message())),
            })
            .collect());
    }
    let root = root.into_inner();
    let index = Index::build(&root);
    let mut p = Pieces {
        index: &index,
        errors: Vec::new(),
    };

    let mut version = None;
    let mut organisation = None;
    let mut release = Some(ReleaseRules::default());
    let mut opt_out: Option<Option<OptOut>> = Some(None);
    let mut datasets = Some(Vec::new());
    let mut requesters = Some(Vec::new());
    let mut projects = Some(Vec::new());
    let mut peers: Option<Option<Peers>> = Some(None);
    let mut linkage: Option<Option<Linkage>> = Some(None);
    let mut secure_aggregation: Option<Option<SecureAggregation>> = Some(None);
    for (k, v) in root.iter() {
        let key = k.get_ref().as_ref();
        match key {
            "version" => version = p.de::<u32>(v, key),
            "organisation" => organisation = p.de::<Organisation>(v, key),
            "release" => release = p.de::<ReleaseRules>(v, key),
            "opt_out" => opt_out = p.de::<OptOut>(v, key).map(Some),
            "datasets" => datasets = p.list(v, key, Pieces::dataset),
            "requesters" => requesters = p.list(v, key, |p, v, path| p.de::<Requester>(v, path)),
            "projects" => projects = p.list(v, key, |p, v, path| p.de::<Project>(v, path)),
            "peers" => peers = p.de::<Peers>(v, key).map(Some),
            "linkage" => linkage = p.de::<Linkage>(v, key).map(Some),
            "secure_aggregation" => {
                secure_aggregation = p.de::<SecureAggregation>(v, key).map(Some);
            }
            other => p.errors.push(Located {
                offset: k.span().start,
                field: other.to_string(),
                message: format!(
                    "unknown field `{other}`, expected one of {}",
                    TOP_LEVEL.join(", ")
                ),
            }),
        }
    }
    let missing = |p: &mut Pieces<'_>, field: &str, what: &str| {
        p.errors.push(Located {
            offset: 0,
            field: field.to_string(),
            message: format!("missing field `{field}` ({what})"),
        });
    };
    if !root.iter().any(|(k, _)| k.get_ref() == "version") {
        missing(
            &mut p,
            "version",
            "the policy language version: version = 1",
        );
    }
    if !root.iter().any(|(k, _)| k.get_ref() == "organisation") {
        missing(
            &mut p,
            "organisation",
            "an [organisation] table with ods_code, name and kind",
        );
    }
    if !p.errors.is_empty() {
        return Err(p.errors);
    }
    match (
        version,
        organisation,
        release,
        opt_out,
        datasets,
        requesters,
        projects,
        peers,
        linkage,
        secure_aggregation,
    ) {
        (
            Some(version),
            Some(organisation),
            Some(release),
            Some(opt_out),
            Some(datasets),
            Some(requesters),
            Some(projects),
            Some(peers),
            Some(linkage),
            Some(secure_aggregation),
        ) => Ok((
            PolicyFile {
                version,
                organisation,
                release,
                opt_out,
                datasets,
                requesters,
                projects,
                peers,
                linkage,
                secure_aggregation,
            },
            index,
        )),
        // Every None above came with an error pushed, so this is unreachable in
        // practice; fail closed all the same.
        _ => Err(vec![Located {
            offset: 0,
            field: String::new(),
            message: "the policy could not be read".into(),
        }]),
    }
}

struct Pieces<'a> {
    index: &'a Index,
    errors: Vec<Located>,
}

impl Pieces<'_> {
    fn de<T: DeserializeOwned>(&mut self, v: &Spanned<DeValue<'_>>, path: &str) -> Option<T> {
        match T::deserialize(ValueDeserializer::from(v.clone())) {
            Ok(t) => Some(t),
            Err(e) => {
                let span = e.span().unwrap_or_else(|| v.span());
                let field = self
                    .index
                    .path_at(&span)
                    .filter(|f| f.starts_with(path))
                    .unwrap_or(path)
                    .to_string();
                self.errors.push(Located {
                    offset: span.start,
                    message: humanise(e.message(), &field),
                    field,
                });
                None
            }
        }
    }

    /// An array of tables, each element read on its own.
    fn list<T>(
        &mut self,
        v: &Spanned<DeValue<'_>>,
        path: &str,
        item: impl Fn(&mut Self, &Spanned<DeValue<'_>>, &str) -> Option<T>,
    ) -> Option<Vec<T>> {
        let DeValue::Array(items) = v.get_ref() else {
            self.errors.push(Located {
                offset: v.span().start,
                field: path.to_string(),
                message: format!(
                    "`{path}` must be an array of tables, written [[{path}]], not a {}",
                    v.get_ref().type_str()
                ),
            });
            return None;
        };
        let mut out = Some(Vec::with_capacity(items.len()));
        for (i, it) in items.iter().enumerate() {
            match (item(self, it, &format!("{path}[{i}]")), out.as_mut()) {
                (Some(t), Some(o)) => o.push(t),
                _ => out = None,
            }
        }
        out
    }

    /// A dataset, with each column read on its own.
    fn dataset(&mut self, v: &Spanned<DeValue<'_>>, path: &str) -> Option<Dataset> {
        let DeValue::Table(t) = v.get_ref() else {
            return self.de::<Dataset>(v, path);
        };
        let mut head = t.clone();
        let mut columns = None;
        for (k, val) in head.iter_mut() {
            if k.get_ref() == "columns" {
                let cols_path = format!("{path}.columns");
                columns = Some(self.list(val, &cols_path, |p, v, path| p.de(v, path)));
                *val = Spanned::new(val.span(), DeValue::Array(DeArray::new()));
            }
        }
        let mut dataset = self.de::<Dataset>(&Spanned::new(v.span(), DeValue::Table(head)), path);
        if let Some(d) = dataset.as_mut() {
            match columns {
                Some(Some(c)) => d.columns = c,
                Some(None) => return None,
                None => {}
            }
        }
        dataset
    }
}

fn one_line(s: &str) -> String {
    s.trim()
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("; ")
}

/// serde's messages, made specific where they are vague.
fn humanise(message: &str, field: &str) -> String {
    let m = one_line(message);
    if m.contains("untagged enum Domain") {
        return "a domain is an integer range written like \"1..5\", or a list of \
                integers, of texts or of booleans (all of one type)"
            .to_string();
    }
    if m.contains("expected a Date") || field.ends_with(".expires") {
        return format!("{m} (write a TOML date such as 2027-03-31, without quotes)");
    }
    m
}
