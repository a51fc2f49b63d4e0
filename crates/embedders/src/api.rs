//! The boundary between the embedder and the execution crate.

use openic_replicated_state::{
    ExecutionState, GlobalValue, ModuleInfo, PageMap, WasmBinary, WasmClosure,
};
use openic_types::{CanisterId, Cycles, RejectCode, SubnetId, Time, UserId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// The function to run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum EntryPoint {
    /// An exported function, by its full export name (`canister_update inc`, `canister_init`, ...).
    Export(String),
    /// A function-table entry called with `env` (reply, reject and cleanup callbacks).
    /// An index that is out of bounds or of the wrong type traps at this point, not at `call_new`.
    Closure(WasmClosure),
    /// Only the module's `(start)` function (run after install, before `canister_init`).
    StartOnly,
}

/// The execution context and its inputs (spec: "execution contexts"). Which ic0 imports may be
/// called follows from the variant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApiType {
    /// `canister_init` or `canister_post_upgrade` (context `I`).
    Init {
        /// The installer.
        caller: UserId,
        /// The install argument.
        arg: Vec<u8>,
    },
    /// `canister_pre_upgrade` (context `G`).
    PreUpgrade {
        /// The upgrader.
        caller: UserId,
    },
    /// An update method (context `U`).
    Update {
        /// The caller.
        caller: UserId,
        /// The argument.
        arg: Vec<u8>,
        /// Cycles attached and not yet accepted.
        cycles_available: Cycles,
        /// Bounded-wait deadline (0 = none), returned by `msg_deadline`.
        deadline: u64,
    },
    /// A query in replicated mode (called as an update) or non-replicated mode (contexts `RQ`/`NRQ`).
    Query {
        /// The caller.
        caller: UserId,
        /// The argument.
        arg: Vec<u8>,
        /// Whether it runs replicated (then cycles may be accepted).
        replicated: bool,
        /// The data certificate for `data_certificate_copy` (non-replicated queries on the target
        /// canister of a user query only).
        data_certificate: Option<Vec<u8>>,
        /// Cycles attached (replicated only).
        cycles_available: Cycles,
    },
    /// A composite query (context `CQ`): may call other canisters' queries.
    CompositeQuery {
        /// The caller.
        caller: UserId,
        /// The argument.
        arg: Vec<u8>,
        /// The data certificate, if any.
        data_certificate: Option<Vec<u8>>,
    },
    /// A reply callback (`Ry`, or `CRy` in a composite query).
    ReplyCallback {
        /// The original caller of the call context.
        caller: UserId,
        /// The reply data (what `msg_arg_data_*` reads).
        reply: Vec<u8>,
        /// Cycles refunded with the response.
        refunded: Cycles,
        /// Cycles still available in the call context.
        cycles_available: Cycles,
        /// Deadline of the call context (0 = none).
        deadline: u64,
        /// Whether this is inside a composite query.
        in_composite_query: bool,
    },
    /// A reject callback (`Rt`/`CRt`).
    RejectCallback {
        /// The original caller of the call context.
        caller: UserId,
        /// Reject code (`msg_reject_code`).
        code: RejectCode,
        /// Reject message (`msg_reject_msg_*`).
        message: String,
        /// Cycles refunded with the response.
        refunded: Cycles,
        /// Cycles still available in the call context.
        cycles_available: Cycles,
        /// Deadline of the call context (0 = none).
        deadline: u64,
        /// Whether this is inside a composite query.
        in_composite_query: bool,
    },
    /// A cleanup callback (`C`/`CC`), run after a reply or reject callback trapped.
    Cleanup {
        /// The original caller of the call context.
        caller: UserId,
        /// The reject code of the response (0 if it was a reply).
        code: u32,
        /// Whether this is inside a composite query (context `CC`: non-replicated, no
        /// `cycles_burn128`, `root_key_*` or `global_timer_set`).
        in_composite_query: bool,
    },
    /// `canister_inspect_message` (context `F`).
    InspectMessage {
        /// The caller.
        caller: UserId,
        /// The method being called.
        method_name: String,
        /// The argument.
        arg: Vec<u8>,
    },
    /// `canister_heartbeat`, `canister_global_timer` or `canister_on_low_wasm_memory` (context `T`).
    SystemTask,
    /// The `(start)` function (context `s`).
    Start,
}

/// What the System API may read about the canister and its environment. A snapshot: changes are
/// reported in [`SystemStateChanges`], never written here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemStateView {
    /// The canister's own id.
    pub canister_id: CanisterId,
    /// Its controllers (`is_controller`).
    pub controllers: BTreeSet<UserId>,
    /// 1 running, 2 stopping, 3 stopped.
    pub status_code: i32,
    /// Current balance.
    pub cycles_balance: Cycles,
    /// Cycles that must stay in the balance for the canister not to be frozen (freezing threshold
    /// plus reserved); `canister_liquid_cycle_balance128` = balance − this.
    pub freeze_threshold_cycles: Cycles,
    /// `canister_version`.
    pub canister_version: u64,
    /// The block time (`ic0.time`); constant within one execution.
    pub time: Time,
    /// This subnet's id (`subnet_self_*`).
    pub subnet_id: SubnetId,
    /// Number of nodes in the subnet.
    pub subnet_node_count: u32,
    /// The DER root key (`root_key_*`).
    pub root_key_der: Vec<u8>,
    /// The canister's current global timer (0 = unset); `global_timer_set` returns it.
    pub global_timer_nanos: u64,
    /// Environment variables (`env_var_*`), sorted by name.
    pub environment_variables: BTreeMap<String, String>,
    /// Whether the canister may still make outgoing calls in this execution (false e.g. when its
    /// queues are full); `call_perform` returns 2 when false.
    pub can_make_calls: bool,
    /// Cost of one outgoing call, for `cost_call`: base fee in cycles.
    pub call_base_fee: Cycles,
    /// Cost per byte of an outgoing call, for `cost_call`.
    pub call_fee_per_byte: Cycles,
    /// Cost of creating a canister, for `cost_create_canister`.
    pub create_canister_fee: Cycles,
    /// Instructions already executed by earlier executions of the current call context (0 when
    /// there is none); `performance_counter(1)` returns this plus the current execution's count.
    pub call_context_instructions: u64,
    /// How many more callbacks the canister may have outstanding (its limit minus those it has);
    /// `call_perform` returns 2 once this execution's calls reach it.
    pub remaining_callbacks: u64,
}

/// An outgoing call made with `call_new` … `call_perform`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutgoingCall {
    /// The callee (may be `aaaaa-aa` or the canister itself).
    pub callee: CanisterId,
    /// The method.
    pub method_name: String,
    /// The argument bytes (`call_data_append`).
    pub payload: Vec<u8>,
    /// Cycles attached (`call_cycles_add128`), already deducted from the balance in the view's
    /// accounting: the caller must move them from the canister's balance.
    pub cycles: Cycles,
    /// Reply callback.
    pub on_reply: WasmClosure,
    /// Reject callback.
    pub on_reject: WasmClosure,
    /// Cleanup callback (`call_on_cleanup`).
    pub on_cleanup: Option<WasmClosure>,
    /// `call_with_best_effort_response` timeout in seconds (already capped at 300), if bounded-wait.
    pub timeout_seconds: Option<u32>,
}

/// The response the execution produced, if any.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WasmResponse {
    /// `msg_reply` with the appended data.
    Reply(Vec<u8>),
    /// `msg_reject` with this message.
    Reject(String),
}

/// Side effects requested through the System API. Applied by the caller only if the execution did
/// not trap.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SystemStateChanges {
    /// Calls made, in order.
    pub calls: Vec<OutgoingCall>,
    /// Cycles accepted from the call context (`msg_cycles_accept128`).
    pub cycles_accepted: Cycles,
    /// Cycles burned (`cycles_burn128`).
    pub cycles_burned: Cycles,
    /// New certified data (`certified_data_set`), if set.
    pub certified_data: Option<Vec<u8>>,
    /// New global timer (`global_timer_set`), if set.
    pub global_timer_nanos: Option<u64>,
    /// Whether `accept_message` was called (inspect_message).
    pub message_accepted: bool,
}

/// Why an execution failed. Every variant rolls back all changes.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ExecutionError {
    /// `ic0.trap` was called with this message.
    #[error("Canister called `ic0.trap` with message: '{0}'")]
    CalledTrap(String),
    /// A wasm trap (unreachable, out-of-bounds access, division by zero, ...).
    #[error("Canister trapped: {0}")]
    Trapped(String),
    /// A System API contract violation (bad arguments, reply twice, ...).
    #[error("Canister violated contract: {0}")]
    ContractViolation(String),
    /// A System API function called in a context that may not call it.
    #[error("Canister violated contract: {0}")]
    WrongContext(String),
    /// The heap grew past the canister's `wasm_memory_limit` where the limit applies.
    #[error(
        "Canister exceeded its current Wasm memory limit of {limit} bytes. The peak Wasm memory usage was {peak} bytes. If the canister reaches 4GiB, then it may stop functioning and may become unrecoverable. Please reach out to the canister owner to investigate the reason for the increased memory usage. It might be necessary to move data from the Wasm memory to the stable memory. If such high Wasm memory usage is expected and safe, then the developer can increase the Wasm memory limit in the canister settings."
    )]
    WasmMemoryLimitExceeded {
        /// The setting.
        limit: u64,
        /// The heap size the growth asked for.
        peak: u64,
    },
    /// The instruction limit was reached.
    #[error("Canister exceeded the limit of {limit} instructions for single message execution.")]
    InstructionLimitExceeded {
        /// The limit.
        limit: u64,
    },
    /// The heap or stable memory could not grow further (limit reached).
    #[error("Canister exceeded its allowed memory: {0}")]
    OutOfMemory(String),
    /// The memory the execution added needs cycles reserved that the canister does not have
    /// (the storage reservation of a subnet above its memory threshold). `missing` is shown only
    /// to the canister's controllers, as on the IC.
    #[error(
        "Canister cannot grow memory by {bytes} bytes due to insufficient cycles.{}",
        missing.map(|m| format!(" At least {m} additional cycles are required.")).unwrap_or_default()
    )]
    InsufficientCyclesInMemoryGrow {
        /// Bytes the execution added.
        bytes: u64,
        /// Cycles short, for a controller.
        missing: Option<u128>,
    },
    /// The memory the execution added would take the canister's reserved cycles past its
    /// `reserved_cycles_limit`.
    #[error(
        "Canister cannot grow memory by {bytes} bytes due to its reserved cycles limit. The current limit ({limit}) would be exceeded by {}.",
        requested.saturating_sub(*limit)
    )]
    ReservedCyclesLimitExceededInMemoryGrow {
        /// Bytes the execution added.
        bytes: u64,
        /// Reserved cycles the growth would bring the canister to.
        requested: u128,
        /// The canister's `reserved_cycles_limit`.
        limit: u128,
    },
    /// A non-replicated execution needed more memory than the node's [`MemoryBudget`] had free
    /// (the node is busy, not the canister at fault: retry later).
    #[error("{0}")]
    NodeMemoryBusy(String),
    /// The export does not exist: `<kind> method '<name>'.` (see [`ExecutionError::no_export`]).
    #[error("Canister has no {0}")]
    MethodNotFound(String),
    /// The module could not be instantiated (should have been caught at install).
    #[error("Canister's module could not be instantiated: {0}")]
    Instantiation(String),
}

/// Where the IC's documentation explains execution errors (the IC links every user error there).
pub const EXECUTION_ERRORS_DOC: &str =
    "https://internetcomputer.org/docs/current/references/execution-errors";

/// What the IC appends to a toolchain-caused error.
const TOOLCHAIN_HELP: &str = "This is likely an error with the compiler/CDK toolchain being used to build the canister. Please report the error to IC devs on the forum: https://forum.dfinity.org and include which language/CDK was used to create the canister.";

impl ExecutionError {
    /// [`ExecutionError::MethodNotFound`] for a missing export (`canister_update m` names the
    /// update method `m`, as the IC words it).
    pub fn no_export(export: &str) -> ExecutionError {
        let (kind, name) = [
            ("canister_update ", "update"),
            ("canister_query ", "query"),
            ("canister_composite_query ", "composite_query"),
        ]
        .iter()
        .find_map(|(prefix, kind)| export.strip_prefix(prefix).map(|name| (*kind, name)))
        .unwrap_or(("system", export));
        ExecutionError::MethodNotFound(format!("{kind} method '{name}'."))
    }

    /// The help the IC appends to this error's user-visible message (after `.\n`): a suggestion
    /// with a link to the section of the execution-errors documentation, or the toolchain note.
    pub fn help(&self) -> Option<String> {
        let user = |suggestion: &str, section: &str| {
            Some(format!(
                "{suggestion} See documentation: {EXECUTION_ERRORS_DOC}#{section}"
            ))
        };
        const HANDLE: &str = "Consider gracefully handling failures from this canister or altering the canister to handle exceptions.";
        match self {
            ExecutionError::CalledTrap(_) => user(HANDLE, "trapped-explicitly"),
            ExecutionError::Trapped(_) => user(HANDLE, "trapped"),
            ExecutionError::InstructionLimitExceeded { .. } => user(
                "Try optimizing this method to consume fewer instructions or split the work across multiple messages.",
                "instruction-limit-exceeded",
            ),
            ExecutionError::MethodNotFound(_) => user(
                "Check that the method being called is exported by the target canister.",
                "method-not-found",
            ),
            ExecutionError::WrongContext(_) => user(
                "Check the ICP documentation to make sure APIs are being called in the correct message types.",
                "calling-a-system-api-from-the-wrong-mode",
            ),
            ExecutionError::WasmMemoryLimitExceeded { .. } => user(
                "Try checking the canister for a possible memory leak or modifying it to use more stable memory instead of Wasm memory.",
                "wasm-memory-limit-exceeded",
            ),
            ExecutionError::InsufficientCyclesInMemoryGrow { .. } => user(
                "Try topping up this canister with more cycles.",
                "insufficient-cycles-in-memory-grow",
            ),
            ExecutionError::ReservedCyclesLimitExceededInMemoryGrow { .. } => user(
                "Try increasing this canister's reserved cycles limit or moving it to a subnet with lower memory usage.",
                "reserved-cycles-limit-exceeded-in-memory-grow",
            ),
            ExecutionError::ContractViolation(_) => Some(TOOLCHAIN_HELP.to_string()),
            ExecutionError::OutOfMemory(_)
            | ExecutionError::Instantiation(_)
            | ExecutionError::NodeMemoryBusy(_) => None,
        }
    }
}

/// Everything needed to run one entry point.
#[derive(Clone, Debug)]
pub struct WasmExecutionInput<'a> {
    /// Context and inputs.
    pub api_type: ApiType,
    /// What to run.
    pub entry_point: EntryPoint,
    /// The canister's wasm state before execution.
    pub execution_state: &'a ExecutionState,
    /// What the System API may read.
    pub system_state: SystemStateView,
    /// Maximum instructions (fuel) for this execution.
    pub instruction_limit: u64,
    /// Maximum heap size in bytes (wasm32: at most 4 GiB).
    pub wasm_memory_limit_bytes: u64,
    /// Whether `wasm_memory_limit_bytes` is the canister's `wasm_memory_limit` setting, enforced
    /// here: growing past it traps ([`ExecutionError::WasmMemoryLimitExceeded`]) instead of making
    /// `memory.grow` fail (spec: the limit traps in update methods, init and post_upgrade).
    pub wasm_memory_limit_traps: bool,
    /// Maximum stable memory size in bytes.
    pub stable_memory_limit_bytes: u64,
    /// For non-replicated executions (queries, `canister_inspect_message`): the node-wide budget
    /// the memory this execution may touch is reserved from (see Note [memory budget]). Always
    /// `None` for replicated executions, whose memory is bounded by deterministic limits: a
    /// node-local budget must never change a replicated result.
    pub memory_budget: Option<std::sync::Arc<dyn MemoryBudget>>,
}

// Note [memory budget]: one canister's query may grow its heap by gigabytes within its instruction
// limit, and the node runs several at once, so non-replicated executions reserve the memory they
// touch from a node-wide budget before touching it: the heap image copied in when the instance is
// created, every `memory.grow`, and every page written to stable memory (at most the stable
// memory's size). The reservation is released when the execution ends. When the budget has no
// room (after the budget's own bounded wait for other executions to finish), the execution stops
// with `ExecutionError::NodeMemoryBusy`, which users see as a transient rejection to retry, never
// as the canister's fault, and never as the kernel's OOM killer ending the node.

/// Node-wide memory that non-replicated executions reserve (see Note [memory budget]). The node
/// implements it (with its waiting policy); the embedder only reserves and releases.
pub trait MemoryBudget: Send + Sync + std::fmt::Debug {
    /// Reserves `bytes` more, or says (in words for the user) why the node cannot give them.
    fn reserve(&self, bytes: u64) -> Result<(), String>;
    /// Returns `bytes` reserved earlier.
    fn release(&self, bytes: u64);
}

/// The canister's wasm state after a successful execution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NewExecutionState {
    /// The heap image.
    pub wasm_memory: PageMap,
    /// The heap size in wasm pages.
    pub wasm_memory_size_pages: u64,
    /// The stable memory image.
    pub stable_memory: PageMap,
    /// Stable memory size in wasm pages.
    pub stable_memory_size_pages: u64,
    /// Mutable globals.
    pub globals: Vec<GlobalValue>,
}

/// The result of running one entry point.
#[derive(Clone, Debug)]
pub struct WasmExecutionOutput {
    /// Instructions consumed (also on failure).
    pub instructions_used: u64,
    /// `Ok` with the new state, the response (if any) and the requested changes; `Err` on trap,
    /// with everything rolled back. In contexts whose state changes the spec discards
    /// (queries, replicated or not, and `canister_inspect_message`) the returned state is the
    /// input state, unchanged: the heap is not compared back, to keep queries cheap. System
    /// state changes (accepted cycles, the response) are still reported.
    pub result:
        Result<(NewExecutionState, Option<WasmResponse>, SystemStateChanges), ExecutionError>,
    /// Lines printed with `debug_print` and the trap message, in order (for logs; kept on failure).
    /// Bytes as printed: the log's content is a blob.
    pub debug_prints: Vec<Vec<u8>>,
}

/// Why a module was refused at install.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InvalidWasm {
    /// Not wasm, or gzip that does not decompress to wasm.
    #[error("Wasm module is not valid wasm or gzip-compressed wasm: {0}")]
    Decode(String),
    /// Refused by validation (unknown ic0 import, bad export, too many functions, ...).
    #[error("Wasm module is invalid: {0}")]
    Validation(String),
    /// Refused by the compiler.
    #[error("Wasm module failed to compile: {0}")]
    Compilation(String),
}

/// The embedder's contract. Implementations are shared between the block-execution thread and
/// query threads, so every method takes `&self`.
pub trait Embedder: Send + Sync {
    /// Validates and compiles a module (plain or gzip), caching the compiled code by module hash.
    /// Returns the binary and what was learned about it. Never panics on hostile input.
    fn prepare_module(&self, wasm: &[u8]) -> Result<(WasmBinary, ModuleInfo), InvalidWasm>;

    /// The initial wasm state of a freshly installed module: memory from data segments, initial
    /// globals, empty stable memory. Runs nothing (the caller then runs `(start)` and init).
    fn initial_execution_state(
        &self,
        binary: std::sync::Arc<WasmBinary>,
        info: std::sync::Arc<ModuleInfo>,
    ) -> Result<ExecutionState, InvalidWasm>;

    /// Runs one entry point. Deterministic; never panics on anything the canister does.
    fn execute(&self, input: WasmExecutionInput<'_>) -> WasmExecutionOutput;

    /// Starts one entry point of a replicated execution that runs in slices of
    /// `slice_instructions` (see Note [sliced executions] in `sliced`): the result is the one
    /// [`Embedder::execute`] gives, handed out by [`SlicedExecution::wait`] for the slice its
    /// instruction count says it completes in. This default runs it to the end at once; the
    /// wasmtime embedder runs it on a worker thread that stops at the end of what was granted.
    fn start_sliced(
        self: std::sync::Arc<Self>,
        input: WasmExecutionInput<'_>,
        slice_instructions: u64,
    ) -> Box<dyn SlicedExecution> {
        Box::new(crate::sliced::FinishedExecution::new(
            self.execute(input),
            slice_instructions,
        ))
    }

    /// Gives back to the kernel the memory kept warm for executions that has stayed unused since
    /// the previous call; returns the bytes given back. The node calls it periodically. An
    /// embedder that keeps no memory between executions has nothing to give back.
    fn release_idle_memory(&self) -> u64 {
        0
    }
}

/// A replicated execution in slices ([`Embedder::start_sliced`]). Deterministic: what
/// [`SlicedExecution::wait`] answers depends only on the execution, never on thread timing.
/// Dropping it abandons the execution.
pub trait SlicedExecution: Send + std::fmt::Debug {
    /// Lets the execution run through `slices` slices (1-based) without waiting for it.
    fn grant(&mut self, slices: u64);

    /// Lets the execution run through `slices` slices and waits until it is known whether it
    /// completes within them: then `Some` with its output (once), else `None`.
    fn wait(&mut self, slices: u64) -> Option<WasmExecutionOutput>;
}
