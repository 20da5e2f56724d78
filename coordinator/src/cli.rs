//! Command-line entry point shared by `phm-coordinator` and `phm coordinator`.

use crate::config::{CONFIG_HELP, Config, LogFormat};
use anyhow::Context;
use std::path::PathBuf;

/// Run the ICS coordinator.
#[derive(clap::Args, Debug, Clone)]
pub struct CoordinatorArgs {
    /// Path to coordinator.toml (`--help` lists every field).
    #[arg(long, value_name = "PATH", long_help = CONFIG_HELP)]
    pub config: PathBuf,
    /// Log format; overrides `log_format` in the config file.
    #[arg(long, value_enum)]
    pub log_format: Option<LogFormat>,
}

/// Completes on ctrl-c or SIGTERM (the servers' one signal handling).
pub use phm_daemon::shutdown_signal;

/// Load the config, bind, and serve until SIGTERM or ctrl-c.
pub async fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    crate::server::install_crypto_provider();
    let config = Config::load(&args.config)?;
    phm_daemon::init_logging(args.log_format.unwrap_or(config.log_format));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (field `listen`)", config.listen))?;
    crate::server::serve(config, listener, shutdown_signal()).await?;
    Ok(())
}
