//! Canister creation, settings, start/stop/delete, cycles and randomness; plus the bookkeeping
//! shared by several methods (history, answering waiting callers).

use super::args::{self, ValidSettings};
use super::errors::{self, ManagementError};
use super::{Context, Handled, ManagementOutcome, controlled, existing};
use ic_management_canister_types as mct;
use openic_replicated_state::{
    CallbackId, CanisterChange, CanisterMessage, CanisterState, CanisterStatus, ChangeDetails,
    ChangeOrigin, Payload, PendingRawRand, ReplicatedState, Response, StopContext, SystemState,
};
use openic_types::ids::{USER_CANISTER_RANGE, subnet_canister_ranges};
use openic_types::{
    CanisterId, Cycles, ErrorCode, IngressState, RejectCode, RequestId, Time, UserError,
};
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;

/// Most entries kept in a canister's history (`canister_info` guarantees the 20 most recent).
pub(super) const MAX_CANISTER_HISTORY_CHANGES: usize = 20;
/// Most `stop_canister` calls that may wait for one canister at once.
pub(super) const MAX_STOP_CONTEXTS: usize = 1_000;
/// Domain separator for deriving `raw_rand` output from the random seed.
const RAW_RAND_OUTPUT_DOMAIN: &[u8] = b"\x13openic-raw-rand-out";
/// Domain separator for advancing the random seed after each `raw_rand`.
const RAW_RAND_RATCHET_DOMAIN: &[u8] = b"\x16openic-raw-rand-ratchet";

/// Appends a change to the canister's history, dropping the oldest beyond the limit.
pub(super) fn record_change(
    system_state: &mut SystemState,
    time: Time,
    origin: ChangeOrigin,
    details: ChangeDetails,
) {
    system_state.history.push_back(CanisterChange {
        timestamp_nanos: time.as_nanos_since_unix_epoch(),
        canister_version: system_state.canister_version,
        origin,
        details,
    });
    while system_state.history.len() > MAX_CANISTER_HISTORY_CHANGES {
        system_state.history.pop_front();
    }
    system_state.total_num_changes = system_state.total_num_changes.saturating_add(1);
}

/// Marks a user's call as rejected, if it is still waiting.
pub(super) fn reject_ingress(
    state: &mut ReplicatedState,
    request_id: &RequestId,
    error: UserError,
) {
    if let Some(status) = state.ingress_history.get(request_id).cloned()
        && !status.state.is_terminal()
    {
        crate::common::set_ingress_state(
            state,
            *request_id,
            status.sender,
            status.effective_canister_id,
            IngressState::Rejected(error),
        );
    }
}

/// A waiting call from a canister, to be answered with a reject.
pub(super) struct WaitingCanisterCall {
    pub originator: CanisterId,
    pub respondent: CanisterId,
    pub callback: CallbackId,
    pub refund: Cycles,
    pub deadline: Option<Time>,
}

/// Queues a reject response for a canister's call into the caller's input queue (responses are
/// always accepted there: each request reserved room for its response). If the caller no longer
/// exists, the response, and its refund, has nowhere to go and is dropped.
pub(super) fn reject_canister_call(
    state: &mut ReplicatedState,
    call: WaitingCanisterCall,
    code: RejectCode,
    message: String,
) {
    if let Some(originator) = state.canister_mut(&call.originator) {
        originator
            .system_state
            .input_queue
            .push_back(CanisterMessage::Response(Response {
                originator: call.originator,
                respondent: call.respondent,
                originator_reply_callback: call.callback,
                refund: call.refund,
                payload: Payload::Reject { code, message },
                deadline: call.deadline,
            }));
    }
}

/// Answers a waiting `stop_canister` call with a reject.
fn reject_stop_context(state: &mut ReplicatedState, context: StopContext, error: UserError) {
    match context {
        StopContext::Ingress { request_id, .. } => reject_ingress(state, &request_id, error),
        StopContext::Canister(request) => reject_canister_call(
            state,
            WaitingCanisterCall {
                originator: request.sender,
                respondent: request.receiver,
                callback: request.sender_reply_callback,
                refund: request.payment,
                deadline: request.deadline,
            },
            error.code,
            error.message,
        ),
    }
}

/// Checks a `specified_id`: inside the subnet's ranges, never used.
fn check_specified_id(
    state: &ReplicatedState,
    id: candid::Principal,
) -> Result<CanisterId, UserError> {
    let id = CanisterId::unchecked_from_principal(id);
    if !subnet_canister_ranges()
        .iter()
        .any(|range| range.contains(&id))
    {
        return Err(ManagementError::SpecifiedIdOutsideRanges { id: id.get() }.into());
    }
    if state.canisters.contains_key(&id) || state.deleted_canisters.contains(&id) {
        return Err(ManagementError::SpecifiedIdInUse { id: id.get() }.into());
    }
    Ok(id)
}

/// The next free id of the user range, advancing the allocation index past it.
fn allocate_canister_id(state: &mut ReplicatedState) -> Result<CanisterId, UserError> {
    let (first, last) = USER_CANISTER_RANGE;
    let mut index = state.metadata.next_user_canister_index.max(first);
    // Each skipped index belongs to an existing or deleted canister, so this loop runs at most
    // (number of canisters ever created) + 1 times.
    while index <= last {
        let id = CanisterId::from_u64(index);
        if !state.canisters.contains_key(&id) && !state.deleted_canisters.contains(&id) {
            state.metadata.next_user_canister_index = index.saturating_add(1);
            return Ok(id);
        }
        index = index.saturating_add(1);
        if index == u64::MAX {
            break;
        }
    }
    Err(ManagementError::CanisterIdsExhausted.into())
}

/// Adds a new empty canister. Infallible: every check happens before.
fn add_canister(
    context: &Context<'_>,
    state: &mut ReplicatedState,
    id: CanisterId,
    settings: &ValidSettings,
    cycles: Cycles,
    sender_canister_version: Option<u64>,
) {
    let now = state.metadata.time;
    let controllers = settings
        .controllers
        .clone()
        .unwrap_or_else(|| BTreeSet::from([context.caller.principal()]));
    let mut system_state = SystemState::new(id, controllers.clone(), cycles, now);
    settings.apply_to(&mut system_state.settings);
    record_change(
        &mut system_state,
        now,
        context.change_origin(sender_canister_version),
        ChangeDetails::Creation {
            controllers: controllers.into_iter().collect(),
        },
    );
    state.put_canister(CanisterState {
        system_state,
        execution_state: None,
    });
}

fn reply_canister_id(id: CanisterId) -> Result<Handled, UserError> {
    args::encode(&mct::CanisterIdRecord {
        canister_id: id.get(),
    })
    .map(Handled::reply)
}

/// `provisional_create_canister_with_cycles`: anyone may create a canister with free cycles.
pub(super) fn provisional_create_canister_with_cycles(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: args::ProvisionalCreateArgs = args::decode(context.method, context.payload)?;
    let cycles = match &args.amount {
        Some(amount) => Cycles(u128::try_from(amount.0.clone()).map_err(|_| {
            UserError::from(ManagementError::AmountTooLarge {
                amount: amount.to_string(),
            })
        })?),
        None => context.config.default_provisional_cycles,
    };
    let settings = match &args.settings {
        Some(settings) => args::validate_settings(settings)?,
        None => ValidSettings::default(),
    };
    let id = match args.specified_id {
        Some(specified) => check_specified_id(state, specified)?,
        None => allocate_canister_id(state)?,
    };
    add_canister(
        context,
        state,
        id,
        &settings,
        cycles,
        args.sender_canister_version,
    );
    reply_canister_id(id)
}

/// `create_canister`: a canister pays the creation fee from the attached cycles; the rest becomes
/// the new canister's balance.
pub(super) fn create_canister(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::CreateCanisterArgs = args::decode(context.method, context.payload)?;
    let fee = context.config.canister_creation_fee;
    let Some(balance) = context.cycles.checked_sub(fee) else {
        return Err(ManagementError::InsufficientCyclesForCreation {
            fee,
            attached: context.cycles,
        }
        .into());
    };
    let settings = match &args.settings {
        Some(settings) => args::validate_settings(settings)?,
        None => ValidSettings::default(),
    };
    let id = allocate_canister_id(state)?;
    add_canister(
        context,
        state,
        id,
        &settings,
        balance,
        args.sender_canister_version,
    );
    state.metadata.burn_cycles(fee);
    let mut handled = reply_canister_id(id)?;
    handled.cycles_kept = context.cycles;
    Ok(handled)
}

/// The IC's refusal of a memory allocation whose reservation failed.
fn memory_allocation_error(
    error: crate::reservation::ReservationError,
    allocation: u64,
) -> UserError {
    match error {
        crate::reservation::ReservationError::InsufficientCycles {
            requested,
            available,
        } => UserError::new(
            ErrorCode::InsufficientCyclesInMemoryAllocation,
            format!(
                "Cannot increase memory allocation to {allocation} bytes due to insufficient cycles. At least {} additional cycles are required.",
                requested.saturating_sub(available).get()
            ),
        ),
        crate::reservation::ReservationError::LimitExceeded { requested, limit } => UserError::new(
            ErrorCode::ReservedCyclesLimitExceededInMemoryAllocation,
            format!(
                "Cannot increase memory allocation to {allocation} bytes due to its reserved cycles limit. The current limit ({}) would be exceeded by {}.",
                limit.get(),
                requested.saturating_sub(limit).get()
            ),
        ),
    }
}

/// `update_settings`: every given field changes, every missing field stays.
pub(super) fn update_settings(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::UpdateSettingsArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    controlled(state, &id, &context.caller.principal())?;
    let settings = args::validate_settings(&args.settings)?;
    if let Some(allocation) = settings
        .memory_allocation
        .filter(|allocation| *allocation != 0)
    {
        let used = crate::common::memory_usage_bytes(existing(state, &id)?)
            .saturating_add(state.snapshots.size_of(&id));
        if allocation < used {
            return Err(errors::invalid_settings(format!(
                "memory_allocation {allocation} is below the {used} bytes canister {} already uses",
                id.get()
            )));
        }
    }
    // The reserved cycles (`reservation`): a limit may not go below what is reserved, and a
    // larger memory allocation reserves for the bytes it adds, under the new limit.
    let canister = existing(state, &id)?;
    let reserved = canister.system_state.reserved_balance;
    if let Some(limit) = settings.reserved_cycles_limit
        && Cycles(limit) < reserved
    {
        return Err(UserError::new(
            ErrorCode::ReservedCyclesLimitIsTooLow,
            format!(
                "Cannot set the reserved cycles limit {limit} below the reserved cycles balance of the canister {}.",
                reserved.get()
            ),
        ));
    }
    let mut reservation = Cycles::ZERO;
    if let Some(allocation) = settings.memory_allocation {
        let used = crate::common::memory_usage_bytes(canister)
            .saturating_add(state.snapshots.size_of(&id));
        let old_allocation = canister.system_state.settings.memory_allocation;
        let added =
            crate::reservation::allocated_bytes(used.max(old_allocation), used.max(allocation), 0);
        if added > 0 {
            reservation = crate::reservation::storage_reservation_cycles(
                context.config,
                added,
                crate::reservation::subnet_memory_usage(state),
            );
            let limit = settings
                .reserved_cycles_limit
                .unwrap_or(canister.system_state.settings.reserved_cycles_limit);
            crate::reservation::check_reserve(
                canister.system_state.cycles_balance,
                reserved,
                limit,
                reservation,
            )
            .map_err(|error| memory_allocation_error(error, allocation))?;
        }
    }
    let now = state.metadata.time;
    let origin = context.change_origin(args.sender_canister_version);
    let Some(canister) = state.canister_mut(&id) else {
        return Err(crate::common::canister_not_found_error(&id));
    };
    let system_state = &mut canister.system_state;
    settings.apply_to(&mut system_state.settings);
    system_state.cycles_balance = system_state.cycles_balance.saturating_sub(reservation);
    system_state.reserved_balance = system_state.reserved_balance.saturating_add(reservation);
    system_state.canister_version = system_state.canister_version.saturating_add(1);
    if let Some(controllers) = &settings.controllers {
        system_state.controllers = controllers.clone();
        record_change(
            system_state,
            now,
            origin,
            ChangeDetails::ControllersChange {
                controllers: controllers.iter().copied().collect(),
            },
        );
    }
    if settings.log_memory_limit.is_some() {
        state.resize_log(&id);
    }
    Ok(Handled::reply(crate::common::EMPTY_CANDID_REPLY.to_vec()))
}

/// `start_canister`: running again; waiting stop calls are answered with a reject.
pub(super) fn start_canister(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::CanisterIdRecord = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    controlled(state, &id, &context.caller.principal())?;
    let Some(canister) = state.canister_mut(&id) else {
        return Err(crate::common::canister_not_found_error(&id));
    };
    let previous = std::mem::replace(&mut canister.system_state.status, CanisterStatus::Running);
    if let CanisterStatus::Stopping { stop_contexts, .. } = previous {
        for stop_context in stop_contexts {
            let error = UserError::new(
                ErrorCode::CanisterStopping,
                format!(
                    "stop_canister for canister {} was cancelled: start_canister was called before the canister stopped.",
                    id.get()
                ),
            );
            reject_stop_context(state, stop_context, error);
        }
    }
    Ok(Handled::reply(crate::common::EMPTY_CANDID_REPLY.to_vec()))
}

/// `stop_canister`: a stopped canister replies at once; otherwise the call waits in the
/// canister's stop contexts until the scheduler sees no open call contexts.
pub(super) fn stop_canister(
    context: &Context<'_>,
    state: &mut ReplicatedState,
    stop_context: StopContext,
) -> Result<Handled, UserError> {
    let args: mct::CanisterIdRecord = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    controlled(state, &id, &context.caller.principal())?;
    let deadline = state
        .metadata
        .time
        .saturating_add_nanos(context.config.stop_canister_timeout_nanos);
    let Some(canister) = state.canister_mut(&id) else {
        return Err(crate::common::canister_not_found_error(&id));
    };
    match &mut canister.system_state.status {
        CanisterStatus::Stopped => Ok(Handled::reply(crate::common::EMPTY_CANDID_REPLY.to_vec())),
        CanisterStatus::Stopping {
            stop_contexts,
            stop_deadlines,
        } => {
            if stop_contexts.len() >= MAX_STOP_CONTEXTS {
                return Err(ManagementError::TooManyStopRequests {
                    canister: id.get(),
                    max: MAX_STOP_CONTEXTS,
                }
                .into());
            }
            // Contexts from before deadlines existed have none: pad so the indices line up.
            stop_deadlines.resize(stop_contexts.len(), Time(u64::MAX));
            stop_contexts.push(stop_context);
            stop_deadlines.push(deadline);
            Ok(Handled {
                outcome: ManagementOutcome::Deferred,
                cycles_kept: Cycles::ZERO,
            })
        }
        status @ CanisterStatus::Running => {
            *status = CanisterStatus::Stopping {
                stop_contexts: vec![stop_context],
                stop_deadlines: vec![deadline],
            };
            Ok(Handled {
                outcome: ManagementOutcome::Deferred,
                cycles_kept: Cycles::ZERO,
            })
        }
    }
}

/// `delete_canister`: a stopped canister disappears; its id is never reused and its cycles are
/// burned. Messages still queued for it are answered with rejects.
pub(super) fn delete_canister(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::CanisterIdRecord = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    let canister = controlled(state, &id, &context.caller.principal())?;
    if context.caller.principal() == id.get() {
        return Err(ManagementError::DeleteSelf { canister: id.get() }.into());
    }
    if canister.system_state.status != CanisterStatus::Stopped {
        return Err(ManagementError::NotStopped { canister: id.get() }.into());
    }
    let Some(removed) = state.canisters.remove(&id) else {
        return Err(crate::common::canister_not_found_error(&id));
    };
    state.deleted_canisters.insert(id);
    state.canister_logs.remove(&id);
    std::sync::Arc::make_mut(&mut state.snapshots).remove_all(&id);
    let removed = std::sync::Arc::unwrap_or_clone(removed);
    // Its balance and its reserved cycles go with it.
    state.metadata.burn_cycles(
        removed
            .system_state
            .cycles_balance
            .saturating_add(removed.system_state.reserved_balance),
    );
    let message = format!("Canister {} has been deleted.", id.get());
    for queued in removed.system_state.input_queue {
        match queued {
            CanisterMessage::Ingress(ingress) => reject_ingress(
                state,
                &ingress.request_id,
                UserError::new(ErrorCode::CanisterNotFound, message.clone()),
            ),
            CanisterMessage::Request(request) => reject_canister_call(
                state,
                WaitingCanisterCall {
                    originator: request.sender,
                    respondent: id,
                    callback: request.sender_reply_callback,
                    refund: request.payment,
                    deadline: request.deadline,
                },
                RejectCode::DestinationInvalid,
                message.clone(),
            ),
            CanisterMessage::Response(_) => {}
        }
    }
    Ok(Handled::reply(crate::common::EMPTY_CANDID_REPLY.to_vec()))
}

/// `deposit_cycles`: a canister gives its attached cycles to any canister.
pub(super) fn deposit_cycles(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::CanisterIdRecord = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    existing(state, &id)?;
    if let Some(canister) = state.canister_mut(&id) {
        canister.system_state.cycles_balance = canister
            .system_state
            .cycles_balance
            .saturating_add(context.cycles);
    }
    Ok(Handled::reply_keeping(
        crate::common::EMPTY_CANDID_REPLY.to_vec(),
        context.cycles,
    ))
}

/// `provisional_top_up_canister`: anyone may add free cycles to a canister.
pub(super) fn provisional_top_up_canister(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::ProvisionalTopUpCanisterArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    existing(state, &id)?;
    let amount = u128::try_from(args.amount.0.clone()).map_err(|_| {
        UserError::from(ManagementError::AmountTooLarge {
            amount: args.amount.to_string(),
        })
    })?;
    if let Some(canister) = state.canister_mut(&id) {
        canister.system_state.cycles_balance = canister
            .system_state
            .cycles_balance
            .saturating_add(Cycles(amount));
    }
    Ok(Handled::reply(crate::common::EMPTY_CANDID_REPLY.to_vec()))
}

/// `raw_rand`: recorded, and answered [`RAW_RAND_LAG_HEIGHTS`] heights later by
/// [`answer_raw_rand_requests`], with randomness nobody knew when the call was made.
pub(super) fn raw_rand(
    state: &mut ReplicatedState,
    stop_context: StopContext,
) -> Result<Handled, UserError> {
    let StopContext::Canister(request) = stop_context else {
        // `dispatch` lets only canisters call `raw_rand`.
        return Err(errors::canister_only("raw_rand"));
    };
    state.raw_rand_requests.push_back(PendingRawRand {
        requested_at: state.metadata.height,
        request,
    });
    Ok(Handled {
        outcome: ManagementOutcome::Deferred,
        cycles_kept: Cycles::ZERO,
    })
}

/// How many heights after a `raw_rand` call its answer comes: the block randomness of height `h`
/// was unknown to everyone only while heights `h - 2` and earlier could still change (the seed
/// rule of `openic_consensus::bft::SEED_LAG_HEIGHTS`, which the node checks equals this).
pub const RAW_RAND_LAG_HEIGHTS: u64 = 2;

/// Answers, in call order, every `raw_rand` call made at least [`RAW_RAND_LAG_HEIGHTS`] heights
/// before the state's height, after the state's seed took in the current block's randomness.
/// Each answer is 32 bytes derived from the seed, which then advances, so every call gets fresh
/// bytes. Deterministic: every replica derives the same bytes.
pub(crate) fn answer_raw_rand_requests(state: &mut ReplicatedState) -> Vec<Response> {
    let height = state.metadata.height.0;
    let mut answers = Vec::new();
    while let Some(PendingRawRand { request, .. }) =
        state.raw_rand_requests.pop_front_if(|pending| {
            pending.requested_at.0.saturating_add(RAW_RAND_LAG_HEIGHTS) <= height
        })
    {
        let seed = state.metadata.random_seed;
        let output: [u8; 32] = Sha256::new()
            .chain_update(RAW_RAND_OUTPUT_DOMAIN)
            .chain_update(seed)
            .finalize()
            .into();
        state.metadata.random_seed = Sha256::new()
            .chain_update(RAW_RAND_RATCHET_DOMAIN)
            .chain_update(seed)
            .finalize()
            .into();
        let payload = match args::encode(&output.to_vec()) {
            Ok(bytes) => Payload::Data(bytes),
            Err(error) => Payload::Reject {
                code: error.code,
                message: error.message,
            },
        };
        answers.push(crate::common::management_response(request, payload));
    }
    answers
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::common::FALLBACK_INGRESS_RETENTION_NANOS;
    use openic_types::{IngressStatus, SubnetId};

    #[test]
    fn reject_ingress_keeps_an_expired_status_for_the_retention_period() {
        let subnet = SubnetId(candid::Principal::from_slice(&[1; 29]));
        let mut state = ReplicatedState::new(subnet, 0x8000_0000_0010_0001, [3; 32]);
        state.metadata.time = Time(100 * Time::NANOS_PER_SECOND);
        let id = RequestId([1; 32]);
        state.ingress_history.set(
            id,
            IngressStatus {
                state: IngressState::Processing,
                sender: candid::Principal::anonymous(),
                effective_canister_id: CanisterId::from_u64(1),
                ingress_expiry: Time(5),
            },
        );
        let error = UserError::new(ErrorCode::CanisterStopped, "stopped".to_string());
        reject_ingress(&mut state, &id, error.clone());
        let status = state.ingress_history.get(&id).unwrap();
        assert_eq!(status.state, IngressState::Rejected(error));
        assert_eq!(
            status.ingress_expiry,
            state
                .metadata
                .time
                .saturating_add_nanos(FALLBACK_INGRESS_RETENTION_NANOS)
        );
    }
}
