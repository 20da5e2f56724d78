//! `phm query`, `phm budget` and `phm audit verify`: argument definitions and what they
//! do, kept in the library so the demo and tests drive exactly the same code.

use crate::client::{self, ClientError, Connection, exit};
use crate::render;
use clap::{Args, Subcommand, ValueEnum};
use phm_proto::Purpose;
use phm_proto::proto::{self, NodeOutcome};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
}

/// Coordinator address and TLS material, shared by `query` and `budget`.
#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Coordinator URL, e.g. https://127.0.0.1:50050.
    #[arg(long, env = "PHM_COORDINATOR")]
    pub coordinator: String,
    /// CA certificate (PEM) the coordinator's certificate chains to (the
    /// infrastructure CA, certs/ca.pem).
    #[arg(long, env = "PHM_CA", value_name = "FILE")]
    pub ca: Option<PathBuf>,
    /// Your client certificate (PEM, from the people CA); always presented, the
    /// coordinator requires one. Default: the folder of --ca, file REQUESTER-client.pem.
    #[arg(long, env = "PHM_CLIENT_CERT", value_name = "FILE")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) of --cert (default: the .key file beside it).
    #[arg(long, env = "PHM_CLIENT_KEY", value_name = "FILE")]
    pub cert_key: Option<PathBuf>,
}

impl ConnectArgs {
    pub fn connection(&self) -> Connection {
        Connection {
            url: self.coordinator.clone(),
            ca: self.ca.clone(),
            cert: self.cert.clone(),
            cert_key: self.cert_key.clone(),
            connect_timeout: None,
        }
    }
}

/// The requester's signing key and identity.
#[derive(Debug, Clone, Args)]
pub struct KeyArgs {
    /// The requester's Ed25519 private key (from `phm keys new`).
    #[arg(long, env = "PHM_KEY", value_name = "FILE")]
    pub key: PathBuf,
    /// Requester id as node policies list it (default: the key file's stem).
    #[arg(long)]
    pub requester: Option<String>,
    /// The federation to sign for (the `federation_id` of its coordinator and
    /// nodes); a signature is valid in that federation only.
    #[arg(long, env = "PHM_FEDERATION")]
    pub federation: String,
}

impl KeyArgs {
    fn load(&self) -> Result<(String, phm_proto::signing::PrivateKey), ClientError> {
        let key = crate::keys::load_private_key(&self.key)
            .map_err(|e| ClientError::Input(e.to_string()))?;
        let requester = match &self.requester {
            Some(r) => r.clone(),
            None => crate::keys::requester_from_path(&self.key).ok_or_else(|| {
                ClientError::Input(format!(
                    "cannot take a requester id from {}; give --requester",
                    self.key.display()
                ))
            })?,
        };
        Ok((requester, key))
    }
}

/// Who is asking (requester id and signing key) and an open channel to the
/// coordinator, presenting that requester's client certificate: where every command
/// that talks to the coordinator starts.
async fn sign_in(
    key: &KeyArgs,
    connect: &ConnectArgs,
) -> Result<
    (
        String,
        phm_proto::signing::PrivateKey,
        client::Connection,
        tonic::transport::Channel,
    ),
    ClientError,
> {
    let (requester, key) = key.load()?;
    let connection = client::with_default_identity(connect.connection(), &requester);
    let channel = client::connect(&connection).await?;
    Ok((requester, key, connection, channel))
}

fn parse_purpose(s: &str) -> Result<Purpose, String> {
    Purpose::parse(s)
        .ok_or_else(|| format!("unknown purpose {s:?}; use one of direct_care, planning, research"))
}

pub const QUERY_HELP: &str = "\
Examples:
  phm query --coordinator https://127.0.0.1:50050 --ca certs/ca.pem \\
      --cert certs/dsu-client.pem --cert-key certs/dsu-client.key \\
      --key keys/dsu.key --purpose planning --epsilon 0.5 \\
      'SELECT imd_quintile, COUNT(*) AS diabetics FROM gp_patients WHERE diabetes = TRUE GROUP BY imd_quintile'

  # research, under an approved project, as JSON
  phm query ... --key keys/researcher.key --purpose research --project RP-2026-014 --format json \\
      'SELECT imd_quintile, AVG(hba1c) AS mean_hba1c FROM gp_patients WHERE diabetes = TRUE GROUP BY imd_quintile'

Exit codes: 0 answered (possibly by only some partners), 1 other failure, 2 bad input
(SQL, key or certificate files), 3 coordinator unreachable, 4 refused.";

#[derive(Debug, Clone, Args)]
#[command(after_help = QUERY_HELP)]
pub struct QueryArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Why the data is used: direct_care, planning or research.
    #[arg(long, value_parser = parse_purpose)]
    pub purpose: Purpose,
    /// Approved research project id (research only).
    #[arg(long)]
    pub project: Option<String>,
    /// Privacy budget to spend at each partner on this query.
    #[arg(long, default_value_t = 0.5)]
    pub epsilon: f64,
    /// Query id (default: a fresh UUID). Running the same question again with the same
    /// id returns the stored answer without spending; an id you already used for a
    /// different question is refused (QUERY_ID_REUSED).
    #[arg(long)]
    pub query_id: Option<String>,
    /// table (with coverage lines), csv (one line per group) or json (one object).
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
    /// Secure aggregation: the partners run one secure session and the coordinator
    /// learns only the system total, each partner adding a share of the noise (no
    /// partner's own figure exists anywhere). The result says its predicted error
    /// beside plain mode's: with few partners plain mode can be more accurate.
    #[arg(long)]
    pub secure: bool,
    /// Rates: each group's first COUNT(*) (the events) per this many people, the people
    /// being the first COUNT(*) of --denominator's query for the same group; 95%
    /// intervals include the Poisson variation of the events and both counts' noise.
    #[arg(long, requires = "denominator", value_name = "N")]
    pub rate_per: Option<f64>,
    /// The people a rate is over: a query with the same GROUP BY whose first aggregate is
    /// COUNT(*). It runs as a query of its own, spending --epsilon again.
    #[arg(long, requires = "rate_per", value_name = "SQL")]
    pub denominator: Option<String>,
    /// Also directly age-standardise each rate over the European Standard Population
    /// 2013, the age bands being this group column (e.g. "bin(age, 5)"); rates are then
    /// per group of the other columns.
    #[arg(long, requires = "rate_per", value_name = "GROUP COLUMN")]
    pub standardise: Option<String>,
    /// The query, in the SQL subset (SELECT … FROM dataset [WHERE …] [GROUP BY …]).
    pub sql: String,
}

fn progress_bar(format: Format) -> indicatif::ProgressBar {
    let pb = indicatif::ProgressBar::new(0);
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} {pos}/{len} partners replied {wide_msg}")
    {
        pb.set_style(style);
    }
    // Machine formats keep stderr quiet too unless it is a terminal.
    if format != Format::Table {
        pb.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    pb
}

fn progress_message(p: &proto::NodeProgress) -> String {
    let outcome = match NodeOutcome::try_from(p.outcome) {
        Ok(NodeOutcome::Answered) => "answered".to_string(),
        Ok(NodeOutcome::Refused) => format!("refused ({})", render::reason_name(p.reason)),
        Ok(NodeOutcome::Unreachable) => "unreachable".into(),
        Ok(NodeOutcome::TimedOut) => "timed out".into(),
        Ok(NodeOutcome::Malformed) => "excluded".into(),
        _ => "?".into(),
    };
    format!("{}: {outcome}", render::node_label(p.node.as_ref()))
}

/// `phm query`. Returns the process exit code.
pub async fn query(a: QueryArgs) -> u8 {
    let parsed = match crate::sql::parse(&a.sql) {
        Ok(q) => q,
        Err(e) => {
            eprintln!("{}", e.render(&a.sql));
            return exit::INPUT;
        }
    };
    match query_inner(&a, parsed).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e}");
            if let ClientError::Refused(d) = &e {
                for r in &d.reasons {
                    eprintln!("  - {r}");
                }
            }
            e.exit_code()
        }
    }
}

async fn query_inner(a: &QueryArgs, parsed: crate::sql::SqlQuery) -> Result<u8, ClientError> {
    // The wire's own minimum, so the CLI refuses exactly what every node would.
    let min = phm_proto::query::MIN_EPSILON;
    if !(a.epsilon.is_finite() && a.epsilon >= min) {
        return Err(ClientError::Input(format!(
            "--epsilon must be a finite number of at least {min}, got {}",
            a.epsilon
        )));
    }
    let denominator = match &a.denominator {
        Some(sql) => Some(
            crate::sql::parse(sql)
                .map_err(|e| ClientError::Input(format!("--denominator: {}", e.render(sql))))?,
        ),
        None => None,
    };
    if let Some(den) = &denominator {
        check_rate_args(a, &parsed, den)?;
    }
    let signed_in = sign_in(&a.key, &a.connect).await?;
    let aggregates = parsed.aggregates.clone();
    let result = submit_one(a, &signed_in, parsed, a.query_id.clone()).await?;
    let Some(den) = denominator else {
        match a.format {
            Format::Json => crate::outln!("{}", render::json(&result)),
            Format::Csv => crate::out!("{}", render::csv(&result)),
            Format::Table => crate::out!("{}", render::table_report(&result, &aggregates)),
        }
        return Ok(answered_code(&result));
    };
    let den_aggregates = den.aggregates.clone();
    // The denominator is its own query: a derived id keeps a rerun with --query-id idempotent.
    let den_id = a.query_id.as_ref().map(|id| format!("{id}-denominator"));
    let people = submit_one(a, &signed_in, den, den_id).await?;
    let table = crate::rates::Rates::of(
        &result,
        &aggregates,
        &people,
        &den_aggregates,
        a.rate_per.unwrap_or(1000.0),
        a.standardise.as_deref(),
    )
    .map_err(ClientError::Input)?;
    match a.format {
        Format::Json => crate::outln!(
            "{}",
            serde_json::json!({
                "events": render::json(&result),
                "people": render::json(&people),
                "rates": table.json(),
            })
        ),
        Format::Csv => crate::out!("{}", table.csv()),
        Format::Table => {
            crate::out!("{}", render::table_report(&result, &aggregates));
            crate::outln!("\nPeople (--denominator):");
            crate::out!("{}", render::table_report(&people, &den_aggregates));
            crate::out!("\n{}", table.table());
        }
    }
    match answered_code(&result) {
        0 => Ok(answered_code(&people)),
        code => Ok(code),
    }
}

/// What `Rates::of` would refuse once both queries had spent, checked before either
/// is sent: a base that is not a positive number, group keys that differ, an age
/// column that is not one of them.
fn check_rate_args(
    a: &QueryArgs,
    events: &crate::sql::SqlQuery,
    people: &crate::sql::SqlQuery,
) -> Result<(), ClientError> {
    if let Some(per) = a.rate_per
        && !(per.is_finite() && per > 0.0)
    {
        return Err(ClientError::Input(format!(
            "--rate-per must be a positive number (1000 for per 1,000), got {per}"
        )));
    }
    let labels = |q: &crate::sql::SqlQuery| -> Vec<String> {
        q.group_by.iter().map(phm_proto::GroupKey::label).collect()
    };
    let (ours, theirs) = (labels(events), labels(people));
    if ours != theirs {
        return Err(ClientError::Input(format!(
            "--denominator groups by ({}) but the query by ({}): rates need the same GROUP BY",
            theirs.join(", "),
            ours.join(", ")
        )));
    }
    if let Some(col) = &a.standardise
        && !ours.contains(col)
    {
        return Err(ClientError::Input(format!(
            "--standardise {col:?}: the query has no such group column (it groups by {})",
            ours.join(", ")
        )));
    }
    Ok(())
}

/// Sign, submit and wait for one query's combined result.
async fn submit_one(
    a: &QueryArgs,
    (requester, key, connection, channel): &(
        String,
        phm_proto::signing::PrivateKey,
        Connection,
        tonic::transport::Channel,
    ),
    parsed: crate::sql::SqlQuery,
    query_id: Option<String>,
) -> Result<proto::CombinedResult, ClientError> {
    let mut body = client::query_body(
        parsed,
        &a.key.federation,
        requester,
        a.purpose,
        a.project.clone(),
        a.epsilon,
        query_id,
    );
    if a.secure {
        body.aggregation = phm_proto::Aggregation::SecureSum;
    }
    let signed = body.sign(key);
    let pb = progress_bar(a.format);
    let mut on_progress = |p: &proto::NodeProgress| {
        if p.nodes_total > 0 {
            pb.set_length(p.nodes_total as u64);
        }
        pb.inc(1);
        pb.set_message(progress_message(p));
    };
    let outcome = client::submit(channel.clone(), &connection.url, signed, &mut on_progress).await;
    pb.finish_and_clear();
    Ok(outcome?.result)
}

/// 0 when some partner answered; otherwise what the first refusal (or nobody) says,
/// reported on stderr.
fn answered_code(result: &proto::CombinedResult) -> u8 {
    let coverage = result.coverage.clone().unwrap_or_default();
    if !coverage.answered.is_empty() {
        return 0;
    }
    // Nobody answered: say why, with the first refusal as the headline.
    if let Some(r) = coverage.refused.first() {
        eprintln!(
            "refused: {} — {} ({})",
            render::reason_name(r.reason),
            r.message,
            render::node_label(r.node.as_ref())
        );
        return exit::REFUSED;
    }
    eprintln!("error: no partner answered (see coverage above)");
    exit::FAILURE
}

pub const BUDGET_HELP: &str = "\
Example:
  phm budget --coordinator https://127.0.0.1:50050 --ca certs/ca.pem \\
      --cert certs/dsu-client.pem --cert-key certs/dsu-client.key --key keys/dsu.key";

#[derive(Debug, Clone, Args)]
#[command(after_help = BUDGET_HELP)]
pub struct BudgetArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(flatten)]
    pub key: KeyArgs,
    /// Also show this research project's ledger.
    #[arg(long)]
    pub project: Option<String>,
    /// table, csv or json.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// Rows of the budget table: partner, ledger, period, spent, remaining, total.
pub fn budget_rows(b: &proto::FederatedBudget) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for n in &b.nodes {
        let label = render::node_label(n.node.as_ref());
        match (NodeOutcome::try_from(n.outcome), &n.budget) {
            (Ok(NodeOutcome::Answered), Some(budget)) if !budget.ledgers.is_empty() => {
                for l in &budget.ledgers {
                    rows.push(vec![
                        label.clone(),
                        l.ledger.clone(),
                        format!("{} {}", l.period, l.period_label),
                        format!("{:.2}", l.epsilon_spent),
                        format!("{:.2}", l.epsilon_remaining),
                        format!("{:.2}", l.epsilon_total),
                        format!("{:.2}", l.per_query_cap),
                        format!("{:.1e}", l.delta_spent),
                        format!("{:.1e}", l.delta_total),
                    ]);
                }
            }
            _ => rows.push(vec![
                label,
                if n.message.is_empty() {
                    "no answer".into()
                } else {
                    n.message.clone()
                },
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
                String::new(),
            ]),
        }
    }
    rows
}

/// `phm budget`. Returns the process exit code.
pub async fn budget(a: BudgetArgs) -> u8 {
    let run = async {
        let (requester, key, connection, channel) = sign_in(&a.key, &a.connect).await?;
        client::budget(
            channel,
            &connection.url,
            &a.key.federation,
            &requester,
            a.project.clone(),
            &key,
        )
        .await
    };
    match run.await {
        Ok(b) => {
            let rows = budget_rows(&b);
            match a.format {
                Format::Json => {
                    let v: Vec<serde_json::Value> = rows
                        .iter()
                        .map(|r| {
                            serde_json::json!({
                                "node": r[0], "ledger": r[1], "period": r[2],
                                "spent": r[3].parse::<f64>().ok(),
                                "remaining": r[4].parse::<f64>().ok(),
                                "total": r[5].parse::<f64>().ok(),
                                "per_query_cap": r[6].parse::<f64>().ok(),
                                "delta_spent": r[7].parse::<f64>().ok(),
                                "delta_total": r[8].parse::<f64>().ok(),
                            })
                        })
                        .collect();
                    crate::outln!("{}", serde_json::Value::Array(v));
                }
                Format::Csv => {
                    crate::outln!(
                        "node,ledger,period,spent,remaining,total,per_query_cap,delta_spent,delta_total"
                    );
                    for r in rows {
                        crate::outln!("{}", r.join(","));
                    }
                }
                Format::Table => {
                    let header: Vec<String> = [
                        "partner",
                        "ledger",
                        "period",
                        "ε spent",
                        "ε left",
                        "ε total",
                        "per query",
                        "δ spent",
                        "δ total",
                    ]
                    .iter()
                    .map(|s| s.to_string())
                    .collect();
                    crate::out!("{}", render::layout(&header, &rows, 3));
                }
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

pub const RESULT_HELP: &str = "\
Example:
  phm result --coordinator https://127.0.0.1:50050 --federation synthetic-ics \\
      --ca certs/ca.pem --key keys/dsu.key --query-id 6f1c…

The coordinator returns a stored result only to the requester who asked for it (and,
for research, under the same project): this command signs a fresh proof with --key.
Nothing is spent. Exit codes as for `phm query`.";

#[derive(Debug, Clone, Args)]
#[command(after_help = RESULT_HELP)]
pub struct ResultArgs {
    #[command(flatten)]
    pub connect: ConnectArgs,
    #[command(flatten)]
    pub key: KeyArgs,
    /// The research project the query was asked under, if any.
    #[arg(long)]
    pub project: Option<String>,
    /// The query id `phm query` printed.
    #[arg(long)]
    pub query_id: String,
    /// table, csv or json.
    #[arg(long, value_enum, default_value = "table")]
    pub format: Format,
}

/// `phm result`. Returns the process exit code.
pub async fn result(a: ResultArgs) -> u8 {
    let run = async {
        let (requester, key, connection, channel) = sign_in(&a.key, &a.connect).await?;
        client::get_result(
            channel,
            &connection.url,
            &a.key.federation,
            &requester,
            a.project.clone(),
            &a.query_id,
            &key,
        )
        .await
    };
    match run.await {
        Ok(result) => {
            match a.format {
                Format::Json => crate::outln!("{}", render::json(&result)),
                Format::Csv => crate::out!("{}", render::csv(&result)),
                Format::Table => crate::out!("{}", render::table_report(&result, &[])),
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

#[derive(Debug, Clone, Subcommand)]
pub enum AuditCmd {
    /// Check a node's hash-chained audit log; exit 0 when intact, 1 at the first break.
    #[command(after_help = "Example:\n  phm audit verify --data-dir ics/B81001/state")]
    Verify {
        /// The node's data_dir (holding audit.log).
        #[arg(long)]
        data_dir: PathBuf,
    },
}

/// `phm audit …`. Returns the process exit code.
pub fn audit(cmd: AuditCmd) -> u8 {
    match cmd {
        AuditCmd::Verify { data_dir } => {
            let path = data_dir.join("audit.log");
            match phm_node::audit::verify_log(&path) {
                Ok(report) => {
                    crate::outln!(
                        "ok: {} entr{}, chain intact ({})",
                        report.entries,
                        if report.entries == 1 { "y" } else { "ies" },
                        path.display()
                    );
                    0
                }
                Err(e) => {
                    eprintln!("{e}");
                    exit::FAILURE
                }
            }
        }
    }
}
