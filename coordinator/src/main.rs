//! `phm-coordinator`: the ICS coordinator binary (parse arguments, run).

use clap::Parser;
use phm_coordinator::cli::{CoordinatorArgs, run};
use std::io::Write as _;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "phm-coordinator",
    version,
    about = "The ICS coordinator: relays signed queries to partner nodes over mutual TLS \
             and combines their noisy answers"
)]
struct Cli {
    #[command(flatten)]
    args: CoordinatorArgs,
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse().args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: it panics when stderr cannot be written.
            let _ = writeln!(std::io::stderr(), "error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
