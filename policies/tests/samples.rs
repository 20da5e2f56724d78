//! Every sample policy in policies/samples/ must pass validation, and a typical DSU
//! query must be allowed by the GP sample.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use phm_policies::{Decision, Policy};
use std::path::Path;

fn samples() -> Vec<std::path::PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    files.sort();
    files
}

#[test]
fn all_samples_are_valid() {
    let files = samples();
    let names: Vec<String> = files
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in [
        "acute_trust.toml",
        "gp_practice.toml",
        "local_authority.toml",
        "social_care.toml",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "missing sample {expected}"
        );
    }
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        if let Err(e) = Policy::parse(&f.display().to_string(), &text) {
            panic!("{e}");
        }
    }
}

fn query(sql_dataset: &str, purpose: phm_proto::Purpose) -> phm_proto::QueryBody {
    phm_proto::QueryBody {
        federation_id: "ics-test".into(),
        query_id: "q1".into(),
        requester_id: "dsu".into(),
        purpose,
        project_id: None,
        dataset: sql_dataset.into(),
        filter: Some(phm_proto::Predicate::Compare {
            column: "diabetes".into(),
            op: phm_proto::CompareOp::Eq,
            value: phm_proto::Literal::Boolean(true),
        }),
        group_by: vec![
            phm_proto::GroupKey::Column("imd_quintile".into()),
            phm_proto::GroupKey::Bin {
                column: "age".into(),
                width: 10.0,
            },
        ],
        aggregates: vec![phm_proto::Aggregate {
            alias: "n".into(),
            kind: phm_proto::AggregateKind::Count,
            column: None,
        }],
        epsilon: 0.5,
        issued_at_unix_ms: 1,
        nonce: vec![7; 16],
        linkage: None,
        aggregation: Default::default(),
    }
}

#[test]
fn gp_sample_allows_a_dsu_prevalence_query_with_opt_out_excluded() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("samples");
    let text = std::fs::read_to_string(dir.join("gp_practice.toml")).unwrap();
    let policy = Policy::parse("gp_practice.toml", &text).unwrap();
    let now = chrono::DateTime::parse_from_rfc3339("2026-11-23T10:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    match phm_policies::decide(
        &policy,
        &query("gp_patients", phm_proto::Purpose::Planning),
        now,
    ) {
        Decision::Allow(l) => {
            assert_eq!(l.exclude_opted_out.as_deref(), Some("ndopt_out"));
            assert_eq!(l.group_by.len(), 2);
            assert_eq!(l.charges.len(), 1);
            assert_eq!(l.charges[0].key(), "requester:dsu/2026-11");
            assert_eq!(l.registered_population, Some(9840));
        }
        Decision::Deny(r) => panic!("denied: {r:?}"),
    }
}
