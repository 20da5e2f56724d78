//! Partners whose admissions come from a FHIR Bulk Data export (`format =
//! "fhir_ndjson"`), end to end: `phm demo --fhir` writes each acute trust's admissions as
//! Patient, Encounter and Condition NDJSON, removes the Parquet file, and the trusts'
//! nodes answer (and link on the NHS number from `Patient.identifier`) from the export,
//! with their load reports in the node logs and every figure inside its interval.

use phm_e2e::{audit_verify, demo};

#[test]
fn the_demo_answers_and_links_from_fhir_exports() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let stdout = demo(&["--fhir"], 3, &dir, &[]);
    assert!(stdout.contains("as FHIR Bulk Data"), "{stdout}");
    // The linked questions over acute_admissions were answered from the exports.
    assert!(stdout.contains("found in acute_admissions"), "{stdout}");
    let reference = stdout
        .lines()
        .find(|l| l.contains("reference figures inside their 95% interval"))
        .unwrap_or_else(|| panic!("no reference check:\n{stdout}"));
    let (inside, total) = reference
        .split_once(" of ")
        .map(|(a, b)| {
            let total: u32 = b.split_whitespace().next().unwrap().parse().unwrap();
            (a.trim().parse::<u32>().unwrap(), total)
        })
        .unwrap();
    // 95% intervals: over ~50 figures, fewer than 80% inside has probability < 1e-6.
    assert!(total >= 20 && inside * 5 >= total * 4, "{reference}");

    let trusts: Vec<String> = phm_devkit::launch::organisations(&dir)
        .into_iter()
        .filter(|o| dir.join(o).join("fhir/manifest.json").exists())
        .collect();
    assert_eq!(trusts.len(), 2, "both acute trusts export FHIR");
    let logs: String = std::fs::read_dir(dir.join("logs"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap_or_default())
        .collect();
    for t in &trusts {
        let org = dir.join(t);
        assert!(!org.join("data/acute_admissions.parquet").exists());
        let policy = std::fs::read_to_string(org.join("policy.toml")).unwrap();
        assert!(policy.contains("format = \"fhir_ndjson\""), "{policy}");
        let (code, verify) = audit_verify(&org.join("state"));
        assert_eq!(code, 0, "{t}: {verify}");
        // The load report: outpatient encounters dropped for their class.
        let admission = format!("{}/fhir/Encounter.ndjson", org.display());
        assert!(
            logs.lines()
                .any(|l| l.contains("FHIR export: view `admission` (Encounter):")
                    && l.contains("no matching coding (`where[0]`, first at ")
                    && l.contains(&admission)),
            "no load report for {t}"
        );
    }
}
