//! A replica of a multi-replica subnet: the same execution, certification and HTTP interface as a
//! one-replica node, with blocks from BFT consensus and certificates signed by the subnet's
//! threshold key.
//!
//! Data flow, per replica:
//! - an update call accepted over HTTP enters the local ingress pool and is gossiped to the peers
//!   (each checks the signature itself and pools it too);
//! - when this replica leads a view, `ReplicaPolicy::propose` fills a block from its pool; every
//!   replica checks a proposed block with `ReplicaPolicy::verify` before voting;
//! - finalized blocks arrive in height order on the execution thread, which logs each one
//!   durably, acknowledges it to consensus, executes it, hashes the new state, signs the root
//!   with its key share and gossips the share;
//! - the certification task collects shares; once `2f + 1` agree with this replica's own root the
//!   height is published to readers with the recovered subnet signature. If `2f + 1` others agree
//!   on a different root, this replica's state diverged: it stops serving certified answers, says
//!   so, stops executing, and recovers by state sync;
//! - at every multiple of the genesis file's catch-up interval the execution thread writes a
//!   checkpoint and signs its state-sync manifest; a replica that lost its state or fell behind
//!   fetches the latest one the subnet signed from its peers (`state_sync.rs` in this crate).
//!
//! Invariant: readers only ever see heights certified by the subnet's key; queries run on exactly
//! that state (the store publishes tree and canisters together).

use crate::checkpointing::{CheckpointSchedule, load_state};
use crate::config::NodeConfig;
use crate::genesis::Genesis;
use crate::metrics::NodeMetrics;
use crate::state_sync::{CatchUpCandidate, StateSync, StateSyncParts, SyncHandoff, SyncedState};
use crate::{HttpParts, NodeError, RunningNode, serve_http, wall_clock};
use openic_certification::{CertifiedStateStore, SubnetInfo};
use openic_consensus::bft::FloorControl;
use openic_consensus::bft::{BlockContent, BlockHeader, BlockPolicy, BlockView, FinalizedBlock};
use openic_consensus::certifier::{
    CertificationPool, CertificationPoolConfig, KeyShare, PoolEvent, PublicSharing, Statement,
    sign_partial,
};
use openic_consensus::subnet::{
    Inbound, SubnetKey, SubnetKeyStore, SubnetMember, SubnetService, SubnetServiceConfig,
};
use openic_consensus::{IngressPoolImpl, message_bytes};
use openic_crypto::{NodeKey, self_authenticating_principal};
use openic_embedders::{Embedder, WasmtimeEmbedder};
use openic_execution::{Scheduler, SubnetContext};
use openic_interfaces::{
    BlockExecutor, CertifiedStateReader, CheckpointStore, IngressPool, IngressPoolError,
    StorageError,
};
use openic_replicated_state::ReplicatedState;
use openic_state_manager::FileCheckpointStore;
use openic_types::ids::{FIRST_USER_CANISTER_INDEX, subnet_canister_ranges};
use openic_types::{
    Block, CanisterId, Height, IngressEnvelope, NodeId, RequestId, SignedIngress, SubnetId, Time,
};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tracing::{error, info, warn};

/// File (in the keys directory) holding this replica's share of the subnet key and the key's
/// public side, written once when the key generation at genesis finishes.
pub const SUBNET_KEY_SHARE_FILE: &str = "subnet_key_share";

/// Version byte of [`SUBNET_KEY_SHARE_FILE`].
const SUBNET_KEY_SHARE_FORMAT: u8 = 1;

/// Version byte of an ingress entry in a block (effective canister id and envelope).
const INGRESS_ENTRY_FORMAT: u8 = 1;

/// A leader proposes no sooner than this after its parent: at most 40 blocks a second under load.
const MIN_BLOCK_INTERVAL: Duration = Duration::from_millis(25);

/// With nothing to do a leader proposes an empty block this long after its parent: keeps the
/// certified time fresh and runs timers, without spending CPU on empty heights.
const IDLE_BLOCK_INTERVAL: Duration = Duration::from_millis(250);

/// How far a proposed block's time may be ahead of this replica's clock.
const MAX_BLOCK_TIME_AHEAD: Duration = Duration::from_secs(2);

/// Settings of one replica of a multi-replica subnet.
#[derive(Clone, Debug)]
pub struct ReplicaConfig {
    /// State directory, HTTP address and every limit, as for a one-replica node.
    pub node: NodeConfig,
    /// This replica's identity file (`openic identity`).
    pub identity: PathBuf,
    /// The subnet's members.
    pub genesis: Genesis,
    /// Where to accept peers; by default this member's address in the genesis file.
    pub p2p_listen: Option<SocketAddr>,
    /// Threads of the runtime that runs p2p and consensus (at least one).
    pub consensus_threads: usize,
}

/// Stores the share beside the node's identity, in `<identity's directory>/keys/<identity file
/// name>.subnet_key_share` (both halves in one file, so a crash never leaves one without the
/// other). Not in the state directory: a replica whose state is wiped (or lost with its disk)
/// fetches the state again from its peers, but its share exists nowhere else.
struct IdentityKeyStore {
    dir: PathBuf,
    name: String,
    /// Where versions before the move kept it (`<state_dir>/keys/subnet_key_share`); moved on
    /// first load.
    legacy_state_dir: PathBuf,
}

impl IdentityKeyStore {
    fn beside(identity: &std::path::Path, state_dir: &std::path::Path) -> Self {
        let dir = match identity.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let file = identity
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_else(|| "identity".into());
        IdentityKeyStore {
            dir,
            name: format!("{file}.{SUBNET_KEY_SHARE_FILE}"),
            legacy_state_dir: state_dir.to_path_buf(),
        }
    }

    fn read(&self) -> Result<Option<Vec<u8>>, String> {
        if let Some(bytes) =
            openic_state_manager::load_secret(&self.dir, &self.name).map_err(|e| e.to_string())?
        {
            return Ok(Some(bytes));
        }
        let legacy =
            openic_state_manager::load_secret(&self.legacy_state_dir, SUBNET_KEY_SHARE_FILE)
                .map_err(|e| e.to_string())?;
        if let Some(bytes) = &legacy {
            openic_state_manager::store_secret(&self.dir, &self.name, bytes)
                .map_err(|e| e.to_string())?;
            info!(
                to = %self.dir.join("keys").join(&self.name).display(),
                "moved the subnet key share out of the state directory"
            );
        }
        Ok(legacy)
    }
}

impl SubnetKeyStore for IdentityKeyStore {
    fn load(&self) -> Result<Option<SubnetKey>, String> {
        let Some(bytes) = self.read()? else {
            return Ok(None);
        };
        let corrupt = |reason: &str| {
            format!(
                "{SUBNET_KEY_SHARE_FILE} is corrupt ({reason}); restore it from a backup: a \
                 replica cannot sign for its subnet without it"
            )
        };
        let (&version, rest) = bytes.split_first().ok_or_else(|| corrupt("empty"))?;
        if version != SUBNET_KEY_SHARE_FORMAT {
            return Err(corrupt(&format!("unknown format {version}")));
        }
        if rest.len() < 4 {
            return Err(corrupt("truncated"));
        }
        let (length, rest) = rest.split_at(4);
        let length = u32::from_be_bytes([length[0], length[1], length[2], length[3]]) as usize;
        if rest.len() < length {
            return Err(corrupt("truncated"));
        }
        let (sharing, share) = rest.split_at(length);
        let sharing = PublicSharing::from_bytes(sharing).map_err(|e| corrupt(&e.to_string()))?;
        let share = KeyShare::from_bytes(share).map_err(|e| corrupt(&e.to_string()))?;
        Ok(Some(SubnetKey { sharing, share }))
    }

    fn store(&self, key: &SubnetKey) -> Result<(), String> {
        let sharing = key.sharing.to_bytes();
        let mut bytes = vec![SUBNET_KEY_SHARE_FORMAT];
        bytes.extend_from_slice(&(sharing.len() as u32).to_be_bytes());
        bytes.extend_from_slice(&sharing);
        bytes.extend_from_slice(&key.share.to_bytes());
        openic_state_manager::store_secret(&self.dir, &self.name, &bytes).map_err(|e| e.to_string())
    }
}

/// Encodes an ingress message for a block or for gossip: format byte, effective canister id
/// (length-prefixed), then the envelope as the client sent it.
pub fn encode_ingress_entry(envelope: &IngressEnvelope) -> Vec<u8> {
    let id = envelope.effective_canister_id.get();
    let id = id.as_slice();
    let mut bytes = Vec::with_capacity(2 + id.len() + envelope.bytes.len());
    bytes.push(INGRESS_ENTRY_FORMAT);
    bytes.push(id.len() as u8);
    bytes.extend_from_slice(id);
    bytes.extend_from_slice(&envelope.bytes);
    bytes
}

/// Decodes [`encode_ingress_entry`]'s bytes (from a peer: untrusted).
pub fn decode_ingress_entry(bytes: &[u8]) -> Result<IngressEnvelope, String> {
    let [format, length, rest @ ..] = bytes else {
        return Err("an ingress entry is at least 2 bytes".into());
    };
    if *format != INGRESS_ENTRY_FORMAT {
        return Err(format!("unknown ingress entry format {format}"));
    }
    let length = usize::from(*length);
    if length > 29 || rest.len() < length {
        return Err("malformed effective canister id in an ingress entry".into());
    }
    let (id, envelope) = rest.split_at(length);
    Ok(IngressEnvelope {
        effective_canister_id: CanisterId::unchecked_from_principal(
            openic_types::Principal::from_slice(id),
        ),
        bytes: envelope.into(),
    })
}

/// Request ids in blocks this replica proposed or checked and that may not be finalized yet, with
/// the height of that block: a new proposal leaves them out, since its parent chain may already
/// hold them. Entries at or below the executed height are dropped (finalized ones left the pool;
/// ones from a losing fork may be proposed again).
#[derive(Default)]
struct RecentIngress {
    by_id: BTreeMap<RequestId, u64>,
    by_height: BTreeSet<(u64, RequestId)>,
}

impl RecentIngress {
    const MAX_ENTRIES: usize = 1_000_000;

    fn record(&mut self, height: u64, ids: impl IntoIterator<Item = RequestId>) {
        for id in ids {
            if self.by_id.len() >= Self::MAX_ENTRIES {
                break;
            }
            if let Some(previous) = self.by_id.insert(id, height) {
                self.by_height.remove(&(previous, id));
            }
            self.by_height.insert((height, id));
        }
    }

    fn prune_through(&mut self, height: u64) {
        let keep = self.by_height.split_off(&(height + 1, RequestId([0; 32])));
        for (_, id) in std::mem::replace(&mut self.by_height, keep) {
            self.by_id.remove(&id);
        }
    }

    fn contains(&self, id: &RequestId) -> bool {
        self.by_id.contains_key(id)
    }
}

/// What this replica proposes and accepts.
#[derive(Clone)]
pub(crate) struct ReplicaPolicy {
    pool: Arc<IngressPoolImpl>,
    http: openic_http_api::HttpApiConfig,
    subnet_id: SubnetId,
    clock: Arc<dyn Fn() -> Time + Send + Sync>,
    max_messages: usize,
    max_bytes: u64,
    /// At most this many messages to one canister per block: what its input queue takes (the
    /// management canister: the subnet queue), so execution never rejects a block's excess.
    max_per_canister: usize,
    recent: Arc<Mutex<RecentIngress>>,
    /// Whether the state has queued messages, timers or heartbeats (set after each block).
    pending_work: Arc<AtomicBool>,
}

impl ReplicaPolicy {
    fn validate(&self, entry: &[u8], time: Time) -> Result<SignedIngress, String> {
        let envelope = decode_ingress_entry(entry)?;
        openic_http_api::validate_ingress_envelope(&envelope, self.subnet_id, time, &self.http)
            .map_err(|e| e.to_string())
    }
}

impl BlockPolicy for ReplicaPolicy {
    fn propose(&mut self, parent: &BlockHeader) -> BlockContent {
        let time = (self.clock)().max(Time(parent.time_nanos.saturating_add(1)));
        let recent = self.recent.lock();
        let envelopes = self.pool.select_for_proposal(
            self.max_messages,
            self.max_bytes,
            self.max_per_canister,
            time,
            &|id| recent.contains(id),
        );
        drop(recent);
        let mut ingress = Vec::with_capacity(envelopes.len());
        let mut ids = Vec::with_capacity(envelopes.len());
        for envelope in &envelopes {
            // The pool holds only envelopes this replica checked; an expired one was dropped.
            match openic_http_api::validate_ingress_envelope(
                envelope,
                self.subnet_id,
                time,
                &self.http,
            ) {
                Ok(message) => {
                    ids.push(message.request_id);
                    ingress.push(encode_ingress_entry(envelope));
                }
                Err(error) => warn!(%error, "left a pooled message out of a proposal"),
            }
        }
        self.recent.lock().record(parent.height + 1, ids);
        BlockContent {
            time_nanos: time.0,
            ingress,
        }
    }

    fn verify(&mut self, _parent: &BlockHeader, block: &BlockView<'_>) -> Result<(), String> {
        let now = (self.clock)();
        let limit = now.saturating_add_nanos(MAX_BLOCK_TIME_AHEAD.as_nanos() as u64);
        if block.time_nanos > limit.0 {
            return Err(format!(
                "block time {} is more than {MAX_BLOCK_TIME_AHEAD:?} ahead of this replica's clock ({})",
                block.time_nanos, now.0
            ));
        }
        let time = Time(block.time_nanos);
        let mut ids = BTreeSet::new();
        for entry in block.ingress {
            let message = self
                .validate(entry, time)
                .map_err(|error| format!("invalid ingress in block {}: {error}", block.height))?;
            if !ids.insert(message.request_id) {
                return Err(format!(
                    "block {} holds request {} twice",
                    block.height, message.request_id
                ));
            }
        }
        self.recent.lock().record(block.height, ids);
        Ok(())
    }

    fn has_work(&self) -> bool {
        // Messages already in a proposed block are not work for the next one: counting them
        // would make an empty block per update that competes for CPU with the one carrying it.
        if self.pending_work.load(Ordering::Relaxed) {
            return true;
        }
        let recent = self.recent.lock();
        self.pool.has_selectable(&|id| recent.contains(id))
    }
}

/// The ingress pool the HTTP interface submits to: pools the call locally and gossips it.
struct GossipingPool {
    pool: Arc<IngressPoolImpl>,
    service: Arc<SubnetService>,
}

impl IngressPool for GossipingPool {
    fn submit(
        &self,
        message: SignedIngress,
        envelope: IngressEnvelope,
    ) -> Result<(), IngressPoolError> {
        let entry = encode_ingress_entry(&envelope);
        self.pool.submit(message, envelope)?;
        if !self.service.broadcast_ingress(entry) {
            warn!("gossip queue full; the call reaches the subnet when this replica proposes");
        }
        Ok(())
    }
}

/// What the execution thread tells the certification task.
enum Certify {
    /// This replica's root at a height and its share of the signature over it.
    Own {
        height: Height,
        root: [u8; 32],
        partial: openic_consensus::certifier::PartialSignature,
    },
    /// This replica's catch-up checkpoint and its share of the statement about it.
    CatchUp {
        candidate: CatchUpCandidate,
        partial: openic_consensus::certifier::PartialSignature,
    },
}

/// The genesis state's seed: the same on every replica, and unknown before the subnet key
/// existed.
fn genesis_seed(genesis: &Genesis, sharing: &PublicSharing) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(b"openic-genesis-seed");
    hasher.update(genesis.hash());
    hasher.update(sharing.public_key());
    hasher.finalize().into()
}

// Execution answers `raw_rand` only with randomness the consensus seed rule says was unknown
// when the call was made.
const _: () =
    assert!(openic_consensus::bft::SEED_LAG_HEIGHTS == openic_execution::RAW_RAND_LAG_HEIGHTS);

/// The randomness a block executes with, from the subnet's random beacon: the seed the block
/// carries, which execution uses only for answers to earlier heights' requests
/// (`openic_consensus::bft::SEED_LAG_HEIGHTS`, `openic_execution::RAW_RAND_LAG_HEIGHTS`).
pub fn block_randomness(seed: Option<&[u8; 48]>) -> [u8; 32] {
    // Height 1 (on genesis) has no seed: zero randomness adds nothing to the state's seed.
    let Some(seed) = seed else { return [0; 32] };
    let mut hasher = Sha256::new();
    hasher.update(b"openic-random-beacon");
    hasher.update(seed);
    hasher.finalize().into()
}

/// Starts a replica: joins the subnet (at genesis, generates the subnet key with the other
/// members), loads its state, and serves HTTP once it follows consensus.
pub async fn start_replica(config: ReplicaConfig) -> Result<RunningNode, NodeError> {
    let node_config = config.node.clone();
    let state_dir = node_config.state_dir.clone();
    std::fs::create_dir_all(&state_dir).map_err(|source| StorageError::Io {
        path: state_dir.clone(),
        source,
    })?;
    let state_dir_lock = openic_state_manager::StateDirLock::acquire(&state_dir)
        .map_err(|e| NodeError::Locked(e.to_string()))?;
    let node_key = Arc::new(openic_state_manager::load_or_create_identity(
        &config.identity,
    )?);
    let public_key = raw_public_key(&node_key);
    let genesis = config.genesis.clone();
    let Some(my_index) = genesis.index_of(&public_key) else {
        return Err(NodeError::Subnet(format!(
            "this identity ({}) is not a member in the genesis file",
            hex::encode(public_key)
        )));
    };
    let members: Vec<SubnetMember> = genesis
        .members
        .iter()
        .map(|member| {
            Ok(SubnetMember {
                public_key: member
                    .public_key_bytes()
                    .map_err(|e| NodeError::Subnet(e.to_string()))?,
                p2p_address: member.p2p_address,
            })
        })
        .collect::<Result<_, NodeError>>()?;
    let listen = config
        .p2p_listen
        .unwrap_or(genesis.members[my_index].p2p_address);

    let pool = Arc::new(IngressPoolImpl::new(
        node_config.ingress_pool.clone(),
        Arc::new(|_: &RequestId| false),
    ));
    let clock: Arc<dyn Fn() -> Time + Send + Sync> = Arc::new(wall_clock);
    let recent = Arc::new(Mutex::new(RecentIngress::default()));
    let pending_work = Arc::new(AtomicBool::new(true));
    let executed_height = Arc::new(AtomicU64::new(0));

    let mut service_config = SubnetServiceConfig::new(
        node_key.secret_bytes(),
        members,
        listen,
        genesis.hash().to_vec(),
        state_dir.join("consensus"),
    );
    service_config.worker_threads = config.consensus_threads.max(1);
    service_config.bft.min_block_interval = MIN_BLOCK_INTERVAL;
    // Heights are acknowledged to consensus only once a checkpoint covers them (through the
    // oldest checkpoint kept, so falling back to it still finds every later block in consensus's
    // archive): the engine must let that many heights wait for their acknowledgement.
    service_config.bft.pending_acks_max =
        usize::try_from(2 * genesis.catch_up_interval_heights + 16).unwrap_or(usize::MAX);
    let state_sync_min_lead = service_config.bft.pending_acks_max as u64 + 1;
    service_config.bft.idle_block_interval = IDLE_BLOCK_INTERVAL;
    service_config.bft.block_limits.ingress_messages_max =
        node_config.block_maker.max_ingress_messages_per_block;
    service_config.bft.block_limits.ingress_bytes_max =
        node_config.block_maker.max_ingress_bytes_per_block as usize;
    let max_per_canister = node_config
        .execution
        .max_canister_input_queue_len
        .min(node_config.execution.max_subnet_queue_len);
    let policy_parts = (
        pool.clone(),
        node_config.http.clone(),
        clock.clone(),
        recent.clone(),
        node_config.block_maker.clone(),
        pending_work.clone(),
    );
    info!(
        members = genesis.members.len(),
        index = my_index,
        %listen,
        "joining the subnet"
    );
    let key_store = Box::new(IdentityKeyStore::beside(&config.identity, &state_dir));
    let service = tokio::task::spawn_blocking(move || {
        SubnetService::start(service_config, key_store, move |key: &SubnetKey| {
            let (pool, http, clock, recent, limits, pending_work) = policy_parts;
            let root_key_der = key.sharing.root_key_der();
            ReplicaPolicy {
                pool,
                http,
                subnet_id: SubnetId(self_authenticating_principal(&root_key_der)),
                clock,
                max_messages: limits.max_ingress_messages_per_block,
                max_bytes: limits.max_ingress_bytes_per_block,
                max_per_canister,
                recent,
                pending_work,
            }
        })
    })
    .await
    .map_err(|e| NodeError::Subnet(format!("the subnet start-up task failed: {e}")))?
    .map_err(|e| NodeError::Subnet(e.to_string()))?;
    let service = Arc::new(service);
    let key = service.key().clone();
    let root_key_der = key.sharing.root_key_der();
    let subnet_id = SubnetId(self_authenticating_principal(&root_key_der));
    let node_id = NodeId(node_key.node_id());
    info!(subnet_id = %subnet_id.0, "subnet key ready");

    let embedder: Arc<dyn Embedder> = Arc::new(
        WasmtimeEmbedder::new(node_config.embedder.clone())
            .map_err(|e| NodeError::Embedder(e.to_string()))?,
    );
    let subnet_context = SubnetContext {
        subnet_id,
        root_key_der: root_key_der.clone(),
        node_count: genesis.members.len() as u32,
    };
    let mut scheduler = Scheduler::new(
        embedder.clone(),
        node_config.execution.clone(),
        subnet_context.clone(),
    );
    let mut checkpoints = FileCheckpointStore::open(&state_dir, node_config.checkpoints.clone())?;
    // No block log: consensus redelivers every height not acknowledged, and heights are
    // acknowledged only once a checkpoint covers them.
    let state = load_state(&mut checkpoints, None, &mut scheduler, || {
        ReplicatedState::new(
            subnet_id,
            FIRST_USER_CANISTER_INDEX,
            genesis_seed(&genesis, &key.sharing),
        )
    })?;
    executed_height.store(state.metadata.height.0, Ordering::SeqCst);

    let peer_nodes = genesis
        .members
        .iter()
        .filter_map(|member| member.public_key_bytes().ok())
        .filter(|key| *key != public_key)
        .map(|key| {
            let der = ic_ed25519::PublicKey::convert_raw32_to_der(key);
            (NodeId(self_authenticating_principal(&der)), der)
        })
        .collect();
    let certified = Arc::new(CertifiedStateStore::new_threshold(SubnetInfo {
        subnet_id,
        root_key_der: root_key_der.clone(),
        node_id,
        node_public_key_der: node_key.public_key_der().to_vec(),
        peer_nodes,
        canister_ranges: subnet_canister_ranges(),
    }));

    let mut registry = prometheus_client::registry::Registry::with_prefix("openic");
    let node_metrics = Arc::new(NodeMetrics::register(&mut registry));
    node_metrics.height.set(state.metadata.height.0 as i64);
    let halted = Arc::new(Mutex::new(None::<String>));
    let stop = Arc::new(AtomicBool::new(false));
    let wake = Arc::new(tokio::sync::Notify::new());

    // Certification and inbound gossip.
    let (certify_tx, certify_rx) = tokio::sync::mpsc::channel::<Certify>(1_024);
    let inbound = service
        .take_inbound()
        .ok_or_else(|| NodeError::Subnet("inbound messages already taken".into()))?;
    let subnet_height_hint = Arc::new(AtomicU64::new(0));
    let handoff = SyncHandoff::new(wake.clone());
    let (state_sync, sync_finished) = StateSync::new(StateSyncParts {
        sharing: key.sharing.clone(),
        interval: genesis.catch_up_interval_heights,
        min_lead: state_sync_min_lead,
        service: service.clone(),
        executed_height: executed_height.clone(),
        handoff: handoff.clone(),
        metrics: node_metrics.clone(),
    });
    let certification_task = tokio::spawn(certification_loop(CertificationLoop {
        state_sync,
        sync_finished,
        handoff: handoff.clone(),
        subnet_height_hint: subnet_height_hint.clone(),
        // Shares arrive only from the replica they belong to (the subnet service checks), so
        // the pool checks the recovered signature rather than each share.
        pool: CertificationPool::new(
            key.sharing.clone(),
            CertificationPoolConfig {
                verify_on_arrival: false,
                ..CertificationPoolConfig::default()
            },
            state.metadata.height,
        ),
        invalid_shares_seen: 0,
        far_heights: BTreeMap::new(),
        certified: certified.clone(),
        ingress_pool: pool.clone(),
        http: node_config.http.clone(),
        subnet_id,
        clock: clock.clone(),
        halted: halted.clone(),
        metrics: node_metrics.clone(),
        own: certify_rx,
        inbound,
    }));

    let deliveries = service
        .take_deliveries()
        .ok_or_else(|| NodeError::Subnet("deliveries already taken".into()))?;
    let execution = ExecutionThread {
        state,
        scheduler,
        unacknowledged: std::collections::VecDeque::new(),
        checkpoints,
        certified: certified.clone(),
        pool: pool.clone(),
        share: key.share.clone(),
        floor: service.floor_control(),
        service: service.clone(),
        certify: certify_tx,
        handoff,
        catch_up_interval: genesis.catch_up_interval_heights,
        subnet_height_hint: subnet_height_hint.clone(),
        recent,
        executed_height,
        pending_work,
        http: node_config.http.clone(),
        subnet_id,
        stop: stop.clone(),
        wake: wake.clone(),
        halted: halted.clone(),
        metrics: node_metrics.clone(),
        _state_dir_lock: state_dir_lock,
    };
    let execution_thread = std::thread::Builder::new()
        .name("openic-execution".into())
        .spawn(move || execution.run(deliveries))
        .map_err(|e| NodeError::Subnet(format!("cannot start the execution thread: {e}")))?;

    let (http, memory_trimmer) = serve_http(
        &node_config,
        HttpParts {
            embedder,
            certified: certified.clone(),
            subnet_context,
            ingress_pool: Arc::new(GossipingPool {
                pool,
                service: service.clone(),
            }),
            node_key: node_key.clone(),
            root_key_der: root_key_der.clone(),
            clock,
            halted,
            registry,
            subnet_height_hint: Some(subnet_height_hint),
        },
    )
    .await?;
    let local_addr = http.local_addr;
    let url = format!("http://{local_addr}");
    info!(%url, subnet_id = %subnet_id.0, "openic replica ready");
    Ok(RunningNode {
        url,
        local_addr,
        root_key_der,
        subnet_id,
        node_id,
        stop,
        block_thread: Some(execution_thread),
        wake_block_thread: wake,
        http: Some(http),
        memory_trimmer: Some(memory_trimmer),
        subnet: Some(SubnetParts {
            service,
            certification_task,
        }),
    })
}

/// How long a replica that finds itself at least one catch-up interval behind its peers waits for
/// their signed catch-up checkpoint (state sync) before it replays the blocks instead.
const CATCH_UP_ADVERT_WAIT: Duration = Duration::from_secs(6);

/// How long a call refused on this replica's certified state waits for the state its peers
/// already signed before it is checked again.
const CATCH_UP_WAIT: Duration = Duration::from_secs(2);

/// Checks calls on this replica's latest certified state and, when that refuses a call while the
/// replica is behind the height its peers have signed (a canister just installed through another
/// replica, say), checks again once it caught up. A client that sends each call to another replica
/// thus sees the effects of its earlier calls, as it would on one replica.
pub(crate) struct CatchUpInspector {
    pub(crate) inner: Arc<dyn openic_interfaces::IngressInspector>,
    pub(crate) certified: Arc<CertifiedStateStore>,
    pub(crate) subnet_height_hint: Arc<AtomicU64>,
}

impl openic_interfaces::IngressInspector for CatchUpInspector {
    fn inspect(&self, message: &SignedIngress) -> Result<(), openic_types::UserError> {
        let refused = match self.inner.inspect(message) {
            Ok(()) => return Ok(()),
            Err(refused) => refused,
        };
        let target = self.subnet_height_hint.load(Ordering::Relaxed);
        if self.certified.certified_height().0 >= target {
            return Err(refused);
        }
        // Called on a blocking thread (the HTTP layer's execution slots).
        let deadline = Instant::now() + CATCH_UP_WAIT;
        while self.certified.certified_height().0 < target && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.inner.inspect(message)
    }
}

/// The parts of a replica that a one-replica node does not have, for shutting them down.
pub(crate) struct SubnetParts {
    service: Arc<SubnetService>,
    certification_task: tokio::task::JoinHandle<()>,
}

impl SubnetParts {
    /// Stops networking and consensus (after the execution thread stopped).
    pub(crate) async fn shutdown(self) {
        self.certification_task.abort();
        let service = self.service;
        let _ = tokio::task::spawn_blocking(move || service.shutdown()).await;
    }
}

fn raw_public_key(node_key: &NodeKey) -> [u8; 32] {
    let der = node_key.public_key_der();
    let mut key = [0; 32];
    key.copy_from_slice(&der[der.len() - 32..]);
    key
}

struct CertificationLoop {
    /// The highest height each signer signed beyond this replica's window (see `TooFarAhead`).
    far_heights: BTreeMap<u32, u64>,
    /// The pool's count of shares found invalid after they were stored, as last reported.
    invalid_shares_seen: u64,
    state_sync: StateSync,
    sync_finished: crate::state_sync::FinishedReceiver,
    handoff: SyncHandoff,
    subnet_height_hint: Arc<AtomicU64>,
    pool: CertificationPool,
    certified: Arc<CertifiedStateStore>,
    ingress_pool: Arc<IngressPoolImpl>,
    http: openic_http_api::HttpApiConfig,
    subnet_id: SubnetId,
    clock: Arc<dyn Fn() -> Time + Send + Sync>,
    halted: Arc<Mutex<Option<String>>>,
    metrics: Arc<NodeMetrics>,
    own: tokio::sync::mpsc::Receiver<Certify>,
    inbound: tokio::sync::mpsc::Receiver<Inbound>,
}

/// Collects certification shares and publishes certified heights; checks and pools ingress
/// gossiped by peers.
async fn certification_loop(mut task: CertificationLoop) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let event = tokio::select! {
            _ = tick.tick() => {
                task.state_sync.note_executed();
                task.state_sync.tick();
                Vec::new()
            },
            finished = task.sync_finished.recv() => {
                if let Some((height, result)) = finished {
                    task.state_sync.finished(height, result);
                }
                Vec::new()
            },
            own = task.own.recv() => match own {
                Some(Certify::Own { height, root, partial }) => {
                    let mut events = Vec::new();
                    match task.pool.set_own_root(height, root) {
                        Ok(event) => events.extend(event),
                        Err(conflict) => {
                            error!(%conflict, "critical: two roots for one height");
                            task.metrics.critical_errors.inc();
                        }
                    }
                    if let Ok(event) = task.pool.add_partial(&partial) {
                        events.extend(event);
                    }
                    events
                }
                Some(Certify::CatchUp { candidate, partial }) => {
                    task.state_sync.own_candidate(candidate, partial);
                    Vec::new()
                }
                None => return,
            },
            inbound = task.inbound.recv() => match inbound {
                Some(Inbound::Partial(partial)) if partial.statement == Statement::CatchUp => {
                    task.state_sync.partial(&partial);
                    Vec::new()
                }
                Some(Inbound::Sync { from, bytes }) => {
                    task.state_sync.message(from, &bytes);
                    Vec::new()
                }
                Some(Inbound::Partial(partial)) => match task.pool.add_partial(&partial) {
                    Ok(event) => {
                        task.subnet_height_hint.fetch_max(partial.height.0, Ordering::Relaxed);
                        event.into_iter().collect()
                    }
                    Err(openic_consensus::certifier::PartialError::TooFarAhead { .. }) => {
                        // This replica is far behind (catching up, or wiped): shares still tell
                        // it how far the subnet got, once f + 1 signers (one of them honest)
                        // signed at least that height.
                        let known = task.far_heights.get(&partial.signer.0).copied().unwrap_or(0);
                        if partial.height.0 > known
                            && openic_consensus::certifier::verify_partial(task.pool.sharing(), &partial).is_ok()
                        {
                            task.far_heights.insert(partial.signer.0, partial.height.0);
                            let faults = (task.pool.sharing().replicas() as usize - 1) / 3;
                            let mut heights: Vec<u64> = task.far_heights.values().copied().collect();
                            heights.sort_unstable_by(|a, b| b.cmp(a));
                            if let Some(height) = heights.get(faults) {
                                task.subnet_height_hint.fetch_max(*height, Ordering::Relaxed);
                            }
                        }
                        Vec::new()
                    }
                    Err(error) => {
                        if error.is_misbehaviour() {
                            task.metrics.certification_shares_refused.inc();
                            warn!(%error, "refused a certification share");
                        }
                        Vec::new()
                    }
                },
                Some(Inbound::Ingress(bytes)) => {
                    accept_gossiped_ingress(&task, &bytes);
                    Vec::new()
                }
                None => return,
            },
        };
        let invalid = task.pool.invalid_found_later();
        if invalid > task.invalid_shares_seen {
            task.metrics
                .certification_shares_refused
                .inc_by(invalid - task.invalid_shares_seen);
            warn!(
                count = invalid - task.invalid_shares_seen,
                "certification shares with invalid signatures (found when a recovered signature failed its check)"
            );
            task.invalid_shares_seen = invalid;
        }
        for event in event {
            match event {
                PoolEvent::Certified {
                    height, signature, ..
                } => {
                    match task.certified.publish(height, signature) {
                        Ok(()) => {
                            task.metrics.certified_height.set(height.0 as i64);
                        }
                        // A later height was already published, or the state was replaced.
                        Err(error) => tracing::debug!(%error, "certified height not published"),
                    }
                }
                PoolEvent::Diverged {
                    height,
                    own_root,
                    subnet_root,
                } => {
                    let reason = format!(
                        "this replica's state at height {height} (root {}) differs from the \
                         subnet's (root {}); it stops serving certified answers",
                        hex::encode(own_root),
                        hex::encode(subnet_root)
                    );
                    error!(%reason, "critical: state diverged from the subnet; execution stops until state sync installs the subnet's state");
                    task.metrics.critical_errors.inc();
                    task.metrics.state_diverged.set(1);
                    *task.halted.lock() = Some(reason);
                    let _ = task.handoff.diverged_at.compare_exchange(
                        0,
                        height.0,
                        Ordering::SeqCst,
                        Ordering::SeqCst,
                    );
                }
            }
        }
    }
}

fn accept_gossiped_ingress(task: &CertificationLoop, bytes: &[u8]) {
    let Ok(envelope) = decode_ingress_entry(bytes) else {
        return;
    };
    let now = (task.clock)();
    match openic_http_api::validate_ingress_envelope(&envelope, task.subnet_id, now, &task.http) {
        Ok(message) => {
            if task
                .certified
                .ingress_status_meta(&message.request_id)
                .is_some()
            {
                return;
            }
            let _ = task.ingress_pool.submit(message, envelope);
        }
        Err(error) => tracing::debug!(%error, "refused gossiped ingress"),
    }
}

/// The single writer of a replica's state.
struct ExecutionThread {
    state: ReplicatedState,
    scheduler: Scheduler,
    /// Executed heights not acknowledged to consensus yet (see `ExecutionThread::checkpoint`).
    unacknowledged: std::collections::VecDeque<(u64, openic_consensus::bft::DeliveryAck)>,
    checkpoints: FileCheckpointStore,
    certified: Arc<CertifiedStateStore>,
    pool: Arc<IngressPoolImpl>,
    share: KeyShare,
    service: Arc<SubnetService>,
    floor: FloorControl,
    certify: tokio::sync::mpsc::Sender<Certify>,
    handoff: SyncHandoff,
    catch_up_interval: u64,
    /// The highest height a peer signed a state root for.
    subnet_height_hint: Arc<AtomicU64>,
    recent: Arc<Mutex<RecentIngress>>,
    executed_height: Arc<AtomicU64>,
    pending_work: Arc<AtomicBool>,
    http: openic_http_api::HttpApiConfig,
    subnet_id: SubnetId,
    stop: Arc<AtomicBool>,
    wake: Arc<tokio::sync::Notify>,
    halted: Arc<Mutex<Option<String>>>,
    metrics: Arc<NodeMetrics>,
    _state_dir_lock: openic_state_manager::StateDirLock,
}

impl ExecutionThread {
    fn run(mut self, mut deliveries: openic_consensus::bft::Deliveries) {
        let runtime = match tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
        {
            Ok(runtime) => runtime,
            Err(error) => {
                error!(%error, "cannot start the execution thread's runtime");
                self.metrics.critical_errors.inc();
                return;
            }
        };
        let mut schedule = CheckpointSchedule::new(self.state.metadata.height);
        // Since when this replica has been at least one catch-up interval behind its peers.
        let mut behind_since: Option<Instant> = None;
        loop {
            if self.stop.load(Ordering::SeqCst) {
                break;
            }
            let synced = self.handoff.ready.lock().take();
            if let Some(synced) = synced {
                if self.install(synced, &deliveries) {
                    schedule.attempted(self.state.metadata.height, true);
                }
                continue;
            }
            let target = self.handoff.target.load(Ordering::SeqCst);
            let diverged = self.handoff.diverged_at.load(Ordering::SeqCst) != 0;
            let height = self.state.metadata.height.0;
            let far_behind = self.subnet_height_hint.load(Ordering::Relaxed)
                >= height.saturating_add(
                    crate::state_sync::SYNC_LAG_INTERVALS.saturating_mul(self.catch_up_interval),
                );
            behind_since = match (far_behind, behind_since) {
                (false, _) => None,
                (true, None) => Some(Instant::now()),
                (true, since) => since,
            };
            let awaiting_advert =
                behind_since.is_some_and(|since| since.elapsed() < CATCH_UP_ADVERT_WAIT);
            if diverged || target > height || awaiting_advert {
                // A fetched state is on its way (or this state is known bad): replaying old
                // blocks meanwhile is wasted work.
                runtime.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_millis(200), self.wake.notified())
                        .await;
                });
                continue;
            }
            let next = runtime.block_on(async {
                tokio::select! {
                    next = deliveries.next() => next,
                    _ = self.wake.notified() => None,
                }
            });
            let Some((finalized, ack)) = next else {
                continue;
            };
            if finalized.height <= self.state.metadata.height.0 {
                // Delivered again after a restart: the loaded checkpoint covers it.
                ack.acknowledge();
                continue;
            }
            if finalized.height > self.state.metadata.height.0 + 1 {
                // Consensus continues above this state (a checkpoint it relied on was lost or
                // corrupt): only a state fetched from the peers can bridge the gap.
                let reason = format!(
                    "consensus delivers height {} but the state is at height {}; waiting for \
                     state sync",
                    finalized.height, self.state.metadata.height
                );
                error!(%reason, "critical: heights missing below consensus's floor");
                self.metrics.critical_errors.inc();
                *self.halted.lock() = Some(reason);
                let _ = self.handoff.diverged_at.compare_exchange(
                    0,
                    self.state.metadata.height.0.max(1),
                    Ordering::SeqCst,
                    Ordering::SeqCst,
                );
                // Kept unacknowledged: delivered again after a restart.
                self.unacknowledged.push_back((finalized.height, ack));
                continue;
            }
            let block = match self.to_block(&finalized) {
                Ok(block) => block,
                Err(reason) => {
                    error!(%reason, "critical: the replica stops executing");
                    self.metrics.critical_errors.inc();
                    *self.halted.lock() = Some(reason);
                    break;
                }
            };
            self.unacknowledged.push_back((block.height.0, ack));
            let started = Instant::now();
            let summary = self.scheduler.execute_block(&mut self.state, &block);
            self.metrics
                .block_execution_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics
                .ingress_inducted
                .inc_by(summary.ingress_inducted);
            self.metrics
                .messages_executed
                .inc_by(summary.messages_executed);
            self.metrics
                .instructions_executed
                .inc_by(summary.instructions_executed);
            self.pool.note_included(&block.ingress);
            self.pool
                .release_executed(block.ingress.iter().map(|m| &m.request_id));
            self.recent.lock().prune_through(block.height.0);
            self.executed_height.store(block.height.0, Ordering::SeqCst);
            self.pending_work.store(
                summary.work_pending || self.scheduler.has_pending_work(&self.state),
                Ordering::Relaxed,
            );

            let started = Instant::now();
            match self.certified.prepare(&mut self.state) {
                Ok(root) => {
                    let partial = sign_partial(&self.share, block.height, &root);
                    if !self.service.broadcast_partial(partial) {
                        warn!(height = %block.height, "gossip queue full; certification share not sent");
                    }
                    let _ = self.certify.blocking_send(Certify::Own {
                        height: block.height,
                        root,
                        partial,
                    });
                }
                Err(error) => {
                    error!(%error, "critical: cannot prepare a height for certification");
                    self.metrics.critical_errors.inc();
                }
            }
            self.metrics
                .certification_duration_seconds
                .observe(started.elapsed().as_secs_f64());
            self.metrics.height.set(block.height.0 as i64);
            self.metrics
                .canisters
                .set(self.state.canisters.len() as i64);

            if block.height.0.is_multiple_of(self.catch_up_interval) {
                let written = self.checkpoint();
                schedule.attempted(block.height, written);
                if written {
                    self.offer_catch_up(&finalized);
                }
            }
        }
        deliveries.close();
        if schedule.behind(self.state.metadata.height) {
            self.checkpoint();
        }
        // Heights still unacknowledged are delivered again after a restart.
        info!(height = %self.state.metadata.height, "execution thread stopped");
    }

    /// The block execution sees: the ingress decoded (every replica checked each message before
    /// voting for the block; a message that no longer checks out at the block's time, which
    /// cannot happen between honest replicas, is left out the same way on every replica).
    fn to_block(&self, finalized: &FinalizedBlock) -> Result<Block, String> {
        let expected = self.state.metadata.height.increment();
        if finalized.height != expected.0 {
            return Err(format!(
                "consensus delivered height {} but the state is at height {}",
                finalized.height, self.state.metadata.height
            ));
        }
        let time = Time(finalized.time_nanos);
        let mut ingress = Vec::with_capacity(finalized.ingress.len());
        for entry in &finalized.ingress {
            let checked = decode_ingress_entry(entry).and_then(|envelope| {
                openic_http_api::validate_ingress_envelope(
                    &envelope,
                    self.subnet_id,
                    time,
                    &self.http,
                )
                .map_err(|e| e.to_string())
            });
            match checked {
                Ok(message) => ingress.push(message),
                Err(error) => {
                    warn!(height = finalized.height, %error, "finalized block holds an invalid message; it is skipped")
                }
            }
        }
        let bytes: u64 = ingress.iter().map(message_bytes).sum();
        tracing::trace!(
            height = finalized.height,
            messages = ingress.len(),
            bytes,
            "executing"
        );
        Ok(Block {
            height: expected,
            time,
            ingress,
            randomness: block_randomness(finalized.seed.as_ref()),
        })
    }

    /// After the checkpoint at a catch-up height: builds its state-sync manifest, signs the
    /// catch-up statement with this replica's share and hands both to the state-sync task.
    fn offer_catch_up(&mut self, finalized: &FinalizedBlock) {
        let snapshot = match self.checkpoints.sync_snapshot(&self.state) {
            Ok(snapshot) => Arc::new(snapshot),
            Err(error) => {
                error!(%error, height = finalized.height, "critical: cannot build the state-sync manifest");
                self.metrics.critical_errors.inc();
                return;
            }
        };
        // The manifest travels in one message with the finalization certificate (a few hundred
        // bytes): a state whose manifest does not fit (tens of thousands of chunks, tens of GiB)
        // cannot be served, so it is not signed.
        let manifest_bytes = snapshot.encoded_manifest().len();
        if manifest_bytes + 64 * 1024 > openic_consensus::subnet::STATE_SYNC_MESSAGE_BYTES_MAX {
            error!(
                height = finalized.height,
                manifest_bytes,
                "the state is too large for state sync (its manifest exceeds one message); no catch-up checkpoint is offered"
            );
            return;
        }
        let candidate = CatchUpCandidate {
            height: finalized.height,
            block_digest: finalized.digest,
            snapshot,
        };
        let partial = candidate.sign(&self.share);
        if !self.service.broadcast_partial(partial) {
            warn!(
                height = finalized.height,
                "gossip queue full; catch-up share not sent"
            );
        }
        let _ = self
            .certify
            .blocking_send(Certify::CatchUp { candidate, partial });
    }

    /// Installs a state fetched by state sync: checkpoints it, restarts the block log after it,
    /// moves the engine's delivery floor to its block and resumes from the next height. Returns
    /// whether it was installed.
    fn install(
        &mut self,
        synced: SyncedState,
        deliveries: &openic_consensus::bft::Deliveries,
    ) -> bool {
        let height = synced.state.metadata.height;
        let diverged = self.handoff.diverged_at.load(Ordering::SeqCst) != 0;
        let done = |this: &mut Self| {
            this.handoff.target.store(0, Ordering::SeqCst);
        };
        if height <= self.state.metadata.height && !diverged {
            info!(%height, executed = %self.state.metadata.height, "state sync: replay got there first; fetched state dropped");
            done(self);
            return false;
        }
        if let Err(error) = self.checkpoints.write_checkpoint(&synced.state) {
            error!(%error, %height, "state sync: cannot checkpoint the fetched state; it is not installed");
            self.metrics.critical_errors.inc();
            done(self);
            return false;
        }
        // Older checkpoints hold a state this replica no longer continues: deliveries resume
        // above the installed height, so falling back to one of them could never catch up.
        if let Err(error) = self.checkpoints.retain_only(height) {
            warn!(%error, %height, "state sync: older checkpoints could not be removed");
        }
        self.state = synced.state;
        // Every height executed or queued so far is at or below the installed one.
        for (_, ack) in self.unacknowledged.drain(..) {
            ack.acknowledge();
        }
        self.certified.request_full_rebuild();
        if let Err(error) = self
            .floor
            .set_floor(&synced.finalization, &synced.block_digest)
        {
            error!(%error, %height, "critical: state sync could not move the consensus floor");
            self.metrics.critical_errors.inc();
        }
        deliveries.skip_through(height.0);
        self.executed_height.store(height.0, Ordering::SeqCst);
        self.recent.lock().prune_through(height.0);
        match self.certified.prepare(&mut self.state) {
            Ok(root) => {
                let partial = sign_partial(&self.share, height, &root);
                let _ = self.service.broadcast_partial(partial);
                let _ = self.certify.blocking_send(Certify::Own {
                    height,
                    root,
                    partial,
                });
            }
            Err(error) => warn!(%error, %height, "state sync: installed height not prepared"),
        }
        if diverged {
            self.handoff.diverged_at.store(0, Ordering::SeqCst);
            *self.halted.lock() = None;
            self.metrics.state_diverged.set(0);
        }
        self.metrics.state_syncs.inc();
        self.metrics.height.set(height.0 as i64);
        self.metrics
            .canisters
            .set(self.state.canisters.len() as i64);
        info!(
            %height,
            bytes = synced.bytes,
            seconds = synced.started.elapsed().as_secs_f64(),
            "state sync: installed the subnet's state; following consensus from the next height"
        );
        done(self);
        true
    }

    /// Writes a checkpoint and acknowledges to consensus every executed height the oldest kept
    /// checkpoint covers (if the latest turns out corrupt on load, the previous one is used, and
    /// consensus must still deliver every height after it).
    fn checkpoint(&mut self) -> bool {
        let written = crate::checkpointing::write_checkpoint(
            &self.state,
            &mut self.checkpoints,
            None,
            &self.metrics,
        );
        if written {
            let through = match self.checkpoints.oldest_checkpoint_height() {
                Ok(oldest) => oldest.map(|h| h.0).unwrap_or(0),
                Err(error) => {
                    warn!(%error, "cannot list checkpoints; heights stay unacknowledged");
                    0
                }
            };
            while self
                .unacknowledged
                .front()
                .is_some_and(|(height, _)| *height <= through)
            {
                if let Some((_, ack)) = self.unacknowledged.pop_front() {
                    ack.acknowledge();
                }
            }
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ingress_entries_round_trip_and_refuse_garbage() {
        let envelope = IngressEnvelope {
            effective_canister_id: CanisterId::from_u64(42),
            bytes: vec![1, 2, 3].into(),
        };
        let bytes = encode_ingress_entry(&envelope);
        assert_eq!(decode_ingress_entry(&bytes).unwrap(), envelope);
        assert!(decode_ingress_entry(&[]).is_err());
        assert!(decode_ingress_entry(&[2, 0]).is_err());
        assert!(decode_ingress_entry(&[1, 30, 0]).is_err());
        assert!(decode_ingress_entry(&[1, 5, 0]).is_err());
    }

    #[test]
    fn recent_ingress_forgets_executed_heights() {
        let mut recent = RecentIngress::default();
        recent.record(5, [RequestId([1; 32]), RequestId([2; 32])]);
        recent.record(7, [RequestId([2; 32]), RequestId([3; 32])]);
        assert!(recent.contains(&RequestId([1; 32])));
        recent.prune_through(5);
        assert!(!recent.contains(&RequestId([1; 32])));
        assert!(recent.contains(&RequestId([2; 32])), "re-recorded at 7");
        recent.prune_through(7);
        assert!(!recent.contains(&RequestId([3; 32])));
    }
}
