//! Shared fixtures for the node's in-process tests: a small GP practice (policy + CSV
//! written to a temporary folder), requester keys, query builders, a domain service
//! over that fixture, and test certificates for mutual TLS.
#![allow(dead_code, clippy::expect_used, clippy::unwrap_used)]

use ed25519_dalek::SigningKey;
use phm_node::audit::AuditLog;
use phm_node::metrics::Metrics;
use phm_node::service::{Service, ServiceLimits};
use phm_node::store::Store;
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

/// The fixture's policy; `dsu_purposes` lets reload tests change what dsu may do.
pub fn policy_text(f: &Fixture, dsu_purposes: &str) -> String {
    format!(
        r#"version = 1

[organisation]
ods_code = "A81001"
name = "Test Practice"
kind = "gp_practice"
registered_population = 240

[release]
min_reportable_count = 7
rounding = "nearest_5"
scope = "standalone"
per_query_epsilon_cap = 1.0
mechanism = "discrete_laplace"
query_validity_seconds = 300

[opt_out]
column = "ndopt_out"
purposes = ["planning", "research"]

[[datasets]]
name = "gp_patients"
source = {{ format = "csv", path = "gp_patients.csv" }}
person_id = "person_id"
max_rows_per_person = 1
total_kind = "distinct_people"

  [[datasets.columns]]
  name = "person_id"
  type = "text"
  identifier = true

  [[datasets.columns]]
  name = "age"
  type = "integer"
  filter = true
  group = "declared"
  aggregate = true
  bounds = [0, 110]
  min_bin_width = 5

  [[datasets.columns]]
  name = "sex"
  type = "text"
  filter = true
  group = "declared"
  domain = ["F", "M", "U"]

  [[datasets.columns]]
  name = "imd_quintile"
  type = "integer"
  filter = true
  group = "declared"
  domain = "1..5"

  [[datasets.columns]]
  name = "ndopt_out"
  type = "boolean"

[[requesters]]
id = "dsu"
organisation = "Test ICB"
role = "analyst"
public_key = "{dsu}"
purposes = [{dsu_purposes}]
datasets = ["gp_patients"]
budget = {{ epsilon = {budget}, period = "month", per_query_cap = {cap} }}

[[requesters]]
id = "gone"
organisation = "Test ICB"
role = "former analyst"
public_key = "{gone}"
purposes = ["planning"]
datasets = ["gp_patients"]
budget = {{ epsilon = 10.0, period = "month", per_query_cap = 1.0 }}
revoked = true

[[requesters]]
id = "researcher"
organisation = "Test University"
role = "research fellow"
public_key = "{researcher}"
purposes = ["research"]
datasets = ["gp_patients"]
budget = {{ epsilon = 10.0, period = "month", per_query_cap = 1.0 }}

[[projects]]
id = "{PROJECT}"
approval_ref = "IRAS 000001"
lead = "researcher"
requesters = ["researcher"]
datasets = ["gp_patients"]
columns = ["sex", "imd_quintile"]
expires = 2099-12-31
budget = {{ epsilon = 2.0, period = "quarter", per_query_cap = 0.5 }}
"#,
        dsu = public_key_to_base64(&f.dsu.verifying_key()),
        gone = public_key_to_base64(&f.gone.verifying_key()),
        researcher = public_key_to_base64(&f.researcher.verifying_key()),
        budget = f.dsu_budget,
        cap = f.dsu_budget.min(1.0),
    )
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
        policy_text(&f, "\"planning\", \"direct_care\""),
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
    }
}

pub fn sign(body: QueryBody, key: &SigningKey) -> SignedQuery {
    body.sign(key)
}

pub fn period_label_now(period: phm_policies::model::Period) -> String {
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
