//! The chain-key methods: `ecdsa_public_key`, `sign_with_ecdsa`, `schnorr_public_key`,
//! `sign_with_schnorr`, `vetkd_public_key` and `vetkd_derive_key` (canisters only).
//!
//! Keys, fees and derivation come from [`openic_types::chain_keys`] and
//! [`openic_crypto::chain_keys`]; the `ic0.cost_*` functions read the same key list, so a key
//! is known to both or to neither, and a method charges exactly what the cost function reported.
//! Refusals follow the Internet Computer: a malformed argument or an unknown key is refused as
//! routing fails there (reject code 3, "Unable to route management canister request ..."), too
//! few cycles or a bad aux or transport key by the method (reject code 4). The public-key methods
//! are free; the others keep their fee, which is burned, and refund the rest.

use super::{Context, Handled, args};
use ic_management_canister_types as mct;
use openic_crypto::chain_keys as crypto;
use openic_replicated_state::ReplicatedState;
use openic_types::chain_keys::{ChainKeyAlgorithm, ChainKeyId};
use openic_types::{Cycles, ErrorCode, RejectCode, UserError};
use sha2::{Digest as _, Sha256};

/// Domain separator of the randomness `vetkd_derive_key` encrypts with.
const VETKD_RANDOMNESS_DOMAIN: &[u8] = b"openic-vetkd-derive-key-randomness";

/// A refusal where the IC's routing refuses: reject code 3.
fn unroutable(method: &str, reason: impl std::fmt::Display) -> UserError {
    UserError {
        code: RejectCode::DestinationInvalid,
        message: format!("Unable to route management canister request {method}: {reason}"),
        error_code: None,
    }
}

/// A refusal by the method itself: reject code 4 (IC0406).
fn rejected(message: impl Into<String>) -> UserError {
    UserError::new(ErrorCode::CanisterRejectedMessage, message)
}

fn decode<'a, T>(context: &Context<'a>) -> Result<T, UserError>
where
    T: serde::Deserialize<'a> + candid::CandidType,
{
    args::decode(context.method, context.payload).map_err(|error| {
        unroutable(
            context.method,
            format!("Error decoding candid: {}", error.message),
        )
    })
}

fn check_path(method: &str, path: &[Vec<u8>]) -> Result<(), UserError> {
    // The IC's argument type holds at most 255 elements; the caller then takes one more.
    if path.len() > crypto::MAX_DERIVATION_PATH_LEN {
        return Err(unroutable(
            method,
            format!(
                "Error decoding candid: The number of elements exceeds maximum allowed {}",
                crypto::MAX_DERIVATION_PATH_LEN
            ),
        ));
    }
    Ok(())
}

/// The key, if the subnet holds it; otherwise the IC's refusal listing the keys it has.
fn known_key(method: &str, key: ChainKeyId, signing: bool) -> Result<ChainKeyId, UserError> {
    if key.is_known() {
        return Ok(key);
    }
    let existing = ChainKeyId::all()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    let reason = if signing {
        format!(
            "ChainKeyError(\"Requested unknown or disabled threshold key: {key}, existing enabled keys: [{existing}]\")"
        )
    } else {
        format!(
            "ChainKeyError(\"Requested unknown threshold key: {key}, existing keys: [{existing}]\")"
        )
    };
    Err(unroutable(method, reason))
}

/// `n` with `_` between groups of three digits, as the IC prints cycles in this message.
fn with_underscores(n: u128) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push('_');
        }
        out.push(c);
    }
    out
}

/// The fee of one use of `key`, if the call attached enough cycles for it.
fn charge(context: &Context<'_>, key: &ChainKeyId) -> Result<Cycles, UserError> {
    let fee = key.fee().unwrap_or(Cycles::ZERO);
    if context.cycles < fee {
        return Err(rejected(format!(
            "{} request sent with {} cycles, but {} cycles are required.",
            context.method,
            with_underscores(context.cycles.0),
            with_underscores(fee.0)
        )));
    }
    Ok(fee)
}

/// Records a kept fee as burned and answers with `reply`, refunding the rest of the payment.
fn reply_burning(
    state: &mut ReplicatedState,
    reply: Vec<u8>,
    fee: Cycles,
) -> Result<Handled, UserError> {
    state.metadata.burn_cycles(fee);
    Ok(Handled::reply_keeping(reply, fee))
}

fn key_error(error: crypto::ChainKeyError) -> UserError {
    rejected(error.to_string())
}

fn ecdsa_key(key_id: &mct::EcdsaKeyId) -> ChainKeyId {
    ChainKeyId {
        algorithm: match key_id.curve {
            mct::EcdsaCurve::Secp256k1 => ChainKeyAlgorithm::EcdsaSecp256k1,
        },
        name: key_id.name.clone(),
    }
}

fn schnorr_key(key_id: &mct::SchnorrKeyId) -> ChainKeyId {
    ChainKeyId {
        algorithm: match key_id.algorithm {
            mct::SchnorrAlgorithm::Bip340secp256k1 => ChainKeyAlgorithm::SchnorrBip340Secp256k1,
            mct::SchnorrAlgorithm::Ed25519 => ChainKeyAlgorithm::SchnorrEd25519,
        },
        name: key_id.name.clone(),
    }
}

fn vetkd_key(key_id: &mct::VetKDKeyId) -> ChainKeyId {
    ChainKeyId {
        algorithm: match key_id.curve {
            mct::VetKDCurve::Bls12_381_G2 => ChainKeyAlgorithm::VetKdBls12381G2,
        },
        name: key_id.name.clone(),
    }
}

/// `ecdsa_public_key` and `schnorr_public_key`: the key of `canister_id` (the caller if absent).
pub(super) fn public_key(context: &Context<'_>, schnorr: bool) -> Result<Handled, UserError> {
    let (canister, path, key) = if schnorr {
        let args: mct::SchnorrPublicKeyArgs = decode(context)?;
        (
            args.canister_id,
            args.derivation_path,
            schnorr_key(&args.key_id),
        )
    } else {
        let args: mct::EcdsaPublicKeyArgs = decode(context)?;
        (
            args.canister_id,
            args.derivation_path,
            ecdsa_key(&args.key_id),
        )
    };
    check_path(context.method, &path)?;
    let key = known_key(context.method, key, false)?;
    let canister = canister.unwrap_or_else(|| context.caller.principal());
    let derived = crypto::public_key(key.algorithm, &key.name, canister.as_slice(), &path)
        .map_err(key_error)?;
    let reply = mct::EcdsaPublicKeyResult {
        public_key: derived.public_key,
        chain_code: derived.chain_code,
    };
    // `schnorr_public_key_result` has the same fields.
    args::encode(&reply).map(Handled::reply)
}

/// `sign_with_ecdsa`.
pub(super) fn sign_with_ecdsa(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::SignWithEcdsaArgs = decode(context)?;
    let Ok(message_hash) = <[u8; 32]>::try_from(args.message_hash.as_slice()) else {
        return Err(unroutable(
            context.method,
            format!(
                "Error decoding candid: message_hash must be 32 bytes, got {}",
                args.message_hash.len()
            ),
        ));
    };
    check_path(context.method, &args.derivation_path)?;
    let key = known_key(context.method, ecdsa_key(&args.key_id), true)?;
    let fee = charge(context, &key)?;
    let caller = context.caller.principal();
    let signature = crypto::sign_with_ecdsa(
        &key.name,
        caller.as_slice(),
        &args.derivation_path,
        &message_hash,
    )
    .map_err(key_error)?;
    let reply = args::encode(&mct::SignWithEcdsaResult {
        signature: signature.to_vec(),
    })?;
    reply_burning(state, reply, fee)
}

/// `sign_with_schnorr`.
pub(super) fn sign_with_schnorr(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::SignWithSchnorrArgs = decode(context)?;
    check_path(context.method, &args.derivation_path)?;
    let key = known_key(context.method, schnorr_key(&args.key_id), true)?;
    let fee = charge(context, &key)?;
    let merkle_root = args.aux.as_ref().map(|aux| match aux {
        mct::SchnorrAux::Bip341(bip341) => bip341.merkle_root_hash.as_slice(),
    });
    let caller = context.caller.principal();
    let signature = crypto::sign_with_schnorr(
        key.algorithm,
        &key.name,
        caller.as_slice(),
        &args.derivation_path,
        &args.message,
        merkle_root,
    )
    .map_err(key_error)?;
    let reply = args::encode(&mct::SignWithSchnorrResult {
        signature: signature.to_vec(),
    })?;
    reply_burning(state, reply, fee)
}

/// `vetkd_public_key`: the key of `canister_id` (the caller if absent) for `context`.
pub(super) fn vetkd_public_key(context: &Context<'_>) -> Result<Handled, UserError> {
    let args: mct::VetKDPublicKeyArgs = decode(context)?;
    let key = known_key(context.method, vetkd_key(&args.key_id), false)?;
    let canister = args
        .canister_id
        .unwrap_or_else(|| context.caller.principal());
    let public_key = crypto::vetkd_public_key(&key.name, canister.as_slice(), &args.context);
    args::encode(&mct::VetKDPublicKeyResult {
        public_key: public_key.to_vec(),
    })
    .map(Handled::reply)
}

/// `vetkd_derive_key`: the caller's vetKey for `context` and `input`, encrypted to the transport
/// key with randomness every replica derives alike from the state's seed and the request.
pub(super) fn vetkd_derive_key(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::VetKDDeriveKeyArgs = decode(context)?;
    if args.transport_public_key.len() != crypto::TRANSPORT_PUBLIC_KEY_LEN {
        return Err(unroutable(
            context.method,
            format!(
                "Error decoding candid: transport_public_key must be {} bytes, got {}",
                crypto::TRANSPORT_PUBLIC_KEY_LEN,
                args.transport_public_key.len()
            ),
        ));
    }
    let key = known_key(context.method, vetkd_key(&args.key_id), true)?;
    let fee = charge(context, &key)?;
    let caller = context.caller.principal();
    let randomness: [u8; 32] = Sha256::new()
        .chain_update(VETKD_RANDOMNESS_DOMAIN)
        .chain_update(state.metadata.random_seed)
        .chain_update(state.metadata.height.0.to_be_bytes())
        .chain_update(context.payload)
        .finalize()
        .into();
    let encrypted_key = crypto::vetkd_derive_key(
        &key.name,
        caller.as_slice(),
        &args.context,
        &args.input,
        &args.transport_public_key,
        &randomness,
    )
    .map_err(key_error)?;
    let reply = args::encode(&mct::VetKDDeriveKeyResult {
        encrypted_key: encrypted_key.to_vec(),
    })?;
    reply_burning(state, reply, fee)
}

#[cfg(test)]
mod tests {
    use super::super::test_utils::{Harness, user};
    use super::super::{ManagementCaller, ManagementOutcome};
    use super::with_underscores;
    use candid::{Decode, Encode};
    use ic_management_canister_types as mct;
    use openic_types::chain_keys::{KEY_1_FEE, TEST_KEY_FEE};
    use openic_types::{Cycles, RejectCode};

    fn ecdsa_key(name: &str) -> mct::EcdsaKeyId {
        mct::EcdsaKeyId {
            curve: mct::EcdsaCurve::Secp256k1,
            name: name.to_string(),
        }
    }

    #[test]
    fn sign_with_ecdsa_signs_under_the_public_key_and_burns_exactly_the_fee() {
        let mut h = Harness::new();
        let canister = h.create_canister(user(1));
        let caller = ManagementCaller::Canister(canister);
        let path = vec![b"a".to_vec()];
        let public_key = Decode!(
            &h.reply(
                caller,
                "ecdsa_public_key",
                &Encode!(&mct::EcdsaPublicKeyArgs {
                    canister_id: None,
                    derivation_path: path.clone(),
                    key_id: ecdsa_key("key_1"),
                })
                .unwrap()
            ),
            mct::EcdsaPublicKeyResult
        )
        .unwrap();
        let args = Encode!(&mct::SignWithEcdsaArgs {
            message_hash: vec![5; 32],
            derivation_path: path,
            key_id: ecdsa_key("key_1"),
        })
        .unwrap();
        let burned_before = h.state.metadata.consumed_cycles_total;
        let attached = Cycles(KEY_1_FEE.0 + 1_000);
        let (outcome, refund) = h.call_with_cycles(caller, "sign_with_ecdsa", &args, attached);
        let ManagementOutcome::Reply(reply) = outcome else {
            panic!("sign_with_ecdsa did not reply: {outcome:?}");
        };
        assert_eq!(refund, Cycles(1_000));
        assert_eq!(
            h.state.metadata.consumed_cycles_total - burned_before,
            KEY_1_FEE.0
        );
        let signature = Decode!(&reply, mct::SignWithEcdsaResult).unwrap().signature;
        let key = ic_secp256k1::PublicKey::deserialize_sec1(&public_key.public_key).unwrap();
        assert!(key.verify_ecdsa_signature_prehashed(&[5; 32], &signature));

        // One cycle short: refused by the method, everything refunded, nothing burned.
        let short = Cycles(KEY_1_FEE.0 - 1);
        let (outcome, refund) = h.call_with_cycles(caller, "sign_with_ecdsa", &args, short);
        let ManagementOutcome::Reject(error) = outcome else {
            panic!("expected a rejection, got {outcome:?}");
        };
        assert_eq!(error.code, RejectCode::CanisterReject);
        assert_eq!(
            error.message,
            "sign_with_ecdsa request sent with 26_153_846_152 cycles, but 26_153_846_153 cycles are required."
        );
        assert_eq!(refund, short);
        assert_eq!(
            h.state.metadata.consumed_cycles_total - burned_before,
            KEY_1_FEE.0
        );
    }

    #[test]
    fn unknown_keys_and_malformed_arguments_are_refused_as_the_ic_routes_them() {
        let mut h = Harness::new();
        let canister = h.create_canister(user(1));
        let caller = ManagementCaller::Canister(canister);
        let args = Encode!(&mct::SignWithEcdsaArgs {
            message_hash: vec![5; 32],
            derivation_path: vec![],
            key_id: ecdsa_key("no_such_key"),
        })
        .unwrap();
        let (outcome, refund) = h.call_with_cycles(caller, "sign_with_ecdsa", &args, TEST_KEY_FEE);
        let ManagementOutcome::Reject(error) = outcome else {
            panic!("expected a rejection, got {outcome:?}");
        };
        assert_eq!(error.code, RejectCode::DestinationInvalid);
        assert!(
            error.message.starts_with(
                "Unable to route management canister request sign_with_ecdsa: ChainKeyError(\"Requested unknown or disabled threshold key: ecdsa:Secp256k1:no_such_key, existing enabled keys: [ecdsa:Secp256k1:dfx_test_key, "
            ),
            "{}",
            error.message
        );
        assert_eq!(refund, TEST_KEY_FEE);

        let short_hash = Encode!(&mct::SignWithEcdsaArgs {
            message_hash: vec![5; 31],
            derivation_path: vec![],
            key_id: ecdsa_key("test_key_1"),
        })
        .unwrap();
        let (outcome, _) = h.call_with_cycles(caller, "sign_with_ecdsa", &short_hash, TEST_KEY_FEE);
        assert!(
            matches!(outcome, ManagementOutcome::Reject(ref e) if e.code == RejectCode::DestinationInvalid && e.message.contains("32 bytes")),
            "{outcome:?}"
        );

        let bad_transport = Encode!(&mct::VetKDDeriveKeyArgs {
            input: vec![],
            context: vec![],
            transport_public_key: vec![1; 48],
            key_id: mct::VetKDKeyId {
                curve: mct::VetKDCurve::Bls12_381_G2,
                name: "dfx_test_key".to_string(),
            },
        })
        .unwrap();
        let (outcome, refund) =
            h.call_with_cycles(caller, "vetkd_derive_key", &bad_transport, TEST_KEY_FEE);
        assert!(
            matches!(outcome, ManagementOutcome::Reject(ref e) if e.code == RejectCode::CanisterReject && e.message == "The provided transport public key is invalid."),
            "{outcome:?}"
        );
        assert_eq!(refund, TEST_KEY_FEE);

        // Users cannot call these methods.
        let error = h.reject(ManagementCaller::User(user(1)), "ecdsa_public_key", &args);
        assert_eq!(error.code, RejectCode::CanisterReject);
    }

    #[test]
    fn cycles_print_with_underscores() {
        assert_eq!(with_underscores(0), "0");
        assert_eq!(with_underscores(999), "999");
        assert_eq!(with_underscores(1_000), "1_000");
        assert_eq!(with_underscores(10_000_000_000), "10_000_000_000");
        assert_eq!(with_underscores(26_153_846_153), "26_153_846_153");
    }
}
