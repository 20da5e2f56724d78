//! What every long-running phm server (the node, the coordinator) does the same way:
//! logs go to stderr in the format the operator chose, and SIGTERM or Ctrl-C starts a
//! drain. One copy, so the servers cannot drift apart (they once logged to different
//! streams).

use serde::Deserialize;

/// How the server's log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// One readable line per event.
    #[default]
    Human,
    /// One JSON object per line, for a log shipper.
    Json,
}

/// Log to stderr (stdout stays free for output), at `RUST_LOG` or `info`.
///
/// A log that cannot be written (disk full, RLIMIT_FSIZE) must not take the server
/// down: tracing-subscriber would otherwise report the failed write with `eprintln!`,
/// which panics when stderr is that same unwritable file, inside whichever task
/// logged. Already initialised (inside `phm`, which may run several roles) is fine:
/// the existing subscriber stays.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .log_internal_errors(false);
    let _ = match format {
        LogFormat::Human => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// Completes on SIGTERM or Ctrl-C, saying which.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM received; draining"),
                    _ = tokio::signal::ctrl_c() => tracing::info!("Ctrl-C received; draining"),
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; Ctrl-C still stops the server");
                let _ = tokio::signal::ctrl_c().await;
                tracing::info!("Ctrl-C received; draining");
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
        tracing::info!("Ctrl-C received; draining");
    }
}
