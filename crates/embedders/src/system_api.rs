//! The ic0 System API's semantics, independent of wasmtime: each method takes the canister's heap
//! as a byte slice and the per-execution state, and either returns the function's result or the
//! [`ExecutionError`] that makes the execution trap.

use crate::api::{
    ApiType, ExecutionError, OutgoingCall, SystemStateChanges, SystemStateView, WasmResponse,
};
use crate::config::WASM_PAGE_BYTES;
use crate::imports::Context;
use candid::Principal;
use openic_replicated_state::{PageMap, WasmClosure};
use openic_types::chain_keys::{ChainKeyAlgorithm, ChainKeyId};
use openic_types::{CanisterId, Cycles};

/// Longest reply or reject payload in replicated contexts.
pub const MAX_REPLY_BYTES_REPLICATED: usize = 2 * 1024 * 1024;
/// Longest reply payload in non-replicated contexts (queries).
pub const MAX_REPLY_BYTES_NON_REPLICATED: usize = 3 * 1024 * 1024;
/// Longest argument of an outgoing call (same-subnet requests).
pub const MAX_CALL_PAYLOAD_BYTES: usize = 10 * 1024 * 1024;
/// Most outgoing calls one execution may perform; `call_perform` returns 2 beyond it.
pub const MAX_OUTGOING_CALLS_PER_EXECUTION: usize = 500;
/// Longest method name of an outgoing call.
pub const MAX_CALL_METHOD_NAME_BYTES: usize = 20_000;
/// Upper bound for `call_with_best_effort_response` timeouts (MAX_CALL_TIMEOUT).
pub const MAX_CALL_TIMEOUT_SECONDS: u32 = 300;
/// Largest certified data.
pub const MAX_CERTIFIED_DATA_BYTES: usize = 32;
/// Largest principal.
pub const MAX_PRINCIPAL_BYTES: usize = 29;
/// Instructions charged for every System API call, on top of one per byte it copies.
pub const SYSTEM_API_CALL_INSTRUCTIONS: u64 = 50;
/// Largest stable memory reachable through the legacy 32-bit stable API, in wasm pages.
pub const MAX_LEGACY_STABLE_PAGES: u64 = 65_536;
/// Largest Candid parameter blob `cost_http_request_v2` accepts (the record of five `nat64`
/// fields is under 100 bytes; the cap stops hostile blobs before they are read or decoded).
pub const MAX_COST_HTTP_REQUEST_V2_PARAMS_BYTES: u64 = 1024;
/// Candid decoding quota (roughly: values decoded, weighted by cost) for parameters the System
/// API decodes, so a small blob that declares huge vectors fails fast instead of running for
/// minutes.
pub const CANDID_DECODING_QUOTA: usize = 10_000;
/// Candid skipping quota (values of unknown fields skipped) for the same parameters.
pub const CANDID_SKIPPING_QUOTA: usize = 1_000;
/// Longest `ic0.trap` message kept (and read from the heap); longer ones are cut and end with
/// [`TRAP_MESSAGE_TRUNCATED_MARKER`].
pub const MAX_TRAP_MESSAGE_BYTES: u64 = 16 * 1024;
/// Appended to a trap message cut at [`MAX_TRAP_MESSAGE_BYTES`].
pub const TRAP_MESSAGE_TRUNCATED_MARKER: &str = "... [trap message truncated:";

fn violation(message: impl Into<String>) -> ExecutionError {
    ExecutionError::ContractViolation(message.into())
}

/// A byte range of the heap, checked.
fn heap_range(
    heap_len: usize,
    start: u64,
    len: u64,
    function: &str,
) -> Result<std::ops::Range<usize>, ExecutionError> {
    let end = start
        .checked_add(len)
        .filter(|end| *end <= heap_len as u64)
        .ok_or_else(|| {
            violation(format!(
                "ic0.{function}: heap range [{start}, {start}+{len}) is out of bounds of the {heap_len}-byte heap"
            ))
        })?;
    Ok(start as usize..end as usize)
}

/// Reads `len` bytes at `start` from the heap.
pub(crate) fn heap_read<'h>(
    heap: &'h [u8],
    start: u64,
    len: u64,
    function: &str,
) -> Result<&'h [u8], ExecutionError> {
    let range = heap_range(heap.len(), start, len, function)?;
    Ok(&heap[range])
}

fn heap_write(
    heap: &mut [u8],
    start: u64,
    bytes: &[u8],
    function: &str,
) -> Result<(), ExecutionError> {
    let range = heap_range(heap.len(), start, bytes.len() as u64, function)?;
    heap[range].copy_from_slice(bytes);
    Ok(())
}

/// `*_copy(dst, offset, size)`: copies `source[offset..offset+size]` to the heap at `dst`.
fn copy_to_heap(
    heap: &mut [u8],
    dst: u64,
    offset: u64,
    size: u64,
    source: &[u8],
    function: &str,
) -> Result<(), ExecutionError> {
    let end = offset
        .checked_add(size)
        .filter(|end| *end <= source.len() as u64)
        .ok_or_else(|| {
            violation(format!(
                "ic0.{function}: source range [{offset}, {offset}+{size}) is out of bounds of the {}-byte source",
                source.len()
            ))
        })?;
    heap_write(heap, dst, &source[offset as usize..end as usize], function)
}

/// A 128-bit amount passed as `(high, low)`.
pub(crate) fn amount_128(high: i64, low: i64) -> u128 {
    ((high as u64 as u128) << 64) | (low as u64 as u128)
}

/// An outgoing call under construction.
#[derive(Debug)]
struct CallUnderConstruction {
    callee: CanisterId,
    method_name: String,
    payload: Vec<u8>,
    cycles: Cycles,
    on_reply: WasmClosure,
    on_reject: WasmClosure,
    on_cleanup: Option<WasmClosure>,
    timeout_seconds: Option<u32>,
}

/// What one execution's System API calls read and accumulate.
#[derive(Debug)]
pub(crate) struct SystemApi {
    api_type: ApiType,
    context: Context,
    view: SystemStateView,
    reply_buffer: Vec<u8>,
    response: Option<WasmResponse>,
    call: Option<CallUnderConstruction>,
    /// Cycles attached to performed calls plus their call fees (both leave the balance when
    /// the scheduler sends the calls).
    cycles_in_calls: Cycles,
    changes: SystemStateChanges,
    stable_memory: PageMap,
    stable_memory_pages: u64,
    stable_memory_limit_pages: u64,
    debug_prints: Vec<Vec<u8>>,
    debug_print_bytes: usize,
    max_debug_print_bytes: usize,
    max_reply_bytes: usize,
    /// Instructions executed so far (set before each System API call).
    pub(crate) instructions_so_far: u64,
    /// Instructions a System API call costs beyond the fixed charge (bytes copied).
    pub(crate) extra_instructions: u64,
}

/// Everything an execution produced through the System API.
pub(crate) struct SystemApiOutcome {
    pub response: Option<WasmResponse>,
    pub changes: SystemStateChanges,
    pub stable_memory: PageMap,
    pub stable_memory_pages: u64,
    pub debug_prints: Vec<Vec<u8>>,
}

impl SystemApi {
    /// State for one execution.
    pub(crate) fn new(
        api_type: ApiType,
        view: SystemStateView,
        stable_memory: PageMap,
        stable_memory_pages: u64,
        stable_memory_limit_bytes: u64,
        max_debug_print_bytes: usize,
    ) -> SystemApi {
        let context = Context::of(&api_type);
        let max_reply_bytes = if context.is_replicated() {
            MAX_REPLY_BYTES_REPLICATED
        } else {
            MAX_REPLY_BYTES_NON_REPLICATED
        };
        SystemApi {
            api_type,
            context,
            view,
            reply_buffer: Vec::new(),
            response: None,
            call: None,
            cycles_in_calls: Cycles::ZERO,
            changes: SystemStateChanges::default(),
            stable_memory,
            stable_memory_pages,
            stable_memory_limit_pages: (stable_memory_limit_bytes / WASM_PAGE_BYTES)
                .max(stable_memory_pages),
            debug_prints: Vec::new(),
            debug_print_bytes: 0,
            max_debug_print_bytes,
            max_reply_bytes,
            instructions_so_far: 0,
            extra_instructions: 0,
        }
    }

    /// The execution's outcome; a call under construction is discarded.
    pub(crate) fn finish(self) -> SystemApiOutcome {
        SystemApiOutcome {
            response: self.response,
            changes: self.changes,
            stable_memory: self.stable_memory,
            stable_memory_pages: self.stable_memory_pages,
            debug_prints: self.debug_prints,
        }
    }

    /// Lines printed so far (kept when the execution traps).
    pub(crate) fn take_debug_prints(&mut self) -> Vec<Vec<u8>> {
        std::mem::take(&mut self.debug_prints)
    }

    /// Records a line in the debug log, within the byte budget (a line past it is cut; the log
    /// keeps bytes, as the canister printed them).
    pub(crate) fn record_debug_line(&mut self, line: Vec<u8>) {
        let remaining = self
            .max_debug_print_bytes
            .saturating_sub(self.debug_print_bytes);
        if remaining == 0 {
            return;
        }
        let mut line = line;
        line.truncate(remaining);
        self.debug_print_bytes += line.len();
        self.debug_prints.push(line);
    }

    /// Traps unless `function` may be called in this execution's context.
    pub(crate) fn check_context(&self, function: &str, mask: u32) -> Result<(), ExecutionError> {
        if mask & self.context.bit() == 0 {
            return Err(ExecutionError::WrongContext(format!(
                "\"ic0_{function}\" cannot be executed in {} mode",
                self.context.describe()
            )));
        }
        Ok(())
    }

    fn charge_bytes(&mut self, bytes: usize) {
        self.extra_instructions = self.extra_instructions.saturating_add(bytes as u64);
    }

    fn copy_out(
        &mut self,
        heap: &mut [u8],
        dst: u64,
        offset: u64,
        size: u64,
        source: &[u8],
        function: &str,
    ) -> Result<(), ExecutionError> {
        self.charge_bytes(size as usize);
        copy_to_heap(heap, dst, offset, size, source, function)
    }

    fn write_128(
        &mut self,
        heap: &mut [u8],
        dst: u64,
        value: u128,
        function: &str,
    ) -> Result<(), ExecutionError> {
        heap_write(heap, dst, &value.to_le_bytes(), function)
    }

    // ---- Message data ----

    fn arg(&self) -> &[u8] {
        match &self.api_type {
            ApiType::Init { arg, .. }
            | ApiType::Update { arg, .. }
            | ApiType::Query { arg, .. }
            | ApiType::CompositeQuery { arg, .. }
            | ApiType::InspectMessage { arg, .. } => arg,
            ApiType::ReplyCallback { reply, .. } => reply,
            _ => &[],
        }
    }

    fn caller(&self) -> Principal {
        match &self.api_type {
            ApiType::Init { caller, .. }
            | ApiType::PreUpgrade { caller }
            | ApiType::Update { caller, .. }
            | ApiType::Query { caller, .. }
            | ApiType::CompositeQuery { caller, .. }
            | ApiType::ReplyCallback { caller, .. }
            | ApiType::RejectCallback { caller, .. }
            | ApiType::Cleanup { caller, .. }
            | ApiType::InspectMessage { caller, .. } => *caller,
            ApiType::SystemTask | ApiType::Start => Principal::management_canister(),
        }
    }

    /// `msg_arg_data_size`.
    pub(crate) fn msg_arg_data_size(&self) -> u64 {
        self.arg().len() as u64
    }

    /// `msg_arg_data_copy`.
    pub(crate) fn msg_arg_data_copy(
        &mut self,
        heap: &mut [u8],
        dst: u64,
        offset: u64,
        size: u64,
    ) -> Result<(), ExecutionError> {
        self.charge_bytes(size as usize);
        copy_to_heap(heap, dst, offset, size, self.arg(), "msg_arg_data_copy")
    }

    /// `msg_caller_size`.
    pub(crate) fn msg_caller_size(&self) -> u64 {
        self.caller().as_slice().len() as u64
    }

    /// `msg_caller_copy`.
    pub(crate) fn msg_caller_copy(
        &mut self,
        heap: &mut [u8],
        dst: u64,
        offset: u64,
        size: u64,
    ) -> Result<(), ExecutionError> {
        let caller = self.caller();
        self.copy_out(
            heap,
            dst,
            offset,
            size,
            caller.as_slice(),
            "msg_caller_copy",
        )
    }

    /// `msg_caller_info_*_copy`: the caller info is always empty here.
    pub(crate) fn empty_copy(
        &mut self,
        heap: &mut [u8],
        dst: u64,
        offset: u64,
        size: u64,
        function: &str,
    ) -> Result<(), ExecutionError> {
        self.copy_out(heap, dst, offset, size, &[], function)
    }

    fn method_name(&self) -> &str {
        match &self.api_type {
            ApiType::InspectMessage { method_name, .. } => method_name,
            _ => "",
        }
    }

    /// `msg_method_name_size`.
    pub(crate) fn msg_method_name_size(&self) -> u64 {
        self.method_name().len() as u64
    }

    /// `msg_method_name_copy`.
    pub(crate) fn msg_method_name_copy(
        &mut self,
        heap: &mut [u8],
        dst: u64,
        offset: u64,
        size: u64,
    ) -> Result<(), ExecutionError> {
        self.charge_bytes(size as usize);
        let name = self.method_name().as_bytes();
        copy_to_heap(heap, dst, offset, size, name, "msg_method_name_copy")
    }

    /// `accept_message`.
    pub(crate) fn accept_message(&mut self) -> Result<(), ExecutionError> {
        if self.changes.message_accepted {
            return Err(violation(
                "ic0.accept_message: the message was already accepted",
            ));
        }
        self.changes.message_accepted = true;
        Ok(())
    }

    /// `msg_reject_code`.
    pub(crate) fn msg_reject_code(&self) -> i32 {
        match &self.api_type {
            ApiType::RejectCallback { code, .. } => code.as_u64() as i32,
            ApiType::Cleanup { code, .. } => *code as i32,
            _ => 0,
        }
    }

    fn reject_message(&self) -> &str {
        match &self.api_type {
            ApiType::RejectCallback { message, .. } => message,
            _ => "",
        }
    }

    /// `msg_reject_msg_size`.
    pub(crate) fn msg_reject_msg_size(&self) -> u64 {
        self.reject_message().len() as u64
    }

    /// `msg_reject_msg_copy`.
    pub(crate) fn msg_reject_msg_copy(
        &mut self,
        heap: &mut [u8],
        dst: u64,
        offset: u64,
        size: u64,
    ) -> Result<(), ExecutionError> {
        self.charge_bytes(size as usize);
        let message = self.reject_message().as_bytes();
        copy_to_heap(heap, dst, offset, size, message, "msg_reject_msg_copy")
    }

    /// `msg_deadline`.
    pub(crate) fn msg_deadline(&self) -> u64 {
        match &self.api_type {
            ApiType::Update { deadline, .. }
            | ApiType::ReplyCallback { deadline, .. }
            | ApiType::RejectCallback { deadline, .. } => *deadline,
            _ => 0,
        }
    }

    // ---- Responding ----

    fn ensure_not_responded(&self, function: &str) -> Result<(), ExecutionError> {
        if self.response.is_some() {
            return Err(violation(format!(
                "ic0.{function}: the message was already replied to or rejected"
            )));
        }
        Ok(())
    }

    /// `msg_reply_data_append`.
    pub(crate) fn msg_reply_data_append(
        &mut self,
        heap: &[u8],
        src: u64,
        size: u64,
    ) -> Result<(), ExecutionError> {
        self.ensure_not_responded("msg_reply_data_append")?;
        let bytes = heap_read(heap, src, size, "msg_reply_data_append")?;
        if self.reply_buffer.len() + bytes.len() > self.max_reply_bytes {
            return Err(violation(format!(
                "ic0.msg_reply_data_append: the reply would exceed the limit of {} bytes",
                self.max_reply_bytes
            )));
        }
        self.reply_buffer.extend_from_slice(bytes);
        self.charge_bytes(bytes.len());
        Ok(())
    }

    /// `msg_reply`.
    pub(crate) fn msg_reply(&mut self) -> Result<(), ExecutionError> {
        self.ensure_not_responded("msg_reply")?;
        self.response = Some(WasmResponse::Reply(std::mem::take(&mut self.reply_buffer)));
        Ok(())
    }

    /// `msg_reject`.
    pub(crate) fn msg_reject(
        &mut self,
        heap: &[u8],
        src: u64,
        size: u64,
    ) -> Result<(), ExecutionError> {
        self.ensure_not_responded("msg_reject")?;
        let bytes = heap_read(heap, src, size, "msg_reject")?;
        if bytes.len() > self.max_reply_bytes {
            return Err(violation(format!(
                "ic0.msg_reject: the reject message exceeds the limit of {} bytes",
                self.max_reply_bytes
            )));
        }
        let message = std::str::from_utf8(bytes)
            .map_err(|_| violation("ic0.msg_reject: the reject message is not valid UTF-8"))?;
        self.charge_bytes(bytes.len());
        self.response = Some(WasmResponse::Reject(message.to_string()));
        Ok(())
    }

    // ---- Cycles ----

    fn cycles_available_total(&self) -> Cycles {
        match &self.api_type {
            ApiType::Update {
                cycles_available, ..
            }
            | ApiType::Query {
                cycles_available, ..
            }
            | ApiType::ReplyCallback {
                cycles_available, ..
            }
            | ApiType::RejectCallback {
                cycles_available, ..
            } => *cycles_available,
            _ => Cycles::ZERO,
        }
    }

    fn cycles_available(&self) -> Cycles {
        self.cycles_available_total()
            .saturating_sub(self.changes.cycles_accepted)
    }

    fn cycles_refunded(&self) -> Cycles {
        match &self.api_type {
            ApiType::ReplyCallback { refunded, .. } | ApiType::RejectCallback { refunded, .. } => {
                *refunded
            }
            _ => Cycles::ZERO,
        }
    }

    /// The balance as the canister sees it now: accepted cycles added, burned cycles and cycles
    /// attached to calls (performed or under construction) removed.
    fn balance(&self) -> Cycles {
        let in_construction = self.call.as_ref().map_or(Cycles::ZERO, |c| c.cycles);
        self.view
            .cycles_balance
            .saturating_add(self.changes.cycles_accepted)
            .saturating_sub(self.changes.cycles_burned)
            .saturating_sub(self.cycles_in_calls)
            .saturating_sub(in_construction)
    }

    fn liquid_balance(&self) -> Cycles {
        self.balance()
            .saturating_sub(self.view.freeze_threshold_cycles)
    }

    /// `msg_cycles_available128`.
    pub(crate) fn msg_cycles_available128(
        &mut self,
        heap: &mut [u8],
        dst: u64,
    ) -> Result<(), ExecutionError> {
        let value = self.cycles_available().get();
        self.write_128(heap, dst, value, "msg_cycles_available128")
    }

    /// `msg_cycles_refunded128`.
    pub(crate) fn msg_cycles_refunded128(
        &mut self,
        heap: &mut [u8],
        dst: u64,
    ) -> Result<(), ExecutionError> {
        let value = self.cycles_refunded().get();
        self.write_128(heap, dst, value, "msg_cycles_refunded128")
    }

    /// Accepts up to `max` of the available cycles and returns how many.
    pub(crate) fn accept_cycles(&mut self, max: u128) -> Cycles {
        let accepted = Cycles(max.min(self.cycles_available().get()));
        self.changes.cycles_accepted = self.changes.cycles_accepted.saturating_add(accepted);
        accepted
    }

    /// `msg_cycles_accept128`.
    pub(crate) fn msg_cycles_accept128(
        &mut self,
        heap: &mut [u8],
        max: u128,
        dst: u64,
    ) -> Result<(), ExecutionError> {
        heap_range(heap.len(), dst, 16, "msg_cycles_accept128")?;
        let accepted = self.accept_cycles(max);
        self.write_128(heap, dst, accepted.get(), "msg_cycles_accept128")
    }

    /// `cycles_burn128`: burns up to `amount` of the liquid balance.
    pub(crate) fn cycles_burn128(
        &mut self,
        heap: &mut [u8],
        amount: u128,
        dst: u64,
    ) -> Result<(), ExecutionError> {
        heap_range(heap.len(), dst, 16, "cycles_burn128")?;
        let burned = Cycles(amount.min(self.liquid_balance().get()));
        self.changes.cycles_burned = self.changes.cycles_burned.saturating_add(burned);
        self.write_128(heap, dst, burned.get(), "cycles_burn128")
    }

    /// The current balance (`canister_cycle_balance*`).
    #[cfg(test)]
    pub(crate) fn current_balance(&self) -> Cycles {
        self.balance()
    }

    /// `canister_cycle_balance128`.
    pub(crate) fn canister_cycle_balance128(
        &mut self,
        heap: &mut [u8],
        dst: u64,
    ) -> Result<(), ExecutionError> {
        let value = self.balance().get();
        self.write_128(heap, dst, value, "canister_cycle_balance128")
    }

    /// `canister_liquid_cycle_balance128`.
    pub(crate) fn canister_liquid_cycle_balance128(
        &mut self,
        heap: &mut [u8],
        dst: u64,
    ) -> Result<(), ExecutionError> {
        let value = self.liquid_balance().get();
        self.write_128(heap, dst, value, "canister_liquid_cycle_balance128")
    }

    /// Available cycles, for the legacy 64-bit API (traps above 64 bits).
    pub(crate) fn cycles_available_64(&self) -> Result<u64, ExecutionError> {
        to_u64(self.cycles_available())
    }

    /// Refunded cycles, for the legacy 64-bit API.
    pub(crate) fn cycles_refunded_64(&self) -> Result<u64, ExecutionError> {
        to_u64(self.cycles_refunded())
    }

    /// Balance, for the legacy 64-bit API.
    pub(crate) fn balance_64(&self) -> Result<u64, ExecutionError> {
        to_u64(self.balance())
    }

    // ---- Identity and environment ----

    /// `canister_self_size`.
    pub(crate) fn canister_self_size(&self) -> u64 {
        self.view.canister_id.get().as_slice().len() as u64
    }

    /// `canister_self_copy`.
    pub(crate) fn canister_self_copy(
        &mut self,
        heap: &mut [u8],
        dst: u64,
        offset: u64,
        size: u64,
    ) -> Result<(), ExecutionError> {
        let id = self.view.canister_id.get();
        self.copy_out(heap, dst, offset, size, id.as_slice(), "canister_self_copy")
    }

    /// `canister_status`.
    pub(crate) fn canister_status(&self) -> i32 {
        self.view.status_code
    }

    /// `canister_version`.
    pub(crate) fn canister_version(&self) -> u64 {
        self.view.canister_version
    }

    /// `subnet_self_size`.
    pub(crate) fn subnet_self_size(&self) -> u64 {
        self.view.subnet_id.0.as_slice().len() as u64
    }

    /// `subnet_self_copy`.
    pub(crate) fn subnet_self_copy(
        &mut self,
        heap: &mut [u8],
        dst: u64,
        offset: u64,
        size: u64,
    ) -> Result<(), ExecutionError> {
        let id = self.view.subnet_id.0;
        self.copy_out(heap, dst, offset, size, id.as_slice(), "subnet_self_copy")
    }

    /// `subnet_self_node_count`.
    pub(crate) fn subnet_self_node_count(&self) -> i32 {
        self.view.subnet_node_count as i32
    }

    /// `time`.
    pub(crate) fn time(&self) -> u64 {
        self.view.time.as_nanos_since_unix_epoch()
    }

    /// `global_timer_set`: returns the previous value.
    pub(crate) fn global_timer_set(&mut self, timestamp: u64) -> u64 {
        let previous = self
            .changes
            .global_timer_nanos
            .unwrap_or(self.view.global_timer_nanos);
        self.changes.global_timer_nanos = Some(timestamp);
        previous
    }

    /// `performance_counter`.
    pub(crate) fn performance_counter(&self, counter_type: i32) -> Result<u64, ExecutionError> {
        match counter_type {
            0 => Ok(self.instructions_so_far),
            1 => Ok(self
                .view
                .call_context_instructions
                .saturating_add(self.instructions_so_far)),
            other => Err(violation(format!(
                "ic0.performance_counter: unknown counter type {other} (0 and 1 exist)"
            ))),
        }
    }

    /// `is_controller`.
    pub(crate) fn is_controller(
        &mut self,
        heap: &[u8],
        src: u64,
        size: u64,
    ) -> Result<i32, ExecutionError> {
        let bytes = heap_read(heap, src, size, "is_controller")?;
        let principal = parse_principal(bytes, "is_controller")?;
        Ok(self.view.controllers.contains(&principal) as i32)
    }

    /// `in_replicated_execution`.
    pub(crate) fn in_replicated_execution(&self) -> i32 {
        self.context.is_replicated() as i32
    }

    // ---- Certification ----

    /// `certified_data_set`.
    pub(crate) fn certified_data_set(
        &mut self,
        heap: &[u8],
        src: u64,
        size: u64,
    ) -> Result<(), ExecutionError> {
        if size as usize > MAX_CERTIFIED_DATA_BYTES {
            return Err(violation(format!(
                "ic0.certified_data_set: {size} bytes given, at most {MAX_CERTIFIED_DATA_BYTES} allowed"
            )));
        }
        let bytes = heap_read(heap, src, size, "certified_data_set")?.to_vec();
        self.changes.certified_data = Some(bytes);
        Ok(())
    }

    fn data_certificate(&self) -> Option<&[u8]> {
        match &self.api_type {
            ApiType::Query {
                data_certificate: Some(certificate),
                replicated: false,
                ..
            }
            | ApiType::CompositeQuery {
                data_certificate: Some(certificate),
                ..
            } => Some(certificate),
            _ => None,
        }
    }

    /// `data_certificate_present`.
    pub(crate) fn data_certificate_present(&self) -> i32 {
        self.data_certificate().is_some() as i32
    }

    fn require_certificate(&self, function: &str) -> Result<&[u8], ExecutionError> {
        self.data_certificate().ok_or_else(|| {
            violation(format!(
                "ic0.{function}: no data certificate is present (check data_certificate_present first)"
            ))
        })
    }

    /// `data_certificate_size`.
    pub(crate) fn data_certificate_size(&self) -> Result<u64, ExecutionError> {
        Ok(self.require_certificate("data_certificate_size")?.len() as u64)
    }

    /// `data_certificate_copy`.
    pub(crate) fn data_certificate_copy(
        &mut self,
        heap: &mut [u8],
        dst: u64,
        offset: u64,
        size: u64,
    ) -> Result<(), ExecutionError> {
        self.require_certificate("data_certificate_copy")?;
        self.charge_bytes(size as usize);
        let certificate = self.data_certificate().unwrap_or_default();
        copy_to_heap(
            heap,
            dst,
            offset,
            size,
            certificate,
            "data_certificate_copy",
        )
    }

    /// `root_key_size`.
    pub(crate) fn root_key_size(&self) -> u64 {
        self.view.root_key_der.len() as u64
    }

    /// `root_key_copy`.
    pub(crate) fn root_key_copy(
        &mut self,
        heap: &mut [u8],
        dst: u64,
        offset: u64,
        size: u64,
    ) -> Result<(), ExecutionError> {
        self.charge_bytes(size as usize);
        copy_to_heap(
            heap,
            dst,
            offset,
            size,
            &self.view.root_key_der,
            "root_key_copy",
        )
    }

    // ---- Calls ----

    /// `call_new`. A call already under construction is discarded (its cycles return).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn call_new(
        &mut self,
        heap: &[u8],
        callee_src: u64,
        callee_size: u64,
        name_src: u64,
        name_size: u64,
        on_reply: WasmClosure,
        on_reject: WasmClosure,
    ) -> Result<(), ExecutionError> {
        let callee = parse_principal(
            heap_read(heap, callee_src, callee_size, "call_new")?,
            "call_new",
        )?;
        if name_size as usize > MAX_CALL_METHOD_NAME_BYTES {
            return Err(violation(format!(
                "ic0.call_new: the method name is {name_size} bytes, more than the limit of {MAX_CALL_METHOD_NAME_BYTES}"
            )));
        }
        let name = heap_read(heap, name_src, name_size, "call_new")?;
        let method_name = std::str::from_utf8(name)
            .map_err(|_| violation("ic0.call_new: the method name is not valid UTF-8"))?
            .to_string();
        self.charge_bytes(name.len());
        self.call = Some(CallUnderConstruction {
            callee: CanisterId::unchecked_from_principal(callee),
            method_name,
            payload: Vec::new(),
            cycles: Cycles::ZERO,
            on_reply,
            on_reject,
            on_cleanup: None,
            timeout_seconds: None,
        });
        Ok(())
    }

    fn call_mut(&mut self, function: &str) -> Result<&mut CallUnderConstruction, ExecutionError> {
        self.call.as_mut().ok_or_else(|| {
            violation(format!(
                "ic0.{function}: no call is under construction (call ic0.call_new first)"
            ))
        })
    }

    /// `call_on_cleanup`.
    pub(crate) fn call_on_cleanup(&mut self, closure: WasmClosure) -> Result<(), ExecutionError> {
        let call = self.call_mut("call_on_cleanup")?;
        if call.on_cleanup.is_some() {
            return Err(violation(
                "ic0.call_on_cleanup: the cleanup callback was already set for this call",
            ));
        }
        call.on_cleanup = Some(closure);
        Ok(())
    }

    /// `call_data_append`.
    pub(crate) fn call_data_append(
        &mut self,
        heap: &[u8],
        src: u64,
        size: u64,
    ) -> Result<(), ExecutionError> {
        let bytes = heap_read(heap, src, size, "call_data_append")?;
        let call = self.call_mut("call_data_append")?;
        if call.payload.len() + bytes.len() > MAX_CALL_PAYLOAD_BYTES {
            return Err(violation(format!(
                "ic0.call_data_append: the call's argument would exceed the limit of {MAX_CALL_PAYLOAD_BYTES} bytes"
            )));
        }
        call.payload.extend_from_slice(bytes);
        self.charge_bytes(bytes.len());
        Ok(())
    }

    /// `call_with_best_effort_response`.
    pub(crate) fn call_with_best_effort_response(
        &mut self,
        timeout_seconds: u32,
    ) -> Result<(), ExecutionError> {
        let call = self.call_mut("call_with_best_effort_response")?;
        if call.timeout_seconds.is_some() {
            return Err(violation(
                "ic0.call_with_best_effort_response: the timeout was already set for this call",
            ));
        }
        call.timeout_seconds = Some(timeout_seconds.min(MAX_CALL_TIMEOUT_SECONDS));
        Ok(())
    }

    /// `call_cycles_add128`: moves cycles from the balance onto the call; traps if the balance
    /// does not have them.
    pub(crate) fn call_cycles_add128(&mut self, amount: u128) -> Result<(), ExecutionError> {
        self.call_mut("call_cycles_add128")?;
        let balance = self.balance();
        if amount > balance.get() {
            return Err(violation(format!(
                "ic0.call_cycles_add128: cannot attach {amount} cycles, the balance is only {balance}"
            )));
        }
        let call = self.call_mut("call_cycles_add128")?;
        call.cycles = call.cycles.saturating_add(Cycles(amount));
        Ok(())
    }

    /// `call_perform`: 0 if the call was queued, 2 if it could not be (it is then discarded and
    /// its cycles return to the balance).
    pub(crate) fn call_perform(&mut self) -> Result<i32, ExecutionError> {
        self.call_mut("call_perform")?;
        let Some(call) = self.call.take() else {
            return Ok(2);
        };
        // The call was taken out of construction above, so its cycles are back in the balance:
        // the cycles plus the call fee (which the scheduler charges when it sends the call) must
        // be liquid.
        let liquid_with_call = self.liquid_balance();
        let fee = Cycles(self.cost_call(call.method_name.len() as u64, call.payload.len() as u64));
        let max_calls =
            (MAX_OUTGOING_CALLS_PER_EXECUTION as u64).min(self.view.remaining_callbacks);
        if !self.view.can_make_calls
            || self.changes.calls.len() as u64 >= max_calls
            || call.cycles.saturating_add(fee) > liquid_with_call
        {
            return Ok(2);
        }
        self.cycles_in_calls = self
            .cycles_in_calls
            .saturating_add(call.cycles)
            .saturating_add(fee);
        self.changes.calls.push(OutgoingCall {
            callee: call.callee,
            method_name: call.method_name,
            payload: call.payload,
            cycles: call.cycles,
            on_reply: call.on_reply,
            on_reject: call.on_reject,
            on_cleanup: call.on_cleanup,
            timeout_seconds: call.timeout_seconds,
        });
        Ok(0)
    }

    // ---- Stable memory ----

    /// `stable64_size`.
    pub(crate) fn stable_size(&self) -> u64 {
        self.stable_memory_pages
    }

    /// Legacy `stable_size` (traps above 4 GiB).
    pub(crate) fn stable_size_32(&self) -> Result<i32, ExecutionError> {
        if self.stable_memory_pages > MAX_LEGACY_STABLE_PAGES {
            return Err(ExecutionError::Trapped(
                "32 bit stable memory api used on a memory larger than 4GB".to_string(),
            ));
        }
        Ok(self.stable_memory_pages as i32)
    }

    /// `stable64_grow`: the previous size, or -1 if the limit would be exceeded.
    pub(crate) fn stable_grow(&mut self, pages: u64, limit_pages: u64) -> i64 {
        let limit = self.stable_memory_limit_pages.min(limit_pages);
        match self.stable_memory_pages.checked_add(pages) {
            Some(new) if new <= limit => {
                let previous = self.stable_memory_pages;
                self.stable_memory_pages = new;
                previous as i64
            }
            _ => -1,
        }
    }

    fn stable_range(&self, offset: u64, size: u64) -> Result<(), ExecutionError> {
        let stable_bytes = self.stable_memory_pages * WASM_PAGE_BYTES;
        match offset.checked_add(size) {
            Some(end) if end <= stable_bytes => Ok(()),
            // The IC's trap (IC0502) and text, which canisters and their tests match on.
            _ => Err(ExecutionError::Trapped(
                "stable memory out of bounds".to_string(),
            )),
        }
    }

    /// `stable64_write`.
    pub(crate) fn stable_write(
        &mut self,
        heap: &[u8],
        offset: u64,
        src: u64,
        size: u64,
        function: &str,
    ) -> Result<(), ExecutionError> {
        self.stable_range(offset, size)?;
        let bytes = heap_read(heap, src, size, function)?;
        self.stable_memory.write(offset, bytes);
        self.charge_bytes(bytes.len());
        Ok(())
    }

    /// `stable64_read`.
    pub(crate) fn stable_read(
        &mut self,
        heap: &mut [u8],
        dst: u64,
        offset: u64,
        size: u64,
        function: &str,
    ) -> Result<(), ExecutionError> {
        self.stable_range(offset, size)?;
        let range = heap_range(heap.len(), dst, size, function)?;
        self.stable_memory.read(offset, &mut heap[range]);
        self.charge_bytes(size as usize);
        Ok(())
    }

    // ---- Costs ----

    /// `cost_call`.
    pub(crate) fn cost_call(&self, method_name_size: u64, payload_size: u64) -> u128 {
        let bytes = method_name_size.saturating_add(payload_size) as u128;
        self.view
            .call_base_fee
            .get()
            .saturating_add(self.view.call_fee_per_byte.get().saturating_mul(bytes))
    }

    /// `cost_create_canister`.
    pub(crate) fn cost_create_canister(&self) -> u128 {
        self.view.create_canister_fee.get()
    }

    /// `cost_http_request`: `(3M + 60k·n)·n + (400·request + 800·max_response)·n`.
    pub(crate) fn cost_http_request(&self, request_size: u64, max_response_bytes: u64) -> u128 {
        let n = self.view.subnet_node_count.max(1) as u128;
        (3_000_000 + 60_000 * n) * n
            + (400u128
                .saturating_mul(request_size as u128)
                .saturating_add(800u128.saturating_mul(max_response_bytes as u128)))
            .saturating_mul(n)
    }

    /// Refuses a `cost_http_request_v2` parameter blob longer than
    /// [`MAX_COST_HTTP_REQUEST_V2_PARAMS_BYTES`], before anything is read.
    pub(crate) fn check_cost_http_request_v2_size(&self, size: u64) -> Result<(), ExecutionError> {
        if size > MAX_COST_HTTP_REQUEST_V2_PARAMS_BYTES {
            return Err(violation(format!(
                "ic0.cost_http_request_v2: the parameters are {size} bytes, more than the limit of {MAX_COST_HTTP_REQUEST_V2_PARAMS_BYTES}"
            )));
        }
        Ok(())
    }

    /// `cost_http_request_v2` over Candid-encoded parameters.
    pub(crate) fn cost_http_request_v2(&self, params: &[u8]) -> Result<u128, ExecutionError> {
        #[derive(serde::Deserialize, candid::CandidType)]
        struct Params {
            request_bytes: u64,
            http_roundtrip_time_ms: u64,
            raw_response_bytes: u64,
            transformed_response_bytes: u64,
            transform_instructions: u64,
        }
        self.check_cost_http_request_v2_size(params.len() as u64)?;
        let mut config = candid::de::DecoderConfig::new();
        config
            .set_decoding_quota(CANDID_DECODING_QUOTA)
            .set_skipping_quota(CANDID_SKIPPING_QUOTA);
        let params: Params = candid::utils::decode_one_with_config(params, &config).map_err(|e| {
            violation(format!(
                "ic0.cost_http_request_v2: the parameters are not a Candid record {{ request_bytes; http_roundtrip_time_ms; raw_response_bytes; transformed_response_bytes; transform_instructions }} of nat64: {e}"
            ))
        })?;
        let n = self.view.subnet_node_count.max(1) as u128;
        let per_node = 1_000_000u128
            .saturating_add(50u128.saturating_mul(params.request_bytes as u128))
            .saturating_add(140_000 * n)
            .saturating_add(800 * n * n)
            .saturating_add(50u128.saturating_mul(params.raw_response_bytes as u128))
            .saturating_add(
                (10 * n + 600).saturating_mul(params.transformed_response_bytes as u128),
            )
            .saturating_add(
                (params.transform_instructions as u128)
                    .saturating_add(params.http_roundtrip_time_ms as u128 * 1_000)
                    / 13,
            );
        Ok(per_node.saturating_mul(n))
    }

    /// `cost_sign_with_ecdsa` / `cost_sign_with_schnorr` / `cost_vetkd_derive_key`: the fee the
    /// management method charges for the key (`Ok`), or 1 for an unknown curve or algorithm and 2
    /// for a key this subnet does not hold (`Err`). A name that is not UTF-8 is a contract
    /// violation, as on the Internet Computer.
    pub(crate) fn cost_threshold_key(
        &self,
        heap: &[u8],
        src: u64,
        size: u64,
        algorithm: Option<ChainKeyAlgorithm>,
        function: &str,
    ) -> Result<Result<u128, i32>, ExecutionError> {
        let name = heap_read(heap, src, size, function)?;
        let name = std::str::from_utf8(name).map_err(|_| {
            violation(format!(
                "ic0.{function}: Failed to decode key name {}",
                String::from_utf8_lossy(name)
            ))
        })?;
        let Some(algorithm) = algorithm else {
            return Ok(Err(1));
        };
        let key = ChainKeyId {
            algorithm,
            name: name.to_string(),
        };
        Ok(key.fee().map(|fee| fee.0).ok_or(2))
    }

    /// Writes a 128-bit cost.
    pub(crate) fn write_cost(
        &mut self,
        heap: &mut [u8],
        dst: u64,
        value: u128,
        function: &str,
    ) -> Result<(), ExecutionError> {
        self.write_128(heap, dst, value, function)
    }

    // ---- Environment variables ----

    fn env_var_at(&self, index: u64, function: &str) -> Result<&str, ExecutionError> {
        self.view
            .environment_variables
            .keys()
            .nth(index as usize)
            .map(String::as_str)
            .ok_or_else(|| {
                violation(format!(
                    "ic0.{function}: index {index} is out of bounds ({} environment variables)",
                    self.view.environment_variables.len()
                ))
            })
    }

    fn env_var_value(
        &self,
        heap: &[u8],
        src: u64,
        size: u64,
        function: &str,
    ) -> Result<Option<&str>, ExecutionError> {
        let name = heap_read(heap, src, size, function)?;
        let name = std::str::from_utf8(name).map_err(|_| {
            violation(format!(
                "ic0.{function}: the variable name is not valid UTF-8"
            ))
        })?;
        Ok(self
            .view
            .environment_variables
            .get(name)
            .map(String::as_str))
    }

    /// `env_var_count`.
    pub(crate) fn env_var_count(&self) -> u64 {
        self.view.environment_variables.len() as u64
    }

    /// `env_var_name_size`.
    pub(crate) fn env_var_name_size(&self, index: u64) -> Result<u64, ExecutionError> {
        Ok(self.env_var_at(index, "env_var_name_size")?.len() as u64)
    }

    /// `env_var_name_copy`.
    pub(crate) fn env_var_name_copy(
        &mut self,
        heap: &mut [u8],
        index: u64,
        dst: u64,
        offset: u64,
        size: u64,
    ) -> Result<(), ExecutionError> {
        let name = self
            .env_var_at(index, "env_var_name_copy")?
            .as_bytes()
            .to_vec();
        self.copy_out(heap, dst, offset, size, &name, "env_var_name_copy")
    }

    /// `env_var_name_exists`.
    pub(crate) fn env_var_name_exists(
        &self,
        heap: &[u8],
        src: u64,
        size: u64,
    ) -> Result<i32, ExecutionError> {
        Ok(self
            .env_var_value(heap, src, size, "env_var_name_exists")?
            .is_some() as i32)
    }

    /// `env_var_value_size`.
    pub(crate) fn env_var_value_size(
        &self,
        heap: &[u8],
        src: u64,
        size: u64,
    ) -> Result<u64, ExecutionError> {
        self.env_var_value(heap, src, size, "env_var_value_size")?
            .map(|value| value.len() as u64)
            .ok_or_else(|| violation("ic0.env_var_value_size: no such environment variable"))
    }

    /// `env_var_value_copy`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn env_var_value_copy(
        &mut self,
        heap: &mut [u8],
        name_src: u64,
        name_size: u64,
        dst: u64,
        offset: u64,
        size: u64,
    ) -> Result<(), ExecutionError> {
        let value = self
            .env_var_value(heap, name_src, name_size, "env_var_value_copy")?
            .ok_or_else(|| violation("ic0.env_var_value_copy: no such environment variable"))?
            .as_bytes()
            .to_vec();
        self.copy_out(heap, dst, offset, size, &value, "env_var_value_copy")
    }

    // ---- Debugging ----

    /// `debug_print`: never traps (an out-of-bounds range prints nothing).
    pub(crate) fn debug_print(&mut self, heap: &[u8], src: u64, size: u64) {
        let Ok(bytes) = heap_read(heap, src, size, "debug_print") else {
            return;
        };
        let line = bytes.to_vec();
        self.charge_bytes(bytes.len());
        self.record_debug_line(line);
    }

    /// `trap`: always returns the error that ends the execution. At most
    /// [`MAX_TRAP_MESSAGE_BYTES`] of the message are read (and charged, one instruction per
    /// byte); a longer message is cut and marked, so a canister cannot make the node copy or log
    /// megabytes for free.
    pub(crate) fn trap(&mut self, heap: &[u8], src: u64, size: u64) -> ExecutionError {
        let kept = size.min(MAX_TRAP_MESSAGE_BYTES);
        let message = match heap_read(heap, src, kept, "trap") {
            Ok(bytes) => {
                self.charge_bytes(bytes.len());
                let mut message = String::from_utf8_lossy(bytes).into_owned();
                if size > kept {
                    message.push_str(&format!(
                        "{TRAP_MESSAGE_TRUNCATED_MARKER} {} of {size} bytes shown]",
                        bytes.len()
                    ));
                }
                message
            }
            Err(_) => String::new(),
        };
        ExecutionError::CalledTrap(message)
    }
}

/// A cycles amount for the 64-bit System API (the IC's trap when it does not fit).
fn to_u64(cycles: Cycles) -> Result<u64, ExecutionError> {
    u64::try_from(cycles.get()).map_err(|_| {
        ExecutionError::Trapped("cycles amount exceeds 64-bit representation".to_string())
    })
}

fn parse_principal(bytes: &[u8], function: &str) -> Result<Principal, ExecutionError> {
    if bytes.len() > MAX_PRINCIPAL_BYTES {
        return Err(violation(format!(
            "ic0.{function}: a principal has at most {MAX_PRINCIPAL_BYTES} bytes, {} given",
            bytes.len()
        )));
    }
    Principal::try_from_slice(bytes)
        .map_err(|e| violation(format!("ic0.{function}: invalid principal: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use openic_types::{SubnetId, Time};
    use std::collections::{BTreeMap, BTreeSet};

    fn view() -> SystemStateView {
        SystemStateView {
            canister_id: CanisterId::from_u64(1),
            controllers: BTreeSet::new(),
            status_code: 1,
            cycles_balance: Cycles(1_000),
            freeze_threshold_cycles: Cycles(100),
            canister_version: 3,
            time: Time(42),
            subnet_id: SubnetId(Principal::management_canister()),
            subnet_node_count: 1,
            root_key_der: vec![1, 2, 3],
            global_timer_nanos: 5,
            environment_variables: BTreeMap::new(),
            can_make_calls: true,
            call_base_fee: Cycles(10),
            call_fee_per_byte: Cycles(1),
            create_canister_fee: Cycles(500),
            call_context_instructions: 0,
            remaining_callbacks: 1_000,
        }
    }

    fn update(cycles: u128) -> SystemApi {
        update_with_view(cycles, view())
    }

    fn update_with_view(cycles: u128, view: SystemStateView) -> SystemApi {
        SystemApi::new(
            ApiType::Update {
                caller: Principal::anonymous(),
                arg: vec![9, 8, 7],
                cycles_available: Cycles(cycles),
                deadline: 0,
            },
            view,
            PageMap::new(),
            0,
            1 << 20,
            1024,
        )
    }

    #[test]
    fn copy_checks_both_ranges() {
        let mut api = update(0);
        let mut heap = vec![0u8; 8];
        api.msg_arg_data_copy(&mut heap, 5, 0, 3).unwrap();
        assert_eq!(&heap[5..], &[9, 8, 7]);
        assert!(api.msg_arg_data_copy(&mut heap, 6, 0, 3).is_err());
        assert!(api.msg_arg_data_copy(&mut heap, 0, 1, 3).is_err());
        assert!(api.msg_arg_data_copy(&mut heap, u64::MAX, 0, 1).is_err());
    }

    #[test]
    fn cycles_accounting() {
        let mut api = update(300);
        assert_eq!(api.accept_cycles(200), Cycles(200));
        assert_eq!(api.accept_cycles(200), Cycles(100));
        assert_eq!(api.current_balance(), Cycles(1_300));
        let mut heap = vec![0u8; 16];
        api.cycles_burn128(&mut heap, 10_000, 0).unwrap();
        assert_eq!(u128::from_le_bytes(heap[..16].try_into().unwrap()), 1_200);
        assert_eq!(api.current_balance(), Cycles(100));
        assert_eq!(amount_128(1, 2), (1u128 << 64) | 2);
    }

    #[test]
    fn replying_twice_traps() {
        let mut api = update(0);
        api.msg_reply().unwrap();
        assert!(api.msg_reply().is_err());
        assert!(api.msg_reject(&[], 0, 0).is_err());
    }

    /// A Candid record of the five `nat64` parameters plus an unknown field of type `vec null`
    /// that claims `extra_len` elements (each costs nothing on the wire).
    fn http_params_with_huge_vec(extra_len: u64) -> Vec<u8> {
        fn leb(mut value: u64, out: &mut Vec<u8>) {
            loop {
                let byte = (value & 0x7f) as u8;
                value >>= 7;
                if value == 0 {
                    out.push(byte);
                    return;
                }
                out.push(byte | 0x80);
            }
        }
        let mut fields: Vec<(u32, bool)> = [
            "request_bytes",
            "http_roundtrip_time_ms",
            "raw_response_bytes",
            "transformed_response_bytes",
            "transform_instructions",
        ]
        .iter()
        .map(|name| (candid::idl_hash(name), false))
        .collect();
        fields.push((0xFFFF_FFF0, true));
        fields.sort();
        let mut bytes = b"DIDL".to_vec();
        bytes.push(2); // two types
        bytes.push(0x6c); // type 0: record
        bytes.push(fields.len() as u8);
        for (hash, extra) in &fields {
            leb(u64::from(*hash), &mut bytes);
            bytes.push(if *extra { 1 } else { 0x78 }); // vec null (type 1) or nat64
        }
        bytes.extend_from_slice(&[0x6d, 0x7f]); // type 1: vec null
        bytes.extend_from_slice(&[1, 0]); // one argument of type 0
        for (_, extra) in &fields {
            if *extra {
                leb(extra_len, &mut bytes);
            } else {
                bytes.extend_from_slice(&7u64.to_le_bytes());
            }
        }
        bytes
    }

    #[test]
    #[allow(
        clippy::disallowed_methods,
        reason = "measures that hostile input is refused quickly"
    )]
    fn cost_http_request_v2_refuses_hostile_candid_fast() {
        let api = update(0);
        let small = http_params_with_huge_vec(3);
        assert!(api.cost_http_request_v2(&small).is_ok());
        let hostile = http_params_with_huge_vec(4_000_000_000);
        assert!(hostile.len() <= 100, "{} bytes", hostile.len());
        let started = std::time::Instant::now();
        let error = api.cost_http_request_v2(&hostile).unwrap_err();
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "decoding took {:?}",
            started.elapsed()
        );
        assert!(
            error.to_string().contains("cost_http_request_v2"),
            "{error}"
        );
        let too_long = vec![0u8; MAX_COST_HTTP_REQUEST_V2_PARAMS_BYTES as usize + 1];
        let error = api.cost_http_request_v2(&too_long).unwrap_err();
        assert!(error.to_string().contains("limit of 1024"), "{error}");
        assert!(
            api.check_cost_http_request_v2_size(u64::MAX).is_err(),
            "a huge size is refused before the heap is read"
        );
    }

    #[test]
    fn trap_message_is_capped_and_charged() {
        let mut api = update(0);
        let heap = vec![b'x'; 100_000];
        api.extra_instructions = 0;
        let ExecutionError::CalledTrap(message) = api.trap(&heap, 0, 100_000) else {
            panic!("trap returns CalledTrap");
        };
        assert!(message.starts_with(&"x".repeat(MAX_TRAP_MESSAGE_BYTES as usize)));
        assert!(message.contains(TRAP_MESSAGE_TRUNCATED_MARKER), "{message}");
        assert!(message.contains("16384 of 100000 bytes shown"), "{message}");
        assert!(message.len() < MAX_TRAP_MESSAGE_BYTES as usize + 100);
        assert_eq!(api.extra_instructions, MAX_TRAP_MESSAGE_BYTES);
        let ExecutionError::CalledTrap(short) = api.trap(b"boom", 0, 4) else {
            panic!("trap returns CalledTrap");
        };
        assert_eq!(short, "boom");
        // A range reaching past the heap is cut at the cap first, then checked.
        let ExecutionError::CalledTrap(empty) = api.trap(b"boom", 2, u64::MAX) else {
            panic!("trap returns CalledTrap");
        };
        assert_eq!(empty, "");
    }

    /// A heap with callee `CanisterId::from_u64(5)` at 0 (10 bytes) and method "greet" at 10.
    fn call_heap() -> Vec<u8> {
        let mut heap = CanisterId::from_u64(5).get().as_slice().to_vec();
        heap.extend_from_slice(b"greet");
        heap
    }

    fn new_call(api: &mut SystemApi, heap: &[u8]) {
        let closure = WasmClosure {
            func_idx: 0,
            env: 0,
        };
        api.call_new(heap, 0, 10, 10, 5, closure, closure).unwrap();
    }

    #[test]
    fn call_perform_needs_the_call_fee_to_be_liquid() {
        // Balance 1000, freezing threshold 100: 900 liquid. Fee = 10 + 1 * 5 bytes of name = 15.
        let heap = call_heap();
        let mut api = update(0);
        new_call(&mut api, &heap);
        api.call_cycles_add128(886).unwrap();
        assert_eq!(api.call_perform().unwrap(), 2, "886 + 15 > 900");
        new_call(&mut api, &heap);
        api.call_cycles_add128(885).unwrap();
        assert_eq!(api.call_perform().unwrap(), 0, "885 + 15 = 900");
        assert_eq!(
            api.current_balance(),
            Cycles(100),
            "cycles and fee left the balance"
        );
    }

    #[test]
    fn call_perform_respects_the_callback_budget() {
        let heap = call_heap();
        let mut view = view();
        view.remaining_callbacks = 2;
        view.call_base_fee = Cycles::ZERO;
        view.call_fee_per_byte = Cycles::ZERO;
        let mut api = update_with_view(0, view);
        for expected in [0, 0, 2] {
            new_call(&mut api, &heap);
            assert_eq!(api.call_perform().unwrap(), expected);
        }
        assert_eq!(api.finish().changes.calls.len(), 2);
    }

    #[test]
    fn performance_counter_1_includes_the_call_context() {
        let mut view = view();
        view.call_context_instructions = 1_000;
        let mut api = update_with_view(0, view);
        api.instructions_so_far = 70;
        assert_eq!(api.performance_counter(0).unwrap(), 70);
        assert_eq!(api.performance_counter(1).unwrap(), 1_070);
        assert!(api.performance_counter(2).is_err());
    }

    #[test]
    fn timer_returns_previous_value() {
        let mut api = update(0);
        assert_eq!(api.global_timer_set(10), 5);
        assert_eq!(api.global_timer_set(0), 10);
    }
}
