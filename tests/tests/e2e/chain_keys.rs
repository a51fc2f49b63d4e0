//! Chain keys through ic-agent and a canister built with `ic-cdk-management-canister`: ECDSA and
//! Schnorr signatures checked with `k256` and `ic-ed25519`, vetKeys decrypted and verified with
//! `ic-vetkeys` (the libraries a canister's users check them with), public keys compared with the
//! offline derivation of `ic-secp256k1`, and fees that agree with `ic0.cost_*`.

use crate::support::*;
use candid::Principal;
use k256::ecdsa::signature::hazmat::PrehashVerifier as _;
use sha2::{Digest as _, Sha256};

/// What `key_1` costs per signature (10 billion cycles on the 34-node subnet that holds it).
const KEY_1_FEE: u128 = 26_153_846_153;
/// What `test_key_1` and `dfx_test_key` cost (10 billion cycles on a 13-node subnet).
const TEST_KEY_FEE: u128 = 10_000_000_000;

async fn balance(agent: &ic_agent::Agent, canister: Principal) -> u128 {
    let status = ic_utils::interfaces::ManagementCanister::create(agent)
        .canister_status(&canister)
        .call()
        .await
        .unwrap_or_else(|error| panic!("canister_status of {canister} failed: {error}"))
        .0;
    u128::try_from(status.cycles.0).expect("balance fits u128")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecdsa_schnorr_and_vetkd_keys_work_from_a_canister() {
    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let canister = deploy(&agent, "caller", args(())).await;
    let path: Vec<Vec<u8>> = vec![b"wallet".to_vec(), 7u32.to_be_bytes().to_vec()];

    // ECDSA: the public key is the one derived offline from DFINITY's local-network master key,
    // and the signature of a SHA-256 hash verifies with k256.
    let hash: [u8; 32] = Sha256::digest(b"pay 1 BTC").into();
    let (public_key, signature): (Vec<u8>, Vec<u8>) = update(
        &agent,
        canister,
        "ecdsa",
        args(("test_key_1", path.clone(), hash.to_vec())),
    )
    .await;
    let (offline, _) = ic_secp256k1::PublicKey::derive_pocketic_key(
        ic_secp256k1::PocketIcMasterPublicKeyId::EcdsaTestKey1,
        &canister,
        &path,
    );
    assert_eq!(public_key, offline.serialize_sec1(true));
    let verifying = k256::ecdsa::VerifyingKey::from_sec1_bytes(&public_key).unwrap();
    let parsed = k256::ecdsa::Signature::from_slice(&signature).unwrap();
    verifying
        .verify_prehash(&hash, &parsed)
        .expect("the ECDSA signature verifies with k256");
    assert!(
        verifying.verify_prehash(&[0; 32], &parsed).is_err(),
        "and only for its own message"
    );

    // BIP340 over secp256k1, a message of any length, verified with k256's Schnorr.
    let message = b"a taproot spend, longer than thirty-two bytes".to_vec();
    let (public_key, signature): (Vec<u8>, Vec<u8>) = update(
        &agent,
        canister,
        "schnorr",
        args((
            "bip340secp256k1",
            "dfx_test_key",
            path.clone(),
            message.clone(),
            None::<Vec<u8>>,
        )),
    )
    .await;
    assert_eq!(public_key.len(), 33);
    let x_only = k256::schnorr::VerifyingKey::from_bytes(&public_key[1..]).unwrap();
    let parsed = k256::schnorr::Signature::try_from(signature.as_slice()).unwrap();
    x_only
        .verify_raw(&message, &parsed)
        .expect("the BIP340 signature verifies with k256");

    // Ed25519, verified with ic-ed25519 (ed25519-dalek underneath).
    let (public_key, signature): (Vec<u8>, Vec<u8>) = update(
        &agent,
        canister,
        "schnorr",
        args((
            "ed25519",
            "key_1",
            path.clone(),
            b"hello".to_vec(),
            None::<Vec<u8>>,
        )),
    )
    .await;
    let key = ic_ed25519::PublicKey::deserialize_raw(&public_key).unwrap();
    key.verify_signature(b"hello", &signature)
        .expect("the Ed25519 signature verifies");
    let (offline, _) = ic_ed25519::PublicKey::derive_pocketic_key(
        ic_ed25519::PocketIcMasterPublicKeyId::Key1,
        &canister,
        &path,
    );
    assert_eq!(key, offline);

    // vetKD: the encrypted key decrypts with the transport secret and verifies under the
    // derived public key, which matches ic-vetkeys' own derivation.
    let transport = ic_vetkeys::TransportSecretKey::from_seed(vec![3; 32]).unwrap();
    let (public_key, encrypted): (Vec<u8>, Vec<u8>) = update(
        &agent,
        canister,
        "vetkd",
        args((
            "test_key_1",
            b"notes".to_vec(),
            b"alice".to_vec(),
            transport.public_key(),
        )),
    )
    .await;
    let derived = ic_vetkeys::DerivedPublicKey::deserialize(&public_key).unwrap();
    let key_id = ic_cdk_management_canister::VetKDKeyId {
        curve: ic_cdk_management_canister::VetKDCurve::Bls12_381_G2,
        name: "test_key_1".to_string(),
    };
    let offline = ic_vetkeys::MasterPublicKey::for_pocketic_key(&key_id)
        .unwrap()
        .derive_canister_key(canister.as_slice())
        .derive_sub_key(b"notes");
    assert_eq!(offline.serialize(), public_key);
    let vetkey = ic_vetkeys::EncryptedVetKey::deserialize(&encrypted)
        .unwrap()
        .decrypt_and_verify(&transport, &derived, b"alice")
        .expect("the vetKey decrypts and verifies");
    assert!(
        ic_vetkeys::EncryptedVetKey::deserialize(&encrypted)
            .unwrap()
            .decrypt_and_verify(&transport, &derived, b"bob")
            .is_err(),
        "a vetKey is bound to its input"
    );
    assert_eq!(vetkey.signature_bytes().len(), 48);

    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_fees_agree_with_the_cost_functions_and_are_charged() {
    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let canister = deploy(&agent, "caller", args(())).await;

    let (cost,): (Result<u128, String>,) =
        query(&agent, canister, "ecdsa_cost", args(("key_1",))).await;
    assert_eq!(cost, Ok(KEY_1_FEE));
    let (cost,): (Result<u128, String>,) =
        query(&agent, canister, "ecdsa_cost", args(("dfx_test_key",))).await;
    assert_eq!(cost, Ok(TEST_KEY_FEE));
    let (cost,): (Result<u128, String>,) =
        query(&agent, canister, "ecdsa_cost", args(("no_such_key",))).await;
    assert!(cost.is_err(), "an unknown key has no cost: {cost:?}");

    // A signature takes exactly the fee from the canister's balance (plus the execution of the
    // canister's own messages, which is far below a million cycles here).
    let before = balance(&agent, canister).await;
    let _: (Vec<u8>, Vec<u8>) = update(
        &agent,
        canister,
        "ecdsa",
        args(("key_1", Vec::<Vec<u8>>::new(), vec![1u8; 32])),
    )
    .await;
    let spent = before - balance(&agent, canister).await;
    assert!(
        (KEY_1_FEE..KEY_1_FEE + 1_000_000_000).contains(&spent),
        "one key_1 signature spent {spent} cycles"
    );

    // Too few cycles: refused by the method (reject code 4), in the IC's words.
    let (code, message): (u32, String) = update(
        &agent,
        canister,
        "ecdsa_rejection",
        args(("test_key_1", TEST_KEY_FEE - 1)),
    )
    .await;
    assert_eq!(code, 4, "{message}");
    assert_eq!(
        message,
        "sign_with_ecdsa request sent with 9_999_999_999 cycles, but 10_000_000_000 cycles are required."
    );
    // An unknown key: refused as the IC's routing refuses it (reject code 3).
    let (code, message): (u32, String) = update(
        &agent,
        canister,
        "ecdsa_rejection",
        args(("no_such_key", TEST_KEY_FEE)),
    )
    .await;
    assert_eq!(code, 3, "{message}");
    assert!(
        message
            .contains("Requested unknown or disabled threshold key: ecdsa:Secp256k1:no_such_key"),
        "{message}"
    );

    node.shutdown().await;
}
