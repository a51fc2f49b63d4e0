//! Threshold certification of state roots in the Internet Computer's format.
//!
//! Each replica holds a [`KeyShare`] of the subnet key. After executing height `h` it signs
//! `b"\x0Dic-state-root" · root_h` with [`sign_partial`] and gossips the [`PartialSignature`];
//! the [`CertificationPool`] collects the partials of all replicas, and once `threshold` of them
//! (`n - f`, that is `2f + 1` for `n = 3f + 1`) sign this replica's own root it recovers the group
//! signature: 48 bytes that ic-agent verifies under the subnet's root key
//! ([`PublicSharing::root_key_der`]) exactly as it verifies a one-node subnet's signature.
//!
//! Everything here is pure and deterministic: no I/O, no clock, no randomness. The node feeds the
//! pool its own roots and the partials peers send, and acts on the [`PoolEvent`]s it returns.
//!
//! Invariants:
//! - Only partials that verify against the signer's public key share for the root they claim are
//!   stored, so every count the pool reports (certification, divergence) is backed by signatures.
//! - At most one partial per signer per height (the first valid one); a different second one is
//!   equivocation and is reported, never stored.
//! - A height certifies at most once, and only with a signature that verifies under the group key.
//! - Memory is bounded: heights at or below the certified (or abandoned) height are dropped,
//!   heights too far ahead are refused, and at most
//!   [`CertificationPoolConfig::tracked_heights_max`] heights are kept.
//!
//! Note "IC signing": the IC hashes to G1 with the DST `BLS_SIG_BLS12381G1_XMD:SHA-256_SSWU_RO_NUL_`
//! and no namespace prefix. Commonware's high-level `sign_message` uses the `_POP_` DST and its own
//! namespace framing, which ic-agent rejects, so this module signs with the low-level
//! `ops::sign`/`ops::verify` and recovers with plain Lagrange interpolation
//! (`ops::threshold::recover`), which does not depend on the message.

use commonware_codec::{Copying, Decode, DecodeExt, Encode};
use commonware_cryptography::bls12381::primitives::{
    group::{G1, Share},
    ops,
    sharing::{ModeVersion, Sharing},
    variant::{MinSig, PartialSignature as CommonwarePartial},
};
use commonware_parallel::Sequential;
use commonware_utils::{Faults, N3f1, NZU32, Participant};
use openic_crypto::bls::BLS_PUBLIC_KEY_DER_PREFIX;
use openic_types::Height;
use std::collections::BTreeMap;
use std::fmt;

/// The IC's domain separator for certified state: ic-agent checks signatures over
/// `IC_STATE_ROOT_DOMAIN_SEPARATOR · root` (`ic-agent-0.49.3/src/agent/mod.rs`).
pub const IC_STATE_ROOT_DOMAIN_SEPARATOR: &[u8; 14] =
    openic_crypto::bls::STATE_ROOT_DOMAIN_SEPARATOR;

/// The IC's domain separation tag for hashing a message to G1 (see the note "IC signing").
const IC_SIGNATURE_DST: &[u8] = openic_crypto::bls::SIGNATURE_DST;

/// The most replicas a subnet may have. Bounds decoding of key files and DKG messages; IC subnets
/// have at most a few dozen nodes.
pub const MAX_REPLICAS: u32 = 100;

/// Length of a group or partial public key (a compressed G2 point).
pub const PUBLIC_KEY_LENGTH: usize = 96;

/// Length of a signature or partial signature (a compressed G1 point).
pub const SIGNATURE_LENGTH: usize = 48;

/// Length of a state root hash.
pub const ROOT_LENGTH: usize = 32;

/// Length of an encoded [`PartialSignature`]: version, height, signer, root, signature.
pub const PARTIAL_SIGNATURE_ENCODED_LENGTH: usize = 1 + 8 + 4 + ROOT_LENGTH + SIGNATURE_LENGTH;

/// Version byte of every encoding in this module; a format change bumps it, so old bytes are
/// refused with a clear error instead of being misread.
const FORMAT_VERSION: u8 = 1;

/// First byte of an encoded partial over a catch-up statement (a state root partial starts with
/// [`FORMAT_VERSION`]).
const CATCH_UP_TAG: u8 = 2;

/// Domain separator of a catch-up statement: the subnet's signature over
/// `CATCH_UP_DOMAIN_SEPARATOR · height (u64 big-endian) · manifest hash` says the state-sync
/// manifest with that hash describes the replicated state at that height. Length-prefixed like the
/// IC's separators, and distinct from `\x0Dic-state-root`, so neither statement can pass for the
/// other.
pub const CATCH_UP_DOMAIN_SEPARATOR: &[u8; 16] = b"\x0Fopenic-catch-up";

/// What a partial signature signs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Statement {
    /// The IC state root after executing a height: `\x0Dic-state-root · root`.
    #[default]
    StateRoot,
    /// The hash of the state-sync manifest of the checkpoint at a height (see
    /// [`CATCH_UP_DOMAIN_SEPARATOR`]).
    CatchUp,
}

impl Statement {
    /// The bytes signed for `root` at `height`.
    fn message(self, height: Height, root: &[u8; ROOT_LENGTH]) -> Vec<u8> {
        match self {
            Statement::StateRoot => state_root_message(root).to_vec(),
            Statement::CatchUp => {
                let mut message = Vec::with_capacity(16 + 8 + ROOT_LENGTH);
                message.extend_from_slice(CATCH_UP_DOMAIN_SEPARATOR);
                message.extend_from_slice(&height.0.to_be_bytes());
                message.extend_from_slice(root);
                message
            }
        }
    }

    fn tag(self) -> u8 {
        match self {
            Statement::StateRoot => FORMAT_VERSION,
            Statement::CatchUp => CATCH_UP_TAG,
        }
    }
}

/// A replica's position in the subnet's sorted member list, which is also the index of its key
/// share (and of its partial public key in the [`PublicSharing`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SignerIndex(pub u32);

impl fmt::Display for SignerIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// Why stored key material (a key file, a sharing) was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyMaterialError {
    /// The bytes are empty or start with a version this build does not know.
    #[error(
        "unsupported key material version {found:?} (this build reads version {FORMAT_VERSION}); was the file written by a newer openic?"
    )]
    UnsupportedVersion {
        /// The first byte, if any.
        found: Option<u8>,
    },
    /// The bytes do not decode.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which kind of key material.
        what: &'static str,
        /// What the decoder objected to.
        reason: String,
    },
    /// The sharing decodes but cannot be a subnet key (wrong threshold or size).
    #[error("invalid sharing: {0}")]
    InvalidSharing(String),
    /// The key share does not belong to the sharing (wrong index or secret).
    #[error("key share {0} does not match the subnet's public sharing")]
    ShareMismatch(SignerIndex),
}

/// This replica's share of the subnet key. Its secret never appears in `Debug` output; store its
/// bytes ([`KeyShare::to_bytes`]) like any secret key.
#[derive(Clone, PartialEq, Eq)]
pub struct KeyShare {
    share: Share,
}

impl fmt::Debug for KeyShare {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyShare(signer {}, secret redacted)", self.share.index)
    }
}

impl KeyShare {
    pub(crate) fn from_share(share: Share) -> Self {
        KeyShare { share }
    }

    /// The Commonware share, for the consensus engine's signing scheme.
    pub(crate) fn commonware_share(&self) -> &Share {
        &self.share
    }

    /// Which signer this share belongs to.
    pub fn signer(&self) -> SignerIndex {
        SignerIndex(self.share.index.get())
    }

    /// The share's bytes for the replica's key file (version byte, then the index and secret
    /// scalar). Secret: whoever reads them can sign as this replica.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = vec![FORMAT_VERSION];
        bytes.extend_from_slice(&self.share.encode());
        bytes
    }

    /// Loads bytes written by [`KeyShare::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyMaterialError> {
        let body = versioned_body(bytes)?;
        let share = Share::decode(Copying(body)).map_err(|error| KeyMaterialError::Malformed {
            what: "key share",
            reason: error.to_string(),
        })?;
        if share.index.get() >= MAX_REPLICAS {
            return Err(KeyMaterialError::Malformed {
                what: "key share",
                reason: format!("signer index {} is not below {MAX_REPLICAS}", share.index),
            });
        }
        Ok(KeyShare { share })
    }
}

/// The public side of the subnet key: the group public key (the IC root key) and every replica's
/// partial public key. Public and the same on every replica; store it next to the key share.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicSharing {
    sharing: Sharing<MinSig>,
}

impl PublicSharing {
    /// Checks that `sharing` is one a subnet can certify with: at most [`MAX_REPLICAS`] replicas
    /// and a threshold of exactly `n - f` (so `f` faulty replicas can neither certify alone nor
    /// stop the others).
    /// The Commonware sharing, for the consensus engine's signing scheme.
    pub(crate) fn commonware_sharing(&self) -> &Sharing<MinSig> {
        &self.sharing
    }

    pub(crate) fn from_sharing(sharing: Sharing<MinSig>) -> Result<Self, KeyMaterialError> {
        let replicas = sharing.total().get();
        if replicas > MAX_REPLICAS {
            return Err(KeyMaterialError::InvalidSharing(format!(
                "{replicas} replicas, more than {MAX_REPLICAS}"
            )));
        }
        let expected = N3f1::quorum(replicas);
        if sharing.required() != expected {
            return Err(KeyMaterialError::InvalidSharing(format!(
                "threshold {} for {replicas} replicas; expected {expected}",
                sharing.required()
            )));
        }
        // One evaluation per replica, so verifying partials later is a table lookup.
        sharing.precompute_partial_publics();
        Ok(PublicSharing { sharing })
    }

    pub(crate) fn sharing(&self) -> &Sharing<MinSig> {
        &self.sharing
    }

    /// How many replicas hold a share.
    pub fn replicas(&self) -> u32 {
        self.sharing.total().get()
    }

    /// How many valid partial signatures recover a group signature (`n - f`).
    pub fn threshold(&self) -> u32 {
        self.sharing.required()
    }

    /// The group public key: 96 bytes, a compressed G2 point.
    pub fn public_key(&self) -> [u8; PUBLIC_KEY_LENGTH] {
        to_array(&self.sharing.public().encode())
    }

    /// The IC root key clients verify certificates with: the 37-byte DER prefix, then
    /// [`PublicSharing::public_key`] (133 bytes).
    pub fn root_key_der(&self) -> Vec<u8> {
        let mut der = BLS_PUBLIC_KEY_DER_PREFIX.to_vec();
        der.extend_from_slice(&self.public_key());
        der
    }

    /// The public key `signer`'s partial signatures verify under, if `signer` is a member.
    pub fn partial_public_key(&self, signer: SignerIndex) -> Option<[u8; PUBLIC_KEY_LENGTH]> {
        self.sharing
            .partial_public(Participant::new(signer.0))
            .ok()
            .map(|key| to_array(&key.encode()))
    }

    /// Whether `share` is the share of its signer in this sharing (checks a key file against the
    /// subnet's public key before the replica signs with it).
    pub fn check_share(&self, share: &KeyShare) -> Result<(), KeyMaterialError> {
        match self.sharing.partial_public(share.share.index) {
            Ok(expected) if expected == share.share.public::<MinSig>() => Ok(()),
            _ => Err(KeyMaterialError::ShareMismatch(share.signer())),
        }
    }

    /// The sharing's bytes (version byte, then the Commonware encoding of the public polynomial).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = vec![FORMAT_VERSION];
        bytes.extend_from_slice(&self.sharing.encode());
        bytes
    }

    /// Loads bytes written by [`PublicSharing::to_bytes`], refusing sharings a subnet cannot use.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, KeyMaterialError> {
        let body = versioned_body(bytes)?;
        let sharing = Sharing::<MinSig>::decode_cfg(
            Copying(body),
            &(NZU32!(MAX_REPLICAS), ModeVersion::v0()),
        )
        .map_err(|error| KeyMaterialError::Malformed {
            what: "public sharing",
            reason: error.to_string(),
        })?;
        Self::from_sharing(sharing)
    }
}

fn versioned_body(bytes: &[u8]) -> Result<&[u8], KeyMaterialError> {
    match bytes.split_first() {
        Some((&FORMAT_VERSION, body)) => Ok(body),
        other => Err(KeyMaterialError::UnsupportedVersion {
            found: other.map(|(version, _)| *version),
        }),
    }
}

fn to_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes
        .try_into()
        .expect("a compressed point has its fixed length")
}

/// One replica's signature share over one height's state root, as sent between replicas.
///
/// It carries the root it signs so a replica can tell a bad partial from one over a different root
/// (which, from enough replicas, means this replica's state diverged).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartialSignature {
    /// What is signed: a state root or a catch-up manifest hash.
    pub statement: Statement,
    /// The height whose state root is signed.
    pub height: Height,
    /// Who signed.
    pub signer: SignerIndex,
    /// The state root signed.
    pub root: [u8; ROOT_LENGTH],
    /// The partial signature: a compressed G1 point.
    pub signature: [u8; SIGNATURE_LENGTH],
}

/// Why a partial signature was refused. [`PartialError::is_misbehaviour`] tells the node which
/// ones to count against the peer that sent it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PartialError {
    /// The bytes are not an encoded partial signature (length, version or curve point).
    #[error("malformed partial signature: {0}")]
    Malformed(&'static str),
    /// The signer index is not a member of the subnet.
    #[error("unknown signer {signer} (the subnet has {replicas} replicas)")]
    UnknownSigner {
        /// The claimed signer.
        signer: SignerIndex,
        /// How many replicas the subnet has.
        replicas: u32,
    },
    /// The signature does not verify under the signer's key for the root it claims.
    #[error("partial signature of signer {signer} at height {height} does not verify")]
    BadSignature {
        /// The claimed signer.
        signer: SignerIndex,
        /// The claimed height.
        height: Height,
    },
    /// The height is at or below one already certified (or abandoned): the partial is late and no
    /// longer needed. Benign.
    #[error("height {height} is already certified or abandoned (floor {floor})")]
    Stale {
        /// The partial's height.
        height: Height,
        /// Heights at or below this are closed.
        floor: Height,
    },
    /// The height is further ahead than this replica tracks; the sender is far ahead or lying.
    #[error("height {height} is too far ahead (at most {ceiling} accepted now)")]
    TooFarAhead {
        /// The partial's height.
        height: Height,
        /// The highest height accepted now.
        ceiling: Height,
    },
    /// The same partial was already received. Benign (gossip repeats itself).
    #[error("duplicate partial signature from signer {signer} at height {height}")]
    Duplicate {
        /// The signer.
        signer: SignerIndex,
        /// The height.
        height: Height,
    },
    /// The signer already sent a different valid partial for this height: it signed two roots.
    #[error("signer {signer} signed two different roots at height {height}")]
    Equivocation {
        /// The signer.
        signer: SignerIndex,
        /// The height.
        height: Height,
    },
}

impl PartialError {
    /// Whether the error shows that the sender (or the signer) misbehaved, rather than being late
    /// or repeating itself.
    pub fn is_misbehaviour(&self) -> bool {
        !matches!(
            self,
            PartialError::Stale { .. } | PartialError::Duplicate { .. }
        )
    }
}

impl PartialSignature {
    /// The wire encoding: version byte, height (u64 big-endian), signer (u32 big-endian), root,
    /// signature; always [`PARTIAL_SIGNATURE_ENCODED_LENGTH`] bytes.
    pub fn to_bytes(&self) -> [u8; PARTIAL_SIGNATURE_ENCODED_LENGTH] {
        let mut bytes = [0u8; PARTIAL_SIGNATURE_ENCODED_LENGTH];
        bytes[0] = self.statement.tag();
        bytes[1..9].copy_from_slice(&self.height.0.to_be_bytes());
        bytes[9..13].copy_from_slice(&self.signer.0.to_be_bytes());
        bytes[13..45].copy_from_slice(&self.root);
        bytes[45..].copy_from_slice(&self.signature);
        bytes
    }

    /// Decodes untrusted bytes. Checks the length, the version and that the signature is a valid
    /// G1 point (on the curve, in the subgroup, not the identity); it does not check the signature
    /// itself (see [`verify_partial`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, PartialError> {
        let bytes: &[u8; PARTIAL_SIGNATURE_ENCODED_LENGTH] = bytes
            .try_into()
            .map_err(|_| PartialError::Malformed("wrong length"))?;
        let statement = match bytes[0] {
            FORMAT_VERSION => Statement::StateRoot,
            CATCH_UP_TAG => Statement::CatchUp,
            _ => return Err(PartialError::Malformed("unsupported version")),
        };
        let partial = PartialSignature {
            statement,
            height: Height(u64::from_be_bytes(to_array(&bytes[1..9]))),
            signer: SignerIndex(u32::from_be_bytes(to_array(&bytes[9..13]))),
            root: to_array(&bytes[13..45]),
            signature: to_array(&bytes[45..]),
        };
        decode_signature(&partial.signature)?;
        Ok(partial)
    }
}

fn decode_signature(signature: &[u8; SIGNATURE_LENGTH]) -> Result<G1, PartialError> {
    G1::decode(Copying(signature.as_slice()))
        .map_err(|_| PartialError::Malformed("signature is not a G1 point"))
}

/// The message the IC signs for a state root.
fn state_root_message(root: &[u8; ROOT_LENGTH]) -> [u8; 14 + ROOT_LENGTH] {
    let mut message = [0u8; 14 + ROOT_LENGTH];
    message[..14].copy_from_slice(IC_STATE_ROOT_DOMAIN_SEPARATOR);
    message[14..].copy_from_slice(root);
    message
}

/// Signs `root` (the state root after executing `height`) with this replica's share.
/// Deterministic: the same share and root always give the same bytes.
pub fn sign_partial(
    share: &KeyShare,
    height: Height,
    root: &[u8; ROOT_LENGTH],
) -> PartialSignature {
    sign_statement(share, Statement::StateRoot, height, root)
}

/// Signs `statement` about `root` at `height` with this replica's share. Deterministic.
pub fn sign_statement(
    share: &KeyShare,
    statement: Statement,
    height: Height,
    root: &[u8; ROOT_LENGTH],
) -> PartialSignature {
    let signature = ops::sign::<MinSig>(
        &share.share.private,
        IC_SIGNATURE_DST,
        &statement.message(height, root),
    );
    PartialSignature {
        statement,
        height,
        signer: share.signer(),
        root: *root,
        signature: to_array(&signature.encode()),
    }
}

/// Checks that `partial` is its signer's signature over the root it claims. Whether that root is
/// this replica's own is the [`CertificationPool`]'s business.
pub fn verify_partial(
    sharing: &PublicSharing,
    partial: &PartialSignature,
) -> Result<(), PartialError> {
    verify_partial_point(sharing, partial).map(|_| ())
}

fn verify_partial_point(
    sharing: &PublicSharing,
    partial: &PartialSignature,
) -> Result<G1, PartialError> {
    let public = sharing
        .sharing
        .partial_public(Participant::new(partial.signer.0))
        .map_err(|_| PartialError::UnknownSigner {
            signer: partial.signer,
            replicas: sharing.replicas(),
        })?;
    let signature = decode_signature(&partial.signature)?;
    ops::verify::<MinSig>(
        &public,
        IC_SIGNATURE_DST,
        &partial.statement.message(partial.height, &partial.root),
        &signature,
    )
    .map_err(|_| PartialError::BadSignature {
        signer: partial.signer,
        height: partial.height,
    })?;
    Ok(signature)
}

/// Whether `signature` is the subnet's signature of `statement` about `root` at `height` (one
/// pairing check under the group key). How a replica checks a catch-up statement a peer sends.
pub fn verify_group_signature(
    sharing: &PublicSharing,
    statement: Statement,
    height: Height,
    root: &[u8; ROOT_LENGTH],
    signature: &[u8; SIGNATURE_LENGTH],
) -> bool {
    let Ok(signature) = decode_signature(signature) else {
        return false;
    };
    ops::verify::<MinSig>(
        sharing.sharing().public(),
        IC_SIGNATURE_DST,
        &statement.message(height, root),
        &signature,
    )
    .is_ok()
}

/// Limits of the [`CertificationPool`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CertificationPoolConfig {
    /// How many heights above the highest one this replica has a root for (or above the certified
    /// height, if higher) a partial may be. Peers a little ahead are normal; further is refused.
    pub future_heights_max: u64,
    /// Heights tracked at once, at most. When exceeded the lowest uncertified height is
    /// abandoned: a later certified height supersedes it (clients only read the latest).
    pub tracked_heights_max: usize,
    /// The statement this pool certifies; partials of another statement are refused.
    pub statement: Statement,
    /// Check each partial's signature when it arrives (one pairing check per partial). When
    /// `false`, a partial is only decoded on arrival, and the pool checks the signature it recovers
    /// from `threshold` agreeing partials (one pairing check per height), verifying partials one by
    /// one only when that fails, when two partials of one signer conflict, or before reporting
    /// divergence. Only for partials whose signer index the transport authenticated (a peer can
    /// then only spoil its own share); see `crate::subnet`.
    pub verify_on_arrival: bool,
}

impl Default for CertificationPoolConfig {
    fn default() -> Self {
        CertificationPoolConfig {
            future_heights_max: 64,
            tracked_heights_max: 256,
            statement: Statement::StateRoot,
            verify_on_arrival: true,
        }
    }
}

/// What the pool tells the node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PoolEvent {
    /// `threshold` replicas signed this replica's root at `height`: `signature` is the IC
    /// certificate's signature. Returned once per height.
    Certified {
        /// The certified height.
        height: Height,
        /// This replica's root at that height.
        root: [u8; ROOT_LENGTH],
        /// The recovered group signature (48 bytes), valid under the root key.
        signature: [u8; SIGNATURE_LENGTH],
    },
    /// `threshold` other replicas signed a different root at `height`: this replica's state
    /// diverged from the subnet's (or its execution is not deterministic). Returned once per
    /// height; the node should stop serving certified state and alert.
    Diverged {
        /// The height.
        height: Height,
        /// This replica's root.
        own_root: [u8; ROOT_LENGTH],
        /// The root the others agree on.
        subnet_root: [u8; ROOT_LENGTH],
    },
}

/// The node gave a height two different roots of its own.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("own root at height {height} changed (non-deterministic execution or a node bug)")]
pub struct OwnRootConflict {
    /// The height.
    pub height: Height,
}

/// A partial as the pool keeps it.
#[derive(Clone, Copy)]
struct StoredPartial {
    root: [u8; ROOT_LENGTH],
    signature: G1,
    /// Whether the signature was checked on its own (always, with `verify_on_arrival`).
    verified: bool,
}

#[derive(Default)]
struct HeightEntry {
    own_root: Option<[u8; ROOT_LENGTH]>,
    /// The first partial of each signer (valid, or not yet checked).
    partials: BTreeMap<SignerIndex, StoredPartial>,
    diverged_reported: bool,
}

/// Collects partial signatures per height and recovers the group signature over this replica's
/// own roots. See the module docs for its invariants.
pub struct CertificationPool {
    sharing: PublicSharing,
    config: CertificationPoolConfig,
    /// The highest certified height.
    certified_height: Height,
    /// Heights at or below this are closed (certified, superseded or abandoned).
    floor: Height,
    /// The highest height this replica gave a root for.
    highest_own_height: Height,
    heights: BTreeMap<Height, HeightEntry>,
    equivocations: u64,
    /// Partials found invalid after they were stored unchecked (`verify_on_arrival: false`).
    invalid_found_later: u64,
}

impl CertificationPool {
    /// A pool that certifies heights above `certified_height` (the last one certified before a
    /// restart, or 0 at genesis).
    pub fn new(
        sharing: PublicSharing,
        config: CertificationPoolConfig,
        certified_height: Height,
    ) -> Self {
        CertificationPool {
            sharing,
            config,
            certified_height,
            floor: certified_height,
            highest_own_height: certified_height,
            heights: BTreeMap::new(),
            equivocations: 0,
            invalid_found_later: 0,
        }
    }

    /// The subnet's public sharing.
    pub fn sharing(&self) -> &PublicSharing {
        &self.sharing
    }

    /// The highest height certified so far.
    pub fn certified_height(&self) -> Height {
        self.certified_height
    }

    /// How many equivocations (two different valid partials from one signer at one height) were
    /// seen since the pool was made.
    pub fn equivocation_count(&self) -> u64 {
        self.equivocations
    }

    /// How many stored partials turned out invalid when checked later (only without
    /// `verify_on_arrival`; with it, invalid partials are refused by `add_partial`).
    pub fn invalid_found_later(&self) -> u64 {
        self.invalid_found_later
    }

    /// The highest height a partial is accepted for now.
    pub fn ceiling(&self) -> Height {
        let base = self.highest_own_height.max(self.floor);
        Height(base.0.saturating_add(self.config.future_heights_max))
    }

    /// Records this replica's own root for `height` (after executing it). May complete a
    /// certification or reveal divergence with partials already received. A height at or below the
    /// certified one is ignored: a later certification supersedes it.
    pub fn set_own_root(
        &mut self,
        height: Height,
        root: [u8; ROOT_LENGTH],
    ) -> Result<Option<PoolEvent>, OwnRootConflict> {
        if height <= self.floor {
            return Ok(None);
        }
        let entry = self.heights.entry(height).or_default();
        match entry.own_root {
            Some(existing) if existing != root => return Err(OwnRootConflict { height }),
            Some(_) => return Ok(None),
            None => entry.own_root = Some(root),
        }
        self.highest_own_height = self.highest_own_height.max(height);
        let event = self.evaluate(height);
        self.enforce_capacity();
        Ok(event)
    }

    /// Adds a partial signature received from a peer (or made by this replica). Returns the event
    /// it completes, if any, or why it was refused.
    pub fn add_partial(
        &mut self,
        partial: &PartialSignature,
    ) -> Result<Option<PoolEvent>, PartialError> {
        if partial.statement != self.config.statement {
            return Err(PartialError::Malformed(
                "the partial signs another statement than this pool certifies",
            ));
        }
        if partial.height <= self.floor {
            return Err(PartialError::Stale {
                height: partial.height,
                floor: self.floor,
            });
        }
        let ceiling = self.ceiling();
        if partial.height > ceiling {
            return Err(PartialError::TooFarAhead {
                height: partial.height,
                ceiling,
            });
        }
        let existing = self
            .heights
            .get(&partial.height)
            .and_then(|entry| entry.partials.get(&partial.signer))
            .copied();
        if let Some(existing) = existing {
            // Compare before verifying, so repeats cost no pairing.
            if existing.root == partial.root
                && to_array::<SIGNATURE_LENGTH>(&existing.signature.encode()) == partial.signature
            {
                return Err(PartialError::Duplicate {
                    signer: partial.signer,
                    height: partial.height,
                });
            }
        }
        let signature = if self.config.verify_on_arrival || existing.is_some() {
            verify_partial_point(&self.sharing, partial)?
        } else {
            self.sharing
                .sharing
                .partial_public(Participant::new(partial.signer.0))
                .map_err(|_| PartialError::UnknownSigner {
                    signer: partial.signer,
                    replicas: self.sharing.replicas(),
                })?;
            decode_signature(&partial.signature)?
        };
        let verified = self.config.verify_on_arrival || existing.is_some();
        if let Some(existing) = existing {
            // Two partials of one signer: equivocation only if the first is valid too.
            let first_valid =
                existing.verified || self.verify_stored(partial.height, partial.signer, &existing);
            if first_valid {
                self.equivocations += 1;
                return Err(PartialError::Equivocation {
                    signer: partial.signer,
                    height: partial.height,
                });
            }
            self.invalid_found_later += 1;
        }
        let entry = self.heights.entry(partial.height).or_default();
        entry.partials.insert(
            partial.signer,
            StoredPartial {
                root: partial.root,
                signature,
                verified,
            },
        );
        let event = self.evaluate(partial.height);
        self.enforce_capacity();
        Ok(event)
    }

    /// Whether a stored partial's signature is valid on its own (one pairing check).
    fn verify_stored(&self, height: Height, signer: SignerIndex, stored: &StoredPartial) -> bool {
        let Ok(public) = self
            .sharing
            .sharing
            .partial_public(Participant::new(signer.0))
        else {
            return false;
        };
        ops::verify::<MinSig>(
            &public,
            IC_SIGNATURE_DST,
            &self.config.statement.message(height, &stored.root),
            &stored.signature,
        )
        .is_ok()
    }

    /// Checks every unchecked partial at `height` on `root` and drops the invalid ones.
    fn verify_unchecked(&mut self, height: Height, root: &[u8; ROOT_LENGTH]) {
        let Some(entry) = self.heights.get(&height) else {
            return;
        };
        let unchecked: Vec<(SignerIndex, StoredPartial)> = entry
            .partials
            .iter()
            .filter(|(_, stored)| !stored.verified && stored.root == *root)
            .map(|(signer, stored)| (*signer, *stored))
            .collect();
        let results: Vec<(SignerIndex, bool)> = unchecked
            .iter()
            .map(|(signer, stored)| (*signer, self.verify_stored(height, *signer, stored)))
            .collect();
        let Some(entry) = self.heights.get_mut(&height) else {
            return;
        };
        for (signer, valid) in results {
            if valid {
                if let Some(stored) = entry.partials.get_mut(&signer) {
                    stored.verified = true;
                }
            } else {
                entry.partials.remove(&signer);
                self.invalid_found_later += 1;
            }
        }
    }

    /// The partials at `height` on `root` (at most `limit`, checked ones first).
    fn partials_on(
        &self,
        height: Height,
        root: &[u8; ROOT_LENGTH],
    ) -> Vec<CommonwarePartial<MinSig>> {
        let Some(entry) = self.heights.get(&height) else {
            return Vec::new();
        };
        let mut on_root: Vec<(bool, SignerIndex, G1)> = entry
            .partials
            .iter()
            .filter(|(_, stored)| stored.root == *root)
            .map(|(signer, stored)| (!stored.verified, *signer, stored.signature))
            .collect();
        on_root.sort_by_key(|(unchecked, signer, _)| (*unchecked, *signer));
        on_root
            .into_iter()
            .map(|(_, signer, signature)| CommonwarePartial::<MinSig> {
                index: Participant::new(signer.0),
                value: signature,
            })
            .collect()
    }

    /// Certifies or reports divergence at `height` if its partials now allow it.
    fn evaluate(&mut self, height: Height) -> Option<PoolEvent> {
        let threshold = self.sharing.threshold() as usize;
        let own_root = self.heights.get(&height)?.own_root?;
        let agreeing = self.partials_on(height, &own_root);
        if agreeing.len() >= threshold {
            // One check of the recovered signature stands for the partials behind it.
            let mut signature = self.recover(&agreeing[..threshold], height, &own_root);
            if signature.is_none() {
                self.verify_unchecked(height, &own_root);
                let agreeing = self.partials_on(height, &own_root);
                if agreeing.len() >= threshold {
                    signature = self.recover(&agreeing[..threshold], height, &own_root);
                }
            }
            if let Some(signature) = signature {
                self.close_through(height);
                self.certified_height = height;
                return Some(PoolEvent::Certified {
                    height,
                    root: own_root,
                    signature,
                });
            }
        }
        let entry = self.heights.get(&height)?;
        if entry.diverged_reported {
            return None;
        }
        let mut others: BTreeMap<[u8; ROOT_LENGTH], usize> = BTreeMap::new();
        for stored in entry.partials.values() {
            if stored.root != own_root {
                *others.entry(stored.root).or_default() += 1;
            }
        }
        let candidate = others
            .into_iter()
            .find(|(_, count)| *count >= threshold)
            .map(|(root, _)| root)?;
        // Divergence is reported only on checked signatures.
        self.verify_unchecked(height, &candidate);
        let entry = self.heights.get_mut(&height)?;
        let checked = entry
            .partials
            .values()
            .filter(|stored| stored.root == candidate)
            .count();
        if checked < threshold {
            return None;
        }
        entry.diverged_reported = true;
        Some(PoolEvent::Diverged {
            height,
            own_root,
            subnet_root: candidate,
        })
    }

    /// Recovers and checks the group signature. Every partial was verified, so recovery cannot
    /// fail; if it does anyway, the height is not certified (and the caller sees no event).
    fn recover(
        &self,
        partials: &[CommonwarePartial<MinSig>],
        height: Height,
        root: &[u8; ROOT_LENGTH],
    ) -> Option<[u8; SIGNATURE_LENGTH]> {
        let sharing = self.sharing.sharing();
        let signature =
            ops::threshold::recover::<MinSig, _>(sharing, partials, &Sequential).ok()?;
        ops::verify::<MinSig>(
            sharing.public(),
            IC_SIGNATURE_DST,
            &self.config.statement.message(height, root),
            &signature,
        )
        .ok()?;
        Some(to_array(&signature.encode()))
    }

    /// Closes every height up to and including `height`.
    fn close_through(&mut self, height: Height) {
        self.floor = self.floor.max(height);
        self.heights = self.heights.split_off(&height.increment());
    }

    fn enforce_capacity(&mut self) {
        while self.heights.len() > self.config.tracked_heights_max {
            let Some((&lowest, _)) = self.heights.first_key_value() else {
                return;
            };
            self.close_through(lowest);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::split_mix::SplitMix;
    use commonware_cryptography::bls12381::{
        dkg::feldman_desmedt::deal_anonymous, primitives::sharing::Mode,
    };
    use commonware_cryptography::transcript::{Transcript, Version};

    /// A trusted-dealer subnet key for `n` replicas, from `seed`.
    pub(crate) fn dealt(n: u32, seed: u64) -> (PublicSharing, Vec<KeyShare>) {
        let rng = Transcript::new(b"openic-certifier-test", Version::V1)
            .commit(seed.to_be_bytes().as_slice())
            .noise(b"deal");
        let (sharing, shares) =
            deal_anonymous::<MinSig, N3f1>(rng, Mode::NonZeroCounter, NZU32!(n));
        (
            PublicSharing::from_sharing(sharing).expect("dealt sharing is valid"),
            shares.into_iter().map(KeyShare::from_share).collect(),
        )
    }

    fn root(byte: u8) -> [u8; 32] {
        [byte; 32]
    }

    fn ic_verify(sharing: &PublicSharing, root: &[u8; 32], signature: &[u8; 48]) -> bool {
        ic_verify_bls_signature::verify_bls_signature(
            signature,
            &state_root_message(root),
            &sharing.public_key(),
        )
        .is_ok()
    }

    fn certified_signature(event: Option<PoolEvent>) -> [u8; 48] {
        match event {
            Some(PoolEvent::Certified { signature, .. }) => signature,
            other => panic!("expected a certification, got {other:?}"),
        }
    }

    /// Feeds the partials of `signers` for `root` at height 1 into a fresh pool whose own root is
    /// `root`, and returns the certification.
    fn certify_with(sharing: &PublicSharing, shares: &[KeyShare], signers: &[usize]) -> [u8; 48] {
        let mut pool = CertificationPool::new(
            sharing.clone(),
            CertificationPoolConfig::default(),
            Height(0),
        );
        assert_eq!(pool.set_own_root(Height(1), root(7)), Ok(None));
        let mut events = Vec::new();
        for &signer in signers {
            let partial = sign_partial(&shares[signer], Height(1), &root(7));
            let wire = PartialSignature::from_bytes(&partial.to_bytes()).expect("round trip");
            events.push(pool.add_partial(&wire).expect("valid partial"));
        }
        let last = events.pop().expect("at least one signer");
        assert!(
            events.iter().all(Option::is_none),
            "certified before the threshold"
        );
        certified_signature(last)
    }

    fn subsets(n: usize, k: usize) -> Vec<Vec<usize>> {
        (0u32..(1 << n))
            .filter(|mask| mask.count_ones() as usize == k)
            .map(|mask| (0..n).filter(|i| mask & (1 << i) != 0).collect())
            .collect()
    }

    #[test]
    fn threshold_signatures_verify_with_ic_verifier_and_are_unique() {
        for (n, t) in [(4u32, 3usize), (7, 5)] {
            let (sharing, shares) = dealt(n, u64::from(n));
            assert_eq!(sharing.threshold() as usize, t);
            assert_eq!(sharing.replicas(), n);
            let der = sharing.root_key_der();
            assert_eq!(der.len(), openic_crypto::bls::BLS_PUBLIC_KEY_DER_LENGTH);
            assert!(openic_crypto::bls::verify(
                &der,
                &state_root_message(&root(7)),
                &certify_with(&sharing, &shares, &(0..t).collect::<Vec<_>>())
            ));
            let mut signatures = BTreeMap::new();
            for subset in subsets(n as usize, t) {
                let signature = certify_with(&sharing, &shares, &subset);
                assert!(
                    ic_verify(&sharing, &root(7), &signature),
                    "n={n} {subset:?}"
                );
                signatures.insert(signature, subset);
            }
            assert_eq!(
                signatures.len(),
                1,
                "every {t}-subset gives the same signature"
            );
        }
    }

    #[test]
    fn fewer_than_threshold_partials_do_not_certify() {
        let (sharing, shares) = dealt(7, 1);
        let mut pool = CertificationPool::new(
            sharing.clone(),
            CertificationPoolConfig::default(),
            Height(0),
        );
        for share in &shares[..4] {
            let partial = sign_partial(share, Height(1), &root(1));
            assert_eq!(pool.add_partial(&partial), Ok(None));
        }
        // Own root arrives late: still only 4 of 5.
        assert_eq!(pool.set_own_root(Height(1), root(1)), Ok(None));
        assert_eq!(pool.certified_height(), Height(0));
        let fifth = sign_partial(&shares[4], Height(1), &root(1));
        let signature = certified_signature(pool.add_partial(&fifth).expect("valid"));
        assert!(ic_verify(&sharing, &root(1), &signature));
        assert_eq!(pool.certified_height(), Height(1));
        // Certified once: the sixth partial is stale.
        let sixth = sign_partial(&shares[5], Height(1), &root(1));
        assert!(matches!(
            pool.add_partial(&sixth),
            Err(PartialError::Stale { .. })
        ));
    }

    #[test]
    fn own_root_after_partials_certifies() {
        let (sharing, shares) = dealt(4, 2);
        let mut pool = CertificationPool::new(
            sharing.clone(),
            CertificationPoolConfig::default(),
            Height(0),
        );
        for share in &shares[..3] {
            assert_eq!(
                pool.add_partial(&sign_partial(share, Height(2), &root(2))),
                Ok(None)
            );
        }
        let signature = certified_signature(pool.set_own_root(Height(2), root(2)).expect("ok"));
        assert!(ic_verify(&sharing, &root(2), &signature));
    }

    #[test]
    fn bad_partials_are_rejected_without_blocking_certification() {
        let (sharing, shares) = dealt(4, 3);
        let (_, foreign_shares) = dealt(4, 99);
        let mut pool = CertificationPool::new(
            sharing.clone(),
            CertificationPoolConfig::default(),
            Height(0),
        );
        pool.set_own_root(Height(1), root(1)).expect("first root");

        // Signed with a key that is not the subnet's.
        let forged = sign_partial(&foreign_shares[1], Height(1), &root(1));
        assert_eq!(
            pool.add_partial(&forged),
            Err(PartialError::BadSignature {
                signer: SignerIndex(1),
                height: Height(1)
            })
        );
        // A valid signature attributed to another signer.
        let mut misattributed = sign_partial(&shares[2], Height(1), &root(1));
        misattributed.signer = SignerIndex(3);
        assert!(matches!(
            pool.add_partial(&misattributed),
            Err(PartialError::BadSignature { .. })
        ));
        // A signer that does not exist.
        let mut unknown = sign_partial(&shares[0], Height(1), &root(1));
        unknown.signer = SignerIndex(4);
        assert_eq!(
            pool.add_partial(&unknown),
            Err(PartialError::UnknownSigner {
                signer: SignerIndex(4),
                replicas: 4
            })
        );
        // A signature over a root other than the one claimed.
        let mut swapped = sign_partial(&shares[0], Height(1), &root(9));
        swapped.root = root(1);
        assert!(matches!(
            pool.add_partial(&swapped),
            Err(PartialError::BadSignature { .. })
        ));
        assert!(
            PartialError::BadSignature {
                signer: SignerIndex(0),
                height: Height(1)
            }
            .is_misbehaviour()
        );

        // The bad ones did not take the signers' slots.
        for index in [1, 3, 0] {
            let event = pool
                .add_partial(&sign_partial(&shares[index], Height(1), &root(1)))
                .expect("valid");
            if index == 0 {
                assert!(ic_verify(&sharing, &root(1), &certified_signature(event)));
            } else {
                assert_eq!(event, None);
            }
        }
    }

    #[test]
    fn duplicates_are_benign_and_equivocation_is_counted() {
        let (sharing, shares) = dealt(4, 4);
        let mut pool =
            CertificationPool::new(sharing, CertificationPoolConfig::default(), Height(0));
        let first = sign_partial(&shares[1], Height(1), &root(1));
        assert_eq!(pool.add_partial(&first), Ok(None));
        let error = pool.add_partial(&first).expect_err("duplicate");
        assert_eq!(
            error,
            PartialError::Duplicate {
                signer: SignerIndex(1),
                height: Height(1)
            }
        );
        assert!(!error.is_misbehaviour());
        let second = sign_partial(&shares[1], Height(1), &root(2));
        assert_eq!(
            pool.add_partial(&second),
            Err(PartialError::Equivocation {
                signer: SignerIndex(1),
                height: Height(1)
            })
        );
        assert_eq!(pool.equivocation_count(), 1);
    }

    #[test]
    fn divergence_is_reported_once() {
        let (sharing, shares) = dealt(4, 5);
        let mut pool =
            CertificationPool::new(sharing, CertificationPoolConfig::default(), Height(0));
        pool.set_own_root(Height(3), root(1)).expect("own root");
        assert_eq!(
            pool.add_partial(&sign_partial(&shares[0], Height(3), &root(1))),
            Ok(None)
        );
        for share in &shares[1..3] {
            assert_eq!(
                pool.add_partial(&sign_partial(share, Height(3), &root(2))),
                Ok(None)
            );
        }
        assert_eq!(
            pool.add_partial(&sign_partial(&shares[3], Height(3), &root(2))),
            Ok(Some(PoolEvent::Diverged {
                height: Height(3),
                own_root: root(1),
                subnet_root: root(2),
            }))
        );
        assert_eq!(pool.certified_height(), Height(0));
        // Reported once, also when the own root is set again.
        assert_eq!(pool.set_own_root(Height(3), root(1)), Ok(None));
        assert_eq!(
            pool.set_own_root(Height(3), root(5)),
            Err(OwnRootConflict { height: Height(3) })
        );
    }

    #[test]
    fn heights_outside_the_window_are_refused() {
        let (sharing, shares) = dealt(4, 6);
        let config = CertificationPoolConfig {
            future_heights_max: 2,
            tracked_heights_max: 3,
            ..CertificationPoolConfig::default()
        };
        let mut pool = CertificationPool::new(sharing, config, Height(10));
        assert!(matches!(
            pool.add_partial(&sign_partial(&shares[0], Height(10), &root(1))),
            Err(PartialError::Stale { .. })
        ));
        assert_eq!(pool.ceiling(), Height(12));
        assert_eq!(
            pool.add_partial(&sign_partial(&shares[0], Height(12), &root(1))),
            Ok(None)
        );
        let ahead = pool
            .add_partial(&sign_partial(&shares[0], Height(13), &root(1)))
            .expect_err("too far");
        assert_eq!(
            ahead,
            PartialError::TooFarAhead {
                height: Height(13),
                ceiling: Height(12)
            }
        );
        assert!(ahead.is_misbehaviour());

        // Executing moves the window; at most three heights are tracked, the lowest is abandoned.
        for height in 11..=14 {
            pool.set_own_root(Height(height), root(height as u8))
                .expect("own root");
        }
        assert_eq!(pool.ceiling(), Height(16));
        assert!(matches!(
            pool.add_partial(&sign_partial(&shares[0], Height(11), &root(11))),
            Err(PartialError::Stale { .. })
        ));
        // Certifying 14 closes 12 and 13 too.
        for share in &shares[..2] {
            assert_eq!(
                pool.add_partial(&sign_partial(share, Height(14), &root(14))),
                Ok(None)
            );
        }
        assert!(matches!(
            pool.add_partial(&sign_partial(&shares[2], Height(14), &root(14))),
            Ok(Some(PoolEvent::Certified { .. }))
        ));
        assert!(matches!(
            pool.add_partial(&sign_partial(&shares[1], Height(13), &root(13))),
            Err(PartialError::Stale { .. })
        ));
        assert_eq!(pool.set_own_root(Height(13), root(13)), Ok(None));
    }

    #[test]
    fn key_material_round_trips_and_is_checked() {
        let (sharing, shares) = dealt(7, 7);
        let restored = PublicSharing::from_bytes(&sharing.to_bytes()).expect("sharing");
        assert_eq!(restored, sharing);
        for share in &shares {
            let bytes = share.to_bytes();
            let loaded = KeyShare::from_bytes(&bytes).expect("share");
            assert_eq!(&loaded, share);
            assert_eq!(restored.check_share(&loaded), Ok(()));
            assert_eq!(
                format!("{loaded:?}"),
                format!("KeyShare(signer {}, secret redacted)", loaded.signer())
            );
            let partial = sign_partial(&loaded, Height(1), &root(1));
            assert_eq!(verify_partial(&restored, &partial), Ok(()));
            assert_eq!(
                restored
                    .partial_public_key(loaded.signer())
                    .map(|key| key.len()),
                Some(PUBLIC_KEY_LENGTH)
            );
        }
        let (other, _) = dealt(7, 8);
        assert_eq!(
            other.check_share(&shares[0]),
            Err(KeyMaterialError::ShareMismatch(SignerIndex(0)))
        );
        assert!(matches!(
            KeyShare::from_bytes(&[2, 0]),
            Err(KeyMaterialError::UnsupportedVersion { found: Some(2) })
        ));
        assert!(matches!(
            PublicSharing::from_bytes(&[]),
            Err(KeyMaterialError::UnsupportedVersion { found: None })
        ));
    }

    #[test]
    fn encodings_are_pinned() {
        // A format change must be a visible decision: these layouts are what replicas exchange
        // and store.
        let (_, shares) = dealt(4, 10);
        let partial = sign_partial(&shares[2], Height(0x0102_0304_0506_0708), &root(0xab));
        let mut expected = vec![1, 1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 0, 2];
        expected.extend_from_slice(&[0xab; 32]);
        expected.extend_from_slice(&partial.signature);
        assert_eq!(partial.to_bytes().to_vec(), expected);

        // Key file: version, varint index, big-endian scalar.
        let mut key_file = vec![1, 3];
        key_file.extend_from_slice(&[0; 31]);
        key_file.push(5);
        let share = KeyShare::from_bytes(&key_file).expect("valid share");
        assert_eq!(share.signer(), SignerIndex(3));
        assert_eq!(share.to_bytes(), key_file);
    }

    #[test]
    fn decoding_garbage_never_panics() {
        let (sharing, shares) = dealt(4, 9);
        let valid = sign_partial(&shares[0], Height(5), &root(5)).to_bytes();
        let key_share = shares[0].to_bytes();
        let public = sharing.to_bytes();
        let mut rng = SplitMix(42);
        for _ in 0..2_000 {
            let length = (rng.next() % 200) as usize;
            let random = rng.bytes(length);
            let _ = PartialSignature::from_bytes(&random);
            let _ = KeyShare::from_bytes(&random);
            let _ = PublicSharing::from_bytes(&random);
            // Truncated and bit-flipped versions of valid encodings.
            for valid in [&valid[..], &key_share[..], &public[..]] {
                let cut = (rng.next() as usize) % (valid.len() + 1);
                let mut mutated = valid[..cut].to_vec();
                if !mutated.is_empty() {
                    let at = (rng.next() as usize) % mutated.len();
                    mutated[at] ^= 1 << (rng.next() % 8);
                }
                for bytes in [&valid[..cut], &mutated[..]] {
                    if let Ok(partial) = PartialSignature::from_bytes(bytes) {
                        let _ = verify_partial(&sharing, &partial);
                    }
                    let _ = KeyShare::from_bytes(bytes);
                    let _ = PublicSharing::from_bytes(bytes);
                }
            }
        }
        assert_eq!(
            PartialSignature::from_bytes(&valid[..PARTIAL_SIGNATURE_ENCODED_LENGTH - 1]),
            Err(PartialError::Malformed("wrong length"))
        );
        let mut bad_point = valid;
        bad_point[45..].fill(0xff);
        assert_eq!(
            PartialSignature::from_bytes(&bad_point),
            Err(PartialError::Malformed("signature is not a G1 point"))
        );
    }

    #[test]
    fn catch_up_statements_certify_apart_from_state_roots() {
        let (sharing, shares) = dealt(4, 11);
        let manifest_hash = root(9);
        let mut pool = CertificationPool::new(
            sharing.clone(),
            CertificationPoolConfig {
                statement: Statement::CatchUp,
                ..CertificationPoolConfig::default()
            },
            Height(0),
        );
        // A state root partial over the same bytes is refused by a catch-up pool.
        let wrong = sign_partial(&shares[0], Height(10), &manifest_hash);
        assert!(pool.add_partial(&wrong).is_err());
        assert_eq!(pool.set_own_root(Height(10), manifest_hash), Ok(None));
        let mut event = None;
        for share in &shares[..3] {
            let partial = sign_statement(share, Statement::CatchUp, Height(10), &manifest_hash);
            let decoded = PartialSignature::from_bytes(&partial.to_bytes()).unwrap();
            assert_eq!(decoded, partial);
            event = pool.add_partial(&decoded).unwrap();
        }
        let signature = certified_signature(event);
        assert!(verify_group_signature(
            &sharing,
            Statement::CatchUp,
            Height(10),
            &manifest_hash,
            &signature
        ));
        // It says nothing about another height, another hash, or a state root.
        assert!(!verify_group_signature(
            &sharing,
            Statement::CatchUp,
            Height(11),
            &manifest_hash,
            &signature
        ));
        assert!(!verify_group_signature(
            &sharing,
            Statement::CatchUp,
            Height(10),
            &root(8),
            &signature
        ));
        assert!(!verify_group_signature(
            &sharing,
            Statement::StateRoot,
            Height(10),
            &manifest_hash,
            &signature
        ));
        assert!(!ic_verify(&sharing, &manifest_hash, &signature));
    }

    fn deferred_pool(sharing: &PublicSharing) -> CertificationPool {
        CertificationPool::new(
            sharing.clone(),
            CertificationPoolConfig {
                verify_on_arrival: false,
                ..CertificationPoolConfig::default()
            },
            Height(0),
        )
    }

    #[test]
    fn deferred_verification_certifies_and_drops_bad_partials() {
        let (sharing, shares) = dealt(4, 21);
        let (_, foreign) = dealt(4, 77);
        let mut pool = deferred_pool(&sharing);
        pool.set_own_root(Height(1), root(1)).expect("own root");
        // A forged partial is stored unchecked...
        assert_eq!(
            pool.add_partial(&sign_partial(&foreign[0], Height(1), &root(1))),
            Ok(None)
        );
        assert_eq!(
            pool.add_partial(&sign_partial(&shares[1], Height(1), &root(1))),
            Ok(None)
        );
        // ...so the third makes a recovery that fails its check; the forged one is found and
        // dropped, and the height waits for one more valid partial.
        assert_eq!(
            pool.add_partial(&sign_partial(&shares[2], Height(1), &root(1))),
            Ok(None)
        );
        assert_eq!(pool.invalid_found_later(), 1);
        // The signer whose slot the forgery took can still sign.
        let event = pool
            .add_partial(&sign_partial(&shares[0], Height(1), &root(1)))
            .expect("valid");
        assert!(ic_verify(&sharing, &root(1), &certified_signature(event)));
        // Malformed and unknown signers are still refused on arrival.
        let mut unknown = sign_partial(&shares[0], Height(2), &root(2));
        unknown.signer = SignerIndex(9);
        assert!(matches!(
            pool.add_partial(&unknown),
            Err(PartialError::UnknownSigner { .. })
        ));
    }

    #[test]
    fn deferred_verification_replaces_a_forgery_and_still_catches_equivocation() {
        let (sharing, shares) = dealt(4, 22);
        let (_, foreign) = dealt(4, 78);
        let mut pool = deferred_pool(&sharing);
        // A forgery in signer 1's slot, then signer 1's real partial: the real one replaces it.
        let mut forged = sign_partial(&foreign[1], Height(1), &root(1));
        forged.signer = SignerIndex(1);
        assert_eq!(pool.add_partial(&forged), Ok(None));
        assert_eq!(
            pool.add_partial(&sign_partial(&shares[1], Height(1), &root(1))),
            Ok(None)
        );
        assert_eq!(pool.invalid_found_later(), 1);
        // Two valid partials of one signer are equivocation.
        assert_eq!(
            pool.add_partial(&sign_partial(&shares[1], Height(1), &root(2))),
            Err(PartialError::Equivocation {
                signer: SignerIndex(1),
                height: Height(1)
            })
        );
        assert_eq!(pool.equivocation_count(), 1);
        for index in [0, 2] {
            let event = pool.add_partial(&sign_partial(&shares[index], Height(1), &root(1)));
            if index == 2 {
                assert_eq!(event, Ok(None), "own root not set yet");
            }
        }
        let event = pool.set_own_root(Height(1), root(1)).expect("own root");
        assert!(ic_verify(&sharing, &root(1), &certified_signature(event)));
    }

    #[test]
    fn deferred_verification_reports_divergence_only_on_valid_signatures() {
        let (sharing, shares) = dealt(4, 23);
        let (_, foreign) = dealt(4, 79);
        let mut pool = deferred_pool(&sharing);
        pool.set_own_root(Height(1), root(1)).expect("own root");
        // Three forged partials on another root: not divergence.
        for (index, foreign_share) in foreign.iter().enumerate().skip(1) {
            let mut forged = sign_partial(foreign_share, Height(1), &root(2));
            forged.signer = SignerIndex(index as u32);
            assert_eq!(pool.add_partial(&forged), Ok(None));
        }
        assert_eq!(pool.invalid_found_later(), 3);
        // Three valid ones on another root: divergence, once.
        let mut events = Vec::new();
        for share in &shares[1..4] {
            events.extend(
                pool.add_partial(&sign_partial(share, Height(1), &root(2)))
                    .expect("valid"),
            );
        }
        assert_eq!(
            events,
            vec![PoolEvent::Diverged {
                height: Height(1),
                own_root: root(1),
                subnet_root: root(2)
            }]
        );
    }
}
