//! A PostgreSQL source at scale (BENCHMARKS.md, "Warehouse sources"): the node's DP
//! query (`Engine::execute`: the whole bounded plan as one statement inside
//! PostgreSQL, then noise) beside `psql` running the hand-written bounded reference of
//! the same question on the same server, interleaved round by round so a busy machine
//! slows both alike; and the node's load checks (column types, domains, bounds, ids,
//! rows per person) on the same table.
//!
//! The table: `--rows` rows (default 10M) of the benchmark's people (age, sex, IMD
//! quintile, BMI, opt-out), one person in a hundred with a second row, generated inside
//! PostgreSQL with a fixed seed. The question: `SELECT imd_quintile, sex, COUNT(*),
//! SUM(bmi), AVG(bmi) FROM gp_patients WHERE age >= 40 GROUP BY imd_quintile, sex`,
//! m = 1, BMI clamped to [10, 60].
//!
//! Run: `cargo bench -p phm-node --profile dev --features bench --bench warehouse` (the
//! node's part is reading ten rows and drawing their noise, so its build profile does not
//! move the figures; `--profile bench-fast` gives the same within noise)
//! (options: `--rows N`, `--rounds N`). Uses the server `PHM_TEST_PG_DSN` names, or
//! starts one (`phm_devkit::postgres`).

mod common;

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, ensure};
use common::{arg, median};
use phm_devkit::fixture::{bench_limits, bench_policy, bench_query};
use phm_devkit::postgres::Server;
use phm_node::engine::Engine;
use phm_policies::model::{Source, Warehouse};

/// The hand-written reference: what a DBA would write for the same bounded, clamped
/// question (no parameters, no lattice, no blank-id rule).
const REFERENCE: &str = "SELECT imd_quintile, sex, count(*), sum(b), avg(b) FROM ( \
    SELECT imd_quintile, sex, LEAST(GREATEST(bmi, 10), 60) AS b, \
           row_number() OVER (PARTITION BY person_id ORDER BY random()) AS rn \
    FROM gp_patients WHERE person_id IS NOT NULL AND age >= 40) AS s \
    WHERE rn <= 1 AND imd_quintile IN (1, 2, 3, 4, 5) AND sex IN ('F', 'M') \
    GROUP BY imd_quintile, sex";

fn main() -> Result<()> {
    let rows = arg("--rows", 10_000_000)?;
    let rounds = arg("--rounds", 5)?;
    let server = Server::start().map_err(|e| anyhow!(e))?;
    let db = server.fresh_database("phm_bench").map_err(|e| anyhow!(e))?;
    let t = Instant::now();
    // Every 100th person's row twice: 1% of people over m = 1.
    server
        .psql(
            &db,
            &format!(
                "SELECT setseed(0.2026); \
                 CREATE TABLE gp_patients AS SELECT \
                   'p' || CASE WHEN g % 100 = 1 THEN g - 1 ELSE g END AS person_id, \
                   CAST(floor(random() * 100) AS int4) AS age, \
                   CASE WHEN random() < 0.5 THEN 'F' ELSE 'M' END AS sex, \
                   CAST(1 + floor(random() * 5) AS int8) AS imd_quintile, \
                   CASE WHEN random() < 0.03 THEN NULL ELSE 15 + random() * 30 END AS bmi, \
                   random() < 0.03 AS ndopt_out \
                 FROM generate_series(1, {rows}) AS g"
            ),
        )
        .map_err(|e| anyhow!(e))?;
    server
        .psql(&db, "VACUUM ANALYZE gp_patients")
        .map_err(|e| anyhow!(e))?;
    println!(
        "table: {rows} rows generated in PostgreSQL in {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let dir = tempfile::tempdir()?;
    std::fs::write(dir.path().join("dsn"), server.dsn(&db))?;
    let mut policy = bench_policy("unused").map_err(|e| anyhow!(e))?;
    policy.datasets[0].source = Source::Postgres(Warehouse {
        relation: "gp_patients".into(),
        dsn_env: None,
        dsn_file: Some("dsn".into()),
        ca_file: None,
        statement_timeout_seconds: 3600,
    });
    policy.datasets[0].max_rows_per_person = 1;
    let rt = tokio::runtime::Runtime::new()?;
    let mut loads = Vec::new();
    let mut engine = None;
    for _ in 0..3 {
        let t = Instant::now();
        let e = rt
            .block_on(Engine::load(&policy, dir.path()))
            .context("load")?;
        loads.push(t.elapsed().as_secs_f64());
        engine = Some(e);
    }
    let engine = engine.ok_or_else(|| anyhow!("no engine"))?;
    let limits = bench_limits(1).map_err(|e| anyhow!(e))?;
    let query = bench_query();
    let (mut node, mut psql) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let t = Instant::now();
        let release = rt.block_on(engine.execute(&query, &limits))?;
        node.push(t.elapsed().as_secs_f64());
        ensure!(
            release.rows.len() == 10,
            "the release has {} rows",
            release.rows.len()
        );
        let t = Instant::now();
        let out = Command::new("psql")
            // The same work_mem the node sets for its own statements.
            .args(["-X", "-q", "-At", "-d", &server.dsn(&db)])
            .args(["-c", "SET work_mem = '64MB'", "-c", REFERENCE])
            .output()?;
        psql.push(t.elapsed().as_secs_f64());
        ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        println!(
            "round {round}: node {:.2} s, psql reference {:.2} s",
            node[round], psql[round]
        );
    }
    let (n, p) = (median(node), median(psql));
    println!("\n| {rows} rows, m = 1 | median of {rounds} |");
    println!("|---|---|");
    println!("| node DP query (one statement + noise) | {n:.2} s |");
    println!("| psql, hand-written bounded reference | {p:.2} s |");
    println!("| ratio node / psql | {:.2} |", n / p);
    println!(
        "| node load checks (median of 3) | {:.2} s |",
        median(loads)
    );
    Ok(())
}
