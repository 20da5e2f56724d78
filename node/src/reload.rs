//! Loading the policy (and the engine for its datasets), and hot reload: the policy
//! file is polled every second and re-read on SIGHUP. A valid new policy takes effect
//! atomically; an invalid one is refused with every error logged, and the policy in
//! force stays.

use crate::engine::{DataError, Engine};
use crate::service::{Loaded, Service};
use phm_policies::{Policy, PolicyErrors};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("cannot read policy file {path}: {cause}")]
    Read {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("policy file {path} is invalid:\n{errors}")]
    Policy { path: PathBuf, errors: PolicyErrors },
    #[error("policy file {path}: its data cannot be loaded: {cause}")]
    Data { path: PathBuf, cause: DataError },
}

/// Read, parse and validate the policy at `path` and load its datasets. With
/// `previous`, the previous engine is reused when the datasets (and opt-out column)
/// are unchanged, so an edit to requesters or budgets does not reload the data.
pub async fn load(path: &Path, previous: Option<&Loaded>) -> Result<Loaded, LoadError> {
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|cause| LoadError::Read {
            path: path.to_path_buf(),
            cause,
        })?;
    let policy =
        Policy::parse(&path.display().to_string(), &text).map_err(|errors| LoadError::Policy {
            path: path.to_path_buf(),
            errors,
        })?;
    let base_dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf();
    let reusable = previous.filter(|prev| {
        prev.base_dir == base_dir
            && prev.policy.file().datasets == policy.file().datasets
            && prev.policy.file().opt_out == policy.file().opt_out
    });
    let engine = match reusable {
        Some(prev) => prev.engine.clone(),
        None => Arc::new(
            Engine::load(policy.file(), &base_dir)
                .await
                .map_err(|cause| LoadError::Data {
                    path: path.to_path_buf(),
                    cause,
                })?,
        ),
    };
    Ok(Loaded {
        policy: Arc::new(policy),
        engine,
        base_dir,
    })
}

/// Outcome of one reload attempt.
#[derive(Debug, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The file's content is what is already in force.
    Unchanged,
    /// The new policy is in force (its version).
    Applied(String),
    /// The new file was refused; the old policy stays (the reason).
    Refused(String),
}

/// Try to put the policy file's current content in force.
pub async fn reload(service: &Service, path: &Path) -> ReloadOutcome {
    let current = service.current();
    let version = match tokio::fs::read(path).await {
        Ok(bytes) => hex::encode(Sha256::digest(&bytes)),
        Err(e) => {
            let msg = format!("cannot read policy file {}: {e}", path.display());
            tracing::error!(policy = %path.display(), error = %e, "policy reload refused; the policy in force stays");
            service.metrics().reload(false);
            return ReloadOutcome::Refused(msg);
        }
    };
    if version == current.policy.version() {
        return ReloadOutcome::Unchanged;
    }
    match load(path, Some(&current)).await {
        Ok(loaded) => {
            let new_version = loaded.policy.version().to_string();
            service.install(loaded);
            service.metrics().reload(true);
            tracing::info!(
                policy = %path.display(),
                old_version = %current.policy.version(),
                new_version = %new_version,
                "policy reloaded; the new policy is in force"
            );
            ReloadOutcome::Applied(new_version)
        }
        Err(e) => {
            service.metrics().reload(false);
            tracing::error!(
                policy = %path.display(),
                version_in_force = %current.policy.version(),
                "policy reload refused; the policy in force stays:\n{e}"
            );
            ReloadOutcome::Refused(e.to_string())
        }
    }
}

/// How often the policy file is checked, and how often old nonces are pruned.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);
const PRUNE_EVERY_POLLS: u32 = 60;

/// Watch the policy file until `stop` turns true: poll its content hash every second
/// (a refused content is not retried until it changes) and reload on SIGHUP. Also
/// prunes nonces too old to matter.
pub async fn watch(
    service: Arc<Service>,
    path: PathBuf,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    #[cfg(unix)]
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; the policy file is still polled");
            None
        }
    };
    let mut last_tried = service.current().policy.version().to_string();
    let mut ticker = tokio::time::interval(POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut polls = 0u32;
    loop {
        #[cfg(unix)]
        let hup_fut = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup_fut = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = stop.changed() => {
                if *stop.borrow() { return; }
            }
            _ = hup_fut => {
                tracing::info!(policy = %path.display(), "SIGHUP: reloading the policy");
                if let Ok(bytes) = tokio::fs::read(&path).await {
                    last_tried = hex::encode(Sha256::digest(&bytes));
                }
                if reload(&service, &path).await == ReloadOutcome::Unchanged {
                    tracing::info!("the policy file is unchanged; nothing to reload");
                }
            }
            _ = ticker.tick() => {
                polls = polls.wrapping_add(1);
                if let Ok(bytes) = tokio::fs::read(&path).await {
                    let hash = hex::encode(Sha256::digest(&bytes));
                    if hash != last_tried {
                        last_tried = hash;
                        reload(&service, &path).await;
                    }
                }
                if polls.is_multiple_of(PRUNE_EVERY_POLLS) {
                    prune_nonces(&service).await;
                }
            }
        }
    }
}

async fn prune_nonces(service: &Service) {
    // A message issued more than the validity window ago is refused as stale before
    // its nonce is looked at; keep twice the window so a reload that widens it a
    // little cannot readmit a pruned nonce.
    let window_ms = service
        .current()
        .policy
        .file()
        .release
        .query_validity_seconds
        .saturating_mul(2000);
    let cutoff = chrono::Utc::now()
        .timestamp_millis()
        .saturating_sub(i64::try_from(window_ms).unwrap_or(i64::MAX));
    let store = service.store().clone();
    match tokio::task::spawn_blocking(move || store.prune_nonces(cutoff)).await {
        Ok(Ok(n)) if n > 0 => tracing::debug!(pruned = n, "pruned old nonces"),
        Ok(Ok(_)) => {}
        Ok(Err(e)) => tracing::warn!(error = %e, "cannot prune nonces"),
        Err(e) => tracing::warn!(error = %e, "nonce pruning task failed"),
    }
}
