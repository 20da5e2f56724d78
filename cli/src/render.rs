//! Showing a combined result: an aligned table with 95% intervals, CSV, the JSON object
//! `phm query --format json` prints, and plain-English coverage lines; and writing to
//! standard output so that a reader going away (`phm query … | head`) is a normal end.

use phm_proto::proto::{self, CombinedCell, CombinedResult, NodeRef};
use phm_proto::{Aggregate, AggregateKind, DenialReason};
use serde_json::{Value, json};
use std::io::Write;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

// ---------------------------------------------------------------------------------
// Standard output.
//
// `println!` panics when stdout is a pipe whose reader has gone (Rust ignores SIGPIPE,
// so the write fails with EPIPE), which `phm query … | head` turned into "failed
// printing to stdout: Broken pipe" and exit 101. Restoring SIGPIPE's default instead
// would kill the process with a signal (status 141, not 0), and would do so in
// `phm node` / `phm coordinator` too when a log pipe closes. So every command prints
// through `out!`/`outln!`: a closed pipe silently ends output (exit status unchanged,
// 0 for a successful command); any other write error is reported once at exit.

static STDOUT_CLOSED: AtomicBool = AtomicBool::new(false);
static STDOUT_ERROR: OnceLock<String> = OnceLock::new();

/// Write to stdout (flushed). After the reader has gone, or after a failed write,
/// further output is dropped; [`stdout_error`] says whether that was a real failure.
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    if STDOUT_CLOSED.load(Ordering::Relaxed) || STDOUT_ERROR.get().is_some() {
        return;
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            STDOUT_CLOSED.store(true, Ordering::Relaxed);
        } else {
            let _ = STDOUT_ERROR.set(e.to_string());
        }
    }
}

/// A write to stdout that failed for a reason other than the reader going away
/// (e.g. a full disk behind `> file`): the command must not report success.
pub fn stdout_error() -> Option<&'static str> {
    STDOUT_ERROR.get().map(String::as_str)
}

/// `print!` that treats a closed stdout as the end of output instead of panicking.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::render::write_stdout(format_args!($($arg)*)) };
}

/// `println!` that treats a closed stdout as the end of output instead of panicking.
#[macro_export]
macro_rules! outln {
    () => { $crate::render::write_stdout(format_args!("\n")) };
    ($($arg:tt)*) => {
        $crate::render::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

/// "Riverside Borough Council (LA801)", or the id alone when the name is unknown.
pub fn node_label(n: Option<&NodeRef>) -> String {
    match n {
        Some(n) if !n.name.is_empty() && n.name != n.node_id => {
            format!("{} ({})", n.name, n.node_id)
        }
        Some(n) => n.node_id.clone(),
        None => "unknown node".into(),
    }
}

pub fn reason_name(code: i32) -> &'static str {
    phm_proto::denial::reason_name(
        DenialReason::try_from(code).unwrap_or(DenialReason::Unspecified),
    )
}

/// Digits after the decimal point to show for an aggregate.
pub fn decimals(kind: Option<AggregateKind>) -> usize {
    match kind {
        Some(AggregateKind::Mean) => 1,
        _ => 0,
    }
}

/// 12345.6 → "12,346" (0 decimals) or "12,345.6".
pub fn number(v: f64, decimals: usize) -> String {
    if !v.is_finite() {
        return "–".into();
    }
    let text = format!("{:.*}", decimals, v.abs());
    let (int, frac) = match text.split_once('.') {
        Some((i, f)) => (i.to_string(), Some(f.to_string())),
        None => (text, None),
    };
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    let negative = v < 0.0 && text_is_nonzero(&grouped, frac.as_deref());
    let mut out = if negative {
        format!("-{grouped}")
    } else {
        grouped
    };
    if let Some(f) = frac {
        out.push('.');
        out.push_str(&f);
    }
    out
}

fn text_is_nonzero(int: &str, frac: Option<&str>) -> bool {
    int.chars().any(|c| c.is_ascii_digit() && c != '0')
        || frac.is_some_and(|f| f.chars().any(|c| c != '0'))
}

/// "1,234 (1,210 – 1,258)" or "suppressed (reason)".
pub fn cell_text(cell: &CombinedCell, decimals: usize) -> String {
    if cell.suppressed {
        let reason = if cell.suppression_reason.is_empty() {
            "below the reportable minimum"
        } else {
            cell.suppression_reason.as_str()
        };
        return format!("suppressed ({reason})");
    }
    format!(
        "{} ({} – {})",
        number(cell.estimate, decimals),
        number(cell.ci95_low, decimals),
        number(cell.ci95_high, decimals)
    )
}

fn kind_of(aggs: &[Aggregate], alias: &str) -> Option<AggregateKind> {
    aggs.iter().find(|a| a.alias == alias).map(|a| a.kind)
}

fn cell<'a>(row: &'a proto::CombinedRow, alias: &str, i: usize) -> Option<&'a CombinedCell> {
    row.cells
        .iter()
        .find(|c| c.alias == alias)
        .or_else(|| row.cells.get(i))
}

/// Lay out rows of text as an aligned table: text columns left, the rest right.
pub fn layout(header: &[String], rows: &[Vec<String>], left: usize) -> String {
    let cols = header.len();
    let mut width = vec![0usize; cols];
    for r in std::iter::once(header).chain(rows.iter().map(Vec::as_slice)) {
        for (i, c) in r.iter().enumerate().take(cols) {
            width[i] = width[i].max(c.chars().count());
        }
    }
    let line = |r: &[String]| {
        let mut s = String::from("  ");
        for (i, c) in r.iter().enumerate().take(cols) {
            let pad = width[i] - c.chars().count();
            if i < left {
                s.push_str(c);
                s.push_str(&" ".repeat(pad));
            } else {
                s.push_str(&" ".repeat(pad));
                s.push_str(c);
            }
            if i + 1 < cols {
                s.push_str("   ");
            }
        }
        s.trim_end().to_string() + "\n"
    };
    let mut out = line(header);
    out.push_str("  ");
    out.push_str(&"-".repeat(width.iter().sum::<usize>() + 3 * cols.saturating_sub(1)));
    out.push('\n');
    for r in rows {
        out.push_str(&line(r));
    }
    out
}

/// Suppression reasons are long sentences: tables show `suppressed [n]` and list each
/// distinct reason once underneath.
#[derive(Debug, Default)]
pub struct Notes(Vec<String>);

impl Notes {
    /// `cell_text`, with a suppressed cell's reason replaced by a note number.
    pub fn cell(&mut self, cell: &CombinedCell, decimals: usize) -> String {
        if !cell.suppressed {
            let text = cell_text(cell, decimals);
            if cell.note.is_empty() {
                return text;
            }
            return format!("{text} [{}]", self.number(&cell.note));
        }
        let reason = if cell.suppression_reason.is_empty() {
            "below the reportable minimum".to_string()
        } else {
            cell.suppression_reason.clone()
        };
        let n = match self.0.iter().position(|r| *r == reason) {
            Some(i) => i + 1,
            None => {
                self.0.push(reason);
                self.0.len()
            }
        };
        format!("suppressed [{n}]")
    }

    /// The number of `note`, adding it if it is new.
    pub fn number(&mut self, note: &str) -> usize {
        match self.0.iter().position(|r| r == note) {
            Some(i) => i + 1,
            None => {
                self.0.push(note.to_string());
                self.0.len()
            }
        }
    }

    /// `  [1] reason` lines, or nothing.
    pub fn render(&self) -> String {
        self.0
            .iter()
            .enumerate()
            .map(|(i, r)| format!("  [{}] {r}\n", i + 1))
            .collect()
    }
}

/// The result as an aligned table: group keys, then each aggregate as
/// `estimate (95% interval)`, suppressed cells as `suppressed [n]` with the reasons
/// listed underneath.
pub fn table(result: &CombinedResult, aggs: &[Aggregate]) -> String {
    let mut notes = Notes::default();
    let mut header: Vec<String> = result.group_columns.clone();
    header.extend(
        result
            .aggregate_aliases
            .iter()
            .map(|a| format!("{a} (95% CI)")),
    );
    let rows: Vec<Vec<String>> = result
        .rows
        .iter()
        .map(|row| {
            let mut r = row.key.clone();
            // A group some answering partners did not release: its total is too low by
            // an amount the intervals do not cover, so the row says so.
            if !row.note.is_empty()
                && let Some(last) = r.last_mut()
            {
                let n = notes.number(&row.note);
                last.push_str(&format!(" [{n}]"));
            }
            for (i, alias) in result.aggregate_aliases.iter().enumerate() {
                r.push(
                    cell(row, alias, i)
                        .map(|c| notes.cell(c, decimals(kind_of(aggs, alias))))
                        .unwrap_or_else(|| "–".into()),
                );
            }
            r
        })
        .collect();
    layout(&header, &rows, result.group_columns.len()) + &notes.render()
}

/// Everything `phm query --format table` prints: the dataset and query id, the table,
/// coverage, the note on what the total means, and the budget spent. When no partner
/// answered there is nothing to tabulate, so only the coverage lines (who refused and
/// why) are printed: an empty table header above them read as an empty answer.
pub fn table_report(result: &CombinedResult, aggs: &[Aggregate]) -> String {
    let coverage = result.coverage.clone().unwrap_or_default();
    let mut t = String::new();
    if coverage.answered.is_empty() && result.rows.is_empty() {
        for line in coverage_lines(result) {
            t.push_str(&line);
            t.push('\n');
        }
        return t;
    }
    t.push_str(&format!("{} — query {}\n", result.dataset, result.query_id));
    t.push_str(&table(result, aggs));
    t.push('\n');
    for line in coverage_lines(result) {
        t.push_str(&line);
        t.push('\n');
    }
    if !result.total_note.is_empty() {
        t.push_str(&result.total_note);
        t.push('\n');
    }
    if result.delta_spent_per_node > 0.0 {
        t.push_str(&format!(
            "Privacy budget spent: ε {}, δ {:e} at each answering partner.\n",
            result.epsilon_spent_per_node, result.delta_spent_per_node
        ));
    } else {
        t.push_str(&format!(
            "Privacy budget spent: ε {} at each answering partner.\n",
            result.epsilon_spent_per_node
        ));
    }
    t
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// One header line, then one line per group: keys, then per aggregate the estimate,
/// the interval bounds and whether it was suppressed.
pub fn csv(result: &CombinedResult) -> String {
    let mut header: Vec<String> = result.group_columns.clone();
    for a in &result.aggregate_aliases {
        header.extend([
            a.clone(),
            format!("{a}_ci95_low"),
            format!("{a}_ci95_high"),
            format!("{a}_suppressed"),
        ]);
    }
    let mut out = header
        .iter()
        .map(|h| csv_field(h))
        .collect::<Vec<_>>()
        .join(",");
    out.push('\n');
    for row in &result.rows {
        let mut fields: Vec<String> = row.key.iter().map(|k| csv_field(k)).collect();
        for (i, alias) in result.aggregate_aliases.iter().enumerate() {
            match cell(row, alias, i) {
                Some(c) if !c.suppressed => fields.extend([
                    c.estimate.to_string(),
                    c.ci95_low.to_string(),
                    c.ci95_high.to_string(),
                    "false".into(),
                ]),
                _ => fields.extend([String::new(), String::new(), String::new(), "true".into()]),
            }
        }
        out.push_str(&fields.join(","));
        out.push('\n');
    }
    out
}

fn total_kind_name(k: i32) -> &'static str {
    match proto::TotalKind::try_from(k) {
        Ok(proto::TotalKind::DistinctPeople) => "distinct_people",
        Ok(proto::TotalKind::SumOfPartnerCounts) => "sum_of_partner_counts",
        _ => "unspecified",
    }
}

fn finite(v: f64) -> Value {
    if v.is_finite() { json!(v) } else { Value::Null }
}

/// The single JSON object `phm query --format json` prints.
pub fn json(result: &CombinedResult) -> Value {
    let coverage = result.coverage.clone().unwrap_or_default();
    let ids = |v: &[NodeRef]| -> Vec<Value> { v.iter().map(|n| json!(n.node_id)).collect() };
    let refusals = |v: &[proto::NodeRefusal]| -> Vec<Value> {
        v.iter()
            .map(|r| {
                json!({
                    "node": r.node.as_ref().map(|n| n.node_id.clone()).unwrap_or_default(),
                    "reason": reason_name(r.reason),
                    "message": r.message,
                })
            })
            .collect()
    };
    let rows: Vec<Value> = result
        .rows
        .iter()
        .map(|row| {
            let group: serde_json::Map<String, Value> = result
                .group_columns
                .iter()
                .zip(&row.key)
                .map(|(c, k)| (c.clone(), json!(k)))
                .collect();
            let values: serde_json::Map<String, Value> = result
                .aggregate_aliases
                .iter()
                .enumerate()
                .filter_map(|(i, alias)| cell(row, alias, i).map(|c| (alias, c)))
                .map(|(alias, c)| {
                    let v = if c.suppressed {
                        json!({
                            "estimate": Value::Null,
                            "ci95": Value::Null,
                            "noise_scale": finite(c.standard_error),
                            "suppressed": true,
                            "reason": c.suppression_reason,
                            "contributors": c.contributors,
                        })
                    } else {
                        json!({
                            "estimate": finite(c.estimate),
                            "ci95": [finite(c.ci95_low), finite(c.ci95_high)],
                            "noise_scale": finite(c.standard_error),
                            "suppressed": false,
                            "reason": Value::Null,
                            "contributors": c.contributors,
                            "note": (!c.note.is_empty()).then(|| c.note.clone()),
                        })
                    };
                    (alias.clone(), v)
                })
                .collect();
            json!({
                "group": group,
                "values": values,
                "partners_missing": row.missing,
                "note": (!row.note.is_empty()).then(|| row.note.clone()),
            })
        })
        .collect();
    json!({
        "query_id": result.query_id,
        "dataset": result.dataset,
        "total_kind": total_kind_name(result.total_kind),
        "total_note": result.total_note,
        "partial": coverage.partial,
        "coverage": {
            "answered": ids(&coverage.answered),
            "refused": refusals(&coverage.refused),
            "unreachable": ids(&coverage.unreachable),
            "timed_out": ids(&coverage.timed_out),
            "malformed": refusals(&coverage.malformed),
        },
        "rows": rows,
        "epsilon_spent": finite(result.epsilon_spent_per_node),
        "delta_spent": finite(result.delta_spent_per_node),
    })
}

/// How many partners the query went to.
pub fn partners_asked(c: &proto::Coverage) -> usize {
    c.answered.len() + c.refused.len() + c.unreachable.len() + c.timed_out.len() + c.malformed.len()
}

/// Plain-English coverage: who answered, who refused and why, who was not reached.
pub fn coverage_lines(result: &CombinedResult) -> Vec<String> {
    let c = result.coverage.clone().unwrap_or_default();
    let total = partners_asked(&c);
    let mut first = format!(
        "{} of {} partner{} answered",
        c.answered.len(),
        total,
        if total == 1 { "" } else { "s" }
    );
    let mut others = Vec::new();
    for r in &c.refused {
        others.push(format!(
            "{} refused: {} — {}",
            node_label(r.node.as_ref()),
            reason_name(r.reason),
            r.message
        ));
    }
    for n in &c.unreachable {
        others.push(format!("{} could not be reached", node_label(Some(n))));
    }
    for n in &c.timed_out {
        others.push(format!("{} did not answer in time", node_label(Some(n))));
    }
    for r in &c.malformed {
        others.push(format!(
            "{} answered but was excluded: {}",
            node_label(r.node.as_ref()),
            r.message
        ));
    }
    if others.len() == 1 {
        first.push_str("; ");
        first.push_str(&others[0]);
        others.clear();
    } else {
        first.push('.');
    }
    let mut lines = vec![first];
    lines.extend(others.into_iter().map(|o| format!("  {o}")));
    if c.population_registered > 0.0 && c.population_answered > 0.0 {
        lines.push(format!(
            "Population behind the answer: about {} of {} (noisy counts).",
            number(c.population_answered, 0),
            number(c.population_registered, 0)
        ));
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_group_thousands_and_keep_sign() {
        assert_eq!(number(1234567.4, 0), "1,234,567");
        assert_eq!(number(-1234.56, 1), "-1,234.6");
        assert_eq!(number(-0.01, 0), "0");
        assert_eq!(number(999.0, 0), "999");
        assert_eq!(number(f64::NAN, 0), "–");
    }

    fn result() -> CombinedResult {
        CombinedResult {
            query_id: "q".into(),
            dataset: "gp_patients".into(),
            group_columns: vec!["sex".into()],
            aggregate_aliases: vec!["people".into()],
            rows: vec![
                proto::CombinedRow {
                    key: vec!["F".into()],
                    cells: vec![CombinedCell {
                        alias: "people".into(),
                        estimate: 5012.0,
                        standard_error: 4.0,
                        ci95_low: 5004.2,
                        ci95_high: 5019.8,
                        suppressed: false,
                        suppression_reason: String::new(),
                        contributors: 2,
                        note: String::new(),
                    }],
                    ..Default::default()
                },
                proto::CombinedRow {
                    key: vec!["U, other".into()],
                    cells: vec![CombinedCell {
                        alias: "people".into(),
                        suppressed: true,
                        suppression_reason: "fewer than 7".into(),
                        ..Default::default()
                    }],
                    ..Default::default()
                },
            ],
            coverage: Some(proto::Coverage {
                answered: vec![NodeRef {
                    node_id: "A".into(),
                    name: "Alpha Surgery".into(),
                    ..Default::default()
                }],
                refused: vec![proto::NodeRefusal {
                    node: Some(NodeRef {
                        node_id: "LA1".into(),
                        name: "Riverside LA".into(),
                        ..Default::default()
                    }),
                    reason: DenialReason::PolicyDenied as i32,
                    message: "housing_tenure may not be grouped".into(),
                }],
                partial: true,
                ..Default::default()
            }),
            total_kind: proto::TotalKind::DistinctPeople as i32,
            epsilon_spent_per_node: 0.5,
            ..Default::default()
        }
    }

    #[test]
    fn table_csv_json_and_coverage() {
        let r = result();
        let t = table(&r, &[]);
        assert!(t.contains("5,012 (5,004 – 5,020)"), "{t}");
        assert!(t.contains("suppressed [1]"), "{t}");
        assert!(t.contains("  [1] fewer than 7"), "{t}");
        let c = csv(&r);
        assert_eq!(
            c.lines().collect::<Vec<_>>(),
            vec![
                "sex,people,people_ci95_low,people_ci95_high,people_suppressed",
                "F,5012,5004.2,5019.8,false",
                "\"U, other\",,,,true",
            ]
        );
        let j = json(&r);
        assert_eq!(j["rows"][0]["group"]["sex"], "F");
        assert_eq!(j["rows"][0]["values"]["people"]["ci95"][1], 5019.8);
        assert_eq!(j["rows"][1]["values"]["people"]["suppressed"], true);
        assert_eq!(j["coverage"]["refused"][0]["reason"], "POLICY_DENIED");
        assert_eq!(j["total_kind"], "distinct_people");
        assert_eq!(j["epsilon_spent"], 0.5);
        let lines = coverage_lines(&r);
        assert_eq!(
            lines[0],
            "1 of 2 partners answered; Riverside LA (LA1) refused: POLICY_DENIED — housing_tenure may not be grouped"
        );
        let report = table_report(&r, &[]);
        assert!(report.starts_with("gp_patients — query q\n"), "{report}");
        assert!(report.contains("people (95% CI)"), "{report}");
        assert!(report.contains("Privacy budget spent: ε 0.5"), "{report}");
    }

    #[test]
    fn when_every_partner_refuses_only_the_refusals_are_printed() {
        let mut r = result();
        r.rows.clear();
        let mut c = r.coverage.clone().unwrap();
        c.answered.clear();
        c.refused.push(proto::NodeRefusal {
            node: Some(NodeRef {
                node_id: "RW2".into(),
                name: "Wolds and Coast".into(),
                ..Default::default()
            }),
            reason: DenialReason::PermissionDenied as i32,
            message: "this node answers only its federation's coordinator".into(),
        });
        r.coverage = Some(c);
        let report = table_report(&r, &[]);
        assert!(!report.contains("(95% CI)"), "{report}");
        assert!(!report.contains("---"), "{report}");
        assert!(!report.contains("Privacy budget spent"), "{report}");
        assert_eq!(
            report.lines().collect::<Vec<_>>(),
            vec![
                "0 of 2 partners answered.",
                "  Riverside LA (LA1) refused: POLICY_DENIED — housing_tenure may not be grouped",
                "  Wolds and Coast (RW2) refused: PERMISSION_DENIED — this node answers only its federation's coordinator",
            ]
        );
    }
}
