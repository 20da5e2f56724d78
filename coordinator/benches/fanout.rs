//! Fan-out benchmark: end-to-end Submit latency (request sent → combined result
//! received) with 1, 10, 50 and 100 in-process mock nodes on loopback, all over mutual
//! TLS, reporting p50 and p95 per size and the 100-node / 1-node ratio.
//!
//! Run: `CARGO_TARGET_DIR=/work/target cargo bench -p phm-coordinator --bench fanout`
//! (add `--profile bench-fast` for optimised dependencies). Optional arguments:
//! `--iterations N` (default 100).
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "../tests/coordinator/common.rs"]
mod common;

use common::*;
use std::time::{Duration, Instant};

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn measure(nodes: usize, iterations: usize) -> (Duration, Duration, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let mut running = Vec::with_capacity(nodes);
    for i in 0..nodes {
        let id = format!("N{i:03}");
        running.push(start_node(&pki, &id, fixed_count(&id, 101.0 + i as f64, 4.0)).await);
    }
    let regs: Vec<Reg> = running
        .iter()
        .enumerate()
        .map(|(i, n)| Reg::new(&format!("N{i:03}"), n.addr))
        .collect();
    let config = coordinator_config(&pki, &regs, 10_000, "");
    let mut coord = start_coordinator(&pki, config).await;
    let key = requester_key();

    // The first query opens the TLS connections to every node.
    let started = Instant::now();
    let (_, r) = submit(&mut coord.client, signed_query(&key, "cold", false, false))
        .await
        .unwrap();
    let cold = started.elapsed();
    assert_eq!(
        r.coverage.unwrap().answered.len(),
        nodes,
        "every node must answer"
    );
    for w in 0..5 {
        submit(
            &mut coord.client,
            signed_query(&key, &format!("warm-{w}"), false, false),
        )
        .await
        .unwrap();
    }
    let mut samples = Vec::with_capacity(iterations);
    for i in 0..iterations {
        let q = signed_query(&key, &format!("q-{i}"), false, false);
        let started = Instant::now();
        let (progress, r) = submit(&mut coord.client, q).await.unwrap();
        samples.push(started.elapsed());
        assert_eq!(progress.len(), nodes);
        assert_eq!(r.rows.len(), 1);
    }
    samples.sort();
    coord.stop().await;
    drop(running);
    (percentile(&samples, 0.5), percentile(&samples, 0.95), cold)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let iterations = args
        .iter()
        .position(|a| a == "--iterations")
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(100usize);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        println!("| nodes | p50 (ms) | p95 (ms) | first query, cold connections (ms) |");
        println!("|---:|---:|---:|---:|");
        let mut p50s = Vec::new();
        for nodes in [1usize, 10, 50, 100] {
            let (p50, p95, cold) = measure(nodes, iterations).await;
            println!(
                "| {nodes} | {:.2} | {:.2} | {:.1} |",
                ms(p50),
                ms(p95),
                ms(cold)
            );
            p50s.push(p50);
        }
        println!(
            "\np50 ratio 100 nodes / 1 node: {:.2} (node count ratio 100); {iterations} timed \
             submits per size after 5 warm-up submits",
            ms(p50s[3]) / ms(p50s[0])
        );
    });
}
