//! The subnet benchmark: a local subnet of four replicas on loopback, driven by the unmodified
//! ic-agent and by plain HTTP clients.
//!
//! Run: `cargo build --profile bench -p openic && cargo bench -p openic-tests --bench subnet`. The
//! subnet runs as its own `openic start --replicas 4` process tree (the optimised binary in
//! target/release: one parent and one `openic replica` child per replica); this process is the
//! clients. Results go to stdout as a Markdown table; docs/BENCHMARKS.md records them with the
//! machine they were taken on.
//!
//! Measures, in this order: the time from spawning `openic start` to the first certified answer
//! (the key generation at genesis included); finalized and executed heights per second with the
//! subnet idle, under one verifying client and under plain-client load (from `openic_height` on
//! each replica's `/metrics`); update latency (p50/p99) of one ic-agent client with default
//! verification sending its calls round-robin to the four replicas; and the updates per second the
//! subnet serves to pre-signed plain HTTP clients spread over the replicas, with the CPU the whole
//! process tree and the clients spend per update. Every update's certificate is read: a
//! synchronous call answered `replied` may still hold a rejection (the canister's queue was full),
//! which is counted, and the counter values the updates replied with must be exactly `1..=n`.
//! Afterwards a verified query on every replica checks that every executed update ran exactly once.
//!
//! Every wait has a deadline, and the process tree is stopped by pid (SIGTERM to the parent, which
//! passes it on to its replicas), never by name.

use candid::{Decode, Encode, Principal};
use ic_agent::Agent;
use ic_utils::interfaces::ManagementCanister;
use openic_tests::measure::{cpu_time, ms, percentile, rss_kb, us};
use openic_tests::{child_pids, free_loopback_ports, is_process_alive};
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// Replicas in the subnet (`3f + 1` with `f = 1`).
const REPLICAS: usize = 4;
/// Updates made before measuring (connections, compiled canister, caches).
const WARM_UP_UPDATES: usize = 20;
/// How long the idle subnet is watched.
const IDLE_WINDOW: Duration = Duration::from_secs(10);
/// Updates of the one verifying client.
const LATENCY_UPDATES: usize = 200;
/// Pre-signed updates per capacity phase.
const CAPACITY_UPDATES: usize = 3_000;
/// Concurrent plain clients of the capacity phases. A synchronous call takes about two heights,
/// so the in-flight calls, not the subnet, bound 32 clients; 1,024 fill blocks with ~200 updates
/// (a proposal takes at most a canister's input queue of them; a rejected call would be counted).
const CAPACITY_CLIENTS: [usize; 3] = [32, 256, 1024];

/// How long the subnet may take to print its `url:` and `root_key:` lines (key generation included).
const READY_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the first certified answer may take after the replicas said they are ready.
const FIRST_CERTIFIED_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the replicas may take to agree on the final count after the load.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the process tree may take to exit after SIGTERM (each replica writes a checkpoint).
const TERMINATE_TIMEOUT: Duration = Duration::from_secs(60);
/// At most this much of the subnet's output is kept for failure messages (the newest part).
const OUTPUT_BYTES_MAX: usize = 256 * 1024;

/// Output of the process tree, kept (bounded) for failure messages and for counting warnings.
#[derive(Clone, Default)]
struct Output(Arc<Mutex<String>>);

impl Output {
    fn push_line(&self, line: &str) {
        let mut text = self.0.lock().unwrap_or_else(|p| p.into_inner());
        text.push_str(line);
        text.push('\n');
        if text.len() > OUTPUT_BYTES_MAX {
            let mut cut = text.len() - OUTPUT_BYTES_MAX;
            while !text.is_char_boundary(cut) {
                cut += 1;
            }
            text.replace_range(..cut, "");
        }
    }

    fn text(&self) -> String {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Copies `stream` line by line into the buffer (and to `lines`, if given) on its own thread.
    fn drain<R: Read + Send + 'static>(&self, stream: R, lines: Option<mpsc::Sender<String>>) {
        let output = self.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                output.push_line(&line);
                if let Some(lines) = &lines {
                    let _ = lines.send(line);
                }
            }
        });
    }
}

/// A running `openic start --replicas 4` process tree.
struct Subnet {
    parent: Child,
    replica_pids: Vec<u32>,
    urls: Vec<String>,
    root_key_der: Vec<u8>,
    output: Output,
}

impl Subnet {
    /// Spawns the subnet on free loopback ports and waits until it printed every `url:` line and
    /// the `root_key:` line.
    fn start(state_dir: &Path) -> Subnet {
        let binary = openic_tests::openic_binary();
        let http_port = free_loopback_ports(2 * REPLICAS as u16);
        let p2p_port = http_port + REPLICAS as u16;
        let mut parent = Command::new(&binary)
            .arg("start")
            .args(["--replicas", &REPLICAS.to_string()])
            .arg("--state-dir")
            .arg(state_dir)
            .args(["--port", &http_port.to_string()])
            .args(["--p2p-port", &p2p_port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|error| panic!("cannot start {}: {error}", binary.display()));
        let output = Output::default();
        let (line_sender, line_receiver) = mpsc::channel();
        output.drain(parent.stdout.take().expect("piped"), Some(line_sender));
        output.drain(parent.stderr.take().expect("piped"), None);

        let deadline = Instant::now() + READY_TIMEOUT;
        let mut urls = Vec::new();
        let mut root_key_der = None;
        while root_key_der.is_none() {
            let remaining = deadline.saturating_duration_since(Instant::now());
            match line_receiver.recv_timeout(remaining) {
                Ok(line) => {
                    if let Some(value) = line.strip_prefix("url: ") {
                        urls.push(value.trim().to_string());
                    } else if let Some(value) = line.strip_prefix("root_key: ") {
                        root_key_der = Some(
                            openic_tests::decode_hex(value.trim())
                                .unwrap_or_else(|e| panic!("bad root_key line {line:?}: {e}")),
                        );
                    }
                }
                Err(error) => {
                    let replica_pids = child_pids(parent.id());
                    let mut subnet = Subnet {
                        parent,
                        replica_pids,
                        urls,
                        root_key_der: Vec::new(),
                        output,
                    };
                    let _ = subnet.stop();
                    panic!(
                        "openic start --replicas {REPLICAS} was not ready within {READY_TIMEOUT:?} \
                         ({error:?}).\n--- output ---\n{}",
                        subnet.output.text()
                    );
                }
            }
        }
        assert_eq!(urls.len(), REPLICAS, "one url line per replica");
        let replica_pids = child_pids(parent.id());
        assert_eq!(
            replica_pids.len(),
            REPLICAS,
            "one `openic replica` child process per replica"
        );
        Subnet {
            parent,
            replica_pids,
            urls,
            root_key_der: root_key_der.expect("loop ends only when set"),
            output,
        }
    }

    /// The parent and every replica process.
    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.parent.id()];
        pids.extend(&self.replica_pids);
        pids
    }

    /// CPU time of the whole tree so far (replicas and the parent, which only waits).
    fn cpu_time(&self) -> Duration {
        self.pids().into_iter().map(|pid| cpu_time(Some(pid))).sum()
    }

    /// Sends SIGTERM to the parent (which passes it on to its replicas) and waits for the parent
    /// and the replicas to exit; SIGKILLs this tree, by pid, if they do not in time.
    fn stop(&mut self) -> ExitStatus {
        signal(self.parent.id(), "TERM");
        let deadline = Instant::now() + TERMINATE_TIMEOUT;
        loop {
            let parent_done = self.parent.try_wait().expect("polling openic");
            let replicas_alive = self
                .replica_pids
                .iter()
                .filter(|pid| is_process_alive(**pid))
                .count();
            if let Some(status) = parent_done
                && replicas_alive == 0
            {
                return status;
            }
            if Instant::now() > deadline {
                for pid in &self.replica_pids {
                    signal(*pid, "KILL");
                }
                let _ = self.parent.kill();
                let _ = self.parent.wait();
                panic!(
                    "the subnet did not stop within {TERMINATE_TIMEOUT:?} of SIGTERM.\n--- output \
                     ---\n{}",
                    self.output.text()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Subnet {
    fn drop(&mut self) {
        if let Ok(None) = self.parent.try_wait() {
            // A panic left the tree running: stop the replicas first (a killed parent cannot pass
            // a signal on), then the parent.
            for pid in &self.replica_pids {
                if child_pids(self.parent.id()).contains(pid) {
                    signal(*pid, "KILL");
                }
            }
            let _ = self.parent.kill();
            let _ = self.parent.wait();
        }
    }
}

/// Sends `signal` to `pid` with the `kill` utility (std cannot send SIGTERM).
fn signal(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

/// `openic_height` (executed and certified height) of each replica.
async fn heights(client: &reqwest::Client, urls: &[String]) -> Vec<u64> {
    let mut heights = Vec::with_capacity(urls.len());
    for url in urls {
        let text = client
            .get(format!("{}/metrics", url.trim_end_matches('/')))
            .send()
            .await
            .expect("GET /metrics")
            .text()
            .await
            .expect("metrics body");
        let height = text
            .lines()
            .find_map(|line| line.strip_prefix("openic_height "))
            .unwrap_or_else(|| panic!("no openic_height in {url}/metrics"))
            .trim()
            .parse()
            .expect("a height");
        heights.push(height);
    }
    heights
}

/// Heights per second of each replica between two samples.
fn height_rates(before: &[u64], after: &[u64], wall: Duration) -> Vec<f64> {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| a.saturating_sub(*b) as f64 / wall.as_secs_f64())
        .collect()
}

/// "median (min–max)" of the replicas' rates.
fn rate_summary(rates: &[f64]) -> String {
    let mut sorted = rates.to_vec();
    sorted.sort_by(f64::total_cmp);
    let median = (sorted[(sorted.len() - 1) / 2] + sorted[sorted.len() / 2]) / 2.0;
    format!(
        "{median:.1} heights/s (replicas {:.1}–{:.1})",
        sorted[0],
        sorted[sorted.len() - 1]
    )
}

/// Posts pre-signed updates, update `i` to `urls[i % urls.len()]`, from `clients` concurrent
/// tasks, and checks that every answer is a 200 whose CBOR `status` is `replied` (a synchronous
/// call answered with its certificate). Returns the wall time and, per update, what its
/// certificate says (see [`call_outcome`]; the signature is not checked: this measures what the
/// subnet serves, not what a verifying client can consume).
async fn post_all(
    urls: Vec<String>,
    updates: Vec<(ic_agent::RequestId, Vec<u8>)>,
    clients: usize,
) -> (Duration, Vec<Result<u64, String>>) {
    let client = reqwest::Client::new();
    let urls = Arc::new(urls);
    let updates = Arc::new(updates);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|_| {
            let (client, urls, updates, next) =
                (client.clone(), urls.clone(), updates.clone(), next.clone());
            tokio::spawn(async move {
                let mut values = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((request_id, body)) = updates.get(i) else {
                        break;
                    };
                    let url = &urls[i % urls.len()];
                    let response = client
                        .post(url)
                        .header("content-type", "application/cbor")
                        .body(body.clone())
                        .send()
                        .await
                        .expect("post");
                    let status = response.status();
                    let bytes = response.bytes().await.expect("body");
                    assert_eq!(status, 200, "{url}: {}", String::from_utf8_lossy(&bytes));
                    values.push(call_outcome(url, request_id, &bytes));
                }
                values
            })
        })
        .collect();
    let mut values = Vec::new();
    for task in tasks {
        values.extend(task.await.expect("task"));
    }
    (started.elapsed(), values)
}

/// What a synchronous call's certificate says about the call: the `u64` it replied with, or the
/// code and message it was rejected with. Panics unless the answer is `replied` (the HTTP-level
/// status of a completed call, whose certificate may still hold a rejection).
fn call_outcome(url: &str, request_id: &ic_agent::RequestId, bytes: &[u8]) -> Result<u64, String> {
    let value: serde_cbor::Value = serde_cbor::from_slice(bytes).expect("cbor");
    let serde_cbor::Value::Map(map) = value else {
        panic!("{url}: the answer is not a CBOR map")
    };
    assert_eq!(
        map.get(&serde_cbor::Value::Text("status".into())),
        Some(&serde_cbor::Value::Text("replied".into())),
        "{url}: {map:?}"
    );
    let Some(serde_cbor::Value::Bytes(certificate)) =
        map.get(&serde_cbor::Value::Text("certificate".into()))
    else {
        panic!("{url}: a replied answer without a certificate")
    };
    let certificate: ic_agent::Certificate =
        serde_cbor::from_slice(certificate).expect("certificate CBOR");
    let lookup = |leaf: &[u8]| {
        ic_agent::lookup_value(
            &certificate,
            [b"request_status".as_slice(), request_id.as_slice(), leaf],
        )
        .map(|value| value.to_vec())
    };
    let status = lookup(b"status")
        .unwrap_or_else(|error| panic!("{url}: no status for {request_id}: {error}"));
    match status.as_slice() {
        b"replied" => {
            let reply = lookup(b"reply").expect("a replied call has a reply");
            Ok(Decode!(&reply, u64).expect("inc reply"))
        }
        b"rejected" => {
            let code = lookup(b"reject_code").unwrap_or_default();
            let message = lookup(b"reject_message").unwrap_or_default();
            let code = code
                .first()
                .map_or_else(|| "?".to_string(), |c| c.to_string());
            Err(format!(
                "reject code {code}: {}",
                String::from_utf8_lossy(&message)
            ))
        }
        other => panic!(
            "{url}: {request_id} has the terminal status {:?}, not replied or rejected",
            String::from_utf8_lossy(other)
        ),
    }
}

/// An agent for one replica that trusts the root key the subnet printed (default verification).
fn agent_for(url: &str, root_key_der: &[u8]) -> Agent {
    let agent = Agent::builder().with_url(url).build().expect("agent");
    agent.set_root_key(root_key_der.to_vec());
    agent
}

/// One verified update; returns the counter value it replied with.
async fn inc(agent: &Agent, canister: Principal) -> u64 {
    let reply = agent
        .update(&canister, "inc")
        .with_arg(Encode!().unwrap())
        .call_and_wait()
        .await
        .expect("inc");
    Decode!(&reply, u64).expect("inc reply")
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

/// Queries (verified) every replica until each answers `expected`, and fails if any answers more.
/// On a timeout the message names every replica's count and height and the subnet's warnings.
async fn assert_count_everywhere(
    subnet: &Subnet,
    agents: &[Agent],
    canister: Principal,
    expected: u64,
) {
    let http = reqwest::Client::new();
    for (index, agent) in agents.iter().enumerate() {
        let deadline = Instant::now() + CONVERGE_TIMEOUT;
        loop {
            let count = get(agent, canister).await;
            assert!(
                count <= expected,
                "replica {index} counts {count} updates, more than the {expected} sent: an update ran twice"
            );
            if count == expected {
                break;
            }
            if Instant::now() > deadline {
                let mut counts = Vec::new();
                for agent in agents {
                    counts.push(get(agent, canister).await);
                }
                let heights = heights(&http, &subnet.urls).await;
                let notable: Vec<String> = subnet
                    .output
                    .text()
                    .lines()
                    .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                    .map(str::to_string)
                    .collect();
                panic!(
                    "replica {index} still counts {count} of {expected} updates \
                     {CONVERGE_TIMEOUT:?} after the load: an update was lost or the replica fell \
                     behind. Counts per replica: {counts:?}; heights: {heights:?}.\n\
                     --- warnings ---\n{}",
                    notable.join("\n")
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Checks that the counter values the updates replied with are exactly `1..=expected`, each once:
/// a value replied twice means two updates ran on the same state and one increment was lost.
fn assert_replies_once(replied: &[u64], expected: u64, phase: &str) {
    let mut sorted = replied.to_vec();
    sorted.sort_unstable();
    let repeated: Vec<u64> = sorted
        .windows(2)
        .filter(|pair| pair[0] == pair[1])
        .map(|pair| pair[0])
        .collect();
    assert!(
        repeated.is_empty() && sorted.len() as u64 == expected && sorted.last() == Some(&expected),
        "after the {phase} phase, {} updates replied with {} distinct counter values (expected \
         1..={expected} once each); values replied more than once: {:?}{}",
        sorted.len(),
        sorted.len() - repeated.len(),
        &repeated[..repeated.len().min(20)],
        if repeated.len() > 20 { " …" } else { "" }
    );
}

/// One measured phase: wall time, heights before and after, CPU of the tree and of the clients.
struct Phase {
    wall: Duration,
    heights_before: Vec<u64>,
    heights_after: Vec<u64>,
    node_cpu: Duration,
    client_cpu: Duration,
}

impl Phase {
    fn rates(&self) -> Vec<f64> {
        height_rates(&self.heights_before, &self.heights_after, self.wall)
    }

    /// Heights the slowest replica advanced.
    fn heights_min(&self) -> u64 {
        self.heights_before
            .iter()
            .zip(&self.heights_after)
            .map(|(b, a)| a.saturating_sub(*b))
            .min()
            .unwrap_or(0)
    }

    /// Spread of the replicas' heights at the end of the phase (how far the slowest lags).
    fn lag(&self) -> u64 {
        let max = self.heights_after.iter().max().copied().unwrap_or(0);
        let min = self.heights_after.iter().min().copied().unwrap_or(0);
        max - min
    }
}

/// Runs `work` between two samples of heights and CPU.
async fn measure<F: std::future::Future<Output = ()>>(
    subnet: &Subnet,
    http: &reqwest::Client,
    work: F,
) -> Phase {
    let heights_before = heights(http, &subnet.urls).await;
    let (node_before, client_before) = (subnet.cpu_time(), cpu_time(None));
    let started = Instant::now();
    work.await;
    let wall = started.elapsed();
    let (node_after, client_after) = (subnet.cpu_time(), cpu_time(None));
    let heights_after = heights(http, &subnet.urls).await;
    Phase {
        wall,
        heights_before,
        heights_after,
        node_cpu: node_after.saturating_sub(node_before),
        client_cpu: client_after.saturating_sub(client_before),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let counter_wasm = openic_tests::test_canister_wasm("counter");
    let dir = tempfile::tempdir().expect("tempdir");
    let http = reqwest::Client::new();

    // From spawning `openic start` to the replicas' `url:` lines (key generation done), and to the
    // first certified answer: a read_state of /time through replica 0, verified by ic-agent
    // against the printed root key. Before the first height is certified a replica answers 503,
    // so the call is retried.
    let started = Instant::now();
    let mut subnet = Subnet::start(dir.path());
    let start_to_urls = started.elapsed();
    let agents: Vec<Agent> = subnet
        .urls
        .iter()
        .map(|url| agent_for(url, &subnet.root_key_der))
        .collect();
    let first_deadline = Instant::now() + FIRST_CERTIFIED_TIMEOUT;
    loop {
        match agents[0]
            .read_state_raw(vec![vec!["time".into()]], Principal::management_canister())
            .await
        {
            Ok(_) => break,
            Err(error) => {
                assert!(
                    Instant::now() < first_deadline,
                    "no certified read_state within {FIRST_CERTIFIED_TIMEOUT:?}: {error}\n--- \
                     output ---\n{}",
                    subnet.output.text()
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    let start_to_certified = started.elapsed();

    let management = ManagementCanister::create(&agents[0]);
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
    // The counter value every update replied with: each of 1..=expected exactly once.
    let mut replied = Vec::new();
    for i in 0..WARM_UP_UPDATES {
        replied.push(inc(&agents[i % REPLICAS], canister).await);
    }
    let mut expected = WARM_UP_UPDATES as u64;

    // 1. Idle: nothing but the leaders' empty blocks.
    let idle = measure(&subnet, &http, tokio::time::sleep(IDLE_WINDOW)).await;
    let idle_rss_kb: Vec<String> = subnet.replica_pids.iter().map(|pid| rss_kb(*pid)).collect();

    // 2. One verifying client, each call to the next replica.
    let mut latencies = Vec::with_capacity(LATENCY_UPDATES);
    let single = measure(&subnet, &http, async {
        for i in 0..LATENCY_UPDATES {
            let t = Instant::now();
            replied.push(inc(&agents[i % REPLICAS], canister).await);
            latencies.push(t.elapsed());
        }
    })
    .await;
    latencies.sort();
    expected += LATENCY_UPDATES as u64;
    assert_replies_once(&replied, expected, "1 ic-agent client");
    assert_count_everywhere(&subnet, &agents, canister, expected).await;

    // 3. Capacity: updates built and signed by ic-agent in advance, posted by plain clients to
    //    the synchronous call endpoint of every replica in turn.
    let call_urls: Vec<String> = subnet
        .urls
        .iter()
        .map(|url| {
            format!(
                "{}/api/v4/canister/{canister}/call",
                url.trim_end_matches('/')
            )
        })
        .collect();
    let mut capacity = Vec::new();
    for clients in CAPACITY_CLIENTS {
        let updates: Vec<(ic_agent::RequestId, Vec<u8>)> = (0..CAPACITY_UPDATES)
            .map(|_| {
                let signed = agents[0]
                    .update(&canister, "inc")
                    .with_arg(Encode!().unwrap())
                    .sign()
                    .expect("sign update");
                (signed.request_id, signed.signed_update)
            })
            .collect();
        let mut rejections = Vec::new();
        let phase = measure(&subnet, &http, async {
            let (_, outcomes) = post_all(call_urls.clone(), updates, clients).await;
            for outcome in outcomes {
                match outcome {
                    Ok(value) => replied.push(value),
                    Err(reason) => rejections.push(reason),
                }
            }
        })
        .await;
        expected += (CAPACITY_UPDATES - rejections.len()) as u64;
        // Every pre-signed update ran exactly once: its reply names a counter value no other
        // reply names, and every replica's state (verified queries) counts all of them.
        assert_replies_once(&replied, expected, &format!("{clients} plain clients"));
        assert_count_everywhere(&subnet, &agents, canister, expected).await;
        capacity.push((clients, phase, rejections));
    }

    let rss_kb: Vec<String> = subnet.replica_pids.iter().map(|pid| rss_kb(*pid)).collect();
    let output = subnet.output.text();
    let notable: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .collect();
    let warnings = notable.iter().filter(|l| l.contains("WARN")).count();
    let errors = notable.len() - warnings;
    for line in notable.iter().take(20) {
        eprintln!("subnet log: {line}");
    }

    println!("| measurement | result |");
    println!("|---|---|");
    println!(
        "| start (`openic start --replicas {REPLICAS}` spawned) to every replica's `url:` line (key generation included) | {} |",
        ms(start_to_urls)
    );
    println!(
        "| start to first certified call (read_state /time, ic-agent, subnet key) | {} |",
        ms(start_to_certified)
    );
    println!(
        "| install the {} KB counter canister | {} |",
        counter_wasm.len() / 1024,
        ms(install_time)
    );
    println!(
        "| heights/s, idle ({:.0} s) | {} |",
        idle.wall.as_secs_f64(),
        rate_summary(&idle.rates())
    );
    println!(
        "| node CPU per height, idle (all {REPLICAS} replicas) | {} |",
        ms(idle.node_cpu / idle.heights_min().max(1) as u32)
    );
    println!(
        "| heights/s, 1 ic-agent client | {} |",
        rate_summary(&single.rates())
    );
    println!(
        "| update, 1 ic-agent client, round-robin over {REPLICAS} replicas: p50 / p99 | {} / {} ({:.0} updates/s) |",
        ms(percentile(&latencies, 0.5)),
        ms(percentile(&latencies, 0.99)),
        LATENCY_UPDATES as f64 / single.wall.as_secs_f64()
    );
    println!(
        "| CPU per update, 1 ic-agent client: node (all replicas) / client | {} / {} |",
        us(single.node_cpu / LATENCY_UPDATES as u32),
        us(single.client_cpu / LATENCY_UPDATES as u32)
    );
    for (clients, phase, rejections) in &capacity {
        let executed = CAPACITY_UPDATES - rejections.len();
        let mut reasons: Vec<&String> = rejections.iter().collect();
        reasons.sort();
        reasons.dedup();
        println!(
            "| update, {clients} plain HTTP clients over {REPLICAS} replicas (pre-signed, replies not verified) | {:.0} updates/s ({executed} executed in {:.1} s; {} rejected{}) |",
            executed as f64 / phase.wall.as_secs_f64(),
            phase.wall.as_secs_f64(),
            rejections.len(),
            if reasons.is_empty() {
                String::new()
            } else {
                format!(
                    ": {}",
                    reasons
                        .iter()
                        .take(3)
                        .map(|r| r.as_str())
                        .collect::<Vec<_>>()
                        .join("; ")
                )
            }
        );
        println!(
            "| heights/s under that load; executed updates per height | {}; {:.1} |",
            rate_summary(&phase.rates()),
            executed as f64 / phase.heights_min().max(1) as f64
        );
        println!(
            "| CPU per posted update, {clients} plain clients: node (all replicas) / clients | {} / {} |",
            us(phase.node_cpu / CAPACITY_UPDATES as u32),
            us(phase.client_cpu / CAPACITY_UPDATES as u32)
        );
    }
    println!(
        "| replica heights spread at the end of each phase (idle, 1 client, {}) | {} |",
        CAPACITY_CLIENTS.map(|c| format!("{c} clients")).join(", "),
        std::iter::once(idle.lag())
            .chain(std::iter::once(single.lag()))
            .chain(capacity.iter().map(|(_, p, _)| p.lag()))
            .map(|lag| lag.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "| replica RSS, idle with one canister / after the load | {} / {} kB |",
        idle_rss_kb.join(", "),
        rss_kb.join(", ")
    );
    println!("| WARN / ERROR log lines | {warnings} / {errors} |");
    let status = subnet.stop();
    assert!(status.success(), "openic exited with {status}");
    if errors > 0 {
        eprintln!("--- subnet output ---\n{output}");
    }
}
