//! Secure-aggregation benchmark (BENCHMARKS.md, "Secure aggregation"), in two parts.
//!
//! **Accuracy** (in process, no network): the system total's error over `--accuracy-runs`
//! releases at N = 10 and 100 nodes, each node drawing its share with the node's own
//! [`phm_node::engine::noisy_share`] (OpenDP's discrete Gaussian on the lattice the
//! accountant chose), beside one central OpenDP discrete-Gaussian release of the same
//! ρ and the two plain modes (every node adding its own full discrete Gaussian, or its
//! own discrete Laplace). The masks cancel exactly in Z_2^64 (the `phm-secagg` tests
//! check the decoded total equals the survivors' sum bit for bit), so the decoded total
//! is the sum of the shares computed here; the sessions below check it again end to end.
//!
//! **Sessions** (real processes): for each `--nodes` size, a synthetic ICS with that many
//! GP practices (`phm_devkit::synth`), every practice as a real `phm-node` process and
//! the real `phm-coordinator`, on loopback over mutual TLS; the DSU asks diabetics by
//! IMD quintile (5 cells) at ε = `--epsilon`, `--runs` times in secure mode and, in the
//! same federation and run, in plain mode. Reported: wall time per query (p50, p95), each
//! round's time at the coordinator, the protobuf payload per node (from the coordinator's
//! log) and every released total checked against the synthetic truth. Then, at the
//! first size, a dropout run: 10% of the practices are killed (SIGKILL) as soon as their
//! log says their R1 shares went out; the total must still be released, with coverage
//! naming them.
//!
//! Run: `cargo bench -p phm-node --profile bench-fast --bench secure` (options:
//! `--help`).
mod common;

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use common::{load_average, log_events, median, submit};
use opendp::domains::AtomDomain;
use opendp::measurements::{make_gaussian, make_laplace};
use opendp::measures::{MaxDivergence, ZeroConcentratedDivergence};
use opendp::metrics::AbsoluteDistance;
use phm_devkit::launch::{Federation, Launch, Programs, edit_toml};
use phm_devkit::synth::{self, SynthOptions, ics::OrgKind};
use phm_proto::proto;
use phm_proto::{
    Aggregate, AggregateKind, Aggregation, CompareOp, GroupKey, Literal, Predicate, Purpose,
    QueryBody,
};
use phm_secagg::accountant::{self, Cohort, NoiseTarget};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const RUST_LOG: &str = "info,phm_node::service::secure=debug,phm_coordinator::secure=debug";
const QUINTILES: usize = 5;

#[derive(Debug, Parser)]
#[command(about = "Secure aggregation: accuracy against a central release, and sessions")]
struct Args {
    /// Session sizes (GP practices), comma separated.
    #[arg(long, value_delimiter = ',', default_value = "100,200")]
    nodes: Vec<usize>,
    /// Timed queries per size and mode (after one warm-up).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// ε of each question.
    #[arg(long, default_value_t = 0.5)]
    epsilon: f64,
    /// Releases per accuracy case (0 skips the accuracy part).
    #[arg(long, default_value_t = 2000)]
    accuracy_runs: usize,
    /// Skip the sessions (accuracy only).
    #[arg(long)]
    accuracy_only: bool,
    /// Share of practices killed in the dropout run (0 skips it).
    #[arg(long, default_value_t = 0.1)]
    dropout: f64,
    #[command(flatten)]
    processes: common::Processes,
}

// ---------------------------------------------------------------------------------------
// Accuracy

/// Root mean square of `errors`.
fn rmse(errors: &[f64]) -> f64 {
    (errors.iter().map(|e| e * e).sum::<f64>() / errors.len() as f64).sqrt()
}

/// One accuracy case: N nodes, each holding a count; `survivors` of them in the total.
fn accuracy(n: u32, survivors: u32, runs: usize, epsilon: f64, delta: f64) -> Result<()> {
    let rho = phm_policies::accounting::rho_for(epsilon, delta);
    // COUNT of one cell, one row per person: ‖Δ‖₁ = ‖Δ‖₂ = 1.
    let target = NoiseTarget {
        rho,
        delta1: 1.0,
        delta2: 1.0,
        dim: 1,
    };
    let t_noise = (0.9 * f64::from(n)).ceil() as u32;
    let cal =
        accountant::calibrate(Cohort { n, t_noise, c: 0 }, &target).map_err(|e| anyhow!("{e}"))?;
    let g = cal.lattice as f64;
    let inputs: Vec<i64> = (0..i64::from(n)).map(|u| 100 + 7 * u).collect();
    let truth: i64 = inputs[..survivors as usize].iter().sum();
    let all_truth: i64 = inputs.iter().sum();
    let central = make_gaussian::<_, _, ZeroConcentratedDivergence>(
        AtomDomain::<i64>::default(),
        AbsoluteDistance::<i64>::default(),
        cal.sigma_central,
        None,
    )?;
    let laplace = make_laplace::<_, _, MaxDivergence>(
        AtomDomain::<i64>::default(),
        AbsoluteDistance::<i64>::default(),
        1.0 / epsilon,
        None,
    )?;
    let (mut secure, mut central_err, mut plain_g, mut plain_l) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let mut total: i64 = 0;
        for x in &inputs[..survivors as usize] {
            let share = phm_node::engine::noisy_share(&[*x], cal.lattice, cal.sigma_share)?;
            total = total.wrapping_add(share[0]);
        }
        secure.push(total as f64 / g - truth as f64);
        central_err.push((central.invoke(&all_truth)? - all_truth) as f64);
        let (mut sg, mut sl) = (0i64, 0i64);
        for x in &inputs {
            sg += central.invoke(x)?;
            sl += laplace.invoke(x)?;
        }
        plain_g.push((sg - all_truth) as f64);
        plain_l.push((sl - all_truth) as f64);
    }
    let (s, c, pg, pl) = (
        rmse(&secure),
        rmse(&central_err),
        rmse(&plain_g),
        rmse(&plain_l),
    );
    println!(
        "| {n} | {survivors} | {runs} | {:.3} | {s:.3} ({:.3} predicted) | {c:.3} ({:.3}) | **{:.3}** | {pg:.3} ({:.2}×) | {pl:.3} ({:.2}×) | {} | {:.3} |",
        cal.sigma_central,
        cal.total_sd(survivors),
        cal.sigma_central,
        s / c,
        pg / c,
        pl / c,
        cal.lattice,
        cal.sigma_share,
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Sessions

struct Setup {
    dir: PathBuf,
    practices: Vec<String>,
    programs: Programs,
    /// Diabetics per IMD quintile ("1".."5") over the included practices.
    truth: BTreeMap<String, f64>,
}

fn prepare(args: &Args, n: usize) -> Result<Setup> {
    let dir = args.processes.dir("phm-secure-bench").join(format!("n{n}"));
    let t = Instant::now();
    // Exactly n practices of about 4,000 registered people each (a small practice; the
    // NHS test-number range caps a synthetic ICS at 900,000 people, so 200 practices of
    // the mean English list size would not fit).
    let summary = synth::run(&SynthOptions {
        out: dir.clone(),
        population: (n * 4_000).min(900_000),
        seed: 20_261_202,
        nodes_limit: Some(n),
        practices: Some(n),
        base_port: None,
        progress: false,
        force: true,
    })
    .map_err(|e| anyhow!("synth: {e}"))?;
    let practices: Vec<String> = summary
        .manifest
        .organisations
        .iter()
        .filter(|o| o.kind == OrgKind::GpPractice)
        .map(|o| o.ods_code.clone())
        .collect();
    ensure!(
        practices.len() == n,
        "the synthetic ICS has {} practices, not {n}",
        practices.len()
    );
    eprintln!(
        "synthesised {} people, {n} practices in {:.1} s",
        summary.manifest.population,
        t.elapsed().as_secs_f64()
    );
    for ods in &practices {
        edit_toml(&dir.join(ods).join("node.toml"), |t| {
            t.insert("log_format".into(), "json".into());
        })?;
    }
    edit_toml(&dir.join("coordinator/coordinator.toml"), |t| {
        t.insert("log_format".into(), "json".into());
    })?;
    let reference = synth::load_reference(&dir).map_err(|e| anyhow!("reference: {e}"))?;
    let q = reference
        .questions
        .iter()
        .find(|q| q.id == phm_devkit::questions::DIABETES_BY_IMD_AGE.id)
        .ok_or_else(|| anyhow!("no diabetes reference question"))?;
    let at = q
        .group_columns
        .iter()
        .position(|c| c == "imd_quintile")
        .ok_or_else(|| anyhow!("the reference has no imd_quintile"))?;
    let mut truth = BTreeMap::new();
    for row in &q.rows {
        *truth.entry(row.key[at].clone()).or_insert(0.0) +=
            row.values.get("diabetics").copied().unwrap_or(0.0);
    }
    Ok(Setup {
        dir,
        practices,
        programs: args.processes.programs(RUST_LOG)?,
        truth,
    })
}

fn question(
    dir: &Path,
    id: &str,
    epsilon: f64,
    aggregation: Aggregation,
) -> Result<proto::AggregateQuery> {
    let pem = std::fs::read_to_string(dir.join("keys/dsu.key"))?;
    let key = phm_proto::signing::private_key_from_pem(&pem).map_err(|e| anyhow!("{e}"))?;
    let body = QueryBody {
        federation_id: synth::FEDERATION_ID.into(),
        query_id: id.into(),
        requester_id: "dsu".into(),
        purpose: Purpose::Planning,
        project_id: None,
        dataset: "gp_patients".into(),
        filter: Some(Predicate::Compare {
            column: "diabetes".into(),
            op: CompareOp::Eq,
            value: Literal::Boolean(true),
        }),
        group_by: vec![GroupKey::Column("imd_quintile".into())],
        aggregates: vec![Aggregate {
            alias: "diabetics".into(),
            kind: AggregateKind::Count,
            column: None,
        }],
        epsilon,
        issued_at_unix_ms: phm_proto::query::now_unix_ms(),
        nonce: phm_proto::query::fresh_nonce(),
        linkage: None,
        aggregation,
    };
    Ok(proto::AggregateQuery::from(body.sign(&key)))
}

/// Every released quintile within 6 sd (plus the policies' rounding) of the truth, in
/// secure mode one figure per quintile over exactly `answered` practices.
fn check(r: &proto::CombinedResult, s: &Setup, answered: usize, secure: bool) -> Result<()> {
    let got = r.coverage.as_ref().map_or(0, |c| c.answered.len());
    ensure!(
        got == answered,
        "{got} practices answered, expected {answered}"
    );
    ensure!(r.rows.len() == QUINTILES, "{} rows", r.rows.len());
    for row in &r.rows {
        let q = row.key.first().cloned().unwrap_or_default();
        let cell = row
            .cells
            .iter()
            .find(|c| c.alias == "diabetics")
            .ok_or_else(|| anyhow!("row {q} has no diabetics"))?;
        ensure!(!cell.suppressed, "quintile {q} suppressed");
        let truth = s.truth.get(&q).copied().unwrap_or(0.0);
        let sd = cell.standard_error;
        // With dropouts the total covers the survivors only; their share of the truth
        // is unknown here, so the dropout run checks the interval's width and sign.
        if answered == s.practices.len() {
            ensure!(
                (cell.estimate - truth).abs() <= 6.0 * sd + 5.0 * answered as f64,
                "quintile {q}: {} vs truth {truth} (sd {sd})",
                cell.estimate
            );
        }
        if secure {
            ensure!(
                cell.contributors as usize == answered,
                "quintile {q}: {} contributors",
                cell.contributors
            );
        }
    }
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The coordinator's traffic figures for query `id`: the largest and the median payload
/// per node, both directions.
fn session_log(log: &Path, id: &str) -> (Option<u64>, Option<u64>) {
    let traffic = log_events(
        log,
        "secure session traffic (protobuf payload, both directions)",
    )
    .into_iter()
    .find(|f| f.get("query_id").and_then(|v| v.as_str()) == Some(id));
    let field = |k: &str| {
        traffic
            .as_ref()
            .and_then(|f| f.get(k))
            .and_then(serde_json::Value::as_u64)
    };
    (field("max_bytes_per_node"), field("median_bytes_per_node"))
}

async fn sessions(args: &Args, n: usize, dropout_run: bool) -> Result<()> {
    let s = prepare(args, n)?;
    let logs = s.dir.join("logs");
    let launch = Launch {
        root: s.dir.clone(),
        programs: s.programs.clone(),
        nodes: s.practices.clone(),
        with_coordinator: true,
        logs: logs.clone(),
        timeout: Duration::from_secs(300),
    };
    let t = Instant::now();
    let mut fed = tokio::task::spawn_blocking(move || Federation::launch(&launch)).await??;
    eprintln!(
        "{n} nodes and the coordinator listening after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let url = fed
        .coordinator
        .as_ref()
        .map(|c| c.url())
        .ok_or_else(|| anyhow!("no coordinator"))?;
    let coordinator_log = logs.join("coordinator.log");
    let outcome = async {
        let mut times: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
        let mut bytes = Vec::new();
        let load_before = load_average();
        for run in 0..=args.runs {
            for (mode, aggregation) in [("secure", Aggregation::SecureSum), ("plain", Aggregation::Plain)] {
                let id = format!("secure-bench-{n}-{mode}-{run}");
                let q = question(&s.dir, &id, args.epsilon, aggregation)?;
                let t = Instant::now();
                let (r, _) = submit(&url, &s.dir, q).await?;
                let wall = t.elapsed().as_secs_f64();
                check(&r, &s, n, mode == "secure").with_context(|| id.clone())?;
                if run > 0 {
                    times.entry(mode).or_default().push(wall);
                }
                if mode == "secure" {
                    let (max, med) = session_log(&coordinator_log, &id);
                    bytes.push((max, med));
                }
            }
        }
        let load_after = load_average();
        for (mode, v) in &mut times {
            v.sort_by(f64::total_cmp);
            println!(
                "N = {n}, {mode}: p50 {:.3} s, p95 {:.3} s over {} queries (load {load_before} → {load_after})",
                percentile(v, 0.5),
                percentile(v, 0.95),
                v.len()
            );
        }
        let max = bytes.iter().filter_map(|b| b.0).max();
        let med = median(bytes.iter().filter_map(|b| b.1).map(|b| b as f64).collect());
        println!(
            "N = {n}: payload per node, both directions: median {med:.0} B, max {} B (limit 64 KiB + 8 × {QUINTILES} = {} B)",
            max.map_or("?".into(), |m| m.to_string()),
            64 * 1024 + 8 * QUINTILES
        );
        let rounds = log_events(&coordinator_log, "secure round");
        let mut per_round: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        for f in rounds {
            if let (Some(r), Some(ms)) = (
                f.get("round").and_then(|v| v.as_str()),
                f.get("ms").and_then(serde_json::Value::as_f64),
            ) {
                per_round.entry(r.to_string()).or_default().push(ms);
            }
        }
        let text: Vec<String> = per_round
            .into_iter()
            .map(|(r, v)| format!("{r} {:.0}", median(v)))
            .collect();
        println!("N = {n}: coordinator round medians (ms): {}", text.join(", "));
        if dropout_run && args.dropout > 0.0 {
            dropout(args, &s, &mut fed, &url).await?;
        }
        Ok::<(), anyhow::Error>(())
    }
    .await;
    let (clean, killed) =
        tokio::task::spawn_blocking(move || fed.stop(Duration::from_secs(60))).await?;
    if killed > 0 {
        eprintln!("{killed} process(es) killed or failed, {clean} stopped cleanly");
    }
    outcome.with_context(|| format!("logs in {}", logs.display()))?;
    if !args.processes.keep {
        let _ = std::fs::remove_dir_all(&s.dir);
    }
    Ok(())
}

/// Kill `--dropout` of the practices as soon as each says its R1 shares left.
async fn dropout(args: &Args, s: &Setup, fed: &mut Federation, url: &str) -> Result<()> {
    let n = s.practices.len();
    let k = ((n as f64) * args.dropout).floor() as usize;
    let step = n / k.max(1);
    let victims: Vec<usize> = (0..k).map(|i| i * step).collect();
    let id = format!("secure-bench-{n}-dropout");
    let q = question(&s.dir, &id, args.epsilon, Aggregation::SecureSum)?;
    let logs: Vec<PathBuf> = victims
        .iter()
        .map(|&i| s.dir.join("logs").join(format!("{}.log", s.practices[i])))
        .collect();
    let t = Instant::now();
    let query = tokio::spawn({
        let (url, dir) = (url.to_string(), s.dir.clone());
        async move { submit(&url, &dir, q).await }
    });
    let mut alive: Vec<usize> = (0..victims.len()).collect();
    while !alive.is_empty() && !query.is_finished() {
        alive.retain(|&j| {
            let sent = log_events(&logs[j], "secure round sent").iter().any(|f| {
                f.get("query_id").and_then(|v| v.as_str()) == Some(id.as_str())
                    && f.get("round").and_then(|v| v.as_str()) == Some("R1 (shares)")
            });
            if sent {
                fed.nodes[victims[j]].proc.kill9();
            }
            !sent
        });
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let (r, progress) = query.await??;
    let wall = t.elapsed().as_secs_f64();
    let answered = r.coverage.as_ref().map_or(0, |c| c.answered.len());
    let dropped: Vec<String> = progress
        .iter()
        .filter(|p| p.outcome != proto::NodeOutcome::Answered as i32)
        .map(|p| {
            format!(
                "{}: {}",
                p.node.as_ref().map_or("?", |n| n.node_id.as_str()),
                p.message
            )
        })
        .collect();
    println!(
        "N = {n}, {k} killed after R1 ({} still alive when the query ended): released in {wall:.3} s with {answered} practices; dropped: {}",
        alive.len(),
        dropped.len()
    );
    for d in dropped.iter().take(3) {
        println!("  {d}");
    }
    if r.rows.is_empty() {
        bail!("no total released after the dropouts");
    }
    check(&r, s, answered, true)?;
    // A victim killed a moment after its R1 line may already have sent its masked
    // input; it is then rightly in the total. Coverage must account for everyone.
    ensure!(
        answered + dropped.len() == n && dropped.len() <= k && answered + k >= n,
        "{answered} answered and {} dropped with {k} killed of {n}",
        dropped.len()
    );
    Ok(())
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    if args.accuracy_runs > 0 {
        // δ of a Gaussian release in the synthetic policies' range.
        let (epsilon, delta) = (1.0, 1e-6);
        println!(
            "Accuracy: ε = {epsilon}, δ = {delta}, one COUNT (Δ = 1), t_noise = ⌈0.9 N⌉; RMSE of the total (original units)\n"
        );
        println!(
            "| N | survivors | runs | σ_c | secure | central | secure / central | plain Gaussian | plain Laplace | g | σ_share (lattice) |"
        );
        println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for n in [10u32, 100] {
            accuracy(n, n, args.accuracy_runs, epsilon, delta)?;
            accuracy(
                n,
                (0.9 * f64::from(n)).ceil() as u32,
                args.accuracy_runs,
                epsilon,
                delta,
            )?;
        }
        println!();
    }
    if args.accuracy_only {
        return Ok(());
    }
    for (i, &n) in args.nodes.iter().enumerate() {
        sessions(&args, n, i == 0).await?;
    }
    Ok(())
}
