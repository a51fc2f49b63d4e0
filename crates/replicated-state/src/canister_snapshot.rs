//! Canister snapshots (spec: `take_canister_snapshot`, `load_canister_snapshot`): a canister's
//! module, memories, globals, certified data, timer and chunk store at one moment, kept by the
//! subnet until deleted, replaced, or the canister is deleted or runs out of cycles.
//!
//! A snapshot id is the IC's: the snapshot's local index (8 bytes, big-endian) followed by the
//! bytes of the canister it was taken from, so a `load_canister_snapshot` names where to find it.

use crate::{ExecutionState, GlobalValue, WASM_PAGE_SIZE};
use openic_types::{CanisterId, Principal};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Most snapshots one canister keeps (the IC's limit).
pub const MAX_SNAPSHOTS_PER_CANISTER: usize = 10;

/// Where a snapshot came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotSource {
    /// `take_canister_snapshot`.
    TakenFromCanister,
    /// `upload_canister_snapshot_metadata` (then filled by `upload_canister_snapshot_data`; its
    /// module is only parsed when it is loaded).
    MetadataUpload,
}

/// One snapshot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanisterSnapshot {
    /// The canister it was taken from (or uploaded to).
    pub canister_id: CanisterId,
    /// Where it came from.
    pub source: SnapshotSource,
    /// Its index among the subnet's snapshots (never reused).
    pub local_id: u64,
    /// Block time it was taken at, in ns since 1970.
    pub taken_at_timestamp: u64,
    /// The canister's version when it was taken.
    pub canister_version: u64,
    /// Module, memories and globals.
    pub execution_state: ExecutionState,
    /// The certified data.
    #[serde(with = "serde_bytes")]
    pub certified_data: Vec<u8>,
    /// The global timer (0 = unset).
    pub global_timer_nanos: u64,
    /// Whether the low-memory hook was due.
    pub low_wasm_memory_hook_pending: bool,
    /// The chunk store.
    pub wasm_chunk_store: BTreeMap<[u8; 32], Arc<serde_bytes::ByteBuf>>,
}

impl CanisterSnapshot {
    /// The id clients name it by.
    pub fn id(&self) -> Vec<u8> {
        snapshot_id(self.canister_id, self.local_id)
    }

    /// Bytes it takes (and that its canister pays storage for): module, heap, stable memory,
    /// globals, certified data and chunk store.
    pub fn size(&self) -> u64 {
        let execution = &self.execution_state;
        let globals: u64 = execution.globals.iter().map(GlobalValue::size_bytes).sum();
        let chunks: u64 = self
            .wasm_chunk_store
            .values()
            .map(|chunk| chunk.len() as u64)
            .sum();
        (execution.wasm_binary.bytes.len() as u64)
            .saturating_add(
                execution
                    .wasm_memory_size_pages
                    .saturating_mul(WASM_PAGE_SIZE),
            )
            .saturating_add(
                execution
                    .stable_memory_size_pages
                    .saturating_mul(WASM_PAGE_SIZE),
            )
            .saturating_add(globals)
            .saturating_add(self.certified_data.len() as u64)
            .saturating_add(chunks)
    }
}

/// The id of snapshot `local_id` of `canister_id`.
pub fn snapshot_id(canister_id: CanisterId, local_id: u64) -> Vec<u8> {
    let mut id = local_id.to_be_bytes().to_vec();
    id.extend_from_slice(canister_id.get().as_slice());
    id
}

/// The canister and local index a snapshot id names, if it is well formed.
pub fn parse_snapshot_id(id: &[u8]) -> Option<(CanisterId, u64)> {
    if id.len() < 9 || id.len() > 8 + 29 {
        return None;
    }
    let (local, canister) = id.split_at(8);
    let local_id = u64::from_be_bytes(local.try_into().ok()?);
    let principal = Principal::try_from_slice(canister).ok()?;
    Some((CanisterId::unchecked_from_principal(principal), local_id))
}

/// Every snapshot on the subnet, by canister, and the next local index.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanisterSnapshots {
    next_local_id: u64,
    by_canister: BTreeMap<CanisterId, BTreeMap<u64, Arc<CanisterSnapshot>>>,
}

impl CanisterSnapshots {
    /// The snapshots of `canister_id`, by local index.
    pub fn of(&self, canister_id: &CanisterId) -> impl Iterator<Item = &Arc<CanisterSnapshot>> {
        self.by_canister
            .get(canister_id)
            .into_iter()
            .flat_map(|snapshots| snapshots.values())
    }

    /// How many snapshots `canister_id` has.
    pub fn count(&self, canister_id: &CanisterId) -> usize {
        self.by_canister.get(canister_id).map_or(0, BTreeMap::len)
    }

    /// Bytes the snapshots of `canister_id` take.
    pub fn size_of(&self, canister_id: &CanisterId) -> u64 {
        self.of(canister_id).map(|snapshot| snapshot.size()).sum()
    }

    /// The snapshot an id names, if it exists.
    pub fn get(&self, id: &[u8]) -> Option<&Arc<CanisterSnapshot>> {
        let (canister_id, local_id) = parse_snapshot_id(id)?;
        self.by_canister.get(&canister_id)?.get(&local_id)
    }

    /// The snapshot an id names, to change (copied first if a query snapshot shares it).
    pub fn get_mut(&mut self, id: &[u8]) -> Option<&mut CanisterSnapshot> {
        let (canister_id, local_id) = parse_snapshot_id(id)?;
        self.by_canister
            .get_mut(&canister_id)?
            .get_mut(&local_id)
            .map(Arc::make_mut)
    }

    /// The local index the next snapshot gets.
    pub fn next_local_id(&self) -> u64 {
        self.next_local_id
    }

    /// Adds a snapshot taken with [`Self::next_local_id`] as its index.
    pub fn insert(&mut self, snapshot: CanisterSnapshot) {
        self.next_local_id = self.next_local_id.max(snapshot.local_id.saturating_add(1));
        self.by_canister
            .entry(snapshot.canister_id)
            .or_default()
            .insert(snapshot.local_id, Arc::new(snapshot));
    }

    /// Removes the snapshot an id names; returns it if it existed.
    pub fn remove(&mut self, id: &[u8]) -> Option<Arc<CanisterSnapshot>> {
        let (canister_id, local_id) = parse_snapshot_id(id)?;
        let snapshots = self.by_canister.get_mut(&canister_id)?;
        let removed = snapshots.remove(&local_id);
        if snapshots.is_empty() {
            self.by_canister.remove(&canister_id);
        }
        removed
    }

    /// Removes every snapshot of `canister_id` (deleted, or out of cycles).
    pub fn remove_all(&mut self, canister_id: &CanisterId) {
        self.by_canister.remove(canister_id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_name_the_canister_and_the_index() {
        let canister = CanisterId::from_u64(7);
        let id = snapshot_id(canister, 3);
        assert_eq!(&id[..8], &[0, 0, 0, 0, 0, 0, 0, 3]);
        assert_eq!(parse_snapshot_id(&id), Some((canister, 3)));
        assert_eq!(parse_snapshot_id(&id[..8]), None);
        assert_eq!(parse_snapshot_id(&[0; 40]), None);
    }
}
