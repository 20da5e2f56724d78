//! Accuracy per ε beside the peers (BENCHMARKS.md, "Accuracy beside SmartNoise SQL and
//! OpenDP-Polars"): one generated file of one row per person (`person_id`,
//! `imd_quintile` 1..5, `age` 0..100), the question
//! `SELECT imd_quintile, COUNT(*), SUM(age), AVG(age) … GROUP BY imd_quintile` at the
//! same total ε in all three, keys public, age clamped to [0, 100], pure ε-DP.
//!
//! The peers run in a Python virtual environment made by `peers/venv.sh` (versions
//! pinned in `peers/requirements.txt`); `peers/peers.py` reads each peer's privacy cost
//! back from the peer itself and fails unless it equals ε. This node runs the same
//! question through `Engine::execute` (bounding, clamping, declared keys, OpenDP noise)
//! with the policy it would have: `age` declared `never_null`, so AVG shares COUNT(*)'s
//! noisy count and SUM(age)'s noisy sum (two measurements for three figures).
//!
//! RMSE is pooled over the five groups and the runs, against the exact figures. Speed is
//! the median wall time of one query, each aggregate alone at the same ε (data in
//! memory in every engine; see peers.py for what its timings include).
//!
//! Run: `cargo bench -p phm-node --profile bench-fast --bench peers` (options: `--rows N`
//! (1,000,000), `--runs N` (400), `--timing-runs N` (5), `--epsilon-milli N` (1000),
//! `--venv DIR` (target/peers-venv)).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, bail};
use common::{arg, median};
use phm_node::engine::Engine;
use phm_policies::model::{ColumnType, Mechanism, Rounding, SourceFormat};
use phm_policies::{AggregateLimits, ColumnLimits, GroupDomain, GroupLimits, Limits};
use phm_proto::AggregateKind;
use rand::{Rng, SeedableRng};
use serde_json::Value;

const KINDS: [(&str, AggregateKind); 3] = [
    ("count", AggregateKind::Count),
    ("sum", AggregateKind::Sum),
    ("avg", AggregateKind::Mean),
];

/// Writes the file: quintiles uniform; ages a mixture (children, adults, older people)
/// with mean about 40, whole years in [0, 100]. Returns the exact COUNT, SUM, AVG per
/// quintile.
fn write_data(path: &Path, rows: usize, seed: u64) -> Result<[[f64; 5]; 3]> {
    use std::io::Write as _;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    writeln!(out, "person_id,imd_quintile,age")?;
    let (mut n, mut s) = ([0f64; 5], [0f64; 5]);
    for i in 0..rows {
        let q = rng.gen_range(0..5usize);
        let age: i64 = match rng.gen_range(0..10u32) {
            0..=1 => rng.gen_range(0..18),
            2..=7 => rng.gen_range(18..65),
            _ => rng.gen_range(65..101),
        };
        // A little deprivation gradient so the groups' means differ.
        let age = (age - q as i64).clamp(0, 100);
        writeln!(out, "p{i},{},{age}", q + 1)?;
        n[q] += 1.0;
        s[q] += age as f64;
    }
    out.flush()?;
    let avg = std::array::from_fn(|q| s[q] / n[q]);
    Ok([n, s, avg])
}

fn column(name: &str, ty: ColumnType, bounds: Option<(f64, f64)>) -> ColumnLimits {
    ColumnLimits {
        name: name.into(),
        column_type: ty,
        bounds,
        never_null: name == "age",
    }
}

fn limits(kinds: &[AggregateKind], epsilon: f64) -> Result<Limits> {
    let aggregates = kinds
        .iter()
        .enumerate()
        .map(|(i, &kind)| AggregateLimits {
            alias: format!("a{i}"),
            kind,
            column: (kind != AggregateKind::Count)
                .then(|| column("age", ColumnType::Integer, Some((0.0, 100.0)))),
        })
        .collect();
    let by = GroupLimits {
        column: column("imd_quintile", ColumnType::Integer, None),
        label: "imd_quintile".into(),
        domain: GroupDomain::Categories((1..=5).map(|i| i.to_string()).collect()),
    };
    let mut l = phm_devkit::fixture::engine_limits("peers", vec![by], aggregates, epsilon)
        .map_err(|e| anyhow!(e))?;
    // As the peers release: every figure, unrounded, unsuppressed, pure ε.
    l.max_rows_per_person = 1;
    l.mechanism = Mechanism::DiscreteLaplace;
    l.rounding = Rounding::None;
    l.min_reportable_count = 0.0;
    Ok(l)
}

async fn engine(dir: &Path) -> Result<Engine> {
    let mut p = phm_devkit::fixture::engine_gp_patients(
        SourceFormat::Csv,
        "people.csv",
        &["person_id", "imd_quintile", "age"],
    )
    .map_err(|e| anyhow!(e))?;
    // The peers see no opt-out flag; neither does the node here.
    p.opt_out = None;
    for c in p.datasets.iter_mut().flat_map(|d| d.columns.iter_mut()) {
        if c.name == "age" {
            c.bounds = Some([0.0, 100.0]);
            c.never_null = true;
        }
    }
    Ok(Engine::load(&p, dir).await?)
}

fn query() -> phm_proto::QueryBody {
    phm_proto::QueryBody {
        filter: None,
        ..phm_devkit::fixture::bench_query()
    }
}

/// The node's RMSE per aggregate over `runs` runs of the combined query, its spend, and
/// the combined query's median time.
async fn node_accuracy(
    e: &Engine,
    truth: &[[f64; 5]; 3],
    epsilon: f64,
    runs: usize,
) -> Result<([f64; 3], f64, f64)> {
    let kinds: Vec<AggregateKind> = KINDS.iter().map(|k| k.1).collect();
    let l = limits(&kinds, epsilon)?;
    let q = query();
    let (mut sq, mut times, mut spent) = ([0f64; 3], Vec::new(), 0f64);
    for _ in 0..runs {
        let t = Instant::now();
        let r = e.execute(&q, &l).await?;
        times.push(t.elapsed().as_secs_f64());
        spent = spent.max(r.epsilon_spent);
        for (g, row) in r.rows.iter().enumerate() {
            for (a, cell) in row.cells.iter().enumerate() {
                sq[a] += (cell.noisy_value - truth[a][g]).powi(2);
            }
        }
    }
    let n = (runs * 5) as f64;
    Ok((sq.map(|s| (s / n).sqrt()), spent, median(times)))
}

async fn node_speed(e: &Engine, epsilon: f64, runs: usize) -> Result<[f64; 3]> {
    let q = query();
    let mut out = [0f64; 3];
    for (i, (_, kind)) in KINDS.iter().enumerate() {
        let l = limits(&[*kind], epsilon)?;
        let mut times = Vec::new();
        for _ in 0..runs {
            let t = Instant::now();
            e.execute(&q, &l).await?;
            times.push(t.elapsed().as_secs_f64());
        }
        out[i] = median(times);
    }
    Ok(out)
}

fn run_peers(
    venv: &Path,
    data: &Path,
    out: &Path,
    epsilon: f64,
    runs: usize,
    timing: usize,
) -> Result<Value> {
    let here = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/peers");
    let made = Command::new("bash")
        .arg(here.join("venv.sh"))
        .arg(venv)
        .output()
        .context("running peers/venv.sh")?;
    if !made.status.success() {
        bail!("venv.sh failed: {}", String::from_utf8_lossy(&made.stderr));
    }
    let stdout = String::from_utf8_lossy(&made.stdout);
    let python = stdout
        .lines()
        .last()
        .ok_or_else(|| anyhow!("venv.sh printed no python path"))?
        .trim()
        .to_string();
    let status = Command::new(&python)
        .arg(here.join("peers.py"))
        .args(["--data", &data.display().to_string()])
        .args(["--epsilon", &epsilon.to_string()])
        .args(["--runs", &runs.to_string()])
        .args(["--timing-runs", &timing.to_string()])
        .args(["--seed", "7"])
        .args(["--out", &out.display().to_string()])
        .status()
        .context("running peers.py")?;
    if !status.success() {
        bail!("peers.py failed ({status})");
    }
    Ok(serde_json::from_str(&std::fs::read_to_string(out)?)?)
}

/// A text field of a peer's JSON, or `missing` when it has none.
fn text<'a>(v: &'a Value, key: &str, missing: &'a str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or(missing)
}

fn num(v: &Value, path: &[&str]) -> Result<f64> {
    let mut x = v;
    for p in path {
        x = x
            .get(p)
            .ok_or_else(|| anyhow!("peers JSON has no {}", path.join(".")))?;
    }
    x.as_f64()
        .ok_or_else(|| anyhow!("peers JSON {} is not a number", path.join(".")))
}

#[tokio::main]
async fn main() -> Result<()> {
    let rows = arg("--rows", 1_000_000)?;
    let runs = arg("--runs", 400)?;
    let timing = arg("--timing-runs", 5)?;
    let epsilon = arg("--epsilon-milli", 1000)? as f64 / 1000.0;
    let args: Vec<String> = std::env::args().collect();
    let venv = match args.iter().position(|a| a == "--venv") {
        Some(i) => PathBuf::from(
            args.get(i + 1)
                .ok_or_else(|| anyhow!("--venv needs a value"))?,
        ),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/peers-venv"),
    };
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("people.csv");
    let truth = write_data(&data, rows, 20261207)?;
    eprintln!("wrote {rows} rows; running this node ({runs} runs)…");
    let e = engine(dir.path()).await?;
    let (rmse, spent, combined) = node_accuracy(&e, &truth, epsilon, runs).await?;
    let speed = node_speed(&e, epsilon, timing).await?;
    drop(e);
    eprintln!("node done; running the peers ({runs} runs each)…");
    let t = Instant::now();
    let peers = run_peers(
        &venv,
        &data,
        &dir.path().join("peers.json"),
        epsilon,
        runs,
        timing,
    )?;
    eprintln!("peers done in {:.0?}", t.elapsed());
    let list = peers
        .get("peers")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("peers JSON has no peers"))?;
    println!(
        "\n{rows} people, ε = {epsilon} in all (node spent {spent:.6}), {runs} runs, median of {timing} timed queries\n"
    );
    println!(
        "| aggregate | this node RMSE | {} | ratio to the better peer | node s | peers s | speed ratio (node / faster peer) |",
        list.iter()
            .map(|p| format!("{} RMSE", text(p, "name", "?")))
            .collect::<Vec<_>>()
            .join(" | ")
    );
    println!("|---|---|{}---|---|---|---|", "---|".repeat(list.len()));
    for (i, (name, _)) in KINDS.iter().enumerate() {
        let peer_rmse: Vec<f64> = list
            .iter()
            .map(|p| num(p, &["rmse", name]))
            .collect::<Result<_>>()?;
        let peer_s: Vec<f64> = list
            .iter()
            .map(|p| num(p, &["median_s", name]))
            .collect::<Result<_>>()?;
        let best = peer_rmse.iter().copied().fold(f64::INFINITY, f64::min);
        let fastest = peer_s.iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            "| {name} | {:.4} | {} | **{:.2}×** | {:.4} | {} | {:.4}× |",
            rmse[i],
            peer_rmse
                .iter()
                .map(|r| format!("{r:.4}"))
                .collect::<Vec<_>>()
                .join(" | "),
            rmse[i] / best,
            speed[i],
            peer_s
                .iter()
                .map(|s| format!("{s:.3}"))
                .collect::<Vec<_>>()
                .join(" / "),
            speed[i] / fastest,
        );
    }
    println!(
        "\ncombined query, median s: node {combined:.3}; peers {}",
        list.iter()
            .map(|p| format!(
                "{} {:.3}",
                text(p, "name", "?"),
                num(p, &["combined_median_s"]).unwrap_or(f64::NAN)
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    for p in list {
        println!(
            "{} {}: ε read back {}, δ {}; {}",
            text(p, "name", "?"),
            text(p, "version", "?"),
            num(p, &["epsilon_reported"]).unwrap_or(f64::NAN),
            num(p, &["delta_reported"]).unwrap_or(f64::NAN),
            text(p, "notes", ""),
        );
    }
    Ok(())
}
