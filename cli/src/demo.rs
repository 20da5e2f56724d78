//! `phm demo`: synthesise an ICS, start every partner's node and the coordinator as real
//! child processes over mutual TLS, ask the DSU's and a researcher's questions, print a
//! board-paper-style report with intervals and coverage, check it against the exact
//! reference answers, and shut everything down.

use anyhow::{Context, anyhow, bail};
use phm::client::{self, Connection};
use phm::questions::{self, Question};
use phm::render;
use phm::synth::{self, Manifest, SynthOptions, reference::ReferenceAnswers};
use phm_devkit::launch::{Federation, Launch, Program, Programs, RunningCoordinator};
use phm_proto::proto::{self, CombinedResult};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
#[command(
    after_help = "Examples:\n  cargo run -p phm -- demo\n  phm demo --nodes 4 --population 40000 --keep-running"
)]
pub struct DemoArgs {
    /// Include only the first N GP practices (the trusts, social care and the council
    /// always take part). Default: every practice.
    #[arg(long)]
    pub nodes: Option<usize>,
    /// Registered population of the synthetic ICS.
    #[arg(long, default_value_t = 100_000)]
    pub population: usize,
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Working folder (replaced if it holds an earlier demo). Default: <tmp>/phm-demo.
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Leave the federation running after the report, until Ctrl-C.
    #[arg(long)]
    pub keep_running: bool,
    /// Seconds to wait for every node and the coordinator to report healthy.
    #[arg(long, default_value_t = 180)]
    pub startup_timeout: u64,
    /// Serve every partner's data from PostgreSQL instead of Parquet: each partner gets
    /// a database with its datasets as views and a role that may only SELECT them.
    /// Uses the server PHM_TEST_PG_DSN names, or starts one (Debian's postgresql
    /// package) on a loopback port, stopped when the demo ends.
    #[arg(long)]
    pub postgres: bool,
    /// Serve each acute trust's admissions from a FHIR Bulk Data export instead of
    /// Parquet: the synthetic admissions are written as Patient, Encounter and
    /// Condition NDJSON with a manifest, and the trust's policy reads them through the
    /// sample views and query (policies/samples/fhir/).
    #[arg(long, conflicts_with = "postgres")]
    pub fhir: bool,
}

/// Certificates for health checks. Nodes trust only the infrastructure CA for clients,
/// so they are checked with the coordinator's client certificate (health is open to
/// any certificate from that CA); the coordinator trusts the people CA, so it is
/// checked with an analyst's.
struct Tls {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    node_cert: PathBuf,
    node_key: PathBuf,
}

async fn healthy(addr: &str, tls: &Tls, node: bool) -> bool {
    let (cert, key) = if node {
        (&tls.node_cert, &tls.node_key)
    } else {
        (&tls.cert, &tls.key)
    };
    let connection = Connection {
        url: format!("https://{addr}"),
        ca: Some(tls.ca.clone()),
        cert: Some(cert.clone()),
        cert_key: Some(key.clone()),
        connect_timeout: Some(Duration::from_secs(2)),
    };
    let Ok(channel) = client::connect(&connection).await else {
        return false;
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let check = health.check(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    match tokio::time::timeout(Duration::from_secs(3), check).await {
        Ok(Ok(r)) => {
            r.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        }
        _ => false,
    }
}

/// Wait until every process answers its health check (listening is not enough: a
/// node may still be loading its data); name the first that dies or never becomes
/// healthy, with the end of its log.
async fn wait_healthy(fed: &mut Federation, tls: &Tls, timeout: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let checks: Vec<(String, bool)> = fed
        .nodes
        .iter()
        .map(|n| (n.addr.clone(), true))
        .chain(fed.coordinator.iter().map(|c| (c.addr.clone(), false)))
        .collect();
    let mut ready = vec![false; checks.len()];
    let pb = indicatif::ProgressBar::new(checks.len() as u64);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} {pos}/{len} services healthy {wide_msg}")
    {
        pb.set_style(style);
    }
    while ready.iter().any(|r| !r) {
        for (i, p) in fed.procs_mut().enumerate() {
            if ready[i] {
                continue;
            }
            if !p.is_running() {
                pb.finish_and_clear();
                bail!(
                    "{} failed to start; end of {}:\n{}",
                    p.name,
                    p.log.display(),
                    p.log_tail(15)
                );
            }
            let (addr, node) = &checks[i];
            if healthy(addr, tls, *node).await {
                ready[i] = true;
                pb.inc(1);
                pb.set_message(p.name.clone());
            }
        }
        if started.elapsed() > timeout {
            pb.finish_and_clear();
            let slow: Vec<&mut phm_devkit::launch::Proc> = fed
                .procs_mut()
                .zip(&ready)
                .filter(|(_, r)| !**r)
                .map(|(p, _)| p)
                .collect();
            let first = slow.first().ok_or_else(|| anyhow!("timed out"))?;
            bail!(
                "{} did not become healthy within {}s ({} still starting); end of {}:\n{}",
                first.name,
                timeout.as_secs(),
                slow.len(),
                first.log.display(),
                first.log_tail(15)
            );
        }
        if ready.iter().any(|r| !r) {
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    pb.finish_and_clear();
    Ok(())
}

fn imd_label(k: &str) -> String {
    match k {
        "1" => "1 (most deprived)".into(),
        "5" => "5 (least deprived)".into(),
        other => other.to_string(),
    }
}

fn age_label(k: &str) -> String {
    match k.parse::<u32>() {
        Ok(100) => "100+".into(),
        Ok(lo) => format!("{lo}–{}", lo + 19),
        Err(_) => k.to_string(),
    }
}

fn find_cell<'a>(
    result: &'a CombinedResult,
    key: &[String],
    alias: &str,
) -> Option<&'a proto::CombinedCell> {
    result
        .rows
        .iter()
        .find(|r| r.key == key)
        .and_then(|r| r.cells.iter().find(|c| c.alias == alias))
}

/// `p = n / d` with a delta-method 95% interval (the two noises are independent).
fn ratio(n: &proto::CombinedCell, d: &proto::CombinedCell) -> Option<(f64, f64, f64)> {
    if n.suppressed || d.suppressed || d.estimate <= 0.0 {
        return None;
    }
    let p = n.estimate / d.estimate;
    let rel = ((n.standard_error / n.estimate.abs().max(1.0)).powi(2)
        + (d.standard_error / d.estimate).powi(2))
    .sqrt();
    let se = p.abs() * rel;
    // A prevalence lies in [0, 1]; trimming the interval there only improves coverage.
    Some((p, (p - 1.96 * se).max(0.0), (p + 1.96 * se).min(1.0)))
}

fn pct(v: (f64, f64, f64)) -> String {
    // A second decimal only when the interval would otherwise collapse to one figure.
    let d = if (v.2 - v.1) * 100.0 < 0.5 { 2 } else { 1 };
    format!(
        "{:.*}% ({:.*}–{:.*})",
        d,
        v.0 * 100.0,
        d,
        v.1 * 100.0,
        d,
        v.2 * 100.0
    )
}

fn footer(results: &[&CombinedResult], who: &str) {
    let Some(first) = results.first() else { return };
    for (i, line) in render::coverage_lines(first).iter().enumerate() {
        if i == 0 {
            phm::outln!("   Coverage: {line}");
        } else {
            phm::outln!("   {}", line.trim_start());
        }
    }
    if !first.total_note.is_empty() {
        phm::outln!("   Total: {}", first.total_note);
    }
    let spent: f64 = results.iter().map(|r| r.epsilon_spent_per_node).sum();
    phm::outln!(
        "   Privacy: ε {spent:.1} spent from the {who} budget at each answering partner ({} quer{}).",
        results.len(),
        if results.len() == 1 { "y" } else { "ies" }
    );
}

fn prevalence_table(
    num: &CombinedResult,
    den: &CombinedResult,
    num_alias: &str,
    labels: &[&dyn Fn(&str) -> String],
    headers: &[&str],
    what: &str,
) {
    let mut notes = render::Notes::default();
    let mut header: Vec<String> = headers.iter().map(|s| s.to_string()).collect();
    header.extend([
        format!("{what} (95% CI)"),
        "registered (95% CI)".into(),
        "prevalence (95% CI)".into(),
    ]);
    let mut rows = Vec::new();
    for row in &den.rows {
        let mut r: Vec<String> = row.key.iter().zip(labels).map(|(k, f)| f(k)).collect();
        let n = find_cell(num, &row.key, num_alias);
        let d = row.cells.first();
        r.push(n.map(|c| notes.cell(c, 0)).unwrap_or_else(|| "–".into()));
        r.push(d.map(|c| notes.cell(c, 0)).unwrap_or_else(|| "–".into()));
        r.push(match (n, d) {
            (Some(n), Some(d)) => ratio(n, d).map(pct).unwrap_or_else(|| "–".into()),
            _ => "–".into(),
        });
        rows.push(r);
    }
    phm::out!("{}", render::layout(&header, &rows, headers.len()));
    phm::out!("{}", notes.render());
}

/// What the reference check found.
#[derive(Debug, Default)]
struct Check {
    inside: usize,
    total: usize,
    misses: Vec<String>,
}

fn check(reference: &ReferenceAnswers, results: &BTreeMap<&str, CombinedResult>) -> Check {
    let mut c = Check::default();
    for q in &reference.questions {
        let Some(result) = results.get(q.id.as_str()) else {
            continue;
        };
        let complete = result.coverage.as_ref().is_some_and(|c| !c.partial);
        if !complete {
            continue;
        }
        // A linked question is answered pair by pair (each practice with each trust),
        // so its exact answer is the sum of the pairs' own answers.
        let rows = q.linked.as_ref().map_or(&q.rows, |l| &l.pairwise_rows);
        for row in rows {
            for (alias, truth) in &row.values {
                let Some(cell) = find_cell(result, &row.key, alias) else {
                    continue;
                };
                if cell.suppressed {
                    continue;
                }
                c.total += 1;
                if cell.ci95_low <= *truth && *truth <= cell.ci95_high {
                    c.inside += 1;
                } else {
                    c.misses.push(format!(
                        "{} [{}] {alias}: exact {} outside {}",
                        q.id,
                        row.key.join(", "),
                        render::number(*truth, if truth.fract() == 0.0 { 0 } else { 1 }),
                        render::cell_text(cell, if truth.fract() == 0.0 { 0 } else { 1 })
                    ));
                }
            }
        }
    }
    c
}

struct Asker<'a> {
    dir: &'a Path,
    url: String,
}

impl Asker<'_> {
    async fn ask(&self, q: &Question) -> anyhow::Result<CombinedResult> {
        self.ask_as(q, phm_proto::Aggregation::Plain).await
    }

    async fn ask_as(
        &self,
        q: &Question,
        aggregation: phm_proto::Aggregation,
    ) -> anyhow::Result<CombinedResult> {
        let cert_name = format!("{}-client", q.requester);
        let connection = Connection {
            url: self.url.clone(),
            ca: Some(self.dir.join("certs/ca.pem")),
            cert: Some(self.dir.join(format!("certs/{cert_name}.pem"))),
            cert_key: Some(self.dir.join(format!("certs/{cert_name}.key"))),
            connect_timeout: None,
        };
        let key = phm::keys::load_private_key(&self.dir.join(format!("keys/{}.key", q.requester)))?;
        let parsed = phm::sql::parse(q.sql).map_err(|e| anyhow!("{}", e.render(q.sql)))?;
        let mut body = client::query_body(
            parsed,
            phm::synth::FEDERATION_ID,
            q.requester,
            q.purpose,
            q.project.map(str::to_string),
            q.epsilon,
            None,
        );
        body.aggregation = aggregation;
        let channel = client::connect(&connection).await?;
        let submission = client::submit(channel, &self.url, body.sign(&key), &mut |_| {}).await?;
        Ok(submission.result)
    }
}

/// The demo's secure-versus-plain question (section 7).
const SECURE_DEMO: Question = Question {
    id: "secure_diabetes_by_imd",
    title: "people on the diabetes register by IMD quintile",
    requester: "dsu",
    purpose: phm_proto::Purpose::Planning,
    project: None,
    sql: "SELECT imd_quintile, COUNT(*) AS diabetics FROM gp_patients \
          WHERE diabetes = TRUE GROUP BY imd_quintile",
    epsilon: 0.5,
    expect_refusal: false,
};

fn banner(text: &str) {
    phm::outln!("\n{text}\n{}", "=".repeat(text.chars().count()));
}

async fn questions_and_report(
    dir: &Path,
    manifest: &Manifest,
    url: String,
) -> anyhow::Result<Check> {
    let asker = Asker { dir, url };
    let mut results: BTreeMap<&str, CombinedResult> = BTreeMap::new();
    for q in questions::ALL.iter().chain(&questions::LINKED) {
        let r = asker
            .ask(q)
            .await
            .with_context(|| format!("asking {:?}", q.title))?;
        results.insert(q.id, r);
    }
    let get = |id: &str| results.get(id).ok_or_else(|| anyhow!("no result for {id}"));
    let gp_count = manifest
        .organisations
        .iter()
        .filter(|o| o.dataset == "gp_patients")
        .count();

    banner(&format!(
        "{} — population health briefing (synthetic data, as at {})",
        manifest.ics, manifest.as_of
    ));
    phm::outln!(
        "{} registered patients across {gp_count} GP practices, 2 acute trusts, social care and the council.\n\
         Every figure is a differentially private estimate with its 95% interval; no partner shared a row.",
        render::number(manifest.population as f64, 0)
    );

    phm::outln!("\n1. Diabetes prevalence by deprivation and age (DSU, planning)");
    let (num, den) = (
        get(questions::DIABETES_BY_IMD_AGE.id)?,
        get(questions::POPULATION_BY_IMD_AGE.id)?,
    );
    prevalence_table(
        num,
        den,
        "diabetics",
        &[&imd_label, &age_label],
        &["IMD quintile", "age"],
        "on register",
    );
    // Quintile totals, crude and age-standardised (ESP2013): the headline inequality,
    // with the age structure of each quintile taken out.
    let aggs = |sql: &str| phm::sql::parse(sql).map(|q| q.aggregates);
    let (Ok(num_aggs), Ok(den_aggs)) = (
        aggs(questions::DIABETES_BY_IMD_AGE.sql),
        aggs(questions::POPULATION_BY_IMD_AGE.sql),
    ) else {
        anyhow::bail!("the demo's own diabetes questions do not parse");
    };
    match phm::rates::Rates::of(num, &num_aggs, den, &den_aggs, 1000.0, Some("bin(age, 20)")) {
        Ok(t) => {
            phm::outln!("   Diabetes per 1,000 registered patients, by IMD quintile:");
            for line in t.table().lines() {
                phm::outln!("   {line}");
            }
        }
        Err(e) => phm::outln!("   (no rates: {e})"),
    }
    footer(&[num, den], "DSU's");

    phm::outln!("\n2. Hypertension prevalence by ethnic group (DSU, planning)");
    let (num, den) = (
        get(questions::HYPERTENSION_BY_ETHNICITY.id)?,
        get(questions::POPULATION_BY_ETHNICITY.id)?,
    );
    prevalence_table(
        num,
        den,
        "hypertensive",
        &[&|k: &str| k.to_string()],
        &["ethnic group"],
        "on register",
    );
    footer(&[num, den], "DSU's");

    phm::outln!(
        "\n3. Emergency admissions in the last 12 months by Place of residence (DSU, planning)"
    );
    let r = get(questions::EMERGENCY_ADMISSIONS_BY_PLACE.id)?;
    let q = phm::sql::parse(questions::EMERGENCY_ADMISSIONS_BY_PLACE.sql)
        .map_err(|e| anyhow!("{}", e.message))?;
    phm::out!("{}", render::table(r, &q.aggregates));
    footer(&[r], "DSU's");

    phm::outln!(
        "\n4. Glycaemic control among people with diabetes by deprivation (research project {})",
        questions::RESEARCH_PROJECT
    );
    let r = get(questions::RESEARCH_HBA1C_BY_IMD.id)?;
    let q = phm::sql::parse(questions::RESEARCH_HBA1C_BY_IMD.sql)
        .map_err(|e| anyhow!("{}", e.message))?;
    phm::out!("{}", render::table(r, &q.aggregates));
    phm::outln!("   HbA1c in mmol/mol. National Data Opt-out patients excluded at every practice.");
    footer(&[r], "project's");

    phm::outln!(
        "\n5. A question a partner's policy refuses: fuel poverty by housing tenure (DSU, planning)"
    );
    let r = get(questions::FUEL_POVERTY_BY_TENURE.id)?;
    let c = r.coverage.clone().unwrap_or_default();
    if c.answered.is_empty() && !c.refused.is_empty() {
        for line in render::coverage_lines(r) {
            phm::outln!("   {line}");
        }
        phm::outln!("   Nothing was released and no budget was spent.");
    } else {
        phm::out!("{}", render::table(r, &[]));
        footer(&[r], "DSU's");
    }

    phm::outln!(
        "\n6. Linked across partners on NHS number, without pooling identifiers (DSU, planning)"
    );
    for q in &questions::LINKED {
        let r = get(q.id)?;
        let parsed = phm::sql::parse(q.sql).map_err(|e| anyhow!("{}", e.message))?;
        phm::outln!("   {}", q.title);
        phm::out!("{}", render::table(r, &parsed.aggregates));
        footer(&[r], "DSU's");
    }

    phm::outln!(
        "\n7. The same question in secure mode and in plain mode: {} (DSU, planning)",
        SECURE_DEMO.title
    );
    let parsed = phm::sql::parse(SECURE_DEMO.sql).map_err(|e| anyhow!("{}", e.message))?;
    let secure = asker
        .ask_as(&SECURE_DEMO, phm_proto::Aggregation::SecureSum)
        .await
        .context("asking the secure question")?;
    let plain = asker
        .ask(&SECURE_DEMO)
        .await
        .context("asking the plain question")?;
    phm::outln!("   Secure: one system total, each practice adding a share of the noise");
    phm::out!("{}", render::table(&secure, &parsed.aggregates));
    phm::outln!("   Total: {}", secure.total_note);
    phm::outln!("   Plain: each practice releases its own noisy figure, summed by the coordinator");
    phm::out!("{}", render::table(&plain, &parsed.aggregates));
    footer(&[&secure, &plain], "DSU's");

    let reference = synth::load_reference(dir)?;
    let checked = check(&reference, &results);
    banner("Check against the exact answers (known only because the data is synthetic)");
    phm::outln!(
        "{} of {} reference figures inside their 95% interval ({:.0}%; about 95% expected).",
        checked.inside,
        checked.total,
        if checked.total > 0 {
            100.0 * checked.inside as f64 / checked.total as f64
        } else {
            0.0
        }
    );
    for m in checked.misses.iter().take(5) {
        phm::outln!("  outside: {m}");
    }
    Ok(checked)
}

/// Run the demo; returns the exit code.
pub async fn run(a: DemoArgs) -> anyhow::Result<u8> {
    let started = Instant::now();
    client::install_crypto_provider();
    let dir = a
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join("phm-demo"));
    phm::outln!(
        "Synthesising a {}-person ICS (seed {}) in {} …",
        a.population,
        a.seed,
        dir.display()
    );
    let opts = SynthOptions {
        out: dir.clone(),
        population: a.population,
        seed: a.seed,
        nodes_limit: a.nodes,
        practices: None,
        base_port: None,
        progress: true,
        force: true,
    };
    let summary = tokio::task::spawn_blocking(move || synth::run(&opts)).await??;
    let manifest = summary.manifest;
    // Held until the demo ends: dropping it stops a server the demo started.
    let _warehouse = if a.postgres {
        let server = tokio::task::spawn_blocking(phm_devkit::postgres::Server::start)
            .await?
            .map_err(|e| anyhow!("--postgres needs PostgreSQL: {e}"))?;
        phm::outln!(
            "Loading every partner's data into PostgreSQL (COPY; one database and one read-only role per partner) …"
        );
        for o in &manifest.organisations {
            phm_devkit::synth::warehouse::move_partner(
                &server,
                &dir.join(&o.ods_code),
                &format!("phm_demo_{}", o.ods_code.to_ascii_lowercase()),
            )
            .await
            .map_err(|e| anyhow!("moving {} into PostgreSQL: {e}", o.ods_code))?;
        }
        Some(server)
    } else {
        None
    };
    if a.fhir {
        phm::outln!(
            "Exporting each acute trust's admissions as FHIR Bulk Data (Patient, Encounter and Condition NDJSON, with a manifest) …"
        );
        for o in &manifest.organisations {
            let org = dir.join(&o.ods_code);
            if org.join("data/acute_admissions.parquet").exists() {
                let w =
                    tokio::task::spawn_blocking(move || phm_devkit::synth::fhir::move_trust(&org))
                        .await?
                        .map_err(|e| anyhow!("exporting {} as FHIR: {e}", o.ods_code))?;
                phm::outln!(
                    "  {}: {} patients, {} admissions (+{} outpatient), {} diagnoses (+{} problem-list entries)",
                    o.ods_code,
                    w.patients,
                    w.admissions,
                    w.outpatient,
                    w.diagnoses,
                    w.problems
                );
            }
        }
    }
    let synth_time = started.elapsed();
    let exe = std::env::current_exe().context("cannot find the running phm binary")?;
    let logs = dir.join("logs");
    phm::outln!(
        "Starting {} partner nodes and the coordinator (logs in {}) …",
        manifest.organisations.len(),
        logs.display()
    );
    // One listener for the whole run: a second one created after the report would miss
    // a SIGTERM sent the moment "Press Ctrl-C" appears (tokio only delivers a signal to
    // listeners that exist when it arrives), and the demo would never stop.
    let stop = phm_coordinator::cli::shutdown_signal();
    tokio::pin!(stop);
    let t = Instant::now();
    let launch = Launch {
        root: dir.clone(),
        programs: Programs {
            node: Program::subcommand(&exe, "node"),
            coordinator: Program::subcommand(&exe, "coordinator"),
        },
        nodes: manifest
            .organisations
            .iter()
            .map(|o| o.ods_code.clone())
            .collect(),
        with_coordinator: true,
        logs,
        timeout: Duration::from_secs(a.startup_timeout),
    };
    let mut fed = tokio::task::spawn_blocking(move || Federation::launch(&launch)).await??;
    let url = fed
        .coordinator
        .as_ref()
        .map(RunningCoordinator::url)
        .ok_or_else(|| anyhow!("the coordinator was not started"))?;
    let tls = Tls {
        ca: dir.join("certs/ca.pem"),
        cert: dir.join("certs/dsu-client.pem"),
        key: dir.join("certs/dsu-client.key"),
        node_cert: dir.join("certs/coordinator-client.pem"),
        node_key: dir.join("certs/coordinator-client.key"),
    };
    let result = async {
        wait_healthy(&mut fed, &tls, Duration::from_secs(a.startup_timeout)).await?;
        let startup = t.elapsed();
        let t = Instant::now();
        let checked = questions_and_report(&dir, &manifest, url.clone()).await?;
        phm::outln!(
            "\nTimings: synthesis {:.1}s, start-up {:.1}s, {} queries {:.1}s.",
            synth_time.as_secs_f64(),
            startup.as_secs_f64(),
            questions::ALL.len(),
            t.elapsed().as_secs_f64()
        );
        anyhow::Ok(checked)
    };
    let outcome = tokio::select! {
        r = result => r,
        () = &mut stop => Err(anyhow!("interrupted")),
    };
    let code = match outcome {
        Ok(_) if a.keep_running => {
            phm::outln!("\nThe federation is running. Try, for example:\n");
            phm::outln!(
                "  {} query --coordinator {url} --federation {fed} --ca {d}/certs/ca.pem --cert {d}/certs/dsu-client.pem --cert-key {d}/certs/dsu-client.key --key {d}/keys/dsu.key --purpose planning --epsilon 0.5 'SELECT place, COUNT(*) AS people FROM gp_patients WHERE copd = TRUE GROUP BY place'",
                exe.display(),
                d = dir.display(),
                fed = phm::synth::FEDERATION_ID
            );
            phm::outln!(
                "\n  {} budget --coordinator {url} --federation {fed} --ca {d}/certs/ca.pem --cert {d}/certs/dsu-client.pem --cert-key {d}/certs/dsu-client.key --key {d}/keys/dsu.key",
                exe.display(),
                d = dir.display(),
                fed = phm::synth::FEDERATION_ID
            );
            phm::outln!("\nPress Ctrl-C (or send SIGTERM) to stop it.");
            // SIGTERM too: dying on it would orphan the children.
            stop.await;
            0
        }
        Ok(_) => 0,
        Err(e) => {
            eprintln!("\nerror: {e:#}");
            1
        }
    };
    let (clean, killed) = tokio::task::spawn_blocking(move || fed.stop(Duration::from_secs(20)))
        .await
        .unwrap_or((0, 0));
    phm::outln!(
        "Stopped {clean} process{} cleanly{}. Total {:.1}s. Audit logs: phm audit verify --data-dir {}/<ODS>/state",
        if clean == 1 { "" } else { "es" },
        if killed > 0 {
            format!(", {killed} had to be killed or failed")
        } else {
            String::new()
        },
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(code)
}
