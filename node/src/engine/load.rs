//! Loading a dataset at node start: check every declared column exists with a usable
//! type and every value sits inside its declared domain, then register the data with
//! DataFusion under an explicit schema taken from the policy. A node whose data does
//! not match its policy must not start, so every problem names file, column and where
//! in the file (the line of a CSV file, header = line 1; the 1-based row of a Parquet
//! file).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use datafusion::arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch,
    StringArray,
};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Date32Type, Field, Float64Type, Int64Type, Schema};
use datafusion::catalog::MemTable;
use datafusion::common::TableReference;
use datafusion::functions_aggregate::expr_fn::count;
use datafusion::logical_expr::ident;
use datafusion::parquet::arrow::ProjectionMask;
use datafusion::parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use datafusion::prelude::{ParquetReadOptions, SessionContext, lit};
use phm_policies::model::{
    ColumnType, Dataset, Domain, FhirExport, Grouping, Source, SourceFormat, Warehouse,
};
use sha2::{Digest, Sha256};

use super::bound::{OverLimit, PERSON_AT_LOAD, PersonIndex};
use super::clamp::{MAX_VALUES_PER_CELL, names_a_person};

/// Where in a file a problem is: CSV problems give the file's line (the header is line
/// 1, so the first data row is line 2, and a quoted field spanning lines or a skipped
/// blank line is counted as an editor would); Parquet has no lines, so its problems give
/// the 1-based row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Position {
    Line(u64),
    Row(u64),
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Position::Line(n) => write!(f, "line {n}"),
            Position::Row(n) => write!(f, "row {n}"),
        }
    }
}

/// How many offending positions a load error lists.
const LISTED_POSITIONS: usize = 5;

fn list_positions(p: &[Position]) -> String {
    p.iter()
        .map(Position::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a dataset could not be loaded. The node does not start. Each message is complete
/// on its own (dataset, file, what and where) and carries no `source()`, so a caller
/// that prints it inside its own message shows it once.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("dataset `{dataset}`: cannot read {file}: {reason}")]
    Read {
        dataset: String,
        file: String,
        reason: String,
    },
    #[error(
        "dataset `{dataset}`: {file}: column `{column}` is required by the policy but the file has no such column"
    )]
    MissingColumn {
        dataset: String,
        file: String,
        column: String,
    },
    #[error(
        "dataset `{dataset}`: {file}: column `{column}` is declared {expected} but the file holds {found}"
    )]
    WrongType {
        dataset: String,
        file: String,
        column: String,
        expected: &'static str,
        found: String,
    },
    #[error("dataset `{dataset}`: {file}: {at}, column `{column}`: {reason}")]
    BadValue {
        dataset: String,
        file: String,
        column: String,
        /// The first offending value: a CSV line or a Parquet row.
        at: Position,
        reason: String,
    },
    #[error(
        "dataset `{dataset}`: {file}: the person id `{column}` is missing (NULL, empty or blank) in {count} row(s), first at {}: every row must name its person, or contribution bounding cannot hold; remove those rows or give each its own id before loading",
        list_positions(.first)
    )]
    MissingPersonId {
        dataset: String,
        file: String,
        column: String,
        /// How many rows have no person id.
        count: u64,
        /// Where the first few are.
        first: Vec<Position>,
    },
    #[error(
        "dataset `{dataset}`: {file}: {rows} rows is more than the {max} a node sums exactly; split the file"
    )]
    TooManyRows {
        dataset: String,
        file: String,
        rows: u64,
        max: i64,
    },
    #[error("dataset `{dataset}`: postgres relation {relation}: {reason}")]
    Warehouse {
        dataset: String,
        relation: String,
        reason: String,
    },
    #[error(
        "dataset `{dataset}`: postgres relation {relation}, column `{column}`: {count} row(s) where the value {reason}{}",
        .example.as_ref().map(|e| format!(" (the smallest is \"{e}\")")).unwrap_or_default()
    )]
    WarehouseValues {
        dataset: String,
        relation: String,
        column: String,
        count: i64,
        reason: &'static str,
        /// The smallest offending value, as text (none for a missing person id).
        example: Option<String>,
    },
    #[error("dataset `{dataset}`: FHIR export: {error}")]
    Fhir {
        dataset: String,
        error: super::fhir::FhirError,
    },
    #[error("dataset `{dataset}`: the policy's declaration is unusable: {reason}")]
    Declaration { dataset: String, reason: String },
    #[error("dataset `{dataset}`: the query engine refused it: {reason}")]
    Register { dataset: String, reason: String },
}

/// Runs when a query has checked the file and is about to scan it (tests only: it lets a
/// test replace the file inside that window).
#[cfg(test)]
#[derive(Clone)]
pub(crate) struct ScanHook(pub Arc<dyn Fn() + Send + Sync>);

#[cfg(test)]
impl std::fmt::Debug for ScanHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScanHook")
    }
}

/// A dataset as registered with DataFusion.
#[derive(Debug)]
pub(crate) struct LoadedDataset {
    pub table: TableReference,
    /// Every column the engine may read, with its policy type.
    pub columns: HashMap<String, ColumnType>,
    pub person_id: String,
    /// The people over the dataset's `max_rows_per_person`, listed at load: true of the
    /// data load measured (`file_unchanged`). When there are none, bounding cannot drop
    /// anything.
    pub over_limit: OverLimit,
    /// Parquet is read from disk at each query: the file as it was when it was
    /// validated and measured, so a file replaced under a running node is noticed.
    /// `None` for data held in memory.
    pub fingerprint: Option<FileFingerprint>,
    /// Set when the rows live in a warehouse: every query runs there.
    pub warehouse: Option<super::warehouse::Source>,
    /// Set for a FHIR export: what was read, kept and dropped.
    pub fhir_report: Option<super::fhir::LoadReport>,
    /// Set once a change to the file has been logged, so it is logged once.
    changed_noted: AtomicBool,
    #[cfg(test)]
    pub before_scan: Option<ScanHook>,
}

impl LoadedDataset {
    /// True when the data are exactly what load validated and measured: always for data
    /// held in memory; for a file, when its fingerprint is unchanged. The first time a
    /// file is seen changed, logs that every query now runs contribution bounding.
    pub fn file_unchanged(&self) -> bool {
        let Some(f) = &self.fingerprint else {
            return true;
        };
        if f.unchanged() {
            return true;
        }
        if !self.changed_noted.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                dataset = %self.table,
                file = %f.path.display(),
                "the data file changed since the node loaded it: every query now runs per-person contribution bounding (slower); reload the policy (SIGHUP) to validate and measure the new file"
            );
        }
        false
    }
}

/// What identifies one version of a file without reading all of it. Every part is
/// compared, so a change is noticed when any of them moves:
/// - device and inode: a file renamed into place (rsync, atomic writers, `mv`) is a new
///   inode even when its size and mtime are copied (`rsync -a`);
/// - size, and mtime to the nanosecond;
/// - ctime (status change) to the nanosecond: the kernel sets it on every write, rename
///   and `utime`, and user space cannot set it back, so an in-place rewrite that
///   restores size and mtime (`cp -p`, `touch -r`) is still noticed;
/// - SHA-256 of the Parquet footer (schema, row groups, offsets, statistics): a
///   rewritten file almost always differs there, which also covers file systems whose
///   ctime or mtime are coarse or not kept (some network and FUSE mounts).
///
/// A full content hash was measured and not added: see notes/engine.md.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileFingerprint {
    pub path: PathBuf,
    len: u64,
    modified: Option<SystemTime>,
    dev_ino: Option<(u64, u64)>,
    ctime: Option<(i64, i64)>,
    footer: [u8; 32],
}

/// Most trailing bytes hashed as the "footer" (a Parquet footer is usually a few KiB).
const FOOTER_MAX: u64 = 16 << 20;

impl FileFingerprint {
    pub(crate) fn of(path: &Path) -> std::io::Result<FileFingerprint> {
        // One open file for every part, so they all describe the same inode.
        let mut f = File::open(path)?;
        let meta = f.metadata()?;
        let len = meta.len();
        #[cfg(unix)]
        let (dev_ino, ctime) = {
            use std::os::unix::fs::MetadataExt;
            (
                Some((meta.dev(), meta.ino())),
                Some((meta.ctime(), meta.ctime_nsec())),
            )
        };
        #[cfg(not(unix))]
        let (dev_ino, ctime) = (None, None);
        // Parquet ends with the footer length (u32, little endian) and "PAR1".
        let mut tail_len = len.min(64 << 10);
        if len >= 12 {
            let mut end = [0u8; 8];
            f.seek(SeekFrom::End(-8))?;
            f.read_exact(&mut end)?;
            if &end[4..] == b"PAR1" {
                let footer = u64::from(u32::from_le_bytes([end[0], end[1], end[2], end[3]]));
                tail_len = (footer + 8).min(len).min(FOOTER_MAX);
            }
        }
        let mut tail = Vec::with_capacity(usize::try_from(tail_len).unwrap_or(0));
        f.seek(SeekFrom::Start(len - tail_len))?;
        f.take(tail_len).read_to_end(&mut tail)?;
        Ok(FileFingerprint {
            path: path.to_path_buf(),
            len,
            modified: meta.modified().ok(),
            dev_ino,
            ctime,
            footer: Sha256::digest(&tail).into(),
        })
    }

    /// True only when the file still looks exactly as it did at load.
    pub fn unchanged(&self) -> bool {
        FileFingerprint::of(&self.path).is_ok_and(|now| now == *self)
    }
}

/// What to check in one column while scanning.
#[derive(Debug, Clone)]
pub(crate) struct ColumnCheck {
    pub name: String,
    pub ty: ColumnType,
    /// Declared category labels the values must be among.
    pub categories: Option<HashSet<String>>,
    /// Bounds a declared numeric group key must lie within.
    pub bounds: Option<(f64, f64)>,
    /// Declared `never_null`: a NULL (or NaN) in any row refuses the load.
    pub required: bool,
}

pub(crate) fn arrow_type(t: ColumnType) -> DataType {
    match t {
        ColumnType::Integer => DataType::Int64,
        ColumnType::Real => DataType::Float64,
        ColumnType::Text => DataType::Utf8,
        ColumnType::Boolean => DataType::Boolean,
        ColumnType::Date => DataType::Date32,
    }
}

fn compatible(file: &DataType, declared: ColumnType) -> bool {
    use DataType as D;
    let integer = matches!(
        file,
        D::Int8 | D::Int16 | D::Int32 | D::Int64 | D::UInt8 | D::UInt16 | D::UInt32 | D::UInt64
    );
    let text = |t: &DataType| matches!(t, D::Utf8 | D::LargeUtf8 | D::Utf8View);
    match declared {
        ColumnType::Integer => integer,
        ColumnType::Real => integer || matches!(file, D::Float16 | D::Float32 | D::Float64),
        ColumnType::Text => text(file) || matches!(file, D::Dictionary(_, v) if text(v)),
        ColumnType::Boolean => matches!(file, D::Boolean),
        ColumnType::Date => matches!(file, D::Date32 | D::Date64),
    }
}

/// Labels of a declared domain, rendered the way results label keys.
pub(crate) fn domain_labels(domain: &Domain) -> Result<Vec<String>, String> {
    match domain {
        Domain::Range(r) => {
            let (lo, hi) = r
                .split_once("..")
                .ok_or_else(|| format!("range domain \"{r}\" is not written like \"1..5\""))?;
            let lo: i64 = lo
                .trim()
                .parse()
                .map_err(|_| format!("range domain \"{r}\": \"{lo}\" is not an integer"))?;
            let hi: i64 = hi
                .trim()
                .parse()
                .map_err(|_| format!("range domain \"{r}\": \"{hi}\" is not an integer"))?;
            if hi < lo || hi - lo > 100_000 {
                return Err(format!("range domain \"{r}\" is empty or too large"));
            }
            Ok((lo..=hi).map(|i| i.to_string()).collect())
        }
        Domain::Integers(v) => Ok(v.iter().map(|i| i.to_string()).collect()),
        Domain::Texts(v) => Ok(v.clone()),
        Domain::Booleans(v) => Ok(v.iter().map(|b| b.to_string()).collect()),
    }
}

/// Text label of value `i` of a typed array, as results render keys. NULL and NaN (which
/// is missing, see `clamp`) have none, so they are no key.
pub(crate) fn label_at(array: &dyn Array, i: usize) -> Option<String> {
    if array.is_null(i) {
        return None;
    }
    match array.data_type() {
        DataType::Int64 => Some(array.as_primitive::<Int64Type>().value(i).to_string()),
        DataType::Float64 => {
            let v = array.as_primitive::<Float64Type>().value(i);
            (!v.is_nan()).then(|| format!("{v}"))
        }
        DataType::Boolean => Some(array.as_boolean().value(i).to_string()),
        DataType::Utf8 => Some(array.as_string::<i32>().value(i).to_string()),
        DataType::Utf8View => Some(array.as_string_view().value(i).to_string()),
        DataType::Date32 => array
            .as_primitive::<Date32Type>()
            .value_as_date(i)
            .map(|d| d.format("%Y-%m-%d").to_string()),
        _ => None,
    }
}

fn check_values(array: &dyn Array, check: &ColumnCheck) -> Result<(), (usize, String)> {
    for i in 0..array.len() {
        if array.is_null(i) {
            if check.required {
                return Err((
                    i,
                    "is empty, but the policy declares this column never_null".into(),
                ));
            }
            continue;
        }
        if check.ty == ColumnType::Real {
            let v = array.as_primitive::<Float64Type>().value(i);
            if !v.is_finite() {
                return Err((i, format!("{v} is not a finite number")));
            }
        }
        if let Some(cats) = &check.categories
            && let Some(label) = label_at(array, i)
            && !cats.contains(&label)
        {
            return Err((i, format!("\"{label}\" is not in the declared domain")));
        }
        if let Some((lo, hi)) = check.bounds {
            let v = match array.data_type() {
                DataType::Int64 => array.as_primitive::<Int64Type>().value(i) as f64,
                DataType::Float64 => array.as_primitive::<Float64Type>().value(i),
                _ => continue,
            };
            if v < lo || v > hi {
                return Err((
                    i,
                    format!("{v} is outside the declared bounds [{lo}, {hi}] of this group key"),
                ));
            }
        }
    }
    Ok(())
}

/// Rows of a person id column that name no one (NULL, empty or blank), counted, with the
/// first few positions (0-based, within `array`) kept.
#[derive(Debug, Default)]
struct MissingIds {
    count: u64,
    first: Vec<u64>,
}

impl MissingIds {
    /// Scans one batch of person ids whose first row is row `offset` of the file.
    fn scan(&mut self, ids: &dyn Array, offset: u64) -> Result<(), String> {
        let mut note = |i: usize| {
            self.count += 1;
            if self.first.len() < LISTED_POSITIONS {
                self.first.push(offset + i as u64);
            }
        };
        if ids.data_type().is_integer() {
            for i in 0..ids.len() {
                if ids.is_null(i) {
                    note(i);
                }
            }
            return Ok(());
        }
        let text = cast(ids, &DataType::Utf8).map_err(|e| e.to_string())?;
        let text = text.as_string::<i32>();
        for i in 0..text.len() {
            if !names_a_person(text.is_valid(i).then(|| text.value(i))) {
                note(i);
            }
        }
        Ok(())
    }
}

/// A path from the policy: relative to the policy file's folder `base_dir` unless
/// absolute.
pub(crate) fn resolve(base_dir: &Path, file: &str) -> PathBuf {
    let p = Path::new(file);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        base_dir.join(p)
    }
}

/// What load checks in each column: every declared column, and the opt-out flag
/// wherever it applies (declared or not); and whether the person id is declared.
pub(crate) fn column_checks(
    ds: &Dataset,
    opt_out_column: Option<&str>,
) -> Result<(Vec<ColumnCheck>, bool), DataError> {
    let decl = |reason: String| DataError::Declaration {
        dataset: ds.name.clone(),
        reason,
    };
    if ds.max_rows_per_person == 0 {
        return Err(decl("max_rows_per_person must be at least 1".into()));
    }
    let mut checks: Vec<ColumnCheck> = Vec::new();
    for c in &ds.columns {
        let categories = match &c.domain {
            Some(d) => Some(
                domain_labels(d)
                    .map_err(|e| decl(format!("column `{}`: {e}", c.name)))?
                    .into_iter()
                    .collect(),
            ),
            None => None,
        };
        let bounds = match (c.group, c.column_type.is_numeric(), &c.domain, c.bounds) {
            (Grouping::Declared, true, None, Some([lo, hi])) => Some((lo, hi)),
            _ => None,
        };
        checks.push(ColumnCheck {
            name: c.name.clone(),
            ty: c.column_type,
            categories,
            bounds,
            required: c.never_null,
        });
    }
    // The opt-out flag must exist (as a boolean) wherever it applies, declared or not.
    if let Some(col) = opt_out_column
        && !ds.opt_out_not_applicable
        && let Some(c) = checks.iter().find(|c| c.name == col)
        && c.ty != ColumnType::Boolean
    {
        return Err(decl(format!(
            "opt-out column `{col}` is declared {}, not boolean",
            c.ty.as_str()
        )));
    }
    if let Some(col) = opt_out_column
        && !ds.opt_out_not_applicable
        && !checks.iter().any(|c| c.name == col)
    {
        checks.push(ColumnCheck {
            name: col.to_string(),
            ty: ColumnType::Boolean,
            categories: None,
            bounds: None,
            required: false,
        });
    }
    if let Some(c) = checks.iter().find(|c| c.name == ds.person_id)
        && !matches!(c.ty, ColumnType::Text | ColumnType::Integer)
    {
        return Err(decl(format!(
            "person id column `{}` must be text or integer",
            ds.person_id
        )));
    }
    let person_declared = checks.iter().any(|c| c.name == ds.person_id);
    Ok((checks, person_declared))
}

/// A dataset in a warehouse: checked there with aggregate statements; no rows are
/// read into the node.
async fn load_warehouse(
    ds: &Dataset,
    w: &Warehouse,
    checks: Vec<ColumnCheck>,
    base_dir: &Path,
) -> Result<LoadedDataset, DataError> {
    let source = super::warehouse::load(ds, w, &checks, base_dir).await?;
    let mut columns: HashMap<String, ColumnType> =
        checks.iter().map(|c| (c.name.clone(), c.ty)).collect();
    columns.insert(ds.person_id.clone(), source.person_type());
    Ok(LoadedDataset {
        table: TableReference::bare(ds.name.clone()),
        columns,
        person_id: ds.person_id.clone(),
        // Never consulted: a warehouse query always bounds.
        over_limit: OverLimit {
            m: ds.max_rows_per_person,
            index: None,
            people: usize::MAX,
        },
        fingerprint: None,
        warehouse: Some(source),
        fhir_report: None,
        changed_noted: AtomicBool::new(false),
        #[cfg(test)]
        before_scan: None,
    })
}

pub(crate) async fn load_dataset(
    ctx: &SessionContext,
    ds: &Dataset,
    opt_out_column: Option<&str>,
    base_dir: &Path,
) -> Result<LoadedDataset, DataError> {
    let (checks, person_declared) = column_checks(ds, opt_out_column)?;
    let (format, path) = match &ds.source {
        Source::Postgres(w) => return load_warehouse(ds, w, checks, base_dir).await,
        Source::FhirNdjson(f) => {
            let (batches, person_type, report) =
                load_fhir(ds, f, &checks, person_declared, base_dir).await?;
            let mut loaded = register_memory(ctx, ds, &checks, batches, person_type).await?;
            loaded.fhir_report = Some(report);
            return Ok(loaded);
        }
        Source::Parquet { path } => (SourceFormat::Parquet, path),
        Source::Csv { path } => (SourceFormat::Csv, path),
    };
    let path = resolve(base_dir, path);
    let file = path.display().to_string();

    let dataset = ds.name.clone();
    let table = TableReference::bare(ds.name.clone());
    let read_err = |reason: String| DataError::Read {
        dataset: dataset.clone(),
        file: file.clone(),
        reason,
    };
    let (fingerprint, person_type) = match format {
        SourceFormat::Parquet => {
            // Taken before validation and checked again after the last measurement, so
            // what was validated and measured is the file this fingerprint describes.
            let fingerprint = FileFingerprint::of(&path).map_err(|e| read_err(e.to_string()))?;
            let (checks2, path2, dataset2, pid) = (
                checks.clone(),
                path.clone(),
                dataset.clone(),
                ds.person_id.clone(),
            );
            let person_type = tokio::task::spawn_blocking(move || {
                validate_parquet(&dataset2, &path2, &checks2, &pid)
            })
            .await
            .map_err(|e| read_err(format!("validation task failed: {e}")))??;
            let person_type = if person_declared {
                None
            } else {
                Some(person_type)
            };
            let schema = table_schema(&checks, &ds.person_id, person_type.as_ref(), true);
            // An empty extension: the policy names one file, whatever it is called.
            let options = ParquetReadOptions::default()
                .file_extension("")
                .schema(&schema);
            let path_str = path
                .to_str()
                .ok_or_else(|| read_err("path is not valid UTF-8".into()))?;
            ctx.register_parquet(table.clone(), path_str, options)
                .await
                .map_err(|e| DataError::Register {
                    dataset: dataset.clone(),
                    reason: e.to_string(),
                })?;
            (Some(fingerprint), person_type)
        }
        SourceFormat::Csv => {
            let (checks2, path2, dataset2, pid) = (
                checks.clone(),
                path.clone(),
                dataset.clone(),
                ds.person_id.clone(),
            );
            let pid_declared = person_declared;
            let batches = tokio::task::spawn_blocking(move || {
                read_csv(&dataset2, &path2, &checks2, &pid, pid_declared)
            })
            .await
            .map_err(|e| read_err(format!("validation task failed: {e}")))??;
            let person_type = if person_declared {
                None
            } else {
                Some(DataType::Utf8)
            };
            return register_memory(ctx, ds, &checks, batches, person_type).await;
        }
    };
    finish_load(ctx, ds, &checks, person_type, fingerprint).await
}

/// A FHIR export: flattened and shaped by `fhir`, then each column the policy names is
/// found in the query's result, converted to its declared type and checked as a CSV
/// file's would be (positions are rows of the query's result). The load report goes to
/// the node's log, a line per view.
async fn load_fhir(
    ds: &Dataset,
    export: &FhirExport,
    checks: &[ColumnCheck],
    person_declared: bool,
    base_dir: &Path,
) -> Result<(Vec<RecordBatch>, Option<DataType>, super::fhir::LoadReport), DataError> {
    let (rows, file, report) =
        super::fhir::read(export, base_dir)
            .await
            .map_err(|error| DataError::Fhir {
                dataset: ds.name.clone(),
                error,
            })?;
    for line in report.lines() {
        tracing::info!(dataset = %ds.name, "FHIR export: {line}");
    }
    if report.export_errors > 0 {
        tracing::warn!(
            dataset = %ds.name,
            errors = report.export_errors,
            "the export's manifest lists error files (OperationOutcome): the server could not export some resources, so figures may undercount; ask the source system's team"
        );
    }
    let mut wanted: Vec<(String, ColumnType)> =
        checks.iter().map(|c| (c.name.clone(), c.ty)).collect();
    let person_type = if person_declared {
        None
    } else {
        let ty = match rows.schema.field_with_name(&ds.person_id) {
            Ok(f) if f.data_type().is_integer() => ColumnType::Integer,
            _ => ColumnType::Text,
        };
        wanted.push((ds.person_id.clone(), ty));
        Some(arrow_type(ty))
    };
    // Every column the policy names, with a usable type, even when there are no rows.
    for (name, ty) in &wanted {
        let Ok(field) = rows.schema.field_with_name(name) else {
            return Err(DataError::MissingColumn {
                dataset: ds.name.clone(),
                file: file.clone(),
                column: name.clone(),
            });
        };
        if !compatible(field.data_type(), *ty) {
            return Err(DataError::WrongType {
                dataset: ds.name.clone(),
                file: file.clone(),
                column: name.clone(),
                expected: ty.as_str(),
                found: field.data_type().to_string(),
            });
        }
    }
    let out_schema = Arc::new(Schema::new(
        wanted
            .iter()
            .map(|(n, t)| Field::new(n, arrow_type(*t), true))
            .collect::<Vec<_>>(),
    ));
    let mut out = Vec::with_capacity(rows.batches.len());
    let mut offset: u64 = 0;
    let mut missing = MissingIds::default();
    let read_err = |reason: String| DataError::Read {
        dataset: ds.name.clone(),
        file: file.clone(),
        reason,
    };
    for batch in &rows.batches {
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(wanted.len());
        for (name, ty) in &wanted {
            let array = batch
                .column_by_name(name)
                .ok_or_else(|| read_err(format!("column `{name}` is missing from a batch")))?;
            let typed = cast(array, &arrow_type(*ty)).map_err(|e| read_err(e.to_string()))?;
            let bad = |i: usize, reason: String| DataError::BadValue {
                dataset: ds.name.clone(),
                file: file.clone(),
                column: name.clone(),
                at: Position::Row(offset + i as u64 + 1),
                reason,
            };
            if let Some(c) = checks.iter().find(|c| &c.name == name) {
                check_values(&typed, c).map_err(|(i, r)| bad(i, r))?;
            }
            if name == &ds.person_id {
                missing.scan(typed.as_ref(), offset).map_err(&read_err)?;
            }
            arrays.push(typed);
        }
        out.push(
            RecordBatch::try_new(out_schema.clone(), arrays)
                .map_err(|e| read_err(e.to_string()))?,
        );
        offset += batch.num_rows() as u64;
    }
    if offset > MAX_VALUES_PER_CELL as u64 {
        return Err(DataError::TooManyRows {
            dataset: ds.name.clone(),
            file,
            rows: offset,
            max: MAX_VALUES_PER_CELL,
        });
    }
    if missing.count > 0 {
        return Err(DataError::MissingPersonId {
            dataset: ds.name.clone(),
            file,
            column: ds.person_id.clone(),
            count: missing.count,
            first: missing.first.iter().map(|r| Position::Row(r + 1)).collect(),
        });
    }
    Ok((out, person_type, report))
}

/// Registers rows held in memory (CSV, FHIR; no file to fingerprint) and measures them.
async fn register_memory(
    ctx: &SessionContext,
    ds: &Dataset,
    checks: &[ColumnCheck],
    batches: Vec<RecordBatch>,
    person_type: Option<DataType>,
) -> Result<LoadedDataset, DataError> {
    let register = |e: datafusion::error::DataFusionError| DataError::Register {
        dataset: ds.name.clone(),
        reason: e.to_string(),
    };
    let schema = Arc::new(table_schema(
        checks,
        &ds.person_id,
        person_type.as_ref(),
        false,
    ));
    let mem = MemTable::try_new(schema, vec![batches]).map_err(register)?;
    ctx.register_table(TableReference::bare(ds.name.clone()), Arc::new(mem))
        .map_err(register)?;
    finish_load(ctx, ds, checks, person_type, None).await
}

/// The part of a load after the rows are registered: the columns the engine may read,
/// the people over `max_rows_per_person`, and a last look at a file's fingerprint.
async fn finish_load(
    ctx: &SessionContext,
    ds: &Dataset,
    checks: &[ColumnCheck],
    person_type: Option<DataType>,
    fingerprint: Option<FileFingerprint>,
) -> Result<LoadedDataset, DataError> {
    let dataset = ds.name.clone();
    let table = TableReference::bare(ds.name.clone());
    let mut columns: HashMap<String, ColumnType> =
        checks.iter().map(|c| (c.name.clone(), c.ty)).collect();
    if person_type.is_some() {
        // Undeclared person ids are only ever partitioned on, never compared.
        columns
            .entry(ds.person_id.clone())
            .or_insert(ColumnType::Text);
    }
    let over_limit = over_limit(ctx, &table, &ds.person_id, ds.max_rows_per_person)
        .await
        .map_err(|e| DataError::Register {
            dataset: dataset.clone(),
            reason: format!("listing the people over max_rows_per_person: {e}"),
        })?;
    if let Some(f) = &fingerprint
        && !f.unchanged()
    {
        return Err(DataError::Read {
            dataset,
            file: f.path.display().to_string(),
            reason: "the file changed while it was being loaded; load again once it is complete"
                .into(),
        });
    }
    Ok(LoadedDataset {
        table,
        columns,
        person_id: ds.person_id.clone(),
        over_limit,
        fingerprint,
        warehouse: None,
        fhir_report: None,
        changed_noted: AtomicBool::new(false),
        #[cfg(test)]
        before_scan: None,
    })
}

/// The schema a dataset is registered under. `views` registers text as Utf8View,
/// which the Parquet reader produces without copying strings (plain Utf8 made every
/// query over Parquet about 40% slower); in-memory CSV batches are built as Utf8.
fn table_schema(
    checks: &[ColumnCheck],
    person_id: &str,
    person_type: Option<&DataType>,
    views: bool,
) -> Schema {
    let ty = |t: DataType| match t {
        DataType::Utf8 if views => DataType::Utf8View,
        t => t,
    };
    let mut fields: Vec<Field> = checks
        .iter()
        .map(|c| Field::new(&c.name, ty(arrow_type(c.ty)), true))
        .collect();
    if let Some(t) = person_type {
        fields.push(Field::new(person_id, ty(t.clone()), true));
    }
    Schema::new(fields)
}

/// The ids of the people with more than `m` rows (one group-by over the person id):
/// what lets a query bound only those people's rows, or skip bounding when there are none.
pub(super) async fn over_limit(
    ctx: &SessionContext,
    table: &TableReference,
    person_id: &str,
    m: u32,
) -> datafusion::error::Result<OverLimit> {
    let ids = ctx
        .table(table.clone())
        .await?
        .aggregate(vec![ident(person_id)], vec![count(lit(1)).alias("n")])?
        .filter(ident("n").gt(lit(i64::from(m))))?
        .select(vec![ident(person_id).alias(PERSON_AT_LOAD)])?
        .collect()
        .await?;
    let people = ids.iter().map(RecordBatch::num_rows).sum();
    let index = if people == 0 {
        None
    } else {
        let columns: Vec<&dyn Array> = ids.iter().map(|b| b.column(0).as_ref()).collect();
        let ids = datafusion::arrow::compute::concat(&columns)?;
        Some(Arc::new(PersonIndex::new(ids)?))
    };
    Ok(OverLimit { m, index, people })
}

/// Reads and checks a Parquet file; returns the (normalised) type of the person id
/// column, for when the policy does not declare it.
fn validate_parquet(
    dataset: &str,
    path: &Path,
    checks: &[ColumnCheck],
    person_id: &str,
) -> Result<DataType, DataError> {
    let file = path.display().to_string();
    let read_err = |reason: String| DataError::Read {
        dataset: dataset.to_string(),
        file: file.clone(),
        reason,
    };
    let f = File::open(path).map_err(|e| read_err(e.to_string()))?;
    let builder =
        ParquetRecordBatchReaderBuilder::try_new(f).map_err(|e| read_err(e.to_string()))?;
    let rows = builder.metadata().file_metadata().num_rows();
    if rows > MAX_VALUES_PER_CELL {
        return Err(DataError::TooManyRows {
            dataset: dataset.to_string(),
            file: file.clone(),
            rows: u64::try_from(rows).unwrap_or(u64::MAX),
            max: MAX_VALUES_PER_CELL,
        });
    }
    let schema = builder.schema().clone();
    let mut indices = Vec::with_capacity(checks.len() + 1);
    for c in checks {
        let (idx, field) =
            schema
                .column_with_name(&c.name)
                .ok_or_else(|| DataError::MissingColumn {
                    dataset: dataset.to_string(),
                    file: file.clone(),
                    column: c.name.clone(),
                })?;
        if !compatible(field.data_type(), c.ty) {
            return Err(DataError::WrongType {
                dataset: dataset.to_string(),
                file: file.clone(),
                column: c.name.clone(),
                expected: super::type_name(c.ty),
                found: field.data_type().to_string(),
            });
        }
        indices.push(idx);
    }
    let person_type = match schema.column_with_name(person_id) {
        None => {
            return Err(DataError::MissingColumn {
                dataset: dataset.to_string(),
                file: file.clone(),
                column: person_id.to_string(),
            });
        }
        Some((idx, f)) => {
            if !indices.contains(&idx) {
                indices.push(idx);
            }
            if compatible(f.data_type(), ColumnType::Integer) {
                DataType::Int64
            } else if compatible(f.data_type(), ColumnType::Text) {
                DataType::Utf8
            } else {
                return Err(DataError::WrongType {
                    dataset: dataset.to_string(),
                    file: file.clone(),
                    column: person_id.to_string(),
                    expected: "a text or integer person id",
                    found: f.data_type().to_string(),
                });
            }
        }
    };
    let mask = ProjectionMask::roots(builder.parquet_schema(), indices.iter().copied());
    let reader = builder
        .with_projection(mask)
        .with_batch_size(65_536)
        .build()
        .map_err(|e| read_err(e.to_string()))?;
    let mut offset: u64 = 0;
    let mut missing = MissingIds::default();
    for batch in reader {
        let batch = batch.map_err(|e| read_err(e.to_string()))?;
        for c in checks {
            let Some(col) = batch.column_by_name(&c.name) else {
                return Err(DataError::MissingColumn {
                    dataset: dataset.to_string(),
                    file: file.clone(),
                    column: c.name.clone(),
                });
            };
            let bad = |i: usize, reason: String| DataError::BadValue {
                dataset: dataset.to_string(),
                file: file.clone(),
                column: c.name.clone(),
                at: Position::Row(offset + i as u64 + 1),
                reason,
            };
            let typed = cast(col, &arrow_type(c.ty)).map_err(|e| bad(0, e.to_string()))?;
            // A safe cast turns unrepresentable values (e.g. u64 overflow) into nulls.
            if typed.null_count() != col.null_count() {
                for i in 0..col.len() {
                    if col.is_valid(i) && typed.is_null(i) {
                        return Err(bad(
                            i,
                            "value cannot be represented in the declared type".into(),
                        ));
                    }
                }
            }
            check_values(&typed, c).map_err(|(i, reason)| bad(i, reason))?;
        }
        let Some(ids) = batch.column_by_name(person_id) else {
            return Err(DataError::MissingColumn {
                dataset: dataset.to_string(),
                file: file.clone(),
                column: person_id.to_string(),
            });
        };
        missing.scan(ids.as_ref(), offset).map_err(&read_err)?;
        offset += batch.num_rows() as u64;
    }
    if missing.count > 0 {
        return Err(DataError::MissingPersonId {
            dataset: dataset.to_string(),
            file: file.clone(),
            column: person_id.to_string(),
            count: missing.count,
            first: missing.first.iter().map(|r| Position::Row(r + 1)).collect(),
        });
    }
    Ok(person_type)
}

/// Reads a CSV file as text, parses every declared column strictly (so what was
/// checked is exactly what is queried) and returns typed batches held in memory.
fn read_csv(
    dataset: &str,
    path: &Path,
    checks: &[ColumnCheck],
    person_id: &str,
    person_declared: bool,
) -> Result<Vec<RecordBatch>, DataError> {
    use datafusion::arrow::csv::ReaderBuilder;
    use datafusion::arrow::csv::reader::Format;

    let file = path.display().to_string();
    let read_err = |reason: String| DataError::Read {
        dataset: dataset.to_string(),
        file: file.clone(),
        reason,
    };
    // Only on the way to an error: where data record `r` (0-based, header not counted)
    // starts in the file.
    let at = |record: u64| match csv_record_lines(path, &[record]).as_deref() {
        Ok([Some(line)]) => Position::Line(*line),
        // Cannot happen for a file that just parsed; the record number is still right.
        _ => Position::Row(record + 1),
    };
    let f = File::open(path).map_err(|e| read_err(e.to_string()))?;
    let format = Format::default().with_header(true);
    let (header, _) = format
        .infer_schema(f, Some(0))
        .map_err(|e| read_err(e.to_string()))?;
    let names: Vec<String> = header.fields().iter().map(|f| f.name().clone()).collect();
    let text_schema = Arc::new(Schema::new(
        names
            .iter()
            .map(|n| Field::new(n, DataType::Utf8, true))
            .collect::<Vec<_>>(),
    ));
    let mut wanted: Vec<(String, ColumnType)> =
        checks.iter().map(|c| (c.name.clone(), c.ty)).collect();
    if !person_declared {
        wanted.push((person_id.to_string(), ColumnType::Text));
    }
    for (name, _) in &wanted {
        if !names.contains(name) {
            return Err(DataError::MissingColumn {
                dataset: dataset.to_string(),
                file: file.clone(),
                column: name.clone(),
            });
        }
    }
    let out_schema = Arc::new(Schema::new(
        wanted
            .iter()
            .map(|(n, t)| Field::new(n, arrow_type(*t), true))
            .collect::<Vec<_>>(),
    ));
    let f = File::open(path).map_err(|e| read_err(e.to_string()))?;
    let reader = ReaderBuilder::new(text_schema)
        .with_header(true)
        .with_batch_size(65_536)
        .build(f)
        .map_err(|e| read_err(e.to_string()))?;
    let mut batches = Vec::new();
    let mut offset: u64 = 0;
    let mut missing = MissingIds::default();
    for batch in reader {
        let batch = batch.map_err(|e| read_err(e.to_string()))?;
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(wanted.len());
        for (name, ty) in &wanted {
            let bad = |i: usize, reason: String| DataError::BadValue {
                dataset: dataset.to_string(),
                file: file.clone(),
                column: name.clone(),
                at: at(offset + i as u64),
                reason,
            };
            let Some(text) = batch
                .column_by_name(name)
                .and_then(|c| c.as_string_opt::<i32>().cloned())
            else {
                return Err(read_err(format!(
                    "column `{name}` could not be read as text"
                )));
            };
            let typed = parse_text_column(&text, *ty).map_err(|(i, r)| bad(i, r))?;
            if let Some(c) = checks.iter().find(|c| &c.name == name) {
                check_values(&typed, c).map_err(|(i, r)| bad(i, r))?;
            }
            if name == person_id {
                missing.scan(typed.as_ref(), offset).map_err(&read_err)?;
            }
            arrays.push(typed);
        }
        let typed = RecordBatch::try_new(out_schema.clone(), arrays)
            .map_err(|e| read_err(e.to_string()))?;
        offset += batch.num_rows() as u64;
        if offset > MAX_VALUES_PER_CELL as u64 {
            return Err(DataError::TooManyRows {
                dataset: dataset.to_string(),
                file: file.clone(),
                rows: offset,
                max: MAX_VALUES_PER_CELL,
            });
        }
        batches.push(typed);
    }
    if missing.count > 0 {
        let first = match csv_record_lines(path, &missing.first) {
            Ok(lines) => lines
                .iter()
                .zip(&missing.first)
                .map(|(l, r)| l.map_or(Position::Row(r + 1), Position::Line))
                .collect(),
            Err(_) => missing.first.iter().map(|r| Position::Row(r + 1)).collect(),
        };
        return Err(DataError::MissingPersonId {
            dataset: dataset.to_string(),
            file: file.clone(),
            column: person_id.to_string(),
            count: missing.count,
            first,
        });
    }
    Ok(batches)
}

/// The line on which each given data record (0-based, the header not counted) of a CSV
/// file starts, following the reader's own rules (arrow-csv on csv-core: fields quoted
/// with `"`, `""` inside quotes, records ended by `\n`, `\r` or `\r\n`, blank lines
/// skipped), with lines counted as an editor does (a quoted field may span lines).
/// Used only to word an error, so it reads the file again rather than slow the load.
fn csv_record_lines(path: &Path, records: &[u64]) -> std::io::Result<Vec<Option<u64>>> {
    #[derive(Clone, Copy, PartialEq)]
    enum State {
        StartRecord,
        StartField,
        InField,
        InQuoted,
        /// A quote inside a quoted field: the field's end, or the first half of `""`.
        QuoteInQuoted,
    }
    let mut out = vec![None; records.len()];
    let mut remaining = records.len();
    let mut reader = std::io::BufReader::new(File::open(path)?);
    let mut buf = [0u8; 64 << 10];
    let (mut line, mut record, mut prev_cr) = (1u64, 0u64, false);
    let mut state = State::StartRecord;
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(out);
        }
        for &b in &buf[..n] {
            let term = b == b'\n' || b == b'\r';
            if state == State::StartRecord && !term {
                // A record starts here: the header is record 0, data record r is r + 1.
                if record > 0 {
                    for (slot, r) in out.iter_mut().zip(records) {
                        if *r + 1 == record && slot.is_none() {
                            *slot = Some(line);
                            remaining -= 1;
                        }
                    }
                    if remaining == 0 {
                        return Ok(out);
                    }
                }
                record += 1;
                state = State::StartField;
            }
            state = match (state, b) {
                (State::StartRecord, _) => State::StartRecord,
                (State::StartField, b'"') => State::InQuoted,
                (State::InQuoted, b'"') => State::QuoteInQuoted,
                (State::QuoteInQuoted, b'"') => State::InQuoted,
                (State::InQuoted, _) => State::InQuoted,
                (_, b',') => State::StartField,
                (_, b'\n' | b'\r') => State::StartRecord,
                _ => State::InField,
            };
            if b == b'\r' || (b == b'\n' && !prev_cr) {
                line += 1;
            }
            prev_cr = b == b'\r';
        }
    }
}

/// A CSV boolean: true/false, t/f, yes/no, y/n or 1/0, in any case. Anything else is no
/// boolean (so a typo is refused rather than read as false).
pub(crate) fn parse_bool(s: &str) -> Option<bool> {
    const TRUE: [&str; 5] = ["true", "t", "yes", "y", "1"];
    const FALSE: [&str; 5] = ["false", "f", "no", "n", "0"];
    if TRUE.iter().any(|t| s.eq_ignore_ascii_case(t)) {
        Some(true)
    } else if FALSE.iter().any(|f| s.eq_ignore_ascii_case(f)) {
        Some(false)
    } else {
        None
    }
}

fn parse_text_column(
    text: &datafusion::arrow::array::StringArray,
    ty: ColumnType,
) -> Result<ArrayRef, (usize, String)> {
    let n = text.len();
    let cell = |i: usize| -> Option<&str> {
        if text.is_null(i) {
            return None;
        }
        let s = text.value(i).trim();
        if s.is_empty() { None } else { Some(s) }
    };
    // Every non-empty cell parsed, or the first that does not parse, with its row.
    fn parse_all<'a, V>(
        n: usize,
        cell: impl Fn(usize) -> Option<&'a str>,
        what: &str,
        parse: impl Fn(&str) -> Option<V>,
    ) -> Result<Vec<Option<V>>, (usize, String)> {
        (0..n)
            .map(|i| match cell(i) {
                None => Ok(None),
                Some(s) => parse(s)
                    .map(Some)
                    .ok_or_else(|| (i, format!("\"{s}\" is not {what}"))),
            })
            .collect()
    }
    let what = super::type_name(ty);
    Ok(match ty {
        ColumnType::Integer => Arc::new(Int64Array::from(parse_all(n, cell, what, |s| {
            s.parse::<i64>().ok()
        })?)),
        ColumnType::Real => Arc::new(Float64Array::from(parse_all(n, cell, what, |s| {
            s.parse::<f64>().ok()
        })?)),
        ColumnType::Boolean => Arc::new(BooleanArray::from(parse_all(
            n,
            cell,
            "a boolean (write true/false, t/f, yes/no, y/n or 1/0, in any case)",
            parse_bool,
        )?)),
        ColumnType::Date => Arc::new(Date32Array::from(parse_all(n, cell, what, parse_date)?)),
        ColumnType::Text => Arc::new(StringArray::from_iter((0..n).map(cell))),
    })
}

/// Days since 1970-01-01 of a strict `YYYY-MM-DD` date.
pub(crate) fn parse_date(s: &str) -> Option<i32> {
    days_of_date(chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").ok()?)
}

/// A date as days since 1970-01-01 (Arrow's Date32), if in range.
pub(crate) fn days_of_date(d: chrono::NaiveDate) -> Option<i32> {
    let epoch = chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?;
    i32::try_from(d.signed_duration_since(epoch).num_days()).ok()
}

/// Days since 1970-01-01 (Arrow's Date32) as a date, if in range.
pub(crate) fn date_of_days(days: i32) -> Option<chrono::NaiveDate> {
    chrono::NaiveDate::from_ymd_opt(1970, 1, 1)?
        .checked_add_signed(chrono::Duration::days(days.into()))
}
