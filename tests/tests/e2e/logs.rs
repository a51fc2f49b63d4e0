//! Canister logs through ic-utils' `fetch_canister_logs` (a query signed and verified as ic-agent
//! does by default): what replicated executions print and why they trap, in the IC's record
//! format, following `log_visibility`, with filters, kept across an upgrade and a restart and
//! purged by a reinstall.

use crate::support::*;
use candid::Principal;
use ic_agent::Agent;
use ic_agent::identity::BasicIdentity;
use ic_utils::call::SyncCall as _;
use ic_utils::interfaces::ManagementCanister;
use ic_utils::interfaces::management_canister::builders::CanisterInstallMode;
use ic_utils::interfaces::management_canister::{
    CanisterLogFilter, CanisterLogRecord, FetchCanisterLogsArgs, LogVisibility,
};

async fn try_fetch(
    agent: &Agent,
    canister: Principal,
    filter: Option<CanisterLogFilter>,
) -> Result<Vec<CanisterLogRecord>, ic_agent::AgentError> {
    let (result,) = ManagementCanister::create(agent)
        .fetch_canister_logs(&FetchCanisterLogsArgs {
            canister_id: canister,
            filter,
        })
        .call()
        .await?;
    Ok(result.canister_log_records)
}

async fn fetch(agent: &Agent, canister: Principal) -> Vec<CanisterLogRecord> {
    try_fetch(agent, canister, None)
        .await
        .unwrap_or_else(|error| panic!("fetch_canister_logs of {canister} failed: {error}"))
}

/// The controller's identity (a fixed key, so the restarted node's agent is the same controller).
fn owner() -> Option<Box<dyn ic_agent::Identity>> {
    Some(Box::new(BasicIdentity::from_raw_key(&[1; 32])))
}

fn contents(records: &[CanisterLogRecord]) -> Vec<String> {
    records
        .iter()
        .map(|record| String::from_utf8_lossy(&record.content).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_record_prints_and_traps_follow_visibility_and_survive_upgrade_and_restart() {
    let mut node = TestNode::start().await;
    let agent = connect(&node.url(), owner()).await;
    let counter = deploy(&agent, "counter", args((Some(5u64),))).await;

    let () = update(&agent, counter, "print", args(("hello",))).await;
    let error = try_update::<()>(&agent, counter, "trap_after_write", args(()))
        .await
        .expect_err("trap_after_write traps");
    assert!(error.to_string().contains("deliberate trap"), "{error}");
    // A query answered by one replica is not logged; the same method run replicated is.
    let () = query(&agent, counter, "print_query", args(("not logged",))).await;
    let () = update(&agent, counter, "print_query", args(("replicated query",))).await;

    let records = fetch(&agent, counter).await;
    assert_eq!(
        contents(&records),
        [
            "init: counter at 5",
            "hello",
            "[TRAP]: trap_after_write: deliberate trap after changing state",
            "replicated query",
        ]
    );
    for (expected_idx, record) in records.iter().enumerate() {
        assert_eq!(record.idx, expected_idx as u64);
    }
    assert!(
        records
            .windows(2)
            .all(|pair| pair[0].timestamp_nanos <= pair[1].timestamp_nanos)
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    let first = records[0].timestamp_nanos;
    assert!(
        first <= now && now - first < 600_000_000_000,
        "timestamps are block times: {first} vs now {now}"
    );

    // Filters: inclusive index and timestamp ranges.
    let by_idx = try_fetch(
        &agent,
        counter,
        Some(CanisterLogFilter::ByIdx { start: 1, end: 2 }),
    )
    .await
    .unwrap();
    assert_eq!(by_idx.iter().map(|r| r.idx).collect::<Vec<_>>(), [1, 2]);
    let last = records[3].timestamp_nanos;
    let by_time = try_fetch(
        &agent,
        counter,
        Some(CanisterLogFilter::ByTimestampNanos {
            start: last,
            end: u64::MAX,
        }),
    )
    .await
    .unwrap();
    assert_eq!(by_time.last().unwrap().idx, 3);

    // canister_status counts the log.
    let (status,) = ManagementCanister::create(&agent)
        .canister_status(&counter)
        .call()
        .await
        .unwrap();
    let log_bytes: u64 = records.iter().map(|r| 40 + r.content.len() as u64).sum();
    assert_eq!(
        status.memory_metrics.log_memory_store_size,
        candid::Nat::from(log_bytes)
    );

    // Visibility: only controllers by default, then allowed viewers, then anyone.
    let stranger = connect(
        &node.url(),
        Some(Box::new(BasicIdentity::from_raw_key(&[9; 32]))),
    )
    .await;
    let refused = try_fetch(&stranger, counter, None)
        .await
        .expect_err("a non-controller may not read the logs by default");
    assert!(
        reject_of(&refused).is_some_and(|reject| reject.reject_message.contains("log")),
        "{refused}"
    );
    let stranger_id = stranger.get_principal().unwrap();
    let management = ManagementCanister::create(&agent);
    management
        .update_settings(&counter)
        .with_log_visibility(LogVisibility::AllowedViewers(vec![stranger_id]))
        .call_and_wait()
        .await
        .unwrap();
    assert_eq!(fetch(&stranger, counter).await.len(), 4);
    let anonymous = connect(&node.url(), None).await;
    assert!(try_fetch(&anonymous, counter, None).await.is_err());
    management
        .update_settings(&counter)
        .with_log_visibility(LogVisibility::Public)
        .call_and_wait()
        .await
        .unwrap();
    assert_eq!(fetch(&anonymous, counter).await.len(), 4);

    // `openic logs` prints the same records (public now, so its own identity may read them).
    let cli_home = tempfile::tempdir().unwrap();
    let cli_args: Vec<std::ffi::OsString> = vec![
        "logs".into(),
        counter.to_text().into(),
        "--url".into(),
        node.url().into(),
        "--identity".into(),
        cli_home.path().join("identity.pem").into(),
    ];
    let printed = tokio::task::spawn_blocking(move || openic_tests::run_openic(&cli_args))
        .await
        .unwrap();
    let lines: Vec<&str> = printed.lines().collect();
    assert_eq!(lines.len(), 4, "{printed}");
    assert!(
        lines[0].starts_with("[0. 20") && lines[0].ends_with("Z]: init: counter at 5"),
        "{printed}"
    );
    assert!(lines[3].ends_with("]: replicated query"), "{printed}");

    // An upgrade keeps the log and appends what post_upgrade printed.
    let wasm = openic_tests::test_canister_wasm("counter");
    install(
        &agent,
        counter,
        &wasm,
        CanisterInstallMode::Upgrade(None),
        args(()),
    )
    .await;
    let upgraded = fetch(&agent, counter).await;
    assert_eq!(upgraded.len(), 5);
    assert_eq!(contents(&upgraded)[4], "post_upgrade: counter at 5");

    // A restart keeps the log (it is part of the checkpointed state).
    node.shutdown().await;
    drop((agent, stranger, anonymous));
    let restarted = start_node_in(node.state_dir.path()).await;
    let agent = connect(&restarted.url(), owner()).await;
    let after_restart = fetch(&agent, counter).await;
    assert_eq!(after_restart, upgraded);
    let () = update(&agent, counter, "print", args(("after restart",))).await;
    let appended = fetch(&agent, counter).await;
    assert_eq!(appended.last().unwrap().idx, 5);

    // A reinstall purges the log; indexes keep counting.
    install(
        &agent,
        counter,
        &wasm,
        CanisterInstallMode::Reinstall,
        args((Some(1u64),)),
    )
    .await;
    let reinstalled = fetch(&agent, counter).await;
    assert_eq!(contents(&reinstalled), ["init: counter at 1"]);
    assert_eq!(reinstalled[0].idx, 6);
    restarted.shutdown().await;
}
