//! End-to-end checks of the coordinator's disclosure rules and intervals, through the
//! real server over mutual TLS with in-process mock nodes: rows a system-total-only
//! partner released alone, breakdowns that would let a protected figure be subtracted
//! out row by row (review findings F4 and F10), and the exact interval for a sum of
//! two Laplace noises (F14).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::*;
use phm_proto::proto;
use std::sync::Arc;

/// A node answering the grouped COUNT with fixed rows `(key, value, suppressed)`.
fn rows_node(id: &str, scope: proto::ReleaseScope, rows: Vec<(&str, f64, bool)>) -> Behaviour {
    let id = id.to_string();
    let rows: Vec<(String, f64, bool)> = rows
        .into_iter()
        .map(|(k, v, s)| (k.to_string(), v, s))
        .collect();
    Behaviour::Answer(Arc::new(move |q| {
        let rows = rows
            .iter()
            .map(|(k, v, suppressed)| {
                let mut c = cell("patients", *v, 1.0);
                if *suppressed {
                    c.suppressed = true;
                    c.estimate = 0.0;
                    c.suppression_reason = "fewer than 7".into();
                }
                proto::ResultRow {
                    key: vec![k.clone()],
                    cells: vec![c],
                }
            })
            .collect();
        let mut r = result_for(q, &id, rows);
        r.release_scope = scope as i32;
        r
    }))
}

fn row<'a>(rows: &'a [proto::CombinedRow], key: &str) -> &'a proto::CombinedRow {
    rows.iter()
        .find(|r| r.key == vec![key.to_string()])
        .unwrap_or_else(|| panic!("no row {key}: {rows:?}"))
}

fn reg(id: &str, addr: std::net::SocketAddr, place: &str) -> Reg {
    let mut r = Reg::new(id, addr);
    r.place = place.into();
    r
}

const STANDALONE: proto::ReleaseScope = proto::ReleaseScope::Standalone;
const SYSTEM: proto::ReleaseScope = proto::ReleaseScope::SystemTotalOnly;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_released_by_some_partners_never_expose_a_system_total_only_partner() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    // k is released by A and P only (thresholded away at B); "p" by P alone (say a bin
    // only P's policy declares).
    let a = start_node(
        &pki,
        "A",
        rows_node(
            "A",
            STANDALONE,
            vec![("x", 101.0, false), ("k", 31.0, false)],
        ),
    )
    .await;
    let b = start_node(
        &pki,
        "B",
        rows_node("B", STANDALONE, vec![("x", 201.0, false)]),
    )
    .await;
    let p = start_node(
        &pki,
        "P",
        rows_node(
            "P",
            SYSTEM,
            vec![("x", 301.0, false), ("k", 41.0, false), ("p", 17.0, false)],
        ),
    )
    .await;
    let regs = vec![
        reg("A", a.addr, "North"),
        reg("B", b.addr, "North"),
        reg("P", p.addr, "South"),
    ];
    let mut coord = start_coordinator(&pki, coordinator_config(&pki, &regs, 10_000, "")).await;
    let key = requester_key();
    let (_, r) = submit(&mut coord.client, signed_query(&key, "f4", true, false))
        .await
        .unwrap();

    // The system totals that mix partners are shown.
    assert_eq!(row(&r.rows, "x").cells[0].estimate, 603.0);
    assert_eq!(row(&r.rows, "k").cells[0].estimate, 72.0);
    assert_eq!(row(&r.rows, "k").cells[0].contributors, 2);
    // P's own row is not, and the reason says what to do.
    let lone = &row(&r.rows, "p").cells[0];
    assert!(lone.suppressed, "{lone:?}");
    assert_eq!(lone.estimate, 0.0);
    assert!(
        lone.suppression_reason
            .contains("only partners whose policy")
            && lone.suppression_reason.contains("Coarser groups"),
        "{}",
        lone.suppression_reason
    );

    // A's k would give P's k as 72 - 31; B's x (or North's) would give P's x.
    let labels: Vec<&str> = r.breakdowns.iter().map(|b| b.label.as_str()).collect();
    assert_eq!(labels, vec!["A"], "{:?}", r.breakdowns);
    let pa = &r.breakdowns[0];
    assert!(!row(&pa.rows, "x").cells[0].suppressed);
    assert_eq!(row(&pa.rows, "x").cells[0].estimate, 101.0);
    let ak = &row(&pa.rows, "k").cells[0];
    assert!(
        ak.suppressed && ak.suppression_reason.starts_with("Withheld"),
        "{ak:?}"
    );
    assert_eq!(ak.estimate, 0.0);
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partner_suppressed_cell_cannot_be_recovered_from_the_published_breakdowns() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    let a = start_node(
        &pki,
        "A",
        rows_node("A", STANDALONE, vec![("x", 3.0, true), ("y", 41.0, false)]),
    )
    .await;
    let b = start_node(
        &pki,
        "B",
        rows_node(
            "B",
            STANDALONE,
            vec![("x", 31.0, false), ("y", 42.0, false)],
        ),
    )
    .await;
    let c = start_node(
        &pki,
        "C",
        rows_node(
            "C",
            STANDALONE,
            vec![("x", 21.0, false), ("y", 43.0, false)],
        ),
    )
    .await;
    let regs = vec![
        Reg::new("A", a.addr),
        Reg::new("B", b.addr),
        Reg::new("C", c.addr),
    ];
    let mut coord = start_coordinator(&pki, coordinator_config(&pki, &regs, 10_000, "")).await;
    let key = requester_key();
    let (_, r) = submit(&mut coord.client, signed_query(&key, "f10", true, false))
        .await
        .unwrap();
    assert_eq!(row(&r.rows, "x").cells[0].estimate, 55.0);
    let part = |label: &str| {
        r.breakdowns
            .iter()
            .find(|b| b.label == label)
            .unwrap_or_else(|| panic!("no breakdown {label}"))
    };
    assert!(row(&part("A").rows, "x").cells[0].suppressed);
    assert!(!row(&part("B").rows, "x").cells[0].suppressed);
    // 55 - 31 - 21 would be A's suppressed figure.
    let cx = &row(&part("C").rows, "x").cells[0];
    assert!(
        cx.suppressed && cx.suppression_reason.starts_with("Withheld"),
        "{cx:?}"
    );
    for label in ["A", "B", "C"] {
        assert!(!row(&part(label).rows, "y").cells[0].suppressed, "{label}");
    }
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_laplace_noises_get_the_exact_interval_not_the_normal_one() {
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new(dir.path());
    // Discrete Laplace with b = 1 on a count, as a real node reports it.
    let q = (-1.0f64).exp();
    let variance = 2.0 * q / ((1.0 - q) * (1.0 - q));
    let laplace = |id: &'static str, v: f64| {
        Behaviour::Answer(Arc::new(move |query| {
            let mut c = cell("patients", v, variance);
            c.noise_scale = 1.0;
            c.mechanism = proto::NoiseMechanism::DiscreteLaplace as i32;
            (c.ci95_low, c.ci95_high) = (v - 3.0, v + 3.0);
            result_for(
                query,
                id,
                vec![proto::ResultRow {
                    key: vec![],
                    cells: vec![c],
                }],
            )
        }))
    };
    let a = start_node(&pki, "A", laplace("A", 101.0)).await;
    let b = start_node(&pki, "B", laplace("B", 202.0)).await;
    let regs = vec![Reg::new("A", a.addr), Reg::new("B", b.addr)];
    let mut coord = start_coordinator(&pki, coordinator_config(&pki, &regs, 10_000, "")).await;
    let key = requester_key();
    let (_, r) = submit(&mut coord.client, signed_query(&key, "f14", false, false))
        .await
        .unwrap();
    let cell = &r.rows[0].cells[0];
    assert_eq!(cell.estimate, 303.0);
    // The sum of two discrete Laplace(1) noises exceeds 4 in absolute value with
    // probability 3.1%, and 3 with 7.3%: the 95% interval is ±4. The normal
    // approximation (±3.76, i.e. ±3 on the integers) covers only 92.7%.
    assert_eq!((cell.ci95_low, cell.ci95_high), (299.0, 307.0));
    assert!((cell.standard_error - (2.0 * variance).sqrt()).abs() < 1e-12);
    coord.stop().await;
}
