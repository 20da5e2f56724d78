//! `phm synth`: a deterministic synthetic Integrated Care System (people, GP
//! registrations, admissions, social care, council records, and every partner's record
//! of each person's NHS number) written as one folder per partner with Parquet data, IG
//! policy and node config, plus keys, dev certificates, node identities, the
//! coordinator's config and exact reference answers for the demo.

pub mod activity;
pub mod fhir;
pub mod governance;
pub mod ics;
pub mod nhs;
pub mod omop;
pub mod people;
pub mod reference;
pub mod rng;
pub mod warehouse;
mod write;

use ics::{Org, OrgKind};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The date the synthetic extract is "as at": ages are on this date and admissions cover
/// the year before it. Fixed so that a seed gives the same bytes on any day.
pub const AS_OF: (i32, u32, u32) = (2026, 10, 1);

/// The federation id `phm synth` writes into every node's and the coordinator's
/// config; requesters sign their queries and proofs for it.
pub const FEDERATION_ID: &str = "synthetic-ics";

pub const MANIFEST_FILE: &str = "ics.json";
pub const REFERENCE_FILE: &str = "reference_answers.json";

/// The coordinator's server certificate (infrastructure CA, like every node's).
pub const COORDINATOR_SERVER_CERT: &str = "coordinator";
/// The coordinator's client certificate towards nodes (infrastructure CA); every
/// node.toml pins it in `tls.allowed_clients`.
pub const COORDINATOR_CLIENT_CERT: &str = "coordinator-client";
/// People's client certificates (people CA), which only the coordinator trusts.
pub const PEOPLE_CERTS: [&str; 2] = ["dsu-client", "researcher-client"];

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error(
        "{0} is not empty and was not written by `phm synth`; choose a new folder (nothing was changed)"
    )]
    NotEmpty(PathBuf),
    #[error(
        "{0} holds an earlier `phm synth` output; pass --force to replace it (nothing was changed)"
    )]
    Exists(PathBuf),
    #[error("population must be at least {min} people (got {got})")]
    TooSmall { min: usize, got: usize },
    #[error(transparent)]
    TooLarge(#[from] people::TooManyPeople),
    #[error("--nodes-limit must be at least 1")]
    NoPractices,
    #[error(
        "--practices {practices} leaves fewer than {min} people per practice in a population of {population}; ask for at most {max} practices or a larger population"
    )]
    TooManyPractices {
        practices: usize,
        population: usize,
        min: usize,
        max: usize,
    },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}")]
    Parquet(String),
    #[error("generated policy for {org} is invalid (this is a bug in phm synth): {message}")]
    Policy { org: String, message: String },
    #[error(transparent)]
    Key(#[from] phm_proto::keyfile::KeyFileError),
    #[error(transparent)]
    Cert(#[from] crate::pki::CertError),
    #[error("{path}: {message}")]
    Manifest { path: PathBuf, message: String },
    #[error("no free loopback port at or above {0}")]
    NoFreePort(u16),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SynthError + '_ {
    move |source| SynthError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct SynthOptions {
    pub out: PathBuf,
    pub population: usize,
    pub seed: u64,
    /// Keep only the first K GP practices (the other partners always stay).
    pub nodes_limit: Option<usize>,
    /// Split the population over this many GP practices instead of about one per 9,000
    /// people (at least [`MIN_LIST_SIZE`] people each): a many-partner federation, such
    /// as the 200-practice secure-aggregation bench, within the NHS test-number range.
    pub practices: Option<usize>,
    /// Allocate free loopback ports from here; otherwise 50050 (coordinator) and 50051…
    /// are written unchecked and `phm demo` picks its own at run time.
    pub base_port: Option<u16>,
    pub progress: bool,
    /// Replace an earlier `phm synth` output in `out`.
    pub force: bool,
}

/// DIR/ics.json: what was generated, for `phm demo` and for people.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub ics: String,
    pub seed: u64,
    pub population: usize,
    pub as_of: String,
    pub places: Vec<String>,
    pub pcns: Vec<String>,
    pub organisations: Vec<Org>,
    /// GP practices generated but left out by --nodes-limit.
    pub practices_not_included: usize,
    pub coordinator_port: u16,
    /// Listen port per ODS code.
    pub ports: BTreeMap<String, u16>,
    /// Requester id → Ed25519 public key (base64), for the coordinator's requester
    /// directory.
    #[serde(default)]
    pub requesters: BTreeMap<String, String>,
    /// The IG leads' registry key (base64), which the coordinator's
    /// `[secure_aggregation]` names beside the registry it relays.
    #[serde(default)]
    pub registry_key: String,
}

impl Manifest {
    pub fn org(&self, ods: &str) -> Option<&Org> {
        self.organisations.iter().find(|o| o.ods_code == ods)
    }
}

/// Prevalence of one condition in the generated registered population.
#[derive(Debug, Clone, Serialize)]
pub struct PrevalenceLine {
    pub condition: &'static str,
    pub denominator: &'static str,
    pub target: f64,
    pub observed: f64,
}

#[derive(Debug, Clone)]
pub struct SynthSummary {
    pub manifest: Manifest,
    pub rows: BTreeMap<String, u64>,
    pub prevalence: Vec<PrevalenceLine>,
    /// Missing and invalid NHS numbers per dataset, counted over the rows written.
    pub nhs_numbers: Vec<nhs::NumberQuality>,
    pub elapsed: Duration,
    /// Generating people and activity in memory.
    pub generate_time: Duration,
    /// Writing keys, certificates, policies and Parquet.
    pub write_time: Duration,
}

pub fn as_of() -> chrono::NaiveDate {
    chrono::NaiveDate::from_ymd_opt(AS_OF.0, AS_OF.1, AS_OF.2).unwrap_or_default()
}

fn prepare_dir(out: &Path, force: bool) -> Result<(), SynthError> {
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(io(out))?;
        if entries.next().is_some() {
            if !out.join(MANIFEST_FILE).exists() {
                return Err(SynthError::NotEmpty(out.to_path_buf()));
            }
            if !force {
                return Err(SynthError::Exists(out.to_path_buf()));
            }
            std::fs::remove_dir_all(out).map_err(io(out))?;
        }
    }
    std::fs::create_dir_all(out).map_err(io(out))
}

/// Is a loopback TCP port free right now?
pub fn port_free(port: u16) -> bool {
    std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
}

fn ports_from(base: u16, count: usize) -> Result<Vec<u16>, SynthError> {
    let mut out = Vec::with_capacity(count);
    let mut p = base;
    while out.len() < count {
        if port_free(p) {
            out.push(p);
        }
        p = p.checked_add(1).ok_or(SynthError::NoFreePort(base))?;
    }
    Ok(out)
}

/// Rewrite every node.toml and the coordinator's config for new ports, and record them
/// in the manifest. `node_ports` is parallel to `manifest.organisations`.
pub fn write_configs(
    dir: &Path,
    manifest: &mut Manifest,
    coordinator_port: u16,
    node_ports: &[u16],
) -> Result<(), SynthError> {
    let mut pairs = Vec::new();
    manifest.ports.clear();
    for (org, port) in manifest.organisations.iter().zip(node_ports) {
        let path = dir.join(&org.ods_code).join("node.toml");
        std::fs::write(&path, governance::node_toml(org, *port)).map_err(io(&path))?;
        manifest.ports.insert(org.ods_code.clone(), *port);
        pairs.push((org.clone(), *port));
    }
    let cdir = dir.join("coordinator");
    std::fs::create_dir_all(&cdir).map_err(io(&cdir))?;
    let path = cdir.join("coordinator.toml");
    std::fs::write(
        &path,
        governance::coordinator_toml(
            &pairs,
            coordinator_port,
            &manifest.requesters,
            &manifest.registry_key,
        ),
    )
    .map_err(io(&path))?;
    manifest.coordinator_port = coordinator_port;
    let mpath = dir.join(MANIFEST_FILE);
    let json = serde_json::to_string_pretty(manifest).map_err(|e| SynthError::Manifest {
        path: mpath.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&mpath, json + "\n").map_err(io(&mpath))
}

pub fn load_manifest(dir: &Path) -> Result<Manifest, SynthError> {
    let path = dir.join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| SynthError::Manifest {
        path,
        message: e.to_string(),
    })
}

pub fn load_reference(dir: &Path) -> Result<reference::ReferenceAnswers, SynthError> {
    let path = dir.join(REFERENCE_FILE);
    let text = std::fs::read_to_string(&path).map_err(io(&path))?;
    serde_json::from_str(&text).map_err(|e| SynthError::Manifest {
        path,
        message: e.to_string(),
    })
}

fn bar(progress: bool, len: u64, msg: &'static str) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    if let Ok(style) = ProgressStyle::with_template(
        "{msg:>18} [{elapsed_precise}] {wide_bar} {human_pos}/{human_len} ({eta})",
    ) {
        pb.set_style(style);
    }
    pb.set_message(msg);
    pb
}

/// The smallest population that still gives every Place a practice and every group of
/// the demo's questions a few people.
pub const MIN_POPULATION: usize = 1_000;

/// The fewest people `--practices` may leave to one practice on average (the smallest
/// English practices have a few hundred patients; below this the per-practice counts
/// are mostly suppressed and say nothing).
pub const MIN_LIST_SIZE: usize = 500;

/// Everything generated in memory before it is written: the people, what each non-GP
/// partner holds about them, and every partner's record of their NHS numbers.
#[derive(Debug, Clone)]
pub struct Records {
    pub people: Vec<people::Person>,
    pub admissions: Vec<activity::Admission>,
    pub packages: Vec<activity::Package>,
    pub residents: Vec<activity::Resident>,
    pub nhs: nhs::NhsRecords,
}

enum Job<'a> {
    Gp(&'a Org, std::ops::Range<usize>),
    /// The trust's organisation and its index (0 or 1) in `Ics::trusts`.
    Acute(&'a Org, usize),
    SocialCare(&'a Org),
    La(&'a Org),
}

/// Generate the whole synthetic ICS into `opts.out`.
pub fn run(opts: &SynthOptions) -> Result<SynthSummary, SynthError> {
    let started = Instant::now();
    if opts.population < MIN_POPULATION {
        return Err(SynthError::TooSmall {
            min: MIN_POPULATION,
            got: opts.population,
        });
    }
    if opts.population > nhs::MAX_POPULATION {
        return Err(people::TooManyPeople {
            max: nhs::MAX_POPULATION,
            got: opts.population,
        }
        .into());
    }
    if opts.nodes_limit == Some(0) || opts.practices == Some(0) {
        return Err(SynthError::NoPractices);
    }
    let max_practices = opts.population / MIN_LIST_SIZE;
    if let Some(k) = opts.practices.filter(|&k| k > max_practices) {
        return Err(SynthError::TooManyPractices {
            practices: k,
            population: opts.population,
            min: MIN_LIST_SIZE,
            max: max_practices,
        });
    }
    prepare_dir(&opts.out, opts.force)?;
    let out = opts.out.as_path();
    let as_of = as_of();

    let mut rng = rng::seeded(opts.seed);
    let practices = opts
        .practices
        .unwrap_or_else(|| ics::practice_count(opts.population));
    let ics = ics::build(&mut rng, opts.population, practices);
    let pb = bar(opts.progress, opts.population as u64, "generating people");
    let people = people::generate(&mut rng, &ics, &mut |n| pb.inc(n))?;
    pb.set_message("activity");
    let admissions = activity::admissions(&mut rng, &people);
    let packages = activity::packages(&mut rng, &people);
    let residents = activity::residents(&mut rng, &people);
    // Drawn last, so the draws above are the same whatever the records' rates.
    let nhs = nhs::NhsRecords::generate(&mut rng, &people);
    let records = Records {
        people,
        admissions,
        packages,
        residents,
        nhs,
    };
    pb.finish_and_clear();
    let generated_at = started.elapsed();

    // People are generated practice by practice, so each practice is a contiguous run.
    let mut ranges = Vec::with_capacity(ics.practices.len());
    let mut start = 0;
    for p in &ics.practices {
        ranges.push(start..start + p.list_size);
        start += p.list_size;
    }
    let included = opts
        .nodes_limit
        .unwrap_or(usize::MAX)
        .min(ics.practices.len());

    let mut orgs: Vec<Org> = ics.practices[..included]
        .iter()
        .map(|p| ics.practice_org(p))
        .collect();
    orgs.extend(ics.trusts.iter().cloned());
    orgs.push(ics.social_care.clone());
    orgs.push(ics.local_authority.clone());

    // Keys and certificates: fresh randomness on purpose (never derived from the seed,
    // which is printed and shared).
    let keys_dir = out.join("keys");
    std::fs::create_dir_all(&keys_dir).map_err(io(&keys_dir))?;
    let dsu = phm_proto::keyfile::new_key_file(&keys_dir.join("dsu.key"))?;
    let researcher = phm_proto::keyfile::new_key_file(&keys_dir.join("researcher.key"))?;
    let org_ids: Vec<String> = orgs.iter().map(|o| o.ods_code.clone()).collect();
    // Node identities for linked and secure queries, and the registry listing them,
    // signed with the IG leads' key (which every policy then pins).
    let peers = crate::pki::dev_peers(
        &out.join("peer"),
        FEDERATION_ID,
        &org_ids,
        &keys_dir.join("registry-signer.key"),
        365,
    )?;
    let keys = governance::PolicyKeys {
        dsu: dsu.public_key_base64,
        researcher: researcher.public_key_base64,
        registry: peers.registry_key,
        nodes: peers.publics,
    };
    let requesters: BTreeMap<String, String> = [
        ("dsu".to_string(), keys.dsu.clone()),
        ("researcher".to_string(), keys.researcher.clone()),
    ]
    .into_iter()
    .collect();
    // Two CAs: nodes trust only the infrastructure one for clients, so a person's
    // certificate cannot even complete a handshake with a node.
    let mut servers: Vec<String> = orgs.iter().map(|o| o.ods_code.clone()).collect();
    servers.push(COORDINATOR_SERVER_CERT.to_string());
    crate::pki::dev(
        &out.join("certs"),
        &crate::pki::CertPlan {
            servers,
            infra_clients: vec![COORDINATOR_CLIENT_CERT.to_string()],
            people: PEOPLE_CERTS.iter().map(|s| s.to_string()).collect(),
            legacy: Vec::new(),
        },
    )?;

    let pcn_names: Vec<String> = ics.pcns.iter().map(|(n, _)| n.clone()).collect();
    for org in &orgs {
        let dir = out.join(&org.ods_code);
        let data = dir.join("data");
        std::fs::create_dir_all(&data).map_err(io(&data))?;
        let policy = governance::policy(org, &pcn_names, &keys, &orgs).map_err(|message| {
            SynthError::Policy {
                org: org.ods_code.clone(),
                message,
            }
        })?;
        let text = governance::policy_toml(org, &policy).map_err(|message| SynthError::Policy {
            org: org.ods_code.clone(),
            message,
        })?;
        let path = dir.join("policy.toml");
        // What we write must be what a node accepts: fail here, not at node start-up.
        phm_policies::Policy::parse(&path.display().to_string(), &text).map_err(|e| {
            SynthError::Policy {
                org: org.ods_code.clone(),
                message: e.to_string(),
            }
        })?;
        std::fs::write(&path, text).map_err(io(&path))?;
    }

    // Parquet files, written by a couple of threads (one per core, at most 4).
    let mut jobs: Vec<Job> = Vec::new();
    for (i, org) in orgs.iter().enumerate() {
        jobs.push(match org.kind {
            OrgKind::GpPractice => Job::Gp(org, ranges[i].clone()),
            OrgKind::AcuteTrust => Job::Acute(
                org,
                ics.trusts
                    .iter()
                    .position(|t| t.ods_code == org.ods_code)
                    .unwrap_or(0),
            ),
            OrgKind::SocialCare => Job::SocialCare(org),
            OrgKind::LocalAuthority => Job::La(org),
        });
    }
    // Largest files first, so the council's one-row-per-resident file does not start last
    // and leave the other thread idle.
    jobs.sort_by_key(|j| match j {
        Job::La(_) => 0,
        Job::Acute(..) => 1,
        Job::SocialCare(_) => 2,
        Job::Gp(..) => 3,
    });
    let wb = bar(opts.progress, jobs.len() as u64, "writing parquet");
    let next = AtomicUsize::new(0);
    let results: Mutex<Vec<Result<(String, u64), String>>> = Mutex::new(Vec::new());
    let workers = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    std::thread::scope(|s| {
        for _ in 0..workers {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::SeqCst);
                    let Some(job) = jobs.get(i) else { break };
                    let r = run_job(job, out, &ics, opts.seed, as_of, &records);
                    if let Ok(mut v) = results.lock() {
                        v.push(r);
                    }
                    wb.inc(1);
                }
            });
        }
    });
    wb.finish_and_clear();
    let written_at = started.elapsed();
    let mut rows = BTreeMap::new();
    let results = results.into_inner().unwrap_or_default();
    if results.len() != jobs.len() {
        return Err(SynthError::Parquet(
            "a writer thread stopped before finishing its files".into(),
        ));
    }
    for r in results {
        let (ods, n) = r.map_err(SynthError::Parquet)?;
        rows.insert(ods, n);
    }

    let gp_ranges: Vec<_> = ranges[..included].to_vec();
    let refs = reference::compute(
        opts.seed,
        opts.population,
        &as_of.to_string(),
        &records,
        &gp_ranges,
    );
    let rpath = out.join(REFERENCE_FILE);
    let json = serde_json::to_string_pretty(&refs).map_err(|e| SynthError::Manifest {
        path: rpath.clone(),
        message: e.to_string(),
    })?;
    std::fs::write(&rpath, json + "\n").map_err(io(&rpath))?;

    let (coordinator_port, node_ports) = match opts.base_port {
        Some(base) => {
            let all = ports_from(base, orgs.len() + 1)?;
            (all[0], all[1..].to_vec())
        }
        None => (50050, (0..orgs.len()).map(|i| 50051 + i as u16).collect()),
    };
    let mut manifest = Manifest {
        ics: "Riverside and Wolds ICS (synthetic)".into(),
        seed: opts.seed,
        population: opts.population,
        as_of: as_of.to_string(),
        places: ics::PLACES.iter().map(|s| s.to_string()).collect(),
        pcns: pcn_names,
        organisations: orgs,
        practices_not_included: ics.practices.len() - included,
        coordinator_port,
        ports: BTreeMap::new(),
        requesters,
        registry_key: keys.registry.clone(),
    };
    write_configs(out, &mut manifest, coordinator_port, &node_ports)?;

    Ok(SynthSummary {
        manifest,
        rows,
        prevalence: prevalence(&records.people),
        nhs_numbers: number_quality(&records, &gp_ranges),
        elapsed: started.elapsed(),
        generate_time: generated_at,
        write_time: written_at.saturating_sub(generated_at),
    })
}

fn run_job(
    job: &Job,
    out: &Path,
    ics: &ics::Ics,
    seed: u64,
    as_of: chrono::NaiveDate,
    records: &Records,
) -> Result<(String, u64), String> {
    let (org, n) = match job {
        Job::Gp(org, range) => {
            let path = out.join(&org.ods_code).join("data/gp_patients.parquet");
            (
                org,
                write::gp_patients(&path, ics, seed, as_of, records, range.clone())?,
            )
        }
        Job::Acute(org, trust) => {
            let path = out
                .join(&org.ods_code)
                .join("data/acute_admissions.parquet");
            let mine: Vec<&activity::Admission> = records
                .admissions
                .iter()
                .filter(|a| a.trust as usize == *trust)
                .collect();
            (
                org,
                write::acute_admissions(&path, &org.ods_code, *trust, seed, as_of, records, &mine)?,
            )
        }
        Job::SocialCare(org) => {
            let path = out
                .join(&org.ods_code)
                .join("data/social_care_packages.parquet");
            (org, write::social_care_packages(&path, seed, records)?)
        }
        Job::La(org) => {
            let path = out.join(&org.ods_code).join("data/la_residents.parquet");
            (org, write::la_residents(&path, ics, seed, records)?)
        }
    };
    Ok((org.ods_code.clone(), n))
}

/// Missing and invalid NHS numbers per dataset, over the rows as written (GP rows of the
/// included practices only).
pub fn number_quality(records: &Records, gp: &[std::ops::Range<usize>]) -> Vec<nhs::NumberQuality> {
    use nhs::{Holder, NumberQuality};
    let people = &records.people;
    let written = |h: Holder, i: usize| records.nhs.written(h, i, people);
    let mut gp_q = NumberQuality::new("gp_patients");
    for i in gp.iter().flat_map(|r| r.clone()) {
        gp_q.note(written(Holder::Gp, i).as_deref());
    }
    let mut acute = NumberQuality::new("acute_admissions");
    for a in &records.admissions {
        acute.note(written(Holder::Trust(a.trust as usize), a.person as usize).as_deref());
    }
    let mut social = NumberQuality::new("social_care_packages");
    for k in &records.packages {
        social.note(written(Holder::SocialCare, k.person as usize).as_deref());
    }
    let mut council = NumberQuality::new("la_residents");
    for i in 0..people.len() {
        council.note(written(Holder::Council, i).as_deref());
    }
    vec![gp_q, acute, social, council]
}

/// Observed prevalence against the targets, over each register's denominator.
pub fn prevalence(people: &[people::Person]) -> Vec<PrevalenceLine> {
    use people::*;
    let lines: [(&str, u16, u8, &str, f64); 8] = [
        ("diabetes", DIABETES, 17, "aged 17+", 0.075),
        ("hypertension", HYPERTENSION, 0, "all ages", 0.14),
        ("CVD (CHD)", CVD, 0, "all ages", 0.03),
        ("COPD", COPD, 0, "all ages", 0.02),
        ("asthma", ASTHMA, 6, "aged 6+", 0.065),
        ("depression", DEPRESSION, 18, "aged 18+", 0.13),
        ("SMI", SMI, 0, "all ages", 0.01),
        ("obesity", OBESITY, 18, "aged 18+", 0.10),
    ];
    lines
        .iter()
        .map(|(name, bit, min_age, denominator, target)| {
            let eligible = people.iter().filter(|p| p.age >= *min_age);
            let (n, k) = eligible.fold((0u64, 0u64), |(n, k), p| (n + 1, k + p.has(*bit) as u64));
            PrevalenceLine {
                condition: name,
                denominator,
                target: *target,
                observed: if n > 0 { k as f64 / n as f64 } else { 0.0 },
            }
        })
        .collect()
}

/// A short human summary of what `run` wrote.
pub fn describe(s: &SynthSummary, out: &Path) -> String {
    let m = &s.manifest;
    let gp = m
        .organisations
        .iter()
        .filter(|o| o.kind == OrgKind::GpPractice)
        .count();
    let mut t = format!(
        "{} — {} people (seed {}), as at {}\n{} GP practices{} in {} PCNs across {} Places, \
         2 acute trusts, 1 social-care provider, 1 local authority\n\n",
        m.ics,
        m.population,
        m.seed,
        m.as_of,
        gp,
        if m.practices_not_included > 0 {
            format!(" (+{} generated, not included)", m.practices_not_included)
        } else {
            String::new()
        },
        m.pcns.len(),
        m.places.len(),
    );
    t.push_str("Register prevalence (target in brackets):\n");
    for p in &s.prevalence {
        t.push_str(&format!(
            "  {:<13} {:>5.1}%  ({:.1}%, {})\n",
            p.condition,
            p.observed * 100.0,
            p.target * 100.0,
            p.denominator
        ));
    }
    t.push_str("\nNHS numbers as written (linked questions link on these alone):\n");
    for q in &s.nhs_numbers {
        t.push_str(&format!(
            "  {:<21} {:>5.2}% missing, {:>4.2}% not valid  ({} rows)\n",
            q.dataset,
            q.missing_rate() * 100.0,
            q.invalid_rate() * 100.0,
            q.records
        ));
    }
    t.push_str("\nPartners:\n");
    for o in &m.organisations {
        t.push_str(&format!(
            "  {:<7} {:<48} {:<22} {:>9} rows  port {}\n",
            o.ods_code,
            o.name,
            o.dataset,
            s.rows.get(&o.ods_code).copied().unwrap_or(0),
            m.ports.get(&o.ods_code).copied().unwrap_or(0)
        ));
    }
    t.push_str(&format!(
        "\nWrote {} in {:.1}s (generating {:.1}s, writing {:.1}s): \
         <ODS>/{{data,policy.toml,node.toml}}, keys/, certs/, coordinator/coordinator.toml, \
         {REFERENCE_FILE}, {MANIFEST_FILE}\n",
        out.display(),
        s.elapsed.as_secs_f64(),
        s.generate_time.as_secs_f64(),
        s.write_time.as_secs_f64(),
    ));
    t
}
