//! Datasets that live in a SQL warehouse (PostgreSQL): the node never reads their rows.
//! Each query is one read-only statement (`template`) that runs the whole bounded
//! aggregation inside the database and returns one row per cell; load's checks are
//! aggregate statements too. Every statement gets its own connection and a read-only
//! transaction with a server-side statement timeout, and a result with more rows than
//! the query has cells is refused with nothing released.
//!
//! The connection string comes from an environment variable or a secret file, never
//! the policy, and no message here ever repeats it.

pub(crate) mod template;
mod tls;

use std::collections::HashMap;
use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::array::{
    ArrayRef, BooleanArray, Date32Array, Float64Array, Int64Array, RecordBatch, StringArray,
};
use datafusion::arrow::datatypes::{DataType, Field, Schema};
use futures::TryStreamExt;
use phm_policies::model::{ColumnType, Dataset, Warehouse};
use tokio_postgres::config::SslMode;
use tokio_postgres::types::{FromSql, IsNull, ToSql, Type, to_sql_checked};
use tokio_postgres::{Config, NoTls, Row};

use super::clamp::MAX_VALUES_PER_CELL;
use super::load::{ColumnCheck, DataError, LoadedDataset, days_of_date, resolve};
use super::plan;
use template::{Dialect, KeyType, Param, Postgres, Relation, Statement};

/// Why a statement sent to the warehouse gave no usable answer. No message carries the
/// connection string.
#[derive(Debug, Clone, thiserror::Error)]
pub enum WarehouseError {
    #[error("cannot connect to the warehouse: {0}")]
    Connect(String),
    #[error(
        "the warehouse cancelled the statement after the dataset's statement_timeout_seconds ({0} s)"
    )]
    Timeout(u32),
    #[error("the connection to the warehouse was lost before the answer was complete")]
    Lost,
    #[error("the warehouse refused the statement: {message} (SQLSTATE {code})")]
    Refused { code: String, message: String },
    #[error(
        "the warehouse returned more than the {0} row(s) this query can have (one per cell); nothing is released"
    )]
    TooManyRows(usize),
    #[error("the warehouse's answer could not be read: {0}")]
    Decode(String),
}

impl WarehouseError {
    /// True when trying again later may succeed (the warehouse was down, slow or
    /// unreachable), as opposed to a statement or data it refuses.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            WarehouseError::Connect(_) | WarehouseError::Timeout(_) | WarehouseError::Lost
        )
    }
}

/// A dataset's warehouse relation and how to reach it.
pub(crate) struct Source {
    /// As the policy wrote it, for messages.
    relation: String,
    /// Quoted for SQL.
    quoted: String,
    config: Config,
    tls: Option<tls::MakeRustls>,
    timeout_seconds: u32,
    person_type: ColumnType,
}

impl std::fmt::Debug for Source {
    // The configuration holds the password: it is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("relation", &self.relation)
            .field("tls", &self.tls.is_some())
            .field("timeout_seconds", &self.timeout_seconds)
            .finish()
    }
}

/// How long past the server's statement timeout the node waits for an answer before it
/// gives up on the connection itself (a network that drops packets silently).
const CLIENT_GRACE: Duration = Duration::from_secs(30);
/// How long a connection attempt may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

impl Source {
    /// The relation as the template reads it, for dataset `ds`.
    pub(crate) fn relation<'a>(&'a self, ds: &'a LoadedDataset) -> Relation<'a> {
        Relation {
            dialect: &Postgres,
            relation: &self.quoted,
            dataset: ds.table.table(),
            columns: &ds.columns,
            person_id: &ds.person_id,
            person_type: self.person_type,
        }
    }

    /// Runs one query's statement and returns its cells as the batch the DataFusion
    /// aggregation would have produced, for `plan::read_back`.
    pub(crate) async fn aggregate(
        &self,
        statement: &Statement,
    ) -> Result<Vec<RecordBatch>, super::EngineError> {
        let rows = match self
            .rows(&statement.sql, &statement.params, statement.max_rows)
            .await
        {
            // F12: the number of observed keys is data; the refusal is the same fixed
            // sentence the DataFusion path gives.
            Err(WarehouseError::TooManyRows(_)) if statement.observed => {
                return Err(super::EngineError::TooManyGroups);
            }
            // `plan::read_back` refuses more than MAX_CELLS observed keys, as it does
            // for a file.
            r => r?,
        };
        Ok(vec![to_batch(statement, &rows)?])
    }

    /// Runs a cohort statement (`template::render_cohort`) and returns its rows as one
    /// batch: the key columns `g(i)` and the link key, as text, named `link`.
    pub(crate) async fn cohort(
        &self,
        statement: &Statement,
        link: &str,
    ) -> Result<Vec<RecordBatch>, super::EngineError> {
        let rows = self
            .rows(&statement.sql, &statement.params, statement.max_rows)
            .await?;
        let (mut fields, mut arrays) = key_arrays(statement, &rows)?;
        let idx = statement.keys.len();
        fields.push(Field::new(link, DataType::Utf8, true));
        arrays.push(Arc::new(StringArray::from(column::<String>(&rows, idx)?)));
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
            .map_err(|e| WarehouseError::Decode(e.to_string()))?;
        Ok(vec![batch])
    }

    /// Runs `sql` in a fresh read-only transaction under the statement timeout and
    /// returns its rows, or `TooManyRows` as soon as there are more than `max_rows`.
    pub(crate) async fn rows(
        &self,
        sql: &str,
        params: &[Param],
        max_rows: usize,
    ) -> Result<Vec<Row>, WarehouseError> {
        self.rows_sorting(sql, params, max_rows, false).await
    }

    /// [`Source::rows`], with hash aggregation off when `sort` (a group-by over
    /// millions of people: sorting does it in memory-bounded passes, where a hash
    /// table that spills took about 2.4 times as long at 10M rows).
    async fn rows_sorting(
        &self,
        sql: &str,
        params: &[Param],
        max_rows: usize,
        sort: bool,
    ) -> Result<Vec<Row>, WarehouseError> {
        let limit = Duration::from_secs(u64::from(self.timeout_seconds)) + CLIENT_GRACE;
        let work = async {
            let mut client = match &self.tls {
                Some(tls) => spawn(self.config.connect(tls.clone()).await)?,
                None => spawn(self.config.connect(NoTls).await)?,
            };
            let describe = |e| describe(e, self.timeout_seconds);
            let tx = client
                .build_transaction()
                .read_only(true)
                .start()
                .await
                .map_err(describe)?;
            let ms = (u64::from(self.timeout_seconds) * 1000).to_string();
            // set_config(…, true) is SET LOCAL: it ends with the transaction, and its
            // value is a parameter like any other.
            let hashagg = if sort { "off" } else { "on" };
            tx.execute(
                "SELECT set_config('statement_timeout', $1::text, true), \
                 set_config('work_mem', '64MB', true), set_config('DateStyle', 'ISO', true), \
                 set_config('enable_hashagg', $2::text, true)",
                &[&ms, &hashagg],
            )
            .await
            .map_err(describe)?;
            let stream = tx
                .query_raw(sql, params.iter().map(|p| p as &(dyn ToSql + Sync)))
                .await
                .map_err(describe)?;
            futures::pin_mut!(stream);
            let mut out = Vec::new();
            while let Some(row) = stream.try_next().await.map_err(describe)? {
                if out.len() == max_rows {
                    return Err(WarehouseError::TooManyRows(max_rows));
                }
                out.push(row);
            }
            // Nothing was written; ending the transaction either way is the same.
            tx.rollback().await.map_err(describe)?;
            Ok(out)
        };
        tokio::time::timeout(limit, work)
            .await
            .unwrap_or(Err(WarehouseError::Lost))
    }
}

/// Starts the connection's task and returns its client.
fn spawn<S, T>(
    r: Result<(tokio_postgres::Client, tokio_postgres::Connection<S, T>), tokio_postgres::Error>,
) -> Result<tokio_postgres::Client, WarehouseError>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (client, connection) = r.map_err(|e| WarehouseError::Connect(connect_reason(&e)))?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "warehouse connection ended with an error");
        }
    });
    Ok(client)
}

/// Why a connection failed, in the server's or the socket's words (tokio-postgres's
/// messages name neither the password nor the connection string).
fn connect_reason(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} (SQLSTATE {})", db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(inner) = source {
                s = format!("{s}: {inner}");
                source = inner.source();
            }
            s
        }
    }
}

/// A statement's failure as the node reports it.
fn describe(e: tokio_postgres::Error, timeout_seconds: u32) -> WarehouseError {
    if let Some(db) = e.as_db_error() {
        use tokio_postgres::error::SqlState;
        if db.code() == &SqlState::QUERY_CANCELED {
            return WarehouseError::Timeout(timeout_seconds);
        }
        // The server ended the session (an administrator, a shutdown, a crash).
        if [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
        ]
        .contains(db.code())
        {
            return WarehouseError::Lost;
        }
        return WarehouseError::Refused {
            code: db.code().code().to_string(),
            message: db.message().to_string(),
        };
    }
    if e.is_closed() {
        return WarehouseError::Lost;
    }
    WarehouseError::Decode(connect_reason(&e))
}

impl ToSql for Param {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Param::Int(v) => v.to_sql(ty, out),
            Param::Real(v) => v.to_sql(ty, out),
            Param::Text(v) => v.to_sql(ty, out),
            Param::Bool(v) => v.to_sql(ty, out),
            Param::Date(v) => v.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        // Every placeholder is cast to its parameter's type (`$n::int8`), so the server
        // asks for exactly these; `to_sql_checked` then checks the value matches.
        [Type::INT8, Type::FLOAT8, Type::TEXT, Type::BOOL, Type::DATE].contains(ty)
    }

    to_sql_checked!();
}

/// One output column of `rows` as values of `T`.
fn column<'a, T: FromSql<'a>>(
    rows: &'a [Row],
    idx: usize,
) -> Result<Vec<Option<T>>, WarehouseError> {
    rows.iter()
        .map(|r| {
            r.try_get::<_, Option<T>>(idx)
                .map_err(|e| WarehouseError::Decode(format!("column {idx}: {e}")))
        })
        .collect()
}

/// The statement's rows as one batch named as the DataFusion aggregation names its
/// output: keys `g(i)`, rows `N`, and per value column its sum `s(j)` and count `c(j)`.
fn to_batch(statement: &Statement, rows: &[Row]) -> Result<RecordBatch, WarehouseError> {
    let (mut fields, mut arrays) = key_arrays(statement, rows)?;
    let mut int = |name: String, idx: usize| -> Result<(), WarehouseError> {
        fields.push(Field::new(name, DataType::Int64, true));
        arrays.push(Arc::new(Int64Array::from(column::<i64>(rows, idx)?)));
        Ok(())
    };
    let base = statement.keys.len();
    int(plan::N.to_string(), base)?;
    for j in 0..statement.values {
        int(plan::s(j), base + 1 + 2 * j)?;
        int(plan::c(j), base + 2 + 2 * j)?;
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)
        .map_err(|e| WarehouseError::Decode(e.to_string()))
}

/// The key columns `g(i)` of a statement's rows, each of its policy type (a bin index
/// as Int64), as the DataFusion plan's key columns are.
fn key_arrays(
    statement: &Statement,
    rows: &[Row],
) -> Result<(Vec<Field>, Vec<ArrayRef>), WarehouseError> {
    let mut fields = Vec::new();
    let mut arrays: Vec<ArrayRef> = Vec::new();
    for (i, key) in statement.keys.iter().enumerate() {
        let array: ArrayRef = match key {
            KeyType::Bin | KeyType::Column(ColumnType::Integer) => {
                Arc::new(Int64Array::from(column::<i64>(rows, i)?))
            }
            KeyType::Column(ColumnType::Real) => {
                Arc::new(Float64Array::from(column::<f64>(rows, i)?))
            }
            KeyType::Column(ColumnType::Text) => {
                Arc::new(StringArray::from(column::<String>(rows, i)?))
            }
            KeyType::Column(ColumnType::Boolean) => {
                Arc::new(BooleanArray::from(column::<bool>(rows, i)?))
            }
            KeyType::Column(ColumnType::Date) => {
                let days = column::<chrono::NaiveDate>(rows, i)?
                    .into_iter()
                    .map(|d| {
                        d.map(|d| {
                            days_of_date(d).ok_or_else(|| {
                                WarehouseError::Decode("a date is out of range".into())
                            })
                        })
                        .transpose()
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Arc::new(Date32Array::from(days))
            }
        };
        fields.push(Field::new(plan::g(i), array.data_type().clone(), true));
        arrays.push(array);
    }
    Ok((fields, arrays))
}

/// Whether a PostgreSQL column type (`format_type` of its base type) holds the policy's
/// declared type without loss.
fn compatible(pg: &str, declared: ColumnType) -> bool {
    let integer = matches!(pg, "smallint" | "integer" | "bigint");
    match declared {
        ColumnType::Integer => integer,
        ColumnType::Real => integer || matches!(pg, "real" | "double precision" | "numeric"),
        ColumnType::Text => matches!(pg, "text" | "character varying" | "character"),
        ColumnType::Boolean => pg == "boolean",
        ColumnType::Date => pg == "date",
    }
}

/// The connection string, from the environment variable or the secret file.
fn connection_string(w: &Warehouse, base_dir: &Path) -> Result<String, String> {
    if let Some(var) = &w.dsn_env {
        return std::env::var(var).map_err(|_| {
            format!("the environment variable {var} (dsn_env) is not set, or not valid UTF-8")
        });
    }
    let Some(file) = &w.dsn_file else {
        return Err("the source names no dsn_env or dsn_file".into());
    };
    let path = resolve(base_dir, file);
    std::fs::read_to_string(&path)
        .map(|s| s.trim().to_string())
        .map_err(|e| format!("cannot read dsn_file {}: {e}", path.display()))
}

/// The client configuration: the connection string with the node's own timeouts and,
/// when the policy names a `ca_file`, TLS verified against it.
fn config_for(w: &Warehouse, base_dir: &Path) -> Result<(Config, Option<tls::MakeRustls>), String> {
    let dsn = connection_string(w, base_dir)?;
    // The parser's message could quote the string (and its password): not repeated.
    let mut config = Config::from_str(&dsn).map_err(|_| {
        "the connection string is not a valid libpq key/value string or postgresql:// URL"
            .to_string()
    })?;
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.application_name("phm-node");
    let tls = match &w.ca_file {
        Some(ca) => {
            let path = resolve(base_dir, ca);
            let pem = std::fs::read(&path)
                .map_err(|e| format!("cannot read ca_file {}: {e}", path.display()))?;
            let tls = tls::MakeRustls::new(&pem)
                .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            config.ssl_mode(SslMode::Require);
            Some(tls)
        }
        None => {
            if config.get_ssl_mode() == SslMode::Require {
                return Err(
                    "the connection string asks for TLS (sslmode=require): name the server's certificate authority in the source's ca_file, so the node can verify whom it is talking to".into(),
                );
            }
            config.ssl_mode(SslMode::Disable);
            let remote = config.get_hosts().iter().any(|h| match h {
                tokio_postgres::config::Host::Tcp(name) => {
                    !matches!(name.as_str(), "localhost" | "127.0.0.1" | "::1")
                }
                #[cfg(unix)]
                tokio_postgres::config::Host::Unix(_) => false,
            });
            if remote {
                tracing::warn!(
                    relation = %w.relation,
                    "the warehouse is reached over the network without TLS: set the source's ca_file so the connection is encrypted and the server verified"
                );
            }
            None
        }
    };
    Ok((config, tls))
}

/// Connects to the warehouse, checks the relation against the policy with aggregate
/// statements (column types, values in their domains and bounds, every row naming a
/// person, the row count), and returns the source queries run against.
pub(crate) async fn load(
    ds: &Dataset,
    w: &Warehouse,
    checks: &[ColumnCheck],
    base_dir: &Path,
) -> Result<Source, DataError> {
    let fail = |reason: String| DataError::Warehouse {
        dataset: ds.name.clone(),
        relation: w.relation.clone(),
        reason,
    };
    let (config, tls) = config_for(w, base_dir).map_err(fail)?;
    let quoted = w
        .relation
        .split('.')
        .map(|p| Postgres.quote(p))
        .collect::<Vec<_>>()
        .join(".");
    let mut source = Source {
        relation: w.relation.clone(),
        quoted,
        config,
        tls,
        timeout_seconds: w.statement_timeout_seconds,
        person_type: ColumnType::Text,
    };
    let types = source
        .column_types()
        .await
        .map_err(|e| fail(e.to_string()))?;
    let Some(types) = types else {
        return Err(fail(
            "no such table or view, or the node's role may not see it (it needs SELECT on this relation only)".into(),
        ));
    };
    let file = format!("postgres relation {}", w.relation);
    for c in checks {
        let Some(found) = types.get(&c.name) else {
            return Err(DataError::MissingColumn {
                dataset: ds.name.clone(),
                file: file.clone(),
                column: c.name.clone(),
            });
        };
        if !compatible(found, c.ty) {
            return Err(DataError::WrongType {
                dataset: ds.name.clone(),
                file: file.clone(),
                column: c.name.clone(),
                expected: super::type_name(c.ty),
                found: found.clone(),
            });
        }
    }
    let person = types
        .get(&ds.person_id)
        .ok_or_else(|| DataError::MissingColumn {
            dataset: ds.name.clone(),
            file: file.clone(),
            column: ds.person_id.clone(),
        })?;
    source.person_type = if compatible(person, ColumnType::Integer) {
        ColumnType::Integer
    } else if compatible(person, ColumnType::Text) {
        ColumnType::Text
    } else {
        return Err(DataError::WrongType {
            dataset: ds.name.clone(),
            file,
            column: ds.person_id.clone(),
            expected: "a text or integer column",
            found: person.clone(),
        });
    };
    source.check_values(ds, checks).await?;
    Ok(source)
}

impl Source {
    /// The person id's type as the warehouse holds it (integer or text).
    pub(crate) fn person_type(&self) -> ColumnType {
        self.person_type
    }

    /// Each column's type (`format_type` of its base type, so a domain over `text`
    /// reads as text), or `None` when the relation does not exist or is not visible.
    async fn column_types(&self) -> Result<Option<HashMap<String, String>>, WarehouseError> {
        // One statement: a row saying whether the relation exists, with each of its
        // columns (none when it does not).
        let sql = "SELECT r.oid IS NOT NULL, a.attname::text, \
                   format_type(CASE WHEN t.typtype = 'd' THEN t.typbasetype ELSE a.atttypid END, NULL) \
                   FROM (SELECT to_regclass($1::text) AS oid) AS r \
                   LEFT JOIN pg_attribute a ON a.attrelid = r.oid AND a.attnum > 0 AND NOT a.attisdropped \
                   LEFT JOIN pg_type t ON t.oid = a.atttypid";
        let rows = self
            .rows(sql, &[Param::Text(self.quoted.clone())], 10_000)
            .await?;
        let decode = |e: tokio_postgres::Error| WarehouseError::Decode(e.to_string());
        let mut out = HashMap::new();
        for r in rows {
            if !r.try_get::<_, bool>(0).map_err(decode)? {
                return Ok(None);
            }
            let name: Option<String> = r.try_get(1).map_err(decode)?;
            let ty: Option<String> = r.try_get(2).map_err(decode)?;
            if let (Some(name), Some(ty)) = (name, ty) {
                out.insert(name, ty);
            }
        }
        Ok(Some(out))
    }

    /// One aggregate statement counts, per check, the rows that break it (and shows
    /// the smallest offending value), the rows naming no person, and all rows.
    async fn check_values(&self, ds: &Dataset, checks: &[ColumnCheck]) -> Result<(), DataError> {
        let types: HashMap<String, ColumnType> =
            checks.iter().map(|c| (c.name.clone(), c.ty)).collect();
        let rel = Relation {
            dialect: &Postgres,
            relation: &self.quoted,
            dataset: &ds.name,
            columns: &types,
            person_id: &ds.person_id,
            person_type: self.person_type,
        };
        let mut params = template::Params::default();
        let mut conditions: Vec<(String, &'static str, String)> = Vec::new();
        for c in checks {
            let q = Postgres.quote(&c.name);
            if c.required {
                conditions.push((
                    c.name.clone(),
                    "is empty (NULL), but the policy declares this column never_null",
                    format!("{q} IS NULL"),
                ));
            }
            if c.ty == ColumnType::Real {
                conditions.push((
                    c.name.clone(),
                    "is not a finite number (NaN or infinite)",
                    format!(
                        "CAST({q} AS float8) IN (CAST('NaN' AS float8), CAST('Infinity' AS float8), CAST('-Infinity' AS float8))"
                    ),
                ));
            }
            if let Some(labels) = &c.categories {
                let mut placeholders = Vec::new();
                let mut labels: Vec<&String> = labels.iter().collect();
                labels.sort();
                for l in labels {
                    let p =
                        Param::of_label(&c.name, c.ty, l).map_err(|e| DataError::Declaration {
                            dataset: ds.name.clone(),
                            reason: e.to_string(),
                        })?;
                    placeholders.push(params.bind(&Postgres, p));
                }
                conditions.push((
                    c.name.clone(),
                    "is not in the declared domain",
                    format!(
                        "{} NOT IN ({})",
                        rel.read(&c.name, c.ty),
                        placeholders.join(", ")
                    ),
                ));
            }
            if let Some((lo, hi)) = c.bounds {
                let x = rel.read(&c.name, ColumnType::Real);
                let lo_p = params.bind(&Postgres, Param::Real(lo));
                let hi_p = params.bind(&Postgres, Param::Real(hi));
                conditions.push((
                    c.name.clone(),
                    "is outside the declared bounds of this group key",
                    format!("({x} < {lo_p} OR {x} > {hi_p})"),
                ));
            }
        }
        let mut select = vec![
            "count(*)".to_string(),
            format!("count(*) FILTER (WHERE NOT {})", rel.has_person()),
        ];
        for (name, _, cond) in &conditions {
            select.push(format!("count(*) FILTER (WHERE {cond})"));
            select.push(format!(
                "min(CAST({} AS text)) FILTER (WHERE {cond})",
                Postgres.quote(name)
            ));
        }
        let sql = format!("SELECT {} FROM {}", select.join(", "), self.quoted);
        let fail = |e: WarehouseError| DataError::Warehouse {
            dataset: ds.name.clone(),
            relation: self.relation.clone(),
            reason: e.to_string(),
        };
        let rows = self
            .rows(&sql, &params.into_values(), 1)
            .await
            .map_err(fail)?;
        let row = rows
            .first()
            .ok_or_else(|| fail(WarehouseError::Decode("the check returned no row".into())))?;
        let int = |i: usize| -> Result<i64, DataError> {
            row.try_get::<_, i64>(i)
                .map_err(|e| fail(WarehouseError::Decode(e.to_string())))
        };
        let total = int(0)?;
        if total > MAX_VALUES_PER_CELL {
            return Err(DataError::TooManyRows {
                dataset: ds.name.clone(),
                file: format!("postgres relation {}", self.relation),
                rows: u64::try_from(total).unwrap_or(u64::MAX),
                max: MAX_VALUES_PER_CELL,
            });
        }
        let no_person = int(1)?;
        if no_person > 0 {
            return Err(DataError::WarehouseValues {
                dataset: ds.name.clone(),
                relation: self.relation.clone(),
                column: ds.person_id.clone(),
                count: no_person,
                reason: "is missing (NULL, empty or blank): every row must name its person, or contribution bounding cannot hold",
                example: None,
            });
        }
        for (k, (name, reason, _)) in conditions.iter().enumerate() {
            let bad = int(2 + 2 * k)?;
            if bad > 0 {
                let example = row.try_get::<_, Option<String>>(3 + 2 * k).ok().flatten();
                return Err(DataError::WarehouseValues {
                    dataset: ds.name.clone(),
                    relation: self.relation.clone(),
                    column: name.clone(),
                    count: bad,
                    reason,
                    example,
                });
            }
        }
        self.note_people_over(ds, &rel).await.map_err(fail)?;
        Ok(())
    }

    /// Logs how many people have more rows than `max_rows_per_person`: bounding drops
    /// their extra rows at every query (it always runs on a warehouse source).
    async fn note_people_over(
        &self,
        ds: &Dataset,
        rel: &Relation<'_>,
    ) -> Result<(), WarehouseError> {
        let sql = format!(
            "SELECT count(*) FROM (SELECT 1 FROM {} WHERE {} GROUP BY {} HAVING count(*) > $1::int8) AS phm_over",
            self.quoted,
            rel.has_person(),
            Postgres.quote(&ds.person_id)
        );
        let rows = self
            .rows_sorting(
                &sql,
                &[Param::Int(i64::from(ds.max_rows_per_person))],
                1,
                true,
            )
            .await?;
        let over: i64 = rows
            .first()
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(|e| WarehouseError::Decode(e.to_string()))?
            .unwrap_or(0);
        tracing::info!(
            dataset = %ds.name,
            relation = %self.relation,
            people_over_limit = over,
            max_rows_per_person = ds.max_rows_per_person,
            "warehouse relation checked; contribution bounding runs at every query"
        );
        Ok(())
    }
}
