//! The subnet's BLS12-381 signing key, in the Internet Computer's format: public keys in G2 (96
//! bytes, wrapped in a fixed 133-byte DER), signatures in G1 (48 bytes), hash-to-curve with the DST
//! `BLS_SIG_BLS12381G1_XMD:SHA-256_SSWU_RO_NUL_`. Keys and verification use
//! `ic-verify-bls-signature`, the crate ic-agent verifies with; signing, which the node does once per
//! height, uses `blst` (BLS signatures are deterministic, so both give the same bytes, and a test
//! checks that they do), because it is several times faster.

use ic_verify_bls_signature::{PrivateKey, PublicKey};

/// The IC's domain separation tag for hashing a message to G1.
/// The domain separator of a signed state root: a subnet signs `STATE_ROOT_DOMAIN_SEPARATOR ||
/// root_hash` (what ic-agent verifies certificates against).
pub const STATE_ROOT_DOMAIN_SEPARATOR: &[u8; 14] = b"\x0Dic-state-root";

/// The domain separation tag of the IC's BLS signatures (G1 signatures, basic scheme).
pub const SIGNATURE_DST: &[u8] = b"BLS_SIG_BLS12381G1_XMD:SHA-256_SSWU_RO_NUL_";

/// The 37-byte DER prefix of an IC BLS12-381 G2 public key (algorithm OID 1.3.6.1.4.1.44668.5.3.1.2.1,
/// curve OID 1.3.6.1.4.1.44668.5.3.2.1). ic-agent and the JS agent check it byte for byte.
pub const BLS_PUBLIC_KEY_DER_PREFIX: [u8; 37] = [
    0x30, 0x81, 0x82, 0x30, 0x1d, 0x06, 0x0d, 0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0xdc, 0x7c, 0x05,
    0x03, 0x01, 0x02, 0x01, 0x06, 0x0c, 0x2b, 0x06, 0x01, 0x04, 0x01, 0x82, 0xdc, 0x7c, 0x05, 0x03,
    0x02, 0x01, 0x03, 0x61, 0x00,
];

/// Length of the DER-encoded public key.
pub const BLS_PUBLIC_KEY_DER_LENGTH: usize = 133;

/// Length of a signature (a compressed G1 point).
pub const BLS_SIGNATURE_LENGTH: usize = 48;

/// Length of a serialised secret key.
pub const BLS_SECRET_KEY_LENGTH: usize = 32;

/// Why key bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BlsKeyError {
    /// The stored secret key is not a valid BLS12-381 scalar.
    #[error(
        "invalid BLS secret key ({0} bytes; expected {BLS_SECRET_KEY_LENGTH} bytes of a valid scalar)"
    )]
    InvalidSecretKey(usize),
}

/// The key that signs the subnet's certified state. For a one-node subnet it is a plain BLS key;
/// a multi-node subnet will hold a threshold share instead, with the same public-key format.
pub struct SubnetSigningKey {
    secret: PrivateKey,
    /// The same scalar, for blst.
    signer: blst::min_sig::SecretKey,
    public_key_der: Vec<u8>,
}

impl std::fmt::Debug for SubnetSigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "SubnetSigningKey(public {})",
            hex::encode(&self.public_key_der[37..45])
        )
    }
}

impl SubnetSigningKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        loop {
            // `from_private_key` fails only for the zero scalar, which blst refuses as a key.
            if let Ok(key) = Self::from_private_key(PrivateKey::random(&mut rand::rngs::OsRng)) {
                return key;
            }
        }
    }

    /// Loads a key serialised with [`SubnetSigningKey::secret_bytes`].
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, BlsKeyError> {
        let secret = PrivateKey::deserialize(bytes)
            .map_err(|_| BlsKeyError::InvalidSecretKey(bytes.len()))?;
        Self::from_private_key(secret)
    }

    fn from_private_key(secret: PrivateKey) -> Result<Self, BlsKeyError> {
        // Both crates serialise the scalar big-endian.
        let signer = blst::min_sig::SecretKey::from_bytes(&secret.serialize())
            .map_err(|_| BlsKeyError::InvalidSecretKey(BLS_SECRET_KEY_LENGTH))?;
        let mut public_key_der = BLS_PUBLIC_KEY_DER_PREFIX.to_vec();
        public_key_der.extend_from_slice(&secret.public_key().serialize());
        Ok(SubnetSigningKey {
            secret,
            signer,
            public_key_der,
        })
    }

    /// The secret key's 32 bytes, for storing it (the node keeps its keys across restarts so
    /// clients' cached root keys stay valid).
    pub fn secret_bytes(&self) -> [u8; BLS_SECRET_KEY_LENGTH] {
        self.secret.serialize()
    }

    /// The public key in the 133-byte IC DER format (the "root key" of a one-subnet network).
    pub fn public_key_der(&self) -> &[u8] {
        &self.public_key_der
    }

    /// Signs `message` (for certificates: `"\x0Dic-state-root" · root_hash`).
    pub fn sign(&self, message: &[u8]) -> [u8; BLS_SIGNATURE_LENGTH] {
        self.signer.sign(message, SIGNATURE_DST, &[]).compress()
    }
}

/// Verifies an IC BLS signature against a DER (133-byte) or raw (96-byte) public key.
pub fn verify(public_key: &[u8], message: &[u8], signature: &[u8]) -> bool {
    let raw = if public_key.len() == BLS_PUBLIC_KEY_DER_LENGTH
        && public_key.starts_with(&BLS_PUBLIC_KEY_DER_PREFIX)
    {
        &public_key[BLS_PUBLIC_KEY_DER_PREFIX.len()..]
    } else {
        public_key
    };
    PublicKey::deserialize(raw).is_ok()
        && ic_verify_bls_signature::verify_bls_signature(signature, message, raw).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_reload() {
        let key = SubnetSigningKey::generate();
        assert_eq!(key.public_key_der().len(), BLS_PUBLIC_KEY_DER_LENGTH);
        let message = b"\x0Dic-state-rootabc";
        let signature = key.sign(message);
        assert!(verify(key.public_key_der(), message, &signature));
        assert!(!verify(key.public_key_der(), b"other", &signature));
        let reloaded = SubnetSigningKey::from_secret_bytes(&key.secret_bytes()).unwrap();
        assert_eq!(reloaded.public_key_der(), key.public_key_der());
    }

    #[test]
    fn blst_signs_the_same_bytes_as_the_ic_crate() {
        for _ in 0..8 {
            let key = SubnetSigningKey::generate();
            for message in [&b""[..], b"\x0Dic-state-root", &[7u8; 200][..]] {
                assert_eq!(
                    key.sign(message),
                    key.secret.sign(message).serialize(),
                    "blst and ic-verify-bls-signature must agree"
                );
            }
        }
    }

    #[test]
    fn refuses_zero_secret() {
        assert!(SubnetSigningKey::from_secret_bytes(&[0; 32]).is_err());
    }

    #[test]
    fn refuses_garbage_secret() {
        assert!(SubnetSigningKey::from_secret_bytes(&[0xff; 32]).is_err());
        assert!(SubnetSigningKey::from_secret_bytes(&[1; 5]).is_err());
    }
}
