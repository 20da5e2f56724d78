//! FHIR Bulk Data sources: a node reads a `$export` (its manifest, or NDJSON files),
//! flattens each resource type it needs through a declared view (`view`: a subset of
//! SQL-on-FHIR v2's ViewDefinition, evaluated on each resource's JSON by `path`), and
//! shapes the views' tables into the dataset's rows with the IG lead's SQL (joins,
//! code mappings, ages), run once by DataFusion at load. The rows are then checked and
//! held in memory exactly as a CSV file's are (`load`).
//!
//! What fails the load, and what drops a resource: a file that cannot be read, a line
//! that is not JSON or not a resource, a resource of another type than its manifest
//! entry says, and a view outside the subset are errors (a damaged export or a view
//! that would mean something else must not give figures). A resource whose content does
//! not fit its view (no matching coding, a bad reference, a partial date, a missing key,
//! several values, a value of the wrong kind) is dropped and counted by reason in the
//! load report, with the file and line of the first one, never a value.

mod path;
mod view;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Seek};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use datafusion::arrow::array::{
    ArrayRef, BooleanBuilder, Date32Builder, Float64Builder, Int64Builder, RecordBatch,
    StringBuilder,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::catalog::MemTable;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::SessionContext;
use phm_policies::model::FhirExport;
use serde_json::Value;

pub use view::DropReason;
use view::{Cell, Kind, View};

use super::load::resolve;

/// Longest line (one resource) read: far above any real resource (a Bundle-sized
/// Patient is a few hundred KB).
const MAX_LINE_BYTES: u64 = 64 << 20;

/// Rows per Arrow batch built from a view.
const BATCH_ROWS: usize = 65_536;

/// Why an export could not be read. Each message names the file and where in it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FhirError {
    #[error("view {file}: element `{element}` {reason}")]
    View {
        file: String,
        element: String,
        reason: String,
    },
    #[error("{file}: {reason}")]
    Read { file: String, reason: String },
    #[error("manifest {file}: {reason}")]
    Manifest { file: String, reason: String },
    #[error("{file}, line {line}: {reason}")]
    Line {
        file: String,
        line: u64,
        reason: String,
    },
    #[error("query {file}: {reason}")]
    Query { file: String, reason: String },
}

/// Where a dropped resource is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub file: PathBuf,
    pub line: u64,
}

/// The resources one view dropped for one reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drops {
    pub count: u64,
    /// The element (column name, `where[i]`, `select[i].forEach`) of the first drop.
    pub element: String,
    pub first: Location,
}

/// What one view did.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ViewReport {
    pub name: String,
    pub resource: String,
    /// Resources of the view's type read.
    pub read: u64,
    /// Resources that gave rows.
    pub kept: u64,
    /// Rows in the view's table.
    pub rows: u64,
    pub dropped: BTreeMap<DropReason, Drops>,
}

impl ViewReport {
    fn of(v: &View) -> ViewReport {
        ViewReport {
            name: v.name.clone(),
            resource: v.resource.clone(),
            ..ViewReport::default()
        }
    }

    /// Counts `d` under `reason`, keeping the first drop's element and place.
    fn note(&mut self, reason: DropReason, d: Drops) {
        self.dropped
            .entry(reason)
            .and_modify(|x| x.count += d.count)
            .or_insert(d);
    }
}

/// The load report of one export.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadReport {
    pub files: Vec<PathBuf>,
    /// Resources read, by type (every line of every file).
    pub resources: BTreeMap<String, u64>,
    pub views: Vec<ViewReport>,
    /// The manifest's `error` entries (OperationOutcome files the server wrote).
    pub export_errors: usize,
    /// Rows of the dataset the query gave.
    pub dataset_rows: u64,
}

impl LoadReport {
    /// Resources dropped by every view together.
    pub fn dropped(&self) -> u64 {
        self.views
            .iter()
            .flat_map(|v| v.dropped.values())
            .map(|d| d.count)
            .sum()
    }

    /// One line per view, for the node's log.
    pub fn lines(&self) -> Vec<String> {
        self.views
            .iter()
            .map(|v| {
                let drops: Vec<String> = v
                    .dropped
                    .iter()
                    .map(|(r, d)| {
                        format!(
                            "{} {} (`{}`, first at {}:{})",
                            d.count,
                            r.describe(),
                            d.element,
                            d.first.file.display(),
                            d.first.line
                        )
                    })
                    .collect();
                format!(
                    "view `{}` ({}): {} read, {} kept as {} rows, {} dropped{}",
                    v.name,
                    v.resource,
                    v.read,
                    v.kept,
                    v.rows,
                    v.read - v.kept,
                    if drops.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", drops.join(", "))
                    }
                )
            })
            .collect()
    }
}

/// A view's table as it is built.
struct Table {
    schema: SchemaRef,
    builders: Vec<Builder>,
    len: usize,
    batches: Vec<RecordBatch>,
}

enum Builder {
    Text(StringBuilder),
    Integer(Int64Builder),
    Decimal(Float64Builder),
    Boolean(BooleanBuilder),
    Date(Date32Builder),
}

impl Builder {
    fn new(kind: Kind) -> Builder {
        match kind {
            Kind::Text => Builder::Text(StringBuilder::new()),
            Kind::Integer => Builder::Integer(Int64Builder::new()),
            Kind::Decimal => Builder::Decimal(Float64Builder::new()),
            Kind::Boolean => Builder::Boolean(BooleanBuilder::new()),
            Kind::Date => Builder::Date(Date32Builder::new()),
        }
    }

    fn push(&mut self, cell: Cell) {
        match (self, cell) {
            (Builder::Text(b), Cell::Text(s)) => b.append_value(s),
            (Builder::Integer(b), Cell::Integer(v)) => b.append_value(v),
            (Builder::Decimal(b), Cell::Decimal(v)) => b.append_value(v),
            (Builder::Boolean(b), Cell::Boolean(v)) => b.append_value(v),
            (Builder::Date(b), Cell::Date(v)) => b.append_value(v),
            // `view::typed` gives each column only its own kind, or NULL.
            (Builder::Text(b), _) => b.append_null(),
            (Builder::Integer(b), _) => b.append_null(),
            (Builder::Decimal(b), _) => b.append_null(),
            (Builder::Boolean(b), _) => b.append_null(),
            (Builder::Date(b), _) => b.append_null(),
        }
    }

    fn finish(&mut self) -> ArrayRef {
        match self {
            Builder::Text(b) => Arc::new(b.finish()),
            Builder::Integer(b) => Arc::new(b.finish()),
            Builder::Decimal(b) => Arc::new(b.finish()),
            Builder::Boolean(b) => Arc::new(b.finish()),
            Builder::Date(b) => Arc::new(b.finish()),
        }
    }
}

fn arrow(kind: Kind) -> DataType {
    match kind {
        Kind::Text => DataType::Utf8,
        Kind::Integer => DataType::Int64,
        Kind::Decimal => DataType::Float64,
        Kind::Boolean => DataType::Boolean,
        Kind::Date => DataType::Date32,
    }
}

/// The Arrow schema of a view's table.
fn schema(v: &View) -> SchemaRef {
    Arc::new(Schema::new(
        v.columns()
            .map(|(n, k)| Field::new(n, arrow(k), true))
            .collect::<Vec<_>>(),
    ))
}

impl Table {
    fn new(v: &View) -> Table {
        Table {
            schema: schema(v),
            builders: v.columns().map(|(_, k)| Builder::new(k)).collect(),
            len: 0,
            batches: Vec::new(),
        }
    }

    fn push(&mut self, row: Vec<Cell>) -> Result<(), String> {
        for (b, c) in self.builders.iter_mut().zip(row) {
            b.push(c);
        }
        self.len += 1;
        if self.len == BATCH_ROWS {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<(), String> {
        if self.len == 0 {
            return Ok(());
        }
        let arrays = self.builders.iter_mut().map(Builder::finish).collect();
        let batch = RecordBatch::try_new(self.schema.clone(), arrays).map_err(|e| e.to_string())?;
        self.batches.push(batch);
        self.len = 0;
        Ok(())
    }
}

/// One NDJSON file to read, with the resource type its manifest entry gives.
#[derive(Debug, Clone)]
struct Input {
    path: PathBuf,
    declared: Option<String>,
}

/// The export's files: from the manifest, or the policy's `files` (folders expanded to
/// their `*.ndjson` files, in name order). Returns also the manifest's error count.
fn inputs(export: &FhirExport, base_dir: &Path) -> Result<(Vec<Input>, usize), FhirError> {
    if let Some(m) = &export.manifest {
        return manifest(&resolve(base_dir, m));
    }
    let mut out = Vec::new();
    for f in &export.files {
        let p = resolve(base_dir, f);
        let read = |reason: String| FhirError::Read {
            file: p.display().to_string(),
            reason,
        };
        if p.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(&p)
                .map_err(|e| read(e.to_string()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|q| q.extension().is_some_and(|x| x == "ndjson") && q.is_file())
                .collect();
            if found.is_empty() {
                return Err(read("the folder holds no .ndjson file".into()));
            }
            found.sort();
            out.extend(found.into_iter().map(|path| Input {
                path,
                declared: None,
            }));
        } else if p.is_file() {
            out.push(Input {
                path: p,
                declared: None,
            });
        } else {
            return Err(read("no such file or folder".into()));
        }
    }
    Ok((out, 0))
}

/// A Bulk Data manifest's `output` files. A `url` may be a relative path (from the
/// manifest's folder), a `file:` URL, or the server's `http(s)` URL of a file
/// downloaded beside the manifest under the URL's last segment.
fn manifest(path: &Path) -> Result<(Vec<Input>, usize), FhirError> {
    let file = path.display().to_string();
    let bad = |reason: String| FhirError::Manifest {
        file: file.clone(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let json: Value = serde_json::from_str(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
    let output = json
        .get("output")
        .and_then(Value::as_array)
        .ok_or_else(|| bad("has no `output` list".into()))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut out = Vec::new();
    for (i, o) in output.iter().enumerate() {
        let field = |k: &str| {
            o.get(k)
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("output[{i}] has no `{k}` string")))
        };
        let (ty, url) = (field("type")?, field("url")?);
        let local = if let Some(p) = url.strip_prefix("file://") {
            PathBuf::from(p)
        } else if url.starts_with("https://") || url.starts_with("http://") {
            let last = url
                .trim_end_matches('/')
                .rsplit('/')
                .next()
                .filter(|s| !s.is_empty() && !s.contains(['?', '#']))
                .ok_or_else(|| {
                    bad(format!(
                        "output[{i}]: url {url:?} does not end in a file name"
                    ))
                })?;
            dir.join(last)
        } else {
            resolve(dir, url)
        };
        if !local.is_file() {
            return Err(bad(format!(
                "output[{i}] ({ty}): {} is not there; download the export's files beside the manifest",
                local.display()
            )));
        }
        out.push(Input {
            path: local,
            declared: Some(ty.to_string()),
        });
    }
    let errors = json
        .get("error")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    Ok((out, errors))
}

/// What one file gave each view.
struct FileOutput {
    tables: Vec<Table>,
    reports: Vec<ViewReport>,
    resources: BTreeMap<String, u64>,
    /// Lines in the piece read, so later pieces' line numbers can be made absolute.
    lines: u64,
}

/// One piece of one input: bytes `start..end`, both at line starts.
#[derive(Debug, Clone, Copy)]
struct Piece {
    input: usize,
    start: u64,
    end: u64,
}

/// Pieces of about `size` bytes each, every boundary moved to just after a line break,
/// so a large file is read by several threads (a one-file export would otherwise use
/// one core) and each line is read by exactly one piece.
fn pieces(inputs: &[Input], size: u64) -> Result<Vec<Piece>, FhirError> {
    let mut out = Vec::new();
    for (i, input) in inputs.iter().enumerate() {
        let read = |e: std::io::Error| FhirError::Read {
            file: input.path.display().to_string(),
            reason: e.to_string(),
        };
        let len = std::fs::metadata(&input.path).map_err(read)?.len();
        if len <= size {
            // One piece: nothing to look for a line break in.
            if len > 0 {
                out.push(Piece {
                    input: i,
                    start: 0,
                    end: len,
                });
            }
            continue;
        }
        let mut f = BufReader::new(std::fs::File::open(&input.path).map_err(read)?);
        let mut start = 0;
        while start < len {
            let target = start.saturating_add(size);
            let end = if target >= len {
                len
            } else {
                f.seek(std::io::SeekFrom::Start(target)).map_err(read)?;
                let mut skipped = Vec::new();
                let n = (&mut f)
                    .take(MAX_LINE_BYTES + 1)
                    .read_until(b'\n', &mut skipped)
                    .map_err(read)?;
                (target + n as u64).min(len)
            };
            out.push(Piece {
                input: i,
                start,
                end,
            });
            start = end;
        }
    }
    Ok(out)
}

/// Reads `piece` of `input`; line numbers are counted from the piece's start (`read_all`
/// makes them absolute).
fn read_piece(input: &Input, piece: Piece, views: &[View]) -> Result<FileOutput, FhirError> {
    let file = input.path.display().to_string();
    let io = |e: std::io::Error| FhirError::Read {
        file: file.clone(),
        reason: e.to_string(),
    };
    let mut f = std::fs::File::open(&input.path).map_err(io)?;
    f.seek(std::io::SeekFrom::Start(piece.start)).map_err(io)?;
    let mut reader = BufReader::with_capacity(1 << 20, f.take(piece.end - piece.start));
    let mut out = FileOutput {
        tables: views.iter().map(Table::new).collect(),
        reports: views.iter().map(ViewReport::of).collect(),
        resources: BTreeMap::new(),
        lines: 0,
    };
    let mut line = String::new();
    let mut n: u64 = 0;
    loop {
        line.clear();
        // At most one byte past the cap, so a file with no line breaks cannot fill the
        // node's memory before it is refused.
        let read = (&mut reader)
            .take(MAX_LINE_BYTES + 1)
            .read_line(&mut line)
            .map_err(|e| FhirError::Line {
                file: file.clone(),
                line: n + 1,
                reason: e.to_string(),
            })?;
        if read == 0 {
            break;
        }
        n += 1;
        if read as u64 > MAX_LINE_BYTES {
            return Err(FhirError::Line {
                file: file.clone(),
                line: n,
                reason: format!(
                    "longer than {} MiB: not one resource per line (is this NDJSON?)",
                    MAX_LINE_BYTES >> 20
                ),
            });
        }
        if line.trim().is_empty() {
            continue;
        }
        let at = |reason: String| FhirError::Line {
            file: file.clone(),
            line: n,
            reason,
        };
        let resource: Value =
            serde_json::from_str(&line).map_err(|e| at(format!("not JSON: {e}")))?;
        let Some(ty) = resource.get("resourceType").and_then(Value::as_str) else {
            return Err(at("not a FHIR resource (no resourceType)".into()));
        };
        if let Some(d) = &input.declared
            && d != ty
        {
            return Err(at(format!(
                "a {ty} resource in a file the manifest lists as {d}"
            )));
        }
        match out.resources.get_mut(ty) {
            Some(c) => *c += 1,
            None => {
                out.resources.insert(ty.to_string(), 1);
            }
        }
        for (i, v) in views.iter().enumerate() {
            if v.resource != ty {
                continue;
            }
            let report = &mut out.reports[i];
            report.read += 1;
            match v.rows(&resource) {
                Ok(rows) => {
                    report.kept += 1;
                    report.rows += rows.len() as u64;
                    for row in rows {
                        out.tables[i].push(row).map_err(&at)?;
                    }
                }
                Err(d) => report.note(
                    d.reason,
                    Drops {
                        count: 1,
                        element: d.element,
                        first: Location {
                            file: input.path.clone(),
                            line: n,
                        },
                    },
                ),
            }
        }
    }
    for t in &mut out.tables {
        t.flush().map_err(|reason| FhirError::Read {
            file: file.clone(),
            reason,
        })?;
    }
    out.lines = n;
    Ok(out)
}

/// Piece size: large enough that a piece's fixed costs vanish, small enough that a file
/// of a few hundred MB spreads over every core.
const PIECE_BYTES: u64 = 32 << 20;

/// Reads the files in pieces (`pieces`) on up to `available_parallelism` threads, then
/// joins the outputs in file and piece order with line numbers made absolute, so the
/// tables, the report and any error do not depend on the number of threads or pieces.
fn read_all(
    inputs: &[Input],
    views: &[View],
    piece_bytes: u64,
) -> Result<Vec<FileOutput>, FhirError> {
    let pieces = pieces(inputs, piece_bytes)?;
    let threads = std::thread::available_parallelism()
        .map_or(1, usize::from)
        .min(pieces.len())
        .max(1);
    let next = AtomicUsize::new(0);
    let mut results: Vec<Option<Result<FileOutput, FhirError>>> =
        (0..pieces.len()).map(|_| None).collect();
    let done: Vec<Vec<(usize, Result<FileOutput, FhirError>)>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(piece) = pieces.get(i) else { break };
                        let r = read_piece(&inputs[piece.input], *piece, views);
                        let failed = r.is_err();
                        mine.push((i, r));
                        if failed {
                            // Stop handing out pieces: the load fails anyway. Every
                            // earlier piece was handed out already, so the first error
                            // in file order is still found.
                            next.store(pieces.len(), Ordering::Relaxed);
                            break;
                        }
                    }
                    mine
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_default())
            .collect()
    });
    for (i, r) in done.into_iter().flatten() {
        results[i] = Some(r);
    }
    let mut out = Vec::with_capacity(pieces.len());
    // Lines before the current piece in its file.
    let (mut current, mut before) = (usize::MAX, 0u64);
    for (piece, r) in pieces.iter().zip(results) {
        if piece.input != current {
            (current, before) = (piece.input, 0);
        }
        match r {
            Some(Ok(mut o)) => {
                for report in &mut o.reports {
                    for d in report.dropped.values_mut() {
                        d.first.line += before;
                    }
                }
                before += o.lines;
                out.push(o);
            }
            Some(Err(FhirError::Line { file, line, reason })) => {
                return Err(FhirError::Line {
                    file,
                    line: line + before,
                    reason,
                });
            }
            Some(Err(e)) => return Err(e),
            None => {
                // A piece was left unread only because an earlier one failed, or a
                // worker panicked: either way the load cannot be complete.
                return Err(FhirError::Read {
                    file: inputs[piece.input].path.display().to_string(),
                    reason: "not read (the reader stopped)".into(),
                });
            }
        }
    }
    Ok(out)
}

/// The dataset's rows as the query gave them.
pub(crate) struct Rows {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
}

/// Reads and checks every view of `export` (files relative to `base_dir`): each against
/// the subset, names distinct.
fn load_views(export: &FhirExport, base_dir: &Path) -> Result<Vec<View>, FhirError> {
    let mut views = Vec::with_capacity(export.views.len());
    for v in &export.views {
        let p = resolve(base_dir, v);
        let file = p.display().to_string();
        let text = std::fs::read_to_string(&p).map_err(|e| FhirError::Read {
            file: file.clone(),
            reason: e.to_string(),
        })?;
        let json: Value = serde_json::from_str(&text).map_err(|e| FhirError::View {
            file: file.clone(),
            element: "(the view)".into(),
            reason: format!("is not JSON: {e}"),
        })?;
        let view = View::parse(&json).map_err(|e| FhirError::View {
            file: file.clone(),
            element: e.element,
            reason: e.reason,
        })?;
        if views.iter().any(|w: &View| w.name == view.name) {
            return Err(FhirError::View {
                file,
                element: "name".into(),
                reason: format!("{:?} is already the name of another view", view.name),
            });
        }
        views.push(view);
    }
    Ok(views)
}

/// What `phm policy check` checks of a FHIR source without reading the export: every
/// view against the subset, and that the query file can be read. Returns the views'
/// table names.
pub fn check(export: &FhirExport, base_dir: &Path) -> Result<Vec<String>, FhirError> {
    let views = load_views(export, base_dir)?;
    if let Some(q) = &export.query {
        let p = resolve(base_dir, q);
        std::fs::read_to_string(&p).map_err(|e| FhirError::Read {
            file: p.display().to_string(),
            reason: e.to_string(),
        })?;
    }
    Ok(views.into_iter().map(|v| v.name).collect())
}

/// Reads the export and gives the dataset's rows (as the query's result) and the load
/// report. `what` names the file the rows come from, for later errors.
pub(crate) async fn read(
    export: &FhirExport,
    base_dir: &Path,
) -> Result<(Rows, String, LoadReport), FhirError> {
    read_in_pieces(export, base_dir, PIECE_BYTES).await
}

/// [`read`], with files read in pieces of about `piece_bytes`.
async fn read_in_pieces(
    export: &FhirExport,
    base_dir: &Path,
    piece_bytes: u64,
) -> Result<(Rows, String, LoadReport), FhirError> {
    let views = load_views(export, base_dir)?;
    let (inputs, export_errors) = inputs(export, base_dir)?;
    let query = match &export.query {
        Some(q) => {
            let p = resolve(base_dir, q);
            let sql = std::fs::read_to_string(&p).map_err(|e| FhirError::Read {
                file: p.display().to_string(),
                reason: e.to_string(),
            })?;
            Some((p.display().to_string(), sql))
        }
        None => None,
    };
    let views = Arc::new(views);
    let (views2, inputs2) = (views.clone(), inputs.clone());
    let outputs = tokio::task::spawn_blocking(move || read_all(&inputs2, &views2, piece_bytes))
        .await
        .map_err(|e| FhirError::Read {
            file: "(the export)".into(),
            reason: format!("the reading task failed: {e}"),
        })??;

    let mut report = LoadReport {
        files: inputs.iter().map(|i| i.path.clone()).collect(),
        export_errors,
        views: views.iter().map(ViewReport::of).collect(),
        ..LoadReport::default()
    };
    let mut tables: Vec<Vec<RecordBatch>> = vec![Vec::new(); views.len()];
    for out in outputs {
        for (ty, c) in out.resources {
            *report.resources.entry(ty).or_default() += c;
        }
        for (i, (t, r)) in out.tables.into_iter().zip(out.reports).enumerate() {
            tables[i].extend(t.batches);
            let total = &mut report.views[i];
            total.read += r.read;
            total.kept += r.kept;
            total.rows += r.rows;
            for (reason, d) in r.dropped {
                total.note(reason, d);
            }
        }
    }

    let ctx = SessionContext::new();
    for (v, batches) in views.iter().zip(tables) {
        let mem = MemTable::try_new(schema(v), vec![batches]).map_err(|e| FhirError::Read {
            file: v.name.clone(),
            reason: e.to_string(),
        })?;
        ctx.register_table(v.name.as_str(), Arc::new(mem))
            .map_err(|e| FhirError::Read {
                file: v.name.clone(),
                reason: e.to_string(),
            })?;
    }
    let (file, sql) = match query {
        Some(q) => q,
        None => {
            // Validation allows no query only with one view.
            let v = &views[0];
            (
                resolve(base_dir, &export.views[0]).display().to_string(),
                format!("SELECT * FROM \"{}\"", v.name),
            )
        }
    };
    let q_err = |reason: String| FhirError::Query {
        file: file.clone(),
        reason,
    };
    // The IG lead's query may read the views' tables and nothing else: no DDL, no
    // DML, no SET or other statements, so a query file cannot change the session.
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx
        .sql_with_options(&sql, options)
        .await
        .map_err(|e| q_err(e.to_string()))?;
    // The result's schema, even when it has no rows: an empty result must still have
    // every column the policy names.
    let schema: SchemaRef = Arc::new(df.schema().as_arrow().clone());
    let batches = df.collect().await.map_err(|e| q_err(e.to_string()))?;
    report.dataset_rows = batches.iter().map(|b| b.num_rows() as u64).sum();
    Ok((Rows { schema, batches }, file, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `n` Observations, one in seven of another code (dropped), one in
    /// eleven with a partial date (dropped), as NDJSON.
    fn observations(n: usize) -> String {
        (0..n)
            .map(|i| {
                let code = if i % 7 == 3 { "x" } else { "271649006" };
                let date = if i % 11 == 5 { "2025-03".to_string() } else { format!("2025-03-{:02}", 1 + i % 28) };
                format!(
                    "{{\"resourceType\":\"Observation\",\"id\":\"o{i}\",\"code\":{{\"coding\":[{{\"system\":\"http://snomed.info/sct\",\"code\":\"{code}\"}}]}},\"subject\":{{\"reference\":\"Patient/p{}\"}},\"effectiveDateTime\":\"{date}\",\"valueQuantity\":{{\"value\":{}}}}}\n",
                    i % 40,
                    100 + i % 60
                )
            })
            .collect()
    }

    const VIEW: &str = r#"{"resourceType": "ViewDefinition", "name": "sbp", "resource": "Observation",
        "where": [{"path": "code.coding.where(system = 'http://snomed.info/sct' and code = '271649006').exists()"}],
        "select": [{"column": [
            {"name": "id", "path": "getResourceKey()"},
            {"name": "person_id", "path": "subject.getReferenceKey(Patient)"},
            {"name": "at", "path": "effectiveDateTime", "type": "date"},
            {"name": "sbp", "path": "valueQuantity.value", "type": "decimal"}]}]}"#;

    fn export(dir: &Path, files: &[&str]) -> FhirExport {
        std::fs::write(dir.join("v.json"), VIEW).unwrap();
        FhirExport {
            manifest: None,
            files: files.iter().map(|f| f.to_string()).collect(),
            views: vec!["v.json".into()],
            query: None,
        }
    }

    /// Reading in pieces (down to one line each) gives the same rows, the same report
    /// (first drops at the same absolute lines) and the same error at the same line as
    /// reading each file whole.
    #[tokio::test]
    async fn pieces_read_exactly_what_whole_files_do() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.ndjson"), observations(300)).unwrap();
        std::fs::write(
            dir.path().join("b.ndjson"),
            format!("\n{}", observations(77)),
        )
        .unwrap();
        let x = export(dir.path(), &["a.ndjson", "b.ndjson"]);
        let (whole, _, whole_report) = read_in_pieces(&x, dir.path(), u64::MAX).await.unwrap();
        let whole_rows =
            datafusion::arrow::compute::concat_batches(&whole.schema, &whole.batches).unwrap();
        for size in [1, 700, 5_000] {
            let (rows, _, report) = read_in_pieces(&x, dir.path(), size).await.unwrap();
            let rows =
                datafusion::arrow::compute::concat_batches(&rows.schema, &rows.batches).unwrap();
            assert_eq!(rows, whole_rows, "pieces of {size} bytes");
            assert_eq!(report, whole_report, "pieces of {size} bytes");
        }
        let v = &whole_report.views[0];
        assert_eq!(v.read, 377);
        assert_eq!(v.dropped[&DropReason::NoMatchingCoding].first.line, 4);
        assert_eq!(v.dropped[&DropReason::PartialDate].first.line, 6);

        let mut text = observations(200);
        text.push_str("{not json\n");
        text.push_str(&observations(50));
        std::fs::write(dir.path().join("c.ndjson"), text).unwrap();
        let x = export(dir.path(), &["a.ndjson", "c.ndjson"]);
        for size in [u64::MAX, 1, 900] {
            let Err(e) = read_in_pieces(&x, dir.path(), size).await else {
                panic!("a bad line was read");
            };
            assert!(
                e.to_string().contains("c.ndjson, line 201: not JSON"),
                "{size}: {e}"
            );
        }
    }
}
