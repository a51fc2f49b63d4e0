//! Installs and upgrades real wasm modules (WAT) through the wasmtime embedder, to check that
//! the management canister drives the embedder's hooks as the interface requires.

use super::*;
use candid::Encode;
use ic_management_canister_types as mct;
use openic_embedders::{EmbedderConfig, WasmtimeEmbedder};
use openic_types::ids::FIRST_USER_CANISTER_INDEX;
use openic_types::{ErrorCode, SubnetId};

/// v1: `canister_init` copies its argument to stable memory at 0; `canister_pre_upgrade` writes
/// `PRE` (from a data segment) to stable memory at 100; a heap marker lives at 500.
const MODULE_V1: &str = r#"
(module
  (import "ic0" "stable64_grow" (func $stable_grow (param i64) (result i64)))
  (import "ic0" "stable64_write" (func $stable_write (param i64 i64 i64)))
  (import "ic0" "msg_arg_data_size" (func $arg_size (result i32)))
  (import "ic0" "msg_arg_data_copy" (func $arg_copy (param i32 i32 i32)))
  (memory (export "memory") 1)
  (func (export "canister_init")
    (drop (call $stable_grow (i64.const 1)))
    (call $arg_copy (i32.const 0) (i32.const 0) (call $arg_size))
    (call $stable_write (i64.const 0) (i64.const 0) (i64.extend_i32_u (call $arg_size))))
  (func (export "canister_pre_upgrade")
    (call $stable_write (i64.const 100) (i64.const 100) (i64.const 3)))
  (data (i32.const 100) "PRE")
  (data (i32.const 500) "OLD-HEAP"))
"#;

/// v2: `canister_post_upgrade` traps on a 4-byte argument; otherwise it copies stable memory
/// bytes 0..5 to heap offset 300.
const MODULE_V2: &str = r#"
(module
  (import "ic0" "trap" (func $trap (param i32 i32)))
  (import "ic0" "msg_arg_data_size" (func $arg_size (result i32)))
  (import "ic0" "stable64_read" (func $stable_read (param i64 i64 i64)))
  (memory (export "memory") 1)
  (func (export "canister_post_upgrade")
    (if (i32.eq (call $arg_size) (i32.const 4))
      (then (call $trap (i32.const 0) (i32.const 0))))
    (call $stable_read (i64.const 300) (i64.const 0) (i64.const 5))))
"#;

fn install(
    embedder: &WasmtimeEmbedder,
    config: &ExecutionConfig,
    subnet: &SubnetContext,
    state: &mut ReplicatedState,
    caller: Principal,
    args: mct::InstallCodeArgs,
) -> ManagementOutcome {
    let payload = Encode!(&args).unwrap();
    execute_management_call(
        embedder,
        config,
        subnet,
        state,
        ManagementCall {
            caller: ManagementCaller::User(caller),
            method: "install_code",
            payload: &payload,
            cycles: Cycles::ZERO,
            stop_context: StopContext::Ingress {
                sender: caller,
                request_id: openic_types::RequestId([0; 32]),
            },
        },
    )
    .0
}

#[test]
fn real_upgrade_keeps_stable_memory_and_rolls_back_on_trap() {
    let embedder = WasmtimeEmbedder::new(EmbedderConfig::default()).expect("engine builds");
    let config = ExecutionConfig::default();
    let subnet_id = SubnetId(Principal::from_slice(&[0xAB; 29]));
    let subnet = SubnetContext {
        subnet_id,
        root_key_der: vec![1; 133],
        node_count: 1,
    };
    let mut state = ReplicatedState::new(subnet_id, FIRST_USER_CANISTER_INDEX, [3; 32]);
    let user = Principal::from_slice(&[5; 29]);
    let create = Encode!(&mct::ProvisionalCreateCanisterWithCyclesArgs::default()).unwrap();
    let (outcome, _) = execute_management_call(
        &embedder,
        &config,
        &subnet,
        &mut state,
        ManagementCall {
            caller: ManagementCaller::User(user),
            method: "provisional_create_canister_with_cycles",
            payload: &create,
            cycles: Cycles::ZERO,
            stop_context: StopContext::Ingress {
                sender: user,
                request_id: openic_types::RequestId([1; 32]),
            },
        },
    );
    assert!(
        matches!(outcome, ManagementOutcome::Reply(_)),
        "{outcome:?}"
    );
    let id = CanisterId::from_u64(FIRST_USER_CANISTER_INDEX);
    let args = |mode, module: &str, arg: &[u8]| mct::InstallCodeArgs {
        mode,
        canister_id: id.get(),
        wasm_module: wat::parse_str(module).expect("valid WAT"),
        arg: arg.to_vec(),
        sender_canister_version: None,
    };

    let outcome = install(
        &embedder,
        &config,
        &subnet,
        &mut state,
        user,
        args(mct::CanisterInstallMode::Install, MODULE_V1, b"hello"),
    );
    assert_eq!(
        outcome,
        ManagementOutcome::Reply(EMPTY_CANDID_REPLY.to_vec())
    );
    let read = |state: &ReplicatedState, stable: bool, offset: u64, len: usize| {
        let execution_state = state
            .canister(&id)
            .unwrap()
            .execution_state
            .as_ref()
            .unwrap();
        let mut out = vec![0; len];
        if stable {
            execution_state.stable_memory.read(offset, &mut out);
        } else {
            execution_state.wasm_memory.read(offset, &mut out);
        }
        out
    };
    assert_eq!(read(&state, true, 0, 5), b"hello");
    assert_eq!(read(&state, false, 500, 8), b"OLD-HEAP");

    // A trap in post_upgrade undoes pre_upgrade's stable-memory write as well.
    let before = state.canister(&id).unwrap().clone();
    let upgrade = mct::CanisterInstallMode::Upgrade(None);
    let outcome = install(
        &embedder,
        &config,
        &subnet,
        &mut state,
        user,
        args(upgrade, MODULE_V2, b"trap"),
    );
    let ManagementOutcome::Reject(error) = outcome else {
        panic!("a trapping post_upgrade must fail the upgrade: {outcome:?}");
    };
    assert_eq!(error.error_code, Some(ErrorCode::CanisterCalledTrap));
    // Rolled back but for the balance: the hooks that ran (pre_upgrade, start, the trapping
    // post_upgrade) are paid for, base fee plus their instructions.
    let mut after = state.canister(&id).unwrap().clone();
    let paid = before.system_state.cycles_balance.get() - after.system_state.cycles_balance.get();
    assert!(paid > config.update_message_execution_fee.get(), "{paid}");
    after.system_state.cycles_balance = before.system_state.cycles_balance;
    assert_eq!(&after, &before);

    let outcome = install(
        &embedder,
        &config,
        &subnet,
        &mut state,
        user,
        args(upgrade, MODULE_V2, b"go"),
    );
    assert_eq!(
        outcome,
        ManagementOutcome::Reply(EMPTY_CANDID_REPLY.to_vec())
    );
    assert_eq!(read(&state, true, 0, 5), b"hello", "stable memory survives");
    assert_eq!(
        read(&state, true, 100, 3),
        b"PRE",
        "pre_upgrade ran on the old module"
    );
    assert_eq!(
        read(&state, false, 300, 5),
        b"hello",
        "post_upgrade sees stable memory"
    );
    assert_eq!(
        read(&state, false, 500, 8),
        vec![0; 8],
        "the heap was replaced"
    );
    assert_eq!(
        state.canister(&id).unwrap().system_state.canister_version,
        2
    );
}
