//! The empirical privacy audit (BENCHMARKS.md, "Empirical privacy audit"): every release
//! path (`phm_node::engine::privacy_audit::paths`, plus the coordinator's combine of two
//! nodes' answers here) run on two worst-case neighbouring inputs, `--trials` times each
//! after a pilot a fifth that size, and ε lower-bounded with Clopper–Pearson at 95%
//! confidence (`phm_devkit::privacy_audit`). Exits non-zero if any bound exceeds its
//! claim.
//!
//! Run: `cargo bench -p phm-node --profile bench-fast --features bench --bench
//! privacy_audit` (options: `--trials N` (1,000,000), `--only SUBSTRING`).

use std::time::Instant;

use anyhow::{Result, anyhow};
use phm_coordinator::combine::{Expected, combine, validate};
use phm_coordinator::model::NodeRef;
use phm_devkit::privacy_audit::{Claim, Finding, audit};
use phm_node::engine::privacy_audit::{AuditPath, count_release, paths};
use phm_proto::AggregateKind;
use phm_proto::result::{Answer, Scope};

mod common;

fn node_answer(
    expected: &Expected,
    id: &str,
    count: i64,
) -> Result<phm_coordinator::combine::NodeAnswer, String> {
    let release = count_release(count)?;
    let a = Answer {
        query_id: "q".into(),
        node_id: id.into(),
        dataset: "gp_patients".into(),
        release,
        epsilon_remaining: 0.0,
        policy_version: "audit".into(),
        scope: Scope::Standalone,
        population_noisy: 0.0,
        released_at_unix_ms: 0,
        cached: false,
        total_kind: None,
    };
    let node = NodeRef {
        id: id.into(),
        ods_code: id.into(),
        ..NodeRef::default()
    };
    validate(expected, node, a).map_err(|e| e.to_string())
}

/// The coordinator's combine: node A's COUNT (90, then 91) and node B's (50), both
/// through `release_private`, validated and combined as the coordinator does; the
/// output is the combined estimate.
fn combine_path() -> AuditPath {
    let expected = Expected {
        query_id: "q".into(),
        dataset: "gp_patients".into(),
        group_columns: vec!["g".into()],
        aliases: vec!["count".into()],
        kinds: vec![AggregateKind::Count],
    };
    let run = move |count: i64| {
        let expected = expected.clone();
        Box::new(move || {
            let c = combine(
                &expected,
                &[
                    node_answer(&expected, "A", count)?,
                    node_answer(&expected, "B", 50)?,
                ],
            );
            c.rows
                .first()
                .and_then(|r| r.cells.first())
                .map(|c| c.estimate)
                .ok_or_else(|| "combine: no cell".to_string())
        }) as Box<dyn FnMut() -> Result<f64, String>>
    };
    AuditPath {
        name: "coordinator combine (two nodes)",
        claim: Claim {
            epsilon: 1.0,
            delta: 0.0,
        },
        fixed_event: None,
        d: run(90),
        d2: run(91),
    }
}

fn main() -> Result<()> {
    let trials = common::arg("--trials", 1_000_000)?;
    let args: Vec<String> = std::env::args().collect();
    let only = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1).cloned());
    let mut all = paths().map_err(|e| anyhow!(e))?;
    all.push(combine_path());
    println!(
        "| release path | claimed ε (δ) | ε lower bound (95%) | bound / claim | event | P[S] on D, D' | seconds |"
    );
    println!("|---|---|---|---|---|---|---|");
    let mut failed: Vec<Finding> = Vec::new();
    for p in all {
        if only.as_ref().is_some_and(|o| !p.name.contains(o.as_str())) {
            continue;
        }
        let t = Instant::now();
        let f = audit(p.name, p.claim, trials, 0.95, p.fixed_event, p.d, p.d2)
            .map_err(|e| anyhow!(e))?;
        println!(
            "| {} | {} ({:e}) | **{:.3}** | {:.2} | {} | {:.4}, {:.4} | {:.0} |",
            f.name,
            f.claim.epsilon,
            f.claim.delta,
            f.epsilon_lower,
            f.epsilon_lower / f.claim.epsilon,
            f.event,
            f.p,
            f.q,
            t.elapsed().as_secs_f64()
        );
        if !f.passes() {
            failed.push(f);
        }
    }
    if !failed.is_empty() {
        return Err(anyhow!("bounds above their claims: {failed:?}"));
    }
    println!(
        "\n{trials} runs per dataset (after a pilot of {}); every bound is at most its claim.",
        trials / 5
    );
    Ok(())
}
