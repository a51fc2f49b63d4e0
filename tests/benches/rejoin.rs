//! The rejoin benchmark: how long a replica whose state directory was wiped takes to rejoin a
//! four-replica subnet that holds 1 GiB of canister state, by state sync.
//!
//! Run: `cargo build --profile bench -p openic && cargo bench -p openic-tests --bench rejoin`
//! (`OPENIC_REJOIN_MIB` sets the state size, default 1024). Four `openic replica` processes on
//! loopback share this machine, started from a genesis file with a catch-up interval of
//! [`CATCH_UP_INTERVAL`] heights. The unmodified ic-agent (default verification) fills the
//! counter canister's stable memory with `fill_stable`; the benchmark waits until the subnet signed
//! a catch-up checkpoint holding all of it, kills one replica with SIGKILL, deletes its state
//! directory (its identity and key share stay: they live beside the identity file), and restarts
//! it. Measured from the restart: until the replica serves HTTP, until it logs that it installed
//! the fetched state, and until a verified query through it sees every byte (`check_stable` finds
//! no wrong word) at a certified height at least the others'. Results go to stdout as a Markdown
//! table; docs/BENCHMARKS.md records them.

use candid::{Decode, Encode};
use ic_agent::Agent;
use ic_utils::interfaces::ManagementCanister;
use openic_tests::SubnetProcesses;
use openic_tests::measure::{ms, rss_kb};
use std::time::{Duration, Instant};

/// Replicas in the subnet (`3f + 1` with `f = 1`).
const REPLICAS: u16 = 4;
/// Heights between the checkpoints the subnet signs for state sync.
const CATCH_UP_INTERVAL: u64 = 40;
/// MiB written per `fill_stable` call.
const FILL_MIB_PER_CALL: u64 = 32;
/// MiB checked per `check_stable` query.
const CHECK_MIB_PER_QUERY: u64 = 64;
/// The replica that is wiped.
const VICTIM: usize = 3;
/// How long any one phase may take before the benchmark fails.
const PHASE_TIMEOUT: Duration = Duration::from_secs(600);

fn agent_for(url: &str, root_key_der: &[u8]) -> Agent {
    let agent = Agent::builder().with_url(url).build().expect("agent");
    agent.set_root_key(root_key_der.to_vec());
    agent
}

/// The height whose certified state the replica at `url` serves (its `/metrics`).
async fn certified_height(url: &str) -> Option<u64> {
    let metrics = reqwest::get(format!("{url}/metrics"))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("openic_certified_height "))
        .and_then(|value| value.trim().parse().ok())
}

async fn wait_until<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + PHASE_TIMEOUT;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {PHASE_TIMEOUT:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The number in `key=<number>` on the last line of `log` that contains `marker`.
fn logged_number(log: &str, marker: &str, key: &str) -> Option<f64> {
    let line = log.lines().rev().find(|line| line.contains(marker))?;
    let value = line.split(&format!("{key}=")).nth(1)?;
    value
        .split(|c: char| !(c.is_ascii_digit() || c == '.'))
        .next()?
        .parse()
        .ok()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mib: u64 = std::env::var("OPENIC_REJOIN_MIB")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(1024);
    let counter_wasm = openic_tests::test_canister_wasm("counter");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut subnet = tokio::task::block_in_place(|| {
        SubnetProcesses::start_with_catch_up_interval(dir.path(), REPLICAS, Some(CATCH_UP_INTERVAL))
    });
    let root_key = subnet.root_key_der().to_vec();
    let agents: Vec<Agent> = (0..usize::from(REPLICAS))
        .map(|index| agent_for(subnet.url(index), &root_key))
        .collect();

    let management = ManagementCanister::create(&agents[0]);
    let (canister,) = management
        .create_canister()
        .as_provisional_create_with_amount(None)
        .call_and_wait()
        .await
        .expect("create");
    management
        .install(&canister, &counter_wasm)
        .await
        .expect("install");
    let fill_started = Instant::now();
    let mut first = 0;
    while first < mib {
        let count = FILL_MIB_PER_CALL.min(mib - first);
        let agent = &agents[(first / FILL_MIB_PER_CALL) as usize % 3];
        let reply = agent
            .update(&canister, "fill_stable")
            .with_arg(Encode!(&first, &count).expect("encode"))
            .call_and_wait()
            .await
            .unwrap_or_else(|error| panic!("fill_stable({first}, {count}): {error}"));
        let size = Decode!(&reply, u64).expect("fill_stable reply");
        assert!(size >= (first + count) * 1024 * 1024);
        first += count;
    }
    let fill_time = fill_started.elapsed();

    // A catch-up checkpoint above the last fill must be signed: wait two intervals past it.
    let filled_at = certified_height(subnet.url(0)).await.unwrap_or(0);
    let wait_started = Instant::now();
    wait_until(
        "the subnet to sign a checkpoint holding the whole fill",
        async || {
            let height = certified_height(subnet.url(0)).await?;
            (height >= filled_at + 2 * CATCH_UP_INTERVAL).then_some(())
        },
    )
    .await;
    let signed_wait = wait_started.elapsed();
    let rss_before: Vec<String> = (0..usize::from(REPLICAS))
        .map(|index| rss_kb(subnet.replica(index).pid()))
        .collect();

    tokio::task::block_in_place(|| subnet.kill(VICTIM));
    let state_dir = subnet.files(VICTIM).state_dir.clone();
    std::fs::remove_dir_all(&state_dir).expect("wipe the victim's state directory");

    let restarted = Instant::now();
    tokio::task::block_in_place(|| subnet.restart(VICTIM));
    let to_serving_http = restarted.elapsed();
    let victim = agent_for(subnet.url(VICTIM), &root_key);
    wait_until(
        "the wiped replica to install the fetched state",
        async || {
            subnet
                .output(VICTIM)
                .contains("state sync: installed")
                .then_some(())
        },
    )
    .await;
    let to_installed = restarted.elapsed();
    let log = subnet.output(VICTIM);
    let installed_height = logged_number(&log, "state sync: installed", "height").unwrap_or(0.0);
    let fetched_bytes = logged_number(&log, "state sync: installed", "bytes").unwrap_or(0.0);
    let fetch_seconds = logged_number(&log, "state sync: installed", "seconds").unwrap_or(0.0);

    let others_height = certified_height(subnet.url(0)).await.unwrap_or(0);
    wait_until(
        "the wiped replica to serve the whole state, certified",
        async || {
            let height = certified_height(subnet.url(VICTIM)).await?;
            if height < others_height {
                return None;
            }
            // In pieces: one query reading all of it would exceed the query instruction limit.
            let mut first = 0;
            while first < mib {
                let count = CHECK_MIB_PER_QUERY.min(mib - first);
                let reply = victim
                    .query(&canister, "check_stable")
                    .with_arg(Encode!(&first, &count).expect("encode"))
                    .call()
                    .await
                    .ok()?;
                let wrong = Decode!(&reply, u64).ok()?;
                assert_eq!(
                    wrong,
                    0,
                    "the rejoined replica's stable memory differs in MiB {first}..{}",
                    first + count
                );
                first += count;
            }
            Some(())
        },
    )
    .await;
    let to_certified = restarted.elapsed();
    let rss_victim = rss_kb(subnet.replica(VICTIM).pid());

    println!("| rejoin of a wiped replica ({mib} MiB of canister state, 4 replicas, 2 cores) | |");
    println!("|---|---|");
    println!(
        "| fill {mib} MiB with `fill_stable` ({FILL_MIB_PER_CALL} MiB per update) | {} |",
        ms(fill_time)
    );
    println!(
        "| wait for a signed catch-up checkpoint holding it (interval {CATCH_UP_INTERVAL} heights) | {} |",
        ms(signed_wait)
    );
    println!(
        "| restart → serving HTTP (p2p connected) | {} |",
        ms(to_serving_http)
    );
    println!(
        "| restart → fetched state installed (height {installed_height}; fetch {fetch_seconds:.1} s, {:.0} MiB of chunks) | {} |",
        fetched_bytes / (1024.0 * 1024.0),
        ms(to_installed)
    );
    println!(
        "| **restart → serving the whole state at the subnet's certified height** | **{}** |",
        ms(to_certified)
    );
    println!(
        "| RSS (kB) of each replica before / of the rejoined replica after | {} / {rss_victim} |",
        rss_before.join(", "),
    );
}
