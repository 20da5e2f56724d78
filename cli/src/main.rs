//! `phm`: the command analysts, IG leads and operators type.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Policy(cmd) => policy::run(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
