//! Combining the nodes' noisy answers into system-level estimates with honest
//! uncertainty: validation of each answer, totals with summed noise variances, ratio
//! estimates for means, suppression, rounding, and the breakdown rules that keep
//! system-total-only partners from ever being shown on their own.
//!
//! Pure: no IO, no gRPC. Inputs are the nodes' `AggregateResult` messages (plain data).
//!
//! # The statistics
//!
//! Each node adds independent noise of known variance to each figure. For a total
//! (COUNT, SUM) the combined estimate is the sum of the nodes' noisy values and, since
//! independent noises add their variances, the combined variance is the sum of the
//! variances. The 95% interval is `estimate ± 1.96·sqrt(variance)`: the normal
//! approximation of a sum of independent noises (good when several nodes contribute;
//! for a single Laplace noise it is slightly narrow in the tails).
//!
//! A mean is combined as a ratio estimate `R = S / C`, the total noisy sum over the
//! total noisy count, with the delta-method variance
//! `var(R) ≈ (var_S + R²·var_C) / C²` (noise in S and C independent).
//!
//! # Disclosure control
//!
//! * A combined cell is suppressed when the group's combined COUNT estimate is at or
//!   below the strictest (largest) `min_reportable_count` among the answering nodes —
//!   the same "at or below" rule the nodes apply — and then the group's SUM and MEAN
//!   are suppressed too. Without a COUNT in the query the MEAN's combined noisy count
//!   is used; a SUM-only query has no count to test.
//! * Rounding: the wire does not carry each node's rounding rule, so the coordinator
//!   reads it from the answers and fails closed: a node counts as "rounding" unless it
//!   demonstrably released an unrounded figure (an unsuppressed COUNT/SUM whose
//!   displayed estimate equals its noisy value and is not a multiple of 5). When any
//!   answering node rounds, combined counts and sums and their interval bounds are
//!   shown to the nearest 5 and means and their bounds to 1 decimal place. Standard
//!   errors are not rounded: they depend only on the public noise parameters.
//! * Partners whose release scope is system-total-only are never shown on their own:
//!   partner breakdowns are built only from standalone partners, a Place/PCN breakdown
//!   only when every answering partner in it is standalone, and any breakdown that
//!   would let a reader subtract their way to one system-total-only partner's figures
//!   (total minus the published parts) is withheld.

use phm_proto::AggregateKind;
use phm_proto::proto;
use std::collections::HashMap;

/// z for a two-sided 95% normal interval.
pub const Z95: f64 = 1.96;

/// Who a node is, as registered with the coordinator.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeMeta {
    pub id: String,
    pub ods_code: String,
    pub name: String,
    pub kind: String,
    pub place: String,
    pub pcn: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Standalone,
    SystemTotalOnly,
}

/// What a valid answer to the query must look like.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    pub query_id: String,
    pub dataset: String,
    pub group_columns: Vec<String>,
    pub aliases: Vec<String>,
    pub kinds: Vec<AggregateKind>,
}

impl Expected {
    pub fn from_query(q: &phm_proto::QueryBody) -> Expected {
        Expected {
            query_id: q.query_id.clone(),
            dataset: q.dataset.clone(),
            group_columns: q.group_by.iter().map(phm_proto::GroupKey::label).collect(),
            aliases: q.aggregates.iter().map(|a| a.alias.clone()).collect(),
            kinds: q.aggregates.iter().map(|a| a.kind).collect(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MeanParts {
    pub noisy_sum: f64,
    pub sum_variance: f64,
    pub noisy_count: f64,
    pub count_variance: f64,
}

/// One figure as a node released it.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeCell {
    pub estimate: f64,
    pub noisy_value: f64,
    pub variance: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    pub suppressed: bool,
    pub suppression_reason: String,
    pub mean: Option<MeanParts>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct NodeRow {
    pub key: Vec<String>,
    pub cells: Vec<NodeCell>,
}

/// A node's answer that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeAnswer {
    pub node: NodeMeta,
    pub scope: Scope,
    pub min_reportable_count: f64,
    pub population_noisy: f64,
    pub epsilon_spent: f64,
    pub rows: Vec<NodeRow>,
}

/// Why a node's answer was excluded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

fn finite(what: &str, v: f64) -> Result<(), Malformed> {
    if v.is_finite() {
        Ok(())
    } else {
        Err(Malformed(format!("{what} is not a finite number ({v})")))
    }
}

fn non_negative(what: &str, v: f64) -> Result<(), Malformed> {
    finite(what, v)?;
    if v < 0.0 {
        return Err(Malformed(format!("{what} is negative ({v})")));
    }
    Ok(())
}

/// Check a node's result against the query and convert it. Answers are compared with
/// the query rather than with each other so each node can be judged as it arrives.
pub fn validate(
    expected: &Expected,
    node: NodeMeta,
    r: proto::AggregateResult,
) -> Result<NodeAnswer, Malformed> {
    if r.query_id != expected.query_id {
        return Err(Malformed(format!(
            "answered query id {:?}, expected {:?}",
            r.query_id, expected.query_id
        )));
    }
    if r.dataset != expected.dataset {
        return Err(Malformed(format!(
            "answered for dataset {:?}, expected {:?}",
            r.dataset, expected.dataset
        )));
    }
    if r.group_columns != expected.group_columns {
        return Err(Malformed(format!(
            "group columns {:?} do not match the query's {:?}",
            r.group_columns, expected.group_columns
        )));
    }
    if r.aggregate_aliases != expected.aliases {
        return Err(Malformed(format!(
            "aggregate aliases {:?} do not match the query's {:?}",
            r.aggregate_aliases, expected.aliases
        )));
    }
    non_negative("min_reportable_count", r.min_reportable_count)?;
    non_negative("epsilon_spent", r.epsilon_spent)?;
    finite("population_noisy", r.population_noisy)?;
    if expected.group_columns.is_empty() && r.rows.len() != 1 {
        return Err(Malformed(format!(
            "an ungrouped query needs exactly one row, got {}",
            r.rows.len()
        )));
    }
    let mut seen = std::collections::HashSet::new();
    let mut rows = Vec::with_capacity(r.rows.len());
    for (ri, row) in r.rows.into_iter().enumerate() {
        if row.key.len() != expected.group_columns.len() {
            return Err(Malformed(format!(
                "row {ri} has {} key values for {} group columns",
                row.key.len(),
                expected.group_columns.len()
            )));
        }
        if !seen.insert(row.key.clone()) {
            return Err(Malformed(format!("group {:?} appears twice", row.key)));
        }
        if row.cells.len() != expected.aliases.len() {
            return Err(Malformed(format!(
                "group {:?} has {} cells for {} aggregates (missing cells)",
                row.key,
                row.cells.len(),
                expected.aliases.len()
            )));
        }
        let mut cells = Vec::with_capacity(row.cells.len());
        for (ci, c) in row.cells.into_iter().enumerate() {
            let alias = &expected.aliases[ci];
            if c.alias != *alias {
                return Err(Malformed(format!(
                    "group {:?}: cell {ci} is {:?}, expected {alias:?}",
                    row.key, c.alias
                )));
            }
            let at = |f: &str| format!("group {:?} {alias}.{f}", row.key);
            finite(&at("estimate"), c.estimate)?;
            finite(&at("noisy_value"), c.noisy_value)?;
            non_negative(&at("variance"), c.variance)?;
            non_negative(&at("noise_scale"), c.noise_scale)?;
            finite(&at("ci95_low"), c.ci95_low)?;
            finite(&at("ci95_high"), c.ci95_high)?;
            let mean = match (expected.kinds[ci], c.mean) {
                (AggregateKind::Mean, None) => {
                    return Err(Malformed(format!(
                        "group {:?}: mean {alias} has no sum and count parts",
                        row.key
                    )));
                }
                (AggregateKind::Mean, Some(m)) => {
                    finite(&at("mean.noisy_sum"), m.noisy_sum)?;
                    non_negative(&at("mean.sum_variance"), m.sum_variance)?;
                    finite(&at("mean.noisy_count"), m.noisy_count)?;
                    non_negative(&at("mean.count_variance"), m.count_variance)?;
                    Some(MeanParts {
                        noisy_sum: m.noisy_sum,
                        sum_variance: m.sum_variance,
                        noisy_count: m.noisy_count,
                        count_variance: m.count_variance,
                    })
                }
                _ => None,
            };
            cells.push(NodeCell {
                estimate: c.estimate,
                noisy_value: c.noisy_value,
                variance: c.variance,
                ci95_low: c.ci95_low,
                ci95_high: c.ci95_high,
                suppressed: c.suppressed,
                suppression_reason: c.suppression_reason,
                mean,
            });
        }
        rows.push(NodeRow {
            key: row.key,
            cells,
        });
    }
    let scope = if r.release_scope == proto::ReleaseScope::Standalone as i32 {
        Scope::Standalone
    } else {
        // Unspecified or unknown scopes are read as the restrictive one.
        Scope::SystemTotalOnly
    };
    Ok(NodeAnswer {
        node,
        scope,
        min_reportable_count: r.min_reportable_count,
        population_noisy: r.population_noisy,
        epsilon_spent: r.epsilon_spent,
        rows,
    })
}

/// One combined figure.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Cell {
    pub alias: String,
    pub estimate: f64,
    pub standard_error: f64,
    pub ci95_low: f64,
    pub ci95_high: f64,
    pub suppressed: bool,
    pub suppression_reason: String,
    pub contributors: u32,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub key: Vec<String>,
    pub cells: Vec<Cell>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Partner,
    Place,
    Pcn,
}

impl Level {
    pub fn as_str(self) -> &'static str {
        match self {
            Level::Partner => "partner",
            Level::Place => "place",
            Level::Pcn => "pcn",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Breakdown {
    pub level: Level,
    pub label: String,
    pub rows: Vec<Row>,
}

/// The system-level answer.
#[derive(Debug, Clone, PartialEq)]
pub struct Combined {
    pub rows: Vec<Row>,
    pub breakdowns: Vec<Breakdown>,
    /// Strictest minimum reportable count among the answering nodes.
    pub min_reportable_count: f64,
    pub epsilon_spent_per_node: f64,
    /// Whether displayed figures were rounded (see the module docs).
    pub rounded: bool,
}

/// Whether a node's answer shows it rounds (fail closed: yes unless shown otherwise).
pub fn node_rounds(expected: &Expected, a: &NodeAnswer) -> bool {
    let mut unrounded_seen = false;
    for row in &a.rows {
        for (c, kind) in row.cells.iter().zip(&expected.kinds) {
            if c.suppressed || !matches!(kind, AggregateKind::Count | AggregateKind::Sum) {
                continue;
            }
            if c.estimate != c.noisy_value {
                return true;
            }
            if (c.noisy_value / 5.0).fract() != 0.0 {
                unrounded_seen = true;
            }
        }
    }
    !unrounded_seen
}

fn round_to(x: f64, step: f64) -> f64 {
    // `+ 0.0` turns -0.0 into 0.0 so "−0" is never displayed.
    (x / step).round() * step + 0.0
}

fn floor_to(x: f64, step: f64) -> f64 {
    // The small tolerance keeps an exact multiple (e.g. 0.3 / 0.1) from dropping a step.
    ((x / step) + 1e-9).floor() * step + 0.0
}

fn ceil_to(x: f64, step: f64) -> f64 {
    ((x / step) - 1e-9).ceil() * step + 0.0
}

fn suppressed_cell(alias: &str, reason: impl Into<String>, contributors: u32) -> Cell {
    Cell {
        alias: alias.to_string(),
        suppressed: true,
        suppression_reason: reason.into(),
        contributors,
        ..Cell::default()
    }
}

/// Combine the cells of one group from several nodes.
fn combine_group(
    expected: &Expected,
    parts: &[&NodeRow],
    threshold: f64,
    rounded: bool,
) -> Vec<Cell> {
    let n = u32::try_from(parts.len()).unwrap_or(u32::MAX);
    let mut cells: Vec<Cell> = Vec::with_capacity(expected.aliases.len());
    // The count that decides group suppression: the first COUNT, else the first MEAN's.
    let mut group_count: Option<f64> = None;
    for (i, (alias, kind)) in expected.aliases.iter().zip(&expected.kinds).enumerate() {
        let cell = match kind {
            AggregateKind::Count | AggregateKind::Sum => {
                let est: f64 = parts.iter().map(|r| r.cells[i].noisy_value).sum();
                let var: f64 = parts.iter().map(|r| r.cells[i].variance).sum();
                if *kind == AggregateKind::Count && group_count.is_none() {
                    group_count = Some(est);
                }
                let se = var.sqrt();
                let (mut lo, mut hi) = match parts {
                    // One contributor: its own interval comes from the mechanism's exact
                    // distribution, which is honest where the normal approximation of a
                    // single (heavy-tailed) Laplace term would undercover.
                    [only] => (only.cells[i].ci95_low, only.cells[i].ci95_high),
                    _ => (est - Z95 * se, est + Z95 * se),
                };
                if *kind == AggregateKind::Count {
                    // A count is never negative: trimming the interval to where the true
                    // value can lie only improves its coverage.
                    lo = lo.max(0.0);
                }
                let mut e = est;
                if rounded {
                    // Round the bounds outwards so rounding never narrows the interval.
                    (e, lo, hi) = (round_to(e, 5.0), floor_to(lo, 5.0), ceil_to(hi, 5.0));
                }
                let mut c = Cell {
                    alias: alias.clone(),
                    estimate: e,
                    standard_error: se,
                    ci95_low: lo,
                    ci95_high: hi,
                    contributors: n,
                    ..Cell::default()
                };
                if *kind == AggregateKind::Count && est <= threshold {
                    c = suppressed_cell(alias, low_count_reason(threshold), n);
                }
                c
            }
            AggregateKind::Mean => {
                let mut s = 0.0;
                let mut vs = 0.0;
                let mut cnt = 0.0;
                let mut vc = 0.0;
                for r in parts {
                    // validate() guarantees mean parts on MEAN cells.
                    if let Some(m) = r.cells[i].mean {
                        s += m.noisy_sum;
                        vs += m.sum_variance;
                        cnt += m.noisy_count;
                        vc += m.count_variance;
                    }
                }
                if group_count.is_none() {
                    group_count = Some(cnt);
                }
                if cnt <= 0.0 {
                    suppressed_cell(
                        alias,
                        "The combined noisy count is not positive, so no mean can be formed.",
                        n,
                    )
                } else {
                    let ratio = s / cnt;
                    let var = (vs + ratio * ratio * vc) / (cnt * cnt);
                    let se = var.sqrt();
                    let (mut e, mut lo, mut hi) = (ratio, ratio - Z95 * se, ratio + Z95 * se);
                    if rounded {
                        (e, lo, hi) = (round_to(e, 0.1), floor_to(lo, 0.1), ceil_to(hi, 0.1));
                    }
                    Cell {
                        alias: alias.clone(),
                        estimate: e,
                        standard_error: se,
                        ci95_low: lo,
                        ci95_high: hi,
                        contributors: n,
                        ..Cell::default()
                    }
                }
            }
            AggregateKind::Quantile(_) => {
                suppressed_cell(alias, "Quantiles cannot be combined across partners.", n)
            }
        };
        cells.push(cell);
    }
    if let Some(c) = group_count
        && c <= threshold
    {
        for cell in &mut cells {
            if !cell.suppressed {
                *cell = suppressed_cell(&cell.alias, low_count_reason(threshold), n);
            }
        }
    }
    cells
}

fn low_count_reason(threshold: f64) -> String {
    format!(
        "Suppressed: the group's combined count is at or below {threshold}, the strictest \
         minimum reportable count among the answering partners."
    )
}

/// Group rows of the given answers by key, in order of first appearance.
fn group_rows<'a>(answers: &[&'a NodeAnswer]) -> Vec<(Vec<String>, Vec<&'a NodeRow>)> {
    let mut order: Vec<(Vec<String>, Vec<&NodeRow>)> = Vec::new();
    let mut index: HashMap<&[String], usize> = HashMap::new();
    for a in answers {
        for row in &a.rows {
            match index.get(row.key.as_slice()) {
                Some(&i) => order[i].1.push(row),
                None => {
                    index.insert(row.key.as_slice(), order.len());
                    order.push((row.key.clone(), vec![row]));
                }
            }
        }
    }
    order
}

fn combine_rows(
    expected: &Expected,
    answers: &[&NodeAnswer],
    threshold: f64,
    rounded: bool,
) -> Vec<Row> {
    group_rows(answers)
        .into_iter()
        .map(|(key, parts)| Row {
            cells: combine_group(expected, &parts, threshold, rounded),
            key,
        })
        .collect()
}

/// A partner's own figures, as the node released them (its rounding and suppression).
fn partner_rows(expected: &Expected, a: &NodeAnswer) -> Vec<Row> {
    a.rows
        .iter()
        .map(|row| Row {
            key: row.key.clone(),
            cells: row
                .cells
                .iter()
                .zip(&expected.aliases)
                .map(|(c, alias)| {
                    if c.suppressed {
                        let reason = if c.suppression_reason.is_empty() {
                            "Suppressed by the partner's policy.".to_string()
                        } else {
                            c.suppression_reason.clone()
                        };
                        suppressed_cell(alias, reason, 1)
                    } else {
                        Cell {
                            alias: alias.clone(),
                            estimate: c.estimate,
                            standard_error: c.variance.sqrt(),
                            ci95_low: c.ci95_low,
                            ci95_high: c.ci95_high,
                            contributors: 1,
                            ..Cell::default()
                        }
                    }
                })
                .collect(),
        })
        .collect()
}

/// Row-reduced basis of published linear combinations of node answers, used to check
/// that no single system-total-only node can be recovered by adding and subtracting
/// published figures.
struct Span {
    n: usize,
    /// Rows in reduced row echelon form, with their pivot columns.
    rows: Vec<(usize, Vec<f64>)>,
}

const EPS: f64 = 1e-9;

impl Span {
    fn new(n: usize) -> Span {
        Span {
            n,
            rows: Vec::new(),
        }
    }

    /// Add a vector; keeps the basis fully reduced.
    fn add(&mut self, v: &[f64]) {
        let mut v = v.to_vec();
        for (p, r) in &self.rows {
            let f = v[*p];
            if f.abs() > EPS {
                v.iter_mut().zip(r).for_each(|(x, y)| *x -= f * y);
            }
        }
        let Some(p) = v.iter().position(|x| x.abs() > EPS) else {
            return;
        };
        let pivot = v[p];
        v.iter_mut().for_each(|x| *x /= pivot);
        for (_, r) in &mut self.rows {
            let f = r[p];
            if f.abs() > EPS {
                r.iter_mut().zip(&v).for_each(|(x, y)| *x -= f * y);
            }
        }
        self.rows.push((p, v));
    }

    /// Whether the unit vector of `j` lies in the span: in a fully reduced basis that
    /// means some row is exactly `e_j`.
    fn contains_unit(&self, j: usize) -> bool {
        self.rows.iter().any(|(p, r)| {
            *p == j
                && r.iter()
                    .enumerate()
                    .all(|(k, x)| if k == j { true } else { x.abs() <= EPS })
        })
    }

    fn reveals_any(&self, protected: &[usize]) -> bool {
        protected.iter().any(|&j| self.contains_unit(j))
    }

    fn indicator(&self, members: &[usize]) -> Vec<f64> {
        let mut v = vec![0.0; self.n];
        members.iter().for_each(|&i| v[i] = 1.0);
        v
    }
}

/// Combine validated answers (in registry order) into the system-level result.
pub fn combine(expected: &Expected, answers: &[NodeAnswer]) -> Combined {
    let threshold = answers
        .iter()
        .map(|a| a.min_reportable_count)
        .fold(0.0, f64::max);
    let epsilon = answers.iter().map(|a| a.epsilon_spent).fold(0.0, f64::max);
    let rounded = answers.iter().any(|a| node_rounds(expected, a));
    let all: Vec<&NodeAnswer> = answers.iter().collect();
    let protected: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, a)| a.scope == Scope::SystemTotalOnly)
        .map(|(i, _)| i)
        .collect();

    let mut span = Span::new(answers.len());
    span.add(&span.indicator(&(0..answers.len()).collect::<Vec<_>>()));
    let mut rows = combine_rows(expected, &all, threshold, rounded);
    if span.reveals_any(&protected) {
        // Only one partner answered and it may only appear inside a system total.
        for row in &mut rows {
            for c in &mut row.cells {
                *c = suppressed_cell(
                    &c.alias,
                    "Suppressed: the only answering partner's policy allows its figures \
                     only inside a total of several partners.",
                    c.contributors,
                );
            }
        }
        return Combined {
            rows,
            breakdowns: Vec::new(),
            min_reportable_count: threshold,
            epsilon_spent_per_node: epsilon,
            rounded,
        };
    }

    // Candidate breakdowns in a fixed order: partners (by id), then Places, then PCNs.
    let mut candidates: Vec<(Level, String, Vec<usize>)> = Vec::new();
    let mut partners: Vec<usize> = (0..answers.len())
        .filter(|&i| answers[i].scope == Scope::Standalone)
        .collect();
    partners.sort_by(|&a, &b| answers[a].node.id.cmp(&answers[b].node.id));
    for i in partners {
        candidates.push((Level::Partner, answers[i].node.id.clone(), vec![i]));
    }
    for level in [Level::Place, Level::Pcn] {
        let mut groups: std::collections::BTreeMap<&str, Vec<usize>> = Default::default();
        for (i, a) in answers.iter().enumerate() {
            let label = match level {
                Level::Place => a.node.place.as_str(),
                _ => a.node.pcn.as_str(),
            };
            if !label.is_empty() {
                groups.entry(label).or_default().push(i);
            }
        }
        for (label, members) in groups {
            if members
                .iter()
                .all(|&i| answers[i].scope == Scope::Standalone)
            {
                candidates.push((level, label.to_string(), members));
            }
        }
    }

    let mut breakdowns = Vec::new();
    for (level, label, members) in candidates {
        let v = span.indicator(&members);
        if !protected.is_empty() {
            let mut trial = Span {
                n: span.n,
                rows: span.rows.clone(),
            };
            trial.add(&v);
            if trial.reveals_any(&protected) {
                continue;
            }
            span = trial;
        }
        let rows = match level {
            Level::Partner => partner_rows(expected, &answers[members[0]]),
            _ => {
                let subset: Vec<&NodeAnswer> = members.iter().map(|&i| &answers[i]).collect();
                combine_rows(expected, &subset, threshold, rounded)
            }
        };
        breakdowns.push(Breakdown { level, label, rows });
    }

    Combined {
        rows,
        breakdowns,
        min_reportable_count: threshold,
        epsilon_spent_per_node: epsilon,
        rounded,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expected(kinds: &[AggregateKind], groups: &[&str]) -> Expected {
        Expected {
            query_id: "q1".into(),
            dataset: "gp_patients".into(),
            group_columns: groups.iter().map(|s| s.to_string()).collect(),
            aliases: (0..kinds.len()).map(|i| format!("a{i}")).collect(),
            kinds: kinds.to_vec(),
        }
    }

    fn cell(alias: &str, noisy: f64, var: f64) -> proto::Cell {
        proto::Cell {
            alias: alias.into(),
            estimate: noisy,
            noisy_value: noisy,
            noise_scale: var.sqrt(),
            variance: var,
            ci95_low: noisy - 1.96 * var.sqrt(),
            ci95_high: noisy + 1.96 * var.sqrt(),
            ..Default::default()
        }
    }

    fn mean_cell(alias: &str, s: f64, vs: f64, c: f64, vc: f64) -> proto::Cell {
        proto::Cell {
            alias: alias.into(),
            estimate: s / c,
            noisy_value: s / c,
            mean: Some(proto::MeanParts {
                noisy_sum: s,
                sum_variance: vs,
                noisy_count: c,
                count_variance: vc,
            }),
            ..Default::default()
        }
    }

    fn result(
        e: &Expected,
        rows: Vec<(Vec<&str>, Vec<proto::Cell>)>,
        scope: proto::ReleaseScope,
    ) -> proto::AggregateResult {
        proto::AggregateResult {
            query_id: e.query_id.clone(),
            node_id: "n".into(),
            dataset: e.dataset.clone(),
            group_columns: e.group_columns.clone(),
            aggregate_aliases: e.aliases.clone(),
            rows: rows
                .into_iter()
                .map(|(k, cells)| proto::ResultRow {
                    key: k.into_iter().map(String::from).collect(),
                    cells,
                })
                .collect(),
            epsilon_spent: 0.5,
            release_scope: scope as i32,
            population_noisy: 1000.0,
            min_reportable_count: 7.0,
            ..Default::default()
        }
    }

    fn meta(id: &str, place: &str, pcn: &str) -> NodeMeta {
        NodeMeta {
            id: id.into(),
            ods_code: id.into(),
            place: place.into(),
            pcn: pcn.into(),
            ..NodeMeta::default()
        }
    }

    fn answer(
        e: &Expected,
        id: &str,
        place: &str,
        rows: Vec<(Vec<&str>, Vec<proto::Cell>)>,
        scope: proto::ReleaseScope,
    ) -> NodeAnswer {
        validate(e, meta(id, place, ""), result(e, rows, scope)).unwrap()
    }

    const STANDALONE: proto::ReleaseScope = proto::ReleaseScope::Standalone;
    const SYSTEM: proto::ReleaseScope = proto::ReleaseScope::SystemTotalOnly;

    #[test]
    fn totals_sum_values_and_variances() {
        let e = expected(&[AggregateKind::Count, AggregateKind::Sum], &["sex"]);
        let a = answer(
            &e,
            "A",
            "",
            vec![
                (
                    vec!["F"],
                    vec![cell("a0", 101.0, 8.0), cell("a1", 2001.0, 50.0)],
                ),
                (
                    vec!["M"],
                    vec![cell("a0", 93.0, 8.0), cell("a1", 1003.0, 50.0)],
                ),
            ],
            STANDALONE,
        );
        let b = answer(
            &e,
            "B",
            "",
            vec![
                (
                    vec!["F"],
                    vec![cell("a0", 51.0, 2.0), cell("a1", 499.0, 14.0)],
                ),
                (
                    vec!["M"],
                    vec![cell("a0", 48.0, 2.0), cell("a1", 501.0, 14.0)],
                ),
            ],
            STANDALONE,
        );
        let c = combine(&e, &[a, b]);
        assert!(!c.rounded, "both nodes released unrounded figures");
        let f = &c.rows[0];
        assert_eq!(f.key, vec!["F"]);
        assert_eq!(f.cells[0].estimate, 152.0);
        assert!((f.cells[0].standard_error - 10.0_f64.sqrt()).abs() < 1e-12);
        assert!((f.cells[0].ci95_low - (152.0 - 1.96 * 10.0_f64.sqrt())).abs() < 1e-9);
        assert!((f.cells[0].ci95_high - (152.0 + 1.96 * 10.0_f64.sqrt())).abs() < 1e-9);
        assert_eq!(f.cells[1].estimate, 2500.0);
        assert!((f.cells[1].standard_error - 8.0).abs() < 1e-12);
        assert_eq!(f.cells[0].contributors, 2);
        assert_eq!(c.rows[1].cells[0].estimate, 141.0);
        assert_eq!(c.epsilon_spent_per_node, 0.5);
        assert_eq!(c.min_reportable_count, 7.0);
    }

    #[test]
    fn mean_is_a_ratio_with_delta_method_variance() {
        let e = expected(&[AggregateKind::Mean], &[]);
        let a = answer(
            &e,
            "A",
            "",
            vec![(vec![], vec![mean_cell("a0", 6000.0, 400.0, 100.0, 4.0)])],
            STANDALONE,
        );
        let b = answer(
            &e,
            "B",
            "",
            vec![(vec![], vec![mean_cell("a0", 4000.0, 100.0, 100.0, 4.0)])],
            STANDALONE,
        );
        let c = combine(&e, &[a, b]);
        let cell = &c.rows[0].cells[0];
        // R = 10000/200 = 50; var = (500 + 2500*8)/40000 = 0.5125.
        assert!(!cell.suppressed);
        // Rounded to 1 dp because no COUNT/SUM shows the nodes do not round.
        assert!(c.rounded);
        assert_eq!(cell.estimate, 50.0);
        assert!((cell.standard_error - 0.5125_f64.sqrt()).abs() < 1e-12);
        // Bounds are rounded outwards, so rounding never narrows the interval.
        let (lo, hi) = (
            50.0 - 1.96 * 0.5125_f64.sqrt(),
            50.0 + 1.96 * 0.5125_f64.sqrt(),
        );
        assert!((cell.ci95_low - (lo * 10.0).floor() / 10.0).abs() < 1e-9);
        assert!((cell.ci95_high - (hi * 10.0).ceil() / 10.0).abs() < 1e-9);
    }

    #[test]
    fn single_contributor_keeps_its_exact_interval_and_counts_stay_non_negative() {
        let e = expected(&[AggregateKind::Count], &[]);
        let mut c0 = cell("a0", 20.0, 800.0);
        // The node's exact discrete-Laplace interval, wider than the normal one.
        (c0.ci95_low, c0.ci95_high) = (-40.0, 80.0);
        let a = answer(&e, "A", "", vec![(vec![], vec![c0])], STANDALONE);
        let c = combine(&e, &[a]);
        let out = &c.rows[0].cells[0];
        assert_eq!(
            out.ci95_high, 80.0,
            "one contributor keeps its own interval"
        );
        assert_eq!(out.ci95_low, 0.0, "a count interval never goes below zero");
    }

    #[test]
    fn low_combined_count_suppresses_the_group_with_strictest_threshold() {
        let e = expected(
            &[
                AggregateKind::Count,
                AggregateKind::Sum,
                AggregateKind::Mean,
            ],
            &["g"],
        );
        let mk = |id: &str, n: f64, mrc: f64| {
            let mut r = result(
                &e,
                vec![
                    (
                        vec!["x"],
                        vec![
                            cell("a0", n, 1.0),
                            cell("a1", 10.0 * n, 1.0),
                            mean_cell("a2", 10.0 * n, 1.0, n, 1.0),
                        ],
                    ),
                    (
                        vec!["y"],
                        vec![
                            cell("a0", 50.0, 1.0),
                            cell("a1", 500.0, 1.0),
                            mean_cell("a2", 500.0, 1.0, 50.0, 1.0),
                        ],
                    ),
                ],
                STANDALONE,
            );
            r.min_reportable_count = mrc;
            validate(&e, meta(id, "", ""), r).unwrap()
        };
        // 6 + 4 = 10 people in group x: above node A's threshold 7 but at or below B's 10.
        let c = combine(&e, &[mk("A", 6.0, 7.0), mk("B", 4.0, 10.0)]);
        assert_eq!(c.min_reportable_count, 10.0);
        let x = &c.rows[0];
        assert!(x.cells.iter().all(|c| c.suppressed), "{x:?}");
        assert!(x.cells[1].suppression_reason.contains("10"));
        assert_eq!(x.cells[1].estimate, 0.0);
        let y = &c.rows[1];
        assert!(y.cells.iter().all(|c| !c.suppressed));
        assert_eq!(y.cells[0].estimate, 100.0);
        assert_eq!(y.cells[2].estimate, 10.0);
    }

    #[test]
    fn rounding_follows_the_nodes_and_fails_closed() {
        let e = expected(&[AggregateKind::Count], &[]);
        let unrounded = answer(
            &e,
            "A",
            "",
            vec![(vec![], vec![cell("a0", 101.0, 4.0)])],
            STANDALONE,
        );
        let mut r = result(&e, vec![(vec![], vec![cell("a0", 52.0, 4.0)])], STANDALONE);
        r.rows[0].cells[0].estimate = 50.0;
        let rounding = validate(&e, meta("B", "", ""), r).unwrap();
        assert!(!node_rounds(&e, &unrounded));
        assert!(node_rounds(&e, &rounding));
        // A multiple of 5 proves nothing: assume rounding.
        let ambiguous = answer(
            &e,
            "C",
            "",
            vec![(vec![], vec![cell("a0", 55.0, 4.0)])],
            STANDALONE,
        );
        assert!(node_rounds(&e, &ambiguous));

        let only_unrounded = combine(&e, std::slice::from_ref(&unrounded));
        assert_eq!(only_unrounded.rows[0].cells[0].estimate, 101.0);
        let c = combine(&e, &[unrounded, rounding]);
        assert!(c.rounded);
        let cell = &c.rows[0].cells[0];
        assert_eq!(cell.estimate, 155.0); // 153 -> 155
        assert_eq!(cell.ci95_low % 5.0, 0.0);
        assert_eq!(cell.ci95_high % 5.0, 0.0);
        assert!((cell.standard_error - 8.0_f64.sqrt()).abs() < 1e-12);
    }

    fn one_count(
        e: &Expected,
        id: &str,
        place: &str,
        v: f64,
        scope: proto::ReleaseScope,
    ) -> NodeAnswer {
        answer(
            e,
            id,
            place,
            vec![(vec![], vec![cell("a0", v, 1.0)])],
            scope,
        )
    }

    fn labels(c: &Combined, level: Level) -> Vec<String> {
        c.breakdowns
            .iter()
            .filter(|b| b.level == level)
            .map(|b| b.label.clone())
            .collect()
    }

    #[test]
    fn breakdowns_only_from_standalone_partners_and_whole_places() {
        let e = expected(&[AggregateKind::Count], &[]);
        let c = combine(
            &e,
            &[
                one_count(&e, "A", "North", 101.0, STANDALONE),
                one_count(&e, "B", "North", 201.0, STANDALONE),
                one_count(&e, "C", "South", 301.0, STANDALONE),
                one_count(&e, "D", "South", 401.0, SYSTEM),
                one_count(&e, "E", "East", 501.0, SYSTEM),
                one_count(&e, "F", "East", 601.0, SYSTEM),
            ],
        );
        assert_eq!(c.rows[0].cells[0].estimate, 2106.0);
        assert_eq!(labels(&c, Level::Partner), vec!["A", "B", "C"]);
        // South has a system-total-only partner; East is entirely system-total-only.
        assert_eq!(labels(&c, Level::Place), vec!["North"]);
        let north = c.breakdowns.iter().find(|b| b.label == "North").unwrap();
        assert_eq!(north.rows[0].cells[0].estimate, 302.0);
        assert_eq!(north.rows[0].cells[0].contributors, 2);
    }

    /// Rebuild the span of everything published and check no system-total-only
    /// answer can be recovered from it.
    fn assert_no_reveal(c: &Combined, answers: &[NodeAnswer]) {
        let mut span = Span::new(answers.len());
        span.add(&[1.0].repeat(answers.len()));
        for b in &c.breakdowns {
            let members: Vec<usize> = (0..answers.len())
                .filter(|&i| match b.level {
                    Level::Partner => answers[i].node.id == b.label,
                    Level::Place => answers[i].node.place == b.label,
                    Level::Pcn => answers[i].node.pcn == b.label,
                })
                .collect();
            span.add(&span.indicator(&members));
        }
        for (i, a) in answers.iter().enumerate() {
            if a.scope == Scope::SystemTotalOnly {
                assert!(
                    !span.contains_unit(i),
                    "{} is revealed by {:?}",
                    a.node.id,
                    c.breakdowns
                );
            }
        }
    }

    #[test]
    fn a_single_system_total_only_partner_is_never_revealed_by_subtraction() {
        let e = expected(&[AggregateKind::Count], &[]);
        let answers = [
            one_count(&e, "A", "North", 101.0, STANDALONE),
            one_count(&e, "B", "North", 201.0, STANDALONE),
            one_count(&e, "C", "South", 301.0, STANDALONE),
            one_count(&e, "D", "South", 401.0, SYSTEM),
        ];
        let c = combine(&e, &answers);
        // Total - A - B - C would equal D, so the last partner breakdown is withheld;
        // North = A + B adds nothing new and stays.
        assert_eq!(labels(&c, Level::Partner), vec!["A", "B"]);
        assert_eq!(labels(&c, Level::Place), vec!["North"]);
        assert_no_reveal(&c, &answers);
    }

    #[test]
    fn place_with_exactly_one_system_total_only_partner_is_not_revealed() {
        let e = expected(&[AggregateKind::Count], &[]);
        // West = {W}: publishing North and South would give W = total - North - South.
        let answers = [
            one_count(&e, "N1", "North", 101.0, STANDALONE),
            one_count(&e, "S1", "South", 201.0, STANDALONE),
            one_count(&e, "W", "West", 301.0, SYSTEM),
        ];
        let c = combine(&e, &answers);
        assert_eq!(labels(&c, Level::Place), vec!["North"]);
        assert_eq!(labels(&c, Level::Partner), vec!["N1"]);
        assert_no_reveal(&c, &answers);
        // With two system-total-only partners nothing singles one out.
        let answers = [
            one_count(&e, "N1", "North", 101.0, STANDALONE),
            one_count(&e, "S1", "South", 201.0, STANDALONE),
            one_count(&e, "W1", "West", 301.0, SYSTEM),
            one_count(&e, "W2", "West", 302.0, SYSTEM),
        ];
        let c = combine(&e, &answers);
        assert_eq!(labels(&c, Level::Partner), vec!["N1", "S1"]);
        assert_eq!(labels(&c, Level::Place), vec!["North", "South"]);
        assert_no_reveal(&c, &answers);
    }

    #[test]
    fn lone_system_total_only_answer_is_suppressed() {
        let e = expected(&[AggregateKind::Count], &[]);
        let c = combine(&e, &[one_count(&e, "D", "South", 401.0, SYSTEM)]);
        assert!(c.rows[0].cells[0].suppressed);
        assert_eq!(c.rows[0].cells[0].estimate, 0.0);
        assert!(c.breakdowns.is_empty());
    }

    #[test]
    fn partner_breakdown_shows_node_suppression() {
        let e = expected(&[AggregateKind::Count], &["g"]);
        let mut small = cell("a0", 3.0, 1.0);
        small.suppressed = true;
        small.estimate = 0.0;
        small.suppression_reason = "fewer than 7".into();
        let a = answer(
            &e,
            "A",
            "",
            vec![
                (vec!["x"], vec![small]),
                (vec!["y"], vec![cell("a0", 42.0, 1.0)]),
            ],
            STANDALONE,
        );
        let b = answer(
            &e,
            "B",
            "",
            vec![
                (vec!["x"], vec![cell("a0", 30.0, 1.0)]),
                (vec!["y"], vec![cell("a0", 41.0, 1.0)]),
            ],
            STANDALONE,
        );
        let c = combine(&e, &[a, b]);
        // The total uses A's noisy value even though A suppressed it.
        assert_eq!(c.rows[0].cells[0].estimate, 33.0);
        let pa = c.breakdowns.iter().find(|b| b.label == "A").unwrap();
        assert!(pa.rows[0].cells[0].suppressed);
        assert_eq!(pa.rows[0].cells[0].suppression_reason, "fewer than 7");
        assert!(!pa.rows[1].cells[0].suppressed);
    }

    #[test]
    fn groups_missing_at_a_node_count_only_the_reporting_nodes() {
        let e = expected(&[AggregateKind::Count], &["g"]);
        let a = answer(
            &e,
            "A",
            "",
            vec![
                (vec!["x"], vec![cell("a0", 20.0, 1.0)]),
                (vec!["z"], vec![cell("a0", 30.0, 1.0)]),
            ],
            STANDALONE,
        );
        let b = answer(
            &e,
            "B",
            "",
            vec![(vec!["x"], vec![cell("a0", 21.0, 1.0)])],
            STANDALONE,
        );
        let c = combine(&e, &[a, b]);
        assert_eq!(c.rows.len(), 2);
        assert_eq!(c.rows[1].key, vec!["z"]);
        assert_eq!(c.rows[1].cells[0].contributors, 1);
        assert_eq!(c.rows[0].cells[0].contributors, 2);
    }

    #[test]
    fn malformed_answers_are_detected_with_what_was_wrong() {
        let e = expected(&[AggregateKind::Count, AggregateKind::Mean], &["g"]);
        let good = || {
            result(
                &e,
                vec![(
                    vec!["x"],
                    vec![
                        cell("a0", 20.0, 1.0),
                        mean_cell("a1", 100.0, 1.0, 20.0, 1.0),
                    ],
                )],
                STANDALONE,
            )
        };
        assert!(validate(&e, meta("A", "", ""), good()).is_ok());
        let check = |f: &dyn Fn(&mut proto::AggregateResult), needle: &str| {
            let mut r = good();
            f(&mut r);
            let err = validate(&e, meta("A", "", ""), r).unwrap_err().0;
            assert!(err.contains(needle), "{err:?} should mention {needle:?}");
        };
        check(&|r| r.query_id = "other".into(), "query id");
        check(&|r| r.dataset = "other".into(), "dataset");
        check(&|r| r.group_columns = vec!["h".into()], "group columns");
        check(&|r| r.aggregate_aliases.reverse(), "aliases");
        check(
            &|r| r.rows[0].cells[0].noisy_value = f64::NAN,
            "noisy_value",
        );
        check(
            &|r| r.rows[0].cells[0].variance = -1.0,
            "variance is negative",
        );
        check(
            &|r| r.rows[0].cells[0].ci95_high = f64::INFINITY,
            "ci95_high",
        );
        check(
            &|r| {
                r.rows[0].cells.pop();
            },
            "missing cells",
        );
        check(&|r| r.rows[0].cells[1].mean = None, "no sum and count");
        check(
            &|r| r.rows[0].cells[1].mean.as_mut().unwrap().count_variance = -2.0,
            "count_variance",
        );
        check(&|r| r.rows[0].key.push("extra".into()), "key values");
        check(
            &|r| {
                let row = r.rows[0].clone();
                r.rows.push(row);
            },
            "twice",
        );
        check(&|r| r.rows[0].cells[0].alias = "zz".into(), "cell 0");
        check(
            &|r| r.min_reportable_count = f64::NAN,
            "min_reportable_count",
        );
    }

    #[test]
    fn unspecified_scope_is_read_as_system_total_only() {
        let e = expected(&[AggregateKind::Count], &[]);
        let a = answer(
            &e,
            "A",
            "",
            vec![(vec![], vec![cell("a0", 1.0, 1.0)])],
            proto::ReleaseScope::Unspecified,
        );
        assert_eq!(a.scope, Scope::SystemTotalOnly);
    }
}
