//! Running a node: command-line arguments, start-up (config, policy, data, ledger,
//! audit log — all checked before the port opens), serving until SIGTERM/Ctrl-C, and
//! the graceful shutdown that flushes the ledger and audit log. `phm-node` and
//! `phm node` both call [`run`]; in-process tests call [`serve`].

use crate::audit::{AuditError, AuditLog};
use crate::config::{CONFIG_HELP, NodeConfig};
use crate::metrics::Metrics;
use crate::reload::{self, LoadError};
use crate::server::{self, ServerError};
use crate::service::{Service, ServiceLimits};
use crate::store::{Store, StoreError};
use phm_daemon::LogFormat;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// How long a node that hit a storage failure waits for running queries and a last
/// flush before it exits.
const FATAL_GRACE: Duration = Duration::from_secs(2);

/// Arguments of `phm-node` (and `phm node`).
#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "Run a partner's node: answer differentially private aggregate queries under its IG policy",
    long_about = "Run a partner's node. It loads the datasets its IG policy declares, serves \
phm.v1.NodeService over mutual TLS, answers only signed, policy-allowed aggregate queries \
with OpenDP noise, spends privacy budget durably before any answer leaves, caches every \
release by query id, and writes every decision to a hash-chained audit log.",
    after_long_help = CONFIG_HELP
)]
pub struct NodeArgs {
    /// The node's configuration file (node.toml; see below for its fields).
    #[arg(long, short = 'c', env = "PHM_NODE_CONFIG", value_name = "PATH")]
    pub config: PathBuf,
    /// Log format; overrides `log_format` in the config file.
    #[arg(long, value_enum, value_name = "FORMAT")]
    pub log_format: Option<LogFormat>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("cannot create the data folder {path}: {cause}")]
    DataDir {
        path: PathBuf,
        cause: std::io::Error,
    },
    // Boxed: a policy error carries every located problem, and keeping it inline
    // would make every `Result<_, NodeError>` that large.
    #[error(transparent)]
    Policy(Box<LoadError>),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(
        "the audit log cannot be continued: {0} (the node will not add to a broken chain; investigate, then move the log aside)"
    )]
    Audit(#[from] AuditError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error("cannot listen for metrics on {addr}: {cause}")]
    MetricsListen {
        addr: std::net::SocketAddr,
        cause: std::io::Error,
    },
    #[error("cannot flush state at shutdown: {0}")]
    Flush(String),
    #[error("start-up failed while opening the ledger and audit log: {0}")]
    Startup(String),
    #[error("stopped after a storage failure: {0}")]
    StorageFailure(String),
    #[error(transparent)]
    Peer(#[from] crate::peer::PeerError),
}

impl From<LoadError> for NodeError {
    fn from(e: LoadError) -> Self {
        NodeError::Policy(Box::new(e))
    }
}

/// A started node: everything loaded and checked, not yet serving.
#[derive(Debug)]
pub struct Node {
    config: NodeConfig,
    service: Arc<Service>,
    peer: Option<Arc<crate::peer::Peer>>,
}

impl Node {
    /// Load the policy and its data, open the ledger and the audit log. Any problem
    /// here means the node does not start.
    pub async fn start(config: NodeConfig) -> Result<Node, NodeError> {
        std::fs::create_dir_all(&config.data_dir).map_err(|cause| NodeError::DataDir {
            path: config.data_dir.clone(),
            cause,
        })?;
        let loaded = reload::load(&config.policy, None).await?;
        let peer = crate::peer::load(&config, &loaded.policy)?;
        if let Some(p) = &peer {
            tracing::info!(identity = %p.identity.public(), registry_serial = p.registry.serial, "node identity and registry checked");
        }
        let (store, audit) = {
            let dir = config.data_dir.clone();
            tokio::task::spawn_blocking(move || -> Result<_, NodeError> {
                let store = Store::open(&dir)?;
                let audit = AuditLog::open(&dir)?;
                // The audit log is verified; the ledger must hold at least what it
                // records, whatever happened to the database.
                let audited = crate::audit::audited_spend(audit.path())?;
                for (key, held, raised) in store.reconcile(&audited)? {
                    tracing::warn!(
                        ledger = %key,
                        held = ?held,
                        audited = ?raised,
                        "the ledger held less than the audit log records as spent (the database lost writes or was damaged); raised it to the audited spend"
                    );
                }
                Ok((store, audit))
            })
            .await
            .map_err(|e| NodeError::Startup(e.to_string()))??
        };
        tracing::info!(
            policy = %config.policy.display(),
            version = %loaded.policy.version(),
            organisation = %loaded.policy.file().organisation.ods_code,
            audit_entries = audit.entries(),
            "node started"
        );
        let service = Service::new(
            config.federation_id.clone(),
            loaded,
            Arc::new(store),
            Arc::new(audit),
            Arc::new(Metrics::new()),
            ServiceLimits {
                max_concurrent_queries: config.limits.max_concurrent_queries,
                query_deadline: Duration::from_millis(config.limits.query_deadline_ms),
                link_deadline: Duration::from_millis(config.limits.link_deadline_ms),
                storage_timeout: Duration::from_millis(config.limits.storage_timeout_ms),
            },
        );
        let peer = peer.map(Arc::new);
        if let Some(p) = &peer {
            service.install_peer(p.clone());
        }
        Ok(Node {
            config,
            service,
            peer,
        })
    }

    /// This node's identity and registry, when it takes part in linked and secure
    /// queries.
    pub fn peer(&self) -> Option<&Arc<crate::peer::Peer>> {
        self.peer.as_ref()
    }

    pub fn service(&self) -> &Arc<Service> {
        &self.service
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Serve gRPC on `listener` (and metrics on `metrics`, if given) until `shutdown`
    /// completes; then stop accepting, let running queries finish (bounded by the
    /// query deadline), flush the ledger and audit log.
    pub async fn serve(
        self,
        listener: TcpListener,
        metrics: Option<TcpListener>,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), NodeError> {
        // The service holds `peer` for linkage sessions (installed at start).
        let Node {
            config,
            service,
            peer: _,
        } = self;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let watcher = tokio::spawn(reload::watch(
            service.clone(),
            config.policy.clone(),
            stop_rx.clone(),
        ));
        let metrics_task = metrics.map(|l| {
            if let Ok(a) = l.local_addr() {
                tracing::info!(addr = %a, "metrics on GET /metrics");
            }
            tokio::spawn(crate::metrics::serve_metrics(
                service.metrics().clone(),
                l,
                stopped(stop_rx.clone()),
            ))
        });
        if let Ok(a) = listener.local_addr() {
            tracing::info!(addr = %a, "serving phm.v1.NodeService over mutual TLS");
        }
        let mut grpc = {
            let service = service.clone();
            let tls = config.tls.clone();
            let max = config.limits.max_message_bytes;
            let signal = stopped(stop_rx.clone());
            tokio::spawn(
                async move { server::serve_grpc(service, &tls, max, listener, signal).await },
            )
        };
        let mut failure = service.storage_failure();
        let mut fatal = None;
        let early = tokio::select! {
            r = &mut grpc => Some(r),
            _ = shutdown => None,
            Ok(f) = failure.wait_for(Option::is_some) => {
                fatal = f.clone();
                None
            }
        };
        let _ = stop_tx.send(true);
        // After a storage failure nothing more can be released, so waiting for running
        // queries only delays the supervisor's restart.
        let grace = if fatal.is_some() {
            FATAL_GRACE
        } else {
            service.deadline() + Duration::from_secs(5)
        };
        let grpc_result = match early {
            Some(r) => r,
            None => {
                tracing::info!("shutting down: no new connections; running queries may finish");
                match tokio::time::timeout(grace, &mut grpc).await {
                    Ok(r) => r,
                    Err(_) => {
                        tracing::warn!(
                            "connections still open after the grace period; closing them"
                        );
                        grpc.abort();
                        Ok(Ok(()))
                    }
                }
            }
        };
        if !service.drain(grace).await {
            tracing::warn!("some queries were still running at shutdown");
        }
        let _ = watcher.await;
        if let Some(t) = metrics_task {
            let _ = t.await;
        }
        if let Some(reason) = fatal {
            // Flushing may fail or hang too; the reason for stopping is what matters.
            let _ = tokio::time::timeout(FATAL_GRACE, service.flush()).await;
            return Err(NodeError::StorageFailure(reason));
        }
        service.flush().await.map_err(NodeError::Flush)?;
        tracing::info!("ledger and audit log flushed; stopped");
        match grpc_result {
            Ok(r) => r.map_err(NodeError::from),
            Err(e) => Err(ServerError::Serve(format!("server task failed: {e}")).into()),
        }
    }
}

/// Start a node from `config` and serve on `listener` until `shutdown`. Metrics are
/// served on `config.metrics_listen` when set.
pub async fn serve(
    config: NodeConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), NodeError> {
    let node = Node::start(config).await?;
    let metrics = match node.config.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|cause| NodeError::MetricsListen { addr, cause })?,
        ),
        None => None,
    };
    node.serve(listener, metrics, shutdown).await
}

/// Run the node until SIGTERM/Ctrl-C. Everything is loaded and checked before the
/// port opens, so a listening node is a ready node.
pub async fn run(args: NodeArgs) -> anyhow::Result<()> {
    server::install_crypto_provider();
    let config = NodeConfig::load(&args.config)?;
    phm_daemon::init_logging(args.log_format.unwrap_or(config.log_format));
    // The e2e tests' build: FAILPOINTS can hold this process at named steps. Said at start
    // so a test binary copied onto a real server is noticed in its first log line.
    #[cfg(feature = "failpoints")]
    tracing::warn!(
        "this phm-node is a test build (feature `failpoints`): the FAILPOINTS variable can pause it mid-protocol; build production nodes with `cargo build --release -p phm-node`"
    );
    let node = Node::start(config).await?;
    let cfg = node.config().clone();
    let metrics = match cfg.metrics_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|cause| NodeError::MetricsListen { addr, cause })?,
        ),
        None => None,
    };
    let listener = TcpListener::bind(cfg.listen).await.map_err(|e| {
        anyhow::anyhow!(
            "cannot listen on {} (`listen` in {}): {e}",
            cfg.listen,
            cfg.source.display()
        )
    })?;
    node.serve(listener, metrics, phm_daemon::shutdown_signal())
        .await?;
    Ok(())
}

/// [`run`] on a runtime of its own, for the `phm-node` and `phm node` binaries.
///
/// The runtime is shut down with a bound: after a disk failure a thread can be stuck
/// for ever inside sled, and dropping the runtime normally would wait for it, so the
/// process would never exit and its supervisor would never restart it.
pub fn run_blocking(args: NodeArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    let result = rt.block_on(run(args));
    rt.shutdown_timeout(FATAL_GRACE);
    result
}
