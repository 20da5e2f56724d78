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

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // An unwritable log must not panic the task that logged (see the node's init_logging).
    // Logs go to stderr, as the node's do: stdout stays free for output.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    // try_init: `phm` may already have installed a subscriber.
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Completes on ctrl-c or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::warn!(error = %e, "cannot listen for ctrl-c");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = term => {}
    }
    tracing::info!("shutdown requested; draining");
}

/// Load the config, bind, and serve until SIGTERM or ctrl-c.
pub async fn run(args: CoordinatorArgs) -> anyhow::Result<()> {
    crate::server::install_crypto_provider();
    let config = Config::load(&args.config)?;
    init_logging(args.log_format.unwrap_or(config.log_format));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {} (field `listen`)", config.listen))?;
    crate::server::serve(config, listener, shutdown_signal()).await?;
    Ok(())
}
