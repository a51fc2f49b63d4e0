//! Canister snapshots through ic-utils: take, download (metadata and data) and upload to another
//! canister, load (the canister is restored exactly: heap, stable memory, certified data), list
//! (following `snapshot_visibility`), delete and replace,
//! the IC's refusals, `snapshots_size` in `canister_status`, and snapshots kept across a restart.

use crate::support::*;
use candid::Principal;
use ic_agent::Agent;
use ic_agent::identity::BasicIdentity;
use ic_management_canister_types::{
    DeleteCanisterSnapshotArgs, LoadCanisterSnapshotArgs, ReadCanisterSnapshotDataArgs,
    ReadCanisterSnapshotMetadataArgs, Snapshot, SnapshotDataKind, SnapshotDataOffset,
    TakeCanisterSnapshotArgs, UploadCanisterSnapshotDataArgs, UploadCanisterSnapshotMetadataArgs,
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

    // Download: the metadata, the module byte for byte, and the stable memory's value.
    let management = ManagementCanister::create(&agent);
    let (metadata,) = management
        .read_canister_snapshot_metadata(&ReadCanisterSnapshotMetadataArgs {
            canister_id: counter,
            snapshot_id: snapshot.id.clone(),
        })
        .call_and_wait()
        .await
        .unwrap();
    let wasm = openic_tests::test_canister_wasm("counter");
    assert_eq!(metadata.wasm_module_size, wasm.len() as u64);
    assert_eq!(metadata.certified_data, b"v41");
    assert!(metadata.stable_memory_size >= 4 * 65_536);
    let read = |kind| {
        let management = &management;
        let id = snapshot.id.clone();
        async move {
            management
                .read_canister_snapshot_data(&ReadCanisterSnapshotDataArgs {
                    canister_id: counter,
                    snapshot_id: id,
                    kind,
                })
                .call_and_wait()
                .await
        }
    };
    let mut module = Vec::new();
    while (module.len() as u64) < metadata.wasm_module_size {
        let size = (metadata.wasm_module_size - module.len() as u64).min(1_000_000);
        let (data,) = read(SnapshotDataKind::WasmModule {
            offset: module.len() as u64,
            size,
        })
        .await
        .unwrap();
        module.extend_from_slice(&data.chunk);
    }
    assert_eq!(module, wasm, "the downloaded module is the installed one");
    let (value,) = read(SnapshotDataKind::StableMemory {
        offset: 3 * 65_536 + 4_096 - 4,
        size: 8,
    })
    .await
    .unwrap();
    assert_eq!(value.chunk, 7u64.to_le_bytes());
    let error = read(SnapshotDataKind::WasmMemory {
        offset: 0,
        size: 3_000_000,
    })
    .await
    .expect_err("a slice larger than a reply is refused");
    let reject = reject_of(&error).unwrap_or_else(|| panic!("{error}"));
    assert_eq!(reject.error_code.as_deref(), Some("IC0408"), "{reject:?}");

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

/// Downloads every byte of a snapshot with `read_canister_snapshot_*` and uploads it to another
/// canister with `upload_canister_snapshot_*`, as `icp canister snapshot download/upload` do; the
/// other canister, loaded from the upload, is the first one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downloaded_snapshot_uploads_and_loads_onto_another_canister() {
    let node = TestNode::start().await;
    let agent = connect(&node.url(), owner()).await;
    let management = ManagementCanister::create(&agent);
    let source = deploy(&agent, "counter", args((Some(9u64),))).await;
    let _: (u64,) = update(&agent, source, "inc", args(())).await;
    let () = update(&agent, source, "stable_write", args((123u64,))).await;
    let snapshot = take(&agent, source, None).await;

    let (metadata,) = management
        .read_canister_snapshot_metadata(&ReadCanisterSnapshotMetadataArgs {
            canister_id: source,
            snapshot_id: snapshot.id.clone(),
        })
        .call_and_wait()
        .await
        .unwrap();
    let download = |kind: fn(u64, u64) -> SnapshotDataKind, len: u64| {
        let management = &management;
        let id = snapshot.id.clone();
        async move {
            let mut bytes = Vec::new();
            while (bytes.len() as u64) < len {
                let size = (len - bytes.len() as u64).min(2_000_000);
                let (data,) = management
                    .read_canister_snapshot_data(&ReadCanisterSnapshotDataArgs {
                        canister_id: source,
                        snapshot_id: id.clone(),
                        kind: kind(bytes.len() as u64, size),
                    })
                    .call_and_wait()
                    .await
                    .unwrap();
                bytes.extend_from_slice(&data.chunk);
            }
            bytes
        }
    };
    let module = download(
        |offset, size| SnapshotDataKind::WasmModule { offset, size },
        metadata.wasm_module_size,
    )
    .await;
    let heap = download(
        |offset, size| SnapshotDataKind::WasmMemory { offset, size },
        metadata.wasm_memory_size,
    )
    .await;
    let stable = download(
        |offset, size| SnapshotDataKind::StableMemory { offset, size },
        metadata.stable_memory_size,
    )
    .await;

    let target = create_canister(&agent).await;
    let (uploaded,) = management
        .upload_canister_snapshot_metadata(&UploadCanisterSnapshotMetadataArgs {
            canister_id: target,
            replace_snapshot: None,
            wasm_module_size: metadata.wasm_module_size,
            globals: metadata.globals.iter().flatten().cloned().collect(),
            wasm_memory_size: metadata.wasm_memory_size,
            stable_memory_size: metadata.stable_memory_size,
            certified_data: metadata.certified_data.clone(),
            global_timer: metadata.global_timer.clone(),
            on_low_wasm_memory_hook_status: metadata.on_low_wasm_memory_hook_status.clone(),
        })
        .call_and_wait()
        .await
        .unwrap();
    for (bytes, kind) in [(&module, 0u8), (&heap, 1), (&stable, 2)] {
        for (index, piece) in bytes.chunks(1_000_000).enumerate() {
            let offset = (index * 1_000_000) as u64;
            if piece.iter().all(|b| *b == 0) {
                continue; // an uploaded snapshot starts zeroed
            }
            let kind = match kind {
                0 => SnapshotDataOffset::WasmModule { offset },
                1 => SnapshotDataOffset::WasmMemory { offset },
                _ => SnapshotDataOffset::StableMemory { offset },
            };
            management
                .upload_canister_snapshot_data(&UploadCanisterSnapshotDataArgs {
                    canister_id: target,
                    snapshot_id: uploaded.snapshot_id.clone(),
                    kind,
                    chunk: piece.to_vec(),
                })
                .call_and_wait()
                .await
                .unwrap();
        }
    }
    // A snapshot taken from a canister cannot be written to.
    let error = management
        .upload_canister_snapshot_data(&UploadCanisterSnapshotDataArgs {
            canister_id: source,
            snapshot_id: snapshot.id.clone(),
            kind: SnapshotDataOffset::WasmMemory { offset: 0 },
            chunk: vec![1],
        })
        .call_and_wait()
        .await
        .expect_err("a taken snapshot is immutable");
    assert!(
        reject_of(&error).is_some_and(|reject| reject.reject_message
            == "Only canister snapshots created by metadata upload can be mutated."),
        "{error}"
    );

    load(&agent, target, &uploaded.snapshot_id).await;
    assert_eq!(counter_value(&agent, target).await, 10);
    let (value,): (u64,) = query(&agent, target, "stable_read", args(())).await;
    assert_eq!(value, 123);
    assert_eq!(list(&agent, target).await.len(), 1);
    let _: (u64,) = update(&agent, target, "inc", args(())).await;
    assert_eq!(counter_value(&agent, target).await, 11, "and it runs");
}
