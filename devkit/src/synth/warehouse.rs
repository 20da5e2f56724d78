//! The synthetic ICS with its data in PostgreSQL instead of Parquet: each partner gets
//! its own database (as each has its own warehouse), each dataset a table loaded with
//! COPY from the very rows of its Parquet file, a view the node reads, and a role that
//! may SELECT that view and nothing else. The partner's policy then names the view, and
//! the connection string goes in a secret file beside it (never in the policy).
//!
//! `phm demo --postgres` and the warehouse end-to-end test run the federation this way,
//! so the same questions are answered from both and can be compared.

use std::path::Path;

use datafusion::arrow::datatypes::DataType;
use datafusion::dataframe::DataFrameWriteOptions;
use datafusion::prelude::{ParquetReadOptions, SessionContext};

use crate::postgres::Server;

/// The secret file (beside each partner's policy) that holds its connection string.
pub const DSN_FILE: &str = "warehouse.dsn";

/// The SQL type a Parquet column is stored as.
fn sql_type(t: &DataType) -> Result<&'static str, String> {
    Ok(match t {
        DataType::Int8 | DataType::Int16 | DataType::Int32 => "int4",
        DataType::Int64 | DataType::UInt8 | DataType::UInt16 | DataType::UInt32 => "int8",
        DataType::Float16 | DataType::Float32 | DataType::Float64 => "float8",
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => "text",
        DataType::Dictionary(_, v) if matches!(**v, DataType::Utf8 | DataType::LargeUtf8) => "text",
        DataType::Boolean => "bool",
        DataType::Date32 | DataType::Date64 => "date",
        other => return Err(format!("no PostgreSQL type for Parquet type {other}")),
    })
}

/// Creates table `table` in `db` with the columns of the Parquet file `parquet` and
/// loads its rows with COPY (through a CSV written in `scratch`, removed after).
pub(crate) async fn copy_parquet(
    server: &Server,
    db: &str,
    ctx: &SessionContext,
    parquet: &Path,
    table: &str,
    scratch: &Path,
) -> Result<(), String> {
    let parquet_str = parquet.to_string_lossy().into_owned();
    let df = ctx
        .read_parquet(
            &parquet_str,
            ParquetReadOptions::default().file_extension(""),
        )
        .await
        .map_err(|e| format!("{}: {e}", parquet.display()))?;
    let columns = df
        .schema()
        .fields()
        .iter()
        .map(|f| Ok(format!("{} {}", quote(f.name()), sql_type(f.data_type())?)))
        .collect::<Result<Vec<_>, String>>()?;
    server.psql(
        db,
        &format!("CREATE TABLE {} ({})", quote(table), columns.join(", ")),
    )?;
    let csv = scratch.join(format!("{table}.copy.csv"));
    let csv_str = csv.to_string_lossy().into_owned();
    df.write_csv(
        &csv_str,
        DataFrameWriteOptions::new().with_single_file_output(true),
        None,
    )
    .await
    .map_err(|e| format!("{}: {e}", csv.display()))?;
    let data = std::fs::read(&csv).map_err(|e| format!("{}: {e}", csv.display()))?;
    let _ = std::fs::remove_file(&csv);
    server.psql_stdin(
        db,
        &format!(
            "COPY {} FROM STDIN WITH (FORMAT csv, HEADER true)",
            quote(table)
        ),
        &data,
    )?;
    Ok(())
}

pub(crate) fn quote(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Moves every dataset of partner folder `org_dir` (its `policy.toml` and `data/`) into
/// database `db` on `server` (replaced if it exists), with a role `<db>_reader` that may
/// SELECT the datasets' views and nothing else, and rewrites the policy to read them.
pub async fn move_partner(server: &Server, org_dir: &Path, db: &str) -> Result<(), String> {
    let db = db.to_string();
    // A demo folder replaced by a new run: its old database goes too.
    server.psql(
        "postgres",
        &format!("DROP DATABASE IF EXISTS {}", quote(&db)),
    )?;
    server.create_database(&db)?;
    let role = format!("{db}_reader");
    server.psql(
        &db,
        &format!(
            "DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{role}') THEN CREATE ROLE {} LOGIN; END IF; END $$",
            quote(&role)
        ),
    )?;
    let policy_path = org_dir.join("policy.toml");
    let text = std::fs::read_to_string(&policy_path)
        .map_err(|e| format!("cannot read {}: {e}", policy_path.display()))?;
    let mut doc: toml::Table =
        toml::from_str(&text).map_err(|e| format!("{}: {e}", policy_path.display()))?;
    let datasets = doc
        .get_mut("datasets")
        .and_then(|d| d.as_array_mut())
        .ok_or_else(|| format!("{}: no datasets", policy_path.display()))?;
    let ctx = SessionContext::new();
    for ds in datasets.iter_mut() {
        let ds = ds
            .as_table_mut()
            .ok_or_else(|| format!("{}: a dataset is not a table", policy_path.display()))?;
        let name = ds
            .get("name")
            .and_then(|n| n.as_str())
            .ok_or_else(|| format!("{}: a dataset has no name", policy_path.display()))?
            .to_string();
        let file = ds
            .get("source")
            .and_then(|s| s.get("path"))
            .and_then(|p| p.as_str())
            .ok_or_else(|| format!("{}: dataset {name} has no file", policy_path.display()))?;
        let table = format!("{name}_rows");
        copy_parquet(server, &db, &ctx, &org_dir.join(file), &table, org_dir).await?;
        // The view is what the DBA owns and the node reads: here it is the table as is.
        server.psql(
            &db,
            &format!(
                "ANALYZE {t}; CREATE VIEW {v} AS SELECT * FROM {t}; GRANT SELECT ON {v} TO {r}",
                t = quote(&table),
                v = quote(&name),
                r = quote(&role)
            ),
        )?;
        let mut source = toml::Table::new();
        source.insert("format".into(), "postgres".into());
        source.insert("relation".into(), name.clone().into());
        source.insert("dsn_file".into(), DSN_FILE.into());
        ds.insert("source".into(), toml::Value::Table(source));
    }
    let dsn_path = org_dir.join(DSN_FILE);
    std::fs::write(&dsn_path, server.dsn_as(&db, &role))
        .map_err(|e| format!("cannot write {}: {e}", dsn_path.display()))?;
    let text = toml::to_string(&doc).map_err(|e| e.to_string())?;
    std::fs::write(&policy_path, text)
        .map_err(|e| format!("cannot write {}: {e}", policy_path.display()))?;
    Ok(())
}
