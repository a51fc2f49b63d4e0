//! A node's Ed25519 key: signs query responses (`"\x0Bic-response" · hash_of_map(response)`).
//!
//! The key is kept with `ic-ed25519` (the IC's own crate, for encodings); signing, which the node
//! does for every query, goes through AWS-LC, which is several times faster. Ed25519 signatures
//! are deterministic, so both give the same bytes (a test checks that they do).

use candid::Principal;

/// Length of a serialised secret key.
pub const NODE_SECRET_KEY_LENGTH: usize = 32;

/// Why key bytes were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NodeKeyError {
    /// Wrong length.
    #[error("invalid node secret key ({0} bytes; expected {NODE_SECRET_KEY_LENGTH})")]
    InvalidSecretKey(usize),
}

/// A node's Ed25519 signing key and the identity derived from it.
pub struct NodeKey {
    secret: ic_ed25519::PrivateKey,
    /// The same key, for AWS-LC.
    signer: aws_lc_rs::signature::Ed25519KeyPair,
    public_key_der: Vec<u8>,
    node_id: Principal,
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeKey({})", self.node_id)
    }
}

impl NodeKey {
    /// A fresh random key.
    pub fn generate() -> Self {
        Self::from_private_key(ic_ed25519::PrivateKey::generate())
    }

    /// Loads a key serialised with [`NodeKey::secret_bytes`].
    pub fn from_secret_bytes(bytes: &[u8]) -> Result<Self, NodeKeyError> {
        let bytes: &[u8; 32] = bytes
            .try_into()
            .map_err(|_| NodeKeyError::InvalidSecretKey(bytes.len()))?;
        Ok(Self::from_private_key(
            ic_ed25519::PrivateKey::deserialize_raw_32(bytes),
        ))
    }

    fn from_private_key(secret: ic_ed25519::PrivateKey) -> Self {
        let public_key_der = secret.public_key().serialize_rfc8410_der();
        let node_id = crate::self_authenticating_principal(&public_key_der);
        let signer = aws_lc_rs::signature::Ed25519KeyPair::from_seed_and_public_key(
            &secret.serialize_raw(),
            &secret.public_key().serialize_raw(),
        )
        .expect("AWS-LC accepts every 32-byte Ed25519 seed with its own public key");
        NodeKey {
            secret,
            signer,
            public_key_der,
            node_id,
        }
    }

    /// The 32-byte secret, for storing it.
    pub fn secret_bytes(&self) -> [u8; NODE_SECRET_KEY_LENGTH] {
        self.secret.serialize_raw()
    }

    /// The public key as 44-byte DER (`302a300506032b6570032100` · key), as certified under
    /// `/subnet/<id>/node/<node id>/public_key`.
    pub fn public_key_der(&self) -> &[u8] {
        &self.public_key_der
    }

    /// The node id: the self-authenticating principal of the DER public key.
    pub fn node_id(&self) -> Principal {
        self.node_id
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        let signature = self.signer.sign(message);
        let mut bytes = [0u8; 64];
        bytes.copy_from_slice(signature.as_ref());
        bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aws_lc_signs_the_same_bytes_as_the_ic_crate() {
        for _ in 0..8 {
            let key = NodeKey::generate();
            for message in [&b""[..], b"\x0Bic-response", &[9u8; 300][..]] {
                assert_eq!(key.sign(message), key.secret.sign_message(message));
            }
        }
    }

    #[test]
    fn der_shape_and_reload() {
        let key = NodeKey::generate();
        assert_eq!(key.public_key_der().len(), 44);
        assert_eq!(
            hex::encode(&key.public_key_der()[..12]),
            "302a300506032b6570032100"
        );
        let reloaded = NodeKey::from_secret_bytes(&key.secret_bytes()).unwrap();
        assert_eq!(reloaded.node_id(), key.node_id());
        let signature = key.sign(b"msg");
        let public = ic_ed25519::PublicKey::deserialize_rfc8410_der(key.public_key_der()).unwrap();
        assert!(public.verify_signature(b"msg", &signature).is_ok());
    }
}
