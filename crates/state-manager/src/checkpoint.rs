//! [`FileCheckpointStore`]: incremental, verified checkpoints of the replicated state.
//!
//! # Layout
//!
//! ```text
//! <state_dir>/checkpoints/
//!   <height, 20 digits>/          one directory per checkpoint, complete once it has this name
//!     MANIFEST                    magic OICMAN01 · SHA-256(body) · body (serde_cbor Manifest)
//!     state.bin                   the state without memory pages and wasm bytes (postcard)
//!     wasm/<module hash>.wasm     each distinct module once
//!     pages/<canister>.<wasm|stable>.<height>.pages   page files (base and overlays)
//!   tmp/                          a checkpoint being written; removed on open
//!   corrupt/<height>/             checkpoints that failed verification, kept for inspection
//! ```
//!
//! A page file is `OICPAG01 · count u64 LE · count × (page index u64 LE · 4096 bytes)`, indexes
//! strictly increasing. A memory is the overlay of its chain of page files, base first; an all-zero
//! page in an overlay removes the page. Files of the previous checkpoint that are still part of a
//! chain are hard-linked, not copied, so every checkpoint directory is self-contained and the oldest
//! can be deleted whole. When a chain would grow beyond [`CheckpointConfig::max_overlay_chain_length`]
//! the memory is written again as a single base file.
//!
//! # Why the state file is postcard
//!
//! The state holds `u128`s (cycles, v128 globals) that serde_cbor refuses above `u64::MAX`;
//! postcard encodes them. The manifest and the block log stay CBOR.
//!
//! # Integrity
//!
//! The manifest records the size and SHA-256 of every file, the digest of every memory's pages,
//! and a state digest over all of them. Loading recomputes all of these and refuses a checkpoint
//! that does not match with [`StorageError::Corrupt`]; `load_latest` then falls back to the
//! previous checkpoint. Writing goes to `tmp/`, fsyncs every file and directory, and renames the
//! directory into place, so a crash leaves either the complete checkpoint or none.

use crate::fs_util::{
    corrupt, create_dir_durably, io_error, remove_dir_if_exists, sync_dir, write_new_file,
};
use crate::state_sync::{StateSyncError, SyncSnapshot};
use openic_interfaces::{CheckpointStore, StorageError};
use openic_replicated_state::{
    CanisterMessage, CanisterState, IngressHistory, PAGE_SIZE, Page, PageIndex, PageMap,
    PendingRawRand, ReplicatedState, SystemMetadata, WasmBinary,
};
use openic_types::{CanisterId, Height};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// First bytes of a `MANIFEST` file.
pub const MANIFEST_MAGIC: [u8; 8] = *b"OICMAN01";

/// First bytes of a page file.
pub const PAGE_FILE_MAGIC: [u8; 8] = *b"OICPAG01";

/// Version of the manifest and state file formats written.
///
/// Version 2 added `raw_rand_requests` at the end of the state, version 3 `canister_logs` after
/// it, version 4 `snapshots` and `round_robin_cursor`, version 5 `paused_executions`; checkpoints
/// of versions 1 to 4 still load (see [`decode_state`]).
const FORMAT_VERSION: u32 = 5;

/// The oldest format version that still loads.
const FORMAT_VERSION_MIN: u32 = 1;

const MANIFEST_FILE: &str = "MANIFEST";
const STATE_FILE: &str = "state.bin";
const PAGES_DIR: &str = "pages";
const WASM_DIR: &str = "wasm";
const TMP_DIR: &str = "tmp";
const CORRUPT_DIR: &str = "corrupt";

/// Bytes of a page file header: magic and page count.
const PAGE_FILE_HEADER_BYTES: u64 = 16;

/// Bytes of one page record: index and contents.
const PAGE_RECORD_BYTES: u64 = 8 + PAGE_SIZE as u64;

/// Largest manifest accepted when loading (it lists files, not data).
const MANIFEST_MAX_BYTES: u64 = 256 * 1024 * 1024;

const ZERO_PAGE: Page = [0u8; PAGE_SIZE];

/// Limits and retention of the checkpoint store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckpointConfig {
    /// A memory's chain of page files (base plus overlays) never exceeds this length: the write
    /// that would exceed it writes the memory as a new base instead, so loads stay fast.
    pub max_overlay_chain_length: usize,
    /// Checkpoints kept on disk (at least 2, so the previous one can replace a corrupt latest).
    pub checkpoints_to_keep: usize,
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            max_overlay_chain_length: 8,
            checkpoints_to_keep: 2,
        }
    }
}

/// What the last `write_checkpoint` did (for metrics and tests).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckpointWriteStats {
    /// The checkpoint's height.
    pub height: Height,
    /// Page files written (bases and overlays).
    pub page_files_written: u64,
    /// Page files hard-linked from the previous checkpoint.
    pub page_files_linked: u64,
    /// Pages written (including zero pages that record removals).
    pub pages_written: u64,
    /// Wasm modules written (others were linked).
    pub wasm_modules_written: u64,
    /// Bytes written in all files.
    pub bytes_written: u64,
}

/// Which memory of a canister a page chain belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub(crate) enum MemoryKind {
    Wasm,
    Stable,
}

impl MemoryKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            MemoryKind::Wasm => "wasm",
            MemoryKind::Stable => "stable",
        }
    }
}

pub(crate) type MemoryKey = (CanisterId, MemoryKind);
pub(crate) type Sha256Hash = [u8; 32];

/// A file of a checkpoint, as recorded in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct FileEntry {
    /// Path relative to the checkpoint directory.
    name: String,
    size_bytes: u64,
    sha256: Sha256Hash,
}

/// One memory in the manifest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct MemoryEntry {
    canister_id: CanisterId,
    kind: MemoryKind,
    /// Page files, base first.
    chain: Vec<FileEntry>,
    /// Non-zero pages in the memory.
    num_pages: u64,
    /// [`pages_digest`] of the memory.
    pages_digest: Sha256Hash,
}

/// The manifest of a checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Manifest {
    format_version: u32,
    height: Height,
    state_file: FileEntry,
    /// One per distinct module, sorted by module hash.
    wasm_modules: Vec<FileEntry>,
    /// One per memory of every canister with a module, sorted by canister and kind.
    memories: Vec<MemoryEntry>,
    /// [`state_digest`] over everything above.
    state_digest: Sha256Hash,
}

/// What the store remembers about a memory as last written or loaded.
#[derive(Clone, Debug)]
struct MemoryCache {
    /// The pages as written: shares its `Arc`s with the state, so unchanged pages are recognised
    /// by pointer.
    pages: PageMap,
    /// SHA-256 of every non-zero page.
    page_hashes: BTreeMap<PageIndex, Sha256Hash>,
    chain: Vec<FileEntry>,
}

/// The newest checkpoint on disk as this store knows it.
#[derive(Clone, Debug)]
struct LastCheckpoint {
    height: Height,
    dir: PathBuf,
    memories: BTreeMap<MemoryKey, MemoryCache>,
    wasm_modules: BTreeMap<Sha256Hash, FileEntry>,
}

/// Checkpoints in `<state_dir>/checkpoints/`. See the module documentation for the format.
#[derive(Debug)]
pub struct FileCheckpointStore {
    root: PathBuf,
    config: CheckpointConfig,
    last: Option<LastCheckpoint>,
    last_write_stats: Option<CheckpointWriteStats>,
}

/// The plan for one memory: its pages, their hashes, and which changed since the last checkpoint.
struct MemoryPlan<'a> {
    key: MemoryKey,
    pages: &'a PageMap,
    page_hashes: BTreeMap<PageIndex, Sha256Hash>,
    /// Indexes whose contents differ from the previous checkpoint (removed pages included), or
    /// `None` if there is no previous version of this memory.
    changed: Option<Vec<PageIndex>>,
}

impl FileCheckpointStore {
    /// Opens (creating if needed) `<state_dir>/checkpoints/` and removes a half-written checkpoint
    /// left by a crash.
    pub fn open(
        state_dir: &Path,
        config: CheckpointConfig,
    ) -> Result<FileCheckpointStore, StorageError> {
        let root = state_dir.join("checkpoints");
        create_dir_durably(&root)?;
        remove_dir_if_exists(&root.join(TMP_DIR))?;
        Ok(FileCheckpointStore {
            root,
            config: CheckpointConfig {
                checkpoints_to_keep: config.checkpoints_to_keep.max(2),
                max_overlay_chain_length: config.max_overlay_chain_length.max(1),
            },
            last: None,
            last_write_stats: None,
        })
    }

    /// Heights of the checkpoints on disk, ascending.
    pub fn checkpoint_heights(&self) -> Result<Vec<Height>, StorageError> {
        let mut heights = Vec::new();
        for entry in std::fs::read_dir(&self.root).map_err(io_error(&self.root))? {
            let entry = entry.map_err(io_error(&self.root))?;
            if let Some(height) = entry.file_name().to_str().and_then(parse_checkpoint_name) {
                heights.push(height);
            }
        }
        heights.sort();
        Ok(heights)
    }

    /// The oldest checkpoint kept on disk. The block log must keep every block above it (not only
    /// above the latest checkpoint): if the latest turns out corrupt, `load_latest` falls back to
    /// an older one and the node replays from there.
    pub fn oldest_checkpoint_height(&self) -> Result<Option<Height>, StorageError> {
        Ok(self.checkpoint_heights()?.first().copied())
    }

    /// The height of the checkpoint this store last wrote or loaded, if any.
    pub fn last_checkpoint_height(&self) -> Option<Height> {
        self.last.as_ref().map(|l| l.height)
    }

    /// What the last successful `write_checkpoint` did.
    pub fn last_write_stats(&self) -> Option<&CheckpointWriteStats> {
        self.last_write_stats.as_ref()
    }

    /// The directory of the checkpoint at `height`.
    pub fn checkpoint_dir(&self, height: Height) -> PathBuf {
        self.root.join(checkpoint_name(height))
    }

    /// A [`SyncSnapshot`] of `state` to serve state sync from, the same as
    /// [`SyncSnapshot::new`] would build, but reusing the page hashes this store computed when it
    /// last wrote or loaded a checkpoint: right after `write_checkpoint(state)` or a load of
    /// exactly this state no page is hashed again (a page counts as known when the store's copy
    /// of the memory shares it by `Arc`). Pages the store does not know are hashed; wasm modules
    /// are always read whole to compute their chunk digests.
    ///
    /// # Errors
    ///
    /// As [`SyncSnapshot::new`]: the state cannot be encoded, a module's bytes do not match its
    /// hash, or the state is too large for one manifest.
    pub fn sync_snapshot(&self, state: &ReplicatedState) -> Result<SyncSnapshot, StateSyncError> {
        let previous = self.last.as_ref();
        crate::state_sync::build_snapshot(state, |key, pages| {
            let cached = previous.and_then(|p| p.memories.get(&key));
            Self::plan_memory(key, pages, cached).page_hashes
        })
    }

    /// Hashes the pages of `pages` and finds those that differ from `previous`.
    fn plan_memory<'a>(
        key: MemoryKey,
        pages: &'a PageMap,
        previous: Option<&MemoryCache>,
    ) -> MemoryPlan<'a> {
        let mut page_hashes = BTreeMap::new();
        let mut changed = Vec::new();
        for (index, page) in pages.pages() {
            if is_zero(page) {
                continue;
            }
            let known = previous.and_then(|p| {
                p.page_hashes
                    .get(&index)
                    .filter(|_| p.pages.shares_page_with(pages, index))
            });
            let hash = match known {
                Some(hash) => *hash,
                None => {
                    let hash = sha256(page);
                    if previous.and_then(|p| p.page_hashes.get(&index)) != Some(&hash) {
                        changed.push(index);
                    }
                    hash
                }
            };
            page_hashes.insert(index, hash);
        }
        if let Some(previous) = previous {
            changed.extend(
                previous
                    .page_hashes
                    .keys()
                    .filter(|index| !page_hashes.contains_key(index)),
            );
            changed.sort_unstable();
        }
        MemoryPlan {
            key,
            pages,
            page_hashes,
            changed: previous.map(|_| changed),
        }
    }

    /// Writes (or links) the page files of one memory into the checkpoint being built in `tmp`.
    fn write_memory(
        &self,
        tmp: &Path,
        height: Height,
        plan: &MemoryPlan<'_>,
        stats: &mut CheckpointWriteStats,
    ) -> Result<Vec<FileEntry>, StorageError> {
        if plan.page_hashes.is_empty() {
            return Ok(Vec::new());
        }
        let previous = self
            .last
            .as_ref()
            .and_then(|last| last.memories.get(&plan.key).map(|m| (last, m)));
        let name = page_file_name(&plan.key, height);
        if let (Some((last, cache)), Some(changed)) = (previous, &plan.changed) {
            let fits = cache.chain.len() + usize::from(!changed.is_empty())
                <= self.config.max_overlay_chain_length;
            if !cache.chain.is_empty()
                && fits
                && let Some(mut chain) = link_files(&last.dir, tmp, &cache.chain)
            {
                stats.page_files_linked += chain.len() as u64;
                if !changed.is_empty() {
                    let pages = changed
                        .iter()
                        .map(|index| (*index, plan.pages.page(*index).unwrap_or(&ZERO_PAGE)));
                    let entry = write_page_file(tmp, &name, changed.len() as u64, pages)?;
                    stats.page_files_written += 1;
                    stats.pages_written += changed.len() as u64;
                    stats.bytes_written += entry.size_bytes;
                    chain.push(entry);
                }
                return Ok(chain);
            }
        }
        // No usable previous version, or the chain is too long: write the memory as a new base.
        let pages = plan
            .page_hashes
            .keys()
            .map(|index| (*index, plan.pages.page(*index).unwrap_or(&ZERO_PAGE)));
        let count = plan.page_hashes.len() as u64;
        let entry = write_page_file(tmp, &name, count, pages)?;
        stats.page_files_written += 1;
        stats.pages_written += count;
        stats.bytes_written += entry.size_bytes;
        Ok(vec![entry])
    }

    /// Loads and verifies the checkpoint at `height`.
    fn load_checkpoint(
        &self,
        height: Height,
    ) -> Result<(ReplicatedState, LastCheckpoint), StorageError> {
        let dir = self.checkpoint_dir(height);
        let manifest = read_manifest(&dir)?;
        if !(FORMAT_VERSION_MIN..=FORMAT_VERSION).contains(&manifest.format_version) {
            return Err(corrupt(
                &dir,
                format!(
                    "checkpoint format version {} is not a supported version \
                     ({FORMAT_VERSION_MIN} to {FORMAT_VERSION})",
                    manifest.format_version
                ),
            ));
        }
        if manifest.height != height {
            return Err(corrupt(
                &dir,
                format!("manifest is for height {}, not {height}", manifest.height),
            ));
        }

        let state_bytes = read_verified(&dir, &manifest.state_file)?;
        let mut state = decode_state(manifest.format_version, &state_bytes).map_err(|e| {
            corrupt(
                &dir.join(&manifest.state_file.name),
                format!("state file does not decode: {e}"),
            )
        })?;
        drop(state_bytes);
        if state.metadata.height != height {
            return Err(corrupt(
                &dir,
                format!(
                    "state file is at height {}, not {height}",
                    state.metadata.height
                ),
            ));
        }

        let mut modules: BTreeMap<Sha256Hash, Arc<WasmBinary>> = BTreeMap::new();
        let mut wasm_entries = BTreeMap::new();
        for entry in &manifest.wasm_modules {
            let module_hash = parse_wasm_file_name(&entry.name)
                .ok_or_else(|| corrupt(&dir, format!("bad wasm file name {:?}", entry.name)))?;
            let bytes = read_verified(&dir, entry)?;
            if entry.sha256 != module_hash {
                return Err(corrupt(
                    &dir.join(&entry.name),
                    "wasm module's SHA-256 does not match its name",
                ));
            }
            modules.insert(module_hash, Arc::new(WasmBinary { bytes, module_hash }));
            wasm_entries.insert(module_hash, entry.clone());
        }

        let mut memories: BTreeMap<MemoryKey, MemoryCache> = BTreeMap::new();
        for entry in &manifest.memories {
            let key = (entry.canister_id, entry.kind);
            let mut pages = PageMap::new();
            for file in &entry.chain {
                read_page_file(&dir, file, &mut pages)?;
            }
            let page_hashes: BTreeMap<PageIndex, Sha256Hash> = pages
                .pages()
                .filter(|(_, page)| !is_zero(page))
                .map(|(index, page)| (index, sha256(page)))
                .collect();
            if page_hashes.len() as u64 != entry.num_pages
                || pages_digest(&page_hashes) != entry.pages_digest
            {
                return Err(corrupt(
                    &dir,
                    format!(
                        "{} memory of canister {} does not match its recorded digest",
                        entry.kind.as_str(),
                        entry.canister_id
                    ),
                ));
            }
            let cache = MemoryCache {
                pages,
                page_hashes,
                chain: entry.chain.clone(),
            };
            if memories.insert(key, cache).is_some() {
                return Err(corrupt(
                    &dir,
                    format!("memory of canister {} listed twice", entry.canister_id),
                ));
            }
        }

        let mut used = BTreeSet::new();
        for (canister_id, canister) in state.canisters.iter_mut() {
            let canister = Arc::make_mut(canister);
            let Some(execution) = canister.execution_state.as_mut() else {
                continue;
            };
            let module_hash = execution.wasm_binary.module_hash;
            execution.wasm_binary = modules.get(&module_hash).cloned().ok_or_else(|| {
                corrupt(
                    &dir,
                    format!(
                        "canister {canister_id}'s module {} is not in the checkpoint",
                        hex::encode(module_hash)
                    ),
                )
            })?;
            for kind in [MemoryKind::Wasm, MemoryKind::Stable] {
                let memory = memories.get(&(*canister_id, kind)).ok_or_else(|| {
                    corrupt(
                        &dir,
                        format!(
                            "canister {canister_id}'s {} memory is not in the checkpoint",
                            kind.as_str()
                        ),
                    )
                })?;
                let target = match kind {
                    MemoryKind::Wasm => &mut execution.wasm_memory,
                    MemoryKind::Stable => &mut execution.stable_memory,
                };
                *target = memory.pages.clone();
                used.insert((*canister_id, kind));
            }
        }
        if used.len() != memories.len() {
            return Err(corrupt(
                &dir,
                "manifest lists memories of canisters that have no module in the state",
            ));
        }

        let digest = state_digest(
            height,
            &manifest.state_file.sha256,
            manifest.memories.iter(),
            manifest.wasm_modules.iter().map(|m| &m.sha256),
        );
        if digest != manifest.state_digest {
            return Err(corrupt(&dir, "state digest does not match the manifest"));
        }
        let last = LastCheckpoint {
            height,
            dir,
            memories,
            wasm_modules: wasm_entries,
        };
        Ok((state, last))
    }

    /// Deletes every checkpoint but the one at `height` (after installing a state fetched by
    /// state sync: older checkpoints hold a history the node no longer continues).
    pub fn retain_only(&mut self, height: Height) -> Result<(), StorageError> {
        let mut deleted = false;
        for other in self.checkpoint_heights()? {
            if other != height {
                remove_dir_if_exists(&self.checkpoint_dir(other))?;
                deleted = true;
            }
        }
        if deleted {
            sync_dir(&self.root)?;
        }
        Ok(())
    }

    /// Moves a checkpoint that failed verification to `corrupt/`, out of the way of new ones.
    fn move_aside(&self, height: Height) -> Result<(), StorageError> {
        let corrupt_root = self.root.join(CORRUPT_DIR);
        create_dir_durably(&corrupt_root)?;
        let target = corrupt_root.join(checkpoint_name(height));
        remove_dir_if_exists(&target)?;
        let source = self.checkpoint_dir(height);
        std::fs::rename(&source, &target).map_err(io_error(&source))?;
        sync_dir(&corrupt_root)?;
        sync_dir(&self.root)
    }

    /// Deletes checkpoints beyond the newest `checkpoints_to_keep`, never `just_written`.
    fn delete_old_checkpoints(&self, just_written: Height) -> Result<(), StorageError> {
        let heights = self.checkpoint_heights()?;
        let excess = heights
            .len()
            .saturating_sub(self.config.checkpoints_to_keep);
        let mut deleted = false;
        for height in heights.into_iter().take(excess) {
            if height == just_written {
                continue;
            }
            remove_dir_if_exists(&self.checkpoint_dir(height))?;
            deleted = true;
        }
        if deleted {
            sync_dir(&self.root)?;
        }
        Ok(())
    }
}

impl CheckpointStore for FileCheckpointStore {
    fn write_checkpoint(&mut self, state: &ReplicatedState) -> Result<(), StorageError> {
        let height = state.metadata.height;
        let final_dir = self.checkpoint_dir(height);
        let mut stats = CheckpointWriteStats {
            height,
            ..CheckpointWriteStats::default()
        };

        let state_bytes = postcard::to_allocvec(&state_without_pages(state)).map_err(|e| {
            crate::fs_util::invalid_input(
                &final_dir,
                format!("cannot encode the state at height {height}: {e}"),
            )
        })?;
        verify_state_encoding(&state_bytes, &final_dir)?;
        let state_sha = sha256(&state_bytes);

        let previous = self.last.as_ref();
        let mut plans = Vec::new();
        let mut modules: BTreeMap<Sha256Hash, &Arc<WasmBinary>> = BTreeMap::new();
        for (canister_id, canister) in &state.canisters {
            if let Some(execution) = &canister.execution_state {
                modules
                    .entry(execution.wasm_binary.module_hash)
                    .or_insert(&execution.wasm_binary);
                for (kind, pages) in [
                    (MemoryKind::Wasm, &execution.wasm_memory),
                    (MemoryKind::Stable, &execution.stable_memory),
                ] {
                    let key = (*canister_id, kind);
                    let cached = previous.and_then(|p| p.memories.get(&key));
                    plans.push(Self::plan_memory(key, pages, cached));
                }
            }
        }

        if final_dir.exists() {
            // Same height again (e.g. a checkpoint at shutdown right after one at a checkpoint
            // height): fine if it is the same state, a divergence otherwise.
            let existing = read_manifest(&final_dir)?;
            let memories: Vec<MemoryEntry> = plans
                .iter()
                .map(|plan| MemoryEntry {
                    canister_id: plan.key.0,
                    kind: plan.key.1,
                    chain: Vec::new(),
                    num_pages: plan.page_hashes.len() as u64,
                    pages_digest: pages_digest(&plan.page_hashes),
                })
                .collect();
            let digest = state_digest(height, &state_sha, memories.iter(), modules.keys());
            if digest == existing.state_digest {
                return Ok(());
            }
            return Err(corrupt(
                &final_dir,
                format!(
                    "a checkpoint at height {height} with different contents already exists; the \
                     state diverged from the one checkpointed earlier at this height"
                ),
            ));
        }

        let tmp_root = self.root.join(TMP_DIR);
        remove_dir_if_exists(&tmp_root)?;
        let tmp = tmp_root.join(checkpoint_name(height));
        for dir in [&tmp, &tmp.join(PAGES_DIR), &tmp.join(WASM_DIR)] {
            std::fs::create_dir_all(dir).map_err(io_error(dir))?;
        }

        write_new_file(&tmp.join(STATE_FILE), &state_bytes, None)?;
        stats.bytes_written += state_bytes.len() as u64;
        let state_file = FileEntry {
            name: STATE_FILE.to_string(),
            size_bytes: state_bytes.len() as u64,
            sha256: state_sha,
        };
        drop(state_bytes);

        let mut wasm_modules = BTreeMap::new();
        for (module_hash, binary) in modules {
            let cached = self
                .last
                .as_ref()
                .and_then(|l| l.wasm_modules.get(&module_hash).map(|e| (l, e)));
            if let Some((last, entry)) = cached
                && link_files(&last.dir, &tmp, std::slice::from_ref(entry)).is_some()
            {
                wasm_modules.insert(module_hash, entry.clone());
                continue;
            }
            if sha256(&binary.bytes) != module_hash {
                return Err(corrupt(
                    &final_dir,
                    format!(
                        "a wasm module's bytes do not hash to its recorded module hash {}; refusing \
                         to checkpoint a state that could not be loaded again",
                        hex::encode(module_hash)
                    ),
                ));
            }
            let name = wasm_file_name(&module_hash);
            write_new_file(&tmp.join(&name), &binary.bytes, None)?;
            stats.wasm_modules_written += 1;
            stats.bytes_written += binary.bytes.len() as u64;
            wasm_modules.insert(
                module_hash,
                FileEntry {
                    name,
                    size_bytes: binary.bytes.len() as u64,
                    sha256: module_hash,
                },
            );
        }

        let mut memories = Vec::with_capacity(plans.len());
        let mut caches = BTreeMap::new();
        for plan in &plans {
            let chain = self.write_memory(&tmp, height, plan, &mut stats)?;
            memories.push(MemoryEntry {
                canister_id: plan.key.0,
                kind: plan.key.1,
                chain: chain.clone(),
                num_pages: plan.page_hashes.len() as u64,
                pages_digest: pages_digest(&plan.page_hashes),
            });
            caches.insert(
                plan.key,
                MemoryCache {
                    pages: plan.pages.clone(),
                    page_hashes: plan.page_hashes.clone(),
                    chain,
                },
            );
        }

        let wasm_list: Vec<FileEntry> = wasm_modules.values().cloned().collect();
        let manifest = Manifest {
            format_version: FORMAT_VERSION,
            height,
            state_digest: state_digest(
                height,
                &state_sha,
                memories.iter(),
                wasm_list.iter().map(|m| &m.sha256),
            ),
            state_file,
            wasm_modules: wasm_list,
            memories,
        };
        let body = serde_cbor::to_vec(&manifest).map_err(|e| {
            crate::fs_util::invalid_input(&tmp, format!("cannot encode the manifest: {e}"))
        })?;
        let mut manifest_bytes = MANIFEST_MAGIC.to_vec();
        manifest_bytes.extend_from_slice(&sha256(&body));
        manifest_bytes.extend_from_slice(&body);
        write_new_file(&tmp.join(MANIFEST_FILE), &manifest_bytes, None)?;
        stats.bytes_written += manifest_bytes.len() as u64;

        sync_dir(&tmp.join(PAGES_DIR))?;
        sync_dir(&tmp.join(WASM_DIR))?;
        sync_dir(&tmp)?;
        std::fs::rename(&tmp, &final_dir).map_err(io_error(&final_dir))?;
        sync_dir(&self.root)?;
        sync_dir(&tmp_root)?;
        tracing::info!(
            height = height.0,
            pages_written = stats.pages_written,
            page_files_linked = stats.page_files_linked,
            bytes_written = stats.bytes_written,
            "checkpoint written"
        );

        self.last = Some(LastCheckpoint {
            height,
            dir: final_dir,
            memories: caches,
            wasm_modules,
        });
        self.last_write_stats = Some(stats);
        self.delete_old_checkpoints(height)
    }

    fn load_latest(&mut self) -> Result<Option<ReplicatedState>, StorageError> {
        let heights = self.checkpoint_heights()?;
        let mut failed: Vec<(Height, StorageError)> = Vec::new();
        for height in heights.into_iter().rev() {
            match self.load_checkpoint(height) {
                Ok((state, last)) => {
                    for (bad, error) in &failed {
                        tracing::error!(
                            height = bad.0,
                            error = %error,
                            used_instead = height.0,
                            "checkpoint failed verification; moved to checkpoints/corrupt/ and \
                             using an older checkpoint"
                        );
                        self.move_aside(*bad)?;
                    }
                    self.last = Some(last);
                    return Ok(Some(state));
                }
                Err(error @ StorageError::Corrupt { .. }) => failed.push((height, error)),
                Err(error) => return Err(error),
            }
        }
        match failed.into_iter().next() {
            // Every checkpoint is damaged: starting from genesis would silently lose the state.
            Some((_, error)) => Err(error),
            None => Ok(None),
        }
    }
}

/// A copy of `state` with every memory emptied and every module's bytes dropped (they are stored
/// in page files and wasm files).
pub(crate) fn state_without_pages(state: &ReplicatedState) -> ReplicatedState {
    let mut stripped = state.clone();
    for canister in stripped.canisters.values_mut() {
        if canister.execution_state.is_none() {
            continue;
        }
        let canister = Arc::make_mut(canister);
        if let Some(execution) = canister.execution_state.as_mut() {
            execution.wasm_memory = PageMap::new();
            execution.stable_memory = PageMap::new();
            execution.wasm_binary = Arc::new(WasmBinary {
                bytes: Vec::new(),
                module_hash: execution.wasm_binary.module_hash,
            });
        }
    }
    stripped
}

/// The state file of format version 1: the state before `raw_rand_requests` existed.
#[derive(Deserialize)]
struct StateV1 {
    metadata: SystemMetadata,
    canisters: BTreeMap<CanisterId, Arc<CanisterState>>,
    ingress_history: IngressHistory,
    subnet_queue: VecDeque<CanisterMessage>,
    deleted_canisters: BTreeSet<CanisterId>,
}

/// The state file of format version 2: the state before `canister_logs` existed.
#[derive(Deserialize)]
struct StateV2 {
    metadata: SystemMetadata,
    canisters: BTreeMap<CanisterId, Arc<CanisterState>>,
    ingress_history: IngressHistory,
    subnet_queue: VecDeque<CanisterMessage>,
    deleted_canisters: BTreeSet<CanisterId>,
    raw_rand_requests: VecDeque<PendingRawRand>,
}

/// The state file of format version 3: the state before `snapshots` existed.
#[derive(Deserialize)]
struct StateV3 {
    metadata: SystemMetadata,
    canisters: BTreeMap<CanisterId, Arc<CanisterState>>,
    ingress_history: IngressHistory,
    subnet_queue: VecDeque<CanisterMessage>,
    deleted_canisters: BTreeSet<CanisterId>,
    raw_rand_requests: VecDeque<PendingRawRand>,
    canister_logs: openic_replicated_state::CanisterLogs,
}

/// The state file of format version 4: the state before `paused_executions` existed.
#[derive(Deserialize)]
struct StateV4 {
    metadata: SystemMetadata,
    canisters: BTreeMap<CanisterId, Arc<CanisterState>>,
    ingress_history: IngressHistory,
    subnet_queue: VecDeque<CanisterMessage>,
    deleted_canisters: BTreeSet<CanisterId>,
    raw_rand_requests: VecDeque<PendingRawRand>,
    canister_logs: openic_replicated_state::CanisterLogs,
    snapshots: Arc<openic_replicated_state::CanisterSnapshots>,
    round_robin_cursor: Option<CanisterId>,
}

/// Decodes a state file of a supported format version (the caller checked the version). Older
/// versions load with the fields they did not have empty.
fn decode_state(format_version: u32, bytes: &[u8]) -> Result<ReplicatedState, postcard::Error> {
    // Each older layout is lifted to the next one (the added fields empty), up to version 3.
    let v2 = |v1: StateV1| StateV2 {
        metadata: v1.metadata,
        canisters: v1.canisters,
        ingress_history: v1.ingress_history,
        subnet_queue: v1.subnet_queue,
        deleted_canisters: v1.deleted_canisters,
        raw_rand_requests: VecDeque::new(),
    };
    let v3 = |v2: StateV2| StateV3 {
        metadata: v2.metadata,
        canisters: v2.canisters,
        ingress_history: v2.ingress_history,
        subnet_queue: v2.subnet_queue,
        deleted_canisters: v2.deleted_canisters,
        raw_rand_requests: v2.raw_rand_requests,
        canister_logs: BTreeMap::new(),
    };
    let old = match format_version {
        1 => v3(v2(postcard::from_bytes(bytes)?)),
        2 => v3(postcard::from_bytes(bytes)?),
        3 => postcard::from_bytes(bytes)?,
        4 => {
            let v4: StateV4 = postcard::from_bytes(bytes)?;
            return Ok(ReplicatedState {
                metadata: v4.metadata,
                canisters: v4.canisters,
                ingress_history: v4.ingress_history,
                subnet_queue: v4.subnet_queue,
                deleted_canisters: v4.deleted_canisters,
                raw_rand_requests: v4.raw_rand_requests,
                canister_logs: v4.canister_logs,
                snapshots: v4.snapshots,
                round_robin_cursor: v4.round_robin_cursor,
                paused_executions: BTreeMap::new(),
            });
        }
        _ => return postcard::from_bytes(bytes),
    };
    Ok(ReplicatedState {
        metadata: old.metadata,
        canisters: old.canisters,
        ingress_history: old.ingress_history,
        subnet_queue: old.subnet_queue,
        deleted_canisters: old.deleted_canisters,
        raw_rand_requests: old.raw_rand_requests,
        canister_logs: old.canister_logs,
        snapshots: Arc::default(),
        round_robin_cursor: None,
        paused_executions: BTreeMap::new(),
    })
}

/// Checks that the encoded state decodes and encodes to the same bytes, so a checkpoint is never
/// written that `load_latest` would refuse (postcard is not self-describing: a serde attribute
/// such as `skip_serializing_if` on a state type would make it undecodable).
fn verify_state_encoding(state_bytes: &[u8], final_dir: &Path) -> Result<(), StorageError> {
    check_state_encoding(state_bytes)
        .map_err(|reason| crate::fs_util::invalid_input(final_dir, reason))
}

/// [`verify_state_encoding`] without a path: the reason the encoded state cannot be used.
pub(crate) fn check_state_encoding(state_bytes: &[u8]) -> Result<(), String> {
    let decoded: ReplicatedState = postcard::from_bytes(state_bytes).map_err(|e| {
        format!(
            "the encoded state does not decode ({e}); a state type's serde attributes are not \
             supported by the checkpoint format (no skip_serializing_if, flatten or untagged)"
        )
    })?;
    let again =
        postcard::to_allocvec(&decoded).map_err(|e| format!("cannot re-encode the state: {e}"))?;
    if again != state_bytes {
        let reason = "the state does not survive an encode/decode round trip; a state type's serde \
                      implementation loses data";
        return Err(reason.to_string());
    }
    Ok(())
}

pub(crate) fn sha256(bytes: &[u8]) -> Sha256Hash {
    Sha256::digest(bytes).into()
}

pub(crate) fn is_zero(page: &Page) -> bool {
    page.iter().all(|b| *b == 0)
}

/// Digest of a memory: its non-zero pages' indexes and hashes, in order.
pub(crate) fn pages_digest(page_hashes: &BTreeMap<PageIndex, Sha256Hash>) -> Sha256Hash {
    let mut hasher = Sha256::new();
    hasher.update(b"openic-checkpoint-pages-v1");
    for (index, hash) in page_hashes {
        hasher.update(index.to_le_bytes());
        hasher.update(hash);
    }
    hasher.finalize().into()
}

/// Digest of a whole checkpoint: height, state file, every memory's digest, every module. Chains
/// are not included, so the same state has the same digest however its pages are split in files.
fn state_digest<'a>(
    height: Height,
    state_file_sha256: &Sha256Hash,
    memories: impl Iterator<Item = &'a MemoryEntry>,
    module_hashes: impl Iterator<Item = &'a Sha256Hash>,
) -> Sha256Hash {
    state_digest_of(
        height,
        state_file_sha256,
        memories.map(|m| MemoryDigest {
            canister_id: m.canister_id,
            kind: m.kind,
            num_pages: m.num_pages,
            pages_digest: m.pages_digest,
        }),
        module_hashes,
    )
}

/// What [`state_digest`] records about one memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct MemoryDigest {
    pub(crate) canister_id: CanisterId,
    pub(crate) kind: MemoryKind,
    /// Non-zero pages in the memory.
    pub(crate) num_pages: u64,
    /// [`pages_digest`] of the memory.
    pub(crate) pages_digest: Sha256Hash,
}

/// [`state_digest`] over memories given by their digests (state sync has no [`MemoryEntry`]).
/// `memories` must be sorted by canister and kind, `module_hashes` ascending and distinct.
pub(crate) fn state_digest_of<'a>(
    height: Height,
    state_file_sha256: &Sha256Hash,
    memories: impl Iterator<Item = MemoryDigest>,
    module_hashes: impl Iterator<Item = &'a Sha256Hash>,
) -> Sha256Hash {
    let mut hasher = Sha256::new();
    hasher.update(b"openic-checkpoint-state-v1");
    hasher.update(height.0.to_le_bytes());
    hasher.update(state_file_sha256);
    for memory in memories {
        let id = memory.canister_id.get();
        let id = id.as_slice();
        hasher.update([id.len() as u8]);
        hasher.update(id);
        hasher.update([memory.kind as u8]);
        hasher.update(memory.num_pages.to_le_bytes());
        hasher.update(memory.pages_digest);
    }
    for module_hash in module_hashes {
        hasher.update(module_hash);
    }
    hasher.finalize().into()
}

fn checkpoint_name(height: Height) -> String {
    format!("{:020}", height.0)
}

fn parse_checkpoint_name(name: &str) -> Option<Height> {
    if name.len() != 20 || !name.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    name.parse().ok().map(Height)
}

fn page_file_name(key: &MemoryKey, height: Height) -> String {
    format!(
        "{PAGES_DIR}/{}.{}.{:020}.pages",
        hex::encode(key.0.get().as_slice()),
        key.1.as_str(),
        height.0
    )
}

fn wasm_file_name(module_hash: &Sha256Hash) -> String {
    format!("{WASM_DIR}/{}.wasm", hex::encode(module_hash))
}

fn parse_wasm_file_name(name: &str) -> Option<Sha256Hash> {
    let hex_hash = name.strip_prefix("wasm/")?.strip_suffix(".wasm")?;
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex_hash, &mut hash).ok()?;
    Some(hash)
}

/// The path of a manifest-listed file inside `dir`, refusing names that could leave it.
fn entry_path(dir: &Path, entry: &FileEntry) -> Result<PathBuf, StorageError> {
    let allowed = entry
        .name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'/')
        && !entry.name.contains("..")
        && !entry.name.starts_with('/')
        && (entry.name == STATE_FILE
            || entry.name.starts_with("pages/")
            || entry.name.starts_with("wasm/"));
    if allowed {
        Ok(dir.join(&entry.name))
    } else {
        Err(corrupt(
            dir,
            format!("manifest lists an invalid file name {:?}", entry.name),
        ))
    }
}

/// Hard-links `files` from checkpoint `from` into `to`; `None` (after removing any links made) if
/// one of them cannot be linked, e.g. because the old checkpoint was removed.
fn link_files(from: &Path, to: &Path, files: &[FileEntry]) -> Option<Vec<FileEntry>> {
    let mut linked: Vec<PathBuf> = Vec::new();
    for file in files {
        let target = to.join(&file.name);
        match std::fs::hard_link(from.join(&file.name), &target) {
            Ok(()) => linked.push(target),
            Err(error) => {
                tracing::warn!(
                    file = %from.join(&file.name).display(),
                    %error,
                    "cannot link a file of the previous checkpoint; writing it again"
                );
                for path in linked {
                    let _ = std::fs::remove_file(path);
                }
                return None;
            }
        }
    }
    Some(files.to_vec())
}

/// Writes a page file `dir/name` holding `count` pages, fsyncs it, and returns its entry.
fn write_page_file<'a>(
    dir: &Path,
    name: &str,
    count: u64,
    pages: impl Iterator<Item = (PageIndex, &'a Page)>,
) -> Result<FileEntry, StorageError> {
    let path = dir.join(name);
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
        .map_err(io_error(&path))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut put = |bytes: &[u8]| -> Result<(), StorageError> {
        hasher.update(bytes);
        writer.write_all(bytes).map_err(io_error(&path))
    };
    put(&PAGE_FILE_MAGIC)?;
    put(&count.to_le_bytes())?;
    let mut written = 0u64;
    for (index, page) in pages {
        put(&index.to_le_bytes())?;
        put(page)?;
        written += 1;
    }
    debug_assert_eq!(written, count, "page count announced in the header");
    let file = writer
        .into_inner()
        .map_err(|e| io_error(&path)(e.into_error()))?;
    file.sync_all().map_err(io_error(&path))?;
    Ok(FileEntry {
        name: name.to_string(),
        size_bytes: PAGE_FILE_HEADER_BYTES + count * PAGE_RECORD_BYTES,
        sha256: hasher.finalize().into(),
    })
}

/// Opens a manifest-listed file and checks its size against the manifest (before reading it, so a
/// damaged file never causes a large allocation).
fn open_listed(dir: &Path, entry: &FileEntry) -> Result<(PathBuf, File), StorageError> {
    let path = entry_path(dir, entry)?;
    let file = match File::open(&path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(corrupt(&path, "file listed in the manifest is missing"));
        }
        Err(e) => return Err(io_error(&path)(e)),
    };
    let size = file.metadata().map_err(io_error(&path))?.len();
    if size != entry.size_bytes {
        return Err(corrupt(
            &path,
            format!(
                "file has {size} bytes, the manifest says {}",
                entry.size_bytes
            ),
        ));
    }
    Ok((path, file))
}

/// Reads a whole manifest-listed file and verifies its size and SHA-256.
fn read_verified(dir: &Path, entry: &FileEntry) -> Result<Vec<u8>, StorageError> {
    let (path, mut file) = open_listed(dir, entry)?;
    let mut bytes = Vec::with_capacity(entry.size_bytes as usize);
    file.read_to_end(&mut bytes).map_err(io_error(&path))?;
    if sha256(&bytes) != entry.sha256 {
        return Err(corrupt(&path, "SHA-256 does not match the manifest"));
    }
    Ok(bytes)
}

/// Applies the pages of a page file to `pages`, verifying size, format and SHA-256.
fn read_page_file(dir: &Path, entry: &FileEntry, pages: &mut PageMap) -> Result<(), StorageError> {
    let (path, file) = open_listed(dir, entry)?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut header = [0u8; PAGE_FILE_HEADER_BYTES as usize];
    reader.read_exact(&mut header).map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            corrupt(&path, "page file is shorter than its header")
        } else {
            io_error(&path)(e)
        }
    })?;
    hasher.update(header);
    if header[..8] != PAGE_FILE_MAGIC {
        return Err(corrupt(&path, "not a page file (bad magic)"));
    }
    let count = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    let expected = count
        .checked_mul(PAGE_RECORD_BYTES)
        .and_then(|b| b.checked_add(PAGE_FILE_HEADER_BYTES));
    if expected != Some(entry.size_bytes) {
        return Err(corrupt(
            &path,
            format!(
                "page file claims {count} pages but has {} bytes",
                entry.size_bytes
            ),
        ));
    }
    // Pages are applied as they are read: on any error the caller discards the whole page map.
    let mut record = vec![0u8; PAGE_RECORD_BYTES as usize];
    let mut previous: Option<PageIndex> = None;
    let mut page = ZERO_PAGE;
    for _ in 0..count {
        reader.read_exact(&mut record).map_err(io_error(&path))?;
        hasher.update(&record);
        let index = u64::from_le_bytes(record[..8].try_into().expect("8 bytes"));
        if previous.is_some_and(|p| p >= index) {
            return Err(corrupt(&path, "page indexes are not strictly increasing"));
        }
        previous = Some(index);
        page.copy_from_slice(&record[8..]);
        pages.set_page(index, &page);
    }
    let hash: Sha256Hash = hasher.finalize().into();
    if hash != entry.sha256 {
        return Err(corrupt(&path, "SHA-256 does not match the manifest"));
    }
    Ok(())
}

/// Reads and verifies a checkpoint's manifest.
fn read_manifest(dir: &Path) -> Result<Manifest, StorageError> {
    let path = dir.join(MANIFEST_FILE);
    let bytes = match File::open(&path) {
        Ok(file) => {
            let size = file.metadata().map_err(io_error(&path))?.len();
            if size > MANIFEST_MAX_BYTES {
                return Err(corrupt(
                    &path,
                    format!("manifest of {size} bytes exceeds the limit of {MANIFEST_MAX_BYTES}"),
                ));
            }
            let mut bytes = Vec::with_capacity(size as usize);
            let mut file = file;
            file.read_to_end(&mut bytes).map_err(io_error(&path))?;
            bytes
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(corrupt(&path, "checkpoint has no manifest"));
        }
        Err(e) => return Err(io_error(&path)(e)),
    };
    if bytes.len() < 40 || bytes[..8] != MANIFEST_MAGIC {
        return Err(corrupt(&path, "not a checkpoint manifest (bad magic)"));
    }
    let body = &bytes[40..];
    if sha256(body)[..] != bytes[8..40] {
        return Err(corrupt(&path, "manifest checksum mismatch"));
    }
    serde_cbor::from_slice(body)
        .map_err(|e| corrupt(&path, format!("manifest does not decode: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use openic_replicated_state::{
        CallbackId, ExecutionState, GlobalValue, ModuleInfo, PendingRawRand, Request, SystemState,
    };
    use openic_types::{Cycles, IngressState, IngressStatus, Principal, RequestId, SubnetId, Time};

    fn module(tag: u8) -> Arc<WasmBinary> {
        let bytes = vec![0, b'a', b's', b'm', 1, 0, 0, 0, tag];
        Arc::new(WasmBinary {
            module_hash: sha256(&bytes),
            bytes,
        })
    }

    fn page_of(value: u8) -> Page {
        [value; PAGE_SIZE]
    }

    fn memory(pages: u64, value: u8) -> PageMap {
        let mut map = PageMap::new();
        for index in 0..pages {
            map.set_page(index * 2, &page_of(value.wrapping_add(index as u8).max(1)));
        }
        map
    }

    fn canister(n: u64, wasm: Arc<WasmBinary>, pages: u64) -> CanisterState {
        let id = CanisterId::from_u64(n);
        let mut system = SystemState::new(
            id,
            [Principal::anonymous()].into_iter().collect(),
            Cycles(u128::MAX / 3),
            Time(5),
        );
        system.certified_data = vec![n as u8; 32];
        CanisterState {
            system_state: system,
            execution_state: Some(ExecutionState {
                wasm_binary: wasm,
                module_info: Arc::new(ModuleInfo::default()),
                wasm_memory: memory(pages, n as u8),
                wasm_memory_size_pages: 4,
                stable_memory: memory(pages / 2, 100 + n as u8),
                stable_memory_size_pages: 2,
                globals: vec![GlobalValue::V128(u128::MAX - 5), GlobalValue::I32(-3)],
            }),
        }
    }

    fn state(height: u64) -> ReplicatedState {
        let mut state = ReplicatedState::new(
            SubnetId(Principal::from_slice(&[9; 29])),
            openic_types::ids::FIRST_USER_CANISTER_INDEX,
            [7; 32],
        );
        state.metadata.height = Height(height);
        state.metadata.time = Time(1_000 + height);
        state.metadata.consumed_cycles_total = u128::MAX - 1;
        let shared = module(1);
        state.put_canister(canister(1, shared.clone(), 40));
        state.put_canister(canister(2, shared, 10));
        state.put_canister(canister(3, module(2), 6));
        let empty = CanisterState {
            system_state: SystemState::new(
                CanisterId::from_u64(4),
                Default::default(),
                Cycles(10),
                Time(1),
            ),
            execution_state: None,
        };
        state.put_canister(empty);
        state.ingress_history.set(
            RequestId([3; 32]),
            IngressStatus {
                state: IngressState::Replied(vec![1, 2, 3]),
                sender: Principal::anonymous(),
                effective_canister_id: CanisterId::from_u64(1),
                ingress_expiry: Time(99_999),
            },
        );
        state.deleted_canisters.insert(CanisterId::from_u64(77));
        state.raw_rand_requests.push_back(PendingRawRand {
            requested_at: Height(height),
            request: Request {
                sender: CanisterId::from_u64(1),
                receiver: CanisterId::management(),
                sender_reply_callback: CallbackId(5),
                method_name: "raw_rand".to_string(),
                method_payload: b"DIDL\x00\x00".to_vec(),
                payment: Cycles(7),
                deadline: None,
            },
        });
        state.append_log(
            CanisterId::from_u64(1),
            [b"printed".to_vec(), b"[TRAP]: why".to_vec()],
        );
        let snapshot_of = state.canister(&CanisterId::from_u64(3)).unwrap().clone();
        Arc::make_mut(&mut state.snapshots).insert(openic_replicated_state::CanisterSnapshot {
            canister_id: CanisterId::from_u64(3),
            source: openic_replicated_state::SnapshotSource::TakenFromCanister,
            local_id: 0,
            taken_at_timestamp: 77,
            canister_version: 5,
            execution_state: snapshot_of.execution_state.unwrap(),
            certified_data: b"certified".to_vec(),
            global_timer_nanos: 9,
            low_wasm_memory_hook_pending: false,
            wasm_chunk_store: Default::default(),
        });
        state.paused_executions.insert(
            CanisterId::from_u64(2),
            openic_replicated_state::PausedExecution {
                started_at: Height(height.saturating_sub(1)),
                slices_granted: 3,
                last_granted_at: Height(height),
                input: b"encoded input".to_vec(),
            },
        );
        state
    }

    fn advance(state: &mut ReplicatedState) {
        state.metadata.height = state.metadata.height.increment();
        state.metadata.time = Time(state.metadata.time.0 + 1);
    }

    fn assert_same(a: &ReplicatedState, b: &ReplicatedState) {
        assert_eq!(a.metadata, b.metadata);
        assert_eq!(a.canisters, b.canisters);
        assert_eq!(a.ingress_history, b.ingress_history);
        assert_eq!(a.subnet_queue, b.subnet_queue);
        assert_eq!(a.deleted_canisters, b.deleted_canisters);
        assert_eq!(a.raw_rand_requests, b.raw_rand_requests);
        assert_eq!(a.canister_logs, b.canister_logs);
        assert_eq!(a.snapshots, b.snapshots);
        assert_eq!(
            postcard::to_allocvec(a).unwrap(),
            postcard::to_allocvec(b).unwrap()
        );
    }

    fn open(dir: &Path) -> FileCheckpointStore {
        FileCheckpointStore::open(dir, CheckpointConfig::default()).unwrap()
    }

    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut found = Vec::new();
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                found.extend(files_under(&path));
            } else {
                found.push(path);
            }
        }
        found
    }

    #[test]
    fn version_1_to_4_state_files_decode_with_the_newer_fields_empty() {
        let current = state(3);
        assert!(!current.raw_rand_requests.is_empty());
        assert!(!current.canister_logs.is_empty());
        assert_eq!(current.snapshots.count(&CanisterId::from_u64(3)), 1);
        assert!(!current.paused_executions.is_empty());
        let full = state_without_pages(&current);
        let mut without_paused = full.clone();
        without_paused.paused_executions.clear();
        let mut without_snapshots = without_paused.clone();
        without_snapshots.snapshots = Arc::default();
        let mut without_logs = without_snapshots.clone();
        without_logs.canister_logs.clear();
        let mut without_rand = without_logs.clone();
        without_rand.raw_rand_requests.clear();
        // An older version is today's state without its last fields; postcard encodes a struct as
        // its fields in order, so a tuple of the first fields is an older state file.
        let v1 = postcard::to_allocvec(&(
            &full.metadata,
            &full.canisters,
            &full.ingress_history,
            &full.subnet_queue,
            &full.deleted_canisters,
        ))
        .unwrap();
        let v2 = postcard::to_allocvec(&(
            &full.metadata,
            &full.canisters,
            &full.ingress_history,
            &full.subnet_queue,
            &full.deleted_canisters,
            &full.raw_rand_requests,
        ))
        .unwrap();
        let v3 = postcard::to_allocvec(&(
            &full.metadata,
            &full.canisters,
            &full.ingress_history,
            &full.subnet_queue,
            &full.deleted_canisters,
            &full.raw_rand_requests,
            &full.canister_logs,
        ))
        .unwrap();
        assert_same(&decode_state(1, &v1).unwrap(), &without_rand);
        assert_same(&decode_state(2, &v2).unwrap(), &without_logs);
        let v4 = postcard::to_allocvec(&(
            &full.metadata,
            &full.canisters,
            &full.ingress_history,
            &full.subnet_queue,
            &full.deleted_canisters,
            &full.raw_rand_requests,
            &full.canister_logs,
            &full.snapshots,
            &full.round_robin_cursor,
        ))
        .unwrap();
        assert_same(&decode_state(3, &v3).unwrap(), &without_snapshots);
        assert_same(&decode_state(4, &v4).unwrap(), &without_paused);
        for older in [&v1, &v2, &v3, &v4] {
            assert!(decode_state(FORMAT_VERSION, older).is_err());
        }
        let v5 = postcard::to_allocvec(&full).unwrap();
        assert_same(&decode_state(FORMAT_VERSION, &v5).unwrap(), &full);
    }

    #[test]
    fn round_trip_equals_the_original_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        assert!(store.load_latest().unwrap().is_none());
        let original = state(10);
        store.write_checkpoint(&original).unwrap();
        let stats = store.last_write_stats().unwrap().clone();
        assert_eq!(stats.wasm_modules_written, 2, "shared module stored once");
        assert_eq!(stats.page_files_written, 6);

        let mut reopened = open(dir.path());
        let loaded = reopened.load_latest().unwrap().unwrap();
        assert_same(&loaded, &original);
        // The two canisters sharing a module share it after loading too.
        let module_of = |n| {
            loaded.canisters[&CanisterId::from_u64(n)]
                .execution_state
                .as_ref()
                .unwrap()
                .wasm_binary
                .clone()
        };
        assert!(Arc::ptr_eq(&module_of(1), &module_of(2)));
    }

    #[test]
    fn incremental_checkpoint_writes_only_changed_pages() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let mut current = state(1);
        store.write_checkpoint(&current).unwrap();
        let full = store.last_write_stats().unwrap().pages_written;
        assert!(full > 50);

        // Change two pages and remove one in canister 1's heap; nothing else.
        advance(&mut current);
        {
            let canister = current.canister_mut(&CanisterId::from_u64(1)).unwrap();
            let heap = &mut canister.execution_state.as_mut().unwrap().wasm_memory;
            heap.set_page(0, &page_of(200));
            heap.set_page(1001, &page_of(201));
            heap.set_page(4, &ZERO_PAGE);
            // Rewriting a page with the same contents is not a change.
            let same = *heap.page(6).unwrap();
            heap.set_page(6, &same);
        }
        store.write_checkpoint(&current).unwrap();
        let stats = store.last_write_stats().unwrap().clone();
        assert_eq!(stats.pages_written, 3);
        assert_eq!(stats.page_files_written, 1);
        assert_eq!(stats.wasm_modules_written, 0);
        assert_eq!(stats.page_files_linked, 6);
        let overlay = store.checkpoint_dir(Height(2)).join(page_file_name(
            &(CanisterId::from_u64(1), MemoryKind::Wasm),
            Height(2),
        ));
        assert_eq!(
            std::fs::metadata(&overlay).unwrap().len(),
            PAGE_FILE_HEADER_BYTES + 3 * PAGE_RECORD_BYTES
        );

        // An unchanged state writes no page files at all.
        advance(&mut current);
        store.write_checkpoint(&current).unwrap();
        assert_eq!(store.last_write_stats().unwrap().pages_written, 0);

        // Only two checkpoints are kept, and the latest is complete on its own (hard links).
        assert_eq!(
            store.checkpoint_heights().unwrap(),
            vec![Height(2), Height(3)]
        );
        let loaded = open(dir.path()).load_latest().unwrap().unwrap();
        assert_same(&loaded, &current);
    }

    #[test]
    fn long_chains_are_merged_into_a_new_base() {
        let dir = tempfile::tempdir().unwrap();
        let config = CheckpointConfig {
            max_overlay_chain_length: 3,
            checkpoints_to_keep: 2,
        };
        let mut store = FileCheckpointStore::open(dir.path(), config.clone()).unwrap();
        let mut current = state(1);
        let id = CanisterId::from_u64(3);
        let key = (id, MemoryKind::Wasm);
        let mut chain_lengths = Vec::new();
        for round in 0..6u8 {
            if round > 0 {
                advance(&mut current);
                let canister = current.canister_mut(&id).unwrap();
                let heap = &mut canister.execution_state.as_mut().unwrap().wasm_memory;
                heap.set_page(500 + u64::from(round), &page_of(round + 1));
            }
            store.write_checkpoint(&current).unwrap();
            chain_lengths.push(store.last.as_ref().unwrap().memories[&key].chain.len());
        }
        assert_eq!(chain_lengths, vec![1, 2, 3, 1, 2, 3]);
        // After a merge, the base holds every page of the memory.
        let mut reopened = FileCheckpointStore::open(dir.path(), config).unwrap();
        let loaded = reopened.load_latest().unwrap().unwrap();
        assert_same(&loaded, &current);
    }

    #[test]
    fn corrupt_latest_is_refused_and_the_previous_used() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let first = state(1);
        store.write_checkpoint(&first).unwrap();
        let mut second = first.clone();
        advance(&mut second);
        second
            .canister_mut(&CanisterId::from_u64(2))
            .unwrap()
            .execution_state
            .as_mut()
            .unwrap()
            .stable_memory
            .set_page(3, &page_of(77));
        store.write_checkpoint(&second).unwrap();

        // Flip one byte of the page file written at height 2.
        let overlay = store.checkpoint_dir(Height(2)).join(page_file_name(
            &(CanisterId::from_u64(2), MemoryKind::Stable),
            Height(2),
        ));
        let mut bytes = std::fs::read(&overlay).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&overlay, &bytes).unwrap();

        let mut reopened = open(dir.path());
        let error = reopened.load_checkpoint(Height(2)).unwrap_err();
        assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");
        assert!(error.to_string().contains("SHA-256"), "{error}");
        let loaded = reopened.load_latest().unwrap().unwrap();
        assert_same(&loaded, &first);
        assert_eq!(reopened.checkpoint_heights().unwrap(), vec![Height(1)]);
        assert!(
            dir.path()
                .join("checkpoints/corrupt")
                .join(checkpoint_name(Height(2)))
                .is_dir()
        );

        // Replaying to height 2 again and checkpointing works (the corrupt one is out of the way).
        reopened.write_checkpoint(&second).unwrap();
        assert_same(&open(dir.path()).load_latest().unwrap().unwrap(), &second);
    }

    #[test]
    fn every_damaged_checkpoint_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let mut current = state(1);
        store.write_checkpoint(&current).unwrap();
        advance(&mut current);
        store.write_checkpoint(&current).unwrap();
        for height in [Height(1), Height(2)] {
            let state_file = store.checkpoint_dir(height).join(STATE_FILE);
            let mut bytes = std::fs::read(&state_file).unwrap();
            bytes[0] ^= 0xff;
            // Replace rather than modify in place: the file may be shared by a hard link.
            std::fs::remove_file(&state_file).unwrap();
            std::fs::write(&state_file, &bytes).unwrap();
        }
        let error = open(dir.path()).load_latest().unwrap_err();
        assert!(matches!(error, StorageError::Corrupt { .. }), "{error}");
        // A damaged manifest is caught by its own checksum.
        let manifest = store.checkpoint_dir(Height(2)).join(MANIFEST_FILE);
        let mut bytes = std::fs::read(&manifest).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&manifest, &bytes).unwrap();
        let error = store.load_checkpoint(Height(2)).unwrap_err();
        assert!(error.to_string().contains("manifest checksum"), "{error}");
    }

    #[test]
    fn missing_file_and_wrong_size_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.write_checkpoint(&state(4)).unwrap();
        let checkpoint = store.checkpoint_dir(Height(4));
        let wasm = files_under(&checkpoint.join(WASM_DIR)).remove(0);
        let bytes = std::fs::read(&wasm).unwrap();
        std::fs::write(&wasm, &bytes[..bytes.len() - 1]).unwrap();
        let error = store.load_checkpoint(Height(4)).unwrap_err();
        assert!(
            error.to_string().contains("bytes, the manifest says"),
            "{error}"
        );
        std::fs::remove_file(&wasm).unwrap();
        let error = store.load_checkpoint(Height(4)).unwrap_err();
        assert!(error.to_string().contains("missing"), "{error}");
    }

    #[test]
    fn retain_only_keeps_one_checkpoint_which_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.write_checkpoint(&state(4)).unwrap();
        store.write_checkpoint(&state(9)).unwrap();
        store.retain_only(Height(9)).unwrap();
        assert_eq!(store.checkpoint_heights().unwrap(), vec![Height(9)]);
        let mut fresh = open(dir.path());
        let loaded = fresh.load_latest().unwrap().expect("a checkpoint");
        assert_eq!(loaded.metadata.height, Height(9));
    }

    #[test]
    fn same_height_twice_is_a_no_op_unless_the_state_differs() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let original = state(5);
        store.write_checkpoint(&original).unwrap();
        store.write_checkpoint(&original).unwrap();
        // Also through a fresh store that has not loaded anything.
        let mut fresh = open(dir.path());
        fresh.write_checkpoint(&original).unwrap();
        let mut different = original.clone();
        different.metadata.update_transactions_total += 1;
        let error = fresh.write_checkpoint(&different).unwrap_err();
        assert!(error.to_string().contains("diverged"), "{error}");
    }

    #[test]
    fn a_crash_while_writing_leaves_no_partial_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.write_checkpoint(&state(1)).unwrap();
        // Simulate a crash mid-write: a half-built directory in tmp/.
        let tmp = dir
            .path()
            .join("checkpoints")
            .join(TMP_DIR)
            .join(checkpoint_name(Height(2)));
        std::fs::create_dir_all(tmp.join(PAGES_DIR)).unwrap();
        std::fs::write(tmp.join(STATE_FILE), b"partial").unwrap();
        let mut reopened = open(dir.path());
        assert!(!dir.path().join("checkpoints").join(TMP_DIR).exists());
        assert_eq!(
            reopened.load_latest().unwrap().unwrap().metadata.height,
            Height(1)
        );
    }
}
