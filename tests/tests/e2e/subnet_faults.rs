//! Faults in a four-replica subnet (n = 4, f = 1) of real `openic` processes, driven by the unmodified
//! ic-agent with its default verification: the CLI's `openic start --replicas 4`, a replica crashing under
//! load, two replicas down (finality stops, and resumes when one returns), a crashed replica catching up
//! from its checkpoint, a wiped replica rejoining by state sync, a replica whose state diverged from the
//! subnet's (a corrupted checkpoint) stopping, saying so and recovering by state sync, and the whole subnet
//! restarting with the same root key.
//!
//! Every test ends by asking each running replica for the counter's value: they must all answer the same.
//! Timeouts are generous (the machine may be busy with other test binaries); no test relies on timing to
//! pass, only to fail in bounded time.

use crate::support::*;
use candid::Principal;
use ic_agent::agent::{CallResponse, RequestStatusResponse};
use ic_agent::{Agent, AgentError, RequestId};
use openic_tests::{OpenicProcess, SubnetProcesses, free_loopback_ports, is_process_alive};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Members of every subnet here: tolerates one faulty replica.
const REPLICAS: u16 = 4;
/// How long a replica may take to reach the subnet's state (a restart, a catch-up, a resumed finality).
const CONVERGENCE_TIMEOUT: Duration = Duration::from_secs(180);
/// How long an update call may take to be answered once the subnet can finalize again.
const RESUMED_UPDATE_TIMEOUT: Duration = Duration::from_secs(180);
/// How long finality is watched to show that it stopped.
const STALLED_WATCH: Duration = Duration::from_secs(10);

/// An agent for `url` (default verification) that must serve `root_key`.
async fn agent_for(url: &str, root_key: &[u8]) -> Agent {
    let agent = connect(url, None).await;
    assert_eq!(
        agent.read_root_key(),
        root_key,
        "{url} serves another root key than the subnet's"
    );
    agent
}

/// Agents for every running member of `subnet` (`None` for the others), indexed by member.
async fn agents_for(subnet: &SubnetProcesses) -> Vec<Option<Agent>> {
    let mut agents = Vec::new();
    for index in 0..subnet.replica_count() {
        agents.push(if subnet.is_running(index) {
            Some(agent_for(subnet.url(index), subnet.root_key_der()).await)
        } else {
            None
        });
    }
    agents
}

/// The height the replica behind `agent` last certified (from `/api/v2/status`), if it says.
async fn certified_height(agent: &Agent) -> Option<u64> {
    let status = agent.status().await.ok()?;
    match status.values.get("certified_height").map(|value| &**value) {
        Some(ic_agent::agent::status::Value::Integer(height)) => u64::try_from(*height).ok(),
        _ => None,
    }
}

/// Polls `condition` every 250 ms until it holds; panics after `timeout` with `what` and the last
/// observation it returned.
async fn wait_for(
    what: &str,
    timeout: Duration,
    mut condition: impl AsyncFnMut() -> Result<(), String>,
) {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match condition().await {
            Ok(()) => return,
            Err(last) => last,
        };
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; last observation: {last}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The counter's value at the replica behind `agent`, or why it did not answer.
async fn counter_at(agent: &Agent, counter: Principal) -> Result<u64, String> {
    try_query::<(u64,)>(agent, counter, "get", args(()))
        .await
        .map(|(value,)| value)
        .map_err(|error| error.to_string())
}

/// Waits until every URL answers `expected` for the counter (each a fresh agent checking `root_key`).
async fn assert_converged(urls: &[String], root_key: &[u8], counter: Principal, expected: u64) {
    for url in urls {
        let agent = agent_for(url, root_key).await;
        wait_for(
            &format!("{url} to answer counter = {expected}"),
            CONVERGENCE_TIMEOUT,
            async || match counter_at(&agent, counter).await {
                Ok(value) if value == expected => Ok(()),
                other => Err(format!("{other:?}")),
            },
        )
        .await;
    }
}

/// The URLs of the running members.
fn running_urls(subnet: &SubnetProcesses) -> Vec<String> {
    subnet
        .running()
        .into_iter()
        .map(|index| subnet.url(index).to_string())
        .collect()
}

/// `inc` through `agent`, which must succeed; returns the new value.
async fn inc(agent: &Agent, counter: Principal) -> u64 {
    let (value,): (u64,) = update(agent, counter, "inc", args(())).await;
    value
}

/// Signs an `inc` call with `agent`'s identity (anonymous): the same bytes can be sent to any replica.
fn sign_inc(agent: &Agent, counter: Principal) -> (RequestId, Vec<u8>) {
    let signed = agent
        .update(&counter, "inc")
        .with_arg(args(()))
        .sign()
        .expect("signing an update");
    (signed.request_id, signed.signed_update)
}

/// Decodes the reply of `inc`.
fn decode_inc(reply: &[u8]) -> u64 {
    let (value,): (u64,) = candid::decode_args(reply).expect("the reply of inc is a Candid nat64");
    value
}

/// Sends the signed call to the replica behind `agent` and waits for its certified reply there.
async fn submit_signed(
    agent: &Agent,
    counter: Principal,
    request_id: RequestId,
    signed: &[u8],
) -> Result<u64, AgentError> {
    match agent.update_signed(counter, signed.to_vec()).await? {
        CallResponse::Response(reply) => Ok(decode_inc(&reply)),
        CallResponse::Poll(polled) => {
            assert_eq!(polled, request_id, "the agent polls the request it sent");
            let (reply, _certificate) = agent.wait(&request_id, counter).await?;
            Ok(decode_inc(&reply))
        }
    }
}

/// Polls the status of `request_id` at the replica behind `agent` until it is replied; panics after
/// `timeout` or on a reject.
async fn wait_for_reply(
    agent: &Agent,
    counter: Principal,
    request_id: RequestId,
    timeout: Duration,
) -> u64 {
    let deadline = Instant::now() + timeout;
    loop {
        let status = agent.request_status_raw(&request_id, counter).await;
        match status {
            Ok((RequestStatusResponse::Replied(reply), _)) => return decode_inc(&reply.arg),
            Ok((RequestStatusResponse::Rejected(reject), _)) => {
                panic!("request {request_id} was rejected: {reject:?}")
            }
            other => assert!(
                Instant::now() < deadline,
                "request {request_id} got no reply within {timeout:?}; last status {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Runs `blocking` (process start, restart or stop) without stalling the runtime's other tasks.
fn blocking<T>(blocking: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(blocking)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openic_start_replicas_serves_a_subnet() {
    let state_dir = tempfile::tempdir().expect("a temporary state directory");
    let p2p_port = free_loopback_ports(REPLICAS);
    let process = blocking(|| OpenicProcess::start_subnet(state_dir.path(), REPLICAS, p2p_port));
    let urls = process.urls().to_vec();
    assert_eq!(
        urls.len(),
        usize::from(REPLICAS),
        "one url line per replica"
    );
    assert_eq!(
        urls.iter().collect::<BTreeSet<_>>().len(),
        urls.len(),
        "every replica has its own URL: {urls:?}"
    );
    let root_key = process.root_key_der().to_vec();
    let replicas = process.child_pids();
    assert_eq!(
        replicas.len(),
        usize::from(REPLICAS),
        "openic start runs one child process per replica"
    );

    let mut agents = Vec::new();
    for url in &urls {
        agents.push(agent_for(url, &root_key).await);
    }
    let counter = deploy(&agents[0], "counter", args((Some(5u64),))).await;
    assert_eq!(inc(&agents[1], counter).await, 6);
    wait_for(
        "the third replica to answer 6",
        CONVERGENCE_TIMEOUT,
        async || match counter_at(&agents[2], counter).await {
            Ok(6) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    assert_converged(&urls, &root_key, counter, 6).await;
    drop(agents);

    let output = process.output();
    let exit = blocking(|| process.terminate());
    assert!(
        exit.success(),
        "openic start should exit 0 on SIGTERM, got {exit}.\n--- output ---\n{output}"
    );
    // It waited for its children, so they are gone (not orphaned).
    let deadline = Instant::now() + Duration::from_secs(10);
    while replicas.iter().any(|pid| is_process_alive(*pid)) {
        assert!(
            Instant::now() < deadline,
            "replica processes {replicas:?} outlived openic start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Replicas started by `openic start --replicas` stop (cleanly) when it dies, even by SIGKILL,
/// instead of holding their ports and state directories.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_stop_when_openic_start_is_killed() {
    let state_dir = tempfile::tempdir().expect("a temporary state directory");
    let p2p_port = free_loopback_ports(REPLICAS);
    let process = blocking(|| OpenicProcess::start_subnet(state_dir.path(), REPLICAS, p2p_port));
    let replicas = process.child_pids();
    assert_eq!(replicas.len(), usize::from(REPLICAS));
    blocking(|| process.kill_parent_only());
    let deadline = Instant::now() + Duration::from_secs(60);
    while replicas.iter().any(|pid| is_process_alive(*pid)) {
        if Instant::now() >= deadline {
            for pid in &replicas {
                let _ = std::process::Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
            panic!("replica processes {replicas:?} outlived a killed openic start");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Concurrent clients in the crash test.
const CLIENTS: usize = 2;
/// Acknowledged updates before the replica is killed, and after.
const UPDATES_BEFORE_KILL: usize = 10;
const UPDATES_AFTER_KILL: usize = 20;

/// Locks `mutex`, ignoring poisoning (a panicking client must not hide what the others recorded).
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What the load clients saw.
#[derive(Default)]
struct LoadRecord {
    /// The value of every acknowledged `inc` reply.
    acknowledged: Vec<u64>,
    /// Calls that failed at a replica that was never killed (there must be none).
    failures_at_live_replicas: Vec<String>,
    /// Calls that failed at the killed replica and were sent again to a live one.
    resent: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_replica_killed_under_load_the_subnet_keeps_serving() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut subnet = blocking(|| SubnetProcesses::start(dir.path(), REPLICAS));
    let agents: Arc<Vec<Agent>> = Arc::new(
        agents_for(&subnet)
            .await
            .into_iter()
            .map(|agent| agent.expect("every replica runs"))
            .collect(),
    );
    let counter = deploy(&agents[0], "counter", args(())).await;
    const VICTIM: usize = 3;

    // Each client sends each call to the next replica in turn (skipping a killed one). A call that fails
    // at the victim (in flight when it was killed) is sent again, the same signed bytes, to a live replica
    // and waited for there: it runs at most once, so afterwards every executed `inc` is acknowledged.
    let victim_killed = Arc::new(AtomicBool::new(false));
    let in_flight_at_victim = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let record = Arc::new(Mutex::new(LoadRecord::default()));
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        let (agents, victim_killed, in_flight_at_victim, stop, record) = (
            agents.clone(),
            victim_killed.clone(),
            in_flight_at_victim.clone(),
            stop.clone(),
            record.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut turn = client;
            while !stop.load(Ordering::SeqCst) {
                let mut target = turn % agents.len();
                turn += 1;
                if target == VICTIM && victim_killed.load(Ordering::SeqCst) {
                    continue;
                }
                let (request_id, signed) = sign_inc(&agents[target], counter);
                let mut attempts = 0;
                let value = loop {
                    attempts += 1;
                    let at_victim = target == VICTIM;
                    if at_victim {
                        in_flight_at_victim.fetch_add(1, Ordering::SeqCst);
                    }
                    let sent = submit_signed(&agents[target], counter, request_id, &signed).await;
                    if at_victim {
                        in_flight_at_victim.fetch_sub(1, Ordering::SeqCst);
                    }
                    match sent {
                        Ok(value) => break value,
                        Err(error) => {
                            let mut record = lock(&record);
                            if target == VICTIM {
                                record.resent += 1;
                            } else {
                                record.failures_at_live_replicas.push(format!(
                                    "replica {target}, request {request_id}: {error}"
                                ));
                            }
                            drop(record);
                            assert!(
                                attempts < 10,
                                "request {request_id} failed {attempts} times, last at replica {target}: {error}"
                            );
                            // The victim: it only fails once killed. Another live replica then.
                            target = (target + 1) % agents.len();
                            if target == VICTIM {
                                target = (target + 1) % agents.len();
                            }
                        }
                    }
                };
                lock(&record).acknowledged.push(value);
            }
        }));
    }
    let acknowledged = || lock(&record).acknowledged.len();
    wait_for(
        "the first updates under load",
        CONVERGENCE_TIMEOUT,
        async || match acknowledged() {
            count if count >= UPDATES_BEFORE_KILL => Ok(()),
            count => Err(format!("{count} acknowledged")),
        },
    )
    .await;
    // Kill it while it has a call in flight if that happens soon (it usually does: one call in four goes
    // there), so the clients also meet calls cut off by the crash.
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_flight_at_victim.load(Ordering::SeqCst) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    blocking(|| subnet.kill(VICTIM));
    victim_killed.store(true, Ordering::SeqCst);
    let at_kill = acknowledged();
    wait_for(
        "updates through the three live replicas",
        CONVERGENCE_TIMEOUT,
        async || match acknowledged() {
            count if count >= at_kill + UPDATES_AFTER_KILL => Ok(()),
            count => Err(format!(
                "{count} acknowledged, {at_kill} when the replica was killed"
            )),
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for client in clients {
        client.await.expect("a load client panicked");
    }

    let record = std::mem::take(&mut *lock(&record));
    assert!(
        record.failures_at_live_replicas.is_empty(),
        "calls failed at replicas that were never killed: {:#?}",
        record.failures_at_live_replicas
    );
    // Every `inc` returns the value it made: exactly once each, no gaps, none lost.
    let total = record.acknowledged.len() as u64;
    eprintln!(
        "{total} updates acknowledged ({at_kill} before the kill); {} sent again after failing at the \
         killed replica",
        record.resent
    );
    let values: BTreeSet<u64> = record.acknowledged.iter().copied().collect();
    assert_eq!(
        values.len() as u64,
        total,
        "two acknowledged replies carry the same value: an update ran twice or a reply was wrong"
    );
    assert_eq!(
        values,
        (1..=total).collect::<BTreeSet<u64>>(),
        "acknowledged values are not 1..={total}"
    );
    assert_converged(
        &running_urls(&subnet),
        subnet.root_key_der(),
        counter,
        total,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_killed_finality_stops_and_resumes() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut subnet = blocking(|| SubnetProcesses::start(dir.path(), REPLICAS));
    let agents = agents_for(&subnet).await;
    let live = |index: usize| agents[index].as_ref().expect("replica runs");
    let counter = deploy(live(0), "counter", args(())).await;
    assert_eq!(inc(live(1), counter).await, 1);

    // Two of four down: 2f + 1 = 3 votes (and certification shares) can no longer be had.
    blocking(|| {
        subnet.kill(2);
        subnet.kill(3);
    });
    // Let what was in flight settle: the certified height stops moving.
    let mut previous = None;
    let settle_deadline = Instant::now() + CONVERGENCE_TIMEOUT;
    let stalled_at = loop {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let now = (
            certified_height(live(0)).await,
            certified_height(live(1)).await,
        );
        if previous == Some(now) && now.0.is_some() {
            break now;
        }
        assert!(
            Instant::now() < settle_deadline,
            "the certified height kept moving with two of four replicas down: {previous:?} -> {now:?}"
        );
        previous = Some(now);
    };

    let (request_id, signed) = sign_inc(live(0), counter);
    let sent = tokio::time::timeout(
        STALLED_WATCH,
        submit_signed(live(0), counter, request_id, &signed),
    )
    .await;
    match sent {
        Ok(Ok(value)) => {
            panic!("an update completed ({value}) with only two of four replicas running")
        }
        Ok(Err(error)) => eprintln!("the update sent while finality stopped failed: {error}"),
        Err(_elapsed) => {
            eprintln!("the update sent while finality stopped got no reply in {STALLED_WATCH:?}")
        }
    }
    for index in [0, 1] {
        let status = live(index).request_status_raw(&request_id, counter).await;
        assert!(
            !matches!(status, Ok((RequestStatusResponse::Replied(_), _))),
            "replica {index} certified a reply with only two of four replicas running"
        );
    }
    assert_eq!(
        (
            certified_height(live(0)).await,
            certified_height(live(1)).await
        ),
        stalled_at,
        "the certified height moved with only two of four replicas running"
    );

    // One back: three of four can finalize and certify again; the waiting call completes.
    blocking(|| subnet.restart(2));
    assert_eq!(
        wait_for_reply(live(0), counter, request_id, RESUMED_UPDATE_TIMEOUT).await,
        2,
        "the call sent while finality stopped runs once it resumes"
    );
    let restarted = agent_for(subnet.url(2), subnet.root_key_der()).await;
    wait_for(
        "the restarted replica to catch up",
        CONVERGENCE_TIMEOUT,
        async || match counter_at(&restarted, counter).await {
            Ok(2) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    assert_eq!(inc(&restarted, counter).await, 3);

    blocking(|| subnet.restart(3));
    assert_converged(&running_urls(&subnet), subnet.root_key_der(), counter, 3).await;
}

/// The height in the last `state loaded height=<h>` line of a replica's log.
fn last_loaded_height(log: &str) -> Option<u64> {
    logged_number(log, "state loaded", "height")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_restarts_from_its_checkpoint_and_catches_up() {
    const UPDATES_BEFORE_KILL: u64 = 5;
    const UPDATES_WHILE_DOWN: u64 = 20;
    const VICTIM: usize = 3;
    /// Heights between checkpoints: small, so the victim has one before it is killed.
    const CATCH_UP_INTERVAL: u64 = 16;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut subnet = blocking(|| {
        SubnetProcesses::start_with_catch_up_interval(dir.path(), REPLICAS, Some(CATCH_UP_INTERVAL))
    });
    let agents = agents_for(&subnet).await;
    let live = |index: usize| agents[index].as_ref().expect("replica runs");
    let counter = deploy(live(0), "counter", args(())).await;
    for expected in 1..=UPDATES_BEFORE_KILL {
        let via = expected as usize % usize::from(REPLICAS);
        assert_eq!(inc(live(via), counter).await, expected);
    }
    // The victim has the state the subnet certified: it crashes with something to restart from.
    wait_for(
        "the victim to hold the certified state",
        CONVERGENCE_TIMEOUT,
        async || match counter_at(live(VICTIM), counter).await {
            Ok(UPDATES_BEFORE_KILL) => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    // ...and a checkpoint of it (one at every multiple of the interval).
    wait_for(
        "the victim to pass a checkpoint height after the updates",
        CONVERGENCE_TIMEOUT,
        async || match certified_height(live(VICTIM)).await {
            Some(height) if height > CATCH_UP_INTERVAL + 4 => Ok(()),
            other => Err(format!("certified height {other:?}")),
        },
    )
    .await;
    let victim_height = certified_height(live(VICTIM))
        .await
        .expect("the victim reports its certified height");

    blocking(|| subnet.kill(VICTIM));
    let expected = UPDATES_BEFORE_KILL + UPDATES_WHILE_DOWN;
    for update in 0..UPDATES_WHILE_DOWN {
        let via = update as usize % 3;
        assert_eq!(
            inc(live(via), counter).await,
            UPDATES_BEFORE_KILL + update + 1
        );
    }
    let mut subnet_height = 0;
    for index in 0..3 {
        subnet_height = subnet_height.max(certified_height(live(index)).await.unwrap_or(0));
    }

    blocking(|| subnet.restart(VICTIM));
    let loaded = last_loaded_height(&subnet.output(VICTIM));
    assert!(
        loaded.is_some_and(|height| height > 0),
        "the restarted replica should load its state from its checkpoint and block log, not from \
         genesis (logged height {loaded:?}; it had certified height {victim_height} before the crash)"
    );
    let restarted = agent_for(subnet.url(VICTIM), subnet.root_key_der()).await;
    wait_for(
        "the restarted replica to catch up",
        CONVERGENCE_TIMEOUT,
        async || {
            let value = counter_at(&restarted, counter).await;
            let height = certified_height(&restarted).await;
            match (&value, height) {
                (Ok(value), Some(height)) if *value == expected && height >= subnet_height => {
                    Ok(())
                }
                _ => Err(format!(
                    "counter {value:?}, certified height {height:?} (the others had {subnet_height})"
                )),
            }
        },
    )
    .await;
    // It takes part again: an update through it.
    assert_eq!(inc(&restarted, counter).await, expected + 1);
    assert_converged(
        &running_urls(&subnet),
        subnet.root_key_der(),
        counter,
        expected + 1,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_subnet_restarts_with_the_same_root_key() {
    const UPDATES_BEFORE: u64 = 3;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut subnet = blocking(|| SubnetProcesses::start(dir.path(), REPLICAS));
    let root_key = subnet.root_key_der().to_vec();
    let agents = agents_for(&subnet).await;
    let live = |index: usize| agents[index].as_ref().expect("replica runs");
    let counter = deploy(live(0), "counter", args(())).await;
    for expected in 1..=UPDATES_BEFORE {
        assert_eq!(inc(live(expected as usize), counter).await, expected);
    }
    // Every replica holds the certified state before it stops (each then writes a checkpoint).
    assert_converged(&running_urls(&subnet), &root_key, counter, UPDATES_BEFORE).await;
    drop(agents);

    for index in 0..usize::from(REPLICAS) {
        let exit = blocking(|| subnet.terminate(index));
        assert!(
            exit.success(),
            "replica {index} should exit 0 on SIGTERM, got {exit}"
        );
    }
    for index in 0..usize::from(REPLICAS) {
        // `restart` checks the root key each prints against the one the subnet generated.
        blocking(|| subnet.restart(index));
    }
    assert_eq!(subnet.root_key_der(), root_key.as_slice());
    let agents = agents_for(&subnet).await;
    let live = |index: usize| agents[index].as_ref().expect("replica runs");
    assert_converged(&running_urls(&subnet), &root_key, counter, UPDATES_BEFORE).await;
    assert_eq!(inc(live(1), counter).await, UPDATES_BEFORE + 1);
    assert_eq!(inc(live(3), counter).await, UPDATES_BEFORE + 2);
    assert_converged(
        &running_urls(&subnet),
        &root_key,
        counter,
        UPDATES_BEFORE + 2,
    )
    .await;
}

/// The number in `key=<number>` on the last line of `log` that contains `marker`.
/// Waits until replica `index` logs that it installed a state fetched by state sync, and returns
/// the height installed; on a timeout the failure shows the replica's last log lines.
async fn state_sync_installed(subnet: &SubnetProcesses, index: usize, who: &str) -> u64 {
    let installed = |log: &str| logged_number(log, "state sync: installed", "height");
    wait_for(
        &format!("{who} to install the subnet's state by state sync"),
        CONVERGENCE_TIMEOUT,
        async || {
            let log = subnet.output(index);
            match installed(&log) {
                Some(_) => Ok(()),
                None => Err(format!(
                    "no state installed yet; the replica's last log lines:\n{}",
                    log_tail(&log, 8)
                )),
            }
        },
    )
    .await;
    installed(&subnet.output(index)).unwrap_or(0)
}

/// The last `lines` lines of a replica's log, for a failure message.
fn log_tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn logged_number(log: &str, marker: &str, key: &str) -> Option<u64> {
    let line = log.lines().rev().find(|line| line.contains(marker))?;
    let value = line.split(&format!("{key}=")).nth(1)?;
    value
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wiped_replica_rejoins_by_state_sync() {
    /// Heights between the checkpoints the subnet signs: small, so the test sees several.
    const CATCH_UP_INTERVAL: u64 = 16;
    const UPDATES_BEFORE_WIPE: u64 = 6;
    const UPDATES_WHILE_DOWN: u64 = 12;
    const VICTIM: usize = 2;
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut subnet = blocking(|| {
        SubnetProcesses::start_with_catch_up_interval(dir.path(), REPLICAS, Some(CATCH_UP_INTERVAL))
    });
    let agents = agents_for(&subnet).await;
    let live = |index: usize| agents[index].as_ref().expect("replica runs");
    let counter = deploy(live(0), "counter", args(())).await;
    for expected in 1..=UPDATES_BEFORE_WIPE {
        let via = expected as usize % usize::from(REPLICAS);
        assert_eq!(inc(live(via), counter).await, expected);
    }

    blocking(|| subnet.kill(VICTIM));
    let state_dir = subnet.files(VICTIM).state_dir.clone();
    std::fs::remove_dir_all(&state_dir).expect("the victim's state directory can be wiped");
    let others: Vec<usize> = (0..usize::from(REPLICAS))
        .filter(|i| *i != VICTIM)
        .collect();
    let expected = UPDATES_BEFORE_WIPE + UPDATES_WHILE_DOWN;
    for update in 0..UPDATES_WHILE_DOWN {
        let via = others[update as usize % others.len()];
        assert_eq!(
            inc(live(via), counter).await,
            UPDATES_BEFORE_WIPE + update + 1
        );
    }
    // Let the subnet sign a catch-up checkpoint that holds every update above.
    let mut subnet_height = 0;
    for index in &others {
        subnet_height = subnet_height.max(certified_height(live(*index)).await.unwrap_or(0));
    }
    // A replica fetches the state once it is three intervals behind (closer, it replays). It
    // learns how far behind it is from its peers' certification shares, which may arrive after
    // the first blocks it could replay: leave it far enough behind that it hears the subnet's
    // height while it is still replaying (replay stops there and waits for the state).
    let signed_after = subnet_height.max(3 * CATCH_UP_INTERVAL) + 12 * CATCH_UP_INTERVAL;
    wait_for(
        "the subnet to pass another catch-up height",
        CONVERGENCE_TIMEOUT,
        async || match certified_height(live(others[0])).await {
            Some(height) if height >= signed_after => Ok(()),
            other => Err(format!("certified height {other:?}")),
        },
    )
    .await;

    blocking(|| subnet.restart(VICTIM));
    let restarted = agent_for(subnet.url(VICTIM), subnet.root_key_der()).await;
    let installed = state_sync_installed(&subnet, VICTIM, "the wiped replica").await;
    assert!(
        installed >= subnet_height && installed.is_multiple_of(CATCH_UP_INTERVAL),
        "the replica should install a catch-up checkpoint holding every update (at or above \
         height {subnet_height}, a multiple of {CATCH_UP_INTERVAL}); it installed height {installed}"
    );
    wait_for(
        "the wiped replica to follow consensus and serve certified state",
        CONVERGENCE_TIMEOUT,
        async || match counter_at(&restarted, counter).await {
            Ok(value) if value == expected => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    // It takes part again: an update through it, seen by every replica.
    assert_eq!(inc(&restarted, counter).await, expected + 1);
    assert_converged(
        &running_urls(&subnet),
        subnet.root_key_der(),
        counter,
        expected + 1,
    )
    .await;
    // And it restarts from the state it fetched (checkpointed on install), without fetching again.
    blocking(|| subnet.terminate(VICTIM));
    blocking(|| subnet.restart(VICTIM));
    let loaded = last_loaded_height(&subnet.output(VICTIM));
    assert!(
        loaded.is_some_and(|height| height >= installed),
        "after a restart the replica should load the installed state or later (loaded {loaded:?}, \
         installed {installed})"
    );
    let restarted = agent_for(subnet.url(VICTIM), subnet.root_key_der()).await;
    wait_for(
        "the restarted replica to serve the counter",
        CONVERGENCE_TIMEOUT,
        async || match counter_at(&restarted, counter).await {
            Ok(value) if value == expected + 1 => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
}

/// Rewrites the latest checkpoint in `state_dir` (the replica is stopped) with `canister`'s certified
/// data changed, as a faulty disk or a bug in this replica's execution would: a well-formed state that
/// is not the subnet's. Returns the checkpoint's height.
fn corrupt_latest_checkpoint(state_dir: &std::path::Path, canister: Principal) -> u64 {
    use openic_interfaces::CheckpointStore;
    use openic_state_manager::{CheckpointConfig, FileCheckpointStore};
    let open = || {
        FileCheckpointStore::open(state_dir, CheckpointConfig::default())
            .expect("the stopped replica's checkpoints open")
    };
    let mut state = open()
        .load_latest()
        .expect("the latest checkpoint loads")
        .expect("the stopped replica has a checkpoint");
    let height = state.metadata.height;
    let id = openic_types::CanisterId::unchecked_from_principal(canister);
    let canister_state = state
        .canisters
        .get_mut(&id)
        .expect("the checkpoint holds the counter");
    Arc::make_mut(canister_state).system_state.certified_data = b"not the subnet's".to_vec();
    let store = open();
    std::fs::remove_dir_all(store.checkpoint_dir(height)).expect("the checkpoint can be replaced");
    drop(store);
    open()
        .write_checkpoint(&state)
        .expect("the corrupted state is written as a checkpoint");
    height.0
}

/// One sample of a replica's `/metrics`: the value of `name` (no labels), if the replica answers.
async fn metric(url: &str, name: &str) -> Option<f64> {
    let body = reqwest::get(format!("{url}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    body.lines().find_map(|line| {
        line.strip_prefix(name)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn diverged_replica_stops_says_so_and_recovers_by_state_sync() {
    const CATCH_UP_INTERVAL: u64 = 16;
    const UPDATES: u64 = 4;
    const VICTIM: usize = 3;
    const CERTIFIED_DATA: &[u8] = b"the subnet's data";
    let dir = tempfile::tempdir().expect("a temporary directory");
    let mut subnet = blocking(|| {
        SubnetProcesses::start_with_catch_up_interval(dir.path(), REPLICAS, Some(CATCH_UP_INTERVAL))
    });
    let agents = agents_for(&subnet).await;
    let live = |index: usize| agents[index].as_ref().expect("replica runs");
    let counter = deploy(live(0), "counter", args(())).await;
    let () = update(
        live(1),
        counter,
        "set_certified",
        args((CERTIFIED_DATA.to_vec(),)),
    )
    .await;
    for expected in 1..=UPDATES {
        let via = expected as usize % usize::from(REPLICAS);
        assert_eq!(inc(live(via), counter).await, expected);
    }
    // The victim stops cleanly (leaving a checkpoint), and its state is corrupted on disk.
    blocking(|| subnet.terminate(VICTIM));
    let state_dir = subnet.files(VICTIM).state_dir.clone();
    let corrupted_at = blocking(|| corrupt_latest_checkpoint(&state_dir, counter));
    for update in 1..=UPDATES {
        assert_eq!(
            inc(live(update as usize % 2), counter).await,
            UPDATES + update
        );
    }

    blocking(|| subnet.restart(VICTIM));
    let url = subnet.url(VICTIM).to_string();
    // It executes the blocks after its checkpoint, signs roots no other replica signs, and finds out.
    wait_for(
        "the corrupted replica to report that its state diverged",
        CONVERGENCE_TIMEOUT,
        async || {
            let log = subnet.output(VICTIM);
            match log
                .lines()
                .find(|line| line.contains("critical: state diverged"))
            {
                Some(_) => Ok(()),
                None => Err(format!("not yet (corrupted at height {corrupted_at})")),
            }
        },
    )
    .await;
    // Then fetches the subnet's state and follows consensus again.
    let installed = state_sync_installed(&subnet, VICTIM, "the diverged replica").await;
    let log = subnet.output(VICTIM);
    let diverged = log
        .lines()
        .find(|line| line.contains("critical: state diverged"))
        .unwrap_or_default()
        .to_string();
    assert!(
        installed > corrupted_at,
        "the replica should install a state above its corrupted checkpoint (height \
         {corrupted_at}); it installed height {installed} (the divergence: {diverged})"
    );
    let restarted = agent_for(&url, subnet.root_key_der()).await;
    wait_for(
        "the recovered replica to serve the subnet's certified state",
        CONVERGENCE_TIMEOUT,
        async || match counter_at(&restarted, counter).await {
            Ok(value) if value == 2 * UPDATES => Ok(()),
            other => Err(format!("{other:?}")),
        },
    )
    .await;
    // What it certifies now is the subnet's state, not the corrupted one: the data certificate of a
    // query through it (verified against the subnet's key) holds the canister's own certified data.
    let (certificate,): (Option<Vec<u8>>,) =
        query(&restarted, counter, "get_data_certificate", args(())).await;
    let certificate: ic_agent::Certificate =
        serde_cbor::from_slice(&certificate.expect("a query receives a data certificate"))
            .expect("the data certificate is a CBOR certificate");
    restarted
        .verify(&certificate, counter)
        .expect("the recovered replica's data certificate verifies against the subnet's key");
    let certified = ic_agent::lookup_value(
        &certificate,
        ["canister".as_bytes(), counter.as_slice(), b"certified_data"],
    )
    .expect("the certificate contains /canister/<id>/certified_data");
    assert_eq!(
        certified, CERTIFIED_DATA,
        "the recovered replica certifies the corrupted certified data"
    );
    // Its metrics say what happened: one critical error counted, and the divergence cleared.
    assert_eq!(metric(&url, "openic_state_diverged").await, Some(0.0));
    assert!(
        metric(&url, "openic_critical_errors_total")
            .await
            .is_some_and(|count| count >= 1.0),
        "the divergence should be counted as a critical error"
    );
    assert_eq!(inc(&restarted, counter).await, 2 * UPDATES + 1);
    assert_converged(
        &running_urls(&subnet),
        subnet.root_key_der(),
        counter,
        2 * UPDATES + 1,
    )
    .await;
}
