//! A replica's link to its subnet: Commonware's runtime on a thread of its own, running the
//! authenticated p2p network, the subnet key's generation at genesis, the BFT engine, and the
//! gossip of ingress and certification shares. The node talks to it through plain channels and
//! the [`BlockPolicy`] it passes in; no Commonware type crosses this module's public API.
//!
//! Start-up ([`SubnetService::start`]) blocks until the replica holds its share of the subnet
//! key: loaded from the key store, or made by the DKG with every member over p2p (all members
//! must be online at genesis, see [`crate::dkg`]) and stored before the engine starts, so a
//! replica never signs anything with a share it could lose.
//!
//! Channels on the p2p network (one multiplexed, encrypted connection per peer):
//! the engine's own ([`crate::bft::channels`]), then [`DKG_CHANNEL`], [`INGRESS_CHANNEL`] and
//! [`PARTIALS_CHANNEL`]. Every inbound message is bounded by the network's largest message and
//! decoded by the node with its own limits; a certification share is accepted only from the
//! replica it belongs to; gossip queues are bounded and drop when full (a
//! dropped ingress message still reaches the subnet through the replica that received it).

use crate::bft::{self, BftConfig, BlockPolicy, Channels, Deliveries, FloorControl, SigningSetup};
use crate::certifier::{KeyShare, PartialSignature, PublicSharing};
use crate::dkg::{DkgSession, DkgStatus, Recipient};
use commonware_codec::{Copying, DecodeExt as _};
use commonware_cryptography::{Signer as _, ed25519};
use commonware_p2p::authenticated::lookup;
use commonware_p2p::{Address, AddressableManager as _, Receiver as _, Recipients, Sender as _};
use commonware_runtime::{Clock as _, Quota, Runner as _, Spawner as _, Supervisor as _};
use commonware_stream::{cups, sake};
use commonware_utils::ordered::Map;
use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::time::Duration;
use tracing::{info, warn};

/// p2p channel of the key generation at genesis.
pub const DKG_CHANNEL: u64 = 100;
/// p2p channel of ingress gossip.
pub const INGRESS_CHANNEL: u64 = 101;
/// p2p channel of certification shares (partial signatures of state roots and catch-up
/// statements).
pub const PARTIALS_CHANNEL: u64 = 102;
/// p2p channel of state sync: adverts of certified checkpoints, manifest and chunk requests and
/// their answers (encoded by the node).
pub const STATE_SYNC_CHANNEL: u64 = 103;

/// The largest state-sync message: a chunk of a little over 1 MiB plus its header.
pub const STATE_SYNC_MESSAGE_BYTES_MAX: usize = 2 * 1024 * 1024;

/// State-sync messages one peer may send per second (each request is answered by at most one
/// chunk, so this also bounds what a peer can make this replica read and send).
const STATE_SYNC_MESSAGES_PER_SECOND: u32 = 512;

/// How often the DKG resends what peers may have missed (a peer that was still connecting).
const DKG_RETRANSMIT_INTERVAL: Duration = Duration::from_secs(1);

/// How long a dealer waits for every player's acknowledgement before publishing its log
/// (revealing the shares of silent players).
const DKG_DEALING_TIMEOUT: Duration = Duration::from_secs(30);

/// The largest ingress message gossiped: the HTTP interface's largest body plus room for the
/// effective canister id.
pub const INGRESS_GOSSIP_BYTES_MAX: usize = 2 * 1024 * 1024 + 64 * 1024 + 64;

/// One member of the subnet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetMember {
    /// The member's Ed25519 public key (its node identity).
    pub public_key: [u8; 32],
    /// Where it accepts p2p connections.
    pub p2p_address: SocketAddr,
}

/// Settings of one replica's link to its subnet.
#[derive(Clone, Debug)]
pub struct SubnetServiceConfig {
    /// This replica's Ed25519 secret key (32 bytes, the same key that signs its query replies).
    pub identity_secret: [u8; 32],
    /// The subnet's members, this replica included.
    pub members: Vec<SubnetMember>,
    /// Where this replica listens for its peers.
    pub listen_address: SocketAddr,
    /// Unique per subnet (the genesis file's hash): binds every p2p handshake, DKG message and
    /// consensus vote to this subnet.
    pub namespace: Vec<u8>,
    /// Where the engine keeps its journals and archives.
    pub storage_directory: PathBuf,
    /// The engine's settings (its `namespace` is replaced by the one above).
    pub bft: BftConfig,
    /// Ingress and certification-share messages waiting to be sent, at most.
    pub outbound_queue_max: usize,
    /// Messages received from peers and not yet handled by the node, at most.
    pub inbound_queue_max: usize,
    /// Messages per second one peer may send on a gossip channel.
    pub gossip_messages_per_second: u32,
    /// Threads of the runtime that runs networking and consensus.
    pub worker_threads: usize,
}

impl SubnetServiceConfig {
    /// Defaults for everything but the identity, members, addresses and storage.
    pub fn new(
        identity_secret: [u8; 32],
        members: Vec<SubnetMember>,
        listen_address: SocketAddr,
        namespace: Vec<u8>,
        storage_directory: PathBuf,
    ) -> Self {
        SubnetServiceConfig {
            identity_secret,
            members,
            listen_address,
            namespace,
            storage_directory,
            bft: BftConfig::default(),
            outbound_queue_max: 16_384,
            inbound_queue_max: 16_384,
            gossip_messages_per_second: 20_000,
            worker_threads: 2,
        }
    }
}

/// The subnet key as one replica holds it: the public side and its own share.
#[derive(Clone, Debug)]
pub struct SubnetKey {
    /// The public side, identical on every replica; gives the root key.
    pub sharing: PublicSharing,
    /// This replica's share.
    pub share: KeyShare,
}

/// Where a replica keeps its share of the subnet key (the node's state directory).
pub trait SubnetKeyStore: Send + 'static {
    /// The stored key, or `None` before the key generation finished.
    fn load(&self) -> Result<Option<SubnetKey>, String>;
    /// Stores the key durably; returns only once it survives a crash.
    fn store(&self, key: &SubnetKey) -> Result<(), String>;
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum SubnetError {
    /// The settings do not make a subnet (this replica not a member, bad keys, ...).
    #[error("invalid subnet settings: {0}")]
    Config(String),
    /// The key store failed.
    #[error("subnet key store: {0}")]
    KeyStore(String),
    /// The key generation failed; the members must start a new round.
    #[error("subnet key generation failed: {0}")]
    Dkg(String),
    /// The consensus engine could not start.
    #[error("consensus engine: {0}")]
    Engine(String),
    /// The runtime thread stopped before the service was ready.
    #[error("the subnet runtime stopped during start-up: {0}")]
    Stopped(String),
}

/// A message from a peer, for the node to check and use.
#[derive(Debug)]
pub enum Inbound {
    /// An ingress message as another replica received it (opaque to this module).
    Ingress(Vec<u8>),
    /// A certification share.
    Partial(PartialSignature),
    /// A state-sync message (opaque to this module) and the peer that sent it.
    Sync {
        /// The sender's Ed25519 public key.
        from: [u8; 32],
        /// The message.
        bytes: Vec<u8>,
    },
}

enum Outbound {
    Ingress(Vec<u8>),
    Partial(PartialSignature),
    Sync {
        to: Option<[u8; 32]>,
        bytes: Vec<u8>,
    },
}

/// A running link to the subnet.
pub struct SubnetService {
    key: SubnetKey,
    public_key: [u8; 32],
    deliveries: parking_lot::Mutex<Option<Deliveries>>,
    inbound: parking_lot::Mutex<Option<tokio::sync::mpsc::Receiver<Inbound>>>,
    outbound: tokio::sync::mpsc::Sender<Outbound>,
    floor: FloorControl,
    stop: parking_lot::Mutex<Option<tokio::sync::oneshot::Sender<()>>>,
    thread: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl std::fmt::Debug for SubnetService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubnetService")
            .field("public_key", &hex_prefix(&self.public_key))
            .finish()
    }
}

fn hex_prefix(bytes: &[u8]) -> String {
    bytes.iter().take(4).map(|b| format!("{b:02x}")).collect()
}

struct Ready {
    key: SubnetKey,
    deliveries: Deliveries,
    floor: FloorControl,
}

impl SubnetService {
    /// Connects to the subnet, obtains this replica's share of the subnet key (from `key_store`
    /// or by the key generation), starts the consensus engine with the policy `make_policy`
    /// builds from the key, and returns once finalized blocks can be consumed. Blocks the calling
    /// thread until then (at genesis, until every member took part in the key generation).
    pub fn start<P, F>(
        config: SubnetServiceConfig,
        key_store: Box<dyn SubnetKeyStore>,
        make_policy: F,
    ) -> Result<SubnetService, SubnetError>
    where
        P: BlockPolicy,
        F: FnOnce(&SubnetKey) -> P + Send + 'static,
    {
        let private_key = ed25519::PrivateKey::decode(Copying(config.identity_secret.as_slice()))
            .map_err(|e| SubnetError::Config(format!("identity secret: {e}")))?;
        let public_key: [u8; 32] = private_key
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| SubnetError::Config("identity public key is not 32 bytes".into()))?;
        let mut peers = Vec::new();
        for member in &config.members {
            let key =
                ed25519::PublicKey::decode(Copying(member.public_key.as_slice())).map_err(|e| {
                    SubnetError::Config(format!("a member's public key is invalid: {e}"))
                })?;
            peers.push((key, member.p2p_address));
        }
        if !config.members.iter().any(|m| m.public_key == public_key) {
            return Err(SubnetError::Config(
                "this replica's identity is not a member of the subnet".into(),
            ));
        }
        let (outbound, outbound_rx) = tokio::sync::mpsc::channel(config.outbound_queue_max.max(1));
        let (inbound_tx, inbound) = tokio::sync::mpsc::channel(config.inbound_queue_max.max(1));
        let (stop, stop_rx) = tokio::sync::oneshot::channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<Ready, SubnetError>>();
        let runtime_config = commonware_runtime::tokio::Config::new()
            .with_worker_threads(config.worker_threads.max(1))
            .with_storage_directory(config.storage_directory.clone())
            .with_catch_panics(false);
        let thread = std::thread::Builder::new()
            .name("openic-subnet".into())
            .spawn(move || {
                let runner = commonware_runtime::tokio::Runner::new(runtime_config);
                runner.start(|context| async move {
                    let started = run(
                        context.child("subnet"),
                        config,
                        private_key,
                        peers,
                        key_store,
                        make_policy,
                        outbound_rx,
                        inbound_tx,
                    )
                    .await;
                    match started {
                        Ok(ready) => {
                            let _ = ready_tx.send(Ok(ready));
                            let _ = stop_rx.await;
                        }
                        Err(error) => {
                            let _ = ready_tx.send(Err(error));
                        }
                    }
                    let _ = context.stop(0, Some(Duration::from_secs(5))).await;
                })
            })
            .map_err(|e| SubnetError::Stopped(format!("cannot start its thread: {e}")))?;
        let ready = match ready_rx.recv() {
            Ok(ready) => ready?,
            Err(_) => {
                let _ = thread.join();
                return Err(SubnetError::Stopped(
                    "the runtime thread ended without a result (see the log)".into(),
                ));
            }
        };
        Ok(SubnetService {
            key: ready.key,
            public_key,
            deliveries: parking_lot::Mutex::new(Some(ready.deliveries)),
            inbound: parking_lot::Mutex::new(Some(inbound)),
            outbound,
            floor: ready.floor,
            stop: parking_lot::Mutex::new(Some(stop)),
            thread: parking_lot::Mutex::new(Some(thread)),
        })
    }

    /// This replica's share of the subnet key and the key's public side.
    pub fn key(&self) -> &SubnetKey {
        &self.key
    }

    /// This replica's Ed25519 public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public_key
    }

    /// The finalized blocks, in height order (once; later calls get `None`).
    pub fn take_deliveries(&self) -> Option<Deliveries> {
        self.deliveries.lock().take()
    }

    /// Messages from peers (once; later calls get `None`).
    pub fn take_inbound(&self) -> Option<tokio::sync::mpsc::Receiver<Inbound>> {
        self.inbound.lock().take()
    }

    /// Sends an ingress message (as the node encodes it) to every peer. `false` when the
    /// outbound queue is full or the service stopped: the message still goes into this replica's
    /// own proposals, so it is delayed, not lost.
    pub fn broadcast_ingress(&self, message: Vec<u8>) -> bool {
        self.outbound.try_send(Outbound::Ingress(message)).is_ok()
    }

    /// Sends this replica's certification share to every peer. `false` when the outbound queue is
    /// full or the service stopped.
    pub fn broadcast_partial(&self, partial: PartialSignature) -> bool {
        self.outbound.try_send(Outbound::Partial(partial)).is_ok()
    }

    /// Sends a state-sync message to one peer (`Some(public key)`) or to every peer. `false` when
    /// the outbound queue is full or the service stopped.
    pub fn send_sync(&self, to: Option<[u8; 32]>, bytes: Vec<u8>) -> bool {
        self.outbound.try_send(Outbound::Sync { to, bytes }).is_ok()
    }

    /// The engine's finalized history and delivery floor (for state sync).
    pub fn floor_control(&self) -> FloorControl {
        self.floor.clone()
    }

    /// Stops networking and consensus and waits for the runtime thread (storage keeps what was
    /// synced; unacknowledged heights are delivered again after a restart).
    /// Idempotent; the consumer of [`SubnetService::take_deliveries`] should close them first.
    pub fn shutdown(&self) {
        if let Some(deliveries) = self.deliveries.lock().take() {
            deliveries.close();
        }
        if let Some(stop) = self.stop.lock().take() {
            let _ = stop.send(());
        }
        let thread = self.thread.lock().take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run<P, F>(
    context: commonware_runtime::tokio::Context,
    config: SubnetServiceConfig,
    private_key: ed25519::PrivateKey,
    peers: Vec<(ed25519::PublicKey, SocketAddr)>,
    key_store: Box<dyn SubnetKeyStore>,
    make_policy: F,
    mut outbound: tokio::sync::mpsc::Receiver<Outbound>,
    inbound: tokio::sync::mpsc::Sender<Inbound>,
) -> Result<Ready, SubnetError>
where
    P: BlockPolicy,
    F: FnOnce(&SubnetKey) -> P + Send + 'static,
{
    let participant_count =
        u32::try_from(peers.len()).map_err(|_| SubnetError::Config("too many members".into()))?;
    let mut bft_config = config.bft.clone();
    bft_config.namespace = config.namespace.clone();
    let engine_channels = bft::channels(&bft_config, participant_count);
    let largest_engine_message = engine_channels
        .iter()
        .map(|spec| spec.max_message_bytes)
        .max()
        .unwrap_or(0);
    let dkg_message_bytes_max: u32 = 4 * 1024 * 1024;
    let max_message_bytes = largest_engine_message
        .max(INGRESS_GOSSIP_BYTES_MAX as u32)
        .max(STATE_SYNC_MESSAGE_BYTES_MAX as u32)
        .max(dkg_message_bytes_max);

    let handshake = cups::Cups::<_, commonware_cryptography::ChaCha20Poly1305>::new(
        sake::Sake {
            signer: private_key.clone(),
            synchrony_bound: Duration::from_secs(30),
            max_handshake_age: Duration::from_secs(60),
            version: sake::Version::V1,
        },
        cups::Version::V1,
    );
    let max_peers = NonZeroUsize::new(peers.len().max(1))
        .ok_or_else(|| SubnetError::Config("no members".into()))?;
    let mut p2p_config = lookup::Config::local(
        handshake,
        &config.namespace,
        config.listen_address,
        max_peers,
        max_message_bytes,
        NonZeroUsize::new(config.bft.mailbox_size.max(1)).unwrap_or(NonZeroUsize::MIN),
    );
    // Members may sit on private networks (a LAN, network namespaces); they are named
    // explicitly, so there is nothing to gain from refusing private addresses.
    p2p_config.allow_private_ips = true;
    p2p_config.dial_frequency = Duration::from_millis(200);
    let (mut network, mut oracle) = lookup::Network::new(context.child("p2p"), p2p_config);
    let addresses: Map<ed25519::PublicKey, Address> = peers
        .iter()
        .map(|(key, address)| (key.clone(), Address::from(*address)))
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| SubnetError::Config("duplicate member public key".into()))?;
    oracle.track(0, addresses);

    let mut registered = Vec::new();
    for spec in &engine_channels {
        registered.push(network.register(spec.id, spec.rate_limit));
    }
    let gossip_quota = Quota::per_second(
        NonZeroU32::new(config.gossip_messages_per_second.max(1)).unwrap_or(NonZeroU32::MIN),
    );
    let (mut dkg_sender, mut dkg_receiver) = network.register(
        DKG_CHANNEL,
        Quota::per_second(NonZeroU32::MIN.saturating_add(99)),
    );
    let (mut ingress_sender, mut ingress_receiver) =
        network.register(INGRESS_CHANNEL, gossip_quota);
    let (mut partial_sender, mut partial_receiver) =
        network.register(PARTIALS_CHANNEL, gossip_quota);
    let (mut sync_sender, mut sync_receiver) = network.register(
        STATE_SYNC_CHANNEL,
        Quota::per_second(
            NonZeroU32::new(STATE_SYNC_MESSAGES_PER_SECOND).unwrap_or(NonZeroU32::MIN),
        ),
    );
    network.start();
    info!(
        listen = %config.listen_address,
        members = peers.len(),
        "p2p network started"
    );

    // The subnet key: stored, or made now with every member.
    let key = match key_store.load().map_err(SubnetError::KeyStore)? {
        Some(key) => key,
        None => {
            let participants: Vec<ed25519::PublicKey> =
                peers.iter().map(|(key, _)| key.clone()).collect();
            let key = run_dkg(
                &context,
                private_key.clone(),
                &participants,
                &config.namespace,
                &mut dkg_sender,
                &mut dkg_receiver,
            )
            .await?;
            key_store.store(&key).map_err(SubnetError::KeyStore)?;
            info!("subnet key generated and stored");
            key
        }
    };
    key.sharing
        .check_share(&key.share)
        .map_err(|e| SubnetError::KeyStore(format!("stored share does not fit the key: {e}")))?;

    let participants: Vec<ed25519::PublicKey> = peers.iter().map(|(key, _)| key.clone()).collect();
    let signing = SigningSetup::new(
        &bft_config.namespace,
        key.sharing.commonware_sharing().clone(),
        key.share.commonware_share().clone(),
        participants,
        private_key,
    )
    .map_err(|e| SubnetError::Engine(e.to_string()))?;
    let policy = make_policy(&key);
    let mut registered = registered.into_iter();
    let mut next = || {
        registered
            .next()
            .ok_or_else(|| SubnetError::Engine("the engine asked for more channels".into()))
    };
    let channels = Channels {
        votes: next()?,
        certificates: next()?,
        certificate_fetch: next()?,
        blocks: next()?,
        block_fetch: next()?,
    };
    let (engine, deliveries) = bft::start(
        context.child("bft"),
        &bft_config,
        signing,
        policy,
        oracle.clone(),
        oracle.clone(),
        channels,
    )
    .await
    .map_err(|e| SubnetError::Engine(e.to_string()))?;
    let floor = engine.floor_control();

    // Outbound gossip.
    context.child("gossip_out").spawn(move |_| async move {
        while let Some(message) = outbound.recv().await {
            match message {
                Outbound::Ingress(bytes) => {
                    ingress_sender.send(Recipients::All, bytes, false);
                }
                Outbound::Partial(partial) => {
                    partial_sender.send(Recipients::All, partial.to_bytes().to_vec(), true);
                }
                Outbound::Sync { to, bytes } => {
                    let recipients = match to {
                        None => Recipients::All,
                        Some(key) => match ed25519::PublicKey::decode(Copying(key.as_slice())) {
                            Ok(key) => Recipients::One(key),
                            Err(_) => continue,
                        },
                    };
                    sync_sender.send(recipients, bytes, false);
                }
            }
        }
    });
    // Inbound gossip: bounded decoding here for shares, the node decodes ingress.
    let ingress_inbound = inbound.clone();
    let sync_inbound = inbound.clone();
    context.child("sync_in").spawn(move |_| async move {
        while let Ok((peer, message)) = sync_receiver.recv().await {
            let bytes = message.as_ref();
            if bytes.len() > STATE_SYNC_MESSAGE_BYTES_MAX {
                continue;
            }
            let Ok(from) = <[u8; 32]>::try_from(peer.as_ref()) else {
                continue;
            };
            // Full: drop; requests are retried and adverts repeat.
            let _ = sync_inbound.try_send(Inbound::Sync {
                from,
                bytes: bytes.to_vec(),
            });
        }
    });
    context
        .child("gossip_in_ingress")
        .spawn(move |_| async move {
            while let Ok((_peer, message)) = ingress_receiver.recv().await {
                let bytes = message.as_ref().to_vec();
                if bytes.len() > INGRESS_GOSSIP_BYTES_MAX {
                    continue;
                }
                // Full: drop; the replica that received the call proposes it itself.
                let _ = ingress_inbound.try_send(Inbound::Ingress(bytes));
            }
        });
    // A share is accepted only from the replica whose share it is (the p2p layer authenticates
    // peers), so a peer can never take another signer's place: the pool can then check the
    // recovered signature instead of every share (`verify_on_arrival: false`).
    let signer_of: std::collections::BTreeMap<ed25519::PublicKey, u32> = {
        let sorted = commonware_utils::ordered::Set::try_from(
            peers.iter().map(|(key, _)| key.clone()).collect::<Vec<_>>(),
        )
        .map_err(|_| SubnetError::Config("duplicate member public key".into()))?;
        peers
            .iter()
            .filter_map(|(key, _)| Some((key.clone(), u32::try_from(sorted.position(key)?).ok()?)))
            .collect()
    };
    context
        .child("gossip_in_partials")
        .spawn(move |_| async move {
            while let Ok((peer, message)) = partial_receiver.recv().await {
                match PartialSignature::from_bytes(message.as_ref()) {
                    Ok(partial) if signer_of.get(&peer) == Some(&partial.signer.0) => {
                        let _ = inbound.try_send(Inbound::Partial(partial));
                    }
                    Ok(partial) => warn!(
                        %peer,
                        signer = partial.signer.0,
                        "certification share for another signer than the peer that sent it"
                    ),
                    Err(error) => warn!(%peer, %error, "malformed certification share from a peer"),
                }
            }
        });
    Ok(Ready {
        key,
        deliveries,
        floor,
    })
}

/// Runs the key generation with every member and returns this replica's key once all members
/// confirmed the same output. Keeps answering peers afterwards (a peer that missed this replica's
/// confirmation asks again) in a background task.
async fn run_dkg<S, R>(
    context: &commonware_runtime::tokio::Context,
    private_key: ed25519::PrivateKey,
    participants: &[ed25519::PublicKey],
    namespace: &[u8],
    sender: &mut S,
    receiver: &mut R,
) -> Result<SubnetKey, SubnetError>
where
    S: commonware_p2p::Sender<PublicKey = ed25519::PublicKey>,
    R: commonware_p2p::Receiver<PublicKey = ed25519::PublicKey>,
{
    let mut rng = commonware_utils::sys_rng();
    let (mut session, outgoing) =
        DkgSession::new(private_key, participants, namespace, 0, &mut rng)
            .map_err(|e| SubnetError::Dkg(e.to_string()))?;
    let send_all = |sender: &mut S, messages: Vec<crate::dkg::Outgoing>| {
        for message in messages {
            let recipients = match message.to {
                Recipient::One(key) => Recipients::One(key),
                Recipient::AllOthers => Recipients::All,
            };
            sender.send(recipients, message.bytes, true);
        }
    };
    send_all(sender, outgoing);
    info!(
        members = participants.len(),
        "subnet key generation started; waiting for every member"
    );
    let started = context.current();
    let mut dealing_closed = false;
    loop {
        match session.status() {
            DkgStatus::Done => break,
            DkgStatus::Failed(failure) => return Err(SubnetError::Dkg(failure.to_string())),
            DkgStatus::Running { .. } => {}
        }
        let tick = context.sleep(DKG_RETRANSMIT_INTERVAL);
        commonware_macros::select! {
            received = receiver.recv() => {
                let Ok((peer, message)) = received else {
                    return Err(SubnetError::Dkg("the p2p network stopped".into()));
                };
                match session.handle(&peer, message.as_ref()) {
                    Ok(outgoing) => send_all(sender, outgoing),
                    Err(error) => warn!(%peer, %error, "DKG message refused"),
                }
            },
            _ = tick => {
                let waited = context
                    .current()
                    .duration_since(started)
                    .unwrap_or_default();
                if !dealing_closed && waited >= DKG_DEALING_TIMEOUT {
                    dealing_closed = true;
                    let outgoing = session.close_dealing();
                    send_all(sender, outgoing);
                }
                if let DkgStatus::Running { missing_acks, missing_logs, missing_confirmations } = session.status() {
                    tracing::debug!(
                        missing_acks = missing_acks.len(),
                        missing_logs = missing_logs.len(),
                        missing_confirmations = missing_confirmations.len(),
                        "subnet key generation waiting"
                    );
                }
                send_all(sender, session.retransmit());
            },
        }
    }
    let output = session
        .output()
        .cloned()
        .ok_or_else(|| SubnetError::Dkg("finished without an output".into()))?;
    Ok(SubnetKey {
        sharing: output.sharing,
        share: output.share,
    })
}
