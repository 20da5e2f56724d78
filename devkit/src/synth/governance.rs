//! The paperwork of the synthetic ICS: each partner's IG policy (built from
//! `phm_policies::model` structs), node.toml, and the coordinator's configuration.
//!
//! Every policy declares its dataset's NHS number as the link key and a `[linkage]`
//! block naming the partners it may link with, from one table of pairings
//! ([`LINK_PAIRINGS`]), so that whenever one node lists another as anchor the other
//! lists it back as partner with the datasets swapped.

use super::activity::{DIAGNOSIS_GROUPS, METHODS, PACKAGE_TYPES};
use super::ics::{Org, OrgKind, PLACES};
use super::people::{ETHNICITIES, SEXES, SMOKING};
use crate::questions::RESEARCH_PROJECT;
use phm_policies::model::{
    Budget, Column, ColumnType, Dataset, Domain, Grouping, LinkPartner, LinkRole, Linkage, OptOut,
    Organisation, OrganisationKind, Peers, Period, PolicyFile, Project, ReleaseRules, Requester,
    Rounding, Scope, SecureAggregation, Source, SourceFormat, TotalKind,
};
use std::collections::BTreeMap;

/// The column holding each person's National Data Opt-out flag, in every dataset.
pub const OPT_OUT_COLUMN: &str = "ndopt_out";

/// The column holding the NHS number, every dataset's link key.
pub const LINK_KEY: &str = "nhs_number";

/// Purposes linked questions may serve, at every node.
pub const LINK_PURPOSES: [&str; 2] = ["planning", "research"];

/// Who may link with whom: (anchor, partner). The anchor holds the outer dataset and its
/// group labels; the partner holds the EXISTS dataset. Registrations anchor every
/// pairing they are in (the GP list is the population denominator), and social care
/// anchors the acute trusts (which of its clients were admitted).
pub const LINK_PAIRINGS: [(OrgKind, OrgKind); 4] = [
    (OrgKind::GpPractice, OrgKind::AcuteTrust),
    (OrgKind::GpPractice, OrgKind::SocialCare),
    (OrgKind::GpPractice, OrgKind::LocalAuthority),
    (OrgKind::SocialCare, OrgKind::AcuteTrust),
];

/// The research project's approved columns.
pub const PROJECT_COLUMNS: [&str; 7] = [
    "diabetes",
    "age",
    "sex",
    "imd_quintile",
    "ethnicity",
    "bmi",
    "hba1c",
];

/// The public keys policies pin.
#[derive(Debug, Clone)]
pub struct PolicyKeys {
    /// The two requesters' Ed25519 keys.
    pub dsu: String,
    pub researcher: String,
    /// The IG leads' key that signs the node registry (`[peers] registry_key`).
    pub registry: String,
    /// Each node's public identity line by ODS code (`[[linkage.partners]] node_key`).
    pub nodes: BTreeMap<String, String>,
}

fn col(name: &str, t: ColumnType) -> Column {
    Column {
        name: name.to_string(),
        column_type: t,
        identifier: false,
        filter: false,
        group: Grouping::No,
        aggregate: false,
        never_null: false,
        bounds: None,
        domain: None,
        bin_edges: None,
        min_bin_width: None,
    }
}

fn identifier(name: &str, t: ColumnType) -> Column {
    Column {
        identifier: true,
        ..col(name, t)
    }
}

/// A filterable category column grouped over a declared list of values.
fn category(name: &str, values: &[&str]) -> Column {
    Column {
        filter: true,
        group: Grouping::Declared,
        domain: Some(Domain::Texts(
            values.iter().map(|s| s.to_string()).collect(),
        )),
        ..col(name, ColumnType::Text)
    }
}

fn flag(name: &str) -> Column {
    Column {
        filter: true,
        group: Grouping::Declared,
        domain: Some(Domain::Booleans(vec![false, true])),
        ..col(name, ColumnType::Boolean)
    }
}

fn measure(name: &str, t: ColumnType, bounds: [f64; 2], edges: Option<Vec<f64>>) -> Column {
    Column {
        filter: true,
        aggregate: true,
        group: Grouping::Declared,
        bounds: Some(bounds),
        bin_edges: edges,
        min_bin_width: Some(5.0),
        ..col(name, t)
    }
}

/// Every synthetic record has an age, so the policy says so: AVG(age) then shares the
/// rows-per-key count (load checks the declaration).
fn age() -> Column {
    Column {
        never_null: true,
        ..measure("age", ColumnType::Integer, [0.0, 110.0], None)
    }
}

fn imd() -> Column {
    Column {
        filter: true,
        group: Grouping::Declared,
        domain: Some(Domain::Range("1..5".into())),
        ..col("imd_quintile", ColumnType::Integer)
    }
}

fn opt_out_col() -> Column {
    col(OPT_OUT_COLUMN, ColumnType::Boolean)
}

fn source(dataset: &str) -> Source {
    Source::file(SourceFormat::Parquet, format!("data/{dataset}.parquet"))
}

fn gp_dataset(pcns: &[String]) -> Dataset {
    let pcn_refs: Vec<&str> = pcns.iter().map(String::as_str).collect();
    let mut columns = vec![
        identifier("person_id", ColumnType::Text),
        identifier(LINK_KEY, ColumnType::Text),
        identifier("date_of_birth", ColumnType::Date),
        identifier("postcode", ColumnType::Text),
        age(),
        category("sex", &SEXES),
        category("ethnicity", &ETHNICITIES),
        imd(),
        Column {
            filter: true,
            ..col("lsoa", ColumnType::Text)
        },
        category("place", &PLACES),
        category("pcn", &pcn_refs),
    ];
    for c in [
        "diabetes",
        "hypertension",
        "cvd",
        "copd",
        "asthma",
        "depression",
        "smi",
        "obesity",
    ] {
        columns.push(flag(c));
    }
    columns.extend([
        measure(
            "bmi",
            ColumnType::Real,
            [10.0, 70.0],
            Some(vec![10.0, 18.5, 25.0, 30.0, 35.0, 40.0, 70.0]),
        ),
        // NICE thresholds: <42 normal, 42-47 non-diabetic hyperglycaemia, >=48 diabetes,
        // 53/58 treatment targets, >=75 poorly controlled.
        measure(
            "hba1c",
            ColumnType::Real,
            [20.0, 150.0],
            Some(vec![20.0, 42.0, 48.0, 53.0, 59.0, 75.0, 150.0]),
        ),
        measure(
            "systolic_bp",
            ColumnType::Real,
            [70.0, 250.0],
            Some(vec![70.0, 120.0, 140.0, 160.0, 180.0, 250.0]),
        ),
        category("smoking", &SMOKING),
        opt_out_col(),
    ]);
    Dataset {
        name: "gp_patients".into(),
        source: source("gp_patients"),
        person_id: "person_id".into(),
        max_rows_per_person: 1,
        total_kind: TotalKind::DistinctPeople,
        opt_out_not_applicable: false,
        link_key: Some(LINK_KEY.into()),
        columns,
    }
}

fn acute_dataset() -> Dataset {
    Dataset {
        name: "acute_admissions".into(),
        source: source("acute_admissions"),
        person_id: "person_id".into(),
        max_rows_per_person: super::activity::MAX_ADMISSIONS,
        total_kind: TotalKind::SumOfPartnerCounts,
        opt_out_not_applicable: false,
        link_key: Some(LINK_KEY.into()),
        columns: vec![
            identifier("person_id", ColumnType::Text),
            identifier(LINK_KEY, ColumnType::Text),
            identifier("admission_id", ColumnType::Text),
            Column {
                filter: true,
                ..col("admission_date", ColumnType::Date)
            },
            category("method", &METHODS),
            category("diagnosis_group", &DIAGNOSIS_GROUPS),
            measure(
                "length_of_stay",
                ColumnType::Integer,
                [0.0, 60.0],
                Some(vec![0.0, 1.0, 2.0, 4.0, 8.0, 15.0, 31.0, 60.0]),
            ),
            age(),
            category("sex", &SEXES),
            imd(),
            category("place", &PLACES),
            opt_out_col(),
        ],
    }
}

fn social_care_dataset() -> Dataset {
    Dataset {
        name: "social_care_packages".into(),
        source: source("social_care_packages"),
        person_id: "person_id".into(),
        max_rows_per_person: 3,
        total_kind: TotalKind::SumOfPartnerCounts,
        opt_out_not_applicable: false,
        link_key: Some(LINK_KEY.into()),
        columns: vec![
            identifier("person_id", ColumnType::Text),
            identifier(LINK_KEY, ColumnType::Text),
            category("package_type", &PACKAGE_TYPES),
            measure(
                "weekly_hours",
                ColumnType::Real,
                [0.0, 60.0],
                Some(vec![0.0, 5.0, 10.0, 20.0, 40.0, 60.0]),
            ),
            Column {
                group: Grouping::No,
                min_bin_width: None,
                ..measure("weekly_cost", ColumnType::Real, [0.0, 3_000.0], None)
            },
            age(),
            category("sex", &SEXES),
            imd(),
            category("place", &PLACES),
            opt_out_col(),
        ],
    }
}

fn la_dataset() -> Dataset {
    Dataset {
        name: "la_residents".into(),
        source: source("la_residents"),
        person_id: "person_id".into(),
        max_rows_per_person: 1,
        total_kind: TotalKind::SumOfPartnerCounts,
        opt_out_not_applicable: false,
        link_key: Some(LINK_KEY.into()),
        columns: vec![
            identifier("person_id", ColumnType::Text),
            identifier(LINK_KEY, ColumnType::Text),
            Column {
                filter: true,
                ..col("lsoa", ColumnType::Text)
            },
            imd(),
            // The council's IG lead allows filtering on tenure but not breaking figures
            // down by it: tenure crossed with fuel poverty identifies households on
            // small estates. So GROUP BY housing_tenure is refused.
            Column {
                filter: true,
                ..col("housing_tenure", ColumnType::Text)
            },
            flag("fuel_poverty"),
            age(),
            category("sex", &SEXES),
            category("place", &PLACES),
            opt_out_col(),
        ],
    }
}

fn organisation_kind(k: OrgKind) -> OrganisationKind {
    match k {
        OrgKind::GpPractice => OrganisationKind::GpPractice,
        OrgKind::AcuteTrust => OrganisationKind::AcuteTrust,
        OrgKind::SocialCare => OrganisationKind::SocialCare,
        OrgKind::LocalAuthority => OrganisationKind::LocalAuthority,
    }
}

fn dsu(dataset: &str, key: &str) -> Requester {
    Requester {
        id: "dsu".into(),
        organisation: "Riverside and Wolds ICB Decision Support Unit".into(),
        role: "analyst".into(),
        public_key: key.to_string(),
        purposes: vec!["planning".into(), "direct_care".into()],
        datasets: vec![dataset.to_string()],
        budget: Budget {
            epsilon: 20.0,
            period: Period::Month,
            per_query_cap: 1.0,
            delta: phm_policies::model::DEFAULT_BUDGET_DELTA,
        },
        revoked: false,
        // The DSU asks the linked planning questions (GP x acute, social care x acute).
        linked_queries: true,
    }
}

fn researcher(key: &str) -> Requester {
    Requester {
        id: "researcher".into(),
        organisation: "University of Riverside, Institute of Population Health".into(),
        role: "researcher".into(),
        public_key: key.to_string(),
        purposes: vec!["research".into()],
        datasets: vec!["gp_patients".into()],
        budget: Budget {
            epsilon: 6.0,
            period: Period::Quarter,
            per_query_cap: 1.0,
            delta: phm_policies::model::DEFAULT_BUDGET_DELTA,
        },
        revoked: false,
        // Linked research goes through the approved project, not the researcher alone.
        linked_queries: false,
    }
}

fn research_project() -> Result<Project, String> {
    let expires: toml::value::Datetime = "2027-06-30"
        .parse()
        .map_err(|e| format!("project expiry date: {e}"))?;
    Ok(Project {
        id: RESEARCH_PROJECT.into(),
        approval_ref: "IRAS 334455; Riverside and Wolds ICS Data Access Committee DAC-2026-07"
            .into(),
        // The lead must be one of the project's requesters.
        lead: "researcher".into(),
        requesters: vec!["researcher".into()],
        datasets: vec!["gp_patients".into()],
        columns: PROJECT_COLUMNS.iter().map(|s| s.to_string()).collect(),
        expires,
        budget: Budget {
            epsilon: 4.0,
            period: Period::Quarter,
            per_query_cap: 1.0,
            delta: phm_policies::model::DEFAULT_BUDGET_DELTA,
        },
        // The Data Access Committee approved linkage for this project.
        linked_queries: true,
    })
}

/// The roles `me` may take with `other` under [`LINK_PAIRINGS`] (empty: no pairing).
pub fn link_roles(me: OrgKind, other: OrgKind) -> Vec<LinkRole> {
    let mut roles = Vec::new();
    if LINK_PAIRINGS.contains(&(me, other)) {
        roles.push(LinkRole::Anchor);
    }
    if LINK_PAIRINGS.contains(&(other, me)) {
        roles.push(LinkRole::Partner);
    }
    roles
}

/// `org`'s `[linkage]` block: one `[[linkage.partners]]` entry per organisation of
/// `federation` it is paired with, pinned to that node's identity where `node_keys`
/// has it.
fn linkage(org: &Org, federation: &[Org], node_keys: &BTreeMap<String, String>) -> Linkage {
    let partners = federation
        .iter()
        .filter(|other| other.ods_code != org.ods_code)
        .filter_map(|other| {
            let roles = link_roles(org.kind, other.kind);
            (!roles.is_empty()).then(|| LinkPartner {
                ods_code: other.ods_code.clone(),
                node_key: node_keys.get(&other.ods_code).cloned(),
                our_datasets: vec![org.dataset.clone()],
                their_datasets: vec![other.dataset.clone()],
                roles,
            })
        })
        .collect();
    Linkage {
        purposes: LINK_PURPOSES.iter().map(|s| s.to_string()).collect(),
        max_set_size: phm_policies::model::DEFAULT_MAX_SET_SIZE,
        partners,
    }
}

/// The IG policy of one partner of `federation` (every organisation that runs a node).
pub fn policy(
    org: &Org,
    pcns: &[String],
    keys: &PolicyKeys,
    federation: &[Org],
) -> Result<PolicyFile, String> {
    // The language's defaults (small-number suppression at 7, rounding to 5, the
    // discrete Laplace, ...), written out in full in the policy file.
    let mut release = ReleaseRules::default();
    let mut requesters = vec![dsu(&org.dataset, &keys.dsu)];
    let mut projects = Vec::new();
    let dataset = match org.kind {
        OrgKind::GpPractice => {
            requesters.push(researcher(&keys.researcher));
            projects.push(research_project()?);
            gp_dataset(pcns)
        }
        OrgKind::AcuteTrust => {
            // Wolds and Coast's board allows its figures only inside system totals.
            if org.ods_code == "RW2" {
                release.scope = Scope::SystemTotalOnly;
            }
            acute_dataset()
        }
        OrgKind::SocialCare => {
            release.min_reportable_count = 10.0;
            social_care_dataset()
        }
        OrgKind::LocalAuthority => {
            release.rounding = Rounding::Nearest10;
            la_dataset()
        }
    };
    Ok(PolicyFile {
        version: 1,
        organisation: Organisation {
            ods_code: org.ods_code.clone(),
            name: org.name.clone(),
            kind: organisation_kind(org.kind),
            place: org.place.clone(),
            pcn: org.pcn.clone(),
            registered_population: org.registered_population,
        },
        release,
        opt_out: Some(OptOut {
            column: OPT_OUT_COLUMN.into(),
            purposes: vec!["planning".into(), "research".into()],
        }),
        datasets: vec![dataset],
        requesters,
        projects,
        peers: Some(Peers {
            registry_key: keys.registry.clone(),
        }),
        linkage: Some(linkage(org, federation, &keys.nodes)),
        // GP practices take part in secure system totals. A synthetic ICS has as few as
        // six practices, so the cohort floor is five rather than the language's ten.
        secure_aggregation: (org.kind == OrgKind::GpPractice).then_some(SecureAggregation {
            require: false,
            min_cohort: 5,
            min_survivors: 0.8,
            assumed_noiseless_peers: 0,
        }),
    })
}

/// policy.toml text, with a header saying what it is.
pub fn policy_toml(org: &Org, policy: &PolicyFile) -> Result<String, String> {
    let body = toml::to_string(policy).map_err(|e| format!("policy for {}: {e}", org.ods_code))?;
    Ok(format!(
        "# IG policy of {} ({}), synthetic ICS.\n# Written by `phm synth`; check with `phm policy check`.\n\n{body}",
        org.name, org.ods_code
    ))
}

fn quote(s: &str) -> String {
    // TOML basic strings share JSON's escapes for everything we write.
    serde_json::Value::String(s.to_string()).to_string()
}

pub fn node_toml(org: &Org, port: u16) -> String {
    format!(
        "# Node of {name} ({ods}); written by `phm synth`. Paths are relative to this file.\n\
         federation_id = {federation}\n\
         policy = \"policy.toml\"\n\
         data_dir = \"state\"\n\
         listen = \"127.0.0.1:{port}\"\n\
         log_format = \"human\"\n\
         \n\
         [tls]\n\
         cert = \"../certs/{ods}.pem\"\n\
         key = \"../certs/{ods}.key\"\n\
         # The infrastructure CA only: analysts' certificates (people CA) cannot even\n\
         # complete a handshake with this node.\n\
         client_ca = \"../certs/{infra_ca}.pem\"\n\
         # The one client this node answers: the coordinator's relay identity.\n\
         allowed_clients = [\"san:{relay}\"]\n\
         \n\
         # This node's identity and the federation's node registry, for linked and\n\
         # secure queries (the policy pins the registry's signing key).\n\
         [peer]\n\
         identity = \"../peer/{ods}.identity\"\n\
         registry = \"../peer/registry.toml\"\n",
        name = org.name,
        ods = org.ods_code,
        federation = quote(super::FEDERATION_ID),
        infra_ca = crate::pki::INFRA_CA,
        relay = super::COORDINATOR_CLIENT_CERT,
    )
}

pub fn coordinator_toml(
    orgs: &[(Org, u16)],
    port: u16,
    requesters: &std::collections::BTreeMap<String, String>,
    registry_key: &str,
) -> String {
    let mut s = format!(
        "# ICS coordinator of the synthetic ICS; written by `phm synth`.\n\
         federation_id = {federation}\n\
         listen = \"127.0.0.1:{port}\"\n\
         data_dir = \"state\"\n\
         node_deadline_ms = 30000\n\
         log_format = \"human\"\n\
         \n\
         [tls]\n\
         cert = \"../certs/coordinator.pem\"\n\
         key = \"../certs/coordinator.key\"\n\
         # Analysts' and researchers' certificates come from the people CA.\n\
         client_ca = \"../certs/{people_ca}.pem\"\n\
         \n\
         # The identity every node pins; infrastructure CA, like the nodes' certificates.\n\
         [client_tls]\n\
         cert = \"../certs/{relay}.pem\"\n\
         key = \"../certs/{relay}.key\"\n\
         ca = \"../certs/{infra_ca}.pem\"\n\
         \n\
         # GP registrations: every person belongs to one practice, so practice counts add up\n\
         # to distinct people. The other datasets can hold one person at several partners.\n\
         [datasets.gp_patients]\n\
         total_kind = \"distinct_people\"\n\
         \n\
         [datasets.acute_admissions]\n\
         total_kind = \"sum_of_partner_counts\"\n\
         \n\
         [datasets.social_care_packages]\n\
         total_kind = \"sum_of_partner_counts\"\n\
         \n\
         [datasets.la_residents]\n\
         total_kind = \"sum_of_partner_counts\"\n",
        federation = quote(super::FEDERATION_ID),
        people_ca = crate::pki::PEOPLE_CA,
        infra_ca = crate::pki::INFRA_CA,
        relay = super::COORDINATOR_CLIENT_CERT,
    );
    for (org, node_port) in orgs {
        s.push_str(&format!(
            "\n[[nodes]]\nid = {ods}\nods_code = {ods}\nname = {name}\nkind = {kind}\n",
            ods = quote(&org.ods_code),
            name = quote(&org.name),
            kind = quote(org.kind.as_str()),
        ));
        if let Some(place) = &org.place {
            s.push_str(&format!("place = {}\n", quote(place)));
        }
        if let Some(pcn) = &org.pcn {
            s.push_str(&format!("pcn = {}\n", quote(pcn)));
        }
        s.push_str(&format!(
            "endpoint = \"https://127.0.0.1:{node_port}\"\ntls_server_name = \"localhost\"\ndatasets = [{}]\n",
            quote(&org.dataset)
        ));
    }
    if !registry_key.is_empty() {
        // Secure queries: the registry the coordinator relays to every member (each
        // verifies it under the key its own policy pins). Six practices cannot lose one
        // at 0.9; 0.8 lets a session survive one dropout.
        s.push_str(&format!(
            "\n[secure_aggregation]\nregistry = \"../peer/registry.toml\"\nregistry_key = {}\nmin_survivors = 0.8\nround_timeout_ms = 30000\n",
            quote(registry_key)
        ));
    }
    // The requester directory: Submit and GetResult verify requesters' signatures
    // with these keys, so a stored result goes back only to whoever asked for it.
    for (id, key) in requesters {
        s.push_str(&format!(
            "\n[[requesters]]\nid = {}\npublic_key = {}\n",
            quote(id),
            quote(key)
        ));
    }
    s
}

#[cfg(test)]
mod config_tests {
    use super::*;
    use std::path::Path;

    fn trust() -> Org {
        Org {
            ods_code: "RW2".into(),
            name: "Wolds and Coast Hospitals".into(),
            kind: OrgKind::AcuteTrust,
            place: Some("Coast".into()),
            pcn: None,
            dataset: "acute_admissions".into(),
            registered_population: None,
        }
    }

    #[test]
    fn node_toml_pins_the_coordinator_and_trusts_only_the_infrastructure_ca() {
        let text = node_toml(&trust(), 50052);
        let c = phm_node::config::NodeConfig::parse(Path::new("/ics/RW2/node.toml"), &text)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(c.federation_id, super::super::FEDERATION_ID);
        assert_eq!(c.tls.client_ca, Path::new("/ics/RW2/../certs/ca.pem"));
        assert_eq!(
            c.tls.allowed_clients,
            vec![phm_node::config::ClientPin::San(
                super::super::COORDINATOR_CLIENT_CERT.into()
            )]
        );
    }

    #[test]
    fn coordinator_toml_trusts_the_people_ca_and_relays_as_the_pinned_identity() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().join("certs");
        std::fs::create_dir_all(&certs).unwrap();
        for f in [
            "coordinator.pem",
            "coordinator.key",
            "coordinator-client.pem",
            "coordinator-client.key",
            "ca.pem",
            "people-ca.pem",
        ] {
            std::fs::write(certs.join(f), "-----BEGIN X-----\nMA==\n-----END X-----\n").unwrap();
        }
        let cdir = dir.path().join("coordinator");
        std::fs::create_dir_all(&cdir).unwrap();
        let text = coordinator_toml(&[(trust(), 50052)], 50050, &Default::default(), "");
        let c = phm_coordinator::config::Config::from_toml(&text, &cdir.join("c.toml"), &cdir)
            .unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(c.federation_id, super::super::FEDERATION_ID);
        assert!(c.tls.client_ca.ends_with("certs/people-ca.pem"));
        assert!(c.client_tls.cert.ends_with("certs/coordinator-client.pem"));
        assert!(c.client_tls.ca.ends_with("certs/ca.pem"));
    }
}
