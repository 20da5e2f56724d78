//! `phm-node`: run one partner's node (see `phm-node --help`).

use clap::Parser;

#[derive(Debug, Parser)]
#[command(name = "phm-node", version)]
struct Cli {
    #[command(flatten)]
    args: phm_node::cli::NodeArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match phm_node::cli::run(cli.args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("phm-node: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
