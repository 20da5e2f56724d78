//! `phm query --rate-per N --denominator SQL [--standardise COLUMN]`: the rate table
//! from two combined results (events and people), formed by the coordinator core's
//! `rates` module, and its table, CSV and JSON forms.

use phm_coordinator::combine::low_count_reason;
use phm_coordinator::rates::{self, Count, Figure, Rate, RateError, RateRow};
use phm_proto::proto::CombinedResult;
use phm_proto::{Aggregate, AggregateKind};
use serde_json::{Value, json};

use crate::render;

/// Variance of the error a figure rounded to the nearest 5 carries: uniform on ±2.5.
const ROUNDING_VARIANCE: f64 = 25.0 / 12.0;

/// Rates over the groups of one events result and one people result.
#[derive(Debug)]
pub struct Rates {
    per: f64,
    /// The stratum columns (group columns without the age band).
    columns: Vec<String>,
    standardised: bool,
    rows: Vec<RateRow>,
    /// Small suppressed counts taken as half the threshold.
    imputed: usize,
    threshold: f64,
}

fn first_count(aggs: &[Aggregate], what: &str) -> Result<String, String> {
    aggs.iter()
        .find(|a| a.kind == AggregateKind::Count)
        .map(|a| a.alias.clone())
        .ok_or_else(|| format!("{what} has no COUNT(*) to take as its count"))
}

/// The result's figures for `alias`, and how many were imputed.
///
/// When every released count is a multiple of 5 the partners are taken to round (the
/// coordinator's own fail-closed reading) and the rounding error's variance is added to
/// the noise's. A count suppressed as small (at or below the strictest minimum
/// reportable count t) says only that it is in [0, t]; it is taken as t/2 with the
/// variance of a uniform on [0, t] plus the noise's, so a rate over a few small bands
/// can still be formed without showing any of them. Any other suppression (a
/// protected partner) leaves the figure out, and rates needing it are not shown.
fn figures(r: &CombinedResult, alias: &str) -> (Vec<Figure>, usize) {
    let cells = || {
        r.rows
            .iter()
            .filter_map(|row| row.cells.iter().find(|c| c.alias == alias))
    };
    let rounded = cells()
        .filter(|c| !c.suppressed)
        .all(|c| (c.estimate / 5.0).fract() == 0.0);
    let extra = if rounded { ROUNDING_VARIANCE } else { 0.0 };
    let noise = cells()
        .filter(|c| !c.suppressed)
        .map(|c| c.standard_error.powi(2))
        .fold(0.0, f64::max);
    let t = r.min_reportable_count;
    let small = low_count_reason(t);
    let mut imputed = 0;
    let figures = r
        .rows
        .iter()
        .map(|row| {
            let count = row.cells.iter().find(|c| c.alias == alias).and_then(|c| {
                if !c.suppressed {
                    Some(Count {
                        estimate: c.estimate,
                        noise_variance: c.standard_error.powi(2) + extra,
                    })
                } else if t > 0.0 && c.suppression_reason == small {
                    imputed += 1;
                    Some(Count {
                        estimate: t / 2.0,
                        noise_variance: t * t / 12.0 + noise,
                    })
                } else {
                    None
                }
            });
            (row.key.clone(), count)
        })
        .collect();
    (figures, imputed)
}

impl Rates {
    pub fn of(
        events: &CombinedResult,
        event_aggs: &[Aggregate],
        people: &CombinedResult,
        people_aggs: &[Aggregate],
        per: f64,
        standardise: Option<&str>,
    ) -> Result<Rates, String> {
        if events.group_columns != people.group_columns {
            return Err(format!(
                "--denominator groups by ({}) but the query by ({}): rates need the same GROUP BY",
                people.group_columns.join(", "),
                events.group_columns.join(", ")
            ));
        }
        let age = match standardise {
            None => None,
            Some(col) => Some(
                events
                    .group_columns
                    .iter()
                    .position(|c| c == col)
                    .ok_or_else(|| {
                        format!(
                            "--standardise {col:?}: the query has no such group column (it groups by {})",
                            events.group_columns.join(", ")
                        )
                    })?,
            ),
        };
        let (o, io) = figures(events, &first_count(event_aggs, "the query")?);
        let (n, ip) = figures(people, &first_count(people_aggs, "--denominator")?);
        let columns = events
            .group_columns
            .iter()
            .enumerate()
            .filter(|(i, _)| Some(*i) != age)
            .map(|(_, c)| c.clone())
            .collect();
        Ok(Rates {
            per,
            columns,
            standardised: age.is_some(),
            rows: rates::rate_table(&o, &n, age, per),
            imputed: io + ip,
            threshold: events.min_reportable_count.max(people.min_reportable_count),
        })
    }

    fn per_label(&self) -> String {
        render::number(self.per, 0)
    }

    /// An aligned table, failures as `–` with their reasons numbered underneath.
    pub fn table(&self) -> String {
        let mut notes = render::Notes::default();
        let mut header = self.columns.clone();
        header.extend([
            "events".to_string(),
            "people".to_string(),
            format!("crude rate per {} (95% CI)", self.per_label()),
        ]);
        if self.standardised {
            header.push(format!(
                "age-standardised rate per {} (ESP2013, 95% CI)",
                self.per_label()
            ));
        }
        let text = |r: &Result<Rate, RateError>, notes: &mut render::Notes| match r {
            Ok(r) => format!(
                "{} ({}–{})",
                render::number(r.estimate, 1),
                render::number(r.ci95.0, 1),
                render::number(r.ci95.1, 1)
            ),
            Err(e) => format!("– [{}]", notes.number(&e.to_string())),
        };
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| {
                let mut out = row.stratum.clone();
                match &row.crude {
                    Ok(r) => out.extend([render::number(r.events, 0), render::number(r.people, 0)]),
                    Err(_) => out.extend(["–".to_string(), "–".to_string()]),
                }
                out.push(text(&row.crude, &mut notes));
                if let Some(s) = &row.standardised {
                    out.push(text(s, &mut notes));
                }
                out
            })
            .collect();
        let mut s = format!(
            "Rates per {} people: events and people are DP counts; the intervals include the \
             events' Poisson variation and both counts' noise (Fay–Feuer gamma intervals).\n",
            self.per_label()
        );
        s.push_str(&render::layout(&header, &rows, self.columns.len()));
        s.push_str(&notes.render());
        if self.imputed > 0 {
            s.push_str(&format!(
                "{} count{} suppressed as small (at or below {}) {} taken as half that, with \
                 the uncertainty of anywhere from 0 to {} added to the interval.\n",
                self.imputed,
                if self.imputed == 1 { "" } else { "s" },
                self.threshold,
                if self.imputed == 1 { "is" } else { "are" },
                self.threshold
            ));
        }
        s
    }

    pub fn csv(&self) -> String {
        let mut head = self.columns.clone();
        head.extend(
            ["events", "people", "crude_rate", "crude_low", "crude_high"].map(String::from),
        );
        if self.standardised {
            head.extend(["dsr", "dsr_low", "dsr_high"].map(String::from));
        }
        head.push("note".into());
        let mut out = head.join(",") + "\n";
        let f = |r: &Result<Rate, RateError>| match r {
            Ok(r) => vec![
                format!("{}", r.estimate),
                format!("{}", r.ci95.0),
                format!("{}", r.ci95.1),
            ],
            Err(_) => vec![String::new(); 3],
        };
        for row in &self.rows {
            let mut line: Vec<String> = row.stratum.iter().map(|k| csv_field(k)).collect();
            match &row.crude {
                Ok(r) => line.extend([format!("{}", r.events), format!("{}", r.people)]),
                Err(_) => line.extend([String::new(), String::new()]),
            }
            line.extend(f(&row.crude));
            let mut note = row.crude.as_ref().err().map(ToString::to_string);
            if let Some(s) = &row.standardised {
                line.extend(f(s));
                note = note.or_else(|| s.as_ref().err().map(ToString::to_string));
            }
            line.push(csv_field(&note.unwrap_or_default()));
            out.push_str(&line.join(","));
            out.push('\n');
        }
        out
    }

    pub fn json(&self) -> Value {
        let one = |r: &Result<Rate, RateError>| match r {
            Ok(r) => json!({
                "estimate": r.estimate, "ci95_low": r.ci95.0, "ci95_high": r.ci95.1,
                "events": r.events, "people": r.people,
            }),
            Err(e) => json!({ "error": e.to_string() }),
        };
        json!({
            "per": self.per,
            "columns": self.columns,
            "standard": if self.standardised { Value::from("ESP2013") } else { Value::Null },
            "imputed_small_counts": self.imputed,
            "rows": self.rows.iter().map(|row| json!({
                "stratum": row.stratum,
                "crude": one(&row.crude),
                "standardised": row.standardised.as_ref().map(one),
            })).collect::<Vec<_>>(),
        })
    }
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use phm_proto::proto::{CombinedCell, CombinedRow};

    fn result(alias: &str, rows: &[(&str, &str, Option<f64>)]) -> CombinedResult {
        CombinedResult {
            group_columns: vec!["imd_quintile".into(), "bin(age, 20)".into()],
            min_reportable_count: 7.0,
            rows: rows
                .iter()
                .map(|(q, a, v)| CombinedRow {
                    key: vec![(*q).into(), (*a).into()],
                    cells: vec![CombinedCell {
                        alias: alias.into(),
                        estimate: v.unwrap_or(0.0),
                        standard_error: 2.0,
                        suppressed: v.is_none(),
                        suppression_reason: if v.is_none() {
                            low_count_reason(7.0)
                        } else {
                            String::new()
                        },
                        ..Default::default()
                    }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    fn count(alias: &str) -> Vec<Aggregate> {
        vec![Aggregate {
            alias: alias.into(),
            kind: AggregateKind::Count,
            column: None,
        }]
    }

    /// A band suppressed as small is taken as half the threshold (3.5) with the
    /// variance of a uniform on [0, 7] added; the table says so; the age column must
    /// be one of the group columns.
    #[test]
    fn small_suppressed_bands_are_imputed_and_bad_columns_are_refused() {
        let bands = ["0", "20", "40", "60", "80"];
        let ev: Vec<(&str, &str, Option<f64>)> = bands
            .iter()
            .map(|b| ("1", *b, if *b == "0" { None } else { Some(103.0) }))
            .collect();
        let pp: Vec<(&str, &str, Option<f64>)> =
            bands.iter().map(|b| ("1", *b, Some(1000.0))).collect();
        let (e, p) = (result("cases", &ev), result("people", &pp));
        let t = Rates::of(
            &e,
            &count("cases"),
            &p,
            &count("people"),
            1000.0,
            Some("bin(age, 20)"),
        )
        .unwrap();
        let crude = t.rows[0].crude.clone().unwrap();
        assert!(
            (crude.events - (4.0 * 103.0 + 3.5)).abs() < 1e-9,
            "{crude:?}"
        );
        assert!(
            t.table()
                .contains("1 count suppressed as small (at or below 7) is taken")
        );
        assert!(t.csv().lines().count() == 2, "{}", t.csv());
        let err = Rates::of(
            &e,
            &count("cases"),
            &p,
            &count("people"),
            1000.0,
            Some("age"),
        )
        .unwrap_err();
        assert!(err.contains("no such group column"), "{err}");
        let mut other = p.clone();
        other.group_columns = vec!["sex".into(), "bin(age, 20)".into()];
        let err =
            Rates::of(&e, &count("cases"), &other, &count("people"), 1000.0, None).unwrap_err();
        assert!(err.contains("same GROUP BY"), "{err}");
    }
}
