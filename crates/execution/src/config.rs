//! Limits and fees of execution, and the facts about the subnet that execution needs.
//!
//! Every number here is a named limit (STYLE habit 5). The defaults follow the DFINITY
//! implementation's values for a 13-node application subnet (interface digest §7.4).

use openic_types::{Cycles, SubnetId};

/// Limits and fees of execution.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExecutionConfig {
    /// Instruction limit of one update call, response callback, heartbeat or timer.
    pub max_instructions_per_update: u64,
    /// Instruction limit of one query (for a composite query: of the whole call graph).
    pub max_instructions_per_query: u64,
    /// Instruction limit of one install, reinstall or upgrade (all hooks together).
    pub max_instructions_per_install: u64,
    /// Instruction limit of one `canister_inspect_message`.
    pub max_instructions_per_inspect: u64,
    /// Instructions after which a block stops taking further messages (the rest waits for the
    /// next block, and `work_pending` is reported).
    pub max_instructions_per_round: u64,
    /// Messages after which a block stops taking further messages.
    pub max_messages_per_round: u64,
    /// Instructions of one slice of a long execution (the IC's deterministic time slicing): an
    /// update, callback or system task that runs past it pauses and goes on in the next blocks,
    /// one slice per block, so it never holds a block for longer than a slice takes. 0 runs
    /// every execution in one go. Part of the replicated state machine: every replica of a
    /// subnet must use the same value.
    pub max_instructions_per_slice: u64,
    /// Most executions paused at once; a further execution runs in one go (replicated too).
    pub max_paused_executions: usize,
    /// Most paused executions granted a slice per block (they run in parallel on their threads,
    /// alongside the block's other messages); those that waited longest go first (replicated).
    pub max_paused_slices_per_round: usize,
    /// Slices a block grants the only paused execution when no message waits anywhere (fewer
    /// blocks for the same work; a message that arrives meanwhile waits at most these slices).
    pub slices_per_round_when_alone: u64,
    /// Maximum number of messages (ingress and requests) waiting in one canister's input queue;
    /// responses are always accepted, since every request has a reserved place for its response.
    pub max_canister_input_queue_len: usize,
    /// Maximum number of requests waiting for the management canister.
    pub max_subnet_queue_len: usize,
    /// Maximum number of entries in the ingress history; ingress beyond it is not inducted.
    pub max_ingress_history_len: usize,
    /// Maximum nesting depth of calls within one composite query.
    pub max_composite_query_depth: u32,
    /// Maximum number of calls one composite query may make in total.
    pub max_composite_query_calls: u32,
    /// Maximum size of a reply or reject payload produced by a replicated execution (bytes).
    pub max_response_bytes_replicated: u64,
    /// Maximum size of a reply produced by a non-replicated query (bytes).
    pub max_response_bytes_query: u64,
    /// Maximum size of the payload of one inter-canister request (bytes).
    pub max_inter_canister_payload_bytes: u64,
    /// Maximum wasm heap size in bytes (wasm32 addresses at most 4 GiB).
    pub max_wasm_memory_bytes: u64,
    /// Maximum stable memory size in bytes.
    pub max_stable_memory_bytes: u64,
    /// Base fee of every update execution (message, callback, task).
    pub update_message_execution_fee: Cycles,
    /// Fee per executed instruction (1 cycle on a 13-node subnet).
    pub cycles_per_instruction: Cycles,
    /// Base fee of inducting one ingress message, charged to the target canister.
    pub ingress_message_reception_fee: Cycles,
    /// Fee per byte of an ingress message.
    pub ingress_byte_reception_fee: Cycles,
    /// Base fee of one inter-canister call, charged to the caller.
    pub xnet_call_fee: Cycles,
    /// Fee per byte (method name plus payload) of an inter-canister call.
    pub xnet_byte_transmission_fee: Cycles,
    /// Fee for creating a canister.
    pub canister_creation_fee: Cycles,
    /// Storage fee in cycles per GiB per second.
    pub storage_fee_per_gib_second: Cycles,
    /// Fee per percent of compute allocation per second (the IC's, 13-node subnet).
    pub compute_percent_allocated_per_second_fee: Cycles,
    /// Memory the subnet's canisters may use together (bytes): the capacity of the storage
    /// reservation mechanism (see `reservation`).
    pub subnet_memory_capacity_bytes: u64,
    /// Subnet memory use above which new memory must reserve cycles for its future storage.
    pub subnet_memory_threshold_bytes: u64,
    /// How long the storage of memory allocated at full capacity is paid ahead, in seconds.
    pub max_storage_reservation_period_seconds: u64,
    /// Balance of a canister created with `provisional_create_canister_with_cycles` without an
    /// amount.
    pub default_provisional_cycles: Cycles,
    /// Minimum time between two heartbeats of one canister, in nanoseconds (0 = every block).
    pub heartbeat_interval_nanos: u64,
    /// Longest bounded-wait timeout a canister may ask for, in seconds.
    pub max_call_timeout_seconds: u32,
    /// Most callbacks (outstanding outgoing calls) one canister may have; at the limit
    /// `call_perform` returns 2.
    pub max_callbacks_per_canister: u64,
    /// How long a `stop_canister` call waits for the canister's open call contexts to close
    /// before it is rejected (the canister then stays stopping), in nanoseconds.
    pub stop_canister_timeout_nanos: u64,
}

/// Default of [`ExecutionConfig::stop_canister_timeout_nanos`]: five minutes.
pub const STOP_CANISTER_TIMEOUT_NANOS: u64 = 5 * 60 * 1_000_000_000;

/// Default of [`ExecutionConfig::subnet_memory_capacity_bytes`]: the IC's 2 TiB.
pub const SUBNET_MEMORY_CAPACITY_BYTES: u64 = 2 << 40;

/// Default of [`ExecutionConfig::subnet_memory_threshold_bytes`]: the IC's 750 GiB.
pub const SUBNET_MEMORY_THRESHOLD_BYTES: u64 = 750 << 30;

/// Default of [`ExecutionConfig::max_callbacks_per_canister`].
pub const MAX_CALLBACKS_PER_CANISTER: u64 = 5_000;

impl Default for ExecutionConfig {
    fn default() -> Self {
        ExecutionConfig {
            max_instructions_per_update: 40_000_000_000,
            max_instructions_per_query: 5_000_000_000,
            max_instructions_per_install: 300_000_000_000,
            max_instructions_per_inspect: 200_000_000,
            max_instructions_per_round: 1_000_000_000,
            max_messages_per_round: 10_000,
            max_instructions_per_slice: 100_000_000,
            max_paused_executions: 32,
            max_paused_slices_per_round: 1,
            slices_per_round_when_alone: 4,
            max_canister_input_queue_len: 500,
            max_subnet_queue_len: 10_000,
            max_ingress_history_len: 100_000,
            max_composite_query_depth: 6,
            max_composite_query_calls: 1_000,
            max_response_bytes_replicated: 2 * 1024 * 1024,
            max_response_bytes_query: 3 * 1024 * 1024,
            max_inter_canister_payload_bytes: 10 * 1024 * 1024,
            max_wasm_memory_bytes: 4 * 1024 * 1024 * 1024,
            max_stable_memory_bytes: 500 * 1024 * 1024 * 1024,
            update_message_execution_fee: Cycles(5_000_000),
            cycles_per_instruction: Cycles(1),
            ingress_message_reception_fee: Cycles(1_200_000),
            ingress_byte_reception_fee: Cycles(2_000),
            xnet_call_fee: Cycles(260_000),
            xnet_byte_transmission_fee: Cycles(1_000),
            canister_creation_fee: Cycles(500_000_000_000),
            storage_fee_per_gib_second: Cycles(127_000),
            compute_percent_allocated_per_second_fee: Cycles(10_000_000),
            subnet_memory_capacity_bytes: SUBNET_MEMORY_CAPACITY_BYTES,
            subnet_memory_threshold_bytes: SUBNET_MEMORY_THRESHOLD_BYTES,
            max_storage_reservation_period_seconds: 300_000_000,
            default_provisional_cycles: Cycles(100_000_000_000_000),
            heartbeat_interval_nanos: 0,
            max_call_timeout_seconds: 300,
            max_callbacks_per_canister: MAX_CALLBACKS_PER_CANISTER,
            stop_canister_timeout_nanos: STOP_CANISTER_TIMEOUT_NANOS,
        }
    }
}

/// Facts about the subnet that the System API and the management canister expose.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SubnetContext {
    /// This subnet's id (`subnet_self_*`).
    pub subnet_id: SubnetId,
    /// The DER-encoded BLS root key (`root_key_*`).
    pub root_key_der: Vec<u8>,
    /// Number of nodes in the subnet (`subnet_self_node_count`).
    pub node_count: u32,
}
