//! Red-team tests for results bound to their requester and signatures bound to the
//! federation, driven as an analyst would: the real `phm` CLI against a real
//! coordinator and nodes over mutual TLS.

use phm_e2e::{Federation, phm};

const PROJECT: &str = "RP-2026-014";
const SQL: &str = "SELECT imd_quintile, COUNT(*) AS people FROM gp_patients GROUP BY imd_quintile";

/// `phm <command>` as `requester`, with the federation's CA and the requester's own
/// client certificate; returns (exit code, stdout, stderr).
fn as_requester(
    fed: &Federation,
    requester: &str,
    federation: &str,
    command: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let ca = fed.ics.certs().join("ca.pem").display().to_string();
    let key = fed.ics.key(requester).display().to_string();
    let url = fed.coordinator_url();
    let mut args = vec![
        command,
        "--coordinator",
        &url,
        "--federation",
        federation,
        "--ca",
        &ca,
        "--key",
        &key,
    ];
    args.extend_from_slice(extra);
    phm(&args)
}

fn json(out: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("not JSON ({e}):\n{out}"))
}

fn spent(fed: &Federation, requester: &str, project: Option<&str>) -> serde_json::Value {
    let mut extra = vec!["--format", "json"];
    if let Some(p) = project {
        extra.extend(["--project", p]);
    }
    let (code, out, err) = as_requester(fed, requester, phm_e2e::FEDERATION_ID, "budget", &extra);
    assert_eq!(code, 0, "phm budget: {out}{err}");
    json(&out)
}

#[test]
fn results_belong_to_their_requester_and_a_retry_by_id_is_free() {
    let fed = Federation::start(20_000, 31, Some(3));
    let fid = phm_e2e::FEDERATION_ID;
    let research_sql =
        "SELECT imd_quintile, COUNT(*) AS people FROM gp_patients GROUP BY imd_quintile";
    let run = |who: &str, id: &str, sql: &str, project: Option<&str>| {
        let purpose = if project.is_some() {
            "research"
        } else {
            "planning"
        };
        let mut extra = vec!["--purpose", purpose, "--query-id", id, "--format", "json"];
        if let Some(p) = project {
            extra.extend(["--project", p]);
        }
        extra.push(sql);
        as_requester(&fed, who, fid, "query", &extra)
    };

    // The researcher asks under the approved project.
    let (code, out, err) = run("researcher", "rp-q1", research_sql, Some(PROJECT));
    assert_eq!(code, 0, "research query: {out}{err}");
    let first = json(&out);
    let before = spent(&fed, "researcher", Some(PROJECT));

    // F5: the DSU, holding an ordinary certificate and key, cannot read it by id.
    let (code, out, err) = as_requester(
        &fed,
        "dsu",
        fid,
        "result",
        &["--query-id", "rp-q1", "--format", "json"],
    );
    assert_ne!(code, 0, "the DSU read the research result: {out}");
    assert!(
        out.trim().is_empty(),
        "nothing of the result is printed: {out}"
    );
    assert!(err.contains("rp-q1") && err.contains("NOT_FOUND"), "{err}");

    // The researcher can, but only under the same project.
    let (code, out, err) = as_requester(
        &fed,
        "researcher",
        fid,
        "result",
        &[
            "--query-id",
            "rp-q1",
            "--project",
            PROJECT,
            "--format",
            "json",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(json(&out), first);
    let (code, _, err) = as_requester(
        &fed,
        "researcher",
        fid,
        "result",
        &["--query-id", "rp-q1", "--format", "json"],
    );
    assert_eq!(code, 4, "without its project: {err}");
    assert!(err.contains(PROJECT), "{err}");

    // F15 (INFO): `phm query --query-id X` run again returns the stored answer and
    // spends nothing; the same id for another question is QUERY_ID_REUSED.
    let (code, out, err) = run("researcher", "rp-q1", research_sql, Some(PROJECT));
    assert_eq!(code, 0, "retry: {out}{err}");
    assert_eq!(json(&out), first, "a retry returns the stored answer");
    assert_eq!(
        spent(&fed, "researcher", Some(PROJECT)),
        before,
        "a retry spends nothing"
    );
    let other = "SELECT sex, COUNT(*) AS people FROM gp_patients GROUP BY sex";
    let (code, _, err) = run("researcher", "rp-q1", other, Some(PROJECT));
    assert_eq!(code, 4, "{err}");
    assert!(err.contains("QUERY_ID_REUSED"), "{err}");

    // F9: the DSU may use the same id for its own question: ids are per requester.
    let (code, out, err) = run("dsu", "rp-q1", SQL, None);
    assert_eq!(code, 0, "{out}{err}");
    assert_ne!(json(&out), first);
}

#[test]
fn a_query_signed_for_another_federation_is_refused_before_any_node() {
    let fed = Federation::start(20_000, 32, Some(2));
    let before = spent(&fed, "dsu", None);
    let (code, out, err) = as_requester(
        &fed,
        "dsu",
        "another-ics",
        "query",
        &["--purpose", "planning", "--format", "json", SQL],
    );
    assert_eq!(code, 4, "{out}{err}");
    assert!(
        err.contains("UNAUTHENTICATED") || err.contains("federation"),
        "{err}"
    );
    assert!(err.contains("another-ics"), "{err}");
    assert_eq!(
        spent(&fed, "dsu", None),
        before,
        "nothing is spent anywhere"
    );
}

#[test]
fn thresholded_queries_stop_at_the_delta_budget_through_the_real_federation() {
    // F1: each thresholded query can release a key held by one person with
    // probability up to its delta, whatever its epsilon. The trust thresholds
    // `diagnosis_group` and gives the DSU a delta budget of two such queries.
    let ics = phm_e2e::Ics::synth(20_000, 33);
    let policy = ics.root.join("RW1").join("policy.toml");
    phm_e2e::edit_toml(&policy, |t| {
        let Some(toml::Value::Array(datasets)) = t.get_mut("datasets") else {
            panic!("no datasets")
        };
        for d in datasets.iter_mut() {
            let Some(toml::Value::Array(cols)) = d.get_mut("columns") else {
                continue;
            };
            for c in cols.iter_mut() {
                if c.get("name").and_then(toml::Value::as_str) == Some("diagnosis_group")
                    && let Some(c) = c.as_table_mut()
                {
                    c.insert("group".into(), "threshold".into());
                    c.remove("domain");
                }
            }
        }
        let Some(toml::Value::Array(reqs)) = t.get_mut("requesters") else {
            panic!("no requesters")
        };
        for r in reqs.iter_mut() {
            if r.get("id").and_then(toml::Value::as_str) == Some("dsu")
                && let Some(toml::Value::Table(b)) = r.get_mut("budget")
            {
                b.insert("delta".into(), toml::Value::Float(2e-9));
            }
        }
    });
    let fed = Federation::start_nodes(ics, &["RW1".to_string()], true);
    let sql = "SELECT diagnosis_group, COUNT(*) AS admissions FROM acute_admissions GROUP BY diagnosis_group";
    let ask = || {
        as_requester(
            &fed,
            "dsu",
            phm_e2e::FEDERATION_ID,
            "query",
            &[
                "--purpose",
                "planning",
                "--epsilon",
                "0.5",
                "--format",
                "json",
                sql,
            ],
        )
    };
    for i in 0..2 {
        let (code, out, err) = ask();
        assert_eq!(code, 0, "thresholded query {i}: {out}{err}");
        let v = json(&out);
        assert_eq!(v["delta_spent"], 1e-9, "the answer states its delta: {v}");
    }
    let (code, out, err) = ask();
    assert_eq!(
        code, 4,
        "the third thresholded query must be refused: {out}{err}"
    );
    assert!(
        err.contains("BUDGET_EXHAUSTED") && err.contains("delta"),
        "{err}"
    );
    // The budget shows the delta spent.
    let b = spent(&fed, "dsu", None);
    let rw1 = b
        .as_array()
        .and_then(|rows| {
            rows.iter()
                .find(|r| r["node"].as_str().is_some_and(|n| n.contains("RW1")))
        })
        .unwrap_or_else(|| panic!("no RW1 row: {b}"));
    assert_eq!(rw1["delta_spent"].as_f64(), Some(2e-9), "{rw1}");
}
