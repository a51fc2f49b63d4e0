//! The subnet key's distributed key generation: at genesis the replicas create the subnet's
//! threshold BLS key together, so that no process ever holds the whole secret.
//!
//! [`DkgSession`] is one replica's side of Commonware's Joint-Feldman DKG
//! (`bls12381::dkg::feldman_desmedt`, BETA), as a sans-I/O state machine: the node passes in the
//! bytes a peer sent and sends out the [`Outgoing`] messages it returns, over the authenticated,
//! encrypted p2p channel (deals carry secret shares, so the channel must be private and must
//! authenticate the sender). Every participant is both a dealer and a player.
//!
//! # How a session finishes
//!
//! 1. **Deal.** Each replica picks a random polynomial of degree `n - f - 1` and sends every other
//!    replica its commitment and that replica's evaluation ([`DkgSession::new`]).
//! 2. **Ack.** A replica checks each deal against its commitment and acknowledges it with a
//!    signature.
//! 3. **Log.** A dealer broadcasts its signed log (commitment, and for every player the ack or, for
//!    players that did not ack, the revealed share) once every player acked, or when the node
//!    calls [`DkgSession::close_dealing`] after its dealing timeout.
//! 4. **Finalize.** When a replica holds a valid signed log from **every** participant it computes
//!    the output: the sum of the first `n - f` usable logs in participant order (Commonware's
//!    selection), its own share, and the public sharing.
//! 5. **Confirm.** It broadcasts a hash of the public output. The session is
//!    [`DkgStatus::Done`] only when all `n` participants confirmed the same hash; any mismatch
//!    makes it [`DkgStatus::Failed`].
//!
//! Why all `n` logs and all `n` confirmations: the output depends on exactly which logs are
//! summed, so every replica must use the same set. Without an agreement step (consensus does not
//! run yet at genesis) the only set all replicas can be sure to share is "all of them"; a dealer
//! that signs two different logs is caught by the confirmation round instead of silently splitting
//! the subnet into two keys. The trade-off: genesis needs every member online and taking part; one
//! silent or misbehaving member stalls or fails the DKG, and the operators restart it with a new
//! `round` (and, if needed, without that member). A later version can instead agree on the set
//! of logs through consensus, which finishes with `n - f` members (resharing does the same).
//!
//! Peer input is untrusted: messages are bounded ([`DkgSession::max_message_length`]) and decoded
//! with Commonware's bounded codec, every failure is a [`DkgError`] the node can count against the
//! peer, and nothing a peer sends can panic the session. Given the same keys, participants, seed
//! and message order, a session behaves identically.
//!
//! The API never exposes the group secret: a session only ever computes its own share.

use crate::certifier::{KeyShare, MAX_REPLICAS, PublicSharing};
use commonware_codec::{Copying, Encode, FixedSize, Read, ReadExt};
use commonware_cryptography::{
    Hasher, Sha256, Signer,
    bls12381::{
        dkg::feldman_desmedt::{
            Dealer, DealerPrivMsg, DealerPubMsg, Info, Logs, Player, PlayerAck, Reveal,
            SignedDealerLog,
        },
        primitives::{sharing::Mode, variant::MinSig},
    },
    ed25519,
    transcript::{Transcript, Version},
};
use commonware_parallel::Sequential;
use commonware_utils::{N3f1, NZU32, ordered::Set};
use rand_core_commonware::CryptoRng;
use std::collections::BTreeMap;
use std::num::NonZeroU32;

/// Version byte of every DKG message; a format change bumps it.
const MESSAGE_VERSION: u8 = 1;

const TAG_DEAL: u8 = 1;
const TAG_ACK: u8 = 2;
const TAG_LOG: u8 = 3;
const TAG_CONFIRM: u8 = 4;

/// Namespace of the transcript the randomness of the session's later steps is drawn from.
const RANDOMNESS_NAMESPACE: &[u8] = b"openic-dkg-randomness";

/// Where an outgoing message goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recipient {
    /// One participant only; the message may hold a secret share, so send it privately.
    One(ed25519::PublicKey),
    /// Every other participant.
    AllOthers,
}

/// A message the node must send for the session.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    /// Who receives it.
    pub to: Recipient,
    /// The encoded message, at most [`DkgSession::max_message_length`] bytes.
    pub bytes: Vec<u8>,
}

/// What a finished DKG gives this replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DkgOutput {
    /// The subnet key's public side, identical on every replica.
    pub sharing: PublicSharing,
    /// This replica's share of the subnet key.
    pub share: KeyShare,
}

/// Where a session is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DkgStatus {
    /// Still exchanging messages; lists who the session waits for, for the node's logs.
    Running {
        /// Players whose ack for this replica's deal is missing (empty once the log is out).
        missing_acks: Vec<ed25519::PublicKey>,
        /// Dealers whose signed log is missing.
        missing_logs: Vec<ed25519::PublicKey>,
        /// Participants whose confirmation is missing.
        missing_confirmations: Vec<ed25519::PublicKey>,
    },
    /// All participants confirmed the same output; see [`DkgSession::output`].
    Done,
    /// The DKG cannot finish; start a new round.
    Failed(DkgFailure),
}

/// Why a DKG round failed. Permanent for the round: retry with a new round number.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DkgFailure {
    /// The logs do not give an output (too few usable logs: too many dealers faulty).
    #[error("the dealer logs do not give a key: {0}")]
    Protocol(String),
    /// Participants confirmed a different output than this replica computed: some dealer signed
    /// two different logs, or a participant lies.
    #[error("participants confirmed a different output: {disagreeing:?}")]
    Disagreement {
        /// Who confirmed something else.
        disagreeing: Vec<ed25519::PublicKey>,
    },
}

/// Why a message or a setup was refused. [`DkgError::is_misbehaviour`] tells the node which ones to
/// count against the sending peer.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DkgError {
    /// The session's parameters are unusable (this replica not a member, duplicates, too many).
    #[error("invalid DKG setup: {0}")]
    InvalidSetup(String),
    /// The sender is not a participant (or is this replica itself).
    #[error("message from a peer that is not another participant")]
    UnknownPeer,
    /// The bytes are not a DKG message (length, version, tag or content).
    #[error("malformed DKG message: {0}")]
    Malformed(String),
    /// A deal whose share does not match its commitment, or whose commitment is unusable.
    #[error("invalid deal: {0}")]
    InvalidDeal(String),
    /// An ack that is not the sender's signature over this replica's deal.
    #[error("invalid ack: {0}")]
    InvalidAck(String),
    /// A log not validly signed by its sender as a dealer of this round.
    #[error("dealer log not signed by its sender for this round")]
    InvalidLog,
    /// A participant sent two different logs or confirmations.
    #[error("participant sent two different {0}")]
    Equivocation(&'static str),
    /// The message came after the step it belongs to (for example an ack after this replica
    /// published its log). Benign.
    #[error("late {0}: that step is over")]
    Late(&'static str),
    /// The session already finished or failed; nothing more is needed. Benign.
    #[error("the DKG session is over")]
    Finished,
}

impl DkgError {
    /// Whether the error shows that the sender misbehaved, rather than being late.
    pub fn is_misbehaviour(&self) -> bool {
        !matches!(
            self,
            DkgError::Late(_) | DkgError::Finished | DkgError::InvalidSetup(_)
        )
    }
}

/// A decoded DKG message.
enum Message {
    Deal(DealerPubMsg<MinSig>, DealerPrivMsg),
    Ack(PlayerAck<ed25519::PublicKey>),
    Log(Box<SignedDealerLog<MinSig, ed25519::PublicKey>>),
    Confirm([u8; 32]),
}

impl Message {
    fn encode(&self) -> Vec<u8> {
        let (tag, body) = match self {
            Message::Deal(public, private) => {
                let mut body = public.encode().to_vec();
                body.extend_from_slice(&private.encode());
                (TAG_DEAL, body)
            }
            Message::Ack(ack) => (TAG_ACK, ack.encode().to_vec()),
            Message::Log(log) => (TAG_LOG, log.encode().to_vec()),
            Message::Confirm(digest) => (TAG_CONFIRM, digest.to_vec()),
        };
        let mut bytes = Vec::with_capacity(2 + body.len());
        bytes.push(MESSAGE_VERSION);
        bytes.push(tag);
        bytes.extend_from_slice(&body);
        bytes
    }

    fn decode(bytes: &[u8], participants: NonZeroU32, max_length: usize) -> Result<Self, DkgError> {
        if bytes.len() > max_length {
            return Err(DkgError::Malformed(format!(
                "{} bytes, more than {max_length}",
                bytes.len()
            )));
        }
        let [version, tag, body @ ..] = bytes else {
            return Err(DkgError::Malformed("too short".into()));
        };
        if *version != MESSAGE_VERSION {
            return Err(DkgError::Malformed(format!(
                "unsupported version {version}"
            )));
        }
        let malformed = |error: commonware_codec::Error| DkgError::Malformed(error.to_string());
        let mut buffer = Copying(body);
        let message = match *tag {
            TAG_DEAL => {
                let public = DealerPubMsg::<MinSig>::read_cfg(&mut buffer, &participants)
                    .map_err(malformed)?;
                let private = DealerPrivMsg::read(&mut buffer).map_err(malformed)?;
                Message::Deal(public, private)
            }
            TAG_ACK => Message::Ack(PlayerAck::read(&mut buffer).map_err(malformed)?),
            TAG_LOG => Message::Log(Box::new(
                SignedDealerLog::read_cfg(&mut buffer, &participants).map_err(malformed)?,
            )),
            TAG_CONFIRM => {
                let digest: [u8; 32] = body
                    .try_into()
                    .map_err(|_| DkgError::Malformed("confirmation is not 32 bytes".into()))?;
                buffer = Copying(&[]);
                Message::Confirm(digest)
            }
            other => return Err(DkgError::Malformed(format!("unknown tag {other}"))),
        };
        if !buffer.0.is_empty() {
            return Err(DkgError::Malformed(format!(
                "{} trailing bytes",
                buffer.0.len()
            )));
        }
        Ok(message)
    }
}

/// One replica's side of the genesis DKG. See the module docs for the protocol and how it ends.
pub struct DkgSession {
    me: ed25519::PublicKey,
    participants: Set<ed25519::PublicKey>,
    info: Info<MinSig, ed25519::PublicKey>,
    /// Secret, seeded from the caller's rng: the randomness of steps after [`DkgSession::new`]
    /// (batch verification of logs), which run inside [`DkgSession::handle`].
    randomness: Transcript,
    max_message_length: usize,
    /// This replica as a dealer, until its log is published.
    dealer: Option<Dealer<MinSig, ed25519::PrivateKey>>,
    /// The deal for each other player, kept until its ack arrives (for [`DkgSession::retransmit`]).
    unacked_deals: BTreeMap<ed25519::PublicKey, Vec<u8>>,
    /// This replica as a player, until it finalizes.
    player: Option<Player<MinSig, ed25519::PrivateKey>>,
    /// The ack sent to each dealer, sent again if the dealer repeats its deal.
    acks_sent: BTreeMap<ed25519::PublicKey, Vec<u8>>,
    /// Valid signed logs by dealer, in their encoded form (to spot a second, different one).
    logs: BTreeMap<ed25519::PublicKey, (Vec<u8>, SignedDealerLog<MinSig, ed25519::PublicKey>)>,
    own_log: Option<Vec<u8>>,
    confirmations: BTreeMap<ed25519::PublicKey, [u8; 32]>,
    /// The computed output and the hash of its public part.
    computed: Option<(DkgOutput, [u8; 32])>,
    failure: Option<DkgFailure>,
}

impl DkgSession {
    /// Starts this replica's session and returns its deals, one per other participant.
    ///
    /// - `signing_key`: this replica's node key (its p2p identity); signs acks and the log.
    /// - `participants`: the subnet's members (order does not matter: they are sorted, and a
    ///   replica's share index is its position in the sorted list).
    /// - `namespace` and `round`: bind every signature to this subnet and this attempt; use a new
    ///   round number for each attempt, failed ones included.
    /// - `rng`: every random choice of the session is drawn from it, here (the dealt polynomial
    ///   and a secret seed for later steps), so the session is deterministic given it. Use the OS
    ///   (`commonware_utils::sys_rng()`) in production; a seeded generator whose seed is kept
    ///   secret replays the same session, which is what a restart mid-DKG needs, and must never be
    ///   reused across rounds.
    pub fn new(
        signing_key: ed25519::PrivateKey,
        participants: &[ed25519::PublicKey],
        namespace: &[u8],
        round: u64,
        rng: &mut impl CryptoRng,
    ) -> Result<(Self, Vec<Outgoing>), DkgError> {
        let count = participants.len();
        if count == 0 || count > MAX_REPLICAS as usize {
            return Err(DkgError::InvalidSetup(format!(
                "{count} participants; between 1 and {MAX_REPLICAS} needed"
            )));
        }
        let participants = Set::try_from(participants.to_vec())
            .map_err(|_| DkgError::InvalidSetup("duplicate participant".into()))?;
        let me = signing_key.public_key();
        if participants.position(&me).is_none() {
            return Err(DkgError::InvalidSetup(
                "this replica's key is not among the participants".into(),
            ));
        }
        let setup = |error: commonware_cryptography::bls12381::dkg::feldman_desmedt::Error| {
            DkgError::InvalidSetup(error.to_string())
        };
        let info = Info::new::<N3f1>(
            namespace,
            round,
            None,
            Mode::NonZeroCounter,
            Reveal::V1,
            participants.clone(),
            participants.clone(),
        )
        .map_err(setup)?;
        let mut seed = [0u8; 32];
        rng.fill_bytes(&mut seed);
        let mut randomness = Transcript::new(RANDOMNESS_NAMESPACE, Version::V1);
        randomness.commit(seed.as_slice());
        let max_participants = NZU32!(count as u32);
        // The largest message is a signed log; the 2 bytes are version and tag.
        let max_message_length = 2
            + SignedDealerLog::<MinSig, ed25519::PublicKey>::max_encode_size(max_participants).max(
                DealerPubMsg::<MinSig>::max_encode_size(max_participants)
                    + <DealerPrivMsg as FixedSize>::SIZE,
            );
        let mut player = Player::new(info.clone(), signing_key.clone()).map_err(setup)?;
        let (mut dealer, public, private) =
            Dealer::start::<N3f1>(&mut *rng, info.clone(), signing_key, None).map_err(setup)?;

        let mut session = DkgSession {
            me: me.clone(),
            participants,
            info,
            randomness,
            max_message_length,
            dealer: None,
            unacked_deals: BTreeMap::new(),
            player: None,
            acks_sent: BTreeMap::new(),
            logs: BTreeMap::new(),
            own_log: None,
            confirmations: BTreeMap::new(),
            computed: None,
            failure: None,
        };
        let mut outgoing = Vec::new();
        for (player_key, share) in private {
            if player_key == me {
                // Deal to ourselves directly; our own deal is valid by construction.
                if let Ok(Some(ack)) =
                    player.dealer_message::<N3f1>(me.clone(), public.clone(), share)
                {
                    let _accepted = dealer.receive_player_ack(me.clone(), ack).is_ok();
                }
                continue;
            }
            let bytes = Message::Deal(public.clone(), share).encode();
            session
                .unacked_deals
                .insert(player_key.clone(), bytes.clone());
            outgoing.push(Outgoing {
                to: Recipient::One(player_key),
                bytes,
            });
        }
        session.player = Some(player);
        session.dealer = Some(dealer);
        // A one-member subnet has nobody to wait for.
        if session.unacked_deals.is_empty() {
            outgoing.extend(session.close_dealing());
        }
        Ok((session, outgoing))
    }

    /// This replica's p2p identity.
    pub fn me(&self) -> &ed25519::PublicKey {
        &self.me
    }

    /// The participants, sorted (a replica's share index is its position here).
    pub fn participants(&self) -> &[ed25519::PublicKey] {
        self.participants.as_ref()
    }

    /// The longest message a participant may send; longer ones are refused undecoded. Use it as
    /// the p2p channel's message size limit.
    pub fn max_message_length(&self) -> usize {
        self.max_message_length
    }

    /// Handles `bytes` received from participant `from` and returns what to send in response.
    pub fn handle(
        &mut self,
        from: &ed25519::PublicKey,
        bytes: &[u8],
    ) -> Result<Vec<Outgoing>, DkgError> {
        if *from == self.me || self.participants.position(from).is_none() {
            return Err(DkgError::UnknownPeer);
        }
        let message = Message::decode(
            bytes,
            NZU32!(self.participants.len() as u32),
            self.max_message_length,
        )?;
        if self.failure.is_some() {
            return Err(DkgError::Finished);
        }
        match message {
            Message::Deal(public, private) => self.handle_deal(from, public, private),
            Message::Ack(ack) => self.handle_ack(from, ack),
            Message::Log(log) => self.handle_log(from, *log),
            Message::Confirm(digest) => self.handle_confirm(from, digest),
        }
    }

    fn handle_deal(
        &mut self,
        from: &ed25519::PublicKey,
        public: DealerPubMsg<MinSig>,
        private: DealerPrivMsg,
    ) -> Result<Vec<Outgoing>, DkgError> {
        if let Some(ack) = self.acks_sent.get(from) {
            // The dealer repeats its deal: our ack was probably lost.
            return Ok(vec![Outgoing {
                to: Recipient::One(from.clone()),
                bytes: ack.clone(),
            }]);
        }
        let Some(player) = self.player.as_mut() else {
            return Err(DkgError::Late("deal"));
        };
        match player.dealer_message::<N3f1>(from.clone(), public, private) {
            Ok(Some(ack)) => {
                let bytes = Message::Ack(ack).encode();
                self.acks_sent.insert(from.clone(), bytes.clone());
                Ok(vec![Outgoing {
                    to: Recipient::One(from.clone()),
                    bytes,
                }])
            }
            Ok(None) => Ok(Vec::new()),
            Err(error) => Err(DkgError::InvalidDeal(error.to_string())),
        }
    }

    fn handle_ack(
        &mut self,
        from: &ed25519::PublicKey,
        ack: PlayerAck<ed25519::PublicKey>,
    ) -> Result<Vec<Outgoing>, DkgError> {
        let Some(dealer) = self.dealer.as_mut() else {
            return Err(DkgError::Late("ack"));
        };
        dealer
            .receive_player_ack(from.clone(), ack)
            .map_err(|error| DkgError::InvalidAck(error.to_string()))?;
        self.unacked_deals.remove(from);
        if self.unacked_deals.is_empty() {
            return Ok(self.close_dealing());
        }
        Ok(Vec::new())
    }

    fn handle_log(
        &mut self,
        from: &ed25519::PublicKey,
        log: SignedDealerLog<MinSig, ed25519::PublicKey>,
    ) -> Result<Vec<Outgoing>, DkgError> {
        let encoded = log.encode().to_vec();
        // Only a dealer sends its log (nobody relays), so a fault is the sender's.
        let Some((dealer, _)) = log.clone().check(&self.info) else {
            return Err(DkgError::InvalidLog);
        };
        if dealer != *from {
            return Err(DkgError::InvalidLog);
        }
        match self.logs.get(&dealer) {
            Some((existing, _)) if *existing == encoded => return Ok(Vec::new()),
            Some(_) => return Err(DkgError::Equivocation("logs")),
            None => {}
        }
        self.logs.insert(dealer, (encoded, log));
        Ok(self.try_finalize())
    }

    fn handle_confirm(
        &mut self,
        from: &ed25519::PublicKey,
        digest: [u8; 32],
    ) -> Result<Vec<Outgoing>, DkgError> {
        match self.confirmations.get(from) {
            Some(existing) if *existing == digest => return Ok(Vec::new()),
            Some(_) => return Err(DkgError::Equivocation("confirmations")),
            None => {}
        }
        self.confirmations.insert(from.clone(), digest);
        self.check_confirmations();
        Ok(Vec::new())
    }

    /// Publishes this replica's log now, revealing the shares of players that have not acked.
    /// The node calls it when its dealing timeout expires (the protocol assumes synchrony: an
    /// honest player acks within the timeout, so only faulty players' shares are revealed). A
    /// dealer with more than `f` missing acks publishes a log without results, which does not
    /// count. Does nothing if the log is already out.
    pub fn close_dealing(&mut self) -> Vec<Outgoing> {
        let Some(dealer) = self.dealer.take() else {
            return Vec::new();
        };
        self.unacked_deals.clear();
        let log = dealer.finalize::<N3f1>();
        let bytes = Message::Log(Box::new(log.clone())).encode();
        self.own_log = Some(bytes.clone());
        let mut outgoing = vec![Outgoing {
            to: Recipient::AllOthers,
            bytes,
        }];
        // Our own log is signed by us for this round, so it is accepted.
        if let Some((dealer_key, _)) = log.clone().check(&self.info) {
            self.logs.insert(dealer_key, (log.encode().to_vec(), log));
        }
        outgoing.extend(self.try_finalize());
        outgoing
    }

    /// Computes the output once every dealer's log is in, and confirms it.
    fn try_finalize(&mut self) -> Vec<Outgoing> {
        if self.logs.len() < self.participants.len() || self.computed.is_some() {
            return Vec::new();
        }
        let Some(player) = self.player.take() else {
            return Vec::new();
        };
        let mut logs = Logs::<MinSig, ed25519::PublicKey, N3f1>::new(self.info.clone());
        for (_, log) in self.logs.values() {
            if let Some((dealer, log)) = log.clone().check(&self.info) {
                logs.record(dealer, log);
            }
        }
        let mut rng = self.randomness.noise(b"finalize");
        let (output, share) = match player.finalize::<N3f1>(&mut rng, logs, &Sequential) {
            Ok(result) => result,
            Err(error) => {
                self.failure = Some(DkgFailure::Protocol(error.to_string()));
                return Vec::new();
            }
        };
        let sharing = match PublicSharing::from_sharing(output.public().clone()) {
            Ok(sharing) => sharing,
            Err(error) => {
                self.failure = Some(DkgFailure::Protocol(error.to_string()));
                return Vec::new();
            }
        };
        let digest = Sha256::hash(&[output.encode().as_ref()]).0;
        self.computed = Some((
            DkgOutput {
                sharing,
                share: KeyShare::from_share(share),
            },
            digest,
        ));
        self.confirmations.insert(self.me.clone(), digest);
        self.check_confirmations();
        vec![Outgoing {
            to: Recipient::AllOthers,
            bytes: Message::Confirm(digest).encode(),
        }]
    }

    fn check_confirmations(&mut self) {
        let Some((_, digest)) = &self.computed else {
            return;
        };
        let disagreeing: Vec<_> = self
            .confirmations
            .iter()
            .filter(|(_, confirmed)| *confirmed != digest)
            .map(|(peer, _)| peer.clone())
            .collect();
        if !disagreeing.is_empty() {
            self.failure = Some(DkgFailure::Disagreement { disagreeing });
        }
    }

    /// Where the session is.
    pub fn status(&self) -> DkgStatus {
        if let Some(failure) = &self.failure {
            return DkgStatus::Failed(failure.clone());
        }
        let missing = |present: &dyn Fn(&ed25519::PublicKey) -> bool| -> Vec<ed25519::PublicKey> {
            self.participants
                .iter()
                .filter(|key| !present(key))
                .cloned()
                .collect()
        };
        let missing_confirmations = missing(&|key| self.confirmations.contains_key(key));
        if self.computed.is_some() && missing_confirmations.is_empty() {
            return DkgStatus::Done;
        }
        DkgStatus::Running {
            missing_acks: self.unacked_deals.keys().cloned().collect(),
            missing_logs: missing(&|key| self.logs.contains_key(key)),
            missing_confirmations,
        }
    }

    /// The output, once every participant confirmed it ([`DkgStatus::Done`]).
    pub fn output(&self) -> Option<&DkgOutput> {
        match self.status() {
            DkgStatus::Done => self.computed.as_ref().map(|(output, _)| output),
            _ => None,
        }
    }

    /// The messages worth sending again, for a node that resends on a timer because its transport
    /// may drop messages (for example while a peer reconnects): deals not yet acked, this
    /// replica's log and its confirmation. Receivers ignore repeats.
    pub fn retransmit(&self) -> Vec<Outgoing> {
        let mut outgoing: Vec<Outgoing> = self
            .unacked_deals
            .iter()
            .map(|(player, bytes)| Outgoing {
                to: Recipient::One(player.clone()),
                bytes: bytes.clone(),
            })
            .collect();
        if let Some(bytes) = &self.own_log {
            outgoing.push(Outgoing {
                to: Recipient::AllOthers,
                bytes: bytes.clone(),
            });
        }
        if let Some((_, digest)) = &self.computed {
            outgoing.push(Outgoing {
                to: Recipient::AllOthers,
                bytes: Message::Confirm(*digest).encode(),
            });
        }
        outgoing
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certifier::{
        CertificationPool, CertificationPoolConfig, IC_STATE_ROOT_DOMAIN_SEPARATOR, PoolEvent,
        sign_partial, verify_partial,
    };
    use crate::split_mix::SplitMix;
    use openic_types::Height;
    use std::collections::{BTreeSet, VecDeque};

    const NAMESPACE: &[u8] = b"openic-test-subnet";

    fn keys(n: u64) -> Vec<ed25519::PrivateKey> {
        (0..n)
            .map(|i| ed25519::PrivateKey::from_seed(1000 + i))
            .collect()
    }

    /// A seeded rng for replica `i` (Commonware's test rng).
    fn seed(i: usize) -> commonware_utils::TestRng {
        commonware_utils::TestRng::new(i as u64 + 1)
    }

    /// In-memory network: messages are delivered one at a time, picked at random.
    struct Router {
        sessions: BTreeMap<ed25519::PublicKey, DkgSession>,
        queue: VecDeque<(ed25519::PublicKey, ed25519::PublicKey, Vec<u8>)>,
        rng: SplitMix,
        errors: Vec<(ed25519::PublicKey, DkgError)>,
    }

    impl Router {
        fn new(signing_keys: &[ed25519::PrivateKey], rng_seed: u64) -> Self {
            let publics: Vec<_> = signing_keys.iter().map(|key| key.public_key()).collect();
            let mut router = Router {
                sessions: BTreeMap::new(),
                queue: VecDeque::new(),
                rng: SplitMix(rng_seed),
                errors: Vec::new(),
            };
            for (i, key) in signing_keys.iter().enumerate() {
                let (session, outgoing) =
                    DkgSession::new(key.clone(), &publics, NAMESPACE, 0, &mut seed(i))
                        .expect("setup");
                router.send(&key.public_key(), outgoing, &publics);
                router.sessions.insert(key.public_key(), session);
            }
            router
        }

        fn send(
            &mut self,
            from: &ed25519::PublicKey,
            outgoing: Vec<Outgoing>,
            everyone: &[ed25519::PublicKey],
        ) {
            for message in outgoing {
                match message.to {
                    Recipient::One(to) => {
                        self.queue.push_back((from.clone(), to, message.bytes));
                    }
                    Recipient::AllOthers => {
                        for to in everyone.iter().filter(|to| *to != from) {
                            self.queue
                                .push_back((from.clone(), to.clone(), message.bytes.clone()));
                        }
                    }
                }
            }
        }

        /// Delivers messages in random order until none are left; `tamper` may change or drop
        /// each one.
        fn run(
            &mut self,
            mut tamper: impl FnMut(&ed25519::PublicKey, &ed25519::PublicKey, &mut Vec<u8>) -> bool,
        ) {
            let everyone: Vec<_> = self.sessions.keys().cloned().collect();
            let mut steps = 0;
            while !self.queue.is_empty() {
                steps += 1;
                assert!(steps < 100_000, "the DKG does not converge");
                let pick = self.rng.below(self.queue.len() as u64) as usize;
                let (from, to, mut bytes) = self.queue.remove(pick).expect("in range");
                if !tamper(&from, &to, &mut bytes) {
                    continue;
                }
                let Some(session) = self.sessions.get_mut(&to) else {
                    continue;
                };
                match session.handle(&from, &bytes) {
                    Ok(outgoing) => self.send(&to, outgoing, &everyone),
                    Err(error) => self.errors.push((to.clone(), error)),
                }
            }
        }

        fn close_dealing(&mut self) {
            let everyone: Vec<_> = self.sessions.keys().cloned().collect();
            let mut all = Vec::new();
            for (key, session) in &mut self.sessions {
                all.push((key.clone(), session.close_dealing()));
            }
            for (key, outgoing) in all {
                self.send(&key, outgoing, &everyone);
            }
        }
    }

    fn state_root_message(root: &[u8; 32]) -> Vec<u8> {
        let mut message = IC_STATE_ROOT_DOMAIN_SEPARATOR.to_vec();
        message.extend_from_slice(root);
        message
    }

    /// All sessions are done with the same sharing; the shares sign and certify for the IC.
    fn check_outputs(router: &Router, honest: &[ed25519::PublicKey]) -> PublicSharing {
        let outputs: Vec<&DkgOutput> = honest
            .iter()
            .map(|key| {
                let session = &router.sessions[key];
                assert_eq!(session.status(), DkgStatus::Done);
                session.output().expect("done")
            })
            .collect();
        let sharing = outputs[0].sharing.clone();
        assert_eq!(sharing.replicas() as usize, router.sessions.len());
        let mut indices = BTreeSet::new();
        for output in &outputs {
            assert_eq!(
                output.sharing, sharing,
                "every replica has the same group key"
            );
            assert_eq!(sharing.check_share(&output.share), Ok(()));
            let partial = sign_partial(&output.share, Height(1), &[3; 32]);
            assert_eq!(verify_partial(&sharing, &partial), Ok(()));
            indices.insert(output.share.signer());
        }
        assert_eq!(indices.len(), outputs.len(), "distinct share indices");

        let mut pool = CertificationPool::new(
            sharing.clone(),
            CertificationPoolConfig::default(),
            Height(0),
        );
        pool.set_own_root(Height(1), [3; 32]).expect("own root");
        let threshold = sharing.threshold() as usize;
        let mut event = None;
        for output in outputs.iter().rev().take(threshold) {
            event = pool
                .add_partial(&sign_partial(&output.share, Height(1), &[3; 32]))
                .expect("valid partial");
        }
        let Some(PoolEvent::Certified { signature, .. }) = event else {
            panic!("expected certification, got {event:?}");
        };
        assert!(
            ic_verify_bls_signature::verify_bls_signature(
                &signature,
                &state_root_message(&[3; 32]),
                &sharing.public_key(),
            )
            .is_ok()
        );
        assert!(openic_crypto::bls::verify(
            &sharing.root_key_der(),
            &state_root_message(&[3; 32]),
            &signature
        ));
        sharing
    }

    #[test]
    fn four_replicas_agree_on_a_key_that_certifies() {
        let signing_keys = keys(4);
        let mut router = Router::new(&signing_keys, 7);
        router.run(|_, _, _| true);
        assert_eq!(router.errors, Vec::new());
        let honest: Vec<_> = signing_keys.iter().map(|key| key.public_key()).collect();
        let sharing = check_outputs(&router, &honest);
        assert_eq!(sharing.threshold(), 3);

        // Deterministic: the same seeds and delivery order give the same key.
        let mut again = Router::new(&signing_keys, 7);
        again.run(|_, _, _| true);
        assert_eq!(check_outputs(&again, &honest), sharing);
        // Other seeds, another delivery order: another key, same properties.
        let mut other = Router::new(&signing_keys, 8);
        other.run(|_, _, _| true);
        check_outputs(&other, &honest);
    }

    #[test]
    fn garbage_from_a_peer_is_refused_and_the_rest_finish() {
        let signing_keys = keys(4);
        let publics: Vec<_> = signing_keys.iter().map(|key| key.public_key()).collect();
        let mut router = Router::new(&signing_keys, 11);
        let mut garbage_rng = SplitMix(99);
        // Participant 3 sends garbage alongside its real messages; an outsider sends too.
        let outsider = ed25519::PrivateKey::from_seed(5).public_key();
        for _ in 0..300 {
            let length = garbage_rng.below(400) as usize;
            let mut bytes: Vec<u8> = (0..length).map(|_| garbage_rng.next() as u8).collect();
            if bytes.len() >= 2 && garbage_rng.below(2) == 0 {
                // Valid header, garbage body: reaches the Commonware decoders.
                bytes[0] = MESSAGE_VERSION;
                // Deal, ack or log: a 32-byte confirmation body is a valid message.
                bytes[1] = 1 + garbage_rng.below(3) as u8;
            }
            for to in &publics[..3] {
                let session = router.sessions.get_mut(to).expect("session");
                let error = session.handle(&publics[3], &bytes).expect_err("garbage");
                assert!(error.is_misbehaviour(), "{error:?}");
                assert_eq!(
                    session.handle(&outsider, &bytes),
                    Err(DkgError::UnknownPeer)
                );
            }
        }
        // Oversized messages are refused before decoding.
        let session = router.sessions.get_mut(&publics[0]).expect("session");
        let huge = vec![MESSAGE_VERSION; session.max_message_length() + 1];
        assert!(matches!(
            session.handle(&publics[1], &huge),
            Err(DkgError::Malformed(_))
        ));
        router.run(|_, _, _| true);
        assert_eq!(router.errors, Vec::new());
        check_outputs(&router, &publics);
    }

    #[test]
    fn a_wrong_share_is_rejected_and_revealed_and_everyone_finishes() {
        let signing_keys = keys(4);
        let publics: Vec<_> = signing_keys.iter().map(|key| key.public_key()).collect();
        let (dealer, victim) = (publics[2].clone(), publics[0].clone());
        let mut router = Router::new(&signing_keys, 12);
        // The dealer's deal to the victim carries a share that does not match the commitment.
        router.run(|from, to, bytes| {
            if *from == dealer && *to == victim && bytes[1] == TAG_DEAL {
                let share_at = bytes.len() - 32;
                let mut share = [0u8; 32];
                share[31] = 5;
                bytes[share_at..].copy_from_slice(&share);
            }
            true
        });
        assert!(matches!(
            router.errors.as_slice(),
            [(to, DkgError::InvalidDeal(_))] if *to == victim
        ));
        let DkgStatus::Running { missing_acks, .. } = router.sessions[&dealer].status() else {
            panic!("the dealer still waits for the victim's ack");
        };
        assert_eq!(missing_acks, vec![victim.clone()]);
        // The dealing timeout: the dealer reveals the victim's share in its log.
        router.close_dealing();
        router.run(|_, _, _| true);
        assert_eq!(router.errors.len(), 1);
        check_outputs(&router, &publics);
    }

    #[test]
    fn a_silent_participant_stalls_and_a_lying_one_fails_the_round() {
        let signing_keys = keys(4);
        let publics: Vec<_> = signing_keys.iter().map(|key| key.public_key()).collect();
        let silent = publics[1].clone();
        let mut router = Router::new(&signing_keys, 13);
        router.run(|from, _, _| *from != silent);
        router.close_dealing();
        router.run(|from, _, _| *from != silent);
        for key in publics.iter().filter(|key| **key != silent) {
            let DkgStatus::Running { missing_logs, .. } = router.sessions[key].status() else {
                panic!("expected the session to wait");
            };
            assert_eq!(missing_logs, vec![silent.clone()]);
            assert!(router.sessions[key].output().is_none());
        }

        // A participant that confirms another output makes everyone fail, clearly.
        let liar = publics[3].clone();
        let mut router = Router::new(&signing_keys, 14);
        router.run(|from, _, bytes| {
            if *from == liar && bytes[1] == TAG_CONFIRM {
                bytes[2] ^= 1;
            }
            true
        });
        for key in publics.iter().filter(|key| **key != liar) {
            assert_eq!(
                router.sessions[key].status(),
                DkgStatus::Failed(DkgFailure::Disagreement {
                    disagreeing: vec![liar.clone()]
                })
            );
            assert!(router.sessions[key].output().is_none());
        }
    }

    #[test]
    fn lost_messages_are_recovered_by_retransmission() {
        let signing_keys = keys(4);
        let publics: Vec<_> = signing_keys.iter().map(|key| key.public_key()).collect();
        let mut router = Router::new(&signing_keys, 15);
        let mut drop_rng = SplitMix(3);
        router.run(|_, _, _| drop_rng.below(4) != 0);
        for _ in 0..20 {
            let everyone = publics.clone();
            let resend: Vec<_> = router
                .sessions
                .iter()
                .map(|(key, session)| (key.clone(), session.retransmit()))
                .collect();
            for (key, outgoing) in resend {
                router.send(&key, outgoing, &everyone);
            }
            router.run(|_, _, _| drop_rng.below(4) != 0);
        }
        assert!(
            router
                .errors
                .iter()
                .all(|(_, error)| !error.is_misbehaviour())
        );
        check_outputs(&router, &publics);
    }

    #[test]
    fn setup_errors_are_clear() {
        let signing_keys = keys(4);
        let publics: Vec<_> = signing_keys.iter().map(|key| key.public_key()).collect();
        let outsider = ed25519::PrivateKey::from_seed(5);
        assert!(matches!(
            DkgSession::new(outsider, &publics, NAMESPACE, 0, &mut seed(0)),
            Err(DkgError::InvalidSetup(_))
        ));
        let mut duplicated = publics.clone();
        duplicated.push(publics[0].clone());
        assert!(matches!(
            DkgSession::new(
                signing_keys[0].clone(),
                &duplicated,
                NAMESPACE,
                0,
                &mut seed(0)
            ),
            Err(DkgError::InvalidSetup(_))
        ));
        assert!(matches!(
            DkgSession::new(signing_keys[0].clone(), &[], NAMESPACE, 0, &mut seed(0)),
            Err(DkgError::InvalidSetup(_))
        ));
    }
}
