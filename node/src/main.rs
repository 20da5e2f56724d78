//! `phm-node`: run one partner's node (see `phm-node --help`).

use clap::Parser;
use std::io::Write;

#[derive(Debug, Parser)]
#[command(name = "phm-node", version)]
struct Cli {
    #[command(flatten)]
    args: phm_node::run::NodeArgs,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Test builds only (see the `failpoints` feature): FAILPOINTS names the steps to hold.
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    match phm_node::run::run_blocking(cli.args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: it panics when stderr cannot be written (e.g. a full disk).
            let _ = writeln!(std::io::stderr(), "phm-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
