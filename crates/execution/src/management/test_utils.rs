//! A scripted fake [`Embedder`] and helpers for the management canister's unit tests.
//!
//! A fake module is `\0asm\x01\0\0\0` followed by `;`-separated directives:
//! - `init`: exports `canister_init`, which writes its argument to stable memory and the heap at
//!   offset 0, sets certified data to the argument, and sets the global timer to 7;
//! - `init_trap`: exports `canister_init`, which traps;
//! - `pre_upgrade`: exports `canister_pre_upgrade`, which writes `PRE` at stable offset 100;
//! - `post_upgrade`: exports `canister_post_upgrade`, which traps when its argument is `trap` and
//!   otherwise writes its argument at heap offset 200;
//! - `eop`: carries the `icp:private enhanced-orthogonal-persistence` section;
//! - `spin`: its hooks use more instructions than any limit allows;
//! - `data=TEXT`: the heap initially holds TEXT at offset 0 (a data segment);
//! - anything else (e.g. `v=2`) only changes the module hash.
//!
//! Bytes without the wasm magic are refused by `prepare_module`.

use super::*;
use candid::{Decode, Encode};
use openic_embedders::{
    ApiType, EntryPoint, ExecutionError, InvalidWasm, NewExecutionState, SystemStateChanges,
    WasmExecutionInput, WasmExecutionOutput,
};
use openic_replicated_state::{
    CallbackId, ExecutionState, ModuleInfo, PageMap, Request, WasmBinary,
};
use openic_types::ids::FIRST_USER_CANISTER_INDEX;
use openic_types::{RequestId, SubnetId};
use sha2::{Digest, Sha256};

/// The 8-byte header of every fake module.
pub const WASM_HEADER: &[u8] = b"\0asm\x01\0\0\0";
/// Instructions every fake hook reports.
pub const INSTRUCTIONS_PER_HOOK: u64 = 1_000;

/// A fake module with these directives.
pub fn fake_module(directives: &str) -> Vec<u8> {
    let mut bytes = WASM_HEADER.to_vec();
    bytes.extend_from_slice(directives.as_bytes());
    bytes
}

fn directives(binary: &WasmBinary) -> Vec<String> {
    String::from_utf8_lossy(&binary.bytes[WASM_HEADER.len()..])
        .split(';')
        .filter(|d| !d.is_empty())
        .map(str::to_string)
        .collect()
}

/// The scripted embedder.
#[derive(Default)]
pub struct FakeEmbedder;

impl Embedder for FakeEmbedder {
    fn prepare_module(&self, wasm: &[u8]) -> Result<(WasmBinary, ModuleInfo), InvalidWasm> {
        if !wasm.starts_with(WASM_HEADER) {
            return Err(InvalidWasm::Decode("missing the wasm magic number".into()));
        }
        let binary = WasmBinary {
            bytes: wasm.to_vec(),
            module_hash: Sha256::digest(wasm).into(),
        };
        let mut info = ModuleInfo::default();
        for directive in directives(&binary) {
            match directive.as_str() {
                "init" | "init_trap" => {
                    info.system_methods.insert("canister_init".into());
                }
                "pre_upgrade" => {
                    info.system_methods.insert("canister_pre_upgrade".into());
                }
                "post_upgrade" => {
                    info.system_methods.insert("canister_post_upgrade".into());
                }
                "eop" => {
                    info.private_metadata
                        .insert("enhanced-orthogonal-persistence".into(), Vec::new());
                }
                _ => {}
            }
        }
        info.public_metadata
            .insert("candid:service".into(), b"service : {}".to_vec());
        info.private_metadata
            .insert("secret".into(), b"hidden".to_vec());
        Ok((binary, info))
    }

    fn initial_execution_state(
        &self,
        binary: Arc<WasmBinary>,
        info: Arc<ModuleInfo>,
    ) -> Result<ExecutionState, InvalidWasm> {
        let mut wasm_memory = PageMap::new();
        for directive in directives(&binary) {
            if let Some(data) = directive.strip_prefix("data=") {
                wasm_memory.write(0, data.as_bytes());
            }
        }
        Ok(ExecutionState {
            wasm_binary: binary,
            module_info: info,
            wasm_memory,
            wasm_memory_size_pages: 1,
            stable_memory: PageMap::new(),
            stable_memory_size_pages: 0,
            globals: Vec::new(),
        })
    }

    fn execute(&self, input: WasmExecutionInput<'_>) -> WasmExecutionOutput {
        let state = input.execution_state;
        let directives = directives(&state.wasm_binary);
        let has = |name: &str| directives.iter().any(|d| d == name);
        let mut new_state = NewExecutionState {
            wasm_memory: state.wasm_memory.clone(),
            wasm_memory_size_pages: state.wasm_memory_size_pages,
            stable_memory: state.stable_memory.clone(),
            stable_memory_size_pages: state.stable_memory_size_pages,
            globals: state.globals.clone(),
        };
        let mut changes = SystemStateChanges::default();
        let fail = |error: ExecutionError, used: u64| WasmExecutionOutput {
            instructions_used: used,
            result: Err(error),
            debug_prints: Vec::new(),
        };
        if has("spin") && !matches!(input.entry_point, EntryPoint::StartOnly) {
            return fail(
                ExecutionError::InstructionLimitExceeded {
                    limit: input.instruction_limit,
                },
                input.instruction_limit,
            );
        }
        match (&input.entry_point, &input.api_type) {
            (EntryPoint::StartOnly, ApiType::Start) => {}
            (EntryPoint::Export(name), ApiType::Init { arg, .. }) if name == "canister_init" => {
                if has("init_trap") {
                    return fail(
                        ExecutionError::CalledTrap("init refused".into()),
                        INSTRUCTIONS_PER_HOOK,
                    );
                }
                new_state.stable_memory_size_pages = new_state.stable_memory_size_pages.max(1);
                new_state.stable_memory.write(0, arg);
                new_state.wasm_memory.write(0, arg);
                changes.certified_data = Some(arg.iter().copied().take(32).collect());
                changes.global_timer_nanos = Some(7);
            }
            (EntryPoint::Export(name), ApiType::PreUpgrade { .. })
                if name == "canister_pre_upgrade" =>
            {
                new_state.stable_memory_size_pages = new_state.stable_memory_size_pages.max(1);
                new_state.stable_memory.write(100, b"PRE");
            }
            (EntryPoint::Export(name), ApiType::Init { arg, .. })
                if name == "canister_post_upgrade" =>
            {
                if arg.as_slice() == b"trap" {
                    return fail(
                        ExecutionError::CalledTrap("post_upgrade refused".into()),
                        INSTRUCTIONS_PER_HOOK,
                    );
                }
                new_state.wasm_memory.write(200, arg);
            }
            (entry_point, api_type) => {
                return fail(
                    ExecutionError::ContractViolation(format!(
                        "fake embedder cannot run {entry_point:?} as {api_type:?}"
                    )),
                    0,
                );
            }
        }
        WasmExecutionOutput {
            instructions_used: INSTRUCTIONS_PER_HOOK,
            result: Ok((new_state, None, changes)),
            debug_prints: Vec::new(),
        }
    }
}

/// Everything a test needs to make management calls.
pub struct Harness {
    pub embedder: FakeEmbedder,
    pub config: ExecutionConfig,
    pub subnet: SubnetContext,
    pub state: ReplicatedState,
    next_request: u8,
}

impl Harness {
    pub fn new() -> Harness {
        let subnet_id = SubnetId(Principal::from_slice(&[0xAB; 29]));
        Harness {
            embedder: FakeEmbedder,
            config: ExecutionConfig::default(),
            subnet: SubnetContext {
                subnet_id,
                root_key_der: vec![1, 2, 3],
                node_count: 1,
            },
            state: ReplicatedState::new(subnet_id, FIRST_USER_CANISTER_INDEX, [9; 32]),
            next_request: 0,
        }
    }

    /// Calls `method` with `payload` and `cycles` attached.
    pub fn call_with_cycles(
        &mut self,
        caller: ManagementCaller,
        method: &str,
        payload: &[u8],
        cycles: Cycles,
    ) -> (ManagementOutcome, Cycles) {
        self.next_request = self.next_request.wrapping_add(1);
        let stop_context = StopContext::Ingress {
            sender: caller.principal(),
            request_id: RequestId([self.next_request; 32]),
        };
        self.execute(ManagementCall {
            caller,
            method,
            payload,
            cycles,
            stop_context,
        })
    }

    fn execute(&mut self, call: ManagementCall<'_>) -> (ManagementOutcome, Cycles) {
        execute_management_call(
            &self.embedder,
            &self.config,
            &self.subnet,
            &mut self.state,
            call,
        )
    }

    /// Calls `method` as canister `sender` would, with `payment` attached and `callback` waiting
    /// for the answer.
    pub fn call_from_canister(
        &mut self,
        sender: CanisterId,
        method: &str,
        payload: &[u8],
        payment: Cycles,
        callback: CallbackId,
    ) -> (ManagementOutcome, Cycles) {
        let request = Request {
            sender,
            receiver: CanisterId::management(),
            sender_reply_callback: callback,
            method_name: method.to_string(),
            method_payload: payload.to_vec(),
            payment,
            deadline: None,
        };
        self.execute(ManagementCall {
            caller: ManagementCaller::Canister(sender),
            method,
            payload,
            cycles: payment,
            stop_context: StopContext::Canister(request),
        })
    }

    /// Calls `method` without cycles.
    pub fn call(
        &mut self,
        caller: ManagementCaller,
        method: &str,
        payload: &[u8],
    ) -> ManagementOutcome {
        self.call_with_cycles(caller, method, payload, Cycles::ZERO)
            .0
    }

    /// Calls and expects a reply.
    pub fn reply(&mut self, caller: ManagementCaller, method: &str, payload: &[u8]) -> Vec<u8> {
        match self.call(caller, method, payload) {
            ManagementOutcome::Reply(bytes) => bytes,
            other => panic!("{method} did not reply: {other:?}"),
        }
    }

    /// Calls and expects a rejection.
    pub fn reject(&mut self, caller: ManagementCaller, method: &str, payload: &[u8]) -> UserError {
        match self.call(caller, method, payload) {
            ManagementOutcome::Reject(error) => error,
            other => panic!("{method} did not reject: {other:?}"),
        }
    }

    /// Creates a canister controlled by `user` with provisional cycles.
    pub fn create_canister(&mut self, user: Principal) -> CanisterId {
        let payload = Encode!(
            &ic_management_canister_types::ProvisionalCreateCanisterWithCyclesArgs::default()
        )
        .unwrap();
        let reply = self.reply(
            ManagementCaller::User(user),
            "provisional_create_canister_with_cycles",
            &payload,
        );
        let record = Decode!(&reply, ic_management_canister_types::CanisterIdRecord).unwrap();
        CanisterId::unchecked_from_principal(record.canister_id)
    }

    /// The canister `id`.
    pub fn canister(&self, id: &CanisterId) -> &CanisterState {
        self.state.canister(id).expect("canister exists")
    }
}

/// A user principal (self-authenticating shape).
pub fn user(n: u8) -> Principal {
    let mut bytes = [n; 29];
    bytes[28] = 0x02;
    Principal::from_slice(&bytes)
}
