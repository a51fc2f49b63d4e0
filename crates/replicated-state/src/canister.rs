//! A canister's state: its system state (controllers, cycles, settings, call contexts, queues) and
//! its execution state (module, memories, globals).

use crate::PageMap;
use openic_types::{CanisterId, Cycles, RejectCode, RequestId, SignedIngress, Time, UserId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

/// The running status of a canister (spec: `running` → `stopping` → `stopped`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CanisterStatus {
    /// Accepting and executing calls.
    Running,
    /// Not accepting new calls; waiting for open call contexts to close. The stop requests are
    /// answered when it becomes stopped.
    Stopping {
        /// Who asked to stop, to be answered when the canister stops.
        stop_contexts: Vec<StopContext>,
        /// `stop_deadlines[i]` is the block time after which `stop_contexts[i]` is rejected as
        /// timed out (the canister then stays stopping). A context without an entry (state
        /// written before deadlines existed) never times out.
        #[serde(default)]
        stop_deadlines: Vec<Time>,
    },
    /// Not executing anything.
    Stopped,
}

impl CanisterStatus {
    /// The value `ic0.canister_status` returns: 1 running, 2 stopping, 3 stopped.
    pub fn as_ic0_code(&self) -> i32 {
        match self {
            CanisterStatus::Running => 1,
            CanisterStatus::Stopping { .. } => 2,
            CanisterStatus::Stopped => 3,
        }
    }
}

/// A pending `stop_canister` call, answered when the canister becomes stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopContext {
    /// From a user: the ingress message.
    Ingress {
        /// The caller.
        sender: UserId,
        /// Its request id.
        request_id: RequestId,
    },
    /// From a canister: the request to answer.
    Canister(Request),
}

/// Who may read the canister's logs (and, with the same shape, its snapshots).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Visibility {
    /// Only controllers.
    Controllers,
    /// Anyone.
    Public,
    /// Controllers and these principals.
    AllowedViewers(Vec<UserId>),
}

/// Settings that controllers set with `create_canister`/`update_settings`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanisterSettings {
    /// Compute allocation in percent (0-100).
    pub compute_allocation: u64,
    /// Memory allocation in bytes (0 = best effort).
    pub memory_allocation: u64,
    /// The freezing threshold in seconds.
    pub freezing_threshold_seconds: u64,
    /// Upper bound on reserved cycles.
    pub reserved_cycles_limit: u128,
    /// Upper bound on wasm heap memory in bytes (0 = no limit beyond the platform's).
    pub wasm_memory_limit: u64,
    /// Free-heap threshold that triggers `canister_on_low_wasm_memory`.
    pub wasm_memory_threshold: u64,
    /// Who may read logs.
    pub log_visibility: Visibility,
    /// Who may read snapshots.
    pub snapshot_visibility: Visibility,
    /// Upper bound on the log memory in bytes.
    pub log_memory_limit: u64,
    /// Environment variables readable by `ic0.env_var_*`.
    pub environment_variables: BTreeMap<String, String>,
}

impl Default for CanisterSettings {
    fn default() -> Self {
        CanisterSettings {
            compute_allocation: 0,
            memory_allocation: 0,
            freezing_threshold_seconds: 2_592_000,
            reserved_cycles_limit: 5_000_000_000_000,
            wasm_memory_limit: 3 * 1024 * 1024 * 1024,
            wasm_memory_threshold: 0,
            log_visibility: Visibility::Controllers,
            snapshot_visibility: Visibility::Controllers,
            log_memory_limit: crate::canister_log::DEFAULT_LOG_MEMORY_LIMIT,
            environment_variables: BTreeMap::new(),
        }
    }
}

/// A wasm closure: a function-table index and the environment value passed to it (ic0 `call_new`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WasmClosure {
    /// Index into the module's function table.
    pub func_idx: u64,
    /// The environment argument.
    pub env: u64,
}

/// Why a call context exists, and so to whom its reply goes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CallOrigin {
    /// An update call from a user.
    Ingress {
        /// The caller.
        sender: UserId,
        /// Its request id.
        request_id: RequestId,
    },
    /// A call from another (or the same) canister.
    Canister {
        /// The calling canister.
        caller: CanisterId,
        /// The callback at the caller that awaits the response.
        callback_id: CallbackId,
        /// The bounded-wait deadline, if the call is bounded-wait.
        deadline: Option<Time>,
    },
    /// A system task (heartbeat, global timer, low-memory hook): nobody awaits a reply.
    SystemTask,
}

/// Identifies a call context within its canister.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CallContextId(pub u64);

/// Identifies a callback (an outstanding outgoing call) within its canister.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct CallbackId(pub u64);

/// The state of one incoming call being processed by a canister.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallContext {
    /// Where the call came from.
    pub origin: CallOrigin,
    /// Whether a reply or reject has been produced.
    pub responded: bool,
    /// Cycles attached to the call that the canister has not yet accepted.
    pub available_cycles: Cycles,
    /// Instructions used by all executions of this call context so far.
    pub instructions_executed: u64,
    /// The method that was called (for logs and errors).
    pub method_name: String,
}

/// An outstanding outgoing call: what to run when its response arrives.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Callback {
    /// The call context that made the call.
    pub call_context_id: CallContextId,
    /// The canister called.
    pub respondent: CanisterId,
    /// Cycles sent with the call (refunded in part or whole with the response).
    pub cycles_sent: Cycles,
    /// Run on a reply.
    pub on_reply: WasmClosure,
    /// Run on a reject.
    pub on_reject: WasmClosure,
    /// Run if the reply or reject callback traps.
    pub on_cleanup: Option<WasmClosure>,
    /// The bounded-wait deadline, if any.
    pub deadline: Option<Time>,
}

/// The call contexts and callbacks of a canister.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CallContextManager {
    /// Next call context id to hand out.
    pub next_call_context_id: u64,
    /// Next callback id to hand out.
    pub next_callback_id: u64,
    /// Open call contexts.
    pub call_contexts: BTreeMap<CallContextId, CallContext>,
    /// Outstanding callbacks.
    pub callbacks: BTreeMap<CallbackId, Callback>,
}

/// A request from one canister to another (or to the management canister).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Request {
    /// The calling canister.
    pub sender: CanisterId,
    /// The called canister (`aaaaa-aa` for the management canister).
    pub receiver: CanisterId,
    /// The callback at the sender awaiting the response.
    pub sender_reply_callback: CallbackId,
    /// Method to call.
    pub method_name: String,
    /// Argument bytes.
    #[serde(with = "serde_bytes")]
    pub method_payload: Vec<u8>,
    /// Cycles attached.
    pub payment: Cycles,
    /// Bounded-wait deadline, if any.
    pub deadline: Option<Time>,
}

/// The payload of a response.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Payload {
    /// A reply.
    Data(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A reject.
    Reject {
        /// The reject code.
        code: RejectCode,
        /// The reject message.
        message: String,
    },
}

/// A response to a [`Request`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Response {
    /// The canister that made the call.
    pub originator: CanisterId,
    /// The canister that answers.
    pub respondent: CanisterId,
    /// The callback at the originator.
    pub originator_reply_callback: CallbackId,
    /// Cycles returned to the originator.
    pub refund: Cycles,
    /// Reply or reject.
    pub payload: Payload,
    /// Bounded-wait deadline of the call, if any.
    pub deadline: Option<Time>,
}

/// A message waiting in a canister's input queue.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CanisterMessage {
    /// An update call from a user.
    Ingress(SignedIngress),
    /// A call from a canister.
    Request(Request),
    /// A response to one of this canister's calls.
    Response(Response),
}

/// One entry of a canister's history (read by `canister_info`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanisterChange {
    /// Block time of the change.
    pub timestamp_nanos: u64,
    /// The canister version after the change.
    pub canister_version: u64,
    /// Who made it: a user or a canister (with its version, if known).
    pub origin: ChangeOrigin,
    /// What changed.
    pub details: ChangeDetails,
}

/// Who made a [`CanisterChange`].
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeOrigin {
    /// A user, directly.
    User(UserId),
    /// A canister, with its version if it said.
    Canister(CanisterId, Option<u64>),
}

/// What a [`CanisterChange`] was.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ChangeDetails {
    /// Created with these controllers.
    Creation {
        /// The controllers at creation.
        controllers: Vec<UserId>,
    },
    /// Code uninstalled.
    CodeUninstall,
    /// Code installed.
    CodeDeployment {
        /// 0 install, 1 reinstall, 2 upgrade.
        mode: u8,
        /// SHA-256 of the module.
        module_hash: [u8; 32],
    },
    /// Controllers changed.
    ControllersChange {
        /// The new controllers.
        controllers: Vec<UserId>,
    },
    /// A snapshot was loaded (added last: older states still decode).
    LoadSnapshot {
        /// The canister it was taken from, if not this one.
        from_canister_id: Option<CanisterId>,
        /// Its id.
        #[serde(with = "serde_bytes")]
        snapshot_id: Vec<u8>,
        /// The canister's version when it was taken.
        canister_version: u64,
        /// When it was taken.
        taken_at_timestamp: u64,
    },
}

/// Everything about a canister except its wasm execution state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemState {
    /// The canister's id.
    pub canister_id: CanisterId,
    /// Its controllers (at most 10).
    pub controllers: BTreeSet<UserId>,
    /// Running status.
    pub status: CanisterStatus,
    /// Cycles balance.
    pub cycles_balance: Cycles,
    /// Cycles reserved for future storage payments.
    pub reserved_balance: Cycles,
    /// Settings.
    pub settings: CanisterSettings,
    /// Data certified by the canister (at most 32 bytes).
    #[serde(with = "serde_bytes")]
    pub certified_data: Vec<u8>,
    /// The global timer deadline in ns (0 = unset).
    pub global_timer_nanos: u64,
    /// Incremented on every change of code, settings or controllers, and every successful update.
    pub canister_version: u64,
    /// Call contexts and callbacks.
    pub call_context_manager: CallContextManager,
    /// Messages waiting to be executed, in order.
    pub input_queue: VecDeque<CanisterMessage>,
    /// Chunks uploaded with `upload_chunk`, by SHA-256.
    pub wasm_chunk_store: BTreeMap<[u8; 32], Arc<serde_bytes::ByteBuf>>,
    /// Recent history, for `canister_info` (bounded).
    pub history: VecDeque<CanisterChange>,
    /// Total number of changes ever made (the history may be truncated).
    pub total_num_changes: u64,
    /// Time (block time) of the last heartbeat/timer bookkeeping, for storage charging.
    pub last_charged_time: Time,
    /// Whether the low-wasm-memory hook is due (condition became true and has not yet run).
    pub low_wasm_memory_hook_pending: bool,
}

impl SystemState {
    /// A new, empty canister with the given controllers and balance.
    pub fn new(
        canister_id: CanisterId,
        controllers: BTreeSet<UserId>,
        cycles: Cycles,
        now: Time,
    ) -> Self {
        SystemState {
            canister_id,
            controllers,
            status: CanisterStatus::Running,
            cycles_balance: cycles,
            reserved_balance: Cycles::ZERO,
            settings: CanisterSettings::default(),
            certified_data: Vec::new(),
            global_timer_nanos: 0,
            canister_version: 0,
            call_context_manager: CallContextManager::default(),
            input_queue: VecDeque::new(),
            wasm_chunk_store: BTreeMap::new(),
            history: VecDeque::new(),
            total_num_changes: 0,
            last_charged_time: now,
            low_wasm_memory_hook_pending: false,
        }
    }
}

/// The installed wasm module as uploaded (possibly gzip-compressed) plus what was learned when it
/// was validated. Shared by `Arc`: the bytes are immutable once installed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WasmBinary {
    /// The module as installed (gzip or plain); `module_hash` is its SHA-256.
    #[serde(with = "serde_bytes")]
    pub bytes: Vec<u8>,
    /// SHA-256 of `bytes`: the certified `module_hash`.
    pub module_hash: [u8; 32],
}

/// The kind of an exported canister method.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MethodKind {
    /// `canister_update <name>`.
    Update,
    /// `canister_query <name>`.
    Query,
    /// `canister_composite_query <name>`.
    CompositeQuery,
}

/// What validation learned about a module: exported methods, system hooks, custom sections.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModuleInfo {
    /// Whether the module's memory is 64-bit (memory64); then ic0 pointers are `i64`.
    pub is_wasm64: bool,
    /// Exported methods by name.
    pub methods: BTreeMap<String, MethodKind>,
    /// Exported system entry points among `canister_init`, `canister_pre_upgrade`,
    /// `canister_post_upgrade`, `canister_inspect_message`, `canister_heartbeat`,
    /// `canister_global_timer`, `canister_on_low_wasm_memory`.
    pub system_methods: BTreeSet<String>,
    /// `icp:public <name>` sections.
    pub public_metadata: BTreeMap<String, Vec<u8>>,
    /// `icp:private <name>` sections.
    pub private_metadata: BTreeMap<String, Vec<u8>>,
    /// Size of all custom sections in bytes.
    pub custom_sections_size: u64,
}

/// A wasm global's value, by type, as persisted between messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GlobalValue {
    /// i32.
    I32(i32),
    /// i64.
    I64(i64),
    /// f32, as bits (exact, NaN payloads included).
    F32(u32),
    /// f64, as bits.
    F64(u64),
    /// v128.
    V128(u128),
}

impl GlobalValue {
    /// Bytes the value takes (what memory metrics count for it).
    pub fn size_bytes(&self) -> u64 {
        match self {
            GlobalValue::I32(_) | GlobalValue::F32(_) => 4,
            GlobalValue::I64(_) | GlobalValue::F64(_) => 8,
            GlobalValue::V128(_) => 16,
        }
    }
}

/// The wasm side of an installed canister.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecutionState {
    /// The module.
    pub wasm_binary: Arc<WasmBinary>,
    /// What validation learned about it.
    pub module_info: Arc<ModuleInfo>,
    /// The wasm heap memory image.
    pub wasm_memory: PageMap,
    /// The heap's size in 64 KiB wasm pages.
    pub wasm_memory_size_pages: u64,
    /// The stable memory image.
    pub stable_memory: PageMap,
    /// Stable memory size in 64 KiB wasm pages.
    pub stable_memory_size_pages: u64,
    /// Every mutable global of the module, in definition order (persisted between messages).
    pub globals: Vec<GlobalValue>,
}

/// A canister.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CanisterState {
    /// System state.
    pub system_state: SystemState,
    /// Execution state; `None` when no module is installed ("empty" canister).
    pub execution_state: Option<ExecutionState>,
}

impl CanisterState {
    /// The canister's id.
    pub fn canister_id(&self) -> CanisterId {
        self.system_state.canister_id
    }

    /// SHA-256 of the installed module, if any.
    pub fn module_hash(&self) -> Option<[u8; 32]> {
        self.execution_state
            .as_ref()
            .map(|e| e.wasm_binary.module_hash)
    }

    /// Whether `principal` controls this canister.
    pub fn is_controller(&self, principal: &UserId) -> bool {
        self.system_state.controllers.contains(principal)
    }
}

/// Size of a wasm page in bytes (64 KiB).
pub const WASM_PAGE_SIZE: u64 = 65_536;
