//! Tests of the scheduler, queries and ingress inspection with a scripted fake embedder: each
//! export or closure runs a Rust function, and a canister's "memory" is its first global (an
//! `i64` counter the functions may change).

use crate::common::{EMPTY_CANDID_REPLY, call_fee, execution_fee, ingress_induction_fee};
use crate::{ExecutionConfig, IngressFilter, QueryExecution, Scheduler, SubnetContext};
use openic_embedders::{
    ApiType, Embedder, EntryPoint, ExecutionError, InvalidWasm, NewExecutionState, OutgoingCall,
    SystemStateChanges, WasmExecutionInput, WasmExecutionOutput, WasmResponse,
};
use openic_interfaces::{
    BlockExecutor, CanistersSnapshot, CertificationError, CertifiedStateReader, IngressInspector,
    LabelPath, MetadataVisibility, QueryExecutor, StateSnapshotSource,
};
use openic_replicated_state::{
    CallOrigin, CanisterState, CanisterStatus, ExecutionState, GlobalValue, MethodKind, ModuleInfo,
    PageMap, ReplicatedState, StopContext, SystemState, WasmBinary, WasmClosure,
};
use openic_types::{
    Block, CanisterId, Cycles, ErrorCode, Height, IngressState, IngressStatus, Principal,
    QueryResult, RejectCode, RequestId, SignedIngress, SubnetId, Time, UserQuery,
};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};

/// Instructions every fake execution reports.
const FAKE_INSTRUCTIONS: u64 = 1_000;

/// What a scripted function returns: the response, the System API changes, and how much to add
/// to the canister's counter.
type Behaviour = Arc<
    dyn Fn(
            &WasmExecutionInput<'_>,
        ) -> Result<(Option<WasmResponse>, SystemStateChanges, i64), ExecutionError>
        + Send
        + Sync,
>;

/// An embedder whose functions are Rust closures, keyed by canister and entry point.
#[derive(Default)]
struct FakeEmbedder {
    behaviours: Mutex<BTreeMap<(CanisterId, String), Behaviour>>,
    executions: Mutex<Vec<(CanisterId, String)>>,
}

fn entry_key(entry_point: &EntryPoint) -> String {
    match entry_point {
        EntryPoint::Export(name) => name.clone(),
        EntryPoint::Closure(closure) => format!("closure {}", closure.func_idx),
        EntryPoint::StartOnly => "start".into(),
    }
}

impl FakeEmbedder {
    fn on(
        &self,
        canister: CanisterId,
        entry: &str,
        behaviour: impl Fn(
            &WasmExecutionInput<'_>,
        )
            -> Result<(Option<WasmResponse>, SystemStateChanges, i64), ExecutionError>
        + Send
        + Sync
        + 'static,
    ) {
        self.behaviours
            .lock()
            .unwrap()
            .insert((canister, entry.to_string()), Arc::new(behaviour));
    }

    fn count(&self, canister: CanisterId, entry: &str) -> usize {
        self.executions
            .lock()
            .unwrap()
            .iter()
            .filter(|(c, e)| *c == canister && e == entry)
            .count()
    }
}

impl Embedder for FakeEmbedder {
    fn prepare_module(&self, _wasm: &[u8]) -> Result<(WasmBinary, ModuleInfo), InvalidWasm> {
        Err(InvalidWasm::Decode(
            "the fake embedder compiles nothing".into(),
        ))
    }

    fn initial_execution_state(
        &self,
        _binary: Arc<WasmBinary>,
        _info: Arc<ModuleInfo>,
    ) -> Result<ExecutionState, InvalidWasm> {
        Err(InvalidWasm::Decode(
            "the fake embedder compiles nothing".into(),
        ))
    }

    fn execute(&self, input: WasmExecutionInput<'_>) -> WasmExecutionOutput {
        let canister = input.system_state.canister_id;
        let key = entry_key(&input.entry_point);
        self.executions
            .lock()
            .unwrap()
            .push((canister, key.clone()));
        let behaviour = self
            .behaviours
            .lock()
            .unwrap()
            .get(&(canister, key.clone()))
            .cloned();
        let result = match behaviour {
            None => Err(ExecutionError::Trapped(format!("no function for {key}"))),
            Some(behaviour) => behaviour(&input).map(|(response, changes, delta)| {
                let counter = counter_of(input.execution_state);
                (
                    NewExecutionState {
                        wasm_memory: input.execution_state.wasm_memory.clone(),
                        wasm_memory_size_pages: input.execution_state.wasm_memory_size_pages,
                        stable_memory: input.execution_state.stable_memory.clone(),
                        stable_memory_size_pages: input.execution_state.stable_memory_size_pages,
                        globals: vec![GlobalValue::I64(counter + delta)],
                    },
                    response,
                    changes,
                )
            }),
        };
        WasmExecutionOutput {
            instructions_used: FAKE_INSTRUCTIONS,
            result,
            debug_prints: Vec::new(),
        }
    }
}

fn counter_of(execution_state: &ExecutionState) -> i64 {
    match execution_state.globals.first() {
        Some(GlobalValue::I64(value)) => *value,
        _ => 0,
    }
}

fn counter(state: &ReplicatedState, id: CanisterId) -> i64 {
    counter_of(
        state
            .canister(&id)
            .unwrap()
            .execution_state
            .as_ref()
            .unwrap(),
    )
}

fn reply(data: &[u8]) -> Result<(Option<WasmResponse>, SystemStateChanges, i64), ExecutionError> {
    Ok((
        Some(WasmResponse::Reply(data.to_vec())),
        SystemStateChanges::default(),
        0,
    ))
}

const INITIAL_CYCLES: Cycles = Cycles(10_000_000_000_000);

fn canister_id(n: u64) -> CanisterId {
    CanisterId::from_u64(0x8000_0000_0010_0000 + n)
}

fn user() -> Principal {
    Principal::from_slice(&[7; 29])
}

fn subnet() -> SubnetContext {
    SubnetContext {
        subnet_id: SubnetId(Principal::from_slice(&[1; 29])),
        root_key_der: vec![0; 133],
        node_count: 1,
    }
}

fn installed_canister(
    id: CanisterId,
    methods: &[(&str, MethodKind)],
    system: &[&str],
) -> CanisterState {
    let bytes = id.get().as_slice().to_vec();
    let module_info = ModuleInfo {
        methods: methods
            .iter()
            .map(|(name, kind)| (name.to_string(), *kind))
            .collect(),
        system_methods: system.iter().map(|s| s.to_string()).collect(),
        ..ModuleInfo::default()
    };
    CanisterState {
        system_state: SystemState::new(id, BTreeSet::from([user()]), INITIAL_CYCLES, Time(0)),
        execution_state: Some(ExecutionState {
            wasm_binary: Arc::new(WasmBinary {
                bytes,
                module_hash: [0; 32],
            }),
            module_info: Arc::new(module_info),
            wasm_memory: PageMap::new(),
            wasm_memory_size_pages: 0,
            stable_memory: PageMap::new(),
            stable_memory_size_pages: 0,
            globals: vec![GlobalValue::I64(0)],
        }),
    }
}

fn new_state(canisters: Vec<CanisterState>) -> ReplicatedState {
    let mut state = ReplicatedState::new(subnet().subnet_id, 0x8000_0000_0010_0001, [3; 32]);
    for canister in canisters {
        state.put_canister(canister);
    }
    state
}

fn ingress(nonce: u8, canister: CanisterId, method: &str) -> SignedIngress {
    SignedIngress {
        request_id: RequestId([nonce; 32]),
        sender: user(),
        canister_id: canister,
        effective_canister_id: canister,
        method_name: method.to_string(),
        arg: b"DIDL\x00\x00".to_vec(),
        ingress_expiry: Time(1_000_000_000_000),
        size_bytes: 100,
    }
}

fn block(height: u64, ingress: Vec<SignedIngress>) -> Block {
    Block {
        height: Height(height),
        time: Time(height * 1_000_000_000),
        ingress,
        randomness: [0; 32],
    }
}

fn scheduler(embedder: &Arc<FakeEmbedder>) -> Scheduler {
    Scheduler::new(embedder.clone(), ExecutionConfig::default(), subnet())
}

fn status(state: &ReplicatedState, nonce: u8) -> IngressState {
    state
        .ingress_history
        .get(&RequestId([nonce; 32]))
        .expect("ingress status recorded")
        .state
        .clone()
}

fn rejected(state: &IngressState) -> (RejectCode, Option<ErrorCode>, String) {
    match state {
        IngressState::Rejected(error) => (error.code, error.error_code, error.message.clone()),
        other => panic!("expected a rejection, got {other:?}"),
    }
}

fn a_call(callee: CanisterId, method: &str, cycles: Cycles) -> OutgoingCall {
    OutgoingCall {
        callee,
        method_name: method.to_string(),
        payload: b"DIDL\x00\x00".to_vec(),
        cycles,
        on_reply: WasmClosure {
            func_idx: 1,
            env: 0,
        },
        on_reject: WasmClosure {
            func_idx: 2,
            env: 0,
        },
        on_cleanup: Some(WasmClosure {
            func_idx: 3,
            env: 0,
        }),
        timeout_seconds: None,
    }
}

fn calls(calls: Vec<OutgoingCall>) -> SystemStateChanges {
    SystemStateChanges {
        calls,
        ..SystemStateChanges::default()
    }
}

#[test]
fn ingress_update_replies_and_charges_fees() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update inc", |_| {
        Ok((
            Some(WasmResponse::Reply(b"ok".to_vec())),
            SystemStateChanges::default(),
            1,
        ))
    });
    let mut state = new_state(vec![installed_canister(
        a,
        &[("inc", MethodKind::Update)],
        &[],
    )]);
    let summary =
        scheduler(&embedder).execute_block(&mut state, &block(1, vec![ingress(1, a, "inc")]));

    assert_eq!(status(&state, 1), IngressState::Replied(b"ok".to_vec()));
    assert_eq!(counter(&state, a), 1);
    assert_eq!(summary.ingress_inducted, 1);
    assert_eq!(summary.messages_executed, 1);
    assert!(!summary.work_pending);
    let config = ExecutionConfig::default();
    let canister = state.canister(&a).unwrap();
    let fees = ingress_induction_fee(&config, 100)
        .saturating_add(execution_fee(&config, FAKE_INSTRUCTIONS));
    // Storage for the few bytes of the module over one second rounds to zero.
    assert_eq!(
        canister.system_state.cycles_balance,
        INITIAL_CYCLES.saturating_sub(fees)
    );
    assert_eq!(canister.system_state.canister_version, 1);
    assert!(
        canister
            .system_state
            .call_context_manager
            .call_contexts
            .is_empty()
    );
    assert_eq!(state.metadata.height, Height(1));
    assert_eq!(state.metadata.update_transactions_total, 1);
}

#[test]
fn replicated_query_method_called_as_update_replies() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_query get", |input| {
        assert!(matches!(
            input.api_type,
            ApiType::Query {
                replicated: true,
                ..
            }
        ));
        reply(b"value")
    });
    let mut state = new_state(vec![installed_canister(
        a,
        &[("get", MethodKind::Query)],
        &[],
    )]);
    scheduler(&embedder).execute_block(&mut state, &block(1, vec![ingress(1, a, "get")]));
    assert_eq!(status(&state, 1), IngressState::Replied(b"value".to_vec()));
}

#[test]
fn trap_rejects_and_rolls_back() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update boom", |_| {
        Err(ExecutionError::CalledTrap("boom".into()))
    });
    let mut state = new_state(vec![
        installed_canister(a, &[("boom", MethodKind::Update)], &[]),
        installed_canister(b, &[], &[]),
    ]);
    scheduler(&embedder).execute_block(&mut state, &block(1, vec![ingress(1, a, "boom")]));
    let (code, error_code, message) = rejected(&status(&state, 1));
    assert_eq!(code, RejectCode::CanisterError);
    assert_eq!(error_code, Some(ErrorCode::CanisterCalledTrap));
    assert!(message.contains("boom"), "{message}");
    assert_eq!(counter(&state, a), 0);
    let canister = state.canister(&a).unwrap();
    assert_eq!(canister.system_state.canister_version, 0);
    assert!(
        canister
            .system_state
            .call_context_manager
            .call_contexts
            .is_empty()
    );
    assert!(
        state
            .canister(&b)
            .unwrap()
            .system_state
            .input_queue
            .is_empty()
    );
}

#[test]
fn missing_method_missing_canister_and_empty_canister_are_rejected() {
    let a = canister_id(1);
    let empty = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    let mut empty_canister = installed_canister(empty, &[], &[]);
    empty_canister.execution_state = None;
    let mut state = new_state(vec![installed_canister(a, &[], &[]), empty_canister]);
    scheduler(&embedder).execute_block(
        &mut state,
        &block(
            1,
            vec![
                ingress(1, a, "nope"),
                ingress(2, canister_id(99), "x"),
                ingress(3, empty, "x"),
            ],
        ),
    );
    assert_eq!(
        rejected(&status(&state, 1)).1,
        Some(ErrorCode::CanisterMethodNotExported)
    );
    let (code, error_code, _) = rejected(&status(&state, 2));
    assert_eq!(
        (code, error_code),
        (
            RejectCode::DestinationInvalid,
            Some(ErrorCode::CanisterNotFound)
        )
    );
    assert_eq!(
        rejected(&status(&state, 3)).1,
        Some(ErrorCode::CanisterWasmModuleNotFound)
    );
}

#[test]
fn did_not_reply_is_rejected() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update silent", |_| {
        Ok((None, SystemStateChanges::default(), 1))
    });
    let mut state = new_state(vec![installed_canister(
        a,
        &[("silent", MethodKind::Update)],
        &[],
    )]);
    scheduler(&embedder).execute_block(&mut state, &block(1, vec![ingress(1, a, "silent")]));
    let (code, error_code, _) = rejected(&status(&state, 1));
    assert_eq!(code, RejectCode::CanisterError);
    assert_eq!(error_code, Some(ErrorCode::CanisterDidNotReply));
    // The execution itself succeeded: its state change stays.
    assert_eq!(counter(&state, a), 1);
}

#[test]
fn inter_canister_call_round_trip_refunds_unaccepted_cycles() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update relay", move |_| {
        Ok((None, calls(vec![a_call(b, "take", Cycles(1_000_000))]), 1))
    });
    embedder.on(b, "canister_update take", move |input| {
        let ApiType::Update {
            caller,
            cycles_available,
            ..
        } = &input.api_type
        else {
            panic!("update expected");
        };
        assert_eq!(*caller, a.get());
        assert_eq!(*cycles_available, Cycles(1_000_000));
        Ok((
            Some(WasmResponse::Reply(b"from b".to_vec())),
            SystemStateChanges {
                cycles_accepted: Cycles(400_000),
                ..SystemStateChanges::default()
            },
            1,
        ))
    });
    embedder.on(a, "closure 1", |input| {
        let ApiType::ReplyCallback {
            reply: data,
            refunded,
            ..
        } = &input.api_type
        else {
            panic!("reply callback expected");
        };
        assert_eq!(*refunded, Cycles(600_000));
        Ok((
            Some(WasmResponse::Reply(data.clone())),
            SystemStateChanges::default(),
            10,
        ))
    });
    let mut state = new_state(vec![
        installed_canister(a, &[("relay", MethodKind::Update)], &[]),
        installed_canister(b, &[("take", MethodKind::Update)], &[]),
    ]);
    let summary =
        scheduler(&embedder).execute_block(&mut state, &block(1, vec![ingress(1, a, "relay")]));
    assert_eq!(status(&state, 1), IngressState::Replied(b"from b".to_vec()));
    assert_eq!(summary.messages_executed, 3);
    assert_eq!(counter(&state, a), 11);
    assert_eq!(counter(&state, b), 1);

    let config = ExecutionConfig::default();
    let a_fees = ingress_induction_fee(&config, 100)
        .saturating_add(execution_fee(&config, FAKE_INSTRUCTIONS))
        .saturating_add(execution_fee(&config, FAKE_INSTRUCTIONS))
        .saturating_add(call_fee(&config, "take", 6));
    assert_eq!(
        state.canister(&a).unwrap().system_state.cycles_balance,
        INITIAL_CYCLES
            .saturating_sub(a_fees)
            .saturating_sub(Cycles(400_000))
    );
    assert_eq!(
        state.canister(&b).unwrap().system_state.cycles_balance,
        INITIAL_CYCLES
            .saturating_sub(execution_fee(&config, FAKE_INSTRUCTIONS))
            .saturating_add(Cycles(400_000))
    );
    for id in [a, b] {
        let manager = &state
            .canister(&id)
            .unwrap()
            .system_state
            .call_context_manager;
        assert!(manager.call_contexts.is_empty() && manager.callbacks.is_empty());
    }
}

#[test]
fn a_callback_that_cannot_prepay_gets_no_free_instructions() {
    let a = canister_id(1);
    let b = canister_id(2);
    let config = ExecutionConfig::default();
    let prepay = execution_fee(&config, config.max_instructions_per_update);
    let balance = Cycles(4 * prepay.get());
    // a attaches nearly all it has left after prepaying its update, and b keeps it all: when the
    // response comes back, a can no longer prepay a whole callback.
    let attached = balance
        .saturating_sub(prepay)
        .saturating_sub(ingress_induction_fee(&config, 100))
        .saturating_sub(call_fee(&config, "take", 6))
        .saturating_sub(Cycles(1_000));
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update relay", move |_| {
        Ok((None, calls(vec![a_call(b, "take", attached)]), 1))
    });
    embedder.on(b, "canister_update take", move |_| {
        Ok((
            Some(WasmResponse::Reply(b"kept".to_vec())),
            SystemStateChanges {
                cycles_accepted: attached,
                ..SystemStateChanges::default()
            },
            1,
        ))
    });
    let limits = Arc::new(Mutex::new(Vec::new()));
    let seen = limits.clone();
    embedder.on(a, "closure 1", move |input| {
        seen.lock().unwrap().push(input.instruction_limit);
        Ok((
            Some(WasmResponse::Reply(b"done".to_vec())),
            SystemStateChanges::default(),
            1,
        ))
    });
    let mut caller = installed_canister(a, &[("relay", MethodKind::Update)], &[]);
    caller.system_state.cycles_balance = balance;
    let mut state = new_state(vec![
        caller,
        installed_canister(b, &[("take", MethodKind::Update)], &[]),
    ]);
    let before = state.canister(&a).unwrap().system_state.cycles_balance;
    scheduler(&embedder).execute_block(&mut state, &block(1, vec![ingress(1, a, "relay")]));
    assert_eq!(status(&state, 1), IngressState::Replied(b"done".to_vec()));
    let limit = limits.lock().unwrap()[0];
    assert!(
        limit < config.max_instructions_per_update,
        "the callback's budget is what the balance pays for: {limit}"
    );
    // What a paid in all never exceeds what it had: nothing ran for free.
    let after = state.canister(&a).unwrap().system_state.cycles_balance;
    assert!(after < before);
    assert!(
        u128::from(limit) * config.cycles_per_instruction.get()
            + config.update_message_execution_fee.get()
            <= before.get() - attached.get()
    );
}

#[test]
fn call_to_stopped_or_missing_canister_gets_reject_callback() {
    let a = canister_id(1);
    let stopped = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update go", move |_| {
        Ok((
            None,
            calls(vec![
                a_call(stopped, "m", Cycles(5)),
                a_call(canister_id(77), "m", Cycles::ZERO),
            ]),
            0,
        ))
    });
    let codes = Arc::new(Mutex::new(Vec::new()));
    let seen = codes.clone();
    embedder.on(a, "closure 2", move |input| {
        let ApiType::RejectCallback { code, refunded, .. } = &input.api_type else {
            panic!("reject callback expected");
        };
        seen.lock().unwrap().push((*code, *refunded));
        let done = seen.lock().unwrap().len() == 2;
        Ok((
            done.then(|| WasmResponse::Reject("both failed".into())),
            SystemStateChanges::default(),
            0,
        ))
    });
    let mut stopped_canister = installed_canister(stopped, &[("m", MethodKind::Update)], &[]);
    stopped_canister.system_state.status = CanisterStatus::Stopped;
    let mut state = new_state(vec![
        installed_canister(a, &[("go", MethodKind::Update)], &[]),
        stopped_canister,
    ]);
    scheduler(&embedder).execute_block(&mut state, &block(1, vec![ingress(1, a, "go")]));
    let mut codes = codes.lock().unwrap().clone();
    codes.sort_by_key(|(code, _)| code.as_u64());
    assert_eq!(
        codes,
        vec![
            (RejectCode::DestinationInvalid, Cycles::ZERO),
            (RejectCode::CanisterError, Cycles(5)),
        ]
    );
    let (code, error_code, message) = rejected(&status(&state, 1));
    assert_eq!(
        (code, error_code),
        (
            RejectCode::CanisterReject,
            Some(ErrorCode::CanisterRejectedMessage)
        )
    );
    assert_eq!(message, "both failed");
}

#[test]
fn ingress_to_stopped_canister_is_rejected() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    let mut canister = installed_canister(a, &[("inc", MethodKind::Update)], &[]);
    canister.system_state.status = CanisterStatus::Stopped;
    let mut state = new_state(vec![canister]);
    scheduler(&embedder).execute_block(&mut state, &block(1, vec![ingress(1, a, "inc")]));
    let (code, error_code, _) = rejected(&status(&state, 1));
    assert_eq!(
        (code, error_code),
        (RejectCode::CanisterError, Some(ErrorCode::CanisterStopped))
    );
    assert_eq!(embedder.count(a, "canister_update inc"), 0);
}

#[test]
fn stopping_canister_stops_after_its_last_call_context_and_answers_stop() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update wait", move |_| {
        Ok((None, calls(vec![a_call(b, "slow", Cycles::ZERO)]), 0))
    });
    embedder.on(b, "canister_update slow", |_| reply(b"done"));
    embedder.on(a, "closure 1", |_| reply(b"finished"));
    let mut state = new_state(vec![
        installed_canister(a, &[("wait", MethodKind::Update)], &[]),
        installed_canister(b, &[("slow", MethodKind::Update)], &[]),
    ]);
    // Execute only A's call: B's request stays queued because the round allows one message.
    let config = ExecutionConfig {
        max_messages_per_round: 1,
        ..ExecutionConfig::default()
    };
    let mut scheduler = Scheduler::new(embedder.clone(), config, subnet());
    let summary = scheduler.execute_block(&mut state, &block(1, vec![ingress(1, a, "wait")]));
    assert!(summary.work_pending);
    assert!(scheduler.has_pending_work(&state));
    assert_eq!(status(&state, 1), IngressState::Processing);

    let stop_request = RequestId([9; 32]);
    state.canister_mut(&a).unwrap().system_state.status = CanisterStatus::Stopping {
        stop_contexts: vec![StopContext::Ingress {
            sender: user(),
            request_id: stop_request,
        }],
        stop_deadlines: vec![Time(u64::MAX)],
    };
    // New calls are refused while stopping; the response to the open call is still delivered.
    scheduler.execute_block(&mut state, &block(2, vec![ingress(2, a, "wait")]));
    let (_, error_code, _) = rejected(&status(&state, 2));
    assert_eq!(error_code, Some(ErrorCode::CanisterStopping));
    for height in 3..6 {
        scheduler.execute_block(&mut state, &block(height, vec![]));
    }
    assert_eq!(
        status(&state, 1),
        IngressState::Replied(b"finished".to_vec())
    );
    assert_eq!(
        state.canister(&a).unwrap().system_state.status,
        CanisterStatus::Stopped
    );
    assert_eq!(
        state.ingress_history.get(&stop_request).unwrap().state,
        IngressState::Replied(EMPTY_CANDID_REPLY.to_vec())
    );
}

#[test]
fn trapping_callback_runs_cleanup_and_rejects_with_the_trap() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update go", move |_| {
        Ok((None, calls(vec![a_call(b, "m", Cycles::ZERO)]), 1))
    });
    embedder.on(b, "canister_update m", |_| reply(b"x"));
    embedder.on(a, "closure 1", |_| {
        Err(ExecutionError::Trapped("unreachable".into()))
    });
    embedder.on(a, "closure 3", |input| {
        assert_eq!(
            input.api_type,
            ApiType::Cleanup {
                caller: user(),
                code: 0,
                in_composite_query: false,
            }
        );
        Ok((None, SystemStateChanges::default(), 100))
    });
    let mut state = new_state(vec![
        installed_canister(a, &[("go", MethodKind::Update)], &[]),
        installed_canister(b, &[("m", MethodKind::Update)], &[]),
    ]);
    scheduler(&embedder).execute_block(&mut state, &block(1, vec![ingress(1, a, "go")]));
    let (code, error_code, message) = rejected(&status(&state, 1));
    assert_eq!(
        (code, error_code),
        (RejectCode::CanisterError, Some(ErrorCode::CanisterTrapped))
    );
    assert!(message.contains("unreachable"), "{message}");
    // The first execution's change (1) and the cleanup's (100) stay; the trapped callback's do not.
    assert_eq!(counter(&state, a), 101);
    assert_eq!(embedder.count(a, "closure 3"), 1);
}

#[test]
fn one_way_call_with_invalid_callbacks_does_not_disturb_the_caller() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update fire", move |_| {
        let mut call = a_call(b, "m", Cycles::ZERO);
        call.on_reply = WasmClosure {
            func_idx: u64::from(u32::MAX),
            env: 0,
        };
        call.on_reject = call.on_reply;
        call.on_cleanup = None;
        Ok((
            Some(WasmResponse::Reply(b"sent".to_vec())),
            calls(vec![call]),
            0,
        ))
    });
    embedder.on(b, "canister_update m", |_| {
        Ok((
            Some(WasmResponse::Reply(vec![])),
            SystemStateChanges::default(),
            1,
        ))
    });
    let mut state = new_state(vec![
        installed_canister(a, &[("fire", MethodKind::Update)], &[]),
        installed_canister(b, &[("m", MethodKind::Update)], &[]),
    ]);
    scheduler(&embedder).execute_block(&mut state, &block(1, vec![ingress(1, a, "fire")]));
    assert_eq!(status(&state, 1), IngressState::Replied(b"sent".to_vec()));
    assert_eq!(counter(&state, b), 1);
    let manager = &state
        .canister(&a)
        .unwrap()
        .system_state
        .call_context_manager;
    assert!(manager.call_contexts.is_empty() && manager.callbacks.is_empty());
}

#[test]
fn timer_fires_once_and_is_cleared() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_global_timer", |input| {
        assert_eq!(input.api_type, ApiType::SystemTask);
        Ok((None, SystemStateChanges::default(), 1))
    });
    let mut canister = installed_canister(a, &[], &["canister_global_timer"]);
    canister.system_state.global_timer_nanos = 1_500_000_000;
    let mut state = new_state(vec![canister]);
    let mut scheduler = scheduler(&embedder);
    scheduler.execute_block(&mut state, &block(1, vec![]));
    assert_eq!(counter(&state, a), 0, "not due at 1 s");
    assert!(!scheduler.has_pending_work(&state));
    scheduler.execute_block(&mut state, &block(2, vec![]));
    assert_eq!(counter(&state, a), 1);
    assert_eq!(
        state.canister(&a).unwrap().system_state.global_timer_nanos,
        0
    );
    scheduler.execute_block(&mut state, &block(3, vec![]));
    assert_eq!(counter(&state, a), 1);
    assert!(
        state
            .canister(&a)
            .unwrap()
            .system_state
            .call_context_manager
            .call_contexts
            .is_empty()
    );
}

#[test]
fn timer_self_call_to_timer_executor_works() {
    let a = canister_id(1);
    let executor = "<ic-cdk internal> timer_executor";
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_global_timer", move |_| {
        let mut call = a_call(a, executor, Cycles::ZERO);
        call.timeout_seconds = Some(300);
        Ok((None, calls(vec![call]), 0))
    });
    embedder.on(a, &format!("canister_update {executor}"), |input| {
        let ApiType::Update {
            caller, deadline, ..
        } = &input.api_type
        else {
            panic!("update expected");
        };
        assert_eq!(*caller, canister_id(1).get());
        assert_eq!(*deadline, 2_000_000_000 + 300 * 1_000_000_000);
        Ok((
            Some(WasmResponse::Reply(vec![])),
            SystemStateChanges::default(),
            5,
        ))
    });
    embedder.on(a, "closure 1", |_| {
        Ok((None, SystemStateChanges::default(), 0))
    });
    let mut canister = installed_canister(
        a,
        &[(executor, MethodKind::Update)],
        &["canister_global_timer"],
    );
    canister.system_state.global_timer_nanos = 1;
    let mut state = new_state(vec![canister]);
    scheduler(&embedder).execute_block(&mut state, &block(2, vec![]));
    assert_eq!(counter(&state, a), 5);
    let manager = &state
        .canister(&a)
        .unwrap()
        .system_state
        .call_context_manager;
    assert!(manager.call_contexts.is_empty() && manager.callbacks.is_empty());
}

#[test]
fn heartbeat_runs_every_block_for_running_canisters() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_heartbeat", |_| {
        Ok((None, SystemStateChanges::default(), 1))
    });
    let mut state = new_state(vec![installed_canister(a, &[], &["canister_heartbeat"])]);
    let mut scheduler = scheduler(&embedder);
    assert!(
        !scheduler.has_pending_work(&state),
        "heartbeats ride on idle blocks"
    );
    for height in 1..=3 {
        scheduler.execute_block(&mut state, &block(height, vec![]));
    }
    assert_eq!(counter(&state, a), 3);
    state.canister_mut(&a).unwrap().system_state.status = CanisterStatus::Stopped;
    scheduler.execute_block(&mut state, &block(4, vec![]));
    assert_eq!(counter(&state, a), 3);
}

#[test]
fn heartbeat_interval_is_respected() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_heartbeat", |_| {
        Ok((None, SystemStateChanges::default(), 1))
    });
    let mut state = new_state(vec![installed_canister(a, &[], &["canister_heartbeat"])]);
    let config = ExecutionConfig {
        heartbeat_interval_nanos: 2_000_000_000,
        ..ExecutionConfig::default()
    };
    let mut scheduler = Scheduler::new(embedder.clone(), config, subnet());
    // Blocks at 1 s .. 6 s: the interval boundaries 2, 4 and 6 s are crossed three times.
    for height in 1..=6 {
        scheduler.execute_block(&mut state, &block(height, vec![]));
    }
    assert_eq!(counter(&state, a), 3);
}

#[test]
fn replayed_and_expired_ingress_is_not_executed() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update inc", |_| {
        Ok((
            Some(WasmResponse::Reply(vec![])),
            SystemStateChanges::default(),
            1,
        ))
    });
    let mut state = new_state(vec![installed_canister(
        a,
        &[("inc", MethodKind::Update)],
        &[],
    )]);
    let mut scheduler = scheduler(&embedder);
    let message = ingress(1, a, "inc");
    scheduler.execute_block(
        &mut state,
        &block(1, vec![message.clone(), message.clone()]),
    );
    scheduler.execute_block(&mut state, &block(2, vec![message]));
    assert_eq!(counter(&state, a), 1);

    let mut expired = ingress(2, a, "inc");
    expired.ingress_expiry = Time(1);
    let summary = scheduler.execute_block(&mut state, &block(3, vec![expired]));
    assert_eq!(summary.ingress_inducted, 0);
    assert!(state.ingress_history.get(&RequestId([2; 32])).is_none());
    assert_eq!(counter(&state, a), 1);
}

#[test]
fn ingress_history_is_pruned_after_expiry_but_running_calls_are_kept() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    let mut state = new_state(vec![installed_canister(a, &[], &[])]);
    let entry = |state: IngressState| IngressStatus {
        state,
        sender: user(),
        effective_canister_id: a,
        ingress_expiry: Time(500_000_000),
    };
    state
        .ingress_history
        .set(RequestId([1; 32]), entry(IngressState::Replied(vec![])));
    state
        .ingress_history
        .set(RequestId([2; 32]), entry(IngressState::Processing));
    scheduler(&embedder).execute_block(&mut state, &block(1, vec![]));
    assert!(!state.ingress_history.contains(&RequestId([1; 32])));
    assert!(state.ingress_history.contains(&RequestId([2; 32])));
}

#[test]
fn out_of_cycles_canister_rejects_with_code_2() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    let mut canister = installed_canister(a, &[("inc", MethodKind::Update)], &[]);
    canister.system_state.cycles_balance = Cycles(1_000);
    let mut state = new_state(vec![canister]);
    scheduler(&embedder).execute_block(&mut state, &block(1, vec![ingress(1, a, "inc")]));
    let (code, error_code, message) = rejected(&status(&state, 1));
    assert_eq!(
        (code, error_code),
        (
            RejectCode::SysTransient,
            Some(ErrorCode::CanisterOutOfCycles)
        )
    );
    assert!(message.contains("provisional_top_up_canister"), "{message}");
    assert_eq!(
        state.canister(&a).unwrap().system_state.cycles_balance,
        Cycles(1_000)
    );
}

#[test]
fn a_canister_whose_balance_reaches_zero_is_uninstalled() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    let mut canister = installed_canister(a, &[("inc", MethodKind::Update)], &[]);
    // 1 MiB of heap costs more storage per second than the balance holds.
    if let Some(execution) = canister.execution_state.as_mut() {
        execution.wasm_memory_size_pages = 16;
    }
    canister.system_state.cycles_balance = Cycles(10);
    canister.system_state.certified_data = b"data".to_vec();
    canister.system_state.settings.compute_allocation = 10;
    canister.system_state.total_num_changes = 3;
    canister
        .system_state
        .history
        .push_back(openic_replicated_state::CanisterChange {
            timestamp_nanos: 0,
            canister_version: 0,
            origin: openic_replicated_state::ChangeOrigin::User(user()),
            details: openic_replicated_state::ChangeDetails::CodeUninstall,
        });
    let version = canister.system_state.canister_version;
    let mut state = new_state(vec![canister]);
    state.append_log(a, [b"before".to_vec()]);
    let consumed = state.metadata.consumed_cycles_total;

    scheduler(&embedder).execute_block(&mut state, &block(1, vec![]));
    let canister = state.canister(&a).unwrap();
    assert!(canister.execution_state.is_none(), "uninstalled");
    let system = &canister.system_state;
    assert_eq!(system.cycles_balance, Cycles::ZERO);
    assert!(system.certified_data.is_empty());
    assert!(system.history.is_empty(), "recent changes dropped");
    assert_eq!(system.total_num_changes, 3, "their count kept");
    assert_eq!(system.settings.compute_allocation, 0);
    assert_eq!(system.canister_version, version + 1);
    assert!(state.canister_logs[&a].records().is_empty());
    assert_eq!(state.metadata.consumed_cycles_total - consumed, 10);

    // It stays, empty and without cycles: calls are refused, and it is not uninstalled again.
    scheduler(&embedder).execute_block(&mut state, &block(2, vec![ingress(1, a, "inc")]));
    let (_, error_code, _) = rejected(&status(&state, 1));
    assert_eq!(error_code, Some(ErrorCode::CanisterOutOfCycles));
    assert_eq!(
        state.canister(&a).unwrap().system_state.canister_version,
        version + 1
    );
}

#[test]
fn one_hundred_busy_canisters_all_make_progress() {
    // A round's budget runs ten messages; a hundred canisters each have three waiting. Visiting
    // always from the lowest id would run only the first ten canisters for three blocks.
    let embedder = Arc::new(FakeEmbedder::default());
    let ids: Vec<CanisterId> = (1..=100).map(canister_id).collect();
    for id in &ids {
        embedder.on(*id, "canister_update work", |_| {
            Ok((
                Some(WasmResponse::Reply(Vec::new())),
                SystemStateChanges::default(),
                1,
            ))
        });
    }
    let config = ExecutionConfig {
        max_instructions_per_round: 10 * FAKE_INSTRUCTIONS,
        ..ExecutionConfig::default()
    };
    let mut scheduler = Scheduler::new(embedder.clone(), config, subnet());
    let mut state = new_state(
        ids.iter()
            .map(|id| installed_canister(*id, &[("work", MethodKind::Update)], &[]))
            .collect(),
    );
    let mut first = Vec::new();
    for round in 0..3u8 {
        for (index, id) in ids.iter().enumerate() {
            let mut message = ingress(0, *id, "work");
            let mut request_id = [0u8; 32];
            request_id[0] = round;
            request_id[1] = index as u8;
            message.request_id = RequestId(request_id);
            first.push(message);
        }
    }
    scheduler.execute_block(&mut state, &block(1, first));
    for height in 2..=10 {
        scheduler.execute_block(&mut state, &block(height, vec![]));
    }
    for id in &ids {
        assert!(
            counter(&state, *id) >= 1,
            "canister {} has not run in ten blocks",
            id.get()
        );
    }
    // Exactly the budget ran each block: 100 messages in 10 blocks, one per canister.
    assert!(ids.iter().all(|id| counter(&state, *id) == 1));
}

#[test]
fn compute_and_memory_allocations_are_charged() {
    let plain = canister_id(1);
    let allocated = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    let mut with_allocations = installed_canister(allocated, &[], &[]);
    with_allocations.system_state.settings.compute_allocation = 10;
    with_allocations.system_state.settings.memory_allocation = 1 << 30;
    let mut state = new_state(vec![installed_canister(plain, &[], &[]), with_allocations]);
    // Block 1 is one second after both canisters were last charged (time 0).
    scheduler(&embedder).execute_block(&mut state, &block(1, vec![]));
    let config = ExecutionConfig::default();
    let paid = |id| {
        INITIAL_CYCLES.get()
            - state
                .canister(&id)
                .unwrap()
                .system_state
                .cycles_balance
                .get()
    };
    let canister = state.canister(&allocated).unwrap();
    // A whole GiB of storage (its allocation, used or not) and ten percent of compute.
    let expected = config.storage_fee_per_gib_second.get()
        + 10 * config.compute_percent_allocated_per_second_fee.get();
    assert_eq!(paid(allocated), expected);
    assert!(paid(plain) < config.storage_fee_per_gib_second.get() / 1_000);
    assert_eq!(
        crate::common::idle_cycles_per_second(&config, canister),
        Cycles(expected),
        "what canister_status reports as idle_cycles_burned_per_day, per second"
    );
}

#[test]
fn full_input_queue_rejects_ingress() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update inc", |_| reply(b""));
    let config = ExecutionConfig {
        max_canister_input_queue_len: 1,
        ..ExecutionConfig::default()
    };
    let mut state = new_state(vec![installed_canister(
        a,
        &[("inc", MethodKind::Update)],
        &[],
    )]);
    Scheduler::new(embedder.clone(), config, subnet()).execute_block(
        &mut state,
        &block(1, vec![ingress(1, a, "inc"), ingress(2, a, "inc")]),
    );
    assert_eq!(status(&state, 1), IngressState::Replied(vec![]));
    assert_eq!(
        rejected(&status(&state, 2)).1,
        Some(ErrorCode::CanisterQueueFull)
    );
}

/// An embedder where canister `a`'s update `rand` calls `raw_rand` and replies with its answer.
fn raw_rand_caller(a: CanisterId) -> Arc<FakeEmbedder> {
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update rand", |_| {
        Ok((
            None,
            calls(vec![a_call(
                CanisterId::management(),
                "raw_rand",
                Cycles::ZERO,
            )]),
            0,
        ))
    });
    embedder.on(a, "closure 1", |input| {
        let ApiType::ReplyCallback { reply: data, .. } = &input.api_type else {
            panic!("reply expected");
        };
        Ok((
            Some(WasmResponse::Reply(data.clone())),
            SystemStateChanges::default(),
            0,
        ))
    });
    embedder
}

#[test]
fn management_calls_from_canisters_get_responses() {
    let a = canister_id(1);
    let embedder = raw_rand_caller(a);
    let mut state = new_state(vec![installed_canister(
        a,
        &[("rand", MethodKind::Update)],
        &[],
    )]);
    let mut scheduler = scheduler(&embedder);
    scheduler.execute_block(&mut state, &block(1, vec![ingress(1, a, "rand")]));
    // `raw_rand` answers two heights after the call, with randomness unknown at the call.
    assert_eq!(state.raw_rand_requests.len(), 1);
    scheduler.execute_block(&mut state, &block(2, Vec::new()));
    assert_eq!(status(&state, 1), IngressState::Processing);
    scheduler.execute_block(&mut state, &block(3, Vec::new()));
    assert!(state.raw_rand_requests.is_empty());
    let IngressState::Replied(bytes) = status(&state, 1) else {
        panic!("expected a reply, got {:?}", status(&state, 1));
    };
    let random: Vec<u8> = candid::decode_one(&bytes).unwrap();
    assert_eq!(random.len(), 32);
}

/// A `raw_rand` answer depends on the randomness of the block that answers it (two heights after
/// the call), so a block maker who knew the randomness of the calling block or the next one could
/// not predict it; and calls made at one height are answered in order, with fresh bytes each.
#[test]
fn raw_rand_answers_with_the_randomness_of_a_later_block() {
    let a = canister_id(1);
    let embedder = raw_rand_caller(a);
    let run = |answering_randomness: [u8; 32]| {
        let mut state = new_state(vec![installed_canister(
            a,
            &[("rand", MethodKind::Update)],
            &[],
        )]);
        let mut scheduler = scheduler(&embedder);
        let mut first = block(1, vec![ingress(1, a, "rand"), ingress(2, a, "rand")]);
        first.randomness = [1; 32];
        scheduler.execute_block(&mut state, &first);
        let mut second = block(2, Vec::new());
        second.randomness = [2; 32];
        scheduler.execute_block(&mut state, &second);
        assert_eq!(status(&state, 1), IngressState::Processing);
        let mut third = block(3, Vec::new());
        third.randomness = answering_randomness;
        scheduler.execute_block(&mut state, &third);
        let reply = |nonce| match status(&state, nonce) {
            IngressState::Replied(bytes) => candid::decode_one::<Vec<u8>>(&bytes).unwrap(),
            other => panic!("expected a reply, got {other:?}"),
        };
        (reply(1), reply(2))
    };
    let (first, second) = run([3; 32]);
    assert_eq!(first.len(), 32);
    assert_ne!(first, second);
    assert_eq!(run([3; 32]), (first.clone(), second));
    assert_ne!(run([4; 32]).0, first);
}

/// The subnet's beacon randomness feeds the state's seed; an all-zero value (a one-replica
/// subnet, or a block logged before the beacon existed) leaves the seed chain as it was.
#[test]
fn beacon_randomness_feeds_the_seed_and_zero_keeps_the_old_chain() {
    let embedder = Arc::new(FakeEmbedder::default());
    let run = |randomness: [u8; 32]| {
        let mut state = new_state(Vec::new());
        let mut block = block(1, Vec::new());
        block.randomness = randomness;
        scheduler(&embedder).execute_block(&mut state, &block);
        state.metadata.random_seed
    };
    let mut legacy = Sha256::new();
    legacy.update(new_state(Vec::new()).metadata.random_seed);
    legacy.update(1u64.to_be_bytes());
    let legacy: [u8; 32] = legacy.finalize().into();
    assert_eq!(run([0; 32]), legacy);
    assert_ne!(run([1; 32]), legacy);
    assert_ne!(run([1; 32]), run([2; 32]));
}

/// Runs the same blocks on two fresh states and checks they end equal.
#[test]
fn execution_is_deterministic() {
    let run = || {
        let a = canister_id(1);
        let b = canister_id(2);
        let embedder = Arc::new(FakeEmbedder::default());
        embedder.on(a, "canister_update relay", move |_| {
            Ok((None, calls(vec![a_call(b, "take", Cycles(77))]), 1))
        });
        embedder.on(b, "canister_update take", |_| reply(b"b"));
        embedder.on(a, "closure 1", |_| reply(b"a"));
        embedder.on(b, "canister_heartbeat", |_| {
            Ok((None, SystemStateChanges::default(), 1))
        });
        let mut state = new_state(vec![
            installed_canister(a, &[("relay", MethodKind::Update)], &[]),
            installed_canister(b, &[("take", MethodKind::Update)], &["canister_heartbeat"]),
        ]);
        let mut scheduler = scheduler(&embedder);
        for height in 1..=4u8 {
            let messages = (0..height)
                .map(|n| ingress(height * 10 + n, a, "relay"))
                .collect();
            scheduler.execute_block(&mut state, &block(u64::from(height), messages));
        }
        state
    };
    let (first, second) = (run(), run());
    assert_eq!(first.metadata, second.metadata);
    assert_eq!(first.canisters, second.canisters);
    assert_eq!(first.ingress_history, second.ingress_history);
    assert_ne!(first.metadata.random_seed, [3; 32]);
    assert_eq!(status(&first, 43), IngressState::Replied(b"a".to_vec()));
}

// ---------------------------------------------------------------------------------------------
// Queries and ingress inspection.

struct FixedSnapshot(CanistersSnapshot);

impl StateSnapshotSource for FixedSnapshot {
    fn latest_snapshot(&self) -> CanistersSnapshot {
        self.0.clone()
    }
}

struct FakeCertifier;

impl CertifiedStateReader for FakeCertifier {
    fn certified_height(&self) -> Height {
        Height(1)
    }
    fn certified_time(&self) -> Time {
        Time(0)
    }
    fn subscribe_certified_height(&self) -> tokio::sync::watch::Receiver<Height> {
        tokio::sync::watch::channel(Height(1)).1
    }
    fn ingress_status(&self, _request_id: &RequestId) -> Option<IngressStatus> {
        None
    }
    fn canister_controllers(&self, _canister_id: &CanisterId) -> Option<Vec<Principal>> {
        None
    }
    fn metadata_visibility(&self, _: &CanisterId, _: &str) -> Option<MetadataVisibility> {
        None
    }
    fn certificate_for_paths(&self, _paths: &[LabelPath]) -> Result<Vec<u8>, CertificationError> {
        Err(CertificationError::NotYetCertified)
    }
    fn certificate_for_paths_at(
        &self,
        _: &[LabelPath],
        _: Height,
    ) -> Result<Option<Vec<u8>>, CertificationError> {
        Err(CertificationError::NotYetCertified)
    }
    fn data_certificate(&self, canister_id: &CanisterId) -> Result<Vec<u8>, CertificationError> {
        Ok(canister_id.get().as_slice().to_vec())
    }
}

fn snapshot_of(canisters: Vec<CanisterState>) -> Arc<FixedSnapshot> {
    let state = new_state(canisters);
    Arc::new(FixedSnapshot(CanistersSnapshot {
        height: Height(1),
        time: Time(1_000_000_000),
        canisters: Arc::new(state.canisters_snapshot()),
        logs: Arc::new(state.canister_logs.clone()),
        snapshots: Arc::clone(&state.snapshots),
    }))
}

fn user_query(canister: CanisterId, method: &str) -> UserQuery {
    UserQuery {
        request_id: RequestId([0; 32]),
        sender: user(),
        canister_id: canister,
        effective_canister_id: canister,
        method_name: method.to_string(),
        arg: vec![],
    }
}

#[test]
fn queries_run_with_data_certificate_and_refuse_updates() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_query get", move |input| {
        let ApiType::Query {
            replicated,
            data_certificate,
            ..
        } = &input.api_type
        else {
            panic!("query expected");
        };
        assert!(!replicated);
        assert_eq!(data_certificate.as_deref(), Some(a.get().as_slice()));
        reply(b"q")
    });
    let mut stopped = installed_canister(canister_id(2), &[("get", MethodKind::Query)], &[]);
    stopped.system_state.status = CanisterStatus::Stopped;
    let snapshot = snapshot_of(vec![
        installed_canister(
            a,
            &[("get", MethodKind::Query), ("set", MethodKind::Update)],
            &[],
        ),
        stopped,
    ]);
    let queries = QueryExecution::new(
        embedder.clone(),
        snapshot,
        Arc::new(FakeCertifier),
        ExecutionConfig::default(),
        subnet(),
    );
    assert_eq!(
        queries.query(user_query(a, "get")),
        QueryResult::Reply(b"q".to_vec())
    );
    let error_code = |result: QueryResult| match result {
        QueryResult::Reject(error) => error.error_code,
        QueryResult::Reply(_) => panic!("expected a rejection"),
    };
    assert_eq!(
        error_code(queries.query(user_query(a, "set"))),
        Some(ErrorCode::CanisterMethodNotExported)
    );
    assert_eq!(
        error_code(queries.query(user_query(canister_id(9), "get"))),
        Some(ErrorCode::CanisterNotFound)
    );
    assert_eq!(
        error_code(queries.query(user_query(canister_id(2), "get"))),
        Some(ErrorCode::CanisterStopped)
    );
    assert_eq!(embedder.count(a, "canister_update set"), 0);
}

#[test]
fn composite_query_calls_other_queries() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_composite_query both", move |_| {
        Ok((None, calls(vec![a_call(b, "get", Cycles::ZERO)]), 1))
    });
    embedder.on(b, "canister_query get", move |input| {
        let ApiType::Query {
            caller,
            data_certificate,
            ..
        } = &input.api_type
        else {
            panic!("query expected");
        };
        assert_eq!(*caller, a.get());
        assert!(data_certificate.is_none());
        reply(b"from b")
    });
    embedder.on(a, "closure 1", |input| {
        let ApiType::ReplyCallback {
            reply: data,
            in_composite_query,
            ..
        } = &input.api_type
        else {
            panic!("reply callback expected");
        };
        assert!(*in_composite_query);
        // The state built by the first execution is visible to the callback.
        assert_eq!(counter_of(input.execution_state), 1);
        let mut answer = b"a+".to_vec();
        answer.extend_from_slice(data);
        Ok((
            Some(WasmResponse::Reply(answer)),
            SystemStateChanges::default(),
            0,
        ))
    });
    let snapshot = snapshot_of(vec![
        installed_canister(a, &[("both", MethodKind::CompositeQuery)], &[]),
        installed_canister(b, &[("get", MethodKind::Query)], &[]),
    ]);
    let queries = QueryExecution::new(
        embedder,
        snapshot,
        Arc::new(FakeCertifier),
        ExecutionConfig::default(),
        subnet(),
    );
    assert_eq!(
        queries.query(user_query(a, "both")),
        QueryResult::Reply(b"a+from b".to_vec())
    );
}

#[test]
fn composite_query_recursion_is_bounded() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_composite_query loop", move |_| {
        Ok((None, calls(vec![a_call(a, "loop", Cycles::ZERO)]), 0))
    });
    embedder.on(a, "closure 2", |input| {
        let ApiType::RejectCallback { message, .. } = &input.api_type else {
            panic!("reject expected");
        };
        Ok((
            Some(WasmResponse::Reject(message.clone())),
            SystemStateChanges::default(),
            0,
        ))
    });
    let snapshot = snapshot_of(vec![installed_canister(
        a,
        &[("loop", MethodKind::CompositeQuery)],
        &[],
    )]);
    let config = ExecutionConfig::default();
    let depth = config.max_composite_query_depth as usize;
    let queries = QueryExecution::new(
        embedder.clone(),
        snapshot,
        Arc::new(FakeCertifier),
        config,
        subnet(),
    );
    let QueryResult::Reject(error) = queries.query(user_query(a, "loop")) else {
        panic!("expected a rejection");
    };
    assert!(error.message.contains("deeper"), "{}", error.message);
    assert_eq!(
        embedder.count(a, "canister_composite_query loop"),
        depth + 1
    );
}

#[test]
fn ingress_filter_runs_inspect_message() {
    let a = canister_id(1);
    let plain = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_inspect_message", |input| {
        let ApiType::InspectMessage { method_name, .. } = &input.api_type else {
            panic!("inspect expected");
        };
        match method_name.as_str() {
            "allowed" => Ok((
                None,
                SystemStateChanges {
                    message_accepted: true,
                    ..Default::default()
                },
                0,
            )),
            "trapping" => Err(ExecutionError::CalledTrap("no".into())),
            _ => Ok((None, SystemStateChanges::default(), 0)),
        }
    });
    let methods = [
        ("allowed", MethodKind::Update),
        ("refused", MethodKind::Update),
        ("trapping", MethodKind::Update),
        ("get", MethodKind::Query),
        ("both", MethodKind::CompositeQuery),
    ];
    let snapshot = snapshot_of(vec![
        installed_canister(a, &methods, &["canister_inspect_message"]),
        installed_canister(plain, &[("m", MethodKind::Update)], &[]),
    ]);
    let filter = IngressFilter::new(embedder, snapshot, ExecutionConfig::default(), subnet());
    assert_eq!(filter.inspect(&ingress(1, a, "allowed")), Ok(()));
    for method in ["refused", "trapping"] {
        let error = filter.inspect(&ingress(1, a, method)).unwrap_err();
        assert_eq!(error.code, RejectCode::CanisterReject);
        assert_eq!(error.error_code, Some(ErrorCode::CanisterRejectedMessage));
    }
    assert_eq!(
        filter
            .inspect(&ingress(1, a, "both"))
            .unwrap_err()
            .error_code,
        Some(ErrorCode::CanisterMethodNotExported)
    );
    assert_eq!(
        filter
            .inspect(&ingress(1, a, "missing"))
            .unwrap_err()
            .error_code,
        Some(ErrorCode::CanisterMethodNotExported)
    );
    assert_eq!(filter.inspect(&ingress(1, plain, "m")), Ok(()));
    assert_eq!(
        filter
            .inspect(&ingress(1, canister_id(50), "m"))
            .unwrap_err()
            .error_code,
        Some(ErrorCode::CanisterNotFound)
    );
}

#[test]
fn system_task_call_context_origin_is_system_task() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_heartbeat", move |_| {
        Ok((None, calls(vec![a_call(b, "m", Cycles::ZERO)]), 0))
    });
    embedder.on(b, "canister_update m", |_| reply(b""));
    embedder.on(a, "closure 1", |_| {
        Ok((None, SystemStateChanges::default(), 1))
    });
    let config = ExecutionConfig {
        max_messages_per_round: 1,
        ..ExecutionConfig::default()
    };
    let mut state = new_state(vec![
        installed_canister(a, &[], &["canister_heartbeat"]),
        installed_canister(b, &[("m", MethodKind::Update)], &[]),
    ]);
    let mut scheduler = Scheduler::new(embedder.clone(), config, subnet());
    scheduler.execute_block(&mut state, &block(1, vec![]));
    let contexts = &state
        .canister(&a)
        .unwrap()
        .system_state
        .call_context_manager
        .call_contexts;
    assert_eq!(contexts.len(), 1);
    assert_eq!(
        contexts.values().next().unwrap().origin,
        CallOrigin::SystemTask
    );
}

#[test]
fn low_wasm_memory_hook_runs_once_when_pending() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_on_low_wasm_memory", |input| {
        assert_eq!(input.api_type, ApiType::SystemTask);
        Ok((None, SystemStateChanges::default(), 1))
    });
    let mut canister = installed_canister(a, &[], &["canister_on_low_wasm_memory"]);
    canister.system_state.low_wasm_memory_hook_pending = true;
    let mut state = new_state(vec![canister]);
    let mut scheduler = scheduler(&embedder);
    assert!(scheduler.has_pending_work(&state));
    scheduler.execute_block(&mut state, &block(1, vec![]));
    scheduler.execute_block(&mut state, &block(2, vec![]));
    assert_eq!(counter(&state, a), 1);
    assert!(
        !state
            .canister(&a)
            .unwrap()
            .system_state
            .low_wasm_memory_hook_pending
    );
}

#[test]
fn canister_stopping_another_canister_gets_the_reply_when_it_stops() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update stop_b", move |_| {
        let mut call = a_call(CanisterId::management(), "stop_canister", Cycles::ZERO);
        call.payload = candid::encode_one(ic_management_canister_types::CanisterIdRecord {
            canister_id: b.get(),
        })
        .unwrap();
        Ok((None, calls(vec![call]), 0))
    });
    embedder.on(a, "closure 1", |input| {
        let ApiType::ReplyCallback { reply: data, .. } = &input.api_type else {
            panic!("reply expected");
        };
        assert_eq!(data.as_slice(), EMPTY_CANDID_REPLY);
        reply(b"stopped")
    });
    let mut target = installed_canister(b, &[], &[]);
    target.system_state.controllers.insert(a.get());
    let mut state = new_state(vec![
        installed_canister(a, &[("stop_b", MethodKind::Update)], &[]),
        target,
    ]);
    scheduler(&embedder).execute_block(&mut state, &block(1, vec![ingress(1, a, "stop_b")]));
    assert_eq!(
        status(&state, 1),
        IngressState::Replied(b"stopped".to_vec())
    );
    assert_eq!(
        state.canister(&b).unwrap().system_state.status,
        CanisterStatus::Stopped
    );
}

#[test]
fn replicated_query_keeps_cycles_and_reply_but_not_state_or_version() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update go", move |_| {
        Ok((None, calls(vec![a_call(b, "get", Cycles(1_000))]), 0))
    });
    embedder.on(b, "canister_query get", |input| {
        assert!(matches!(
            input.api_type,
            ApiType::Query {
                replicated: true,
                ..
            }
        ));
        Ok((
            Some(WasmResponse::Reply(b"v".to_vec())),
            SystemStateChanges {
                cycles_accepted: Cycles(400),
                ..SystemStateChanges::default()
            },
            5,
        ))
    });
    embedder.on(a, "closure 1", |_| reply(b"done"));
    let mut state = new_state(vec![
        installed_canister(a, &[("go", MethodKind::Update)], &[]),
        installed_canister(b, &[("get", MethodKind::Query)], &[]),
    ]);
    scheduler(&embedder).execute_block(&mut state, &block(1, vec![ingress(1, a, "go")]));
    assert_eq!(status(&state, 1), IngressState::Replied(b"done".to_vec()));
    assert_eq!(
        counter(&state, b),
        0,
        "the query's state change is discarded"
    );
    let callee = state.canister(&b).unwrap();
    assert_eq!(callee.system_state.canister_version, 0);
    let config = ExecutionConfig::default();
    assert_eq!(
        callee.system_state.cycles_balance,
        INITIAL_CYCLES
            .saturating_sub(execution_fee(&config, FAKE_INSTRUCTIONS))
            .saturating_add(Cycles(400)),
        "accepted cycles still apply"
    );
}

#[test]
fn callbacks_see_the_call_context_instructions() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update go", move |input| {
        assert_eq!(input.system_state.call_context_instructions, 0);
        Ok((None, calls(vec![a_call(b, "m", Cycles::ZERO)]), 0))
    });
    embedder.on(b, "canister_update m", |_| reply(b"x"));
    embedder.on(a, "closure 1", |input| {
        assert_eq!(
            input.system_state.call_context_instructions,
            FAKE_INSTRUCTIONS
        );
        reply(b"done")
    });
    let mut state = new_state(vec![
        installed_canister(a, &[("go", MethodKind::Update)], &[]),
        installed_canister(b, &[("m", MethodKind::Update)], &[]),
    ]);
    scheduler(&embedder).execute_block(&mut state, &block(1, vec![ingress(1, a, "go")]));
    assert_eq!(status(&state, 1), IngressState::Replied(b"done".to_vec()));
}

#[test]
fn outstanding_callbacks_are_bounded_per_canister() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update go", move |input| {
        assert!(input.system_state.can_make_calls);
        assert_eq!(input.system_state.remaining_callbacks, 1);
        Ok((None, calls(vec![a_call(b, "m", Cycles::ZERO)]), 0))
    });
    embedder.on(a, "canister_update check", |input| {
        // The call made by `go` is still outstanding: the limit of one is reached.
        assert!(!input.system_state.can_make_calls);
        assert_eq!(input.system_state.remaining_callbacks, 0);
        reply(b"checked")
    });
    embedder.on(b, "canister_update m", |_| reply(b"x"));
    embedder.on(a, "closure 1", |_| reply(b"done"));
    let mut state = new_state(vec![
        installed_canister(
            a,
            &[("go", MethodKind::Update), ("check", MethodKind::Update)],
            &[],
        ),
        installed_canister(b, &[("m", MethodKind::Update)], &[]),
    ]);
    let config = ExecutionConfig {
        max_callbacks_per_canister: 1,
        ..ExecutionConfig::default()
    };
    let mut scheduler = Scheduler::new(embedder.clone(), config, subnet());
    scheduler.execute_block(
        &mut state,
        &block(1, vec![ingress(1, a, "go"), ingress(2, a, "check")]),
    );
    assert_eq!(status(&state, 1), IngressState::Replied(b"done".to_vec()));
    assert_eq!(
        status(&state, 2),
        IngressState::Replied(b"checked".to_vec())
    );
    assert_eq!(embedder.count(a, "canister_update check"), 1);
}

#[test]
fn unpayable_timer_is_kept_and_does_not_make_work() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_global_timer", |_| {
        Ok((None, SystemStateChanges::default(), 1))
    });
    let mut canister = installed_canister(a, &[], &["canister_global_timer"]);
    canister.system_state.global_timer_nanos = 500_000_000;
    // Too little for the timer's prepayment (a zero balance would uninstall the canister).
    canister.system_state.cycles_balance = Cycles(1_000);
    let mut state = new_state(vec![canister]);
    let mut scheduler = scheduler(&embedder);
    scheduler.execute_block(&mut state, &block(1, vec![]));
    assert_eq!(counter(&state, a), 0, "it cannot pay, so it does not run");
    assert_eq!(
        state.canister(&a).unwrap().system_state.global_timer_nanos,
        500_000_000,
        "the timer is kept for when the canister is topped up"
    );
    assert!(
        !scheduler.has_pending_work(&state),
        "an unpayable timer does not make the node spin"
    );
    state.canister_mut(&a).unwrap().system_state.cycles_balance = INITIAL_CYCLES;
    assert!(scheduler.has_pending_work(&state));
    scheduler.execute_block(&mut state, &block(2, vec![]));
    assert_eq!(counter(&state, a), 1);
    assert_eq!(
        state.canister(&a).unwrap().system_state.global_timer_nanos,
        0
    );
}

#[test]
fn block_time_never_goes_backwards() {
    let embedder = Arc::new(FakeEmbedder::default());
    let mut state = new_state(vec![]);
    let mut scheduler = scheduler(&embedder);
    scheduler.execute_block(&mut state, &block(5, vec![]));
    assert_eq!(state.metadata.time, Time(5_000_000_000));
    let earlier = Block {
        height: Height(6),
        time: Time(1_000_000_000),
        ingress: vec![],
        randomness: [0; 32],
    };
    scheduler.execute_block(&mut state, &earlier);
    assert_eq!(state.metadata.time, Time(5_000_000_000));
    assert_eq!(state.metadata.height, Height(6));
}

#[test]
fn call_finishing_after_its_expiry_is_kept_for_the_retention_period() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update go", move |_| {
        Ok((None, calls(vec![a_call(b, "m", Cycles::ZERO)]), 0))
    });
    embedder.on(b, "canister_update m", |_| reply(b"x"));
    embedder.on(a, "closure 1", |_| reply(b"late"));
    let mut state = new_state(vec![
        installed_canister(a, &[("go", MethodKind::Update)], &[]),
        installed_canister(b, &[("m", MethodKind::Update)], &[]),
    ]);
    // Expires at 1.5 s; the call is inducted at 1 s, but only a message per block may run.
    let mut message = ingress(1, a, "go");
    message.ingress_expiry = Time(1_500_000_000);
    let config = ExecutionConfig {
        max_messages_per_round: 1,
        ..ExecutionConfig::default()
    };
    let mut scheduler = Scheduler::new(embedder.clone(), config, subnet());
    scheduler.execute_block(&mut state, &block(1, vec![message]));
    for height in 2..=4 {
        scheduler.execute_block(&mut state, &block(height, vec![]));
    }
    assert_eq!(status(&state, 1), IngressState::Replied(b"late".to_vec()));
    // Block 1 runs `go`, block 2 runs `m`, block 3 the callback that answers at 3 s.
    let retention = crate::common::FALLBACK_INGRESS_RETENTION_NANOS;
    let expiry = state
        .ingress_history
        .get(&RequestId([1; 32]))
        .unwrap()
        .ingress_expiry;
    assert_eq!(
        expiry,
        Time(3_000_000_000).saturating_add_nanos(retention),
        "kept until the retention period after it finished"
    );
    // Still readable a little later (the old expiry has long passed).
    scheduler.execute_block(&mut state, &block(10, vec![]));
    assert_eq!(status(&state, 1), IngressState::Replied(b"late".to_vec()));
}

#[test]
fn cleanup_inside_a_composite_query_runs_in_the_composite_context() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_composite_query both", move |_| {
        Ok((None, calls(vec![a_call(b, "get", Cycles::ZERO)]), 0))
    });
    embedder.on(b, "canister_query get", |_| reply(b"from b"));
    embedder.on(a, "closure 1", |_| {
        Err(ExecutionError::Trapped("unreachable".into()))
    });
    embedder.on(a, "closure 3", |input| {
        assert_eq!(
            input.api_type,
            ApiType::Cleanup {
                caller: user(),
                code: 0,
                in_composite_query: true,
            }
        );
        Ok((None, SystemStateChanges::default(), 0))
    });
    let snapshot = snapshot_of(vec![
        installed_canister(a, &[("both", MethodKind::CompositeQuery)], &[]),
        installed_canister(b, &[("get", MethodKind::Query)], &[]),
    ]);
    let queries = QueryExecution::new(
        embedder.clone(),
        snapshot,
        Arc::new(FakeCertifier),
        ExecutionConfig::default(),
        subnet(),
    );
    assert!(matches!(
        queries.query(user_query(a, "both")),
        QueryResult::Reject(_)
    ));
    assert_eq!(embedder.count(a, "closure 3"), 1);
}

#[test]
fn stop_canister_times_out_while_call_contexts_stay_open() {
    let a = canister_id(1);
    let embedder = Arc::new(FakeEmbedder::default());
    let mut canister = installed_canister(a, &[], &[]);
    // A call context that never closes (its call is still being answered elsewhere).
    canister
        .system_state
        .call_context_manager
        .call_contexts
        .insert(
            openic_replicated_state::CallContextId(0),
            openic_replicated_state::CallContext {
                origin: CallOrigin::SystemTask,
                responded: false,
                available_cycles: Cycles::ZERO,
                instructions_executed: 0,
                method_name: "wait".into(),
            },
        );
    canister
        .system_state
        .call_context_manager
        .next_call_context_id = 1;
    let mut state = new_state(vec![canister]);
    let mut stop = ingress(1, CanisterId::management(), "stop_canister");
    stop.effective_canister_id = a;
    stop.arg = candid::encode_one(ic_management_canister_types::CanisterIdRecord {
        canister_id: a.get(),
    })
    .unwrap();
    let mut scheduler = scheduler(&embedder);
    scheduler.execute_block(&mut state, &block(1, vec![stop]));
    assert_eq!(status(&state, 1), IngressState::Processing);
    let timeout = ExecutionConfig::default().stop_canister_timeout_nanos / Time::NANOS_PER_SECOND;
    // Still waiting just before the deadline (block h has time h seconds; stopped at 1 s).
    scheduler.execute_block(&mut state, &block(timeout, vec![]));
    assert_eq!(status(&state, 1), IngressState::Processing);
    scheduler.execute_block(&mut state, &block(timeout + 1, vec![]));
    let (code, _, message) = rejected(&status(&state, 1));
    assert_eq!(code, RejectCode::SysTransient);
    assert!(message.contains("timed out"), "{message}");
    assert!(message.contains("open call context"), "{message}");
    assert_eq!(
        state.canister(&a).unwrap().system_state.status,
        CanisterStatus::Stopping {
            stop_contexts: vec![],
            stop_deadlines: vec![],
        },
        "the canister stays stopping"
    );
}

#[test]
fn bounded_wait_call_times_out_with_sys_unknown_and_the_late_response_is_dropped() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update relay", move |_| {
        let mut call = a_call(b, "slow", Cycles(1_000));
        call.timeout_seconds = Some(1);
        Ok((None, calls(vec![call]), 1))
    });
    embedder.on(b, "canister_update slow", |_| reply(b"late"));
    embedder.on(a, "closure 2", |input| {
        let ApiType::RejectCallback {
            code,
            message,
            refunded,
            ..
        } = &input.api_type
        else {
            panic!("reject callback expected");
        };
        assert_eq!(*code, RejectCode::SysUnknown);
        assert_eq!(message, "Call deadline has expired.");
        assert_eq!(*refunded, Cycles::ZERO);
        Ok((
            Some(WasmResponse::Reply(b"timed out".to_vec())),
            SystemStateChanges::default(),
            10,
        ))
    });
    // One message per block, so B's request is still queued when the deadline passes.
    let config = ExecutionConfig {
        max_messages_per_round: 1,
        ..ExecutionConfig::default()
    };
    let mut scheduler = Scheduler::new(embedder.clone(), config, subnet());
    let mut state = new_state(vec![
        installed_canister(a, &[("relay", MethodKind::Update)], &[]),
        installed_canister(b, &[("slow", MethodKind::Update)], &[]),
    ]);
    // Block 1 at t = 1 s: A calls B with a 1 s deadline (t = 2 s).
    scheduler.execute_block(&mut state, &block(1, vec![ingress(1, a, "relay")]));
    assert_eq!(embedder.count(b, "canister_update slow"), 0);
    // Block 2 at t = 2 s: the deadline has passed; A's reject callback runs first. (Block 1's
    // budget cut off B's turn, so round-robin would start block 2 with B: start from A instead,
    // to see the expiry answered before the late reply exists.)
    assert_eq!(state.round_robin_cursor, Some(b));
    state.round_robin_cursor = None;
    scheduler.execute_block(&mut state, &block(2, vec![]));
    assert_eq!(embedder.count(a, "closure 2"), 1);
    assert_eq!(
        status(&state, 1),
        IngressState::Replied(b"timed out".to_vec())
    );
    // Later blocks: B answers; the response finds no callback and is dropped, but the cycles B
    // did not accept come back to A.
    let balance_before = state.canister(&a).unwrap().system_state.cycles_balance;
    for height in 3..6 {
        scheduler.execute_block(&mut state, &block(height, vec![]));
    }
    assert_eq!(embedder.count(b, "canister_update slow"), 1);
    assert_eq!(
        embedder.count(a, "closure 1"),
        0,
        "the late reply runs nothing"
    );
    assert_eq!(embedder.count(a, "closure 2"), 1, "expired exactly once");
    let a_state = state.canister(&a).unwrap();
    assert!(
        a_state
            .system_state
            .call_context_manager
            .callbacks
            .is_empty()
    );
    assert!(
        a_state
            .system_state
            .call_context_manager
            .call_contexts
            .is_empty()
    );
    assert_eq!(
        a_state.system_state.cycles_balance,
        balance_before.saturating_add(Cycles(1_000)),
        "the late response's refund is credited"
    );
}

#[test]
fn a_response_queued_before_the_deadline_is_delivered_not_expired() {
    let a = canister_id(1);
    let b = canister_id(2);
    let embedder = Arc::new(FakeEmbedder::default());
    embedder.on(a, "canister_update relay", move |_| {
        let mut call = a_call(b, "fast", Cycles::ZERO);
        call.timeout_seconds = Some(1);
        Ok((None, calls(vec![call]), 1))
    });
    embedder.on(b, "canister_update fast", |_| reply(b"in time"));
    embedder.on(a, "closure 1", |input| {
        let ApiType::ReplyCallback { reply, .. } = &input.api_type else {
            panic!("reply callback expected");
        };
        Ok((
            Some(WasmResponse::Reply(reply.clone())),
            SystemStateChanges::default(),
            1,
        ))
    });
    let config = ExecutionConfig {
        max_messages_per_round: 2,
        ..ExecutionConfig::default()
    };
    let mut scheduler = Scheduler::new(embedder.clone(), config, subnet());
    let mut state = new_state(vec![
        installed_canister(a, &[("relay", MethodKind::Update)], &[]),
        installed_canister(b, &[("fast", MethodKind::Update)], &[]),
    ]);
    // Block 1: A calls B and B answers; the response waits in A's queue (round limit).
    scheduler.execute_block(&mut state, &block(1, vec![ingress(1, a, "relay")]));
    assert_eq!(embedder.count(b, "canister_update fast"), 1);
    // Block 5 is past the deadline, but the response was already queued.
    scheduler.execute_block(&mut state, &block(5, vec![]));
    assert_eq!(
        status(&state, 1),
        IngressState::Replied(b"in time".to_vec())
    );
    assert_eq!(embedder.count(a, "closure 2"), 0);
}
