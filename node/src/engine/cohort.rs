//! The people of a linked question, read by DataFusion: the anchor's (NHS number, group)
//! records and the partner's NHS numbers, after opt-out exclusion and the filter, exactly
//! as a plain query would see the rows. The results are phm-link's cohort types, which
//! are neither `Clone`, serialisable nor printable with their numbers, and have no proto
//! conversion: NHS numbers read here can reach the wire only as blinded points.
//!
//! No contribution bounding: both sides are sets of people (de-duplicated on the NHS
//! number by phm-link), so one person moves each count by at most one whatever their
//! number of rows; the anchor's labels must be person-level, which phm-link enforces.
//!
//! The numbers are handed to phm-link borrowed from the scan's Arrow buffers, never
//! copied into a `String` per row (a million rows held ~60 MB of small strings before).

use datafusion::arrow::array::{Array, AsArray, RecordBatch, StringArray};
use datafusion::arrow::datatypes::DataType;
use datafusion::logical_expr::{Expr, cast, ident};
use datafusion::prelude::SessionContext;
use phm_link::{AnchorCohort, PartnerCohort};
use phm_policies::Limits;
use phm_proto::Predicate;

use super::EngineError;
use super::load::LoadedDataset;
use super::plan::{Spec, Statements, declared_keys, g};
use super::warehouse::template;

/// Alias of the link key column in the cohort scan.
const LINK: &str = "__phm_link";

/// The anchor's cohort, with the labels of every cell of its declared group domain
/// (in the order the cohort's group indices count them).
pub struct AnchorSide {
    pub cohort: AnchorCohort,
    pub group_columns: Vec<String>,
    pub keys: Vec<Vec<String>>,
}

impl std::fmt::Debug for AnchorSide {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AnchorSide")
            .field("cohort", &self.cohort)
            .field("cells", &self.keys.len())
            .finish()
    }
}

fn link_key(limits: &Limits) -> Result<&str, EngineError> {
    limits
        .link
        .as_ref()
        .map(|l| l.link_key.as_str())
        .ok_or_else(|| EngineError::InvalidLimits("the limits are not for a linked query".into()))
}

/// Opt-out exclusion, the filter, then `select`: the rows a plain query would count.
/// For a warehouse source the same scan is one statement (`template::render_cohort`),
/// whose text is added to `sent`.
#[allow(clippy::too_many_arguments)]
async fn scan(
    ctx: &SessionContext,
    ds: &LoadedDataset,
    spec: &Spec,
    select: Vec<Expr>,
    filter: Option<&Predicate>,
    limits: &Limits,
    with_keys: bool,
    sent: &mut Statements,
) -> Result<Vec<RecordBatch>, EngineError> {
    if let Some(source) = &ds.warehouse {
        let key = link_key(limits)?;
        let statement = template::render_cohort(
            &source.relation(ds),
            spec,
            filter,
            limits,
            key,
            LINK,
            with_keys,
        )?;
        sent.push(statement.sql.clone());
        return source.cohort(&statement, LINK).await;
    }
    let mut df = ctx.table(ds.table.clone()).await?;
    if let Some(flag) = &spec.opt_out {
        df = df.filter(ident(flag).is_false())?;
    }
    if let Some(f) = &spec.filter {
        df = df.filter(f.clone())?;
    }
    Ok(df.select(select)?.collect().await?)
}

/// The link key column of one scanned batch (Utf8, from the scan's cast).
fn link_values(b: &RecordBatch) -> Result<&StringArray, EngineError> {
    b.column_by_name(LINK)
        .and_then(|a| a.as_string_opt::<i32>())
        .ok_or_else(|| EngineError::InvalidLimits("the cohort scan returned no link key".into()))
}

/// Value `r` of a link key column, borrowed; `None` for NULL.
fn number_at(a: &StringArray, r: usize) -> Option<&str> {
    a.is_valid(r).then(|| a.value(r))
}

fn link_column(ds: &LoadedDataset, limits: &Limits, key: &str) -> Result<Expr, EngineError> {
    if !ds.columns.contains_key(key) {
        return Err(EngineError::UnknownColumn {
            dataset: limits.dataset.clone(),
            column: key.to_string(),
        });
    }
    Ok(cast(ident(key), DataType::Utf8).alias(LINK))
}

/// The anchor's people: (NHS number, flat group index) per row whose group key lies in
/// the declared domain. Rows outside it (NULL keys) belong to no cell, as in a plain
/// query.
pub(crate) async fn anchor(
    ctx: &SessionContext,
    ds: &LoadedDataset,
    filter: Option<&Predicate>,
    limits: &Limits,
    sent: &mut Statements,
) -> Result<AnchorSide, EngineError> {
    let key = link_key(limits)?;
    let spec = Spec::new(ds, filter, limits)?;
    let Some((strides, total)) = spec.declared.clone() else {
        return Err(EngineError::InvalidLimits(
            "a linked question's group keys must have declared domains".into(),
        ));
    };
    if spec.thresholded {
        return Err(EngineError::InvalidLimits(
            "a linked question's group keys must have declared domains".into(),
        ));
    }
    let mut select: Vec<Expr> = spec.select[..spec.plans.len()].to_vec();
    select.push(link_column(ds, limits, key)?);
    let batches = scan(ctx, ds, &spec, select, filter, limits, true, sent).await?;
    // Per batch: the link key and each group key column (checked before any row is read).
    let columns = batches
        .iter()
        .map(|b| {
            let groups: Vec<_> = (0..spec.plans.len())
                .map(|i| b.column_by_name(&g(i)))
                .collect();
            Ok((b.num_rows(), link_values(b)?, groups))
        })
        .collect::<Result<Vec<_>, EngineError>>()?;
    let records = columns.iter().flat_map(|(rows, link, groups)| {
        let (plans, strides) = (&spec.plans, &strides);
        (0..*rows).filter_map(move |r| {
            plans
                .iter()
                .zip(groups)
                .zip(strides)
                .try_fold(0usize, |flat, ((p, a), stride)| {
                    a.and_then(|a| p.declared_index(a.as_ref(), r))
                        .map(|k| flat + k * stride)
                })
                .map(|flat| (number_at(link, r), flat))
        })
    });
    let cohort = AnchorCohort::new(total, records)
        .map_err(|e| EngineError::InvalidLimits(format!("the anchor's cohort: {e}")))?;
    Ok(AnchorSide {
        cohort,
        group_columns: limits.group_by.iter().map(|g| g.label.clone()).collect(),
        keys: declared_keys(&spec.plans, &strides, total),
    })
}

/// The partner's people: the NHS numbers of its filtered rows, those with at least
/// `min_partner_rows` rows when the query has `HAVING COUNT(*) >= k`.
pub(crate) async fn partner(
    ctx: &SessionContext,
    ds: &LoadedDataset,
    filter: Option<&Predicate>,
    limits: &Limits,
    sent: &mut Statements,
) -> Result<PartnerCohort, EngineError> {
    let key = link_key(limits)?;
    let k = limits.link.as_ref().map_or(1, |l| l.min_partner_rows);
    let spec = Spec::new(ds, filter, limits)?;
    let select = vec![link_column(ds, limits, key)?];
    let batches = scan(ctx, ds, &spec, select, filter, limits, false, sent).await?;
    let links = batches
        .iter()
        .map(link_values)
        .collect::<Result<Vec<_>, _>>()?;
    let numbers = links
        .iter()
        .flat_map(|a| (0..a.len()).map(move |r| number_at(a, r)));
    Ok(PartnerCohort::with_min_rows(numbers, k))
}
