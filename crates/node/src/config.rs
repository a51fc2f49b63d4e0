//! Node configuration: every limit of every component, with defaults suited to a developer's
//! machine.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Configuration of a node.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// Where keys, the block log and checkpoints live.
    pub state_dir: PathBuf,
    /// Address of the HTTP interface (port 0 = any free port).
    pub listen_addr: SocketAddr,
    /// A checkpoint is written after this many busy heights (blocks that executed something)…
    pub checkpoint_interval_heights: u64,
    /// …or after this much time with at least one busy height, whichever comes first…
    pub checkpoint_interval: Duration,
    /// …or, when only idle blocks were made, after this much time (bounds the replay on restart).
    pub idle_checkpoint_interval: Duration,
    /// Block limits and pacing (a block at least every `idle_block_interval` keeps the certified
    /// `/time` fresh and runs timers and heartbeats).
    pub block_maker: openic_consensus::BlockMakerConfig,
    /// The HTTP interface.
    pub http: openic_http_api::HttpApiConfig,
    /// Execution limits and fees.
    pub execution: openic_execution::ExecutionConfig,
    /// The wasm engine.
    pub embedder: openic_embedders::EmbedderConfig,
    /// The ingress pool's limits.
    pub ingress_pool: openic_consensus::IngressPoolConfig,
    /// The block log's segment and record limits.
    pub block_log: openic_state_manager::BlockLogConfig,
    /// Checkpoint retention and page-file chain limits.
    pub checkpoints: openic_state_manager::CheckpointConfig,
    /// Memory that non-replicated executions (queries, composite queries, inspect_message) may
    /// touch together, in bytes (`None`: a quarter of the machine's memory, at least 512 MiB; see
    /// `memory::default_query_memory_budget`).
    pub query_memory_budget_bytes: Option<u64>,
}

impl NodeConfig {
    /// The default configuration with state in `state_dir`, listening on 127.0.0.1:8000.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        NodeConfig {
            state_dir: state_dir.into(),
            listen_addr: SocketAddr::from(([127, 0, 0, 1], 8000)),
            checkpoint_interval_heights: 500,
            checkpoint_interval: Duration::from_secs(30),
            idle_checkpoint_interval: Duration::from_secs(600),
            block_maker: Default::default(),
            http: Default::default(),
            execution: Default::default(),
            embedder: openic_embedders::EmbedderConfig {
                max_heap_image_bytes: usize::try_from(crate::memory::default_heap_image_bytes())
                    .unwrap_or(usize::MAX),
                ..Default::default()
            },
            ingress_pool: Default::default(),
            block_log: Default::default(),
            checkpoints: Default::default(),
            query_memory_budget_bytes: None,
        }
    }
}
