//! Senders: every signature scheme ic-agent offers, and controller-only management calls.

use crate::support::*;
use candid::Principal;
use ic_agent::Identity;
use ic_agent::agent::RejectCode;
use ic_agent::identity::{BasicIdentity, Prime256v1Identity, Secp256k1Identity};
use ic_utils::call::AsyncCall;
use ic_utils::interfaces::ManagementCanister;
use ic_utils::interfaces::management_canister::CanisterStatusType;
use ic_utils::interfaces::management_canister::builders::CanisterInstallMode;

/// 32 deterministic secret bytes per label (tests must be reproducible; any 32 bytes are a valid Ed25519 key
/// and, with overwhelming probability, a valid ECDSA scalar).
fn secret(label: &str) -> [u8; 32] {
    sha256(format!("openic e2e test key: {label}").as_bytes())
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

fn ed25519_identity(label: &str) -> BasicIdentity {
    BasicIdentity::from_raw_key(&secret(label))
}

fn secp256k1_identity(label: &str) -> Secp256k1Identity {
    let key = k256::SecretKey::from_slice(&secret(label)).expect("a valid secp256k1 scalar");
    Secp256k1Identity::from_private_key(key)
}

fn prime256v1_identity(label: &str) -> Prime256v1Identity {
    let key = p256::SecretKey::from_slice(&secret(label)).expect("a valid P-256 scalar");
    Prime256v1Identity::from_private_key(key)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_signature_scheme_can_call() {
    let mut node = TestNode::start().await;
    let anonymous = node.agent().await;
    let counter = deploy(&anonymous, "counter", args(())).await;

    let identities: Vec<(&str, Box<dyn Identity>)> = vec![
        ("ed25519", Box::new(ed25519_identity("scheme"))),
        ("secp256k1", Box::new(secp256k1_identity("scheme"))),
        ("prime256v1", Box::new(prime256v1_identity("scheme"))),
    ];
    let mut expected = 0;
    for (scheme, identity) in identities {
        let principal = identity.sender().expect("identity has a principal");
        let agent = connect(&node.url(), Some(identity)).await;
        let (value,): (u64,) = update(&agent, counter, "inc", args(())).await;
        expected += 1;
        assert_eq!(value, expected, "{scheme}: signed update");
        let (caller,): (Principal,) = query(&agent, counter, "whoami", args(())).await;
        assert_eq!(
            caller, principal,
            "{scheme}: the canister sees the self-authenticating principal (query)"
        );
        let (caller,): (Principal,) = update(&agent, counter, "whoami", args(())).await;
        assert_eq!(
            caller, principal,
            "{scheme}: the canister sees the self-authenticating principal (update)"
        );
    }
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_controllers_may_manage_a_canister() {
    let mut node = TestNode::start().await;
    let owner_identity = ed25519_identity("owner");
    let owner_principal = owner_identity.sender().expect("principal");
    let owner = connect(&node.url(), Some(Box::new(owner_identity))).await;
    let stranger_identity = ed25519_identity("stranger");
    let stranger_principal = stranger_identity.sender().expect("principal");
    let stranger = connect(&node.url(), Some(Box::new(stranger_identity))).await;

    let counter = deploy(&owner, "counter", args(())).await;
    let wasm = openic_tests::test_canister_wasm("counter");
    let as_stranger = ManagementCanister::create(&stranger);

    let error = as_stranger
        .install_code(&counter, &wasm)
        .with_mode(CanisterInstallMode::Reinstall)
        .call_and_wait()
        .await
        .expect_err("a non-controller must not install code");
    let reject = reject_of(&error)
        .unwrap_or_else(|| panic!("install by a non-controller: expected a reject, got {error:?}"));
    assert_eq!(
        reject.reject_code,
        RejectCode::CanisterError,
        "install by a non-controller: {reject:?}"
    );

    let error = as_stranger
        .stop_canister(&counter)
        .call_and_wait()
        .await
        .expect_err("a non-controller must not stop the canister");
    let reject = reject_of(&error)
        .unwrap_or_else(|| panic!("stop by a non-controller: expected a reject, got {error:?}"));
    assert_eq!(
        reject.reject_code,
        RejectCode::CanisterError,
        "stop by a non-controller: {reject:?}"
    );

    // Anyone may call the canister's own methods.
    let (value,): (u64,) = update(&stranger, counter, "inc", args(())).await;
    assert_eq!(
        value, 1,
        "the failed management calls left the canister untouched"
    );

    let as_owner = ManagementCanister::create(&owner);
    let (status,) = as_owner
        .canister_status(&counter)
        .call()
        .await
        .expect("canister_status by the owner");
    assert_eq!(status.status, CanisterStatusType::Running);
    assert_eq!(status.settings.controllers, vec![owner_principal]);

    // Once added as a controller, the stranger may stop and start it.
    as_owner
        .update_settings(&counter)
        .with_controller(owner_principal)
        .with_controller(stranger_principal)
        .call_and_wait()
        .await
        .expect("update_settings adding a controller");
    let (status,) = as_owner
        .canister_status(&counter)
        .call()
        .await
        .expect("canister_status");
    let mut controllers = status.settings.controllers.clone();
    controllers.sort();
    let mut expected = vec![owner_principal, stranger_principal];
    expected.sort();
    assert_eq!(controllers, expected);
    as_stranger
        .stop_canister(&counter)
        .call_and_wait()
        .await
        .expect("stop by the new controller");
    as_stranger
        .start_canister(&counter)
        .call_and_wait()
        .await
        .expect("start by the new controller");
    node.shutdown().await;
}
