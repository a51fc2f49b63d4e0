//! Block execution: ingress induction, system tasks, and the round loop that executes canister
//! messages (calls, responses) with call contexts, callbacks and cycles accounting.
//!
//! Note "round order": within a block the scheduler repeatedly (1) drains the management
//! canister's queue, then (2) takes one message from each canister's input queue, until every
//! queue is empty or a round limit is hit. Canisters are visited round-robin, in canister-id order
//! from `ReplicatedState::round_robin_cursor`: when a round's budget runs out before every canister
//! had its turn, the cursor records whose turn was cut off and the next block starts there, so a
//! busy canister with a low id cannot starve the others (system tasks use the same order). Queues
//! are FIFO and the cursor is replicated state, so the order of executions depends only on the
//! state and the block.

use crate::common::{
    EMPTY_CANDID_REPLY, call_fee, canister_not_found_error, canister_reject_error, check_can_pay,
    did_not_reply_error, empty_canister_error, execution_error_to_user, execution_fee,
    ingress_induction_fee, low_wasm_memory_condition, management_response, method_not_found_error,
    set_ingress_state, status_error, storage_cost, system_state_view,
};
use crate::config::{ExecutionConfig, SubnetContext};
use crate::management::{
    ManagementCall, ManagementCaller, ManagementOutcome, execute_management_call,
};
use crate::reservation;
use openic_embedders::{
    ApiType, Embedder, EntryPoint, ExecutionError, FinishedExecution, SlicedExecution,
    SystemStateChanges, SystemStateView, WasmExecutionOutput, WasmResponse,
};
use openic_interfaces::{BlockExecutionSummary, BlockExecutor};
use openic_replicated_state::{
    CallContext, CallContextId, CallOrigin, Callback, CallbackId, CanisterMessage, CanisterState,
    CanisterStatus, MethodKind, PausedExecution, Payload, ReplicatedState, Request, Response,
    StopContext, WASM_PAGE_SIZE, WasmClosure,
};
use openic_types::{
    Block, CanisterId, Cycles, ErrorCode, Height, IngressState, IngressStatus, Principal,
    RejectCode, RequestId, SignedIngress, Time, UserError, UserId,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// Slices a paused execution may run ahead of those granted to it (see
/// [`Scheduler::grant_paused_slices`]): what it runs ahead is ready when the next block grants it,
/// so the block does not wait for it and the time between blocks is not lost. Only when the
/// scheduler learns about it follows from the grants (Note [sliced executions] in the embedder).
const SLICES_AHEAD: u64 = 1;

/// The export run for the global timer.
const GLOBAL_TIMER_EXPORT: &str = "canister_global_timer";
/// The export run every block (or every heartbeat interval).
const HEARTBEAT_EXPORT: &str = "canister_heartbeat";
/// The export run when the low-wasm-memory condition becomes true.
const LOW_WASM_MEMORY_EXPORT: &str = "canister_on_low_wasm_memory";

/// The outcome of a call, before it is shaped for its origin (ingress status or response).
#[derive(Clone, Debug, PartialEq, Eq)]
enum CallOutcome {
    Reply(Vec<u8>),
    Reject(UserError),
}

impl CallOutcome {
    fn into_payload(self) -> Payload {
        match self {
            CallOutcome::Reply(data) => Payload::Data(data),
            CallOutcome::Reject(error) => Payload::Reject {
                code: error.code,
                message: error.message,
            },
        }
    }
}

/// What an execution was, for applying its result.
#[derive(Clone, Debug, Serialize, Deserialize)]
enum ExecutionKind {
    /// A new call (ingress or request) or a system task.
    Call,
    /// A reply or reject callback; the cleanup closure runs if it fails.
    Callback {
        cleanup: Option<WasmClosure>,
        cleanup_api: ApiType,
    },
}

/// An execution's input and what applying its result needs: kept, encoded, in the state's record
/// of an execution that runs in slices ([`PausedExecution::input`]), to run it again after a
/// restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct ExecutionPlan {
    call_context_id: CallContextId,
    api_type: ApiType,
    entry_point: EntryPoint,
    view: SystemStateView,
    instruction_limit: u64,
    /// Cycles taken from the balance for the instructions before it ran.
    prepaid: Cycles,
    kind: ExecutionKind,
    /// A query run replicated: only its system-state effects are kept.
    is_query: bool,
}

/// A sliced execution this node is running, for the state's record of it started at `started_at`.
#[derive(Debug)]
struct RunningExecution {
    started_at: Height,
    /// Slices granted to it so far.
    granted: u64,
    execution: Box<dyn SlicedExecution>,
}

/// Counters of one block, turned into the [`BlockExecutionSummary`].
#[derive(Default)]
struct RoundCounters {
    messages: u64,
    instructions: u64,
}

/// The deterministic block executor. See the crate documentation for its invariants.
pub struct Scheduler {
    embedder: Arc<dyn Embedder>,
    config: ExecutionConfig,
    subnet: SubnetContext,
    /// The sliced executions running on this node, by canister: one for each of the state's
    /// `paused_executions` (made again from the record when missing, see
    /// [`Scheduler::reconcile_paused`]).
    running: std::sync::Mutex<BTreeMap<CanisterId, RunningExecution>>,
}

impl Scheduler {
    /// A scheduler executing canisters with `embedder` under `config` on the subnet `subnet`.
    pub fn new(
        embedder: Arc<dyn Embedder>,
        config: ExecutionConfig,
        subnet: SubnetContext,
    ) -> Self {
        Scheduler {
            embedder,
            config,
            subnet,
            running: std::sync::Mutex::default(),
        }
    }

    /// The configuration in use.
    pub fn config(&self) -> &ExecutionConfig {
        &self.config
    }

    fn round_limit_reached(&self, counters: &RoundCounters) -> bool {
        counters.messages >= self.config.max_messages_per_round
            || counters.instructions >= self.config.max_instructions_per_round
    }

    // ---------------------------------------------------------------------------------------
    // Block phases.

    /// Keeps non-terminal statuses past their expiry: the call is still running and its result
    /// must be recorded; only finished calls are pruned.
    fn prune_ingress_history(&self, state: &mut ReplicatedState, now: Time) {
        let still_running: Vec<(RequestId, IngressStatus)> = state
            .ingress_history
            .iter()
            .filter(|(_, status)| status.ingress_expiry < now && !status.state.is_terminal())
            .map(|(id, status)| (*id, status.clone()))
            .collect();
        state.ingress_history.prune_expired(now);
        for (id, status) in still_running {
            state.ingress_history.set(id, status);
        }
    }

    fn charge_storage(&self, state: &mut ReplicatedState, now: Time) {
        let ids: Vec<CanisterId> = state.canisters.keys().copied().collect();
        for id in ids {
            let Some(canister) = state.canister(&id) else {
                continue;
            };
            let elapsed = now
                .as_nanos_since_unix_epoch()
                .saturating_sub(canister.system_state.last_charged_time.0);
            if elapsed == 0 {
                continue;
            }
            // Storage of its memory (or memory allocation) and snapshots, and its compute
            // allocation.
            let bytes = crate::common::charged_memory_bytes(canister, state.snapshots.size_of(&id));
            let cost = storage_cost(&self.config, bytes, elapsed).saturating_add(
                crate::common::compute_allocation_cost(&self.config, canister, elapsed),
            );
            state.burn_storage_from_canister(&id, cost);
            if let Some(canister) = state.canister_mut(&id) {
                canister.system_state.last_charged_time = now;
            }
        }
    }

    fn induct_ingress(&self, state: &mut ReplicatedState, block: &Block) -> u64 {
        let mut inducted = 0;
        for ingress in &block.ingress {
            if state.ingress_history.contains(&ingress.request_id) {
                // Replay protection: this request id was already inducted.
                continue;
            }
            if ingress.ingress_expiry < block.time {
                // Expired before it could start: never executed, never recorded.
                continue;
            }
            if state.ingress_history.len() >= self.config.max_ingress_history_len {
                tracing::warn!(
                    request_id = %ingress.request_id,
                    "ingress history full; message not inducted"
                );
                continue;
            }
            inducted += 1;
            state.metadata.update_transactions_total += 1;
            let status = |state: IngressState| IngressStatus {
                state,
                sender: ingress.sender,
                effective_canister_id: ingress.effective_canister_id,
                ingress_expiry: ingress.ingress_expiry,
            };
            match self.admit_ingress(state, ingress) {
                Ok(()) => state
                    .ingress_history
                    .set(ingress.request_id, status(IngressState::Received)),
                Err(error) => state
                    .ingress_history
                    .set(ingress.request_id, status(IngressState::Rejected(error))),
            }
        }
        inducted
    }

    /// Puts an ingress message into the queue it belongs to, or says why not.
    fn admit_ingress(
        &self,
        state: &mut ReplicatedState,
        ingress: &SignedIngress,
    ) -> Result<(), UserError> {
        if ingress.canister_id.is_management() {
            if state.subnet_queue.len() >= self.config.max_subnet_queue_len {
                return Err(queue_full_error(&ingress.canister_id));
            }
            state
                .subnet_queue
                .push_back(CanisterMessage::Ingress(ingress.clone()));
            return Ok(());
        }
        let Some(canister) = state.canister(&ingress.canister_id) else {
            return Err(canister_not_found_error(&ingress.canister_id));
        };
        if let Some(error) = status_error(canister) {
            return Err(error);
        }
        if canister.system_state.input_queue.len() >= self.config.max_canister_input_queue_len {
            return Err(queue_full_error(&ingress.canister_id));
        }
        let fee = ingress_induction_fee(&self.config, ingress.size_bytes);
        check_can_pay(&self.config, canister, fee)?;
        let canister = state
            .canister_mut(&ingress.canister_id)
            .expect("checked above");
        canister.system_state.cycles_balance =
            canister.system_state.cycles_balance.saturating_sub(fee);
        canister
            .system_state
            .input_queue
            .push_back(CanisterMessage::Ingress(ingress.clone()));
        state.metadata.burn_cycles(fee);
        Ok(())
    }

    /// Runs due low-memory hooks, global timers and heartbeats. `previous_time` is the time of
    /// the previous block: a heartbeat is due when a multiple of the heartbeat interval lies in
    /// `(previous_time, now]` (every block when the interval is 0).
    fn run_system_tasks(
        &self,
        state: &mut ReplicatedState,
        previous_time: Time,
        counters: &mut RoundCounters,
    ) {
        let now = state.metadata.time;
        let heartbeat_due = match self.config.heartbeat_interval_nanos {
            0 => true,
            interval => previous_time.0 / interval != now.0 / interval,
        };
        for id in round_robin_order(state) {
            let Some(canister) = state.canister(&id) else {
                continue;
            };
            if canister.system_state.status != CanisterStatus::Running
                || state.paused_executions.contains_key(&id)
            {
                continue;
            }
            let Some(execution_state) = &canister.execution_state else {
                continue;
            };
            let exports = &execution_state.module_info.system_methods;
            let has_timer = exports.contains(GLOBAL_TIMER_EXPORT);
            let has_heartbeat = exports.contains(HEARTBEAT_EXPORT);
            let has_low_memory = exports.contains(LOW_WASM_MEMORY_EXPORT);
            let timer = canister.system_state.global_timer_nanos;
            let timer_due = timer != 0 && now.as_nanos_since_unix_epoch() >= timer;
            let low_memory_due = canister.system_state.low_wasm_memory_hook_pending;

            if low_memory_due {
                if let Some(canister) = state.canister_mut(&id) {
                    canister.system_state.low_wasm_memory_hook_pending = false;
                }
                if has_low_memory {
                    self.run_system_task(state, id, LOW_WASM_MEMORY_EXPORT, counters);
                }
            }
            if timer_due {
                // Cleared just before it runs (the canister sets it again if it wants another
                // tick), and only if it runs: a canister that cannot pay keeps its timer, which
                // fires once it is topped up.
                let will_run = !has_timer || self.can_pay_system_task(state, id);
                if will_run && let Some(canister) = state.canister_mut(&id) {
                    canister.system_state.global_timer_nanos = 0;
                }
                if has_timer && will_run {
                    self.run_system_task(state, id, GLOBAL_TIMER_EXPORT, counters);
                }
            }
            if has_heartbeat && heartbeat_due {
                self.run_system_task(state, id, HEARTBEAT_EXPORT, counters);
            }
        }
    }

    /// Whether canister `id` can prepay a system task (heartbeat, timer, low-memory hook).
    fn can_pay_system_task(&self, state: &ReplicatedState, id: CanisterId) -> bool {
        let prepay = execution_fee(&self.config, self.config.max_instructions_per_update);
        state
            .canister(&id)
            .is_some_and(|canister| check_can_pay(&self.config, canister, prepay).is_ok())
    }

    fn run_system_task(
        &self,
        state: &mut ReplicatedState,
        id: CanisterId,
        export: &str,
        counters: &mut RoundCounters,
    ) {
        let limit = self.config.max_instructions_per_update;
        let prepay = execution_fee(&self.config, limit);
        let Some(canister) = state.canister(&id) else {
            return;
        };
        if let Err(error) = check_can_pay(&self.config, canister, prepay) {
            tracing::debug!(canister = %id.get(), %error, "system task skipped: {export}");
            return;
        }
        let call_context_id = open_call_context(
            state,
            id,
            CallOrigin::SystemTask,
            Cycles::ZERO,
            export.to_string(),
        );
        self.execute_and_apply(
            state,
            id,
            call_context_id,
            ApiType::SystemTask,
            EntryPoint::Export(export.to_string()),
            limit,
            ExecutionKind::Call,
            counters,
        );
    }

    fn run_messages(&self, state: &mut ReplicatedState, counters: &mut RoundCounters) {
        // A canister that could stop now answers its stop calls rather than time them out.
        self.complete_stops(state);
        self.time_out_stops(state);
        loop {
            let mut progressed = false;
            // Messages about a canister with a paused execution wait, in order, at the front.
            let mut waiting = VecDeque::new();
            while !self.round_limit_reached(counters) {
                let Some(message) = state.subnet_queue.pop_front() else {
                    break;
                };
                if self.waits_for_paused(state, &message) {
                    waiting.push_back(message);
                    continue;
                }
                self.execute_subnet_message(state, message);
                counters.messages += 1;
                progressed = true;
            }
            while let Some(message) = waiting.pop_back() {
                state.subnet_queue.push_front(message);
            }
            self.complete_stops(state);
            for id in round_robin_order(state) {
                if self.round_limit_reached(counters) {
                    // This canister's turn is cut off: the next round starts with it.
                    state.round_robin_cursor = Some(id);
                    break;
                }
                let has_message = !state.paused_executions.contains_key(&id)
                    && state
                        .canister(&id)
                        .is_some_and(|c| !c.system_state.input_queue.is_empty());
                if !has_message {
                    continue;
                }
                let message = state
                    .canister_mut(&id)
                    .and_then(|c| c.system_state.input_queue.pop_front());
                let Some(message) = message else { continue };
                self.execute_canister_message(state, id, message, counters);
                counters.messages += 1;
                progressed = true;
            }
            self.complete_stops(state);
            if !progressed || self.round_limit_reached(counters) {
                break;
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // The management canister.

    fn execute_subnet_message(&self, state: &mut ReplicatedState, message: CanisterMessage) {
        match message {
            CanisterMessage::Ingress(ingress) => {
                let call = ManagementCall {
                    caller: ManagementCaller::User(ingress.sender),
                    method: &ingress.method_name,
                    payload: &ingress.arg,
                    cycles: Cycles::ZERO,
                    stop_context: StopContext::Ingress {
                        sender: ingress.sender,
                        request_id: ingress.request_id,
                    },
                };
                let (outcome, _refund) = execute_management_call(
                    self.embedder.as_ref(),
                    &self.config,
                    &self.subnet,
                    state,
                    call,
                );
                let new_state = match outcome {
                    ManagementOutcome::Reply(data) => IngressState::Replied(data),
                    ManagementOutcome::Reject(error) => IngressState::Rejected(user_facing(error)),
                    ManagementOutcome::Deferred => IngressState::Processing,
                };
                set_ingress_state(
                    state,
                    ingress.request_id,
                    ingress.sender,
                    CanisterId::management(),
                    new_state,
                );
            }
            CanisterMessage::Request(request) => {
                let call = ManagementCall {
                    caller: ManagementCaller::Canister(request.sender),
                    method: &request.method_name,
                    payload: &request.method_payload,
                    cycles: request.payment,
                    stop_context: StopContext::Canister(request.clone()),
                };
                let (outcome, refund) = execute_management_call(
                    self.embedder.as_ref(),
                    &self.config,
                    &self.subnet,
                    state,
                    call,
                );
                // Deferred: the stop context or the pending `raw_rand` holds the request, and the
                // attached cycles are returned when it is answered (see `answer_stop_context`,
                // `answer_raw_rand_requests`).
                let payload = match outcome {
                    ManagementOutcome::Reply(data) => Payload::Data(data),
                    ManagementOutcome::Reject(error) => Payload::Reject {
                        code: error.code,
                        message: error.message,
                    },
                    ManagementOutcome::Deferred => return,
                };
                deliver_response(
                    state,
                    Response {
                        originator: request.sender,
                        respondent: CanisterId::management(),
                        originator_reply_callback: request.sender_reply_callback,
                        refund,
                        payload,
                        deadline: request.deadline,
                    },
                );
            }
            CanisterMessage::Response(response) => {
                // The management canister makes no calls; a response here can only be one the
                // management canister produced and queued for delivery.
                deliver_response(state, response);
            }
        }
    }

    /// Rejects `stop_canister` calls that waited past their deadline; their canisters stay
    /// stopping (a later `start_canister` or `stop_canister` decides what happens next).
    fn time_out_stops(&self, state: &mut ReplicatedState) {
        let now = state.metadata.time;
        let ids: Vec<CanisterId> = state
            .canisters
            .iter()
            .filter(|(_, c)| match &c.system_state.status {
                CanisterStatus::Stopping { stop_deadlines, .. } => {
                    stop_deadlines.iter().any(|deadline| *deadline <= now)
                }
                _ => false,
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            let Some(canister) = state.canister_mut(&id) else {
                continue;
            };
            let CanisterStatus::Stopping {
                stop_contexts,
                stop_deadlines,
            } = &mut canister.system_state.status
            else {
                continue;
            };
            let mut expired = Vec::new();
            let mut kept_contexts = Vec::new();
            let mut kept_deadlines = Vec::new();
            for (index, stop_context) in std::mem::take(stop_contexts).into_iter().enumerate() {
                // A context without a deadline (older state) never times out.
                let deadline = stop_deadlines.get(index).copied().unwrap_or(Time(u64::MAX));
                if deadline <= now {
                    expired.push(stop_context);
                } else {
                    kept_contexts.push(stop_context);
                    kept_deadlines.push(deadline);
                }
            }
            *stop_contexts = kept_contexts;
            *stop_deadlines = kept_deadlines;
            let open = canister
                .system_state
                .call_context_manager
                .call_contexts
                .len();
            for stop_context in expired {
                let error = UserError {
                    code: RejectCode::SysTransient,
                    message: format!(
                        "stop_canister for canister {} timed out after {} seconds: the canister still has {open} open call context(s) (calls it has not answered yet). It stays stopping; call stop_canister again to keep waiting, or start_canister to resume it.",
                        id.get(),
                        self.config.stop_canister_timeout_nanos / Time::NANOS_PER_SECOND
                    ),
                    error_code: None,
                };
                reject_stop_context(state, stop_context, error);
            }
        }
    }

    /// Turns stopping canisters without open call contexts into stopped ones and answers their
    /// stop requests.
    fn complete_stops(&self, state: &mut ReplicatedState) {
        let ready: Vec<CanisterId> = state
            .canisters
            .iter()
            .filter(|(_, c)| {
                matches!(c.system_state.status, CanisterStatus::Stopping { .. })
                    && c.system_state.call_context_manager.call_contexts.is_empty()
            })
            .map(|(id, _)| *id)
            .collect();
        for id in ready {
            let Some(canister) = state.canister_mut(&id) else {
                continue;
            };
            let previous =
                std::mem::replace(&mut canister.system_state.status, CanisterStatus::Stopped);
            let CanisterStatus::Stopping { stop_contexts, .. } = previous else {
                continue;
            };
            for stop_context in stop_contexts {
                answer_stop_context(state, stop_context);
            }
        }
    }

    // ---------------------------------------------------------------------------------------
    // Canister messages.

    fn execute_canister_message(
        &self,
        state: &mut ReplicatedState,
        id: CanisterId,
        message: CanisterMessage,
        counters: &mut RoundCounters,
    ) {
        match message {
            CanisterMessage::Ingress(ingress) => {
                let origin = CallOrigin::Ingress {
                    sender: ingress.sender,
                    request_id: ingress.request_id,
                };
                self.execute_call(
                    state,
                    id,
                    origin,
                    ingress.method_name,
                    ingress.arg,
                    Cycles::ZERO,
                    counters,
                );
            }
            CanisterMessage::Request(request) => {
                let origin = CallOrigin::Canister {
                    caller: request.sender,
                    callback_id: request.sender_reply_callback,
                    deadline: request.deadline,
                };
                self.execute_call(
                    state,
                    id,
                    origin,
                    request.method_name,
                    request.method_payload,
                    request.payment,
                    counters,
                );
            }
            CanisterMessage::Response(response) => {
                self.execute_response(state, id, response, counters);
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn execute_call(
        &self,
        state: &mut ReplicatedState,
        id: CanisterId,
        origin: CallOrigin,
        method: String,
        arg: Vec<u8>,
        payment: Cycles,
        counters: &mut RoundCounters,
    ) {
        let limit = self.config.max_instructions_per_update;
        let prepared = (|| {
            let canister = state
                .canister(&id)
                .ok_or_else(|| canister_not_found_error(&id))?;
            if let Some(error) = status_error(canister) {
                return Err(error);
            }
            let execution_state = canister
                .execution_state
                .as_ref()
                .ok_or_else(|| empty_canister_error(&id))?;
            let export_and_kind = match execution_state.module_info.methods.get(&method) {
                Some(MethodKind::Update) => (format!("canister_update {method}"), false),
                Some(MethodKind::Query) => (format!("canister_query {method}"), true),
                Some(MethodKind::CompositeQuery) => {
                    return Err(UserError::new(
                        ErrorCode::CanisterMethodNotExported,
                        format!(
                            "Canister {} method '{method}' is a composite query and can only be called as a query, not as an update.",
                            id.get()
                        ),
                    ));
                }
                None => return Err(method_not_found_error(&id, "update", &method)),
            };
            check_can_pay(&self.config, canister, execution_fee(&self.config, limit))?;
            Ok(export_and_kind)
        })();
        let (export, is_query) = match prepared {
            Ok(prepared) => prepared,
            Err(error) => {
                respond_to_origin(state, id, &origin, CallOutcome::Reject(error), payment);
                return;
            }
        };
        let caller = origin_caller(&origin);
        let deadline = origin_deadline(&origin);
        let request_id = match &origin {
            CallOrigin::Ingress { request_id, sender } => Some((*request_id, *sender)),
            _ => None,
        };
        let api_type = if is_query {
            ApiType::Query {
                caller,
                arg,
                replicated: true,
                data_certificate: None,
                cycles_available: payment,
            }
        } else {
            ApiType::Update {
                caller,
                arg,
                cycles_available: payment,
                deadline,
            }
        };
        let call_context_id = open_call_context(state, id, origin, payment, method);
        self.execute_and_apply(
            state,
            id,
            call_context_id,
            api_type,
            EntryPoint::Export(export),
            limit,
            ExecutionKind::Call,
            counters,
        );
        if let Some((request_id, sender)) = request_id {
            let still_open = state.canister(&id).is_some_and(|c| {
                c.system_state
                    .call_context_manager
                    .call_contexts
                    .contains_key(&call_context_id)
            });
            let not_started = state
                .ingress_history
                .get(&request_id)
                .is_some_and(|s| s.state == IngressState::Received);
            if still_open && not_started {
                set_ingress_state(state, request_id, sender, id, IngressState::Processing);
            }
        }
    }

    fn execute_response(
        &self,
        state: &mut ReplicatedState,
        id: CanisterId,
        response: Response,
        counters: &mut RoundCounters,
    ) {
        let Some(canister) = state.canister_mut(&id) else {
            return;
        };
        // The refund is the canister's whatever happens to the callback (it may have been
        // dropped by uninstall_code).
        canister.system_state.cycles_balance = canister
            .system_state
            .cycles_balance
            .saturating_add(response.refund);
        let manager = &mut canister.system_state.call_context_manager;
        let Some(callback) = manager
            .callbacks
            .remove(&response.originator_reply_callback)
        else {
            tracing::debug!(canister = %id.get(), "response for a dropped callback; refund kept");
            return;
        };
        let call_context_id = callback.call_context_id;
        let Some(call_context) = manager.call_contexts.get(&call_context_id).cloned() else {
            return;
        };
        if canister.execution_state.is_none() {
            // Uninstalled while the call was outstanding: nothing can run the callback.
            close_call_context_if_done(state, id, call_context_id, None);
            return;
        }
        let caller = origin_caller(&call_context.origin);
        let deadline = origin_deadline(&call_context.origin);
        let (closure, api_type, cleanup_code) = match response.payload {
            Payload::Data(data) => (
                callback.on_reply,
                ApiType::ReplyCallback {
                    caller,
                    reply: data,
                    refunded: response.refund,
                    cycles_available: call_context.available_cycles,
                    deadline,
                    in_composite_query: false,
                },
                0,
            ),
            Payload::Reject { code, message } => (
                callback.on_reject,
                ApiType::RejectCallback {
                    caller,
                    code,
                    message,
                    refunded: response.refund,
                    cycles_available: call_context.available_cycles,
                    deadline,
                    in_composite_query: false,
                },
                code.as_u64() as u32,
            ),
        };
        self.execute_and_apply(
            state,
            id,
            call_context_id,
            api_type,
            EntryPoint::Closure(closure),
            self.config.max_instructions_per_update,
            ExecutionKind::Callback {
                cleanup: callback.on_cleanup,
                cleanup_api: ApiType::Cleanup {
                    caller,
                    code: cleanup_code,
                    in_composite_query: false,
                },
            },
            counters,
        );
    }

    /// Runs one entry point of canister `id` for call context `call_context_id`, charges for it,
    /// applies its effects (or, on failure, runs the cleanup callback and records the error), and
    /// closes the call context when it is done. An execution that runs past one slice pauses: it
    /// goes on in later blocks, and its result is applied when it completes
    /// ([`Scheduler::finish_paused_slices`]).
    #[allow(clippy::too_many_arguments)]
    fn execute_and_apply(
        &self,
        state: &mut ReplicatedState,
        id: CanisterId,
        call_context_id: CallContextId,
        api_type: ApiType,
        entry_point: EntryPoint,
        instruction_limit: u64,
        kind: ExecutionKind,
        counters: &mut RoundCounters,
    ) {
        let time = state.metadata.time;
        // A query run replicated keeps only its system-state effects (accepted cycles, burned
        // cycles, the response): its heap, stable memory and globals are discarded.
        let is_query = matches!(api_type, ApiType::Query { .. });
        let prepay = execution_fee(&self.config, instruction_limit);
        let installed = state
            .canister(&id)
            .is_some_and(|c| c.execution_state.is_some());
        if !installed {
            // Nothing can run; answer the call context rather than leave it open.
            close_call_context_if_done(state, id, call_context_id, Some(empty_canister_error(&id)));
            return;
        }
        let Some(canister) = state.canister_mut(&id) else {
            return;
        };
        let prepaid = prepay.min(canister.system_state.cycles_balance);
        canister.system_state.cycles_balance =
            canister.system_state.cycles_balance.saturating_sub(prepaid);
        // No free instructions: an execution that could not prepay its whole budget (a callback
        // or cleanup of a canister whose balance ran low since it made the call) runs only the
        // instructions its prepayment covers, and fails with the instruction limit past them.
        let instruction_limit = if prepaid < prepay {
            instruction_limit.min(crate::common::affordable_instructions(
                &self.config,
                prepaid,
            ))
        } else {
            instruction_limit
        };
        let canister: &CanisterState = canister;
        let mut view = system_state_view(
            &self.config,
            &self.subnet,
            canister,
            time,
            canister.system_state.cycles_balance,
            true,
        );
        view.call_context_instructions = canister
            .system_state
            .call_context_manager
            .call_contexts
            .get(&call_context_id)
            .map_or(0, |context| context.instructions_executed);
        let plan = ExecutionPlan {
            call_context_id,
            api_type,
            entry_point,
            view,
            instruction_limit,
            prepaid,
            kind,
            is_query,
        };
        let slice = self.config.max_instructions_per_slice;
        let sliced = slice > 0
            && instruction_limit > slice
            && state.paused_executions.len() < self.config.max_paused_executions;
        // Most messages end within a slice: run it here, within one slice, which costs no thread
        // hand-off. Only one that runs past it starts again on a worker, in slices, and is known
        // (from the instruction count alone) not to end in its first.
        let first = if sliced { slice } else { instruction_limit };
        let Some(input) = self.plan_input(state, id, &plan, first) else {
            return;
        };
        let output = self.embedder.execute(input);
        let ran_past = sliced
            && matches!(
                output.result,
                Err(ExecutionError::InstructionLimitExceeded { .. })
            );
        if !ran_past {
            self.finish_execution(state, id, plan, output, 0, counters);
            return;
        }
        let Some(mut execution) = self.start_sliced(state, id, &plan) else {
            return;
        };
        // It goes on in the next blocks, and nothing else runs on this canister until it
        // completes.
        execution.grant(1 + SLICES_AHEAD);
        counters.instructions = counters.instructions.saturating_add(slice);
        let started_at = state.metadata.height;
        let input = postcard::to_allocvec(&plan)
            .expect("an execution plan always encodes (plain data, no maps with non-string keys)");
        state.paused_executions.insert(
            id,
            PausedExecution {
                started_at,
                slices_granted: 1,
                last_granted_at: started_at,
                input,
            },
        );
        self.running().insert(
            id,
            RunningExecution {
                started_at,
                granted: 1,
                execution,
            },
        );
    }

    /// The embedder's input for `plan` on canister `id`'s wasm state, within `limit`
    /// instructions. `None` if the canister has no code.
    fn plan_input<'s>(
        &self,
        state: &'s ReplicatedState,
        id: CanisterId,
        plan: &ExecutionPlan,
        limit: u64,
    ) -> Option<openic_embedders::WasmExecutionInput<'s>> {
        let canister = state.canister(&id)?;
        let execution_state = canister.execution_state.as_ref()?;
        Some(crate::common::execution_input(
            &self.config,
            canister,
            execution_state,
            plan.api_type.clone(),
            plan.entry_point.clone(),
            plan.view.clone(),
            limit,
        ))
    }

    /// Starts `plan` on a worker, in slices. `None` if the canister has no code.
    fn start_sliced(
        &self,
        state: &ReplicatedState,
        id: CanisterId,
        plan: &ExecutionPlan,
    ) -> Option<Box<dyn SlicedExecution>> {
        let input = self.plan_input(state, id, plan, plan.instruction_limit)?;
        Some(Arc::clone(&self.embedder).start_sliced(input, self.config.max_instructions_per_slice))
    }

    fn running(&self) -> std::sync::MutexGuard<'_, BTreeMap<CanisterId, RunningExecution>> {
        self.running.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Charges for a finished execution and applies its result (see
    /// [`Scheduler::execute_and_apply`]). `counted` instructions of it were already counted
    /// against earlier rounds.
    fn finish_execution(
        &self,
        state: &mut ReplicatedState,
        id: CanisterId,
        plan: ExecutionPlan,
        mut output: WasmExecutionOutput,
        counted: u64,
        counters: &mut RoundCounters,
    ) {
        let ExecutionPlan {
            call_context_id,
            instruction_limit,
            prepaid,
            kind,
            is_query,
            ..
        } = plan;
        // Every replicated execution logs, also one that traps (spec: `canister_logs`).
        record_logs(state, id, std::mem::take(&mut output.debug_prints));
        let used = output.instructions_used.min(instruction_limit);
        counters.instructions = counters
            .instructions
            .saturating_add(used.saturating_sub(counted));
        let fee = execution_fee(&self.config, used).min(prepaid);
        if let Some(canister) = state.canister_mut(&id) {
            canister.system_state.cycles_balance = canister
                .system_state
                .cycles_balance
                .saturating_add(prepaid.saturating_sub(fee));
            if let Some(context) = canister
                .system_state
                .call_context_manager
                .call_contexts
                .get_mut(&call_context_id)
            {
                context.instructions_executed = context.instructions_executed.saturating_add(used);
            }
        }
        state.metadata.burn_cycles(fee);

        let failure = match self.apply_output(state, id, call_context_id, output, is_query) {
            Ok(()) => None,
            Err(error) => {
                if let ExecutionKind::Callback {
                    cleanup: Some(cleanup),
                    cleanup_api,
                } = kind
                {
                    self.run_cleanup(state, id, cleanup, cleanup_api, counters);
                }
                Some(execution_error_to_user(&id, &error))
            }
        };
        close_call_context_if_done(state, id, call_context_id, failure);
    }

    // ---------------------------------------------------------------------------------------
    // Sliced executions (see Note [sliced executions] in the embedder).

    /// Makes the running executions match the state's records: drops those the state does not
    /// have (or has at an earlier point), and starts those it has and this node does not run
    /// (after a restart from a checkpoint taken while they ran), running each again from its
    /// start through the slices it was granted, which reaches the same point as before.
    fn reconcile_paused(&self, state: &ReplicatedState) {
        let mut running = self.running();
        running.retain(|id, execution| {
            state.paused_executions.get(id).is_some_and(|record| {
                record.started_at == execution.started_at
                    && record.slices_granted == execution.granted
            })
        });
        for (id, record) in &state.paused_executions {
            if running.contains_key(id) {
                continue;
            }
            let plan: ExecutionPlan = match postcard::from_bytes(&record.input) {
                Ok(plan) => plan,
                Err(error) => {
                    // Only this crate writes records; one that does not decode is a bug, and
                    // guessing would fork the subnet, so the node stops.
                    panic!(
                        "the paused execution of canister {} does not decode: {error}",
                        id.get()
                    );
                }
            };
            let Some(mut execution) = self.start_sliced(state, *id, &plan) else {
                panic!(
                    "the paused execution of canister {} has no code to run on",
                    id.get()
                );
            };
            tracing::info!(canister = %id.get(), slices = record.slices_granted, "resuming a paused execution: running it again through the slices it had");
            if let Some(output) = execution.wait(record.slices_granted) {
                // It ends within the slices granted: it used exactly one slice, so its first
                // try ran out of instructions at the last one (see `execute_and_apply`). It
                // completes when the next slice is granted, as it does on every replica.
                execution = Box::new(FinishedExecution::new(
                    output,
                    self.config.max_instructions_per_slice,
                ));
            }
            execution.grant(record.slices_granted + SLICES_AHEAD);
            running.insert(
                *id,
                RunningExecution {
                    started_at: record.started_at,
                    granted: record.slices_granted,
                    execution,
                },
            );
        }
    }

    /// Grants the next slice to the paused executions that waited longest for one (at most
    /// `max_paused_slices_per_round`), which run on their worker threads while this block's
    /// other messages execute. Returns the canisters granted, for
    /// [`Scheduler::finish_paused_slices`].
    fn grant_paused_slices(
        &self,
        state: &mut ReplicatedState,
        counters: &mut RoundCounters,
    ) -> Vec<CanisterId> {
        self.reconcile_paused(state);
        if state.paused_executions.is_empty() {
            return Vec::new();
        }
        let mut waiting: Vec<(Height, CanisterId)> = state
            .paused_executions
            .iter()
            .map(|(id, record)| (record.last_granted_at, *id))
            .collect();
        waiting.sort();
        waiting.truncate(self.config.max_paused_slices_per_round.max(1));
        // A paused execution that nothing else waits for gets several slices in one block: the
        // same work in fewer blocks, each of which costs a log write and a signature.
        let step = if state.paused_executions.len() == 1 && !has_queued_messages(state) {
            self.config.slices_per_round_when_alone.max(1)
        } else {
            1
        };
        let height = state.metadata.height;
        let mut running = self.running();
        let mut granted = Vec::with_capacity(waiting.len());
        for (_, id) in waiting {
            let (Some(record), Some(execution)) =
                (state.paused_executions.get_mut(&id), running.get_mut(&id))
            else {
                continue;
            };
            record.slices_granted += step;
            record.last_granted_at = height;
            execution.granted = record.slices_granted;
            execution
                .execution
                .grant(record.slices_granted + SLICES_AHEAD);
            counters.instructions = counters
                .instructions
                .saturating_add(step.saturating_mul(self.config.max_instructions_per_slice));
            granted.push(id);
        }
        granted
    }

    /// Waits for the slices [`Scheduler::grant_paused_slices`] granted, and applies the
    /// executions that complete in them, in canister order.
    fn finish_paused_slices(
        &self,
        state: &mut ReplicatedState,
        granted: Vec<CanisterId>,
        counters: &mut RoundCounters,
    ) {
        let slice = self.config.max_instructions_per_slice;
        for id in granted {
            let Some(slices) = state.paused_executions.get(&id).map(|r| r.slices_granted) else {
                continue;
            };
            let output = match self.running().get_mut(&id) {
                Some(execution) => execution.execution.wait(slices),
                None => continue,
            };
            let Some(output) = output else {
                continue;
            };
            self.running().remove(&id);
            let Some(record) = state.paused_executions.remove(&id) else {
                continue;
            };
            let plan: ExecutionPlan = postcard::from_bytes(&record.input)
                .expect("checked when the execution was resumed");
            // Every granted slice was counted when it was granted.
            let counted = slices.saturating_mul(slice);
            self.finish_execution(state, id, plan, output, counted, counters);
        }
    }

    /// Whether a management message must wait because the canister it is about has a paused
    /// execution (which assumes nothing else changes the canister's code, memory, settings or
    /// status until it completes). Reading its status and adding cycles do not wait.
    fn waits_for_paused(&self, state: &ReplicatedState, message: &CanisterMessage) -> bool {
        const NEVER_WAIT: [&str; 4] = [
            "canister_status",
            "canister_info",
            "deposit_cycles",
            "provisional_top_up_canister",
        ];
        if state.paused_executions.is_empty() {
            return false;
        }
        let (method, payload) = match message {
            CanisterMessage::Ingress(ingress) => (&ingress.method_name, &ingress.arg),
            CanisterMessage::Request(request) => (&request.method_name, &request.method_payload),
            CanisterMessage::Response(_) => return false,
        };
        if NEVER_WAIT.contains(&method.as_str()) {
            return false;
        }
        crate::management::management_target(method, payload)
            .is_some_and(|target| state.paused_executions.contains_key(&target))
    }

    /// Applies a successful execution's effects. Returns the error (and applies nothing) if the
    /// execution failed or broke a rule only the scheduler can check. For a query
    /// (`is_query`, run replicated) the wasm state is not written back and `canister_version`
    /// does not change: the spec discards a query's state changes even in replicated mode.
    fn apply_output(
        &self,
        state: &mut ReplicatedState,
        id: CanisterId,
        call_context_id: CallContextId,
        output: WasmExecutionOutput,
        is_query: bool,
    ) -> Result<(), ExecutionError> {
        let (new_state, response, changes) = output.result?;
        let time = state.metadata.time;
        let Some(canister) = state.canister(&id) else {
            return Ok(());
        };
        let context = canister
            .system_state
            .call_context_manager
            .call_contexts
            .get(&call_context_id);
        let responded = context.is_none_or(|c| c.responded);
        let available = context.map_or(Cycles::ZERO, |c| c.available_cycles);
        let is_system_task = context.is_none_or(|c| c.origin == CallOrigin::SystemTask);
        if response.is_some() && responded {
            return Err(ExecutionError::ContractViolation(
                "msg_reply or msg_reject called, but this call was already answered".into(),
            ));
        }
        if response.is_some() && is_system_task {
            return Err(ExecutionError::ContractViolation(
                "a system task (heartbeat, timer) cannot reply".into(),
            ));
        }
        let response_len = match &response {
            Some(WasmResponse::Reply(data)) => data.len() as u64,
            Some(WasmResponse::Reject(message)) => message.len() as u64,
            None => 0,
        };
        if response_len > self.config.max_response_bytes_replicated {
            return Err(ExecutionError::ContractViolation(format!(
                "response of {response_len} bytes exceeds the limit of {} bytes",
                self.config.max_response_bytes_replicated
            )));
        }
        if changes.cycles_accepted > available {
            return Err(ExecutionError::ContractViolation(format!(
                "accepted {} cycles but only {} were available",
                changes.cycles_accepted, available
            )));
        }
        if let Some(call) = changes
            .calls
            .iter()
            .find(|c| c.payload.len() as u64 > self.config.max_inter_canister_payload_bytes)
        {
            return Err(ExecutionError::ContractViolation(format!(
                "call to {} of {} bytes exceeds the inter-canister payload limit of {} bytes",
                call.method_name,
                call.payload.len(),
                self.config.max_inter_canister_payload_bytes
            )));
        }
        let low_memory_before = canister
            .execution_state
            .as_ref()
            .is_some_and(|e| low_wasm_memory_condition(canister, e.wasm_memory_size_pages));
        let low_memory_after =
            low_wasm_memory_condition(canister, new_state.wasm_memory_size_pages);
        // Memory the execution added pays its storage ahead on a subnet above its memory
        // threshold (`reservation`); if it cannot, the execution fails and changes nothing.
        let growth = if is_query {
            None
        } else {
            memory_growth(canister, &new_state, state.snapshots.size_of(&id))
        };
        let reveal_top_up = context.is_some_and(|c| {
            let caller = match &c.origin {
                CallOrigin::Ingress { sender, .. } => Some(*sender),
                CallOrigin::Canister { caller, .. } => Some(caller.get()),
                _ => None,
            };
            caller.is_some_and(|caller| canister.system_state.controllers.contains(&caller))
        });
        // Checked against what the message leaves spendable (accepted cycles in, burned cycles
        // and its calls' payments and fees out), so a reservation never starves its own calls;
        // the cycles move once accepted and burned cycles are applied, below.
        let mut reservation_cycles = Cycles::ZERO;
        if let Some((before, after)) = growth {
            let allocated = reservation::allocated_bytes(
                before,
                after,
                canister.system_state.settings.memory_allocation,
            );
            reservation_cycles = reservation::storage_reservation_cycles(
                &self.config,
                allocated,
                reservation::subnet_memory_usage(state),
            );
            let outgoing = changes.calls.iter().fold(Cycles::ZERO, |sum, call| {
                sum.saturating_add(call.cycles).saturating_add(call_fee(
                    &self.config,
                    &call.method_name,
                    call.payload.len(),
                ))
            });
            let spendable = canister
                .system_state
                .cycles_balance
                .saturating_add(changes.cycles_accepted)
                .saturating_sub(changes.cycles_burned)
                .saturating_sub(outgoing);
            reservation::check_reserve(
                spendable,
                canister.system_state.reserved_balance,
                canister.system_state.settings.reserved_cycles_limit,
                reservation_cycles,
            )
            .map_err(|error| {
                reservation::memory_grow_error(error, after - before, reveal_top_up)
            })?;
        }

        let canister = state.canister_mut(&id).expect("checked above");
        if !is_query {
            if let Some(execution_state) = canister.execution_state.as_mut() {
                execution_state.wasm_memory = new_state.wasm_memory;
                execution_state.wasm_memory_size_pages = new_state.wasm_memory_size_pages;
                execution_state.stable_memory = new_state.stable_memory;
                execution_state.stable_memory_size_pages = new_state.stable_memory_size_pages;
                execution_state.globals = new_state.globals;
            }
            // Level-triggered as on the IC: due once the condition starts to hold, dropped if it
            // stops holding before the hook ran.
            if !low_memory_after {
                canister.system_state.low_wasm_memory_hook_pending = false;
            } else if !low_memory_before {
                canister.system_state.low_wasm_memory_hook_pending = true;
            }
            let system_state = &mut canister.system_state;
            system_state.canister_version = system_state.canister_version.saturating_add(1);
        }
        let system_state = &mut canister.system_state;
        let SystemStateChanges {
            calls,
            cycles_accepted,
            cycles_burned,
            certified_data,
            global_timer_nanos,
            message_accepted: _,
        } = changes;
        system_state.cycles_balance = system_state.cycles_balance.saturating_add(cycles_accepted);
        let burned = cycles_burned.min(system_state.cycles_balance);
        system_state.cycles_balance = system_state.cycles_balance.saturating_sub(burned);
        // Checked above: the balance holds it and the calls' payments after it.
        let reserved = reservation_cycles.min(system_state.cycles_balance);
        system_state.cycles_balance = system_state.cycles_balance.saturating_sub(reserved);
        system_state.reserved_balance = system_state.reserved_balance.saturating_add(reserved);
        if let Some(data) = certified_data {
            system_state.certified_data = data;
        }
        if let Some(timer) = global_timer_nanos {
            system_state.global_timer_nanos = timer;
        }
        if let Some(context) = system_state
            .call_context_manager
            .call_contexts
            .get_mut(&call_context_id)
        {
            context.available_cycles = context.available_cycles.saturating_sub(cycles_accepted);
        }
        state.metadata.burn_cycles(burned);

        for call in calls {
            self.send_call(state, id, call_context_id, call, time);
        }

        if let Some(response) = response {
            let outcome = match response {
                WasmResponse::Reply(data) => CallOutcome::Reply(data),
                WasmResponse::Reject(message) => {
                    CallOutcome::Reject(canister_reject_error(message))
                }
            };
            respond_call_context(state, id, call_context_id, outcome);
        }
        Ok(())
    }

    /// Registers a callback for `call`, charges for it and routes the request. A call that cannot
    /// be sent is answered at once with a reject response to the caller.
    fn send_call(
        &self,
        state: &mut ReplicatedState,
        id: CanisterId,
        call_context_id: CallContextId,
        call: openic_embedders::OutgoingCall,
        time: Time,
    ) {
        let fee = call_fee(&self.config, &call.method_name, call.payload.len());
        let deadline = call.timeout_seconds.map(|seconds| {
            let seconds = seconds.min(self.config.max_call_timeout_seconds);
            time.saturating_add_nanos(u64::from(seconds) * Time::NANOS_PER_SECOND)
        });
        let Some(canister) = state.canister_mut(&id) else {
            return;
        };
        let system_state = &mut canister.system_state;
        let manager = &mut system_state.call_context_manager;
        let callback_id = CallbackId(manager.next_callback_id);
        manager.next_callback_id += 1;
        manager.callbacks.insert(
            callback_id,
            Callback {
                call_context_id,
                respondent: call.callee,
                cycles_sent: call.cycles,
                on_reply: call.on_reply,
                on_reject: call.on_reject,
                on_cleanup: call.on_cleanup,
                deadline,
            },
        );
        let needed = call.cycles.saturating_add(fee);
        if system_state.cycles_balance < needed {
            let message = format!(
                "Canister {} could not pay {needed} cycles (attached cycles plus the call fee) to call {} on {}; top it up with provisional_top_up_canister or deposit_cycles.",
                id.get(),
                call.method_name,
                call.callee.get()
            );
            deliver_response(
                state,
                Response {
                    originator: id,
                    respondent: call.callee,
                    originator_reply_callback: callback_id,
                    refund: Cycles::ZERO,
                    payload: Payload::Reject {
                        code: RejectCode::SysTransient,
                        message,
                    },
                    deadline,
                },
            );
            return;
        }
        system_state.cycles_balance = system_state.cycles_balance.saturating_sub(needed);
        state.metadata.burn_cycles(fee);
        let request = Request {
            sender: id,
            receiver: call.callee,
            sender_reply_callback: callback_id,
            method_name: call.method_name,
            method_payload: call.payload,
            payment: call.cycles,
            deadline,
        };
        self.route_request(state, request);
    }

    /// Delivers a request to its receiver's queue, or answers it with a reject if it cannot be
    /// delivered (no such canister, queue full).
    fn route_request(&self, state: &mut ReplicatedState, request: Request) {
        let reject = |request: &Request, code: RejectCode, message: String| Response {
            originator: request.sender,
            respondent: request.receiver,
            originator_reply_callback: request.sender_reply_callback,
            refund: request.payment,
            payload: Payload::Reject { code, message },
            deadline: request.deadline,
        };
        // The management canister answers as `aaaaa-aa` and as the subnet's own id (as on the IC,
        // where a subnet's id routes to its management canister).
        if request.receiver.is_management() || request.receiver.get() == self.subnet.subnet_id.0 {
            if state.subnet_queue.len() >= self.config.max_subnet_queue_len {
                let response = reject(
                    &request,
                    RejectCode::SysTransient,
                    "the management canister's queue is full; retry later".into(),
                );
                deliver_response(state, response);
            } else {
                state
                    .subnet_queue
                    .push_back(CanisterMessage::Request(request));
            }
            return;
        }
        let max_queue = self.config.max_canister_input_queue_len;
        match state.canister_mut(&request.receiver) {
            None => {
                let message = canister_not_found_error(&request.receiver).message;
                let response = reject(&request, RejectCode::DestinationInvalid, message);
                deliver_response(state, response);
            }
            Some(callee) if callee.system_state.input_queue.len() >= max_queue => {
                let message = queue_full_error(&request.receiver).message;
                let response = reject(&request, RejectCode::SysTransient, message);
                deliver_response(state, response);
            }
            Some(callee) => callee
                .system_state
                .input_queue
                .push_back(CanisterMessage::Request(request)),
        }
    }

    fn run_cleanup(
        &self,
        state: &mut ReplicatedState,
        id: CanisterId,
        cleanup: WasmClosure,
        api_type: ApiType,
        counters: &mut RoundCounters,
    ) {
        let time = state.metadata.time;
        let Some(canister) = state.canister(&id) else {
            return;
        };
        let Some(execution_state) = canister.execution_state.as_ref() else {
            return;
        };
        let view = system_state_view(
            &self.config,
            &self.subnet,
            canister,
            time,
            canister.system_state.cycles_balance,
            false,
        );
        // As for other executions: no more instructions than the balance pays for.
        let affordable = crate::common::affordable_instructions(
            &self.config,
            canister.system_state.cycles_balance,
        );
        let mut output = self.embedder.execute(crate::common::execution_input(
            &self.config,
            canister,
            execution_state,
            api_type,
            EntryPoint::Closure(cleanup),
            view,
            self.config.max_instructions_per_update.min(affordable),
        ));
        record_logs(state, id, std::mem::take(&mut output.debug_prints));
        let used = output.instructions_used;
        counters.instructions = counters.instructions.saturating_add(used);
        let fee = execution_fee(&self.config, used);
        // Memory the cleanup added reserves cycles as any execution's does; if it cannot, the
        // cleanup fails like a trap and its changes are dropped.
        let growth = match (&output.result, state.canister(&id)) {
            (Ok((new_state, _, _)), Some(canister)) => {
                memory_growth(canister, new_state, state.snapshots.size_of(&id))
            }
            _ => None,
        };
        let subnet_usage = growth.map(|_| reservation::subnet_memory_usage(state));
        let Some(canister) = state.canister_mut(&id) else {
            return;
        };
        let charged = fee.min(canister.system_state.cycles_balance);
        canister.system_state.cycles_balance =
            canister.system_state.cycles_balance.saturating_sub(charged);
        if let (Some((before, after)), Some(subnet_usage)) = (growth, subnet_usage)
            && let Err(error) =
                reservation::reserve_for_growth(&self.config, canister, subnet_usage, before, after)
        {
            output.result = Err(reservation::memory_grow_error(error, after - before, false));
        }
        match output.result {
            Ok((new_state, _, changes)) => {
                if let Some(execution_state) = canister.execution_state.as_mut() {
                    execution_state.wasm_memory = new_state.wasm_memory;
                    execution_state.wasm_memory_size_pages = new_state.wasm_memory_size_pages;
                    execution_state.stable_memory = new_state.stable_memory;
                    execution_state.stable_memory_size_pages = new_state.stable_memory_size_pages;
                    execution_state.globals = new_state.globals;
                }
                let system_state = &mut canister.system_state;
                system_state.canister_version = system_state.canister_version.saturating_add(1);
                let burned = changes.cycles_burned.min(system_state.cycles_balance);
                system_state.cycles_balance = system_state.cycles_balance.saturating_sub(burned);
                if let Some(timer) = changes.global_timer_nanos {
                    system_state.global_timer_nanos = timer;
                }
                state.metadata.burn_cycles(burned.saturating_add(charged));
            }
            Err(error) => {
                tracing::debug!(canister = %id.get(), %error, "cleanup callback failed");
                state.metadata.burn_cycles(charged);
            }
        }
    }
}

impl BlockExecutor for Scheduler {
    fn execute_block(
        &mut self,
        state: &mut ReplicatedState,
        block: &Block,
    ) -> BlockExecutionSummary {
        let _span = tracing::debug_span!("execute_block", height = block.height.0).entered();
        let previous_time = state.metadata.time;
        state.metadata.height = block.height;
        // Time never goes backwards, even if a block's time does (consensus should prevent it).
        state.metadata.time = block.time.max(previous_time);
        let mut hasher = Sha256::new();
        hasher.update(state.metadata.random_seed);
        hasher.update(block.height.0.to_be_bytes());
        // A subnet's random beacon (all zero on a one-replica subnet, whose blocks logged before
        // the beacon existed must replay to the same seeds, so zero adds nothing).
        if block.randomness != [0; 32] {
            hasher.update(block.randomness);
        }
        state.metadata.random_seed = hasher.finalize().into();
        for answer in crate::management::answer_raw_rand_requests(state) {
            deliver_response(state, answer);
        }

        let now = state.metadata.time;
        self.prune_ingress_history(state, now);
        self.charge_storage(state, now);
        crate::management::uninstall_out_of_cycles(state);
        expire_callbacks(state, now);
        let ingress_inducted = self.induct_ingress(state, block);
        let mut counters = RoundCounters::default();
        // Paused executions run their next slice on their threads while this block's other
        // messages execute, and complete (if they do) at its end.
        let granted = self.grant_paused_slices(state, &mut counters);
        self.run_system_tasks(state, previous_time, &mut counters);
        self.run_messages(state, &mut counters);
        self.finish_paused_slices(state, granted, &mut counters);
        self.complete_stops(state);

        BlockExecutionSummary {
            ingress_inducted,
            messages_executed: counters.messages,
            instructions_executed: counters.instructions,
            work_pending: has_queued_messages(state) || !state.paused_executions.is_empty(),
        }
    }

    /// Queued messages, due global timers and pending low-memory hooks need a block at once.
    /// Heartbeats do not: they run in every block, and the node makes an idle block every
    /// `idle_block_interval` (about the IC's heartbeat rate), so a canister exporting
    /// `canister_heartbeat` does not make the node produce blocks back to back. Nor does a due
    /// timer of a canister that cannot pay to run it (it waits for a top-up and the next idle
    /// block), so such a canister does not make the node spin.
    fn has_pending_work(&self, state: &ReplicatedState) -> bool {
        let now = state.metadata.time.as_nanos_since_unix_epoch();
        let prepay = execution_fee(&self.config, self.config.max_instructions_per_update);
        has_queued_messages(state)
            || !state.paused_executions.is_empty()
            || !state.raw_rand_requests.is_empty()
            || state.canisters.values().any(|c| {
                c.system_state.status == CanisterStatus::Running
                    && check_can_pay(&self.config, c, prepay).is_ok()
                    && c.execution_state.as_ref().is_some_and(|e| {
                        let exports = &e.module_info.system_methods;
                        (c.system_state.low_wasm_memory_hook_pending
                            && exports.contains(LOW_WASM_MEMORY_EXPORT))
                            || (c.system_state.global_timer_nanos != 0
                                && c.system_state.global_timer_nanos <= now
                                && exports.contains(GLOBAL_TIMER_EXPORT))
                    })
            })
    }
}

// -------------------------------------------------------------------------------------------
// State helpers (free functions: they need only the state).

/// The reject message of a bounded-wait call whose deadline passed without a response.
pub const DEADLINE_EXPIRED_MESSAGE: &str = "Call deadline has expired.";

/// Answers every bounded-wait call whose deadline has passed and whose response has not arrived
/// with a `SYS_UNKNOWN` reject ("deadline expired"), queued like any response, so the caller is
/// never held up past the deadline by a slow or hostile callee. The expired callback's `deadline`
/// becomes `None` (it has been answered); the real response, if it comes later, finds no callback
/// and is dropped, its refund still credited (`execute_response`), so no cycles are lost or made.
/// Responses already queued when the deadline passes are delivered as they are.
fn expire_callbacks(state: &mut ReplicatedState, now: Time) {
    let ids: Vec<CanisterId> = state
        .canisters
        .iter()
        .filter(|(_, c)| {
            c.system_state
                .call_context_manager
                .callbacks
                .values()
                .any(|callback| callback.deadline.is_some_and(|deadline| deadline <= now))
        })
        .map(|(id, _)| *id)
        .collect();
    for id in ids {
        let Some(canister) = state.canister_mut(&id) else {
            continue;
        };
        let system_state = &mut canister.system_state;
        let answered: BTreeSet<CallbackId> = system_state
            .input_queue
            .iter()
            .filter_map(|message| match message {
                CanisterMessage::Response(response) => Some(response.originator_reply_callback),
                _ => None,
            })
            .collect();
        let mut expired = Vec::new();
        for (callback_id, callback) in system_state.call_context_manager.callbacks.iter_mut() {
            let Some(deadline) = callback.deadline else {
                continue;
            };
            if deadline > now || answered.contains(callback_id) {
                continue;
            }
            callback.deadline = None;
            expired.push(Response {
                originator: id,
                respondent: callback.respondent,
                originator_reply_callback: *callback_id,
                refund: Cycles::ZERO,
                payload: Payload::Reject {
                    code: RejectCode::SysUnknown,
                    message: DEADLINE_EXPIRED_MESSAGE.to_string(),
                },
                deadline: Some(deadline),
            });
        }
        for response in expired {
            tracing::debug!(
                canister = %id.get(),
                callback = response.originator_reply_callback.0,
                "bounded-wait call timed out"
            );
            system_state
                .input_queue
                .push_back(CanisterMessage::Response(response));
        }
    }
}

fn has_queued_messages(state: &ReplicatedState) -> bool {
    !state.subnet_queue.is_empty()
        || state
            .canisters
            .values()
            .any(|c| !c.system_state.input_queue.is_empty())
}

/// Code 2 (retry later) with the queue-full error code.
fn queue_full_error(canister_id: &CanisterId) -> UserError {
    UserError {
        code: RejectCode::SysTransient,
        message: format!(
            "Canister {} has too many messages waiting in its queue; retry shortly.",
            canister_id.get()
        ),
        error_code: Some(ErrorCode::CanisterQueueFull),
    }
}

/// Reject code 6 exists only between canisters: users see 2 instead.
fn user_facing(mut error: UserError) -> UserError {
    error.code = error.code.for_user();
    error
}

fn origin_caller(origin: &CallOrigin) -> UserId {
    match origin {
        CallOrigin::Ingress { sender, .. } => *sender,
        CallOrigin::Canister { caller, .. } => caller.get(),
        CallOrigin::SystemTask => Principal::management_canister(),
    }
}

fn origin_deadline(origin: &CallOrigin) -> u64 {
    match origin {
        CallOrigin::Canister {
            deadline: Some(deadline),
            ..
        } => deadline.as_nanos_since_unix_epoch(),
        _ => 0,
    }
}

fn open_call_context(
    state: &mut ReplicatedState,
    id: CanisterId,
    origin: CallOrigin,
    available_cycles: Cycles,
    method_name: String,
) -> CallContextId {
    let canister = state
        .canister_mut(&id)
        .expect("the caller checked that the canister exists");
    let manager = &mut canister.system_state.call_context_manager;
    let call_context_id = CallContextId(manager.next_call_context_id);
    manager.next_call_context_id += 1;
    manager.call_contexts.insert(
        call_context_id,
        CallContext {
            origin,
            responded: false,
            available_cycles,
            instructions_executed: 0,
            method_name,
        },
    );
    call_context_id
}

/// Records the response of a call context (once) and sends it to the origin with the cycles not
/// accepted.
fn respond_call_context(
    state: &mut ReplicatedState,
    id: CanisterId,
    call_context_id: CallContextId,
    outcome: CallOutcome,
) {
    let Some(canister) = state.canister_mut(&id) else {
        return;
    };
    let Some(context) = canister
        .system_state
        .call_context_manager
        .call_contexts
        .get_mut(&call_context_id)
    else {
        return;
    };
    if context.responded {
        return;
    }
    context.responded = true;
    let refund = std::mem::take(&mut context.available_cycles);
    let origin = context.origin.clone();
    respond_to_origin(state, id, &origin, outcome, refund);
}

/// Closes the call context if it has no outstanding callbacks; if it was never answered, answers
/// it with `failure` (the execution's error) or "did not reply".
fn close_call_context_if_done(
    state: &mut ReplicatedState,
    id: CanisterId,
    call_context_id: CallContextId,
    failure: Option<UserError>,
) {
    let Some(canister) = state.canister(&id) else {
        return;
    };
    let manager = &canister.system_state.call_context_manager;
    let Some(context) = manager.call_contexts.get(&call_context_id) else {
        return;
    };
    let outstanding = manager
        .callbacks
        .values()
        .any(|c| c.call_context_id == call_context_id);
    if outstanding {
        return;
    }
    if !context.responded {
        let error = failure.unwrap_or_else(|| did_not_reply_error(&id));
        if context.origin == CallOrigin::SystemTask {
            tracing::debug!(canister = %id.get(), %error, "system task failed");
        }
        respond_call_context(state, id, call_context_id, CallOutcome::Reject(error));
    }
    if let Some(canister) = state.canister_mut(&id)
        && let Some(context) = canister
            .system_state
            .call_context_manager
            .call_contexts
            .remove(&call_context_id)
    {
        // Cycles still in the context (none after a response took them as refund) go back.
        canister.system_state.cycles_balance = canister
            .system_state
            .cycles_balance
            .saturating_add(context.available_cycles);
    }
}

/// Sends `outcome` to whoever made the call: the ingress history for users, a response for
/// canisters, nobody for system tasks.
fn respond_to_origin(
    state: &mut ReplicatedState,
    respondent: CanisterId,
    origin: &CallOrigin,
    outcome: CallOutcome,
    refund: Cycles,
) {
    match origin {
        CallOrigin::Ingress { sender, request_id } => {
            let new_state = match outcome {
                CallOutcome::Reply(data) => IngressState::Replied(data),
                CallOutcome::Reject(error) => IngressState::Rejected(user_facing(error)),
            };
            set_ingress_state(state, *request_id, *sender, respondent, new_state);
        }
        CallOrigin::Canister {
            caller,
            callback_id,
            deadline,
        } => deliver_response(
            state,
            Response {
                originator: *caller,
                respondent,
                originator_reply_callback: *callback_id,
                refund,
                payload: outcome.into_payload(),
                deadline: *deadline,
            },
        ),
        CallOrigin::SystemTask => {}
    }
}

/// Puts a response into its originator's input queue (responses are never refused for space:
/// each had a request). A response to a canister that no longer exists is dropped.
fn deliver_response(state: &mut ReplicatedState, response: Response) {
    match state.canister_mut(&response.originator) {
        Some(originator) => originator
            .system_state
            .input_queue
            .push_back(CanisterMessage::Response(response)),
        None => tracing::debug!(
            originator = %response.originator.get(),
            "response to a deleted canister dropped"
        ),
    }
}

/// Answers a waiting `stop_canister` call with `error`.
fn reject_stop_context(state: &mut ReplicatedState, stop_context: StopContext, error: UserError) {
    match stop_context {
        StopContext::Ingress { sender, request_id } => set_ingress_state(
            state,
            request_id,
            sender,
            CanisterId::management(),
            IngressState::Rejected(error),
        ),
        StopContext::Canister(request) => deliver_response(
            state,
            management_response(
                request,
                Payload::Reject {
                    code: error.code,
                    message: error.message,
                },
            ),
        ),
    }
}

/// Answers a `stop_canister` call once the canister is stopped.
fn answer_stop_context(state: &mut ReplicatedState, stop_context: StopContext) {
    match stop_context {
        StopContext::Ingress { sender, request_id } => set_ingress_state(
            state,
            request_id,
            sender,
            CanisterId::management(),
            IngressState::Replied(EMPTY_CANDID_REPLY.to_vec()),
        ),
        StopContext::Canister(request) => deliver_response(
            state,
            management_response(request, Payload::Data(EMPTY_CANDID_REPLY.to_vec())),
        ),
    }
}

/// The charged memory of `canister` (`snapshot_bytes` included) before and after `new_state`
/// replaces its memories, if it grew.
fn memory_growth(
    canister: &CanisterState,
    new_state: &openic_embedders::NewExecutionState,
    snapshot_bytes: u64,
) -> Option<(u64, u64)> {
    let execution_state = canister.execution_state.as_ref()?;
    let pages_before = execution_state
        .wasm_memory_size_pages
        .saturating_add(execution_state.stable_memory_size_pages);
    let pages_after = new_state
        .wasm_memory_size_pages
        .saturating_add(new_state.stable_memory_size_pages);
    if pages_after <= pages_before {
        return None;
    }
    let before = crate::common::memory_usage_bytes(canister).saturating_add(snapshot_bytes);
    let after = before.saturating_add((pages_after - pages_before).saturating_mul(WASM_PAGE_SIZE));
    Some((before, after))
}

/// Appends what an execution printed (and its trap message) to the canister's log, and to the
/// node's debug trace.
fn record_logs(state: &mut ReplicatedState, id: CanisterId, lines: Vec<Vec<u8>>) {
    for line in &lines {
        tracing::debug!(canister = %id.get(), "{}", String::from_utf8_lossy(line));
    }
    state.append_log(id, lines);
}

/// The canisters in the order a round visits them: by id, from the round-robin cursor on, then
/// from the lowest id (see note "round order"). Deterministic: it depends only on the state.
fn round_robin_order(state: &ReplicatedState) -> Vec<CanisterId> {
    let ids: Vec<CanisterId> = state.canisters.keys().copied().collect();
    let start = state
        .round_robin_cursor
        .map_or(0, |cursor| ids.partition_point(|id| *id < cursor));
    ids[start..].iter().chain(&ids[..start]).copied().collect()
}
