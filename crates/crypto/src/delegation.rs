//! Verification of a `sender_delegation` chain (interface spec "Authentication").
//!
//! Delegation *i* is signed by the previous key (the first by `sender_pubkey`) over
//! `"\x1Aic-request-auth-delegation" · hash_of_map(delegation)`, where the delegation map is hashed
//! exactly as received (so optional fields such as `permissions` are covered without this module
//! knowing them). The last delegation's key signs the request.

use crate::request_id::{HashError, hash_of_map};
use crate::signatures::{SignatureError, verify_user_signature};
use candid::Principal;
use openic_types::Time;
use serde_cbor::Value;
use std::collections::{BTreeMap, BTreeSet};

/// Most delegations in one chain.
pub const MAX_DELEGATIONS: usize = 20;

/// Most principals in one delegation's `targets`.
pub const MAX_DELEGATION_TARGETS: usize = 1000;

/// Domain separator of delegation signatures.
pub const DELEGATION_DOMAIN_SEPARATOR: &[u8] = b"\x1Aic-request-auth-delegation";

/// Why a delegation chain was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DelegationError {
    /// The chain is not an array of `{delegation, signature}` maps of the right shape.
    #[error("malformed sender_delegation: {0}")]
    Malformed(String),
    /// More than [`MAX_DELEGATIONS`] delegations.
    #[error("the delegation chain has {0} delegations; at most {MAX_DELEGATIONS} are allowed")]
    TooLong(usize),
    /// A `targets` list longer than [`MAX_DELEGATION_TARGETS`].
    #[error(
        "delegation {index} lists {count} targets; at most {MAX_DELEGATION_TARGETS} are allowed"
    )]
    TooManyTargets {
        /// Position in the chain.
        index: usize,
        /// Number of targets.
        count: usize,
    },
    /// The delegation has expired.
    #[error(
        "delegation {index} expired at {expiration} ns (now is {now} ns); sign in again to get a fresh delegation"
    )]
    Expired {
        /// Position in the chain.
        index: usize,
        /// Its expiration.
        expiration: u64,
        /// The current time.
        now: u64,
    },
    /// A key appears twice in the chain (including delegating to itself).
    #[error("delegation {index} delegates to a key that already appears earlier in the chain")]
    RepeatedKey {
        /// Position in the chain.
        index: usize,
    },
    /// The delegation's signature does not verify with the previous key.
    #[error("the signature on delegation {index} is invalid: {source}")]
    BadSignature {
        /// Position in the chain.
        index: usize,
        /// Why.
        source: SignatureError,
    },
    /// The delegation map cannot be hashed.
    #[error("delegation {index} cannot be hashed: {source}")]
    Hash {
        /// Position in the chain.
        index: usize,
        /// Why.
        source: HashError,
    },
}

/// Which request kinds a delegation chain allows (the optional `permissions` field).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DelegatedPermissions {
    /// Every request kind.
    All,
    /// Only queries and `read_state`.
    QueriesOnly,
}

/// The result of verifying a delegation chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedDelegations {
    /// The DER key that must sign the request: the last delegation's key, or `sender_pubkey`.
    pub signing_key_der: Vec<u8>,
    /// The canisters the request may target (the intersection of every `targets` list), or `None`
    /// if no delegation restricts targets.
    pub targets: Option<BTreeSet<Principal>>,
    /// Which request kinds the chain allows.
    pub permissions: DelegatedPermissions,
}

impl VerifiedDelegations {
    /// Whether a request to `canister_id` is allowed by the targets restriction.
    pub fn allows_target(&self, canister_id: &Principal) -> bool {
        self.targets
            .as_ref()
            .is_none_or(|targets| targets.contains(canister_id))
    }
}

fn field<'a>(map: &'a BTreeMap<Value, Value>, name: &str) -> Option<&'a Value> {
    map.get(&Value::Text(name.to_string()))
}

fn bytes_field<'a>(
    map: &'a BTreeMap<Value, Value>,
    name: &str,
    index: usize,
) -> Result<&'a [u8], DelegationError> {
    match field(map, name) {
        Some(Value::Bytes(bytes)) => Ok(bytes),
        Some(_) => Err(DelegationError::Malformed(format!(
            "delegation {index}: `{name}` must be a byte string"
        ))),
        None => Err(DelegationError::Malformed(format!(
            "delegation {index}: `{name}` is missing"
        ))),
    }
}

/// Verifies the chain `delegations` (the decoded `sender_delegation` value) starting from
/// `sender_pubkey_der`, at time `now`.
pub fn verify_delegation_chain(
    sender_pubkey_der: &[u8],
    delegations: &Value,
    now: Time,
) -> Result<VerifiedDelegations, DelegationError> {
    let Value::Array(chain) = delegations else {
        return Err(DelegationError::Malformed(
            "sender_delegation must be an array".into(),
        ));
    };
    if chain.len() > MAX_DELEGATIONS {
        return Err(DelegationError::TooLong(chain.len()));
    }
    let mut seen_keys: BTreeSet<&[u8]> = BTreeSet::new();
    seen_keys.insert(sender_pubkey_der);
    let mut current_key: &[u8] = sender_pubkey_der;
    let mut targets: Option<BTreeSet<Principal>> = None;
    let mut permissions = DelegatedPermissions::All;

    for (index, signed) in chain.iter().enumerate() {
        let Value::Map(signed) = signed else {
            return Err(DelegationError::Malformed(format!(
                "delegation {index} must be a map {{delegation, signature}}"
            )));
        };
        let signature = bytes_field(signed, "signature", index)?;
        let Some(Value::Map(delegation)) = field(signed, "delegation") else {
            return Err(DelegationError::Malformed(format!(
                "delegation {index}: `delegation` must be a map"
            )));
        };
        let pubkey = bytes_field(delegation, "pubkey", index)?;
        let expiration = match field(delegation, "expiration") {
            Some(Value::Integer(n)) => u64::try_from(*n).map_err(|_| {
                DelegationError::Malformed(format!(
                    "delegation {index}: `expiration` must be a nat below 2^64"
                ))
            })?,
            _ => {
                return Err(DelegationError::Malformed(format!(
                    "delegation {index}: `expiration` must be a nat (ns since the epoch)"
                )));
            }
        };
        match field(delegation, "targets") {
            None => {}
            Some(Value::Array(list)) => {
                if list.len() > MAX_DELEGATION_TARGETS {
                    return Err(DelegationError::TooManyTargets {
                        index,
                        count: list.len(),
                    });
                }
                let mut these = BTreeSet::new();
                for target in list {
                    match target {
                        Value::Bytes(bytes) if bytes.len() <= 29 => {
                            these.insert(Principal::from_slice(bytes));
                        }
                        _ => {
                            return Err(DelegationError::Malformed(format!(
                                "delegation {index}: every target must be a principal (≤29 bytes)"
                            )));
                        }
                    }
                }
                targets = Some(match targets {
                    None => these,
                    Some(previous) => previous.intersection(&these).copied().collect(),
                });
            }
            Some(_) => {
                return Err(DelegationError::Malformed(format!(
                    "delegation {index}: `targets` must be an array of principals"
                )));
            }
        }
        match field(delegation, "permissions") {
            None => {}
            Some(Value::Text(text)) if text == "all" => {}
            Some(Value::Text(text)) if text == "queries" => {
                permissions = DelegatedPermissions::QueriesOnly;
            }
            Some(other) => {
                return Err(DelegationError::Malformed(format!(
                    "delegation {index}: `permissions` must be \"all\" or \"queries\", got {other:?}"
                )));
            }
        }

        let hash =
            hash_of_map(delegation).map_err(|source| DelegationError::Hash { index, source })?;
        let mut message = DELEGATION_DOMAIN_SEPARATOR.to_vec();
        message.extend_from_slice(&hash);
        verify_user_signature(current_key, &message, signature)
            .map_err(|source| DelegationError::BadSignature { index, source })?;

        if expiration < now.as_nanos_since_unix_epoch() {
            return Err(DelegationError::Expired {
                index,
                expiration,
                now: now.as_nanos_since_unix_epoch(),
            });
        }
        if !seen_keys.insert(pubkey) {
            return Err(DelegationError::RepeatedKey { index });
        }
        current_key = pubkey;
    }
    Ok(VerifiedDelegations {
        signing_key_der: current_key.to_vec(),
        targets,
        permissions,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::request_id::text_map;
    use crate::signatures::test_keys::TestKey;

    /// Builds a signed delegation from `signer` to `delegate`.
    pub(crate) fn signed_delegation(
        signer: &TestKey,
        delegate_der: &[u8],
        expiration: u64,
        targets: Option<Vec<Principal>>,
        permissions: Option<&str>,
    ) -> Value {
        let mut delegation = text_map([
            ("pubkey", Value::Bytes(delegate_der.to_vec())),
            ("expiration", Value::Integer(i128::from(expiration))),
        ]);
        if let Some(targets) = targets {
            delegation.insert(
                Value::Text("targets".into()),
                Value::Array(
                    targets
                        .iter()
                        .map(|p| Value::Bytes(p.as_slice().to_vec()))
                        .collect(),
                ),
            );
        }
        if let Some(permissions) = permissions {
            delegation.insert(
                Value::Text("permissions".into()),
                Value::Text(permissions.into()),
            );
        }
        let mut message = DELEGATION_DOMAIN_SEPARATOR.to_vec();
        message.extend_from_slice(&hash_of_map(&delegation).unwrap());
        Value::Map(text_map([
            ("delegation", Value::Map(delegation)),
            ("signature", Value::Bytes(signer.sign(&message))),
        ]))
    }

    const NOW: Time = Time(1_700_000_000_000_000_000);

    #[test]
    fn chain_of_two_in_mixed_schemes_verifies() {
        let mut keys = TestKey::all(5).into_iter();
        let (root, middle, last) = (
            keys.next().unwrap(),
            keys.next().unwrap(),
            keys.next().unwrap(),
        );
        let a = Principal::from_slice(&[1; 10]);
        let b = Principal::from_slice(&[2; 10]);
        let chain = Value::Array(vec![
            signed_delegation(&root, &middle.der(), NOW.0 + 1, Some(vec![a, b]), None),
            signed_delegation(&middle, &last.der(), NOW.0 + 1, Some(vec![b]), Some("all")),
        ]);
        let verified = verify_delegation_chain(&root.der(), &chain, NOW).unwrap();
        assert_eq!(verified.signing_key_der, last.der());
        assert_eq!(verified.targets, Some([b].into_iter().collect()));
        assert!(verified.allows_target(&b));
        assert!(!verified.allows_target(&a));
        assert_eq!(verified.permissions, DelegatedPermissions::All);
    }

    #[test]
    fn matches_ic_transport_types_signable() {
        let delegation = ic_transport_types::Delegation {
            pubkey: vec![9; 44],
            expiration: 123_456_789,
            targets: Some(vec![Principal::from_slice(&[3; 10])]),
            permissions: Some(ic_transport_types::DelegationPermissions::Queries),
        };
        let bytes = serde_cbor::to_vec(&delegation).unwrap();
        let Value::Map(map) = crate::request_id::decode_cbor_value(&bytes).unwrap() else {
            panic!("not a map")
        };
        let mut ours = DELEGATION_DOMAIN_SEPARATOR.to_vec();
        ours.extend_from_slice(&hash_of_map(&map).unwrap());
        assert_eq!(ours, delegation.signable());
    }

    #[test]
    fn queries_only_permission_is_reported() {
        let keys = TestKey::all(6);
        let chain = Value::Array(vec![signed_delegation(
            &keys[0],
            &keys[1].der(),
            NOW.0,
            None,
            Some("queries"),
        )]);
        let verified = verify_delegation_chain(&keys[0].der(), &chain, NOW).unwrap();
        assert_eq!(verified.permissions, DelegatedPermissions::QueriesOnly);
        assert_eq!(verified.targets, None);
    }

    #[test]
    fn refuses_expired_repeated_badly_signed_and_long_chains() {
        let keys = TestKey::all(7);
        let expired = Value::Array(vec![signed_delegation(
            &keys[0],
            &keys[1].der(),
            NOW.0 - 1,
            None,
            None,
        )]);
        assert!(matches!(
            verify_delegation_chain(&keys[0].der(), &expired, NOW),
            Err(DelegationError::Expired { index: 0, .. })
        ));
        let to_self = Value::Array(vec![signed_delegation(
            &keys[0],
            &keys[0].der(),
            NOW.0,
            None,
            None,
        )]);
        assert_eq!(
            verify_delegation_chain(&keys[0].der(), &to_self, NOW),
            Err(DelegationError::RepeatedKey { index: 0 })
        );
        let wrong_signer = Value::Array(vec![signed_delegation(
            &keys[2],
            &keys[1].der(),
            NOW.0,
            None,
            None,
        )]);
        assert!(matches!(
            verify_delegation_chain(&keys[0].der(), &wrong_signer, NOW),
            Err(DelegationError::BadSignature { index: 0, .. })
        ));
        let long = Value::Array(vec![Value::Null; MAX_DELEGATIONS + 1]);
        assert_eq!(
            verify_delegation_chain(&keys[0].der(), &long, NOW),
            Err(DelegationError::TooLong(MAX_DELEGATIONS + 1))
        );
        let not_array = Value::Text("x".into());
        assert!(matches!(
            verify_delegation_chain(&keys[0].der(), &not_array, NOW),
            Err(DelegationError::Malformed(_))
        ));
    }

    #[test]
    fn tampered_permissions_break_the_signature() {
        let keys = TestKey::all(8);
        let mut chain = signed_delegation(&keys[0], &keys[1].der(), NOW.0, None, Some("queries"));
        if let Value::Map(signed) = &mut chain
            && let Some(Value::Map(delegation)) = signed.get_mut(&Value::Text("delegation".into()))
        {
            delegation.insert(Value::Text("permissions".into()), Value::Text("all".into()));
        }
        assert!(matches!(
            verify_delegation_chain(&keys[0].der(), &Value::Array(vec![chain]), NOW),
            Err(DelegationError::BadSignature { .. })
        ));
    }
}
