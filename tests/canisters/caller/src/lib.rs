//! `caller`: makes inter-canister calls (to a `counter` canister and to the management canister).

use candid::Principal;
use ic_cdk::call::Call;

/// Calls `counter.inc()` with an unbounded-wait (guaranteed response) call and returns its reply.
#[ic_cdk::update]
async fn call_inc(counter: Principal) -> u64 {
    match Call::unbounded_wait(counter, "inc").await {
        Ok(response) => response
            .candid::<u64>()
            .unwrap_or_else(|error| ic_cdk::trap(format!("call_inc: bad reply from inc: {error}"))),
        Err(error) => ic_cdk::trap(format!("call_inc: inc failed: {error}")),
    }
}

/// Calls `counter.inc()` with a bounded-wait (best-effort response) call and returns its reply.
#[ic_cdk::update]
async fn call_inc_bounded(counter: Principal) -> u64 {
    match Call::bounded_wait(counter, "inc").await {
        Ok(response) => response.candid::<u64>().unwrap_or_else(|error| {
            ic_cdk::trap(format!("call_inc_bounded: bad reply from inc: {error}"))
        }),
        Err(error) => ic_cdk::trap(format!("call_inc_bounded: inc failed: {error}")),
    }
}

/// Calls a method that does not exist on `target` and returns the reject message (traps if it was not rejected).
#[ic_cdk::update]
async fn call_missing(target: Principal) -> String {
    match Call::unbounded_wait(target, "no_such_method").await {
        Ok(_) => ic_cdk::trap("call_missing: the call to no_such_method was unexpectedly answered"),
        Err(ic_cdk::call::CallFailed::CallRejected(rejected)) => {
            format!(
                "{}: {}",
                rejected.raw_reject_code(),
                rejected.reject_message()
            )
        }
        Err(error) => ic_cdk::trap(format!(
            "call_missing: call was not rejected but failed: {error}"
        )),
    }
}

/// 32 random bytes from the management canister's `raw_rand`.
#[ic_cdk::update]
async fn raw_rand() -> Vec<u8> {
    match Call::unbounded_wait(Principal::management_canister(), "raw_rand").await {
        Ok(response) => response
            .candid::<Vec<u8>>()
            .unwrap_or_else(|error| ic_cdk::trap(format!("raw_rand: bad reply: {error}"))),
        Err(error) => ic_cdk::trap(format!("raw_rand: failed: {error}")),
    }
}

/// Calls `subnet_info` on `via` (the management canister's id, or a subnet's id, which routes to
/// that subnet's management canister) for `subnet`; returns the replica and registry versions, or
/// the rejection as `Err("<code>: <message>")`.
#[ic_cdk::update]
async fn subnet_info(via: Principal, subnet: Principal) -> Result<(String, u64), String> {
    use ic_cdk_management_canister::{SubnetInfoArgs, SubnetInfoResult};
    match Call::unbounded_wait(via, "subnet_info")
        .with_arg(SubnetInfoArgs { subnet_id: subnet })
        .await
    {
        Ok(response) => {
            let info = response
                .candid::<SubnetInfoResult>()
                .unwrap_or_else(|error| ic_cdk::trap(format!("subnet_info: bad reply: {error}")));
            Ok((info.replica_version, info.registry_version))
        }
        Err(ic_cdk::call::CallFailed::CallRejected(rejected)) => Err(format!(
            "{}: {}",
            rejected.raw_reject_code(),
            rejected.reject_message()
        )),
        Err(error) => ic_cdk::trap(format!("subnet_info: failed: {error}")),
    }
}

mod chain_keys {
    //! Chain keys through `ic-cdk-management-canister`, as canisters use them: the signing calls
    //! attach the fee that `ic0.cost_*` reports, so a disagreement between the two fails here.

    use ic_cdk_management_canister as mgmt;

    fn fail(what: &str, error: impl std::fmt::Display) -> ! {
        ic_cdk::trap(format!("{what}: {error}"))
    }

    /// The canister's ECDSA public key at `path` under `key`, and its signature of `hash`.
    #[ic_cdk::update]
    async fn ecdsa(key: String, path: Vec<Vec<u8>>, hash: Vec<u8>) -> (Vec<u8>, Vec<u8>) {
        let key_id = mgmt::EcdsaKeyId {
            curve: mgmt::EcdsaCurve::Secp256k1,
            name: key,
        };
        let public_key = mgmt::ecdsa_public_key(&mgmt::EcdsaPublicKeyArgs {
            canister_id: None,
            derivation_path: path.clone(),
            key_id: key_id.clone(),
        })
        .await
        .unwrap_or_else(|e| fail("ecdsa_public_key", e));
        let signature = mgmt::sign_with_ecdsa(&mgmt::SignWithEcdsaArgs {
            message_hash: hash,
            derivation_path: path,
            key_id,
        })
        .await
        .unwrap_or_else(|e| fail("sign_with_ecdsa", e));
        (public_key.public_key, signature.signature)
    }

    /// The canister's Schnorr public key (`algorithm` "bip340secp256k1" or "ed25519") at `path`
    /// under `key`, and its signature of `message` (BIP341 with `merkle_root`).
    #[ic_cdk::update]
    async fn schnorr(
        algorithm: String,
        key: String,
        path: Vec<Vec<u8>>,
        message: Vec<u8>,
        merkle_root: Option<Vec<u8>>,
    ) -> (Vec<u8>, Vec<u8>) {
        let algorithm = match algorithm.as_str() {
            "bip340secp256k1" => mgmt::SchnorrAlgorithm::Bip340secp256k1,
            "ed25519" => mgmt::SchnorrAlgorithm::Ed25519,
            other => fail("schnorr", format!("unknown algorithm {other}")),
        };
        let key_id = mgmt::SchnorrKeyId {
            algorithm,
            name: key,
        };
        let public_key = mgmt::schnorr_public_key(&mgmt::SchnorrPublicKeyArgs {
            canister_id: None,
            derivation_path: path.clone(),
            key_id: key_id.clone(),
        })
        .await
        .unwrap_or_else(|e| fail("schnorr_public_key", e));
        let signature = mgmt::sign_with_schnorr(&mgmt::SignWithSchnorrArgs {
            message,
            derivation_path: path,
            key_id,
            aux: merkle_root.map(|merkle_root_hash| {
                mgmt::SchnorrAux::Bip341(mgmt::Bip341 { merkle_root_hash })
            }),
        })
        .await
        .unwrap_or_else(|e| fail("sign_with_schnorr", e));
        (public_key.public_key, signature.signature)
    }

    /// The canister's vetKD public key for `context` under `key`, and its vetKey for `input`
    /// encrypted to `transport_public_key`.
    #[ic_cdk::update]
    async fn vetkd(
        key: String,
        context: Vec<u8>,
        input: Vec<u8>,
        transport_public_key: Vec<u8>,
    ) -> (Vec<u8>, Vec<u8>) {
        let key_id = mgmt::VetKDKeyId {
            curve: mgmt::VetKDCurve::Bls12_381_G2,
            name: key,
        };
        let public_key = mgmt::vetkd_public_key(&mgmt::VetKDPublicKeyArgs {
            canister_id: None,
            context: context.clone(),
            key_id: key_id.clone(),
        })
        .await
        .unwrap_or_else(|e| fail("vetkd_public_key", e));
        let encrypted = mgmt::vetkd_derive_key(&mgmt::VetKDDeriveKeyArgs {
            input,
            context,
            transport_public_key,
            key_id,
        })
        .await
        .unwrap_or_else(|e| fail("vetkd_derive_key", e));
        (public_key.public_key, encrypted.encrypted_key)
    }

    /// What `ic0.cost_sign_with_ecdsa` says for `key` (an error text when it knows no such key).
    #[ic_cdk::query]
    fn ecdsa_cost(key: String) -> Result<u128, String> {
        ic_cdk::api::cost_sign_with_ecdsa(key, 0).map_err(|e| e.to_string())
    }

    /// Signs with `key` attaching `cycles` (which may be too few) and returns the reject code and
    /// message, or traps if the call succeeded.
    #[ic_cdk::update]
    async fn ecdsa_rejection(key: String, cycles: u128) -> (u32, String) {
        let arg = mgmt::SignWithEcdsaArgs {
            message_hash: vec![0; 32],
            derivation_path: vec![],
            key_id: mgmt::EcdsaKeyId {
                curve: mgmt::EcdsaCurve::Secp256k1,
                name: key,
            },
        };
        match ic_cdk::call::Call::unbounded_wait(
            candid::Principal::management_canister(),
            "sign_with_ecdsa",
        )
        .with_arg(&arg)
        .with_cycles(cycles)
        .await
        {
            Ok(_) => fail("ecdsa_rejection", "the call was answered"),
            Err(ic_cdk::call::CallFailed::CallRejected(rejected)) => (
                rejected.raw_reject_code(),
                rejected.reject_message().to_string(),
            ),
            Err(error) => fail("ecdsa_rejection", error),
        }
    }
}
