//! The openic node: wires the components into a running one-node subnet.
//!
//! This is the only crate that names implementations. `start` loads (or creates) the node's keys and
//! state, replays the block log on top of the latest checkpoint, certifies the resulting state, and
//! then runs two things until shut down:
//! - the block thread, which turns ingress into blocks and, for each block in order: makes it
//!   durable in the block log, executes it, certifies the new state, and periodically checkpoints;
//! - the HTTP server (the public IC interface plus `/metrics`).
//!
//! Invariant: a block is durable before any of its effects are certified, so an update whose
//! certificate said `replied` survives a crash at any point (it is replayed from the log).

mod block_thread;
mod checkpointing;
mod config;
pub mod genesis;
mod metrics;
pub mod replica;
mod state_sync;

pub use config::NodeConfig;
pub use openic_state_manager::load_or_create_identity;
pub use replica::{ReplicaConfig, start_replica};

use openic_certification::{CertifiedStateStore, SubnetInfo};
use openic_consensus::IngressPoolImpl;
use openic_crypto::self_authenticating_principal;
use openic_embedders::{Embedder, WasmtimeEmbedder};
use openic_execution::{IngressFilter, QueryExecution, Scheduler, SubnetContext};
use openic_interfaces::{BlockExecutor, BlockLog, CertifiedStateReader, StorageError};
use openic_replicated_state::ReplicatedState;
use openic_state_manager::{FileBlockLog, FileCheckpointStore};
use openic_types::ids::{FIRST_USER_CANISTER_INDEX, subnet_canister_ranges};
use openic_types::{Block, NodeId, SubnetId, Time};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tracing::info;

/// How long `shutdown` waits for open HTTP requests (sync calls wait up to their own timeout).
const HTTP_SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(15);

/// Why the node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// Reading or writing the state directory failed, or stored data is corrupt.
    #[error("state directory: {0}")]
    Storage(#[from] StorageError),
    /// The wasm engine could not be set up.
    #[error("wasm engine: {0}")]
    Embedder(String),
    /// The HTTP port could not be bound.
    #[error(
        "cannot listen on {addr}: {source}. Is another process using the port? Choose another with --port."
    )]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        source: std::io::Error,
    },
    /// Replaying the block log failed.
    #[error("replaying the block log: {0}")]
    Replay(String),
    /// Another process uses the state directory.
    #[error("{0}")]
    Locked(String),
    /// Joining the subnet failed (membership, key generation, consensus start-up).
    #[error("subnet: {0}")]
    Subnet(String),
}

/// The wall clock, in nanoseconds since the epoch. Only the block maker and the HTTP layer read it;
/// execution sees the block's time.
pub fn wall_clock() -> Time {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    Time(nanos)
}

/// A running node. Dropping it without [`RunningNode::shutdown`] leaves the threads running until
/// the process exits.
pub struct RunningNode {
    url: String,
    local_addr: SocketAddr,
    root_key_der: Vec<u8>,
    subnet_id: SubnetId,
    node_id: NodeId,
    stop: Arc<AtomicBool>,
    block_thread: Option<std::thread::JoinHandle<()>>,
    wake_block_thread: Arc<tokio::sync::Notify>,
    http_shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    http_task: Option<tokio::task::JoinHandle<()>>,
    /// Networking and consensus of a multi-replica subnet's replica.
    subnet: Option<replica::SubnetParts>,
}

impl RunningNode {
    /// The base URL clients use, e.g. `http://127.0.0.1:8000`.
    pub fn url(&self) -> String {
        self.url.clone()
    }

    /// The address the HTTP server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The network's root key (DER, 133 bytes).
    pub fn root_key_der(&self) -> Vec<u8> {
        self.root_key_der.clone()
    }

    /// The subnet id.
    pub fn subnet_id(&self) -> SubnetId {
        self.subnet_id
    }

    /// The node id.
    pub fn node_id(&self) -> NodeId {
        self.node_id
    }

    /// Stops serving HTTP, finishes the block in progress, writes a checkpoint and returns.
    pub async fn shutdown(mut self) {
        if let Some(tx) = self.http_shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(mut task) = self.http_task.take() {
            // Graceful shutdown waits for open requests; a client that never finishes must not
            // keep the node from stopping.
            if tokio::time::timeout(HTTP_SHUTDOWN_GRACE, &mut task)
                .await
                .is_err()
            {
                tracing::warn!(
                    "open HTTP requests did not finish in {HTTP_SHUTDOWN_GRACE:?}; closing them"
                );
                task.abort();
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        self.wake_block_thread.notify_one();
        if let Some(thread) = self.block_thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        if let Some(subnet) = self.subnet.take() {
            subnet.shutdown().await;
        }
        info!("node stopped");
    }
}

/// Starts a node: loads or creates keys and state, replays the block log, and serves HTTP.
/// Returns once the node is ready to answer requests.
pub async fn start(config: NodeConfig) -> Result<RunningNode, NodeError> {
    std::fs::create_dir_all(&config.state_dir).map_err(|source| StorageError::Io {
        path: config.state_dir.clone(),
        source,
    })?;
    let state_dir_lock = openic_state_manager::StateDirLock::acquire(&config.state_dir)
        .map_err(|e| NodeError::Locked(e.to_string()))?;
    let keys = openic_state_manager::load_or_create_keys(&config.state_dir)?;
    let genesis_seed = openic_state_manager::load_or_create_genesis_seed(&config.state_dir)?;
    let signing_key = Arc::new(keys.subnet_signing_key);
    let node_key = Arc::new(keys.node_key);
    let root_key_der = signing_key.public_key_der().to_vec();
    let subnet_id = SubnetId(self_authenticating_principal(&root_key_der));
    let node_id = NodeId(node_key.node_id());

    let embedder: Arc<dyn Embedder> = Arc::new(
        WasmtimeEmbedder::new(config.embedder.clone())
            .map_err(|e| NodeError::Embedder(e.to_string()))?,
    );
    let subnet_context = SubnetContext {
        subnet_id,
        root_key_der: root_key_der.clone(),
        node_count: 1,
    };
    let mut scheduler = Scheduler::new(
        embedder.clone(),
        config.execution.clone(),
        subnet_context.clone(),
    );

    let mut checkpoints = FileCheckpointStore::open(&config.state_dir, config.checkpoints.clone())?;
    let mut block_log = FileBlockLog::open(&config.state_dir, config.block_log.clone())?;
    let mut state = checkpointing::load_state(
        &mut checkpoints,
        Some(&mut block_log),
        &mut scheduler,
        || ReplicatedState::new(subnet_id, FIRST_USER_CANISTER_INDEX, genesis_seed),
    )?;

    let certified = Arc::new(CertifiedStateStore::new(
        SubnetInfo {
            subnet_id,
            root_key_der: root_key_der.clone(),
            node_id,
            node_public_key_der: node_key.public_key_der().to_vec(),
            peer_nodes: Vec::new(),
            canister_ranges: subnet_canister_ranges(),
        },
        signing_key.clone(),
    ));
    // Make one fresh block before serving, so the first certificate's /time is now rather than
    // genesis (0) or the time before the last shutdown; clients refuse stale certificates.
    let fresh = Block {
        height: state.metadata.height.increment(),
        time: wall_clock().max(state.metadata.time.saturating_add_nanos(1)),
        ingress: Vec::new(),
        randomness: [0; 32],
    };
    block_log.append(&fresh)?;
    scheduler.execute_block(&mut state, &fresh);
    certified.certify(&mut state);

    let mut registry = prometheus_client::registry::Registry::with_prefix("openic");
    let node_metrics = Arc::new(metrics::NodeMetrics::register(&mut registry));
    node_metrics.height.set(state.metadata.height.0 as i64);
    node_metrics.canisters.set(state.canisters.len() as i64);

    let known_requests = {
        let certified = certified.clone();
        Arc::new(move |id: &openic_types::RequestId| certified.ingress_status_meta(id).is_some())
    };
    let pool = Arc::new(IngressPoolImpl::new(
        config.ingress_pool.clone(),
        known_requests,
    ));
    let clock: Arc<dyn Fn() -> Time + Send + Sync> = Arc::new(wall_clock);

    let stop = Arc::new(AtomicBool::new(false));
    let halted = Arc::new(parking_lot::Mutex::new(None::<String>));
    let wake_block_thread = Arc::new(tokio::sync::Notify::new());
    let block_thread = block_thread::spawn(block_thread::BlockThread {
        config: config.clone(),
        state,
        scheduler,
        block_log,
        checkpoints,
        certified: certified.clone(),
        pool: pool.clone(),
        clock: clock.clone(),
        stop: stop.clone(),
        wake: wake_block_thread.clone(),
        metrics: node_metrics.clone(),
        _state_dir_lock: state_dir_lock,
        halted: halted.clone(),
    });

    let (local_addr, http_shutdown, http_task) = serve_http(
        &config,
        HttpParts {
            embedder,
            certified: certified.clone(),
            subnet_context,
            ingress_pool: pool.clone(),
            node_key: node_key.clone(),
            root_key_der: root_key_der.clone(),
            clock,
            halted: halted.clone(),
            registry,
            subnet_height_hint: None,
        },
    )
    .await?;
    let url = format!("http://{local_addr}");
    info!(%url, subnet_id = %subnet_id.0, "openic node ready");
    Ok(RunningNode {
        url,
        local_addr,
        root_key_der,
        subnet_id,
        node_id,
        stop,
        block_thread: Some(block_thread),
        wake_block_thread,
        http_shutdown: Some(http_shutdown),
        http_task: Some(http_task),
        subnet: None,
    })
}

/// What the HTTP server needs from a started node.
pub(crate) struct HttpParts {
    pub(crate) embedder: Arc<dyn Embedder>,
    pub(crate) certified: Arc<CertifiedStateStore>,
    pub(crate) subnet_context: SubnetContext,
    pub(crate) ingress_pool: Arc<dyn openic_interfaces::IngressPool>,
    pub(crate) node_key: Arc<openic_crypto::NodeKey>,
    pub(crate) root_key_der: Vec<u8>,
    pub(crate) clock: Arc<dyn Fn() -> Time + Send + Sync>,
    pub(crate) halted: Arc<parking_lot::Mutex<Option<String>>>,
    pub(crate) registry: prometheus_client::registry::Registry,
    /// On a replica of a multi-replica subnet: the highest height its peers have signed, so a call
    /// refused on state that is only a moment behind theirs is checked again once it caught up.
    pub(crate) subnet_height_hint: Option<Arc<std::sync::atomic::AtomicU64>>,
}

/// Binds the HTTP port and serves the public interface and `/metrics` until the returned sender
/// fires.
pub(crate) async fn serve_http(
    config: &NodeConfig,
    parts: HttpParts,
) -> Result<
    (
        SocketAddr,
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<()>,
    ),
    NodeError,
> {
    let HttpParts {
        embedder,
        certified,
        subnet_context,
        ingress_pool,
        node_key,
        root_key_der,
        clock,
        halted,
        mut registry,
        subnet_height_hint,
    } = parts;
    let subnet_id = subnet_context.subnet_id;
    let query_executor = Arc::new(QueryExecution::new(
        embedder.clone(),
        certified.clone(),
        certified.clone(),
        config.execution.clone(),
        subnet_context.clone(),
    ));
    let filter = Arc::new(IngressFilter::new(
        embedder.clone(),
        certified.clone(),
        config.execution.clone(),
        subnet_context,
    ));
    let inspector: Arc<dyn openic_interfaces::IngressInspector> = match subnet_height_hint {
        Some(hint) => Arc::new(replica::CatchUpInspector {
            inner: filter,
            certified: certified.clone(),
            subnet_height_hint: hint,
        }),
        None => filter,
    };
    let http_metrics = Arc::new(openic_http_api::HttpMetrics::register(&mut registry));
    let api = openic_http_api::router(
        config.http.clone(),
        openic_http_api::HttpApiDeps {
            ingress_pool,
            inspector,
            query_executor,
            certified_state: certified.clone(),
            node_key: node_key.clone(),
            root_key_der: root_key_der.clone(),
            subnet_id,
            clock,
            metrics: http_metrics,
            node_health: {
                let halted = halted.clone();
                Arc::new(move || halted.lock().clone())
            },
        },
    );
    let app = api.merge(metrics::router(Arc::new(registry)));

    let listener = tokio::net::TcpListener::bind(config.listen_addr)
        .await
        .map_err(|source| NodeError::Bind {
            addr: config.listen_addr,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| NodeError::Bind {
        addr: config.listen_addr,
        source,
    })?;
    let (http_shutdown, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let http_task = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = shutdown_rx.await;
            })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "HTTP server failed");
        }
    });
    Ok((local_addr, http_shutdown, http_task))
}
