//! Canister snapshots: `take_canister_snapshot`, `load_canister_snapshot`,
//! `list_canister_snapshots` and `delete_canister_snapshot`, with the IC's rules and refusals.
//!
//! As the spec says, a canister need not be stopped: stopping it first (so no callback is
//! outstanding) is the controllers' choice, as `dfx` and `icp` make it. A snapshot's bytes count
//! in the canister's memory (`snapshots_size` in `canister_status`) and pay storage.

use super::args;
use super::errors::ManagementError;
use super::install::{Uninstall, hex, uninstall};
use super::lifecycle::record_change;
use super::{Context, Handled, controlled, existing, status};
use ic_management_canister_types as mct;
use openic_replicated_state::canister_snapshot::{
    CanisterSnapshot, MAX_SNAPSHOTS_PER_CANISTER, parse_snapshot_id,
};
use openic_replicated_state::{ChangeDetails, ReplicatedState, SnapshotSource};
use openic_types::{CanisterId, UserError};
use std::sync::Arc;

/// Largest snapshot openic keeps: snapshots are written whole into each checkpoint's state file
/// (not yet as incremental page files, as canisters' memories are), so their size is bounded.
pub(super) const MAX_SNAPSHOT_BYTES: u64 = 1 << 30;

fn snapshot_record(snapshot: &CanisterSnapshot) -> mct::Snapshot {
    mct::Snapshot {
        id: snapshot.id(),
        taken_at_timestamp: snapshot.taken_at_timestamp,
        total_size: snapshot.size(),
    }
}

/// The snapshot `id` of `canister`: the IC's refusals when it does not exist or is another
/// canister's.
fn own_snapshot(
    state: &ReplicatedState,
    canister: CanisterId,
    id: &[u8],
) -> Result<Arc<CanisterSnapshot>, UserError> {
    match parse_snapshot_id(id) {
        Some((owner, _)) if owner != canister => Err(ManagementError::SnapshotNotOwned {
            snapshot: hex(id),
            canister: canister.get(),
        }
        .into()),
        _ => state.snapshots.get(id).cloned().ok_or_else(|| {
            ManagementError::SnapshotNotFound {
                snapshot: hex(id),
                canister: canister.get(),
            }
            .into()
        }),
    }
}

/// The snapshot a new one replaces (`replace`, which must be the canister's), or `None` if the
/// canister has room for one more; otherwise the IC's refusal.
fn room_for_snapshot(
    state: &ReplicatedState,
    canister: CanisterId,
    replace: Option<&[u8]>,
) -> Result<Option<Arc<CanisterSnapshot>>, UserError> {
    if let Some(old) = replace {
        return own_snapshot(state, canister, old).map(Some);
    }
    if state.snapshots.count(&canister) >= MAX_SNAPSHOTS_PER_CANISTER {
        return Err(ManagementError::TooManySnapshots {
            canister: canister.get(),
            max: MAX_SNAPSHOTS_PER_CANISTER,
        }
        .into());
    }
    Ok(None)
}

/// `take_canister_snapshot`: a controller saves the canister's module, memories, globals,
/// certified data, timer and chunk store, optionally replacing one of its snapshots and then
/// uninstalling its code.
pub(super) fn take(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::TakeCanisterSnapshotArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    let canister = controlled(state, &id, &context.caller.principal())?;
    let replaced = room_for_snapshot(state, id, args.replace_snapshot.as_deref())?;
    let Some(execution_state) = canister.execution_state.clone() else {
        return Err(ManagementError::SnapshotOfEmptyCanister { canister: id.get() }.into());
    };
    let system_state = &canister.system_state;
    let snapshot = CanisterSnapshot {
        canister_id: id,
        source: SnapshotSource::TakenFromCanister,
        local_id: state.snapshots.next_local_id(),
        taken_at_timestamp: state.metadata.time.as_nanos_since_unix_epoch(),
        canister_version: system_state.canister_version,
        execution_state,
        certified_data: system_state.certified_data.clone(),
        global_timer_nanos: system_state.global_timer_nanos,
        low_wasm_memory_hook_pending: system_state.low_wasm_memory_hook_pending,
        wasm_chunk_store: system_state.wasm_chunk_store.clone(),
    };
    if snapshot.size() > MAX_SNAPSHOT_BYTES {
        return Err(ManagementError::SnapshotTooLarge {
            canister: id.get(),
            size: snapshot.size(),
            max: MAX_SNAPSHOT_BYTES,
        }
        .into());
    }
    // The snapshot's memory pays its storage ahead on a subnet above its memory threshold
    // (`reservation`), as memory the canister grows does.
    let added = snapshot
        .size()
        .saturating_sub(replaced.as_ref().map_or(0, |old| old.size()));
    if added > 0 {
        let subnet_usage = crate::reservation::subnet_memory_usage(state);
        let snapshot_bytes = state.snapshots.size_of(&id);
        let Some(canister) = state.canister_mut(&id) else {
            return Err(crate::common::canister_not_found_error(&id));
        };
        let before = crate::common::memory_usage_bytes(canister).saturating_add(snapshot_bytes);
        crate::reservation::reserve_for_growth(
            context.config,
            canister,
            subnet_usage,
            before,
            before.saturating_add(added),
        )
        .map_err(|error| crate::reservation::management_grow_error(error, added))?;
    }
    let reply = snapshot_record(&snapshot);
    let snapshots = Arc::make_mut(&mut state.snapshots);
    if let Some(old) = replaced {
        snapshots.remove(&old.id());
    }
    snapshots.insert(snapshot);
    if args.uninstall_code == Some(true) {
        let time = state.metadata.time;
        let origin = context.change_origin(args.sender_canister_version);
        uninstall(state, id, Uninstall::Requested { time, origin });
    }
    args::encode(&reply).map(Handled::reply)
}

/// `load_canister_snapshot`: a controller of the canister and of the snapshot's canister (on
/// this subnet) restores the snapshot's module, memories, globals, certified data and chunk store.
pub(super) fn load(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::LoadCanisterSnapshotArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    let caller = context.caller.principal();
    controlled(state, &id, &caller)?;
    let not_found = || {
        UserError::from(ManagementError::SnapshotNotFound {
            snapshot: hex(&args.snapshot_id),
            canister: id.get(),
        })
    };
    let (source, _) = parse_snapshot_id(&args.snapshot_id).ok_or_else(not_found)?;
    let snapshot = state
        .snapshots
        .get(&args.snapshot_id)
        .cloned()
        .ok_or_else(not_found)?;
    let source_canister = existing(state, &source).map_err(|_| not_found())?;
    if !source_canister.is_controller(&caller) {
        return Err(ManagementError::NotSnapshotController {
            snapshot: hex(&args.snapshot_id),
            canister: id.get(),
            caller,
        }
        .into());
    }
    let (execution_state, uploaded) = match snapshot.source {
        SnapshotSource::TakenFromCanister => (snapshot.execution_state.clone(), false),
        SnapshotSource::MetadataUpload => (uploaded_execution_state(context, &snapshot)?, true),
    };
    let time = state.metadata.time;
    let origin = context.change_origin(args.sender_canister_version);
    let Some(canister) = state.canister_mut(&id) else {
        return Err(crate::common::canister_not_found_error(&id));
    };
    canister.execution_state = Some(execution_state);
    let system_state = &mut canister.system_state;
    system_state.certified_data = snapshot.certified_data.clone();
    system_state.wasm_chunk_store = snapshot.wasm_chunk_store.clone();
    if uploaded {
        // An uploaded snapshot brings its own timer and hook status (spec).
        system_state.global_timer_nanos = snapshot.global_timer_nanos;
        system_state.low_wasm_memory_hook_pending = snapshot.low_wasm_memory_hook_pending;
    }
    system_state.canister_version = system_state.canister_version.saturating_add(1);
    record_change(
        system_state,
        time,
        origin,
        ChangeDetails::LoadSnapshot {
            from_canister_id: (source != id).then_some(source),
            snapshot_id: args.snapshot_id.clone(),
            canister_version: snapshot.canister_version,
            taken_at_timestamp: snapshot.taken_at_timestamp,
        },
    );
    Ok(Handled::reply(crate::common::EMPTY_CANDID_REPLY.to_vec()))
}

/// The execution state an uploaded snapshot restores: its module parsed now (it was uploaded as
/// bytes), its memories, and its globals, which must match the module's in number and type.
fn uploaded_execution_state(
    context: &Context<'_>,
    snapshot: &CanisterSnapshot,
) -> Result<openic_replicated_state::ExecutionState, UserError> {
    let uploaded = &snapshot.execution_state;
    let invalid = |reason: String| UserError::from(ManagementError::InvalidWasm(reason));
    let (binary, info) = context
        .embedder
        .prepare_module(&uploaded.wasm_binary.bytes)
        .map_err(|error| invalid(format!("the uploaded snapshot's module: {error}")))?;
    let initial = context
        .embedder
        .initial_execution_state(Arc::new(binary), Arc::new(info))
        .map_err(|error| invalid(format!("the uploaded snapshot's module: {error}")))?;
    let same_types = initial.globals.len() == uploaded.globals.len()
        && initial
            .globals
            .iter()
            .zip(&uploaded.globals)
            .all(|(a, b)| std::mem::discriminant(a) == std::mem::discriminant(b));
    if !same_types {
        return Err(ManagementError::InvalidArgument {
            method: context.method.to_string(),
            reason: format!(
                "the uploaded snapshot has {} globals that do not match the {} globals of its module in number and type",
                uploaded.globals.len(),
                initial.globals.len()
            ),
        }
        .into());
    }
    Ok(openic_replicated_state::ExecutionState {
        wasm_binary: initial.wasm_binary,
        module_info: initial.module_info,
        wasm_memory: uploaded.wasm_memory.clone(),
        wasm_memory_size_pages: uploaded.wasm_memory_size_pages,
        stable_memory: uploaded.stable_memory.clone(),
        stable_memory_size_pages: uploaded.stable_memory_size_pages,
        globals: uploaded.globals.clone(),
    })
}

/// `list_canister_snapshots`: the canister's snapshots, oldest first, for whoever its
/// `snapshot_visibility` lets see them.
pub(super) fn list(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::ListCanisterSnapshotsArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    check_snapshots_visible(context, state, id)?;
    let list: Vec<mct::Snapshot> = state
        .snapshots
        .of(&id)
        .map(|snapshot| snapshot_record(snapshot))
        .collect();
    args::encode(&list).map(Handled::reply)
}

/// `delete_canister_snapshot`: a controller deletes one of the canister's snapshots.
pub(super) fn delete(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::DeleteCanisterSnapshotArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    controlled(state, &id, &context.caller.principal())?;
    let snapshot = own_snapshot(state, id, &args.snapshot_id)?;
    Arc::make_mut(&mut state.snapshots).remove(&snapshot.id());
    Ok(Handled::reply(crate::common::EMPTY_CANDID_REPLY.to_vec()))
}

/// Largest slice `read_canister_snapshot_data` returns (the IC's).
pub(super) const MAX_SLICE_BYTES: u64 = 2_000_000;

/// The snapshot `id` of `canister`, if `caller` may see the canister's snapshots.
fn visible_snapshot(
    context: &Context<'_>,
    state: &ReplicatedState,
    canister_id: &candid::Principal,
    snapshot_id: &[u8],
) -> Result<Arc<CanisterSnapshot>, UserError> {
    let id = CanisterId::unchecked_from_principal(*canister_id);
    check_snapshots_visible(context, state, id)?;
    own_snapshot(state, id, snapshot_id)
}

/// Whether the caller may see canister `id`'s snapshots (its `snapshot_visibility`).
fn check_snapshots_visible(
    context: &Context<'_>,
    state: &ReplicatedState,
    id: CanisterId,
) -> Result<(), UserError> {
    let canister = existing(state, &id)?;
    let caller = context.caller.principal();
    if status::may_view(
        &canister.system_state.settings.snapshot_visibility,
        canister,
        &caller,
    ) {
        Ok(())
    } else {
        Err(ManagementError::SnapshotsNotVisible {
            canister: id.get(),
            caller,
        }
        .into())
    }
}

/// `read_canister_snapshot_metadata`: what a snapshot holds, for whoever may see the canister's
/// snapshots (a download starts here).
pub(super) fn read_metadata(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::ReadCanisterSnapshotMetadataArgs =
        args::decode(context.method, context.payload)?;
    let snapshot = visible_snapshot(context, state, &args.canister_id, &args.snapshot_id)?;
    let execution = &snapshot.execution_state;
    let globals = execution
        .globals
        .iter()
        .map(|global| {
            Some(match *global {
                openic_replicated_state::GlobalValue::I32(v) => mct::SnapshotMetadataGlobal::I32(v),
                openic_replicated_state::GlobalValue::I64(v) => mct::SnapshotMetadataGlobal::I64(v),
                openic_replicated_state::GlobalValue::F32(bits) => {
                    mct::SnapshotMetadataGlobal::F32(f32::from_bits(bits))
                }
                openic_replicated_state::GlobalValue::F64(bits) => {
                    mct::SnapshotMetadataGlobal::F64(f64::from_bits(bits))
                }
                openic_replicated_state::GlobalValue::V128(v) => {
                    mct::SnapshotMetadataGlobal::V128(candid::Nat::from(v))
                }
            })
        })
        .collect();
    let page = openic_replicated_state::WASM_PAGE_SIZE;
    args::encode(&mct::ReadCanisterSnapshotMetadataResult {
        source: Some(match snapshot.source {
            SnapshotSource::TakenFromCanister => {
                mct::SnapshotSource::TakenFromCanister(candid::Reserved)
            }
            SnapshotSource::MetadataUpload => mct::SnapshotSource::MetadataUpload(candid::Reserved),
        }),
        taken_at_timestamp: snapshot.taken_at_timestamp,
        wasm_module_size: execution.wasm_binary.bytes.len() as u64,
        globals,
        wasm_memory_size: execution.wasm_memory_size_pages.saturating_mul(page),
        stable_memory_size: execution.stable_memory_size_pages.saturating_mul(page),
        wasm_chunk_store: snapshot
            .wasm_chunk_store
            .keys()
            .map(|hash| mct::ChunkHash {
                hash: hash.to_vec(),
            })
            .collect(),
        canister_version: snapshot.canister_version,
        certified_data: snapshot.certified_data.clone(),
        global_timer: Some(match snapshot.global_timer_nanos {
            0 => mct::CanisterTimer::Inactive,
            at => mct::CanisterTimer::Active(at),
        }),
        on_low_wasm_memory_hook_status: Some(if snapshot.low_wasm_memory_hook_pending {
            mct::OnLowWasmMemoryHookStatus::Ready
        } else {
            mct::OnLowWasmMemoryHookStatus::ConditionNotSatisfied
        }),
    })
    .map(Handled::reply)
}

/// `read_canister_snapshot_data`: a slice (at most [`MAX_SLICE_BYTES`]) of a snapshot's module,
/// heap or stable memory, or one of its chunks, for whoever may see the canister's snapshots.
pub(super) fn read_data(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::ReadCanisterSnapshotDataArgs = args::decode(context.method, context.payload)?;
    let snapshot = visible_snapshot(context, state, &args.canister_id, &args.snapshot_id)?;
    let execution = &snapshot.execution_state;
    let page = openic_replicated_state::WASM_PAGE_SIZE;
    let slice = |offset: u64, size: u64, len: u64| -> Result<(), UserError> {
        if size > MAX_SLICE_BYTES {
            return Err(ManagementError::SliceTooLarge {
                requested: size,
                allowed: MAX_SLICE_BYTES,
            }
            .into());
        }
        match offset.checked_add(size) {
            Some(end) if end <= len => Ok(()),
            _ => Err(ManagementError::InvalidSlice { offset, size }.into()),
        }
    };
    let chunk = match args.kind {
        mct::SnapshotDataKind::WasmModule { offset, size } => {
            let bytes = &execution.wasm_binary.bytes;
            slice(offset, size, bytes.len() as u64)?;
            bytes[offset as usize..(offset + size) as usize].to_vec()
        }
        mct::SnapshotDataKind::WasmMemory { offset, size } => {
            slice(
                offset,
                size,
                execution.wasm_memory_size_pages.saturating_mul(page),
            )?;
            let mut chunk = vec![0; size as usize];
            execution.wasm_memory.read(offset, &mut chunk);
            chunk
        }
        mct::SnapshotDataKind::StableMemory { offset, size } => {
            slice(
                offset,
                size,
                execution.stable_memory_size_pages.saturating_mul(page),
            )?;
            let mut chunk = vec![0; size as usize];
            execution.stable_memory.read(offset, &mut chunk);
            chunk
        }
        mct::SnapshotDataKind::WasmChunk { hash } => {
            let chunk = <[u8; 32]>::try_from(hash.as_slice())
                .ok()
                .and_then(|key| snapshot.wasm_chunk_store.get(&key))
                .ok_or_else(|| {
                    UserError::from(ManagementError::ChunkNotFound {
                        hash: hex(&hash),
                        store: args.canister_id,
                    })
                })?;
            chunk.to_vec()
        }
    };
    args::encode(&mct::ReadCanisterSnapshotDataResult { chunk }).map(Handled::reply)
}

/// `upload_canister_snapshot_metadata`: a controller creates an empty snapshot of the given shape
/// (module size, memory sizes, globals, certified data, timer, hook status), to be filled with
/// `upload_canister_snapshot_data` and then loaded.
pub(super) fn upload_metadata(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::UploadCanisterSnapshotMetadataArgs =
        args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    let canister = controlled(state, &id, &context.caller.principal())?;
    let replaced = room_for_snapshot(state, id, args.replace_snapshot.as_deref())?;
    let invalid = |reason: String| {
        UserError::from(ManagementError::InvalidArgument {
            method: context.method.to_string(),
            reason,
        })
    };
    let page = openic_replicated_state::WASM_PAGE_SIZE;
    for (what, size) in [
        ("wasm_memory_size", args.wasm_memory_size),
        ("stable_memory_size", args.stable_memory_size),
    ] {
        if size % page != 0 {
            return Err(invalid(format!(
                "{what} {size} is not a whole number of 64 KiB wasm pages"
            )));
        }
    }
    if args.wasm_module_size > super::install::MAX_WASM_MODULE_BYTES as u64 {
        return Err(ManagementError::ModuleTooLarge {
            size: usize::try_from(args.wasm_module_size).unwrap_or(usize::MAX),
            max: super::install::MAX_WASM_MODULE_BYTES,
        }
        .into());
    }
    if args.certified_data.len() > 32 {
        return Err(invalid(format!(
            "certified_data has {} bytes, at most 32 are allowed",
            args.certified_data.len()
        )));
    }
    let total = args
        .wasm_module_size
        .saturating_add(args.wasm_memory_size)
        .saturating_add(args.stable_memory_size);
    if total > MAX_SNAPSHOT_BYTES {
        return Err(ManagementError::SnapshotTooLarge {
            canister: id.get(),
            size: total,
            max: MAX_SNAPSHOT_BYTES,
        }
        .into());
    }
    let globals = args
        .globals
        .iter()
        .map(|global| {
            Ok(match global {
                mct::SnapshotMetadataGlobal::I32(v) => {
                    openic_replicated_state::GlobalValue::I32(*v)
                }
                mct::SnapshotMetadataGlobal::I64(v) => {
                    openic_replicated_state::GlobalValue::I64(*v)
                }
                mct::SnapshotMetadataGlobal::F32(v) => {
                    openic_replicated_state::GlobalValue::F32(v.to_bits())
                }
                mct::SnapshotMetadataGlobal::F64(v) => {
                    openic_replicated_state::GlobalValue::F64(v.to_bits())
                }
                mct::SnapshotMetadataGlobal::V128(v) => openic_replicated_state::GlobalValue::V128(
                    u128::try_from(v.0.clone()).map_err(|_| {
                        invalid(format!("the v128 global {v} does not fit 128 bits"))
                    })?,
                ),
            })
        })
        .collect::<Result<Vec<_>, UserError>>()?;
    let module_bytes = usize::try_from(args.wasm_module_size).unwrap_or(usize::MAX);
    let snapshot = CanisterSnapshot {
        canister_id: id,
        source: SnapshotSource::MetadataUpload,
        local_id: state.snapshots.next_local_id(),
        taken_at_timestamp: state.metadata.time.as_nanos_since_unix_epoch(),
        canister_version: canister.system_state.canister_version,
        execution_state: openic_replicated_state::ExecutionState {
            wasm_binary: Arc::new(openic_replicated_state::WasmBinary {
                bytes: vec![0; module_bytes],
                module_hash: [0; 32],
            }),
            module_info: Arc::default(),
            wasm_memory: openic_replicated_state::PageMap::new(),
            wasm_memory_size_pages: args.wasm_memory_size / page,
            stable_memory: openic_replicated_state::PageMap::new(),
            stable_memory_size_pages: args.stable_memory_size / page,
            globals,
        },
        certified_data: args.certified_data.clone(),
        global_timer_nanos: match args.global_timer {
            Some(mct::CanisterTimer::Active(at)) => at,
            Some(mct::CanisterTimer::Inactive) | None => 0,
        },
        low_wasm_memory_hook_pending: matches!(
            args.on_low_wasm_memory_hook_status,
            Some(mct::OnLowWasmMemoryHookStatus::Ready)
        ),
        wasm_chunk_store: Default::default(),
    };
    let snapshot_id = snapshot.id();
    let snapshots = Arc::make_mut(&mut state.snapshots);
    if let Some(old) = replaced {
        snapshots.remove(&old.id());
    }
    snapshots.insert(snapshot);
    args::encode(&mct::UploadCanisterSnapshotMetadataResult { snapshot_id }).map(Handled::reply)
}

/// `upload_canister_snapshot_data`: a controller writes a slice (at most [`MAX_SLICE_BYTES`]) of
/// an uploaded snapshot's module, heap or stable memory, or adds a chunk to its chunk store.
/// Snapshots taken from a canister cannot be changed.
pub(super) fn upload_data(
    context: &Context<'_>,
    state: &mut ReplicatedState,
) -> Result<Handled, UserError> {
    let args: mct::UploadCanisterSnapshotDataArgs = args::decode(context.method, context.payload)?;
    let id = CanisterId::unchecked_from_principal(args.canister_id);
    controlled(state, &id, &context.caller.principal())?;
    let snapshot = own_snapshot(state, id, &args.snapshot_id)?;
    if snapshot.source != SnapshotSource::MetadataUpload {
        return Err(ManagementError::SnapshotImmutable.into());
    }
    let size = args.chunk.len() as u64;
    if size > MAX_SLICE_BYTES {
        return Err(ManagementError::SliceTooLarge {
            requested: size,
            allowed: MAX_SLICE_BYTES,
        }
        .into());
    }
    let page = openic_replicated_state::WASM_PAGE_SIZE;
    let execution = &snapshot.execution_state;
    let fits = |offset: u64, len: u64| -> Result<(), UserError> {
        match offset.checked_add(size) {
            Some(end) if end <= len => Ok(()),
            _ => Err(ManagementError::InvalidSlice { offset, size }.into()),
        }
    };
    match args.kind {
        mct::SnapshotDataOffset::WasmModule { offset } => {
            fits(offset, execution.wasm_binary.bytes.len() as u64)?
        }
        mct::SnapshotDataOffset::WasmMemory { offset } => fits(
            offset,
            execution.wasm_memory_size_pages.saturating_mul(page),
        )?,
        mct::SnapshotDataOffset::StableMemory { offset } => fits(
            offset,
            execution.stable_memory_size_pages.saturating_mul(page),
        )?,
        mct::SnapshotDataOffset::WasmChunk => {
            if size > super::install::MAX_CHUNK_BYTES as u64 {
                return Err(ManagementError::ChunkTooLarge {
                    size: args.chunk.len(),
                    max: super::install::MAX_CHUNK_BYTES,
                }
                .into());
            }
            if snapshot.wasm_chunk_store.len() >= super::install::MAX_CHUNKS_PER_STORE {
                return Err(ManagementError::ChunkStoreFull {
                    canister: id.get(),
                    max: super::install::MAX_CHUNKS_PER_STORE,
                }
                .into());
            }
        }
    }
    let snapshots = Arc::make_mut(&mut state.snapshots);
    let Some(snapshot) = snapshots.get_mut(&args.snapshot_id) else {
        return Err(ManagementError::SnapshotNotFound {
            snapshot: hex(&args.snapshot_id),
            canister: id.get(),
        }
        .into());
    };
    let execution = &mut snapshot.execution_state;
    match args.kind {
        mct::SnapshotDataOffset::WasmModule { offset } => {
            let binary = Arc::make_mut(&mut execution.wasm_binary);
            let start = offset as usize;
            binary.bytes[start..start + args.chunk.len()].copy_from_slice(&args.chunk);
        }
        mct::SnapshotDataOffset::WasmMemory { offset } => {
            execution.wasm_memory.write(offset, &args.chunk);
        }
        mct::SnapshotDataOffset::StableMemory { offset } => {
            execution.stable_memory.write(offset, &args.chunk);
        }
        mct::SnapshotDataOffset::WasmChunk => {
            use sha2::Digest as _;
            let hash: [u8; 32] = sha2::Sha256::digest(&args.chunk).into();
            snapshot
                .wasm_chunk_store
                .insert(hash, Arc::new(args.chunk.into()));
        }
    }
    Ok(Handled::reply(crate::common::EMPTY_CANDID_REPLY.to_vec()))
}
