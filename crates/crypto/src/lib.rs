//! Cryptography for openic, as thin wrappers over the official IC crates (the same ones ic-agent
//! uses to verify us, so both sides agree by construction):
//! - [`bls`]: the subnet's BLS12-381 threshold key in the IC format (G2 public key in the 133-byte
//!   DER, G1 signatures, the IC ciphersuite), used to sign certified state.
//! - [`chain_keys`]: the development chain keys (ECDSA, Schnorr, vetKD) canisters sign and
//!   derive with through the management canister, derived as the IC derives them.
//! - [`node_key`]: a node's Ed25519 key, used to sign query responses.
//! - [`principal`]: self-authenticating principals derived from DER public keys.
//! - [`request_id`]: the representation-independent hash (request ids, delegations, query
//!   responses) over CBOR maps exactly as received.
//! - [`signatures`], [`delegation`], [`envelope`]: verification of user signatures (Ed25519,
//!   ECDSA P-256 and secp256k1), delegation chains, and a request envelope's authentication.
//!
//! Invariant: key material never appears in logs or `Debug` output.

pub mod bls;
pub mod chain_keys;
pub mod delegation;
pub mod envelope;
pub mod node_key;
pub mod principal;
pub mod request_id;
pub mod signatures;

pub use bls::SubnetSigningKey;
pub use node_key::NodeKey;
pub use principal::self_authenticating_principal;
