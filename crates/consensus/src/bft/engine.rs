//! Wires simplex, marshal, block broadcast and backfill into one replica's BFT engine.

use super::{
    application::PolicyApplication,
    block::{Block, BlockLimits},
    delivery::{self, Deliveries},
    policy::BlockPolicy,
    seeds::{Scheme, SeedCache, SeedRecorder},
};
use commonware_broadcast::buffered;
use commonware_codec::{DecodeExt as _, Encode as _};
use commonware_consensus::{
    marshal::{
        self,
        core::Actor as Marshal,
        resolver::p2p as backfill,
        standard::{Inline, Standard},
    },
    simplex::{
        self,
        config::{ForwardPolicy, SkipBudget, SkipPolicy},
        elector::{Random, RandomVersion},
    },
    types::{Epoch, FixedEpocher, ViewDelta},
};
use commonware_cryptography::{
    Digested, Digestible as _, Signer as _,
    bls12381::primitives::{group::Share, sharing::Sharing, variant::MinSig},
    certificate::ConstantProvider,
    ed25519,
    sha256::Digest,
    sha256::Sha256,
};
use commonware_p2p::{Blocker, Channel, Provider, Receiver, Sender};
use commonware_parallel::Sequential;
use commonware_runtime::{
    Clock, Handle, Metrics, Quota, Spawner, Storage, buffer::paged::CacheRef,
};
use commonware_storage::archive::immutable;
use commonware_utils::{
    NZU16, NZU32, NZU64, NZUsize,
    ordered::{Quorum as _, Set},
};
use rand_core_commonware::CryptoRng;
use std::{
    num::{NonZeroU32, NonZeroUsize},
    time::Duration,
};
use thiserror::Error;

/// Limits, timeouts and storage settings of one replica's engine.
///
/// Every replica of a subnet must use the same `namespace`, `genesis_time_nanos` and
/// `block_limits`; the rest may differ per replica. Defaults aim at a LAN subnet of a few
/// replicas making tens of blocks per second.
#[derive(Clone, Debug)]
pub struct BftConfig {
    /// Prefix of every storage partition the engine writes, so several engines can share storage.
    pub partition_prefix: String,
    /// Domain separator of every consensus signature (unique per subnet, so votes of one subnet
    /// are never valid in another).
    pub namespace: Vec<u8>,
    /// Time of the genesis block; the first block's time must exceed it.
    pub genesis_time_nanos: u64,
    /// Limits on the ingress of one block.
    pub block_limits: BlockLimits,
    /// How long a replica waits for a view's proposal before voting to skip the view.
    pub leader_timeout: Duration,
    /// How long a replica waits for a view to be notarized and certified before voting to skip it.
    pub notarization_timeout: Duration,
    /// How often a replica stuck in a view re-sends its vote to skip it.
    pub nullify_retry: Duration,
    /// Views behind the finalized tip whose votes and blocks are kept for slow peers.
    pub activity_timeout_views: u64,
    /// How long a request for a missing certificate or block waits for a peer's answer.
    pub fetch_timeout: Duration,
    /// Capacity of each internal mailbox (messages).
    pub mailbox_size: usize,
    /// Finalized heights handed to the node and not yet acknowledged, at most (at least 1).
    pub pending_acks_max: usize,
    /// Missing finalized heights fetched from peers at once while catching up.
    pub repair_heights_max: usize,
    /// How long a proposer waits for its parent's seed before skipping its turn.
    pub seed_wait: Duration,
    /// A leader proposes no sooner than this after its parent's block time: bounds the block
    /// rate (and the CPU a subnet spends per block) under load.
    pub min_block_interval: Duration,
    /// With nothing to do ([`BlockPolicy::has_work`] false), a leader waits this long after its
    /// parent's block time before proposing an empty block, which keeps the certified time fresh
    /// and runs timers. Must stay well below `leader_timeout`.
    pub idle_block_interval: Duration,
    /// Messages per second one peer may send on each engine channel.
    pub peer_messages_per_second: u32,
}

impl Default for BftConfig {
    fn default() -> Self {
        Self {
            partition_prefix: "bft".to_string(),
            namespace: b"openic-bft".to_vec(),
            genesis_time_nanos: 0,
            block_limits: BlockLimits {
                ingress_messages_max: 1_000,
                ingress_bytes_max: 4 * 1024 * 1024,
            },
            leader_timeout: Duration::from_secs(1),
            notarization_timeout: Duration::from_secs(2),
            nullify_retry: Duration::from_secs(5),
            activity_timeout_views: 256,
            fetch_timeout: Duration::from_secs(1),
            mailbox_size: 1_024,
            pending_acks_max: 16,
            repair_heights_max: 16,
            seed_wait: Duration::from_millis(500),
            min_block_interval: Duration::ZERO,
            idle_block_interval: Duration::ZERO,
            peer_messages_per_second: 10_000,
        }
    }
}

/// Why an engine could not start.
#[derive(Debug, Error)]
pub enum BftError {
    /// The key material does not fit together; regenerate or re-distribute it.
    #[error("invalid signing setup: {0}")]
    InvalidSigningSetup(String),
    /// A configuration value is out of range; fix the configuration.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    /// A storage partition could not be opened (disk error or corrupt data).
    #[error("storage: {0}")]
    Storage(String),
}

/// This replica's keys for one subnet, as the key generation (DKG) hands them over.
#[derive(Clone)]
pub struct SigningSetup {
    scheme: Scheme,
    private_key: ed25519::PrivateKey,
}

impl SigningSetup {
    /// Checks and combines the subnet's public polynomial, this replica's share, the ordered
    /// participants (index `i` holds share `i`) and this replica's node key.
    pub fn new(
        namespace: &[u8],
        polynomial: Sharing<MinSig>,
        share: Share,
        participants: Vec<ed25519::PublicKey>,
        private_key: ed25519::PrivateKey,
    ) -> Result<Self, BftError> {
        let count = participants.len();
        let participants = Set::from_iter_dedup(participants);
        if participants.len() != count {
            return Err(BftError::InvalidSigningSetup(
                "duplicate participant".to_string(),
            ));
        }
        if polynomial.total().get() as usize != count {
            return Err(BftError::InvalidSigningSetup(format!(
                "polynomial has {} shares for {count} participants",
                polynomial.total()
            )));
        }
        if polynomial.required() != participants.quorum::<commonware_utils::N3f1>() {
            return Err(BftError::InvalidSigningSetup(
                "polynomial threshold is not the quorum 2f+1".to_string(),
            ));
        }
        let me = private_key.public_key();
        let Some(index) = participants.index(&me) else {
            return Err(BftError::InvalidSigningSetup(
                "node key is not a participant".to_string(),
            ));
        };
        if share.index != index {
            return Err(BftError::InvalidSigningSetup(format!(
                "share index {} is not the node's participant index {index}",
                share.index
            )));
        }
        let scheme =
            Scheme::signer(namespace, participants, polynomial, share).ok_or_else(|| {
                BftError::InvalidSigningSetup("share does not match the polynomial".to_string())
            })?;
        Ok(Self {
            scheme,
            private_key,
        })
    }

    /// This replica's node public key.
    pub fn public_key(&self) -> ed25519::PublicKey {
        self.private_key.public_key()
    }
}

/// One p2p channel the engine needs, for registering it on the network.
#[derive(Clone, Debug)]
pub struct ChannelSpec {
    /// Channel id on the multiplexed network.
    pub id: Channel,
    /// What travels on it (for logs and metrics).
    pub name: &'static str,
    /// Messages per second one peer may send on it.
    pub rate_limit: Quota,
    /// Largest message, in bytes, the channel must admit.
    pub max_message_bytes: u32,
}

/// Channel ids, in the order [`Channels`] holds them.
const VOTES: Channel = 0;
const CERTIFICATES: Channel = 1;
const CERTIFICATE_FETCH: Channel = 2;
const BLOCKS: Channel = 3;
const BLOCK_FETCH: Channel = 4;

/// Bytes every consensus message of a subnet of `participants` fits in (votes, certificates
/// and certificate fetches are a few hundred bytes each; fetches batch some).
const CONSENSUS_MESSAGE_BYTES_MAX: u32 = 1024 * 1024;

/// The channels the engine needs, with their limits, so production can register them on an
/// authenticated network before calling [`start`].
pub fn channels(config: &BftConfig, participants: u32) -> Vec<ChannelSpec> {
    let rate_limit =
        Quota::per_second(NonZeroU32::new(config.peer_messages_per_second).unwrap_or(NZU32!(1)));
    let block_bytes = u32::try_from(marshal::max_payload_size::<Standard<Block>, Scheme>(
        participants,
        &config.block_limits,
    ))
    .unwrap_or(u32::MAX);
    [
        (VOTES, "votes", CONSENSUS_MESSAGE_BYTES_MAX),
        (CERTIFICATES, "certificates", CONSENSUS_MESSAGE_BYTES_MAX),
        (
            CERTIFICATE_FETCH,
            "certificate-fetch",
            CONSENSUS_MESSAGE_BYTES_MAX,
        ),
        (BLOCKS, "blocks", block_bytes),
        (BLOCK_FETCH, "block-fetch", block_bytes),
    ]
    .into_iter()
    .map(|(id, name, max_message_bytes)| ChannelSpec {
        id,
        name,
        rate_limit,
        max_message_bytes,
    })
    .collect()
}

/// The registered channels, one (sender, receiver) pair per [`channels`] entry.
pub struct Channels<S, R> {
    /// Channel 0: votes.
    pub votes: (S, R),
    /// Channel 1: certificates.
    pub certificates: (S, R),
    /// Channel 2: fetching missing certificates.
    pub certificate_fetch: (S, R),
    /// Channel 3: broadcasting proposed blocks.
    pub blocks: (S, R),
    /// Channel 4: fetching missing blocks (catching up).
    pub block_fetch: (S, R),
}

/// The running engine's tasks.
pub struct BftHandle {
    consensus: Handle<()>,
    marshal: Handle<()>,
    broadcast: Handle<()>,
    floor: FloorControl,
}

/// Reads finalization certificates from the engine's history and moves its delivery floor: what
/// state sync needs to hand a peer proof that a block was finalized, and to start this replica's
/// deliveries after a state it fetched instead of at genesis.
#[derive(Clone)]
pub struct FloorControl {
    marshal: marshal::core::Mailbox<Scheme, Standard<Block>>,
    scheme: Scheme,
}

impl std::fmt::Debug for FloorControl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FloorControl")
    }
}

impl FloorControl {
    /// The encoded finalization certificate of the block at `height`, if this replica still
    /// stores it.
    pub async fn finalization(&self, height: u64) -> Option<Vec<u8>> {
        let finalization = self
            .marshal
            .get_finalization(commonware_consensus::types::Height::new(height))
            .await?;
        Some(finalization.encode().to_vec())
    }

    /// Lets the engine delete finalized blocks and certificates below `height` (it may keep some
    /// older ones; it never deletes above what it delivered and saw acknowledged). For history
    /// no peer needs any more: a replica further behind fetches a signed checkpoint instead.
    pub fn prune(&self, height: u64) {
        self.marshal
            .prune(commonware_consensus::types::Height::new(height));
    }

    /// Checks that `finalization` (bytes from a peer's [`FloorControl::finalization`]) is a valid
    /// finalization certificate of the block with digest `block_digest`.
    pub fn check_floor(&self, finalization: &[u8], block_digest: &[u8; 32]) -> Result<(), String> {
        self.decode_checked(finalization, block_digest).map(|_| ())
    }

    fn decode_checked(
        &self,
        finalization: &[u8],
        block_digest: &[u8; 32],
    ) -> Result<simplex::types::Finalization<Scheme, Digest>, String> {
        let finalization = simplex::types::Finalization::<Scheme, Digest>::decode(
            commonware_codec::Copying(finalization),
        )
        .map_err(|e| format!("the finalization does not decode: {e}"))?;
        if finalization.proposal.payload.0 != *block_digest {
            return Err("the finalization certifies another block".into());
        }
        let mut rng = commonware_utils::sys_rng();
        if !finalization.verify(&mut rng, &self.scheme, &Sequential) {
            return Err("the finalization's certificate does not verify".into());
        }
        Ok(finalization)
    }

    /// Makes the engine deliver finalized blocks from the block that `finalization` certifies,
    /// which must be the block with digest `block_digest`; blocks below it are neither fetched nor
    /// delivered. Checks the certificate first (the engine panics on an invalid floor).
    pub fn set_floor(&self, finalization: &[u8], block_digest: &[u8; 32]) -> Result<(), String> {
        let finalization = self.decode_checked(finalization, block_digest)?;
        self.marshal.set_floor(finalization);
        Ok(())
    }
}

impl BftHandle {
    /// A handle on the engine's finalized history and delivery floor.
    pub fn floor_control(&self) -> FloorControl {
        self.floor.clone()
    }

    /// Stops the engine's tasks, as a crash would (storage keeps what was synced).
    pub fn abort(self) {
        self.consensus.abort();
        self.marshal.abort();
        self.broadcast.abort();
    }
}

/// Starts one replica's engine and returns its finalized-block deliveries.
///
/// `peers` tells block broadcast and backfill which peers exist; `blocker` lets the engine
/// disconnect peers that send invalid messages. Storage partitions are named from
/// `config.partition_prefix`; restarting over the same storage resumes where the replica
/// stopped and delivers again every height not acknowledged.
pub async fn start<E, P, Bl, S, R, Pol>(
    context: E,
    config: &BftConfig,
    signing: SigningSetup,
    policy: Pol,
    peers: P,
    blocker: Bl,
    channels: Channels<S, R>,
) -> Result<(BftHandle, Deliveries), BftError>
where
    E: Spawner + Clock + Storage + Metrics + CryptoRng,
    P: Provider<PublicKey = ed25519::PublicKey>,
    Bl: Blocker<PublicKey = ed25519::PublicKey>,
    S: Sender<PublicKey = ed25519::PublicKey>,
    R: Receiver<PublicKey = ed25519::PublicKey>,
    Pol: BlockPolicy,
{
    let mailbox_size = NonZeroUsize::new(config.mailbox_size)
        .ok_or_else(|| BftError::InvalidConfig("mailbox_size is 0".to_string()))?;
    if config.pending_acks_max == 0 {
        return Err(BftError::InvalidConfig(
            "pending_acks_max must be at least 1".to_string(),
        ));
    }
    if config.notarization_timeout <= config.leader_timeout {
        return Err(BftError::InvalidConfig(
            "notarization_timeout must exceed leader_timeout".to_string(),
        ));
    }
    let activity_views = NZU64!(1).max(
        std::num::NonZeroU64::new(config.activity_timeout_views)
            .ok_or_else(|| BftError::InvalidConfig("activity_timeout_views is 0".to_string()))?,
    );
    let fetch_timeout = commonware_utils::NonZeroDuration::new(config.fetch_timeout)
        .ok_or_else(|| BftError::InvalidConfig("fetch_timeout is 0".to_string()))?;
    let me = signing.public_key();
    let scheme = signing.scheme;
    let prefix = &config.partition_prefix;
    let page_cache = CacheRef::new(NZU16!(4096), NZUsize!(1024));
    let write_buffer = NZUsize!(64 * 1024);
    let genesis = Block::genesis(config.genesis_time_nanos);
    let genesis_digest = genesis.digest();

    // Backfill of finalized blocks from peers.
    let (backfill_handler, backfill_mailbox) = backfill::init(
        context.child("block_fetch"),
        backfill::Config {
            public_key: me.clone(),
            peer_provider: peers.clone(),
            blocker: blocker.clone(),
            mailbox_size,
            fetch_timeout,
            fetch_retry_delay: Duration::from_millis(100),
            priority_requests: false,
            priority_responses: false,
        },
        channels.block_fetch,
    );

    // Broadcast of proposed blocks.
    let (broadcast, buffer) = buffered::Engine::new(
        context.child("blocks"),
        buffered::Config {
            public_key: me.clone(),
            mailbox_size,
            deque_size: 16,
            priority: false,
            codec_config: config.block_limits,
            peer_provider: peers,
            strategy: Sequential,
        },
    );
    let broadcast = broadcast.start(channels.blocks);

    // Durable finalized history.
    let finalizations = immutable::Archive::init(
        context.child("finalizations"),
        archive_config(prefix, "finalizations", &page_cache, write_buffer, ()),
    )
    .await
    .map_err(|error| BftError::Storage(error.to_string()))?;
    let blocks = immutable::Archive::init(
        context.child("finalized_blocks"),
        archive_config(
            prefix,
            "finalized-blocks",
            &page_cache,
            write_buffer,
            config.block_limits,
        ),
    )
    .await
    .map_err(|error| BftError::Storage(error.to_string()))?;

    // Ordered delivery of finalized blocks.
    let (marshal_actor, marshal_mailbox, _floor) = Marshal::init(
        context.child("marshal"),
        finalizations,
        blocks,
        marshal::Config {
            provider: ConstantProvider::new(scheme.clone()),
            epocher: FixedEpocher::new(NZU64!(u64::MAX)),
            start: marshal::Start::Genesis(Digested::precomputed(genesis, genesis_digest)),
            partition_prefix: format!("{prefix}-marshal"),
            mailbox_size,
            view_retention: ViewDelta::new(config.activity_timeout_views),
            prunable_items_per_section: NZU64!(1024),
            page_cache: page_cache.clone(),
            replay_buffer: write_buffer,
            key_write_buffer: write_buffer,
            value_write_buffer: write_buffer,
            block_codec_config: config.block_limits,
            max_repair: NonZeroUsize::new(config.repair_heights_max)
                .ok_or_else(|| BftError::InvalidConfig("repair_heights_max is 0".to_string()))?,
            max_pending_acks: NonZeroUsize::new(config.pending_acks_max)
                .ok_or_else(|| BftError::InvalidConfig("pending_acks_max is 0".to_string()))?,
            strategy: Sequential,
        },
    )
    .await;
    let floor = FloorControl {
        marshal: marshal_mailbox.clone(),
        scheme: scheme.clone(),
    };
    let (sink, deliveries) = delivery::channel();
    let marshal_handle = marshal_actor.start(sink, buffer, (backfill_handler, backfill_mailbox));

    // Consensus.
    let seeds = SeedCache::default();
    let application = PolicyApplication {
        policy,
        scheme: scheme.clone(),
        seeds: seeds.clone(),
        limits: config.block_limits,
        seed_wait: config.seed_wait,
        min_block_interval: config.min_block_interval,
        idle_block_interval: config.idle_block_interval,
        marshal: marshal_mailbox.clone(),
    };
    let wrapper = Inline::new(
        context.child("application"),
        application,
        marshal_mailbox,
        FixedEpocher::new(NZU64!(u64::MAX)),
    );
    let consensus = simplex::Engine::new(
        context.child("consensus"),
        simplex::config::Config {
            scheme,
            elector: Random::<Sha256>::new(RandomVersion::V1),
            blocker,
            automaton: wrapper.clone(),
            relay: wrapper.clone(),
            reporter: SeedRecorder {
                inner: wrapper,
                seeds,
            },
            strategy: Sequential,
            partition: format!("{prefix}-consensus"),
            mailbox_size,
            epoch: Epoch::zero(),
            floor: simplex::config::Floor::Genesis(genesis_digest),
            replay_buffer: write_buffer,
            write_buffer,
            page_cache,
            leader_timeout: config.leader_timeout,
            certification_timeout: config.notarization_timeout,
            timeout_retry: config.nullify_retry,
            view_retention: ViewDelta::new(activity_views.get()),
            skip: SkipPolicy::Enabled {
                timeout: config.notarization_timeout.max(config.nullify_retry) * 2,
                budget: SkipBudget::Participants,
            },
            fetch_timeout,
            fetch_retry_delay: Duration::from_millis(100),
            forward: ForwardPolicy::SilentLeader,
            track_historical_votes: false,
        },
    );
    let consensus = consensus.start(
        channels.votes,
        channels.certificates,
        channels.certificate_fetch,
    );
    Ok((
        BftHandle {
            consensus,
            marshal: marshal_handle,
            broadcast,
            floor,
        },
        deliveries,
    ))
}

/// Storage settings of one durable archive of finalized history, under `prefix`.
fn archive_config<C>(
    prefix: &str,
    name: &str,
    page_cache: &CacheRef,
    write_buffer: NonZeroUsize,
    codec_config: C,
) -> immutable::Config<C> {
    immutable::Config {
        metadata_partition: format!("{prefix}-{name}-metadata"),
        freezer_table_partition: format!("{prefix}-{name}-freezer-table"),
        freezer_table_initial_size: 64,
        freezer_table_resize_frequency: 10,
        freezer_table_resize_chunk_size: 10,
        freezer_key_partition: format!("{prefix}-{name}-freezer-key"),
        freezer_key_page_cache: page_cache.clone(),
        freezer_value_partition: format!("{prefix}-{name}-freezer-value"),
        freezer_value_target_size: 64 * 1024 * 1024,
        freezer_value_compression: None,
        ordinal_partition: format!("{prefix}-{name}-ordinal"),
        items_per_section: NZU64!(1024),
        codec_config,
        replay_buffer: write_buffer,
        freezer_key_write_buffer: write_buffer,
        freezer_value_write_buffer: write_buffer,
        ordinal_write_buffer: write_buffer,
    }
}
