//! Canister snapshots through ic-utils: take, load (the canister is restored exactly: heap,
//! stable memory, certified data), list (following `snapshot_visibility`), delete and replace,
//! the IC's refusals, `snapshots_size` in `canister_status`, and snapshots kept across a restart.

use crate::support::*;
use candid::Principal;
use ic_agent::Agent;
use ic_agent::identity::BasicIdentity;
use ic_management_canister_types::{
    DeleteCanisterSnapshotArgs, LoadCanisterSnapshotArgs, Snapshot, TakeCanisterSnapshotArgs,
};
use ic_utils::call::AsyncCall as _;
use ic_utils::interfaces::ManagementCanister;

fn owner() -> Option<Box<dyn ic_agent::Identity>> {
    Some(Box::new(BasicIdentity::from_raw_key(&[2; 32])))
}

async fn take(agent: &Agent, canister: Principal, replace: Option<Vec<u8>>) -> Snapshot {
    ManagementCanister::create(agent)
        .take_canister_snapshot(&TakeCanisterSnapshotArgs {
            canister_id: canister,
            replace_snapshot: replace,
            uninstall_code: None,
            sender_canister_version: None,
        })
        .call_and_wait()
        .await
        .unwrap_or_else(|error| panic!("take_canister_snapshot failed: {error}"))
        .0
}

async fn load(agent: &Agent, canister: Principal, snapshot: &[u8]) {
    ManagementCanister::create(agent)
        .load_canister_snapshot(&LoadCanisterSnapshotArgs {
            canister_id: canister,
            snapshot_id: snapshot.to_vec(),
            sender_canister_version: None,
        })
        .call_and_wait()
        .await
        .unwrap_or_else(|error| panic!("load_canister_snapshot failed: {error}"));
}

async fn list(agent: &Agent, canister: Principal) -> Vec<Snapshot> {
    ManagementCanister::create(agent)
        .list_canister_snapshots(&canister)
        .call_and_wait()
        .await
        .unwrap_or_else(|error| panic!("list_canister_snapshots failed: {error}"))
        .0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_restores_a_canister_exactly_and_survives_a_restart() {
    let mut node = TestNode::start().await;
    let agent = connect(&node.url(), owner()).await;
    let counter = deploy(&agent, "counter", args((Some(40u64),))).await;
    let (value,): (u64,) = update(&agent, counter, "inc", args(())).await;
    assert_eq!(value, 41);
    let () = update(&agent, counter, "stable_write", args((7u64,))).await;
    let () = update(&agent, counter, "set_certified", args((b"v41".to_vec(),))).await;

    let snapshot = take(&agent, counter, None).await;
    assert_eq!(&snapshot.id[8..], counter.as_slice(), "the IC's id layout");
    assert!(snapshot.total_size > 65_536, "{}", snapshot.total_size);
    let (status,) = ManagementCanister::create(&agent)
        .canister_status(&counter)
        .call()
        .await
        .unwrap();
    assert_eq!(
        status.memory_metrics.snapshots_size,
        candid::Nat::from(snapshot.total_size)
    );

    // Change everything, then load: heap, stable memory and certified data come back.
    for _ in 0..3 {
        let _: (u64,) = update(&agent, counter, "inc", args(())).await;
    }
    let () = update(&agent, counter, "stable_write", args((99u64,))).await;
    let () = update(&agent, counter, "set_certified", args((b"later".to_vec(),))).await;
    load(&agent, counter, &snapshot.id).await;
    assert_eq!(counter_value(&agent, counter).await, 41);
    let (stored,): (u64,) = query(&agent, counter, "stable_read", args(())).await;
    assert_eq!(stored, 7);
    let (certificate,): (Option<Vec<u8>>,) =
        query(&agent, counter, "get_data_certificate", args(())).await;
    let certificate: ic_agent::Certificate =
        serde_cbor::from_slice(&certificate.expect("a query gets a data certificate")).unwrap();
    agent.verify(&certificate, counter).unwrap();
    let certified = ic_agent::lookup_value(
        &certificate,
        ["canister".as_bytes(), counter.as_slice(), b"certified_data"],
    )
    .unwrap();
    assert_eq!(certified, b"v41".as_slice(), "certified data restored");
    let (info,) = ManagementCanister::create(&agent)
        .canister_status(&counter)
        .call()
        .await
        .unwrap();
    assert!(info.version > status.version);

    // A second snapshot, a replacement, and the IC's refusals.
    let second = take(&agent, counter, None).await;
    let listed = list(&agent, counter).await;
    assert_eq!(listed, vec![snapshot.clone(), second.clone()]);
    let replacement = take(&agent, counter, Some(second.id.clone())).await;
    let listed = list(&agent, counter).await;
    assert_eq!(listed, vec![snapshot.clone(), replacement.clone()]);
    let stranger = connect(
        &node.url(),
        Some(Box::new(BasicIdentity::from_raw_key(&[3; 32]))),
    )
    .await;
    let error = ManagementCanister::create(&stranger)
        .list_canister_snapshots(&counter)
        .call_and_wait()
        .await
        .expect_err("snapshots are visible to controllers only by default");
    assert!(reject_of(&error).is_some(), "{error}");
    let error = ManagementCanister::create(&agent)
        .load_canister_snapshot(&LoadCanisterSnapshotArgs {
            canister_id: counter,
            snapshot_id: second.id.clone(),
            sender_canister_version: None,
        })
        .call_and_wait()
        .await
        .expect_err("a replaced snapshot is gone");
    let reject = reject_of(&error).unwrap_or_else(|| panic!("{error}"));
    assert_eq!(reject.error_code.as_deref(), Some("IC0305"), "{reject:?}");
    assert!(
        reject
            .reject_message
            .starts_with("Could not find the snapshot ID"),
        "{reject:?}"
    );

    // Snapshots are part of the checkpointed state.
    node.shutdown().await;
    drop((agent, stranger));
    let restarted = start_node_in(node.state_dir.path()).await;
    let agent = connect(&restarted.url(), owner()).await;
    assert_eq!(
        list(&agent, counter).await,
        vec![snapshot.clone(), replacement.clone()]
    );
    let _: (u64,) = update(&agent, counter, "inc", args(())).await;
    load(&agent, counter, &snapshot.id).await;
    assert_eq!(counter_value(&agent, counter).await, 41);

    for id in [&snapshot.id, &replacement.id] {
        ManagementCanister::create(&agent)
            .delete_canister_snapshot(&DeleteCanisterSnapshotArgs {
                canister_id: counter,
                snapshot_id: id.clone(),
            })
            .call_and_wait()
            .await
            .unwrap();
    }
    assert!(list(&agent, counter).await.is_empty());
    let (status,) = ManagementCanister::create(&agent)
        .canister_status(&counter)
        .call()
        .await
        .unwrap();
    assert_eq!(status.memory_metrics.snapshots_size, candid::Nat::from(0u8));
    restarted.shutdown().await;
}
