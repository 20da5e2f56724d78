//! The policy file's data model, exactly as an IG lead writes it in TOML.
//! Unknown fields are refused: a misspelt rule must never be silently ignored.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// The whole policy file of one node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Format version of the policy language; only 1 exists today.
    pub version: u32,
    pub organisation: Organisation,
    #[serde(default)]
    pub release: ReleaseRules,
    /// National Data Opt-out handling. Absent means the data holds no opted-out
    /// patients (the node then refuses planning and research queries on datasets
    /// with patient rows unless `opt_out_not_applicable` is set on the dataset).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opt_out: Option<OptOut>,
    #[serde(default)]
    pub datasets: Vec<Dataset>,
    #[serde(default)]
    pub requesters: Vec<Requester>,
    #[serde(default)]
    pub projects: Vec<Project>,
    /// The federation's node registry this node trusts for linked and secure queries.
    /// Absent: this node takes part in none (it talks to other nodes only through
    /// sealed frames, and trusts only nodes that registry lists).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peers: Option<Peers>,
    /// Linked questions across partners (DH-PSI on the NHS number through the
    /// coordinator). Absent: every linked query is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub linkage: Option<Linkage>,
    /// Secure aggregation (SECURE_SUM queries): this node adds a share of the noise
    /// and the coordinator learns only the system total. Absent: every secure query is
    /// refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secure_aggregation: Option<SecureAggregation>,
}

fn default_min_cohort() -> u32 {
    10
}

fn default_min_survivors() -> f64 {
    0.9
}

/// When this node joins a secure-aggregation session (secagg/PROTOCOL.md). Each rule is
/// checked by the node itself against what the coordinator announces, so a coordinator
/// cannot talk it into a smaller cohort or a thinner noise share.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecureAggregation {
    /// Answer only secure queries: a plain query over this node's datasets is refused,
    /// so no figure of this partner's own is ever released (what a
    /// `system_total_only` partner usually wants). Default false.
    #[serde(default)]
    pub require: bool,
    /// Smallest cohort this node joins (default 10). With two members each can subtract
    /// its own input from the total; the cohort is what hides each partner's figure.
    #[serde(default = "default_min_cohort")]
    pub min_cohort: u32,
    /// The session's noise must hold with only this fraction of the cohort surviving
    /// (t_noise ≥ ⌈min_survivors · N⌉; default 0.9): the dropout tolerance.
    #[serde(default = "default_min_survivors")]
    pub min_survivors: f64,
    /// Members assumed to collude with the coordinator and add no noise (default 0).
    #[serde(default)]
    pub assumed_noiseless_peers: u32,
}

/// Default `linkage.max_set_size`: the most real people this node puts in one set.
pub const DEFAULT_MAX_SET_SIZE: u64 = 2_000_000;

fn default_max_set_size() -> u64 {
    DEFAULT_MAX_SET_SIZE
}

/// What linked questions this node takes part in. Default deny: a pairing is allowed
/// only when a `[[linkage.partners]]` entry names the other organisation, both
/// datasets and this node's role, the purpose is listed here, and the requester (or
/// research project) has `linked_queries = true`. The other node decides its own side
/// under its own policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Linkage {
    /// Purposes linked questions may serve: planning, research (never direct_care,
    /// which has no business with a population count).
    pub purposes: Vec<String>,
    /// Most real people this node will put in one linkage set; a bigger cohort is
    /// refused before anything is sent.
    #[serde(default = "default_max_set_size")]
    pub max_set_size: u64,
    #[serde(default)]
    pub partners: Vec<LinkPartner>,
}

/// This node's side of a linked question.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LinkRole {
    /// Holds the outer dataset (`FROM ... g`) and its group labels; learns only noisy
    /// linked counts.
    Anchor,
    /// Holds the EXISTS dataset; blinds its set and adds the noise; learns no count.
    Partner,
}

impl LinkRole {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkRole::Anchor => "anchor",
            LinkRole::Partner => "partner",
        }
    }
}

/// One organisation this node may link with.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LinkPartner {
    /// The other organisation's ODS code, as the signed node registry lists it.
    pub ods_code: String,
    /// Optional extra pin of the other node's public identity (the `phm-node/v1 ...`
    /// line of its `.pub` file): when set, a registry listing another key for this
    /// organisation is refused, so even the registry signers cannot swap it silently.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_key: Option<String>,
    /// This node's datasets that may be linked with this partner.
    pub our_datasets: Vec<String>,
    /// The partner's datasets they may be linked with.
    pub their_datasets: Vec<String>,
    /// The roles this node may take with this partner.
    pub roles: Vec<LinkRole>,
}

/// Which other nodes this node will exchange sealed frames with, for linked and
/// secure queries: those the federation's node registry lists, when that registry is
/// signed by the key pinned here. The key belongs to the IG leads (who sign the
/// registry with `phm registry sign`), not to the coordinator's operator: a
/// coordinator that could add nodes to the registry could pose as a partner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Peers {
    /// Base64 Ed25519 public key that signs the node registry (the line
    /// `phm keys new` prints for the IG leads' registry key).
    pub registry_key: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OrganisationKind {
    GpPractice,
    AcuteTrust,
    CommunityTrust,
    MentalHealthTrust,
    SocialCare,
    LocalAuthority,
    Other,
}

impl OrganisationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OrganisationKind::GpPractice => "gp_practice",
            OrganisationKind::AcuteTrust => "acute_trust",
            OrganisationKind::CommunityTrust => "community_trust",
            OrganisationKind::MentalHealthTrust => "mental_health_trust",
            OrganisationKind::SocialCare => "social_care",
            OrganisationKind::LocalAuthority => "local_authority",
            OrganisationKind::Other => "other",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Organisation {
    /// ODS code, e.g. "A81001" for a practice or "RXF" for a trust.
    pub ods_code: String,
    pub name: String,
    pub kind: OrganisationKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub place: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pcn: Option<String>,
    /// Published registered population (e.g. the GP list size NHS England publishes
    /// monthly). Public, so reporting it costs no privacy budget; used for coverage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registered_population: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Rounding {
    None,
    /// Round to the nearest 5 (NHS Digital / OpenSAFELY default). Also accepted
    /// as "nearest_5", the spelling these docs use.
    #[serde(alias = "nearest_5")]
    Nearest5,
    #[serde(alias = "nearest_10")]
    Nearest10,
    /// OpenSAFELY "midpoint 6": values become the midpoint of 6-wide bands.
    #[serde(alias = "midpoint_6")]
    Midpoint6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// This organisation's figures may be shown on their own.
    Standalone,
    /// Only inside a system-level total.
    SystemTotalOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mechanism {
    /// OpenDP discrete Laplace, pure epsilon-DP.
    DiscreteLaplace,
    /// OpenDP discrete Gaussian under zCDP, converted to (epsilon, delta).
    DiscreteGaussian,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct ReleaseRules {
    /// Cells whose noisy value is at or below this are suppressed. Default 7.
    pub min_reportable_count: f64,
    /// Default nearest_5.
    pub rounding: Rounding,
    /// Default standalone.
    pub scope: Scope,
    /// No single query may spend more than this at this node. Default 1.0.
    pub per_query_epsilon_cap: f64,
    /// Default discrete_laplace.
    pub mechanism: Mechanism,
    /// Delta for mechanisms that need it (Gaussian, thresholding). Default 1e-9.
    pub delta: f64,
    /// Most group cells one query may ask for (product of group-key domain sizes),
    /// which limits isolating individuals by combining quasi-identifiers. Default 500.
    pub max_group_cells: u64,
    /// How long a signed query stays valid after it was issued, in seconds. Default 300.
    pub query_validity_seconds: u64,
    /// Least epsilon a thresholded query may give to key selection (its share:
    /// epsilon / (aggregates + 1)). Below it the threshold is set almost entirely by
    /// delta, and many near-free queries would each release a rare key with
    /// probability about delta. Default 0.01.
    pub min_threshold_epsilon: f64,
}

impl Default for ReleaseRules {
    fn default() -> Self {
        ReleaseRules {
            min_reportable_count: 7.0,
            rounding: Rounding::Nearest5,
            scope: Scope::Standalone,
            per_query_epsilon_cap: 1.0,
            mechanism: Mechanism::DiscreteLaplace,
            delta: 1e-9,
            max_group_cells: 500,
            query_validity_seconds: 300,
            min_threshold_epsilon: 0.01,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct OptOut {
    /// Boolean column, true for patients who opted out (present in every dataset
    /// unless the dataset says `opt_out_not_applicable`).
    pub column: String,
    /// Purposes the opt-out applies to. Default planning and research.
    #[serde(default = "default_opt_out_purposes")]
    pub purposes: Vec<String>,
}

fn default_opt_out_purposes() -> Vec<String> {
    vec!["planning".into(), "research".into()]
}

/// The two file formats a node reads with DataFusion.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum SourceFormat {
    Parquet,
    Csv,
}

/// Where a dataset's rows are: a file the node reads, or a relation in a SQL warehouse
/// the node queries in place (only aggregate rows come back). Written as a TOML table
/// whose `format` says which.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "format", rename_all = "snake_case", deny_unknown_fields)]
pub enum Source {
    Parquet {
        /// File path, relative to the policy file's folder unless absolute.
        path: String,
    },
    Csv {
        /// File path, relative to the policy file's folder unless absolute.
        path: String,
    },
    /// A table or view in PostgreSQL.
    Postgres(Warehouse),
    /// A FHIR Bulk Data export (NDJSON), flattened by declared views.
    FhirNdjson(FhirExport),
}

impl Source {
    /// A file source.
    pub fn file(format: SourceFormat, path: impl Into<String>) -> Source {
        let path = path.into();
        match format {
            SourceFormat::Parquet => Source::Parquet { path },
            SourceFormat::Csv => Source::Csv { path },
        }
    }

    /// The file format and path, for a file source.
    pub fn file_path(&self) -> Option<(SourceFormat, &str)> {
        match self {
            Source::Parquet { path } => Some((SourceFormat::Parquet, path)),
            Source::Csv { path } => Some((SourceFormat::Csv, path)),
            Source::Postgres(_) | Source::FhirNdjson(_) => None,
        }
    }

    /// The warehouse, for a warehouse source.
    pub fn warehouse(&self) -> Option<&Warehouse> {
        match self {
            Source::Postgres(w) => Some(w),
            _ => None,
        }
    }
}

/// A FHIR Bulk Data export the node reads into memory at load: the NDJSON files of
/// Patient, Condition, Observation, Encounter (or any) resources, each flattened into a
/// table by a view in a subset of SQL-on-FHIR v2's ViewDefinition, then shaped into the
/// dataset's rows by an optional SQL query over those tables (joins, code mappings,
/// ages). Every resource a view drops is counted by reason in the load report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FhirExport {
    /// The export's manifest (`$export`'s completion JSON); its `output` entries name the
    /// NDJSON files. Give `manifest` or `files`, not both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub manifest: Option<String>,
    /// NDJSON files, or folders whose `*.ndjson` files are all read.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<String>,
    /// ViewDefinition JSON files, one table each (named by the view's `name`).
    pub views: Vec<String>,
    /// A SQL file whose one SELECT over the views' tables gives the dataset's rows.
    /// Without it there must be one view, and its table is the dataset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
}

/// A relation in a SQL warehouse. The connection string (host, database, role,
/// password) is never written in the policy: it comes from an environment variable or
/// a secret file the node's operator provides, so the policy can be published.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Warehouse {
    /// The table or view, `name` or `schema.name`, each part a plain SQL identifier
    /// (letters, digits, underscores; not starting with a digit).
    pub relation: String,
    /// Environment variable holding the connection string (libpq key/value or URL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsn_env: Option<String>,
    /// File holding the connection string, relative to the policy file's folder
    /// unless absolute (a mounted secret, say).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dsn_file: Option<String>,
    /// PEM file of the certificate authorities the server's TLS certificate must chain
    /// to, relative to the policy file's folder unless absolute. Required when the
    /// connection string says `sslmode=require` (or stronger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<String>,
    /// Longest one statement may run before the server cancels it.
    #[serde(default = "default_statement_timeout")]
    pub statement_timeout_seconds: u32,
}

fn default_statement_timeout() -> u32 {
    300
}

/// How the system total of this dataset across partners should be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum TotalKind {
    /// Each person belongs to exactly one partner (e.g. GP registration).
    DistinctPeople,
    /// A person may appear at several partners (e.g. admissions at two trusts). The
    /// default, and the fail-closed reading.
    #[default]
    SumOfPartnerCounts,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Dataset {
    /// Logical name shared across the federation, e.g. "gp_patients".
    pub name: String,
    pub source: Source,
    /// Column holding the pseudonymous person id (the privacy unit).
    pub person_id: String,
    /// Most rows one person may contribute; extra rows are dropped at random.
    pub max_rows_per_person: u32,
    #[serde(default = "default_total_kind")]
    pub total_kind: TotalKind,
    /// Set when this dataset cannot contain opted-out patients' rows.
    #[serde(default)]
    pub opt_out_not_applicable: bool,
    /// The column holding the NHS number this dataset links on (`person` in a linked
    /// query). It must be a text column marked `identifier = true`: it is read only to
    /// build blinded linkage sets, never filtered, grouped or released. Absent: the
    /// dataset cannot be linked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_key: Option<String>,
    pub columns: Vec<Column>,
}

fn default_total_kind() -> TotalKind {
    TotalKind::SumOfPartnerCounts
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ColumnType {
    Integer,
    Real,
    Text,
    Boolean,
    /// ISO date, YYYY-MM-DD.
    Date,
}

impl ColumnType {
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnType::Integer => "integer",
            ColumnType::Real => "real",
            ColumnType::Text => "text",
            ColumnType::Boolean => "boolean",
            ColumnType::Date => "date",
        }
    }

    pub fn is_numeric(self) -> bool {
        matches!(self, ColumnType::Integer | ColumnType::Real)
    }
}

/// How a column may be grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Grouping {
    /// Not a group key.
    No,
    /// Group over the declared `domain` (or `bin_edges`/bounds for numbers): every
    /// declared key is released, zeros included.
    Declared,
    /// Group over observed keys, kept only if they pass DP thresholding.
    Threshold,
}

/// A declared category domain: a list of values, or an integer range "1..5".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum Domain {
    /// Inclusive integer range written as "1..5".
    Range(String),
    Integers(Vec<i64>),
    Texts(Vec<String>),
    Booleans(Vec<bool>),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Column {
    pub name: String,
    #[serde(rename = "type")]
    pub column_type: ColumnType,
    /// Identifier columns (NHS number, postcode, date of birth, the person id) can
    /// never be filtered, grouped or aggregated, whatever else is written.
    #[serde(default)]
    pub identifier: bool,
    #[serde(default)]
    pub filter: bool,
    #[serde(default = "default_grouping")]
    pub group: Grouping,
    #[serde(default)]
    pub aggregate: bool,
    /// The column has a value in every row. Load checks it (a NULL or NaN refuses the
    /// file), and AVG over it then shares the rows-per-key count instead of noising its
    /// own count of values (see `measures`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub never_null: bool,
    /// Clamping bounds [lower, upper] for numeric columns that are aggregated or
    /// binned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounds: Option<[f64; 2]>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<Domain>,
    /// Explicit bin edges for numeric group keys (GROUP BY col uses these bins).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bin_edges: Option<Vec<f64>>,
    /// Narrowest width allowed in `bin(col, width)`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_bin_width: Option<f64>,
}

fn default_grouping() -> Grouping {
    Grouping::No
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Period {
    Day,
    Month,
    Quarter,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Day => "day",
            Period::Month => "month",
            Period::Quarter => "quarter",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// Total epsilon per period.
    pub epsilon: f64,
    pub period: Period,
    /// Most epsilon one query may spend from this budget.
    pub per_query_cap: f64,
    /// Total delta per period: every thresholded query spends the policy's
    /// `release.delta`, and Gaussian releases spend it once per period for their
    /// zCDP conversion. Default 1e-6 (a thousand thresholded queries per period at
    /// the default release delta of 1e-9).
    #[serde(default = "default_budget_delta")]
    pub delta: f64,
}

/// Default delta budget per period.
pub const DEFAULT_BUDGET_DELTA: f64 = 1e-6;

fn default_budget_delta() -> f64 {
    DEFAULT_BUDGET_DELTA
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Requester {
    pub id: String,
    pub organisation: String,
    pub role: String,
    /// Ed25519 public key, standard base64 of the 32 raw bytes (`phm keys new`).
    pub public_key: String,
    /// Any of direct_care, planning, research.
    pub purposes: Vec<String>,
    pub datasets: Vec<String>,
    pub budget: Budget,
    /// A revoked requester is refused, whatever its signature.
    #[serde(default)]
    pub revoked: bool,
    /// May ask linked questions (default false).
    #[serde(default)]
    pub linked_queries: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Project {
    pub id: String,
    /// e.g. the REC/IRAS or data-access committee reference.
    pub approval_ref: String,
    pub lead: String,
    /// Requester ids allowed to query under this project.
    pub requesters: Vec<String>,
    pub datasets: Vec<String>,
    /// Columns the project may touch (in any approved dataset).
    pub columns: Vec<String>,
    /// Last day of approval: a TOML date, YYYY-MM-DD.
    #[schemars(with = "String")]
    pub expires: toml::value::Datetime,
    pub budget: Budget,
    /// Linked questions are approved for this project (default false).
    #[serde(default)]
    pub linked_queries: bool,
}

// The policy language's schema-carrying enums convert into the one result model that
// answers carry on the wire.

impl From<Scope> for phm_proto::result::Scope {
    fn from(s: Scope) -> Self {
        match s {
            Scope::Standalone => phm_proto::result::Scope::Standalone,
            Scope::SystemTotalOnly => phm_proto::result::Scope::SystemTotalOnly,
        }
    }
}

impl From<Mechanism> for phm_proto::result::Mechanism {
    fn from(m: Mechanism) -> Self {
        match m {
            Mechanism::DiscreteLaplace => phm_proto::result::Mechanism::DiscreteLaplace,
            Mechanism::DiscreteGaussian => phm_proto::result::Mechanism::DiscreteGaussian,
        }
    }
}

impl From<TotalKind> for phm_proto::result::TotalKind {
    fn from(k: TotalKind) -> Self {
        match k {
            TotalKind::DistinctPeople => phm_proto::result::TotalKind::DistinctPeople,
            TotalKind::SumOfPartnerCounts => phm_proto::result::TotalKind::SumOfPartnerCounts,
        }
    }
}
