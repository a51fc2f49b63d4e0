//! Traits and error types between openic's components. Components depend on these, never on each
//! other's implementations; only `openic-node` names implementations and wires them together.
//!
//! The request path they describe: the HTTP interface validates a request and hands an update to the
//! [`IngressPool`] (after asking the [`IngressInspector`]), or a query to the [`QueryExecutor`]. The
//! block maker takes ingress from the pool into blocks; the [`BlockLog`] makes each block durable
//! before the [`BlockExecutor`] executes it into the replicated state; certification then hashes and
//! signs the state, and the [`CertifiedStateReader`] serves certificates and statuses back to HTTP.

use openic_replicated_state::{CanisterState, ReplicatedState};
use openic_types::{
    Block, CanisterId, Height, IngressEnvelope, IngressStatus, Principal, QueryResult, RequestId,
    SignedIngress, Time, UserError, UserQuery,
};
use std::collections::BTreeMap;
use std::sync::Arc;

/// A path in the state tree: a sequence of labels.
pub type LabelPath = Vec<Vec<u8>>;

/// Why the ingress pool refused a message.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IngressPoolError {
    /// The same request id is already in the pool or was already executed (replay protection).
    /// Permanent: the client should read the status of the earlier request instead.
    #[error("request {0} was already submitted; read its status instead of sending it again")]
    Duplicate(RequestId),
    /// The pool holds its maximum number of messages or bytes. Retryable: try again shortly.
    #[error("the ingress pool is full ({messages} messages, {bytes} bytes); retry shortly")]
    Full {
        /// Messages in the pool.
        messages: usize,
        /// Bytes in the pool.
        bytes: u64,
    },
}

/// The ingress pool: validated update calls waiting to be put into a block.
pub trait IngressPool: Send + Sync {
    /// Adds a validated message with the envelope it came in (which a replica of a multi-replica
    /// subnet forwards to its peers and proposes in blocks, so that every replica checks the
    /// signature itself). Refuses duplicates (a request id that is in the pool or in the ingress
    /// history) and refuses when the pool is at its limits. Never blocks.
    fn submit(
        &self,
        message: SignedIngress,
        envelope: IngressEnvelope,
    ) -> Result<(), IngressPoolError>;
}

/// Runs `canister_inspect_message` (and the other non-replicated checks: the canister exists, is
/// not empty, the method exists, management-canister calls are allowed from users) before an update
/// call is accepted into the pool.
pub trait IngressInspector: Send + Sync {
    /// `Ok` if the message may enter the pool; `Err` with the rejection to send back as a
    /// `non_replicated_rejection` otherwise. Runs against the latest certified state.
    fn inspect(&self, message: &SignedIngress) -> Result<(), UserError>;
}

/// Executes user queries against the latest certified state.
pub trait QueryExecutor: Send + Sync {
    /// Runs the query (including composite queries and management-canister queries such as
    /// `canister_status`). Blocking and CPU-bound: call it from a blocking thread. Never panics on
    /// anything a canister does.
    fn query(&self, query: UserQuery) -> QueryResult;
}

/// Why a certificate could not be produced.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CertificationError {
    /// No state has been certified yet (the node is starting).
    #[error("no state has been certified yet; the replica is still starting")]
    NotYetCertified,
    /// A path is malformed or not allowed (the HTTP layer maps this to 400/403).
    #[error("invalid path: {0}")]
    InvalidPath(String),
}

/// Who may read a canister's metadata section.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MetadataVisibility {
    /// `icp:public <name>`: anyone.
    Public,
    /// `icp:private <name>`: controllers only.
    Private,
}

/// The parts of an ingress status that authorisation and waiting need, without the reply (which
/// can be megabytes): cheap to copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IngressStatusMeta {
    /// The request's sender.
    pub sender: Principal,
    /// The effective canister id the request was sent to.
    pub effective_canister_id: CanisterId,
    /// Whether the status is terminal (replied, rejected or done).
    pub is_terminal: bool,
}

impl IngressStatusMeta {
    /// The meta data of a full status.
    pub fn of(status: &IngressStatus) -> Self {
        IngressStatusMeta {
            sender: status.sender,
            effective_canister_id: status.effective_canister_id,
            is_terminal: status.state.is_terminal(),
        }
    }
}

/// Read access to the latest certified state, for the HTTP interface.
///
/// Invariant: everything returned describes a state whose root hash has been signed; certificates
/// carry `/time` of that state, which the node keeps fresh by certifying a new height at least every
/// `idle_block_interval` even when idle.
pub trait CertifiedStateReader: Send + Sync {
    /// The latest certified height (0 before the first certification).
    fn certified_height(&self) -> Height;

    /// The block time (`/time`) of the latest certified height (`Time(0)` before the first
    /// certification). The HTTP status endpoint compares it with the wall clock to tell whether
    /// the node still makes progress.
    fn certified_time(&self) -> Time;

    /// A receiver that changes whenever a new height is certified.
    fn subscribe_certified_height(&self) -> tokio::sync::watch::Receiver<Height>;

    /// The status of an update call in the latest certified state.
    fn ingress_status(&self, request_id: &RequestId) -> Option<IngressStatus>;

    /// Sender, effective canister id and terminality of an update call in the latest certified
    /// state, without copying its reply. Implementations should override the default (which
    /// clones the whole status) with a lookup that copies nothing large.
    fn ingress_status_meta(&self, request_id: &RequestId) -> Option<IngressStatusMeta> {
        self.ingress_status(request_id)
            .map(|status| IngressStatusMeta::of(&status))
    }

    /// The controllers of a canister in the latest certified state, or `None` if it does not exist.
    fn canister_controllers(&self, canister_id: &CanisterId) -> Option<Vec<Principal>>;

    /// The visibility of metadata section `name` of a canister, or `None` if there is no such
    /// canister or section.
    fn metadata_visibility(
        &self,
        canister_id: &CanisterId,
        name: &str,
    ) -> Option<MetadataVisibility>;

    /// The CBOR (tag 55799) certificate revealing `paths` in the latest certified state, plus
    /// `/time`. Paths that are absent are proven absent (their neighbours' labels are kept), never
    /// pruned. The caller has already checked that the requester may read each path.
    fn certificate_for_paths(&self, paths: &[LabelPath]) -> Result<Vec<u8>, CertificationError>;

    /// Like [`CertifiedStateReader::certificate_for_paths`], but only from the state certified at
    /// `height`: `Ok(None)` when the latest certified height is another one.
    ///
    /// This lets a reader authorise against one height and certify that same height: read
    /// [`CertifiedStateReader::certified_height`], check the request with the other methods, then
    /// ask for the certificate at the height read first, and start over on `None`. Since published
    /// heights only grow, every read between two observations of the same height saw that height.
    fn certificate_for_paths_at(
        &self,
        paths: &[LabelPath],
        height: Height,
    ) -> Result<Option<Vec<u8>>, CertificationError>;

    /// The data certificate for a query to `canister_id`: a certificate revealing
    /// `/canister/<canister_id>/certified_data` and `/time` of the same state as
    /// [`StateSnapshotSource::latest_snapshot`].
    fn data_certificate(&self, canister_id: &CanisterId) -> Result<Vec<u8>, CertificationError>;
}

/// A certified state snapshot for query execution: the canisters as of `height`.
#[derive(Clone, Debug)]
pub struct CanistersSnapshot {
    /// The height the snapshot was certified at.
    pub height: Height,
    /// The block time of that height.
    pub time: openic_types::Time,
    /// The canisters.
    pub canisters: Arc<BTreeMap<CanisterId, Arc<CanisterState>>>,
    /// Their logs (for `fetch_canister_logs` and `canister_status`).
    pub logs: Arc<openic_replicated_state::CanisterLogs>,
    /// Their snapshots (for `canister_status`).
    pub snapshots: Arc<openic_replicated_state::CanisterSnapshots>,
}

/// Source of the latest certified canister snapshot (for queries and ingress inspection).
pub trait StateSnapshotSource: Send + Sync {
    /// The latest certified snapshot.
    fn latest_snapshot(&self) -> CanistersSnapshot;
}

/// Summary of one executed block, used for metrics and by certification.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockExecutionSummary {
    /// Ingress messages inducted.
    pub ingress_inducted: u64,
    /// Messages executed (ingress, requests, responses, tasks).
    pub messages_executed: u64,
    /// Instructions executed.
    pub instructions_executed: u64,
    /// Whether work remains (messages still queued, e.g. because the round's instruction budget
    /// ran out): the block maker should make another block right away.
    pub work_pending: bool,
}

/// Executes finalized blocks into the replicated state.
pub trait BlockExecutor: Send {
    /// Executes `block` on top of `state`. Deterministic: depends only on `state` and `block`.
    /// Updates `state.metadata.height` and `.time` to the block's. Never panics on anything a
    /// canister or a user message does.
    fn execute_block(
        &mut self,
        state: &mut ReplicatedState,
        block: &Block,
    ) -> BlockExecutionSummary;

    /// Whether `state` has work that needs a block even with no ingress (queued messages, due
    /// timers, heartbeats).
    fn has_pending_work(&self, state: &ReplicatedState) -> bool;
}

/// Errors of the storage layer. Not retryable: the node stops rather than lose data.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// An I/O error, with the file it concerned.
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: std::path::PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// Stored data failed verification (checksum or hash mismatch, undecodable record).
    #[error("corrupt data in {path}: {reason}")]
    Corrupt {
        /// The file or directory.
        path: std::path::PathBuf,
        /// What was wrong.
        reason: String,
    },
}

/// The durable log of finalized blocks.
pub trait BlockLog: Send {
    /// Appends `block` and returns only once it is durable (fsynced). Heights must follow the last
    /// appended height by one.
    fn append(&mut self, block: &Block) -> Result<(), StorageError>;

    /// Every block with height above `after`, in order. A torn last record (from a crash during
    /// append) is ignored and truncated; any other damage is an error.
    fn read_after(&mut self, after: Height) -> Result<Vec<Block>, StorageError>;

    /// Drops blocks at or below `height` (they are covered by a checkpoint).
    fn truncate_through(&mut self, height: Height) -> Result<(), StorageError>;
}

/// Checkpoints of the replicated state.
pub trait CheckpointStore: Send {
    /// Writes a checkpoint of `state` at `state.metadata.height`, writing only pages that changed
    /// since the previous checkpoint, and returns once it is durable.
    fn write_checkpoint(&mut self, state: &ReplicatedState) -> Result<(), StorageError>;

    /// Loads and verifies the latest checkpoint, or `None` if there is none.
    fn load_latest(&mut self) -> Result<Option<ReplicatedState>, StorageError>;
}
