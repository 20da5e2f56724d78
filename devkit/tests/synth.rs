//! `phm synth`: determinism, realistic prevalence in the written Parquet, policies that
//! parse and decide the demo's questions as the demo expects.

// Test helpers panic on failure by design.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use datafusion::arrow::array::{Array, BooleanArray, Int64Array};
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use phm_devkit::synth::{self, SynthOptions};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn options(out: PathBuf, population: usize, seed: u64) -> SynthOptions {
    SynthOptions {
        out,
        population,
        seed,
        nodes_limit: None,
        base_port: None,
        progress: false,
        force: false,
    }
}

/// SHA-256 of every file whose content a seed must fix: the data and the reference
/// answers. Keys and certificates are fresh randomness on purpose (never derived from a
/// seed that is printed and shared), so policies (which embed public keys) are excluded.
fn seeded_files(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().display().to_string();
                if rel.ends_with(".parquet") || rel == "reference_answers.json" {
                    let bytes = std::fs::read(&p).unwrap();
                    out.insert(rel, hex::encode(Sha256::digest(&bytes)));
                }
            }
        }
    }
    out
}

#[test]
fn same_seed_gives_identical_data_and_reference_answers() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    let c = tmp.path().join("c");
    synth::run(&options(a.clone(), 20_000, 11)).unwrap();
    synth::run(&options(b.clone(), 20_000, 11)).unwrap();
    synth::run(&options(c.clone(), 20_000, 12)).unwrap();
    let ha = seeded_files(&a);
    // 6 practices + 2 trusts + social care + council, and the reference answers.
    assert_eq!(ha.len(), 11, "{ha:?}");
    assert_eq!(ha, seeded_files(&b));
    let hc = seeded_files(&c);
    assert_ne!(
        ha.get("reference_answers.json"),
        hc.get("reference_answers.json")
    );
    // The manifest is the same too, except the requesters' public keys: keys are
    // fresh randomness on purpose (never derived from the seed, which is shared).
    let mut ma = synth::load_manifest(&a).unwrap();
    let mut mb = synth::load_manifest(&b).unwrap();
    assert_eq!(ma.requesters.len(), 2);
    assert_ne!(
        ma.requesters, mb.requesters,
        "keys are not derived from the seed"
    );
    ma.requesters.clear();
    mb.requesters.clear();
    assert_eq!(ma, mb);
}

#[test]
fn refuses_to_overwrite_without_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ics");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let e = synth::run(&options(out.clone(), 2_000, 1)).unwrap_err();
    assert!(e.to_string().contains("not empty"), "{e}");
    assert!(out.join("notes.txt").exists());

    let out2 = tmp.path().join("ics2");
    synth::run(&options(out2.clone(), 2_000, 1)).unwrap();
    let e = synth::run(&options(out2.clone(), 2_000, 1)).unwrap_err();
    assert!(e.to_string().contains("--force"), "{e}");
    let mut forced = options(out2.clone(), 2_000, 2);
    forced.force = true;
    synth::run(&forced).unwrap();
    assert_eq!(synth::load_manifest(&out2).unwrap().seed, 2);
}

fn read_gp(path: &Path) -> Vec<(i64, bool)> {
    let file = std::fs::File::open(path).unwrap();
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let age = batch
            .column_by_name("age")
            .unwrap()
            .as_any()
            .downcast_ref::<Int64Array>()
            .unwrap()
            .clone();
        let diabetes = batch
            .column_by_name("diabetes")
            .unwrap()
            .as_any()
            .downcast_ref::<BooleanArray>()
            .unwrap()
            .clone();
        for i in 0..batch.num_rows() {
            out.push((age.value(i), diabetes.value(i)));
        }
    }
    out
}

#[test]
fn diabetes_prevalence_in_the_written_data_is_near_qof() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ics");
    let summary = synth::run(&options(out.clone(), 100_000, 5)).unwrap();
    let mut adults = 0u64;
    let mut diabetics = 0u64;
    let mut people = 0u64;
    for org in &summary.manifest.organisations {
        if org.dataset != "gp_patients" {
            continue;
        }
        for (age, diabetes) in read_gp(&out.join(&org.ods_code).join("data/gp_patients.parquet")) {
            people += 1;
            if age >= 17 {
                adults += 1;
                diabetics += diabetes as u64;
            }
        }
    }
    assert_eq!(people, 100_000, "every person has exactly one registration");
    let prevalence = diabetics as f64 / adults as f64;
    // Target 7.5% of 17+ (QOF 2023/24). The generator calibrates the expectation to the
    // target exactly; sampling sd is sqrt(.075 * .925 / ~80,000) ~ 0.09 points, so half a
    // point is over 5 sd.
    assert!(
        (prevalence - 0.075).abs() < 0.005,
        "diabetes prevalence {prevalence}"
    );
    for line in &summary.prevalence {
        assert!(
            (line.observed - line.target).abs() < 0.2 * line.target + 0.002,
            "{} observed {} target {}",
            line.condition,
            line.observed,
            line.target
        );
    }
}

#[test]
fn every_policy_parses_and_decides_the_demo_questions_as_expected() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("ics");
    let summary = synth::run(&SynthOptions {
        nodes_limit: Some(3),
        ..options(out.clone(), 30_000, 3)
    })
    .unwrap();
    let m = &summary.manifest;
    // 3 practices + RW1, RW2, social care, council.
    assert_eq!(m.organisations.len(), 7);
    assert!(m.practices_not_included > 0);
    let places: std::collections::BTreeSet<_> = m
        .organisations
        .iter()
        .filter_map(|o| o.place.clone())
        .collect();
    assert_eq!(places.len(), 3, "the first practices span the Places");

    let now = chrono::Utc::now();
    for org in &m.organisations {
        let path = out.join(&org.ods_code).join("policy.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let policy = phm_policies::Policy::parse(&path.display().to_string(), &text)
            .unwrap_or_else(|e| panic!("{e}"));
        for q in phm_devkit::questions::ALL {
            let parsed = phm_sql::parse(q.sql).unwrap_or_else(|e| panic!("{}", e.render(q.sql)));
            if parsed.dataset != org.dataset {
                continue;
            }
            let body = phm_proto::QueryBody {
                federation_id: phm_devkit::synth::FEDERATION_ID.into(),
                query_id: "q1".into(),
                requester_id: q.requester.into(),
                purpose: q.purpose,
                project_id: q.project.map(str::to_string),
                dataset: parsed.dataset,
                filter: parsed.filter,
                group_by: parsed.group_by,
                aggregates: parsed.aggregates,
                epsilon: q.epsilon,
                issued_at_unix_ms: now.timestamp_millis(),
                nonce: vec![7; 16],
                linkage: None,
            };
            let decision = phm_policies::decide(&policy, &body, now);
            let allowed = matches!(decision, phm_policies::Decision::Allow(_));
            assert_eq!(
                allowed, !q.expect_refusal,
                "{} at {}: {decision:?}",
                q.id, org.ods_code
            );
        }
        // node.toml points at files that exist.
        let node = std::fs::read_to_string(out.join(&org.ods_code).join("node.toml")).unwrap();
        assert!(node.contains(&format!("../certs/{}.pem", org.ods_code)));
        assert!(
            out.join("certs")
                .join(format!("{}.pem", org.ods_code))
                .exists()
        );
    }
    let coordinator = std::fs::read_to_string(out.join("coordinator/coordinator.toml")).unwrap();
    assert!(coordinator.contains("[datasets.gp_patients]\ntotal_kind = \"distinct_people\""));
    assert_eq!(coordinator.matches("[[nodes]]").count(), 7);

    // Reference answers: every declared group present; GP totals equal the included
    // practices' registered non-opted-out population.
    let refs = synth::load_reference(&out).unwrap();
    let pop = refs.question("population_by_imd_age").unwrap();
    assert_eq!(pop.rows.len(), 30);
    let total: f64 = pop.rows.iter().map(|r| r.values["people"]).sum();
    let listed: u64 = m
        .organisations
        .iter()
        .filter_map(|o| o.registered_population)
        .sum();
    assert!(
        total < listed as f64 && total > 0.9 * listed as f64,
        "{total} vs {listed}"
    );
}
