//! The large-memories benchmark (issue 7): what big heaps, big stable memories, a 4 GiB module and
//! canisters that use whole messages cost the calls of everyone on the node, and how fast canister
//! code runs against the same code run natively.
//!
//! Run: `cargo build --profile bench -p openic && cargo bench -p openic-tests --bench memories`.
//! `OPENIC_BENCH_PHASES` picks phases (a comma-separated subset of
//! `heap,stable,install,compute,busy`; default all, always run in that order). Each phase starts
//! its own `openic start` node (the optimised binary in target/release) in a fresh state directory
//! and kills it (SIGKILL, by pid) at the end, so the gibibytes of one phase neither burden the next
//! nor have to be checkpointed on the way out. This process is the clients: the unmodified
//! ic-agent with default verification (one BLS check per reply) and ic-utils for the management
//! canister. Every latency is of one update through `call_and_wait`; node CPU is the user+system
//! time of the node process over the measured calls divided by their number (10 ms ticks).
//! Results go to stdout as a Markdown table, preceded by the machine they were taken on; progress
//! goes to stderr.
//!
//! Phases:
//! - `heap`: three counter canisters (created with `wasm_memory_limit` 4 GiB) with heaps of about
//!   1 MiB (as installed), 1 GiB and as close to 4 GiB as the Rust allocator gets
//!   (`grow_heap`, [`GROW_MIB_PER_CALL`] MiB per update); `inc` latency on each, measured before
//!   the next one grows.
//! - `stable`: `inc` latency on a fresh counter alone, then beside a canister whose stable memory
//!   `fill_stable` filled to 4 GiB ([`FILL_MIB_PER_CALL`] MiB per update), and on that canister.
//! - `install`: install time of a hand-written module declaring 4 GiB of initial memory, then
//!   its first update and a sample of more.
//! - `compute`: a kernel shared with the counter canister (`tests/canisters/counter/src/compute.rs`,
//!   chained SHA-256 compressions) timed natively here and as the `compute` update (its latency
//!   minus that of `inc` just before); the ratio is the canister's speed against the machine's.
//! - `busy`: `inc` latency of a small canister while [`SPINNERS`] other canisters keep running
//!   `spin`, an update that loops until the instruction limit.
//!
//! Samples stop after a time budget and the `busy` phase gives up on calls after a deadline, so a
//! run takes minutes, not hours, on two cores (most of it growing and filling memory: about 290
//! updates of 32 MiB).

use candid::{Decode, Encode, Principal};
use ic_agent::Agent;
use ic_utils::interfaces::ManagementCanister;
use openic_tests::OpenicProcess;
use openic_tests::measure::{cpu_time, ms, percentile, rss_kb};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[path = "../canisters/counter/src/compute.rs"]
mod compute;

/// The phases, in the order they run.
const PHASES: [&str; 5] = ["heap", "stable", "install", "compute", "busy"];

const MIB: u64 = 1024 * 1024;
const GIB: u64 = 1024 * MIB;
/// A wasm32 heap's largest size, and the `wasm_memory_limit` of the canisters that grow toward
/// it (the default setting, 3 GiB, would stop them).
const WASM32_HEAP_BYTES_MAX: u64 = 4 * GIB;

/// Updates made before a measurement (connections, compiled module, caches).
const WARM_UP_UPDATES: usize = 10;
/// A latency sample takes at most this many updates…
const SAMPLE_UPDATES_MAX: usize = 200;
/// …and stops earlier once this much time has passed…
const SAMPLE_TIME_BUDGET: Duration = Duration::from_secs(20);
/// …but not before this many updates.
const SAMPLE_UPDATES_MIN: usize = 10;
/// Samples taken at most to get one without a checkpoint in it.
const SAMPLE_ATTEMPTS: usize = 4;

/// MiB `grow_heap` adds per update (about 8,000 heap pages written per call).
const GROW_MIB_PER_CALL: u64 = 32;
/// The middle heap size.
const HEAP_MIDDLE_BYTES: u64 = GIB;
/// MiB `fill_stable` writes per update (as the rejoin benchmark).
const FILL_MIB_PER_CALL: u64 = 32;
/// The stable memory size the `stable` phase reaches: `fill_stable` writes from 1 MiB on, so it
/// fills `STABLE_BYTES - 1 MiB`.
const STABLE_BYTES: u64 = 4 * GIB;
/// Where `fill_stable`'s region starts in stable memory (the counter's `FILL_OFFSET`).
const FILL_OFFSET_BYTES: u64 = MIB;

/// Updates timed on the 4 GiB module after its first one.
const INSTALL_SAMPLE_UPDATES: usize = 20;
/// A module declaring 4 GiB of initial memory whose `ping` replies Candid `()`.
const FOUR_GIB_MODULE_WAT: &str = r#"(module
  (import "ic0" "msg_reply_data_append" (func $msg_reply_data_append (param i32 i32)))
  (import "ic0" "msg_reply" (func $msg_reply))
  (memory (export "memory") 65536)
  ;; Candid `()`: the magic number, no types, no values.
  (data (i32.const 0) "DIDL\00\00")
  (func $ping
    (call $msg_reply_data_append (i32.const 0) (i32.const 6))
    (call $msg_reply))
  (export "canister_update ping" (func $ping)))"#;

/// Rounds of the compute kernel used to learn its cost per round (natively and in instructions).
const COMPUTE_CALIBRATION_ROUNDS: u64 = 20_000;
/// How long the kernel should run natively: long enough that a few milliseconds of latency noise
/// do not matter.
const COMPUTE_NATIVE_TARGET: Duration = Duration::from_millis(750);
/// At most this share of the update instruction limit is used by one `compute` call.
const COMPUTE_LIMIT_SHARE: f64 = 0.5;
/// Native runs and `compute` updates (each after `inc`s for the baseline); medians are reported.
const COMPUTE_REPEATS: usize = 3;
/// `inc` updates timed before each `compute` update, whose median is subtracted.
const COMPUTE_BASELINE_INCS: usize = 5;
/// The target: canister code at least this fraction of native speed.
const COMPUTE_TARGET_RATIO: f64 = 0.5;

/// Canisters that keep running `spin` in the `busy` phase.
const SPINNERS: usize = 12;
/// `inc` calls timed in the `busy` phase.
const BUSY_INC_CALLS: usize = 50;
/// A new `inc` starts when the previous one answered or this long after it started.
const BUSY_INC_SPACING: Duration = Duration::from_secs(1);
/// An `inc` that has not answered after this long is given up and counts as slower than every
/// answered one (below ic-agent's 3-minute ingress expiry, after which the call could no longer
/// run anyway).
const BUSY_INC_TIMEOUT: Duration = Duration::from_secs(120);
/// How long the spinners run before the first `inc`.
const BUSY_HEAD_START: Duration = Duration::from_secs(3);
/// The target for `inc` p50 beside the spinners.
const BUSY_TARGET: Duration = Duration::from_millis(50);

/// One line of the result table.
struct Row {
    measurement: String,
    result: String,
    target: String,
}

/// The rows so far; each is also printed to stderr as it is made, so a failing run keeps its
/// finished figures.
#[derive(Default)]
struct Table(Vec<Row>);

impl Table {
    fn add(&mut self, measurement: impl Into<String>, result: impl Into<String>) {
        self.add_with_target(measurement, result, "–");
    }

    fn add_with_target(
        &mut self,
        measurement: impl Into<String>,
        result: impl Into<String>,
        target: impl Into<String>,
    ) {
        let row = Row {
            measurement: measurement.into(),
            result: result.into(),
            target: target.into(),
        };
        eprintln!("  {}: {} ({})", row.measurement, row.result, row.target);
        self.0.push(row);
    }

    fn print(&self) {
        println!("| measurement | result | target |");
        println!("|---|---|---|");
        for row in &self.0 {
            println!("| {} | {} | {} |", row.measurement, row.result, row.target);
        }
    }
}

/// An `openic start` node of one phase, its state directory and a verifying agent.
struct Node {
    process: OpenicProcess,
    agent: Agent,
    // Dropped after the process (fields drop in order): the state is removed once nothing uses it.
    _state_dir: tempfile::TempDir,
}

impl Node {
    fn start() -> Node {
        let state_dir = tempfile::tempdir().expect("tempdir");
        let process = tokio::task::block_in_place(|| OpenicProcess::start(state_dir.path()));
        let agent = Agent::builder()
            .with_url(process.url())
            .build()
            .expect("agent");
        agent.set_root_key(process.root_key_der().to_vec());
        Node {
            process,
            agent,
            _state_dir: state_dir,
        }
    }

    fn pid(&self) -> u32 {
        self.process.pid()
    }

    fn cpu(&self) -> Duration {
        cpu_time(Some(self.pid()))
    }

    fn rss(&self) -> String {
        format!("{} kB", rss_kb(self.pid()))
    }

    /// A new canister with the default provisional cycles, and `wasm_memory_limit` if given.
    async fn create_canister(&self, wasm_memory_limit: Option<u64>) -> Principal {
        let management = ManagementCanister::create(&self.agent);
        let mut builder = management
            .create_canister()
            .as_provisional_create_with_amount(None);
        if let Some(limit) = wasm_memory_limit {
            builder = builder.with_wasm_memory_limit(limit);
        }
        let (canister,) = builder.call_and_wait().await.expect("create canister");
        canister
    }

    /// A new canister running `wasm`.
    async fn install(&self, wasm: &[u8], wasm_memory_limit: Option<u64>) -> Principal {
        let canister = self.create_canister(wasm_memory_limit).await;
        ManagementCanister::create(&self.agent)
            .install(&canister, wasm)
            .await
            .expect("install");
        canister
    }

    /// An update without arguments; panics if it fails.
    async fn update(&self, canister: Principal, method: &str) {
        update(&self.agent, canister, method, Encode!().expect("encode"))
            .await
            .unwrap_or_else(|error| panic!("{method} on {canister}: {error}"));
    }

    /// An update whose reply is one `nat64`; panics if it fails.
    async fn update_u64(&self, canister: Principal, method: &str, argument: Vec<u8>) -> u64 {
        let reply = update(&self.agent, canister, method, argument)
            .await
            .unwrap_or_else(|error| panic!("{method} on {canister}: {error}"));
        Decode!(&reply, u64).expect("nat64 reply")
    }

    /// How many checkpoints the node has written (its `/metrics`).
    async fn checkpoints(&self) -> u64 {
        let text = reqwest::get(format!("{}/metrics", self.process.url()))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("metrics body");
        text.lines()
            .find_map(|line| line.strip_prefix("openic_checkpoint_duration_seconds_count "))
            .and_then(|count| count.trim().parse().ok())
            .unwrap_or(0)
    }

    /// Times sequential updates `method` on `canister` after a warm-up: [`SAMPLE_UPDATES_MAX`]
    /// of them, or fewer (at least [`SAMPLE_UPDATES_MIN`]) once [`SAMPLE_TIME_BUDGET`] is spent.
    /// A sample during which the node wrote a checkpoint (seconds of hashing and writing after
    /// gigabytes changed, a cost of persisting them rather than of the updates) is taken again,
    /// up to [`SAMPLE_ATTEMPTS`] times; the sample says how many checkpoints it still contains.
    async fn sample(&self, canister: Principal, method: &str) -> Sample {
        for _ in 0..WARM_UP_UPDATES {
            self.update(canister, method).await;
        }
        let mut attempt = 0;
        loop {
            attempt += 1;
            let checkpoints_before = self.checkpoints().await;
            let cpu_before = self.cpu();
            let started = Instant::now();
            let mut latencies = Vec::with_capacity(SAMPLE_UPDATES_MAX);
            while latencies.len() < SAMPLE_UPDATES_MAX
                && (latencies.len() < SAMPLE_UPDATES_MIN || started.elapsed() < SAMPLE_TIME_BUDGET)
            {
                let call_started = Instant::now();
                self.update(canister, method).await;
                latencies.push(call_started.elapsed());
            }
            let node_cpu = self.cpu().saturating_sub(cpu_before);
            let checkpoints = self.checkpoints().await - checkpoints_before;
            if checkpoints == 0 || attempt == SAMPLE_ATTEMPTS {
                let mut sample = Sample::new(latencies, node_cpu);
                sample.checkpoints = checkpoints;
                return sample;
            }
            eprintln!("    a checkpoint fell into the sample of {method}; taking it again");
        }
    }

    /// Stops the node with SIGKILL (a multi-GiB state is not worth a final checkpoint) and removes
    /// its state.
    fn kill(self) {
        let Node {
            process,
            _state_dir: state_dir,
            ..
        } = self;
        process.kill();
        drop(state_dir);
    }
}

async fn update(
    agent: &Agent,
    canister: Principal,
    method: &str,
    argument: Vec<u8>,
) -> Result<Vec<u8>, ic_agent::AgentError> {
    agent
        .update(&canister, method)
        .with_arg(argument)
        .call_and_wait()
        .await
}

/// Latencies of a run of updates and the node CPU they cost.
struct Sample {
    sorted: Vec<Duration>,
    node_cpu: Duration,
    /// Checkpoints the node wrote during the sample.
    checkpoints: u64,
}

impl Sample {
    fn new(mut latencies: Vec<Duration>, node_cpu: Duration) -> Sample {
        assert!(!latencies.is_empty(), "a sample needs at least one update");
        latencies.sort();
        Sample {
            sorted: latencies,
            node_cpu,
            checkpoints: 0,
        }
    }

    fn p50(&self) -> Duration {
        percentile(&self.sorted, 0.5)
    }

    /// "p50 / p99 (max); node CPU per update (n updates)".
    fn summary(&self) -> String {
        let count = self.sorted.len();
        let checkpoints = match self.checkpoints {
            0 => String::new(),
            n => format!(", {n} checkpoint(s) during the sample"),
        };
        format!(
            "{} / {} (max {}); node CPU {} per update ({count} updates{checkpoints})",
            ms(self.p50()),
            ms(percentile(&self.sorted, 0.99)),
            ms(*self.sorted.last().expect("not empty")),
            cpu(self.node_cpu / count as u32),
        )
    }
}

/// The median of `durations`, which must not be empty.
fn median(mut durations: Vec<Duration>) -> Duration {
    durations.sort();
    percentile(&durations, 0.5)
}

/// A CPU time from `/proc`, which counts in 10 ms ticks: zero means less than one tick.
fn cpu(duration: Duration) -> String {
    if duration.is_zero() {
        "< 10 ms".to_string()
    } else {
        ms(duration)
    }
}

/// `number` with thousands separators.
fn grouped(number: u64) -> String {
    let digits = number.to_string();
    let mut text = String::new();
    for (index, digit) in digits.chars().enumerate() {
        if index > 0 && (digits.len() - index).is_multiple_of(3) {
            text.push(',');
        }
        text.push(digit);
    }
    text
}

/// `bytes` in MiB, or GiB from 1 GiB on.
fn size(bytes: u64) -> String {
    if bytes >= GIB {
        format!("{:.2} GiB", bytes as f64 / GIB as f64)
    } else {
        format!("{:.1} MiB", bytes as f64 / MIB as f64)
    }
}

fn seconds(duration: Duration) -> String {
    format!("{:.1} s", duration.as_secs_f64())
}

fn verdict(met: bool) -> &'static str {
    if met { "✅" } else { "❌" }
}

/// The first `limit` characters of `text` on one line (for error messages in the table).
fn shortened(text: &str, limit: usize) -> String {
    let line: String = text.split_whitespace().collect::<Vec<_>>().join(" ");
    match line.char_indices().nth(limit) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// The machine and the load it had when the benchmark started.
fn machine_notes() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("model name"))
                .map(|rest| rest.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |cores| cores.get());
    let memory_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|line| line.strip_prefix("MemTotal:"))
                .and_then(|rest| rest.split_whitespace().next()?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / (1024.0 * 1024.0));
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|text| text.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into());
    format!(
        "{cpu}, {cores} cores, {memory_gib:.0} GiB; load average {load} at the start; node {}",
        openic_tests::openic_binary().display()
    )
}

/// The phases `OPENIC_BENCH_PHASES` names (all when unset), in [`PHASES`] order.
fn selected_phases() -> Vec<&'static str> {
    let Ok(list) = std::env::var("OPENIC_BENCH_PHASES") else {
        return PHASES.to_vec();
    };
    let named: Vec<&str> = list
        .split(',')
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .collect();
    for name in &named {
        assert!(
            PHASES.contains(name),
            "OPENIC_BENCH_PHASES names {name:?}; the phases are {}",
            PHASES.join(",")
        );
    }
    PHASES
        .into_iter()
        .filter(|phase| named.contains(phase))
        .collect()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let phases = selected_phases();
    let notes = machine_notes();
    let counter_wasm = openic_tests::test_canister_wasm("counter");
    let mut table = Table::default();
    let started = Instant::now();
    for phase in &phases {
        eprintln!("phase {phase} (at {})", seconds(started.elapsed()));
        match *phase {
            "heap" => heap_phase(&counter_wasm, &mut table).await,
            "stable" => stable_phase(&counter_wasm, &mut table).await,
            "install" => install_phase(&mut table).await,
            "compute" => compute_phase(&counter_wasm, &mut table).await,
            "busy" => busy_phase(&counter_wasm, &mut table).await,
            other => unreachable!("unknown phase {other}"),
        }
    }
    println!("**Machine:** {notes}. Phases: {}.", phases.join(", "));
    println!(
        "Total time {}; one `openic start` node per phase.",
        seconds(started.elapsed())
    );
    println!();
    table.print();
}

/// Grows `canister`'s heap with `grow_heap` in [`GROW_MIB_PER_CALL`] MiB steps until it holds
/// `target_bytes`, or until a call adds nothing or fails (the allocator's or the platform's limit).
/// Returns the heap size reached, the updates made, how long they took and, if growth stopped
/// early, why.
async fn grow_heap_to(
    node: &Node,
    canister: Principal,
    target_bytes: u64,
) -> (u64, usize, Duration, Option<String>) {
    let started = Instant::now();
    let mut heap = node
        .update_u64(canister, "grow_heap", Encode!(&0u64).expect("encode"))
        .await;
    let mut calls = 0;
    let calls_max = (WASM32_HEAP_BYTES_MAX / (GROW_MIB_PER_CALL * MIB)) as usize + 8;
    let stopped = loop {
        if heap >= target_bytes {
            break None;
        }
        if calls >= calls_max {
            break Some(format!("gave up after {calls} updates"));
        }
        let mib = GROW_MIB_PER_CALL.min((target_bytes - heap).div_ceil(MIB));
        let reply = update(
            &node.agent,
            canister,
            "grow_heap",
            Encode!(&mib).expect("encode"),
        )
        .await;
        calls += 1;
        let grown = match reply {
            Ok(reply) => Decode!(&reply, u64).expect("grow_heap reply"),
            Err(error) => {
                break Some(format!(
                    "grow_heap failed: {}",
                    shortened(&error.to_string(), 160)
                ));
            }
        };
        if calls.is_multiple_of(16) {
            eprintln!(
                "    heap {} after {calls} updates ({})",
                size(grown),
                seconds(started.elapsed())
            );
        }
        if grown <= heap {
            break Some("the canister stopped adding blocks".to_string());
        }
        heap = grown;
    };
    (heap, calls, started.elapsed(), stopped)
}

async fn heap_phase(counter_wasm: &[u8], table: &mut Table) {
    let node = Node::start();
    let mut canisters = Vec::new();
    for _ in 0..3 {
        canisters.push(
            node.install(counter_wasm, Some(WASM32_HEAP_BYTES_MAX))
                .await,
        );
    }
    // (label, target heap): as installed, 1 GiB, and as far toward 4 GiB as it goes.
    let targets = [
        ("as installed", 0),
        ("1 GiB", HEAP_MIDDLE_BYTES),
        ("max", WASM32_HEAP_BYTES_MAX),
    ];
    for (canister, (label, target)) in canisters.into_iter().zip(targets) {
        let (heap, calls, took, stopped) = grow_heap_to(&node, canister, target).await;
        if calls > 0 {
            let stop_note = stopped.map_or(String::new(), |why| format!("; stopped: {why}"));
            table.add(
                format!(
                    "heap {label}: grow to {} with `grow_heap` ({calls} updates of ≤ {GROW_MIB_PER_CALL} MiB)",
                    size(heap)
                ),
                format!("{}{stop_note}", seconds(took)),
            );
        }
        let sample = node.sample(canister, "inc").await;
        table.add(
            format!(
                "`inc` on a canister with a {} heap ({label}; {} bytes): p50 / p99 (max)",
                size(heap),
                grouped(heap)
            ),
            sample.summary(),
        );
        table.add(format!("node RSS with that heap ({label})"), node.rss());
    }
    node.kill();
}

async fn stable_phase(counter_wasm: &[u8], table: &mut Table) {
    let node = Node::start();
    let small = node.install(counter_wasm, None).await;
    let big = node.install(counter_wasm, None).await;
    let alone = node.sample(small, "inc").await;
    table.add(
        "`inc` on a small canister, its neighbour's stable memory empty: p50 / p99 (max)",
        alone.summary(),
    );

    let fill_mib = (STABLE_BYTES - FILL_OFFSET_BYTES) / MIB;
    let started = Instant::now();
    let cpu_before = node.cpu();
    let mut first = 0;
    let mut stable = 0;
    let mut calls: u64 = 0;
    while first < fill_mib {
        let count = FILL_MIB_PER_CALL.min(fill_mib - first);
        stable = node
            .update_u64(big, "fill_stable", Encode!(&first, &count).expect("encode"))
            .await;
        assert!(
            stable >= FILL_OFFSET_BYTES + (first + count) * MIB,
            "fill_stable({first}, {count}) left stable memory at {stable} bytes"
        );
        first += count;
        calls += 1;
        if calls.is_multiple_of(16) {
            eprintln!(
                "    stable memory {} after {calls} updates ({})",
                size(stable),
                seconds(started.elapsed())
            );
        }
    }
    let fill_cpu = node.cpu().saturating_sub(cpu_before);
    table.add(
        format!(
            "fill {} of stable memory with `fill_stable` ({calls} updates of {FILL_MIB_PER_CALL} MiB)",
            size(stable)
        ),
        format!("{} (node CPU {})", seconds(started.elapsed()), seconds(fill_cpu)),
    );

    let beside = node.sample(small, "inc").await;
    table.add(
        format!(
            "**`inc` on a small canister beside one holding {} of stable memory**: p50 / p99 (max)",
            size(stable)
        ),
        beside.summary(),
    );
    let own = node.sample(big, "inc").await;
    table.add(
        format!(
            "`inc` on the canister holding {} of stable memory: p50 / p99 (max)",
            size(stable)
        ),
        own.summary(),
    );
    table.add("node RSS with it", node.rss());
    node.kill();
}

async fn install_phase(table: &mut Table) {
    let module = wat::parse_str(FOUR_GIB_MODULE_WAT).expect("the 4 GiB module's WAT is valid");
    let node = Node::start();
    let canister = node.create_canister(Some(WASM32_HEAP_BYTES_MAX)).await;
    let cpu_before = node.cpu();
    let started = Instant::now();
    ManagementCanister::create(&node.agent)
        .install(&canister, &module)
        .await
        .expect("install the module declaring 4 GiB of memory");
    let install_time = started.elapsed();
    let install_cpu = node.cpu().saturating_sub(cpu_before);
    table.add(
        format!(
            "**install a {}-byte module declaring 4 GiB of initial memory** (`install_code` through ic-utils)",
            module.len()
        ),
        format!("{} (node CPU {})", ms(install_time), cpu(install_cpu)),
    );

    let cpu_before = node.cpu();
    let started = Instant::now();
    let reply = update(&node.agent, canister, "ping", Encode!().expect("encode"))
        .await
        .expect("the first ping on the 4 GiB module");
    let first_ping = started.elapsed();
    let first_ping_cpu = node.cpu().saturating_sub(cpu_before);
    Decode!(&reply).expect("ping replies ()");
    table.add(
        "its first update (`ping`)",
        format!("{} (node CPU {})", ms(first_ping), cpu(first_ping_cpu)),
    );

    let cpu_before = node.cpu();
    let mut latencies = Vec::with_capacity(INSTALL_SAMPLE_UPDATES);
    for _ in 0..INSTALL_SAMPLE_UPDATES {
        let started = Instant::now();
        node.update(canister, "ping").await;
        latencies.push(started.elapsed());
    }
    let sample = Sample::new(latencies, node.cpu().saturating_sub(cpu_before));
    table.add("its next updates: p50 / p99 (max)", sample.summary());
    table.add("node RSS with it", node.rss());
    node.kill();
}

/// Runs the compute kernel natively `repeats` times with `rounds`; returns the median time and
/// the result (the same every time).
fn native_compute(rounds: u64, repeats: usize) -> (Duration, u64) {
    let mut times = Vec::with_capacity(repeats);
    let mut result = None;
    for _ in 0..repeats {
        let started = Instant::now();
        let value = std::hint::black_box(compute::compute(std::hint::black_box(rounds)));
        times.push(started.elapsed());
        assert!(
            result.is_none_or(|previous| previous == value),
            "the kernel is not deterministic"
        );
        result = Some(value);
    }
    times.sort();
    (times[times.len() / 2], result.expect("at least one run"))
}

async fn compute_phase(counter_wasm: &[u8], table: &mut Table) {
    let limits = openic_node::NodeConfig::new("unused").execution;
    let node = Node::start();
    let canister = node.install(counter_wasm, None).await;

    // What a round costs: wasm instructions (a query reports them) and native time.
    let reply = node
        .agent
        .query(&canister, "compute_instructions")
        .with_arg(Encode!(&COMPUTE_CALIBRATION_ROUNDS).expect("encode"))
        .call()
        .await
        .expect("compute_instructions");
    let calibration_instructions = Decode!(&reply, u64).expect("compute_instructions reply");
    let instructions_per_round =
        calibration_instructions as f64 / COMPUTE_CALIBRATION_ROUNDS as f64;
    let (calibration_time, _) =
        tokio::task::block_in_place(|| native_compute(COMPUTE_CALIBRATION_ROUNDS, COMPUTE_REPEATS));
    let native_per_round = calibration_time.as_secs_f64() / COMPUTE_CALIBRATION_ROUNDS as f64;
    let rounds_by_time = (COMPUTE_NATIVE_TARGET.as_secs_f64() / native_per_round) as u64;
    let rounds_by_limit = (limits.max_instructions_per_update as f64 * COMPUTE_LIMIT_SHARE
        / instructions_per_round) as u64;
    let rounds = rounds_by_time.min(rounds_by_limit).max(1);
    let (native_time, expected) =
        tokio::task::block_in_place(|| native_compute(rounds, COMPUTE_REPEATS));

    for _ in 0..WARM_UP_UPDATES {
        node.update(canister, "inc").await;
    }
    let mut canister_times = Vec::with_capacity(COMPUTE_REPEATS);
    let mut canister_cpu = Vec::with_capacity(COMPUTE_REPEATS);
    let mut inc_medians = Vec::with_capacity(COMPUTE_REPEATS);
    for repeat in 0..COMPUTE_REPEATS {
        let mut incs = Vec::with_capacity(COMPUTE_BASELINE_INCS);
        for _ in 0..COMPUTE_BASELINE_INCS {
            let started = Instant::now();
            node.update(canister, "inc").await;
            incs.push(started.elapsed());
        }
        let inc_median = median(incs);
        let cpu_before = node.cpu();
        let started = Instant::now();
        let value = node
            .update_u64(canister, "compute", Encode!(&rounds).expect("encode"))
            .await;
        let latency = started.elapsed();
        canister_cpu.push(node.cpu().saturating_sub(cpu_before));
        assert_eq!(
            value, expected,
            "the canister's kernel computed another result than the native one"
        );
        eprintln!(
            "    compute #{repeat}: {} (inc {})",
            ms(latency),
            ms(inc_median)
        );
        canister_times.push(latency.saturating_sub(inc_median));
        inc_medians.push(inc_median);
    }
    let canister_time = median(canister_times);
    let node_cpu = median(canister_cpu);
    let inc_median = median(inc_medians);
    let ratio = native_time.as_secs_f64() / canister_time.as_secs_f64().max(1e-9);
    let ratio_by_cpu = native_time.as_secs_f64() / node_cpu.as_secs_f64().max(1e-9);
    table.add(
        format!(
            "compute kernel natively in the bench process: {} chained SHA-256 compressions (bench profile, median of {COMPUTE_REPEATS})",
            grouped(rounds)
        ),
        ms(native_time),
    );
    table.add(
        format!(
            "the same in the canister (`compute` update; counter built with tests/canisters' release profile, opt-level \"s\"): latency − `inc` latency ({}) / node CPU per call, medians of {COMPUTE_REPEATS}",
            ms(inc_median)
        ),
        format!("{} / {}", ms(canister_time), cpu(node_cpu)),
    );
    table.add_with_target(
        "**canister speed / native speed** (by latency; by node CPU)",
        format!("**{:.0}%**; {:.0}%", ratio * 100.0, ratio_by_cpu * 100.0),
        format!(
            "≥ {:.0}% {}",
            COMPUTE_TARGET_RATIO * 100.0,
            verdict(ratio >= COMPUTE_TARGET_RATIO)
        ),
    );
    table.add(
        format!(
            "wasm instructions per round / executed per second in the canister (limit per update {})",
            grouped(limits.max_instructions_per_update)
        ),
        format!(
            "{instructions_per_round:.0} / {:.2} G/s",
            instructions_per_round * rounds as f64 / canister_time.as_secs_f64().max(1e-9) / 1e9
        ),
    );
    node.kill();
}

/// What the spinners saw.
#[derive(Default)]
struct SpinOutcomes {
    /// `spin` calls that ended with an error (the expected outcome).
    failed: u64,
    /// `spin` calls that replied (never expected).
    replied: u64,
    first_error: Option<String>,
}

async fn busy_phase(counter_wasm: &[u8], table: &mut Table) {
    let limits = openic_node::NodeConfig::new("unused").execution;
    let node = Node::start();
    let small = node.install(counter_wasm, None).await;
    let mut spinners = Vec::with_capacity(SPINNERS);
    for _ in 0..SPINNERS {
        spinners.push(node.install(counter_wasm, None).await);
    }
    let alone = node.sample(small, "inc").await;
    table.add(
        format!("`inc` on a small canister, {SPINNERS} other canisters idle: p50 / p99 (max)"),
        alone.summary(),
    );

    let stop = Arc::new(AtomicBool::new(false));
    let outcomes = Arc::new(std::sync::Mutex::new(SpinOutcomes::default()));
    let spin_tasks: Vec<_> = spinners
        .iter()
        .map(|spinner| {
            let (agent, spinner, stop, outcomes) =
                (node.agent.clone(), *spinner, stop.clone(), outcomes.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let result = update(&agent, spinner, "spin", Encode!().expect("encode")).await;
                    let mut outcomes = outcomes.lock().unwrap_or_else(|poison| poison.into_inner());
                    match result {
                        Ok(_) => outcomes.replied += 1,
                        Err(error) => {
                            outcomes.failed += 1;
                            outcomes
                                .first_error
                                .get_or_insert_with(|| error.to_string());
                        }
                    }
                }
            })
        })
        .collect();
    tokio::time::sleep(BUSY_HEAD_START).await;

    let cpu_before = node.cpu();
    let started = Instant::now();
    let mut calls = Vec::with_capacity(BUSY_INC_CALLS);
    for index in 0..BUSY_INC_CALLS {
        let (answered, answer) = tokio::sync::oneshot::channel::<()>();
        let agent = node.agent.clone();
        calls.push(tokio::spawn(async move {
            let call_started = Instant::now();
            let result = tokio::time::timeout(
                BUSY_INC_TIMEOUT,
                update(&agent, small, "inc", Encode!().expect("encode")),
            )
            .await;
            let _ = answered.send(());
            match result {
                Ok(Ok(_)) => Ok(call_started.elapsed()),
                Ok(Err(error)) => Err(Some(error.to_string())),
                Err(_) => Err(None),
            }
        }));
        let _ = tokio::time::timeout(BUSY_INC_SPACING, answer).await;
        if index % 10 == 9 {
            eprintln!(
                "    {} incs started ({})",
                index + 1,
                seconds(started.elapsed())
            );
        }
    }
    let mut answered = Vec::new();
    let mut timed_out = 0;
    let mut failed = 0;
    let mut first_failure = None;
    for call in calls {
        match call.await.expect("inc task") {
            Ok(latency) => answered.push(latency),
            Err(None) => timed_out += 1,
            Err(Some(error)) => {
                failed += 1;
                first_failure.get_or_insert(error);
            }
        }
    }
    let wall = started.elapsed();
    let node_cpu = node.cpu().saturating_sub(cpu_before);
    stop.store(true, Ordering::Relaxed);
    for task in &spin_tasks {
        task.abort();
    }
    let outcomes =
        std::mem::take(&mut *outcomes.lock().unwrap_or_else(|poison| poison.into_inner()));

    // Calls that did not answer count as slower than any that did.
    answered.sort();
    let rank = |p: f64| -> String {
        let index = ((BUSY_INC_CALLS as f64 - 1.0) * p).round() as usize;
        match answered.get(index) {
            Some(latency) => ms(*latency),
            None => "no answer".to_string(),
        }
    };
    let p50_met = answered
        .get(((BUSY_INC_CALLS as f64 - 1.0) * 0.5).round() as usize)
        .is_some_and(|p50| *p50 <= BUSY_TARGET);
    let mut unanswered = String::new();
    if timed_out > 0 {
        unanswered.push_str(&format!(
            "; {timed_out} unanswered after {}",
            seconds(BUSY_INC_TIMEOUT)
        ));
    }
    if let Some(error) = first_failure {
        unanswered.push_str(&format!(
            "; {failed} failed, first: {}",
            shortened(&error, 160)
        ));
    }
    table.add_with_target(
        format!(
            "**`inc` on a small canister while {SPINNERS} canisters each run updates to the instruction limit** ({} instructions; a new `inc` when the last answered or after {}): p50 / p99 (max)",
            grouped(limits.max_instructions_per_update),
            seconds(BUSY_INC_SPACING)
        ),
        format!(
            "**{}** / {} ({} of {BUSY_INC_CALLS} answered{unanswered})",
            rank(0.5),
            rank(0.99),
            answered.len()
        ),
        format!("p50 ≤ {} {}", ms(BUSY_TARGET), verdict(p50_met)),
    );
    table.add(
        "node CPU per `inc` in that phase (the spinning included)",
        format!(
            "{} ({} of CPU over {})",
            ms(node_cpu / BUSY_INC_CALLS as u32),
            seconds(node_cpu),
            seconds(wall)
        ),
    );
    table.add(
        "`spin` calls ended meanwhile (each should fail at the instruction limit)",
        format!(
            "{} failed, {} replied; first error: {}",
            outcomes.failed,
            outcomes.replied,
            outcomes
                .first_error
                .as_deref()
                .map_or("none".to_string(), |error| shortened(error, 200))
        ),
    );
    node.kill();
}
