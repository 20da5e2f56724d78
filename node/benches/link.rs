//! Linkage throughput benchmark (BENCHMARKS.md, "Linkage"): one linked question between
//! a GP practice's node (the anchor, `gp_patients`) and an acute trust's node (the
//! partner, `acute_admissions`), through the coordinator, all three as the real
//! `phm-node` and `phm-coordinator` processes on loopback over mutual TLS.
//!
//! What it does:
//! 1. synthesises a small ICS with `phm_devkit::synth` (one practice), for its keys,
//!    certificates, registry, policies and configs;
//! 2. replaces the practice's `gp_patients` with `--anchor` rows and the first trust's
//!    `acute_admissions` with `--partner` rows: one row per person, every other column
//!    copied cyclically from the synthesised file (so every value lies in its declared
//!    domain), IMD quintile `1 + i mod 5`, nobody opted out, and distinct valid NHS
//!    numbers, `--overlap` of the partner's people being anchor people (the first
//!    anchor rows, so the shared people fall evenly in the five groups);
//! 3. starts only those two nodes and the coordinator (`phm_devkit::launch`), so the
//!    coordinator knows one partner and runs one session;
//! 4. asks `SELECT imd_quintile, COUNT(*) AS patients FROM gp_patients g WHERE EXISTS
//!    (SELECT 1 FROM acute_admissions a WHERE a.person = g.person) GROUP BY
//!    imd_quintile` at ε = 1, signed as the DSU;
//! 5. reports the query's wall time, each process's CPU seconds (utime + stime from
//!    `/proc/<pid>/stat`, before and after), each node's peak RSS (`VmHWM`), the bytes
//!    the coordinator relayed and each node's phases (both from their debug logs, which
//!    hold durations only), and checks every released count against the planted overlap
//!    (within μ, plus the policies' rounding to 5).
//!
//! Run with `cargo bench -p phm-node --profile bench-fast --bench link -- --partner
//! 100000` (see BENCHMARKS.md for the exact commands and `--help` for the options). The
//! node binary is the one cargo builds for this bench; the coordinator is built with the
//! same profile on first use.
//!
//! NHS numbers: the official test range (999 000 0000 – 999 999 9999) holds only
//! 909,090 valid numbers, fewer than a 1,000,000-person anchor needs, so this bench
//! numbers its people from nine-digit bodies 900 000 000 upwards, with valid check
//! digits: outside the ranges issued to patients (400–499 and 600–799 million in England
//! and Wales, below 400 million in Scotland and Northern Ireland). The files live in a
//! temporary folder and are removed afterwards.

mod common;

use anyhow::{Context, Result, anyhow, bail, ensure};
use clap::Parser;
use common::{clock_ticks, cpu_seconds, load_average, log_events, median, status_mib};
use datafusion::arrow::array::{
    Array, ArrayRef, BooleanArray, Int64Array, RecordBatch, RecordBatchReader, StringBuilder,
    UInt32Array,
};
use datafusion::arrow::compute::{concat_batches, take};
use datafusion::parquet::arrow::ArrowWriter;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::parquet::basic::Compression;
use datafusion::parquet::file::properties::WriterProperties;
use phm_devkit::launch::{Federation, Launch, Programs, edit_toml};
use phm_devkit::synth::{self, SynthOptions, ics::OrgKind};
use phm_proto::proto;
use phm_proto::query::Linkage;
use phm_proto::{Aggregate, AggregateKind, GroupKey, Purpose, QueryBody};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Groups of the question (IMD quintiles 1–5).
const GROUPS: usize = 5;
/// The question's ε (the policies' per-query cap).
const EPSILON: f64 = 1.0;
/// Rows written per Parquet batch.
const BATCH: usize = 1 << 16;
/// Session deadline written into both nodes' and the coordinator's configs: far above
/// any run, so a slow run is measured rather than abandoned.
const LINK_DEADLINE_MS: i64 = 1_800_000;
/// What the processes log: their info lines plus the linkage timings (durations only).
const RUST_LOG: &str = "info,phm_node::service::link=debug,phm_coordinator::coordinator=debug";

#[derive(Debug, Parser)]
#[command(about = "Linkage throughput: one linked question between two real nodes")]
struct Args {
    /// People (rows) in the anchor's gp_patients.
    #[arg(long, default_value_t = 1_000_000)]
    anchor: usize,
    /// People (rows) in the partner's acute_admissions.
    #[arg(long, default_value_t = 100_000)]
    partner: usize,
    /// Share of the partner's people who are also anchor people.
    #[arg(long, default_value_t = 0.3)]
    overlap: f64,
    /// Sessions to time (each with freshly started processes); medians are reported.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    #[command(flatten)]
    processes: common::Processes,
}

// ---------------------------------------------------------------------------------------
// Data

/// The people of one run: every person's NHS number (ten ASCII digits), the anchor's
/// first, then the partner's own.
struct People {
    numbers: Vec<[u8; 10]>,
    anchor: usize,
    partner: usize,
    overlap: usize,
}

impl People {
    fn new(anchor: usize, partner: usize, overlap_share: f64) -> Result<People> {
        ensure!(
            (0.0..=1.0).contains(&overlap_share),
            "--overlap must lie in [0, 1]"
        );
        let overlap = ((partner as f64) * overlap_share).round() as usize;
        ensure!(
            overlap <= anchor,
            "an overlap of {overlap} people needs at least as many anchor people"
        );
        let needed = anchor + (partner - overlap);
        let numbers: Vec<[u8; 10]> = (900_000_000u32..1_000_000_000)
            .filter_map(phm_link::with_check_digit)
            .map(|n| *n.digits())
            .take(needed)
            .collect();
        ensure!(
            numbers.len() == needed,
            "not enough nine-digit bodies from 900 000 000 for {needed} people"
        );
        Ok(People {
            numbers,
            anchor,
            partner,
            overlap,
        })
    }

    /// The anchor person behind the partner's `k`-th overlapping person: the first
    /// `overlap` anchor people, so the shared people fall evenly in the groups.
    fn shared(&self, k: usize) -> usize {
        k
    }

    /// The partner's `k`-th person's number: an anchor person's for `k < overlap`.
    fn partner_number(&self, k: usize) -> &[u8; 10] {
        if k < self.overlap {
            &self.numbers[self.shared(k)]
        } else {
            &self.numbers[self.anchor + (k - self.overlap)]
        }
    }

    /// Group (0-based IMD quintile) of anchor person `i`.
    fn group(i: usize) -> usize {
        i % GROUPS
    }

    /// The exact answer: linked people per group.
    fn exact(&self) -> [u64; GROUPS] {
        let mut c = [0u64; GROUPS];
        for k in 0..self.overlap {
            c[Self::group(self.shared(k))] += 1;
        }
        c
    }
}

fn read_parquet(path: &Path) -> Result<RecordBatch> {
    let file = std::fs::File::open(path).with_context(|| format!("open {}", path.display()))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("read {}", path.display()))?
        .build()?;
    let schema = reader.schema();
    let batches: Vec<RecordBatch> = reader.collect::<Result<_, _>>()?;
    ensure!(
        batches.iter().any(|b| b.num_rows() > 0),
        "{} has no rows",
        path.display()
    );
    Ok(concat_batches(&schema, &batches)?)
}

/// Rewrite `path` with `rows` rows: column `c` of row `i` is `replace(c, i..)` for the
/// columns it returns, else row `i mod n` of the file's own `n` rows.
fn write_rows(
    path: &Path,
    rows: usize,
    replace: impl Fn(&str, std::ops::Range<usize>) -> Option<ArrayRef>,
) -> Result<()> {
    let template = read_parquet(path)?;
    let n = template.num_rows();
    let schema = template.schema();
    let tmp = path.with_extension("parquet.tmp");
    let file = std::fs::File::create(&tmp).with_context(|| format!("create {}", tmp.display()))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::UNCOMPRESSED)
        .build();
    let mut writer = ArrowWriter::try_new(file, schema.clone(), Some(props))?;
    let mut start = 0;
    while start < rows {
        let end = (start + BATCH).min(rows);
        let idx = UInt32Array::from_iter_values((start..end).map(|i| (i % n) as u32));
        let mut cols = Vec::with_capacity(schema.fields().len());
        for (field, col) in schema.fields().iter().zip(template.columns()) {
            let c = match replace(field.name(), start..end) {
                Some(c) => {
                    ensure!(
                        c.data_type() == field.data_type(),
                        "column {} is {} in {}, the bench writes {}",
                        field.name(),
                        field.data_type(),
                        path.display(),
                        c.data_type()
                    );
                    c
                }
                None => take(col.as_ref(), &idx, None)?,
            };
            cols.push(c);
        }
        writer.write(&RecordBatch::try_new(schema.clone(), cols)?)?;
        start = end;
    }
    writer.close()?;
    std::fs::rename(&tmp, path).with_context(|| format!("replace {}", path.display()))?;
    Ok(())
}

fn texts(values: impl Iterator<Item = String>) -> ArrayRef {
    let mut b = StringBuilder::new();
    for v in values {
        b.append_value(v);
    }
    Arc::new(b.finish())
}

fn numbers<'a>(values: impl Iterator<Item = &'a [u8; 10]>) -> ArrayRef {
    let mut b = StringBuilder::new();
    for v in values {
        // Ten ASCII digits.
        b.append_value(std::str::from_utf8(v).unwrap_or_default());
    }
    Arc::new(b.finish())
}

fn write_anchor(path: &Path, people: &People) -> Result<()> {
    write_rows(path, people.anchor, |col, r| match col {
        "person_id" => Some(texts(r.map(|i| format!("A{i:09}")))),
        "nhs_number" => Some(numbers(r.map(|i| &people.numbers[i]))),
        "imd_quintile" => Some(Arc::new(Int64Array::from_iter_values(
            r.map(|i| People::group(i) as i64 + 1),
        ))),
        "ndopt_out" => Some(Arc::new(BooleanArray::from(vec![false; r.len()]))),
        _ => None,
    })
}

fn write_partner(path: &Path, trust: &str, people: &People) -> Result<()> {
    write_rows(path, people.partner, |col, r| match col {
        "person_id" => Some(texts(r.map(|k| format!("B{k:09}")))),
        "admission_id" => Some(texts(r.map(|k| format!("{trust}-{k:08}")))),
        "nhs_number" => Some(numbers(r.map(|k| people.partner_number(k)))),
        "ndopt_out" => Some(Arc::new(BooleanArray::from(vec![false; r.len()]))),
        _ => None,
    })
}

// ---------------------------------------------------------------------------------------
// Measurement

/// Clock ticks per second of `/proc/<pid>/stat`.
/// One timed session.
#[derive(Debug, Default)]
struct Run {
    wall_s: f64,
    /// Anchor, partner, coordinator.
    cpu_s: [f64; 3],
    /// Anchor, partner: VmHWM at the end, and VmRSS once loaded (before the query).
    peak_mib: [f64; 2],
    loaded_mib: [f64; 2],
    startup_s: f64,
    bytes: Option<u64>,
    session_ms: Option<f64>,
    phases: BTreeMap<String, f64>,
    released: [f64; GROUPS],
    load_before: String,
    load_after: String,
}

// ---------------------------------------------------------------------------------------
// The question

fn question(dir: &Path, run: usize) -> Result<proto::AggregateQuery> {
    let pem = std::fs::read_to_string(dir.join("keys/dsu.key"))?;
    let key = phm_proto::signing::private_key_from_pem(&pem).map_err(|e| anyhow!("{e}"))?;
    let nonce = phm_proto::query::fresh_nonce();
    let body = QueryBody {
        federation_id: synth::FEDERATION_ID.into(),
        query_id: format!(
            "link-bench-{run}-{}",
            nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
        requester_id: "dsu".into(),
        purpose: Purpose::Planning,
        project_id: None,
        dataset: "gp_patients".into(),
        filter: None,
        group_by: vec![GroupKey::Column("imd_quintile".into())],
        aggregates: vec![Aggregate {
            alias: "patients".into(),
            kind: AggregateKind::Count,
            column: None,
        }],
        epsilon: EPSILON,
        issued_at_unix_ms: phm_proto::query::now_unix_ms(),
        nonce,
        linkage: Some(Linkage {
            partner_dataset: "acute_admissions".into(),
            partner_filter: None,
            negated: false,
            min_partner_rows: 1,
        }),
        aggregation: Default::default(),
    };
    Ok(proto::AggregateQuery::from(body.sign(&key)))
}

async fn submit(url: &str, dir: &Path, run: usize) -> Result<proto::CombinedResult> {
    let (result, progress) = common::submit(url, dir, question(dir, run)?).await?;
    if result
        .coverage
        .as_ref()
        .is_none_or(|c| c.answered.len() != 1)
    {
        bail!("the session did not answer: {progress:?}");
    }
    Ok(result)
}

/// μ of the session: the dummy-match shift at ε = 1 for 5 groups, with the policies'
/// δ (the same calibration the nodes run).
fn mu(dir: &Path, anchor: &str, partner: &str, max_set: usize) -> Result<i64> {
    let delta = |ods: &str| -> Result<f64> {
        let text = std::fs::read_to_string(dir.join(ods).join("policy.toml"))?;
        let t: toml::Table = text.parse()?;
        t.get("release")
            .and_then(|r| r.get("delta"))
            .and_then(toml::Value::as_float)
            .ok_or_else(|| anyhow!("{ods}'s policy has no release.delta"))
    };
    let d = delta(anchor)?.min(delta(partner)?);
    let p = phm_link::LinkParams::for_query(GROUPS, EPSILON, d / 2.0, d / 2.0, false, max_set)
        .map_err(|e| anyhow!("{e}"))?;
    Ok(i64::from(p.link.mu()))
}

// ---------------------------------------------------------------------------------------

struct Setup {
    dir: PathBuf,
    anchor: String,
    partner: String,
    programs: Programs,
}

fn prepare(args: &Args, people: &People) -> Result<Setup> {
    let dir = args.processes.dir("phm-link-bench");
    let summary = synth::run(&SynthOptions {
        out: dir.clone(),
        population: 5_000,
        seed: 20_261_202,
        nodes_limit: Some(1),
        practices: None,
        base_port: None,
        progress: false,
        force: true,
    })
    .map_err(|e| anyhow!("synth: {e}"))?;
    let org = |kind: OrgKind| {
        summary
            .manifest
            .organisations
            .iter()
            .find(|o| o.kind == kind)
            .map(|o| o.ods_code.clone())
            .ok_or_else(|| anyhow!("the synthetic ICS has no {}", kind.as_str()))
    };
    let (anchor, partner) = (org(OrgKind::GpPractice)?, org(OrgKind::AcuteTrust)?);
    let t = Instant::now();
    write_anchor(&dir.join(&anchor).join("data/gp_patients.parquet"), people)?;
    write_partner(
        &dir.join(&partner).join("data/acute_admissions.parquet"),
        &partner,
        people,
    )?;
    eprintln!("data written in {:.1} s", t.elapsed().as_secs_f64());
    for ods in [&anchor, &partner] {
        edit_toml(&dir.join(ods).join("node.toml"), |t| {
            t.insert("log_format".into(), "json".into());
            let limits = t
                .entry("limits")
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if let Some(l) = limits.as_table_mut() {
                l.insert("link_deadline_ms".into(), LINK_DEADLINE_MS.into());
            }
        })?;
    }
    edit_toml(&dir.join(&anchor).join("policy.toml"), |t| {
        if let Some(o) = t.get_mut("organisation").and_then(|o| o.as_table_mut()) {
            o.insert(
                "registered_population".into(),
                i64::try_from(people.anchor).unwrap_or(i64::MAX).into(),
            );
        }
    })?;
    edit_toml(&dir.join("coordinator/coordinator.toml"), |t| {
        t.insert("log_format".into(), "json".into());
        t.insert("link_deadline_ms".into(), LINK_DEADLINE_MS.into());
    })?;
    Ok(Setup {
        dir,
        anchor,
        partner,
        programs: args.processes.programs(RUST_LOG)?,
    })
}

async fn one_run(s: &Setup, run: usize) -> Result<Run> {
    let logs = s.dir.join(format!("logs/run{run}"));
    let launch = Launch {
        root: s.dir.clone(),
        programs: s.programs.clone(),
        nodes: vec![s.anchor.clone(), s.partner.clone()],
        with_coordinator: true,
        logs: logs.clone(),
        timeout: Duration::from_secs(600),
    };
    let t = Instant::now();
    let mut fed = tokio::task::spawn_blocking(move || Federation::launch(&launch)).await??;
    let startup_s = t.elapsed().as_secs_f64();
    let ticks = clock_ticks();
    let pids: Vec<u32> = fed.procs_mut().map(|p| p.pid()).collect();
    ensure!(pids.len() == 3, "expected two nodes and the coordinator");
    let url = fed
        .coordinator
        .as_ref()
        .map(|c| c.url())
        .ok_or_else(|| anyhow!("no coordinator"))?;
    let mut r = Run {
        startup_s,
        load_before: load_average(),
        ..Run::default()
    };
    for (slot, &pid) in r.loaded_mib.iter_mut().zip(&pids) {
        *slot = status_mib(pid, "VmRSS")?;
    }
    let before: Vec<f64> = pids
        .iter()
        .map(|&p| cpu_seconds(p, ticks))
        .collect::<Result<_>>()?;
    let t = Instant::now();
    let result = submit(&url, &s.dir, run).await;
    r.wall_s = t.elapsed().as_secs_f64();
    for (i, &p) in pids.iter().enumerate() {
        r.cpu_s[i] = cpu_seconds(p, ticks)? - before[i];
    }
    for (slot, &pid) in r.peak_mib.iter_mut().zip(&pids) {
        *slot = status_mib(pid, "VmHWM")?;
    }
    r.load_after = load_average();
    let (clean, killed) =
        tokio::task::spawn_blocking(move || fed.stop(Duration::from_secs(60))).await?;
    if killed > 0 {
        eprintln!("warning: {killed} process(es) had to be killed ({clean} stopped cleanly)");
    }
    let result =
        result.with_context(|| format!("the question failed; logs in {}", logs.display()))?;
    for row in &result.rows {
        let g: usize = row
            .key
            .first()
            .and_then(|k| k.parse().ok())
            .ok_or_else(|| anyhow!("unexpected row key {:?}", row.key))?;
        ensure!((1..=GROUPS).contains(&g), "unexpected IMD quintile {g}");
        let cell = row
            .cells
            .iter()
            .find(|c| c.alias == "patients")
            .ok_or_else(|| anyhow!("row {g} has no `patients`"))?;
        ensure!(
            !cell.suppressed,
            "IMD {g} was suppressed: {}",
            cell.suppression_reason
        );
        r.released[g - 1] = cell.estimate;
    }
    let coordinator_log = logs.join("coordinator.log");
    if let Some(f) = log_events(&coordinator_log, "linkage session finished").first() {
        r.bytes = f.get("bytes").and_then(serde_json::Value::as_u64);
        // A u128 field: logged as a string.
        r.session_ms = f.get("elapsed_ms").and_then(|v| {
            v.as_f64()
                .or_else(|| v.as_str().and_then(|s| s.parse().ok()))
        });
    }
    for ods in [&s.anchor, &s.partner] {
        for f in log_events(&logs.join(format!("{ods}.log")), "linkage phase") {
            if let (Some(p), Some(ms)) = (
                f.get("phase").and_then(|v| v.as_str()),
                f.get("ms").and_then(serde_json::Value::as_f64),
            ) {
                r.phases.insert(p.to_string(), ms);
            }
        }
    }
    Ok(r)
}

fn mib(bytes: f64) -> f64 {
    bytes / (1024.0 * 1024.0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<()> {
    let args = Args::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let t = Instant::now();
    let people = People::new(args.anchor, args.partner, args.overlap)?;
    let exact = people.exact();
    let setup = prepare(&args, &people)?;
    let overlap = people.overlap;
    drop(people);
    eprintln!(
        "prepared {} in {:.1} s: anchor {} ({} people), partner {} ({} people), {} shared",
        setup.dir.display(),
        t.elapsed().as_secs_f64(),
        setup.anchor,
        args.anchor,
        setup.partner,
        args.partner,
        overlap
    );
    let mu = mu(
        &setup.dir,
        &setup.anchor,
        &setup.partner,
        args.anchor.max(args.partner),
    )?;
    // One session; the policies round to 5, which moves a count by at most 2.
    let tolerance = mu as f64 + 2.0;
    let mut runs = Vec::new();
    for run in 0..args.runs.max(1) {
        let r = one_run(&setup, run).await?;
        let within = r
            .released
            .iter()
            .zip(&exact)
            .all(|(got, &want)| (got - want as f64).abs() <= tolerance);
        println!(
            "run {run}: wall {:.1} s | CPU anchor {:.1} s, partner {:.1} s, coordinator {:.1} s | peak RSS anchor {:.0} MiB, partner {:.0} MiB (loaded {:.0} / {:.0}) | relayed {} | start-up {:.1} s | load {} → {}",
            r.wall_s,
            r.cpu_s[0],
            r.cpu_s[1],
            r.cpu_s[2],
            r.peak_mib[0],
            r.peak_mib[1],
            r.loaded_mib[0],
            r.loaded_mib[1],
            r.bytes
                .map(|b| format!("{b} B ({:.1} MiB)", mib(b as f64)))
                .unwrap_or_else(|| "?".into()),
            r.startup_s,
            r.load_before,
            r.load_after
        );
        println!(
            "  released {:?}, exact {:?}, μ = {mu}: {}",
            r.released,
            exact,
            if within {
                "every count within μ + 2"
            } else {
                "OUTSIDE μ + 2"
            }
        );
        if let Some(ms) = r.session_ms {
            println!("  coordinator: session {:.1} s", ms / 1e3);
        }
        let phases: Vec<String> = r
            .phases
            .iter()
            .map(|(p, ms)| format!("{p} {:.2}", ms / 1e3))
            .collect();
        println!("  phases (s): {}", phases.join(", "));
        ensure!(
            within,
            "a released count is further than μ + 2 = {tolerance} from the planted overlap"
        );
        runs.push(r);
    }
    let m = |f: &dyn Fn(&Run) -> f64| median(runs.iter().map(f).collect());
    let documented = 32.0 * (2.0 * args.anchor as f64 + args.partner as f64);
    println!(
        "\n| anchor × partner | runs | wall (s) | CPU anchor (s) | CPU partner (s) | CPU coordinator (s) | CPU total (s) | peak RSS anchor (MiB) | peak RSS partner (MiB) | relayed (MiB) |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {} × {} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.0} | {:.0} | {} (32 B × (2·{} + {}) = {:.1}) |",
        args.anchor,
        args.partner,
        runs.len(),
        m(&|r| r.wall_s),
        m(&|r| r.cpu_s[0]),
        m(&|r| r.cpu_s[1]),
        m(&|r| r.cpu_s[2]),
        m(&|r| r.cpu_s.iter().sum()),
        m(&|r| r.peak_mib[0]),
        m(&|r| r.peak_mib[1]),
        runs.first()
            .and_then(|r| r.bytes)
            .map(|b| format!("{:.1}", mib(b as f64)))
            .unwrap_or_else(|| "?".into()),
        args.anchor,
        args.partner,
        mib(documented)
    );
    let names: Vec<String> = runs
        .first()
        .map(|r| r.phases.keys().cloned().collect())
        .unwrap_or_default();
    let phases: Vec<String> = names
        .iter()
        .map(|p| {
            format!(
                "{p} {:.2}",
                m(&|r| r.phases.get(p).copied().unwrap_or(f64::NAN)) / 1e3
            )
        })
        .collect();
    println!("\nmedian phases (s): {}", phases.join(", "));
    if !args.processes.keep {
        let _ = std::fs::remove_dir_all(&setup.dir);
    }
    Ok(())
}
