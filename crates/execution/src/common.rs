//! Helpers shared by block execution, queries and ingress inspection: the System API view of a
//! canister, cycles arithmetic (fees, freezing threshold) and the mapping of execution failures to
//! user-visible errors.

use crate::config::{ExecutionConfig, SubnetContext};
use openic_embedders::{ApiType, ExecutionError, SystemStateView};
use openic_replicated_state::{
    CanisterState, CanisterStatus, Payload, ReplicatedState, Request, Response, WASM_PAGE_SIZE,
};
use openic_types::{
    CanisterId, Cycles, ErrorCode, IngressState, IngressStatus, RejectCode, RequestId, Time,
    UserError, UserId,
};

/// Bytes in one GiB (the storage fee's unit).
const BYTES_PER_GIB: u128 = 1 << 30;

/// The Candid encoding of `()`: the reply of management methods that return nothing.
pub const EMPTY_CANDID_REPLY: &[u8] = b"DIDL\x00\x00";

/// Memory a canister occupies and pays storage for: heap, stable memory and the module.
pub fn memory_usage_bytes(canister: &CanisterState) -> u64 {
    let Some(execution_state) = &canister.execution_state else {
        return 0;
    };
    let pages = execution_state
        .wasm_memory_size_pages
        .saturating_add(execution_state.stable_memory_size_pages);
    pages
        .saturating_mul(WASM_PAGE_SIZE)
        .saturating_add(execution_state.wasm_binary.bytes.len() as u64)
        .saturating_add(execution_state.module_info.custom_sections_size)
}

/// Storage cost of `bytes` held for `nanos` nanoseconds.
pub fn storage_cost(config: &ExecutionConfig, bytes: u64, nanos: u64) -> Cycles {
    let byte_nanos = u128::from(bytes).saturating_mul(u128::from(nanos));
    let gib_seconds_scaled = byte_nanos / BYTES_PER_GIB;
    Cycles(
        gib_seconds_scaled.saturating_mul(config.storage_fee_per_gib_second.get())
            / u128::from(Time::NANOS_PER_SECOND),
    )
}

/// Bytes a canister pays storage for, `extra_bytes` (its snapshots) included: its memory
/// allocation when set (reserved whether used or not), else what it uses.
pub fn charged_memory_bytes(canister: &CanisterState, extra_bytes: u64) -> u64 {
    memory_usage_bytes(canister)
        .saturating_add(extra_bytes)
        .max(canister.system_state.settings.memory_allocation)
}

/// Cycles its compute allocation costs per `nanos` nanoseconds.
pub fn compute_allocation_cost(
    config: &ExecutionConfig,
    canister: &CanisterState,
    nanos: u64,
) -> Cycles {
    let percent_nanos = u128::from(canister.system_state.settings.compute_allocation)
        .saturating_mul(u128::from(nanos));
    Cycles(
        percent_nanos.saturating_mul(config.compute_percent_allocated_per_second_fee.get())
            / u128::from(Time::NANOS_PER_SECOND),
    )
}

/// Cycles a canister burns per second while idle: storage of its memory (or memory allocation)
/// and its compute allocation.
pub fn idle_cycles_per_second(config: &ExecutionConfig, canister: &CanisterState) -> Cycles {
    storage_cost(
        config,
        charged_memory_bytes(canister, 0),
        Time::NANOS_PER_SECOND,
    )
    .saturating_add(compute_allocation_cost(
        config,
        canister,
        Time::NANOS_PER_SECOND,
    ))
}

/// Bytes of memory `canister` uses besides the one that is growing (heap or stable), to cap that
/// memory at what its memory allocation leaves; `None` without an allocation.
fn allocation_room(canister: &CanisterState, growing_bytes: u64) -> Option<u64> {
    match canister.system_state.settings.memory_allocation {
        0 => None,
        allocation => Some(
            allocation.saturating_sub(memory_usage_bytes(canister).saturating_sub(growing_bytes)),
        ),
    }
}

/// The stable-memory limit of an execution in `canister`: the platform's, and what its memory
/// allocation leaves (growing past it fails, as the heap's does).
pub fn stable_memory_limit_bytes(config: &ExecutionConfig, canister: &CanisterState) -> u64 {
    let stable = canister.execution_state.as_ref().map_or(0, |e| {
        e.stable_memory_size_pages.saturating_mul(WASM_PAGE_SIZE)
    });
    allocation_room(canister, stable).map_or(config.max_stable_memory_bytes, |room| {
        room.min(config.max_stable_memory_bytes)
    })
}

/// Cycles that must stay in the balance for the canister not to be frozen: what it would burn
/// idle during its freezing threshold.
pub fn freeze_threshold_cycles(config: &ExecutionConfig, canister: &CanisterState) -> Cycles {
    let per_second = idle_cycles_per_second(config, canister);
    Cycles(per_second.get().saturating_mul(u128::from(
        canister.system_state.settings.freezing_threshold_seconds,
    )))
}

/// Fee of executing `instructions` instructions in an update-like execution (base fee included).
pub fn execution_fee(config: &ExecutionConfig, instructions: u64) -> Cycles {
    config.update_message_execution_fee.saturating_add(Cycles(
        u128::from(instructions).saturating_mul(config.cycles_per_instruction.get()),
    ))
}

/// The most instructions `cycles` pay for in one execution (the inverse of [`execution_fee`]).
pub fn affordable_instructions(config: &ExecutionConfig, cycles: Cycles) -> u64 {
    let instructions = cycles
        .get()
        .saturating_sub(config.update_message_execution_fee.get())
        / config.cycles_per_instruction.get().max(1);
    u64::try_from(instructions).unwrap_or(u64::MAX)
}

/// Fee of sending an inter-canister call with this method name and payload.
pub fn call_fee(config: &ExecutionConfig, method_name: &str, payload_len: usize) -> Cycles {
    let bytes = (method_name.len() as u128).saturating_add(payload_len as u128);
    config.xnet_call_fee.saturating_add(Cycles(
        bytes.saturating_mul(config.xnet_byte_transmission_fee.get()),
    ))
}

/// Fee of inducting an ingress message of `size_bytes` bytes.
pub fn ingress_induction_fee(config: &ExecutionConfig, size_bytes: u64) -> Cycles {
    config.ingress_message_reception_fee.saturating_add(Cycles(
        u128::from(size_bytes).saturating_mul(config.ingress_byte_reception_fee.get()),
    ))
}

/// The rejection for a canister that cannot pay `needed` cycles on top of its freezing threshold.
pub fn out_of_cycles_error(
    canister: &CanisterState,
    needed: Cycles,
    freeze_threshold: Cycles,
) -> UserError {
    let balance = canister.system_state.cycles_balance;
    let missing = needed
        .saturating_add(freeze_threshold)
        .saturating_sub(balance);
    UserError::new(
        ErrorCode::CanisterOutOfCycles,
        format!(
            "Canister {} is out of cycles: it has {} cycles, needs {} for this message and must keep \
             {} (its freezing threshold). Top it up with at least {} more cycles \
             (provisional_top_up_canister or deposit_cycles).",
            canister.canister_id().get(),
            balance,
            needed,
            freeze_threshold,
            missing
        ),
    )
}

/// Checks that the canister can pay `needed` cycles without falling below its freezing threshold.
pub fn check_can_pay(
    config: &ExecutionConfig,
    canister: &CanisterState,
    needed: Cycles,
) -> Result<(), UserError> {
    let threshold = freeze_threshold_cycles(config, canister);
    if canister.system_state.cycles_balance < needed.saturating_add(threshold) {
        return Err(out_of_cycles_error(canister, needed, threshold));
    }
    Ok(())
}

/// The rejection for calls to a canister that is stopping or stopped, if it is.
pub fn status_error(canister: &CanisterState) -> Option<UserError> {
    let id = canister.canister_id().get();
    match canister.system_state.status {
        CanisterStatus::Running => None,
        CanisterStatus::Stopping { .. } => Some(UserError::new(
            ErrorCode::CanisterStopping,
            format!(
                "Canister {id} is stopping and accepts no new calls; start it with start_canister."
            ),
        )),
        CanisterStatus::Stopped => Some(UserError::new(
            ErrorCode::CanisterStopped,
            format!("Canister {id} is stopped and accepts no calls; start it with start_canister."),
        )),
    }
}

/// The rejection for calls to a canister without a module.
pub fn empty_canister_error(canister_id: &CanisterId) -> UserError {
    UserError::new(
        ErrorCode::CanisterWasmModuleNotFound,
        format!(
            "Canister {} has no wasm module installed; install one with install_code first.",
            canister_id.get()
        ),
    )
}

/// The rejection for calls to a canister that does not exist.
pub fn canister_not_found_error(canister_id: &CanisterId) -> UserError {
    UserError::new(
        ErrorCode::CanisterNotFound,
        format!(
            "Canister {} not found on this subnet; check the canister id.",
            canister_id.get()
        ),
    )
}

/// The rejection for a method the canister does not export in the needed kind (`update`,
/// `query` or `composite_query`), worded as the IC words it.
pub fn method_not_found_error(canister_id: &CanisterId, kind: &str, method: &str) -> UserError {
    execution_error_to_user(
        canister_id,
        &ExecutionError::MethodNotFound(format!("{kind} method '{method}'.")),
    )
}

/// The rejection sent when a call context finished without a reply.
pub fn did_not_reply_error(canister_id: &CanisterId) -> UserError {
    UserError::new(
        ErrorCode::CanisterDidNotReply,
        format!(
            "Canister {} did not produce a response: the method finished without calling msg_reply or msg_reject.",
            canister_id.get()
        ),
    )
}

/// The user error for a failed execution, worded as the IC words it:
/// `Error from Canister <id>: <what>.\n<help>` (the help names the section of the IC's
/// execution-errors documentation; a `<what>` that ends in a period gets a second one, as on the IC).
pub fn execution_error_to_user(canister_id: &CanisterId, error: &ExecutionError) -> UserError {
    let code = match error {
        // The node is busy, not the canister at fault: a transient rejection to retry.
        ExecutionError::NodeMemoryBusy(why) => {
            return UserError {
                code: openic_types::RejectCode::SysTransient,
                message: format!(
                    "Canister {} could not run on this node now: {why}",
                    canister_id.get()
                ),
                error_code: None,
            };
        }
        ExecutionError::CalledTrap(_) => ErrorCode::CanisterCalledTrap,
        ExecutionError::Trapped(_) => ErrorCode::CanisterTrapped,
        ExecutionError::ContractViolation(_) | ExecutionError::WrongContext(_) => {
            ErrorCode::CanisterContractViolation
        }
        ExecutionError::WasmMemoryLimitExceeded { .. } => {
            ErrorCode::CanisterWasmMemoryLimitExceeded
        }
        ExecutionError::InstructionLimitExceeded { .. } => {
            ErrorCode::CanisterInstructionLimitExceeded
        }
        ExecutionError::OutOfMemory(_) => ErrorCode::CanisterOutOfMemory,
        ExecutionError::InsufficientCyclesInMemoryGrow { .. } => {
            ErrorCode::InsufficientCyclesInMemoryGrow
        }
        ExecutionError::ReservedCyclesLimitExceededInMemoryGrow { .. } => {
            ErrorCode::ReservedCyclesLimitExceededInMemoryGrow
        }
        ExecutionError::MethodNotFound(_) => ErrorCode::CanisterMethodNotExported,
        ExecutionError::Instantiation(_) => ErrorCode::CanisterInvalidWasm,
    };
    let mut message = format!("Error from Canister {}: {error}", canister_id.get());
    if let Some(help) = error.help() {
        message.push_str(".\n");
        message.push_str(&help);
    }
    UserError::new(code, message)
}

/// The user error for an explicit `msg_reject`.
pub fn canister_reject_error(message: String) -> UserError {
    UserError {
        code: RejectCode::CanisterReject,
        message,
        error_code: Some(ErrorCode::CanisterRejectedMessage),
    }
}

/// What the System API may read about `canister`, with `cycles_balance` as the balance to show
/// (after any prepaid fees). Calls are refused once the canister has
/// [`ExecutionConfig::max_callbacks_per_canister`] callbacks outstanding.
/// `call_context_instructions` is 0: callers running inside a call context fill it in.
pub fn system_state_view(
    config: &ExecutionConfig,
    subnet: &SubnetContext,
    canister: &CanisterState,
    time: Time,
    cycles_balance: Cycles,
    can_make_calls: bool,
) -> SystemStateView {
    let system_state = &canister.system_state;
    let outstanding_callbacks = system_state.call_context_manager.callbacks.len() as u64;
    let remaining_callbacks = config
        .max_callbacks_per_canister
        .saturating_sub(outstanding_callbacks);
    SystemStateView {
        canister_id: canister.canister_id(),
        controllers: system_state.controllers.clone(),
        status_code: system_state.status.as_ic0_code(),
        cycles_balance,
        freeze_threshold_cycles: freeze_threshold_cycles(config, canister)
            .saturating_add(system_state.reserved_balance),
        canister_version: system_state.canister_version,
        time,
        subnet_id: subnet.subnet_id,
        subnet_node_count: subnet.node_count,
        root_key_der: subnet.root_key_der.clone(),
        global_timer_nanos: system_state.global_timer_nanos,
        environment_variables: system_state.settings.environment_variables.clone(),
        can_make_calls: can_make_calls && remaining_callbacks > 0,
        call_base_fee: config.xnet_call_fee,
        call_fee_per_byte: config.xnet_byte_transmission_fee,
        create_canister_fee: config.canister_creation_fee,
        call_context_instructions: 0,
        remaining_callbacks,
    }
}

/// How long a finished call's status is kept at least, counted from the block that finished it
/// (also when its entry was already pruned, or its expiry has passed: a call that ran past its
/// expiry): long enough for the client, which may poll up to its expiry plus clock skew, to read
/// it.
pub const FALLBACK_INGRESS_RETENTION_NANOS: u64 = 6 * 60 * Time::NANOS_PER_SECOND;

/// Sets the state of an ingress message, keeping its recorded sender, effective canister id and
/// expiry (or, if the entry is gone, recording what is known). A status that becomes terminal is
/// kept until at least [`FALLBACK_INGRESS_RETENTION_NANOS`] after the current block time, so a
/// call finishing after its `ingress_expiry` is not pruned before the client can read it.
pub(crate) fn set_ingress_state(
    state: &mut ReplicatedState,
    request_id: RequestId,
    sender: UserId,
    receiver: CanisterId,
    new_state: IngressState,
) {
    let retain_until = state
        .metadata
        .time
        .saturating_add_nanos(FALLBACK_INGRESS_RETENTION_NANOS);
    let terminal = new_state.is_terminal();
    let mut status = match state.ingress_history.get(&request_id) {
        Some(existing) => IngressStatus {
            state: new_state,
            ..existing.clone()
        },
        None => IngressStatus {
            state: new_state,
            sender,
            effective_canister_id: receiver,
            ingress_expiry: retain_until,
        },
    };
    if terminal {
        status.ingress_expiry = status.ingress_expiry.max(retain_until);
    }
    state.ingress_history.set(request_id, status);
}

/// The management canister's answer to a canister's `request`: `payload` to its callback, with
/// the request's cycles refunded.
pub(crate) fn management_response(request: Request, payload: Payload) -> Response {
    Response {
        originator: request.sender,
        // `aaaaa-aa`, or the subnet's id if the caller addressed the management canister by it.
        respondent: request.receiver,
        originator_reply_callback: request.sender_reply_callback,
        refund: request.payment,
        payload,
        deadline: request.deadline,
    }
}

/// The heap limit of an execution of `api_type` in `canister`. The canister's `wasm_memory_limit`
/// setting (0 = none) applies where the spec applies it: update methods, `canister_init`,
/// `canister_post_upgrade` (and the `(start)` function that precedes them). Queries, response
/// callbacks and cleanup, heartbeats, global timers, the low-memory hook and `canister_pre_upgrade`
/// ignore it (spec: `wasm_memory_limit`), so a canister over its limit can still be upgraded,
/// answer calls and run the hook that frees memory. The platform's limit always applies.
///
/// Returns the limit and whether it is the setting (growing past it traps, as on the IC) rather
/// than the platform's (past which `memory.grow` fails).
pub fn wasm_memory_limit_bytes(
    config: &ExecutionConfig,
    canister: &CanisterState,
    api_type: &ApiType,
) -> (u64, bool) {
    let enforced = matches!(
        api_type,
        ApiType::Update { .. } | ApiType::Init { .. } | ApiType::Start
    );
    let (limit, traps) = match canister.system_state.settings.wasm_memory_limit {
        limit if enforced && limit != 0 && limit < config.max_wasm_memory_bytes => (limit, true),
        _ => (config.max_wasm_memory_bytes, false),
    };
    // A memory allocation is a hard bound for every execution: growing past what it leaves fails.
    let heap = canister.execution_state.as_ref().map_or(0, |e| {
        e.wasm_memory_size_pages.saturating_mul(WASM_PAGE_SIZE)
    });
    match allocation_room(canister, heap) {
        Some(room) if room < limit => (room, false),
        _ => (limit, traps),
    }
}

/// The input of one execution of `api_type` in `canister`, with the heap and stable-memory limits
/// its settings give it ([`wasm_memory_limit_bytes`], [`stable_memory_limit_bytes`]).
#[allow(clippy::too_many_arguments)]
pub fn execution_input<'a>(
    config: &ExecutionConfig,
    canister: &CanisterState,
    execution_state: &'a openic_replicated_state::ExecutionState,
    api_type: ApiType,
    entry_point: openic_embedders::EntryPoint,
    system_state: SystemStateView,
    instruction_limit: u64,
) -> openic_embedders::WasmExecutionInput<'a> {
    let (wasm_memory_limit, wasm_memory_limit_traps) =
        wasm_memory_limit_bytes(config, canister, &api_type);
    openic_embedders::WasmExecutionInput {
        api_type,
        entry_point,
        execution_state,
        system_state,
        instruction_limit,
        wasm_memory_limit_bytes: wasm_memory_limit,
        wasm_memory_limit_traps,
        stable_memory_limit_bytes: stable_memory_limit_bytes(config, canister),
        memory_budget: None,
    }
}

/// The `wasm_memory_limit` the low-memory condition compares with when the setting is 0 (none),
/// as the IC does.
const LOW_MEMORY_DEFAULT_LIMIT_BYTES: u64 = 4 << 30;

/// Whether the low-wasm-memory condition holds for a heap of `heap_pages` pages: the remaining
/// heap (`wasm_memory_limit` minus the heap) is below `wasm_memory_threshold`. A heap above the
/// limit (which executions that ignore the limit can reach) satisfies it, also with threshold 0.
pub fn low_wasm_memory_condition(canister: &CanisterState, heap_pages: u64) -> bool {
    let settings = &canister.system_state.settings;
    let limit = match settings.wasm_memory_limit {
        0 => LOW_MEMORY_DEFAULT_LIMIT_BYTES,
        limit => limit,
    };
    let used = heap_pages.saturating_mul(WASM_PAGE_SIZE);
    limit < used.saturating_add(settings.wasm_memory_threshold)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_cost_of_one_gib_second_is_the_fee() {
        let config = ExecutionConfig::default();
        assert_eq!(
            storage_cost(&config, 1 << 30, Time::NANOS_PER_SECOND),
            config.storage_fee_per_gib_second
        );
        assert_eq!(storage_cost(&config, 0, u64::MAX), Cycles::ZERO);
    }

    #[test]
    fn terminal_status_is_kept_the_retention_period_after_now() {
        let subnet = openic_types::SubnetId(candid::Principal::from_slice(&[1; 29]));
        let mut state = ReplicatedState::new(subnet, 0x8000_0000_0010_0001, [3; 32]);
        state.metadata.time = Time(100 * Time::NANOS_PER_SECOND);
        let canister = CanisterId::from_u64(1);
        let user = candid::Principal::anonymous();
        let retain_until = state
            .metadata
            .time
            .saturating_add_nanos(FALLBACK_INGRESS_RETENTION_NANOS);
        let expired = RequestId([1; 32]);
        let far = RequestId([2; 32]);
        for (id, expiry) in [(expired, Time(5)), (far, Time(u64::MAX))] {
            state.ingress_history.set(
                id,
                IngressStatus {
                    state: IngressState::Received,
                    sender: user,
                    effective_canister_id: canister,
                    ingress_expiry: expiry,
                },
            );
        }
        // Non-terminal: the expiry is left alone.
        set_ingress_state(
            &mut state,
            expired,
            user,
            canister,
            IngressState::Processing,
        );
        assert_eq!(
            state.ingress_history.get(&expired).unwrap().ingress_expiry,
            Time(5)
        );
        let replied = IngressState::Replied(vec![]);
        set_ingress_state(&mut state, expired, user, canister, replied.clone());
        assert_eq!(
            state.ingress_history.get(&expired).unwrap().ingress_expiry,
            retain_until
        );
        set_ingress_state(&mut state, far, user, canister, replied);
        assert_eq!(
            state.ingress_history.get(&far).unwrap().ingress_expiry,
            Time(u64::MAX),
            "a later expiry is kept"
        );
        let gone = RequestId([3; 32]);
        set_ingress_state(&mut state, gone, user, canister, IngressState::Processing);
        assert_eq!(
            state.ingress_history.get(&gone).unwrap().ingress_expiry,
            retain_until
        );
    }

    #[test]
    fn execution_fee_is_base_plus_instructions() {
        let config = ExecutionConfig::default();
        assert_eq!(execution_fee(&config, 1_000), Cycles(5_001_000));
        assert_eq!(call_fee(&config, "ab", 3), Cycles(260_000 + 5 * 1_000));
        assert_eq!(ingress_induction_fee(&config, 10), Cycles(1_220_000));
    }
}
