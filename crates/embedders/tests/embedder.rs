//! End-to-end tests of the embedder on small WAT canisters, each in a wasm32 and a memory64
//! variant.

#![allow(
    clippy::disallowed_methods,
    reason = "tests drive the embedder from several threads and measure elapsed time; what they test stays deterministic"
)]

use candid::Principal;
use openic_embedders::{
    ApiType, Embedder, EmbedderConfig, EntryPoint, ExecutionError, InvalidWasm, MemoryBudget,
    SystemStateView, WasmExecutionInput, WasmExecutionOutput, WasmResponse, WasmtimeEmbedder,
};
use openic_replicated_state::{ExecutionState, GlobalValue, WasmClosure};
use openic_types::{CanisterId, Cycles, SubnetId, Time};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// The test canister. `ADDR` is the address type, `MEMORY` the memory declaration.
const CANISTER: &str = r#"
(module
  (import "ic0" "msg_reply_data_append" (func $append (param ADDR ADDR)))
  (import "ic0" "msg_reply" (func $reply))
  (import "ic0" "msg_reject" (func $reject (param ADDR ADDR)))
  (import "ic0" "trap" (func $trap (param ADDR ADDR)))
  (import "ic0" "debug_print" (func $print (param ADDR ADDR)))
  (import "ic0" "msg_arg_data_size" (func $arg_size (result ADDR)))
  (import "ic0" "msg_arg_data_copy" (func $arg_copy (param ADDR ADDR ADDR)))
  (import "ic0" "stable64_grow" (func $stable_grow (param i64) (result i64)))
  (import "ic0" "stable64_size" (func $stable_size (result i64)))
  (import "ic0" "stable64_write" (func $stable_write (param i64 i64 i64)))
  (import "ic0" "stable64_read" (func $stable_read (param i64 i64 i64)))
  (import "ic0" "call_new" (func $call_new (param ADDR ADDR ADDR ADDR ADDR ADDR ADDR ADDR)))
  (import "ic0" "call_data_append" (func $call_append (param ADDR ADDR)))
  (import "ic0" "call_cycles_add128" (func $call_cycles (param i64 i64)))
  (import "ic0" "call_on_cleanup" (func $call_cleanup (param ADDR ADDR)))
  (import "ic0" "call_with_best_effort_response" (func $call_timeout (param i32)))
  (import "ic0" "call_perform" (func $call_perform (result i32)))
  (import "ic0" "msg_cycles_available128" (func $available (param ADDR)))
  (import "ic0" "msg_cycles_accept128" (func $accept (param i64 i64 ADDR)))
  (import "ic0" "canister_cycle_balance128" (func $balance (param ADDR)))
  (import "ic0" "performance_counter" (func $counter (param i32) (result i64)))
  MEMORY
  (table 2 funcref)
  (elem (i32.const 0) $callback)
  (global $counter (mut i32) (i32.const 0))
  (global $float (mut f64) (f64.const 1.5))
  ;; 0..4: scratch for the counter; 100: "hello"; 120: callee id; 140: method name; 200: start count.
  (data (ADDR.const 100) "hello")
  (data (ADDR.const 120) "\00\00\00\00\00\00\00\05\01\01")
  (data (ADDR.const 140) "greet")

  (func $callback (param ADDR)
    (ADDR.store (ADDR.const 64) (local.get 0)))

  (func $start
    (i32.store (ADDR.const 200) (i32.add (i32.load (ADDR.const 200)) (i32.const 1))))
  (start $start)

  (func (export "canister_update inc")
    (global.set $counter (i32.add (global.get $counter) (i32.const 1)))
    (i32.store (ADDR.const 0) (global.get $counter))
    (call $append (ADDR.const 0) (ADDR.const 4))
    (call $reply))

  (func (export "canister_update inc_then_trap")
    (global.set $counter (i32.add (global.get $counter) (i32.const 100)))
    (i32.store (ADDR.const 0) (i32.const 999))
    (call $print (ADDR.const 140) (ADDR.const 5))
    (call $trap (ADDR.const 100) (ADDR.const 5)))

  (func (export "canister_query read")
    (call $append (ADDR.const 0) (ADDR.const 4))
    (call $append (ADDR.const 100) (ADDR.const 5))
    (call $append (ADDR.const 200) (ADDR.const 4))
    (call $reply))

  (func (export "canister_update echo")
    (call $arg_copy (ADDR.const 300) (ADDR.const 0) (call $arg_size))
    (call $append (ADDR.const 300) (call $arg_size))
    (call $reply))

  (func (export "canister_update reject")
    (call $reject (ADDR.const 100) (ADDR.const 5)))

  (func (export "canister_update reply_twice")
    (call $reply)
    (call $reply))

  (func (export "canister_update spin")
    (loop $forever (br $forever)))

  (func (export "canister_heartbeat")
    (call $reply))

  (func (export "canister_update nan")
    (f32.store (ADDR.const 8) (f32.div (f32.const 0) (f32.const 0)))
    (call $append (ADDR.const 8) (ADDR.const 4))
    (call $reply))

  (func (export "canister_update stable")
    ;; Grow by one page (previous size to 400), write "hello" at 65530 (crossing a 4 KiB page).
    (i64.store (ADDR.const 400) (call $stable_grow (i64.const 1)))
    (call $stable_write (i64.const 65530) (i64.const 100) (i64.const 5))
    (call $reply))

  (func (export "canister_query stable_read")
    (call $stable_read (i64.const 408) (i64.const 65530) (i64.const 5))
    (i64.store (ADDR.const 416) (call $stable_size))
    (i64.store (ADDR.const 424) (call $stable_grow (i64.const 1000000)))
    (call $append (ADDR.const 408) (ADDR.const 24))
    (call $reply))

  (func (export "canister_update stable_out_of_bounds")
    (call $stable_write (i64.const 65535) (i64.const 100) (i64.const 5)))

  (func (export "canister_update call")
    (call $call_new (ADDR.const 120) (ADDR.const 10) (ADDR.const 140) (ADDR.const 5)
                    (ADDR.const 0) (ADDR.const 7) (ADDR.const 1) (ADDR.const 8))
    (call $call_append (ADDR.const 100) (ADDR.const 5))
    (call $call_cycles (i64.const 0) (i64.const 50))
    (call $call_cleanup (ADDR.const 0) (ADDR.const 9))
    (call $call_timeout (i32.const 1000))
    (i32.store (ADDR.const 0) (call $call_perform))
    ;; A second call with cycles that is never performed: discarded, its cycles return.
    (call $call_new (ADDR.const 120) (ADDR.const 10) (ADDR.const 140) (ADDR.const 5)
                    (ADDR.const 0) (ADDR.const 0) (ADDR.const 0) (ADDR.const 0))
    (call $call_cycles (i64.const 0) (i64.const 10))
    (call $append (ADDR.const 0) (ADDR.const 4))
    (call $reply))

  (func (export "canister_update cycles")
    (call $available (ADDR.const 500))
    (call $accept (i64.const 1) (i64.const 5) (ADDR.const 516))
    (call $balance (ADDR.const 532))
    (call $append (ADDR.const 500) (ADDR.const 48))
    (call $reply))

  (func (export "canister_update grow")
    (ADDR.store (ADDR.const 700) (memory.grow (ADDR.const 100)))
    (call $append (ADDR.const 700) (ADDR.const 4))
    (call $reply))

  (func $recurse (call $recurse))
  (func (export "canister_update recurse") (call $recurse))

  (func (export "canister_query bump")
    (global.set $counter (i32.add (global.get $counter) (i32.const 1)))
    (i32.store (ADDR.const 0) (global.get $counter))
    (drop (call $stable_grow (i64.const 1)))
    (call $accept (i64.const 0) (i64.const 5) (ADDR.const 516))
    (call $append (ADDR.const 0) (ADDR.const 4))
    (call $reply))

  (func (export "canister_update counter")
    (i64.store (ADDR.const 600) (call $counter (i32.const 0)))
    (call $append (ADDR.const 600) (ADDR.const 8))
    (call $reply))
)
"#;

fn canister_wat(wasm64: bool) -> String {
    let (addr, memory) = if wasm64 {
        ("i64", "(memory (export \"memory\") i64 1)")
    } else {
        ("i32", "(memory (export \"memory\") 1)")
    };
    CANISTER.replace("ADDR", addr).replace("MEMORY", memory)
}

fn embedder() -> WasmtimeEmbedder {
    WasmtimeEmbedder::new(EmbedderConfig::default()).expect("embedder")
}

fn install(embedder: &WasmtimeEmbedder, wasm: &[u8]) -> ExecutionState {
    let (binary, info) = embedder.prepare_module(wasm).expect("valid module");
    embedder
        .initial_execution_state(Arc::new(binary), Arc::new(info))
        .expect("initial state")
}

fn view() -> SystemStateView {
    SystemStateView {
        canister_id: CanisterId::from_u64(1),
        controllers: BTreeSet::new(),
        status_code: 1,
        cycles_balance: Cycles(1_000),
        freeze_threshold_cycles: Cycles(100),
        canister_version: 1,
        time: Time(1_700_000_000_000_000_000),
        subnet_id: SubnetId(Principal::management_canister()),
        subnet_node_count: 1,
        root_key_der: vec![0; 133],
        global_timer_nanos: 0,
        environment_variables: BTreeMap::new(),
        can_make_calls: true,
        // Small fees: `call_perform` requires the attached cycles plus the fee to be liquid.
        call_base_fee: Cycles(10),
        call_fee_per_byte: Cycles(1),
        create_canister_fee: Cycles(500_000_000_000),
        call_context_instructions: 0,
        remaining_callbacks: 1_000,
    }
}

fn update_with(arg: &[u8], cycles: u128) -> ApiType {
    ApiType::Update {
        caller: Principal::anonymous(),
        arg: arg.to_vec(),
        cycles_available: Cycles(cycles),
        deadline: 0,
    }
}

fn update() -> ApiType {
    update_with(&[], 0)
}

const LIMIT: u64 = 10_000_000;

fn run_with(
    embedder: &WasmtimeEmbedder,
    state: &ExecutionState,
    api_type: ApiType,
    entry_point: EntryPoint,
) -> WasmExecutionOutput {
    embedder.execute(WasmExecutionInput {
        api_type,
        entry_point,
        execution_state: state,
        system_state: view(),
        instruction_limit: LIMIT,
        wasm_memory_limit_bytes: 1 << 30,
        wasm_memory_limit_traps: false,
        stable_memory_limit_bytes: 1 << 30,
        memory_budget: None,
    })
}

fn run(
    embedder: &WasmtimeEmbedder,
    state: &ExecutionState,
    api_type: ApiType,
    method: &str,
) -> WasmExecutionOutput {
    run_with(
        embedder,
        state,
        api_type,
        EntryPoint::Export(export_name(method)),
    )
}

/// The export name of a test method: queries and system hooks as named, the rest are updates.
fn export_name(method: &str) -> String {
    match method {
        "read" | "stable_read" | "bump" | "peek" => format!("canister_query {method}"),
        m if m.starts_with("canister_") => m.to_string(),
        m => format!("canister_update {m}"),
    }
}

/// Runs an update, applies its new state and returns the response.
fn call(embedder: &WasmtimeEmbedder, state: &mut ExecutionState, method: &str) -> WasmResponse {
    let output = run(embedder, state, update(), method);
    let (new, response, _) = output.result.expect("execution succeeds");
    state.wasm_memory = new.wasm_memory;
    state.wasm_memory_size_pages = new.wasm_memory_size_pages;
    state.stable_memory = new.stable_memory;
    state.stable_memory_size_pages = new.stable_memory_size_pages;
    state.globals = new.globals;
    response.expect("a response")
}

fn both(test: impl Fn(bool)) {
    test(false);
    test(true);
}

#[test]
fn reply_reject_and_globals_persist() {
    both(|wasm64| {
        let e = embedder();
        let mut state = install(&e, &wat::parse_str(canister_wat(wasm64)).unwrap());
        assert_eq!(state.module_info.is_wasm64, wasm64);
        assert_eq!(
            state.globals,
            vec![GlobalValue::I32(0), GlobalValue::F64(1.5f64.to_bits())]
        );
        assert_eq!(
            call(&e, &mut state, "inc"),
            WasmResponse::Reply(vec![1, 0, 0, 0])
        );
        assert_eq!(
            call(&e, &mut state, "inc"),
            WasmResponse::Reply(vec![2, 0, 0, 0])
        );
        assert_eq!(state.globals[0], GlobalValue::I32(2));
        assert_eq!(
            call(&e, &mut state, "reject"),
            WasmResponse::Reject("hello".to_string())
        );
        let output = run(&e, &state, update_with(b"abc", 0), "echo");
        assert_eq!(
            output.result.unwrap().1,
            Some(WasmResponse::Reply(b"abc".to_vec()))
        );
        assert!(output.instructions_used > 0);
    });
}

#[test]
fn trap_rolls_back_memory_and_globals() {
    both(|wasm64| {
        let e = embedder();
        let mut state = install(&e, &wat::parse_str(canister_wat(wasm64)).unwrap());
        call(&e, &mut state, "inc");
        let output = run(&e, &state, update(), "inc_then_trap");
        assert_eq!(
            output.result.unwrap_err(),
            ExecutionError::CalledTrap("hello".to_string())
        );
        assert_eq!(output.debug_prints[0], b"greet");
        assert_eq!(output.debug_prints[1], b"[TRAP]: hello");
        // The state was not touched: the next increment sees 1.
        assert_eq!(
            call(&e, &mut state, "inc"),
            WasmResponse::Reply(vec![2, 0, 0, 0])
        );
        let output = run(&e, &state, update(), "reply_twice");
        assert!(
            matches!(output.result, Err(ExecutionError::ContractViolation(ref m)) if m.contains("already")),
            "{:?}",
            output.result
        );
        let output = run(&e, &state, update(), "no_such_method");
        assert_eq!(
            output.result.unwrap_err(),
            ExecutionError::MethodNotFound("update method 'no_such_method'.".to_string())
        );
    });
}

#[test]
fn start_runs_only_via_start_only() {
    both(|wasm64| {
        let e = embedder();
        let mut state = install(&e, &wat::parse_str(canister_wat(wasm64)).unwrap());
        // Data segments applied, start not yet run.
        let read = |state: &ExecutionState| match run(&e, state, update(), "read").result {
            Ok((_, Some(WasmResponse::Reply(bytes)), _)) => bytes,
            other => panic!("{other:?}"),
        };
        assert_eq!(read(&state)[4..], *b"hello\0\0\0\0");
        let output = run_with(&e, &state, ApiType::Start, EntryPoint::StartOnly);
        let (new, response, _) = output.result.unwrap();
        assert!(response.is_none());
        state.wasm_memory = new.wasm_memory;
        assert_eq!(read(&state)[9..], [1, 0, 0, 0]);
        call(&e, &mut state, "inc");
        call(&e, &mut state, "inc");
        assert_eq!(read(&state)[9..], [1, 0, 0, 0], "start ran only once");
    });
}

#[test]
fn instruction_limit_is_enforced() {
    both(|wasm64| {
        let e = embedder();
        let state = install(&e, &wat::parse_str(canister_wat(wasm64)).unwrap());
        let output = run(&e, &state, update(), "spin");
        assert_eq!(
            output.result.unwrap_err(),
            ExecutionError::InstructionLimitExceeded { limit: LIMIT }
        );
        assert_eq!(output.instructions_used, LIMIT);
        let output = run(&e, &state, update(), "counter");
        let Some(WasmResponse::Reply(bytes)) = output.result.unwrap().1 else {
            panic!("no reply")
        };
        let counted = u64::from_le_bytes(bytes.try_into().unwrap());
        assert!(counted > 0 && counted < output.instructions_used);
    });
}

#[test]
fn heap_limit_and_stack_overflow_are_deterministic() {
    both(|wasm64| {
        let e = embedder();
        let state = install(&e, &wat::parse_str(canister_wat(wasm64)).unwrap());
        let grow = |limit: u64| {
            let output = e.execute(WasmExecutionInput {
                api_type: update(),
                entry_point: EntryPoint::Export(export_name("grow")),
                execution_state: &state,
                system_state: view(),
                instruction_limit: LIMIT,
                wasm_memory_limit_bytes: limit,
                wasm_memory_limit_traps: false,
                stable_memory_limit_bytes: 0,
                memory_budget: None,
            });
            let (new, response, _) = output.result.unwrap();
            let Some(WasmResponse::Reply(bytes)) = response else {
                panic!("no reply")
            };
            (
                i32::from_le_bytes(bytes.try_into().unwrap()),
                new.wasm_memory_size_pages,
            )
        };
        assert_eq!(grow(1 << 20), (-1, 1), "101 pages exceed 1 MiB");
        assert_eq!(grow(1 << 30), (1, 101));
        let output = run(&e, &state, update(), "recurse");
        assert!(
            matches!(output.result, Err(ExecutionError::Trapped(_))),
            "{:?}",
            output.result
        );
    });
}

#[test]
fn context_rules_are_enforced() {
    both(|wasm64| {
        let e = embedder();
        let state = install(&e, &wat::parse_str(canister_wat(wasm64)).unwrap());
        let output = run(&e, &state, ApiType::SystemTask, "canister_heartbeat");
        match output.result {
            Err(ExecutionError::WrongContext(message)) => {
                // The IC's wording: the import's name with an underscore, the mode by name.
                assert_eq!(
                    message,
                    "\"ic0_msg_reply\" cannot be executed in system task mode"
                );
            }
            other => panic!("{other:?}"),
        }
        // Reading the argument is not allowed in a reject callback.
        let reject = ApiType::RejectCallback {
            caller: Principal::anonymous(),
            code: openic_types::RejectCode::CanisterReject,
            message: "no".to_string(),
            refunded: Cycles(0),
            cycles_available: Cycles(0),
            deadline: 0,
            in_composite_query: false,
        };
        assert!(matches!(
            run(&e, &state, reject, "echo").result,
            Err(ExecutionError::WrongContext(_))
        ));
    });
}

#[test]
fn stable_memory_grows_persists_and_checks_bounds() {
    both(|wasm64| {
        let e = embedder();
        let mut state = install(&e, &wat::parse_str(canister_wat(wasm64)).unwrap());
        call(&e, &mut state, "stable");
        assert_eq!(state.stable_memory_size_pages, 1);
        let output = run(&e, &state, update(), "stable_read");
        let Some(WasmResponse::Reply(bytes)) = output.result.unwrap().1 else {
            panic!("no reply")
        };
        assert_eq!(&bytes[..5], b"hello");
        assert_eq!(u64::from_le_bytes(bytes[8..16].try_into().unwrap()), 1);
        assert_eq!(i64::from_le_bytes(bytes[16..24].try_into().unwrap()), -1);
        let output = run(&e, &state, update(), "stable_out_of_bounds");
        // The IC's trap for it, which canisters match on.
        assert_eq!(
            output.result.unwrap_err(),
            ExecutionError::Trapped("stable memory out of bounds".to_string())
        );
    });
}

#[test]
fn calls_are_collected_with_closures() {
    both(|wasm64| {
        let e = embedder();
        let mut state = install(&e, &wat::parse_str(canister_wat(wasm64)).unwrap());
        let output = run(&e, &state, update(), "call");
        let (new, response, changes) = output.result.unwrap();
        assert_eq!(response, Some(WasmResponse::Reply(vec![0, 0, 0, 0])));
        assert_eq!(changes.calls.len(), 1, "the unperformed call is discarded");
        let outgoing = &changes.calls[0];
        assert_eq!(outgoing.callee, CanisterId::from_u64(5));
        assert_eq!(outgoing.method_name, "greet");
        assert_eq!(outgoing.payload, b"hello");
        assert_eq!(outgoing.cycles, Cycles(50));
        assert_eq!(
            outgoing.on_reply,
            WasmClosure {
                func_idx: 0,
                env: 7
            }
        );
        assert_eq!(
            outgoing.on_reject,
            WasmClosure {
                func_idx: 1,
                env: 8
            }
        );
        assert_eq!(
            outgoing.on_cleanup,
            Some(WasmClosure {
                func_idx: 0,
                env: 9
            })
        );
        assert_eq!(outgoing.timeout_seconds, Some(300));
        state.wasm_memory = new.wasm_memory;

        // Run the reply callback: it stores its env at 64.
        let reply = ApiType::ReplyCallback {
            caller: Principal::anonymous(),
            reply: vec![],
            refunded: Cycles(0),
            cycles_available: Cycles(0),
            deadline: 0,
            in_composite_query: false,
        };
        let output = run_with(
            &e,
            &state,
            reply.clone(),
            EntryPoint::Closure(outgoing.on_reply),
        );
        let (new, _, _) = output.result.unwrap();
        let mut env = [0u8; 4];
        new.wasm_memory.read(64, &mut env);
        assert_eq!(env, [7, 0, 0, 0]);
        // An empty or out-of-range table entry traps only when called.
        for func_idx in [1, u32::MAX as u64] {
            let output = run_with(
                &e,
                &state,
                reply.clone(),
                EntryPoint::Closure(WasmClosure { func_idx, env: 0 }),
            );
            assert!(matches!(output.result, Err(ExecutionError::Trapped(_))));
        }
    });
}

#[test]
fn cycles_use_128_bit_encoding() {
    both(|wasm64| {
        let e = embedder();
        let state = install(&e, &wat::parse_str(canister_wat(wasm64)).unwrap());
        let available = (1u128 << 64) + 10;
        let output = run(&e, &state, update_with(&[], available), "cycles");
        let (_, response, changes) = output.result.unwrap();
        let Some(WasmResponse::Reply(bytes)) = response else {
            panic!("no reply")
        };
        let at = |i: usize| u128::from_le_bytes(bytes[i..i + 16].try_into().unwrap());
        assert_eq!(at(0), available);
        assert_eq!(at(16), (1u128 << 64) + 5);
        assert_eq!(at(32), 1_000 + (1u128 << 64) + 5);
        assert_eq!(changes.cycles_accepted, Cycles((1u128 << 64) + 5));
    });
}

#[test]
fn gzip_modules_are_accepted() {
    use std::io::Write;
    let e = embedder();
    let plain = wat::parse_str(canister_wat(false)).unwrap();
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(&plain).unwrap();
    let gz = encoder.finish().unwrap();
    let mut state = install(&e, &gz);
    assert_eq!(state.wasm_binary.bytes, gz);
    assert_eq!(
        call(&e, &mut state, "inc"),
        WasmResponse::Reply(vec![1, 0, 0, 0])
    );
    assert!(state.module_info.methods.contains_key("inc"));
    assert!(
        state
            .module_info
            .system_methods
            .contains("canister_heartbeat")
    );
}

#[test]
fn invalid_modules_are_rejected() {
    let e = embedder();
    for text in [
        r#"(module (import "env" "x" (func)))"#,
        r#"(module (func $f) (export "canister_updatex" (func $f)))"#,
        r#"(module (memory 1) (memory 1))"#,
    ] {
        let err = e
            .prepare_module(&wat::parse_str(text).unwrap())
            .unwrap_err();
        assert!(matches!(err, InvalidWasm::Validation(_)), "{text}: {err}");
    }
    assert!(matches!(
        e.prepare_module(b"\x1f\x8b\x08garbage"),
        Err(InvalidWasm::Decode(_))
    ));
}

#[test]
fn execution_is_deterministic_and_nans_are_canonical() {
    both(|wasm64| {
        let e = embedder();
        let state = install(&e, &wat::parse_str(canister_wat(wasm64)).unwrap());
        let first = run(&e, &state, update(), "nan");
        let second = run(&e, &state, update(), "nan");
        assert_eq!(first.instructions_used, second.instructions_used);
        assert_eq!(first.result, second.result);
        let Some(WasmResponse::Reply(bytes)) = first.result.unwrap().1 else {
            panic!("no reply")
        };
        assert_eq!(u32::from_le_bytes(bytes.try_into().unwrap()), 0x7fc0_0000);
    });
}

#[test]
fn shared_between_threads() {
    let e = Arc::new(embedder());
    let wasm = wat::parse_str(canister_wat(false)).unwrap();
    let state = Arc::new(install(&e, &wasm));
    let handles: Vec<_> = (0..2)
        .map(|_| {
            let (e, state) = (e.clone(), state.clone());
            std::thread::spawn(move || {
                let query = ApiType::Query {
                    caller: Principal::anonymous(),
                    arg: vec![],
                    replicated: false,
                    data_certificate: None,
                    cycles_available: Cycles(0),
                };
                for _ in 0..20 {
                    assert!(run(&e, &state, query.clone(), "read").result.is_ok());
                }
            })
        })
        .collect();
    for handle in handles {
        handle.join().unwrap();
    }
}

/// Rough throughput check: `cargo test -p openic-embedders --release -- --ignored throughput
/// --nocapture`.
#[test]
#[ignore]
fn throughput() {
    let e = embedder();
    let mut state = install(&e, &wat::parse_str(canister_wat(false)).unwrap());
    let start = std::time::Instant::now();
    for _ in 0..500 {
        assert!(run(&e, &state, update(), "inc").result.is_ok());
    }
    println!(
        "small heap update: {:?} per execution",
        start.elapsed() / 500
    );
    // A heap of 2 MiB with every page written, like a small Rust canister.
    state.wasm_memory_size_pages = 32;
    for page in 0..512u64 {
        state.wasm_memory.write(page * 4096 + 1000, &[1]);
    }
    let query = ApiType::Query {
        caller: Principal::anonymous(),
        arg: vec![],
        replicated: false,
        data_certificate: None,
        cycles_available: Cycles(0),
    };
    for (name, api_type, method) in [("update", update(), "inc"), ("query", query, "read")] {
        let start = std::time::Instant::now();
        let n = 500;
        for _ in 0..n {
            assert!(run(&e, &state, api_type.clone(), method).result.is_ok());
        }
        let per = start.elapsed() / n;
        println!("{name}: {per:?} per execution");
    }
}

/// Installs real modules and runs `(start)`, `canister_init` and every query with an empty Candid
/// argument: `OPENIC_EMBEDDER_WASMS=a.wasm:b.wasm cargo test -p openic-embedders -- --ignored
/// real_modules --nocapture`.
#[test]
#[ignore]
fn real_modules() {
    let Ok(paths) = std::env::var("OPENIC_EMBEDDER_WASMS") else {
        return;
    };
    let e = embedder();
    for path in paths.split(':') {
        let wasm = std::fs::read(path).unwrap();
        let mut state = install(&e, &wasm);
        println!(
            "{path}: wasm64={} methods={:?} system={:?} pages={}",
            state.module_info.is_wasm64,
            state.module_info.methods,
            state.module_info.system_methods,
            state.wasm_memory_size_pages
        );
        let apply = |state: &mut ExecutionState, output: WasmExecutionOutput| {
            println!(
                "  {} instructions, prints {:?}",
                output.instructions_used, output.debug_prints
            );
            let (new, response, changes) = output.result.expect("success");
            println!("  response {response:?} calls {}", changes.calls.len());
            state.wasm_memory = new.wasm_memory;
            state.wasm_memory_size_pages = new.wasm_memory_size_pages;
            state.stable_memory = new.stable_memory;
            state.stable_memory_size_pages = new.stable_memory_size_pages;
            state.globals = new.globals;
        };
        let output = run_with(&e, &state, ApiType::Start, EntryPoint::StartOnly);
        apply(&mut state, output);
        if state.module_info.system_methods.contains("canister_init") {
            let init = ApiType::Init {
                caller: Principal::anonymous(),
                arg: b"DIDL\0\0".to_vec(),
            };
            let output = run(&e, &state, init, "canister_init");
            apply(&mut state, output);
        }
        for _ in 0..2 {
            if state.module_info.methods.contains_key("inc") {
                let output = run(&e, &state, update_with(b"DIDL\0\0", 0), "inc");
                apply(&mut state, output);
            }
        }
        if state.module_info.methods.contains_key("inc") {
            let start = std::time::Instant::now();
            for _ in 0..200 {
                let output = run(&e, &state, update_with(b"DIDL\0\0", 0), "inc");
                assert!(output.result.is_ok());
            }
            println!("  inc: {:?} per execution", start.elapsed() / 200);
        }
        let methods: Vec<_> = state.module_info.methods.clone().into_iter().collect();
        for (method, kind) in methods {
            if kind != openic_replicated_state::MethodKind::Query {
                continue;
            }
            let query = ApiType::Query {
                caller: Principal::anonymous(),
                arg: b"DIDL\0\0".to_vec(),
                replicated: false,
                data_certificate: None,
                cycles_available: Cycles(0),
            };
            let output = run_with(
                &e,
                &state,
                query,
                EntryPoint::Export(format!("canister_query {method}")),
            );
            println!("  query {method}: {:?}", output.result.map(|r| r.1));
        }
    }
}

#[test]
fn replicated_query_discards_state_but_keeps_cycles_and_reply() {
    both(|wasm64| {
        let e = embedder();
        let state = install(&e, &wat::parse_str(canister_wat(wasm64)).unwrap());
        let query = ApiType::Query {
            caller: Principal::anonymous(),
            arg: vec![],
            replicated: true,
            data_certificate: None,
            cycles_available: Cycles(20),
        };
        let (new, response, changes) = run(&e, &state, query, "bump").result.unwrap();
        assert_eq!(response, Some(WasmResponse::Reply(vec![1, 0, 0, 0])));
        assert_eq!(
            changes.cycles_accepted,
            Cycles(5),
            "accepted cycles still apply"
        );
        assert_eq!(
            new.wasm_memory, state.wasm_memory,
            "heap changes are discarded"
        );
        assert_eq!(new.globals, state.globals, "global changes are discarded");
        assert_eq!(new.stable_memory_size_pages, state.stable_memory_size_pages);
        // The same method run as an update-context export would keep its changes; as a query it
        // starts from the same state every time.
        let query = ApiType::Query {
            caller: Principal::anonymous(),
            arg: vec![],
            replicated: true,
            data_certificate: None,
            cycles_available: Cycles(0),
        };
        let (_, response, _) = run(&e, &state, query, "bump").result.unwrap();
        assert_eq!(response, Some(WasmResponse::Reply(vec![1, 0, 0, 0])));
    });
}

#[test]
fn changed_heap_pages_are_charged_not_the_heap_size() {
    both(|wasm64| {
        let e = embedder();
        let mut state = install(&e, &wat::parse_str(canister_wat(wasm64)).unwrap());
        let quiet = run(&e, &state, update(), "inc").instructions_used;
        // A heap of 16 stored pages costs no more to run than an empty one…
        for index in 1..16u64 {
            state.wasm_memory.write(index * 4096 + 4000, &[1]);
        }
        assert_eq!(run(&e, &state, update(), "inc").instructions_used, quiet);
        // …and a message pays for the pages it changes: `inc` changes one.
        let cost = openic_embedders::HEAP_PAGE_WRITE_INSTRUCTIONS;
        let output = e.execute(WasmExecutionInput {
            api_type: update(),
            entry_point: EntryPoint::Export(export_name("inc")),
            execution_state: &state,
            system_state: view(),
            instruction_limit: quiet - 1,
            wasm_memory_limit_bytes: 1 << 30,
            wasm_memory_limit_traps: false,
            stable_memory_limit_bytes: 1 << 30,
            memory_budget: None,
        });
        assert!(
            matches!(
                output.result,
                Err(ExecutionError::InstructionLimitExceeded { .. })
            ),
            "{quiet} instructions include {cost} for the page written"
        );
        assert!(quiet >= cost);
    });
}

#[test]
fn trap_message_goes_through_the_debug_print_budget() {
    let config = EmbedderConfig {
        max_debug_print_bytes_per_execution: 10,
        ..EmbedderConfig::default()
    };
    let e = WasmtimeEmbedder::new(config).expect("embedder");
    let state = install(&e, &wat::parse_str(canister_wat(false)).unwrap());
    let output = run(&e, &state, update(), "inc_then_trap");
    assert!(matches!(output.result, Err(ExecutionError::CalledTrap(_))));
    let total: usize = output.debug_prints.iter().map(Vec::len).sum();
    assert!(total <= 10, "{:?}", output.debug_prints);
    // The trap line is cut to what is left of the budget after "greet".
    assert_eq!(
        output.debug_prints,
        vec![b"greet".to_vec(), b"[TRAP".to_vec()]
    );
}

/// Recycled memories (Note [recycled linear memories]) must never show an execution the bytes of
/// an earlier one: not in the restored heap, not in pages that `memory.grow` adds.
#[test]
fn recycled_memories_never_leak_bytes_between_executions() {
    both(|wasm64| {
        let (addr, memory) = if wasm64 {
            ("i64", "(memory i64 1)")
        } else {
            ("i32", "(memory 1)")
        };
        let wat = r#"
(module
  (import "ic0" "msg_reply_data_append" (func $append (param ADDR ADDR)))
  (import "ic0" "msg_reply" (func $reply))
  MEMORY
  ;; ORs every byte of the memory together; 0 means all zero.
  (func $or_all (result i32)
    (local $i ADDR) (local $acc i32)
    (block $done
      (loop $next
        (br_if $done (ADDR.ge_u (local.get $i) (ADDR.mul (memory.size) (ADDR.const 65536))))
        (local.set $acc (i32.or (local.get $acc) (i32.load8_u (local.get $i))))
        (local.set $i (ADDR.add (local.get $i) (ADDR.const 1)))
        (br $next)))
    (local.get $acc))
  (func $answer (param $value i32)
    (i32.store (ADDR.const 0) (local.get $value))
    (call $append (ADDR.const 0) (ADDR.const 4))
    (call $reply))
  ;; Grows to 4 pages and fills all of them; run as a query, so nothing persists.
  (func (export "canister_query scribble")
    (drop (memory.grow (ADDR.const 3)))
    (memory.fill (ADDR.const 0) (i32.const 0xab) (ADDR.mul (memory.size) (ADDR.const 65536)))
    (call $answer (i32.const 1)))
  (func (export "canister_query check")
    (call $answer (call $or_all)))
  (func (export "canister_query grow_and_check")
    (drop (memory.grow (ADDR.const 3)))
    (call $answer (call $or_all))))
"#
        .replace("ADDR", addr)
        .replace("MEMORY", memory);
        let e = embedder();
        let state = install(&e, &wat::parse_str(wat).unwrap());
        let query = || ApiType::Query {
            caller: Principal::anonymous(),
            arg: vec![],
            replicated: false,
            data_certificate: None,
            cycles_available: Cycles::ZERO,
        };
        let answer = |method: &str| {
            let output = run_with(
                &e,
                &state,
                query(),
                EntryPoint::Export(format!("canister_query {method}")),
            );
            match output.result.expect("execution succeeds").1 {
                Some(WasmResponse::Reply(bytes)) => bytes,
                other => panic!("unexpected response {other:?}"),
            }
        };
        for _ in 0..3 {
            assert_eq!(answer("scribble"), vec![1, 0, 0, 0]);
            assert_eq!(answer("check"), vec![0; 4], "the restored heap is all zero");
            assert_eq!(answer("scribble"), vec![1, 0, 0, 0]);
            assert_eq!(
                answer("grow_and_check"),
                vec![0; 4],
                "grown pages are all zero"
            );
        }
    });
}

/// A [`MemoryBudget`] that counts, for the tests of Note [memory budget].
#[derive(Debug)]
struct CountingBudget {
    capacity: u64,
    reserved: std::sync::Mutex<(u64, u64)>,
}

impl CountingBudget {
    fn new(capacity: u64) -> Arc<CountingBudget> {
        Arc::new(CountingBudget {
            capacity,
            reserved: std::sync::Mutex::new((0, 0)),
        })
    }

    /// (reserved now, most reserved at once).
    fn usage(&self) -> (u64, u64) {
        *self.reserved.lock().unwrap()
    }
}

impl MemoryBudget for CountingBudget {
    fn reserve(&self, bytes: u64) -> Result<(), String> {
        let mut reserved = self.reserved.lock().unwrap();
        if reserved.0 + bytes > self.capacity {
            return Err("the test budget is spent".to_string());
        }
        reserved.0 += bytes;
        reserved.1 = reserved.1.max(reserved.0);
        Ok(())
    }

    fn release(&self, bytes: u64) {
        self.reserved.lock().unwrap().0 -= bytes;
    }
}

#[test]
fn executions_under_a_memory_budget_reserve_what_they_touch_and_release_it() {
    both(|wasm64| {
        let e = embedder();
        let state = install(&e, &wat::parse_str(canister_wat(wasm64)).unwrap());
        let page = 65536;
        let grow = |budget: &Arc<CountingBudget>, state: &ExecutionState| {
            e.execute(WasmExecutionInput {
                api_type: update(),
                entry_point: EntryPoint::Export(export_name("grow")),
                execution_state: state,
                system_state: view(),
                instruction_limit: LIMIT,
                wasm_memory_limit_bytes: 1 << 30,
                wasm_memory_limit_traps: false,
                stable_memory_limit_bytes: 1 << 30,
                memory_budget: Some(budget.clone()),
            })
        };
        // The heap (1 page) and its growth by 100 pages.
        let roomy = CountingBudget::new(101 * page);
        grow(&roomy, &state).result.expect("fits the budget");
        assert_eq!(roomy.usage(), (0, 101 * page), "all of it, then released");
        // One page short: the growth is refused as the node's, not the canister's, failure.
        let tight = CountingBudget::new(100 * page);
        let output = grow(&tight, &state);
        assert_eq!(
            output.result.unwrap_err(),
            ExecutionError::NodeMemoryBusy("the test budget is spent".to_string())
        );
        assert_eq!(
            tight.usage(),
            (0, page),
            "the heap copied in, released after"
        );
        // A stable write reserves the pages it may dirty (5 bytes across a 4 KiB boundary).
        let budget = CountingBudget::new(1 << 30);
        let output = e.execute(WasmExecutionInput {
            api_type: update(),
            entry_point: EntryPoint::Export(export_name("stable")),
            execution_state: &state,
            system_state: view(),
            instruction_limit: LIMIT,
            wasm_memory_limit_bytes: 1 << 30,
            wasm_memory_limit_traps: false,
            stable_memory_limit_bytes: 1 << 30,
            memory_budget: Some(budget.clone()),
        });
        output.result.expect("stable write");
        assert_eq!(budget.usage(), (0, page + 2 * 4096));
    });
}

/// A canister with a heap large enough to run as a tracked heap (20 MiB). `poke` stores the byte
/// `value` at `addr` (argument: two little-endian u64), `fill` stores the byte `value` at the
/// start of every 4 KiB page, `grow` grows the heap by `value` wasm pages and stores 7 in its
/// last byte, `peek` (a query) replies with the byte at `addr`.
const TRACKED: &str = r#"
(module
  (import "ic0" "msg_arg_data_copy" (func $arg_copy (param ADDR ADDR ADDR)))
  (import "ic0" "msg_reply_data_append" (func $append (param ADDR ADDR)))
  (import "ic0" "msg_reply" (func $reply))
  (memory (export "memory") MEMORY)
  (global $sum (mut i64) (i64.const 0))
  (func $args (call $arg_copy (ADDR.const 16) (ADDR.const 0) (ADDR.const 16)))
  (func $addr (result ADDR) (ADDR.load (ADDR.const 16)))
  (func $value (result i64) (i64.load (ADDR.const 24)))
  (func (export "canister_update poke")
    (call $args)
    (i64.store8 (call $addr) (call $value))
    (global.set $sum (i64.add (global.get $sum) (call $value)))
    (call $reply))
  (func (export "canister_update fill") (local $at ADDR)
    (call $args)
    (local.set $at (ADDR.const 4096))
    (block $done (loop $next
      (br_if $done (ADDR.ge_u (local.get $at) (ADDR.mul (memory.size) (ADDR.const 65536))))
      (i64.store8 (local.get $at) (call $value))
      (local.set $at (ADDR.add (local.get $at) (ADDR.const 4096)))
      (br $next)))
    (call $reply))
  (func (export "canister_update grow")
    (call $args)
    (drop (memory.grow WRAP))
    (i64.store8 (ADDR.sub (ADDR.mul (memory.size) (ADDR.const 65536)) (ADDR.const 1)) (i64.const 7))
    (call $reply))
  (func (export "canister_query peek")
    (call $args)
    (call $append (call $addr) (ADDR.const 1))
    (call $reply)))
"#;

fn tracked_wat(wasm64: bool, wasm_pages: u64) -> String {
    let (addr, memory, wrap) = if wasm64 {
        ("i64", format!("i64 {wasm_pages}"), "(call $value)")
    } else {
        (
            "i32",
            format!("{wasm_pages}"),
            "(i32.wrap_i64 (call $value))",
        )
    };
    TRACKED
        .replace("ADDR", addr)
        .replace("MEMORY", &memory)
        .replace("WRAP", wrap)
}

fn args(addr: u64, value: u64) -> Vec<u8> {
    [addr.to_le_bytes(), value.to_le_bytes()].concat()
}

/// Model of the canister's heap: what the page map must equal after each call.
fn poke_model(model: &mut Vec<u8>, method: &str, addr: u64, value: u64) {
    model[16..32].copy_from_slice(&args(addr, value));
    match method {
        "poke" => model[addr as usize] = value as u8,
        "fill" => {
            for at in (4096..model.len()).step_by(4096) {
                model[at] = value as u8;
            }
        }
        "grow" => {
            model.resize(model.len() + value as usize * 65536, 0);
            *model.last_mut().unwrap() = 7;
        }
        _ => unreachable!(),
    }
}

#[test]
fn large_heaps_map_their_image_and_compare_only_written_pages() {
    both(|wasm64| {
        let wasm = wat::parse_str(tracked_wat(wasm64, 320)).unwrap();
        // One embedder keeps heap images; the other has no room for any and copies every stored
        // page in. Their results must be identical: the path is not part of the semantics.
        let e = embedder();
        let plain = WasmtimeEmbedder::new(EmbedderConfig {
            max_heap_image_bytes: 0,
            ..EmbedderConfig::default()
        })
        .unwrap();
        let mut state = install(&e, &wasm);
        assert_eq!(state.wasm_memory.num_stored_pages(), 0);
        let mut model = vec![0u8; 320 * 65536];
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut steps: Vec<(&str, u64, u64)> = vec![("fill", 0, 1)];
        for round in 0..3u64 {
            for _ in 0..40 {
                let len = model.len() as u64 + round * 3 * 65536;
                steps.push(("poke", 32 + next() % (len - 32), next() % 255 + 1));
            }
            // Every page changes: the image falls far behind and is rebuilt or updated.
            steps.push(("fill", 0, round + 2));
            steps.push(("grow", 0, 3));
        }
        for (method, addr, value) in steps {
            let api = update_with(&args(addr, value), 0);
            let kept = run(&e, &state, api.clone(), method);
            let copied = run(&plain, &state, api, method);
            assert_eq!(kept.instructions_used, copied.instructions_used, "{method}");
            let (new, _, _) = kept.result.expect("execution succeeds");
            let (other, _, _) = copied.result.expect("execution succeeds");
            assert_eq!(new, other, "{method} at {addr}");
            poke_model(&mut model, method, addr, value);
            assert_eq!(new.wasm_memory_size_pages * 65536, model.len() as u64);
            state.wasm_memory = new.wasm_memory;
            state.wasm_memory_size_pages = new.wasm_memory_size_pages;
            state.globals = new.globals;
            if method != "poke" {
                assert_eq!(
                    state.wasm_memory,
                    openic_replicated_state::PageMap::from_slice(&model),
                    "after {method}"
                );
            }
            // A query reads the latest bytes, also through an image that is behind.
            let query = ApiType::Query {
                caller: Principal::anonymous(),
                arg: args(addr, 0),
                replicated: false,
                data_certificate: None,
                cycles_available: Cycles(0),
            };
            let (_, response, _) = run(&e, &state, query, "peek").result.unwrap();
            assert_eq!(
                response,
                Some(WasmResponse::Reply(vec![model[addr as usize]]))
            );
        }
        assert_eq!(
            state.wasm_memory,
            openic_replicated_state::PageMap::from_slice(&model)
        );
    });
}

#[test]
fn a_trap_on_a_large_heap_leaves_no_trace_in_the_next_execution() {
    let e = embedder();
    let wasm = wat::parse_str(tracked_wat(false, 320)).unwrap();
    let mut state = install(&e, &wasm);
    let (new, _, _) = run(&e, &state, update_with(&args(0, 5), 0), "fill")
        .result
        .unwrap();
    state.wasm_memory = new.wasm_memory;
    // Writes into the mapped image, then fails past the instruction limit.
    let output = e.execute(WasmExecutionInput {
        api_type: update_with(&args(0, 9), 0),
        entry_point: EntryPoint::Export("canister_update fill".to_string()),
        execution_state: &state,
        system_state: view(),
        instruction_limit: 20_000,
        wasm_memory_limit_bytes: 1 << 30,
        wasm_memory_limit_traps: false,
        stable_memory_limit_bytes: 1 << 30,
        memory_budget: None,
    });
    assert!(output.result.is_err());
    let query = ApiType::Query {
        caller: Principal::anonymous(),
        arg: args(4096, 0),
        replicated: false,
        data_certificate: None,
        cycles_available: Cycles(0),
    };
    let (_, response, _) = run(&e, &state, query, "peek").result.unwrap();
    assert_eq!(response, Some(WasmResponse::Reply(vec![5])));
}

#[test]
fn a_module_with_gigabytes_of_initial_memory_stores_only_its_data() {
    let e = embedder();
    let wat = tracked_wat(false, 65_536).replace(
        "(global $sum",
        "(data (i32.const 0xFFFF0000) \"top\") (global $sum",
    );
    let state = install(&e, &wat::parse_str(wat).unwrap());
    assert_eq!(state.wasm_memory_size_pages, 65_536);
    assert_eq!(state.wasm_memory.num_stored_pages(), 1);
    let mut top = [0u8; 3];
    state.wasm_memory.read(0xFFFF_0000, &mut top);
    assert_eq!(&top, b"top");
    let (new, _, _) = run(&e, &state, update_with(&args(0xFFFF_FFFF, 3), 0), "poke")
        .result
        .unwrap();
    assert_eq!(
        new.wasm_memory.num_stored_pages(),
        3,
        "page 0, the data, the poke"
    );
}

/// A loop that calls the System API in every iteration (so wasmtime's fuel is reset often) and
/// writes memory; replies with the sum.
const SLICED_LOOP: &str = r#"
(module
  (import "ic0" "msg_reply" (func $reply))
  (import "ic0" "msg_reply_data_append" (func $append (param i32 i32)))
  (import "ic0" "msg_arg_data_size" (func $arg_size (result i32)))
  (memory (export "memory") 1)
  (func (export "canister_update work")
    (local $i i32)
    (loop $again
      (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (call $arg_size)))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $again (i32.lt_u (local.get $i) (i32.const 100000))))
    (call $append (i32.const 0) (i32.const 4))
    (call $reply)))
"#;

fn sliced_input<'a>(state: &'a ExecutionState, limit: u64) -> WasmExecutionInput<'a> {
    WasmExecutionInput {
        api_type: update_with(&[1, 2, 3], 0),
        entry_point: EntryPoint::Export("canister_update work".into()),
        execution_state: state,
        system_state: view(),
        instruction_limit: limit,
        wasm_memory_limit_bytes: 1 << 30,
        wasm_memory_limit_traps: false,
        stable_memory_limit_bytes: 1 << 30,
        memory_budget: None,
    }
}

#[test]
fn a_sliced_execution_completes_in_the_slice_its_instructions_say_with_the_same_result() {
    let e = Arc::new(embedder());
    let state = install(&e, &wat::parse_str(SLICED_LOOP).unwrap());
    let whole = e.execute(sliced_input(&state, 1 << 40));
    let used = whole.instructions_used;
    let (_, response, _) = whole.result.clone().expect("runs");
    assert_eq!(
        response,
        Some(WasmResponse::Reply(300_000u32.to_le_bytes().to_vec()))
    );
    // Four slices, and two such executions at once: each answers by its instruction count only.
    let slice = used / 4 + 1;
    let mut first = e.clone().start_sliced(sliced_input(&state, 1 << 40), slice);
    let mut second = e.clone().start_sliced(sliced_input(&state, 1 << 40), slice);
    for k in 1..4 {
        assert!(first.wait(k).is_none(), "not complete within {k} slices");
        assert!(second.wait(k).is_none(), "not complete within {k} slices");
    }
    for execution in [&mut first, &mut second] {
        let output = execution.wait(4).expect("complete within 4 slices");
        assert_eq!(output.instructions_used, used);
        assert_eq!(output.result, whole.result);
        assert!(execution.wait(5).is_none(), "the output is handed out once");
    }
    // Past the instruction limit, in slices as in one go.
    let limit = used / 2;
    let whole = e.execute(sliced_input(&state, limit));
    let mut sliced = e
        .clone()
        .start_sliced(sliced_input(&state, limit), limit.div_ceil(3));
    assert!(sliced.wait(2).is_none());
    let output = sliced.wait(3).expect("at the limit in the third slice");
    assert_eq!(output.result, whole.result);
    assert_eq!(
        output.result.unwrap_err(),
        ExecutionError::InstructionLimitExceeded { limit }
    );
    // An abandoned execution lets go of its thread; a new one still runs.
    let mut abandoned = e.clone().start_sliced(sliced_input(&state, 1 << 40), slice);
    assert!(abandoned.wait(1).is_none());
    drop(abandoned);
    let mut again = e.clone().start_sliced(sliced_input(&state, 1 << 40), used);
    assert_eq!(again.wait(1).expect("one slice").instructions_used, used);
}

/// A loop that calls nothing (wasmtime keeps its fuel count in a register) still stops at its
/// grant (Note [slice probes]): the first slice of a 20 billion instruction loop is known not to
/// be the last long before the loop could end (about half a minute in this build).
#[test]
fn a_call_free_loop_stops_at_its_grant() {
    let e = Arc::new(embedder());
    let wat = r#"(module (memory (export "memory") 1)
      (func (export "canister_update work") (loop $again (br $again))))"#;
    let state = install(&e, &wat::parse_str(wat).unwrap());
    let started = std::time::Instant::now();
    let mut sliced = e
        .clone()
        .start_sliced(sliced_input(&state, 20_000_000_000), 20_000_000);
    assert!(sliced.wait(1).is_none());
    assert!(sliced.wait(2).is_none());
    let elapsed = started.elapsed();
    assert!(
        elapsed < std::time::Duration::from_secs(5),
        "two slices took {elapsed:?}"
    );
    drop(sliced);
}
