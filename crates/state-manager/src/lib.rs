//! Persistence: the block log, incremental verified checkpoints, and node key storage.
//!
//! Everything a node keeps on disk lives in one state directory:
//! - [`FileBlockLog`] (`blocks/`): every finalized block, appended and fsynced before it is
//!   executed, so no update whose certificate said `replied` is lost, even after `kill -9`.
//! - [`FileCheckpointStore`] (`checkpoints/`): the replicated state every so often, writing only
//!   memory pages changed since the previous checkpoint, verified by SHA-256 on load. Restart =
//!   load the latest checkpoint + replay the blocks after it.
//! - [`load_or_create_keys`], [`load_or_create_genesis_seed`] (`keys/`, `genesis_seed`): secrets
//!   created once and kept, mode 0600.
//! - [`StateDirLock`] (`LOCK`): one process per state directory.
//!
//! It also holds the data side of state sync ([`state_sync`]): a [`SyncSnapshot`] serves the state
//! at a height in chunks listed by a [`SyncManifest`] whose hash the subnet certifies, and a
//! [`SyncAssembler`] verifies chunks from untrusted peers and rebuilds the state from them.
//!
//! Invariants: a write returns only once it is durable (file and directory fsynced); a crash at
//! any point leaves either the old or the new version of every file, except the block log's last
//! record, which is recognised as torn and dropped (it was never acknowledged); anything else that
//! fails verification is reported as [`openic_interfaces::StorageError::Corrupt`], never silently
//! skipped. The node must truncate the block log only through
//! [`FileCheckpointStore::oldest_checkpoint_height`], so that falling back from a corrupt latest
//! checkpoint to the previous one still finds every block it needs.

pub mod block_log;
pub mod checkpoint;
mod fs_util;
pub mod keys;
pub mod lock;
pub mod state_sync;

pub use block_log::{BlockLogConfig, FileBlockLog};
pub use checkpoint::{CheckpointConfig, CheckpointWriteStats, FileCheckpointStore};
pub use keys::{
    NodeKeys, load_or_create_genesis_seed, load_or_create_identity, load_or_create_keys,
    load_secret, store_secret,
};
pub use lock::{StateDirLock, StateDirLockError};
pub use state_sync::{
    ChunkContent, STATE_SYNC_CHUNK_BYTES, STATE_SYNC_CHUNK_WIRE_BYTES_MAX, STATE_SYNC_CHUNKS_MAX,
    STATE_SYNC_FORMAT_VERSION, STATE_SYNC_MANIFEST_BYTES_MAX, STATE_SYNC_PAGE_RECORD_BYTES,
    STATE_SYNC_PAGES_PER_CHUNK, StateSyncError, SyncAssembler, SyncChunk, SyncManifest,
    SyncSnapshot,
};

#[cfg(test)]
mod tests {
    use super::*;
    use openic_interfaces::{BlockLog, CheckpointStore};
    use openic_replicated_state::{
        CanisterState, ExecutionState, ModuleInfo, PAGE_SIZE, PageMap, ReplicatedState,
        SystemState, WasmBinary,
    };
    use openic_types::{Block, CanisterId, Cycles, Height, Principal, SubnetId, Time};
    use std::io::Write;
    use std::sync::Arc;

    /// A stand-in for execution: deterministic in the state and the block.
    fn execute(state: &mut ReplicatedState, block: &Block) {
        state.metadata.height = block.height;
        state.metadata.time = block.time;
        let canister = state.canister_mut(&CanisterId::from_u64(1)).unwrap();
        let execution = canister.execution_state.as_mut().unwrap();
        let offset = (block.height.0 % 7) * PAGE_SIZE as u64 + 3;
        execution
            .wasm_memory
            .write(offset, &block.height.0.to_le_bytes());
        canister.system_state.cycles_balance = Cycles(u128::from(block.height.0) << 70);
    }

    fn genesis(seed: [u8; 32]) -> ReplicatedState {
        let mut state = ReplicatedState::new(SubnetId(Principal::from_slice(&[1; 29])), 5, seed);
        let bytes = b"\0asm\x01\0\0\0".to_vec();
        let module_hash = <sha2::Sha256 as sha2::Digest>::digest(&bytes).into();
        state.put_canister(CanisterState {
            system_state: SystemState::new(
                CanisterId::from_u64(1),
                Default::default(),
                Cycles(1),
                Time(0),
            ),
            execution_state: Some(ExecutionState {
                wasm_binary: Arc::new(WasmBinary { bytes, module_hash }),
                module_info: Arc::new(ModuleInfo::default()),
                wasm_memory: PageMap::new(),
                wasm_memory_size_pages: 1,
                stable_memory: PageMap::new(),
                stable_memory_size_pages: 0,
                globals: Vec::new(),
            }),
        });
        state
    }

    /// Restart = latest checkpoint + the blocks after it, also after a crash mid-append and with
    /// the log truncated only through the oldest kept checkpoint.
    #[test]
    fn restart_replays_blocks_after_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let expected = {
            let _lock = StateDirLock::acquire(dir.path()).unwrap();
            let seed = load_or_create_genesis_seed(dir.path()).unwrap();
            let mut log = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap();
            let mut store =
                FileCheckpointStore::open(dir.path(), CheckpointConfig::default()).unwrap();
            let mut state = genesis(seed);
            for height in 1..=23u64 {
                let block = Block {
                    height: Height(height),
                    time: Time(height * 10),
                    ingress: Vec::new(),
                    randomness: [0; 32],
                };
                log.append(&block).unwrap();
                execute(&mut state, &block);
                if height % 5 == 0 {
                    store.write_checkpoint(&state).unwrap();
                    let oldest = store.oldest_checkpoint_height().unwrap().unwrap();
                    log.truncate_through(oldest).unwrap();
                }
            }
            state
        };
        // The crash hit while block 24 was being appended.
        let mut segments: Vec<_> = std::fs::read_dir(dir.path().join("blocks"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        segments.sort();
        let mut last = std::fs::OpenOptions::new()
            .append(true)
            .open(segments.last().unwrap())
            .unwrap();
        last.write_all(&[40, 0, 0, 0, 1, 2]).unwrap();
        drop(last);

        let _lock = StateDirLock::acquire(dir.path()).unwrap();
        let mut store = FileCheckpointStore::open(dir.path(), CheckpointConfig::default()).unwrap();
        let mut log = FileBlockLog::open(dir.path(), BlockLogConfig::default()).unwrap();
        let mut state = store.load_latest().unwrap().unwrap();
        assert_eq!(state.metadata.height, Height(20));
        let blocks = log.read_after(state.metadata.height).unwrap();
        assert_eq!(blocks.len(), 3);
        for block in &blocks {
            execute(&mut state, block);
        }
        assert_eq!(
            postcard::to_allocvec(&state).unwrap(),
            postcard::to_allocvec(&expected).unwrap()
        );
        // The previous checkpoint can still be replayed to the same state.
        let older = store.checkpoint_heights().unwrap()[0];
        assert_eq!(older, Height(15));
        assert_eq!(log.read_after(older).unwrap().len(), 8);
        log.append(&Block {
            height: Height(24),
            time: Time(240),
            ingress: Vec::new(),
            randomness: [0; 32],
        })
        .unwrap();
    }
}
