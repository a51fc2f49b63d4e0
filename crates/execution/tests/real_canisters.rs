//! Block execution with the real wasmtime embedder and the real management canister: canisters
//! written in WAT are created and installed through ingress to `aaaaa-aa`, then called.

#![allow(
    clippy::disallowed_methods,
    reason = "tests drive the embedder from several threads and measure elapsed time; what they test stays deterministic"
)]

use candid::{Encode, Nat};
use ic_management_canister_types::{
    CanisterIdRecord, CanisterInstallMode, InstallCodeArgs, ProvisionalCreateCanisterWithCyclesArgs,
};
use openic_embedders::{EmbedderConfig, WasmtimeEmbedder};
use openic_execution::{ExecutionConfig, IngressFilter, QueryExecution, Scheduler, SubnetContext};
use openic_interfaces::{
    BlockExecutor, CanistersSnapshot, CertificationError, CertifiedStateReader, IngressInspector,
    LabelPath, MetadataVisibility, QueryExecutor, StateSnapshotSource,
};
use openic_replicated_state::ReplicatedState;
use openic_types::{
    Block, CanisterId, ErrorCode, Height, IngressState, Principal, QueryResult, RejectCode,
    RequestId, SignedIngress, SubnetId, Time, UserQuery,
};
use std::sync::{Arc, Mutex};

/// A counter canister. `inc` adds one and replies with the counter (4 bytes LE); `boom` adds one
/// and traps; `relay` calls `inc` on the canister whose id is its argument and forwards the reply;
/// `arm` sets the global timer to now, and the timer adds 100.
const COUNTER_WAT: &str = r#"
(module
  (import "ic0" "msg_reply" (func $msg_reply))
  (import "ic0" "msg_reply_data_append" (func $append (param i32 i32)))
  (import "ic0" "msg_arg_data_size" (func $arg_size (result i32)))
  (import "ic0" "msg_arg_data_copy" (func $arg_copy (param i32 i32 i32)))
  (import "ic0" "msg_reject" (func $msg_reject (param i32 i32)))
  (import "ic0" "trap" (func $trap (param i32 i32)))
  (import "ic0" "call_new" (func $call_new (param i32 i32 i32 i32 i32 i32 i32 i32)))
  (import "ic0" "call_perform" (func $call_perform (result i32)))
  (import "ic0" "global_timer_set" (func $timer_set (param i64) (result i64)))
  (import "ic0" "time" (func $time (result i64)))
  (memory 1)
  (table 4 funcref)
  (elem (i32.const 1) $on_reply $on_reject)
  (global $counter (mut i32) (i32.const 0))
  (data (i32.const 100) "boom")
  (data (i32.const 300) "inc")
  (func $reply_counter
    (i32.store (i32.const 0) (global.get $counter))
    (call $append (i32.const 0) (i32.const 4))
    (call $msg_reply))
  (func (export "canister_update inc")
    (global.set $counter (i32.add (global.get $counter) (i32.const 1)))
    (call $reply_counter))
  (func (export "canister_query read")
    (call $reply_counter))
  (func (export "canister_update boom")
    (global.set $counter (i32.add (global.get $counter) (i32.const 1)))
    (call $trap (i32.const 100) (i32.const 4)))
  (func (export "canister_update silent"))
  (func (export "canister_update relay")
    (call $arg_copy (i32.const 200) (i32.const 0) (call $arg_size))
    (call $call_new (i32.const 200) (call $arg_size) (i32.const 300) (i32.const 3)
      (i32.const 1) (i32.const 0) (i32.const 2) (i32.const 0))
    (drop (call $call_perform)))
  (func $on_reply (param i32)
    (call $arg_copy (i32.const 0) (i32.const 0) (call $arg_size))
    (call $append (i32.const 0) (call $arg_size))
    (call $msg_reply))
  (func $on_reject (param i32)
    (call $msg_reject (i32.const 100) (i32.const 4)))
  (func (export "canister_update arm")
    (drop (call $timer_set (call $time)))
    (call $reply_counter))
  (func (export "canister_global_timer")
    (global.set $counter (i32.add (global.get $counter) (i32.const 100))))
)
"#;

/// A canister with `canister_inspect_message` (refusing methods with 4-letter names) and a
/// heartbeat that counts beats (read with the query `beats`).
const GUARDED_WAT: &str = r#"
(module
  (import "ic0" "msg_method_name_size" (func $name_size (result i32)))
  (import "ic0" "accept_message" (func $accept))
  (import "ic0" "msg_reply" (func $msg_reply))
  (import "ic0" "msg_reply_data_append" (func $append (param i32 i32)))
  (memory 1)
  (global $beats (mut i32) (i32.const 0))
  (func (export "canister_inspect_message")
    (if (i32.ne (call $name_size) (i32.const 4)) (then (call $accept))))
  (func (export "canister_heartbeat")
    (global.set $beats (i32.add (global.get $beats) (i32.const 1))))
  (func (export "canister_update hello") (call $msg_reply))
  (func (export "canister_update deny") (call $msg_reply))
  (func (export "canister_query beats")
    (i32.store (i32.const 0) (global.get $beats))
    (call $append (i32.const 0) (i32.const 4))
    (call $msg_reply))
)
"#;

struct Harness {
    scheduler: Scheduler,
    state: ReplicatedState,
    height: u64,
    nonce: u64,
}

fn user() -> Principal {
    Principal::from_slice(&[7; 29])
}

impl Harness {
    fn new() -> Harness {
        Harness::with_config(ExecutionConfig::default())
    }

    fn with_config(config: ExecutionConfig) -> Harness {
        let embedder = WasmtimeEmbedder::new(EmbedderConfig::default()).expect("engine builds");
        let subnet = SubnetContext {
            subnet_id: SubnetId(Principal::from_slice(&[1; 29])),
            root_key_der: vec![0; 133],
            node_count: 1,
        };
        let state = ReplicatedState::new(
            subnet.subnet_id,
            openic_types::ids::FIRST_USER_CANISTER_INDEX,
            [5; 32],
        );
        Harness {
            scheduler: Scheduler::new(Arc::new(embedder), config, subnet),
            state,
            height: 0,
            nonce: 0,
        }
    }

    fn now(&self) -> Time {
        Time(1_700_000_000_000_000_000 + self.height * 1_000_000_000)
    }

    /// Sends one ingress message in its own block and returns its request id.
    fn submit(&mut self, canister: CanisterId, method: &str, arg: Vec<u8>) -> RequestId {
        self.nonce += 1;
        let mut id = [0u8; 32];
        id[..8].copy_from_slice(&self.nonce.to_be_bytes());
        let request_id = RequestId(id);
        let effective_canister_id = canister;
        let message = SignedIngress {
            request_id,
            sender: user(),
            canister_id: canister,
            effective_canister_id,
            method_name: method.to_string(),
            size_bytes: arg.len() as u64 + 200,
            arg,
            ingress_expiry: self.now().saturating_add_nanos(300 * 1_000_000_000),
        };
        self.block(vec![message]);
        request_id
    }

    fn block(&mut self, ingress: Vec<SignedIngress>) {
        self.height += 1;
        let block = Block {
            height: Height(self.height),
            time: self.now(),
            ingress,
            randomness: [0; 32],
        };
        self.scheduler.execute_block(&mut self.state, &block);
    }

    fn status(&self, request_id: RequestId) -> IngressState {
        self.state
            .ingress_history
            .get(&request_id)
            .expect("status recorded")
            .state
            .clone()
    }

    fn call(&mut self, canister: CanisterId, method: &str, arg: Vec<u8>) -> IngressState {
        let id = self.submit(canister, method, arg);
        self.status(id)
    }

    fn install_counter(&mut self) -> CanisterId {
        self.install(COUNTER_WAT)
    }

    fn install(&mut self, wat_source: &str) -> CanisterId {
        let create = ProvisionalCreateCanisterWithCyclesArgs {
            amount: Some(Nat::from(10_000_000_000_000u64)),
            settings: None,
            specified_id: None,
            sender_canister_version: None,
        };
        let reply = match self.call(
            CanisterId::management(),
            "provisional_create_canister_with_cycles",
            Encode!(&create).unwrap(),
        ) {
            IngressState::Replied(reply) => reply,
            other => panic!("create failed: {other:?}"),
        };
        let record = candid::decode_one::<CanisterIdRecord>(&reply).unwrap();
        let canister_id = CanisterId::unchecked_from_principal(record.canister_id);
        let install = InstallCodeArgs {
            mode: CanisterInstallMode::Install,
            canister_id: record.canister_id,
            wasm_module: wat::parse_str(wat_source).unwrap(),
            arg: vec![],
            sender_canister_version: None,
        };
        let state = self.call(
            CanisterId::management(),
            "install_code",
            Encode!(&install).unwrap(),
        );
        assert!(
            matches!(state, IngressState::Replied(_)),
            "install failed: {state:?}"
        );
        canister_id
    }
}

fn counter_reply(state: &IngressState) -> u32 {
    match state {
        IngressState::Replied(bytes) => u32::from_le_bytes(bytes[..4].try_into().unwrap()),
        other => panic!("expected a reply, got {other:?}"),
    }
}

#[test]
fn counter_canister_replies_traps_and_rolls_back() {
    let mut harness = Harness::new();
    let canister = harness.install_counter();
    assert_eq!(counter_reply(&harness.call(canister, "inc", vec![])), 1);
    assert_eq!(counter_reply(&harness.call(canister, "inc", vec![])), 2);

    let IngressState::Rejected(error) = harness.call(canister, "boom", vec![]) else {
        panic!("boom should be rejected");
    };
    assert_eq!(error.code, RejectCode::CanisterError);
    assert_eq!(error.error_code, Some(ErrorCode::CanisterCalledTrap));
    assert!(error.message.contains("boom"), "{}", error.message);
    // The trap's increment was rolled back.
    assert_eq!(counter_reply(&harness.call(canister, "read", vec![])), 2);

    let IngressState::Rejected(error) = harness.call(canister, "silent", vec![]) else {
        panic!("silent should be rejected");
    };
    assert_eq!(error.error_code, Some(ErrorCode::CanisterDidNotReply));
}

#[test]
fn inter_canister_call_between_wat_canisters() {
    let mut harness = Harness::new();
    let first = harness.install_counter();
    let second = harness.install_counter();
    let reply = harness.call(first, "relay", second.get().as_slice().to_vec());
    assert_eq!(counter_reply(&reply), 1);
    assert_eq!(counter_reply(&harness.call(second, "read", vec![])), 1);
    assert_eq!(counter_reply(&harness.call(first, "read", vec![])), 0);

    // Calling a canister that does not exist reaches the reject callback, which rejects.
    let missing = CanisterId::from_u64(0x8000_0000_00ff_0000);
    let IngressState::Rejected(error) =
        harness.call(first, "relay", missing.get().as_slice().to_vec())
    else {
        panic!("relay to a missing canister should be rejected");
    };
    assert_eq!(error.code, RejectCode::CanisterReject);
    assert_eq!(error.message, "boom");
}

#[test]
fn global_timer_fires_once() {
    let mut harness = Harness::new();
    let canister = harness.install_counter();
    assert_eq!(counter_reply(&harness.call(canister, "arm", vec![])), 0);
    harness.block(vec![]);
    harness.block(vec![]);
    assert_eq!(counter_reply(&harness.call(canister, "read", vec![])), 100);
}

#[test]
fn stop_and_start_through_the_management_canister() {
    let mut harness = Harness::new();
    let canister = harness.install_counter();
    let record = Encode!(&CanisterIdRecord {
        canister_id: canister.get()
    })
    .unwrap();
    let stop = harness.call(CanisterId::management(), "stop_canister", record.clone());
    assert_eq!(stop, IngressState::Replied(b"DIDL\x00\x00".to_vec()));

    let IngressState::Rejected(error) = harness.call(canister, "inc", vec![]) else {
        panic!("a stopped canister must reject calls");
    };
    assert_eq!(error.code, RejectCode::CanisterError);
    assert_eq!(error.error_code, Some(ErrorCode::CanisterStopped));

    let start = harness.call(CanisterId::management(), "start_canister", record);
    assert!(matches!(start, IngressState::Replied(_)), "{start:?}");
    assert_eq!(counter_reply(&harness.call(canister, "inc", vec![])), 1);
}

struct LatestState(Mutex<ReplicatedState>);

impl StateSnapshotSource for LatestState {
    fn latest_snapshot(&self) -> CanistersSnapshot {
        let state = self.0.lock().unwrap();
        CanistersSnapshot {
            height: state.metadata.height,
            time: state.metadata.time,
            canisters: Arc::new(state.canisters_snapshot()),
            logs: Arc::new(state.canister_logs.clone()),
            snapshots: Arc::clone(&state.snapshots),
        }
    }
}

struct NoCertificates;

impl CertifiedStateReader for NoCertificates {
    fn certified_height(&self) -> Height {
        Height(0)
    }
    fn certified_time(&self) -> Time {
        Time(0)
    }
    fn subscribe_certified_height(&self) -> tokio::sync::watch::Receiver<Height> {
        tokio::sync::watch::channel(Height(0)).1
    }
    fn ingress_status(&self, _: &RequestId) -> Option<openic_types::IngressStatus> {
        None
    }
    fn canister_controllers(&self, _: &CanisterId) -> Option<Vec<Principal>> {
        None
    }
    fn metadata_visibility(&self, _: &CanisterId, _: &str) -> Option<MetadataVisibility> {
        None
    }
    fn certificate_for_paths(&self, _: &[LabelPath]) -> Result<Vec<u8>, CertificationError> {
        Err(CertificationError::NotYetCertified)
    }
    fn certificate_for_paths_at(
        &self,
        _: &[LabelPath],
        _: Height,
    ) -> Result<Option<Vec<u8>>, CertificationError> {
        Err(CertificationError::NotYetCertified)
    }
    fn data_certificate(&self, _: &CanisterId) -> Result<Vec<u8>, CertificationError> {
        Err(CertificationError::NotYetCertified)
    }
}

#[test]
fn queries_and_ingress_inspection_on_the_latest_state() {
    let mut harness = Harness::new();
    let canister = harness.install_counter();
    assert_eq!(counter_reply(&harness.call(canister, "inc", vec![])), 1);
    let embedder = Arc::new(WasmtimeEmbedder::new(EmbedderConfig::default()).unwrap());
    let snapshots = Arc::new(LatestState(Mutex::new(harness.state.clone())));
    let subnet = SubnetContext {
        subnet_id: harness.state.metadata.own_subnet_id,
        root_key_der: vec![0; 133],
        node_count: 1,
    };
    let queries = QueryExecution::new(
        embedder.clone(),
        snapshots.clone(),
        Arc::new(NoCertificates),
        ExecutionConfig::default(),
        subnet.clone(),
    );
    let query = |method: &str| UserQuery {
        request_id: RequestId([0; 32]),
        sender: user(),
        canister_id: canister,
        effective_canister_id: canister,
        method_name: method.to_string(),
        arg: vec![],
    };
    assert_eq!(
        queries.query(query("read")),
        QueryResult::Reply(1u32.to_le_bytes().to_vec())
    );
    let QueryResult::Reject(error) = queries.query(query("inc")) else {
        panic!("an update method must not run as a query");
    };
    assert_eq!(error.error_code, Some(ErrorCode::CanisterMethodNotExported));

    let mut status_query = query("canister_status");
    status_query.canister_id = CanisterId::management();
    status_query.arg = Encode!(&CanisterIdRecord {
        canister_id: canister.get()
    })
    .unwrap();
    assert!(
        matches!(queries.query(status_query), QueryResult::Reply(_)),
        "canister_status works as a query to aaaaa-aa"
    );

    let filter = IngressFilter::new(embedder, snapshots, ExecutionConfig::default(), subnet);
    let message = |method: &str| SignedIngress {
        request_id: RequestId([1; 32]),
        sender: user(),
        canister_id: canister,
        effective_canister_id: canister,
        method_name: method.to_string(),
        arg: vec![],
        ingress_expiry: Time(u64::MAX),
        size_bytes: 100,
    };
    assert_eq!(filter.inspect(&message("inc")), Ok(()));
    assert_eq!(
        filter.inspect(&message("nope")).unwrap_err().error_code,
        Some(ErrorCode::CanisterMethodNotExported)
    );
}

#[test]
fn heartbeat_and_inspect_message_of_a_wat_canister() {
    let mut harness = Harness::new();
    let canister = harness.install(GUARDED_WAT);
    // Installed in block 2; heartbeats run in every later block.
    harness.block(vec![]);
    harness.block(vec![]);
    let beats = counter_reply(&harness.call(canister, "beats", vec![]));
    assert_eq!(beats, 3, "blocks 3, 4 and 5 each ran one heartbeat");

    let embedder = Arc::new(WasmtimeEmbedder::new(EmbedderConfig::default()).unwrap());
    let snapshots = Arc::new(LatestState(Mutex::new(harness.state.clone())));
    let subnet = SubnetContext {
        subnet_id: harness.state.metadata.own_subnet_id,
        root_key_der: vec![0; 133],
        node_count: 1,
    };
    let filter = IngressFilter::new(embedder, snapshots, ExecutionConfig::default(), subnet);
    let message = |method: &str| SignedIngress {
        request_id: RequestId([1; 32]),
        sender: user(),
        canister_id: canister,
        effective_canister_id: canister,
        method_name: method.to_string(),
        arg: vec![],
        ingress_expiry: Time(u64::MAX),
        size_bytes: 100,
    };
    assert_eq!(filter.inspect(&message("hello")), Ok(()));
    let error = filter.inspect(&message("deny")).unwrap_err();
    assert_eq!(error.code, RejectCode::CanisterReject);
    assert_eq!(error.error_code, Some(ErrorCode::CanisterRejectedMessage));
}

/// A canister whose heartbeat, once armed, grows the heap by four pages, and whose
/// `canister_on_low_wasm_memory` counts its runs (read with the query `hooks`). `grow` tries the
/// same growth in an update method (which traps: the limit applies to updates).
const LOW_MEMORY_WAT: &str = r#"
(module
  (import "ic0" "msg_reply" (func $msg_reply))
  (import "ic0" "msg_reply_data_append" (func $append (param i32 i32)))
  (memory 1)
  (global $armed (mut i32) (i32.const 0))
  (global $hooks (mut i32) (i32.const 0))
  (func (export "canister_update arm")
    (global.set $armed (i32.const 1))
    (call $msg_reply))
  (func (export "canister_heartbeat")
    (if (global.get $armed)
      (then
        (global.set $armed (i32.const 0))
        (drop (memory.grow (i32.const 4))))))
  (func (export "canister_on_low_wasm_memory")
    (global.set $hooks (i32.add (global.get $hooks) (i32.const 1))))
  (func (export "canister_update grow")
    (i32.store (i32.const 0) (memory.grow (i32.const 4)))
    (call $append (i32.const 0) (i32.const 4))
    (call $msg_reply))
  (func (export "canister_query hooks")
    (i32.store (i32.const 0) (global.get $hooks))
    (call $append (i32.const 0) (i32.const 4))
    (call $msg_reply))
)
"#;

/// The spec applies `wasm_memory_limit` to update methods, init and post_upgrade only: a heartbeat
/// may grow the heap past it in one step, and the low-memory hook then runs (the remaining heap is
/// below the threshold), as the IC runs it; an update method that grows past it traps (IC0539).
#[test]
fn a_heartbeat_past_the_wasm_memory_limit_runs_the_low_memory_hook() {
    let mut harness = Harness::new();
    let canister = harness.install(LOW_MEMORY_WAT);
    let settings = ic_management_canister_types::UpdateSettingsArgs {
        canister_id: canister.get(),
        settings: ic_management_canister_types::CanisterSettings {
            wasm_memory_limit: Some(Nat::from(3u64 * 65_536)),
            wasm_memory_threshold: Some(Nat::from(65_536u64)),
            ..Default::default()
        },
        sender_canister_version: None,
    };
    let updated = harness.call(
        CanisterId::management(),
        "update_settings",
        Encode!(&settings).unwrap(),
    );
    assert!(matches!(updated, IngressState::Replied(_)), "{updated:?}");
    // One page of three used, two remain: above the one-page threshold.
    harness.block(vec![]);
    assert_eq!(counter_reply(&harness.call(canister, "hooks", vec![])), 0);

    // An update may not grow past the limit: it traps as on the IC (IC0539), and the heap stays.
    match harness.call(canister, "grow", vec![]) {
        IngressState::Rejected(error) => {
            assert_eq!(
                error.error_code,
                Some(ErrorCode::CanisterWasmMemoryLimitExceeded)
            );
            assert!(
                error.message.contains(
                    "Canister exceeded its current Wasm memory limit of 196608 bytes. \
                     The peak Wasm memory usage was 327680 bytes."
                ),
                "{}",
                error.message
            );
            assert!(
                error.message.ends_with("#wasm-memory-limit-exceeded"),
                "{}",
                error.message
            );
        }
        other => panic!("expected a reject, got {other:?}"),
    }
    let pages = |harness: &Harness| {
        harness
            .state
            .canister(&canister)
            .unwrap()
            .execution_state
            .as_ref()
            .unwrap()
            .wasm_memory_size_pages
    };
    assert_eq!(pages(&harness), 1);

    // The heartbeat grows from one page to five in one step, past threshold and limit together.
    assert!(matches!(
        harness.call(canister, "arm", vec![]),
        IngressState::Replied(_)
    ));
    harness.block(vec![]);
    harness.block(vec![]);
    assert_eq!(pages(&harness), 5);
    assert_eq!(
        counter_reply(&harness.call(canister, "hooks", vec![])),
        1,
        "the hook ran once"
    );
    harness.block(vec![]);
    assert_eq!(
        counter_reply(&harness.call(canister, "hooks", vec![])),
        1,
        "and only once while the condition keeps holding"
    );
}

/// A composite query that spins, calls the canister's own `pong` query and replies, from the
/// callback, with `ic0.performance_counter(1)` (instructions of the call context so far) and
/// `performance_counter(0)` (of this execution alone).
const COMPOSITE_WAT: &str = r#"
(module
  (import "ic0" "msg_reply" (func $msg_reply))
  (import "ic0" "msg_reply_data_append" (func $append (param i32 i32)))
  (import "ic0" "canister_self_size" (func $self_size (result i32)))
  (import "ic0" "canister_self_copy" (func $self_copy (param i32 i32 i32)))
  (import "ic0" "call_new" (func $call_new (param i32 i32 i32 i32 i32 i32 i32 i32)))
  (import "ic0" "call_perform" (func $call_perform (result i32)))
  (import "ic0" "performance_counter" (func $counter (param i32) (result i64)))
  (memory 1)
  (table 4 funcref)
  (elem (i32.const 1) $on_reply $on_reply)
  (data (i32.const 300) "pong")
  (func (export "canister_query pong") (call $msg_reply))
  (func (export "canister_composite_query ping")
    (local $i i32)
    (loop $spin
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $spin (i32.lt_u (local.get $i) (i32.const 20000))))
    (call $self_copy (i32.const 200) (i32.const 0) (call $self_size))
    (call $call_new (i32.const 200) (call $self_size) (i32.const 300) (i32.const 4)
      (i32.const 1) (i32.const 0) (i32.const 2) (i32.const 0))
    (drop (call $call_perform)))
  (func $on_reply (param i32)
    (i64.store (i32.const 0) (call $counter (i32.const 1)))
    (i64.store (i32.const 8) (call $counter (i32.const 0)))
    (call $append (i32.const 0) (i32.const 16))
    (call $msg_reply))
)
"#;

/// `performance_counter(1)` in a composite query's callback counts the method and the callbacks
/// before it, not only the callback (spec: the call context's instructions).
#[test]
fn the_call_context_counter_adds_up_across_a_composite_querys_callbacks() {
    let mut harness = Harness::new();
    let canister = harness.install(COMPOSITE_WAT);
    let queries = QueryExecution::new(
        Arc::new(WasmtimeEmbedder::new(EmbedderConfig::default()).unwrap()),
        Arc::new(LatestState(Mutex::new(harness.state.clone()))),
        Arc::new(NoCertificates),
        ExecutionConfig::default(),
        SubnetContext {
            subnet_id: harness.state.metadata.own_subnet_id,
            root_key_der: vec![0; 133],
            node_count: 1,
        },
    );
    let QueryResult::Reply(bytes) = queries.query(UserQuery {
        request_id: RequestId([0; 32]),
        sender: user(),
        canister_id: canister,
        effective_canister_id: canister,
        method_name: "ping".to_string(),
        arg: vec![],
    }) else {
        panic!("the composite query must reply");
    };
    let call_context = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    let this_execution = u64::from_le_bytes(bytes[8..16].try_into().unwrap());
    assert!(
        this_execution < 10_000,
        "the callback alone is short: {this_execution}"
    );
    assert!(
        call_context > 20_000 + this_execution,
        "the call context includes the method's 20,000-iteration loop: {call_context}"
    );
}

/// A memory allocation bounds the canister's memory: growing the heap past what it leaves fails
/// (`memory.grow` returns -1), and `update_settings` refuses an allocation below the memory in use.
#[test]
fn a_memory_allocation_bounds_the_heap() {
    let mut harness = Harness::new();
    let canister = harness.install(LOW_MEMORY_WAT);
    let used = openic_execution::memory_usage_bytes(harness.state.canister(&canister).unwrap());
    let settings = |allocation: u64| {
        Encode!(&ic_management_canister_types::UpdateSettingsArgs {
            canister_id: canister.get(),
            settings: ic_management_canister_types::CanisterSettings {
                memory_allocation: Some(Nat::from(allocation)),
                ..Default::default()
            },
            sender_canister_version: None,
        })
        .unwrap()
    };
    let refused = harness.call(
        CanisterId::management(),
        "update_settings",
        settings(used - 1),
    );
    assert!(
        matches!(&refused, IngressState::Rejected(error) if error.message.contains("memory_allocation")),
        "{refused:?}"
    );
    // Room for two more pages, not four.
    let allocated = harness.call(
        CanisterId::management(),
        "update_settings",
        settings(used + 2 * 65_536),
    );
    assert!(
        matches!(allocated, IngressState::Replied(_)),
        "{allocated:?}"
    );
    assert_eq!(
        counter_reply(&harness.call(canister, "grow", vec![])),
        u32::MAX,
        "memory.grow past the allocation fails"
    );
    let allocated = harness.call(
        CanisterId::management(),
        "update_settings",
        settings(used + 4 * 65_536),
    );
    assert!(
        matches!(allocated, IngressState::Replied(_)),
        "{allocated:?}"
    );
    assert_eq!(
        counter_reply(&harness.call(canister, "grow", vec![])),
        1,
        "within the allocation it grows (from one page)"
    );
}

/// The storage reservation: on a subnet above its memory threshold, new memory moves cycles to
/// the canister's reserved balance (`reserved_cycles` in `canister_status`), within its
/// `reserved_cycles_limit`, and storage is paid from them first.
#[test]
fn memory_growth_above_the_subnet_threshold_reserves_cycles() {
    let mut harness = Harness::with_config(ExecutionConfig {
        subnet_memory_threshold_bytes: 0,
        subnet_memory_capacity_bytes: 1 << 30,
        ..ExecutionConfig::default()
    });
    let canister = harness.install(LOW_MEMORY_WAT);
    let reserved = |harness: &Harness| {
        harness
            .state
            .canister(&canister)
            .unwrap()
            .system_state
            .reserved_balance
    };
    let installed = reserved(&harness);
    assert!(
        installed.get() > 0,
        "the installation reserved for its memory"
    );
    assert_eq!(counter_reply(&harness.call(canister, "grow", vec![])), 1);
    let grown = reserved(&harness);
    assert!(
        grown > installed,
        "growth reserves more: {grown:?} after {installed:?}"
    );
    // canister_status reports it.
    let status = harness.call(
        CanisterId::management(),
        "canister_status",
        Encode!(&CanisterIdRecord {
            canister_id: canister.get()
        })
        .unwrap(),
    );
    let IngressState::Replied(reply) = status else {
        panic!("{status:?}")
    };
    let status: ic_management_canister_types::CanisterStatusResult =
        candid::decode_one(&reply).unwrap();
    // (Storage fees of the status call's block drew on the reserved cycles already.)
    let grown = reserved(&harness);
    assert_eq!(status.reserved_cycles, Nat::from(grown.get()));

    let settings = |settings: ic_management_canister_types::CanisterSettings| {
        Encode!(&ic_management_canister_types::UpdateSettingsArgs {
            canister_id: canister.get(),
            settings,
            sender_canister_version: None,
        })
        .unwrap()
    };
    // A limit below what is reserved is refused.
    let too_low = harness.call(
        CanisterId::management(),
        "update_settings",
        settings(ic_management_canister_types::CanisterSettings {
            reserved_cycles_limit: Some(Nat::from(grown.get() / 2)),
            ..Default::default()
        }),
    );
    assert!(
        matches!(&too_low, IngressState::Rejected(e) if e.error_code == Some(ErrorCode::ReservedCyclesLimitIsTooLow)),
        "{too_low:?}"
    );
    // At the limit, growth fails with the IC's error and changes nothing.
    let at_limit = harness.call(
        CanisterId::management(),
        "update_settings",
        settings(ic_management_canister_types::CanisterSettings {
            reserved_cycles_limit: Some(Nat::from(grown.get())),
            ..Default::default()
        }),
    );
    assert!(matches!(at_limit, IngressState::Replied(_)), "{at_limit:?}");
    let pages = |harness: &Harness| {
        harness
            .state
            .canister(&canister)
            .unwrap()
            .execution_state
            .as_ref()
            .unwrap()
            .wasm_memory_size_pages
    };
    let pages_before = pages(&harness);
    let refused = harness.call(canister, "grow", vec![]);
    let IngressState::Rejected(error) = &refused else {
        panic!("{refused:?}")
    };
    assert_eq!(
        error.error_code,
        Some(ErrorCode::ReservedCyclesLimitExceededInMemoryGrow)
    );
    assert!(
        error.message.contains(&format!(
            "Canister cannot grow memory by {} bytes due to its reserved cycles limit. The current limit ({}) would be exceeded by",
            4 * 65_536,
            grown.get()
        )),
        "{}",
        error.message
    );
    assert_eq!(
        pages(&harness),
        pages_before,
        "the failed growth left no trace"
    );
    // A larger memory allocation under that limit is refused too.
    let allocation = harness.call(
        CanisterId::management(),
        "update_settings",
        settings(ic_management_canister_types::CanisterSettings {
            memory_allocation: Some(Nat::from(64u64 << 20)),
            ..Default::default()
        }),
    );
    assert!(
        matches!(&allocation, IngressState::Rejected(e) if e.error_code == Some(ErrorCode::ReservedCyclesLimitExceededInMemoryAllocation)),
        "{allocation:?}"
    );
    // Storage is paid from the reserved cycles first (the canister is stopped so that its
    // heartbeat costs nothing meanwhile).
    let stopped = harness.call(
        CanisterId::management(),
        "stop_canister",
        Encode!(&CanisterIdRecord {
            canister_id: canister.get()
        })
        .unwrap(),
    );
    assert!(matches!(stopped, IngressState::Replied(_)), "{stopped:?}");
    let grown = reserved(&harness);
    let balance_before = harness
        .state
        .canister(&canister)
        .unwrap()
        .system_state
        .cycles_balance;
    for _ in 0..5 {
        harness.block(vec![]);
    }
    assert!(
        reserved(&harness) < grown,
        "storage drew on the reserved cycles"
    );
    assert_eq!(
        harness
            .state
            .canister(&canister)
            .unwrap()
            .system_state
            .cycles_balance,
        balance_before,
        "and not on the balance while they last"
    );
    // A snapshot's memory reserves too: refused under the limit, taken once the limit allows it.
    let take = |harness: &mut Harness| {
        harness.call(
            CanisterId::management(),
            "take_canister_snapshot",
            Encode!(&ic_management_canister_types::TakeCanisterSnapshotArgs {
                canister_id: canister.get(),
                replace_snapshot: None,
                uninstall_code: None,
                sender_canister_version: None,
            })
            .unwrap(),
        )
    };
    let refused = take(&mut harness);
    assert!(
        matches!(&refused, IngressState::Rejected(e) if e.error_code == Some(ErrorCode::ReservedCyclesLimitExceededInMemoryGrow)),
        "{refused:?}"
    );
    let raised = harness.call(
        CanisterId::management(),
        "update_settings",
        settings(ic_management_canister_types::CanisterSettings {
            reserved_cycles_limit: Some(Nat::from(5_000_000_000_000u64)),
            ..Default::default()
        }),
    );
    assert!(matches!(raised, IngressState::Replied(_)), "{raised:?}");
    let before_snapshot = reserved(&harness);
    let taken = take(&mut harness);
    assert!(matches!(taken, IngressState::Replied(_)), "{taken:?}");
    assert!(
        reserved(&harness) > before_snapshot,
        "the snapshot reserved"
    );
}

/// A canister whose `spin` counts to two million before it bumps a counter and replies with it.
const SPINNER_WAT: &str = r#"
(module
  (import "ic0" "msg_reply" (func $msg_reply))
  (import "ic0" "msg_reply_data_append" (func $append (param i32 i32)))
  (memory 1)
  (global $spins (mut i32) (i32.const 0))
  (func (export "canister_update spin")
    (local $i i32)
    (loop $again
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 2000000))))
    (global.set $spins (i32.add (global.get $spins) (i32.const 1)))
    (i32.store (i32.const 0) (global.get $spins))
    (call $append (i32.const 0) (i32.const 4))
    (call $msg_reply))
)
"#;

/// Slices of a million instructions: `spin` takes several.
fn sliced_config() -> ExecutionConfig {
    ExecutionConfig {
        max_instructions_per_slice: 1_000_000,
        ..ExecutionConfig::default()
    }
}

/// Submits `spin` to a new spinner next to a counter, then runs empty blocks until it replies;
/// returns the harness, the spinner, and the blocks it took. `restart_after` replaces the
/// scheduler (as a node restarting from a checkpoint does) after that many blocks.
fn spin_in_slices(
    config: ExecutionConfig,
    restart_after: Option<u64>,
) -> (Harness, CanisterId, u64) {
    let mut harness = Harness::with_config(config.clone());
    let counter = harness.install_counter();
    let spinner = harness.install(SPINNER_WAT);
    let spin = harness.submit(spinner, "spin", vec![]);
    let mut blocks = 1;
    while !matches!(harness.status(spin), IngressState::Replied(_)) {
        assert!(
            matches!(harness.status(spin), IngressState::Processing),
            "{:?}",
            harness.status(spin)
        );
        if restart_after == Some(blocks) {
            let restarted = Harness::with_config(config.clone());
            harness.scheduler = restarted.scheduler;
        }
        // Other canisters go on meanwhile.
        let before = counter_reply(&harness.call(counter, "read", vec![]));
        assert_eq!(
            counter_reply(&harness.call(counter, "inc", vec![])),
            before + 1
        );
        blocks += 2;
        assert!(blocks < 1_000, "spin never completes");
    }
    assert_eq!(counter_reply(&harness.status(spin)), 1);
    (harness, spinner, blocks)
}

#[test]
fn a_long_message_runs_in_slices_while_other_canisters_go_on() {
    let (sliced, spinner, blocks) = spin_in_slices(sliced_config(), None);
    assert!(blocks > 4, "spin took {blocks} blocks");
    assert!(sliced.state.paused_executions.is_empty());

    // In one go (no slicing) it leaves the same canister behind (the balance differs by the
    // storage of the extra blocks' seconds).
    let whole_config = ExecutionConfig {
        max_instructions_per_slice: 0,
        ..ExecutionConfig::default()
    };
    let (whole, _, whole_blocks) = spin_in_slices(whole_config, None);
    assert_eq!(whole_blocks, 1);
    let sliced_canister = sliced.state.canister(&spinner).unwrap();
    let whole_canister = whole.state.canister(&spinner).unwrap();
    assert_eq!(
        sliced_canister.execution_state,
        whole_canister.execution_state
    );

    // A replica that restarts in the middle runs it again through its slices and stays in step.
    let (restarted, _, restarted_blocks) = spin_in_slices(sliced_config(), Some(3));
    assert_eq!(restarted_blocks, blocks);
    assert_eq!(restarted.state.canisters, sliced.state.canisters);
    assert_eq!(
        restarted.state.ingress_history,
        sliced.state.ingress_history
    );
}

#[test]
fn management_calls_about_a_canister_wait_for_its_paused_execution() {
    let mut harness = Harness::with_config(sliced_config());
    let spinner = harness.install(SPINNER_WAT);
    let spin = harness.submit(spinner, "spin", vec![]);
    assert!(harness.state.paused_executions.contains_key(&spinner));
    let record = Encode!(&CanisterIdRecord {
        canister_id: spinner.get()
    })
    .unwrap();
    let stop = harness.submit(CanisterId::management(), "stop_canister", record);
    assert_eq!(harness.status(stop), IngressState::Received);
    let mut blocks = 0;
    while harness.state.paused_executions.contains_key(&spinner) {
        assert_eq!(harness.status(stop), IngressState::Received);
        harness.block(vec![]);
        blocks += 1;
        assert!(blocks < 1_000, "spin never completes");
    }
    assert_eq!(counter_reply(&harness.status(spin)), 1);
    harness.block(vec![]);
    assert_eq!(
        harness.status(stop),
        IngressState::Replied(b"DIDL\x00\x00".to_vec())
    );
}
