//! The JS client (@icp-sdk/core) and a Motoko canister (npm `motoko`, a JS build of moc): its
//! calls, upgrade with enhanced orthogonal persistence, log (prints and a trap) and a snapshot.
//!
//! Both need Node.js >= 20 with npm and fail, not skip, when it is missing. Dependencies come from
//! tests/js/package-lock.json via tests/js/install.sh (`npm ci`).

use crate::support::*;
use ic_utils::call::{AsyncCall as _, SyncCall as _};
use ic_utils::interfaces::management_canister::builders::{
    CanisterInstallMode, UpgradeFlags, WasmMemoryPersistence,
};
use std::process::Command;

/// Runs `node` with `arguments` in tests/js and returns its output; panics with that output on failure.
fn run_node(arguments: &[&str], environment: &[(&str, String)]) -> String {
    openic_tests::ensure_js_dependencies();
    let output = Command::new("node")
        .args(arguments)
        .envs(
            environment
                .iter()
                .map(|(name, value)| (*name, value.as_str())),
        )
        .current_dir(openic_tests::js_dir())
        .output()
        .unwrap_or_else(|error| panic!("cannot run node {arguments:?}: {error}"));
    let text = format!(
        "--- stdout ---\n{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        output.status.success(),
        "node {arguments:?} failed ({}).\n{text}",
        output.status
    );
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_agent_flow() {
    openic_tests::require_node();
    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let counter = deploy(&agent, "counter", args(())).await;
    let module_hash = hex::encode(sha256(&openic_tests::test_canister_wasm("counter")));
    let environment = [
        ("OPENIC_URL", node.url()),
        ("CANISTER_ID", counter.to_text()),
        ("EXPECTED_MODULE_HASH", module_hash),
    ];
    // node:test runs blocking; keep the node's runtime free to serve it.
    let output =
        tokio::task::spawn_blocking(move || run_node(&["--test", "flow.test.mjs"], &environment))
            .await
            .expect("the node:test thread");
    println!("{output}");
    assert_eq!(
        counter_value(&agent, counter).await,
        2,
        "the JS agent's two inc calls are visible to ic-agent"
    );
    node.shutdown().await;
}

/// The same flow against a subnet of four replicas, each of the flow's agents talking to another
/// replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn js_agent_flow_against_a_subnet() {
    openic_tests::require_node();
    let mut subnet = crate::subnet::TestSubnet::start(4).await;
    let urls: Vec<String> = subnet.replicas.iter().map(|r| r.url()).collect();
    let agent = connect(&urls[0], None).await;
    let counter = deploy(&agent, "counter", args(())).await;
    let environment = [
        ("OPENIC_URL", urls[1].clone()),
        ("OPENIC_URLS", urls[1..].join(",")),
        ("CANISTER_ID", counter.to_text()),
    ];
    let output =
        tokio::task::spawn_blocking(move || run_node(&["--test", "flow.test.mjs"], &environment))
            .await
            .expect("the node:test thread");
    println!("{output}");
    wait_until("the JS agent's updates to reach replica 0", || async {
        counter_value(&agent, counter).await == 2
    })
    .await;
    subnet.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn motoko_canister_runs() {
    openic_tests::require_node();
    let build_dir = tempfile::tempdir().expect("temporary directory");
    let wasm_path = build_dir.path().join("counter.wasm");
    let wasm_path_text = wasm_path.to_str().expect("UTF-8 temp path").to_string();
    tokio::task::spawn_blocking(move || run_node(&["motoko.mjs", &wasm_path_text], &[]))
        .await
        .expect("the moc thread");
    let wasm = std::fs::read(&wasm_path).expect("motoko.mjs wrote the wasm");
    assert_eq!(&wasm[..4], b"\0asm", "moc output is a wasm module");

    let mut node = TestNode::start().await;
    let agent = node.agent().await;
    let canister_id = create_canister(&agent).await;
    install(
        &agent,
        canister_id,
        &wasm,
        CanisterInstallMode::Install,
        args(()),
    )
    .await;

    let (first,): (u64,) = update(&agent, canister_id, "inc", args(())).await;
    let (second,): (u64,) = update(&agent, canister_id, "inc", args(())).await;
    assert_eq!((first, second), (1, 2));
    let (value,): (u64,) = query(&agent, canister_id, "get", args(())).await;
    assert_eq!(value, 2);

    // Enhanced orthogonal persistence: the heap (wasm64 memory) is kept across the upgrade.
    let keep = CanisterInstallMode::Upgrade(Some(UpgradeFlags {
        skip_pre_upgrade: None,
        wasm_memory_persistence: Some(WasmMemoryPersistence::Keep),
    }));
    install(&agent, canister_id, &wasm, keep, args(())).await;
    let (value,): (u64,) = query(&agent, canister_id, "get", args(())).await;
    assert_eq!(
        value, 2,
        "the persistent actor's variable survives an upgrade with wasm_memory_persistence = keep"
    );
    let (third,): (u64,) = update(&agent, canister_id, "inc", args(())).await;
    assert_eq!(third, 3);

    // Its log: Debug prints and the trap, kept across the upgrade.
    let error = try_update::<()>(&agent, canister_id, "boom", args(()))
        .await
        .expect_err("boom traps");
    assert!(error.to_string().contains("motoko boom"), "{error}");
    let (logs,) = ic_utils::interfaces::ManagementCanister::create(&agent)
        .fetch_canister_logs(
            &ic_utils::interfaces::management_canister::FetchCanisterLogsArgs {
                canister_id,
                filter: None,
            },
        )
        .call()
        .await
        .expect("fetch_canister_logs");
    let lines: Vec<String> = logs
        .canister_log_records
        .iter()
        .map(|record| String::from_utf8_lossy(&record.content).into_owned())
        .collect();
    assert_eq!(
        lines,
        ["inc 1", "inc 2", "inc 3", "[TRAP]: motoko boom"],
        "a Motoko canister's log"
    );

    // A snapshot of the wasm64 canister restores its persistent heap.
    let management = ic_utils::interfaces::ManagementCanister::create(&agent);
    let (snapshot,) = management
        .take_canister_snapshot(&ic_management_canister_types::TakeCanisterSnapshotArgs {
            canister_id,
            replace_snapshot: None,
            uninstall_code: None,
            sender_canister_version: None,
        })
        .call_and_wait()
        .await
        .expect("take_canister_snapshot");
    let (fourth,): (u64,) = update(&agent, canister_id, "inc", args(())).await;
    assert_eq!(fourth, 4);
    management
        .load_canister_snapshot(&ic_management_canister_types::LoadCanisterSnapshotArgs {
            canister_id,
            snapshot_id: snapshot.id,
            sender_canister_version: None,
        })
        .call_and_wait()
        .await
        .expect("load_canister_snapshot");
    let (value,): (u64,) = query(&agent, canister_id, "get", args(())).await;
    assert_eq!(value, 3, "the snapshot's heap is back");
    let (next,): (u64,) = update(&agent, canister_id, "inc", args(())).await;
    assert_eq!(next, 4);
    node.shutdown().await;
}
