//! `phm`: the command analysts, IG leads and operators type.

use clap::{Args, Parser, Subcommand};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

mod demo;
mod policy;

#[derive(Parser)]
#[command(
    name = "phm",
    version,
    about = "Federated, differentially private Population Health Management queries",
    long_about = "phm runs and queries a federation of partner nodes that keep raw data on \
                  their own premises and answer only noisy aggregates under their IG policy.\n\n\
                  Start here:  phm demo"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check, explain and describe IG policy files.
    #[command(subcommand)]
    Policy(policy::PolicyCmd),
    /// Generate a synthetic ICS: partner data, policies, keys, certificates, configs.
    #[command(after_help = "Example:\n  phm synth --out ./ics --population 100000 --seed 42")]
    Synth(SynthArgs),
    /// Requester signing keys and node identities.
    #[command(subcommand)]
    Keys(KeysCmd),
    /// The federation's node registry (for linked and secure queries).
    #[command(subcommand)]
    Registry(phm::registry::RegistryCmd),
    /// Certificates for mutual TLS.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Submit a signed SQL aggregate query through the coordinator.
    Query(phm::commands::QueryArgs),
    /// Privacy budget left for a requester at every partner.
    Budget(phm::commands::BudgetArgs),
    /// Reopen a stored result by its query id, without spending (only its requester).
    Result(phm::commands::ResultArgs),
    /// Verify a node's hash-chained audit log.
    #[command(subcommand)]
    Audit(phm::commands::AuditCmd),
    /// Run a partner's node (same code as the phm-node binary).
    #[command(after_help = "Example:\n  phm node --config ics/B81001/node.toml")]
    Node(phm_node::run::NodeArgs),
    /// Run the ICS coordinator (same code as the phm-coordinator binary).
    #[command(after_help = "Example:\n  phm coordinator --config ics/coordinator/coordinator.toml")]
    Coordinator(phm_coordinator::cli::CoordinatorArgs),
    /// The whole federation on this machine: synthesise, start, ask, report, stop.
    Demo(demo::DemoArgs),
}

#[derive(Args)]
struct SynthArgs {
    /// Folder to write (must be new or empty, or an earlier output with --force).
    #[arg(long)]
    out: PathBuf,
    /// Registered population of the ICS.
    #[arg(long, default_value_t = 100_000)]
    population: usize,
    /// Seed: the same seed gives the same people and reference answers.
    #[arg(long, default_value_t = 42)]
    seed: u64,
    /// Keep only the first K GP practices (trusts, social care and the council stay).
    #[arg(long)]
    nodes_limit: Option<usize>,
    /// Split the population over N practices (default: about one per 9,000 people; at
    /// least 500 people each).
    #[arg(long)]
    practices: Option<usize>,
    /// Allocate free loopback ports from this one (coordinator first, then nodes).
    #[arg(long)]
    base_port: Option<u16>,
    /// Replace an earlier `phm synth` output in --out.
    #[arg(long)]
    force: bool,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Make a new Ed25519 requester key (PKCS#8 PEM, mode 0600) and FILE.pub, or with
    /// `--kind node` a node identity (Ed25519 + X25519, mode 0600) and FILE.pub.
    #[command(
        after_help = "Examples:\n  phm keys new --out keys/dsu.key\n  # then put the printed public key in each node's policy under [[requesters]]\n  phm keys new --kind node --node-id A81001 --out peer/A81001.identity\n  # then list the printed line in the registry: phm registry sign --node peer/A81001.identity.pub …"
    )]
    New {
        #[arg(long)]
        out: PathBuf,
        /// `requester` (a signing key for queries; also the IG leads' registry key) or
        /// `node` (a node's identity for sealed frames).
        #[arg(long, value_enum, default_value = "requester")]
        kind: KeyKind,
        /// The node's id (its ODS code), for `--kind node`.
        #[arg(long, required_if_eq("kind", "node"))]
        node_id: Option<String>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum KeyKind {
    Requester,
    Node,
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Development certificates from two CAs: infrastructure (servers, the coordinator's
    /// client identity) and people (analysts' and researchers' client certificates).
    #[command(after_help = CERTS_DEV_HELP)]
    Dev {
        #[arg(long)]
        out: PathBuf,
        /// Server certificates of nodes and the coordinator (infrastructure CA,
        /// serverAuth; SANs NAME, localhost, 127.0.0.1).
        #[arg(long, value_delimiter = ',', value_name = "NAMES")]
        servers: Vec<String>,
        /// The coordinator's client identity towards nodes (infrastructure CA,
        /// clientAuth; SAN NAME only). Nodes pin it in tls.allowed_clients.
        #[arg(long, value_delimiter = ',', value_name = "NAMES")]
        clients: Vec<String>,
        /// Analysts' and researchers' client certificates (people CA, clientAuth; SAN
        /// NAME only). Only the coordinator trusts this CA.
        #[arg(long, value_delimiter = ',', value_name = "NAMES")]
        people: Vec<String>,
        /// Older scripts: infrastructure CA, server and client use. Prefer the three
        /// options above.
        #[arg(long, value_delimiter = ',', value_name = "NAMES")]
        names: Vec<String>,
    },
}

const CERTS_DEV_HELP: &str = "\
Writes OUT/ca.pem + ca.key (infrastructure CA) and OUT/people-ca.pem + people-ca.key
(people CA), reusing either when both its files exist, and OUT/<name>.pem + .key per name.

Nodes trust only the infrastructure CA for clients (node.toml [tls] client_ca) and answer
only the coordinator's client identity (allowed_clients = [\"san:coordinator-client\"] or
its spki-sha256 fingerprint, printed here). The coordinator trusts the people CA for
analysts (coordinator.toml [tls] client_ca). `phm query --ca` takes the infrastructure CA.

Example:
  phm certs dev --out certs --servers A81001,RW1,coordinator \\
      --clients coordinator-client --people dsu-client,researcher-client";

fn synth(a: SynthArgs) -> anyhow::Result<ExitCode> {
    let summary = phm::synth::run(&phm::synth::SynthOptions {
        out: a.out.clone(),
        population: a.population,
        seed: a.seed,
        nodes_limit: a.nodes_limit,
        practices: a.practices,
        base_port: a.base_port,
        progress: !a.quiet,
        force: a.force,
    })?;
    phm::out!("{}", phm::synth::describe(&summary, &a.out));
    Ok(ExitCode::SUCCESS)
}

fn keys(cmd: KeysCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        KeysCmd::New {
            out,
            kind: KeyKind::Node,
            node_id,
        } => {
            let node_id = node_id.unwrap_or_default();
            let line = phm::registry::new_node_identity(&node_id, &out)?;
            phm::outln!("{line}");
            let _ = writeln!(
                std::io::stderr(),
                "wrote {} (private, mode 0600) and {}.pub",
                out.display(),
                out.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        KeysCmd::New { out, .. } => {
            let k = phm::keys::new_key_file(&out)?;
            phm::outln!("{}", k.public_key_base64);
            // A note, not output: a stderr that cannot be written must not panic.
            let _ = writeln!(
                std::io::stderr(),
                "wrote {} (private, mode 0600) and {}",
                k.private_path.display(),
                k.public_path.display()
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn certs(cmd: CertsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CertsCmd::Dev {
            out,
            servers,
            clients,
            people,
            names,
        } => {
            let plan = phm::certs::CertPlan {
                servers,
                infra_clients: clients,
                people,
                legacy: names,
            };
            let c = phm::certs::dev(&out, &plan)?;
            phm::out!("{}", c.describe());
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(cmd) => policy::run(cmd),
        Command::Synth(a) => synth(a),
        Command::Keys(cmd) => keys(cmd),
        Command::Registry(cmd) => phm::registry::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Certs(cmd) => certs(cmd),
        Command::Query(a) => {
            runtime().map(|rt| ExitCode::from(rt.block_on(phm::commands::query(a))))
        }
        Command::Budget(a) => {
            runtime().map(|rt| ExitCode::from(rt.block_on(phm::commands::budget(a))))
        }
        Command::Result(a) => {
            runtime().map(|rt| ExitCode::from(rt.block_on(phm::commands::result(a))))
        }
        Command::Audit(cmd) => Ok(ExitCode::from(phm::commands::audit(cmd))),
        Command::Node(a) => phm_node::run::run_blocking(a).map(|()| ExitCode::SUCCESS),
        Command::Coordinator(a) => runtime()
            .and_then(|rt| rt.block_on(phm_coordinator::cli::run(a)))
            .map(|()| ExitCode::SUCCESS),
        Command::Demo(a) => runtime()
            .and_then(|rt| rt.block_on(demo::run(a)))
            .map(ExitCode::from),
    };
    // Output that could not be written (other than to a reader that went away, which
    // is a normal end) means the command did not do its job.
    if let Some(e) = phm::render::stdout_error() {
        let _ = writeln!(
            std::io::stderr(),
            "error: cannot write to standard output: {e}"
        );
        return ExitCode::FAILURE;
    }
    match result {
        Ok(code) => code,
        Err(e) => {
            // Not eprintln!: it panics when stderr cannot be written (e.g. a full disk
            // under `phm node`), and the exit status must stay 1.
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
