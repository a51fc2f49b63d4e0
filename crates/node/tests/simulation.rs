//! The whole subnet in Commonware's deterministic runtime: four replicas, each running the real
//! BFT engine, the real scheduler with the wasmtime embedder and the real threshold-certified
//! state store, over a simulated network that delays, drops and partitions, with one Byzantine
//! replica (see `openic_consensus::simulation` for the faults and the checked properties).
//!
//! Every replica installs a counter canister through signed management-canister ingress and then
//! executes signed `inc` calls; every certificate a replica publishes is checked with ic-agent's
//! `Agent::verify` (freshness window widened, since simulated time starts at the Unix epoch).
//!
//! Seeds: 200 by default; `OPENIC_SIM_SEEDS=<n>` runs `n` seeds from `OPENIC_SIM_FIRST_SEED`
//! (default 0), `OPENIC_SIM_SEED=<n>` replays one. A failing seed is printed with the command that replays it.

#![allow(
    clippy::disallowed_methods,
    clippy::disallowed_types,
    reason = "test-only glue around the simulation; the simulated replicas stay deterministic"
)]

use candid::{Encode, Nat};
use ic_management_canister_types::{
    CanisterInstallMode, InstallCodeArgs, ProvisionalCreateCanisterWithCyclesArgs,
};
use openic_certification::{CertifiedStateStore, SubnetInfo};
use openic_consensus::bft::{BlockContent, BlockHeader, BlockPolicy, BlockView, FinalizedBlock};
use openic_consensus::simulation::{
    ReplicaSetup, SimulatedClock, SimulatedReplica, SimulationConfig, SimulationReport, run,
};
use openic_crypto::request_id::{request_id, text_map};
use openic_crypto::self_authenticating_principal;
use openic_embedders::{EmbedderConfig, WasmtimeEmbedder};
use openic_execution::{ExecutionConfig, Scheduler, SubnetContext};
use openic_interfaces::{BlockExecutor, CertifiedStateReader};
use openic_node::replica::{block_randomness, decode_ingress_entry, encode_ingress_entry};
use openic_replicated_state::ReplicatedState;
use openic_types::ids::{FIRST_USER_CANISTER_INDEX, subnet_canister_ranges};
use openic_types::{
    Block, CanisterId, Height, IngressEnvelope, IngressState, NodeId, RequestId, SubnetId, Time,
};
use serde_cbor::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

const REPLICAS: usize = 4;
/// Heights every honest replica must certify in each run.
const CERTIFIED_HEIGHTS: u64 = 6;
/// Seeds of a normal test run, split over [`PARTS`] test functions so they use every core.
const DEFAULT_SEEDS: u64 = 200;
const PARTS: u64 = 4;
/// How far a block's time may be ahead of a replica's clock (as in `openic_node::replica`).
const MAX_BLOCK_TIME_AHEAD: Duration = Duration::from_secs(2);
/// Expiry of every scripted call: simulated time starts at the Unix epoch, and a run takes
/// seconds (at most the liveness bound).
const INGRESS_EXPIRY: Duration = Duration::from_secs(280);
/// Scripted `inc` calls; call `k` may be proposed from height `k + 2` on.
const INC_CALLS: u64 = 12;

/// A counter canister: `inc` adds one and replies with the counter (4 bytes little-endian).
const COUNTER_WAT: &str = r#"
(module
  (import "ic0" "msg_reply" (func $msg_reply))
  (import "ic0" "msg_reply_data_append" (func $append (param i32 i32)))
  (memory 1)
  (global $counter (mut i32) (i32.const 0))
  (func (export "canister_update inc")
    (global.set $counter (i32.add (global.get $counter) (i32.const 1)))
    (i32.store (i32.const 0) (global.get $counter))
    (call $append (i32.const 0) (i32.const 4))
    (call $msg_reply))
)
"#;

/// One scripted call: from which height it may be proposed, its request id and block entry.
struct ScriptedCall {
    release_height: u64,
    request_id: RequestId,
    entry: Vec<u8>,
}

fn counter_canister() -> CanisterId {
    CanisterId::from_u64(FIRST_USER_CANISTER_INDEX)
}

/// A signed call envelope (Ed25519 sender) as ic-agent would send it.
fn signed_call(
    user: &ic_ed25519::PrivateKey,
    canister: CanisterId,
    effective: CanisterId,
    method: &str,
    arg: Vec<u8>,
    nonce: u64,
) -> (RequestId, Vec<u8>) {
    let der = user.public_key().serialize_rfc8410_der();
    let sender = self_authenticating_principal(&der);
    let content = text_map([
        ("request_type", Value::Text("call".into())),
        ("sender", Value::Bytes(sender.as_slice().to_vec())),
        (
            "ingress_expiry",
            Value::Integer(INGRESS_EXPIRY.as_nanos() as i128),
        ),
        (
            "canister_id",
            Value::Bytes(canister.get().as_slice().to_vec()),
        ),
        ("method_name", Value::Text(method.into())),
        ("arg", Value::Bytes(arg)),
        ("nonce", Value::Bytes(nonce.to_be_bytes().to_vec())),
    ]);
    let id = request_id(&content).expect("hashable content");
    let mut message = b"\x0Aic-request".to_vec();
    message.extend_from_slice(&id.0);
    let mut envelope = text_map([("content", Value::Map(content))]);
    envelope.insert(Value::Text("sender_pubkey".into()), Value::Bytes(der));
    envelope.insert(
        Value::Text("sender_sig".into()),
        Value::Bytes(user.sign_message(&message).to_vec()),
    );
    let bytes = serde_cbor::to_vec(&Value::Map(envelope)).expect("encodable");
    let entry = encode_ingress_entry(&IngressEnvelope {
        effective_canister_id: effective,
        bytes: bytes.into(),
    });
    (id, entry)
}

/// Create the counter canister, install it, then `inc` it [`INC_CALLS`] times.
fn script() -> Arc<Vec<ScriptedCall>> {
    let user = ic_ed25519::PrivateKey::generate_from_seed(&[42; 32]);
    let canister = counter_canister();
    let create = ProvisionalCreateCanisterWithCyclesArgs {
        amount: Some(Nat::from(10_000_000_000_000u64)),
        settings: None,
        specified_id: None,
        sender_canister_version: None,
    };
    let install = InstallCodeArgs {
        mode: CanisterInstallMode::Install,
        canister_id: canister.get(),
        wasm_module: wat::parse_str(COUNTER_WAT).expect("valid WAT"),
        arg: vec![],
        sender_canister_version: None,
    };
    let mut calls = vec![
        (
            1,
            signed_call(
                &user,
                CanisterId::management(),
                canister,
                "provisional_create_canister_with_cycles",
                Encode!(&create).expect("candid"),
                0,
            ),
        ),
        (
            1,
            signed_call(
                &user,
                CanisterId::management(),
                canister,
                "install_code",
                Encode!(&install).expect("candid"),
                1,
            ),
        ),
    ];
    for k in 0..INC_CALLS {
        calls.push((
            k + 2,
            signed_call(&user, canister, canister, "inc", Vec::new(), 100 + k),
        ));
    }
    Arc::new(
        calls
            .into_iter()
            .map(|(release_height, (request_id, entry))| ScriptedCall {
                release_height,
                request_id,
                entry,
            })
            .collect(),
    )
}

/// The subnet's fixed facts every replica of a run shares.
struct SubnetFacts {
    subnet_id: SubnetId,
    http: openic_http_api::HttpApiConfig,
}

/// The honest policy: proposes scripted calls not executed yet, checks like
/// `openic_node::replica::ReplicaPolicy` (duplicated glue: the real one is crate-private and
/// tied to the ingress pool): block time at most 2 s ahead of the clock, every entry a valid
/// signed envelope for this subnet at the block's time, no request twice in a block.
#[derive(Clone)]
struct ScriptPolicy {
    facts: Arc<SubnetFacts>,
    clock: SimulatedClock,
    script: Arc<Vec<ScriptedCall>>,
    executed: Arc<Mutex<BTreeSet<RequestId>>>,
}

impl BlockPolicy for ScriptPolicy {
    fn propose(&mut self, parent: &BlockHeader) -> BlockContent {
        let executed = self.executed.lock().unwrap();
        let ingress = self
            .script
            .iter()
            .filter(|call| {
                call.release_height <= parent.height + 1 && !executed.contains(&call.request_id)
            })
            .map(|call| call.entry.clone())
            .collect();
        BlockContent {
            time_nanos: self.clock.now_nanos().max(parent.time_nanos + 1),
            ingress,
        }
    }

    fn verify(&mut self, _parent: &BlockHeader, block: &BlockView<'_>) -> Result<(), String> {
        let limit = self.clock.now_nanos() + MAX_BLOCK_TIME_AHEAD.as_nanos() as u64;
        if block.time_nanos > limit {
            return Err(format!("block time {} ahead of {limit}", block.time_nanos));
        }
        let mut ids = BTreeSet::new();
        for entry in block.ingress {
            let envelope = decode_ingress_entry(entry)?;
            let message = openic_http_api::validate_ingress_envelope(
                &envelope,
                self.facts.subnet_id,
                Time(block.time_nanos),
                &self.facts.http,
            )
            .map_err(|e| e.to_string())?;
            if !ids.insert(message.request_id) {
                return Err("a request twice in one block".to_string());
            }
        }
        Ok(())
    }
}

/// What the test reads back from every replica after a run.
#[derive(Default)]
struct Outcome {
    /// Highest counter value an `inc` replied with, per replica.
    counter: BTreeMap<usize, u32>,
    /// Certificates checked with ic-agent, per replica.
    verified_certificates: BTreeMap<usize, u64>,
}

/// One replica: real scheduler and wasmtime, real threshold certified-state store.
struct NodeReplica {
    index: usize,
    policy: ScriptPolicy,
    state: ReplicatedState,
    scheduler: Scheduler,
    store: CertifiedStateStore,
    agent: Arc<ic_agent::Agent>,
    outcome: Arc<Mutex<Outcome>>,
}

/// One wasmtime engine for the process (building one per replica and seed would dominate the
/// run time); each replica has its own scheduler and state.
fn embedder() -> Arc<WasmtimeEmbedder> {
    static EMBEDDER: OnceLock<Arc<WasmtimeEmbedder>> = OnceLock::new();
    EMBEDDER
        .get_or_init(|| {
            Arc::new(WasmtimeEmbedder::new(EmbedderConfig::default()).expect("engine builds"))
        })
        .clone()
}

/// Node identities of the simulated subnet (the same on every replica: they are in the tree).
fn node_keys() -> Vec<(NodeId, Vec<u8>)> {
    (0..REPLICAS)
        .map(|index| {
            let key = ic_ed25519::PrivateKey::generate_from_seed(&[index as u8 + 1; 32]);
            let der = key.public_key().serialize_rfc8410_der();
            (NodeId(self_authenticating_principal(&der)), der)
        })
        .collect()
}

impl NodeReplica {
    fn new(
        setup: &ReplicaSetup,
        script: Arc<Vec<ScriptedCall>>,
        agent: Arc<ic_agent::Agent>,
        outcome: Arc<Mutex<Outcome>>,
    ) -> Self {
        let subnet_id = SubnetId(self_authenticating_principal(&setup.root_key_der));
        let facts = Arc::new(SubnetFacts {
            subnet_id,
            http: openic_http_api::HttpApiConfig::default(),
        });
        let nodes = node_keys();
        let (node_id, node_public_key_der) = nodes[setup.index].clone();
        let peer_nodes = nodes
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != setup.index)
            .map(|(_, node)| node.clone())
            .collect();
        let store = CertifiedStateStore::new_threshold(SubnetInfo {
            subnet_id,
            root_key_der: setup.root_key_der.clone(),
            node_id,
            node_public_key_der,
            peer_nodes,
            canister_ranges: subnet_canister_ranges(),
        });
        let scheduler = Scheduler::new(
            embedder(),
            ExecutionConfig::default(),
            SubnetContext {
                subnet_id,
                root_key_der: setup.root_key_der.clone(),
                node_count: setup.replicas as u32,
            },
        );
        agent.set_root_key(setup.root_key_der.clone());
        NodeReplica {
            index: setup.index,
            policy: ScriptPolicy {
                facts,
                clock: setup.clock.clone(),
                script,
                executed: Arc::default(),
            },
            state: ReplicatedState::new(subnet_id, FIRST_USER_CANISTER_INDEX, [7; 32]),
            scheduler,
            store,
            agent,
            outcome,
        }
    }
}

impl SimulatedReplica for NodeReplica {
    type Policy = ScriptPolicy;

    fn policy(&mut self) -> ScriptPolicy {
        self.policy.clone()
    }

    fn execute(&mut self, finalized: &FinalizedBlock) -> Result<[u8; 32], String> {
        let time = Time(finalized.time_nanos);
        let facts = &self.policy.facts;
        // As the production execution thread does: entries that no longer check out are skipped
        // the same way on every replica.
        let ingress = finalized
            .ingress
            .iter()
            .filter_map(|entry| {
                let envelope = decode_ingress_entry(entry).ok()?;
                openic_http_api::validate_ingress_envelope(
                    &envelope,
                    facts.subnet_id,
                    time,
                    &facts.http,
                )
                .ok()
            })
            .collect::<Vec<_>>();
        let block = Block {
            height: Height(finalized.height),
            time,
            ingress,
            randomness: block_randomness(finalized.seed.as_ref()),
        };
        self.scheduler.execute_block(&mut self.state, &block);
        {
            let mut executed = self.policy.executed.lock().unwrap();
            for call in self.policy.script.iter() {
                if let Some(status) = self.state.ingress_history.get(&call.request_id) {
                    executed.insert(call.request_id);
                    if let IngressState::Replied(reply) = &status.state
                        && reply.len() == 4
                    {
                        let value = u32::from_le_bytes(reply[..4].try_into().unwrap_or([0; 4]));
                        let mut outcome = self.outcome.lock().unwrap();
                        let counter = outcome.counter.entry(self.index).or_default();
                        *counter = (*counter).max(value);
                    }
                }
            }
        }
        self.store
            .prepare(&mut self.state)
            .map_err(|e| format!("prepare height {}: {e}", finalized.height))
    }

    fn certified(
        &mut self,
        height: u64,
        _root: [u8; 32],
        signature: [u8; 48],
    ) -> Result<(), String> {
        self.store
            .publish(Height(height), signature)
            .map_err(|e| format!("publish height {height}: {e}"))?;
        // What a client reads: the time and the status of the latest scripted call.
        let mut paths = vec![vec![b"time".to_vec()]];
        let executed = self.policy.executed.lock().unwrap();
        if let Some(call) = self
            .policy
            .script
            .iter()
            .rev()
            .find(|call| executed.contains(&call.request_id))
        {
            paths.push(vec![b"request_status".to_vec(), call.request_id.0.to_vec()]);
        }
        drop(executed);
        let bytes = self
            .store
            .certificate_for_paths(&paths)
            .map_err(|e| format!("certificate at height {height}: {e}"))?;
        let certificate: ic_agent::Certificate = serde_cbor::from_slice(&bytes)
            .map_err(|e| format!("certificate at height {height} does not decode: {e}"))?;
        self.agent
            .verify(&certificate, counter_canister().get())
            .map_err(|e| format!("ic-agent refuses the certificate of height {height}: {e}"))?;
        *self
            .outcome
            .lock()
            .unwrap()
            .verified_certificates
            .entry(self.index)
            .or_default() += 1;
        Ok(())
    }
}

/// Runs one seed and checks what the harness cannot know: the canister ran on every honest
/// replica and every honest replica checked its certificates with ic-agent.
fn run_seed(seed: u64) -> Result<SimulationReport, String> {
    let config = SimulationConfig::randomized(seed, REPLICAS, CERTIFIED_HEIGHTS);
    let script = script();
    let outcome = Arc::new(Mutex::new(Outcome::default()));
    let factory_outcome = outcome.clone();
    // One client for the run (building one is costly); every replica has the same root key.
    let agent = Arc::new(
        ic_agent::Agent::builder()
            .with_url("http://127.0.0.1:1")
            // Simulated time starts at the epoch; the freshness check would refuse every
            // certificate otherwise. Signature, tree and delegation checks are unchanged.
            .with_ingress_expiry(Duration::from_secs(200 * 365 * 24 * 3600))
            .build()
            .expect("agent builds"),
    );
    let report = run(seed, &config, move |setup: &ReplicaSetup| {
        NodeReplica::new(
            setup,
            script.clone(),
            agent.clone(),
            factory_outcome.clone(),
        )
    })
    .map_err(|failure| format!("{failure} (config {config:?})"))?;
    let outcome = outcome.lock().unwrap();
    for (index, record) in report.replicas.iter().enumerate() {
        if record.byzantine {
            continue;
        }
        let counter = outcome.counter.get(&index).copied().unwrap_or(0);
        if counter == 0 {
            return Err(format!(
                "replica {index}: the counter canister never replied"
            ));
        }
        let verified = outcome
            .verified_certificates
            .get(&index)
            .copied()
            .unwrap_or(0);
        if verified != record.certified.len() as u64 || verified == 0 {
            return Err(format!(
                "replica {index}: {verified} certificates checked by ic-agent, {} certified",
                record.certified.len()
            ));
        }
    }
    Ok(report)
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(
        value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value} is not a number")),
    )
}

/// The seeds test function `part` of [`PARTS`] runs.
fn seeds(part: u64) -> Vec<u64> {
    if let Some(seed) = env_u64("OPENIC_SIM_SEED") {
        return if part == 0 { vec![seed] } else { Vec::new() };
    }
    let count = env_u64("OPENIC_SIM_SEEDS").unwrap_or(DEFAULT_SEEDS);
    let first = env_u64("OPENIC_SIM_FIRST_SEED").unwrap_or(0);
    (first + part..first.saturating_add(count))
        .step_by(PARTS as usize)
        .collect()
}

/// Runs this part's seeds, every one even after a failure, and fails listing the failing ones.
fn run_part(part: u64) {
    let started = Instant::now();
    let mut failures = Vec::new();
    let seeds = seeds(part);
    for (done, &seed) in seeds.iter().enumerate() {
        if done > 0 && done % 100 == 0 {
            eprintln!(
                "simulation part {part}: {done} seeds, {} failed, {:?}",
                failures.len(),
                started.elapsed()
            );
        }
        let outcome = std::panic::catch_unwind(|| run_seed(seed));
        let error = match outcome {
            Ok(Ok(_)) => continue,
            Ok(Err(error)) => error,
            Err(panic) => panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic".to_string()),
        };
        eprintln!(
            "simulation failed with seed {seed}: {error}\n  replay: OPENIC_SIM_SEED={seed} \
             cargo test -p openic-node --test simulation"
        );
        failures.push(seed);
    }
    eprintln!(
        "simulation part {part}: {} seeds in {:?}",
        seeds.len(),
        started.elapsed()
    );
    assert!(failures.is_empty(), "failing seeds: {failures:?}");
}

#[test]
fn subnet_simulation_part_0() {
    run_part(0);
}

#[test]
fn subnet_simulation_part_1() {
    run_part(1);
}

#[test]
fn subnet_simulation_part_2() {
    run_part(2);
}

#[test]
fn subnet_simulation_part_3() {
    run_part(3);
}

#[test]
fn a_seed_replays_exactly() {
    let first = run_seed(1_000_003).expect("seed passes");
    let second = run_seed(1_000_003).expect("seed passes");
    assert_eq!(first, second);
}
