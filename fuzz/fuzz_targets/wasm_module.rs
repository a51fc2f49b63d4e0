//! Arbitrary bytes as a canister module: `prepare_module` (gzip detection, validation against the
//! IC's rules, instrumentation, compilation) and, when it accepts the module,
//! `initial_execution_state` (instantiation and data segments). Both must answer `Ok` or
//! `InvalidWasm`, never panic. An accepted module's first exported update or query method then
//! runs twice on the same input, and both runs must agree exactly: executions recycle each
//! other's linear memories (Note [recycled linear memories] in the embedder), so a byte leaking
//! from one execution into the next shows up as a difference. Seed the corpus with
//! `fuzz/seeds/wasm_module` (see README.md).
#![no_main]

use libfuzzer_sys::fuzz_target;
use openic_embedders::{
    ApiType, Embedder as _, EmbedderConfig, EntryPoint, SystemStateView, WasmExecutionInput,
    WasmtimeEmbedder,
};
use openic_replicated_state::{ExecutionState, MethodKind};
use openic_types::{CanisterId, Cycles, Principal, SubnetId, Time};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, OnceLock};

fn embedder() -> &'static WasmtimeEmbedder {
    static EMBEDDER: OnceLock<WasmtimeEmbedder> = OnceLock::new();
    EMBEDDER.get_or_init(|| {
        WasmtimeEmbedder::new(EmbedderConfig::default()).expect("the engine builds on this host")
    })
}

/// `OPENIC_FUZZ_VERBOSE=1` prints each outcome (to check that seeds get past validation).
fn verbose() -> bool {
    static VERBOSE: OnceLock<bool> = OnceLock::new();
    *VERBOSE.get_or_init(|| std::env::var_os("OPENIC_FUZZ_VERBOSE").is_some())
}

fuzz_target!(|data: &[u8]| {
    let embedder = embedder();
    let prepared = embedder.prepare_module(data);
    if verbose() {
        eprintln!(
            "prepare_module: {:?}",
            prepared.as_ref().map(|(_, info)| info)
        );
    }
    let Ok((binary, info)) = prepared else {
        return;
    };
    let state = embedder.initial_execution_state(Arc::new(binary), Arc::new(info));
    if verbose() {
        eprintln!(
            "initial_execution_state: {:?}",
            state.as_ref().map(|s| s.globals.len())
        );
    }
    let Ok(state) = state else {
        return;
    };
    run_twice(embedder, &state);
});

fn view() -> SystemStateView {
    SystemStateView {
        canister_id: CanisterId::from_u64(0x8000_0000_0010_0001),
        controllers: BTreeSet::new(),
        status_code: 1,
        cycles_balance: Cycles(1_000_000_000_000),
        freeze_threshold_cycles: Cycles(0),
        canister_version: 1,
        time: Time(1_700_000_000_000_000_000),
        subnet_id: SubnetId(Principal::management_canister()),
        subnet_node_count: 1,
        root_key_der: vec![0; 133],
        global_timer_nanos: 0,
        environment_variables: BTreeMap::new(),
        can_make_calls: true,
        call_base_fee: Cycles(10),
        call_fee_per_byte: Cycles(1),
        create_canister_fee: Cycles(500_000_000_000),
        call_context_instructions: 0,
        remaining_callbacks: 1_000,
    }
}

/// Runs the first exported update or query method twice on the same state and input; the two
/// outputs must be identical.
fn run_twice(embedder: &WasmtimeEmbedder, state: &ExecutionState) {
    let Some((name, kind)) = state.module_info.methods.iter().next() else {
        return;
    };
    let caller = Principal::anonymous();
    let arg = b"DIDL\x00\x00".to_vec();
    let (export, api_type) = match kind {
        MethodKind::Update => (
            format!("canister_update {name}"),
            ApiType::Update {
                caller,
                arg,
                cycles_available: Cycles::ZERO,
                deadline: 0,
            },
        ),
        MethodKind::Query => (
            format!("canister_query {name}"),
            ApiType::Query {
                caller,
                arg,
                replicated: false,
                data_certificate: None,
                cycles_available: Cycles::ZERO,
            },
        ),
        MethodKind::CompositeQuery => return,
    };
    let run = || {
        embedder.execute(WasmExecutionInput {
            api_type: api_type.clone(),
            entry_point: EntryPoint::Export(export.clone()),
            execution_state: state,
            system_state: view(),
            instruction_limit: 50_000_000,
            wasm_memory_limit_bytes: 256 << 20,
            stable_memory_limit_bytes: 256 << 20,
        })
    };
    let first = run();
    let second = run();
    if verbose() {
        eprintln!("{export}: {:?}", first.result.as_ref().map(|(_, r, _)| r));
    }
    assert_eq!(
        first.instructions_used, second.instructions_used,
        "{export}"
    );
    assert_eq!(first.result, second.result, "{export}");
    assert_eq!(first.debug_prints, second.debug_prints, "{export}");
}
