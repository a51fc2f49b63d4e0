//! Non-replicated query execution against the latest certified snapshot, including composite
//! queries (which call other canisters' queries synchronously) and management-canister queries.
//!
//! Nothing a query does persists: every execution starts from the snapshot, and the state a
//! composite query's caller builds up across its callbacks lives only for that call.

use crate::common::{
    canister_not_found_error, canister_reject_error, did_not_reply_error, empty_canister_error,
    execution_error_to_user, method_not_found_error, system_state_view,
};
use crate::config::{ExecutionConfig, SubnetContext};
use crate::management::execute_management_query;
use openic_embedders::{
    ApiType, Embedder, EntryPoint, ExecutionError, MemoryBudget, OutgoingCall, WasmResponse,
};
use openic_interfaces::{CertifiedStateReader, QueryExecutor, StateSnapshotSource};
use openic_replicated_state::{CanisterState, CanisterStatus, ExecutionState, MethodKind};
use openic_types::{
    CanisterId, Cycles, ErrorCode, QueryResult, RejectCode, Time, UserError, UserId, UserQuery,
};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

/// Executes user queries (the [`QueryExecutor`] of the node).
pub struct QueryExecution {
    embedder: Arc<dyn Embedder>,
    snapshots: Arc<dyn StateSnapshotSource>,
    certified: Arc<dyn CertifiedStateReader>,
    config: ExecutionConfig,
    subnet: SubnetContext,
    memory_budget: Option<Arc<dyn MemoryBudget>>,
}

impl QueryExecution {
    /// A query executor over the snapshots of `snapshots`, taking data certificates from
    /// `certified`.
    pub fn new(
        embedder: Arc<dyn Embedder>,
        snapshots: Arc<dyn StateSnapshotSource>,
        certified: Arc<dyn CertifiedStateReader>,
        config: ExecutionConfig,
        subnet: SubnetContext,
    ) -> Self {
        QueryExecution {
            embedder,
            snapshots,
            certified,
            config,
            subnet,
            memory_budget: None,
        }
    }

    /// Makes every execution reserve the memory it touches from `budget` (Note [memory budget]
    /// in the embedder).
    pub fn with_memory_budget(mut self, budget: Arc<dyn MemoryBudget>) -> Self {
        self.memory_budget = Some(budget);
        self
    }

    fn run(&self, query: &UserQuery) -> Result<Vec<u8>, UserError> {
        let snapshot = self.snapshots.latest_snapshot();
        if query.canister_id.is_management() {
            return execute_management_query(
                &self.config,
                &snapshot.canisters,
                &snapshot.logs,
                &snapshot.snapshots,
                query.sender,
                &query.method_name,
                &query.arg,
            );
        }
        let mut context = QueryContext {
            embedder: self.embedder.as_ref(),
            config: &self.config,
            subnet: &self.subnet,
            canisters: &snapshot.canisters,
            time: snapshot.time,
            instructions_left: self.config.max_instructions_per_query,
            calls_made: 0,
            memory_budget: self.memory_budget.as_ref(),
        };
        let canister = context.callable_canister(&query.canister_id)?;
        let kind = canister
            .execution_state
            .as_ref()
            .and_then(|e| e.module_info.methods.get(&query.method_name).copied());
        let data_certificate = self.certified.data_certificate(&query.canister_id).ok();
        let (export, api_type) = match kind {
            Some(MethodKind::Query) => (
                format!("canister_query {}", query.method_name),
                ApiType::Query {
                    caller: query.sender,
                    arg: query.arg.clone(),
                    replicated: false,
                    data_certificate,
                    cycles_available: Cycles::ZERO,
                },
            ),
            Some(MethodKind::CompositeQuery) => (
                format!("canister_composite_query {}", query.method_name),
                ApiType::CompositeQuery {
                    caller: query.sender,
                    arg: query.arg.clone(),
                    data_certificate,
                },
            ),
            // The IC answers a query to an update method as to a missing query method.
            Some(MethodKind::Update) => {
                return Err(method_not_found_error(
                    &query.canister_id,
                    "query",
                    &query.method_name,
                ));
            }
            None => {
                return Err(method_not_found_error(
                    &query.canister_id,
                    "query",
                    &query.method_name,
                ));
            }
        };
        context.run_method(query.canister_id, api_type, export, 0)
    }
}

impl QueryExecutor for QueryExecution {
    fn query(&self, query: UserQuery) -> QueryResult {
        match self.run(&query) {
            Ok(reply) => QueryResult::Reply(reply),
            Err(mut error) => {
                error.code = error.code.for_user();
                QueryResult::Reject(error)
            }
        }
    }
}

/// The state of one user query while it runs.
struct QueryContext<'a> {
    embedder: &'a dyn Embedder,
    config: &'a ExecutionConfig,
    subnet: &'a SubnetContext,
    canisters: &'a BTreeMap<CanisterId, Arc<CanisterState>>,
    time: Time,
    /// Instructions the rest of the query (all its calls) may still use.
    instructions_left: u64,
    /// Calls made so far by the composite query's call graph.
    calls_made: u32,
    memory_budget: Option<&'a Arc<dyn MemoryBudget>>,
}

impl<'a> QueryContext<'a> {
    /// The canister, if it exists, has a module and is not stopped.
    fn callable_canister(&self, id: &CanisterId) -> Result<&'a CanisterState, UserError> {
        let canister = self
            .canisters
            .get(id)
            .ok_or_else(|| canister_not_found_error(id))?;
        if canister.execution_state.is_none() {
            return Err(empty_canister_error(id));
        }
        if canister.system_state.status == CanisterStatus::Stopped {
            return Err(UserError::new(
                ErrorCode::CanisterStopped,
                format!(
                    "Canister {} is stopped and answers no queries; start it with start_canister.",
                    id.get()
                ),
            ));
        }
        Ok(canister)
    }

    /// Runs one entry point. `call_context` counts the instructions of the call context so far
    /// (the method and its earlier callbacks: what `ic0.performance_counter(1)` reports) and grows
    /// by this execution's, also when it fails.
    fn execute(
        &mut self,
        canister: &CanisterState,
        execution_state: &ExecutionState,
        api_type: ApiType,
        entry_point: EntryPoint,
        call_context: &mut u64,
    ) -> Result<(ExecutionState, Option<WasmResponse>, Vec<OutgoingCall>), UserError> {
        let id = canister.canister_id();
        if self.instructions_left == 0 {
            return Err(execution_error_to_user(
                &id,
                &ExecutionError::InstructionLimitExceeded {
                    limit: self.config.max_instructions_per_query,
                },
            ));
        }
        let mut view = system_state_view(
            self.config,
            self.subnet,
            canister,
            self.time,
            canister.system_state.cycles_balance,
            true,
        );
        // Calls of a composite query are bounded by `max_composite_query_calls`, not by the
        // replicated callbacks the canister has outstanding.
        view.can_make_calls = true;
        view.remaining_callbacks = u64::from(self.config.max_composite_query_calls);
        view.call_context_instructions = *call_context;
        let mut input = crate::common::execution_input(
            self.config,
            canister,
            execution_state,
            api_type,
            entry_point,
            view,
            self.instructions_left,
        );
        input.memory_budget = self.memory_budget.cloned();
        let output = self.embedder.execute(input);
        self.instructions_left = self
            .instructions_left
            .saturating_sub(output.instructions_used);
        *call_context = call_context.saturating_add(output.instructions_used);
        let (new_state, response, changes) = output.result.map_err(|error| {
            let error = match error {
                ExecutionError::InstructionLimitExceeded { .. } => {
                    ExecutionError::InstructionLimitExceeded {
                        limit: self.config.max_instructions_per_query,
                    }
                }
                other => other,
            };
            execution_error_to_user(&id, &error)
        })?;
        let mut next = execution_state.clone();
        next.wasm_memory = new_state.wasm_memory;
        next.wasm_memory_size_pages = new_state.wasm_memory_size_pages;
        next.stable_memory = new_state.stable_memory;
        next.stable_memory_size_pages = new_state.stable_memory_size_pages;
        next.globals = new_state.globals;
        Ok((next, response, changes.calls))
    }

    /// Runs `export` of canister `id` and then, for a composite query, the callbacks of the calls
    /// it makes, until it answers. Returns the reply, or the rejection.
    fn run_method(
        &mut self,
        id: CanisterId,
        api_type: ApiType,
        export: String,
        depth: u32,
    ) -> Result<Vec<u8>, UserError> {
        let canister = self.callable_canister(&id)?;
        let caller = match &api_type {
            ApiType::Query { caller, .. } | ApiType::CompositeQuery { caller, .. } => *caller,
            _ => UserId::anonymous(),
        };
        let initial_state = canister
            .execution_state
            .as_ref()
            .ok_or_else(|| empty_canister_error(&id))?;
        let mut call_context = 0;
        let (mut current, mut response, calls) = self.execute(
            canister,
            initial_state,
            api_type,
            EntryPoint::Export(export),
            &mut call_context,
        )?;
        let mut pending: VecDeque<OutgoingCall> = calls.into();
        while response.is_none() {
            let Some(call) = pending.pop_front() else {
                break;
            };
            let result = self.call(id, &call, depth + 1);
            let api_type = match result {
                Ok(reply) => ApiType::ReplyCallback {
                    caller,
                    reply,
                    refunded: call.cycles,
                    cycles_available: Cycles::ZERO,
                    deadline: 0,
                    in_composite_query: true,
                },
                Err((code, message)) => ApiType::RejectCallback {
                    caller,
                    code,
                    message,
                    refunded: call.cycles,
                    cycles_available: Cycles::ZERO,
                    deadline: 0,
                    in_composite_query: true,
                },
            };
            let closure = match &api_type {
                ApiType::ReplyCallback { .. } => call.on_reply,
                _ => call.on_reject,
            };
            let cleanup_code = match &api_type {
                ApiType::RejectCallback { code, .. } => code.as_u64() as u32,
                _ => 0,
            };
            match self.execute(
                canister,
                &current,
                api_type,
                EntryPoint::Closure(closure),
                &mut call_context,
            ) {
                Ok((next, callback_response, more_calls)) => {
                    current = next;
                    response = callback_response;
                    pending.extend(more_calls);
                }
                Err(error) => {
                    if let Some(cleanup) = call.on_cleanup {
                        // Cleanup effects would be discarded with the rest of the query anyway.
                        let _ = self.execute(
                            canister,
                            &current,
                            ApiType::Cleanup {
                                caller,
                                code: cleanup_code,
                                in_composite_query: true,
                            },
                            EntryPoint::Closure(cleanup),
                            &mut call_context,
                        );
                    }
                    return Err(error);
                }
            }
        }
        match response {
            Some(WasmResponse::Reply(data)) => {
                if data.len() as u64 > self.config.max_response_bytes_query {
                    return Err(UserError::new(
                        ErrorCode::CanisterContractViolation,
                        format!(
                            "Canister {} replied with {} bytes, more than the query limit of {} bytes.",
                            id.get(),
                            data.len(),
                            self.config.max_response_bytes_query
                        ),
                    ));
                }
                Ok(data)
            }
            Some(WasmResponse::Reject(message)) => Err(canister_reject_error(message)),
            None => Err(did_not_reply_error(&id)),
        }
    }

    /// A query call made by a composite query: runs the callee synchronously.
    fn call(
        &mut self,
        caller: CanisterId,
        call: &OutgoingCall,
        depth: u32,
    ) -> Result<Vec<u8>, (RejectCode, String)> {
        if depth > self.config.max_composite_query_depth {
            return Err((
                RejectCode::CanisterError,
                format!(
                    "Composite query call graph deeper than {} calls; flatten the calls.",
                    self.config.max_composite_query_depth
                ),
            ));
        }
        self.calls_made += 1;
        if self.calls_made > self.config.max_composite_query_calls {
            return Err((
                RejectCode::CanisterError,
                format!(
                    "Composite query made more than {} calls in total.",
                    self.config.max_composite_query_calls
                ),
            ));
        }
        if call.callee.is_management() {
            return Err((
                RejectCode::DestinationInvalid,
                "The management canister cannot be called from a composite query.".into(),
            ));
        }
        let reject = |error: UserError| (error.code, error.message);
        let canister = self.callable_canister(&call.callee).map_err(reject)?;
        let kind = canister
            .execution_state
            .as_ref()
            .and_then(|e| e.module_info.methods.get(&call.method_name).copied());
        let (export, api_type) = match kind {
            Some(MethodKind::Query) => (
                format!("canister_query {}", call.method_name),
                ApiType::Query {
                    caller: caller.get(),
                    arg: call.payload.clone(),
                    replicated: false,
                    data_certificate: None,
                    cycles_available: Cycles::ZERO,
                },
            ),
            Some(MethodKind::CompositeQuery) => (
                format!("canister_composite_query {}", call.method_name),
                ApiType::CompositeQuery {
                    caller: caller.get(),
                    arg: call.payload.clone(),
                    data_certificate: None,
                },
            ),
            Some(MethodKind::Update) | None => {
                return Err(reject(method_not_found_error(
                    &call.callee,
                    "query",
                    &call.method_name,
                )));
            }
        };
        self.run_method(call.callee, api_type, export, depth)
            .map_err(reject)
    }
}
