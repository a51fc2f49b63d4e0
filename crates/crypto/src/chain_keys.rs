//! The subnet's chain keys for development: ECDSA and BIP340 Schnorr over secp256k1, Ed25519
//! Schnorr, and vetKD over BLS12-381, derived exactly as the Internet Computer derives them.
//!
//! Derivation is the IC's: a canister's key is the master key tweaked along the path
//! `[caller principal] ++ derivation_path` from an all-zero chain code (`ic-secp256k1`,
//! `ic-ed25519`), and a vetKD key is the master key tweaked by the canister id and then by the
//! context (the `ic-vetkeys` construction), so public keys a canister computes offline with those
//! crates match what the management canister returns.
//!
//! The master secrets are those of DFINITY's local network (PocketIC): each key is derived from
//! the published development seed `[42; 32]` and its name. They are therefore **not secret**, and
//! the same on every openic subnet and across restarts. That is what a development network
//! needs (canisters and their tests that ran against PocketIC see the same keys), and nothing
//! else: docs/ARCHITECTURE.md describes how a production subnet would hold these keys as
//! threshold shares instead. Everything here is deterministic; the randomness vetKD encryption
//! needs is an input.

use ic_bls12_381::hash_to_curve::{ExpandMsgXmd, HashToCurve, HashToField};
use ic_bls12_381::{G1Affine, G1Projective, G2Affine, Scalar};
use openic_types::chain_keys::ChainKeyAlgorithm;

/// The development seed the master keys come from: PocketIC's, so the keys are the same.
const DEVELOPMENT_SEED: [u8; 32] = [42; 32];

/// Most byte strings a derivation path may hold, the caller's principal included (the IC's limit).
pub const MAX_DERIVATION_PATH_LEN: usize = 255;

/// Length of a vetKD transport public key (a compressed G1 point).
pub const TRANSPORT_PUBLIC_KEY_LEN: usize = 48;

/// Length of a vetKD encrypted key: `c1 (G1) || c2 (G2) || c3 (G1)`, compressed.
pub const ENCRYPTED_KEY_LEN: usize = 48 + 96 + 48;

/// Domain separator of the hash that makes a vetKD master secret from a key name (PocketIC's).
const VETKD_MASTER_DST: &[u8] = b"ic-crypto-vetkd-test-utils-generate-test-key";
const VETKD_CANISTER_DST: &[u8] = b"ic-vetkd-bls12-381-g2-canister-id";
const VETKD_CONTEXT_DST: &[u8] = b"ic-vetkd-bls12-381-g2-context";
/// The BLS signature ciphersuite a vetKey is a signature in (augmented: the public key is hashed in).
const VETKD_SIGNATURE_DST: &[u8] = b"BLS_SIG_BLS12381G1_XMD:SHA-256_SSWU_RO_AUG_";
/// Domain separator of the hash that turns the caller's randomness into the encryption scalar.
const VETKD_ENCRYPTION_DST: &[u8] = b"openic-vetkd-encryption-randomness";

/// Why a chain-key operation was refused. The texts are the Internet Computer's.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainKeyError {
    /// The path with the caller prepended is longer than [`MAX_DERIVATION_PATH_LEN`].
    #[error("Derivation path len {len} larger than allowed maximum of {MAX_DERIVATION_PATH_LEN}")]
    DerivationPathTooLong {
        /// The length with the caller prepended.
        len: usize,
    },
    /// A BIP341 merkle root that is neither empty nor 32 bytes.
    #[error("Invalid aux field for {algorithm}")]
    InvalidAux {
        /// The algorithm's name.
        algorithm: &'static str,
    },
    /// An aux input given to Ed25519, which has none.
    #[error("Schnorr algorithm {algorithm} does not support aux input")]
    AuxNotSupported {
        /// The algorithm's name.
        algorithm: &'static str,
    },
    /// The transport public key is not a compressed G1 point.
    #[error("The provided transport public key is invalid.")]
    InvalidTransportPublicKey,
    /// The operation does not apply to the key's algorithm (a caller bug, not user input).
    #[error("key algorithm {0:?} does not support this operation")]
    WrongAlgorithm(ChainKeyAlgorithm),
}

/// A canister's public key: the key's bytes and the chain code the derivation ended with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DerivedPublicKey {
    /// SEC1 compressed (33 bytes) for secp256k1 keys, 32 raw bytes for Ed25519.
    pub public_key: Vec<u8>,
    /// 32 bytes.
    pub chain_code: Vec<u8>,
}

fn check_path(path: &[Vec<u8>]) -> Result<(), ChainKeyError> {
    let len = path.len() + 1;
    if len > MAX_DERIVATION_PATH_LEN {
        return Err(ChainKeyError::DerivationPathTooLong { len });
    }
    Ok(())
}

fn secp256k1_master(name: &str) -> ic_secp256k1::PrivateKey {
    let path = ic_secp256k1::DerivationPath::new(vec![ic_secp256k1::DerivationIndex(name.into())]);
    ic_secp256k1::PrivateKey::generate_from_seed(&DEVELOPMENT_SEED)
        .derive_subkey(&path)
        .0
}

fn ed25519_master(name: &str) -> ic_ed25519::DerivedPrivateKey {
    let path = ic_ed25519::DerivationPath::new(vec![ic_ed25519::DerivationIndex(name.into())]);
    ic_ed25519::PrivateKey::generate_from_seed(&DEVELOPMENT_SEED)
        .derive_subkey(&path)
        .0
}

fn secp256k1_key(
    name: &str,
    caller: &[u8],
    path: &[Vec<u8>],
) -> Result<(ic_secp256k1::PrivateKey, [u8; 32]), ChainKeyError> {
    check_path(path)?;
    let path = ic_secp256k1::DerivationPath::from_canister_id_and_path(caller, path);
    Ok(secp256k1_master(name).derive_subkey(&path))
}

fn ed25519_key(
    name: &str,
    caller: &[u8],
    path: &[Vec<u8>],
) -> Result<(ic_ed25519::DerivedPrivateKey, [u8; 32]), ChainKeyError> {
    check_path(path)?;
    let path = ic_ed25519::DerivationPath::from_canister_id_and_path(caller, path);
    Ok(ed25519_master(name).derive_subkey(&path))
}

/// `ecdsa_public_key` / `schnorr_public_key`: the public key of `canister` (its principal's
/// bytes) at `path` under the key `name` of `algorithm`.
pub fn public_key(
    algorithm: ChainKeyAlgorithm,
    name: &str,
    canister: &[u8],
    path: &[Vec<u8>],
) -> Result<DerivedPublicKey, ChainKeyError> {
    match algorithm {
        ChainKeyAlgorithm::EcdsaSecp256k1 | ChainKeyAlgorithm::SchnorrBip340Secp256k1 => {
            let (key, chain_code) = secp256k1_key(name, canister, path)?;
            Ok(DerivedPublicKey {
                public_key: key.public_key().serialize_sec1(true),
                chain_code: chain_code.to_vec(),
            })
        }
        ChainKeyAlgorithm::SchnorrEd25519 => {
            let (key, chain_code) = ed25519_key(name, canister, path)?;
            Ok(DerivedPublicKey {
                public_key: key.public_key().serialize_raw().to_vec(),
                chain_code: chain_code.to_vec(),
            })
        }
        ChainKeyAlgorithm::VetKdBls12381G2 => Err(ChainKeyError::WrongAlgorithm(algorithm)),
    }
}

/// `sign_with_ecdsa`: an ECDSA signature (`r || s`, low s, RFC 6979 nonce) of the 32-byte
/// `message_hash` with `caller`'s key at `path`.
pub fn sign_with_ecdsa(
    name: &str,
    caller: &[u8],
    path: &[Vec<u8>],
    message_hash: &[u8; 32],
) -> Result<[u8; 64], ChainKeyError> {
    let (key, _) = secp256k1_key(name, caller, path)?;
    Ok(key.sign_digest_with_ecdsa(message_hash))
}

/// `sign_with_schnorr`: a BIP340 signature (with `bip341_merkle_root`, a BIP341 taproot
/// signature) or an Ed25519 signature of `message` with `caller`'s key at `path`.
pub fn sign_with_schnorr(
    algorithm: ChainKeyAlgorithm,
    name: &str,
    caller: &[u8],
    path: &[Vec<u8>],
    message: &[u8],
    bip341_merkle_root: Option<&[u8]>,
) -> Result<[u8; 64], ChainKeyError> {
    match algorithm {
        ChainKeyAlgorithm::SchnorrBip340Secp256k1 => {
            let (key, _) = secp256k1_key(name, caller, path)?;
            match bip341_merkle_root {
                None => Ok(key.sign_message_with_bip340_no_rng(message)),
                Some(root) => key
                    .sign_message_with_bip341_no_rng(message, root)
                    .map_err(|_| ChainKeyError::InvalidAux {
                        algorithm: "bip340secp256k1",
                    }),
            }
        }
        ChainKeyAlgorithm::SchnorrEd25519 => {
            if bip341_merkle_root.is_some() {
                return Err(ChainKeyError::AuxNotSupported {
                    algorithm: "ed25519",
                });
            }
            let (key, _) = ed25519_key(name, caller, path)?;
            Ok(key.sign_message(message))
        }
        ChainKeyAlgorithm::EcdsaSecp256k1 | ChainKeyAlgorithm::VetKdBls12381G2 => {
            Err(ChainKeyError::WrongAlgorithm(algorithm))
        }
    }
}

fn hash_to_scalar(input: &[u8], dst: &[u8]) -> Scalar {
    let mut out = [Scalar::zero()];
    <Scalar as HashToField>::hash_to_field::<ExpandMsgXmd<sha2::Sha256>>(input, dst, &mut out);
    out[0]
}

/// `H(len(a) || a || len(b) || b)` to a scalar, lengths as 8-byte big-endian (the IC's).
fn hash_two_to_scalar(a: &[u8], b: &[u8], dst: &[u8]) -> Scalar {
    let mut input = Vec::with_capacity(16 + a.len() + b.len());
    input.extend_from_slice(&(a.len() as u64).to_be_bytes());
    input.extend_from_slice(a);
    input.extend_from_slice(&(b.len() as u64).to_be_bytes());
    input.extend_from_slice(b);
    hash_to_scalar(&input, dst)
}

/// The vetKD key `name`'s master secret, and `canister`'s key for `context` as (public key,
/// secret key).
fn vetkd_keys(name: &str, canister: &[u8], context: &[u8]) -> (G2Affine, Scalar) {
    let master_secret = hash_to_scalar(name.as_bytes(), VETKD_MASTER_DST);
    let master_public = G2Affine::from(G2Affine::generator() * master_secret);
    let canister_tweak =
        hash_two_to_scalar(&master_public.to_compressed(), canister, VETKD_CANISTER_DST);
    let canister_public = G2Affine::from(G2Affine::generator() * canister_tweak + master_public);
    if context.is_empty() {
        return (canister_public, master_secret + canister_tweak);
    }
    let context_tweak =
        hash_two_to_scalar(&canister_public.to_compressed(), context, VETKD_CONTEXT_DST);
    let public = G2Affine::from(G2Affine::generator() * context_tweak + canister_public);
    (public, master_secret + canister_tweak + context_tweak)
}

/// `vetkd_public_key`: `canister`'s public key for `context` (a compressed G2 point, 96 bytes).
pub fn vetkd_public_key(name: &str, canister: &[u8], context: &[u8]) -> [u8; 96] {
    vetkd_keys(name, canister, context).0.to_compressed()
}

/// Whether `bytes` is a transport public key `vetkd_derive_key` accepts (a compressed G1 point,
/// the identity included, as on the Internet Computer).
pub fn is_valid_transport_public_key(bytes: &[u8]) -> bool {
    <&[u8; TRANSPORT_PUBLIC_KEY_LEN]>::try_from(bytes)
        .is_ok_and(|bytes| bool::from(G1Affine::from_compressed(bytes).is_some()))
}

/// `vetkd_derive_key`: `caller`'s vetKey for `context` and `input` (the BLS signature of
/// `public key || input`), encrypted to `transport_public_key` as `c1 || c2 || c3` (192 bytes).
/// `randomness` makes the encryption scalar; replicas must agree on it.
pub fn vetkd_derive_key(
    name: &str,
    caller: &[u8],
    context: &[u8],
    input: &[u8],
    transport_public_key: &[u8],
    randomness: &[u8; 32],
) -> Result<[u8; ENCRYPTED_KEY_LEN], ChainKeyError> {
    let transport = <&[u8; TRANSPORT_PUBLIC_KEY_LEN]>::try_from(transport_public_key)
        .ok()
        .and_then(|bytes| Option::<G1Affine>::from(G1Affine::from_compressed(bytes)))
        .ok_or(ChainKeyError::InvalidTransportPublicKey)?;
    let (public, secret) = vetkd_keys(name, caller, context);
    let mut signed = public.to_compressed().to_vec();
    signed.extend_from_slice(input);
    let message = G1Affine::from(
        <G1Projective as HashToCurve<ExpandMsgXmd<sha2::Sha256>>>::hash_to_curve(
            signed,
            VETKD_SIGNATURE_DST,
        ),
    );
    let r = hash_two_to_scalar(randomness, caller, VETKD_ENCRYPTION_DST);
    let c1 = G1Affine::from(G1Affine::generator() * r);
    let c2 = G2Affine::from(G2Affine::generator() * r);
    let c3 = G1Affine::from(transport * r + message * secret);
    let mut out = [0u8; ENCRYPTED_KEY_LEN];
    out[..48].copy_from_slice(&c1.to_compressed());
    out[48..144].copy_from_slice(&c2.to_compressed());
    out[144..].copy_from_slice(&c3.to_compressed());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CANISTER: &[u8] = &[0, 0, 0, 0, 0, 0, 0, 1, 1, 1];

    #[test]
    fn master_keys_are_pocketics() {
        use ic_secp256k1::PocketIcMasterPublicKeyId as S;
        for (name, id) in [
            ("key_1", S::EcdsaKey1),
            ("test_key_1", S::EcdsaTestKey1),
            ("dfx_test_key", S::EcdsaDfxTestKey),
        ] {
            assert_eq!(
                secp256k1_master(name).public_key(),
                ic_secp256k1::PublicKey::pocketic_key(id),
                "{name}"
            );
        }
        use ic_ed25519::PocketIcMasterPublicKeyId as E;
        for (name, id) in [
            ("key_1", E::Key1),
            ("test_key_1", E::TestKey1),
            ("dfx_test_key", E::DfxTestKey),
        ] {
            assert_eq!(
                ed25519_master(name).public_key(),
                ic_ed25519::PublicKey::pocketic_key(id),
                "{name}"
            );
        }
    }

    #[test]
    fn public_keys_match_offline_derivation_and_signatures_verify() {
        let path = vec![b"wallet".to_vec(), vec![0, 0, 0, 7]];
        let principal = candid::Principal::from_slice(CANISTER);
        let ecdsa = public_key(
            ChainKeyAlgorithm::EcdsaSecp256k1,
            "test_key_1",
            CANISTER,
            &path,
        )
        .unwrap();
        let (offline, chain_code) = ic_secp256k1::PublicKey::derive_pocketic_key(
            ic_secp256k1::PocketIcMasterPublicKeyId::EcdsaTestKey1,
            &principal,
            &path,
        );
        assert_eq!(ecdsa.public_key, offline.serialize_sec1(true));
        assert_eq!(ecdsa.chain_code, chain_code);
        let hash = [7u8; 32];
        let signature = sign_with_ecdsa("test_key_1", CANISTER, &path, &hash).unwrap();
        assert!(offline.verify_ecdsa_signature_prehashed(&hash, &signature));

        let bip340 = sign_with_schnorr(
            ChainKeyAlgorithm::SchnorrBip340Secp256k1,
            "test_key_1",
            CANISTER,
            &path,
            b"any length",
            None,
        )
        .unwrap();
        assert!(offline.verify_bip340_signature(b"any length", &bip340));

        let ed = public_key(ChainKeyAlgorithm::SchnorrEd25519, "key_1", CANISTER, &path).unwrap();
        let signature = sign_with_schnorr(
            ChainKeyAlgorithm::SchnorrEd25519,
            "key_1",
            CANISTER,
            &path,
            b"hello",
            None,
        )
        .unwrap();
        let key = ic_ed25519::PublicKey::deserialize_raw(&ed.public_key).unwrap();
        assert!(key.verify_signature(b"hello", &signature).is_ok());
        assert!(key.verify_signature(b"hellO", &signature).is_err());
    }

    /// Replicas sign inside execution, so the same request must give the same bytes on every
    /// replica: no signing path may draw local randomness.
    #[test]
    fn every_answer_is_a_function_of_its_inputs() {
        let path = vec![b"p".to_vec()];
        let twice = |f: &dyn Fn() -> Vec<u8>| assert_eq!(f(), f());
        twice(&|| {
            sign_with_ecdsa("key_1", CANISTER, &path, &[3; 32])
                .unwrap()
                .to_vec()
        });
        for algorithm in [
            ChainKeyAlgorithm::SchnorrBip340Secp256k1,
            ChainKeyAlgorithm::SchnorrEd25519,
        ] {
            twice(&|| {
                sign_with_schnorr(algorithm, "key_1", CANISTER, &path, b"m", None)
                    .unwrap()
                    .to_vec()
            });
        }
        let root = [5u8; 32];
        twice(&|| {
            sign_with_schnorr(
                ChainKeyAlgorithm::SchnorrBip340Secp256k1,
                "key_1",
                CANISTER,
                &path,
                b"m",
                Some(&root),
            )
            .unwrap()
            .to_vec()
        });
        let transport = G1Affine::generator().to_compressed();
        twice(&|| {
            vetkd_derive_key("key_1", CANISTER, b"c", b"i", &transport, &[1; 32])
                .unwrap()
                .to_vec()
        });
    }

    #[test]
    fn bad_inputs_get_the_ics_errors() {
        let long = vec![vec![]; MAX_DERIVATION_PATH_LEN];
        assert_eq!(
            public_key(ChainKeyAlgorithm::EcdsaSecp256k1, "key_1", CANISTER, &long)
                .unwrap_err()
                .to_string(),
            "Derivation path len 256 larger than allowed maximum of 255"
        );
        let aux = sign_with_schnorr(
            ChainKeyAlgorithm::SchnorrBip340Secp256k1,
            "key_1",
            CANISTER,
            &[],
            b"m",
            Some(&[1, 2, 3]),
        );
        assert_eq!(
            aux.unwrap_err().to_string(),
            "Invalid aux field for bip340secp256k1"
        );
        let ed_aux = sign_with_schnorr(
            ChainKeyAlgorithm::SchnorrEd25519,
            "key_1",
            CANISTER,
            &[],
            b"m",
            Some(&[]),
        );
        assert!(matches!(ed_aux, Err(ChainKeyError::AuxNotSupported { .. })));
        assert!(!is_valid_transport_public_key(&[1; 48]));
        assert!(!is_valid_transport_public_key(&[0; 47]));
        assert!(is_valid_transport_public_key(
            &G1Affine::generator().to_compressed()
        ));
        assert_eq!(
            vetkd_derive_key("key_1", CANISTER, b"", b"", &[1; 48], &[0; 32]),
            Err(ChainKeyError::InvalidTransportPublicKey)
        );
    }

    /// With the identity as transport key, `c3` is the vetKey itself: a BLS signature that
    /// verifies under the derived public key, `e(c3, g2) == e(H(pk || input), pk)`.
    #[test]
    fn vetkey_is_a_bls_signature_under_the_derived_key() {
        use ic_bls12_381::pairing;
        let identity = G1Affine::identity().to_compressed();
        let encrypted = vetkd_derive_key(
            "dfx_test_key",
            CANISTER,
            b"ctx",
            b"input",
            &identity,
            &[9; 32],
        )
        .unwrap();
        let c3 = G1Affine::from_compressed(&encrypted[144..].try_into().unwrap()).unwrap();
        let public =
            G2Affine::from_compressed(&vetkd_public_key("dfx_test_key", CANISTER, b"ctx")).unwrap();
        let mut signed = public.to_compressed().to_vec();
        signed.extend_from_slice(b"input");
        let message = G1Affine::from(
            <G1Projective as HashToCurve<ExpandMsgXmd<sha2::Sha256>>>::hash_to_curve(
                signed,
                VETKD_SIGNATURE_DST,
            ),
        );
        assert_eq!(
            pairing(&c3, &G2Affine::generator()),
            pairing(&message, &public)
        );
        // A different context is a different key.
        assert_ne!(
            vetkd_public_key("dfx_test_key", CANISTER, b"ctx"),
            vetkd_public_key("dfx_test_key", CANISTER, b"")
        );
    }
}
