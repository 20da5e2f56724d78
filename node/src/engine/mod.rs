//! Differentially private aggregate engine: loads each dataset the policy declares into
//! DataFusion, runs one allowed query under exactly the `Limits` the policy decided, and
//! releases OpenDP-noised, post-processed cells with honest uncertainty.
//!
//! Pipeline for one query (all relational work inside DataFusion, so it scales to tens
//! of millions of rows): opt-out exclusion → filter → per-person contribution bounding →
//! clamping → grouping over the declared domain (or DP thresholding of observed keys) →
//! OpenDP noise calibrated to the bounded sensitivity → rounding and suppression.

mod bound;
mod clamp;
mod cohort;
pub mod fhir;
mod filter;
mod load;
mod noise;
mod plan;
mod post;
#[cfg(any(test, feature = "bench"))]
pub mod privacy_audit;
mod secure;
mod warehouse;

#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::Path;

use datafusion::prelude::SessionContext;
use phm_policies::Limits;
use phm_policies::model::ColumnType;

pub use cohort::AnchorSide;
pub use load::DataError;
pub use noise::LinkLaplace;
/// Bounding plans the benchmark compares (`Auto` is what a node runs).
#[cfg(feature = "bench")]
pub use plan::Bounding as BenchBounding;
pub use plan::Statements;
pub use post::{LinkedRules, release_linked, stricter_rounding};
pub use secure::{Coordinate, Part, SecureInput, SecureLayout, noisy_share};
pub use warehouse::WarehouseError;

/// The node's query engine: one DataFusion session with every dataset registered.
pub struct Engine {
    ctx: SessionContext,
    datasets: HashMap<String, load::LoadedDataset>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut names: Vec<&String> = self.datasets.keys().collect();
        names.sort();
        f.debug_struct("Engine").field("datasets", &names).finish()
    }
}

pub use phm_proto::result::{Cell, MeanParts, Release, Row};

/// Why a query could not be answered. Nothing is released when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("dataset `{0}` is not loaded on this node")]
    UnknownDataset(String),
    #[error("dataset `{dataset}` has no column `{column}`")]
    UnknownColumn { dataset: String, column: String },
    #[error("column `{column}` is {expected}: the value {value} cannot be compared with it")]
    BadLiteral {
        column: String,
        value: String,
        expected: &'static str,
    },
    #[error("the query's limits are unusable: {0}")]
    InvalidLimits(String),
    #[error("query execution failed: {0}")]
    Query(#[from] datafusion::error::DataFusionError),
    #[error("noise mechanism failed: {0}")]
    Noise(String),
    #[error("privacy loss {spent} would exceed the query's epsilon {limit}; nothing released")]
    BudgetOverrun { spent: f64, limit: f64 },
    /// Deliberately one fixed sentence with no figure from the data: it is decided on
    /// the filtered data after the spend (see `plan`).
    #[error(
        "this query has too many groups to release; group by fewer or coarser columns, or narrow the filter"
    )]
    TooManyGroups,
    /// A fixed-point sum could not be kept exact (a cell held more values than a node
    /// sums exactly); nothing is released rather than a wrapped or rounded sum.
    #[error("a sum in this query cannot be computed exactly; nothing released")]
    SumOverflow,
    #[error("the operating system's random generator failed ({0}); nothing released")]
    Randomness(String),
    #[error("{0}")]
    Warehouse(#[from] WarehouseError),
}

impl Engine {
    /// Load and validate every dataset the policy declares. `base_dir` is the policy
    /// file's folder (source paths are relative to it unless absolute). A missing file,
    /// missing column, wrong type, or a value outside a declared domain (or outside the
    /// bounds of a numeric group key) is a `DataError` naming file, column and the first
    /// offending row (1-based).
    pub async fn load(
        policy: &phm_policies::PolicyFile,
        base_dir: &Path,
    ) -> Result<Engine, DataError> {
        let ctx = SessionContext::new();
        let mut datasets = HashMap::new();
        let opt_out = policy.opt_out.as_ref().map(|o| o.column.as_str());
        for ds in &policy.datasets {
            let loaded = load::load_dataset(&ctx, ds, opt_out, base_dir).await?;
            datasets.insert(ds.name.clone(), loaded);
        }
        Ok(Engine { ctx, datasets })
    }

    /// Run one query the policy allowed, under exactly `limits`. Adds OpenDP noise.
    pub async fn execute(
        &self,
        query: &phm_proto::QueryBody,
        limits: &Limits,
    ) -> Result<Release, EngineError> {
        self.run(query, limits, true, &mut Statements::new()).await
    }

    /// [`Engine::execute`], recording in `sent` the text of each statement sent to a
    /// warehouse (for the audit log; nothing for a file source), whether or not the
    /// query then succeeds.
    pub async fn execute_recorded(
        &self,
        query: &phm_proto::QueryBody,
        limits: &Limits,
        sent: &mut Statements,
    ) -> Result<Release, EngineError> {
        self.run(query, limits, true, sent).await
    }

    /// The same pipeline without noise or suppression, for tests and benchmarks only:
    /// not in a production build (`--features bench` for the benchmark), so no caller
    /// there can release exact figures.
    #[cfg(any(test, feature = "bench"))]
    pub async fn execute_exact(
        &self,
        query: &phm_proto::QueryBody,
        limits: &Limits,
    ) -> Result<Release, EngineError> {
        self.run(query, limits, false, &mut Statements::new()).await
    }

    /// [`Engine::execute_exact`] under a chosen bounding plan, for the bounding
    /// benchmark (`--features bench`).
    #[cfg(feature = "bench")]
    pub async fn execute_exact_bounded(
        &self,
        query: &phm_proto::QueryBody,
        limits: &Limits,
        how: BenchBounding,
    ) -> Result<Release, EngineError> {
        let ds = self.dataset(limits)?;
        let mut sent = Statements::new();
        let exact =
            plan::run_exact_with(&self.ctx, ds, query.filter.as_ref(), limits, how, &mut sent)
                .await?;
        Ok(post::release_exact(exact, limits))
    }

    /// How many people load found over the dataset's `max_rows_per_person`, for the
    /// bounding benchmark's table.
    #[cfg(feature = "bench")]
    pub fn people_over_limit(&self, dataset: &str) -> Option<usize> {
        self.datasets.get(dataset).map(|d| d.over_limit.people)
    }

    /// This node's exact input to a secure-aggregation session (see `secure`): the
    /// query's bounded figures for every declared cell, in units, with their layout.
    /// Exact figures: the caller masks them and adds its noise share before anything
    /// leaves the node.
    pub async fn secure_input(
        &self,
        query: &phm_proto::QueryBody,
        limits: &Limits,
        sent: &mut Statements,
    ) -> Result<SecureInput, EngineError> {
        let ds = self.dataset(limits)?;
        let exact = plan::run_exact(&self.ctx, ds, query.filter.as_ref(), limits, sent).await?;
        secure::input(&exact, limits)
    }

    /// The anchor's people for a linked question the policy allowed: its filter and
    /// opt-outs applied, each with its cell of the declared group domain.
    pub async fn anchor_cohort(
        &self,
        query: &phm_proto::QueryBody,
        limits: &Limits,
        sent: &mut Statements,
    ) -> Result<AnchorSide, EngineError> {
        let ds = self.dataset(limits)?;
        cohort::anchor(&self.ctx, ds, query.filter.as_ref(), limits, sent).await
    }

    /// The partner's people for a linked question: `view` is the partner's side of it
    /// (`phm_policies::partner_view`), its filter and opt-outs applied.
    pub async fn partner_cohort(
        &self,
        view: &phm_proto::QueryBody,
        limits: &Limits,
        sent: &mut Statements,
    ) -> Result<phm_link::PartnerCohort, EngineError> {
        let ds = self.dataset(limits)?;
        cohort::partner(&self.ctx, ds, view.filter.as_ref(), limits, sent).await
    }

    /// What loading a FHIR export read, kept and dropped (none for other sources).
    pub fn load_report(&self, dataset: &str) -> Option<&fhir::LoadReport> {
        self.datasets.get(dataset)?.fhir_report.as_ref()
    }

    fn dataset(&self, limits: &Limits) -> Result<&load::LoadedDataset, EngineError> {
        self.datasets
            .get(&limits.dataset)
            .ok_or_else(|| EngineError::UnknownDataset(limits.dataset.clone()))
    }

    async fn run(
        &self,
        query: &phm_proto::QueryBody,
        limits: &Limits,
        private: bool,
        sent: &mut Statements,
    ) -> Result<Release, EngineError> {
        let ds = self
            .datasets
            .get(&limits.dataset)
            .ok_or_else(|| EngineError::UnknownDataset(limits.dataset.clone()))?;
        let exact = plan::run_exact(&self.ctx, ds, query.filter.as_ref(), limits, sent).await?;
        if private {
            noise::release_private(exact, limits)
        } else {
            Ok(post::release_exact(exact, limits))
        }
    }
}

/// Text of a column type, for messages.
fn type_name(t: ColumnType) -> &'static str {
    match t {
        ColumnType::Integer => "an integer column",
        ColumnType::Real => "a real column",
        ColumnType::Text => "a text column",
        ColumnType::Boolean => "a boolean column",
        ColumnType::Date => "a date column (YYYY-MM-DD)",
    }
}
