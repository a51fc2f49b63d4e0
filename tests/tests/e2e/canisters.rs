//! Canister lifecycle and execution through ic-utils' `ManagementCanister` and ic-agent.

use crate::support::*;
use candid::Principal;
use ic_agent::agent::RejectCode;
use ic_utils::call::AsyncCall;
use ic_utils::interfaces::ManagementCanister;
use ic_utils::interfaces::management_canister::CanisterStatusType;
use ic_utils::interfaces::management_canister::builders::CanisterInstallMode;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_install_update_query_as_anonymous() {
    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let counter = deploy(&agent, "counter", args((Some(5u64),))).await;

    assert_eq!(
        counter_value(&agent, counter).await,
        5,
        "init(opt 5) sets the start value"
    );
    let (first,): (u64,) = update(&agent, counter, "inc", args(())).await;
    let (second,): (u64,) = update(&agent, counter, "inc", args(())).await;
    assert_eq!((first, second), (6, 7));
    assert_eq!(
        counter_value(&agent, counter).await,
        7,
        "the query sees the certified updates"
    );

    let (caller,): (Principal,) = query(&agent, counter, "whoami", args(())).await;
    assert_eq!(
        caller,
        Principal::anonymous(),
        "an agent without identity calls as the anonymous principal"
    );
    // Calling a query method as an update is allowed and replicated.
    let (caller_in_update,): (Principal,) = update(&agent, counter, "whoami", args(())).await;
    assert_eq!(caller_in_update, Principal::anonymous());

    // An install without an argument decodes `opt nat64` as null: the counter starts at 0.
    let fresh = deploy(&agent, "counter", args(())).await;
    assert_eq!(counter_value(&agent, fresh).await, 0);
    assert_ne!(fresh, counter, "every created canister gets a new id");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn canister_status_as_query_and_update_decodes() {
    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let management = ManagementCanister::create(&agent);
    let canister_id = create_canister(&agent).await;

    let (empty,) = management
        .canister_status(&canister_id)
        .call()
        .await
        .expect("canister_status (query)");
    assert_eq!(empty.status, CanisterStatusType::Running);
    assert_eq!(empty.module_hash, None, "a new canister has no module");
    assert_eq!(
        empty.settings.controllers,
        vec![Principal::anonymous()],
        "the creator is the controller"
    );

    let wasm = openic_tests::test_canister_wasm("counter");
    install(
        &agent,
        canister_id,
        &wasm,
        CanisterInstallMode::Install,
        args(()),
    )
    .await;

    let (as_query,) = management
        .canister_status(&canister_id)
        .call()
        .await
        .expect("canister_status (query)");
    let (as_update,) = management
        .canister_status(&canister_id)
        .as_update()
        .call()
        .await
        .expect("canister_status (update)");
    for status in [&as_query, &as_update] {
        assert_eq!(status.status, CanisterStatusType::Running);
        assert_eq!(
            status.module_hash.as_deref(),
            Some(sha256(&wasm).as_slice()),
            "module_hash = SHA-256 of the module"
        );
        assert!(
            status.memory_size > 0u64,
            "memory_size must count the module and memory"
        );
        assert!(status.cycles > 0u64, "the canister was created with cycles");
        assert!(
            status.cycles <= TEST_CANISTER_CYCLES,
            "more cycles than were provisioned"
        );
    }

    // Module hash also through the certified state tree.
    let module_hash = agent
        .read_state_canister_info(canister_id, "module_hash")
        .await
        .expect("read_state /canister/<id>/module_hash");
    assert_eq!(module_hash, sha256(&wasm));
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_update_settings_and_delete() {
    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let management = ManagementCanister::create(&agent);
    let counter = deploy(&agent, "counter", args(())).await;

    management
        .update_settings(&counter)
        .with_freezing_threshold(1_234_567u64)
        .call_and_wait()
        .await
        .expect("update_settings");
    let (status,) = management
        .canister_status(&counter)
        .call()
        .await
        .expect("canister_status");
    assert_eq!(status.settings.freezing_threshold, 1_234_567u64);

    management
        .stop_canister(&counter)
        .call_and_wait()
        .await
        .expect("stop_canister");
    let (status,) = management
        .canister_status(&counter)
        .call()
        .await
        .expect("canister_status");
    assert_eq!(status.status, CanisterStatusType::Stopped);
    let error = try_update::<(u64,)>(&agent, counter, "inc", args(()))
        .await
        .expect_err("a stopped canister must not run updates");
    let reject = reject_of(&error).unwrap_or_else(|| panic!("expected a reject, got {error:?}"));
    assert_eq!(
        reject.reject_code,
        RejectCode::CanisterError,
        "calling a stopped canister: {reject:?}"
    );

    management
        .start_canister(&counter)
        .call_and_wait()
        .await
        .expect("start_canister");
    let (value,): (u64,) = update(&agent, counter, "inc", args(())).await;
    assert_eq!(
        value, 1,
        "the failed call to the stopped canister must not have run"
    );

    let error = management
        .delete_canister(&counter)
        .call_and_wait()
        .await
        .expect_err("deleting a running canister must fail");
    assert!(
        reject_of(&error).is_some(),
        "expected a reject, got {error:?}"
    );
    management
        .stop_canister(&counter)
        .call_and_wait()
        .await
        .expect("stop_canister");
    management
        .delete_canister(&counter)
        .call_and_wait()
        .await
        .expect("delete_canister");
    let error = try_query::<(u64,)>(&agent, counter, "get", args(()))
        .await
        .expect_err("a deleted canister must not answer");
    let reject = reject_of(&error).unwrap_or_else(|| panic!("expected a reject, got {error:?}"));
    assert_eq!(
        reject.reject_code,
        RejectCode::DestinationInvalid,
        "query to a deleted canister: {reject:?}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrade_keeps_stable_memory() {
    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let counter = deploy(&agent, "counter", args(())).await;
    for _ in 0..3 {
        let _: (u64,) = update(&agent, counter, "inc", args(())).await;
    }
    let () = update(&agent, counter, "stable_write", args((0xDEAD_BEEF_u64,))).await;
    let (stored,): (u64,) = query(&agent, counter, "stable_read", args(())).await;
    assert_eq!(stored, 0xDEAD_BEEF);

    let wasm = openic_tests::test_canister_wasm("counter");
    install(
        &agent,
        counter,
        &wasm,
        CanisterInstallMode::Upgrade(None),
        args(()),
    )
    .await;
    assert_eq!(
        counter_value(&agent, counter).await,
        3,
        "pre_upgrade/post_upgrade carry the counter over"
    );
    let (stored,): (u64,) = query(&agent, counter, "stable_read", args(())).await;
    assert_eq!(stored, 0xDEAD_BEEF, "stable memory survives an upgrade");

    // Reinstall wipes both heap and stable memory.
    install(
        &agent,
        counter,
        &wasm,
        CanisterInstallMode::Reinstall,
        args(()),
    )
    .await;
    assert_eq!(
        counter_value(&agent, counter).await,
        0,
        "reinstall starts from scratch"
    );
    let (stored,): (u64,) = query(&agent, counter, "stable_read", args(())).await;
    assert_eq!(stored, 0, "reinstall clears stable memory");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_install_of_large_canister() {
    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let wasm = openic_tests::test_canister_wasm("large");
    assert!(
        wasm.len() > 2 * 1024 * 1024,
        "the large canister must exceed 2 MiB (is {} bytes)",
        wasm.len()
    );
    let large = deploy(&agent, "large", args(())).await;

    let (length,): (u64,) = query(&agent, large, "data_len", args(())).await;
    assert_eq!(length, openic_tests::LARGE_DATA_BYTES as u64);
    let (checksum,): (u64,) = query(&agent, large, "checksum", args(())).await;
    assert_eq!(
        checksum,
        openic_tests::large_data_checksum(),
        "the module's data arrived intact"
    );

    let management = ManagementCanister::create(&agent);
    let (status,) = management
        .canister_status(&large)
        .call()
        .await
        .expect("canister_status");
    assert_eq!(
        status.module_hash,
        Some(sha256(&wasm)),
        "module hash of the assembled chunks"
    );
    let (chunks,) = management
        .stored_chunks(&large)
        .call_and_wait()
        .await
        .expect("stored_chunks");
    assert!(
        chunks.is_empty(),
        "ic-utils clears the chunk store after installing; left: {}",
        chunks.len()
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trapping_update_is_rejected_and_rolled_back() {
    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let counter = deploy(&agent, "counter", args((Some(10u64),))).await;

    let error = try_update::<()>(&agent, counter, "trap_after_write", args(()))
        .await
        .expect_err("a trapping update must be rejected");
    match &error {
        ic_agent::AgentError::CertifiedReject { reject, .. } => {
            assert_eq!(reject.reject_code, RejectCode::CanisterError, "{reject:?}");
            // Word for word what the IC answers (canisters' tests match on it).
            assert_eq!(
                reject.reject_message,
                format!(
                    "Error from Canister {counter}: Canister called `ic0.trap` with message: \
                     'trap_after_write: deliberate trap after changing state'.\nConsider \
                     gracefully handling failures from this canister or altering the canister \
                     to handle exceptions. See documentation: \
                     https://internetcomputer.org/docs/current/references/execution-errors#trapped-explicitly"
                )
            );
            assert_eq!(reject.error_code.as_deref(), Some("IC0503"));
        }
        other => panic!("expected a certified reject with code 5, got {other:?}"),
    }
    assert_eq!(
        counter_value(&agent, counter).await,
        10,
        "the trapped update's write must be rolled back"
    );
    let (value,): (u64,) = update(&agent, counter, "inc", args(())).await;
    assert_eq!(value, 11, "the canister keeps working after a trap");

    let error = try_update::<()>(&agent, counter, "no_such_method", args(()))
        .await
        .expect_err("calling a missing method must be rejected");
    assert!(
        reject_of(&error).is_some(),
        "expected a reject for a missing method, got {error:?}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certified_data_is_in_the_query_certificate() {
    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let counter = deploy(&agent, "counter", args(())).await;
    let data = b"openic certified data".to_vec();
    let () = update(&agent, counter, "set_certified", args((data.clone(),))).await;

    let (certificate,): (Option<Vec<u8>>,) =
        query(&agent, counter, "get_data_certificate", args(())).await;
    let certificate = certificate.expect("a query must receive a data certificate");
    let certificate: ic_agent::Certificate =
        serde_cbor::from_slice(&certificate).expect("the data certificate is a CBOR certificate");
    agent
        .verify(&certificate, counter)
        .expect("the data certificate verifies against the root key");
    let certified = ic_agent::lookup_value(
        &certificate,
        ["canister".as_bytes(), counter.as_slice(), b"certified_data"],
    )
    .expect("the certificate contains /canister/<id>/certified_data");
    assert_eq!(certified, data.as_slice());

    let (in_update,): (Option<Vec<u8>>,) =
        update(&agent, counter, "get_data_certificate", args(())).await;
    assert_eq!(
        in_update, None,
        "replicated execution has no data certificate"
    );

    let error = try_update::<()>(&agent, counter, "set_certified", args((vec![0u8; 33],)))
        .await
        .expect_err("more than 32 bytes of certified data must trap");
    assert!(reject_of(&error).is_some(), "{error:?}");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inter_canister_calls() {
    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let counter = deploy(&agent, "counter", args(())).await;
    let caller = deploy(&agent, "caller", args(())).await;

    let (first,): (u64,) = update(&agent, caller, "call_inc", args((counter,))).await;
    let (second,): (u64,) = update(&agent, caller, "call_inc", args((counter,))).await;
    assert_eq!(
        (first, second),
        (1, 2),
        "caller -> counter.inc with unbounded wait"
    );
    let (third,): (u64,) = update(&agent, caller, "call_inc_bounded", args((counter,))).await;
    assert_eq!(
        third, 3,
        "caller -> counter.inc with bounded wait (best-effort response)"
    );
    assert_eq!(counter_value(&agent, counter).await, 3);

    let (message,): (String,) = update(&agent, caller, "call_missing", args((counter,))).await;
    assert_eq!(
        message,
        format!(
            "5: Error from Canister {counter}: Canister has no update method 'no_such_method'..\n\
             Check that the method being called is exported by the target canister. See \
             documentation: https://internetcomputer.org/docs/current/references/execution-errors#method-not-found"
        ),
        "the IC's text, double period included"
    );

    let (random_a,): (Vec<u8>,) = update(&agent, caller, "raw_rand", args(())).await;
    let (random_b,): (Vec<u8>,) = update(&agent, caller, "raw_rand", args(())).await;
    assert_eq!(random_a.len(), 32, "raw_rand returns 32 bytes");
    assert_eq!(random_b.len(), 32);
    assert_ne!(random_a, random_b, "each raw_rand call returns fresh bytes");

    // Only canisters may call raw_rand (the interface spec): an ingress message is refused up front.
    let error = ManagementCanister::create(&agent)
        .raw_rand()
        .call_and_wait()
        .await
        .expect_err("users must not call raw_rand");
    let reject = reject_of(&error)
        .unwrap_or_else(|| panic!("raw_rand by a user: expected a reject, got {error:?}"));
    assert_eq!(
        reject.reject_code,
        RejectCode::CanisterReject,
        "raw_rand by a user: {reject:?}"
    );
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timers_fire() {
    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let timer = deploy(&agent, "timer", args(())).await;

    let fired = |at_least: u64| {
        let agent = &agent;
        move || async move {
            let (fired,): (u64,) = query(agent, timer, "fired", args(())).await;
            fired >= at_least
        }
    };
    wait_until("the 1 s timer set in init to fire", fired(1)).await;
    let () = update(&agent, timer, "schedule", args((1u64,))).await;
    wait_until("the timer set by schedule(1) to fire", fired(2)).await;
    // Give a wrongly repeating timer time to fire again.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let (count,): (u64,) = query(&agent, timer, "fired", args(())).await;
    assert_eq!(count, 2, "each one-shot timer fires exactly once");
    node.shutdown().await;
}

/// On a subnet above its memory threshold (here: any memory at all), memory a canister adds
/// reserves cycles for its storage: `canister_status` shows them as `reserved_cycles`, and past
/// its `reserved_cycles_limit` the growth fails with the IC's error (IC0534).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_growth_reserves_cycles_on_a_subnet_above_its_threshold() {
    let mut node = TestNode::start_with(|config| {
        config.execution.subnet_memory_threshold_bytes = 0;
        config.execution.subnet_memory_capacity_bytes = 64 << 30;
    })
    .await;
    let agent = node.agent().await;
    let management = ManagementCanister::create(&agent);
    let counter = deploy(&agent, "counter", args(())).await;
    let reserved = |status: &ic_management_canister_types::CanisterStatusResult| {
        u128::try_from(status.reserved_cycles.0.clone()).expect("fits")
    };
    let (status,) = management
        .canister_status(&counter)
        .as_update()
        .call()
        .await
        .expect("canister_status");
    let installed = reserved(&status);
    assert!(installed > 0, "the installation reserved cycles");

    let (heap,): (u64,) = update(&agent, counter, "grow_heap", args((4u64,))).await;
    assert!(heap >= 4 << 20);
    let (status,) = management
        .canister_status(&counter)
        .as_update()
        .call()
        .await
        .expect("canister_status");
    let grown = reserved(&status);
    assert!(grown > installed, "{grown} after {installed}");

    management
        .update_settings(&counter)
        .with_reserved_cycles_limit(grown)
        .call_and_wait()
        .await
        .expect("update_settings");
    let error = try_update::<(u64,)>(&agent, counter, "grow_heap", args((4u64,)))
        .await
        .expect_err("growth past the reserved cycles limit fails");
    let reject = reject_of(&error).unwrap_or_else(|| panic!("expected a reject, got {error:?}"));
    assert_eq!(reject.error_code.as_deref(), Some("IC0534"), "{reject:?}");
    assert!(
        reject
            .reject_message
            .contains("due to its reserved cycles limit. The current limit"),
        "{reject:?}"
    );
    node.shutdown().await;
}

/// `subnet_info` through ic-cdk from a canister, addressed to `aaaaa-aa` and to the subnet's own id
/// (which routes to the subnet's management canister, as on the IC).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subnet_info_from_a_canister() {
    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let caller = deploy(&agent, "caller", args(())).await;
    let subnet = Principal::self_authenticating(node.root_key_der());
    for via in [Principal::management_canister(), subnet] {
        let (info,): (Result<(String, u64), String>,) =
            update(&agent, caller, "subnet_info", args((via, subnet))).await;
        let (replica_version, registry_version) =
            info.unwrap_or_else(|error| panic!("subnet_info via {via}: {error}"));
        assert!(replica_version.starts_with("openic-"), "{replica_version}");
        assert_eq!(registry_version, 1);
    }
    let other = Principal::self_authenticating([7u8; 32]);
    let (info,): (Result<(String, u64), String>,) = update(
        &agent,
        caller,
        "subnet_info",
        args((Principal::management_canister(), other)),
    )
    .await;
    let error = info.expect_err("another subnet is unknown");
    assert!(error.contains("does not exist"), "{error}");
    // Users may not call it.
    let refused = try_update::<(u64,)>(
        &agent,
        Principal::management_canister(),
        "subnet_info",
        args((subnet,)),
    )
    .await;
    assert!(refused.is_err());
    node.shutdown().await;
}

/// An update that loops to the instruction limit runs in slices across blocks (the IC's
/// deterministic time slicing): its call is seen `processing` (in one go it would start and end in
/// one block), other canisters' updates are answered meanwhile, and it then fails with the IC's
/// instruction-limit error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_running_to_the_instruction_limit_does_not_hold_other_canisters() {
    use ic_agent::agent::{CallResponse, RequestStatusResponse};
    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let spinner = deploy(&agent, "counter", args(())).await;
    let counter = deploy(&agent, "counter", args(())).await;
    let signed = agent
        .update(&spinner, "spin")
        .with_arg(args(()))
        .sign()
        .expect("signing an update");
    let request_id = signed.request_id;
    let spin = {
        let agent = agent.clone();
        tokio::spawn(async move {
            match agent.update_signed(spinner, signed.signed_update).await? {
                CallResponse::Response(reply) => Ok(reply),
                CallResponse::Poll(_) => agent.wait(&request_id, spinner).await.map(|(r, _)| r),
            }
        })
    };
    let status = || async { agent.request_status_raw(&request_id, spinner).await };
    wait_until("spin to be processing", || async {
        matches!(status().await, Ok((RequestStatusResponse::Processing, _)))
    })
    .await;
    for expected in 1..=3u64 {
        let (value,): (u64,) = update(&agent, counter, "inc", args(())).await;
        assert_eq!(value, expected);
    }
    assert!(
        matches!(status().await, Ok((RequestStatusResponse::Processing, _))),
        "the other canister's updates were answered while spin ran"
    );
    let error = spin
        .await
        .expect("the spin task")
        .expect_err("spin fails at the instruction limit");
    let reject = reject_of(&error).unwrap_or_else(|| panic!("expected a reject, got {error:?}"));
    assert_eq!(reject.error_code.as_deref(), Some("IC0522"), "{reject:?}");
    node.shutdown().await;
}
