//! State sync, the data side: a replica that lost its state (or fell too far behind to replay
//! blocks) fetches the replicated state at a certified height from its peers in chunks, and
//! verifies every chunk against a [`SyncManifest`] whose hash the subnet certified.
//!
//! - A serving replica builds a [`SyncSnapshot`] of the state at a height (cheap: pages are
//!   shared with the live state by `Arc`; [`crate::FileCheckpointStore::sync_snapshot`] also
//!   reuses the page hashes of the checkpoint just written) and answers chunk requests from it.
//! - A fetching replica decodes the manifest with [`SyncManifest::decode`], compares
//!   [`SyncManifest::hash`] with the certified value, feeds the chunks peers send into a
//!   [`SyncAssembler`], and once it is complete calls [`SyncAssembler::finish`] for a state ready
//!   to be checkpointed.
//!
//! The networking is elsewhere: this module is data types and pure functions.
//!
//! # Chunk layout
//!
//! The chunk list is a function of the state alone, identical on every replica:
//! 1. `state.bin`, the checkpoint's state file (postcard of the state without memory pages and
//!    wasm bytes), in slices of [`STATE_SYNC_CHUNK_BYTES`]; it is never empty.
//! 2. Every distinct wasm module, by ascending module hash, in slices of
//!    [`STATE_SYNC_CHUNK_BYTES`]. An empty module is one chunk of 0 bytes, so every module the
//!    state uses has at least one chunk and [`SyncAssembler::finish`] can attach it.
//! 3. Both memories of every canister with a module, by canister id, wasm memory before stable
//!    memory: the non-zero pages by ascending index, [`STATE_SYNC_PAGES_PER_CHUNK`] per chunk
//!    (only a memory's last chunk may hold fewer). An all-zero page is absent, as in a
//!    checkpoint, and an empty memory has no chunks.
//!
//! Only the last chunk of a file or module may be shorter than [`STATE_SYNC_CHUNK_BYTES`]. A page
//! chunk's wire form is `count × (page index u64 LE · 4096 bytes)` with indexes strictly
//! increasing, the first one equal to the chunk's `first_index` and all below the next chunk's
//! `first_index` of the same memory; so it is at most [`STATE_SYNC_CHUNK_WIRE_BYTES_MAX`] bytes.
//!
//! # Digests
//!
//! - A byte chunk (state file, wasm): `SHA-256("openic-state-sync-bytes-v1" · bytes)`.
//! - A page chunk: `SHA-256("openic-state-sync-pages-v1" · for each page: index u64 LE ·
//!   SHA-256(page))`, so a serving replica computes it from the page hashes its checkpoint store
//!   already holds.
//! - The manifest: `SHA-256("openic-state-sync-manifest-v1" · encode())`, the value the subnet
//!   certifies.
//! - `state_digest`: the checkpoint state digest of the state (see [`crate::checkpoint`]);
//!   [`SyncAssembler::finish`] recomputes it from the assembled state.
//!
//! # Trust
//!
//! Once its hash matched a certified one the manifest is trusted, so its sizes may size
//! allocations. Chunk bytes come from untrusted peers: a chunk is verified completely (size,
//! structure, digest) before anything of it is kept, and a bad chunk leaves the assembler as it
//! was. The assembler keeps verified chunks only, so it holds at most about the state's size.

use crate::checkpoint::{
    MemoryDigest, MemoryKey, MemoryKind, Sha256Hash, check_state_encoding, is_zero, pages_digest,
    sha256, state_digest_of, state_without_pages,
};
use openic_replicated_state::{PAGE_SIZE, Page, PageIndex, PageMap, ReplicatedState, WasmBinary};
use openic_types::{CanisterId, Height};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Largest payload of a state file or wasm chunk, and the page budget of a page chunk.
pub const STATE_SYNC_CHUNK_BYTES: usize = 1 << 20;

/// Pages per page chunk (all but the last chunk of a memory hold exactly this many).
pub const STATE_SYNC_PAGES_PER_CHUNK: usize = STATE_SYNC_CHUNK_BYTES / PAGE_SIZE;

/// Wire bytes of one page in a page chunk: index u64 LE and the page.
pub const STATE_SYNC_PAGE_RECORD_BYTES: usize = 8 + PAGE_SIZE;

/// Largest wire form of any chunk: a full page chunk, 256 × (8 + 4096) = 1,050,624 bytes, slightly
/// above [`STATE_SYNC_CHUNK_BYTES`] because of the page indexes.
pub const STATE_SYNC_CHUNK_WIRE_BYTES_MAX: usize =
    STATE_SYNC_PAGES_PER_CHUNK * STATE_SYNC_PAGE_RECORD_BYTES;

/// Largest encoded manifest accepted by [`SyncManifest::decode`] (and built by a snapshot).
pub const STATE_SYNC_MANIFEST_BYTES_MAX: usize = 16 << 20;

/// Most chunks in a manifest: bounds the assembler's bookkeeping and, with 1 MiB chunks, the
/// state that can be synced to about 256 GiB. A manifest of this many chunks stays below
/// [`STATE_SYNC_MANIFEST_BYTES_MAX`] (a chunk encodes in at most about 60 bytes).
pub const STATE_SYNC_CHUNKS_MAX: u32 = 1 << 18;

/// The manifest format this replica builds and accepts (2: the state file holds the pending
/// `raw_rand` calls; replicas of one subnet run one version, so only the current one is served).
pub const STATE_SYNC_FORMAT_VERSION: u32 = 2;

const BYTES_CHUNK_DOMAIN: &[u8] = b"openic-state-sync-bytes-v1";
const PAGES_CHUNK_DOMAIN: &[u8] = b"openic-state-sync-pages-v1";
const MANIFEST_DOMAIN: &[u8] = b"openic-state-sync-manifest-v1";

/// Everything a fetching replica needs to know to assemble and verify the state at one height.
/// Its [`SyncManifest::hash`] is what the subnet certifies.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncManifest {
    /// [`STATE_SYNC_FORMAT_VERSION`] of the builder.
    pub format_version: u32,
    /// The height of the state.
    pub height: Height,
    /// The checkpoint state digest of the state at `height`; the assembled state must have it.
    pub state_digest: [u8; 32],
    /// The chunks, in the layout described in the module documentation.
    pub chunks: Vec<SyncChunk>,
}

/// One chunk of a [`SyncManifest`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncChunk {
    /// What the chunk holds.
    pub content: ChunkContent,
    /// Bytes of the chunk's wire form.
    pub size_bytes: u64,
    /// The chunk's digest (see the module documentation).
    pub digest: [u8; 32],
}

/// What a [`SyncChunk`] holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChunkContent {
    /// Bytes `[offset, offset + size_bytes)` of `state.bin` (postcard of the state without pages
    /// and wasm bytes).
    StateFile {
        /// Byte offset in the state file.
        offset: u64,
    },
    /// Bytes `[offset, offset + size_bytes)` of the wasm module with this SHA-256.
    Wasm {
        /// SHA-256 of the whole module.
        module_hash: [u8; 32],
        /// Byte offset in the module.
        offset: u64,
    },
    /// `count` non-zero pages of one memory, the first at `first_index`, all below the next
    /// chunk's `first_index` of the same memory. Wire form: `count × (index u64 LE · page)`.
    Pages {
        /// The canister whose memory this is.
        canister_id: CanisterId,
        /// Stable memory if true, wasm memory otherwise.
        stable: bool,
        /// Index of the chunk's first page.
        first_index: u64,
        /// Pages in the chunk, 1 to [`STATE_SYNC_PAGES_PER_CHUNK`].
        count: u32,
    },
}

/// What went wrong in state sync.
#[derive(Debug, thiserror::Error)]
pub enum StateSyncError {
    /// The encoded manifest is larger than [`STATE_SYNC_MANIFEST_BYTES_MAX`].
    #[error(
        "state sync manifest of {size_bytes} bytes exceeds the limit of {max_bytes} bytes; the \
         peer sent something else, or the state is too large to sync"
    )]
    ManifestTooLarge {
        /// Bytes of the encoded manifest.
        size_bytes: u64,
        /// [`STATE_SYNC_MANIFEST_BYTES_MAX`].
        max_bytes: u64,
    },
    /// The bytes are not an encoded manifest.
    #[error("state sync manifest does not decode: {reason}")]
    ManifestDecode {
        /// What is wrong with the bytes.
        reason: String,
    },
    /// The manifest's format version is not the one this replica supports.
    #[error(
        "state sync manifest format version {version} is not supported (this replica supports \
         version {supported}); upgrade the replica to sync from this subnet"
    )]
    UnsupportedVersion {
        /// The manifest's version.
        version: u32,
        /// [`STATE_SYNC_FORMAT_VERSION`].
        supported: u32,
    },
    /// The manifest decodes but breaks the chunk layout or a limit.
    #[error("invalid state sync manifest: {reason}")]
    InvalidManifest {
        /// Which rule it breaks.
        reason: String,
    },
    /// A chunk index beyond the manifest's chunk list (a caller error, not a peer's).
    #[error("chunk index {index} is out of range: the manifest has {chunk_count} chunks")]
    ChunkIndexOutOfRange {
        /// The index asked for.
        index: u32,
        /// Chunks in the manifest.
        chunk_count: u32,
    },
    /// A peer sent a chunk of the wrong size.
    #[error(
        "chunk {index} has {actual_bytes} bytes, the manifest says {expected_bytes}; the chunk was \
         dropped, fetch it from another peer"
    )]
    ChunkSizeMismatch {
        /// The chunk's index.
        index: u32,
        /// The size in the manifest.
        expected_bytes: u64,
        /// The size received.
        actual_bytes: u64,
    },
    /// A peer sent a chunk whose digest differs from the manifest's.
    #[error(
        "chunk {index} does not match its digest in the manifest; the chunk was dropped, fetch it \
         from another peer"
    )]
    ChunkDigestMismatch {
        /// The chunk's index.
        index: u32,
    },
    /// A peer sent a page chunk that breaks the page chunk format.
    #[error(
        "chunk {index} is malformed: {reason}; the chunk was dropped, fetch it from another peer"
    )]
    MalformedChunk {
        /// The chunk's index.
        index: u32,
        /// What is wrong with it.
        reason: String,
    },
    /// `finish` was called before every chunk arrived.
    #[error("state sync is incomplete: {missing} of {chunk_count} chunks are missing")]
    Incomplete {
        /// Chunks not received yet.
        missing: u32,
        /// Chunks in the manifest.
        chunk_count: u32,
    },
    /// Every chunk verified, but together they do not make a state that fits the manifest (with
    /// a certified manifest: a bug or a non-deterministic encoding, not a bad peer).
    #[error("the synced state at height {height} is inconsistent: {reason}")]
    InconsistentState {
        /// The manifest's height.
        height: Height,
        /// What does not fit.
        reason: String,
    },
    /// The assembled state's checkpoint digest differs from the manifest's.
    #[error(
        "the synced state at height {height} has state digest {actual}, the manifest says \
         {expected}; the state was not accepted"
    )]
    StateDigestMismatch {
        /// The manifest's height.
        height: Height,
        /// The manifest's digest, hex.
        expected: String,
        /// The assembled state's digest, hex.
        actual: String,
    },
    /// A snapshot cannot be built of this state.
    #[error("cannot serve state sync of the state at height {height}: {reason}")]
    UnservableState {
        /// The state's height.
        height: Height,
        /// Why.
        reason: String,
    },
}

impl StateSyncError {
    /// Whether the error is a bad chunk from a peer: the assembler is unchanged and the same
    /// chunk should be fetched from another peer. Every other error is permanent for its input.
    pub fn is_bad_chunk(&self) -> bool {
        matches!(
            self,
            StateSyncError::ChunkSizeMismatch { .. }
                | StateSyncError::ChunkDigestMismatch { .. }
                | StateSyncError::MalformedChunk { .. }
        )
    }
}

impl SyncManifest {
    /// The canonical encoding (postcard): the same manifest always gives the same bytes, and
    /// [`SyncManifest::decode`] accepts only these.
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self)
            .expect("postcard encodes every manifest: it holds only integers, byte arrays and ids")
    }

    /// Decodes and validates a manifest received from a peer. The caller must still compare
    /// [`SyncManifest::hash`] with the certified hash before trusting it.
    ///
    /// # Errors
    ///
    /// [`StateSyncError::ManifestTooLarge`] above [`STATE_SYNC_MANIFEST_BYTES_MAX`];
    /// [`StateSyncError::UnsupportedVersion`] for another format version;
    /// [`StateSyncError::ManifestDecode`] for bytes that are not exactly the canonical encoding of
    /// a manifest; [`StateSyncError::InvalidManifest`] for a manifest that breaks the chunk layout
    /// or a limit (chunk sizes, [`STATE_SYNC_CHUNKS_MAX`]).
    pub fn decode(bytes: &[u8]) -> Result<SyncManifest, StateSyncError> {
        if bytes.len() > STATE_SYNC_MANIFEST_BYTES_MAX {
            return Err(StateSyncError::ManifestTooLarge {
                size_bytes: bytes.len() as u64,
                max_bytes: STATE_SYNC_MANIFEST_BYTES_MAX as u64,
            });
        }
        let decode_error = |e: postcard::Error| StateSyncError::ManifestDecode {
            reason: e.to_string(),
        };
        // The version comes first, so a manifest of another version is named as such even if
        // the rest of it has a layout this replica cannot read.
        let (version, _) = postcard::take_from_bytes::<u32>(bytes).map_err(decode_error)?;
        if version != STATE_SYNC_FORMAT_VERSION {
            return Err(StateSyncError::UnsupportedVersion {
                version,
                supported: STATE_SYNC_FORMAT_VERSION,
            });
        }
        let (manifest, rest) =
            postcard::take_from_bytes::<SyncManifest>(bytes).map_err(decode_error)?;
        if !rest.is_empty() {
            return Err(StateSyncError::ManifestDecode {
                reason: format!("{} bytes after the manifest", rest.len()),
            });
        }
        if manifest.encode() != bytes {
            return Err(StateSyncError::ManifestDecode {
                reason: "not the canonical encoding of the manifest".to_string(),
            });
        }
        manifest.validate()?;
        Ok(manifest)
    }

    /// SHA-256 over `"openic-state-sync-manifest-v1"` and [`SyncManifest::encode`]: the value the
    /// subnet certifies for the state at `height`.
    pub fn hash(&self) -> [u8; 32] {
        manifest_hash_of(&self.encode())
    }

    /// Bytes of all chunks' wire forms together.
    pub fn total_bytes(&self) -> u64 {
        self.chunks
            .iter()
            .fold(0u64, |total, chunk| total.saturating_add(chunk.size_bytes))
    }

    /// Checks the format version, the limits and the chunk layout of the module documentation.
    fn validate(&self) -> Result<(), StateSyncError> {
        if self.format_version != STATE_SYNC_FORMAT_VERSION {
            return Err(StateSyncError::UnsupportedVersion {
                version: self.format_version,
                supported: STATE_SYNC_FORMAT_VERSION,
            });
        }
        let invalid = |reason: String| StateSyncError::InvalidManifest { reason };
        if self.chunks.len() > STATE_SYNC_CHUNKS_MAX as usize {
            return Err(invalid(format!(
                "{} chunks exceed the limit of {STATE_SYNC_CHUNKS_MAX}",
                self.chunks.len()
            )));
        }
        if self.chunks.is_empty() {
            return Err(invalid("the manifest has no chunks".to_string()));
        }
        let mut total_bytes = 0u64;
        let mut previous: Option<&SyncChunk> = None;
        for (index, chunk) in self.chunks.iter().enumerate() {
            check_chunk_follows(previous, chunk)
                .map_err(|reason| invalid(format!("chunk {index}: {reason}")))?;
            total_bytes = total_bytes
                .checked_add(chunk.size_bytes)
                .ok_or_else(|| invalid("the chunk sizes overflow u64".to_string()))?;
            previous = Some(chunk);
        }
        Ok(())
    }
}

fn manifest_hash_of(encoded: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(MANIFEST_DOMAIN);
    hasher.update(encoded);
    hasher.finalize().into()
}

/// Checks that `chunk` may follow `previous` in the layout of the module documentation.
fn check_chunk_follows(previous: Option<&SyncChunk>, chunk: &SyncChunk) -> Result<(), String> {
    let chunk_bytes = STATE_SYNC_CHUNK_BYTES as u64;
    let previous_full = previous.is_some_and(|p| p.size_bytes == chunk_bytes);
    let size = chunk.size_bytes;
    match &chunk.content {
        ChunkContent::StateFile { offset } => {
            if size == 0 || size > chunk_bytes {
                return Err(format!(
                    "a state file chunk of {size} bytes; it must have 1 to {chunk_bytes}"
                ));
            }
            let expected_offset = match previous.map(|p| &p.content) {
                None => 0,
                Some(ChunkContent::StateFile {
                    offset: previous_offset,
                }) => {
                    if !previous_full {
                        return Err("only the last state file chunk may be shorter".to_string());
                    }
                    previous_offset + chunk_bytes
                }
                Some(_) => return Err("state file chunks must come first".to_string()),
            };
            if *offset != expected_offset {
                return Err(format!(
                    "state file chunk at offset {offset}, expected {expected_offset}"
                ));
            }
        }
        ChunkContent::Wasm {
            module_hash,
            offset,
        } => {
            if size > chunk_bytes {
                return Err(format!(
                    "a wasm chunk of {size} bytes exceeds the limit of {chunk_bytes}"
                ));
            }
            let expected_offset = match previous.map(|p| &p.content) {
                None => return Err("the state file chunks must come first".to_string()),
                Some(ChunkContent::StateFile { .. }) => 0,
                Some(ChunkContent::Wasm {
                    module_hash: previous_hash,
                    offset: previous_offset,
                }) if previous_hash == module_hash => {
                    if !previous_full {
                        return Err("only the last chunk of a module may be shorter".to_string());
                    }
                    if size == 0 {
                        return Err("only an empty module has a chunk of 0 bytes".to_string());
                    }
                    previous_offset + chunk_bytes
                }
                Some(ChunkContent::Wasm {
                    module_hash: previous_hash,
                    ..
                }) => {
                    if module_hash < previous_hash {
                        return Err("wasm modules are not in ascending hash order".to_string());
                    }
                    0
                }
                Some(ChunkContent::Pages { .. }) => {
                    return Err("wasm chunks must come before page chunks".to_string());
                }
            };
            if *offset != expected_offset {
                return Err(format!(
                    "wasm chunk at offset {offset}, expected {expected_offset}"
                ));
            }
        }
        ChunkContent::Pages {
            canister_id,
            stable,
            first_index,
            count,
        } => {
            let count = *count as usize;
            if count == 0 || count > STATE_SYNC_PAGES_PER_CHUNK {
                return Err(format!(
                    "a page chunk of {count} pages; it must have 1 to {STATE_SYNC_PAGES_PER_CHUNK}"
                ));
            }
            let expected_size = (count * STATE_SYNC_PAGE_RECORD_BYTES) as u64;
            if size != expected_size {
                return Err(format!(
                    "a page chunk of {count} pages has {size} bytes, not {expected_size}"
                ));
            }
            if first_index.checked_add(count as u64 - 1).is_none() {
                return Err(format!(
                    "{count} pages from index {first_index} overflow the page index"
                ));
            }
            match previous.map(|p| &p.content) {
                None => return Err("the state file chunks must come first".to_string()),
                Some(ChunkContent::Pages {
                    canister_id: previous_canister,
                    stable: previous_stable,
                    first_index: previous_first,
                    count: previous_count,
                }) => {
                    let this_memory = (canister_id, stable);
                    let previous_memory = (previous_canister, previous_stable);
                    if this_memory == previous_memory {
                        if *previous_count as usize != STATE_SYNC_PAGES_PER_CHUNK {
                            return Err(
                                "only the last page chunk of a memory may be shorter".to_string()
                            );
                        }
                        // The previous chunk's pages are at least previous_first..+previous_count.
                        if u128::from(*first_index)
                            < u128::from(*previous_first) + u128::from(*previous_count)
                        {
                            return Err(format!(
                                "page chunk from index {first_index} overlaps the previous chunk \
                                 of the memory"
                            ));
                        }
                    } else if this_memory < previous_memory {
                        return Err(
                            "memories are not in order of canister id, wasm before stable"
                                .to_string(),
                        );
                    }
                }
                Some(_) => {}
            }
        }
    }
    Ok(())
}

/// Digest of a state file or wasm chunk.
fn bytes_chunk_digest(bytes: &[u8]) -> Sha256Hash {
    let mut hasher = Sha256::new();
    hasher.update(BYTES_CHUNK_DOMAIN);
    hasher.update(bytes);
    hasher.finalize().into()
}

/// Digest of a page chunk from its pages' indexes and SHA-256 hashes.
fn pages_chunk_digest<'a>(pages: impl Iterator<Item = (PageIndex, &'a Sha256Hash)>) -> Sha256Hash {
    let mut hasher = Sha256::new();
    hasher.update(PAGES_CHUNK_DOMAIN);
    for (index, hash) in pages {
        hasher.update(index.to_le_bytes());
        hasher.update(hash);
    }
    hasher.finalize().into()
}

fn memory_kind(stable: bool) -> MemoryKind {
    if stable {
        MemoryKind::Stable
    } else {
        MemoryKind::Wasm
    }
}

/// One memory of a snapshot: its pages and the indexes of its non-zero pages, ascending.
struct SnapshotMemory {
    pages: PageMap,
    indexes: Vec<PageIndex>,
}

/// The state at one height as served to peers: the manifest and everything to cut chunks from,
/// held in memory. Pages and modules are shared with the state it was built from by `Arc`.
pub struct SyncSnapshot {
    manifest: SyncManifest,
    /// `manifest.encode()`, as sent to peers.
    encoded_manifest: Arc<[u8]>,
    manifest_hash: [u8; 32],
    state_file: Vec<u8>,
    modules: BTreeMap<Sha256Hash, Arc<WasmBinary>>,
    memories: BTreeMap<(CanisterId, bool), SnapshotMemory>,
}

impl std::fmt::Debug for SyncSnapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncSnapshot")
            .field("height", &self.manifest.height)
            .field("chunks", &self.manifest.chunks.len())
            .field("total_bytes", &self.manifest.total_bytes())
            .field("manifest_hash", &hex::encode(self.manifest_hash))
            .finish()
    }
}

impl SyncSnapshot {
    /// Builds the snapshot and its manifest, hashing every page and module. Prefer
    /// [`crate::FileCheckpointStore::sync_snapshot`] right after checkpointing the state: it gives
    /// the same manifest without hashing the pages again.
    ///
    /// # Errors
    ///
    /// [`StateSyncError::UnservableState`] if the state does not survive an encode/decode round
    /// trip, a module's bytes do not hash to its module hash (a peer could not verify it), or the
    /// manifest would exceed [`STATE_SYNC_CHUNKS_MAX`] or [`STATE_SYNC_MANIFEST_BYTES_MAX`].
    pub fn new(state: ReplicatedState) -> Result<SyncSnapshot, StateSyncError> {
        build_snapshot(&state, |_, pages| {
            pages
                .pages()
                .filter(|(_, page)| !is_zero(page))
                .map(|(index, page)| (index, sha256(page)))
                .collect()
        })
    }

    /// The height of the state.
    pub fn height(&self) -> Height {
        self.manifest.height
    }

    /// The manifest.
    pub fn manifest(&self) -> &SyncManifest {
        &self.manifest
    }

    /// [`SyncManifest::hash`] of the manifest, computed once.
    pub fn manifest_hash(&self) -> [u8; 32] {
        self.manifest_hash
    }

    /// The manifest's encoding (`manifest().encode()`, kept from when the snapshot was built).
    pub fn encoded_manifest(&self) -> Arc<[u8]> {
        self.encoded_manifest.clone()
    }

    /// The wire bytes of chunk `index`, or `None` for an index beyond the manifest's chunks.
    pub fn chunk(&self, index: u32) -> Option<Vec<u8>> {
        let chunk = self.manifest.chunks.get(index as usize)?;
        let size = chunk.size_bytes as usize;
        // The indexing below cannot fail: the manifest was built from exactly these bytes and
        // pages, which the snapshot owns (or shares immutably).
        let bytes = match &chunk.content {
            ChunkContent::StateFile { offset } => {
                let start = *offset as usize;
                self.state_file[start..start + size].to_vec()
            }
            ChunkContent::Wasm {
                module_hash,
                offset,
            } => {
                let start = *offset as usize;
                self.modules[module_hash].bytes[start..start + size].to_vec()
            }
            ChunkContent::Pages {
                canister_id,
                stable,
                first_index,
                count,
            } => {
                let memory = &self.memories[&(*canister_id, *stable)];
                let start = memory.indexes.partition_point(|index| index < first_index);
                let mut wire = Vec::with_capacity(size);
                for index in &memory.indexes[start..start + *count as usize] {
                    let page = memory
                        .pages
                        .page(*index)
                        .expect("the snapshot's indexes are of its own pages");
                    wire.extend_from_slice(&index.to_le_bytes());
                    wire.extend_from_slice(page);
                }
                wire
            }
        };
        Some(bytes)
    }
}

/// Builds a snapshot of `state`; `page_hashes` gives the SHA-256 of every non-zero page of a
/// memory (computed or cached), keyed by index.
pub(crate) fn build_snapshot(
    state: &ReplicatedState,
    mut page_hashes: impl FnMut(MemoryKey, &PageMap) -> BTreeMap<PageIndex, Sha256Hash>,
) -> Result<SyncSnapshot, StateSyncError> {
    let height = state.metadata.height;
    let unservable = |reason: String| StateSyncError::UnservableState { height, reason };

    let state_file = postcard::to_allocvec(&state_without_pages(state))
        .map_err(|e| unservable(format!("the state does not encode: {e}")))?;
    check_state_encoding(&state_file).map_err(unservable)?;
    let mut chunks: Vec<SyncChunk> = state_file
        .chunks(STATE_SYNC_CHUNK_BYTES)
        .enumerate()
        .map(|(position, slice)| SyncChunk {
            content: ChunkContent::StateFile {
                offset: (position * STATE_SYNC_CHUNK_BYTES) as u64,
            },
            size_bytes: slice.len() as u64,
            digest: bytes_chunk_digest(slice),
        })
        .collect();

    let mut modules: BTreeMap<Sha256Hash, Arc<WasmBinary>> = BTreeMap::new();
    let mut memories = BTreeMap::new();
    let mut memory_digests = Vec::new();
    let mut page_chunks = Vec::new();
    for (canister_id, canister) in &state.canisters {
        let Some(execution) = &canister.execution_state else {
            continue;
        };
        modules
            .entry(execution.wasm_binary.module_hash)
            .or_insert_with(|| execution.wasm_binary.clone());
        for (kind, pages) in [
            (MemoryKind::Wasm, &execution.wasm_memory),
            (MemoryKind::Stable, &execution.stable_memory),
        ] {
            let hashes = page_hashes((*canister_id, kind), pages);
            memory_digests.push(MemoryDigest {
                canister_id: *canister_id,
                kind,
                num_pages: hashes.len() as u64,
                pages_digest: pages_digest(&hashes),
            });
            if hashes.is_empty() {
                continue;
            }
            let stable = kind == MemoryKind::Stable;
            let hashes: Vec<(PageIndex, Sha256Hash)> = hashes.into_iter().collect();
            for group in hashes.chunks(STATE_SYNC_PAGES_PER_CHUNK) {
                page_chunks.push(SyncChunk {
                    content: ChunkContent::Pages {
                        canister_id: *canister_id,
                        stable,
                        first_index: group[0].0,
                        count: group.len() as u32,
                    },
                    size_bytes: (group.len() * STATE_SYNC_PAGE_RECORD_BYTES) as u64,
                    digest: pages_chunk_digest(group.iter().map(|(index, hash)| (*index, hash))),
                });
            }
            let indexes = hashes.iter().map(|(index, _)| *index).collect();
            memories.insert(
                (*canister_id, stable),
                SnapshotMemory {
                    pages: pages.clone(),
                    indexes,
                },
            );
        }
    }

    for (module_hash, module) in &modules {
        let mut whole = Sha256::new();
        let bytes = &module.bytes;
        if bytes.is_empty() {
            chunks.push(SyncChunk {
                content: ChunkContent::Wasm {
                    module_hash: *module_hash,
                    offset: 0,
                },
                size_bytes: 0,
                digest: bytes_chunk_digest(&[]),
            });
        }
        for (position, slice) in bytes.chunks(STATE_SYNC_CHUNK_BYTES).enumerate() {
            whole.update(slice);
            chunks.push(SyncChunk {
                content: ChunkContent::Wasm {
                    module_hash: *module_hash,
                    offset: (position * STATE_SYNC_CHUNK_BYTES) as u64,
                },
                size_bytes: slice.len() as u64,
                digest: bytes_chunk_digest(slice),
            });
        }
        if <[u8; 32]>::from(whole.finalize()) != *module_hash {
            return Err(unservable(format!(
                "the bytes of wasm module {} do not hash to its module hash",
                hex::encode(module_hash)
            )));
        }
    }
    chunks.append(&mut page_chunks);

    if chunks.len() > STATE_SYNC_CHUNKS_MAX as usize {
        return Err(unservable(format!(
            "the state needs {} chunks, more than the limit of {STATE_SYNC_CHUNKS_MAX}",
            chunks.len()
        )));
    }
    let manifest = SyncManifest {
        format_version: STATE_SYNC_FORMAT_VERSION,
        height,
        state_digest: state_digest_of(
            height,
            &sha256(&state_file),
            memory_digests.into_iter(),
            modules.keys(),
        ),
        chunks,
    };
    let encoded = manifest.encode();
    if encoded.len() > STATE_SYNC_MANIFEST_BYTES_MAX {
        return Err(unservable(format!(
            "the manifest has {} bytes, more than the limit of {STATE_SYNC_MANIFEST_BYTES_MAX}",
            encoded.len()
        )));
    }
    // The manifest is built to the layout; checking it here keeps builder and validator in step.
    manifest
        .validate()
        .map_err(|e| unservable(format!("built a manifest that does not validate: {e}")))?;
    Ok(SyncSnapshot {
        manifest_hash: manifest_hash_of(&encoded),
        encoded_manifest: encoded.into(),
        manifest,
        state_file,
        modules,
        memories,
    })
}

/// Verified pages of one memory received so far.
#[derive(Default)]
struct AssembledMemory {
    pages: PageMap,
    page_hashes: BTreeMap<PageIndex, Sha256Hash>,
}

/// Collects the chunks of a certified manifest from untrusted peers and assembles the state.
pub struct SyncAssembler {
    manifest: SyncManifest,
    /// Whether chunk `i` was accepted.
    received: Vec<bool>,
    missing_count: u32,
    bytes_received: u64,
    /// Verified state file and wasm chunks, by chunk index.
    byte_chunks: BTreeMap<u32, Vec<u8>>,
    /// Verified pages, by canister and `stable`.
    memories: BTreeMap<(CanisterId, bool), AssembledMemory>,
}

impl std::fmt::Debug for SyncAssembler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyncAssembler")
            .field("height", &self.manifest.height)
            .field("chunks", &self.manifest.chunks.len())
            .field("missing", &self.missing_count)
            .field("bytes_received", &self.bytes_received)
            .finish()
    }
}

impl SyncAssembler {
    /// Starts assembling the state of `manifest`, which the caller has already checked against
    /// a certified manifest hash.
    ///
    /// # Errors
    ///
    /// [`StateSyncError::UnsupportedVersion`] or [`StateSyncError::InvalidManifest`] if the
    /// manifest breaks the format (as [`SyncManifest::decode`] checks).
    pub fn new(manifest: SyncManifest) -> Result<SyncAssembler, StateSyncError> {
        manifest.validate()?;
        let chunk_count = manifest.chunks.len();
        Ok(SyncAssembler {
            received: vec![false; chunk_count],
            missing_count: chunk_count as u32,
            bytes_received: 0,
            byte_chunks: BTreeMap::new(),
            memories: BTreeMap::new(),
            manifest,
        })
    }

    /// The manifest being assembled.
    pub fn manifest(&self) -> &SyncManifest {
        &self.manifest
    }

    /// Chunks in the manifest.
    pub fn chunk_count(&self) -> u32 {
        self.manifest.chunks.len() as u32
    }

    /// Indexes of the chunks not accepted yet, ascending.
    pub fn missing(&self) -> Vec<u32> {
        (0..self.chunk_count())
            .filter(|index| !self.received[*index as usize])
            .collect()
    }

    /// Whether every chunk has been accepted.
    pub fn is_complete(&self) -> bool {
        self.missing_count == 0
    }

    /// Wire bytes of the chunks accepted so far.
    pub fn bytes_received(&self) -> u64 {
        self.bytes_received
    }

    /// Verifies chunk `index` as received from a peer and keeps it. A chunk already accepted is
    /// ignored (`Ok`).
    ///
    /// # Errors
    ///
    /// On any error the assembler is unchanged. [`StateSyncError::ChunkIndexOutOfRange`] for an
    /// index beyond the manifest (a caller error). Bad chunks, for which
    /// [`StateSyncError::is_bad_chunk`] holds and which should be fetched from another peer:
    /// [`StateSyncError::ChunkSizeMismatch`], [`StateSyncError::MalformedChunk`] (a page chunk
    /// whose indexes are not strictly increasing from its `first_index`, reach into the next
    /// chunk's range, or that holds an all-zero page) and
    /// [`StateSyncError::ChunkDigestMismatch`].
    pub fn add_chunk(&mut self, index: u32, bytes: &[u8]) -> Result<(), StateSyncError> {
        let chunk_count = self.chunk_count();
        let position = index as usize;
        let Some(chunk) = self.manifest.chunks.get(position) else {
            return Err(StateSyncError::ChunkIndexOutOfRange { index, chunk_count });
        };
        if self.received[position] {
            return Ok(());
        }
        if bytes.len() as u64 != chunk.size_bytes {
            return Err(StateSyncError::ChunkSizeMismatch {
                index,
                expected_bytes: chunk.size_bytes,
                actual_bytes: bytes.len() as u64,
            });
        }
        match &chunk.content {
            ChunkContent::StateFile { .. } | ChunkContent::Wasm { .. } => {
                if bytes_chunk_digest(bytes) != chunk.digest {
                    return Err(StateSyncError::ChunkDigestMismatch { index });
                }
                self.byte_chunks.insert(index, bytes.to_vec());
            }
            ChunkContent::Pages {
                canister_id,
                stable,
                first_index,
                ..
            } => {
                let range_end = match self.manifest.chunks.get(position + 1).map(|c| &c.content) {
                    Some(ChunkContent::Pages {
                        canister_id: next_canister,
                        stable: next_stable,
                        first_index: next_first,
                        ..
                    }) if next_canister == canister_id && next_stable == stable => {
                        Some(*next_first)
                    }
                    _ => None,
                };
                let pages = verify_page_chunk(index, bytes, *first_index, range_end)?;
                let digest = pages_chunk_digest(pages.iter().map(|(i, _, hash)| (*i, hash)));
                if digest != chunk.digest {
                    return Err(StateSyncError::ChunkDigestMismatch { index });
                }
                let memory = self.memories.entry((*canister_id, *stable)).or_default();
                for (page_index, page, hash) in pages {
                    memory.pages.set_page(page_index, page);
                    memory.page_hashes.insert(page_index, hash);
                }
            }
        }
        self.bytes_received += chunk.size_bytes;
        self.received[position] = true;
        self.missing_count -= 1;
        Ok(())
    }

    /// Assembles the state: decodes the state file, checks every module's SHA-256, attaches
    /// modules and memories to the canisters, and checks the height and that the state's
    /// checkpoint digest is the manifest's. The state is ready for `write_checkpoint`, whose
    /// checkpoint then has the manifest's `state_digest`.
    ///
    /// # Errors
    ///
    /// [`StateSyncError::Incomplete`] if chunks are missing;
    /// [`StateSyncError::InconsistentState`] if the state file does not decode or is not in the
    /// canonical encoding, its height is not the manifest's, a module's bytes do not hash to its
    /// module hash, a canister's module is not in the manifest, or the manifest has a module or
    /// pages no canister with a module uses; [`StateSyncError::StateDigestMismatch`] if the
    /// assembled state's digest is not the manifest's.
    pub fn finish(mut self) -> Result<ReplicatedState, StateSyncError> {
        if !self.is_complete() {
            return Err(StateSyncError::Incomplete {
                missing: self.missing_count,
                chunk_count: self.chunk_count(),
            });
        }
        let height = self.manifest.height;
        let inconsistent = |reason: String| StateSyncError::InconsistentState { height, reason };

        // Concatenate files and modules, dropping each chunk once copied. The sizes come from
        // the certified manifest.
        let mut state_file_bytes = 0u64;
        let mut module_sizes: BTreeMap<Sha256Hash, u64> = BTreeMap::new();
        for chunk in &self.manifest.chunks {
            match &chunk.content {
                ChunkContent::StateFile { .. } => state_file_bytes += chunk.size_bytes,
                ChunkContent::Wasm { module_hash, .. } => {
                    *module_sizes.entry(*module_hash).or_default() += chunk.size_bytes;
                }
                ChunkContent::Pages { .. } => {}
            }
        }
        let mut state_file = Vec::with_capacity(state_file_bytes as usize);
        let mut module_bytes: BTreeMap<Sha256Hash, Vec<u8>> = BTreeMap::new();
        for (position, chunk) in self.manifest.chunks.iter().enumerate() {
            let target = match &chunk.content {
                ChunkContent::StateFile { .. } => &mut state_file,
                ChunkContent::Wasm { module_hash, .. } => module_bytes
                    .entry(*module_hash)
                    .or_insert_with(|| Vec::with_capacity(module_sizes[module_hash] as usize)),
                ChunkContent::Pages { .. } => continue,
            };
            let bytes = self
                .byte_chunks
                .remove(&(position as u32))
                .expect("a complete assembler holds every byte chunk");
            target.extend_from_slice(&bytes);
        }

        let mut modules: BTreeMap<Sha256Hash, Arc<WasmBinary>> = BTreeMap::new();
        for (module_hash, bytes) in module_bytes {
            if sha256(&bytes) != module_hash {
                return Err(inconsistent(format!(
                    "the bytes of wasm module {} do not hash to its module hash",
                    hex::encode(module_hash)
                )));
            }
            modules.insert(module_hash, Arc::new(WasmBinary { bytes, module_hash }));
        }

        let mut state: ReplicatedState = postcard::from_bytes(&state_file)
            .map_err(|e| inconsistent(format!("the state file does not decode: {e}")))?;
        if state.metadata.height != height {
            return Err(inconsistent(format!(
                "the state file is at height {}",
                state.metadata.height
            )));
        }

        let mut used_modules = BTreeSet::new();
        let mut memory_digests = Vec::new();
        for (canister_id, canister) in state.canisters.iter_mut() {
            if canister.execution_state.is_none() {
                continue;
            }
            let canister = Arc::make_mut(canister);
            let Some(execution) = canister.execution_state.as_mut() else {
                continue;
            };
            let module_hash = execution.wasm_binary.module_hash;
            let module = modules.get(&module_hash).ok_or_else(|| {
                inconsistent(format!(
                    "canister {canister_id}'s module {} is not in the manifest",
                    hex::encode(module_hash)
                ))
            })?;
            execution.wasm_binary = module.clone();
            used_modules.insert(module_hash);
            for kind in [MemoryKind::Wasm, MemoryKind::Stable] {
                let stable = kind == MemoryKind::Stable;
                let memory = self
                    .memories
                    .remove(&(*canister_id, stable))
                    .unwrap_or_default();
                memory_digests.push(MemoryDigest {
                    canister_id: *canister_id,
                    kind,
                    num_pages: memory.page_hashes.len() as u64,
                    pages_digest: pages_digest(&memory.page_hashes),
                });
                let target = if stable {
                    &mut execution.stable_memory
                } else {
                    &mut execution.wasm_memory
                };
                *target = memory.pages;
            }
        }
        if let Some((canister_id, stable)) = self.memories.keys().next() {
            return Err(inconsistent(format!(
                "the manifest has pages of the {} memory of canister {canister_id}, which has no \
                 module in the state",
                memory_kind(*stable).as_str()
            )));
        }
        if let Some(unused) = modules.keys().find(|hash| !used_modules.contains(*hash)) {
            return Err(inconsistent(format!(
                "the manifest has wasm module {}, which no canister uses",
                hex::encode(unused)
            )));
        }

        // The state file must be exactly what write_checkpoint will write for this state, or the
        // checkpoint would have another digest than the certified one.
        let encoded = postcard::to_allocvec(&state_without_pages(&state))
            .map_err(|e| inconsistent(format!("the state does not encode again: {e}")))?;
        if encoded != state_file {
            return Err(inconsistent(
                "the state file is not the canonical encoding of the state it holds".to_string(),
            ));
        }
        drop(state_file);
        let digest = state_digest_of(
            height,
            &sha256(&encoded),
            memory_digests.into_iter(),
            modules.keys(),
        );
        if digest != self.manifest.state_digest {
            return Err(StateSyncError::StateDigestMismatch {
                height,
                expected: hex::encode(self.manifest.state_digest),
                actual: hex::encode(digest),
            });
        }
        Ok(state)
    }
}

/// Checks the structure of page chunk `index` (the size was checked against the manifest) and
/// hashes its pages: `(index, page, SHA-256)` for each.
fn verify_page_chunk(
    index: u32,
    bytes: &[u8],
    first_index: PageIndex,
    range_end: Option<PageIndex>,
) -> Result<Vec<(PageIndex, &Page, Sha256Hash)>, StateSyncError> {
    let malformed = |reason: String| StateSyncError::MalformedChunk { index, reason };
    let mut pages = Vec::with_capacity(bytes.len() / STATE_SYNC_PAGE_RECORD_BYTES);
    let mut previous: Option<PageIndex> = None;
    for record in bytes.chunks(STATE_SYNC_PAGE_RECORD_BYTES) {
        let (index_bytes, page) = record.split_at(8);
        let page_index = u64::from_le_bytes(index_bytes.try_into().expect("8 bytes"));
        let page: &Page = page
            .try_into()
            .map_err(|_| malformed("the last page record is cut short".to_string()))?;
        match previous {
            None if page_index != first_index => {
                return Err(malformed(format!(
                    "the first page has index {page_index}, the manifest says {first_index}"
                )));
            }
            Some(previous) if page_index <= previous => {
                return Err(malformed(format!(
                    "page indexes are not strictly increasing ({previous} then {page_index})"
                )));
            }
            _ => {}
        }
        if let Some(end) = range_end
            && page_index >= end
        {
            return Err(malformed(format!(
                "page index {page_index} is beyond the chunk's range (the next chunk starts at \
                 {end})"
            )));
        }
        if is_zero(page) {
            return Err(malformed(format!(
                "page {page_index} is all zeros (zero pages are never sent)"
            )));
        }
        previous = Some(page_index);
        pages.push((page_index, page, sha256(page)));
    }
    Ok(pages)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FileCheckpointStore;
    use openic_interfaces::CheckpointStore;
    use openic_replicated_state::{
        CanisterState, ExecutionState, GlobalValue, ModuleInfo, SystemState,
    };
    use openic_types::{Cycles, Principal, SubnetId, Time};

    fn module(bytes: Vec<u8>) -> Arc<WasmBinary> {
        Arc::new(WasmBinary {
            module_hash: sha256(&bytes),
            bytes,
        })
    }

    fn page_of(value: u8) -> Page {
        [value; PAGE_SIZE]
    }

    fn canister(
        n: u64,
        wasm: Arc<WasmBinary>,
        wasm_memory: PageMap,
        stable_memory: PageMap,
    ) -> CanisterState {
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
                wasm_memory,
                wasm_memory_size_pages: 40,
                stable_memory,
                stable_memory_size_pages: 2,
                globals: vec![GlobalValue::V128(u128::MAX - 5), GlobalValue::I32(-3)],
            }),
        }
    }

    /// Canister 1: a heap of 300 pages with a gap and a far page, a stable memory, and a module
    /// of more than one chunk shared with canister 2 (empty stable memory); canister 3: an empty
    /// module and empty memories; canister 4: no module. The state file is more than one chunk.
    fn state(height: u64) -> ReplicatedState {
        let mut state = ReplicatedState::new(
            SubnetId(Principal::from_slice(&[9; 29])),
            openic_types::ids::FIRST_USER_CANISTER_INDEX,
            [7; 32],
        );
        state.metadata.height = Height(height);
        state.metadata.time = Time(1_000 + height);
        state.metadata.consumed_cycles_total = u128::MAX - 1;

        let big_module = module(
            (0..STATE_SYNC_CHUNK_BYTES + 1234)
                .map(|i| i as u8)
                .collect(),
        );
        let mut heap = PageMap::new();
        for index in (0..310u64).filter(|i| !(100..110).contains(i)) {
            heap.set_page(index, &page_of((index % 251) as u8 + 1));
        }
        heap.set_page(1 << 20, &page_of(42));
        let mut stable = PageMap::new();
        for index in [0u64, 3, 4, 9] {
            stable.set_page(index, &page_of(200 + index as u8));
        }
        let mut first = canister(1, big_module.clone(), heap, stable);
        first.system_state.certified_data = (0..STATE_SYNC_CHUNK_BYTES + 77)
            .map(|i| (i % 13) as u8)
            .collect();
        state.put_canister(first);

        let mut small_heap = PageMap::new();
        small_heap.set_page(7, &page_of(9));
        state.put_canister(canister(2, big_module, small_heap, PageMap::new()));
        state.put_canister(canister(
            3,
            module(Vec::new()),
            PageMap::new(),
            PageMap::new(),
        ));
        state.put_canister(CanisterState {
            system_state: SystemState::new(
                CanisterId::from_u64(4),
                Default::default(),
                Cycles(10),
                Time(1),
            ),
            execution_state: None,
        });
        state.deleted_canisters.insert(CanisterId::from_u64(77));
        state
    }

    fn assert_same(a: &ReplicatedState, b: &ReplicatedState) {
        assert_eq!(a.metadata, b.metadata);
        assert_eq!(a.canisters, b.canisters);
        assert_eq!(a.ingress_history, b.ingress_history);
        assert_eq!(a.deleted_canisters, b.deleted_canisters);
        assert_eq!(
            postcard::to_allocvec(a).unwrap(),
            postcard::to_allocvec(b).unwrap()
        );
    }

    fn open(dir: &std::path::Path) -> FileCheckpointStore {
        FileCheckpointStore::open(dir, crate::CheckpointConfig::default()).unwrap()
    }

    /// Feeds every chunk of `snapshot`, last first, into a new assembler.
    fn assemble(snapshot: &SyncSnapshot) -> SyncAssembler {
        let mut assembler = SyncAssembler::new(snapshot.manifest().clone()).unwrap();
        let count = assembler.chunk_count();
        for index in (0..count).rev() {
            assembler
                .add_chunk(index, &snapshot.chunk(index).unwrap())
                .unwrap();
        }
        assembler
    }

    fn first_chunk(manifest: &SyncManifest, wanted: impl Fn(&ChunkContent) -> bool) -> u32 {
        manifest
            .chunks
            .iter()
            .position(|c| wanted(&c.content))
            .unwrap() as u32
    }

    #[test]
    fn round_trip_gives_the_original_state() {
        let original = state(12);
        let snapshot = SyncSnapshot::new(original.clone()).unwrap();
        let manifest = snapshot.manifest();
        assert_eq!(snapshot.height(), Height(12));
        assert_eq!(snapshot.manifest_hash(), manifest.hash());
        assert_eq!(SyncManifest::decode(&manifest.encode()).unwrap(), *manifest);
        // Layout: 2 state file chunks, 2 + 1 wasm chunks (the empty module has one of 0 bytes),
        // heap 300 + 1 pages in 2 chunks, 1 stable chunk, 1 chunk for canister 2's heap.
        let kinds: Vec<&str> = manifest
            .chunks
            .iter()
            .map(|c| match c.content {
                ChunkContent::StateFile { .. } => "state",
                ChunkContent::Wasm { .. } => "wasm",
                ChunkContent::Pages { .. } => "pages",
            })
            .collect();
        assert_eq!(
            kinds,
            [
                "state", "state", "wasm", "wasm", "wasm", "pages", "pages", "pages", "pages"
            ]
        );
        assert_eq!(
            manifest.chunks.iter().filter(|c| c.size_bytes == 0).count(),
            1
        );
        let mut expected_bytes = 0;
        for index in 0..manifest.chunks.len() as u32 {
            let bytes = snapshot.chunk(index).unwrap();
            assert!(bytes.len() <= STATE_SYNC_CHUNK_WIRE_BYTES_MAX);
            expected_bytes += bytes.len() as u64;
        }
        assert_eq!(manifest.total_bytes(), expected_bytes);
        assert_eq!(snapshot.chunk(manifest.chunks.len() as u32), None);

        let assembler = assemble(&snapshot);
        assert!(assembler.is_complete());
        assert!(assembler.missing().is_empty());
        assert_eq!(assembler.bytes_received(), manifest.total_bytes());
        let synced = assembler.finish().unwrap();
        assert_same(&synced, &original);
        let module_of = |n| {
            synced.canisters[&CanisterId::from_u64(n)]
                .execution_state
                .as_ref()
                .unwrap()
                .wasm_binary
                .clone()
        };
        assert!(Arc::ptr_eq(&module_of(1), &module_of(2)));

        // The synced state checkpoints and loads again, and its checkpoint serves the same
        // manifest.
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        store.write_checkpoint(&synced).unwrap();
        assert_eq!(
            store.sync_snapshot(&synced).unwrap().manifest_hash(),
            snapshot.manifest_hash()
        );
        let loaded = open(dir.path()).load_latest().unwrap().unwrap();
        assert_same(&loaded, &original);

        // The checkpoint digest of the synced state is the one of a checkpoint of the original:
        // writing the original again at the same height is accepted as the same state.
        let other_dir = tempfile::tempdir().unwrap();
        open(other_dir.path()).write_checkpoint(&original).unwrap();
        open(other_dir.path()).write_checkpoint(&synced).unwrap();
    }

    #[test]
    fn store_snapshot_equals_the_hashing_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = open(dir.path());
        let mut current = state(3);
        store.write_checkpoint(&current).unwrap();
        let from_store = store.sync_snapshot(&current).unwrap();
        let hashed = SyncSnapshot::new(current.clone()).unwrap();
        assert_eq!(from_store.manifest(), hashed.manifest());
        assert_eq!(from_store.manifest_hash(), hashed.manifest_hash());
        let first_hash = hashed.manifest_hash();

        // An incremental checkpoint: a few pages changed, one removed, one added.
        current.metadata.height = Height(4);
        {
            let canister = current.canister_mut(&CanisterId::from_u64(1)).unwrap();
            let execution = canister.execution_state.as_mut().unwrap();
            execution.wasm_memory.set_page(0, &page_of(250));
            execution.wasm_memory.set_page(5, &[0; PAGE_SIZE]);
            execution.wasm_memory.set_page(105, &page_of(3));
            execution.stable_memory.set_page(4, &page_of(1));
        }
        store.write_checkpoint(&current).unwrap();
        let from_store = store.sync_snapshot(&current).unwrap();
        let hashed = SyncSnapshot::new(current.clone()).unwrap();
        assert_eq!(from_store.manifest(), hashed.manifest());
        assert_eq!(from_store.manifest_hash(), hashed.manifest_hash());
        assert_ne!(hashed.manifest_hash(), first_hash);
        for index in 0..hashed.manifest().chunks.len() as u32 {
            assert_eq!(from_store.chunk(index), hashed.chunk(index));
        }

        // After a load, too; and a state the store has not seen falls back to hashing.
        let mut reopened = open(dir.path());
        let loaded = reopened.load_latest().unwrap().unwrap();
        assert_eq!(
            reopened.sync_snapshot(&loaded).unwrap().manifest_hash(),
            hashed.manifest_hash()
        );
        let unseen = state(9);
        assert_eq!(
            reopened.sync_snapshot(&unseen).unwrap().manifest_hash(),
            SyncSnapshot::new(unseen).unwrap().manifest_hash()
        );
        assert_same(&assemble(&from_store).finish().unwrap(), &current);
    }

    #[test]
    fn bad_chunks_are_refused_and_leave_the_assembler_unchanged() {
        let snapshot = SyncSnapshot::new(state(5)).unwrap();
        let manifest = snapshot.manifest().clone();
        let mut assembler = SyncAssembler::new(manifest.clone()).unwrap();
        let count = assembler.chunk_count();
        let all: Vec<u32> = (0..count).collect();

        let mut refuse = |index: u32, bytes: &[u8], expected: &str| {
            let error = assembler.add_chunk(index, bytes).unwrap_err();
            assert!(error.is_bad_chunk(), "{error}");
            assert!(error.to_string().contains(expected), "{error}");
            assert!(
                error.to_string().contains(&format!("chunk {index}")),
                "{error}"
            );
            assert_eq!(assembler.missing(), all);
            assert_eq!(assembler.bytes_received(), 0);
        };

        // A flipped byte and a wrong length in a state file chunk.
        let mut bytes = snapshot.chunk(0).unwrap();
        bytes[10] ^= 1;
        refuse(0, &bytes, "digest");
        bytes[10] ^= 1;
        refuse(0, &bytes[1..], "bytes, the manifest says");

        // The heap's first page chunk: 256 pages from 0, the next chunk starts at 266.
        let heap = first_chunk(&manifest, |c| matches!(c, ChunkContent::Pages { .. }));
        let good = snapshot.chunk(heap).unwrap();
        let record = STATE_SYNC_PAGE_RECORD_BYTES;
        let set_index = |bytes: &mut Vec<u8>, position: usize, index: u64| {
            bytes[position * record..position * record + 8].copy_from_slice(&index.to_le_bytes());
        };
        let mut bytes = good.clone();
        set_index(&mut bytes, 255, 266);
        refuse(heap, &bytes, "beyond the chunk's range");
        let mut bytes = good.clone();
        set_index(&mut bytes, 0, 1);
        refuse(heap, &bytes, "the first page has index 1");
        let mut bytes = good.clone();
        set_index(&mut bytes, 2, 1);
        refuse(heap, &bytes, "not strictly increasing");
        let mut bytes = good.clone();
        bytes[3 * record + 8..4 * record].fill(0);
        refuse(heap, &bytes, "all zeros");
        let mut bytes = good.clone();
        bytes[4 * record + 100] ^= 0x80;
        refuse(heap, &bytes, "digest");
        refuse(
            heap,
            &good[..good.len() - record],
            "bytes, the manifest says",
        );

        let error = assembler.add_chunk(count, &good).unwrap_err();
        assert!(matches!(error, StateSyncError::ChunkIndexOutOfRange { .. }));
        assert!(!error.is_bad_chunk());

        // The right chunks are accepted afterwards; a duplicate is ignored.
        for index in (0..count).rev() {
            assembler
                .add_chunk(index, &snapshot.chunk(index).unwrap())
                .unwrap();
            assembler.add_chunk(index, &[1, 2, 3]).unwrap();
        }
        assert_eq!(assembler.bytes_received(), manifest.total_bytes());
        assert_same(&assembler.finish().unwrap(), &state(5));
    }

    #[test]
    fn an_incomplete_assembler_does_not_finish() {
        let snapshot = SyncSnapshot::new(state(5)).unwrap();
        let mut assembler = SyncAssembler::new(snapshot.manifest().clone()).unwrap();
        assembler.add_chunk(1, &snapshot.chunk(1).unwrap()).unwrap();
        assert_eq!(assembler.missing()[..2], [0, 2]);
        assert!(!assembler.is_complete());
        let error = assembler.finish().unwrap_err();
        assert!(
            matches!(error, StateSyncError::Incomplete { .. }),
            "{error}"
        );
    }

    #[test]
    fn finish_refuses_a_state_digest_that_does_not_match() {
        let snapshot = SyncSnapshot::new(state(6)).unwrap();
        let mut manifest = snapshot.manifest().clone();
        manifest.state_digest[0] ^= 1;
        let mut assembler = SyncAssembler::new(manifest).unwrap();
        for index in 0..assembler.chunk_count() {
            assembler
                .add_chunk(index, &snapshot.chunk(index).unwrap())
                .unwrap();
        }
        let error = assembler.finish().unwrap_err();
        assert!(
            matches!(error, StateSyncError::StateDigestMismatch { .. }),
            "{error}"
        );

        // A manifest for another height than its state file's is refused too.
        let mut manifest = snapshot.manifest().clone();
        manifest.height = Height(7);
        let mut assembler = SyncAssembler::new(manifest).unwrap();
        for index in 0..assembler.chunk_count() {
            assembler
                .add_chunk(index, &snapshot.chunk(index).unwrap())
                .unwrap();
        }
        let error = assembler.finish().unwrap_err();
        assert!(error.to_string().contains("at height 6"), "{error}");
    }

    #[test]
    fn manifest_decode_refuses_garbage_oversize_and_bad_layouts() {
        let snapshot = SyncSnapshot::new(state(8)).unwrap();
        let manifest = snapshot.manifest().clone();
        let encoded = manifest.encode();

        let garbage: Vec<u8> = (0..200u32).map(|i| (i * 37 % 256) as u8).collect();
        assert!(SyncManifest::decode(&garbage).is_err());
        assert!(SyncManifest::decode(&[]).is_err());
        assert!(SyncManifest::decode(&encoded[..encoded.len() - 1]).is_err());
        let mut trailing = encoded.clone();
        trailing.push(0);
        let error = SyncManifest::decode(&trailing).unwrap_err();
        assert!(error.to_string().contains("after the manifest"), "{error}");
        let error = SyncManifest::decode(&vec![0; STATE_SYNC_MANIFEST_BYTES_MAX + 1]).unwrap_err();
        assert!(
            matches!(error, StateSyncError::ManifestTooLarge { .. }),
            "{error}"
        );

        let refused = |edit: &dyn Fn(&mut SyncManifest)| {
            let mut edited = manifest.clone();
            edit(&mut edited);
            let error = SyncManifest::decode(&edited.encode()).unwrap_err();
            assert!(SyncAssembler::new(edited).is_err());
            error
        };
        let error = refused(&|m| m.format_version = STATE_SYNC_FORMAT_VERSION + 1);
        assert!(
            matches!(error, StateSyncError::UnsupportedVersion { version, .. }
                if version == STATE_SYNC_FORMAT_VERSION + 1),
            "{error}"
        );
        let error = refused(&|m| m.chunks[0].size_bytes = STATE_SYNC_CHUNK_BYTES as u64 + 1);
        assert!(error.to_string().contains("must have 1 to"), "{error}");
        let pages = first_chunk(&manifest, |c| matches!(c, ChunkContent::Pages { .. })) as usize;
        let error = refused(&|m| {
            if let ChunkContent::Pages { count, .. } = &mut m.chunks[pages].content {
                *count = STATE_SYNC_PAGES_PER_CHUNK as u32 + 1;
            }
            m.chunks[pages].size_bytes += STATE_SYNC_PAGE_RECORD_BYTES as u64;
        });
        assert!(
            error.to_string().contains("page chunk of 257 pages"),
            "{error}"
        );
        let error = refused(&|m| m.chunks.swap(0, 1));
        assert!(error.to_string().contains("offset"), "{error}");
        let error = refused(&|m| m.chunks.swap(pages, pages + 1));
        assert!(error.to_string().contains("may be shorter"), "{error}");
        let error = refused(&|m| {
            if let ChunkContent::Pages { first_index, .. } = &mut m.chunks[pages + 1].content {
                *first_index = 255;
            }
        });
        assert!(error.to_string().contains("overlaps"), "{error}");
        let error = refused(&|m| m.chunks.truncate(0));
        assert!(error.to_string().contains("no chunks"), "{error}");
        let error = refused(&|m| {
            let chunk = m.chunks[0].clone();
            m.chunks = (0..=STATE_SYNC_CHUNKS_MAX as u64)
                .map(|i| SyncChunk {
                    content: ChunkContent::StateFile {
                        offset: i * STATE_SYNC_CHUNK_BYTES as u64,
                    },
                    ..chunk.clone()
                })
                .collect();
        });
        assert!(error.to_string().contains("exceed the limit"), "{error}");
    }

    /// The fields of the manifest's last chunk, a page chunk.
    fn page_chunk(manifest: &mut SyncManifest) -> (&mut CanisterId, &mut bool, &mut u64, &mut u32) {
        match &mut manifest.chunks.last_mut().unwrap().content {
            ChunkContent::Pages {
                canister_id,
                stable,
                first_index,
                count,
            } => (canister_id, stable, first_index, count),
            other => panic!("not a page chunk: {other:?}"),
        }
    }

    #[test]
    fn manifest_hash_covers_every_field() {
        let manifest = SyncSnapshot::new(state(8)).unwrap().manifest().clone();
        let original = manifest.hash();
        type Edit = Box<dyn Fn(&mut SyncManifest)>;
        let edits: Vec<Edit> = vec![
            Box::new(|m| m.format_version += 1),
            Box::new(|m| m.height = Height(9)),
            Box::new(|m| m.state_digest[31] ^= 1),
            Box::new(|m| m.chunks[0].size_bytes -= 1),
            Box::new(|m| m.chunks[0].digest[0] ^= 1),
            Box::new(|m| {
                m.chunks.pop();
            }),
            Box::new(|m| {
                if let ChunkContent::StateFile { offset } = &mut m.chunks[1].content {
                    *offset += 1;
                }
            }),
            Box::new(|m| {
                if let ChunkContent::Wasm { module_hash, .. } = &mut m.chunks[2].content {
                    module_hash[0] ^= 1;
                }
            }),
            Box::new(|m| page_chunk(m).0.clone_from(&CanisterId::from_u64(99))),
            Box::new(|m| *page_chunk(m).1 ^= true),
            Box::new(|m| *page_chunk(m).2 += 1),
            Box::new(|m| *page_chunk(m).3 += 1),
        ];
        for edit in edits {
            let mut edited = manifest.clone();
            edit(&mut edited);
            assert_ne!(edited, manifest);
            assert_ne!(edited.hash(), original, "{edited:?}");
        }
    }
}
