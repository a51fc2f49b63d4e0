//! State sync between the replicas of a subnet: catch-up checkpoints the subnet signs, and the
//! protocol that lets a replica which lost its state (or fell far behind, or diverged) fetch one
//! from its peers instead of replaying every block since genesis.
//!
//! # Catch-up checkpoints
//!
//! Every replica writes a checkpoint at each height that is a multiple of the genesis file's
//! `catch_up_interval_heights`, builds the checkpoint's state-sync manifest
//! ([`openic_state_manager::state_sync`]: every chunk of the state with its digest, the same on
//! every replica for the same state) and signs, with its share of the subnet key, the *catch-up
//! statement* `(height, catch_up_root)` where `catch_up_root = SHA-256(domain · manifest hash ·
//! digest of the finalized block at that height)`. Shares travel on the same channel as
//! certification shares; `2f + 1` of them give the subnet's signature, which no replica can forge:
//! a peer that serves the state can lie about nothing the fetching replica does not check.
//!
//! # Protocol (p2p channel [`openic_consensus::subnet::STATE_SYNC_CHANNEL`])
//!
//! - Every [`ADVERT_INTERVAL`] each replica sends its latest signed catch-up statement
//!   ([`Advert`]) to all peers.
//! - A replica that sees a verified advert at least one interval above its executed height (or
//!   above the height where its state diverged) starts a fetch: it asks a peer that advertised that
//!   height for the manifest, checks the manifest's hash against the advert, and checks the
//!   finalization certificate of the block the advert names; then it asks the peers that
//!   advertised the height for the chunks, [`CHUNKS_IN_FLIGHT`] at a time, verifying each against
//!   the manifest and asking another peer after [`REQUEST_TIMEOUT`] or a bad chunk.
//! - When every chunk is in, the state is assembled and checked against the manifest's state
//!   digest, then handed to the execution thread, which writes it as a checkpoint, moves the
//!   consensus engine's delivery floor to that block and continues with the next height.
//!
//! While a fetch is under way the execution thread stops replaying old blocks (replay would race
//! the fetch for nothing). A fetch that fails ([`FETCH_ATTEMPTS_MAX`] times) gives up until a newer
//! advert arrives, and replay resumes.
//!
//! Every message from a peer is bounded and decoded with checks; a peer that sends garbage, a bad
//! chunk or a manifest that does not match the signed statement is logged and avoided for the rest
//! of the fetch, never trusted.

use crate::metrics::NodeMetrics;
use openic_consensus::bft::FloorControl;
use openic_consensus::certifier::{
    CertificationPool, CertificationPoolConfig, KeyShare, PartialSignature, PoolEvent,
    PublicSharing, Statement, sign_statement, verify_group_signature,
};
use openic_consensus::subnet::{STATE_SYNC_MESSAGE_BYTES_MAX, SubnetService};
use openic_replicated_state::ReplicatedState;
use openic_state_manager::state_sync::{SyncAssembler, SyncManifest, SyncSnapshot};
use openic_types::Height;
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How often a replica re-sends its latest signed catch-up statement to its peers.
pub(crate) const ADVERT_INTERVAL: Duration = Duration::from_secs(2);

/// How long a manifest or chunk request may go unanswered before it is sent to another peer.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Chunk requests outstanding at once (each answer is up to about 1 MiB).
pub(crate) const CHUNKS_IN_FLIGHT: usize = 16;

/// A replica fetches the state when it is at least this many catch-up intervals behind the
/// subnet's latest signed checkpoint; closer than that, replaying the blocks is cheaper than
/// fetching a large state.
pub(crate) const SYNC_LAG_INTERVALS: u64 = 3;

/// Fetches of one advertised height before giving up on it.
pub(crate) const FETCH_ATTEMPTS_MAX: u32 = 3;

/// Own catch-up checkpoints kept while waiting for the subnet's signature.
const CANDIDATES_MAX: usize = 2;

/// Certified catch-up checkpoints a replica serves (the latest ones): a fetch that takes longer
/// than an interval can finish from an older one.
const SERVED_MAX: usize = 3;

/// A fetch in progress is replaced by a newer advert only this many intervals newer (so a large
/// state can finish while peers still serve it, see [`SERVED_MAX`]).
const SWITCH_INTERVALS: u64 = 2;

/// A fetch with no accepted chunk or manifest for this long fails (all its peers went silent).
const NO_PROGRESS_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a peer's adverts are ignored after one with a bad signature (each costs a pairing).
const BAD_ADVERT_PENALTY: Duration = Duration::from_secs(10);

/// Domain separator of [`catch_up_root`].
const CATCH_UP_ROOT_DOMAIN: &[u8] = b"openic-catch-up-root-v1";

/// What the subnet signs about a catch-up checkpoint: its manifest hash bound to the finalized
/// block it follows (so a fetching replica knows where consensus continues).
pub(crate) fn catch_up_root(manifest_hash: &[u8; 32], block_digest: &[u8; 32]) -> [u8; 32] {
    let mut hasher = Sha256::new();
    hasher.update(CATCH_UP_ROOT_DOMAIN);
    hasher.update(manifest_hash);
    hasher.update(block_digest);
    hasher.finalize().into()
}

/// A signed catch-up statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Advert {
    pub(crate) height: u64,
    pub(crate) manifest_hash: [u8; 32],
    pub(crate) block_digest: [u8; 32],
    pub(crate) signature: [u8; 48],
}

impl Advert {
    fn verify(&self, sharing: &PublicSharing) -> bool {
        verify_group_signature(
            sharing,
            Statement::CatchUp,
            Height(self.height),
            &catch_up_root(&self.manifest_hash, &self.block_digest),
            &self.signature,
        )
    }
}

/// A state-sync message on the wire: a tag byte, then big-endian fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum SyncMessage {
    Advert(Advert),
    ManifestRequest {
        height: u64,
    },
    Manifest {
        height: u64,
        manifest: Vec<u8>,
        finalization: Vec<u8>,
    },
    ChunkRequest {
        height: u64,
        index: u32,
    },
    Chunk {
        height: u64,
        index: u32,
        bytes: Vec<u8>,
    },
    /// The sender no longer (or does not yet) serve this height.
    Unavailable {
        height: u64,
    },
}

const TAG_ADVERT: u8 = 1;
const TAG_MANIFEST_REQUEST: u8 = 2;
const TAG_MANIFEST: u8 = 3;
const TAG_CHUNK_REQUEST: u8 = 4;
const TAG_CHUNK: u8 = 5;
const TAG_UNAVAILABLE: u8 = 6;

/// Reads fixed-size big-endian fields from untrusted bytes.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.0.len() < n {
            return Err("truncated state-sync message".into());
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], String> {
        let bytes = self.take(N)?;
        let mut array = [0u8; N];
        array.copy_from_slice(bytes);
        Ok(array)
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn sized(&mut self) -> Result<&'a [u8], String> {
        let length = self.u32()? as usize;
        self.take(length)
    }
    fn end(&self) -> Result<(), String> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err("trailing bytes after a state-sync message".into())
        }
    }
}

impl SyncMessage {
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        match self {
            SyncMessage::Advert(advert) => {
                out.push(TAG_ADVERT);
                out.extend_from_slice(&advert.height.to_be_bytes());
                out.extend_from_slice(&advert.manifest_hash);
                out.extend_from_slice(&advert.block_digest);
                out.extend_from_slice(&advert.signature);
            }
            SyncMessage::ManifestRequest { height } => {
                out.push(TAG_MANIFEST_REQUEST);
                out.extend_from_slice(&height.to_be_bytes());
            }
            SyncMessage::Manifest {
                height,
                manifest,
                finalization,
            } => {
                out.push(TAG_MANIFEST);
                out.extend_from_slice(&height.to_be_bytes());
                out.extend_from_slice(&(manifest.len() as u32).to_be_bytes());
                out.extend_from_slice(manifest);
                out.extend_from_slice(&(finalization.len() as u32).to_be_bytes());
                out.extend_from_slice(finalization);
            }
            SyncMessage::ChunkRequest { height, index } => {
                out.push(TAG_CHUNK_REQUEST);
                out.extend_from_slice(&height.to_be_bytes());
                out.extend_from_slice(&index.to_be_bytes());
            }
            SyncMessage::Chunk {
                height,
                index,
                bytes,
            } => {
                out.reserve(13 + bytes.len());
                out.push(TAG_CHUNK);
                out.extend_from_slice(&height.to_be_bytes());
                out.extend_from_slice(&index.to_be_bytes());
                out.extend_from_slice(bytes);
            }
            SyncMessage::Unavailable { height } => {
                out.push(TAG_UNAVAILABLE);
                out.extend_from_slice(&height.to_be_bytes());
            }
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<SyncMessage, String> {
        if bytes.len() > STATE_SYNC_MESSAGE_BYTES_MAX {
            return Err(format!(
                "state-sync message of {} bytes exceeds {STATE_SYNC_MESSAGE_BYTES_MAX}",
                bytes.len()
            ));
        }
        let (&tag, rest) = bytes
            .split_first()
            .ok_or("empty state-sync message".to_string())?;
        let mut reader = Reader(rest);
        let message = match tag {
            TAG_ADVERT => SyncMessage::Advert(Advert {
                height: reader.u64()?,
                manifest_hash: reader.array()?,
                block_digest: reader.array()?,
                signature: reader.array()?,
            }),
            TAG_MANIFEST_REQUEST => SyncMessage::ManifestRequest {
                height: reader.u64()?,
            },
            TAG_MANIFEST => SyncMessage::Manifest {
                height: reader.u64()?,
                manifest: reader.sized()?.to_vec(),
                finalization: reader.sized()?.to_vec(),
            },
            TAG_CHUNK_REQUEST => SyncMessage::ChunkRequest {
                height: reader.u64()?,
                index: reader.u32()?,
            },
            TAG_CHUNK => {
                let height = reader.u64()?;
                let index = reader.u32()?;
                let bytes = reader.0.to_vec();
                reader.0 = &[];
                SyncMessage::Chunk {
                    height,
                    index,
                    bytes,
                }
            }
            TAG_UNAVAILABLE => SyncMessage::Unavailable {
                height: reader.u64()?,
            },
            other => return Err(format!("unknown state-sync message tag {other}")),
        };
        reader.end()?;
        Ok(message)
    }
}

/// A catch-up checkpoint this replica wrote, awaiting the subnet's signature.
pub(crate) struct CatchUpCandidate {
    pub(crate) height: u64,
    pub(crate) block_digest: [u8; 32],
    pub(crate) snapshot: Arc<SyncSnapshot>,
}

impl CatchUpCandidate {
    /// This replica's share of the catch-up statement.
    pub(crate) fn sign(&self, share: &KeyShare) -> PartialSignature {
        sign_statement(
            share,
            Statement::CatchUp,
            Height(self.height),
            &catch_up_root(&self.snapshot.manifest_hash(), &self.block_digest),
        )
    }
}

/// A fetched and verified state, for the execution thread to install.
pub(crate) struct SyncedState {
    pub(crate) state: ReplicatedState,
    pub(crate) block_digest: [u8; 32],
    pub(crate) finalization: Vec<u8>,
    /// Chunk bytes received and how long the fetch took (for the log).
    pub(crate) bytes: u64,
    pub(crate) started: Instant,
}

/// Between the state-sync task and the execution thread.
#[derive(Clone)]
pub(crate) struct SyncHandoff {
    /// Height a fetch is under way for (0: none). The execution thread does not replay blocks
    /// below it meanwhile.
    pub(crate) target: Arc<AtomicU64>,
    /// Height at which this replica's state diverged from the subnet's (0: it did not).
    pub(crate) diverged_at: Arc<AtomicU64>,
    pub(crate) ready: Arc<parking_lot::Mutex<Option<SyncedState>>>,
    pub(crate) wake: Arc<tokio::sync::Notify>,
}

impl SyncHandoff {
    pub(crate) fn new(wake: Arc<tokio::sync::Notify>) -> Self {
        SyncHandoff {
            target: Arc::new(AtomicU64::new(0)),
            diverged_at: Arc::new(AtomicU64::new(0)),
            ready: Arc::new(parking_lot::Mutex::new(None)),
            wake,
        }
    }
}

enum FetchPhase {
    /// Waiting for the manifest (asked of `peer` at `asked`).
    Manifest { peer: [u8; 32], asked: Instant },
    /// Collecting chunks.
    Chunks {
        assembler: Box<SyncAssembler>,
        finalization: Vec<u8>,
        in_flight: BTreeMap<u32, ([u8; 32], Instant)>,
    },
    /// Assembling on a blocking thread.
    Finishing,
}

struct Fetch {
    advert: Advert,
    /// Peers that advertised this height and have not misbehaved.
    peers: Vec<[u8; 32]>,
    next_peer: usize,
    phase: FetchPhase,
    started: Instant,
    /// The last time a manifest or chunk was accepted (or the fetch started).
    progress: Instant,
}

impl Fetch {
    fn pick_peer(&mut self) -> Option<[u8; 32]> {
        next_peer(&self.peers, &mut self.next_peer)
    }

    fn drop_peer(&mut self, peer: &[u8; 32]) {
        self.peers.retain(|p| p != peer);
    }
}

/// The peer after the last one asked, in turn (`None` when none is left).
fn next_peer(peers: &[[u8; 32]], next: &mut usize) -> Option<[u8; 32]> {
    let peer = *peers.get(*next % peers.len().max(1))?;
    *next = next.wrapping_add(1);
    Some(peer)
}

/// The state-sync side of a replica: runs inside the certification task.
pub(crate) struct StateSync {
    sharing: PublicSharing,
    pool: CertificationPool,
    interval: u64,
    candidates: BTreeMap<u64, CatchUpCandidate>,
    /// The latest certified catch-up checkpoints this replica holds (oldest first, at most
    /// [`SERVED_MAX`]), with their encoded manifests, served to peers.
    serving: std::collections::VecDeque<Served>,
    /// The best verified advert from each peer.
    adverts: BTreeMap<[u8; 32], Advert>,
    /// Peers whose adverts are ignored until then (one had a bad signature).
    bad_adverts: BTreeMap<[u8; 32], Instant>,
    /// Fetches started per advertised height.
    attempts: BTreeMap<u64, u32>,
    /// A fetched state handed to the execution thread and not installed yet (0: none).
    installing: u64,
    min_lead: u64,
    fetch: Option<Fetch>,
    last_advert: Instant,
    floor: FloorControl,
    service: Arc<SubnetService>,
    executed_height: Arc<AtomicU64>,
    handoff: SyncHandoff,
    metrics: Arc<NodeMetrics>,
    finished: tokio::sync::mpsc::Sender<(u64, Result<SyncedState, String>)>,
}

/// A certified catch-up checkpoint served to peers.
struct Served {
    advert: Advert,
    snapshot: Arc<SyncSnapshot>,
}

/// Results of assembling a fetched state on a blocking thread, with the height fetched.
pub(crate) type FinishedReceiver = tokio::sync::mpsc::Receiver<(u64, Result<SyncedState, String>)>;

pub(crate) struct StateSyncParts {
    pub(crate) sharing: PublicSharing,
    pub(crate) interval: u64,
    /// A fetched state is installed only this far above the executed height, at least: the
    /// consensus engine may have this many heights queued for execution (see
    /// `Deliveries::skip_through`).
    pub(crate) min_lead: u64,
    pub(crate) service: Arc<SubnetService>,
    pub(crate) executed_height: Arc<AtomicU64>,
    pub(crate) handoff: SyncHandoff,
    pub(crate) metrics: Arc<NodeMetrics>,
}

impl StateSync {
    pub(crate) fn new(parts: StateSyncParts) -> (StateSync, FinishedReceiver) {
        let interval = parts.interval.max(1);
        let executed = parts.executed_height.load(Ordering::SeqCst);
        let (finished, finished_rx) = tokio::sync::mpsc::channel(1);
        let pool = CertificationPool::new(
            parts.sharing.clone(),
            CertificationPoolConfig {
                statement: Statement::CatchUp,
                // Peers may be several intervals ahead of a replica that is catching up.
                future_heights_max: interval.saturating_mul(8),
                tracked_heights_max: 16,
                // Shares arrive only from the replica they belong to (see `crate::replica`).
                verify_on_arrival: false,
            },
            Height(executed - executed % interval),
        );
        let state_sync = StateSync {
            sharing: parts.sharing,
            pool,
            interval,
            candidates: BTreeMap::new(),
            serving: std::collections::VecDeque::new(),
            adverts: BTreeMap::new(),
            bad_adverts: BTreeMap::new(),
            attempts: BTreeMap::new(),
            installing: 0,
            min_lead: parts.min_lead,
            fetch: None,
            last_advert: Instant::now(),
            floor: parts.service.floor_control(),
            service: parts.service,
            executed_height: parts.executed_height,
            handoff: parts.handoff,
            metrics: parts.metrics,
            finished,
        };
        (state_sync, finished_rx)
    }

    /// This replica's catch-up checkpoint at `candidate.height` and its own share over it.
    pub(crate) fn own_candidate(&mut self, candidate: CatchUpCandidate, partial: PartialSignature) {
        let root = catch_up_root(&candidate.snapshot.manifest_hash(), &candidate.block_digest);
        let height = candidate.height;
        self.candidates.insert(height, candidate);
        while self.candidates.len() > CANDIDATES_MAX {
            self.candidates.pop_first();
        }
        let mut events = Vec::new();
        match self.pool.set_own_root(Height(height), root) {
            Ok(event) => events.extend(event),
            Err(conflict) => warn!(%conflict, "catch-up statement changed"),
        }
        if let Ok(event) = self.pool.add_partial(&partial) {
            events.extend(event);
        }
        for event in events {
            self.on_event(event);
        }
    }

    /// A catch-up share from a peer.
    pub(crate) fn partial(&mut self, partial: &PartialSignature) {
        match self.pool.add_partial(partial) {
            Ok(Some(event)) => self.on_event(event),
            Ok(None) => {}
            // A replica catching up sees shares far above its state: not misbehaviour.
            Err(openic_consensus::certifier::PartialError::TooFarAhead { .. }) => {}
            Err(error) => {
                if error.is_misbehaviour() {
                    self.metrics.certification_shares_refused.inc();
                    warn!(%error, "refused a catch-up share");
                }
            }
        }
    }

    fn on_event(&mut self, event: PoolEvent) {
        match event {
            PoolEvent::Certified {
                height, signature, ..
            } => {
                let Some(candidate) = self.candidates.remove(&height.0) else {
                    return;
                };
                self.candidates.retain(|h, _| *h > height.0);
                let advert = Advert {
                    height: height.0,
                    manifest_hash: candidate.snapshot.manifest_hash(),
                    block_digest: candidate.block_digest,
                    signature,
                };
                info!(
                    height = height.0,
                    chunks = candidate.snapshot.manifest().chunks.len(),
                    bytes = candidate.snapshot.manifest().total_bytes(),
                    "catch-up checkpoint certified; serving it to peers"
                );
                self.metrics.catch_up_height.set(height.0 as i64);
                // Blocks far below the latest signed checkpoint serve no one: a replica that far
                // behind fetches a checkpoint. Keep every block a replica that replays needs.
                let keep =
                    (SYNC_LAG_INTERVALS + SERVED_MAX as u64 + 1).saturating_mul(self.interval);
                if height.0 > keep {
                    self.floor.prune(height.0 - keep);
                }
                self.serving.push_back(Served {
                    advert,
                    snapshot: candidate.snapshot,
                });
                while self.serving.len() > SERVED_MAX {
                    self.serving.pop_front();
                }
                self.send_advert();
            }
            PoolEvent::Diverged { height, .. } => {
                warn!(
                    height = height.0,
                    "the subnet signed another catch-up checkpoint than this replica's"
                );
            }
        }
    }

    fn send_advert(&mut self) {
        self.last_advert = Instant::now();
        if let Some(served) = self.serving.back() {
            self.service
                .send_sync(None, SyncMessage::Advert(served.advert).encode());
        }
    }

    fn send(&self, to: [u8; 32], message: SyncMessage) {
        let _ = self.service.send_sync(Some(to), message.encode());
    }

    /// A state-sync message from `from`.
    pub(crate) fn message(&mut self, from: [u8; 32], bytes: &[u8]) {
        let message = match SyncMessage::decode(bytes) {
            Ok(message) => message,
            Err(error) => {
                warn!(peer = %hex::encode(from), %error, "malformed state-sync message");
                return;
            }
        };
        match message {
            SyncMessage::Advert(advert) => self.advert(from, advert),
            SyncMessage::ManifestRequest { height } => self.serve_manifest(from, height),
            SyncMessage::ChunkRequest { height, index } => {
                let chunk = self
                    .served(height)
                    .and_then(|served| served.snapshot.chunk(index));
                match chunk {
                    Some(bytes) => self.send(
                        from,
                        SyncMessage::Chunk {
                            height,
                            index,
                            bytes,
                        },
                    ),
                    None => self.send(from, SyncMessage::Unavailable { height }),
                }
            }
            SyncMessage::Manifest {
                height,
                manifest,
                finalization,
            } => self.manifest(from, height, &manifest, finalization),
            SyncMessage::Chunk {
                height,
                index,
                bytes,
            } => self.chunk(from, height, index, &bytes),
            SyncMessage::Unavailable { height } => {
                if let Some(fetch) = &mut self.fetch
                    && fetch.advert.height == height
                {
                    fetch.drop_peer(&from);
                    self.request_more();
                }
            }
        }
    }

    fn served(&self, height: u64) -> Option<&Served> {
        self.serving
            .iter()
            .find(|served| served.advert.height == height)
    }

    fn serve_manifest(&self, from: [u8; 32], height: u64) {
        let Some(served) = self.served(height) else {
            self.send(from, SyncMessage::Unavailable { height });
            return;
        };
        let manifest = served.snapshot.encoded_manifest();
        let floor = self.floor.clone();
        let service = self.service.clone();
        tokio::spawn(async move {
            let message = match floor.finalization(height).await {
                Some(finalization) => SyncMessage::Manifest {
                    height,
                    manifest: manifest.to_vec(),
                    finalization,
                },
                None => SyncMessage::Unavailable { height },
            };
            let _ = service.send_sync(Some(from), message.encode());
        });
    }

    fn advert(&mut self, from: [u8; 32], advert: Advert) {
        let known = self.adverts.get(&from).map(|a| a.height).unwrap_or(0);
        if advert.height <= known || !advert.height.is_multiple_of(self.interval) {
            return;
        }
        if self
            .bad_adverts
            .get(&from)
            .is_some_and(|until| Instant::now() < *until)
        {
            return;
        }
        if !advert.verify(&self.sharing) {
            warn!(peer = %hex::encode(from), height = advert.height, "catch-up advert with a bad signature");
            self.bad_adverts
                .insert(from, Instant::now() + BAD_ADVERT_PENALTY);
            return;
        }
        self.adverts.insert(from, advert);
        self.consider_fetch();
    }

    /// Starts a fetch if a verified advert is far enough ahead of this replica's state.
    fn consider_fetch(&mut self) {
        let executed = self.executed_height.load(Ordering::SeqCst);
        let diverged_at = self.handoff.diverged_at.load(Ordering::SeqCst);
        if self.installing > executed {
            // The execution thread has a fetched state to install; judge after it did.
            return;
        }
        let Some(best) = self
            .adverts
            .values()
            .filter(|a| self.attempts.get(&a.height).copied().unwrap_or(0) < FETCH_ATTEMPTS_MAX)
            .max_by_key(|a| a.height)
            .copied()
        else {
            return;
        };
        // Installing needs a lead over everything the engine may have queued for execution.
        let floor = executed.saturating_add(self.min_lead);
        let behind = best.height
            >= executed.saturating_add(SYNC_LAG_INTERVALS.saturating_mul(self.interval))
            && best.height > floor;
        let recovers = diverged_at != 0 && best.height > diverged_at.max(floor);
        if !(behind || recovers) {
            return;
        }
        if let Some(fetch) = &self.fetch
            && best.height
                < fetch
                    .advert
                    .height
                    .saturating_add(SWITCH_INTERVALS * self.interval)
        {
            return;
        }
        let peers: Vec<[u8; 32]> = self
            .adverts
            .iter()
            .filter(|(_, a)| **a == best)
            .map(|(peer, _)| *peer)
            .collect();
        let attempt = self.attempts.entry(best.height).or_default();
        *attempt += 1;
        info!(
            height = best.height,
            executed,
            peers = peers.len(),
            attempt = *attempt,
            "state sync: fetching the subnet's catch-up checkpoint"
        );
        let mut fetch = Fetch {
            advert: best,
            peers,
            next_peer: 0,
            phase: FetchPhase::Finishing,
            started: Instant::now(),
            progress: Instant::now(),
        };
        let Some(peer) = fetch.pick_peer() else {
            return;
        };
        self.handoff.target.store(best.height, Ordering::SeqCst);
        fetch.phase = FetchPhase::Manifest {
            peer,
            asked: Instant::now(),
        };
        self.send(
            peer,
            SyncMessage::ManifestRequest {
                height: best.height,
            },
        );
        self.fetch = Some(fetch);
    }

    fn manifest(&mut self, from: [u8; 32], height: u64, bytes: &[u8], finalization: Vec<u8>) {
        let Some(fetch) = &mut self.fetch else {
            return;
        };
        if fetch.advert.height != height || !matches!(fetch.phase, FetchPhase::Manifest { .. }) {
            return;
        }
        let checked = SyncManifest::decode(bytes)
            .map_err(|e| e.to_string())
            .and_then(|manifest| {
                if manifest.hash() != fetch.advert.manifest_hash {
                    return Err("the manifest's hash is not the one the subnet signed".into());
                }
                if manifest.height != Height(height) {
                    return Err("the manifest is for another height".into());
                }
                self.floor
                    .check_floor(&finalization, &fetch.advert.block_digest)?;
                SyncAssembler::new(manifest).map_err(|e| e.to_string())
            });
        match checked {
            Ok(assembler) => {
                info!(
                    height,
                    chunks = assembler.chunk_count(),
                    "state sync: manifest verified; fetching chunks"
                );
                fetch.phase = FetchPhase::Chunks {
                    assembler: Box::new(assembler),
                    finalization,
                    in_flight: BTreeMap::new(),
                };
                fetch.progress = Instant::now();
                self.request_more();
            }
            Err(error) => {
                warn!(peer = %hex::encode(from), height, %error, "state sync: refused a manifest");
                fetch.drop_peer(&from);
                self.retry_manifest();
            }
        }
    }

    fn retry_manifest(&mut self) {
        let Some(fetch) = &mut self.fetch else {
            return;
        };
        match fetch.pick_peer() {
            Some(peer) => {
                fetch.phase = FetchPhase::Manifest {
                    peer,
                    asked: Instant::now(),
                };
                let height = fetch.advert.height;
                self.send(peer, SyncMessage::ManifestRequest { height });
            }
            None => self.fail("no peer serves a valid manifest"),
        }
    }

    fn chunk(&mut self, from: [u8; 32], height: u64, index: u32, bytes: &[u8]) {
        let Some(fetch) = &mut self.fetch else {
            return;
        };
        if fetch.advert.height != height {
            return;
        }
        let FetchPhase::Chunks {
            assembler,
            in_flight,
            ..
        } = &mut fetch.phase
        else {
            return;
        };
        if in_flight.get(&index).map(|(peer, _)| peer) != Some(&from) {
            // Unrequested or late (already asked of another peer): ignore.
            return;
        }
        in_flight.remove(&index);
        match assembler.add_chunk(index, bytes) {
            Ok(()) => fetch.progress = Instant::now(),
            Err(error) => {
                warn!(peer = %hex::encode(from), height, index, %error, "state sync: refused a chunk");
                fetch.drop_peer(&from);
            }
        }
        self.metrics.state_sync_bytes.inc_by(bytes.len() as u64);
        self.request_more();
    }

    /// Keeps [`CHUNKS_IN_FLIGHT`] requests outstanding; finishes when every chunk is in.
    fn request_more(&mut self) {
        let Some(fetch) = &mut self.fetch else {
            return;
        };
        let FetchPhase::Chunks {
            assembler,
            in_flight,
            ..
        } = &mut fetch.phase
        else {
            return;
        };
        if assembler.is_complete() {
            self.finish();
            return;
        }
        if fetch.peers.is_empty() {
            self.fail("every peer serving this height failed or stopped serving it");
            return;
        }
        let height = fetch.advert.height;
        let missing = assembler.missing();
        let mut requests = Vec::new();
        for index in missing {
            if in_flight.len() >= CHUNKS_IN_FLIGHT {
                break;
            }
            if in_flight.contains_key(&index) {
                continue;
            }
            let Some(peer) = next_peer(&fetch.peers, &mut fetch.next_peer) else {
                break;
            };
            in_flight.insert(index, (peer, Instant::now()));
            requests.push((peer, index));
        }
        for (peer, index) in requests {
            self.send(peer, SyncMessage::ChunkRequest { height, index });
        }
    }

    fn finish(&mut self) {
        let Some(fetch) = &mut self.fetch else {
            return;
        };
        let phase = std::mem::replace(&mut fetch.phase, FetchPhase::Finishing);
        let FetchPhase::Chunks {
            assembler,
            finalization,
            ..
        } = phase
        else {
            return;
        };
        let block_digest = fetch.advert.block_digest;
        let started = fetch.started;
        let bytes = assembler.bytes_received();
        let finished = self.finished.clone();
        let height = fetch.advert.height;
        tokio::task::spawn_blocking(move || {
            let result = assembler
                .finish()
                .map(|state| SyncedState {
                    state,
                    block_digest,
                    finalization,
                    bytes,
                    started,
                })
                .map_err(|e| e.to_string());
            let _ = finished.blocking_send((height, result));
        });
    }

    /// The assembled state (or why it could not be).
    pub(crate) fn finished(&mut self, height: u64, result: Result<SyncedState, String>) {
        // A result of a fetch that was replaced meanwhile is of no use.
        let current = self.fetch.as_ref().is_some_and(|fetch| {
            fetch.advert.height == height && matches!(fetch.phase, FetchPhase::Finishing)
        });
        if !current {
            return;
        }
        match result {
            Ok(synced) => {
                let height = synced.state.metadata.height.0;
                info!(
                    height,
                    bytes = synced.bytes,
                    seconds = synced.started.elapsed().as_secs_f64(),
                    "state sync: state fetched and verified; installing it"
                );
                *self.handoff.ready.lock() = Some(synced);
                self.handoff.wake.notify_one();
                self.installing = height;
                self.fetch = None;
            }
            Err(error) => self.fail(&format!("the fetched state does not assemble: {error}")),
        }
    }

    fn fail(&mut self, reason: &str) {
        let Some(fetch) = self.fetch.take() else {
            return;
        };
        let attempt = self
            .attempts
            .get(&fetch.advert.height)
            .copied()
            .unwrap_or(0);
        warn!(
            height = fetch.advert.height,
            attempt, reason, "state sync: fetch failed"
        );
        self.metrics.state_sync_failures.inc();
        // Another advert (or this one, again) may do; otherwise replay resumes.
        self.consider_fetch();
        if self.fetch.is_none() {
            self.handoff.target.store(0, Ordering::SeqCst);
            self.handoff.wake.notify_one();
        }
    }

    /// Periodic work: adverts, request timeouts, and noticing that the replica fell behind.
    pub(crate) fn tick(&mut self) {
        if self.last_advert.elapsed() >= ADVERT_INTERVAL {
            self.send_advert();
        }
        self.bad_adverts.retain(|_, until| Instant::now() < *until);
        let Some(fetch) = &mut self.fetch else {
            self.consider_fetch();
            return;
        };
        if !matches!(fetch.phase, FetchPhase::Finishing)
            && fetch.progress.elapsed() >= NO_PROGRESS_TIMEOUT
        {
            self.fail("no peer answered for too long");
            return;
        }
        match &mut fetch.phase {
            FetchPhase::Manifest { peer, asked } => {
                if asked.elapsed() >= REQUEST_TIMEOUT {
                    let peer = *peer;
                    fetch.drop_peer(&peer);
                    self.retry_manifest();
                }
            }
            FetchPhase::Chunks { in_flight, .. } => {
                let late: Vec<(u32, [u8; 32])> = in_flight
                    .iter()
                    .filter(|(_, (_, asked))| asked.elapsed() >= REQUEST_TIMEOUT)
                    .map(|(index, (peer, _))| (*index, *peer))
                    .collect();
                for (index, _) in &late {
                    in_flight.remove(index);
                }
                for (_, peer) in &late {
                    if fetch.peers.len() > 1 {
                        fetch.drop_peer(peer);
                    }
                }
                if !late.is_empty() {
                    self.request_more();
                }
            }
            FetchPhase::Finishing => {}
        }
    }

    /// Whether this replica's state is installed past the target: then the fetch is moot.
    pub(crate) fn note_executed(&mut self) {
        let executed = self.executed_height.load(Ordering::SeqCst);
        // Installed, or dropped by the execution thread (replay got there first, or it could not
        // be checkpointed): either way the hand-off is over.
        if self.installing != 0
            && (self.installing <= executed || self.handoff.target.load(Ordering::SeqCst) == 0)
        {
            self.installing = 0;
        }
        if let Some(fetch) = &self.fetch
            && fetch.advert.height <= executed
            && self.handoff.diverged_at.load(Ordering::SeqCst) == 0
            && !matches!(fetch.phase, FetchPhase::Finishing)
        {
            self.fetch = None;
            self.handoff.target.store(0, Ordering::SeqCst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_refuse_garbage() {
        let messages = [
            SyncMessage::Advert(Advert {
                height: 7,
                manifest_hash: [1; 32],
                block_digest: [2; 32],
                signature: [3; 48],
            }),
            SyncMessage::ManifestRequest { height: 9 },
            SyncMessage::Manifest {
                height: 9,
                manifest: vec![1, 2, 3],
                finalization: vec![4, 5],
            },
            SyncMessage::ChunkRequest {
                height: 9,
                index: 4,
            },
            SyncMessage::Chunk {
                height: 9,
                index: 4,
                bytes: vec![9; 100],
            },
            SyncMessage::Unavailable { height: 3 },
        ];
        for message in messages {
            let bytes = message.encode();
            assert_eq!(SyncMessage::decode(&bytes).unwrap(), message);
            // Every truncation of a fixed-size message is refused (a chunk may be any length).
            if !matches!(message, SyncMessage::Chunk { .. }) {
                for cut in 0..bytes.len() {
                    assert!(
                        SyncMessage::decode(&bytes[..cut]).is_err(),
                        "{message:?} cut {cut}"
                    );
                }
                let mut longer = bytes.clone();
                longer.push(0);
                assert!(SyncMessage::decode(&longer).is_err());
            }
        }
        assert!(SyncMessage::decode(&[99]).is_err());
        assert!(
            SyncMessage::decode(&[TAG_MANIFEST, 0, 0, 0, 0, 0, 0, 0, 9, 255, 255, 255, 255])
                .is_err()
        );
        assert!(SyncMessage::decode(&vec![TAG_CHUNK; STATE_SYNC_MESSAGE_BYTES_MAX + 1]).is_err());
    }

    #[test]
    fn catch_up_root_binds_manifest_and_block() {
        let root = catch_up_root(&[1; 32], &[2; 32]);
        assert_ne!(root, catch_up_root(&[1; 32], &[3; 32]));
        assert_ne!(root, catch_up_root(&[3; 32], &[2; 32]));
        assert_eq!(root, catch_up_root(&[1; 32], &[2; 32]));
    }
}
