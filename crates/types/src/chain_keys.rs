//! The threshold ("chain") keys a subnet holds, as the management canister and the `ic0.cost_*`
//! System API functions name them, and what using one costs.
//!
//! One list serves both: a key the management canister cannot use is unknown to the cost
//! functions too, and the fee a cost function reports is the fee the method charges.

use crate::Cycles;
use std::fmt;

/// The algorithm (curve) of a chain key.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ChainKeyAlgorithm {
    /// `ecdsa_public_key` / `sign_with_ecdsa`, curve `secp256k1`.
    EcdsaSecp256k1,
    /// `schnorr_public_key` / `sign_with_schnorr`, algorithm `bip340secp256k1`.
    SchnorrBip340Secp256k1,
    /// `schnorr_public_key` / `sign_with_schnorr`, algorithm `ed25519`.
    SchnorrEd25519,
    /// `vetkd_public_key` / `vetkd_derive_key`, curve `bls12_381_g2`.
    VetKdBls12381G2,
}

impl ChainKeyAlgorithm {
    /// The ECDSA curve an `ic0.cost_sign_with_ecdsa` caller names by number, if known.
    pub fn ecdsa_from_code(code: u32) -> Option<ChainKeyAlgorithm> {
        (code == 0).then_some(ChainKeyAlgorithm::EcdsaSecp256k1)
    }

    /// The Schnorr algorithm an `ic0.cost_sign_with_schnorr` caller names by number, if known.
    pub fn schnorr_from_code(code: u32) -> Option<ChainKeyAlgorithm> {
        match code {
            0 => Some(ChainKeyAlgorithm::SchnorrBip340Secp256k1),
            1 => Some(ChainKeyAlgorithm::SchnorrEd25519),
            _ => None,
        }
    }

    /// The vetKD curve an `ic0.cost_vetkd_derive_key` caller names by number, if known.
    pub fn vetkd_from_code(code: u32) -> Option<ChainKeyAlgorithm> {
        (code == 0).then_some(ChainKeyAlgorithm::VetKdBls12381G2)
    }
}

/// A chain key: an algorithm and a name (`key_1`, `test_key_1`, `dfx_test_key`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ChainKeyId {
    /// The algorithm.
    pub algorithm: ChainKeyAlgorithm,
    /// The key's name.
    pub name: String,
}

/// Shown as the Internet Computer shows key ids in its messages, e.g. `ecdsa:Secp256k1:key_1`.
impl fmt::Display for ChainKeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prefix = match self.algorithm {
            ChainKeyAlgorithm::EcdsaSecp256k1 => "ecdsa:Secp256k1",
            ChainKeyAlgorithm::SchnorrBip340Secp256k1 => "schnorr:Bip340Secp256k1",
            ChainKeyAlgorithm::SchnorrEd25519 => "schnorr:Ed25519",
            ChainKeyAlgorithm::VetKdBls12381G2 => "vetkd:Bls12_381_G2",
        };
        write!(f, "{prefix}:{}", self.name)
    }
}

/// The names of the keys every openic subnet holds, for every algorithm: the names DFINITY's
/// local network (PocketIC) serves, so canisters written for it find their keys.
pub const CHAIN_KEY_NAMES: [&str; 3] = ["dfx_test_key", "key_1", "test_key_1"];

/// The fee of one signature or key derivation with a `test_key_1` or `dfx_test_key` key: the
/// Internet Computer's 10 billion cycles on a 13-node subnet, where those keys live.
pub const TEST_KEY_FEE: Cycles = Cycles(10_000_000_000);

/// The fee of one signature or key derivation with a `key_1` key: 10 billion cycles scaled to the
/// 34-node subnet that holds `key_1` on the Internet Computer (`10e9 * 34 / 13`, rounded down).
pub const KEY_1_FEE: Cycles = Cycles(26_153_846_153);

impl ChainKeyId {
    /// Whether this subnet holds the key.
    pub fn is_known(&self) -> bool {
        CHAIN_KEY_NAMES.contains(&self.name.as_str())
    }

    /// What `sign_with_ecdsa`, `sign_with_schnorr` or `vetkd_derive_key` charges for one use of
    /// the key (the public-key methods are free), or `None` if the subnet does not hold it.
    pub fn fee(&self) -> Option<Cycles> {
        match self.name.as_str() {
            "key_1" => Some(KEY_1_FEE),
            "test_key_1" | "dfx_test_key" => Some(TEST_KEY_FEE),
            _ => None,
        }
    }

    /// Every key of `algorithm`'s family this subnet holds, in the order the Internet Computer
    /// lists them in its "existing keys" messages (sorted by their text).
    pub fn all() -> Vec<ChainKeyId> {
        let algorithms = [
            ChainKeyAlgorithm::EcdsaSecp256k1,
            ChainKeyAlgorithm::SchnorrBip340Secp256k1,
            ChainKeyAlgorithm::SchnorrEd25519,
            ChainKeyAlgorithm::VetKdBls12381G2,
        ];
        let mut keys: Vec<ChainKeyId> = algorithms
            .iter()
            .flat_map(|algorithm| {
                CHAIN_KEY_NAMES.iter().map(|name| ChainKeyId {
                    algorithm: *algorithm,
                    name: (*name).to_string(),
                })
            })
            .collect();
        keys.sort_by_key(ToString::to_string);
        keys
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fees_follow_the_key_name_and_unknown_keys_have_none() {
        let key = |name: &str| ChainKeyId {
            algorithm: ChainKeyAlgorithm::SchnorrEd25519,
            name: name.to_string(),
        };
        assert_eq!(key("key_1").fee(), Some(KEY_1_FEE));
        assert_eq!(key("test_key_1").fee(), Some(TEST_KEY_FEE));
        assert_eq!(key("dfx_test_key").fee(), Some(TEST_KEY_FEE));
        assert_eq!(key("key_2").fee(), None);
        assert!(!key("").is_known());
        assert_eq!(KEY_1_FEE.0, 10_000_000_000 * 34 / 13);
    }

    #[test]
    fn ids_print_as_the_internet_computer_prints_them() {
        let all = ChainKeyId::all();
        assert_eq!(all.len(), 12);
        assert_eq!(all[0].to_string(), "ecdsa:Secp256k1:dfx_test_key");
        assert_eq!(all[11].to_string(), "vetkd:Bls12_381_G2:test_key_1");
        assert_eq!(
            ChainKeyAlgorithm::schnorr_from_code(1),
            Some(ChainKeyAlgorithm::SchnorrEd25519)
        );
        assert_eq!(ChainKeyAlgorithm::schnorr_from_code(2), None);
        assert_eq!(ChainKeyAlgorithm::ecdsa_from_code(1), None);
    }
}
