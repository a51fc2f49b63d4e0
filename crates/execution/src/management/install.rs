//! Code installation (install, reinstall, upgrade; plain and chunked), the wasm chunk store, and
//! uninstallation.
//!
//! Atomicity: an install runs every hook (`(start)`, `canister_init`, or `canister_pre_upgrade`,
//! `(start)`, `canister_post_upgrade`) on a working copy of the canister and writes the copy back
//! only when all of them succeeded. A trap anywhere leaves the canister exactly as it was.

use super::args;
use super::errors::ManagementError;
use super::lifecycle::{self, WaitingCanisterCall, record_change};
use super::{Context, Handled, controlled, existing};
use crate::common::{
    EMPTY_CANDID_REPLY, check_can_pay, execution_error_to_user, execution_fee, system_state_view,
};
use ic_management_canister_types as mct;
use openic_embedders::{ApiType, EntryPoint, ExecutionError};
use openic_replicated_state::{
    CallOrigin, CanisterState, ChangeDetails, ChangeOrigin, ExecutionState, ModuleInfo,
    ReplicatedState,
};
use openic_types::{CanisterId, Cycles, ErrorCode, RejectCode, UserError};
use sha2::{Digest, Sha256};
use std::sync::Arc;

/// Largest module accepted (plain or gzip, as uploaded).
pub(super) const MAX_WASM_MODULE_BYTES: usize = 100 * 1024 * 1024;
/// Largest chunk `upload_chunk` accepts.
pub(super) const MAX_CHUNK_BYTES: usize = 1024 * 1024;
/// Most chunks one canister's chunk store holds (100 × 1 MiB = the largest module).
pub(super) const MAX_CHUNKS_PER_STORE: usize = 100;
/// The metadata section name that marks a Motoko module with enhanced orthogonal persistence.
const ENHANCED_ORTHOGONAL_PERSISTENCE_SECTION: &str = "enhanced-orthogonal-persistence";
/// Export names of the install hooks.
const CANISTER_INIT: &str = "canister_init";
const CANISTER_PRE_UPGRADE: &str = "canister_pre_upgrade";
const CANISTER_POST_UPGRADE: &str = "canister_post_upgrade";

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn invalid_wasm(error: impl std::fmt::Display) -> UserError {
    ManagementError::InvalidWasm(error.to_string()).into()
}

fn uses_enhanced_orthogonal_persistence(info: &ModuleInfo) -> bool {
    info.private_metadata
        .contains_key(ENHANCED_ORTHOGONAL_PERSISTENCE_SECTION)
        || info
            .public_metadata
            .contains_key(ENHANCED_ORTHOGONAL_PERSISTENCE_SECTION)
}

/// A canister being installed: a working copy plus the instruction budget left.
struct Installation<'c, 'a> {
    context: &'c Context<'a>,
    canister: CanisterState,
    time: openic_types::Time,
    instructions_left: u64,
    cycles_burned: Cycles,
    /// What the hooks did that outlives a failed installation: their log and their instructions.
    meter: &'c mut InstallMeter,
}

/// What an installation's hooks leave behind even when it fails: what they printed (and why one
/// trapped) for the canister's log, and the instructions they ran, which the canister pays for.
#[derive(Default)]
struct InstallMeter {
    logs: Vec<Vec<u8>>,
    /// `Some` once hooks were about to run (the installation got past validation).
    instructions: Option<u64>,
}

impl Installation<'_, '_> {
    /// Runs one hook on `execution_state` and applies what it asked for (certified data, timer,
    /// burned cycles) to the working copy. Returns the state after the hook.
    fn run(
        &mut self,
        execution_state: ExecutionState,
        api_type: ApiType,
        entry_point: EntryPoint,
    ) -> Result<ExecutionState, UserError> {
        let config = self.context.config;
        let canister_id = self.canister.canister_id();
        let view = system_state_view(
            config,
            self.context.subnet,
            &self.canister,
            self.time,
            self.canister.system_state.cycles_balance,
            false,
        );
        let output = self
            .context
            .embedder
            .execute(crate::common::execution_input(
                config,
                &self.canister,
                &execution_state,
                api_type,
                entry_point,
                view,
                self.instructions_left,
            ));
        self.instructions_left = self
            .instructions_left
            .saturating_sub(output.instructions_used);
        self.meter.logs.extend(output.debug_prints);
        let used = self.meter.instructions.unwrap_or(0);
        self.meter.instructions = Some(used.saturating_add(output.instructions_used));
        match output.result {
            Ok((new_state, _response, changes)) => {
                let system_state = &mut self.canister.system_state;
                if let Some(data) = changes.certified_data {
                    system_state.certified_data = data;
                }
                if let Some(timer) = changes.global_timer_nanos {
                    system_state.global_timer_nanos = timer;
                }
                system_state.cycles_balance = system_state
                    .cycles_balance
                    .saturating_sub(changes.cycles_burned);
                self.cycles_burned = self.cycles_burned.saturating_add(changes.cycles_burned);
                Ok(ExecutionState {
                    wasm_binary: execution_state.wasm_binary,
                    module_info: execution_state.module_info,
                    wasm_memory: new_state.wasm_memory,
                    wasm_memory_size_pages: new_state.wasm_memory_size_pages,
                    stable_memory: new_state.stable_memory,
                    stable_memory_size_pages: new_state.stable_memory_size_pages,
                    globals: new_state.globals,
                })
            }
            Err(ExecutionError::InstructionLimitExceeded { .. }) => Err(execution_error_to_user(
                &canister_id,
                &ExecutionError::InstructionLimitExceeded {
                    limit: config.max_instructions_per_install,
                },
            )),
            Err(error) => Err(execution_error_to_user(&canister_id, &error)),
        }
    }

    /// Runs `(start)` and then `hook` (if the module exports it) with `ApiType::Init`.
    fn start_and_init(
        &mut self,
        execution_state: ExecutionState,
        hook: &str,
        arg: Vec<u8>,
    ) -> Result<ExecutionState, UserError> {
        let started = self.run(execution_state, ApiType::Start, EntryPoint::StartOnly)?;
        if !started.module_info.system_methods.contains(hook) {
            return Ok(started);
        }
        let caller = self.context.caller.principal();
        self.run(
            started,
            ApiType::Init { caller, arg },
            EntryPoint::Export(hook.to_string()),
        )
    }
}

/// Installs `wasm` into canister `id` in `mode`. The caller has been checked to be a controller.
///
/// Cycles: the canister must be able to pay for [`ExecutionConfig::max_instructions_per_install`]
/// above its freezing threshold before any hook runs (as the IC prepays), and pays the execution
/// fee of the instructions its hooks ran, also when the installation fails.
///
/// The canister's log: a successful install or reinstall purges it (spec), then what the hooks
/// printed is appended; an upgrade appends. A failed installation changes nothing but the log
/// and the balance: the log gets what the hooks printed and the trap, so a developer can see why
/// it failed.
///
/// [`ExecutionConfig::max_instructions_per_install`]: crate::ExecutionConfig
fn install(
    context: &Context<'_>,
    state: &mut ReplicatedState,
    id: CanisterId,
    mode: mct::CanisterInstallMode,
    wasm: &[u8],
    arg: Vec<u8>,
    sender_canister_version: Option<u64>,
) -> Result<(), UserError> {
    let mut meter = InstallMeter::default();
    let purges_log = matches!(
        mode,
        mct::CanisterInstallMode::Install | mct::CanisterInstallMode::Reinstall
    );
    let result = run_install(
        context,
        state,
        id,
        mode,
        wasm,
        arg,
        sender_canister_version,
        &mut meter,
    );
    if let Some(instructions) = meter.instructions {
        state.burn_from_canister(&id, execution_fee(context.config, instructions));
    }
    if result.is_ok() && purges_log {
        state.clear_log(&id);
    }
    state.append_log(id, meter.logs);
    result
}

/// [`install`] without the log and the fee: runs the hooks on a working copy, recording in `meter`
/// what they print and the instructions they run, and writes the copy back if all succeeded.
#[allow(clippy::too_many_arguments)]
fn run_install(
    context: &Context<'_>,
    state: &mut ReplicatedState,
    id: CanisterId,
    mode: mct::CanisterInstallMode,
    wasm: &[u8],
    arg: Vec<u8>,
    sender_canister_version: Option<u64>,
    meter: &mut InstallMeter,
) -> Result<(), UserError> {
    if wasm.len() > MAX_WASM_MODULE_BYTES {
        return Err(ManagementError::ModuleTooLarge {
            size: wasm.len(),
            max: MAX_WASM_MODULE_BYTES,
        }
        .into());
    }
    let canister = existing(state, &id)?.clone();
    match (&mode, &canister.execution_state) {
        (mct::CanisterInstallMode::Install, Some(_)) => {
            return Err(ManagementError::AlreadyInstalled { canister: id.get() }.into());
        }
        (mct::CanisterInstallMode::Upgrade(_), None) => {
            return Err(ManagementError::UpgradeOfEmptyCanister { canister: id.get() }.into());
        }
        _ => {}
    }
    let (binary, info) = context
        .embedder
        .prepare_module(wasm)
        .map_err(invalid_wasm)?;
    let prepay = execution_fee(context.config, context.config.max_instructions_per_install);
    check_can_pay(context.config, &canister, prepay).map_err(|error| {
        UserError::new(
            ErrorCode::CanisterOutOfCycles,
            format!("Canister installation failed with `{}`.", error.message),
        )
    })?;
    let module_hash = binary.module_hash;
    let binary = Arc::new(binary);
    let info = Arc::new(info);
    let time = state.metadata.time;
    meter.instructions = Some(0);
    let mut installation = Installation {
        context,
        canister,
        time,
        instructions_left: context.config.max_instructions_per_install,
        cycles_burned: Cycles::ZERO,
        meter,
    };
    {
        let system_state = &mut installation.canister.system_state;
        system_state.canister_version = system_state.canister_version.saturating_add(1);
    }
    let (new_state, mode_code) = match mode {
        mct::CanisterInstallMode::Install | mct::CanisterInstallMode::Reinstall => {
            let system_state = &mut installation.canister.system_state;
            system_state.certified_data.clear();
            system_state.global_timer_nanos = 0;
            let fresh = context
                .embedder
                .initial_execution_state(binary, info)
                .map_err(invalid_wasm)?;
            let new_state = installation.start_and_init(fresh, CANISTER_INIT, arg)?;
            let mode_code = if mode == mct::CanisterInstallMode::Install {
                0
            } else {
                1
            };
            (new_state, mode_code)
        }
        mct::CanisterInstallMode::Upgrade(flags) => {
            let flags = flags.unwrap_or_default();
            let Some(old) = installation.canister.execution_state.clone() else {
                return Err(ManagementError::UpgradeOfEmptyCanister { canister: id.get() }.into());
            };
            let keep_heap = flags.wasm_memory_persistence == Some(mct::WasmMemoryPersistence::Keep);
            if uses_enhanced_orthogonal_persistence(&old.module_info) && !keep_heap {
                return Err(ManagementError::MissingMemoryPersistenceOption.into());
            }
            if keep_heap && !uses_enhanced_orthogonal_persistence(&info) {
                return Err(ManagementError::KeepWithoutEnhancedPersistence.into());
            }
            let skip_pre_upgrade = flags.skip_pre_upgrade.unwrap_or(false);
            let after_pre_upgrade = if !skip_pre_upgrade
                && old
                    .module_info
                    .system_methods
                    .contains(CANISTER_PRE_UPGRADE)
            {
                let caller = context.caller.principal();
                installation.run(
                    old,
                    ApiType::PreUpgrade { caller },
                    EntryPoint::Export(CANISTER_PRE_UPGRADE.to_string()),
                )?
            } else {
                old
            };
            // The global timer is deactivated by an upgrade; post_upgrade may set it again.
            installation.canister.system_state.global_timer_nanos = 0;
            let mut fresh = context
                .embedder
                .initial_execution_state(binary, info)
                .map_err(invalid_wasm)?;
            fresh.stable_memory = after_pre_upgrade.stable_memory;
            fresh.stable_memory_size_pages = after_pre_upgrade.stable_memory_size_pages;
            if keep_heap {
                fresh.wasm_memory = after_pre_upgrade.wasm_memory;
                fresh.wasm_memory_size_pages = after_pre_upgrade.wasm_memory_size_pages;
            }
            let new_state = installation.start_and_init(fresh, CANISTER_POST_UPGRADE, arg)?;
            (new_state, 2)
        }
    };
    let Installation {
        mut canister,
        cycles_burned,
        ..
    } = installation;
    canister.execution_state = Some(new_state);
    canister.system_state.low_wasm_memory_hook_pending = false;
    // Memory the installation added pays its storage ahead on a subnet above its memory
    // threshold (`reservation`); if it cannot, the installation fails.
    let snapshot_bytes = state.snapshots.size_of(&id);
    let before =
        crate::common::memory_usage_bytes(existing(state, &id)?).saturating_add(snapshot_bytes);
    let after = crate::common::memory_usage_bytes(&canister).saturating_add(snapshot_bytes);
    if after > before {
        let subnet_usage = crate::reservation::subnet_memory_usage(state);
        let reveal = canister
            .system_state
            .controllers
            .contains(&context.caller.principal());
        // The installation's execution fee is taken from the balance afterwards (`install`):
        // the reservation may only use what that fee leaves.
        let fee = execution_fee(context.config, meter.instructions.unwrap_or(0));
        let amount = crate::reservation::storage_reservation_cycles(
            context.config,
            crate::reservation::allocated_bytes(
                before,
                after,
                canister.system_state.settings.memory_allocation,
            ),
            subnet_usage,
        );
        crate::reservation::check_reserve(
            canister.system_state.cycles_balance.saturating_sub(fee),
            canister.system_state.reserved_balance,
            canister.system_state.settings.reserved_cycles_limit,
            amount,
        )
        .and_then(|()| crate::reservation::reserve(&mut canister, amount))
        .map_err(|error| {
            crate::common::execution_error_to_user(
                &id,
                &crate::reservation::memory_grow_error(error, after - before, reveal),
            )
        })?;
    }
    record_change(
        &mut canister.system_state,
        time,
        context.change_origin(sender_canister_version),
        ChangeDetails::CodeDeployment {
            mode: mode_code,
            module_hash,
        },
    );
    state.metadata.burn_cycles(cycles_burned);
    state.put_canister(canister);
    Ok(())
}

/// `install_code`.
pub(super) fn install_code(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::InstallCodeArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    controlled(state, &id, &context.caller.principal())?;
    install(
        context,
        state,
        id,
        args.mode,
        &args.wasm_module,
        args.arg,
        args.sender_canister_version,
    )?;
    Ok(Handled::reply(EMPTY_CANDID_REPLY.to_vec()))
}

/// `install_chunked_code`: the module is the concatenation of chunks from a chunk store.
pub(super) fn install_chunked_code(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::InstallChunkedCodeArgs = args::decode(context.method, context.payload)?;
    let caller = context.caller.principal();
    let target = CanisterId::unchecked_from_principal(args.target_canister);
    controlled(state, &target, &caller)?;
    let store_id = args
        .store_canister
        .map(CanisterId::unchecked_from_principal)
        .unwrap_or(target);
    let store = existing(state, &store_id)?;
    if caller != store_id.get() && !store.is_controller(&caller) {
        return Err(ManagementError::ChunkStoreNotAccessible {
            caller,
            store: store_id.get(),
        }
        .into());
    }
    if args.chunk_hashes_list.len() > MAX_CHUNKS_PER_STORE {
        return Err(ManagementError::TooManyChunks {
            count: args.chunk_hashes_list.len(),
            max: MAX_CHUNKS_PER_STORE,
        }
        .into());
    }
    let mut wasm = Vec::new();
    for chunk_hash in &args.chunk_hashes_list {
        let chunk = <[u8; 32]>::try_from(chunk_hash.hash.as_slice())
            .ok()
            .and_then(|key| store.system_state.wasm_chunk_store.get(&key))
            .ok_or_else(|| {
                UserError::from(ManagementError::ChunkNotFound {
                    hash: hex(&chunk_hash.hash),
                    store: store_id.get(),
                })
            })?;
        if wasm.len().saturating_add(chunk.len()) > MAX_WASM_MODULE_BYTES {
            return Err(ManagementError::ModuleTooLarge {
                size: wasm.len().saturating_add(chunk.len()),
                max: MAX_WASM_MODULE_BYTES,
            }
            .into());
        }
        wasm.extend_from_slice(chunk.as_slice());
    }
    let actual: [u8; 32] = Sha256::digest(&wasm).into();
    if actual.as_slice() != args.wasm_module_hash.as_slice() {
        return Err(ManagementError::WasmHashMismatch {
            expected: hex(&args.wasm_module_hash),
            actual: hex(&actual),
        }
        .into());
    }
    install(
        context,
        state,
        target,
        args.mode,
        &wasm,
        args.arg,
        args.sender_canister_version,
    )?;
    Ok(Handled::reply(EMPTY_CANDID_REPLY.to_vec()))
}

/// `upload_chunk`: stores a chunk (at most 1 MiB) by its SHA-256 and replies with the hash.
pub(super) fn upload_chunk(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::UploadChunkArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    let canister = controlled(state, &id, &context.caller.principal())?;
    if args.chunk.len() > MAX_CHUNK_BYTES {
        return Err(ManagementError::ChunkTooLarge {
            size: args.chunk.len(),
            max: MAX_CHUNK_BYTES,
        }
        .into());
    }
    let hash: [u8; 32] = Sha256::digest(&args.chunk).into();
    let store = &canister.system_state.wasm_chunk_store;
    if !store.contains_key(&hash) && store.len() >= MAX_CHUNKS_PER_STORE {
        return Err(ManagementError::ChunkStoreFull {
            canister: id.get(),
            max: MAX_CHUNKS_PER_STORE,
        }
        .into());
    }
    if let Some(canister) = state.canister_mut(&id) {
        canister
            .system_state
            .wasm_chunk_store
            .entry(hash)
            .or_insert_with(|| Arc::new(args.chunk.into()));
    }
    args::encode(&mct::ChunkHash {
        hash: hash.to_vec(),
    })
    .map(Handled::reply)
}

/// `stored_chunks`: the hashes in the chunk store, in hash order.
pub(super) fn stored_chunks(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::CanisterIdRecord = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    let canister = controlled(state, &id, &context.caller.principal())?;
    let hashes: Vec<mct::ChunkHash> = canister
        .system_state
        .wasm_chunk_store
        .keys()
        .map(|hash| mct::ChunkHash {
            hash: hash.to_vec(),
        })
        .collect();
    args::encode(&hashes).map(Handled::reply)
}

/// `clear_chunk_store`.
pub(super) fn clear_chunk_store(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::CanisterIdRecord = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    controlled(state, &id, &context.caller.principal())?;
    if let Some(canister) = state.canister_mut(&id) {
        canister.system_state.wasm_chunk_store.clear();
    }
    Ok(Handled::reply(EMPTY_CANDID_REPLY.to_vec()))
}

/// `uninstall_code`: removes the module and its memories, and answers every open call with a
/// reject; callbacks are dropped (responses that arrive for them later are discarded).
pub(super) fn uninstall_code(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::UninstallCodeArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    controlled(state, &id, &context.caller.principal())?;
    let time = state.metadata.time;
    let origin = context.change_origin(args.sender_canister_version);
    existing(state, &id)?;
    uninstall(state, id, Uninstall::Requested { time, origin });
    Ok(Handled::reply(EMPTY_CANDID_REPLY.to_vec()))
}

/// Why a canister loses its code.
pub(super) enum Uninstall {
    /// `uninstall_code`: recorded in the canister's history.
    Requested {
        /// The block time.
        time: openic_types::Time,
        /// Who asked.
        origin: ChangeOrigin,
    },
    /// Its balance reached zero (spec: "Canister out of cycles"): the recent history is dropped
    /// (the change count stays) and its compute and memory allocations are reset.
    OutOfCycles,
}

/// Reverts canister `id` (which exists) to an empty canister: no module, memories, certified
/// data, timer or log; every open call is answered with a reject and its callbacks dropped.
pub(super) fn uninstall(state: &mut ReplicatedState, id: CanisterId, how: Uninstall) {
    let Some(canister) = state.canister_mut(&id) else {
        return;
    };
    let system_state = &mut canister.system_state;
    let call_contexts = std::mem::take(&mut system_state.call_context_manager.call_contexts);
    system_state.call_context_manager.callbacks.clear();
    system_state.certified_data.clear();
    system_state.global_timer_nanos = 0;
    system_state.low_wasm_memory_hook_pending = false;
    system_state.canister_version = system_state.canister_version.saturating_add(1);
    let message = match how {
        Uninstall::Requested { time, origin } => {
            // Spec: uninstall_code also empties the chunk store.
            system_state.wasm_chunk_store.clear();
            record_change(system_state, time, origin, ChangeDetails::CodeUninstall);
            "Canister has been uninstalled.".to_string()
        }
        Uninstall::OutOfCycles => {
            system_state.history.clear();
            system_state.settings.compute_allocation = 0;
            system_state.settings.memory_allocation = 0;
            format!(
                "Canister {} has been uninstalled because it ran out of cycles.",
                id.get()
            )
        }
    };
    canister.execution_state = None;
    state.clear_log(&id);

    for call_context in call_contexts.into_values() {
        if call_context.responded {
            continue;
        }
        match call_context.origin {
            CallOrigin::Ingress { request_id, .. } => lifecycle::reject_ingress(
                state,
                &request_id,
                UserError::new(ErrorCode::CanisterRejectedMessage, message.clone()),
            ),
            CallOrigin::Canister {
                caller,
                callback_id,
                deadline,
            } if caller != id => lifecycle::reject_canister_call(
                state,
                WaitingCanisterCall {
                    originator: caller,
                    respondent: id,
                    callback: callback_id,
                    refund: call_context.available_cycles,
                    deadline,
                },
                RejectCode::CanisterReject,
                message.clone(),
            ),
            CallOrigin::Canister { .. } | CallOrigin::SystemTask => {}
        }
    }
}
