//! Authentication of a request envelope (interface spec "Authentication"): who sent it and whether
//! the signature, the delegations and the sender principal agree.
//!
//! - Anonymous sender (`0x04`): no `sender_pubkey`, `sender_sig` or `sender_delegation` at all.
//! - Otherwise `sender == self_authenticating(sender_pubkey)`, and `sender_sig` signs
//!   `"\x0Aic-request" · request_id` with the last delegation's key (or `sender_pubkey`).

use crate::delegation::{
    DelegatedPermissions, DelegationError, VerifiedDelegations, verify_delegation_chain,
};
use crate::self_authenticating_principal;
use crate::signatures::{SignatureError, verify_user_signature};
use candid::Principal;
use openic_types::{RequestId, Time};
use serde_cbor::Value;

/// Domain separator of request signatures.
pub const REQUEST_DOMAIN_SEPARATOR: &[u8] = b"\x0Aic-request";

/// The authentication fields of an envelope, as received.
#[derive(Clone, Copy, Debug)]
pub struct EnvelopeAuthentication<'a> {
    /// `content.sender`.
    pub sender: Principal,
    /// `sender_pubkey` (DER), if present.
    pub sender_pubkey: Option<&'a [u8]>,
    /// `sender_sig`, if present.
    pub sender_sig: Option<&'a [u8]>,
    /// `sender_delegation` (decoded CBOR), if present.
    pub sender_delegation: Option<&'a Value>,
}

/// Why an envelope's authentication was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthenticationError {
    /// The anonymous sender sent a key, signature or delegation.
    #[error(
        "the anonymous sender (2vxsx-fae) must not send sender_pubkey, sender_sig or sender_delegation"
    )]
    AnonymousWithCredentials,
    /// A non-anonymous sender without a key or signature.
    #[error(
        "sender {0} is not anonymous, so sender_pubkey and sender_sig are both required (and delegations need both too)"
    )]
    MissingCredentials(Principal),
    /// The sender is not the principal of the public key.
    #[error(
        "sender {sender} does not match the public key, whose self-authenticating principal is {derived}"
    )]
    SenderMismatch {
        /// `content.sender`.
        sender: Principal,
        /// `self_authenticating(sender_pubkey)`.
        derived: Principal,
    },
    /// The request signature does not verify.
    #[error("Invalid signature: {0}")]
    Signature(SignatureError),
    /// The delegation chain is invalid.
    #[error("Invalid delegation: {0}")]
    Delegation(DelegationError),
}

/// What an authenticated envelope may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Authenticated {
    /// The sender, now authenticated.
    pub sender: Principal,
    /// Restrictions from delegations (`None` for anonymous or undelegated senders: no restriction).
    pub delegations: Option<VerifiedDelegations>,
}

impl Authenticated {
    /// Whether the sender may target `canister_id`.
    pub fn allows_target(&self, canister_id: &Principal) -> bool {
        self.delegations
            .as_ref()
            .is_none_or(|d| d.allows_target(canister_id))
    }

    /// Whether the delegations allow update calls (not just queries and `read_state`).
    pub fn allows_updates(&self) -> bool {
        self.delegations
            .as_ref()
            .is_none_or(|d| d.permissions == DelegatedPermissions::All)
    }
}

/// Verifies the authentication of a request with id `request_id` at time `now`.
pub fn authenticate(
    auth: EnvelopeAuthentication<'_>,
    request_id: &RequestId,
    now: Time,
) -> Result<Authenticated, AuthenticationError> {
    if auth.sender == Principal::anonymous() {
        if auth.sender_pubkey.is_some()
            || auth.sender_sig.is_some()
            || auth.sender_delegation.is_some()
        {
            return Err(AuthenticationError::AnonymousWithCredentials);
        }
        return Ok(Authenticated {
            sender: auth.sender,
            delegations: None,
        });
    }
    let (Some(pubkey), Some(signature)) = (auth.sender_pubkey, auth.sender_sig) else {
        return Err(AuthenticationError::MissingCredentials(auth.sender));
    };
    let derived = self_authenticating_principal(pubkey);
    if derived != auth.sender {
        return Err(AuthenticationError::SenderMismatch {
            sender: auth.sender,
            derived,
        });
    }
    let delegations = match auth.sender_delegation {
        Some(chain) => Some(
            verify_delegation_chain(pubkey, chain, now).map_err(AuthenticationError::Delegation)?,
        ),
        None => None,
    };
    let signing_key = delegations
        .as_ref()
        .map_or(pubkey, |d| d.signing_key_der.as_slice());
    let mut message = REQUEST_DOMAIN_SEPARATOR.to_vec();
    message.extend_from_slice(request_id.as_bytes());
    verify_user_signature(signing_key, &message, signature)
        .map_err(AuthenticationError::Signature)?;
    Ok(Authenticated {
        sender: auth.sender,
        delegations,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::delegation::tests::signed_delegation;
    use crate::signatures::test_keys::TestKey;

    const NOW: Time = Time(1_700_000_000_000_000_000);
    const RID: RequestId = RequestId([0x5a; 32]);

    fn request_message() -> Vec<u8> {
        let mut message = REQUEST_DOMAIN_SEPARATOR.to_vec();
        message.extend_from_slice(&RID.0);
        message
    }

    #[test]
    fn anonymous_needs_no_signature_and_may_not_send_one() {
        let auth = EnvelopeAuthentication {
            sender: Principal::anonymous(),
            sender_pubkey: None,
            sender_sig: None,
            sender_delegation: None,
        };
        assert!(authenticate(auth, &RID, NOW).is_ok());
        let with_sig = EnvelopeAuthentication {
            sender_sig: Some(&[0; 64]),
            ..auth
        };
        assert_eq!(
            authenticate(with_sig, &RID, NOW),
            Err(AuthenticationError::AnonymousWithCredentials)
        );
    }

    #[test]
    fn signed_requests_in_every_scheme() {
        for key in TestKey::all(11) {
            let der = key.der();
            let signature = key.sign(&request_message());
            let sender = self_authenticating_principal(&der);
            let auth = EnvelopeAuthentication {
                sender,
                sender_pubkey: Some(&der),
                sender_sig: Some(&signature),
                sender_delegation: None,
            };
            let authenticated = authenticate(auth, &RID, NOW).unwrap();
            assert!(authenticated.allows_updates());
            assert!(matches!(
                authenticate(auth, &RequestId([0; 32]), NOW),
                Err(AuthenticationError::Signature(_))
            ));
            let wrong_sender = EnvelopeAuthentication {
                sender: Principal::from_slice(&[1; 29]),
                ..auth
            };
            assert!(matches!(
                authenticate(wrong_sender, &RID, NOW),
                Err(AuthenticationError::SenderMismatch { .. })
            ));
            let no_sig = EnvelopeAuthentication {
                sender_sig: None,
                ..auth
            };
            assert_eq!(
                authenticate(no_sig, &RID, NOW),
                Err(AuthenticationError::MissingCredentials(sender))
            );
        }
    }

    #[test]
    fn delegated_request_is_signed_by_the_last_key() {
        let keys = TestKey::all(12);
        let target = Principal::from_slice(&[4; 10]);
        let chain = Value::Array(vec![signed_delegation(
            &keys[0],
            &keys[2].der(),
            NOW.0 + 10,
            Some(vec![target]),
            Some("queries"),
        )]);
        let root_der = keys[0].der();
        let by_delegate = keys[2].sign(&request_message());
        let auth = EnvelopeAuthentication {
            sender: self_authenticating_principal(&root_der),
            sender_pubkey: Some(&root_der),
            sender_sig: Some(&by_delegate),
            sender_delegation: Some(&chain),
        };
        let authenticated = authenticate(auth, &RID, NOW).unwrap();
        assert!(authenticated.allows_target(&target));
        assert!(!authenticated.allows_target(&Principal::from_slice(&[5; 10])));
        assert!(!authenticated.allows_updates());
        let by_root = keys[0].sign(&request_message());
        let signed_by_root = EnvelopeAuthentication {
            sender_sig: Some(&by_root),
            ..auth
        };
        assert!(matches!(
            authenticate(signed_by_root, &RID, NOW),
            Err(AuthenticationError::Signature(_))
        ));
    }
}
