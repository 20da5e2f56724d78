//! `phm policy …`: check, explain and schema for IG policy files. Each command builds
//! its report as text first (tested below), then prints it.

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use phm_policies::{Decision, Policy, decide, explain};
use phm_proto::{Purpose, QueryBody};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// Validate policy files; exit 0 when all are valid, 1 with every error otherwise.
    #[command(
        after_help = "Example:\n  phm policy check policies/samples/*.toml\n\n\
                            Each error names file:line:column, what is wrong and the field, e.g.\n  \
                            gp.toml:14:3: requester \"dsu\": purpose \"marketing\" is not one of \
                            direct_care, planning, research (at requesters[0].purposes[1])"
    )]
    Check {
        /// Policy files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Show, rule by rule, whether a query would be allowed and under which limits.
    #[command(
        after_help = "Example:\n  phm policy explain --policy policies/samples/gp_practice.toml \\\n    \
                            --requester dsu --purpose planning --epsilon 0.5 \\\n    \
                            'SELECT imd_quintile, COUNT(*) AS n FROM gp_patients WHERE diabetes = TRUE GROUP BY imd_quintile'\n\n\
                            Exit status: 0 when the query would be allowed, 1 when refused."
    )]
    Explain {
        /// The node's policy file.
        #[arg(long)]
        policy: PathBuf,
        /// Requester id, as listed under [[requesters]].
        #[arg(long)]
        requester: String,
        /// direct_care, planning or research.
        #[arg(long, value_parser = parse_purpose)]
        purpose: Purpose,
        /// Approved project id (research only).
        #[arg(long)]
        project: Option<String>,
        /// Epsilon the query would spend at this node.
        #[arg(long, default_value_t = 0.5)]
        epsilon: f64,
        /// Decide as of this time (RFC 3339) instead of now, e.g. to check an expiry.
        #[arg(long, value_parser = parse_time)]
        at: Option<DateTime<Utc>>,
        /// The query, in the SQL subset.
        sql: String,
    },
    /// Print the JSON Schema of the policy file format.
    #[command(after_help = "Example:\n  phm policy schema > policy.schema.json\n  \
                            # point your editor's TOML schema support at it")]
    Schema,
}

fn parse_purpose(s: &str) -> Result<Purpose, String> {
    Purpose::parse(s).ok_or_else(|| {
        format!("{s:?} is not a purpose; use one of direct_care, planning, research")
    })
}

fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| format!("{s:?} is not an RFC 3339 time such as 2026-11-23T10:00:00Z: {e}"))
}

pub fn run(cmd: PolicyCmd) -> anyhow::Result<ExitCode> {
    let (report, ok) = match cmd {
        PolicyCmd::Check { files } => check(&files),
        PolicyCmd::Explain {
            policy,
            requester,
            purpose,
            project,
            epsilon,
            at,
            sql,
        } => explain_query(&ExplainArgs {
            policy: &policy,
            requester,
            purpose,
            project,
            epsilon,
            now: at.unwrap_or_else(Utc::now),
            sql: &sql,
        })?,
        PolicyCmd::Schema => (
            serde_json::to_string_pretty(&phm_policies::schema())
                .context("rendering the policy JSON Schema")?,
            true,
        ),
    };
    // Refusals and policy errors go to stdout too: they are the answer that was asked for.
    phm::outln!("{report}");
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn short(version: &str) -> String {
    format!("{}…", version.get(..12).unwrap_or(version))
}

/// Check every file; the report names each file's outcome and every error.
fn check(files: &[PathBuf]) -> (String, bool) {
    let mut out = Vec::new();
    let mut failed = 0;
    for f in files {
        let name = f.display().to_string();
        match std::fs::read_to_string(f) {
            Err(e) => {
                failed += 1;
                out.push(format!("error: cannot read {name}: {e}"));
            }
            Ok(text) => match Policy::parse(&name, &text) {
                Ok(p) => {
                    // A FHIR source's views and query are files beside the policy:
                    // checked too, so a view outside the subset is found before the
                    // node is started with it.
                    let base = f.parent().unwrap_or(Path::new("."));
                    let mut problems = Vec::new();
                    for ds in &p.file().datasets {
                        if let phm_policies::model::Source::FhirNdjson(export) = &ds.source
                            && let Err(e) = phm_node::engine::fhir::check(export, base)
                        {
                            problems.push(format!("error: {name}: dataset `{}`: {e}", ds.name));
                        }
                    }
                    if problems.is_empty() {
                        out.push(format!("ok: {name} (version {})", short(p.version())));
                    } else {
                        failed += 1;
                        out.extend(problems);
                    }
                }
                Err(errors) => {
                    failed += 1;
                    out.push(errors.to_string());
                    out.push(format!(
                        "error: {name}: {} problem{}",
                        errors.0.len(),
                        if errors.0.len() == 1 { "" } else { "s" }
                    ));
                }
            },
        }
    }
    if failed > 0 && files.len() > 1 {
        out.push(format!(
            "{failed} of {} policy files have errors",
            files.len()
        ));
    }
    (out.join("\n"), failed == 0)
}

struct ExplainArgs<'a> {
    policy: &'a Path,
    requester: String,
    purpose: Purpose,
    project: Option<String>,
    epsilon: f64,
    now: DateTime<Utc>,
    sql: &'a str,
}

/// The explanation and whether the query would be allowed. Unreadable or invalid
/// policies and refused SQL are reported (not allowed), not raised.
fn explain_query(a: &ExplainArgs<'_>) -> anyhow::Result<(String, bool)> {
    let name = a.policy.display().to_string();
    let text = std::fs::read_to_string(a.policy)
        .with_context(|| format!("cannot read policy file {name}"))?;
    let policy = match Policy::parse(&name, &text) {
        Ok(p) => p,
        Err(errors) => {
            return Ok((
                format!("{errors}\nerror: {name} is not a valid policy"),
                false,
            ));
        }
    };
    let q = match phm::sql::parse(a.sql) {
        Ok(q) => q,
        Err(e) => return Ok((e.render(a.sql), false)),
    };
    let body = QueryBody {
        federation_id: "local".into(),
        query_id: "explain".into(),
        requester_id: a.requester.clone(),
        purpose: a.purpose,
        project_id: a.project.clone(),
        dataset: q.dataset,
        filter: q.filter,
        group_by: q.group_by,
        aggregates: q.aggregates,
        epsilon: a.epsilon,
        issued_at_unix_ms: a.now.timestamp_millis(),
        nonce: b"phm-policy-explain".to_vec(),
        linkage: q.linkage,
        aggregation: Default::default(),
    };
    let mut out = vec![
        format!("policy:  {name} (version {})", short(policy.version())),
        format!("query:   {}", body.to_sql()),
        format!(
            "asked by {} for {}{}, epsilon {}, at {}",
            body.requester_id,
            body.purpose,
            body.project_id
                .as_deref()
                .map(|p| format!(" under project {p}"))
                .unwrap_or_default(),
            body.epsilon,
            a.now.format("%Y-%m-%d %H:%M UTC")
        ),
        String::new(),
    ];
    out.extend(
        explain(&policy, &body, a.now)
            .iter()
            .map(ToString::to_string),
    );
    out.push(String::new());
    // A linked question is decided for the side this policy holds (it holds the
    // outer dataset: anchor; the EXISTS dataset: partner), with any listed partner.
    let decision = match phm_policies::linked_side(&policy, &body) {
        Some(side) => phm_policies::decide_linked(&policy, &body, side, a.now),
        None => decide(&policy, &body, a.now),
    };
    let allowed = match decision {
        Decision::Allow(l) => {
            let ledgers: Vec<String> = l.charges.iter().map(|c| c.key()).collect();
            let what = match &l.link {
                Some(link) => format!(
                    "this node may take the {} side of the linked query, on",
                    link.role.as_str()
                ),
                None => "the query may run on".to_string(),
            };
            out.push(format!(
                "ALLOW: {what} {} with epsilon {}, charged to {}{}",
                l.dataset,
                l.epsilon,
                ledgers.join(" and "),
                l.exclude_opted_out
                    .as_deref()
                    .map(|c| format!("; rows with {c} = true excluded"))
                    .unwrap_or_default()
            ));
            true
        }
        Decision::Deny(reasons) => {
            out.push(format!(
                "DENY: {} reason{}",
                reasons.len(),
                if reasons.len() == 1 { "" } else { "s" }
            ));
            out.extend(
                reasons
                    .iter()
                    .map(|r| format!("  - {} [{}]", r.message, r.rule)),
            );
            false
        }
    };
    Ok((out.join("\n"), allowed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sample policy in `policies/samples`.
    const SAMPLES: [&str; 6] = [
        "gp_practice.toml",
        "acute_trust.toml",
        "social_care.toml",
        "local_authority.toml",
        "omop_trust.toml",
        "fhir_trust.toml",
    ];

    fn sample(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../policies/samples")
            .join(name)
    }

    fn at() -> DateTime<Utc> {
        parse_time("2026-11-23T10:00:00Z").unwrap()
    }

    fn explain_gp(
        requester: &str,
        purpose: Purpose,
        project: Option<&str>,
        sql: &str,
    ) -> (String, bool) {
        explain_query(&ExplainArgs {
            policy: &sample("gp_practice.toml"),
            requester: requester.into(),
            purpose,
            project: project.map(String::from),
            epsilon: 0.4,
            now: at(),
            sql,
        })
        .unwrap()
    }

    #[test]
    fn check_accepts_the_samples_with_their_versions() {
        let files: Vec<PathBuf> = SAMPLES.into_iter().map(sample).collect();
        let (report, ok) = check(&files);
        assert!(ok, "{report}");
        assert_eq!(report.lines().count(), SAMPLES.len());
        assert!(
            report
                .lines()
                .all(|l| l.starts_with("ok: ") && l.contains("(version "))
        );
    }

    #[test]
    fn check_reads_a_fhir_sources_views() {
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("fhir_trust.toml");
        std::fs::copy(sample("fhir_trust.toml"), &policy).unwrap();
        std::fs::create_dir(dir.path().join("fhir")).unwrap();
        for f in [
            "patient.view.json",
            "admission.view.json",
            "acute_admissions.sql",
        ] {
            std::fs::copy(
                sample(&format!("fhir/{f}")),
                dir.path().join("fhir").join(f),
            )
            .unwrap();
        }
        let bad = std::fs::read_to_string(sample("fhir/diagnosis.view.json"))
            .unwrap()
            .replace("\"select\": [", "\"constant\": [], \"select\": [");
        std::fs::write(dir.path().join("fhir/diagnosis.view.json"), bad).unwrap();
        let (report, ok) = check(std::slice::from_ref(&policy));
        assert!(!ok, "{report}");
        assert!(
            report.contains("dataset `acute_admissions`: view ")
                && report.contains(
                    "diagnosis.view.json: element `constant` is outside the supported subset"
                ),
            "{report}"
        );
    }

    #[test]
    fn check_reports_every_error_and_unreadable_files() {
        let dir = tempfile::tempdir().unwrap();
        let good = std::fs::read_to_string(sample("gp_practice.toml")).unwrap();
        let bad_path = dir.path().join("gp.toml");
        let bad = good
            .replacen(
                "\"planning\", \"direct_care\"",
                "\"planning\", \"marketing\"",
                1,
            )
            .replacen("max_rows_per_person = 1", "max_rows_per_person = 0", 1);
        std::fs::write(&bad_path, bad).unwrap();
        let missing = dir.path().join("missing.toml");
        let (report, ok) = check(&[bad_path.clone(), missing.clone()]);
        assert!(!ok);
        assert!(
            report.contains("purpose \"marketing\" is not one of direct_care, planning, research"),
            "{report}"
        );
        assert!(report.contains("max_rows_per_person 0"), "{report}");
        assert!(
            report.contains(&format!("{}:", bad_path.display())),
            "{report}"
        );
        assert!(
            report.contains(&format!("error: cannot read {}", missing.display())),
            "{report}"
        );
        assert!(
            report.contains("2 of 2 policy files have errors"),
            "{report}"
        );
    }

    #[test]
    fn explain_allows_a_dsu_query_and_names_the_rules() {
        let (report, ok) = explain_gp(
            "dsu",
            Purpose::Planning,
            None,
            "SELECT imd_quintile, COUNT(*) AS n FROM gp_patients WHERE diabetes = TRUE GROUP BY imd_quintile",
        );
        assert!(ok, "{report}");
        assert!(report.contains("[requesters.dsu.purposes]"), "{report}");
        assert!(
            report.contains("[datasets.gp_patients.columns.imd_quintile.group]"),
            "{report}"
        );
        assert!(
            report.contains("rows with ndopt_out = true excluded"),
            "{report}"
        );
        assert!(
            report.lines().last().unwrap().starts_with("ALLOW"),
            "{report}"
        );
        assert!(report.contains("requester:dsu/2026-11"), "{report}");
    }

    #[test]
    fn explain_denies_with_every_reason() {
        let (report, ok) = explain_gp(
            "dsu",
            Purpose::Research,
            None,
            "SELECT nhs_number, COUNT(*) FROM gp_patients GROUP BY nhs_number",
        );
        assert!(!ok);
        assert!(report.contains("DENY: 3 reasons"), "{report}");
        assert!(report.contains("REFUSED"), "{report}");
        assert!(
            report.contains("may query for planning, direct_care only, not research"),
            "{report}"
        );
        assert!(
            report.contains("research queries must name an approved project"),
            "{report}"
        );
        assert!(report.contains("nhs_number is an identifier"), "{report}");
    }

    #[test]
    fn explain_research_under_a_project() {
        let (report, ok) = explain_gp(
            "uor-research",
            Purpose::Research,
            Some("diabetes-inequalities"),
            "SELECT bin(age, 10), AVG(hba1c) FROM gp_patients WHERE diabetes = TRUE GROUP BY bin(age, 10)",
        );
        assert!(ok, "{report}");
        assert!(
            report.contains("project:diabetes-inequalities/2026-Q4"),
            "{report}"
        );
    }

    #[test]
    fn explain_shows_sql_errors_with_a_caret() {
        let (report, ok) = explain_gp("dsu", Purpose::Planning, None, "SELECT * FROM gp_patients");
        assert!(!ok);
        assert!(report.contains("   |        ^"), "{report}");
    }

    #[test]
    fn explain_names_an_unreadable_policy() {
        let err = explain_query(&ExplainArgs {
            policy: Path::new("/nonexistent/policy.toml"),
            requester: "dsu".into(),
            purpose: Purpose::Planning,
            project: None,
            epsilon: 0.5,
            now: at(),
            sql: "SELECT COUNT(*) FROM gp_patients",
        })
        .unwrap_err();
        assert!(format!("{err:#}").contains("/nonexistent/policy.toml"));
    }

    #[test]
    fn purposes_and_times_parse_with_helpful_errors() {
        assert_eq!(parse_purpose("research"), Ok(Purpose::Research));
        assert!(
            parse_purpose("marketing")
                .unwrap_err()
                .contains("direct_care, planning, research")
        );
        assert!(parse_time("yesterday").is_err());
    }
}
