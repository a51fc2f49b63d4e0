//! The replicated state of a subnet: everything that every replica of the subnet holds identically
//! after executing the same blocks.
//!
//! This crate holds data and the small invariants that belong with it (a [`PageMap`]'s pages are all
//! [`PAGE_SIZE`] bytes; a canister's memory never exceeds its declared size; the ingress history
//! records which entries changed since the last certification). It does no I/O and reads no clock:
//! execution mutates it, the state manager persists it, certification hashes it.
//!
//! Cloning is cheap where it matters: memory pages are shared `Arc`s, so a snapshot for queries costs
//! a map of pointers rather than a copy of every canister's memory.

pub mod canister;
pub mod canister_log;
pub mod canister_snapshot;
pub mod ingress_history;
pub mod page_map;

pub use canister::*;
pub use canister_log::{CanisterLog, LogFilter, LogRecord};
pub use canister_snapshot::{CanisterSnapshot, CanisterSnapshots, SnapshotSource};

/// Every canister's log, by canister id (as [`ReplicatedState::canister_logs`] holds them).
pub type CanisterLogs = BTreeMap<CanisterId, Arc<CanisterLog>>;
pub use ingress_history::IngressHistory;
pub use page_map::{PAGE_SIZE, Page, PageIndex, PageMap};

use openic_types::{CanisterId, Cycles, Height, SubnetId, Time};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Subnet-wide metadata that is part of the replicated state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemMetadata {
    /// This subnet's id.
    pub own_subnet_id: SubnetId,
    /// The height of the last block executed into this state (0 = genesis).
    pub height: Height,
    /// The time of the last block executed into this state.
    pub time: Time,
    /// The next canister index to try when allocating a user canister id.
    pub next_user_canister_index: u64,
    /// A seed that evolves deterministically with every block; the source of `raw_rand`.
    pub random_seed: [u8; 32],
    /// Number of ingress messages inducted so far (for metrics and the subnet metrics path).
    pub update_transactions_total: u64,
    /// Cycles consumed by the subnet so far.
    pub consumed_cycles_total: u128,
}

impl SystemMetadata {
    /// Records `cycles` as burned: taken from a canister or a payment and not credited anywhere.
    /// Every burn goes through here, so the subnet's cycles can be audited against the total.
    pub fn burn_cycles(&mut self, cycles: Cycles) {
        self.consumed_cycles_total = self.consumed_cycles_total.saturating_add(cycles.get());
    }
}

/// The replicated state of a subnet.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ReplicatedState {
    /// Subnet-wide metadata.
    pub metadata: SystemMetadata,
    /// Every canister on the subnet, by id. Deleted canisters are removed. Each canister sits
    /// behind an `Arc` so a snapshot for queries is a cheap clone; execution mutates through
    /// [`ReplicatedState::canister_mut`], which copies a canister only while a snapshot shares it.
    pub canisters: BTreeMap<CanisterId, Arc<CanisterState>>,
    /// Status of recent update calls, kept at least until each call's expiry.
    pub ingress_history: IngressHistory,
    /// Requests from canisters to the management canister waiting to be handled, and responses
    /// from the management canister waiting to be delivered, in order.
    pub subnet_queue: std::collections::VecDeque<CanisterMessage>,
    /// Canister ids ever deleted: an id is never reused.
    pub deleted_canisters: std::collections::BTreeSet<CanisterId>,
    /// `raw_rand` calls waiting for randomness that nobody knew when they were made, oldest
    /// first (execution answers them a fixed number of heights later).
    pub raw_rand_requests: std::collections::VecDeque<PendingRawRand>,
    /// Each canister's log (spec: `canister_logs`), by id; a canister that never logged has no
    /// entry. Behind `Arc`s so the snapshot for queries shares them.
    pub canister_logs: CanisterLogs,
    /// Every canister snapshot (spec: `snapshots`), behind `Arc`s so snapshots for queries share
    /// them.
    pub snapshots: Arc<CanisterSnapshots>,
    /// Where the next round starts visiting canisters: the canister whose turn the last round's
    /// limit cut off (round-robin scheduling; `None` = from the lowest id).
    pub round_robin_cursor: Option<CanisterId>,
    /// Executions that run in slices across blocks and have not finished, by canister (at most
    /// one per canister; see Note [sliced executions] in the embedder). While a canister has one,
    /// nothing else runs on it and no management call touches it.
    pub paused_executions: BTreeMap<CanisterId, PausedExecution>,
}

/// An execution running in slices across blocks: what a replica needs to run it again from its
/// start and reach the same point (after a restart from a checkpoint taken while it ran).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PausedExecution {
    /// The height of the block it started in.
    pub started_at: Height,
    /// Slices granted so far (the first in the block it started in).
    pub slices_granted: u64,
    /// The height of the block that granted the last slice (the longest waiting go first).
    pub last_granted_at: Height,
    /// The execution's input and how to apply its result, encoded by the execution crate.
    #[serde(with = "serde_bytes")]
    pub input: Vec<u8>,
}

/// A `raw_rand` call waiting for its randomness.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingRawRand {
    /// The height whose execution made the call.
    pub requested_at: Height,
    /// The call, answered to its sender with its payment refunded.
    pub request: Request,
}

impl ReplicatedState {
    /// The genesis state of a subnet: no canisters, height 0, time 0.
    pub fn new(
        own_subnet_id: SubnetId,
        first_user_canister_index: u64,
        genesis_seed: [u8; 32],
    ) -> Self {
        ReplicatedState {
            metadata: SystemMetadata {
                own_subnet_id,
                height: Height(0),
                time: Time(0),
                next_user_canister_index: first_user_canister_index,
                random_seed: genesis_seed,
                update_transactions_total: 0,
                consumed_cycles_total: 0,
            },
            canisters: BTreeMap::new(),
            ingress_history: IngressHistory::default(),
            subnet_queue: Default::default(),
            deleted_canisters: Default::default(),
            raw_rand_requests: Default::default(),
            canister_logs: BTreeMap::new(),
            snapshots: Arc::default(),
            round_robin_cursor: None,
            paused_executions: BTreeMap::new(),
        }
    }

    /// The canister with this id, if it exists.
    pub fn canister(&self, id: &CanisterId) -> Option<&CanisterState> {
        self.canisters.get(id).map(|c| &**c)
    }

    /// The canister with this id, mutably, if it exists.
    pub fn canister_mut(&mut self, id: &CanisterId) -> Option<&mut CanisterState> {
        self.canisters.get_mut(id).map(Arc::make_mut)
    }

    /// Adds (or replaces) a canister.
    pub fn put_canister(&mut self, canister: CanisterState) {
        self.canisters
            .insert(canister.canister_id(), Arc::new(canister));
    }

    /// Takes up to `cycles` from canister `id`'s balance (what it has, if less) and burns them;
    /// returns what was taken.
    pub fn burn_from_canister(&mut self, id: &CanisterId, cycles: Cycles) -> Cycles {
        let Some(canister) = self.canister_mut(id) else {
            return Cycles::ZERO;
        };
        let taken = cycles.min(canister.system_state.cycles_balance);
        canister.system_state.cycles_balance =
            canister.system_state.cycles_balance.saturating_sub(taken);
        self.metadata.burn_cycles(taken);
        taken
    }

    /// Takes up to `cycles` of storage fees from canister `id`, from its reserved cycles first
    /// (which were set aside for exactly this) and then its balance, and burns them; returns what
    /// was taken.
    pub fn burn_storage_from_canister(&mut self, id: &CanisterId, cycles: Cycles) -> Cycles {
        let Some(canister) = self.canister_mut(id) else {
            return Cycles::ZERO;
        };
        let from_reserved = cycles.min(canister.system_state.reserved_balance);
        canister.system_state.reserved_balance = canister
            .system_state
            .reserved_balance
            .saturating_sub(from_reserved);
        self.metadata.burn_cycles(from_reserved);
        from_reserved
            .saturating_add(self.burn_from_canister(id, cycles.saturating_sub(from_reserved)))
    }

    /// Appends records to a canister's log, stamped with this state's block time and kept within
    /// its `log_memory_limit`. Does nothing for a canister that does not exist.
    pub fn append_log(&mut self, id: CanisterId, lines: impl IntoIterator<Item = Vec<u8>>) {
        let Some(canister) = self.canisters.get(&id) else {
            return;
        };
        let limit = canister.system_state.settings.log_memory_limit;
        let mut lines = lines.into_iter().peekable();
        if lines.peek().is_none() {
            return;
        }
        let time = self.metadata.time;
        let log = Arc::make_mut(self.canister_logs.entry(id).or_default());
        for line in lines {
            log.append(limit, time, line);
        }
    }

    /// Purges a canister's log records (reinstall, uninstall); its indexes keep counting.
    pub fn clear_log(&mut self, id: &CanisterId) {
        if let Some(log) = self.canister_logs.get_mut(id) {
            Arc::make_mut(log).clear();
        }
    }

    /// Fits a canister's log to its current `log_memory_limit` (after the setting changed).
    pub fn resize_log(&mut self, id: &CanisterId) {
        let Some(canister) = self.canisters.get(id) else {
            return;
        };
        let limit = canister.system_state.settings.log_memory_limit;
        if let Some(log) = self.canister_logs.get_mut(id) {
            Arc::make_mut(log).resize(limit);
        }
    }

    /// Bytes a canister's log holds.
    pub fn log_bytes(&self, id: &CanisterId) -> u64 {
        self.canister_logs.get(id).map_or(0, |log| log.bytes_used())
    }

    /// A snapshot of every canister, sharing their state with this one (for queries).
    pub fn canisters_snapshot(&self) -> BTreeMap<CanisterId, Arc<CanisterState>> {
        self.canisters.clone()
    }
}
