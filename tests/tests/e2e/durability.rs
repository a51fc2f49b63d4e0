//! Durability: what a certified reply promised survives clean shutdowns and crashes.

use crate::support::*;
use openic_tests::OpenicProcess;

/// Updates made before each restart.
const UPDATES_BEFORE_RESTART: u64 = 5;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_a_clean_restart_in_process() {
    let mut node = TestNode::start().await;
    let root_key = node.root_key_der();
    let agent = node.agent().await;
    let counter = deploy(&agent, "counter", args(())).await;
    for expected in 1..=UPDATES_BEFORE_RESTART {
        let (value,): (u64,) = update(&agent, counter, "inc", args(())).await;
        assert_eq!(value, expected);
    }
    let () = update(&agent, counter, "stable_write", args((77u64,))).await;
    node.shutdown().await;
    drop(agent);

    let restarted = start_node_in(node.state_dir.path()).await;
    assert_eq!(
        restarted.root_key_der(),
        root_key,
        "the root key is persistent"
    );
    let agent = connect(&restarted.url(), None).await;
    assert_eq!(counter_value(&agent, counter).await, UPDATES_BEFORE_RESTART);
    let (stored,): (u64,) = query(&agent, counter, "stable_read", args(())).await;
    assert_eq!(stored, 77);
    let (value,): (u64,) = update(&agent, counter, "inc", args(())).await;
    assert_eq!(
        value,
        UPDATES_BEFORE_RESTART + 1,
        "the restarted node keeps executing"
    );
    let fresh = create_canister(&agent).await;
    assert_ne!(
        fresh, counter,
        "canister ids are not reused after a restart"
    );
    restarted.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_sigkill_of_the_process() {
    let state_dir = tempfile::tempdir().expect("temporary state directory");
    let process = OpenicProcess::start(state_dir.path());
    let root_key = process.root_key_der().to_vec();
    let agent = connect(process.url(), None).await;
    assert_eq!(
        agent.read_root_key(),
        root_key,
        "/api/v2/status serves the printed root key"
    );
    let counter = deploy(&agent, "counter", args(())).await;
    // Every update returns only after its certified reply; so each of them must survive the crash.
    for expected in 1..=UPDATES_BEFORE_RESTART {
        let (value,): (u64,) = update(&agent, counter, "inc", args(())).await;
        assert_eq!(value, expected);
    }
    let pid = process.pid();
    process.kill();
    drop(agent);

    let process = OpenicProcess::start(state_dir.path());
    assert_ne!(process.pid(), pid);
    assert_eq!(
        process.root_key_der(),
        root_key.as_slice(),
        "the root key is persistent"
    );
    let agent = connect(process.url(), None).await;
    let value = counter_value(&agent, counter).await;
    assert_eq!(
        value,
        UPDATES_BEFORE_RESTART,
        "after SIGKILL the counter must hold every certified update.\n--- openic output ---\n{}",
        process.output()
    );
    let (value,): (u64,) = update(&agent, counter, "inc", args(())).await;
    assert_eq!(value, UPDATES_BEFORE_RESTART + 1);
    process.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_shuts_down_cleanly_and_keeps_state() {
    let state_dir = tempfile::tempdir().expect("temporary state directory");
    let process = OpenicProcess::start(state_dir.path());
    let agent = connect(process.url(), None).await;
    let counter = deploy(&agent, "counter", args((Some(41u64),))).await;
    let (value,): (u64,) = update(&agent, counter, "inc", args(())).await;
    assert_eq!(value, 42);
    let output_before = process.output();
    let exit = process.terminate();
    assert!(
        exit.success(),
        "openic should exit 0 on SIGTERM, got {exit}.\n--- output ---\n{output_before}"
    );
    drop(agent);

    let process = OpenicProcess::start(state_dir.path());
    let agent = connect(process.url(), None).await;
    assert_eq!(counter_value(&agent, counter).await, 42);
    let exit = process.terminate();
    assert!(exit.success(), "second SIGTERM: {exit}");
}

/// Concurrent clients while the process is killed.
const CONCURRENT_CLIENTS: usize = 4;
/// How long the clients run before SIGKILL.
const LOAD_BEFORE_KILL: std::time::Duration = std::time::Duration::from_millis(2500);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_concurrent_updates_loses_no_certified_update() {
    let state_dir = tempfile::tempdir().expect("temporary state directory");
    let process = OpenicProcess::start(state_dir.path());
    let agent = connect(process.url(), None).await;
    let counter = deploy(&agent, "counter", args(())).await;

    // Each client keeps calling `inc` and remembers the highest value it got a certified reply for.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut clients = Vec::new();
    for _ in 0..CONCURRENT_CLIENTS {
        let agent = agent.clone();
        let stop = stop.clone();
        clients.push(tokio::spawn(async move {
            let mut highest_certified = 0u64;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                match try_update::<(u64,)>(&agent, counter, "inc", args(())).await {
                    Ok((value,)) => highest_certified = highest_certified.max(value),
                    // Calls in flight when the process dies fail; that is expected.
                    Err(_) => break,
                }
            }
            highest_certified
        }));
    }
    tokio::time::sleep(LOAD_BEFORE_KILL).await;
    process.kill();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut highest_certified = 0;
    for client in clients {
        highest_certified = highest_certified.max(client.await.expect("client task"));
    }
    assert!(
        highest_certified > 0,
        "no update was answered within {LOAD_BEFORE_KILL:?}"
    );
    drop(agent);

    let process = OpenicProcess::start(state_dir.path());
    let agent = connect(process.url(), None).await;
    let value = counter_value(&agent, counter).await;
    assert!(
        value >= highest_certified,
        "a certified reply said the counter reached {highest_certified}, but after SIGKILL and restart it is \
         {value}.\n--- openic output ---\n{}",
        process.output()
    );
    process.kill();
}
