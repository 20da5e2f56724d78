//! Contribution bounding beside a plain group-by (BENCHMARKS.md, "Contribution
//! bounding"): on the same Parquet file, the engine's exact pipeline
//! (`Engine::execute_exact_bounded`: opt-out, filter, bounding, clamping, declared keys,
//! no noise) under each bounding plan, and plain DataFusion SQL of the same question with
//! no bounding at all, interleaved round by round so a busy machine slows every arm
//! alike. Cases: 1M rows where 1% of people have two rows (m = 1), and admissions-shaped
//! files (a geometric number of rows per person, mean 3; m = 5) of 1M and 10M rows.
//!
//! Plans: `unbounded` (the engine's pipeline with bounding left out: what the rest of it
//! costs, not a plan a node may run), `auto` (what a node runs: the people over m known from load, bounded by the
//! one-pass operator), `joined` (the same people split off by two joins and bounded by
//! the keyed-rank window, the form `auto` replaced), `counted` (the over-limit people
//! counted by the query itself, for data nobody measured), `window`
//! (every row through the keyed-rank window), `random` (the window ordered by `random()`,
//! the design this replaced; kept only in bench builds for this comparison).
//!
//! Run: `cargo bench -p phm-node --profile bench-fast --features bench --bench bounding`
//! (options: `--rounds N`, `--cases 1M_1pct,adm_1M,adm_10M`, `--arms auto,joined,…`;
//! plain SQL always runs, as the reference).

mod common;

use std::time::Instant;

use anyhow::{Context, Result, anyhow};
use common::median;
use datafusion::prelude::{ParquetReadOptions, SessionContext};
use phm_devkit::fixture::{
    BENCH_SQL, bench_limits, bench_policy, bench_query, write_admissions_data, write_bench_data,
};
use phm_node::engine::{BenchBounding, Engine};

struct Case {
    name: &'static str,
    rows: usize,
    /// 0: admissions-shaped; otherwise every n-th person has a second row.
    repeat_every: usize,
    m: u32,
}

const CASES: [Case; 3] = [
    Case {
        name: "1M_1pct",
        rows: 1_000_000,
        repeat_every: 100,
        m: 1,
    },
    Case {
        name: "adm_1M",
        rows: 1_000_000,
        repeat_every: 0,
        m: 5,
    },
    Case {
        name: "adm_10M",
        rows: 10_000_000,
        repeat_every: 0,
        m: 5,
    },
];

const ARMS: [(&str, Option<BenchBounding>); 7] = [
    ("plain SQL", None),
    ("unbounded", Some(BenchBounding::Skip)),
    ("auto", Some(BenchBounding::Auto)),
    ("joined", Some(BenchBounding::Joined)),
    ("counted", Some(BenchBounding::Counted)),
    ("window", Some(BenchBounding::Window)),
    ("random", Some(BenchBounding::Random)),
];

/// A comma-separated option value, as a list.
fn list(value: Option<String>, option: &str) -> Result<Vec<String>> {
    let value = value.ok_or_else(|| anyhow!("{option} needs a list"))?;
    Ok(value.split(',').map(str::to_string).collect())
}

fn main() -> Result<()> {
    let mut rounds = 7usize;
    let mut only: Option<Vec<String>> = None;
    // Every arm by default; `--arms plain,auto` times only those (for profiling one plan).
    let mut arms: Option<Vec<String>> = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--rounds" => {
                rounds = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| anyhow!("--rounds needs a number"))?;
            }
            "--cases" => only = Some(list(args.next(), "--cases")?),
            "--arms" => arms = Some(list(args.next(), "--arms")?),
            // cargo bench passes --bench; anything else is a mistake worth saying.
            "--bench" => {}
            other => return Err(anyhow!("unknown option {other}")),
        }
    }
    let rt = tokio::runtime::Runtime::new()?;
    let dir = tempfile::tempdir()?;
    println!("| case | rows | people over m | arm | median (ms) | × plain | min (ms) | max (ms) |");
    println!("|---|---:|---:|---|---:|---:|---:|---:|");
    for case in CASES
        .iter()
        .filter(|c| only.as_ref().is_none_or(|o| o.iter().any(|n| n == c.name)))
    {
        let file = format!("{}.parquet", case.name);
        let path = dir.path().join(&file);
        let t = Instant::now();
        if case.repeat_every == 0 {
            write_admissions_data(&path, case.rows).map_err(|e| anyhow!("{e}"))?;
        } else {
            write_bench_data(&path, case.rows, case.repeat_every, 45.0)
                .map_err(|e| anyhow!("{e}"))?;
        }
        eprintln!(
            "{}: wrote {} rows in {:.1?}",
            case.name,
            case.rows,
            t.elapsed()
        );
        let mut policy = bench_policy(&file).map_err(|e| anyhow!("{e}"))?;
        for d in &mut policy.datasets {
            d.max_rows_per_person = case.m;
        }
        let t = Instant::now();
        let engine = rt
            .block_on(Engine::load(&policy, dir.path()))
            .with_context(|| format!("load {file}"))?;
        eprintln!("{}: Engine::load {:.1?}", case.name, t.elapsed());
        let over = engine
            .people_over_limit("gp_patients")
            .ok_or_else(|| anyhow!("no load-time count for {file}"))?;
        let ctx = SessionContext::new();
        rt.block_on(ctx.register_parquet(
            "gp_patients",
            path.to_string_lossy().as_ref(),
            ParquetReadOptions::default(),
        ))?;
        let (q, l) = (
            bench_query(),
            bench_limits(case.m).map_err(|e| anyhow!("{e}"))?,
        );
        let mut times: Vec<Vec<f64>> = vec![Vec::new(); ARMS.len()];
        // Round 0 warms the page cache and every plan; it is not counted.
        for round in 0..=rounds {
            for (i, (name, arm)) in ARMS.iter().enumerate() {
                let short = name.split(' ').next().unwrap_or(name);
                if i > 0 && arms.as_ref().is_some_and(|a| !a.iter().any(|x| x == short)) {
                    continue;
                }
                let t = Instant::now();
                match arm {
                    None => {
                        rt.block_on(async { ctx.sql(BENCH_SQL).await?.collect().await })?;
                    }
                    Some(how) => {
                        rt.block_on(engine.execute_exact_bounded(&q, &l, *how))?;
                    }
                }
                if round > 0 {
                    times[i].push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
        }
        let plain = median(times[0].clone());
        for ((name, _), t) in ARMS.iter().zip(times) {
            if t.is_empty() {
                continue;
            }
            let min = t.iter().copied().fold(f64::INFINITY, f64::min);
            let max = t.iter().copied().fold(0.0, f64::max);
            let med = median(t);
            println!(
                "| {} | {} | {over} | {name} | {med:.0} | {:.2} | {min:.0} | {max:.0} |",
                case.name,
                case.rows,
                med / plain
            );
        }
    }
    Ok(())
}
