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
pub mod memory;
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
    /// A thread of the node could not be started.
    #[error("cannot start the {name} thread: {source}")]
    Thread {
        /// The thread's name.
        name: &'static str,
        /// The error.
        source: std::io::Error,
    },
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
    http: Option<openic_http_api::ServerHandle>,
    /// Returns freed memory to the kernel while the node runs.
    memory_trimmer: Option<memory::MemoryTrimmer>,
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
        if let Some(http) = self.http.take() {
            // Requests in progress may finish; the server closes what is left after its grace
            // period, so a client that never finishes cannot keep the node from stopping.
            http.shutdown().await;
        }
        self.stop.store(true, Ordering::SeqCst);
        self.wake_block_thread.notify_one();
        if let Some(thread) = self.block_thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
        if let Some(subnet) = self.subnet.take() {
            subnet.shutdown().await;
        }
        drop(self.memory_trimmer.take());
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

    let (http, memory_trimmer) = serve_http(
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
    let local_addr = http.local_addr;
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
        http: Some(http),
        memory_trimmer: Some(memory_trimmer),
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

/// Raises the process's soft open-file limit to its hard limit (each HTTP connection is a file
/// descriptor) and returns the limit in force. Idempotent.
pub fn raise_file_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // Past about a million descriptors the limit is not what bounds the node.
    const CEILING: u64 = 1 << 20;
    let limit = getrlimit(Resource::Nofile);
    let current = limit.current.unwrap_or(CEILING);
    let wanted = limit.maximum.unwrap_or(CEILING).min(CEILING);
    if wanted <= current {
        return current;
    }
    match setrlimit(
        Resource::Nofile,
        Rlimit {
            current: Some(wanted),
            maximum: limit.maximum,
        },
    ) {
        Ok(()) => wanted,
        Err(error) => {
            tracing::warn!(%error, current, wanted, "could not raise the open-file limit");
            current
        }
    }
}

/// Pending connections the kernel queues for the HTTP server (tokio's default is 1024): a burst of
/// new connections waits in the queue rather than having its handshakes dropped and retried a
/// second later.
const HTTP_LISTEN_BACKLOG: u32 = 4096;

fn bind_http(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    // As std and tokio do when binding: a restarted node may take the port while connections of
    // its previous run linger in TIME_WAIT (a port in use by a listener is still refused).
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(HTTP_LISTEN_BACKLOG)
}

/// Binds the HTTP port and serves the public interface and `/metrics` until the returned handle
/// is shut down. Queries and `canister_inspect_message` run under the node's memory budget; the
/// returned trimmer gives freed memory back to the kernel until it is dropped.
pub(crate) async fn serve_http(
    config: &NodeConfig,
    parts: HttpParts,
) -> Result<(openic_http_api::ServerHandle, memory::MemoryTrimmer), NodeError> {
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
    let budget_bytes = config
        .query_memory_budget_bytes
        .unwrap_or_else(memory::default_query_memory_budget);
    let budget = Arc::new(memory::NodeMemoryBudget::new(budget_bytes));
    budget.register(&mut registry);
    info!(
        query_memory_budget_mib = budget_bytes >> 20,
        "queries and inspect_message run under a memory budget"
    );
    let query_executor = Arc::new(
        QueryExecution::new(
            embedder.clone(),
            certified.clone(),
            certified.clone(),
            config.execution.clone(),
            subnet_context.clone(),
        )
        .with_memory_budget(budget.clone()),
    );
    let filter = Arc::new(
        IngressFilter::new(
            embedder.clone(),
            certified.clone(),
            config.execution.clone(),
            subnet_context,
        )
        .with_memory_budget(budget),
    );
    let memory_trimmer =
        memory::MemoryTrimmer::start(&mut registry, embedder.clone()).map_err(|source| {
            NodeError::Thread {
                name: "memory-trim",
                source,
            }
        })?;
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
            metrics: http_metrics.clone(),
            node_health: {
                let halted = halted.clone();
                Arc::new(move || halted.lock().clone())
            },
        },
    );
    let app = api.merge(metrics::router(Arc::new(registry)));

    let listener = bind_http(config.listen_addr).map_err(|source| NodeError::Bind {
        addr: config.listen_addr,
        source,
    })?;
    let file_limit = raise_file_limit();
    let server = openic_http_api::serve(
        listener,
        app,
        &config.http.connections,
        file_limit,
        http_metrics,
    )
    .map_err(|source| NodeError::Bind {
        addr: config.listen_addr,
        source,
    })?;
    Ok((server, memory_trimmer))
}
