//! Verification of user signatures: a DER `SubjectPublicKeyInfo` plus a signature over a
//! domain-separated message, in the schemes the IC accepts from users (interface spec
//! "Signatures"): Ed25519, ECDSA P-256 and ECDSA secp256k1 (SHA-256, 64-byte `r‖s`, high or low
//! `s`). WebAuthn and canister signatures are recognised and refused with a clear error.
//!
//! Keys are recognised by their exact DER prefixes, the encodings every IC client produces.

use k256::ecdsa::signature::Verifier as _;

/// DER prefix of an Ed25519 key (OID 1.3.101.112), followed by the 32-byte key.
pub const ED25519_DER_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// DER prefix of an ECDSA P-256 key (id-ecPublicKey, prime256v1), followed by the 65-byte
/// uncompressed point.
pub const ECDSA_P256_DER_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];

/// DER prefix of an ECDSA secp256k1 key (id-ecPublicKey, secp256k1), followed by the 65-byte
/// uncompressed point.
pub const ECDSA_SECP256K1_DER_PREFIX: [u8; 23] = [
    0x30, 0x56, 0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b,
    0x81, 0x04, 0x00, 0x0a, 0x03, 0x42, 0x00,
];

/// Contents of the OID 1.3.6.1.4.1.56387.1.1 (COSE-encoded WebAuthn keys).
const WEBAUTHN_OID: [u8; 10] = [0x2b, 0x06, 0x01, 0x04, 0x01, 0x83, 0xb8, 0x43, 0x01, 0x01];

/// Contents of the OID 1.3.6.1.4.1.56387.1.2 (canister signatures).
const CANISTER_SIGNATURE_OID: [u8; 10] =
    [0x2b, 0x06, 0x01, 0x04, 0x01, 0x83, 0xb8, 0x43, 0x01, 0x02];

/// Length of an Ed25519 or ECDSA (`r‖s`) signature.
pub const SIGNATURE_LENGTH: usize = 64;

/// Why a signature was not accepted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A key in a scheme openic does not verify (yet).
    #[error(
        "unsupported signature scheme: {0}; sign with an Ed25519, ECDSA P-256 or ECDSA secp256k1 key"
    )]
    UnsupportedScheme(&'static str),
    /// The DER bytes are not a known public-key encoding, or the key itself is invalid.
    #[error("malformed public key: {0}")]
    MalformedPublicKey(String),
    /// The signature has the wrong length or encoding.
    #[error("malformed signature: {0}")]
    MalformedSignature(String),
    /// The signature does not verify.
    #[error("the {scheme} signature does not verify against the given public key and message")]
    Invalid {
        /// The scheme that was tried.
        scheme: &'static str,
    },
}

/// A parsed user public key.
#[derive(Clone, Debug)]
pub enum UserPublicKey {
    /// Ed25519.
    Ed25519(ic_ed25519::PublicKey),
    /// ECDSA over P-256 with SHA-256.
    EcdsaP256(p256::ecdsa::VerifyingKey),
    /// ECDSA over secp256k1 with SHA-256.
    EcdsaSecp256k1(k256::ecdsa::VerifyingKey),
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack
        .windows(needle.len())
        .any(|window| window == needle)
}

impl UserPublicKey {
    /// Parses a DER `SubjectPublicKeyInfo`.
    pub fn from_der(der: &[u8]) -> Result<UserPublicKey, SignatureError> {
        if let Some(raw) = der.strip_prefix(&ED25519_DER_PREFIX[..]) {
            return ic_ed25519::PublicKey::deserialize_raw(raw)
                .map(UserPublicKey::Ed25519)
                .map_err(|e| SignatureError::MalformedPublicKey(format!("Ed25519 key: {e:?}")));
        }
        if let Some(point) = der.strip_prefix(&ECDSA_P256_DER_PREFIX[..]) {
            return p256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map(UserPublicKey::EcdsaP256)
                .map_err(|_| {
                    SignatureError::MalformedPublicKey(
                        "the P-256 point is not on the curve or not 65 uncompressed bytes".into(),
                    )
                });
        }
        if let Some(point) = der.strip_prefix(&ECDSA_SECP256K1_DER_PREFIX[..]) {
            return k256::ecdsa::VerifyingKey::from_sec1_bytes(point)
                .map(UserPublicKey::EcdsaSecp256k1)
                .map_err(|_| {
                    SignatureError::MalformedPublicKey(
                        "the secp256k1 point is not on the curve or not 65 uncompressed bytes"
                            .into(),
                    )
                });
        }
        // Look for the scheme OIDs inside the AlgorithmIdentifier (the first few dozen bytes) to
        // name the scheme in the error.
        let head = &der[..der.len().min(32)];
        if contains(head, &WEBAUTHN_OID) {
            return Err(SignatureError::UnsupportedScheme("WebAuthn (COSE) keys"));
        }
        if contains(head, &CANISTER_SIGNATURE_OID) {
            return Err(SignatureError::UnsupportedScheme("canister signatures"));
        }
        Err(SignatureError::MalformedPublicKey(format!(
            "{} bytes that are not a DER Ed25519, ECDSA P-256 or secp256k1 SubjectPublicKeyInfo",
            der.len()
        )))
    }

    /// The scheme's name, for messages.
    pub fn scheme(&self) -> &'static str {
        match self {
            UserPublicKey::Ed25519(_) => "Ed25519",
            UserPublicKey::EcdsaP256(_) => "ECDSA P-256",
            UserPublicKey::EcdsaSecp256k1(_) => "ECDSA secp256k1",
        }
    }

    /// Verifies `signature` over `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        if signature.len() != SIGNATURE_LENGTH {
            return Err(SignatureError::MalformedSignature(format!(
                "{} signatures are {SIGNATURE_LENGTH} bytes, got {}",
                self.scheme(),
                signature.len()
            )));
        }
        let invalid = SignatureError::Invalid {
            scheme: self.scheme(),
        };
        match self {
            UserPublicKey::Ed25519(key) => key
                .verify_signature(message, signature)
                .map_err(|_| invalid),
            UserPublicKey::EcdsaP256(key) => {
                let signature = p256::ecdsa::Signature::from_slice(signature).map_err(|_| {
                    SignatureError::MalformedSignature("r or s is zero or out of range".into())
                })?;
                // The IC accepts both high and low s; the curve crates want low s.
                let signature = signature.normalize_s().unwrap_or(signature);
                key.verify(message, &signature).map_err(|_| invalid)
            }
            UserPublicKey::EcdsaSecp256k1(key) => {
                let signature = k256::ecdsa::Signature::from_slice(signature).map_err(|_| {
                    SignatureError::MalformedSignature("r or s is zero or out of range".into())
                })?;
                let signature = signature.normalize_s().unwrap_or(signature);
                key.verify(message, &signature).map_err(|_| invalid)
            }
        }
    }
}

/// Verifies a user's `signature` over `message` with the DER public key `public_key_der`.
pub fn verify_user_signature(
    public_key_der: &[u8],
    message: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    UserPublicKey::from_der(public_key_der)?.verify(message, signature)
}

/// Test helpers: user keys in each supported scheme, signing the way ic-agent's identities do.
#[cfg(test)]
pub(crate) mod test_keys {
    use super::*;
    use k256::ecdsa::signature::Signer as _;

    /// A signing key in one of the supported schemes.
    pub(crate) enum TestKey {
        Ed25519(ic_ed25519::PrivateKey),
        P256(p256::ecdsa::SigningKey),
        Secp256k1(k256::ecdsa::SigningKey),
    }

    impl TestKey {
        pub(crate) fn all(seed: u8) -> Vec<TestKey> {
            vec![
                TestKey::Ed25519(ic_ed25519::PrivateKey::generate_from_seed(&[seed; 32])),
                TestKey::P256(p256::ecdsa::SigningKey::from_slice(&[seed.max(1); 32]).unwrap()),
                TestKey::Secp256k1(
                    k256::ecdsa::SigningKey::from_slice(&[seed.max(1); 32]).unwrap(),
                ),
            ]
        }

        pub(crate) fn der(&self) -> Vec<u8> {
            match self {
                TestKey::Ed25519(key) => key.public_key().serialize_rfc8410_der(),
                TestKey::P256(key) => {
                    let mut der = ECDSA_P256_DER_PREFIX.to_vec();
                    der.extend_from_slice(key.verifying_key().to_encoded_point(false).as_bytes());
                    der
                }
                TestKey::Secp256k1(key) => {
                    let mut der = ECDSA_SECP256K1_DER_PREFIX.to_vec();
                    der.extend_from_slice(key.verifying_key().to_encoded_point(false).as_bytes());
                    der
                }
            }
        }

        pub(crate) fn sign(&self, message: &[u8]) -> Vec<u8> {
            match self {
                TestKey::Ed25519(key) => key.sign_message(message).to_vec(),
                TestKey::P256(key) => {
                    let signature: p256::ecdsa::Signature = key.sign(message);
                    signature.to_bytes().to_vec()
                }
                TestKey::Secp256k1(key) => {
                    let signature: k256::ecdsa::Signature = key.sign(message);
                    signature.to_bytes().to_vec()
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::test_keys::TestKey;
    use super::*;

    #[test]
    fn real_signatures_verify_in_every_scheme() {
        for key in TestKey::all(3) {
            let der = key.der();
            let signature = key.sign(b"\x0Aic-requestmessage");
            assert_eq!(
                verify_user_signature(&der, b"\x0Aic-requestmessage", &signature),
                Ok(())
            );
            assert!(matches!(
                verify_user_signature(&der, b"\x0Aic-requestother", &signature),
                Err(SignatureError::Invalid { .. })
            ));
            let mut flipped = signature.clone();
            flipped[10] ^= 1;
            assert!(verify_user_signature(&der, b"\x0Aic-requestmessage", &flipped).is_err());
            assert!(matches!(
                verify_user_signature(&der, b"x", &signature[..63]),
                Err(SignatureError::MalformedSignature(_))
            ));
        }
    }

    #[test]
    fn high_s_is_accepted_for_ecdsa() {
        for key in TestKey::all(9) {
            let high = match &key {
                TestKey::Ed25519(_) => continue,
                TestKey::P256(_) => {
                    let low = p256::ecdsa::Signature::from_slice(&key.sign(b"m")).unwrap();
                    let (r, s) = low.split_scalars();
                    p256::ecdsa::Signature::from_scalars(r, -*s)
                        .unwrap()
                        .to_bytes()
                        .to_vec()
                }
                TestKey::Secp256k1(_) => {
                    let low = k256::ecdsa::Signature::from_slice(&key.sign(b"m")).unwrap();
                    let (r, s) = low.split_scalars();
                    k256::ecdsa::Signature::from_scalars(r, -*s)
                        .unwrap()
                        .to_bytes()
                        .to_vec()
                }
            };
            assert_eq!(verify_user_signature(&key.der(), b"m", &high), Ok(()));
        }
    }

    #[test]
    fn unknown_and_unsupported_keys_are_refused_clearly() {
        let canister_sig_der =
            hex::decode("301f300c060a2b0601040183b8430102030f000a000000000000000701010000")
                .unwrap();
        assert_eq!(
            verify_user_signature(&canister_sig_der, b"m", &[0; 64]),
            Err(SignatureError::UnsupportedScheme("canister signatures"))
        );
        let webauthn_der = hex::decode("305e300c060a2b0601040183b8430101034e00a501020326").unwrap();
        assert_eq!(
            verify_user_signature(&webauthn_der, b"m", &[0; 64]),
            Err(SignatureError::UnsupportedScheme("WebAuthn (COSE) keys"))
        );
        assert!(matches!(
            verify_user_signature(&[1, 2, 3], b"m", &[0; 64]),
            Err(SignatureError::MalformedPublicKey(_))
        ));
        let mut bad_point = ECDSA_P256_DER_PREFIX.to_vec();
        bad_point.extend_from_slice(&[4; 65]);
        assert!(matches!(
            verify_user_signature(&bad_point, b"m", &[0; 64]),
            Err(SignatureError::MalformedPublicKey(_))
        ));
    }
}
