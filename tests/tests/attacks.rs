//! Attacks on one `openic start` process, each while a well-behaved ic-agent client (from
//! 127.0.0.1, default verification) sends updates and queries: the client must stay served.
//!
//! The hostile connections come from `openic-attack` processes (src/bin/openic-attack.rs) on other
//! loopback source addresses, so the node sees distinct clients and the test process keeps its
//! own file descriptors. Each test prints one `attack …` line with the client's latencies, the
//! node's peak resident memory and what it shed; `OPENIC_ATTACK_SECONDS` (default 12) and
//! `OPENIC_ATTACK_SETTLE_SECONDS` (default 0: how long to wait afterwards before measuring memory
//! again) make the longer runs of docs/RELIABILITY.md; `OPENIC_ATTACK_CPUS` (a `taskset` CPU list)
//! runs the attackers on those CPUs only.
//!
//! A test binary of its own (cargo runs test binaries one after another), so the attacks never
//! share the machine with the e2e tests, and one attack at a time within it.

#[allow(dead_code)]
#[path = "e2e/support.rs"]
mod support;

use candid::Principal;
use ic_agent::Agent;
use openic_tests::OpenicProcess;
use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::{args, connect, deploy, query, try_query, try_update, update};

/// One attack at a time in this process: two at once would measure each other.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// Longer than this for one call of the well-behaved client counts as not served.
const SERVED_WITHIN: Duration = Duration::from_secs(10);

fn attack_duration() -> Duration {
    Duration::from_secs(env_seconds("OPENIC_ATTACK_SECONDS", 12))
}

fn env_seconds(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `host:port` of a node URL.
fn target(url: &str) -> String {
    url.trim_start_matches("http://")
        .trim_end_matches('/')
        .to_string()
}

/// Starts an attacker: `connections` of `kind` from `sources` addresses starting at `from`.
fn attacker(
    url: &str,
    kind: &str,
    connections: usize,
    from: &str,
    sources: u8,
    hold: Duration,
) -> Child {
    // OPENIC_ATTACK_CPUS (a taskset list, e.g. `1`) keeps the attackers off the node's cores.
    let mut command = match std::env::var("OPENIC_ATTACK_CPUS") {
        Ok(cpus) => {
            let mut command = Command::new("taskset");
            command.args(["-c", &cpus, env!("CARGO_BIN_EXE_openic-attack")]);
            command
        }
        Err(_) => Command::new(env!("CARGO_BIN_EXE_openic-attack")),
    };
    command
        .args(["--target", &target(url), "--kind", kind])
        .args(["--connections", &connections.to_string()])
        .args(["--from", from, "--sources", &sources.to_string()])
        .args(["--hold-secs", &hold.as_secs().to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("starting openic-attack")
}

/// An attacker's summary line, parsed: `closed_by_server`, `opened`, …
fn finish(attacker: Child) -> std::collections::BTreeMap<String, u64> {
    let output = attacker.wait_with_output().expect("openic-attack ran");
    assert!(output.status.success(), "openic-attack failed: {output:?}");
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .filter_map(|pair| {
            let (key, value) = pair.split_once('=')?;
            Some((key.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// A plain `GET` (its own connection, from 127.0.0.1), returning the body.
fn http_get(url: &str, path: &str) -> String {
    let mut stream = std::net::TcpStream::connect(target(url)).expect("connecting for a GET");
    stream
        .set_read_timeout(Some(SERVED_WITHIN))
        .expect("read timeout");
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nhost: openic\r\nconnection: close\r\n\r\n"
    )
    .expect("sending a GET");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("reading a GET");
    answer
        .split_once("\r\n\r\n")
        .map_or(answer.clone(), |(_, body)| body.to_string())
}

/// The value of the metric line starting with `series` (e.g.
/// `openic_http_connections_closed_total{reason="header_timeout"}`), 0 when absent.
fn metric(url: &str, series: &str) -> f64 {
    http_get(url, "/metrics")
        .lines()
        .find_map(|line| line.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn closed(url: &str, reason: &str) -> f64 {
    metric(
        url,
        &format!("openic_http_connections_closed_total{{reason=\"{reason}\"}}"),
    )
}

fn rss_mib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kib| kib / 1024)
}

/// What the well-behaved client saw during an attack.
#[derive(Default)]
struct Served {
    queries: Vec<Duration>,
    updates: Vec<Duration>,
    failures: Vec<String>,
    peak_rss_mib: u64,
}

fn percentile(samples: &mut [Duration], p: f64) -> f64 {
    if samples.is_empty() {
        return f64::NAN;
    }
    samples.sort();
    let rank = ((p / 100.0) * samples.len() as f64).ceil() as usize;
    samples[rank.clamp(1, samples.len()) - 1].as_secs_f64() * 1000.0
}

/// Times one call of the well-behaved client: its round trip in `samples`, or why it was not
/// served in `failures`.
async fn timed<T>(
    what: &str,
    call: impl std::future::Future<Output = Result<T, ic_agent::AgentError>>,
    samples: &mut Vec<Duration>,
    failures: &mut Vec<String>,
) {
    let started = Instant::now();
    match tokio::time::timeout(SERVED_WITHIN, call).await {
        Ok(Ok(_)) => samples.push(started.elapsed()),
        Ok(Err(error)) => failures.push(format!("{what}: {error}")),
        Err(_) => failures.push(format!("{what}: not answered in {SERVED_WITHIN:?}")),
    }
}

/// Updates (`inc`) and queries (`get`) in turn until `until`, sampling the node's memory.
async fn well_behaved(agent: &Agent, counter: Principal, pid: u32, until: Instant) -> Served {
    let mut served = Served::default();
    while Instant::now() < until {
        let update = try_update::<(u64,)>(agent, counter, "inc", args(()));
        timed("update", update, &mut served.updates, &mut served.failures).await;
        let query = try_query::<(u64,)>(agent, counter, "get", args(()));
        timed("query", query, &mut served.queries, &mut served.failures).await;
        served.peak_rss_mib = served.peak_rss_mib.max(rss_mib(pid));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    served
}

/// Asserts the client was served throughout and that the node's resident memory comes back to
/// within 20% of `rss_before` within a minute after the attack, and prints the `attack` line.
fn report(name: &str, mut served: Served, rss_before: u64, pid: u32, shed: &str) {
    // At least OPENIC_ATTACK_SETTLE_SECONDS, then until the memory is back (at most 60 s).
    let settle = Duration::from_secs(env_seconds("OPENIC_ATTACK_SETTLE_SECONDS", 0));
    std::thread::sleep(settle);
    let bound = rss_before + rss_before / 5;
    let started = Instant::now();
    let rss_after = rss_settles(pid, bound, Duration::from_secs(60));
    let settled_in = settle + started.elapsed();
    println!(
        "attack {name}: query p50 {:.1} ms p99 {:.1} ms ({} queries), update p50 {:.1} ms p99 {:.1} ms \
         ({} updates); node RSS {rss_before} MiB before, peak {} MiB, {rss_after} MiB {:.1} s after; {shed}",
        percentile(&mut served.queries, 50.0),
        percentile(&mut served.queries, 99.0),
        served.queries.len(),
        percentile(&mut served.updates, 50.0),
        percentile(&mut served.updates, 99.0),
        served.updates.len(),
        served.peak_rss_mib,
        settled_in.as_secs_f64(),
    );
    assert!(
        served.failures.is_empty(),
        "the well-behaved client was not served during {name}: {:?}",
        served.failures
    );
    assert!(
        served.updates.len() >= 5 && served.queries.len() >= 5,
        "the well-behaved client made too little progress during {name}"
    );
    assert!(
        rss_after <= bound,
        "after {name}, resident memory {rss_after} MiB did not come back within 20% of \
         {rss_before} MiB in a minute"
    );
}

async fn node_with_counter() -> (tempfile::TempDir, OpenicProcess, Agent, Principal) {
    let state_dir = tempfile::tempdir().expect("temporary state directory");
    // The default caps: derived from the node's file limit (10,000 here, 2,500 per address).
    let process = OpenicProcess::start(state_dir.path());
    let agent = connect(process.url(), None).await;
    let counter = deploy(&agent, "counter", args(())).await;
    let (_,): (u64,) = update(&agent, counter, "inc", args(())).await;
    (state_dir, process, agent, counter)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_thousand_half_open_connections_do_not_stall_a_well_behaved_client() {
    let _attack = ONE_AT_A_TIME.lock().await;
    let (_dir, process, agent, counter) = node_with_counter().await;
    let url = process.url().to_string();
    let pid = process.pid();
    let rss_before = rss_mib(pid);
    let hold = attack_duration();
    // Two processes of 10,000 each (one process's file limit is 20,000), from eight addresses.
    let attackers = [
        attacker(&url, "half-open", 10_000, "127.0.0.2", 4, hold),
        attacker(&url, "half-open", 10_000, "127.0.0.6", 4, hold),
    ];
    let served = well_behaved(&agent, counter, pid, Instant::now() + hold).await;
    let open_during = metric(&url, "openic_http_connections_open");
    let results: Vec<_> = attackers.into_iter().map(finish).collect();
    let closed_by_server: u64 = results.iter().map(|r| r["closed_by_server"]).sum();
    let shed = closed(&url, "shed_idle_per_ip") + closed(&url, "shed_idle_full");
    report(
        "20000 half-open",
        served,
        rss_before,
        pid,
        &format!("{shed} connections shed, {open_during} open during the attack"),
    );
    assert!(
        open_during <= 10_000.0,
        "at most max_connections are open: {open_during}"
    );
    assert!(
        shed > 0.0 && closed_by_server > 0,
        "the node shed connections: {results:?}"
    );
    let (value,): (u64,) = query(&agent, counter, "get", args(())).await;
    assert!(value > 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_by_the_header_timeout() {
    let _attack = ONE_AT_A_TIME.lock().await;
    let (_dir, process, agent, counter) = node_with_counter().await;
    let url = process.url().to_string();
    let pid = process.pid();
    let rss_before = rss_mib(pid);
    // Longer than the 20 s header timeout, so every slow connection meets it.
    let hold = attack_duration().max(Duration::from_secs(24));
    let slow = attacker(&url, "slowloris", 5_000, "127.0.0.20", 2, hold);
    let served = well_behaved(&agent, counter, pid, Instant::now() + hold).await;
    let result = finish(slow);
    let timed_out = closed(&url, "header_timeout");
    report(
        "5000 slowloris",
        served,
        rss_before,
        pid,
        &format!("{timed_out} closed by the header timeout"),
    );
    assert!(
        timed_out >= 4_000.0 && result["closed_by_server"] >= 4_000,
        "slow connections were closed after the header timeout: {result:?}, {timed_out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_clients_and_heavy_queries_do_not_stall_a_well_behaved_client() {
    let _attack = ONE_AT_A_TIME.lock().await;
    let (_dir, process, agent, counter) = node_with_counter().await;
    let url = process.url().to_string();
    let pid = process.pid();
    // 32 MiB of stable memory that each heavy query reads whole.
    let (_,): (u64,) = update(&agent, counter, "fill_stable", args((0u64, 32u64))).await;
    let rss_before = rss_mib(pid);
    let hold = attack_duration();
    let keep_alive = attacker(&url, "keep-alive", 2_000, "127.0.0.30", 2, hold);
    let until = Instant::now() + hold;
    let mut heavy = Vec::new();
    for _ in 0..8 {
        let agent = connect(&url, None).await;
        heavy.push(tokio::spawn(async move {
            let mut answered = 0u64;
            while Instant::now() < until {
                let result: Result<(u64,), _> =
                    try_query(&agent, counter, "check_stable", args((0u64, 32u64))).await;
                if result.is_ok() {
                    answered += 1;
                }
            }
            answered
        }));
    }
    let served = well_behaved(&agent, counter, pid, until).await;
    let result = finish(keep_alive);
    let mut heavy_answered = 0;
    for task in heavy {
        heavy_answered += task.await.expect("a heavy query loop");
    }
    let status_answers = metric(
        &url,
        "openic_http_requests_total{endpoint=\"/api/v2/status\",status=\"200\"}",
    );
    report(
        "2000 keep-alive clients + 8 heavy query loops",
        served,
        rss_before,
        pid,
        &format!(
            "{status_answers} status answers, {heavy_answered} heavy queries answered, attacker {result:?}"
        ),
    );
    assert!(heavy_answered > 0, "the heavy queries ran");
    assert!(
        result["held_at_end"] >= 1_900,
        "keep-alive clients that keep sending are not shed: {result:?}"
    );
}

/// Samples a process's resident memory every 5 ms until dropped; `peak()` is the highest seen.
struct RssSampler {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl RssSampler {
    fn start(pid: u32) -> RssSampler {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut peak = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    peak = peak.max(rss_mib(pid));
                    std::thread::sleep(Duration::from_millis(5));
                }
                peak
            })
        };
        RssSampler {
            stop,
            thread: Some(thread),
        }
    }

    fn peak(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .take()
            .map_or(0, |thread| thread.join().expect("the sampler"))
    }
}

/// Polls the node's resident memory for up to `within` until it is at most `bound` MiB; returns
/// the last value seen.
fn rss_settles(pid: u32, bound: u64, within: Duration) -> u64 {
    let deadline = Instant::now() + within;
    loop {
        let rss = rss_mib(pid);
        if rss <= bound || Instant::now() >= deadline {
            return rss;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The budget of the memory-budget tests, in MiB.
const QUERY_MEMORY_MIB: u64 = 2048;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queries_that_each_touch_a_gigabyte_stay_within_the_memory_budget() {
    let _attack = ONE_AT_A_TIME.lock().await;
    let state_dir = tempfile::tempdir().expect("temporary state directory");
    let process = OpenicProcess::start_with(
        state_dir.path(),
        &["--query-memory-mib", &QUERY_MEMORY_MIB.to_string()],
    );
    let agent = connect(process.url(), None).await;
    let counter = deploy(&agent, "counter", args(())).await;
    let (_,): (u64,) = update(&agent, counter, "inc", args(())).await;
    let url = process.url().to_string();
    let pid = process.pid();
    let rss_before = rss_mib(pid);
    let sampler = RssSampler::start(pid);
    let until = Instant::now() + attack_duration();
    // Six clients, each asking for a 1 GiB query in a loop: three times what the budget holds.
    let mut heavy = Vec::new();
    for _ in 0..6 {
        let agent = connect(&url, None).await;
        heavy.push(tokio::spawn(async move {
            let (mut answered, mut refused, mut other) = (0u64, 0u64, Vec::new());
            while Instant::now() < until {
                match try_query::<(u64,)>(&agent, counter, "touch_heap", args((1024u64,))).await {
                    Ok((touched,)) => {
                        assert_eq!(touched, 1 << 30, "the query touched its whole gigabyte");
                        answered += 1;
                    }
                    Err(error) if error.to_string().contains("memory budget for queries") => {
                        refused += 1;
                    }
                    Err(error) => other.push(error.to_string()),
                }
            }
            (answered, refused, other)
        }));
    }
    let served = well_behaved(&agent, counter, pid, until).await;
    let (mut answered, mut refused, mut other) = (0, 0, Vec::new());
    for task in heavy {
        let (a, r, o) = task.await.expect("a heavy query loop");
        answered += a;
        refused += r;
        other.extend(o);
    }
    let peak = sampler.peak();
    let reserved_now = metric(&url, "openic_query_memory_reserved_bytes");
    let refusals = metric(&url, "openic_query_memory_refusals_total");
    let bound = rss_before + QUERY_MEMORY_MIB + QUERY_MEMORY_MIB / 10;
    let mut served = served;
    served.peak_rss_mib = served.peak_rss_mib.max(peak);
    report(
        "6 clients looping 1 GiB queries, budget 2048 MiB",
        served,
        rss_before,
        pid,
        &format!(
            "{answered} heavy queries answered, {refused} refused as busy ({refusals} by the \
             metric)"
        ),
    );
    assert!(
        other.is_empty(),
        "heavy queries failed otherwise: {other:?}"
    );
    assert!(answered > 0, "heavy queries ran");
    assert_eq!(reserved_now, 0.0, "every reservation was released");
    assert!(
        peak <= bound,
        "peak resident memory {peak} MiB exceeds {bound} MiB (before {rss_before} MiB + budget \
         {QUERY_MEMORY_MIB} MiB + 10%)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_a_reinstall_discards_goes_back_to_the_kernel() {
    let _attack = ONE_AT_A_TIME.lock().await;
    let (_dir, process, agent, counter) = node_with_counter().await;
    let pid = process.pid();
    let rss_before = rss_mib(pid);
    // 512 MiB of stable memory, in updates of 128 MiB.
    for first in (0..512u64).step_by(128) {
        let (_,): (u64,) = update(&agent, counter, "fill_stable", args((first, 128u64))).await;
    }
    let rss_filled = rss_mib(pid);
    let wasm = openic_tests::test_canister_wasm("counter");
    support::install(
        &agent,
        counter,
        &wasm,
        ic_utils::interfaces::management_canister::builders::CanisterInstallMode::Reinstall,
        args(()),
    )
    .await;
    // Updates move the certified state on, past every state that still held the old pages.
    let started = Instant::now();
    let bound = rss_before + rss_before / 5;
    let mut rss_after = rss_filled;
    while started.elapsed() < Duration::from_secs(60) {
        let (_,): (u64,) = update(&agent, counter, "inc", args(())).await;
        rss_after = rss_mib(pid);
        if rss_after <= bound {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let returned = metric(process.url(), "openic_memory_returned_bytes_total") / (1 << 20) as f64;
    println!(
        "attack reinstall discarding 512 MiB of stable memory: node RSS {rss_before} MiB before, \
         {rss_filled} MiB filled, {rss_after} MiB {:.1} s after the reinstall; {returned:.0} MiB \
         returned to the kernel by the trimmer",
        started.elapsed().as_secs_f64()
    );
    assert!(rss_filled >= rss_before + 400, "the fill was resident");
    assert!(
        rss_after <= bound,
        "resident memory {rss_after} MiB did not come back within 20% of {rss_before} MiB in 60 s"
    );
}
