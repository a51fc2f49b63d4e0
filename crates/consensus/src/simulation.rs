//! Deterministic simulation of a whole subnet: consensus, execution and certification of every
//! replica in Commonware's deterministic runtime, over a simulated network that delays, drops and
//! partitions messages, with one Byzantine replica.
//!
//! The node supplies each replica's application through [`SimulatedReplica`] (no Commonware type
//! crosses this module's public API); the harness runs the real [`crate::bft::start`] engine for
//! each replica, hands finalized blocks to [`SimulatedReplica::execute`], signs the returned root
//! with the replica's share ([`sign_partial`]), gossips the share on its own channel, collects
//! shares in a [`CertificationPool`] per replica and hands every certified height to
//! [`SimulatedReplica::certified`], just as the production node does over authenticated p2p.
//!
//! [`run`] checks, over the honest replicas:
//! - safety: no two finalized digests at one height; one state root per height; every recovered
//!   signature verifies under the subnet key over the replica's own root; no block the honest
//!   policies reject is finalized;
//! - liveness: every honest replica certifies at least
//!   [`SimulationConfig::certified_heights_min`] heights within
//!   [`SimulationConfig::time_limit`] of simulated time.
//!
//! Everything is a function of the seed: the runtime's scheduler, the network's latencies and
//! losses, the subnet key (a trusted dealer seeded from it; the DKG is tested on its own) and the
//! node keys. A failing seed therefore replays exactly.

use crate::bft::{
    self, BftConfig, BlockContent, BlockHeader, BlockLimits, BlockPolicy, BlockView, Channels,
    FinalizedBlock, SigningSetup,
};
use crate::certifier::{
    CertificationPool, CertificationPoolConfig, IC_STATE_ROOT_DOMAIN_SEPARATOR, KeyShare,
    PartialError, PartialSignature, PoolEvent, PublicSharing, ROOT_LENGTH, SIGNATURE_LENGTH,
    SignerIndex, sign_partial,
};
use crate::split_mix::SplitMix;
use crate::subnet::PARTIALS_CHANNEL;
use commonware_actor::{Feedback, Unreliable};
use commonware_codec::{Copying, DecodeExt as _, Encode as _};
use commonware_consensus::simplex::{
    scheme::bls12381_threshold::vrf,
    types::{Finalize, Notarize, Proposal, Vote},
};
use commonware_cryptography::{
    Hasher as _, Signer as _,
    bls12381::{
        dkg::feldman_desmedt::deal,
        primitives::{group::G1, ops, sharing::Mode, variant::MinSig},
    },
    ed25519,
    sha256::{Digest, Sha256},
    transcript::{Transcript, Version},
};
use commonware_p2p::{
    CheckedSender, LimitedSender, Receiver as _, Recipients, Sender as _,
    simulated::{self, Link, Network, Oracle},
};
use commonware_runtime::{
    Clock as _, IoBufs, Quota, Runner as _, Spawner as _, Supervisor as _, deterministic,
};
use commonware_utils::{
    N3f1, NZU32, NZUsize,
    ordered::{Quorum as _, Set},
};
use openic_types::Height;
use parking_lot::Mutex;
use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, SystemTime},
};

/// Ingress the Byzantine replica's invalid proposals carry. Every honest policy must refuse it
/// (it is no valid ingress encoding); [`run`] fails if it is ever finalized.
pub const INVALID_INGRESS: &[u8] = b"\xffopenic-simulation-invalid-ingress";

/// How far ahead of the clock the Byzantine replica's "future" proposals are: far beyond any
/// bound an honest policy may allow.
const FUTURE_BLOCK_AHEAD: Duration = Duration::from_secs(3_600);

/// How often a replica re-sends the share of its highest executed height that is not certified
/// yet: a share lost on a lossy link or during a partition is sent again (the pool ignores
/// duplicates).
const SHARE_RESEND_INTERVAL: Duration = Duration::from_millis(500);

/// How often the harness looks whether the run reached its goal.
const PROGRESS_POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Largest message on the simulated network (blocks are bounded by the engine's limits).
const NETWORK_MESSAGE_BYTES_MAX: u32 = 4 * 1024 * 1024;

/// Link characteristics between every pair of replicas.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkConfig {
    /// Mean one-way delay.
    pub latency: Duration,
    /// Standard deviation of the delay.
    pub jitter: Duration,
    /// Probability that a message arrives at all (1.0: no loss).
    pub delivery_probability: f64,
}

/// Replicas cut off from all others for a while (links removed both ways, messages in flight
/// on them lost), then reconnected.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// Simulated time since the start when the links go down.
    pub start: Duration,
    /// How long they stay down.
    pub duration: Duration,
    /// The replicas isolated (each from every replica not in this list).
    pub isolated: Vec<usize>,
}

/// What the one Byzantine replica does wrong (any combination).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByzantineConfig {
    /// Which replica (index into the sorted participants).
    pub replica: usize,
    /// Sends malformed shares, shares over a wrong root, shares claiming another signer, and two
    /// different shares for one height.
    pub bad_partials: bool,
    /// Proposes blocks honest policies must reject: [`INVALID_INGRESS`] or a time an hour ahead.
    pub invalid_blocks: bool,
    /// Signs a conflicting notarize or finalize vote (another payload, same round) for every
    /// one its engine sends, and sends each peer one of the two.
    pub equivocating_votes: bool,
}

/// One simulation run's subnet, network and faults.
#[derive(Clone, Debug, PartialEq)]
pub struct SimulationConfig {
    /// Replicas in the subnet (`3f + 1` tolerates `f` faulty).
    pub replicas: usize,
    /// Links between every pair.
    pub link: LinkConfig,
    /// Scheduled partitions.
    pub partitions: Vec<Partition>,
    /// The Byzantine replica, if any.
    pub byzantine: Option<ByzantineConfig>,
    /// Heights every honest replica must certify for the run to pass.
    pub certified_heights_min: u64,
    /// Simulated time within which they must be certified.
    pub time_limit: Duration,
    /// Limits on a block's ingress.
    pub block_limits: BlockLimits,
}

impl SimulationConfig {
    /// A configuration drawn from `seed`: link latency 5 to 50 ms with jitter, loss of 0, 1 or
    /// 5 %, a Byzantine replica with bad shares and, on some seeds, invalid proposals and
    /// equivocating votes, and on some seeds a partition of an honest replica and one of the
    /// Byzantine one.
    pub fn randomized(seed: u64, replicas: usize, certified_heights_min: u64) -> Self {
        let mut random = SplitMix(seed ^ 0x6f70_656e_6963_5349);
        let latency = Duration::from_millis(5 + random.below(46));
        let delivery_probability = [1.0, 0.99, 0.95][random.below(3) as usize];
        let byzantine_replica = random.below(replicas as u64) as usize;
        let byzantine = ByzantineConfig {
            replica: byzantine_replica,
            bad_partials: true,
            invalid_blocks: random.below(3) != 0,
            equivocating_votes: random.below(3) == 0,
        };
        let mut partitions = Vec::new();
        if random.below(2) == 0 {
            let honest =
                (byzantine_replica + 1 + random.below(replicas as u64 - 1) as usize) % replicas;
            partitions.push(Partition {
                start: Duration::from_millis(200 + random.below(2_000)),
                duration: Duration::from_millis(300 + random.below(2_500)),
                isolated: vec![honest],
            });
        }
        if random.below(4) == 0 {
            partitions.push(Partition {
                start: Duration::from_millis(random.below(3_000)),
                duration: Duration::from_millis(500 + random.below(3_000)),
                isolated: vec![byzantine_replica],
            });
        }
        SimulationConfig {
            replicas,
            link: LinkConfig {
                latency,
                jitter: latency / 4,
                delivery_probability,
            },
            partitions,
            byzantine: Some(byzantine),
            certified_heights_min,
            time_limit: Duration::from_secs(300),
            block_limits: BlockLimits {
                ingress_messages_max: 64,
                ingress_bytes_max: 1024 * 1024,
            },
        }
    }
}

/// The simulated clock, for policies that compare block times with "now".
#[derive(Clone)]
pub struct SimulatedClock {
    context: Arc<Mutex<deterministic::Context>>,
}

impl SimulatedClock {
    /// Simulated nanoseconds since the Unix epoch (the simulation starts at the epoch).
    pub fn now_nanos(&self) -> u64 {
        let now = self.context.lock().current();
        let since_epoch = now
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        u64::try_from(since_epoch.as_nanos()).unwrap_or(u64::MAX)
    }
}

/// What the harness tells the node about the replica it is to build.
#[derive(Clone)]
pub struct ReplicaSetup {
    /// This replica's index among the sorted participants (also its signer index).
    pub index: usize,
    /// Replicas in the subnet.
    pub replicas: usize,
    /// The subnet's root key in DER (what clients verify certificates with).
    pub root_key_der: Vec<u8>,
    /// Whether this replica is the Byzantine one (its records are not checked).
    pub byzantine: bool,
    /// The simulated clock.
    pub clock: SimulatedClock,
}

/// One replica's application as the node implements it: block policy, execution and what it
/// does with certified heights. Called on the simulation's single thread; calls must be
/// deterministic functions of their arguments and earlier calls.
pub trait SimulatedReplica: Send + 'static {
    /// The block policy this replica's engine proposes and verifies with.
    type Policy: BlockPolicy;

    /// The policy (called once, before the engine starts).
    fn policy(&mut self) -> Self::Policy;

    /// Executes a finalized block (heights arrive in order, each once) and returns the state
    /// root this replica signs. An error stops the run as a failure of this replica.
    fn execute(&mut self, block: &FinalizedBlock) -> Result<[u8; ROOT_LENGTH], String>;

    /// The subnet certified `root` at `height` with `signature` (already checked by the
    /// harness). An error stops the run as a failure (for example a certificate a client's
    /// verifier refuses).
    fn certified(
        &mut self,
        height: u64,
        root: [u8; ROOT_LENGTH],
        signature: [u8; SIGNATURE_LENGTH],
    ) -> Result<(), String>;
}

/// What one replica did during a run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ReplicaRecord {
    /// Whether this replica was the Byzantine one.
    pub byzantine: bool,
    /// Digest of the block finalized (delivered) at each height.
    pub finalized: BTreeMap<u64, [u8; 32]>,
    /// State root after executing each height.
    pub roots: BTreeMap<u64, [u8; ROOT_LENGTH]>,
    /// Certified heights in the order they were certified: height, root, signature.
    pub certified: Vec<(u64, [u8; ROOT_LENGTH], [u8; SIGNATURE_LENGTH])>,
    /// Shares refused as misbehaviour (malformed, bad signature, equivocation, ...).
    pub refused_shares: u64,
    /// Heights at which the pool saw `2f + 1` shares over another root than this replica's.
    pub diverged: Vec<u64>,
}

/// The outcome of a run that passed every check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SimulationReport {
    /// The seed.
    pub seed: u64,
    /// The configuration that ran.
    pub config_summary: String,
    /// Per replica, in index order.
    pub replicas: Vec<ReplicaRecord>,
    /// Simulated time the run took.
    pub simulated_time: Duration,
    /// The runtime auditor's digest of every event: equal for two runs of one seed.
    pub auditor_state: String,
}

/// Why a run failed. Every variant names the seed's replica and height involved, so the seed
/// replays straight to it.
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum SimulationFailure {
    /// The configuration cannot run (too few replicas, Byzantine index out of range, ...).
    #[error("invalid simulation configuration: {0}")]
    Config(String),
    /// Two honest replicas finalized different blocks at one height.
    #[error("fork at height {height}: replicas {first} and {second} finalized different blocks")]
    Fork {
        /// The height.
        height: u64,
        /// One replica.
        first: usize,
        /// Another one.
        second: usize,
    },
    /// Two honest replicas computed different state roots at one height.
    #[error("state divergence at height {height}: replicas {first} and {second} differ")]
    Divergence {
        /// The height.
        height: u64,
        /// One replica.
        first: usize,
        /// Another one.
        second: usize,
    },
    /// A replica's finalized heights skip one or its root is missing for a finalized height.
    #[error("replica {replica} has a gap at height {height}")]
    Gap {
        /// The replica.
        replica: usize,
        /// The first height missing.
        height: u64,
    },
    /// A recovered signature does not verify under the subnet key over the replica's root.
    #[error("replica {replica} certified height {height} with a signature that does not verify")]
    BadCertificate {
        /// The replica.
        replica: usize,
        /// The height.
        height: u64,
    },
    /// A block honest policies must reject was finalized.
    #[error("an invalid block was finalized at height {height} (seen by replica {replica})")]
    InvalidBlockFinalized {
        /// The replica that executed it.
        replica: usize,
        /// The height.
        height: u64,
    },
    /// An honest replica's application reported an error.
    #[error("replica {replica} failed: {reason}")]
    Replica {
        /// The replica.
        replica: usize,
        /// What it said.
        reason: String,
    },
    /// The honest replicas did not certify enough heights in time.
    #[error(
        "liveness: within {time_limit:?} the honest replicas certified up to heights {certified:?} \
         (finalized {finalized:?}); {required} required"
    )]
    Liveness {
        /// The simulated time bound.
        time_limit: Duration,
        /// Highest certified height per replica (Byzantine included, for context).
        certified: Vec<u64>,
        /// Highest finalized height per replica.
        finalized: Vec<u64>,
        /// Heights required.
        required: u64,
    },
}

/// Shared between a replica's driver task and the checker.
struct ReplicaShared {
    record: Mutex<ReplicaRecord>,
    failure: Mutex<Option<SimulationFailure>>,
}

/// The Byzantine replica's policy: every other proposal is invalid (one in four carries
/// [`INVALID_INGRESS`], one in four has a time an hour ahead).
#[derive(Clone)]
struct InvalidProposals<P> {
    inner: P,
    /// Off on honest replicas, which then propose what their policy proposes.
    enabled: bool,
    proposals: Arc<AtomicU64>,
}

impl<P: BlockPolicy> BlockPolicy for InvalidProposals<P> {
    fn propose(&mut self, parent: &BlockHeader) -> BlockContent {
        let mut content = self.inner.propose(parent);
        if !self.enabled {
            return content;
        }
        match self.proposals.fetch_add(1, Ordering::Relaxed) % 4 {
            0 => content.ingress.push(INVALID_INGRESS.to_vec()),
            2 => {
                content.time_nanos = content
                    .time_nanos
                    .saturating_add(FUTURE_BLOCK_AHEAD.as_nanos() as u64);
            }
            _ => {}
        }
        content
    }

    fn verify(&mut self, parent: &BlockHeader, block: &BlockView<'_>) -> Result<(), String> {
        self.inner.verify(parent, block)
    }

    fn has_work(&self) -> bool {
        self.inner.has_work()
    }
}

/// The engine's signing scheme (see `bft::seeds`).
type Scheme = vrf::Scheme<ed25519::PublicKey, MinSig>;

/// The Byzantine replica's vote sender: for every notarize or finalize vote its engine sends,
/// it signs another over a different payload in the same round and sends half the recipients
/// one and half the other (an equivocation honest replicas cannot tell from one message).
#[derive(Clone)]
struct EquivocatingSender<S> {
    inner: S,
    /// The replica's signing scheme; `None` on honest replicas, whose votes pass unchanged.
    scheme: Option<Scheme>,
}

struct EquivocatingChecked<'a, S: LimitedSender + 'a> {
    checked: S::Checked<'a>,
    extra: S,
    scheme: Option<Scheme>,
}

impl<S: LimitedSender<PublicKey = ed25519::PublicKey>> LimitedSender for EquivocatingSender<S> {
    type PublicKey = ed25519::PublicKey;
    type Checked<'a>
        = EquivocatingChecked<'a, S>
    where
        Self: 'a;

    fn check(
        &mut self,
        recipients: Recipients<Self::PublicKey>,
    ) -> Result<Self::Checked<'_>, SystemTime> {
        let extra = self.inner.clone();
        let scheme = self.scheme.clone();
        let checked = self.inner.check(recipients)?;
        Ok(EquivocatingChecked {
            checked,
            extra,
            scheme,
        })
    }
}

/// A payload no honest replica proposed.
fn conflicting_payload(payload: &Digest) -> Digest {
    Sha256::hash(&[payload.as_ref(), b"openic-simulation-equivocation"])
}

impl<S: LimitedSender<PublicKey = ed25519::PublicKey>> CheckedSender
    for EquivocatingChecked<'_, S>
{
    type PublicKey = ed25519::PublicKey;

    fn recipients(&self) -> Vec<Self::PublicKey> {
        self.checked.recipients()
    }

    fn send(self, message: impl Into<IoBufs> + Send, priority: bool) -> Unreliable<Feedback> {
        let Some(scheme) = &self.scheme else {
            return self.checked.send(message, priority);
        };
        let bytes = message.into().coalesce();
        let conflicting = match Vote::<Scheme, Digest>::decode(Copying(bytes.as_ref())) {
            Ok(Vote::Notarize(vote)) => {
                let proposal = Proposal::new(
                    vote.proposal.round,
                    vote.proposal.parent,
                    conflicting_payload(&vote.proposal.payload),
                );
                Notarize::sign(scheme, proposal).map(Vote::<Scheme, Digest>::Notarize)
            }
            Ok(Vote::Finalize(vote)) => {
                let proposal = Proposal::new(
                    vote.proposal.round,
                    vote.proposal.parent,
                    conflicting_payload(&vote.proposal.payload),
                );
                Finalize::sign(scheme, proposal).map(Vote::<Scheme, Digest>::Finalize)
            }
            _ => None,
        };
        let Some(conflicting) = conflicting else {
            return self.checked.send(bytes, priority);
        };
        let recipients = self.checked.recipients();
        let (honest, other): (Vec<_>, Vec<_>) = recipients
            .into_iter()
            .enumerate()
            .partition(|(position, _)| position % 2 == 0);
        let honest: Vec<_> = honest.into_iter().map(|(_, key)| key).collect();
        let other: Vec<_> = other.into_iter().map(|(_, key)| key).collect();
        let mut extra = self.extra;
        if !other.is_empty() {
            extra.send(Recipients::Some(other), conflicting.encode(), priority);
        }
        // The checked sender is bound to the original recipients; send the honest vote
        // through the plain sender to its half instead.
        drop(self.checked);
        if !honest.is_empty() {
            extra.send(Recipients::Some(honest), bytes, priority);
        }
        Unreliable::Outcome(Feedback::Ok)
    }
}

/// The shares the Byzantine replica sends instead of its honest one at `height`.
fn byzantine_shares(
    share: &KeyShare,
    replicas: usize,
    height: u64,
    root: &[u8; ROOT_LENGTH],
) -> Vec<Vec<u8>> {
    let honest = sign_partial(share, Height(height), root);
    let mut wrong_root = *root;
    wrong_root[0] ^= 0xff;
    let wrong = sign_partial(share, Height(height), &wrong_root);
    match height % 4 {
        // Garbage: wrong version byte and length.
        0 => vec![vec![0xEE; 40], honest.to_bytes()[..60].to_vec()],
        // A valid signature over a root nobody else has.
        1 => vec![wrong.to_bytes().to_vec()],
        // Its own signature under another replica's signer index.
        2 => {
            let mut impersonated = honest;
            impersonated.signer = SignerIndex(((share.signer().0 as usize + 1) % replicas) as u32);
            vec![impersonated.to_bytes().to_vec()]
        }
        // Two different valid shares for one height.
        _ => vec![honest.to_bytes().to_vec(), wrong.to_bytes().to_vec()],
    }
}

/// Whether `signature` is the subnet key's signature of `root` in the IC's format.
fn verifies(sharing: &PublicSharing, root: &[u8; ROOT_LENGTH], signature: &[u8; 48]) -> bool {
    let Ok(point) = G1::decode(Copying(signature.as_slice())) else {
        return false;
    };
    let mut message = IC_STATE_ROOT_DOMAIN_SEPARATOR.to_vec();
    message.extend_from_slice(root);
    ops::verify::<MinSig>(
        sharing.commonware_sharing().public(),
        openic_crypto::bls::SIGNATURE_DST,
        &message,
        &point,
    )
    .is_ok()
}

/// Engine settings for replica `index` of a simulated subnet.
fn bft_config(index: usize, config: &SimulationConfig) -> BftConfig {
    BftConfig {
        partition_prefix: format!("replica-{index}"),
        namespace: b"openic-simulation".to_vec(),
        block_limits: config.block_limits,
        ..BftConfig::default()
    }
}

/// Runs one simulation: builds `config.replicas` replicas with `make_replica`, runs them until
/// every honest replica certified `config.certified_heights_min` heights (and every scheduled
/// partition healed) or `config.time_limit` passed, and checks the properties in the module
/// docs. Deterministic in `seed` (given a deterministic `make_replica`).
///
/// # Panics
/// If the node's replica panics, or an engine cannot start (a harness bug).
pub fn run<R, F>(
    seed: u64,
    config: &SimulationConfig,
    make_replica: F,
) -> Result<SimulationReport, SimulationFailure>
where
    R: SimulatedReplica,
    F: FnMut(&ReplicaSetup) -> R + Send + 'static,
{
    if config.replicas < 4 {
        return Err(SimulationFailure::Config(
            "at least 4 replicas (3f + 1 with f = 1)".to_string(),
        ));
    }
    if let Some(byzantine) = &config.byzantine
        && byzantine.replica >= config.replicas
    {
        return Err(SimulationFailure::Config(format!(
            "Byzantine replica {} of {}",
            byzantine.replica, config.replicas
        )));
    }
    let runner = deterministic::Runner::new(
        deterministic::Config::new()
            .with_seed(seed)
            .with_timeout(Some(config.time_limit * 4)),
    );
    let config = config.clone();
    runner.start(|context| async move { simulate(context, seed, config, make_replica).await })
}

async fn simulate<R, F>(
    context: deterministic::Context,
    seed: u64,
    config: SimulationConfig,
    mut make_replica: F,
) -> Result<SimulationReport, SimulationFailure>
where
    R: SimulatedReplica,
    F: FnMut(&ReplicaSetup) -> R,
{
    let replicas = config.replicas;
    let byzantine_index = config.byzantine.map(|b| b.replica);

    // Keys: node identities and a trusted-dealer subnet key, both from the seed.
    let keys: Vec<ed25519::PrivateKey> = (0..replicas as u64)
        .map(|i| ed25519::PrivateKey::from_seed(seed.wrapping_mul(1_000).wrapping_add(i)))
        .collect();
    let participants = Set::from_iter_dedup(keys.iter().map(|k| k.public_key()));
    let mut keys = keys;
    keys.sort_by_key(|k| participants.index(&k.public_key()).map(|i| i.get()));
    let dealer_rng = Transcript::new(b"openic-simulation", Version::V1)
        .commit(seed.to_be_bytes().as_slice())
        .noise(b"deal");
    let (output, shares) =
        deal::<MinSig, _, N3f1>(dealer_rng, Mode::NonZeroCounter, participants.clone())
            .map_err(|e| SimulationFailure::Config(format!("dealing the subnet key: {e:?}")))?;
    let sharing = PublicSharing::from_sharing(output.public().clone())
        .map_err(|e| SimulationFailure::Config(e.to_string()))?;
    let root_key_der = sharing.root_key_der();

    // The network: every pair linked, then the scheduled partitions.
    let (network, oracle) = Network::new_with_peers(
        context.child("network"),
        simulated::Config {
            max_size: NETWORK_MESSAGE_BYTES_MAX,
            max_peers_per_set: NZUsize!(replicas),
            disconnect_on_block: true,
            tracked_peer_sets: NZUsize!(1),
        },
        participants.iter().cloned(),
    )
    .await;
    network.start();
    let link = Link {
        latency: config.link.latency,
        jitter: config.link.jitter,
        success_rate: delivery_probability(config.link.delivery_probability),
    };
    let public_keys: Vec<ed25519::PublicKey> = keys.iter().map(|k| k.public_key()).collect();
    for a in &public_keys {
        for b in &public_keys {
            if a != b {
                oracle
                    .add_link(a.clone(), b.clone(), link.clone())
                    .await
                    .expect("a fresh link");
            }
        }
    }
    for partition in &config.partitions {
        schedule_partition(&context, &oracle, &public_keys, partition, link.clone());
    }

    let clock = SimulatedClock {
        context: Arc::new(Mutex::new(context.child("clock"))),
    };
    let mut shared = Vec::new();
    for (index, key) in keys.iter().enumerate() {
        let byzantine = byzantine_index == Some(index);
        let setup = ReplicaSetup {
            index,
            replicas,
            root_key_der: root_key_der.clone(),
            byzantine,
            clock: clock.clone(),
        };
        let replica = make_replica(&setup);
        let share = KeyShare::from_share(
            shares
                .get_value(&key.public_key())
                .expect("the dealer dealt every participant")
                .clone(),
        );
        let behaviour = if byzantine { config.byzantine } else { None };
        shared.push(
            start_replica(
                &context,
                &oracle,
                &config,
                index,
                key.clone(),
                &participants,
                &sharing,
                share,
                behaviour,
                replica,
            )
            .await,
        );
    }

    // Wait for the goal or the deadline.
    let started = context.current();
    let partitions_end = config
        .partitions
        .iter()
        .map(|p| p.start + p.duration)
        .max()
        .unwrap_or_default();
    let honest: Vec<usize> = (0..replicas)
        .filter(|i| Some(*i) != byzantine_index)
        .collect();
    let elapsed = |context: &deterministic::Context| {
        context
            .current()
            .duration_since(started)
            .unwrap_or_default()
    };
    loop {
        for &index in &honest {
            if let Some(failure) = shared[index].failure.lock().clone() {
                return Err(failure);
            }
        }
        let done = honest.iter().all(|&index| {
            let record = shared[index].record.lock();
            record.certified.last().map(|c| c.0).unwrap_or(0) >= config.certified_heights_min
        });
        if done && elapsed(&context) >= partitions_end {
            break;
        }
        if elapsed(&context) >= config.time_limit {
            let highest = |f: &dyn Fn(&ReplicaRecord) -> u64| -> Vec<u64> {
                shared.iter().map(|s| f(&s.record.lock())).collect()
            };
            return Err(SimulationFailure::Liveness {
                time_limit: config.time_limit,
                certified: highest(&|r| r.certified.last().map(|c| c.0).unwrap_or(0)),
                finalized: highest(&|r| r.finalized.keys().next_back().copied().unwrap_or(0)),
                required: config.certified_heights_min,
            });
        }
        context.sleep(PROGRESS_POLL_INTERVAL).await;
    }
    let simulated_time = elapsed(&context);
    let records: Vec<ReplicaRecord> = shared.iter().map(|s| s.record.lock().clone()).collect();
    check_safety(&records, &honest, &sharing)?;
    Ok(SimulationReport {
        seed,
        config_summary: format!("{config:?}"),
        replicas: records,
        simulated_time,
        auditor_state: context.auditor().state(),
    })
}

/// `probability` (clamped to [0, 1]) in the network's fixed-point form.
fn delivery_probability(probability: f64) -> commonware_utils::Probability {
    const DENOMINATOR: u64 = 1_000_000;
    let numerator = (probability.clamp(0.0, 1.0) * DENOMINATOR as f64).round() as u64;
    commonware_utils::Probability::new(numerator, DENOMINATOR)
        .expect("a numerator at most the denominator")
}

/// Cuts `partition.isolated` off from the others at its start and reconnects them at its end.
fn schedule_partition(
    context: &deterministic::Context,
    oracle: &Oracle<ed25519::PublicKey, deterministic::Context>,
    public_keys: &[ed25519::PublicKey],
    partition: &Partition,
    link: Link,
) {
    let mut pairs = Vec::new();
    for (i, a) in public_keys.iter().enumerate() {
        for (j, b) in public_keys.iter().enumerate() {
            if partition.isolated.contains(&i) != partition.isolated.contains(&j) {
                pairs.push((a.clone(), b.clone()));
            }
        }
    }
    let oracle = oracle.clone();
    let partition = partition.clone();
    context.child("partition").spawn(move |context| async move {
        context.sleep(partition.start).await;
        for (a, b) in &pairs {
            let _ = oracle.remove_link(a.clone(), b.clone()).await;
        }
        context.sleep(partition.duration).await;
        for (a, b) in &pairs {
            let _ = oracle.add_link(a.clone(), b.clone(), link.clone()).await;
        }
    });
}

/// Starts replica `index`: its engine, and the task that executes, signs, gossips and certifies.
#[allow(clippy::too_many_arguments)]
async fn start_replica<R: SimulatedReplica>(
    context: &deterministic::Context,
    oracle: &Oracle<ed25519::PublicKey, deterministic::Context>,
    config: &SimulationConfig,
    index: usize,
    key: ed25519::PrivateKey,
    participants: &Set<ed25519::PublicKey>,
    sharing: &PublicSharing,
    share: KeyShare,
    byzantine: Option<ByzantineConfig>,
    mut replica: R,
) -> Arc<ReplicaShared> {
    let bft_config = bft_config(index, config);
    let control = oracle.control(key.public_key());
    let mut registered = Vec::new();
    for spec in bft::channels(&bft_config, config.replicas as u32) {
        registered.push(
            control
                .register(spec.id, spec.rate_limit)
                .await
                .expect("a fresh channel"),
        );
    }
    let (mut share_sender, mut share_receiver) = control
        .register(PARTIALS_CHANNEL, Quota::per_second(NZU32!(10_000)))
        .await
        .expect("a fresh channel");
    let mut registered = registered.into_iter();
    let mut next = || registered.next().expect("five engine channels");
    let (votes, certificates, certificate_fetch, blocks, block_fetch) =
        (next(), next(), next(), next(), next());
    let signing = SigningSetup::new(
        &bft_config.namespace,
        sharing.commonware_sharing().clone(),
        share.commonware_share().clone(),
        participants.iter().cloned().collect(),
        key.clone(),
    )
    .expect("dealt keys fit together");
    let engine_context = context.child("replica").with_attribute("index", index);
    let driver_context = engine_context.child("driver");
    let policy = replica.policy();
    let scheme = byzantine.is_some_and(|b| b.equivocating_votes).then(|| {
        Scheme::signer(
            &bft_config.namespace,
            participants.clone(),
            sharing.commonware_sharing().clone(),
            share.commonware_share().clone(),
        )
        .expect("dealt keys fit together")
    });
    let policy = InvalidProposals {
        inner: policy,
        enabled: byzantine.is_some_and(|b| b.invalid_blocks),
        proposals: Arc::new(AtomicU64::new(0)),
    };
    let (handle, mut deliveries) = bft::start(
        engine_context,
        &bft_config,
        signing,
        policy,
        oracle.manager(),
        control,
        Channels {
            votes: (
                EquivocatingSender {
                    inner: votes.0,
                    scheme,
                },
                votes.1,
            ),
            certificates: (
                EquivocatingSender {
                    inner: certificates.0,
                    scheme: None,
                },
                certificates.1,
            ),
            certificate_fetch: (
                EquivocatingSender {
                    inner: certificate_fetch.0,
                    scheme: None,
                },
                certificate_fetch.1,
            ),
            blocks: (
                EquivocatingSender {
                    inner: blocks.0,
                    scheme: None,
                },
                blocks.1,
            ),
            block_fetch: (
                EquivocatingSender {
                    inner: block_fetch.0,
                    scheme: None,
                },
                block_fetch.1,
            ),
        },
    )
    .await
    .expect("the engine starts");
    // The engine runs until the simulation ends.
    std::mem::forget(handle);

    let shared = Arc::new(ReplicaShared {
        record: Mutex::new(ReplicaRecord {
            byzantine: byzantine.is_some(),
            ..ReplicaRecord::default()
        }),
        failure: Mutex::new(None),
    });
    let record = shared.clone();
    let sharing = sharing.clone();
    let replicas = config.replicas;
    let bad_partials = byzantine.is_some_and(|b| b.bad_partials);
    let participants = participants.clone();
    driver_context.spawn(move |context| async move {
        // As in production (`crate::subnet`): a share is taken only from the replica it belongs
        // to, and the pool checks recovered signatures rather than every share.
        let mut pool = CertificationPool::new(
            sharing.clone(),
            CertificationPoolConfig {
                verify_on_arrival: false,
                ..CertificationPoolConfig::default()
            },
            Height(0),
        );
        let mut invalid_found_later = 0;
        let mut executed = 0u64;
        // The latest share this replica sent and that is not certified yet, for resending.
        let mut latest_share: Option<Vec<Vec<u8>>> = None;
        let fail = |reason: SimulationFailure| {
            let mut failure = record.failure.lock();
            if failure.is_none() {
                *failure = Some(reason);
            }
        };
        loop {
            let mut events = Vec::new();
            commonware_macros::select! {
                delivered = deliveries.next() => {
                    let Some((block, ack)) = delivered else {
                        return;
                    };
                    if block.height <= executed {
                        ack.acknowledge();
                        continue;
                    }
                    if block.height != executed + 1 {
                        fail(SimulationFailure::Gap { replica: index, height: executed + 1 });
                        return;
                    }
                    record.record.lock().finalized.insert(block.height, block.digest);
                    ack.acknowledge();
                    if byzantine.is_none()
                        && block.ingress.iter().any(|m| m.as_slice() == INVALID_INGRESS)
                    {
                        fail(SimulationFailure::InvalidBlockFinalized {
                            replica: index,
                            height: block.height,
                        });
                    }
                    let root = match replica.execute(&block) {
                        Ok(root) => root,
                        Err(reason) => {
                            fail(SimulationFailure::Replica { replica: index, reason });
                            return;
                        }
                    };
                    executed = block.height;
                    record.record.lock().roots.insert(block.height, root);
                    let own = sign_partial(&share, Height(block.height), &root);
                    let outgoing = if bad_partials {
                        byzantine_shares(&share, replicas, block.height, &root)
                    } else {
                        vec![own.to_bytes().to_vec()]
                    };
                    for bytes in &outgoing {
                        share_sender.send(Recipients::All, bytes.clone(), false);
                    }
                    latest_share = Some(outgoing);
                    if let Ok(event) = pool.set_own_root(Height(block.height), root) {
                        events.extend(event);
                    }
                    if let Ok(event) = pool.add_partial(&own) {
                        events.extend(event);
                    }
                },
                received = share_receiver.recv() => {
                    let Ok((peer, message)) = received else {
                        return;
                    };
                    let sender = participants.position(&peer).map(|p| p as u32);
                    let added = PartialSignature::from_bytes(message.as_ref()).and_then(|partial| {
                        if sender != Some(partial.signer.0) {
                            return Err(PartialError::Malformed(
                                "a share for another signer than its sender",
                            ));
                        }
                        pool.add_partial(&partial)
                    });
                    match added {
                        Ok(event) => events.extend(event),
                        Err(error) if error.is_misbehaviour() => {
                            record.record.lock().refused_shares += 1;
                        }
                        Err(_) => {}
                    }
                    let found = pool.invalid_found_later();
                    record.record.lock().refused_shares += found - invalid_found_later;
                    invalid_found_later = found;
                },
                _ = context.sleep(SHARE_RESEND_INTERVAL) => {
                    if pool.certified_height().0 < executed
                        && let Some(outgoing) = &latest_share
                    {
                        for bytes in outgoing {
                            share_sender.send(Recipients::All, bytes.clone(), false);
                        }
                    }
                },
            }
            for event in events {
                match event {
                    PoolEvent::Certified {
                        height,
                        root,
                        signature,
                    } => {
                        if !verifies(&sharing, &root, &signature) {
                            fail(SimulationFailure::BadCertificate {
                                replica: index,
                                height: height.0,
                            });
                        }
                        record
                            .record
                            .lock()
                            .certified
                            .push((height.0, root, signature));
                        if let Err(reason) = replica.certified(height.0, root, signature) {
                            fail(SimulationFailure::Replica {
                                replica: index,
                                reason,
                            });
                            return;
                        }
                    }
                    PoolEvent::Diverged { height, .. } => {
                        record.record.lock().diverged.push(height.0);
                    }
                }
            }
        }
    });
    shared
}

/// The safety checks over the honest replicas' records.
fn check_safety(
    records: &[ReplicaRecord],
    honest: &[usize],
    sharing: &PublicSharing,
) -> Result<(), SimulationFailure> {
    let mut digests: BTreeMap<u64, (usize, [u8; 32])> = BTreeMap::new();
    let mut roots: BTreeMap<u64, (usize, [u8; ROOT_LENGTH])> = BTreeMap::new();
    for &index in honest {
        let record = &records[index];
        for (expected, (&height, digest)) in (1u64..).zip(&record.finalized) {
            if height != expected {
                return Err(SimulationFailure::Gap {
                    replica: index,
                    height: expected,
                });
            }
            match digests.get(&height) {
                Some((first, existing)) if existing != digest => {
                    return Err(SimulationFailure::Fork {
                        height,
                        first: *first,
                        second: index,
                    });
                }
                Some(_) => {}
                None => {
                    digests.insert(height, (index, *digest));
                }
            }
        }
        for (&height, root) in &record.roots {
            match roots.get(&height) {
                Some((first, existing)) if existing != root => {
                    return Err(SimulationFailure::Divergence {
                        height,
                        first: *first,
                        second: index,
                    });
                }
                Some(_) => {}
                None => {
                    roots.insert(height, (index, *root));
                }
            }
        }
        for (height, root, signature) in &record.certified {
            if record.roots.get(height) != Some(root) || !verifies(sharing, root, signature) {
                return Err(SimulationFailure::BadCertificate {
                    replica: index,
                    height: *height,
                });
            }
        }
        if let Some(height) = record.diverged.first() {
            return Err(SimulationFailure::Divergence {
                height: *height,
                first: index,
                second: index,
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy that proposes nothing but accepts only `tx-` ingress and times near its clock.
    #[derive(Clone)]
    struct HashPolicy {
        clock: SimulatedClock,
    }

    impl BlockPolicy for HashPolicy {
        fn propose(&mut self, parent: &BlockHeader) -> BlockContent {
            BlockContent {
                time_nanos: self.clock.now_nanos().max(parent.time_nanos + 1),
                ingress: vec![format!("tx-{}", parent.height).into_bytes()],
            }
        }

        fn verify(&mut self, _parent: &BlockHeader, block: &BlockView<'_>) -> Result<(), String> {
            if block.time_nanos > self.clock.now_nanos() + 2_000_000_000 {
                return Err("time ahead".to_string());
            }
            if block.ingress.iter().any(|m| !m.starts_with(b"tx-")) {
                return Err("bad ingress".to_string());
            }
            Ok(())
        }
    }

    /// State: a hash chain over the finalized digests.
    struct HashReplica {
        clock: SimulatedClock,
        root: [u8; 32],
    }

    impl SimulatedReplica for HashReplica {
        type Policy = HashPolicy;

        fn policy(&mut self) -> HashPolicy {
            HashPolicy {
                clock: self.clock.clone(),
            }
        }

        fn execute(&mut self, block: &FinalizedBlock) -> Result<[u8; 32], String> {
            self.root = Sha256::hash(&[self.root.as_slice(), block.digest.as_slice()]).0;
            Ok(self.root)
        }

        fn certified(&mut self, _: u64, _: [u8; 32], _: [u8; 48]) -> Result<(), String> {
            Ok(())
        }
    }

    fn run_seed(seed: u64) -> SimulationReport {
        let config = SimulationConfig::randomized(seed, 4, 8);
        run(seed, &config, |setup: &ReplicaSetup| HashReplica {
            clock: setup.clock.clone(),
            root: [0; 32],
        })
        .unwrap_or_else(|failure| panic!("seed {seed} ({config:?}): {failure}"))
    }

    #[test]
    fn subnets_with_a_byzantine_replica_stay_safe_and_live() {
        for seed in 0..8 {
            let report = run_seed(seed);
            assert!(report.replicas.iter().any(|r| r.byzantine));
        }
    }

    #[test]
    fn a_seed_replays_exactly() {
        assert_eq!(run_seed(3), run_seed(3));
    }

    #[test]
    fn every_byzantine_behaviour_at_once() {
        let mut config = SimulationConfig::randomized(11, 4, 8);
        config.byzantine = Some(ByzantineConfig {
            replica: 2,
            bad_partials: true,
            invalid_blocks: true,
            equivocating_votes: true,
        });
        let report = run(11, &config, |setup: &ReplicaSetup| HashReplica {
            clock: setup.clock.clone(),
            root: [0; 32],
        })
        .unwrap_or_else(|failure| panic!("{failure}"));
        // Honest replicas refused the Byzantine replica's bad shares.
        assert!(
            report
                .replicas
                .iter()
                .filter(|r| !r.byzantine)
                .all(|r| r.refused_shares > 0)
        );
    }
}
