//! The replica benchmark: a real openic node on loopback, driven by the unmodified ic-agent.
//!
//! Run: `cargo build --profile bench -p openic && cargo bench -p openic-tests --bench replica`. The
//! node runs as its own `openic start` process (the optimised binary in target/release); this
//! process is the clients.
//! Results go to stdout as a Markdown table; docs/BENCHMARKS.md records them with the machine they
//! were taken on.
//!
//! Measures update-call latency (p50/p99) and throughput with 1 and 64 concurrent clients, query
//! throughput, install time of the ~400 KB counter canister, time from `start` to the first
//! successful call, and two floors to read the rest against: a bare BLS sign+verify and a bare HTTP
//! round trip over the same client stack (hyper via reqwest) to a trivial server.

use candid::{Decode, Encode, Principal};
use ic_agent::Agent;
use ic_utils::interfaces::ManagementCanister;
use openic_tests::measure::{cpu_time, ms, percentile, rss_kb, us};
use std::sync::Arc;
use std::time::{Duration, Instant};

const UPDATE_CALLS_SINGLE: usize = 300;
const UPDATE_CALLS_CONCURRENT: usize = 3_000;
const QUERY_CALLS: usize = 20_000;
const CONCURRENT_CLIENTS: usize = 64;
const RAW_UPDATE_CALLS: usize = 6_000;
const RAW_QUERY_CALLS: usize = 60_000;

/// Posts pre-built CBOR request bodies with a plain HTTP client (hyper, via reqwest) from
/// `clients` concurrent tasks and checks that every answer is a 200 whose CBOR `status` is
/// `replied`. Returns the wall time. The bodies are envelopes built and signed by ic-agent; the
/// replies are not verified, so this measures what the node can serve rather than what a
/// verifying client on the same cores can consume.
async fn post_all(url: String, bodies: Vec<Vec<u8>>, clients: usize) -> Duration {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let client = reqwest::Client::new();
    let bodies = Arc::new(bodies);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, url, bodies, next) =
                (client.clone(), url.clone(), bodies.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(body) = bodies.get(i) else { break };
                    let response = client
                        .post(&url)
                        .header("content-type", "application/cbor")
                        .body(body.clone())
                        .send()
                        .await
                        .expect("post");
                    let status = response.status();
                    let bytes = response.bytes().await.expect("body");
                    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&bytes));
                    let value: serde_cbor::Value = serde_cbor::from_slice(&bytes).expect("cbor");
                    let serde_cbor::Value::Map(map) = value else {
                        panic!("not a map")
                    };
                    assert_eq!(
                        map.get(&serde_cbor::Value::Text("status".into())),
                        Some(&serde_cbor::Value::Text("replied".into()))
                    );
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    started.elapsed()
}

async fn agent_for(url: &str) -> Agent {
    let agent = Agent::builder().with_url(url).build().expect("agent");
    agent.fetch_root_key().await.expect("fetch root key");
    agent
}

async fn inc(agent: &Agent, canister: Principal) {
    let reply = agent
        .update(&canister, "inc")
        .with_arg(Encode!().unwrap())
        .call_and_wait()
        .await
        .expect("inc");
    Decode!(&reply, u64).expect("inc reply");
}

async fn get(agent: &Agent, canister: Principal) -> u64 {
    let reply = agent
        .query(&canister, "get")
        .with_arg(Encode!().unwrap())
        .call()
        .await
        .expect("get");
    Decode!(&reply, u64).expect("get reply")
}

/// Runs `total` operations spread over `clients` concurrent tasks; returns per-op latencies and wall time.
async fn run_concurrent<F, Fut>(clients: usize, total: usize, op: F) -> (Vec<Duration>, Duration)
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..clients {
        let op = op.clone();
        let count = total / clients + usize::from(client < total % clients);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(count);
            for _ in 0..count {
                let t = Instant::now();
                op().await;
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::with_capacity(total);
    for task in tasks {
        all.extend(task.await.expect("task"));
    }
    let wall = started.elapsed();
    all.sort();
    (all, wall)
}

/// Mean time of one BLS signature (what the node does once per height, with blst) and of one
/// verification (what ic-agent does for every update reply, with ic-verify-bls-signature).
fn bls_floor() -> (Duration, Duration) {
    let key = openic_crypto::SubnetSigningKey::generate();
    let rounds = 50;
    let messages: Vec<String> = (0..rounds)
        .map(|i| format!("\x0Dic-state-root{i:032}"))
        .collect();
    let started = Instant::now();
    let signatures: Vec<_> = messages.iter().map(|m| key.sign(m.as_bytes())).collect();
    let sign = started.elapsed() / rounds;
    let started = Instant::now();
    for (message, signature) in messages.iter().zip(&signatures) {
        assert!(openic_crypto::bls::verify(
            key.public_key_der(),
            message.as_bytes(),
            signature
        ));
    }
    (sign, started.elapsed() / rounds)
}

async fn http_floor() -> Duration {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().route("/", axum::routing::post(|| async { "ok" }));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/");
    for _ in 0..50 {
        client
            .post(&url)
            .body(vec![0u8; 200])
            .send()
            .await
            .expect("warm up");
    }
    let rounds = 2_000;
    let started = Instant::now();
    for _ in 0..rounds {
        let response = client
            .post(&url)
            .body(vec![0u8; 200])
            .send()
            .await
            .expect("post");
        response.bytes().await.expect("body");
    }
    started.elapsed() / rounds
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let counter_wasm = openic_tests::test_canister_wasm("counter");
    let dir = tempfile::tempdir().expect("tempdir");

    // From spawning `openic start` to the first successful call (fetch the root key, then a
    // certified read_state of /time through the status-less path every client takes first).
    let started = Instant::now();
    let node = openic_tests::OpenicProcess::start(dir.path());
    let url = node.url().to_string();
    let agent = agent_for(&url).await;
    agent
        .read_state_raw(vec![vec!["time".into()]], Principal::management_canister())
        .await
        .expect("first certified read_state");
    let start_to_ready = started.elapsed();

    let management = ManagementCanister::create(&agent);
    let (canister,) = management
        .create_canister()
        .as_provisional_create_with_amount(None)
        .call_and_wait()
        .await
        .expect("create");
    let t = Instant::now();
    management
        .install(&canister, &counter_wasm)
        .await
        .expect("install");
    let install_time = t.elapsed();
    // Idle resident memory of the node process, with one canister installed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let idle_rss_kb = rss_kb(node.pid());

    // Warm-up.
    for _ in 0..20 {
        inc(&agent, canister).await;
    }

    let agent = Arc::new(agent);
    let node_pid = node.pid();
    let cpu_before_single = (cpu_time(Some(node_pid)), cpu_time(None));
    let (single, single_wall) = {
        let agent = agent.clone();
        run_concurrent(1, UPDATE_CALLS_SINGLE, move || {
            let agent = agent.clone();
            async move { inc(&agent, canister).await }
        })
        .await
    };
    let cpu_single = cpu_since(node_pid, cpu_before_single);
    let cpu_before_many = (cpu_time(Some(node_pid)), cpu_time(None));
    let (many, many_wall) = {
        let agent = agent.clone();
        run_concurrent(CONCURRENT_CLIENTS, UPDATE_CALLS_CONCURRENT, move || {
            let agent = agent.clone();
            async move { inc(&agent, canister).await }
        })
        .await
    };
    let cpu_many = cpu_since(node_pid, cpu_before_many);
    let cpu_before_queries = (cpu_time(Some(node_pid)), cpu_time(None));
    let (queries, queries_wall) = {
        let agent = agent.clone();
        run_concurrent(CONCURRENT_CLIENTS, QUERY_CALLS, move || {
            let agent = agent.clone();
            async move {
                get(&agent, canister).await;
            }
        })
        .await
    };
    let cpu_queries = cpu_since(node_pid, cpu_before_queries);
    let final_count = get(&agent, canister).await;
    assert_eq!(
        final_count as usize,
        20 + UPDATE_CALLS_SINGLE + UPDATE_CALLS_CONCURRENT
    );

    // The node's own capacity: the same calls, built and signed by ic-agent in advance, sent by a
    // plain HTTP client that does not verify the replies.
    let updates: Vec<Vec<u8>> = (0..RAW_UPDATE_CALLS)
        .map(|_| {
            agent
                .update(&canister, "inc")
                .with_arg(Encode!().unwrap())
                .sign()
                .expect("sign update")
                .signed_update
        })
        .collect();
    let query = agent
        .query(&canister, "get")
        .with_arg(Encode!().unwrap())
        .sign()
        .expect("sign query")
        .signed_query;
    let cpu_before_raw_updates = (cpu_time(Some(node_pid)), cpu_time(None));
    let raw_updates_wall = post_all(
        format!(
            "{}/api/v4/canister/{canister}/call",
            url.trim_end_matches('/')
        ),
        updates,
        CONCURRENT_CLIENTS,
    )
    .await;
    let cpu_raw_updates = cpu_since(node_pid, cpu_before_raw_updates);
    let cpu_before_raw_queries = (cpu_time(Some(node_pid)), cpu_time(None));
    let raw_queries_wall = post_all(
        format!(
            "{}/api/v3/canister/{canister}/query",
            url.trim_end_matches('/')
        ),
        vec![query; RAW_QUERY_CALLS],
        CONCURRENT_CLIENTS,
    )
    .await;
    let cpu_raw_queries = cpu_since(node_pid, cpu_before_raw_queries);
    assert_eq!(
        get(&agent, canister).await as usize,
        20 + UPDATE_CALLS_SINGLE + UPDATE_CALLS_CONCURRENT + RAW_UPDATE_CALLS,
        "every pre-signed update ran exactly once (checked by a verified query)"
    );

    let bls = bls_floor();
    let http = http_floor().await;
    let loaded_rss_kb = rss_kb(node.pid());

    println!("| measurement | result |");
    println!("|---|---|");
    println!(
        "| start to first successful call | {} |",
        ms(start_to_ready)
    );
    println!(
        "| install {} KB counter canister | {} |",
        counter_wasm.len() / 1024,
        ms(install_time)
    );
    println!(
        "| update, 1 client: p50 / p99 | {} / {} ({:.0} updates/s) |",
        ms(percentile(&single, 0.5)),
        ms(percentile(&single, 0.99)),
        UPDATE_CALLS_SINGLE as f64 / single_wall.as_secs_f64()
    );
    println!(
        "| update, {CONCURRENT_CLIENTS} clients: p50 / p99 | {} / {} ({:.0} updates/s) |",
        ms(percentile(&many, 0.5)),
        ms(percentile(&many, 0.99)),
        UPDATE_CALLS_CONCURRENT as f64 / many_wall.as_secs_f64()
    );
    println!(
        "| query, {CONCURRENT_CLIENTS} clients: p50 / p99 | {} / {} ({:.0} queries/s) |",
        ms(percentile(&queries, 0.5)),
        ms(percentile(&queries, 0.99)),
        QUERY_CALLS as f64 / queries_wall.as_secs_f64()
    );
    for (what, (node_cpu, client_cpu), count) in [
        ("update, 1 client", cpu_single, UPDATE_CALLS_SINGLE),
        ("update, 64 clients", cpu_many, UPDATE_CALLS_CONCURRENT),
        ("query, 64 clients", cpu_queries, QUERY_CALLS),
        (
            "update, 64 plain HTTP clients",
            cpu_raw_updates,
            RAW_UPDATE_CALLS,
        ),
        (
            "query, 64 plain HTTP clients",
            cpu_raw_queries,
            RAW_QUERY_CALLS,
        ),
    ] {
        println!(
            "| CPU per call, {what}: node / clients | {} / {} |",
            us(node_cpu / count as u32),
            us(client_cpu / count as u32)
        );
    }
    println!(
        "| update, {CONCURRENT_CLIENTS} plain HTTP clients (pre-signed by ic-agent, replies not verified) | {:.0} updates/s |",
        RAW_UPDATE_CALLS as f64 / raw_updates_wall.as_secs_f64()
    );
    println!(
        "| query, {CONCURRENT_CLIENTS} plain HTTP clients (pre-signed by ic-agent, replies not verified) | {:.0} queries/s |",
        RAW_QUERY_CALLS as f64 / raw_queries_wall.as_secs_f64()
    );
    println!(
        "| floor: one BLS sign (node) / one BLS verify (client) | {} / {} |",
        ms(bls.0),
        ms(bls.1)
    );
    println!(
        "| floor: bare HTTP round trip (reqwest → axum) | {} |",
        ms(http)
    );
    println!("| node RSS idle, one canister installed | {idle_rss_kb} kB |");
    println!("| node RSS after the load | {loaded_rss_kb} kB |");
    let status = node.terminate();
    assert!(status.success(), "openic exited with {status}");
}

/// CPU time the node and this process (the clients) used since `before`.
fn cpu_since(node_pid: u32, before: (Duration, Duration)) -> (Duration, Duration) {
    (
        cpu_time(Some(node_pid)).saturating_sub(before.0),
        cpu_time(None).saturating_sub(before.1),
    )
}
