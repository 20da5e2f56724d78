//! Loading a FHIR Bulk Data export (BENCHMARKS.md, "FHIR sources"): the node's load of
//! `--observations` systolic blood pressure Observations (default 1M, about 0.5 KB of
//! NDJSON each, one in ten a diastolic reading the view drops for its coding) through a
//! ViewDefinition (`Engine::load`: read, flatten, check, register, measure rows per
//! person), beside DataFusion's own NDJSON reader flattening the same files with SQL
//! (schema inferred, `unnest` of the codings, the same filter; it neither checks types,
//! parses references nor converts dates, so it is a floor, not an equal). Each side runs
//! in a fresh child process per round, so its peak RSS (`VmHWM`) is its own; rounds
//! alternate so a busy machine slows both alike.
//!
//! Run: `cargo bench -p phm-node --profile bench-fast --bench fhir` (options:
//! `--observations N`, `--files N` (the export's files, default 4), `--rounds N`).

mod common;

use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result, anyhow, ensure};
use common::{arg, median};
use datafusion::prelude::{JsonReadOptions, SessionContext};
use phm_devkit::fixture::bench_policy;
use phm_node::engine::Engine;
use phm_policies::model::{Column, FhirExport, Source};

const VIEW: &str = r#"{
  "resourceType": "ViewDefinition", "name": "sbp", "resource": "Observation",
  "where": [{"path": "code.coding.where(system = 'http://snomed.info/sct' and code = '271649006').exists()"}],
  "select": [{"column": [
    {"name": "observation_id", "path": "getResourceKey()"},
    {"name": "person_id", "path": "subject.getReferenceKey(Patient)"},
    {"name": "obs_date", "path": "effectiveDateTime", "type": "dateTime"},
    {"name": "sbp", "path": "valueQuantity.value", "type": "decimal"}
  ]}]
}"#;

const PEER_SQL: &str = "SELECT id AS observation_id, subject['reference'] AS person_id, \
    \"effectiveDateTime\" AS obs_date, \"valueQuantity\"['value'] AS sbp \
    FROM (SELECT id, subject, \"effectiveDateTime\", \"valueQuantity\", unnest(code['coding']) AS c FROM obs) AS t \
    WHERE t.c['system'] = 'http://snomed.info/sct' AND t.c['code'] = '271649006'";

/// Writes the export: `n` Observations over `n / 10` patients in `files` files.
fn generate(dir: &Path, n: usize, files: usize) -> Result<u64> {
    std::fs::create_dir_all(dir)?;
    let mut bytes = 0u64;
    let per_file = n.div_ceil(files);
    for f in 0..files {
        let path = dir.join(format!("Observation.{f:03}.ndjson"));
        let mut w = BufWriter::new(std::fs::File::create(&path)?);
        for i in f * per_file..((f + 1) * per_file).min(n) {
            // A fixed pseudo-random walk: no RNG state to share between files.
            let h = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 33;
            let (code, display, value) = if i % 10 == 9 {
                ("271650006", "Diastolic blood pressure", 60 + h % 40)
            } else {
                ("271649006", "Systolic blood pressure", 95 + h % 90)
            };
            let line = format!(
                concat!(
                    r#"{{"resourceType":"Observation","id":"obs-{i:08}","meta":{{"lastUpdated":"2026-03-01T10:00:00Z"}},"#,
                    r#""status":"final","category":[{{"coding":[{{"system":"http://terminology.hl7.org/CodeSystem/observation-category","code":"vital-signs"}}]}}],"#,
                    r#""code":{{"coding":[{{"system":"http://snomed.info/sct","code":"{code}","display":"{display}"}}]}},"#,
                    r#""subject":{{"reference":"Patient/pt-{p:07}"}},"effectiveDateTime":"2025-{m:02}-{d:02}T09:{min:02}:00Z","#,
                    r#""valueQuantity":{{"value":{value},"unit":"mmHg","system":"http://unitsofmeasure.org","code":"mm[Hg]"}}}}"#,
                    "\n"
                ),
                i = i,
                code = code,
                display = display,
                p = i / 10,
                m = 1 + h % 12,
                d = 1 + h % 28,
                min = h % 60,
                value = value,
            );
            bytes += line.len() as u64;
            w.write_all(line.as_bytes())?;
        }
        w.flush()?;
    }
    Ok(bytes)
}

/// Peak resident memory of this process, in MiB.
fn peak_rss_mib() -> Result<f64> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| anyhow!("no VmHWM in /proc/self/status"))?;
    Ok(kib / 1024.0)
}

fn node_load(dir: &Path) -> Result<u64> {
    let mut policy = bench_policy("unused").map_err(|e| anyhow!(e))?;
    policy.opt_out = None;
    let ds = &mut policy.datasets[0];
    ds.name = "sbp".into();
    ds.link_key = None;
    ds.max_rows_per_person = 20;
    ds.columns = [
        "name = \"person_id\"\ntype = \"text\"\nidentifier = true",
        "name = \"observation_id\"\ntype = \"text\"\nidentifier = true",
        "name = \"obs_date\"\ntype = \"date\"\nfilter = true",
        "name = \"sbp\"\ntype = \"real\"\nfilter = true\naggregate = true\nbounds = [50.0, 250.0]",
    ]
    .iter()
    .map(|t| toml::from_str::<Column>(t))
    .collect::<Result<_, _>>()?;
    std::fs::write(dir.join("sbp.view.json"), VIEW)?;
    ds.source = Source::FhirNdjson(FhirExport {
        manifest: None,
        files: vec!["export".into()],
        views: vec!["sbp.view.json".into()],
        query: None,
    });
    let rt = tokio::runtime::Runtime::new()?;
    let engine = rt
        .block_on(Engine::load(&policy, dir))
        .map_err(|e| anyhow!("{e}"))?;
    let report = engine
        .load_report("sbp")
        .ok_or_else(|| anyhow!("no load report"))?;
    Ok(report.dataset_rows)
}

fn peer_load(dir: &Path) -> Result<u64> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let ctx = SessionContext::new();
        let path = dir.join("export");
        let path = path.to_str().ok_or_else(|| anyhow!("path not UTF-8"))?;
        ctx.register_json(
            "obs",
            path,
            JsonReadOptions::default().file_extension(".ndjson"),
        )
        .await?;
        let batches = ctx.sql(PEER_SQL).await?.collect().await?;
        Ok(batches.iter().map(|b| b.num_rows() as u64).sum())
    })
}

fn child(mode: &str, dir: &Path) -> Result<()> {
    let t = Instant::now();
    let rows = match mode {
        "node" => node_load(dir)?,
        _ => peer_load(dir)?,
    };
    println!(
        "{} {rows} {:.3} {:.1}",
        mode,
        t.elapsed().as_secs_f64(),
        peak_rss_mib()?
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--child") {
        let mode = args.get(i + 1).context("--child needs a mode")?;
        let dir = PathBuf::from(args.get(i + 2).context("--child needs a folder")?);
        return child(mode, &dir);
    }
    let n = arg("--observations", 1_000_000)?;
    let files = arg("--files", 4)?;
    let rounds = arg("--rounds", 5)?;
    let tmp = tempfile::tempdir()?;
    let t = Instant::now();
    let bytes = generate(&tmp.path().join("export"), n, files)?;
    println!(
        "export: {n} Observations in {files} files, {:.0} MB, written in {:.1} s",
        bytes as f64 / 1e6,
        t.elapsed().as_secs_f64()
    );
    let exe = std::env::current_exe()?;
    let (mut node, mut peer) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        for mode in ["node", "peer"] {
            let out = Command::new(&exe)
                .args(["--child", mode])
                .arg(tmp.path())
                .output()?;
            ensure!(
                out.status.success(),
                "{mode} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let f: Vec<&str> = line.split_whitespace().collect();
            ensure!(f.len() == 4, "unexpected child output {line:?}");
            let (rows, secs, rss): (u64, f64, f64) = (f[1].parse()?, f[2].parse()?, f[3].parse()?);
            println!("round {round} {mode}: {rows} rows, {secs:.2} s, peak RSS {rss:.0} MiB");
            match mode {
                "node" => node.push((secs, rss, rows)),
                _ => peer.push((secs, rss, rows)),
            }
        }
    }
    ensure!(
        node[0].2 == peer[0].2,
        "the node kept {} rows, DataFusion {}",
        node[0].2,
        peer[0].2
    );
    let (ns, nr) = (
        median(node.iter().map(|x| x.0).collect()),
        median(node.iter().map(|x| x.1).collect()),
    );
    let (ps, pr) = (
        median(peer.iter().map(|x| x.0).collect()),
        median(peer.iter().map(|x| x.1).collect()),
    );
    println!(
        "median over {rounds} rounds: node load {ns:.2} s, peak RSS {nr:.0} MiB; DataFusion NDJSON + SQL {ps:.2} s, {pr:.0} MiB; time ratio node/DataFusion {:.2}",
        ns / ps
    );
    Ok(())
}
