//! Shared fixtures for the node's in-process tests: a small GP practice (the GP practice
//! sample policy + CSV written to a temporary folder), requester keys, query builders, a domain service
//! over that fixture, and test certificates for mutual TLS.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use ed25519_dalek::SigningKey;
use phm_node::audit::AuditLog;
use phm_node::metrics::Metrics;
use phm_node::service::{Service, ServiceLimits};
use phm_node::store::Store;
use phm_policies::PolicyFile;
use phm_policies::model::{Budget, DEFAULT_BUDGET_DELTA, Period, Project, Requester, SourceFormat};
use phm_proto::signing::public_key_to_base64;
use phm_proto::{Aggregate, AggregateKind, GroupKey, Purpose, QueryBody, SignedQuery};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub const PROJECT: &str = "RP-2026-001";

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub policy_path: PathBuf,
    pub data_dir: PathBuf,
    pub dsu: SigningKey,
    pub researcher: SigningKey,
    pub gone: SigningKey,
    pub dsu_budget: f64,
}

fn key(seed: u8) -> SigningKey {
    SigningKey::from_bytes(&[seed; 32])
}

/// The fixture's policy: the GP practice sample (`phm_devkit::fixture`) over the
/// fixture's CSV, with the test requesters and project; `dsu_purposes` lets reload tests
/// change what dsu may do.
pub fn policy(f: &Fixture, dsu_purposes: &[&str]) -> PolicyFile {
    let mut p = phm_devkit::fixture::gp_patients(
        SourceFormat::Csv,
        "gp_patients.csv",
        &["person_id", "age", "sex", "imd_quintile", "ndopt_out"],
    )
    .expect("the GP sample");
    // The fixture's list size is its 240 patients (the sample's is the real practice's).
    p.organisation.registered_population = Some(240);
    let budget = |epsilon: f64, period: Period, per_query_cap: f64| Budget {
        epsilon,
        period,
        per_query_cap,
        delta: DEFAULT_BUDGET_DELTA,
    };
    let requester = |id: &str, key: &SigningKey, purposes: &[&str], budget: Budget| Requester {
        id: id.into(),
        public_key: public_key_to_base64(&key.verifying_key()),
        purposes: purposes.iter().map(|s| s.to_string()).collect(),
        datasets: vec!["gp_patients".into()],
        budget,
        revoked: false,
        linked_queries: false,
        organisation: "Test ICB".into(),
        role: "analyst".into(),
    };
    p.requesters = vec![
        requester(
            "dsu",
            &f.dsu,
            dsu_purposes,
            budget(f.dsu_budget, Period::Month, f.dsu_budget.min(1.0)),
        ),
        Requester {
            revoked: true,
            ..requester(
                "gone",
                &f.gone,
                &["planning"],
                budget(10.0, Period::Month, 1.0),
            )
        },
        requester(
            "researcher",
            &f.researcher,
            &["research"],
            budget(10.0, Period::Month, 1.0),
        ),
    ];
    p.projects = vec![Project {
        id: PROJECT.into(),
        approval_ref: "IRAS 000001".into(),
        lead: "researcher".into(),
        requesters: vec!["researcher".into()],
        datasets: vec!["gp_patients".into()],
        columns: vec!["sex".into(), "imd_quintile".into()],
        expires: "2099-12-31".parse().expect("a TOML date"),
        budget: budget(2.0, Period::Quarter, 0.5),
        linked_queries: false,
    }];
    p
}

/// [`policy`] as the text of a policy file.
pub fn policy_text(f: &Fixture, dsu_purposes: &[&str]) -> String {
    toml::to_string(&policy(f, dsu_purposes)).expect("policy TOML")
}

/// A practice of 240 patients, every 20th opted out.
pub fn fixture(dsu_budget: f64) -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut csv = String::from("person_id,age,sex,imd_quintile,ndopt_out\n");
    for i in 0..240u32 {
        let sex = ["F", "M", "U"][(i % 3) as usize];
        csv.push_str(&format!(
            "p{i:04},{},{sex},{},{}\n",
            (i * 7) % 100,
            1 + i % 5,
            i % 20 == 0
        ));
    }
    std::fs::write(dir.path().join("gp_patients.csv"), csv).expect("csv");
    let f = Fixture {
        policy_path: dir.path().join("policy.toml"),
        data_dir: dir.path().join("state"),
        dir,
        dsu: key(1),
        researcher: key(2),
        gone: key(3),
        dsu_budget,
    };
    std::fs::write(
        &f.policy_path,
        policy_text(&f, &["planning", "direct_care"]),
    )
    .expect("policy");
    std::fs::create_dir_all(&f.data_dir).expect("state");
    f
}

pub async fn service(f: &Fixture, limits: ServiceLimits) -> Arc<Service> {
    let loaded = phm_node::reload::load(&f.policy_path, None)
        .await
        .unwrap_or_else(|e| panic!("fixture policy does not load: {e}"));
    Service::new(
        "ics-test".to_string(),
        loaded,
        Arc::new(Store::open(&f.data_dir).expect("store")),
        Arc::new(AuditLog::open(&f.data_dir).expect("audit")),
        Arc::new(Metrics::new()),
        limits,
    )
}

pub fn limits() -> ServiceLimits {
    ServiceLimits {
        max_concurrent_queries: 512,
        query_deadline: Duration::from_secs(60),
        link_deadline: Duration::from_secs(600),
        storage_timeout: Duration::from_secs(60),
    }
}

pub use phm_proto::query::{fresh_nonce as nonce, now_unix_ms as now_ms};

pub fn new_id() -> String {
    hex::encode(nonce())
}

pub fn count_by_imd(requester: &str, epsilon: f64) -> QueryBody {
    QueryBody {
        federation_id: "ics-test".into(),
        query_id: new_id(),
        requester_id: requester.into(),
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
        epsilon,
        issued_at_unix_ms: now_ms(),
        nonce: nonce(),
        linkage: None,
        aggregation: Default::default(),
    }
}

pub fn sign(body: QueryBody, key: &SigningKey) -> SignedQuery {
    body.sign(key)
}

pub fn period_label_now(period: Period) -> String {
    phm_node::service::period_label(period, chrono::Utc::now())
}

/// Test PKI: a CA, a server leaf for "localhost"/127.0.0.1 and a client leaf, written
/// as PEM files into `dir`. Returns (ca, server cert, server key, client cert, client key).
pub struct TestPki {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A client certificate from a different CA.
    pub rogue_cert: PathBuf,
    pub rogue_key: PathBuf,
}

pub fn pki(dir: &Path) -> TestPki {
    use phm_devkit::pki::{CertPlan, dev};
    let one_ca = |sub: &str, names: &[&str]| {
        dev(
            &dir.join(sub),
            &CertPlan {
                legacy: names.iter().map(|n| n.to_string()).collect(),
                ..Default::default()
            },
        )
        .expect("development PKI")
    };
    let main = one_ca("pki", &["A81001", "dsu-client"]);
    // A client certificate from a different CA.
    let rogue = one_ca("rogue", &["intruder"]);
    let leaf = |certs: &phm_devkit::pki::DevCerts, name: &str| {
        let l = certs
            .leaves
            .iter()
            .find(|l| l.name == name)
            .expect("issued leaf");
        (l.pem.clone(), l.key.clone())
    };
    let (server_cert, server_key) = leaf(&main, "A81001");
    let (client_cert, client_key) = leaf(&main, "dsu-client");
    let (rogue_cert, rogue_key) = leaf(&rogue, "intruder");
    TestPki {
        ca: main.ca_pem.clone(),
        server_cert,
        server_key,
        client_cert,
        client_key,
        rogue_cert,
        rogue_key,
    }
}
