//! Group-key domains: declared category lists and ranges, and numeric bins. Shared by
//! validation (is the domain well formed?) and decisions (which keys are released?).
//! Sizes are always computed before anything is materialised, so a policy or query
//! asking for billions of cells is refused instead of exhausting memory.

use crate::model::{Column, ColumnType, Domain, Grouping};

/// Largest category domain a policy may declare.
pub(crate) const MAX_DOMAIN: u64 = 10_000;

/// Parse an inclusive integer range written "a..b".
pub(crate) fn parse_range(s: &str) -> Result<(i64, i64), String> {
    let bad = || format!("range {s:?} must be written \"low..high\" with integers, e.g. \"1..5\"");
    let (a, b) = s.split_once("..").ok_or_else(bad)?;
    let a: i64 = a.trim().parse().map_err(|_| bad())?;
    let b: i64 = b.trim().parse().map_err(|_| bad())?;
    if a > b {
        return Err(format!("range {s:?} is empty: {a} is above {b}"));
    }
    Ok((a, b))
}

/// Number of keys in a declared domain, or why it is not a valid domain.
pub(crate) fn domain_size(d: &Domain) -> Result<u64, String> {
    let n = match d {
        Domain::Range(s) => {
            let (a, b) = parse_range(s)?;
            // i128 so that "i64::MIN..i64::MAX" cannot overflow.
            u64::try_from(i128::from(b) - i128::from(a) + 1).unwrap_or(u64::MAX)
        }
        Domain::Integers(v) => v.len() as u64,
        Domain::Texts(v) => v.len() as u64,
        Domain::Booleans(v) => v.len() as u64,
    };
    if n == 0 {
        return Err("domain is empty: list at least one value".into());
    }
    if n > MAX_DOMAIN {
        return Err(format!(
            "domain has {n} values; at most {MAX_DOMAIN} are allowed"
        ));
    }
    let dup = match d {
        Domain::Range(_) => None,
        Domain::Integers(v) => first_duplicate(v.iter().map(ToString::to_string)),
        Domain::Texts(v) => first_duplicate(v.iter().cloned()),
        Domain::Booleans(v) => first_duplicate(v.iter().map(ToString::to_string)),
    };
    if let Some(dup) = dup {
        return Err(format!("domain lists {dup:?} twice"));
    }
    Ok(n)
}

fn first_duplicate(items: impl Iterator<Item = String>) -> Option<String> {
    let mut seen = std::collections::BTreeSet::new();
    items.into_iter().find(|i| !seen.insert(i.clone()))
}

/// The column type a domain's values have.
pub(crate) fn domain_type(d: &Domain) -> ColumnType {
    match d {
        Domain::Range(_) | Domain::Integers(_) => ColumnType::Integer,
        Domain::Texts(_) => ColumnType::Text,
        Domain::Booleans(_) => ColumnType::Boolean,
    }
}

/// Keys of a validated domain, rendered as results label them.
pub(crate) fn domain_labels(d: &Domain) -> Vec<String> {
    match d {
        Domain::Range(s) => match parse_range(s) {
            Ok((a, b)) if domain_size(d).is_ok() => (a..=b).map(|i| i.to_string()).collect(),
            _ => Vec::new(),
        },
        Domain::Integers(v) => v.iter().map(ToString::to_string).collect(),
        Domain::Texts(v) => v.clone(),
        Domain::Booleans(v) => v.iter().map(ToString::to_string).collect(),
    }
}

/// What a plain `GROUP BY col` (no `bin`) would release for a declared column.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PlainGroup {
    Categories(Vec<String>),
    Bins(Vec<f64>),
    /// An integer column grouped by single values over its bounds: that many keys.
    IntegerValues {
        low: i64,
        high: i64,
    },
    /// Single values would be narrower than the column's `min_bin_width`.
    TooNarrow {
        min_bin_width: f64,
    },
    /// A real column with bounds only: it must be grouped with `bin(col, width)`.
    NeedsBin,
    /// Nothing declares which keys exist.
    Undeclared,
}

/// The keys a declared column releases under `GROUP BY col`.
pub(crate) fn plain_group(col: &Column) -> PlainGroup {
    if let Some(d) = &col.domain {
        return PlainGroup::Categories(domain_labels(d));
    }
    if let Some(edges) = &col.bin_edges {
        return PlainGroup::Bins(edges.clone());
    }
    match (col.column_type, col.bounds) {
        (ColumnType::Boolean, _) => PlainGroup::Categories(vec!["false".into(), "true".into()]),
        (ColumnType::Integer, Some([lo, hi])) => {
            if col.min_bin_width.is_some_and(|w| w > 1.0) {
                return PlainGroup::TooNarrow {
                    min_bin_width: col.min_bin_width.unwrap_or(1.0),
                };
            }
            // Bounds are validated finite; the casts saturate for absurd values and the
            // cell-count check refuses those before anything is built.
            PlainGroup::IntegerValues {
                low: lo.ceil() as i64,
                high: hi.floor() as i64,
            }
        }
        (ColumnType::Real, Some(_)) => PlainGroup::NeedsBin,
        _ => PlainGroup::Undeclared,
    }
}

/// Whether validation accepts `group = "declared"` on this column.
pub(crate) fn declared_grouping_ok(col: &Column) -> bool {
    col.group != Grouping::Declared || !matches!(plain_group(col), PlainGroup::Undeclared)
}

/// Number of bins `bin(col, width)` makes over `[lower, upper]`: edges start at
/// floor(lower / width) * width and step by width until upper is covered.
pub(crate) fn bin_count(lower: f64, upper: f64, width: f64) -> f64 {
    let start = (lower / width).floor() * width;
    ((upper - start) / width).ceil().max(1.0)
}

/// Edges of `bin(col, width)`; call only after `bin_count` was checked small.
pub(crate) fn bin_edges(lower: f64, upper: f64, width: f64) -> Vec<f64> {
    let start = (lower / width).floor() * width;
    let n = bin_count(lower, upper, width) as usize;
    // Multiply rather than accumulate so edges do not drift.
    (0..=n).map(|k| start + k as f64 * width).collect()
}
