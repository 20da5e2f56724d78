//! Partners whose data live in PostgreSQL (`format = "postgres"`), end to end against a
//! real server: `phm demo --postgres` answers every question from the warehouses, with
//! each statement in the audit log; a warehouse failure after the charge is a clear
//! refusal, and asking again under the same query id is answered under that charge.

use std::process::Command;

use phm_devkit::postgres::{DSN_ENV, Server};
use phm_e2e::{Federation, Ics, audit_verify, demo};

use crate::rt;

/// A small synthetic ICS whose first GP practice serves its data from a fresh database
/// on `server`: the ICS, the practice's folder name and the database.
fn practice_on_postgres(server: &Server, seed: u64) -> (Ics, String, String) {
    let ics = Ics::synth(3000, seed);
    let id = ics.nodes_serving("gp_patients")[0].clone();
    let db = server.fresh_database("phm_e2e").unwrap();
    rt().block_on(phm_devkit::synth::warehouse::move_partner(
        server,
        &ics.root.join(&id),
        &db,
    ))
    .unwrap();
    (ics, id, db)
}

/// `sql` asked as the DSU for planning at ε 0.5 under `query_id`.
fn ask_planning(fed: &Federation, query_id: &str, sql: &str) -> serde_json::Value {
    let args = [
        "--purpose",
        "planning",
        "--epsilon",
        "0.5",
        "--query-id",
        query_id,
    ];
    fed.query_json("dsu", &args, sql)
}

/// Every line of a node's audit log, parsed.
fn audit_entries(state: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(state.join("audit.log")).unwrap();
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn the_demo_answers_every_question_from_postgres() {
    let Some(server) = Server::for_test("the_demo_answers_every_question_from_postgres") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let stdout = demo(&["--postgres"], 2, &dir, &[(DSN_ENV, server.admin_dsn())]);
    assert!(
        stdout.contains("Loading every partner's data into PostgreSQL"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Check against the exact answers"),
        "{stdout}"
    );
    let orgs = phm_devkit::launch::organisations(&dir);
    assert!(orgs.len() >= 5, "{orgs:?}");
    let mut answers = 0;
    for org in &orgs {
        let policy = std::fs::read_to_string(dir.join(org).join("policy.toml")).unwrap();
        assert!(
            policy.contains("format = \"postgres\""),
            "{org} is not on postgres"
        );
        let state = dir.join(org).join("state");
        let (code, verify) = audit_verify(&state);
        assert_eq!(code, 0, "{org}: {verify}");
        // Every answered query's statement is in the log, and no literal or file path.
        let answered: Vec<_> = audit_entries(&state)
            .into_iter()
            .filter(|e| e["decision"] == "allowed" && e["cached"] == false)
            .collect();
        answers += answered.len();
        for e in &answered {
            let statements = e["statements"].as_array().map(Vec::len).unwrap_or(0);
            assert!(
                statements >= 1,
                "{org}: an answer without its statement: {e}"
            );
        }
    }
    assert!(answers >= 20, "only {answers} answers in the audit logs");
    // The node's role may read its views and nothing more.
    let db = format!("phm_demo_{}", orgs[0].to_ascii_lowercase());
    let reader = server.dsn_as(&db, &format!("{db}_reader"));
    let write = Command::new("psql")
        .args(["-X", "-q", "-At", "-d", &reader, "-c"])
        .arg("INSERT INTO gp_patients_rows (person_id) VALUES ('x')")
        .output()
        .unwrap();
    let refused = String::from_utf8_lossy(&write.stderr);
    assert!(!write.status.success());
    assert!(refused.contains("permission denied"), "{refused}");
}

#[test]
fn a_failed_warehouse_statement_is_charged_once_and_retried_under_that_charge() {
    let Some(server) = Server::for_test("a_failed_warehouse_statement_is_charged_once") else {
        return;
    };
    let (ics, id, db) = practice_on_postgres(&server, 11);
    let fed = Federation::start_nodes(ics, std::slice::from_ref(&id), true);
    let ask = || {
        ask_planning(
            &fed,
            "wh-retry-1",
            "SELECT sex, COUNT(*) AS people FROM gp_patients GROUP BY sex",
        )
    };
    // The view goes away under the running node.
    server
        .psql(&db, "ALTER VIEW gp_patients RENAME TO gp_patients_away")
        .unwrap();
    let refused = ask().to_string();
    assert!(refused.contains("does not exist"), "{refused}");
    assert!(refused.contains("stays spent"), "{refused}");
    server
        .psql(&db, "ALTER VIEW gp_patients_away RENAME TO gp_patients")
        .unwrap();
    let answered = ask();
    let rows = answered.to_string();
    assert!(rows.contains("\"F\"") && rows.contains("\"M\""), "{rows}");
    // One charge for the two attempts, both audited, the statement in each.
    let state = ics_state(&fed, &id);
    let entries: Vec<_> = audit_entries(&state)
        .into_iter()
        .filter(|e| e["query_id"] == "wh-retry-1")
        .collect();
    assert_eq!(entries.len(), 2, "{entries:?}");
    let spent: f64 = entries
        .iter()
        .map(|e| e["epsilon_spent"].as_f64().unwrap())
        .sum();
    assert!(
        (spent - 0.5).abs() < 1e-12,
        "charged {spent} for one question"
    );
    assert_eq!(entries[0]["decision"], "refused");
    assert_eq!(entries[1]["decision"], "allowed");
    for e in &entries {
        assert!(
            e["statements"].as_array().is_some_and(|s| s.len() == 1),
            "{e}"
        );
    }
    let (code, verify) = audit_verify(&state);
    assert_eq!(code, 0, "{verify}");
}

fn ics_state(fed: &Federation, id: &str) -> std::path::PathBuf {
    fed.ics.root.join(id).join("state")
}

/// Also the connection string from an environment variable (`dsn_env`).
#[test]
fn a_charge_is_not_reused_under_a_changed_policy() {
    let Some(server) = Server::for_test("a_charge_is_not_reused_under_a_changed_policy") else {
        return;
    };
    let (ics, id, db) = practice_on_postgres(&server, 12);
    // The connection string from the environment this time (`dsn_env`), not a file.
    let dsn = std::fs::read_to_string(ics.root.join(&id).join("warehouse.dsn")).unwrap();
    std::fs::remove_file(ics.root.join(&id).join("warehouse.dsn")).unwrap();
    phm_e2e::edit_toml(&ics.policy_path(&id), |t| {
        for ds in t
            .get_mut("datasets")
            .and_then(toml::Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(src) = ds.get_mut("source").and_then(toml::Value::as_table_mut) {
                src.remove("dsn_file");
                src.insert("dsn_env".into(), "PHM_E2E_WAREHOUSE_DSN".into());
            }
        }
    });
    let mut fed = Federation::start_nodes_with_env(
        ics,
        std::slice::from_ref(&id),
        &[("PHM_E2E_WAREHOUSE_DSN", dsn.trim())],
    );
    let ask = |fed: &Federation, query_id: &str| {
        ask_planning(fed, query_id, "SELECT COUNT(*) AS people FROM gp_patients").to_string()
    };
    server
        .psql(&db, "ALTER VIEW gp_patients RENAME TO gp_patients_away")
        .unwrap();
    let refused = ask(&fed, "wh-policy-1");
    assert!(refused.contains("does not exist"), "{refused}");
    server
        .psql(&db, "ALTER VIEW gp_patients_away RENAME TO gp_patients")
        .unwrap();
    // The IG lead changes the policy while the query is charged and unreleased.
    let policy = fed.ics.policy_path(&id);
    phm_e2e::edit_toml(&policy, |t| {
        if let Some(r) = t.get_mut("release").and_then(toml::Value::as_table_mut) {
            r.insert("min_reportable_count".into(), 11.into());
        }
    });
    fed.node(&id).proc.signal("HUP");
    let node = fed.node(&id);
    phm_e2e::wait_for(
        "the node to reload its policy",
        std::time::Duration::from_secs(60),
        || {
            node.proc
                .log_text()
                .contains("the new policy is in force")
                .then_some(())
        },
    );
    let changed = ask(&fed, "wh-policy-1");
    assert!(changed.contains("policy has changed"), "{changed}");
    assert!(changed.contains("QUERY_ID_REUSED"), "{changed}");
    let answered = ask(&fed, "wh-policy-2");
    assert!(
        answered.contains(&format!("\"answered\":[\"{id}\"]")),
        "{answered}"
    );
    let state = fed.ics.root.join(&id).join("state");
    let spent: f64 = audit_entries(&state)
        .iter()
        .map(|e| e["epsilon_spent"].as_f64().unwrap_or(0.0))
        .sum();
    assert!(
        (spent - 1.0).abs() < 1e-12,
        "spent {spent}: one charge per query id"
    );
    let (code, verify) = audit_verify(&state);
    assert_eq!(code, 0, "{verify}");
}
